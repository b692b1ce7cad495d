"""The shape of the package, read from its source: modules, their imports, and the rules they keep.

``tests/test_layout.py`` checks the rules below against the code, and the README's architecture
tables are generated from the same rules and from each module's docstring:

    python tests/layout.py            # rewrite the tables in README.md
    python tests/layout.py --check    # exit 1 if README.md is out of date

Imports are read with :mod:`ast`, so nothing is imported to check it: imports inside functions
and under ``if TYPE_CHECKING:`` count like any other, and relative imports are resolved.
"""

from __future__ import annotations

import ast
import difflib
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clusterexec"
README = ROOT / "README.md"

# A room is a folder of clusterexec/ or, for the top level, one module: a file's room says which
# process runs it, and imports between rooms point one way.
EVERY_ROOM = (
    "__init__", "__main__", "_version", "errors", "keys", "wire", "code", "node", "client", "launch", "cli", "joblib"
)


def _may(*rooms: str) -> frozenset[str]:
    return frozenset(rooms)


# room: (which process runs it, the rooms it may import, its own room included)
ROOMS: dict[str, tuple[str, frozenset[str]]] = {
    "__init__": ("any program that imports `clusterexec`", _may("_version", "errors", "client")),
    "__main__": ("the `python -m clusterexec` command", _may("cli")),
    "_version": ("every process", _may()),
    "errors": ("every process", _may()),
    "keys": ("the client, the node and the command line", _may("errors")),
    "wire": ("the client I/O thread, the node and its workers", _may("errors", "wire")),
    "code": ("the client, and the node's workers", _may("errors", "wire", "code")),
    "node": (
        "`python -m clusterexec.node` and the workers it starts; the local executor's client I/O thread, "
        "which hosts its node",
        _may("wire", "code", "keys", "errors", "_version", "node"),
    ),
    "client": (
        "the user's program: user threads and the client I/O thread",
        _may("wire", "code", "launch", "node", "keys", "errors", "_version", "client"),
    ),
    "launch": ("the user's program, to start and name nodes", _may("wire", "keys", "errors", "_version", "launch")),
    "cli": ("the `clusterexec` command", _may(*EVERY_ROOM)),
    # An integration: the user's program imports it to plug the executor into joblib.
    "joblib": ("the user's program, through `import clusterexec.joblib`", _may("client", "errors", "joblib")),
}
# Only the ``python -m clusterexec`` entry point may import the command line.
CLI_IMPORTERS = frozenset({"__main__", "cli"})


@dataclass(frozen=True)
class Module:
    """One module of the package: its dotted name and its file."""

    name: str
    path: Path

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def room(self) -> str:
        return room_of(self.name)

    @property
    def relpath(self) -> str:
        """The path under clusterexec/, as the README shows it: ``wire/frames.py``."""
        return self.path.relative_to(PACKAGE).as_posix()

    @property
    def tree(self) -> ast.Module:
        return _parse(self.path)

    @property
    def summary(self) -> str:
        """The first paragraph of the module's docstring, on one line ('' if it has none)."""
        doc = ast.get_docstring(self.tree) or ""
        return " ".join(doc.split("\n\n")[0].split())


@dataclass(frozen=True)
class Import:
    """One import of one of our modules by another: where it is, and whether it runs at all."""

    importer: str
    imported: str
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``
    in_function: bool

    def __str__(self) -> str:
        how = " (type only)" if self.type_only else " (in a function)" if self.in_function else ""
        return f"{self.importer} line {self.line} imports {self.imported}{how}"


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def room_of(module: str) -> str:
    """The room of a module: ``clusterexec.wire.frames`` is in ``wire``, ``clusterexec.errors`` in
    ``errors``, and the package ``clusterexec`` itself in ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@cache
def modules() -> dict[str, Module]:
    """Every module under clusterexec/, by dotted name, in file order."""
    found: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path)
    return found


class _ImportReader(ast.NodeVisitor):
    """Collects the imports of one module, noting those under TYPE_CHECKING or in a function."""

    def __init__(self, module: Module, known: dict[str, Module]) -> None:
        self.module = module
        self.known = known
        self.imports: list[Import] = []
        self._type_only = 0
        self._in_function = 0

    def _add(self, name: str, line: int) -> None:
        if name == "clusterexec" or name.startswith("clusterexec."):
            self.imports.append(Import(self.module.name, name, line, self._type_only > 0, self._in_function > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.name.split(".")
            if not self.module.is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            # ``from clusterexec.node import worker`` imports the module clusterexec.node.worker.
            self._add(submodule if submodule in self.known else base, node.lineno)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.visit(node.test)
        self._type_only += guarded
        for child in node.body:
            self.visit(child)
        self._type_only -= guarded
        for child in node.orelse:
            self.visit(child)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._in_function += 1
        self.generic_visit(node)
        self._in_function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function


def imports_of(module: Module) -> list[Import]:
    """The imports of our own modules in ``module``, wherever they are in it."""
    reader = _ImportReader(module, modules())
    reader.visit(module.tree)
    return reader.imports


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(imp for module in modules().values() for imp in imports_of(module))


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (type-only and in-function imports included)."""
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    for imp in all_imports():
        graph[imp.importer].add(imp.imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module
    (or a module importing itself), each sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return sorted(found)


# --------------------------------------------------------------------------- the README's tables

BEGIN = "<!-- BEGIN layout: generated by `python tests/layout.py` from tests/layout.py and the module docstrings -->"
END = "<!-- END layout -->"


def _markdown(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _room_label(room: str) -> str:
    return f"`{room}/`" if (PACKAGE / room).is_dir() else f"`{room}.py`"


def render() -> str:
    """The generated part of the README's architecture section."""
    lines = [
        BEGIN,
        "",
        "| folder | runs in | may import |",
        "| --- | --- | --- |",
    ]
    everything = frozenset(ROOMS)
    for room, (runs_in, may_import) in ROOMS.items():
        allowed = ", ".join(f"`{r}`" for r in sorted(may_import)) or "nothing"
        if may_import == everything:
            allowed = "anything"
        lines.append(f"| {_room_label(room)} | {runs_in} | {allowed} |")
    lines += ["", "| module | holds |", "| --- | --- |"]
    order = list(ROOMS)
    for module in sorted(modules().values(), key=lambda m: (order.index(m.room) if m.room in order else 99, m.relpath)):
        lines.append(f"| `{module.relpath}` | {_markdown(module.summary)} |")
    lines += ["", END]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    """The generated part of ``text`` (a README), markers included; '' if it has none."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(END)]


def readme_diff() -> str:
    """A unified diff from the README's generated part to what it should be ('' if current)."""
    current, wanted = readme_section(README.read_text(encoding="utf-8")), render()
    if current == wanted:
        return ""
    return "".join(
        difflib.unified_diff(
            (current + "\n").splitlines(keepends=True),
            (wanted + "\n").splitlines(keepends=True),
            "README.md",
            "generated",
        )
    )


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    current = readme_section(text)
    if not current:
        print(f"README.md has no {BEGIN!r} ... {END!r} markers", file=sys.stderr)
        return 2
    if "--check" in argv:
        diff = readme_diff()
        print(diff or "README.md is current", file=sys.stderr if diff else sys.stdout)
        return 1 if diff else 0
    README.write_text(text.replace(current, render()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
