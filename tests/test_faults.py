"""Fault tolerance: what a user sees when workers, nodes and clients die or hang.

Every fault here is real: worker processes end with ``os._exit``, SIGKILL or a segfault, nodes
are killed with SIGKILL or frozen with SIGSTOP, a client process is killed with SIGKILL, all on
loopback. Tests wait for events (a marker file, a process state, a node state), polling with a
deadline where there is nothing to wait on; none sleeps to let something happen. After each fault
every future must be settled: exactly one result or one error, never pending (docs/faults.md).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faulty
import helpers
import psutil
import pytest
from conftest import NodeProcess, start_node, wait_until
from outcomes import assert_settled, track

from clusterexec import (
    BrokenCluster,
    ClusterExecutor,
    NodeLostError,
    TaskUnpicklingError,
    WorkerCrashedError,
)
from clusterexec.client.report import NodeStatus

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- helpers



def children(node: NodeProcess) -> set[int]:
    """The pids of a node's worker processes."""
    return {child.pid for child in psutil.Process(node.process.pid).children()}


def owner(pid: int, nodes: Iterable[NodeProcess]) -> NodeProcess:
    """The node whose worker has this pid."""
    parent = psutil.Process(pid).ppid()
    for node in nodes:
        if node.process.pid == parent:
            return node
    raise AssertionError(f"pid {pid} is not a worker of any node")


def status(ex: ClusterExecutor, node: NodeProcess) -> NodeStatus:
    """What ``ex.nodes`` says of one node."""
    (found,) = [entry for entry in ex.nodes if entry.address == node.address]
    return found


def kill9(node: NodeProcess) -> None:
    """SIGKILL a node and reap it."""
    node.process.kill()
    node.process.wait(10)


def transitions(caplog: pytest.LogCaptureFixture, node: NodeProcess) -> list[tuple[str, str]]:
    """The state changes the ``clusterexec`` logger reported for one node, in order."""
    pattern = re.compile(rf"^node {re.escape(node.address)}: (.+) -> (.+)$")
    found = []
    for record in caplog.records:
        match = pattern.match(record.getMessage())
        if match and record.name == "clusterexec":
            assert record.levelno == logging.INFO
            found.append((match.group(1), match.group(2)))
    return found


@dataclass
class Cluster:
    """Nodes and executors of one test, cleaned up in a safe order at teardown: blocked tasks
    released, frozen nodes resumed, executors shut down (bounded), then nodes killed."""

    start: Callable[..., NodeProcess]
    key_file: Path
    tmp: Path
    executors: list[ClusterExecutor] = field(default_factory=list)
    frozen: list[NodeProcess] = field(default_factory=list)

    @property
    def release(self) -> Path:
        """The file that blocked tasks (``faulty.log_run_and_block``) wait for."""
        return self.tmp / "release"

    def node(self, workers: int = 2, port: int | None = None) -> NodeProcess:
        """Start a node with ``workers`` workers per session, on ``port`` if given."""
        args = ["--workers", str(workers), "--key-file", str(self.key_file)]
        if port is not None:
            args += ["--port", str(port)]
        return self.start(*args)

    def executor(self, nodes: Iterable[NodeProcess], **options: Any) -> ClusterExecutor:
        """A ClusterExecutor on these nodes, shut down at teardown."""
        ex = ClusterExecutor([n.address for n in nodes], key_file=self.key_file, **options)
        self.executors.append(ex)
        return ex

    def freeze(self, node: NodeProcess) -> None:
        """SIGSTOP a node (resumed at teardown before it is killed)."""
        self.frozen.append(node)
        node.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for node in self.frozen:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
        self.frozen.clear()

    def close(self) -> None:
        self.release.touch()
        self.thaw()
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for ex in self.executors:
            ex._scheduler.join(15.0)
            assert not ex._scheduler._thread.is_alive(), "an executor did not shut down within 15s"


@pytest.fixture
def cluster(node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path) -> Iterator[Cluster]:
    """Start nodes and executors for a fault test; everything is stopped at teardown."""
    state = Cluster(node_factory, key_file, tmp_path)
    try:
        yield state
    finally:
        state.close()


