"""ASGI adapter: :class:`WsGuardMiddleware` puts the wsguard policy in front of any ASGI 3 app.

HTTP scopes pass through untouched. A ``websocket`` scope is decided by the same
policy core as ``wsguard serve`` before the application sees it: a refusal is
a real HTTP response (the WebSocket Denial Response extension, when the server
offers it) or a close before accept, which the server turns into ``403``.
Then every incoming message goes through the message policy; the application
receives only messages that passed it, and error frames are sent on its behalf.

The identity is in the scope: ``scope["user"]`` (``websocket.user`` in Starlette
and FastAPI), ``scope["auth"]`` (its scopes) and ``scope["state"]["wsguard"]``.
The credential itself is taken out of what the application sees (the
``Authorization`` header and the token entry of ``Sec-WebSocket-Protocol``).

Per-connection state lives in the call of :meth:`WsGuardMiddleware.__call__`,
never on the middleware object; the object holds node-wide state only (the
Guard and the registry of live connections that revocations and operators
close).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import unquote_plus

import orjson

from wsguard.cluster.events import ClusterEvents, close_disconnected, close_revoked
from wsguard.config.model import Config
from wsguard.core.decisions import (
    CLOSE_CREDENTIALS_EXPIRED,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    Admit,
    Close,
    Deliver,
    Reauthenticate,
    Refuse,
    Reject,
)
from wsguard.core.headers import Headers
from wsguard.core.identity import Identity
from wsguard.core.messages import ConnectionState
from wsguard.core.request import HandshakeRequest
from wsguard.guard import Guard

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("wsguard.asgi")

DENIAL_EXTENSION = "websocket.http.response"


class WsGuardUser:
    """The authenticated identity as Starlette's ``request.user`` / ``websocket.user``."""

    __slots__ = ("identity",)

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    is_authenticated = True

    @property
    def display_name(self) -> str:
        return self.identity.subject

    @property
    def scopes(self) -> frozenset[str]:
        return self.identity.scopes

    def __repr__(self) -> str:
        return f"WsGuardUser({self.identity.subject!r})"


class GuardedConnection:
    """One admitted ASGI WebSocket, as revocations and operators see it."""

    __slots__ = (
        "_closer",
        "client",
        "close_cause",
        "closing",
        "id",
        "identity",
        "opened_at",
        "origin",
        "sent",
        "state",
        "subprotocol",
    )

    def __init__(
        self, connection_id: str, admit: Admit, state: ConnectionState, opened_at: float
    ) -> None:
        self.id = connection_id
        self.identity = admit.identity
        self.client = admit.client
        self.origin = admit.origin
        self.subprotocol = admit.subprotocol
        self.state = state
        self.opened_at = opened_at
        self.sent = 0
        self.closing = False
        self.close_cause: str | None = None
        self._closer: Callable[[int, str], None] | None = None

    @property
    def subject(self) -> str:
        return self.identity.subject

    def close_soon(self, code: int, reason: str, *, cause: str | None = None) -> None:
        """Ask the connection's own flow to close it with *code* (safe from any callback)."""
        if self.closing or self._closer is None:
            return
        self.close_cause = cause or reason
        self._closer(code, reason)


