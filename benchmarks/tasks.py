"""Task functions for the benchmarks, in a module of their own so that pickling them by
reference works for ``ProcessPoolExecutor`` (its workers import this module) and for
``ClusterExecutor`` (local nodes inherit this interpreter's ``sys.path``)."""

from __future__ import annotations


def noop(x: int) -> int:
    """Return ``x``: a task whose cost is all overhead."""
    return x
