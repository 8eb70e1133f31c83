"""The store contract: ``memory://`` and Redis give the same answers.

One table of contract cases (:data:`CONTRACT`) runs against every store: memory, one
Redis server (``redis://``), a Redis Cluster of 3 primaries and 3 replicas
(``redis+cluster://``) and a primary with a replica behind 3 Sentinels
(``redis+sentinel://``), the last two real topologies from :mod:`support.redis_topologies`,
and so does the rule that a shorter ban never shortens a longer one. Then what only a
shared store has: key prefixes that isolate clusters, a ban index that counts the bans in
force, leases that a dead node stops renewing, atomicity under concurrent load from eight store
instances (and a naive two-step acquire that over-grants under the same load,
which shows the assertions would catch a read-modify-write race), and a Redis
outage with its recovery.

Nothing waits on a fixed sleep and nothing asserts on elapsed time: every
asynchronous effect (a TTL running out, a pub/sub event, Redis coming back) is
polled for with a deadline. The async scenarios run on one :class:`asyncio.Runner`
per test, so a started store's background tasks live on the loop that runs them.

On Python 3.11, ``asyncio.wait_for`` inside redis-py can lose a cancellation that lands
as a Redis round trip completes (bpo-42130); ``RedisStore.close()`` used to hang for good
when that happened to its lease renewal loop. ``test_close_finishes_during_a_renewal``
keeps it fixed, and every store here is closed under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis

from support.redis_process import RedisProcess, user_without_subscribe
from wsguard.config.model import ClusterConfig, StoreFailureConfig
from wsguard.stores import BanPolicy, Store, StoreUnavailable, open_store
from wsguard.stores.base import CHANNEL_BROADCAST, CHANNEL_REVOKE
from wsguard.stores.memory import MemoryStore
from wsguard.stores.redis_store import RedisStore

T = TypeVar("T")

Case = Callable[[Store], Coroutine[Any, Any, None]]

#: The contract store's cluster settings: short leases, a short retry after errors.
CONTRACT_CLUSTER = ClusterConfig(
    key_prefix="contract:", lease_ttl_seconds=1.0, timeout_seconds=2.0, retry_seconds=0.1
)

#: Windows long enough that no test gets near a window boundary that matters.
LONG = 3600.0


# -- helpers ------------------------------------------------------------------------


class OffsetClock:
    """The memory store's clock: monotonic time, plus what a test lets elapse at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def elapse(store: Store, bucket: str, seconds: float) -> None:
    """Let *seconds* pass for the token bucket *bucket* without waiting for them: the
    memory store's clock moves on; on Redis (whose clock is the server's ``TIME``) the
    bucket's own timestamp moves back by as much, which is the same to the script."""
    if isinstance(store, MemoryStore):
        clock = store._clock
        assert isinstance(clock, OffsetClock)
        clock.offset += seconds
        return
    assert isinstance(store, RedisStore)
    name = store._key(bucket, ":b")
    assert await store.client.exists(name) == 1, "no bucket to move back in time"
    await store.client.hincrby(name, "t", -round(seconds * 1000))


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float = 5.0
) -> None:
    """Poll *check* (sync or async) until it is true; fail naming *what* after *within* s."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within}s")
        await asyncio.sleep(0.02)


async def equals(value: Awaitable[T], expected: T) -> bool:
    return await value == expected


async def close_store(store: Store) -> None:
    """``store.close()``, which must finish (see test_close_finishes_during_a_renewal)."""
    await asyncio.wait_for(store.close(), 10)


@contextlib.asynccontextmanager
async def redis_stores(uri: str, *configs: ClusterConfig) -> AsyncIterator[list[RedisStore]]:
    """Started RedisStores on *uri*, one per config, closed on exit."""
    stores = [RedisStore(uri, config) for config in configs]
    try:
        for store in stores:
            await store.start()
        yield stores
    finally:
        for store in stores:
            await close_store(store)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for the whole test: fixtures and scenarios share it."""
    with asyncio.Runner() as loop_runner:
        yield loop_runner


#: The Redis topologies the contract runs on, and the fixture that gives each one's URI.
TOPOLOGIES = {
    "redis": "redis_uri",
    "cluster": "redis_cluster_uri",
    "sentinel": "redis_sentinel_uri",
}


@pytest.fixture(params=["memory", *TOPOLOGIES])
def store(request: pytest.FixtureRequest, runner: asyncio.Runner) -> Iterator[Store]:
    """An opened and started store of each kind, closed after the test."""
    opened: Store
    if request.param == "memory":
        opened = MemoryStore("memory://", clock=OffsetClock())
    else:
        uri = request.getfixturevalue(TOPOLOGIES[request.param])
        opened = open_store(uri, CONTRACT_CLUSTER)
    runner.run(opened.start())
    yield opened
    errors = opened.error_counts()
    runner.run(close_store(opened))
    # every answer came from the store itself: no check fell back to this node's state
    # (a command a Redis Cluster refuses, e.g. across hash slots, would show up here)
    assert errors == {}, f"failed store operations: {errors}"


# -- the contract: one table, both stores ---------------------------------------------


