"""Handing queued tasks to the nodes: one per free worker first, then tasks sent ahead.

Sending a task also sends what its node's session lacks for it (module sources, the
function), as the node's :class:`~clusterexec.client.ledger.NodeLedger` says. I/O thread only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import LinkState, NodeLink
from clusterexec.client.taskbook import TaskBook
from clusterexec.client.tasks import Task
from clusterexec.code.shipping import ModuleSource, encode_sources
from clusterexec.errors import ClusterError
from clusterexec.wire.compression import pack
from clusterexec.wire.messages import (
    CANCEL,
    FLAG_RUNNING,
    FLAG_TIMEOUT,
    FORGET,
    FUNC,
    MODULES,
    TASK,
    TASK_HEAD,
    TIMEOUT_HEAD,
    pack_ids,
)

# The soonest an idle node looks again for a task sent ahead that is not yet worth taking back.
RECHECK_MIN = 0.001


class Dispatcher:
    """Sends queued and pinned tasks to ready nodes, as far as their capacity goes, and takes
    tasks sent ahead back from a busy node for an idle worker elsewhere.

    It looks only at the nodes that may take more (``hungry``) or that just reported (``fresh``),
    and, once the queue is empty, at those left with a free worker (``idle``) when a node answers
    for tasks taken back or a re-check falls due; never at every node per task: the client's
    cost per task does not grow with the number of nodes.
    """

    def __init__(
        self,
        book: TaskBook,
        nodes: list[tuple[NodeLink, NodeLedger]],
        preload: tuple[ModuleSource, ...],
        timer_at: Callable[[float], None] = lambda when: None,
    ) -> None:
        self.book = book
        self.nodes = nodes
        self.preload = preload
        # Nodes that may take more tasks (below their capacity), in round-robin order.
        self.hungry: dict[NodeLink, NodeLedger] = dict(nodes)
        # Nodes that reported since the last turn: one of them may have a worker gone idle.
        self.fresh: dict[NodeLink, NodeLedger] = {}
        # Nodes holding tasks sent ahead of their free workers (some may have started since):
        # where an idle worker looks for tasks to take back.
        self.holding: dict[NodeLink, NodeLedger] = {}
        # Nodes asked for tasks back and not yet answered, and nodes with a free worker when
        # they last reported: an answer sends those looking again.
        self.asked: dict[NodeLink, NodeLedger] = {}
        self.idle: dict[NodeLink, NodeLedger] = {}
        # When the idle nodes look again because a task sent ahead will have waited long enough
        # to be worth taking back (0: no such time); ``timer_at`` wakes the I/O thread by then.
        self.recheck_at = 0.0
        self._timer_at = timer_at
        self.now = 0.0

    def touch(self, link: NodeLink, ledger: NodeLedger) -> None:
        """``link`` reported or changed state: it may take tasks, or have an idle worker."""
        self.hungry[link] = ledger
        self.fresh[link] = ledger

    def dispatch(self, prefetch: bool = True, now: float = 0.0) -> None:
        """Fill the nodes that may take more: first one task per free worker, round robin, then
        (with ``prefetch``) the tasks sent ahead. With nothing queued, take tasks sent ahead back
        from a busy node for an idle worker."""
        self.now = now or time.monotonic()
        if self.recheck_at and self.now >= self.recheck_at:
            self.recheck_at = 0.0  # the idle nodes look again, as if they had just reported
            self.fresh.update(self.idle)
        if self.book.stopped_by:
            return  # nothing is sent once the workers are stopped
        queue = self.book.queue
        if not queue and not self.book.pinned_waiting:
            if self.fresh:
                self._rebalance()
            return
        hungry = self.hungry
        ready = [(link, ledger) for link, ledger in hungry.items() if link.state is LinkState.READY]
        for link, ledger in ready:
            pinned = ledger.pinned
            while pinned and len(ledger.inflight) < ledger.capacity(link.workers):
                self._send(link, ledger, pinned.popleft())
            while queue and len(ledger.inflight) < link.workers:
                self._send(link, ledger, queue.popleft())
        if prefetch:
            # Each node's capacity, read once per turn: it moves with the pace of results only.
            active = [(link, ledger, ledger.capacity(link.workers)) for link, ledger in ready]
            while queue and active:
                still = []
                for link, ledger, capacity in active:
                    if not queue:
                        break
                    if len(ledger.inflight) < capacity:
                        self._send(link, ledger, queue.popleft())
                        still.append((link, ledger, capacity))
                active = still
        if self.book.pinned_waiting:
            self.book.pinned_waiting = any(ledger.pinned for _, ledger in self.nodes)
        for link, ledger in list(hungry.items()):
            if link.state is not LinkState.READY or len(ledger.inflight) >= ledger.capacity(link.workers):
                del hungry[link]
        if not queue:
            self._rebalance()

    def _rebalance(self) -> None:
        """No worker idles while a task sent ahead to another node has not started: for each
        node that just reported with a free worker, ask the busiest node for tasks it has not
        started (CANCEL; the node answers with those it took back, which go to the queue).

        A node asked already is passed over until it answers, and an answer may hold nothing
        (the tasks had started): each answer sends every node still idle looking again."""
        fresh, self.fresh = self.fresh, {}
        answered = [link for link, ledger in self.asked.items() if not ledger.withdrawing]
        for link in answered:
            del self.asked[link]
        if answered:
            fresh.update(self.idle)
        for link, ledger in fresh.items():
            if link.workers > len(ledger.inflight) and link.state is LinkState.READY:
                self.idle[link] = ledger
            else:
                self.idle.pop(link, None)
        for link, ledger in fresh.items():
            if link not in self.idle:
                continue
            victim = self._busiest(link, ledger)
            if victim is None:
                return  # nothing sent ahead anywhere is worth taking back
            victim_link, victim_ledger = victim
            tasks = victim_ledger.to_withdraw(link.workers - len(ledger.inflight))
            if tasks and victim_link.channel is not None:
                victim_link.channel.send(CANCEL, pack_ids([task.task_id for task in tasks]))
                self.book.dirty[victim_link] = victim_ledger
                self.asked[victim_link] = victim_ledger

    def _busiest(self, thief: NodeLink, thief_ledger: NodeLedger) -> tuple[NodeLink, NodeLedger] | None:
        """The node whose tasks sent ahead wait longest, if taking one back beats waiting: the
        round trips to ask and to resend cost less than the wait."""
        best: tuple[NodeLink, NodeLedger] | None = None
        best_wait = 0.0
        for link, ledger in list(self.holding.items()):
            if not ledger.ahead or link.state is not LinkState.READY:
                del self.holding[link]  # nothing left to take back there
                continue
            if link is thief or ledger.withdrawing:
                continue
            wait = ledger.queued_seconds(self.now)
            if wait > best_wait:
                best, best_wait = (link, ledger), wait
        if best is None:
            return None
        threshold = best[1].rtt + 2 * thief_ledger.rtt
        if best_wait <= threshold:
            # Not yet: look again once it is (an earlier report may come first).
            when = max(self.now + RECHECK_MIN, best[1].worth_taking_back_at(threshold))
            if not self.recheck_at or when < self.recheck_at:
                self.recheck_at = when
                self._timer_at(when)
            return None
        return best

    def _send(self, link: NodeLink, ledger: NodeLedger, task: Task) -> bool:
        to_idle = len(ledger.inflight) < link.workers
        if not task.mark_sent(to_idle_worker=to_idle):
            self.book.drop(task)
            return False
        task.to_idle = to_idle
        if not to_idle:
            self.holding[link] = ledger
        channel = link.channel
        assert channel is not None
        function = task.function
        if (function.payload.by_value or task.payload.by_value) and link.python_version() != LOCAL_PYTHON:
            blocker = function.payload.main_blocker or task.payload.main_blocker
            self.book.fail(task, version_skew_error(task.task_id, link.name, link.python_version(), blocker))
            return False
        modules = ledger.modules_to_ship(self.preload, function.payload.modules + task.payload.modules)
        if modules:
            body, buffers = encode_sources(modules)
            if link.codec:
                body, buffers = pack(body, buffers, link.codec)
            channel.send(MODULES, body, buffers)
        forget = ledger.record_sent(task, self.now)
        if forget is not None:  # the session lacks the function: make room, then send it
            for digest in forget:
                channel.send(FORGET, digest)
            code = function.payload.packed(link.codec) if link.codec else function.payload
            channel.send(FUNC, function.digest + code.body, code.buffers)
        # Usually packed already, by the submitting thread (see ClusterExecutor._queue).
        args = task.payload.packed(link.codec) if link.codec else task.payload
        flags = task.flags | FLAG_RUNNING if to_idle else task.flags
        if task.timeout is None:
            head = TASK_HEAD.pack(task.task_id, function.digest, flags)
        else:
            head = TASK_HEAD.pack(task.task_id, function.digest, flags | FLAG_TIMEOUT)
            head += TIMEOUT_HEAD.pack(min(max(1, round(task.timeout * 1000)), 0xFFFFFFFF))
        channel.send(TASK, head + args.body, args.buffers)
        self.book.dirty[link] = ledger
        task.link = link
        return True

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
