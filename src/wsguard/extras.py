"""The optional features and the extras that install them (``pip install 'wsguard[NAME]'``).

The core install runs ``wsguard serve`` and ``wsguard proxy`` on both engines, the ASGI
middleware and the Python client. A feature that needs more asks for it where it starts
(:func:`require`), so that a configuration asking for what is not installed stops at start
with one line naming the extra, instead of an ``ImportError`` later.
"""

from __future__ import annotations

import importlib.util

from wsguard.errors import ConfigError

#: extra -> the top-level modules it provides that wsguard imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "publickey": ("cryptography", "httpx"),
    "redis": ("redis",),
    "admin": ("starlette", "uvicorn", "httpx", "cryptography"),
    "webhook": ("httpx",),
    "audit": ("rich",),
}


class MissingExtra(ConfigError):
    """What the configuration (``key``) or the command asks for needs an extra that is not
    installed. The message is the whole story: what, which extra, the command to run."""

    def __init__(self, key: str, what: str, extra: str) -> None:
        self.extra = extra
        super().__init__(key, f"{what} needs the {extra} extra: pip install 'wsguard[{extra}]'")


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of *extra* (or just *modules*) that cannot be imported here."""
    return [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, key: str = "", modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtra` unless the modules *what* needs (default: all of
    *extra*'s) are installed. *key* is the configuration key that asked for it, if any."""
    if missing(extra, modules):
        raise MissingExtra(key, what, extra)


__all__ = ["EXTRAS", "MissingExtra", "missing", "require"]
