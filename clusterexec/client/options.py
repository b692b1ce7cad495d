"""Per-task options: ``ex.options(timeout=, retries=, node=)`` returns a view of the executor
whose ``submit`` and ``map`` apply them, within the ``Executor`` API.

A view shares its executor's nodes, queue and futures; it owns nothing, so its ``shutdown``
only waits for (or cancels) the tasks submitted through it, and the executor stays open.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from clusterexec.client.link import NodeLink

T = TypeVar("T")
# An option left out of ``options()``: it keeps the value it had (None is a value: "none").
UNSET: Any = object()


@dataclass(frozen=True)
class TaskOptions:
    """What each task submitted through a view carries.

    ``timeout``: seconds the task may run on its worker before the worker is killed and the
    task fails with :class:`~clusterexec.errors.TaskTimeoutError` (None: no limit).
    ``retries``: times the task is sent again after its node is lost (None: the executor's).
    ``node``: the only node it may run on (None: any)."""

    timeout: float | None = None
    retries: int | None = None
    node: NodeLink | None = None


DEFAULT_OPTIONS = TaskOptions()


def check_options(timeout: Any, retries: Any) -> None:
    """Raise TypeError or ValueError, naming the option, for a timeout or retries out of range."""
    if timeout is not UNSET and timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        if not timeout > 0 or math.isinf(timeout):
            raise ValueError(f"timeout must be a finite number of seconds greater than 0, not {timeout!r}")
    if retries is not UNSET and retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int or None, not {type(retries).__name__}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")


class OptionsTarget(Protocol):
    """What a view needs of its executor."""

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: TaskOptions
    ) -> Future[Any]: ...

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        options: TaskOptions,
    ) -> Iterator[Any]: ...

    def _link(self, node: Any) -> NodeLink: ...


class ExecutorView(Executor):
    """An executor's ``submit`` and ``map`` with per-task options; made by
    ``ClusterExecutor.options()``. Thread-safe, as the executor is."""

    def __init__(self, executor: OptionsTarget, options: TaskOptions) -> None:
        self._executor = executor
        self._options = options
        self._futures: weakref.WeakSet[Future[Any]] = weakref.WeakSet()
        self._lock = threading.Lock()  # guards _futures, which user threads add to

    @property
    def task_options(self) -> TaskOptions:
        """The options this view applies."""
        return self._options

    def options(self, *, timeout: Any = UNSET, retries: Any = UNSET, node: Any = UNSET) -> ExecutorView:
        """A view with these options changed and the others kept (None removes one)."""
        return make_view(self._executor, self._options, timeout, retries, node)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """As ``ClusterExecutor.submit``, with this view's options."""
        future = self._executor._submit(fn, args, kwargs, self._options)
        with self._lock:
            self._futures.add(future)
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """As ``ClusterExecutor.map``, with this view's options (``timeout`` here is the map's
        own deadline for its results, as in ``Executor.map``; the view's is per task)."""
        return self._executor._map(fn, iterables, timeout, chunksize, buffersize, self._options)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel (``cancel_futures``) or wait for (``wait``) the tasks submitted through this
        view with ``submit``. The executor itself stays open: it is not the view's to close."""
        with self._lock:
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait and futures:
            concurrent.futures.wait(futures)


def make_view(executor: OptionsTarget, base: TaskOptions, timeout: Any, retries: Any, node: Any) -> ExecutorView:
    """A view of ``executor`` with ``base`` changed by the options given (UNSET: kept)."""
    check_options(timeout, retries)
    changes: dict[str, Any] = {}
    if timeout is not UNSET:
        changes["timeout"] = None if timeout is None else float(timeout)
    if retries is not UNSET:
        changes["retries"] = retries
    if node is not UNSET:
        changes["node"] = None if node is None else executor._link(node)
    return ExecutorView(executor, replace(base, **changes))
