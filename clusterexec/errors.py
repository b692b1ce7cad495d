"""Every exception class of clusterexec, under one base.

Each message says which node, which task and what to do. Failures of the pool itself derive
from ``concurrent.futures.process.BrokenProcessPool`` so that code written to catch
``ProcessPoolExecutor``'s errors catches ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


class ClusterError(Exception):
    """Base class of every error raised by clusterexec itself."""


class ConfigurationError(ClusterError, ValueError):
    """A malformed argument: a node address, a key, an option. The message names it."""


class KeyFileError(ConfigurationError):
    """A key file that is missing, empty or readable by others."""


class ProtocolError(ClusterError):
    """A peer sent bytes that do not follow the clusterexec wire protocol."""


class AuthenticationError(ClusterError):
    """The handshake with a node failed: wrong or missing key, or a tampered exchange."""


class VersionMismatchError(ClusterError):
    """The two sides speak incompatible protocol versions."""


class NodeUnreachableError(ClusterError, ConnectionError):
    """A node could not be reached (refused, timed out, name not resolved)."""


class NodeFullError(NodeUnreachableError):
    """A node refused a new session: it already serves as many clients as its operator allows
    (``--max-sessions``). The message names the node.

    An executor with other nodes goes on without it and retries it later (as a lost node); with
    no other node, the constructor raises this error."""


class NodeLostError(ClusterError):
    """A task's node was lost (connection closed or heartbeats stopped) too many times."""


class TaskTimeoutError(ClusterError, TimeoutError):
    """A task ran past the timeout given with ``ex.options(timeout=...)``.

    Its worker process was killed and the node started a replacement; only this task failed.
    """


def _broken_pool_errors() -> tuple[type, type, type, type]:
    # concurrent.futures.process pulls in multiprocessing: a fifth of a node's start-up. The
    # node never raises these two, so they are made on first use (module __getattr__ below).
    from concurrent.futures.process import BrokenProcessPool

    class BrokenCluster(ClusterError, BrokenProcessPool):
        """The executor can no longer run tasks: every node is gone, or an initializer failed."""

    class WorkerCrashedError(ClusterError, BrokenProcessPool):
        """The worker process running a task died (signal, ``os._exit``, out of memory).

        Only that task fails; the node starts a replacement worker and the executor goes on.
        """

    class WorkerStoppedError(WorkerCrashedError):
        """A task was running when ``terminate_workers()`` or ``kill_workers()`` stopped its worker.

        The executor is shut down; no replacement worker is started.
        """

    class TaskUnpicklingError(ClusterError, BrokenProcessPool):
        """A task's function or arguments could not be unpickled on its worker, or its result on
        the client: the unpickling raised, or called ``sys.exit()``.

        Only that task fails, as if its worker had died; the pool goes on. ``__cause__`` (or the
        remote traceback) is what the unpickling raised.
        """

    for cls in (BrokenCluster, WorkerCrashedError, WorkerStoppedError, TaskUnpicklingError):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return BrokenCluster, WorkerCrashedError, WorkerStoppedError, TaskUnpicklingError


if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    class BrokenCluster(ClusterError, BrokenProcessPool):
        """The executor can no longer run tasks: every node is gone, or an initializer failed."""

    class WorkerCrashedError(ClusterError, BrokenProcessPool):
        """The worker process running a task died (signal, ``os._exit``, out of memory)."""

    class WorkerStoppedError(WorkerCrashedError):
        """A task was running when ``terminate_workers()`` or ``kill_workers()`` stopped its worker."""

    class TaskUnpicklingError(ClusterError, BrokenProcessPool):
        """A task's function, arguments or result could not be unpickled where it arrived."""

else:

    def __getattr__(name: str) -> Any:
        if name in ("BrokenCluster", "WorkerCrashedError", "WorkerStoppedError", "TaskUnpicklingError"):
            broken, crashed, stopped, unpickling = _broken_pool_errors()
            globals().update(
                BrokenCluster=broken,
                WorkerCrashedError=crashed,
                WorkerStoppedError=stopped,
                TaskUnpicklingError=unpickling,
            )
            return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RemoteError(ClusterError):
    """A task raised an exception that could not be rebuilt on the client.

    ``type_name`` is the remote exception's qualified type name, ``message`` its ``str()``
    and ``remote_traceback`` the full remote traceback text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class HostKeyError(ClusterError):
    """An SSH server's host key is not in known_hosts, or differs from the one recorded there.

    The message names the host, the key's fingerprint and how to accept it.
    """
