"""Prometheus metrics (issue 6), end to end: real servers, real clients, real scrapes.

Every test scrapes ``GET <admin>/metrics`` with httpx before and after provoking
something (a refusal of each kind, delivered messages, closes, a Redis outage)
and checks the counters moved by exactly the expected amounts. Label values must
come from fixed sets: nothing a client sends ever becomes a label.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import (
    ADMIN_TOKEN,
    RunningServer,
    ServerFactory,
    admin_headers,
    admin_overrides,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from support.redis_process import RedisProcess
from support.wire import OP_CONT, OP_PING, OP_TEXT, frame, raw_welcomed
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.core.integrity import SESSION_KID, sign

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

POLL_INTERVAL = 0.02  # pause between two checks of a bounded poll, never a timing assumption

ACTIVE = "wsguard_connections_active"
HANDSHAKES = "wsguard_handshakes_total"
MESSAGES = "wsguard_messages_total"
REFUSALS = "wsguard_refusals_total"
CLOSED = "wsguard_connections_closed_total"
RECEIVED = "wsguard_received_bytes_total"
SENT = "wsguard_sent_bytes_total"
LATENCY_COUNT = "wsguard_message_handling_seconds_count"
LATENCY_SUM = "wsguard_message_handling_seconds_sum"
LATENCY_BUCKET = "wsguard_message_handling_seconds_bucket"
STORE_ERRORS = "wsguard_store_errors_total"
STORE_UP = "wsguard_store_up"
BANS = "wsguard_bans_total"
BANS_ACTIVE = "wsguard_bans_active"
ADMIN_FAILURES = "wsguard_admin_auth_failures_total"

#: The order in which ``moved`` reports the label values of a metric.
LABEL_ORDER: dict[str, tuple[str, ...]] = {
    HANDSHAKES: ("outcome", "reason"),
    MESSAGES: ("type", "outcome"),
    REFUSALS: ("stage", "reason"),
    CLOSED: ("code", "closed_by"),
    STORE_ERRORS: ("check",),
    BANS: ("source",),
}

# -- the fixed label sets of the spec (an oracle independent of the implementation) --------

HANDSHAKE_REASONS = frozenset(
    {
        "missing_credentials", "malformed_credentials", "malformed_token", "invalid_token",
        "algorithm_not_allowed", "token_expired", "token_not_yet_valid", "invalid_audience",
        "invalid_issuer", "missing_claim", "bad_signature", "certificate_mismatch",
        "origin_forbidden", "banned", "handshake_rate", "server_full", "too_many_connections",
        "too_many_pending", "revoked", "draining", "store_unavailable", "keys_unavailable",
        "handshake_timeout", "forwarded_client", "policy_error", "tls_certificate", "tls_protocol",
        "app_subprotocol", "dev_key_beyond_loopback",
        "bad_request", "bad_http_version", "bad_method", "not_websocket",
        "unsupported_version", "headers_too_large", "request_line_too_long", "bad_handshake",
        "other",
    }
)  # fmt: skip
REFUSAL_CATEGORIES = frozenset(
    {
        "auth", "origin", "ban", "rate", "capacity", "protocol", "timeout", "revoked",
        "draining", "store", "size", "invalid_json", "schema", "unknown_type", "binary",
        "forbidden", "replay", "signature", "slow_consumer", "policy", "other",
    }
)  # fmt: skip
CLOSE_CODES = frozenset(
    {"1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1010", "1011",
     "1012", "1013", "1014", "1015", "4001", "4003", "other"}
)  # fmt: skip
DEFAULT_RULES = frozenset(
    {
        "auth_failures_per_address",
        "auth_failures_total",
        "invalid_messages",
        "connection_spike",
        "store_outage",
    }
)
#: For each labelled wsguard metric, the values each label may take.
ALLOWED_LABELS: dict[str, dict[str, frozenset[str]]] = {
    HANDSHAKES: {
        "outcome": frozenset({"admitted", "refused"}),
        "reason": HANDSHAKE_REASONS | {"ok"},
    },
    MESSAGES: {
        "type": frozenset(DEMO_MESSAGE_TYPES) | {"none"},
        "outcome": frozenset({"delivered", "refused", "closed"}),
    },
    REFUSALS: {"stage": frozenset({"handshake", "message"}), "reason": REFUSAL_CATEGORIES},
    CLOSED: {"code": CLOSE_CODES, "closed_by": frozenset({"server", "client", "network"})},
    STORE_ERRORS: {
        "check": frozenset(
            {
                "bans",
                "connections",
                "rate_limits",
                "revocations",
                "nonces",
                "events",
                "health",
                "other",
            }
        )
    },
    BANS: {"source": frozenset({"auth_failures", "alert", "admin"})},
    "wsguard_alerts_total": {"rule": DEFAULT_RULES},
    "wsguard_alert_webhooks_total": {"result": frozenset({"ok", "failed", "suppressed"})},
}

BAD_SIGNATURE_TOKEN = make_token(
    "mallory", secret="not-the-server-secret-but-long-enough-0123456789"
)


# -- scraping ------------------------------------------------------------------------------


def metrics_response(
    server: RunningServer, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.get(f"{server.admin_url}/metrics", headers=headers, timeout=5)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = float(sample.value)
    return samples


def scrape(server: RunningServer, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of ``GET /metrics``: {(sample name, labels): value}."""
    response = metrics_response(server, headers)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; it must be exposed."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exposed"
    return samples[key]


