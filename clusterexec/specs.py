"""Parsing node addresses: ``"host:port"``, ``"[ipv6]:port"``, ``(host, port)``.

Every malformed address raises :class:`~clusterexec.errors.ConfigurationError` (a
``ValueError``) that names it and shows the accepted forms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from clusterexec.errors import ConfigurationError

DEFAULT_PORT = 15809
FORMS = "use 'host:port', '[ipv6]:port' or a (host, port) pair"

NodeSpec = Union[str, tuple[str, int], "NodeAddress"]


@dataclass(frozen=True)
class NodeAddress:
    """Where a node listens: a host name or IP literal and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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
    """Parse one node address; a bare host gets ``default_port``."""
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


def parse_nodes(nodes: object) -> list[NodeAddress]:
    """Parse the ``nodes=`` argument: one address or an iterable of them; duplicates removed."""
    if isinstance(nodes, (str, NodeAddress)):
        items: Iterable[object] = [nodes]
    elif isinstance(nodes, tuple) and len(nodes) == 2 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
        items = [nodes]
    elif isinstance(nodes, Iterable):
        items = list(nodes)
    else:
        raise ConfigurationError(f"nodes must be an address, a list of addresses or an int, not {nodes!r}; {FORMS}")
    out: list[NodeAddress] = []
    for item in items:
        address = parse_address(item)
        if address not in out:
            out.append(address)
    if not out:
        raise ConfigurationError("nodes is empty; pass at least one address, or None for local nodes")
    return out


@dataclass(frozen=True)
class SshSpec:
    """A node to start over SSH: ``ssh://[user@]host[:sshport]`` or EasyCluster's
    ``user@host[:sshport][:opt=val]...``. ``options`` holds the ``opt=val`` pairs in order
    (``python=``, ``workers=``, ``key_filename=``...)."""

    host: str
    user: str | None = None
    port: int = 22
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
        port = f":{self.port}" if self.port != 22 else ""
        return f"ssh://{user}{host}{port}"
