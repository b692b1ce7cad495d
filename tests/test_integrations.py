"""Every recipe of docs/integrations.md, run as the page shows it: each Python block is a script.

The blocks check their own results (asserts) and print one line; a script that fails, or does
not print its line, fails its test. The Slurm recipes run under a real ``salloc`` and from
outside an allocation, on the one-host cluster of ``.ci/slurm-up`` (CLUSTEREXEC_NO_SLURM=1 skips
them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "integrations.md"
BLOCK = re.compile(r"^## (?P<section>.+?)$|^```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def recipes() -> list[tuple[str, str]]:
    """(id, code) of every Python block of the page, named by its section."""
    found: list[tuple[str, str]] = []
    section = ""
    for match in BLOCK.finditer(PAGE.read_text()):
        if match.group("section"):
            section = match.group("section").strip()
            continue
        name = re.sub(r"\W+", "-", section.lower()).strip("-")
        count = sum(1 for existing, _ in found if existing.startswith(name))
        found.append((f"{name}-{count + 1}" if count else name, match.group("code")))
    return found


RECIPES = recipes()


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("CLUSTEREXEC_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def expected_line(code: str) -> str:
    """What the recipe's final print starts with: ``print("dask:", ...)`` prints ``dask:``."""
    prints = re.findall(r'print\("([^"]+)"', code)
    assert prints, "a recipe ends by printing what it found"
    return prints[-1]


def test_the_page_has_every_recipe() -> None:
    sections = {name.split("-")[0] for name, _ in RECIPES}
    assert {"dask", "asyncio", "scipy", "emcee", "progress", "joblib", "slurm"} <= sections, sections
    assert len(RECIPES) >= 8


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name,code", RECIPES, ids=[name for name, _ in RECIPES])
def test_recipe(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "recipe.py"
    script.write_text(code)
    command = [sys.executable, str(script)]
    if "ClusterExecutor(\"slurm\")" in code or "from_slurm" in code:
        if os.environ.get("CLUSTEREXEC_NO_SLURM") == "1":
            pytest.skip("CLUSTEREXEC_NO_SLURM=1: no Slurm cluster on this machine")
        up = subprocess.run(["bash", str(ROOT / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, f".ci/slurm-up failed:\n{up.stdout}{up.stderr}"
        if "salloc" in code.splitlines()[0]:
            command = ["salloc", "-N1", "-c2", "--time=5", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=tmp_path, env=run_env())
    assert run.returncode == 0, f"recipe {name} failed:\n{run.stdout}\n{run.stderr}"
    assert expected_line(code) in run.stdout, run.stdout
    if "tqdm" in code:
        assert "50/50" in run.stderr, "the progress bars did not reach the end"
