"""Wire protocol: frames, message kinds, the handshake and per-frame sealing. Pure: no sockets.

After the handshake the wire is a sequence of frames::

    +------------------+-------------------------------------------+
    | length: u64, BE  | body: ciphertext + 16-byte AES-GCM tag    |
    +------------------+-------------------------------------------+

Each direction has its own session key and a frame counter; the counter is the AES-GCM nonce
and the length header is the associated data, so a frame that is altered, dropped, replayed,
reordered or injected fails to open and the connection is closed before anything is
unpickled.

A *message* is one head frame, then one frame per ``CHUNK`` bytes of each out-of-band
buffer. Head plaintext: ``kind: u8, nbuf: u16, nbuf x size: u64``, then the body. Chunking
lets the receiver open chunk *k* while the sender seals chunk *k+1*, and lets large buffers
be opened straight into their final place.

Between a node and its own workers (a socketpair on one machine) the same framing is used
unsealed (:class:`PlainSealer`).

The handshake is a mutual challenge-response over length-prefixed records (u16 length):
``ClientHello`` (magic, version, client nonce, info), ``ServerHello`` (magic, version, status,
server nonce, node proof, info), ``ClientProof``. Each proof is an HMAC-SHA256 under the shared
key of a label and the whole transcript, so neither side sends the key, a recorded handshake
cannot be replayed (the other side's nonce is fresh), and the two proofs cannot be reflected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.wire.sealing import (  # noqa: F401 - re-exported: the sealers belong to the protocol
    FRAME_HEADER,
    GCM_NONCE,
    TAG_SIZE,
    AeadOpener,
    AeadSealer,
    Buffer,
    HmacOpener,
    HmacSealer,
    Opener,
    PlainOpener,
    PlainSealer,
    Sealer,
    available_seals,
    opener_for,
    sealer_for,
)

MAGIC = b"CLXC"
PROTOCOL_VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32
SESSION_KEY_SIZE = 32
CHUNK = 1 << 20
MAX_RECORD = 4096
DEFAULT_MAX_FRAME = 1 << 30
DEFAULT_MAX_MESSAGE = 1 << 34
MAX_BUFFERS = 4096
HANDSHAKE_TIMEOUT = 10.0

RECORD_HEADER = struct.Struct("!H")
HEAD = struct.Struct("!BH")
SIZE = struct.Struct("!Q")
HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s")
SERVER_HELLO = struct.Struct(f"!4sHB{NONCE_SIZE}s{PROOF_SIZE}s")
TASK_HEAD = struct.Struct("!Q16sB")
RESULT_HEAD = struct.Struct("!QB")
OUTPUT_HEAD = struct.Struct("!BI")  # stream (1 stdout, 2 stderr), worker pid
TASK_ID = struct.Struct("!Q")
SIGNAL_HEAD = struct.Struct("!B")  # how to stop the session's workers: WORKERS_TERMINATE or WORKERS_KILL

# Message kinds, client to node.
SESSION = 1
FUNC = 2
TASK = 3
CANCEL = 4
FORGET = 5
BYE = 6
PING = 7
MODULES = 8
STATUS = 9
SIGNAL_WORKERS = 10  # terminate_workers()/kill_workers(): signal every worker of the session
# Node to client.
WELCOME = 20
STARTED = 21
RESULT = 22
CANCELLED = 23
CRASHED = 24
HEARTBEAT = 25
BROKEN = 26
STATUS_REPLY = 27
OUTPUT = 28
# Node to worker (TASK, FUNC, FORGET and MODULES are forwarded as they came).
INIT = 40
STOP = 41
# Worker to node (RESULT is forwarded as it came).
INIT_FAILED = 42

# TASK flags.
FLAG_CHUNK = 1
# SIGNAL_WORKERS: which signal the node sends (named, not a number: signal numbers are the node's).
WORKERS_TERMINATE = 1  # SIGTERM, as Process.terminate()
WORKERS_KILL = 2  # SIGKILL, as Process.kill()
# RESULT status.
STATUS_OK = 0
STATUS_ERROR = 1
STATUS_PARTIAL = 2

STATUS_REFUSED = 1
STATUS_ACCEPTED = 0


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
        self._big: bytearray | memoryview | None = None
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
        if self._assembly is not None and not self._opener.overhead:
            # An unsealed chunk needs no opening: receive it where it belongs.
            self._big = self._assembly.target(self._chunked)
            self._direct = True
        else:
            keep = self._big_keep
            self._big = keep if keep is not None and len(keep) >= length else bytearray(length)
            self._big_keep = None
        self._big_len = length
        self._big_header = bytes(self._buf[self._start : self._start + hsize])
        have = self._end - self._start - hsize
        self._big[:have] = self._buf[self._start + hsize : self._end]
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


# --------------------------------------------------------------------------- bodies


def pack_ids(ids: Sequence[int]) -> bytes:
    """Encode a list of task ids (u64 each)."""
    return struct.pack(f"!{len(ids)}Q", *ids)


def unpack_ids(body: Buffer) -> list[int]:
    """Decode a list of task ids; raise ProtocolError on a ragged body."""
    if len(body) % 8:
        raise ProtocolError(f"id list of {len(body)} bytes is not a multiple of 8")
    return list(struct.unpack(f"!{len(body) // 8}Q", body))


def pack_json(obj: object) -> bytes:
    """Encode a small control body as JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def unpack_json(body: Buffer) -> dict[str, object]:
    """Decode a small JSON control body; raise ProtocolError if it is not a JSON object."""
    try:
        obj = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # deep nesting must not crash a node
        raise ProtocolError(f"malformed control message: {exc!r}"[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed control message: not a JSON object")
    return obj


def pack_cancelled(cancelled: Sequence[int], refused: Sequence[int]) -> bytes:
    """Encode a CANCELLED reply: the ids removed, then the ids already started or done."""
    return struct.pack("!I", len(cancelled)) + pack_ids(cancelled) + pack_ids(refused)


def unpack_cancelled(body: Buffer) -> tuple[list[int], list[int]]:
    """Decode a CANCELLED reply into (cancelled ids, refused ids)."""
    if len(body) < 4:
        raise ProtocolError("CANCELLED message is too short")
    (n,) = struct.unpack_from("!I", body, 0)
    ids = unpack_ids(memoryview(body)[4:])
    if n > len(ids):
        raise ProtocolError("CANCELLED message counts more ids than it holds")
    return ids[:n], ids[n:]


# --------------------------------------------------------------------------- handshake


def hkdf(key: bytes, salt: bytes, info: bytes, size: int = SESSION_KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``key``, for one ``info`` label."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < size:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:size]


def _proof(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + hashlib.sha256(transcript).digest(), hashlib.sha256).digest()


def record(payload: bytes) -> bytes:
    """Length-prefix one handshake record."""
    if len(payload) > MAX_RECORD:
        raise ProtocolError(f"handshake record of {len(payload)} bytes exceeds {MAX_RECORD}")
    return RECORD_HEADER.pack(len(payload)) + payload


class RecordReader:
    """Splits handshake records out of a byte stream; at most MAX_RECORD bytes each.

    It stops after ``max_records`` records: what follows is the framed stream, returned by
    :meth:`leftover`.
    """

    def __init__(self, max_records: int) -> None:
        self._buf = bytearray()
        self._remaining = max_records

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete records."""
        self._buf += data
        out: list[bytes] = []
        while self._remaining and len(self._buf) >= RECORD_HEADER.size:
            (n,) = RECORD_HEADER.unpack_from(self._buf, 0)
            if n > MAX_RECORD:
                raise ProtocolError(f"handshake record of {n} bytes exceeds {MAX_RECORD}")
            if len(self._buf) < RECORD_HEADER.size + n:
                break
            out.append(bytes(self._buf[RECORD_HEADER.size : RECORD_HEADER.size + n]))
            del self._buf[: RECORD_HEADER.size + n]
            self._remaining -= 1
        return out

    def leftover(self) -> bytes:
        """Bytes received after the last complete record (the start of the framed stream)."""
        return bytes(self._buf)


@dataclass
class SessionKeys:
    """The outcome of a handshake: one AES key per direction, and the peer's info."""

    send: bytes
    recv: bytes
    peer_info: dict[str, object]
    seal: str = "aes-gcm"

    def sealer(self) -> Sealer:
        """This side's sealer for the negotiated method."""
        return sealer_for(self.seal, self.send)

    def opener(self) -> Opener:
        """This side's opener for the negotiated method."""
        return opener_for(self.seal, self.recv)


def _derive(key: bytes, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    salt = client_nonce + server_nonce
    return hkdf(key, salt, b"clusterexec client to node"), hkdf(key, salt, b"clusterexec node to client")


def _check_magic(magic: bytes, version: int, who: str) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"{who} does not speak the clusterexec protocol (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"{who} speaks clusterexec protocol version {version}, this side speaks {PROTOCOL_VERSION}; "
            "install the same clusterexec release on both sides"
        )


class ClientHandshake:
    """The client side of the handshake (sans-IO).

    ``hello()`` gives the first record; ``on_server_hello(record)`` checks the node's proof and
    returns the client's proof record. ``keys`` is set once the node's proof checked out.
    """

    def __init__(self, key: bytes, info: dict[str, object]) -> None:
        self._key = key
        self._nonce = os.urandom(NONCE_SIZE)
        self._seals = available_seals()
        self._hello = HELLO.pack(MAGIC, PROTOCOL_VERSION, self._nonce) + pack_json({**info, "seal": self._seals})
        self.keys: SessionKeys | None = None

    def hello(self) -> bytes:
        """The ClientHello record."""
        return record(self._hello)

    def on_server_hello(self, payload: bytes) -> bytes:
        """Check the ServerHello; return the ClientProof record to send.

        Raises VersionMismatchError, AuthenticationError or ProtocolError. On an
        AuthenticationError the caller should still send :meth:`failure_proof` so the node
        can log the reason.
        """
        if len(payload) < SERVER_HELLO.size:
            if len(payload) >= 7 and payload[6] == STATUS_REFUSED:
                raise VersionMismatchError(payload[7:].decode(errors="replace"))
            raise ProtocolError(f"node answered with a {len(payload)}-byte hello, too short")
        magic, version, status, nonce, proof = SERVER_HELLO.unpack_from(payload, 0)
        if status == STATUS_REFUSED:
            raise VersionMismatchError(payload[7:].decode(errors="replace"))
        _check_magic(magic, version, "the node")
        info = unpack_json(payload[SERVER_HELLO.size :])
        unproved = payload[: SERVER_HELLO.size - PROOF_SIZE] + payload[SERVER_HELLO.size :]
        transcript = self._hello + unproved
        if not hmac.compare_digest(proof, _proof(self._key, b"node", transcript)):
            # A random proof: the node logs the failure, and an impostor gets nothing it can use.
            self._failure = record(os.urandom(PROOF_SIZE))
            raise AuthenticationError("the node could not prove it holds the same key")
        seal = info.get("seal", "aes-gcm")
        if seal not in self._seals:
            raise ProtocolError(f"the node chose frame sealing {seal!r}, which this client does not offer")
        client_proof = _proof(self._key, b"client", transcript)
        send, recv = _derive(self._key, self._nonce, nonce)
        self.keys = SessionKeys(send, recv, info, str(seal))
        return record(client_proof)

    def failure_proof(self) -> bytes:
        """The proof record to send after a failed node proof (lets the node log why)."""
        return getattr(self, "_failure", b"")


class ServerHandshake:
    """The node side of the handshake (sans-IO).

    ``on_client_hello(record)`` returns the ServerHello record (raising VersionMismatchError
    after preparing a refusal in ``refusal``); ``on_client_proof(record)`` checks the client's
    proof and sets ``keys``.
    """

    def __init__(self, key: bytes, info: dict[str, object]) -> None:
        self._key = key
        self._info = info
        self._nonce = os.urandom(NONCE_SIZE)
        self._transcript = b""
        self._client_nonce = b""
        self.refusal = b""
        self._seal = ""
        self.keys: SessionKeys | None = None
        self.client_info: dict[str, object] = {}

    def on_client_hello(self, payload: bytes) -> bytes:
        """Check the ClientHello; return the ServerHello record."""
        if len(payload) < HELLO.size:
            raise ProtocolError(f"client hello of {len(payload)} bytes is too short")
        magic, version, nonce = HELLO.unpack_from(payload, 0)
        if magic != MAGIC:
            raise ProtocolError(f"peer does not speak the clusterexec protocol (bad magic {magic!r})")
        if version != PROTOCOL_VERSION:
            reason = (
                f"node speaks clusterexec protocol version {PROTOCOL_VERSION}, the client speaks "
                f"{version}; install the same clusterexec release on both sides"
            )
            self.refusal = record(struct.pack("!4sHB", MAGIC, PROTOCOL_VERSION, STATUS_REFUSED) + reason.encode())
            raise VersionMismatchError(reason)
        self.client_info = unpack_json(payload[HELLO.size :])
        self._client_nonce = nonce
        offered = self.client_info.get("seal", ["aes-gcm"])
        offered = offered if isinstance(offered, list) else []
        self._seal = next((s for s in available_seals() if s in offered), "")
        if not self._seal:
            raise ProtocolError(f"the client offers no frame sealing this node supports ({offered!r})")
        info = pack_json({**self._info, "seal": self._seal})
        unproved = struct.pack(f"!4sHB{NONCE_SIZE}s", MAGIC, PROTOCOL_VERSION, STATUS_ACCEPTED, self._nonce) + info
        self._transcript = payload + unproved
        proof = _proof(self._key, b"node", self._transcript)
        return record(unproved[: SERVER_HELLO.size - PROOF_SIZE] + proof + info)

    def on_client_proof(self, payload: bytes) -> SessionKeys:
        """Check the ClientProof; return the session keys (node's view: send is node to client)."""
        expected = _proof(self._key, b"client", self._transcript)
        if len(payload) != PROOF_SIZE or not hmac.compare_digest(payload, expected):
            raise AuthenticationError("the client could not prove it holds the node's key (wrong key?)")
        to_node, to_client = _derive(self._key, self._client_nonce, self._nonce)
        self.keys = SessionKeys(to_client, to_node, self.client_info, self._seal)
        return self.keys
