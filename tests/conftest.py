"""Shared fixtures: a real wsguard server on an ephemeral loopback port.

The server runs in a background thread with its own event loop; tests drive it
with real WebSocket clients (``websockets.sync.client``) and raw sockets.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from websockets.sync.client import ClientConnection, connect

from support.redis_process import RedisProcess
from wsguard.config.loader import validate_config
from wsguard.config.model import Config
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog

#: The fixtures of these helper modules serve every test module that names them.
pytest_plugins = [
    "support.admin",
    "support.asgi_server",
    "support.browser",
    "support.cluster",
    "support.gateway",
    "support.redis_topologies",
]

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(overrides: dict[str, Any] | None = None) -> Config:
    base: dict[str, Any] = {"port": 0, "auth": {"secret": SECRET}}
    return validate_config(deep_merge(base, overrides or {}))


def make_token(
    sub: str = "alice",
    *,
    scopes: str | None = "chat",
    ttl: float = 3600,
    secret: str = SECRET,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if scopes is not None:
        payload["scope"] = scopes
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=alg, headers=headers)


#: The admin credential of test servers started with ``admin_overrides()``.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def admin_overrides(**admin: Any) -> dict[str, Any]:
    """Config overrides that turn on the admin listener on a free loopback port."""
    return {"admin": {"port": 0, "token": ADMIN_TOKEN, **admin}}


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class AuditCapture(io.StringIO):
    """An audit stream whose lines tests can read as JSON."""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in self.getvalue().splitlines() if line]
        return [e for e in out if name is None or e["event"] == name]


def new_loop() -> asyncio.AbstractEventLoop:
    """The event loop the engines run on in production (uvloop, for every engine)."""
    import uvloop

    return uvloop.new_event_loop()


class RunningServer:
    """A wsguard App served from a background thread."""

    def __init__(
        self, app: App, audit: AuditCapture, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.app = app
        self.audit = audit
        self.loop = loop or new_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started: Future[None] = Future()
        self._done: Future[None] = Future()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # pragma: no cover - surfaced to the test
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            self._done.set_result(None)

    async def _main(self) -> None:
        await self.app.start()
        self._started.set_result(None)
        await self.app.serve()

    def start(self) -> RunningServer:
        self._thread.start()
        self._started.result(timeout=10)
        return self

    @property
    def port(self) -> int:
        assert self.app.port is not None
        return self.app.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def admin_url(self) -> str:
        """http://127.0.0.1:<admin port> (the server must be started with admin.port)."""
        assert self.app.admin_port is not None, "start the server with admin.port = 0"
        return f"http://127.0.0.1:{self.app.admin_port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run *fn* on the server's loop and return its result."""
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def run_coro(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def connection_count(self) -> int:
        return int(self.call(lambda: len(self.app.connections)))

    def slots(self, key: str) -> int:
        store = self.app.guard.store
        return int(self.run_coro((store.local if key == "conn:all" else store).count(key)))

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop)
            self._done.result(timeout=30)

    def connect(
        self,
        token: str | None = None,
        *,
        path: str = "/",
        transport: str = "header",
        subprotocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        origin: str | None = None,
        **kwargs: Any,
    ) -> ClientConnection:
        """Open an authenticated client connection (token minted if not given)."""
        if token is None:
            token = make_token()
        extra = dict(headers or {})
        protocols = list(subprotocols or [])
        if transport == "header":
            extra["Authorization"] = f"Bearer {token}"
        elif transport == "subprotocol":
            protocols.append(f"token.{token}")
        elif transport == "cookie":
            extra["Cookie"] = f"wsguard_token={token}"
        elif transport == "query":
            path = f"{path}{'&' if '?' in path else '?'}token={token}"
        ws = connect(
            f"ws://127.0.0.1:{self.port}{path}",
            additional_headers=extra,
            subprotocols=protocols or None,  # type: ignore[arg-type]
            origin=origin,  # type: ignore[arg-type]
            open_timeout=10,
            **kwargs,
        )
        ws.pending_legacy_warning = False  # callers use it as a context manager
        return ws

    def connect_welcomed(self, token: str | None = None, **kwargs: Any) -> ClientConnection:
        """Connect and consume the welcome frame."""
        ws = self.connect(token, **kwargs)
        welcome = json.loads(ws.recv(timeout=5))
        assert welcome["type"] == "welcome"
        return ws


ServerFactory = Callable[..., RunningServer]


#: Every test that starts a server through ``server_factory`` runs on each engine.
ENGINES = ("websockets", "picows")
#: What the picows engine refuses at config validation (test_config checks the refusal).
_WEBSOCKETS_ONLY = ("compression", "gateway")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server_factory(tmp_path: Any, engine: str) -> Iterator[ServerFactory]:
    """Start servers with config overrides, on the test's engine; all stopped after."""
    started: list[RunningServer] = []

    def factory(
        overrides: dict[str, Any] | None = None,
        *,
        demo: bool = True,
        setup: Callable[[App], None] | None = None,
        welcome: bool = True,
        asyncio_loop: bool = False,
    ) -> RunningServer:
        """*asyncio_loop*: on asyncio's own event loop (where uvloop is not installed, or
        an app's ``await app.serve()`` in a loop of its own) instead of uvloop."""
        audit = AuditCapture()
        overrides = dict(overrides or {})
        if "engine" not in overrides:
            needs = [key for key in _WEBSOCKETS_ONLY if overrides.get(key)]
            if needs and engine != "websockets":
                pytest.skip(f"{engine} refuses {needs[0]} at config validation")
            overrides["engine"] = engine
        config = make_config(overrides)
        from wsguard.guard import Guard

        guard = Guard(config, audit=AuditLog(audit))
        app = App(guard=guard, welcome=welcome)
        if demo:
            install_demo(app)
        if setup is not None:
            setup(app)
        loop = asyncio.new_event_loop() if asyncio_loop else None
        running = RunningServer(app, audit, loop).start()
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    """A demo server with the default policy and a known HS256 secret."""
    return server_factory()


def raw_http(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def upgrade_request(
    path: str = "/",
    *,
    host: str | None = "127.0.0.1",
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> bytes:
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    base = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    if token is not None:
        base["Authorization"] = f"Bearer {token}"
    base.update(headers or {})
    lines.extend(f"{k}: {v}" for k, v in base.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split()
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), response[:200]
    return int(parts[1])


# -- a real redis-server ------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    process = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield process
    process.kill()


@pytest.fixture
def redis_uri(redis_session: RedisProcess) -> str:
    """A shared redis-server, emptied for each test."""
    if redis_session.proc is None or redis_session.proc.poll() is not None:
        redis_session.start()
    redis_session.flush()
    return redis_session.uri


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, which the test may kill and restart."""
    process = RedisProcess(tmp_path / "redis").start()
    yield process
    process.kill()


def close_of(ws: ClientConnection, timeout: float = 5.0) -> tuple[int, str]:
    """The close code and reason the server sends within *timeout* (frames before skipped)."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    while True:
        try:
            ws.recv(timeout=max(0.001, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                pytest.fail(f"closed without a close frame: {exc}")
            return exc.rcvd.code, exc.rcvd.reason
        except TimeoutError:
            pytest.fail(f"the server did not close the connection within {timeout}s")


T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll *check* until it returns something truthy; fail naming *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s (last: {result!r})")
        time.sleep(0.02)  # polling a condition, bounded by the deadline
