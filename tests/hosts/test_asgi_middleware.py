"""The ASGI adapter end to end: WsGuardMiddleware in front of Starlette/FastAPI apps,
served by real ASGI servers (uvicorn with websockets-sansio and with wsproto, hypercorn)
on ephemeral loopback ports, driven by real WebSocket clients.

Each server runs in a background thread with its own event loop, with the lifespan
protocol on (the middleware starts the Guard and its cluster events there) and the
server's own frame-size limit set to ``limits.max_message_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import time
import urllib.request
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from conftest import AuditCapture, RunningServer, close_of, eventually, make_config, make_token
from support.asgi_server import (
    AsgiServer,
    Recorder,
    Serve,
    echo_of,
    ping,
    recv_json,
    send_json,
)
from support.asgi_server import demo_echo_app as echo_app
from support.paths import EXAMPLES
from support.wire import OP_CLOSE, OP_TEXT, RawClient, frame, ping_frame
from wsguard.guard import Guard
from wsguard.hosts.asgi import (
    AsgiConnection,
    Message,
    Receive,
    Scope,
    Send,
    WsGuardMiddleware,
    _forwarded_client,
)
from wsguard.observability.audit import AuditLog
from wsguard.session import Session

ASGI_EXAMPLES = EXAMPLES / "asgi"
#: node-wide state the middleware object holds (among possibly others)
NODE_ATTRIBUTES = frozenset({"app", "guard", "config", "connections"})


# -- client helpers ---------------------------------------------------------------------


def next_close(ws: ClientConnection, *, skip: str | None = None, timeout: float = 5) -> int:
    """The code of the close frame that comes next (frames of type *skip* aside);
    fails at once on any other frame."""
    while True:
        try:
            frame = recv_json(ws, timeout)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                pytest.fail(f"closed without a close frame: {exc}")
            return exc.rcvd.code
        if skip is None or frame.get("type") != skip:
            pytest.fail(f"expected a close, got {frame}")


def header(refusal: InvalidStatus, name: str) -> str | None:
    value = refusal.response.headers.get(name)
    return None if value is None else str(value)


# -- 1. refusals before the application sees anything -----------------------------------


def test_refusals_never_reach_the_app(serve: Serve) -> None:
    server = serve({"origin": {"allowed": ["https://app.example"]}})

    missing = server.refused(transport="none")
    assert missing.response.status_code == 401
    bad_signature = server.refused(make_token("alice", secret="another-secret-" + "x" * 40))
    assert bad_signature.response.status_code == 401
    foreign = server.refused(origin="https://evil.example")
    assert foreign.response.status_code == 403

    # all three servers offer the denial extension: a real response with the policy's headers
    assert header(missing, "WWW-Authenticate") == 'Bearer realm="wsguard"'
    challenge = header(bad_signature, "WWW-Authenticate")
    assert challenge is not None and 'error="invalid_token"' in challenge
    assert header(foreign, "Cache-Control") == "no-store"
    assert bytes(foreign.response.body or b"") == b"Origin not allowed.\n"

    assert server.rec.calls == []
    refused = server.audit.events("handshake_refused")
    assert [(e["status"], e["reason"]) for e in refused] == [
        (401, "missing_credentials"),
        (401, "bad_signature"),
        (403, "origin_forbidden"),
    ]
    assert all(e["path"] == "/ws" for e in refused)
    assert server.audit.events("connection_admitted") == []
    # an allowed Origin gets in
    ws, hello = server.hello(origin="https://app.example")
    with ws:
        assert hello["user"] == "alice"


def test_repeated_attempts_of_a_rate_limited_address_are_refused_unaudited(serve: Serve) -> None:
    """As on the standalone engines: an address past its handshake allowance is answered
    429 from its address alone while it stays refused, counted but audited once."""
    server = serve({"limits": {"handshakes_per_minute": 2, "handshake_burst": 2}})
    for _ in range(2):
        ws, _ = server.hello()
        ws.close()
    answers = [server.refused() for _ in range(4)]
    assert [a.response.status_code for a in answers] == [429] * 4
    assert all(1 <= int(header(a, "Retry-After") or 0) <= 30 for a in answers)
    metrics: Any = server.guard.monitor.metrics
    assert metrics.handshakes.get(("refused", "handshake_rate"), 0) == 4
    refused = server.audit.events("handshake_refused")
    assert [e["reason"] for e in refused] == ["handshake_rate"]


# -- 2. what an admitted application sees ------------------------------------------------


def test_header_token_identity_without_the_credential(serve: Serve) -> None:
    server = serve()
    token = make_token("alice", scopes="chat admin")
    ws, hello = server.hello(token)
    with ws:
        assert ws.subprotocol is None
        assert hello["user"] == "alice"
        assert hello["state_subject"] == "alice"
        assert sorted(hello["scopes"]) == ["admin", "chat"]
        assert hello["user_scopes"] == ["admin", "chat"]
        names = [name for name, _ in hello["headers"]]
        assert "authorization" not in names
        assert "host" in names  # the other headers are untouched
        assert token not in json.dumps(hello)
    assert server.rec.calls == ["/ws"]


def test_subprotocol_token_negotiates_the_app_protocol_never_the_token(serve: Serve) -> None:
    server = serve()
    token = make_token("bob", scopes="chat")
    ws, hello = server.hello(token, transport="subprotocol", subprotocols=("wsguard.v1",))
    with ws:
        assert ws.subprotocol == "wsguard.v1"
        assert hello["user"] == "bob"
        assert hello["state_subject"] == "bob"
        assert hello["scopes"] == ["chat"]
        assert hello["subprotocols"] == ["wsguard.v1"]
        assert all(name != "authorization" for name, _ in hello["headers"])
        assert token not in json.dumps(hello)
        assert "token." not in json.dumps(hello["headers"])
        echo_of(ws, ping("after-subprotocol"))
    # the token alone: no application protocol was offered, none is negotiated
    ws, hello = server.hello(token, transport="subprotocol")
    with ws:
        assert ws.subprotocol is None
        assert (hello["user"], hello["subprotocols"]) == ("bob", [])
    admitted = server.audit.events("connection_admitted")
    assert [(e["subject"], e.get("subprotocol")) for e in admitted] == [
        ("bob", "wsguard.v1"),
        ("bob", None),
    ]


def test_query_and_cookie_tokens_are_taken_out_of_the_scope(serve: Serve) -> None:
    server = serve(
        {
            "auth": {"query": True, "cookie": True},
            "origin": {"allowed": ["https://app.example"]},
        }
    )
    token = make_token("alice")
    origin = Origin("https://app.example")
    with connect(
        server.url(f"/ws?room=1&token={token}"), origin=origin, proxy=None, legacy=True
    ) as ws:
        by_query = recv_json(ws)
    with connect(
        server.url(),
        additional_headers={"Cookie": f"theme=dark; wsguard_token={token}"},
        origin=origin,
        proxy=None,
        legacy=True,
    ) as ws:
        by_cookie = recv_json(ws)
    assert (by_query["user"], by_cookie["user"]) == ("alice", "alice")
    assert by_query["query"] == "room=1"
    assert ["cookie", "theme=dark"] in by_cookie["headers"]
    assert token not in json.dumps(by_query)
    assert token not in json.dumps(by_cookie)


def test_cookie_token_after_whitespace_never_reaches_the_app(serve: Serve) -> None:
    server = serve({"auth": {"cookie": True}, "origin": {"allowed": ["https://app.example"]}})
    token = make_token("alice")
    with connect(
        server.url(),
        additional_headers={"Cookie": f"theme=dark wsguard_token={token}"},
        origin=Origin("https://app.example"),
        proxy=None,
        open_timeout=5,
        legacy=True,
    ) as ws:
        hello = recv_json(ws)
    assert hello["user"] == "alice"
    seen = json.dumps(hello)
    assert token not in seen
    assert token.split(".")[2] not in seen  # not even the signature
    assert ["cookie", "theme=dark"] in hello["headers"]  # the other cookie is kept


# -- 3. the message policy ---------------------------------------------------------------


def test_message_policy_errors_and_delivery(serve: Serve) -> None:
    server = serve()
    ws, _ = server.hello()
    with ws:
        ws.send("{not json")
        err = recv_json(ws)
        assert (err["type"], err["code"]) == ("error", "invalid_json")

        send_json(ws, {"type": "teleport", "id": 7})
        err = recv_json(ws)
        assert (err["code"], err["ref"]) == ("unknown_type", 7)

        send_json(ws, {"type": "chat", "text": 5, "id": "s1"})
        err = recv_json(ws)
        assert (err["code"], err["pointer"], err["ref"]) == ("invalid_message", "/text", "s1")

        send_json(ws, {"type": "command", "name": "reboot", "id": "c1"})
        err = recv_json(ws)
        assert (err["code"], err["ref"]) == ("forbidden", "c1")

        # a valid message reaches the app; the refused ones never did
        echo_of(ws, ping("p1"))
        chat = json.dumps({"type": "chat", "text": "hello", "room": "r"})
        echo_of(ws, chat)
        assert server.rec.received == [ping("p1"), chat]


def test_message_at_the_limit_passes_one_byte_more_closes_1009(serve: Serve) -> None:
    server = serve({"limits": {"max_message_bytes": 1024}})
    exact = ping("edge").ljust(1024)  # trailing whitespace is valid JSON
    ws, _ = server.hello()
    with ws:
        echo_of(ws, exact)
        ws.send(exact + " ")
        assert close_of(ws)[0] == 1009  # the server's own limit
    assert server.rec.received == [exact]


def test_wsguard_checks_the_size_again_behind_a_lax_server(serve: Serve) -> None:
    server = serve({"limits": {"max_message_bytes": 1024}}, server_max_size=64 * 1024)
    ws, _ = server.hello()
    with ws:
        ws.send(ping("big").ljust(2048))
        assert close_of(ws) == (1009, "message too big")
    assert server.rec.received == []
    closed = eventually(lambda: server.audit.events("connection_closed"), what="closed")
    assert (closed[0]["code"], closed[0]["closed_by"], closed[0]["cause"]) == (
        1009,
        "server",
        "too_big",
    )


def test_binary_frame_closes_1003(serve: Serve) -> None:
    server = serve()
    ws, _ = server.hello()
    with ws:
        ws.send(b"\x00\x01binary")
        assert close_of(ws)[0] == 1003
    assert server.rec.received == []
    eventually(lambda: server.rec.disconnects, what="the app's disconnect")
    assert server.rec.disconnects == [1003]


def test_violations_past_the_budget_close_1008(serve: Serve) -> None:
    server = serve({"limits": {"violation_budget": 3}})
    ws, _ = server.hello()
    with ws:
        for i in range(3):
            ws.send(f'{{"id": {i}')
            assert recv_json(ws)["code"] == "invalid_json"
        ws.send("{bad")
        code, reason = close_of(ws)
        assert code == 1008
        assert "bad" not in reason
    assert server.rec.received == []


def test_wsguard_size_check_counts_utf8_bytes(serve: Serve) -> None:
    server = serve({"limits": {"max_message_bytes": 1024}}, server_max_size=64 * 1024)
    ws, _ = server.hello()
    with ws:
        text = json.dumps({"type": "chat", "text": "\u00e9" * 600}, ensure_ascii=False)
        assert len(text) <= 1024 < len(text.encode())
        ws.send(text)
        assert next_close(ws) == 1009
    assert server.rec.received == []


def direct_scope(token: str) -> Scope:
    """A ``websocket`` scope as a server builds it, for driving the middleware directly."""
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"sec-websocket-version", b"13"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
        "state": {},
    }


def run_direct(app: Any, incoming: list[Message]) -> list[Message]:
    """Run *app* behind the middleware on *incoming* (the last event repeated when asked
    again); returns what the middleware sent to the "server"."""
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.sleep(0)  # as a server's: the next event comes on a later turn
        if len(incoming) > 1:
            return incoming.pop(0)
        return dict(incoming[0])  # the disconnect, again if asked

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def main() -> None:
        middleware = WsGuardMiddleware(
            app, guard=Guard(make_config(), audit=AuditLog(AuditCapture()))
        )
        try:
            await asyncio.wait_for(middleware(direct_scope(make_token("alice")), receive, send), 5)
        finally:
            await middleware.shutdown()

    asyncio.run(main())
    return sent


def test_a_refused_query_token_is_gone_before_the_server_logs_the_refusal() -> None:
    """ASGI servers write a refused WebSocket request's path and query to their access
    log (uvicorn: ``"WebSocket /ws?token=..." 401``): the token parameter is out of the
    scope before the refusal is sent, whether the policy refused it (a bad token, then a
    ban) or the address was still refused and the request not read."""
    config = make_config({"auth": {"query": True}, "limits": {"auth_failures_before_ban": 2}})
    seen: list[tuple[int, bytes]] = []

    async def app(app_scope: Scope, app_receive: Receive, app_send: Send) -> None:
        raise AssertionError("a refused request reached the app")

    async def main() -> None:
        middleware = WsGuardMiddleware(app, guard=Guard(config, audit=AuditLog(AuditCapture())))
        try:
            for token in ("not-a-jwt", "still-not", make_token("alice"), make_token("alice")):
                scope = direct_scope(token)
                scope["headers"] = [h for h in scope["headers"] if h[0] != b"authorization"]
                scope["query_string"] = f"room=1&token={token}&x=2".encode()

                async def receive() -> Message:
                    return {"type": "websocket.connect"}

                async def send(message: Message, scope: Scope = scope) -> None:
                    if message["type"] == "websocket.http.response.start":
                        seen.append((message["status"], scope["query_string"]))

                await asyncio.wait_for(middleware(scope, receive, send), 5)
        finally:
            await middleware.shutdown()

    asyncio.run(main())
    # two bad tokens, then banned (a valid token too): by the policy, then from memory
    assert seen == [(401, b"room=1&x=2"), (401, b"room=1&x=2")] + [(429, b"room=1&x=2")] * 2


def test_message_with_text_and_bytes_reaches_the_app_as_text_only() -> None:
    text = '{"type":"ping","id":1}'
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": text, "bytes": b"\x00EVIL"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    got: list[Message] = []

    async def app(app_scope: Scope, app_receive: Receive, app_send: Send) -> None:
        assert (await app_receive())["type"] == "websocket.connect"
        await app_send({"type": "websocket.accept"})
        while True:
            message = await app_receive()
            got.append(dict(message))
            if message["type"] == "websocket.disconnect":
                return

    sent = run_direct(app, incoming)
    assert sent[0]["type"] == "websocket.accept", sent  # admitted
    assert got[0] == {"type": "websocket.receive", "text": text}
    assert "bytes" not in got[0]
    assert [m["type"] for m in got] == ["websocket.receive", "websocket.disconnect"]


def test_a_passed_message_is_the_servers_own_event_and_a_refused_one_never_arrives() -> None:
    """No copy per message: the app gets the server's event itself when the policy passed
    it; a refused message is answered by the middleware and never reaches the app."""
    passed: Message = {"type": "websocket.receive", "text": '{"type":"ping","id":1}'}
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": '{"type":"nope"}'},
        passed,
        {"type": "websocket.disconnect", "code": 1000},
    ]
    got: list[Message] = []

    async def app(app_scope: Scope, app_receive: Receive, app_send: Send) -> None:
        await app_receive()
        await app_send({"type": "websocket.accept"})
        while True:
            message = await app_receive()
            got.append(message)
            if message["type"] == "websocket.disconnect":
                return

    sent = run_direct(app, incoming)
    assert got[0] is passed
    assert [m["type"] for m in got] == ["websocket.receive", "websocket.disconnect"]
    errors = [json.loads(m["text"]) for m in sent if m["type"] == "websocket.send"]
    assert [e["type"] for e in errors] == ["error"], sent


def test_the_apps_send_is_a_coroutine_function_to_frameworks_that_check() -> None:
    """The app's ``send`` hands the server's awaitable back instead of awaiting it in a
    coroutine of its own; it is marked, so asyncio and asgiref (Channels' sync consumers
    call ``async_to_sync(send)``) take it for a coroutine function, without a warning."""
    asgiref_sync = pytest.importorskip("asgiref.sync")
    seen: dict[str, Any] = {}

    async def app(app_scope: Scope, app_receive: Receive, app_send: Send) -> None:
        seen["asyncio"] = asyncio.iscoroutinefunction(app_send)
        seen["asgiref"] = asgiref_sync.iscoroutinefunction(app_send)
        await app_receive()
        await app_send({"type": "websocket.accept"})

        def sync_send() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                asgiref_sync.async_to_sync(app_send)({"type": "websocket.send", "text": "hi"})

        await asgiref_sync.sync_to_async(sync_send)()
        await app_send({"type": "websocket.close", "code": 1000})

    sent = run_direct(
        app, [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    )
    assert seen == {"asyncio": True, "asgiref": True}
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hi"


# -- 4. rate limits ----------------------------------------------------------------------


def test_third_rapid_message_is_rate_limited(serve: Serve) -> None:
    server = serve({"limits": {"messages_per_minute": 6, "message_burst": 2}})
    ws, _ = server.hello()
    with ws:
        for i in range(3):
            ws.send(ping(f"r{i}"))
        first, second, third = (recv_json(ws) for _ in range(3))
        assert (first["type"], second["type"]) == ("echo", "echo")
        assert (third["type"], third["code"], third["ref"]) == ("error", "rate_limited", "r2")
    assert server.rec.received == [ping("r0"), ping("r1")]


# -- 5. in-band token refresh ------------------------------------------------------------


def test_in_band_refresh_is_answered_by_the_middleware(serve: Serve) -> None:
    server = serve()
    ws, _ = server.hello(make_token("alice", ttl=600))
    with ws:
        fresh = make_token("alice", ttl=3600)
        send_json(ws, {"type": "auth", "token": fresh, "id": "a1"})
        ok = recv_json(ws)
        assert (ok["type"], ok["ref"]) == ("auth_ok", "a1")
        assert isinstance(ok["expires_at"], int | float)
        echo_of(ws, ping("after-refresh"))
        assert server.rec.received == [ping("after-refresh")]

        send_json(ws, {"type": "auth", "token": make_token("mallory")})
        assert close_of(ws)[0] == 1008
    assert all(fresh not in str(item) for item in server.rec.received)


def scopes_app() -> Starlette:
    """``/ws``: for the connect and for every message, the scopes the app sees."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()

        async def report(kind: str) -> None:
            await websocket.send_json(
                {
                    "type": kind,
                    "user": websocket.user.display_name,
                    "user_scopes": sorted(websocket.user.scopes),
                    "state_scopes": sorted(websocket.scope["state"]["wsguard"].scopes),
                    "state_attr_scopes": sorted(websocket.state.wsguard.scopes),
                    "auth_scopes": sorted(websocket.auth.scopes),
                }
            )

        await report("hello")
        while (await websocket.receive())["type"] != "websocket.disconnect":
            await report("seen")

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def test_refreshed_identity_is_what_the_app_sees(serve: Serve) -> None:
    server = serve(app=scopes_app())
    ws = server.connect(make_token("alice", scopes="chat"))
    with ws:
        hello = recv_json(ws)
        assert (hello["type"], hello["user"]) == ("hello", "alice")
        assert hello["user_scopes"] == hello["state_scopes"] == ["chat"]

        fresh = make_token("alice", scopes="chat billing", ttl=7200)
        send_json(ws, {"type": "auth", "token": fresh, "id": "r1"})
        ok = recv_json(ws)
        assert (ok["type"], ok["ref"]) == ("auth_ok", "r1")

        ws.send(ping("after"))
        seen = recv_json(ws)
        assert seen["type"] == "seen"
        assert seen["user_scopes"] == ["billing", "chat"]
        assert seen["state_scopes"] == ["billing", "chat"]
        assert seen["state_attr_scopes"] == ["billing", "chat"]
        assert seen["auth_scopes"] == ["billing", "chat"]  # Starlette's AuthCredentials too


