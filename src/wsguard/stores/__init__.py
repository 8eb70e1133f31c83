"""State stores, chosen by URI: ``memory://`` (embedded default), ``redis://``.

Implementations are imported on demand so that the policy core, which only
depends on :mod:`wsguard.stores.base`, never pulls in an event loop library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsguard.errors import ConfigError
from wsguard.stores.base import BanPolicy, Store, StoreUnavailable

if TYPE_CHECKING:
    from wsguard.config.model import ClusterConfig


def open_store(uri: str, cluster: ClusterConfig | None = None) -> Store:
    """Create the store named by *uri* (``cluster`` configures redis:// stores)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "memory":
        from wsguard.stores.memory import MemoryStore

        return MemoryStore(uri)
    if scheme in ("redis", "rediss"):
        from wsguard.extras import require
        from wsguard.stores.uri import redacted

        require("redis", f'"{redacted(uri)}"', key="store")
        from wsguard.stores.redis_store import RedisStore

        return RedisStore(uri, cluster)
    raise ConfigError(
        "store", f"unsupported store URI scheme {scheme!r}; use memory:// or redis://"
    )


__all__ = ["BanPolicy", "Store", "StoreUnavailable", "open_store"]