class WsGuardMiddleware:
    """Applies the wsguard policy to the WebSocket routes of any ASGI 3 application.

    ``WsGuardMiddleware(app, config=Config(...))``, or ``guard=`` to share a Guard.
    The Guard's store is started on the first WebSocket (or at lifespan start-up)
    and closed at lifespan shutdown.
    """

    def __init__(
        self, app: ASGIApp, *, config: Config | None = None, guard: Guard | None = None
    ) -> None:
        quiet_uvicorn_denial_errors()
        self.app = app
        self.guard = guard if guard is not None else Guard(config or Config())
        self.config = self.guard.config
        self.connections: dict[str, GuardedConnection] = {}  # node-wide registry
        self.guard.monitor.metrics.active_connections = lambda: len(self.connections)
        self._ids = itertools.count(1)
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._events: ClusterEvents | None = None
        self.admin: Any = None  # the AdminServer when admin.port is set

    @property
    def ready(self) -> tuple[bool, str | None]:
        """Readiness for the admin listener's ``/readyz``."""
        if not self._started:
            return False, "starting"
        return self.guard.ready

    async def revoke(self, kind: str, value: str, ttl: float | None = None) -> None:
        """Revoke a token id (``jti``) or subject (``sub``): live connections close (4003)."""
        if kind not in ("jti", "sub"):
            raise ValueError("kind must be 'jti' or 'sub'")
        seconds = ttl if ttl is not None else self.config.cluster.revocation_ttl_seconds
        await self.guard.store.revoke(kind, value, seconds)  # type: ignore[arg-type]

    # -- node lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the store's background work and the cluster event handling (idempotent)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await self.guard.start()
            self._events = ClusterEvents(
                self.guard.store,
                self.guard.node_id,
                lambda: self.connections.values(),  # type: ignore[arg-type,return-value]
                lambda raw: None,  # broadcasts are the application's business here
                functools.partial(close_revoked, self.guard.audit),
                on_disconnect=functools.partial(close_disconnected, self.guard.audit),
                address_key=self.guard.address_key,
            )
            self._started = True
            if self.config.admin.enabled and self.admin is None:
                from wsguard.admin.server import AdminServer

                admin = AdminServer(self)
                await admin.start()
                self.admin = admin

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        self.guard.handshakes.draining = True
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self._events is not None:
            await self._events.close()
        await self.guard.close()

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan protocol through, starting and closing the Guard with it.

        An application that does not speak lifespan (Channels' ``ProtocolTypeRouter``,
        Django's ASGI handler) raises at once; the middleware then answers the lifespan
        itself, so the Guard is still started and, at shutdown, closed.
        """
        seen: list[str] = []

        async def lifespan_receive() -> Message:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "lifespan.startup":
                await self.startup()
            return message

        async def lifespan_send(message: Message) -> None:
            seen.append(message["type"])
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.shutdown()
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        except Exception:
            if "lifespan.startup.complete" in seen or "lifespan.startup.failed" in seen:
                raise
            await self._own_lifespan(receive, send, startup_received="lifespan.startup" in seen)

    async def _own_lifespan(self, receive: Receive, send: Send, *, startup_received: bool) -> None:
        if not startup_received:
            await receive()  # lifespan.startup
        try:
            await self.startup()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.startup()
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client went away before the handshake completed
        guard = self.guard
        decision = await guard.admit(handshake_request(scope))
        if isinstance(decision, Reject):
            await deny(scope, send, decision)
            return
        await self._serve(scope, receive, send, first, decision)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, first: Message, admit: Admit
    ) -> None:
        guard = self.guard
        policy = guard.messages
        monitor = guard.monitor
        max_bytes = self.config.limits.max_message_bytes
        started = time.monotonic()
        state = policy.open(admit.identity, started)
        conn = GuardedConnection(f"{guard.node_id}{next(self._ids):08x}", admit, state, started)
        accepted = False
        closed_by_client: int | None = None
        close_sent: tuple[int, str] | None = None
        expiry: asyncio.TimerHandle | None = None
        closing_tasks: set[asyncio.Task[None]] = set()
        close_on_accept: tuple[int, str] | None = None

        async def close(code: int, reason: str) -> None:
            nonlocal close_sent
            if close_sent is None and closed_by_client is None:
                close_sent = (code, reason)
                conn.closing = True
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": code, "reason": reason})

        def close_later(code: int, reason: str) -> None:
            """Revocation, expiry, an operator: close now; the app then receives the
            disconnect the server reports. Before the app accepts, at its accept."""
            nonlocal close_on_accept
            if accepted:
                task = asyncio.get_running_loop().create_task(close(code, reason))
                closing_tasks.add(task)
                task.add_done_callback(closing_tasks.discard)
            else:
                close_on_accept = (code, reason)

        conn._closer = close_later

        async def send_json(payload: dict[str, Any]) -> None:
            if close_sent is None:
                conn.sent += 1
                await send({"type": "websocket.send", "text": orjson.dumps(payload).decode()})

        def schedule_expiry(expires_at: float | None) -> None:
            nonlocal expiry
            if expiry is not None:
                expiry.cancel()
                expiry = None
            deadline = guard.deadline(expires_at)
            if deadline is not None:
                expiry = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - time.time()),
                    lambda: conn.close_soon(
                        CLOSE_CREDENTIALS_EXPIRED, "credentials expired", cause="token_expired"
                    ),
                )

        delivered_connect = False
        network_lost = False
        idle_timers: list[asyncio.TimerHandle] = []
        liveness = self.config.liveness

        def start_liveness_timers() -> None:
            """Idle timeout and maximum lifetime, as ``wsguard serve`` enforces them."""
            loop = asyncio.get_running_loop()
            if liveness.max_lifetime_seconds:
                idle_timers.append(
                    loop.call_later(
                        liveness.max_lifetime_seconds,
                        lambda: conn.close_soon(
                            CLOSE_GOING_AWAY, "max lifetime", cause="max_lifetime"
                        ),
                    )
                )
            idle = liveness.idle_timeout_seconds
            if idle:

                def check() -> None:
                    quiet = guard.now() - state.last_data_at
                    if quiet >= idle:
                        conn.close_soon(CLOSE_GOING_AWAY, "idle timeout", cause="idle_timeout")
                    else:
                        idle_timers.append(loop.call_later(idle - quiet, check))

                idle_timers.append(loop.call_later(idle, check))

        async def app_receive() -> Message:
            nonlocal delivered_connect, closed_by_client, network_lost
            if not delivered_connect:
                delivered_connect = True
                return first
            while True:
                if close_sent is not None and conn.close_cause is not None:
                    # wsguard closed this connection (a cause is set): the app learns it at once
                    return {"type": "websocket.disconnect", "code": close_sent[0]}
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    if close_sent is None:
                        closed_by_client = int(message.get("code", 1005))
                        if closed_by_client == 1006:
                            network_lost = True
                    return message
                if kind != "websocket.receive" or close_sent is not None:
                    continue
                text = message.get("text")
                data: str | bytes = text if text is not None else message.get("bytes") or b""
                clock = time.perf_counter()
                if len(data) > max_bytes or (
                    isinstance(data, str)
                    and 4 * len(data) > max_bytes
                    and len(data.encode()) > max_bytes
                ):
                    monitor.connection_refused("size", "too_big", conn.client)
                    conn.close_cause = "too_big"
                    await close(CLOSE_TOO_BIG, "message too big")
                    return {"type": "websocket.disconnect", "code": CLOSE_TOO_BIG}
                decision = policy.evaluate(state, data, guard.now())
                if isinstance(decision, Deliver):
                    decision = await guard.settle(state, decision)
                elif isinstance(decision, Reauthenticate):  # revocation, as at the handshake
                    decision = await guard.check_refresh(conn, decision)
                if isinstance(decision, Deliver):
                    monitor.metrics.message_delivered(decision.type)
                    monitor.metrics.latency(time.perf_counter() - clock)
                    # only what the policy saw reaches the app (never both text and bytes)
                    if isinstance(data, str):
                        return {"type": "websocket.receive", "text": data}
                    return {"type": "websocket.receive", "bytes": data}
                if isinstance(decision, Refuse):
                    monitor.message_refused(decision.code, decision.type, conn.client, closed=False)
                    await send_json(decision.frame())
                elif isinstance(decision, Reauthenticate):
                    monitor.metrics.message_delivered("auth")
                    conn.identity = decision.identity
                    state.identity = decision.identity
                    user.identity = decision.identity  # the app sees the refreshed identity
                    app_state["wsguard"] = decision.identity
                    credentials: Any = scope_for_app.get("auth")
                    if hasattr(credentials, "scopes"):  # Starlette's AuthCredentials
                        credentials.scopes = sorted(decision.identity.scopes)
                    schedule_expiry(decision.identity.expires_at)
                    reply: dict[str, Any] = {
                        "type": "auth_ok",
                        "expires_at": decision.identity.expires_at,
                    }
                    if decision.ref is not None:
                        reply["ref"] = decision.ref
                    await send_json(reply)
                elif isinstance(decision, Close):
                    monitor.message_refused(decision.cause, None, conn.client, closed=True)
                    conn.close_cause = decision.cause
                    await close(decision.code, decision.reason)
                    return {"type": "websocket.disconnect", "code": decision.code}
                monitor.metrics.latency(time.perf_counter() - clock)

        async def app_send(message: Message) -> None:
            nonlocal accepted
            kind = message["type"]
            if kind == "websocket.accept":
                accepted = True
                message = dict(message)
                chosen = message.get("subprotocol")
                if chosen is None or chosen.startswith(self.config.auth.subprotocol_prefix):
                    message["subprotocol"] = admit.subprotocol
                guard.connection_opened(conn, message.get("subprotocol"))
                schedule_expiry(conn.identity.expires_at)
                start_liveness_timers()
            elif kind == "websocket.close":
                if close_sent is not None:
                    return  # wsguard closed it already
                nonlocal_close(message)
            elif kind == "websocket.send":
                if close_sent is not None:
                    if conn.close_cause is not None:
                        # wsguard closed it (revoked, expired, banned...): an app that only
                        # sends must learn it too, as it would of a client going away
                        raise ConnectionResetError(f"closed by wsguard ({conn.close_cause})")
                    return  # the app closed it itself: nothing more goes out
                conn.sent += 1
            await send(message)
            if kind == "websocket.accept" and close_on_accept is not None:
                await close(*close_on_accept)  # revoked/disconnected while the app was busy

        def nonlocal_close(message: Message) -> None:
            nonlocal close_sent
            close_sent = (int(message.get("code", 1000)), str(message.get("reason") or ""))
            conn.closing = True

        self.connections[conn.id] = conn  # from admission on: revocations reach it
        scope_for_app = app_scope(scope, admit, self.config)
        user: WsGuardUser = scope_for_app["user"]
        app_state: dict[str, Any] = scope_for_app["state"]
        try:
            await self.app(scope_for_app, app_receive, app_send)
        finally:
            self.connections.pop(conn.id, None)  # first: no new close is started for it
            for timer in (expiry, *idle_timers):
                if timer is not None:
                    timer.cancel()
            for task in list(closing_tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            policy.closed(state, time.monotonic())
            await admit.release()
            if accepted:
                if close_sent is not None and closed_by_client is None:
                    code, by = close_sent[0], "server"
                elif closed_by_client is not None and not network_lost:
                    code, by = closed_by_client, "client"
                else:
                    code, by = 1006, "network"
                guard.connection_closed(conn, code, by)


class _DenialIsNotAnError(logging.Filter):
    """uvicorn's sans-I/O WebSocket logs an error after every denial response (an HTTP
    refusal before the upgrade, which is how wsguard refuses); the refusal itself is
    in the audit log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def quiet_uvicorn_denial_errors() -> None:
    """Drop that one misleading record from uvicorn's error log (idempotent)."""
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DenialIsNotAnError) for f in target.filters):
        target.addFilter(_DenialIsNotAnError())


