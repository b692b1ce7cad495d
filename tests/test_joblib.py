"""joblib and scikit-learn on clusterexec: ``import clusterexec.joblib`` and the ``"clusterexec"`` backend.

Every test uses real joblib and scikit-learn over real nodes: local ones started by the backend,
a node started by the test, or an executor the test opened.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import joblib
import numpy as np
import psutil
import pytest
from conftest import NodeProcess, wait_until
from joblib import Parallel, delayed
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import clusterexec.joblib
from clusterexec import ClusterExecutor

pytestmark = pytest.mark.timeout(120)

GRID = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}


def node_processes() -> list[psutil.Process]:
    """The clusterexec nodes this test process started (its children running clusterexec.node)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "clusterexec.node" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def where() -> tuple[int, int]:
    """The process a task runs in, and its parent (a worker's parent is its node)."""
    return os.getpid(), os.getppid()


def fail_or_mark(i: int, directory: str) -> int:
    if i == 0:
        raise ValueError("task 0 failed on purpose")
    time.sleep(0.3)
    Path(directory, f"done-{i}").touch()
    return i


def inner_sum(n: int) -> int:
    """A task that itself uses joblib (nested parallelism)."""
    return sum(Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(n)))


def test_import_registers_the_backend() -> None:
    from joblib.parallel import BACKENDS

    assert BACKENDS["clusterexec"] is clusterexec.joblib.ClusterBackend


def test_grid_search_on_the_cluster_equals_the_sequential_run() -> None:
    X, y = load_iris(return_X_y=True)
    sequential = GridSearchCV(SVC(), GRID, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="clusterexec", n_jobs=-1):
        clustered = GridSearchCV(SVC(), GRID).fit(X, y)
    assert clustered.best_params_ == sequential.best_params_
    np.testing.assert_array_equal(clustered.cv_results_["mean_test_score"], sequential.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(clustered.predict(X), sequential.predict(X))


def test_with_nothing_named_it_runs_on_local_nodes_and_stops_them() -> None:
    """The local default: a node hosted by this process for the call, tasks in its worker
    processes, workers gone after."""
    with joblib.parallel_config(backend="clusterexec", n_jobs=2):
        places = Parallel()(delayed(where)() for _ in range(8))
        assert not node_processes(), "a node or a worker outlived its Parallel call"
    assert all(pid != os.getpid() for pid, _ in places)
    assert {parent for _, parent in places} == {os.getpid()}, "the workers of the node this process hosts"


def test_constructor_options_pass_through(node: NodeProcess, key_file: Path) -> None:
    """nodes= and key_file= in parallel_config reach the ClusterExecutor: tasks run on that node."""
    with joblib.parallel_config(backend="clusterexec", nodes=[node.address], key_file=key_file, n_jobs=-1):
        places = Parallel()(delayed(where)() for _ in range(6))
        assert joblib.parallel.get_active_backend()[0].effective_n_jobs(-1) == 2  # the node's 2 workers
    assert {parent for _, parent in places} == {node.process.pid}


def test_an_open_executor_is_reused_and_left_open() -> None:
    with ClusterExecutor(2) as ex:
        mine = {ex.submit(where).result(timeout=30)[1]}
        for _ in range(2):
            with joblib.parallel_config(backend="clusterexec", executor=ex):
                places = Parallel(n_jobs=-1)(delayed(where)() for _ in range(6))
            assert {parent for _, parent in places} == mine
        assert ex.submit(pow, 2, 8).result(timeout=30) == 256  # still open


def test_return_as_generator_yields_as_results_come() -> None:
    with joblib.parallel_config(backend="clusterexec", n_jobs=2):
        ordered = Parallel(return_as="generator")(delayed(pow)(i, 2) for i in range(20))
        assert not isinstance(ordered, list)
        assert list(ordered) == [i * i for i in range(20)]
        unordered = Parallel(return_as="generator_unordered")(delayed(pow)(i, 2) for i in range(20))
        assert sorted(unordered) == [i * i for i in range(20)]


@pytest.mark.parametrize("given", [False, True], ids=["own executor", "executor="])
def test_a_failing_task_aborts_the_rest(tmp_path: Path, given: bool) -> None:
    """The task's own exception is raised, and the batches not started never run."""
    count = 40
    started = time.monotonic()
    with ClusterExecutor(2) if given else _nothing() as ex:
        options = {"executor": ex} if given else {}
        with joblib.parallel_config(backend="clusterexec", n_jobs=2, **options):
            with pytest.raises(ValueError, match="task 0 failed on purpose"):
                Parallel(batch_size=1)(delayed(fail_or_mark)(i, str(tmp_path)) for i in range(count))
        if ex is not None:
            assert ex.submit(pow, 3, 3).result(timeout=30) == 27  # a given executor stays usable
    elapsed = time.monotonic() - started
    done = len(list(tmp_path.glob("done-*")))
    # All of them would take 40 x 0.3 s / 2 workers = 6 s; only those already sent may finish.
    assert done < count // 2, f"{done} of {count - 1} tasks ran after the failure"
    assert elapsed < 20


def test_timeout_is_joblibs() -> None:
    started = time.monotonic()
    with joblib.parallel_config(backend="clusterexec", n_jobs=2):
        with pytest.raises(multiprocessing.TimeoutError):  # joblib's own
            Parallel(timeout=0.5)(delayed(time.sleep)(10) for _ in range(3))
    assert time.monotonic() - started < 8, "the call waited for the sleeping tasks"
    wait_until(lambda: not node_processes(), 30, "the nodes to stop after the timeout")


def test_joblib_inside_a_task_runs_sequentially_there() -> None:
    with joblib.parallel_config(backend="clusterexec", n_jobs=2):
        assert Parallel()(delayed(inner_sum)(n) for n in (3, 4, 5)) == [3, 6, 10]


def test_executor_and_options_together_are_refused() -> None:
    with ClusterExecutor(1) as ex:
        with pytest.raises(ValueError, match="not both"):
            with joblib.parallel_config(backend="clusterexec", executor=ex, nodes=["localhost:1"]):
                pass


class _nothing:
    """A context manager that gives None (no executor of the test's own)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
