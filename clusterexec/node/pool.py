"""One session's worker processes: started on demand, reused while warm, retired when idle.

A :class:`WorkerPool` forks a session's workers through its node (each gets the session's
initializer and shipped modules first), finds an idle one for a task, and retires those idle
for longer than the node's ``--worker-idle-timeout`` or spent (``max_tasks_per_child``). What
the workers' messages mean stays the session's business; how many may run at once is the
node's run slots' (:mod:`clusterexec.node.slots`).
"""

from __future__ import annotations

import math
import os
import socket
import time

from clusterexec.errors import ProtocolError
from clusterexec.node.host import NodeHost, WorkerOwner, WorkerProcess, WorkerState
from clusterexec.node.request import SessionRequest
from clusterexec.wire.channel import Channel
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    FLAG_RUNNING,
    FLAG_TIMEOUT,
    FORGET,
    FUNC,
    STOP,
    TASK,
    TASK_HEAD,
    TASK_ID,
    task_timeout,
)
from clusterexec.wire.sealing import PlainOpener, PlainSealer

# A worker whose last task took less than SHORT_TASK seconds may hold more tasks of the same
# function at once (see WorkerPool.pipelines), about PIPELINE_SECONDS of them at that pace, so it
# never waits for the node between tiny tasks; others get one at a time, so long tasks are never
# queued behind each other while another worker is free.
SHORT_TASK = 0.001
PIPELINE_SECONDS = 0.002


class WorkerPool:
    """The live worker processes of one session. Single-threaded: the node's loop."""

    def __init__(self, node: NodeHost, owner: WorkerOwner) -> None:
        self.node = node
        self.owner = owner
        self.workers: list[WorkerProcess] = []
        self.request = SessionRequest()  # the session's, once its client sent it
        self.modules: list[Message] = []  # MODULES messages every worker gets, in order
        self.functions: dict[bytes, Message] = {}  # FUNC messages by digest, sent to a worker on first use

    def spawn(self) -> WorkerProcess:
        """Fork a worker and queue the session's initializer and modules for it."""
        request = self.request
        parent, child = socket.socketpair()
        pipes = [os.pipe(), os.pipe()] if request.output else []
        pid = self.node.fork_worker(child, [w for _, w in pipes], request.compression)
        child.close()
        for _, w in pipes:
            os.close(w)
        parent.setblocking(False)
        channel = Channel(parent, PlainSealer(), PlainOpener(), chunked=self.node.chunked_buffers)
        worker = WorkerProcess(pid, channel, output=[r for r, _ in pipes], idle_since=time.monotonic())
        self.workers.append(worker)
        self.node.watch_worker(self.owner, worker)
        if request.init is not None:
            self.send(worker, request.init)
        for message in self.modules:
            self.send(worker, message)
        return worker

    def spawn_within_bound(self, count: int) -> None:
        """Start up to ``count`` workers, as many as the node's process bound has room for
        without stopping another session's."""
        for _ in range(min(count, self.node.process_room())):
            self.spawn()

    def send(self, worker: WorkerProcess, message: Message) -> None:
        """Queue a message for one worker, as it came."""
        worker.channel.send(message.kind, message.body, message.buffers)
        self.node.want_write(worker.channel)

    def add_modules(self, message: Message) -> None:
        """A MODULES message: every worker gets it now, every later one when it starts."""
        self.modules.append(message)
        for worker in self.workers:
            self.send(worker, message)

    def give(self, worker: WorkerProcess, message: Message) -> int:
        """Send a TASK message to ``worker``, its function first if the worker lacks it; return
        the task's id, or -1 if the client counts it as running already (FLAG_RUNNING: no
        STARTED report for it). Raises ProtocolError for a task whose function the client
        never sent."""
        task_id, digest, flags = TASK_HEAD.unpack_from(message.body, 0)
        if flags & FLAG_TIMEOUT:  # it runs alone on this worker: its clock starts now
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
        self.node.want_write(worker.channel)
        return -1 if flags & FLAG_RUNNING else task_id

    def forget(self, digest: bytes) -> None:
        """The client dropped a function: forget it, and have the workers that hold it forget it."""
        self.functions.pop(digest, None)
        for worker in self.workers:
            if digest in worker.functions:
                worker.functions.discard(digest)
                worker.channel.send(FORGET, digest)
                self.node.want_write(worker.channel)

    def note_pace(self, worker: WorkerProcess, task: Message, took: float) -> None:
        """``worker`` ended ``task`` ``took`` seconds after its previous task (or its start):
        if that is under SHORT_TASK, more tasks of the same function may queue on it."""
        if took < SHORT_TASK:
            worker.short = bytes(task.body[TASK_ID.size : TASK_HEAD.size - 1])
            worker.depth = min(self.node.pipeline, max(2, int(PIPELINE_SECONDS / max(took, 1e-6))))
        else:
            worker.short = b""

    def pipelines(self, worker: WorkerProcess, task: Message, depth: int) -> bool:
        """Whether ``task`` may queue on busy ``worker`` as its ``depth``-th task: only a task of
        the function whose last task the worker ran in under SHORT_TASK, up to about
        PIPELINE_SECONDS of them at that pace (at most the node's ``pipeline``), so that a tiny
        task never waits for the node; and so that the first tasks of a new map never queue
        behind each other on the strength of the previous map's pace."""
        return (
            0 < len(worker.outstanding) < depth <= worker.depth
            and worker.short == task.body[TASK_ID.size : TASK_HEAD.size - 1]
            and self.accepting(worker)
            and not worker.timeout
        )

    def accepting(self, worker: WorkerProcess) -> bool:
        """True if ``worker`` may be given another task."""
        if worker.state is not WorkerState.RUNNING:
            return False
        limit = self.request.max_tasks_per_child
        return not limit or worker.assigned < limit

    def idle(self) -> WorkerProcess | None:
        """The idle worker that last ran a task (the others age towards their retirement), or None."""
        found: WorkerProcess | None = None
        for worker in self.workers:
            if not worker.outstanding and self.accepting(worker):
                if found is None or worker.idle_since > found.idle_since:
                    found = worker
        return found

    def longest_idle(self) -> WorkerProcess | None:
        """The worker idle for longest (the one to stop when the node needs room), or None."""
        found: WorkerProcess | None = None
        for worker in self.workers:
            if not worker.outstanding and worker.state is WorkerState.RUNNING:
                if found is None or worker.idle_since < found.idle_since:
                    found = worker
        return found

    def retire(self, worker: WorkerProcess) -> None:
        """Stop an idle worker: it exits once it reads STOP, and is reaped as usual."""
        worker.state = WorkerState.RETIRING
        worker.channel.send(STOP)
        self.node.want_write(worker.channel)
        self.workers.remove(worker)
        self.node.retire_worker(worker)

    def retire_idle(self, now: float, timeout: float) -> float:
        """Retire the workers idle for ``timeout`` seconds or more (0: never); return when the
        next one will have been (``math.inf`` if none is idle)."""
        if timeout <= 0:
            return math.inf
        due = math.inf
        for worker in list(self.workers):
            if worker.outstanding or worker.state is not WorkerState.RUNNING:
                continue
            if now - worker.idle_since >= timeout:
                self.retire(worker)
            else:
                due = min(due, worker.idle_since + timeout)
        return due

    def kill_all(self) -> None:
        """Kill every worker (SIGTERM now, SIGKILL after a grace period)."""
        for worker in list(self.workers):
            self.workers.remove(worker)
            worker.state = WorkerState.KILLED
            self.node.retire_worker(worker, kill=True)
