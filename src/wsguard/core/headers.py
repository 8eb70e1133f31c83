"""HTTP header helpers shared by the policy core (RFC 9110 tokens, lists)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_token(value: str) -> bool:
    """True if *value* is a non-empty RFC 9110 ``token``."""
    return bool(value) and all(ch in _TCHARS for ch in value)


def split_list(values: Iterable[str]) -> Iterator[str]:
    """Split comma-separated header values (several header lines allowed)."""
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item:
                yield item


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
