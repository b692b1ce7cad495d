"""Checking that every future ended exactly once: shared by the fault tests.

``track`` counts each future's completions through a done callback (it runs once per
completion); ``assert_settled`` waits for them all and checks each ended once, with a result
or an error, never cancelled and never twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, wait
from concurrent.futures._base import FINISHED
from typing import Any


def track(futures: Iterable[Future[Any]]) -> dict[Future[Any], int]:
    """Count how many times each future completes (its done callbacks run once per completion)."""
    counts: dict[Future[Any], int] = {}
    lock = threading.Lock()

    def done(future: Future[Any]) -> None:
        with lock:
            counts[future] += 1

    for future in futures:
        counts[future] = 0
        future.add_done_callback(done)
    return counts


def assert_settled(counts: dict[Future[Any], int], timeout: float = 15.0) -> None:
    """Every tracked future ended exactly once, with a result or an error: none pending,
    none cancelled, none completed twice."""
    _, not_done = wait(counts, timeout=timeout)
    assert not not_done, f"{len(not_done)} futures still pending {timeout}s after the fault"
    for future, count in counts.items():
        assert future._state == FINISHED, future._state  # not cancelled
        assert count == 1, f"a future completed {count} times"
