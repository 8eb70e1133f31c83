"""``memory://``: the embedded single-node store (the default).

Rate counting uses the ``limits`` library's moving window over its async
in-memory storage; slots and bans are plain dictionaries. Every method runs
without awaiting between its read and its write, so each is atomic on the
event loop.
"""

from __future__ import annotations

import collections
import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage as LimitsMemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from wsguard.stores.base import BanPolicy, Store

_PRUNE_AT = 10_000


class MemoryStore(Store):
    """Process-local state for one node."""

    def __init__(self, uri: str = "memory://") -> None:
        self.uri = uri
        self._slots: dict[str, set[str]] = {}
        self._limiter = MovingWindowRateLimiter(LimitsMemoryStorage())
        self._items: dict[tuple[int, float], RateLimitItemPerSecond] = {}
        self._bans: dict[str, float] = {}
        self._nonces: dict[str, float] = {}
        self._nonce_order: collections.deque[tuple[float, str]] = collections.deque()
        self._ban_levels: dict[str, tuple[int, float]] = {}

    async def acquire(self, key: str, limit: int, holder: str) -> bool:
        holders = self._slots.setdefault(key, set())
        if holder in holders:
            return True
        if len(holders) >= limit:
            return False
        holders.add(holder)
        return True

    async def release(self, key: str, holder: str) -> None:
        holders = self._slots.get(key)
        if holders is None:
            return
        holders.discard(holder)
        if not holders:
            del self._slots[key]

    async def count(self, key: str) -> int:
        return len(self._slots.get(key, ()))

    def _item(self, limit: int, window: float) -> RateLimitItemPerSecond:
        item = self._items.get((limit, window))
        if item is None:
            item = RateLimitItemPerSecond(limit, max(1, round(window)))
            self._items[(limit, window)] = item
        return item

    async def hit(self, key: str, limit: int, window: float) -> float:
        item = self._item(limit, window)
        if await self._limiter.hit(item, key):
            return 0.0
        stats = await self._limiter.get_window_stats(item, key)
        return max(0.001, stats.reset_time - time.time())

    async def ban_remaining(self, key: str) -> float:
        until = self._bans.get(key)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._bans[key]
            return 0.0
        return left

    async def record_failure(self, key: str, policy: BanPolicy) -> float | None:
        item = self._item(policy.threshold, policy.window)
        counted = await self._limiter.hit(item, "fail:" + key)
        if counted:
            stats = await self._limiter.get_window_stats(item, "fail:" + key)
            if stats.remaining > 0:
                return None  # still below the threshold
        now = time.monotonic()
        if self._bans.get(key, 0.0) > now:
            return None  # already banned: one ban, logged once
        self._prune(now, policy)
        level, last = self._ban_levels.get(key, (0, 0.0))
        if now - last > policy.max_seconds * 2:
            level = 0  # good behaviour for long enough forgets past bans
        duration = min(policy.base_seconds * (2**level), policy.max_seconds)
        self._ban_levels[key] = (level + 1, now)
        self._bans[key] = now + duration
        await self._limiter.clear(self._item(policy.threshold, policy.window), "fail:" + key)
        return float(duration)

    def _prune(self, now: float, policy: BanPolicy) -> None:
        """Forget expired bans and old ban levels so memory stays bounded."""
        if len(self._ban_levels) < _PRUNE_AT and len(self._bans) < _PRUNE_AT:
            return
        self._bans = {k: until for k, until in self._bans.items() if until > now}
        horizon = policy.max_seconds * 2
        self._ban_levels = {
            k: (level, last)
            for k, (level, last) in self._ban_levels.items()
            if now - last <= horizon
        }

    async def add_nonce(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        order, nonces = self._nonce_order, self._nonces
        while order and order[0][0] <= now:  # entries expire with the window
            _, old = order.popleft()
            if nonces.get(old, now + 1) <= now:
                del nonces[old]
        if key in nonces:
            return False
        expires = now + ttl
        nonces[key] = expires
        order.append((expires, key))
        return True

    async def unban(self, key: str) -> bool:
        return self._bans.pop(key, None) is not None
