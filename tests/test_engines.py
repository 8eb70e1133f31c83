"""Engine-neutral behaviour of the App that the two engine adapters reach differently.

Every test here runs on both engines (``server_factory`` is parametrized): handlers that
are plain functions run inline, coroutine handlers run in a real task (``asyncio.timeout``
and ``current_task`` work), the order of messages is kept when a handler waits, and the
engine in use is the configured one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import ServerFactory
from wsguard.server.app import App
from wsguard.server.connection import Connection


def test_coroutine_handlers_run_in_a_task_and_keep_message_order(
    server_factory: ServerFactory,
) -> None:
    seen: list[str] = []

    def setup(app: App) -> None:
        @app.on("chat")
        async def chat(conn: Connection, message: dict[str, Any]) -> None:
            # asyncio.timeout needs a current task: a handler run outside one would fail
            assert asyncio.current_task() is not None
            async with asyncio.timeout(5):
                for _ in range(3):
                    await asyncio.sleep(0)  # really waits: later messages queue meanwhile
            seen.append(message["text"])
            conn.send({"type": "pong", "id": message["id"]})

        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:  # inline, no task
            seen.append(message["id"])
            conn.send({"type": "pong", "id": message["id"]})

    server = server_factory({"limits": {"message_burst": 100}}, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        sent = []
        for n in range(20):
            if n % 3:
                sent.append(f"p{n}")
                ws.send(json.dumps({"type": "ping", "id": f"p{n}"}))
            else:
                sent.append(f"c{n}")
                ws.send(json.dumps({"type": "chat", "text": f"c{n}", "id": f"c{n}"}))
        replies = [json.loads(ws.recv(timeout=5))["id"] for _ in sent]
    assert replies == sent
    assert server.call(lambda: list(seen)) == sent


def test_a_failing_handler_answers_internal_error_on_both_kinds(
    server_factory: ServerFactory,
) -> None:
    def setup(app: App) -> None:
        @app.on("chat")
        async def chat(conn: Connection, message: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:
            raise RuntimeError("boom")

    server = server_factory(demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "chat", "text": "x", "id": "c1"}))
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        errors = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
        assert [(e["code"], e["ref"]) for e in errors] == [
            ("internal_error", "c1"),
            ("internal_error", "p1"),
        ]
        assert "boom" not in json.dumps(errors)
        ws.send(json.dumps({"type": "ping", "id": "p2"}))  # the connection survives
        assert json.loads(ws.recv(timeout=5))["ref"] == "p2"


def test_the_configured_engine_serves(server_factory: ServerFactory, engine: str) -> None:
    server = server_factory()
    assert server.app.config.engine == engine
    module = type(server.app._server).__module__
    assert module.endswith("picows_server" if engine == "picows" else "asyncio.server")
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": "x"}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
