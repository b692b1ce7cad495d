"""The ``clusterexec`` command: argument parsing and output only (nothing imports this).

``clusterexec node ...`` runs a node (as ``python -m clusterexec.node``); ``clusterexec keygen
PATH`` writes a fresh key file with mode 0600.
"""

from __future__ import annotations

import argparse
import sys

from clusterexec import node
from clusterexec.errors import ClusterError
from clusterexec.keys import write_key_file


def _keygen(args: argparse.Namespace) -> int:
    try:
        path = write_key_file(args.path, force=args.force)
    except ClusterError as exc:
        print(f"clusterexec keygen: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a new key to {path} (mode 0600); copy it to every node and pass --key-file {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``clusterexec`` command."""
    parser = argparse.ArgumentParser(
        prog="clusterexec",
        description="Run and manage clusterexec nodes.",
        epilog="examples:\n  clusterexec keygen secret.key\n  clusterexec node --port 15809 --key-file secret.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser(
        "keygen",
        help="write a fresh random key file (mode 0600)",
        epilog="example: clusterexec keygen secret.key",
    )
    keygen.add_argument("path", help="where to write the key")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(run=_keygen)
    node_parser = commands.add_parser(
        "node",
        help="run a node (same as python -m clusterexec.node)",
        epilog="example: clusterexec node --port 15809 --workers 4 --key-file secret.key",
    )
    node.add_arguments(node_parser)
    node_parser.set_defaults(run=node.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clusterexec`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