# -- 6. expiry, idle timeout and maximum lifetime -----------------------------------------


def test_expired_token_closes_4001(serve: Serve) -> None:
    server = serve()
    ws, _ = server.hello(make_token("alice", ttl=2))
    with ws:
        echo_of(ws, ping("before-expiry"))
        assert close_of(ws, timeout=6)[0] == 4001
    closed = eventually(lambda: server.audit.events("connection_closed"), what="closed")
    assert (closed[0]["code"], closed[0]["cause"]) == (4001, "token_expired")


def test_idle_connection_is_closed_1001(serve: Serve) -> None:
    server = serve({"liveness": {"idle_timeout_seconds": 0.5}})
    ws, _ = server.hello()  # usable first: the close below is the idle timer, not a refusal
    with ws:
        assert close_of(ws, timeout=2.5) == (1001, "idle timeout")
    eventually(lambda: server.rec.disconnects, timeout=2, what="the app's disconnect")
    closed = eventually(lambda: server.audit.events("connection_closed"), timeout=2, what="closed")
    assert (closed[0]["code"], closed[0]["closed_by"], closed[0]["cause"]) == (
        1001,
        "server",
        "idle_timeout",
    )


def closed_while_active(ws: ClientConnection, within: float) -> tuple[int, str, float]:
    """Send a ping (and read its echo) every ~50 ms until the server closes: its close
    code, reason and how long after the first ping it came."""
    start = time.monotonic()
    deadline = start + within
    n = 0
    while time.monotonic() < deadline:
        try:
            ws.send(ping(f"active-{n}"))
            n += 1
            assert recv_json(ws, timeout=2)["type"] == "echo"
            ws.recv(timeout=0.05)  # paces the pings; nothing else is expected
            pytest.fail("an unexpected frame")
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                pytest.fail(f"closed without a close frame: {exc}")
            return exc.rcvd.code, exc.rcvd.reason, time.monotonic() - start
    pytest.fail(f"still open after {within}s of activity")


