"""The local executor's link to a node hosted in this process (see :mod:`clusterexec.node.hosted`).

A :class:`HostedLink` is a :class:`~clusterexec.client.link.NodeLink` with no socket: the
scheduler sends on it as on any link, and what it sends is handed to the hosted node's session
when the scheduler flushes it; the session's answers wait in the node's queue until the
scheduler reads the link (:meth:`HostedLink.pending` says when). No handshake, no sealing and no
node process: the local executor's tasks go from the I/O thread to its workers directly.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Any, cast

from clusterexec.client.link import LinkState, NodeLink, SessionRequest
from clusterexec.errors import ClusterError, NodeLostError, ProtocolError
from clusterexec.launch.specs import NodeAddress
from clusterexec.node.hosted import HostedNode, MessageQueue
from clusterexec.wire.channel import Channel
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import SESSION
from clusterexec.wire.poller import Poller

# The name of the local executor's node in errors, reports and ``ex.nodes``.
HOSTED_NAME = "local"


class HostedLink(NodeLink):
    """The link to the local executor's node, hosted by the I/O thread (which calls every
    method, once :meth:`attach` gave it the thread's poller)."""

    def __init__(self, request: SessionRequest, workers: int, compression: str | None = None) -> None:
        super().__init__(NodeAddress("localhost", 0), None, request, workers, name=HOSTED_NAME, compression=compression)
        self.node: HostedNode | None = None
        self._outbox = MessageQueue()
        self._poller: Poller | None = None
        self._timer_at: Callable[[float], None] = _no_timer

    def attach(self, poller: Poller, timer_at: Callable[[float], None]) -> None:
        """Host the node on ``poller``; ``timer_at(when)`` has the loop call :meth:`ping_if_due` by then."""
        self._poller = poller
        self._timer_at = timer_at

    def connect(self, now: float) -> None:
        """Open a session on a new hosted node: at once, with nothing to connect to."""
        assert self._poller is not None, "attach() the link to the I/O thread's poller first"
        self.attempts += 1
        self.deadline = now + self.connect_timeout
        self.node = HostedNode(self._poller, self._wanted_workers or 1, self._timer_at)
        self._outbox = MessageQueue()
        self.channel = cast(Channel, self._outbox)
        body, buffers = self._request.message(self._wanted_workers, self.compression)
        self._outbox.send(SESSION, body, buffers)
        self._set_state(LinkState.OPENING)

    def interest(self) -> int:
        """Nothing to wait for on a socket: the scheduler reads the link when it is pending."""
        return selectors.EVENT_READ

    def pending(self) -> bool:
        """Whether the link has messages to hand over or to deliver, or its session ended."""
        node = self.node
        return node is not None and (bool(self._outbox.messages) or node.busy())

    def on_event(self, events: int, now: float) -> list[Message]:
        """Hand the session what was sent; on EVENT_READ, return what it answered."""
        node = self.node
        if node is None:
            return []
        try:
            if self._outbox.messages:
                node.from_client(self._outbox.take())
            else:
                node.settle()
        except (ProtocolError, ClusterError) as exc:
            node.ended = str(exc)
        if node.ended and self.state is not LinkState.CLOSED:
            self._fail(NodeLostError(f"node {self.name}: its session ended ({node.ended})"))
            return []
        if not events & selectors.EVENT_READ:
            return []
        self.last_heard = now
        messages = node.queue.take()
        if self.state is LinkState.OPENING:
            return self._on_opening(messages)
        return messages

    def batch(self, ready: list[tuple[int, int, Any]] | None) -> None:
        """The events the loop is about to handle (None after): the node reads only the output
        pipes among them before a result (see WorkerIO.drain_output)."""
        if self.node is not None:
            self.node.worker_io.batch = ready

    def ping_if_due(self, now: float) -> float:
        """Run the hosted node's timers; return the seconds until the next is due."""
        self.last_heard = now  # there is no link to lose: it is this process
        if self.state is not LinkState.READY or self.node is None:
            return 1.0
        return self.node.timers(now)

    def _close_socket(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            if self._outbox.messages:  # BYE, or the request to stop the workers
                try:
                    node.from_client(self._outbox.take())
                except (ProtocolError, ClusterError):
                    pass
            node.close("the executor shut down" if not node.ended else node.ended)
        self._outbox.close()
        self.channel = None
        self.sock = None


def _no_timer(when: float) -> None:
    pass
