"""Remote nodes: start two nodes with a shared key file, run tasks on both, stop them.

Run it from the repository root::

    python examples/remote_nodes.py

On real machines you would run, once::

    clusterexec keygen secret.key                      # copy secret.key to every machine, mode 0600

and on each worker machine::

    python -m clusterexec.node --host 0.0.0.0 --port 15809 --key-file secret.key

then pass their addresses to ``ClusterExecutor``. This script does all of it on loopback with
``--port 0`` (a free port each), reading each node's address from the line it prints when ready:
``clusterexec node listening on HOST:PORT (W workers)``.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from clusterexec import AuthenticationError, ClusterExecutor

READY = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")


def start_node(key_file: Path, workers: int) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m clusterexec.node`` on a free loopback port; return it and its address."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTEREXEC_KEY", "CLUSTEREXEC_KEY_FILE")}
    command = [sys.executable, "-m", "clusterexec.node", "--port", "0", "--workers", str(workers)]
    process = subprocess.Popen(
        [*command, "--key-file", str(key_file)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the node is listening (or has exited)
    match = READY.search(line)
    if match is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"the node did not start (exit status {process.poll()}): {line!r}")
    host, port = match.group(1), match.group(2)  # an IPv6 host is printed as [addr]
    print(f"started node pid {process.pid} on {host}:{port} ({match.group(3)} workers)")
    return process, f"{host}:{port}"


def stop_node(process: subprocess.Popen[str]) -> None:
    """Stop a node with SIGTERM (it ends its sessions and workers), SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def which_node(x: int) -> tuple[int, int]:
    """Return ``x * x`` and the pid of the node that ran it (a worker's parent is its node)."""
    return x * x, os.getppid()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "secret.key"
        # The same as `clusterexec keygen secret.key`: 64 random hex digits, mode 0600.
        subprocess.run([sys.executable, "-m", "clusterexec", "keygen", str(key_file)], check=True)
        nodes = [start_node(key_file, workers=2) for _ in range(2)]
        try:
            addresses = [address for _, address in nodes]
            names = {process.pid: address for process, address in nodes}
            with ClusterExecutor(addresses, key_file=key_file) as ex:
                results = list(ex.map(which_node, range(40)))
                print(f"sum of squares of 0..39: {sum(square for square, _ in results)}")
                per_node = collections.Counter(names.get(pid, f"pid {pid}") for _, pid in results)
                for address, count in sorted(per_node.items()):
                    print(f"  {count} tasks ran on {address}")

            # A client with another key is refused during the handshake; nothing runs. (The node
            # logs the refusal on its stderr, and so does the client's "clusterexec" logger.)
            try:
                ClusterExecutor(addresses[:1], key=os.urandom(32).hex(), connect_timeout=5)
            except AuthenticationError as exc:
                print(f"a wrong key is refused: {type(exc).__name__}: {exc}")
        finally:
            for process, _ in nodes:
                stop_node(process)
        print("nodes stopped")


if __name__ == "__main__":
    main()
