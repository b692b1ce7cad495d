"""Task functions for the benchmarks, in a module of their own so that pickling them by
reference works for ``ProcessPoolExecutor`` and loky (their workers import this module), for
dask (its workers inherit this interpreter's ``sys.path``) and for ``ClusterExecutor`` (local
nodes inherit ``sys.path``; a node started by hand gets this module shipped by source)."""

from __future__ import annotations

import time
from typing import Any


def noop(x: int) -> int:
    """Return ``x``: a task whose cost is all overhead."""
    return x


def identity(x: Any) -> Any:
    """Return the argument unchanged: a round trip of the data both ways."""
    return x


def first_plus(data: Any, x: int) -> int:
    """``data[0] + x``: a small result from a task bound to a large ``data``
    (``functools.partial(first_plus, data)``), so the cost is shipping ``data``."""
    return int(data[0]) + x


def spin(iterations: int) -> int:
    """A pure-Python loop of ``iterations`` steps: CPU-bound work that holds the GIL."""
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def timed_spin(iterations: int) -> tuple[float, float]:
    """Run :func:`spin`; return how long it took in this process, as wall time and as CPU time
    (seconds). Wall time above CPU time means the process waited for a CPU; CPU time above the
    usual means the loop itself ran slower in this process (see docs/performance.md, cpu)."""
    started, cpu = time.perf_counter(), time.process_time()
    spin(iterations)
    return time.perf_counter() - started, time.process_time() - cpu


def nap(seconds: float) -> float:
    """Sleep ``seconds`` and return it: a task of known length that needs no CPU, so that many
    workers on a small machine can all be busy at once."""
    time.sleep(seconds)
    return seconds


def size_plus(captured: Any, x: int) -> int:
    """``len(captured) + x``: a task bound to a large capture (``partial(size_plus, state)``)
    whose own work costs nothing, so the cost is serving the capture to each task."""
    return len(captured) + x


def spin_span(iterations: int) -> tuple[float, float]:
    """Run :func:`spin`; return when it started and ended (``time.time()``, comparable across
    the processes of one machine), so that a benchmark can tell what ran when."""
    started = time.time()
    spin(iterations)
    return started, time.time()
