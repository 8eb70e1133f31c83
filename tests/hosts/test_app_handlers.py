"""Typed handlers on both engines: every delivered message type is answered (a type
without a handler gets ``unhandled_type``), and the welcome frame's ``types`` lists only
the types that are handled."""

from __future__ import annotations

import json
from typing import Any

from conftest import RunningServer, ServerFactory
from wsguard import App
from wsguard.session import Connection


def chat_only(app: App) -> None:
    @app.on("chat")
    def chat(conn: Connection, message: dict[str, Any]) -> None:
        conn.send({"type": "got", "text": message["text"]})


def test_a_type_without_a_handler_gets_an_unhandled_type_error(
    server_factory: ServerFactory,
) -> None:
    budget = 3
    server = server_factory({"limits": {"violation_budget": budget}}, demo=False, setup=chat_only)
    with server.connect() as ws:
        welcome = json.loads(ws.recv(timeout=5))
        assert welcome["types"] == ["auth", "chat"]  # not ping, data, command: no handler
        for i in range(budget + 2):  # not a violation: the policy passed it
            ws.send(json.dumps({"type": "ping", "id": f"p{i}"}))
            error = json.loads(ws.recv(timeout=5))
            assert isinstance(error.pop("message"), str)
            assert error == {"type": "error", "code": "unhandled_type", "ref": f"p{i}"}
        ws.send(json.dumps({"type": "chat", "text": "still here"}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "got", "text": "still here"}


def test_welcome_types_follow_the_handlers(server_factory: ServerFactory) -> None:
    def raw_and_typed(app: App) -> None:
        chat_only(app)

        @app.on("data", raw=True)
        def data(conn: Connection, raw: str | bytes) -> None:
            conn.send_raw(raw)

    def catch_all(app: App) -> None:
        chat_only(app)

        @app.on_message
        def anything(conn: Connection, raw: str | bytes) -> None:
            conn.send({"type": "caught"})

    def types_of(server: RunningServer) -> list[str]:
        with server.connect() as ws:
            welcome: dict[str, Any] = json.loads(ws.recv(timeout=5))
        return list(welcome["types"])

    everything = ["auth", "chat", "command", "data", "ping"]
    assert types_of(server_factory()) == everything  # the demo handles all of them
    assert types_of(server_factory(demo=False, setup=raw_and_typed)) == ["auth", "chat", "data"]
    with_catch_all = server_factory(demo=False, setup=catch_all)
    assert types_of(with_catch_all) == everything
    with with_catch_all.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "caught"}
    assert types_of(server_factory(demo=False)) == ["auth"]
