"""Handing queued tasks to the nodes: one per free worker first, then tasks sent ahead.

Sending a task also sends what its node's session lacks for it (module sources, the
function), as the node's :class:`~clusterexec.client.ledger.NodeLedger` says. I/O thread only.
"""

from __future__ import annotations

import sys

from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import LinkState, NodeLink
from clusterexec.client.taskbook import TaskBook
from clusterexec.client.tasks import Task
from clusterexec.code.shipping import ModuleSource, encode_sources
from clusterexec.errors import ClusterError
from clusterexec.wire.compression import pack
from clusterexec.wire.messages import FORGET, FUNC, MODULES, TASK, TASK_HEAD


class Dispatcher:
    """Sends queued and pinned tasks to ready nodes, as far as their capacity goes."""

    def __init__(
        self, book: TaskBook, nodes: list[tuple[NodeLink, NodeLedger]], preload: tuple[ModuleSource, ...]
    ) -> None:
        self.book = book
        self.nodes = nodes
        self.preload = preload

    def dispatch(self, prefetch: bool = True) -> None:
        """Fill every ready link: first one task per free worker, round robin, then (with
        ``prefetch``) the tasks sent ahead."""
        if self.book.stopped_by:
            return  # nothing is sent once the workers are stopped
        queue = self.book.queue
        if not queue and not any(ledger.pinned for _, ledger in self.nodes):
            return
        ready = [(link, ledger) for link, ledger in self.nodes if link.state is LinkState.READY]
        if not ready:
            return
        for link, ledger in ready:
            pinned = ledger.pinned
            while pinned and len(ledger.inflight) < ledger.capacity(link.workers):
                self._send(link, ledger, pinned.popleft())
        if not queue:
            return
        for ahead in (False, True) if prefetch else (False,):
            progress = True
            while queue and progress:
                progress = False
                for link, ledger in ready:
                    if queue and len(ledger.inflight) < (ledger.capacity(link.workers) if ahead else link.workers):
                        self._send(link, ledger, queue.popleft())
                        progress = True

    def _send(self, link: NodeLink, ledger: NodeLedger, task: Task) -> bool:
        if not task.mark_sent(to_idle_worker=len(ledger.inflight) < link.workers):
            self.book.drop(task)
            return False
        channel = link.channel
        assert channel is not None
        function = task.function
        if (function.payload.by_value or task.payload.by_value) and link.python_version() != LOCAL_PYTHON:
            blocker = function.payload.main_blocker or task.payload.main_blocker
            self.book.fail(task, version_skew_error(task.task_id, link.name, link.python_version(), blocker))
            return False
        modules = ledger.modules_to_ship(self.preload, function.payload.modules + task.payload.modules)
        if modules:
            body, buffers = encode_sources(modules)
            if link.codec:
                body, buffers = pack(body, buffers, link.codec)
            channel.send(MODULES, body, buffers)
        forget = ledger.record_sent(task)
        if forget is not None:  # the session lacks the function: make room, then send it
            for digest in forget:
                channel.send(FORGET, digest)
            code = function.payload.packed(link.codec) if link.codec else function.payload
            channel.send(FUNC, function.digest + code.body, code.buffers)
        # Usually packed already, by the submitting thread (see ClusterExecutor._queue).
        args = task.payload.packed(link.codec) if link.codec else task.payload
        channel.send(TASK, TASK_HEAD.pack(task.task_id, function.digest, task.flags) + args.body, args.buffers)
        task.link = link
        return True

LOCAL_PYTHON = "{}.{}".format(*sys.version_info[:2])


def version_skew_error(task_id: int, node: str, remote: str, main_blocker: str | None = None) -> ClusterError:
    """The error for bytecode that cannot run on a node's other Python minor version; with
    ``main_blocker``, it also says which line of the main script kept it from being re-run."""
    why = f" The main script is not re-run on workers because of {main_blocker}." if main_blocker else ""
    return ClusterError(
        f"task {task_id} cannot run on node {node}: its function or arguments hold code pickled by value "
        f"(a lambda, a closure, a function defined inside another, or a function of a main script whose "
        f"top-level code is not only definitions, so it is not re-run on workers), and bytecode does not "
        f"travel between Python versions: this client runs Python {LOCAL_PYTHON}, node {node} runs Python "
        f"{remote}. Move the function into a module (it then travels by source), or put the main script's "
        'other top-level code under `if __name__ == "__main__":`, or run the same Python version on both sides.' + why
    )
