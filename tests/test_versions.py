"""Package versions, compared between client and nodes: ``ex.check()``, ``clusterexec status
--packages``, and a task that fails to unpickle on a node with another version of a package.

The two versions are real installed distributions (a package with its ``.dist-info``) in two
``site-packages`` folders: this process imports version 1.0, the node runs with 2.0, in which
the class the task needs was renamed.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_env, cli
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterexec import ClusterExecutor, TaskUnpicklingError
from clusterexec.code.versions import NOT_INSTALLED, pickle_packages, versions

pytestmark = pytest.mark.timeout(60)

PACKAGE = "cevertestpkg"


def install_fake(root: Path, version: str, class_name: str) -> Path:
    """Install ``PACKAGE`` ``version`` (defining ``class_name``) in ``root/site-packages``."""
    site = root / "site-packages"
    (site / PACKAGE).mkdir(parents=True)
    (site / PACKAGE / "__init__.py").write_text(
        f"__version__ = {version!r}\n\n"
        f"class {class_name}:\n    def __init__(self, value):\n        self.value = value\n"
    )
    info = site / f"{PACKAGE}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(PACKAGE + "\n")
    (info / "RECORD").write_text(f"{PACKAGE}/__init__.py,,\n")
    return site


@pytest.fixture
def skewed(tmp_path: Path, node_factory, key_file: Path) -> Iterator[tuple[object, str]]:
    """(this side's PACKAGE module, a node's address): 1.0 here, 2.0 on the node."""
    here = install_fake(tmp_path / "here", "1.0", "Thing")
    there = install_fake(tmp_path / "there", "2.0", "RenamedThing")
    node = node_factory("--workers", "1", "--key-file", str(key_file), env={"PYTHONPATH": str(there)})
    sys.path.insert(0, str(here))
    try:
        module = __import__(PACKAGE)
        yield module, node.address
    finally:
        sys.path.remove(str(here))
        sys.modules.pop(PACKAGE, None)


def test_check_reports_the_python_version_and_packages_that_differ(skewed, key_file: Path) -> None:
    module, address = skewed
    with ClusterExecutor([address], key_file=key_file) as ex:
        assert ex.submit(len, [module.__version__]).result(timeout=20) == 1  # nothing of the package travels yet
        ex.submit(repr, module.Thing).exception(timeout=20)  # now a task refers to it by name
        report = ex.check().nodes[0]
    assert report.up
    assert report.python == sys.version.split()[0]
    assert report.packages == {PACKAGE: ("1.0", "2.0")}


def test_a_task_that_fails_to_unpickle_names_the_package_and_both_versions(skewed, key_file: Path) -> None:
    module, address = skewed
    with ClusterExecutor([address], key_file=key_file) as ex:
        with pytest.raises(TaskUnpicklingError) as caught:
            ex.submit(repr, module.Thing(1)).result(timeout=20)
    message = str(caught.value)
    assert f"{PACKAGE} 1.0 here, 2.0 on node {address}" in message, message


def test_status_packages_lists_the_differences(skewed, key_file: Path) -> None:
    _, address = skewed
    here = sys.path[0]
    env = clean_env(PYTHONPATH=here)
    shown = cli("status", address, "-k", str(key_file), "--packages", f"{PACKAGE},json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"{PACKAGE} 1.0 here, 2.0 on node {address}" in shown.stdout
    every = cli("status", address, "-k", str(key_file), "--packages", "--json", env=env)
    assert every.returncode == 0, every.stderr
    assert f'"{PACKAGE}": ["1.0", "2.0"]' in every.stdout


def test_versions_never_import_what_they_read() -> None:
    found = versions(["pytest", "surely_not_a_package_here", "../etc"])
    assert found["surely_not_a_package_here"] == NOT_INSTALLED
    assert found["pytest"] == pytest.__version__
    assert "../etc" not in found


class Local:
    """A class of this test module (not a third-party package)."""


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_packages_finds_what_a_pickle_names(protocol: int) -> None:
    import hypothesis
    import numpy

    data = pickle.dumps((numpy.arange(3), hypothesis.settings, {"x": Local}, 1.5), protocol=protocol)
    # In the order named; this module is a candidate too (its version is compared only where it
    # is installed), the standard library never is.
    assert pickle_packages(data) == ["numpy", "hypothesis", __name__]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_pickle_packages_never_raises_on_garbage(data: bytes) -> None:
    assert isinstance(pickle_packages(data), list)


def test_a_node_reads_a_package_version_again_once_its_file_changes(tmp_path: Path, monkeypatch) -> None:
    """``installed_version`` (what a node's WELCOME says of cloudpickle) is cached per file and
    read again when the package is upgraded under a running node."""
    from clusterexec.node.server import installed_version

    name = "cevertestcached"
    package = tmp_path / name
    package.mkdir()
    init = package / "__init__.py"
    init.write_text("__version__ = '1.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules
    assert installed_version(name) == "1.0"
    assert installed_version(name) == "1.0"
    init.write_text("__version__ = '2.0.1'\n")  # another size: seen even within one mtime tick
    assert installed_version(name) == "2.0.1"
    init.unlink()
    package.rmdir()
    assert installed_version(name) == "not installed"
    assert name not in sys.modules
