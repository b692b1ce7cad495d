"""Main scripts without an ``if __name__ == "__main__":`` guard work as with ProcessPoolExecutor.

ProcessPoolExecutor forks on Linux up to Python 3.13, so a quick script that creates the
executor, reads ``sys.argv`` or exits at its top level works there. Each script here is run by a
real interpreter as a user runs it (``python script.py ARGS``) against real nodes: the local
default, a named node, and a node started over SSH. Where the script runs on the local default,
the same script with ProcessPoolExecutor imported instead must print the same thing.

The rule that decides whether a worker may re-run a script (:func:`rerun_blocker`) is tested
on its own first, with hypothesis generating scripts from harmless and harmful statements.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterexec.code.mainscript import names_bound_outside_main_block, rerun_blocker

pytestmark = pytest.mark.timeout(120)

SCRIPT_TIMEOUT = 90.0

# --------------------------------------------------------------------------- the rule

HARMLESS = [
    '"""A docstring."""',
    "import os",
    "import os.path as osp",
    "from collections import namedtuple",
    "from typing import TYPE_CHECKING",
    "X = 3",
    "NAMES = ('a', 'b') + ('c',)",
    "TABLE = {'a': [1, 2.5, -3], 'b': None}",
    "LIMIT: int = 2 ** 10",
    "Point = namedtuple('Point', 'x y')",
    "log = logging.getLogger(__name__)",
    "T = TypeVar('T')",
    "square = lambda x: x * x",
    "def f(x, y=2, *, z=None):\n    return os.getpid() + x",
    "async def g():\n    await something()",
    "@functools.lru_cache(maxsize=None)\ndef h(x):\n    return x",
    "@dataclass(frozen=True)\nclass C:\n    a: int = 0\n    b: list = field(default_factory=list)\n"
    "    def m(self):\n        return 1",
    "class E(Exception):\n    pass",
    "if TYPE_CHECKING:\n    import numpy",
    "try:\n    import ujson as json\nexcept ImportError:\n    import json",
    "assert X > 0, 'positive'",
    "if __name__ == '__main__':\n    main()\n    sys.exit(run())",
    "if '__main__' == __name__:\n    print('only in the client')",
]

HARMFUL = [
    "ex = ClusterExecutor(4)",
    "n = int(sys.argv[1])",
    "path = sys.argv[1]",
    "home = os.environ['HOME']",
    "print('hello')",
    "main()",
    "sys.exit(3)",
    "for i in range(3):\n    pass",
    "while False:\n    pass",
    "with open('x') as f:\n    data = f.read()",
    "data = open('x').read()",
    "results = [f(x) for x in range(10)]",
    "del X",
    "raise SystemExit(0)",
    "def f(x=compute()):\n    return x",
    "@app.route('/', handler=make())\ndef f():\n    pass",
    "class C(make_base()):\n    pass",
    "class C:\n    value = compute()",
    "try:\n    run()\nexcept BaseException:\n    sys.exit(3)",
    "if __name__ != '__main__':\n    run()",
    "if __name__ == '__main__':\n    pass\nelse:\n    run()",
    "if len(sys.argv) > 1:\n    pass",
]


@pytest.mark.parametrize("statement", HARMLESS)
def test_definitions_imports_and_constants_may_be_rerun(statement: str) -> None:
    assert rerun_blocker(statement.encode()) is None


@pytest.mark.parametrize("statement", HARMFUL)
def test_any_other_top_level_code_keeps_the_script_from_being_rerun(statement: str) -> None:
    source = "import sys\n\ndef cube(x):\n    return x ** 3\n\n" + statement + "\n"
    blocker = rerun_blocker(source.encode())
    assert blocker is not None
    line = int(blocker.split(":")[0].removeprefix("line "))
    assert line >= 6, blocker  # names the statement at fault (or the part of it), not the definitions


def test_a_script_that_does_not_parse_is_never_rerun() -> None:
    assert rerun_blocker(b"def f(:\n") is not None


@settings(max_examples=150, deadline=None)
@given(
    harmless=st.lists(st.sampled_from(HARMLESS), max_size=8),
    harmful=st.lists(st.sampled_from(HARMFUL), max_size=2),
    guarded=st.lists(st.sampled_from(HARMFUL), max_size=3),
    data=st.data(),
)
def test_a_script_is_rerun_exactly_when_everything_outside_its_guard_is_harmless(
    harmless: list[str], harmful: list[str], guarded: list[str], data: st.DataObject
) -> None:
    statements = list(harmless)
    for statement in harmful:
        statements.insert(data.draw(st.integers(0, len(statements))), statement)
    if guarded:
        block = "\n".join(textwrap.indent(s, "    ") for s in guarded)
        statements.append(f'if __name__ == "__main__":\n{block}')
    source = "\n".join(statements) + "\n"
    blocker = rerun_blocker(source.encode())
    assert (blocker is None) == (not harmful), source


def test_names_bound_outside_the_guard() -> None:
    source = b"import os.path\nX = 1\ndef f(): pass\nif __name__ == '__main__':\n    Y = 2\nelse:\n    Z = 3\n"
    assert names_bound_outside_main_block(source) == {"os", "X", "f", "Z"}


# --------------------------------------------------------------------------- real scripts

# Each script takes the executor's construction from @EXECUTOR@ and whatever else from argv;
# then its arguments and what it must print.
SCRIPTS: dict[str, tuple[str, list[str], str]] = {
    "maps_at_top_level": (
        """
        from clusterexec import ClusterExecutor

        def cube(x):
            return x ** 3

        ex = @EXECUTOR@
        print(sum(ex.map(cube, range(100))))
        """,
        [],
        f"{sum(x**3 for x in range(100))}\n",
    ),
    "reads_argv_at_top_level": (
        """
        import sys
        from clusterexec import ClusterExecutor

        n = int(sys.argv[1])

        def cube(x):
            return x ** 3

        ex = @EXECUTOR@
        print(sum(ex.map(cube, range(n))))
        """,
        ["1000"],
        f"{sum(x**3 for x in range(1000))}\n",
    ),
    "wraps_its_work_and_exits_on_error": (
        """
        import sys
        from clusterexec import ClusterExecutor

        def cube(x):
            return x ** 3

        try:
            with @EXECUTOR@ as ex:
                print(sorted(ex.map(cube, range(10))))
        except BaseException as exc:
            print("failed:", repr(exc))
            sys.exit(3)
        """,
        [],
        f"{[x**3 for x in range(10)]}\n",
    ),
    "maps_a_lambda_calling_a_module_function": (
        """
        from clusterexec import ClusterExecutor

        def square(x):
            return x * x

        with @EXECUTOR@ as ex:
            print(list(ex.map(lambda x: square(x) + 1, range(8))))
        """,
        [],
        f"{[x * x + 1 for x in range(8)]}\n",
    ),
    "uses_its_own_class_both_ways": (
        """
        from dataclasses import dataclass
        from clusterexec import ClusterExecutor

        @dataclass
        class Point:
            x: int
            y: int

        def mirror(p):
            return Point(p.y, p.x)

        ex = @EXECUTOR@
        out = list(ex.map(mirror, [Point(i, -i) for i in range(5)]))
        print(out, all(type(p) is Point for p in out))
        ex.shutdown()
        """,
        [],
        "[" + ", ".join(f"Point(x={-i}, y={i})" for i in range(5)) + "] True\n",
    ),
}


def _write(directory: Path, name: str, source: str, executor: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source).replace("@EXECUTOR@", executor))
    return path


def _run(script: Path, *args: str, timeout: float = SCRIPT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTEREXEC_") and k != "CLUSTER"}
    env.pop("PYTHONPATH", None)
    try:
        return subprocess.run(
            [sys.executable, script.name, *args],
            cwd=script.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed the script
        pytest.fail(f"{script.name} did not finish in {timeout}s\n{exc.stdout!r}\n{exc.stderr!r}")


def _as_ppe(source: str) -> str:
    """The same script as its user ran it before the swap: ProcessPoolExecutor(2)."""
    return source.replace(
        "from clusterexec import ClusterExecutor",
        "from concurrent.futures import ProcessPoolExecutor as ClusterExecutor",
    )


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_unguarded_script_on_the_local_default_prints_what_it_prints_with_process_pool_executor(
    name: str, tmp_path: Path
) -> None:
    source, args, expected = SCRIPTS[name]
    ours = _run(_write(tmp_path, name, source, "ClusterExecutor(2)"), *args)
    assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr
    assert "Traceback" not in ours.stderr and "Error" not in ours.stderr, ours.stderr
    if "lambda" not in source:  # ProcessPoolExecutor cannot pickle lambdas
        theirs = _run(_write(tmp_path, f"{name}_ppe", _as_ppe(source), "ClusterExecutor(2)"), *args)
        assert (theirs.returncode, theirs.stdout) == (0, expected), theirs.stderr


@pytest.fixture
def named_node(node_factory: Callable[..., object], key_file: Path) -> Iterator[str]:
    """The executor expression for a node named by address, started in ``/`` without PYTHONPATH
    so that the script's directory cannot be imported there."""
    node = node_factory("--workers", "2", "--key-file", str(key_file))
    yield f"ClusterExecutor([{node.address!r}], key_file={str(key_file)!r})"  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_unguarded_script_on_a_named_node(name: str, named_node: str, tmp_path: Path) -> None:
    source, args, expected = SCRIPTS[name]
    ours = _run(_write(tmp_path, name, source, named_node), *args)
    assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr


