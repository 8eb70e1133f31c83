"""The admin API: JSON over HTTP on the admin listener (a Starlette application).

Public: ``GET /healthz``, ``GET /readyz`` and, unless ``admin.public_metrics``
is false, ``GET /metrics``. Everything else needs the admin credential: the
admin token as ``Authorization: Bearer`` (or an admin client certificate when
``admin.tls.client_ca_file`` is set, of a subject ``admin.client_subjects`` pins
when it pins any: 403 otherwise). The dashboard's session cookie opens the
dashboard page and its WebSocket only. Errors are ``{"error": code, "message"}``
with a stable code.

Operator actions that act on every node (disconnect, revoke, ban, unban) are
answered with success only when the shared store carried them: when it cannot be
reached, or a check fell back to this node's own state, the answer is 503
``store_unavailable`` with ``Retry-After`` and the failure is audited
(``admin_action_failed``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wsguard.admin.credentials import AdminCredentials
from wsguard.admin.responses import json_response
from wsguard.admin.subjects import SCOPE_KEY, rfc4514
from wsguard.observability.metrics import CONTENT_TYPE
from wsguard.stores.base import StoreUnavailable

if TYPE_CHECKING:
    from wsguard.admin.live import LiveFeed
    from wsguard.admin.target import AdminTarget

T = TypeVar("T")

MAX_BODY = 16 * 1024
MAX_PAGE = 1000
_ID_CHARS = frozenset("0123456789abcdef")
_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
}
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _error(exc: ApiError) -> Response:
    return json_response({"error": exc.code, "message": exc.message}, exc.status, exc.headers)


class SecurityHeaders:
    """Adds the security headers to every HTTP response of the admin listener."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            # an HTTP answer, or the HTTP refusal of a dashboard WebSocket
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                names = {name for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    header for header in SECURITY_HEADERS if header[0] not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostCheck:
    """Refuses requests whose ``Host`` is not a name of this listener (DNS rebinding).

    On a loopback listener the accepted names are the loopback ones; elsewhere the
    bind address and ``admin.hosts``. With a wildcard bind and no ``admin.hosts``
    every name is accepted. Hosts of ``admin.origins`` are always accepted.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = json_response(
            {"error": "bad_host", "message": "Unknown Host for this listener."}, 421
        )
        await response(scope, receive, send)


def host_name(host: str) -> str:
    """The host part of a ``Host`` header, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(
    bind: str, hosts: tuple[str, ...], origins: tuple[str, ...]
) -> frozenset[str] | None:
    """The ``Host`` names an admin listener bound to *bind* answers (None: any)."""
    from wsguard.core.client_address import is_loopback_host
    from wsguard.core.origin import parse_allowed_origin

    names = {host_name(h) for h in hosts}
    names |= {parse_allowed_origin(o).host for o in origins}
    if is_loopback_host(bind):
        return frozenset(names | {"127.0.0.1", "localhost", "::1", host_name(bind)})
    if bind in ("0.0.0.0", "::", "") and not hosts:
        return None
    return frozenset(names | {host_name(bind), "127.0.0.1", "localhost", "::1"})


class AdminApi:
    """Builds the admin Starlette application for one App."""

    def __init__(self, app: AdminTarget, credentials: AdminCredentials, live: LiveFeed) -> None:
        self.app = app
        self.guard = app.guard
        self.credentials = credentials
        self.live = live
        self.config = app.config.admin

    def asgi(self) -> ASGIApp:
        routes = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            Route("/connections", self.connections),
            Route("/connections/{connection_id}", self.connection, methods=["GET", "DELETE"]),
            Route("/disconnect", self.disconnect, methods=["POST"]),
            Route("/revoke", self.revoke, methods=["POST"]),
            Route("/bans", self.bans, methods=["GET", "POST"]),
            Route("/bans/{address:path}", self.unban, methods=["DELETE"]),
            Route("/alerts", self.alerts),
            Route("/events", self.events),
            Route("/", self.root),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/dashboard", self.dashboard),
            Route("/static/{name}", self.static),
            WebSocketRoute("/dashboard/live", self.live.endpoint),
        ]
        wrapped = [self._wrap(r) if isinstance(r, Route) else r for r in routes]
        starlette = Starlette(
            routes=wrapped,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )
        config = self.config
        hosts = allowed_hosts(config.host, config.hosts, config.origins)
        return SecurityHeaders(HostCheck(starlette, hosts))

    @staticmethod
    def _wrap(route: Route) -> Route:
        endpoint = route.endpoint

        async def guarded(request: Request) -> Response:
            try:
                return await endpoint(request)  # type: ignore[no-any-return]
            except ApiError as exc:
                return _error(exc)

        return Route(route.path, guarded, methods=sorted(route.methods or ()), name=route.name)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return json_response(
            {"error": codes.get(exc.status_code, "bad_request"), "message": str(exc.detail)},
            exc.status_code,
            dict(exc.headers or {}),
        )

    # -- credentials ----------------------------------------------------------------------

    def _address(self, request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def _not_locked_out(self, address: str) -> None:
        wait = self.credentials.blocked_for(address)
        if wait > 0:
            raise ApiError(
                429,
                "too_many_failures",
                "Too many failed admin credentials.",
                {"Retry-After": str(math.ceil(wait))},
            )

    def _authorize(self, request: Request) -> None:
        """Admit the admin credential; 401 (or 429 after repeated failures) otherwise.

        The token is checked first: the right one is never refused by the failure
        throttle (wrong tokens sent from the operator's address cannot lock it out).
        """
        address = self._address(request)
        if self.credentials.mtls:
            self.certificate_allowed(request, address)
            return
        authorization = request.headers.get("authorization")
        if self.credentials.bearer_ok(authorization):
            return
        self._credential_refused(
            address,
            request.scope.get("route_path") or _route_of(request),
            presented=bool(authorization),
        )
        raise ApiError(
            401,
            "unauthorized",
            "The admin credential is missing or wrong.",
            {"WWW-Authenticate": 'Bearer realm="wsguard-admin"'},
        )

    def _credential_refused(self, address: str, path: str, *, presented: bool) -> None:
        """A wrong or missing credential: counted, every one (throttled or not, so that
        guessing shows in the metric at its real rate); 429 while *address* is locked
        out; else audited, and counted towards the lock-out when one was presented (any
        local process or web page can send none). The lock-out itself is audited once,
        when it starts (``admin_lockout``)."""
        self.guard.monitor.metrics.admin_auth_failures += 1
        self._not_locked_out(address)
        if presented:
            self.credentials.failed(address)
        self.guard.audit.emit(
            "admin_auth_failed",
            client=address,
            path=path,
            credential="bad" if presented else "missing",
        )
        wait = self.credentials.blocked_for(address)
        if presented and wait > 0:
            self.guard.audit.emit("admin_lockout", client=address, seconds=math.ceil(wait))

    def certificate_allowed(self, conn: HTTPConnection, address: str) -> None:
        """The TLS layer verified an admin CA's certificate: 403 unless its subject is
        one ``admin.client_subjects`` pins (any, when it pins none)."""
        subject = conn.scope.get(SCOPE_KEY)
        if self.credentials.certificate_ok(subject):
            return
        self.guard.monitor.metrics.admin_auth_failures += 1
        self.guard.audit.emit(
            "admin_auth_failed",
            client=address,
            path=_route_of(conn),
            credential="certificate",
            subject=rfc4514(subject) if subject else None,
        )
        raise ApiError(
            403,
            "certificate_forbidden",
            "This client certificate is not an admin's (admin.client_subjects).",
        )

    def session_ok(self, request: Request) -> bool:
        cookie = request.cookies.get(self.credentials.cookie_name)
        return self.credentials.session_ok(cookie, self._address(request))

    async def _body(self, request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "Send application/json.")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise ApiError(413, "too_large", f"The body is limited to {MAX_BODY} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, "too_large", f"The body is limited to {MAX_BODY} bytes.")
            chunks.append(chunk)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "The body must be a JSON object.")
        return body

    # -- health ---------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok", "node": self.guard.node_id})

    async def readyz(self, request: Request) -> Response:
        ready, reason = self.app.ready
        if ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "reason": reason}, 503)

    async def metrics(self, request: Request) -> Response:
        if not self.config.public_metrics:
            self._authorize(request)
        return Response(self.guard.monitor.metrics.render(), media_type=CONTENT_TYPE)

    # -- connections ----------------------------------------------------------------------

    async def connections(self, request: Request) -> Response:
        self._authorize(request)
        query = request.query_params
        limit = _int_param(query.get("limit"), "limit", default=100, low=1, high=MAX_PAGE)
        after = query.get("after") or ""
        subject = query.get("subject")
        address = query.get("address")
        address_key: str | None = None
        if address is not None:
            try:
                address_key = self.guard.address_key(address)
            except ValueError:
                raise ApiError(400, "invalid_address", "address is not an IP address.") from None
        matching = []
        for conn in self.app.connections.values():
            if subject is not None and conn.subject != subject:
                continue
            if address_key is not None and (
                conn.client != address and self.guard.address_key(conn.client) != address_key
            ):
                continue
            matching.append(conn)
        matching.sort(key=lambda c: c.id)
        page = [c for c in matching if c.id > after][:limit]
        more = len(page) == limit and page and page[-1].id != matching[-1].id
        return json_response(
            {
                "connections": [self._describe(c) for c in page],
                "total": len(matching),
                "next": page[-1].id if more else None,
            }
        )

    async def connection(self, request: Request) -> Response:
        """``GET``: one connection of this node; ``DELETE``: disconnect it (any node)."""
        self._authorize(request)
        connection_id = request.path_params["connection_id"]
        if request.method == "DELETE":
            return await self._disconnect(request, "connection_id", connection_id)
        conn = self.app.connections.get(connection_id)
        if conn is None:
            raise ApiError(404, "not_found", "No such connection on this node.")
        return json_response(self._describe(conn))

    def _describe(self, conn: Any) -> dict[str, Any]:
        identity = conn.identity
        return {
            "id": conn.id,
            "subject": conn.subject,
            "client": conn.client,
            "origin": conn.origin,
            "subprotocol": conn.subprotocol,
            "scopes": sorted(identity.scopes),
            "token_id": identity.token_id,
            "auth": identity.method,
            "expires_at": identity.expires_at,
            "connected_seconds": round(time.monotonic() - conn.opened_at, 3),
            "messages_in": conn.state.received,
            "messages_out": conn.sent,
        }

    async def disconnect(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        field, value = _one_of(body, ("connection_id", "subject"))
        return await self._disconnect(request, field, value)

    async def _disconnect(self, request: Request, field: str, value: str) -> Response:
        if field == "connection_id" and (len(value) > 64 or not set(value) <= _ID_CHARS):
            raise ApiError(404, "not_found", "No such connection.")
        kind = "id" if field == "connection_id" else "sub"
        local = sum(
            1
            for c in self.app.connections.values()
            if (c.id if kind == "id" else c.subject) == value and not c.closing
        )
        await self._act(request, "disconnect", kind, self.guard.disconnect(kind, value, "admin"))
        self.guard.audit.emit(
            "admin_action",
            action="disconnect",
            target=kind,
            value=value,
            client=self._address(request),
        )
        return json_response({"disconnected": {field: value}, "local_connections": local})

    async def revoke(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        field, value = _one_of(body, ("jti", "subject"))
        ttl = _seconds(body, "ttl_seconds", self.app.config.revocation_seconds)
        kind = "jti" if field == "jti" else "sub"
        await self._act(request, "revoke", field, self.app.revoke(kind, value, ttl))
        self.guard.audit.emit(
            "admin_action",
            action="revoke",
            target=field,
            value=value,
            client=self._address(request),
        )
        return json_response({"revoked": {field: value}, "ttl_seconds": ttl})

    # -- bans -----------------------------------------------------------------------------

    async def bans(self, request: Request) -> Response:
        self._authorize(request)
        if request.method == "GET":
            limit = _int_param(
                request.query_params.get("limit"), "limit", default=100, low=1, high=MAX_PAGE
            )
            found = await self._cluster(self.guard.store.bans(limit))
            return json_response(
                {
                    "bans": [
                        {"address": key.removeprefix("addr:"), "remaining_seconds": round(s, 3)}
                        for key, s in found
                        if key.startswith("addr:")
                    ]
                }
            )
        body = await self._body(request)
        address = body.get("address")
        if not isinstance(address, str):
            raise ApiError(400, "invalid_address", "address must be an IP address.")
        seconds = _seconds(body, "seconds", self.app.config.limits.ban_seconds)
        try:
            key = await self._act(
                request, "ban", "address", self.guard.ban_address(address, seconds)
            )
        except ValueError:
            raise ApiError(400, "invalid_address", "address must be an IP address.") from None
        return json_response({"banned": key, "seconds": seconds}, 201)

    async def unban(self, request: Request) -> Response:
        self._authorize(request)
        try:
            lifted = await self._act(
                request,
                "unban",
                "address",
                self.guard.unban_address(request.path_params["address"]),
            )
        except ValueError:
            raise ApiError(400, "invalid_address", "address must be an IP address.") from None
        if not lifted:
            raise ApiError(404, "not_banned", "That address is not banned.")
        return json_response({"unbanned": self.guard.address_key(request.path_params["address"])})

    # -- alerts and events ----------------------------------------------------------------

    async def alerts(self, request: Request) -> Response:
        self._authorize(request)
        rules = self.app.config.alerts.rules if self.app.config.alerts.enabled else {}
        return json_response(
            {
                "alerts": list(reversed(self.guard.monitor.alerts)),
                "rules": {name: rule.model_dump(mode="json") for name, rule in rules.items()},
            }
        )

    async def events(self, request: Request) -> Response:
        self._authorize(request)
        limit = _int_param(
            request.query_params.get("limit"), "limit", default=100, low=1, high=MAX_PAGE
        )
        return json_response({"events": self.guard.monitor.latest_events(limit)})

    # -- dashboard ------------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        return RedirectResponse("/dashboard", 303)

    async def dashboard(self, request: Request) -> Response:
        if self.credentials.mtls:
            self.certificate_allowed(request, self._address(request))
        elif not self.session_ok(request):
            return RedirectResponse("/login", 303)
        return _page("dashboard.html")

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return _page("login.html")
        if not self.live.origin_ok(request):
            raise ApiError(403, "origin_forbidden", "Log in from the dashboard's own page.")
        body = await self._body(request)
        address = self._address(request)
        token = body.get("token")
        if not isinstance(token, str) or not self.credentials.token_ok(token):
            # the right token is never throttled
            self._credential_refused(address, "/login", presented=True)
            raise ApiError(401, "unauthorized", "Wrong admin token.")
        session = self.credentials.new_session(address)
        self.guard.audit.emit("admin_login", client=address)
        response = json_response({"ok": True})
        response.set_cookie(  # __Host- on HTTPS: Secure, Path=/ and no Domain
            self.credentials.cookie_name,
            session,
            max_age=int(self.credentials.session_seconds),
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.credentials.https,
        )
        return response

    async def logout(self, request: Request) -> Response:
        if not self.live.origin_ok(request):
            raise ApiError(403, "origin_forbidden", "Log out from the dashboard's own page.")
        name = self.credentials.cookie_name
        self.credentials.end_session(request.cookies.get(name))
        response = json_response({"ok": True})
        # a browser ignores a __Host- cookie's deletion without Secure
        response.delete_cookie(
            name, path="/", secure=self.credentials.https, httponly=True, samesite="strict"
        )
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        media = _STATIC.get(name)
        if media is None:
            raise ApiError(404, "not_found", "No such file.")
        return Response(_asset(name), media_type=media)

    # -- helpers --------------------------------------------------------------------------

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.app.config.cluster.retry_seconds)))}

    async def _cluster(self, awaitable: Awaitable[T]) -> T:
        """A read of the shared store; 503 when it cannot be reached."""
        try:
            return await awaitable
        except StoreUnavailable:
            raise ApiError(
                503, "store_unavailable", "The shared store cannot be reached.", self._retry_after()
            ) from None

    async def _act(self, request: Request, action: str, target: str, awaitable: Awaitable[T]) -> T:
        """An operator action for every node: its result only if the shared store carried
        it. Otherwise (the store cannot be reached, or the check fell back to this node's
        own state) the failure is audited and the answer is 503 with Retry-After: never
        a success for something the other nodes did not get."""
        store = self.guard.store
        try:
            result = await awaitable
            if store.shared and not getattr(store, "available", True):
                raise StoreUnavailable(action)  # done on this node only
        except StoreUnavailable as exc:
            self.guard.audit.emit(
                "admin_action_failed",
                action=action,
                target=target,
                check=exc.check,
                client=self._address(request),
            )
            raise ApiError(
                503, "store_unavailable", _not_everywhere(action, exc.check), self._retry_after()
            ) from None
        return result


