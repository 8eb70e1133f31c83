"""Replay windows for unsigned message types (``[messages.types.<name>] replay = {...}``).

A type with a replay window must carry a nonce (8 to 128 unreserved characters) and a
timestamp (Unix seconds, a number). The message policy checks both and the window on
the node's clock; the store records the nonce per subject and type (and judges the
window again on its own clock). Real servers on both engines, a real redis-server for
the cluster cases, uvicorn for the ASGI middleware; the policy's own checks once more
with a fixed clock.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from conftest import (
    RunningServer,
    ServerFactory,
    close_of,
    eventually,
    make_config,
    make_token,
)
from support.asgi_server import AsgiServer, Recorder, echo_app
from support.cluster import ROOMY, wait_subscribed
from support.paths import DOCS, EXAMPLES
from support.redis_process import RedisProcess
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.loader import load_config
from wsguard.config.model import Config
from wsguard.core.decisions import Deliver, Refuse
from wsguard.core.identity import Identity
from wsguard.core.integrity import Verified, nonce_key, replay_key
from wsguard.core.messages import MessagePolicy
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.observability.audit import AuditLog

EXAMPLE = EXAMPLES / "wsguard.toml"
WINDOW = 30

_ID = DEMO_MESSAGE_TYPES["ping"]["schema"]["properties"]["id"]


def windowed_type(nonce_field: str = "nonce", timestamp_field: str = "timestamp") -> Any:
    """A type with a strict schema (its nonce and timestamp listed) and a replay window."""
    return {
        "schema": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "id": _ID,
                "item": {"type": "string", "maxLength": 32},
                nonce_field: {"type": "string"},
                timestamp_field: {"type": "number"},
            },
            "required": ["type", "item", nonce_field, timestamp_field],
            "additionalProperties": False,
        },
        "replay": {
            "nonce_field": nonce_field,
            "timestamp_field": timestamp_field,
            "window_seconds": WINDOW,
        },
    }


TYPES: dict[str, Any] = {**DEMO_MESSAGE_TYPES, "order": windowed_type(), "refund": windowed_type()}
#: room for the few dozen messages (and refusals) a test sends on one connection
ROOMY_LIMITS: dict[str, Any] = {
    "messages_per_minute": 6000,
    "message_burst": 200,
    "violation_budget": 100,
}


def overrides(**sections: Any) -> dict[str, Any]:
    return {"messages": {"types": TYPES}, "limits": ROOMY_LIMITS, **sections}


class Orders:
    """What the handlers of ``order`` and ``refund`` received, on every node of a test."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, str]] = []

    def install(self, app: App) -> None:
        def handle(conn: Any, message: dict[str, Any]) -> None:
            self.delivered.append((conn.subject, message["type"], message["nonce"]))
            conn.send({"type": "accepted", "ref": message.get("id")})

        app.on("order")(handle)
        app.on("refund")(handle)


@pytest.fixture
def orders() -> Orders:
    return Orders()


@pytest.fixture
def windowed(server_factory: ServerFactory, orders: Orders) -> RunningServer:
    """A demo server with ``order`` and ``refund``: unsigned, with a 30 s replay window."""
    return server_factory(overrides(), setup=orders.install)


def order(
    nonce: Any, msg_id: str | int = "o1", *, ts: Any = None, kind: str = "order"
) -> dict[str, Any]:
    return {
        "type": kind,
        "id": msg_id,
        "item": "book",
        "nonce": nonce,
        "timestamp": time.time() if ts is None else ts,
    }


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=5))
    assert isinstance(frame, dict)
    return frame


