"""The per-subject cluster budget is spent from batches fetched ahead of need.

A real store (the memory store has the same ``take`` semantics as Redis, see
tests/stores/test_store_contract.py) stands behind the quota; what these tests pin down is
the quota's own bookkeeping: a busy subject never waits for a round trip while its
budget lasts, never gets more than the budget, and one batch in flight serves
every connection of the subject that runs dry.
"""

from __future__ import annotations

import asyncio

from wsguard.cluster.quota import SubjectQuota, auto_batch
from wsguard.stores.memory import MemoryStore


class CountingStore(MemoryStore):
    """The memory store, counting the takes that reach it."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.takes = 0
        self.granted = 0

    async def take(self, key: str, want: int, limit: int, window: float) -> tuple[int, float]:
        self.takes += 1
        await asyncio.sleep(0)  # a round trip: other work runs meanwhile
        granted, wait = await super().take(key, want, limit, window)
        self.granted += granted
        return granted, wait


async def spend(quota: SubjectQuota, subject: str, messages: int) -> tuple[int, int, int]:
    """Spend like a connection would: (delivered, refused, times it waited for the store)."""
    delivered = refused = waited = 0
    for _ in range(messages):
        if quota.take_local(subject, quota.clock()):
            delivered += 1
        else:
            waited += 1
            if await quota.refill(subject, quota.clock()) == 0.0:
                delivered += 1
            else:
                refused += 1
        await asyncio.sleep(0)  # the connection reads its next frame
    return delivered, refused, waited


def test_batches_are_fetched_before_the_balance_runs_out() -> None:
    async def scenario() -> None:
        store = CountingStore()
        quota = SubjectQuota(store, limit=10_000, window=60.0, batch=10)
        delivered, refused, waited = await spend(quota, "alice", 200)
        assert (delivered, refused) == (200, 0)
        # the first message, and the end of the first batch (the subject proves busy);
        # from then on the next batch is always there in time
        assert waited == 2
        assert store.takes <= 200 // 10 + 2  # still one take per batch
        await quota.close()

    asyncio.run(scenario())


def test_the_budget_is_never_exceeded_with_prefetching() -> None:
    async def scenario() -> None:
        store = CountingStore()
        quota = SubjectQuota(store, limit=95, window=60.0, batch=10)
        delivered, refused, _ = await spend(quota, "bob", 300)
        assert delivered <= 95
        assert delivered >= 95 - 10  # at most one batch lost to rounding
        assert refused == 300 - delivered
        await quota.close()

    asyncio.run(scenario())


def test_connections_running_dry_together_share_the_batch_in_flight() -> None:
    async def scenario() -> None:
        store = CountingStore()
        quota = SubjectQuota(store, limit=10_000, window=60.0, batch=20)
        results = await asyncio.gather(*(spend(quota, "carol", 50) for _ in range(4)))
        assert sum(r[0] for r in results) == 200
        assert store.takes <= 200 // 20 + 4  # not one take per waiting connection
        await quota.close()

    asyncio.run(scenario())


def test_batches_of_one_are_not_prefetched() -> None:
    async def scenario() -> None:
        store = CountingStore()
        quota = SubjectQuota(store, limit=5, window=60.0, batch=1)
        delivered, refused, waited = await spend(quota, "dave", 8)
        assert (delivered, refused, waited) == (5, 3, 8)
        assert store.takes == 8
        await quota.close()

    asyncio.run(scenario())


def test_auto_batch_is_a_twentieth_of_the_budget_within_bounds() -> None:
    assert auto_batch(6000) == 50
    assert auto_batch(400) == 20
    assert auto_batch(10) == 1


def test_a_bursty_subject_is_not_charged_for_batches_it_never_uses() -> None:
    """Bursts of 16 messages 6.1 s apart (longer than the 6 s hold): nothing prefetched."""

    async def scenario() -> None:
        store = CountingStore()
        now = [1000.0]
        quota = SubjectQuota(store, limit=600, window=60.0, clock=lambda: now[0])
        assert (quota.batch, quota.hold) == (30, 6.0)
        for _ in range(10):
            delivered, refused, _ = await spend(quota, "erin", 16)
            assert (delivered, refused) == (16, 0)
            await asyncio.sleep(0)  # a prefetch, had one started, completes here
            now[0] += 6.1
        assert store.granted == 10 * 30  # one batch per burst, none fetched ahead
        await quota.close()

    asyncio.run(scenario())
