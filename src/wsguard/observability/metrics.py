"""Prometheus metrics of one node.

The hot path only adds to plain integers (a dict increment costs ~40 ns;
``prometheus_client.Counter.inc`` takes a lock and costs ~10x more, see the
metrics reference in docs/). ``prometheus-client`` builds the exposition from these
counts when ``/metrics`` is scraped, through a custom collector.

Every label value comes from a fixed set defined here or from the
configuration (message types, alert rule names): never a client address, a
subject or anything else a client controls. Values outside a set become
``other``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_AUTH_REASONS = (
    "missing_credentials", "malformed_credentials", "malformed_token", "invalid_token",
    "algorithm_not_allowed", "token_expired", "token_not_yet_valid", "invalid_audience",
    "invalid_issuer", "missing_claim", "bad_signature", "certificate_mismatch",
)  # fmt: skip

#: Every handshake refusal reason and the refusal category it counts under.
HANDSHAKE_REASONS: dict[str, str] = {
    **dict.fromkeys(_AUTH_REASONS, "auth"),
    "origin_forbidden": "origin",
    "banned": "ban",
    "handshake_rate": "rate",
    "server_full": "capacity",
    "too_many_connections": "capacity",
    "too_many_pending": "capacity",
    "revoked": "revoked",
    "draining": "draining",
    "store_unavailable": "store",
    "keys_unavailable": "store",  # the identity provider's keys (a remote JWKS)
    "handshake_timeout": "timeout",
    "tls_certificate": "auth",  # mTLS: a client certificate refused in the TLS handshake
    "tls_protocol": "protocol",  # a TLS handshake failed: not TLS, no common version or suite
    "forwarded_client": "other",  # the ASGI server believed X-Forwarded-For; wsguard not
    "dev_key_beyond_loopback": "other",  # ASGI: the development key, off loopback
    "app_subprotocol": "other",  # an ASGI app accepted with a subprotocol not allowed
    "policy_error": "policy",  # the policy itself failed (a bug): answered 500
    **dict.fromkeys(
        (
            "bad_request", "bad_http_version", "bad_method", "not_websocket",
            "unsupported_version", "headers_too_large", "request_line_too_long",
            "bad_handshake",
        ),
        "protocol",
    ),
}  # fmt: skip

#: Every per-message refusal code (error frame code or close cause) and its category.
MESSAGE_CODES: dict[str, str] = {
    "rate_limited": "rate",
    "too_big": "size",
    "invalid_json": "invalid_json",
    "invalid_message": "schema",
    "unknown_type": "unknown_type",
    "binary": "binary",
    "forbidden": "forbidden",
    "replayed": "replay",
    "bad_signature": "signature",
    "stale": "replay",  # outside the time window: freshness, signed or not
    "invalid_token": "auth",
    "auth_subject_mismatch": "auth",
    "revoked": "revoked",  # an in-band refresh for a revoked subject (close 4003)
    "unavailable": "store",
    "slow_consumer": "slow_consumer",
    "policy_error": "policy",  # the policy itself failed (a bug): failed closed
}

#: The ``reason`` label values of ``wsguard_refusals_total``.
REFUSAL_CATEGORIES = (
    "auth", "origin", "ban", "rate", "capacity", "protocol", "timeout", "revoked",
    "draining", "store", "size", "invalid_json", "schema", "unknown_type", "binary",
    "forbidden", "replay", "signature", "slow_consumer", "policy", "other",
)  # fmt: skip

#: Close codes reported as themselves; any other code counts as ``other``.
CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
     1015, 4001, 4003}
)  # fmt: skip
_STORE_CHECKS = (
    "bans", "connections", "rate_limits", "revocations", "nonces", "events", "health",
)  # fmt: skip
_MESSAGE_OUTCOMES = ("delivered", "refused", "closed")

#: Upper bounds (seconds) of the message handling latency histogram.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
)  # fmt: skip


class Metrics:
    """The counters of one node, and their Prometheus exposition."""

    def __init__(self, message_types: Iterable[str], rule_names: Iterable[str] = ()) -> None:
        self._types = frozenset(message_types)
        self._rules = tuple(rule_names)
        self.handshakes: dict[tuple[str, str], int] = {("admitted", "ok"): 0}
        for reason in HANDSHAKE_REASONS:
            self.handshakes["refused", reason] = 0
        self.messages: dict[tuple[str, str], int] = {
            (name, outcome): 0 for name in sorted(self._types) for outcome in _MESSAGE_OUTCOMES
        }
        self.refusals: dict[tuple[str, str], int] = {
            (stage, category): 0
            for stage in ("handshake", "message")
            for category in REFUSAL_CATEGORIES
        }
        self.closes: dict[tuple[str, str], int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self._bounds = LATENCY_BUCKETS
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.alerts: dict[str, int] = dict.fromkeys(self._rules, 0)
        self.webhook: dict[str, int] = {"ok": 0, "failed": 0, "suppressed": 0}
        self.bans_started: dict[str, int] = {"auth_failures": 0, "alert": 0, "admin": 0}
        self.admin_auth_failures = 0
        self.active_connections: Callable[[], int] = lambda: 0
        self.active_bans: Callable[[], int | None] = lambda: None
        self.store_errors: Callable[[], dict[str, int]] = dict
        self.store_up: Callable[[], bool] = lambda: True
        self.dashboards: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    # -- counting (hot path: plain integer arithmetic) ---------------------------------

    def handshake_admitted(self) -> None:
        self.handshakes["admitted", "ok"] += 1

    def handshake_refused(self, reason: str) -> str:
        """Count a refused handshake; returns its refusal category."""
        if reason not in HANDSHAKE_REASONS:
            reason = "other"
        key = ("refused", reason)
        self.handshakes[key] = self.handshakes.get(key, 0) + 1
        category = HANDSHAKE_REASONS.get(reason, "other")
        self.refusals["handshake", category] += 1
        return category

    def message_delivered(self, message_type: str) -> None:
        key = (message_type, "delivered")
        self.messages[key] = self.messages.get(key, 0) + 1

    def message_refused(self, code: str, message_type: str | None, *, closed: bool) -> str:
        """Count a refused message (an error frame, or a close when *closed*)."""
        name = message_type if message_type in self._types else "none"
        key = (name, "closed" if closed else "refused")
        self.messages[key] = self.messages.get(key, 0) + 1
        category = MESSAGE_CODES.get(code, "other")
        self.refusals["message", category] += 1
        return category

    def connection_refused(self, category: str) -> None:
        """A refusal that ends a live connection outside a message (size, slow consumer)."""
        self.refusals["message", category] += 1

    def closed(self, code: int, closed_by: str) -> None:
        key = (str(code) if code in CLOSE_CODES else "other", closed_by)
        self.closes[key] = self.closes.get(key, 0) + 1

    def latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self.latency_sum += seconds

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        gauge = GaugeMetricFamily(
            "wsguard_connections_active", "Open WebSocket connections on this node."
        )
        gauge.add_metric([], m.active_connections())
        yield gauge
        hs = CounterMetricFamily(
            "wsguard_handshakes",
            "Handshakes by outcome (admitted, refused) and refusal reason.",
            labels=["outcome", "reason"],
        )
        for (outcome, reason), value in sorted(m.handshakes.items()):
            hs.add_metric([outcome, reason], value)
        yield hs
        msgs = CounterMetricFamily(
            "wsguard_messages",
            "Messages by type (configured types; 'none' when not known) and outcome.",
            labels=["type", "outcome"],
        )
        for (name, outcome), value in sorted(m.messages.items()):
            msgs.add_metric([name, outcome], value)
        yield msgs
        refusals = CounterMetricFamily(
            "wsguard_refusals",
            "Refusals by stage (handshake, message) and reason category.",
            labels=["stage", "reason"],
        )
        for (stage, category), value in sorted(m.refusals.items()):
            refusals.add_metric([stage, category], value)
        yield refusals
        closes = CounterMetricFamily(
            "wsguard_connections_closed",
            "Closed connections by close code and by who closed first.",
            labels=["code", "closed_by"],
        )
        for (code, by), value in sorted(m.closes.items()):
            closes.add_metric([code, by], value)
        yield closes
        received = CounterMetricFamily(
            "wsguard_received_bytes",
            "Wire bytes received by the WebSocket listener (handshakes and frames).",
        )
        received.add_metric([], m.bytes_in)
        yield received
        sent = CounterMetricFamily(
            "wsguard_sent_bytes",
            "Wire bytes sent by the WebSocket listener (handshakes and frames).",
        )
        sent.add_metric([], m.bytes_out)
        yield sent
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), m.latency_counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        latency = HistogramMetricFamily(
            "wsguard_message_handling_seconds",
            "Time from a complete message to its decision and handler's end.",
        )
        latency.add_metric([], buckets, m.latency_sum)
        yield latency
        errors = CounterMetricFamily(
            "wsguard_store_errors",
            "Failed operations on the shared store, by check.",
            labels=["check"],
        )
        counts = dict.fromkeys(_STORE_CHECKS, 0)
        for check, value in m.store_errors().items():
            name = check if check in counts else "other"
            counts[name] = counts.get(name, 0) + value
        for check, value in sorted(counts.items()):
            errors.add_metric([check], value)
        yield errors
        up = GaugeMetricFamily("wsguard_store_up", "1 when the store answers, else 0.")
        up.add_metric([], 1 if m.store_up() else 0)
        yield up
        bans = m.active_bans()
        if bans is not None:
            active = GaugeMetricFamily("wsguard_bans_active", "Addresses banned now.")
            active.add_metric([], bans)
            yield active
        started = CounterMetricFamily("wsguard_bans", "Bans started, by source.", labels=["source"])
        for source, value in sorted(m.bans_started.items()):
            started.add_metric([source], value)
        yield started
        alerts = CounterMetricFamily("wsguard_alerts", "Alerts fired, by rule.", labels=["rule"])
        for rule, value in sorted(m.alerts.items()):
            alerts.add_metric([rule], value)
        yield alerts
        hooks = CounterMetricFamily(
            "wsguard_alert_webhooks",
            "Alert webhook posts by result (ok, failed after retries, suppressed by cool-down).",
            labels=["result"],
        )
        for result, value in sorted(m.webhook.items()):
            hooks.add_metric([result], value)
        yield hooks
        admin = CounterMetricFamily(
            "wsguard_admin_auth_failures", "Admin requests refused for a missing or bad credential."
        )
        admin.add_metric([], m.admin_auth_failures)
        yield admin
        dashboards = GaugeMetricFamily(
            "wsguard_dashboards_active", "Open live dashboard WebSockets."
        )
        dashboards.add_metric([], m.dashboards())
        yield dashboards
