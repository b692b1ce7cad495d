"""Pickling in and out: cloudpickle with protocol 5, function digests, remote exceptions.

Large buffers (numpy arrays, ``PickleBuffer``) travel out of band: they are sent as they are,
not copied into the pickle stream. Exceptions travel as a :class:`RemoteFailure` envelope that
carries the pickled exception, its traceback (tblib) and the traceback text, so the client can
rebuild the same exception type, or fall back to :class:`~clusterexec.errors.RemoteError`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterexec.code.shipping import ModuleCatalog, ModuleSource
from clusterexec.errors import RemoteError
from clusterexec.wire.compression import pack

if TYPE_CHECKING:
    from clusterexec.errors import TaskTimeoutError, TaskUnpicklingError, WorkerCrashedError

# cloudpickle, tblib and concurrent.futures.process are imported where first needed: a worker
# whose tasks take and return plain values, and a node, never pay for them.

PROTOCOL = 5
OUT_OF_BAND_MIN = 64 * 1024
DIGEST_SIZE = 16

_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


@dataclass(frozen=True)
class Payload:
    """A pickled object: the pickle stream, its out-of-band buffers, the module sources it
    needs on the worker, whether it holds bytecode (``by_value``), and when that bytecode comes
    from the main script, why the script is not re-run on workers (``main_blocker``)."""

    body: bytes
    buffers: tuple[Any, ...] = ()
    modules: tuple[ModuleSource, ...] = ()
    by_value: bool = False
    main_blocker: str | None = None

    @property
    def nbytes(self) -> int:
        """Total size in bytes, buffers included."""
        return len(self.body) + sum(memoryview(b).nbytes for b in self.buffers)

    def packed(self, codec: str) -> Payload:
        """This payload as it travels with ``codec``: its pieces that shrink compressed (see
        :mod:`clusterexec.wire.compression`), or itself if none does.

        Computed once per codec and kept (the last codec asked), so the caller's thread can
        compress ahead and the I/O thread find it done. Blocks while the codec runs."""
        cached = self.__dict__.get("_packed")
        if cached is not None and cached[0] == codec:
            return cached[1]
        body, buffers = pack(self.body, self.buffers, codec)
        packed = self if body is self.body else Payload(body, tuple(buffers), self.modules, self.by_value)
        object.__setattr__(self, "_packed", (codec, packed))
        return packed


@dataclass(frozen=True)
class FunctionPayload:
    """A pickled callable and the digest that names it on a connection."""

    digest: bytes
    payload: Payload


def _keep_small_in_band(buffer: pickle.PickleBuffer) -> bool:
    return buffer.raw().nbytes < OUT_OF_BAND_MIN


_NO_SHIPPING = ModuleCatalog(auto=False)


def dumps(obj: object, catalog: ModuleCatalog | None = None, captures: bool = False) -> Payload:
    """Pickle ``obj`` (cloudpickle, protocol 5, large buffers out of band), noting the user
    modules it needs when a ``catalog`` is given.

    With ``captures`` (a callable's pickle, loaded with :func:`loads_function`), large ``bytes``
    travel out of band too, so that state a function captures is never copied into the stream.

    Raises whatever pickling raises (``PicklingError``, ``TypeError``...).
    """
    buffers: list[pickle.PickleBuffer] = []

    def collect(buffer: pickle.PickleBuffer) -> bool:
        if _keep_small_in_band(buffer):
            return True
        buffers.append(buffer)
        return False

    from clusterexec.code.pickler import CapturePickler, ShippingPickler, needed_sources

    catalog = catalog or _NO_SHIPPING
    out = io.BytesIO()
    pickler = (CapturePickler if captures else ShippingPickler)(out, catalog, buffer_callback=collect)
    pickler.dump(obj)
    modules = needed_sources(catalog, pickler) if catalog.auto else ()
    blocker = catalog.main_rerun_blocker if pickler.main_by_value else None
    return Payload(out.getvalue(), tuple(b.raw() for b in buffers), modules, pickler.by_value, blocker)


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any], catalog: ModuleCatalog | None = None) -> Payload:
    """Pickle a task's arguments; plain scalars take the fast C pickler."""
    if not kwargs and all(type(a) in _PLAIN_TYPES for a in args):
        return Payload(pickle.dumps((args, None), PROTOCOL))
    return dumps((args, kwargs or None), catalog)


def dumps_result(value: object) -> Payload:
    """Pickle a task's result; plain scalars take the fast C pickler."""
    if type(value) in _PLAIN_TYPES:
        return Payload(pickle.dumps(value, PROTOCOL))
    return dumps(value)


def loads(body: Any, buffers: Any = ()) -> Any:
    """Unpickle a stream produced by :func:`dumps` with its buffers."""
    return pickle.loads(body, buffers=buffers)


def loads_function(body: Any, buffers: Any = ()) -> Any:
    """Unpickle a callable pickled by :func:`pickle_function` (``dumps(captures=True)``)."""
    from clusterexec.code.pickler import CaptureUnpickler

    return CaptureUnpickler(io.BytesIO(body), buffers=buffers).load()


def digest_of(payload: Payload) -> bytes:
    """A 16-byte BLAKE2b digest of a payload, buffers included."""
    h = hashlib.blake2b(payload.body, digest_size=DIGEST_SIZE)
    for buffer in payload.buffers:
        h.update(buffer)
    return h.digest()


def pickle_function(fn: Callable[..., Any], catalog: ModuleCatalog | None = None) -> FunctionPayload:
    """Pickle a callable once and name it by digest."""
    payload = dumps(fn, catalog, captures=True)
    return FunctionPayload(digest_of(payload), payload)


# --------------------------------------------------------------------------- exceptions


@dataclass
class RemoteFailure:
    """An exception raised in a worker, ready to travel back to the client."""

    type_name: str
    message: str
    text: str
    exception: bytes | None
    fallback: bytes | None
    traceback: dict[str, Any] | None


def _qualified_name(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in ("builtins", "", None) else f"{module}.{name}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        return "<exception str() failed>"


def capture_exception(exc: BaseException) -> RemoteFailure:
    """Package an exception raised by a task, with its traceback, for the client."""
    import cloudpickle
    import tblib

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        tb: dict[str, Any] | None = tblib.Traceback(exc.__traceback__).to_dict() if exc.__traceback__ else None
    except Exception:
        tb = None
    exception = fallback = None
    try:
        exception = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(exception)
    except Exception:
        exception = None
        try:
            # The class cannot be rebuilt through its __init__: send its parts instead.
            fallback = cloudpickle.dumps((type(exc), exc.args, dict(vars(exc))), protocol=PROTOCOL)
        except Exception:
            fallback = None
    return RemoteFailure(_qualified_name(type(exc)), _safe_str(exc), text, exception, fallback, tb)


def dumps_failure(exc: BaseException) -> Payload:
    """Pickle the envelope of a task's exception (never raises)."""
    failure = capture_exception(exc)
    try:
        return Payload(pickle.dumps(failure, PROTOCOL))
    except Exception:
        failure.traceback = None
        return Payload(pickle.dumps(failure, PROTOCOL))


def _rebuild_from_parts(fallback: bytes) -> BaseException:
    cls, args, state = pickle.loads(fallback)
    exc: BaseException = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def rebuild_exception(failure: RemoteFailure, where: str) -> BaseException:
    """Rebuild the remote exception on the client.

    The result has the remote frames as its traceback and a ``_RemoteTraceback`` with the
    remote text as ``__cause__``, as ProcessPoolExecutor does; on Python 3.11+ a note names
    ``where`` (the node and the task). Falls back to :class:`RemoteError`.
    """
    from concurrent.futures.process import _RemoteTraceback

    import tblib

    exc: BaseException | None = None
    if failure.exception is not None:
        try:
            exc = pickle.loads(failure.exception)
        except Exception:
            exc = None
    if exc is None and failure.fallback is not None:
        try:
            exc = _rebuild_from_parts(failure.fallback)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(failure.type_name, failure.message, failure.text)
    if failure.traceback is not None:
        try:
            exc = exc.with_traceback(tblib.Traceback.from_dict(failure.traceback).as_traceback())
        except Exception:
            pass
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{failure.text}"""')  # type: ignore[arg-type]
    if sys.version_info >= (3, 11):
        exc.add_note(f"raised {where}")
    return exc


def load_failure(body: Any) -> RemoteFailure:
    """Unpickle a :class:`RemoteFailure` envelope."""
    failure = pickle.loads(body)
    if not isinstance(failure, RemoteFailure):
        raise TypeError(f"expected a RemoteFailure, got {type(failure).__name__}")
    return failure


# --------------------------------------------------------------------------- results


@dataclass
class ChunkFailure:
    """The outcome of a ``map`` chunk that raised: the results before the failing item, then
    the exception, so ``map`` yields those results and raises at the failing item."""

    results: list[Any]
    exception: BaseException


STATUS_OK, STATUS_ERROR, STATUS_PARTIAL = 0, 1, 2


def decode_result(status: int, body: Any, buffers: Any, task_id: int, node: str) -> tuple[Any, BaseException | None]:
    """Turn a RESULT message into ``(value, exception)`` on the client."""
    if status == STATUS_OK:
        return loads(body, buffers), None
    where = f"by task {task_id} on node {node}"
    if status == STATUS_ERROR:
        return None, rebuild_exception(load_failure(body), where)
    if status == STATUS_PARTIAL:
        results, failure = loads(body, buffers)
        return ChunkFailure(results, rebuild_exception(failure, where)), None
    raise ValueError(f"unknown result status {status}")


def crash_error(task_id: int, node: str, info: dict[str, Any]) -> WorkerCrashedError | TaskTimeoutError:
    """The error for a task whose worker process died, from the node's CRASHED report (a
    TaskTimeoutError if the node killed it for running past its timeout)."""
    timeout = info.get("timeout")
    if isinstance(timeout, (int, float)):
        from clusterexec.errors import TaskTimeoutError

        return TaskTimeoutError(
            f"task {task_id} ran past its timeout of {timeout:g}s on node {node}; its worker process "
            f"(pid {info.get('pid')}) was killed and replaced. Only this task failed; raise the timeout "
            "with ex.options(timeout=...) if it needs longer."
        )
    status = info.get("status", "unknown status")
    maxrss = info.get("maxrss_kb")
    memory = f"; its peak memory was {int(maxrss) / 1024:.1f} MiB" if isinstance(maxrss, int) and maxrss else ""
    hint = ""
    if "SIGKILL" in str(status):
        hint = " (killed by SIGKILL: likely out of memory, the kernel's OOM killer sends SIGKILL)"
    from clusterexec.errors import WorkerCrashedError, WorkerStoppedError

    stopped_by = info.get("stopped_by")
    if stopped_by:
        return WorkerStoppedError(
            f"task {task_id} on node {node}: its worker process (pid {info.get('pid')}) was stopped by "
            f"{stopped_by} while running it ({status}). The executor is shut down; to run the task "
            "again, submit it to a new executor."
        )
    return WorkerCrashedError(
        f"task {task_id} on node {node}: its worker process (pid {info.get('pid')}) died, {status}{hint}{memory}. "
        "Only this task failed; the node started a replacement worker."
    )


def unpickling_error(task_id: int, where: str, what: str, exc: BaseException, advice: str) -> TaskUnpicklingError:
    """The error for a task whose ``what`` (its function and arguments, or its result) raised
    ``exc`` while being unpickled ``where``: a ``BrokenProcessPool``, as ProcessPoolExecutor
    reports it, that fails this task alone. ``exc`` becomes its ``__cause__``, and its notes
    (a shipped module's name, for one) are copied."""
    from clusterexec.errors import TaskUnpicklingError

    error = TaskUnpicklingError(
        f"task {task_id}: {what} could not be unpickled {where} ({type(exc).__name__}: {_safe_str(exc)}). "
        f"Only this task failed; the executor goes on. {advice}"
    )
    error.__cause__ = exc
    for note in getattr(exc, "__notes__", ()):  # what shipping said about the module, for one
        if hasattr(error, "add_note"):
            error.add_note(str(note))
    return error
