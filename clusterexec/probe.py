"""Probing nodes: their health report, without opening a session (``clusterexec status``).

:func:`probe` connects to one node, does the handshake, sends STATUS and reads the reply. No
session is opened and no worker is forked, so a probe costs the node one short connection
and is safe to repeat every few seconds. :func:`probe_all` probes many nodes in parallel and
answers within about one timeout, however many of them are down.
"""

from __future__ import annotations

import errno
import platform
import queue
import socket
import threading
import time
from collections.abc import Sequence

from clusterexec._version import __version__
from clusterexec.channel import BlockingChannel, ConnectionClosed
from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.protocol import (
    BYE,
    STATUS,
    STATUS_REPLY,
    ClientHandshake,
    RecordReader,
    SessionKeys,
    unpack_json,
)
from clusterexec.report import ClusterReport, NodeReport, report_from_status
from clusterexec.specs import NodeAddress

DEFAULT_TIMEOUT = 5.0
# Probes run on at most this many threads: up to this many nodes answer within one timeout.
PROBE_THREADS = 256
# How long past the probes' own deadlines probe_all waits (a name lookup cannot be timed out).
GRACE = 0.5
HANDSHAKE_SILENT = "no handshake: is a clusterexec node listening there?"


class _Down(Exception):
    """A probe ended without a status reply; ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def probe(address: NodeAddress, key: bytes | None, timeout: float = DEFAULT_TIMEOUT) -> NodeReport:
    """Ask one node for its health report: connect, handshake, STATUS, reply, close.

    Blocks for at most about ``timeout`` seconds (plus a name lookup). Never raises for a
    node that is down: the report says ``up=False`` and why (refused, timed out,
    authentication failed...).
    """
    deadline = time.monotonic() + timeout
    try:
        info = _ask_status(address, key or b"", deadline)
    except _Down as down:
        return NodeReport(str(address), False, down.reason)
    return report_from_status(str(address), info)


def probe_all(addresses: Sequence[NodeAddress], key: bytes | None, timeout: float = DEFAULT_TIMEOUT) -> ClusterReport:
    """Probe every node in parallel; reports come back in the order of ``addresses``.

    Up to :data:`PROBE_THREADS` nodes are answered within about one ``timeout``. A probe still
    running past its deadline (a name lookup that hangs) is reported as timed out and left to
    finish on its daemon thread. Thread-safe; never raises for a node that is down.
    """
    reports: list[NodeReport | None] = [None] * len(addresses)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(addresses)):
        todo.put(index)

    def work() -> None:
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            reports[index] = probe(addresses[index], key, timeout)

    count = min(len(addresses), PROBE_THREADS)
    threads = [threading.Thread(target=work, name="clusterexec-probe", daemon=True) for _ in range(count)]
    rounds = -(-len(addresses) // PROBE_THREADS) if addresses else 0
    deadline = time.monotonic() + rounds * timeout + GRACE
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return ClusterReport(
        [
            report or NodeReport(str(address), False, "timed out")
            for address, report in zip(addresses, reports, strict=True)
        ]
    )


# --------------------------------------------------------------------------- one probe, step by step


def _ask_status(address: NodeAddress, key: bytes, deadline: float) -> dict[str, object]:
    sock = _connect(address, deadline)
    try:
        keys, leftover = _handshake(sock, key, deadline)
        channel = BlockingChannel(sock, keys.sealer(), keys.opener())
        channel.feed_initial(leftover)
        _set_timeout(sock, deadline, "asking for the status")
        try:
            channel.send(STATUS)
            while True:
                message = channel.receive()
                if message.kind == STATUS_REPLY:
                    break
            info = unpack_json(message.body)
        except (ConnectionClosed, OSError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
                raise _Down("timed out (no status reply)") from None
            raise _Down(f"connection lost before the status reply ({exc})") from None
        except ProtocolError as exc:
            raise _Down(f"bad status reply ({exc})") from None
        try:
            channel.send(BYE)
        except OSError:
            pass
        return info
    finally:
        sock.close()


def _set_timeout(sock: socket.socket, deadline: float, doing: str) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Down(f"timed out ({doing})")
    sock.settimeout(left)


def _connect(address: NodeAddress, deadline: float) -> socket.socket:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Down(f"cannot resolve host {address.host!r} ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        _set_timeout(sock, deadline, "connecting")
        sock.connect(addr)
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except ConnectionRefusedError:
        sock.close()
        raise _Down(f"refused (nothing listens on port {address.port})") from None
    except TimeoutError:
        sock.close()
        raise _Down("timed out (connecting)") from None
    except OSError as exc:
        sock.close()
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise _Down(f"unreachable ({reason})") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _handshake(sock: socket.socket, key: bytes, deadline: float) -> tuple[SessionKeys, bytes]:
    """Run the client side of the handshake; return the keys and any bytes read past it."""
    info = {"python": platform.python_version(), "clusterexec": __version__, "probe": True}
    handshake = ClientHandshake(key, info)
    records = RecordReader(max_records=1)
    try:
        sock.sendall(handshake.hello())
        while True:
            _set_timeout(sock, deadline, HANDSHAKE_SILENT)
            data = sock.recv(8192)
            if not data:
                raise _Down("closed the connection during the handshake")
            got = records.feed(data)
            if got:
                break
        try:
            proof = handshake.on_server_hello(got[0])
        except AuthenticationError:
            try:
                sock.sendall(handshake.failure_proof())  # lets the node log why
            except OSError:
                pass
            raise _Down("authentication failed (the node holds a different key)") from None
        sock.sendall(proof)
    except TimeoutError:
        raise _Down(f"timed out ({HANDSHAKE_SILENT})") from None
    except VersionMismatchError as exc:
        raise _Down(f"version mismatch ({exc})") from None
    except ProtocolError as exc:
        raise _Down(f"not a clusterexec node? ({exc})") from None
    except OSError as exc:
        raise _Down(f"connection lost during the handshake ({exc.strerror or exc})") from None
    assert handshake.keys is not None
    return handshake.keys, records.leftover()
