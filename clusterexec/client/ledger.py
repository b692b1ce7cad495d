"""What the client has put on one node: its tasks in flight, the functions and modules its
session holds, who waits for its status, its task counts and its pace.

A :class:`NodeLedger` is bookkeeping only: no sockets. The scheduler keeps one per
:class:`~clusterexec.client.link.NodeLink` and writes it from the I/O thread; a new connection
is a new session on the node, which holds nothing of the old one, so :meth:`NodeLedger.reset`
forgets the old session (when the node is lost, and again when a connection starts).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from clusterexec.client.report import NodeStats
from clusterexec.client.tasks import Reply, Task, TaskState
from clusterexec.code.shipping import ModuleSource

# Prefetch: beyond one task per worker, a node gets the work it does in PREFETCH_SECONDS plus
# PREFETCH_RTTS round trips of its link (the bandwidth-delay product, with room to grow: while
# the pipe runs dry, results come once per round trip and the estimate of the interval between
# them is too long), estimated from the interval between results, between MIN_ and MAX_PREFETCH
# tasks. Long tasks get one task of look-ahead, so work stays balanced over nodes (and what is
# sent ahead can be taken back for an idle worker); tiny tasks get deep pipelines, so the node
# never waits for the client, across a rack or a continent.
PREFETCH_SECONDS = 0.004
PREFETCH_RTTS = 2.0
MIN_PREFETCH = 1
MAX_PREFETCH = 4096
INITIAL_INTERVAL = 0.01
RTT_WEIGHT = 0.3  # of a new round-trip sample in the estimate

# A session's function cache: past either bound, functions no task in flight uses are forgotten,
# least recently used first.
MAX_FUNCTIONS = 256
MAX_FUNCTION_BYTES = 1 << 30


class NodeLedger:
    """The client's account of one node. Written by the I/O thread only; ``stats`` may be read
    from any thread (a moment old)."""

    def __init__(self) -> None:
        # Of the current session; reset() clears them.
        self.inflight: dict[int, Task] = {}
        self.functions: OrderedDict[bytes, int] = OrderedDict()  # digest -> size, least recent first
        self.function_refs: dict[bytes, int] = {}  # digest -> tasks in flight that use it
        self.modules_sent: set[bytes] = set()
        self.preloaded = False  # whether the session was sent the executor's preloaded modules
        self.status_waiters: list[Reply] = []
        # Tasks sent ahead of the free workers and not known to have started: those can still be
        # taken back (withdrawn) for an idle worker elsewhere. Oldest first. Never a task given
        # with submit_to: it runs on its node or nowhere.
        self.ahead: dict[int, Task] = {}
        self.withdrawing = 0  # tasks asked back and not yet answered for
        # Of the node, across sessions: tasks given with submit_to wait here for it to come back.
        self.pinned: deque[Task] = deque()
        self.tasks_done = 0
        self.tasks_failed = 0
        self.last_result = 0.0
        self.result_interval = INITIAL_INTERVAL
        # The link's round-trip time: seeded by the handshake, then measured by tasks sent to a
        # free worker (sent to result, nothing queued ahead of them on the node).
        self.rtt = 0.0

    def reset(self) -> list[Task]:
        """Forget the old session: the tasks in flight (returned, oldest first, for the caller
        to send elsewhere or fail), the functions and modules it held, and who waits for its
        status (answered None: no answer will come). Counts, pace and pinned tasks stay."""
        tasks = sorted(self.inflight.values(), key=lambda task: task.task_id)
        self.inflight.clear()
        self.functions.clear()
        self.function_refs.clear()
        self.modules_sent.clear()
        self.preloaded = False
        self.ahead.clear()
        self.withdrawing = 0
        waiters, self.status_waiters = self.status_waiters, []
        for reply in waiters:
            reply.answer(None)
        return tasks

    # ------------------------------------------------------------------ flow

    def capacity(self, workers: int) -> int:
        """How many tasks may be in flight on a node with ``workers`` workers: one per worker
        plus prefetch, enough to cover the link's round trip."""
        ahead = PREFETCH_SECONDS + PREFETCH_RTTS * self.rtt
        # Rounded up: the interval is a mean, and a run of short tasks must not find the node empty.
        extra = math.ceil(ahead / max(self.result_interval, 1e-7))
        return workers + max(MIN_PREFETCH, min(MAX_PREFETCH, extra), workers)

    def seed_rtt(self, seconds: float) -> None:
        """A first round-trip estimate (the handshake's), kept until tasks measure it."""
        if not self.rtt:
            self.rtt = seconds

    def record_sent(self, task: Task, now: float = 0.0) -> list[bytes] | None:
        """Count ``task`` in flight on the node (sent at ``now``). Returns None if the session
        holds the task's function already; otherwise the function must be sent, after FORGET for
        each digest returned (evicted to make room)."""
        task.sent_at = now
        if task.state is TaskState.SENT and task.target is None:
            self.ahead[task.task_id] = task
        digest = task.function.digest
        functions = self.functions
        if digest in functions:
            functions.move_to_end(digest)
            evicted = None
        else:
            evicted = self._evict()
            functions[digest] = task.function.payload.nbytes
        refs = self.function_refs
        refs[digest] = refs.get(digest, 0) + 1
        self.inflight[task.task_id] = task
        return evicted

    def _evict(self) -> list[bytes]:
        """Make room in a full function cache: drop the least recently used functions that no
        task in flight needs. Returns their digests."""
        functions = self.functions
        total = sum(functions.values())
        evicted = []
        for digest in list(functions):
            if len(functions) < MAX_FUNCTIONS and total < MAX_FUNCTION_BYTES:
                break
            if self.function_refs.get(digest):
                continue
            total -= functions.pop(digest)
            evicted.append(digest)
        return evicted

    def take_result(self, task_id: int, now: float, run_time: float = 0.0) -> Task | None:
        """The task a result is for, no longer in flight; None if it is not in flight here (cancelled,
        or from an old session). Updates the estimate of the interval between results and, with
        the task's ``run_time`` on its worker, of the link's round trip."""
        task = self.inflight.pop(task_id, None)
        if task is not None:
            self.tasks_done += 1
            if self.last_result:
                self.result_interval += 0.1 * (now - self.last_result - self.result_interval)
            self.last_result = now
            self.ahead.pop(task_id, None)
            if task.to_idle and task.sent_at:
                # Sent to a free worker: its time out and back, less its run on the worker, is
                # the link's round trip (and the node's routing).
                sample = max(0.0, now - task.sent_at - run_time)
                self.rtt = sample if not self.rtt else self.rtt + RTT_WEIGHT * (sample - self.rtt)
        return task

    def started(self, task_id: int) -> None:
        """A task sent ahead has started on a worker: it can no longer be withdrawn."""
        self.ahead.pop(task_id, None)

    def to_withdraw(self, count: int) -> list[Task]:
        """Up to ``count`` tasks sent ahead, newest first (the last in line on the node), now
        marked as being asked back."""
        tasks: list[Task] = []
        for task_id in reversed(list(self.ahead)):
            if len(tasks) >= count:
                break
            task = self.ahead[task_id]
            if not task.withdrawing and not task.replies:
                task.withdrawing = True
                tasks.append(task)
        self.withdrawing += len(tasks)
        return tasks

    def queued_seconds(self, now: float) -> float:
        """About how long the newest task sent ahead here will wait for a worker: the tasks
        ahead, one per interval between the node's results, where the interval is at least as
        long as the oldest has waited already (a node whose workers are held by long tasks
        gives no pace to go by). Of two nodes whose oldest tasks have waited alike, the one with
        more tasks ahead keeps its last one waiting longer."""
        if not self.ahead:
            return 0.0
        oldest = next(iter(self.ahead.values()))
        return len(self.ahead) * max(self.result_interval, now - oldest.sent_at)

    def worth_taking_back_at(self, threshold: float) -> float:
        """When :meth:`queued_seconds` passes ``threshold`` if nothing else changes: the pace
        stays, so once the oldest task ahead has waited ``threshold`` over the tasks ahead."""
        oldest = next(iter(self.ahead.values()))
        return oldest.sent_at + threshold / len(self.ahead)

    def forget(self, task: Task) -> None:
        """A task sent here is over (or withdrawn): it is no longer in flight, nor does it hold
        its function."""
        self.inflight.pop(task.task_id, None)
        self.ahead.pop(task.task_id, None)
        if task.withdrawing:
            task.withdrawing = False
            self.withdrawing -= 1
        refs = self.function_refs
        digest = task.function.digest
        count = refs.get(digest, 0) - 1
        if count > 0:
            refs[digest] = count
        else:
            refs.pop(digest, None)

    def note_failure(self) -> None:
        """A task sent here ended with an error."""
        self.tasks_failed += 1

    def modules_to_ship(
        self, preload: tuple[ModuleSource, ...], needed: tuple[ModuleSource, ...]
    ) -> list[ModuleSource]:
        """The module sources the session lacks, each once, now counted as shipped."""
        if self.preloaded:
            if not needed:
                return []  # most tasks: their modules went with the first task of the session
        else:
            self.preloaded = True
            needed = preload + needed
        sent = self.modules_sent
        missing = [m for m in needed if m.digest not in sent]
        if not missing:
            return missing
        unique = list({m.digest: m for m in missing}.values())
        sent.update(m.digest for m in unique)
        return unique

    # ------------------------------------------------------------------ status

    def await_status(self, reply: Reply) -> None:
        """``reply`` waits for the node's answer to a STATUS request."""
        self.status_waiters.append(reply)

    def answer_status(self, info: dict[str, object]) -> None:
        """The node answered: every status waiter gets ``info``."""
        waiters, self.status_waiters = self.status_waiters, []
        for reply in waiters:
            reply.answer(info)

    def stats(self) -> NodeStats:
        """Task counts: waiting on the node (or for it, pinned), running, done, failed. Thread-safe
        (a snapshot, a moment old)."""
        sent = started = 0
        for task in list(self.inflight.values()):
            if task.state is TaskState.STARTED:
                started += 1
            else:
                sent += 1
        return NodeStats(sent + len(self.pinned), started, self.tasks_done, self.tasks_failed)

