"""Cluster-wide state in Redis (or Valkey): one server (``redis://``), a Redis Cluster
(``redis+cluster://``) or a primary watched by Sentinels (``redis+sentinel://``), each
also over TLS (``rediss...``); the clients are in :mod:`redis_clients`.

Every operation is one command or one Lua script (:mod:`redis_scripts`), so no
two nodes ever race on a read-modify-write. Every script and every command touches
keys of one hash slot (a key's parts share its hash tag ``{...}``): on a Redis Cluster
each runs on the one primary that owns the slot, and a pipeline of them is split by
node (the revocation check of a subject and of a token id is two single-key
``EXISTS``, in parallel on their nodes). Connection slots are *leases*: each
holder's entry carries an expiry that this node renews every third of
``cluster.lease_ttl_seconds`` (in pipelined batches, which a cluster splits over its
shards); a node that dies stops renewing and its slots free themselves within the TTL.

Events (revocations, broadcasts, disconnects) use pub/sub: classic ``PUBLISH`` on one
server and under Sentinel, sharded ``SPUBLISH`` on a cluster (:mod:`redis_events`).

When Redis cannot answer, each check follows ``cluster.on_store_error``:
``closed`` raises :class:`StoreUnavailable` (the caller refuses), ``open``
uses this node's :class:`MemoryStore` (local limits). The outage is reported
once; after ``cluster.retry_seconds`` the next operation probes Redis again,
and the lease renewal loop keeps probing while the node is idle. On a Redis
Cluster, one failed operation is enough for the outage (a shard that cannot answer
makes the whole cluster refuse once it is declared failed), and the recovery needs
every primary to answer and the cluster to report itself ``ok``, so a failover is one
outage and one recovery, never a flapping between shards. Under Sentinel the next
connection after a failure asks the Sentinels for the primary again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from wsguard.config.model import ClusterConfig
from wsguard.stores import redis_events, redis_scripts
from wsguard.stores.base import (
    CHANNEL_BROADCAST,
    CHANNEL_DISCONNECT,
    CHANNEL_REVOKE,
    Admission,
    BanPolicy,
    EventHandler,
    NonceOutcome,
    RevocationKind,
    Store,
    StoreUnavailable,
)
from wsguard.stores.memory import MemoryStore
from wsguard.stores.redis_clients import (
    CommandClient,
    live_messages,
    open_clients,
    subscription_check_seconds,
)
from wsguard.stores.uri import parse_redis_uri, redacted

logger = logging.getLogger("wsguard.store")

T = TypeVar("T")

#: Called with ("outage" | "recovered", detail) when the store's health changes.
HealthListener = Callable[[str, str], None]

_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

AnyPipeline = Pipeline | ClusterPipeline


class RedisStore(Store):
    """Shared state for every node that names the same Redis and key prefix."""

    shared = True

    def __init__(self, uri: str, config: ClusterConfig | None = None) -> None:
        self.uri = uri
        self.config = config = config if config is not None else ClusterConfig()
        self._prefix = config.key_prefix
        self._ttl_ms = int(config.lease_ttl_seconds * 1000)
        self._modes = config.on_store_error
        address = parse_redis_uri(uri)
        self.topology = address.topology
        # Pub/sub ignores the database number: deployments told apart by it alone (same
        # key prefix, /0 and /1) would get each other's events. Database 0 keeps the
        # plain names (the only database of a Redis Cluster).
        self._channel_prefix = self._prefix + (f"db{address.db}:" if address.db else "")
        self._clients = open_clients(uri, address, config)
        self.client: CommandClient = self._clients.commands
        self._cluster = isinstance(self.client, RedisCluster)
        # the bucket this node publishes its events on (a cluster spreads them over shards)
        self._bucket = random.randrange(redis_events.BUCKETS)  # noqa: S311 - not a secret
        self._sharded: redis_events.ShardedSubscription | None = None
        self._fallback = MemoryStore("memory://")
        self._acquire = self.client.register_script(redis_scripts.ACQUIRE)
        self._renew = self.client.register_script(redis_scripts.RENEW)
        self._count = self.client.register_script(redis_scripts.COUNT)
        self._take = self.client.register_script(redis_scripts.TAKE)
        self._pace = self.client.register_script(redis_scripts.PACE)
        self._record_failure = self.client.register_script(redis_scripts.RECORD_FAILURE)
        self._screen = self.client.register_script(redis_scripts.SCREEN)
        self._extend_ban = self.client.register_script(redis_scripts.EXTEND_BAN)
        self._record_nonce = self.client.register_script(redis_scripts.RECORD_NONCE)
        self._scripts: tuple[AsyncScript, ...] = (
            self._acquire, self._renew, self._count, self._take, self._pace, self._record_failure,
            self._screen, self._extend_ban, self._record_nonce,
        )  # fmt: skip
        self._held: dict[str, set[str]] = {}  # leases granted by Redis, renewed by us
        self._local_held: set[tuple[str, str]] = set()  # leases granted in fail-open mode
        self._local_limits: dict[str, int] = {}  # the limit of each of those keys
        self._renew_lock = asyncio.Lock()  # one renewal at a time
        self._renewing = False
        self._late_releases: list[tuple[str, str]] = []
        self._handlers: list[EventHandler] = []
        self._resync: list[Callable[[], None]] = []
        self._lease_lost: list[Callable[[set[str]], object]] = []
        self._limits: dict[str, int] = {}  # the limit of each key this node holds leases of
        self._health: list[HealthListener] = []
        self._down_until = 0.0
        self._down = False
        self._down_by_reply = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._subscribed = asyncio.Event()
        self._events_failing = False  # the subscription refused while commands work
        self._subscription_end: tuple[BaseException, bool] | None = None
        self._next_stand_in = 0.0  # the next check standing in for refused events
        self._background: set[asyncio.Task[None]] = set()
        self.operations = 0  # round trips attempted, for benchmarks and tests
        self.errors: dict[str, int] = {}  # failed operations per check (metrics)

    # -- plumbing ----------------------------------------------------------------------

    @property
    def local(self) -> Store:
        return self._fallback

    @property
    def available(self) -> bool:
        return not self._down

    def on_health(self, listener: HealthListener) -> None:
        self._health.append(listener)

    def on_resync(self, callback: Callable[[], None]) -> None:
        self._resync.append(callback)

    def on_lease_lost(self, callback: Callable[[set[str]], object]) -> None:
        self._lease_lost.append(callback)

    def _key(self, key: str, suffix: str = "") -> str:
        # the key in braces is the Redis Cluster hash tag: a key's parts share a slot
        return f"{self._prefix}{{{key}}}{suffix}"

    def _mark_down(self, exc: BaseException) -> None:
        if self._closed:
            return  # errors of operations cut short by close() are not an outage
        self._down_until = time.monotonic() + self.config.retry_seconds
        # Redis answered, with an error (out of memory, a command the ACL denies, a
        # demoted primary's READONLY): a PING it answers proves nothing (see ping)
        self._down_by_reply = isinstance(exc, ResponseError)
        if not self._down:
            self._down = True
            detail = f"{type(exc).__name__}: {exc}"[:200]
            logger.warning("store %s unavailable: %s", redacted(self.uri), detail)
            for listener in self._health:
                listener("outage", detail)

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            logger.warning("store %s available again", redacted(self.uri))
            for listener in self._health:
                listener("recovered", "")
            for callback in self._resync:
                callback()
            adopted = self._adopt_local_leases()
            if adopted or (self._held and not self._renewing):
                # Redis may have lost them (re-create now), and the leases this node
                # granted on its own during the outage go to Redis within their limits
                task = asyncio.get_running_loop().create_task(self._after_recovery(adopted))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _adopt_local_leases(self) -> list[tuple[str, str]]:
        """The slots this node granted on its own state while Redis was down (checks
        configured to fail open) become leases like the others: the next renewal takes
        them in Redis only within their limits, and the connections that do not fit
        (the cluster-wide limit was exceeded during the outage) are reported lost."""
        adopted = sorted(self._local_held)
        self._local_held.clear()
        limits, self._local_limits = self._local_limits, {}
        for key, holder in adopted:
            self._held.setdefault(key, set()).add(holder)
            self._limits.setdefault(key, limits.get(key, 1))
        return adopted

    async def _after_recovery(self, adopted: list[tuple[str, str]]) -> None:
        for key, holder in adopted:  # this node's own state no longer holds them
            await self._fallback.release(key, holder)
        await self.renew_leases()

    async def _run(
        self,
        check: str,
        operation: Callable[[], Awaitable[T]],
        fallback: Callable[[], Awaitable[T]],
    ) -> T:
        """Run *operation* on Redis, or follow the check's failure mode."""
        if not self._down or time.monotonic() >= self._down_until:
            self.operations += 1
            try:
                if self._down and self._cluster:
                    await self._cluster_ready()
                result = await operation()
            except _FAILURES as exc:
                self.errors[check] = self.errors.get(check, 0) + 1
                self._mark_down(exc)
            else:
                self._mark_up()
                return result
        if getattr(self._modes, check, "open") == "closed":  # "health": a ping
            raise StoreUnavailable(check)
        return await fallback()

    async def _cluster_ready(self) -> None:
        """Raise unless every primary answers and the cluster reports itself ``ok``
        (a Redis Cluster is back only when all of it is: see the module's notes)."""
        assert isinstance(self.client, RedisCluster)
        await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        state = (await self.client.cluster_info()).get("cluster_state")
        if _text(state) != "ok":
            raise ClusterDownError(f"cluster state {_text(state)}")

    # -- slots (leases) ----------------------------------------------------------------

    async def acquire(self, key: str, limit: int, holder: str) -> bool:
        async def remote() -> bool:
            granted = await self._acquire(keys=[self._key(key)], args=[limit, holder, self._ttl_ms])
            if granted:
                self._held.setdefault(key, set()).add(holder)
                self._limits[key] = limit
            return bool(granted)

        async def local() -> bool:
            granted = await self._fallback.acquire(key, limit, holder)
            if granted:
                self._local_held.add((key, holder))
                self._local_limits[key] = limit
            return granted

        return await self._run("connections", remote, local)

    async def release(self, key: str, holder: str) -> None:
        await self.release_all((key,), holder)

    async def release_all(self, keys: Sequence[str], holder: str) -> None:
        remote_keys = []
        for key in keys:
            if (key, holder) in self._local_held:
                self._local_held.discard((key, holder))
                await self._fallback.release(key, holder)
                continue
            holders = self._held.get(key)
            if holders is None or holder not in holders:
                continue
            holders.discard(holder)
            if not holders:
                del self._held[key]
                self._limits.pop(key, None)
            if self._renewing:  # a renewal in flight may re-add it after our ZREM
                self._late_releases.append((key, holder))
            remote_keys.append(key)
        if not remote_keys:
            return

        async def remote() -> None:
            await self._remove_leases([(key, (holder,)) for key in remote_keys])

        async def expire() -> None:
            return None  # not renewed any more: the lease lapses within the TTL

        with contextlib.suppress(StoreUnavailable):
            await self._run("connections", remote, expire)

    async def _remove_leases(self, leases: Sequence[tuple[str, Iterable[str]]]) -> None:
        """ZREM each (key, holders) in one round trip (one command when there is one)."""
        if len(leases) == 1:
            key, holders = leases[0]
            await self.client.zrem(self._key(key), *holders)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, holders in leases:
                pipe.zrem(self._key(key), *holders)
            await pipe.execute()

    async def _pipelined(self, build: Callable[[AnyPipeline], None]) -> list[Any]:
        """One round trip of several commands (one per node on a cluster, in parallel);
        scripts by SHA, loaded again if Redis lost them (a restarted or promoted node).

        Only idempotent commands are pipelined (a pipeline is sent again whole)."""
        for attempt in range(2):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    build(pipe)
                    return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        """``SCRIPT LOAD`` every script (on every primary of a cluster)."""
        for script in self._scripts:
            await self.client.script_load(script.script)

    def _eval(
        self, pipe: AnyPipeline, script: AsyncScript, keys: Sequence[str], *args: Any
    ) -> None:
        """Queue *script* on *pipe* by SHA (one key slot: all *keys* share a hash tag)."""
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    async def count(self, key: str) -> int:
        async def remote() -> int:
            return int(await self._count(keys=[self._key(key)]))

        return await self._run("connections", remote, lambda: self._fallback.count(key))

    async def renew_leases(self) -> None:
        """Extend every lease this node holds. A lease Redis lost is taken again only
        within its limit; the connections whose leases could not be are told about
        (:meth:`on_lease_lost`), so no limit stays exceeded after a partition."""
        async with self._renew_lock:
            await self._renew_leases()

    async def _renew_leases(self) -> None:
        if not self._held:
            return
        items = [(key, sorted(holders)) for key, holders in self._held.items()]
        lost: list[tuple[str, str]] = []

        async def remote() -> None:
            for start in range(0, len(items), 500):
                batch = items[start : start + 500]

                def build(pipe: AnyPipeline, batch: list[tuple[str, list[str]]] = batch) -> None:
                    for key, holders in batch:
                        limit = self._limits.get(key, len(holders))
                        self._eval(
                            pipe, self._renew, [self._key(key)], self._ttl_ms, limit, *holders
                        )

                results = await self._pipelined(build)
                for (key, _), dropped in zip(batch, results, strict=True):
                    lost.extend((key, _text(holder)) for holder in dropped or ())

        async def nothing() -> None:
            return None

        self._renewing = True
        try:
            with contextlib.suppress(StoreUnavailable):
                await self._run("connections", remote, nothing)
        finally:
            self._renewing = False
            late, self._late_releases = self._late_releases, []
        if late:
            with contextlib.suppress(*_FAILURES):
                await self._remove_leases([(key, (holder,)) for key, holder in late])
        if lost:
            for key, holder in lost:
                holders = self._held.get(key)
                if holders is not None:
                    holders.discard(holder)
                    if not holders:
                        del self._held[key]
                        self._limits.pop(key, None)
            dropped_holders = {holder for _, holder in lost}
            for callback in self._lease_lost:
                callback(dropped_holders)

    async def _renewal_loop(self) -> None:
        interval = self.config.lease_ttl_seconds / 3
        while not self._closed:  # (a cancellation can get lost in redis-py on 3.11)
            await asyncio.sleep(interval)
            if self._held:
                await self.renew_leases()
            elif self._down:
                await self.ping()

    async def ping(self) -> bool:
        """Whether the store answers (on a cluster: every primary, and the cluster ok)."""

        async def remote() -> bool:
            if self._cluster:
                await self._cluster_ready()
            elif not await self.client.ping():
                return False
            if self._down and self._down_by_reply:
                # down because Redis refused an operation: back when a write through a
                # script (what handshakes do) works again, not when it answers a PING
                # (the outage would be logged as over and begun again at every retry)
                await self._pace(keys=[self._key("health", ":b")], args=[1000.0, 1000])
            return True

        async def down() -> bool:
            return False

        try:
            return await self._run("health", remote, down)
        except StoreUnavailable:
            return False

    # -- rates -------------------------------------------------------------------------

    async def take(self, key: str, want: int, limit: int, window: float) -> tuple[int, float]:
        async def remote() -> tuple[int, float]:
            granted, wait_ms = await self._take(
                keys=[self._key(key, ":w")], args=[limit, int(window * 1000), want]
            )
            return int(granted), int(wait_ms) / 1000

        async def local() -> tuple[int, float]:
            return await self._fallback.take(key, want, limit, window)

        return await self._run("rate_limits", remote, local)

    async def hit(self, key: str, limit: int, window: float) -> float:
        granted, wait = await self.take(key, 1, limit, window)
        return 0.0 if granted else wait

    async def pace(self, key: str, rate: float, burst: int) -> float:
        async def remote() -> float:
            wait_ms = await self._pace(keys=[self._key(key, ":b")], args=[float(rate), burst])
            return int(wait_ms) / 1000

        async def local() -> float:
            return await self._fallback.pace(key, rate, burst)

        return await self._run("rate_limits", remote, local)

    # -- the combined steps of a handshake ---------------------------------------------

    async def screen_address(self, key: str, rate: float, burst: int) -> tuple[float, float]:
        async def remote() -> tuple[float, float]:
            ban_ms, wait_ms = await self._screen(
                keys=[self._key("addr:" + key, ":ban"), self._key("addr:" + key, ":hsb")],
                args=[float(rate), burst],
            )
            return (int(ban_ms) / 1000 if int(ban_ms) > 0 else 0.0), int(wait_ms) / 1000

        async def fallback() -> tuple[float, float]:  # bans configured to fail open
            banned = await self._fallback.ban_remaining("addr:" + key)
            if banned > 0:
                return banned, 0.0
            if self._modes.rate_limits == "closed":
                raise StoreUnavailable("rate_limits")
            return 0.0, await self._fallback.pace("hs:" + key, rate, burst)

        return await self._run("bans", remote, fallback)

    async def admit(
        self,
        subject: str,
        token_id: str | None,
        slots: Sequence[tuple[str, int]],
        holder: str,
    ) -> Admission:
        """Revocation check, then every slot in one pipelined round trip.

        The check comes first, on its own: a flood of handshakes with a revoked token
        must never hold the subject's slots, not even for a round trip.
        """

        def build(pipe: AnyPipeline) -> None:
            for key, limit in slots:  # each ACQUIRE touches one key: one slot
                self._eval(pipe, self._acquire, [self._key(key)], limit, holder, self._ttl_ms)

        async def remote() -> Admission:
            if (await self._revoked([(subject, token_id)]))[0]:
                return Admission(revoked=True)
            self.operations += 1  # the second round trip
            granted = await self._pipelined(build)
            taken: list[str] = []
            full: str | None = None
            extra: list[str] = []
            for (key, _), ok in zip(slots, granted, strict=True):
                if ok and full is None:
                    taken.append(key)
                elif ok:
                    extra.append(key)  # granted after a full key: give it back
                elif full is None:
                    full = key
            if extra:
                with contextlib.suppress(*_FAILURES):
                    await self._remove_leases([(key, (holder,)) for key in extra])
            limits = dict(slots)
            for key in taken:  # renewed from now on (if cancelled before: they lapse)
                self._held.setdefault(key, set()).add(holder)
                self._limits[key] = limits[key]
            return Admission(taken=tuple(taken), full=full)

        async def fallback() -> Admission:  # revocations configured to fail open
            return await Store.admit(self, subject, token_id, slots, holder)

        return await self._run("revocations", remote, fallback)

    # -- failures and bans -------------------------------------------------------------

    async def ban_remaining(self, key: str) -> float:
        async def remote() -> float:
            ttl = int(await self.client.pttl(self._key(key, ":ban")))
            # 0 ms left is still a ban: Redis keeps the key until its time has passed
            return max(ttl, 1) / 1000 if ttl >= 0 else 0.0

        return await self._run("bans", remote, lambda: self._fallback.ban_remaining(key))

    async def record_failure(self, key: str, policy: BanPolicy) -> float | None:
        async def remote() -> float | None:
            duration = int(
                await self._record_failure(
                    keys=[self._key(key, ":fail"), self._key(key, ":ban"), self._key(key, ":lvl")],
                    args=[
                        policy.threshold,
                        int(policy.window * 1000),
                        int(policy.base_seconds * 1000),
                        int(policy.max_seconds * 1000),
                    ],
                )
            )
            if duration < 0:
                return None
            await self._index_ban(key, duration)
            return duration / 1000

        return await self._run("bans", remote, lambda: self._fallback.record_failure(key, policy))

    async def _index_ban(self, key: str, duration_ms: int) -> None:
        """Note a ban in the listing index (a sorted set scored by expiry, epoch ms).

        The index only serves :meth:`bans` and :meth:`active_ban_count`; the ban itself
        is the key's TTL. Expired entries are trimmed on every write, so the index
        stays as large as the bans in force.
        """
        now = int(time.time() * 1000)
        index = self._key("bans")
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.zadd(index, {key: now + duration_ms}, gt=True)
            await pipe.execute()

    async def ban(self, key: str, seconds: float) -> None:
        milliseconds = max(1, int(seconds * 1000))

        async def remote() -> None:
            # one script: a longer ban already in force (an escalated one) is kept
            left = int(await self._extend_ban(keys=[self._key(key, ":ban")], args=[milliseconds]))
            await self._index_ban(key, left)

        await self._fallback.ban(key, seconds)  # this node refuses at once, even if Redis is down
        await self._run("bans", remote, _constant(None))

    async def active_ban_count(self) -> int:
        """Bans in force (from the index: one O(log n) command)."""

        async def remote() -> int:
            now = int(time.time() * 1000)
            return int(await self.client.zcount(self._key("bans"), now, "+inf"))

        return await self._run("bans", remote, _constant(0))

    async def bans(self, limit: int = 1000) -> list[tuple[str, float]]:
        async def remote() -> list[tuple[str, float]]:
            index = self._key("bans")
            await self.client.zremrangebyscore(index, "-inf", int(time.time() * 1000))
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in await self.client.zrevrange(index, 0, max(0, limit - 1))
            ]
            if not names:
                return []

            def build(pipe: AnyPipeline) -> None:
                for name in names:
                    pipe.pttl(self._key(name, ":ban"))

            ttls = await self._pipelined(build)
            return [
                (name, max(int(ttl), 1) / 1000)
                for name, ttl in zip(names, ttls, strict=True)
                if int(ttl) >= 0
            ]

        return await self._run("bans", remote, lambda: self._fallback.bans(limit))

    def error_counts(self) -> dict[str, int]:
        return dict(self.errors)

    async def unban(self, key: str) -> bool:
        async def remote() -> bool:
            removed = bool(await self.client.delete(self._key(key, ":ban")))
            await self.client.zrem(self._key("bans"), key)
            return removed

        local = await self._fallback.unban(key)
        return await self._run("bans", remote, _constant(False)) or local

    # -- nonces ------------------------------------------------------------------------

    async def add_nonce(self, key: str, ttl: float) -> bool:
        async def remote() -> bool:
            fresh = await self.client.set(
                self._key(key, ":nonce"), b"1", nx=True, px=max(1, int(ttl * 1000))
            )
            return bool(fresh)

        return await self._run("nonces", remote, lambda: self._fallback.add_nonce(key, ttl))

    async def record_nonce(self, key: str, timestamp: float, window: float) -> NonceOutcome:
        async def remote() -> NonceOutcome:
            found = await self._record_nonce(
                keys=[self._key(key, ":nonce")],
                args=[int(timestamp * 1000), max(1, int(window * 1000))],
            )
            return "fresh" if found == 1 else "stale" if found == 2 else "replayed"

        return await self._run(
            "nonces", remote, lambda: self._fallback.record_nonce(key, timestamp, window)
        )

    # -- revocations and events --------------------------------------------------------

    def _revocation_key(self, kind: str, value: str) -> str:
        return self._key(f"rev:{kind}:{value}")

    async def revoke(self, kind: RevocationKind, value: str, ttl: float) -> None:
        key = self._revocation_key(kind, value)
        event = f"{kind}:{value}".encode()

        async def remote() -> None:
            if self._cluster:  # the key and the event channel are in different slots:
                # stored first, so a node that hears of it finds it stored
                await self.client.set(key, b"1", px=max(1, int(ttl * 1000)))
                await self._publish_remote(CHANNEL_REVOKE, event)
                return
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, b"1", px=max(1, int(ttl * 1000)))
                pipe.publish(self._channel_prefix + CHANNEL_REVOKE, event)
                await pipe.execute()

        async def local() -> None:
            await self._fallback.revoke(kind, value, ttl)

        await self._run("revocations", remote, local)

    def _revocation_keys(self, subject: str, token_id: str | None) -> list[str]:
        keys = [self._revocation_key("sub", subject)]
        if token_id is not None:
            keys.append(self._revocation_key("jti", token_id))
        return keys

    async def _revoked(self, pairs: Sequence[tuple[str, str | None]]) -> list[bool]:
        """For each (subject, token id), whether either is revoked: one round trip.

        The subject's key and the token id's are in different hash slots: one server
        answers one ``EXISTS`` of both; a cluster gets one single-key ``EXISTS`` each,
        sent to their nodes in parallel."""
        groups = [self._revocation_keys(subject, token_id) for subject, token_id in pairs]
        if not groups:
            return []
        if not self._cluster and len(groups) == 1:
            return [bool(await self.client.exists(*groups[0]))]

        def build(pipe: AnyPipeline) -> None:
            for keys in groups:
                if self._cluster:
                    for key in keys:
                        pipe.exists(key)
                else:
                    pipe.exists(*keys)

        found = iter(await self._pipelined(build))
        if not self._cluster:
            return [bool(n) for n in found]
        return [any([bool(next(found)) for _ in keys]) for keys in groups]

    async def is_revoked(self, subject: str, token_id: str | None) -> bool:
        async def remote() -> bool:
            return (await self._revoked([(subject, token_id)]))[0]

        return await self._run(
            "revocations", remote, lambda: self._fallback.is_revoked(subject, token_id)
        )

    async def revoked_among(self, pairs: list[tuple[str, str | None]]) -> list[bool]:
        """For each (subject, token id), whether it is revoked: one round trip."""

        async def remote() -> list[bool]:
            return await self._revoked(pairs)

        async def none() -> list[bool]:
            return [False] * len(pairs)

        try:
            return await self._run("revocations", remote, none)
        except StoreUnavailable:
            return [False] * len(pairs)

    async def _publish_remote(self, channel: str, payload: bytes) -> None:
        if self._cluster:
            name = redis_events.channel(self._prefix, self._bucket, channel)
            await self.client.spublish(name, payload)
        else:
            await self.client.publish(self._channel_prefix + channel, payload)

    async def publish(self, channel: str, payload: bytes) -> None:
        async def remote() -> None:
            await self._publish_remote(channel, payload)

        async def local_only() -> None:
            for handler in self._handlers:
                handler(channel, payload)

        await self._run("rate_limits", remote, local_only)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def _dispatch(self, channel: str, payload: bytes) -> None:
        for handler in self._handlers:
            try:
                handler(channel, payload)
            except Exception:
                logger.exception("event handler failed")

    def _missed_events(self) -> None:
        for callback in self._resync:
            callback()

    def _subscription_ended(self, exc: BaseException, confirmed: bool) -> None:
        """An event subscription ended with *exc*; *confirmed*: after Redis had confirmed
        it. Counted; :meth:`_subscription_broken` says what it was."""
        self.errors["events"] = self.errors.get("events", 0) + 1
        self._subscription_end = (exc, confirmed)

    async def _subscription_broken(self) -> None:
        """Between two attempts to subscribe: an outage (Redis does not answer: the
        store's), a dropped subscription (subscribed again, then checked, as after an
        outage), or one refused before its confirmation while commands work (an ACL
        without ``subscribe``, a proxy without pub/sub), which leaves this node deaf to
        the other nodes' revocations, disconnects and bans: reported once (a warning,
        not ready, the ``events`` errors), and this node's connections are checked
        against the stored revocations at every retry meanwhile."""
        await self.ping()
        ended, self._subscription_end = self._subscription_end, None
        if ended is None or self._closed or self._down:
            return
        exc, confirmed = ended
        if confirmed or not _refusal(exc):
            # a dropped subscription, or one caught in a slot move (MOVED during a
            # reshard): subscribed again, then checked, as after an outage
            logger.info("cluster event subscription ended: %s; subscribing again", exc)
            return
        if not self._events_failing:
            self._events_failing = True
            detail = f"{type(exc).__name__}: {exc}"[:200]
            logger.warning(
                "store %s: cannot subscribe to the cluster events (%s); revocations, "
                "disconnects and bans made on other nodes reach this node's connections "
                "only by its check every %g s until it can",
                redacted(self.uri),
                detail,
                max(5.0, 5 * self.config.retry_seconds),
            )
        # the check stands in for the events, at most every few retries (one EXISTS per
        # live connection each time: a standing load while the misconfiguration lasts)
        now = time.monotonic()
        if now >= self._next_stand_in:
            self._next_stand_in = now + max(5.0, 5 * self.config.retry_seconds)
            self._missed_events()

    def _subscription_confirmed(self) -> None:
        if self._events_failing:
            self._events_failing = False
            logger.warning("store %s: cluster events subscribed again", redacted(self.uri))

    @property
    def events_failing(self) -> bool:
        """Whether the event subscription is refused while Redis answers commands."""
        return self._events_failing and not self._down

    async def _sharded_subscriber_loop(self) -> None:
        """A cluster's events: sharded pub/sub that follows the slots (redis_events)."""
        assert isinstance(self.client, RedisCluster)
        self._sharded = redis_events.ShardedSubscription(
            self.client,
            self._clients.node_options,
            self._prefix,
            self._dispatch,
            retry_seconds=self.config.retry_seconds,
            check_seconds=max(1.0, 5 * self.config.retry_seconds),
            timeout_seconds=self.config.timeout_seconds,
            on_broken=self._subscription_broken,
            on_missed=self._missed_events,
            on_ended=self._subscription_ended,
            on_confirmed=self._subscription_confirmed,
            subscribed=self._subscribed,
        )
        while not self._closed:
            try:
                await self._sharded.run()
            except Exception:  # never let the event subscription die
                logger.exception("cluster event subscription failed; resubscribing")
                await asyncio.sleep(self.config.retry_seconds)

    async def _subscriber_loop(self) -> None:
        if self._clients.events is None:
            await self._sharded_subscriber_loop()
            return
        events = self._clients.events
        prefix = self._channel_prefix
        channels = [
            prefix + CHANNEL_REVOKE,
            prefix + CHANNEL_BROADCAST,
            prefix + CHANNEL_DISCONNECT,
        ]
        subscribed = self._subscribed
        check = subscription_check_seconds(self.config)
        first = True
        while not self._closed:
            confirmed = False
            try:
                async with events.pubsub() as pubsub:
                    await pubsub.subscribe(*channels)
                    waiting = len(channels)
                    async for message in live_messages(pubsub, check, self.config.timeout_seconds):
                        kind = message["type"]
                        if kind == "subscribe":  # Redis confirms each channel
                            waiting -= 1
                            if waiting == 0:
                                confirmed = True
                                subscribed.set()
                                self._subscription_confirmed()
                                if not first:
                                    self._missed_events()  # published while we were away
                                first = False
                            continue
                        if kind != "message":
                            continue
                        channel = message["channel"].decode()[len(prefix) :]
                        for handler in self._handlers:
                            try:
                                handler(channel, message["data"])
                            except Exception:
                                logger.exception("event handler failed")
            except _FAILURES as exc:
                # Redis drops pub/sub clients on its own (output buffer limits, proxy
                # idle timeouts): only an outage if commands fail too.
                first = False
                subscribed.clear()
                self._subscription_ended(exc, confirmed)
                await self._subscription_broken()
                await asyncio.sleep(self.config.retry_seconds)
            except Exception:  # never let the event subscription die
                logger.exception("cluster event subscription failed; resubscribing")
                first = False
                subscribed.clear()
                await asyncio.sleep(self.config.retry_seconds)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        await self.ping()  # an outage at start is reported, not fatal
        self._tasks = [
            asyncio.create_task(self._renewal_loop(), name="wsguard-lease-renewal"),
            asyncio.create_task(self._subscriber_loop(), name="wsguard-events"),
        ]
        # listen for revocations before the node admits anyone (bounded: Redis may be down)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.timeout_seconds * 4):
                await self._subscribed.wait()

    async def close(self) -> None:
        self._closed = True
        tasks, self._tasks = self._tasks, []
        # Cancel until they are done: on Python 3.11 asyncio.wait_for (used by redis-py
        # for socket timeouts) drops a cancellation that lands as its operation
        # completes (bpo-42130), which would leave close() waiting forever.
        pending = set(tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        held, self._held = self._held, {}
        if held and not self._down:
            with contextlib.suppress(*_FAILURES):
                await self._remove_leases(list(held.items()))
        await self._clients.aclose()


def _refusal(exc: BaseException) -> bool:
    """Whether Redis refused the subscription itself (an ACL, a proxy without pub/sub),
    not a slot move or a connection that went away."""
    return isinstance(exc, ResponseError) and not isinstance(
        exc, (MovedError, AskError, TryAgainError, ClusterDownError)
    )


def _constant(value: T) -> Callable[[], Awaitable[T]]:
    async def constant() -> T:
        return value

    return constant


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
