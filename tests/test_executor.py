"""The executor contract: ``ClusterExecutor`` behaves as ``concurrent.futures.ProcessPoolExecutor``.

Every test runs real nodes (``python -m clusterexec.node``) and real worker processes on
loopback. Tasks that must wait for the test block on a file appearing (``helpers.block``), so
the tests synchronise on events, never on sleeps.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import inspect
import itertools
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import NodeProcess, wait_until

from clusterexec import (
    AuthenticationError,
    BrokenCluster,
    ClusterExecutor,
    NodeUnreachableError,
    RemoteError,
    WorkerCrashedError,
)

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- helpers



def local_nodes() -> list[psutil.Process]:
    """Local nodes started by ``ClusterExecutor()`` in this process (they run with --exit-with-stdin)."""
    found = []
    for child in psutil.Process().children():
        try:
            cmdline = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if "clusterexec.node" in cmdline and "--exit-with-stdin" in cmdline:
            found.append(child)
    return found


def worker_pids(node: NodeProcess) -> set[int]:
    """The pids of a node's worker processes (its children)."""
    return {child.pid for child in psutil.Process(node.process.pid).children()}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def sent_ahead(future: Future[object]) -> bool:
    """White-box: the task was sent to its node but has not started there."""
    task = getattr(future, "_task", None)
    return task is not None and task.state.value == "sent"


def double(x: int) -> int:
    """A function defined in the test module."""
    return 2 * x


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Path]:
    """The file blocked tasks (``helpers.block``) wait for. Created at teardown at the latest, before
    the executor fixtures shut down, so a failing test never waits for a blocked task."""
    path = tmp_path / "release"
    yield path
    path.touch()


@pytest.fixture
def solo(node_factory, key_file: Path) -> Iterator[ClusterExecutor]:
    """An executor on a node with a single worker: one blocked task holds back every other."""
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    ex = ClusterExecutor([node.address], key_file=key_file)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- construction


