"""A real ASGI server (uvicorn with websockets-sansio or wsproto, hypercorn) in a
background thread, serving ``WsGuardMiddleware`` in front of a small Starlette echo app,
and the client helpers that talk to it."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar, cast

import pytest
import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import Framework
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from conftest import AuditCapture, make_config, make_token
from wsguard.config.model import Config
from wsguard.guard import Guard
from wsguard.hosts.asgi import ASGIApp, Receive, Scope, Send, WsGuardMiddleware
from wsguard.observability.audit import AuditLog

SERVER_KINDS = ("uvicorn-sansio", "uvicorn-wsproto", "hypercorn")

T = TypeVar("T")


# -- the application behind the guard ---------------------------------------------------


class Recorder:
    """What the application saw (appended from the server thread, read by the test)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received: list[str | bytes] = []
        self.disconnects: list[int | None] = []


def echo_app(rec: Recorder) -> Starlette:
    """``/ws``: a hello describing the scope the app sees, then an echo of every message."""

    async def endpoint(websocket: WebSocket) -> None:
        rec.calls.append(websocket.url.path)
        await websocket.accept()
        scope = websocket.scope
        await websocket.send_json(
            {
                "type": "hello",
                "user": websocket.user.display_name,
                "state_subject": scope["state"]["wsguard"].subject,
                "scopes": list(websocket.auth.scopes),
                "user_scopes": sorted(websocket.user.scopes),
                "subprotocols": list(scope.get("subprotocols") or []),
                "headers": [
                    [name.decode("latin-1"), value.decode("latin-1")]
                    for name, value in scope["headers"]
                ],
                "query": scope.get("query_string", b"").decode("latin-1"),
            }
        )
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                rec.disconnects.append(message.get("code"))
                return
            text = message.get("text")
            rec.received.append(text if text is not None else message.get("bytes") or b"")
            await websocket.send_json({"type": "echo", "text": text})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/health", health), WebSocketRoute("/ws", endpoint)])


# -- a real ASGI server in a background thread -------------------------------------------


class AsgiServer:
    """``WsGuardMiddleware(app, guard=...)`` served by uvicorn or hypercorn on loopback."""

    def __init__(
        self, kind: str, app: ASGIApp, config: Config, rec: Recorder, max_size: int
    ) -> None:
        self.kind = kind
        self.config = config
        self.rec = rec
        self.audit = AuditCapture()
        self.guard = Guard(config, audit=AuditLog(self.audit))
        self.middleware = WsGuardMiddleware(app, guard=self.guard)
        self.max_size = max_size
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started: Future[None] = Future()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"asgi-{kind}", daemon=True)

    # lifecycle

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by start() or stop()
            self._error = exc
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        if self.kind.startswith("uvicorn"):
            await self._uvicorn(self._stop)
        else:
            await self._hypercorn(self._stop)

    async def _uvicorn(self, stop: asyncio.Event) -> None:
        server = uvicorn.Server(
            uvicorn.Config(
                self.middleware,
                ws="websockets-sansio" if self.kind == "uvicorn-sansio" else "wsproto",
                ws_max_size=self.max_size,
                lifespan="on",
                log_config=None,
                log_level="warning",
                timeout_graceful_shutdown=2,
            )
        )
        task = asyncio.ensure_future(server.serve(sockets=[self.sock]))
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)  # uvicorn has no start-up event to wait on
        self._started.set_result(None)
        await stop.wait()
        server.should_exit = True
        await task

    async def _hypercorn(self, stop: asyncio.Event) -> None:
        config = HypercornConfig()
        config.bind = [f"fd://{self.sock.detach()}"]  # hypercorn owns the socket now
        config.websocket_max_message_size = self.max_size
        config.graceful_timeout = 2
        config.errorlog = logging.getLogger("hypercorn.error")

        async def shutdown_trigger() -> None:
            # hypercorn awaits this once it listens (after the lifespan start-up)
            if not self._started.done():
                self._started.set_result(None)
            await stop.wait()

        await hypercorn_serve(
            cast(Framework, self.middleware), config, shutdown_trigger=shutdown_trigger
        )

    def start(self) -> AsgiServer:
        self._thread.start()
        self._started.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            stop = self._stop
            assert stop is not None
            self.loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), f"{self.kind} did not stop"
        self.sock.close()
        if self._error is not None:
            raise self._error

    # helpers

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run *coro* on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def call(self, fn: Callable[[], T]) -> T:
        """Run *fn* on the server's loop (consistent reads of the middleware's state)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def connect(
        self,
        token: str | None = None,
        *,
        transport: str = "header",
        path: str = "/ws",
        origin: str | None = None,
        subprotocols: tuple[str, ...] = (),
        extra_headers: dict[str, str] | None = None,
    ) -> ClientConnection:
        """Open a WebSocket (an alice token is minted unless *token*; ``transport="none"``
        sends no credential)."""
        if token is None:
            token = make_token("alice")
        headers: dict[str, str] = dict(extra_headers or {})
        offered = [Subprotocol(p) for p in subprotocols]
        if transport == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif transport == "subprotocol":
            offered.append(Subprotocol(f"token.{token}"))
        else:
            assert transport == "none"
        return connect(
            self.url(path),
            additional_headers=headers,
            subprotocols=offered or None,
            origin=Origin(origin) if origin is not None else None,
            proxy=None,
            open_timeout=5,
            close_timeout=5,
            legacy=True,
        )

    def hello(self, token: str | None = None, **kwargs: Any) -> tuple[ClientConnection, Any]:
        """Connect and read the application's hello frame."""
        ws = self.connect(token, **kwargs)
        hello = recv_json(ws)
        assert hello["type"] == "hello", hello
        return ws, hello

    def refused(self, token: str | None = None, **kwargs: Any) -> InvalidStatus:
        """The HTTP refusal of a handshake."""
        with pytest.raises(InvalidStatus) as info:
            self.connect(token, **kwargs).close()
        return info.value

    def live(self) -> int:
        return self.call(lambda: len(self.middleware.connections))


