"""The I/O thread's mailbox: calls posted by user threads, and the wake-up that announces them.

As CPython's ``_ThreadWakeup`` in ``concurrent.futures.process``: one object owns the wake-up
socket pair and the queue of calls. User threads call :meth:`Mailbox.call_soon`; the I/O thread
polls :attr:`Mailbox.reader` with its sockets, calls :meth:`Mailbox.on_readable` when it is
readable, and :meth:`Mailbox.run_calls` to run what was posted, in order.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    Ts = TypeVarTuple("Ts")


class Mailbox:
    """Calls for the I/O thread, and one wake-up byte per batch of them. Thread-safe."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._calls: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        # Whether a wake-up byte is on its way and not yet drained: while it is, posting more
        # writes nothing, so a burst of calls costs the I/O thread one wake-up, not one each.
        self._lock = threading.Lock()
        self._wake_pending = False

    def call_soon(self, fn: Callable[[Unpack[Ts]], object], *args: Unpack[Ts]) -> None:
        """Have the I/O thread call ``fn(*args)`` on its next turn, after the calls posted
        before it. Thread-safe; never blocks. An exception ``fn`` raises ends the I/O thread."""
        self._calls.append((fn, args))
        self.wake()

    def wake(self) -> None:
        """Wake the I/O thread, unless a wake-up is already pending. Thread-safe."""
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._writer.send(b"\0")
        except OSError:  # closed: the I/O thread has ended
            pass

    def on_readable(self) -> None:
        """Drain the wake-up byte. I/O thread only, before it looks at what was posted: what is
        posted after this wakes it again."""
        # One read drains it: wake() writes a byte only while none is pending.
        try:
            self.reader.recv(4096)
        except BlockingIOError:
            pass
        with self._lock:
            self._wake_pending = False

    @property
    def has_calls(self) -> bool:
        """Whether calls are waiting to be run."""
        return bool(self._calls)

    def run_calls(self) -> None:
        """Run every posted call, oldest first, including those posted meanwhile. I/O thread only."""
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            fn(*args)

    def close(self) -> None:
        """Close the socket pair; later posts are dropped. I/O thread only, at its end."""
        self.reader.close()
        self._writer.close()
