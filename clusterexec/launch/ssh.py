"""Starting a node on another machine over SSH, with nothing installed there but Python 3.

:class:`SshNode` logs in with paramiko (ssh-agent, ~/.ssh keys or ``key_filename=``; host keys
checked against known_hosts), runs the bootstrap of ``bootstrap.py`` with the remote ``python``
and feeds it the node program, so the node runs there from a zip of this interpreter's
clusterexec, cloudpickle and tblib. Without the cryptography package there, the node negotiates
HMAC-SHA256 sealing; the SSH connection encrypts. The node listens on the remote 127.0.0.1 only.

Its stdin stays open as the node's lifeline: closing the channel, or this process dying, stops
the node and its workers. Clients reach it through a tunnel: a port on this machine's 127.0.0.1
whose connections are forwarded over the SSH connection (``direct-tcpip``).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import select
import shlex
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paramiko

from clusterexec.errors import AuthenticationError, ClusterError, ConfigurationError, HostKeyError, NodeUnreachableError
from clusterexec.keys import new_key
from clusterexec.launch.bootstrap import command, startup_input
from clusterexec.launch.specs import NodeAddress, SshSpec
from clusterexec.wire.compression import check_codec

log = logging.getLogger("clusterexec.ssh")

OPTIONS = ("python", "workers", "key_filename", "known_hosts", "accept_unknown_host", "connect_timeout", "compress")
READY_LINE = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
START_TIMEOUT = 60.0
STOP_GRACE = 5.0
KEEPALIVE = 15
BUFFER = 65536


@dataclass(frozen=True)
class SshOptions:
    """The ``opt=val`` options of an SSH spec, checked and typed. ``compress`` is None when not
    given, ``"none"`` when turned off (``compress=0``), else the codec (``compress=1`` is zlib)."""

    python: str = "python3"
    workers: int = 0
    key_filename: str | None = None
    known_hosts: str | None = None
    accept_unknown_host: bool = False
    connect_timeout: float = 10.0
    compress: str | None = None

    @classmethod
    def from_spec(cls, spec: SshSpec, workers: int | None, connect_timeout: float) -> SshOptions:
        """Read and check the options of ``spec``; an option given there wins over the argument.
        Raises ConfigurationError naming the spec and the option."""

        def bad(name: str, expected: str) -> ConfigurationError:
            return ConfigurationError(f"SSH node {spec}: option {name}={spec.option(name)!r} must be {expected}")

        python = spec.option("python", "python3") or ""
        if not shlex.split(python):
            raise bad("python", "a command such as python3 or /usr/bin/python3")
        try:
            count = int(spec.option("workers", str(workers or 0)) or "")
        except ValueError:
            count = -1
        if count < 0:
            raise bad("workers", "a number: 0 (one per CPU) or more")
        try:
            timeout = float(spec.option("connect_timeout", str(connect_timeout)) or "")
        except ValueError:
            timeout = 0.0
        if not timeout > 0:
            raise bad("connect_timeout", "a positive number of seconds")
        accept = (spec.option("accept_unknown_host", "no") or "").lower()
        if accept not in ("yes", "no", "true", "false", "1", "0"):
            raise bad("accept_unknown_host", "yes or no")
        paths = {name: os.path.expanduser(spec.option(name) or "") or None for name in ("key_filename", "known_hosts")}
        for name, path in paths.items():
            if path is not None and not os.path.isfile(path):
                raise bad(name, "an existing file")
        compress = spec.option("compress")
        if compress is not None:
            try:
                compress = check_codec(compress, "option compress") or "none"
            except ConfigurationError as exc:
                raise ConfigurationError(f"SSH node {spec}: {exc}") from None
        accepted = accept in ("yes", "true", "1")
        return cls(python, count, paths["key_filename"], paths["known_hosts"], accepted, timeout, compress)


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with a message that says how to accept the key."""

    def __init__(self, where: str, known_hosts: str | None) -> None:
        self.where = where
        self.known_hosts = known_hosts or "~/.ssh/known_hosts"

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"SSH node {self.where}: host key {key.get_name()} {key.fingerprint} of {hostname} is not in "
            f"{self.known_hosts}; check it, then add it (`ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts`, "
            "or name a file with the known_hosts=PATH option), or accept it unchecked with the "
            "accept_unknown_host=yes option"
        )


