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
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from time import monotonic, perf_counter
from typing import Any
from urllib.parse import unquote_plus

from wsguard.cluster.events import ClusterEvents, close_disconnected, close_revoked
from wsguard.config.loader import environment_config
from wsguard.config.model import Config
from wsguard.core.client_address import forwarded_for, forwarded_host, parse_ip
from wsguard.core.decisions import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    Admit,
    Deliver,
    Reject,
)
from wsguard.core.duplicate_keys import duplicate_keys_refusal, names_type_twice
from wsguard.core.headers import Headers
from wsguard.core.identity import Identity
from wsguard.core.request import HandshakeRequest
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.observability.uvicorn_log import quiet_uvicorn_denial_errors
from wsguard.session import ENGINE_CAUSES, Session

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("wsguard.asgi")

DENIAL_EXTENSION = "websocket.http.response"
#: Disconnect codes that mean the ASGI server failed the connection itself (its frame
#: parser: a message over its ``ws_max_size``, a protocol error, invalid UTF-8) when
#: neither wsguard nor the app had sent a close: recorded as closed by the server, with
#: the cause wsguard's own close of that code has (a client closing with one of these
#: codes itself looks the same over ASGI, and is recorded the same way).
SERVER_FAILURE_CODES = frozenset(ENGINE_CAUSES)

_UNRESOLVED: Any = object()
_auth_credentials: Any = _UNRESOLVED  # Starlette's AuthCredentials, or None without it


def _credentials(scopes: list[str]) -> Any:
    """``scope["auth"]``: Starlette's ``AuthCredentials`` when Starlette is installed,
    else (Django Channels, plain ASGI) the scopes as a list."""
    global _auth_credentials
    cls = _auth_credentials
    if cls is _UNRESOLVED:
        try:
            from starlette.authentication import AuthCredentials
        except ImportError:
            cls = None
        else:
            cls = AuthCredentials
        _auth_credentials = cls
    return scopes if cls is None else cls(scopes)


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


