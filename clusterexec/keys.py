"""Shared keys: reading them from arguments, files and the environment, and making new ones.

A key file holds the key as text (``clusterexec keygen`` writes 64 hex digits). A key file
that group or others can read is refused.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from clusterexec.errors import KeyFileError

KEY_ENV = "CLUSTEREXEC_KEY"
KEY_FILE_ENV = "CLUSTEREXEC_KEY_FILE"


def _normalize(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    raw = raw.strip()
    if not raw:
        raise KeyFileError("the key is empty; run `clusterexec keygen PATH` to make one")
    return raw


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file; refuse one that is missing, empty, or readable by group or others."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"key file {p} does not exist; create one with `clusterexec keygen {p}`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {p} is readable by group or others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {p}`"
        )
    try:
        return _normalize(p.read_bytes())
    except KeyFileError:
        raise KeyFileError(f"key file {p} is empty; run `clusterexec keygen --force {p}`") from None


def resolve_key(key: str | bytes | None = None, key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The key to use: ``key``, else ``key_file``, else $CLUSTEREXEC_KEY, else
    $CLUSTEREXEC_KEY_FILE, else None (no key)."""
    if key is not None and key_file is not None:
        raise KeyFileError("pass either key= or key_file=, not both")
    if key is not None:
        return _normalize(key)
    if key_file is not None:
        return read_key_file(key_file)
    if os.environ.get(KEY_ENV):
        return _normalize(os.environ[KEY_ENV])
    if os.environ.get(KEY_FILE_ENV):
        return read_key_file(os.environ[KEY_FILE_ENV])
    return None


def new_key() -> str:
    """A fresh random key: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(32)


def write_key_file(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a fresh key to ``path`` with mode 0600; refuse to overwrite unless ``force``."""
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{p} already exists; pass --force to overwrite it") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (new_key() + "\n").encode())
    finally:
        os.close(fd)
    return p
