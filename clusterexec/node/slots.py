"""The node's run slots: at most ``--workers`` tasks run at once, across every session, shared fairly.

A worker given a task holds one run slot until its last task ends (short tasks pipelined to it
ride on that slot). When a slot frees, :meth:`RunSlots.grant` gives it to the session with
queued work that holds the fewest slots, and among those to the one that has waited longest, so
no session's tasks wait behind another's queue and a newcomer gets the next slot that frees.

A session's *share* is its fair part of the capacity among the sessions that have work (a
session that just connected, or had work less than :data:`ACTIVE_LINGER` seconds ago, counts
as having work), split max-min fair within what each client asked for. It is what the node
tells the client (in WELCOME, then in SHARE whenever it changes) so that the client's prefetch
and its view of the node fit it. With more sessions than slots a share is still 1: the slots
then rotate among the sessions, each getting the next free slot in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# A session that ran out of work still counts for the shares this long: a client that submits,
# waits for the result and submits again does not make every other client's share flap.
ACTIVE_LINGER = 1.0


class SlotUser(Protocol):
    """What the allocator sees of a session (implemented by Session)."""

    held: int  # run slots its workers hold now (written by RunSlots only)
    waiting_since: float  # when it last got or gave up a slot, or got work: the tie-break
    active: bool  # it has work, or had some within ACTIVE_LINGER seconds

    @property
    def cap(self) -> int:
        """The most slots it may hold (the workers its client asked for, within the capacity)."""
        ...

    def wants_slot(self) -> bool:
        """True if it has a queued task it could start with one more slot."""
        ...

    def take_slot(self, now: float) -> bool:
        """Start a queued task on an idle or new worker, which then holds a slot (calling
        :meth:`RunSlots.hold`). False if no worker process can be had yet: the process bound is
        reached and one is on its way out (the node grants again when it is reaped)."""
        ...

    def announce_share(self, share: int) -> None:
        """Its share is now ``share`` (at least 1): tell the client if that is news."""
        ...


def fair_shares(capacity: int, caps: Sequence[int]) -> list[int]:
    """Split ``capacity`` max-min fairly among claimants who each want at most ``caps[i]``.

    Claimants with small caps get all they want, the rest split what is left evenly; the
    remainder of an uneven split goes to the earliest claimants. A share may be 0 when there
    are more claimants than capacity."""
    count = len(caps)
    shares = [0] * count
    left = capacity
    order = sorted(range(count), key=lambda index: caps[index])
    for position, index in enumerate(order):
        share = min(caps[index], left // (count - position))
        shares[index] = share
        left -= share
    for index in range(count):
        if left <= 0:
            break
        if shares[index] < caps[index]:
            shares[index] += 1
            left -= 1
    return shares


class RunSlots:
    """The node-wide run slots and the sessions that share them. Single-threaded: the node's loop.

    Sessions :meth:`join` when they open and :meth:`leave` when they end; they :meth:`hold` a
    slot when they give a task to a worker that had none and :meth:`release` it when that
    worker's last task ends (or the worker dies). :meth:`grant` hands free slots out and is
    called after every event that may free a slot or queue work; :meth:`reshare` recomputes the
    shares after a session joins, leaves, or starts or stops having work."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.users: list[SlotUser] = []  # in order of arrival
        self.shares: dict[SlotUser, int] = {}  # fair shares (0 possible), as last computed

    # ------------------------------------------------------------------ sessions

    def join(self, user: SlotUser) -> None:
        """A session opened: it counts for the shares from now (it is about to have work)."""
        self.users.append(user)
        self.reshare()

    def leave(self, user: SlotUser, now: float) -> None:
        """A session ended: its slots (if its workers still held any) go to the others."""
        if user not in self.users:
            return
        self.users.remove(user)
        self.in_use -= user.held
        user.held = 0
        self.shares.pop(user, None)
        self.reshare()
        self.grant(now)

    def share(self, user: SlotUser) -> int:
        """The share a session is told: its fair part, at least 1."""
        return max(1, self.shares.get(user, 0))

    def reshare(self) -> None:
        """Recompute every session's share and tell each one whose share changed.

        A session without work is given the share it would get if it had some now."""
        active = [user for user in self.users if user.active]
        caps = [user.cap for user in active]
        shares = dict(zip(active, fair_shares(self.capacity, caps), strict=True))
        for user in self.users:
            if not user.active:
                shares[user] = fair_shares(self.capacity, [*caps, user.cap])[-1]
        self.shares = shares
        for user in self.users:
            user.announce_share(max(1, shares[user]))

    # ------------------------------------------------------------------ slots

    def hold(self, user: SlotUser) -> None:
        """``user`` gave a task to a worker that held no slot: it holds one now."""
        user.held += 1
        self.in_use += 1

    def release(self, user: SlotUser, now: float) -> None:
        """A worker of ``user`` ended its last task (or died): its slot is free."""
        user.held -= 1
        self.in_use -= 1
        user.waiting_since = now

    def grant(self, now: float) -> None:
        """Give every free slot to a session with queued work: the one holding the fewest slots,
        then the one that has waited longest."""
        users = self.users
        while self.in_use < self.capacity:
            best: SlotUser | None = None
            for user in users:
                if user.wants_slot() and (
                    best is None
                    or user.held < best.held
                    or (user.held == best.held and user.waiting_since < best.waiting_since)
                ):
                    best = user
            if best is None or not best.take_slot(now):
                return
            best.waiting_since = now

    def must_yield(self, user: SlotUser) -> bool:
        """True if ``user`` should let its workers' pipelines drain so that their slots free:
        another session waits for a slot with none at all, or with two fewer than ``user`` holds."""
        if len(self.users) == 1:
            return False  # alone on the node
        held = user.held
        for other in self.users:
            if other is not user and (other.held == 0 or other.held + 1 < held) and other.wants_slot():
                return True
        return False

    def describe(self) -> dict[str, object]:
        """The slots as the node's status reports them."""
        return {"capacity": self.capacity, "running": self.in_use, "sessions": len(self.users)}
