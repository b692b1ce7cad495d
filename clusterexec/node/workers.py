"""The node's side of its worker processes: fork them, read their channels and output pipes,
retire, signal and reap them.

:class:`WorkerIO` owns every worker process of every session as the node's readiness loop sees
it: a channel to read, up to two output pipes, a pid to reap. What a worker's messages mean is
its :class:`~clusterexec.node.session.Session`'s business; this module only moves them.
"""

from __future__ import annotations

import logging
import os

# Standard modules that cloudpickle imports and the node itself does not use. The node loads
# them so that every worker it forks has them already: a worker's first task then costs about
# 4 ms of CPU less (mostly the regular expressions platform compiles as it loads), 10.5 ms
# against 6 ms measured. The node still never imports cloudpickle.
import platform  # noqa: F401
import signal
import socket
import subprocess
import sys
import time
import uuid  # noqa: F401  (see platform above)
from collections.abc import Callable
from typing import Any

from clusterexec.errors import ProtocolError
from clusterexec.node import worker as worker_loop
from clusterexec.node.host import WorkerOwner, WorkerProcess, describe_status
from clusterexec.node.libc import die_with_parent, tune_malloc
from clusterexec.wire.channel import Channel, ConnectionClosed
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

log = logging.getLogger("clusterexec.node")

# Seconds a worker retired with ``kill`` has between SIGTERM and SIGKILL.
RETIRE_GRACE = 2.0


def fork_worker(sock: socket.socket, output: list[int], compression: str | None = None) -> int:
    """Fork a worker serving ``sock`` (stdout and stderr to ``output`` if given; results
    compressed with ``compression``, if given). In the parent, return its pid; the child never
    returns from here."""
    pid = os.fork()
    if pid:
        return pid
    try:
        for target, fd in zip((1, 2), output, strict=False):
            os.dup2(fd, target)
        _become_worker(sock, compression)
    finally:
        os._exit(1)


# What a spawned worker runs: ``python -c SPAWN_CODE FD CODEC PARENT_PID`` (see spawn_worker).
# SIGINT is ignored first thing: a Ctrl-C while the worker starts must not end it.
SPAWN_CODE = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys; "
    "from clusterexec.node.workers import serve_spawned; serve_spawned(sys.argv[1:])"
)


