"""Printing what tasks print: lines forwarded from the nodes' workers, prefixed by node.

Each (node, worker, stream) keeps its own partial line, so lines from different workers never
interleave mid-line. Written by the client I/O thread to this process's current
``sys.stdout`` / ``sys.stderr``.
"""

from __future__ import annotations

import sys

STDOUT, STDERR = 1, 2


class OutputPrinter:
    """Writes forwarded task output line by line, each line prefixed (``{node}``, ``{pid}``)."""

    def __init__(self, prefix: str | None = "[{node}] ") -> None:
        self.prefix = prefix or ""
        self._partial: dict[tuple[str, int, int], bytes] = {}

    def write(self, node: str, stream: int, pid: int, data: bytes) -> None:
        """Add bytes printed by worker ``pid`` of ``node``; write out every complete line."""
        key = (node, pid, stream)
        data = self._partial.pop(key, b"") + data
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[key] = rest
        if lines:
            self._emit(node, stream, pid, lines)

    def flush(self) -> None:
        """Write out partial lines (at shutdown)."""
        partial, self._partial = self._partial, {}
        for (node, pid, stream), rest in partial.items():
            self._emit(node, stream, pid, [rest])

    def _emit(self, node: str, stream: int, pid: int, lines: list[bytes]) -> None:
        target = sys.stderr if stream == STDERR else sys.stdout
        if target is None:
            return
        prefix = self.prefix.format(node=node, pid=pid)
        text = "".join(f"{prefix}{line.decode(errors='replace')}\n" for line in lines)
        try:
            target.write(text)
            target.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the I/O thread
            pass
