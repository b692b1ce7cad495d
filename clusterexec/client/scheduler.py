"""The client I/O thread: the task queue, dispatch to nodes, results, cancels, retries.

One thread owns every node link, the queue and the completion of futures; user threads only
append tasks to ``_new`` or post calls to the :class:`~clusterexec.client.mailbox.Mailbox`, whose
wake-up costs one byte per batch.
Tasks move QUEUED -> SENT -> STARTED -> DONE; a task handed to an idle worker is STARTED (and its
future running) as it is sent. A task SENT ahead of the free workers but not started can be
cancelled, which takes a round trip to the node. A lost node's tasks go back to the queue,
up to ``retries`` times.

The loop and the timers are here; the tasks and their outcomes are the
:class:`~clusterexec.client.taskbook.TaskBook`'s, what is on each node its
:class:`~clusterexec.client.ledger.NodeLedger`'s, sending them the
:class:`~clusterexec.client.dispatch.Dispatcher`'s. Messages from nodes are dispatched by kind
through one table, built once.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from clusterexec.client.dispatch import Dispatcher
from clusterexec.client.inbox import Inbox
from clusterexec.client.inprocess import HostedLink
from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import LinkState, NodeLink, all_lost_for, lost_summary, readable
from clusterexec.client.mailbox import Mailbox
from clusterexec.client.output import OutputPrinter
from clusterexec.client.report import ClusterStats, NodeStats, NodeStatus
from clusterexec.client.taskbook import TaskBook
from clusterexec.client.tasks import Reply, Task, TaskFuture, task_to_cancel
from clusterexec.client.watch import LinkWatch
from clusterexec.code.shipping import ModuleSource
from clusterexec.errors import BrokenCluster, ClusterError, NodeLostError, ProtocolError
from clusterexec.wire.messages import (
    BYE,
    SIGNAL_HEAD,
    SIGNAL_WORKERS,
    STATUS,
    pack_json,
)
from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

log = logging.getLogger("clusterexec")

CANCEL_TIMEOUT = 10.0
# Rounds of hand-over to the hosted nodes per loop turn before the loop looks at its sockets again.
PUMP_ROUNDS = 8


class Scheduler:
    """Runs the I/O thread for one executor. Thread-safe entry points are marked."""

    def __init__(
        self,
        links: list[NodeLink],
        *,
        retries: int,
        heartbeat_timeout: float,
        reconnect_window: float,
        closers: list[Callable[[], None]] | None = None,
        preload: tuple[ModuleSource, ...] = (),
        output: OutputPrinter | None = None,
    ) -> None:
        self.links = links
        # What has been put on each node, and the pairs for loops that need both.
        self._ledgers = {link: NodeLedger() for link in links}
        self._nodes = list(self._ledgers.items())
        self._book = TaskBook(self._ledgers, retries, reconnect_window)
        self._dispatcher = Dispatcher(self._book, self._nodes, preload, self._timer_at)
        self.output = output
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_window = reconnect_window
        # Kept, not copied: the executor appends what stops nodes that join later (a Slurm job).
        self._closers = closers if closers is not None else []
        self._ids = itertools.count(1)
        self._new: deque[Task] = deque()
        self._poller = Poller()
        # Links to a node hosted by this thread (the local executor's): the loop runs them.
        self._hosted = [link for link in links if isinstance(link, HostedLink)]
        for hosted in self._hosted:
            hosted.attach(self._poller, self._timer_at)
        self._watch = LinkWatch(self._poller)
        self._sync = self._watch.sync
        self._mailbox = Mailbox()
        self._stop = False
        self.broken: BrokenCluster | None = None
        self.first_round = threading.Event()
        self.first_outcome: list[tuple[bool, ClusterError | None]] = []
        self._thread = threading.Thread(target=self._run, name="clusterexec-io", daemon=True)
        self._io_ident = 0
        # The timers (deadlines, heartbeats, reconnects, the reconnect window) are scanned when
        # the earliest is due, or at once after a link leaves READY: not on every wake-up.
        self._timers_due = 0.0
        # What each message kind from a node means, and who handles it.
        self._inbox = Inbox(self._book, self._dispatcher, output, self._break, lambda: self.broken is not None)

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
            self._mailbox.call_soon(self._book.cancel, [task], None)
            return False
        reply = Reply()
        self._mailbox.call_soon(self._book.cancel, [task], reply)
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
            self._mailbox.call_soon(self._book.cancel, tasks, None)

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

    def add_link(self, link: NodeLink) -> None:
        """Add a node to the running executor (a Slurm node that came up after the first).
        Thread-safe; the I/O thread connects it and gives it tasks once it is ready."""
        self._mailbox.call_soon(self._add_link, link)

    def ask_status(self, link: NodeLink, reply: Reply, packages: list[str]) -> None:
        """Ask a node for its status (with its versions of ``packages``); ``reply`` gets the
        answer, or None if the node is not connected. Thread-safe; returns at once."""
        self._mailbox.call_soon(self._ask_status, link, reply, packages)

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
        queued = len(self._book.queue) + len(self._new)
        for link, ledger in self._nodes:
            nodes[link.name] = ledger.stats()
        return ClusterStats(queued, nodes, self._book.reruns, self._book.late_results)

    def node_statuses(self) -> list[NodeStatus]:
        """Every node's link state and task counts, for ``ex.nodes``. Thread-safe (a snapshot)."""
        return [link.status(len(ledger.inflight), ledger.tasks_done) for link, ledger in self._nodes]

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        if self._hosted and hasattr(signal, "pthread_sigmask"):
            # A hosted node's workers are started from this thread and inherit its signal mask:
            # a Ctrl-C while one starts waits until it ignores SIGINT (see node/workers.py).
            # Signals go to the main thread anyway.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
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
        book = self._book
        dispatch = self._dispatcher.dispatch
        hosted = self._hosted
        while True:
            now = time.monotonic()
            if now >= self._timers_due:
                self._timers_due = now + self._timers(now)
                self._flush(every=True)  # anything a path forgot to mark for writing
                self._note_first_round()
                if all_lost_for(self.links, self.reconnect_window, now) and (book.tasks or self._stop):
                    self._break(BrokenCluster(lost_summary(self.links)))
                    if self._stop:
                        return
            if hosted:
                self._pump()  # what the timers had the hosted nodes say
            ready = self._poller.select(max(0.0, self._timers_due - now))
            for hosted_link in hosted:
                hosted_link.batch(ready)
            for fd, events, link in ready:
                if link is None:
                    mailbox.on_readable()
                elif isinstance(link, NodeLink):
                    self._on_link_event(link, events)
                else:
                    link(fd, events)  # a hosted node's worker: its channel, output or exit
            for hosted_link in hosted:
                hosted_link.batch(None)
            if self._new or mailbox.has_calls:
                self._take_new()
                mailbox.run_calls()
                if self._stop or any(link.state is not LinkState.READY for link in self.links):
                    self._timers_due = 0.0
            dispatch(now=time.monotonic())
            self._flush()
            if hosted:
                self._pump()
            if book.done:
                book.complete()
            if not first_round.is_set():
                self._note_first_round()
            if self._stop and not book.outstanding():
                return

    def _pump(self) -> None:
        """Run the hosted nodes: hand each what was sent to it and take what it answered, then
        send what that made room for, until they are quiet (or come back at once)."""
        for _ in range(PUMP_ROUNDS):
            busy = [link for link in self._hosted if link.pending()]
            if not busy:
                return
            for link in busy:
                self._on_link_event(link, EVENT_READ)
            self._dispatcher.dispatch(now=time.monotonic())
            self._flush()
        self._timers_due = 0.0  # still talking: no wait in select() before the next round

    def _timer_at(self, when: float) -> None:
        """A hosted node's timer: the timers run by ``when``."""
        if when < self._timers_due:
            self._timers_due = when

    def _note_first_round(self) -> None:
        """Once every node has been tried, record the outcome for the constructor, then wake it."""
        if self.first_round.is_set():
            return
        if all(link.state in (LinkState.READY, LinkState.LOST) for link in self.links):
            self.first_outcome = [(link.state is LinkState.READY, link.error) for link in self.links]
            self.first_round.set()

    def _take_new(self) -> None:
        new = self._new
        book = self._book
        while new:
            task = new.popleft()
            if self.broken is not None:
                book.fail(task, self.broken)
            else:
                book.add(task)

    # ------------------------------------------------------------------ posted by user threads

    def _cancel_pending(self) -> None:
        # As ProcessPoolExecutor's manager thread fills its call queue before it acts on
        # shutdown: idle workers get their tasks first (those run), then the rest is cancelled.
        self._dispatcher.dispatch(prefetch=False)
        self._book.cancel(list(self._book.tasks.values()), None)

    def _add_link(self, link: NodeLink) -> None:
        if not self._stop and self.broken is None:  # the book and the dispatcher share these containers
            self._ledgers[link] = ledger = NodeLedger()
            self.links.append(link)
            self._nodes.append((link, ledger))
            self._connect(link, ledger, time.monotonic())
            self._sync(link)
            self._timers_due = 0.0

    def _stop_after_tasks(self) -> None:
        self._stop = True

    def _ask_status(self, link: NodeLink, reply: Reply, packages: list[str] | None) -> None:
        if link.state is LinkState.READY and link.channel is not None:
            self._ledgers[link].await_status(reply)
            link.channel.send(STATUS, pack_json({"packages": packages}) if packages else b"")
            self._book.dirty[link] = self._ledgers[link]
        else:
            reply.answer(None)

    def _timers(self, now: float) -> float:
        timeout = 1.0
        if self._dispatcher.recheck_at:  # idle workers look again for tasks to take back then
            timeout = max(0.0, min(timeout, self._dispatcher.recheck_at - now))
        book = self._book
        if book.stopped_by:
            if now >= book.stop_deadline:
                book.abandon_in_flight()
            else:
                timeout = min(timeout, book.stop_deadline - now)
        for link, ledger in self._nodes:
            link.check_deadline(now)
            if (
                link.state is LinkState.READY
                and now - link.last_heard > self.heartbeat_timeout
                and not readable(link.sock)  # heartbeats may be waiting unread (a GIL-holding user thread)
            ):
                link.lose(NodeLostError(f"node {link.name} sent no heartbeat for {self.heartbeat_timeout:g}s"))
            timeout = min(timeout, link.ping_if_due(now))
            if link.state is not LinkState.READY and ledger.pinned and link.down_since:
                if now - link.down_since >= self.reconnect_window:
                    book.fail_pinned(link, ledger)
            if link.state is LinkState.LOST:
                if ledger.inflight:
                    book.requeue_lost(link, ledger)
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
        self._book.requeue_lost(link, ledger)
        link.connect(now)

    def _on_link_event(self, link: NodeLink, events: int) -> None:
        now = time.monotonic()
        messages = link.on_event(events, now)
        ledger = self._ledgers[link]
        if messages:
            try:
                self._inbox.handle(link, ledger, messages)
            except (ProtocolError, ValueError, KeyError) as exc:
                link.lose(ClusterError(f"node {link.name} sent a malformed message ({exc})"))
        if link.state is LinkState.READY:
            ledger.seed_rtt(link.handshake_rtt)
            self._dispatcher.touch(link, ledger)
        if link.state is not LinkState.READY:
            self._timers_due = 0.0
            if link.state is LinkState.LOST and ledger.inflight:
                self._book.requeue_lost(link, ledger)
        self._sync(link)

    # ------------------------------------------------------------------ stopping the workers

    def _stop_workers(self, how: int) -> None:
        """Cancel what has not been sent, stop, and ask every connected node to signal this
        executor's workers (see :meth:`TaskBook.stop_workers` for the tasks in flight)."""
        self._book.stop_workers(how)
        self._stop = True
        self._timers_due = 0.0
        for link in self.links:
            if link.state is LinkState.READY and link.channel is not None:
                # Queued on the channel ahead of BYE, which _finish sends: the node hears it first.
                link.channel.send(SIGNAL_WORKERS, SIGNAL_HEAD.pack(how))
                self._book.dirty[link] = self._ledgers[link]

    def _flush(self, every: bool = False) -> None:
        """Write what was queued for the nodes since the last turn (``every``: look at every node)."""
        dirty = self._book.dirty
        if not dirty and not every:
            return
        nodes = self._nodes if every else list(dirty.items())
        dirty.clear()
        for link, ledger in nodes:
            channel = link.channel
            if channel is not None and channel.wants_write:
                link.on_event(EVENT_WRITE, time.monotonic())
                if link.state is not LinkState.READY:
                    self._timers_due = 0.0
                    if link.state is LinkState.LOST and ledger.inflight:
                        self._book.requeue_lost(link, ledger)
                self._sync(link)

    # ------------------------------------------------------------------ faults

    def _break(self, error: BrokenCluster) -> None:
        if self.broken is None:
            self.broken = error
            log.error("%s", error)
        self._book.fail_all(error)
        self.first_round.set()

    def _finish(self) -> None:
        for link in self.links:
            if link.channel is not None and link.state is LinkState.READY:
                try:
                    link.channel.send(BYE)
                    sock = link.channel.sock  # None for a hosted node: close() hands BYE over
                    if sock is not None:
                        sock.setblocking(True)
                        sock.settimeout(1.0)
                        link.channel.flush()
                except (OSError, ClusterError, Exception):
                    pass
            link.close()
        if self.output is not None:
            self.output.flush()
        leftover = BrokenCluster("the executor was shut down before these tasks could run")
        self._book.fail_all(self.broken or leftover)
        self._book.complete()
        for closer in self._closers:
            try:
                closer()
            except Exception:
                log.exception("clusterexec: stopping a local node failed")
        self._poller.close()
        self._mailbox.close()
        self.first_round.set()