async def slots_limit_release_count(store: Store) -> None:
    key = "conn:ip:203.0.113.7"
    assert await store.count(key) == 0
    assert await store.acquire(key, 2, "h1") is True
    assert await store.acquire(key, 2, "h2") is True
    assert await store.acquire(key, 2, "h3") is False  # full
    assert await store.count(key) == 2
    await store.release(key, "h1")
    assert await store.count(key) == 1
    assert await store.acquire(key, 2, "h3") is True  # the freed slot is taken again
    assert await store.acquire(key, 2, "h4") is False
    await store.release(key, "h1")  # a second release of the same slot is harmless:
    await store.release(key, "never-held")  # it frees nobody else's slot
    assert await store.count(key) == 2
    assert await store.acquire(key, 2, "h4") is False
    await store.release(key, "h2")
    await store.release(key, "h3")
    assert await store.count(key) == 0


async def slots_holders_and_keys(store: Store) -> None:
    alice, bob = "conn:sub:alice", "conn:sub:bob"
    assert await store.acquire(alice, 1, "n1") is True
    assert await store.acquire(alice, 1, "n1") is True  # the same holder keeps its one slot
    assert await store.count(alice) == 1
    assert await store.acquire(alice, 1, "n2") is False  # another holder is refused
    assert await store.acquire(bob, 1, "n2") is True  # another key has slots of its own
    await store.release(alice, "n2")  # n2 holds nothing under alice: nothing is freed
    assert await store.count(alice) == 1
    assert await store.count(bob) == 1
    await store.release(alice, "n1")
    assert await store.acquire(alice, 1, "n2") is True
    assert await store.count(alice) == 1


async def slots_grow_from_one_holder_and_shrink_back(store: Store) -> None:
    key = "conn:addr:192.0.2.9"
    assert await store.acquire(key, 0, "h1") is False  # no slot at all: nothing is held
    assert await store.count(key) == 0
    assert await store.acquire(key, 3, "h1") is True
    assert await store.acquire(key, 3, "h1") is True  # one holder, asked twice: one slot
    assert await store.count(key) == 1
    assert await store.acquire(key, 3, "h2") is True
    assert await store.acquire(key, 3, "h2") is True  # among several: still one slot
    assert await store.acquire(key, 3, "h3") is True
    assert await store.acquire(key, 3, "h4") is False
    await store.release(key, "h1")
    await store.release(key, "h3")
    assert await store.count(key) == 1  # h2 alone again
    await store.release(key, "h1")  # released twice, or never held: frees nobody
    await store.release(key, "h9")
    assert await store.count(key) == 1
    assert await store.acquire(key, 1, "h5") is False  # h2 still holds the only slot
    assert await store.acquire(key, 1, "h2") is True
    await store.release(key, "h2")
    assert await store.count(key) == 0
    assert await store.acquire(key, 1, "h5") is True


async def hit_sliding_window(store: Store) -> None:
    key, limit = "hs:198.51.100.1", 3
    for _ in range(limit):
        assert await store.hit(key, limit, LONG) == 0.0
    for _ in range(5):
        wait = await store.hit(key, limit, LONG)
        assert 0.0 < wait <= LONG
    # the refused hits were not counted: a probe with room for 100 on the same key
    # finds exactly the 3 admitted ones (8 if refusals counted)
    granted, _ = await store.take(key, 100, 100, LONG)
    assert granted == 100 - limit


async def hit_window_slides(store: Store) -> None:
    key, limit, window = "hs:198.51.100.2", 2, 0.5
    assert await store.hit(key, limit, window) == 0.0
    assert await store.hit(key, limit, window) == 0.0
    wait = await store.hit(key, limit, window)
    assert 0.0 < wait <= window
    await eventually(lambda: equals(store.hit(key, limit, window), 0.0), "the window to slide")


async def pace_burst_then_one_per_period(store: Store) -> None:
    """The handshake allowance's token bucket: 30 a minute (one token per 2 s), 3 at once."""
    key, rate, burst, period = "hs:198.51.100.3", 0.5, 3, 2.0
    for _ in range(burst):  # the burst passes at once
        assert await store.pace(key, rate, burst) == 0.0
    wait = await store.pace(key, rate, burst)
    assert 1.0 < wait <= period  # refused: the seconds until one token is back
    again = await store.pace(key, rate, burst)
    assert 0.0 < again <= wait  # a refusal takes nothing
    await elapse(store, key, period)  # one period: one token back, only one
    assert await store.pace(key, rate, burst) == 0.0
    assert await store.pace(key, rate, burst) > 0.0
    await elapse(store, key, 60.0)  # a long quiet spell refills to the burst, no further
    for _ in range(burst):
        assert await store.pace(key, rate, burst) == 0.0
    assert await store.pace(key, rate, burst) > 0.0
    assert await store.pace("hs:198.51.100.4", rate, burst) == 0.0  # per key


async def take_partial_then_empty(store: Store) -> None:
    key, limit = "subj:alice", 5
    assert await store.take(key, 3, limit, LONG) == (3, 0.0)
    assert await store.take(key, 4, limit, LONG) == (2, 0.0)  # partial: what is left
    granted, wait = await store.take(key, 1, limit, LONG)
    assert granted == 0
    assert 0.0 < wait <= LONG
    assert await store.take("subj:bob", 9, limit, LONG) == (limit, 0.0)  # capped at the limit


