"""Accepting clients: the listening socket and the connections still in their handshake.

A new connection is wrapped in TLS if the node has a certificate, then runs the server side of
the handshake (:mod:`clusterexec.wire.handshake`) against a deadline. One that proves it holds
the key is promoted to a session; garbage, a wrong key, another protocol version or silence
past the deadline gets a log line naming the peer and a closed connection, and nothing else
on the node notices.

Strangers cannot crowd out key holders: connections still in their handshake are capped in
total and per peer address, and past a cap the oldest connection that has sent nothing yet
makes room for the newcomer (a client starts its handshake at once; a flood of idle
connections ages out first). Running out of file descriptors does the same. Failed
handshakes are logged individually up to a few per interval, then as one summary line, so a
port scanner cannot fill the node's log.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.wire.channel import ConnectionClosed
from clusterexec.wire.handshake import RecordReader, ServerHandshake, SessionKeys
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

if TYPE_CHECKING:
    import ssl  # imported at run time only when TLS is configured: it costs startup time

log = logging.getLogger("clusterexec.node")

# Connections accepted per readiness event, so a flood of them cannot starve the sessions.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 4096
# Connections still in their handshake, at most: in all, and from one peer address.
MAX_PENDING = 256
MAX_PENDING_PER_PEER = 64
# Failed handshakes logged one by one per interval; past that, one summary line per interval.
LOG_INTERVAL = 10.0
LOG_BURST = 20
# Out of file descriptors with nothing to evict: stop accepting for this long.
ACCEPT_PAUSE = 0.1

# What the node does with a connection that completed its handshake: (socket, peer, keys, the
# bytes of the framed stream that arrived with the last handshake record).
Promote = Callable[[socket.socket, str, SessionKeys, bytes], None]


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
        self.heard = False  # whether the peer has sent anything: idle ones are evicted first
        self.host = peer.rpartition(":")[0] or peer


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the new limit.

    Every client, worker and handshake holds descriptors; a default soft limit of 1,024
    would let a few hundred idle connections stop the node from accepting its users."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


class FailureLog:
    """Failed handshakes, logged at a bounded rate: the first LOG_BURST of an interval one by
    one, the rest counted and summed up in one line when the interval ends."""

    def __init__(self, interval: float = LOG_INTERVAL, burst: int = LOG_BURST) -> None:
        self.interval = interval
        self.burst = burst
        self.since = time.monotonic()
        self.logged = 0
        self.suppressed = 0
        self.peers: set[str] = set()
        self.reasons: dict[str, int] = {}

    def failed(self, peer: str, reason: str, detail: str) -> None:
        """Record one failed handshake from ``peer`` (``reason``: a short category)."""
        self.summarize(time.monotonic())
        if self.logged < self.burst:
            self.logged += 1
            log.warning("%s", detail)
            return
        self.suppressed += 1
        self.peers.add(peer.rpartition(":")[0] or peer)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summarize(self, now: float) -> None:
        """Log the summary line of an interval that has ended, if anything was left out."""
        if now - self.since < self.interval:
            return
        if self.suppressed:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
            log.warning(
                "%d more handshakes failed in the last %.0fs, from %d addresses (%s)",
                self.suppressed,
                now - self.since,
                len(self.peers),
                reasons,
            )
        self.since = now
        self.logged = self.suppressed = 0
        self.peers.clear()
        self.reasons.clear()


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (port 0: any free one). Raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    # The kernel caps the backlog at net.core.somaxconn (4096 on current kernels). A full
    # accept queue drops new SYNs, and a dropped SYN costs the peer a 1 s retransmission:
    # with a short queue, a flood of idle connections that reopen as they are evicted keeps
    # it full and delays every key holder by a second.
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Acceptor:
    """The listening socket and every connection still in its handshake.

    Single-threaded, driven by the node's loop: :meth:`start` registers the listener with
    ``poller``; :meth:`expire` is called when a deadline asked for through ``timer_at`` is due;
    a connection that authenticates leaves this class through ``promote``."""

    def __init__(
        self,
        listener: socket.socket,
        poller: Poller,
        key: bytes | None,
        offer: dict[str, object],
        handshake_timeout: float,
        tls: ssl.SSLContext | None,
        timer_at: Callable[[float], None],
        promote: Promote,
    ) -> None:
        self.listener = listener
        self.poller = poller
        self.key = key or b""
        self.offer = offer
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        self._timer_at = timer_at
        self._promote = promote
        # Oldest first (dicts keep insertion order), in all and per peer address.
        self.pending: dict[int, Pending] = {}
        self.by_host: dict[str, dict[int, Pending]] = {}
        self.failures = FailureLog()
        self.evicted = 0
        self._paused_until = 0.0

    def start(self) -> None:
        """Start accepting connections."""
        self.poller.register(self.listener, EVENT_READ, self._on_accept)

    def _on_accept(self, fd: int, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._evict(self.pending, "out of file descriptors"):
                    continue
                self.failures.failed("", "accept failed", f"accept failed: {exc}; pausing for {ACCEPT_PAUSE:g}s")
                self._pause()
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            handshake = ServerHandshake(self.key, self.offer)
            deadline = time.monotonic() + self.handshake_timeout
            pending = Pending(sock, peer, handshake, deadline, tls=self.tls is not None)
            same_host = self.by_host.setdefault(pending.host, {})
            if len(same_host) >= MAX_PENDING_PER_PEER:
                self._evict(same_host, f"more than {MAX_PENDING_PER_PEER} handshakes from {pending.host}")
            if len(self.pending) >= MAX_PENDING:
                self._evict(self.pending, f"more than {MAX_PENDING} handshakes in all")
            self.pending[sock.fileno()] = pending
            same_host[sock.fileno()] = pending
            self._timer_at(pending.deadline)
            events = EVENT_READ | (EVENT_WRITE if pending.tls_pending else 0)
            self.poller.register(sock, events, self._on_handshake)

    def expire(self, now: float) -> float:
        """Close the connections past their handshake deadline, resume accepting after a
        pause, log the interval's summary of failures; return the seconds until the next
        deadline (at most 1)."""
        timeout = 1.0
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.poller.register(self.listener, EVENT_READ, self._on_accept)
        elif self._paused_until:
            timeout = self._paused_until - now
        # Oldest first, and every connection gets the same timeout: the first one not yet due
        # ends the scan.
        for fd, pending in list(self.pending.items()):
            if now < pending.deadline:
                timeout = min(timeout, pending.deadline - now)
                break
            self._fail(fd, "timed out", f"handshake from {pending.peer} timed out; connection closed")
        self.failures.summarize(now)
        return max(timeout, 0.0)

    def _pause(self) -> None:
        if not self._paused_until:
            self._paused_until = time.monotonic() + ACCEPT_PAUSE
            self.poller.unregister(self.listener.fileno())
            self._timer_at(self._paused_until)

    def _evict(self, among: dict[int, Pending], why: str) -> bool:
        """Close the oldest connection of ``among`` that has sent nothing (else the oldest) to
        make room; return False if there was none."""
        victim = next((fd for fd, pending in among.items() if not _has_spoken(pending)), None)
        if victim is None:
            victim = next(iter(among), None)
        if victim is None:
            return False
        self.evicted += 1
        peer = self.pending[victim].peer
        self._fail(victim, "crowded out", f"handshake from {peer} crowded out ({why}); connection closed")
        return True

    def _fail(self, fd: int, reason: str, detail: str) -> None:
        self.failures.failed(self.pending[fd].peer, reason, detail)
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        pending = self.pending[fd]
        self._forget(fd)
        self.poller.unregister(fd)
        pending.sock.close()

    def _on_handshake(self, fd: int, events: int) -> None:
        pending = self.pending.get(fd)
        if pending is None:
            return  # evicted earlier in this batch of events
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
            pending.heard = True
            while getattr(pending.sock, "pending", lambda: 0)():
                data += pending.sock.recv(8192)
            for rec in pending.records.feed(data):
                if not pending.hello_done:
                    pending.sock.sendall(pending.handshake.on_client_hello(rec))
                    pending.hello_done = True
                else:
                    keys = pending.handshake.on_client_proof(rec)
                    self._forget(fd)
                    self._promote(pending.sock, pending.peer, keys, pending.records.leftover())
                    return
        except (BlockingIOError, InterruptedError):
            return
        except VersionMismatchError as exc:
            try:
                pending.sock.sendall(pending.handshake.refusal)
            except OSError:
                pass
            self._fail(fd, "version mismatch", f"refused {pending.peer}: {exc}")
        except AuthenticationError as exc:
            self._fail(fd, "authentication failed", f"authentication failed for {pending.peer}: {exc}")
        except OSError as exc:
            tls = sys.modules.get("ssl")  # a TLS socket exists only if ssl was imported
            if tls is not None and isinstance(exc, (tls.SSLWantReadError, tls.SSLWantWriteError)):
                return
            if tls is not None and isinstance(exc, tls.SSLError):
                self._fail(fd, "TLS failed", f"TLS handshake with {pending.peer} failed: {exc.reason or exc}")
            else:
                self._fail(fd, "failed", f"handshake with {pending.peer} failed: {exc}")
        except (ProtocolError, ConnectionClosed) as exc:
            self._fail(fd, "failed", f"handshake with {pending.peer} failed: {exc}")
        except Exception as exc:  # whatever a stranger sends, the node stays up
            self._fail(fd, "failed", f"handshake with {pending.peer} failed unexpectedly: {exc!r}")

    def _forget(self, fd: int) -> None:
        """A connection leaves the handshake (promoted): no longer counted, still open."""
        pending = self.pending.pop(fd)
        same_host = self.by_host.get(pending.host)
        if same_host is not None:
            same_host.pop(fd, None)
            if not same_host:
                del self.by_host[pending.host]

    def close(self) -> None:
        """Close every pending connection and the listening socket."""
        for fd in list(self.pending):
            self._drop(fd)
        if not self._paused_until:
            self.poller.unregister(self.listener.fileno())
        self.listener.close()


def _has_spoken(pending: Pending) -> bool:
    """Whether the peer has sent anything, read or not yet read: a client's first bytes may
    wait in the kernel behind a flood of accepts, and must not make it look idle."""
    if pending.heard:
        return True
    try:
        # The kernel's socket under a TLS wrapper too: a peek reads nothing.
        data = socket.socket.recv(pending.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False  # reset: as good as idle
    pending.heard = bool(data)  # b"": closed, nothing to protect
    return pending.heard
