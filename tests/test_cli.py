"""The ``clusterexec`` command and the operations API it stands on.

Every CLI test runs the real command (``python -m clusterexec ...``) as a subprocess against
real nodes on loopback. Addresses 127.0.0.2 and 127.0.0.3 are loopback too on Linux, so two
nodes can share a port and fold into one node set (``127.0.0.[2-3]:PORT``). The last part
tests the Python API behind the commands: ``ex.check()``, ``ex.nodes``, ``ex.submit_to()``,
``ex.stats()`` and task output forwarding, the latter through client scripts run as
subprocesses so their stdout and stderr are captured as a user would see them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import NodeProcess, clean_env, cli, wait_until

from clusterexec import ClusterExecutor
from clusterexec.cli.main import fold_nodes
from clusterexec.cli.status import format_duration

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on: all bound at once, so none repeats."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class NodeLog:
    """Lines a node prints after its ready line (logs go to its stdout), read by a thread."""

    def __init__(self, node: NodeProcess) -> None:
        self.lines: list[str] = []
        self._new: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(node,), daemon=True).start()

    def _read(self, node: NodeProcess) -> None:
        assert node.process.stdout is not None
        for line in node.process.stdout:
            self._new.put(line)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first line (old or new) matching ``pattern``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                match = re.search(pattern, line)
                if match:
                    return match
            try:
                self.lines.append(self._new.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no node log line matched {pattern!r}; got {self.lines!r}")

    def drain(self, quiet_for: float = 0.3) -> list[str]:
        """Every line so far, after ``quiet_for`` seconds without a new one."""
        while True:
            try:
                self.lines.append(self._new.get(timeout=quiet_for))
            except queue.Empty:
                return self.lines



@pytest.fixture
def pair(node_factory: Callable[..., NodeProcess], key_file: Path) -> list[NodeProcess]:
    """Two nodes sharing one port, on 127.0.0.2 and 127.0.0.3 (NODE_TAG=same on both)."""
    first = node_factory("--host", "127.0.0.2", "--workers", "1", "--key-file", str(key_file), env={"NODE_TAG": "same"})
    second = node_factory(
        "--host", "127.0.0.3", "--port", str(first.port), "--workers", "1", "--key-file", str(key_file),
        env={"NODE_TAG": "same"},
    )  # fmt: skip
    return [first, second]


# --------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", [[], ["keygen"], ["node"], ["status"], ["run"]])
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "example" in done.stdout
    assert (f"clusterexec {command[0]}" if command else "clusterexec keygen") in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "n[1-"], "malformed node spec"),
        (["status", "127.0.0.1:1", "--timeout", "0"], "--timeout must be more than 0"),
        (["status", "127.0.0.1:1", "-k", "/nonexistent.key"], "does not exist"),
        (["status", "alice@n1"], "SSH node"),
        (["run", "127.0.0.1:1"], "give the command after --"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_fold_nodes_keeps_ports_apart() -> None:
    names = ["green36:15809", "green37:15809", "green39:15809", "gpu1:16000", "[::1]:15809"]
    assert fold_nodes(names) == "green[36-37,39]:15809,gpu1:16000,[::1]:15809"  # in order of first appearance
    assert fold_nodes(names[:3], show_ports=False) == "green[36-37,39]"
    # Several patterns on one port: the port follows each of them, so the result is a valid NODES.
    assert fold_nodes(["a1:5", "b2:5", "b3:5", "b4:5"]) == "a1:5,b[2-4]:5"
    assert [format_duration(s) for s in (42, 312, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "42s",
        "5m12s",
        "3h05m",
        "2d04h",
    ]


# --------------------------------------------------------------------------- status


def test_status_prints_a_row_per_node_and_exits_1_if_one_is_down(
    node: NodeProcess, pair: list[NodeProcess], key_file: Path
) -> None:
    dead = free_port()
    nodeset = f"127.0.0.[2-3]:{pair[0].port}"
    done = cli("status", node.address, nodeset, f"127.0.0.1:{dead}", "-k", str(key_file))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    header = ["NODE", "STATE", "WORKERS", "BUSY", "SESSIONS", "PROCS", "TASKS", "PYTHON", "CLUSTEREXEC", "UPTIME"]
    assert lines[0].split() == header
    up = lines[1].split()
    assert up[:7] == [node.address, "up", "2", "0", "0", "0", "0"]
    assert up[7] == ".".join(map(str, sys.version_info[:3]))
    assert up[8] == "0.1.0" and up[9].endswith("s")
    assert lines[2].split()[:3] == [f"127.0.0.2:{pair[0].port}", "up", "1"]
    assert lines[3].split()[:3] == [f"127.0.0.3:{pair[0].port}", "up", "1"]
    assert lines[4].split()[:2] == [f"127.0.0.1:{dead}", "down"] and "refused" in lines[4]
    assert lines[5] == "3 of 4 nodes up"


def test_status_json_exits_0_when_all_are_up_and_opens_no_session(node: NodeProcess, key_file: Path) -> None:
    env = clean_env(CLUSTEREXEC_KEY=key_file.read_text().strip())  # the key from the environment
    done = cli("status", node.address, "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["all_up"] is True and report["up"] == report["total"] == 1
    (entry,) = report["nodes"]
    assert entry["address"] == node.address and entry["up"] is True and entry["workers"] == 2
    assert entry["uptime"] > 0 and entry["clusterexec"] == "0.1.0"
    assert psutil.Process(node.process.pid).children() == []  # the probe forked no worker


def test_status_says_authentication_failed_for_a_wrong_key(node: NodeProcess, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    assert cli("keygen", str(wrong)).returncode == 0
    done = cli("status", node.address, "-k", str(wrong))
    assert done.returncode == 1
    assert "authentication failed" in done.stdout


def test_status_of_50_nodes_some_down_or_silent_takes_about_one_timeout(
    node_factory: Callable[..., NodeProcess], key_file: Path
) -> None:
    with ThreadPoolExecutor(8) as pool:
        nodes = list(pool.map(lambda _: node_factory("--workers", "1", "--key-file", str(key_file)), range(8)))
    silent = []  # accept connections (the kernel completes them) but never answer
    for _ in range(4):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        silent.append(sock)
    refused = [f"127.0.0.1:{port}" for port in free_ports(38)]
    quiet = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
    names = [n.address for n in nodes] + quiet + refused
    try:
        started = time.monotonic()
        done = cli("status", *names, "-k", str(key_file), "--timeout", "2", "--json")
        elapsed = time.monotonic() - started
    finally:
        for sock in silent:
            sock.close()
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["up"], report["total"]) == (8, 50)
    by_address = {entry["address"]: entry for entry in report["nodes"]}
    assert [entry["address"] for entry in report["nodes"]] == names  # in the order given
    assert all("timed out" in by_address[name]["reason"] for name in quiet)
    assert all("refused" in by_address[name]["reason"] for name in refused)
    assert elapsed < 2 + 3.0, f"50 nodes took {elapsed:.1f}s with --timeout 2"


def test_status_watch_refreshes_until_ctrl_c_then_exits_0(node: NodeProcess, key_file: Path) -> None:
    args = ["status", node.address, "-k", str(key_file), "--json", "--watch", "0.2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "clusterexec", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first, second = json.loads(process.stdout.readline()), json.loads(process.stdout.readline())
        assert first["all_up"] and second["all_up"] and second["time"] > first["time"]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- run


def test_run_groups_identical_outputs_under_the_folded_node_set(
    node_factory: Callable[..., NodeProcess], pair: list[NodeProcess], key_file: Path
) -> None:
    other = node_factory("--workers", "1", "--key-file", str(key_file), env={"NODE_TAG": "other"})
    port = pair[0].port
    done = cli("run", f"127.0.0.[2-3]:{port}", other.address, "-k", str(key_file), "--", "echo", "$NODE_TAG; uname")
    assert done.returncode == 0, done.stderr
    uname = os.uname().sysname
    assert done.stdout.splitlines() == [
        f"127.0.0.[2-3]:{port}: same",
        f"127.0.0.[2-3]:{port}: {uname}",
        f"{other.address}: other",
        f"{other.address}: {uname}",
    ]
    assert done.stderr == ""
    # When every node listens on --port, the node sets are host names only.
    done = cli("run", "127.0.0.[2-3]", "--port", str(port), "-k", str(key_file), "--", "echo $NODE_TAG >&2")
    assert done.returncode == 0
    assert (done.stdout, done.stderr) == ("", "127.0.0.[2-3]: same\n")


def test_run_reports_failed_and_down_nodes_and_exits_1(
    node_factory: Callable[..., NodeProcess], pair: list[NodeProcess], key_file: Path
) -> None:
    bad = node_factory("--workers", "1", "--key-file", str(key_file), env={"NODE_TAG": "bad"})
    dead = f"127.0.0.1:{free_port()}"
    nodes = [f"127.0.0.[2-3]:{pair[0].port}", bad.address, dead]
    done = cli("run", *nodes, "-k", str(key_file), "--", 'test "$NODE_TAG" = bad && exit 3; echo fine')
    assert done.returncode == 1
    assert done.stdout == f"127.0.0.[2-3]:{pair[0].port}: fine\n"
    assert done.stderr.splitlines() == [
        f"clusterexec run: {bad.address}: exit status 3",
        f"clusterexec run: {dead}: down: refused (nothing listens on port {dead.rsplit(':')[1]})",
        "clusterexec run: 2 of 4 nodes failed or were down",
    ]
    done = cli("run", *nodes, "-k", str(key_file), "--json", "--", 'test "$NODE_TAG" = bad && exit 3; echo fine')
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["command"] == 'test "$NODE_TAG" = bad && exit 3; echo fine'
    states = {entry["node"]: (entry["state"], entry["exit_status"], entry["stdout"]) for entry in report["nodes"]}
    assert states == {
        f"127.0.0.2:{pair[0].port}": ("ok", 0, "fine\n"),
        f"127.0.0.3:{pair[0].port}": ("ok", 0, "fine\n"),
        bad.address: ("failed", 3, ""),
        dead: ("down", None, ""),
    }


def test_run_timeout_kills_the_command_and_its_children(node: NodeProcess, key_file: Path) -> None:
    marker = f"sleep {40 + time.time() % 1:.6f}"  # a command line no other process has
    started = time.monotonic()
    done = cli("run", node.address, "-k", str(key_file), "--timeout", "1", "--", f"echo started; {marker}; echo never")
    assert time.monotonic() - started < 10
    assert done.returncode == 1
    assert done.stdout == f"{node.address}: started\n"
    assert f"{node.address}: timed out after 1s" in done.stderr

    def sleeping() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == shlex.split(marker)]

    wait_until(lambda: not sleeping(), 5, "the timed-out command to be killed")


def test_run_interrupted_by_ctrl_c_exits_130_and_the_command_dies(node: NodeProcess, key_file: Path) -> None:
    marker = f"sleep {50 + time.time() % 1:.6f}"
    process = subprocess.Popen(
        [sys.executable, "-m", "clusterexec", "run", node.address, "-k", str(key_file), "--", marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip

    def sleeping() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == shlex.split(marker)]

    try:
        wait_until(sleeping, 10, "the command to start on the node")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr == "clusterexec run: interrupted\n"
    wait_until(lambda: not sleeping(), 5, "the node to kill the command of the session that ended")


# --------------------------------------------------------------------------- node


def test_print_systemd_unit_runs_the_same_node_at_boot(tmp_path: Path, key_file: Path) -> None:
    args = ["--host", "127.0.0.1", "--port", "0", "--workers", "3", "--key-file", key_file.name, "--log-level", "info"]
    done = cli("node", *args, "--print-systemd-unit", cwd=str(key_file.parent))
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    assert "WantedBy=multi-user.target" in unit and "Restart=on-failure" in unit
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    command = shlex.split(exec_start.removeprefix("ExecStart="))
    assert command[:3] == [os.path.abspath(sys.executable), "-m", "clusterexec.node"]
    assert "--print-systemd-unit" not in command
    assert command[command.index("--key-file") + 1] == str(key_file)  # made absolute
    assert command[command.index("--workers") + 1] == "3"
    # What the unit would start is a working node with the same options.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    try:
        assert process.stdout is not None
        assert re.search(r"listening on 127\.0\.0\.1:\d+ \(3 workers\)", process.stdout.readline())
    finally:
        process.kill()
        process.communicate()


def test_node_logs_one_line_per_session_start_and_end_at_its_default_level(
    node_factory: Callable[..., NodeProcess], key_file: Path
) -> None:
    node = node_factory("--workers", "2", "--key-file", str(key_file))  # no --log-level
    log = NodeLog(node)
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        assert list(ex.map(helpers.square, range(3))) == [0, 1, 4]
        with pytest.raises(ValueError):
            ex.submit(helpers.fail).result(timeout=10)
    started = log.wait_for(r"INFO session from (127\.0\.0\.1:\d+) started with 2 workers")
    peer = re.escape(started.group(1))
    log.wait_for(rf"INFO session from {peer} ended \(client said goodbye\) after [0-9.]+s: 4 tasks run, 1 failed")
    node.stop()
    lines = [line for line in log.drain() if "session from" in line]
    assert len(lines) == 2, lines
    assert re.search(r"4 tasks run, 1 failed, 0 crashed, 0 cancelled$", lines[1])


def test_a_status_probe_logs_no_session_line(node_factory: Callable[..., NodeProcess], key_file: Path) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file), "--log-level", "INFO")
    log = NodeLog(node)
    assert cli("status", node.address, "-k", str(key_file)).returncode == 0
    assert [line for line in log.drain() if "session" in line] == []


def test_node_quiet_logs_errors_only(node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file), "--quiet", "--log-level", "DEBUG")
    log = NodeLog(node)
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        assert ex.submit(helpers.square, 3).result() == 9
    wrong = tmp_path / "wrong.key"
    cli("keygen", str(wrong))
    assert cli("status", node.address, "-k", str(wrong)).returncode == 1  # a WARNING on the node
    assert log.drain() == []


# --------------------------------------------------------------------------- the Python API behind the commands


def test_nodes_submit_to_and_check(node_factory: Callable[..., NodeProcess], key_file: Path) -> None:
    first = node_factory("--workers", "1", "--key-file", str(key_file), env={"NODE_TAG": "first"})
    second = node_factory("--workers", "2", "--key-file", str(key_file), env={"NODE_TAG": "second"})
    with ClusterExecutor([first.address, second.address], key_file=key_file, reconnect_window=60) as ex:
        assert [(n.address, n.state, n.workers) for n in ex.nodes] == [
            (first.address, "ready", 1),
            (second.address, "ready", 2),
        ]
        for target in (first, second):
            assert ex.submit_to(target.address, os.getenv, "NODE_TAG").result(10) == (
                "first" if target is first else "second"
            )
        report = ex.check()
        assert report.all_up and len(report) == 2
        assert [(r.address, r.up, r.workers) for r in report.nodes] == [
            (first.address, True, 1),
            (second.address, True, 2),
        ]
        assert report.nodes[0].tasks_run >= 1 and report.nodes[0].python == report.nodes[1].python
        second.stop(signal.SIGKILL)
        wait_until(lambda: not ex.check(timeout=1).all_up, 15, "check() to see the killed node")
        down = ex.check(timeout=1)
        assert [r.up for r in down.nodes] == [True, False] and down.nodes[1].reason


def test_stats_count_queued_in_flight_done_and_failed_per_node(
    node: NodeProcess, key_file: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    with ClusterExecutor([node.address], key_file=key_file) as ex:
        for future in [ex.submit(helpers.square, 2), ex.submit(helpers.fail), ex.submit(helpers.square, 3)]:
            future.exception(10)
        blocked = [ex.submit(helpers.block, str(tmp_path / f"started{i}"), str(release)) for i in range(2)]
        wait_until(lambda: ex.stats().nodes[node.address].in_flight == 2, 10, "two tasks running")
        stats = ex.stats()
        assert stats.queued == 0
        assert stats.nodes[node.address].done == 3 and stats.nodes[node.address].failed == 1
        release.touch()
        for future in blocked:
            future.result(10)
        final = ex.stats().nodes[node.address]
        assert (final.queued, final.in_flight, final.done, final.failed) == (0, 0, 5, 1)


CLIENT = """\
import sys, time
from pathlib import Path
from clusterexec import ClusterExecutor

