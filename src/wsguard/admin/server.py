"""The admin listener: uvicorn serving the admin API and dashboard on its own port.

It runs in the App's event loop, on a socket bound before the public
listener starts accepting (so a busy port fails start-up with a clear error),
loopback by default. Signals stay with the App: uvicorn's own handlers are
not installed.

Over HTTPS it uses the public listener's TLS policy (``tls.min_version``, AEAD
suites only). With mTLS the admin CA bundle must share no certificate (by
SHA-256 fingerprint) and no public key with the users' ``tls.client_ca_file``,
and the verified client certificate's subject is handed to the API in the ASGI
scope (for ``admin.client_subjects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from wsguard.admin.api import AdminApi
from wsguard.admin.credentials import AdminCredentials, load_admin_token
from wsguard.admin.live import LiveFeed
from wsguard.admin.subjects import SCOPE_KEY, Subject, certificate_subject, parse_subject
from wsguard.config.model import Config
from wsguard.engines.tls import policy_context
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.observability.uvicorn_log import quiet_uvicorn_denial_errors
from wsguard.stores.base import StoreUnavailable

if TYPE_CHECKING:
    from wsguard.admin.target import AdminTarget

logger = logging.getLogger("wsguard.admin")

BAN_GAUGE_EVERY = 10.0
REQUEST_DEADLINE = 10.0  # seconds a connection has to complete each request
MAX_OPEN = 256  # connections at once; more are closed at once
MAX_PER_ADDRESS = 32  # of them from one address: one client cannot take them all


class _AdminH11(H11Protocol):
    """uvicorn's h11 protocol with the limits the admin listener needs against slowloris.

    uvicorn times out only idle keep-alive connections, not a request that never
    completes, and its concurrency limit answers 503 but keeps every socket: 256
    half-sent requests would make every probe fail. Here each request must be
    complete within ``REQUEST_DEADLINE`` and at most ``MAX_OPEN`` connections are
    kept, ``MAX_PER_ADDRESS`` of them from one address (so that one client holding
    half-sent requests cannot shut out the probes of another). (A connection upgraded to
    the dashboard WebSocket leaves this protocol.)
    """

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if len(self.connections) > MAX_OPEN or (
            host is not None
            and sum(1 for c in self.connections if _host_of(c) == host) > MAX_PER_ADDRESS
        ):
            transport.abort()
            return
        _hand_over_client_certificate(self, transport)
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


def _host_of(protocol: object) -> str | None:
    """The peer address of one of the listener's connections (None: not known)."""
    client = getattr(protocol, "client", None)
    return str(client[0]) if client else None


class _AdminWebSocket(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, handing the client certificate to the dashboard."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _hand_over_client_certificate(self, transport)


class _ClientCertificate:
    """Puts the subject of the connection's verified client certificate in the scope."""

    def __init__(self, app: ASGIApp, subject: Subject | None) -> None:
        self.app = app
        self.subject = subject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY] = self.subject
        await self.app(scope, receive, send)


def _hand_over_client_certificate(protocol: Any, transport: asyncio.BaseTransport) -> None:
    """On a TLS connection, wrap the protocol's application so that every request of
    this connection carries the client certificate's subject (None without one)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        subject = certificate_subject(ssl_object.getpeercert())
        protocol.app = _ClientCertificate(protocol.app, subject)


quiet_uvicorn_denial_errors()


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the App owns SIGTERM/SIGINT and stops us


class AdminServer:
    """Serves one App's admin API, metrics and dashboard."""

    def __init__(self, app: AdminTarget) -> None:
        from wsguard.core.client_address import is_loopback_host

        self.app = app
        config = app.config.admin
        self.config = config
        token, self.generated_token_file = load_admin_token(
            config, loopback=is_loopback_host(config.host)
        )
        self.ssl_context = admin_tls_context(app.config)  # clear text beyond loopback:
        # a config_warning of the Guard's (core.risky_settings)
        self.credentials = AdminCredentials(
            token,
            mtls=config.tls.client_ca_file is not None,
            session_seconds=config.session_seconds,
            address_key=app.guard.address_key,
            https=self.ssl_context is not None,
            client_subjects=tuple(parse_subject(pin) for pin in config.client_subjects),
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
        self.credentials.listening_on(self.port)
        uv_config = uvicorn.Config(
            self.api.asgi(),
            log_config=None,
            access_log=False,
            lifespan="off",
            http=_AdminH11,
            ws=_AdminWebSocket,
            ws_max_size=4096,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            server_header=False,
            date_header=False,
            proxy_headers=False,
            timeout_keep_alive=5,
            limit_concurrency=256,
            h11_max_incomplete_event_size=16 * 1024,
        )
        uv_config.load()
        uv_config.ssl = self.ssl_context  # the public listener's TLS policy, not uvicorn's
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


def admin_tls_context(config: Config) -> ssl.SSLContext | None:
    """The admin listener's TLS context (None for plain HTTP), built as the public
    listener's is: one policy, TLS 1.2+ with AEAD suites only."""
    tls = config.admin.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    context = policy_context(config.tls.min_version)
    try:
        context.load_cert_chain(str(tls.cert_file.expanduser()), str(tls.key_file.expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise KeyLoadError(
            "admin.tls.cert_file", f"cannot load certificate and key: {exc}"
        ) from None
    if tls.client_ca_file is not None:
        check_ca_separation(tls.client_ca_file, config.tls.client_ca_file)
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file.expanduser()))
        except (OSError, ssl.SSLError) as exc:
            raise KeyLoadError("admin.tls.client_ca_file", f"cannot load: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        # a resumed session is not verified again (an expired certificate would go on
        # for the ticket's lifetime): TLS 1.3 without tickets never resumes; TLS 1.2
        # resumes by session id, which Python cannot switch off, so it is not offered
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


def check_ca_separation(admin_ca: Path, users_ca: Path | None) -> None:
    """The admin CA bundle must not trust what the users' CA bundle trusts.

    Compared by content, not by path: no certificate in common (SHA-256 of its DER)
    and no public key in common (a CA certificate re-issued with the same key signs
    the same client certificates).
    """
    if users_ca is None:
        return
    admin = _bundle(admin_ca, "admin.tls.client_ca_file")
    users = _bundle(users_ca, "tls.client_ca_file")
    shared = admin.keys() & users.keys()
    if shared:
        same = [k for k in shared if k.startswith("cert:")] or list(shared)
        what = ", ".join(sorted(admin[k] for k in same))
        raise ConfigError(
            "admin.tls.client_ca_file",
            f"shares {what} with the users' CA (tls.client_ca_file): every user "
            "certificate would be an admin credential; give the admin listener a CA of its own",
        )


def _bundle(path: Path, key: str) -> dict[str, str]:
    """Fingerprints of every certificate in a PEM bundle and of its public key, each
    mapped to a description for the error message."""
    try:
        certificates = x509.load_pem_x509_certificates(path.expanduser().read_bytes())
    except OSError as exc:
        raise KeyLoadError(key, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyLoadError(key, f"{path} is not a PEM certificate bundle: {exc}") from None
    out: dict[str, str] = {}
    for cert in certificates:
        name = cert.subject.rfc4514_string() or "an unnamed certificate"
        digest = cert.fingerprint(hashes.SHA256()).hex()
        out["cert:" + digest] = f"the certificate {name} (SHA-256 {digest[:16]}...)"
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out["key:" + hashlib.sha256(spki).hexdigest()] = f"the public key of {name}"
    return out
