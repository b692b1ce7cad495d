"""The handshake: mutual challenge-response, then the session keys. Pure: no sockets.

The handshake is a mutual challenge-response over length-prefixed records (u16 length):
``ClientHello`` (magic, version, client nonce, info), ``ServerHello`` (magic, version, status,
server nonce, node proof, info), ``ClientProof``. Each proof is an HMAC-SHA256 under the shared
key of a label and the whole transcript, so neither side sends the key, a recorded handshake
cannot be replayed (the other side's nonce is fresh), and the two proofs cannot be reflected.
Both nonces then derive one key per direction (HKDF), and the seal the two sides agree on
(:mod:`clusterexec.wire.sealing`) protects every frame after it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from clusterexec.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterexec.wire.messages import pack_json, unpack_json
from clusterexec.wire.sealing import Opener, Sealer, available_seals, opener_for, sealer_for

MAGIC = b"CLXC"
PROTOCOL_VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32
SESSION_KEY_SIZE = 32
MAX_RECORD = 4096
HANDSHAKE_TIMEOUT = 10.0
RECORD_HEADER = struct.Struct("!H")
HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s")
SERVER_HELLO = struct.Struct(f"!4sHB{NONCE_SIZE}s{PROOF_SIZE}s")
STATUS_REFUSED = 1
STATUS_ACCEPTED = 0


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