def test_unguarded_script_on_a_node_started_over_ssh(tmp_path: Path) -> None:
    from sshd import SSHD, bare_python, start_sshd
    from test_ssh import make_spec

    from clusterexec.launch.ssh import SshNode

    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server not installed (.ci/run installs it)")
    server = start_sshd(tmp_path / "sshd")
    home = tmp_path / "home"
    home.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    patch.delenv("SSH_AUTH_SOCK", raising=False)
    try:
        with SshNode(make_spec(server, bare_python(tmp_path / "remote")), workers=2) as node:
            executor = f"ClusterExecutor([{str(node.address)!r}], key={node.key.decode()!r})"
            for name in ("reads_argv_at_top_level", "maps_a_lambda_calling_a_module_function"):
                source, args, expected = SCRIPTS[name]
                ours = _run(_write(tmp_path, name, source, executor), *args)
                assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr
    finally:
        patch.undo()
        server.stop()


def test_a_script_that_submits_and_exits_without_waiting_still_gets_its_work_done(tmp_path: Path) -> None:
    # The tasks read sys.argv when they run: workers see the client's argv, as forked ones do.
    script = _write(
        tmp_path,
        "fire_and_forget",
        """
        import sys
        from clusterexec import ClusterExecutor

        def work(i):
            with open(f"{sys.argv[1]}/done-{i}", "w") as f:
                f.write(str(i))

        ex = ClusterExecutor(2)
        for i in range(4):
            ex.submit(work, i)
        """,
        "",
    )
    out = tmp_path / "out"
    out.mkdir()
    done = _run(script, str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"done-{i}" for i in range(4)]


