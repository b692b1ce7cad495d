"""Python 3.14's ProcessPoolExecutor surface, on every supported Python.

``terminate_workers()`` and ``kill_workers()``, ``map``'s argument errors with 3.14's messages,
and ``buffersize`` bounding what ``map`` has in flight as 3.14 does. Real nodes, real worker
processes; tasks that must wait block on a file appearing, never on sleeps.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import TESTS, NodeProcess, wait_until

from clusterexec import ClusterExecutor, WorkerStoppedError
from clusterexec.keys import resolve_key
from clusterexec.wire.messages import CANCEL, SESSION, SIGNAL_HEAD, SIGNAL_WORKERS, STATUS, WORKERS_KILL

# --------------------------------------------------------------------------- helpers


def worker_pids(node: NodeProcess) -> set[int]:
    """The pids of the worker processes a node has forked (every session's)."""
    return {child.pid for child in psutil.Process(node.process.pid).children()}


def gone(pids: set[int]) -> bool:
    """True once none of ``pids`` exists any more (their node has reaped them)."""
    return not any(psutil.pid_exists(pid) for pid in pids)


def started_pid(path: Path) -> int:
    """Wait for a task of :func:`helpers.announce_then_block` to start; return its worker's pid."""
    wait_until(path.exists, timeout=30, what=f"{path.name} to be written")
    return int(path.read_text())


def count_outcomes(future: Future[object], seen: list[Future[object]]) -> None:
    future.add_done_callback(seen.append)


# --------------------------------------------------------------------------- terminate_workers / kill_workers


def test_terminate_workers_fails_running_tasks_cancels_the_rest_and_spares_the_node(
    node_factory, key_file: Path, tmp_path: Path
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    first = ClusterExecutor([node.address], key_file=key_file)
    wait_until(lambda: len(worker_pids(node)) == 2, timeout=30, what="the first executor's two workers")
    first_pids = worker_pids(node)
    release = str(tmp_path / "release")  # never created: only the signal ends these tasks
    running = [first.submit(helpers.announce_then_block, str(tmp_path / f"started{i}"), release) for i in range(2)]
    pids = {started_pid(tmp_path / f"started{i}") for i in range(2)}
    assert pids == first_pids
    queued = [first.submit(helpers.block, None, release) for _ in range(4)]
    outcomes: list[Future[object]] = []
    for future in running + queued:
        count_outcomes(future, outcomes)

    second = ClusterExecutor([node.address], key_file=key_file)
    try:
        # The first client's tasks hold both of the node's run slots: the second's task waits
        # for one, and gets it once the first's workers are stopped.
        waiting = second.submit(helpers.square, 6)
        assert first.terminate_workers() is None

        done, not_done = wait(running + queued, timeout=30)
        assert not not_done
        for future in running:
            error = future.exception(timeout=0)
            assert isinstance(error, WorkerStoppedError)
            assert isinstance(error, BrokenProcessPool)
            message = str(error)
            assert f"node {node.address}" in message
            assert "terminate_workers()" in message
            assert "killed by SIGTERM" in message
            assert "task " in message and "new executor" in message
        assert all(future.cancelled() for future in queued)
        assert len(outcomes) == len(running + queued)  # exactly one outcome each

        wait_until(lambda: gone(first_pids), timeout=30, what="the first executor's workers to be gone")
        with pytest.raises(RuntimeError, match="after shutdown"):
            first.submit(helpers.square, 2)
        first.shutdown()  # harmless afterwards

        # The node is up and its other client is served as before, by workers it did not touch.
        assert node.process.poll() is None
        assert waiting.result(timeout=30) == 36
        assert second.submit(helpers.square, 7).result(timeout=30) == 49
        assert list(second.map(helpers.square, range(5))) == [0, 1, 4, 9, 16]
        assert not (worker_pids(node) & first_pids)
    finally:
        first.shutdown(wait=True)
        second.shutdown(wait=True)


def test_terminate_workers_reaches_every_node(node_factory, key_file: Path, tmp_path: Path) -> None:
    nodes = [node_factory("--workers", "1", "--key-file", str(key_file)) for _ in range(2)]
    with ClusterExecutor([n.address for n in nodes], key_file=key_file) as ex:
        release = str(tmp_path / "release")
        futures = {
            n.address: ex.submit_to(n.address, helpers.announce_then_block, str(tmp_path / f"started{i}"), release)
            for i, n in enumerate(nodes)
        }
        pids = {started_pid(tmp_path / f"started{i}") for i in range(len(nodes))}
        ex.terminate_workers()
        for address, future in futures.items():
            with pytest.raises(WorkerStoppedError, match=rf"on node {address}: .*terminate_workers\(\)"):
                future.result(timeout=30)
        wait_until(lambda: gone(pids), timeout=30, what="both nodes' workers to be gone")
    assert all(n.process.poll() is None for n in nodes)


def test_kill_workers_kills_a_task_that_ignores_sigterm(node_factory, key_file: Path, tmp_path: Path) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        future = ex.submit(helpers.ignore_sigterm_then_block, str(tmp_path / "started"), str(tmp_path / "release"))
        pid = started_pid(tmp_path / "started")
        started = time.monotonic()
        assert ex.kill_workers() is None
        with pytest.raises(WorkerStoppedError, match=r"kill_workers\(\).*killed by SIGKILL") as info:
            future.result(timeout=30)
        # SIGKILL needs no grace period: the node's 2 s escalation after SIGTERM plays no part.
        assert time.monotonic() - started < 2.0
        assert f"pid {pid}" in str(info.value)
        wait_until(lambda: gone({pid}), timeout=30, what=f"worker {pid} to be gone")
    assert node.process.poll() is None


def test_terminate_workers_escalates_to_sigkill_for_a_task_that_ignores_sigterm(
    node_factory, key_file: Path, tmp_path: Path
) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        future = ex.submit(helpers.ignore_sigterm_then_block, str(tmp_path / "started"), str(tmp_path / "release"))
        pid = started_pid(tmp_path / "started")
        ex.terminate_workers()
        with pytest.raises(WorkerStoppedError, match=r"terminate_workers\(\).*killed by SIGKILL"):
            future.result(timeout=30)
        assert gone({pid})


def test_a_result_sent_before_the_signal_is_kept(node_factory, key_file: Path, tmp_path: Path) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        done = ex.submit(helpers.square, 9)
        assert done.result(timeout=30) == 81
        ex.kill_workers()
        assert done.result(timeout=0) == 81


def test_terminate_and_kill_workers_without_tasks_and_after_shutdown(node_factory, key_file: Path) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file), "--log-level", "INFO")
    ex = ClusterExecutor([node.address], key_file=key_file)
    wait_until(lambda: len(worker_pids(node)) == 2, timeout=30, what="two workers")
    pids = worker_pids(node)
    ex.terminate_workers()
    ex.kill_workers()  # a second call, and the other one: harmless
    wait_until(lambda: gone(pids), timeout=30, what="the idle workers to be gone")
    ex.shutdown(wait=True)
    ex.terminate_workers()  # after shutdown: nothing left to do
    ex.kill_workers()
    assert node.process.poll() is None
    # With nothing in flight the I/O thread closes the link at once, yet the node heard the
    # request first: it was queued on the link ahead of the goodbye.
    node.stop()
    assert node.process.stdout is not None
    log = node.process.stdout.read()
    assert "terminate_workers() called; 2 workers signalled" in log


