"""The node server: one readiness loop that accepts clients and runs one session per client.

``python -m clusterexec.node --port 15809 --workers 4 --key-file secret.key``

One thread runs a readiness loop (:mod:`clusterexec.wire.poller`) over the listening socket, every
client connection and every worker's socketpair; the handlers belong to the
:class:`~clusterexec.node.accept.Acceptor` (new connections and their handshakes), to
:class:`Node` (client connections) and to :class:`~clusterexec.node.workers.WorkerIO` (worker
processes). :class:`Node` keeps the loop, signals, timers, flushing and back-pressure. Workers
are forked from this process, which never imports or unpickles user code, so each session
starts from a clean interpreter. SIGCHLD, SIGTERM and SIGINT reach the loop through a wakeup socket.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clusterexec.errors import ClusterError, ProtocolError
from clusterexec.node.accept import Acceptor, listen, raise_fd_limit
from clusterexec.node.host import (
    WORKER_IDLE_TIMEOUT,
    NodeHost,
    WorkerOwner,
    WorkerProcess,
    default_max_processes,
    node_facts,
    status_report,
)
from clusterexec.node.libc import release_freed, tune_malloc
from clusterexec.node.session import Session, SessionState
from clusterexec.node.slots import RunSlots
from clusterexec.node.workers import WorkerIO, fork_worker
from clusterexec.wire.channel import Channel, ConnectionClosed, flush_each
from clusterexec.wire.frames import DEFAULT_MAX_FRAME
from clusterexec.wire.handshake import HANDSHAKE_TIMEOUT, SessionKeys
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

if TYPE_CHECKING:
    import ssl  # imported at run time only when TLS is configured: it costs startup time

log = logging.getLogger("clusterexec.node")

EXIT_USAGE = 2
# Back-pressure: a session's workers are not read while more than BACKLOG_HIGH bytes wait to go
# to its client, and are read again below BACKLOG_LOW.
BACKLOG_HIGH = 64 << 20
BACKLOG_LOW = 16 << 20
# A session whose client has sent nothing (no task, no PING: clients ping every heartbeat
# interval, 1 s by default) for this long is ended and its workers freed: a suspended laptop,
# a partition or a killed VM sends no FIN, and its session must not hold the node for ever.
CLIENT_TIMEOUT = 30.0


@dataclass
class NodeConfig:
    """How a node runs: where it listens, how many tasks it runs at once (its run slots, shared
    by every session), its bounds on sessions and worker processes, its key."""

    host: str = "127.0.0.1"
    port: int = 15809
    workers: int = 0
    max_sessions: int = 0  # 0: no limit
    max_processes: int = 0  # 0: default_max_processes(workers)
    worker_idle_timeout: float = WORKER_IDLE_TIMEOUT  # 0: never retire an idle worker
    key: bytes | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    insecure_no_auth: bool = False
    exit_with_stdin: bool = False
    tls: ssl.SSLContext | None = None
    client_timeout: float = CLIENT_TIMEOUT


def is_loopback(host: str) -> bool:
    """True if ``host`` names only the loopback interface."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Node(NodeHost):
    """The node server. Single-threaded; :meth:`serve_forever` runs until SIGTERM or SIGINT."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.workers_per_session = config.workers or os.cpu_count() or 1
        self.fd_limit = raise_fd_limit()
        self.slots = RunSlots(self.workers_per_session)
        self.max_processes = max(config.max_processes, self.workers_per_session)
        if not config.max_processes:
            self.max_processes = default_max_processes(self.workers_per_session)
        self.max_sessions = config.max_sessions
        self.worker_idle_timeout = config.worker_idle_timeout
        self.poller = Poller()
        listener = listen(config.host, config.port)
        self.address = listener.getsockname()
        offer: dict[str, object] = {"workers": self.workers_per_session}
        self.acceptor = Acceptor(
            listener, self.poller, config.key, offer, config.handshake_timeout, config.tls, self.timer_at, self._open
        )
        self.sessions: dict[int, Session] = {}
        self.dirty: set[Channel] = set()
        self.write_interest: set[int] = set()
        self.worker_io = WorkerIO(
            self.poller, self.want_write, self._forget_channel, self.timer_at, self._end_session_of
        )
        self.stopping = False
        self.started = time.time()  # a date, for clients to show; uptime is measured monotonically
        self._started_monotonic = time.monotonic()
        # Timers (handshake deadlines, kill deadlines, session ticks) are scanned only when the
        # earliest of them is due, and children are reaped only after a signal: an idle loop
        # iteration costs one epoll_wait, not a scan and a wait4.
        self._timers_due = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ NodeHost

    def describe(self) -> dict[str, object]:
        """Facts about this node, sent to clients."""
        return node_facts(self.started, installed_version("cloudpickle"))

    def status(self, packages: list[object] | None = None) -> dict[str, object]:
        """Facts and counters for a health check: uptime, run slots and how many are busy,
        tasks run, worker processes, and each session's client, share and queued tasks; with
        ``packages`` (top-level names), this node's version of each."""
        opened = [s for s in self.sessions.values() if s.state not in (SessionState.WAITING, SessionState.REFUSED)]
        counts = {
            "uptime": time.monotonic() - self._started_monotonic,
            "workers": self.workers_per_session,
            "busy": self.slots.in_use,
            "tasks_run": self.tasks_run,
            "processes": len(self.worker_io.by_pid),
            "max_processes": self.max_processes,
            "max_sessions": self.max_sessions,
        }
        return status_report(self.describe(), counts, opened, packages)

    def grant_slots(self) -> None:
        """Give the free run slots to the sessions with queued work."""
        slots = self.slots
        if slots.in_use < slots.capacity:  # per result of a busy node: no clock read for nothing
            slots.grant(time.monotonic())

    def process_room(self) -> int:
        """How many more worker processes the process bound allows now."""
        return max(0, self.max_processes - len(self.worker_io.by_pid))

    def make_room(self, session: WorkerOwner) -> bool:
        """True if ``session`` may fork a worker now; at the bound, retire the longest-idle worker
        of another session (unless one is on its way out already) and return False."""
        worker_io = self.worker_io
        if len(worker_io.by_pid) < self.max_processes:
            return True
        if worker_io.exiting:
            return False  # the slots are granted again when it is reaped
        victim: tuple[Session, WorkerProcess] | None = None
        for other in self.sessions.values():
            worker = other.pool.longest_idle() if other is not session else None
            if worker is not None and (victim is None or worker.idle_since < victim[1].idle_since):
                victim = (other, worker)
        if victim is not None:
            owner, worker = victim
            log.debug("at the process bound: retiring idle worker %d of %s", worker.pid, owner.peer)
            owner.pool.retire(worker)
        return False

    def refusal(self) -> dict[str, object] | None:
        """None while the node takes another session; the REFUSED body once it is full."""
        count = len(self.slots.users)
        if not self.max_sessions or count < self.max_sessions:
            return None
        host, port = self.address[0], self.address[1]
        return {
            "reason": "full",
            "sessions": count,
            "max_sessions": self.max_sessions,
            "message": f"node {host}:{port} is full: it serves {count} sessions, the most its --max-sessions allows",
        }

    def fork_worker(self, sock: socket.socket, output: list[int], compression: str | None = None) -> int:
        """Fork a worker serving ``sock`` (results compressed with ``compression``, if given)."""
        return fork_worker(sock, output, compression)

    def watch_worker(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Start reading a worker's channel (and output pipes) and tracking its pid."""
        self.worker_io.watch(session, worker)

    def signal_workers(self, session: WorkerOwner, signum: int, grace: float) -> None:
        """Send ``signum`` to every live worker process of ``session``; SIGKILL after ``grace``."""
        self.worker_io.signal_session(session, signum, grace)

    def drain_output(self, session: WorkerOwner, worker: WorkerProcess) -> None:
        """Forward what a worker has printed so far (called before forwarding its result)."""
        self.worker_io.drain_output(session, worker)

    def retire_worker(self, worker: WorkerProcess, kill: bool = False) -> None:
        """Stop feeding a worker; with ``kill`` terminate it, SIGKILL after a grace period."""
        self.worker_io.retire(worker, kill)

    def want_write(self, channel: Channel) -> None:
        """Flush this channel at the end of the loop iteration."""
        self.dirty.add(channel)

    def timer_at(self, when: float) -> None:
        """Make sure the timers are looked at by ``when`` (a time.monotonic() value)."""
        if when < self._timers_due:
            self._timers_due = when

    # ------------------------------------------------------------------ loop

    def serve_forever(self, ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT; then end every session and reap every worker."""
        signal.set_wakeup_fd(self._wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.acceptor.start()
        self.poller.register(self._wake_r, EVENT_READ, self._on_wakeup)
        if self.config.exit_with_stdin:
            self.poller.register(sys.stdin.fileno(), EVENT_READ, self._on_stdin)
        if ready is not None:
            ready()
        tune_malloc(keep_freed=True)  # after the ready line: it imports ctypes
        worker_io = self.worker_io
        while not self.stopping:
            now = time.monotonic()
            if now >= self._timers_due:
                self._timers_due = now + self._timers(now)
            # WorkerIO.drain_output() reads the batch being handled.
            worker_io.batch = batch = self.poller.select(max(0.0, self._timers_due - now))
            for fd, events, handler in batch:
                handler(fd, events)
            worker_io.batch = None
            if worker_io.reap_due:
                worker_io.reap_due = False
                worker_io.reap()
                self.slots.grant(time.monotonic())  # room for a process a session waits for
            if self.dirty:
                self._flush()
        self._shutdown()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_wakeup(self, fd: int, events: int) -> None:
        self.worker_io.reap_due = True  # a signal arrived: SIGCHLD, or one that stops the node
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _on_stdin(self, fd: int, events: int) -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            log.info("the process that started this node is gone; stopping")
            self.stopping = True

    def _timers(self, now: float) -> float:
        timeout = self.acceptor.expire(now)
        limit = self.config.client_timeout
        for fd, session in list(self.sessions.items()):
            silent = now - session.last_heard
            # A client that asked for slow heartbeats gets two of them before it counts as gone.
            allowed = max(limit, 2 * session.request.heartbeat_interval)
            if silent >= allowed:
                self._end_session(fd, f"client silent for {silent:.1f}s, past the client timeout of {allowed:g}s")
                continue
            timeout = min(timeout, allowed - silent, max(0.0, session.tick(now) - now))
        timeout = min(timeout, self.worker_io.kill_overdue(now))
        return max(timeout, 0.0)

    def _flush(self) -> None:
        for fd, done in flush_each(self.dirty):
            if done is None:
                self._on_channel_error(fd, "connection lost while writing")
            else:
                self._set_write_interest(fd, not done)
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        """Stop reading a session's workers while its client is not reading its results.

        The workers then block on their own sockets, so a client that stops reading costs the
        node at most about BACKLOG_HIGH bytes, and other sessions go on."""
        for session in self.sessions.values():
            backlog = session.channel.backlog
            if not session.paused and backlog > BACKLOG_HIGH:
                session.pause(True)
            elif session.paused and backlog < BACKLOG_LOW:
                session.pause(False)
            else:
                continue
            for process in session.workers:
                fd = process.channel.sock.fileno()
                if fd in self.worker_io.by_fd:
                    self._update_events(fd)
                # Output pipes too: a worker printing without end blocks on its full pipe.
                self.worker_io.watch_output(session, process, on=not session.paused)
            self.grant_slots()  # the slots a paused session gave up go to the others

    def _set_write_interest(self, fd: int, want: bool) -> None:
        if want == (fd in self.write_interest):
            return
        if want:
            self.write_interest.add(fd)
        else:
            self.write_interest.discard(fd)
        self._update_events(fd)

    def _update_events(self, fd: int) -> None:
        entry = self.worker_io.by_fd.get(fd)
        paused = entry is not None and entry[0].paused
        events = (0 if paused else EVENT_READ) | (EVENT_WRITE if fd in self.write_interest else 0)
        registered = self.poller.get(fd)
        if registered is not None and registered[0] == events:
            return
        # A paused worker with nothing to write is unregistered until the client catches up.
        handler = registered[1] if registered is not None else self.worker_io.on_readable
        if registered is not None and events:
            self.poller.modify(fd, events, handler)
        elif registered is not None:
            self.poller.unregister(fd)
        elif events:
            self.poller.register(fd, events, handler)

    def _on_channel_error(self, fd: int, reason: str) -> None:
        if fd in self.sessions:
            self._end_session(fd, reason)
        elif fd in self.worker_io.by_fd:
            session, worker = self.worker_io.by_fd[fd]
            self.worker_io.unwatch(worker)

    def _forget_channel(self, channel: Channel) -> None:
        """A channel is closed: nothing more to flush on it."""
        fd = channel.sock.fileno()
        self.write_interest.discard(fd)
        self.dirty.discard(channel)

    def _open(self, sock: socket.socket, peer: str, keys: SessionKeys, leftover: bytes) -> None:
        """A connection passed its handshake: it becomes a session."""
        fd = sock.fileno()
        channel = Channel(sock, keys.sealer(), keys.opener(), self.config.max_frame, chunked=True)
        session = Session(self, channel, peer, self.workers_per_session)
        self.sessions[fd] = session
        self.poller.modify(fd, EVENT_READ, self._on_client)
        if leftover:
            self._handle_client(fd, session, lambda: channel.feed_initial(leftover))

    # ------------------------------------------------------------------ sessions

    def _on_client(self, fd: int, events: int) -> None:
        session = self.sessions.get(fd)
        if session is None:
            return
        if events & EVENT_WRITE:
            self.dirty.add(session.channel)
        if events & EVENT_READ:
            session.last_heard = time.monotonic()
            self._handle_client(fd, session, session.channel.read)

    def _handle_client(self, fd: int, session: Session, read: Callable[[], list]) -> None:
        try:
            session.on_client_messages(read())
        except ConnectionClosed:
            self._end_session(fd, "client disconnected")
            return
        except (ProtocolError, ClusterError) as exc:
            log.warning("session from %s: %s; connection closed", session.peer, exc)
            self._end_session(fd, f"protocol error: {exc}")
            return
        if session.state is SessionState.CLOSED:
            self._end_session(fd, "client said goodbye")
        elif session.state is SessionState.REFUSED:
            try:
                session.channel.flush()  # the REFUSED message, before the connection closes
            except (ConnectionClosed, OSError):
                pass
            self._end_session(fd, "refused: the node is full")

    def _end_session_of(self, session: WorkerOwner, reason: str) -> None:
        self._end_session(session.channel.sock.fileno(), reason)

    def _end_session(self, fd: int, reason: str) -> None:
        session = self.sessions.pop(fd, None)
        if session is None:
            return
        session.close(reason)
        self.poller.unregister(fd)
        self.write_interest.discard(fd)
        self.dirty.discard(session.channel)
        session.channel.close()
        if not self.sessions:
            release_freed()

    def _shutdown(self) -> None:
        log.info("node stopping: ending %d sessions", len(self.sessions))
        for fd in list(self.sessions):
            self._end_session(fd, "node stopping")
        self.acceptor.close()
        self.worker_io.reap_dying(within=3.0)


# name -> (the module's file, its (mtime, size), the version read from it)
_versions: dict[str, tuple[str, tuple[int, int], str]] = {}


def installed_version(name: str) -> str:
    """The version of an installed package, read without importing it when it is not loaded
    yet (a node reports cloudpickle's version but only its workers may ever need the module).
    The file is found once and read again only when it changes (an upgrade under a running
    node): a WELCOME costs a stat, not an import-system search."""
    module = sys.modules.get(name)
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    known = _versions.get(name)
    if known:
        origin = known[0]
    else:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return "not installed"
        origin = spec.origin
    try:
        stat = os.stat(origin)
        mark = (stat.st_mtime_ns, stat.st_size)
        if known and known[1] == mark:
            return known[2]
        with open(origin, encoding="utf-8") as source:
            found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", source.read(), re.MULTILINE)
    except OSError:
        if known:  # moved or removed since: search again
            del _versions[name]
            return installed_version(name)
        return "unknown"
    version = found.group(1) if found else "unknown"
    _versions[name] = (origin, mark, version)
    return version
