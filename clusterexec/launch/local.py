"""Starting and stopping nodes on this machine, for ``ClusterExecutor()`` with no nodes.

A local node is ``python -m clusterexec.node --port 0`` on loopback with a fresh random key
passed through its environment. It reads its stdin as a lifeline: when this process dies, the
pipe closes and the node stops, so no node outlives its executor.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from typing import BinaryIO

from clusterexec.errors import ClusterError
from clusterexec.keys import KEY_ENV, new_key
from clusterexec.launch.specs import NodeAddress

# Set to "process" to run the local executor's node as a process of its own, as where a node
# cannot be hosted in the client (see clusterexec/node/hosted.py).
LOCAL_NODE_ENV = "CLUSTEREXEC_LOCAL_NODE"
READY_LINE = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
START_TIMEOUT = 60.0
STOP_GRACE = 5.0


class LocalNode:
    """A node process started by this process. ``address`` and ``key`` are set once it is up."""

    def __init__(self, workers: int, key: bytes | None = None, start_timeout: float = START_TIMEOUT) -> None:
        self.key = key if key is not None else new_key().encode()
        env = dict(os.environ)
        env[KEY_ENV] = self.key.decode()
        # Like ProcessPoolExecutor's spawn, the workers see this interpreter's import path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [
            sys.executable,
            "-m",
            "clusterexec.node",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--exit-with-stdin",
            # The node's stderr is this process's: its own session lines would only be noise here.
            "--log-level",
            "WARNING",
        ]
        ready_r, ready_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [*command, "--ready-fd", str(ready_w)], stdin=subprocess.PIPE, env=env, pass_fds=(ready_w,)
            )
        finally:
            os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            self.address = self._wait_ready(ready, start_timeout)

    def _wait_ready(self, ready: BinaryIO, timeout: float) -> NodeAddress:
        deadline = time.monotonic() + timeout
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(ready, selectors.EVENT_READ)
            while time.monotonic() < deadline and b"\n" not in data:
                if not selector.select(deadline - time.monotonic()):
                    continue
                chunk = os.read(ready.fileno(), 4096)
                if not chunk:
                    break
                data += chunk
        match = READY_LINE.search(data.decode(errors="replace"))
        if match:
            return NodeAddress(match.group(1).strip("[]"), int(match.group(2)))
        self.stop()
        raise ClusterError(
            f"a local clusterexec node did not start within {timeout:g}s (exit status "
            f"{self.process.poll()}); run `{sys.executable} -m clusterexec.node --port 0` to see why"
        )

    def stop(self) -> None:
        """Stop the node and its workers; returns once the process has exited."""
        process = self.process
        if process.poll() is None:
            try:
                process.terminate()
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