def send(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send *message* and return the answer to it."""
    ws.send(json.dumps(message))
    return recv_json(ws)


def accepted(ws: ClientConnection, message: dict[str, Any]) -> None:
    reply = send(ws, message)
    assert reply == {"type": "accepted", "ref": message["id"]}, reply


def refused(
    ws: ClientConnection, message: dict[str, Any], code: str, pointer: str | None = None
) -> dict[str, Any]:
    reply = send(ws, message)
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert reply["ref"] == message["id"], reply
    assert reply.get("pointer") == pointer, reply
    return reply


# -- one node ---------------------------------------------------------------------------


def test_fresh_message_is_delivered_and_its_nonce_again_is_replayed(
    windowed: RunningServer, orders: Orders
) -> None:
    with windowed.connect_welcomed(make_token("alice")) as alice:
        first = order("n-0000000001", "o1")
        accepted(alice, first)
        reply = refused(alice, first, "replayed")  # the same bytes again
        assert reply["message"] == "Message was already received."
        # the nonce is what counts: other content and a new timestamp are still a replay
        refused(
            alice, {**order("n-0000000001", "o2", ts=int(time.time())), "item": "pen"}, "replayed"
        )
        # integer and float timestamps are both seconds
        accepted(alice, order("n-0000000002", "o3", ts=int(time.time())))
        accepted(alice, order("n-0000000003", "o4", ts=time.time()))
    assert orders.delivered == [
        ("alice", "order", "n-0000000001"),
        ("alice", "order", "n-0000000002"),
        ("alice", "order", "n-0000000003"),
    ]


def test_a_windowed_message_naming_a_key_twice_is_refused(windowed: RunningServer) -> None:
    """Two nonces in one text: the one recorded is not the one a first-value parser
    reads. Refused (invalid_message), its nonces not spent."""
    message = order("n-doubled-1", "d1")
    doubled = json.dumps(message).replace('"nonce": ', '"nonce": "n-other-1", "nonce": ', 1)
    with windowed.connect_welcomed(make_token("alice")) as ws:
        ws.send(doubled)
        reply = recv_json(ws)
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid_message", "d1")
        accepted(ws, order("n-other-1", "o2"))
        accepted(ws, order("n-doubled-1", "o3"))


def test_resending_after_a_reconnect_is_replayed(windowed: RunningServer, orders: Orders) -> None:
    message = order("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "retry-1")  # a UUID
    with windowed.connect_welcomed(make_token("alice")) as alice:
        accepted(alice, message)
    # the client did not see the answer (say) and sends it again on a new connection:
    # "replayed" tells it the message was already received
    with windowed.connect_welcomed(make_token("alice")) as again:
        refused(again, message, "replayed")
    assert orders.delivered == [("alice", "order", message["nonce"])]


@pytest.mark.parametrize(
    "offset",
    [-(WINDOW + 60), WINDOW + 60, None],
    ids=["past", "future", "milliseconds"],
)
def test_timestamp_outside_the_window_is_stale(
    windowed: RunningServer, orders: Orders, offset: float | None
) -> None:
    now = time.time()
    ts = now * 1000 if offset is None else now + offset
    with windowed.connect_welcomed(make_token("alice")) as alice:
        reply = refused(alice, order("n-stale-0001", "s1", ts=ts), "stale")
        assert reply["message"] == "Message timestamp is outside the replay window."
        # a stale message spends nothing: its nonce is still fresh
        accepted(alice, order("n-stale-0001", "s2"))
    assert orders.delivered == [("alice", "order", "n-stale-0001")]


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"nonce": None}, "/nonce"),
    ({"nonce": 12345678}, "/nonce"),
    ({"nonce": ["n-0000000001"]}, "/nonce"),
    ({"nonce": "short7!"}, "/nonce"),
    ({"nonce": "a" * 7}, "/nonce"),
    ({"nonce": "a" * 129}, "/nonce"),
    ({"nonce": "has space 123"}, "/nonce"),
    ({"nonce": "slash/../etc/x"}, "/nonce"),
    ({"nonce": "colon:1234567"}, "/nonce"),
    ({"nonce": "n\u00e9-00000001"}, "/nonce"),
    ({"nonce": "line-000001\n"}, "/nonce"),
    ({"timestamp": None}, "/timestamp"),
    ({"timestamp": "1700000000"}, "/timestamp"),
    ({"timestamp": True}, "/timestamp"),
    ({"timestamp": [1700000000]}, "/timestamp"),
    ({"timestamp": {"s": 1}}, "/timestamp"),
]


def test_missing_or_malformed_fields_are_invalid_message(
    windowed: RunningServer, orders: Orders
) -> None:
    with windowed.connect_welcomed(make_token("alice")) as alice:
        for field in ("nonce", "timestamp"):
            message = order("n-missing-01", f"missing-{field}")
            del message[field]
            refused(alice, message, "invalid_message", f"/{field}")
        for n, (change, pointer) in enumerate(MALFORMED):
            message = {**order("n-malformed-01", n), **change}
            reply = refused(alice, message, "invalid_message", pointer)
            assert reply["message"] in (
                "Invalid nonce (8 to 128 letters, digits or - . _ ~).",
                "Invalid timestamp (a number: Unix time in seconds).",
            )  # never the value sent
        # the edges of the nonce's length pass
        accepted(alice, order("a" * 8, "edge-8"))
        accepted(alice, order("A-._~z" + "9" * 122, "edge-128"))
        # and the nonce refused above as malformed was never spent
        accepted(alice, order("n-malformed-01", "last"))
    assert [nonce for _, _, nonce in orders.delivered] == [
        "a" * 8,
        "A-._~z" + "9" * 122,
        "n-malformed-01",
    ]


def test_field_names_are_configurable(server_factory: ServerFactory) -> None:
    types = {**DEMO_MESSAGE_TYPES, "order": windowed_type("idempotency_key", "sent_at")}
    delivered: list[str] = []

    def setup(app: App) -> None:
        @app.on("order")
        def handle(conn: Any, message: dict[str, Any]) -> None:
            delivered.append(message["idempotency_key"])
            conn.send({"type": "accepted", "ref": message["id"]})

    server = server_factory({"messages": {"types": types}}, setup=setup)
    base = {"type": "order", "item": "book", "idempotency_key": "key-00000001"}
    with server.connect_welcomed(make_token("alice")) as alice:
        accepted(alice, {**base, "id": "k1", "sent_at": time.time()})
        refused(alice, {**base, "id": "k2", "sent_at": time.time()}, "replayed")
        refused(alice, {**base, "id": "k3", "sent_at": "now"}, "invalid_message", "/sent_at")
        no_key = {"type": "order", "item": "book", "id": "k4", "sent_at": time.time()}
        refused(alice, no_key, "invalid_message", "/idempotency_key")
    assert delivered == ["key-00000001"]  # the handler gets the fields as sent


def test_stale_and_replayed_are_violations_past_the_budget_1008(
    server_factory: ServerFactory, orders: Orders
) -> None:
    limits = {**ROOMY_LIMITS, "violation_budget": 3, "violation_decay_seconds": 3600}
    server = server_factory(overrides(limits=limits), setup=orders.install)
    with server.connect_welcomed(make_token("alice")) as alice:
        message = order("n-budget-001", "b0")
        accepted(alice, message)
        refused(alice, message, "replayed")  # 1
        refused(alice, order("n-budget-002", "b1", ts=time.time() - 3600), "stale")  # 2
        refused(alice, message, "replayed")  # 3
        alice.send(json.dumps(message))  # 4: past the budget
        assert close_of(alice) == (1008, "policy violation")
    closed = eventually(lambda: server.audit.events("connection_closed"), what="the close")
    assert closed[0]["cause"] == "replayed"
    assert orders.delivered == [("alice", "order", "n-budget-001")]


def test_nonces_are_per_subject_and_per_type(windowed: RunningServer, orders: Orders) -> None:
    with (
        windowed.connect_welcomed(make_token("alice")) as alice,
        windowed.connect_welcomed(make_token("bob")) as bob,
    ):
        nonce = "same-nonce-for-all"
        accepted(alice, order(nonce, "a1"))
        accepted(bob, order(nonce, "b1"))  # alice's nonce does not block bob's
        accepted(alice, order(nonce, "a2", kind="refund"))  # nor another type's
        refused(alice, order(nonce, "a3"), "replayed")
        refused(bob, order(nonce, "b2"), "replayed")
        refused(alice, order(nonce, "a4", kind="refund"), "replayed")
    assert orders.delivered == [
        ("alice", "order", nonce),
        ("bob", "order", nonce),
        ("alice", "refund", nonce),
    ]


def test_types_without_a_replay_window_are_unaffected(windowed: RunningServer) -> None:
    assert all(t.replay is None for t in Config().messages.types.values())  # demo types
    with (
        windowed.connect_welcomed(make_token("alice")) as alice,
        windowed.connect_welcomed(make_token("bob")) as bob,
    ):
        chat = {"type": "chat", "text": "same text", "id": "c1"}
        for _ in range(2):  # no nonce, no timestamp, repeated: delivered each time
            alice.send(json.dumps(chat))
            assert recv_json(bob) == {"type": "broadcast", "from": "alice", "message": chat}
        assert send(alice, {"type": "ping", "id": "p1"})["type"] == "pong"


# -- a cluster ------------------------------------------------------------------------


def start_cluster(
    server_factory: ServerFactory, uri: str, orders: Orders, count: int, **cluster: Any
) -> list[RunningServer]:
    config = overrides(store=uri, limits={**ROOMY, **ROOMY_LIMITS}, cluster=cluster)
    nodes = [server_factory(config, setup=orders.install) for _ in range(count)]
    wait_subscribed(uri, count)
    return nodes


def test_replay_on_another_node_is_refused(
    server_factory: ServerFactory, redis_uri: str, orders: Orders
) -> None:
    a, b = start_cluster(server_factory, redis_uri, orders, 2)
    with (
        a.connect_welcomed(make_token("alice")) as on_a,
        b.connect_welcomed(make_token("alice")) as on_b,
        b.connect_welcomed(make_token("bob")) as bob_on_b,
    ):
        message = order("n-cluster-0001", "c1")
        accepted(on_a, message)
        refused(on_b, message, "replayed")  # recorded in Redis, seen by node B
        refused(on_a, message, "replayed")
        accepted(bob_on_b, order("n-cluster-0001", "c2"))  # per subject, cluster-wide too
    assert orders.delivered == [
        ("alice", "order", "n-cluster-0001"),
        ("bob", "order", "n-cluster-0001"),
    ]


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_store_down_refuses_unavailable_unless_nonces_fail_open(
    server_factory: ServerFactory, own_redis: RedisProcess, orders: Orders, mode: str
) -> None:
    (node,) = start_cluster(
        server_factory, own_redis.uri, orders, 1, on_store_error={"nonces": mode}
    )
    with node.connect_welcomed(make_token("alice")) as alice:
        accepted(alice, order("n-before-0001", "before"))
        own_redis.kill()
        message = order("n-during-0001", "during")
        if mode == "closed":  # the default: nothing is delivered that might be a replay
            reply = refused(alice, message, "unavailable")
            assert reply["retry_after"] == 1.0
            refused(alice, message, "unavailable")  # retryable: the same answer again
            assert orders.delivered == [("alice", "order", "n-before-0001")]
        else:  # this node's own memory decides
            accepted(alice, message)
            refused(alice, message, "replayed")
            assert orders.delivered == [
                ("alice", "order", "n-before-0001"),
                ("alice", "order", "n-during-0001"),
            ]
        assert send(alice, {"type": "ping", "id": "p"})["type"] == "pong"  # still open


# -- the ASGI middleware ------------------------------------------------------------------


@pytest.fixture
def asgi_server() -> Iterator[Callable[[dict[str, Any]], AsgiServer]]:
    started: list[AsgiServer] = []

    def start(config_overrides: dict[str, Any]) -> AsgiServer:
        config = make_config(config_overrides)
        rec = Recorder()
        server = AsgiServer(
            "uvicorn-sansio", echo_app(rec), config, rec, config.limits.max_message_bytes
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_asgi_middleware_applies_the_replay_window(
    asgi_server: Callable[[dict[str, Any]], AsgiServer],
) -> None:
    server = asgi_server(overrides())
    ws, _ = server.hello(make_token("alice"))
    with ws:
        message = order("n-asgi-00001", "m1")
        raw = json.dumps(message)
        ws.send(raw)
        assert recv_json(ws) == {"type": "echo", "text": raw}  # reached the app
        refused(ws, message, "replayed")
        refused(ws, order("n-asgi-00002", "m2", ts=time.time() - 3600), "stale")
        refused(ws, order(7, "m3"), "invalid_message", "/nonce")
    assert server.rec.received == [raw]


# -- the policy with a fixed clock (no I/O) ------------------------------------------------

NOW = 1_700_000_000.0


@pytest.fixture
def policy() -> MessagePolicy:
    config = make_config(overrides())
    guard = Guard(config, audit=AuditLog(io.StringIO()))
    return MessagePolicy(config, guard.verifier, clock=lambda: NOW)


def evaluate(policy: MessagePolicy, message: dict[str, Any], subject: str = "alice") -> Any:
    state = policy.open(Identity(subject, frozenset({"chat"})), 0.0)
    return policy.evaluate(state, json.dumps(message), 0.0)


@pytest.mark.parametrize("ts", [NOW - WINDOW, NOW + WINDOW, int(NOW), NOW - 0.5])
def test_policy_accepts_the_window_edges_and_carries_the_nonce_to_record(
    policy: MessagePolicy, ts: float
) -> None:
    decision = evaluate(policy, order("n-edge-00001", ts=ts), subject="team:alice")
    assert isinstance(decision, Deliver)
    assert decision.nonce == Verified(
        nonce_key=replay_key("team:alice", "order", "n-edge-00001"),
        timestamp=float(ts),
        window=WINDOW,
    )
    assert decision.message["nonce"] == "n-edge-00001"  # the handler sees the fields


@pytest.mark.parametrize("ts", [NOW - WINDOW - 0.001, NOW + WINDOW + 0.001, 0, -NOW, 2**62])
def test_policy_refuses_past_the_window_as_stale(policy: MessagePolicy, ts: float) -> None:
    decision = evaluate(policy, order("n-edge-00001", ts=ts))
    assert isinstance(decision, Refuse)
    assert (decision.code, decision.type) == ("stale", "order")


def test_replay_keys_are_encoded_and_apart_from_signed_nonces() -> None:
    key = replay_key("a:b", "order", "n-0000000001")
    assert key == "replay:a%3Ab:order:n-0000000001"
    assert replay_key("a", "b:order", "n-0000000001") != replay_key("a:b", "order", "n-0000000001")
    assert key != nonce_key("a:b", "order", "n-0000000001")


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replay", "key", "says"),
    [
        ({"window_seconds": 0}, "messages.types.order.replay.window_seconds", "greater than 0"),
        ({"window_seconds": -5}, "messages.types.order.replay.window_seconds", "greater than 0"),
        ({"window_seconds": 3601}, "messages.types.order.replay.window_seconds", "3600"),
        ({"window_seconds": "soon"}, "messages.types.order.replay.window_seconds", "number"),
        ({"nonce_field": ""}, "messages.types.order.replay.nonce_field", "1 to 64"),
        ({"timestamp_field": ""}, "messages.types.order.replay.timestamp_field", "1 to 64"),
        ({"nonce_field": "x" * 65}, "messages.types.order.replay.nonce_field", "1 to 64"),
        ({"nonce_field": "a\nb"}, "messages.types.order.replay.nonce_field", "printable"),
        ({"nonce_field": 5}, "messages.types.order.replay.nonce_field", "string"),
        ({"nonce_field": "type"}, "messages.types.order.replay.nonce_field", "message type"),
        ({"timestamp_field": "nonce"}, "messages.types.order.replay.timestamp_field", "differ"),
        ({"windw_seconds": 5}, "messages.types.order.replay.windw_seconds", "unknown key"),
        (True, "messages.types.order.replay", "not a valid table"),
    ],
)
def test_bad_replay_settings_name_the_key(replay: Any, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"messages": {"types": {"order": {"replay": replay}}}})
    assert info.value.key == key
    assert says in info.value.message


def test_signed_types_cannot_also_have_a_replay_window() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(
            {
                "messages": {"types": {"order": {"signed": True, "replay": {}}}},
                "signing": {"session_keys": True},
            }
        )
    assert info.value.key == "messages.types.order.replay"
    assert "signed" in info.value.message


@pytest.mark.parametrize(
    ("messages", "key"),
    [
        ({"format": "opaque", "types": {"order": {"replay": {}}}}, "messages.format"),
        (
            {"types": {"auth": {**DEMO_MESSAGE_TYPES["auth"], "replay": {}}}},
            "messages.types.auth.replay",
        ),
        (
            {"types": {"auth": {**DEMO_MESSAGE_TYPES["auth"], "signed": True}}},
            "messages.types.auth.signed",
        ),
    ],
)
def test_replay_windows_only_where_messages_are_delivered_as_json(
    messages: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"messages": messages})
    assert info.value.key == key


def test_defaults_of_a_replay_table() -> None:
    replay = (
        make_config({"messages": {"types": {"order": {"replay": {}}}}})
        .messages.types["order"]
        .replay
    )
    assert replay is not None
    assert (replay.nonce_field, replay.timestamp_field, replay.window_seconds) == (
        "nonce",
        "timestamp",
        30.0,
    )


def test_docs_example_loads_and_the_example_file_shows_the_key(tmp_path: Path) -> None:
    page = DOCS / "guides" / "signing.md"
    blocks = re.findall(r"```toml\n(.*?)```", page.read_text(), re.DOTALL)
    [example] = [b for b in blocks if "replay = {" in b]
    path = tmp_path / "replay.toml"
    path.write_text(example)
    config = load_config(path, env={"WSGUARD_JWT_SECRET": "s" * 40})
    windowed_types = {n: t.replay for n, t in config.messages.types.items() if t.replay}
    assert windowed_types, example
    for replay in windowed_types.values():
        assert replay.window_seconds > 0
    assert "# replay = { nonce_field = " in EXAMPLE.read_text()
