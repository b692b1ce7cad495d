"""Starting nodes with ``srun`` inside a Slurm allocation, one per allocated host.

One ``srun`` step runs ``python -m clusterexec.node --port 0 --key-stdin --exit-with-stdin`` on
every host of the allocation. The key is the first line srun broadcasts to every task's stdin
(``--input=all``); srun's stdin stays open as the nodes' lifeline, so when this process goes
away, however it goes, the nodes see end of file and stop, and the step ends. Each node
listens on its own Slurm node name (``$SLURMD_NODENAME``, which a cluster resolves to the
host's address) and prints its ready line on stdout, which srun gathers here.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from clusterexec.errors import ConfigurationError, NodeUnreachableError
from clusterexec.keys import KEY_ENV, KEY_FILE_ENV
from clusterexec.launch import nodeset
from clusterexec.launch.specs import NodeAddress

READY_LINE = re.compile(rb"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
JOB_ENV = "SLURM_JOB_ID"
NODELIST_ENV = "SLURM_JOB_NODELIST"
STOP_GRACE = 10.0
# The node's host and worker count come from the step's environment on each host: every task
# of one srun step gets the same command line.
NODE_SHELL = 'exec "$@" --host "${SLURMD_NODENAME:-$(hostname)}" --workers "${SLURM_CPUS_ON_NODE:-0}"'


@dataclass(frozen=True)
class ReadyNode:
    """A node that printed its ready line: where it listens and how many workers it has."""

    address: NodeAddress
    workers: int


def parse_ready(line: bytes) -> ReadyNode | None:
    """The node announced by a ready line (srun's ``N: `` label allowed), or None."""
    match = READY_LINE.search(line)
    if match is None:
        return None
    host = match.group(1).decode().strip("[]")
    return ReadyNode(NodeAddress(host, int(match.group(2))), int(match.group(3)))


class ReadyLines:
    """Reads ready lines from a stream in a thread; :meth:`next` hands out the nodes in order.

    ``stream`` is the stream, or a callable that the thread calls first to get it (it may block,
    and return None when there will be no stream). The stream ending (srun exited, the job's
    relay closed) is reported once by :meth:`next` returning None. Other lines are kept (the
    last few) for error messages."""

    def __init__(self, stream: IO[bytes] | Callable[[], IO[bytes] | None], name: str) -> None:
        self._stream = stream
        self._queue: queue.Queue[ReadyNode | None] = queue.Queue()
        self.other: list[str] = []
        self.ended = False
        self._thread = threading.Thread(target=self._read, name=f"clusterexec-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            stream = self._stream() if callable(self._stream) else self._stream
            for line in stream or ():
                node = parse_ready(line)
                if node is not None:
                    self._queue.put(node)
                elif line.strip():
                    self.other = [*self.other[-19:], line.decode(errors="replace").rstrip()]
        except (OSError, ValueError):
            pass  # closed under us: that is the end too
        finally:
            self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the stream to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def next(self, timeout: float | None) -> ReadyNode | None:
        """The next ready node; None once the stream has ended. Blocks at most ``timeout``
        seconds (None: no limit); raises TimeoutError when it passes."""
        if self.ended:
            return None
        try:
            node = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if node is None:
            self.ended = True
        return node


def allocation_hosts() -> list[str]:
    """The hosts of the Slurm allocation this process runs in. Raises ConfigurationError,
    saying what to do, outside an allocation."""
    nodelist = os.environ.get(NODELIST_ENV, "").strip()
    if not os.environ.get(JOB_ENV) or not nodelist:
        raise ConfigurationError(
            f"nodes='slurm' starts nodes with srun inside a Slurm allocation, but ${JOB_ENV}/${NODELIST_ENV} "
            "are not set: run the program under `salloc -N <n> python ...` or in an sbatch script; from a "
            "login node use ClusterExecutor.from_slurm(nodes=<n>, time=...); to connect to nodes already "
            "started on the allocation's hosts, use 'slurm:PORT'"
        )
    try:
        return nodeset.expand(nodelist)
    except ConfigurationError as exc:
        raise ConfigurationError(f"${NODELIST_ENV}: {exc}") from None


def node_command(python: str = sys.executable, log_level: str = "WARNING") -> list[str]:
    """What each srun task runs: the node program behind a shell that fills in its host and workers."""
    node = [python, "-m", "clusterexec.node", "--port", "0", "--key-stdin", "--exit-with-stdin"]
    return ["/bin/sh", "-c", NODE_SHELL, "clusterexec-node", *node, "--log-level", log_level]


def srun_command(hosts: int, python: str = sys.executable, log_level: str = "WARNING") -> list[str]:
    """The srun command line that starts one node on each of ``hosts`` hosts of the allocation.

    ``--overlap`` lets the step share CPUs with the step the program itself may run in (salloc's
    interactive step, ``srun python ...``); ``--kill-on-bad-exit`` ends every node if one fails."""
    return [
        "srun",
        f"--nodes={hosts}",
        f"--ntasks={hosts}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--input=all",
        "--overlap",
        "--job-name=clusterexec-nodes",
        *node_command(python, log_level),
    ]


def node_environment() -> dict[str, str]:
    """The environment for the srun step: this one, with this process's import path for the
    nodes' workers (as a local node gets), and no key: theirs arrives on stdin."""
    env = dict(os.environ)
    env.pop(KEY_ENV, None)
    env.pop(KEY_FILE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class SrunNodes:
    """The nodes of one srun step: started at construction, stopped by :meth:`stop`.

    Construction returns at once; :attr:`ready` hands out the nodes as they print their ready
    lines. Raises ConfigurationError if srun cannot be run."""

    def __init__(self, hosts: int, key: bytes, python: str = sys.executable) -> None:
        self.hosts = hosts
        self.command = srun_command(hosts, python)
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=node_environment()
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot run srun to start the nodes ({exc.strerror or exc}); is Slurm's client installed "
                "and on PATH?"
            ) from None
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            # The key, then nothing: the open pipe is the nodes' lifeline.
            self.process.stdin.write(key + b"\n")
            self.process.stdin.flush()
        except OSError:
            pass  # srun already failed; the ready lines' end reports it
        self.ready = ReadyLines(self.process.stdout, "srun")

    def wait_all(self, timeout: float) -> list[ReadyNode]:
        """Every node's ready line, within ``timeout`` seconds in all. Raises
        NodeUnreachableError (and stops the step) when srun ends or time runs out first."""
        found: list[ReadyNode] = []
        deadline = time.monotonic() + timeout
        try:
            while len(found) < self.hosts:
                node = self.ready.next(max(0.0, deadline - time.monotonic()))
                if node is None:
                    break
                found.append(node)
        except TimeoutError:
            pass
        if len(found) < self.hosts:
            status = self.process.poll()
            self.stop()
            how = "srun is still running" if status is None else f"srun exited with status {status}"
            output = "".join(f"\n  {line}" for line in self.ready.other)
            raise NodeUnreachableError(
                f"{len(found)} of {self.hosts} Slurm nodes printed their ready line within {timeout:g}s "
                f"({how}); srun's messages are above. Command: {' '.join(self.command)}{output}"
            )
        return found

    def stop(self) -> None:
        """Close the nodes' lifeline and wait for the step to end; terminate it if it lingers."""
        process = self.process
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.terminate()  # srun signals the step's tasks
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