BANS = BanPolicy(threshold=3, window=LONG, base_seconds=10.0, max_seconds=25.0)


async def bans_grow_and_unban(store: Store) -> None:
    key = "addr:198.51.100.9"
    assert await store.ban_remaining(key) == 0.0
    assert await store.unban(key) is False
    for length in (10.0, 20.0, 25.0, 25.0):  # base, doubled, then capped at max
        for _ in range(BANS.threshold - 1):
            assert await store.record_failure(key, BANS) is None
        assert await store.ban_remaining(key) == 0.0
        assert await store.record_failure(key, BANS) == length
        assert 0.0 < await store.ban_remaining(key) <= length
        assert await store.unban(key) is True
        assert await store.unban(key) is False
        assert await store.ban_remaining(key) == 0.0
    assert await store.ban_remaining("addr:198.51.100.10") == 0.0  # other keys untouched


async def bans_one_at_a_time(store: Store) -> None:
    key = "addr:198.51.100.11"
    for _ in range(BANS.threshold - 1):
        assert await store.record_failure(key, BANS) is None
    assert await store.record_failure(key, BANS) == BANS.base_seconds
    for _ in range(3 * BANS.threshold):  # failures while banned start no second ban
        assert await store.record_failure(key, BANS) is None
    assert 0.0 < await store.ban_remaining(key) <= BANS.base_seconds


async def bans_expire(store: Store) -> None:
    key = "addr:198.51.100.12"
    policy = BanPolicy(threshold=2, window=LONG, base_seconds=0.5, max_seconds=1.0)
    assert await store.record_failure(key, policy) is None
    assert await store.record_failure(key, policy) == 0.5
    assert await store.ban_remaining(key) > 0.0
    await eventually(lambda: equals(store.ban_remaining(key), 0.0), "the ban to run out")
    assert await store.unban(key) is False  # nothing left to lift


async def nonces_replay(store: Store) -> None:
    assert await store.add_nonce("nonce:alice:k1:1", 60) is True
    assert await store.add_nonce("nonce:alice:k1:1", 60) is False  # a replay
    assert await store.add_nonce("nonce:alice:k1:2", 60) is True  # distinct keys: independent
    assert await store.add_nonce("nonce:bob:k1:1", 60) is True
    assert await store.add_nonce("nonce:alice:k1:1", 60) is False
    assert await store.add_nonce("nonce:alice:k1:2", 60) is False


async def nonces_expire(store: Store) -> None:
    key = "nonce:alice:k1:short"
    assert await store.add_nonce(key, 0.5) is True
    assert await store.add_nonce(key, 0.5) is False
    await eventually(lambda: store.add_nonce(key, 0.5), "the nonce to expire")
    assert await store.add_nonce(key, 0.5) is False  # recorded afresh


async def nonces_expire_each_at_its_own_time(store: Store) -> None:
    """A nonce is forgotten at its own expiry, whatever was recorded before it with a
    longer life (another subject's nonce never changes alice's answer)."""
    assert await store.add_nonce("nonce:bob:k1:long", 60) is True
    key = "nonce:alice:k1:brief"
    assert await store.add_nonce(key, 0.5) is True
    await eventually(lambda: store.add_nonce(key, 0.5), "alice's nonce to expire before bob's")


async def nonces_live_until_the_message_window_ends(store: Store) -> None:
    """A message's nonce is kept until its timestamp + window on the store's clock (not a
    fixed time after it arrived), and the same clock judges the window: so nodes with
    skewed clocks agree on what is a replay."""
    now = time.time()
    assert await store.record_nonce("nonce:alice:k1:w", now, 30) == "fresh"
    assert await store.record_nonce("nonce:alice:k1:w", now, 30) == "replayed"
    assert await store.record_nonce("nonce:alice:k1:old", now - 31, 30) == "stale"
    assert await store.record_nonce("nonce:alice:k1:new", now + 31, 30) == "stale"
    # stamped 29.5 s ago in a 30 s window: remembered for the half second left, then the
    # message is stale everywhere (never fresh again)
    key, stamped = "nonce:alice:k1:late", time.time() - 29.5
    assert await store.record_nonce(key, stamped, 30) == "fresh"
    assert await store.record_nonce(key, stamped, 30) == "replayed"
    await eventually(
        lambda: equals(store.record_nonce(key, stamped, 30), "stale"), "the window to end"
    )


async def revoke_token_id(store: Store) -> None:
    await store.revoke("jti", "tok-1", 60)
    assert await store.is_revoked("alice", "tok-1") is True
    assert await store.is_revoked("bob", "tok-1") is True  # whoever presents it
    assert await store.is_revoked("alice", "tok-2") is False
    assert await store.is_revoked("alice", None) is False  # the subject is not revoked


async def revoke_subject(store: Store) -> None:
    await store.revoke("sub", "mallory", 60)
    assert await store.is_revoked("mallory", None) is True
    assert await store.is_revoked("mallory", "tok-1") is True  # any token of the subject
    assert await store.is_revoked("mallory", "tok-2") is True
    assert await store.is_revoked("alice", None) is False
    assert await store.is_revoked("alice", "tok-1") is False