class SshNode:
    """A node started on a remote host over SSH, tunnelled to a local port.

    The constructor blocks until the remote node is ready (connect, authenticate, start; at
    most ``connect_timeout`` for the SSH part and 60 s for the node to start) and raises
    :class:`~clusterexec.errors.ClusterError` subclasses naming the host:
    ``NodeUnreachableError``, ``AuthenticationError``, ``HostKeyError``, ``ConfigurationError``.
    Then ``address`` (a 127.0.0.1 port forwarding to the node) and ``key`` (the fresh key the node
    was started with) are what a client connects with; ``workers`` is the node's worker count and
    ``where`` its name for messages (``user@host[:port]``). What the node process prints (its
    logs) goes line by line to the ``clusterexec.ssh`` logger, prefixed by ``[user@host]``: its
    stderr at WARNING, its stdout at INFO. Use as a context manager, or call :meth:`stop`.
    """

    def __init__(self, spec: SshSpec, workers: int | None = None, connect_timeout: float = 10.0) -> None:
        self.spec = spec
        self.user = spec.user or getpass.getuser()
        port = f":{spec.port}" if spec.port != 22 else ""
        self.where = f"{self.user}@{spec.host}{port}"
        self.options = SshOptions.from_spec(spec, workers, connect_timeout)
        self.key = new_key().encode()
        self.workers = 0
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._closing = threading.Event()
        self._started = threading.Event()  # the ready line arrived, or stdout ended
        self._remote_port: int | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._output_lock = threading.Lock()  # guards _forwarding: stderr is held until ready
        self._forwarding = False
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._process: Any = None  # the paramiko.Channel running the node
        self._client = self._connect()
        try:
            self._start()
            self.address = self._open_tunnel()
        except BaseException:
            self.stop()
            raise
        with self._output_lock:
            self._forwarding = True
            for line in self._stderr:
                log.warning("[%s] %s", self.where, line)

    def __repr__(self) -> str:
        shown = getattr(self, "address", "not started")
        return f"<SshNode {self.where} at {shown}>"

    def __enter__(self) -> SshNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ connect

    def _connect(self) -> paramiko.SSHClient:
        opts, where, timeout = self.options, self.where, self.options.connect_timeout
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if opts.known_hosts:
            client.load_system_host_keys(opts.known_hosts)
        policy = paramiko.AutoAddPolicy() if opts.accept_unknown_host else _RefuseUnknownHost(where, opts.known_hosts)
        client.set_missing_host_key_policy(policy)
        try:
            client.connect(
                self.spec.host,
                self.spec.port,
                username=self.user,
                key_filename=opts.key_filename,
                allow_agent=True,
                look_for_keys=True,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException as exc:
            client.close()
            error = self._connect_error(exc)
            if error is exc:
                raise
            raise error from exc
        transport = client.get_transport()
        transport.set_keepalive(KEEPALIVE)
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    def _connect_error(self, exc: BaseException) -> BaseException:
        where, ssh = self.where, f"{self.spec.host}:{self.spec.port}"
        if isinstance(exc, ClusterError):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyError(
                f"SSH node {where}: the host key of {self.spec.host} ({exc.key.fingerprint}) differs from the one "
                "in known_hosts; someone may be intercepting the connection. If the host was reinstalled, "
                f"remove its old entry (`ssh-keygen -R {self.spec.host}`) and add the new one"
            )
        no_methods = isinstance(exc, paramiko.SSHException) and "No authentication methods" in str(exc)
        if isinstance(exc, paramiko.AuthenticationException) or no_methods:
            return AuthenticationError(
                f"SSH authentication failed for {where}: {exc}; make sure one of your keys is in "
                f"{self.user}'s ~/.ssh/authorized_keys there, and load it into ssh-agent or name it with "
                "the key_filename=PATH option"
            )
        if not isinstance(exc, (OSError, paramiko.SSHException, EOFError)):
            return exc
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.options.connect_timeout:g}s (the connect_timeout= option)"
        return NodeUnreachableError(
            f"cannot reach the SSH server of {where} at {ssh}: {reason}; check that sshd runs there "
            "and that the host and port are right"
        )

    # ------------------------------------------------------------------ start the node

    def _start(self) -> None:
        opts = self.options
        argv = ["--host", "127.0.0.1", "--port", "0", "--workers", str(opts.workers), "--exit-with-stdin"]
        argv += ["--log-level", "WARNING"]  # its stderr becomes client warnings: no session lines there
        payload = startup_input(self.key, argv)
        try:
            channel = self._process = self._client.get_transport().open_session(timeout=opts.connect_timeout)
            channel.exec_command(command(opts.python))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise NodeUnreachableError(f"SSH node {self.where}: cannot run a command there: {exc}") from exc
        channel.settimeout(START_TIMEOUT)
        try:
            channel.sendall(payload)
        except OSError:
            pass  # the remote command ended early: its exit status and stderr say why
        channel.settimeout(None)
        self._spawn(self._read_stdout, channel)
        stderr_reader = self._spawn(self._read_stderr, channel)
        if not self._started.wait(START_TIMEOUT):
            raise ClusterError(
                f"the clusterexec node on {self.where} did not start within {START_TIMEOUT:g}s; "
                f"its standard error so far:\n{self._stderr_text()}"
            )
        if self._remote_port is not None:
            return
        stderr_reader.join(STOP_GRACE)
        status = channel.exit_status if _exited(channel, STOP_GRACE) else None
        if status in (126, 127):
            raise ClusterError(
                f"cannot start a node on {self.where}: the Python command {opts.python!r} was not found or "
                f"cannot run there (exit status {status}: {self._stderr_text()}); install Python 3.10 or newer "
                "there, or name its interpreter with the python= option (for example python=/usr/bin/python3)"
            )
        raise ClusterError(
            f"the clusterexec node on {self.where} failed to start (exit status {status}); "
            f"its standard error:\n{self._stderr_text()}"
        )

    def _stderr_text(self) -> str:
        return "\n".join(self._stderr) or "(nothing)"

    def _spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=f"clusterexec-ssh {self.where}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _read_stdout(self, channel: Any) -> None:
        try:
            for line in _lines(channel.recv):
                match = None if self._started.is_set() else READY_LINE.search(line)
                if match:
                    self._remote_port, self.workers = int(match.group(2)), int(match.group(3))
                    self._started.set()
                else:
                    log.info("[%s] %s", self.where, line)
        finally:
            self._started.set()

    def _read_stderr(self, channel: Any) -> None:
        for line in _lines(channel.recv_stderr):
            with self._output_lock:
                self._stderr.append(line)
                if self._forwarding:
                    log.warning("[%s] %s", self.where, line)

    # ------------------------------------------------------------------ tunnel

    def _open_tunnel(self) -> NodeAddress:
        listener = self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.5)  # so the accept loop notices stop()
        self._spawn(self._accept_loop, listener)
        return NodeAddress("127.0.0.1", listener.getsockname()[1])

    def _accept_loop(self, listener: socket.socket) -> None:
        transport = self._client.get_transport()
        while not self._closing.is_set():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                channel = transport.open_channel(
                    "direct-tcpip", ("127.0.0.1", self._remote_port), peer, timeout=self.options.connect_timeout
                )
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.warning(
                    "[%s] cannot open a tunnel to the node (does sshd there allow it? AllowTcpForwarding): %s",
                    self.where,
                    exc,
                )
                sock.close()
                continue
            threading.Thread(
                target=_pump, args=(sock, channel), name=f"clusterexec-ssh tunnel {peer}", daemon=True
            ).start()

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """End the remote node and its workers, then close the tunnel and the SSH connection.

        Closes the node's stdin and waits (up to 5 s) for it to exit. Idempotent, thread-safe.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        channel = self._process
        if channel is not None:
            try:
                channel.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pass
            if not _exited(channel, STOP_GRACE):
                log.warning("[%s] the node did not exit within %gs of its stdin closing", self.where, STOP_GRACE)
        self._client.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(1.0)


def _exited(channel: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` for the remote command's exit status; True if it came."""
    deadline = time.monotonic() + timeout
    while not channel.exit_status_ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(channel.exit_status_ready())


def _lines(recv: Callable[[int], bytes]) -> Any:
    """Yield the decoded lines read with ``recv`` until it returns b"" (end of stream)."""
    partial = b""
    while True:
        try:
            data = recv(BUFFER)
        except (OSError, EOFError):
            data = b""
        if not data:
            break
        *complete, partial = (partial + data).split(b"\n")
        for line in complete:
            yield line.decode(errors="replace").rstrip("\r")
    if partial:
        yield partial.decode(errors="replace")


def _pump(sock: socket.socket, channel: Any) -> None:
    """Copy bytes both ways between a local connection and its SSH channel until one side closes."""
    try:
        while True:
            readable, _, _ = select.select([sock, channel], [], [])
            if sock in readable:
                data = sock.recv(BUFFER)
                if not data:
                    break
                channel.sendall(data)
            if channel in readable:
                data = channel.recv(BUFFER)
                if not data:
                    break
                sock.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        channel.close()
        sock.close()
