"""Frames and messages on the wire. Pure: no sockets.

After the handshake (:mod:`clusterexec.wire.handshake`) the wire is a sequence of frames::

    +------------------+-------------------------------------------+
    | length: u64, BE  | body: ciphertext + 16-byte AES-GCM tag    |
    +------------------+-------------------------------------------+

Each direction has its own session key and a frame counter; the counter is the AES-GCM nonce
and the length header is the associated data, so a frame that is altered, dropped, replayed,
reordered or injected fails to open and the connection is closed before anything is
unpickled.

A *message* is one head frame, then one frame per ``CHUNK`` bytes of each out-of-band
buffer. Head plaintext: ``kind: u8, nbuf: u16, nbuf x size: u64``, then the body (kinds and
bodies: :mod:`clusterexec.wire.messages`). Chunking lets the receiver open chunk *k* while the
sender seals chunk *k+1*, and lets large buffers be opened straight into their final place.

Between a node and its own workers (a socketpair on one machine) the same framing is used
unsealed (:class:`~clusterexec.wire.sealing.PlainSealer`).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from clusterexec.errors import ProtocolError
from clusterexec.wire.messages import kind_name
from clusterexec.wire.sealing import FRAME_HEADER, Buffer, Opener, Sealer

CHUNK = 1 << 20
DEFAULT_MAX_FRAME = 1 << 30
DEFAULT_MAX_MESSAGE = 1 << 34
MAX_BUFFERS = 4096
HEAD = struct.Struct("!BH")
SIZE = struct.Struct("!Q")


class ChunkedBuffer:
    """A received buffer kept as the chunks it arrived in (``CHUNK`` bytes each but the last).

    A node forwards buffers without ever looking into them, so it keeps them as they came
    rather than assembling one large block: no large allocation, no copy."""

    __slots__ = ("chunks", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.chunks: list[bytearray] = []
        self.nbytes = nbytes

    def tobytes(self) -> bytes:
        """The whole buffer as one bytes object (a copy)."""
        return b"".join(self.chunks)


# Buffers of at least this size are received into fresh anonymous memory advised to use huge
# pages, where the kernel has them: faulting in 64 MB takes a third of the time, and the memory
# goes straight back to the system when the buffer is freed.
HUGE_BUFFER = 4 << 20


def alloc_buffer(size: int) -> bytearray | mmap.mmap:
    """A zeroed, writable buffer of ``size`` bytes to receive into."""
    if size < HUGE_BUFFER:
        return bytearray(size)
    # Private: a shared anonymous mapping would be shmem, with no huge pages and page-cache costs.
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            memory.madvise(advice)
        except OSError:
            pass
    return memory


def buffer_nbytes(buf: AnyBuffer) -> int:
    """The size in bytes of a buffer to send (a received :class:`ChunkedBuffer` included)."""
    if isinstance(buf, ChunkedBuffer):
        return buf.nbytes
    return memoryview(buf).nbytes


AnyBuffer = Buffer | mmap.mmap | ChunkedBuffer


@dataclass
class Message:
    """One decoded message: its kind, its body and its out-of-band buffers."""

    kind: int
    body: Buffer = b""
    buffers: list[AnyBuffer] = field(default_factory=list)

    def __repr__(self) -> str:
        sizes = [buffer_nbytes(b) for b in self.buffers]
        return f"Message({kind_name(self.kind)}, body={len(self.body)} bytes, buffers={sizes})"


# --------------------------------------------------------------------------- messages


def _flat(buf: Buffer | mmap.mmap) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def message_head(kind: int, body: Buffer = b"") -> bytes:
    """The plaintext of a message without buffers: its only frame."""
    return HEAD.pack(kind, 0) + body


def message_pieces(kind: int, body: Buffer = b"", buffers: Sequence[AnyBuffer] = ()) -> Iterator[Buffer]:
    """Yield the plaintext of each frame of a message: the head, then buffer chunks.

    Raises ProtocolError for more than MAX_BUFFERS buffers.
    """
    if len(buffers) > MAX_BUFFERS:
        raise ProtocolError(f"a message may carry at most {MAX_BUFFERS} buffers, not {len(buffers)}")
    views = [b if isinstance(b, ChunkedBuffer) else _flat(b) for b in buffers]
    head = bytearray(HEAD.pack(kind, len(views)))
    for view in views:
        head += SIZE.pack(view.nbytes)
    head += body
    yield head
    for view in views:
        if isinstance(view, ChunkedBuffer):
            yield from view.chunks  # received in CHUNK pieces: forwarded in the same pieces
            continue
        for start in range(0, view.nbytes, CHUNK):
            yield view[start : start + CHUNK]


def encode_message(sealer: Sealer, kind: int, body: Buffer = b"", buffers: Sequence[AnyBuffer] = ()) -> list[Buffer]:
    """Return every wire buffer of one message, sealed in order (for small messages)."""
    out: list[Buffer] = []
    for piece in message_pieces(kind, body, buffers):
        out.extend(sealer.frame(piece))
    return out


class FrameReader:
    """Incremental, allocation-aware frame and message decoder (sans-IO).

    Call :meth:`writable` for a buffer to ``recv_into``, then :meth:`feed` with the number of
    bytes received; it returns the messages completed. Lengths are checked against
    ``max_frame`` and ``max_message`` before anything is allocated. Any violation raises
    ProtocolError, after which the reader must be discarded.

    A message's buffers are assembled in one block each (:func:`alloc_buffer`), or with
    ``chunked`` kept as the chunks they arrived in (:class:`ChunkedBuffer`, for a node that only
    forwards them). Unsealed chunks are received straight into their final place.
    """

    def __init__(
        self,
        opener: Opener,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_message: int = DEFAULT_MAX_MESSAGE,
        bufsize: int = 256 * 1024,
        chunked: bool = False,
    ) -> None:
        self._opener = opener
        self._chunked = chunked
        self._direct = False
        self._max_frame = max_frame
        self._max_message = max_message
        self._buf = bytearray(bufsize)
        self._start = 0
        self._end = 0
        self._big: bytearray | memoryview | mmap.mmap | None = None
        self._big_len = 0
        self._big_filled = 0
        self._big_header = b""
        self._big_keep: bytearray | None = None
        self._assembly: _Assembly | None = None

    def writable(self) -> memoryview:
        """Return the buffer the next received bytes must be written into."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled : self._big_len]
        if self._end == len(self._buf):
            self._compact()
        return memoryview(self._buf)[self._end :]

    def feed(self, n: int) -> list[Message]:
        """Account for ``n`` bytes written into :meth:`writable`; return completed messages."""
        out: list[Message] = []
        if self._big is not None:
            self._big_filled += n
            if self._big_filled < self._big_len:
                return out
            if self._direct:  # already in place
                self._direct = False
                self._big = None
                self._advance(self._big_len, out)
                return out
            body = memoryview(self._big)[: self._big_len]
            self._on_frame(self._big_header, body, out)
            # A scratch buffer of chunk size is kept for the next chunk; larger ones are freed.
            big = self._big
            self._big_keep = big if isinstance(big, bytearray) and self._big_len <= 2 * CHUNK else None
            self._big = None
            return out
        self._end += n
        self._parse(out)
        return out

    def _compact(self) -> None:
        pending = self._end - self._start
        if self._start:
            self._buf[:pending] = self._buf[self._start : self._end]
        self._start, self._end = 0, pending

    def _parse(self, out: list[Message]) -> None:
        hsize = FRAME_HEADER.size
        buf = self._buf
        while self._end - self._start >= hsize:
            start = self._start
            (length,) = FRAME_HEADER.unpack_from(buf, start)
            if length > self._max_frame or length < self._opener.overhead or self._assembly is not None:
                self._check_length(length)
            total = hsize + length
            if self._end - start >= total:
                view = memoryview(buf)
                header = bytes(view[start : start + hsize])
                body = view[start + hsize : start + total]
                self._start = start + total
                self._on_frame(header, body, out)
                continue
            if total > len(self._buf):
                self._start_big(length)
            elif self._start + total > len(self._buf):
                self._compact()
            break
        if self._start == self._end:
            self._start = self._end = 0

    def _check_length(self, length: int) -> None:
        if self._assembly is not None and length != self._assembly.expected() + self._opener.overhead:
            # A buffer chunk's size is known in advance: refuse a wrong one before allocating.
            got, expected = length - self._opener.overhead, self._assembly.expected()
            raise ProtocolError(f"buffer chunk of {got} bytes where {expected} were expected")
        if length > self._max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self._max_frame} bytes")
        if length < self._opener.overhead:
            raise ProtocolError(f"frame of {length} bytes is shorter than its tag")

    def _start_big(self, length: int) -> None:
        hsize = FRAME_HEADER.size
        big: bytearray | memoryview | mmap.mmap
        if self._assembly is not None and not self._opener.overhead:
            # An unsealed chunk needs no opening: receive it where it belongs.
            big = self._assembly.target(self._chunked)
            self._direct = True
        else:
            keep = self._big_keep
            # alloc_buffer: a large frame is received into anonymous memory that takes room only
            # as its bytes arrive, not at its header (a length under the limit commits nothing).
            big = keep if keep is not None and len(keep) >= length else alloc_buffer(length)
            self._big_keep = None
        self._big = big
        self._big_len = length
        self._big_header = bytes(self._buf[self._start : self._start + hsize])
        have = self._end - self._start - hsize
        big[:have] = self._buf[self._start + hsize : self._end]
        self._big_filled = have
        self._start = self._end = 0

    def _on_frame(self, header: bytes, body: memoryview, out: list[Message]) -> None:
        assembly = self._assembly
        if assembly is None:
            message = self._on_head(self._opener.open(header, body))
            if message is not None:
                out.append(message)
            return
        n = len(body) - self._opener.overhead
        if n != assembly.expected():
            raise ProtocolError(f"buffer chunk of {n} bytes where {assembly.expected()} were expected")
        self._opener.open_into(header, body, assembly.target(self._chunked))
        self._advance(n, out)

    def _advance(self, n: int, out: list[Message]) -> None:
        assembly = self._assembly
        assert assembly is not None
        if assembly.advance(n):
            self._assembly = None
            out.append(assembly.message)

    def _on_head(self, plain: bytearray) -> Message | None:
        if len(plain) >= HEAD.size and plain[1] == 0 and plain[2] == 0:
            # The common case, a message of one frame (no buffers), is decoded in one go.
            return Message(plain[0], memoryview(plain)[HEAD.size :], [])
        if len(plain) < HEAD.size:
            raise ProtocolError(f"message head of {len(plain)} bytes is too short")
        kind, nbuf = HEAD.unpack_from(plain, 0)
        if nbuf > MAX_BUFFERS:
            raise ProtocolError(f"message announces {nbuf} buffers, more than {MAX_BUFFERS}")
        offset = HEAD.size + nbuf * SIZE.size
        if len(plain) < offset:
            raise ProtocolError("message head is shorter than its buffer table")
        sizes = [SIZE.unpack_from(plain, HEAD.size + i * SIZE.size)[0] for i in range(nbuf)]
        if sum(sizes) > self._max_message:
            raise ProtocolError(
                f"message announces {sum(sizes)} bytes of buffers, more than the limit of {self._max_message}"
            )
        # Buffers are allocated as their first chunk arrives, not when announced: a head alone
        # cannot make the receiver reserve memory.
        message = Message(kind, memoryview(plain)[offset:], [bytearray() for _ in sizes])
        assembly = _Assembly(message, sizes)
        if assembly.done():
            return message
        self._assembly = assembly
        return None


