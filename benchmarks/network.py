"""Scheduling on simulated networks: nodes behind links with delay, uneven tasks, many nodes.

    python benchmarks/network.py                  # every workload (a few minutes)
    python benchmarks/network.py --quick          # smaller sizes (about a minute)
    python benchmarks/network.py --only delay,uneven --json

Every node is a real ``python -m clusterexec.node --port 0 --workers 1`` process; every client
connection goes through a link of the simulator (``linksim.py``: a TCP proxy on loopback that
delays each direction by a fixed one-way time). Each figure is a ratio within this run:

- ``delay``: tiny-task map throughput on 2 nodes x 1 worker at 1 ms and 10 ms one way (2 ms and
  20 ms round trips), against the same map through zero-delay links (targets 0.9 and 0.5);
- ``short``: 200 tasks of 10 ms on 2 nodes behind a 2 ms round trip, time over the ideal 1.0 s
  (target <= 1.15);
- ``uneven``: after a tiny-task map, 4 tasks of 0.2 s per worker on 16 and on 32 nodes,
  efficiency = ideal / time (target >= 0.9);
- ``lognormal``: 1,000 tasks with lognormal times (median 40 ms, sigma 1) on 16 nodes, ideal
  bound max(total / workers, longest) over the time (target >= 0.85); also what list scheduling
  in submission order with no overhead at all would get on the same draw;
- ``many``: tiny-task map throughput on 64 nodes against 2 nodes (target >= 0.8);
- ``connect``: 128 nodes: constructor to first result, seconds (target <= 1.0);
- ``latency``: sequential submit and result through a link, minus the link's own round trip
  (1-byte echo through the same simulator, which adds its own wake-ups), ms
  (target <= 1.0).

Throughput figures are medians of rounds that take turns (the delays of ``delay``, in an order
that reverses every round, and the two clusters of ``many``), so that a burst of load on the
machine hits every side alike; each ratio is the median of the rounds' own ratios.
Tasks sleep instead of spinning (``tasks.nap``), so that 32 workers on a 2-core machine can all
be busy at once: what is measured is the scheduler, not the CPU.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from linksim import Link, LinkSimulator  # noqa: E402
from tasks import nap, noop  # noqa: E402

from clusterexec import ClusterExecutor  # noqa: E402

READY = b"listening on "

FULL = {"tiny": 2000, "lognormal_tasks": 1000, "many_tiny": 4000, "rounds": 7}
QUICK = {"tiny": 600, "lognormal_tasks": 1000, "many_tiny": 1500, "rounds": 1}


class Nodes:
    """``count`` nodes with one worker each and one shared key, started in parallel."""

    def __init__(self, count: int, key_file: str, timeout: float = 120.0) -> None:
        command = [sys.executable, "-m", "clusterexec.node", "--port", "0", "--workers", "1"]
        command += ["--key-file", key_file, "--log-level", "WARNING"]
        self.processes = [
            subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
            for _ in range(count)
        ]
        self.addresses: list[tuple[str, int]] = []
        try:
            self._read_ready_lines(timeout)
        except BaseException:
            self.stop()
            raise

    def _read_ready_lines(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {p.stdout.fileno(): (p, b"") for p in self.processes if p.stdout is not None}
        found: dict[int, tuple[str, int]] = {}
        with selectors.DefaultSelector() as selector:
            for fd in pending:
                selector.register(fd, selectors.EVENT_READ)
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    fd = int(key.fd)  # type: ignore[call-overload]
                    process, data = pending[fd]
                    chunk = os.read(fd, 4096)
                    data += chunk
                    if not chunk or b"\n" in data:
                        selector.unregister(fd)
                        del pending[fd]
                        line = data.decode(errors="replace")
                        if READY.decode() not in line:
                            raise RuntimeError(f"a node did not start: {line!r}")
                        address = line.split(READY.decode())[1].split()[0]
                        host, _, port = address.rpartition(":")
                        found[fd] = (host.strip("[]"), int(port))
                    else:
                        pending[fd] = (process, data)
        if pending:
            raise RuntimeError(f"{len(pending)} nodes did not start within {timeout:g}s")
        self.addresses = list(found.values())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


@contextmanager
def cluster(sim: LinkSimulator, count: int, key_file: str, delay: float = 0.0) -> Iterator[tuple[list[Link], Nodes]]:
    """``count`` one-worker nodes, each behind its own link with ``delay`` one way."""
    nodes = Nodes(count, key_file)
    links = [sim.link(address, delay=delay) for address in nodes.addresses]
    try:
        yield links, nodes
    finally:
        for link in links:
            link.close()
        nodes.stop()


def executor(links: list[Link], key_file: str, **kwargs: Any) -> ClusterExecutor:
    return ClusterExecutor([link.address for link in links], key_file=key_file, **kwargs)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def tiny_rate(ex: ClusterExecutor, n: int) -> float:
    """Tasks per second of ``list(ex.map(noop, range(n)))``."""
    assert list(ex.map(noop, range(50))) == list(range(50))  # warm: workers and function in place
    elapsed = timed(lambda: list(ex.map(noop, range(n))))
    return n / elapsed


# ----------------------------------------------------------------------------------- workloads


def bench_delay(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    delays = (0.0, 0.001, 0.010)
    runs: dict[float, list[float]] = {delay: [] for delay in delays}
    with cluster(sim, 2, key_file) as (links, _), executor(links, key_file) as ex:
        for turn in range(p["rounds"]):  # the delays take turns, so that a burst of load hits all alike
            for one_way in delays if turn % 2 == 0 else reversed(delays):
                for link in links:
                    link.set(delay=one_way)
                runs[one_way].append(tiny_rate(ex, p["tiny"]))
    rates = {f"{d * 1000:g} ms": statistics.median(r) for d, r in runs.items()}
    return {
        "tasks_per_s": rates,
        "runs": {f"{d * 1000:g} ms": r for d, r in runs.items()},
        "ratio_2ms_rtt": paired_ratio(runs[0.001], runs[0.0]),
        "ratio_20ms_rtt": paired_ratio(runs[0.010], runs[0.0]),
        "targets": {"ratio_2ms_rtt": ">= 0.9", "ratio_20ms_rtt": ">= 0.5"},
    }


def paired_ratio(measured: list[float], base: list[float]) -> float:
    """The median of the ratios of rounds measured side by side: the machine's load drifts
    from round to round, and each round's two figures share it."""
    return statistics.median(m / b for m, b in zip(measured, base, strict=True))


