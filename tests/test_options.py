"""Per-task options: ``ex.options(timeout=, retries=, node=)`` and its view's submit and map.

Real nodes and workers: a task past its timeout has its worker process SIGKILLed by the node
(checked with psutil), fails with TaskTimeoutError (a TimeoutError), and the pool heals.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import NodeProcess, wait_until

from clusterexec import ClusterExecutor, ConfigurationError, NodeLostError, TaskTimeoutError

pytestmark = pytest.mark.timeout(60)


def test_a_task_past_its_timeout_is_killed_and_the_pool_heals(executor: ClusterExecutor, tmp_path: Path) -> None:
    pid_file = str(tmp_path / "pid")
    fast = executor.options(timeout=1.0)
    doomed = fast.submit(helpers.write_pid_then_sleep, pid_file, 60)
    neighbour = executor.submit(helpers.sleep_then, 0.2, "fine")  # on the other worker
    wait_until(lambda: os.path.exists(pid_file), what="the task to start")
    pid = int(Path(pid_file).read_text())
    with pytest.raises(TaskTimeoutError) as caught:
        doomed.result(timeout=20)
    assert isinstance(caught.value, TimeoutError)
    message = str(caught.value)
    assert "timeout of 1s" in message and str(pid) in message and "replaced" in message
    assert neighbour.result(timeout=20) == "fine"
    wait_until(lambda: not psutil.pid_exists(pid), what=f"worker {pid} to be gone")
    # The pool healed: both workers serve again, and the replacement is a new process.
    pids = set(executor.map(helpers.sleep_and_pid, [0.3] * 4))
    assert len(pids) == 2 and pid not in pids


def test_tasks_within_their_timeout_run_as_usual(executor: ClusterExecutor) -> None:
    fast = executor.options(timeout=30)
    assert list(fast.map(helpers.square, range(50))) == [x * x for x in range(50)]
    assert fast.submit(helpers.add, 2, b=3).result(timeout=20) == 5
    # Chunked maps carry the option too.
    assert list(fast.map(helpers.square, range(20), chunksize=7)) == [x * x for x in range(20)]


def test_a_map_raises_the_timeout_at_its_item(executor: ClusterExecutor) -> None:
    results = executor.options(timeout=0.5).map(helpers.sleep_then, [0.0, 30.0, 0.0], ["a", "b", "c"])
    assert next(results) == "a"
    with pytest.raises(TaskTimeoutError):
        next(results)


def test_the_executor_itself_keeps_no_timeout(executor: ClusterExecutor) -> None:
    executor.options(timeout=0.2)
    assert executor.submit(helpers.sleep_then, 0.6, "slow").result(timeout=20) == "slow"


def test_a_view_is_an_executor_and_its_shutdown_leaves_the_executor_open(executor: ClusterExecutor) -> None:
    with executor.options(timeout=10) as view:
        assert isinstance(view, Executor)
        futures = [view.submit(helpers.sleep_then, 0.05, i) for i in range(6)]
    assert all(f.done() for f in futures)
    assert executor.submit(helpers.square, 3).result(timeout=20) == 9
    # Options chain: the new one changes what it names and keeps the rest.
    chained = view.options(retries=0)
    assert chained.task_options.timeout == 10 and chained.task_options.retries == 0
    assert view.options(timeout=None).task_options.timeout is None


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"timeout": 0}, ValueError, "greater than 0"),
        ({"timeout": -1.5}, ValueError, "greater than 0"),
        ({"timeout": float("inf")}, ValueError, "finite"),
        ({"timeout": "10"}, TypeError, "number of seconds"),
        ({"retries": -1}, ValueError, "0 or more"),
        ({"retries": 1.5}, TypeError, "int"),
        ({"node": "192.0.2.1:1"}, ConfigurationError, "not one of this executor's nodes"),
    ],
)
def test_bad_options_are_refused_with_what_was_wrong(
    executor: ClusterExecutor, kwargs: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        executor.options(**kwargs)  # type: ignore[arg-type]


def test_node_option_pins_tasks_as_submit_to_does(node_factory, key_file: Path) -> None:
    first: NodeProcess = node_factory("--workers", "1", "--key-file", str(key_file))
    second: NodeProcess = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([first.address, second.address], key_file=key_file) as ex:
        pinned = ex.options(node=second.address)
        node_pids = {second.process.pid}
        parents = {psutil.Process(p).ppid() for p in pinned.map(helpers.sleep_and_pid, [0.01] * 8)}
        assert parents == node_pids
        assert psutil.Process(ex.submit_to(second.address, helpers.pid).result(timeout=20)).ppid() == second.process.pid


def test_retries_per_task_override_the_executors(node_factory, key_file: Path, tmp_path: Path) -> None:
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(3)]
    with ClusterExecutor([n.address for n in nodes], key_file=key_file, retries=3) as ex:
        never_again = ex.options(retries=0).submit(helpers.kill_node_once, str(tmp_path / "first"))
        with pytest.raises(NodeLostError, match="retries=0"):
            never_again.result(timeout=30)
        once_more = ex.options(retries=1).submit(helpers.kill_node_once, str(tmp_path / "second"))
        assert once_more.result(timeout=30) == "survived"
