"""Message kinds and the heads and bodies of messages. Pure: no sockets.

Every message has a :class:`Kind`; its body starts with the head its kind calls for
(``TASK_HEAD``, ``RESULT_HEAD``...) or is a small JSON object. Kinds are plain ints on the wire
and in :class:`~clusterexec.wire.frames.Message`; a table keyed by :class:`Kind` members
dispatches them (an ``IntEnum`` hashes as its int), and :func:`kind_name` names any of them,
an unknown one included, for logs and errors.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence

from clusterexec.errors import ProtocolError
from clusterexec.wire.sealing import Buffer


class Kind(enum.IntEnum):
    """Every message kind, by direction."""

    # Client to node.
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
    SHARE = 29  # the session's share of the node's run slots changed: {"share": n}
    REFUSED = 30  # in place of WELCOME: the node will not open the session (it is full)
    # Node to worker (TASK, FUNC, FORGET and MODULES are forwarded as they came).
    INIT = 40
    STOP = 41
    # Worker to node (RESULT is forwarded as it came).
    INIT_FAILED = 42


_NAMES = {kind.value: kind.name for kind in Kind}


def kind_name(kind: int) -> str:
    """The name of a message kind for logs and errors (``RESULT``, or ``unknown kind 99``)."""
    return _NAMES.get(kind, f"unknown kind {kind}")


def unexpected(kind: int, where: str) -> ProtocolError:
    """The error for a message of a kind that ``where`` does not take."""
    return ProtocolError(f"unexpected message {kind_name(kind)} {where}")


# The kinds by their names, for the modules that send and match them.
SESSION = Kind.SESSION
FUNC = Kind.FUNC
TASK = Kind.TASK
CANCEL = Kind.CANCEL
FORGET = Kind.FORGET
BYE = Kind.BYE
PING = Kind.PING
MODULES = Kind.MODULES
STATUS = Kind.STATUS
SIGNAL_WORKERS = Kind.SIGNAL_WORKERS
WELCOME = Kind.WELCOME
STARTED = Kind.STARTED
RESULT = Kind.RESULT
CANCELLED = Kind.CANCELLED
CRASHED = Kind.CRASHED
HEARTBEAT = Kind.HEARTBEAT
BROKEN = Kind.BROKEN
STATUS_REPLY = Kind.STATUS_REPLY
OUTPUT = Kind.OUTPUT
SHARE = Kind.SHARE
REFUSED = Kind.REFUSED
INIT = Kind.INIT
STOP = Kind.STOP
INIT_FAILED = Kind.INIT_FAILED

TASK_HEAD = struct.Struct("!Q16sB")  # task id, function digest, flags
RESULT_HEAD = struct.Struct("!QBI")  # task id, status, the task's run time on its worker (microseconds)
OUTPUT_HEAD = struct.Struct("!BI")  # stream (1 stdout, 2 stderr), worker pid
TASK_ID = struct.Struct("!Q")
SIGNAL_HEAD = struct.Struct("!B")  # how to stop the session's workers: WORKERS_TERMINATE or WORKERS_KILL

# TASK flags.
FLAG_CHUNK = 1
FLAG_TIMEOUT = 2  # TIMEOUT_HEAD follows TASK_HEAD: the node kills a worker running it past that
TIMEOUT_HEAD = struct.Struct("!I")  # milliseconds the task may run on its worker
# Sent to a free worker: the client counts it as running already, so the node reports no
# STARTED for it (and arms no timer to: a lone task's round trip wakes the node once less).
FLAG_RUNNING = 4


def task_payload_offset(flags: int) -> int:
    """Where a TASK body's pickled arguments start, after its head (and timeout, if flagged)."""
    return TASK_HEAD.size + (TIMEOUT_HEAD.size if flags & FLAG_TIMEOUT else 0)


def task_timeout(body: bytes | bytearray | memoryview, flags: int) -> float | None:
    """A TASK's timeout in seconds, or None if it has none."""
    if not flags & FLAG_TIMEOUT:
        return None
    return float(TIMEOUT_HEAD.unpack_from(body, TASK_HEAD.size)[0]) / 1000.0
# SIGNAL_WORKERS: which signal the node sends (named, not a number: signal numbers are the node's).
WORKERS_TERMINATE = 1  # SIGTERM, as Process.terminate()
WORKERS_KILL = 2  # SIGKILL, as Process.kill()
# RESULT status.
STATUS_OK = 0
STATUS_ERROR = 1
STATUS_PARTIAL = 2


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