def started_runs(log: Path, count: int, timeout: float = 15.0) -> list[int]:
    """Wait until ``log`` holds ``count`` runs of ``faulty.log_run_and_block``; return their pids."""
    wait_until(lambda: len(faulty.runs(log)) >= count, timeout, f"{count} task runs in {log.name}")
    return faulty.runs(log)


def block(ex: ClusterExecutor, log: Path, release: Path, node: NodeProcess | None = None) -> Future[int]:
    """Submit a task that logs its run and blocks until ``release`` exists (pinned to ``node``)."""
    if node is None:
        return ex.submit(faulty.log_run_and_block, str(log), str(release))
    return ex.submit_to(node.address, faulty.log_run_and_block, str(log), str(release))


# --------------------------------------------------------------------------- 1. worker death

DEATHS = {
    "exit": "exit code 7",
    "sigkill": "killed by SIGKILL",
    "segfault": "killed by SIGSEGV",
}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", list(DEATHS))
def test_dead_worker_fails_only_its_task_with_a_clear_error(cluster: Cluster, how: str) -> None:
    node = cluster.node(workers=2)
    ex = cluster.executor([node])
    before = children(node)
    marker = cluster.tmp / "crashed-runs"

    first = ex.submit(helpers.square, 2)  # task 1
    crashed = ex.submit(faulty.die, how, str(marker), 64)  # task 2
    siblings = [ex.submit(faulty.work, x) for x in range(20)]
    counts = track([first, crashed, *siblings])

    error = crashed.exception(timeout=20)
    assert isinstance(error, WorkerCrashedError)
    assert isinstance(error, BrokenProcessPool)  # what ProcessPoolExecutor code catches
    (dead,) = faulty.runs(marker)
    message = str(error)
    assert f"task 2 on node {node.address}" in message
    assert f"(pid {dead})" in message
    assert DEATHS[how] in message
    peak = re.search(r"peak memory was ([\d.]+) MiB", message)
    assert peak is not None, message
    assert float(peak.group(1)) >= 64  # the 64 MiB the task touched before dying
    assert ("likely out of memory" in message) is (how == "sigkill")

    # Only that task failed; its siblings ran.
    assert first.result(timeout=10) == 4
    assert [f.result(timeout=10) for f in siblings] == [faulty.work(x) for x in range(20)]

    # The session replaced the dead worker, and the new worker runs tasks.
    wait_until(lambda: len(children(node)) == 2 and dead not in children(node), 10, "a replacement worker")
    replacement = children(node) - before
    assert len(replacement) == 1
    pids = {ex.submit(helpers.pid).result(timeout=10) for _ in range(20)}
    assert pids <= children(node)

    # map yields the items before the dead worker's item, then raises there.
    got = []
    with pytest.raises(WorkerCrashedError, match=re.escape(DEATHS[how])):
        for value in ex.map(faulty.square_or_die, [1, 2, -1, 4], itertools.repeat(how)):
            got.append(value)
    assert got == [1, 4]
    assert ex.submit(helpers.square, 9).result(timeout=10) == 81

    assert_settled(counts)
    ex.shutdown(wait=True)
    assert faulty.runs(marker) == [dead]  # at most once: a crashed task is not run again


@pytest.mark.timeout(30)
def test_worker_killed_from_outside_busy_or_idle_is_replaced(cluster: Cluster) -> None:
    """What the kernel's OOM killer does: SIGKILL a worker, busy or idle, from outside."""
    node = cluster.node(workers=2)
    ex = cluster.executor([node])
    log = cluster.tmp / "runs"
    futures = [block(ex, log, cluster.release) for _ in range(2)]
    counts = track(futures)
    victim, survivor = started_runs(log, 2)
    os.kill(victim, signal.SIGKILL)
    (crashed,), (running,) = wait(futures, timeout=10, return_when=FIRST_COMPLETED)
    error = crashed.exception()
    assert isinstance(error, WorkerCrashedError), repr(error)
    assert f"(pid {victim})" in str(error) and "likely out of memory" in str(error)
    assert not running.done()  # the other worker's task goes on
    cluster.release.touch()
    assert running.result(timeout=10) == survivor
    wait_until(lambda: len(children(node)) == 2 and victim not in children(node), 10, "a replacement worker")

    idle = min(children(node))
    os.kill(idle, signal.SIGKILL)
    wait_until(lambda: len(children(node)) == 2 and idle not in children(node), 10, "a replacement worker")
    assert set(ex.map(helpers.pid_of, range(20))) <= children(node)
    assert_settled(counts)


