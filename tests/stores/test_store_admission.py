"""The combined handshake steps of the store: the same answers from memory:// and Redis.

``screen_address`` (ban, then handshake rate: one Lua script on Redis) and ``admit``
(revocation, then each connection slot: one pipelined round trip on Redis) replace
five sequential round trips of a cluster handshake with two. These tests pin down
that they mean exactly what the separate steps meant, including what is *not*
counted or held when a step refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis

from wsguard.config.model import ClusterConfig
from wsguard.stores import BanPolicy, Store, open_store
from wsguard.stores.base import Admission

CLUSTER = ClusterConfig(key_prefix="admission:", lease_ttl_seconds=5.0, retry_seconds=0.1)
BAN = BanPolicy(threshold=1, window=60.0, base_seconds=30.0, max_seconds=60.0)
SLOTS = (("conn:addr:10.0.0.1", 1), ("conn:sub:alice", 2))
RATE = 1.0  # handshakes per second (60 a minute); the bursts are the tests' own

Scenario = Callable[[Store], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def run(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    uri = "memory://" if request.param == "memory" else request.getfixturevalue("redis_uri")

    def runner(scenario: Scenario) -> None:
        async def main() -> None:
            store = open_store(uri, CLUSTER)
            await store.start()
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(main())

    return runner


def test_screen_paces_handshakes_after_the_burst(run: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        assert await store.screen_address("10.0.0.1", RATE, 2) == (0.0, 0.0)
        assert await store.screen_address("10.0.0.1", RATE, 2) == (0.0, 0.0)
        banned, wait = await store.screen_address("10.0.0.1", RATE, 2)
        assert banned == 0.0
        assert 0.5 < wait <= 1 / RATE  # one token back, not the minute's whole allowance
        assert await store.screen_address("10.0.0.2", RATE, 2) == (0.0, 0.0)  # per address

    run(scenario)


def test_screen_answers_a_banned_address_without_counting_it(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(store: Store) -> None:
        assert await store.screen_address("10.0.0.1", RATE, 2) == (0.0, 0.0)  # 1 of 2
        assert await store.record_failure("addr:10.0.0.1", BAN) == 30.0
        for _ in range(3):
            banned, wait = await store.screen_address("10.0.0.1", RATE, 2)
            assert 0 < banned <= 30.0
            assert wait == 0.0
        assert await store.unban("addr:10.0.0.1") is True
        assert await store.screen_address("10.0.0.1", RATE, 2) == (0.0, 0.0)  # 2 of 2
        assert (await store.screen_address("10.0.0.1", RATE, 2))[1] > 0

    run(scenario)


def test_admit_takes_every_slot_and_release_all_gives_them_back(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(store: Store) -> None:
        admission = await store.admit("alice", "t1", SLOTS, "h1")
        assert admission == Admission(taken=("conn:addr:10.0.0.1", "conn:sub:alice"))
        assert await store.count("conn:addr:10.0.0.1") == 1
        assert await store.count("conn:sub:alice") == 1
        await store.release_all(admission.taken, "h1")
        assert await store.count("conn:addr:10.0.0.1") == 0
        assert await store.count("conn:sub:alice") == 0
        await store.release_all(admission.taken, "h1")  # twice is harmless
        assert await store.count("conn:sub:alice") == 0

    run(scenario)


def test_admit_stops_at_the_first_full_key(run: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        first = await store.admit("alice", "t1", SLOTS, "h1")
        assert first.full is None
        # the address (limit 1) is full: nothing is taken for the subject either
        second = await store.admit("alice", "t2", SLOTS, "h2")
        assert second == Admission(taken=(), full="conn:addr:10.0.0.1")
        assert await store.count("conn:sub:alice") == 1
        # another address, same subject (limit 2): the subject slot is the last one
        other = (("conn:addr:10.0.0.2", 1), ("conn:sub:alice", 2))
        third = await store.admit("alice", "t3", other, "h3")
        assert third == Admission(taken=("conn:addr:10.0.0.2", "conn:sub:alice"))
        # a third address: its own slot is free, the subject is full -> address slot taken
        # and reported as taken (the caller releases it), subject full
        more = (("conn:addr:10.0.0.3", 1), ("conn:sub:alice", 2))
        fourth = await store.admit("alice", "t4", more, "h4")
        assert fourth == Admission(taken=("conn:addr:10.0.0.3",), full="conn:sub:alice")
        await store.release_all(fourth.taken, "h4")
        assert await store.count("conn:addr:10.0.0.3") == 0
        assert await store.count("conn:sub:alice") == 2

    run(scenario)


def test_admit_refuses_revoked_tokens_and_subjects_holding_nothing(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(store: Store) -> None:
        await store.revoke("jti", "stolen", 60.0)
        assert await store.admit("alice", "stolen", SLOTS, "h1") == Admission(revoked=True)
        assert await store.admit("alice", "fresh", SLOTS, "h2") == Admission(
            taken=("conn:addr:10.0.0.1", "conn:sub:alice")
        )
        await store.release_all(("conn:addr:10.0.0.1", "conn:sub:alice"), "h2")
        await store.revoke("sub", "alice", 60.0)
        assert await store.admit("alice", "fresh", SLOTS, "h3") == Admission(revoked=True)
        assert await store.admit("alice", None, SLOTS, "h4") == Admission(revoked=True)
        assert await store.count("conn:addr:10.0.0.1") == 0
        assert await store.count("conn:sub:alice") == 0
        assert (await store.admit("bob", None, SLOTS, "h5")).full is None

    run(scenario)


def test_admit_recovers_when_redis_lost_its_scripts(redis_uri: str) -> None:
    """After a Redis restart the script cache is empty: the pipeline loads them again."""

    async def main() -> None:
        store = open_store(redis_uri, CLUSTER)
        await store.start()
        try:
            assert (await store.admit("alice", None, SLOTS, "h1")).full is None
            with redis.Redis.from_url(redis_uri) as admin:
                admin.script_flush()
            assert await store.admit("bob", None, (("conn:sub:bob", 1),), "h2") == Admission(
                taken=("conn:sub:bob",)
            )
            assert await store.screen_address("10.0.0.9", RATE, 5) == (0.0, 0.0)
            with redis.Redis.from_url(redis_uri) as admin:
                admin.script_flush()
            assert await store.screen_address("10.0.0.9", RATE, 5) == (0.0, 0.0)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_revoked_token_never_touches_the_slots(redis_uri: str) -> None:
    """Not even for a round trip: a flood of revoked tokens must not hold the user's slots."""

    def acquires(admin: redis.Redis) -> int:
        stats = admin.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
            stats.get("cmdstat_eval", {}).get("calls", 0)
        )

    async def main() -> None:
        store = open_store(redis_uri, CLUSTER)
        await store.start()
        try:
            await store.revoke("jti", "stolen", 60.0)
            with redis.Redis.from_url(redis_uri) as admin:
                before = acquires(admin)
                for n in range(20):
                    admission = await store.admit("alice", "stolen", SLOTS, f"h{n}")
                    assert admission == Admission(revoked=True)
                assert acquires(admin) == before  # no acquire script ever ran
        finally:
            await store.close()

    asyncio.run(main())
