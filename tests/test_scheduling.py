"""Scheduling: no worker idles while a task sent ahead to another node has not started.

Two real nodes with one worker each. The first task blocks its worker until the test releases
it; the tasks after it are spread over both nodes, some sent ahead to the blocked one. The idle
node's worker must get them all, taken back from the blocked node, while the first task still
blocks: each task runs exactly once (a marker file per run), and none on the blocked worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import helpers
import pytest

from clusterexec import ClusterExecutor

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