@pytest.mark.timeout(30)
def test_broken_pipe_in_a_task_is_an_exception_not_a_dead_worker(cluster: Cluster) -> None:
    node = cluster.node(workers=1)
    ex = cluster.executor([node])
    error = ex.submit(faulty.write_to_closed_pipe).exception(timeout=10)
    assert isinstance(error, BrokenPipeError), repr(error)


# ------------------------------------------------------------------ 1b. CPython's deadlock cases


@dataclass(frozen=True)
class Case:
    """One of CPython's ProcessPoolExecutor deadlock cases: a call and the error it must end in."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    expected: type[BaseException]
    text: str = ""


CASES = {
    "error at function pickle": Case(faulty.CallableErrorAtPickle(), (), pickle.PicklingError),
    "error at task pickle": Case(id, (faulty.ErrorAtPickle(),), pickle.PicklingError),
    "exit at task pickle": Case(id, (faulty.ExitAtPickle(),), SystemExit),
    # Unpickling that raises, or exits, fails that task alone with a BrokenProcessPool, as
    # ProcessPoolExecutor reports it (its whole pool breaks; ours goes on).
    "error at function unpickle on worker": Case(
        faulty.CallableErrorAtUnpickle(), (), TaskUnpicklingError, "unpickled on the worker (UnpicklingError"
    ),
    "error at task unpickle on worker": Case(
        id, (faulty.ErrorAtUnpickle(),), TaskUnpicklingError, "unpickled on the worker (UnpicklingError"
    ),
    "exit at task unpickle on worker": Case(
        id, (faulty.ExitAtUnpickle(),), TaskUnpicklingError, "unpickled on the worker (SystemExit"
    ),
    "hard exit at task unpickle on worker": Case(id, (faulty.HardExitAtUnpickle(),), WorkerCrashedError, "exit code 5"),
    "crash at task unpickle on worker": Case(id, (faulty.CrashAtUnpickle(),), WorkerCrashedError, "SIGSEGV"),
    "error during function on worker": Case(faulty.raise_error, (RuntimeError,), RuntimeError),
    "exit during function on worker": Case(faulty.exit_now, (), SystemExit),
    "crash during function on worker": Case(faulty.segfault, (), WorkerCrashedError, "SIGSEGV"),
    "error at result pickle on worker": Case(faulty.return_instance, (faulty.ErrorAtPickle,), pickle.PicklingError),
    "exit at result pickle on worker": Case(faulty.return_instance, (faulty.ExitAtPickle,), SystemExit),
    "crash at result pickle on worker": Case(
        faulty.return_instance, (faulty.CrashAtPickle,), WorkerCrashedError, "SIGSEGV"
    ),
    "error at result unpickle on client": Case(
        faulty.return_instance, (faulty.ErrorAtUnpickle,), TaskUnpicklingError, "unpickled on the client"
    ),
    "exit at result unpickle on client": Case(
        faulty.return_instance, (faulty.ExitAtUnpickle,), TaskUnpicklingError, "unpickled on the client"
    ),
    # A crash at task pickle or at result unpickle would kill the client itself: not tested.
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterExecutor]:
    """One node and one executor for every deadlock case: each case must leave it working."""
    key = tmp_path_factory.mktemp("faults") / "secret.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    node = start_node("--workers", "2", "--key-file", str(key))
    try:
        ex = ClusterExecutor([node.address], key_file=key)
        yield ex
        ex.shutdown(wait=True, cancel_futures=True)
    finally:
        node.stop(signal.SIGKILL)
        if node.process.stdout is not None:
            node.process.stdout.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_pickles_and_crashes_end_on_their_future(shared: ClusterExecutor, name: str) -> None:
    case = CASES[name]
    future = shared.submit(case.fn, *case.args)  # never raises: the error goes to the future
    sibling = shared.submit(faulty.work, 3)
    counts = track([future, sibling])
    error = future.exception(timeout=20)
    assert isinstance(error, case.expected), repr(error)
    if case.text:
        assert case.text in str(error)
    if case.expected is TaskUnpicklingError:
        assert isinstance(error, BrokenProcessPool)
        if "client" in name:
            assert isinstance(error.__cause__, (pickle.UnpicklingError, SystemExit))
    assert sibling.result(timeout=20) == faulty.work(3)
    # The executor still works, on every worker.
    assert list(shared.map(helpers.square, range(50))) == [x * x for x in range(50)]
    assert_settled(counts)


# --------------------------------------------------------------------------- 2. node loss


@pytest.mark.timeout(60)
def test_node_killed_during_map_every_result_once_in_order(cluster: Cluster) -> None:
    first, second = cluster.node(), cluster.node()
    ex = cluster.executor([first, second])
    inputs = range(10_000)
    results = []
    in_flight_at_kill = -1
    # Killed past the middle, at a moment it holds tasks (at any one instant a node may have
    # just returned everything it had); buffersize keeps tasks flowing while results are read.
    for i, value in enumerate(ex.map(faulty.work, inputs, buffersize=400)):
        results.append(value)
        if in_flight_at_kill < 0 and i >= len(inputs) // 2:
            held = status(ex, second).in_flight
            if held > 0:
                in_flight_at_kill = held
                kill9(second)
    assert results == [faulty.work(x) for x in inputs]
    assert in_flight_at_kill > 0  # the killed node had tasks to give back
    lost = status(ex, second)
    assert lost.state != "ready"
    assert lost.error is not None and second.address in lost.error
    assert status(ex, first).state == "ready"


@pytest.mark.timeout(40)
def test_retries_zero_a_task_lost_with_its_node_fails_with_node_lost_error(cluster: Cluster) -> None:
    nodes = [cluster.node(), cluster.node()]
    ex = cluster.executor(nodes, retries=0)
    log = cluster.tmp / "runs"
    future = block(ex, log, cluster.release)
    counts = track([future])
    (pid,) = started_runs(log, 1)
    doomed = owner(pid, nodes)
    workers = psutil.Process(doomed.process.pid).children()
    kill9(doomed)
    error = future.exception(timeout=15)
    assert isinstance(error, NodeLostError), repr(error)
    assert doomed.address in str(error)
    assert "retries=0" in str(error)
    (healthy,) = [n for n in nodes if n is not doomed]
    assert ex.submit(helpers.pid).result(timeout=10) in children(healthy)
    assert faulty.runs(log) == [pid]  # not run again
    assert_settled(counts)
    # The killed node's workers die with it (no orphan keeps running the task).
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


@pytest.mark.timeout(40)
def test_a_lost_task_runs_again_elsewhere_at_most_retries_times(cluster: Cluster) -> None:
    nodes = [cluster.node(workers=1) for _ in range(3)]
    ex = cluster.executor(nodes, retries=1)
    log = cluster.tmp / "runs"
    future = block(ex, log, cluster.release)
    counts = track([future])

    (first_pid,) = started_runs(log, 1)
    first_node = owner(first_pid, nodes)
    kill9(first_node)
    # Retry 1 of 1: the task runs again on another node.
    second_pid = started_runs(log, 2)[1]
    second_node = owner(second_pid, nodes)
    assert second_node is not first_node
    kill9(second_node)

    error = future.exception(timeout=15)
    assert isinstance(error, NodeLostError), repr(error)
    assert second_node.address in str(error)
    assert "retries=1" in str(error)
    assert len(faulty.runs(log)) == 2
    (last,) = [n for n in nodes if n not in (first_node, second_node)]
    assert ex.submit(helpers.pid).result(timeout=10) in children(last)
    assert_settled(counts)


# --------------------------------------------------------------------------- 3. hung node


@pytest.mark.timeout(40)
def test_frozen_node_is_declared_lost_after_the_heartbeat_timeout(cluster: Cluster) -> None:
    healthy, hung = cluster.node(), cluster.node()
    ex = cluster.executor([healthy, hung], heartbeat_timeout=2.0)
    log = cluster.tmp / "runs"
    futures = [block(ex, log, cluster.release) for _ in range(4)]
    counts = track(futures)
    pids = started_runs(log, 4)
    assert {owner(pid, [healthy, hung]).port for pid in pids} == {healthy.port, hung.port}

    cluster.freeze(hung)
    took = wait_until(lambda: status(ex, hung).state == "lost", 2.0 + 3.0, "the frozen node to be declared lost")
    # The last heartbeat came at most heartbeat_interval (1 s) before the freeze.
    assert 2.0 - 1.0 - 0.2 <= took <= 2.0 + 2.0
    wait_until(lambda: status(ex, hung).in_flight == 0, 5, "the frozen node's tasks to go back to the queue")
    entry = status(ex, hung)
    assert entry.error is not None and "heartbeat" in entry.error
    assert status(ex, healthy).state == "ready"

    cluster.release.touch()
    # Every task ends on the healthy node, the frozen node's two after running again there.
    assert {f.result(timeout=15) for f in futures} <= children(healthy)
    assert len(faulty.runs(log)) == 6
    assert_settled(counts)


@pytest.mark.timeout(30)
def test_task_holding_the_gil_does_not_get_its_node_declared_lost(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterexec")
    node = cluster.node()
    ex = cluster.executor([node], heartbeat_interval=0.25, heartbeat_timeout=1.0, retries=0)
    futures = [ex.submit(faulty.spin, 2.0), ex.submit(faulty.sleep_holding_gil, 2.0)]
    counts = track(futures)
    while not all(f.done() for f in futures):
        assert status(ex, node).state == "ready"
        time.sleep(0.05)  # sampling the state, not waiting for an event
    assert futures[0].result() > 0
    assert futures[1].result() in children(node)
    assert ("ready", "lost") not in transitions(caplog, node)
    assert_settled(counts)


@pytest.mark.timeout(30)
def test_client_thread_holding_the_gil_does_not_lose_healthy_nodes(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterexec")
    nodes = [cluster.node(), cluster.node()]
    ex = cluster.executor(nodes, heartbeat_interval=0.1, heartbeat_timeout=1.0)
    assert ex.submit(helpers.square, 2).result(timeout=10) == 4
    # This thread holds the GIL for twice the heartbeat timeout (as a long C call would, say
    # pickling a huge argument); the nodes go on sending heartbeats the whole time.
    faulty.sleep_holding_gil(2.0)
    assert ex.submit(helpers.square, 3).result(timeout=10) == 9
    for node in nodes:
        assert ("ready", "lost") not in transitions(caplog, node)


# --------------------------------------------------------------------------- 4. rejoin


@pytest.mark.timeout(40)
def test_node_restarted_on_its_port_rejoins_and_gets_work(cluster: Cluster) -> None:
    stays, restarts = cluster.node(), cluster.node()
    ex = cluster.executor([stays, restarts])
    kill9(restarts)
    wait_until(lambda: status(ex, restarts).state == "lost", 10, "the killed node to be lost")
    assert ex.submit(helpers.pid).result(timeout=10) in children(stays)
    waiting = ex.submit_to(restarts.address, os.getpid)  # waits for its node to come back

    again = cluster.node(port=restarts.port)
    assert again.address == restarts.address
    took = wait_until(lambda: status(ex, again).state == "ready", 15, "the restarted node to rejoin")
    assert took < 10  # reconnect backoff is capped at 5 s
    assert waiting.result(timeout=10) in children(again)
    future = ex.submit_to(again.address, os.getpid)
    assert future.result(timeout=10) in children(again)
    # Unpinned work reaches it too.
    log = cluster.tmp / "runs"
    futures = [block(ex, log, cluster.release) for _ in range(4)]
    pids = started_runs(log, 4)
    assert set(pids) & children(again)
    cluster.release.touch()
    assert_settled(track(futures))


# ----------------------------------------------------------------- 5. every node gone too long


def assert_broken(error: BaseException | None, nodes: list[NodeProcess]) -> None:
    assert isinstance(error, BrokenCluster), repr(error)
    assert isinstance(error, BrokenExecutor) and isinstance(error, BrokenProcessPool)
    lines = str(error).splitlines()
    for node in nodes:
        (line,) = [line for line in lines if node.address in line]
        assert len(line.split(node.address, 1)[1].strip(" :")) > 10, "the node's line says why it was lost"


@pytest.mark.timeout(40)
def test_every_node_lost_past_the_reconnect_window_breaks_the_executor(cluster: Cluster) -> None:
    nodes = [cluster.node(), cluster.node()]
    ex = cluster.executor(nodes, reconnect_window=1.0)
    log = cluster.tmp / "runs"
    running = [block(ex, log, cluster.release) for _ in range(4)]
    started_runs(log, 4)
    queued = [ex.submit(helpers.square, x) for x in range(6)]
    counts = track(running + queued)
    for node in nodes:
        kill9(node)
    killed = time.monotonic()

    for future in running + queued:
        assert_broken(future.exception(timeout=10), nodes)
    assert time.monotonic() - killed < 1.0 + 5.0  # the exact bound: the next two tests
    with pytest.raises(BrokenCluster):
        ex.submit(helpers.square, 1)
    with pytest.raises(BrokenCluster):
        ex.map(helpers.square, range(3))
    with pytest.raises(BrokenCluster):
        ex.submit_to(nodes[0].address, helpers.square, 1)
    assert_settled(counts)
    stop = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - stop < 5.0


@pytest.mark.timeout(30)
def test_reconnect_window_longer_than_the_backoff_still_breaks_in_time(cluster: Cluster) -> None:
    nodes = [cluster.node(workers=1), cluster.node(workers=1)]
    ex = cluster.executor(nodes, reconnect_window=3.5)
    pending = block(ex, cluster.tmp / "runs", cluster.release)
    started_runs(cluster.tmp / "runs", 1)
    for node in nodes:
        kill9(node)
    # Broken a reconnect window after the loss, plus 2 s of slack (today: about 11 s).
    assert_broken(pending.exception(timeout=3.5 + 2.0), nodes)


@pytest.mark.timeout(30)
def test_every_node_frozen_past_the_reconnect_window_breaks_the_executor(cluster: Cluster) -> None:
    nodes = [cluster.node(workers=1), cluster.node(workers=1)]
    ex = cluster.executor(
        nodes, heartbeat_interval=0.25, heartbeat_timeout=1.0, reconnect_window=1.0, connect_timeout=1.0
    )
    pending = block(ex, cluster.tmp / "runs", cluster.release)
    started_runs(cluster.tmp / "runs", 1)
    for node in nodes:
        cluster.freeze(node)
    # Lost after the heartbeat timeout, broken a reconnect window later, plus slack (today: about 8 s).
    error = pending.exception(timeout=1.0 + 1.0 + 3.5)
    assert_broken(error, nodes)
    assert str(error).count("heartbeat") == len(nodes)


@pytest.mark.timeout(30)
def test_task_pinned_to_a_node_that_stays_lost_fails(cluster: Cluster) -> None:
    stays, dies = cluster.node(), cluster.node()
    ex = cluster.executor([stays, dies], reconnect_window=1.0)
    log = cluster.tmp / "runs"
    pinned = block(ex, log, cluster.release, dies)
    counts = track([pinned])
    started_runs(log, 1)
    wait_until(pinned.running, 10, "the node to report the task started")
    kill9(dies)
    try:
        error = pinned.exception(timeout=1.0 + 3.0)
        assert isinstance(error, NodeLostError), repr(error)
        assert dies.address in str(error)
        assert_settled(counts)
    finally:
        kill9(stays)  # every node lost: the executor breaks, so it can shut down at teardown


# --------------------------------------------------------------------------- 6. client loss

CLIENT = """
import sys, time
sys.path.insert(0, {tests!r})
import faulty
from clusterexec import ClusterExecutor

