"""``ClusterExecutor.map``: submitting the items (all at once, or ``buffersize`` ahead) and the
iterator that yields their results in order.

As ``ProcessPoolExecutor.map`` of Python 3.14, including how it lets go of results and of the
executor: the iterator holds the executor weakly, and no local holds a result while it is
suspended at a ``yield``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol

from clusterexec.client.options import DEFAULT_OPTIONS, TaskOptions
from clusterexec.client.tasks import TaskFuture, cancel_and_notify
from clusterexec.code.serialize import ChunkFailure, FunctionPayload, Payload, dumps_call
from clusterexec.code.shipping import ModuleCatalog
from clusterexec.wire.messages import FLAG_CHUNK


class FutureCanceller(Protocol):
    """What cancels a map's leftover futures: the executor's scheduler."""

    def cancel_all(self, futures: Iterable[Future[Any]]) -> None:
        """Cancel many futures without waiting."""
        ...


class MapExecutor(Protocol):
    """What a map needs of its executor."""

    @property
    def _scheduler(self) -> FutureCanceller: ...

    def _queue(
        self,
        function: FunctionPayload | BaseException,
        make_payload: Callable[[], Payload],
        flags: int = 0,
        options: TaskOptions = DEFAULT_OPTIONS,
    ) -> TaskFuture: ...


def map_tasks(
    executor_ref: Callable[[], MapExecutor | None],
    function: FunctionPayload | BaseException,
    catalog: ModuleCatalog,
    iterables: tuple[Iterable[Any], ...],
    chunksize: int,
    buffersize: int | None,
    end_time: float | None,
    options: TaskOptions = DEFAULT_OPTIONS,
) -> Iterator[Any]:
    """Submit ``function`` over the zipped ``iterables`` (in chunks of ``chunksize``; only
    ``buffersize`` ahead if given) and return the iterator of the results, in order."""
    zipped = zip(*iterables, strict=False)
    if chunksize > 1:
        source: Iterator[Any] = iter(lambda: tuple(itertools.islice(zipped, chunksize)), ())
        flags = FLAG_CHUNK
    else:
        source, flags = zipped, 0

    def queue(item: Any) -> TaskFuture:
        executor = executor_ref()
        if executor is None:
            raise RuntimeError("cannot schedule new futures after the executor was garbage-collected")
        if flags:
            return executor._queue(function, lambda: dumps_call((list(item),), {}, catalog), flags, options)
        return executor._queue(function, lambda: dumps_call(item, {}, catalog), 0, options)

    if buffersize is None:
        futures = deque(queue(item) for item in source)
    else:
        futures = deque(queue(item) for item in itertools.islice(source, buffersize))
    return _results(futures, source if buffersize else None, executor_ref, queue, end_time, bool(flags))


def _results(
    futures: deque[TaskFuture],
    source: Iterator[Any] | None,
    executor_ref: Callable[[], MapExecutor | None],
    queue: Callable[[Any], TaskFuture],
    end_time: float | None,
    chunked: bool,
) -> Iterator[Any]:
    """The iterator behind ``map``: refills the window, yields in order, cancels on exit.

    No local of this generator holds a result while it is suspended at a ``yield`` (CPython
    issue #14406): a large result is freed as soon as the caller drops it.
    """
    try:
        while futures:
            if source is not None and executor_ref() is not None:
                try:
                    item = next(source)
                except StopIteration:
                    source = None
                else:
                    futures.append(queue(item))
            if not chunked:
                yield _result_of(futures.popleft(), end_time)
                continue
            chunk = _result_of(futures.popleft(), end_time)
            if isinstance(chunk, ChunkFailure):
                results, exception = chunk.results, chunk.exception
                del chunk
                yield from _drain(results)
                raise exception
            yield from _drain(chunk)
    finally:
        if futures:
            executor = executor_ref()
            scheduler = executor._scheduler if executor is not None else None
            if scheduler is not None:
                scheduler.cancel_all(futures)
            else:
                for future in futures:
                    cancel_and_notify(future)


def _result_of(future: TaskFuture, end_time: float | None) -> Any:
    """The future's result within the map's deadline; the future is not kept, and is
    cancelled if waiting for it fails (a timeout), as CPython's ``_result_or_cancel`` does."""
    try:
        try:
            return future.result(None if end_time is None else end_time - time.monotonic())
        except BaseException:
            future.cancel()
            raise
    finally:
        del future


def _drain(results: list[Any]) -> Iterator[Any]:
    """Yield a chunk's results in order, letting go of each one as it is yielded."""
    results.reverse()
    while results:
        yield results.pop()