class _Assembly:
    """The buffers of a message still being received, chunk by chunk."""

    def __init__(self, message: Message, sizes: list[int]) -> None:
        self.message = message
        self._sizes = sizes
        self._index = 0
        self._offset = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._sizes) and self._offset >= self._sizes[self._index]:
            self._index += 1
            self._offset = 0

    def done(self) -> bool:
        return self._index >= len(self._sizes)

    def expected(self) -> int:
        return min(CHUNK, self._sizes[self._index] - self._offset)

    def target(self, chunked: bool) -> memoryview:
        """Where the next chunk goes: its place in the buffer's block, or a new chunk."""
        size = self._sizes[self._index]
        if chunked:
            buf = self.message.buffers[self._index]
            if not isinstance(buf, ChunkedBuffer):
                buf = self.message.buffers[self._index] = ChunkedBuffer(size)
            if len(buf.chunks) * CHUNK == self._offset:
                buf.chunks.append(bytearray(self.expected()))
            return memoryview(buf.chunks[-1])
        block = self.message.buffers[self._index]
        if self._offset == 0 and not (isinstance(block, (bytearray, mmap.mmap)) and len(block) == size):
            block = self.message.buffers[self._index] = alloc_buffer(size)
        assert isinstance(block, (bytearray, mmap.mmap))
        return memoryview(block)[self._offset : self._offset + self.expected()]

    def advance(self, n: int) -> bool:
        self._offset += n
        self._skip_empty()
        return self.done()