ex = ClusterExecutor([{address!r}], key_file={key!r})
ex.submit(faulty.touch_and_ignore_sigterm, {stubborn!r}, 120)
ex.submit(faulty.touch_and_sleep, {plain!r}, 120)
print("submitted", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(40)
def test_killed_client_has_its_session_workers_ended(cluster: Cluster) -> None:
    node = cluster.node(workers=2)
    stubborn, plain = cluster.tmp / "stubborn", cluster.tmp / "plain"
    script = cluster.tmp / "client.py"
    script.write_text(
        textwrap.dedent(CLIENT).format(
            tests=str(TESTS), address=node.address, key=str(cluster.key_file), stubborn=str(stubborn), plain=str(plain)
        )
    )
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: stubborn.exists() and plain.exists() or client.poll() is not None, 20, "both tasks")
        assert client.poll() is None, client.communicate()
        workers = psutil.Process(node.process.pid).children()
        assert len(workers) == 2
        client.kill()
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.communicate()
    killed = time.monotonic()

    # SIGTERM at once, SIGKILL 2 s later for a worker that ignores SIGTERM.
    gone, alive = psutil.wait_procs(workers, timeout=6.0)
    assert not alive, f"workers still alive {time.monotonic() - killed:.1f}s after the client died"
    assert time.monotonic() - killed < 6.0
    assert not children(node)  # reaped, no zombies, no replacements for a closed session
    for worker in workers:
        assert not psutil.pid_exists(worker.pid)

    ex = cluster.executor([node])
    assert ex.submit(helpers.square, 5).result(timeout=10) == 25


