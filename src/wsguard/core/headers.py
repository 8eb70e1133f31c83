"""HTTP header helpers shared by the policy core (RFC 9110 tokens, lists)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_token(value: str) -> bool:
    """True if *value* is a non-empty RFC 9110 ``token``."""
    return bool(value) and all(ch in _TCHARS for ch in value)


#: RFC 9110 §5.6.3: optional whitespace is space and tab, nothing else (``str.strip()``
#: would also take U+00A0 and U+0085, latin-1 bytes a client may send)
OWS = " \t"


def split_list(values: Iterable[str]) -> Iterator[str]:
    """Split comma-separated header values (several header lines allowed)."""
    for value in values:
        for item in value.split(","):
            item = item.strip(OWS)
            if item:
                yield item


def token_list(values: Iterable[str], *, versioned: bool = False) -> list[str] | None:
    """The elements of a ``1#token`` header (RFC 9110 §5.6.1), every field line holding
    at least one; None when a line holds none or an element is not a token (with
    *versioned*, ``token ["/" token]``, as ``Upgrade`` protocols are)."""
    out: list[str] = []
    for value in values:
        items = [item.strip(OWS) for item in value.split(",")]
        items = [item for item in items if item]
        if not items:
            return None
        for item in items:
            parts = item.split("/", 1) if versioned else (item,)
            if not all(is_token(part) for part in parts):
                return None
        out += items
    return out


class Headers:
    """Read-only, case-insensitive view of request headers, parsed once."""

    __slots__ = ("_items", "_map")

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = tuple(items)
        mapping: dict[str, list[str]] = {}
        for name, value in self._items:
            mapping.setdefault(name.lower(), []).append(value)
        self._map = mapping

    def get(self, name: str) -> str | None:
        """The first value of *name*, or None."""
        values = self._map.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return list(self._map.get(name.lower(), ()))

    def count(self, name: str) -> int:
        return len(self._map.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def items(self) -> tuple[tuple[str, str], ...]:
        return self._items
