"""The wire protocol, tested sans-IO: frames, sealing, the incremental reader, the handshake.

Every test drives :mod:`clusterexec.wire.frames`, :mod:`~clusterexec.wire.messages` and
:mod:`~clusterexec.wire.handshake` by hand, the way :mod:`clusterexec.wire.channel`,
the node and the client do: bytes arrive in arbitrary pieces, are copied into
``FrameReader.writable()`` as ``socket.recv_into`` would, and ``feed(n)`` returns the
messages completed. The last tests run :class:`~clusterexec.wire.channel.Channel` and
:class:`~clusterexec.wire.channel.BlockingChannel` over a real ``socket.socketpair()``.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import random
import select
import socket
import struct
import threading
import tracemalloc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.wire.channel import HIGH_WATER, BlockingChannel, Channel, ConnectionClosed
from clusterexec.wire.frames import CHUNK, HEAD, MAX_BUFFERS, SIZE, FrameReader, Message, encode_message, message_pieces
from clusterexec.wire.handshake import (
    HELLO,
    MAGIC,
    MAX_RECORD,
    NONCE_SIZE,
    PROOF_SIZE,
    PROTOCOL_VERSION,
    RECORD_HEADER,
    SERVER_HELLO,
    SESSION_KEY_SIZE,
    ClientHandshake,
    RecordReader,
    ServerHandshake,
    hkdf,
    record,
)
from clusterexec.wire.messages import (
    PING,
    RESULT,
    STOP,
    TASK,
    pack_cancelled,
    pack_ids,
    pack_json,
    unpack_cancelled,
    unpack_ids,
    unpack_json,
)
from clusterexec.wire.sealing import (
    FRAME_HEADER,
    TAG_SIZE,
    AeadOpener,
    AeadSealer,
    Buffer,
    Opener,
    PlainOpener,
    PlainSealer,
    Sealer,
)

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
CLIENT_INFO: dict[str, object] = {"python": "3.11.7", "clusterexec": "test"}
NODE_INFO: dict[str, object] = {"workers": 2}

# Buffer sizes worth trying: empty, tiny, around the AES-GCM tag and around the chunk size.
EDGE_SIZES = (0, 1, TAG_SIZE - 1, TAG_SIZE, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5)


# --------------------------------------------------------------------------- helpers


@dataclass
class Sent:
    """A message as the sender handed it over."""

    kind: int
    body: bytes
    buffers: Sequence[Buffer]


def feed(
    reader: FrameReader, data: bytes | bytearray, cuts: Iterable[int] = (), out: list[Message] | None = None
) -> list[Message]:
    """Deliver ``data`` to ``reader`` as a socket would and return the messages completed.

    The stream arrives in segments ending at ``cuts`` (like successive ``recv`` calls); each
    segment is copied into ``reader.writable()`` piece by piece, as ``recv_into`` would fill it.
    Messages are appended to ``out`` as they complete, so a caller still sees them if a later
    frame raises.
    """
    out = [] if out is None else out
    view = memoryview(data)
    start = 0
    for end in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        segment = view[start:end]
        while segment:
            target = reader.writable()
            # An empty buffer would make recv_into return 0, which a channel takes for EOF.
            assert len(target) > 0
            n = min(len(target), len(segment))
            target[:n] = segment[:n]
            out.extend(reader.feed(n))
            segment = segment[n:]
        start = end
    return out


def wire(sealer: Sealer, messages: Sequence[Sent]) -> bytes:
    """Encode ``messages`` in order into one byte stream."""
    return b"".join(bytes(buf) for m in messages for buf in encode_message(sealer, m.kind, m.body, m.buffers))


def sealed_frames(sealer: Sealer, messages: Sequence[Sent]) -> list[list[bytes]]:
    """The frames (header included) of each message, one list per message."""
    return [[bytes(buf) for buf in encode_message(sealer, m.kind, m.body, m.buffers)] for m in messages]


def digest(data: bytes | bytearray | memoryview) -> str:
    """A short stand-in for a large buffer in assertions (keeps failure reports readable)."""
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def received(messages: Iterable[Message]) -> list[tuple[int, str, list[str]]]:
    """What a reader returned, in a form that compares cheaply and prints briefly."""
    return [(m.kind, digest(m.body), [digest(b) for b in m.buffers]) for m in messages]


def expected(messages: Iterable[Sent]) -> list[tuple[int, str, list[str]]]:
    """What the sender handed over, in the form of :func:`received`."""
    return [(m.kind, digest(m.body), [digest(b) for b in m.buffers]) for m in messages]


def sealed_pair(key: bytes = KEY) -> tuple[AeadSealer, FrameReader]:
    """One direction of a sealed connection: the sender's sealer and the receiver's reader."""
    return AeadSealer(key), FrameReader(AeadOpener(key))


@st.composite
def message_lists(draw: st.DrawFn, budget: int = 3 * CHUNK, max_messages: int = 3) -> list[Sent]:
    """1..max_messages messages with 0..4 buffers each; at most ``budget`` buffer bytes in all."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    remaining = budget
    messages = []
    for _ in range(draw(st.integers(1, max_messages))):
        kind = draw(st.integers(0, 255))
        body = draw(st.binary(max_size=300))
        sizes = draw(st.lists(st.one_of(st.integers(0, 100), st.sampled_from(EDGE_SIZES)), max_size=4))
        buffers: list[Buffer] = []
        for size in sizes:
            if size > remaining:  # keep the whole list fast: big sizes only within the budget
                size %= 101
            remaining -= size
            as_type = draw(st.sampled_from([bytes, bytearray, memoryview]))  # any buffer will do
            buffers.append(as_type(rng.randbytes(size)))
        messages.append(Sent(kind, body, buffers))
    return messages


