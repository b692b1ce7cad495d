"""Benchmark: per-task overhead of ``ClusterExecutor`` against ``ProcessPoolExecutor``.

    python benchmarks/run.py            # N = 20000 tasks per run
    python benchmarks/run.py --quick    # N = 2000, for CI
    python benchmarks/run.py --json     # machine-readable output

Both executors get 2 workers on this machine and run ``list(ex.map(noop, range(N)))`` with
``chunksize=1``. Starting the executors is not timed; each does one warm-up run, then the timed
runs alternate between the two executors and the median of each is reported, with tasks/s and
the ratio clusterexec / ProcessPoolExecutor (above 1 means clusterexec is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

# ``noop`` must be importable by name in the workers of both executors.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import noop  # noqa: E402

from clusterexec import ClusterExecutor, __version__  # noqa: E402

WORKERS = 2
FULL_N = 20_000
QUICK_N = 2_000
RUNS = 3


def time_map(ex: Executor, n: int) -> float:
    """Seconds taken by ``list(ex.map(noop, range(n)))``; checks the results."""
    started = time.perf_counter()
    results = list(ex.map(noop, range(n), chunksize=1))
    elapsed = time.perf_counter() - started
    if len(results) != n or results[-1] != n - 1:
        raise AssertionError(f"wrong results from {type(ex).__name__}")
    return elapsed


def measure(factories: dict[str, Callable[[], Executor]], n: int, runs: int) -> dict[str, list[float]]:
    """Start every executor, warm each up once, then time ``runs`` rounds, alternating."""
    executors = {name: make() for name, make in factories.items()}
    try:
        for ex in executors.values():
            time_map(ex, min(n, 1000))
        times: dict[str, list[float]] = {name: [] for name in executors}
        order = list(executors)
        for _ in range(runs):
            for name in order:
                times[name].append(time_map(executors[name], n))
            order.reverse()  # so neither executor always runs right after the other
        return times
    finally:
        for ex in executors.values():
            ex.shutdown(wait=True)


def report(times: dict[str, list[float]], n: int, quick: bool) -> dict[str, object]:
    """The results as a plain dict (what ``--json`` prints)."""
    rows: dict[str, dict[str, float | list[float]]] = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows[name] = {"median_s": median, "tasks_per_s": n / median, "runs_s": seconds}
    ratio = statistics.median(times["ProcessPoolExecutor"]) / statistics.median(times["ClusterExecutor"])
    return {
        "benchmark": "map(noop, range(N), chunksize=1)",
        "n": n,
        "quick": quick,
        "workers": WORKERS,
        "runs": RUNS,
        "results": rows,
        "ratio_clusterexec_over_ppe": ratio,
        "python": platform.python_version(),
        "clusterexec": __version__,
        "cpus": os.cpu_count(),
    }


def print_table(result: dict[str, object]) -> None:
    """Print the results for a human."""
    print(f"{result['benchmark']}, N={result['n']}, {WORKERS} workers, median of {RUNS} runs")
    print(f"{'executor':<22}{'median s':>10}{'tasks/s':>12}")
    rows = result["results"]
    assert isinstance(rows, dict)
    for name, row in rows.items():
        print(f"{name:<22}{row['median_s']:>10.3f}{row['tasks_per_s']:>12,.0f}")
    print(f"ratio clusterexec/PPE (tasks/s): {result['ratio_clusterexec_over_ppe']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the exit status is 0 unless something failed (numbers never gate)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N} instead of {FULL_N}")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("-n", type=int, default=None, help="number of tasks per run (overrides --quick)")
    args = parser.parse_args(argv)
    n = args.n or (QUICK_N if args.quick else FULL_N)
    factories: dict[str, Callable[[], Executor]] = {
        "ProcessPoolExecutor": lambda: ProcessPoolExecutor(WORKERS),
        "ClusterExecutor": lambda: ClusterExecutor(WORKERS),
    }
    result = report(measure(factories, n, RUNS), n, args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
