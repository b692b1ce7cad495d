"""Package versions as installed, read from their metadata without importing them.

The client notes the third-party packages its tasks refer to by reference (the pickler does,
:class:`~clusterexec.code.pickler.ShippingPickler`); ``ex.check()`` and ``clusterexec status
--packages`` ask each node for its versions of them and report those that differ; a worker that
fails to unpickle a task names the versions it has of the packages the pickle refers to.
Different versions on the two sides are the most common cause of remote failures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

# What a node answers for at most, per request, and the longest name it looks up.
MAX_NAMES = 4096
MAX_NAME = 200
NOT_INSTALLED = "not installed"
UNKNOWN = "unknown version"
# Top-level modules that are never a user's dependency to compare.
_OURS = frozenset({"builtins", "__main__", "__mp_main__", "clusterexec", "cloudpickle", "tblib", "copyreg"})
# Top-level module -> its distributions, read once per sys.path.
_distributions: tuple[tuple[str, ...], dict[str, list[str]]] | None = None


def third_party(module_name: object) -> str | None:
    """The top-level name of ``module_name`` if it may be a third-party package (not the
    standard library, not clusterexec's own), else None."""
    if not isinstance(module_name, str) or not module_name:
        return None
    top = module_name.partition(".")[0]
    if top in _OURS or top in sys.stdlib_module_names or top.startswith("_"):
        return None
    return top


def _distributions_by_module() -> dict[str, list[str]]:
    global _distributions
    path = tuple(sys.path)
    if _distributions is None or _distributions[0] != path:
        import importlib.metadata  # here: importing it costs a node's or worker's start-up

        _distributions = (path, dict(importlib.metadata.packages_distributions()))
    return _distributions[1]


def version_of(name: str) -> str:
    """The installed version of top-level package ``name``: from its distribution's metadata,
    UNKNOWN if it is importable without one, NOT_INSTALLED if it cannot be found. Never
    imports it."""
    import importlib.metadata
    import importlib.util

    for distribution in _distributions_by_module().get(name, []):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return UNKNOWN if found else NOT_INSTALLED


def installed_packages() -> list[str]:
    """The top-level import names of every package installed here (standard library aside)."""
    return sorted(name for name in _distributions_by_module() if third_party(name) is not None)


def versions(names: Iterable[object]) -> dict[str, str]:
    """``{name: version}`` for each well-formed top-level name (at most MAX_NAMES of them)."""
    out: dict[str, str] = {}
    for name in names:
        if len(out) >= MAX_NAMES:
            break
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isidentifier():
            out[name] = version_of(name)
    return out


def differences(here: dict[str, str], there: dict[str, object]) -> dict[str, tuple[str, str]]:
    """The packages installed here whose version differs there: ``{name: (here, there)}``.
    Names with no installed distribution here are the user's own code, shipped by source."""
    return {
        name: (mine, str(there[name]))
        for name, mine in sorted(here.items())
        if name in there and str(there[name]) != mine and mine not in (UNKNOWN, NOT_INSTALLED)
    }


def describe_differences(node: str, diffs: dict[str, tuple[str, str]]) -> str:
    """One line naming each differing package with both versions."""
    parts = [f"{name} {mine} here, {theirs} on node {node}" for name, (mine, theirs) in diffs.items()]
    return "package versions differ: " + "; ".join(parts)


def pickle_packages(data: bytes | bytearray | memoryview) -> list[str]:
    """The third-party top-level packages a pickle refers to by name (read from its opcodes,
    without loading it). Best effort: a malformed pickle yields what was read before the fault."""
    import pickletools  # here: only a failed task needs it

    found: list[str] = []
    recent: list[str | None] = []  # what the last opcodes pushed, when it was a string
    memo: dict[int, str | None] = {}
    module_next = False  # cloudpickle names a module it imports by its next string
    try:
        for opcode, arg, _ in pickletools.genops(bytes(data)):
            name = opcode.name
            arg_any: Any = arg
            if name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            if name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg_any] = recent[-1] if recent else None
                continue
            pushed: str | None = None
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                pushed = arg_any
                if module_next:
                    _add(found, arg_any)
                    module_next = False
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(arg_any)
            elif name == "STACK_GLOBAL" and len(recent) >= 2 and recent[-2]:
                _add(found, recent[-2])
                module_next = recent[-1] in ("subimport", "dynamic_subimport")
            elif name in ("GLOBAL", "INST") and isinstance(arg, str):
                _add(found, arg.partition(" ")[0])
            recent.append(pushed)
            if len(recent) > 16:
                del recent[:-2]
    except Exception:  # a pickle that failed to load may be malformed: keep what was read
        pass
    return found


def _add(found: list[str], module: str) -> None:
    top = third_party(module)
    if top is not None and top not in found:
        found.append(top)


def name_differences(error: BaseException, node: str) -> None:
    """If ``error`` (a task that failed to unpickle on ``node``) carries the node's versions of
    the packages its pickles named, add to its message those that differ from this side's."""
    there = getattr(error, "node_packages", None)
    if not isinstance(there, dict) or not there or not error.args or not isinstance(error.args[0], str):
        return
    diffs = differences(versions(there), there)
    if diffs:
        error.args = (f"{error.args[0]} The {describe_differences(node, diffs)}.", *error.args[1:])
