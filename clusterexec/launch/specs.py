"""Naming nodes: addresses, node sets, SSH specs, Slurm allocations and cluster files.

:func:`resolve_nodes` turns what ``ClusterExecutor(nodes=...)`` accepts into a list of
:class:`NodeAddress` (a node listening on TCP) and :class:`SshSpec` (a node to start over SSH).
:func:`read_cluster_file` reads a clusterit/PEAK cluster file. Every malformed spec raises
:class:`~clusterexec.errors.ConfigurationError` (a ``ValueError``) that names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from clusterexec.errors import ConfigurationError
from clusterexec.launch import nodeset

DEFAULT_PORT = 15809
SSH_PORT = 22
FORMS = "use 'host:port', '[ipv6]:port' or a (host, port) pair"
NODE_FORMS = (
    "use 'host[:port]', '[ipv6]:port', (host, port), a node set such as 'n[01-04]:15809', "
    "'ssh://[user@]host[:sshport]', 'user@host[:sshport][:opt=val]...' or 'slurm'"
)
SSH_SCHEME = "ssh://"
SLURM = "slurm"
SLURM_ENV = "SLURM_JOB_NODELIST"
CLUSTER_ENV = "CLUSTER"
ALL_GROUP = "__all__"

_SLURM_SPEC = re.compile(r"slurm(?::([0-9]+))?")
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

NodeSpec = Union[str, tuple[str, int], "NodeAddress"]


@dataclass(frozen=True)
class NodeAddress:
    """Where a node listens: a host name or IP literal and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class SshSpec:
    """A node to start over SSH: ``ssh://[user@]host[:sshport]`` or EasyCluster's
    ``user@host[:sshport][:opt=val]...``. ``options`` holds the ``opt=val`` pairs in order
    (``python=``, ``workers=``, ``key_filename=``...)."""

    host: str
    user: str | None = None
    port: int = SSH_PORT
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        """The value of option ``name`` (the last one given), or ``default``."""
        value = default
        for key, val in self.options:
            if key == name:
                value = val
        return value

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port != SSH_PORT else ""
        return f"ssh://{user}{host}{port}"


Node = NodeAddress | SshSpec


def _port(text: object, spec: object) -> int:
    if isinstance(text, bool):
        raise ConfigurationError(f"malformed node address {spec!r}: the port must be a number; {FORMS}")
    try:
        port = int(text)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigurationError(f"malformed node address {spec!r}: port {text!r} is not a number; {FORMS}") from None
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"malformed node address {spec!r}: port {port} is not in 1-65535; {FORMS}")
    return port


def _host(text: str, spec: object) -> str:
    if not text or any(c.isspace() for c in text) or "/" in text or "@" in text:
        raise ConfigurationError(f"malformed node address {spec!r}: bad host {text!r}; {FORMS}")
    return text


