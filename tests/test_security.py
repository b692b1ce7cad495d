"""End-to-end security tests: real node processes on loopback, attacked over real sockets.

The attacker here is anyone who can open a TCP connection to a node, or sit on the path
between a client and a node (``proxy.Proxy``). What must hold, whatever they send:

- nothing runs on the node unless the client proved it holds the key, in this connection;
- a recorded session replayed, or a frame altered, dropped, reordered or injected, closes that
  session before anything in it is unpickled;
- the node logs each refusal at WARNING with the peer's address and the reason, stays up, keeps
  its memory and file descriptors bounded, and goes on serving its other clients;
- keys, key files and the non-loopback refusal behave as documented in docs/security.md.

Unit tests of the sans-IO protocol classes are in tests/test_protocol.py; these tests use them
only to play a client (or a node) by hand. Tasks with a side effect write a marker file
(``helpers.write_marker``): a marker that does not exist is proof that the task never ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cloudpickle
import helpers
import psutil
import pytest
from conftest import NodeProcess, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy import ProxiedConnection, Proxy, Tamper, flip_bit

from clusterexec import (
    AuthenticationError,
    ClusterExecutor,
    KeyFileError,
    NodeLostError,
    VersionMismatchError,
)
from clusterexec._version import __version__
from clusterexec.code.serialize import dumps_call, pickle_function
from clusterexec.keys import read_key_file
from clusterexec.node import __main__ as node_module
from clusterexec.wire import handshake, messages
from clusterexec.wire.frames import HEAD, SIZE, FrameReader, Message, encode_message
from clusterexec.wire.handshake import (
    HELLO,
    MAGIC,
    NONCE_SIZE,
    PROOF_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO,
    STATUS_ACCEPTED,
    STATUS_REFUSED,
    ClientHandshake,
    RecordReader,
    record,
)
from clusterexec.wire.messages import (
    FUNC,
    RESULT,
    RESULT_HEAD,
    SESSION,
    STOP,
    TASK,
    TASK_HEAD,
    WELCOME,
    kind_name,
    pack_json,
    unpack_json,
)
from clusterexec.wire.sealing import FRAME_HEADER, Sealer

pytestmark = pytest.mark.timeout(60)

PYTHON = sys.executable
CONSOLE = str(Path(sys.executable).with_name("clusterexec"))
MiB = 1 << 20
# How much a node may grow while it refuses bad input (interpreter noise, log buffers).
RSS_SLACK = 48 * MiB


# --------------------------------------------------------------------------- helpers



class NodeLog:
    """Everything a node writes (stdout and stderr merged), read by a thread as it comes.

    A reader is needed anyway: a node whose log pipe fills up would block on its next warning.
    """

    def __init__(self, node: NodeProcess) -> None:
        self.lines: list[str] = list(node.lines)
        self._changed = threading.Condition()
        assert node.process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(node.process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        except (OSError, ValueError):
            pass

    def mark(self) -> int:
        """A position in the log: pass it as ``since`` to look only at what comes after."""
        with self._changed:
            return len(self.lines)

    def warnings(self, since: int = 0) -> list[str]:
        """The WARNING lines logged after ``since``."""
        with self._changed:
            return [line for line in self.lines[since:] if " WARNING " in line]

    def wait_for(self, *needles: str, since: int = 0, timeout: float = 5.0) -> str:
        """Wait for a WARNING line holding every one of ``needles``; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[since:]:
                    if " WARNING " in line and all(needle in line for needle in needles):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "".join(self.lines[-15:])
                    pytest.fail(f"the node logged no WARNING with {needles!r} in {timeout}s; its log ends:\n{tail}")
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class SecureNode:
    """A node process started by a test, with its log reader and its key."""

    node: NodeProcess
    log: NodeLog
    key_file: Path | None

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.node.host, self.node.port)

    @property
    def key(self) -> bytes:
        assert self.key_file is not None
        return read_key_file(self.key_file)

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.node.process.pid)

    def alive(self) -> bool:
        return self.node.process.poll() is None

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def fds(self) -> int:
        return int(self.process.num_fds())

    def workers(self) -> list[psutil.Process]:
        """The node's live worker processes (its children)."""
        return [child for child in self.process.children() if child.status() != psutil.STATUS_ZOMBIE]


NodeStarter = Callable[..., SecureNode]


@pytest.fixture
def start_secure_node(node_factory: Callable[..., NodeProcess]) -> Iterator[NodeStarter]:
    """``start_secure_node(*args, key_file=PATH or None, workers=2)``: a node with a log reader."""
    started: list[SecureNode] = []

    def start(*args: str, key_file: Path | None = None, workers: int = 2) -> SecureNode:
        key_args = ["--key-file", str(key_file)] if key_file is not None else []
        process = node_factory("--workers", str(workers), *key_args, *args)
        node = SecureNode(process, NodeLog(process), key_file)
        started.append(node)
        return node

    yield start
    for node in started:
        node.node.stop(signal.SIGKILL)
    for node in started:
        node.log.join(5.0)


@pytest.fixture
def secure_node(start_secure_node: NodeStarter, key_file: Path) -> SecureNode:
    """One node with 2 workers and the ``key_file`` key."""
    return start_secure_node(key_file=key_file)


@pytest.fixture
def other_key_file(tmp_path: Path) -> Path:
    """A second key file, holding another key than ``key_file``."""
    path = tmp_path / "other.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys come from the arguments of each test only."""
    monkeypatch.delenv("CLUSTEREXEC_KEY", raising=False)
    monkeypatch.delenv("CLUSTEREXEC_KEY_FILE", raising=False)


