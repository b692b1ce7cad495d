"""Printing what tasks print: lines forwarded from the nodes' workers, prefixed by node.

On the local default (``ClusterExecutor()``, ``ClusterExecutor(n)``) lines carry no prefix, so
output looks exactly as ``ProcessPoolExecutor``'s; named nodes get ``[host:port] `` by default.

Each (node, worker, stream) keeps its own partial line, so lines from different workers never
interleave mid-line. Written by the client I/O thread to this process's current
``sys.stdout`` / ``sys.stderr``.
"""

from __future__ import annotations

import enum
import sys

STDOUT, STDERR = 1, 2
NODE_PREFIX = "[{node}] "


class PrefixChoice(enum.Enum):
    """The default of ``ClusterExecutor(output_prefix=...)``: decided by where the nodes are."""

    BY_NODES = "by-nodes"


def resolve_prefix(prefix: str | None | PrefixChoice, local_default: bool) -> str:
    """The prefix to print: the default is none on the local default, ``NODE_PREFIX`` otherwise;
    None means no prefix."""
    if prefix is PrefixChoice.BY_NODES:
        return "" if local_default else NODE_PREFIX
    return prefix or ""


class OutputPrinter:
    """Writes forwarded task output line by line, each line prefixed (``{node}``, ``{pid}``)."""

    def __init__(self, prefix: str | None = NODE_PREFIX) -> None:
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
