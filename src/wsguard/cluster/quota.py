"""Cluster-wide per-subject message budget, taken from the store in batches.

A round trip per message would cap a node at the store's latency. Instead a
node takes a *batch* of the subject's budget at once (one atomic ``take``) and
spends it locally; tokens not spent within ``hold`` seconds are dropped, so a
node can never sit on budget the subject's other nodes need for long. Unused
tokens count as spent: the error is on the strict side.
"""

from __future__ import annotations

from wsguard.stores.base import Store

_PRUNE_FLOOR = 1024


def auto_batch(limit: int) -> int:
    """Default batch: 1/20 of the budget, between 1 and 50 messages."""
    return max(1, min(50, limit // 20))


class SubjectQuota:
    """Hands out one message at a time from batches of a subject's cluster budget."""

    __slots__ = ("_balance", "_next_prune", "batch", "hold", "limit", "store", "window")

    def __init__(self, store: Store, limit: int, window: float, batch: int = 0) -> None:
        self.store = store
        self.limit = limit
        self.window = window
        self.batch = batch or auto_batch(limit)
        self.hold = window / 10
        self._balance: dict[str, tuple[int, float]] = {}  # subject -> (tokens, good until)
        self._next_prune = _PRUNE_FLOOR

    def take_local(self, subject: str, now: float) -> bool:
        """Spend one token already held for *subject*; False when a refill is needed."""
        entry = self._balance.get(subject)
        if entry is None or entry[0] <= 0 or entry[1] <= now:
            return False
        self._balance[subject] = (entry[0] - 1, entry[1])
        return True

    async def refill(self, subject: str, now: float) -> float:
        """Take a batch from the store and spend one: 0.0, or seconds to wait."""
        granted, wait = await self.store.take(
            "msg:sub:" + subject, self.batch, self.limit, self.window
        )
        if granted <= 0:
            return max(wait, 0.001)
        entry = self._balance.get(subject)
        held = entry[0] if entry is not None and entry[1] > now else 0
        self._balance[subject] = (held + granted - 1, now + self.hold)
        if len(self._balance) >= self._next_prune:
            self._balance = {k: v for k, v in self._balance.items() if v[1] > now}
            self._next_prune = max(_PRUNE_FLOOR, 2 * len(self._balance))
        return 0.0
