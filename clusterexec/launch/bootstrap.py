"""What starts a node on a host that has nothing but Python 3: the command line to run there
and the bytes to feed its stdin. Pure: no sockets, no SSH (``ssh.py`` carries the bytes).

As execnet does, the client sends the program itself. :func:`command` runs ``<python> -c
LOADER``; the one-line loader reads the :data:`BOOTSTRAP` source from stdin and runs it. The
bootstrap then reads, from :func:`startup_input`, the node's key, its arguments and a zip of the
pure-Python packages a node needs (clusterexec, cloudpickle, tblib, as installed in this
interpreter), writes the zip into a private temporary directory (0700, removed when the node
exits), puts it on ``sys.path`` (forked workers inherit it) and runs ``clusterexec.node``. The
rest of stdin is the node's lifeline (``--exit-with-stdin``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import shlex
import struct
import threading
import zipfile
from pathlib import Path

from clusterexec.errors import ClusterError, ConfigurationError

SHIPPED_PACKAGES = ("clusterexec", "cloudpickle", "tblib")
LENGTH = struct.Struct("!I")

# The remote command line: one line with nothing special to any shell inside its quotes.
LOADER = "import sys;i=sys.stdin.buffer;exec(i.read(int(i.readline())))"

# Runs on the remote host, in the -c interpreter: Python 3 and its standard library only.
BOOTSTRAP = r"""
import json, os, shutil, struct, sys, tempfile


def _clusterexec_node():
    stdin = sys.stdin.buffer

    def chunk():
        head = stdin.read(4)
        size = struct.unpack("!I", head)[0] if len(head) == 4 else -1
        data = stdin.read(size) if size >= 0 else b""
        if len(data) != size:
            raise SystemExit("clusterexec bootstrap: the client went away during start-up")
        return data

    if sys.version_info < (3, 10):
        raise SystemExit("clusterexec needs Python 3.10 or newer on the node; %s is Python %s"
                         % (sys.executable, sys.version.split()[0]))
    key, argv, bundle = chunk(), json.loads(chunk()), chunk()
    home = tempfile.mkdtemp(prefix="clusterexec-")
    pid = os.getpid()
    try:
        path = os.path.join(home, "clusterexec.zip")
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(bundle)
        sys.path.insert(0, path)
        os.environ["CLUSTEREXEC_KEY"] = key.decode()
        from clusterexec.node.__main__ import main
        return main(argv)
    finally:
        if os.getpid() == pid:  # not in a forked worker
            shutil.rmtree(home, ignore_errors=True)


sys.exit(_clusterexec_node())
"""

_bundle_lock = threading.Lock()
_bundle: bytes | None = None


def node_bundle() -> bytes:
    """A zip of the .py files of the packages a node needs, as installed here; built once per
    process (thread-safe). Raises ClusterError if one of them is not installed."""
    global _bundle
    with _bundle_lock:
        if _bundle is None:
            _bundle = _build_bundle(SHIPPED_PACKAGES)
        return _bundle


def _build_bundle(packages: tuple[str, ...]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in packages:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise ClusterError(f"cannot start SSH nodes: {name} is not installed in this Python")
            if spec.submodule_search_locations is None:
                files = [(Path(spec.origin), Path(spec.origin).name)]
            else:
                files = [
                    (path, Path(name, path.relative_to(root)).as_posix())
                    for root in map(Path, spec.submodule_search_locations)
                    for path in sorted(root.rglob("*.py"))
                    if "__pycache__" not in path.parts
                ]
            for path, arcname in files:
                info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
                bundle.writestr(info, path.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def command(python: str) -> str:
    """The shell command line that starts the bootstrap with interpreter ``python`` (words
    split and quoted as by a POSIX shell). Raises ConfigurationError for an empty command."""
    words = shlex.split(python)
    if not words:
        raise ConfigurationError(f"the python command {python!r} is empty; name an interpreter such as python3")
    return " ".join(shlex.quote(word) for word in words) + " -c " + shlex.quote(LOADER)


def startup_input(key: bytes, argv: list[str]) -> bytes:
    """What to write to the bootstrap's stdin: the bootstrap, the key, the node's arguments,
    the package zip. Keep stdin open afterwards: closing it stops the node."""
    source = BOOTSTRAP.encode()
    parts = [key, json.dumps(argv).encode(), node_bundle()]
    return b"%d\n" % len(source) + source + b"".join(LENGTH.pack(len(part)) + part for part in parts)
