"""What a session and the node it lives in share: the :class:`NodeHost` interface a
:class:`~clusterexec.node.session.Session` reaches its node through, and the record of a
worker process both of them keep.

The seam lets a session run against any host: the node server
(:class:`~clusterexec.node.server.Node`), or a fake one in a test.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from clusterexec._version import __version__
from clusterexec.wire.channel import Channel
from clusterexec.wire.frames import Message

if TYPE_CHECKING:
    from clusterexec.node.slots import RunSlots


# Tasks a worker of a node may hold at once while its tasks are tiny (NodeHost.pipeline).
PIPELINE = 4
# Seconds a worker process may stay idle before it is retired (``--worker-idle-timeout``; 0: never).
WORKER_IDLE_TIMEOUT = 60.0


class WorkerState(enum.Enum):
    """Where a worker process is in its life."""

    RUNNING = "running"
    RETIRING = "retiring"
    KILLED = "killed"
    SIGNALLED = "signalled at the client's request"
    DEAD = "dead"


@dataclass
class WorkerProcess:
    """A worker process of one session, as the node sees it."""

    pid: int
    channel: Channel
    state: WorkerState = WorkerState.RUNNING
    outstanding: deque[tuple[int, Message]] = field(default_factory=deque)
    functions: set[bytes] = field(default_factory=set)
    assigned: int = 0
    busy_since: float = 0.0
    idle_since: float = 0.0  # when it last became idle (started, or ended its last task)
    holds_slot: bool = False  # it counts against the node's run slots (see node/slots.py)
    # The function digest of its last task if that ran in under SHORT_TASK (b"" otherwise), and
    # how many tasks of that function it may hold at once: see Session.dispatch.
    short: bytes = b""
    depth: int = 1
    kill_deadline: float = 0.0
    output: list[int] = field(default_factory=list)
    # The running task's timeout (seconds) and when it is due; timed_out: the timeout it ran
    # past, once the node killed it for that.
    timeout: float | None = None
    deadline: float = 0.0
    timed_out: float | None = None


def describe_status(status: int) -> str:
    """Describe a wait status: 'exit code 3' or 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def exit_report(pid: int, status: int, maxrss_kb: int) -> dict[str, object]:
    """How a worker process ended, for the client's CRASHED message."""
    return {
        "pid": pid,
        "status": describe_status(status),
        "exitcode": os.waitstatus_to_exitcode(status),
        "maxrss_kb": maxrss_kb,
    }


def default_max_processes(workers: int) -> int:
    """The default bound on a node's worker processes: twice its run slots, and at least 4 more
    (room for other sessions' idle workers, so slots can move between sessions without a fork)."""
    return max(2 * workers, workers + 4)


def node_facts(started: float, cloudpickle_version: str) -> dict[str, object]:
    """What a node says of itself to its clients (WELCOME, STATUS): host, pid, versions and when
    it started (``started``, a date)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "clusterexec": __version__,
        "cloudpickle": cloudpickle_version,
        "started": started,
    }


class SessionCounts(Protocol):
    """What a node's status says of each of its sessions (implemented by Session)."""

    @property
    def peer(self) -> str: ...
    @property
    def share(self) -> int: ...
    @property
    def queue(self) -> Sized: ...
    @property
    def held(self) -> int: ...
    @property
    def workers(self) -> Sized: ...
    @property
    def tasks_done(self) -> int: ...


def status_report(
    facts: dict[str, object],
    counts: Mapping[str, object],
    sessions: Sequence[SessionCounts],
    packages: list[object] | None,
) -> dict[str, object]:
    """A node's answer to STATUS: its ``facts``, its ``counts`` (uptime, slots, processes...),
    each session's client, share and tasks, and with ``packages`` its version of each."""
    extra: dict[str, object] = {}
    if packages:
        from clusterexec.code.versions import versions  # only when asked: metadata is slow to read

        extra["packages"] = versions(packages)
    listed = [
        {
            "peer": s.peer,
            "share": s.share,
            "queued": len(s.queue),
            "running": s.held,
            "processes": len(s.workers),
            "tasks_done": s.tasks_done,
        }
        for s in sessions
    ]
    return {**extra, **facts, **counts, "sessions": len(sessions), "session_list": listed}


class WorkerOwner(Protocol):
    """What the node calls back on the session a worker belongs to (implemented by Session):
    the worker's messages, its output, its exit. Declared here so that this module does not
    import the session module, which imports it."""

    peer: str
    workers: list[WorkerProcess]
    channel: Channel  # to the client
    paused: bool  # its workers are not read while its client is behind

    def on_worker_messages(self, worker: WorkerProcess, messages: list[Message]) -> None:
        """Handle messages the worker sent."""

    def on_output(self, worker: WorkerProcess, stream: int, data: bytes) -> None:
        """Forward what the worker printed (stream 1 stdout, 2 stderr)."""

    def on_worker_exit(self, worker: WorkerProcess, status: int, maxrss_kb: int) -> None:
        """The worker process ended with wait status ``status``."""


class NodeHost:
    """What a session needs from the node server it lives in (implemented by node.Node)."""

    tasks_run = 0
    slots: RunSlots  # the node's run slots, shared by its sessions
    worker_idle_timeout = WORKER_IDLE_TIMEOUT
    # How many tiny tasks a worker that runs them may hold at once (see Session.dispatch).
    pipeline = PIPELINE
    # Whether its workers' buffers are kept as the chunks they arrived in: a node forwards them
    # so; a node hosted by its client hands them to the client's unpickler, which needs them whole.
    chunked_buffers = True

    def grant_slots(self) -> None:
        """Give the node's free run slots to the sessions with queued work (see RunSlots.grant)."""
        raise NotImplementedError

    def process_room(self) -> int:
        """How many more worker processes the node's process bound allows now."""
        raise NotImplementedError

    def make_room(self, session: WorkerOwner) -> bool:
        """True if ``session`` may start a worker process now. At the process bound, retire the
        longest-idle worker of another session (unless one is already on its way out) and
        return False: the slots are granted again once it is reaped."""
        raise NotImplementedError

    def refusal(self) -> dict[str, object] | None:
        """None if a new session may open; otherwise the REFUSED message's body (the node is full)."""
        raise NotImplementedError

    def status(self, packages: list[object] | None = None) -> dict[str, object]:
        """The node's health report (for STATUS requests), with its versions of ``packages``."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """Facts about the node for the WELCOME message."""
        raise NotImplementedError

    def fork_worker(self, sock: socket.socket, output: list[int], compression: str | None = None) -> int:
        """Fork a worker process serving ``sock`` (stdout and stderr to ``output`` if given;
        results compressed with ``compression``, if given)."""
        raise NotImplementedError

    def drain_output(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Forward whatever a worker has printed so far (called before forwarding its result)."""
        raise NotImplementedError

    def watch_worker(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Start reading a worker's channel."""
        raise NotImplementedError

    def signal_workers(self, session: WorkerOwner, signum: int, grace: float) -> None:
        """Send ``signum`` to every live worker process of ``session``; SIGKILL those still
        alive ``grace`` seconds later. Their channels stay watched until they are reaped."""
        raise NotImplementedError

    def retire_worker(self, worker: WorkerProcess, kill: bool = False) -> None:
        """Stop reading a worker's channel; with ``kill``, terminate it."""
        raise NotImplementedError

    def want_write(self, channel: Channel) -> None:
        """Note that a channel has output to flush."""
        raise NotImplementedError

    def timer_at(self, when: float) -> None:
        """Make sure :meth:`Session.tick` is called by ``when`` (a time.monotonic() value)."""
        raise NotImplementedError
