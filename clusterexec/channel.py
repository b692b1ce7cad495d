"""A framed socket: protocol frames in and out over one socket, blocking or not.

:class:`Channel` is the non-blocking form used by the client I/O thread and the node's event
loop: messages are queued and sealed lazily as the socket drains, so a large buffer is sealed
chunk by chunk while the peer opens the previous chunk. :class:`BlockingChannel` is the form
used by a worker process.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Iterator, Sequence

from clusterexec.protocol import (
    DEFAULT_MAX_FRAME,
    HEAD,
    SIZE,
    Buffer,
    FrameReader,
    Message,
    Opener,
    Sealer,
    message_pieces,
)

HIGH_WATER = 4 << 20
READ_BUDGET = 8 << 20
IOV_MAX = 512


class ConnectionClosed(Exception):
    """The peer closed the connection (or it was reset)."""


class Channel:
    """A non-blocking framed socket. Not thread-safe: one owner thread uses it."""

    def __init__(self, sock: socket.socket, sealer: Sealer, opener: Opener, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._sealer = sealer
        self._reader = FrameReader(opener, max_frame=max_frame)
        self._pieces: deque[Iterator[Buffer]] = deque()
        self._wire: deque[memoryview] = deque()
        self._wire_bytes = 0
        self._unsealed = 0

    def feed_initial(self, data: bytes) -> list[Message]:
        """Decode bytes that arrived before the channel existed (after a handshake)."""
        out: list[Message] = []
        view = memoryview(data)
        while view:
            target = self._reader.writable()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            out.extend(self._reader.feed(n))
            view = view[n:]
        return out

    def read(self) -> list[Message]:
        """Read what the socket has (up to a budget); return the messages completed.

        Raises ConnectionClosed on EOF or reset, ProtocolError on a bad frame.
        """
        out: list[Message] = []
        budget = READ_BUDGET
        while budget > 0:
            target = self._reader.writable()
            try:
                n = self.sock.recv_into(target)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            if n == 0:
                raise ConnectionClosed("connection closed by peer")
            out.extend(self._reader.feed(n))
            budget -= n
            # A short read means the socket is drained, unless TLS still holds decrypted bytes.
            if n < len(target) and not (self._tls and self.sock.pending()):  # type: ignore[attr-defined]
                break
        return out

    def send(self, kind: int, body: Buffer = b"", buffers: Sequence[Buffer] = ()) -> None:
        """Queue one message; it is sealed and written by :meth:`flush`."""
        self._pieces.append(message_pieces(kind, body, buffers))
        size = HEAD.size + len(body)
        for buffer in buffers:
            size += SIZE.size + memoryview(buffer).nbytes
        self._unsealed += size

    @property
    def wants_write(self) -> bool:
        """True while queued bytes remain to be written."""
        return bool(self._wire or self._pieces)

    @property
    def queued_bytes(self) -> int:
        """Sealed bytes waiting for the socket."""
        return self._wire_bytes

    @property
    def backlog(self) -> int:
        """Bytes queued but not yet written, sealed or not (what back-pressure watches)."""
        return self._wire_bytes + self._unsealed

    def _seal_more(self) -> None:
        while self._pieces and self._wire_bytes < HIGH_WATER:
            pieces = self._pieces[0]
            piece = next(pieces, None)
            if piece is None:
                self._pieces.popleft()
                continue
            self._unsealed -= memoryview(piece).nbytes
            for buf in self._sealer.frame(piece):
                view = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else memoryview(buf)
                if view.nbytes:
                    self._wire.append(view)
                    self._wire_bytes += view.nbytes

    def flush(self) -> bool:
        """Write as much as the socket takes; return True when nothing is left queued.

        Raises ConnectionClosed if the peer is gone.
        """
        while True:
            self._seal_more()
            if not self._wire:
                return True
            batch = [self._wire[i] for i in range(min(len(self._wire), IOV_MAX))]
            try:
                # TLS sockets have no sendmsg: one buffer at a time.
                sent = self.sock.send(batch[0]) if self._tls else self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            self._consume(sent)
            if self._wire and sent < sum(v.nbytes for v in batch):
                return False

    def _consume(self, sent: int) -> None:
        self._wire_bytes -= sent
        while sent:
            head = self._wire[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                self._wire.popleft()
            else:
                self._wire[0] = head[sent:]
                sent = 0

    def close(self) -> None:
        """Close the socket; queued data is dropped."""
        self._pieces.clear()
        self._wire.clear()
        self._wire_bytes = self._unsealed = 0
        try:
            self.sock.close()
        except OSError:
            pass


class BlockingChannel:
    """A blocking framed socket, for a worker process talking to its node."""

    def __init__(self, sock: socket.socket, sealer: Sealer, opener: Opener) -> None:
        self.sock = sock
        self._sealer = sealer
        self._reader = FrameReader(opener)
        self._ready: deque[Message] = deque()

    def feed_initial(self, data: bytes) -> None:
        """Decode bytes read before the channel existed (past a handshake's last record);
        the messages they complete are returned by the next :meth:`receive` calls."""
        view = memoryview(data)
        while view:
            target = self._reader.writable()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self._ready.extend(self._reader.feed(n))
            view = view[n:]

    def receive(self) -> Message:
        """Block until one message arrives. Raises ConnectionClosed on EOF."""
        while not self._ready:
            target = self._reader.writable()
            try:
                n = self.sock.recv_into(target)
            except InterruptedError:
                continue
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            if n == 0:
                raise ConnectionClosed("connection closed by peer")
            self._ready.extend(self._reader.feed(n))
        return self._ready.popleft()

    def has_pending(self) -> bool:
        """True if a complete message is already buffered."""
        return bool(self._ready)

    def send(self, kind: int, body: Buffer = b"", buffers: Sequence[Buffer] = ()) -> None:
        """Write one message, blocking until it is all written (one syscall when small)."""
        views: list[memoryview] = []
        for piece in message_pieces(kind, body, buffers):
            views.extend(memoryview(buf).cast("B") for buf in self._sealer.frame(piece))
        send_all(self.sock, views)


def send_all(sock: socket.socket, views: list[memoryview]) -> None:
    """Write every buffer with scatter-gather sends, blocking until done."""
    pending = deque(v for v in views if v.nbytes)
    while pending:
        batch = [pending[i] for i in range(min(len(pending), IOV_MAX))]
        sent = sock.sendmsg(batch)
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[sent:]
                sent = 0
