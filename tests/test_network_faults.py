"""Network faults: partitions, resets, slow links, silent and stalled clients, idle floods.

Every node here is a real node process and every client a real ClusterExecutor (in this
process, or in a client process where the client must vanish or freeze); the network between
them is the link simulator (``benchmarks/linksim.py``), a TCP proxy on loopback that delays,
throttles, partitions (bytes lost, or held back as TCP would across a dead route), heals and
resets connections. Each test states the fault, what the user's program must see (every task
ends exactly once, in order for ``map``, nothing hangs) and what the node must do (end the
sessions of clients gone silent, free their workers, log it, keep serving the others).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import random
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faulty
import helpers
import psutil
import pytest
from conftest import NodeProcess, wait_until
from outcomes import assert_settled, track

from clusterexec import BrokenCluster, ClusterExecutor
from clusterexec.client.report import NodeStatus

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "benchmarks"))

from linksim import Link, LinkSimulator  # noqa: E402

# Fast fault detection on the client: pings every 0.25 s, a node silent for 1.5 s is lost.
FAST = {"heartbeat_interval": 0.25, "heartbeat_timeout": 1.5, "connect_timeout": 1.0}
SILENT = re.compile(
    r"INFO session from (\S+) ended \(client silent for ([\d.]+)s, past the client timeout of ([\d.]+)s\)"
)


# --------------------------------------------------------------------------- helpers


class NodeLog:
    """A node's output, read line by line by a thread (the pipe must not fill and block it)."""

    def __init__(self, node: NodeProcess) -> None:
        self.lines = list(node.lines)
        self._lock = threading.Lock()
        stream = node.process.stdout
        assert stream is not None
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        try:
            for line in stream:
                with self._lock:
                    self.lines.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass

    def count(self) -> int:
        with self._lock:
            return len(self.lines)

    def matching(self, pattern: re.Pattern[str], since: int = 0) -> list[re.Match[str]]:
        with self._lock:
            lines = self.lines[since:]
        return [m for m in map(pattern.search, lines) if m]

    def wait_for(self, pattern: re.Pattern[str], timeout: float, since: int = 0) -> re.Match[str]:
        wait_until(lambda: self.matching(pattern, since), timeout, f"a node log line matching {pattern.pattern!r}")
        return self.matching(pattern, since)[0]


def children(node: NodeProcess) -> list[psutil.Process]:
    """A node's worker processes."""
    return psutil.Process(node.process.pid).children()


def status(ex: ClusterExecutor, link: Link) -> NodeStatus:
    """What ``ex.nodes`` says of the node behind ``link``."""
    (found,) = [entry for entry in ex.nodes if entry.address == link.address]
    return found


def started_runs(log: Path, count: int, timeout: float = 15.0) -> list[int]:
    """Wait until ``log`` holds ``count`` runs of ``faulty.log_run_and_block``; return their pids."""
    wait_until(lambda: len(faulty.runs(log)) >= count, timeout, f"{count} task runs in {log.name}")
    return faulty.runs(log)


def kill9(node: NodeProcess) -> None:
    node.process.kill()
    node.process.wait(10)


@dataclass
class Net:
    """The nodes, links and executors of one test; at teardown blocked tasks are released,
    links healed, executors shut down (bounded) and nodes killed."""

    start: Callable[..., NodeProcess]
    sim: LinkSimulator
    key_file: Path
    tmp: Path
    executors: list[ClusterExecutor] = field(default_factory=list)
    logs: dict[int, NodeLog] = field(default_factory=dict)

    @property
    def release(self) -> Path:
        """The file blocked tasks wait for."""
        return self.tmp / "release"

    @property
    def runs(self) -> Path:
        """The file blocked tasks log their runs to."""
        return self.tmp / "runs"

    def node(self, *args: str, workers: int = 2, port: int = 0, **kwargs: Any) -> NodeProcess:
        """Start a node (``args``: more flags), and read its log."""
        node = self.start(
            "--workers", str(workers), "--key-file", str(self.key_file), *args, "--port", str(port), **kwargs
        )
        self.logs[node.process.pid] = NodeLog(node)
        return node

    def log(self, node: NodeProcess) -> NodeLog:
        return self.logs[node.process.pid]

    def link(self, node: NodeProcess, **settings: Any) -> Link:
        """A link to ``node`` (``delay``, ``rate``...)."""
        return self.sim.link((node.host, node.port), **settings)

    def executor(self, links: list[Link], **options: Any) -> ClusterExecutor:
        """A ClusterExecutor on the nodes behind ``links``, shut down at teardown."""
        ex = ClusterExecutor([link.address for link in links], key_file=self.key_file, **options)
        self.executors.append(ex)
        return ex

    def block(self, ex: ClusterExecutor) -> Future[int]:
        """A task that logs its run to :attr:`runs` and blocks until :attr:`release` exists."""
        return ex.submit(faulty.log_run_and_block, str(self.runs), str(self.release))

    def close(self) -> None:
        self.release.touch()
        for link in self.sim.links:
            link.heal()
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for ex in self.executors:
            ex._scheduler.join(20.0)
            assert not ex._scheduler._thread.is_alive(), "an executor did not shut down within 20s"