def node_env(**extra: str) -> dict[str, str]:
    """The environment of a node or CLI started by hand: no key unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTEREXEC_KEY", "CLUSTEREXEC_KEY_FILE")}
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port that nothing listens on (as the OS sees it now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nothing_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def well_behaved_client_is_served(node: SecureNode, key_file: Path | None = None) -> None:
    """A fresh executor on ``node`` gets correct results (the node is up and not stalled)."""
    with ClusterExecutor([node.address], key_file=key_file or node.key_file, connect_timeout=5.0) as ex:
        assert list(ex.map(helpers.square, range(20), timeout=20)) == [x * x for x in range(20)]


class RawClient:
    """A clusterexec client played by hand over a plain socket: handshake, sealed messages."""

    def __init__(self, endpoint: tuple[str, int], timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(endpoint)
        host, port = self.sock.getsockname()[:2]
        self.peer = f"{host}:{port}"
        self.server_hello = b""
        self.sealer: Sealer | None = None
        self.reader: FrameReader | None = None
        self._ready: deque[Message] = deque()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_record(self) -> bytes:
        """One handshake record from the node."""
        records = RecordReader(max_records=1)
        while True:
            data = self.sock.recv(8192)
            if not data:
                raise ConnectionError("the node closed the connection during the handshake")
            got = records.feed(data)
            if got:
                return got[0]

    def handshake(self, key: bytes) -> None:
        """The client side of a real handshake; afterwards messages are sealed."""
        shake = ClientHandshake(key, {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__})
        self.sock.sendall(shake.hello())
        self.server_hello = self.read_record()
        self.sock.sendall(shake.on_server_hello(self.server_hello))
        assert shake.keys is not None
        self.sealer = shake.keys.sealer()
        self.reader = FrameReader(shake.keys.opener())

    def sealed(self, kind: int, body: bytes = b"", buffers: Sequence[Any] = ()) -> bytes:
        """The wire bytes of one message, sealed in this session's order."""
        assert self.sealer is not None
        return b"".join(bytes(piece) for piece in encode_message(self.sealer, kind, body, buffers))

    def send(self, kind: int, body: bytes = b"", buffers: Sequence[Any] = ()) -> None:
        self.sock.sendall(self.sealed(kind, body, buffers))

    def open_session(self, workers: int = 1, output: bool = False) -> dict[str, object]:
        """Ask for a session; return the node's WELCOME."""
        self.send(SESSION, pack_json({"workers": workers, "heartbeat_interval": 1.0, "output": output}))
        return unpack_json(self.receive(WELCOME).body)

    def receive(self, kind: int, timeout: float = 10.0) -> Message:
        """The next message of ``kind`` (others, such as heartbeats, are skipped)."""
        assert self.reader is not None
        deadline = time.monotonic() + timeout
        while True:
            while self._ready:
                message = self._ready.popleft()
                if message.kind == kind:
                    return message
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            target = self.reader.writable()
            n = self.sock.recv_into(target)
            if not n:
                raise ConnectionError("the node closed the connection")
            self._ready.extend(self.reader.feed(n))

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Read (and drop) until the node closes; False if it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.sock.close()


def func_message(fn: Callable[..., object]) -> tuple[bytes, bytes, tuple[Any, ...]]:
    """(digest, FUNC body, FUNC buffers) for a function the workers can import."""
    function = pickle_function(fn)
    return function.digest, function.digest + function.payload.body, function.payload.buffers


def task_message(task_id: int, digest: bytes, *args: object) -> tuple[bytes, tuple[Any, ...]]:
    """(TASK body, TASK buffers) calling the function ``digest`` with ``args``."""
    payload = dumps_call(args, {})
    return TASK_HEAD.pack(task_id, digest, 0) + payload.body, payload.buffers


def node_options() -> set[str]:
    """The command-line options a node accepts."""
    parser = argparse.ArgumentParser()
    node_module.add_arguments(parser)
    return {option for action in parser._actions for option in action.option_strings}


# --------------------------------------------------------------------------- 1. replay and tampering


def record_a_session(node: SecureNode, marker: Path) -> ProxiedConnection:
    """Run a marker task through a recording proxy; return the recorded connection."""
    proxy = Proxy(node.endpoint)
    try:
        with ClusterExecutor([proxy.address], key_file=node.key_file) as ex:
            assert ex.submit(helpers.write_marker, str(marker)).result(timeout=20) == str(marker)
        wait_until(lambda: all(c.closed.is_set() for c in proxy.connections), what="the proxied session to end")
    finally:
        proxy.close()
    assert len(proxy.connections) == 1
    wait_until(lambda: not node.workers(), what="the recorded session's workers to exit")
    return proxy.connections[0]


