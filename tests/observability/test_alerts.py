"""Alert rules: sliding windows, cool-downs, the webhook and automatic bans.

End-to-end tests run real wsguard servers (``server_factory``) with the admin
listener on, make real refused handshakes and invalid messages with real
WebSocket clients, and receive the alert posts with a real local HTTP server
(:class:`WebhookReceiver`, a ``ThreadingHTTPServer`` on 127.0.0.1). The window
and cool-down arithmetic of :class:`AlertEngine` and the per-rule cool-down of
:class:`Webhook` are also tested directly with a fake clock, so no test waits a
real cool-down out. The webhook sender starts over after its HTTP client failed, the
default per-address auth-failure rule counts the attempts an address keeps making
through its ban, and an alert's ban made during a store outage is tried again until it
reaches every node. Nothing sleeps for timing: asynchronous effects are polled for with
a deadline.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import (
    RunningServer,
    ServerFactory,
    admin_headers,
    admin_overrides,
    close_of,
    eventually,
    make_token,
)
from support.admin import ROOMY, request, welcomed
from support.cluster import EVERY_CHECK_OPEN
from support.net import PROXY_VARIABLES
from support.redis_process import RedisProcess, writes_paused
from wsguard.config.loader import validate_config
from wsguard.config.model import AlertsConfig
from wsguard.errors import ConfigError
from wsguard.observability.alerts import Alert, AlertEngine
from wsguard.observability.webhook import Webhook

WRONG_SECRET = "a-different-secret-that-is-also-long-enough-0123456789"

#: Limits no test reaches by accident: the built-in auth-failure ban and the
#: handshake rate must not be what a test of an alert rule observes.
ROOMY_LIMITS: dict[str, Any] = {
    "auth_failures_before_ban": 1000,
    "handshakes_per_minute": 10_000,
    "connections_per_address": 100,
}

#: The default rules switched off, so only the rule under test can fire.
NO_DEFAULT_RULES: dict[str, dict[str, Any]] = {
    name: {"enabled": False}
    for name in (
        "auth_failures_per_address",
        "auth_failures_total",
        "invalid_messages",
        "connection_spike",
        "store_outage",
    )
}


# -- helpers ------------------------------------------------------------------------


class FakeClock:
    """A clock the test sets by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies posted to it.

    ``statuses`` are the answers to the next requests, in order (200 once they run
    out). With ``hold`` set, every request is recorded and then kept open until
    :meth:`release` (or 30 s), as a hung webhook endpoint would.
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.content_types: list[str | None] = []
        self.statuses: list[int] = []
        self.hold = False
        self.holding = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                with receiver._lock:
                    receiver.bodies.append(body)
                    receiver.content_types.append(self.headers.get("Content-Type"))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    hold = receiver.hold
                    if hold:
                        receiver.holding += 1
                if hold:
                    receiver._released.wait(30)
                    with receiver._lock:
                        receiver.holding -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up (its timeout) while the request was held

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        with self._lock:
            return len(self.bodies)

    def posts(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.bodies)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


