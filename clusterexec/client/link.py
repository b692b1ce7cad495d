"""One client-side link to a node: connect, handshake, open the session, send, receive.

A :class:`NodeLink` is driven by the client I/O thread and never blocks: ``connect`` starts a
non-blocking connect, ``on_event`` advances the handshake as bytes arrive, and once the node's
WELCOME is in the link is READY and hands decoded messages to the scheduler. Its state changes
in one place, :meth:`NodeLink._set_state`. What the scheduler has put on the node is not the
link's business: that is the node's :class:`~clusterexec.client.ledger.NodeLedger`.
"""

from __future__ import annotations

import enum
import errno
import logging
import platform
import select
import selectors
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

import cloudpickle

from clusterexec._version import __version__
from clusterexec.client.report import NodeReport, NodeStatus, report_from_status
from clusterexec.errors import (
    AuthenticationError,
    ClusterError,
    NodeFullError,
    NodeUnreachableError,
    ProtocolError,
    VersionMismatchError,
)
from clusterexec.launch.specs import NodeAddress
from clusterexec.wire.channel import Channel, ConnectionClosed
from clusterexec.wire.frames import DEFAULT_MAX_FRAME, Message
from clusterexec.wire.handshake import ClientHandshake, RecordReader
from clusterexec.wire.messages import PING, REFUSED, SESSION, WELCOME, pack_json, unpack_json

log = logging.getLogger("clusterexec")


class LinkState(enum.Enum):
    """Where a link to a node is in its life."""

    IDLE = "idle"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    OPENING = "opening session"
    READY = "ready"
    LOST = "lost"
    CLOSED = "closed"


class SessionRequest:
    """What the client asks of every node session: workers, initializer, heartbeats, and the
    compression codec (each link names its own, see :attr:`NodeLink.compression`)."""

    def __init__(
        self,
        workers: int | None,
        max_tasks_per_child: int | None,
        heartbeat_interval: float,
        init: tuple[bytes, tuple[object, ...]] | None,
        output: bool = False,
    ) -> None:
        self.output = output
        self.workers = workers
        self.max_tasks_per_child = max_tasks_per_child
        self.heartbeat_interval = heartbeat_interval
        self.init = init

    def message(self, workers: int | None, compression: str | None = None) -> tuple[bytes, list[object]]:
        """The SESSION message body and buffers for one node."""
        body = pack_json(
            {
                "workers": workers,
                "max_tasks_per_child": self.max_tasks_per_child,
                "heartbeat_interval": self.heartbeat_interval,
                "output": self.output,
                "compression": compression,
            }
        )
        buffers: list[object] = []
        if self.init is not None:
            buffers = [self.init[0], *self.init[1]]
        return body, buffers


