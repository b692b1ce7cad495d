"""The ``clusterexec`` command: argument parsing and output only (nothing imports this).

``clusterexec keygen PATH`` writes a fresh key file; ``clusterexec node ...`` runs a node (as
``python -m clusterexec.node``); ``clusterexec status NODES`` probes nodes and prints a health
table; ``clusterexec run NODES -- CMD`` runs a shell command on every node and prints the
outputs grouped by identical content, ClusterShell style. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TextIO

from clusterexec.cli.probe import DEFAULT_TIMEOUT, probe_all
from clusterexec.cli.shell import NodeOutcome, run_command
from clusterexec.client.report import ClusterReport, NodeReport
from clusterexec.errors import ClusterError
from clusterexec.keys import resolve_key, write_key_file
from clusterexec.launch import nodeset
from clusterexec.launch.specs import DEFAULT_PORT, NodeAddress, SshSpec, parse_address, resolve_nodes
from clusterexec.node import __main__ as node

if TYPE_CHECKING:
    import ssl

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
WATCH_INTERVAL = 2.0
KEY_HELP = "shared key file (default: $CLUSTEREXEC_KEY, then $CLUSTEREXEC_KEY_FILE)"
NODES_HELP = "nodes: host[:port], [ipv6]:port, node sets such as 'green[36-39]:15809' or 'slurm'"


class UsageError(Exception):
    """A command line that cannot be acted on; the message says what to fix."""


# --------------------------------------------------------------------------- keygen


def _keygen(args: argparse.Namespace) -> int:
    path = write_key_file(args.path, force=args.force)
    print(f"wrote a new key to {path} (mode 0600); copy it to every node and pass --key-file {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- shared by status and run


def _targets(args: argparse.Namespace) -> tuple[list[NodeAddress | SshSpec], bytes | None]:
    """The nodes named on the command line and the key; raises ClusterError or UsageError."""
    key = resolve_key(key_file=args.key_file)
    nodes = resolve_nodes(args.nodes, port=args.port)
    for name in ("timeout", "connect_timeout", "watch"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be more than 0 seconds")
    return nodes, key


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context of ``--tls-ca``/``--tls-cert``/``--tls-key``, or None (no TLS).

    As the executor's ``ssl_context=``: the node's certificate is checked against ``--tls-ca``
    (else the system's CAs) and its host name; ``--tls-cert`` is this client's certificate, for
    a node started with ``--tls-ca``. Raises UsageError for an unreadable file."""
    if not (args.tls_ca or args.tls_cert):
        if args.tls_key:
            raise UsageError("--tls-key needs --tls-cert (the client certificate it belongs to)")
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use --tls-ca {args.tls_ca}: {exc}; give a PEM file of CA certificates") from None
    if args.tls_cert:
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot use --tls-cert {args.tls_cert}: {exc}; give a PEM certificate and its key (--tls-key)"
            ) from None
    return context


def _tcp_only(nodes: Sequence[NodeAddress | SshSpec]) -> list[NodeAddress]:
    for spec in nodes:
        if isinstance(spec, SshSpec):
            raise UsageError(
                f"{spec} is an SSH node, which an executor starts on demand: status probes running "
                "nodes, so give their TCP address (host:port)"
            )
    return [spec for spec in nodes if isinstance(spec, NodeAddress)]


def fold_nodes(names: Iterable[str], show_ports: bool = True) -> str:
    """Node names (``host:port``) as a node set: ``green[36-37,39]:15809``.

    Host names that share a port fold into one node set, each part followed by that port
    (or not, if ``show_ports`` is false). IPv6 literals and names that are not ``host:port``
    stay as they are. With ports shown, the result is itself a valid NODES argument.
    """
    groups: dict[int | str, list[str]] = {}
    for name in names:
        try:
            address: NodeAddress | None = parse_address(name)
        except ClusterError:
            address = None
        if address is None or ":" in address.host:
            text = name if show_ports or address is None else f"[{address.host}]"
            groups.setdefault(name, []).append(text)
        else:
            groups.setdefault(address.port, []).append(address.host)
    parts: list[str] = []
    for port, hosts in groups.items():
        if isinstance(port, str):
            parts.extend(hosts)
            continue
        try:
            folded = [text for _, text in nodeset.split(nodeset.fold(hosts))]
        except ClusterError:
            folded = hosts
        parts.extend(f"{text}:{port}" if show_ports else text for text in folded)
    return ",".join(parts)


# --------------------------------------------------------------------------- status

STATUS_COLUMNS = ("NODE", "STATE", "WORKERS", "BUSY", "SESSIONS", "PROCS", "TASKS", "PYTHON", "CLUSTEREXEC", "UPTIME")
NUMERIC = {"WORKERS", "BUSY", "SESSIONS", "PROCS", "TASKS"}


