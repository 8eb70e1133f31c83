"""Cluster mode on a real Redis Cluster and a real Sentinel group, through their faults.

Two wsguard nodes (real servers, real clients, one engine: what is tested here is the
store, which is the same on both) share a topology of this test's own from
:mod:`redis_topologies`:

* a Redis Cluster primary is SIGKILLed while its shard holds a subject's connection
  leases: its replica is promoted, every handshake during the switch is refused (503,
  bans fail closed by default) or limited (429), never admitted over the limit; each
  node audits one outage and one recovery (no flapping between shards), ``/metrics``
  shows the store down then up, the connections live on, nothing is locked out, and the
  events reach every node again (the sharded subscriptions moved to the new primary);
* the Sentinels' primary is SIGKILLed with every check failing open: during the switch
  each node admits at most the limit on its own (the documented bound: at most
  ``nodes x limit`` over the cluster-wide limit); after the Sentinels promote the
  replica, the slots granted locally are taken in Redis only within the limit and the
  connections that do not fit are closed with 1013 (audited ``connection_over_limit``),
  so the cluster-wide limit holds again; revocations reach every node;
* hash slots move while connections are open: the slot of a subject's leases, the slot
  of its revocation and the event bucket a node publishes on (each with ``CLUSTER
  SETSLOT`` / ``MIGRATE``, handshakes made while the slot is half moved), then a range
  of 1,100 slots with ``redis-cli --cluster reshard``: limits, revocations and
  broadcasts keep working and no outage is reported;
* both topologies over TLS only (``rediss+cluster://``, ``rediss+sentinel://``, a
  private CA): limits, revocations and broadcasts shared by two nodes;
* store URIs: what each names, and the refusals of bad ones, naming the ``store`` key
  and never echoing a password.

Nothing sleeps for a fixed time: every effect is polled for with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.crc import key_slot
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import (
    SECRET,
    AuditCapture,
    RunningServer,
    admin_overrides,
    make_config,
    make_token,
)
from support.redis_topologies import (
    ClusterTopology,
    SentinelTopology,
    cluster_topology,
    sentinel_topology,
)
from wsguard.config.loader import validate_config
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog
from wsguard.stores import redis_events
from wsguard.stores.redis_store import RedisStore
from wsguard.stores.uri import parse_redis_uri, redacted

LIMIT = 2  # connections per subject
ROOMY: dict[str, Any] = {
    "handshakes_per_minute": 10_000,
    "connections_per_address": 1_000,
    "connections_per_subject": LIMIT,
    "messages_per_minute": 6_000,
    "message_burst": 500,
    "violation_budget": 1_000,
}
#: Short retries and leases, so a switch is noticed and left within a few seconds.
CLUSTER: dict[str, Any] = {"retry_seconds": 0.2, "lease_ttl_seconds": 3, "timeout_seconds": 0.5}
EVERYTHING_OPEN = {
    check: "open" for check in ("bans", "revocations", "nonces", "rate_limits", "connections")
}


# -- nodes and clients ----------------------------------------------------------------


@pytest.fixture
def start_node() -> Iterator[Callable[..., RunningServer]]:
    """Start wsguard nodes (the demo app, admin listener on) on a store; all stopped after."""
    started: list[RunningServer] = []

    def start(store: str, cluster: dict[str, Any] | None = None) -> RunningServer:
        audit = AuditCapture()
        config = make_config(
            {
                "store": store,
                "limits": ROOMY,
                "cluster": {**CLUSTER, **(cluster or {})},
                **admin_overrides(),
            }
        )
        app = App(guard=Guard(config, audit=AuditLog(audit)))
        install_demo(app)
        node = RunningServer(app, audit).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)


def store_of(node: RunningServer) -> RedisStore:
    store = node.app.guard.store
    assert isinstance(store, RedisStore)
    return store


def subscribed(*nodes: RunningServer) -> bool:
    return all(node.call(store_of(node)._subscribed.is_set) for node in nodes)


def attempt(node: RunningServer, subject: str) -> tuple[int, ClientConnection | None]:
    """A handshake: (101, the welcomed connection) or (refusal status, None)."""
    try:
        ws = node.connect(make_token(subject))
    except InvalidStatus as exc:
        return exc.response.status_code, None
    ws.pending_legacy_warning = False
    welcome = json.loads(ws.recv(timeout=5))
    assert welcome["type"] == "welcome", welcome
    return 101, ws


def welcomed(node: RunningServer, subject: str) -> ClientConnection:
    status, ws = attempt(node, subject)
    assert status == 101 and ws is not None, f"{subject} refused with {status}"
    return ws


def admitted_eventually(node: RunningServer, subject: str, timeout: float = 10) -> ClientConnection:
    """Retry a handshake refused with 429 or 503 until it is admitted."""
    deadline = time.monotonic() + timeout
    while True:
        status, ws = attempt(node, subject)
        if ws is not None:
            return ws
        assert status in (429, 503), status
        if time.monotonic() > deadline:
            pytest.fail(f"{subject} not admitted within {timeout}s (last {status})")
        time.sleep(0.05)


def assert_pong(ws: ClientConnection, msg_id: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": msg_id}))
    reply = json.loads(ws.recv(timeout=5))
    assert (reply["type"], reply["id"]) == ("pong", msg_id), reply


def broadcast_arrives(sender: ClientConnection, receiver: ClientConnection, text: str) -> None:
    sender.send(json.dumps({"type": "chat", "text": text, "id": text}))
    frame = json.loads(receiver.recv(timeout=5))
    assert frame["message"]["text"] == text, frame


def close_code(ws: ClientConnection, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws.recv(timeout=max(0.001, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                pytest.fail(f"closed without a close frame: {exc}")
            return exc.rcvd.code
        except TimeoutError:
            pytest.fail(f"not closed within {timeout}s")


def is_open(ws: ClientConnection, msg_id: str) -> bool:
    """Whether *ws* still answers a ping (False once the server closed it)."""
    try:
        ws.send(json.dumps({"type": "ping", "id": msg_id}))
        while True:
            frame = json.loads(ws.recv(timeout=5))
            if frame.get("type") == "pong" and frame.get("id") == msg_id:
                return True
    except ConnectionClosed:
        return False


def events(node: RunningServer, name: str) -> list[dict[str, Any]]:
    return node.audit.events(name)


def metric(node: RunningServer, name: str) -> float:
    """The sum of a metric's samples on ``GET <admin>/metrics``."""
    text = httpx.get(node.admin_url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def store_up(node: RunningServer) -> bool:
    return metric(node, "wsguard_store_up") == 1


def assert_one_outage_then_recovery(node: RunningServer) -> None:
    """The audit log shows the switch as one outage, then one recovery, in that order."""
    changes = [e["event"] for e in node.audit.events() if e["event"].startswith("store_")]
    assert changes == ["store_outage", "store_recovered"], changes


# -- Redis Cluster: a primary dies ------------------------------------------------------


def test_cluster_primary_killed_replica_promoted_nodes_recover_by_themselves(
    tmp_path: Path, start_node: Callable[..., RunningServer]
) -> None:
    with cluster_topology(tmp_path / "cluster") as topology:
        a, b = start_node(topology.uri), start_node(topology.uri)
        wait_until(lambda: subscribed(a, b), 10, "both nodes subscribed to every bucket")
        alice = [welcomed(a, "alice"), welcomed(b, "alice")]
        carol, dave = welcomed(a, "carol"), welcomed(b, "dave")
        assert attempt(a, "alice")[0] == 429  # at the limit cluster-wide
        errors_before = metric(a, "wsguard_store_errors_total")

        victim = topology.primary_of("wsguard:{conn:sub:alice}")  # the shard of her leases
        slots = topology.slots_of(victim)
        topology.kill(victim)
        statuses: list[int] = []
        up: list[float] = []
        deadline = time.monotonic() + 20
        while not any(  # handshakes on both nodes during the switch, until the promotion
            topology.slots_of(node) == slots for node in topology.primaries() if node is not victim
        ):
            assert time.monotonic() < deadline, "no replica promoted within 20 s"
            for node in (a, b):
                status, ws = attempt(node, "alice")
                assert ws is None, "admitted over the limit during the switch"
                statuses.append(status)
                up.append(metric(node, "wsguard_store_up"))
            time.sleep(0.05)
        assert set(statuses) <= {429, 503}
        assert 503 in statuses  # bans fail closed: refused while the store is down
        assert 0 in up  # /metrics shows the store down during the switch

        # each node notices the recovery by itself (renewals, subscriptions)
        for node in (a, b):
            wait_until(functools.partial(store_up, node), 20, "the store up again")
            assert_one_outage_then_recovery(node)
        assert metric(a, "wsguard_store_errors_total") > errors_before
        for ws in (*alice, carol, dave):
            assert_pong(ws, "after")  # the connections lived through the switch
        assert attempt(a, "alice")[0] == 429  # her leases are on the promoted replica
        assert attempt(b, "alice")[0] == 429
        bob = [welcomed(a, "bob"), welcomed(b, "bob")]  # nothing is locked out
        alice.pop(0).close()
        alice.append(admitted_eventually(b, "alice"))  # her freed slot is hers again
        wait_until(lambda: subscribed(a, b), 10, "subscriptions on the promoted primary")
        broadcast_arrives(carol, dave, "after the failover")
        broadcast_arrives(dave, carol, "and back")
        for ws in (*alice, *bob, carol, dave):
            ws.close()


# -- Sentinel: the primary dies, every check fails open --------------------------------


def test_sentinel_failover_fail_open_bound_then_limit_restored(
    tmp_path: Path, start_node: Callable[..., RunningServer]
) -> None:
    with sentinel_topology(tmp_path / "sentinel") as topology:
        cluster = {"on_store_error": EVERYTHING_OPEN}
        a, b = start_node(topology.uri, cluster), start_node(topology.uri, cluster)
        wait_until(lambda: subscribed(a, b), 10, "both nodes subscribed")
        before = [welcomed(a, "alice"), welcomed(b, "alice")]
        assert attempt(b, "alice")[0] == 429

        old = topology.primary()
        old.kill()
        during: list[ClientConnection] = []
        for node in (a, b):  # fail open: each node counts alice on its own state
            for _ in range(LIMIT + 2):
                status, ws = attempt(node, "alice")
                if ws is not None:
                    during.append(ws)
                else:
                    assert status == 429
            assert metric(node, "wsguard_store_up") == 0  # (all of it during the outage)
        # the documented bound: at most the limit per node over the cluster-wide limit,
        # which each node reached on its own
        assert len(during) == LIMIT * 2
        new = topology.wait_failover(old)
        assert new is not old

        for node in (a, b):
            wait_until(functools.partial(store_up, node), 20, "the store up again")
            assert_one_outage_then_recovery(node)
        # the slots granted locally went to Redis within the limit: the rest are closed
        everyone = [*before, *during]
        wait_until(
            lambda: a.connection_count() + b.connection_count() == LIMIT,
            15,
            "the connections over the limit to be closed",
        )
        assert sum(len(events(n, "connection_over_limit")) for n in (a, b)) == len(everyone) - 2
        open_now = [ws for n, ws in enumerate(everyone) if is_open(ws, f"p{n}")]
        assert len(open_now) == LIMIT
        for ws in everyone:
            if ws not in open_now:
                assert close_code(ws) == 1013
        assert attempt(a, "alice")[0] == 429 and attempt(b, "alice")[0] == 429
        bob = welcomed(b, "bob")  # nothing is locked out

        # events reach every node again: a revocation closes her connections on both
        wait_until(lambda: subscribed(a, b), 10, "subscriptions on the new primary")
        a.run_coro(store_of(a).revoke("sub", "alice", 60))
        assert all(close_code(ws) == 4003 for ws in open_now)
        assert attempt(b, "alice")[0] == 401
        assert_pong(bob, "still")
        bob.close()


# -- Redis Cluster: slots move while connections are open ------------------------------


def test_resharding_keeps_limits_revocations_and_broadcasts(
    tmp_path: Path, start_node: Callable[..., RunningServer]
) -> None:
    with cluster_topology(tmp_path / "cluster") as topology:
        a, b = start_node(topology.uri), start_node(topology.uri)
        wait_until(lambda: subscribed(a, b), 10, "both nodes subscribed to every bucket")
        alice = [welcomed(a, "alice"), welcomed(b, "alice")]
        carol, dave = welcomed(a, "carol"), welcomed(b, "dave")
        replans = [a.call(lambda: _replans(a)), b.call(lambda: _replans(b))]

        # move, one by one, the slot of alice's leases, of her revocation key and of the
        # event bucket node A publishes on; handshakes run while each is half moved
        bucket = redis_events.TAGS[a.call(lambda: store_of(a)._bucket)]
        keys = ("wsguard:{conn:sub:alice}", "wsguard:{rev:sub:alice}", "{" + bucket + "}")
        refused_midway: list[int] = []
        for key in keys:
            slot = key_slot(key.encode())
            owner = topology.owner_of_slot(slot)
            target = next(p for p in topology.primaries() if p is not owner)
            topology.move_slot(slot, target, lambda: refused_midway.append(attempt(a, "alice")[0]))
            assert topology.owner_of_slot(slot) is target
        assert refused_midway == [429, 429, 429]  # ASK-redirected, the limit still held

        # and a range of 1,100 slots or more with redis-cli (it moves a node's lowest
        # slots first), across at least one more event bucket: as far as the first bucket
        # the source still holds (the bucket moved above may have been its lowest)
        source, target = _busiest(topology)
        before = topology.slots_of(source)
        owned = sorted(before)
        first_bucket = next(i for i, slot in enumerate(owned) if slot in redis_events.BUCKET_SLOTS)
        count = max(1100, first_bucket + 1)
        topology.reshard(source, target, count)
        moved = before - topology.slots_of(source)
        assert len(moved) == count
        assert set(redis_events.BUCKET_SLOTS) & moved

        for node in (a, b):
            assert attempt(node, "alice")[0] == 429  # her leases moved with their slot
        wait_until(
            lambda: (
                a.call(lambda: _replans(a)) > replans[0]
                and b.call(lambda: _replans(b)) > replans[1]
                and subscribed(a, b)
            ),
            15,
            "both nodes to follow the moved event buckets",
        )
        broadcast_arrives(carol, dave, "after the reshard")
        broadcast_arrives(dave, carol, "and back")
        alice.pop(0).close()
        alice.append(admitted_eventually(a, "alice"))
        a.run_coro(store_of(a).revoke("sub", "alice", 60))  # published on the moved bucket
        assert [close_code(ws) for ws in alice] == [4003, 4003]
        assert attempt(b, "alice")[0] == 401  # the revocation key in its new slot
        for node in (a, b):
            assert not events(node, "store_outage")  # a reshard is not an outage
        for ws in (carol, dave):
            assert_pong(ws, "end")
            ws.close()


def _replans(node: RunningServer) -> int:
    sharded = store_of(node)._sharded
    return sharded.replans if sharded is not None else 0


def _busiest(topology: ClusterTopology) -> tuple[Any, Any]:
    """The primary with the most slots and another one."""
    primaries = sorted(topology.primaries(), key=lambda p: len(topology.slots_of(p)))
    return primaries[-1], primaries[0]


# -- over TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_tls_topologies_share_limits_revocations_and_broadcasts(
    kind: str, tmp_path: Path, start_node: Callable[..., RunningServer]
) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "cluster":
            topology: ClusterTopology | SentinelTopology = stack.enter_context(
                cluster_topology(tmp_path / kind, tls=True)
            )
        else:
            topology = stack.enter_context(sentinel_topology(tmp_path / kind, tls=True))
        assert topology.uri.startswith(f"rediss+{kind}://")
        assert topology.tls is not None
        cluster = {"tls_ca_file": str(topology.tls.ca_file)}
        a, b = start_node(topology.uri, cluster), start_node(topology.uri, cluster)
        wait_until(lambda: subscribed(a, b), 10, "both nodes subscribed over TLS")
        alice = [welcomed(a, "alice"), welcomed(b, "alice")]
        assert attempt(a, "alice")[0] == 429
        carol, dave = welcomed(a, "carol"), welcomed(b, "dave")
        broadcast_arrives(carol, dave, "over TLS")
        a.run_coro(store_of(a).revoke("sub", "alice", 60))
        assert [close_code(ws) for ws in alice] == [4003, 4003]
        assert attempt(b, "alice")[0] == 401
        for node in (a, b):
            assert not events(node, "store_outage")
        carol.close()
        dave.close()


