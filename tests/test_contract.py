"""The executor contract, over every transport: what ProcessPoolExecutor code relies on works the
same whether frames are sealed with AES-GCM (the default) or HMAC-SHA256 only, carried over TLS,
or go to the local node that ``ClusterExecutor(2)`` starts by itself.

Each test runs once per transport (the ``cluster`` fixture of conftest.py: 2 workers, real nodes).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait
from concurrent.futures.process import _RemoteTraceback
from pathlib import Path

import helpers
import numpy as np
import pytest
from conftest import link_transports, wait_until

from clusterexec import ClusterExecutor

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Path]:
    """The file blocked tasks wait for; created at teardown at the latest, so that the executor's
    shutdown never waits on a task a failed test left blocked."""
    path = tmp_path / "release"
    yield path
    path.touch()


def test_the_transport_is_what_it_claims(cluster: ClusterExecutor, transport: str) -> None:
    assert cluster.submit(abs, -1).result(timeout=10) == 1
    expected = {
        "aes-gcm": ("aes-gcm", False),
        "hmac-sha256": ("hmac-sha256", False),
        "tls": ("aes-gcm", True),  # TLS carries the sealed frames: the seal stays on
        "local": ("None", False),  # hosted by the client: no wire, nothing to seal
    }[transport]
    assert link_transports(cluster) == [expected]
    assert [node.state for node in cluster.nodes] == ["ready"]


def test_submit_returns_a_future_with_the_result(cluster: ClusterExecutor) -> None:
    future = cluster.submit(divmod, 7, 2)
    assert future.result(timeout=10) == (3, 1)
    assert future.done() and not future.cancelled()
    assert cluster.submit(helpers.add, 1, b=2).result(timeout=10) == 3


@pytest.mark.parametrize("chunksize", [1, 7])
def test_map_yields_in_order(cluster: ClusterExecutor, chunksize: int) -> None:
    assert list(cluster.map(helpers.square, range(60), chunksize=chunksize)) == [i * i for i in range(60)]
    assert list(cluster.map(pow, range(5), [2, 2, 2])) == [0, 1, 4]  # stops at the shortest


def test_an_exception_is_reraised_with_the_remote_traceback_as_cause(cluster: ClusterExecutor) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        cluster.submit(helpers.fail, "boom").result(timeout=10)
    assert isinstance(info.value.__cause__, _RemoteTraceback)
    assert "raise ValueError(message)" in str(info.value.__cause__)
    assert any(frame.name == "fail" for frame in traceback.extract_tb(info.value.__traceback__))
    with pytest.raises(ValueError, match="item 3"):
        list(cluster.map(helpers.fail_at, range(6), [3] * 6, chunksize=2))


def test_large_buffers_travel_out_of_band_both_ways(cluster: ClusterExecutor) -> None:
    array = np.arange(4 << 20, dtype=np.int32)  # 16 MB
    assert np.array_equal(cluster.submit(np.negative, array).result(timeout=30), -array)
    data = bytes(range(256)) * (32 << 10)  # 8 MB
    assert cluster.submit(helpers.identity, data).result(timeout=30) == data


def test_cancel_a_queued_task_so_it_never_runs(cluster: ClusterExecutor, release: Path, tmp_path: Path) -> None:
    started = [tmp_path / f"started-{i}" for i in range(2)]
    running = [cluster.submit(helpers.block, str(s), str(release), i) for i, s in enumerate(started)]
    wait_until(lambda: all(s.exists() for s in started), what="both workers to be busy")
    marker = tmp_path / "marker"
    queued = cluster.submit(helpers.write_marker, str(marker))
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    assert not any(f.cancel() for f in running)  # running tasks cannot be cancelled
    release.touch()
    assert [f.result(timeout=10) for f in running] == [0, 1]
    assert cluster.submit(helpers.square, 4).result(timeout=10) == 16
    assert not marker.exists()


def test_shutdown_cancel_futures_cancels_what_has_not_started(
    cluster: ClusterExecutor, release: Path, tmp_path: Path
) -> None:
    started = [tmp_path / f"started-{i}" for i in range(2)]
    running = [cluster.submit(helpers.block, str(s), str(release), i) for i, s in enumerate(started)]
    wait_until(lambda: all(s.exists() for s in started), what="both workers to be busy")
    markers = [tmp_path / f"marker-{i}" for i in range(6)]
    pending = [cluster.submit(helpers.write_marker, str(m)) for m in markers]
    cluster.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError):
        cluster.submit(abs, 1)
    wait_until(lambda: all(f.cancelled() for f in pending), what="pending futures to be cancelled")
    release.touch()
    cluster.shutdown(wait=True)
    assert [f.result() for f in running] == [0, 1]  # shutdown(wait=True) returned: they are done
    assert not any(m.exists() for m in markers)


def test_as_completed_and_wait(cluster: ClusterExecutor, release: Path) -> None:
    futures = [cluster.submit(helpers.sleep_then, 0.01 * (i % 3), i) for i in range(8)]
    assert sorted(f.result() for f in as_completed(futures, timeout=10)) == list(range(8))

    blocked = cluster.submit(helpers.block, None, str(release), "slow")
    quick = cluster.submit(helpers.square, 3)
    assert wait([blocked, quick], timeout=10, return_when=FIRST_COMPLETED) == ({quick}, {blocked})
    failing = cluster.submit(helpers.fail, "bad")
    assert wait([blocked, failing], timeout=10, return_when=FIRST_EXCEPTION) == ({failing}, {blocked})
    release.touch()
    done, not_done = wait([blocked, quick, failing], timeout=10)
    assert not not_done and blocked.result() == "slow"
