"""The I/O thread's mailbox: calls posted from any thread run once each, in order, on the
thread that drains it; a burst of posts costs one wake-up byte."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from clusterexec.client.mailbox import Mailbox


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.close()


def pending_bytes(sock: socket.socket) -> bytes:
    """What is waiting on the socket, without waiting for more."""
    try:
        return sock.recv(4096, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


def test_calls_from_many_threads_run_once_each_in_order_per_thread_on_the_draining_thread(mailbox: Mailbox) -> None:
    threads, per_thread = 8, 500
    ran: list[tuple[int, int, int]] = []

    def record(thread: int, seq: int) -> None:
        ran.append((thread, seq, threading.get_ident()))

    def post(thread: int) -> None:
        for seq in range(per_thread):
            mailbox.call_soon(record, thread, seq)

    posters = [threading.Thread(target=post, args=(n,)) for n in range(threads)]
    for poster in posters:
        poster.start()
    # Drain while they post, as the I/O thread does: wait for the wake-up, drain it, run the calls.
    while any(poster.is_alive() for poster in posters) or mailbox.has_calls:
        if select.select([mailbox.reader], [], [], 0.05)[0]:
            mailbox.on_readable()
        mailbox.run_calls()
    for poster in posters:
        poster.join()

    assert len(ran) == threads * per_thread
    assert {ident for _, _, ident in ran} == {threading.get_ident()}
    for thread in range(threads):
        assert [seq for t, seq, _ in ran if t == thread] == list(range(per_thread))


def test_a_burst_of_posts_writes_one_wake_up_byte(mailbox: Mailbox) -> None:
    ran: list[int] = []
    for n in range(100):
        mailbox.call_soon(ran.append, n)
    mailbox.wake()
    assert pending_bytes(mailbox.reader) == b"\0"

    mailbox.on_readable()
    assert pending_bytes(mailbox.reader) == b""
    mailbox.run_calls()
    assert ran == list(range(100))
    assert not mailbox.has_calls


def test_a_post_after_the_wake_up_was_drained_wakes_again(mailbox: Mailbox) -> None:
    ran: list[str] = []
    mailbox.call_soon(ran.append, "first")
    mailbox.on_readable()
    mailbox.call_soon(ran.append, "second")
    assert pending_bytes(mailbox.reader) == b"\0"
    mailbox.on_readable()
    mailbox.run_calls()
    assert ran == ["first", "second"]


def test_calls_posted_while_running_run_in_the_same_drain(mailbox: Mailbox) -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        mailbox.call_soon(ran.append, "posted by first")

    mailbox.call_soon(first)
    mailbox.call_soon(ran.append, "second")
    mailbox.run_calls()
    assert ran == ["first", "second", "posted by first"]