# -- store URIs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("redis://127.0.0.1:6379/3", ("single", False, (("127.0.0.1", 6379),), "", 3)),
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            ("cluster", False, (("10.0.0.1", 7000), ("10.0.0.2", 7001)), "", 0),
        ),
        ("rediss+cluster://[::1]:7000/0", ("cluster", True, (("::1", 7000),), "", 0)),
        (
            "redis+sentinel://10.0.0.1,10.0.0.2:26380/mymaster/2",
            ("sentinel", False, (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "mymaster", 2),
        ),
        (
            "rediss+sentinel://s1:26379/mymaster",
            ("sentinel", True, (("s1", 26379),), "mymaster", 0),
        ),
    ],
)
def test_store_uris_name_their_topology(uri: str, expected: tuple[Any, ...]) -> None:
    address = parse_redis_uri(uri)
    assert (address.topology, address.tls, address.hosts, address.service, address.db) == expected
    assert validate_config({"store": uri, "auth": {"secret": SECRET}}).store == uri


def test_store_uri_credentials_are_decoded_and_never_shown() -> None:
    uri = "rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2:7000"
    address = parse_redis_uri(uri)
    assert (address.username, address.password) == ("app", "p@ss")
    assert redacted(uri) == "rediss+cluster://app:***@10.0.0.1:7000,10.0.0.2:7000"
    assert redacted("redis+sentinel://:s3cret@h:26379/svc/0") == (
        "redis+sentinel://:***@h:26379/svc/0"
    )
    # whatever the password holds, even where the URI does not parse ('[' is taken for
    # the start of an IPv6 address; '/' ends the authority early): masked, never shown
    for raw in ("redis+cluster://:s3c[ret@127.0.0.1:7000", "redis://u:s3c/ret@h:6379/0"):
        assert "s3c" not in redacted(raw) and "ret" not in redacted(raw).split("@")[0]
    # an '@' in a Sentinel service name is no password
    address = parse_redis_uri("redis+sentinel://h:26379/my@svc")
    assert (address.service, address.password) == ("my@svc", None)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("redis+shard://h:1", "expected memory://, redis://"),
        ("redis+cluster://", "needs a host"),
        ("redis+cluster://:hunter2@", "needs a host"),
        ("redis+cluster://h1:7000,,h2:7000", "expected host:port"),
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis+cluster://127.0.0.1:70000", "invalid store URI"),
        ("redis+cluster://127.0.0.1:0", "1-65535"),
        ("redis+cluster://h:7000,h:7000", "listed twice"),
        ("redis+cluster://h:7000?ssl_cert_reqs=none", "takes no ?options"),
        ("redis+sentinel://:hunter2@127.0.0.1:26379", "name the monitored service"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "must be a number"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/0/1", "/service or /service/db"),
        ("rediss+sentinel://:hunter2@h:1/svc/0#x", "no #fragment"),
        ("redis://:hunter2@h1:6379,h2:6379/0", "redis+cluster://"),
        # nothing behind the settings' back: a password there would be logged with the
        # URI, ?db= parts the keys from the events' channels, TLS checks switched off
        ("redis://127.0.0.1:6379/0?password=hunter2", "takes no ?options"),
        ("redis://127.0.0.1:6379?db=1", "takes no ?options"),
        ("rediss://:hunter2@h:6379/0?ssl_cert_reqs=none", "takes no ?options"),
        ("redis://h:6379/0?socket_timeout=abc", "takes no ?options"),
        # a password with "/" or "?" not encoded: none of it is quoted back
        ("redis://:hun/ter2@127.0.0.1:6379/0", "percent-encode"),
        ("redis://:hun?ter2@127.0.0.1:6379/0", "percent-encode"),
        ("redis://:hunter2@h:port/0", "invalid store URI"),
        ("redis+cluster://:hun[ter2@127.0.0.1:7000", "percent-encode '['"),
        ("redis://:hun]ter2@127.0.0.1:6379/0", "percent-encode '['"),
    ],
)
def test_bad_store_uris_are_refused_naming_the_store_key(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config({"store": uri, "auth": {"secret": SECRET}})
    assert raised.value.key == "store"
    assert message in raised.value.message
    assert "hunter2" not in str(raised.value)
    assert "hun" not in str(raised.value) and "ter2" not in str(raised.value)
