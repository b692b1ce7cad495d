"""Code shipping: the user's modules and main script travel by source to the workers.

Most tests write a small project into ``tmp_path`` (modules, a package with relative imports,
a main script) and run its main script as its own process (``sys.executable main.py``, cwd =
the project), as a user would, against a node started with ``cwd=/`` and no PYTHONPATH: on
that node the project cannot be imported from disk, so whatever a task imports from it must
have been shipped. Main scripts print one ``RESULT <json>`` line, which the test reads.

The version-skew tests build a venv of another Python minor version (pyenv's 3.12, 3.13 or
3.10) once per session, ``pip install`` clusterexec into it (about 30 s), and skip with the
reason if that interpreter or pip is not available.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clusterexec import ClusterExecutor, ConfigurationError
from clusterexec.code.serialize import dumps, pickle_function
from clusterexec.code.shipping import ModuleCatalog, is_user_module

pytestmark = pytest.mark.timeout(120)

READY = re.compile(r"clusterexec node listening on (\S+):(\d+) \((\d+) workers\)")
REPO = Path(__file__).resolve().parent.parent
LOCAL_PYTHON = "{}.{}".format(*sys.version_info[:2])
SCRIPT_TIMEOUT = 90.0
SKEW_TIMEOUT = 420  # the first skew test also builds the other Python's venv


# --------------------------------------------------------------------------- nodes


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a key and without anything on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTEREXEC_")}
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(name, None)
    env.update(extra)
    return env


@dataclass
class ShipNode:
    """A node started for shipping tests: cwd=/, no PYTHONPATH, its output collected."""

    process: subprocess.Popen[str]
    address: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_ship_node(python: str, key_file: Path, timeout: float = 30.0) -> ShipNode:
    """Start ``python -m clusterexec.node`` in ``/`` so that no user project is importable there."""
    process = subprocess.Popen(
        [python, "-m", "clusterexec.node", "--port", "0", "--workers", "2", "--key-file", str(key_file)],
        cwd="/",
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    ready = threading.Event()
    node = ShipNode(process, "")

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            node.lines.append(line)
            match = READY.search(line)
            if match and not ready.is_set():
                node.address = f"{match.group(1)}:{match.group(2)}"
                ready.set()
        ready.set()  # the node exited: stop waiting

    node.reader = threading.Thread(target=read, name="ship-node-output", daemon=True)
    node.reader.start()
    if not ready.wait(timeout) or not node.address:
        node.stop()
        raise RuntimeError(f"node did not start:\n{node.output()}")
    return node


@pytest.fixture
def ship_node(key_file: Path) -> Iterator[ShipNode]:
    """A node of this Python, started in ``/`` with no PYTHONPATH (tests/ is not importable)."""
    node = start_ship_node(sys.executable, key_file)
    yield node
    node.stop()


# --------------------------------------------------------------------------- client scripts

PRELUDE = '''\
import json
import os
import sys

from clusterexec import ClusterExecutor


def _executor(**kwargs):
    return ClusterExecutor([sys.argv[1]], key_file=sys.argv[2], **kwargs)


def _outcome(future):
    """{"value": result} or {"error": facts about the exception}; never waits forever."""
    try:
        return {"value": future.result(timeout=30)}
    except BaseException as exc:
        return {"error": {
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "notes": [str(n) for n in getattr(exc, "__notes__", [])],
            "cause": str(exc.__cause__),
            "name": getattr(exc, "name", None),
        }}


def _report(**values):
    print("RESULT " + json.dumps(values), flush=True)
'''


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Write ``{relative path: source}`` under ``root`` (sources are dedented)."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def client_env() -> dict[str, str]:
    # CE_ROLE exists only in the client's environment, never in the node's (nor its workers').
    # No .pyc files: a module rewritten within the same second must not be read from a stale cache.
    return _clean_env(CE_ROLE="client", PYTHONDONTWRITEBYTECODE="1")


def parse_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    assert returncode == 0, f"client exited {returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line\nstdout:\n{stdout}\nstderr:\n{stderr}"
    result: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return result


def run_client(project: Path, script: str, node: ShipNode, key_file: Path, *args: str) -> dict[str, Any]:
    """Write ``main.py`` (PRELUDE + ``script``) into ``project``, run it there, return its RESULT."""
    (project / "main.py").write_text(PRELUDE + textwrap.dedent(script))
    try:
        done = subprocess.run(
            [sys.executable, "main.py", node.address, str(key_file), *args],
            cwd=project,
            env=client_env(),
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed the client
        pytest.fail(
            f"client did not finish in {SCRIPT_TIMEOUT}s\n{exc.stdout!r}\n{exc.stderr!r}\nnode:\n{node.output()}"
        )
    return parse_result(done.stdout, done.stderr, done.returncode)


def value(outcome: dict[str, Any]) -> Any:
    """The value of an ``_outcome``; fail with the remote error if the task failed."""
    assert "error" not in outcome, f"task failed: {json.dumps(outcome['error'], indent=1)}"
    return outcome["value"]


def error(outcome: dict[str, Any]) -> dict[str, Any]:
    """The error facts of an ``_outcome``; fail if the task succeeded."""
    assert "error" in outcome, f"task should have failed, returned {outcome.get('value')!r}"
    facts: dict[str, Any] = outcome["error"]
    return facts


# A project: a module that imports another user module, a package with relative imports and a
# subpackage the client never imports, a second package named by a dotted name, a data class.
PROJECT = {
    "helperlib.py": """
        def twice(x):
            return 2 * x
    """,
    "mylib.py": """
        import helperlib

        VALUE = 41


        def inc(x):
            return x + VALUE


        def inc_twice(x):
            return helperlib.twice(inc(x))


        def describe(point):
            return {"sum": point.x + point.y, "class": f"{type(point).__module__}.{type(point).__qualname__}"}
    """,
    "mypkg/__init__.py": """
        from .core import core_value
    """,
    "mypkg/core.py": """
        from .util import helper


        def core_value():
            return helper() * 2
    """,
    "mypkg/util.py": """
        import helperlib


        def helper():
            return helperlib.twice(10) + 1
    """,
    "mypkg/sub/__init__.py": "",
    "mypkg/sub/leaf.py": """
        LEAF = 100
    """,
    "mypkg/sub/deep.py": """
        from ..core import core_value
        from . import leaf


        def deep():
            return core_value() + leaf.LEAF, __name__
    """,
    "other/__init__.py": "",
    "other/sub.py": """
        def who():
            return __name__
    """,
    "shapes.py": """
        class Point:
            def __init__(self, x, y):
                self.x = x
                self.y = y
    """,
    "onlyarg.py": """
        VALUE = "only referred to by an argument"
    """,
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write_tree(root, PROJECT)
    return root


# --------------------------------------------------------------------------- 1. explicit modules


def test_explicit_modules_objects_packages_and_dotted_names_with_auto_off(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        def use_all():
            import importlib.machinery

            import mylib
            import other.sub
            from mypkg.sub.deep import deep

            return {
                "inc": mylib.inc(1),
                "deep": deep(),
                "other": other.sub.who(),
                "cwd": os.getcwd(),
                "on_disk": [
                    importlib.machinery.PathFinder.find_spec(n) is not None for n in ("mylib", "mypkg", "other")
                ],
                "pid": os.getpid(),
            }


        if __name__ == "__main__":
            import mylib
            import mypkg
            from clusterexec.code.serialize import pickle_function
            from clusterexec.code.shipping import ModuleCatalog

            by_ref = pickle_function(mylib.inc, ModuleCatalog([mylib], auto=False)).payload
            with _executor(modules=[mylib, mypkg, "other.sub"], auto_modules=False) as ex:
                _report(
                    use_all=_outcome(ex.submit(use_all)),
                    inc=_outcome(ex.submit(mylib.inc, 5)),
                    inc_twice=_outcome(ex.submit(mylib.inc_twice, 1)),
                    by_value=by_ref.by_value,
                    names_module=b"mylib" in by_ref.body,
                    client_pid=os.getpid(),
                    sub_imported_here="mypkg.sub.deep" in sys.modules,
                )
    """
    result = run_client(project, script, ship_node, key_file)
    used = value(result["use_all"])
    assert used["inc"] == 42
    assert used["deep"] == [142, "mypkg.sub.deep"]  # relative imports through the whole tree
    assert used["other"] == "other.sub"  # given by dotted name
    assert used["cwd"] == "/" and used["on_disk"] == [False, False, False]  # only shipping can provide them
    assert used["pid"] != result["client_pid"]
    assert result["sub_imported_here"] is False  # mypkg.sub was shipped though the client never imported it
    # A function of an explicit module travels by reference, and runs from the shipped module.
    assert result["by_value"] is False and result["names_module"] is True
    assert value(result["inc"]) == 46
    assert value(result["inc_twice"]) == 84  # helperlib, which mylib imports, was shipped too