def hosted_workers() -> list[psutil.Process]:
    """The workers of a node hosted by this process (``ClusterExecutor(N)``): its children that
    serve a worker's channel."""
    found = []
    for child in psutil.Process().children():
        try:
            if any("serve_spawned" in part for part in child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.timeout(30)
def test_int_argument_runs_that_many_workers_under_this_process_with_no_node_process(tmp_path: Path) -> None:
    release = tmp_path / "release"
    listening_before = [c for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
    with ClusterExecutor(2) as ex:
        # Two tasks run at the same time: both workers are there.
        started = [tmp_path / "started-0", tmp_path / "started-1"]
        futures = [ex.submit(helpers.block_pid, str(path), str(release)) for path in started]
        wait_until(lambda: all(path.exists() for path in started), what="two tasks running at once")
        assert local_nodes() == []  # the node is hosted by this process: no node process,
        workers = hosted_workers()
        assert len(workers) == 2  # its two workers are children of this process,
        listening = [c for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening == listening_before  # and nothing listens for them
        release.touch()
        assert {f.result(timeout=10) for f in futures} == {w.pid for w in workers}
        assert [(n.address, n.workers) for n in ex.nodes] == [("local", 2)]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


@pytest.mark.timeout(30)
def test_a_local_node_process_on_request_has_that_many_workers_and_a_fresh_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLUSTEREXEC_LOCAL_NODE", "process")
    release = tmp_path / "release"
    with ClusterExecutor(2) as ex:
        (node,) = local_nodes()
        cmdline = node.cmdline()
        assert cmdline[cmdline.index("--workers") + 1] == "2"
        listening = [c.laddr.ip for c in node.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening == ["127.0.0.1"]
        key = node.environ()["CLUSTEREXEC_KEY"]
        assert re.fullmatch(r"[0-9a-f]{64}", key)
        # Two tasks run at the same time: both workers are there.
        started = [tmp_path / "started-0", tmp_path / "started-1"]
        futures = [ex.submit(helpers.block_pid, str(path), str(release)) for path in started]
        wait_until(lambda: all(path.exists() for path in started), what="two tasks running at once")
        release.touch()
        assert len({f.result(timeout=10) for f in futures}) == 2
    with ClusterExecutor(2) as other:
        (other_node,) = local_nodes()
        assert other_node.environ()["CLUSTEREXEC_KEY"] != key
        assert other.submit(helpers.square, 3).result(timeout=10) == 9


@pytest.mark.timeout(30)
def test_signatures_match_process_pool_executor() -> None:
    P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    init = inspect.signature(ClusterExecutor).parameters
    assert [(name, init[name].kind, init[name].default) for name in list(init)[:2]] == [
        ("nodes", P, None),
        ("max_workers", P, None),
    ]
    expected = {"initializer": None, "initargs": (), "max_tasks_per_child": None, "key": None, "key_file": None}
    assert {name: (init[name].kind, init[name].default) for name in expected} == {
        name: (K, default) for name, default in expected.items()
    }
    submit = inspect.signature(ClusterExecutor.submit).parameters
    assert submit["fn"].kind is inspect.Parameter.POSITIONAL_ONLY
    map_ = inspect.signature(ClusterExecutor.map).parameters
    assert {name: map_[name].default for name in ("timeout", "chunksize", "buffersize")} == {
        "timeout": None,
        "chunksize": 1,
        "buffersize": None,
    }
    shutdown = inspect.signature(ClusterExecutor.shutdown).parameters
    assert (shutdown["wait"].kind, shutdown["wait"].default) == (P, True)
    assert (shutdown["cancel_futures"].kind, shutdown["cancel_futures"].default) == (K, False)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, kwargs",
    [((0,), {}), ((-1,), {}), ((), {"max_workers": 0}), ((), {"max_workers": -1})],
    ids=["ClusterExecutor(0)", "ClusterExecutor(-1)", "max_workers=0", "max_workers=-1"],
)
def test_max_workers_must_be_positive(args: tuple[int, ...], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        ClusterExecutor(*args, **kwargs)
    assert local_nodes() == []


# --------------------------------------------------------------------------- submit


@pytest.mark.timeout(30)
def test_submit_passes_fn_and_self_through_as_keyword_arguments(executor: ClusterExecutor) -> None:
    future = executor.submit(helpers.kwargs_of, 1, fn=2, self=3)
    assert future.result(timeout=10) == ((1,), {"fn": 2, "self": 3})


@pytest.mark.timeout(30)
def test_lambdas_closures_and_test_module_functions_run(executor: ClusterExecutor) -> None:
    offset = 10

    def add_offset(x: int) -> int:
        return x + offset

    assert executor.submit(lambda x: x * 3, 7).result(timeout=10) == 21
    assert list(executor.map(add_offset, [1, 2, 3])) == [11, 12, 13]
    assert executor.submit(double, 21).result(timeout=10) == 42


@pytest.mark.timeout(30)
def test_each_task_gets_its_own_copy_of_a_callable_object(executor: ClusterExecutor) -> None:
    counter = helpers.Counter()
    assert [executor.submit(counter).result(timeout=10) for _ in range(3)] == [1, 1, 1]
    assert list(executor.map(counter, range(6))) == [1] * 6
    # As with ProcessPoolExecutor, a chunk is one task: its items share one copy.
    assert list(executor.map(counter, range(6), chunksize=3)) == [1, 2, 3, 1, 2, 3]
    assert counter.count == 0


@pytest.mark.timeout(30)
def test_unpicklable_argument_fails_the_future_not_submit(executor: ClusterExecutor) -> None:
    future = executor.submit(helpers.identity, threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=10)
    # The same for a callable that cannot be pickled.
    future = executor.submit(functools.partial(helpers.identity, threading.Lock()))
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=10)
    # In map, the item that cannot be pickled fails at its place in the results.
    results = executor.map(helpers.identity, [1, threading.Lock(), 3])
    assert next(results) == 1
    with pytest.raises(TypeError, match="pickle"):
        next(results)


@pytest.mark.timeout(30)
def test_unpicklable_result_fails_the_future(executor: ClusterExecutor) -> None:
    future = executor.submit(helpers.return_lock)
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=10)
    assert executor.submit(helpers.square, 4).result(timeout=10) == 16


@pytest.mark.timeout(30)
def test_no_reference_kept_to_function_arguments_or_result(executor: ClusterExecutor) -> None:
    doubler, box = helpers.Doubler(), helpers.Box(21)
    future = executor.submit(doubler, box)
    result = future.result(timeout=10)
    assert result.value == 42
    refs = {"function": weakref.ref(doubler), "argument": weakref.ref(box), "result": weakref.ref(result)}
    del doubler, box, result, future
    gc.collect()
    assert {name: ref() for name, ref in refs.items()} == dict.fromkeys(refs)

    # The same through map, with a plain (closure) function.
    factor = 3

    def triple(box: helpers.Box) -> helpers.Box:
        return helpers.Box(box.value * factor)

    boxes = [helpers.Box(i) for i in range(4)]
    results = list(executor.map(triple, boxes))
    assert [r.value for r in results] == [0, 3, 6, 9]
    refs = {"function": weakref.ref(triple), "argument": weakref.ref(boxes[0]), "result": weakref.ref(results[0])}
    del triple, boxes, results
    gc.collect()
    assert {name: ref() for name, ref in refs.items()} == dict.fromkeys(refs)


# --------------------------------------------------------------------------- map


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 7, 100])
def test_map_returns_results_in_order_for_any_chunksize(executor: ClusterExecutor, chunksize: int) -> None:
    assert list(executor.map(helpers.square, range(50), chunksize=chunksize)) == [i * i for i in range(50)]


