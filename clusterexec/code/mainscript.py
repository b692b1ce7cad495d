"""The main script: may a worker run it again, and which names does that bind?

``ProcessPoolExecutor`` forks on Linux up to Python 3.13, so a script without an
``if __name__ == "__main__":`` guard works there: the workers inherit the script's state and
never run its top-level code again. clusterexec workers are not forks of the client, so they
either re-run the script (under the name ``__mp_main__``, its guarded block skipped, as
multiprocessing's spawn does) to find its functions by name, or receive those functions by value.

Re-running is chosen only when it is harmless: every top-level statement outside the guard is a
definition, an import or a constant (:func:`rerun_blocker` names the first one that is not).
Anything else (creating an executor, reading ``sys.argv``, a loop, ``sys.exit``, opening a
file) means the script's functions and classes travel by value instead, exactly as a fork
would see them. Only by-name functions can run on a node of another Python minor version.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from typing import Any

# Calls that only build a value: re-running them has no effect outside the module.
_PURE_CALLS = frozenset(
    {
        "TypeVar",
        "ParamSpec",
        "TypeVarTuple",
        "NewType",
        "NamedTuple",
        "TypedDict",
        "namedtuple",
        "getLogger",
        "compile",
        "field",
        "frozenset",
        "set",
        "tuple",
        "list",
        "dict",
        "range",
        "object",
        "Enum",
        "IntEnum",
        "partial",
        "Path",
        "PurePath",
        "Decimal",
        "Fraction",
        "float",
        "int",
        "str",
        "bytes",
        "complex",
        "bool",
        "dataclass",
        "lru_cache",
        "cache",
        "wraps",
        "total_ordering",
        "contextmanager",
        "abstractmethod",
        "staticmethod",
        "classmethod",
        "property",
        "overload",
        "final",
        "runtime_checkable",
    }
)


# Values that differ between the client and a worker: reading them at the top level is not harmless.
_PER_PROCESS = frozenset({"argv", "orig_argv", "environ", "environb", "getenv", "stdin", "getpid"})


def main_guard(test: ast.expr) -> str | None:
    """``"=="`` for ``if __name__ == "__main__":``, ``"!="`` for its negation (either operand
    order), None for any other test."""
    if not isinstance(test, ast.Compare) or len(test.ops) != 1 or not isinstance(test.ops[0], (ast.Eq, ast.NotEq)):
        return None
    sides = [test.left, test.comparators[0]]
    name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    text = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    if not (name and text):
        return None
    return "==" if isinstance(test.ops[0], ast.Eq) else "!="


def _callee_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_constant(node: ast.expr | None) -> bool:
    """True for an expression that only builds a value: literals, names, attribute reads,
    operators, comprehension-free containers, lambdas, and calls of known value builders."""
    if node is None:
        return True
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id not in _PER_PROCESS
    if isinstance(node, ast.Lambda):
        return all(_is_constant(d) for d in [*node.args.defaults, *node.args.kw_defaults])
    if isinstance(node, ast.Attribute):
        return node.attr not in _PER_PROCESS and _is_constant(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_constant(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(_is_constant(k) for k in node.keys if k is not None) and all(_is_constant(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _is_constant(node.left) and _is_constant(node.right)
    if isinstance(node, ast.UnaryOp):
        return _is_constant(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(_is_constant(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return _is_constant(node.left) and all(_is_constant(c) for c in node.comparators)
    if isinstance(node, ast.IfExp):
        return _is_constant(node.test) and _is_constant(node.body) and _is_constant(node.orelse)
    if isinstance(node, ast.Subscript):
        return _is_constant(node.value) and _is_constant(node.slice)
    if isinstance(node, ast.Slice):
        return _is_constant(node.lower) and _is_constant(node.upper) and _is_constant(node.step)
    if isinstance(node, ast.Starred):
        return _is_constant(node.value)
    if isinstance(node, ast.JoinedStr):
        return all(_is_constant(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return _is_constant(node.value) and _is_constant(node.format_spec)
    if isinstance(node, ast.Call):
        return (
            _callee_name(node.func) in _PURE_CALLS
            and _is_constant(node.func)
            and all(_is_constant(a) for a in node.args)
            and all(_is_constant(k.value) for k in node.keywords)
        )
    return False


def _definition_blocker(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> ast.AST | None:
    """What a ``def`` or ``class`` statement runs at definition time that is not harmless."""
    for decorator in node.decorator_list:
        if not _is_constant(decorator):
            return decorator
    if isinstance(node, ast.ClassDef):
        for base in [*node.bases, *(k.value for k in node.keywords)]:
            if not _is_constant(base):
                return base
        return _first_blocker(node.body)
    arguments = node.args
    for default in [*arguments.defaults, *arguments.kw_defaults]:
        if default is not None and not _is_constant(default):
            return default
    return None


def _statement_blocker(node: ast.stmt) -> ast.AST | None:
    """``node`` itself, or the part of it, that makes re-running it not harmless; None if it is."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.Pass, ast.Global, ast.Nonlocal)):
        return None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return _definition_blocker(node)
    if isinstance(node, ast.Expr):
        return None if isinstance(node.value, ast.Constant) else node  # a docstring, or a call
    if isinstance(node, ast.Assign):
        return None if _is_constant(node.value) and all(_is_constant(t) for t in node.targets) else node
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return None if _is_constant(node.value) and _is_constant(node.target) else node
    if isinstance(node, ast.Assert):
        return None if _is_constant(node.test) and _is_constant(node.msg) else node
    if isinstance(node, ast.If):
        guard = main_guard(node.test)
        if guard is not None:  # the guarded block never runs on a worker, its else always does
            return _first_blocker(node.orelse if guard == "==" else node.body)
        if not _is_constant(node.test):
            return node
        return _first_blocker(node.body) or _first_blocker(node.orelse)
    if isinstance(node, ast.Try):
        # try: import fast / except ImportError: fast = None
        handlers = [h for h in node.handlers if not _is_constant(h.type)]
        if handlers:
            return handlers[0]
        return (
            _first_blocker(node.body)
            or next((b for h in node.handlers if (b := _first_blocker(h.body))), None)
            or _first_blocker(node.orelse)
            or _first_blocker(node.finalbody)
        )
    return node  # loops, with blocks, del, raise, match, type aliases...


