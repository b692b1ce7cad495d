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
