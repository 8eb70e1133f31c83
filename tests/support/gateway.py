"""A real gateway in front of real backends: the backend is a plain ``websockets``
server on its own thread and event loop (so a test can block it or stop it reading
without touching the gateway); it records the handshake it got and every message,
echoes (or not), and sends, closes or crashes on command. The gateway is
:class:`wsguard.hosts.gateway.proxy.Gateway` served by conftest's ``RunningServer``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection

from conftest import AuditCapture, RunningServer, deep_merge, eventually, make_config
from wsguard.guard import Guard
from wsguard.hosts.gateway.proxy import Gateway
from wsguard.observability.audit import AuditLog

T = TypeVar("T")


def chat(text: str) -> str:
    return json.dumps({"type": "chat", "text": text})


@dataclass(eq=False)
class Upstreamed:
    """One connection the backend accepted (from the gateway)."""

    ws: ServerConnection
    path: str
    headers: Headers
    received: list[str | bytes] = field(default_factory=list)
    count: int = 0  # messages received (also when not kept)
    sent: int = 0  # messages sent by send_many
    closed: threading.Event = field(default_factory=threading.Event)
    close_code: int | None = None  # the close frame the backend received (None: none)
    close_reason: str | None = None


class Backend:
    """A WebSocket backend on its own thread and loop.

    *refuse*: answer every handshake with this HTTP status. *stall*: do not read
    messages until :meth:`resume`. *echo*: send every message back. *keep*: keep the
    messages received (else only count them).
    """

    def __init__(
        self,
        *,
        refuse: HTTPStatus | None = None,
        stall: bool = False,
        echo: bool = True,
        keep: bool = True,
        subprotocols: list[str] | None = None,
        answer_protocol: str | None = None,
    ) -> None:
        self.refuse = refuse
        self.subprotocols = subprotocols  # what it negotiates (None: no subprotocol)
        self.answer_protocol = answer_protocol  # a Sec-WebSocket-Protocol it answers anyway
        self.stall = stall
        self.echo = echo
        self.keep = keep
        self.connections: list[Upstreamed] = []
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started: Future[None] = Future()
        self._server: Server | None = None
        self._resume: asyncio.Event | None = None
        self._releases: list[threading.Event] = []
        self._stopped = False

    # -- running ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._open())
        except BaseException as exc:  # pragma: no cover - surfaced to the test
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        self.loop.run_forever()

    async def _open(self) -> None:
        self._resume = asyncio.Event()
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            process_response=self._process_response,
            subprotocols=self.subprotocols,  # type: ignore[arg-type]
        )

    def start(self) -> Backend:
        self._thread.start()
        self._started.result(timeout=10)
        return self

    def stop(self, *, graceful: bool = False) -> None:
        """Stop serving: close the connections with 1001 (*graceful*) or drop them."""
        if self._stopped:
            return
        self._stopped = True
        for release in self._releases:
            release.set()

        async def close() -> None:
            if self._resume is not None:
                self._resume.set()
            if not graceful:
                for record in self.connections:
                    record.ws.transport.abort()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    # -- the server side ------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        if self.refuse is not None:
            return ws.respond(self.refuse, "refused by the backend\n")
        return None

    def _process_response(
        self, ws: ServerConnection, request: Request, response: Response
    ) -> Response:
        if self.answer_protocol is not None:
            response.headers["Sec-WebSocket-Protocol"] = self.answer_protocol
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        record = Upstreamed(ws, ws.request.path, ws.request.headers)
        self.connections.append(record)
        try:
            if self.stall:
                assert self._resume is not None
                resumed = asyncio.ensure_future(self._resume.wait())
                closed = asyncio.ensure_future(ws.wait_closed())
                await asyncio.wait({resumed, closed}, return_when=asyncio.FIRST_COMPLETED)
                resumed.cancel()
                closed.cancel()
            async for message in ws:
                record.count += 1
                if self.keep:
                    record.received.append(message)
                if self.echo:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                record.close_code, record.close_reason = rcvd.code, rcvd.reason
            record.closed.set()

    # -- driving it from the test -----------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    def connection(self, index: int = 0, timeout: float = 5.0) -> Upstreamed:
        eventually(lambda: len(self.connections) > index, timeout, f"backend connection #{index}")
        return self.connections[index]

    def send(self, record: Upstreamed, data: str | bytes) -> None:
        self.run(record.ws.send(data))

    def close(self, record: Upstreamed, code: int, reason: str) -> None:
        self.run(record.ws.close(code, reason))

    def crash(self, record: Upstreamed) -> None:
        """Drop the TCP connection without a close frame."""
        self.loop.call_soon_threadsafe(record.ws.transport.abort)

    def send_many(self, record: Upstreamed, count: int, size: int) -> Future[None]:
        async def send() -> None:
            payload = "x" * size
            with contextlib.suppress(ConnectionClosed):
                for _ in range(count):
                    await record.ws.send(payload)
                    record.sent += 1

        return asyncio.run_coroutine_threadsafe(send(), self.loop)

    def resume(self) -> None:
        """A stalled backend starts reading."""
        assert self._resume is not None
        self.loop.call_soon_threadsafe(self._resume.set)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """The backend's event loop hangs (a wedged process) inside the block."""
        entered, release = threading.Event(), threading.Event()
        self._releases.append(release)

        def hang() -> None:
            entered.set()
            release.wait(30)

        self.loop.call_soon_threadsafe(hang)
        assert entered.wait(5)
        try:
            yield
        finally:
            release.set()


BackendFactory = Callable[..., Backend]
GatewayFactory = Callable[..., RunningServer]


@pytest.fixture
def backends() -> Iterator[BackendFactory]:
    started: list[Backend] = []

    def start(**kwargs: Any) -> Backend:
        backend = Backend(**kwargs).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def backend(backends: BackendFactory) -> Backend:
    return backends()


@pytest.fixture
def gateways(backends: BackendFactory) -> Iterator[GatewayFactory]:
    """Start gateways in front of *upstream*; stopped before the backends."""
    started: list[RunningServer] = []

    def start(upstream: str, overrides: dict[str, Any] | None = None) -> RunningServer:
        audit = AuditCapture()
        config = make_config(deep_merge({"gateway": {"upstream": upstream}}, overrides or {}))
        gateway = Gateway(guard=Guard(config, audit=AuditLog(audit)))
        running = RunningServer(gateway, audit).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        finish_loop(running.loop)


def finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a stopped server left on its loop (an upstream's keepalive) and close it."""
    if loop.is_running():  # pragma: no cover - the server thread did not stop
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(cancel_all())
    loop.close()


def echo_roundtrip(ws: ClientConnection, text: str) -> None:
    ws.send(text)
    assert ws.recv(timeout=5) == text
