"""Node specs: every form ``ClusterExecutor(nodes=...)`` accepts, Slurm, and cluster files.

Each test reads as an example of a form and what it resolves to; malformed specs must raise
``ConfigurationError`` (a ``ValueError``) naming the spec and, for node sets, the position.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterexec.errors import ConfigurationError
from clusterexec.launch.specs import (
    CLUSTER_ENV,
    SLURM_ENV,
    NodeAddress,
    SshSpec,
    cluster_from_env,
    expand_spec,
    parse_address,
    parse_nodes,
    read_cluster_file,
    resolve_nodes,
)

A = NodeAddress


def ssh(host: str, user: str | None = None, port: int = 22, **options: str) -> SshSpec:
    return SshSpec(host, user, port, tuple(options.items()))


@pytest.mark.parametrize(
    ("nodes", "resolved"),
    [
        ("10.0.0.5:15809", [A("10.0.0.5", 15809)]),
        ("gpu01:16000", [A("gpu01", 16000)]),
        ("gpu01", [A("gpu01", 15809)]),
        ("[fe80::1]:15809", [A("fe80::1", 15809)]),
        ("[::1]", [A("::1", 15809)]),
        (("10.0.0.5", 15809), [A("10.0.0.5", 15809)]),
        (["10.0.0.5", 15809], [A("10.0.0.5", 15809)]),
        ((("192.168.1.24", 15809), ("192.168.1.25", 15809)), [A("192.168.1.24", 15809), A("192.168.1.25", 15809)]),
        ([("::1", 1), ("[::2]", 2), ["h", "3"]], [A("::1", 1), A("::2", 2), A("h", 3)]),
        (["a:1", ("b", 2), "c"], [A("a", 1), A("b", 2), A("c", 15809)]),
        (
            "green[36-39,133]:15809",
            [A("green36", 15809), A("green37", 15809), A("green38", 15809), A("green39", 15809), A("green133", 15809)],
        ),
        ("n[01-02]", [A("n01", 15809), A("n02", 15809)]),
        (("n[1-2]", 7), [A("n1", 7), A("n2", 7)]),
        ("a,b:16000,c[1-2]", [A("a", 15809), A("b", 16000), A("c1", 15809), A("c2", 15809)]),
        (["a:1", "b:2", "a:1", ("b", 2)], [A("a", 1), A("b", 2)]),
        ("ssh://alice@hpc01", [ssh("hpc01", "alice")]),
        ("ssh://hpc01:2222", [ssh("hpc01", None, 2222)]),
        ("ssh://alice@[::1]:2222", [ssh("::1", "alice", 2222)]),
        ("alice@hpc01", [ssh("hpc01", "alice")]),
        ("bob@hpc02:python=python3.12:workers=8", [ssh("hpc02", "bob", python="python3.12", workers="8")]),
        ("bob@hpc02:2200:accept_unknown_host=yes", [ssh("hpc02", "bob", 2200, accept_unknown_host="yes")]),
        ("hpc03:workers=4", [ssh("hpc03", workers="4")]),  # an option alone means SSH as the current user
        ("alice@hpc[01-03]", [ssh("hpc01", "alice"), ssh("hpc02", "alice"), ssh("hpc03", "alice")]),
        ("alice@h:key_filename=/home/a@b/id", [ssh("h", "alice", key_filename="/home/a@b/id")]),
        (["h:15809", "alice@h"], [A("h", 15809), ssh("h", "alice")]),
        ([A("h", 1), ssh("h")], [A("h", 1), ssh("h")]),
        ("  h:1  ", [A("h", 1)]),
    ],
    ids=repr,
)
def test_every_form_resolves(nodes: object, resolved: list[object]) -> None:
    assert resolve_nodes(nodes) == resolved


def test_bare_hosts_get_the_default_port() -> None:
    assert resolve_nodes(["a", "b:2", ("c", 3)], port=9000) == [A("a", 9000), A("b", 2), A("c", 3)]


def test_a_generator_of_specs_is_accepted() -> None:
    assert resolve_nodes(f"n{i}:1" for i in range(2)) == [A("n0", 1), A("n1", 1)]


def test_ssh_spec_options_and_text() -> None:
    [spec] = resolve_nodes("bob@hpc02:2200:workers=8:python=python3:workers=2")
    assert isinstance(spec, SshSpec)
    assert spec.option("workers") == "2"
    assert spec.option("python") == "python3"
    assert spec.option("key_filename", "~/.ssh/id") == "~/.ssh/id"
    assert str(spec) == "ssh://bob@hpc02:2200"


@pytest.mark.parametrize(
    ("nodes", "reason"),
    [
        ("host:notaport", "port 'notaport' is not a number"),
        ("h:0", "port 0 is not in 1-65535"),
        ("h:70000", "port 70000 is not in 1-65535"),
        ("a:b:c", "expected ':opt=val' after the port, got 'c'"),
        ("fe80::1:15809", "write an IPv6 address as '[addr]:port'"),
        ("n[1-:15809", "missing ']' for the '[' at position 1"),
        ("n[5-3]:15809", "reversed range '5-3' at position 2"),
        ("n[1,,2]", "empty range at position 4"),
        ("a,,b", "empty name at position 2"),
        ("n[1[2]]", "nested '[' at position 3"),
        ("alice@n[1-", "missing ']' for the '[' at position 7"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':port' or ':opt=val' after the host"),
        ("@h", "bad user ''"),
        ("ssh://", "bad host ''"),
        (":15809", "bad host ''"),
        ("a/b:1", "bad host 'a/b'"),
        ("h:=v", "bad option '=v'"),
        ("h:python=", "bad option 'python='"),
        ("h:9-x=1", "bad option '9-x=1'"),
        ("h:python=x:22", "expected ':opt=val' after the port, got '22'"),
        ("h:", "port '' is not a number"),
        ("", "empty"),
        ([("h",)], "a pair must be (host, port)"),
        ([("h", 1, 2)], "a pair must be (host, port)"),
        ([("h", True)], "the port must be a number"),
        ([3.5], "expected a string or a (host, port) pair"),
        (5, "nodes must be a node spec"),
        (b"h:1", "nodes must be a node spec"),
        ([], "nodes is empty"),
    ],
    ids=repr,
)
def test_malformed_specs_raise_naming_them(nodes: object, reason: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_nodes(nodes)
    message = str(caught.value)
    assert reason in message
    assert isinstance(caught.value, ValueError)
    if nodes != []:
        item = nodes[0] if isinstance(nodes, list) else nodes
        assert repr(item) in message


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.text(alphabet="ab1[]-,:@=/ssh", max_size=30)))
def test_resolve_raises_only_configuration_errors(text: str) -> None:
    try:
        resolved = resolve_nodes(text)
    except ConfigurationError as exc:
        assert repr(text) in str(exc) or "SLURM" in str(exc)
    else:
        assert resolved and all(isinstance(node, (NodeAddress, SshSpec)) for node in resolved)


# ---------------------------------------------------------------- slurm


def test_slurm_reads_the_job_nodelist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SLURM_ENV, "node[01-04,07],gpu1")
    hosts = ["node01", "node02", "node03", "node04", "node07", "gpu1"]
    assert resolve_nodes("slurm") == [A(h, 15809) for h in hosts]
    assert resolve_nodes("slurm:16000") == [A(h, 16000) for h in hosts]
    assert resolve_nodes(["slurm", "extra:1"], port=9) == [*(A(h, 9) for h in hosts), A("extra", 1)]


def test_slurm_without_an_allocation_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SLURM_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=f"{SLURM_ENV}, which is not set"):
        resolve_nodes("slurm")


def test_a_malformed_slurm_nodelist_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SLURM_ENV, "node[01-")
    with pytest.raises(ConfigurationError, match=re.escape(f"${SLURM_ENV}: node set 'node[01-': missing ']'")):
        resolve_nodes("slurm")


# ---------------------------------------------------------------- other entry points


def test_parse_nodes_takes_tcp_nodes_and_refuses_ssh() -> None:
    assert parse_nodes(("h", 1)) == [A("h", 1)]
    assert parse_nodes("n[1-2]:5") == [A("n1", 5), A("n2", 5)]
    with pytest.raises(ConfigurationError, match=re.escape("ssh://alice@h is an SSH node")):
        parse_nodes(["h:1", "alice@h"])


def test_parse_address_is_unchanged() -> None:
    assert parse_address("[::1]:5") == A("::1", 5)
    assert parse_address(("h", "6")) == A("h", 6)
    assert parse_address("h", default_port=7) == A("h", 7)
    with pytest.raises(ConfigurationError, match="IPv6"):
        parse_address("fe80::1:15809")


def test_expand_spec_keeps_everything_but_the_node_set() -> None:
    assert expand_spec("alice@n[1-2]:22:workers=2,b") == ["alice@n1:22:workers=2", "alice@n2:22:workers=2", "b"]
    assert expand_spec("[::1]:5") == ["[::1]:5"]
    assert expand_spec("slurm") == ["slurm"]


def test_cluster_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CLUSTER_ENV, raising=False)
    assert cluster_from_env() is None
    monkeypatch.setenv(CLUSTER_ENV, "")
    assert cluster_from_env() is None
    monkeypatch.setenv(CLUSTER_ENV, "/etc/cluster")
    assert cluster_from_env() == "/etc/cluster"


# ---------------------------------------------------------------- cluster files

CLUSTER = """\
# the machines of the lab
head01 head02

