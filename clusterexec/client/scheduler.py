"""The client I/O thread: the task queue, dispatch to nodes, results, cancels, retries.

One thread owns every node link, the queue and the completion of futures; user threads only
append tasks to ``_new`` or post calls to the :class:`~clusterexec.client.mailbox.Mailbox`, whose
wake-up costs one byte per batch.
Tasks move QUEUED -> SENT -> STARTED -> DONE; a task handed to an idle worker is STARTED (and its
future running) as it is sent. A task SENT ahead of the free workers but not started can be
cancelled, which takes a round trip to the node. A lost node's tasks go back to the queue,
up to ``retries`` times.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import LinkState, NodeLink
from clusterexec.client.mailbox import Mailbox
from clusterexec.client.output import OutputPrinter
from clusterexec.client.report import ClusterStats, NodeStats, NodeStatus
from clusterexec.client.tasks import (
    UNSEEN,
    Reply,
    Task,
    TaskFuture,
    TaskState,
    cancel_and_notify,
    mark_running,
    task_to_cancel,
)
from clusterexec.code.serialize import crash_error, decode_result, unpickling_error
from clusterexec.code.shipping import ModuleSource, encode_sources
from clusterexec.errors import (
    BrokenCluster,
    ClusterError,
    NodeLostError,
    ProtocolError,
    RemoteError,
    WorkerStoppedError,
)
from clusterexec.wire.compression import pack, unpack
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    BROKEN,
    BYE,
    CANCEL,
    CRASHED,
    FORGET,
    FUNC,
    HEARTBEAT,
    MODULES,
    OUTPUT,
    OUTPUT_HEAD,
    RESULT,
    RESULT_HEAD,
    SIGNAL_HEAD,
    SIGNAL_WORKERS,
    STARTED,
    STATUS,
    STATUS_REPLY,
    TASK,
    TASK_HEAD,
    TASK_ID,
    WORKERS_KILL,
    WORKERS_TERMINATE,
    pack_ids,
    unpack_cancelled,
    unpack_ids,
    unpack_json,
)
from clusterexec.wire.messages import CANCELLED as CANCELLED_KIND
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

log = logging.getLogger("clusterexec")
INITIALIZER_LOG = logging.getLogger("concurrent.futures")

CANCEL_TIMEOUT = 10.0
# After terminate_workers()/kill_workers(), how long the nodes have to report the tasks their
# workers were running (a node SIGKILLs a worker that outlives SIGTERM after 2 s): a node that
# stays silent must not keep the program from exiting.
STOP_REPORT_TIMEOUT = 5.0
STOP_METHODS = {WORKERS_TERMINATE: "terminate_workers()", WORKERS_KILL: "kill_workers()"}


class Scheduler:
    """Runs the I/O thread for one executor. Thread-safe entry points are marked."""

    def __init__(
        self,
        links: list[NodeLink],
        *,
        retries: int,
        heartbeat_timeout: float,
        reconnect_window: float,
        closers: Iterable[Callable[[], None]] = (),
        preload: tuple[ModuleSource, ...] = (),
        output: OutputPrinter | None = None,
    ) -> None:
        self.links = links
        # What has been put on each node, and the pairs for loops that need both.
        self._ledgers = {link: NodeLedger() for link in links}
        self._nodes = list(self._ledgers.items())
        self.preload = preload
        self.output = output
        self.retries = retries
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_window = reconnect_window
        self._closers = list(closers)
        self._ids = itertools.count(1)
        self._new: deque[Task] = deque()
        self._queue: deque[Task] = deque()
        self._tasks: dict[int, Task] = {}
        # Futures are completed at the end of a loop iteration, just before the thread blocks:
        # a user thread woken by its result then finds the GIL free instead of waiting for it.
        self._done: list[tuple[TaskFuture, object, BaseException | None]] = []
        self._poller = Poller()
        self._registered: dict[NodeLink, tuple[socket.socket, int, int]] = {}
        self._mailbox = Mailbox()
        self._stop = False
        # Set once terminate_workers()/kill_workers() is handled: the method's name, and when
        # tasks still in flight stop waiting for their node's report.
        self._stopped_by = ""
        self._stop_deadline = 0.0
        self.broken: BrokenCluster | None = None
        self.first_round = threading.Event()
        self.first_outcome: list[tuple[bool, ClusterError | None]] = []
        self._thread = threading.Thread(target=self._run, name="clusterexec-io", daemon=True)
        self._io_ident = 0
        # The timers (deadlines, heartbeats, reconnects, the reconnect window) are scanned when
        # the earliest is due, or at once after a link leaves READY: not on every wake-up.
        self._timers_due = 0.0

    # ------------------------------------------------------------------ user threads

    def start(self) -> None:
        """Start the I/O thread. Thread-safe."""
        self._thread.start()

    def new_future(self) -> TaskFuture:
        """A future bound to this scheduler. Thread-safe."""
        return TaskFuture(self)

    def submit(self, task: Task) -> None:
        """Queue a task. Thread-safe; never blocks on the network."""
        task.task_id = next(self._ids)
        self._new.append(task)
        self._mailbox.wake()

    def cancel_sent(self, task: Task) -> bool:
        """Cancel a task sent to a node; blocks for the node's answer. Thread-safe."""
        if threading.get_ident() == self._io_ident:
            self._mailbox.call_soon(self._cancel, [task], None)
            return False
        reply = Reply()
        self._mailbox.call_soon(self._cancel, [task], reply)
        reply.event.wait(CANCEL_TIMEOUT)
        return reply.value

    def cancel_all(self, futures: Iterable[Future[Any]]) -> None:
        """Cancel many futures without waiting (map clean-up). Thread-safe."""
        tasks = []
        for future in futures:
            task = task_to_cancel(future)
            if task is not None:
                tasks.append(task)
        if tasks:
            self._mailbox.call_soon(self._cancel, tasks, None)

    def cancel_pending(self) -> None:
        """Cancel every task that has not started (``shutdown(cancel_futures=True)``). Thread-safe."""
        self._mailbox.call_soon(self._cancel_pending)

    def stop_workers(self, how: int) -> None:
        """``terminate_workers()``/``kill_workers()``: cancel every task that has not started, stop,
        and have every node signal this executor's workers (``how`` is WORKERS_TERMINATE or
        WORKERS_KILL). Thread-safe; returns at once.

        One call, so the I/O thread queues the signal request on each link before it can
        close that link: the node always hears it."""
        self._mailbox.call_soon(self._stop_workers, how)

    def node_status(self, link: NodeLink, timeout: float) -> dict[str, Any] | None:
        """Ask a node for its health report; None if it is not connected or does not answer.
        Thread-safe; blocks up to ``timeout``."""
        reply = Reply()
        reply.value = None
        self._mailbox.call_soon(self._ask_status, link, reply)
        reply.event.wait(timeout)
        return reply.value

    def stop(self) -> None:
        """Ask the I/O thread to finish the tasks it has, then close. Thread-safe."""
        self._mailbox.call_soon(self._stop_after_tasks)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the I/O thread to end. Thread-safe (not from the I/O thread)."""
        if self._thread.is_alive() and threading.get_ident() != self._io_ident:
            self._thread.join(timeout)

    def stats(self) -> ClusterStats:
        """Task counts, client-side and per node. Thread-safe (a snapshot, a moment old)."""
        nodes: dict[str, NodeStats] = {}
        queued = len(self._queue) + len(self._new)
        for link, ledger in self._nodes:
            nodes[link.name] = ledger.stats()
        return ClusterStats(queued, nodes)

    def node_statuses(self) -> list[NodeStatus]:
        """Every node's link state and task counts, for ``ex.nodes``. Thread-safe (a snapshot)."""
        return [link.status(len(ledger.inflight), ledger.tasks_done) for link, ledger in self._nodes]

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        self._poller.register(self._mailbox.reader, EVENT_READ, None)
        try:
            now = time.monotonic()
            for link, ledger in self._nodes:
                self._connect(link, ledger, now)
                self._sync(link)
            self._loop()
        except BaseException as exc:  # a bug here must not leave futures hanging
            log.exception("clusterexec I/O thread failed")
            self._break(BrokenCluster(f"the clusterexec I/O thread failed ({exc!r}); please report this bug"))
        finally:
            self._finish()

    def _loop(self) -> None:
        first_round = self.first_round
        mailbox = self._mailbox
        while True:
            now = time.monotonic()
            if now >= self._timers_due:
                self._timers_due = now + self._timers(now)
                self._note_first_round()
                if self._all_lost_for(self.reconnect_window, now) and (self._tasks or self._stop):
                    self._break(BrokenCluster(self._lost_summary()))
                    if self._stop:
                        return
            for _fd, events, link in self._poller.select(max(0.0, self._timers_due - now)):
                if link is None:
                    mailbox.on_readable()
                else:
                    self._on_link_event(link, events)
            if self._new or mailbox.has_calls:
                self._take_new()
                mailbox.run_calls()
                if self._stop or any(link.state is not LinkState.READY for link in self.links):
                    self._timers_due = 0.0
            self._dispatch()
            self._flush()
            if self._done:
                self._complete()
            if not first_round.is_set():
                self._note_first_round()
            if self._stop and not self._outstanding():
                return

    def _note_first_round(self) -> None:
        """Once every node has been tried, record the outcome for the constructor, then wake it."""
        if self.first_round.is_set():
            return
        if all(link.state in (LinkState.READY, LinkState.LOST) for link in self.links):
            self.first_outcome = [(link.state is LinkState.READY, link.error) for link in self.links]
            self.first_round.set()

    def _take_new(self) -> None:
        new = self._new
        while new:
            task = new.popleft()
            if self.broken is not None:
                self._fail(task, self.broken)
                continue
            self._tasks[task.task_id] = task
            if task.target is not None:
                self._ledgers[task.target].pinned.append(task)
            else:
                self._queue.append(task)

    # ------------------------------------------------------------------ posted by user threads

    def _cancel_pending(self) -> None:
        # As ProcessPoolExecutor's manager thread fills its call queue before it acts on
        # shutdown: idle workers get their tasks first (those run), then the rest is cancelled.
        self._dispatch(prefetch=False)
        self._cancel(list(self._tasks.values()), None)

    def _stop_after_tasks(self) -> None:
        self._stop = True

    def _ask_status(self, link: NodeLink, reply: Reply) -> None:
        if link.state is LinkState.READY and link.channel is not None:
            self._ledgers[link].await_status(reply)
            link.channel.send(STATUS)
        else:
            reply.answer(None)

    def _outstanding(self) -> bool:
        if not self._tasks:
            return False
        for queue in [self._queue] + [ledger.pinned for ledger in self._ledgers.values()]:
            for task in list(queue):
                if task.future.cancelled():
                    self._drop(task)
        return bool(self._tasks)

    def _timers(self, now: float) -> float:
        timeout = 1.0
        if self._stopped_by:
            if now >= self._stop_deadline:
                self._abandon_in_flight()
            else:
                timeout = min(timeout, self._stop_deadline - now)
        for link, ledger in self._nodes:
            link.check_deadline(now)
            if (
                link.state is LinkState.READY
                and now - link.last_heard > self.heartbeat_timeout
                and not _readable(link.sock)  # heartbeats may be waiting unread (a GIL-holding user thread)
            ):
                link.lose(NodeLostError(f"node {link.name} sent no heartbeat for {self.heartbeat_timeout:g}s"))
            if link.state is not LinkState.READY and ledger.pinned and link.down_since:
                if now - link.down_since >= self.reconnect_window:
                    self._fail_pinned(link, ledger)
            if link.state is LinkState.LOST:
                if ledger.inflight:
                    self._requeue_lost(link, ledger)
                if not link.retry_at:
                    link.retry_at = now + min(5.0, 0.1 * 2 ** min(link.attempts, 6))
                if now >= link.retry_at and not self._stop:
                    link.retry_at = 0.0
                    self._connect(link, ledger, now)
                else:
                    timeout = min(timeout, max(0.0, link.retry_at - now))
            elif link.state is not LinkState.READY:
                timeout = min(timeout, max(0.0, link.deadline - now))
            self._sync(link)
        return timeout

    def _connect(self, link: NodeLink, ledger: NodeLedger, now: float) -> None:
        # A new connection is a new session: the node holds none of what was sent before.
        self._requeue_lost(link, ledger)
        link.connect(now)

    def _sync(self, link: NodeLink) -> None:
        """Keep the selector's registration in step with the link's socket and interest."""
        current = self._registered.get(link)
        sock = link.sock
        if sock is None or link.state in (LinkState.LOST, LinkState.CLOSED):
            if current is not None:
                self._unregister(link, current[1])
            return
        events = link.interest()
        if current is not None and current[0] is sock:
            if current[2] != events:
                self._poller.modify(current[1], events, link)
                self._registered[link] = (sock, current[1], events)
            return
        if current is not None:
            self._unregister(link, current[1])
        fd = sock.fileno()
        self._poller.register(fd, events, link)
        self._registered[link] = (sock, fd, events)

    def _unregister(self, link: NodeLink, fd: int) -> None:
        del self._registered[link]
        try:
            self._poller.unregister(fd)
        except KeyError:
            pass

    def _on_link_event(self, link: NodeLink, events: int) -> None:
        now = time.monotonic()
        messages = link.on_event(events, now)
        ledger = self._ledgers[link]
        if messages:
            try:
                self._on_messages(link, ledger, messages)
            except (ProtocolError, ValueError, KeyError) as exc:
                link.lose(ClusterError(f"node {link.name} sent a malformed message ({exc})"))
        if link.state is not LinkState.READY:
            self._timers_due = 0.0
            if link.state is LinkState.LOST and ledger.inflight:
                self._requeue_lost(link, ledger)
        self._sync(link)

    # ------------------------------------------------------------------ messages

    def _on_messages(self, link: NodeLink, ledger: NodeLedger, messages: list[Message]) -> None:
        for message in messages:
            kind = message.kind
            if kind == RESULT:
                self._on_result(link, ledger, message)
            elif kind == STARTED:
                for task_id in unpack_ids(message.body):
                    task = ledger.inflight.get(task_id)
                    if task is not None and task.state is TaskState.SENT:
                        self._started(task)
            elif kind == CANCELLED_KIND:
                self._on_cancelled(ledger, message.body)
            elif kind == CRASHED:
                (task_id,) = TASK_ID.unpack_from(message.body, 0)
                task = ledger.inflight.pop(task_id, None)
                if task is not None:
                    info = unpack_json(memoryview(message.body)[TASK_ID.size :])
                    self._finish_task(task, exception=crash_error(task_id, link.name, info))
            elif kind == BROKEN:
                reason = unpack_json(message.body)
                if self.broken is None:
                    # Where ProcessPoolExecutor's worker logs it: code that watches this logger
                    # for a failed initializer sees ours too.
                    INITIALIZER_LOG.critical(
                        "Exception in initializer on node %s:\n%s", link.name, reason.get("error", "")
                    )
                self._break(
                    BrokenCluster(
                        f"the initializer failed on node {link.name}, so the executor cannot run tasks; "
                        f"fix the initializer. Remote traceback:\n{reason.get('error', '')}"
                    )
                )
            elif kind == OUTPUT:
                stream, pid = OUTPUT_HEAD.unpack_from(message.body, 0)
                if self.output is not None:
                    self.output.write(link.name, stream, pid, bytes(memoryview(message.body)[OUTPUT_HEAD.size :]))
            elif kind == STATUS_REPLY:
                ledger.answer_status(unpack_json(message.body))
            elif kind != HEARTBEAT:
                raise ProtocolError(f"unexpected message kind {kind}")

    def _started(self, task: Task) -> None:
        task.state = TaskState.STARTED
        mark_running(task.future)
        self._answer(task, False)

    def _on_result(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        task_id, status = RESULT_HEAD.unpack_from(message.body, 0)
        task = ledger.take_result(task_id, time.monotonic())
        if task is None:
            return
        try:
            body, buffers = unpack(memoryview(message.body)[RESULT_HEAD.size :], message.buffers)
            value, exception = decode_result(status, body, buffers, task_id, link.name)
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
        self._finish_task(task, value, exception)

    def _finish_task(self, task: Task, value: object = None, exception: BaseException | None = None) -> None:
        if exception is not None and task.link is not None:
            self._ledgers[task.link].note_failure()
        if isinstance(exception, ClusterError) and not isinstance(exception, RemoteError):  # not the task's own

            UNSEEN.note(task.future, task.task_id, exception)
        self._drop(task)
        future = task.future
        # Running from here on: the task has run, so a cancel() from a user thread before
        # _complete() sets the result must fail, as it does once a task has started.
        mark_running(future)
        self._done.append((future, value, exception))

    def _complete(self) -> None:
        done, self._done = self._done, []
        for future, value, exception in done:
            try:
                if exception is not None:
                    future.set_exception(exception)
                else:
                    future.set_result(value)
            except InvalidStateError:  # cancelled by a user thread meanwhile
                pass

    def _drop(self, task: Task) -> None:
        """Forget a task: no reference to its function, arguments or result remains here."""
        self._tasks.pop(task.task_id, None)
        if task.link is not None:
            self._ledgers[task.link].forget(task)
        task.release()
        self._answer(task, False)

    def _fail(self, task: Task, exception: BaseException) -> None:
        self._finish_task(task, exception=exception)

    # ------------------------------------------------------------------ cancelling

    def _answer(self, task: Task, value: bool) -> None:
        if task.replies:
            for reply in task.replies:
                reply.answer(value)
            task.replies = None

    def _cancel(self, tasks: list[Task], reply: Reply | None) -> None:
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

    def _on_cancelled(self, ledger: NodeLedger, body: Any) -> None:
        cancelled, refused = unpack_cancelled(body)
        for task_id in cancelled:
            task = ledger.inflight.pop(task_id, None)
            if task is not None:
                cancel_and_notify(task.future)
                self._answer(task, True)
                self._drop(task)
        for task_id in refused:
            task = ledger.inflight.get(task_id)
            if task is not None:
                self._answer(task, False)

    # ------------------------------------------------------------------ stopping the workers

    def _stop_workers(self, how: int) -> None:
        """Cancel what has not been sent, stop, and ask every connected node to signal this
        executor's workers. Tasks in flight end as their node reports them: cancelled if they
        had not started, their result if they finished first, WorkerStoppedError otherwise."""
        first = not self._stopped_by
        self._stopped_by = STOP_METHODS.get(how, "terminate_workers()")
        self._stop = True
        self._timers_due = 0.0
        if first:
            self._stop_deadline = time.monotonic() + STOP_REPORT_TIMEOUT
        for task in list(self._tasks.values()):
            if task.state is TaskState.QUEUED:
                if cancel_and_notify(task.future):
                    self._drop(task)
                else:  # requeued after its node was lost: it may have started there
                    reason = "it was waiting to be sent again after its node was lost"
                    self._fail(task, self._stopped_error(task, reason))
        self._queue.clear()
        for link, ledger in self._nodes:
            ledger.pinned.clear()
            if link.state is LinkState.READY and link.channel is not None:
                # Queued on the channel ahead of BYE, which _finish sends: the node hears it first.
                link.channel.send(SIGNAL_WORKERS, SIGNAL_HEAD.pack(how))

    def _stopped_error(self, task: Task, reason: str) -> WorkerStoppedError:
        node = task.link.name if task.link is not None else "(none)"
        return WorkerStoppedError(
            f"task {task.task_id} on node {node}: {self._stopped_by} was called while it was in flight, "
            f"and {reason}, so whether it ran is unknown. The executor is shut down; to run the task again, "
            "submit it to a new executor."
        )

    def _abandon_in_flight(self) -> None:
        """The nodes did not report every task in time after the workers were signalled."""
        for task in list(self._tasks.values()):
            self._fail(
                task, self._stopped_error(task, f"its node did not report its outcome within {STOP_REPORT_TIMEOUT:g}s")
            )

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, prefetch: bool = True) -> None:
        """Fill every ready link: first one task per free worker, round robin, then (with
        ``prefetch``) the tasks sent ahead."""
        if self._stopped_by:
            return  # nothing is sent once the workers are stopped
        queue = self._queue
        if not queue and not any(ledger.pinned for ledger in self._ledgers.values()):
            return
        ready = [(link, ledger) for link, ledger in self._nodes if link.state is LinkState.READY]
        if not ready:
            return
        for link, ledger in ready:
            pinned = ledger.pinned
            while pinned and len(ledger.inflight) < ledger.capacity(link.workers):
                self._send(link, ledger, pinned.popleft())
        if not queue:
            return
        for ahead in (False, True) if prefetch else (False,):
            progress = True
            while queue and progress:
                progress = False
                for link, ledger in ready:
                    if queue and len(ledger.inflight) < (ledger.capacity(link.workers) if ahead else link.workers):
                        self._send(link, ledger, queue.popleft())
                        progress = True

    def _send(self, link: NodeLink, ledger: NodeLedger, task: Task) -> bool:
        if not task.mark_sent(to_idle_worker=len(ledger.inflight) < link.workers):
            self._drop(task)
            return False
        channel = link.channel
        assert channel is not None
        function = task.function
        if (function.payload.by_value or task.payload.by_value) and link.python_version() != LOCAL_PYTHON:
            blocker = function.payload.main_blocker or task.payload.main_blocker
            self._fail(task, version_skew_error(task.task_id, link.name, link.python_version(), blocker))
            return False
        modules = ledger.modules_to_ship(self.preload, function.payload.modules + task.payload.modules)
        if modules:
            body, buffers = encode_sources(modules)
            if link.codec:
                body, buffers = pack(body, buffers, link.codec)
            channel.send(MODULES, body, buffers)
        forget = ledger.record_sent(task)
        if forget is not None:  # the session lacks the function: make room, then send it
            for digest in forget:
                channel.send(FORGET, digest)
            code = function.payload.packed(link.codec) if link.codec else function.payload
            channel.send(FUNC, function.digest + code.body, code.buffers)
        # Usually packed already, by the submitting thread (see ClusterExecutor._queue).
        args = task.payload.packed(link.codec) if link.codec else task.payload
        channel.send(TASK, TASK_HEAD.pack(task.task_id, function.digest, task.flags) + args.body, args.buffers)
        task.link = link
        return True

    def _flush(self) -> None:
        for link, ledger in self._nodes:
            channel = link.channel
            if channel is not None and channel.wants_write:
                link.on_event(EVENT_WRITE, time.monotonic())
                if link.state is not LinkState.READY:
                    self._timers_due = 0.0
                    if link.state is LinkState.LOST and ledger.inflight:
                        self._requeue_lost(link, ledger)
                self._sync(link)

    # ------------------------------------------------------------------ faults

    def _requeue_lost(self, link: NodeLink, ledger: NodeLedger) -> None:
        """The session on ``link`` is over (lost, or replaced by a new connection): its tasks in
        flight go back to the queue, up to ``retries`` times."""
        tasks = ledger.reset()
        tasks.reverse()  # each goes back to the front of the queue: the oldest ends up first
        if self._stopped_by:
            for task in tasks:
                self._fail(task, self._stopped_error(task, f"node {link.name} was lost ({link.error})"))
            return
        for task in tasks:
            task.link = None
            task.attempts += 1
            if task.attempts > self.retries:
                self._fail(
                    task,
                    NodeLostError(
                        f"task {task.task_id} was lost with node {link.name} ({link.error}); "
                        f"it was sent {task.attempts} times, more than retries={self.retries}"
                    ),
                )
                continue
            task.state = TaskState.QUEUED
            self._answer(task, False)
            if task.target is not None:
                self._ledgers[task.target].pinned.appendleft(task)
            else:
                self._queue.appendleft(task)

    def _fail_pinned(self, link: NodeLink, ledger: NodeLedger) -> None:
        """Tasks given to one node with submit_to fail once that node stays down too long."""
        reason = link.loss_reason or link.error
        while ledger.pinned:
            task = ledger.pinned.popleft()
            self._fail(
                task,
                NodeLostError(
                    f"task {task.task_id} was for node {link.name}, which has been down for more than "
                    f"reconnect_window={self.reconnect_window:g}s ({reason})"
                ),
            )

    def _all_lost_for(self, window: float, now: float) -> bool:
        return all(
            link.state is not LinkState.READY and link.down_since and now - link.down_since >= window
            for link in self.links
        )

    def _lost_summary(self) -> str:
        lines = [f"  {link.name}: {link.loss_reason or link.error}" for link in self.links]
        return "every node of the cluster is lost; no task can run:\n" + "\n".join(lines)

    def _break(self, error: BrokenCluster) -> None:
        if self.broken is None:
            self.broken = error
            log.error("%s", error)
        for task in list(self._tasks.values()):
            self._fail(task, error)
        self._queue.clear()
        for ledger in self._ledgers.values():
            ledger.pinned.clear()
        self.first_round.set()

    def _finish(self) -> None:
        for link in self.links:
            if link.channel is not None and link.state is LinkState.READY:
                try:
                    link.channel.send(BYE)
                    link.channel.sock.setblocking(True)
                    link.channel.sock.settimeout(1.0)
                    link.channel.flush()
                except (OSError, ClusterError, Exception):
                    pass
            link.close()
        if self.output is not None:
            self.output.flush()
        leftover = BrokenCluster("the executor was shut down before these tasks could run")
        for task in list(self._tasks.values()):
            self._fail(task, self.broken or leftover)
        self._complete()
        for closer in self._closers:
            try:
                closer()
            except Exception:
                log.exception("clusterexec: stopping a local node failed")
        self._poller.close()
        self._mailbox.close()
        self.first_round.set()


LOCAL_PYTHON = "{}.{}".format(*sys.version_info[:2])


def version_skew_error(task_id: int, node: str, remote: str, main_blocker: str | None = None) -> ClusterError:
    """The error for bytecode that cannot run on a node's other Python minor version; with
    ``main_blocker``, it also says which line of the main script kept it from being re-run."""
    why = f" The main script is not re-run on workers because of {main_blocker}." if main_blocker else ""
    return ClusterError(
        f"task {task_id} cannot run on node {node}: its function or arguments hold code pickled by value "
        f"(a lambda, a closure, a function defined inside another, or a function of a main script whose "
        f"top-level code is not only definitions, so it is not re-run on workers), and bytecode does not "
        f"travel between Python versions: this client runs Python {LOCAL_PYTHON}, node {node} runs Python "
        f"{remote}. Move the function into a module (it then travels by source), or put the main script's "
        'other top-level code under `if __name__ == "__main__":`, or run the same Python version on both sides.' + why
    )


def _readable(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False

