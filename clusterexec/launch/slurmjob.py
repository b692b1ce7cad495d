"""The helper processes of ``ClusterExecutor.from_slurm``: the job's relay and the client's watchdog.

``python -m clusterexec.launch.slurmjob relay HOST PORT`` is the batch script of the job. It
connects back to the client's rendezvous socket, proves it holds the key (an HMAC of the
client's nonce), starts the nodes with srun (the key on their stdin) and forwards their ready
lines. When the client closes the connection (shutdown, or the client died and its kernel
closed the socket) it stops the nodes and the job ends.

``python -m clusterexec.launch.slurmjob watch JOBID`` runs beside the client on the login node,
in its own session, reading a pipe from the client: when the pipe ends, however the client
ended, it runs ``scancel JOBID``. This also cancels a job still waiting in the queue.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import threading

from clusterexec.errors import ClusterError
from clusterexec.keys import KEY_ENV
from clusterexec.launch.srun import SrunNodes

NONCE_SIZE = 32
PROOF_TAG = b"clusterexec slurm job relay\0"
CONNECT_TIMEOUT = 60.0
# What the client writes to its watchdog when the job ended by itself (no scancel needed).
WATCH_DONE = b"done\n"


def proof(key: bytes, nonce: bytes) -> bytes:
    """What the relay sends to show it holds ``key``: HMAC-SHA256 over a tag and the client's nonce."""
    return hmac.new(key, PROOF_TAG + nonce, hashlib.sha256).digest()


def ready_line(host: str, port: int, workers: int) -> bytes:
    """A node's ready line, as the node prints it and the client parses it."""
    shown = f"[{host}]" if ":" in host else host
    return f"clusterexec node listening on {shown}:{port} ({workers} workers)\n".encode()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection during the handshake")
        data += chunk
    return data


def relay(host: str, port: int) -> int:
    """The job's side: connect, prove the key, start the nodes, forward their ready lines until
    the client goes away. Returns the exit status."""
    key_text = os.environ.pop(KEY_ENV, "")
    if not key_text:
        print(f"clusterexec slurm job: ${KEY_ENV} is not set; was the job submitted by from_slurm?", file=sys.stderr)
        return 2
    key = key_text.encode()
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        sock.sendall(proof(key, _recv_exact(sock, NONCE_SIZE)))
        sock.settimeout(None)
    except OSError as exc:
        print(
            f"clusterexec slurm job: cannot reach the client at {host}:{port} ({exc}); pass from_slurm"
            "(client_address=...) an address of the client's machine that compute nodes can reach",
            file=sys.stderr,
        )
        return 1
    hosts = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1")
    nodes = SrunNodes(hosts, key)
    lock = threading.Lock()

    def forward() -> None:
        try:
            while (node := nodes.ready.next(None)) is not None:
                with lock:
                    sock.sendall(ready_line(node.address.host, node.address.port, node.workers))
            status = nodes.process.wait()
            with lock:
                for line in nodes.ready.other:
                    sock.sendall(f"srun: {line}\n".encode())
                sock.sendall(f"srun exited with status {status}\n".encode())
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client is gone: the loop below sees it too

    threading.Thread(target=forward, name="clusterexec-relay", daemon=True).start()
    try:
        while sock.recv(4096):
            pass  # the client sends nothing; its end of file is the signal
    except OSError:
        pass
    nodes.stop()
    sock.close()
    return 0


def watch(job_id: str) -> int:
    """The watchdog: wait for stdin to end, then cancel the job unless the client said it ended."""
    said = b""
    try:
        while chunk := os.read(sys.stdin.fileno(), 4096):
            said += chunk
    except OSError:
        pass
    if said == WATCH_DONE:
        return 0
    subprocess.run(["scancel", "--quiet", job_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m clusterexec.launch.slurmjob relay HOST PORT`` or ``... watch JOBID``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "relay":
        return relay(args[1], int(args[2]))
    if len(args) == 2 and args[0] == "watch":
        return watch(args[1])
    raise ClusterError("usage: python -m clusterexec.launch.slurmjob relay HOST PORT | watch JOBID")


if __name__ == "__main__":
    sys.exit(main())