GROUP:compute
node[01-03]          # three nodes
node03 node04:16000
GROUP:gpu
gpu1 node03
LUMP:everything
compute gpu
LUMP:outer
everything
GROUP:compute
node05
GROUP:remote
alice@far[1-2]:workers=2
"""


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster"
    path.write_text(CLUSTER)
    return path


@pytest.mark.parametrize(
    ("group", "hosts"),
    [
        (None, ["head01", "head02"]),
        ("compute", ["node01", "node02", "node03", "node04:16000", "node05"]),
        ("gpu", ["gpu1", "node03"]),
        ("everything", ["node01", "node02", "node03", "node04:16000", "node05", "gpu1"]),
        ("outer", ["node01", "node02", "node03", "node04:16000", "node05", "gpu1"]),
        ("remote", ["alice@far1:workers=2", "alice@far2:workers=2"]),
        (
            "__all__",
            ["head01", "head02", "node01", "node02", "node03", "node04:16000", "gpu1", "node05"]
            + ["alice@far1:workers=2", "alice@far2:workers=2"],
        ),
    ],
)
def test_cluster_file_groups(cluster_file: Path, group: str | None, hosts: list[str]) -> None:
    assert read_cluster_file(cluster_file, group) == hosts
    assert read_cluster_file(str(cluster_file), group) == hosts


def test_without_hosts_before_the_first_group_the_default_is_every_host(tmp_path: Path) -> None:
    path = tmp_path / "cluster"
    path.write_text("# no default hosts\n\nGROUP:a\nx1 x2\nGROUP:b\nx2 y\n")
    assert read_cluster_file(path) == ["x1", "x2", "y"]


def test_resolve_nodes_reads_a_cluster_file_path(cluster_file: Path) -> None:
    assert resolve_nodes(cluster_file, port=9) == [A("head01", 9), A("head02", 9)]


def test_an_unknown_group_names_the_known_ones(cluster_file: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        read_cluster_file(cluster_file, "gpus")
    message = str(caught.value)
    assert "no group 'gpus'" in message
    assert "known groups: compute, gpu, remote, everything, outer, __all__" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("LUMP:a\nb\nLUMP:b\na\n", "LUMP cycle a -> b -> a"),
        ("LUMP:a\na\n", "LUMP cycle a -> a"),
        ("GROUP:g\nx\nLUMP:a\ng b\nLUMP:b\nc\nLUMP:c\nb\n", "LUMP cycle b -> c -> b"),
        ("GROUP:g\nx\nLUMP:a\ng nope\n", "line 4: LUMP:a names 'nope', which is no GROUP or LUMP; known: g, a"),
        ("h1\nGROUP:g\nn[1-\n", "line 3: malformed node spec 'n[1-': node set 'n[1-': missing ']'"),
        ("h1\nGROUP:g\nh:notaport\n", "line 3: malformed node address 'h:notaport'"),
        ("GROUP:\nx\n", "line 1: bad GROUP name ''"),
        ("GROUP:a b\nx\n", "line 1: bad GROUP name 'a b'"),
        ("GROUP:__all__\nx\n", "line 1: bad GROUP name '__all__'"),
        ("GROUP:a\nx\nLUMP:a\na\n", "line 3: 'a' is both a GROUP and a LUMP"),
        ("# nothing\n\n", "group 'default' of cluster file"),
    ],
)
def test_malformed_cluster_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cluster"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=re.escape(f"cluster file {str(path)!r}")) as caught:
        read_cluster_file(path)
    assert message in str(caught.value)


def test_an_empty_group_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster"
    path.write_text("h\nGROUP:empty\n")
    with pytest.raises(ConfigurationError, match="group 'empty' .* lists no hosts"):
        read_cluster_file(path, "empty")


def test_an_unreadable_cluster_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read cluster file"):
        read_cluster_file(tmp_path / "missing")