def test_methods_match_the_stdlib_signature() -> None:
    import inspect

    for name in ("terminate_workers", "kill_workers"):
        method = getattr(ClusterExecutor, name)
        assert list(inspect.signature(method).parameters) == ["self"]
        assert method.__doc__
        if sys.version_info >= (3, 14):
            assert list(inspect.signature(getattr(ProcessPoolExecutor, name)).parameters) == ["self"]


def test_program_exits_promptly_after_kill_workers(tmp_path: Path) -> None:
    script = tmp_path / "kill_and_exit.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TESTS)!r})
            import helpers
            from clusterexec import ClusterExecutor

            if __name__ == "__main__":
                ex = ClusterExecutor(1)
                started, release = {str(tmp_path / "started")!r}, {str(tmp_path / "release")!r}
                future = ex.submit(helpers.announce_then_block, started, release)
                helpers.wait_for_file(started)
                ex.kill_workers()
                print(type(future.exception(timeout=30)).__name__, flush=True)
                # No shutdown(): the interpreter exit must not wait for the blocked task.
            """
        )
    )
    env = dict(os.environ)
    env.pop("CLUSTEREXEC_KEY", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "WorkerStoppedError"
    assert elapsed < 30  # the task would block for 60 s; the kill ends it at once
    worker = int((tmp_path / "started").read_text())
    wait_until(lambda: gone({worker}), timeout=30, what="the local node's worker to be gone")


def test_signal_workers_is_kind_10_and_a_bad_one_closes_only_its_session(node_factory, key_file: Path) -> None:
    from test_security import RawClient

    assert SIGNAL_WORKERS == 10
    assert SIGNAL_WORKERS not in (SESSION, CANCEL, STATUS)
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        key = resolve_key(key_file=key_file)
        assert key is not None
        with RawClient((node.host, node.port)) as bad:
            bad.handshake(key)
            bad.open_session(workers=1)
            bad.send(SIGNAL_WORKERS, SIGNAL_HEAD.pack(WORKERS_KILL + 40))  # no such signal kind
            assert bad.closed_by_peer()
        assert ex.submit(helpers.square, 5).result(timeout=30) == 25
    assert node.process.poll() is None


# --------------------------------------------------------------------------- map: 3.14's argument errors

MAP_ERRORS = [
    ({"chunksize": 0}, ValueError, "chunksize must be >= 1."),
    ({"chunksize": -1}, ValueError, "chunksize must be >= 1."),
    ({"buffersize": 0}, ValueError, "buffersize must be None or >= 1."),
    ({"buffersize": -1}, ValueError, "buffersize must be None or >= 1."),
    ({"buffersize": "foo"}, TypeError, "buffersize must be an integer or None"),
    ({"buffersize": 2.0}, TypeError, "buffersize must be an integer or None"),
    ({"chunksize": 0, "buffersize": 0}, ValueError, "chunksize must be >= 1."),  # chunksize is checked first
]


@pytest.mark.parametrize(("kwargs", "kind", "message"), MAP_ERRORS)
def test_map_argument_errors_use_the_messages_of_314(executor, kwargs, kind, message) -> None:
    with pytest.raises(kind) as info:
        executor.map(helpers.square, range(4), **kwargs)
    assert type(info.value) is kind
    assert str(info.value) == message


# --------------------------------------------------------------------------- map: buffersize bounds what is in flight


def counted(consumed: list[int]) -> Iterator[int]:
    """An endless input that records each item as ``map`` takes it."""
    for i in itertools.count():
        consumed.append(i)
        yield i


@pytest.mark.parametrize(("chunksize", "per_task"), [(1, 1), (3, 3)])
def test_buffersize_counts_tasks_and_refills_before_waiting(
    executor, tmp_path: Path, chunksize: int, per_task: int
) -> None:
    release = tmp_path / "release"
    consumed: list[int] = []
    results = executor.map(
        functools.partial(helpers.gate_first, str(release)), counted(consumed), chunksize=chunksize, buffersize=2
    )
    try:
        # At the call: buffersize tasks, each of chunksize items (3.14 counts chunks).
        assert len(consumed) == 2 * per_task
        first: list[int] = []
        consumer = threading.Thread(target=lambda: first.append(next(results)))
        consumer.start()
        # Resuming the iterator submits one more task before it waits for the first result...
        wait_until(lambda: len(consumed) == 3 * per_task, timeout=30, what="one more task submitted")
        assert not first
        release.touch()
        consumer.join(30)
        assert first == [0]
        # ... and no other while it waits.
        assert len(consumed) == 3 * per_task
        # The rest of the first task's items come without submitting anything.
        assert [next(results) for _ in range(per_task - 1)] == list(range(1, per_task))
        assert len(consumed) == 3 * per_task
        # The next task's first result: one more task goes in.
        assert next(results) == per_task
        assert len(consumed) == 4 * per_task
    finally:
        release.touch()
        results.close()