def test_max_lifetime_closes_1001_even_while_active(serve: Serve) -> None:
    server = serve(
        {
            "liveness": {"idle_timeout_seconds": 0.3, "max_lifetime_seconds": 0.9},
            "limits": {"messages_per_minute": 6000, "message_burst": 100},
        }
    )
    ws, _ = server.hello()
    with ws:
        code, reason, after = closed_while_active(ws, within=2.5)
    # never idle for 0.3 s: the lifetime, not the idle timeout, ended it
    assert (code, reason) == (1001, "max lifetime")
    assert after >= 0.7
    closed = eventually(lambda: server.audit.events("connection_closed"), timeout=2, what="closed")
    assert closed[0]["cause"] == "max_lifetime"


# -- 7. revocation -----------------------------------------------------------------------


def test_revocation_closes_4003_and_refuses_new_handshakes(serve: Serve) -> None:
    server = serve()
    alice, _ = server.hello(make_token("alice"))
    bob, _ = server.hello(make_token("bob"))
    with alice, bob:
        server.run(server.guard.store.revoke("sub", "alice", 60))
        assert close_of(alice)[0] == 4003
        echo_of(bob, ping("bob-still-here"))  # other subjects are untouched

        refused = server.refused(make_token("alice"))
        assert refused.response.status_code == 401
    revoked = server.audit.events("connection_revoked")
    assert [(e["subject"], e["by"]) for e in revoked] == [("alice", "sub")]
    reasons = [(e["status"], e["reason"]) for e in server.audit.events("handshake_refused")]
    assert reasons == [(401, "revoked")]


