"""Big captured state: ``map(partial(size_plus, state), range(n))`` against ProcessPoolExecutor.

    python benchmarks/captures.py                 # 20 MiB captures, median of 3 rounds, then 200 MiB and 1 GiB
    python benchmarks/captures.py --quick         # 20 MiB only, 1 round
    python benchmarks/captures.py --json

Each case runs in a fresh child process (``--child``), which builds the capture, opens the
executor (2 workers), warms its workers up with a map over a tiny capture of the same kind (so
that they have imported what it needs, as ProcessPoolExecutor's forked workers have), times the
map (shipping included) and reports its tasks/s and its peak memory (``ru_maxrss``, the capture
and the interpreter included). The executors take turns within each round, so a
burst of load hits both alike; ratios compare figures of the same run only. Captures:

- ``bytes``: one bytes object;
- ``numpy``: a writable uint8 array (its buffer travels out of band);
- ``dict``: a dict of 300,000 small strings (about 20 MiB in memory).

docs/performance.md ("Big captured state") records the figures and the design.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import size_plus  # noqa: E402

MIB = 1 << 20
WORKERS = 2


def build(kind: str, mib: float) -> Any:
    """The captured state of one case."""
    if kind == "bytes":
        return os.urandom(1024) * int(mib * 1024)
    if kind == "numpy":
        import numpy as np

        return np.random.default_rng(1).integers(0, 256, int(mib * MIB), dtype=np.uint8)
    if kind == "dict":
        return {f"key{i:07d}": f"value{i:07d}" for i in range(int(300_000 * mib / 20))}
    raise ValueError(kind)


def child(kind: str, mib: int, executor: str, tasks: int) -> dict[str, Any]:
    """Run one case in this process; return its figures."""
    state = build(kind, mib)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = functools.partial(size_plus, state)
    if executor == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        ex: Any = ProcessPoolExecutor(WORKERS)
    else:
        from clusterexec import ClusterExecutor

        ex = ClusterExecutor(WORKERS)
    with ex:
        # Workers up, with a tiny capture of the same kind: ProcessPoolExecutor's forked workers
        # have numpy imported already, clusterexec's import it on first use (not measured here).
        list(ex.map(functools.partial(size_plus, build(kind, 0.001)), range(WORKERS * 4)))
        started = time.perf_counter()
        results = list(ex.map(fn, range(tasks)))
        elapsed = time.perf_counter() - started
    assert results == [len(state) + i for i in range(tasks)], "wrong results"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tasks_per_s": tasks / elapsed,
        "seconds": elapsed,
        "peak_mib": peak_kib / 1024,
        "state_mib": base_kib / 1024,
    }


def run_case(kind: str, mib: int, executor: str, tasks: int, timeout: float) -> dict[str, Any]:
    """One case in a fresh child process."""
    command = [sys.executable, __file__, "--child", kind, str(mib), executor, str(tasks)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MiB captures only, 1 round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the 20 MiB cases (default 3)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MIB", "EXECUTOR", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, mib, executor, tasks = args.child
        print(json.dumps(child(kind, int(mib), executor, int(tasks))))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    rows: list[dict[str, Any]] = []
    # (kind, MiB, tasks for clusterexec, tasks for PPE): PPE pickles the capture for every
    # task, so its big cases run fewer tasks (tasks/s is the figure, not the total).
    cases = [("bytes", 20, 100, 100), ("numpy", 20, 100, 100), ("dict", 20, 100, 100)]
    if not args.quick:
        cases += [("bytes", 200, 100, 10), ("bytes", 1024, 50, 4)]
    for kind, mib, tasks, ppe_tasks in cases:
        figures: dict[str, list[dict[str, Any]]] = {"ppe": [], "clusterexec": []}
        for index in range(rounds if mib == 20 else 1):
            order = ["ppe", "clusterexec"] if index % 2 == 0 else ["clusterexec", "ppe"]
            for executor in order:
                n = ppe_tasks if executor == "ppe" else tasks
                result = run_case(kind, mib, executor, n, timeout=600)
                figures[executor].append(result)
                print(f"  {kind} {mib} MiB {executor}: {result}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"capture": kind, "mib": mib}
        for executor, results in figures.items():
            good = [r for r in results if "error" not in r]
            row[executor] = statistics.median(r["tasks_per_s"] for r in good) if good else None
            row[f"{executor}_peak_mib"] = max(r["peak_mib"] for r in good) if good else None
            row[f"{executor}_state_mib"] = max(r["state_mib"] for r in good) if good else None
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                row[f"{executor}_error"] = errors[0]
        if row["ppe"] and row["clusterexec"]:
            row["ratio"] = row["clusterexec"] / row["ppe"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"big captured state, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {WORKERS} workers each")
    print(f"{'capture':<14} {'PPE tasks/s':>12} {'clusterexec':>12} {'ratio':>8} {'client peak / capture':>22}")
    for row in rows:
        ppe = f"{row['ppe']:,.1f}" if row["ppe"] else "failed"
        ours = f"{row['clusterexec']:,.1f}" if row["clusterexec"] else "failed"
        ratio = f"{row['ratio']:.1f}x" if row.get("ratio") else "-"
        peak = row["clusterexec_peak_mib"]
        memory = f"{peak / row['mib']:.2f}x ({peak:,.0f} MiB)" if peak else "-"
        print(f"{row['capture'] + ' ' + str(row['mib']) + ' MiB':<14} {ppe:>12} {ours:>12} {ratio:>8} {memory:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
