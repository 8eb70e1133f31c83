"""The Django Channels example (examples/asgi/django_channels) behind WsGuardMiddleware.

A real uvicorn serves the example's ``ProtocolTypeRouter`` (``build_router()``) on a
loopback port, from a thread with its own event loop, wrapped in a
``WsGuardMiddleware`` whose Guard the tests configure. Both of uvicorn's sans-I/O
WebSocket implementations are exercised.

Django is set up once, by importing the example's ``asgi`` module with
``DJANGO_SETTINGS_MODULE`` and ``sys.path`` patched for this module only (the
example is imported dynamically, so mypy needs no stubs for Django or Channels).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import AuditCapture, eventually, make_config, make_token
from support.paths import EXAMPLES
from wsguard.guard import Guard
from wsguard.hosts.asgi import ASGIApp, Receive, Scope, Send, WsGuardMiddleware, WsGuardUser
from wsguard.observability.audit import AuditLog

ASGI_EXAMPLES = EXAMPLES / "asgi"
PATH = "/ws/echo/"


@dataclass
class Example:
    """The imported example project."""

    asgi: ModuleType
    consumer_class: Any  # django_channels.consumers.EchoConsumer


@pytest.fixture(scope="module")
def example() -> Iterator[Example]:
    """Import the example (which sets Django up) with the environment patched for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_SETTINGS_MODULE", "django_channels.settings")
        mp.syspath_prepend(str(ASGI_EXAMPLES))
        asgi = importlib.import_module("django_channels.asgi")
        consumers = importlib.import_module("django_channels.consumers")
        yield Example(asgi=asgi, consumer_class=consumers.EchoConsumer)


@dataclass
class Served:
    """A uvicorn serving the example behind a Guard of the test's own."""

    middleware: WsGuardMiddleware
    audit: AuditCapture
    ws: str
    scopes: list[Scope] = field(default_factory=list)  # scopes that reached the router
    consumers: list[Any] = field(default_factory=list)  # EchoConsumer instances created
    port: int = 0
    server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PATH}"

    def start(self) -> Served:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.middleware,
            ws=self.ws,
            ws_max_size=self.middleware.config.limits.max_message_bytes,
            lifespan="on",
            log_level="warning",
        )
        server = self.server = uvicorn.Server(config)

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))  # the thread's own event loop

        self._thread = threading.Thread(target=run, name="uvicorn-django", daemon=True)
        self._thread.start()
        eventually(lambda: server.started, timeout=10, what="uvicorn started")
        return self

    def stop(self) -> None:
        if self.server is not None and self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "uvicorn did not stop"

    def connect(self, token: str | None = None, **kwargs: Any) -> ClientConnection:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        ws: ClientConnection = connect(
            self.url, additional_headers=headers, open_timeout=10, **kwargs
        )
        return ws


@pytest.fixture(params=["websockets-sansio", "wsproto"])
def served(
    request: pytest.FixtureRequest, example: Example, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    audit = AuditCapture()
    guard = Guard(make_config(), audit=AuditLog(audit))
    router: ASGIApp = example.asgi.build_router()
    scopes: list[Scope] = []
    consumers: list[Any] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        await router(scope, receive, send)

    consumer_class = example.consumer_class
    original_init = consumer_class.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        consumers.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(consumer_class, "__init__", counting_init)
    running = Served(
        WsGuardMiddleware(spy, guard=guard),
        audit,
        ws=request.param,
        scopes=scopes,
        consumers=consumers,
    ).start()
    yield running
    running.stop()


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=5))
    assert isinstance(frame, dict)
    return frame


def websocket_scopes(served: Served) -> list[Scope]:
    return [s for s in served.scopes if s["type"] == "websocket"]


def test_no_token_is_refused_with_401_before_django(served: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        served.connect()
    assert refused.value.response.status_code == 401
    assert websocket_scopes(served) == []
    assert served.consumers == []
    [event] = served.audit.events("handshake_refused")
    assert event["status"] == 401
    assert event["reason"] == "missing_credentials"
    assert event["path"] == PATH


def test_valid_token_gets_hello_and_echo(served: Served) -> None:
    token = make_token("alice")
    with served.connect(token) as ws:
        assert recv_json(ws) == {"type": "hello", "subject": "alice"}
        ping = {"type": "ping", "id": 1}
        ws.send(json.dumps(ping))
        assert recv_json(ws) == {"type": "echo", "message": ping}
    assert len(served.consumers) == 1
    scope = served.consumers[0].scope
    assert isinstance(scope["user"], WsGuardUser)
    assert scope["user"].display_name == "alice"
    assert scope["state"]["wsguard"].subject == "alice"
    assert scope["url_route"] == {"args": (), "kwargs": {}}  # routed by Channels' URLRouter
    headers = {name.lower() for name, _ in scope["headers"]}
    assert b"authorization" not in headers  # the credential never reaches Django
    assert token.encode() not in repr(scope).encode()


def test_token_in_subprotocol(served: Served) -> None:
    with served.connect(subprotocols=["wsguard.v1", f"token.{make_token('bob')}"]) as ws:
        assert ws.subprotocol == "wsguard.v1"
        assert recv_json(ws) == {"type": "hello", "subject": "bob"}
    [consumer] = served.consumers
    assert consumer.scope["subprotocols"] == ["wsguard.v1"]


def test_invalid_json_gets_wsguard_error_and_is_not_echoed(served: Served) -> None:
    with served.connect(make_token()) as ws:
        assert recv_json(ws)["type"] == "hello"
        ws.send("{not json")
        error = recv_json(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_json"
        ws.send(json.dumps({"type": "ping", "id": 2}))
        # the next frame is the echo of the ping: the invalid message never reached Django
        assert recv_json(ws) == {"type": "echo", "message": {"type": "ping", "id": 2}}


def test_command_needs_admin_scope(served: Served) -> None:
    command = {"type": "command", "name": "restart", "id": 3}
    with served.connect(make_token("carol", scopes="chat")) as ws:
        assert recv_json(ws)["type"] == "hello"
        ws.send(json.dumps(command))
        error = recv_json(ws)
        assert (error["type"], error["code"], error.get("ref")) == ("error", "forbidden", 3)
        ws.send(json.dumps({"type": "ping", "id": 4}))
        assert recv_json(ws) == {"type": "echo", "message": {"type": "ping", "id": 4}}
    with served.connect(make_token("root", scopes="chat admin")) as ws:
        assert recv_json(ws) == {"type": "hello", "subject": "root"}
        ws.send(json.dumps(command))
        assert recv_json(ws) == {"type": "echo", "message": command}


def test_http_passes_through_to_django(served: Served) -> None:
    response = httpx.get(f"http://127.0.0.1:{served.port}/health/", timeout=5)
    assert (response.status_code, response.text) == (200, "ok")
    assert [s["type"] for s in served.scopes if s["type"] == "http"] == ["http"]
