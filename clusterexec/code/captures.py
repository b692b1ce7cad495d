"""Captured state at the speed of a cache, with no shared mutation.

``ProcessPoolExecutor`` pickles the callable with every task, so no task ever sees what another
task did to the state the callable captures (a model, a table, a list in a closure). A worker
here keeps the callable's pickle and, instead of unpickling it for every task, loads it once
(:class:`CallableTemplate`), looks at what it captures (closure cells, defaults, the arguments of
a ``functools.partial``) and serves each task in the cheapest way that keeps that guarantee:

- ``SHARED``: everything it captures is immutable all the way down (bytes, str, numbers, tuples
  and frozensets of those, read-only arrays, classes, modules, functions by reference); the
  same callable serves every task.
- ``COPIED``: some captures are flat mutable containers (a list, dict, set or bytearray of
  immutable items, a writable array of numbers); each task gets the callable rebuilt around
  fresh copies of those, the rest shared. A shallow copy costs far less than an unpickling.
- ``UNPICKLED``: anything else (objects of the user's classes, nested containers, a function
  that rebinds its closure's variables); the callable is unpickled afresh for every task, as
  before.

The analysis runs once per callable and worker, within a budget of items looked at.
"""

from __future__ import annotations

import dis
import enum
import functools
import mmap
import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal

from clusterexec.code.serialize import loads_function

# Items looked at, at most, to classify one callable's captures; past that, it is unpickled
# for every task (never wrong, only slower).
BUDGET = 20_000_000
MAX_DEPTH = 20
# Writable arrays of at least this many bytes are served copy-on-write rather than copied.
COW_MIN = 1 << 20
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis), type(NotImplemented)})
_REBINDING = frozenset({"STORE_DEREF", "DELETE_DEREF"})


class Mode(enum.Enum):
    """How a callable's captured state is served to each task."""

    SHARED = "shared"
    COPIED = "copied per task"
    UNPICKLED = "unpickled per task"


class _OverBudget(Exception):
    pass


