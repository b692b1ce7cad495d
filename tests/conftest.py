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
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    python_args: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> NodeProcess:
    """Start ``python PYTHON_ARGS -m clusterexec.node --port 0 ARGS`` and wait for its ready line
    (stdout and stderr are merged into ``process.stdout``); ``preexec_fn`` runs in the child
    before the node starts (to lower a resource limit, say)."""
    full_env = dict(os.environ)
    full_env.pop("CLUSTEREXEC_KEY", None)
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    cmd = [sys.executable, *python_args, "-m", "clusterexec.node", "--port", "0", *args]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, preexec_fn=preexec_fn
    )
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


def make_key_file(directory: Path) -> Path:
    """A fresh key file with mode 0600 in ``directory``."""
    path = directory / "secret.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh key file with mode 0600."""
    return make_key_file(tmp_path)


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


# --------------------------------------------------------------------------- one contract, every transport

TRANSPORTS = ("aes-gcm", "hmac-sha256", "tls", "local")


@dataclass
class TransportNodes:
    """The nodes the transports share within a test module: one plain, one TLS, and their key."""

    key_file: Path
    cert: Path
    plain: NodeProcess
    tls: NodeProcess


@pytest.fixture(scope="module")
def transport_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportNodes]:
    """A node with 2 workers and a key file, and a node with 2 workers that talks only TLS."""
    directory = tmp_path_factory.mktemp("transports")
    key_file = make_key_file(directory)
    cert, cert_key = make_cert(directory, "node")
    common = ("--workers", "2", "--key-file", str(key_file))
    plain = start_node(*common)
    try:
        tls = start_node(*common, "--tls-cert", str(cert), "--tls-key", str(cert_key))
    except BaseException:
        plain.stop(signal.SIGKILL)
        raise
    yield TransportNodes(key_file, cert, plain, tls)
    for node in (plain, tls):
        node.stop(signal.SIGKILL if node.process.poll() is None else signal.SIGTERM)
        if node.process.stdout is not None:
            node.process.stdout.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, transport_nodes: TransportNodes, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each transport by name; ``hmac-sha256`` makes this process's client offer HMAC sealing only
    (as a client without the cryptography package would) for the whole test."""
    name: str = request.param
    if name == "hmac-sha256":
        from clusterexec.wire import handshake, sealing

        monkeypatch.setattr(handshake, "available_seals", lambda: [sealing.HMAC_SHA256])
    return name


@pytest.fixture
def cluster(transport: str, transport_nodes: TransportNodes) -> Iterator:
    """A ClusterExecutor with 2 workers over ``transport``; shut down (cancelling) at teardown."""
    import ssl

    from clusterexec import ClusterExecutor

    nodes = transport_nodes
    if transport == "local":
        ex = ClusterExecutor(2)
    elif transport == "tls":
        context = ssl.create_default_context(cafile=str(nodes.cert))
        ex = ClusterExecutor([nodes.tls.address], key_file=nodes.key_file, ssl_context=context)
    else:
        ex = ClusterExecutor([nodes.plain.address], key_file=nodes.key_file)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def link_transports(executor: object) -> list[tuple[str, bool]]:
    """White-box: for each node link of ``executor``, the frame sealing the node chose and whether
    the connection is TLS. Nothing public reports these, so the links are read in this process."""
    import ssl

    links = executor._scheduler.links  # type: ignore[attr-defined]
    return [(str(link.info.get("seal")), isinstance(link.sock, ssl.SSLSocket)) for link in links]
