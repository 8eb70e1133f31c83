"""Cluster events on a Redis Cluster: sharded pub/sub (``SPUBLISH`` / ``SSUBSCRIBE``).

Classic pub/sub on a Redis Cluster sends every message to every node of the cluster,
so it is one ceiling for all shards. Sharded pub/sub keeps a channel's messages inside
the shard that owns the channel's hash slot. The events are spread over
:data:`BUCKETS` buckets, each a hash tag of its own chosen so that the buckets sit
evenly over the slot space (and so over the shards); a bucket has one channel per
event kind (``revoke``, ``broadcast``, ``disconnect``), all in the bucket's slot.

* A store publishes on one bucket, picked at random when it starts: its events keep
  their order (one channel, one shard), and the publishing of many nodes spreads over
  the shards.
* Every store subscribes to every bucket, on the primary that owns the bucket's slot:
  one connection per primary, one ``SSUBSCRIBE`` per bucket (one slot per command).

The subscription follows the cluster: when a slot moves (a reshard) Redis ends the
subscriptions of its channels (``sunsubscribe``), when a primary dies its connection
fails, and the slot map is checked again every few seconds in case neither was
noticed. Each time, the slot map is read again (``CLUSTER SLOTS`` from any node that
answers) and the buckets whose owner changed are subscribed again on the new owner.
Events published while a bucket was not subscribed are lost, so once every bucket is
subscribed again the store's resync callbacks run (the node checks its connections
against the stored revocations).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from wsguard.stores.base import CHANNEL_BROADCAST, CHANNEL_DISCONNECT, CHANNEL_REVOKE
from wsguard.stores.redis_clients import live_messages

logger = logging.getLogger("wsguard.store")

SLOTS = 16384
#: Event buckets (each its own hash slot): fixed, every node must agree on them.
BUCKETS = 16
KINDS = (CHANNEL_REVOKE, CHANNEL_BROADCAST, CHANNEL_DISCONNECT)

_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

Address = tuple[str, int]


def _bucket_tags() -> tuple[str, ...]:
    """One hash tag per bucket, bucket *i* in the *i*-th 1/BUCKETS of the slot space."""
    tags = []
    for bucket in range(BUCKETS):
        low, high = bucket * SLOTS // BUCKETS, (bucket + 1) * SLOTS // BUCKETS
        n = 0
        while not low <= key_slot(f"events.{bucket}.{n}".encode()) < high:
            n += 1
        tags.append(f"events.{bucket}.{n}")
    return tuple(tags)


TAGS = _bucket_tags()
BUCKET_SLOTS = tuple(key_slot(tag.encode()) for tag in TAGS)


def channel(prefix: str, bucket: int, kind: str) -> str:
    return f"{prefix}{{{TAGS[bucket]}}}:{kind}"


def kind_of(name: bytes | str) -> str:
    """The event kind of a bucket channel's name."""
    text = name.decode() if isinstance(name, bytes) else name
    return text.rpartition("}:")[2]


