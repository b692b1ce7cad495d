"""Scheduling: no worker idles while a task sent ahead to another node has not started.

Two real nodes with one worker each. The first task blocks its worker until the test releases
it; the tasks after it are spread over both nodes, some sent ahead to the blocked one. The idle
node's worker must get them all, taken back from the blocked node, while the first task still
blocks: each task runs exactly once (a marker file per run), and none on the blocked worker.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import helpers
import pytest
from conftest import wait_until

from clusterexec import ClusterExecutor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from linksim import LinkSimulator  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_tasks_sent_ahead_to_a_busy_node_are_taken_back_for_an_idle_worker(
    node_factory, key_file: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(2)]
    started, release = tmp_path / "started", tmp_path / "release"
    markers = tmp_path / "markers"
    markers.mkdir()
    with ClusterExecutor([n.address for n in nodes], key_file=key_file) as ex:
        blocked = ex.submit(helpers.block_pid, str(started), str(release))
        helpers.wait_for_file(str(started))
        quick = [ex.submit(helpers.write_marker, str(markers / f"task-{i}")) for i in range(40)]
        # All of them finish while the first node's only worker is still blocked.
        pids = {int(Path(f.result(timeout=30)).read_text()) for f in quick}
        assert not blocked.done()
        release.touch()
        blocked_pid = blocked.result(timeout=30)
    assert blocked_pid not in pids and len(pids) == 1
    assert sorted(os.listdir(markers)) == sorted(f"task-{i}" for i in range(40))  # each ran once


def test_a_withdrawn_task_is_still_cancellable_and_ends_once(
    node_factory, key_file: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(2)]
    started, release = tmp_path / "started", tmp_path / "release"
    with ClusterExecutor([n.address for n in nodes], key_file=key_file) as ex:
        first = ex.submit(helpers.block, str(started), str(release), "first")
        helpers.wait_for_file(str(started))
        second_started = tmp_path / "second"
        second = ex.submit(helpers.block, str(second_started), str(release), "second")
        helpers.wait_for_file(str(second_started))  # both workers busy now
        waiting = [ex.submit(helpers.square, i) for i in range(20)]
        cancelled = [f for f in waiting[10:] if f.cancel()]
        release.touch()
        assert first.result(timeout=30) == "first" and second.result(timeout=30) == "second"
        for i, future in enumerate(waiting):
            if future in cancelled:
                assert future.cancelled()
            else:
                assert future.result(timeout=30) == i * i


def test_tasks_given_to_a_node_with_submit_to_are_never_taken_back_for_another_node(
    node_factory, key_file: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """An idle worker takes back tasks sent ahead to a busy node, but not those pinned to it:
    ``submit_to(node)`` means that node, even while its worker is held by a long task."""
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(2)]
    busy = nodes[0].address
    started, release = tmp_path / "started", tmp_path / "release"
    markers = tmp_path / "markers"
    markers.mkdir()
    with ClusterExecutor([n.address for n in nodes], key_file=key_file) as ex:
        blocked = ex.submit_to(busy, helpers.block_pid, str(started), str(release))
        helpers.wait_for_file(str(started))
        pinned = [ex.submit_to(busy, helpers.write_marker, str(markers / f"pinned-{i}")) for i in range(4)]
        # The other node's worker goes idle again and again, each time looking for tasks sent
        # ahead that it could take back; a taken-back task would run before the next probe.
        for i in range(5):
            quick = [ex.submit(helpers.write_marker, str(tmp_path / f"quick-{i}-{j}")) for j in range(10)]
            for future in quick:
                future.result(timeout=30)
        assert not any(f.done() for f in pinned)
        assert os.listdir(markers) == [], "a task given to the busy node ran elsewhere"
        release.touch()
        blocked_pid = blocked.result(timeout=30)
        assert {int(Path(f.result(timeout=30)).read_text()) for f in pinned} == {blocked_pid}


def test_two_idle_workers_both_take_back_from_a_node_that_answers_slowly(
    node_factory, key_file: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """Two nodes go idle at once while a third, behind a 250 ms one-way link, holds two tasks
    sent ahead of its blocked worker. The first idle node asks for one; the node asked is passed
    over until it answers, so the second finds nothing to ask for then. The answer must send it
    looking again: both tasks start on the idle nodes while the slow node's worker is still
    blocked. (Heartbeats every 60 s: no other report would wake the second idle node.)"""
    slow, a, b = (node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(3))
    release_slow, release_gates, release_tasks = (tmp_path / name for name in ("slow", "gates", "tasks"))
    with LinkSimulator() as sim:
        link = sim.link(slow.address, delay=0.25)
        addresses = [link.address, a.address, b.address]
        with ClusterExecutor(addresses, key_file=key_file, heartbeat_interval=60, heartbeat_timeout=120) as ex:
            futures = [ex.submit_to(link.address, helpers.block, str(tmp_path / "slow-started"), str(release_slow))]
            futures += [
                ex.submit_to(node, helpers.block, str(tmp_path / f"gate-{i}"), str(release_gates))
                for i, node in enumerate((a.address, b.address))
            ]
            for started in ("slow-started", "gate-0", "gate-1"):
                helpers.wait_for_file(str(tmp_path / started))
            # Tasks given to the fast nodes fill what they may hold, so the next two can only be
            # sent ahead to the slow node.
            futures += [ex.submit_to(node, helpers.square, i) for node in (a.address, b.address) for i in range(30)]
            held = [ex.submit(helpers.block, str(tmp_path / f"task-{i}"), str(release_tasks), i) for i in range(2)]
            wait_until(lambda: ex.stats().nodes[link.address].queued == 2, 30, "two tasks sent to the slow node")
            release_gates.touch()  # both fast nodes run their tasks, then go idle together
            for i in range(2):
                helpers.wait_for_file(str(tmp_path / f"task-{i}"), timeout=15)
            assert not futures[0].done()  # the slow node's worker is still blocked
            release_tasks.touch()
            release_slow.touch()
            assert [f.result(timeout=30) for f in held] == [0, 1]
            for future in futures:
                future.result(timeout=30)


def test_a_recheck_that_falls_due_while_tasks_wait_in_the_client_does_not_spin_the_io_thread(
    node_factory, key_file: Path  # type: ignore[no-untyped-def]
) -> None:
    """The dispatcher may ask to look again for tasks to take back at a later time. If that time
    comes while tasks wait in the client's queue, it is consumed all the same: the I/O thread
    must not wake at once, again and again, until the queue empties (it did: a whole core for
    the rest of a map, `short` at 5x its ideal). The client's CPU stays small while it waits."""
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        assert ex.submit(helpers.square, 3).result(timeout=30) == 9
        waiting = [ex.submit(time.sleep, 0.2) for _ in range(16)]  # more than the node may hold
        wait_until(lambda: ex.stats().queued > 0, 30, "tasks waiting in the client")
        before = resource.getrusage(resource.RUSAGE_SELF)
        ex._scheduler._dispatcher.recheck_at = time.monotonic()  # due now, with tasks queued
        for future in waiting:
            future.result(timeout=30)
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.5, f"the client used {cpu:.2f}s of CPU while its tasks slept for about 3 s"