def alert_server(
    server_factory: ServerFactory,
    rules: dict[str, dict[str, Any]],
    *,
    webhook_url: str = "",
    limits: dict[str, Any] | None = None,
    **alerts: Any,
) -> RunningServer:
    """A server with the admin listener, only *rules* enabled, and roomy limits."""
    return server_factory(
        {
            **admin_overrides(),
            "limits": {**ROOMY_LIMITS, **(limits or {})},
            "alerts": {
                "webhook_url": webhook_url,
                "rules": {**NO_DEFAULT_RULES, **rules},
                **alerts,
            },
        }
    )


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of GET /metrics on the admin listener."""
    response = httpx.get(server.admin_url + "/metrics", timeout=5)
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    pytest.fail(f"metric {name}{labels} not exposed")


def scrape(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of GET /metrics, fetched without the environment's proxies (0 when the
    labelled sample is not exposed yet)."""
    response = request(server, "GET", "/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def admin_get(server: RunningServer, path: str) -> dict[str, Any]:
    response = httpx.get(server.admin_url + path, headers=admin_headers(), timeout=5)
    assert response.status_code == 200, response.text
    document = response.json()
    assert isinstance(document, dict)
    return document


def audit_alerts(server: RunningServer, rule: str) -> list[dict[str, Any]]:
    return [e for e in server.audit.events("alert") if e["rule"] == rule]


def refused_status(server: RunningServer, token: str, **kwargs: Any) -> int:
    """The HTTP status of a handshake that must be refused."""
    try:
        ws = server.connect(token, **kwargs)
    except InvalidStatus as exc:
        return exc.response.status_code
    ws.close()
    pytest.fail("the handshake was admitted")


def fail_auth(server: RunningServer, times: int, source: str | None = None) -> None:
    """Make *times* handshakes with a token signed by the wrong key (401 each)."""
    kwargs: dict[str, Any] = {} if source is None else {"source_address": (source, 0)}
    for _ in range(times):
        assert refused_status(server, make_token(secret=WRONG_SECRET), **kwargs) == 401


def assert_pong(ws: ClientConnection, msg_id: int | str) -> None:
    ws.send(json.dumps({"type": "ping", "id": msg_id}))
    reply = json.loads(ws.recv(timeout=5))
    assert reply["type"] == "pong", reply
    assert reply["id"] == msg_id, reply


def alerts_config(rules: dict[str, dict[str, Any]], **alerts: Any) -> AlertsConfig:
    """A validated [alerts] section with only *rules* enabled."""
    config = validate_config({"alerts": {"rules": {**NO_DEFAULT_RULES, **rules}, **alerts}})
    return config.alerts


class Fired:
    """An AlertEngine on a fake clock that records its firings."""

    def __init__(self, rules: dict[str, dict[str, Any]], **alerts: Any) -> None:
        self.clock = FakeClock()
        self.alerts: list[Alert] = []
        self.engine = AlertEngine(
            alerts_config(rules, **alerts),
            self.alerts.append,
            clock=self.clock,
            wall_clock=lambda: 1_700_000_000.0,
        )

    def at(self, t: float, event: str, address: str | None = "203.0.113.1") -> int:
        """Observe *event* at time *t*; the number of firings it caused."""
        self.clock.now = t
        before = len(self.alerts)
        self.engine.observe(event, address)
        return len(self.alerts) - before


# -- 1. end to end: fires exactly once per cool-down, posts to a real receiver ------------


def test_auth_failure_rule_fires_once_audits_posts_counts_and_lists(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    rule = "auth_burst"
    server = alert_server(
        server_factory,
        {
            rule: {
                "events": ["auth"],
                "per": "address",
                "threshold": 3,
                "window_seconds": 60,
                "cooldown_seconds": 300,
            }
        },
        webhook_url=receiver.url,
    )
    fail_auth(server, 3)
    assert audit_alerts(server, rule) == []  # three is not more than the threshold
    assert metric(server, "wsguard_alerts_total", rule=rule) == 0

    fail_auth(server, 7)  # the 4th failure fires; the rest are within the cool-down
    fired = audit_alerts(server, rule)
    assert len(fired) == 1, fired
    assert fired[0]["events"] == ["auth"]
    assert fired[0]["per"] == "address"
    assert fired[0]["client"] == "127.0.0.1"
    assert fired[0]["count"] == 4
    assert fired[0]["window_s"] == 60

    eventually(lambda: receiver.count() >= 1, what="the alert posted to the webhook")
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        what="the webhook post counted as ok",
    )
    (post,) = receiver.posts()
    assert receiver.content_types == ["application/json"]
    assert post["type"] == "alert"
    assert post["rule"] == rule
    assert post["address"] == "127.0.0.1"
    assert post["count"] == 4
    assert post["events"] == ["auth"]
    assert post["per"] == "address"
    assert post["window_seconds"] == 60
    assert post.get("ban_seconds") is None
    assert "suppressed" not in post
    assert abs(post["time"] - time.time()) < 60

    assert metric(server, "wsguard_alerts_total", rule=rule) == 1
    listed = admin_get(server, "/alerts")
    assert [a["rule"] for a in listed["alerts"]] == [rule]
    assert listed["alerts"][0]["address"] == "127.0.0.1"
    assert listed["alerts"][0]["count"] == 4
    assert listed["rules"][rule]["threshold"] == 3
    assert listed["rules"][rule]["per"] == "address"
    events = admin_get(server, "/events?limit=200")["events"]
    assert [e["rule"] for e in events if e["kind"] == "alert"] == [rule]

    # more failures within the cool-down: no second firing, no second post
    fail_auth(server, 10)
    eventually(
        lambda: len(server.audit.events("handshake_refused")) == 20,
        what="all 20 refusals processed",
    )
    eventually(
        lambda: (
            metric(server, "wsguard_handshakes_total", outcome="refused", reason="bad_signature")
            == 20
        ),
        what="all 20 refusals counted",
    )
    assert len(audit_alerts(server, rule)) == 1
    assert metric(server, "wsguard_alerts_total", rule=rule) == 1
    assert metric(server, "wsguard_alert_webhooks_total", result="suppressed") == 0
    assert metric(server, "wsguard_alert_webhooks_total", result="failed") == 0
    assert receiver.count() == 1
    assert len(admin_get(server, "/alerts")["alerts"]) == 1
    assert server.audit.events("ban_started") == []  # no ban_seconds, no built-in ban


def test_alerts_disabled_fires_nothing(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    rule = "any_auth"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "threshold": 0}},
        webhook_url=receiver.url,
        enabled=False,
    )
    fail_auth(server, 3)
    eventually(
        lambda: len(server.audit.events("handshake_refused")) == 3, what="refusals processed"
    )
    assert server.audit.events("alert") == []
    assert admin_get(server, "/alerts") == {"alerts": [], "rules": {}}
    assert receiver.count() == 0


# -- 2. the engine: windows, cool-downs, addresses (fake clock) ----------------------------


