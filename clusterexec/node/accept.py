"""Accepting clients: the listening socket and the connections still in their handshake.

A new connection is wrapped in TLS if the node has a certificate, then runs the server side of
the handshake (:mod:`clusterexec.wire.handshake`) against a deadline. One that proves it holds
the key is promoted to a session; garbage, a wrong key, another protocol version or silence
past the deadline gets a log line naming the peer and a closed connection, and nothing else
on the node notices.
"""

from __future__ import annotations

import logging
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
    sock.listen(512)
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
        self.pending: dict[int, Pending] = {}

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
                log.warning("accept failed: %s", exc)
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
            self.pending[sock.fileno()] = pending
            self._timer_at(pending.deadline)
            events = EVENT_READ | (EVENT_WRITE if pending.tls_pending else 0)
            self.poller.register(sock, events, self._on_handshake)

    def expire(self, now: float) -> float:
        """Close the connections past their handshake deadline; return the seconds until the
        next deadline (at most 1)."""
        timeout = 1.0
        for fd, pending in list(self.pending.items()):
            if now >= pending.deadline:
                log.warning("handshake from %s timed out; connection closed", pending.peer)
                self._drop(fd)
            else:
                timeout = min(timeout, pending.deadline - now)
        return timeout

    def _drop(self, fd: int) -> None:
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
                    del self.pending[fd]
                    self._promote(pending.sock, pending.peer, keys, pending.records.leftover())
                    return
        except (BlockingIOError, InterruptedError):
            return
        except VersionMismatchError as exc:
            log.warning("refused %s: %s", pending.peer, exc)
            try:
                pending.sock.sendall(pending.handshake.refusal)
            except OSError:
                pass
            self._drop(fd)
        except AuthenticationError as exc:
            log.warning("authentication failed for %s: %s", pending.peer, exc)
            self._drop(fd)
        except OSError as exc:
            tls = sys.modules.get("ssl")  # a TLS socket exists only if ssl was imported
            if tls is not None and isinstance(exc, (tls.SSLWantReadError, tls.SSLWantWriteError)):
                return
            if tls is not None and isinstance(exc, tls.SSLError):
                log.warning("TLS handshake with %s failed: %s", pending.peer, exc.reason or exc)
            else:
                log.warning("handshake with %s failed: %s", pending.peer, exc)
            self._drop(fd)
        except (ProtocolError, ConnectionClosed) as exc:
            log.warning("handshake with %s failed: %s", pending.peer, exc)
            self._drop(fd)
        except Exception as exc:  # whatever a stranger sends, the node stays up
            log.warning("handshake with %s failed unexpectedly: %r", pending.peer, exc)
            self._drop(fd)

    def close(self) -> None:
        """Close every pending connection and the listening socket."""
        for fd in list(self.pending):
            self._drop(fd)
        self.poller.unregister(self.listener.fileno())
        self.listener.close()