@pytest.fixture
def net(node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path) -> Iterator[Net]:
    """Nodes behind simulated links, and executors; everything is stopped at teardown."""
    with LinkSimulator() as sim:
        state = Net(node_factory, sim, key_file, tmp_path)
        try:
            yield state
        finally:
            state.close()


# --------------------------------------------------------------------------- 1. one node partitioned


def fault_at(progress: threading.Event, action: Callable[[], None], errors: list[BaseException]) -> threading.Thread:
    """Run ``action`` in a thread once ``progress`` is set; what it raises goes to ``errors``."""

    def run() -> None:
        try:
            if progress.wait(30):
                action()
        except BaseException as exc:  # checked by the test once the map is over
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "heal", ["never", "after the loss", "before the timeout, bytes lost", "before the timeout, bytes held"]
)
def test_one_node_of_two_partitioned_mid_map_every_task_ends_once_in_order(net: Net, heal: str) -> None:
    a, b = net.node(), net.node()
    stays, cut = net.link(a, delay=0.001), net.link(b, delay=0.001)
    ex = net.executor([stays, cut], **FAST)
    halfway = threading.Event()
    in_flight_at_cut: list[int] = []

    def cut_the_link() -> None:
        in_flight_at_cut.append(status(ex, cut).in_flight)
        cut.partition(hold=heal.endswith("held"))
        if heal == "after the loss":
            wait_until(lambda: status(ex, cut).state == "lost", 10, "the partitioned node to be lost")
            cut.heal()
        elif heal.startswith("before"):
            time.sleep(0.5)  # the fault's length, a third of the heartbeat timeout
            cut.heal()

    errors: list[BaseException] = []
    faulting = fault_at(halfway, cut_the_link, errors)
    inputs = range(1500)
    started = time.monotonic()
    results = []
    for i, value in enumerate(ex.map(faulty.paced, inputs)):
        results.append(value)
        if i == 300:
            halfway.set()
    elapsed = time.monotonic() - started
    faulting.join(15)
    assert not faulting.is_alive() and not errors, errors
    assert results == [faulty.work(x) for x in inputs]
    assert elapsed < 30
    assert in_flight_at_cut and in_flight_at_cut[0] > 0, "the partitioned node had no task to lose"
    stats = ex.stats()
    assert stats.late_results == 0
    if heal == "before the timeout, bytes held":
        # TCP would have retransmitted: the session survives, nothing is sent twice.
        assert stats.reruns == 0
        assert status(ex, cut).state == "ready" and status(ex, cut).error is None
    else:
        # Its tasks in flight ran again on the other node (or on it, after the heal); a result
        # may have come in between the count and the cut.
        assert stats.reruns > 0
    if heal == "never":
        assert status(ex, cut).state != "ready"
        assert "heartbeat" in str(status(ex, cut).error)
    else:
        # Healed: it rejoins and gets work again.
        wait_until(lambda: status(ex, cut).state == "ready", 15, "the healed node to rejoin")
        assert ex.submit_to(cut.address, os.getpid).result(10) in {p.pid for p in children(b)}


# --------------------------------------------------------------------------- 2. client cut from every node


@pytest.mark.timeout(40)
def test_client_partitioned_from_every_node_fails_with_broken_cluster_after_the_window(net: Net) -> None:
    nodes = [net.node(), net.node()]
    links = [net.link(node) for node in nodes]
    ex = net.executor(links, **{**FAST, "heartbeat_timeout": 1.0}, reconnect_window=1.5)
    running = [net.block(ex) for _ in range(4)]
    started_runs(net.runs, 4)
    queued = [ex.submit(helpers.square, x) for x in range(6)]
    counts = track(running + queued)
    for link in links:
        link.partition()
    cut = time.monotonic()
    for future in running + queued:
        error = future.exception(timeout=15)
        assert isinstance(error, BrokenCluster), repr(error)
        for link in links:
            assert link.address in str(error)
    # Lost after the heartbeat timeout, broken a reconnect window later; 3 s of slack.
    took = time.monotonic() - cut
    assert 1.0 + 1.5 - 0.3 <= took < 1.0 + 1.5 + 3.0, took
    with pytest.raises(BrokenCluster):
        ex.submit(helpers.square, 1)
    assert_settled(counts, timeout=20.0)
    stop = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - stop < 5.0


