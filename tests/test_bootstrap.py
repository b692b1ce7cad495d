"""The bootstrap that starts a node on a bare Python, run here without SSH: the command line in
a local shell, its stdin written by the test."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from sshd import bare_python

from clusterexec import ClusterExecutor
from clusterexec.keys import new_key
from clusterexec.launch.bootstrap import BOOTSTRAP, command, node_bundle, startup_input

READY = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
ARGV = ["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--exit-with-stdin"]


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bare_python(tmp_path_factory.mktemp("bare"))


def start(python: Path, tmp: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp)}
    return subprocess.Popen(
        command(str(python)), shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def test_the_bundle_holds_the_sources_a_node_needs() -> None:
    names = zipfile.ZipFile(BytesIO(node_bundle())).namelist()
    needed = ["clusterexec/node/__main__.py", "clusterexec/node/worker.py"]
    needed += ["cloudpickle/__init__.py", "tblib/__init__.py"]
    for name in needed:
        assert name in names
    assert all(name.endswith(".py") for name in names)
    assert node_bundle() is node_bundle()  # built once per process


def test_the_command_line_quotes_the_interpreter() -> None:
    line = command('"/opt/my python/bin/python3" -X dev')  # split as a POSIX shell would
    assert line.startswith("'/opt/my python/bin/python3' -X dev -c 'import sys;")
    assert "\n" not in line


def test_a_bare_python_runs_a_node_from_its_stdin_and_cleans_up(python: Path, tmp_path: Path) -> None:
    key = new_key().encode()
    process = start(python, tmp_path)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(startup_input(key, ARGV))
    process.stdin.flush()
    match = READY.search(process.stdout.readline().decode())
    assert match, process.stderr.read().decode() if process.stderr else ""
    (home,) = tmp_path.glob("clusterexec-*")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "clusterexec.zip").stat().st_mode) == 0o600
    with ClusterExecutor([(match.group(1), int(match.group(2)))], key=key) as ex:
        assert ex.submit(eval, "__import__('clusterexec').__file__").result(timeout=30).startswith(str(home))
        assert ex.submit(eval, "__import__('sys').executable").result(timeout=30) == str(python)
    process.stdin.close()  # the lifeline
    assert process.wait(10) == 0
    assert not home.exists()


def test_a_client_that_goes_away_during_start_up_is_reported(python: Path, tmp_path: Path) -> None:
    process = start(python, tmp_path)
    source = BOOTSTRAP.encode()
    _, err = process.communicate(b"%d\n" % len(source) + source + b"\x00\x00", timeout=10)
    assert process.returncode == 1
    assert b"the client went away during start-up" in err
    assert not list(tmp_path.glob("clusterexec-*"))


def test_an_old_python_is_refused(tmp_path: Path) -> None:
    # Stand-in for Python < 3.10: the bootstrap's version check, with sys.version_info faked.
    source = BOOTSTRAP.replace("sys.version_info < (3, 10)", "True").encode()
    process = subprocess.run(
        [sys.executable, "-c", "import sys;i=sys.stdin.buffer;exec(i.read(int(i.readline())))"],
        input=b"%d\n" % len(source) + source,
        capture_output=True,
    )
    assert process.returncode == 1
    assert b"clusterexec needs Python 3.10 or newer on the node" in process.stderr
