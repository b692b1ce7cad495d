"""SSH nodes: started through a real OpenSSH server on 127.0.0.1, run by a Python that has
neither clusterexec nor cryptography installed (a bare venv).

The server (tests/sshd.py) is started once for the module; it needs /usr/sbin/sshd, which
.ci/run installs. Each test starts its own node and stops it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from sshd import SSHD, SshServer, bare_python, start_sshd

from clusterexec import AuthenticationError, ClusterError, ClusterExecutor, ConfigurationError, NodeUnreachableError
from clusterexec.errors import HostKeyError
from clusterexec.launch.bootstrap import LOADER
from clusterexec.launch.specs import SshSpec, resolve_nodes
from clusterexec.launch.ssh import SshNode, SshOptions


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An OpenSSH server on 127.0.0.1 that accepts the test user's key."""
    if not SSHD.exists():
        pytest.skip(f"{SSHD} is not installed (.ci/run installs openssh-server)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "remote" interpreter: a bare venv, without clusterexec, cloudpickle or cryptography."""
    return bare_python(tmp_path_factory.mktemp("remote"))


@pytest.fixture(scope="module", autouse=True)
def no_personal_ssh_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the runner's ~/.ssh and ssh-agent out of the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.delenv("SSH_AUTH_SOCK", raising=False)
        yield


def make_spec(sshd: SshServer, python: Path | str, **options: str) -> SshSpec:
    """An SshSpec for the test server, logging in with the test key, checking its host key."""
    defaults = {"key_filename": str(sshd.user_key), "known_hosts": str(sshd.known_hosts), "python": str(python)}
    return SshSpec("127.0.0.1", sshd.user, sshd.port, tuple({**defaults, **options}.items()))


@pytest.fixture
def start_node(sshd: SshServer, remote_python: Path) -> Iterator[Callable[..., SshNode]]:
    """``start_node(workers, **options)`` starts an SshNode; all are stopped at teardown."""
    nodes: list[SshNode] = []

    def start(workers: int | None = None, /, **options: str) -> SshNode:
        node = SshNode(make_spec(sshd, remote_python, **options), workers=workers)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def bootstrap_processes() -> list[psutil.Process]:
    """Processes on this machine running the SSH node bootstrap."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if LOADER in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_tasks_run_on_the_remote_python(start_node: Callable[..., SshNode], remote_python: Path) -> None:
    node = start_node(2)
    assert node.workers == 2
    assert node.address.host == "127.0.0.1"
    with ClusterExecutor([node.address], key=node.key) as ex:
        pid = ex.submit(os.getpid).result(timeout=30)
        assert pid != os.getpid()
        assert psutil.Process(pid).cmdline()[0] == str(remote_python)
        assert ex.submit(eval, "__import__('sys').executable").result(timeout=30) == str(remote_python)
        # clusterexec came in the zip the client sent; cryptography is missing, so frames are HMAC-sealed.
        where = ex.submit(eval, "__import__('clusterexec').__file__").result(timeout=30)
        assert "clusterexec.zip" in where
        assert ex.submit(eval, "__import__('importlib.util').util.find_spec('cryptography')").result() is None
        assert list(ex.map(pow, range(100), [2] * 100)) == [i * i for i in range(100)]


def test_workers_option_wins_over_the_argument(start_node: Callable[..., SshNode]) -> None:
    node = start_node(2, workers="3")
    assert node.workers == 3


def test_stop_ends_the_remote_node_and_its_workers(start_node: Callable[..., SshNode]) -> None:
    node = start_node(2)
    ex = ClusterExecutor([node.address], key=node.key, reconnect_window=1.0)
    worker_pid = ex.submit(os.getpid).result(timeout=30)
    zip_path = ex.submit(eval, "__import__('clusterexec').__file__").result(timeout=30)
    remote_node = psutil.Process(worker_pid).parent()
    assert remote_node is not None and LOADER in " ".join(remote_node.cmdline())
    processes = [remote_node, *remote_node.children(recursive=True)]
    assert len(processes) >= 3  # the node and its two workers

    started = time.monotonic()
    node.stop()  # with a session still open: its workers must go too
    assert time.monotonic() - started < 5
    node.stop()  # idempotent
    ex.shutdown(wait=True, cancel_futures=True)

    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive
    assert not bootstrap_processes()
    assert not Path(zip_path).parent.exists()  # the private temp dir is removed


def test_a_key_not_authorized_is_an_authentication_error(sshd: SshServer, remote_python: Path) -> None:
    spec = make_spec(sshd, remote_python, key_filename=str(sshd.stranger_key))
    with pytest.raises(AuthenticationError, match=f"{sshd.user}@127.0.0.1:{sshd.port}"):
        SshNode(spec)


def test_an_unknown_host_key_is_refused(sshd: SshServer, remote_python: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="accept_unknown_host=yes") as caught:
        SshNode(make_spec(sshd, remote_python, known_hosts=str(empty)))
    assert isinstance(caught.value, ClusterError)
    assert "127.0.0.1" in str(caught.value)


def test_accept_unknown_host_yes(start_node: Callable[..., SshNode], tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    node = start_node(1, known_hosts=str(empty), accept_unknown_host="yes")
    with ClusterExecutor([node.address], key=node.key) as ex:
        assert ex.submit(abs, -3).result(timeout=30) == 3
    assert empty.read_text() == ""  # accepted for this connection only, never written


def test_a_missing_python_is_named(sshd: SshServer) -> None:
    with pytest.raises(ClusterError, match="/nonexistent/python3") as caught:
        SshNode(make_spec(sshd, "/nonexistent/python3"))
    assert f"@127.0.0.1:{sshd.port}" in str(caught.value)
    assert "python=" in str(caught.value)


def test_a_node_that_fails_to_start_shows_its_stderr(sshd: SshServer, remote_python: Path) -> None:
    python = f"{remote_python} -c 'raise SystemExit(\"no node today\")'"
    with pytest.raises(ClusterError, match="no node today") as caught:
        SshNode(make_spec(sshd, python))
    assert f"@127.0.0.1:{sshd.port}" in str(caught.value)
    assert "exit status 1" in str(caught.value)


def test_an_unreachable_ssh_port_is_named(sshd: SshServer, remote_python: Path) -> None:
    spec = SshSpec("127.0.0.1", sshd.user, 1, (("key_filename", str(sshd.user_key)),))
    with pytest.raises(NodeUnreachableError, match="127.0.0.1:1"):
        SshNode(spec)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("workers", "many"),
        ("workers", "-1"),
        ("connect_timeout", "0"),
        ("accept_unknown_host", "maybe"),
        ("key_filename", "/nonexistent/id_ed25519"),
        ("python", " "),
        ("compress", "gzip"),
    ],
)
def test_bad_options_are_named_before_connecting(option: str, value: str) -> None:
    spec = SshSpec("192.0.2.1", "someone", 22, ((option, value),))  # TEST-NET: never contacted
    with pytest.raises(ConfigurationError, match=f"ssh://someone@192.0.2.1: option {option}="):
        SshNode(spec)


@pytest.mark.parametrize(
    ("value", "codec"), [("zlib", "zlib"), ("1", "zlib"), ("LZMA", "lzma"), ("bz2", "bz2"), ("0", "none")]
)
def test_the_compress_option_names_a_codec_as_easycluster_did(value: str, codec: str) -> None:
    spec = resolve_nodes(f"alice@hpc01:compress={value}")[0]
    assert isinstance(spec, SshSpec)
    assert SshOptions.from_spec(spec, None, 10.0).compress == codec


@pytest.mark.timeout(120)
def test_an_easycluster_spec_string_starts_the_node_for_the_executor(sshd: SshServer, remote_python: Path) -> None:
    spec = make_spec(sshd, remote_python, workers="2")
    options = "".join(f":{k}={v}" for k, v in spec.options)
    text = f"{spec.user}@127.0.0.1:{spec.port}{options}"
    with ClusterExecutor([text]) as ex:
        assert [n.state for n in ex.nodes] == ["ready"]
        assert ex.nodes[0].address == str(spec)
        assert list(ex.map(pow, range(20), range(20))) == [i**i for i in range(20)]
        assert ex.submit_to(str(spec), abs, -4).result(timeout=30) == 4
    assert not bootstrap_processes()