# --------------------------------------------------------------------------- 3. resets mid-frame


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_connections_reset_mid_frame_at_random_offsets_every_task_once(net: Net, seed: int) -> None:
    rng = random.Random(seed)
    nodes = [net.node(), net.node()]
    links = [net.link(node) for node in nodes]
    # Each task may be cut off with its node several times: retries must not be what ends it.
    ex = net.executor(links, **FAST, retries=100)
    wanted = 8
    done = threading.Event()

    def reset_at_random() -> None:
        for _ in range(wanted):
            link = rng.choice(links)
            before = link.resets
            # Offsets up to 64 KiB: in handshakes, in task and result frames, in pings.
            link.reset_after(rng.randrange(1, 1 << 16))
            while link.resets == before and not done.wait(0.01):
                pass
            if done.is_set():
                return
        done.set()

    chaos = threading.Thread(target=reset_at_random, daemon=True)
    chaos.start()

    produced: list[tuple[int, bytes]] = []
    sizes = random.Random(-seed)

    def inputs() -> Iterator[tuple[int, bytes]]:
        # Tasks go on until every reset has happened (bounded by the test's timeout).
        while not done.is_set() or len(produced) < 200:
            item = (len(produced), os.urandom(sizes.randrange(0, 20000)))
            produced.append(item)
            yield item

    results = list(ex.map(helpers.identity, inputs(), buffersize=64))
    chaos.join(10)
    assert sum(link.resets for link in links) >= wanted
    assert results == produced  # every task once, in order, its bytes intact
    assert ex.stats().reruns > 0
    # Both nodes are usable afterwards.
    wait_until(lambda: all(status(ex, link).state == "ready" for link in links), 15, "both links to be ready")


# --------------------------------------------------------------------------- 4. bulk data on a slow link