def test_rule_fires_again_only_after_the_cooldown() -> None:
    fired = Fired(
        {
            "r": {
                "events": ["auth"],
                "per": "address",
                "threshold": 2,
                "window_seconds": 10,
                "cooldown_seconds": 30,
            }
        }
    )
    assert fired.at(0, "auth") == 0
    assert fired.at(1, "auth") == 0
    assert fired.at(2, "auth") == 1  # more than 2 within 10 s
    (alert,) = fired.alerts
    assert alert.rule == "r"
    assert alert.events == ("auth",)
    assert alert.per == "address"
    assert alert.address == "203.0.113.1"
    assert alert.count == 3
    assert alert.window_seconds == 10
    assert alert.at == 1_700_000_000.0
    # quiet until t = 32, however many events arrive
    for t in (3, 4, 5, 10, 15, 20, 25, 29, 30, 30.5, 31, 31.5, 31.9):
        assert fired.at(t, "auth") == 0, t
    # after the cool-down: more than 2 events within the window fire again
    assert fired.at(32, "auth") == 1
    assert len(fired.alerts) == 2
    for t in (33, 34, 40, 60):
        assert fired.at(t, "auth") == 0


def test_rule_needs_a_fresh_burst_after_a_quiet_cooldown() -> None:
    fired = Fired(
        {
            "r": {
                "events": ["auth"],
                "per": "address",
                "threshold": 2,
                "window_seconds": 10,
                "cooldown_seconds": 30,
            }
        }
    )
    for t in (0, 1, 2):
        fired.at(t, "auth")
    assert len(fired.alerts) == 1
    # nothing during the cool-down; afterwards a single event is not a burst
    assert fired.at(40, "auth") == 0
    assert fired.at(45, "auth") == 0
    assert fired.at(49, "auth") == 1  # 40, 45, 49: three within 10 s


def test_events_outside_the_window_do_not_count() -> None:
    fired = Fired({"r": {"events": ["auth"], "per": "total", "threshold": 2, "window_seconds": 10}})
    assert fired.at(0, "auth") == 0
    assert fired.at(5, "auth") == 0
    assert fired.at(11, "auth") == 0  # 0 fell out of the window
    assert fired.at(16, "auth") == 0  # 5 fell out
    assert fired.at(30, "auth") == 0
    assert fired.at(35, "auth") == 0
    assert fired.at(39.9, "auth") == 1  # 30, 35, 39.9
    assert fired.alerts[0].address is None


def test_only_the_rules_events_count() -> None:
    fired = Fired({"r": {"events": ["size", "binary"], "threshold": 2}})
    for event in ("auth", "schema", "connection", "store_outage", "auth"):
        assert fired.at(1, event) == 0
    assert fired.at(2, "size") == 0
    assert fired.at(3, "binary") == 0
    assert fired.at(4, "size") == 1
    assert fired.alerts[0].events == ("size", "binary")


def test_per_address_rules_count_each_address_separately() -> None:
    fired = Fired(
        {"r": {"events": ["auth"], "per": "address", "threshold": 2, "cooldown_seconds": 30}}
    )
    a, b = "198.51.100.1", "198.51.100.2"
    for t in range(4):  # interleaved: two events each, nobody over the threshold yet
        assert fired.at(t, "auth", a if t % 2 == 0 else b) == 0
    assert fired.at(4, "auth", a) == 1
    assert fired.at(5, "auth", a) == 0  # a is quiet now ...
    assert fired.at(6, "auth", b) == 1  # ... b is not
    assert [alert.address for alert in fired.alerts] == [a, b]
    assert fired.at(7, "auth", b) == 0
    assert fired.at(8, "auth", None) == 0  # no address: a per-address rule cannot count it
    assert len(fired.alerts) == 2


def test_per_total_rules_count_across_addresses() -> None:
    fired = Fired({"r": {"events": ["auth"], "per": "total", "threshold": 2}})
    assert fired.at(0, "auth", "198.51.100.1") == 0
    assert fired.at(1, "auth", "198.51.100.2") == 0
    assert fired.at(2, "auth", None) == 1
    assert fired.alerts[0].address is None
    assert fired.alerts[0].per == "total"
    assert fired.at(3, "auth", "198.51.100.3") == 0  # cool-down is for the rule as a whole
    assert fired.at(4, "auth", "198.51.100.4") == 0


def test_threshold_zero_fires_on_the_first_event() -> None:
    fired = Fired({"r": {"events": ["store_outage"], "threshold": 0, "cooldown_seconds": 60}})
    assert fired.at(0, "store_outage", None) == 1
    assert fired.alerts[0].count == 1
    assert fired.at(30, "store_outage", None) == 0
    assert fired.at(60, "store_outage", None) == 1


def test_two_rules_on_one_event_fire_independently() -> None:
    fired = Fired(
        {
            "low": {"events": ["auth"], "threshold": 1},
            "high": {"events": ["auth"], "threshold": 3},
        }
    )
    for t in range(4):
        fired.at(t, "auth")
    assert [alert.rule for alert in fired.alerts] == ["low", "high"]


