"""A node's Session against a fake NodeHost: no node process, real socketpairs for its channels.

The session under test talks to a :class:`FakeHost` that records what the session asks of its
node (forks, watches, signals, flushes) and hands out fake worker pids; the tests read what the
session queued on the client's channel and on each worker's channel through the other ends of
those socketpairs. The last tests run a real worker process and give it a kind it does not take.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterexec.errors import ProtocolError
from clusterexec.node.host import NodeHost, WorkerProcess
from clusterexec.node.session import Session, SessionState
from clusterexec.node.slots import RunSlots
from clusterexec.wire.channel import BlockingChannel, Channel, ConnectionClosed
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    BYE,
    CANCEL,
    CANCELLED,
    FLAG_RUNNING,
    FUNC,
    PING,
    RESULT,
    RESULT_HEAD,
    SESSION,
    STARTED,
    STATUS_OK,
    TASK,
    TASK_HEAD,
    WELCOME,
    Kind,
    kind_name,
    pack_ids,
    pack_json,
    unpack_cancelled,
    unpack_ids,
    unpack_json,
)
from clusterexec.wire.sealing import PlainOpener, PlainSealer

DIGEST = b"f" * 16
ROOT = Path(__file__).resolve().parent.parent


class FakeHost(NodeHost):
    """A NodeHost that forks nothing: it records what the session asks and keeps the far end of
    every worker's socketpair, so a test reads what the session sent to each worker."""

    def __init__(self, capacity: int = 2) -> None:
        self.slots = RunSlots(capacity)
        self.next_pid = 4000
        self.forked: list[tuple[int, str | None]] = []
        self.worker_ends: dict[int, socket.socket] = {}
        self.watched: list[WorkerProcess] = []
        self.signalled: list[tuple[int, float]] = []
        self.retired: list[tuple[int, bool]] = []
        self.flushes: list[Channel] = []
        self.timers: list[float] = []

    def status(self, packages: list[object] | None = None) -> dict[str, object]:
        return {"host": "fake", "tasks_run": self.tasks_run}

    def grant_slots(self) -> None:
        self.slots.grant(0.0)

    def process_room(self) -> int:
        return 8

    def make_room(self, session: Session) -> bool:
        return True

    def refusal(self) -> dict[str, object] | None:
        return None

    def describe(self) -> dict[str, object]:
        return {"host": "fake"}

    def fork_worker(self, sock: socket.socket, output: list[int], compression: str | None = None) -> int:
        self.next_pid += 1
        # The session closes its copy of the child's end after the fork: keep one that stays open.
        self.worker_ends[self.next_pid] = socket.socket(fileno=os.dup(sock.fileno()))
        self.forked.append((self.next_pid, compression))
        return self.next_pid

    def drain_output(self, session: Session, worker: WorkerProcess) -> None:
        pass

    def watch_worker(self, session: Session, worker: WorkerProcess) -> None:
        self.watched.append(worker)

    def signal_workers(self, session: Session, signum: int, grace: float) -> None:
        self.signalled.append((signum, grace))

    def retire_worker(self, worker: WorkerProcess, kill: bool = False) -> None:
        self.retired.append((worker.pid, kill))

    def want_write(self, channel: Channel) -> None:
        self.flushes.append(channel)

    def timer_at(self, when: float) -> None:
        self.timers.append(when)

    def close(self) -> None:
        for end in self.worker_ends.values():
            end.close()


