"""Benchmarks: clusterexec against ProcessPoolExecutor (and loky and dask when installed).

    python benchmarks/run.py                       # every workload, median of 3 runs (< 5 minutes)
    python benchmarks/run.py --quick               # smaller sizes, 1 run (< 1 minute; what CI runs)
    python benchmarks/run.py --json                # machine-readable results on stdout
    python benchmarks/run.py --only map,latency    # a subset of the workloads
    python benchmarks/run.py --executors ppe,local # a subset of the executors

Every executor gets 2 workers: ``ProcessPoolExecutor(2)`` (the baseline, "ppe"),
``ClusterExecutor(2)`` (a local node it starts itself, "local"), ``ClusterExecutor([addr],
key_file=...)`` against a node this script starts with ``python -m clusterexec.node --port 0
--workers 2 --key-file KEY`` ("node"), ``loky.get_reusable_executor(2)`` ("loky") and
``distributed.Client(n_workers=2, threads_per_worker=1, processes=True)`` ("dask"); the last two
only when importable. Each workload is reported as a figure per executor and as a ratio against
ProcessPoolExecutor measured in the same run. The timed runs interleave the executors (A B C,
B C A, C A B, ...) so that a burst of load on the machine does not land on one executor only.
The exit status is 0 unless something failed: the numbers never gate. docs/performance.md
describes each workload and its target.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The task functions must be importable by name in the workers of every executor.
sys.path.insert(0, str(HERE))

from tasks import first_plus, identity, noop, timed_spin  # noqa: E402

WORKERS = 2
MB = 1 << 20  # sizes and rates use MB = 2**20 bytes
EXECUTORS = ("ppe", "local", "node", "loky", "dask")
LABELS = {
    "ppe": "PPE",
    "local": "clusterexec (local)",
    "node": "clusterexec (node)",
    "loky": "loky",
    "dask": "dask",
}
DESCRIPTIONS = {
    "ppe": f"concurrent.futures.ProcessPoolExecutor({WORKERS})",
    "local": f"clusterexec.ClusterExecutor({WORKERS}) (starts a local node)",
    "node": f"clusterexec.ClusterExecutor([addr], key_file=...) against `python -m clusterexec.node --port 0 "
    f"--workers {WORKERS} --key-file KEY` started by this script",
    "loky": f"loky.get_reusable_executor(max_workers={WORKERS})",
    "dask": f"distributed.Client(n_workers={WORKERS}, threads_per_worker=1, processes=True).get_executor(pure=False)",
}
OPTIONAL = ("loky", "dask")  # measured when importable; held to their own time budget (--optional-budget)
CHILD_TIMEOUT = 600.0
RESULT_TIMEOUT = 300.0  # no single measurement may take longer: a hang becomes an error

# Workload sizes: full run, then --quick.
FULL = {
    "runs": 3,
    "map_n": 20_000,
    "latency_n": 2_000,
    "array_mb": 64,
    "array_trips": 5,
    "closure_mb": 20,
    "closure_tasks": 200,
    "cpu_tasks": 8,
    "cpu_seconds": 0.3,
    # The cpu workload's figure swings by +-15% from run to run on a shared 2-core machine (the
    # tasks themselves slow down: see idle_share and mean_in_task_cpu_s in its extras): 7
    # interleaved runs, about 15 s per executor, steady its median. (11 did not move the
    # ratio's mean and made the run too long with loky and dask installed.)
    "cpu_runs": 7,
    "rss_items": 1_000_000,
    "rss_buffersize": 1_000,
    "rss_chunksize": 10,
    "budget": 30.0,
    # loky and dask are references, not targets: each gets this many seconds per workload, so
    # that having them installed keeps the whole run under 5 minutes.
    "optional_budget": 5.0,
}
QUICK = {
    "runs": 1,
    "map_n": 2_000,
    "latency_n": 500,
    "array_mb": 16,
    "array_trips": 5,
    "closure_mb": 8,
    "closure_tasks": 50,
    "cpu_tasks": 4,
    "cpu_seconds": 0.1,
    "rss_items": 100_000,
    "rss_buffersize": 1_000,
    "rss_chunksize": 10,
    "budget": 15.0,
    "optional_budget": 3.0,
}


# ---------------------------------------------------------------------------------- executors


class Handle:
    """One open executor: ``ex`` has ``submit`` and ``map``; ``close()`` shuts it down."""

    def __init__(self, name: str, ex: Any, close: Callable[[], None]) -> None:
        self.name = name
        self.ex = ex
        self.close = close


def availability() -> dict[str, str | None]:
    """For each executor, None if it can be used here, else why not."""
    found: dict[str, str | None] = {name: None for name in EXECUTORS}
    for name, module in zip(OPTIONAL, ("loky", "distributed"), strict=True):
        try:
            __import__(module)
        except Exception as exc:  # ImportError, or a broken install
            found[name] = f"not importable ({type(exc).__name__}: {exc}); skipped"
    return found


def open_executor(name: str, node: NodeInfo | None) -> Handle:
    """Start executor ``name`` (the constructor returns once it can take tasks)."""
    if name == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        ppe = ProcessPoolExecutor(WORKERS)
        return Handle(name, ppe, lambda: ppe.shutdown(wait=True))
    if name in ("local", "node"):
        from clusterexec import ClusterExecutor

        if name == "local":
            cex = ClusterExecutor(WORKERS)
        else:
            if node is None:
                raise RuntimeError("no node was started")
            cex = ClusterExecutor([node.address], key_file=node.key_file)
        return Handle(name, cex, lambda: cex.shutdown(wait=True))
    if name == "loky":
        import loky

        lex = loky.get_reusable_executor(max_workers=WORKERS)
        return Handle(name, lex, lambda: lex.shutdown(wait=True))
    if name == "dask":
        import warnings

        import distributed

        # dask warns about every large argument ("Sending large graph of size 64.00 MiB"): it is
        # what the array workload measures.
        warnings.filterwarnings("ignore", message="Sending large graph")
        client = distributed.Client(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
        # pure=False: every call is a new task (dask would otherwise reuse the result of an equal call).
        dex = client.get_executor(pure=False)

        def close() -> None:
            dex.shutdown(wait=True)
            client.close()

        return Handle(name, dex, close)
    raise ValueError(f"unknown executor {name!r}")


@dataclass
class NodeInfo:
    """A node started by hand for the "node" executor."""

    address: str
    key_file: str


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the node gets SIGTERM if this script dies (even by SIGKILL), so none is left behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class HandNode:
    """``python -m clusterexec.node --port 0 --workers 2 --key-file KEY`` with a fresh key (mode 0600)."""

    LISTENING = re.compile(r"listening on (\S+):(\d+)")

    def __init__(self, timeout: float = 60.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="clusterexec-bench-")
        key_file = os.path.join(self.dir, "node.key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (os.urandom(32).hex() + "\n").encode())
        finally:
            os.close(fd)
        command = [sys.executable, "-m", "clusterexec.node", "--port", "0", "--workers", str(WORKERS)]
        command += ["--key-file", key_file, "--log-level", "WARNING"]
        self.command = command
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        try:
            line = self._ready_line(timeout)
            match = self.LISTENING.search(line)
            if match is None:
                raise RuntimeError(f"the node did not start: {shlex.join(command)} printed {line!r}")
        except BaseException:
            self.stop()
            raise
        self.info = NodeInfo(f"{match.group(1)}:{match.group(2)}", key_file)
        # Keep reading what the node prints, so that it never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _ready_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in data and time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        break
                    data += chunk
        return data.decode(errors="replace")

    def _drain(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        try:
            while stream.read1(65536):
                pass
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL after 10 s) and delete its key."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One workload: how it is measured, its unit, and its target."""

    name: str
    title: str
    unit: str
    fmt: str  # format of a figure
    higher_is_better: bool
    target: str  # human-readable
    # "ratio" (local / PPE) or "value" (the local figure itself), compared with ``limit``
    target_on: str
    op: str
    limit: float
    measure: Callable[[Any, int, dict[str, Any]], tuple[float, dict[str, Any]]] | None = None  # in-process
    params: dict[str, Any] = field(default_factory=dict)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong results: {what}")


