"""One client's session on a node: its task queue, its share of the run slots, routing bytes.

The session never unpickles user payloads. It reads the fixed headers of TASK and RESULT
messages (task id, function digest) and forwards the rest as it came. Tasks wait in the
session's queue until the node's run slots (:mod:`clusterexec.node.slots`) give the session a
slot; only queued tasks can be cancelled. Its worker processes (:mod:`clusterexec.node.pool`)
start on demand. A worker that dies fails the one task it was running, and the session starts
a replacement.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from clusterexec.errors import ProtocolError
from clusterexec.node.halt import KILL_GRACE, read_signal_request, signalled_reports, withdraw_queued
from clusterexec.node.host import NodeHost, WorkerProcess, WorkerState, describe_status
from clusterexec.node.limits import crash_report, kill_overdue, timed
from clusterexec.node.pool import WorkerPool
from clusterexec.node.request import SessionRequest
from clusterexec.node.slots import ACTIVE_LINGER
from clusterexec.wire.channel import Channel
from clusterexec.wire.frames import AnyBuffer, Message
from clusterexec.wire.messages import (
    BROKEN,
    CANCELLED,
    CRASHED,
    HEARTBEAT,
    OUTPUT,
    OUTPUT_HEAD,
    REFUSED,
    RESULT,
    RESULT_HEAD,
    SHARE,
    STARTED,
    STATUS_OK,
    STATUS_REPLY,
    TASK_HEAD,
    TASK_ID,
    WELCOME,
    Kind,
    pack_cancelled,
    pack_ids,
    pack_json,
    unexpected,
    unpack_ids,
    unpack_json,
)
from clusterexec.wire.sealing import Buffer

log = logging.getLogger("clusterexec.node")

# Tasks given to workers are reported STARTED to the client only if they are still running
# STARTED_DELAY seconds later: a quick result implies the start, and saves the client a wake-up.
STARTED_DELAY = 0.001
DIED_RUNNING = "worker %d of session %s died (%s) running task %d"


class SessionState(enum.Enum):
    """Where a session is in its life."""

    WAITING = "waiting for the session request"
    REFUSED = "refused: the node is full"
    ACTIVE = "active"
    HALTED = "workers stopped by the client"
    BROKEN = "broken"
    CLOSED = "closed"


class Session:
    """One authenticated client connection and the workers that serve it.

    It is a :class:`~clusterexec.node.slots.SlotUser` of its node's run slots: ``held``,
    ``waiting_since`` and ``active`` are theirs to read."""

    def __init__(
        self,
        node: NodeHost,
        channel: Channel,
        peer: str,
        max_workers: int,
    ) -> None:
        self.node = node
        self.channel = channel
        self.peer = peer
        self.max_workers = max_workers
        self.state = SessionState.WAITING
        self.pool = WorkerPool(node, self)
        self.workers: list[WorkerProcess] = self.pool.workers
        self.queue: deque[Message] = deque()
        self.started: dict[int, None] = {}
        self.started_due = 0.0
        self.request = SessionRequest()  # the client's terms, once its SESSION message came
        # Of the node's run slots (see clusterexec.node.slots): the slots its workers hold, the
        # tie-break among sessions that hold as many, whether it counts for the shares, and
        # the share its client was last told (0: none yet).
        self.held = 0
        self.cap = 0  # the most it may hold: the workers its client asked for, within the node's
        self.waiting_since = 0.0
        self.active = False
        self.last_busy = 0.0
        self.share = 0
        self.next_heartbeat = 0.0
        self.tasks_done = 0
        self.tasks_failed = 0
        self.tasks_crashed = 0
        self.tasks_cancelled = 0
        self.opened = self.last_heard = time.monotonic()  # last_heard: when the client last sent a byte
        self.paused = False
        self.stopped_by = ""

    # ------------------------------------------------------------------ client side

    def _to_client(self, kind: int, body: Buffer = b"", buffers: Sequence[AnyBuffer] = ()) -> None:
        self.channel.send(kind, body, buffers)
        self.node.want_write(self.channel)

    def on_client_messages(self, messages: list[Message]) -> None:
        """Handle messages from the client, in order.

        Raises ProtocolError for a malformed message or a kind a client does not send (the
        node then ends this session alone)."""
        handlers = CLIENT_HANDLERS
        for message in messages:
            if self.state in (SessionState.CLOSED, SessionState.REFUSED):
                return
            handler = handlers.get(message.kind)
            if handler is None:
                raise unexpected(message.kind, "from the client")
            handler(self, message)
        self.node.grant_slots()
        self.dispatch()

    def _on_task(self, message: Message) -> None:
        if len(message.body) < TASK_HEAD.size:
            raise ProtocolError("TASK message is shorter than its header")
        if self.state is SessionState.HALTED:
            # No task starts once the client has stopped its workers.
            self._to_client(CANCELLED, pack_cancelled([TASK_ID.unpack_from(message.body, 0)[0]], []))
            return
        if not self.queue and not self.held:
            self.waiting_since = time.monotonic()  # it waits for a slot from now
            if not self.active:
                self.active = True  # it counts for the shares again
                self.node.slots.reshare()
        self.queue.append(message)

    def _on_func(self, message: Message) -> None:
        if len(message.body) < 16:
            raise ProtocolError("FUNC message is shorter than its digest")
        self.pool.functions[bytes(message.body[:16])] = message

    def _on_modules(self, message: Message) -> None:
        self.pool.add_modules(message)

    def _on_status(self, message: Message) -> None:
        asked = unpack_json(message.body).get("packages") if len(message.body) else None
        self._to_client(STATUS_REPLY, pack_json(self.node.status(asked if isinstance(asked, list) else None)))

    def _on_bye(self, message: Message) -> None:
        self.close("client said goodbye")

    def _on_ping(self, message: Message) -> None:
        pass  # it kept the connection alive by arriving

    def _on_session(self, message: Message) -> None:
        if self.state is not SessionState.WAITING:
            raise ProtocolError("SESSION message sent twice")
        self.request = self.pool.request = request = SessionRequest.parse(message, self.max_workers)
        self.cap = request.workers
        refusal = self.node.refusal()
        if refusal is not None:
            self.state = SessionState.REFUSED
            self._to_client(REFUSED, pack_json(refusal))
            log.warning("session from %s refused: %s", self.peer, refusal["message"])
            return
        now = time.monotonic()
        self.active, self.last_busy, self.waiting_since = True, now, now
        self.node.slots.join(self)  # sets self.share, and tells the other sessions theirs
        # Its share's workers start now if the process bound has room: a client alone gets
        # every worker at once, as before shares existed; the rest start on demand.
        self.pool.spawn_within_bound(self.share)
        self.state = SessionState.ACTIVE
        welcome = {
            "workers": self.share,
            "capacity": self.node.slots.capacity,
            "compression": request.compression,
            **self.node.describe(),
        }
        self._to_client(WELCOME, pack_json(welcome))
        self.next_heartbeat = now + request.heartbeat_interval
        self.node.timer_at(self.next_heartbeat)
        codec = f", {request.compression} compression" if request.compression else ""
        capacity = self.node.slots.capacity
        log.info("session from %s started with %d workers%s (its share of %d)", self.peer, self.share, codec, capacity)

    def announce_share(self, share: int) -> None:
        """The node's run slots set this session's share: tell the client if it changed."""
        if share == self.share:
            return
        self.share = share
        if self.state in (SessionState.ACTIVE, SessionState.HALTED):
            self._to_client(SHARE, pack_json({"share": share}))
            log.debug("session from %s: share now %d", self.peer, share)

    def _on_cancel(self, message: Message) -> None:
        ids = unpack_ids(message.body)
        self.queue, cancelled = withdraw_queued(self.queue, ids)
        self.tasks_cancelled += len(cancelled)
        done = set(cancelled)
        self._to_client(CANCELLED, pack_cancelled(cancelled, [i for i in ids if i not in done]))

    def _on_signal_workers(self, message: Message) -> None:
        """The client called terminate_workers() or kill_workers(): start no more tasks, cancel
        the queued ones, and signal every worker process of this session.

        Workers stay watched until they are reaped, so a result sent before the signal still
        reaches the client; each task a worker was running is then reported CRASHED, naming
        the method, and the tasks sent ahead to it are reported CANCELLED. Nothing is respawned.
        """
        signum, stopped_by = read_signal_request(message)
        if self.state not in (SessionState.ACTIVE, SessionState.HALTED):
            return  # no session yet, or its workers are already stopped (broken, closed)
        self.stopped_by = stopped_by
        self.state = SessionState.HALTED
        cancelled = [TASK_ID.unpack_from(message.body, 0)[0] for message in self.queue]
        self.queue.clear()
        for worker in self.workers:
            worker.state = WorkerState.SIGNALLED
        self.node.signal_workers(self, signum, KILL_GRACE)
        if cancelled:
            self._to_client(CANCELLED, pack_cancelled(cancelled, []))
        log.info("session from %s: %s called; %d workers signalled", self.peer, self.stopped_by, len(self.workers))

    def _on_forget(self, message: Message) -> None:
        self.pool.forget(bytes(message.body[:16]))

    # ------------------------------------------------------------------ dispatch

    def wants_slot(self) -> bool:
        """True if a queued task could start with one more run slot."""
        return bool(self.queue) and self.held < self.cap and self.state is SessionState.ACTIVE and not self.paused

    def take_slot(self, now: float) -> bool:
        """Start the next queued task on an idle worker, or on a new one if the node's process
        bound has room; False if it has none yet (see :meth:`RunSlots.grant`)."""
        worker = self.pool.idle()
        if worker is None:
            if not self.node.make_room(self):
                return False
            worker = self.pool.spawn()
        self._give(worker, self.queue.popleft())
        self._arm_started()
        return True

    def dispatch(self) -> None:
        """Pipeline queued tasks to workers that hold a run slot and run tiny tasks of the same
        function (see WorkerPool.pipelines), unless another session waits for a slot these
        workers should free."""
        queue = self.queue
        if not queue or self.state is not SessionState.ACTIVE or not self.held:
            return
        if self.node.slots.must_yield(self):
            return
        pipelines = self.pool.pipelines
        for depth in range(2, self.node.pipeline + 1):
            for worker in self.workers:
                # A task with a timeout never waits behind another on a worker, nor another behind it.
                if not queue or timed(queue[0]):
                    break
                if pipelines(worker, queue[0], depth):
                    self._give(worker, queue.popleft())
        self._arm_started()

    def _arm_started(self) -> None:
        if self.started and not self.started_due:
            self.started_due = time.monotonic() + STARTED_DELAY
            self.node.timer_at(self.started_due)

    def _give(self, worker: WorkerProcess, message: Message) -> None:
        if not worker.outstanding:
            self._hold(worker)  # released when its last task ends, or it dies
        task_id = self.pool.give(worker, message)
        if task_id >= 0:
            self.started[task_id] = None  # reported STARTED if it still runs STARTED_DELAY from now

    def _hold(self, worker: WorkerProcess) -> None:
        worker.holds_slot = True
        self.node.slots.hold(self)

    def _release(self, worker: WorkerProcess, now: float) -> None:
        if worker.holds_slot:
            worker.holds_slot = False
            self.node.slots.release(self, now)

    def pause(self, paused: bool) -> None:
        """Back-pressure: while its client does not read, its workers give up their run slots
        (nothing new starts for it) and take them again once it catches up: it stops no one."""
        self.paused = paused
        now = time.monotonic()
        for worker in self.workers:
            if paused:
                self._release(worker, now)
            elif worker.outstanding and not worker.holds_slot:
                self._hold(worker)

    # ------------------------------------------------------------------ worker side

    def on_worker_messages(self, worker: WorkerProcess, messages: list[Message]) -> None:
        """Handle messages from one worker: forward results, note failures.

        Raises ProtocolError for a malformed message or a kind a worker does not send."""
        handlers = WORKER_HANDLERS
        for message in messages:
            handler = handlers.get(message.kind)
            if handler is None:
                raise unexpected(message.kind, f"from worker {worker.pid}")
            if handler(self, worker, message):
                return  # the session broke: nothing more from this batch counts
        self._retire_spent(worker)
        self.node.grant_slots()
        self.dispatch()

    def _on_init_failed(self, worker: WorkerProcess, message: Message) -> bool:
        self._break(unpack_json(message.body))
        return True

    def on_output(self, worker: WorkerProcess, stream: int, data: bytes) -> None:
        """Forward what a worker printed to the client (only this session's client)."""
        if self.state is SessionState.ACTIVE:
            self._to_client(OUTPUT, OUTPUT_HEAD.pack(stream, worker.pid) + data)

    def _on_result(self, worker: WorkerProcess, message: Message) -> bool:
        if worker.output:
            # What the task printed goes out before its result.
            self.node.drain_output(self, worker)
        if len(message.body) < RESULT_HEAD.size:
            raise ProtocolError(f"worker {worker.pid} sent a RESULT shorter than its header")
        task_id, status, _ = RESULT_HEAD.unpack_from(message.body, 0)
        if not worker.outstanding or worker.outstanding[0][0] != task_id:
            raise ProtocolError(f"worker {worker.pid} answered for task {task_id} out of turn")
        outstanding = worker.outstanding
        _, task = outstanding.popleft()
        worker.timeout = None
        started = self.started
        started.pop(task_id, None)
        if not started:
            self.started_due = 0.0  # nothing left to report: no timer wake-up for it
        now = time.monotonic()
        self.pool.note_pace(worker, task, now - worker.busy_since)
        worker.busy_since = now
        if not outstanding:
            worker.idle_since = self.last_busy = now
            self._release(worker, now)
        self.tasks_done += 1
        if status != STATUS_OK:  # the status byte is the node's to read; the payload is not
            self.tasks_failed += 1
        self.node.tasks_run += 1
        if self.state in (SessionState.ACTIVE, SessionState.HALTED):
            self._to_client(RESULT, message.body, message.buffers)
        return False

    def _retire_spent(self, worker: WorkerProcess) -> None:
        limit = self.request.max_tasks_per_child
        if limit and worker.state is WorkerState.RUNNING and worker.assigned >= limit and not worker.outstanding:
            self.pool.retire(worker)
            if self.state is SessionState.ACTIVE:
                self.pool.spawn_within_bound(1)

    def on_worker_exit(self, worker: WorkerProcess, status: int, maxrss_kb: int) -> None:
        """A worker process was reaped: fail its running task, requeue the rest, replace it."""
        planned = worker.state in (WorkerState.RETIRING, WorkerState.KILLED)
        signalled = worker.state is WorkerState.SIGNALLED
        worker.state = WorkerState.DEAD
        if worker in self.workers:
            self.workers.remove(worker)
            self._release(worker, time.monotonic())
        if signalled and self.state is SessionState.HALTED:
            for kind, body in signalled_reports(worker, status, maxrss_kb, self.stopped_by):
                self._to_client(kind, body)
            return
        if planned or self.state is not SessionState.ACTIVE:
            return
        description = describe_status(status)
        if worker.outstanding:
            running, _ = worker.outstanding.popleft()
            self.tasks_crashed += 1
            self._to_client(CRASHED, TASK_ID.pack(running) + pack_json(crash_report(worker, status, maxrss_kb)))
            level = logging.INFO if worker.timed_out is not None else logging.WARNING  # killed on purpose
            log.log(level, DIED_RUNNING, worker.pid, self.peer, description, running)
            self._requeue(worker)
        else:
            log.warning("worker %d of session %s died (%s) while idle", worker.pid, self.peer, description)
        self.pool.spawn_within_bound(1)
        self.node.grant_slots()
        self.dispatch()

    def _requeue(self, worker: WorkerProcess) -> None:
        # Tasks sent ahead to the dead worker had not started: back to the queue front, in order.
        while worker.outstanding:
            _, message = worker.outstanding.pop()
            self.queue.appendleft(message)

    def _break(self, reason: dict[str, object]) -> None:
        if self.state is not SessionState.ACTIVE:
            return
        self.state = SessionState.BROKEN
        self._to_client(BROKEN, pack_json({"reason": "initializer failed", **reason}))
        log.error("session from %s is broken: its initializer failed", self.peer)
        self.stop_workers()

    # ------------------------------------------------------------------ life

    def tick(self, now: float) -> float:
        """Kill workers running a task past its timeout, send STARTED reports and heartbeats
        when due, retire idle workers, stop counting for the shares once out of work; return
        when the next timer is due."""
        overdue = kill_overdue(self.workers, now, self.peer)
        if self.started_due and now >= self.started_due:
            if self.started:
                self._to_client(STARTED, pack_ids(list(self.started)))
                self.started.clear()
            self.started_due = 0.0
        if self.state in (SessionState.ACTIVE, SessionState.HALTED, SessionState.BROKEN) and now >= self.next_heartbeat:
            self._to_client(HEARTBEAT)
            self.next_heartbeat = now + self.request.heartbeat_interval
        due = min(self.next_heartbeat, self.pool.retire_idle(now, self.node.worker_idle_timeout))
        if self.active and not self.queue and not self.held:
            if now - self.last_busy >= ACTIVE_LINGER:
                self.active = False
                self.node.slots.reshare()
            else:
                due = min(due, self.last_busy + ACTIVE_LINGER)
        if self.started_due:
            due = min(due, self.started_due)
        due = min(due, overdue)
        return due if due < math.inf else now + 1.0

    def stop_workers(self) -> None:
        """Kill every worker of this session (SIGTERM now, SIGKILL after a grace period)."""
        now = time.monotonic()
        for worker in self.workers:
            self._release(worker, now)
        self.pool.kill_all()

    def close(self, reason: str) -> None:
        """End the session: close the client connection and kill its workers."""
        if self.state is SessionState.CLOSED:
            return
        opened = self.state not in (SessionState.WAITING, SessionState.REFUSED)
        self.state = SessionState.CLOSED
        self.queue.clear()
        self.pool.functions.clear()
        self.stop_workers()
        self.node.slots.leave(self, time.monotonic())
        # A status probe never opens a session: not worth an INFO line. The counts: tasks run to
        # a result (of which failed: raised), crashed (their worker died), cancelled before start.
        log.log(
            logging.INFO if opened else logging.DEBUG,
            "session from %s ended (%s) after %.1fs: %d tasks run, %d failed, %d crashed, %d cancelled",
            self.peer,
            reason,
            time.monotonic() - self.opened,
            self.tasks_done,
            self.tasks_failed,
            self.tasks_crashed,
            self.tasks_cancelled,
        )


# What each message kind does, looked up once per message (as execnet's Message._types): the
# handlers take the session first. A kind missing here is not the sender's to send, and ends
# the session with an error naming it. Tables of the class's functions, not of one session's
# bound methods, so a session holds no cycle through them and is freed as soon as it ends.
CLIENT_HANDLERS: dict[int, Callable[[Session, Message], None]] = {
    Kind.TASK: Session._on_task,
    Kind.FUNC: Session._on_func,
    Kind.CANCEL: Session._on_cancel,
    Kind.FORGET: Session._on_forget,
    Kind.MODULES: Session._on_modules,
    Kind.SESSION: Session._on_session,
    Kind.STATUS: Session._on_status,
    Kind.SIGNAL_WORKERS: Session._on_signal_workers,
    Kind.BYE: Session._on_bye,
    Kind.PING: Session._on_ping,
}
WORKER_HANDLERS: dict[int, Callable[[Session, WorkerProcess, Message], bool]] = {
    Kind.RESULT: Session._on_result,
    Kind.INIT_FAILED: Session._on_init_failed,
}
