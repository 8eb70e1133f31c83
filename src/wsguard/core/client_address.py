"""The client's address: the socket peer, unless a trusted proxy says otherwise.

``X-Forwarded-For`` / ``Forwarded`` are read only when the peer is inside a
configured trusted network. The chain is walked from the right (nearest hop
first), skipping trusted proxies; the first untrusted hop is the client. A
malformed hop stops the walk at the last trustworthy address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from wsguard.core.headers import Headers, split_list

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_loopback_host(host: str) -> bool:
    """Whether a listener's *host* (a name or an address) is on loopback only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def forwarded_host(text: str) -> str:
    """A forwarded address's host, as proxies and ASGI servers read one: ``[host]:port``,
    ``[host]`` and ``host:port`` without their brackets and port (an unclosed bracket
    kept as written)."""
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress | None:
    """Parse an address as found in proxy headers (brackets and ports allowed)."""
    try:
        address = ipaddress.ip_address(forwarded_host(text.strip().strip('"')))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:  # a zone (fe80::1%eth0) names a local interface:
            address = ipaddress.IPv6Address(int(address))  # the same address without it
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def mapped_ipv4(network: IPNetwork) -> ipaddress.IPv4Network | None:
    """The IPv4 addresses an IPv6 network holds in their IPv4-mapped form (``::ffff:0:0/96``
    and its parts: ``::ffff:127.0.0.1/128`` is ``127.0.0.1/32``; a network holding all of
    them, ``::/0``, is ``0.0.0.0/0``), as :func:`parse_ip` writes such addresses; None for
    one that holds none."""
    if isinstance(network, ipaddress.IPv4Network):
        return None
    if network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    if network.supernet_of(_MAPPED):
        return ipaddress.IPv4Network("0.0.0.0/0")
    return None


def _normalized(peer: str, address: IPAddress) -> str:
    """The address as wsguard writes it: *peer* itself when already written so (the
    usual case), so that a connection keeps one copy of it, not two."""
    text = str(address)
    return peer if text == peer else text


@functools.lru_cache(maxsize=8192)
def _peer(peer: str) -> tuple[IPAddress | None, str]:
    """The peer's address and how wsguard writes it, remembered for the last few
    thousand peers (parsing and writing an address costs ~2 µs; every handshake asks)."""
    address = parse_ip(peer)
    return address, peer if address is None else _normalized(peer, address)


def forwarded_for(values: Iterable[str]) -> list[str]:
    """The ``for=`` values of ``Forwarded`` headers (RFC 7239), in order, as written."""
    hops: list[str] = []
    for element in split_list(values):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.lower() == "for":
                hops.append(value)
    return hops


class ClientAddressResolver:
    """Resolve the client address of a handshake from peer and trusted headers."""

    __slots__ = ("_header", "_networks")

    def __init__(self, trusted: Iterable[str], *, header: str = "x-forwarded-for") -> None:
        networks: list[IPNetwork] = []
        for entry in trusted:
            network = ipaddress.ip_network(entry, strict=False)
            networks.append(network)
            mapped = mapped_ipv4(network)  # addresses are matched as parse_ip writes them
            if mapped is not None:
                networks.append(mapped)
        self._networks: tuple[IPNetwork, ...] = tuple(networks)
        self._header = header

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)

    def resolve(self, peer: str, headers: Headers) -> str:
        peer_ip, written = _peer(peer)
        if peer_ip is None:
            return peer
        if not self._networks or not self.is_trusted(peer_ip):
            return written
        if self._header == "forwarded":
            hops = forwarded_for(headers.get_all("forwarded"))
        else:
            hops = list(split_list(headers.get_all("x-forwarded-for")))
        client = peer_ip
        for hop in reversed(hops):
            address = parse_ip(hop)
            if address is None:
                break
            client = address
            if not self.is_trusted(address):
                break
        return str(client)


@functools.lru_cache(maxsize=8192)
def limit_key(address: str, ipv6_prefix: int) -> str:
    """The key that limits and bans count under: the address itself for IPv4, its
    /``ipv6_prefix`` network for IPv6 (one host usually controls a whole /64). The
    address is normalized first: an IPv4 client of a listener bound to ``::`` comes as
    ``::ffff:192.0.2.7`` and counts as ``192.0.2.7``, as the policy names it. Anything
    that is not an address is its own key."""
    ip = parse_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)