class NodeLink:
    """The client's connection to one node. Used only by the I/O thread."""

    def __init__(
        self,
        address: NodeAddress,
        key: bytes | None,
        request: SessionRequest,
        workers: int | None = None,
        connect_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str | None = None,
        tls: ssl.SSLContext | None = None,
        compression: str | None = None,
    ) -> None:
        self.tls = tls
        # The codec asked of the node, and the one its WELCOME accepted (None: plain payloads).
        self.compression = compression
        self.codec: str | None = None
        self._tls_pending = False
        self.address = address
        self.name = name or str(address)
        self._key = key or b""
        self._request = request
        self._wanted_workers = workers
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self.state = LinkState.IDLE
        self.sock: socket.socket | None = None
        self.channel: Channel | None = None
        self._handshake: ClientHandshake | None = None
        self._records = RecordReader(max_records=1)
        self.deadline = 0.0
        # The round trip of the handshake (ClientHello out, ServerHello in): the first estimate
        # of the link's round-trip time, before any task has measured it.
        self.handshake_rtt = 0.0
        self._hello_sent = 0.0
        self.error: ClusterError | None = None
        self.info: dict[str, object] = {}
        self.workers = 0
        self.last_heard = 0.0
        # When the next PING is due: the node ends a session whose client it has not heard
        # from for its client timeout, however busy the tasks keep it.
        self.ping_at = 0.0
        self.attempts = 0
        self.retry_at = 0.0
        self.down_since = 0.0
        self.loss_reason: ClusterError | None = None

    def _set_state(self, state: LinkState) -> None:
        # down_since: when the link last stopped being usable (the reconnect window counts
        # from there, not from the last failed attempt); loss_reason: why it stopped.
        if state is LinkState.READY:
            self.down_since = 0.0
            self.loss_reason = None
        elif not self.down_since:
            self.down_since = time.monotonic()
        if state is not self.state:
            log.info("node %s: %s -> %s", self.name, self.state.value, state.value)
            self.state = state

    # ------------------------------------------------------------------ connecting

    def connect(self, now: float) -> None:
        """Start a non-blocking connect. Errors end in the LOST state with ``error`` set."""
        self.attempts += 1
        self._tls_pending = False
        self._records = RecordReader(max_records=1)
        self.deadline = now + self.connect_timeout
        try:
            infos = socket.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            self._fail(
                NodeUnreachableError(f"node {self.name}: cannot resolve host {self.address.host!r} ({exc.strerror})")
            )
            return
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        code = sock.connect_ex(addr)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._fail(self._unreachable(code))
            return
        self._set_state(LinkState.CONNECTING)

    def _unreachable(self, code: int) -> NodeUnreachableError:
        if code == errno.ECONNREFUSED:
            return NodeUnreachableError(
                f"node {self.name} refused the connection; is `python -m clusterexec.node --port "
                f"{self.address.port}` running on {self.address.host}?"
            )
        reason = errno.errorcode.get(code, str(code))
        return NodeUnreachableError(f"node {self.name} is unreachable ({reason}); check the address and the network")

    def interest(self) -> int:
        """The selector events this link waits for."""
        if self.state is LinkState.CONNECTING:
            return selectors.EVENT_WRITE
        if self.channel is not None and self.channel.wants_write:
            return selectors.EVENT_READ | selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def on_event(self, events: int, now: float) -> list[Message]:
        """Advance the link on a selector event; return messages for the scheduler (READY only)."""
        try:
            if self.state is LinkState.CONNECTING:
                self._on_connected()
                return []
            if self.state is LinkState.HANDSHAKING:
                if self._tls_pending:
                    self._tls_step()
                else:
                    self._on_handshake_bytes()
                return []
            assert self.channel is not None
            messages: list[Message] = []
            if events & selectors.EVENT_READ:
                messages = self.channel.read()
                self.last_heard = now
            if events & selectors.EVENT_WRITE:
                self.channel.flush()
            if self.state is LinkState.OPENING:
                return self._on_opening(messages)
            return messages
        except ConnectionClosed as exc:
            self._fail(self._closed_error(str(exc)))
        except (ProtocolError, VersionMismatchError, AuthenticationError) as exc:
            self._fail(type(exc)(f"node {self.name}: {exc}"))
        except OSError as exc:
            self._fail(NodeUnreachableError(f"node {self.name}: {exc.strerror or exc}"))
        return []

    def _closed_error(self, detail: str) -> ClusterError:
        if self.state is LinkState.HANDSHAKING:
            return AuthenticationError(
                f"node {self.name} closed the connection during the handshake ({detail}); "
                "check that the client and the node use the same key"
            )
        return NodeUnreachableError(f"node {self.name}: connection lost ({detail})")

    def _on_connected(self) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(self._unreachable(code))
            return
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(
                self.sock, server_hostname=self.address.host, do_handshake_on_connect=False
            )
            self._tls_pending = True
            self._set_state(LinkState.HANDSHAKING)
            self._tls_step()
            return
        self._send_hello()

    def _tls_step(self) -> None:
        """Advance the TLS handshake; once done, start ours."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS handshake failed: {exc.reason or exc}") from None
        self._tls_pending = False
        self._send_hello()

    def _send_hello(self) -> None:
        assert self.sock is not None
        info = {"python": platform.python_version(), "clusterexec": __version__, "cloudpickle": cloudpickle.__version__}
        self._handshake = ClientHandshake(self._key, info)
        self._hello_sent = time.monotonic()
        self.sock.sendall(self._handshake.hello())
        self._set_state(LinkState.HANDSHAKING)

    def _on_handshake_bytes(self) -> None:
        assert self.sock is not None and self._handshake is not None
        try:
            data = self.sock.recv(8192)
            while isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                data += self.sock.recv(8192)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if not data:
            raise ConnectionClosed("closed by the node")
        for rec in self._records.feed(data):
            self.handshake_rtt = time.monotonic() - self._hello_sent
            try:
                proof = self._handshake.on_server_hello(rec)
            except AuthenticationError as exc:
                try:
                    self.sock.sendall(self._handshake.failure_proof())
                except OSError:
                    pass
                raise AuthenticationError(
                    f"{exc}; check that key=/key_file= match the node's --key-file (or CLUSTEREXEC_KEY)"
                ) from None
            self.sock.sendall(proof)
            keys = self._handshake.keys
            assert keys is not None
            self.info = dict(keys.peer_info)
            self.channel = Channel(self.sock, keys.sealer(), keys.opener(), self.max_frame)
            body, buffers = self._request.message(self._wanted_workers, self.compression)
            self.channel.send(SESSION, body, buffers)  # type: ignore[arg-type]
            self._set_state(LinkState.OPENING)
            leftover = self._records.leftover()
            if leftover:
                self._on_opening(self.channel.feed_initial(leftover))
            self.channel.flush()
            return

    def _on_opening(self, messages: list[Message]) -> list[Message]:
        for i, message in enumerate(messages):
            if message.kind == REFUSED:
                self._fail(self._refused(unpack_json(message.body)))
                return []
            if message.kind == WELCOME:
                welcome = unpack_json(message.body)
                self.info.update(welcome)
                workers = welcome.get("workers")
                self.workers = workers if isinstance(workers, int) and workers > 0 else 1
                # A node without the codec's module (or an older node) answers None: send it plain.
                accepted = welcome.get("compression")
                self.codec = accepted if accepted == self.compression else None
                self.attempts = 0
                self.error = None
                self.ping_at = time.monotonic() + self._request.heartbeat_interval
                self._set_state(LinkState.READY)
                return messages[i + 1 :]
        return []

    def _refused(self, refusal: dict[str, object]) -> ClusterError:
        if refusal.get("reason") != "full":
            return ProtocolError(f"node {self.name} refused the session: {refusal.get('message', refusal)}")
        count, limit = refusal.get("sessions"), refusal.get("max_sessions")
        return NodeFullError(
            f"node {self.name} is full: it already serves {count} clients, the most its operator allows "
            f"(--max-sessions {limit}); the executor retries it later and meanwhile uses its other nodes, "
            "if it has any. Try again later, use other nodes, or ask the operator for a higher --max-sessions"
        )

    def set_share(self, share: int) -> None:
        """The node's SHARE message: this client's share of its run slots is now ``share``
        workers (what the scheduler fills the node to, and prefetches for)."""
        self.workers = max(1, share)

    # ------------------------------------------------------------------ what it is

    def status(self, in_flight: int, tasks_done: int) -> NodeStatus:
        """A snapshot of this link for ``ex.nodes``, with the node's task counts (read from any
        thread; fields may be a moment old)."""
        return NodeStatus(
            address=self.name,
            state=self.state.value,
            workers=self.workers,
            in_flight=in_flight,
            tasks_done=tasks_done,
            error=str(self.error) if self.error is not None else None,
            python=str(self.info.get("python", "")),
        )

    def health(self, info: dict[str, Any] | None, here: dict[str, str] | None = None) -> NodeReport:
        """The node's health report for ``ex.check()``, from its answer to STATUS; with None (no
        answer), the node is reported down with why. ``here``: the client's package versions."""
        if info is None:
            if self.state is LinkState.READY:
                reason = "timed out"
            else:
                reason = str(self.error) if self.error is not None else self.state.value
            return NodeReport(self.name, False, reason, workers=self.workers)
        return report_from_status(self.name, info, here)

    def python_version(self) -> str:
        """The node's Python version as ``major.minor`` ('' if not known yet)."""
        version = str(self.info.get("python", ""))
        return ".".join(version.split(".")[:2])

    # ------------------------------------------------------------------ life

    def ping_if_due(self, now: float) -> float:
        """Queue a PING if one is due (READY only); return the seconds until the next one.

        Sent every heartbeat interval whatever else is queued: the node counts any byte from
        the client as a sign of life, and a PING is the byte of a client with nothing to say."""
        if self.state is not LinkState.READY or self.channel is None:
            return self._request.heartbeat_interval
        if now >= self.ping_at:
            self.channel.send(PING)
            self.ping_at = now + self._request.heartbeat_interval
        return self.ping_at - now

    def check_deadline(self, now: float) -> None:
        """Fail a connect or handshake that ran past its deadline."""
        if self.state in (LinkState.CONNECTING, LinkState.HANDSHAKING, LinkState.OPENING) and now >= self.deadline:
            self._fail(
                NodeUnreachableError(
                    f"node {self.name} did not answer within {self.connect_timeout:g}s ({self.state.value}); "
                    "check that a clusterexec node is listening there"
                )
            )

    def lose(self, error: ClusterError) -> None:
        """Declare the link lost with a reason (heartbeat timeout, protocol error...)."""
        self._fail(error)

    def _fail(self, error: ClusterError) -> None:
        self.error = error
        if self.loss_reason is None:
            self.loss_reason = error
        self._close_socket()
        self._set_state(LinkState.LOST)
        log.warning("%s", error)

    def _close_socket(self) -> None:
        if self.channel is not None:
            self.channel.close()
        elif self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.channel = None
        self.sock = None
        self._handshake = None

    def close(self) -> None:
        """Close the link for good (executor shutdown)."""
        self._close_socket()
        self._set_state(LinkState.CLOSED)