def bench_short(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    with cluster(sim, 2, key_file, delay=0.001) as (links, _), executor(links, key_file) as ex:
        list(ex.map(noop, range(20)))
        elapsed = timed(lambda: list(ex.map(nap, [0.01] * 200)))
    ideal = 200 * 0.01 / 2
    return {"seconds": elapsed, "ideal": ideal, "over_ideal": elapsed / ideal, "target": "<= 1.15"}


def bench_uneven(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"target": ">= 0.9"}
    for count in (16, 32):
        with cluster(sim, count, key_file) as (links, _), executor(links, key_file) as ex:
            list(ex.map(noop, range(p["tiny"])))  # the scheduler has seen tiny tasks first
            work = [0.2] * (4 * count)
            elapsed = timed(lambda: list(ex.map(nap, work)))  # noqa: B023 - called at once
        out[f"{count}_nodes"] = {"seconds": elapsed, "efficiency": 0.8 / elapsed}
    return out


def bench_lognormal(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    rng = random.Random(17)
    durations = [min(2.0, rng.lognormvariate(0.0, 1.0) * 0.04) for _ in range(p["lognormal_tasks"])]
    with cluster(sim, 16, key_file) as (links, _), executor(links, key_file) as ex:
        list(ex.map(noop, range(200)))
        elapsed = timed(lambda: list(ex.map(nap, durations)))
    ideal = max(sum(durations) / 16, max(durations))
    return {
        "seconds": elapsed,
        "ideal": ideal,
        "of_ideal": ideal / elapsed,
        "greedy_of_ideal": ideal / greedy_makespan(durations, 16),
        "target": ">= 0.85",
    }


def greedy_makespan(durations: list[float], workers: int) -> float:
    """The makespan of list scheduling in submission order with no overhead at all (each task to
    the first worker free): what an in-order scheduler gets on this draw at best, without
    knowing task times in advance."""
    free = [0.0] * workers
    for duration in durations:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free)


def bench_many(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    runs: dict[int, list[float]] = {2: [], 64: []}
    with cluster(sim, 2, key_file) as (few, _), cluster(sim, 64, key_file) as (many, _):
        with executor(few, key_file) as small, executor(many, key_file) as large:
            for _ in range(p["rounds"]):  # both clusters stay up and take turns
                runs[2].append(tiny_rate(small, p["many_tiny"]))
                runs[64].append(tiny_rate(large, p["many_tiny"]))
    rates = {count: statistics.median(r) for count, r in runs.items()}
    ratio = paired_ratio(runs[64], runs[2])
    return {"tasks_per_s": rates, "runs": runs, "ratio_64_to_2": ratio, "target": ">= 0.8"}


def bench_connect(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    with cluster(sim, 128, key_file) as (links, _):
        started = time.perf_counter()
        with executor(links, key_file) as ex:
            ex.submit(noop, 1).result()
            elapsed = time.perf_counter() - started
            ready = sum(1 for node in ex.nodes if node.state == "ready")
    return {"seconds_to_first_result": elapsed, "nodes_ready": ready, "target": "<= 1.0"}


def bench_latency(sim: LinkSimulator, key_file: str, p: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"target": "<= 1.0 ms over the link's own round trip"}
    echo = EchoServer()
    echo_link = sim.link(echo.address)
    try:
        with cluster(sim, 1, key_file) as (links, _), executor(links, key_file) as ex:
            with socket.create_connection(echo_link.listener.getsockname()[:2]) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for one_way in (0.001, 0.010):
                    links[0].set(delay=one_way)
                    echo_link.set(delay=one_way)
                    ex.submit(noop, 0).result()
                    rounds = 30 if one_way < 0.005 else 15
                    task = statistics.median(timed(lambda: ex.submit(noop, 1).result()) for _ in range(rounds))
                    link = statistics.median(timed(lambda: echo_once(raw)) for _ in range(rounds))  # noqa: B023
                    out[f"{one_way * 1000:g} ms"] = {
                        "median_ms": task * 1000,
                        "link_rtt_ms": link * 1000,
                        "over_link_rtt_ms": (task - link) * 1000,
                        "over_set_rtt_ms": (task - 2 * one_way) * 1000,
                    }
    finally:
        echo_link.close()
        echo.close()
    return out


class EchoServer:
    """A TCP echo server on 127.0.0.1: the link's own round trip, measured through the simulator."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.server.close()


def echo_once(sock: socket.socket) -> None:
    sock.sendall(b"x")
    sock.recv(1)


WORKLOADS: dict[str, Callable[[LinkSimulator, str, dict[str, int]], dict[str, Any]]] = {
    "delay": bench_delay,
    "short": bench_short,
    "uneven": bench_uneven,
    "lognormal": bench_lognormal,
    "many": bench_many,
    "connect": bench_connect,
    "latency": bench_latency,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clusterexec-net-") as tmp, LinkSimulator() as sim:
        key_file = os.path.join(tmp, "key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, (os.urandom(32).hex() + "\n").encode())
        os.close(fd)
        for name in args.only.split(","):
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            try:
                results[name] = WORKLOADS[name](sim, key_file, p)
            except Exception as exc:  # one failing workload must not hide the others
                results[name] = {"error": repr(exc)}
            if not args.json:
                print(f"{name}: {json.dumps(results[name], default=str)}", flush=True)
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
