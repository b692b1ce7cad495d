"""Shared nodes (issue 18): many clients on one node, each a real process, without oversubscription.

``--workers W`` is the node's capacity across all its clients: the run slots are shared fairly, a
newcomer is not starved, worker processes are bounded and retired when idle, a full node says
so, and ``clusterexec status`` shows the sessions. Tasks sleep rather than spin, so that the
figures hold on a small, loaded machine: what is measured is when the node lets tasks run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import TESTS, NodeProcess, clean_env, cli, wait_until

from clusterexec import ClusterExecutor, NodeFullError, NodeUnreachableError
from clusterexec.cli.probe import probe
from clusterexec.keys import resolve_key
from clusterexec.launch.specs import parse_address


@dataclass
class ClientRun:
    """What one client process reported: when it started mapping, and each task's span."""

    started: float
    spans: list[tuple[float, float, int]]


@pytest.fixture
def clients(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., list[ClientRun]]]:
    """``clients(node, k, count, seconds)``: run k client processes against ``node``, all starting
    their maps at once, each mapping ``count`` naps of ``seconds``; return their reports."""
    started: list[subprocess.Popen[str]] = []

    def run(node: NodeProcess, k: int, count: int, seconds: float, timeout: float = 60.0) -> list[ClientRun]:
        go = tmp_path / "go"
        outs = [tmp_path / f"client{i}.json" for i in range(k)]
        for out in outs:
            command = [sys.executable, str(TESTS / "shared_client.py"), node.address, str(key_file)]
            command += [str(count), str(seconds), str(go), str(out)]
            started.append(subprocess.Popen(command, env=clean_env(), stderr=subprocess.PIPE, text=True))
        wait_until(lambda: all(Path(f"{out}.ready").exists() for out in outs), 30, "every client to connect")
        go.touch()
        for process in started[-k:]:
            _, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err
        runs = []
        for out in outs:
            report = json.loads(out.read_text())
            runs.append(ClientRun(report["started"], [tuple(span) for span in report["spans"]]))
        return runs

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def most_at_once(spans: list[tuple[float, float, int]]) -> int:
    """The most spans open at one moment (an end and a start at the same instant do not overlap)."""
    events = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def status_of(node: NodeProcess, key_file: Path) -> dict[str, object]:
    """The node's status report, as ``clusterexec status --json`` prints it."""
    done = cli("status", node.address, "-k", str(key_file), "--json")
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)["nodes"]
    return entry


def children(node: NodeProcess) -> list[psutil.Process]:
    """The node's worker processes (those not reaped yet included)."""
    return psutil.Process(node.process.pid).children()


# --------------------------------------------------------------------------- capacity and fairness


@pytest.mark.timeout(90)
def test_four_clients_never_run_more_than_the_node_s_workers_at_once(node_factory, key_file: Path, clients) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    runs = clients(node, 4, 12, 0.1)
    spans = [span for run in runs for span in run.spans]
    assert len(spans) == 48
    assert most_at_once(spans) == 2  # the node's capacity, used, and never exceeded
    pids = {pid for run in runs for _, _, pid in run.spans}
    for run in runs:  # each client keeps worker processes of its own
        own = {pid for _, _, pid in run.spans}
        others = pids - own
        assert not own & others


