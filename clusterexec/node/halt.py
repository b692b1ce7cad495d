"""``terminate_workers()`` and ``kill_workers()`` on the node: the signal a client asks for, and
what it is told of each worker so stopped.

The session marks its workers SIGNALLED and has its node signal them; as each is reaped, the
task it was running is reported CRASHED, naming the client's method, and the tasks sent ahead
to it, which never started, are reported CANCELLED.
"""

from __future__ import annotations

import signal
from collections import deque

from clusterexec.errors import ProtocolError
from clusterexec.node.host import WorkerProcess, exit_report
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    CANCELLED,
    CRASHED,
    SIGNAL_HEAD,
    TASK_ID,
    WORKERS_KILL,
    WORKERS_TERMINATE,
    Kind,
    pack_cancelled,
    pack_json,
)

# Seconds a worker sent SIGTERM has before SIGKILL.
KILL_GRACE = 2.0
# What SIGNAL_WORKERS asks for: the signal sent, and the client method named in reports.
WORKER_SIGNALS = {
    WORKERS_TERMINATE: (signal.SIGTERM, "terminate_workers()"),
    WORKERS_KILL: (signal.SIGKILL, "kill_workers()"),
}


def read_signal_request(message: Message) -> tuple[int, str]:
    """The signal a SIGNAL_WORKERS message asks for, and the client method that sent it.
    Raises ProtocolError for a short message or an unknown signal kind."""
    if len(message.body) < SIGNAL_HEAD.size:
        raise ProtocolError("SIGNAL_WORKERS message is shorter than its header")
    (how,) = SIGNAL_HEAD.unpack_from(message.body, 0)
    if how not in WORKER_SIGNALS:
        raise ProtocolError(f"SIGNAL_WORKERS asks for unknown signal kind {how}")
    return WORKER_SIGNALS[how]


def signalled_reports(worker: WorkerProcess, status: int, maxrss_kb: int, stopped_by: str) -> list[tuple[Kind, bytes]]:
    """The messages for the client about a worker signalled at its request and now reaped: its
    running task CRASHED, the tasks sent ahead to it CANCELLED (taken off the worker)."""
    if not worker.outstanding:
        return []
    running, _ = worker.outstanding.popleft()
    info = {**exit_report(worker.pid, status, maxrss_kb), "stopped_by": stopped_by}
    reports = [(CRASHED, TASK_ID.pack(running) + pack_json(info))]
    if worker.outstanding:
        reports.append((CANCELLED, pack_cancelled([task_id for task_id, _ in worker.outstanding], [])))
        worker.outstanding.clear()
    return reports


def withdraw_queued(queue: deque[Message], ids: list[int]) -> tuple[deque[Message], list[int]]:
    """CANCEL: the queue without the tasks ``ids`` names, and the ids of those it held (the
    others have started, or ended: too late to cancel on this node)."""
    wanted = set(ids)
    kept: deque[Message] = deque()
    cancelled: list[int] = []
    for message in queue:
        (task_id,) = TASK_ID.unpack_from(message.body, 0)
        if task_id in wanted:
            cancelled.append(task_id)
        else:
            kept.append(message)
    return kept, cancelled
