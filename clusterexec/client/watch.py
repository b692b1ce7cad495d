"""Which of the nodes' sockets the client's I/O thread waits on, and for what.

A link's socket changes with each connection, and what the thread waits for with its state
(writable while connecting or while bytes are queued, readable otherwise). :class:`LinkWatch`
keeps the poller's registrations in step. I/O thread only.
"""

from __future__ import annotations

import socket

from clusterexec.client.link import LinkState, NodeLink
from clusterexec.wire.poller import Poller


class LinkWatch:
    """The poller's registration of every link's socket, kept in step with the link."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.registered: dict[NodeLink, tuple[socket.socket, int, int]] = {}

    def sync(self, link: NodeLink) -> None:
        """Register, modify or unregister ``link``'s socket as its state and interest say."""
        current = self.registered.get(link)
        sock = link.sock
        if sock is None or link.state in (LinkState.LOST, LinkState.CLOSED):
            if current is not None:
                self._unregister(link, current[1])
            return
        events = link.interest()
        if current is not None and current[0] is sock:
            if current[2] != events:
                self.poller.modify(current[1], events, link)
                self.registered[link] = (sock, current[1], events)
            return
        if current is not None:
            self._unregister(link, current[1])
        fd = sock.fileno()
        self.poller.register(fd, events, link)
        self.registered[link] = (sock, fd, events)

    def _unregister(self, link: NodeLink, fd: int) -> None:
        del self.registered[link]
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
