"""clusterexec: a ``concurrent.futures`` executor whose workers live on TCP nodes.

``ClusterExecutor`` is a drop-in for ``ProcessPoolExecutor``; see the README and ``docs/``.
The executor is imported on first use, so ``python -m clusterexec.node`` starts quickly.
"""

from __future__ import annotations

import logging as _logging
from typing import TYPE_CHECKING, Any

from clusterexec._version import __version__
from clusterexec.errors import (
    AuthenticationError,
    ClusterError,
    ConfigurationError,
    KeyFileError,
    NodeFullError,
    NodeLostError,
    NodeUnreachableError,
    ProtocolError,
    RemoteError,
    TaskTimeoutError,
    VersionMismatchError,
)

# A library adds no handlers of its own: the application decides where our log lines go.
_logging.getLogger("clusterexec").addHandler(_logging.NullHandler())

if TYPE_CHECKING:
    from clusterexec.client.executor import ClusterExecutor
    from clusterexec.errors import BrokenCluster, TaskUnpicklingError, WorkerCrashedError, WorkerStoppedError


def __getattr__(name: str) -> Any:
    if name == "ClusterExecutor":
        from clusterexec.client.executor import ClusterExecutor

        return ClusterExecutor
    if name in ("BrokenCluster", "WorkerCrashedError", "WorkerStoppedError", "TaskUnpicklingError"):
        from clusterexec import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'clusterexec' has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "BrokenCluster",
    "ClusterError",
    "ClusterExecutor",
    "ConfigurationError",
    "KeyFileError",
    "NodeFullError",
    "NodeLostError",
    "NodeUnreachableError",
    "ProtocolError",
    "RemoteError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "VersionMismatchError",
    "WorkerCrashedError",
    "WorkerStoppedError",
    "__version__",
]
