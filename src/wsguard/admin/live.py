"""The live dashboard's WebSocket: one snapshot a second, read-only, and guarded.

The socket is held to the same rules as the users' ones, with the admin
credential: refused before the upgrade (a real HTTP status) without the
dashboard session cookie, the admin token or an admin client certificate
(401; 429 for a wrong one after repeated failures, never for the right one),
with an admin certificate whose subject ``admin.client_subjects`` does not pin
(403), from a foreign ``Origin`` (403; an allowlist of the listener's own
origin plus ``admin.origins``, and a missing Origin is refused because the
cookie is a credential), or beyond ``admin.max_dashboards`` (503). Frames from
the client are not expected: any data frame closes with 1008, anything above
4 KiB with 1009. A session that ends (logout, expiry) closes the socket with 4001.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsguard.admin.credentials import AdminCredentials
from wsguard.admin.responses import json_response
from wsguard.admin.subjects import SCOPE_KEY, rfc4514
from wsguard.core.decisions import CLOSE_CREDENTIALS_EXPIRED, CLOSE_POLICY_VIOLATION
from wsguard.core.origin import OriginPolicy, parse_origin
from wsguard.observability.metrics import REFUSAL_CATEGORIES
from wsguard.stores.base import StoreUnavailable

if TYPE_CHECKING:
    from wsguard.admin.target import AdminTarget

INTERVAL = 1.0
SEND_TIMEOUT = 5.0
BANS_EVERY = 5.0
RECENT_CONNECTIONS = 20
_AUTH_FAILURES = frozenset({"unauthorized", "certificate_forbidden"})  # audited as such


class LiveFeed:
    """Builds the dashboard's snapshots and serves its WebSocket."""

    def __init__(self, app: AdminTarget, credentials: AdminCredentials) -> None:
        self.app = app
        self.guard = app.guard
        self.monitor = app.guard.monitor
        self.credentials = credentials
        self._configured = OriginPolicy(app.config.admin.origins, allow_missing=False)
        self.limit = app.config.admin.max_dashboards
        self.open = 0
        self._previous: tuple[float, dict[str, Any]] | None = None
        self._cached: tuple[float, str, int] | None = None  # (built at, JSON, dashboards)
        self._bans: list[dict[str, Any]] = []
        self._bans_at = -BANS_EVERY
        self._lock = asyncio.Lock()
        self.monitor.metrics.dashboards = lambda: self.open

    # -- who may connect ------------------------------------------------------------------

    def origin_ok(self, conn: HTTPConnection) -> bool:
        """The request's Origin is this listener's own origin or in ``admin.origins``."""
        origin = conn.headers.get("origin")
        if origin is None:
            return False  # the cookie is a credential: a missing Origin is refused
        secure = conn.url.scheme in ("https", "wss")
        # the Host was checked against this listener's names (HostCheck) before this
        own = parse_origin(f"{'https' if secure else 'http'}://{conn.headers.get('host', '')}")
        spec = parse_origin(origin)
        if own is not None and spec is not None and own.matches(spec):
            return True
        return self._configured.check(origin, cookie_auth=True)

    def _credential_ok(self, ws: WebSocket, address: str) -> bool:
        if self.credentials.session_ok(ws.cookies.get(self.credentials.cookie_name), address):
            return True
        return self.credentials.bearer_ok(ws.headers.get("authorization"))

    async def endpoint(self, ws: WebSocket) -> None:
        address = ws.client.host if ws.client else "unknown"
        refusal = self._refusal(ws, address)
        if refusal is not None:
            status, code, message = refusal
            fields: dict[str, Any] = {}
            if code == "certificate_forbidden":
                subject = ws.scope.get(SCOPE_KEY)
                fields = {"credential": "certificate", "subject": rfc4514(subject or ())}
            self.guard.audit.emit(
                "admin_auth_failed" if code in _AUTH_FAILURES else "dashboard_refused",
                client=address,
                path="/dashboard/live",
                reason=code,
                **fields,
            )

            headers = None
            if status == 429:  # as the API's: when to try again
                wait = self.credentials.blocked_for(address)
                headers = {"Retry-After": str(max(1, math.ceil(wait)))}
            await ws.send_denial_response(
                json_response({"error": code, "message": message}, status, headers)
            )
            return
        self.open += 1  # the slot is taken before the first await: the cap holds
        reader: asyncio.Task[None] | None = None
        try:
            await ws.accept()
            session = ws.cookies.get(self.credentials.cookie_name)
            reader = asyncio.get_running_loop().create_task(self._read(ws))
            while not reader.done():
                if session and not self._still_allowed(ws, session, address):
                    await ws.close(CLOSE_CREDENTIALS_EXPIRED, "session ended")
                    break
                try:
                    await asyncio.wait_for(ws.send_text(await self.snapshot()), SEND_TIMEOUT)
                except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                    break
                await asyncio.wait({reader}, timeout=INTERVAL)
        finally:
            self.open -= 1
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    def _still_allowed(self, ws: WebSocket, session: str, address: str) -> bool:
        return (
            self.credentials.mtls
            or self.credentials.session_ok(session, address)
            or self.credentials.bearer_ok(ws.headers.get("authorization"))
        )

    def _refusal(self, ws: WebSocket, address: str) -> tuple[int, str, str] | None:
        if not self.origin_ok(ws):
            return 403, "origin_forbidden", "Origin not allowed."
        if self.credentials.mtls:
            if not self.credentials.certificate_ok(ws.scope.get(SCOPE_KEY)):
                self.monitor.metrics.admin_auth_failures += 1
                return 403, "certificate_forbidden", "Not an admin's client certificate."
        elif not self._credential_ok(ws, address):  # the right credential is never throttled
            if self.credentials.blocked_for(address) > 0:
                return 429, "too_many_failures", "Too many failed admin credentials."
            cookie = ws.cookies.get(self.credentials.cookie_name)
            if cookie or ws.headers.get("authorization"):
                self.credentials.failed(address)  # only presented credentials count
            self.monitor.metrics.admin_auth_failures += 1
            return 401, "unauthorized", "Log in first."
        if self.open >= self.limit:
            return 503, "too_many_dashboards", "Too many open dashboards."
        return None

    async def _read(self, ws: WebSocket) -> None:
        """The dashboard only listens: any data frame from the client closes it."""
        message = await ws.receive()
        if message["type"] == "websocket.receive":
            with contextlib.suppress(Exception):
                await ws.close(CLOSE_POLICY_VIOLATION, "read-only")

    # -- snapshots ------------------------------------------------------------------------

    async def snapshot(self) -> str:
        """The current snapshot (built at most once per interval for all dashboards)."""
        async with self._lock:
            now = time.monotonic()
            cached = self._cached
            if cached is not None and now - cached[0] < INTERVAL * 0.9 and cached[2] == self.open:
                return cached[1]
            data = orjson.dumps(await self.build(now)).decode()
            self._cached = (now, data, self.open)
            return data

    def _recent_connections(self, now: float) -> list[dict[str, Any]]:
        """The newest connections (who is connected), at most ``RECENT_CONNECTIONS``."""
        newest = itertools.islice(reversed(self.app.connections.values()), RECENT_CONNECTIONS)
        return [
            {
                "id": conn.id,
                "subject": conn.subject,
                "client": conn.client,
                "connected_seconds": round(now - conn.opened_at, 1),
                "messages_in": conn.state.received,
            }
            for conn in newest
        ]

    async def build(self, now: float) -> dict[str, Any]:
        metrics = self.monitor.metrics
        totals: dict[str, Any] = {
            "handshakes": sum(v for (o, _), v in metrics.handshakes.items() if o == "admitted"),
            "messages": sum(v for (_, o), v in metrics.messages.items() if o == "delivered"),
            "refusals": dict.fromkeys(REFUSAL_CATEGORIES, 0),
        }
        for (_, category), value in metrics.refusals.items():
            totals["refusals"][category] += value
        rates: dict[str, Any] = {"handshakes": 0.0, "messages": 0.0, "refusals": {}}
        if self._previous is not None:
            then, before = self._previous
            elapsed = max(now - then, 1e-3)
            rates["handshakes"] = round((totals["handshakes"] - before["handshakes"]) / elapsed, 2)
            rates["messages"] = round((totals["messages"] - before["messages"]) / elapsed, 2)
            rates["refusals"] = {
                category: round((value - before["refusals"][category]) / elapsed, 2)
                for category, value in totals["refusals"].items()
            }
        else:
            rates["refusals"] = dict.fromkeys(REFUSAL_CATEGORIES, 0.0)
        self._previous = (now, totals)
        if now - self._bans_at >= BANS_EVERY:
            self._bans_at = now
            with contextlib.suppress(StoreUnavailable):
                self._bans = [
                    {"address": key.removeprefix("addr:"), "remaining_seconds": round(left, 1)}
                    for key, left in await self.guard.store.bans(50)
                ]
        ready, reason = self.app.ready
        return {
            "type": "snapshot",
            "time": time.time(),
            "node": self.guard.node_id,
            "connections": len(self.app.connections),
            "recent_connections": self._recent_connections(now),
            "dashboards": self.open,
            "ready": ready,
            "not_ready_reason": reason,
            "store_up": metrics.store_up(),
            "totals": totals,
            "rates": rates,
            "events": self.monitor.latest_events(50),
            "alerts": list(reversed(list(self.monitor.alerts)[-20:])),
            "offenders": [
                {"address": address, "refusals": count}
                for address, count in self.monitor.offenders.top(10)
            ],
            "bans": self._bans,
        }