def cut_points(data: st.DataObject, length: int) -> list[int]:
    """Where the stream is split into ``recv`` results (hypothesis picks them)."""
    return data.draw(st.lists(st.integers(0, length), max_size=24), label="cuts")


# --------------------------------------------------------------------------- round trips


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sealed", [True, False], ids=["aead", "plain"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=message_lists(),
    bufsize=st.sampled_from([64, 4096, 256 * 1024]),
    data=st.data(),
)
def test_messages_survive_any_split_of_the_stream(
    sealed: bool, messages: list[Sent], bufsize: int, data: st.DataObject
) -> None:
    sealer: Sealer = AeadSealer(KEY) if sealed else PlainSealer()
    opener: Opener = AeadOpener(KEY) if sealed else PlainOpener()
    stream = wire(sealer, messages)
    # A small bufsize sends most frames down the reader's "big frame" path.
    reader = FrameReader(opener, bufsize=bufsize)

    out = feed(reader, stream, cut_points(data, len(stream)))

    assert received(out) == expected(messages)
    assert all(isinstance(b, bytearray) for m in out for b in m.buffers)


@pytest.mark.timeout(30)
def test_a_buffer_is_cut_into_chunk_frames_and_reassembled() -> None:
    sealer, reader = sealed_pair()
    payload = random.Random(0).randbytes(2 * CHUNK + 5)

    frames = encode_message(sealer, TASK, b"task head", [payload, b"", b"tail"])

    # One head frame, then CHUNK-sized pieces of each non-empty buffer.
    assert [len(f) - FRAME_HEADER.size - TAG_SIZE for f in frames] == [
        HEAD.size + 3 * SIZE.size + len(b"task head"),
        CHUNK,
        CHUNK,
        5,
        4,
    ]
    (message,) = feed(reader, b"".join(bytes(f) for f in frames))
    assert message.kind == TASK
    assert message.body == b"task head"
    assert [digest(b) for b in message.buffers] == [digest(payload), digest(b""), digest(b"tail")]


def test_any_contiguous_buffer_goes_out_as_raw_bytes() -> None:
    sealer, reader = sealed_pair()
    doubles = array.array("d", [1.5, -2.0, 3.25])
    matrix = memoryview(bytes(range(24))).cast("B", (4, 6))

    (message,) = feed(reader, wire(sealer, [Sent(RESULT, b"", [doubles, matrix])]))  # type: ignore[list-item]

    assert message.buffers == [bytearray(doubles.tobytes()), bytearray(range(24))]
    assert array.array("d", message.buffers[0]) == doubles


def test_plain_sealer_sends_the_callers_buffers_without_copying() -> None:
    payload = bytearray(b"x" * 10)
    frames = list(message_pieces(TASK, b"", [payload]))
    sealed = PlainSealer().frame(frames[1])

    assert sealed[0] == FRAME_HEADER.pack(10)
    assert sealed[1].obj is payload  # type: ignore[union-attr]


@pytest.mark.parametrize("count", [0, 1, MAX_BUFFERS])
def test_a_message_carries_up_to_max_buffers(count: int) -> None:
    sealer, reader = sealed_pair()

    (message,) = feed(reader, wire(sealer, [Sent(TASK, b"b", [b"%d" % i for i in range(count)])]))

    assert message.buffers == [bytearray(b"%d" % i) for i in range(count)]


def test_a_sender_refuses_more_than_max_buffers() -> None:
    with pytest.raises(ProtocolError, match="at most 4096 buffers"):
        encode_message(AeadSealer(KEY), TASK, b"", [b""] * (MAX_BUFFERS + 1))


# --------------------------------------------------------------------------- tampering


def assert_tampering_detected(
    stream: bytes | bytearray, frames: list[list[bytes]], victim: int, cuts: Iterable[int] = (), exact: bool = False
) -> None:
    """Feeding ``stream`` raises ProtocolError; no message from ``victim`` on ever comes out.

    A tampered length field may announce a longer frame: the reader then waits for more bytes,
    so the peer is made to keep talking (zeros) until the frame must be complete. The reader's
    ``max_frame`` is the largest genuine frame, which bounds how much that can take.

    Messages before the victim come out intact, except those completed by the same ``feed``
    call that raised: that call's messages are lost with the connection. With ``exact`` (the
    stream is cut at every frame boundary) all of them must come out.
    """
    max_frame = max(len(f) - FRAME_HEADER.size for message in frames for f in message)
    messages = _decode_genuine(frames)
    reader = FrameReader(AeadOpener(KEY), max_frame=max_frame)
    out: list[Message] = []
    with pytest.raises(ProtocolError):
        feed(reader, stream, cuts, out)
        feed(reader, bytes(FRAME_HEADER.size + max_frame), (), out)
    assert len(out) == victim if exact else len(out) <= victim
    assert received(out) == received(messages[: len(out)])


def _decode_genuine(frames: list[list[bytes]]) -> list[Message]:
    return feed(FrameReader(AeadOpener(KEY)), b"".join(f for message in frames for f in message))


def _message_of_byte(frames: list[list[bytes]], index: int) -> int:
    end = 0
    for number, message in enumerate(frames):
        end += sum(len(f) for f in message)
        if index < end:
            return number
    raise IndexError(index)


SMALL_STREAM = [
    Sent(PING, b"", []),
    Sent(TASK, b"head", [b"abc", b"", b"0123456789" * 3]),
    Sent(RESULT, b"r" * 20, [b"z"]),
]


