"""Every script in ``examples/`` runs to completion and prints what it promises.

Each runs as its own process (``sys.executable examples/NAME.py``), as a user would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 120

# What each example must print; a new example needs an entry here.
EXPECTED = {
    "quickstart.py": [
        "primes below 200000: 17984",
        "checked_sqrt(2.0) = 1.414214",
        "caught the remote exception: ValueError: cannot take the square root of -1.0",
    ],
    "quick_script.py": [
        "sum of cubes below 1000: 249500250000",
        "the workers saw the same argv: True",
    ],
    "remote_nodes.py": [
        "sum of squares of 0..39: 20540",
        "a wrong key is refused: AuthenticationError",
        "nodes stopped",
    ],
}


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """Run one example from the repository root, with a clean key environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTEREXEC_")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=EXAMPLES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    result = run_example(name)
    assert result.returncode == 0, f"{name} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    for line in EXPECTED[name]:
        assert line in result.stdout, f"{name} did not print {line!r}:\n{result.stdout}\n{result.stderr}"