def test_disabled_rules_do_not_fire() -> None:
    fired = Fired({"r": {"events": ["auth"], "threshold": 0, "enabled": False}})
    assert fired.at(0, "auth") == 0
    assert fired.engine.rules == []


def test_tracked_addresses_are_bounded() -> None:
    cap = 5
    fired = Fired(
        {"r": {"events": ["auth"], "per": "address", "threshold": 2, "window_seconds": 10}},
        max_addresses=cap,
    )
    (rule,) = fired.engine.rules
    for n in range(50):  # an attacker rotating addresses, all within one window
        fired.at(n * 0.01, "auth", f"203.0.113.{n}")
        assert len(rule.addresses) <= cap
    assert "203.0.113.49" in rule.addresses  # the newest address is tracked
    # a tracked address still fires
    fired.at(1, "auth", "203.0.113.49")
    assert fired.at(1.1, "auth", "203.0.113.49") == 1
    assert len(rule.addresses) <= cap
    # idle addresses (last event older than the window) make room first
    for n in range(50, 100):
        fired.at(100 + n, "auth", f"198.51.100.{n}")
        assert len(rule.addresses) <= cap


# -- 3. automatic ban ---------------------------------------------------------------------


def test_alert_with_ban_seconds_bans_the_address_and_closes_its_connections(
    server_factory: ServerFactory,
) -> None:
    rule = "junk"
    server = alert_server(
        server_factory,
        {
            rule: {
                "events": ["unknown_type"],
                "per": "address",
                "threshold": 2,
                "window_seconds": 60,
                "ban_seconds": 60,
            }
        },
    )
    bystander = server.connect_welcomed(make_token("bob"))
    ws = server.connect_welcomed(make_token("alice"))
    for n in range(2):
        ws.send(json.dumps({"type": "no_such_type", "id": n}))
        error = json.loads(ws.recv(timeout=5))
        assert error["type"] == "error"
        assert error["code"] == "unknown_type"
    assert audit_alerts(server, rule) == []
    ws.send(json.dumps({"type": "no_such_type", "id": 2}))  # the third one fires
    assert close_of(ws) == (1008, "banned")
    assert close_of(bystander) == (1008, "banned")  # same address: banned too

    (fired,) = audit_alerts(server, rule)
    assert fired["client"] == "127.0.0.1"
    assert fired["ban_s"] == 60
    assert fired["count"] == 3
    bans = server.audit.events("ban_started")
    assert [(b["client"], b["reason"], b["seconds"]) for b in bans] == [
        ("127.0.0.1", f"alert:{rule}", 60)
    ]
    assert refused_status(server, make_token("carol")) == 429
    assert refused_status(server, make_token("alice")) == 429

    listed = admin_get(server, "/bans")["bans"]
    assert [b["address"] for b in listed] == ["127.0.0.1"]
    assert 0 < listed[0]["remaining_seconds"] <= 60
    assert metric(server, "wsguard_bans_total", source="alert") == 1
    assert metric(server, "wsguard_bans_total", source="auth_failures") == 0
    assert metric(server, "wsguard_alerts_total", rule=rule) == 1
    (post,) = admin_get(server, "/alerts")["alerts"]
    assert post["ban_seconds"] == 60
    assert post["address"] == "127.0.0.1"


def test_auth_failure_alert_ban_refuses_the_address(server_factory: ServerFactory) -> None:
    rule = "auth_ban"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "per": "address", "threshold": 2, "ban_seconds": 120}},
    )
    fail_auth(server, 3)
    eventually(lambda: bool(server.audit.events("ban_started")), what="the alert's ban")
    (ban,) = server.audit.events("ban_started")
    assert ban["reason"] == f"alert:{rule}"
    assert ban["client"] == "127.0.0.1"
    assert refused_status(server, make_token("alice")) == 429  # even with a good token


def test_alert_without_ban_seconds_does_not_ban(server_factory: ServerFactory) -> None:
    rule = "junk"
    server = alert_server(
        server_factory,
        {rule: {"events": ["invalid_json"], "per": "address", "threshold": 1}},
    )
    ws = server.connect_welcomed()
    for _ in range(3):
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
    assert len(audit_alerts(server, rule)) == 1
    assert_pong(ws, 1)  # still open
    assert server.audit.events("ban_started") == []
    assert admin_get(server, "/bans") == {"bans": []}
    ws.close()


def guess_through_the_ban(server: RunningServer) -> list[dict[str, Any]]:
    """26 handshakes with a bad token from 127.0.0.1: 5 x 401, then 21 x 429 (banned).

    Returns the rule's firings (audit ``alert`` events), polled for.
    """
    from websockets.exceptions import InvalidStatus

    statuses: list[int] = []
    for _ in range(26):
        with pytest.raises(InvalidStatus) as info:
            server.connect(make_token(secret=WRONG_SECRET)).close()
        statuses.append(info.value.response.status_code)
    assert statuses == [401] * 5 + [429] * 21  # the default limits' handshake ban

    def fired() -> list[dict[str, Any]]:
        alerts = server.audit.events("alert")
        return [e for e in alerts if e["rule"] == "auth_failures_per_address"]

    alerts = eventually(fired, 5, "the auth_failures_per_address alert")
    assert len(alerts) == 1
    assert alerts[0]["client"] == "127.0.0.1"
    assert alerts[0]["count"] == 21
    return alerts