def measure_map(ex: Any, _round: int, p: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    n = p["map_n"]
    started = time.perf_counter()
    results = ex.map(noop, range(n), chunksize=1, timeout=RESULT_TIMEOUT)
    done = 0
    try:
        for value in results:
            _check(value == done, "map(noop)")
            done += 1
            # Time box: a slow executor (dask) stops after ``budget`` seconds; the rate is then
            # over the tasks done, and the rest is cancelled when the iterator is closed.
            if done % 256 == 0 and time.perf_counter() - started > p["budget"]:
                break
    finally:
        close = getattr(results, "close", None)  # cancels what is left (PPE, clusterexec, loky, dask)
        if close is not None:
            close()
    elapsed = time.perf_counter() - started
    extra: dict[str, Any] = {"seconds": elapsed, "tasks": done}
    if done < n:
        extra["timeboxed"] = f"stopped after {elapsed:.0f} s at {done:,} of {n:,} tasks"
        # Let the executor get through the cancellations before the next executor's run.
        ex.submit(noop, 0).result(RESULT_TIMEOUT)
    return done / elapsed, extra


def measure_latency(ex: Any, _round: int, p: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    n = p["latency_n"]
    latencies = []
    deadline = time.perf_counter() + p["budget"]
    for i in range(n):
        started = time.perf_counter()
        value = ex.submit(noop, i).result(RESULT_TIMEOUT)
        latencies.append(time.perf_counter() - started)
        _check(value == i, "submit(noop)")
        if started > deadline:  # time box, as in measure_map
            break
    extra: dict[str, Any] = {"calls": len(latencies)}
    if len(latencies) < n:
        extra["timeboxed"] = f"stopped after {p['budget']:g} s at {len(latencies):,} of {n:,} calls"
    latencies.sort()
    extra["p90_us"] = latencies[int(len(latencies) * 0.9)] * 1e6
    extra["mean_us"] = statistics.fmean(latencies) * 1e6
    return statistics.median(latencies) * 1e6, extra


def _array(mb: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, mb * MB, dtype=np.uint8)


def measure_array(ex: Any, round_: int, p: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    import numpy as np

    arr = p["array"]
    elapsed = 0.0
    for _ in range(p["array_trips"]):
        gc.collect()
        started = time.perf_counter()
        back = ex.submit(identity, arr).result(RESULT_TIMEOUT)
        elapsed += time.perf_counter() - started
        _check(back.shape == arr.shape and np.array_equal(back[:: 4096], arr[:: 4096]), "identity(array)")
        del back
    return p["array_mb"] * p["array_trips"] / elapsed, {"seconds": elapsed}


def measure_closure(ex: Any, round_: int, p: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    import numpy as np

    # A new array every round (its first byte is the round), so that no executor can reuse what
    # it shipped in an earlier round: each round pays for shipping the 20 MB once (or per task).
    data = np.full(p["closure_mb"] * MB, round_ % 256, dtype=np.uint8)
    fn = functools.partial(first_plus, data)
    n = p["closure_tasks"]
    gc.collect()
    started = time.perf_counter()
    results = list(ex.map(fn, range(n), chunksize=1, timeout=RESULT_TIMEOUT))
    elapsed = time.perf_counter() - started
    _check(results == [round_ % 256 + i for i in range(n)], "map(partial(first_plus, data))")
    return n / elapsed, {"seconds": elapsed}


def measure_cpu(ex: Any, _round: int, p: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    n = p["cpu_tasks"]
    started = time.perf_counter()
    futures = [ex.submit(timed_spin, p["cpu_iterations"]) for _ in range(n)]
    in_task = [f.result(RESULT_TIMEOUT) for f in futures]
    wall = time.perf_counter() - started
    efficiency = n * p["cpu_single_s"] / (WORKERS * wall)
    busy = sum(took for took, _cpu in in_task)
    return efficiency, {
        "wall_s": wall,
        "mean_in_task_s": busy / n,
        "mean_in_task_cpu_s": statistics.fmean(cpu for _took, cpu in in_task),
        # The share of the workers' time not spent inside a task: dispatch, results, imbalance.
        # This is the executor's own cost; a slow in-task time is the machine's or the worker
        # process's (the loop's speed depends on the process's memory layout: docs/performance.md).
        "idle_share": 1 - busy / (WORKERS * wall),
    }


def calibrate_cpu(seconds: float) -> tuple[int, float]:
    """Iterations of ``spin`` taking about ``seconds`` here, and the median time of 3 runs of it."""
    iterations = 100_000
    while (took := timed_spin(iterations)[0]) < 0.05:
        iterations *= 2
    iterations = max(1, int(iterations * seconds / took))
    return iterations, statistics.median(timed_spin(iterations)[0] for _ in range(3))


def workloads(p: dict[str, Any]) -> dict[str, Workload]:
    """Every workload, in the order they run and are printed."""
    return {
        w.name: w
        for w in [
            Workload(
                "map", f"map(noop) x{p['map_n']:,}, chunksize=1", "tasks/s", "{:,.0f}", True,
                ">= 1.5x PPE", "ratio", ">=", 1.5, measure_map,
            ),
            Workload(
                "latency", f"submit(noop).result() x{p['latency_n']:,}, median", "us", "{:,.0f}", False,
                "<= 1.5x PPE", "ratio", "<=", 1.5, measure_latency,
            ),
            Workload(
                "array", f"identity({p['array_mb']} MB array) x{p['array_trips']}", "MB/s", "{:,.0f}", True,
                ">= 1.5x PPE", "ratio", ">=", 1.5, measure_array,
            ),
            Workload(
                "closure", f"map(partial(f, {p['closure_mb']} MB)) x{p['closure_tasks']}", "tasks/s", "{:,.1f}",
                True, ">= 10x PPE", "ratio", ">=", 10.0, measure_closure,
            ),
            Workload(
                "cpu", f"{p['cpu_tasks']} CPU tasks of {p['cpu_seconds']:g} s, efficiency", "", "{:.3f}", True,
                ">= 0.95x PPE", "ratio", ">=", 0.95,
            ),
            Workload(
                "startup", "construct -> first result", "ms", "{:,.0f}", False,
                "<= 250 ms", "value", "<=", 250.0,
            ),
            Workload(
                "rss",
                f"map x{p['rss_items']:,}, buffersize={p['rss_buffersize']:,}, chunksize={p['rss_chunksize']}, "
                "client RSS growth",
                "MB", "{:,.1f}", False, "< 100 MB", "value", "<", 100.0,
            ),
        ]
    }


SUBPROCESS_WORKLOADS = ("cpu", "startup", "rss")


# ---------------------------------------------------------------------------------- children
# The cpu, startup and rss workloads run in fresh interpreters: ``run.py --child KIND``. For cpu
# this is about the measurement: how fast a pure-Python loop runs in a process depends on that
# process's memory layout (+-10% here between fresh interpreters, and within one as its heap
# changes), so every round starts every executor afresh, each median is over that many draws,
# and no executor keeps a lucky or unlucky layout for a whole run (docs/performance.md, cpu).


def child_main(args: argparse.Namespace) -> int:
    """Run one measurement in this fresh process and print it as one JSON line."""
    node = NodeInfo(args.node, args.key_file) if args.node else None
    if args.child == "cpu":
        result = child_cpu(args.executor, node, args.iterations, args.single, args.tasks)
    elif args.child == "startup":
        result = child_startup(args.executor, node)
    else:
        result = child_rss(args.executor, node, args.items, args.buffersize, args.chunksize)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def child_cpu(name: str, node: NodeInfo | None, iterations: int, single: float, tasks: int) -> dict[str, Any]:
    handle = open_executor(name, node)
    try:
        _warm_up(handle.ex)
        efficiency, extra = measure_cpu(
            handle.ex, 0, {"cpu_tasks": tasks, "cpu_iterations": iterations, "cpu_single_s": single}
        )
    finally:
        handle.close()
    return {"efficiency": efficiency, **extra}


def child_startup(name: str, node: NodeInfo | None) -> dict[str, Any]:
    # Import the executor first: imports are not part of the figure. (``clusterexec`` imports its
    # executor module lazily, on first access to ``ClusterExecutor``: access it here.)
    if name in ("local", "node"):
        from clusterexec import ClusterExecutor  # noqa: F401
    elif name == "ppe":
        from concurrent.futures import ProcessPoolExecutor  # noqa: F401
    elif name == "loky":
        import loky  # noqa: F401
    elif name == "dask":
        import distributed  # noqa: F401
    started = time.perf_counter()
    handle = open_executor(name, node)
    value = handle.ex.submit(noop, 7).result(RESULT_TIMEOUT)
    first = time.perf_counter()
    handle.close()
    closed = time.perf_counter()
    _check(value == 7, "submit(noop)")
    return {"first_result_ms": (first - started) * 1e3, "shutdown_ms": (closed - first) * 1e3}


def _rss_reader() -> tuple[Callable[[], int], str]:
    try:
        import psutil

        process = psutil.Process()
        return lambda: int(process.memory_info().rss), "psutil RSS, peak sampled every 10 ms"
    except ImportError:
        import resource

        # ru_maxrss is in KiB on Linux: the growth is that of the peak since process start.
        return (
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "resource.getrusage max RSS (peak since start; psutil is not installed)",
        )


def child_rss(name: str, node: NodeInfo | None, items: int, buffersize: int, chunksize: int) -> dict[str, Any]:
    read_rss, method = _rss_reader()
    handle = open_executor(name, node)
    try:
        ex = handle.ex
        # Warm up with the same call, so that the baseline includes what any map allocates.
        for _ in ex.map(noop, range(10 * buffersize), buffersize=buffersize, chunksize=chunksize):
            pass
        gc.collect()
        baseline = read_rss()
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.01):
                peak = max(peak, read_rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        count = total = 0
        for value in ex.map(noop, range(items), buffersize=buffersize, chunksize=chunksize):
            count += 1
            total += value
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        final = read_rss()
        peak = max(peak, final)
        _check(count == items and total == items * (items - 1) // 2, "map(noop, buffersize=...)")
        return {
            "growth_mb": (peak - baseline) / MB,
            "final_growth_mb": (final - baseline) / MB,
            "baseline_mb": baseline / MB,
            "method": method,
            "seconds": elapsed,
            "items_per_s": items / elapsed,
        }
    finally:
        handle.close()


def run_child(kind: str, name: str, node: NodeInfo | None, p: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run ``run.py --child KIND`` for executor ``name``; its result and the process wall time."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--executor", name]
    if node is not None:
        command += ["--node", node.address, "--key-file", node.key_file]
    if kind == "cpu":
        command += ["--iterations", str(p["cpu_iterations"]), "--single", repr(p["cpu_single_s"])]
        command += ["--tasks", str(p["cpu_tasks"])]
    if kind == "rss":
        command += ["--items", str(p["rss_items"]), "--buffersize", str(p["rss_buffersize"])]
        command += ["--chunksize", str(p["rss_chunksize"])]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"child exited with status {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT ") :]), wall


# ---------------------------------------------------------------------------------- running


def rotations(names: list[str], runs: int) -> Iterator[list[str]]:
    """A B C, B C A, C A B, A B C, ...: every executor takes every slot in turn."""
    for r in range(runs):
        k = r % len(names) if names else 0
        yield names[k:] + names[:k]


class Results:
    """Per workload and executor: the figure of every run, extras, notes and errors."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, list[float]]] = {}
        self.extras: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.notes: dict[str, dict[str, str]] = {}  # why there is no figure (n/a, failed)
        self.remarks: dict[str, dict[str, list[str]]] = {}  # on a figure: fewer runs, time-boxed...
        self.errors: list[str] = []

    def add(self, workload: str, name: str, value: float, extra: dict[str, Any]) -> None:
        self.runs.setdefault(workload, {}).setdefault(name, []).append(value)
        self.extras.setdefault(workload, {}).setdefault(name, []).append(extra)

    def remark(self, workload: str, name: str, text: str) -> None:
        remarks = self.remarks.setdefault(workload, {}).setdefault(name, [])
        if text not in remarks:
            remarks.append(text)

    def note(self, workload: str, name: str, text: str) -> None:
        self.notes.setdefault(workload, {})[name] = text

    def fail(self, workload: str, name: str, exc: BaseException) -> None:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(lines) > 2:  # a long message (numpy's ImportError...): its first and last lines
            lines = [lines[0], "...", lines[-1]]
        text = f"{type(exc).__name__}: {' '.join(lines)}"
        if len(text) > 300:
            text = text[:297] + "..."
        self.note(workload, name, "failed: " + text)
        self.errors.append(f"{workload} / {LABELS[name]}: {text}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exception(exc)

    def median(self, workload: str, name: str) -> float | None:
        values = self.runs.get(workload, {}).get(name)
        if not values or name in self.notes.get(workload, {}):
            return None
        return statistics.median(values)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_inprocess(selected: list[Workload], names: list[str], node: NodeInfo | None, p: dict[str, Any],
                  results: Results) -> None:
    """Start the executors once, warm them up, then run each workload's rounds, interleaved."""
    handles: dict[str, Handle] = {}
    try:
        for name in names:
            try:
                progress(f"starting {LABELS[name]}")
                handle = open_executor(name, node)
                handles[name] = handle
                _warm_up(handle.ex)
            except Exception as exc:
                for w in selected:
                    results.fail(w.name, name, exc)
                handles.pop(name, None)
        live = [name for name in names if name in handles]
        for w in selected:
            progress(f"{w.name}: {w.title}")
            failed: set[str] = set()
            spent = dict.fromkeys(live, 0.0)
            for round_, order in enumerate(rotations(live, p.get(f"{w.name}_runs", p["runs"]))):
                for name in order:
                    if name in failed:
                        continue
                    done = len(results.runs.get(w.name, {}).get(name, []))
                    if _over_budget(name, done, spent[name], p):
                        results.remark(w.name, name, _budget_remark(done, p["runs"], p))
                        continue
                    gc.collect()
                    started = time.perf_counter()
                    try:
                        assert w.measure is not None
                        # An optional executor's map and latency runs are time-boxed by its own budget.
                        q = {**p, "budget": p["optional_budget"]} if name in OPTIONAL else p
                        value, extra = w.measure(handles[name].ex, round_, q)
                    except Exception as exc:
                        failed.add(name)
                        results.fail(w.name, name, exc)
                        continue
                    finally:
                        spent[name] += time.perf_counter() - started
                    results.add(w.name, name, value, extra)
                    if "timeboxed" in extra:
                        results.remark(w.name, name, "time-boxed: " + extra["timeboxed"])
                    progress(f"  {LABELS[name]:<20} {w.fmt.format(value)} {w.unit}")
    finally:
        for name, handle in handles.items():
            try:
                handle.close()
            except Exception as exc:
                results.errors.append(f"shutdown of {LABELS[name]}: {type(exc).__name__}: {exc}")


def _over_budget(name: str, done: int, spent: float, p: dict[str, Any]) -> bool:
    """True if one more run of an optional executor (loky, dask) would take its time on this
    workload past its budget: a slow one does fewer runs rather than stretch the benchmark."""
    return name in OPTIONAL and done > 0 and spent * (done + 1) / done > p["optional_budget"]


def _budget_remark(done: int, runs: int, p: dict[str, Any]) -> str:
    return (
        f"{done} of {runs} runs: one more would take it over its budget of {p['optional_budget']:g} s "
        "per workload (--optional-budget)"
    )


def _warm_up(ex: Any) -> None:
    """Start the workers and import what the tasks need (numpy, the tasks module) there."""
    import numpy as np

    list(ex.map(noop, range(200), chunksize=1, timeout=RESULT_TIMEOUT))
    ex.submit(identity, np.zeros(1 << 17, dtype=np.uint8)).result(RESULT_TIMEOUT)
    ex.submit(first_plus, np.ones(4, dtype=np.uint8), 1).result(RESULT_TIMEOUT)
    ex.submit(timed_spin, 10).result(RESULT_TIMEOUT)


def run_subprocess(w: Workload, names: list[str], node: NodeInfo | None, p: dict[str, Any], results: Results) -> None:
    """The cpu, startup and rss workloads: one fresh interpreter per measurement."""
    progress(f"{w.name}: {w.title}")
    live = list(names)
    if w.name == "rss":
        for name in list(live):
            reason = None
            if name == "ppe" and sys.version_info < (3, 14):
                reason = "n/a: ProcessPoolExecutor.map has no buffersize before Python 3.14"
            elif name in ("loky", "dask"):
                reason = f"n/a: {LABELS[name]}'s map has no buffersize"
            if reason:
                results.note(w.name, name, reason)
                live.remove(name)
    runs = {"cpu": p.get("cpu_runs", p["runs"]), "startup": p["runs"]}.get(w.name, 1)
    failed: set[str] = set()
    spent = dict.fromkeys(live, 0.0)
    for order in rotations(live, runs):
        for name in order:
            if name in failed:
                continue
            done = len(results.runs.get(w.name, {}).get(name, []))
            if _over_budget(name, done, spent[name], p):
                results.remark(w.name, name, _budget_remark(done, runs, p))
                continue
            try:
                child, wall = run_child(w.name, name, node if name == "node" else None, p)
            except Exception as exc:
                failed.add(name)
                results.fail(w.name, name, exc)
                continue
            spent[name] += wall
            child["process_wall_ms"] = wall * 1e3
            value = child[{"cpu": "efficiency", "startup": "first_result_ms"}.get(w.name, "growth_mb")]
            results.add(w.name, name, value, child)
            progress(f"  {LABELS[name]:<20} {w.fmt.format(value)} {w.unit}")


# ---------------------------------------------------------------------------------- report


def _met(w: Workload, value: float | None, ratio: float | None) -> bool | None:
    x = ratio if w.target_on == "ratio" else value
    if x is None:
        return None
    return {">=": x >= w.limit, "<=": x <= w.limit, "<": x < w.limit}[w.op]


def build_report(selected: list[Workload], names: list[str], found: dict[str, str | None], results: Results,
                 p: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything measured, as a plain dict (what --json prints)."""
    from clusterexec import __version__

    out_workloads: dict[str, Any] = {}
    for w in selected:
        figures: dict[str, Any] = {}
        ratios: dict[str, float | None] = {}
        met: dict[str, bool | None] = {}
        ppe = results.median(w.name, "ppe")
        for name in EXECUTORS:
            value = results.median(w.name, name)
            note = results.notes.get(w.name, {}).get(name)
            if name not in names:
                note = found.get(name) or "not selected (--executors)"
            figures[name] = {
                "value": value,
                "runs": results.runs.get(w.name, {}).get(name, []),
                "extra": results.extras.get(w.name, {}).get(name, []),
                "note": note,
                "remarks": results.remarks.get(w.name, {}).get(name, []),
            }
            ratio = value / ppe if value is not None and ppe else None
            ratios[name] = ratio
            if name in ("local", "node"):
                met[name] = _met(w, value, ratio)
        out_workloads[w.name] = {
            "title": w.title,
            "unit": w.unit,
            "higher_is_better": w.higher_is_better,
            "target": {"text": w.target, "on": w.target_on + (" (local/PPE)" if w.target_on == "ratio" else ""),
                       "op": w.op, "limit": w.limit},
            "results": figures,
            "ratio_vs_ppe": ratios,
            "met": met,
        }
    return {
        "command": [sys.executable, *sys.argv],
        "command_line": shlex.join([sys.executable, *sys.argv]),
        "date": meta["date"],
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": {"start": meta["load_start"], "end": _loadavg()},
        "clusterexec": __version__,
        "quick": args.quick,
        "runs": p["runs"],
        "workers": WORKERS,
        "params": {k: v for k, v in p.items() if k != "array"},
        "executors": {
            name: {
                "label": LABELS[name],
                "what": DESCRIPTIONS[name],
                "used": name in names,
                "note": found.get(name) or (None if name in names else "not selected (--executors)"),
            }
            for name in EXECUTORS
        },
        "startup_clock": "from just before the executor's constructor to the first result of submit(noop), in a "
        "fresh interpreter that has already imported the executor's module; process_wall_ms includes the "
        "interpreter start, the imports and the shutdown",
        "rss_method": _rss_reader()[1],
        "workloads": out_workloads,
        "errors": results.errors,
        "elapsed_s": time.monotonic() - meta["started"],
    }


def print_table(report: dict[str, Any], selected: list[Workload]) -> None:
    """The human-readable table."""
    print(
        f"clusterexec {report['clusterexec']} benchmarks, Python {report['python']}, {report['cpus']} CPUs, "
        f"{report['workers']} workers each, {'--quick, ' if report['quick'] else ''}median of {report['runs']} "
        f"run{'s' if report['runs'] > 1 else ''} (cpu: {report['params'].get('cpu_runs', report['runs'])}), "
        f"load average {report['load_average']['start']} at start"
    )
    header = ["workload", "PPE", *(LABELS[n] for n in EXECUTORS[1:]), "ratio (local/PPE)", "target", "met?"]
    rows = [header]
    for w in selected:
        data = report["workloads"][w.name]
        cells = [f"{w.title} ({w.unit})" if w.unit else w.title]
        for name in EXECUTORS:
            figure = data["results"][name]
            if figure["value"] is not None:
                cells.append(w.fmt.format(figure["value"]))
            elif figure["note"] and figure["note"].startswith("failed"):
                cells.append("FAILED")
            elif report["executors"][name]["used"]:
                cells.append("n/a")
            else:
                cells.append("skipped")
        ratio = data["ratio_vs_ppe"]["local"]
        cells.append("n/a" if ratio is None else f"{ratio:.2f}")
        cells.append(w.target)
        met = data["met"]["local"]
        cells.append("n/a" if met is None else ("yes" if met else "NO"))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("-+-".join("-" * width for width in widths))
    notes = []
    for name, info in report["executors"].items():
        if info["note"]:
            notes.append(f"{LABELS[name]}: {info['note']}")
    for w in selected:
        for name, figure in report["workloads"][w.name]["results"].items():
            note = figure["note"]
            if note and report["executors"][name]["used"]:
                notes.append(f"{w.name} / {LABELS[name]}: {note}")
            for remark in figure["remarks"]:
                notes.append(f"{w.name} / {LABELS[name]}: {remark}")
    if any(w.name == "startup" for w in selected):
        notes.append("startup: " + report["startup_clock"])
    if any(w.name == "rss" for w in selected):
        notes.append(f"rss: {report['rss_method']}; one run")
    if any(w.name == "cpu" for w in selected):
        p = report["params"]
        notes.append(
            f"cpu: efficiency = {p['cpu_tasks']} x single-task time ({p['cpu_single_s']:.3f} s, measured in this "
            f"process) / ({WORKERS} x wall time)"
        )
        parts = []
        for name, figure in report["workloads"]["cpu"]["results"].items():
            extras = figure["extra"]
            if extras:
                parts.append(
                    f"{LABELS[name]} {statistics.median(e['idle_share'] for e in extras):.1%} idle, "
                    f"{statistics.median(e['mean_in_task_s'] for e in extras):.3f} s in task"
                )
        if parts:
            notes.append("cpu, medians: share of worker time outside any task (the executor's cost) and time "
                         "per task (the speed of the machine and of the worker processes): " + "; ".join(parts))
    for note in notes:
        print("  - " + note)
    print(f"took {report['elapsed_s']:.0f} s; load average at the end {report['load_average']['end']}")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------- profiling


def profile_io_threads(directory: Path) -> None:
    """Profile every clusterexec client I/O thread with cProfile, one ``.pstats`` file per thread.

    Wraps ``threading.Thread.run`` so that a thread named ``clusterexec-io*`` runs under its own
    profiler, started and stopped in that thread (cProfile profiles one thread)."""
    directory.mkdir(parents=True, exist_ok=True)
    original = threading.Thread.run
    counter = iter(range(1, 1 << 30))

    def run(self: threading.Thread) -> None:
        if not self.name.startswith("clusterexec-io"):
            return original(self)
        profiler = cProfile.Profile()
        try:
            profiler.enable()
        except ValueError as exc:  # Python >= 3.12: another profiler is already active
            progress(f"--cprofile: cannot profile {self.name}: {exc}")
            return original(self)
        try:
            return original(self)
        finally:
            profiler.disable()
            path = directory / f"{self.name}-{next(counter)}.pstats"
            profiler.dump_stats(path)
            progress(f"--cprofile: wrote {path}")

    threading.Thread.run = run  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and 1 run (under a minute; CI)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(workloads(FULL)))
    parser.add_argument("--executors", default="", help="comma-separated executors: " + ",".join(EXECUTORS))
    parser.add_argument("--runs", type=int, default=None, help="timed runs per executor (default 3, --quick 1)")
    parser.add_argument("-n", type=int, default=None, help="tasks of the map workload (default 20000)")
    parser.add_argument(
        "--budget", type=float, default=None,
        help="seconds: a run of map or latency stops after this long (the figure is over what it did) "
        "(default 30, --quick 15)",
    )
    parser.add_argument(
        "--optional-budget", type=float, default=None,
        help="seconds per workload for loky and dask: their map and latency runs stop after this long, and they "
        "do no run that would take their total on a workload past it (default 5, --quick 3)",
    )
    parser.add_argument("--rss-chunksize", type=int, default=None, help="chunksize of the rss workload (default 10)")
    parser.add_argument("--cprofile", metavar="DIR", help="cProfile each clusterexec client I/O thread into DIR")
    # Internal: one measurement in a fresh interpreter (cpu, startup and rss workloads).
    parser.add_argument("--child", choices=SUBPROCESS_WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--buffersize", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunksize", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--single", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _pick(text: str, known: list[str], what: str) -> list[str]:
    if not text:
        return list(known)
    picked = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in picked if x not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [x for x in known if x in picked]


def compile_bytecode() -> None:
    """Compile clusterexec's modules and the task module to bytecode files, as ``pip install``
    does, when they are missing or stale: a development checkout under PYTHONDONTWRITEBYTECODE=1
    (as on the CI machines) would otherwise compile every module again in each new process, and
    the startup figure would measure the compiler rather than the executor."""
    import compileall

    import clusterexec

    # The package's subfolders too (wire/, node/, client/...): since the package has rooms, a
    # top-level-only compile left a node's start compiling most of what it imports.
    for folder, levels in ((Path(clusterexec.__file__).resolve().parent, None), (HERE, 0)):
        try:
            compileall.compile_dir(str(folder), quiet=1, maxlevels=levels)
        except OSError as exc:  # a read-only install: its bytecode was compiled when installed
            progress(f"could not compile {folder} to bytecode ({exc}); startup figures include compiling it")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; the exit status is 0 unless something failed (numbers never gate)."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    meta = {"started": time.monotonic(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_start": _loadavg()}
    p: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        p["runs"] = p["cpu_runs"] = max(1, args.runs)
    if args.n is not None:
        p["map_n"] = args.n
    if args.budget is not None:
        p["budget"] = args.budget
    if args.optional_budget is not None:
        p["optional_budget"] = args.optional_budget
    if args.rss_chunksize is not None:
        p["rss_chunksize"] = max(1, args.rss_chunksize)
    # A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: the node and the executors are stopped.
    signal.signal(signal.SIGTERM, _terminate)
    compile_bytecode()
    table = workloads(p)
    selected = [table[name] for name in _pick(args.only, list(table), "workload")]
    wanted = _pick(args.executors, list(EXECUTORS), "executor")
    found = availability()
    names = [name for name in wanted if found[name] is None]
    for name, reason in found.items():
        if reason:
            progress(f"{LABELS[name]}: {reason}")
    if args.cprofile:
        profile_io_threads(Path(args.cprofile))

    results = Results()
    node: HandNode | None = None
    try:
        if "node" in names:
            try:
                node = HandNode()
                progress(f"started a node at {node.info.address}: {shlex.join(node.command)}")
            except Exception as exc:
                names.remove("node")
                for w in selected:
                    results.fail(w.name, "node", exc)
        info = node.info if node is not None else None
        inprocess = [w for w in selected if w.measure is not None]
        if any(w.name == "cpu" for w in selected):
            p["cpu_iterations"], p["cpu_single_s"] = calibrate_cpu(p["cpu_seconds"])
            progress(f"cpu: {p['cpu_iterations']:,} iterations take {p['cpu_single_s']:.3f} s here")
        if inprocess:
            if any(w.name == "array" for w in inprocess):
                p["array"] = _array(p["array_mb"], seed=1)
            run_inprocess(inprocess, names, info, p, results)
            p.pop("array", None)
        for w in selected:
            if w.name in SUBPROCESS_WORKLOADS:
                run_subprocess(w, names, info, p, results)
    finally:
        if node is not None:
            node.stop()

    report = build_report(selected, names, found, results, p, args, meta)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, selected)
    for error in results.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