def _first_blocker(statements: list[ast.stmt]) -> ast.AST | None:
    for statement in statements:
        blocker = _statement_blocker(statement)
        if blocker is not None:
            return blocker
    return None


def rerun_blocker(source: bytes) -> str | None:
    """Why re-running this script on a worker would not be harmless, or None if it would be.

    The answer names the first top-level statement outside the main guard that does more than
    define, import or assign a constant (``"line 5: n = int(sys.argv[1])"``). A script that does
    not parse is never re-run.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        return f"it does not parse here: {exc}"
    blocker = _first_blocker(tree.body)
    if blocker is None:
        return None
    text = ast.get_source_segment(source.decode("utf-8", errors="replace"), blocker) or type(blocker).__name__
    first_line = text.strip().splitlines()[0] if text.strip() else type(blocker).__name__
    return f"line {getattr(blocker, 'lineno', '?')}: {first_line}"


def names_bound_outside_main_block(source: bytes) -> frozenset[str]:
    """Top-level names a script binds when run under a name other than ``__main__``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            guard = main_guard(node.test) if isinstance(node, ast.If) else None
            if guard is not None:
                assert isinstance(node, ast.If)
                visit(node.orelse if guard == "==" else node.body)
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).partition(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return frozenset(names)


def prepare_worker(argv: list[str], initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    """Run first in every worker of a session: give it the client's ``sys.argv``, as a fork
    (and multiprocessing's spawn) does, then call the user's initializer, if any."""
    sys.argv[:] = argv
    if initializer is not None:
        initializer(*initargs)