def test_default_auth_failure_rule_fires_with_default_limits(
    server_factory: ServerFactory,
) -> None:
    # only 5 attempts are auth refusals: the rule fires because it counts the banned ones
    server = server_factory(admin_overrides())  # default limits and alert rules
    rule = server.app.config.alerts.rules["auth_failures_per_address"]
    (alert,) = guess_through_the_ban(server)
    assert alert.get("ban_s") == (rule.ban_seconds or None)
    bans = {b["address"]: b["remaining_seconds"] for b in admin_get(server, "/bans")["bans"]}
    assert "127.0.0.1" in bans
    if not rule.ban_seconds:  # the default only alerts: the 60 s handshake ban stays
        assert bans["127.0.0.1"] <= 60
        assert [e["reason"] for e in server.audit.events("ban_started")] == ["auth_failures"]


def test_auth_failure_rule_ban_extends_the_handshake_ban(server_factory: ServerFactory) -> None:
    server = server_factory(
        {
            **admin_overrides(),
            "alerts": {"rules": {"auth_failures_per_address": {"ban_seconds": 900}}},
        }
    )
    (alert,) = guess_through_the_ban(server)
    assert alert["ban_s"] == 900

    def extended() -> list[dict[str, Any]] | None:
        bans = admin_get(server, "/bans")["bans"]
        found = [b for b in bans if b["address"] == "127.0.0.1" and b["remaining_seconds"] > 60]
        return found or None

    (ban,) = eventually(extended, 5, "the alert's 900 s ban of 127.0.0.1")
    assert ban["remaining_seconds"] <= 900
    reasons = [e["reason"] for e in server.audit.events("ban_started")]
    assert reasons == ["auth_failures", "alert:auth_failures_per_address"]


# -- 4. webhook delivery: retries, failures, never blocking the loop -------------------------


def test_webhook_retries_until_the_receiver_accepts(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    receiver.statuses = [500, 500, 200]
    rule = "any_auth"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "threshold": 0}},
        webhook_url=receiver.url,
        webhook_retries=3,
    )
    fail_auth(server, 1)
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        what="the post accepted on the third attempt",
    )
    posts = receiver.posts()
    assert len(posts) == 3  # 500, 500, 200: no fourth attempt
    assert posts[0] == posts[1] == posts[2]
    assert posts[0]["rule"] == rule
    assert metric(server, "wsguard_alert_webhooks_total", result="failed") == 0
    assert metric(server, "wsguard_alerts_total", rule=rule) == 1


def test_webhook_that_never_succeeds_gives_up_after_the_retries(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    receiver.statuses = [500] * 10
    rule = "any_auth"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "threshold": 0}},
        webhook_url=receiver.url,
        webhook_retries=1,
    )
    fail_auth(server, 1)
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="failed") == 1,
        what="the post given up",
    )
    assert receiver.count() == 2  # the attempt and one retry
    assert metric(server, "wsguard_alert_webhooks_total", result="ok") == 0
    # the alert itself is not lost: audit, metric and /alerts have it
    assert len(audit_alerts(server, rule)) == 1
    assert metric(server, "wsguard_alerts_total", rule=rule) == 1
    assert [a["rule"] for a in admin_get(server, "/alerts")["alerts"]] == [rule]


def test_unreachable_webhook_fails_without_harm(server_factory: ServerFactory) -> None:
    closed = WebhookReceiver()
    url = closed.url
    closed.close()  # nothing listens on that port any more
    rule = "any_auth"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "threshold": 0}},
        webhook_url=url,
        webhook_retries=0,
    )
    fail_auth(server, 1)
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="failed") == 1,
        what="the post to a closed port given up",
    )
    with server.connect_welcomed() as ws:
        assert_pong(ws, 1)


