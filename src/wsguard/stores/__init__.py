"""State stores, chosen by URI: ``memory://`` (embedded default).

Implementations are imported on demand so that the policy core, which only
depends on :mod:`wsguard.stores.base`, never pulls in an event loop library.
"""

from __future__ import annotations

from wsguard.errors import ConfigError
from wsguard.stores.base import BanPolicy, Store


def open_store(uri: str) -> Store:
    """Create the store named by *uri*."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "memory":
        from wsguard.stores.memory import MemoryStore

        return MemoryStore(uri)
    raise ConfigError("store", f"unsupported store URI scheme {scheme!r}; use memory://")


__all__ = ["BanPolicy", "Store", "open_store"]
