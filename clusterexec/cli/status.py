"""The output of ``clusterexec status``: the health table, package differences, JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from clusterexec.client.report import ClusterReport, NodeReport
from clusterexec.code.versions import describe_differences

STATUS_COLUMNS = ("NODE", "STATE", "WORKERS", "BUSY", "SESSIONS", "PROCS", "TASKS", "PYTHON", "CLUSTEREXEC", "UPTIME")
NUMERIC = {"WORKERS", "BUSY", "SESSIONS", "PROCS", "TASKS"}



def print_status(report: ClusterReport, as_json: bool, watching: float | None = None) -> None:
    """Print a status report: the table (and package differences) and a summary line, or JSON."""
    up = sum(1 for entry in report.nodes if entry.up)
    if as_json:
        document: dict[str, object] = {"all_up": report.all_up, "up": up, "total": len(report)}
        if watching is not None:
            document["time"] = round(time.time(), 3)
        document["nodes"] = [entry.as_dict() for entry in report.nodes]
        print(json.dumps(document), flush=True)
        return
    if watching is not None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  every {watching:g}s, Ctrl-C to stop\n")
    print(format_status_table(report.nodes))
    for entry in report.nodes:
        if entry.packages:
            print(f"{entry.address}: {describe_differences(entry.address, entry.packages)}")
    summary = f"all {len(report)} nodes up" if report.all_up else f"{up} of {len(report)} nodes up"
    print(summary if len(report) != 1 else ("1 node up" if up else "1 node down"), flush=True)


def format_status_table(reports: Sequence[NodeReport]) -> str:
    """The ``status`` table: one row per node, a down node's reason in place of its numbers,
    and under a node one line per client session: its share, queued and running tasks."""
    rows: list[tuple[str, ...]] = [STATUS_COLUMNS]
    below: dict[int, list[str]] = {}  # row index -> the session lines under it
    for entry in reports:
        if entry.up:
            below[len(rows)] = [
                f"  session {session.peer}: share {session.share}, {session.queued} queued, "
                f"{session.running} running, {session.processes} processes"
                for session in entry.sessions
            ]
            rows.append(
                (
                    entry.address,
                    "up",
                    str(entry.workers),
                    str(entry.busy),
                    str(len(entry.sessions)),
                    str(entry.processes),
                    str(entry.tasks_run),
                    entry.python,
                    entry.clusterexec,
                    format_duration(entry.uptime),
                )
            )
        else:
            rows.append((entry.address, "down", entry.reason))
    columns = len(STATUS_COLUMNS)
    widths = [max(len(row[i]) for row in rows if len(row) == columns or i < 2) for i in range(columns)]
    lines = []
    for index, row in enumerate(rows):
        if len(row) < len(STATUS_COLUMNS):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2]]
        else:
            cells = [
                cell.rjust(width) if name in NUMERIC else cell.ljust(width)
                for name, cell, width in zip(STATUS_COLUMNS, row, widths, strict=True)
            ]
        lines.append("  ".join(cells).rstrip())
        lines.extend(below.get(index, ()))
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """A duration in its two largest units: ``42s``, ``5m12s``, ``3h05m``, ``2d04h``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