def test_operator_disconnect_and_ban_close_1008(serve: Serve) -> None:
    server = serve()
    alice, _ = server.hello(make_token("alice"))
    bob, _ = server.hello(make_token("bob"))
    with alice, bob:
        server.run(server.guard.disconnect("sub", "alice"))
        assert close_of(alice) == (1008, "disconnected by operator")
        echo_of(bob, ping("bob-still-here"))
        server.run(server.guard.ban_address("127.0.0.1", 60))
        assert close_of(bob) == (1008, "banned")
    refused = server.refused(make_token("carol"))
    assert refused.response.status_code == 429
    closed = eventually(
        lambda: len(server.audit.events("connection_closed")) == 2 or None, what="both closed"
    )
    assert closed
    causes = [
        (e["subject"], e["code"], e["cause"]) for e in server.audit.events("connection_closed")
    ]
    assert causes == [("alice", 1008, "admin"), ("bob", 1008, "banned")]


def test_revocation_before_the_app_accepts_is_not_lost(serve: Serve) -> None:
    rec = Recorder()
    gate = asyncio.Event()  # set on the server's loop

    async def slow_accept(websocket: WebSocket) -> None:
        rec.calls.append(websocket.url.path)
        await gate.wait()  # e.g. a FastAPI dependency doing a lookup before accept
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        while (await websocket.receive())["type"] != "websocket.disconnect":
            await websocket.send_json({"type": "echo"})

    server = serve(app=Starlette(routes=[WebSocketRoute("/ws", slow_accept)]))
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(server.connect, make_token("alice"))
        eventually(lambda: rec.calls, what="admitted, the app not yet accepting")
        server.run(server.guard.store.revoke("sub", "alice", 60))
        server.loop.call_soon_threadsafe(gate.set)
        failure = opening.exception(timeout=10)
    if failure is not None:  # refusing the handshake would do as well
        assert isinstance(failure, InvalidStatus), failure
        assert failure.response.status_code in (401, 403)
        return
    with opening.result() as ws:
        with contextlib.suppress(ConnectionClosed):
            ws.send(ping("probe"))  # answered at once while the connection stays open
        assert next_close(ws, skip="hello") == 4003


class PushRecord:
    """What the push-only endpoint did (appended from the server thread)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.exited: list[str] = []


def push_app(rec: PushRecord) -> Starlette:
    """``/ws``: accepts, then sends a tick every ~20 ms; never calls receive()."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        rec.started.append(websocket.user.display_name)
        how = "returned"
        try:
            n = 0
            while True:
                await websocket.send_text(json.dumps({"type": "tick", "n": n}))
                n += 1
                await asyncio.sleep(0.02)  # the app's own pace, not a test wait
        except WebSocketDisconnect as exc:
            how = f"disconnect {exc.code}"
        finally:
            rec.exited.append(how)

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def test_push_only_app_learns_the_revocation_and_frees_its_slot(serve: Serve) -> None:
    rec = PushRecord()
    server = serve({"limits": {"connections_per_subject": 1}}, app=push_app(rec))
    first = server.connect(make_token("alice", jti="push-1"))
    with first:
        assert recv_json(first)["type"] == "tick"
        server.run(server.middleware.revoke("jti", "push-1", 60))
        assert close_of(first, timeout=3)[0] == 4003
    # the app's send loop ended: Starlette raised WebSocketDisconnect from send
    exited = eventually(lambda: rec.exited, timeout=3, what="the push loop ended")
    assert exited == ["disconnect 1006"]
    eventually(lambda: server.live() == 0, timeout=3, what="the registry emptied")
    closed = eventually(lambda: server.audit.events("connection_closed"), timeout=3, what="closed")
    assert (closed[0]["code"], closed[0]["cause"]) == (4003, "revoked")

    # the subject's only slot was released: another token of alice's is admitted
    second = server.connect(make_token("alice", jti="push-2"))
    with second:
        assert recv_json(second)["type"] == "tick"
        server.run(server.middleware.revoke("jti", "push-2", 60))  # ends its loop too
        assert close_of(second, timeout=3)[0] == 4003
    eventually(lambda: len(rec.exited) == 2, timeout=3, what="the second push loop ended")
    assert rec.started == ["alice", "alice"]
    refused = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert refused == []