def shout(tag, barrier=None):
    if barrier:  # both clients print at the same time
        Path(barrier, tag).touch()
        while len(list(Path(barrier).iterdir())) < 2:
            time.sleep(0.01)
    for i in range(20):
        print(f"{tag} out {i}", flush=True)
        print(f"{tag} err {i}", file=sys.stderr, flush=True)
    print(f"{tag} no newline", end="")
    return tag

if __name__ == "__main__":
    address, key_file, mode, tag = sys.argv[1:5]
    barrier = sys.argv[5] if len(sys.argv) > 5 else None
    options = {"prefix": {}, "none": {"output_prefix": None}, "off": {"forward_output": False}}[mode]
    with ClusterExecutor([address], key_file=key_file, **options) as ex:
        assert ex.submit(shout, tag, barrier).result() == tag
    print("client done", flush=True)
"""


def run_client(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
    )


def expected(prefix: str, tag: str, stream: str) -> list[str]:
    return [f"{prefix}{tag} {stream} {i}" for i in range(20)]


@pytest.mark.parametrize("mode", ["prefix", "none", "off"])
def test_task_output_reaches_the_client_line_by_line(
    node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path, mode: str
) -> None:
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    log = NodeLog(node)
    stdout, stderr = run_client(tmp_path, node.address, str(key_file), mode, "T").communicate(timeout=30)
    prefix = {"prefix": f"[{node.address}] ", "none": "", "off": None}[mode]
    if prefix is None:  # left on the node: printed where the node's own output goes
        assert (stdout, stderr) == ("client done\n", "")
        log.wait_for("T out 19")
        log.wait_for("T err 19")
        return
    assert stdout.splitlines() == [*expected(prefix, "T", "out"), f"{prefix}T no newline", "client done"]
    assert stderr.splitlines() == expected(prefix, "T", "err")


def test_task_output_never_reaches_another_client_of_the_node(
    node: NodeProcess, key_file: Path, tmp_path: Path
) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    for tag in "AB":
        (tmp_path / tag).mkdir()
    clients = {
        tag: run_client(tmp_path / tag, node.address, str(key_file), "prefix", tag, str(barrier)) for tag in "AB"
    }
    for tag, process in clients.items():
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        prefix = f"[{node.address}] "
        assert stdout.splitlines() == [*expected(prefix, tag, "out"), f"{prefix}{tag} no newline", "client done"]
        assert stderr.splitlines() == expected(prefix, tag, "err")
