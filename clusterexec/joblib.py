"""A joblib backend, so that joblib and scikit-learn's ``n_jobs`` run on clusterexec nodes.

``import clusterexec.joblib`` registers the backend ``"clusterexec"``::

    import joblib, clusterexec.joblib
    with joblib.parallel_config(backend="clusterexec", n_jobs=-1):
        GridSearchCV(model, grid).fit(X, y)                # the fits run on local nodes

    with joblib.parallel_config(backend="clusterexec", nodes=["gpu[1-4]:15809"], key_file="k"):
        ...                                                # any ClusterExecutor option passes through

    with ClusterExecutor(...) as ex, joblib.parallel_config(backend="clusterexec", executor=ex):
        ...                                                # an open executor, reused, never shut down

Each ``Parallel`` call on a backend without ``executor=`` starts its own executor when it needs
one and shuts it down when the call ends. joblib and scikit-learn are not dependencies of
clusterexec: install them to use this module (``pip install clusterexec[joblib]``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

from clusterexec.client.executor import ClusterExecutor

BACKEND_NAME = "clusterexec"


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``"clusterexec"`` backend: batches of calls run as tasks of a ClusterExecutor.

    ``executor`` is an open executor to use (never shut down here); otherwise every other
    keyword argument is :class:`~clusterexec.ClusterExecutor`'s (``nodes=``, ``key_file=``...),
    and with none the executor starts local nodes with one worker per job (``n_jobs=-1``: per
    CPU), as joblib's default backend would. ``n_jobs=-1`` means every worker of the cluster.

    Results come back through joblib's retrieve callback (so ``return_as="generator"`` and
    ``timeout=`` work); when a call fails, the batches not yet started are cancelled, and an
    executor this backend started is stopped at once (its running tasks killed) unless joblib
    will use it again. Parallel calls inside tasks run sequentially on the worker: each worker
    already is one CPU of the cluster.
    """

    supports_retrieve_callback = True
    default_n_jobs = -1
    uses_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        executor: ClusterExecutor | None = None,
        **executor_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if executor is not None and executor_options:
            raise ValueError(
                f"the clusterexec joblib backend takes executor= or ClusterExecutor options "
                f"({', '.join(sorted(executor_options))}), not both"
            )
        self.executor_options = executor_options
        self._given = executor
        self._owned: ClusterExecutor | None = None
        self._lock = threading.Lock()  # guards _owned and _pending (callbacks run in the I/O thread)
        self._pending: set[Future[Any]] = set()
        self._requested_jobs = -1

    # ------------------------------------------------------------------ the executor

    def _local_default(self) -> bool:
        return self.executor_options.get("nodes") is None and "CLUSTER" not in os.environ

    def _executor(self) -> ClusterExecutor:
        if self._given is not None:
            return self._given
        with self._lock:
            if self._owned is None:
                options = dict(self.executor_options)
                if self._local_default() and options.get("max_workers") is None:
                    options["max_workers"] = self._local_jobs(self._requested_jobs)
                self._owned = ClusterExecutor(**options)
            return self._owned

    def _local_jobs(self, n_jobs: int) -> int:
        if n_jobs > 0:
            return n_jobs
        return max((os.cpu_count() or 1) + 1 + n_jobs, 1)

    def _shutdown_owned(self, kill: bool = False) -> None:
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            if kill:
                # Returns at once: joblib may hold its lock here, which the I/O thread's
                # callbacks wait for, so this must not wait for that thread.
                owned.kill_workers()
            else:
                owned.shutdown(wait=True)

    # ------------------------------------------------------------------ joblib's backend API

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches may run at once: ``n_jobs`` if positive, else counted from the
        cluster's workers as joblib counts CPUs (-1 all, -2 all but one...)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        if self._given is None and self._owned is None and self._local_default():
            max_workers = self.executor_options.get("max_workers")
            total = max_workers or (os.cpu_count() or 1)
        else:
            executor = self._executor()
            total = executor._max_workers or sum(node.workers for node in executor.nodes) or 1
        return max(total + 1 + n_jobs, 1)

    def configure(
        self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **_: Any
    ) -> int:
        """Start of a Parallel call: note the call and return the number of jobs."""
        self.parallel = parallel
        self._requested_jobs = n_jobs if n_jobs is not None else self.default_n_jobs
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], None] | None = None) -> Future[Any]:
        """Run one batch (``func()``) as a task; ``callback`` is called with its future when done."""
        future = self._executor().submit(func)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
        # joblib reads every outcome, except those of batches it dropped after a failure; those
        # are looked at here, so that no "tasks nobody asked about" report follows at exit.
        if not future.cancelled():
            future.exception()

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its exception raised."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A batch failed: cancel every batch that has not started. An executor this backend
        started is stopped at once, running tasks killed, unless ``ensure_ready`` (joblib will
        submit again); then it is left running. A given executor is only spared the rest."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
            executor = self._given or self._owned
        if executor is not None and pending:
            executor._scheduler.cancel_all(pending)  # without waiting for the nodes' answers
        if not ensure_ready and self._given is None:
            self._shutdown_owned(kill=True)

    def terminate(self) -> None:
        """End of a Parallel call: shut down the executor this backend started, if any."""
        self._shutdown_owned()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """Parallel calls inside a task run sequentially: the worker is one CPU already."""
        level = (self.nesting_level or 0) + 1
        return SequentialBackend(nesting_level=level), None

    def __reduce__(self) -> tuple[Any, ...]:
        # A backend travels (in joblib's batches) without its executor: a task cannot use it.
        return (SequentialBackend, ())


def register(name: str = BACKEND_NAME) -> None:
    """Register the backend with joblib under ``name`` (done on import as ``"clusterexec"``)."""
    register_parallel_backend(name, ClusterBackend)


register()

__all__ = ["BACKEND_NAME", "ClusterBackend", "register"]