async def revoked_among(store: Store) -> None:
    await store.revoke("jti", "tok-1", 60)
    await store.revoke("sub", "mallory", 60)
    pairs: list[tuple[str, str | None]] = [
        ("alice", "tok-1"),
        ("alice", "tok-2"),
        ("mallory", None),
        ("mallory", "tok-9"),
        ("bob", None),
    ]
    assert await store.revoked_among(pairs) == [True, False, True, True, False]
    assert await store.revoked_among([]) == []


async def revocations_expire(store: Store) -> None:
    await store.revoke("jti", "tok-short", 0.5)
    await store.revoke("sub", "eve", 0.5)
    await store.revoke("sub", "mallory", 60)
    assert await store.is_revoked("alice", "tok-short") is True
    assert await store.is_revoked("eve", None) is True
    await eventually(lambda: equals(store.is_revoked("alice", "tok-short"), False), "jti to expire")
    await eventually(lambda: equals(store.is_revoked("eve", None), False), "subject to expire")
    assert await store.is_revoked("mallory", None) is True  # the long one stays


async def publish_subscribe(store: Store) -> None:
    got: list[tuple[str, bytes]] = []
    store.subscribe(lambda channel, payload: got.append((channel, payload)))
    await store.publish(CHANNEL_BROADCAST, b"hello")
    await eventually(lambda: (CHANNEL_BROADCAST, b"hello") in got, "the broadcast event")
    await store.revoke("sub", "mallory", 60)  # a revocation is announced to every node
    await eventually(lambda: (CHANNEL_REVOKE, b"sub:mallory") in got, "the revoke event")
    assert got.count((CHANNEL_BROADCAST, b"hello")) == 1


async def local_is_per_node(store: Store) -> None:
    local = store.local
    assert local.shared is False
    assert local.local is local
    assert await local.acquire("conn:all", 1, "h1") is True
    assert await local.acquire("conn:all", 1, "h2") is False
    if store.shared:
        assert local is not store
        assert await store.count("conn:all") == 0  # this node's slots never reach the others
    else:
        assert local is store


CONTRACT: list[Case] = [
    slots_limit_release_count,
    slots_holders_and_keys,
    slots_grow_from_one_holder_and_shrink_back,
    hit_sliding_window,
    hit_window_slides,
    pace_burst_then_one_per_period,
    take_partial_then_empty,
    bans_grow_and_unban,
    bans_one_at_a_time,
    bans_expire,
    nonces_replay,
    nonces_expire,
    nonces_expire_each_at_its_own_time,
    nonces_live_until_the_message_window_ends,
    revoke_token_id,
    revoke_subject,
    revoked_among,
    revocations_expire,
    publish_subscribe,
    local_is_per_node,
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.__name__) for case in CONTRACT])
def test_contract(case: Case, store: Store, runner: asyncio.Runner) -> None:
    runner.run(case(store))


def test_shared_flag(store: Store) -> None:
    assert store.shared is (store.uri != "memory://")


