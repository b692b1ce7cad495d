"""The layout shows the system: a file's folder says which process runs it, and imports point one way.

The rules live in ``tests/layout.py`` (which also generates the README's architecture tables);
these tests check them against the source, read with ``ast``, and against a real node process.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import start_node
from layout import (
    CLI_IMPORTERS,
    ROOMS,
    Module,
    all_imports,
    cycles,
    import_graph,
    imports_of,
    modules,
    readme_diff,
    room_of,
)

from clusterexec import ClusterExecutor

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 400


class KnownDebt(AssertionError):
    """A rule broken today only in the files that the client/ and node/ splits are rewriting.

    Tests marked ``xfail(strict=True, raises=KnownDebt)`` fail for real on any other offender,
    and fail as XPASS once the splits are merged: then drop the mark.
    """


def fail_if_any(offenders: dict[str, list[str]], what: str, known: frozenset[str] | set[str] = frozenset()) -> None:
    """Fail listing every offender (``{file: details}``); raise KnownDebt if all are ``known``."""
    if not offenders:
        return
    listing = "\n".join(f"  {name}" + "".join(f"\n    {d}" for d in offenders[name]) for name in sorted(offenders))
    message = f"{what}:\n{listing}"
    if set(offenders) <= known:
        raise KnownDebt(message)
    raise AssertionError(message)


def test_every_module_is_in_a_known_room() -> None:
    unknown = [module.relpath for module in modules().values() if module.room not in ROOMS]
    assert not unknown, f"modules outside the rooms of tests/layout.py (add the room and its rule there): {unknown}"


def test_imports_point_one_way() -> None:
    """Each room imports only the rooms its rule allows (node/ never client/, launch/ or cli/)."""
    broken = [
        f"{imp}: {room_of(imp.importer)}/ may import only {sorted(ROOMS[room_of(imp.importer)][1])}"
        for imp in all_imports()
        if room_of(imp.importer) in ROOMS and room_of(imp.imported) not in ROOMS[room_of(imp.importer)][1]
    ]
    assert not broken, "imports against the direction rules:\n" + "\n".join(broken)


def test_node_never_imports_the_client_side() -> None:
    """The rule the others protect, spelled out: the node program loads no client code."""
    client_side = {"client", "launch", "cli"}
    wrong = [
        str(imp) for imp in all_imports() if room_of(imp.importer) == "node" and room_of(imp.imported) in client_side
    ]
    assert not wrong, "node/ imports client-side code:\n" + "\n".join(wrong)


def test_nothing_imports_the_command_line() -> None:
    wrong = [
        str(imp)
        for imp in all_imports()
        if room_of(imp.imported) == "cli" and room_of(imp.importer) not in CLI_IMPORTERS
    ]
    assert not wrong, "only `python -m clusterexec` (clusterexec/__main__.py) may import cli/:\n" + "\n".join(wrong)


def test_imports_are_found_wherever_they_are() -> None:
    """The reader sees imports in functions and under TYPE_CHECKING, not only at the top."""
    found = {(imp.importer, imp.imported, imp.type_only, imp.in_function) for imp in all_imports()}
    assert ("clusterexec", "clusterexec.client.executor", False, True) in found  # the lazy __getattr__
    assert ("clusterexec", "clusterexec.client.executor", True, False) in found  # under TYPE_CHECKING


def test_no_import_cycles() -> None:
    """No two modules import each other, even for type checking only: a cycle means two modules
    that are really one, or a third module hiding between them."""
    found = cycles(import_graph())
    fail_if_any(
        {" <-> ".join(cycle): [] for cycle in found},
        "import cycles (type-only imports included)",
    )


def _class_sizes(module: Module) -> list[tuple[str, int]]:
    return [
        (node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ClassDef)
    ]


def test_modules_and_classes_stay_small() -> None:
    """No module over 500 lines and no class over 400: past that, look for the second responsibility."""
    offenders: dict[str, list[str]] = {}
    for module in modules().values():
        lines = len(module.path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.setdefault(module.relpath, []).append(f"{lines} lines (at most {MAX_MODULE_LINES})")
        for name, size in _class_sizes(module):
            if size > MAX_CLASS_LINES:
                offenders.setdefault(module.relpath, []).append(
                    f"class {name}: {size} lines (at most {MAX_CLASS_LINES})"
                )
    fail_if_any(offenders, "too large")


# concurrent.futures.Future's private fields, and its state names (module concurrent.futures._base).
FUTURE_FIELDS = {"_condition", "_waiters", "_done_callbacks"}
FUTURE_FIELDS_OF_OTHERS = {"_state", "_result", "_exception"}  # common names: on `self` only in a Future class


def _touches_future_internals(module: Module) -> list[int]:
    """The lines of ``module`` that use a Future's private fields or the _base state names."""
    lines: list[int] = []
    future_classes = [
        node
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ClassDef) and any(re.search(r"\bFuture\b", ast.unparse(base)) for base in node.bases)
    ]
    inside_future_class = {id(n) for cls in future_classes for n in ast.walk(cls)}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node.module == "concurrent.futures._base":
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name == "concurrent.futures._base" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute):
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            if (
                node.attr in FUTURE_FIELDS
                or (node.attr in FUTURE_FIELDS_OF_OTHERS and (not on_self or id(node) in inside_future_class))
                or (isinstance(node.value, ast.Name) and node.value.id == "_base")
            ):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_one_client_module_touches_future_internals() -> None:
    """Future's private state is read and written in one place, so its locking is auditable there."""
    touching = {
        module.relpath: lines
        for module in modules().values()
        if module.room == "client" and (lines := _touches_future_internals(module))
    }
    if len(touching) > 1:
        fail_if_any(
            {path: [f"lines {lines}"] for path, lines in touching.items()},
            "more than one module of client/ uses Future internals",
        )


