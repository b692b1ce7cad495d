"""The benchmark harness runs and reports figures and ratios (the numbers themselves never gate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


@pytest.mark.timeout(150)
def test_quick_benchmark_reports_figures_and_ratios() -> None:
    command = [sys.executable, str(RUN), "--quick", "--only", "map,latency", "--json"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"benchmarks/run.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)

    assert report["quick"] is True
    assert report["errors"] == []
    for key in ("command", "command_line", "python", "cpus", "date", "clusterexec"):
        assert report[key], key
    assert "--quick" in report["command"]
    assert set(report["workloads"]) == {"map", "latency"}
    for name, workload in report["workloads"].items():
        results = workload["results"]
        for executor in ("ppe", "local", "node"):
            value = results[executor]["value"]
            assert isinstance(value, float) and value > 0, (name, executor, results[executor])
            assert results[executor]["runs"], (name, executor)
            ratio = workload["ratio_vs_ppe"][executor]
            assert isinstance(ratio, float) and ratio > 0, (name, executor, ratio)
        assert workload["ratio_vs_ppe"]["ppe"] == pytest.approx(1.0)
        assert workload["target"]["text"]
        assert workload["met"]["local"] in (True, False)
        for executor in ("loky", "dask"):
            # Measured when importable, otherwise skipped with a note saying why.
            assert results[executor]["value"] is not None or results[executor]["note"], (name, executor)


@pytest.mark.timeout(240)
def test_quick_network_benchmark_reports_every_workload() -> None:
    """``benchmarks/network.py --quick``: every workload runs through the link simulator and
    reports its figure (the figures themselves never gate)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "network.py"), "--quick", "--json"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"benchmarks/network.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    figures = {
        "delay": ("ratio_2ms_rtt", "ratio_20ms_rtt"),
        "short": ("over_ideal",),
        "lognormal": ("of_ideal", "greedy_of_ideal"),
        "many": ("ratio_64_to_2",),
        "connect": ("seconds_to_first_result",),
    }
    assert set(figures) | {"uneven", "latency"} <= set(report)
    for workload, keys in figures.items():
        for key in keys:
            value = report[workload][key]
            assert isinstance(value, float) and value > 0, (workload, key, value)
    for nodes in ("16_nodes", "32_nodes"):
        assert 0 < report["uneven"][nodes]["efficiency"] <= 1.0, report["uneven"]
    assert report["connect"]["nodes_ready"] == 128
    for link in ("1 ms", "10 ms"):
        latency = report["latency"][link]
        # The task's round trip crosses the same link as the echo: never shorter than the delay set.
        assert latency["median_ms"] >= 2 * float(link.split()[0]), latency
        assert latency["link_rtt_ms"] >= 2 * float(link.split()[0]), latency