def test_without_modules_and_with_auto_off_the_task_fails_naming_the_module(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        def uses_mylib_inside():
            import mylib

            return mylib.inc(1)


        if __name__ == "__main__":
            import mylib

            with _executor(auto_modules=False) as ex:
                off = {
                    "by_value": _outcome(ex.submit(uses_mylib_inside)),
                    "by_reference": _outcome(ex.submit(mylib.inc, 1)),
                    "still_works": _outcome(ex.submit(os.getpid)),
                }
            with _executor() as ex:
                on = _outcome(ex.submit(mylib.inc, 1))
            _report(off=off, on=on)
    """
    result = run_client(project, script, ship_node, key_file)
    facts = error(result["off"]["by_value"])  # the import inside the task fails as it runs
    assert facts["type"] == "ModuleNotFoundError", facts
    assert "mylib" in facts["message"] and facts["name"] == "mylib", facts
    # The function itself cannot be unpickled on the worker: as ProcessPoolExecutor reports that,
    # a BrokenProcessPool, for this task alone, naming the worker's error and the missing module.
    facts = error(result["off"]["by_reference"])
    assert facts["type"] == "TaskUnpicklingError" and "BrokenProcessPool" in facts["mro"], facts
    assert "ModuleNotFoundError: No module named 'mylib'" in facts["message"], facts
    assert isinstance(value(result["off"]["still_works"]), int)
    assert value(result["on"]) == 42  # the same call ships mylib when auto_modules is on


# --------------------------------------------------------------------------- 2. automatic


def test_automatic_shipping_follows_functions_arguments_and_their_imports(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        if __name__ == "__main__":
            import mylib
            import mypkg.sub.deep
            import onlyarg
            import shapes

            with _executor() as ex:
                _report(
                    dependency=_outcome(ex.submit(mylib.inc_twice, 1)),
                    package=_outcome(ex.submit(mypkg.sub.deep.deep)),
                    argument=_outcome(ex.submit(mylib.describe, shapes.Point(2, 3))),
                    module_argument=_outcome(ex.submit(getattr, onlyarg, "VALUE")),
                    mapped=list(ex.map(mylib.inc, range(3))),
                )
    """
    result = run_client(project, script, ship_node, key_file)
    assert value(result["dependency"]) == 84  # helperlib: imported by mylib, shipped without being named
    assert value(result["package"]) == [142, "mypkg.sub.deep"]  # whole tree; util's import of helperlib followed
    assert value(result["argument"]) == {"sum": 5, "class": "shapes.Point"}  # shapes: only in the arguments
    assert value(result["module_argument"]) == "only referred to by an argument"
    assert result["mapped"] == [41, 42, 43]


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on this process's sys.path for throwaway user modules, forgotten afterwards."""
    root = tmp_path / "importable"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    resolved = root.resolve()
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if filename and Path(filename).resolve().is_relative_to(resolved):
            del sys.modules[name]


def test_installed_and_standard_library_modules_are_never_shipped(importable: Path) -> None:
    import importlib
    import json as json_module

    import numpy

    import clusterexec.code.serialize

    name = f"shipnp_{uuid.uuid4().hex[:8]}"
    write_tree(
        importable,
        {
            f"{name}.py": """
                import json

                import numpy as np
                from numpy import arange


                def total(n):
                    return int(np.sum(arange(n))) + len(json.dumps(n))
            """
        },
    )
    module = importlib.import_module(name)
    catalog = ModuleCatalog()
    payload = dumps((module.total, numpy.arange(5), numpy.add, json_module.dumps), catalog)
    assert [s.name for s in payload.modules] == [name]
    for installed in (numpy, numpy.arange(3), numpy.add, json_module, clusterexec.code.serialize.dumps, pytest.fail):
        assert dumps(installed, ModuleCatalog()).modules == (), installed
    assert not is_user_module(numpy) and not is_user_module(json_module) and is_user_module(module)


def test_module_functions_travel_by_reference_and_lambdas_by_value(importable: Path) -> None:
    name = f"shipref_{uuid.uuid4().hex[:8]}"
    write_tree(
        importable,
        {
            f"{name}.py": """
                def polynomial(x):
                    total = 0
                    for power, coefficient in enumerate((3, 5, 7, 11, 13)):
                        total += coefficient * x**power
                    return total
            """
        },
    )
    module = __import__(name)

    def closure(x: int) -> int:
        return x + len(name)

    function = pickle_function(module.polynomial, ModuleCatalog()).payload
    assert function.by_value is False
    assert module.polynomial.__code__.co_code not in function.body
    assert [s.name for s in function.modules] == [name]
    lam = lambda x: x * 3 + 1  # noqa: E731
    lambda_payload = pickle_function(lam, ModuleCatalog()).payload
    assert lambda_payload.by_value is True
    assert lam.__code__.co_code in lambda_payload.body
    assert pickle_function(closure, ModuleCatalog()).payload.by_value is True
    assert dumps(((1, "a"), [module.polynomial]), ModuleCatalog()).by_value is False
    assert dumps({"f": lam}, ModuleCatalog()).by_value is True


# --------------------------------------------------------------------------- 3. the main script


def test_main_script_functions_run_by_name_and_its_main_block_does_not(
    project: Path, ship_node: ShipNode, key_file: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # Outside its guard the script only imports, assigns constants and defines: re-running it
    # on a worker is harmless, so its functions travel by name (``__mp_main__.where``). Its
    # `if __name__ == "__main__":` block drops a marker naming its pid wherever it runs.
    script = """
        import time

        MARKERS = @MARKERS@


        class Acc:
            def __init__(self, v):
                self.v = v


        def where(acc):
            return Acc(acc.v + 1), __name__, os.getpid(), time.monotonic() > 0


        def polynomial(x):
            total = 0
            for power, coefficient in enumerate((3, 5, 7, 11, 13)):
                total += coefficient * x**power
            return total


        if __name__ == "__main__":
            with open(os.path.join(MARKERS, f"mainblock-{os.getpid()}"), "w"):
                pass
            if os.environ.get("CE_ROLE") == "client":
                from clusterexec.code.serialize import dumps
                from clusterexec.code.shipping import ModuleCatalog

                top = dumps(polynomial, ModuleCatalog())
                lam = dumps(lambda x: x + 1, ModuleCatalog())
                with _executor() as ex:
                    results = list(ex.map(where, [Acc(i) for i in range(6)]))
                    _report(
                        client_pid=os.getpid(),
                        results=[[r[0].v, type(r[0]).__name__, r[1], r[2], r[3]] for r in results],
                        polynomial=_outcome(ex.submit(polynomial, 2)),
                        top_by_value=top.by_value,
                        top_has_code=polynomial.__code__.co_code in top.body,
                        top_modules=[s.name for s in top.modules],
                        lambda_by_value=lam.by_value,
                    )
    """.replace("@MARKERS@", repr(str(markers)))
    result = run_client(project, script, ship_node, key_file)
    client_pid = result["client_pid"]
    results = result["results"]
    assert [r[0] for r in results] == [1, 2, 3, 4, 5, 6]  # a class of the main script, both ways
    assert {r[1] for r in results} == {"Acc"}
    assert {r[2] for r in results} == {"__mp_main__"}  # module-level names of the worker's re-run
    worker_pids = {r[3] for r in results}
    assert client_pid not in worker_pids
    assert value(result["polynomial"]) == 3 + 10 + 28 + 88 + 208
    # The payload of a top-level main function names it; a lambda's carries its bytecode.
    assert result["top_by_value"] is False and result["top_has_code"] is False
    assert result["top_modules"] == ["__mp_main__"]
    assert result["lambda_by_value"] is True
    names = sorted(p.name for p in markers.iterdir())
    assert names == [f"mainblock-{client_pid}"]  # the __main__ block ran in the client only


def test_main_script_with_other_top_level_code_is_not_rerun_its_functions_travel_by_value(
    project: Path, ship_node: ShipNode, key_file: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # Top-level code with an effect (a marker file naming the pid) and no guard at all: as
    # with a fork, it must run in the client only, and the functions still run on the workers.
    script = """
        import time

        MARKERS = @MARKERS@
        with open(os.path.join(MARKERS, f"module-{os.getpid()}-{__name__}"), "w"):
            pass


        class Acc:
            def __init__(self, v):
                self.v = v


        def where(acc):
            return Acc(acc.v + 1), __name__, os.getpid(), time.monotonic() > 0


        from clusterexec.code.serialize import dumps
        from clusterexec.code.shipping import ModuleCatalog

        catalog = ModuleCatalog()
        top = dumps(where, catalog)
        ex = _executor()
        results = list(ex.map(where, [Acc(i) for i in range(6)]))
        _report(
            client_pid=os.getpid(),
            results=[[r[0].v, type(r[0]).__name__, type(r[0]) is Acc, r[1], r[2]] for r in results],
            top_by_value=top.by_value,
            top_modules=[s.name for s in top.modules],
            blocker=top.main_blocker,
        )
    """.replace("@MARKERS@", repr(str(markers)))
    result = run_client(project, script, ship_node, key_file)
    client_pid = result["client_pid"]
    results = result["results"]
    assert [r[0] for r in results] == [1, 2, 3, 4, 5, 6]
    assert {(r[1], r[2]) for r in results} == {("Acc", True)}  # the client's own class comes back
    assert {r[3] for r in results} == {"__main__"}  # the function's globals, as the client has them
    assert client_pid not in {r[4] for r in results}
    # By value, with the script's source along for tracebacks only (never imported).
    assert result["top_by_value"] is True
    assert [name.startswith("<lines>") for name in result["top_modules"]] == [True]
    assert re.fullmatch(r"line \d+: with open\(.*", result["blocker"]), result["blocker"]
    names = sorted(p.name for p in markers.iterdir())
    assert names == [f"module-{client_pid}-__main__"]  # top-level code ran in the client only


def test_main_script_that_imports_user_modules_runs_on_the_worker(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        import mylib
        from mypkg import core_value


        def task(x):
            return mylib.inc(x) + core_value()


        if __name__ == "__main__":
            with _executor() as ex:
                _report(task=_outcome(ex.submit(task, 1)))
    """
    result = run_client(project, script, ship_node, key_file)
    assert value(result["task"]) == 42 + 42


# --------------------------------------------------------------------------- 4. isolation


def test_two_clients_ship_different_modules_of_the_same_name_to_one_node(
    tmp_path: Path, ship_node: ShipNode, key_file: Path
) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    # Both clients hold their sessions open at the same time: each waits for the other's
    # marker file (a condition, not a delay) before its second round and before closing.
    script = PRELUDE + textwrap.dedent(
        """
        import time


        def wait_for(path):
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(path)
                time.sleep(0.01)


        if __name__ == "__main__":
            import shared

            sync, me, other = sys.argv[3], sys.argv[4], sys.argv[5]
            with _executor() as ex:
                first = _outcome(ex.submit(shared.version))
                open(os.path.join(sync, me + ".ready"), "w").close()
                wait_for(os.path.join(sync, other + ".ready"))
                second = [_outcome(f) for f in [ex.submit(shared.version) for _ in range(6)]]
                open(os.path.join(sync, me + ".done"), "w").close()
                wait_for(os.path.join(sync, other + ".done"))
            _report(first=first, second=second)
        """
    )
    clients: dict[str, subprocess.Popen[str]] = {}
    try:
        for me, other in (("a", "b"), ("b", "a")):
            root = tmp_path / me
            write_tree(
                root,
                {
                    "shared/__init__.py": f"""
                        from .impl import VERSION

                        SIDE = {me!r}


                        def version():
                            return SIDE, VERSION, __file__
                    """,
                    "shared/impl.py": f"""
                        VERSION = "version of client {me}"
                    """,
                },
            )
            (root / "main.py").write_text(script)
            clients[me] = subprocess.Popen(
                [sys.executable, "main.py", ship_node.address, str(key_file), str(sync), me, other],
                cwd=root,
                env=client_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        outputs = {me: p.communicate(timeout=SCRIPT_TIMEOUT) for me, p in clients.items()}
    finally:
        for process in clients.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    for me, (stdout, stderr) in outputs.items():
        result = parse_result(stdout, stderr, clients[me].returncode)
        expected = [me, f"version of client {me}", str(tmp_path / me / "shared" / "__init__.py")]
        assert value(result["first"]) == expected
        assert [value(o) for o in result["second"]] == [expected] * 6


def test_a_module_changed_on_disk_is_shipped_anew_to_the_next_executor(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        import importlib

        if __name__ == "__main__":
            import verlib

            with _executor() as ex:
                before = _outcome(ex.submit(verlib.version))
            with open("verlib.py", "w") as f:
                f.write('VERSION = "second, and longer"\\n\\ndef version():\\n    return VERSION\\n')
            importlib.reload(verlib)
            with _executor() as ex:
                after = _outcome(ex.submit(verlib.version))
            _report(before=before, after=after, here=verlib.version())
    """
    write_tree(project, {"verlib.py": 'VERSION = "first"\n\ndef version():\n    return VERSION\n'})
    result = run_client(project, script, ship_node, key_file)
    assert value(result["before"]) == "first"
    assert result["here"] == "second, and longer"
    assert value(result["after"]) == "second, and longer"


# --------------------------------------------------------------------------- 5. linecache


def test_remote_tracebacks_show_lines_of_the_shipped_source(project: Path, ship_node: ShipNode, key_file: Path) -> None:
    # The node runs on this machine, so the paths in a remote traceback exist here and a worker
    # could read the lines from disk instead of from what was shipped. To tell the two apart the
    # client first ships boom.py and gone.py (by running a task from each, so the workers have
    # them), then rewrites boom.py with another marker on the raising line and deletes gone.py,
    # then runs the raising tasks (the raising line is line 7 in both versions of boom.py). The
    # remote traceback text is formatted on the worker (``__cause__``): it must show the V1
    # lines, which now exist only in the shipped source (a worker reading the disk would show
    # LINE-V2 for boom.py and nothing for gone.py).
    write_tree(
        project,
        {
            "boom.py": """
                def ok():
                    return "ok"


                def explode(x):
                    raise ValueError(f"exploded {x}")  # LINE-V1 boom
            """,
            "gone.py": """
                def ok():
                    return "ok"


                def explode(x):
                    raise KeyError(x)  # LINE-V1 gone
            """,
        },
    )
    script = """
        if __name__ == "__main__":
            import boom
            import gone

            with _executor() as ex:
                first = [_outcome(ex.submit(boom.ok)), _outcome(ex.submit(gone.ok))]
                with open(boom.__file__, "w") as f:
                    f.write(
                        '\\ndef ok():\\n    return "ok"\\n\\n\\n'
                        'def explode(x):\\n    raise ValueError(f"exploded {x}")  # LINE-V2 boom\\n'
                    )
                os.remove(gone.__file__)
                boom_error = _outcome(ex.submit(boom.explode, 3))
                _report(first=first, boom=boom_error, gone=_outcome(ex.submit(gone.explode, 4)))
    """
    result = run_client(project, script, ship_node, key_file)
    assert [value(o) for o in result["first"]] == ["ok", "ok"]
    boom = error(result["boom"])
    assert boom["type"] == "ValueError" and boom["message"] == "exploded 3"
    assert f'File "{project / "boom.py"}", line 7, in explode' in boom["cause"], boom["cause"]
    assert 'raise ValueError(f"exploded {x}")  # LINE-V1 boom' in boom["cause"], boom["cause"]
    assert "LINE-V2" not in boom["cause"]
    gone = error(result["gone"])
    assert gone["type"] == "KeyError"
    assert not (project / "gone.py").exists()
    assert f'File "{project / "gone.py"}", line 7, in explode' in gone["cause"], gone["cause"]
    assert "raise KeyError(x)  # LINE-V1 gone" in gone["cause"], gone["cause"]


# --------------------------------------------------------------------------- 6. errors


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("modules", "named"),
    [
        ("math", "math"),  # a C extension (lib-dynload) or built in, depending on the build
        ("sys", "sys"),  # built in
        ("_socket", "_socket"),
        ("no_such_module_for_clusterexec", "no_such_module_for_clusterexec"),
        ("os.no_such_submodule", "os.no_such_submodule"),
    ],
)
def test_modules_without_python_source_are_refused_by_the_constructor(modules: str, named: str) -> None:
    import importlib

    try:
        given: types.ModuleType | str = importlib.import_module(modules)
    except ImportError:
        given = modules
    # An address nobody listens on: were the module accepted, the constructor would fail with
    # NodeUnreachableError instead, so only the modules check can make this test pass.
    with pytest.raises(ConfigurationError) as caught:
        ClusterExecutor(["127.0.0.1:1"], modules=[given], connect_timeout=2.0)
    assert isinstance(caught.value, ValueError)
    assert named in str(caught.value)


@pytest.mark.timeout(30)
def test_modules_must_be_modules_or_names() -> None:
    with pytest.raises(ConfigurationError, match="42"):
        ClusterExecutor(["127.0.0.1:1"], modules=[42], connect_timeout=2.0)  # type: ignore[list-item]


def test_syntax_error_in_shipped_source_fails_the_future_naming_the_module(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    write_tree(project, {"broken.py": "def f():\n    return 1\n"})
    script = """
        if __name__ == "__main__":
            import broken
            import mylib

            # Imported fine here; the file is rewritten before anything was shipped, so the
            # source that travels is the broken one.
            with open(broken.__file__, "w") as f:
                f.write("def f(:\\n    return 1\\n")
            with _executor() as ex:
                _report(broken=_outcome(ex.submit(broken.f)), after=_outcome(ex.submit(mylib.inc, 1)))
    """
    result = run_client(project, script, ship_node, key_file)
    facts = error(result["broken"])
    # Importing the shipped module is part of unpickling the task: a TaskUnpicklingError
    # (a BrokenProcessPool, as ProcessPoolExecutor reports it) that names the SyntaxError.
    assert facts["type"] == "TaskUnpicklingError" and "(SyntaxError: " in facts["message"], facts
    assert "broken.py" in facts["message"] or any("broken" in n for n in facts["notes"]), facts
    if sys.version_info >= (3, 11):  # exception notes exist from 3.11; on 3.10 the message names the file
        assert any("module broken" in n for n in facts["notes"]), facts
    assert value(result["after"]) == 42  # the executor still works


def test_import_error_raised_by_a_shipped_module_on_the_worker_fails_that_future(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    write_tree(
        project,
        {
            "needy.py": """
                import os

                # Only the client records its pid: anywhere else this module needs a dependency
                # that is not installed.
                if os.environ.get("CE_CLIENT_PID") != str(os.getpid()):
                    import missing_dependency_for_clusterexec  # noqa: F401


                def g():
                    return "needy"
            """
        },
    )
    script = """
        if __name__ == "__main__":
            os.environ["CE_CLIENT_PID"] = str(os.getpid())
            import mylib
            import needy

            with _executor() as ex:
                failing = [ex.submit(needy.g) for _ in range(3)]
                _report(
                    here=needy.g(),
                    needy=[_outcome(f) for f in failing],
                    after=_outcome(ex.submit(mylib.inc, 1)),
                )
    """
    result = run_client(project, script, ship_node, key_file)
    assert result["here"] == "needy"
    for outcome in result["needy"]:
        facts = error(outcome)
        assert facts["type"] == "TaskUnpicklingError" and "Error: " in facts["message"], facts
        assert "missing_dependency_for_clusterexec" in facts["message"], facts
        assert "needy.py" in facts["cause"]  # the remote traceback goes through the shipped module
    assert value(result["after"]) == 42


# --------------------------------------------------------------------------- further cases


def test_functions_defined_in_the_main_block_run_on_the_worker(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        if __name__ == "__main__":
            factor = 3

            def work(x):
                return x * factor

            with _executor(auto_modules=False) as ex:
                by_value = list(ex.map(work, range(4)))
            with _executor() as ex:
                _report(by_value=by_value, auto=_outcome(ex.submit(work, 5)))
    """
    result = run_client(project, script, ship_node, key_file)
    assert result["by_value"] == [0, 3, 6, 9]
    assert value(result["auto"]) == 15


def test_modules_of_a_namespace_package_are_shipped(project: Path, ship_node: ShipNode, key_file: Path) -> None:
    write_tree(project, {"nspkg/nmod.py": "def ns():\n    return __name__\n"})
    script = """
        if __name__ == "__main__":
            import nspkg.nmod

            with _executor() as ex:
                _report(ns=_outcome(ex.submit(nspkg.nmod.ns)))
    """
    result = run_client(project, script, ship_node, key_file)
    assert value(result["ns"]) == "nspkg.nmod"


def test_explicitly_naming_an_installed_package_does_not_break_it_on_the_worker(
    project: Path, ship_node: ShipNode, key_file: Path
) -> None:
    script = """
        def use_numpy():
            import numpy

            return int(numpy.arange(5).sum())


        if __name__ == "__main__":
            import numpy

            try:
                ex = _executor(modules=[numpy])
            except ValueError as exc:  # refusing it, as for C extensions, is fine too
                _report(refused=str(exc))
            else:
                with ex:
                    _report(task=_outcome(ex.submit(use_numpy)))
    """
    result = run_client(project, script, ship_node, key_file)
    if "refused" in result:
        assert "numpy" in result["refused"]
    else:
        assert value(result["task"]) == 10


# --------------------------------------------------------------------------- 7. Python version skew


def _other_python() -> tuple[str, str] | None:
    """(path, "major.minor") of an installed Python of another minor version, or None."""
    roots: list[str] = []
    try:
        found = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=20)
        if found.returncode == 0 and found.stdout.strip():
            roots.append(found.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    roots += [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for minor in ("3.12", "3.13", "3.10"):
        if minor == LOCAL_PYTHON:
            continue
        for root in filter(None, roots):
            matches = sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}")))
            if matches:
                return matches[-1], minor
    return None


@pytest.fixture(scope="session")
def other_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A venv of another Python minor version with this clusterexec installed: (python, version)."""
    found = _other_python()
    if found is None:
        pytest.skip(f"no Python of another minor version than {LOCAL_PYTHON} under $(pyenv root)/versions")
    interpreter, minor = found
    base = tmp_path_factory.mktemp("other-python")
    # Install from a copy: pip builds in the source tree, which must stay untouched.
    source = base / "src"
    source.mkdir()
    shutil.copytree(REPO / "clusterexec", source / "clusterexec", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = base / "venv"
    python = str(venv / "bin" / "python")
    steps = [
        [interpreter, "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", str(source)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=300, env=_clean_env())
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(step[:4])} took more than 300 s (no network?)")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(step[:4])} failed (no network?): {(done.stdout + done.stderr)[-800:]}")
    return python, minor


@pytest.fixture
def other_node(other_python: tuple[str, str], key_file: Path) -> Iterator[ShipNode]:
    node = start_ship_node(other_python[0], key_file)
    yield node
    node.stop()


SKEW_SCRIPT = """
    import platform


    def top_level(x):
        return platform.python_version(), x * 2


    def make_closure(factor):
        def closure(x):
            return x * factor

        return closure


    if __name__ == "__main__":
        import types

        import mylib
        import shapes

        closure = make_closure(3)

        with _executor() as ex:
            _report(
                module_function=_outcome(ex.submit(mylib.inc_twice, 1)),
                argument=_outcome(ex.submit(getattr, shapes.Point(1, 2), "y")),
                main_function=_outcome(ex.submit(top_level, 4)),
                lambda_=_outcome(ex.submit(lambda: 1)),
                closure=_outcome(ex.submit(closure, 2)),
                lambda_argument=_outcome(ex.submit(mylib.inc, lambda: 1)),
                namespace_argument=_outcome(ex.submit(getattr, types.SimpleNamespace(a=5), "a")),
            )
"""


@pytest.mark.timeout(SKEW_TIMEOUT)
def test_version_skew_code_by_source_runs_and_code_by_value_fails_naming_both_versions(
    project: Path, other_node: ShipNode, other_python: tuple[str, str], key_file: Path
) -> None:
    minor = other_python[1]
    result = run_client(project, SKEW_SCRIPT, other_node, key_file)
    assert value(result["module_function"]) == 84
    assert value(result["argument"]) == 2
    version, doubled = value(result["main_function"])
    assert version.startswith(minor + ".") and doubled == 8
    for case in ("lambda_", "closure", "lambda_argument"):
        facts = error(result[case])
        assert facts["type"] == "ClusterError", facts
        assert f"Python {LOCAL_PYTHON}" in facts["message"] and f"Python {minor}" in facts["message"], facts
        assert "module" in facts["message"]  # says where to move the function


@pytest.mark.timeout(SKEW_TIMEOUT)
def test_version_skew_arguments_without_code_are_not_refused(
    project: Path, other_node: ShipNode, key_file: Path
) -> None:
    result = run_client(project, SKEW_SCRIPT, other_node, key_file)
    assert value(result["namespace_argument"]) == 5


@pytest.mark.parametrize(
    "make",
    [lambda: types.SimpleNamespace(a=1), lambda: type(None), lambda: [types.MappingProxyType({})]],
    ids=["SimpleNamespace", "NoneType", "mappingproxy"],
)
def test_objects_without_code_are_not_flagged_by_value(make: Callable[[], object]) -> None:
    assert dumps(make(), ModuleCatalog()).by_value is False


@pytest.mark.timeout(SKEW_TIMEOUT)
def test_version_skew_functions_of_an_unguarded_script_fail_naming_the_line_that_keeps_it_from_being_rerun(
    project: Path, other_node: ShipNode, other_python: tuple[str, str], key_file: Path
) -> None:
    # No guard: the top level creates the executor, so the script is not re-run and its
    # functions go by value, which a node of another Python minor version cannot load.
    script = """
        def top_level(x):
            return x * 2


        ex = _executor()
        _report(main_function=_outcome(ex.submit(top_level, 4)))
        ex.shutdown()
    """
    result = run_client(project, script, other_node, key_file)
    facts = error(result["main_function"])
    assert facts["type"] == "ClusterError", facts
    message = facts["message"]
    assert f"Python {LOCAL_PYTHON}" in message and f"Python {other_python[1]}" in message, message
    assert "line " in message and "ex = _executor()" in message, message  # the line at fault
    assert "module" in message and 'if __name__ == "__main__":' in message, message  # what to do
