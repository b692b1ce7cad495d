"""One client's session on a node: its worker processes, its task queue, routing bytes.

The session never unpickles user payloads. It reads the fixed headers of TASK and RESULT
messages (task id, function digest) and forwards the rest as it came. Tasks wait in the
session's queue until a worker is free; only queued tasks can be cancelled. A worker that
dies fails the one task it was running, and the session starts a replacement.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence

from clusterexec.errors import ProtocolError
from clusterexec.node.host import NodeHost, WorkerProcess, WorkerState, describe_status, exit_report
from clusterexec.node.limits import kill_overdue, timed
from clusterexec.node.request import SessionRequest
from clusterexec.wire.channel import Channel
from clusterexec.wire.frames import AnyBuffer, Message
from clusterexec.wire.messages import (
    BROKEN,
    CANCELLED,
    CRASHED,
    FORGET,
    FUNC,
    HEARTBEAT,
    OUTPUT,
    OUTPUT_HEAD,
    RESULT,
    RESULT_HEAD,
    SIGNAL_HEAD,
    STARTED,
    STATUS_OK,
    STATUS_REPLY,
    STOP,
    TASK,
    TASK_HEAD,
    TASK_ID,
    WELCOME,
    WORKERS_KILL,
    WORKERS_TERMINATE,
    Kind,
    pack_cancelled,
    pack_ids,
    pack_json,
    task_timeout,
    unexpected,
    unpack_ids,
    unpack_json,
)
from clusterexec.wire.messages import (
    FLAG_TIMEOUT as TIMED,
)
from clusterexec.wire.sealing import Buffer, PlainOpener, PlainSealer

log = logging.getLogger("clusterexec.node")

# A worker whose last task took less than SHORT_TASK seconds gets up to PIPELINE tasks at
# once, so it never waits for the node between tiny tasks; others get one at a time, so
# long tasks are never queued behind each other while another worker is free.
PIPELINE = 4
# Tasks given to workers are reported STARTED to the client only if they are still running
# STARTED_DELAY seconds later: a quick result implies the start, and saves the client a wake-up.
STARTED_DELAY = 0.001
SHORT_TASK = 0.001
KILL_GRACE = 2.0
# What SIGNAL_WORKERS asks for: the signal sent, and the client method named in reports.
WORKER_SIGNALS = {
    WORKERS_TERMINATE: (signal.SIGTERM, "terminate_workers()"),
    WORKERS_KILL: (signal.SIGKILL, "kill_workers()"),
}


class SessionState(enum.Enum):
    """Where a session is in its life."""

    WAITING = "waiting for the session request"
    ACTIVE = "active"
    HALTED = "workers stopped by the client"
    BROKEN = "broken"
    CLOSED = "closed"


class Session:
    """One authenticated client connection and the workers that serve it."""

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
        self.workers: list[WorkerProcess] = []
        self.queue: deque[Message] = deque()
        self.functions: dict[bytes, Message] = {}
        self.started: dict[int, None] = {}
        self.started_due = 0.0
        self.request = SessionRequest()  # the client's terms, once its SESSION message came
        self.modules: list[Message] = []
        self.max_tasks_per_child = 0
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
            if self.state is SessionState.CLOSED:
                return
            handler = handlers.get(message.kind)
            if handler is None:
                raise unexpected(message.kind, "from the client")
            handler(self, message)
        self.dispatch()

    def _on_task(self, message: Message) -> None:
        if len(message.body) < TASK_HEAD.size:
            raise ProtocolError("TASK message is shorter than its header")
        if self.state is SessionState.HALTED:
            # No task starts once the client has stopped its workers.
            self._to_client(CANCELLED, pack_cancelled([TASK_ID.unpack_from(message.body, 0)[0]], []))
            return
        self.queue.append(message)

    def _on_func(self, message: Message) -> None:
        if len(message.body) < 16:
            raise ProtocolError("FUNC message is shorter than its digest")
        self.functions[bytes(message.body[:16])] = message

    def _on_modules(self, message: Message) -> None:
        self.modules.append(message)
        for worker in self.workers:
            self._to_worker(worker, message)

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
        self.request = request = SessionRequest.parse(message, self.max_workers)
        self.max_tasks_per_child = request.max_tasks_per_child  # read on every dispatch
        for _ in range(request.workers):
            self._spawn()
        self.state = SessionState.ACTIVE
        welcome = {"workers": request.workers, "compression": request.compression, **self.node.describe()}
        self._to_client(WELCOME, pack_json(welcome))
        self.next_heartbeat = time.monotonic() + request.heartbeat_interval
        self.node.timer_at(self.next_heartbeat)
        codec = f", {request.compression} compression" if request.compression else ""
        log.info("session from %s started with %d workers%s", self.peer, request.workers, codec)

    def _on_cancel(self, message: Message) -> None:
        ids = unpack_ids(message.body)
        wanted = set(ids)
        kept: deque[Message] = deque()
        cancelled: list[int] = []
        for message in self.queue:
            (task_id,) = TASK_ID.unpack_from(message.body, 0)
            if task_id in wanted:
                cancelled.append(task_id)
            else:
                kept.append(message)
        self.queue = kept
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
        if len(message.body) < SIGNAL_HEAD.size:
            raise ProtocolError("SIGNAL_WORKERS message is shorter than its header")
        (how,) = SIGNAL_HEAD.unpack_from(message.body, 0)
        if how not in WORKER_SIGNALS:
            raise ProtocolError(f"SIGNAL_WORKERS asks for unknown signal kind {how}")
        if self.state not in (SessionState.ACTIVE, SessionState.HALTED):
            return  # no session yet, or its workers are already stopped (broken, closed)
        signum, self.stopped_by = WORKER_SIGNALS[how]
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
        digest = bytes(message.body[:16])
        self.functions.pop(digest, None)
        for worker in self.workers:
            if digest in worker.functions:
                worker.functions.discard(digest)
                worker.channel.send(FORGET, digest)
                self.node.want_write(worker.channel)

    # ------------------------------------------------------------------ dispatch

    def _accepting(self, worker: WorkerProcess) -> bool:
        if worker.state is not WorkerState.RUNNING:
            return False
        return not self.max_tasks_per_child or worker.assigned < self.max_tasks_per_child

    def dispatch(self) -> None:
        """Give queued tasks to free workers; short tasks are pipelined two deep."""
        if not self.queue or self.state is not SessionState.ACTIVE:
            return
        for worker in self.workers:
            if not self.queue:
                break
            if not worker.outstanding and self._accepting(worker):
                self._give(worker, self.queue.popleft())
        for depth in range(2, PIPELINE + 1):
            for worker in self.workers:
                # A task with a timeout never waits behind another on a worker, nor another behind it.
                if not self.queue or timed(self.queue[0]):
                    break
                if worker.short and len(worker.outstanding) < depth and self._accepting(worker) and not worker.timeout:
                    self._give(worker, self.queue.popleft())
        if self.started and not self.started_due:
            self.started_due = time.monotonic() + STARTED_DELAY
            self.node.timer_at(self.started_due)

    def _give(self, worker: WorkerProcess, message: Message) -> None:
        task_id, digest, flags = TASK_HEAD.unpack_from(message.body, 0)
        if flags & TIMED:
            worker.timeout = task_timeout(message.body, flags)
            worker.deadline = time.monotonic() + (worker.timeout or 0.0)
            self.node.timer_at(worker.deadline)
        if digest not in worker.functions:
            func = self.functions.get(digest)
            if func is None:
                raise ProtocolError(f"task {task_id} refers to a function the client never sent")
            worker.channel.send(FUNC, func.body, func.buffers)
            worker.functions.add(digest)
        worker.channel.send(TASK, message.body, message.buffers)
        if not worker.outstanding:
            worker.busy_since = time.monotonic()
        worker.outstanding.append((task_id, message))
        worker.assigned += 1
        self.started[task_id] = None
        self.node.want_write(worker.channel)

    # ------------------------------------------------------------------ worker side

    def _spawn(self) -> None:
        parent, child = socket.socketpair()
        pipes = [os.pipe(), os.pipe()] if self.request.output else []
        pid = self.node.fork_worker(child, [w for _, w in pipes], self.request.compression)
        child.close()
        for _, w in pipes:
            os.close(w)
        parent.setblocking(False)
        channel = Channel(parent, PlainSealer(), PlainOpener(), chunked=True)
        worker = WorkerProcess(pid, channel, output=[r for r, _ in pipes])
        self.workers.append(worker)
        self.node.watch_worker(self, worker)
        if self.request.init is not None:
            self._to_worker(worker, self.request.init)
        for message in self.modules:
            self._to_worker(worker, message)

    def _to_worker(self, worker: WorkerProcess, message: Message) -> None:
        worker.channel.send(message.kind, message.body, message.buffers)
        self.node.want_write(worker.channel)

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
        worker.outstanding.popleft()
        worker.timeout = None
        started = self.started
        started.pop(task_id, None)
        if not started:
            self.started_due = 0.0  # nothing left to report: no timer wake-up for it
        now = time.monotonic()
        worker.short = now - worker.busy_since < SHORT_TASK
        worker.busy_since = now
        self.tasks_done += 1
        if status != STATUS_OK:  # the status byte is the node's to read; the payload is not
            self.tasks_failed += 1
        self.node.tasks_run += 1
        if self.state in (SessionState.ACTIVE, SessionState.HALTED):
            self._to_client(RESULT, message.body, message.buffers)
        return False

    def _retire_spent(self, worker: WorkerProcess) -> None:
        if (
            self.max_tasks_per_child
            and worker.state is WorkerState.RUNNING
            and worker.assigned >= self.max_tasks_per_child
            and not worker.outstanding
        ):
            worker.state = WorkerState.RETIRING
            worker.channel.send(STOP)
            self.node.want_write(worker.channel)
            self.workers.remove(worker)
            self.node.retire_worker(worker)
            if self.state is SessionState.ACTIVE:
                self._spawn()

    def on_worker_exit(self, worker: WorkerProcess, status: int, maxrss_kb: int) -> None:
        """A worker process was reaped: fail its running task, requeue the rest, replace it."""
        planned = worker.state in (WorkerState.RETIRING, WorkerState.KILLED)
        signalled = worker.state is WorkerState.SIGNALLED
        worker.state = WorkerState.DEAD
        if worker in self.workers:
            self.workers.remove(worker)
        if signalled and self.state is SessionState.HALTED:
            self._report_signalled(worker, status, maxrss_kb)
            return
        if planned or self.state is not SessionState.ACTIVE:
            return
        description = describe_status(status)
        if worker.outstanding:
            running, _ = worker.outstanding.popleft()
            self.tasks_crashed += 1
            info = exit_report(worker.pid, status, maxrss_kb)
            if worker.timed_out is not None:
                info["timeout"] = worker.timed_out
            self._to_client(CRASHED, TASK_ID.pack(running) + pack_json(info))
            level = logging.INFO if worker.timed_out is not None else logging.WARNING  # killed on purpose
            what = "worker %d of session %s died (%s) running task %d"
            log.log(level, what, worker.pid, self.peer, description, running)
            self._requeue(worker)
        else:
            log.warning("worker %d of session %s died (%s) while idle", worker.pid, self.peer, description)
        self._spawn()
        self.dispatch()

    def _report_signalled(self, worker: WorkerProcess, status: int, maxrss_kb: int) -> None:
        """A worker signalled at the client's request is gone: its running task failed, the
        tasks sent ahead to it never started."""
        if not worker.outstanding:
            return
        running, _ = worker.outstanding.popleft()
        info = {**exit_report(worker.pid, status, maxrss_kb), "stopped_by": self.stopped_by}
        self._to_client(CRASHED, TASK_ID.pack(running) + pack_json(info))
        if worker.outstanding:
            self._to_client(CANCELLED, pack_cancelled([task_id for task_id, _ in worker.outstanding], []))
            worker.outstanding.clear()

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
        when due; return when the next timer is due."""
        due = kill_overdue(self.workers, now, self.peer)
        if self.started_due and now >= self.started_due:
            if self.started:
                self._to_client(STARTED, pack_ids(list(self.started)))
                self.started.clear()
            self.started_due = 0.0
        if self.state in (SessionState.ACTIVE, SessionState.HALTED, SessionState.BROKEN) and now >= self.next_heartbeat:
            self._to_client(HEARTBEAT)
            self.next_heartbeat = now + self.request.heartbeat_interval
        if self.started_due:
            due = min(due, self.started_due)
        return min(due, self.next_heartbeat)

    def stop_workers(self) -> None:
        """Kill every worker of this session (SIGTERM now, SIGKILL after a grace period)."""
        for worker in list(self.workers):
            self.workers.remove(worker)
            worker.state = WorkerState.KILLED
            self.node.retire_worker(worker, kill=True)

    def close(self, reason: str) -> None:
        """End the session: close the client connection and kill its workers."""
        if self.state is SessionState.CLOSED:
            return
        opened = self.state is not SessionState.WAITING
        self.state = SessionState.CLOSED
        self.queue.clear()
        self.functions.clear()
        self.stop_workers()
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
