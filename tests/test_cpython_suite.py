"""CPython 3.13's own test_concurrent_futures passes against ClusterExecutor.

The suite is 3.13's and needs 3.13's ``test.support``, while this test suite may run under
another Python. So this test finds a Python 3.13 that has ``test.test_concurrent_futures``
(``python3.13`` on PATH, or pyenv's), makes a venv from it in ``.venv-cpy313`` at the
repository root (once; remade when ``pyproject.toml`` or the interpreter changes), installs
clusterexec into it in editable mode, runs ``tests/cpython_suite.py`` there and asserts that
every test that ran passed. Which tests are skipped, and why, is ``SKIPS`` in that module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "cpython_suite.py"
VENV = ROOT / ".venv-cpy313"
SUITE_TIMEOUT = 900.0
INSTALL_TIMEOUT = 600.0

# The composed tests' child scripts do `from concurrent.futures import ClusterExecutor` (the
# executor's class name): this line in the venv's site-packages makes that name importable
# there, only in processes started with the variable set. A .pth line, because those children
# run in isolated mode (-I), which ignores PYTHONPATH but still reads site-packages.
ALIAS_ENV = "CLUSTEREXEC_CPYTHON_SUITE"
ALIAS_PTH = (
    f'import os; os.environ.get("{ALIAS_ENV}") and setattr(__import__("concurrent.futures").futures, '
    '"ClusterExecutor", __import__("clusterexec").ClusterExecutor)\n'
)


def _has_suite(python: str) -> bool:
    try:
        probe = subprocess.run(
            [python, "-c", "import sys, test.test_concurrent_futures; assert sys.version_info[:2] == (3, 13)"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def find_python313() -> str | None:
    """A Python 3.13 interpreter with ``test.test_concurrent_futures``, or None."""
    candidates = []
    pyenv_root = os.environ.get("PYENV_ROOT")
    if not pyenv_root and shutil.which("pyenv"):
        try:
            pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pyenv_root = None
    for root in filter(None, [pyenv_root, str(Path.home() / ".pyenv")]):
        candidates += sorted(str(p) for p in Path(root).glob("versions/3.13*/bin/python3.13"))
    on_path = shutil.which("python3.13")
    if on_path:
        candidates.append(on_path)
    for python in candidates:
        if _has_suite(python):
            return python
    return None


def _venv_key(python: str) -> str:
    h = hashlib.sha256()
    h.update(os.path.realpath(python).encode())
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(ALIAS_PTH.encode())
    return h.hexdigest()


def ensure_venv(python: str) -> Path:
    """The venv's interpreter, with clusterexec installed (editable) and the alias line; made
    or remade under a lock when its key changed."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    stamp = VENV / "clusterexec-key"
    key = _venv_key(python)
    with open(ROOT / ".venv-cpy313.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        venv_python = VENV / "bin" / "python"
        if stamp.exists() and stamp.read_text() == key and venv_python.exists():
            return venv_python
        shutil.rmtree(VENV, ignore_errors=True)
        steps = [
            [python, "-m", "venv", str(VENV)],
            [str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(ROOT)],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            if done.returncode != 0:
                pytest.fail(f"making the Python 3.13 venv failed: {' '.join(step)}\n{done.stdout}\n{done.stderr}")
        site = subprocess.run(
            [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(site) / "clusterexec_cpython_suite.pth").write_text(ALIAS_PTH)
        stamp.write_text(key)
        return venv_python


def _describe(report: dict[str, list[list[str]]]) -> str:
    parts = []
    for kind in ("failures", "errors"):
        for test_id, text in report[kind]:
            parts.append(f"--- {kind[:-1].upper()}: {test_id}\n{text}")
    for test_id in report.get("unexpected_successes", []):
        parts.append(f"--- UNEXPECTED SUCCESS: {test_id}")
    return "\n".join(parts)


@pytest.mark.timeout(SUITE_TIMEOUT + INSTALL_TIMEOUT)
def test_cpython_313_concurrent_futures_suite_passes(tmp_path: Path) -> None:
    """Every test of CPython 3.13's test_concurrent_futures that is not in SKIPS passes."""
    python = find_python313()
    if python is None:
        pytest.skip("no Python 3.13 with test.test_concurrent_futures on this machine (python3.13 on PATH or pyenv)")
    venv_python = ensure_venv(python)
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env[ALIAS_ENV] = "1"
    start = time.monotonic()
    try:
        run = subprocess.run(
            [str(venv_python), str(RUNNER), "--report", str(report_path)],
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT,
            env=env,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"CPython's suite did not finish within {SUITE_TIMEOUT:g}s:\n{exc.stderr}")
    elapsed = time.monotonic() - start
    if not report_path.exists():
        pytest.fail(f"the runner wrote no report (exit status {run.returncode}):\n{run.stdout}\n{run.stderr[-20000:]}")
    report = json.loads(report_path.read_text())
    problems = _describe(report)
    assert not problems and run.returncode == 0, (
        f"CPython 3.13's test_concurrent_futures against ClusterExecutor ({elapsed:.0f}s, {report['run']} tests):\n"
        f"{problems}\n\nrunner output (tail):\n{run.stderr[-5000:]}"
    )
    assert report["run"] >= 50, f"only {report['run']} tests ran: the composition lost some classes"
    print(f"{report['run']} CPython tests in {elapsed:.0f}s, {len(report['skipped'])} skipped", file=sys.stderr)
