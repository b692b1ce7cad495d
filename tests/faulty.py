"""Tasks and objects that misbehave on purpose, for tests/test_faults.py.

A module of its own, on the nodes' import path, so that workers import these by reference. The
picklable "bad objects" follow CPython's ``test_concurrent_futures/test_deadlock.py``: each one
errors, exits or crashes the process at pickling or at unpickling time.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

# --------------------------------------------------------------------------- killing the worker


def segfault() -> NoReturn:
    """Crash this process with SIGSEGV (read from address 0)."""
    ctypes.string_at(0)
    raise AssertionError("unreachable: reading address 0 did not crash")


def die(how: str, marker: str | None = None, allocate_mib: int = 0) -> NoReturn:
    """Kill the calling worker: ``exit`` (``os._exit(7)``), ``sigkill`` or ``segfault``.

    With ``marker``, first append this worker's pid to that file (one line per run), so a test
    can count how many times the task ran and see which worker ran it. ``allocate_mib`` touches
    that much memory first, to show in the worker's peak memory.
    """
    ballast = b"x" * (allocate_mib << 20)
    if marker is not None:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
    if how == "exit":
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        segfault()
    raise ValueError(f"unknown way to die: {how!r} ({len(ballast)} bytes)")


# --------------------------------------------------------------------------- tasks


def work(x: int) -> int:
    """A short task that still does some work (tens of microseconds)."""
    return sum(i * i for i in range(200 + x % 50)) + x


def log_run_and_block(log: str, release: str, timeout: float = 30.0) -> int:
    """Append this worker's pid to ``log``, wait until ``release`` exists, return the pid."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} did not appear within {timeout}s")
        time.sleep(0.005)
    return os.getpid()


def log_run_and_return_bulk(log: str, release: str, size: int, timeout: float = 30.0) -> bytes:
    """As :func:`log_run_and_block`, then return ``size`` bytes: a large result, sent once released."""
    log_run_and_block(log, release, timeout)
    return b"r" * size


def paced(x: int, seconds: float = 0.002) -> int:
    """:func:`work` after a sleep of ``seconds``: a map of these lasts long enough to fault it."""
    time.sleep(seconds)
    return work(x)


def runs(log: str | Path) -> list[int]:
    """The pids written by :func:`log_run_and_block` or :func:`die`, one per run."""
    path = Path(log)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def spin(seconds: float) -> int:
    """Hold the GIL in a tight pure-Python loop for ``seconds``; return the iterations."""
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return count


def sleep_holding_gil(seconds: float) -> int:
    """Sleep inside a C call that keeps the GIL (libc ``usleep`` through ``ctypes.PyDLL``)."""
    libc = ctypes.PyDLL(None)
    libc.usleep(int(seconds * 1_000_000))
    return os.getpid()


def touch_and_ignore_sigterm(marker: str, seconds: float) -> None:
    """Ignore SIGTERM, create ``marker``, then sleep: only SIGKILL ends this worker early."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marker).touch()
    time.sleep(seconds)


def touch_and_sleep(marker: str, seconds: float) -> None:
    """Create ``marker``, then sleep."""
    Path(marker).touch()
    time.sleep(seconds)


# --------------------------------------------------------------------------- bad objects


def raise_error(kind: type[BaseException]) -> NoReturn:
    raise kind(f"{kind.__name__} raised on purpose")


def exit_now() -> NoReturn:
    """``sys.exit(1)``: raises SystemExit."""
    sys.exit(1)


def return_instance(cls: type) -> object:
    return cls()


class ErrorAtPickle:
    """Raises PicklingError when pickled."""

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("error at pickle, on purpose")


class ExitAtPickle:
    """Raises SystemExit when pickled."""

    def __reduce__(self) -> Any:
        exit_now()


class CrashAtPickle:
    """Segfaults the process that pickles it."""

    def __reduce__(self) -> Any:
        segfault()


class ErrorAtUnpickle:
    """Raises UnpicklingError when unpickled."""

    def __reduce__(self) -> Any:
        return raise_error, (pickle.UnpicklingError,)


class ExitAtUnpickle:
    """Raises SystemExit when unpickled."""

    def __reduce__(self) -> Any:
        return exit_now, ()


class HardExitAtUnpickle:
    """Ends the unpickling process with ``os._exit(5)`` (no exception, no clean-up)."""

    def __reduce__(self) -> Any:
        return os._exit, (5,)


class CrashAtUnpickle:
    """Segfaults the process that unpickles it."""

    def __reduce__(self) -> Any:
        return segfault, ()


class CallableErrorAtPickle:
    """A callable that cannot be pickled."""

    def __call__(self, *args: object) -> object:
        return args

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("callable cannot be pickled, on purpose")


class CallableErrorAtUnpickle:
    """A callable that pickles but raises UnpicklingError when the worker loads it."""

    def __call__(self, *args: object) -> object:
        return args

    def __reduce__(self) -> Any:
        return raise_error, (pickle.UnpicklingError,)


def square_or_die(x: int, how: str) -> int:
    """Square ``x``; a negative ``x`` kills the worker (see :func:`die`)."""
    if x < 0:
        die(how)
    return x * x


def write_to_closed_pipe() -> None:
    """Write to a pipe whose reading end is closed: BrokenPipeError in a normal Python process."""
    read, write = os.pipe()
    os.close(read)
    try:
        os.write(write, b"x")
    finally:
        os.close(write)