class AsgiConnection:
    """One WebSocket under the middleware, in one slotted object: the
    :class:`~wsguard.session.Transport` of its Session (every frame goes through the
    server's ``send``, asynchronous; the close codes are the ones the app, wsguard and the
    server's disconnect event report), the ``receive`` and ``send`` the application is
    given, and what the app sees that a refresh changes.

    A message crosses one Python layer of the middleware on its way in (:meth:`app_receive`:
    the size check, the Session's policy, the latency metric; the server's own event is
    handed on when it is what the policy passed) and none of its own on the way out
    (:meth:`app_send` hands the server's ``send`` awaitable back)."""

    __slots__ = (
        "_connect",
        "_host",
        "_receive",
        "_send",
        "accepted",
        "close_on_accept",
        "close_sent",
        "closed_by_client",
        "credentials",
        "delivered",
        "offered",
        "session",
        "state",
        "user",
    )

    def __init__(
        self, host: WsGuardMiddleware, receive: Receive, send: Send, connect: Message
    ) -> None:
        self._host = host
        self._receive = receive
        self._send = send
        self._connect: Message | None = connect  # the first event, handed to the app
        self.accepted = False
        self.close_sent: tuple[int, str] | None = None  # by wsguard or the app
        # the disconnect code the server reported (a client's close, or the server's own
        # failure: SERVER_FAILURE_CODES)
        self.closed_by_client: int | None = None
        self.close_on_accept: tuple[int, str] | None = None
        self.delivered: str | bytes | None = None  # what the policy passed, for the app
        # the subprotocols the app may accept with: offered and configured
        self.offered: list[str] = []
        self.session: Session = None  # type: ignore[assignment]  # set by the middleware
        self.user: WsGuardUser = None  # type: ignore[assignment]
        self.state: dict[str, Any] = {}
        self.credentials: Any = None

    # -- Transport (for the Session) --------------------------------------------------

    def write(self, data: str | bytes, text: bool = False) -> bool:
        return False  # an ASGI send is a coroutine: the Session queues and calls send()

    async def send(self, data: str | bytes) -> bool:
        if not self.is_open():
            return False
        message: Message = {"type": "websocket.send"}
        message["text" if isinstance(data, str) else "bytes"] = data
        try:
            await self._send(message)
        except Exception:  # the server reports a gone client its own way (OSError...)
            return False
        return True

    def is_open(self) -> bool:
        return self.accepted and self.close_sent is None and self.closed_by_client is None

    def close_now(self, code: int, reason: str) -> bool:
        return False

    async def close(self, code: int, reason: str) -> None:
        """Close now; before the app accepts, at its accept."""
        if not self.accepted:
            self.close_on_accept = (code, reason)
        elif self.close_sent is None and self.closed_by_client is None:
            self.close_sent = (code, reason)
            with contextlib.suppress(Exception):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        """Nothing to drop: the ASGI server owns the socket (a close was sent already)."""

    def close_result(self) -> tuple[int, str, str]:
        if self.close_sent is not None and self.closed_by_client is None:
            return self.close_sent[0], self.close_sent[1], "server"
        code = self.closed_by_client
        if code in SERVER_FAILURE_CODES:  # the server's own parser failed it (see above)
            return code, "", "server"
        if code is not None and code != 1006:
            return code, "", "client"
        return 1006, "", "network"

    # -- what the app sees ------------------------------------------------------------

    def refresh(self, identity: Identity) -> None:
        self.user.identity = identity  # the app sees the refreshed identity
        self.state["wsguard"] = identity
        if hasattr(self.credentials, "scopes"):  # Starlette's AuthCredentials
            self.credentials.scopes = sorted(identity.scopes)

    def _wsguard_closed(self) -> Message | None:
        """The disconnect the app learns when wsguard closed the connection."""
        sent = self.close_sent
        if sent is not None and self.session.close_cause is not None:
            return {"type": "websocket.disconnect", "code": sent[0]}
        return None

    async def app_receive(self) -> Message:
        """The app's ``receive``: only the messages that passed the policy."""
        connect = self._connect
        if connect is not None:
            self._connect = None
            return connect
        session = self.session
        host = self._host
        while True:
            if self.close_sent is not None:
                closed = self._wsguard_closed()
                if closed is not None:
                    return closed
            message = await self._receive()
            kind = message["type"]
            if kind != "websocket.receive":
                if kind == "websocket.disconnect":
                    if self.close_sent is None:
                        self.closed_by_client = int(message.get("code", 1005))
                        session.mark_closing()
                    return message
                continue
            if self.close_sent is not None:
                continue
            text = message.get("text")
            data: str | bytes = text if text is not None else message.get("bytes") or b""
            started = perf_counter()
            max_bytes = host.max_message_bytes
            if len(data) > max_bytes or (
                isinstance(data, str)
                and 4 * len(data) > max_bytes
                and len(data.encode()) > max_bytes
            ):
                session.fail(CLOSE_TOO_BIG, "message too big", "too_big")
            elif not session.closing:
                pending = session.receive(data)
                if pending is not None:
                    await pending
            if session.closing and session.close_cause is not None:
                await session.wait_closing()  # the close frame is out
                closed = self._wsguard_closed()
                if closed is not None:
                    return closed
            host.latency(perf_counter() - started)
            delivered = self.delivered
            if delivered is not None:
                self.delivered = None
                # only what the policy saw reaches the app (never both text and bytes): the
                # server's own event when it holds nothing else
                if delivered is text and len(message) == 2:
                    return message
                if isinstance(delivered, str):
                    return {"type": "websocket.receive", "text": delivered}
                return {"type": "websocket.receive", "bytes": delivered}

    async def app_send(self, message: Message) -> None:
        """The app's ``send``: a data frame goes to the server's ``send`` at once; accept
        and close go through :meth:`_control`."""
        if message["type"] == "websocket.send" and self.close_sent is None:
            self.session.sent += 1
            await self._send(message)
            return
        await self._control(message)

    async def _control(self, message: Message) -> None:
        kind = message["type"]
        session = self.session
        if kind == "websocket.accept":
            if self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            message = dict(message)
            chosen = message.get("subprotocol")
            if chosen is None or chosen.startswith(self._host.config.auth.subprotocol_prefix):
                message["subprotocol"] = session.subprotocol  # the admitted one
            elif chosen != session.subprotocol and chosen not in self.offered:
                guard = self._host.guard  # the app's fault, not the client's: no offender
                guard.audit.emit(
                    "handshake_refused", status=500, reason="app_subprotocol", client=session.client
                )
                guard.monitor.handshake_refused("app_subprotocol", None, 500)
                raise RuntimeError(
                    f"websocket.accept: the subprotocol {chosen!r} is not one the client "
                    "offered and the configuration's `subprotocols` allows (RFC 6455 4.2.2); "
                    "accept with subprotocol=None for the one wsguard negotiated"
                )
            headers = message.get("headers")
            if headers:
                message["headers"] = _app_headers(headers)
            self.accepted = True
            session.subprotocol = message.get("subprotocol")
            session.open()
            await self._send(message)
            if self.close_on_accept is not None:
                # revoked or disconnected while the app was busy: closed at its accept
                await self.close(*self.close_on_accept)
            return
        if kind == "websocket.close":
            if self.close_sent is not None:
                return  # wsguard closed it already
            self.close_sent = (int(message.get("code", 1000)), str(message.get("reason") or ""))
            session.mark_closing()
        elif kind == "websocket.send":  # after a close
            if session.close_cause is not None:
                # wsguard closed it (revoked, expired, banned...): an app that only sends
                # must learn it too, as it would of a client going away
                raise ConnectionResetError(f"closed by wsguard ({session.close_cause})")
            return  # the app closed it itself: nothing more goes out
        await self._send(message)


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
        self.guard = guard if guard is not None else Guard(config or environment_config())
        self.config = self.guard.config
        if self.config.signing.session_keys:
            raise ConfigError(
                "signing.session_keys",
                "the session key is sent in the welcome frame, and the middleware sends "
                "none (the application speaks first): use signing.keys_file",
            )
        self.max_message_bytes = self.config.limits.max_message_bytes
        self.latency = self.guard.monitor.metrics.latency  # per message, as the engines
        if self.config.admin.enabled:
            from wsguard.extras import require

            require("admin", "the admin listener", key="admin.port")
        self.connections: dict[str, Session] = {}  # node-wide registry
        self._json = self.config.messages.format == "json"
        self.guard.monitor.metrics.active_connections = lambda: len(self.connections)
        self._ids = itertools.count(1)
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._events: ClusterEvents | None = None
        self.admin: Any = None  # the AdminServer when admin.port is set
        self._forwarded_warned_at = float("-inf")  # see _refuse_forwarded_client
        if self.guard.key_info.dev_key:
            logger.warning(
                "no JWT key configured: using the development key in %s, for connections "
                "that come in on loopback only",
                self.guard.key_info.dev_key_path,
            )
        # the forwarded headers wsguard does not read: a server that took the client's
        # address from one of them let whoever wrote it choose the address
        proxy = self.config.proxy
        self._unread_headers = (
            frozenset({b"x-forwarded-for", b"forwarded"})
            if not proxy.trusted
            else frozenset({b"x-forwarded-for" if proxy.header == "forwarded" else b"forwarded"})
        )

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
        seconds = ttl if ttl is not None else self.config.revocation_seconds
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
                lambda: self.connections.values(),
                lambda raw: None,  # broadcasts are the application's business here
                functools.partial(close_revoked, self.guard.audit),
                on_disconnect=functools.partial(close_disconnected, self.guard.audit),
                address_key=self.guard.address_key,
                audit=self.guard.audit,
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
        if scope["type"] != "websocket":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # a WebSocket, served in this one coroutine (no layer of ours stays suspended
        # under the app's but this call and the app's receive)
        if not self._started:
            await self.startup()
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client went away before the handshake completed
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        early = self.guard.early_refusal(peer) if peer else None
        if early is not None:  # its address is refused still: the request is not read
            status, reason, message, retry = early
            _drop_query_token(scope, self.config)  # the server logs the refused request
            await deny(scope, send, Reject(status, reason, message, retry, client=peer))
            return
        if peer and _forwarded_client(scope, peer, self._unread_headers):
            await self._refuse_forwarded_client(scope, send)
            return
        request, headers = handshake_request(scope, self.config)
        _drop_query_token(scope, self.config)  # read: neither the server nor the app needs it
        decision = await self.guard.admit(request)
        del request  # the decoded headers (with the credential) are not kept
        if isinstance(decision, Reject):
            await deny(scope, send, decision)
            return
        conn = AsgiConnection(self, receive, send, first)
        del first
        session = conn.session = Session(conn, self, decision)
        session.attachment = conn
        app_scope = scope_for_app(scope, headers, decision, self.config, conn)
        del headers
        self.connections[session.id] = session  # from admission on: revocations reach it
        if self._events is not None:  # and those that arrived while it was decided
            self._events.catch_up(session, session.checked_at)
        del decision  # the Session holds the admission until it releases it
        try:
            await self.app(app_scope, conn.app_receive, conn.app_send)
        except Exception:
            # the app failed with the connection open: the client is told (1011, as
            # hypercorn does; uvicorn would drop the socket), the server logs the error
            if conn.is_open():
                session.close_soon(CLOSE_INTERNAL_ERROR, "internal error", cause="app_failed")
            raise
        finally:
            await session.wait_closing()
            released: list[Admit] = []
            if conn.accepted:
                session.end(released.append)
            else:
                session.discard(released.append)
            # The connection and its Session refer to each other, and the connection to
            # the server's receive and send (its whole protocol object): without this
            # cut they would all wait for the garbage collector, whose pauses grow with
            # them. The Session keeps how it ended, should anything still ask.
            session.transport = _Ended(conn.close_result())
            session.attachment = None
            for admission in released:
                await admission.release()

    async def _refuse_forwarded_client(self, scope: Scope, send: Send) -> None:
        """The ASGI server took the client's address from ``X-Forwarded-For`` (uvicorn
        does by default for requests from 127.0.0.1) while wsguard reads no such header
        (``proxy.trusted`` empty, or ``proxy.header = "forwarded"``), or took something that
        is no address: whoever sent the header chose the address that per-address limits,
        bans and the audit log would use. Refused (500) until the two agree; the log says
        how. (A client that writes its own address in the header, on a server that reads
        no forwarded header, looks the same from the scope: refused alike, after its
        address's allowance and ban were checked.)"""
        now = monotonic()
        if now >= self._forwarded_warned_at + 60.0:
            self._forwarded_warned_at = now
            logger.error(
                "refusing WebSocket handshakes whose client address is also in a "
                "forwarded header wsguard does not read (X-Forwarded-For or Forwarded, "
                "as proxy.trusted and proxy.header say), or is no address: the ASGI server "
                "took it from the header (or the client wrote its own address there); run "
                "the server without proxy headers (uvicorn --no-proxy-headers) and let "
                "wsguard read them (proxy.trusted, proxy.header), or list in proxy.trusted "
                "the same proxies as uvicorn's --forwarded-allow-ips with "
                'proxy.header = "x-forwarded-for"'
            )
        reason = "forwarded_client"
        self.guard.record_raw_refusal(500, reason, None)
        _drop_query_token(scope, self.config)
        await deny(scope, send, Reject(500, reason, "Server misconfigured."))

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

    # -- the host's hooks (called by each connection's Session) -------------------------

    def new_connection_id(self) -> str:
        return f"{self.guard.node_id}{next(self._ids):08x}"

    def keep_request(self, path: str, headers: Any) -> Any:
        return None

    def welcome(self, session: Session) -> dict[str, Any] | None:
        return None  # the application speaks first, if at all

    def deliver(self, session: Session, decision: Deliver, data: str | bytes) -> None:
        if self._json and names_type_twice(data, decision.message):
            # the app gets the text: a parser keeping the first "type" would read another
            # type than the one whose scopes and schema were checked
            session.refuse(duplicate_keys_refusal(decision))
            return
        session.attachment.delivered = data  # AsgiConnection.app_receive hands it on

    def opened(self, session: Session) -> None:
        return None

    def refreshed(self, session: Session) -> None:
        session.attachment.refresh(session.identity)

    def closed(self, session: Session) -> None:
        return None