class ShardedSubscription:
    """Keeps every bucket subscribed on the primary that owns it; calls *deliver*."""

    def __init__(
        self,
        client: RedisCluster,
        node_options: dict[str, Any],
        prefix: str,
        deliver: Callable[[str, bytes], None],
        *,
        retry_seconds: float,
        check_seconds: float,
        timeout_seconds: float,
        on_broken: Callable[[], Awaitable[object]],
        on_missed: Callable[[], None],
        on_ended: Callable[[BaseException, bool], None] | None = None,
        on_confirmed: Callable[[], None] | None = None,
        subscribed: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        self._options = dict(node_options, socket_timeout=None)  # readers block on reads
        self._prefix = prefix
        self._deliver = deliver
        self._retry = retry_seconds
        self._check = check_seconds
        self._timeout = timeout_seconds  # for a reader's PING (see live_messages)
        self._on_broken = on_broken
        self._on_missed = on_missed
        self._on_ended = on_ended  # a reader failed: (its error, after its confirmation)
        self._on_confirmed = on_confirmed  # every bucket subscribed
        #: set while every bucket is subscribed
        self.subscribed = subscribed if subscribed is not None else asyncio.Event()
        #: the reader of each primary: (task, its buckets, all of them confirmed)
        self._readers: dict[Address, tuple[asyncio.Task[None], frozenset[int], asyncio.Event]] = {}
        self._missed = False  # a bucket was unsubscribed at some point since all were
        self.replans = 0  # times the subscriptions were moved (tests, metrics)

    # -- the slot map ----------------------------------------------------------------

    async def owners(self) -> dict[int, Address]:
        """The primary of each bucket, from ``CLUSTER SLOTS`` of the first node that answers."""
        await self._client.initialize()
        nodes = self._client.get_primaries() + self._client.get_replicas()
        error: BaseException | None = None
        for node in nodes:
            try:
                ranges = await self._client.execute_command("CLUSTER SLOTS", target_nodes=node)
            except _FAILURES as exc:
                error = exc
                continue
            owners: dict[int, Address] = {}
            for (low, high), shard in ranges.items():
                host, port = shard["primary"][:2]
                for bucket, slot in enumerate(BUCKET_SLOTS):
                    if int(low) <= slot <= int(high):
                        owners[bucket] = (_text(host) or node.host, int(port))
            return owners
        raise error if error is not None else RedisClusterException("no cluster node known")

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, and keep the subscriptions on the buckets' owners (until cancelled)."""
        try:
            while True:
                try:
                    owners = await self.owners()
                except _FAILURES as exc:
                    logger.debug("cluster slot map unavailable: %s", exc)
                    owners = None
                    self._lose("slot map")
                    await self._on_broken()
                if owners is not None:
                    await self._reconcile(owners)
                    if len(owners) < BUCKETS:
                        self._lose("uncovered bucket")
                await self._wait(self._check if owners is not None else self._retry)
        finally:
            await _cancel([task for task, _, _ in self._readers.values()])
            self._readers.clear()

    async def _reconcile(self, owners: dict[int, Address]) -> None:
        plan: dict[Address, frozenset[int]] = {}
        for bucket, address in owners.items():
            plan[address] = plan.get(address, frozenset()) | {bucket}
        stale = [
            address
            for address, (task, buckets, _) in self._readers.items()
            if task.done() or plan.get(address) != buckets
        ]
        if stale:
            self.replans += 1
            self._lose("moved")
            await _cancel([self._readers.pop(address)[0] for address in stale])
        for address, buckets in plan.items():
            if address not in self._readers:
                confirmed = asyncio.Event()
                task = asyncio.create_task(
                    self._read(address, buckets, confirmed),
                    name=f"wsguard-events-{address[0]}:{address[1]}",
                )
                self._readers[address] = (task, buckets, confirmed)

    async def _wait(self, seconds: float) -> None:
        """Until *seconds* pass or a reader ends; resync once every bucket is back."""
        deadline = time.monotonic() + seconds
        while True:
            entries = list(self._readers.values())
            complete = entries and self._covered() and all(c.is_set() for _, _, c in entries)
            if complete and not self.subscribed.is_set():
                self.subscribed.set()
                if self._on_confirmed is not None:
                    self._on_confirmed()
                if self._missed:
                    self._missed = False
                    self._on_missed()  # events published meanwhile are lost
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readers = [task for task, _, _ in entries]
            confirms = [
                asyncio.ensure_future(confirmed.wait())
                for _, _, confirmed in entries
                if not confirmed.is_set()
            ]
            if not readers:
                await asyncio.sleep(left)
                return
            try:
                await asyncio.wait(
                    {*readers, *confirms}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in confirms:
                    waiter.cancel()
            if any(task.done() for task in readers):
                self._lose("connection ended")
                await self._on_broken()
                await asyncio.sleep(self._retry)
                return

    def _covered(self) -> bool:
        return sum(len(buckets) for _, buckets, _ in self._readers.values()) == BUCKETS

    def _lose(self, why: str) -> None:
        if self.subscribed.is_set():
            logger.info("cluster event subscription interrupted (%s)", why)
        self.subscribed.clear()
        self._missed = True

    async def _read(
        self, address: Address, buckets: frozenset[int], confirmed: asyncio.Event
    ) -> None:
        """Subscribe to *buckets* on the primary at *address*; deliver until it ends."""
        client = aioredis.Redis(host=address[0], port=address[1], **self._options)
        try:
            async with client.pubsub() as pubsub:
                for bucket in sorted(buckets):  # one slot per SSUBSCRIBE
                    await pubsub.ssubscribe(*(channel(self._prefix, bucket, k) for k in KINDS))
                waiting = len(buckets) * len(KINDS)
                async for message in live_messages(pubsub, self._check, self._timeout):
                    kind = message["type"]
                    if kind == "smessage":
                        try:
                            self._deliver(kind_of(message["channel"]), message["data"])
                        except Exception:
                            logger.exception("event handler failed")
                    elif kind == "ssubscribe":
                        waiting -= 1
                        if waiting == 0:
                            confirmed.set()
                    elif kind == "sunsubscribe":  # the slot moved away from this node
                        return
        except _FAILURES as exc:
            logger.debug("sharded subscription on %s:%s ended: %s", *address, exc)
            if self._on_ended is not None:
                self._on_ended(exc, confirmed.is_set())
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel until done: on Python 3.11 redis-py can lose a cancellation (bpo-42130)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
