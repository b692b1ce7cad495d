"""The node server: accept clients, authenticate them, run one session per client.

``python -m clusterexec.node --port 15809 --workers 4 --key-file secret.key``

One thread runs a readiness loop (:mod:`clusterexec.wire.poller`) over the listening socket, every
client connection and every worker's socketpair. Workers are forked from this process, which
never imports or unpickles user code, so each session starts from a clean interpreter.
SIGCHLD, SIGTERM and SIGINT reach the loop through a wakeup socket.
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

from clusterexec._version import __version__
from clusterexec.errors import AuthenticationError, ClusterError, ProtocolError, VersionMismatchError
from clusterexec.node.host import NodeHost, WorkerProcess
from clusterexec.node.libc import release_freed, tune_malloc
from clusterexec.node.session import Session, SessionState
from clusterexec.node.workers import WorkerIO, fork_worker
from clusterexec.wire.channel import Channel, ConnectionClosed
from clusterexec.wire.frames import DEFAULT_MAX_FRAME
from clusterexec.wire.handshake import HANDSHAKE_TIMEOUT, RecordReader, ServerHandshake, SessionKeys
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

if TYPE_CHECKING:
    import ssl  # imported at run time only when TLS is configured: it costs startup time

log = logging.getLogger("clusterexec.node")

EXIT_USAGE = 2
# Back-pressure: a session's workers are not read while more than BACKLOG_HIGH bytes wait to go
# to its client, and are read again below BACKLOG_LOW.
BACKLOG_HIGH = 64 << 20
BACKLOG_LOW = 16 << 20


@dataclass
class NodeConfig:
    """How a node runs: where it listens, how many workers per session, its key."""

    host: str = "127.0.0.1"
    port: int = 15809
    workers: int = 0
    key: bytes | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    insecure_no_auth: bool = False
    exit_with_stdin: bool = False
    tls: ssl.SSLContext | None = None


class Pending:
    """A connection still in its handshake."""

    def __init__(self, sock: socket.socket, peer: str, handshake: ServerHandshake, deadline: float, tls: bool) -> None:
        self.sock = sock
        self.peer = peer
        self.handshake = handshake
        self.deadline = deadline
        self.records = RecordReader(max_records=2)
        self.hello_done = False
        self.tls_pending = tls


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
        self.poller = Poller()
        self.listener = self._listen()
        self.address = self.listener.getsockname()
        self.pending: dict[int, Pending] = {}
        self.sessions: dict[int, Session] = {}
        self.dirty: set[Channel] = set()
        self.write_interest: set[int] = set()
        self.worker_io = WorkerIO(
            self.poller, self.want_write, self._forget_channel, self.timer_at, self._end_session_of
        )
        self.stopping = False
        self.started = time.time()
        # Timers (handshake deadlines, kill deadlines, session ticks) are scanned only when the
        # earliest of them is due, and children are reaped only after a signal: an idle loop
        # iteration costs one epoll_wait, not a scan and a wait4.
        self._timers_due = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _listen(self) -> socket.socket:
        host = self.config.host
        infos = socket.getaddrinfo(host, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        sock.listen(512)
        sock.setblocking(False)
        return sock

    # ------------------------------------------------------------------ NodeHost

    def describe(self) -> dict[str, object]:
        """Facts about this node, sent to clients."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "clusterexec": __version__,
            "cloudpickle": installed_version("cloudpickle"),
            "started": self.started,
        }

    def status(self) -> dict[str, object]:
        """Facts and counters for a health check: uptime, sessions, busy workers, tasks run."""
        busy = sum(1 for s in self.sessions.values() for w in s.workers if w.outstanding)
        return {
            **self.describe(),
            "uptime": time.time() - self.started,
            "workers": self.workers_per_session,
            "sessions": len(self.sessions),
            "busy": busy,
            "tasks_run": self.tasks_run,
        }

    def fork_worker(self, sock: socket.socket, output: list[int], compression: str | None = None) -> int:
        """Fork a worker serving ``sock`` (results compressed with ``compression``, if given)."""
        return fork_worker(sock, output, compression)

    def watch_worker(self, session: Session, worker: WorkerProcess) -> None:
        """Start reading a worker's channel (and output pipes) and tracking its pid."""
        self.worker_io.watch(session, worker)

    def signal_workers(self, session: Session, signum: int, grace: float) -> None:
        """Send ``signum`` to every live worker process of ``session``; SIGKILL after ``grace``."""
        self.worker_io.signal_session(session, signum, grace)

    def drain_output(self, session: Session, worker: WorkerProcess) -> None:
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
        self.poller.register(self.listener, EVENT_READ, self._on_accept)
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
        timeout = 1.0
        for fd, pending in list(self.pending.items()):
            if now >= pending.deadline:
                log.warning("handshake from %s timed out; connection closed", pending.peer)
                self._drop_pending(fd)
            else:
                timeout = min(timeout, pending.deadline - now)
        for session in list(self.sessions.values()):
            timeout = min(timeout, max(0.0, session.tick(now) - now))
        timeout = min(timeout, self.worker_io.kill_overdue(now))
        return max(timeout, 0.0)

    def _flush(self) -> None:
        while self.dirty:
            channel = self.dirty.pop()
            fd = channel.sock.fileno()
            if fd < 0:
                continue
            try:
                done = channel.flush()
            except ConnectionClosed:
                self._on_channel_error(fd, "connection lost while writing")
                continue
            self._set_write_interest(fd, not done)
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        """Stop reading a session's workers while its client is not reading its results.

        The workers then block on their own sockets, so a client that stops reading costs the
        node at most about BACKLOG_HIGH bytes, and other sessions go on."""
        for session in self.sessions.values():
            backlog = session.channel.backlog
            if not session.paused and backlog > BACKLOG_HIGH:
                session.paused = True
            elif session.paused and backlog < BACKLOG_LOW:
                session.paused = False
            else:
                continue
            for process in session.workers:
                fd = process.channel.sock.fileno()
                if fd in self.worker_io.by_fd:
                    self._update_events(fd)
                # Output pipes too: a worker printing without end blocks on its full pipe.
                self.worker_io.watch_output(session, process, on=not session.paused)

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

    # ------------------------------------------------------------------ handshake

    def _on_accept(self, fd: int, events: int) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if self.config.tls is not None:
                sock = self.config.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            handshake = ServerHandshake(self.config.key or b"", {"workers": self.workers_per_session})
            deadline = time.monotonic() + self.config.handshake_timeout
            pending = Pending(sock, peer, handshake, deadline, tls=self.config.tls is not None)
            self.pending[sock.fileno()] = pending
            self.timer_at(pending.deadline)
            events = EVENT_READ | (EVENT_WRITE if pending.tls_pending else 0)
            self.poller.register(sock, events, self._on_handshake)

    def _drop_pending(self, fd: int) -> None:
        pending = self.pending.pop(fd)
        self.poller.unregister(fd)
        pending.sock.close()

    def _on_handshake(self, fd: int, events: int) -> None:
        pending = self.pending[fd]
        try:
            if pending.tls_pending:
                import ssl

                try:
                    pending.sock.do_handshake()  # type: ignore[attr-defined]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                pending.tls_pending = False
                self.poller.modify(fd, EVENT_READ, self._on_handshake)
            data = pending.sock.recv(8192)
            if not data:
                raise ConnectionClosed("closed during the handshake")
            while getattr(pending.sock, "pending", lambda: 0)():
                data += pending.sock.recv(8192)
            for rec in pending.records.feed(data):
                if not pending.hello_done:
                    pending.sock.sendall(pending.handshake.on_client_hello(rec))
                    pending.hello_done = True
                else:
                    keys = pending.handshake.on_client_proof(rec)
                    self._promote(fd, pending, keys)
                    return
        except (BlockingIOError, InterruptedError):
            return
        except VersionMismatchError as exc:
            log.warning("refused %s: %s", pending.peer, exc)
            try:
                pending.sock.sendall(pending.handshake.refusal)
            except OSError:
                pass
            self._drop_pending(fd)
        except AuthenticationError as exc:
            log.warning("authentication failed for %s: %s", pending.peer, exc)
            self._drop_pending(fd)
        except OSError as exc:
            tls = sys.modules.get("ssl")  # a TLS socket exists only if ssl was imported
            if tls is not None and isinstance(exc, (tls.SSLWantReadError, tls.SSLWantWriteError)):
                return
            if tls is not None and isinstance(exc, tls.SSLError):
                log.warning("TLS handshake with %s failed: %s", pending.peer, exc.reason or exc)
            else:
                log.warning("handshake with %s failed: %s", pending.peer, exc)
            self._drop_pending(fd)
        except (ProtocolError, ConnectionClosed) as exc:
            log.warning("handshake with %s failed: %s", pending.peer, exc)
            self._drop_pending(fd)
        except Exception as exc:  # whatever a stranger sends, the node stays up
            log.warning("handshake with %s failed unexpectedly: %r", pending.peer, exc)
            self._drop_pending(fd)

    def _promote(self, fd: int, pending: Pending, keys: SessionKeys) -> None:
        del self.pending[fd]
        channel = Channel(pending.sock, keys.sealer(), keys.opener(), self.config.max_frame, chunked=True)
        session = Session(self, channel, pending.peer, self.workers_per_session)
        self.sessions[fd] = session
        self.poller.modify(fd, EVENT_READ, self._on_client)
        leftover = pending.records.leftover()
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

    def _end_session_of(self, session: Session, reason: str) -> None:
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
        for fd in list(self.pending):
            self._drop_pending(fd)
        self.poller.unregister(self.listener.fileno())
        self.listener.close()
        self.worker_io.reap_dying(within=3.0)


def installed_version(name: str) -> str:
    """The version of an installed package, read without importing it when it is not loaded
    yet (a node reports cloudpickle's version but only its workers may ever need the module)."""
    module = sys.modules.get(name)
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "not installed"
    try:
        with open(spec.origin, encoding="utf-8") as source:
            found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", source.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"