@pytest.mark.timeout(90)
def test_three_saturating_clients_each_get_a_fair_part_of_the_throughput(
    node_factory, key_file: Path, clients
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    k = 3
    runs = clients(node, k, 40, 0.05)
    # While every client still had work: from the start to the first client's last result.
    window_end = min(max(end for _, end, _ in run.spans) for run in runs)
    done = [sum(1 for _, end, _ in run.spans if end <= window_end) for run in runs]
    total = sum(done)
    assert total >= 20, done
    for count in done:
        assert count >= total / (2 * k), f"tasks done per client while all were busy: {done}"


@pytest.mark.timeout(60)
def test_a_newcomer_at_a_busy_node_starts_within_one_task_plus_a_second(
    node_factory, key_file: Path, tmp_path: Path
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    task = 1.5
    go = tmp_path / "go"
    go.touch()
    busy = subprocess.Popen(
        [sys.executable, str(TESTS / "shared_client.py"), node.address, str(key_file), "20", str(task), str(go),
         str(tmp_path / "busy.json")],
        env=clean_env(),
    )  # fmt: skip
    try:
        # The first client fills the node: both slots busy, more of its tasks queued there.
        address, key = parse_address(node.address), resolve_key(key_file=key_file)
        wait_until(lambda: (lambda r: r.busy == 2 and r.sessions and r.sessions[0].queued > 0)(probe(address, key)),
                   30, "the first client to saturate the node")  # fmt: skip
        with ClusterExecutor([node.address], key_file=key_file) as ex:
            submitted = time.time()
            started, _, _ = ex.submit(helpers.timed_nap, 0.0).result(timeout=30)
        assert started - submitted <= task + 1.0
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.timeout(60)
def test_each_client_is_told_its_share_and_gets_it_back_when_the_other_leaves(
    node_factory, key_file: Path
) -> None:
    node = node_factory("--workers", "4", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as first:
        assert [n.workers for n in first.nodes] == [4]
        with ClusterExecutor([node.address], key_file=key_file) as second:
            assert [n.workers for n in second.nodes] == [2]  # its WELCOME: half the node
            wait_until(lambda: [n.workers for n in first.nodes] == [2], 10, "the first client's share to halve")
            assert second.submit(helpers.square, 7).result(timeout=10) == 49
        # The second client is gone: after a short linger the first has the whole node again.
        wait_until(lambda: [n.workers for n in first.nodes] == [4], 10, "the first client's share to come back")
        assert sum(first.map(helpers.square, range(10))) == 285


# --------------------------------------------------------------------------- bounded resources


@pytest.mark.timeout(90)
def test_worker_processes_stay_within_max_processes_whatever_the_clients(
    node_factory, key_file: Path, clients
) -> None:
    node = node_factory("--workers", "2", "--max-processes", "3", "--key-file", str(key_file))
    most = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            try:
                most = max(most, len(children(node)))
            except psutil.Error:
                pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runs = clients(node, 4, 8, 0.05)  # four clients with work: unbounded, that is 4+ processes
    finally:
        stop.set()
        sampler.join()
    assert [len(run.spans) for run in runs] == [8, 8, 8, 8]
    assert 2 <= most <= 3


@pytest.mark.timeout(60)
def test_idle_workers_are_retired_and_started_again_on_demand(node_factory, key_file: Path) -> None:
    node = node_factory("--workers", "2", "--worker-idle-timeout", "0.5", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        first = set(ex.map(helpers.pid_of, range(20)))
        assert first <= {child.pid for child in children(node)}
        wait_until(lambda: not children(node), 10, "the idle workers to be retired")
        assert status_of(node, key_file)["processes"] == 0
        again = set(ex.map(helpers.pid_of, range(20)))  # new workers, started on demand
        assert again and not again & first


@pytest.mark.timeout(60)
def test_one_session_too_many_is_refused_with_an_error_naming_the_full_node(
    node_factory, key_file: Path
) -> None:
    node = node_factory("--workers", "2", "--max-sessions", "1", "--key-file", str(key_file))
    with ClusterExecutor([node.address], key_file=key_file) as first:
        with pytest.raises(NodeFullError, match=rf"node {node.address} is full") as caught:
            ClusterExecutor([node.address], key_file=key_file)
        assert "--max-sessions 1" in str(caught.value)
        assert isinstance(caught.value, NodeUnreachableError)  # code catching that catches this
        assert first.submit(helpers.square, 3).result(timeout=10) == 9  # the first goes on
    assert any("refused" in line and "full" in line for line in node_log(node, "refused"))


def node_log(node: NodeProcess, wanted: str, timeout: float = 10.0) -> list[str]:
    """The node's log lines so far, read until one containing ``wanted`` shows up."""
    assert node.process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(wanted in line for line in node.lines):
        line = node.process.stdout.readline()
        if not line:
            break
        node.lines.append(line)
    return node.lines


@pytest.mark.timeout(60)
def test_a_client_goes_on_without_a_full_node_and_joins_it_once_it_has_room(
    node_factory, key_file: Path
) -> None:
    full = node_factory("--workers", "1", "--max-sessions", "1", "--key-file", str(key_file))
    free = node_factory("--workers", "1", "--key-file", str(key_file))
    holder = ClusterExecutor([full.address], key_file=key_file)
    try:
        with ClusterExecutor([full.address, free.address], key_file=key_file) as ex:
            states = {status.address: status for status in ex.nodes}
            assert states[free.address].state == "ready"
            assert states[full.address].state == "lost" and "is full" in str(states[full.address].error)
            assert sum(ex.map(helpers.square, range(10))) == 285  # on the node with room
            holder.shutdown()
            wait_until(lambda: all(s.state == "ready" for s in ex.nodes), 20, "the full node to take the client")
            assert ex.submit(helpers.square, 4).result(timeout=10) == 16
    finally:
        holder.shutdown()


# --------------------------------------------------------------------------- operators


@pytest.mark.timeout(60)
def test_status_shows_each_session_with_its_share_and_queue_and_the_worker_processes(
    node_factory, key_file: Path, tmp_path: Path
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    release = tmp_path / "release"
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        futures = [ex.submit(helpers.block, None, str(release)) for _ in range(5)]
        address, key = parse_address(node.address), resolve_key(key_file=key_file)
        wait_until(lambda: (lambda r: r.busy == 2 and r.sessions[0].queued > 0)(probe(address, key)),
                   20, "two running tasks and some queued")  # fmt: skip
        entry = status_of(node, key_file)
        assert entry["processes"] == 2 and entry["busy"] == 2
        (session,) = entry["sessions"]
        assert session["share"] == 2 and session["running"] == 2 and session["queued"] >= 1
        table = cli("status", node.address, "-k", str(key_file))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:6] == ["NODE", "STATE", "WORKERS", "BUSY", "SESSIONS", "PROCS"]
        assert lines[1].split()[:6] == [node.address, "up", "2", "2", "1", "2"]
        assert lines[2].startswith(f"  session {session['peer']}: share 2, {session['queued']} queued, 2 running")
        release.touch()
        assert [f.result(timeout=10) for f in futures] == [None] * 5