@pytest.mark.timeout(30)
def test_every_single_bit_flip_of_a_small_stream_is_detected() -> None:
    frames = sealed_frames(AeadSealer(KEY), SMALL_STREAM)
    stream = b"".join(f for message in frames for f in message)
    boundaries = list(itertools.accumulate(len(f) for message in frames for f in message))

    for bit in range(len(stream) * 8):
        tampered = bytearray(stream)
        tampered[bit // 8] ^= 1 << (bit % 8)
        victim = _message_of_byte(frames, bit // 8)
        assert_tampering_detected(tampered, frames, victim, cuts=boundaries, exact=True)


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=message_lists(budget=2 * CHUNK + 5), data=st.data())
def test_a_single_bit_flip_anywhere_is_detected(messages: list[Sent], data: st.DataObject) -> None:
    frames = sealed_frames(AeadSealer(KEY), messages)
    stream = bytearray(b"".join(f for message in frames for f in message))
    bit = data.draw(st.integers(0, len(stream) * 8 - 1), label="bit")

    stream[bit // 8] ^= 1 << (bit % 8)

    assert_tampering_detected(stream, frames, _message_of_byte(frames, bit // 8), cut_points(data, len(stream)))


def _flat_frames(messages: Sequence[Sent], key: bytes = KEY) -> list[bytes]:
    return [f for message in sealed_frames(AeadSealer(key), messages) for f in message]


def test_a_dropped_frame_is_detected() -> None:
    frames = _flat_frames(SMALL_STREAM)
    for index in range(len(frames) - 1):  # dropping the very last frame is a truncation: see below
        reader = FrameReader(AeadOpener(KEY))
        with pytest.raises(ProtocolError, match="failed authentication|buffer chunk"):
            feed(reader, b"".join(frames[:index] + frames[index + 1 :]))


def test_a_truncated_stream_returns_only_complete_messages() -> None:
    frames = _flat_frames(SMALL_STREAM)
    reader = FrameReader(AeadOpener(KEY))

    out = feed(reader, b"".join(frames[:-1]))

    # The last message is incomplete: the reader waits for it. Its loss shows up as EOF.
    assert received(out) == expected(SMALL_STREAM[:-1])


def test_swapped_frames_are_detected() -> None:
    frames = _flat_frames(SMALL_STREAM)
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            swapped = list(frames)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            with pytest.raises(ProtocolError):
                feed(FrameReader(AeadOpener(KEY)), b"".join(swapped))


def test_a_replayed_frame_is_detected() -> None:
    frames = _flat_frames(SMALL_STREAM)
    for index in range(len(frames)):
        replayed = frames[: index + 1] + [frames[index]] + frames[index + 1 :]
        with pytest.raises(ProtocolError):
            feed(FrameReader(AeadOpener(KEY)), b"".join(replayed))


def test_a_whole_replayed_message_is_detected() -> None:
    sealer, reader = sealed_pair()
    ping = b"".join(bytes(f) for f in encode_message(sealer, PING))

    assert [m.kind for m in feed(reader, ping)] == [PING]
    with pytest.raises(ProtocolError, match="frame 1 failed authentication"):
        feed(reader, ping)


def test_a_frame_sealed_with_another_key_is_detected() -> None:
    genuine = _flat_frames(SMALL_STREAM)
    forged = _flat_frames(SMALL_STREAM, key=OTHER_KEY)
    for index in range(len(genuine)):
        injected = genuine[:index] + [forged[index]] + genuine[index + 1 :]
        with pytest.raises(ProtocolError, match="failed authentication"):
            feed(FrameReader(AeadOpener(KEY)), b"".join(injected))


def test_plain_frames_cannot_pass_as_sealed_ones() -> None:
    with pytest.raises(ProtocolError):
        feed(FrameReader(AeadOpener(KEY)), wire(PlainSealer(), [Sent(TASK, b"x" * 40, [])]))


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, (1 << 30) + 1])
def test_an_oversized_length_is_refused_on_the_header_alone(length: int) -> None:
    reader = FrameReader(AeadOpener(KEY))
    header = FRAME_HEADER.pack(length)
    tracemalloc.start()
    try:
        feed(reader, header[:7])  # seven bytes: not a header yet
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            feed(reader, header[7:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # nothing the size of the announced frame was allocated


def test_max_frame_is_inclusive() -> None:
    reader = FrameReader(AeadOpener(KEY), max_frame=1000)
    assert feed(reader, FRAME_HEADER.pack(1000)) == []  # accepted: waits for the body

    with pytest.raises(ProtocolError, match="frame of 1001 bytes exceeds the limit of 1000"):
        feed(FrameReader(AeadOpener(KEY), max_frame=1000), FRAME_HEADER.pack(1001))


def test_a_large_frame_within_the_limit_is_accepted() -> None:
    body = random.Random(1).randbytes(300_000)  # larger than the reader's 256 KiB buffer
    frame_length = HEAD.size + len(body) + TAG_SIZE

    reader = FrameReader(AeadOpener(KEY), max_frame=frame_length)
    (message,) = feed(reader, wire(AeadSealer(KEY), [Sent(TASK, body, [])]))
    assert digest(message.body) == digest(body)

    with pytest.raises(ProtocolError, match="exceeds the limit"):
        feed(FrameReader(AeadOpener(KEY), max_frame=frame_length - 1), wire(AeadSealer(KEY), [Sent(TASK, body, [])]))


def seal(*plaintexts: bytes, key: bytes = KEY) -> bytes:
    """Seal raw frame plaintexts (not necessarily valid message heads) into a stream."""
    sealer = AeadSealer(key)
    return b"".join(bytes(buf) for plain in plaintexts for buf in sealer.frame(plain))


def test_a_head_announcing_too_many_buffers_is_refused() -> None:
    head = HEAD.pack(TASK, MAX_BUFFERS + 1) + bytes(SIZE.size * (MAX_BUFFERS + 1))

    with pytest.raises(ProtocolError, match="announces 4097 buffers"):
        feed(FrameReader(AeadOpener(KEY)), seal(head))


@pytest.mark.parametrize("sizes", [[2**63, 2**63], [2**64 - 1], [(1 << 34) + 1]])
def test_a_head_announcing_too_many_buffer_bytes_is_refused_before_allocating(sizes: list[int]) -> None:
    head = HEAD.pack(TASK, len(sizes)) + b"".join(SIZE.pack(s) for s in sizes)
    stream = seal(head)
    reader = FrameReader(AeadOpener(KEY))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="bytes of buffers, more than the limit"):
            feed(reader, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_max_message_bounds_the_sum_of_the_buffers() -> None:
    fits = [Sent(TASK, b"", [b"a" * 60, b"b" * 40])]
    too_big = [Sent(TASK, b"", [b"a" * 60, b"b" * 41])]

    assert len(feed(FrameReader(AeadOpener(KEY), max_message=100), wire(AeadSealer(KEY), fits))) == 1
    with pytest.raises(ProtocolError, match="101 bytes of buffers, more than the limit of 100"):
        feed(FrameReader(AeadOpener(KEY), max_message=100), wire(AeadSealer(KEY), too_big))


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE - 1])
def test_a_sealed_frame_shorter_than_its_tag_is_refused_on_the_header(length: int) -> None:
    with pytest.raises(ProtocolError, match="shorter than its tag"):
        feed(FrameReader(AeadOpener(KEY)), FRAME_HEADER.pack(length))


@pytest.mark.parametrize(
    ("plaintexts", "error"),
    [
        ((b"",), "message head of 0 bytes is too short"),
        ((b"\x03\x00",), "message head of 2 bytes is too short"),
        ((HEAD.pack(TASK, 2) + SIZE.pack(5),), "shorter than its buffer table"),
        ((HEAD.pack(TASK, 1) + SIZE.pack(10), b"x" * 9), "buffer chunk of 9 bytes where 10 were expected"),
        ((HEAD.pack(TASK, 1) + SIZE.pack(10), b"x" * 11), "buffer chunk of 11 bytes where 10 were expected"),
        ((HEAD.pack(TASK, 1) + SIZE.pack(CHUNK + 1), b"x" * (CHUNK + 1)), "where 1048576 were expected"),
    ],
    ids=["empty-head", "short-head", "short-table", "short-chunk", "long-chunk", "chunk-over-CHUNK"],
)
def test_malformed_frames_are_refused(plaintexts: tuple[bytes, ...], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        feed(FrameReader(AeadOpener(KEY)), seal(*plaintexts))
    # The same holds without sealing, between a node and its workers.
    plain = b"".join(FRAME_HEADER.pack(len(p)) + p for p in plaintexts)
    with pytest.raises(ProtocolError, match=error):
        feed(FrameReader(PlainOpener()), plain)


@pytest.mark.timeout(30)
@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=3000), data=st.data())
def test_garbage_never_opens_as_a_sealed_message(garbage: bytes, data: st.DataObject) -> None:
    # A small max_frame keeps a random length field from allocating a gigabyte.
    reader = FrameReader(AeadOpener(KEY), max_frame=1 << 16)
    try:
        out = feed(reader, garbage, cut_points(data, len(garbage)))
    except ProtocolError:
        return
    assert out == []


@pytest.mark.timeout(30)
@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=3000), prefix=st.sampled_from([b"", wire(PlainSealer(), SMALL_STREAM)]))
def test_garbage_on_a_plain_stream_is_a_protocol_error_or_messages(garbage: bytes, prefix: bytes) -> None:
    reader = FrameReader(PlainOpener(), max_frame=1 << 16, max_message=1 << 16)
    try:
        out = feed(reader, prefix + garbage)
    except ProtocolError:
        return
    assert all(isinstance(m, Message) and 0 <= m.kind <= 255 for m in out)


