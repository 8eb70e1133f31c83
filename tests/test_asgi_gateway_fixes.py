"""Regression tests of the review fixes (issue 7) to the ASGI middleware, the gateway
and the opaque message format.

Each test pins one fixed behaviour and fails if its fix is reverted:

* ASGI: an app that only sends learns that wsguard closed the connection (and frees its
  slot); a cookie token after a whitespace separator is taken out of the scope; idle
  timeout and maximum lifetime are enforced; the refreshed identity is what the app sees;
  a message with both ``text`` and ``bytes`` reaches the app as the text the policy saw.
* Gateway: routes ignore the query; JSON with duplicate keys never goes upstream;
  wsguard's own close code goes upstream; a scope with a space keeps its boundary in
  the identity header.
* Opaque mode: only ``messages.binary`` allows binary frames; signed types need JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

import test_asgi_middleware
import test_gateway
from conftest import SECRET, AuditCapture, close_of, eventually, make_config, make_token
from test_asgi_middleware import (
    Serve,
    ping,
    recv_json,
    send_json,
)
from test_gateway import (
    IDENTITY_SECRET,
    Backend,
    BackendFactory,
    GatewayFactory,
    chat,
    echo_roundtrip,
)
from test_signing import ALICE_SECRET, SIGNED_CHAT, write_keys
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.decisions import Close as CloseDecision
from wsguard.core.decisions import Deliver
from wsguard.core.identity import Identity
from wsguard.core.messages import MessagePolicy
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.asgi import Message, Receive, Scope, Send, WsGuardMiddleware
from wsguard.hosts.gateway.identity import verify_identity
from wsguard.observability.audit import AuditLog

# the fixtures of those modules, used here too (pytest finds fixtures by module attribute):
# serve is parametrized over uvicorn-sansio, uvicorn-wsproto and hypercorn
serve = test_asgi_middleware.serve
backends = test_gateway.backends
backend = test_gateway.backend
gateways = test_gateway.gateways

# -- ASGI 1: an application that only sends --------------------------------------------------


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


# -- ASGI 2: a cookie token after a whitespace separator -------------------------------------


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


# -- ASGI 3: idle timeout and maximum lifetime ----------------------------------------------


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


# -- ASGI 4: the refreshed identity is the app's ----------------------------------------------


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


# -- ASGI 5: both text and bytes in one message (in-process) ---------------------------------


def test_message_with_text_and_bytes_reaches_the_app_as_text_only() -> None:
    token = make_token("alice")
    text = '{"type":"ping","id":1}'
    scope: Scope = {
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
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": text, "bytes": b"\x00EVIL"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Message] = []
    got: list[Message] = []

    async def receive() -> Message:
        if len(incoming) > 1:
            return incoming.pop(0)
        return dict(incoming[0])  # the disconnect, again if asked

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def app(app_scope: Scope, app_receive: Receive, app_send: Send) -> None:
        assert (await app_receive())["type"] == "websocket.connect"
        await app_send({"type": "websocket.accept"})
        while True:
            message = await app_receive()
            got.append(dict(message))
            if message["type"] == "websocket.disconnect":
                return

    async def main() -> None:
        middleware = WsGuardMiddleware(
            app, guard=Guard(make_config(), audit=AuditLog(AuditCapture()))
        )
        try:
            await asyncio.wait_for(middleware(scope, receive, send), 5)
        finally:
            await middleware.shutdown()

    asyncio.run(main())
    assert sent[0]["type"] == "websocket.accept", sent  # admitted
    assert got[0] == {"type": "websocket.receive", "text": text}
    assert "bytes" not in got[0]
    assert [m["type"] for m in got] == ["websocket.receive", "websocket.disconnect"]


# -- gateway 6: routes ignore the query ------------------------------------------------------


def test_route_matches_a_path_with_a_query(
    backends: BackendFactory,
    gateways: GatewayFactory,
) -> None:
    default, side_a = backends(), backends()
    gw = gateways(default.url, {"gateway": {"routes": {"/a": side_a.url}}})
    with gw.connect(path="/a?room=1") as ws:
        echo_roundtrip(ws, chat("to a"))
    assert default.connections == []  # not the default upstream
    record = side_a.connection()
    assert record.received == [chat("to a")]
    assert record.path == "/"  # the client's query is not passed on


# -- gateway 7: duplicate keys ----------------------------------------------------------------


def test_duplicate_keys_never_reach_the_backend(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url)
    duplicates = [
        '{"type":"chat","text":"x","text":"y"}',
        '{"type":"command","type":"chat","text":"z"}',  # a "command" to a first-key parser
    ]
    with gw.connect(make_token("alice", scopes="chat")) as ws:
        for text in duplicates:
            ws.send(text)
            error = recv_json(ws)  # an echo of the backend would show it got through
            assert (error.get("type"), error.get("code")) == ("error", "invalid_message"), (
                text,
                error,
            )
        valid = chat("normal")
        echo_roundtrip(ws, valid)
    assert backend.connection().received == [valid]


# -- gateway 8: wsguard's close code goes upstream --------------------------------------------


@pytest.mark.parametrize("answer", ["1000", "echo"])
def test_revocation_close_code_reaches_the_backend(
    answer: str,
    backend: Backend,
    gateways: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = gateways(backend.url)
    with gw.connect(make_token("alice")) as ws:
        echo_roundtrip(ws, chat("hi"))
        record = backend.connection()
        if answer == "1000":  # the client answers wsguard's close with 1000, not 4003
            protocol = ws.protocol
            original = protocol.send_frame

            def answer_1000(frame: Frame) -> None:
                if frame.opcode is Opcode.CLOSE:
                    frame = Frame(Opcode.CLOSE, Close(1000, "").serialize())
                original(frame)

            monkeypatch.setattr(protocol, "send_frame", answer_1000)
        gw.run_coro(gw.app.guard.store.revoke("sub", "alice", 60))
        assert close_of(ws, timeout=3)[0] == 4003
    assert record.closed.wait(3)
    assert record.close_code == 4003  # what wsguard said, not the client's answer
    assert record.received == [chat("hi")]


# -- gateway 9: a scope with a space ----------------------------------------------------------


def test_scope_with_a_space_keeps_its_boundary(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET}})
    token = make_token("alice", scopes=None, roles=["billing admin", "chat"])
    with gw.connect(token) as ws:
        echo_roundtrip(ws, chat("hi"))
    headers = backend.connection().headers
    assert headers.get_all("X-Wsguard-Scopes") == ["billing%20admin chat"]
    scopes = [urllib.parse.unquote(s) for s in headers["X-Wsguard-Scopes"].split(" ")]
    assert scopes == ["billing admin", "chat"]
    assert verify_identity(headers, IDENTITY_SECRET, upstream=backend.url)


# -- opaque mode 10 ---------------------------------------------------------------------------


def opaque_policy(**messages: Any) -> MessagePolicy:
    config = make_config({"messages": {"format": "opaque", **messages}})
    return MessagePolicy(config, TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode())))


def test_opaque_binary_type_does_not_allow_binary_frames() -> None:
    refused = opaque_policy(binary=False, types={"blob": {"binary": True}})
    state = refused.open(Identity("alice"), 0.0)
    closed = refused.evaluate(state, b"\x00\x01", 0.0)
    assert isinstance(closed, CloseDecision), closed
    assert closed.code == 1003
    assert isinstance(refused.evaluate(state, "text passes unparsed", 0.0), Deliver)
    allowed = opaque_policy(binary=True, types={"blob": {"binary": True}})
    state = allowed.open(Identity("alice"), 0.0)
    assert isinstance(allowed.evaluate(state, b"\x00\x01", 0.0), Deliver)


def test_opaque_format_with_a_signed_type_is_a_config_error(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys.json", [("alice-1", "alice", ALICE_SECRET)])
    signing = {"keys_file": str(keys)}
    make_config({"messages": {"types": SIGNED_CHAT}, "signing": signing})  # fine with json
    with pytest.raises(ConfigError) as caught:
        make_config({"messages": {"format": "opaque", "types": SIGNED_CHAT}, "signing": signing})
    assert caught.value.key == "messages.format"
    assert "chat" in caught.value.message
