"""Running a shell command on many nodes (``clusterexec run``).

:func:`run_command` runs one :func:`run_shell` task pinned to each node through a
``ClusterExecutor`` and collects what each node did. ``run_shell`` lives in this importable
module of the package, so it is pickled by reference and every node already has it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clusterexec.cli.probe import DEFAULT_TIMEOUT, probe_all
from clusterexec.errors import ClusterError, ConfigurationError
from clusterexec.launch.specs import NodeAddress, SshSpec

if TYPE_CHECKING:
    import ssl

# How long run_command waits for a node's result past the command's own time limit.
RESULT_SLACK = 5.0


@dataclass(frozen=True)
class CommandResult:
    """What a shell command did on one node: its exit status and its output as bytes.

    ``exit_status`` is the shell's exit code, or minus the signal number that killed it
    (as :attr:`subprocess.Popen.returncode`); ``timed_out`` says it was killed for running
    past its time limit, ``limit`` seconds.
    """

    exit_status: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    limit: float | None = None

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0 in time."""
        return self.exit_status == 0 and not self.timed_out

    def describe(self) -> str:
        """How the command ended, in a few words: ``exit status 3``, ``killed by SIGKILL``..."""
        if self.timed_out:
            return f"timed out after {self.limit:g}s" if self.limit is not None else "timed out"
        if self.exit_status < 0:
            try:
                name = signal.Signals(-self.exit_status).name
            except ValueError:
                name = f"signal {-self.exit_status}"
            return f"killed by {name}"
        return f"exit status {self.exit_status}"


def run_shell(command: str, timeout: float | None = None) -> CommandResult:
    """Run ``command`` with ``/bin/sh`` and return its exit status and output (a task).

    Stdin is ``/dev/null``. The command runs in a process group of its own: past ``timeout``
    seconds the whole group is killed (SIGKILL) and the result says ``timed_out``, with the
    output printed so far; if the worker is terminated (its client went away), the group is
    killed first, so no command outlives its session.
    """
    with subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as process:
        restore = _kill_group_on_sigterm(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            try:
                stdout, stderr = process.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes
                stdout, stderr = b"", b""
            return CommandResult(process.wait(), stdout or b"", stderr or b"", timed_out=True, limit=timeout)
        finally:
            restore()
    return CommandResult(process.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group_on_sigterm(pgid: int) -> Callable[[], None]:
    """Until the returned function is called, SIGTERM kills group ``pgid`` and then this process."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        _kill_group(pgid)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_sigterm)
    return restore


@dataclass(frozen=True)
class NodeOutcome:
    """What :func:`run_command` learnt of one node. ``state`` is ``ok``, ``failed`` (the
    command exited non-zero or timed out), ``down`` (the node could not be reached) or
    ``error`` (no result came back); ``problem`` says why there is no result."""

    node: str
    state: str
    result: CommandResult | None = None
    problem: str = ""

    def as_dict(self) -> dict[str, object]:
        """The outcome as plain data (for JSON), output decoded as UTF-8."""
        result = self.result
        return {
            "node": self.node,
            "state": self.state,
            "exit_status": result.exit_status if result else None,
            "timed_out": result.timed_out if result else False,
            "stdout": result.stdout.decode(errors="replace") if result else "",
            "stderr": result.stderr.decode(errors="replace") if result else "",
            "reason": self.problem or (result.describe() if result and not result.ok else ""),
        }


@dataclass(frozen=True)
class CommandRun:
    """The outcome of :func:`run_command` on every node, in the order the nodes were given.

    ``abandoned`` is True when a node never sent its result: the executor still waits for it,
    so the caller should leave without waiting (``os._exit``) once it has printed the rest."""

    outcomes: list[NodeOutcome]
    abandoned: bool = False

    @property
    def ok(self) -> bool:
        """True if the command succeeded on every node."""
        return all(outcome.state == "ok" for outcome in self.outcomes)


def run_command(
    nodes: Sequence[NodeAddress | SshSpec],
    key: bytes | None,
    command: str,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> CommandRun:
    """Run the shell ``command`` on every node in parallel; blocks until all have answered.

    TCP nodes are probed first, so a node that is down is reported with the same reason as
    ``clusterexec status`` and is not waited for. The others get one :func:`run_shell` task
    each through a :class:`~clusterexec.ClusterExecutor` (one worker per node, no retries).
    ``timeout`` limits the command on each node; ``tls`` is the client TLS context for nodes
    started with ``--tls-cert``. Raises ConfigurationError for specs the executor does not accept.
    """
    outcomes: dict[str, NodeOutcome] = {}
    tcp = [spec for spec in nodes if isinstance(spec, NodeAddress)]
    for entry in probe_all(tcp, key, connect_timeout, tls).nodes:
        if not entry.up:
            outcomes[entry.address] = NodeOutcome(entry.address, "down", problem=entry.reason)
    usable = [spec for spec in nodes if str(spec) not in outcomes]
    abandoned = bool(usable) and _run_on(usable, key, command, timeout, connect_timeout, outcomes, tls)
    ordered = [outcomes.pop(str(spec)) for spec in nodes if str(spec) in outcomes]
    return CommandRun(ordered + list(outcomes.values()), abandoned)


def _run_on(
    nodes: list[NodeAddress | SshSpec],
    key: bytes | None,
    command: str,
    timeout: float | None,
    connect_timeout: float,
    outcomes: dict[str, NodeOutcome],
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Submit ``run_shell`` to every node and record the outcomes; True if one never answered."""
    from clusterexec.client.executor import ClusterExecutor  # here: a status probe starts faster without it

    try:
        ex = ClusterExecutor(
            list(nodes),
            max_workers=len(nodes),
            key=key,
            connect_timeout=connect_timeout,
            retries=0,
            forward_output=False,
            ssl_context=tls,
        )
    except ConfigurationError:
        raise
    except ClusterError as exc:
        for spec in nodes:
            outcomes[str(spec)] = NodeOutcome(str(spec), "down", problem=str(exc))
        return False
    futures: dict[str, Future[CommandResult]] = {}
    limit = None if timeout is None else timeout + connect_timeout + RESULT_SLACK
    try:
        for status in ex.nodes:
            if status.state != "ready":
                outcomes[status.address] = NodeOutcome(status.address, "down", problem=status.error or status.state)
            else:
                futures[status.address] = ex.submit_to(status, run_shell, command, timeout)
        wait(futures.values(), timeout=limit)
    except BaseException:  # Ctrl-C: cancel what can be, and let the caller leave
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    abandoned = False
    for name, future in futures.items():
        if not future.done():
            abandoned = True
            outcomes[name] = NodeOutcome(name, "error", problem=f"no result {limit:g}s after the command started")
            continue
        error = future.exception()
        if error is not None:
            outcomes[name] = NodeOutcome(name, "error", problem=f"{type(error).__name__}: {error}")
        else:
            result = future.result()
            outcomes[name] = NodeOutcome(name, "ok" if result.ok else "failed", result)
    ex.shutdown(wait=not abandoned, cancel_futures=True)
    return abandoned