def value_or_zero(samples: Samples, name: str, **labels: str) -> float:
    """A sample that only appears once it happened (close codes)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str) -> dict[tuple[str, ...], float]:
    """The samples of *name* that changed, by label values (in ``LABEL_ORDER``)."""
    out: dict[tuple[str, ...], float] = {}
    for key in before.keys() | after.keys():
        sample_name, labels = key
        if sample_name != name:
            continue
        change = after.get(key, 0.0) - before.get(key, 0.0)
        if change:
            as_dict = dict(labels)
            order = LABEL_ORDER.get(name, tuple(sorted(as_dict)))
            out[tuple(as_dict[label] for label in order)] = change
    return out


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value_or_zero(after, name, **labels) - value_or_zero(before, name, **labels)


def scrape_until(
    server: RunningServer,
    done: Callable[[Samples], bool],
    what: str,
    timeout: float = 5.0,
) -> Samples:
    """Scrape until *done* holds (bounded); return that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if done(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


# -- clients -------------------------------------------------------------------------------


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    out = json.loads(data)
    assert isinstance(out, dict)
    return out


def ping(ws: ClientConnection, ident: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = recv_json(ws)
    assert (pong["type"], pong["id"]) == ("pong", ident), pong


def expect_close(ws: ClientConnection, timeout: float = 5.0) -> int:
    """The next thing from the server is its close frame; return the code."""
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=timeout)
    assert info.value.rcvd is not None, "the server did not send a close frame"
    return int(info.value.rcvd.code)


def refused_status(server: RunningServer, token: str | None, **kwargs: Any) -> int:
    """A handshake that must be refused before 101; return its HTTP status."""
    try:
        ws = server.connect(token, **kwargs)
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    ws.close()
    pytest.fail(f"handshake unexpectedly admitted ({kwargs})")


@contextmanager
def never_reading_client(server: RunningServer) -> Iterator[socket.socket]:
    """An admitted raw client with a tiny receive window that never reads after 101."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(upgrade_request(token=make_token("bob")))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # byte by byte: nothing after the head is consumed
            assert chunk, f"EOF during the handshake: {head!r}"
            head += chunk
        assert status_of(head) == 101, head
        yield sock
    finally:
        sock.close()


def metrics_server(server_factory: ServerFactory, **overrides: Any) -> RunningServer:
    return server_factory({**admin_overrides(), **overrides})


def assert_handshake_deltas(
    before: Samples,
    after: Samples,
    reasons: dict[str, int],
    categories: dict[str, int],
    admitted: int = 0,
) -> None:
    expected_handshakes: dict[tuple[str, ...], float] = {
        ("refused", reason): n for reason, n in reasons.items()
    }
    if admitted:
        expected_handshakes["admitted", "ok"] = admitted
    assert moved(before, after, HANDSHAKES) == expected_handshakes
    assert moved(before, after, REFUSALS) == {
        ("handshake", category): n for category, n in categories.items()
    }
    assert moved(before, after, MESSAGES) == {}


# -- the endpoint ----------------------------------------------------------------------------


def test_metrics_are_public_by_default_and_expose_every_family(
    server_factory: ServerFactory,
) -> None:
    server = metrics_server(server_factory)
    response = metrics_response(server)  # no credential at all
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse(response.text)
    for name in (
        ACTIVE, HANDSHAKES, MESSAGES, REFUSALS, RECEIVED, SENT, LATENCY_COUNT, LATENCY_SUM,
        STORE_ERRORS, STORE_UP, BANS, BANS_ACTIVE, "wsguard_alerts_total",
        "wsguard_alert_webhooks_total", ADMIN_FAILURES, "wsguard_dashboards_active",
    ):  # fmt: skip
        assert any(sample == name for sample, _ in samples), f"{name} is not exposed"
    assert value(samples, STORE_UP) == 1
    assert value(samples, HANDSHAKES, outcome="admitted", reason="ok") == 0
    assert value(samples, LATENCY_BUCKET, le="+Inf") == value(samples, LATENCY_COUNT) == 0
    # every refusal category is exposed from zero for both stages (rate() works at once)
    for stage in ("handshake", "message"):
        for category in REFUSAL_CATEGORIES:
            assert value(samples, REFUSALS, stage=stage, reason=category) == 0


def test_metrics_need_the_admin_token_when_not_public(server_factory: ServerFactory) -> None:
    server = server_factory(admin_overrides(public_metrics=False))
    missing = metrics_response(server)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="wsguard-admin"'
    assert "wsguard_" not in missing.text
    user_jwt = metrics_response(server, {"Authorization": f"Bearer {make_token()}"})
    assert user_jwt.status_code == 401
    assert "wsguard_" not in user_jwt.text
    samples = scrape(server, admin_headers())
    assert value(samples, ADMIN_FAILURES) == 2
    assert httpx.get(f"{server.admin_url}/healthz", timeout=5).status_code == 200
    # the admin token is not accepted as a WebSocket credential on the public port
    assert refused_status(server, ADMIN_TOKEN) == 401


def test_metrics_are_not_served_on_the_websocket_port(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert response.status_code == 426
    assert "wsguard_" not in response.text
    assert "# TYPE" not in response.text
    after = scrape(server)
    assert_handshake_deltas(before, after, {"not_websocket": 1}, {"protocol": 1})


# -- handshake refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing_credentials"),
        (BAD_SIGNATURE_TOKEN, "bad_signature"),
        (make_token(ttl=-3600), "token_expired"),
    ],
    ids=["missing", "bad-signature", "expired"],
)
def test_auth_refusal_counts_its_reason_and_the_auth_category(
    server_factory: ServerFactory, token: str | None, reason: str
) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    assert status_of(raw_http(server.port, upgrade_request(token=token))) == 401
    after = scrape(server)
    assert_handshake_deltas(before, after, {reason: 1}, {"auth": 1})


def test_origin_refusal_is_counted_and_an_allowed_origin_admitted(
    server_factory: ServerFactory,
) -> None:
    server = metrics_server(server_factory, origin={"allowed": ["https://app.example.com"]})
    before = scrape(server)
    assert refused_status(server, make_token(), origin="https://evil.example.net") == 403
    with server.connect_welcomed(origin="https://app.example.com"):
        pass
    after = scrape(server)
    assert_handshake_deltas(before, after, {"origin_forbidden": 1}, {"origin": 1}, admitted=1)


def test_auth_failures_then_ban_are_counted(server_factory: ServerFactory) -> None:
    server = metrics_server(
        server_factory, limits={"auth_failures_before_ban": 2, "handshakes_per_minute": 1000}
    )
    before = scrape(server)
    assert value(before, BANS_ACTIVE) == 0
    for _ in range(2):
        assert refused_status(server, BAD_SIGNATURE_TOKEN) == 401
    assert refused_status(server, make_token()) == 429  # a valid token, but banned
    assert refused_status(server, BAD_SIGNATURE_TOKEN) == 429
    after = scrape(server)
    assert_handshake_deltas(before, after, {"bad_signature": 2, "banned": 2}, {"auth": 2, "ban": 2})
    assert moved(before, after, BANS) == {("auth_failures",): 1}
    assert value(after, BANS_ACTIVE) == 1


def test_handshake_rate_refusal_is_counted(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory, limits={"handshakes_per_minute": 2})
    before = scrape(server)
    for _ in range(2):
        with server.connect_welcomed():
            pass
    assert refused_status(server, make_token()) == 429
    after = scrape(server)
    assert_handshake_deltas(before, after, {"handshake_rate": 1}, {"rate": 1}, admitted=2)


def test_too_many_connections_is_a_capacity_refusal(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory, limits={"connections_per_address": 1})
    before = scrape(server)
    with server.connect_welcomed():
        assert refused_status(server, make_token("bob")) == 429
        after = scrape(server)
    assert_handshake_deltas(before, after, {"too_many_connections": 1}, {"capacity": 1}, admitted=1)


def test_malformed_requests_are_protocol_refusals(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    assert status_of(raw_http(server.port, b"GARBAGE\r\n\r\n")) == 400
    assert status_of(raw_http(server.port, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    assert status_of(raw_http(server.port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")) == 400
    after = scrape(server)
    assert_handshake_deltas(
        before,
        after,
        {"bad_request": 1, "bad_method": 1, "bad_http_version": 1},
        {"protocol": 3},
    )


# -- message refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "counted_as", "category"),
    [
        ('{"type": "ping", "id": ', "invalid_json", ("none", "refused"), "invalid_json"),
        (
            json.dumps({"type": "ping", "id": "s", "extra": 1}),
            "invalid_message",
            ("ping", "refused"),
            "schema",
        ),
        (
            json.dumps({"type": "zz_unknown_type_zz", "id": "u"}),
            "unknown_type",
            ("none", "refused"),
            "unknown_type",
        ),
        (
            json.dumps({"type": "command", "id": "c", "name": "reboot"}),
            "forbidden",
            ("command", "refused"),
            "forbidden",
        ),
    ],
    ids=["invalid_json", "schema", "unknown_type", "forbidden"],
)
def test_refused_message_is_counted_by_type_and_category(
    server_factory: ServerFactory,
    raw: str,
    code: str,
    counted_as: tuple[str, str],
    category: str,
) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    with server.connect_welcomed(make_token(scopes="chat")) as ws:
        ws.send(raw)
        error = recv_json(ws)
        assert (error["type"], error["code"]) == ("error", code), error
        ping(ws, "alive")  # the connection survives one refusal
        after = scrape(server)
    assert moved(before, after, REFUSALS) == {("message", category): 1}
    assert moved(before, after, MESSAGES) == {counted_as: 1, ("ping", "delivered"): 1}
    assert moved(before, after, HANDSHAKES) == {("admitted", "ok"): 1}
    assert grew(before, after, LATENCY_COUNT) == 2  # the refused message and the ping


def test_rate_limited_message_is_a_rate_refusal(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory, limits={"messages_per_minute": 1, "message_burst": 2})
    before = scrape(server)
    with server.connect_welcomed() as ws:
        ping(ws, "1")
        ping(ws, "2")
        ws.send(json.dumps({"type": "ping", "id": "3"}))
        error = recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "rate_limited"), error
        after = scrape(server)
    assert moved(before, after, REFUSALS) == {("message", "rate"): 1}
    # refused before parsing: the type is not known yet
    assert moved(before, after, MESSAGES) == {("ping", "delivered"): 2, ("none", "refused"): 1}
    assert grew(before, after, LATENCY_COUNT) == 3


def test_message_over_the_size_limit_closes_1009_counted_as_size(
    server_factory: ServerFactory,
) -> None:
    server = metrics_server(server_factory, limits={"max_message_bytes": 1024})
    before = scrape(server)
    with server.connect_welcomed() as ws:
        ws.send('{"type":"ping","id":"big"}'.ljust(1025))
        assert expect_close(ws) == 1009
    after = scrape_until(
        server,
        lambda s: grew(before, s, CLOSED, code="1009", closed_by="server") >= 1,
        "the 1009 close to be counted",
    )
    assert moved(before, after, CLOSED) == {("1009", "server"): 1}
    assert moved(before, after, REFUSALS) == {("message", "size"): 1}
    assert value(after, ACTIVE) == 0


@pytest.mark.parametrize(
    ("frames", "code", "category"),
    [
        pytest.param([frame(OP_PING, b"p")] * 200, 1008, "rate", id="ping-flood"),
        pytest.param(
            [frame(OP_TEXT, b"{", fin=False), *[frame(OP_CONT, b" ", fin=False)] * 200],
            1008,
            "rate",
            id="fragment-flood",
        ),
        pytest.param([bytes([0xC1]) + frame(OP_TEXT, b"{}")[1:]], 1002, "protocol", id="rsv1"),
        pytest.param([frame(OP_TEXT, b'{"type":"\xff"}')], 1007, "protocol", id="not-utf8"),
    ],
)
def test_frames_refused_outside_any_message_are_counted_as_refusals(
    server_factory: ServerFactory, frames: list[bytes], code: int, category: str
) -> None:
    """Floods of pings or fragments and frames the parser refuses close the connection
    as refused messages do: counted once in wsguard_refusals_total (alert rules and the
    dashboard read it), on every engine."""
    server = metrics_server(server_factory, limits={"messages_per_minute": 60, "message_burst": 20})
    before = scrape(server)
    with raw_welcomed(server) as client:
        client.send(b"".join(frames))
        assert client.read_close() == code
    after = scrape_until(
        server,
        lambda s: grew(before, s, CLOSED, code=str(code), closed_by="server") >= 1,
        f"the {code} close to be counted",
    )
    assert moved(before, after, REFUSALS) == {("message", category): 1}


def test_binary_frame_closes_1003_counted_as_binary(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    with server.connect_welcomed() as ws:
        ws.send(b'{"type":"ping","id":"b"}')
        assert expect_close(ws) == 1003
    after = scrape_until(
        server,
        lambda s: grew(before, s, CLOSED, code="1003", closed_by="server") >= 1,
        "the 1003 close to be counted",
    )
    assert moved(before, after, CLOSED) == {("1003", "server"): 1}
    assert moved(before, after, REFUSALS) == {("message", "binary"): 1}
    assert moved(before, after, MESSAGES) == {("none", "closed"): 1}


def test_replayed_and_badly_signed_messages_are_counted(server_factory: ServerFactory) -> None:
    signed_chat = {**DEMO_MESSAGE_TYPES["chat"], "signed": True}
    server = metrics_server(
        server_factory,
        messages={"types": {**DEMO_MESSAGE_TYPES, "chat": signed_chat}},
        signing={"session_keys": True, "window_seconds": 30},
    )
    before = scrape(server)
    with (
        server.connect(make_token("alice")) as alice,
        server.connect_welcomed(make_token("bob")) as bob,
    ):
        welcome = recv_json(alice)
        key = welcome["signing"]["key"]
        secret = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))

        def signed(text: str, msg_id: str, with_secret: bytes, age: int = 0) -> str:
            message = {"type": "chat", "text": text, "id": msg_id}
            return json.dumps(
                sign(
                    message,
                    kid=SESSION_KID,
                    secret=with_secret,
                    nonce=secrets.token_urlsafe(16),
                    ts=int(time.time()) - age,
                )
            )

        first = signed("once", "m1", secret)
        alice.send(first)
        assert recv_json(bob)["message"]["text"] == "once"
        alice.send(first)
        assert (recv_json(alice)["code"]) == "replayed"
        alice.send(signed("forged", "m2", bytes(32)))
        assert (recv_json(alice)["code"]) == "bad_signature"
        # outside the time window: a replay refusal (freshness), its signature being good
        alice.send(signed("old", "m3", secret, age=3600))
        assert (recv_json(alice)["code"]) == "stale"
        after = scrape(server)
    assert moved(before, after, REFUSALS) == {("message", "replay"): 2, ("message", "signature"): 1}
    messages = moved(before, after, MESSAGES)
    assert messages.pop(("chat", "delivered")) == 1
    assert sum(n for (_, outcome), n in messages.items() if outcome == "refused") == 3
    assert {outcome for _, outcome in messages} == {"refused"}


def test_slow_consumer_is_counted(server_factory: ServerFactory) -> None:
    roomy = {
        "messages_per_minute": 1_000_000,
        "message_burst": 100_000,
        "bytes_per_minute": 1_000_000_000,
        "subject_messages_per_minute": 1_000_000,
        "subject_bytes_per_minute": 1_000_000_000,
    }
    server = metrics_server(server_factory, limits={"outbound_queue": 8, **roomy})
    before = scrape(server)
    with server.connect_welcomed(make_token("alice")) as sender, never_reading_client(server):
        filler = "x" * 1990
        after = before
        for i in range(6000):
            sender.send(json.dumps({"type": "chat", "id": i, "text": f"{i:08d}{filler}"}))
            if i % 50 == 49:
                ping(sender, str(i))  # pace the sender on the server's progress
                after = scrape(server)
                if grew(before, after, REFUSALS, stage="message", reason="slow_consumer"):
                    break
        assert moved(before, after, REFUSALS) == {("message", "slow_consumer"): 1}


# -- what was admitted and delivered -----------------------------------------------------------


def test_delivered_messages_bytes_latency_and_clean_closes(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory)
    before = scrape(server)
    frames = [json.dumps({"type": "ping", "id": f"p{i}"}) for i in range(3)]
    chat = json.dumps({"type": "chat", "text": "hello"})
    with server.connect(make_token("alice")) as alice, server.connect(make_token("bob")) as bob:
        replies = [alice.recv(timeout=5), bob.recv(timeout=5)]  # the welcomes
        for raw in frames:
            alice.send(raw)
            replies.append(alice.recv(timeout=5))
        alice.send(chat)
        replies.append(bob.recv(timeout=5))
        assert json.loads(replies[-1])["type"] == "broadcast"
        during = scrape(server)
    after = scrape_until(
        server,
        lambda s: grew(before, s, CLOSED, code="1000", closed_by="client") >= 2,
        "both clean closes to be counted",
    )
    assert moved(before, during, HANDSHAKES) == {("admitted", "ok"): 2}
    assert moved(before, during, MESSAGES) == {("ping", "delivered"): 3, ("chat", "delivered"): 1}
    assert moved(before, during, REFUSALS) == {}
    assert grew(before, during, LATENCY_COUNT) == 4
    assert grew(before, during, LATENCY_BUCKET, le="+Inf") == 4
    assert value(during, LATENCY_SUM) >= value(before, LATENCY_SUM)
    # wire bytes: at least each masked client frame (2 + 4 header bytes) and each reply
    assert grew(before, during, RECEIVED) >= sum(len(f) + 6 for f in [*frames, chat])
    assert grew(before, during, SENT) >= sum(len(r) + 2 for r in replies)
    assert moved(during, after, CLOSED) == {("1000", "client"): 2}
    assert moved(during, after, REFUSALS) == {}


def test_connections_active_follows_open_and_close(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory)
    assert value(scrape(server), ACTIVE) == 0
    first = server.connect_welcomed(make_token("alice"))
    with server.connect_welcomed(make_token("bob")):
        assert value(scrape(server), ACTIVE) == 2
        first.close()
        scrape_until(server, lambda s: value(s, ACTIVE) == 1, "one connection left")
    scrape_until(server, lambda s: value(s, ACTIVE) == 0, "no connection left")


# -- label values --------------------------------------------------------------------------------


def test_no_client_controlled_label_values(server_factory: ServerFactory) -> None:
    server = metrics_server(server_factory, proxy={"trusted": ["127.0.0.0/8"]})
    before = scrape(server)
    forwarded = {"X-Forwarded-For": "198.51.100.77"}
    with server.connect_welcomed(make_token("evil-subject-xyz"), headers=forwarded) as ws:
        ws.send(json.dumps({"type": "zz_unknown_type_zz", "id": "evil-id-qq"}))
        assert recv_json(ws)["code"] == "unknown_type"
        ws.send(json.dumps({"type": "chat", "room": "evil-room-qq", "text": "evil-text-qq"}))
        ping(ws, "sync")
        ws.close(code=4999, reason="evil-close-qq")  # a close code of the client's choosing
    assert refused_status(server, make_token(), origin="https://weird-origin-qq.example") == 403
    evil_sub = make_token("evil-bad-sub-qq", secret="not-the-server-secret-but-long-enough-0123")
    assert refused_status(server, evil_sub, headers=forwarded) == 401
    request = upgrade_request("/evil-path-qq?evil-query-qq=1", headers={"User-Agent": "evil-ua-qq"})
    assert status_of(raw_http(server.port, request)) == 401
    assert status_of(raw_http(server.port, b"EVILMETHODQQ / HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    scrape_until(
        server,
        lambda s: grew(before, s, CLOSED, code="other", closed_by="client") >= 1,
        "the client's 4999 close to be counted as code other",
    )
    text = metrics_response(server).text
    for needle in (
        "evil-subject-xyz", "zz_unknown_type_zz", "evil-id-qq", "evil-room-qq", "evil-text-qq",
        "evil-close-qq", "weird-origin-qq", "evil-bad-sub-qq", "evil-path-qq", "evil-query-qq",
        "evil-ua-qq", "EVILMETHODQQ", "198.51.100.77", "127.0.0.1",
    ):  # fmt: skip
        assert needle not in text, f"{needle!r} leaked into /metrics"
    after = parse(text)
    # the attempts really happened and were counted under fixed categories
    assert moved(before, after, REFUSALS) == {
        ("message", "unknown_type"): 1,
        ("handshake", "origin"): 1,
        ("handshake", "auth"): 2,
        ("handshake", "protocol"): 1,
    }
    for (name, labels), _ in after.items():
        if not name.startswith("wsguard_"):
            continue
        family = ALLOWED_LABELS.get(name)
        for label, label_value in labels:
            if label == "le" and name == LATENCY_BUCKET:
                assert label_value == "+Inf" or float(label_value) > 0
                continue
            assert family is not None, f"{name} has unexpected labels {dict(labels)}"
            allowed = family.get(label)
            assert allowed is not None, f"{name} has an unexpected label {label!r}"
            assert label_value in allowed, f"{name}{{{label}={label_value!r}}} is not a fixed value"


# -- the shared store -----------------------------------------------------------------------------


def test_store_errors_and_store_up_follow_a_redis_outage(
    server_factory: ServerFactory, own_redis: RedisProcess
) -> None:
    server = metrics_server(server_factory, store=own_redis.uri)
    with server.connect_welcomed() as ws:
        ping(ws, "before")
    before = scrape(server)
    assert value(before, STORE_UP) == 1
    own_redis.kill()
    assert refused_status(server, make_token("erin")) == 503  # bans cannot be checked
    after = scrape_until(
        server,
        lambda s: value(s, STORE_UP) == 0 and sum(moved(before, s, STORE_ERRORS).values()) >= 1,
        "the store to be reported down with errors",
    )
    errors = moved(before, after, STORE_ERRORS)
    assert errors, "no store error counted"
    assert {check for (check,) in errors} <= ALLOWED_LABELS[STORE_ERRORS]["check"]
    assert all(n > 0 for n in errors.values())
    assert moved(before, after, HANDSHAKES) == {("refused", "store_unavailable"): 1}
    assert moved(before, after, REFUSALS) == {("handshake", "store"): 1}
