"""Tasks as the client holds them: the Task record, its Future, and cancelling.

A task moves QUEUED -> SENT -> STARTED -> DONE, changed only by the I/O thread. A task handed to
an idle worker is STARTED as it is sent (its future running, as in ProcessPoolExecutor). A task
SENT ahead of the free workers and not started there can still be cancelled:
``TaskFuture.cancel()`` asks the node (one round trip) and the task then never runs.

This is the one module that reads or writes the private fields of ``Future`` (its state and
its condition): the scheduler goes through :meth:`Task.mark_sent`, :func:`mark_running`,
:func:`cancel_and_notify` and :func:`task_to_cancel`.
"""

from __future__ import annotations

import enum
import threading
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Protocol

from clusterexec.client.options import DEFAULT_OPTIONS, TaskOptions
from clusterexec.code.serialize import FunctionPayload, Payload

if TYPE_CHECKING:
    from clusterexec.client.link import NodeLink


class TaskState(enum.Enum):
    """Where a task is, as the client sees it."""

    QUEUED = "queued"
    SENT = "sent"
    STARTED = "started"
    DONE = "done"


class Task:
    """One unit of work: its future, its pickled function and arguments, where it is."""

    __slots__ = (
        "task_id",
        "future",
        "function",
        "payload",
        "flags",
        "state",
        "attempts",
        "link",
        "replies",
        "target",
        "timeout",
        "retries",
        "sent_at",
        "to_idle",
        "withdrawing",
    )

    def __init__(
        self,
        future: TaskFuture,
        function: FunctionPayload,
        payload: Payload,
        flags: int = 0,
        options: TaskOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.task_id = 0
        self.future = future
        self.function = function
        self.payload = payload
        self.flags = flags
        self.state = TaskState.QUEUED
        self.attempts = 0
        self.link: NodeLink | None = None
        self.replies: list[Reply] | None = None
        self.target = options.node
        self.timeout = options.timeout  # seconds it may run on its worker (None: no limit)
        self.retries = options.retries  # times it may be re-sent after a lost node (None: the executor's)
        self.sent_at = 0.0  # when it was last sent to a node (time.monotonic())
        self.to_idle = False  # it was sent to a node with a free worker: no queue ahead of it there
        self.withdrawing = False  # asked back from its node, to go to an idle worker elsewhere
        future._task = self

    def mark_sent(self, to_idle_worker: bool) -> bool:
        """Move a queued task to SENT, or to STARTED (its future running) if it goes to an idle
        worker; False, and no change, if its future is cancelled or done. I/O thread only.

        Under the future's lock: a ``cancel()`` from a user thread sees the task either queued
        (and cancels it here) or sent (and asks the node), never in between."""
        future = self.future
        with future._condition:
            state = future._state
            if state != PENDING and state != RUNNING:
                return False
            if to_idle_worker:
                # Running from now on, as ProcessPoolExecutor marks the calls it moves to its
                # call queue. Neither cancel() nor shutdown(cancel_futures=True) takes it back;
                # only tasks sent ahead of the free workers stay cancellable.
                self.state = TaskState.STARTED
                if state == PENDING:
                    future.set_running_or_notify_cancel()
            else:
                self.state = TaskState.SENT
        return True

    def release(self) -> None:
        """The task is over: unbind it from its future and let go of its function and
        arguments, so that nothing here keeps them (or its result) alive. I/O thread only."""
        self.state = TaskState.DONE
        self.future._task = None
        self.future._scheduler = None
        self.payload = self.function = None  # type: ignore[assignment]


class Reply:
    """A user thread waiting for the I/O thread's answer to a cancel."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = False

    def answer(self, value: Any) -> None:
        self.value = value
        self.event.set()


class SentTaskCanceller(Protocol):
    """What a :class:`TaskFuture` needs of its scheduler: cancelling a task sent to a node."""

    def cancel_sent(self, task: Task) -> bool:
        """Cancel a task sent ahead to a node; blocks for the node's answer."""
        ...


class TaskFuture(Future[Any]):
    """A Future whose ``cancel()`` also reaches tasks already sent ahead to a node.

    Such a task is cancelled on the node if it has not started there (it then never runs);
    ``cancel()`` waits for the node's answer (one round trip).
    """

    def __init__(self, scheduler: SentTaskCanceller) -> None:
        super().__init__()
        self._scheduler: SentTaskCanceller | None = scheduler
        self._task: Task | None = None
        self._seen = False
        # The exit report's record of this future's failure, if the cluster failed it: marked
        # seen here, so that a future looked at and then dropped is not reported.
        self._failure: list[Any] | None = None

    def _mark_seen(self) -> None:
        self._seen = True
        failure = self._failure
        if failure is not None:
            failure[2] = True

    def result(self, timeout: float | None = None) -> Any:
        """As ``Future.result``."""
        self._mark_seen()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``."""
        self._mark_seen()
        return super().exception(timeout)

    def cancel(self) -> bool:
        """Cancel the task if it has not started; return True if it is cancelled."""
        with self._condition:
            task = self._task
            if task is None or task.state is not TaskState.SENT or self._state != PENDING:
                return cancel_and_notify(self)
            scheduler = self._scheduler
        if scheduler is None:
            return False
        return scheduler.cancel_sent(task)


class UnseenFailures:
    """Tasks that clusterexec could not run (a lost node, a version skew, a shutdown) and whose
    futures nobody has asked about yet: reported at interpreter exit, so that a program never
    ends with its work silently undone. Thread-safe; keeps at most ``LIMIT`` of them."""

    LIMIT = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # [task id, first line of the error, seen]: the future marks its record seen, and a
        # future dropped unseen (fire and forget) leaves its record unseen.
        self._failures: list[list[Any]] = []
        self._more = 0

    def note(self, future: TaskFuture, task_id: int, error: BaseException) -> None:
        """Remember a task that failed through no fault of its own code."""
        if future._seen:
            return
        with self._lock:
            if len(self._failures) < self.LIMIT:
                record: list[Any] = [task_id, str(error).splitlines()[0], False]
                future._failure = record
                record[2] = record[2] or future._seen  # after linking: a result() racing this sees one or the other
                self._failures.append(record)
            else:
                self._more += 1

    def report(self) -> str | None:
        """What to tell the user at exit, or None if every such failure was looked at."""
        with self._lock:
            unseen = [(task_id, text) for task_id, text, seen in self._failures if not seen]
            more, self._failures, self._more = self._more, [], 0
        if not unseen:
            return None
        count = len(unseen) + more
        lines = [f"  task {task_id}: {text}" for task_id, text in unseen[:5]]
        if count > len(lines):
            lines.append(f"  ... and {count - len(lines)} more")
        return (
            f"clusterexec: {count} submitted task(s) were not done (the cluster failed them, not their own "
            "code) and nobody asked for their result; call result() or exception() on the futures to handle "
            "these errors:\n" + "\n".join(lines)
        )


UNSEEN = UnseenFailures()


def cancel_and_notify(future: Future[Any]) -> bool:
    """Cancel a future that has not started and wake its waiters, so ``wait`` and
    ``as_completed`` see it done at once. Returns what ``Future.cancel`` returns."""
    with future._condition:
        cancelled = Future.cancel(future)
        if cancelled and future._state == CANCELLED:
            future.set_running_or_notify_cancel()
        return cancelled


def mark_running(future: Future[Any]) -> None:
    """Mark a pending future running (its task started, or has run), as a worker does in
    ProcessPoolExecutor; a future cancelled meanwhile is only notified. I/O thread only."""
    if future._state == PENDING:
        future.set_running_or_notify_cancel()


def task_to_cancel(future: Future[Any]) -> Task | None:
    """Cancel ``future`` here if its task has not been sent; otherwise return its task, which
    only its node can cancel (None if there is nothing left to cancel). Thread-safe."""
    if cancel_and_notify(future) or not isinstance(future, TaskFuture):
        return None
    return future._task