def no_node_error(errors: Iterable[Exception]) -> Exception:
    """The error an executor raises when none of its links got ready: a wrong key first, then
    the one node's own error, then every node full, else a list of what each node did."""
    errors = list(errors)
    auth = [e for e in errors if isinstance(e, AuthenticationError)]
    if auth:
        return auth[0]
    if len(errors) == 1:
        return errors[0]
    if errors and all(isinstance(e, NodeFullError) for e in errors):
        return NodeFullError("every node is full, so no task can run:\n" + "\n".join(f"  {e}" for e in errors))
    lines = "\n".join(f"  {e}" for e in errors) or "  (no node answered in time)"
    return NodeUnreachableError(f"no clusterexec node could be used:\n{lines}")


def all_lost_for(links: list[NodeLink], window: float, now: float) -> bool:
    """Whether every link has been down for at least ``window`` seconds."""
    return all(
        link.state is not LinkState.READY and link.down_since and now - link.down_since >= window for link in links
    )


def lost_summary(links: list[NodeLink]) -> str:
    """Why the cluster is broken: every node and why it was lost."""
    lines = [f"  {link.name}: {link.loss_reason or link.error}" for link in links]
    return "every node of the cluster is lost; no task can run:\n" + "\n".join(lines)


def readable(sock: socket.socket | None) -> bool:
    """Whether bytes wait unread on ``sock`` (False for no socket, or a closed one)."""
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False

