"""The client's book of tasks: every task not yet over, the queue of those waiting for a node,
and the one place each task gets its one outcome.

Used only by the I/O thread. A task ends here in exactly one way: a result or an error
(:meth:`TaskBook.finish`, the future completed at the end of the loop's turn by
:meth:`TaskBook.complete`), or cancelled (:meth:`TaskBook.drop`). A lost node's tasks go back to
the queue up to ``retries`` times (:meth:`TaskBook.requeue_lost`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import InvalidStateError

from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import NodeLink
from clusterexec.client.tasks import UNSEEN, Reply, Task, TaskFuture, TaskState, cancel_and_notify, mark_running
from clusterexec.code.serialize import crash_error, decode_result, unpickling_error
from clusterexec.code.versions import name_differences
from clusterexec.errors import ClusterError, NodeLostError, RemoteError, WorkerStoppedError
from clusterexec.wire.compression import unpack
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    CANCEL,
    RESULT_HEAD,
    TASK_ID,
    WORKERS_KILL,
    WORKERS_TERMINATE,
    pack_ids,
    unpack_cancelled,
    unpack_ids,
    unpack_json,
)

# After terminate_workers()/kill_workers(), how long the nodes have to report the tasks their
# workers were running (a node SIGKILLs a worker that outlives SIGTERM after 2 s): a node that
# stays silent must not keep the program from exiting.
STOP_REPORT_TIMEOUT = 5.0
STOP_METHODS = {WORKERS_TERMINATE: "terminate_workers()", WORKERS_KILL: "kill_workers()"}


log = logging.getLogger("clusterexec")

class TaskBook:
    """Tasks by id, the client queue, and their outcomes. I/O thread only; ``queue`` and
    ``tasks`` may be counted from other threads (a moment old)."""

    def __init__(self, ledgers: dict[NodeLink, NodeLedger], retries: int, reconnect_window: float) -> None:
        self.tasks: dict[int, Task] = {}
        self.queue: deque[Task] = deque()
        self.ledgers = ledgers
        self.retries = retries
        self.reconnect_window = reconnect_window
        # Futures are completed at the end of a loop iteration, just before the thread blocks:
        # a user thread woken by its result then finds the GIL free instead of waiting for it.
        self.done: list[tuple[TaskFuture, object, BaseException | None]] = []
        # Set once terminate_workers()/kill_workers() is handled: the method's name, and when
        # tasks still in flight stop waiting for their node's report.
        self.stopped_by = ""
        self.stop_deadline = 0.0
        # Whether a node's pinned tasks (submit_to) may wait to be sent.
        self.pinned_waiting = False
        # Nodes a message was queued for since the last flush (the I/O thread writes only those).
        self.dirty: dict[NodeLink, NodeLedger] = {}
        # Tasks sent again after their node was lost, and results dropped for arriving late.
        self.reruns = 0
        self.late_results = 0

    def add(self, task: Task) -> None:
        """A new task: to the queue, or to its node's pinned tasks (``submit_to``)."""
        self.tasks[task.task_id] = task
        if task.target is not None:
            self.ledgers[task.target].pinned.append(task)
            self.pinned_waiting = True
        else:
            self.queue.append(task)

    # ------------------------------------------------------------------ what the nodes report

    def on_started(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        """STARTED: tasks sent ahead have started on a worker; they can no longer be cancelled."""
        for task_id in unpack_ids(message.body):
            task = ledger.inflight.get(task_id)
            ledger.started(task_id)
            if task is not None and task.state is TaskState.SENT:
                task.state = TaskState.STARTED
                mark_running(task.future)
                self._answer(task, False)

    def on_result(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        """RESULT: a task's value or exception, unpickled here."""
        task_id, status, run_us = RESULT_HEAD.unpack_from(message.body, 0)
        task = ledger.take_result(task_id, time.monotonic(), run_us * 1e-6)
        if task is None:
            # Not in flight there: it has an outcome already and keeps it (exactly one each).
            self.late_results += 1
            log.debug("node %s: result of task %d arrived late; dropped", link.name, task_id)
            return
        try:
            body, buffers = unpack(memoryview(message.body)[RESULT_HEAD.size :], message.buffers)
            value, exception = decode_result(status, body, buffers, task_id, link.name)
            if exception is not None and hasattr(exception, "node_packages"):
                name_differences(exception, link.name)
        except BaseException as exc:  # even SystemExit from a __reduce__ must not stop this thread
            value = None
            exception = unpickling_error(
                task_id,
                "on the client",
                f"its result from node {link.name}",
                exc,
                "Make sure the classes it holds can be imported here, and that their "
                "__reduce__/__setstate__ do not fail.",
            )
        self.finish(task, value, exception)

    def on_crashed(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        """CRASHED: the worker running a task died; only that task fails."""
        (task_id,) = TASK_ID.unpack_from(message.body, 0)
        task = ledger.inflight.pop(task_id, None)
        if task is not None:
            info = unpack_json(memoryview(message.body)[TASK_ID.size :])
            self.finish(task, exception=crash_error(task_id, link.name, info))

    def on_cancelled(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        """CANCELLED: the node's answer to CANCEL, the tasks it removed and those it refused."""
        cancelled, refused = unpack_cancelled(message.body)
        for task_id in cancelled:
            task = ledger.inflight.get(task_id)
            if task is None:
                continue
            if task.withdrawing and not task.replies and not task.future.cancelled():
                self._take_back(ledger, task)  # asked back for an idle worker: it runs elsewhere
                continue
            ledger.inflight.pop(task_id, None)
            cancel_and_notify(task.future)
            self._answer(task, True)
            self.drop(task)
        for task_id in refused:
            task = ledger.inflight.get(task_id)
            if task is not None:
                if task.withdrawing:  # it had started: it stays where it is
                    task.withdrawing = False
                    ledger.withdrawing -= 1
                self._answer(task, False)

    def _take_back(self, ledger: NodeLedger, task: Task) -> None:
        """A task withdrawn from its node goes to the front of the queue, unharmed: it has not
        run, and this is not one of its attempts."""
        ledger.forget(task)
        task.link = None
        task.to_idle = False
        task.state = TaskState.QUEUED
        self.queue.appendleft(task)

    # ------------------------------------------------------------------ outcomes

    def finish(self, task: Task, value: object = None, exception: BaseException | None = None) -> None:
        """The task is over with ``value`` or ``exception``; its future is completed by
        :meth:`complete`."""
        if exception is not None and task.link is not None:
            self.ledgers[task.link].note_failure()
        # Not the task's own error, and someone may still want the outcome (not a cancelled future).
        ours = isinstance(exception, ClusterError) and not isinstance(exception, RemoteError)
        if ours and exception is not None and not task.future.cancelled():
            UNSEEN.note(task.future, task.task_id, exception)
        self.drop(task)
        future = task.future
        # Running from here on: the task has run, so a cancel() from a user thread before
        # complete() sets the result must fail, as it does once a task has started.
        mark_running(future)
        self.done.append((future, value, exception))

    def fail(self, task: Task, exception: BaseException) -> None:
        """The task is over with ``exception``."""
        self.finish(task, exception=exception)

    def complete(self) -> None:
        """Set the results and exceptions of the tasks finished since the last call."""
        done, self.done = self.done, []
        for future, value, exception in done:
            try:
                if exception is not None:
                    future.set_exception(exception)
                else:
                    future.set_result(value)
            except InvalidStateError:  # cancelled by a user thread meanwhile
                pass

    def drop(self, task: Task) -> None:
        """Forget a task: no reference to its function, arguments or result remains here."""
        self.tasks.pop(task.task_id, None)
        if task.link is not None:
            self.ledgers[task.link].forget(task)
        task.release()
        self._answer(task, False)

    def fail_all(self, error: BaseException) -> None:
        """Every task not yet over fails with ``error``; nothing waits to be sent any more."""
        for task in list(self.tasks.values()):
            self.fail(task, error)
        self.queue.clear()
        for ledger in self.ledgers.values():
            ledger.pinned.clear()

    def outstanding(self) -> bool:
        """Whether any task is not over yet (cancelled ones waiting to be sent are dropped)."""
        if not self.tasks:
            return False
        for queue in [self.queue] + [ledger.pinned for ledger in self.ledgers.values()]:
            for task in list(queue):
                if task.future.cancelled():
                    self.drop(task)
        return bool(self.tasks)

    # ------------------------------------------------------------------ cancelling

    def _answer(self, task: Task, value: bool) -> None:
        if task.replies:
            for reply in task.replies:
                reply.answer(value)
            task.replies = None

    def cancel(self, tasks: list[Task], reply: Reply | None) -> None:
        """Cancel tasks: at once if queued here, by a CANCEL to their node if sent ahead. With
        ``reply``, answer whether the (single) task is cancelled, once it is known."""
        by_link: dict[NodeLink, list[int]] = {}
        for task in tasks:
            if task.state is TaskState.QUEUED:
                answered = cancel_and_notify(task.future)
                if reply is not None:
                    reply.answer(answered)
            elif task.state is TaskState.SENT and task.link is not None and task.link.channel is not None:
                if reply is not None:
                    task.replies = (task.replies or []) + [reply]
                by_link.setdefault(task.link, []).append(task.task_id)
            elif reply is not None:
                reply.answer(task.future.cancelled())
        for link, ids in by_link.items():
            assert link.channel is not None
            link.channel.send(CANCEL, pack_ids(ids))
            self.dirty[link] = self.ledgers[link]

    # ------------------------------------------------------------------ lost nodes

    def requeue_lost(self, link: NodeLink, ledger: NodeLedger) -> None:
        """The session on ``link`` is over (lost, or replaced by a new connection): its tasks in
        flight go back to the queue, up to ``retries`` times."""
        tasks = ledger.reset()
        tasks.reverse()  # each goes back to the front of the queue: the oldest ends up first
        if self.stopped_by:
            for task in tasks:
                self.fail(task, self._stopped_error(task, f"node {link.name} was lost ({link.error})"))
            return
        for task in tasks:
            task.link = None
            task.attempts += 1
            retries = self.retries if task.retries is None else task.retries
            if task.attempts > retries:
                self.fail(
                    task,
                    NodeLostError(
                        f"task {task.task_id} was lost with node {link.name} ({link.error}); "
                        f"it was sent {task.attempts} times, more than retries={retries}"
                    ),
                )
                continue
            task.state = TaskState.QUEUED
            self.reruns += 1
            self._answer(task, False)
            if task.target is not None:
                self.ledgers[task.target].pinned.appendleft(task)
                self.pinned_waiting = True
            else:
                self.queue.appendleft(task)

    def fail_pinned(self, link: NodeLink, ledger: NodeLedger) -> None:
        """Tasks given to one node with submit_to fail once that node stays down too long."""
        reason = link.loss_reason or link.error
        while ledger.pinned:
            task = ledger.pinned.popleft()
            self.fail(
                task,
                NodeLostError(
                    f"task {task.task_id} was for node {link.name}, which has been down for more than "
                    f"reconnect_window={self.reconnect_window:g}s ({reason})"
                ),
            )

    # ------------------------------------------------------------------ stopping the workers

    def stop_workers(self, how: int) -> None:
        """``terminate_workers()``/``kill_workers()``: cancel what has not been sent; tasks in
        flight end as their node reports them: cancelled if they had not started, their result
        if they finished first, WorkerStoppedError otherwise."""
        if not self.stopped_by:
            self.stop_deadline = time.monotonic() + STOP_REPORT_TIMEOUT
        self.stopped_by = STOP_METHODS.get(how, "terminate_workers()")
        for task in list(self.tasks.values()):
            if task.state is TaskState.QUEUED:
                if cancel_and_notify(task.future):
                    self.drop(task)
                else:  # requeued after its node was lost: it may have started there
                    reason = "it was waiting to be sent again after its node was lost"
                    self.fail(task, self._stopped_error(task, reason))
        self.queue.clear()
        for ledger in self.ledgers.values():
            ledger.pinned.clear()

    def abandon_in_flight(self) -> None:
        """The nodes did not report every task in time after the workers were signalled."""
        for task in list(self.tasks.values()):
            self.fail(
                task, self._stopped_error(task, f"its node did not report its outcome within {STOP_REPORT_TIMEOUT:g}s")
            )

    def _stopped_error(self, task: Task, reason: str) -> WorkerStoppedError:
        node = task.link.name if task.link is not None else "(none)"
        return WorkerStoppedError(
            f"task {task.task_id} on node {node}: {self.stopped_by} was called while it was in flight, "
            f"and {reason}, so whether it ran is unknown. The executor is shut down; to run the task again, "
            "submit it to a new executor."
        )

