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
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from clusterexec._version import __version__
from clusterexec.client.report import ClusterReport, NodeReport, report_from_status
from clusterexec.code.versions import versions
from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.launch.specs import NodeAddress
from clusterexec.wire.channel import BlockingChannel, ConnectionClosed
from clusterexec.wire.handshake import ClientHandshake, RecordReader, SessionKeys
from clusterexec.wire.messages import BYE, STATUS, STATUS_REPLY, pack_json, unpack_json

DEFAULT_TIMEOUT = 5.0
# Probes run on at most this many threads: up to this many nodes answer within one timeout.
PROBE_THREADS = 256
# How long past the probes' own deadlines probe_all waits (a name lookup cannot be timed out).
GRACE = 0.5
HANDSHAKE_SILENT = "no handshake: is a clusterexec node listening there?"
# The first bytes of a TLS record (handshake or alert, version 3.x): what a TLS node may answer.
TLS_RECORD_STARTS = (b"\x15\x03", b"\x16\x03")
# A node with --tls-cert drops (usually resets) a connection that does not start with TLS.
TLS_HINT = "; if the node runs with --tls-cert, probe it over TLS: pass --tls-ca"
# A node with --tls-ca drops a TLS connection without a client certificate it trusts; the alert
# that says so is lost when the drop is a reset.
CLIENT_CERT_HINT = (
    "; if the node runs with --tls-ca, it asks for a client certificate: pass --tls-cert and --tls-key"
)

if TYPE_CHECKING:
    import ssl


class _Down(Exception):
    """A probe ended without a status reply; ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def probe(
    address: NodeAddress,
    key: bytes | None,
    timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    packages: list[str] | None = None,
) -> NodeReport:
    """Ask one node for its health report: connect, handshake, STATUS, reply, close.

    With ``tls`` (a client context, as the executor's ``ssl_context=``), the probe speaks TLS
    first, for a node started with ``--tls-cert``. Blocks for at most about ``timeout``
    seconds (plus a name lookup). Never raises for a node that is down: the report says
    ``up=False`` and why (refused, timed out, authentication failed, TLS expected or not...).
    With ``packages``, the report lists those whose version differs on the node from here.
    """
    deadline = time.monotonic() + timeout
    try:
        info = _ask_status(address, key or b"", deadline, tls, packages)
    except _Down as down:
        return NodeReport(str(address), False, down.reason)
    return report_from_status(str(address), info, versions(packages) if packages else None)


def probe_all(
    addresses: Sequence[NodeAddress],
    key: bytes | None,
    timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    packages: list[str] | None = None,
) -> ClusterReport:
    """Probe every node in parallel (each as :func:`probe`, with ``tls`` if given); reports
    come back in the order of ``addresses``.

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
            reports[index] = probe(addresses[index], key, timeout, tls, packages)

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


def _ask_status(
    address: NodeAddress, key: bytes, deadline: float, tls: ssl.SSLContext | None, packages: list[str] | None = None
) -> dict[str, object]:
    sock = _connect(address, deadline)
    try:
        if tls is not None:
            sock = _start_tls(sock, tls, address, deadline)
        keys, leftover = _handshake(sock, key, deadline, tls is not None)
        channel = BlockingChannel(sock, keys.sealer(), keys.opener())
        channel.feed_initial(leftover)
        _set_timeout(sock, deadline, "asking for the status")
        try:
            channel.send(STATUS, pack_json({"packages": packages}) if packages else b"")
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


def _start_tls(sock: socket.socket, tls: ssl.SSLContext, address: NodeAddress, deadline: float) -> socket.socket:
    """The TLS handshake over a connected socket; the TLS socket, or _Down saying what to fix."""
    import ssl

    _set_timeout(sock, deadline, "TLS handshake")
    try:
        return tls.wrap_socket(sock, server_hostname=address.host)
    except ssl.SSLCertVerificationError as exc:
        raise _Down(
            f"TLS: the node's certificate is not trusted ({exc.verify_message}); pass --tls-ca with the "
            "CA (or the certificate) the node was started with"
        ) from None
    except TimeoutError:
        raise _Down("timed out (TLS handshake): is the node started with --tls-cert?") from None
    except (ssl.SSLError, ConnectionError) as exc:
        raise _Down(
            f"TLS handshake failed ({getattr(exc, 'reason', None) or exc}): the node does not speak TLS "
            "(it does only with --tls-cert); probe it without --tls-ca"
        ) from None


def _tls_problem(exc: OSError) -> str | None:
    """What a TLS error during our handshake means (the node checks client certificates then)."""
    ssl = sys.modules.get("ssl")
    if ssl is None or not isinstance(exc, ssl.SSLError):
        return None
    reason = getattr(exc, "reason", None) or str(exc)
    hint = ""
    if "CERTIFICATE" in reason.upper():
        hint = "; the node asks for a client certificate (it runs with --tls-ca): pass --tls-cert and --tls-key"
    return f"TLS error during the handshake ({reason}){hint}"


def _handshake(sock: socket.socket, key: bytes, deadline: float, tls: bool = False) -> tuple[SessionKeys, bytes]:
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
                raise _Down("closed the connection during the handshake" + (CLIENT_CERT_HINT if tls else TLS_HINT))
            if not tls and data[:2] in TLS_RECORD_STARTS:
                raise _Down("the node speaks TLS (it runs with --tls-cert): pass --tls-ca to probe it over TLS")
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
        problem = _tls_problem(exc) if tls else None
        hint = CLIENT_CERT_HINT if tls else TLS_HINT
        raise _Down(problem or f"connection lost during the handshake ({exc.strerror or exc}){hint}") from None
    assert handshake.keys is not None
    return handshake.keys, records.leftover()