class Harness:
    """A Session with its client channel, and helpers to read what it sent."""

    def __init__(self, max_workers: int = 2) -> None:
        self.host = FakeHost()
        node_end, self.client_end = socket.socketpair()
        node_end.setblocking(False)
        self.channel = Channel(node_end, PlainSealer(), PlainOpener(), chunked=True)
        self.session = Session(self.host, self.channel, "test-peer", max_workers)

    def from_client(self, kind: int, body: bytes = b"") -> None:
        self.session.on_client_messages([Message(kind, body)])

    def to_client(self) -> list[Message]:
        """The messages the session queued for its client so far."""
        return self._drain(self.channel, self.client_end)

    def to_worker(self, worker: WorkerProcess) -> list[Message]:
        """The messages the session queued for one worker so far."""
        return self._drain(worker.channel, self.host.worker_ends[worker.pid])

    @staticmethod
    def _drain(channel: Channel, far_end: socket.socket) -> list[Message]:
        while not channel.flush():
            pass
        reader = BlockingChannel(far_end, PlainSealer(), PlainOpener())
        messages = []
        far_end.settimeout(0.2)
        try:
            while True:
                messages.append(reader.receive())
        except (TimeoutError, ConnectionClosed):
            return messages
        finally:
            far_end.settimeout(None)

    def open(self, workers: int = 2) -> dict[str, object]:
        self.from_client(SESSION, pack_json({"workers": workers}))
        (welcome,) = [m for m in self.to_client() if m.kind == WELCOME]
        return unpack_json(welcome.body)

    def close(self) -> None:
        self.session.close("test over")
        self.channel.close()
        self.client_end.close()
        self.host.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def task(task_id: int) -> bytes:
    return TASK_HEAD.pack(task_id, DIGEST, 0) + b"pickled arguments"


def test_a_session_request_gets_a_welcome_with_the_worker_count(harness: Harness) -> None:
    welcome = harness.open(workers=5)  # more than the node's share of 2
    assert welcome["workers"] == 2 and welcome["host"] == "fake"
    assert harness.session.state is SessionState.ACTIVE
    assert [pid for pid, _ in harness.host.forked] == [w.pid for w in harness.host.watched] == [4001, 4002]
    assert harness.host.timers, "no heartbeat timer asked for"


def test_a_task_goes_to_an_idle_worker_with_its_function_first(harness: Harness) -> None:
    harness.open()
    harness.from_client(FUNC, DIGEST + b"pickled function")
    harness.from_client(TASK, task(7))
    (first,) = [w for w in harness.session.workers if w.outstanding]  # one worker took it
    (second,) = [w for w in harness.session.workers if w is not first]
    sent = harness.to_worker(first)
    assert [m.kind for m in sent] == [FUNC, TASK]
    assert bytes(sent[1].body) == task(7)
    assert harness.to_worker(second) == []
    assert [task_id for task_id, _ in first.outstanding] == [7]
    assert first.channel in harness.host.flushes
    assert harness.host.slots.in_use == harness.session.held == 1  # its worker holds a run slot


def test_a_result_from_a_worker_is_forwarded_and_counted(harness: Harness) -> None:
    harness.open()
    harness.from_client(FUNC, DIGEST + b"f")
    harness.from_client(TASK, task(7))
    (worker,) = [w for w in harness.session.workers if w.outstanding]
    harness.to_client()
    result = RESULT_HEAD.pack(7, STATUS_OK, 0) + b"pickled value"
    harness.session.on_worker_messages(worker, [Message(RESULT, result)])
    (forwarded,) = harness.to_client()
    assert (forwarded.kind, bytes(forwarded.body)) == (RESULT, result)
    assert (harness.session.tasks_done, harness.host.tasks_run) == (1, 1)
    assert not worker.outstanding
    assert harness.host.slots.in_use == harness.session.held == 0  # its slot is free again


def test_started_is_reported_for_a_task_sent_ahead_but_not_for_one_the_client_counts_running(
    harness: Harness,
) -> None:
    harness.open()
    harness.from_client(FUNC, DIGEST + b"f")
    harness.from_client(TASK, TASK_HEAD.pack(7, DIGEST, FLAG_RUNNING) + b"args")  # to a free worker
    harness.to_client()
    assert harness.session.started == {} and not harness.session.started_due  # no timer armed for it
    harness.from_client(TASK, task(8))  # sent ahead: the client wants to hear that it started
    later = harness.session.started_due
    assert later
    harness.session.tick(later)
    reports = [m for m in harness.to_client() if m.kind == STARTED]
    assert [unpack_ids(m.body) for m in reports] == [[8]]


