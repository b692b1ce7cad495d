"""Compression of payloads between the client and the workers (``compression=``).

The codec work is pure and tested as such; what matters to users is checked end to end with
real nodes: a highly compressible 10 MB argument and result cross the wire in far fewer bytes
(counted by a proxy between the executor and the node), mixed traffic works, and a node that
lacks the codec gets plain payloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers
import pytest
from conftest import TESTS, NodeProcess
from proxy import Proxy

from clusterexec import ClusterExecutor, ConfigurationError
from clusterexec.errors import ProtocolError
from clusterexec.wire.compression import CODECS, COMPRESS_MIN, is_packed, pack, unpack

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20
BODY = b"\x80\x05" + b"pickle stream " * 1000  # what a pickle body looks like: PROTO 5 first


# --------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("codec", CODECS)
def test_a_packed_payload_unpacks_to_the_same_bytes(codec: str) -> None:
    buffers = [bytearray(3 * MB), os.urandom(MB), b"tiny"]
    body, packed = pack(BODY, buffers, codec)
    assert is_packed(body) and len(body) < len(BODY)
    assert len(packed[0]) < 3 * MB  # compressed
    assert packed[1] is buffers[1] and packed[2] is buffers[2]  # random and small: sent as they are
    plain, out = unpack(body, packed)
    assert bytes(plain) == BODY
    assert [bytes(b) for b in out] == [bytes(b) for b in buffers]
    assert memoryview(out[0]).readonly is False  # numpy arrays built on it stay writable


def test_what_does_not_shrink_is_sent_as_it_is() -> None:
    small = b"\x80\x05" + bytes(COMPRESS_MIN - 3)
    noise = b"\x80\x05" + os.urandom(2 * MB)
    for body in (small, noise):
        packed, buffers = pack(body, [], "zlib")
        assert packed is body and not is_packed(packed)
        assert unpack(packed, buffers)[0] is packed


def test_a_packed_payload_that_lies_about_its_sizes_is_refused() -> None:
    body, buffers = pack(BODY, [bytearray(MB)], "zlib")
    with pytest.raises(ProtocolError, match="truncated"):
        unpack(body, [buffers[0][:-10]])
    with pytest.raises(ProtocolError, match="shorter than its table"):
        unpack(body[:5], buffers)
    # The table: mark and codec (2 bytes), then per piece a flag and a u64 size; the buffer's
    # size is at 2 + 9 + 1. Declared one byte short, the buffer inflates past it.
    lying = bytearray(body)
    lying[12:20] = (MB - 1).to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="more than its declared"):
        unpack(bytes(lying), buffers)


def test_an_unknown_codec_names_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError, match="'zlib', 'bz2', 'lzma'"):
        ClusterExecutor(1, compression="gzip")


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def executor_factory(node: NodeProcess, key_file: Path) -> Iterator[Callable[..., ClusterExecutor]]:
    """Executors on the ``node`` fixture with extra options; all shut down at teardown."""
    made: list[ClusterExecutor] = []

    def factory(**options: object) -> ClusterExecutor:
        ex = ClusterExecutor([node.address], key_file=key_file, **options)  # type: ignore[arg-type]
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def proxied(node: NodeProcess) -> Iterator[Proxy]:
    """A counting proxy in front of the ``node`` fixture."""
    proxy = Proxy((node.host, node.port))
    yield proxy
    proxy.close()


def wire_bytes(proxy: Proxy, key_file: Path, compression: str | None, value: object) -> tuple[int, int]:
    """Bytes client to node and node to client for one ``identity(value)`` task through ``proxy``."""
    before = len(proxy.connections)
    with ClusterExecutor([proxy.address], key_file=key_file, compression=compression) as ex:
        assert ex.submit(helpers.identity, value).result(timeout=30) == value
    (connection,) = proxy.connections[before:]
    connection.closed.wait(10)
    return len(connection.client_bytes), len(connection.node_bytes)


def test_a_compressible_10mb_argument_and_result_cross_the_wire_compressed(proxied: Proxy, key_file: Path) -> None:
    value = b"all work and no play " * (10 * MB // 21)  # in the pickle stream
    plain_up, plain_down = wire_bytes(proxied, key_file, None, value)
    packed_up, packed_down = wire_bytes(proxied, key_file, "zlib", value)
    assert plain_up > 10 * MB and plain_down > 10 * MB
    assert packed_up < MB and packed_down < MB


def test_out_of_band_buffers_are_compressed_too(proxied: Proxy, key_file: Path) -> None:
    numpy = pytest.importorskip("numpy")
    table = numpy.zeros(10 * MB // 8)  # an out-of-band buffer, not copied into the pickle
    with ClusterExecutor([proxied.address], key_file=key_file, compression="zlib") as ex:
        doubled = ex.submit(numpy.multiply, table, 2).result(timeout=30)
    assert doubled.shape == table.shape and not doubled.any() and doubled.flags.writeable
    (connection,) = proxied.connections
    connection.closed.wait(10)
    assert len(connection.client_bytes) < MB and len(connection.node_bytes) < MB


@pytest.mark.parametrize("codec", ["bz2", "lzma"])
def test_every_codec_carries_tasks_functions_and_results(executor_factory, codec: str) -> None:
    big = bytes(2 * MB)
    ex = executor_factory(compression=codec)
    captured = lambda x: len(big) + x  # noqa: E731 - a closure: its 2 MB travel with the function
    assert ex.submit(captured, 1).result(timeout=30) == 2 * MB + 1
    assert list(ex.map(pow, range(10), range(10))) == [i**i for i in range(10)]  # small: sent plain
    assert ex.submit(helpers.identity, bytearray(big)).result(timeout=30) == big


def test_a_node_without_the_codec_gets_plain_payloads(
    node_factory: Callable[..., NodeProcess], key_file: Path, tmp_path: Path
) -> None:
    # A real node whose Python has no lzma module (as some minimal builds): it declines lzma.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['lzma'] = None\n")
    node = node_factory("--key-file", str(key_file), env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{TESTS}"})
    proxy = Proxy((node.host, node.port))
    try:
        value = bytes(10 * MB)
        up, down = wire_bytes(proxy, key_file, "lzma", value)
        assert up > 10 * MB and down > 10 * MB
    finally:
        proxy.close()