def spawn_worker(
    sock: socket.socket, output: list[int], compression: str | None, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start a worker serving ``sock`` in a new interpreter (not a fork: the process starting
    it has threads, as a client hosting its local node has, see node/hosted.py). Its stdout
    and stderr go to ``output`` if given, its stdin is /dev/null as multiprocessing's children's.
    It stays in the client's process group: a Ctrl-C at the terminal interrupts the task it runs,
    as in ProcessPoolExecutor's workers (see Worker.serve)."""
    fd = sock.fileno()
    argv = [sys.executable, "-c", SPAWN_CODE, str(fd), compression or "", str(os.getpid())]
    streams = [*output, None, None][:2]
    return subprocess.Popen(
        argv,
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=streams[0],
        stderr=streams[1],
        env=env,
    )


def serve_spawned(argv: list[str]) -> None:
    """Entry point of a worker started by :func:`spawn_worker`: ``FD CODEC PARENT_PID``."""
    fd, codec, parent = int(argv[0]), argv[1] or None, int(argv[2])
    # Started with SIGINT blocked (the client's I/O thread blocks it), and ignoring it since
    # SPAWN_CODE's first line: a Ctrl-C that came meanwhile is dropped now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    die_with_parent()
    if os.getppid() != parent:  # the parent died before it could be told to kill us with it
        os._exit(1)
    try:
        _become_worker(socket.socket(fileno=fd), codec)
    finally:
        os._exit(1)


def _become_worker(sock: socket.socket, compression: str | None) -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts: BrokenPipeError, not death
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until a task runs: see Worker.serve()
    die_with_parent()
    tune_malloc(keep_freed=False)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    worker_loop.main(sock, compression)


class WorkerIO:
    """Every worker process of the node: their channels and pipes in the poller, their pids.

    Single-threaded, driven by the node's loop, which flushes channels: ``want_write`` asks it to
    flush one, ``forget`` tells it one is closed; ``timer_at`` asks it to call
    :meth:`kill_overdue` by a time; ``end_session`` ends a session whose worker broke the protocol."""

    def __init__(
        self,
        poller: Poller,
        want_write: Callable[[Channel], None],
        forget: Callable[[Channel], None],
        timer_at: Callable[[float], None],
        end_session: Callable[[WorkerOwner, str], None],
        own_pids_only: bool = False,
    ) -> None:
        self.poller = poller
        # In a process with children of its own (a node hosted by a client, see
        # node/hosted.py), only this node's workers are waited for, by pid: never wait4(-1).
        self.own_pids_only = own_pids_only
        self._want_write = want_write
        self._forget = forget
        self._timer_at = timer_at
        self._end_session = end_session
        self.by_fd: dict[int, tuple[WorkerOwner, WorkerProcess]] = {}
        self.by_pid: dict[int, tuple[WorkerOwner, WorkerProcess]] = {}
        self.dying: dict[int, WorkerProcess] = {}
        # Workers retired (told to stop, or killed) and not reaped yet: on their way out.
        self.exiting: set[int] = set()
        # Set when a child may have exited (SIGCHLD, a closed channel): the loop then calls reap().
        self.reap_due = False
        # The events of the select() being handled (None outside of it): see drain_output().
        self.batch: list[tuple[int, int, Any]] | None = None
        self._ready_of: list[tuple[int, int, Any]] | None = None  # the batch _ready holds the fds of
        self._ready: set[int] = set()

    def watch(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Start reading a worker's channel (and output pipes) and tracking its pid."""
        fd = worker.channel.sock.fileno()
        self.by_fd[fd] = (session, worker)
        self.by_pid[worker.pid] = (session, worker)
        self.poller.register(fd, EVENT_READ, self.on_readable)
        for stream, pipe in enumerate(worker.output, start=1):
            os.set_blocking(pipe, False)
            self.poller.register(pipe, EVENT_READ, self._output_reader(session, worker, stream))

    def on_readable(self, fd: int, events: int) -> None:
        """The poller's handler for a worker's channel: flush it, or hand its messages to its session."""
        entry = self.by_fd.get(fd)
        if entry is None:
            return
        session, worker = entry
        if events & EVENT_WRITE:
            self._want_write(worker.channel)
        if not events & EVENT_READ:
            return
        try:
            messages = worker.channel.read()
        except ConnectionClosed:
            self.unwatch(worker)
            self.reap_due = True
            return
        except ProtocolError as exc:
            log.error("worker %d sent garbage (%s); killing it", worker.pid, exc)
            self.unwatch(worker)
            os.kill(worker.pid, signal.SIGKILL)
            return
        try:
            session.on_worker_messages(worker, messages)
        except ProtocolError as exc:
            log.warning("session from %s: %s; connection closed", session.peer, exc)
            self._end_session(session, str(exc))

    def _output_reader(self, session: WorkerOwner, worker: WorkerProcess, stream: int) -> Callable[[int, int], None]:
        def on_output(fd: int, events: int) -> None:
            self._read_output(session, worker, stream, fd)

        return on_output

    def _read_output(self, session: WorkerOwner, worker: WorkerProcess, stream: int, fd: int) -> None:
        if worker.output[stream - 1] != fd:
            return  # a stale event: this pipe was closed earlier in the same loop iteration
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            session.on_output(worker, stream, data)
            return
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        os.close(fd)
        worker.output[stream - 1] = -1

    def drain_output(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Forward what a worker has printed so far (called before forwarding its result).

        Inside an event batch only the pipes that are in the batch are read: a worker writes its
        output before it sends its result, and a level-triggered epoll reports a pipe that has
        data in every batch until it is drained, so a pipe missing from the batch that holds the
        result is empty, and reading it would be a system call per result for nothing."""
        batch = self.batch
        ready = None
        if batch is not None:
            if len(batch) == 1:
                return  # the one event is the worker's socket: no pipe of it has anything
            if self._ready_of is not batch:  # once per batch, not per result
                self._ready_of, self._ready = batch, {fd for fd, _events, _handler in batch}
            ready = self._ready
        for stream, fd in enumerate(worker.output, start=1):
            if fd >= 0 and (ready is None or fd in ready):
                self._read_output(session, worker, stream, fd)

    def watch_output(self, session: WorkerOwner, worker: WorkerProcess, on: bool) -> None:
        """Start or stop reading a worker's output pipes (back-pressure: a worker printing
        without end then blocks on its full pipe)."""
        for stream, pipe in enumerate(worker.output, start=1):
            if pipe < 0:
                continue
            try:
                if on:
                    self.poller.register(pipe, EVENT_READ, self._output_reader(session, worker, stream))
                else:
                    self.poller.unregister(pipe)
            except KeyError:
                pass

    def retire(self, worker: WorkerProcess, kill: bool = False) -> None:
        """Stop feeding a worker; with ``kill`` terminate it, SIGKILL after a grace period."""
        if worker.pid in self.by_pid:
            self.exiting.add(worker.pid)
        if kill:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            worker.kill_deadline = time.monotonic() + RETIRE_GRACE
            self.dying[worker.pid] = worker
            self._timer_at(worker.kill_deadline)
            self.unwatch(worker)

    def signal_session(self, session: WorkerOwner, signum: int, grace: float) -> None:
        """Send ``signum`` to every live worker process of ``session`` (retiring ones too).

        Those still alive ``grace`` seconds later get SIGKILL: a task that ignores SIGTERM cannot
        keep a session's process alive. Their channels stay watched, so a result sent before the
        signal is still forwarded, and :meth:`reap` reports each exit to the session."""
        deadline = time.monotonic() + grace
        for pid, (owner, process) in list(self.by_pid.items()):
            if owner is not session:
                continue
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
            if signum != signal.SIGKILL and pid not in self.dying:
                process.kill_deadline = deadline
                self.dying[pid] = process
                self._timer_at(deadline)

    def unwatch(self, worker: WorkerProcess) -> None:
        """Stop reading a worker: close its output pipes and its channel (its pid stays tracked)."""
        for index, pipe in enumerate(worker.output):
            if pipe >= 0:
                try:
                    self.poller.unregister(pipe)
                except KeyError:
                    pass
                os.close(pipe)
                worker.output[index] = -1
        fd = worker.channel.sock.fileno()
        if fd >= 0 and fd in self.by_fd:
            del self.by_fd[fd]
            try:
                self.poller.unregister(fd)
            except KeyError:
                pass
            self._forget(worker.channel)
            worker.channel.close()

    def kill_overdue(self, now: float) -> float:
        """SIGKILL the dying workers past their grace period; return the seconds until the next
        deadline (at most 1)."""
        timeout = 1.0
        for pid, dying in list(self.dying.items()):
            if now >= dying.kill_deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                dying.kill_deadline = now + 3600
            else:
                timeout = min(timeout, dying.kill_deadline - now)
        return timeout

    def _exited(self) -> list[tuple[int, int, Any]]:
        """The children that have exited, collected: (pid, wait status, rusage) each."""
        exited = []
        if self.own_pids_only:
            for pid in {**self.by_pid, **self.dying}:
                try:
                    found, status, rusage = os.wait4(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if found:
                    exited.append((found, status, rusage))
            return exited
        while True:
            try:
                found, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return exited
            if found == 0:
                return exited
            exited.append((found, status, rusage))

    def reap(self) -> None:
        """Collect every exited child and tell its session (after reading what it sent last)."""
        for pid, status, rusage in self._exited():
            self.dying.pop(pid, None)
            self.exiting.discard(pid)
            entry = self.by_pid.pop(pid, None)
            if entry is None:
                continue
            session, worker = entry
            fd = worker.channel.sock.fileno()
            if fd in self.by_fd:
                # Read what the worker wrote before it died, so a result sent just before
                # an exit is not mistaken for a crash.
                self.on_readable(fd, EVENT_READ)
                self.drain_output(session, worker)
                self.unwatch(worker)
            log.debug("worker %d exited: %s", pid, describe_status(status))
            session.on_worker_exit(worker, status, rusage.ru_maxrss)

    def reap_dying(self, within: float) -> None:
        """At shutdown: wait up to ``within`` seconds for the dying workers, then SIGKILL the rest."""
        deadline = time.monotonic() + within
        while self.dying and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in list(self.dying):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.dying.clear()
