"""One link per named node: the workers each node is asked for, and the SSH nodes started first.

``ClusterExecutor`` calls :func:`remote_links` with the resolved node specs; SSH nodes are
started in parallel (each with a fresh key of its own), TCP nodes share the user's key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from clusterexec.client.link import NodeLink, SessionRequest
from clusterexec.keys import resolve_key
from clusterexec.launch.specs import NodeAddress, SshSpec
from clusterexec.wire.compression import check_codec


def remote_links(
    nodes: list[NodeAddress | SshSpec],
    key: str | bytes | None,
    key_file: str | os.PathLike[str] | None,
    max_workers: int | None,
    request: SessionRequest,
    connect_timeout: float,
    compression: str | None,
    closers: list[Callable[[], None]],
) -> list[NodeLink]:
    """One link per node; SSH nodes are started first (in parallel), each with its own key.

    What stops a started SSH node is appended to ``closers``. Raises the first error of an SSH
    start (after stopping the others), or a key error for TCP nodes without a usable key."""
    shares = spread(max_workers, len(nodes))
    tcp_key = resolve_key(key, key_file) if any(isinstance(n, NodeAddress) for n in nodes) else None
    ssh_specs = [n for n in nodes if isinstance(n, SshSpec)]
    started = _start_ssh_nodes(ssh_specs, shares, nodes, connect_timeout, closers)
    links = []
    for node, share in zip(nodes, shares, strict=True):
        if isinstance(node, SshSpec):
            ssh = started[node]
            codec = compression if ssh.options.compress is None else check_codec(ssh.options.compress)
            name = str(node)
            links.append(NodeLink(ssh.address, ssh.key, request, share, connect_timeout, name=name, compression=codec))
        else:
            links.append(NodeLink(node, tcp_key, request, share, connect_timeout, compression=compression))
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


def spread(total: int | None, count: int) -> list[int | None]:
    """Split ``total`` workers over ``count`` nodes (None: each node's own count)."""
    if total is None:
        return [None] * count
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) or 1 for i in range(count)]