def test_a_shorter_ban_never_shortens_a_longer_one(store: Store, runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        await store.ban("addr:10.0.0.1", 60)
        await store.ban("addr:10.0.0.1", 5)
        assert await store.ban_remaining("addr:10.0.0.1") > 5
        listed = dict(await store.bans())
        assert listed["addr:10.0.0.1"] > 5
        await store.ban("addr:10.0.0.2", 5)  # a longer one does extend a shorter one
        await store.ban("addr:10.0.0.2", 60)
        assert await store.ban_remaining("addr:10.0.0.2") > 5

    runner.run(scenario())


# -- Redis only: prefixes, leases ---------------------------------------------------


def test_redis_ban_index_counts_bans_in_force_and_drops_expired_ones(
    runner: asyncio.Runner, redis_uri: str
) -> None:
    index_client = redis.Redis.from_url(redis_uri, decode_responses=True)

    async def scenario() -> None:
        async with redis_stores(redis_uri, CONTRACT_CLUSTER) as (store,):
            index = store._key("bans")
            await store.ban("addr:10.0.0.1", 0.2)
            await store.ban("addr:10.0.0.2", 0.2)
            await store.ban("addr:10.0.0.3", 60)
            assert await store.active_ban_count() == 3
            assert index_client.zcard(index) == 3

            deadline = time.monotonic() + 5
            while await store.active_ban_count() != 1:
                assert time.monotonic() < deadline, "the short bans did not expire"
                await asyncio.sleep(0.02)
            assert await store.ban_remaining("addr:10.0.0.1") == 0
            # the next write trims the expired members from the index
            await store.ban("addr:10.0.0.4", 60)
            members = {str(m) for m in index_client.zrange(index, 0, -1)}
            assert members == {"addr:10.0.0.3", "addr:10.0.0.4"}
            assert await store.active_ban_count() == 2

    try:
        runner.run(scenario())
    finally:
        index_client.close()


def test_key_prefix_isolates_stores(runner: asyncio.Runner, redis_uri: str) -> None:
    tenant_a = ClusterConfig(key_prefix="tenant-a:")
    tenant_b = ClusterConfig(key_prefix="tenant-b:")
    policy = BanPolicy(threshold=2, window=LONG, base_seconds=30.0, max_seconds=60.0)

    async def scenario() -> None:
        async with redis_stores(redis_uri, tenant_a, tenant_a, tenant_b) as (a, a2, b):
            # slots: b does not see a's; a second store with a's prefix does
            assert await a.acquire("conn:ip:x", 1, "a-holder") is True
            assert await b.acquire("conn:ip:x", 1, "b-holder") is True
            assert await a2.acquire("conn:ip:x", 1, "a2-holder") is False
            assert await a.count("conn:ip:x") == 1
            assert await b.count("conn:ip:x") == 1

            # bans
            assert await a.record_failure("addr:x", policy) is None
            assert await a.record_failure("addr:x", policy) == 30.0
            assert await a2.ban_remaining("addr:x") > 0.0
            assert await b.ban_remaining("addr:x") == 0.0
            assert await b.record_failure("addr:x", policy) is None  # b's own count starts at 1

            # nonces, revocations, rate windows
            assert await a.add_nonce("nonce:1", 60) is True
            assert await a2.add_nonce("nonce:1", 60) is False
            assert await b.add_nonce("nonce:1", 60) is True
            await a.revoke("sub", "mallory", 60)
            assert await a2.is_revoked("mallory", None) is True
            assert await b.is_revoked("mallory", None) is False
            assert await a.take("subj:x", 5, 5, LONG) == (5, 0.0)
            assert (await a2.take("subj:x", 1, 5, LONG))[0] == 0
            assert await b.take("subj:x", 5, 5, LONG) == (5, 0.0)

            # events: published in this order, so a leak would arrive before the marker
            got_a2: list[tuple[str, bytes]] = []
            got_b: list[tuple[str, bytes]] = []
            a2.subscribe(lambda channel, payload: got_a2.append((channel, payload)))
            b.subscribe(lambda channel, payload: got_b.append((channel, payload)))
            await a.publish(CHANNEL_BROADCAST, b"for-a")
            await b.publish(CHANNEL_BROADCAST, b"for-b")
            await a.publish(CHANNEL_BROADCAST, b"end-a")
            await eventually(lambda: (CHANNEL_BROADCAST, b"end-a") in got_a2, "a's events")
            await eventually(lambda: (CHANNEL_BROADCAST, b"for-b") in got_b, "b's events")
            assert got_a2 == [(CHANNEL_BROADCAST, b"for-a"), (CHANNEL_BROADCAST, b"end-a")]
            assert got_b == [(CHANNEL_BROADCAST, b"for-b")]
            assert (CHANNEL_REVOKE, b"sub:mallory") not in got_b

    runner.run(scenario())


def test_lease_of_a_dead_store_lapses(runner: asyncio.Runner, redis_uri: str) -> None:
    """A dead node's slot frees itself; a live node's renewed slot under the same key stays."""
    config = ClusterConfig(key_prefix="lease:", lease_ttl_seconds=1.0, timeout_seconds=2.0)
    key = "conn:sub:alice"

    async def scenario() -> None:
        async with redis_stores(redis_uri, config) as (live,):
            # never started, so nothing renews its leases: a node that died after acquiring
            dead = RedisStore(redis_uri, config)
            assert await dead.acquire(key, 2, "dead-node") is True
            await dead.client.aclose()  # gone without releasing
            # the live node's lease keeps the key itself alive: only the dead holder lapses
            assert await live.acquire(key, 2, "live-1") is True

            assert await live.acquire(key, 2, "live-2") is False  # still leased by the dead
            await eventually(lambda: live.acquire(key, 2, "live-2"), "the dead lease to lapse")
            # more than a lease TTL has passed since live-1 was taken: renewal kept it
            assert await live.count(key) == 2
            assert await live.acquire(key, 2, "other-node") is False

    runner.run(scenario())


def test_a_lapsed_lease_is_renewed_only_within_its_limit(
    runner: asyncio.Runner, redis_uri: str
) -> None:
    """A node paused (or cut off) longer than the lease TTL finds its lease gone and the
    slot taken by another node: renewing it must not push the key over its limit; the
    node is told which of its connections lost their slot (they are then closed)."""
    config = ClusterConfig(key_prefix="lapse:", lease_ttl_seconds=1.0, timeout_seconds=2.0)
    key = "conn:sub:alice"

    async def scenario() -> None:
        async with redis_stores(redis_uri, config) as (other,):
            # not started: its renewals run only when the test says (no renewal loop)
            paused = RedisStore(redis_uri, config)
            lost: list[set[str]] = []
            paused.on_lease_lost(lost.append)
            assert await paused.acquire(key, 1, "paused-1") is True
            # the pause: Redis forgets the lease (what a TTL longer than the pause does)
            await paused.client.zrem(f"lapse:{{{key}}}", "paused-1")
            assert await other.acquire(key, 1, "other-1") is True  # the slot is free: taken
            await paused.renew_leases()
            assert await other.count(key) == 1  # still within the limit of 1
            assert lost == [{"paused-1"}]
            # a lease Redis still has is simply extended; a lost one within the limit is
            # taken again
            assert await paused.acquire("conn:sub:bob", 2, "paused-2") is True
            await paused.client.zrem("lapse:{conn:sub:bob}", "paused-2")
            await paused.renew_leases()
            assert await paused.count("conn:sub:bob") == 1
            assert lost == [{"paused-1"}]
            await paused.client.aclose()

    runner.run(scenario())


# -- Redis only: atomicity under concurrent load ----------------------------------------

STORES, PER_STORE, SLOT_LIMIT = 8, 25, 10


@pytest.fixture
def eight_stores(runner: asyncio.Runner, redis_uri: str) -> Iterator[list[RedisStore]]:
    """Eight RedisStore instances, each with its own connection pool, on one Redis."""
    config = ClusterConfig(timeout_seconds=5.0)
    stores = [RedisStore(redis_uri, config) for _ in range(STORES)]
    yield stores
    for one in stores:
        runner.run(close_store(one))


async def fire(
    stores: list[RedisStore], operation: Callable[[RedisStore, int], Awaitable[T]]
) -> list[T]:
    """PER_STORE concurrent calls on every store at once (interleaved), all results."""
    calls = [
        operation(one, turn * len(stores) + index)
        for turn in range(PER_STORE)
        for index, one in enumerate(stores)
    ]
    return list(await asyncio.gather(*calls))


def assert_no_over_grant(granted: list[bool], held: int, limit: int) -> None:
    """Exactly *limit* of the concurrent acquires won, and that many slots are held."""
    wins = sum(granted)
    assert wins == limit, f"{wins} of {len(granted)} concurrent acquires granted, limit {limit}"
    assert held == limit, f"{held} slots held, limit {limit}"


def test_concurrent_acquire_grants_exactly_the_limit(
    runner: asyncio.Runner, eight_stores: list[RedisStore]
) -> None:
    async def scenario() -> None:
        granted = await fire(
            eight_stores, lambda one, n: one.acquire("conn:ip:hot", SLOT_LIMIT, f"holder-{n}")
        )
        assert len(granted) == STORES * PER_STORE
        for one in eight_stores:
            assert_no_over_grant(granted, await one.count("conn:ip:hot"), SLOT_LIMIT)

    runner.run(scenario())


async def naive_acquire(store: RedisStore, key: str, limit: int, holder: str) -> bool:
    """The race the Lua script prevents: read the count, then add, as two commands."""
    held = int(await store.client.zcard(key))
    await asyncio.sleep(0)  # any await between the read and the write lets others in
    if held >= limit:
        return False
    await store.client.zadd(key, {holder: time.time() + 60})
    return True


def test_naive_two_step_acquire_over_grants(
    runner: asyncio.Runner, eight_stores: list[RedisStore]
) -> None:
    """The same load through the same eight clients, with ZCARD and ZADD as two steps."""
    key = "naive:conn:ip:hot"

    async def scenario() -> None:
        granted = await fire(
            eight_stores, lambda one, n: naive_acquire(one, key, SLOT_LIMIT, f"holder-{n}")
        )
        held = int(await eight_stores[0].client.zcard(key))
        assert sum(granted) > SLOT_LIMIT
        assert held > SLOT_LIMIT
        with pytest.raises(AssertionError, match="concurrent acquires granted"):
            assert_no_over_grant(granted, held, SLOT_LIMIT)

    runner.run(scenario())


def test_concurrent_take_never_exceeds_the_limit(
    runner: asyncio.Runner, eight_stores: list[RedisStore]
) -> None:
    limit = 50

    async def scenario() -> None:
        results = await fire(eight_stores, lambda one, n: one.take("subj:hot", 3, limit, LONG))
        assert all(0 <= granted <= 3 for granted, _ in results)
        assert all(wait > 0 for granted, wait in results if granted == 0)
        assert sum(granted for granted, _ in results) == limit
        granted, wait = await eight_stores[0].take("subj:hot", 1, limit, LONG)
        assert granted == 0
        assert wait > 0

    runner.run(scenario())


def test_concurrent_failures_start_one_ban_per_crossing(
    runner: asyncio.Runner, eight_stores: list[RedisStore]
) -> None:
    policy = BanPolicy(threshold=5, window=LONG, base_seconds=30.0, max_seconds=120.0)
    key = "addr:hot"

    async def scenario() -> None:
        for length in (30.0, 60.0):  # two crossings, two bans (the second one doubled)
            results = await fire(eight_stores, lambda one, n: one.record_failure(key, policy))
            assert [r for r in results if r is not None] == [length]
            assert 0.0 < await eight_stores[3].ban_remaining(key) <= length
            assert await eight_stores[5].unban(key) is True

    runner.run(scenario())


def test_concurrent_nonce_is_accepted_once(
    runner: asyncio.Runner, eight_stores: list[RedisStore]
) -> None:
    async def scenario() -> None:
        fresh = await fire(eight_stores, lambda one, n: one.add_nonce("nonce:alice:k:1", 60))
        assert sum(fresh) == 1

    runner.run(scenario())


# -- Redis only: an outage and its recovery ---------------------------------------------


def outage_config(failures: StoreFailureConfig | None = None) -> ClusterConfig:
    return ClusterConfig(
        lease_ttl_seconds=1.0,
        timeout_seconds=0.5,
        retry_seconds=0.1,
        on_store_error=failures if failures is not None else StoreFailureConfig(),
    )


def test_outage_fails_closed_and_open_by_check_then_recovers(
    runner: asyncio.Runner, own_redis: RedisProcess
) -> None:
    policy = BanPolicy(threshold=2, window=LONG, base_seconds=30.0, max_seconds=60.0)

    async def scenario() -> None:
        async with redis_stores(own_redis.uri, outage_config()) as (one,):
            assert await one.acquire("conn:ip:pre", 5, "pre-holder") is True  # a Redis lease
            assert one.available

            await asyncio.to_thread(own_redis.kill)

            # closed by default: bans, revocations, nonces
            with pytest.raises(StoreUnavailable) as raised:
                await one.ban_remaining("addr:x")
            assert raised.value.check == "bans"
            assert not one.available
            with pytest.raises(StoreUnavailable) as raised:
                await one.record_failure("addr:x", policy)
            assert raised.value.check == "bans"
            with pytest.raises(StoreUnavailable) as raised:
                await one.is_revoked("alice", "tok-1")
            assert raised.value.check == "revocations"
            with pytest.raises(StoreUnavailable) as raised:
                await one.add_nonce("nonce:1", 60)
            assert raised.value.check == "nonces"
            assert await one.revoked_among([("alice", "tok-1")]) == [False]  # never raises

            # open by default: connections and rates answer from this node's own state
            assert await one.acquire("conn:ip:x", 1, "h1") is True
            assert await one.acquire("conn:ip:x", 1, "h2") is False  # local limits still hold
            assert await one.count("conn:ip:x") == 1
            assert await one.take("subj:x", 5, 3, LONG) == (3, 0.0)
            assert (await one.take("subj:x", 1, 3, LONG))[0] == 0
            assert await one.hit("hs:x", 1, LONG) == 0.0
            assert await one.hit("hs:x", 1, LONG) > 0.0
            assert not one.available

            await asyncio.to_thread(own_redis.start)  # same port, no data

            # the store notices by itself (its background loop probes), no call needed
            await eventually(lambda: one.available, "the store to recover", within=10)
            assert await one.ban_remaining("addr:x") == 0.0
            assert await one.is_revoked("alice", "tok-1") is False
            assert await one.add_nonce("nonce:1", 60) is True
            assert await one.add_nonce("nonce:1", 60) is False
            # the lease it held is back in Redis (re-created on recovery)
            await eventually(lambda: equals(one.count("conn:ip:pre"), 1), "the lease to reappear")

    runner.run(scenario())


def test_outage_with_bans_open_falls_back_to_local_bans(
    runner: asyncio.Runner, own_redis: RedisProcess
) -> None:
    policy = BanPolicy(threshold=2, window=LONG, base_seconds=30.0, max_seconds=60.0)
    config = outage_config(StoreFailureConfig(bans="open"))

    async def scenario() -> None:
        async with redis_stores(own_redis.uri, config) as (one,):
            assert await one.ban_remaining("addr:x") == 0.0
            await asyncio.to_thread(own_redis.kill)

            assert await one.ban_remaining("addr:x") == 0.0  # open: no error
            assert not one.available
            assert await one.record_failure("addr:x", policy) is None
            assert await one.record_failure("addr:x", policy) == 30.0  # a local ban
            assert 0.0 < await one.ban_remaining("addr:x") <= 30.0
            with pytest.raises(StoreUnavailable) as raised:  # other checks stay closed
                await one.is_revoked("alice", None)
            assert raised.value.check == "revocations"

            # an idle store (no leases to renew) notices the recovery by itself too
            await asyncio.to_thread(own_redis.start)
            await eventually(lambda: one.available, "the store to recover", within=10)
            assert await one.ban_remaining("addr:x") == 0.0  # Redis again: no ban there
            assert await one.is_revoked("alice", None) is False

    runner.run(scenario())


def test_close_finishes_during_a_renewal(runner: asyncio.Runner, redis_uri: str) -> None:
    """close() while a lease renewal is in flight returns (it hung on Python 3.11)."""

    async def scenario() -> None:
        for attempt in range(5):
            store = RedisStore(redis_uri, ClusterConfig(lease_ttl_seconds=1.0))
            await store.start()
            assert await store.acquire("conn:addr:a", 1, f"h{attempt}")
            deadline = time.monotonic() + 5
            while not store._renewing:  # the renewal round trip is short: catch it
                assert time.monotonic() < deadline, "no renewal started"
                await asyncio.sleep(0)
            background = list(store._tasks)
            closing = asyncio.ensure_future(store.close())
            done, _ = await asyncio.wait({closing}, timeout=5)  # no cancel: see if it ends
            if not done:  # clean up before failing
                for _ in range(50):
                    for task in (*background, closing):
                        task.cancel()
                    await asyncio.sleep(0.01)
                pytest.fail(f"close() did not return within 5 s (attempt {attempt + 1})")
            await closing
            assert all(task.done() for task in background)

    runner.run(scenario())


def test_database_number_isolates_events(runner: asyncio.Runner, redis_uri: str) -> None:
    """Pub/sub ignores the database number: two deployments on one Redis told apart by
    it alone (``/0`` and ``/1``, the same key prefix) must not get each other's
    revocations, disconnects and broadcasts."""
    base = redis_uri.rpartition("/")[0]

    async def scenario() -> None:
        config = ClusterConfig()
        async with (
            redis_stores(f"{base}/0", config, config) as (zero, zero2),
            redis_stores(f"{base}/1", config, config) as (one, one2),
        ):
            got: dict[str, list[bytes]] = {"zero2": [], "one2": []}
            zero2.subscribe(lambda _, payload: got["zero2"].append(payload))
            one2.subscribe(lambda _, payload: got["one2"].append(payload))
            await zero.publish(CHANNEL_BROADCAST, b"db0")
            await zero.revoke("sub", "mallory", 60)
            await one.publish(CHANNEL_BROADCAST, b"db1")
            await one.publish(CHANNEL_BROADCAST, b"end")
            await zero.publish(CHANNEL_BROADCAST, b"end")
            await eventually(lambda: b"end" in got["zero2"], "db 0's events")
            await eventually(lambda: b"end" in got["one2"], "db 1's events")
            assert got["zero2"] == [b"db0", b"sub:mallory", b"end"]
            assert got["one2"] == [b"db1", b"end"]
            assert await one2.is_revoked("mallory", None) is False

    runner.run(scenario())


def test_a_refused_event_subscription_is_reported_and_checked_for(
    runner: asyncio.Runner, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that answers commands but refuses SUBSCRIBE (an ACL without it, a proxy
    without pub/sub) leaves a node deaf to the other nodes' revocations: it says so (a
    warning, not ready, the ``events`` errors), checks its connections against the stored
    revocations at every retry meanwhile, and subscribes once it may."""
    config = ClusterConfig(retry_seconds=0.05, timeout_seconds=0.1)

    async def scenario() -> None:
        async with (
            redis_stores(uri, config) as (deaf,),
            redis_stores(own_redis.uri, config) as (other,),
        ):
            checks: list[float] = []
            deaf.on_resync(lambda: checks.append(time.monotonic()))
            await eventually(lambda: len(checks) >= 1, "a check standing in for the events")
            await eventually(lambda: deaf.error_counts().get("events", 0) >= 3, "retries")
            assert deaf.available  # commands work: not an outage
            assert deaf.events_failing
            assert deaf.error_counts().get("events", 0) >= 3
            warnings = [r for r in caplog.records if "cannot subscribe" in r.getMessage()]
            assert len(warnings) == 1, warnings  # once, not once per retry
            assert "pw" not in warnings[0].getMessage()

            grant()
            await eventually(lambda: not deaf.events_failing, "subscribed again")
            got: list[bytes] = []
            deaf.subscribe(lambda _, payload: got.append(payload))
            await other.publish(CHANNEL_BROADCAST, b"heard")
            await eventually(lambda: got == [b"heard"], "an event from the other node")

    with user_without_subscribe(own_redis) as (uri, grant):
        runner.run(scenario())


def test_a_redis_that_answers_ping_but_refuses_writes_is_one_outage(
    runner: asyncio.Runner, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of memory (``noeviction``), Redis answers PING and refuses every write: one
    outage, logged once, until writes work again; the answered PING between two
    operations is no recovery (it was logged as over and begun again at each retry)."""
    admin = own_redis.client()
    config = ClusterConfig(retry_seconds=0.05, timeout_seconds=0.5)

    async def scenario() -> None:
        async with redis_stores(own_redis.uri, config) as (store,):
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            await store.pace("addr:x", 1.0, 10)  # refused by Redis: the outage begins
            assert not store.available
            for _ in range(5):
                await asyncio.sleep(0.06)  # past retry_seconds: Redis is tried again
                assert await store.ping() is False
                await store.pace("addr:x", 1.0, 10)
                assert not store.available
            admin.config_set("maxmemory", 0)
            await asyncio.sleep(0.06)
            assert await store.ping() is True
            assert store.available

    with caplog.at_level(logging.WARNING, logger="wsguard.store"):
        runner.run(scenario())
    admin.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1, messages
    assert sum("available again" in m for m in messages) == 1, messages


def test_an_outage_is_not_reported_as_a_refused_subscription(
    runner: asyncio.Runner, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone: the subscription fails with everything else, and the outage is what
    is reported (not a subscription refused while commands work)."""
    config = ClusterConfig(retry_seconds=0.05, timeout_seconds=0.2)

    async def scenario() -> None:
        async with redis_stores(own_redis.uri, config) as (store,):
            own_redis.kill()
            await eventually(
                lambda: store.error_counts().get("events", 0) >= 3, "failed subscriptions"
            )
            assert not store.available
            assert not store.events_failing

    with caplog.at_level(logging.INFO, logger="wsguard.store"):
        runner.run(scenario())
    assert not [r for r in caplog.records if "cannot subscribe" in r.getMessage()]
