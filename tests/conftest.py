"""Shared fixtures: real node processes on loopback, keys, executors.

Every node is a real ``python -m clusterexec.node --port 0`` process; its port is read from
its ready line. Every process started here is killed at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
TESTS = Path(__file__).resolve().parent


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll ``predicate`` until it is true; return the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


@dataclass
class NodeProcess:
    """A node started by a test: its process, address and captured output."""

    process: subprocess.Popen[str]
    host: str
    port: int
    workers: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def start_node(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0, python_args: Sequence[str] = ()
) -> NodeProcess:
    """Start ``python PYTHON_ARGS -m clusterexec.node --port 0 ARGS`` and wait for its ready line
    (stdout and stderr are merged into ``process.stdout``)."""
    full_env = dict(os.environ)
    full_env.pop("CLUSTEREXEC_KEY", None)
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    cmd = [sys.executable, *python_args, "-m", "clusterexec.node", "--port", "0", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = READY.search(line)
        if match:
            return NodeProcess(process, match.group(1).strip("[]"), int(match.group(2)), int(match.group(3)), lines)
    process.kill()
    process.wait()
    raise RuntimeError(f"node did not start: {''.join(lines)}")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any key variable, plus ``extra``; tests/ on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTEREXEC_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0, **kw: object
) -> subprocess.CompletedProcess:
    """Run ``python -m clusterexec ARGS`` and capture its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "clusterexec", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh key file with mode 0600."""
    path = tmp_path / "secret.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def node_factory() -> Iterator:
    """Start nodes with ``node_factory(*args)``; all are stopped at teardown."""
    started: list[NodeProcess] = []

    def factory(*args: str, **kwargs: object) -> NodeProcess:
        node = start_node(*args, **kwargs)  # type: ignore[arg-type]
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop(signal.SIGKILL if node.process.poll() is None else signal.SIGTERM)
        if node.process.stdout is not None:
            node.process.stdout.close()


@pytest.fixture
def node(node_factory, key_file: Path) -> NodeProcess:
    """One node with 2 workers and a key file."""
    return node_factory("--workers", "2", "--key-file", str(key_file))


@pytest.fixture
def executor(node: NodeProcess, key_file: Path) -> Iterator:
    """A ClusterExecutor connected to the ``node`` fixture."""
    from clusterexec import ClusterExecutor

    ex = ClusterExecutor([node.address], key_file=key_file)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)
