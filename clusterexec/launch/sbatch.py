"""Submitting a Slurm job whose nodes connect back to this process, for ``from_slurm``.

The client listens on a rendezvous socket and submits ``sbatch --wait`` with a batch script that
runs ``python -m clusterexec.launch.slurmjob relay HOST PORT``. The key travels in the job's
environment ($CLUSTEREXEC_KEY, exported by sbatch: stored by slurmctld with the job, readable
by you and the Slurm administrators, never on a command line or in a file of yours). The relay
proves it holds the key, starts the nodes and forwards their ready lines over the connection.

The job is cancelled by :meth:`SlurmJob.cancel`, and by a watchdog process if this process
dies first; sbatch's ``--wait`` tells us when the job ended before its relay called back.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import selectors
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from clusterexec.errors import ConfigurationError
from clusterexec.keys import KEY_ENV
from clusterexec.launch.slurmjob import NONCE_SIZE, WATCH_DONE, proof
from clusterexec.launch.srun import ReadyLines, node_environment

HANDSHAKE_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0
STOP_GRACE = 10.0
DEFAULT_OUTPUT = "clusterexec-slurm-%j.out"
_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def sbatch_command(
    nodes: int, time: str | None = None, partition: str | None = None, options: Mapping[str, object] | None = None
) -> list[str]:
    """The sbatch command line: ``nodes`` hosts, one task each, and ``options`` as ``--name=value``
    (``cpus_per_task=8`` is ``--cpus-per-task=8``; True is a bare flag, None or False leaves it out).
    Raises ConfigurationError on a malformed option name."""
    options = dict(options or {})
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigurationError(f"from_slurm(nodes={nodes!r}): nodes must be a positive int, the number of hosts")
    command = ["sbatch", "--parsable", "--wait", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if time is not None:
        command.append(f"--time={time}")
    if partition is not None:
        command.append(f"--partition={partition}")
    defaults = {"job_name": "clusterexec", "output": DEFAULT_OUTPUT, "export": "ALL"}
    for name, value in {**defaults, **options}.items():
        if not _OPTION.fullmatch(name):
            raise ConfigurationError(f"from_slurm: {name!r} is not an sbatch option name (write cpus_per_task=8)")
        flag = "--" + name.replace("_", "-")
        if name == "export" and value not in ("ALL", None, False):
            value = f"{value},{KEY_ENV}"  # the key must reach the job whatever else is exported
        if value is True:
            command.append(flag)
        elif value is not None and value is not False:
            command.append(f"{flag}={value}")
    return command


def batch_script(python: str, host: str, port: int) -> str:
    """The job's batch script: the relay, which calls the client back at ``host:port``."""
    relay = [python, "-m", "clusterexec.launch.slurmjob", "relay", host, str(port)]
    return "#!/bin/sh\n# clusterexec nodes for ClusterExecutor.from_slurm\nexec " + shlex.join(relay) + "\n"