def test_tracebacks_of_an_unguarded_script_show_its_file_and_lines_even_once_it_is_gone(
    node_factory: Callable[..., object], key_file: Path, tmp_path: Path
) -> None:
    # The node runs in / and the script deletes itself after its first task: the lines the
    # remote traceback shows can only come from the source the client shipped along.
    node = node_factory("--workers", "1", "--key-file", str(key_file))
    script = _write(
        tmp_path,
        "vanishing",
        """
        import os
        from clusterexec import ClusterExecutor

        def ok(x):
            return x

        def boom(x):
            raise RuntimeError(x)  # a comment on the failing line

        ex = @EXECUTOR@
        assert ex.submit(ok, 1).result() == 1
        os.remove(__file__)
        try:
            ex.submit(boom, 123).result()
        except RuntimeError as exc:
            print(exc.__cause__.tb)
        ex.shutdown()
        """,
        f"ClusterExecutor([{node.address!r}], key_file={str(key_file)!r})",  # type: ignore[attr-defined]
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert f'File "{script}", line 9, in boom' in done.stdout, done.stdout
    assert "raise RuntimeError(x)  # a comment on the failing line" in done.stdout, done.stdout
    assert "<dynamic-code>" not in done.stdout


@pytest.mark.parametrize(
    "looks", [False, True, "then freed"], ids=["never-looked-at", "looked-at", "looked-at-then-freed"]
)
def test_work_the_cluster_could_not_do_is_reported_at_exit_unless_the_program_looked(
    looks: bool | str, tmp_path: Path
) -> None:
    # The worker dies under the task; nobody asks the future. With ProcessPoolExecutor that
    # program would exit 0 in silence; here its stderr says which task was not done and why.
    script = _write(
        tmp_path,
        "crashes",
        f"""
        import os
        from clusterexec import ClusterExecutor

        ex = ClusterExecutor(1)
        future = ex.submit(os._exit, 7)
        ex.submit(abs, -1)
        if {looks!r}:
            print(type(future.exception()).__name__)
        if {looks!r} == "then freed":  # as a loop over futures drops each once it is handled
            del future
            import gc; gc.collect()
        """,
        "",
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    if looks:
        assert done.stdout == "WorkerCrashedError\n"
        assert "nobody asked" not in done.stderr, done.stderr
    else:
        assert "clusterexec: 1 submitted task(s) were not done" in done.stderr, done.stderr
        assert "task 1: " in done.stderr and "exit" in done.stderr, done.stderr