# --------------------------------------------------------------------------- handshake


def one_record(reader: RecordReader, data: bytes) -> bytes:
    """Deliver ``data`` one byte at a time and return the single record it completes."""
    records = [rec for i in range(len(data)) for rec in reader.feed(data[i : i + 1])]
    assert len(records) == 1
    return records[0]


def payload(rec: bytes) -> bytes:
    """The payload of one complete handshake record (what the peer's RecordReader returns)."""
    (out,) = RecordReader(max_records=1).feed(rec)
    return out


@dataclass
class Handshake:
    """Both ends of one hand-driven handshake and the records they exchanged."""

    client: ClientHandshake
    node: ServerHandshake
    client_hello: bytes
    server_hello: bytes
    client_proof: bytes


def handshake() -> Handshake:
    """Run a complete, successful handshake (as node.py and connection.py do, minus sockets)."""
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    node_records = RecordReader(max_records=2)  # ClientHello, ClientProof
    client_records = RecordReader(max_records=1)  # ServerHello

    client_hello = one_record(node_records, client.hello())
    server_hello = one_record(client_records, node.on_client_hello(client_hello))
    client_proof = one_record(node_records, client.on_server_hello(server_hello))
    node.on_client_proof(client_proof)
    return Handshake(client, node, client_hello, server_hello, client_proof)


