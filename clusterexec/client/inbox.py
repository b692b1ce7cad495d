"""What the nodes' messages mean to the client: each kind's handler, for the I/O thread.

The task outcomes (RESULT, STARTED, CANCELLED, CRASHED) are the task book's to handle; the
rest (a broken session, printed output, a status reply, a heartbeat, a new share) are here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from clusterexec.client.dispatch import Dispatcher
from clusterexec.client.ledger import NodeLedger
from clusterexec.client.link import NodeLink
from clusterexec.client.output import OutputPrinter
from clusterexec.client.taskbook import TaskBook
from clusterexec.errors import BrokenCluster, ProtocolError
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import OUTPUT_HEAD, Kind, unexpected, unpack_json

INITIALIZER_LOG = logging.getLogger("concurrent.futures")


class Inbox:
    """Handles the messages of ready nodes, by kind (as execnet's Message._types). A kind that
    is not a node's to send raises ProtocolError, naming it."""

    def __init__(
        self,
        book: TaskBook,
        dispatcher: Dispatcher,
        output: OutputPrinter | None,
        break_cluster: Callable[[BrokenCluster], None],
        broken: Callable[[], bool],
    ) -> None:
        self._dispatcher = dispatcher
        self._output = output
        self._break = break_cluster
        self._broken = broken
        self._handlers: dict[int, Callable[[NodeLink, NodeLedger, Message], None]] = {
            Kind.RESULT: book.on_result,
            Kind.STARTED: book.on_started,
            Kind.CANCELLED: book.on_cancelled,
            Kind.CRASHED: book.on_crashed,
            Kind.BROKEN: self._on_broken,
            Kind.OUTPUT: self._on_output,
            Kind.STATUS_REPLY: self._on_status_reply,
            Kind.HEARTBEAT: self._on_heartbeat,
            Kind.SHARE: self._on_share,
        }

    def handle(self, link: NodeLink, ledger: NodeLedger, messages: list[Message]) -> None:
        """Handle ``messages`` from ``link``'s node, in order."""
        handlers = self._handlers
        for message in messages:
            handler = handlers.get(message.kind)
            if handler is None:
                raise unexpected(message.kind, f"from node {link.name}")
            handler(link, ledger, message)

    def _on_broken(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        reason = unpack_json(message.body)
        if not self._broken():
            # Where ProcessPoolExecutor's worker logs it: code that watches this logger
            # for a failed initializer sees ours too.
            INITIALIZER_LOG.critical("Exception in initializer on node %s:\n%s", link.name, reason.get("error", ""))
        self._break(
            BrokenCluster(
                f"the initializer failed on node {link.name}, so the executor cannot run tasks; "
                f"fix the initializer. Remote traceback:\n{reason.get('error', '')}"
            )
        )

    def _on_output(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        stream, pid = OUTPUT_HEAD.unpack_from(message.body, 0)
        if self._output is not None:
            self._output.write(link.name, stream, pid, bytes(memoryview(message.body)[OUTPUT_HEAD.size :]))

    def _on_status_reply(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        ledger.answer_status(unpack_json(message.body))

    def _on_heartbeat(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        pass  # the link noted when it last heard from the node

    def _on_share(self, link: NodeLink, ledger: NodeLedger, message: Message) -> None:
        share = unpack_json(message.body).get("share")
        if not isinstance(share, int) or isinstance(share, bool):
            raise ProtocolError(f"SHARE message without a share: {bytes(message.body)[:80]!r}")
        link.set_share(share)  # other clients came or went: fill the node to the new share
        self._dispatcher.touch(link, ledger)
