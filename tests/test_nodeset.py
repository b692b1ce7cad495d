"""Node sets: ClusterShell's syntax expanded and folded back.

The examples come from ClusterShell's documentation (``nodeset -e`` / ``nodeset -f``) and
Slurm host lists; the properties check that :func:`fold` and :func:`expand` invert each other
and that no input makes either raise anything but ``ConfigurationError``.
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterexec.errors import ConfigurationError
from clusterexec.launch.nodeset import MAX_HOSTS, expand, fold, split


@pytest.mark.parametrize(
    ("nodeset", "hosts"),
    [
        ("node[1-5]", ["node1", "node2", "node3", "node4", "node5"]),
        ("node[01-05]", ["node01", "node02", "node03", "node04", "node05"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("green[36-39,133]", ["green36", "green37", "green38", "green39", "green133"]),
        ("node[0-10/2]", ["node0", "node2", "node4", "node6", "node8", "node10"]),
        ("node[1-2]-ib[0-1]", ["node1-ib0", "node1-ib1", "node2-ib0", "node2-ib1"]),
        ("rack[1-2]n[1-3]", ["rack1n1", "rack1n2", "rack1n3", "rack2n1", "rack2n2", "rack2n3"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("node[01-04,07],gpu1", ["node01", "node02", "node03", "node04", "node07", "gpu1"]),  # Slurm
        ("n[3,1-2]", ["n3", "n1", "n2"]),
        ("n[1-3],n[2-4]", ["n1", "n2", "n3", "n4"]),
        ("n1, n2 ,n3", ["n1", "n2", "n3"]),
        ("n[ 1 - 2 , 4 ]", ["n1", "n2", "n4"]),
        ("[1-2]x", ["1x", "2x"]),
        ("host", ["host"]),
        ("10.0.0.[1-3]", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    ],
)
def test_expand_examples(nodeset: str, hosts: list[str]) -> None:
    assert expand(nodeset) == hosts


@pytest.mark.parametrize(
    ("nodeset", "hosts"),
    [
        ("n[01-10]", [f"n{i:02d}" for i in range(1, 11)]),
        ("n[1-010]", [f"n{i}" for i in range(1, 11)]),  # padding from the start, as ClusterShell
        ("n[08-100]", [f"n{i:02d}" for i in range(8, 101)]),
        ("n[0-2]", ["n0", "n1", "n2"]),
        ("n[00-02]", ["n00", "n01", "n02"]),
        ("n[1,01,001]", ["n1", "n01", "n001"]),
    ],
)
def test_zero_padding_comes_from_the_start_of_a_range(nodeset: str, hosts: list[str]) -> None:
    assert expand(nodeset) == hosts


@pytest.mark.parametrize(
    ("hosts", "nodeset"),
    [
        (["node1", "node2", "node3", "node4", "node5"], "node[1-5]"),
        (["node1", "node2", "node3", "node5"], "node[1-3,5]"),
        (["node001", "node002", "node003"], "node[001-003]"),
        (["n08", "n09", "n10", "n11"], "n[08-11]"),
        ([f"n{i:02d}" for i in range(8, 101)], "n[08-100]"),
        (["node2-ib1", "node1-ib0", "node2-ib0", "node1-ib1"], "node[1-2]-ib[0-1]"),
        (expand("da[2-3]c[1-2]p[1-2]"), "da[2-3]c[1-2]p[1-2]"),
        (["n1", "n3"], "n1,n3"),  # shorter than n[1,3]
        (["b", "a", "n2", "n1", "n10"], "a,b,n[1-2,10]"),
        (["x"], "x"),
        ([], ""),
    ],
)
def test_fold_examples(hosts: list[str], nodeset: str) -> None:
    assert fold(hosts) == nodeset


def test_fold_picks_the_best_field_to_fold() -> None:
    hosts = [f"r{rack}n{node}" for node in range(1, 4) for rack in (1, 2, 5)]
    assert fold(hosts) == "r[1-2,5]n[1-3]"
    assert fold(["r1n1", "r1n2", "r2n1"]) in ("r1n[1-2],r2n1", "r[1-2]n1,r1n2")


@pytest.mark.parametrize(
    ("nodeset", "message"),
    [
        ("n[1-", "missing ']' for the '[' at position 1"),
        ("n[5-3]", "reversed range '5-3' at position 2"),
        ("a,,b", "empty name at position 2"),
        ("a,", "empty name at position 2"),
        ("n[1[2]]", "nested '[' at position 3"),
        ("n]", "unexpected ']' at position 1"),
        ("n[]", "empty range at position 2"),
        ("n[1,,2]", "empty range at position 4"),
        ("n[a-b]", "bad range 'a-b' at position 2"),
        ("n[1-2-3]", "bad range '1-2-3' at position 2"),
        ("n[1-]", "bad range '1-' at position 2"),
        ("n[1-9/0]", "bad step in range '1-9/0' at position 2"),
        ("n[5/2]", "bad step in range '5/2' at position 2"),
        ("a b", "blank inside a name at position 1"),
        ("n[1-2],x[3-1]", "reversed range '3-1' at position 9"),
        ("", "is empty"),
        ("  ", "is empty"),
        ("n[1-1000000]", f"more than {MAX_HOSTS} hosts"),
        ("a[1-1000]b[1-1000]", f"more than {MAX_HOSTS} hosts"),
        ("n[1-99999999999999999999]", "bad range"),
    ],
)
def test_malformed_node_sets_name_the_position(nodeset: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"node set {nodeset!r}")) as caught:
        expand(nodeset)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_split_reports_where_each_part_starts() -> None:
    assert split(" a, b[1,2] ,c") == [(1, "a"), (4, "b[1,2]"), (12, "c")]


@pytest.mark.parametrize("host", ["", "a b", "a,b", "n[1]", "x]", 7])
def test_fold_refuses_hosts_it_cannot_write(host: object) -> None:
    with pytest.raises(ConfigurationError, match="cannot fold host"):
        fold(["ok", host])  # type: ignore[list-item]


# ---------------------------------------------------------------- properties

NUMBERS = st.integers(0, 120).flatmap(lambda n: st.sampled_from([str(n), f"{n:02d}", f"{n:03d}"]))
LITERALS = st.text(alphabet="abn-._:@", max_size=3)
# Names with zero to three numeric fields, padded or not: n7, n07, rack1-n003, x, 1a2.
HOSTS = st.builds(
    lambda head, fields: head + "".join(number + literal for number, literal in fields),
    LITERALS,
    st.lists(st.tuples(NUMBERS, LITERALS), max_size=3),
).filter(bool)
ANY_HOSTS = st.text(min_size=1, max_size=8).filter(lambda h: not any(c in ",[]" or c.isspace() for c in h))


@settings(deadline=None)
@given(st.lists(st.one_of(HOSTS, ANY_HOSTS), max_size=40))
def test_expand_inverts_fold(hosts: list[str]) -> None:
    folded = fold(hosts)
    if hosts:
        expanded = expand(folded)
        assert sorted(expanded) == sorted(set(hosts))
    else:
        assert folded == ""


@settings(deadline=None)
@given(st.lists(HOSTS, min_size=1, max_size=40), st.randoms())
def test_fold_is_canonical_and_never_longer_than_the_list(hosts: list[str], rng: random.Random) -> None:
    folded = fold(hosts)
    shuffled = list(hosts)
    rng.shuffle(shuffled)
    assert fold(shuffled) == folded
    assert fold(expand(folded)) == folded
    assert len(folded) <= len(",".join(set(hosts)))


@st.composite
def node_sets(draw: st.DrawFn) -> str:
    """A valid node set of one to three names, each with zero to two bracket groups."""
    names = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(LITERALS.filter(bool))
        for _ in range(draw(st.integers(0, 2))):
            ranges = []
            for _ in range(draw(st.integers(1, 3))):
                start = draw(st.integers(0, 30))
                width = draw(st.sampled_from([0, 2, 3]))
                stop = draw(st.integers(start, start + 15))
                step = draw(st.sampled_from(["", "", "/2", "/3"])) if stop > start else ""
                first = str(start).zfill(width)
                ranges.append(first if stop == start and not step else f"{first}-{stop}{step}")
            name += "[" + ",".join(ranges) + "]" + draw(LITERALS)
        names.append(name)
    return ",".join(names)


@settings(deadline=None)
@given(node_sets())
def test_fold_of_an_expansion_expands_to_the_same_hosts(nodeset: str) -> None:
    hosts = expand(nodeset)
    assert len(hosts) == len(set(hosts))
    assert sorted(expand(fold(hosts))) == sorted(hosts)


@settings(deadline=None)
@given(node_sets())
def test_blanks_around_commas_change_nothing(nodeset: str) -> None:
    assert expand(nodeset.replace(",", " , ")) == expand(nodeset)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.text(alphabet="n0123456789[]-,/ ", max_size=30)))
def test_expand_raises_only_configuration_errors(text: str) -> None:
    try:
        hosts = expand(text)
    except ConfigurationError as exc:
        assert repr(text) in str(exc)
    else:
        assert hosts and all(hosts)
        assert sorted(expand(fold(hosts))) == sorted(hosts)


@settings(deadline=None)
@given(st.lists(st.text(max_size=6), max_size=10))
def test_fold_raises_only_configuration_errors(hosts: list[str]) -> None:
    try:
        folded = fold(hosts)
    except ConfigurationError:
        return
    assert sorted(expand(folded) if hosts else []) == sorted(set(hosts))