def test_the_same_key_gives_both_sides_matching_session_keys() -> None:
    hs = handshake()

    assert hs.client.keys is not None and hs.node.keys is not None
    assert hs.client.keys.send == hs.node.keys.recv  # client to node
    assert hs.client.keys.recv == hs.node.keys.send  # node to client
    assert hs.client.keys.send != hs.client.keys.recv
    assert len(hs.client.keys.send) == SESSION_KEY_SIZE
    assert KEY not in hs.client_hello + hs.server_hello + hs.client_proof
    # Each side also states the frame sealing: offered by the client, chosen by the node.
    assert hs.client.keys.peer_info == {**NODE_INFO, "seal": hs.client.keys.seal}
    assert hs.node.keys.peer_info == hs.node.client_info == {**CLIENT_INFO, "seal": ["aes-gcm", "hmac-sha256"]}
    assert hs.client.keys.seal == hs.node.keys.seal == "aes-gcm"


def test_frames_sealed_by_one_side_open_on_the_other() -> None:
    hs = handshake()
    assert hs.client.keys is not None and hs.node.keys is not None
    to_node = AeadSealer(hs.client.keys.send)
    node_reader = FrameReader(AeadOpener(hs.node.keys.recv))
    to_client = AeadSealer(hs.node.keys.send)
    client_reader = FrameReader(AeadOpener(hs.client.keys.recv))

    (task,) = feed(node_reader, wire(to_node, [Sent(TASK, b"work", [b"data"])]))
    (result,) = feed(client_reader, wire(to_client, [Sent(RESULT, b"done", [])]))

    assert (task.kind, task.body, task.buffers) == (TASK, b"work", [b"data"])
    assert (result.kind, result.body) == (RESULT, b"done")
    # Each direction has its own key: a frame reflected back to its sender does not open.
    with pytest.raises(ProtocolError):
        feed(FrameReader(AeadOpener(hs.client.keys.recv)), wire(AeadSealer(hs.client.keys.send), [Sent(PING, b"", [])]))


def test_two_handshakes_with_the_same_key_derive_different_session_keys() -> None:
    first, second = handshake(), handshake()
    assert first.client.keys is not None and second.client.keys is not None
    assert first.client.keys.send != second.client.keys.send


def test_session_keys_are_fresh_even_if_the_client_repeats_its_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(os, "urandom", lambda n: bytes(n))  # a client with a broken RNG
        client_a = ClientHandshake(KEY, CLIENT_INFO)
        client_b = ClientHandshake(KEY, CLIENT_INFO)
    assert client_a.hello() == client_b.hello()

    for client in (client_a, client_b):
        node = ServerHandshake(KEY, NODE_INFO)
        node.on_client_proof(payload(client.on_server_hello(payload(node.on_client_hello(payload(client.hello()))))))
    assert client_a.keys is not None and client_b.keys is not None

    # The node's fresh nonce salts the keys: no two sessions share a key, so no nonce repeats.
    assert client_a.keys.send != client_b.keys.send
    assert client_a.keys.recv != client_b.keys.recv


def test_the_framed_stream_may_follow_the_proof_in_the_same_read() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    node_records = RecordReader(max_records=2)
    (hello,) = node_records.feed(client.hello())
    proof = client.on_server_hello(payload(node.on_client_hello(hello)))
    assert client.keys is not None
    first_frames = wire(AeadSealer(client.keys.send), [Sent(PING, b"hi", [])])

    # The client writes its proof and its first message back to back; one recv gets both.
    (proof_record,) = node_records.feed(proof + first_frames)
    keys = node.on_client_proof(proof_record)

    assert node_records.leftover() == first_frames
    (ping,) = feed(FrameReader(AeadOpener(keys.recv)), node_records.leftover())
    assert ping.body == b"hi"


def test_a_wrong_key_fails_on_both_sides() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(OTHER_KEY, NODE_INFO)
    server_hello = node.on_client_hello(payload(client.hello()))

    with pytest.raises(AuthenticationError, match="node could not prove"):
        client.on_server_hello(payload(server_hello))
    assert client.keys is None

    # The client still sends a proof, so the node can log why the connection ended.
    failure = client.failure_proof()
    assert failure
    with pytest.raises(AuthenticationError, match="wrong key"):
        node.on_client_proof(payload(failure))
    assert node.keys is None


def test_failure_proof_is_empty_before_any_failure() -> None:
    assert ClientHandshake(KEY, CLIENT_INFO).failure_proof() == b""


def test_a_recorded_client_handshake_cannot_be_replayed() -> None:
    recorded = handshake()
    fresh_node = ServerHandshake(KEY, NODE_INFO)

    fresh_node.on_client_hello(recorded.client_hello)  # accepted: anyone may say hello
    with pytest.raises(AuthenticationError):
        fresh_node.on_client_proof(recorded.client_proof)  # but the node's nonce is new
    assert fresh_node.keys is None


def test_a_recorded_server_hello_cannot_be_replayed() -> None:
    recorded = handshake()
    fresh_client = ClientHandshake(KEY, CLIENT_INFO)
    fresh_client.hello()

    with pytest.raises(AuthenticationError):
        fresh_client.on_server_hello(recorded.server_hello)


def test_the_nodes_proof_cannot_be_reflected_as_the_clients() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    server_hello = payload(node.on_client_hello(payload(client.hello())))
    node_proof = server_hello[SERVER_HELLO.size - PROOF_SIZE : SERVER_HELLO.size]

    with pytest.raises(AuthenticationError):
        node.on_client_proof(node_proof)