def test_a_recorded_session_replayed_to_the_node_runs_nothing(secure_node: SecureNode, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    recording = bytes(record_a_session(secure_node, marker).client_bytes)
    marker.unlink()
    since = secure_node.log.mark()

    with RawClient(secure_node.endpoint) as replay:
        try:
            replay.sock.sendall(recording)
        except OSError:
            pass  # the node may close before the whole recording is in
        assert replay.closed_by_peer(), "the node kept a replayed session open"
    line = secure_node.log.wait_for(f"authentication failed for {replay.peer}", since=since)
    assert "could not prove" in line
    time.sleep(0.3)
    assert not marker.exists(), "a replayed session ran its task again"
    assert not secure_node.workers(), "a replayed session got worker processes"


def test_recorded_frames_replayed_after_a_fresh_handshake_run_nothing(secure_node: SecureNode, tmp_path: Path) -> None:
    # Even with a genuine handshake (here the attacker holds the key but not the old session
    # keys: the frames are bound to the nonces of the session that sealed them).
    marker = tmp_path / "marker"
    recorded = record_a_session(secure_node, marker)
    frames = bytes(recorded.client_bytes[recorded.handshake_bytes() :])
    marker.unlink()
    since = secure_node.log.mark()

    with RawClient(secure_node.endpoint) as replay:
        replay.handshake(secure_node.key)
        replay.sock.sendall(frames)
        assert replay.closed_by_peer(), "the node kept a session of replayed frames open"
    line = secure_node.log.wait_for(f"session from {replay.peer}", "frame 0 failed authentication", since=since)
    assert "connection closed" in line
    time.sleep(0.3)
    assert not marker.exists()
    assert not secure_node.workers()


@pytest.mark.parametrize("tamper", list(Tamper), ids=[t.name.lower() for t in Tamper])
def test_a_tampered_frame_closes_the_session_before_anything_runs(
    secure_node: SecureNode, tmp_path: Path, tamper: Tamper
) -> None:
    marker, started, release = tmp_path / "marker", tmp_path / "started", tmp_path / "release"
    key_file = secure_node.key_file
    proxy = Proxy(secure_node.endpoint)
    try:
        with (
            ClusterExecutor([secure_node.address], key_file=key_file, max_workers=1) as bystander,
            ClusterExecutor([proxy.address], key_file=key_file, retries=0) as victim,
        ):
            # Another client of the same node is in the middle of a task the whole time.
            blocked = bystander.submit(helpers.block, str(started), str(release), "undisturbed")
            wait_until(started.exists, what="the bystander's task to start")
            since = secure_node.log.mark()

            proxy.arm(tamper)
            future = victim.submit(helpers.write_marker, str(marker))
            with pytest.raises(NodeLostError, match=re.escape(proxy.address)):
                future.result(timeout=20)
            assert proxy.tampered.is_set()
            line = secure_node.log.wait_for("session from 127.0.0.1:", "failed authentication", since=since)
            assert "connection closed" in line
            time.sleep(0.2)
            assert not marker.exists(), f"the task ran although a frame was tampered with ({tamper.value})"

            release.touch()
            assert blocked.result(timeout=10) == "undisturbed"
            assert bystander.submit(helpers.square, 7).result(timeout=10) == 49
            # The victim reconnects (a new session) and works again.
            assert victim.submit(helpers.square, 6).result(timeout=20) == 36
            assert not marker.exists()
    finally:
        proxy.close()


@pytest.mark.parametrize("seal", ["aes-gcm", "hmac-sha256"])
def test_one_flipped_bit_in_a_task_frame_stops_the_task(
    secure_node: SecureNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seal: str
) -> None:
    # A client that offers only one sealing method gets it; either way one flipped bit in the
    # frame that carries a TASK closes the session before the task reaches a worker.
    monkeypatch.setattr(handshake, "available_seals", lambda: [seal])
    digest, func_body, func_buffers = func_message(helpers.write_marker)
    for tampered in (False, True):
        marker = tmp_path / f"marker-{tampered}"
        with RawClient(secure_node.endpoint) as client:
            client.handshake(secure_node.key)
            assert unpack_json(client.server_hello[SERVER_HELLO.size :])["seal"] == seal
            welcome = client.open_session()
            assert welcome["workers"] == 1
            since = secure_node.log.mark()
            client.send(FUNC, func_body, func_buffers)
            body, buffers = task_message(1, digest, str(marker))
            frame = client.sealed(TASK, body, buffers)
            client.sock.sendall(flip_bit(frame, len(frame) // 2) if tampered else frame)
            if not tampered:
                client.receive(messages.RESULT)
                assert marker.exists()
                continue
            assert client.closed_by_peer()
        secure_node.log.wait_for(f"session from {client.peer}", "frame 2 failed authentication", since=since)
        time.sleep(0.2)
        assert not marker.exists()


def test_a_downgraded_client_hello_fails_the_handshake(secure_node: SecureNode) -> None:
    # A man in the middle strips AES-GCM from the offer: both proofs cover the whole
    # transcript, so the client notices the change and nothing is sealed with the weaker method.
    def offer_hmac_only(unit: bytes) -> bytes:
        payload = unit[2:]
        info = json.loads(payload[HELLO.size :])
        info["seal"] = ["hmac-sha256"]
        return record(payload[: HELLO.size] + pack_json(info))

    proxy = Proxy(secure_node.endpoint)
    proxy.rewrite_hello = offer_hmac_only
    since = secure_node.log.mark()
    try:
        with pytest.raises(AuthenticationError, match=re.escape(proxy.address)):
            ClusterExecutor([proxy.address], key_file=secure_node.key_file, connect_timeout=5.0)
    finally:
        proxy.close()
    secure_node.log.wait_for("authentication failed for 127.0.0.1:", since=since)
    assert not secure_node.workers()


# --------------------------------------------------------------------------- 2. wrong or missing key


def test_a_wrong_key_is_refused_by_name_on_both_sides(secure_node: SecureNode, other_key_file: Path) -> None:
    since = secure_node.log.mark()
    with pytest.raises(AuthenticationError, match=re.escape(secure_node.address)) as caught:
        ClusterExecutor([secure_node.address], key_file=other_key_file, connect_timeout=5.0)
    assert "key" in str(caught.value)
    line = secure_node.log.wait_for("authentication failed for 127.0.0.1:", since=since)
    assert "could not prove it holds the node's key" in line
    assert not secure_node.workers()


def test_a_wrong_key_is_logged_with_the_peer_address(secure_node: SecureNode) -> None:
    since = secure_node.log.mark()
    with RawClient(secure_node.endpoint) as client:
        with pytest.raises(AuthenticationError):
            client.handshake(os.urandom(32).hex().encode())
        client.sock.sendall(record(os.urandom(PROOF_SIZE)))
        assert client.closed_by_peer()
    secure_node.log.wait_for(f"authentication failed for {client.peer}", "wrong key", since=since)


@pytest.mark.parametrize("missing", ["client", "node"])
def test_a_missing_key_is_refused(start_secure_node: NodeStarter, key_file: Path, missing: str) -> None:
    node = start_secure_node(key_file=key_file if missing == "client" else None)
    since = node.log.mark()
    client_key = None if missing == "client" else key_file
    with pytest.raises(AuthenticationError, match=re.escape(node.address)):
        ClusterExecutor([node.address], key_file=client_key, connect_timeout=5.0)
    node.log.wait_for("authentication failed for 127.0.0.1:", since=since)
    assert not node.workers()


def test_a_node_with_another_key_is_lost_while_the_others_work(
    start_secure_node: NodeStarter, key_file: Path, other_key_file: Path, tmp_path: Path
) -> None:
    good = start_secure_node(key_file=key_file)
    bad = start_secure_node(key_file=other_key_file)
    markers = [str(tmp_path / f"marker-{i}") for i in range(8)]
    with ClusterExecutor([good.address, bad.address], key_file=key_file, connect_timeout=5.0) as ex:
        assert list(ex.map(helpers.write_marker, markers, timeout=30)) == markers

        def status(address: str) -> Any:
            return next(s for s in ex.nodes if s.address == address)

        assert status(good.address).state == "ready"
        wait_until(lambda: status(bad.address).state == "lost", what="the bad node to show as lost")
        error = status(bad.address).error
        assert error is not None and bad.address in error and "could not prove it holds the same key" in error
        # Every task ran on a worker of the good node; the bad node never forked one.
        ran_on = {int(Path(m).read_text()) for m in markers}
        assert ran_on <= {w.pid for w in good.workers()}
        assert not bad.workers()
    bad.log.wait_for("authentication failed for 127.0.0.1:")


# --------------------------------------------------------------------------- 3. non-loopback refusal


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("command", "host"),
    [
        ([PYTHON, "-m", "clusterexec.node"], "0.0.0.0"),
        ([PYTHON, "-m", "clusterexec.node"], "::"),
        ([PYTHON, "-m", "clusterexec.node"], ""),
        ([PYTHON, "-m", "clusterexec.node"], "192.0.2.1"),
        ([CONSOLE, "node"], "0.0.0.0"),
    ],
    ids=["python-m-0.0.0.0", "python-m-ipv6-any", "python-m-empty", "python-m-test-net", "console-0.0.0.0"],
)
def test_a_node_refuses_a_non_loopback_address_without_a_key(command: list[str], host: str) -> None:
    port = free_port()
    done = subprocess.run(
        [*command, "--host", host, "--port", str(port)], capture_output=True, text=True, env=node_env(), timeout=20
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--insecure-no-auth" in lines[0] and "--key-file" in lines[0] and "refusing to listen" in lines[0]
    assert "listening" not in done.stdout
    assert nothing_listens(port)


@pytest.mark.parametrize("source", ["key-file", "environment"])
def test_a_key_allows_a_non_loopback_address(
    node_factory: Callable[..., NodeProcess], key_file: Path, source: str
) -> None:
    # It binds 0.0.0.0 on a port from the OS for a moment; no traffic is sent to it.
    if source == "key-file":
        node = node_factory("--host", "0.0.0.0", "--workers", "1", "--key-file", str(key_file))
    else:
        node = node_factory("--host", "0.0.0.0", "--workers", "1", env={"CLUSTEREXEC_KEY": key_file.read_text()})
    assert node.host == "0.0.0.0"
    assert node.stop() == 0


# --------------------------------------------------------------------------- 4. keys and key files


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command with umask 0, so that a key file's mode is the program's own doing."""
    return subprocess.run(
        list(args), capture_output=True, text=True, env=node_env(), timeout=20, preexec_fn=lambda: os.umask(0)
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("command", [[CONSOLE], [PYTHON, "-m", "clusterexec"]], ids=["console", "python-m"])
def test_keygen_writes_a_fresh_private_key_and_overwrites_only_with_force(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    made = run_cli(*command, "keygen", str(path))
    assert made.returncode == 0, made.stderr
    assert str(path) in made.stdout
    assert mode_of(path) == 0o600
    first = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", first)

    refused = run_cli(*command, "keygen", str(path))
    assert refused.returncode != 0
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert path.read_text() == first

    path.chmod(0o644)
    forced = run_cli(*command, "keygen", "--force", str(path))
    assert forced.returncode == 0, forced.stderr
    second = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", second) and second != first
    assert mode_of(path) == 0o600

    other = tmp_path / "other.key"
    assert run_cli(*command, "keygen", str(other)).returncode == 0
    assert other.read_text() not in (first, second)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
@pytest.mark.parametrize("source", ["--key-file", "CLUSTEREXEC_KEY_FILE"])
def test_a_key_file_others_can_read_is_refused_by_the_node(tmp_path: Path, mode: int, source: str) -> None:
    path = tmp_path / "secret.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(mode)
    port = free_port()
    command = [PYTHON, "-m", "clusterexec.node", "--port", str(port)]
    if source == "--key-file":
        done = subprocess.run(
            [*command, "--key-file", str(path)], capture_output=True, text=True, env=node_env(), timeout=20
        )
    else:
        env = node_env(CLUSTEREXEC_KEY_FILE=str(path))
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=20)
    assert done.returncode == 2
    assert f"chmod 600 {path}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert nothing_listens(port)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
@pytest.mark.parametrize("source", ["key_file", "CLUSTEREXEC_KEY_FILE"])
def test_a_key_file_others_can_read_is_refused_by_the_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, source: str
) -> None:
    path = tmp_path / "secret.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(mode)
    port = free_port()  # never contacted: the key is read first
    with pytest.raises(KeyFileError, match=re.escape(f"chmod 600 {path}")):
        if source == "key_file":
            ClusterExecutor([f"127.0.0.1:{port}"], key_file=path)
        else:
            monkeypatch.setenv("CLUSTEREXEC_KEY_FILE", str(path))
            ClusterExecutor([f"127.0.0.1:{port}"])


# --------------------------------------------------------------------------- 5. bad input


HANDSHAKE_GARBAGE = [
    # (what, bytes sent, what the node's log line says)
    ("http request", b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", "exceeds 4096"),
    ("tls client hello", bytes.fromhex("16030102000100") + os.urandom(200), "exceeds 4096"),
    ("bad magic", record(b"HTTP" + bytes(HELLO.size)), "does not speak the clusterexec protocol"),
    ("empty record", record(b""), "too short"),
    (
        "hello with a non-json info",
        record(HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)) + b"\xff{"),
        "malformed",
    ),
    (
        "hello with a list for info",
        record(HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)) + b"[1]"),
        "malformed",
    ),
    ("nested info", record(HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)) + b"[" * 4000), "malformed"),
    (
        "no common sealing",
        record(HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)) + b'{"seal":["none"]}'),
        "no frame sealing",
    ),
    (
        "truncated hello, then EOF",
        record(HELLO.pack(MAGIC, PROTOCOL_VERSION, bytes(NONCE_SIZE)))[:20],
        "closed during the handshake",
    ),
]


def test_garbage_in_the_handshake_gets_a_log_line_and_a_closed_connection(secure_node: SecureNode) -> None:
    for what, data, reason in HANDSHAKE_GARBAGE:
        since = secure_node.log.mark()
        with RawClient(secure_node.endpoint) as client:
            client.sock.sendall(data)
            if reason == "closed during the handshake":
                client.sock.shutdown(socket.SHUT_WR)
            assert client.closed_by_peer(), f"the node kept the connection open after {what}"
        line = secure_node.log.wait_for(client.peer, reason, since=since)
        assert "handshake with" in line, line
    assert secure_node.alive()
    assert not secure_node.workers()
    well_behaved_client_is_served(secure_node)


def test_truncated_frames_end_only_their_own_session(secure_node: SecureNode) -> None:
    baseline = secure_node.fds()
    cases: list[Callable[[RawClient], bytes]] = [
        lambda c: c.sealed(SESSION, pack_json({"workers": 1}))[:5],  # half a length header
        lambda c: c.sealed(SESSION, pack_json({"workers": 1}))[:-3],  # the tag cut short
        lambda c: FRAME_HEADER.pack(60_000) + os.urandom(100),  # a long frame that never comes
        # A valid head announcing a 4 MiB buffer, then only one chunk of it.
        lambda c: c.sealed(TASK, TASK_HEAD.pack(1, bytes(16), 0), [bytes(4 * MiB)])[: 2 * MiB],
    ]
    for case in cases:
        with RawClient(secure_node.endpoint) as client:
            client.handshake(secure_node.key)
            client.sock.sendall(case(client))
            # The node waits for the rest; meanwhile others are served, then the client goes away.
            assert not client.closed_by_peer(0.2)
            well_behaved_client_is_served(secure_node)
    assert secure_node.alive()
    wait_until(lambda: secure_node.fds() <= baseline, what="the node's descriptors to return to the baseline")
    wait_until(lambda: not secure_node.workers(), what="no workers to be left")


@pytest.mark.parametrize("kind", [RESULT, STOP, 99])
def test_a_kind_a_client_does_not_send_ends_only_its_own_session(secure_node: SecureNode, kind: int) -> None:
    since = secure_node.log.mark()
    with RawClient(secure_node.endpoint) as client:
        client.handshake(secure_node.key)
        client.open_session(workers=1)
        client.send(kind, RESULT_HEAD.pack(1, 0, 0))
        assert client.closed_by_peer(5.0)
    # The log names the kind (RESULT, STOP, unknown kind 99), and the next client is served.
    expected = f"session from {client.peer}: unexpected message {kind_name(kind)} from the client"
    secure_node.log.wait_for(expected, "connection closed", since=since)
    well_behaved_client_is_served(secure_node)
    wait_until(lambda: not secure_node.workers(), what="the closed session's workers to exit")


@pytest.mark.parametrize("max_frame", [65536])
def test_a_length_above_the_limits_is_refused_before_allocating(
    start_secure_node: NodeStarter, key_file: Path, max_frame: int
) -> None:
    node = start_secure_node("--max-frame", str(max_frame), key_file=key_file)
    well_behaved_client_is_served(node)  # the node's own steady state, before measuring
    baseline = node.rss()

    def frame_of(length: int) -> Callable[[RawClient], bytes]:
        return lambda c: FRAME_HEADER.pack(length) + os.urandom(1000)

    def head_announcing(size: int) -> Callable[[RawClient], bytes]:
        # A correctly sealed message head whose buffer table announces ``size`` bytes.
        plain = HEAD.pack(TASK, 1) + SIZE.pack(size) + TASK_HEAD.pack(1, bytes(16), 0)

        def build(client: RawClient) -> bytes:
            assert client.sealer is not None
            return b"".join(bytes(piece) for piece in client.sealer.frame(plain))

        return build

    cases: list[tuple[Callable[[RawClient], bytes], str]] = [
        (frame_of(max_frame + 1), f"frame of {max_frame + 1} bytes exceeds the limit of {max_frame} bytes"),
        (frame_of(200 * MiB), f"frame of {200 * MiB} bytes exceeds the limit"),
        (frame_of(2**40), f"frame of {2**40} bytes exceeds the limit"),
        (frame_of(2**64 - 1), f"frame of {2**64 - 1} bytes exceeds the limit"),
        (frame_of(3), "shorter than its tag"),
        (head_announcing(2**40), f"announces {2**40} bytes of buffers, more than the limit"),
    ]
    for case, reason in cases:
        since = node.log.mark()
        with RawClient(node.endpoint) as client:
            client.handshake(node.key)
            client.sock.sendall(case(client))
            assert client.closed_by_peer(), reason
        node.log.wait_for(f"session from {client.peer}", reason, "connection closed", since=since)
        assert node.rss() < baseline + RSS_SLACK, f"the node grew by {(node.rss() - baseline) // MiB} MiB: {reason}"
    # A frame of exactly the limit is accepted (the node waits for its body).
    with RawClient(node.endpoint) as client:
        client.handshake(node.key)
        client.sock.sendall(FRAME_HEADER.pack(max_frame) + os.urandom(100))
        assert not client.closed_by_peer(0.3)
    assert node.alive()
    well_behaved_client_is_served(node)


def test_buffers_a_head_announces_are_not_allocated_before_they_arrive(
    start_secure_node: NodeStarter, key_file: Path
) -> None:
    # Needs the key: a robustness limit, not an authentication one (a key holder can run code).
    node = start_secure_node("--max-frame", "65536", key_file=key_file, workers=1)
    baseline = node.rss()
    plain = HEAD.pack(TASK, 1) + SIZE.pack(256 * MiB) + TASK_HEAD.pack(1, bytes(16), 0)
    with RawClient(node.endpoint) as client:
        client.handshake(node.key)
        assert client.sealer is not None
        client.sock.sendall(b"".join(bytes(piece) for piece in client.sealer.frame(plain)))
        assert not client.closed_by_peer(0.5)
        grown = node.rss() - baseline
    assert grown < RSS_SLACK, f"a {len(plain)}-byte head made the node allocate {grown // MiB} MiB"


def test_a_large_frame_within_the_limit_is_not_allocated_before_its_bytes_arrive(
    start_secure_node: NodeStarter, key_file: Path
) -> None:
    """A frame length under ``--max-frame`` (1 GiB by default) makes the node receive into a
    buffer of that size; only the bytes that came may take memory (a key holder's header alone
    made the node commit, and its kept heap hold, hundreds of MiB)."""
    node = start_secure_node(key_file=key_file, workers=1)
    well_behaved_client_is_served(node)
    baseline = node.rss()
    with RawClient(node.endpoint) as client:
        client.handshake(node.key)
        client.sock.sendall(FRAME_HEADER.pack(512 * MiB) + os.urandom(1 * MiB))
        assert not client.closed_by_peer(0.5)  # it waits for the rest
        grown = node.rss() - baseline
    assert grown < RSS_SLACK, f"a 512 MiB frame header with 1 MiB behind it grew the node by {grown // MiB} MiB"
    well_behaved_client_is_served(node)
    assert node.rss() < baseline + RSS_SLACK


@pytest.mark.timeout(40)
def test_a_silent_client_is_closed_at_the_handshake_deadline(start_secure_node: NodeStarter, key_file: Path) -> None:
    # There is no command-line option for the deadline (NodeConfig.handshake_timeout, 10 s):
    # use it if it exists, else test the default.
    flag = next((o for o in node_options() if o.startswith("--handshake")), None)
    deadline = 1.0 if flag else handshake.HANDSHAKE_TIMEOUT
    node = start_secure_node(*([flag, str(deadline)] if flag else []), key_file=key_file)
    since = node.log.mark()
    silent = RawClient(node.endpoint, timeout=deadline + 5)
    half_hello = RawClient(node.endpoint)
    half_hello.sock.sendall(record(HELLO.pack(MAGIC, PROTOCOL_VERSION, os.urandom(NONCE_SIZE)) + b"{}")[:30])
    no_proof = RawClient(node.endpoint)
    no_proof.sock.sendall(ClientHandshake(node.key, {}).hello())
    opened = time.monotonic()
    try:
        # Meanwhile a well-behaved client is served, at once.
        well_behaved_client_is_served(node)
        assert time.monotonic() - opened < deadline
        for client in (silent, half_hello, no_proof):
            assert client.closed_by_peer(deadline + 3.0 - (time.monotonic() - opened)), "not closed at the deadline"
        assert time.monotonic() - opened >= deadline - 0.5
        for client in (silent, half_hello, no_proof):
            node.log.wait_for(f"handshake from {client.peer} timed out", since=since)
    finally:
        for client in (silent, half_hello, no_proof):
            client.close()
    assert node.alive()


def stalled_session(node: SecureNode, fn: Callable[..., object], arg: object, tasks: int) -> RawClient:
    """A session (output forwarded) running ``fn(arg)`` ``tasks`` times, that never reads."""
    client = RawClient(node.endpoint, rcvbuf=4096)
    client.handshake(node.key)
    client.open_session(workers=2, output=True)
    digest, func_body, func_buffers = func_message(fn)
    client.send(FUNC, func_body, func_buffers)
    for task_id in range(1, tasks + 1):
        body, buffers = task_message(task_id, digest, arg)
        client.send(TASK, body, buffers)
    return client


def peak_rss(node: SecureNode, seconds: float, limit: int) -> int:
    """The node's largest RSS over ``seconds`` (stops early above ``limit``)."""
    peak = node.rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and peak < limit:
        time.sleep(0.02)
        peak = max(peak, node.rss())
    return peak


def test_a_client_that_stops_reading_does_not_stall_the_others(start_secure_node: NodeStarter, key_file: Path) -> None:
    node = start_secure_node(key_file=key_file)
    with stalled_session(node, bytearray, MiB, tasks=40):
        time.sleep(0.5)
        well_behaved_client_is_served(node)
        assert node.alive()
    well_behaved_client_is_served(node)


@pytest.mark.parametrize(
    ("fn", "arg", "tasks"),
    [
        pytest.param(bytearray, 10_000_000, 60, id="10MB-results"),
        pytest.param(
            os.system,
            "head -c 200000000 /dev/zero",
            4,
            id="200MB-printed",
        ),
    ],
)
def test_a_client_that_stops_reading_keeps_the_node_memory_bounded(
    start_secure_node: NodeStarter, key_file: Path, fn: Callable[..., object], arg: object, tasks: int
) -> None:
    node = start_secure_node(key_file=key_file)
    limit = 300 * MiB
    with stalled_session(node, fn, arg, tasks=tasks):
        peak = peak_rss(node, 2.5, limit)
        well_behaved_client_is_served(node)
        peak = max(peak, node.rss())
    assert peak < limit, f"the node's RSS reached {peak // MiB} MiB while one client did not read"


@pytest.mark.timeout(60)
def test_thousands_of_dropped_connections_leak_nothing(secure_node: SecureNode) -> None:
    baseline_fds = secure_node.fds()
    baseline_rss = secure_node.rss()
    hello = ClientHandshake(secure_node.key, {}).hello()
    for i in range(2000):
        sock = socket.create_connection(secure_node.endpoint, timeout=5.0)
        kind = i % 4
        if kind == 1:  # reset, not closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 2:
            sock.sendall(hello[: 1 + i % (len(hello) - 1)])
        elif kind == 3:
            sock.sendall(os.urandom(1 + i % 300))
        sock.close()
    wait_until(lambda: secure_node.fds() <= baseline_fds, what="the node's descriptors to return to the baseline")
    assert secure_node.alive()
    well_behaved_client_is_served(secure_node)
    wait_until(lambda: secure_node.fds() <= baseline_fds, what="the descriptors of the last session to be closed")
    assert secure_node.rss() < baseline_rss + RSS_SLACK


@st.composite
def hostile_connection(draw: st.DrawFn) -> tuple[str, bytes, int]:
    """What a stranger sends: (stage, bytes, seed). ``stage`` says how far the real handshake
    goes before ``bytes`` (which always differ from anything valid)."""
    stage = draw(st.sampled_from(["raw", "hello", "proof", "frames"]))
    if stage == "raw":
        return stage, draw(st.binary(min_size=1, max_size=3000)), 0
    return stage, b"", draw(st.integers(min_value=0, max_value=2**32 - 1))


def mutate(data: bytes, seed: int) -> bytes:
    """``data`` made invalid: bits flipped, cut short, or grown with junk (never unchanged)."""
    rng = random.Random(seed)
    how = rng.choice(["flip", "cut", "grow", "flip"])
    if how == "cut" and len(data) > 1:
        return data[: rng.randrange(1, len(data))]
    if how == "grow":
        return data[:-1] + bytes([data[-1] ^ 0xFF]) + rng.randbytes(rng.randrange(1, 200))
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out) if bytes(out) != data else flip_bit(data, 0)


@pytest.mark.timeout(60)
def test_hostile_bytes_never_take_the_node_down(secure_node: SecureNode) -> None:
    key = secure_node.key
    baseline_fds = secure_node.fds()
    baseline_rss = secure_node.rss()

    stages: list[str] = []

    def send_hostile(stage: str, data: bytes, seed: int) -> None:
        stages.append(stage)
        with RawClient(secure_node.endpoint) as client:
            try:
                if stage == "raw":
                    client.sock.sendall(data)
                elif stage == "hello":
                    client.sock.sendall(mutate(ClientHandshake(key, {"python": "3"}).hello(), seed))
                elif stage == "proof":
                    shake = ClientHandshake(key, {})
                    client.sock.sendall(shake.hello())
                    client.sock.sendall(mutate(shake.on_server_hello(client.read_record()), seed))
                else:
                    client.handshake(key)
                    client.sock.sendall(mutate(client.sealed(SESSION, pack_json({"workers": 1})), seed))
                client.sock.shutdown(socket.SHUT_WR)
            except (OSError, AuthenticationError):
                pass  # the node may close first
            # Whatever came, the node closes this connection and nothing else.
            assert client.closed_by_peer(5.0), f"connection left open after {stage} {data[:40]!r} seed={seed}"
        assert secure_node.alive()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile_connection())
    def attack(case: tuple[str, bytes, int]) -> None:
        send_hostile(*case)

    attack()
    assert set(stages) == {"raw", "hello", "proof", "frames"}, stages
    assert not secure_node.workers(), "a hostile connection got worker processes"
    wait_until(lambda: secure_node.fds() <= baseline_fds, what="the node's descriptors to return to the baseline")
    assert secure_node.rss() < baseline_rss + RSS_SLACK
    well_behaved_client_is_served(secure_node)


# --------------------------------------------------------------------------- 6. version skew


def test_versions_are_exchanged_in_the_handshake_and_welcome(secure_node: SecureNode) -> None:
    with RawClient(secure_node.endpoint) as client:
        client.handshake(secure_node.key)
        magic, version, status, _, _ = SERVER_HELLO.unpack_from(client.server_hello, 0)
        assert (magic, version, status) == (MAGIC, PROTOCOL_VERSION, STATUS_ACCEPTED)
        welcome = client.open_session()
    assert welcome["python"] == platform.python_version()
    assert welcome["cloudpickle"] == cloudpickle.__version__
    assert welcome["clusterexec"] == __version__
    with ClusterExecutor([secure_node.address], key_file=secure_node.key_file) as ex:
        assert ex.nodes[0].python == platform.python_version()


def test_a_client_of_another_protocol_version_is_refused_by_name(secure_node: SecureNode) -> None:
    since = secure_node.log.mark()
    with RawClient(secure_node.endpoint) as client:
        client.sock.sendall(record(HELLO.pack(MAGIC, 99, os.urandom(NONCE_SIZE)) + pack_json({"python": "3.99"})))
        refusal = client.read_record()
        assert client.closed_by_peer()
    magic, version, status = struct.unpack_from("!4sHB", refusal, 0)
    assert (magic, version, status) == (MAGIC, PROTOCOL_VERSION, STATUS_REFUSED)
    reason = refusal[7:].decode()
    assert f"version {PROTOCOL_VERSION}" in reason and "99" in reason
    # What a client of version 99 would make of it, if it reads refusals as this one does.
    with pytest.raises(VersionMismatchError, match="99"):
        ClientHandshake(secure_node.key, {}).on_server_hello(refusal)
    line = secure_node.log.wait_for(f"refused {client.peer}", since=since)
    assert f"version {PROTOCOL_VERSION}" in line and "99" in line
    assert not secure_node.workers()


class FakeNode:
    """A server on 127.0.0.1 that answers every ClientHello with ``reply`` and hangs up."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.hellos: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    records = RecordReader(max_records=1)
                    got: list[bytes] = []
                    while not got:
                        data = conn.recv(8192)
                        if not data:
                            break
                        got = records.feed(data)
                    self.hellos.extend(got)
                    conn.sendall(self.reply)
                    while conn.recv(8192):
                        pass
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(5.0)


SPEAKS_99 = record(
    SERVER_HELLO.pack(MAGIC, 99, STATUS_ACCEPTED, os.urandom(NONCE_SIZE), os.urandom(PROOF_SIZE))
    + pack_json({"workers": 1, "seal": "aes-gcm"})
)
REFUSES_AS_VERSION_2 = record(
    struct.pack("!4sHB", MAGIC, 2, STATUS_REFUSED)
    + b"node speaks clusterexec protocol version 2, the client speaks 1; install the same clusterexec release"
)


@pytest.mark.parametrize(
    ("reply", "theirs"), [(SPEAKS_99, 99), (REFUSES_AS_VERSION_2, 2)], ids=["hello-99", "refusal-2"]
)
def test_a_node_of_another_protocol_version_is_refused_by_name(key_file: Path, reply: bytes, theirs: int) -> None:
    fake = FakeNode(reply)
    try:
        with pytest.raises(VersionMismatchError) as caught:
            ClusterExecutor([fake.address], key_file=key_file, connect_timeout=5.0)
    finally:
        fake.close()
    message = str(caught.value)
    assert fake.address in message
    assert f"version {theirs}" in message and str(PROTOCOL_VERSION) in message
    # The client told its own version first, in the clear part of its hello.
    assert fake.hellos and HELLO.unpack_from(fake.hellos[0], 0)[1] == PROTOCOL_VERSION


def test_a_node_of_another_version_is_lost_while_the_others_work(secure_node: SecureNode) -> None:
    fake = FakeNode(SPEAKS_99)
    try:
        with ClusterExecutor([secure_node.address, fake.address], key_file=secure_node.key_file) as ex:
            assert ex.submit(helpers.square, 5).result(timeout=20) == 25
            lost = next(s for s in ex.nodes if s.address == fake.address)
            assert lost.error is not None and "version 99" in lost.error
    finally:
        fake.close()
