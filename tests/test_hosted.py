"""The local executor's node, hosted by the client's I/O thread (clusterexec/node/hosted.py).

``ClusterExecutor(2)`` runs no node process: its workers are children of the test process,
started by the I/O thread. These tests kill them for real (SIGKILL), let tasks run past their
timeouts, stop the workers, and check that the client never takes the exit status of a child
of its own program, which a node's wait4(-1) would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import wait
from pathlib import Path

import helpers
import psutil
import pytest
from conftest import wait_until

from clusterexec import ClusterExecutor, TaskTimeoutError, WorkerCrashedError
from clusterexec.node.hosted import can_host

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not can_host(), reason="hosting a node in the client needs pidfd_open (Linux 5.3+)"),
]


def workers_of_this_process() -> set[int]:
    """The pids of this process's children that serve a hosted node's worker channel."""
    found = set()
    for child in psutil.Process().children():
        try:
            if any("serve_spawned" in part for part in child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def test_a_worker_killed_mid_task_fails_that_task_alone_and_is_replaced(tmp_path: Path) -> None:
    with ClusterExecutor(2) as ex:
        started, release = tmp_path / "started", tmp_path / "release"
        doomed = ex.submit(helpers.announce_then_block, str(started), str(release))
        helpers.wait_for_file(str(started))
        victim = int(started.read_text())
        assert victim in workers_of_this_process()  # a child of this process: no node between
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            doomed.result(timeout=20)
        # The pool heals: two workers again, and tasks run on both.
        wait_until(lambda: len(workers_of_this_process()) == 2, timeout=20, what="a replacement worker")
        assert victim not in workers_of_this_process()
        assert sorted(ex.map(helpers.square, range(20))) == [i * i for i in range(20)]


def test_a_task_past_its_timeout_is_killed_and_the_pool_heals() -> None:
    with ClusterExecutor(2) as ex:
        wait_until(lambda: len(workers_of_this_process()) == 2, timeout=20, what="both workers up")
        before = workers_of_this_process()
        slow = ex.options(timeout=0.5).submit(helpers.sleep_and_pid, 30)
        with pytest.raises(TaskTimeoutError):
            slow.result(timeout=20)
        assert ex.submit(helpers.square, 7).result(timeout=20) == 49
        # The worker that ran it was killed and reaped; a new one took its place.
        wait_until(lambda: len(workers_of_this_process()) == 2, timeout=20, what="a replacement worker")
        assert len(before - workers_of_this_process()) == 1


def test_the_exit_status_of_the_programs_own_children_is_left_to_it() -> None:
    """A hosted node reaps its workers by pid: a subprocess of the user's program keeps its
    exit status for the program's own wait()."""
    with ClusterExecutor(2) as ex:
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet waited for
        # Make the hosted node reap: a worker dies, and its exit is collected.
        crashed = ex.submit(helpers.exit_worker, 3)
        with pytest.raises(WorkerCrashedError):
            crashed.result(timeout=20)
        assert ex.submit(helpers.square, 3).result(timeout=20) == 9
        assert child.wait(timeout=10) == 7


def test_output_printed_by_a_task_reaches_this_process_before_its_result(capfd: pytest.CaptureFixture[str]) -> None:
    with ClusterExecutor(2) as ex:
        assert ex.submit(print, "hello from a hosted worker").result(timeout=20) is None
        ex.shutdown(wait=True)
    out, _ = capfd.readouterr()
    assert "hello from a hosted worker" in out


def test_check_reports_the_hosted_node() -> None:
    with ClusterExecutor(2) as ex:
        assert ex.submit(helpers.square, 2).result(timeout=20) == 4
        report = ex.check()
        (node,) = report.nodes
        assert node.up and node.workers == 2 and node.address == "local"
        assert node.tasks_run >= 1


def test_terminate_workers_stops_every_worker_process(tmp_path: Path) -> None:
    ex = ClusterExecutor(2)
    started, release = tmp_path / "started", tmp_path / "release"
    running = ex.submit(helpers.block, str(started), str(release))
    ex.submit(helpers.square, 1).result(timeout=20)  # the other worker is up too
    helpers.wait_for_file(str(started))
    pids = workers_of_this_process()
    assert len(pids) == 2
    ex.terminate_workers()
    wait([running], timeout=20)
    assert running.done()
    assert "terminate_workers()" in str(running.exception())  # its worker was stopped running it
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=10)
    assert not alive


def test_many_threads_submitting_at_once_each_get_their_results() -> None:
    with ClusterExecutor(2) as ex:
        results: dict[int, list[int]] = {}

        def run(n: int) -> None:
            results[n] = [f.result(timeout=30) for f in [ex.submit(helpers.square, n * 100 + i) for i in range(50)]]

        threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == {n: [(n * 100 + i) ** 2 for i in range(50)] for n in range(4)}


CTRL_C_SCRIPT = """
import pathlib, sys, time
from clusterexec import ClusterExecutor

def nap(marker):
    pathlib.Path(marker).touch()
    time.sleep(60)

with ClusterExecutor(2) as ex:
    print("running", flush=True)
    ex.submit(nap, sys.argv[1]).result()
"""


def test_ctrl_c_stops_the_program_and_its_workers_with_one_traceback(tmp_path: Path) -> None:
    """A Ctrl-C at the terminal (SIGINT to the foreground process group) interrupts the program
    and the task its worker runs (as ProcessPoolExecutor's workers), so it exits at once; the
    workers print nothing and stop with it."""
    script, marker = tmp_path / "ctrl_c.py", tmp_path / "napping"
    script.write_text(CTRL_C_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "running\n"
        helpers.wait_for_file(str(marker))  # the task runs
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 2 and all(os.getpgid(w.pid) == process.pid for w in workers)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = process.communicate(timeout=20)  # not the task's 60 s
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert err.count("Traceback") == 1 and "KeyboardInterrupt" in err, err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


CTRL_C_QUEUE_SCRIPT = """
import pathlib, sys, time
from clusterexec import ClusterExecutor

def nap(marker):
    pathlib.Path(marker).touch()
    time.sleep(5)

with ClusterExecutor(2) as ex:
    futures = [ex.submit(nap, sys.argv[1] + str(i)) for i in range(20)]
    futures[0].result()
"""


def test_ctrl_c_in_a_with_block_cancels_the_tasks_that_have_not_started(tmp_path: Path) -> None:
    """After a Ctrl-C the executor's exit does not run the queued tasks first: the running ones
    are interrupted, those not yet handed to a worker cancelled (a worker freed by the interrupt
    may start one more before the cancel reaches it: that one runs)."""
    script = tmp_path / "ctrl_c_queue.py"
    script.write_text(CTRL_C_QUEUE_SCRIPT)
    marker = str(tmp_path / "napping-")
    process = subprocess.Popen(
        [sys.executable, str(script), marker], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_until(lambda: len(list(tmp_path.glob("napping-*"))) == 2, timeout=20, what="two tasks running")
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=20)  # not 18 more tasks of 5 s on 2 workers
    finally:
        if process.poll() is None:
            process.kill()
    assert "KeyboardInterrupt" in err, err
    assert len(list(tmp_path.glob("napping-*"))) <= 6  # 2 interrupted, a few handed over already

