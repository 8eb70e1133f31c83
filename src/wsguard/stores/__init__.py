"""State stores, chosen by URI: ``memory://`` (embedded default)."""

from __future__ import annotations

from wsguard.errors import ConfigError
from wsguard.stores.base import BanPolicy, Store
from wsguard.stores.memory import MemoryStore


def open_store(uri: str) -> Store:
    """Create the store named by *uri*."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "memory":
        return MemoryStore(uri)
    raise ConfigError("store", f"unsupported store URI scheme {scheme!r}; use memory://")


__all__ = ["BanPolicy", "MemoryStore", "Store", "open_store"]
