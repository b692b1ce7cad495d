"""``ex.check()``: every node's health report, asked of all nodes at once.

Each report says whether the node is up (and why not), its run slots, sessions and worker
processes, its Python version, and the packages the tasks so far referred to by name whose
version differs on the node from here.
"""

from __future__ import annotations

import time

from clusterexec.client.report import ClusterReport
from clusterexec.client.scheduler import Scheduler
from clusterexec.client.tasks import Reply
from clusterexec.code.versions import versions


def check_nodes(scheduler: Scheduler, timeout: float, packages: list[str]) -> ClusterReport:
    """Ask every node of ``scheduler`` for its status at once; a node that has not answered
    within ``timeout`` seconds is reported down. Blocks up to ``timeout``; thread-safe."""
    here = versions(packages)
    asked = []
    for link in list(scheduler.links):
        reply = Reply()
        reply.value = None
        scheduler.ask_status(link, reply, packages)
        asked.append((link, reply))
    deadline = time.monotonic() + timeout
    reports = []
    for link, reply in asked:
        reply.event.wait(max(0.0, deadline - time.monotonic()))
        reports.append(link.health(reply.value, here))
    return ClusterReport(reports)