MAX_SECONDS = 30 * 86400


def _not_everywhere(action: str, check: str) -> str:
    """What a 503 of an operator action tells the operator (what did not happen)."""
    if action == "ban" and check == "disconnect":
        return (
            "The ban is stored for every node, but the shared store could not tell the "
            "other nodes to close the address's connections. Retry when it is back."
        )
    undone = {
        "disconnect": "the other nodes were not told to disconnect",
        "revoke": "the revocation is not in force on every node",
        "ban": "the ban is not in force on every node",
        "unban": "the ban was not lifted on every node",
    }[action]
    return f"The shared store cannot be reached: {undone}. Retry when it is back."


def _one_of(body: dict[str, Any], fields: tuple[str, ...]) -> tuple[str, str]:
    """The one field of *fields* the body names, with its value (a short string)."""
    present = [name for name in fields if name in body]
    if len(present) != 1:
        raise ApiError(400, "invalid_request", f"Give exactly one of {', '.join(fields)}.")
    field = present[0]
    value = body[field]
    if not isinstance(value, str) or not 0 < len(value) <= 1024:
        raise ApiError(400, "invalid_request", f"{field} must be a string (1-1024).")
    return field, value


def _seconds(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, "invalid_request", f"{name} must be a number.")
    if not 0 < value <= MAX_SECONDS:
        raise ApiError(400, "invalid_request", f"{name} must be in (0, {MAX_SECONDS}].")
    return float(value)


def _route_of(request: HTTPConnection) -> str:
    route = request.scope.get("route")
    return str(getattr(route, "path", "")) or "unknown"


def _int_param(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:  # not "²"
        raise ApiError(400, "invalid_request", f"{name} must be an integer in [{low}, {high}].")
    return int(raw)


_ASSETS: dict[str, bytes] = {}


def _asset(name: str) -> bytes:
    data = _ASSETS.get(name)
    if data is None:
        data = resources.files("wsguard.admin").joinpath("static", name).read_bytes()
        _ASSETS[name] = data
    return data


def _page(name: str) -> Response:
    return Response(_asset(name), media_type="text/html; charset=utf-8")
