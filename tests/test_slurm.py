"""Slurm, against a real slurmctld and slurmd on this machine (``.ci/slurm-up``, node ``localhost``).

Users' scripts run under ``salloc`` and ``sbatch --wait``; ``from_slurm`` submits from outside
an allocation; shutdown and the client's death end the job. Set CLUSTEREXEC_NO_SLURM=1 to skip
these tests on a machine without Slurm; without it, a missing Slurm fails them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_key_file, start_node, wait_until

from clusterexec import ClusterExecutor, ConfigurationError
from clusterexec.launch.sbatch import sbatch_command
from clusterexec.launch.srun import parse_ready

ROOT = Path(__file__).resolve().parent.parent
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_ID")
pytestmark = pytest.mark.timeout(180)


def squeue(job_id: str) -> str:
    """The job's state as squeue lists it ('' once it has left the queue)."""
    return subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()


def slurm_job_id(_: object = None) -> str | None:
    """The Slurm job the calling process runs in (a task: where it ran)."""
    return os.environ.get("SLURM_JOB_ID")


def outside_slurm_env() -> dict[str, str]:
    """This environment with no trace of an allocation, and this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("CLUSTEREXEC_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """A running one-host Slurm cluster: started by .ci/slurm-up (idempotent) if it is not up."""
    if os.environ.get("CLUSTEREXEC_NO_SLURM") == "1":
        pytest.skip("CLUSTEREXEC_NO_SLURM=1: no Slurm cluster on this machine")
    up = subprocess.run(["bash", str(ROOT / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, f".ci/slurm-up failed (set CLUSTEREXEC_NO_SLURM=1 to skip):\n{up.stdout}{up.stderr}"
    yield


USER_SCRIPT = textwrap.dedent(
    """
    import os
    import socket
    from clusterexec import ClusterExecutor


    def where(x):
        return os.environ.get("SLURM_JOB_ID"), os.getpid(), x * x


    if __name__ == "__main__":
        with ClusterExecutor("slurm") as ex:
            addresses = [node.address for node in ex.nodes]
            results = list(ex.map(where, range(20)))
        print("nodes", addresses)
        print("squares", [r[2] for r in results])
        print("jobs", sorted({r[0] for r in results}))
        print("workers", len({r[1] for r in results}) >= 1)
    """
)


def check_user_script_output(output: str) -> None:
    assert "squares " + str([x * x for x in range(20)]) in output, output
    (nodes_line,) = [line for line in output.splitlines() if line.startswith("nodes ")]
    assert "'127." in nodes_line, f"the node does not listen on loopback: {nodes_line}"
    (jobs_line,) = [line for line in output.splitlines() if line.startswith("jobs ")]
    assert "None" not in jobs_line, f"tasks did not run inside the allocation: {jobs_line}"


def test_a_script_under_salloc_starts_its_nodes(slurm: None, tmp_path: Path) -> None:
    """`salloc -N1 python analysis.py` with ClusterExecutor("slurm"): the nodes start with srun
    inside the allocation, run the tasks, and are gone when the script ends."""
    script = tmp_path / "analysis.py"
    script.write_text(USER_SCRIPT)
    run = subprocess.run(
        ["salloc", "-N1", "-c2", "--time=5", "--job-name=ce-salloc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
        env=outside_slurm_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    check_user_script_output(run.stdout)
    assert "Granted job allocation" in run.stderr


def test_a_script_under_sbatch_wait_starts_its_nodes(slurm: None, tmp_path: Path) -> None:
    """The same script as a batch job (`sbatch --wait`); its output file holds the results."""
    script = tmp_path / "analysis.py"
    script.write_text(USER_SCRIPT)
    batch = tmp_path / "job.sh"
    batch.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    output = tmp_path / "job.out"
    run = subprocess.run(
        ["sbatch", "--wait", "-N1", "-c2", "--time=5", f"--output={output}", str(batch)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
        env=outside_slurm_env(),
    )
    text = output.read_text() if output.exists() else ""
    assert run.returncode == 0, run.stdout + run.stderr + text
    check_user_script_output(text)


def test_slurm_outside_an_allocation_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError) as caught:
        ClusterExecutor("slurm")
    message = str(caught.value)
    assert "salloc" in message and "from_slurm" in message and "slurm:PORT" in message


def test_slurm_with_a_port_connects_to_nodes_already_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """'slurm:PORT' keeps its meaning: the allocation's hosts on PORT, nothing started."""
    key_file = make_key_file(tmp_path)
    node = start_node("--workers", "1", "--key-file", str(key_file))
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
        with ClusterExecutor(f"slurm:{node.port}", key_file=key_file) as ex:
            assert [n.address for n in ex.nodes] == [f"localhost:{node.port}"]
            assert ex.submit(pow, 3, 4).result(timeout=30) == 81
    finally:
        node.stop()