# -- 8. HTTP passes through --------------------------------------------------------------


def test_http_passes_through_untouched(serve: Serve) -> None:
    server = serve()
    url = f"http://127.0.0.1:{server.port}/health"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"ok"
    events = server.audit.events()
    assert [e["event"] for e in events if "handshake" in e["event"]] == []
    assert server.audit.events("connection_admitted") == []
    assert server.guard.monitor.metrics.handshakes[("admitted", "ok")] == 0


def test_a_client_address_the_server_took_from_x_forwarded_for_is_not_believed(
    serve: Serve,
) -> None:
    """uvicorn takes the client's address from ``X-Forwarded-For`` for requests from
    127.0.0.1 unless told otherwise; with no proxy in ``proxy.trusted`` that address is
    whatever the client wrote (a way around per-address limits and bans, or into someone
    else's ban). Such a handshake is refused 500 and audited with no client address; with
    the proxy listed in ``proxy.trusted`` the forwarded address is the client's."""
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    server = serve({"limits": {"connections_per_address": 1}})
    rewrites = server.kind.startswith("uvicorn")  # hypercorn believes no header by default
    if rewrites:
        refusal = server.refused(make_token("alice"), extra_headers=spoofed)
        assert refusal.response.status_code == 500
        (record,) = server.audit.events("handshake_refused")
        assert record["reason"] == "forwarded_client"
        assert record.get("client") is None
        assert server.rec.calls == []
        assert server.guard.monitor.metrics.refusals["handshake", "other"] == 1
    else:  # the header is not believed: the socket's own address is the client's
        first, _ = server.hello(make_token("alice"), extra_headers=spoofed)
        with first:
            other = {"X-Forwarded-For": "203.0.113.8"}
            assert (
                server.refused(make_token("bob"), extra_headers=other).response.status_code == 429
            )
        assert [e["client"] for e in server.audit.events("connection_admitted")] == ["127.0.0.1"]
    ws, _ = server.hello(make_token("carol"))  # no header: the socket's address, admitted
    ws.close()

    trusting = serve({"proxy": {"trusted": ["127.0.0.1"]}})
    ws, _ = trusting.hello(make_token("alice"), extra_headers=spoofed)
    ws.close()
    assert [e["client"] for e in trusting.audit.events("connection_admitted")] == ["203.0.113.7"]


def test_an_address_out_of_its_handshake_allowance_is_paced_whatever_it_forwards(
    serve: Serve,
) -> None:
    """An address whose handshakes are refused for their rate gets its 429 however its
    request is dressed: with its own address in ``X-Forwarded-For`` (which a server that
    reads no forwarded header reports as the socket's, and uvicorn as the header's) it
    is not answered the misconfiguration's 500 first, unpaced."""
    server = serve({"limits": {"handshakes_per_minute": 1, "handshake_burst": 1}})
    ws, _ = server.hello(make_token("alice"))
    ws.close()
    assert server.refused(make_token("alice")).response.status_code == 429
    own = {"X-Forwarded-For": "127.0.0.1"}
    for _ in range(3):
        refusal = server.refused(make_token("alice"), extra_headers=own)
        assert refusal.response.status_code == 429
        assert "retry-after" in refusal.response.headers
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert "forwarded_client" not in reasons


@pytest.mark.parametrize(
    "spoofed",
    ["203.0.113.7:5555", "[203.0.113.7]", "[2001:db8::1]:7", "198.51.100.9, 203.0.113.7:1"],
    ids=["port", "brackets", "v6-port", "list-port"],
)
def test_a_forwarded_address_with_a_port_or_brackets_is_not_believed_either(
    serve: Serve, spoofed: str
) -> None:
    """uvicorn takes a forwarded entry's host without its port and brackets: the address
    it puts in the scope is the header's all the same, and is refused as such (compared
    as written, ``203.0.113.7:5555`` let a client pick its address past per-address
    limits and bans)."""
    server = serve({"limits": {"connections_per_address": 1}})
    if not server.kind.startswith("uvicorn"):
        pytest.skip("hypercorn believes no forwarded header by default")
    refusal = server.refused(make_token("alice"), extra_headers={"X-Forwarded-For": spoofed})
    assert refusal.response.status_code == 500
    (record,) = server.audit.events("handshake_refused")
    assert record["reason"] == "forwarded_client"
    assert server.rec.calls == []


@pytest.mark.parametrize(
    ("headers", "peer", "believed"),
    [
        ([(b"x-forwarded-for", b"203.0.113.7")], "203.0.113.7", True),
        ([(b"x-forwarded-for", b" 203.0.113.7:443 ")], "203.0.113.7", True),
        ([(b"x-forwarded-for", b"[203.0.113.7]:1")], "203.0.113.7", True),
        ([(b"x-forwarded-for", b"[2001:db8::1]:7")], "2001:db8::1", True),
        ([(b"x-forwarded-for", b"[2001:db8::1]")], "2001:db8::1", True),
        ([(b"x-forwarded-for", b"::ffff:203.0.113.7")], "203.0.113.7", True),
        ([(b"x-forwarded-for", b"a, b"), (b"x-forwarded-for", b"c:9")], "c", True),
        ([(b"x-forwarded-for", b"unknown")], "unknown", True),
        ([(b"forwarded", b'for="[2001:db8::1]:4711";proto=https')], "2001:db8::1", True),
        ([(b"forwarded", b"for=192.0.2.60, for=198.51.100.17")], "198.51.100.17", True),
        ([(b"x-forwarded-for", b"203.0.113.7")], "127.0.0.1", False),
        ([(b"x-forwarded-for", b"203.0.113.70:7")], "203.0.113.7", False),
        ([(b"forwarded", b"by=203.0.113.7")], "203.0.113.7", False),
        ([(b"x-real-ip", b"203.0.113.7")], "203.0.113.7", False),
        ([], "127.0.0.1", False),
    ],
)
def test_which_client_addresses_came_from_a_forwarded_header(
    headers: list[tuple[bytes, bytes]], peer: str, believed: bool
) -> None:
    """The scope's client address is the server's reading of a forwarded header when it
    is one of the header's addresses in any form a server reads one."""
    assert _forwarded_client({"headers": headers}, peer) is believed


def test_a_token_in_the_url_under_another_name_is_not_written_to_the_audit_log(
    serve: Serve,
) -> None:
    """As on the standalone engines: a refused request's target is audited with anything
    shaped like a JWT replaced, whatever name or part of the URL carried it."""
    server = serve()
    token = make_token("leaky")
    refusal = server.refused(transport="none", path=f"/ws?TOKEN={token}&room=1")
    assert refusal.response.status_code == 401
    (record,) = server.audit.events("handshake_refused")
    assert record["path"] == "/ws?TOKEN=REDACTED&room=1"
    assert token.split(".")[2] not in server.audit.getvalue()