class _Ended:
    """The :class:`~wsguard.session.Transport` of a Session whose connection has ended
    (closed, nothing more to send) and whose ASGI connection it no longer holds."""

    __slots__ = ("_result",)

    def __init__(self, result: tuple[int, str, str]) -> None:
        self._result = result

    def write(self, data: str | bytes, text: bool = False) -> bool:
        return False

    async def send(self, data: str | bytes) -> bool:
        return False

    def is_open(self) -> bool:
        return False

    def close_now(self, code: int, reason: str) -> bool:
        return True  # nothing left to close

    async def close(self, code: int, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None

    def close_result(self) -> tuple[int, str, str]:
        return self._result


def handshake_request(
    scope: Scope, config: Config
) -> tuple[HandshakeRequest, list[tuple[bytes, bytes]]]:
    """The policy core's view of an ASGI ``websocket`` scope, and the headers the
    application will see (the credential taken out), from one pass over the headers."""
    auth = config.auth
    prefix = auth.subprotocol_prefix
    cookie = auth.cookie
    items: list[tuple[str, str]] = []
    kept: list[tuple[bytes, bytes]] = []
    protocol_seen = False
    for header in scope.get("headers") or ():
        name, value = header
        name_text = name.decode("latin-1").lower()  # ASGI names are lower case already
        items.append((name_text, value.decode("latin-1")))
        if name_text == "authorization":
            continue
        if name_text == "sec-websocket-protocol":
            protocol_seen = True
            stripped = _without_token_protocols(value, prefix)
            if stripped is not value:
                header = (name, stripped)
        elif name_text == "cookie" and cookie:
            stripped = _without_cookie(value, auth.cookie_name)
            if stripped is not value:
                header = (name, stripped)
        if header[1]:
            kept.append(header)
    offered = scope.get("subprotocols")
    if offered and not protocol_seen:
        # some servers (uvicorn's wsproto) pass the offered subprotocols only as a list
        items.append(("sec-websocket-protocol", ", ".join(offered)))
    path = scope.get("raw_path")
    target = path.decode("latin-1") if isinstance(path, bytes) else scope.get("path", "/")
    query = scope.get("query_string")
    if query and "?" not in target:
        target = f"{target}?{query.decode('latin-1')}"
    client = scope.get("client")
    server = scope.get("server")  # none over a Unix socket: local
    request = HandshakeRequest(
        peer=str(client[0]) if client else "unknown",
        target=target or "/",
        headers=Headers(items),
        tls=scope.get("scheme") == "wss",
        method="GET",
        local=str(server[0]) if server else "127.0.0.1",
    )
    return request, kept


def scope_for_app(
    scope: Scope,
    headers: list[tuple[bytes, bytes]],
    admit: Admit,
    config: Config,
    conn: AsgiConnection,
) -> Scope:
    """The scope the application sees: the identity added, the credential taken out
    (*headers*: from :func:`handshake_request`); *conn* keeps what a refresh changes.

    Changed in place, as Starlette's authentication middleware does (a copy would stay
    alive beside the server's for the connection's life, ~1 KiB): the server's scope
    loses the credential too, and its ``state`` is already this connection's own copy
    (the ASGI specification's lifespan state)."""
    out = scope
    offered = scope.get("subprotocols")
    if not offered:
        out["subprotocols"] = offered = []
    else:
        # what the app may accept with: offered by the client and configured (never the
        # token entry, which is no configured name); else the server's own list stays
        allowed = config.subprotocols
        if not all(p in allowed for p in offered):
            out["subprotocols"] = offered = [p for p in offered if p in allowed]
    conn.offered = offered
    out["headers"] = headers
    identity = admit.identity
    state = scope.get("state")
    if state is None:
        state = out["state"] = {}
    state["wsguard"] = identity
    user = out["user"] = WsGuardUser(identity)
    scopes = sorted(identity.scopes)
    credentials = out["auth"] = _credentials(scopes)
    conn.user, conn.state, conn.credentials = user, state, credentials
    return out


def _forwarded_client(
    scope: Scope, peer: str, read: frozenset[bytes] = frozenset({b"x-forwarded-for", b"forwarded"})
) -> bool:
    """Whether the scope's client address is one of the request's forwarded addresses
    in the headers *read* (``X-Forwarded-For`` entries, ``Forwarded`` ``for=`` values) in
    any form a server takes one as (with a port or brackets removed, an IPv4-mapped IPv6
    address as IPv4), or no address at all: the ASGI server took it from a header (a
    socket's own address is an address, and not in them)."""
    if parse_ip(peer) is None:
        return True  # "unknown", "_hidden", "garbage": no socket has such a peer
    entries: list[str] = []
    forwarded: list[str] = []
    for name, value in scope.get("headers") or ():
        if name not in read:
            continue
        if name == b"x-forwarded-for":
            entries += value.decode("latin-1").split(",")
        elif name == b"forwarded":
            forwarded.append(value.decode("latin-1"))
    if forwarded:
        entries += forwarded_for(forwarded)
    address = parse_ip(peer)
    for entry in entries:
        entry = entry.strip().strip('"')
        if peer in (entry, forwarded_host(entry)):
            return True
        if address is not None and parse_ip(entry) == address:
            return True
    return False


def _drop_query_token(scope: Scope, config: Config) -> None:
    """Take the token parameter out of the scope's query string (with ``auth.query``):
    before a refusal too, since ASGI servers write the path and query of a refused
    WebSocket request to their own access log."""
    auth = config.auth
    query = scope.get("query_string")
    if auth.query and query:
        scope["query_string"] = _without_query_param(query, auth.query_param)


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


#: Response headers the opening handshake owns: an app's ``websocket.accept`` may not add
#: them (a second ``Sec-WebSocket-Protocol`` or ``-Accept``, an extension the client did not
#: negotiate, a framing header).
_HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-accept", b"sec-websocket-protocol", b"sec-websocket-extensions",
        b"sec-websocket-version", b"sec-websocket-key", b"upgrade", b"connection",
        b"content-length", b"transfer-encoding",
    }
)  # fmt: skip


def _app_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """The headers of an app's ``websocket.accept`` without those the handshake owns."""
    return [(n, v) for n, v in headers if bytes(n).lower() not in _HANDSHAKE_HEADERS]


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
