"""clusterexec: a ``concurrent.futures`` executor whose workers live on TCP nodes.

``ClusterExecutor`` is a drop-in for ``ProcessPoolExecutor``; see the README and ``docs/``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from clusterexec.errors import (  # noqa: E402
    AuthenticationError,
    BrokenCluster,
    ClusterError,
    ConfigurationError,
    KeyFileError,
    NodeLostError,
    NodeUnreachableError,
    ProtocolError,
    RemoteError,
    VersionMismatchError,
    WorkerCrashedError,
)
from clusterexec.executor import ClusterExecutor  # noqa: E402

__all__ = [
    "AuthenticationError",
    "BrokenCluster",
    "ClusterError",
    "ClusterExecutor",
    "ConfigurationError",
    "KeyFileError",
    "NodeLostError",
    "NodeUnreachableError",
    "ProtocolError",
    "RemoteError",
    "VersionMismatchError",
    "WorkerCrashedError",
    "__version__",
]
