"""The node's security monitor: where decisions become metrics, alerts and live events.

The Guard and the App report what the policy decided (a refused handshake, a
refused message, a ban, a store outage); the monitor counts it in
:class:`Metrics`, feeds the alert rules, keeps the latest security events and
the top offending addresses for the admin API and the live dashboard, and acts
on alerts (audit event, webhook, automatic ban).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from wsguard.config.model import Config
from wsguard.core.client_address import limit_key
from wsguard.extras import require
from wsguard.observability.alerts import Alert, AlertEngine
from wsguard.observability.audit import AuditLog
from wsguard.observability.metrics import Metrics
from wsguard.observability.webhook import Webhook

logger = logging.getLogger("wsguard.alerts")

BanAction = Callable[[str, float, str], Awaitable[object]]

EVENTS_KEPT = 200
ALERTS_KEPT = 100


def _newest_first(event: dict[str, Any]) -> float:
    return -float(event["time"])


class Offenders:
    """Refusals per address over the last one to two periods, with bounded memory."""

    def __init__(self, period: float = 300.0, cap: int = 10_000) -> None:
        self.period = period
        self.cap = cap
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._started = time.monotonic()

    def _rotate(self, now: float) -> None:
        if now - self._started >= self.period:
            fresh = now - self._started >= 2 * self.period
            self._previous = {} if fresh else self._current
            self._current = {}
            self._started = now

    def add(self, address: str) -> None:
        self._rotate(time.monotonic())
        current = self._current
        if address in current:
            current[address] += 1
        elif len(current) < self.cap:
            current[address] = 1

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        self._rotate(time.monotonic())
        totals = dict(self._previous)
        for address, count in self._current.items():
            totals[address] = totals.get(address, 0) + count
        return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:n]


class Monitor:
    """Metrics, alerts and the live security event feed of one node."""

    def __init__(self, config: Config, audit: AuditLog, message_types: list[str]) -> None:
        self.config = config
        self.audit = audit
        alerts = config.alerts
        self.metrics = Metrics(message_types, alerts.rules if alerts.enabled else ())
        # refusals and the rarer events (bans, alerts, outages) are kept apart, so a flood
        # of cheap refusals cannot push a ban or an alert out of view
        self.refusals: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.notable: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=ALERTS_KEPT)
        self.offenders = Offenders()
        self.engine = AlertEngine(alerts, self._fired, clock=time.monotonic, wall_clock=time.time)
        self.webhook: Webhook | None = None
        if alerts.enabled and alerts.webhook_url:
            require("webhook", "the alert webhook", key="alerts.webhook_url")  # httpx
            self.webhook = Webhook(
                alerts.webhook_url,
                timeout=alerts.webhook_timeout_seconds,
                retries=alerts.webhook_retries,
                clock=time.monotonic,
                on_result=self._webhook_result,
            )
        self.ban_action: BanAction | None = None
        self._prefix = config.limits.ipv6_prefix_length
        self._tasks: set[asyncio.Task[object]] = set()

    # -- what the policy decided -------------------------------------------------------

    def handshake_admitted(self, client: str) -> None:
        self.metrics.handshake_admitted()
        self.engine.observe("connection", self._key(client))

    def handshake_refused(self, reason: str, client: str | None, status: int | None) -> None:
        category = self.metrics.handshake_refused(reason)
        key = self._key(client)
        self.engine.observe(category, key)
        if key is not None:
            self.offenders.add(key)
        if reason != "banned":  # a ban is one event (ban_started), not one per attempt
            self._event("refusal", stage="handshake", reason=category, code=reason,
                        status=status, client=client)  # fmt: skip

    def message_refused(
        self, code: str, message_type: str | None, client: str, *, closed: bool
    ) -> None:
        category = self.metrics.message_refused(code, message_type, closed=closed)
        self._connection_refusal(category, code, client, closed=closed)

    def connection_refused(self, category: str, code: str, client: str) -> None:
        """A live connection refused outside a message decision (too big, slow consumer)."""
        self.metrics.connection_refused(category)
        self._connection_refusal(category, code, client, closed=True)

    def _connection_refusal(self, category: str, code: str, client: str, *, closed: bool) -> None:
        key = self._key(client)
        self.engine.observe(category, key)
        if key is not None:
            self.offenders.add(key)
        self._event("refusal", stage="message", reason=category, code=code, client=client,
                    closed=closed)  # fmt: skip

    def connection_closed(self, code: int, closed_by: str) -> None:
        self.metrics.closed(code, closed_by)

    def ban_started(self, client: str, seconds: float, source: str, reason: str) -> None:
        self.metrics.bans_started[source] = self.metrics.bans_started.get(source, 0) + 1
        self._event("ban", client=client, seconds=round(seconds, 3), source=source, reason=reason)

    def ban_lifted(self, client: str) -> None:
        self._event("unban", client=client, source="admin")

    def store_outage(self, detail: str) -> None:
        self.engine.observe("store_outage")
        self._event("store_outage", detail=detail)

    def store_recovered(self) -> None:
        self._event("store_recovered")

    # -- alerts ------------------------------------------------------------------------

    def _fired(self, alert: Alert) -> None:
        self.metrics.alerts[alert.rule] = self.metrics.alerts.get(alert.rule, 0) + 1
        document: dict[str, Any] = {
            "type": "alert",
            "rule": alert.rule,
            "events": list(alert.events),
            "per": alert.per,
            "address": alert.address,
            "count": alert.count,
            "window_seconds": alert.window_seconds,
            "ban_seconds": alert.ban_seconds or None,
            "time": alert.at,
        }
        self.audit.emit(
            "alert",
            rule=alert.rule,
            events=list(alert.events),
            per=alert.per,
            client=alert.address,
            count=alert.count,
            window_s=alert.window_seconds,
            ban_s=alert.ban_seconds or None,
        )
        self.alerts.append(document)
        self._event("alert", rule=alert.rule, client=alert.address, count=alert.count)
        rule = self.config.alerts.rules[alert.rule]
        if self.webhook is not None and rule.webhook:
            self.webhook.submit(alert.rule, rule.cooldown_seconds, document)
        if alert.ban_seconds and alert.address and self.ban_action is not None:
            self._spawn(self.ban_action(alert.address, alert.ban_seconds, "alert:" + alert.rule))

    def _webhook_result(self, result: str) -> None:
        self.metrics.webhook[result] = self.metrics.webhook.get(result, 0) + 1

    # -- plumbing ----------------------------------------------------------------------

    def _key(self, client: str | None) -> str | None:
        if not client or client == "unknown":
            return None
        return limit_key(client, self._prefix)

    def _event(self, kind: str, **fields: Any) -> None:
        event = {"time": time.time(), "kind": kind}
        event.update((k, v) for k, v in fields.items() if v is not None)
        (self.refusals if kind == "refusal" else self.notable).append(event)

    def latest_events(self, limit: int) -> list[dict[str, Any]]:
        """The latest security events, newest first (refusals and the rest merged)."""
        merged = heapq.merge(reversed(self.refusals), reversed(self.notable), key=_newest_first)
        return list(itertools.islice(merged, limit))

    def _spawn(self, coro: Coroutine[Any, Any, object] | Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                logger.exception("alert action failed")

        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let alert actions finish (bounded), then stop; the store closes after this."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.webhook is not None:
            await self.webhook.close()
