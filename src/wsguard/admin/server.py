"""The admin listener: uvicorn serving the admin API and dashboard on its own port.

It runs in the App's event loop, on a socket bound before the public
listener starts accepting (so a busy port fails start-up with a clear error),
loopback by default. Signals stay with the App: uvicorn's own handlers are
not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from wsguard.admin.api import AdminApi
from wsguard.admin.credentials import AdminCredentials, load_admin_token
from wsguard.admin.live import LiveFeed
from wsguard.observability.uvicorn_log import quiet_uvicorn_denial_errors
from wsguard.stores.base import StoreUnavailable

if TYPE_CHECKING:
    from wsguard.admin.target import AdminTarget

logger = logging.getLogger("wsguard.admin")

BAN_GAUGE_EVERY = 10.0
REQUEST_DEADLINE = 10.0  # seconds a connection has to complete each request
MAX_OPEN = 256  # connections at once; more are closed at once


class _AdminH11(H11Protocol):
    """uvicorn's h11 protocol with the limits the admin listener needs against slowloris.

    uvicorn times out only idle keep-alive connections, not a request that never
    completes, and its concurrency limit answers 503 but keeps every socket: 256
    half-sent requests would make every probe fail. Here each request must be
    complete within ``REQUEST_DEADLINE`` and at most ``MAX_OPEN`` connections are
    kept. (A connection upgraded to the dashboard WebSocket leaves this protocol.)
    """

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_OPEN:
            transport.abort()
            return
        self._deadline = self.loop.call_later(REQUEST_DEADLINE, self._expire)

    def _expire(self) -> None:
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:
            return  # closed, or now the dashboard's WebSocket
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # the whole request arrived; the application is answering it
            self._deadline = self.loop.call_later(REQUEST_DEADLINE, self._expire)
            return
        transport.close()  # a request head or body still incomplete, or nothing sent

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(REQUEST_DEADLINE, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


quiet_uvicorn_denial_errors()


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the App owns SIGTERM/SIGINT and stops us


class AdminServer:
    """Serves one App's admin API, metrics and dashboard."""

    def __init__(self, app: AdminTarget) -> None:
        from wsguard.guard import is_loopback_host

        self.app = app
        config = app.config.admin
        self.config = config
        token, self.generated_token_file = load_admin_token(
            config, loopback=is_loopback_host(config.host)
        )
        self.credentials = AdminCredentials(
            token,
            mtls=config.tls.client_ca_file is not None,
            session_seconds=config.session_seconds,
            address_key=app.guard.address_key,
        )
        self.live = LiveFeed(app, self.credentials)
        self.api = AdminApi(app, self.credentials, self.live)
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self._ban_count = 0

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls.cert_file else "http"

    def _socket(self) -> socket.socket:
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), self.config.port or 0))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._socket()
        self.port = sock.getsockname()[1]
        tls = self.config.tls
        uv_config = uvicorn.Config(
            self.api.asgi(),
            log_config=None,
            access_log=False,
            lifespan="off",
            http=_AdminH11,
            ws="websockets-sansio",
            ws_max_size=4096,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            server_header=False,
            date_header=False,
            proxy_headers=False,
            timeout_keep_alive=5,
            limit_concurrency=256,
            h11_max_incomplete_event_size=16 * 1024,
            ssl_certfile=_str(tls.cert_file),
            ssl_keyfile=_str(tls.key_file),
            ssl_ca_certs=_str(tls.client_ca_file),
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
        )
        if tls.cert_file:
            uv_config.load()
            assert uv_config.ssl is not None
            uv_config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server = _Uvicorn(uv_config)
        started = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve(sock, started))
        await started.wait()
        if self._task.done():
            self._task.result()  # start-up failed: raise it here
        store = self.app.guard.store
        metrics = self.app.guard.monitor.metrics
        if getattr(store, "ban_count", None) is None:  # shared store: counted in the background
            metrics.active_bans = lambda: self._ban_count
            self._gauge_task = asyncio.get_running_loop().create_task(self._count_bans())

    async def _serve(self, sock: socket.socket, started: asyncio.Event) -> None:
        assert self._server is not None
        server = self._server
        try:
            if not server.config.loaded:
                server.config.load()
            server.lifespan = server.config.lifespan_class(server.config)
            await server.startup(sockets=[sock])
        finally:
            started.set()
        if server.should_exit:
            return
        await server.main_loop()
        await server.shutdown(sockets=[sock])

    async def _count_bans(self) -> None:
        store = self.app.guard.store
        count = getattr(store, "active_ban_count", None)
        while True:
            with contextlib.suppress(StoreUnavailable):
                self._ban_count = (
                    await count() if count is not None else len(await store.bans(100_000))
                )
            await asyncio.sleep(BAN_GAUGE_EVERY)

    async def stop(self) -> None:
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._gauge_task
            self._gauge_task = None
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        server.force_exit = True  # dashboards' WebSockets do not hold the shutdown
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        self._server = None


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None
