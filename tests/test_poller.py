"""The readiness loop's poller, on real socketpairs: epoll and the selectors fallback alike."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from clusterexec.wire.poller import EVENT_READ, EVENT_WRITE, Poller

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=[True, False], ids=["epoll", "selectors"])
def poller(request: pytest.FixtureRequest) -> Iterator[Poller]:
    p = Poller(epoll=request.param)
    yield p
    p.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_reports_readable_with_its_data(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(b, EVENT_READ, "b's data")
    assert poller.select(0) == []
    a.send(b"x")
    assert poller.select(1.0) == [(b.fileno(), EVENT_READ, "b's data")]


def test_modify_changes_events_and_data(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(b.fileno(), EVENT_READ, 1)
    assert poller.select(0) == []
    poller.modify(b, EVENT_READ | EVENT_WRITE, 2)
    assert poller.get(b.fileno()) == (EVENT_READ | EVENT_WRITE, 2)
    assert poller.select(1.0) == [(b.fileno(), EVENT_WRITE, 2)]
    a.send(b"x")
    assert poller.select(1.0) == [(b.fileno(), EVENT_READ | EVENT_WRITE, 2)]


def test_only_registered_events_are_reported(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(b, EVENT_READ, None)
    poller.register(a, EVENT_READ, None)
    b.send(b"x")  # b is writable too, but only reading was asked for; a has data
    assert poller.select(1.0) == [(a.fileno(), EVENT_READ, None)]


def test_unregister(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(b, EVENT_READ, None)
    poller.unregister(b.fileno())
    a.send(b"x")
    assert poller.select(0) == []
    assert poller.get(b.fileno()) is None
    with pytest.raises(KeyError):
        poller.unregister(b.fileno())
    with pytest.raises(KeyError):
        poller.modify(b, EVENT_READ, None)


def test_register_twice_is_refused(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    poller.register(b, EVENT_READ, None)
    with pytest.raises(KeyError, match="already registered"):
        poller.register(b.fileno(), EVENT_WRITE, None)


def test_a_closed_descriptor_can_be_unregistered_and_its_number_reused(poller: Poller) -> None:
    a, b = socket.socketpair()
    fd = b.fileno()
    poller.register(fd, EVENT_READ, "old")
    b.close()
    poller.unregister(fd)
    c, d = socket.socketpair()
    try:
        new = d if d.fileno() == fd else c if c.fileno() == fd else d
        poller.register(new, EVENT_READ, "new")
        (c if new is d else d).send(b"x")
        assert poller.select(1.0) == [(new.fileno(), EVENT_READ, "new")]
    finally:
        for s in (a, c, d):
            s.close()


def test_hang_up_wakes_the_reader(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(b, EVENT_READ, None)
    a.close()
    assert poller.select(1.0) == [(b.fileno(), EVENT_READ, None)]
    assert b.recv(1) == b""