def handshake_request(scope: Scope) -> HandshakeRequest:
    """The policy core's view of an ASGI ``websocket`` scope."""
    items = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers") or []
    ]
    offered = scope.get("subprotocols") or []
    if offered and not any(name.lower() == "sec-websocket-protocol" for name, _ in items):
        # some servers (uvicorn's wsproto) pass the offered subprotocols only as a list
        items.append(("sec-websocket-protocol", ", ".join(offered)))
    headers = Headers(items)
    path = scope.get("raw_path")
    target = path.decode("latin-1") if isinstance(path, bytes) else scope.get("path", "/")
    query = scope.get("query_string") or b""
    if query and "?" not in target:
        target = f"{target}?{query.decode('latin-1')}"
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    return HandshakeRequest(
        peer=peer,
        target=target or "/",
        headers=headers,
        tls=scope.get("scheme") == "wss",
        method="GET",
    )


def app_scope(scope: Scope, admit: Admit, config: Config) -> Scope:
    """The scope the application sees: the identity added, the credential taken out."""
    auth = config.auth
    prefix = auth.subprotocol_prefix
    out = dict(scope)
    out["subprotocols"] = [p for p in scope.get("subprotocols", []) if not p.startswith(prefix)]
    headers: list[tuple[bytes, bytes]] = []
    for name, value in scope.get("headers", []):
        lower = name.lower()
        if lower == b"authorization":
            continue
        if lower == b"sec-websocket-protocol":
            value = _without_token_protocols(value, prefix)
        elif lower == b"cookie" and auth.cookie:
            value = _without_cookie(value, auth.cookie_name)
        if value:
            headers.append((name, value))
    out["headers"] = headers
    if auth.query and scope.get("query_string"):
        out["query_string"] = _without_query_param(scope["query_string"], auth.query_param)
    state = dict(scope.get("state") or {})
    state["wsguard"] = admit.identity
    out["state"] = state
    out["user"] = WsGuardUser(admit.identity)
    try:
        from starlette.authentication import AuthCredentials

        out["auth"] = AuthCredentials(sorted(admit.identity.scopes))
    except ImportError:  # pragma: no cover - starlette is a dependency
        out["auth"] = sorted(admit.identity.scopes)
    return out