def test_hung_webhook_does_not_block_the_event_loop_and_times_out(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    receiver.hold = True  # the receiver keeps every request open until released
    rule = "any_auth"
    server = alert_server(
        server_factory,
        {rule: {"events": ["auth"], "threshold": 0}},
        webhook_url=receiver.url,
        webhook_timeout_seconds=1.0,
        webhook_retries=0,
    )
    ws = server.connect_welcomed()
    fail_auth(server, 1)
    eventually(lambda: receiver.holding == 1, what="the receiver holding the alert post")

    # while the post is pending, the server answers at once: pings, new handshakes,
    # refusals and the admin API all run on the loop the post must not block
    assert_pong(ws, 1)
    with server.connect_welcomed(make_token("bob")) as other:
        assert_pong(other, 2)
    fail_auth(server, 1)
    assert receiver.holding == 1  # still held: everything above ran during the post
    webhook = server.app.guard.monitor.metrics.webhook
    assert webhook["ok"] == webhook["failed"] == 0

    # the per-attempt timeout ends the post although the receiver never answers
    eventually(lambda: webhook["failed"] == 1, what="the hung post timed out")
    assert receiver.holding == 1
    assert receiver.count() == 1  # no retries configured
    assert_pong(ws, 3)
    ws.close()
    receiver.release()


def socksio_missing() -> bool:
    return importlib.util.find_spec("socksio") is None


def test_webhook_sender_starts_over_after_its_client_failed(
    server_factory: ServerFactory,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not socksio_missing():
        pytest.skip("socksio is installed: a SOCKS proxy setting does not break httpx here")
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    rule = {"events": ["auth"], "per": "address", "window_seconds": 60, "cooldown_seconds": 300}
    server = server_factory(
        {
            **admin_overrides(),
            "limits": ROOMY_LIMITS,
            "alerts": {
                "webhook_url": receiver.url,
                "webhook_retries": 0,
                "rules": {
                    **NO_DEFAULT_RULES,
                    # fires on the first auth failure of an address, then the other rule on
                    # the second (each is quiet for its cool-down afterwards)
                    "first_failure": {**rule, "threshold": 0},
                    "second_failure": {**rule, "threshold": 1},
                },
            },
        }
    )

    def fail_auth() -> None:
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as info:
            server.connect(make_token(secret=WRONG_SECRET), proxy=None).close()
        assert info.value.response.status_code == 401

    # httpx without socksio cannot create a client with a SOCKS proxy from the environment
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")
    fail_auth()
    eventually(
        lambda: scrape(server, "wsguard_alert_webhooks_total", result="failed") == 1,
        5,
        "the first alert's post counted as failed",
    )
    assert receiver.count() == 0

    monkeypatch.delenv("ALL_PROXY")
    fail_auth()
    eventually(lambda: receiver.count() == 1, 5, "the second alert posted")
    assert receiver.posts()[0]["rule"] == "second_failure"
    eventually(
        lambda: scrape(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        5,
        "the second alert's post counted as ok",
    )
    assert scrape(server, "wsguard_alert_webhooks_total", result="failed") == 1
    fired = [e["rule"] for e in server.audit.events("alert")]
    assert fired == ["first_failure", "second_failure"]


# -- 5. at most one post per rule per cool-down --------------------------------------------


def test_second_address_within_the_cooldown_fires_but_is_not_posted(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    rule = "auth_burst"
    server = alert_server(
        server_factory,
        {
            rule: {
                "events": ["auth"],
                "per": "address",
                "threshold": 1,
                "cooldown_seconds": 300,
            }
        },
        webhook_url=receiver.url,
    )
    fail_auth(server, 2, source="127.0.0.1")
    fail_auth(server, 2, source="127.0.0.2")  # loopback too, a different address
    fired = audit_alerts(server, rule)
    assert [e["client"] for e in fired] == ["127.0.0.1", "127.0.0.2"]
    assert metric(server, "wsguard_alerts_total", rule=rule) == 2
    assert metric(server, "wsguard_alert_webhooks_total", result="suppressed") == 1
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        what="the first firing posted",
    )
    (post,) = receiver.posts()
    assert post["address"] == "127.0.0.1"
    listed = admin_get(server, "/alerts")["alerts"]  # newest first, both firings
    assert [a["address"] for a in listed] == ["127.0.0.2", "127.0.0.1"]


def test_webhook_posts_once_per_rule_per_cooldown_and_reports_suppressed(
    receiver: WebhookReceiver,
) -> None:
    clock = FakeClock(1000.0)
    results: list[str] = []

    async def main() -> list[bool]:
        hook = Webhook(receiver.url, timeout=5, retries=0, clock=clock, on_result=results.append)
        accepted = [hook.submit("r", 30, {"n": 1})]
        clock.now = 1010.0
        accepted.append(hook.submit("r", 30, {"n": 2}))
        clock.now = 1029.9
        accepted.append(hook.submit("r", 30, {"n": 3}))
        accepted.append(hook.submit("other", 30, {"n": 4}))  # cool-downs are per rule
        clock.now = 1030.0
        accepted.append(hook.submit("r", 30, {"n": 5}))
        clock.now = 1040.0
        accepted.append(hook.submit("r", 30, {"n": 6}))
        await hook.close(grace=10)  # waits for the queued posts
        accepted.append(hook.submit("r", 30, {"n": 7}))  # closed: nothing more
        return accepted

    accepted = asyncio.run(main())
    assert accepted == [True, False, False, True, True, False, False]
    assert receiver.posts() == [{"n": 1}, {"n": 4}, {"n": 5, "suppressed": 2}]
    assert sorted(results) == ["ok", "ok", "ok", "suppressed", "suppressed", "suppressed"]


def test_rules_with_webhook_off_are_not_posted(
    receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    server = alert_server(
        server_factory,
        {
            "quiet": {"events": ["auth"], "threshold": 0, "webhook": False},
            "loud": {"events": ["auth"], "threshold": 1},
        },
        webhook_url=receiver.url,
    )
    fail_auth(server, 2)
    assert [e["rule"] for e in server.audit.events("alert")] == ["quiet", "loud"]
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        what="the loud rule posted",
    )
    assert [p["rule"] for p in receiver.posts()] == ["loud"]


# -- 6. configuration ---------------------------------------------------------------------


def test_default_rules_and_settings() -> None:
    alerts = validate_config({}).alerts
    assert alerts.enabled is True
    assert alerts.webhook_url == ""
    assert alerts.webhook_timeout_seconds == 5
    assert alerts.webhook_retries == 3
    assert alerts.max_addresses >= 1
    rules = alerts.rules
    assert set(rules) == {
        "auth_failures_per_address",
        "auth_failures_total",
        "invalid_messages",
        "connection_spike",
        "store_outage",
    }
    per_address = rules["auth_failures_per_address"]
    assert per_address.events == ("auth", "ban")  # keeps counting while the address is banned
    assert per_address.per == "address"
    assert (per_address.threshold, per_address.window_seconds) == (20, 60)
    assert (per_address.cooldown_seconds, per_address.ban_seconds) == (300, 0)  # alert only
    total = rules["auth_failures_total"]
    assert (total.events, total.per, total.threshold, total.window_seconds) == (
        ("auth",),
        "total",
        200,
        60,
    )
    assert total.ban_seconds == 0
    invalid = rules["invalid_messages"]
    assert set(invalid.events) == {"size", "invalid_json", "schema", "unknown_type", "binary"}
    assert (invalid.per, invalid.threshold, invalid.window_seconds) == ("total", 100, 60)
    spike = rules["connection_spike"]
    assert (spike.events, spike.per, spike.threshold) == (("connection",), "total", 3000)
    outage = rules["store_outage"]
    assert (outage.events, outage.threshold) == (("store_outage",), 0)
    for rule in rules.values():
        assert rule.enabled
        assert rule.webhook
        assert rule.cooldown_seconds > 0
        assert rule.window_seconds > 0
        assert rule.ban_seconds == 0 or rule.per == "address"


def test_overriding_a_default_rule_keeps_its_other_fields_and_new_rules_add() -> None:
    rules = validate_config(
        {
            "alerts": {
                "rules": {
                    "auth_failures_per_address": {"threshold": 3},
                    "mine": {"events": ["origin"], "threshold": 5},
                }
            }
        }
    ).alerts.rules
    changed = rules["auth_failures_per_address"]
    assert changed.threshold == 3
    assert changed.events == ("auth", "ban")
    assert changed.per == "address"
    assert (changed.window_seconds, changed.cooldown_seconds, changed.ban_seconds) == (60, 300, 0)
    assert rules["auth_failures_total"].threshold == 200  # the other defaults stay
    assert rules["store_outage"].enabled
    mine = rules["mine"]
    assert (mine.events, mine.threshold, mine.per) == (("origin",), 5, "total")
    assert mine.ban_seconds == 0


@pytest.mark.parametrize(
    ("alerts", "key"),
    [
        ({"rules": {"mine": {"events": ["nonsense"]}}}, "alerts.rules.mine.events"),
        ({"rules": {"mine": {"events": []}}}, "alerts.rules.mine.events"),
        (
            {"rules": {"mine": {"events": ["auth"], "per": "total", "ban_seconds": 60}}},
            "alerts.rules.mine.ban_seconds",
        ),
        (
            {"rules": {"auth_failures_total": {"ban_seconds": 60}}},
            "alerts.rules.auth_failures_total.ban_seconds",
        ),
        ({"rules": {"mine": {"events": ["auth"], "per": "node"}}}, "alerts.rules.mine.per"),
        (
            {"rules": {"mine": {"events": ["auth"], "threshold": -1}}},
            "alerts.rules.mine.threshold",
        ),
        (
            {"rules": {"mine": {"events": ["auth"], "cooldown_seconds": 0}}},
            "alerts.rules.mine.cooldown_seconds",
        ),
        ({"webhook_url": "ftp://x"}, "alerts.webhook_url"),
        ({"webhook_timeout_seconds": 0}, "alerts.webhook_timeout_seconds"),
        ({"webhook_retries": -1}, "alerts.webhook_retries"),
    ],
)
def test_invalid_alert_settings_name_the_key(alerts: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config({"alerts": alerts})
    assert caught.value.key == key, caught.value


def test_unknown_event_error_lists_the_allowed_events() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config({"alerts": {"rules": {"mine": {"events": ["auth", "nonsense"]}}}})
    assert caught.value.key == "alerts.rules.mine.events"
    assert "nonsense" in caught.value.message
    assert "store_outage" in caught.value.message


def test_valid_webhook_urls_are_accepted() -> None:
    for url in ("http://127.0.0.1:9/hook", "https://alerts.example/hook"):
        assert validate_config({"alerts": {"webhook_url": url}}).alerts.webhook_url == url


# -- 7. a store outage --------------------------------------------------------------------


def test_store_outage_fires_the_default_rule_once(
    own_redis: RedisProcess, receiver: WebhookReceiver, server_factory: ServerFactory
) -> None:
    server = server_factory(
        {
            **admin_overrides(),
            "store": own_redis.uri,
            "limits": ROOMY_LIMITS,
            "cluster": {"retry_seconds": 0.2},
            "alerts": {"webhook_url": receiver.url},  # the default store_outage rule
        }
    )
    with server.connect_welcomed() as ws:
        assert_pong(ws, 1)
    assert server.audit.events("alert") == []

    own_redis.kill()

    def outage_alerted() -> bool:
        try:  # handshakes make the node notice; they are refused while Redis is down
            server.connect_welcomed(make_token("probe")).close()
        except InvalidStatus as exc:
            if exc.response.status_code != 503:
                pytest.fail(f"refused with {exc.response.status_code}, expected 503")
        return bool(audit_alerts(server, "store_outage"))

    eventually(outage_alerted, what="the store_outage alert", timeout=10)
    for _ in range(5):  # the outage goes on: still one alert
        assert refused_status(server, make_token("probe")) == 503
    (fired,) = audit_alerts(server, "store_outage")
    assert fired["per"] == "total"
    assert fired["count"] == 1
    assert fired["events"] == ["store_outage"]
    assert "client" not in fired
    assert len(server.audit.events("store_outage")) == 1
    assert server.audit.events("alert") == [fired]  # no other rule fired

    eventually(lambda: receiver.count() >= 1, what="the store_outage alert posted")
    (post,) = receiver.posts()
    assert post["rule"] == "store_outage"
    assert post["address"] is None
    assert post["per"] == "total"
    assert post["events"] == ["store_outage"]
    assert metric(server, "wsguard_alerts_total", rule="store_outage") == 1
    assert metric(server, "wsguard_store_up") == 0
    assert [a["rule"] for a in admin_get(server, "/alerts")["alerts"]] == ["store_outage"]


def test_an_alert_ban_during_an_outage_reaches_every_node_once_the_store_is_back(
    server_factory: ServerFactory, own_redis: RedisProcess, clients: list[ClientConnection]
) -> None:
    cluster = {"on_store_error": EVERY_CHECK_OPEN}
    rule = {
        "events": ["connection"],
        "per": "address",
        "threshold": 0,
        "ban_seconds": 120,
        "webhook": False,
    }
    b = server_factory({**ROOMY, "store": own_redis.uri, "cluster": cluster})
    a = server_factory(
        {
            **ROOMY,
            "store": own_redis.uri,
            "cluster": cluster,
            "alerts": {"rules": {"ban_on_connect": rule}},
        }
    )
    alice, _ = welcomed(b, clients, "alice")
    with writes_paused(own_redis):
        mallory, _ = welcomed(a, clients, "mallory")  # fires the rule: ban 127.0.0.1
        failed = eventually(lambda: a.audit.events("ban_failed"), 15, "the failed ban is audited")
        assert failed[0]["reason"] == "alert:ban_on_connect"
        assert failed[0]["client"] == "127.0.0.1"
        assert failed[0]["retry_in"] > 0
        assert a.audit.events("ban_started") == []  # no ban is claimed
        assert_pong(alice, "not-yet")
    # the store answers again: the ban is tried again and closes the address on every node
    assert close_of(alice, 30) == (1008, "banned")
    assert close_of(mallory, 10) == (1008, "banned")
    started = eventually(lambda: a.audit.events("ban_started"), 5, "the ban is audited")
    assert [(e["client"], e["reason"]) for e in started] == [("127.0.0.1", "alert:ban_on_connect")]


def test_the_webhook_url_never_reaches_the_logs(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook URL is a credential (Slack's path, a token in the query, user info):
    httpx logs every request's URL at INFO; the records about this one show its scheme
    and host only."""
    secret_url = receiver.url.replace("://", "://hookuser:HOOKPASSWORD@").rstrip("/")
    secret_url += "/services/T0/B0/PATHSECRET?token=QUERYSECRET"
    results: list[str] = []

    async def main() -> None:
        hook = Webhook(
            secret_url, timeout=5, retries=1, clock=time.monotonic, on_result=results.append
        )
        receiver.statuses = [503]  # a retry: logged twice
        assert hook.submit("r", 0, {"n": 1})
        await hook.close(grace=10)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert results == ["ok"]
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("httpx")]
    assert len(logged) == 2, logged
    for secret in ("HOOKPASSWORD", "hookuser", "PATHSECRET", "QUERYSECRET", "services"):
        assert not [line for line in caplog.messages if secret in line], caplog.messages
    host = receiver.url.split("://")[1].split("/")[0]
    assert all(f"http://{host}/…" in line for line in logged), logged
    assert not logging.getLogger("httpx").filters  # removed with the sender
