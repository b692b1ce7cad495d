"""Per-task timeouts on the node: a TASK flagged with a timeout runs alone on its worker, and
the worker is killed (SIGKILL) once the task has run past it.

The session reports the task CRASHED with the timeout, which the client turns into
``TaskTimeoutError``, and starts a replacement worker as for any worker that died.
"""

from __future__ import annotations

import logging
import os
import signal

from clusterexec.node.host import WorkerProcess, exit_report
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import FLAG_TIMEOUT, TASK_HEAD

log = logging.getLogger("clusterexec.node")


def timed(message: Message) -> bool:
    """Whether a queued TASK has a timeout."""
    return bool(message.body[TASK_HEAD.size - 1] & FLAG_TIMEOUT)


def kill_overdue(workers: list[WorkerProcess], now: float, peer: str) -> float:
    """SIGKILL each worker whose task ran past its timeout (noting it in ``timed_out``);
    return when the next timeout is due (inf if none)."""
    due = float("inf")
    for worker in workers:
        if worker.timeout is None or worker.timed_out is not None:
            continue
        if now < worker.deadline:
            due = min(due, worker.deadline)
            continue
        worker.timed_out = worker.timeout
        running = worker.outstanding[0][0] if worker.outstanding else -1
        log.info(
            "session from %s: task %d ran past its timeout of %gs; killing worker %d",
            peer,
            running,
            worker.timeout,
            worker.pid,
        )
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return due


def crash_report(worker: WorkerProcess, status: int, maxrss_kb: int) -> dict[str, object]:
    """The CRASHED report of a worker's running task: how the worker ended, and the timeout it
    ran past if the node killed it for that."""
    info = exit_report(worker.pid, status, maxrss_kb)
    if worker.timed_out is not None:
        info["timeout"] = worker.timed_out
    return info
