"""The demo protocol of ``wsguard serve``: welcome, ping/pong, broadcast, errors."""

from __future__ import annotations

import json

from conftest import RunningServer, make_token


def recv_json(ws: object) -> dict[str, object]:
    return json.loads(ws.recv(timeout=5))  # type: ignore[attr-defined, no-any-return]


def test_welcome_carries_subject_connection_id_and_limits(server: RunningServer) -> None:
    with server.connect(make_token("alice", scopes="chat")) as ws:
        welcome = recv_json(ws)
    assert welcome["type"] == "welcome"
    assert welcome["subject"] == "alice"
    assert isinstance(welcome["connection_id"], str) and welcome["connection_id"]
    limits = welcome["limits"]
    assert isinstance(limits, dict)
    assert limits["max_message_bytes"] == 8192
    assert limits["messages_per_minute"] == 100


def test_ping_gets_pong_with_same_id(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": "abc"}))
        pong = recv_json(ws)
    assert pong["type"] == "pong"
    assert pong["id"] == "abc"
    assert isinstance(pong["ts"], float)


def test_chat_is_broadcast_to_others_reserialized(server: RunningServer) -> None:
    with (
        server.connect_welcomed(make_token("alice")) as a,
        server.connect_welcomed(make_token("bob")) as b,
    ):
        a.send('{"type":"chat",   "text":"hello"}')
        got = recv_json(b)
        assert got == {
            "type": "broadcast",
            "from": "alice",
            "message": {"type": "chat", "text": "hello"},
        }
        # the sender does not get its own message back: its next frame is the pong
        a.send(json.dumps({"type": "ping", "id": 1}))
        assert recv_json(a)["type"] == "pong"


def test_data_and_admin_command_are_broadcast(server: RunningServer) -> None:
    with (
        server.connect_welcomed(make_token("root", scopes="admin")) as admin,
        server.connect_welcomed(make_token("bob")) as b,
    ):
        admin.send(json.dumps({"type": "data", "channel": "c1", "payload": {"x": 1}}))
        assert recv_json(b)["message"] == {"type": "data", "channel": "c1", "payload": {"x": 1}}
        admin.send(json.dumps({"type": "command", "name": "reload", "args": ["a"]}))
        got = recv_json(b)
        assert got["from"] == "root"
        assert got["message"] == {"type": "command", "name": "reload", "args": ["a"]}


def test_errors_have_stable_codes_and_connection_survives(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        ws.send("{not json")
        assert recv_json(ws)["code"] == "invalid_json"
        ws.send(json.dumps({"type": "nope", "id": 5}))
        err = recv_json(ws)
        assert err == {
            "type": "error",
            "code": "unknown_type",
            "message": "Unknown message type.",
            "ref": 5,
        }
        ws.send(json.dumps({"type": "chat", "text": 42, "id": "m1"}))
        err = recv_json(ws)
        assert err["code"] == "invalid_message"
        assert err["pointer"] == "/text"
        assert err["ref"] == "m1"
        assert "42" not in str(err["message"])
        ws.send(json.dumps([1, 2]))
        assert recv_json(ws)["code"] == "invalid_message"
        ws.send(json.dumps({"type": "ping", "id": 9}))
        assert recv_json(ws)["type"] == "pong"


def test_user_handlers_via_app_on(server_factory: object) -> None:
    from wsguard.hosts.app import App
    from wsguard.session import Connection

    def setup(app: App) -> None:
        @app.on("chat")
        async def shout(conn: Connection, message: dict[str, object]) -> None:
            conn.send({"type": "shout", "text": str(message["text"]).upper()})

    running = server_factory(demo=False, setup=setup)  # type: ignore[operator]
    with running.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "chat", "text": "hi"}))
        assert recv_json(ws) == {"type": "shout", "text": "HI"}


def _claims_echo(app: object) -> None:
    from wsguard.hosts.app import App
    from wsguard.session import Connection

    assert isinstance(app, App)

    @app.on_connect
    async def echo(conn: Connection) -> None:
        conn.send({"type": "claims", "claims": dict(conn.identity.claims)})


def test_token_claims_are_kept_only_when_configured(server_factory: object) -> None:
    token = make_token("alice", tenant="acme")
    plain = server_factory(setup=_claims_echo)  # type: ignore[operator]
    with plain.connect_welcomed(token) as ws:
        assert recv_json(ws) == {"type": "claims", "claims": {}}
    keeping = server_factory({"auth": {"keep_claims": True}}, setup=_claims_echo)  # type: ignore[operator]
    with keeping.connect_welcomed(token) as ws:
        claims = recv_json(ws)["claims"]
    assert isinstance(claims, dict)
    assert claims["tenant"] == "acme"
    assert claims["sub"] == "alice"
