"""How an executor gets its nodes: named ones (TCP and SSH), a Slurm allocation's, a Slurm job's.

Each function returns the :class:`~clusterexec.client.link.NodeLink` objects the scheduler
starts with and appends to ``closers`` what stops the nodes it started. ``from_slurm`` builds
an executor on the first node of a submitted job and adds the others as they come up.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from clusterexec.client.link import NodeLink, SessionRequest
from clusterexec.errors import NodeUnreachableError
from clusterexec.keys import new_key, resolve_key
from clusterexec.launch.sbatch import SlurmJob
from clusterexec.launch.specs import NodeAddress, SshSpec
from clusterexec.launch.srun import SrunNodes, allocation_hosts
from clusterexec.wire.compression import check_codec

SLURM_START_TIMEOUT = 120.0


class JoinableExecutor(Protocol):
    """What from_slurm needs of the executor it builds: adding nodes, and stopping them at the end."""

    def _add_node(self, address: NodeAddress, key: bytes) -> None: ...

    def _stop_with(self, close: Callable[[], None]) -> None: ...


E = TypeVar("E", bound=JoinableExecutor)


def spread(total: int | None, count: int) -> list[int | None]:
    """Split ``total`` workers over ``count`` nodes (None: each node's own count)."""
    if total is None:
        return [None] * count
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) or 1 for i in range(count)]


def is_slurm_start(nodes: object) -> bool:
    """True for ``nodes="slurm"``: start nodes on the allocation's hosts (``"slurm:PORT"`` connects)."""
    return isinstance(nodes, str) and nodes.strip() == "slurm"


def remote_links(
    nodes: list[NodeAddress | SshSpec],
    key: bytes | None,
    max_workers: int | None,
    request: SessionRequest,
    connect_timeout: float,
    compression: str | None,
    closers: list[Callable[[], None]],
) -> list[NodeLink]:
    """One link per node; SSH nodes are started first (in parallel), each with its own key."""
    shares = spread(max_workers, len(nodes))
    started = _start_ssh_nodes([n for n in nodes if isinstance(n, SshSpec)], shares, nodes, connect_timeout, closers)
    links = []
    for node, share in zip(nodes, shares, strict=True):
        if isinstance(node, SshSpec):
            ssh = started[node]
            codec = compression if ssh.options.compress is None else check_codec(ssh.options.compress)
            name = str(node)
            links.append(NodeLink(ssh.address, ssh.key, request, share, connect_timeout, name=name, compression=codec))
        else:
            links.append(NodeLink(node, key, request, share, connect_timeout, compression=compression))
    return links


def _start_ssh_nodes(
    specs: list[SshSpec],
    shares: list[int | None],
    nodes: list[Any],
    connect_timeout: float,
    closers: list[Callable[[], None]],
) -> dict[SshSpec, Any]:
    if not specs:
        return {}
    from clusterexec.launch.ssh import SshNode

    started: dict[SshSpec, Any] = {}
    errors: list[BaseException] = []

    def start(spec: SshSpec) -> None:
        try:
            started[spec] = SshNode(spec, shares[nodes.index(spec)], connect_timeout)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(spec,), daemon=True) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    closers.extend(node.stop for node in started.values())
    if errors:
        for close in closers:
            close()
        raise errors[0]
    return started


def allocation_links(
    key: bytes | None,
    max_workers: int | None,
    request: SessionRequest,
    connect_timeout: float,
    compression: str | None,
    closers: list[Callable[[], None]],
) -> list[NodeLink]:
    """``nodes="slurm"``: one node per host of this Slurm allocation, started with srun with a
    fresh key (or ``key``), each ready before this returns (at most 120 s). Raises
    ConfigurationError outside an allocation, NodeUnreachableError if the nodes do not start."""
    hosts = allocation_hosts()
    key = key or new_key().encode()
    nodes = SrunNodes(len(hosts), key)
    ready = nodes.wait_all(SLURM_START_TIMEOUT)
    closers.append(nodes.stop)
    shares = spread(max_workers, len(ready))
    return [
        NodeLink(node.address, key, request, share, connect_timeout, compression=compression)
        for node, share in zip(ready, shares, strict=True)
    ]


def from_slurm(
    cls: Callable[..., E],
    nodes: int,
    time: str | None,
    partition: str | None,
    client_address: str | None,
    python: str | None,
    start_timeout: float | None,
    options: dict[str, Any],
) -> E:
    """See :meth:`ClusterExecutor.from_slurm`: submit, wait for the first node, build the
    executor on it, and add the others from a thread as their ready lines arrive."""
    parameters = inspect.signature(cls).parameters
    executor_options = {name: options.pop(name) for name in list(options) if name in parameters}
    if "max_workers" in executor_options or "nodes" in executor_options:
        raise TypeError(
            "from_slurm takes the number of hosts as nodes= and no max_workers: each node runs one worker "
            "per CPU Slurm gives it (ask for more with cpus_per_task=N or exclusive=True)"
        )
    key = resolve_key(executor_options.pop("key", None), executor_options.pop("key_file", None))
    key = key or new_key().encode()
    job = SlurmJob(
        nodes, key, time=time, partition=partition, options=options, client_address=client_address,
        python=python or sys.executable,
    )
    try:
        try:
            first = job.ready.next(start_timeout)
        except TimeoutError:
            raise NodeUnreachableError(
                f"Slurm job {job.job_id} had no node ready within {start_timeout:g}s (see `squeue -j "
                f"{job.job_id}`: it may still be waiting for resources); it was cancelled"
            ) from None
        if first is None:
            raise NodeUnreachableError(job.describe_end())
        executor = cls([first.address], key=key, **executor_options)
    except BaseException:
        job.cancel()
        raise
    executor._stop_with(job.cancel)
    thread = threading.Thread(
        target=_add_later_nodes, args=(weakref.ref(executor), job), name=f"clusterexec-job-{job.job_id}", daemon=True
    )
    thread.start()
    return executor


def _add_later_nodes(executor_ref: weakref.ref[JoinableExecutor], job: SlurmJob) -> None:
    """Add each node of the job that comes up after the first, until the job's stream ends."""
    while (node := job.ready.next(None)) is not None:
        executor = executor_ref()
        if executor is None:
            return
        executor._add_node(node.address, job.key)
        del executor
