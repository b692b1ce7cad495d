"""Functions that tasks run in tests. A module of its own so that workers can import it."""

from __future__ import annotations

import os
import time


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def identity(x: object) -> object:
    return x


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def pid() -> int:
    return os.getpid()


def exit_worker(code: int = 3) -> None:
    os._exit(code)


# --------------------------------------------------------------------------- executor contract tests
# Functions and classes below are used by tests/test_executor.py. They live here, in a module the
# workers can import, so that they are pickled by reference (as with ProcessPoolExecutor).

GLOBAL: object = None


def wait_for_file(path: str, timeout: float = 20.0) -> None:
    """Block until ``path`` exists; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)


def block(started: str | None, release: str, value: object = None) -> object:
    """Create ``started`` (if given), wait until ``release`` exists, return ``value``."""
    if started is not None:
        with open(started, "w"):
            pass
    wait_for_file(release)
    return value


def block_pid(started: str, release: str) -> int:
    """As :func:`block`, returning the worker's pid."""
    block(started, release)
    return os.getpid()


def write_marker(path: str) -> str:
    """Create ``path``: proof that this task ran."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return path


def sleep_then_touch(seconds: float, path: str) -> None:
    time.sleep(seconds)
    write_marker(path)


def kwargs_of(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


def pid_of(_: object) -> int:
    return os.getpid()


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x}")
    return x * x


def square_or_exit(x: int) -> int:
    """Square ``x``; a negative ``x`` kills the worker with exit code ``-x``."""
    if x < 0:
        os._exit(-x)
    return x * x


def set_global(value: object) -> None:
    global GLOBAL
    GLOBAL = value


def get_global(_: object = None) -> object:
    return GLOBAL


def fail_when(path: str) -> None:
    """An initializer that fails once ``path`` exists."""
    wait_for_file(path)
    raise RuntimeError("initializer failed on purpose")


def return_lock() -> object:
    import threading

    return threading.Lock()


class Box:
    """A plain object that can be weakly referenced."""

    def __init__(self, value: int) -> None:
        self.value = value


class Doubler:
    """A callable object: returns a new Box with twice the value."""

    def __call__(self, box: Box) -> Box:
        return Box(box.value * 2)


class Counter:
    """A callable object that counts its calls on itself."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: object) -> int:
        self.count += 1
        return self.count


class PairError(Exception):
    """An exception whose ``__init__`` does not take its own ``args`` back."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}-{b}")


def raise_pair_error(a: object, b: object) -> None:
    raise PairError(a, b)


class LockedError(Exception):
    """An exception that cannot be pickled at all (it holds a lock)."""

    def __init__(self, message: str) -> None:
        import threading

        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked_error(message: str) -> None:
    raise LockedError(message)


# --------------------------------------------------------------------------- terminate_workers / kill_workers


def announce_then_block(started: str, release: str) -> int:
    """Write this worker's pid to ``started`` (atomically), then block until ``release`` exists."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    wait_for_file(release, timeout=60.0)
    return os.getpid()


def ignore_sigterm_then_block(started: str, release: str) -> int:
    """As :func:`announce_then_block`, in a worker that ignores SIGTERM."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return announce_then_block(started, release)


def gate_first(release: str, x: int) -> int:
    """Return ``x``; item 0 first waits until ``release`` exists."""
    if x == 0:
        wait_for_file(release, timeout=60.0)
    return x


def sleep_and_pid(seconds: float) -> int:
    """Sleep ``seconds``, then return the worker's pid."""
    time.sleep(seconds)
    return os.getpid()


def write_pid_then_sleep(path: str, seconds: float) -> None:
    """Write the worker's pid to ``path``, then sleep ``seconds``."""
    with open(path + ".tmp", "w") as out:
        out.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)


def kill_node_once(marker: str) -> str:
    """The first call (no ``marker`` file yet) creates it and SIGKILLs this worker's node; a
    later call returns "survived"."""
    import signal

    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
    return "survived"


def append_and_count(items: list, x: int) -> int:
    """Append ``x`` to ``items`` (a captured list) and return how many items it holds."""
    items.append(x)
    return len(items)


def set_key_and_count(table: dict, x: int) -> int:
    """Add key ``x`` to ``table`` (a captured dict) and return its size."""
    table[x] = x
    return len(table)


def bump_first(array, x: int) -> int:
    """Add ``x`` to ``array[0]`` in place and return the new value."""
    array[0] += x
    return int(array[0])


def first_byte_plus(data: bytes, x: int) -> int:
    """``data[0] + x``: a task bound to a large immutable capture."""
    return data[0] + x


class ItemBox:
    """A user object a task can mutate."""

    def __init__(self) -> None:
        self.items: list[int] = []


def fill_box(box: ItemBox, x: int) -> int:
    """Append ``x`` to ``box.items`` and return how many it holds."""
    box.items.append(x)
    return len(box.items)


def timed_nap(seconds: float) -> tuple[float, float, int]:
    """Sleep ``seconds``; return when the task started and ended (time.time()) and the worker's pid."""
    started = time.time()
    time.sleep(seconds)
    return started, time.time(), os.getpid()