class Serve(Protocol):
    def __call__(
        self,
        overrides: dict[str, Any] | None = None,
        *,
        app: ASGIApp | None = None,
        server_max_size: int | None = None,
    ) -> AsgiServer: ...


@pytest.fixture(params=SERVER_KINDS)
def serve(request: pytest.FixtureRequest) -> Iterator[Serve]:
    """Start the echo app (or *app*) behind a fresh Guard in the parametrized server."""
    kind: str = request.param
    started: list[AsgiServer] = []

    def factory(
        overrides: dict[str, Any] | None = None,
        *,
        app: ASGIApp | None = None,
        server_max_size: int | None = None,
    ) -> AsgiServer:
        config = make_config(overrides)
        rec = Recorder()
        max_size = server_max_size or config.limits.max_message_bytes
        server = AsgiServer(kind, app or echo_app(rec), config, rec, max_size)
        started.append(server)
        return server.start()

    yield factory
    errors: list[BaseException] = []
    for server in started:
        try:
            server.stop()
        except BaseException as exc:  # stop the others first
            errors.append(exc)
    if errors:
        raise errors[0]


# -- client helpers ---------------------------------------------------------------------


def recv_json(ws: ClientConnection, timeout: float = 5) -> Any:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    return json.loads(data)


def send_json(ws: ClientConnection, message: Any) -> None:
    ws.send(json.dumps(message))


def echo_of(ws: ClientConnection, text: str) -> None:
    """*text* reaches the app and comes back as its echo (nothing queued before it)."""
    ws.send(text)
    reply = recv_json(ws)
    assert reply == {"type": "echo", "text": text}, reply


def ping(ident: str) -> str:
    return json.dumps({"type": "ping", "id": ident})


async def demo_echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain ASGI application (no framework): a welcome on accept and ``pong`` for a
    ``ping`` (what the standalone demo answers), an echo for anything else; HTTP: 404."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": b"Not found.\n"})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps({"type": "welcome"})})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        message = json.loads(event.get("text") or "null")
        if isinstance(message, dict) and message.get("type") == "ping":
            reply = {"type": "pong", "id": message.get("id")}
        else:
            reply = {"type": "echo"}
        await send({"type": "websocket.send", "text": json.dumps(reply)})
