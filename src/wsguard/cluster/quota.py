"""Cluster-wide per-subject message budget, taken from the store in batches.

A round trip per message would cap a node at the store's latency. Instead a
node takes a *batch* of the subject's budget at once (one atomic ``take``) and
spends it locally; tokens not spent within ``hold`` seconds are dropped, so a
node can never sit on budget the subject's other nodes need for long. Unused
tokens count as spent: the error is on the strict side.

The next batch is asked for in the background when half of the current one is
spent, so a busy connection does not stop reading while its node waits for the
store; but only for a subject that ran through its previous batch before that
batch's hold ended. A subject that spends slowly or in bursts is not prefetched
for (unused tokens count as spent, and would rate-limit it below its budget): it
waits for a round trip when its batch runs out. A busy subject that stops wastes
at most the one batch fetched ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from wsguard.stores.base import Store, StoreUnavailable

_PRUNE_FLOOR = 1024

logger = logging.getLogger("wsguard.cluster")


def auto_batch(limit: int) -> int:
    """Default batch: 1/20 of the budget, between 1 and 50 messages."""
    return max(1, min(50, limit // 20))


class SubjectQuota:
    """Hands out one message at a time from batches of a subject's cluster budget."""

    __slots__ = (
        "_balance",
        "_closed",
        "_inflight",
        "_next_prune",
        "batch",
        "clock",
        "hold",
        "limit",
        "low_water",
        "store",
        "window",
    )

    def __init__(
        self,
        store: Store,
        limit: int,
        window: float,
        batch: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limit = limit
        self.window = window
        self.batch = batch or auto_batch(limit)
        self.hold = window / 10
        self.clock = clock
        # prefetch when this many tokens are left (never with batches of one: every
        # message would then cost a background round trip for nothing)
        self.low_water = self.batch // 2 if self.batch > 1 else -1
        # subject -> (tokens, good until, busy: ran through its last batch in time)
        self._balance: dict[str, tuple[int, float, bool]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}  # background takes by subject
        self._next_prune = _PRUNE_FLOOR
        self._closed = False

    def take_local(self, subject: str, now: float) -> bool:
        """Spend one token already held for *subject*; False when a refill is needed."""
        entry = self._balance.get(subject)
        if entry is None or entry[0] <= 0 or entry[1] <= now:
            return False
        left = entry[0] - 1
        self._balance[subject] = (left, entry[1], entry[2])
        if (
            left == self.low_water
            and entry[2]  # busy: it will use the next batch before the hold ends
            and subject not in self._inflight
            and not self._closed
        ):
            self._inflight[subject] = asyncio.get_running_loop().create_task(
                self._prefetch(subject)
            )
        return True

    async def refill(self, subject: str, now: float) -> float:
        """Take a batch from the store and spend one: 0.0, or seconds to wait."""
        pending = self._inflight.get(subject)
        if pending is not None:  # a batch is on its way: wait for it, not for another
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we were cancelled, not just the prefetch (at close)
            now = self.clock()
            if self.take_local(subject, now):
                return 0.0
        entry = self._balance.get(subject)
        busy = entry is not None and entry[1] > now  # the last batch ran out within its hold
        granted, wait = await self.store.take(
            "msg:sub:" + subject, self.batch, self.limit, self.window
        )
        if granted <= 0:
            return max(wait, 0.001)
        self._credit(subject, granted - 1, now, busy)
        return 0.0

    async def _prefetch(self, subject: str) -> None:
        try:
            granted, _ = await self.store.take(
                "msg:sub:" + subject, self.batch, self.limit, self.window
            )
        except StoreUnavailable:
            return  # the next refill asks again and answers the client
        except Exception:  # never let a background take die unseen
            logger.exception("prefetching the message budget failed")
            return
        finally:
            self._inflight.pop(subject, None)
        if granted > 0:
            self._credit(subject, granted, self.clock(), True)

    def _credit(self, subject: str, tokens: int, now: float, busy: bool) -> None:
        entry = self._balance.get(subject)
        held = entry[0] if entry is not None and entry[1] > now else 0
        self._balance[subject] = (held + tokens, now + self.hold, busy)
        if len(self._balance) >= self._next_prune:
            self._balance = {k: v for k, v in self._balance.items() if v[1] > now}
            self._next_prune = max(_PRUNE_FLOOR, 2 * len(self._balance))

    async def close(self) -> None:
        """Cancel background takes (at shutdown, before the store closes)."""
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
