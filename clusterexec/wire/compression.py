"""Optional compression of payloads between the client and the workers (``compression=``).

The node routes messages by their heads (task id, function digest) and never looks into a
payload, so compression is end to end: the client compresses the payloads of TASK, FUNC and
MODULES, the worker decompresses them; the worker compresses RESULT payloads, the client
decompresses them. Each side compresses only when the session negotiated a codec, and each
message says for itself whether it is compressed, so mixed traffic works.

A payload is a pickle stream (the body) and its out-of-band buffers. Our pickle streams are
protocol 5 and begin with the PROTO opcode (0x80); a *packed* payload begins with
:data:`PACKED_MARK` instead, then names its codec and, for the body and each buffer in order,
whether that piece is compressed and its size once decompressed::

    mark: u8, codec: u8, then (1 + nbuf) x (compressed: u8, size: u64), then the body

Pieces under :data:`COMPRESS_MIN` bytes are sent as they are, and so is any piece that does not
shrink. Buffers stay separate buffers, so they still travel in chunks and are decompressed
straight into their final, writable block; the declared sizes bound what decompression may
produce.
"""

from __future__ import annotations

import importlib
import mmap
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from clusterexec.errors import ConfigurationError, ProtocolError
from clusterexec.wire.frames import CHUNK, DEFAULT_MAX_MESSAGE, alloc_buffer

CODECS = ("zlib", "bz2", "lzma")
# EasyCluster's spellings, accepted in node specs (``compress=1``).
ALIASES = {"1": "zlib", "yes": "zlib", "true": "zlib", "on": "zlib"}
OFF = ("0", "no", "false", "off", "none")
# Pieces smaller than this are not worth a codec's fixed cost.
COMPRESS_MIN = 4096
# A piece larger than TRIAL_MIN is compressed only if its first TRIAL bytes shrink by TRIAL_GAIN:
# random or already-compressed data is not run through the codec in full for nothing.
TRIAL = 64 * 1024
TRIAL_MIN = 4 * TRIAL
TRIAL_GAIN = 0.9
PACKED_MARK = 0xC7
PACKED_HEAD = struct.Struct("!BB")
PIECE = struct.Struct("!BQ")
CODEC_IDS = {name: number for number, name in enumerate(CODECS, start=1)}
# Fast settings: a wire codec has to keep up with the network.
LEVELS = {"zlib": {"level": 1}, "bz2": {"compresslevel": 9}, "lzma": {"preset": 1}}


class _Decompressor(Protocol):
    eof: bool

    def decompress(self, data: Any, max_length: int = ...) -> bytes: ...


def check_codec(value: object, where: str = "compression") -> str | None:
    """The codec named by ``value`` ("zlib", "bz2", "lzma"; None or an off word for none).

    Raises ConfigurationError (a ValueError) naming the valid choices for anything else, or
    for a codec this Python was built without."""
    if value is None or value is False:
        return None
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in OFF:
        return None
    codec = ALIASES.get(text or "", text)
    if codec not in CODECS:
        choices = ", ".join(repr(c) for c in CODECS)
        raise ConfigurationError(f"{where}={value!r} is not a compression codec; use one of {choices}, or None")
    if not codec_available(codec):
        raise ConfigurationError(f"{where}={codec!r}: this Python was built without the {codec} module; use 'zlib'")
    return codec


def codec_available(codec: str) -> bool:
    """True if ``codec`` is one of :data:`CODECS` and this Python has its module."""
    if codec not in CODECS:
        return False
    try:
        importlib.import_module(codec)
    except ImportError:
        return False
    return True


def _compressor(codec: str) -> Callable[[Any], bytes]:
    module = importlib.import_module(codec)
    options = LEVELS[codec]
    return lambda data: module.compress(data, **options)


def _decompressor(codec: str) -> _Decompressor:
    module: Any = importlib.import_module(codec)
    if codec == "zlib":
        return module.decompressobj()
    if codec == "bz2":
        return module.BZ2Decompressor()
    return module.LZMADecompressor()


