"""``memory://``: the embedded single-node store (the default).

Everything is plain dictionaries updated without an ``await`` between read and
write, so each method is atomic on the event loop. Rate counting uses a sliding
window counter (the previous fixed window weighted by its overlap plus the
current one): O(1) memory per key and no double burst at window boundaries; the
handshake allowance is a token bucket (:meth:`MemoryStore.pace`).
Stale entries are pruned in amortized O(1) as the tables grow, so memory stays
bounded by the number of active keys, whatever an attacker rotates through.

(The ``limits`` library's in-memory storage was measured unsuitable here: its
expiry pass does one thread hop per key, 1.6 s of CPU per pass at 20k keys.)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from wsguard.stores.base import (
    CHANNEL_REVOKE,
    BanPolicy,
    EventHandler,
    RevocationKind,
    Store,
)

_PRUNE_FLOOR = 1024


class _Table:
    """A dict that drops stale entries once it has doubled since the last prune."""

    __slots__ = ("data", "next_prune")

    def __init__(self) -> None:
        self.data: dict[str, tuple[float, float, float]] = {}
        self.next_prune = _PRUNE_FLOOR

    def maybe_prune(self, is_stale: Callable[[tuple[float, float, float]], bool]) -> None:
        if len(self.data) < self.next_prune:
            return
        self.data = {k: v for k, v in self.data.items() if not is_stale(v)}
        self.next_prune = max(_PRUNE_FLOOR, 2 * len(self.data))


class MemoryStore(Store):
    """Process-local state for one node."""

    def __init__(self, uri: str = "memory://", clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = uri
        self._clock = clock  # seconds, monotonic: every expiry, window and bucket
        self._slots: dict[str, str | set[str]] = {}  # key -> its holder, or its holders
        self._windows = _Table()  # key -> (window start, previous count, current count)
        self._buckets = _Table()  # key -> (tokens, as of, full again at)
        self._bans = _Table()  # key -> (banned until, level, last ban time)
        self._nonces: dict[str, float] = {}
        self._nonce_order: collections.deque[tuple[float, str]] = collections.deque()
        self._revoked: dict[str, float] = {}
        self._next_revoked_prune = _PRUNE_FLOOR
        self._handlers: list[EventHandler] = []

    # -- slots -------------------------------------------------------------------------

    async def acquire(self, key: str, limit: int, holder: str) -> bool:
        slots = self._slots
        held = slots.get(key)
        if held is None:
            if limit < 1:
                return False
            slots[key] = holder  # one holder (most keys: one address, one subject) is no set
            return True
        if isinstance(held, str):
            if held == holder:
                return True
            if limit < 2:
                return False
            slots[key] = {held, holder}
            return True
        if holder in held:
            return True
        if len(held) >= limit:
            return False
        held.add(holder)
        return True

    async def release(self, key: str, holder: str) -> None:
        slots = self._slots
        held = slots.get(key)
        if held is None:
            return
        if isinstance(held, str):
            if held == holder:
                del slots[key]
            return
        held.discard(holder)
        if len(held) == 1:
            slots[key] = next(iter(held))  # a set never shrinks its table: let it go
        elif not held:
            del slots[key]

    async def count(self, key: str) -> int:
        held = self._slots.get(key)
        if held is None:
            return 0
        return 1 if isinstance(held, str) else len(held)

    # -- rates -------------------------------------------------------------------------

    def _estimate(self, key: str, window: float, now: float) -> tuple[float, float, float, float]:
        """(window start, previous, current, sliding estimate) for *key* at *now*."""
        start = now - (now % window)
        entry = self._windows.data.get(key)
        if entry is None or entry[0] < start - window:
            previous, current = 0.0, 0.0
        elif entry[0] < start:
            previous, current = entry[2], 0.0
        else:
            previous, current = entry[1], entry[2]
        weight = 1.0 - (now - start) / window
        return start, previous, current, previous * weight + current

    def _record(
        self, key: str, start: float, previous: float, current: float, window: float, now: float
    ) -> None:
        self._windows.data[key] = (start, previous, current)
        self._windows.maybe_prune(lambda v: v[0] < now - 2 * window)

    async def hit(self, key: str, limit: int, window: float) -> float:
        now = self._clock()
        start, previous, current, estimate = self._estimate(key, window, now)
        if estimate + 1 > limit:
            if current + 1 > limit or previous <= 0:
                return max(0.001, start + window - now)
            # the previous window's weight must fall until the estimate leaves room
            ready = start + window * (1.0 - (limit - current - 1) / previous)
            return max(0.001, ready - now)
        self._record(key, start, previous, current + 1, window, now)
        return 0.0

    async def take(self, key: str, want: int, limit: int, window: float) -> tuple[int, float]:
        now = self._clock()
        start, previous, current, estimate = self._estimate(key, window, now)
        granted = min(want, int(limit - estimate))
        if granted <= 0:
            if current + 1 > limit or previous <= 0:
                return 0, max(0.001, start + window - now)
            ready = start + window * (1.0 - (limit - current - 1) / previous)
            return 0, max(0.001, ready - now)
        self._record(key, start, previous, current + granted, window, now)
        return granted, 0.0

    async def pace(self, key: str, rate: float, burst: int) -> float:
        now = self._clock()
        entry = self._buckets.data.get(key)
        tokens = float(burst) if entry is None else min(burst, entry[0] + (now - entry[1]) * rate)
        if tokens < 1.0:
            return (1.0 - tokens) / rate
        tokens -= 1.0
        self._buckets.data[key] = (tokens, now, now + (burst - tokens) / rate)
        self._buckets.maybe_prune(lambda v: v[2] <= now)  # full again: same as unknown
        return 0.0

    # -- failures and bans ---------------------------------------------------------------

    async def ban_remaining(self, key: str) -> float:
        entry = self._bans.data.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry[0] - self._clock())

    async def record_failure(self, key: str, policy: BanPolicy) -> float | None:
        now = self._clock()
        fail_key = "fail:" + key
        start, previous, current, estimate = self._estimate(fail_key, policy.window, now)
        self._record(fail_key, start, previous, current + 1, policy.window, now)
        if estimate + 1 < policy.threshold:
            return None
        entry = self._bans.data.get(key)
        if entry is not None and entry[0] > now:
            return None  # already banned: one ban, logged once
        level, last = (entry[1], entry[2]) if entry is not None else (0.0, 0.0)
        if now - last > policy.max_seconds * 2:
            level = 0.0  # good behaviour for long enough forgets past bans
        duration = min(policy.base_seconds * (2**level), policy.max_seconds)
        self._bans.data[key] = (now + duration, level + 1, now)
        self._bans.maybe_prune(lambda v: v[0] < now and now - v[2] > policy.max_seconds * 2)
        self._windows.data.pop(fail_key, None)
        return float(duration)

    async def unban(self, key: str) -> bool:
        entry = self._bans.data.get(key)
        if entry is None or entry[0] <= self._clock():
            return False
        self._bans.data[key] = (0.0, entry[1], entry[2])
        return True

    async def ban(self, key: str, seconds: float) -> None:
        now = self._clock()
        entry = self._bans.data.get(key)
        level, last = (entry[1], entry[2]) if entry is not None else (0.0, now)
        until = max(now + seconds, entry[0] if entry is not None else 0.0)
        self._bans.data[key] = (until, level, last)

    async def bans(self, limit: int = 1000) -> list[tuple[str, float]]:
        now = self._clock()
        active = [(key, entry[0] - now) for key, entry in self._bans.data.items() if entry[0] > now]
        active.sort(key=lambda item: -item[1])
        return active[:limit]

    def ban_count(self) -> int:
        """Bans in force now (synchronous: read by the metrics collector)."""
        now = self._clock()
        return sum(1 for entry in self._bans.data.values() if entry[0] > now)

    # -- nonces ----------------------------------------------------------------------------

    async def add_nonce(self, key: str, ttl: float) -> bool:
        now = self._clock()
        order, nonces = self._nonce_order, self._nonces
        while order and order[0][0] <= now:  # entries expire with the window
            _, old = order.popleft()
            if nonces.get(old, now + 1) <= now:
                del nonces[old]
        if nonces.get(key, now) > now:  # seen, and not expired (entries recorded before
            return False  # it with a longer life keep it in the dict past its expiry)
        expires = now + ttl
        nonces[key] = expires
        order.append((expires, key))
        return True

    # -- revocations and events ---------------------------------------------------------

    async def revoke(self, kind: RevocationKind, value: str, ttl: float) -> None:
        now = self._clock()
        self._revoked[f"{kind}:{value}"] = now + ttl
        if len(self._revoked) >= self._next_revoked_prune:
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}
            self._next_revoked_prune = max(_PRUNE_FLOOR, 2 * len(self._revoked))
        await self.publish(CHANNEL_REVOKE, f"{kind}:{value}".encode())

    async def is_revoked(self, subject: str, token_id: str | None) -> bool:
        if not self._revoked:
            return False
        now = self._clock()
        if self._revoked.get("sub:" + subject, 0.0) > now:
            return True
        return token_id is not None and self._revoked.get("jti:" + token_id, 0.0) > now

    async def publish(self, channel: str, payload: bytes) -> None:
        for handler in self._handlers:
            handler(channel, payload)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)