class _Scan:
    """One classification: the items looked at so far."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _OverBudget

    def immutable(self, obj: Any, depth: int = 0) -> bool:
        """Whether ``obj`` and everything it holds can never change."""
        kind = type(obj)
        if kind in _SCALARS:
            return True
        if depth > MAX_DEPTH:
            return False
        if kind is tuple or kind is frozenset:
            self.spend(len(obj))
            return self.all_immutable(obj, depth + 1)
        if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
            return True  # shared within a process whatever the executor
        if kind is types.FunctionType:
            return by_reference(obj) or self.function_immutable(obj, depth)
        if kind is functools.partial:
            return (
                self.immutable(obj.func, depth + 1)
                and self.immutable(obj.args, depth + 1)
                and all(self.immutable(v, depth + 1) for v in obj.keywords.values())
                and not getattr(obj, "__dict__", None)
            )
        if kind is memoryview:
            return obj.readonly and obj.format != "O"
        if _is_array(obj):
            return not obj.flags.writeable and not obj.dtype.hasobject
        return False

    def all_immutable(self, items: Iterable[Any], depth: int) -> bool:
        """Whether every item is immutable: the types first, all at once (a table of a million
        strings is one pass in C), then one by one only the items that are not scalars."""
        if set(map(type, items)) <= _SCALARS:
            return True
        return all(type(item) in _SCALARS or self.immutable(item, depth) for item in items)

    def function_immutable(self, fn: types.FunctionType, depth: int) -> bool:
        """A function sent by value whose captures are immutable and that rebinds none."""
        if fn.__dict__ or rebinds_closure(fn.__code__):
            return False
        cells = fn.__closure__ or ()
        return (
            all(_cell_immutable(self, cell, depth) for cell in cells)
            and self.immutable(fn.__defaults__ or (), depth + 1)
            and all(self.immutable(v, depth + 1) for v in (fn.__kwdefaults__ or {}).values())
            and self.globals_immutable(fn, depth)
        )

    def globals_immutable(self, fn: types.FunctionType, depth: int) -> bool:
        """Whether the globals a function sent by value brought along are immutable (a
        module's own globals are the process's, as with every executor)."""
        module = sys.modules.get(fn.__module__ or "")
        if module is not None and fn.__globals__ is vars(module):
            return True
        for name, value in fn.__globals__.items():
            if name.startswith("__") and name.endswith("__"):
                continue
            if not self.immutable(value, depth + 1):
                return False
        return True

    def flat_copier(self, obj: Any) -> Callable[[Any], Any] | None:
        """How to copy ``obj`` for a task if it is a flat mutable container of immutable items
        (its copy then holds nothing another task can change), else None."""
        kind = type(obj)
        if kind is list or kind is set:
            self.spend(len(obj))
            return kind.copy if self.all_immutable(obj, 1) else None
        if kind is dict:
            self.spend(2 * len(obj))
            return dict.copy if self.all_immutable(obj, 1) and self.all_immutable(obj.values(), 1) else None
        if kind is bytearray:
            return bytearray
        if _is_array(obj) and type(obj).__module__ == "numpy" and not obj.dtype.hasobject:
            contiguous = obj.flags.c_contiguous or obj.flags.f_contiguous
            if obj.nbytes >= COW_MIN and contiguous and hasattr(os, "memfd_create"):
                return CopyOnWriteArray(obj)
            return _copy_array
        return None


def _cell_immutable(scan: _Scan, cell: types.CellType, depth: int) -> bool:
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell: a variable not yet bound when the function was made
        return False
    return scan.immutable(contents, depth + 1)


def _copy_array(array: Any) -> Any:
    return array.copy()


class CopyOnWriteArray:
    """A writable array's bytes kept once in memory (a memfd); each call maps them privately
    (MAP_PRIVATE), so a task reads them for free and the pages it writes become its own."""

    def __init__(self, array: Any) -> None:
        self.shape, self.dtype = array.shape, array.dtype
        self.order: Literal["C", "F"] = "C" if array.flags.c_contiguous else "F"
        self.nbytes = array.nbytes
        self.fd = os.memfd_create("clusterexec-capture", getattr(os, "MFD_CLOEXEC", 0))
        view = memoryview(array.reshape(-1, order="A")).cast("B")  # its bytes in memory order, no copy
        written = 0
        while written < self.nbytes:
            written += os.write(self.fd, view[written:])

    def __call__(self, _template_value: Any) -> Any:
        import numpy

        pages = mmap.mmap(self.fd, self.nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The array holds the mapping: it is unmapped when the task's array is freed.
        return numpy.frombuffer(pages, dtype=self.dtype).reshape(self.shape, order=self.order)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def _is_array(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


def by_reference(fn: types.FunctionType) -> bool:
    """Whether ``fn`` is its module's own function (pickled by name, not by value)."""
    module = sys.modules.get(fn.__module__ or "")
    if module is None or fn.__globals__ is not vars(module):
        return False
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is fn


def rebinds_closure(code: types.CodeType) -> bool:
    """Whether ``code`` (or code nested in it) assigns to or deletes a closure variable."""
    if any(instruction.opname in _REBINDING for instruction in dis.get_instructions(code)):
        return True
    return any(isinstance(const, types.CodeType) and rebinds_closure(const) for const in code.co_consts)


class CallableTemplate:
    """A callable's pickle on a worker, and how each task gets its own copy of it.

    :meth:`for_task` returns a callable that no other task has changed. The first call loads
    the pickle and classifies it; an unpickling error is raised to that task (and again to the
    next, which tries again)."""

    def __init__(self, body: Any, buffers: Any, budget: int = BUDGET) -> None:
        self.body = body
        self.buffers = buffers
        self.budget = budget
        self.mode: Mode | None = None
        self._make: Callable[[], Any] | None = None

    def for_task(self) -> Any:
        """The callable for one task. Raises what unpickling raises."""
        make = self._make
        if make is not None:
            return make()
        fn = loads_function(self.body, self.buffers)
        self.mode, self._make = plan(fn, self.body, self.buffers, self.budget)
        if self.mode is Mode.UNPICKLED:
            return fn  # freshly unpickled: this task may have it
        return self._make()