def future_hello(client: ClientHandshake, version: int) -> bytes:
    """The client's hello as a client speaking another protocol version would send it."""
    hello = bytearray(payload(client.hello()))
    struct.pack_into("!H", hello, len(MAGIC), version)
    return bytes(hello)


def test_a_client_of_another_version_is_refused_by_name() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)

    with pytest.raises(VersionMismatchError) as node_error:
        node.on_client_hello(future_hello(client, PROTOCOL_VERSION + 1))
    assert f"version {PROTOCOL_VERSION}" in str(node_error.value)
    assert f"speaks {PROTOCOL_VERSION + 1}" in str(node_error.value)

    # The node sends its refusal record; the client turns it into the same error.
    assert node.refusal
    with pytest.raises(VersionMismatchError) as client_error:
        client.on_server_hello(payload(node.refusal))
    assert str(client_error.value) == str(node_error.value)


def test_a_node_of_another_version_is_refused_by_name() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    server_hello = bytearray(payload(node.on_client_hello(payload(client.hello()))))
    struct.pack_into("!H", server_hello, len(MAGIC), 7)

    with pytest.raises(VersionMismatchError, match=f"version 7, this side speaks {PROTOCOL_VERSION}"):
        client.on_server_hello(bytes(server_hello))


def test_a_short_refusal_is_still_a_version_mismatch() -> None:
    short = struct.pack("!4sHB", MAGIC, 9, 1) + b"too old"
    with pytest.raises(VersionMismatchError, match="too old"):
        ClientHandshake(KEY, CLIENT_INFO).on_server_hello(short)


def test_bad_magic_is_a_protocol_error_on_both_sides() -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    hello = payload(client.hello())
    server_hello = payload(node.on_client_hello(hello))

    with pytest.raises(ProtocolError, match="bad magic b'HTTP'"):
        ServerHandshake(KEY, NODE_INFO).on_client_hello(b"HTTP" + hello[4:])
    with pytest.raises(ProtocolError, match="bad magic b'SSH-'"):
        client.on_server_hello(b"SSH-" + server_hello[4:])


def test_an_oversized_record_is_refused() -> None:
    reader = RecordReader(max_records=2)
    with pytest.raises(ProtocolError, match=f"{MAX_RECORD + 1} bytes exceeds {MAX_RECORD}"):
        reader.feed(RECORD_HEADER.pack(MAX_RECORD + 1))  # on the header alone

    assert payload(record(b"x" * MAX_RECORD)) == b"x" * MAX_RECORD
    with pytest.raises(ProtocolError):
        record(b"x" * (MAX_RECORD + 1))
    with pytest.raises(ProtocolError):
        ClientHandshake(KEY, {"padding": "x" * MAX_RECORD}).hello()


def test_short_hellos_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="client hello of 10 bytes is too short"):
        ServerHandshake(KEY, NODE_INFO).on_client_hello(b"CLXC" + bytes(6))
    with pytest.raises(ProtocolError, match="node answered with a 3-byte hello"):
        ClientHandshake(KEY, CLIENT_INFO).on_server_hello(b"CLX")


def test_a_hello_whose_info_is_not_a_json_object_is_a_protocol_error() -> None:
    header = HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE))
    for info in (b"", b"[1, 2]", b"{", b"\xff\xfe\xfd"):
        with pytest.raises(ProtocolError, match="malformed control message"):
            ServerHandshake(KEY, NODE_INFO).on_client_hello(header + info)


def test_a_deeply_nested_info_in_a_client_hello_is_a_protocol_error() -> None:
    hello = HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)) + b"[" * 3000
    assert payload(record(hello)) == hello  # fits in one record

    with pytest.raises(ProtocolError):
        ServerHandshake(KEY, NODE_INFO).on_client_hello(hello)


HANDSHAKE_ERRORS = (ProtocolError, VersionMismatchError, AuthenticationError)


@settings(max_examples=300, deadline=None)
@given(
    hello=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda version, nonce, info: HELLO.pack(MAGIC, version, nonce) + info,
            st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 0xFFFF]),
            st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
            st.one_of(st.binary(max_size=100), st.sampled_from([b"{}", b'{"a":1}', b"null", b"[]"])),
        ),
    ),
    proof=st.binary(max_size=40),
)
def test_random_client_records_never_raise_anything_but_handshake_errors(hello: bytes, proof: bytes) -> None:
    node = ServerHandshake(KEY, NODE_INFO)
    try:
        node.on_client_hello(hello)
    except HANDSHAKE_ERRORS:
        pass
    with pytest.raises(AuthenticationError):
        node.on_client_proof(proof)
    assert node.keys is None


@settings(max_examples=300, deadline=None)
@given(server_hello=st.binary(max_size=300))
def test_random_server_hellos_never_raise_anything_but_handshake_errors(server_hello: bytes) -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    with pytest.raises(HANDSHAKE_ERRORS):
        client.on_server_hello(server_hello)
    assert client.keys is None


