"""Origin allowlist against cross-site WebSocket hijacking.

Entries are exact origins (``https://app.example.com``, port optional when it is
the scheme's default) or explicit wildcard patterns ``https://*.example.com``
that match any sub-domain (not the apex) with the same scheme and port. Both
sides are parsed; nothing is matched by substring or prefix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.[]:")


@dataclass(frozen=True, slots=True)
class OriginSpec:
    scheme: str
    host: str
    port: int
    wildcard: bool = False

    def matches(self, other: OriginSpec) -> bool:
        if self.scheme != other.scheme or self.port != other.port:
            return False
        if self.wildcard:
            return other.host.endswith("." + self.host) and len(other.host) > len(self.host) + 1
        return self.host == other.host


@functools.lru_cache(maxsize=1024)
def parse_origin(value: str) -> OriginSpec | None:
    """Parse a serialized origin (``scheme://host[:port]``); None if malformed."""
    if not value or len(value) > 2048 or not value.isascii():
        return None
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS or not rest or "/" in rest:
        return None
    if any(ch in rest for ch in "@?#\\ \t"):
        return None
    host, port_text = rest, ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            return None
        host, port_text = rest[: end + 1], rest[end + 1 :]
        if port_text and not port_text.startswith(":"):
            return None
        port_text = port_text[1:]
    elif ":" in rest:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            return None
    host = host.lower().rstrip(".") if not host.startswith("[") else host.lower()
    if not host or not set(host) <= _HOST_CHARS:
        return None
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5:
            return None
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    else:
        port = _DEFAULT_PORTS[scheme]
    return OriginSpec(scheme, host, port)


def parse_allowed_origin(entry: str) -> OriginSpec:
    """Parse an allowlist entry; raises ValueError with a clear message."""
    wildcard = False
    text = entry
    scheme, sep, rest = entry.partition("://")
    if sep and rest.startswith("*."):
        wildcard = True
        text = f"{scheme}://{rest[2:]}"
    if "*" in text:
        raise ValueError(
            f"{entry!r}: '*' is only allowed as the first label (https://*.example.com)"
        )
    spec = parse_origin(text)
    if spec is None:
        raise ValueError(f"{entry!r} is not an origin (scheme://host[:port], no path)")
    if wildcard and (spec.host.count(".") < 1 or _is_public_suffix(spec.host)):
        raise ValueError(
            f"{entry!r}: a wildcard needs a registrable domain (*.example.com), "
            "not a public suffix such as *.co.uk or *.github.io"
        )
    return OriginSpec(spec.scheme, spec.host, spec.port, wildcard)


@functools.lru_cache(maxsize=1)
def _public_suffixes() -> Any:
    from publicsuffixlist import PublicSuffixList  # bundled Public Suffix List, no network

    return PublicSuffixList()


def _is_public_suffix(host: str) -> bool:
    return bool(_public_suffixes().is_public(host))


class OriginPolicy:
    """Decides whether a handshake's ``Origin`` header is acceptable."""

    __slots__ = ("_allow_missing", "_allow_null", "_specs")

    def __init__(self, allowed: tuple[str, ...], *, allow_missing: bool) -> None:
        self._allow_null = "null" in allowed
        self._specs = tuple(parse_allowed_origin(e) for e in allowed if e != "null")
        self._allow_missing = allow_missing

    def check(self, origin: str | None, *, cookie_auth: bool = False) -> bool:
        """True if *origin* may connect. ``None`` means the header was absent."""
        if origin is None:
            return self._allow_missing and not cookie_auth
        if origin == "null":
            return self._allow_null and not cookie_auth
        spec = parse_origin(origin)
        if spec is None:
            return False
        return any(allowed.matches(spec) for allowed in self._specs)
