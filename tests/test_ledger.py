"""The per-node ledger on its own, without sockets: what is in flight on a node, which
functions and modules its session holds, and what a new session forgets."""

from __future__ import annotations

import itertools

import pytest

from clusterexec.client import ledger as ledger_module
from clusterexec.client.ledger import MAX_PREFETCH, MIN_PREFETCH, PREFETCH_SECONDS, NodeLedger
from clusterexec.client.tasks import Reply, Task, TaskFuture, TaskState
from clusterexec.code.serialize import FunctionPayload, Payload
from clusterexec.code.shipping import ModuleSource

_ids = itertools.count(1)


class NoScheduler:
    """A TaskFuture's scheduler, for tasks that never leave this test."""

    def cancel_sent(self, task: Task) -> bool:
        return False


def function(name: str, size: int = 10) -> FunctionPayload:
    return FunctionPayload(name.encode().ljust(16, b"-"), Payload(b"f" * size))


def task(fn: FunctionPayload | None = None) -> Task:
    new = Task(TaskFuture(NoScheduler()), fn or function("f"), Payload(b"args"))
    new.task_id = next(_ids)
    return new


def module(name: str) -> ModuleSource:
    return ModuleSource(name, False, f"{name}.py", b"x = 1\n", name.encode().ljust(16, b"-"))


def test_the_first_task_of_a_function_sends_the_function_and_later_ones_do_not() -> None:
    ledger = NodeLedger()
    fn = function("square")
    first, second = task(fn), task(fn)

    assert ledger.record_sent(first) == []  # send it; nothing to forget first
    assert ledger.record_sent(second) is None  # the session holds it
    assert ledger.inflight == {first.task_id: first, second.task_id: second}
    assert ledger.function_refs == {fn.digest: 2}


def test_a_result_takes_its_task_out_of_flight_and_counts_it() -> None:
    ledger = NodeLedger()
    sent = task()
    ledger.record_sent(sent)

    assert ledger.take_result(sent.task_id, now=1.0) is sent
    assert ledger.inflight == {}
    assert ledger.tasks_done == 1
    assert ledger.take_result(sent.task_id, now=2.0) is None  # a second answer is ignored
    assert ledger.tasks_done == 1


def test_forgetting_a_task_releases_its_function() -> None:
    ledger = NodeLedger()
    fn = function("f")
    first, second = task(fn), task(fn)
    ledger.record_sent(first)
    ledger.record_sent(second)

    ledger.forget(first)
    assert ledger.function_refs == {fn.digest: 1}
    ledger.forget(second)
    assert ledger.function_refs == {}
    assert fn.digest in ledger.functions  # still cached on the node, now evictable


def test_a_full_function_cache_evicts_the_least_recently_used_function_no_task_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger_module, "MAX_FUNCTIONS", 3)
    ledger = NodeLedger()
    old, busy, recent = function("old"), function("busy"), function("recent")
    for fn in (old, busy, recent):
        done = task(fn)
        ledger.record_sent(done)
        ledger.forget(done)
    ledger.record_sent(task(busy))  # busy is in use again: it is not evicted
    ledger.record_sent(task(old))  # old is used again: now the most recent

    evicted = ledger.record_sent(task(function("new")))
    assert evicted == [recent.digest]
    assert list(ledger.functions) == [busy.digest, old.digest, function("new").digest]


def test_a_cache_over_its_byte_budget_evicts_until_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "MAX_FUNCTION_BYTES", 100)
    ledger = NodeLedger()
    big = [function(f"big{n}", size=40) for n in range(3)]
    for fn in big:
        done = task(fn)
        assert ledger.record_sent(done) == []
        ledger.forget(done)

    assert ledger.record_sent(task(function("next", size=40))) == [big[0].digest]


def test_modules_are_shipped_once_per_session() -> None:
    ledger = NodeLedger()
    a, b = module("a"), module("b")

    assert ledger.modules_to_ship((a,), (b, a)) == [a, b]
    assert ledger.modules_to_ship((a,), (b,)) == []
    ledger.reset()
    assert ledger.modules_to_ship((), (b,)) == [b]


def test_reset_forgets_everything_of_the_old_session_and_returns_its_tasks_oldest_first() -> None:
    ledger = NodeLedger()
    tasks = [task(function(name)) for name in ("a", "b", "c")]
    for sent in reversed(tasks):
        ledger.record_sent(sent)
    ledger.modules_to_ship((module("m"),), ())
    waiter = Reply()
    ledger.await_status(waiter)
    pinned = task()
    ledger.pinned.append(pinned)
    done = task()
    ledger.record_sent(done)
    ledger.take_result(done.task_id, now=1.0)

    assert ledger.reset() == tasks
    assert ledger.inflight == {}
    assert not ledger.functions and not ledger.function_refs and not ledger.modules_sent
    assert waiter.event.is_set() and waiter.value is None  # no answer will come from that session
    assert ledger.status_waiters == []
    # What belongs to the node, not to the session, stays.
    assert list(ledger.pinned) == [pinned]
    assert ledger.tasks_done == 1


def test_a_status_answer_reaches_every_waiter_once() -> None:
    ledger = NodeLedger()
    first, second = Reply(), Reply()
    ledger.await_status(first)
    ledger.await_status(second)

    ledger.answer_status({"workers": 4})
    assert first.value == second.value == {"workers": 4}
    assert ledger.status_waiters == []


