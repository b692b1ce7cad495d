"""The link simulator (``benchmarks/linksim.py``): delay, rate cap, partition and heal, resets.

An echo server on loopback is the target; every byte goes through a real :class:`Link` and
comes back. Times are checked as lower bounds (a link may be slower on a loaded machine, never
faster than its settings) with generous upper bounds. Last, a real node behind a delayed link
runs a map, as the benchmarks do.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from linksim import LinkSimulator  # noqa: E402

from clusterexec import ClusterExecutor  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[:2]
    stop.set()
    server.close()


@pytest.fixture
def sim() -> Iterator[LinkSimulator]:
    with LinkSimulator() as simulator:
        yield simulator


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, f"connection closed after {len(out)} of {size} bytes"
        out += chunk
    return bytes(out)


def round_trip(sock: socket.socket, payload: bytes = b"x") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert receive_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def test_every_byte_arrives_intact_and_in_order(sim: LinkSimulator, echo: tuple[str, int]) -> None:
    link = sim.link(echo, delay=0.001)
    payload = os.urandom(5 << 20)
    with connect(link.address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive_exactly(sock, len(payload)) == payload
        sender.join()


@pytest.mark.parametrize("delay", [0.002, 0.02])
def test_each_direction_is_delayed_by_the_one_way_time(
    sim: LinkSimulator, echo: tuple[str, int], delay: float
) -> None:
    link = sim.link(echo, delay=delay)
    with connect(link.address) as sock:
        round_trip(sock)  # the first one includes the connect
        times = sorted(round_trip(sock) for _ in range(10))
    assert times[0] >= 2 * delay  # there and back
    assert times[len(times) // 2] < 2 * delay + 0.25


def test_the_delay_can_change_while_connections_are_open(sim: LinkSimulator, echo: tuple[str, int]) -> None:
    link = sim.link(echo)
    with connect(link.address) as sock:
        round_trip(sock)
        link.set(delay=0.05)
        assert round_trip(sock) >= 0.1


def test_lowering_the_delay_with_bytes_in_flight_never_reorders_the_stream(
    sim: LinkSimulator, echo: tuple[str, int]
) -> None:
    """Bytes sent after the delay drops arrive after those sent before it (they used to overtake
    them, which the authenticated frames of a session behind the link took for tampering)."""
    link = sim.link(echo, delay=0.2)
    with connect(link.address) as sock:
        round_trip(sock)
        sock.sendall(b"first-")  # on its way with the 0.2 s delay
        (connection,) = link.connections
        deadline = time.monotonic() + 5
        while connection.up.in_flight < 6:  # read by the simulator, not yet delivered
            assert time.monotonic() < deadline, "the simulator never read the first bytes"
            select.select([], [], [], 0.001)
        link.set(delay=0.0)
        sock.sendall(b"second")
        assert receive_exactly(sock, 12) == b"first-second"


def test_the_rate_cap_holds_bytes_back(sim: LinkSimulator, echo: tuple[str, int]) -> None:
    rate = 4 << 20  # 4 MiB/s each way
    link = sim.link(echo, rate=rate)
    payload = os.urandom(2 << 20)
    with connect(link.address) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive_exactly(sock, len(payload)) == payload
        elapsed = time.monotonic() - started
        sender.join()
    # 2 MiB cross the cap twice, pipelined: at least the time of one crossing.
    assert elapsed >= len(payload) / rate * 0.95


def readable(sock: socket.socket, within: float) -> bool:
    return bool(select.select([sock], [], [], within)[0])


def test_a_partition_swallows_bytes_and_keeps_connections_open_until_healed(
    sim: LinkSimulator, echo: tuple[str, int]
) -> None:
    link = sim.link(echo, delay=0.001)
    with connect(link.address) as sock:
        round_trip(sock)
        link.partition()
        sock.sendall(b"lost")
        # Nothing comes back, and no FIN or RST either: the socket stays silent.
        assert not readable(sock, 0.5)
        link.heal()
        assert round_trip(sock, b"after") < 5  # new bytes flow again; "lost" is gone for good
        assert not readable(sock, 0.1)


def test_a_partition_also_hides_a_closed_connection(sim: LinkSimulator) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    close_now = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"hi")
        close_now.wait(30)
        conn.close()  # its FIN goes to the link, which is partitioned by then

    threading.Thread(target=serve, daemon=True).start()
    link = sim.link(server.getsockname()[:2])
    with connect(link.address) as sock:
        assert receive_exactly(sock, 2) == b"hi"
        link.partition()
        close_now.set()
        assert not readable(sock, 0.5)  # the far end's close never arrives
    server.close()


def test_a_holding_partition_delivers_everything_after_the_heal(sim: LinkSimulator, echo: tuple[str, int]) -> None:
    link = sim.link(echo, delay=0.001)
    with connect(link.address) as sock:
        round_trip(sock)
        link.partition(hold=True)
        sock.sendall(b"held")
        assert not readable(sock, 0.5)
        # Nothing is read from a held link: a sender fills the kernels' buffers, then blocks.
        sock.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += sock.send(b"y" * 65536)
        except BlockingIOError:
            pass
        sock.setblocking(True)
        assert sent < 64 << 20, "a held link kept reading"
        link.heal()
        assert receive_exactly(sock, 4) == b"held"  # every byte, in order
        assert receive_exactly(sock, sent) == b"y" * sent


def reset_seen(sock: socket.socket, within: float = 5.0) -> bytes:
    """Read until the connection ends; return what arrived. Fails unless it ends with a reset."""
    sock.settimeout(within)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return bytes(out)
        assert chunk, "the connection ended with FIN, not RST"
        out += chunk


@pytest.mark.parametrize("offset", [1, 1000, 300_000])
def test_reset_after_delivers_the_bytes_before_the_offset_then_resets_both_sides(
    sim: LinkSimulator, offset: int
) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    link = sim.link(server.getsockname()[:2])
    with connect(link.address) as sock:
        upstream, _ = server.accept()
        link.reset_after(offset)
        payload = os.urandom(offset + 5000)
        threading.Thread(target=upstream.sendall, args=(payload,), daemon=True).start()
        got = reset_seen(sock)
        # The bytes before the offset arrive, then the reset. As on a real network, a reset
        # discards what the receiver's kernel had not taken yet: all of it for a small offset.
        assert got == payload[: len(got)] and len(got) <= offset - 1
        if offset < 1 << 16:
            assert len(got) == offset - 1
        upstream.settimeout(5)
        with pytest.raises(ConnectionResetError):
            upstream.recv(1)  # the other side was reset too
        upstream.close()
    assert link.resets == 1
    # Once: a new connection through the link is not reset.
    with connect(link.address) as sock:
        upstream, _ = server.accept()
        upstream.sendall(b"fine")
        assert receive_exactly(sock, 4) == b"fine"
        upstream.close()
    server.close()


def test_reset_all_resets_every_connection(sim: LinkSimulator, echo: tuple[str, int]) -> None:
    link = sim.link(echo)
    socks = [connect(link.address) for _ in range(3)]
    for sock in socks:
        round_trip(sock)
    link.reset_all()
    for sock in socks:
        assert reset_seen(sock) == b""
        sock.close()
    assert link.resets == 3


def test_a_node_behind_a_delayed_link_runs_a_map(
    sim: LinkSimulator, node_factory, key_file: Path  # type: ignore[no-untyped-def]
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    link = sim.link((node.host, node.port), delay=0.005)
    with ClusterExecutor([link.address], key_file=key_file) as ex:
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        started = time.monotonic()
        assert ex.submit(abs, -1).result(timeout=30) == 1
        assert time.monotonic() - started >= 0.01  # one round trip through the link, at least
