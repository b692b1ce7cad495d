"""Optional TLS: a node with --tls-cert only talks TLS; the executor passes ssl_context=.

TLS adds certificate-based identity of the node (and, with --tls-ca, of clients) on top of the
key handshake and the sealed frames, which stay on.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from conftest import NodeProcess, cli, make_cert

from clusterexec import ClusterError, ClusterExecutor


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path, "node")


@pytest.mark.timeout(60)
def test_tasks_run_over_tls(node_factory, key_file: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    node: NodeProcess = node_factory(
        "--workers", "2", "--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key)
    )
    context = ssl.create_default_context(cafile=str(cert))
    with ClusterExecutor([node.address], key_file=key_file, ssl_context=context) as ex:
        assert list(ex.map(pow, range(50), range(50))) == [i**i for i in range(50)]
        data = bytes(range(256)) * 40000  # 10 MB, many TLS records
        assert ex.submit(bytes, data).result(timeout=30) == data


@pytest.mark.timeout(60)
def test_a_client_without_tls_or_with_an_untrusted_cert_is_refused(
    node_factory, key_file: Path, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certs
    node: NodeProcess = node_factory("--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key))
    with pytest.raises(ClusterError, match=node.address):
        ClusterExecutor([node.address], key_file=key_file, connect_timeout=3)
    other, _ = make_cert(tmp_path, "other")
    with pytest.raises(ClusterError, match="TLS"):
        ClusterExecutor(
            [node.address],
            key_file=key_file,
            connect_timeout=3,
            ssl_context=ssl.create_default_context(cafile=str(other)),
        )
    # The node is still up and serves a good client.
    with ClusterExecutor(
        [node.address], key_file=key_file, ssl_context=ssl.create_default_context(cafile=str(cert))
    ) as ex:
        assert ex.submit(abs, -3).result(timeout=10) == 3


@pytest.mark.timeout(60)
def test_tls_ca_requires_client_certificates(
    node_factory, key_file: Path, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certs
    client_cert, client_key = make_cert(tmp_path, "client")
    node: NodeProcess = node_factory(
        "--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(client_cert)
    )
    anonymous = ssl.create_default_context(cafile=str(cert))
    with pytest.raises(ClusterError):
        ClusterExecutor([node.address], key_file=key_file, connect_timeout=3, ssl_context=anonymous)
    known = ssl.create_default_context(cafile=str(cert))
    known.load_cert_chain(str(client_cert), str(client_key))
    with ClusterExecutor([node.address], key_file=key_file, ssl_context=known) as ex:
        assert ex.submit(abs, -4).result(timeout=10) == 4


# --------------------------------------------------------------------------- clusterexec status


def status_of(*args: str) -> dict:
    """``clusterexec status --json ARGS``: the one node's entry."""
    done = cli("status", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    (entry,) = json.loads(done.stdout)["nodes"]
    return entry


@pytest.mark.timeout(60)
def test_status_probes_a_tls_node_with_tls_ca(node_factory, key_file: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    node: NodeProcess = node_factory(
        "--workers", "2", "--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key)
    )
    entry = status_of(node.address, "-k", str(key_file), "--tls-ca", str(cert))
    assert entry["up"] and entry["workers"] == 2
    # Without TLS, the node drops the probe, which says which option to pass.
    entry = status_of(node.address, "-k", str(key_file))
    assert not entry["up"] and "--tls-ca" in entry["reason"]


@pytest.mark.timeout(60)
def test_status_over_tls_says_what_is_wrong(
    node_factory, key_file: Path, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certs
    plain: NodeProcess = node_factory("--workers", "1", "--key-file", str(key_file))
    entry = status_of(plain.address, "-k", str(key_file), "--tls-ca", str(cert))
    assert not entry["up"] and "does not speak TLS" in entry["reason"]
    assert status_of(plain.address, "-k", str(key_file))["up"]  # the node is still fine

    other, _ = make_cert(tmp_path, "other")
    tls: NodeProcess = node_factory("--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key))
    entry = status_of(tls.address, "-k", str(key_file), "--tls-ca", str(other))
    assert not entry["up"] and "not trusted" in entry["reason"]

    done = cli("status", tls.address, "-k", str(key_file), "--tls-ca", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and "cannot use --tls-ca" in done.stderr


@pytest.mark.timeout(60)
def test_status_presents_a_client_certificate_to_a_node_with_tls_ca(
    node_factory, key_file: Path, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certs
    client_cert, client_key = make_cert(tmp_path, "client")
    node: NodeProcess = node_factory(
        "--key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(client_cert)
    )
    entry = status_of(node.address, "-k", str(key_file), "--tls-ca", str(cert))
    assert not entry["up"] and "--tls-cert" in entry["reason"]
    tls_args = ["--tls-ca", str(cert), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
    assert status_of(node.address, "-k", str(key_file), *tls_args)["up"]
