"""A framed socket: protocol frames in and out over one socket, blocking or not.

:class:`Channel` is the non-blocking form used by the client I/O thread and the node's event
loop: messages are queued and sealed lazily as the socket drains, so a large buffer is sealed
chunk by chunk while the peer opens the previous chunk. :class:`BlockingChannel` is the form
used by a worker process.
"""

from __future__ import annotations

import socket
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice

from clusterexec.wire.frames import (
    CHUNK,
    DEFAULT_MAX_FRAME,
    HEAD,
    SIZE,
    AnyBuffer,
    FrameReader,
    Message,
    buffer_nbytes,
    message_head,
    message_pieces,
)
from clusterexec.wire.sealing import FRAME_HEADER, TAG_SIZE, AeadSealer, Buffer, Opener, Sealer

HIGH_WATER = 4 << 20
READ_BUDGET = 8 << 20
IOV_MAX = 512
# A sealed full chunk, the one frame size worth recycling; and how many to keep.
FULL_FRAME = FRAME_HEADER.size + CHUNK + TAG_SIZE
SPARE_FRAMES = 8


class ConnectionClosed(Exception):
    """The peer closed the connection (or it was reset)."""


def flush_each(dirty: set[Channel]) -> Iterator[tuple[int, bool | None]]:
    """Flush every channel of ``dirty``, emptying it; yield ``(fd, done)`` for each open one:
    ``done`` as :meth:`Channel.flush` returns it, None if the peer is gone."""
    while dirty:
        channel = dirty.pop()
        fd = channel.sock.fileno()
        if fd < 0:
            continue
        try:
            done = channel.flush()
        except ConnectionClosed:
            yield fd, None
            continue
        yield fd, done


class Channel:
    """A non-blocking framed socket. Not thread-safe: one owner thread uses it."""

    def __init__(
        self,
        sock: socket.socket,
        sealer: Sealer,
        opener: Opener,
        max_frame: int = DEFAULT_MAX_FRAME,
        chunked: bool = False,
    ) -> None:
        self.sock = sock
        ssl = sys.modules.get("ssl")  # imported only where TLS is used: it costs startup time
        self._tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
        # What a non-blocking socket raises when it cannot go on now.
        self._again: tuple[type[OSError], ...] = (
            (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
            if ssl is not None and self._tls
            else (BlockingIOError, InterruptedError)
        )
        self._sealer = sealer
        self._reader = FrameReader(opener, max_frame=max_frame, chunked=chunked)
        # Sealed frames are the sealer's own buffers, referenced by nothing but this queue:
        # once written, full-size ones go back to it (AES-GCM only; the others seal in place).
        self._spare: list[bytearray] | None = sealer.spare if isinstance(sealer, AeadSealer) else None
        self._pieces: deque[Iterator[Buffer]] = deque()
        self._wire: deque[Buffer] = deque()
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
            except self._again:
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

    def send(self, kind: int, body: Buffer = b"", buffers: Sequence[AnyBuffer] = ()) -> None:
        """Queue one message; it is sealed and written by :meth:`flush`."""
        if not buffers and not self._pieces:
            # A message of one frame is sealed at once (it is small: bodies ride in buffers
            # when they are large), saving the generator of the general path.
            for buf in self._sealer.frame(message_head(kind, body)):
                self._wire.append(buf)
                self._wire_bytes += len(buf)
            return
        self._pieces.append(message_pieces(kind, body, buffers))
        size = HEAD.size + len(body)
        for buffer in buffers:
            size += SIZE.size + buffer_nbytes(buffer)
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
                # Every queued buffer must have len() == its size in bytes.
                view = buf if isinstance(buf, (bytes, bytearray)) else memoryview(buf).cast("B")
                if len(view):
                    self._wire.append(view)
                    self._wire_bytes += len(view)

    def flush(self) -> bool:
        """Write as much as the socket takes; return True when nothing is left queued.

        Raises ConnectionClosed if the peer is gone.
        """
        wire = self._wire
        while True:
            if self._pieces:
                self._seal_more()
            if not wire:
                return True
            if self._tls:  # TLS sockets have no sendmsg: one buffer at a time.
                batch: Sequence[Buffer] = [wire[0]]
                size = len(wire[0])
            elif len(wire) <= IOV_MAX:
                batch, size = wire, self._wire_bytes
            else:
                batch = list(islice(wire, IOV_MAX))
                size = sum(len(v) for v in batch)
            try:
                sent = self.sock.send(batch[0]) if self._tls else self.sock.sendmsg(batch)
            except self._again:
                return False
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            if sent == self._wire_bytes:
                if self._spare is not None and sent >= FULL_FRAME:
                    for buf in wire:
                        self._recycle(buf)
                wire.clear()
                self._wire_bytes = 0
                continue
            self._consume(sent)
            if sent < size:
                return False

    def _consume(self, sent: int) -> None:
        self._wire_bytes -= sent
        while sent:
            head = self._wire[0]
            if sent >= len(head):
                sent -= len(head)
                self._wire.popleft()
                if self._spare is not None:
                    self._recycle(head)
            else:
                self._wire[0] = memoryview(head)[sent:]
                sent = 0

    def _recycle(self, buf: Buffer) -> None:
        spare = self._spare
        if spare is not None and len(spare) < SPARE_FRAMES and type(buf) is bytearray and len(buf) == FULL_FRAME:
            spare.append(buf)

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
    """A blocking framed socket, for a worker process talking to its node (or a status probe,
    over TLS or not)."""

    def __init__(self, sock: socket.socket, sealer: Sealer, opener: Opener) -> None:
        self.sock = sock
        ssl = sys.modules.get("ssl")  # imported only where TLS is used: it costs startup time
        self._tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
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

    def send(self, kind: int, body: Buffer = b"", buffers: Sequence[AnyBuffer] = ()) -> None:
        """Write one message, blocking until it is all written (one syscall when small)."""
        if self._tls:  # TLS sockets have no sendmsg: one buffer at a time.
            for piece in message_pieces(kind, body, buffers):
                for buf in self._sealer.frame(piece):
                    self.sock.sendall(buf)
            return
        if not buffers:
            frame = self._sealer.frame(message_head(kind, body))
            sent = self.sock.sendmsg(frame)
            if sent < sum(len(buf) for buf in frame):  # a partial write: the rest, blocking
                send_all(self.sock, [memoryview(buf).cast("B") for buf in frame], skip=sent)
            return
        views: list[memoryview] = []
        for piece in message_pieces(kind, body, buffers):
            views.extend(memoryview(buf).cast("B") for buf in self._sealer.frame(piece))
        send_all(self.sock, views)


def send_all(sock: socket.socket, views: list[memoryview], skip: int = 0) -> None:
    """Write every buffer with scatter-gather sends, blocking until done; the first ``skip``
    bytes are taken as already written."""
    pending = deque(v for v in views if v.nbytes)
    sent = skip
    while True:
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[sent:]
                sent = 0
        if not pending:
            return
        sent = sock.sendmsg([pending[i] for i in range(min(len(pending), IOV_MAX))])
