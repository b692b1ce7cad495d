"""Executors and the interpreter's exit: as ``ProcessPoolExecutor``'s, each open executor is let
finish its pending work, then the tasks the cluster failed and nobody looked at are reported.

Registered with ``threading._register_atexit`` (run before threads are joined, as
``concurrent.futures`` does), so an executor still open at exit never hangs the interpreter.
"""

from __future__ import annotations

import sys
import threading
import weakref

from clusterexec.client.scheduler import Scheduler
from clusterexec.client.tasks import UNSEEN

_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()
_lock = threading.Lock()
_exiting = False


def track(scheduler: Scheduler) -> None:
    """Stop ``scheduler`` at interpreter exit (after its pending work), unless it is gone."""
    _live.add(scheduler)


def interpreter_exiting() -> bool:
    """Whether the interpreter has begun to exit: no new task may be submitted."""
    return _exiting


def stop_scheduler(scheduler: Scheduler) -> None:
    """Ask ``scheduler`` to finish its tasks and close (the executor was garbage-collected)."""
    scheduler.stop()


def _python_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
    schedulers = list(_live)
    for scheduler in schedulers:
        scheduler.stop()
    for scheduler in schedulers:
        scheduler.join()
    unseen = UNSEEN.report()
    if unseen is not None:
        sys.stderr.write(unseen + "\n")


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Python without the private hook
    import atexit

    atexit.register(_python_exit)