def test_only_tasks_of_the_function_a_worker_just_ran_quickly_are_pipelined_to_it(harness: Harness) -> None:
    other = b"g" * 16
    harness.open(workers=1)
    harness.from_client(FUNC, DIGEST + b"f")
    harness.from_client(FUNC, other + b"g")
    harness.from_client(TASK, task(1))
    (worker,) = harness.session.workers
    harness.session.on_worker_messages(worker, [Message(RESULT, RESULT_HEAD.pack(1, STATUS_OK, 0))])
    assert worker.short == DIGEST and worker.depth == 4  # a quick result: up to the node's pipeline
    for task_id in (2, 3, 4):
        harness.from_client(TASK, task(task_id))
    harness.from_client(TASK, TASK_HEAD.pack(5, other, 0) + b"args")  # another function: a new map
    harness.from_client(TASK, task(6))
    assert [task_id for task_id, _ in worker.outstanding] == [2, 3, 4]  # the same function, pipelined
    assert [TASK_HEAD.unpack_from(m.body)[0] for m in harness.session.queue] == [5, 6]  # 5 waits, 6 behind it


def test_cancel_of_a_queued_task_answers_cancelled(harness: Harness) -> None:
    harness.open(workers=1)
    harness.from_client(FUNC, DIGEST + b"f")
    harness.from_client(TASK, task(1))  # runs on the one worker
    harness.from_client(TASK, task(2))  # waits in the queue
    harness.to_client()
    harness.from_client(CANCEL, pack_ids([2, 1]))
    (reply,) = harness.to_client()
    assert reply.kind == CANCELLED
    assert unpack_cancelled(reply.body) == ([2], [1])  # 1 had started: refused
    assert harness.session.tasks_cancelled == 1


def test_a_ping_is_taken_and_bye_closes_the_session(harness: Harness) -> None:
    harness.open()
    harness.from_client(PING)
    assert harness.session.state is SessionState.ACTIVE
    harness.from_client(BYE)
    assert harness.session.state is SessionState.CLOSED
    assert sorted(harness.host.retired) == [(4001, True), (4002, True)]


@pytest.mark.parametrize("kind", [Kind.RESULT, Kind.WELCOME, Kind.STOP, 99])
def test_a_kind_a_client_does_not_send_ends_the_session_naming_it(harness: Harness, kind: int) -> None:
    harness.open()
    with pytest.raises(ProtocolError, match=f"unexpected message {kind_name(kind)} from the client"):
        harness.from_client(kind, b"x" * 16)


def test_a_kind_a_worker_does_not_send_is_a_protocol_error_naming_it(harness: Harness) -> None:
    harness.open()
    worker = harness.session.workers[0]
    with pytest.raises(ProtocolError, match=f"unexpected message TASK from worker {worker.pid}"):
        harness.session.on_worker_messages(worker, [Message(TASK, task(1))])


def test_a_worker_given_a_kind_it_does_not_take_exits_non_zero_naming_it() -> None:
    """A real worker process (the loop a node forks) on one end of a socketpair."""
    node_end, worker_end = socket.socketpair()
    code = (
        # Logging configured as the node configures it before it forks its workers.
        "import logging, socket, sys; from clusterexec.node import worker; logging.basicConfig(); "
        "worker.main(socket.socket(fileno=int(sys.argv[1])))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(worker_end.fileno())],
        pass_fds=[worker_end.fileno()],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    worker_end.close()
    channel = BlockingChannel(node_end, PlainSealer(), PlainOpener())
    try:
        channel.send(Kind.WELCOME, b"{}")
        _, stderr = process.communicate(timeout=30)
    finally:
        node_end.close()
    assert process.returncode == 3
    assert "unexpected message WELCOME from the node" in stderr
