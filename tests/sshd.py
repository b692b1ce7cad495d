"""A throwaway OpenSSH server on 127.0.0.1, and a bare Python, for the SSH node tests.

Everything lives in one directory: a host key, an authorized user key, a key that is *not*
authorized, a known_hosts file naming the host key, and the sshd_config. The server runs in the
foreground (``sshd -D -e``) and is killed by :meth:`SshServer.stop`.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it (made by .ci/run)


@dataclass
class SshServer:
    """A running sshd and the files a client needs to log in to it."""

    process: subprocess.Popen[bytes]
    port: int
    root: Path
    user_key: Path
    stranger_key: Path
    known_hosts: Path
    user: str

    def stop(self) -> None:
        """Kill the server (sessions it started end when their connections close)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        """What sshd wrote to its log so far (for failure messages)."""
        return (self.root / "sshd.log").read_text(errors="replace")


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_sshd(root: Path, timeout: float = 10.0) -> SshServer:
    """Generate keys and a config under ``root``, start sshd on a free port, wait until it listens."""
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key, stranger_key = root / "host_ed25519", root / "user_ed25519", root / "stranger_ed25519"
    _keygen(host_key, "test host")
    _keygen(user_key, "test user")
    _keygen(stranger_key, "not authorized")
    authorized = root / "authorized_keys"
    authorized.write_text(user_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port = _free_port()
    host_pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    config = root / "sshd_config"
    config.write_text(
        f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
PidFile {root / "sshd.pid"}
PermitRootLogin yes
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
AllowTcpForwarding yes
MaxStartups 50
"""
    )
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    with open(root / "sshd.log", "wb") as log:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    server = SshServer(process, port, root, user_key, stranger_key, known_hosts, getpass.getuser())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sshd did not start (exit status {process.poll()}):\n{server.log()}")


def bare_python(root: Path) -> Path:
    """Make a venv under ``root`` with nothing installed (no clusterexec, cloudpickle or
    cryptography) and return its interpreter: the stand-in for a remote host's python3."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    return root / "venv" / "bin" / "python"
