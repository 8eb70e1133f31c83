"""State stores, chosen by URI: ``memory://`` (embedded default) or Redis: ``redis://``
(one server), ``redis+cluster://`` (a Redis Cluster), ``redis+sentinel://`` (a primary
found through Sentinels), each with a TLS variant (``rediss...``): see :mod:`.uri`.

Implementations are imported on demand so that the policy core, which only
depends on :mod:`wsguard.stores.base`, never pulls in an event loop library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsguard.errors import ConfigError
from wsguard.stores.base import BanPolicy, Store, StoreUnavailable
from wsguard.stores.uri import SHARED_SCHEMES, scheme_of

if TYPE_CHECKING:
    from wsguard.config.model import ClusterConfig


def open_store(uri: str, cluster: ClusterConfig | None = None) -> Store:
    """Create the store named by *uri* (``cluster`` configures the Redis stores)."""
    scheme = scheme_of(uri)
    if scheme == "memory":
        from wsguard.stores.memory import MemoryStore

        return MemoryStore(uri)
    if scheme in SHARED_SCHEMES:
        from wsguard.extras import require
        from wsguard.stores.uri import redacted

        require("redis", f'"{redacted(uri)}"', key="store")
        from wsguard.stores.redis_store import RedisStore

        return RedisStore(uri, cluster)
    raise ConfigError(
        "store",
        f"unsupported store URI scheme {scheme!r}; use memory://, redis://, "
        "redis+cluster:// or redis+sentinel://",
    )


__all__ = ["BanPolicy", "Store", "StoreUnavailable", "open_store"]