@settings(max_examples=200, deadline=None)
@given(side=st.sampled_from(["client hello", "server hello"]), data=st.data())
def test_a_bit_flipped_in_either_hello_fails_the_handshake(side: str, data: st.DataObject) -> None:
    client = ClientHandshake(KEY, CLIENT_INFO)
    node = ServerHandshake(KEY, NODE_INFO)
    hello = bytearray(payload(client.hello()))
    if side == "client hello":
        bit = data.draw(st.integers(0, len(hello) * 8 - 1), label="bit")
        hello[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(HANDSHAKE_ERRORS):
        server_hello = bytearray(payload(node.on_client_hello(bytes(hello))))
        if side == "server hello":
            bit = data.draw(st.integers(0, len(server_hello) * 8 - 1), label="bit")
            server_hello[bit // 8] ^= 1 << (bit % 8)
        proof = client.on_server_hello(bytes(server_hello))
        node.on_client_proof(payload(proof))
    assert client.keys is None and node.keys is None


def test_hkdf_matches_rfc_5869() -> None:
    # RFC 5869, test case 1 (the first 32 bytes of its 42-byte OKM).
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(13))
    info = bytes(range(0xF0, 0xFA))
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")

    assert hkdf(ikm, salt, info, size=32) == okm
    assert hkdf(ikm, salt, info) == okm[:SESSION_KEY_SIZE]
    reference = HKDF(algorithm=hashes.SHA256(), length=SESSION_KEY_SIZE, salt=salt, info=info)
    assert hkdf(ikm, salt, info) == reference.derive(ikm)


def test_hkdf_gives_the_size_asked_for() -> None:
    ikm, salt, info = bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA))
    okm = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"

    assert hkdf(ikm, salt, info, size=42).hex() == okm


# --------------------------------------------------------------------------- small helpers


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_ids_round_trip(ids: list[int]) -> None:
    body = pack_ids(ids)
    assert len(body) == 8 * len(ids)
    assert unpack_ids(body) == ids
    assert unpack_ids(memoryview(body)) == ids  # a received Message.body is a memoryview


@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_a_ragged_id_list_is_a_protocol_error(length: int) -> None:
    with pytest.raises(ProtocolError, match="not a multiple of 8"):
        unpack_ids(bytes(length))


@given(st.lists(st.integers(0, 2**64 - 1), max_size=20), st.lists(st.integers(0, 2**64 - 1), max_size=20))
def test_cancelled_replies_round_trip(cancelled: list[int], refused: list[int]) -> None:
    assert unpack_cancelled(pack_cancelled(cancelled, refused)) == (cancelled, refused)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "too short"),
        (b"\x00\x00\x01", "too short"),
        (struct.pack("!I", 2) + pack_ids([1]), "counts more ids than it holds"),
        (struct.pack("!I", 0) + b"\x00" * 5, "not a multiple of 8"),
    ],
)
def test_a_malformed_cancelled_reply_is_a_protocol_error(body: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        unpack_cancelled(body)


def test_json_control_bodies_round_trip() -> None:
    request = {"workers": 4, "env": {"A": "1"}, "tags": ["x", "y"], "none": None}
    assert unpack_json(pack_json(request)) == request
    assert unpack_json(memoryview(pack_json(request))) == request


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b"42", b"null", b"{} {}"],
)
def test_a_malformed_json_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed control message"):
        unpack_json(body)


@pytest.mark.parametrize("body", [b"[" * 3000, b'{"a":' * 3000])
def test_a_deeply_nested_json_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_json(body)


# --------------------------------------------------------------------------- channels


def nonblocking_socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.mark.timeout(30)
def test_channel_moves_a_20mb_buffer_between_nonblocking_sockets() -> None:
    a, b = nonblocking_socketpair()
    key = os.urandom(16)
    writer = Channel(a, AeadSealer(key), AeadOpener(os.urandom(16)))
    reader = Channel(b, AeadSealer(os.urandom(16)), AeadOpener(key))
    payload = random.Random(20).randbytes(20 << 20)
    try:
        writer.send(TASK, b"task", [payload])
        writer.send(PING, b"after")
        assert writer.wants_write
        assert writer.queued_bytes == 0  # nothing is sealed until flush

        out: list[Message] = []
        while len(out) < 2:
            readable, writable, _ = select.select([b], [a] if writer.wants_write else [], [], 10)
            assert readable or writable, "the channels stalled"
            if writable:
                writer.flush()
                # Sealing is lazy: at most HIGH_WATER (plus the frame that crossed it) waits.
                assert writer.queued_bytes <= HIGH_WATER + CHUNK + TAG_SIZE + FRAME_HEADER.size
            if readable:
                out.extend(reader.read())

        assert not writer.wants_write and writer.flush()
        task, ping = out
        assert (task.kind, task.body, ping.kind, ping.body) == (TASK, b"task", PING, b"after")
        assert [digest(buf) for buf in task.buffers] == [digest(payload)]
    finally:
        writer.close()
        reader.close()


def test_channel_reports_a_closed_peer() -> None:
    a, b = nonblocking_socketpair()
    reader = Channel(b, PlainSealer(), PlainOpener())
    try:
        assert reader.read() == []  # nothing yet: not an error
        a.close()
        with pytest.raises(ConnectionClosed):
            reader.read()
    finally:
        reader.close()


def test_channel_raises_protocol_error_on_a_tampered_frame() -> None:
    a, b = nonblocking_socketpair()
    reader = Channel(b, AeadSealer(KEY), AeadOpener(KEY))
    try:
        stream = bytearray(wire(AeadSealer(KEY), [Sent(TASK, b"payload", [])]))
        stream[-1] ^= 1
        a.sendall(stream)
        select.select([b], [], [], 5)
        with pytest.raises(ProtocolError):
            reader.read()
    finally:
        a.close()
        reader.close()