def test_a_node_takes_its_key_on_stdin(tmp_path: Path) -> None:
    """`--key-stdin`: the first line of stdin is the key (no file, not on the command line)."""
    key = os.urandom(32).hex()
    command = [sys.executable, "-m", "clusterexec.node", "--port", "0", "--workers", "1", "--key-stdin"]
    process = subprocess.Popen(
        [*command, "--exit-with-stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=outside_slurm_env()
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(key.encode() + b"\n")
        process.stdin.flush()
        ready = parse_ready(process.stdout.readline())
        assert ready is not None
        with ClusterExecutor([(ready.address.host, ready.address.port)], key=key) as ex:
            assert ex.submit(pow, 2, 5).result(timeout=30) == 32
        process.stdin.close()  # the lifeline: the node stops
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_node_that_comes_up_later_joins_the_executor(tmp_path: Path) -> None:
    """How from_slurm adds the nodes after the first: tasks run at once on the first node, and
    the second takes tasks once it joins."""
    key_file = make_key_file(tmp_path)
    first = start_node("--workers", "1", "--key-file", str(key_file))
    second = start_node("--workers", "1", "--key-file", str(key_file))
    try:
        with ClusterExecutor([first.address], key_file=key_file) as ex:
            assert ex.submit(pow, 2, 2).result(timeout=30) == 4
            from clusterexec.launch.specs import NodeAddress

            ex._add_node(NodeAddress(second.host, second.port), key_file.read_text().strip().encode())
            wait_until(lambda: len(ex.nodes) == 2 and all(n.state == "ready" for n in ex.nodes), 30, "the join")
            targets = [ex.submit_to(node, os.getpid) for node in ex.nodes]
            assert len({f.result(timeout=30) for f in targets}) == 2
    finally:
        first.stop()
        second.stop()


def test_from_slurm_runs_tasks_and_shutdown_ends_the_job(slurm: None) -> None:
    """From outside an allocation: one job, tasks on its node, and after shutdown the job has
    left the queue."""
    env_before = {name: os.environ.pop(name) for name in SLURM_ENV if name in os.environ}
    try:
        with ClusterExecutor.from_slurm(nodes=1, time="00:05:00", cpus_per_task=2, start_timeout=120) as ex:
            job_ids = set(ex.map(slurm_job_id, range(4)))
            assert len(job_ids) == 1 and None not in job_ids
            (job_id,) = job_ids
            assert squeue(job_id) == "RUNNING"
            assert ex.nodes[0].address.startswith("127.")
        assert squeue(job_id) == "", f"job {job_id} is still listed after shutdown"
    finally:
        os.environ.update(env_before)


def test_from_slurm_passes_sbatch_refusals_on() -> None:
    """A job sbatch refuses raises at once with sbatch's own message."""
    if os.environ.get("CLUSTEREXEC_NO_SLURM") == "1":
        pytest.skip("CLUSTEREXEC_NO_SLURM=1: no Slurm cluster on this machine")
    with pytest.raises(ConfigurationError, match="sbatch refused the job.*(?i:partition)"):
        ClusterExecutor.from_slurm(nodes=1, partition="no-such-partition")


def test_sbatch_options_become_flags() -> None:
    command = sbatch_command(2, "01:00:00", "compute", {"cpus_per_task": 8, "exclusive": True, "mem": None})
    assert "--nodes=2" in command and "--time=01:00:00" in command and "--partition=compute" in command
    assert "--cpus-per-task=8" in command and "--exclusive" in command
    assert not any(arg.startswith("--mem") for arg in command)
    assert "--export=NONE,CLUSTEREXEC_KEY" in sbatch_command(1, options={"export": "NONE"})
    with pytest.raises(ConfigurationError):
        sbatch_command(0)


CLIENT_THAT_DIES = textwrap.dedent(
    """
    import os, sys
    from clusterexec import ClusterExecutor

    if __name__ == "__main__":
        ex = ClusterExecutor.from_slurm(nodes=1, time="00:05:00", start_timeout=120)
        job_id = ex.submit(lambda: os.environ.get("SLURM_JOB_ID")).result(timeout=60)
        print(job_id, flush=True)
        sys.stdin.read()  # until the test kills this process
    """
)


def test_killing_the_client_cancels_the_job(slurm: None, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_THAT_DIES)
    client = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=outside_slurm_env(),
    )
    try:
        assert client.stdout is not None
        job_id = client.stdout.readline().strip()
        assert job_id.isdigit(), f"the client printed {job_id!r}"
        assert squeue(job_id) == "RUNNING"
        os.kill(client.pid, signal.SIGKILL)
        client.wait(30)
        wait_until(lambda: squeue(job_id) == "", 60, f"job {job_id} to leave the queue after its client died")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if client.stdin is not None:
            client.stdin.close()
        if client.stdout is not None:
            client.stdout.close()