@pytest.mark.timeout(30)
def test_map_zips_iterables_and_stops_at_the_shortest(executor: ClusterExecutor) -> None:
    assert list(executor.map(helpers.add, [1, 2, 3], [10, 20])) == [11, 22]
    assert list(executor.map(helpers.add, itertools.count(), [5, 6, 7], chunksize=2)) == [5, 7, 9]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_raises_at_the_failing_item_after_yielding_earlier_ones(executor: ClusterExecutor, chunksize: int) -> None:
    got = []
    with pytest.raises(ValueError) as info:
        for value in executor.map(helpers.fail_at, range(8), itertools.repeat(4), chunksize=chunksize):
            got.append(value)
    assert got == [0, 1, 4, 9]
    assert info.value.args == ("item 4",)


@pytest.mark.timeout(30)
def test_map_timeout_raises_timeout_error(executor: ClusterExecutor, release: Path) -> None:
    results = executor.map(helpers.block, [None], [str(release)], timeout=0.3)
    # concurrent.futures.TimeoutError: the builtin TimeoutError from 3.11, its own class on 3.10
    # (where ProcessPoolExecutor's map raises that one too).
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)


@pytest.mark.timeout(30)
def test_map_buffersize_works_on_an_infinite_input(executor: ClusterExecutor) -> None:
    results = executor.map(helpers.square, itertools.count(), buffersize=4)
    assert list(itertools.islice(results, 20)) == [i * i for i in range(20)]
    results.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_buffersize_consumes_its_input_lazily(executor: ClusterExecutor, chunksize: int) -> None:
    consumed: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(30):
            consumed.append(i)
            yield i

    results = executor.map(helpers.square, numbers(), buffersize=3, chunksize=chunksize)
    assert len(consumed) == 3 * chunksize  # three tasks submitted, nothing more read
    for yielded, value in enumerate(results, 1):
        assert value == (yielded - 1) ** 2
        # As ProcessPoolExecutor: at each step, at most buffersize tasks (chunks) are submitted
        # beyond those whose results are being yielded.
        tasks_submitted = -(-len(consumed) // chunksize)
        tasks_taken = -(-yielded // chunksize)
        assert tasks_submitted - tasks_taken <= 3
    assert yielded == len(consumed) == 30


@pytest.mark.timeout(30)
def test_map_rejects_bad_chunksize_and_buffersize(executor: ClusterExecutor) -> None:
    for kwargs in ({"chunksize": 0}, {"chunksize": -1}, {"buffersize": 0}, {"buffersize": -1}):
        with pytest.raises(ValueError):
            executor.map(helpers.square, [1, 2], **kwargs)


@pytest.mark.timeout(30)
def test_buffered_map_iterator_does_not_keep_the_executor_alive() -> None:
    # As ProcessPoolExecutor.map(buffersize=...) in Python 3.14: the iterator holds the executor
    # weakly; once the executor is collected it stops submitting, yields what was already
    # submitted, and ends.
    ex = ClusterExecutor(1)
    executor_ref = weakref.ref(ex)
    results = ex.map(helpers.square, itertools.count(), buffersize=2)
    try:
        assert next(results) == 0
        del ex
        gc.collect()
        assert executor_ref() is None
        assert list(results) == [1, 4]
        wait_until(lambda: not local_nodes(), timeout=15, what="the local node to stop")
    finally:
        results.close()
        leftover = executor_ref()
        if leftover is not None:
            leftover.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- shutdown


@pytest.mark.timeout(30)
def test_context_manager_waits_and_submit_after_shutdown_raises(node: NodeProcess, key_file: Path) -> None:
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        futures = [ex.submit(helpers.sleep_then, 0.1, i) for i in range(4)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(helpers.square, 2)
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.map(helpers.square, [2])
    ex.shutdown()
    ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(30)
def test_shutdown_cancel_futures_cancels_pending_tasks(solo: ClusterExecutor, release: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    running = solo.submit(helpers.block, str(started), str(release), "done")
    markers = [tmp_path / f"marker-{i}" for i in range(6)]
    pending = [solo.submit(helpers.write_marker, str(m)) for m in markers]  # some sent ahead, some queued here
    wait_until(started.exists, what="the blocking task to start")
    solo.shutdown(wait=False, cancel_futures=True)
    wait_until(lambda: all(f.cancelled() for f in pending), what="pending futures to be cancelled")
    release.touch()
    solo.shutdown(wait=True)
    assert running.result() == "done"
    assert not any(m.exists() for m in markers)


# --------------------------------------------------------------------------- cancel, wait, as_completed


@pytest.mark.timeout(30)
def test_cancel_a_task_sent_ahead_to_the_node_so_it_never_runs(
    solo: ClusterExecutor, release: Path, tmp_path: Path
) -> None:
    started, marker = tmp_path / "started", tmp_path / "marker"
    running = solo.submit(helpers.block, str(started), str(release), "done")
    queued = solo.submit(helpers.write_marker, str(marker))
    wait_until(started.exists, what="the blocking task to start")
    wait_until(running.running, what="the client to see the task started")
    wait_until(lambda: sent_ahead(queued), what="the second task to be sent ahead to the node")

    assert running.cancel() is False
    assert queued.cancel() is True
    assert queued.cancelled()

    release.touch()
    assert running.result(timeout=10) == "done"
    # The node runs its queue in order: once a later task is done, the cancelled one would have run.
    assert solo.submit(helpers.square, 5).result(timeout=10) == 25
    assert not marker.exists()


@pytest.mark.timeout(30)
def test_as_completed_yields_every_future(executor: ClusterExecutor) -> None:
    futures = [executor.submit(helpers.sleep_then, 0.02 * (i % 3), i) for i in range(8)]
    assert sorted(f.result() for f in as_completed(futures, timeout=10)) == list(range(8))


@pytest.mark.timeout(30)
def test_wait_first_completed_first_exception_all_completed(executor: ClusterExecutor, release: Path) -> None:
    blocked = executor.submit(helpers.block, None, str(release), "slow")
    quick = executor.submit(helpers.square, 3)
    done, not_done = wait([blocked, quick], timeout=10, return_when=FIRST_COMPLETED)
    assert (done, not_done) == ({quick}, {blocked})

    failing = executor.submit(helpers.fail, "bad")
    done, not_done = wait([blocked, failing], timeout=10, return_when=FIRST_EXCEPTION)
    assert (done, not_done) == ({failing}, {blocked})

    release.touch()
    done, not_done = wait([blocked, quick, failing], timeout=10, return_when=ALL_COMPLETED)
    assert not not_done
    assert blocked.result() == "slow"


@pytest.mark.timeout(30)
def test_wait_and_as_completed_report_cancelled_futures(solo: ClusterExecutor, release: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    running = solo.submit(helpers.block, str(started), str(release), "done")
    pending = [solo.submit(helpers.square, i) for i in range(6)]  # some sent ahead, some queued here
    wait_until(started.exists, what="the blocking task to start")
    assert all(f.cancel() for f in pending)
    release.touch()
    done, not_done = wait([running, *pending], timeout=2)
    assert not not_done
    assert len(list(as_completed(pending, timeout=2))) == len(pending)


# --------------------------------------------------------------------------- remote exceptions


@pytest.mark.timeout(30)
def test_remote_exception_keeps_type_args_traceback_and_names_the_node(
    executor: ClusterExecutor, node: NodeProcess
) -> None:
    future = executor.submit(helpers.fail, "boom")
    with pytest.raises(ValueError) as info:
        future.result(timeout=10)
    exc = info.value
    assert type(exc) is ValueError
    assert exc.args == ("boom",)
    assert isinstance(exc.__cause__, _RemoteTraceback)
    assert "raise ValueError(message)" in str(exc.__cause__)
    frames = traceback.extract_tb(exc.__traceback__)
    assert any(Path(frame.filename).name == "helpers.py" and frame.name == "fail" for frame in frames)
    if sys.version_info >= (3, 11):
        assert any(node.address in note and "task" in note for note in exc.__notes__)


@pytest.mark.timeout(30)
def test_exception_with_custom_init_is_rebuilt_as_its_type(executor: ClusterExecutor) -> None:
    with pytest.raises(helpers.PairError) as info:
        executor.submit(helpers.raise_pair_error, "a", "b").result(timeout=10)
    assert info.value.args == ("a-b",)
    assert str(info.value) == "a-b"
    assert isinstance(info.value.__cause__, _RemoteTraceback)


@pytest.mark.timeout(30)
def test_exception_that_cannot_be_rebuilt_becomes_remote_error(executor: ClusterExecutor) -> None:
    with pytest.raises(RemoteError) as info:
        executor.submit(helpers.raise_locked_error, "locked up").result(timeout=10)
    exc = info.value
    assert exc.type_name == "helpers.LockedError"
    assert exc.message == "locked up"
    assert "raise LockedError(message)" in exc.remote_traceback
    assert "helpers.LockedError: locked up" in str(exc)


# --------------------------------------------------------------------------- workers


@pytest.mark.timeout(30)
def test_initializer_runs_in_every_worker_before_its_first_task(node: NodeProcess, key_file: Path) -> None:
    with ClusterExecutor(
        [node.address], key_file=key_file, initializer=helpers.set_global, initargs=("ready",), max_tasks_per_child=2
    ) as ex:
        assert list(ex.map(helpers.get_global, range(8))) == ["ready"] * 8


@pytest.mark.timeout(30)
def test_failing_initializer_breaks_the_executor(node: NodeProcess, key_file: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    ex = ClusterExecutor([node.address], key_file=key_file, initializer=helpers.fail_when, initargs=(str(go),))
    try:
        futures = [ex.submit(helpers.square, i) for i in range(4)]
        go.touch()
        for future in futures:
            error = future.exception(timeout=10)
            assert isinstance(error, BrokenCluster)
            assert isinstance(error, BrokenProcessPool)
        with pytest.raises(BrokenCluster):
            ex.submit(helpers.square, 1)
    finally:
        ex.shutdown()


@pytest.mark.timeout(30)
def test_max_tasks_per_child_one_gives_a_new_worker_for_every_task(node: NodeProcess, key_file: Path) -> None:
    with ClusterExecutor([node.address], key_file=key_file, max_tasks_per_child=1) as ex:
        pids = list(ex.map(helpers.pid_of, range(6)))
    assert len(set(pids)) == 6


@pytest.mark.timeout(30)
def test_worker_crash_fails_only_its_task(executor: ClusterExecutor, node: NodeProcess) -> None:
    got = []
    with pytest.raises(WorkerCrashedError) as info:
        for value in executor.map(helpers.square_or_exit, [1, 2, 3, -3, 5, 6]):
            got.append(value)
    assert got == [1, 4, 9]
    assert node.address in str(info.value)
    assert "exit code 3" in str(info.value)

    futures = [executor.submit(helpers.square_or_exit, x) for x in [4, -3, 5, 6]]
    assert isinstance(futures[1].exception(timeout=10), WorkerCrashedError)
    assert [futures[i].result(timeout=10) for i in (0, 2, 3)] == [16, 25, 36]
    assert executor.submit(helpers.square, 7).result(timeout=10) == 49


# --------------------------------------------------------------------------- nodes and addresses


@pytest.mark.timeout(30)
def test_wrong_key_raises_authentication_error_naming_the_node(node: NodeProcess) -> None:
    with pytest.raises(AuthenticationError, match=re.escape(node.address)):
        ClusterExecutor([node.address], key="not the node's key")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "address",
    [
        pytest.param("127.0.0.1:{free_port}", id="port-nothing-listens-on"),
        pytest.param(
            "nonexistent.invalid:9",
            id="host-that-does-not-resolve",
        ),
    ],
)
def test_unreachable_node_raises_naming_it(key_file: Path, address: str) -> None:
    address = address.format(free_port=free_port())
    with pytest.raises(NodeUnreachableError, match=re.escape(address)):
        ClusterExecutor([address], key_file=key_file, connect_timeout=5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("address", ["host:notaport", "a:b:c", ("h",)], ids=repr)
def test_malformed_address_raises_value_error_naming_it(key_file: Path, address: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(address))):
        ClusterExecutor([address], key_file=key_file)
    if isinstance(address, str):
        with pytest.raises(ValueError, match=re.escape(repr(address))):
            ClusterExecutor(address, key_file=key_file)


@pytest.mark.timeout(30)
def test_ipv6_loopback_address(node_factory, key_file: Path) -> None:
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback is not available")
    node = node_factory("--host", "::1", "--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor(f"[::1]:{node.port}", key_file=key_file) as ex:
        assert ex.submit(helpers.square, 6).result(timeout=10) == 36


@pytest.mark.timeout(30)
def test_tasks_spread_over_two_nodes(node_factory, key_file: Path, tmp_path: Path) -> None:
    first = node_factory("--workers", "2", "--key-file", str(key_file))
    second = node_factory("--workers", "2", "--key-file", str(key_file))
    release = tmp_path / "release"
    started = [tmp_path / f"started-{i}" for i in range(4)]
    with ClusterExecutor([first.address, second.address], key_file=key_file) as ex:
        futures = [ex.submit(helpers.block_pid, str(path), str(release)) for path in started]
        # Four tasks running at once on two nodes of two workers each.
        wait_until(lambda: all(path.exists() for path in started), what="four tasks running at once")
        first_workers, second_workers = worker_pids(first), worker_pids(second)
        release.touch()
        pids = {f.result(timeout=10) for f in futures}
    assert pids & first_workers and pids & second_workers
    assert pids <= first_workers | second_workers


# --------------------------------------------------------------------------- executor life


@pytest.mark.timeout(30)
def test_interpreter_exit_completes_pending_work(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TESTS)!r})
            import psutil
            import helpers
            from clusterexec import ClusterExecutor

            ex = ClusterExecutor(2)
            print("NODE PIDS", *[p.pid for p in psutil.Process().children()], flush=True)
            for i in range(4):
                ex.submit(helpers.sleep_then_touch, 0.3, {str(tmp_path)!r} + f"/done-{{i}}")
            # no shutdown: the interpreter exits with four tasks pending
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=25)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("done-*")) == [f"done-{i}" for i in range(4)]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("NODE PIDS")]
    node_pids = [int(pid) for pid in line.split()[2:]]
    assert node_pids
    assert not [pid for pid in node_pids if psutil.pid_exists(pid)]


@pytest.mark.timeout(30)
def test_garbage_collected_executor_stops_its_workers() -> None:
    ex = ClusterExecutor(2)
    assert ex.submit(helpers.square, 3).result(timeout=10) == 9
    workers = hosted_workers()
    assert len(workers) == 2
    del ex
    gc.collect()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


@pytest.mark.timeout(30)
def test_garbage_collected_executor_stops_its_local_node_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTEREXEC_LOCAL_NODE", "process")
    ex = ClusterExecutor(2)
    assert ex.submit(helpers.square, 3).result(timeout=10) == 9
    (node,) = local_nodes()
    workers = node.children()
    assert workers
    del ex
    gc.collect()
    wait_until(lambda: not node.is_running(), timeout=15, what="the local node to stop")
    assert local_nodes() == []
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


# --------------------------------------------------------------------------- the node process


@pytest.mark.timeout(30)
def test_node_prints_exactly_its_ready_line(node_factory, key_file: Path) -> None:
    node = node_factory("--workers", "3", "--key-file", str(key_file))
    assert node.lines == [f"clusterexec node listening on 127.0.0.1:{node.port} (3 workers)\n"]


@pytest.mark.timeout(30)
def test_node_on_a_port_in_use_exits_with_status_2(node: NodeProcess, key_file: Path) -> None:
    command = [sys.executable, "-m", "clusterexec.node", "--port", str(node.port), "--key-file", str(key_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=25)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(node.port) in lines[0]
    assert "already in use" in lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_node_and_its_workers(node: NodeProcess, key_file: Path, signum: int) -> None:
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        pids = set(ex.map(helpers.pid_of, range(4)))
        workers = psutil.Process(node.process.pid).children()
        assert pids <= {w.pid for w in workers}
        assert node.stop(signum) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive


@pytest.mark.timeout(30)
def test_each_client_session_has_its_own_workers(node: NodeProcess, key_file: Path) -> None:
    with (
        ClusterExecutor([node.address], key_file=key_file) as first,
        ClusterExecutor([node.address], key_file=key_file) as second,
    ):
        first.submit(helpers.set_global, "first client").result(timeout=10)
        first_pids = set(first.map(helpers.pid_of, range(6)))
        second_pids = set(second.map(helpers.pid_of, range(6)))
        assert first_pids.isdisjoint(second_pids)
        assert set(second.map(helpers.get_global, range(6))) == {None}


@pytest.mark.timeout(30)
def test_cluster_file_and_cluster_env_var_name_the_nodes(
    node: NodeProcess, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = tmp_path / "cluster.conf"
    cluster.write_text(f"# hosts\nGROUP:gpu\n{node.host}\nGROUP:cpu\nnowhere.invalid\n")
    with ClusterExecutor.from_cluster_file(cluster, group="gpu", port=node.port, key_file=key_file) as ex:
        assert [n.address for n in ex.nodes] == [node.address]
        assert ex.submit(helpers.square, 5).result(timeout=10) == 25
    cluster.write_text(f"{node.address}\n")
    monkeypatch.setenv("CLUSTER", str(cluster))
    with ClusterExecutor(key_file=key_file) as ex:
        assert [n.address for n in ex.nodes] == [node.address]
        assert ex.submit(helpers.square, 6).result(timeout=10) == 36


@pytest.mark.timeout(30)
def test_cluster_env_var_without_a_group_uses_every_host_of_the_file(
    node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(3)]
    cluster = tmp_path / "cluster.conf"
    cluster.write_text(
        f"{nodes[0].address}\nGROUP:gpu\n{nodes[1].address}\nGROUP:cpu\n{nodes[2].address} {nodes[0].address}\n"
    )
    monkeypatch.setenv("CLUSTER", str(cluster))
    with ClusterExecutor(key_file=key_file) as ex:
        assert [n.address for n in ex.nodes] == [n.address for n in nodes]
        pids = {ex.submit_to(n.address, helpers.pid).result(timeout=10) for n in nodes}
        assert len(pids) == 3  # a task ran on each of the three nodes