def test_capacity_follows_the_interval_between_results() -> None:
    ledger = NodeLedger()
    # At first: the initial estimate of the interval.
    assert ledger.capacity(2) == 2 + max(MIN_PREFETCH, int(PREFETCH_SECONDS / ledger_module.INITIAL_INTERVAL), 2)

    # Fast results: deep prefetch, up to its bound.
    now = 0.0
    for _ in range(200):
        sent = task()
        ledger.record_sent(sent)
        now += 1e-8
        ledger.take_result(sent.task_id, now)
    assert ledger.capacity(2) == 2 + MAX_PREFETCH

    # Slow results: one task sent ahead per worker, no more.
    for _ in range(200):
        sent = task()
        ledger.record_sent(sent)
        now += 1.0
        ledger.take_result(sent.task_id, now)
    assert ledger.capacity(2) == 4
    assert ledger.capacity(1) == 1 + MIN_PREFETCH


def test_stats_count_tasks_waiting_on_the_node_running_done_and_failed() -> None:
    ledger = NodeLedger()
    waiting, running, done = task(), task(), task()
    for sent in (waiting, running, done):
        ledger.record_sent(sent)
    running.state = TaskState.STARTED
    ledger.take_result(done.task_id, now=1.0)
    ledger.note_failure()
    ledger.pinned.append(task())

    stats = ledger.stats()
    assert (stats.queued, stats.in_flight, stats.done, stats.failed) == (2, 1, 1, 1)


def test_capacity_covers_the_round_trip_of_the_link() -> None:
    near, far = NodeLedger(), NodeLedger()
    for ledger, rtt in ((near, 0.0002), (far, 0.02)):
        ledger.seed_rtt(rtt)
        now = 0.0
        for _ in range(100):  # results every 100 us once the pipe is full
            sent = task()
            ledger.record_sent(sent, now)
            now += 1e-4
            ledger.take_result(sent.task_id, now)
    # Enough in flight for the work of the link's round trips (and a few ms more) at that pace.
    assert far.capacity(1) > near.capacity(1) * 5
    assert far.capacity(1) >= 1 + int((PREFETCH_SECONDS + 2 * 0.02) / 1e-4) - 1


def test_tasks_sent_to_a_free_worker_measure_the_round_trip() -> None:
    ledger = NodeLedger()
    ledger.seed_rtt(0.001)  # the handshake's
    ledger.seed_rtt(0.5)  # a seed never replaces an estimate
    assert ledger.rtt == 0.001
    for i in range(30):
        sent = task()
        sent.to_idle = True
        ledger.record_sent(sent, now=float(i))
        ledger.take_result(sent.task_id, float(i) + 0.02)  # the link got slower: 20 ms now
    assert ledger.rtt == pytest.approx(0.02, rel=0.01)
    queued = task()  # sent behind busy workers: its wait is not the link's
    ledger.record_sent(queued, now=100.0)
    ledger.take_result(queued.task_id, 105.0)
    assert ledger.rtt == pytest.approx(0.02, rel=0.01)
    long = task()  # a free worker ran it for 5 s: that is the task's time, not the link's
    long.to_idle = True
    ledger.record_sent(long, now=200.0)
    ledger.take_result(long.task_id, 205.02, run_time=5.0)
    assert ledger.rtt == pytest.approx(0.02, rel=0.01)


def test_tasks_sent_ahead_can_be_withdrawn_newest_first_until_they_start() -> None:
    ledger = NodeLedger()
    ahead = []
    for _ in range(5):
        sent = task()
        sent.state = TaskState.SENT  # as the dispatcher leaves a task sent ahead of the free workers
        ledger.record_sent(sent)
        ahead.append(sent)
    ledger.started(ahead[4].task_id)  # the newest has started meanwhile: it stays
    taken = ledger.to_withdraw(2)
    assert [t.task_id for t in taken] == [ahead[3].task_id, ahead[2].task_id]
    assert all(t.withdrawing for t in taken) and ledger.withdrawing == 2
    assert ledger.to_withdraw(5) == [ahead[1], ahead[0]]  # not the ones already asked for
    for t in taken:
        ledger.forget(t)  # the node gave them back
    assert ledger.withdrawing == 2 and set(ledger.ahead) == {ahead[0].task_id, ahead[1].task_id}
    assert not ledger.reset() or ledger.withdrawing == 0


def test_of_two_nodes_whose_oldest_tasks_waited_alike_the_one_with_more_ahead_waits_longer() -> None:
    """The idle worker's choice: the newest task ahead on a node with two waits longer than the
    only one on a node whose oldest task was sent at the same time."""
    one, two = NodeLedger(), NodeLedger()
    for ledger, count in ((one, 1), (two, 2)):
        for _ in range(count):
            sent = task()
            sent.state = TaskState.SENT
            ledger.record_sent(sent, now=10.0)
    assert two.queued_seconds(10.6) > one.queued_seconds(10.6) == pytest.approx(0.6)


def test_a_task_given_to_a_node_is_never_withdrawn_from_it() -> None:
    """``submit_to``: the task is the node's; an idle worker elsewhere may not take it back."""
    ledger = NodeLedger()
    pinned = task()
    pinned.target = object()  # type: ignore[assignment]  # the link it was given to
    pinned.state = TaskState.SENT
    ledger.record_sent(pinned)
    assert ledger.to_withdraw(1) == [] and ledger.queued_seconds(100.0) == 0.0


def test_tasks_ahead_become_worth_taking_back_once_the_oldest_has_waited_long_enough() -> None:
    ledger = NodeLedger()
    for now in (10.0, 10.5):
        sent = task()
        sent.state = TaskState.SENT
        ledger.record_sent(sent, now=now)
    when = ledger.worth_taking_back_at(3.0)
    assert when == pytest.approx(11.5)  # two tasks ahead: the oldest has waited 1.5 s
    assert ledger.queued_seconds(when - 0.01) < 3.0 <= ledger.queued_seconds(when + 0.01)