# -- 9. concurrency limits ---------------------------------------------------------------


def test_connections_per_address_and_released_slots(serve: Serve) -> None:
    server = serve({"limits": {"connections_per_address": 1}})
    first, _ = server.hello(make_token("alice"))
    with first:
        refused = server.refused(make_token("bob"))
        assert refused.response.status_code == 429
        assert header(refused, "Retry-After") is not None
    # the slot is released once the connection's flow has ended
    eventually(lambda: server.audit.events("connection_closed"), what="the first connection closed")
    again, hello = server.hello(make_token("bob"))
    with again:
        assert hello["user"] == "bob"
    reasons = [(e["status"], e["reason"]) for e in server.audit.events("handshake_refused")]
    assert reasons == [(429, "too_many_connections")]


# -- 10. metrics and audit ---------------------------------------------------------------


def test_audit_and_metrics_of_a_connection(serve: Serve) -> None:
    server = serve()
    metrics = server.guard.monitor.metrics
    assert metrics.handshakes[("admitted", "ok")] == 0

    ws, _ = server.hello(make_token("alice"))
    with ws:
        echo_of(ws, ping("m1"))
    # a client close: hypercorn reports every client close to the app as 1006, which
    # ASGI cannot tell from a lost connection (counted as "network")
    expected = (1006, "network") if server.kind == "hypercorn" else (1000, "client")
    closed = eventually(lambda: server.audit.events("connection_closed"), what="closed")
    assert (closed[0]["code"], closed[0]["closed_by"]) == expected

    ws, _ = server.hello(make_token("alice"))
    with ws:
        ws.send(b"binary")
        assert close_of(ws)[0] == 1003
    closed = eventually(
        lambda: server.audit.events("connection_closed")[1:], what="the second close"
    )
    assert (closed[0]["code"], closed[0]["closed_by"], closed[0]["cause"]) == (
        1003,
        "server",
        "binary",
    )

    admitted = server.audit.events("connection_admitted")
    assert [e["subject"] for e in admitted] == ["alice", "alice"]
    assert len({e["connection_id"] for e in admitted}) == 2
    assert [e["connection_id"] for e in server.audit.events("connection_closed")] == [
        e["connection_id"] for e in admitted
    ]
    assert metrics.handshakes[("admitted", "ok")] == 2
    first = server.audit.events("connection_closed")[0]
    assert first["messages_in"] == 1 and first["messages_out"] >= 2


# -- 11. the FastAPI example -------------------------------------------------------------


def test_fastapi_chat_example_broadcasts_with_the_sender_subject(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the example builds its own Config from the environment at import time
    monkeypatch.setenv("WSGUARD_JWT_SECRET", "example-secret-that-is-long-enough-0123456789")
    monkeypatch.syspath_prepend(str(ASGI_EXAMPLES))
    example = importlib.import_module("fastapi_chat")
    server = serve(app=example.api)

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    alice = server.connect(make_token("alice"), path="/chat")
    bob = server.connect(make_token("bob"), transport="subprotocol", path="/chat")
    with alice, bob:
        eventually(lambda: len(example.members) == 2, what="both members joined")
        send_json(alice, {"type": "chat", "text": "hi", "room": "r"})
        expected = {"type": "broadcast", "from": "alice", "room": "r", "text": "hi"}
        assert recv_json(alice) == expected
        assert recv_json(bob) == expected
        # the policy still applies: an invalid chat never reaches the room
        send_json(bob, {"type": "chat", "text": 1})
        assert recv_json(bob)["code"] == "invalid_message"
        send_json(bob, {"type": "chat", "text": "yo"})
        assert recv_json(alice)["from"] == "bob"
    eventually(lambda: not example.members, what="the room emptied")


# -- 12. no per-connection state on the middleware ---------------------------------------


def test_middleware_holds_no_per_connection_state(serve: Serve) -> None:
    server = serve()
    middleware = server.middleware
    # the lifespan start-up has started the guard before any WebSocket
    assert server.call(lambda: middleware._started)
    # attribute -> the object bound to it: nothing is added, removed or rebound later
    before = server.call(lambda: {k: id(v) for k, v in vars(middleware).items()})
    assert before.keys() >= NODE_ATTRIBUTES

    a, _ = server.hello(make_token("alice"))
    b, _ = server.hello(make_token("bob"), transport="subprotocol")
    with a, b:
        live = server.call(lambda: sorted(c.subject for c in middleware.connections.values()))
        assert live == ["alice", "bob"]
        echo_of(a, ping("x"))
    c, _ = server.hello(make_token("carol"))
    with c:
        c.send(b"binary")
        close_of(c)
    eventually(lambda: server.live() == 0, what="the registry emptied")
    eventually(lambda: len(server.audit.events("connection_closed")) == 3, what="all closed")
    assert server.call(lambda: {k: id(v) for k, v in vars(middleware).items()}) == before
    assert server.call(lambda: dict(middleware.connections)) == {}


def test_an_ended_connection_leaves_nothing_for_the_garbage_collector(serve: Serve) -> None:
    """The middleware's connection object and its Session refer to each other, and the
    connection to the server's own ``receive`` and ``send`` (its protocol object, its
    parser, its buffers): left in a cycle, each ended connection would wait for the
    garbage collector, whose pauses are every other client's latency and grow with the
    objects they sweep. Ended, they are freed at once, whatever ended them."""
    server = serve()
    middleware = server.middleware

    def connections() -> None:
        for name in ("alice", "bob", "carol"):
            ws, _ = server.hello(make_token(name))
            with ws:
                echo_of(ws, ping(name))
        ws, _ = server.hello(make_token("dave"))
        with ws:
            ws.send(b"binary")  # closed by wsguard (1003)
            close_of(ws)
        eventually(lambda: server.live() == 0, what="all ended")
        eventually(lambda: len(server.audit.events("connection_closed")) == 4, what="audited")

    def ours(o: Any) -> bool:
        if isinstance(o, AsgiConnection):
            return o._host is middleware
        return type(o) is Session and o.host is middleware

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        connections()
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if ours(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


# -- 13. under the ASGI server, its own failures are the server's -----------------------------


@pytest.fixture
def asgi_server() -> Iterator[AsgiServer]:
    config = make_config({"limits": {"max_message_bytes": 1024}})
    server = AsgiServer("uvicorn-sansio", echo_app, config, Recorder(), 1024)
    server.start()
    yield server
    server.stop()


def raw_client(server: AsgiServer) -> RawClient:
    client = RawClient(cast(RunningServer, server), make_token())
    assert client.recv_json()["type"] == "welcome"
    return client


def closed_record(server: AsgiServer) -> dict[str, Any]:
    events = eventually(lambda: server.audit.events("connection_closed"), what="closed")
    assert len(events) == 1, events
    return events[0]


def read_close(client: RawClient) -> int:
    code = client.read_close()
    client.send(frame(OP_CLOSE, client.close_payload[:2]))
    client.sock.close()
    return code


def test_asgi_servers_own_1009_is_a_server_size_refusal(asgi_server: AsgiServer) -> None:
    metrics = asgi_server.guard.monitor.metrics
    with raw_client(asgi_server) as client:
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"big"}'.ljust(1025)))
        assert read_close(client) == 1009  # uvicorn's ws_max_size, not wsguard's check
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record["cause"]) == (1009, "server", "too_big")
    counted = asgi_server.call(lambda: (metrics.refusals["message", "size"], dict(metrics.closes)))
    assert counted == (1, {("1009", "server"): 1})  # as wsguard counts its own 1009