def parse_address(spec: object, default_port: int = DEFAULT_PORT) -> NodeAddress:
    """Parse one TCP node address (no node set, no SSH); a bare host gets ``default_port``."""
    if isinstance(spec, NodeAddress):
        return spec
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not isinstance(spec[0], str):
            raise ConfigurationError(f"malformed node address {spec!r}: a pair must be (host, port); {FORMS}")
        return NodeAddress(_host(spec[0].strip("[]"), spec), _port(spec[1], spec))
    if not isinstance(spec, str):
        raise ConfigurationError(f"malformed node address {spec!r}: expected a string or a pair; {FORMS}")
    text = spec.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigurationError(f"malformed node address {spec!r}: missing ']'; {FORMS}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"malformed node address {spec!r}: expected ':port' after ']'; {FORMS}")
        return NodeAddress(_host(host, spec), _port(rest[1:], spec) if rest else default_port)
    if text.count(":") > 1:
        raise ConfigurationError(f"malformed node address {spec!r}: write an IPv6 address as '[addr]:port'; {FORMS}")
    host, sep, port = text.partition(":")
    return NodeAddress(_host(host, spec), _port(port, spec) if sep else default_port)


def resolve_nodes(nodes: object, port: int = DEFAULT_PORT) -> list[NodeAddress | SshSpec]:
    """Turn the ``nodes=`` argument into node addresses and SSH specs, in order, without duplicates.

    ``nodes`` is one spec or a list/tuple of them; a spec is ``"host[:port]"``, ``"[ipv6]:port"``,
    a ``(host, port)`` pair (also alone, as the whole argument), a node set such as
    ``"green[36-39,133]:15809"`` (commas outside brackets separate specs), ``"ssh://[user@]host
    [:sshport]"``, ``"user@host[:sshport][:opt=val]..."`` (an ``@`` or an option means SSH; with
    options and no user, SSH as the current user), ``"slurm"`` or ``"slurm:PORT"`` (the hosts of
    ``$SLURM_JOB_NODELIST``), a :class:`pathlib.Path` to a cluster file (its default group), a
    :class:`NodeAddress` or an :class:`SshSpec`. Bare hosts get ``port``. Pure apart from reading
    the environment and cluster files; raises ConfigurationError naming a malformed spec, or when
    nothing is left.
    """
    if isinstance(nodes, (str, NodeAddress, SshSpec, os.PathLike)) or _is_pair(nodes):
        items: list[object] = [nodes]
    elif isinstance(nodes, Iterable) and not isinstance(nodes, (bytes, bytearray)):
        items = list(nodes)
    else:
        raise ConfigurationError(f"nodes must be a node spec, a list of them or an int, not {nodes!r}; {NODE_FORMS}")
    resolved: dict[Node, None] = {}
    for item in items:
        resolved.update(dict.fromkeys(_resolve_item(item, port)))
    if not resolved:
        raise ConfigurationError("nodes is empty; pass at least one address, or None for local nodes")
    return list(resolved)


def parse_nodes(nodes: object) -> list[NodeAddress]:
    """Like :func:`resolve_nodes`, for TCP nodes only: raises ConfigurationError on an SSH spec."""
    resolved = resolve_nodes(nodes)
    for node in resolved:
        if isinstance(node, SshSpec):
            raise ConfigurationError(f"{node} is an SSH node: this caller takes TCP addresses only; {FORMS}")
    return [node for node in resolved if isinstance(node, NodeAddress)]


def expand_spec(spec: str) -> list[str]:
    """A string spec with its node sets expanded, one spec per host: ``"alice@n[1-2]:22,b"`` is
    ``["alice@n1:22", "alice@n2:22", "b"]``. Raises ConfigurationError on a malformed spec."""
    try:
        parts = nodeset.split(spec)
    except ConfigurationError as exc:
        raise _malformed(spec, str(exc)) from None
    specs: list[str] = []
    for _, text in parts:
        if _SLURM_SPEC.fullmatch(text):
            specs.append(text)
            continue
        _resolve_text(text, DEFAULT_PORT, spec)  # validates the port and options too
        head, host, tail = _split(text, spec)
        names = [host] if host.startswith("[") and ":" in host else _hosts(host, spec)
        specs.extend(head + name + tail for name in names)
    return specs


def cluster_from_env() -> str | None:
    """The cluster file named by ``$CLUSTER``, or None when it is unset or empty.

    The executor uses it only when ``nodes`` is None: an explicit ``nodes=`` wins, then
    ``$CLUSTER``, then local nodes. No group is named there, so the executor takes every host
    of the file (:data:`ALL_GROUP`, PEAK's ``hosts``), not only those before the first ``GROUP:``.
    """
    return os.environ.get(CLUSTER_ENV) or None


def read_cluster_file(path: str | os.PathLike[str], group: str | None = None) -> list[str]:
    """The node specs of ``group`` in the clusterit/PEAK cluster file at ``path``, node sets expanded.

    ``group=None`` means the hosts listed before the first ``GROUP:`` line, or every host if there
    are none; ``"__all__"`` is every host; a ``LUMP:`` name is the union of its groups and lumps.
    Order is file order, duplicates removed. Raises ConfigurationError on an unreadable or
    malformed file (naming the line), a LUMP cycle, an unknown group (naming the known ones) or
    an empty group.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read cluster file {name!r}: {exc}") from None
    cluster = _ClusterFile(name)
    cluster.parse(text)
    return cluster.hosts(group)


def _is_pair(value: object) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _resolve_item(item: object, port: int) -> list[Node]:
    if isinstance(item, (NodeAddress, SshSpec)):
        return [item]
    if isinstance(item, os.PathLike):
        return [node for spec in read_cluster_file(item) for node in _resolve_text(spec, port, spec)]
    if isinstance(item, (tuple, list)):
        if len(item) != 2 or not isinstance(item[0], str):
            raise ConfigurationError(f"malformed node address {item!r}: a pair must be (host, port); {FORMS}")
        pair_port = _port(item[1], item)
        host = item[0].strip()
        if ":" in host:  # an IPv6 literal, with or without brackets
            return [NodeAddress(_host(host.strip("[]"), item), pair_port)]
        return [NodeAddress(_host(name, item), pair_port) for name in _hosts(host, item)]
    if isinstance(item, str):
        try:
            parts = nodeset.split(item)
        except ConfigurationError as exc:
            raise _malformed(item, str(exc)) from None
        return [node for _, text in parts for node in _resolve_text(text, port, item)]
    raise ConfigurationError(f"malformed node spec {item!r}: expected a string or a (host, port) pair; {NODE_FORMS}")


def _resolve_text(text: str, port: int, spec: object) -> list[Node]:
    """One spec without top-level commas: slurm, ssh://..., user@host..., or host[:port]."""
    slurm = _SLURM_SPEC.fullmatch(text)
    if slurm:
        return [NodeAddress(host, _port(slurm.group(1), spec) if slurm.group(1) else port) for host in _slurm_hosts()]
    head, host, tail = _split(text, spec)
    url = head.startswith(SSH_SCHEME)
    user = head[len(SSH_SCHEME) if url else 0 :].removesuffix("@") if "@" in head else None
    if user is not None and (not user or any(c.isspace() or c in "/[]," for c in user)):
        raise _malformed(spec, f"bad user {user!r}")
    port_text, options = _tail(tail, spec)
    if url or user is not None or options:
        ssh_port = _port(port_text, spec) if port_text is not None else SSH_PORT
        return [SshSpec(name, user, ssh_port, options) for name in _hosts(host, spec)]
    tcp_port = _port(port_text, spec) if port_text is not None else port
    return [NodeAddress(name, tcp_port) for name in _hosts(host, spec)]


def _split(text: str, spec: object) -> tuple[str, str, str]:
    """``text`` as (``ssh://user@``, host or node set or ``[ipv6]``, ``:port:opt=val...``)."""
    start = len(SSH_SCHEME) if text.startswith(SSH_SCHEME) else 0
    at, colon = text.find("@", start), text.find(":", start)
    if at >= 0 and (colon < 0 or at < colon):
        start = at + 1
    if text.startswith("[", start):
        close = text.find("]", start)
        if close < 0:
            raise _malformed(spec, f"missing ']' for the '[' at position {start}")
        if ":" in text[start:close]:
            return text[:start], text[start : close + 1], text[close + 1 :]
    colon = text.find(":", start)
    end = len(text) if colon < 0 else colon
    return text[:start], text[start:end], text[end:]


def _tail(tail: str, spec: object) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``:port:opt=val...`` as (the port text or None, the options)."""
    if not tail:
        return None, ()
    if not tail.startswith(":"):
        raise _malformed(spec, f"expected ':port' or ':opt=val' after the host, got {tail!r}")
    port_text: str | None = None
    options: list[tuple[str, str]] = []
    for index, segment in enumerate(tail[1:].split(":")):
        key, equals, value = segment.partition("=")
        if equals:
            if not _OPTION_NAME.fullmatch(key) or not value:
                raise _malformed(spec, f"bad option {segment!r}: expected 'name=value'")
            options.append((key, value))
        elif index == 0:
            port_text = segment
        else:
            hint = "; write an IPv6 address as '[addr]:port'" if not options else ""
            raise _malformed(spec, f"expected ':opt=val' after the port, got {segment!r}{hint}")
    return port_text, tuple(options)


def _hosts(host: str, spec: object) -> list[str]:
    """The host names of a host part: an ``[ipv6]`` literal, or a node set expanded."""
    if host.startswith("[") and ":" in host:
        names = [host[1:-1]]
    else:
        try:
            names = nodeset.expand(host) if host else [host]
        except ConfigurationError as exc:
            raise _malformed(spec, str(exc)) from None
    return [_host(name, spec) for name in names]


def _slurm_hosts() -> list[str]:
    value = os.environ.get(SLURM_ENV, "")
    if not value.strip():
        raise ConfigurationError(
            f"nodes='slurm' reads ${SLURM_ENV}, which is not set: run inside a Slurm allocation "
            "(sbatch, salloc or srun), or list the nodes"
        )
    try:
        return nodeset.expand(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"${SLURM_ENV}: {exc}") from None


def _malformed(spec: object, reason: str) -> ConfigurationError:
    return ConfigurationError(f"malformed node spec {spec!r}: {reason}; {NODE_FORMS}")


class _ClusterFile:
    """The parsed sections of one cluster file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.default: list[str] = []
        self.every: list[str] = []
        self.groups: dict[str, list[str]] = {}
        self.lumps: dict[str, list[tuple[str, int]]] = {}

    def parse(self, text: str) -> None:
        """Read the sections of ``text``, then check every lump; raises ConfigurationError."""
        hosts = self.default
        members: list[tuple[str, int]] | None = None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.partition("#")[0].strip()
            kind, colon, name = line.partition(":")
            if colon and kind in ("GROUP", "LUMP"):
                name = self._section_name(name.strip(), number, kind)
                if kind == "GROUP":
                    hosts, members = self.groups.setdefault(name, []), None
                else:
                    members = self.lumps.setdefault(name, [])
                continue
            for token in line.split():
                if members is not None:
                    members.append((token, number))
                    continue
                try:
                    names = expand_spec(token)
                except ConfigurationError as exc:
                    raise self._error(number, str(exc)) from None
                hosts.extend(names)
                self.every.extend(names)
        for lump in self.lumps:
            self._lump(lump, ())

    def hosts(self, group: str | None) -> list[str]:
        """The hosts of ``group`` (None: the default hosts, else every host), duplicates removed."""
        if group is None:
            found = self.default or self.every
        elif group == ALL_GROUP:
            found = self.every
        elif group in self.groups:
            found = self.groups[group]
        elif group in self.lumps:
            found = self._lump(group, ())
        else:
            known = ", ".join([*self.groups, *self.lumps, ALL_GROUP])
            raise ConfigurationError(f"cluster file {self.path!r} has no group {group!r}; known groups: {known}")
        if not found:
            raise ConfigurationError(f"group {group or 'default'!r} of cluster file {self.path!r} lists no hosts")
        return list(dict.fromkeys(found))

    def _lump(self, name: str, stack: tuple[str, ...]) -> list[str]:
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name) :], name))
            raise ConfigurationError(f"cluster file {self.path!r}: LUMP cycle {cycle}; a lump cannot contain itself")
        found: list[str] = []
        for member, number in self.lumps[name]:
            if member in self.lumps:
                found.extend(self._lump(member, (*stack, name)))
            elif member in self.groups:
                found.extend(self.groups[member])
            elif member == ALL_GROUP:
                found.extend(self.every)
            else:
                known = ", ".join([*self.groups, *self.lumps])
                raise self._error(number, f"LUMP:{name} names {member!r}, which is no GROUP or LUMP; known: {known}")
        return found

    def _section_name(self, name: str, number: int, kind: str) -> str:
        if not name or any(c.isspace() for c in name) or name == ALL_GROUP:
            raise self._error(number, f"bad {kind} name {name!r}: one word, not {ALL_GROUP!r}")
        other = self.lumps if kind == "GROUP" else self.groups
        if name in other:
            raise self._error(number, f"{name!r} is both a GROUP and a LUMP")
        return name

    def _error(self, number: int, reason: str) -> ConfigurationError:
        return ConfigurationError(f"cluster file {self.path!r}, line {number}: {reason}")