async def deny(scope: Scope, send: Send, decision: Reject) -> None:
    """Refuse before the upgrade: a real HTTP response when the server can send one."""
    if DENIAL_EXTENSION in (scope.get("extensions") or {}):
        body = (decision.message + "\n").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
        headers += [(n.lower().encode(), v.encode()) for n, v in decision.headers]
        await send(
            {"type": "websocket.http.response.start", "status": decision.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server answers 403
        await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION})


def _without_token_protocols(value: bytes, prefix: str) -> bytes:
    """``Sec-WebSocket-Protocol`` without its token entries."""
    token = prefix.encode("latin-1")
    kept = [p.strip() for p in value.split(b",") if p.strip() and not p.strip().startswith(token)]
    return b", ".join(kept)


def _without_cookie(value: bytes, name: str) -> bytes:
    """A ``Cookie`` header without the token cookie, parsed as the core parses it."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(value.decode("latin-1"))
    except CookieError:
        return b""  # unparseable: nothing of it reaches the app
    if name not in jar:
        return value
    kept = [f"{key}={morsel.coded_value}" for key, morsel in jar.items() if key != name]
    return "; ".join(kept).encode("latin-1")


def _without_query_param(query: bytes, name: str) -> bytes:
    """A query string without the token parameter (the other parameters byte for byte)."""
    kept = [
        part
        for part in query.split(b"&")
        if part and unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) != name
    ]
    return b"&".join(kept)
