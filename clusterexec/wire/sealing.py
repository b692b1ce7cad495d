"""Sealing frames: AES-GCM (the default), HMAC-SHA256 (when cryptography is missing), or none.

Each direction of a connection has its own key and a frame counter. The counter is the nonce
(AES-GCM) or is MACed with the frame (HMAC), and the frame's length header is authenticated
with it, so a frame that is altered, dropped, replayed, reordered or injected fails to open.
AES-GCM also encrypts. HMAC-SHA256 only authenticates; it is used when the cryptography
package cannot be imported (a node started over SSH on a host with nothing installed, where the
SSH tunnel already encrypts). Plain framing is for a node's own workers, on a socketpair.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Protocol

from clusterexec.errors import ProtocolError

Buffer = bytes | bytearray | memoryview

FRAME_HEADER = struct.Struct("!Q")
TAG_SIZE = 16
GCM_NONCE = struct.Struct("!IQ")
SEQ = struct.Struct("!Q")

AES_GCM = "aes-gcm"
HMAC_SHA256 = "hmac-sha256"

try:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # pragma: no cover - exercised by nodes started over SSH
    AESGCM = None  # type: ignore[assignment,misc]


def available_seals() -> list[str]:
    """The sealing methods this interpreter supports, best first."""
    return [AES_GCM, HMAC_SHA256] if AESGCM is not None else [HMAC_SHA256]


class Sealer(Protocol):
    """Turns plaintext into one wire frame (header included), in order."""

    overhead: int

    def frame(self, plain: Buffer) -> list[Buffer]:
        """Return the buffers of one frame carrying ``plain``."""
        ...


class Opener(Protocol):
    """Checks and opens the frames of one direction, in order."""

    overhead: int

    def open(self, header: Buffer, body: Buffer) -> bytearray:
        """Return the plaintext of a frame; raise ProtocolError if it does not verify."""
        ...

    def open_into(self, header: Buffer, body: Buffer, out: memoryview) -> None:
        """Write the plaintext of a frame into ``out``; raise ProtocolError if it fails."""
        ...


def _failed(seq: int) -> ProtocolError:
    return ProtocolError(f"frame {seq} failed authentication (altered, replayed, reordered or dropped)")


class AeadSealer:
    """AES-GCM sealing of one direction: nonce is the frame counter, header is the AAD."""

    overhead = TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key[:16])
        self._seq = 0
        # Frame buffers of the largest size (a full buffer chunk), given back by the channel
        # once written: sealing 64 MB then reuses a few of them instead of faulting in new memory.
        self.spare: list[bytearray] = []

    def frame(self, plain: Buffer) -> list[Buffer]:
        """Seal ``plain`` into a frame buffer (a spare one when it fits exactly)."""
        n = len(plain) + TAG_SIZE
        spare = self.spare
        if spare and len(spare[-1]) == FRAME_HEADER.size + n:
            out = spare.pop()
        else:
            out = bytearray(FRAME_HEADER.size + n)
        FRAME_HEADER.pack_into(out, 0, n)
        view = memoryview(out)
        nonce = GCM_NONCE.pack(0, self._seq)
        self._aead.encrypt_into(nonce, plain, view[: FRAME_HEADER.size], view[FRAME_HEADER.size :])
        self._seq += 1
        return [out]


class AeadOpener:
    """AES-GCM opening of one direction; any failure is a ProtocolError."""

    overhead = TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key[:16])
        self._seq = 0

    def open(self, header: Buffer, body: Buffer) -> bytearray:
        """Verify and decrypt one frame body."""
        if len(body) < TAG_SIZE:
            raise ProtocolError(f"frame of {len(body)} bytes is shorter than its tag")
        out = bytearray(len(body) - TAG_SIZE)
        self.open_into(header, body, memoryview(out))
        return out

    def open_into(self, header: Buffer, body: Buffer, out: memoryview) -> None:
        """Verify and decrypt one frame body into ``out``."""
        try:
            self._aead.decrypt_into(GCM_NONCE.pack(0, self._seq), body, header, out)
        except Exception as exc:  # InvalidTag, or a size mismatch
            raise _failed(self._seq) from exc
        self._seq += 1


def _hmac_tag(key: bytes, seq: int, header: Buffer, plain: Buffer) -> bytes:
    mac = hmac.new(key, SEQ.pack(seq), hashlib.sha256)
    mac.update(header)
    mac.update(plain)
    return mac.digest()[:TAG_SIZE]


class HmacSealer:
    """HMAC-SHA256 sealing of one direction: authenticates (counter, header, plaintext)."""

    overhead = TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def frame(self, plain: Buffer) -> list[Buffer]:
        """Return the header, the plaintext (not copied) and its tag."""
        header = FRAME_HEADER.pack(len(plain) + TAG_SIZE)
        tag = _hmac_tag(self._key, self._seq, header, plain)
        self._seq += 1
        return [header, plain, tag]


class HmacOpener:
    """HMAC-SHA256 opening of one direction; a bad tag is a ProtocolError."""

    overhead = TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def _check(self, header: Buffer, body: Buffer) -> memoryview:
        view = memoryview(body)
        if len(view) < TAG_SIZE:
            raise ProtocolError(f"frame of {len(view)} bytes is shorter than its tag")
        plain, tag = view[:-TAG_SIZE], view[-TAG_SIZE:]
        if not hmac.compare_digest(_hmac_tag(self._key, self._seq, header, plain), tag):
            raise _failed(self._seq)
        self._seq += 1
        return plain

    def open(self, header: Buffer, body: Buffer) -> bytearray:
        """Verify one frame body; return a copy of its plaintext."""
        return bytearray(self._check(header, body))

    def open_into(self, header: Buffer, body: Buffer, out: memoryview) -> None:
        """Verify one frame body; copy its plaintext into ``out``."""
        plain = self._check(header, body)
        if len(plain) != len(out):
            raise ProtocolError(f"frame of {len(plain)} bytes where {len(out)} were expected")
        out[:] = plain


class PlainSealer:
    """Unsealed framing, for the socketpair between a node and its own workers."""

    overhead = 0

    def frame(self, plain: Buffer) -> list[Buffer]:
        """Return the header and the plaintext as they are (no copy)."""
        return [FRAME_HEADER.pack(len(plain)), plain]


class PlainOpener:
    """Unsealed framing, the reading side."""

    overhead = 0

    def open(self, header: Buffer, body: Buffer) -> bytearray:
        """Return a copy of the body."""
        return bytearray(body)

    def open_into(self, header: Buffer, body: Buffer, out: memoryview) -> None:
        """Copy the body into ``out``."""
        out[:] = body


def sealer_for(seal: str, key: bytes) -> Sealer:
    """The sealer of one direction for a negotiated method."""
    if seal == AES_GCM and AESGCM is not None:
        return AeadSealer(key)
    if seal == HMAC_SHA256:
        return HmacSealer(key)
    raise ProtocolError(f"unsupported frame sealing {seal!r}")


def opener_for(seal: str, key: bytes) -> Opener:
    """The opener of one direction for a negotiated method."""
    if seal == AES_GCM and AESGCM is not None:
        return AeadOpener(key)
    if seal == HMAC_SHA256:
        return HmacOpener(key)
    raise ProtocolError(f"unsupported frame sealing {seal!r}")
