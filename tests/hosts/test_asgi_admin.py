"""The admin listener next to an ASGI app behind WsGuardMiddleware (uvicorn, loopback)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.sync.client import ClientConnection, connect

from conftest import (
    ADMIN_TOKEN,
    AuditCapture,
    admin_headers,
    close_of,
    eventually,
    make_config,
    make_token,
)
from support.paths import EXAMPLES
from wsguard.guard import Guard
from wsguard.hosts.asgi import WsGuardMiddleware
from wsguard.observability.audit import AuditLog

EXAMPLE = EXAMPLES / "asgi" / "starlette_app.py"


def example_app() -> Any:
    """The Starlette app of examples/asgi/starlette_app.py (without its middleware)."""
    spec = importlib.util.spec_from_file_location("starlette_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.inner


class Served:
    def __init__(self, middleware: WsGuardMiddleware, port: int, admin_url: str) -> None:
        self.middleware = middleware
        self.port = port
        self.admin_url = admin_url

    def connect(self, subject: str) -> ClientConnection:
        ws = connect(
            f"ws://127.0.0.1:{self.port}/ws",
            additional_headers={"Authorization": f"Bearer {make_token(subject)}"},
            open_timeout=10,
        )
        ws.pending_legacy_warning = False
        return ws


@pytest.fixture
def served() -> Iterator[Served]:
    config = make_config({"admin": {"port": 0, "token": ADMIN_TOKEN}})
    guard = Guard(config, audit=AuditLog(AuditCapture()))
    middleware = WsGuardMiddleware(example_app(), guard=guard)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(middleware, ws="websockets-sansio", log_level="warning", lifespan="on")
    )
    loop = asyncio.new_event_loop()
    started: Future[None] = Future()

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has a flag only
            await asyncio.sleep(0.02)
        started.set_result(None)
        await task

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    started.result(timeout=15)
    assert middleware.admin is not None
    try:
        yield Served(middleware, port, f"http://127.0.0.1:{middleware.admin.port}")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        loop.close()


def test_admin_listener_serves_a_middleware_node(served: Served) -> None:
    assert httpx.get(served.admin_url + "/readyz").json() == {"ready": True}
    with served.connect("alice") as ws:
        assert json.loads(ws.recv(timeout=5)) == {"type": "hello", "subject": "alice"}
        listing = httpx.get(served.admin_url + "/connections", headers=admin_headers()).json()
        assert [c["subject"] for c in listing["connections"]] == ["alice"]
        metrics = httpx.get(served.admin_url + "/metrics").text
        assert "wsguard_connections_active 1.0" in metrics
        revoked = httpx.post(
            served.admin_url + "/revoke", headers=admin_headers(), json={"subject": "alice"}
        )
        assert revoked.status_code == 200
        assert close_of(ws) == (4003, "revoked")
    eventually(lambda: not served.middleware.connections, 5, "the connection is gone")
    assert httpx.get(served.admin_url + "/connections", headers=admin_headers()).json() == {
        "connections": [],
        "total": 0,
        "next": None,
    }
    refused = httpx.get(served.admin_url + "/connections")
    assert refused.status_code == 401


def test_a_ban_from_the_admin_api_closes_middleware_connections(served: Served) -> None:
    with served.connect("bob") as ws:
        json.loads(ws.recv(timeout=5))
        banned = httpx.post(
            served.admin_url + "/bans",
            headers=admin_headers(),
            json={"address": "127.0.0.1", "seconds": 30},
        )
        assert banned.status_code == 201
        assert close_of(ws) == (1008, "banned")
    audit = served.middleware.guard.audit._stream
    assert isinstance(audit, io.StringIO)
    assert '"event":"connection_disconnected"' in audit.getvalue()