@pytest.mark.parametrize(
    ("payload", "code", "cause"),
    [
        (frame(OP_TEXT, b'{"type":"ping","id":"\xff"}'), 1007, "invalid_utf8"),
        (bytes([ping_frame("rsv")[0] | 0x20]) + ping_frame("rsv")[1:], 1002, "protocol_error"),
    ],
    ids=["1007", "1002"],
)
def test_asgi_server_failures_are_the_servers(
    asgi_server: AsgiServer, payload: bytes, code: int, cause: str
) -> None:
    with raw_client(asgi_server) as client:
        client.send(payload)
        assert read_close(client) == code
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record["cause"]) == (code, "server", cause)


def test_asgi_client_close_stays_the_clients(asgi_server: AsgiServer) -> None:
    with raw_client(asgi_server) as client:
        client.send(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        read_close(client)
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record.get("cause")) == (1000, "client", None)


def failing_app(rec: Recorder) -> Starlette:
    """``/ws``: accepts, sends a hello, then raises at the first message."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.receive_text()
        rec.calls.append("raising")
        raise RuntimeError("the app's bug")

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def test_an_app_that_raises_after_accept_closes_the_connection_1011(serve: Serve) -> None:
    """The app's failure is the server's: the client gets 1011 (RFC 6455 7.4.1, an
    unexpected condition), not a dropped connection, under every ASGI server, and the
    audit says so; the exception still reaches the server's log."""
    rec = Recorder()
    server = serve(app=failing_app(rec))
    ws, _ = server.hello(make_token("alice"))
    with ws:
        ws.send(ping("boom"))
        assert close_of(ws)[0] == 1011
    assert rec.calls == ["raising"]
    record = closed_record(server)
    assert (record["code"], record["closed_by"], record["cause"]) == (1011, "server", "app_failed")


@pytest.mark.parametrize(
    "line",
    [b"Sec-WebSocket-Protocol: chat, bad token", b"Sec-WebSocket-Protocol: wsguard.v1\x85"],
    ids=["space-inside", "nel-byte"],
)
def test_a_subprotocol_list_that_is_not_tokens_never_reaches_the_app(
    serve: Serve, line: bytes
) -> None:
    """As on the standalone engines: refused (the policy's 400, or the server's own
    answer: h11 and hypercorn drop a head with a non-ASCII byte without one), never
    upgraded to the app."""
    from support.wire import WS_HEADERS, raw_request, response_head

    server = serve()
    request = raw_request(
        "GET /ws HTTP/1.1",
        "Host: 127.0.0.1",
        *WS_HEADERS,
        line,
        f"Authorization: Bearer {make_token()}",
    )
    head = response_head(server.port, request)
    assert head == b"" or head.startswith(b"HTTP/1.1 4"), head
    assert server.rec.calls == []


# -- what the app's accept may negotiate ------------------------------------------------------