def test_future_internals_are_found() -> None:
    """The check above sees what it looks for: the client touches them somewhere today."""
    assert any(_touches_future_internals(m) for m in modules().values() if m.room == "client")


def test_every_module_says_what_it_holds() -> None:
    missing = [module.relpath for module in modules().values() if not module.summary]
    assert not missing, f"modules without a docstring (the README's table shows its first paragraph): {missing}"


def test_readme_architecture_tables_are_current() -> None:
    """The README's tables are generated from tests/layout.py's rules and the module docstrings."""
    diff = readme_diff()
    assert not diff, f"README.md's architecture tables are out of date; run `python tests/layout.py`:\n{diff}"


# --------------------------------------------------------------------------- the node loads no client code

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)")
CLIENT_ONLY = ("clusterexec.client", "clusterexec.launch", "clusterexec.cli", "cloudpickle", "ssl", "_ssl")


def _imported(log: str) -> set[str]:
    return {m.group(2) for line in log.splitlines() if (m := IMPORT_LINE.match(line))}


@pytest.mark.timeout(60)
def test_a_node_loads_no_client_code(key_file: Path) -> None:
    """``python -X importtime -m clusterexec.node`` idles, serves a client and a task, and stops
    without importing client code, cloudpickle or ssl. Its workers are forked and write their
    output (import times included) to the client, so this log is the node process's alone."""
    node = start_node("--workers", "1", "--key-file", str(key_file), python_args=["-X", "importtime"])
    try:
        with ClusterExecutor([node.address], key_file=key_file) as ex:
            assert ex.submit(pow, 2, 10).result(timeout=30) == 1024
        assert node.stop() == 0
    finally:
        node.stop()
    assert node.process.stdout is not None
    log = "".join(node.lines) + node.process.stdout.read()
    node.process.stdout.close()
    loaded = _imported(log)
    assert "clusterexec.node.server" in loaded, f"no import-time log read:\n{log[-2000:]}"
    assert "session from" in log, "the node logged no session"
    wrong = sorted(name for name in loaded if any(name == p or name.startswith(p + ".") for p in CLIENT_ONLY))
    assert not wrong, f"the node process imported {wrong}"


def test_relative_and_guarded_imports_are_resolved(tmp_path: Path) -> None:
    """The reader on a made-up module of node/: relative imports, TYPE_CHECKING, a function body."""
    source = tmp_path / "example.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import worker\n"
        "from ..wire.frames import Message\n"
        "if TYPE_CHECKING:\n"
        "    from ..client.tasks import Task\n"
        "def later():\n"
        "    import clusterexec.launch.specs\n"
    )
    found = {
        (imp.imported, imp.type_only, imp.in_function) for imp in imports_of(Module("clusterexec.node.example", source))
    }
    assert found == {
        ("clusterexec.node.worker", False, False),
        ("clusterexec.wire.frames", False, False),
        ("clusterexec.client.tasks", True, False),
        ("clusterexec.launch.specs", False, True),
    }
