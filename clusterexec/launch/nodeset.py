"""ClusterShell-style node sets: ``"green[36-39,133]"`` to host names and back.

:func:`expand` turns a node set into its hosts, in order, without duplicates; :func:`fold`
turns hosts back into a short node set. The syntax is ClusterShell's (and Slurm's host lists):

- a bracket group holds ranges separated by commas: ``n[1-3,7]``, ``n[1-9/2]`` (a step);
- zero padding comes from the start of a range, as in ClusterShell: ``n[01-10]`` is
  ``n01 ... n10``, ``n[1-010]`` is ``n1 ... n10``, ``n[08-100]`` is ``n08 ... n99, n100``;
- a name may hold several groups: ``rack[1-2]n[1-3]`` is ``rack1n1, rack1n2, ... rack2n3``;
- commas outside brackets separate node sets: ``a,b[1-2],c``; blanks around them are ignored.

Every malformed node set raises :class:`~clusterexec.errors.ConfigurationError` naming it and
the position (counted from 0) of the problem.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator

from clusterexec.errors import ConfigurationError

# A node set larger than this is a typo (n[1-1000000000]), not a cluster.
MAX_HOSTS = 100_000
# Keeps int() far from its digit limit and numbers in a range meaningful.
MAX_DIGITS = 18
# Dimensions of a name whose every fold order is tried; past this only the last-first order.
MAX_ORDERS_DIMS = 3

_DIGITS = re.compile(r"([0-9]+)")
_NUMBER = re.compile(r"[0-9]+")
_SPECIAL = ",[]"

# One folded box: for each numeric field of a name pattern, the set of its digit strings.
_Box = tuple[frozenset[str], ...]


def split(nodeset: str) -> list[tuple[int, str]]:
    """Split a node set at the commas outside brackets.

    Returns ``(position, text)`` for each part, ``text`` stripped of blanks and ``position``
    where it starts in ``nodeset``. Raises ConfigurationError on an empty part, a nested, an
    unmatched or an unclosed bracket.
    """
    parts: list[tuple[int, str]] = []
    start = 0
    opened = -1
    for index, char in enumerate(nodeset):
        if char == "[":
            if opened >= 0:
                raise _error(nodeset, f"nested '[' at position {index}")
            opened = index
        elif char == "]":
            if opened < 0:
                raise _error(nodeset, f"unexpected ']' at position {index}")
            opened = -1
        elif char == "," and opened < 0:
            parts.append(_part(nodeset, start, index))
            start = index + 1
    if opened >= 0:
        raise _error(nodeset, f"missing ']' for the '[' at position {opened}")
    parts.append(_part(nodeset, start, len(nodeset)))
    return parts


def expand(nodeset: str) -> list[str]:
    """The hosts of ``nodeset``, in order, duplicates removed.

    ``expand("n[01-03],gpu1")`` is ``["n01", "n02", "n03", "gpu1"]``. Raises ConfigurationError
    (naming the node set and the position of the problem) on a malformed node set or one of more
    than :data:`MAX_HOSTS` hosts.
    """
    if not isinstance(nodeset, str):
        raise ConfigurationError(f"a node set must be a string, not {nodeset!r}")
    if not nodeset.strip():
        raise ConfigurationError(f"node set {nodeset!r} is empty")
    hosts: dict[str, None] = {}
    total = 0
    for position, text in split(nodeset):
        fields = _fields(nodeset, position, text)
        total += math.prod(len(field) for field in fields)
        if total > MAX_HOSTS:
            raise _error(nodeset, f"more than {MAX_HOSTS} hosts")
        hosts.update(dict.fromkeys("".join(combo) for combo in itertools.product(*fields)))
    return list(hosts)


def fold(hosts: Iterable[str]) -> str:
    """The shortest node set found whose :func:`expand` is the set of ``hosts``.

    Hosts are grouped by the pattern of their non-digit parts; the numeric fields of each group
    are folded into ranges (every field, trying each order for up to three fields, keeping zero
    padding). The result is canonical: it depends only on the set of hosts. Raises
    ConfigurationError on a host that is not a string, is empty, or holds blanks, ``,``, ``[``
    or ``]``.
    """
    groups: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for host in hosts:
        if not isinstance(host, str) or not host or any(c in _SPECIAL or c.isspace() for c in host):
            raise ConfigurationError(
                f"cannot fold host {host!r}: a host name is a non-empty string without blanks, ',', '[' or ']'"
            )
        parts = _DIGITS.split(host)
        groups.setdefault(tuple(parts[0::2]), set()).add(tuple(parts[1::2]))
    folded: list[str] = []
    for pattern in sorted(groups):
        folded.extend(_fold_group(pattern, groups[pattern]))
    return ",".join(folded)


def _part(nodeset: str, start: int, end: int) -> tuple[int, str]:
    text = nodeset[start:end]
    stripped = text.strip()
    if not stripped:
        raise _error(nodeset, f"empty name at position {start}")
    return start + len(text) - len(text.lstrip()), stripped


def _fields(nodeset: str, position: int, text: str) -> list[list[str]]:
    """The choices for each piece of one name: a literal is one choice, a bracket group many."""
    fields: list[list[str]] = []
    index = 0
    while index < len(text):
        if text[index] == "[":
            end = text.index("]", index)  # split() has checked that brackets match
            fields.append(_ranges(nodeset, position + index + 1, text[index + 1 : end]))
            index = end + 1
        else:
            end = text.find("[", index)
            end = len(text) if end < 0 else end
            literal = text[index:end]
            blank = next((i for i, c in enumerate(literal) if c.isspace()), -1)
            if blank >= 0:
                raise _error(nodeset, f"blank inside a name at position {position + index + blank}")
            fields.append([literal])
            index = end
    return fields


def _ranges(nodeset: str, position: int, text: str) -> list[str]:
    """The digit strings of the ranges ``text`` (a bracket's content, starting at ``position``)."""
    if not text.strip():
        raise _error(nodeset, f"empty range at position {position}")
    values: list[str] = []
    offset = 0
    for item in text.split(","):
        at = position + offset + len(item) - len(item.lstrip())
        offset += len(item) + 1
        values.extend(_range(nodeset, at, item.strip()))
        if len(values) > MAX_HOSTS:
            raise _error(nodeset, f"more than {MAX_HOSTS} hosts")
    return values


def _range(nodeset: str, at: int, item: str) -> Iterator[str]:
    """One range: ``7``, ``01-10``, ``1-9/2``; padding is the width of a start written with 0s."""
    if not item:
        raise _error(nodeset, f"empty range at position {at}")
    body, slash, step_text = item.partition("/")
    first, dash, last = (part.strip() for part in body.partition("-"))
    if not dash:
        last = first
    for number in (first, last, step_text.strip()) if slash else (first, last):
        if not _NUMBER.fullmatch(number) or len(number) > MAX_DIGITS:
            raise _error(nodeset, f"bad range {item!r} at position {at}: expected 'a', 'a-b' or 'a-b/step' in digits")
    start, stop = int(first), int(last)
    step = int(step_text) if slash else 1
    if start > stop:
        raise _error(nodeset, f"reversed range {item!r} at position {at}")
    if step < 1 or (slash and not dash):
        raise _error(nodeset, f"bad step in range {item!r} at position {at}")
    if (stop - start) // step >= MAX_HOSTS:
        raise _error(nodeset, f"more than {MAX_HOSTS} hosts")
    pad = len(first) if first.startswith("0") and len(first) > 1 else 0
    return (str(value).zfill(pad) for value in range(start, stop + 1, step))


def _error(nodeset: str, reason: str) -> ConfigurationError:
    return ConfigurationError(f"node set {nodeset!r}: {reason}")


def _fold_group(pattern: tuple[str, ...], numbers: set[tuple[str, ...]]) -> list[str]:
    """Fold the hosts of one pattern; returns the shortest rendering over the fold orders."""
    dims = len(pattern) - 1
    points: list[_Box] = [tuple(frozenset([n]) for n in number) for number in sorted(numbers)]
    if dims <= MAX_ORDERS_DIMS:
        orders = list(itertools.permutations(reversed(range(dims))))
    else:
        orders = [tuple(reversed(range(dims)))]
    best: list[str] | None = None
    for order in orders:
        rendered = sorted((_render(pattern, box) for box in _merge(points, order)), key=_natural)
        if best is None or len(",".join(rendered)) < len(",".join(best)):
            best = rendered
    assert best is not None
    return best


def _merge(boxes: list[_Box], order: tuple[int, ...]) -> list[_Box]:
    """Merge boxes that differ in one field only, field by field, until nothing changes."""
    while True:
        before = len(boxes)
        for dim in order:
            merged: dict[_Box, set[str]] = {}
            for box in boxes:
                merged.setdefault(box[:dim] + box[dim + 1 :], set()).update(box[dim])
            boxes = [rest[:dim] + (frozenset(values),) + rest[dim:] for rest, values in merged.items()]
        if len(boxes) == before:
            return boxes


def _render(pattern: tuple[str, ...], box: _Box) -> str:
    """A box as a node set, or as its plain host list when that is shorter."""
    pieces = [pattern[0]]
    for values, literal in zip(box, pattern[1:], strict=True):
        runs = _runs(values)
        pieces.append(runs if len(values) == 1 else f"[{runs}]")
        pieces.append(literal)
    folded = "".join(pieces)
    count = math.prod(len(values) for values in box)
    # The plain list's length, computed without writing it: each value of a field appears in
    # count / len(field) hosts.
    plain_length = count * (len("".join(pattern)) + 1) - 1
    plain_length += sum(sum(map(len, values)) * (count // len(values)) for values in box)
    if plain_length < len(folded):
        return ",".join(sorted(_hosts(pattern, box), key=_natural))
    return folded


def _hosts(pattern: tuple[str, ...], box: _Box) -> Iterator[str]:
    for combo in itertools.product(*(sorted(values) for values in box)):
        yield "".join(itertools.chain.from_iterable(itertools.zip_longest(pattern, combo, fillvalue="")))


def _runs(values: frozenset[str]) -> str:
    """Digit strings as comma-separated ranges, each padded from its start as expand reads it."""
    by_pad: dict[int, list[int]] = {}
    for value in values:
        pad = len(value) if value.startswith("0") and len(value) > 1 else 0
        by_pad.setdefault(pad, []).append(int(value))
    runs: list[list[int]] = []  # [start, stop, pad]
    for pad, numbers in by_pad.items():
        numbers.sort()
        for number in numbers:
            if runs and runs[-1][2] == pad and runs[-1][1] == number - 1:
                runs[-1][1] = number
            else:
                runs.append([number, number, pad])
    # A padded run ending at 09 (or 099...) goes on with an unpadded run starting at 10 (100...).
    unpadded = {run[0]: run for run in runs if run[2] == 0}
    for run in runs:
        follow = unpadded.get(run[1] + 1) if run[2] and run[1] + 1 == 10 ** (run[2] - 1) else None
        if follow is not None:
            run[1] = follow[1]
            follow[2] = -1
    runs = sorted((run for run in runs if run[2] >= 0), key=lambda run: (run[0], run[2]))
    return ",".join(
        str(start).zfill(pad) if start == stop else f"{str(start).zfill(pad)}-{str(stop).zfill(pad)}"
        for start, stop, pad in runs
    )


def _natural(text: str) -> list[tuple[int, str]]:
    """Sort key putting n2 before n10."""
    return [(int(part), part) if index % 2 else (-1, part) for index, part in enumerate(_DIGITS.split(text))]
