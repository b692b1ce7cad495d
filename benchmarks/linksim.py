"""A link simulator: TCP proxies on loopback that add delay, cap the rate, and partition.

The kernel here has no netem, so network conditions are made in user space. Each
:class:`Link` listens on 127.0.0.1 (a port chosen by the OS) and forwards every connection to
its target, as a router between two sites would:

- each direction is delayed by a fixed one-way time (``delay``, seconds);
- each direction is capped at ``rate`` bytes per second (None: no cap); bytes queue behind
  the cap, and past ``window`` queued bytes the link stops reading, so TCP's own back-pressure
  reaches the sender as it would behind a slow link;
- :meth:`Link.partition` swallows every byte in both directions and keeps the connections
  open (no FIN, no RST: a silent peer), :meth:`Link.heal` forwards again; with ``hold=True``
  bytes are held instead of lost, as TCP would retransmit them across a dead route, so the
  senders' buffers fill and back-pressure reaches them, and a heal delivers everything;
- :meth:`Link.reset_after` resets the connections (RST, both sides) once a given number of
  bytes more has crossed the link, the bytes up to that offset delivered first: a reset in the
  middle of a frame; :meth:`Link.reset_all` resets them at once.

One thread (:class:`LinkSimulator`) runs every link: a selector over all sockets and a heap of
delivery times, so a hundred links cost one thread. Nodes run behind a link as they would
behind a real one: ``ClusterExecutor([link.address, ...])``. Used by the benchmarks and by the
tests (``tests/test_linksim.py``); it imports nothing of clusterexec.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

READ_SIZE = 256 * 1024
DEFAULT_WINDOW = 4 << 20
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
RESET_LINGER = struct.pack("ii", 1, 0)
# Deliveries due within FINE seconds are waited for in sleeps of TICK between polls, not by
# epoll: its timeouts are whole milliseconds, rounded up, and on this VM it wakes 0.2 ms late
# after a wait of 8 ms or more (measured), so a 10 ms link took 10.4 ms one way.
FINE = 0.002
TICK = 0.0001
# What a direction delivers besides bytes: the source's end of stream, or a reset.
EOF = "eof"
RESET = "reset"


class _Direction:
    """One direction of one connection: bytes read from ``source``, delivered to ``sink``."""

    def __init__(self, connection: _Connection, link: Link, source: socket.socket, sink: socket.socket) -> None:
        self.connection = connection
        self.link = link
        self.source = source
        self.sink = sink
        self.in_flight = 0  # bytes read and not yet written to the sink
        self.free_at = 0.0  # when the rate cap lets the next byte leave
        self.ready: deque[memoryview | str] = deque()  # delivered, waiting for the sink (or EOF/RESET)
        self.eof = False  # the source closed: close the sink once everything is delivered
        self.last_arrival = 0.0  # when the bytes read last reach the far end

    def admit(self, data: bytes, now: float) -> float:
        """Account for ``data`` read now; return when it reaches the far end: never before the
        bytes read earlier, even once the delay is lowered (a stream is never reordered)."""
        rate = self.link.rate
        departs = now
        if rate:
            departs = max(now, self.free_at) + len(data) / rate
            self.free_at = departs
        self.in_flight += len(data)
        self.last_arrival = arrival = max(departs + self.link.delay, self.last_arrival)
        return arrival


class _Connection:
    """A client connection through a link and its connection to the target."""

    def __init__(self, link: Link, client: socket.socket, upstream: socket.socket) -> None:
        self.link = link
        self.client = client
        self.upstream = upstream
        self.up = _Direction(self, link, client, upstream)
        self.down = _Direction(self, link, upstream, client)
        self.registered: dict[socket.socket, int] = {}  # events each socket is registered for
        self.closed = False


class Link:
    """One simulated link to ``target``: listen on :attr:`address`, forward with delay and rate.

    Settings may change at any time from any thread (:meth:`set`); they apply to bytes read
    from then on. Create links with :meth:`LinkSimulator.link`.
    """

    def __init__(
        self, sim: LinkSimulator, target: tuple[str, int], delay: float, rate: float | None, window: int
    ) -> None:
        self.sim = sim
        self.target = target
        self.delay = delay
        self.rate = rate
        self.window = window
        self.partitioned = False
        self.hold = False  # a partition that holds bytes back instead of losing them
        self.reset_in: int | None = None  # bytes until the connections are reset (None: never)
        self.resets = 0  # connections reset so far (by reset_after or reset_all)
        self.connections: list[_Connection] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.listener.setblocking(False)

    @property
    def address(self) -> str:
        """``host:port`` to connect to instead of the target."""
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}"

    def set(self, delay: float | None = None, rate: float | None | bool = False) -> None:
        """Change the one-way delay (seconds) and/or the rate cap (bytes/s; None: no cap)."""
        if delay is not None:
            self.delay = delay
        if rate is not False:
            self.rate = rate  # type: ignore[assignment]

    def partition(self, hold: bool = False) -> None:
        """Swallow every byte in both directions from now on; connections stay open.

        With ``hold``, nothing is read or written instead: bytes wait in the kernels' buffers
        (the senders block once those are full) and arrive, all of them, after :meth:`heal`."""
        self.hold = hold
        self.partitioned = not hold
        if hold:
            self.sim.call(self._refresh)

    def heal(self) -> None:
        """Forward again (bytes swallowed meanwhile are gone, as on a real partition's far side;
        bytes held are delivered)."""
        self.partitioned = False
        self.hold = False
        self.sim.call(self._refresh)

    def reset_after(self, nbytes: int) -> None:
        """Reset the connection that carries the ``nbytes``-th byte from now (either direction):
        the bytes before it are delivered, then both of its sockets send RST. Once."""
        self.sim.call(lambda: setattr(self, "reset_in", max(1, nbytes)))

    def reset_all(self) -> None:
        """Reset every connection through this link now (RST to both sides)."""
        self.sim.call(lambda: [self.sim.reset(connection) for connection in list(self.connections)])

    def sources(self) -> list[str]:
        """``host:port`` of each connection as the target sees it (its peer address)."""
        found = []
        for connection in list(self.connections):
            try:
                host, port = connection.upstream.getsockname()[:2]
            except OSError:
                continue
            found.append(f"{host}:{port}")
        return found

    def _refresh(self) -> None:
        for connection in list(self.connections):
            for direction in (connection.up, connection.down):
                if direction.ready:
                    self.sim.write(connection, direction)
            self.sim.interest(connection)

    def close(self) -> None:
        """Stop listening and close every connection through this link (thread-safe)."""
        self.sim.call(self._close)

    def _close(self) -> None:
        self.sim.forget(self.listener)
        for connection in list(self.connections):
            self.sim.drop(connection)


class LinkSimulator:
    """The thread that runs every :class:`Link`. Use as a context manager, or call :meth:`close`."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, _Direction, bytes | str]] = []
        self._order = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._closing = False
        self.links: list[Link] = []
        self._thread = threading.Thread(target=self._run, name="linksim", daemon=True)
        self._thread.start()

    def __enter__(self) -> LinkSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def link(
        self, target: tuple[str, int] | str, delay: float = 0.0, rate: float | None = None, window: int = DEFAULT_WINDOW
    ) -> Link:
        """A new link to ``target`` (``(host, port)`` or ``"host:port"``), listening at once."""
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            target = (host.strip("[]"), int(port))
        link = Link(self, target, delay, rate, window)
        self.links.append(link)
        self.call(lambda: self._selector.register(link.listener, selectors.EVENT_READ, ("accept", link)))
        return link

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the simulator's thread, soon (thread-safe)."""
        self._calls.append(fn)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        """Close every link and stop the thread."""
        self._closing = True
        self.call(lambda: None)
        self._thread.join(10)
        for link in self.links:
            link.listener.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ the loop (its thread only)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` and close it."""
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def reset(self, connection: _Connection) -> None:
        """Reset both sides of a connection: each peer gets RST, not FIN."""
        if connection.closed:
            return
        connection.link.resets += 1
        for sock in (connection.client, connection.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
            except OSError:
                pass
        self.drop(connection)

    def drop(self, connection: _Connection) -> None:
        """Close both sides of a connection."""
        if connection.closed:
            return
        connection.closed = True
        self.forget(connection.client)
        self.forget(connection.upstream)
        if connection in connection.link.connections:
            connection.link.connections.remove(connection)

    def _run(self) -> None:
        while not self._closing:
            for key, events in self._wait():
                what, obj = key.data
                if what == "wake":
                    self._on_wake()
                elif what == "accept":
                    self._accept(obj)
                elif what == "conn":
                    connection, sock = obj
                    if events & selectors.EVENT_READ:
                        self._read(connection, sock)
                    if events & selectors.EVENT_WRITE and not connection.closed:
                        self.write(connection, connection.up if sock is connection.upstream else connection.down)
            self._deliver_due()
        for link in self.links:
            for connection in list(link.connections):
                self.drop(connection)
        self._selector.close()
        self._wake_r.close()

    def _wait(self) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait for a socket or the next delivery. epoll's timeouts are whole milliseconds,
        rounded up, so a delivery due in 0.2 ms would leave up to 1 ms late, and a long wait
        ends late: wait in epoll until :data:`FINE` before it, then poll between sleeps of
        :data:`TICK`."""
        if not self._timers:
            return self._selector.select(None)
        timeout = self._timers[0][0] - time.monotonic()
        if timeout > FINE:
            return self._selector.select(timeout - FINE)
        ready = self._selector.select(0)
        if not ready and timeout > 0:
            time.sleep(min(timeout, TICK))
        return ready

    def _on_wake(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.popleft()()

    def _accept(self, link: Link) -> None:
        while True:
            try:
                client, _ = link.listener.accept()
            except (BlockingIOError, OSError):
                return
            try:
                upstream = socket.create_connection(link.target, timeout=5)
            except OSError:
                client.close()  # the target is down: the client sees its connection refused
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(link, client, upstream)
            link.connections.append(connection)
            self.interest(connection)

    def _direction_from(self, connection: _Connection, sock: socket.socket) -> _Direction:
        return connection.up if sock is connection.client else connection.down

    def _read(self, connection: _Connection, sock: socket.socket) -> None:
        direction = self._direction_from(connection, sock)
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        link = connection.link
        if not data:
            direction.eof = True
            if not link.partitioned:  # on a partition the FIN is lost too
                self._schedule(direction, EOF, max(time.monotonic(), direction.free_at) + link.delay)
            self.interest(connection)
            return
        if link.partitioned:
            return  # swallowed: the far side never hears of it, and nobody closes anything
        reset = False
        if link.reset_in is not None:
            if len(data) >= link.reset_in:
                data, reset = data[: link.reset_in - 1], True
                link.reset_in = None
            else:
                link.reset_in -= len(data)
        if data:
            self._schedule(direction, data, direction.admit(data, time.monotonic()))
        if reset:  # after the bytes before the offset, in the same direction
            self._schedule(direction, RESET, max(time.monotonic(), direction.free_at) + link.delay)
        self.interest(connection)

    def _schedule(self, direction: _Direction, data: bytes | str, when: float) -> None:
        heapq.heappush(self._timers, (when, next(self._order), direction, data))

    def _deliver_due(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, direction, data = heapq.heappop(self._timers)
            connection = direction.connection
            if connection.closed:
                continue
            direction.ready.append(data if isinstance(data, str) else memoryview(data))
            self.write(connection, direction)

    def write(self, connection: _Connection, direction: _Direction) -> None:
        """Write what is ready for ``direction``'s sink (not while the link holds bytes back)."""
        if connection.link.hold:
            self.interest(connection)
            return
        while direction.ready:
            view = direction.ready[0]
            if isinstance(view, str):  # the source closed (or is reset) and everything before has gone out
                if view == RESET:
                    self.reset(connection)
                else:
                    self.drop(connection)
                return
            try:
                sent = direction.sink.send(view)
            except BlockingIOError:
                break
            except OSError:
                self.drop(connection)
                return
            direction.in_flight -= sent
            if sent < len(view):
                direction.ready[0] = view[sent:]
                break
            direction.ready.popleft()
        self.interest(connection)

    def interest(self, connection: _Connection) -> None:
        """Read a source while its direction holds less than the window and it has not ended;
        wait to write to a sink while bytes are ready for it; neither while the link holds."""
        if connection.closed:
            return
        for sock, inbound, outbound in (
            (connection.client, connection.up, connection.down),
            (connection.upstream, connection.down, connection.up),
        ):
            events = 0
            if connection.link.hold:
                pass  # a dead route: nothing moves, the kernels' buffers fill
            elif not inbound.eof and inbound.in_flight < connection.link.window:
                events |= selectors.EVENT_READ
            if outbound.ready and not connection.link.hold:
                events |= selectors.EVENT_WRITE
            current = connection.registered.get(sock, 0)
            if events == current:
                continue
            if not current:
                self._selector.register(sock, events, ("conn", (connection, sock)))
            elif not events:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, events, ("conn", (connection, sock)))
            connection.registered[sock] = events
