"""Benchmark: one node shared by several clients (issue 18), against one client alone.

    python benchmarks/shared.py                   # 2 workers, 4 clients, 3 rounds (about a minute)
    python benchmarks/shared.py --json            # machine-readable results on stdout
    python benchmarks/shared.py --clients 8 --tasks 100 --task-ms 50

One node is started (``python -m clusterexec.node --port 0 --workers W``). Each round measures,
in turn: ``ProcessPoolExecutor(W)`` mapping the workload in this process (the reference); one
client process alone mapping it through the node; and K client processes together, each
mapping the same workload through the node, all starting at once. The workload is a CPU-bound
loop of about ``--task-ms`` per task. Throughput is tasks per second from the start of the
maps to the last result; for the K clients it is their tasks together over the time until the
last of them is done. Each client's share is the part of the tasks done while every client
still had work (up to the first client's last result) that were its own: K fair clients each
get about 1/K. The figures are medians over the rounds, which interleave so that a burst of
load on the machine does not land on one side only. Targets (issue 18): the K clients together
reach at least 0.9 of one client alone, and each gets its fair share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the task functions, importable by name in every worker

from tasks import spin, spin_span  # noqa: E402

READY = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Run:
    """One client's map: when it started and ended, and the (start, end) of each of its tasks."""

    started: float
    finished: float
    spans: list[tuple[float, float]]


class Node:
    """A node started for the benchmark with a fresh key; :meth:`stop` ends it."""

    def __init__(self, workers: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="clusterexec-shared-")
        self.key_file = os.path.join(self.dir, "node.key")
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, (os.urandom(32).hex() + "\n").encode())
        os.close(fd)
        self.command = [sys.executable, "-m", "clusterexec.node", "--port", "0", "--workers", str(workers)]
        self.command += ["--key-file", self.key_file, "--log-level", "WARNING"]
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = READY.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"the node did not start: it printed {line!r}")
        self.address = f"{match.group(1)}:{match.group(2)}"
        # Keep reading what the node prints, so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def stop(self) -> None:
        """Stop the node and delete its key."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def iterations_for(seconds: float) -> int:
    """How many :func:`spin` steps take about ``seconds`` on this machine."""
    steps = 200_000
    started = time.perf_counter()
    spin(steps)
    return max(1, int(steps * seconds / (time.perf_counter() - started)))


def run_clients(node: Node, count: int, tasks: int, iterations: int, scratch: Path) -> list[Run]:
    """Start ``count`` client processes, let them all map at once, and return what each did."""
    go = scratch / "go"
    go.unlink(missing_ok=True)
    outs = [scratch / f"client{i}.json" for i in range(count)]
    processes = []
    for out in outs:
        out.unlink(missing_ok=True)
        Path(f"{out}.ready").unlink(missing_ok=True)
        command = [sys.executable, __file__, "--client", node.address, node.key_file, str(tasks), str(iterations)]
        processes.append(subprocess.Popen([*command, str(go), str(out)]))
    deadline = time.monotonic() + 60
    while not all(Path(f"{out}.ready").exists() for out in outs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError("a client did not connect")
        time.sleep(0.005)
    go.touch()
    for process in processes:
        if process.wait(600) != 0:
            raise RuntimeError(f"a client failed with exit status {process.returncode}")
    runs = []
    for out in outs:
        report = json.loads(out.read_text())
        runs.append(Run(report["started"], report["finished"], [tuple(span) for span in report["spans"]]))
    return runs


def client_main(argv: list[str]) -> int:
    """One client process: connect, say ready, wait for the go, map, report."""
    from clusterexec import ClusterExecutor

    address, key_file, tasks, iterations, go, out = argv
    with ClusterExecutor([address], key_file=key_file) as ex:
        Path(f"{out}.ready").touch()
        while not os.path.exists(go):
            time.sleep(0.001)
        started = time.time()
        spans = list(ex.map(spin_span, [int(iterations)] * int(tasks)))
        finished = time.time()
    Path(out).write_text(json.dumps({"started": started, "finished": finished, "spans": spans}))
    return 0


def throughput(runs: list[Run]) -> float:
    """Tasks per second of ``runs`` together, from the first start to the last finish."""
    tasks = sum(len(run.spans) for run in runs)
    return tasks / (max(run.finished for run in runs) - min(run.started for run in runs))


def shares(runs: list[Run]) -> list[float]:
    """Each client's part of the tasks done while every client still had work."""
    window_end = min(max(end for _, end in run.spans) for run in runs)
    done = [sum(1 for _, end in run.spans if end <= window_end) for run in runs]
    return [count / max(1, sum(done)) for count in done]


def ppe_throughput(workers: int, tasks: int, iterations: int) -> float:
    """Tasks per second of ``ProcessPoolExecutor(workers)`` on the same workload."""
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(spin, [1] * workers))  # its workers started
        started = time.time()
        list(pool.map(spin, [iterations] * tasks))
        return tasks / (time.time() - started)


def main() -> int:
    """Run the benchmark; print a report (or JSON with ``--json``)."""
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="the node's --workers (default: 2)")
    parser.add_argument("--clients", type=int, default=4, help="clients sharing the node (default: 4)")
    parser.add_argument("--tasks", type=int, default=200, help="tasks each client maps (default: 200)")
    parser.add_argument("--task-ms", type=float, default=20.0, help="CPU time of one task, ms (default: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    iterations = iterations_for(args.task_ms / 1000)
    node = Node(args.workers)
    scratch = Path(tempfile.mkdtemp(prefix="clusterexec-shared-runs-"))
    alone: list[float] = []
    together: list[float] = []
    ppe: list[float] = []
    client_shares: list[list[float]] = []
    try:
        for _ in range(args.rounds):
            ppe.append(ppe_throughput(args.workers, args.tasks, iterations))
            alone.append(throughput(run_clients(node, 1, args.tasks, iterations, scratch)))
            runs = run_clients(node, args.clients, args.tasks, iterations, scratch)
            together.append(throughput(runs))
            client_shares.append(shares(runs))
    finally:
        node.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    median_shares = [statistics.median(round_[i] for round_ in client_shares) for i in range(args.clients)]
    ratio = statistics.median(together) / statistics.median(alone)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "node": " ".join(node.command[1:]),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "workers": args.workers,
        "clients": args.clients,
        "tasks_per_client": args.tasks,
        "task_ms": args.task_ms,
        "rounds": args.rounds,
        "ppe_tasks_per_s": statistics.median(ppe),
        "alone_tasks_per_s": statistics.median(alone),
        "together_tasks_per_s": statistics.median(together),
        "together_over_alone": ratio,
        "shares": median_shares,
        "fair_share": 1 / args.clients,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        (f"ProcessPoolExecutor({args.workers}), in this process", f"{result['ppe_tasks_per_s']:.1f} tasks/s"),
        ("one client alone", f"{result['alone_tasks_per_s']:.1f} tasks/s"),
        (f"{args.clients} clients together", f"{result['together_tasks_per_s']:.1f} tasks/s"),
        ("together / alone", f"{ratio:.2f}  (target >= 0.9)"),
        ("each client's share while all had work", ", ".join(f"{share:.2f}" for share in median_shares)
         + f"  (fair: {1 / args.clients:.2f})"),
    ]  # fmt: skip
    print(f"one node, --workers {args.workers}, {os.cpu_count()} CPUs, tasks of {args.task_ms:g} ms of CPU, "
          f"{args.tasks} tasks per client, median of {args.rounds} rounds")  # fmt: skip
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