@pytest.mark.timeout(30)
def test_blocking_channels_talk_request_reply_across_threads() -> None:
    node_side, worker_side = socket.socketpair()
    errors: list[BaseException] = []

    def worker() -> None:
        """Echo every message back until STOP, as a worker process answers its node."""
        channel = BlockingChannel(worker_side, PlainSealer(), PlainOpener())
        try:
            while True:
                message = channel.receive()
                if message.kind == STOP:
                    return
                channel.send(RESULT, message.body, message.buffers)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)
        finally:
            worker_side.close()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    node = BlockingChannel(node_side, PlainSealer(), PlainOpener())
    try:
        payload = random.Random(5).randbytes(5 * CHUNK + 3)
        for body, buffers in [(b"small", []), (b"big", [payload, b"", b"x"]), (b"", [b"y"] * 100)]:
            node.send(TASK, body, buffers)
            reply = node.receive()
            assert (reply.kind, bytes(reply.body)) == (RESULT, body)
            assert [digest(b) for b in reply.buffers] == [digest(b) for b in buffers]
        assert not node.has_pending()

        node.send(STOP)
        thread.join(10)
        assert not thread.is_alive() and errors == []
        with pytest.raises(ConnectionClosed):
            node.receive()
    finally:
        node_side.close()


@pytest.mark.timeout(30)
def test_a_handshake_then_sealed_channels_over_a_socketpair() -> None:
    """The whole story, as connection.py (client) and node.py (node) tell it, with real sockets."""
    client_sock, node_sock = socket.socketpair()
    client_sock.settimeout(10)
    node_sock.settimeout(10)
    errors: list[BaseException] = []

    def node() -> None:
        """Handshake, then answer one message on a non-blocking Channel."""
        try:
            hs = ServerHandshake(KEY, NODE_INFO)
            records = RecordReader(max_records=2)
            got: list[bytes] = []
            while len(got) < 2:
                data = node_sock.recv(4096)
                assert data, "the client left during the handshake"
                for rec in records.feed(data):
                    got.append(rec)
                    if len(got) == 1:
                        node_sock.sendall(hs.on_client_hello(rec))
            keys = hs.on_client_proof(got[1])
            channel = Channel(node_sock, AeadSealer(keys.send), AeadOpener(keys.recv))
            node_sock.setblocking(False)
            # The client sent its first frames right behind its proof: one recv got both.
            leftover = records.leftover()
            assert leftover
            out = channel.feed_initial(leftover)
            while not out:
                select.select([node_sock], [], [], 10)
                out.extend(channel.read())
            (message,) = out
            channel.send(RESULT, bytes(message.body)[::-1], message.buffers)
            while not channel.flush():
                select.select([], [node_sock], [], 10)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    thread = threading.Thread(target=node, daemon=True)
    thread.start()
    try:
        client = ClientHandshake(KEY, CLIENT_INFO)
        client_sock.sendall(client.hello())
        records = RecordReader(max_records=1)
        server_hello: list[bytes] = []
        while not server_hello:
            server_hello = records.feed(client_sock.recv(4096))
        proof = client.on_server_hello(server_hello[0])
        assert client.keys is not None and client.keys.peer_info == {**NODE_INFO, "seal": "aes-gcm"}
        assert records.leftover() == b""  # the node says nothing more until it is asked

        # Pipeline: the first message goes out in the same write as the proof.
        sealer = AeadSealer(client.keys.send)
        first = encode_message(sealer, TASK, b"abc", [bytes(CHUNK + 1)])
        client_sock.sendall(proof + b"".join(bytes(f) for f in first))
        channel = BlockingChannel(client_sock, sealer, AeadOpener(client.keys.recv))
        reply = channel.receive()
        assert (reply.kind, reply.body) == (RESULT, b"cba")
        assert [digest(b) for b in reply.buffers] == [digest(bytes(CHUNK + 1))]
        thread.join(10)
        assert errors == []
    finally:
        client_sock.close()
        node_sock.close()


# --------------------------------------------------------------------------- HMAC sealing


def test_hmac_sealing_round_trips_and_detects_tampering() -> None:
    from clusterexec.wire.sealing import HmacOpener, HmacSealer

    big = bytes(range(256)) * 5000  # more than one chunk
    stream = b"".join(bytes(b) for b in encode_message(HmacSealer(KEY), TASK, b"body", [big]))
    reader = FrameReader(HmacOpener(KEY))
    messages = feed(reader, stream)
    assert [(m.kind, bytes(m.body), [bytes(b) for b in m.buffers]) for m in messages] == [(TASK, b"body", [big])]

    tampered = bytearray(stream)
    tampered[len(stream) // 2] ^= 1
    with pytest.raises(ProtocolError):
        feed(FrameReader(HmacOpener(KEY)), bytes(tampered))


def test_a_client_without_aes_gcm_gets_hmac_sealing() -> None:
    from clusterexec.wire import handshake as protocol

    client = ClientHandshake(KEY, CLIENT_INFO)
    client._seals = ["hmac-sha256"]  # as on an interpreter without the cryptography package
    client._hello = protocol.HELLO.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, client._nonce) + protocol.pack_json(
        {**CLIENT_INFO, "seal": client._seals}
    )
    node = ServerHandshake(KEY, NODE_INFO)
    proof = client.on_server_hello(node.on_client_hello(client.hello()[2:])[2:])
    node.on_client_proof(proof[2:])
    assert client.keys is not None and node.keys is not None
    assert client.keys.seal == node.keys.seal == "hmac-sha256"
    frame = b"".join(bytes(b) for b in encode_message(client.keys.sealer(), PING))
    assert [m.kind for m in feed(FrameReader(node.keys.opener()), frame)] == [PING]