def _shrunk(compress: Callable[[Any], bytes], data: memoryview) -> bytes | None:
    """``data`` compressed, or None if it is too small or does not shrink."""
    size = data.nbytes
    if size < COMPRESS_MIN:
        return None
    if size >= TRIAL_MIN and len(compress(data[:TRIAL])) > TRIAL * TRIAL_GAIN:
        return None
    packed = compress(data)
    return packed if len(packed) < size else None


def pack(body: Any, buffers: Sequence[Any], codec: str) -> tuple[Any, list[Any]]:
    """A payload (pickle ``body`` and its ``buffers``) compressed with ``codec`` where it pays.

    Returns ``body`` and ``buffers`` themselves (the same objects) when no piece shrank, so a
    caller can tell with ``is``. Blocks for the time the codec takes (tens of ms per 10 MB
    with zlib)."""
    compress = _compressor(codec)
    views = [_flat(body), *(_flat(b) for b in buffers)]
    packed = [_shrunk(compress, view) for view in views]
    if not any(p is not None for p in packed):
        return body, list(buffers)
    head = bytearray(PACKED_HEAD.pack(PACKED_MARK, CODEC_IDS[codec]))
    for view, piece in zip(views, packed, strict=True):
        head += PIECE.pack(piece is not None, view.nbytes)
    head += packed[0] if packed[0] is not None else views[0]
    out = [piece if piece is not None else buf for buf, piece in zip(buffers, packed[1:], strict=True)]
    return bytes(head), out


def is_packed(body: Any) -> bool:
    """True if ``body`` begins a packed payload (see the module docstring)."""
    view = _flat(body)
    return view.nbytes > 0 and view[0] == PACKED_MARK


def unpack(body: Any, buffers: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The plain payload of a packed one; a plain payload comes back as it is.

    Raises ProtocolError for an unknown codec, a table that does not match the buffers, or a
    piece that does not decompress to exactly its declared size."""
    if not is_packed(body):
        return body, list(buffers)
    view = _flat(body)
    count = 1 + len(buffers)
    table_end = PACKED_HEAD.size + count * PIECE.size
    if view.nbytes < table_end:
        raise ProtocolError("packed payload is shorter than its table")
    _, codec_id = PACKED_HEAD.unpack_from(view, 0)
    codec = CODECS[codec_id - 1] if 0 < codec_id <= len(CODECS) else None
    if codec is None or not codec_available(codec):
        raise ProtocolError(f"packed payload uses codec {codec or codec_id!r}, which this side cannot decompress")
    table = [PIECE.unpack_from(view, PACKED_HEAD.size + i * PIECE.size) for i in range(count)]
    if sum(size for _, size in table) > DEFAULT_MAX_MESSAGE:
        raise ProtocolError("packed payload declares more bytes than a message may hold")
    pieces = [view[table_end:], *(_flat(b) for b in buffers)]
    plain = [
        _inflate(codec, piece, size) if compressed else piece
        for piece, (compressed, size) in zip(pieces, table, strict=True)
    ]
    return plain[0], plain[1:]


def _inflate(codec: str, data: memoryview, size: int) -> bytearray | mmap.mmap:
    """Decompress ``data`` into a fresh writable block of exactly ``size`` bytes."""
    out = alloc_buffer(size)
    target = memoryview(out)
    decompressor = _decompressor(codec)
    filled = 0
    tail: Any = data
    while not decompressor.eof:
        piece = decompressor.decompress(tail, CHUNK)
        # zlib hands back the input it did not consume yet; bz2 and lzma keep it themselves.
        tail = getattr(decompressor, "unconsumed_tail", b"")
        if filled + len(piece) > size:
            raise ProtocolError(f"a compressed piece decompresses to more than its declared {size} bytes")
        target[filled : filled + len(piece)] = piece
        filled += len(piece)
        if not piece and not tail and getattr(decompressor, "needs_input", True):
            break
    if not decompressor.eof or filled != size:
        raise ProtocolError(f"a compressed piece is truncated ({filled} of its declared {size} bytes)")
    return out


def _flat(buf: Any) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view

