"""A node hosted in the client process: the local executor's session, run by the client's I/O thread.

``ClusterExecutor(4)`` needs no node process between the client and its workers. Its node is a
:class:`HostedNode`: one :class:`~clusterexec.node.session.Session`, the node's own, driven by
the client I/O thread's readiness loop instead of a node's. The session's messages to the
client go to a :class:`ClientQueue` in memory, and the client's to the session are handed over
as they are sent (see :mod:`clusterexec.client.inprocess`). The workers are the node's workers,
started with :func:`~clusterexec.node.workers.spawn_worker` (a process with threads must not
fork) and watched by :class:`~clusterexec.node.workers.WorkerIO` on the client's poller; each
one's exit is seen through a pidfd. So a lone task goes from the user's thread to the I/O thread
to a worker and back, as in ProcessPoolExecutor, without the two hops through a node process.

The session never unpickles user payloads here either: the I/O thread only routes bytes.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import cloudpickle

from clusterexec.node.host import (
    NodeHost,
    WorkerOwner,
    WorkerProcess,
    default_max_processes,
    node_facts,
    status_report,
)
from clusterexec.node.session import Session, SessionState
from clusterexec.node.slots import RunSlots
from clusterexec.node.workers import WorkerIO, spawn_worker
from clusterexec.wire.channel import Channel, flush_each
from clusterexec.wire.frames import Message
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller
from clusterexec.wire.sealing import Buffer

log = logging.getLogger("clusterexec.node")

# Seconds the client waits, when it shuts down, for the hosted node's workers to exit.
STOP_WITHIN = 3.0


def can_host() -> bool:
    """Whether this platform can host a node in the client process (it needs pidfds: Linux 5.3+)."""
    return hasattr(os, "pidfd_open")


class MessageQueue:
    """A channel in memory, between the hosted session and its client: what one side sends
    waits here until the other takes it. It has no socket to write and no backlog."""

    sock = None  # no socket: taking the messages is the flush
    backlog = 0

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def send(self, kind: int, body: Buffer = b"", buffers: Any = ()) -> None:
        """Queue one message."""
        self.messages.append(Message(kind, body, buffers if type(buffers) is list else list(buffers)))

    @property
    def wants_write(self) -> bool:
        """True while messages wait to be taken."""
        return bool(self.messages)

    def take(self) -> list[Message]:
        """Everything queued so far, oldest first."""
        messages, self.messages = self.messages, []
        return messages

    def close(self) -> None:
        """Drop what was not taken."""
        self.messages = []


class HostedNode(NodeHost):
    """One session and its workers, hosted by the client's I/O thread (which calls every method).

    ``timer_at`` asks the client's loop to call :meth:`timers` by a time."""

    chunked_buffers = False
    # Four times a node's: the client's loop is also the node's, so a worker is written to and
    # read from once per turn of a busier loop; deeper pipelines of tiny tasks keep its workers
    # fed with fewer system calls per task. Only tasks of the function a worker has just run in
    # under a millisecond queue on it, about 2 ms of them at most (see WorkerPool.pipelines).
    pipeline = 16
    # As ProcessPoolExecutor's, the local executor's workers stay until it shuts down: a new
    # one is a new interpreter here, not a fork.
    worker_idle_timeout = 0.0

    def __init__(self, poller: Poller, workers: int, timer_at: Callable[[float], None]) -> None:
        self.poller = poller
        self.slots = RunSlots(workers)
        self.max_processes = default_max_processes(workers)
        self._timer_at = timer_at
        self.dirty: set[Channel] = set()
        self.worker_io = WorkerIO(
            poller, self.want_write, self._forget, timer_at, self._end_session, own_pids_only=True
        )
        self.queue = MessageQueue()  # the session's messages to its client
        self._client_channel = cast(Channel, self.queue)
        self.session = Session(self, self._client_channel, f"this process ({os.getpid()})", workers)
        self.ended = ""  # why the session ended, once it has
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self._processes: dict[int, tuple[subprocess.Popen[bytes], int]] = {}  # pid: (process, pidfd)
        self._env = dict(os.environ)
        # Like ProcessPoolExecutor's spawn, the workers see this interpreter's import path.
        self._env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)

    # ------------------------------------------------------------------ the client's side

    def busy(self) -> bool:
        """Whether the node has something for its client, or work of its own left from the
        last events (a worker to reap, channels to write, a session that ended)."""
        return bool(self.queue.messages or self.dirty or self.worker_io.reap_due or self.ended)

    def from_client(self, messages: list[Message]) -> None:
        """Hand the session what the client sent."""
        if self.ended:
            return
        session = self.session
        session.on_client_messages(messages)
        if session.state is SessionState.CLOSED:
            self.ended = "the client said goodbye"
        self.settle()

    def settle(self) -> None:
        """After the session or its workers acted: reap exited workers, write to the workers."""
        worker_io = self.worker_io
        if worker_io.reap_due:
            worker_io.reap_due = False
            worker_io.reap()
            self.slots.grant(time.monotonic())
        for fd, done in flush_each(self.dirty):
            if done is None:  # the worker is gone: reap it
                entry = worker_io.by_fd.get(fd)
                if entry is not None:
                    worker_io.unwatch(entry[1])
                    worker_io.reap_due = True
                continue
            registered = self.poller.get(fd)
            events = EVENT_READ | (0 if done else EVENT_WRITE)
            if registered is not None and registered[0] != events:
                self.poller.modify(fd, events, registered[1])

    def timers(self, now: float) -> float:
        """Run the session's timers (task timeouts, STARTED reports, idle workers) and the kill
        deadlines of dying workers; return the seconds until the next is due."""
        if self.ended:
            return 1.0
        due = self.session.tick(now)
        timeout = min(max(0.0, due - now), self.worker_io.kill_overdue(now))
        self.settle()
        return timeout

    def close(self, reason: str) -> None:
        """End the session and wait (a while) for its workers to exit."""
        if not self.ended:
            self.ended = reason
        self.session.close(reason)
        self.settle()
        self.worker_io.reap_dying(within=STOP_WITHIN)
        for pid in list(self._processes):
            self._forget_process(pid)

    # ------------------------------------------------------------------ NodeHost

    def grant_slots(self) -> None:
        """Give the free run slots to the session if it has queued work."""
        slots = self.slots
        if slots.in_use < slots.capacity:
            slots.grant(time.monotonic())

    def process_room(self) -> int:
        """How many more worker processes the bound allows now."""
        return max(0, self.max_processes - len(self.worker_io.by_pid))

    def make_room(self, session: WorkerOwner) -> bool:
        """True while under the process bound (there is no other session to retire a worker of)."""
        return len(self.worker_io.by_pid) < self.max_processes

    def refusal(self) -> dict[str, object] | None:
        """Never full: the one session is its client's."""
        return None

    def describe(self) -> dict[str, object]:
        """Facts about this node (the client's process), for WELCOME."""
        return {**node_facts(self.started, cloudpickle.__version__), "hosted": True}

    def status(self, packages: list[object] | None = None) -> dict[str, object]:
        """The health report, as a node's (see Node.status)."""
        counts = {
            "uptime": time.monotonic() - self._started_monotonic,
            "workers": self.slots.capacity,
            "busy": self.slots.in_use,
            "tasks_run": self.tasks_run,
            "processes": len(self.worker_io.by_pid),
            "max_processes": self.max_processes,
            "max_sessions": 1,
        }
        return status_report(self.describe(), counts, [] if self.ended else [self.session], packages)

    def fork_worker(self, sock: socket.socket, output: list[int], compression: str | None = None) -> int:
        """Start a worker serving ``sock`` (a new interpreter: see spawn_worker)."""
        process = spawn_worker(sock, output, compression, self._env)
        pidfd = os.pidfd_open(process.pid)
        self._processes[process.pid] = (process, pidfd)
        self.poller.register(pidfd, EVENT_READ, self._on_exit(process.pid))
        return process.pid

    def _on_exit(self, pid: int) -> Callable[[int, int], None]:
        def on_exit(fd: int, events: int) -> None:
            self.worker_io.reap_due = True  # it has exited: WorkerIO.reap() waits for it in settle()
            self._forget_process(pid)

        return on_exit

    def _forget_process(self, pid: int) -> None:
        entry = self._processes.pop(pid, None)
        if entry is None:
            return
        process, pidfd = entry
        try:
            self.poller.unregister(pidfd)
        except KeyError:
            pass
        os.close(pidfd)
        # Waited for by WorkerIO (wait4 on its pid), never by subprocess, which would take
        # its exit status if it found the process unwaited: tell subprocess it is done.
        if process.returncode is None:
            process.returncode = 0

    def watch_worker(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Read a worker's channel and output pipes on the client's poller."""
        self.worker_io.watch(session, worker)

    def drain_output(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Forward what a worker has printed so far (before its result)."""
        self.worker_io.drain_output(session, worker)

    def signal_workers(self, session: WorkerOwner, signum: int, grace: float) -> None:
        """Signal every live worker; SIGKILL after ``grace``."""
        self.worker_io.signal_session(session, signum, grace)

    def retire_worker(self, worker: WorkerProcess, kill: bool = False) -> None:
        """Stop feeding a worker; with ``kill`` terminate it."""
        self.worker_io.retire(worker, kill)

    def want_write(self, channel: Channel) -> None:
        """Flush this worker channel in the next :meth:`settle` (the client queue needs none)."""
        if channel is not self._client_channel:
            self.dirty.add(channel)

    def timer_at(self, when: float) -> None:
        """Have the client's loop call :meth:`timers` by ``when``."""
        self._timer_at(when)

    def _forget(self, channel: Channel) -> None:
        self.dirty.discard(channel)

    def _end_session(self, session: WorkerOwner, reason: str) -> None:
        # A worker broke the protocol: the session ends as a node's would, and the client sees
        # its node lost (it opens a new session, with new workers).
        self.ended = reason
        self.session.close(reason)

