"""The redis-py clients of the Redis store, one kind per topology.

* one server (``redis://``): a client from the URI, and a second one for pub/sub;
* Redis Cluster (``redis+cluster://``): ``redis.asyncio.cluster.RedisCluster`` on the
  seed nodes (it follows MOVED/ASK redirections and refreshes its slot map after
  errors); sharded pub/sub connects to each primary directly (:mod:`redis_events`);
* Sentinel (``redis+sentinel://``): clients of the primary that the Sentinels name,
  found again on every new connection, so after a failover the next connection goes to
  the new primary (a connection to a demoted primary fails with ``READONLY`` and is
  dropped).

Every command client fails fast (the store's timeout, no retries of its own: the
store's per-check failure modes decide what an error means), except that the cluster
client retries once after refreshing its slot map, so a command sent to a primary that
has just been replaced reaches the new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from wsguard.config.model import ClusterConfig
from wsguard.stores.uri import RedisAddress, Topology

#: A command client of any topology (both have the same command methods).
CommandClient = aioredis.Redis | RedisCluster


@dataclass
class RedisClients:
    """The clients a store uses, and what it needs to open more."""

    topology: Topology
    commands: CommandClient
    #: the blocking pub/sub client (one server, Sentinel); None for a cluster
    events: aioredis.Redis | None
    #: connection options for a direct connection to one cluster node
    node_options: dict[str, Any] = field(default_factory=dict)
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.commands.aclose()
        if self.events is not None:
            await self.events.aclose()
        if self.sentinel is not None:
            with contextlib.suppress(Exception):
                await self.sentinel.aclose()


def _options(address: RedisAddress, config: ClusterConfig) -> dict[str, Any]:
    """Connection options every topology shares: timeouts, credentials, TLS."""
    options: dict[str, Any] = {
        "socket_timeout": config.timeout_seconds,
        "socket_connect_timeout": config.timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
    }
    if address.username is not None:
        options["username"] = address.username
    if address.password is not None:
        options["password"] = address.password
    if address.tls:
        options["ssl"] = True
        if config.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(config.tls_ca_file)
    return options


def open_clients(uri: str, address: RedisAddress, config: ClusterConfig) -> RedisClients:
    """The clients for the store at *uri* (nothing connects until the first command)."""
    if address.topology == "single":
        options: dict[str, Any] = {
            "socket_timeout": config.timeout_seconds,
            "socket_connect_timeout": config.timeout_seconds,
            "retry": Retry(NoBackoff(), 0),
        }
        if address.tls and config.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(config.tls_ca_file)
        # the subscriber blocks on reads: no socket timeout, its own connection
        return RedisClients(
            "single",
            aioredis.Redis.from_url(uri, **options),
            aioredis.Redis.from_url(uri, **dict(options, socket_timeout=None)),
        )
    options = _options(address, config)
    if address.topology == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.hosts],
            require_full_coverage=False,  # the servers decide (cluster-require-full-coverage)
            **dict(options, retry=Retry(NoBackoff(), 1)),
        )
        return RedisClients("cluster", cluster, None, node_options=options)
    sentinel_options = {
        key: value
        for key, value in options.items()
        if key.startswith(("socket_", "ssl")) or key == "retry"
    }
    sentinel = Sentinel(list(address.hosts), sentinel_kwargs=sentinel_options, **options)
    commands = sentinel.master_for(address.service, redis_class=aioredis.Redis, db=address.db)
    events = sentinel.master_for(
        address.service, redis_class=aioredis.Redis, db=address.db, socket_timeout=None
    )
    return RedisClients("sentinel", commands, events, sentinel=sentinel)


def subscription_check_seconds(config: ClusterConfig) -> float:
    """How long a subscription may stay silent before it is asked for a PING: a third of
    ``cluster.lease_ttl_seconds``, the lease renewals' cadence."""
    return config.lease_ttl_seconds / 3


async def live_messages(
    pubsub: Any, every: float, answer_within: float
) -> AsyncIterator[dict[str, Any]]:
    """What ``pubsub.listen()`` yields (subscription confirmations included; *pubsub*
    must not ignore them), ending with ``ConnectionError`` when the connection goes
    silent: a connection can die without a FIN or a reset (a host losing power, a
    firewall or NAT forgetting its state), and a subscriber only reads, so without this
    it would wait forever and every later event would be lost. After *every* seconds
    with nothing received it sends a PING; no answer within *answer_within* ends it."""
    pinged = False
    while True:
        message = await pubsub.get_message(timeout=answer_within if pinged else every)
        if message is None:
            if pinged:
                raise RedisConnectionError("the subscription did not answer its PING")
            await pubsub.ping()
            pinged = True
            continue
        pinged = False
        if message["type"] != "pong":
            yield message