def _status(args: argparse.Namespace) -> int:
    nodes, key = _targets(args)
    addresses = _tcp_only(nodes)
    tls = _tls_context(args)
    if args.watch is None:
        report = probe_all(addresses, key, args.timeout, tls)
        _print_status(report, args.json)
        return EXIT_OK if report.all_up else EXIT_FAILED
    clear = sys.stdout.isatty() and not args.json
    try:
        while True:
            started = time.monotonic()
            report = probe_all(addresses, key, args.timeout, tls)
            if clear:
                sys.stdout.write("\033[H\033[2J")
            _print_status(report, args.json, watching=args.watch)
            time.sleep(max(0.0, args.watch - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how --watch ends


def _print_status(report: ClusterReport, as_json: bool, watching: float | None = None) -> None:
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


# --------------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    if not args.words:
        raise UsageError("give the command after --, as in: clusterexec run NODES -- COMMAND [ARGS...]")
    command = " ".join(args.words)  # as ssh does: the words, joined, are run by the node's /bin/sh
    nodes, key = _targets(args)
    done = run_command(nodes, key, command, args.timeout, args.connect_timeout, _tls_context(args))
    if args.json:
        print(json.dumps({"command": command, "ok": done.ok, "nodes": [o.as_dict() for o in done.outcomes]}))
    else:
        _print_outcomes(done.outcomes, args.port)
    status = EXIT_OK if done.ok else EXIT_FAILED
    if done.abandoned:
        # The executor's exit handler would wait for the task that never answered: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _print_outcomes(outcomes: Sequence[NodeOutcome], default_port: int) -> None:
    """Outputs grouped by identical content, each line prefixed by its folded node set:
    stdout to stdout, stderr to stderr, then which nodes failed or were down and why."""
    ports = {_port_of(o.node) for o in outcomes}
    show_ports = ports != {default_port}

    def fold(group: list[NodeOutcome]) -> str:
        return fold_nodes((o.node for o in group), show_ports)

    with_result = [o for o in outcomes if o.result is not None]
    for stream, pick in ((sys.stdout, _stdout_of), (sys.stderr, _stderr_of)):
        for text, group in _group(with_result, pick):
            if text:
                prefix = fold(group)
                stream.write("".join(f"{prefix}: {line}\n" for line in text.rstrip("\n").split("\n")))
        stream.flush()
    bad = [o for o in outcomes if o.state != "ok"]
    for why, group in _group(bad, _problem_of):
        print(f"clusterexec run: {fold(group)}: {why}", file=sys.stderr)
    if bad:
        print(f"clusterexec run: {len(bad)} of {len(outcomes)} nodes failed or were down", file=sys.stderr)


def _group(outcomes: Iterable[NodeOutcome], key: Callable[[NodeOutcome], str]) -> list[tuple[str, list[NodeOutcome]]]:
    groups: dict[str, list[NodeOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault(key(outcome), []).append(outcome)
    return list(groups.items())


def _stdout_of(outcome: NodeOutcome) -> str:
    return _text(outcome.result.stdout) if outcome.result else ""


def _stderr_of(outcome: NodeOutcome) -> str:
    return _text(outcome.result.stderr) if outcome.result else ""


def _problem_of(outcome: NodeOutcome) -> str:
    if outcome.state == "down":
        return f"down: {outcome.problem}"
    return outcome.problem or (outcome.result.describe() if outcome.result else "")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _port_of(name: str) -> int | None:
    try:
        return parse_address(name).port
    except ClusterError:
        return None


# --------------------------------------------------------------------------- parser

STATUS_DESCRIPTION = """\
Ask every node, in parallel, for its health report (no session is opened, no worker
started) and print one row per node: up or down and why, workers, busy workers, tasks run,
Python and clusterexec versions, uptime."""

RUN_DESCRIPTION = """\
Run a shell command on every node in parallel, one worker per node: the words after -- are
joined with spaces and run by /bin/sh on the node, as ssh does. Print the outputs grouped by
identical content, then the nodes where the command failed and the nodes that were down."""

MAIN_EXAMPLES = """\
examples:
  clusterexec keygen secret.key
  clusterexec node --host 0.0.0.0 --port 15809 --key-file secret.key
  clusterexec status 'green[36-39]' -k secret.key
  clusterexec run 'green[36-39]' -k secret.key -- uname -r

exit status: 0 success, 1 a node is down or a command failed, 2 usage error"""

KEYGEN_EXAMPLES = """\
example:
  clusterexec keygen secret.key      # then copy secret.key to every node (mode 0600)"""

NODE_EXAMPLES = """\
examples:
  clusterexec node --port 15809 --workers 4 --key-file secret.key
  clusterexec node --host 0.0.0.0 --key-file /etc/clusterexec/secret.key --log-level INFO
  clusterexec node --host 0.0.0.0 --key-file /etc/clusterexec/secret.key --print-systemd-unit \\
      | sudo tee /etc/systemd/system/clusterexec-node.service
  sudo systemctl daemon-reload && sudo systemctl enable --now clusterexec-node"""

STATUS_EXAMPLES = """\
examples:
  clusterexec status 'green[36-39]' gpu01:16000 -k secret.key
  clusterexec status 'green[36-39]' -k secret.key --json | jq '.nodes[] | select(.up | not)'
  clusterexec status 'green[36-39]' -k secret.key --watch 5      # Ctrl-C to stop
  clusterexec status 'green[36-39]' -k secret.key --tls-ca ca.pem  # nodes run with --tls-cert

exit status: 0 if every node is up, 1 if any is down, 2 for a usage error"""

RUN_EXAMPLES = """\
examples:
  clusterexec run 'green[36-39]' -k secret.key -- uname -r
  clusterexec run 'green[36-39]' -k secret.key --timeout 30 -- 'df -h /tmp | tail -1'
  clusterexec run slurm -k secret.key --json -- nproc

Each line of output is prefixed by the folded set of nodes that printed exactly that output
(green[36-37,39]: 6.1.0). Ports are shown unless every node listens on --port.

exit status: 0 if the command succeeded on every node, 1 if it failed on any or any node was
down, 2 for a usage error"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("nodes", nargs="+", metavar="NODES", help=NODES_HELP)
    parser.add_argument("-k", "--key-file", help=KEY_HELP)
    parser.add_argument(
        "-p",
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of nodes named without one (default: {DEFAULT_PORT})",
    )
    tls = parser.add_argument_group("TLS, for nodes started with --tls-cert")
    tls.add_argument("--tls-ca", metavar="FILE", help="speak TLS; trust node certificates signed by FILE (PEM)")
    tls.add_argument("--tls-cert", metavar="FILE", help="speak TLS, with this client certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (default: in the certificate file)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``clusterexec`` command."""
    parser = argparse.ArgumentParser(
        prog="clusterexec",
        description="Run, check and use clusterexec nodes.",
        epilog=MAIN_EXAMPLES,
        formatter_class=_formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser(
        "keygen", help="write a fresh random key file (mode 0600)", epilog=KEYGEN_EXAMPLES, formatter_class=_formatter
    )
    keygen.add_argument("path", help="where to write the key")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(run=_keygen)

    node_parser = commands.add_parser(
        "node",
        help="run a node (same as python -m clusterexec.node)",
        description="Run a clusterexec node: clients connect and run tasks on its worker processes.",
        epilog=NODE_EXAMPLES,
        formatter_class=_formatter,
    )
    node.add_arguments(node_parser)
    node_parser.set_defaults(run=node.run)

    status = commands.add_parser(
        "status",
        help="probe nodes and print a health table",
        description=STATUS_DESCRIPTION,
        epilog=STATUS_EXAMPLES,
        formatter_class=_formatter,
    )
    _add_target_arguments(status)
    status.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for each node (default: {DEFAULT_TIMEOUT:g})",
    )
    status.add_argument("--json", action="store_true", help="print JSON (one line per refresh with --watch)")
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=WATCH_INTERVAL,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default: {WATCH_INTERVAL:g}) until Ctrl-C; put it after NODES",
    )
    status.set_defaults(run=_status)

    run = commands.add_parser(
        "run",
        help="run a shell command on every node and group identical outputs",
        usage="clusterexec run [options] NODES [NODES ...] -- COMMAND [ARGS ...]",
        description=RUN_DESCRIPTION,
        epilog=RUN_EXAMPLES,
        formatter_class=_formatter,
    )
    _add_target_arguments(run)
    run.add_argument("--timeout", type=float, metavar="S", help="kill the command after S seconds (default: no limit)")
    run.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for each node to answer (default: {DEFAULT_TIMEOUT:g})",
    )
    run.add_argument("--json", action="store_true", help="print every node's outcome as JSON")
    run.set_defaults(run=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clusterexec`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        split = argv.index("--")
        argv, words = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.words = words
    try:
        return int(args.run(args))
    except (UsageError, ClusterError) as exc:
        _say(sys.stderr, f"clusterexec {args.command}: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(sys.stderr, f"clusterexec {args.command}: interrupted")
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)  # without waiting for the tasks still running on the nodes
    except BrokenPipeError:
        # The reader went away (`| head`): exit quietly, and keep Python from complaining
        # about stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _say(stream: TextIO, text: str) -> None:
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
