"""What the executor reports about its nodes: plain data, for ``ex.nodes``, ``ex.stats()``
and ``ex.check()`` (and the ``clusterexec status`` command)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clusterexec.code.versions import differences


@dataclass(frozen=True)
class NodeStatus:
    """One node as the executor sees it now.

    ``state`` is one of ``connecting``, ``handshaking``, ``opening session``, ``ready``, ``lost``,
    ``closed``; ``error`` says why a lost node was lost.
    """

    address: str
    state: str
    workers: int
    in_flight: int
    tasks_done: int
    error: str | None = None
    python: str = ""

    def __str__(self) -> str:
        why = f" ({self.error})" if self.error else ""
        return f"{self.address}: {self.state}{why}, {self.workers} workers, {self.in_flight} tasks in flight"


@dataclass(frozen=True)
class NodeStats:
    """Task counts of one node: waiting on the node, running, done, failed."""

    queued: int = 0
    in_flight: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True)
class ClusterStats:
    """Task counts: ``queued`` in the client not yet given to a node, then per node.

    ``reruns``: tasks sent again after the node running them was lost. ``late_results``:
    results that arrived for a task no longer in flight on that node (already re-run, or
    cancelled), dropped rather than delivered twice."""

    queued: int
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    reruns: int = 0
    late_results: int = 0


@dataclass(frozen=True)
class SessionReport:
    """One client session on a node: the client's address, its share of the node's run slots,
    its tasks queued on the node and running there, and its worker processes."""

    peer: str
    share: int = 0
    queued: int = 0
    running: int = 0
    processes: int = 0


@dataclass(frozen=True)
class NodeReport:
    """A health check of one node: up or down and why, and what the node says of itself:
    its run slots (``workers``) and how many are busy, its worker processes (all sessions
    together) and each client session. ``python`` is the node's Python version; ``packages``
    names each package the client's tasks referred to whose version differs on the node:
    ``{name: (here, there)}``."""

    address: str
    up: bool
    reason: str = ""
    workers: int = 0
    busy: int = 0
    tasks_run: int = 0
    python: str = ""
    clusterexec: str = ""
    uptime: float = 0.0
    packages: dict[str, tuple[str, str]] = field(default_factory=dict)
    processes: int = 0
    sessions: list[SessionReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """The report as plain data (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class ClusterReport:
    """The result of ``ex.check()``: every node's report and whether all are up."""

    nodes: list[NodeReport]

    @property
    def all_up(self) -> bool:
        """True if every node answered."""
        return all(node.up for node in self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


def report_from_status(address: str, info: dict[str, object], here: dict[str, str] | None = None) -> NodeReport:
    """A :class:`NodeReport` of an up node from its STATUS reply (missing fields are zero);
    ``here``: the client's package versions, compared with the node's."""
    there = info.get("packages")
    differ = differences(here, there) if here and isinstance(there, dict) else {}

    def number(name: str) -> float:
        value = info.get(name, 0)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    sessions = []
    listed = info.get("session_list")
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict):
            counts = {name: entry.get(name) for name in ("share", "queued", "running", "processes")}
            sessions.append(
                SessionReport(
                    str(entry.get("peer", "")),
                    **{name: value if isinstance(value, int) else 0 for name, value in counts.items()},
                )
            )
    return NodeReport(
        address,
        True,
        "",
        workers=int(number("workers")),
        busy=int(number("busy")),
        tasks_run=int(number("tasks_run")),
        python=str(info.get("python", "")),
        clusterexec=str(info.get("clusterexec", "")),
        uptime=float(number("uptime")),
        packages=differ,
        processes=int(number("processes")),
        sessions=sessions,
    )