def plan(fn: Any, body: Any, buffers: Any, budget: int = BUDGET) -> tuple[Mode, Callable[[], Any]]:
    """How tasks get ``fn`` (just unpickled from ``body`` and ``buffers``): the mode, and a
    function returning a callable for one task."""
    scan = _Scan(budget)
    try:
        if scan.immutable(fn):
            return Mode.SHARED, lambda: fn
        maker = _copying_maker(scan, fn)
    except _OverBudget:
        maker = None
    if maker is not None:
        return Mode.COPIED, maker
    return Mode.UNPICKLED, lambda: loads_function(body, buffers)


def _copying_maker(scan: _Scan, fn: Any) -> Callable[[], Any] | None:
    """A maker of per-task callables for ``fn`` whose mutable captures are all flat
    containers (copied per task), or None."""
    if type(fn) is functools.partial:
        return _partial_maker(scan, fn)
    if type(fn) is types.FunctionType:
        return _function_maker(scan, fn)
    return None


def _split(scan: _Scan, value: Any) -> tuple[bool, Callable[[Any], Any] | None] | None:
    """(shared as is, or copied with the copier) for one captured value; None if neither."""
    if scan.immutable(value, 1):
        return True, None
    copier = scan.flat_copier(value)
    return (False, copier) if copier is not None else None


def _partial_maker(scan: _Scan, fn: functools.partial[Any]) -> Callable[[], Any] | None:
    if getattr(fn, "__dict__", None) or not scan.immutable(fn.func, 1):
        return None
    args = [_split(scan, arg) for arg in fn.args]
    keywords = {name: _split(scan, value) for name, value in fn.keywords.items()}
    if any(a is None for a in args) or any(k is None for k in keywords.values()):
        return None
    func, held_args, held_keywords = fn.func, fn.args, fn.keywords
    copiers = [copier for _, copier in args]  # type: ignore[misc]
    keyword_copiers = {name: split[1] for name, split in keywords.items()}  # type: ignore[index]

    def make() -> Any:
        new_args = [value if copy is None else copy(value) for value, copy in zip(held_args, copiers, strict=True)]
        new_keywords = {
            name: value if keyword_copiers[name] is None else keyword_copiers[name](value)  # type: ignore[misc]
            for name, value in held_keywords.items()
        }
        return functools.partial(func, *new_args, **new_keywords)

    return make


def _function_maker(scan: _Scan, fn: types.FunctionType) -> Callable[[], Any] | None:
    if by_reference(fn) or fn.__dict__ or fn.__kwdefaults__ or rebinds_closure(fn.__code__):
        return None
    if not scan.globals_immutable(fn, 0):
        return None
    cells = fn.__closure__ or ()
    contents = []
    for cell in cells:
        try:
            contents.append(cell.cell_contents)
        except ValueError:
            return None
    splits = [_split(scan, value) for value in contents]
    defaults = fn.__defaults__ or ()
    default_splits = [_split(scan, value) for value in defaults]
    if any(s is None for s in splits) or any(s is None for s in default_splits):
        return None
    copiers = [s[1] for s in splits]  # type: ignore[index]
    default_copiers = [s[1] for s in default_splits]  # type: ignore[index]
    code, globals_, name = fn.__code__, fn.__globals__, fn.__name__
    qualname, module, doc, annotations = fn.__qualname__, fn.__module__, fn.__doc__, fn.__annotations__

    def make() -> Any:
        closure = tuple(
            cell if copy is None else types.CellType(copy(value))
            for cell, value, copy in zip(cells, contents, copiers, strict=True)
        )
        new_defaults = (
            tuple(value if copy is None else copy(value) for value, copy in zip(defaults, default_copiers, strict=True))
            if defaults
            else None
        )
        task_fn = types.FunctionType(code, globals_, name, new_defaults, closure or None)
        task_fn.__qualname__, task_fn.__module__, task_fn.__doc__ = qualname, module, doc
        task_fn.__annotations__ = annotations
        return task_fn

    return make