class SlurmJob:
    """One submitted job and its rendezvous. :attr:`ready` hands out its nodes as they come up.

    Construction submits the job and returns at once; raises ConfigurationError if sbatch cannot
    be run or refuses the job (with sbatch's message)."""

    def __init__(
        self,
        nodes: int,
        key: bytes,
        *,
        time: str | None = None,
        partition: str | None = None,
        options: Mapping[str, object] | None = None,
        client_address: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.key = key
        self.failure = ""
        self.command = sbatch_command(nodes, time, partition, options)
        self._output = str((options or {}).get("output") or DEFAULT_OUTPUT)
        self._relay: socket.socket | None = None
        bind = client_address or socket.gethostname()
        try:
            self._listener = socket.create_server((bind, 0))
        except OSError as exc:
            raise ConfigurationError(
                f"from_slurm: cannot listen on {bind!r} for the job's nodes to call back ({exc}); "
                "pass client_address= an address of this machine that the compute nodes can reach"
            ) from None
        host, port = self._listener.getsockname()[:2]
        env = node_environment()
        env[KEY_ENV] = key.decode()
        try:
            self._sbatch = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
            )
        except OSError as exc:
            self._listener.close()
            raise ConfigurationError(f"cannot run sbatch ({exc.strerror or exc}); is Slurm's client on PATH?") from None
        assert self._sbatch.stdin is not None and self._sbatch.stdout is not None
        self._sbatch.stdin.write(batch_script(python, host, port).encode())
        self._sbatch.stdin.close()
        line = self._sbatch.stdout.readline().decode().strip()
        if not line:
            self._listener.close()
            error = self._sbatch.stderr.read().decode(errors="replace").strip() if self._sbatch.stderr else ""
            status = self._sbatch.wait()
            raise ConfigurationError(
                f"sbatch refused the job (status {status}): {error or 'no message'}; "
                f"command: {shlex.join(self.command)}"
            )
        self.job_id = line.split(";")[0]
        self._watchdog = subprocess.Popen(
            [python, "-m", "clusterexec.launch.slurmjob", "watch", self.job_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the program's process group must not stop it first
        )
        self.ready = ReadyLines(self._await_relay, f"slurm-job-{self.job_id}")

    def _await_relay(self) -> IO[bytes] | None:
        """The relay's stream once it has proved the key; None if the job ended first."""
        assert self._sbatch.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._sbatch.stdout, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._sbatch.stdout:
                        if os.read(self._sbatch.stdout.fileno(), 4096):
                            continue
                        self.failure = self._why_ended()
                        return None
                    relay = self._accept()
                    if relay is not None:
                        self._relay = relay
                        self._listener.close()
                        return relay.makefile("rb")

    def _accept(self) -> socket.socket | None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return None
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            nonce = secrets.token_bytes(NONCE_SIZE)
            sock.sendall(nonce)
            answer = b""
            while len(answer) < len(nonce):
                chunk = sock.recv(len(nonce) - len(answer))
                if not chunk:
                    break
                answer += chunk
            if hmac.compare_digest(answer, proof(self.key, nonce)):
                sock.settimeout(None)
                return sock
        except OSError:
            pass
        sock.close()  # not our job's relay
        return None

    def _why_ended(self) -> str:
        status = self._sbatch.wait()
        error = self._sbatch.stderr.read().decode(errors="replace").strip() if self._sbatch.stderr else ""
        try:
            tail = self._output_path().read_text(errors="replace").strip().splitlines()[-20:]
        except OSError:
            tail = []
        lines = "".join(f"\n  {line}" for line in [*error.splitlines(), *tail])
        return f"Slurm job {self.job_id} ended (sbatch --wait status {status}) before its nodes called back{lines}"

    def cancel(self) -> None:
        """Stop the nodes and end the job; returns once it is ending. Safe to call twice.

        The relay stops the nodes when it reads end of file, then closes its side and the job
        ends by itself; only if it does not within 10 s (or never called) is the job scancelled."""
        ended = False
        if self._relay is not None:
            try:
                self._relay.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            ended = self.ready.join(STOP_GRACE)
            self._relay.close()
        if not ended:
            subprocess.run(
                ["scancel", "--quiet", self.job_id],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                timeout=STOP_TIMEOUT,
            )
        self._wait_gone(STOP_GRACE)
        stdin = self._watchdog.stdin
        if stdin is not None and not stdin.closed:
            try:
                if ended:
                    stdin.write(WATCH_DONE)  # the job is ending by itself: no scancel
                stdin.close()
            except OSError:
                pass
        try:
            self._watchdog.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()
        if self._sbatch.poll() is None:
            self._sbatch.terminate()
        try:
            self._sbatch.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._sbatch.kill()
            self._sbatch.wait()
        self._listener.close()
        output = self._output_path()
        if ended and output.is_file() and output.stat().st_size == 0:
            output.unlink()  # nothing to read there: the nodes said nothing

    def _wait_gone(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until squeue no longer lists the job, so that a caller who
        looks right after shutdown sees it gone. Slurm offers no event for this: squeue is asked
        every 50-500 ms."""
        deadline = time.monotonic() + timeout
        pause = 0.05
        while time.monotonic() < deadline:
            try:
                listed = subprocess.run(
                    ["squeue", "--noheader", "--jobs", self.job_id, "--format=%T"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=STOP_TIMEOUT,
                ).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                return
            if not listed:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _output_path(self) -> Path:
        return Path(self._output.replace("%j", self.job_id).replace("%x", "clusterexec"))

    def describe_end(self) -> str:
        """Why the job's nodes stopped coming: the job ended, or what the relay last said."""
        if self.failure:
            return self.failure
        said = "".join(f"\n  {line}" for line in self.ready.other)
        return f"the relay of Slurm job {self.job_id} closed the connection{said}"