# --------------------------------------------------------------------------- 7. states and logs


@pytest.mark.timeout(40)
def test_nodes_show_state_workers_in_flight_and_every_change_is_logged(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterexec")
    stays, dies = cluster.node(workers=2), cluster.node(workers=3)
    ex = cluster.executor([stays, dies], retries=0)
    assert [(n.address, n.state, n.workers, n.in_flight) for n in ex.nodes] == [
        (stays.address, "ready", 2, 0),
        (dies.address, "ready", 3, 0),
    ]
    log = cluster.tmp / "runs"
    futures = [block(ex, log, cluster.release, stays) for _ in range(2)] + [block(ex, log, cluster.release, dies)]
    counts = track(futures)
    started_runs(log, 3)
    assert [(n.state, n.in_flight) for n in ex.nodes] == [("ready", 2), ("ready", 1)]

    kill9(dies)
    wait_until(lambda: status(ex, dies).state == "lost", 10, "the killed node to be lost")
    wait_until(lambda: status(ex, dies).in_flight == 0, 5, "the lost node's tasks to be taken back")
    assert status(ex, dies).error is not None
    assert isinstance(futures[2].exception(timeout=10), NodeLostError)  # retries=0
    cluster.node(workers=3, port=dies.port)
    seen = set()

    def ready_again() -> bool:
        seen.add(status(ex, dies).state)
        return status(ex, dies).state == "ready"

    wait_until(ready_again, 15, "the restarted node to be ready")
    cluster.release.touch()
    assert_settled(counts)

    for node, lost in ((stays, False), (dies, True)):
        changes = transitions(caplog, node)
        assert changes[:4] == [
            ("idle", "connecting"),
            ("connecting", "handshaking"),
            ("handshaking", "opening session"),
            ("opening session", "ready"),
        ]
        for (_, before), (after, _) in itertools.pairwise(changes):
            assert before == after, f"a state change of {node.address} was not logged: {changes}"
        if lost:
            assert ("ready", "lost") in changes and changes[-1] == ("opening session", "ready")
            assert seen <= {state for change in changes for state in change}
        else:
            assert len(changes) == 4
    assert all(r.threadName == "clusterexec-io" for r in caplog.records if " -> " in r.getMessage())