async def choosing_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts as its query says: ``sp=<name>`` a subprotocol of its own choice, ``first``
    the first of ``scope["subprotocols"]`` (the common pattern), ``headers`` extra headers."""
    if scope["type"] != "websocket":
        return
    await receive()
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if "sp" in query:
        accept["subprotocol"] = query["sp"]
    if query.get("first") and scope["subprotocols"]:
        accept["subprotocol"] = scope["subprotocols"][0]
    if query.get("headers"):
        accept["headers"] = [
            (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
            (b"sec-websocket-protocol", b"evil.v9"),
            (b"Sec-WebSocket-Accept", b"forged"),
            (b"set-cookie", b"theme=dark"),
        ]
    await send(accept)
    hello = {"type": "hello", "subprotocols": scope["subprotocols"]}
    await send({"type": "websocket.send", "text": json.dumps(hello)})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def accept_head(server: AsgiServer, query: str, offered: str | None) -> bytes:
    from support.wire import WS_HEADERS, raw_request, response_head

    lines = [f"Sec-WebSocket-Protocol: {offered}"] if offered is not None else []
    request = raw_request(
        f"GET /ws?{query} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        *WS_HEADERS,
        *lines,
        f"Authorization: Bearer {make_token()}",
    )
    return response_head(server.port, request)


def response_headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = [line.split(":", 1) for line in lines if ":" in line]
    return [(name.strip().lower(), value.strip()) for name, value in pairs]


@pytest.mark.parametrize(
    ("query", "offered"),
    [
        ("sp=evil.v9", "wsguard.v1"),  # not offered at all
        ("sp=evil.v9", None),  # the client offered none
        ("sp=mqtt", "mqtt, wsguard.v1"),  # offered, but not a configured subprotocol
        ("sp=", "wsguard.v1"),  # an empty name
    ],
)
def test_an_app_accepting_with_a_subprotocol_not_allowed_is_refused(
    serve: Serve, query: str, offered: str | None
) -> None:
    """RFC 6455 4.2.2: the server selects one of the client's offers; wsguard: one of the
    configured ones. An app choosing another fails its accept: the server answers 500."""
    server = serve(app=choosing_app)
    head = accept_head(server, query, offered)
    assert head.startswith(b"HTTP/1.1 500"), head
    refused = server.audit.events("handshake_refused")
    assert [(e["status"], e["reason"]) for e in refused] == [(500, "app_subprotocol")]
    assert refused[0]["client"] == "127.0.0.1"
    assert server.audit.events("connection_admitted") == []
    eventually(lambda: server.live() == 0)


def test_the_app_sees_and_may_pick_only_configured_subprotocols(serve: Serve) -> None:
    server = serve({"subprotocols": ["wsguard.v1", "chat.v2"]}, app=choosing_app)
    # the common pattern, accept(subprotocol=scope["subprotocols"][0]): never "mqtt"
    ws = server.connect(subprotocols=("mqtt", "chat.v2", "wsguard.v1"), path="/ws?first=1")
    with ws:
        hello = recv_json(ws)
        assert hello["subprotocols"] == ["chat.v2", "wsguard.v1"]
        assert ws.subprotocol == "chat.v2"
    # another configured one the client offered than the one wsguard chose
    with server.connect(subprotocols=("wsguard.v1", "chat.v2"), path="/ws?sp=chat.v2") as ws:
        assert recv_json(ws)["type"] == "hello"
        assert ws.subprotocol == "chat.v2"
    admitted = server.audit.events("connection_admitted")
    assert [e.get("subprotocol") for e in admitted] == ["chat.v2", "chat.v2"]


def test_an_app_cannot_add_the_handshake_s_own_headers(serve: Serve) -> None:
    server = serve(app=choosing_app)
    head = accept_head(server, "headers=1", "wsguard.v1")
    assert head.startswith(b"HTTP/1.1 101"), head
    headers = response_headers(head)
    names = [name for name, _ in headers]
    assert [v for n, v in headers if n == "sec-websocket-protocol"] == ["wsguard.v1"]
    assert names.count("sec-websocket-accept") == 1
    assert ("sec-websocket-accept", "forged") not in headers
    assert "sec-websocket-extensions" not in names  # the client offered none
    assert ("set-cookie", "theme=dark") in headers  # the app's own headers stay


@pytest.mark.parametrize(
    ("headers", "peer", "read", "believed"),
    [
        # proxy.header = "forwarded": the server's reading of X-Forwarded-For is not wsguard's
        ([(b"x-forwarded-for", b"198.51.100.7")], "198.51.100.7", b"x-forwarded-for", True),
        ([(b"forwarded", b"for=10.4.4.4")], "10.4.4.4", b"x-forwarded-for", False),
        # proxy.header = "x-forwarded-for" with trusted proxies: the same header, agreed
        ([(b"x-forwarded-for", b"198.51.100.7")], "198.51.100.7", b"forwarded", False),
        ([(b"forwarded", b"for=10.4.4.4")], "10.4.4.4", b"forwarded", True),
        # no address at all ("unknown", an obfuscated "_hidden"): from a header, whichever
        ([(b"x-forwarded-for", b"unknown")], "unknown", b"forwarded", True),
        ([], "_hidden", b"forwarded", True),
    ],
)
def test_which_unread_header_a_client_address_came_from(
    headers: list[tuple[bytes, bytes]], peer: str, read: bytes, believed: bool
) -> None:
    assert _forwarded_client({"headers": headers}, peer, frozenset({read})) is believed


def test_a_server_believing_x_forwarded_for_while_wsguard_reads_forwarded_is_refused(
    serve: Serve,
) -> None:
    """Behind a proxy that writes ``Forwarded`` and passes the client's own
    ``X-Forwarded-For`` on, uvicorn (which reads only the latter, by default from
    127.0.0.1) let the client choose the address its limits and bans counted under, and
    have another address banned."""
    server = serve({"proxy": {"trusted": ["127.0.0.1/32"], "header": "forwarded"}})
    if not server.kind.startswith("uvicorn"):
        pytest.skip("hypercorn believes no forwarded header by default")
    chosen = {"X-Forwarded-For": "198.51.100.7", "Forwarded": "for=10.4.4.4"}
    refusal = server.refused(make_token("alice"), extra_headers=chosen)
    assert refusal.response.status_code == 500
    (record,) = server.audit.events("handshake_refused")
    assert record["reason"] == "forwarded_client"
    assert "198.51.100.7" not in server.audit.getvalue()
    # the proxy's Forwarded alone is wsguard's to read: the client is its for= address
    ws, _ = server.hello(make_token("alice"), extra_headers={"Forwarded": "for=10.4.4.4"})
    with ws:
        admitted = server.audit.events("connection_admitted")
        assert [e["client"] for e in admitted] == ["10.4.4.4"]


def test_a_message_naming_its_type_twice_never_reaches_the_app(serve: Serve) -> None:
    """The app gets the text: ``{"type":"command","type":"chat"}`` is checked as a chat
    (the last value) but is a command, which needs the admin scope, to a parser keeping
    the first value. Refused, escaped or not; a nested object's own ``type`` is no matter."""
    server = serve()
    ws, _ = server.hello(make_token("alice", scopes="chat"))
    twice = [
        '{"type":"command","type":"chat","text":"x"}',
        '{"type":"command","\\u0074ype":"chat","text":"x"}',
    ]
    with ws:
        for text in twice:
            ws.send(text)
            error = recv_json(ws)
            assert (error["type"], error["code"]) == ("error", "invalid_message"), text
            assert error["message"] == "Message has duplicate keys."
        fine = '{"type":"chat","text":"x","room":"type"}'
        ws.send(fine)
        assert recv_json(ws) == {"type": "echo", "text": fine}
    assert server.rec.received == [fine]
    refused = server.audit.events("message_refused")
    assert [e["code"] for e in refused] == ["invalid_message", "invalid_message"]


def test_session_keys_are_refused_by_the_middleware() -> None:
    """The session key travels in the welcome frame, which the middleware never sends (the
    application speaks first)."""
    from wsguard.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        WsGuardMiddleware(echo_app, config=make_config({"signing": {"session_keys": True}}))
    assert refused.value.key == "signing.session_keys"


@pytest.mark.parametrize(
    ("server", "admitted"),
    [
        (("203.0.113.5", 8000), False),  # uvicorn --host 0.0.0.0, a connection from afar
        (("10.0.0.7", 8000), False),
        (("127.0.0.1", 8000), True),
        (("::1", 8000), True),
        (None, True),  # a Unix socket: local
    ],
)
def test_the_development_key_admits_only_connections_that_came_in_on_loopback(
    tmp_path: Any, server: tuple[str, int] | None, admitted: bool
) -> None:
    """``wsguard serve`` uses the development key only when it binds loopback; the
    middleware cannot see where the ASGI server binds, so it looks at the address each
    connection came in on: elsewhere, refused 500 (and logged), never admitted with a
    key that is a file on a developer's machine."""
    from wsguard.config.keys import load_or_create_dev_key
    from wsguard.config.loader import validate_config

    config = validate_config({"auth": {"dev_key_file": str(tmp_path / "dev.key")}})
    secret, _ = load_or_create_dev_key(config.auth)
    token = make_token("alice", secret=secret.decode())

    class Kept(AuditCapture):
        def close(self) -> None:  # read after the middleware's shutdown flushed it
            pass

    audit = Kept()
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.sleep(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def main() -> None:
        middleware = WsGuardMiddleware(echo_app, guard=Guard(config, audit=AuditLog(audit)))
        scope = direct_scope(token)
        scope["server"] = server
        events = iter([{"type": "websocket.connect"}])

        async def first_receive() -> Message:
            return next(events, None) or await receive()

        try:
            await asyncio.wait_for(middleware(scope, first_receive, send), 5)
        finally:
            await middleware.shutdown()

    asyncio.run(main())
    refused = [m for m in sent if m["type"] == "websocket.http.response.start"]
    if admitted:
        assert refused == [] and sent[0]["type"] == "websocket.accept", sent
    else:
        assert [m["status"] for m in refused] == [500], sent
        [event] = audit.events("handshake_refused")
        assert event["reason"] == "dev_key_beyond_loopback"
        assert audit.events("connection_admitted") == []
