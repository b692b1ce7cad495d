"""A recording, tampering TCP proxy on loopback, for the end-to-end security tests.

``Proxy(target)`` listens on 127.0.0.1 (a port chosen by the OS) and forwards each connection
to ``target``. It records every byte each side sends, and can alter what the client sends at
the level of the clusterexec wire: the stream is cut into the two handshake records (u16
length prefix: ClientHello, ClientProof) and then frames (u64 length prefix), and

- ``rewrite_hello`` replaces the ClientHello record of every new connection;
- :meth:`Proxy.arm` alters the next frame any connection sends (flip a bit, drop it, swap it
  with the following frame, inject a forged frame or replay an earlier one before it).

Everything runs on daemon threads; :meth:`Proxy.close` stops them all.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
import threading
from collections.abc import Callable

RECORD = struct.Struct("!H")
FRAME = struct.Struct("!Q")
HANDSHAKE_RECORDS = 2


class Tamper(enum.Enum):
    """What :meth:`Proxy.arm` does to the next client-to-node frame."""

    FLIP_LENGTH = "flip the lowest bit of the length header"
    FLIP_BODY = "flip a bit of the first ciphertext byte"
    FLIP_TAG = "flip a bit of the last byte (the tag)"
    DROP = "drop the frame"
    REORDER = "swap the frame with the next one"
    INJECT = "inject a forged frame before it"
    REPLAY = "replay an earlier frame of the session before it"


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped."""
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def forged_frame(size: int = 48) -> bytes:
    """A well-formed frame (header and random body) sealed with no key at all."""
    return FRAME.pack(size) + os.urandom(size)


class WireSplitter:
    """Cuts one client-to-node stream into handshake records, then frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.records = 0
        self.frames = 0

    def feed(self, data: bytes) -> list[tuple[str, int, bytes]]:
        """Add bytes; return the complete units as (``record``/``frame``, index, bytes)."""
        self._buf += data
        out: list[tuple[str, int, bytes]] = []
        while True:
            if self.records < HANDSHAKE_RECORDS:
                header, kind = RECORD, "record"
            else:
                header, kind = FRAME, "frame"
            if len(self._buf) < header.size:
                return out
            (length,) = header.unpack_from(self._buf, 0)
            total = header.size + length
            if len(self._buf) < total:
                return out
            unit = bytes(self._buf[:total])
            del self._buf[:total]
            if kind == "record":
                out.append((kind, self.records, unit))
                self.records += 1
            else:
                out.append((kind, self.frames, unit))
                self.frames += 1


class ProxiedConnection:
    """One client connection through the proxy: its two sockets and what went each way."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.client_bytes = bytearray()
        self.node_bytes = bytearray()
        self.frames: list[bytes] = []
        self.held: bytes | None = None
        self.splitter = WireSplitter()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._ended = 0

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client_to_node, daemon=True),
            threading.Thread(target=self._node_to_client, daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def _client_to_node(self) -> None:
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                self.client_bytes += data
                out: list[bytes] = []
                for kind, index, unit in self.splitter.feed(data):
                    out.extend(self.proxy.rewrite(self, kind, index, unit))
                if out:
                    self.upstream.sendall(b"".join(out))
        except OSError:
            pass
        self._end()

    def _node_to_client(self) -> None:
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                self.node_bytes += data
                self.client.sendall(data)
        except OSError:
            pass
        self._end()

    def _end(self) -> None:
        # Either side ending ends both: the executor sees the node gone, the node the client.
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._ended += 1
            if self._ended < 2:
                return
        for sock in (self.client, self.upstream):
            sock.close()
        self.closed.set()

    def handshake_bytes(self) -> int:
        """How many of ``client_bytes`` are the two handshake records."""
        offset = 0
        for _ in range(HANDSHAKE_RECORDS):
            (length,) = RECORD.unpack_from(self.client_bytes, offset)
            offset += RECORD.size + length
        return offset


class Proxy:
    """A TCP proxy from 127.0.0.1:<port from the OS> to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[ProxiedConnection] = []
        self.rewrite_hello: Callable[[bytes], bytes] | None = None
        self.tampered = threading.Event()
        self._armed: Tamper | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``host:port`` to give a ClusterExecutor."""
        return f"127.0.0.1:{self.port}"

    def arm(self, tamper: Tamper) -> None:
        """Alter the next frame a client sends (once); ``tampered`` is set when done."""
        with self._lock:
            self.tampered.clear()
            self._armed = tamper

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            connection = ProxiedConnection(self, client, upstream)
            with self._lock:
                self.connections.append(connection)
                self._threads.extend(connection.start())

    def rewrite(self, connection: ProxiedConnection, kind: str, index: int, unit: bytes) -> list[bytes]:
        """What to forward for one unit of a client's stream (called by the connection's thread)."""
        with self._lock:
            if kind == "record":
                if index == 0 and self.rewrite_hello is not None:
                    return [self.rewrite_hello(unit)]
                return [unit]
            tamper = self._armed
            if tamper is None:
                connection.frames.append(unit)
                return [unit]
            if tamper is Tamper.REORDER and connection.held is None:
                connection.held = unit
                return []
            self._armed = None
            self.tampered.set()
        return self._apply(connection, tamper, unit)

    @staticmethod
    def _apply(connection: ProxiedConnection, tamper: Tamper, unit: bytes) -> list[bytes]:
        if tamper is Tamper.FLIP_LENGTH:
            return [flip_bit(unit, FRAME.size - 1)]
        if tamper is Tamper.FLIP_BODY:
            return [flip_bit(unit, FRAME.size, 3)]
        if tamper is Tamper.FLIP_TAG:
            return [flip_bit(unit, len(unit) - 1, 7)]
        if tamper is Tamper.DROP:
            return []
        if tamper is Tamper.REORDER:
            assert connection.held is not None
            held, connection.held = connection.held, None
            return [unit, held]
        if tamper is Tamper.INJECT:
            return [forged_frame(), unit]
        earlier = connection.frames[-1] if connection.frames else forged_frame()
        return [earlier, unit]

    def close(self) -> None:
        """Stop accepting, cut every connection and join every thread."""
        self._stop.set()
        self.listener.close()
        self._acceptor.join(5.0)
        with self._lock:
            connections = list(self.connections)
            threads = list(self._threads)
        for connection in connections:
            for sock in (connection.client, connection.upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in threads:
            thread.join(5.0)
