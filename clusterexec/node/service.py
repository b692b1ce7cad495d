"""``--print-systemd-unit``: a systemd unit that runs a node with the same options at boot."""

from __future__ import annotations

import argparse
import os
import pwd
import sys

from clusterexec.keys import KEY_ENV, KEY_FILE_ENV
from clusterexec.node.host import WORKER_IDLE_TIMEOUT
from clusterexec.node.server import CLIENT_TIMEOUT
from clusterexec.wire.frames import DEFAULT_MAX_FRAME
from clusterexec.wire.handshake import HANDSHAKE_TIMEOUT

EXIT_USAGE = 2


def print_systemd_unit(args: argparse.Namespace) -> int:
    """Print a systemd unit running this node with the same options; return the exit status.

    The key must come from a file (``--key-file`` or $CLUSTEREXEC_KEY_FILE), named by its
    absolute path: a unit file is world-readable, so a key from $CLUSTEREXEC_KEY is refused.
    """
    key_file = args.key_file or (None if os.environ.get(KEY_ENV) else os.environ.get(KEY_FILE_ENV))
    if key_file is None and os.environ.get(KEY_ENV):
        print(
            f"clusterexec node: the key comes from ${KEY_ENV}, which a unit file (readable by all) must not "
            "hold; write it to a file (`clusterexec keygen PATH`) and pass --key-file PATH",
            file=sys.stderr,
        )
        return EXIT_USAGE
    command = [os.path.abspath(sys.executable), "-m", "clusterexec.node", "--host", args.host, "--port", str(args.port)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if args.max_sessions:
        command += ["--max-sessions", str(args.max_sessions)]
    if args.max_processes:
        command += ["--max-processes", str(args.max_processes)]
    if args.worker_idle_timeout != WORKER_IDLE_TIMEOUT:
        command += ["--worker-idle-timeout", f"{args.worker_idle_timeout:g}"]
    if key_file:
        command += ["--key-file", os.path.abspath(key_file)]
    if args.max_frame != DEFAULT_MAX_FRAME:
        command += ["--max-frame", str(args.max_frame)]
    if args.handshake_timeout != HANDSHAKE_TIMEOUT:
        command += ["--handshake-timeout", str(args.handshake_timeout)]
    if args.client_timeout != CLIENT_TIMEOUT:
        command += ["--client-timeout", str(args.client_timeout)]
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-ca", args.tls_ca)):
        if path:
            command += [flag, os.path.abspath(path)]
    if args.insecure_no_auth:
        command.append("--insecure-no-auth")
    command += ["--quiet"] if args.quiet else ["--log-level", args.log_level.upper()]
    user = pwd.getpwuid(os.getuid()).pw_name
    print(
        SYSTEMD_UNIT.format(
            host=args.host,
            port=args.port,
            user=user,
            command=" ".join(_systemd_quote(word) for word in command),
        ),
        end="",
    )
    return 0


SYSTEMD_UNIT = """\
# Written by `clusterexec node --print-systemd-unit`. Install with:
#   ... --print-systemd-unit | sudo tee /etc/systemd/system/clusterexec-node.service
#   sudo systemctl daemon-reload && sudo systemctl enable --now clusterexec-node
[Unit]
Description=clusterexec node on {host}:{port}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
# Clients of this node run code as this user: prefer an unprivileged account.
User={user}
ExecStart={command}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def _systemd_quote(word: str) -> str:
    """One ExecStart word, quoted for systemd (which expands %specifiers and $VARIABLES)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and all(c.isalnum() or c in "/._-:=+,@%$" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