@pytest.mark.timeout(60)
def test_bulk_data_on_a_slow_link_does_not_look_like_a_lost_peer(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clusterexec")
    node = net.node("--client-timeout", "1", workers=1)
    rate = 20e6
    link = net.link(node, delay=0.005, rate=rate)
    ex = net.executor([link], heartbeat_interval=0.25, heartbeat_timeout=1.0)
    size = 40_000_000  # 2 s at 20 MB/s each way: twice the heartbeat and client timeouts
    payload = b"a" * size
    started = time.monotonic()
    assert ex.submit(len, payload).result(timeout=30) == size  # client -> node
    assert ex.submit(bytes, size).result(timeout=30) == bytes(size)  # node -> client
    took = time.monotonic() - started
    assert took >= 2 * size / rate * 0.95  # the link really was that slow
    assert ex.stats().reruns == 0
    entry = status(ex, link)
    assert entry.state == "ready" and entry.error is None
    assert not [r for r in caplog.records if "lost" in r.getMessage()]
    assert not net.log(node).matching(SILENT)


# --------------------------------------------------------------------------- 5. a node restarted behind a partition


@pytest.mark.timeout(60)
def test_node_restarted_on_its_address_during_a_partition_is_used_after_the_heal(net: Net) -> None:
    a, b = net.node(), net.node()
    stays, cut = net.link(a), net.link(b)
    ex = net.executor([stays, cut], **FAST)
    futures = [ex.submit(faulty.paced, x, 0.005) for x in range(1200)]
    counts = track(futures)
    wait_until(lambda: status(ex, cut).tasks_done > 20, 15, "the node to run some tasks")
    cut.partition()
    kill9(b)
    again = net.node(port=b.port)
    assert again.port == b.port
    wait_until(lambda: status(ex, cut).state != "ready", 10, "the partitioned node to be lost")
    cut.heal()
    wait_until(lambda: status(ex, cut).state == "ready", 15, "the restarted node to be used")
    assert [f.result(timeout=30) for f in futures] == [faulty.work(x) for x in range(1200)]
    assert_settled(counts, timeout=20.0)
    assert ex.submit_to(cut.address, os.getpid).result(timeout=10) in {p.pid for p in children(again)}
    assert ex.stats().reruns > 0


# --------------------------------------------------------------------------- 6. a client that comes back


@pytest.mark.timeout(60)
@pytest.mark.parametrize("partition", ["held, shorter than the timeout", "longer than the timeout"])
def test_client_returning_after_a_partition_gets_each_outcome_once(net: Net, partition: str) -> None:
    node = net.node("--client-timeout", "3", workers=2)
    link = net.link(node)
    ex = net.executor([link], **FAST)
    blocked = [net.block(ex) for _ in range(2)]
    quick = [ex.submit(helpers.square, x) for x in range(20)]
    counts = track(blocked + quick)
    first_pids = started_runs(net.runs, 2)
    in_flight = status(ex, link).in_flight
    assert in_flight >= 2
    (old_peer,) = link.sources()
    if partition.startswith("held"):
        link.partition(hold=True)
        time.sleep(0.5)  # the fault's length, a third of the heartbeat timeout
        link.heal()
    else:
        link.partition()
        wait_until(lambda: status(ex, link).state != "ready", 10, "the node to be lost")
        link.heal()
        wait_until(lambda: status(ex, link).state == "ready", 15, "the node to be back")
        # The tasks in flight run again in the new session; the old session still runs them too.
        started_runs(net.runs, 4)
    net.release.touch()
    assert [f.result(timeout=20) for f in quick] == [x * x for x in range(20)]
    pids = [f.result(timeout=20) for f in blocked]
    assert_settled(counts, timeout=20.0)
    stats = ex.stats()
    # Results of the old session never reach the new one: nothing is delivered twice.
    assert stats.late_results == 0
    if partition.startswith("held"):
        assert stats.reruns == 0
        assert sorted(pids) == sorted(first_pids) and len(faulty.runs(net.runs)) == 2
    else:
        assert stats.reruns == in_flight
        assert not set(pids) & set(first_pids)  # from the new session's workers
        # The node ended the old session and freed its workers: silent past the client timeout,
        # or reset once the heal let the client's host answer the old connection's heartbeats.
        ended = re.compile(rf"INFO session from {re.escape(old_peer)} ended \((client silent|client disconnected)")
        net.log(node).wait_for(ended, 3 + 5)
        wait_until(lambda: not any(psutil.pid_exists(pid) for pid in first_pids), 5, "the old workers to end")


# --------------------------------------------------------------------------- 7. node side: silent clients


@pytest.mark.timeout(40)
@pytest.mark.parametrize("queued", [False, True], ids=["idle link", "bulk result queued"])
def test_node_ends_the_session_of_a_silent_client_and_frees_its_workers(net: Net, queued: bool) -> None:
    node = net.node("--client-timeout", "2", workers=2)
    link = net.link(node)
    # retries=0: at teardown the client's task fails when the node's close reaches it, rather
    # than running its 200 MB result again.
    ex = net.executor([link], heartbeat_interval=0.25, retries=0)
    if queued:
        futures = [ex.submit(faulty.log_run_and_return_bulk, str(net.runs), str(net.release), 200 << 20)]
        started_runs(net.runs, 1)
    else:
        futures = [net.block(ex) for _ in range(2)]
        started_runs(net.runs, 2)
    workers = children(node)
    assert workers
    (peer,) = link.sources()
    since = net.log(node).count()
    if queued:
        link.set(rate=1e6)
        link.partition(hold=True)  # no byte moves: the 200 MB result stays queued on the node
        net.release.touch()
    else:
        link.partition()
    cut = time.monotonic()
    _, alive = psutil.wait_procs(workers, timeout=2 + 5)
    took = time.monotonic() - cut
    assert not alive, f"workers still alive {took:.1f}s after the client went silent"
    match = net.log(node).wait_for(SILENT, 5, since)
    assert match.group(1) == peer
    assert float(match.group(3)) == 2
    assert 2 - 0.5 <= float(match.group(2)) < 2 + 1.5
    assert 2 - 0.5 <= took < 2 + 4, took
    assert not children(node)
    # The node still serves: a new client gets a result at once.
    with ClusterExecutor([node.address], key_file=net.key_file) as fresh:
        assert fresh.submit(helpers.square, 9).result(timeout=10) == 81
    link.set(rate=None)
    # The silent client's own tasks end at teardown (its node has dropped them); looked at
    # here, so that the report of failures nobody asked about does not list them at exit.
    for future in futures:
        with contextlib.suppress(concurrent.futures.TimeoutError):  # the builtin only from 3.11
            future.exception(timeout=0)


@pytest.mark.timeout(40)
def test_heartbeats_keep_a_busy_session_alive_past_the_client_timeout(net: Net) -> None:
    node = net.node("--client-timeout", "1", workers=1)
    link = net.link(node, delay=0.005)
    ex = net.executor([link], heartbeat_interval=0.25)
    # A task that runs three times the client timeout: only the client's pings say it is there.
    assert ex.submit(helpers.sleep_then, 3.0, "done").result(timeout=15) == "done"
    assert not net.log(node).matching(SILENT)
    assert ex.stats().reruns == 0


STALLED_CLIENT = """
import itertools, sys
sys.path.insert(0, {tests!r})
from clusterexec import ClusterExecutor

ex = ClusterExecutor([{address!r}], key_file={key!r})
for i, size in enumerate(ex.map(bytes, itertools.repeat(1 << 20), buffersize=64)):
    if i == 10:
        print("running", flush=True)
"""


@pytest.mark.timeout(60)
def test_client_that_stops_reading_does_not_hurt_others_and_its_session_ends(net: Net) -> None:
    node = net.node("--client-timeout", "3", workers=2)
    script = net.tmp / "stalled.py"
    script.write_text(
        textwrap.dedent(STALLED_CLIENT).format(tests=str(TESTS), address=node.address, key=str(net.key_file))
    )
    client = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "running", client.communicate(timeout=10)
        (conn,) = [c for c in psutil.Process(client.pid).net_connections("tcp") if c.raddr and c.raddr[1] == node.port]
        peer = f"{conn.laddr[0]}:{conn.laddr[1]}"
        stalled_workers = children(node)
        since = net.log(node).count()
        # A suspended laptop, Ctrl-Z: the client neither reads nor writes; results pile up.
        client.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        link = net.link(node)
        ex = net.executor([link])
        assert list(ex.map(helpers.square, range(200))) == [x * x for x in range(200)]
        assert time.monotonic() - stopped < 3, "another client waited for the stalled one"
        match = net.log(node).wait_for(SILENT, 3 + 5, since)
        assert match.group(1) == peer
        _, alive = psutil.wait_procs(stalled_workers, timeout=5)
        assert not alive
        # The other session goes on.
        assert ex.submit(helpers.square, 12).result(timeout=10) == 144
    finally:
        client.kill()
        client.wait(10)
        if client.stdout is not None:
            client.stdout.close()


# --------------------------------------------------------------------------- 8. idle connections


FLOOD = """
import errno, resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
target, count = ({host!r}, {port}), {count}
selector = selectors.DefaultSelector()
opened = 0

def open_one():
    global opened
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(target)
    selector.register(sock, selectors.EVENT_READ)
    opened += 1

for _ in range(count):
    open_one()
reported = 0.0
while True:
    for key, _ in selector.select(0.1):
        sock = key.fileobj
        try:
            data = sock.recv(1)
        except OSError:
            data = b""
        if not data:  # dropped by the node: open another one at once
            selector.unregister(sock)
            sock.close()
            open_one()
    now = time.monotonic()
    if now - reported > 0.2:
        print(len(selector.get_map()), opened, flush=True)
        reported = now
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count", [1000, 2000, 3500])
def test_idle_connections_that_never_authenticate_do_not_crowd_out_a_key_holder(net: Net, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 200:
        pytest.skip(f"the hard open-files limit ({hard}) is below {count} connections")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    node = net.node(workers=1, preexec_fn=low_soft_limit)
    assert psutil.Process(node.process.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    flood = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FLOOD).format(host=node.host, port=node.port, count=count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    progress: list[tuple[int, int]] = []

    def read_progress() -> None:
        assert flood.stdout is not None
        for line in flood.stdout:
            held, opened = map(int, line.split())
            progress.append((held, opened))

    threading.Thread(target=read_progress, daemon=True).start()
    try:
        since = net.log(node).count()
        # Held open, and reopened as the node drops them: the node has been evicting for a while.
        wait_until(lambda: progress and progress[-1][1] >= 2 * count, 30, f"{count} more connections reopened")
        assert progress[-1][0] == count
        started = time.monotonic()
        with ClusterExecutor([node.address], key_file=net.key_file) as ex:
            assert ex.submit(helpers.square, 7).result(timeout=10) == 49
            took = time.monotonic() - started
        print(f"a key holder got its first result in {took:.3f}s")
        assert took < 1.0, f"a key holder waited {took:.2f}s for its first result"
        assert flood.poll() is None
        # The node's log stays bounded: a few lines per interval, however many handshakes fail.
        lines = net.log(node).lines[since:]
        assert len(lines) < 60, "\n".join(lines[:80])
    finally:
        flood.kill()
        flood.wait(10)
        if flood.stdout is not None:
            flood.stdout.close()
