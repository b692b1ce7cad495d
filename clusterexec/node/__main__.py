"""``python -m clusterexec.node``: the node's command line (also ``clusterexec node``).

``python -m clusterexec.node --port 15809 --workers 4 --key-file secret.key``
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from clusterexec.errors import ClusterError
from clusterexec.keys import resolve_key
from clusterexec.node.host import WORKER_IDLE_TIMEOUT
from clusterexec.node.server import CLIENT_TIMEOUT, Node, NodeConfig, is_loopback
from clusterexec.node.service import print_systemd_unit
from clusterexec.wire.frames import DEFAULT_MAX_FRAME
from clusterexec.wire.handshake import HANDSHAKE_TIMEOUT

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The node's command-line options (shared with ``clusterexec node``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=15809, help="TCP port (default: 15809; 0 picks a free one)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tasks the node runs at once, shared fairly by all its clients (default: CPUs)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=0,
        help="most clients served at once; one more is refused with an error saying the node is full "
        "(default: 0, no limit)",
    )
    parser.add_argument(
        "--max-processes",
        type=int,
        default=0,
        help="most worker processes on the node, all clients together; at least --workers "
        "(default: 2 x workers, and at least workers + 4)",
    )
    parser.add_argument(
        "--worker-idle-timeout",
        type=float,
        default=WORKER_IDLE_TIMEOUT,
        help="seconds a worker process may stay idle before it exits; it is started again on demand "
        f"(default: {WORKER_IDLE_TIMEOUT:g}; 0: never)",
    )
    parser.add_argument("--key-file", help="shared key file (or set CLUSTEREXEC_KEY)")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME, help="largest frame accepted, bytes")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT,
        help=f"seconds a new connection has to authenticate (default: {HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow listening on a non-loopback address without a key (anyone who can connect runs code)",
    )
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=CLIENT_TIMEOUT,
        help=f"seconds of silence after which a client's session ends and its workers are freed "
        f"(clients ping every second; default: {CLIENT_TIMEOUT:g})",
    )
    parser.add_argument("--tls-cert", help="TLS certificate (PEM) for the node: clients must connect with TLS")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert (default: in the certificate file)")
    parser.add_argument("--tls-ca", help="CA bundle (PEM): require client certificates signed by it")
    parser.add_argument(
        "--key-stdin",
        action="store_true",
        help="read the key from the first line of stdin (keeps it off the command line and out of files)",
    )
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (default: INFO, one line per session start and end)"
    )
    parser.add_argument("--quiet", action="store_true", help="log errors only (overrides --log-level)")
    parser.add_argument(
        "--print-systemd-unit",
        action="store_true",
        help="print a systemd unit that runs this node (same options) at boot, and exit",
    )


def read_key_line(fd: int) -> bytes:
    """The first line of ``fd``, read a byte at a time so that nothing after it is consumed (with
    ``--exit-with-stdin`` the rest of stdin is the lifeline). Raises ClusterError at end of file."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            if line:
                break
            raise ClusterError("--key-stdin: stdin ended before a key line arrived; write the key and a newline")
        line += byte
    return bytes(line)


def run(args: argparse.Namespace) -> int:
    """Start a node from parsed arguments; return the exit status."""
    level = "ERROR" if args.quiet else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.key_stdin:
            if args.key_file:
                raise ClusterError("pass either --key-file or --key-stdin, not both")
            key = resolve_key(key=read_key_line(sys.stdin.fileno()))
        else:
            key = resolve_key(key_file=args.key_file)
    except ClusterError as exc:
        print(f"clusterexec node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.client_timeout <= 0:
        print("clusterexec node: --client-timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 0:
        print("clusterexec node: --workers must be 0 (one per CPU) or more", file=sys.stderr)
        return EXIT_USAGE
    if args.max_sessions < 0 or args.max_processes < 0 or args.worker_idle_timeout < 0:
        print(
            "clusterexec node: --max-sessions, --max-processes and --worker-idle-timeout must be 0 or more",
            file=sys.stderr,
        )
        return EXIT_USAGE
    slots = args.workers or os.cpu_count() or 1
    if args.max_processes and args.max_processes < slots:
        print(
            f"clusterexec node: --max-processes {args.max_processes} is below the node's {slots} run slots "
            "(--workers): each running task needs a process; raise --max-processes or lower --workers",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if key is None and not is_loopback(args.host) and not args.insecure_no_auth:
        print(
            f"clusterexec node: refusing to listen on {args.host} without a key; pass --key-file "
            "(see `clusterexec keygen`) or, to accept anyone who can connect, --insecure-no-auth",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.print_systemd_unit:
        return print_systemd_unit(args)
    tls = None
    if args.tls_cert:
        import ssl

        try:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
            if args.tls_ca:
                tls.load_verify_locations(args.tls_ca)
                tls.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            print(f"clusterexec node: cannot use --tls-cert {args.tls_cert}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    elif args.tls_key or args.tls_ca:
        print("clusterexec node: --tls-key and --tls-ca need --tls-cert", file=sys.stderr)
        return EXIT_USAGE
    config = NodeConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_sessions=args.max_sessions,
        max_processes=args.max_processes,
        worker_idle_timeout=args.worker_idle_timeout,
        key=key,
        max_frame=args.max_frame,
        handshake_timeout=args.handshake_timeout,
        tls=tls,
        insecure_no_auth=args.insecure_no_auth,
        exit_with_stdin=args.exit_with_stdin,
        client_timeout=args.client_timeout,
    )
    try:
        node = Node(config)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        print(f"clusterexec node: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    host, port = node.address[0], node.address[1]
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        line = f"clusterexec node listening on {shown}:{port} ({node.workers_per_session} workers)"
        if args.ready_fd is None:
            print(line, flush=True)
            return
        # A local node started by an executor: the ready line goes to the executor on its own
        # pipe, and stdout stays the executor's, so what tasks print shows up there.
        with os.fdopen(args.ready_fd, "w") as ready_pipe:
            ready_pipe.write(line + "\n")

    node.serve_forever(ready)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m clusterexec.node``."""
    parser = argparse.ArgumentParser(
        prog="python -m clusterexec.node",
        description="Run a clusterexec node: clients connect and run tasks on its worker processes.",
        epilog="example: python -m clusterexec.node --port 15809 --workers 4 --key-file secret.key",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
