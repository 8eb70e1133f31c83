"""The standalone server's application object: handlers per message type.

Usage::

    from wsguard import App, load_config

    app = App(load_config("wsguard.toml"))

    @app.on("chat")
    async def chat(conn, message):
        app.broadcast({"type": "broadcast", "from": conn.subject, "message": message},
                      exclude=conn)

    app.run()  # prints "wsguard: listening on ws://127.0.0.1:8765/ (engine picows)"

Handlers receive only messages that passed the whole message policy
(size, JSON, bounds, type allowlist, scopes, schema, rate limits). A handler
registered with ``@app.on(type, raw=True)`` or ``@app.on_message`` receives the
frame as it arrived (``str`` or ``bytes``): the latter is how a server with
``messages.format = "opaque"`` sees its messages, e.g. an echo server::

    app = App(load_config("echo.toml"), welcome=False)

    @app.on_message
    def echo(conn, data):
        conn.send_raw(data)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, overload

import orjson

from wsguard.cluster.events import ClusterEvents, close_disconnected, close_revoked
from wsguard.config.loader import environment_config
from wsguard.config.model import Config
from wsguard.core.decisions import CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, Deliver, valid_ref
from wsguard.core.duplicate_keys import duplicate_keys_refusal, has_duplicate_keys
from wsguard.core.integrity import SESSION_KID
from wsguard.errors import ConfigError, ListenError, WsguardError
from wsguard.guard import Guard
from wsguard.session import Connection, wait_for_releases

#: A message handler: a coroutine function, or a plain function that runs inline (it
#: must not block; it needs no task, which makes it the fastest kind).
Handler = Callable[[Connection, dict[str, Any]], Awaitable[None] | None]
#: A handler of raw messages (``@app.on(type, raw=True)``, ``@app.on_message``): it gets the
#: frame as it arrived, text as ``str`` and binary as ``bytes``; plain function or coroutine.
RawHandler = Callable[[Connection, str | bytes], Awaitable[None] | None]
Hook = Callable[[Connection], Awaitable[None]]

logger = logging.getLogger("wsguard.server")

#: Exit status of :meth:`App.run` and of ``wsguard serve``/``proxy`` when the server cannot
#: start (it cannot listen, the store is unreachable...), and for a configuration error.
EXIT_FAILURE = 1
EXIT_CONFIG = 2
#: Where a server started by :meth:`App.run` (or ``wsguard serve``/``proxy``) writes the URL
#: of its admin listener while it runs, for ``wsguard admin`` (JSON: url, pid).
ADMIN_URL_FILE = Path("~/.local/share/wsguard/admin.url")


class App:
    """Hosts message handlers behind the wsguard policy."""

    def __init__(
        self, config: Config | None = None, *, guard: Guard | None = None, welcome: bool = True
    ) -> None:
        """*welcome*: send each new connection the ``welcome`` frame (its id, subject,
        scopes, limits...) before anything else; False sends none, for protocols that
        have no room for it (an echo server, a non-JSON protocol). Kept as
        :attr:`send_welcome`."""
        if guard is None:
            guard = Guard(config if config is not None else environment_config())
        self.guard = guard
        self.config = guard.config
        if not welcome and self.config.signing.session_keys:
            raise ConfigError(
                "signing.session_keys",
                "the session key is sent in the welcome frame: not with App(welcome=False)",
            )
        self.connections: dict[str, Connection] = {}
        guard.monitor.metrics.active_connections = lambda: len(self.connections)
        self._handlers: dict[str, Handler] = {}
        self._raw_handlers: dict[str, RawHandler] = {}
        self._on_message: RawHandler | None = None
        self._json = self.config.messages.format == "json"  # raw JSON: duplicate keys refused
        self.send_welcome = welcome
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._server: Any = None
        self._stopping: asyncio.Event | None = None
        self.port: int | None = None
        self._id_prefix = guard.node_id
        self.events: ClusterEvents | None = None
        self._id_counter = itertools.count(1)
        self._type_names = self.guard.messages.type_names()
        self._welcome_types: list[str] | None = None  # handled_types(), until a registration
        self._unhandled_logged: set[str] = set()
        self.ssl_context: ssl.SSLContext | None = None
        self.admin: Any = None  # the AdminServer when admin.port is set

    @property
    def ready(self) -> tuple[bool, str | None]:
        """Whether this node should get traffic: (ready, reason when not)."""
        ready, reason = self.guard.ready  # draining, or the store down and fail-closed
        if ready and self._server is None:
            return False, "starting"
        return ready, reason

    @property
    def url(self) -> str | None:
        """The URL clients connect to (after :meth:`start`), e.g. ``ws://127.0.0.1:8765/``."""
        return listen_url(self.config, self.port) if self.port is not None else None

    @property
    def admin_port(self) -> int | None:
        """The admin listener's port (after :meth:`start`), None when it is off."""
        return self.admin.port if self.admin is not None else None

    # -- registration -----------------------------------------------------------

    @overload
    def on(
        self, message_type: str, *, raw: Literal[False] = False
    ) -> Callable[[Handler], Handler]: ...

    @overload
    def on(
        self, message_type: str, *, raw: Literal[True]
    ) -> Callable[[RawHandler], RawHandler]: ...

    def on(self, message_type: str, *, raw: bool = False) -> Callable[[Any], Any]:
        """Register the handler of *message_type* (it must be in the allowlist).

        The handler is called as ``handler(conn, message)`` with the parsed message (a
        dict); with ``raw=True``, as ``handler(conn, data)`` with the frame as it arrived
        (text as ``str``, binary as ``bytes``), e.g. to forward it without re-serializing.
        A later registration for the same type replaces the earlier one.
        """
        if message_type not in self.config.messages.types:
            raise ConfigError(
                f"messages.types.{message_type}",
                "a handler is registered for a type that is not in the allowlist",
            )
        if message_type == "auth":
            raise ConfigError("messages.types.auth", "'auth' is handled by wsguard itself")

        def register(handler: Any) -> Any:
            self._welcome_types = None
            self._handlers.pop(message_type, None)
            self._raw_handlers.pop(message_type, None)
            (self._raw_handlers if raw else self._handlers)[message_type] = handler
            return handler

        return register

    def on_message(self, handler: RawHandler) -> RawHandler:
        """Register the catch-all handler: every delivered message that has no handler of
        its type goes to ``handler(conn, data)``, *data* as it arrived (text as ``str``,
        binary as ``bytes``). With ``messages.format = "opaque"`` that is every message
        (they have no type). A plain function runs inline; a coroutine function runs in
        the connection's task, like the handlers of :meth:`on`."""
        self._welcome_types = None
        self._on_message = handler
        return handler

    def handled_types(self) -> list[str]:
        """The allowlisted types this App answers (the welcome frame's ``types``): every
        type with a handler, ``auth`` (wsguard's own), and with a catch-all
        (:meth:`on_message`) every type. A delivered message of any other allowlisted type
        is answered with an ``unhandled_type`` error frame."""
        names = self._type_names
        if self._on_message is not None:
            return list(names)
        return [n for n in names if n == "auth" or n in self._handlers or n in self._raw_handlers]

    def on_connect(self, hook: Hook) -> Hook:
        self._on_connect.append(hook)
        return hook

    def on_disconnect(self, hook: Hook) -> Hook:
        self._on_disconnect.append(hook)
        return hook

    # -- messaging -------------------------------------------------------------

    def broadcast(self, message: dict[str, Any], *, exclude: Connection | None = None) -> int:
        """Send *message* to every connection but *exclude*; never waits on a client.

        In cluster mode the message also goes to every other node's clients.
        Returns how many of this node's connections it was handed to.
        """
        publish = self.events is not None and self.guard.store.shared  # other nodes' clients
        local = self.connections
        if not publish and len(local) <= (exclude is not None and exclude.id in local):
            return 0  # no one to send it to: not even serialized
        raw = orjson.dumps(message)
        delivered = self._deliver_local(raw.decode(), exclude)
        if publish:
            assert self.events is not None
            self.events.publish_broadcast(raw)
        return delivered

    def _deliver_local(self, text: str, exclude: Connection | None = None) -> int:
        delivered = 0
        for conn in list(self.connections.values()):
            if conn is not exclude and conn.send_text(text):
                delivered += 1
        return delivered

    def _deliver_remote(self, raw: bytes) -> None:
        self._deliver_local(raw.decode("utf-8", "replace"))

    async def revoke(self, kind: str, value: str, ttl: float | None = None) -> None:
        """Revoke a token id (``jti``) or subject (``sub``) on every node."""
        if kind not in ("jti", "sub"):
            raise ValueError("kind must be 'jti' or 'sub'")
        seconds = ttl if ttl is not None else self.config.revocation_seconds
        await self.guard.store.revoke(kind, value, seconds)  # type: ignore[arg-type]

    def welcome(self, conn: Connection) -> dict[str, Any] | None:
        """The first frame of a new connection; None with ``App(welcome=False)``."""
        if not self.send_welcome:
            return None
        if self._welcome_types is None:
            self._welcome_types = self.handled_types()
        limits = self.config.limits
        welcome: dict[str, Any] = {
            "type": "welcome",
            "connection_id": conn.id,
            "subject": conn.subject,
            "scopes": sorted(conn.identity.scopes),
            "expires_at": conn.identity.expires_at,
            "limits": {
                "max_message_bytes": limits.max_message_bytes,
                "messages_per_minute": limits.messages_per_minute,
                "message_burst": limits.message_burst,
                "bytes_per_minute": limits.bytes_per_minute,
            },
            "types": self._welcome_types,
        }
        session_key = conn.state.session_key
        if session_key is not None:
            welcome["signing"] = {
                "kid": SESSION_KID,
                "key": base64.urlsafe_b64encode(session_key).rstrip(b"=").decode(),
                "window_seconds": self.config.signing.window_seconds,
            }
        return welcome

    # -- the host's hooks (called by the Session of each connection) ------------------

    def deliver(
        self, conn: Connection, decision: Deliver, data: str | bytes
    ) -> Awaitable[None] | None:
        """Hand a delivered message to its handler (none: an ``unhandled_type`` error
        frame). A plain-function handler runs here; a coroutine comes back to be awaited."""
        handler = self._handlers.get(decision.type)
        try:
            if handler is not None:
                result = handler(conn, decision.message)
            else:  # a raw handler of the type, else the catch-all: the frame as it came
                raw = self._raw_handlers.get(decision.type, self._on_message)
                if raw is None:
                    self._unhandled(conn, decision)
                    return None
                if self._json and has_duplicate_keys(data):
                    self._duplicate_keys(conn, decision)
                    return None
                result = raw(conn, data)
        except Exception:
            self._handler_failed(conn, decision)
            return None
        if result is None:
            return None
        return self._await_handler(result, conn, decision)

    async def _await_handler(
        self, result: Awaitable[None], conn: Connection, decision: Deliver
    ) -> None:
        try:
            await result
        except Exception:
            self._handler_failed(conn, decision)

    def _unhandled(self, conn: Connection, decision: Deliver) -> None:
        """An allowlisted type without a handler: the client is told (not a violation:
        the message passed the policy), the operator once per type."""
        if decision.type not in self._unhandled_logged:
            self._unhandled_logged.add(decision.type)
            logger.warning(
                "no handler for message type %r: answered with 'unhandled_type' error frames "
                "(register @app.on(%r) or @app.on_message, or remove it from messages.types)",
                decision.type,
                decision.type,
            )
        ref = decision.message.get("id")
        conn.send(_error("unhandled_type", "No handler for this message type.", ref))

    def _duplicate_keys(self, conn: Connection, decision: Deliver) -> None:
        """A message for a raw handler naming a key twice: the handler gets the frame as
        it arrived, and a parser keeping the first of two equal keys would read another
        message than the policy checked (which kept the last). Refused as invalid, a
        violation like any invalid message, as the gateway refuses it."""
        conn.refuse(duplicate_keys_refusal(decision))

    def _handler_failed(self, conn: Connection, decision: Deliver) -> None:
        logger.exception("handler for %r failed", decision.type)
        conn.send(_error("internal_error", "The handler failed.", decision.message.get("id")))

    def opened(self, conn: Connection) -> Awaitable[None] | None:
        """Apply the cluster events that arrived while the handshake was decided, then
        run the ``on_connect`` hooks (in the connection's task)."""
        events = self.events
        if events is not None and events.catch_up(conn, conn.checked_at):
            return None
        if not self._on_connect:
            return None
        return self._run_hooks(self._on_connect, conn, "on_connect")

    def refreshed(self, conn: Connection) -> None:
        """Nothing to do: handlers read ``conn.identity``, which the Session replaced."""

    def closed(self, conn: Connection) -> Awaitable[None] | None:
        """Run the ``on_disconnect`` hooks (their failures are logged, not raised)."""
        if not self._on_disconnect:
            return None
        return self._run_hooks(self._on_disconnect, conn, "on_disconnect")

    async def _run_hooks(self, hooks: list[Hook], conn: Connection, name: str) -> None:
        for hook in hooks:
            try:
                await hook(conn)
            except Exception:
                logger.exception("%s hook failed", name)
                if name == "on_connect":  # the connection is not what the app expects
                    conn.close_soon(CLOSE_INTERNAL_ERROR, "internal error", cause="hook_failed")
                    return

    def keep_request(self, path: str, headers: Any) -> Any:
        """What a connection keeps of its upgrade request (the App: nothing)."""
        return None

    def startup_notes(self) -> list[str]:
        """Lines the start-up prints about this host's configuration (see announce)."""
        return []

    def new_connection_id(self) -> str:
        """Unique per node and process: a random prefix and a counter (no syscall)."""
        return f"{self._id_prefix}{next(self._id_counter):08x}"

    # -- running -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting connections; sets :attr:`port`. Raises
        :class:`~wsguard.errors.ListenError` (an ``OSError``) when a listener cannot bind,
        :class:`~wsguard.errors.ConfigError` for a configuration it cannot run."""
        from wsguard.engines import start_server
        from wsguard.engines.tls import check_listener, server_context

        if self._server is not None:
            raise RuntimeError("already started")
        check_listener(self.config)
        if self.config.admin.enabled and self.admin is None:
            from wsguard.extras import require

            require("admin", "the admin listener", key="admin.port")
        self._stopping = asyncio.Event()
        await self.guard.start()
        if self.events is None:
            self.events = ClusterEvents(
                self.guard.store,
                self.guard.node_id,
                lambda: self.connections.values(),
                self._deliver_remote,
                functools.partial(close_revoked, self.guard.audit),
                on_disconnect=functools.partial(close_disconnected, self.guard.audit),
                address_key=self.guard.address_key,
                audit=self.guard.audit,
            )
        if self.config.admin.enabled and self.admin is None:
            from wsguard.admin.server import AdminServer

            admin = AdminServer(self)
            try:
                await admin.start()
            except OSError as exc:
                admin_config = self.config.admin
                raise listen_error(
                    exc, admin_config.host, admin_config.port or 0, "admin listener"
                ) from exc
            self.admin = admin
        try:
            if self.config.tls.enabled:
                self.ssl_context = server_context(self.config.tls)
            try:
                self._server = await start_server(self.config.engine, self, self.ssl_context)
            except OSError as exc:
                raise listen_error(exc, self.config.host, self.config.port) from exc
        except BaseException:
            if self.admin is not None:  # never leave a listener saying "ready" behind
                await self.admin.stop()
                self.admin = None
            raise
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else None
        logger.debug(
            "engine %s listening on %s port %s", self.config.engine, self.config.host, self.port
        )

    async def stop(self) -> None:
        """Graceful shutdown: refuse new handshakes (503), close all with 1001, drain."""
        if self._server is None:
            return
        self.guard.handshakes.draining = True
        server, self._server = self._server, None
        server.close(close_connections=True, code=CLOSE_GOING_AWAY, reason="server shutdown")
        try:
            await asyncio.wait_for(server.wait_closed(), self.config.liveness.drain_seconds)
        except TimeoutError:
            for conn in list(self.connections.values()):
                conn.abort()
        if self._stopping is not None:
            self._stopping.set()

    async def serve(self) -> None:
        """Start, then run until :meth:`stop` (or SIGTERM/SIGINT when in the main thread)."""
        if self._server is None:
            await self.start()
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        handlers: dict[signal.Signals, Callable[[], object]] = {
            signal.SIGTERM: lambda: loop.create_task(self.stop()),
            signal.SIGINT: lambda: loop.create_task(self.stop()),
            signal.SIGHUP: self.reload,
        }
        for sig, callback in handlers.items():
            try:
                loop.add_signal_handler(sig, callback)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # not the main thread: the caller stops us
        try:
            await self._stopping.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self.events is not None:
                await self.events.close()
            await wait_for_releases(self.config.cluster.timeout_seconds * 4)
            if self.admin is not None:
                await self.admin.stop()
            await self.guard.close()

    def reload(self) -> None:
        """SIGHUP: the TLS certificate, key and client CA, and the signing keys, read
        again; open connections are kept. A file that cannot be used keeps what is in
        force (logged)."""
        self.reload_tls()
        self.guard.reload_signing_keys()

    def reload_tls(self) -> bool:
        """Reload the TLS certificate and key (SIGHUP); open connections are kept."""
        if self.ssl_context is None:
            return False
        from wsguard.engines.tls import reload_certificate

        return reload_certificate(self.ssl_context, self.config.tls)

    def run(self) -> None:
        """Blocking entry point, the same as ``wsguard serve``: start, print where it listens
        on stderr (``wsguard: listening on ws://HOST:PORT/ (engine NAME)``, and the admin
        listener's address), serve until SIGTERM/SIGINT, then return. When it cannot start,
        one line on stderr and the process exits: status 1 when it cannot listen (or reach
        the store), 2 for a configuration error. ``await app.serve()`` prints nothing and
        raises instead (:class:`~wsguard.errors.ListenError`...)."""
        status = run_main(self)
        if status:
            raise SystemExit(status)


def run_main(app: App, *, config_file: str | os.PathLike[str] | None = None) -> int:
    """Start *app*, announce it (:func:`announce`), serve until SIGTERM/SIGINT: the exit
    status. A failure to start is reported as one line on stderr (:func:`report`).
    :meth:`App.run`, ``wsguard serve`` and ``wsguard proxy`` all run through here."""

    from wsguard.hosts.openfiles import open_files_warning, raise_open_files

    open_files = raise_open_files()  # every connection is a file descriptor

    async def main() -> None:
        await app.start()
        # what start-up made (modules, the configuration, compiled schemas) lives as long as
        # the process: out of the garbage collector's way, a full collection under
        # connection churn walks only what connections made, not the whole heap
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)  # fewer collections under churn (700, 10, 10)
        warning = open_files_warning(app.config.limits.max_connections, open_files)
        if warning is not None:  # before the listening line: a start-up fact
            print(f"wsguard: {warning}", file=sys.stderr, flush=True)
        announce(app, config_file=config_file)
        recorded = record_admin_url(app)
        try:
            await app.serve()
        finally:
            if recorded is not None:
                forget_admin_url(recorded)

    try:
        run_loop(app.config, main())
    except WsguardError as exc:
        return report(exc)
    return 0


def report(exc: WsguardError) -> int:
    """Print *exc* as wsguard's one line on stderr; its exit status (2 for configuration)."""
    from wsguard.extras import MissingExtra

    if isinstance(exc, MissingExtra):  # what needs which extra, and the pip command
        print(f"wsguard: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if isinstance(exc, ConfigError):
        print(f"wsguard: configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    print(f"wsguard: {exc}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_url(config: Config, port: int) -> str:
    """The URL of the public listener on *port*, e.g. ``ws://127.0.0.1:8765/``."""
    scheme = "wss" if config.tls.enabled else "ws"
    return f"{scheme}://{_bracketed(config.host)}:{port}/"


def listen_error(exc: OSError, host: str, port: int, what: str = "") -> ListenError:
    """The one-line :class:`ListenError` of a failed bind, e.g. ``cannot listen on
    127.0.0.1:8765: address already in use``."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        why = exc.strerror or str(exc)
    else:
        why = os.strerror(exc.errno)  # not asyncio's "error while attempting to bind ..."
    label = f" ({what})" if what else ""
    error = ListenError(
        f"cannot listen on {_bracketed(host)}:{port}{label}: {why[:1].lower()}{why[1:]}"
    )
    error.errno = exc.errno
    return error


def announce(app: App, *, config_file: str | os.PathLike[str] | None = None) -> None:
    """What a started server prints on stderr: where it listens, its admin listener and
    generated admin token, and how to mint a token for the development key."""
    config = app.config

    def say(line: str) -> None:
        print(f"wsguard: {line}", file=sys.stderr, flush=True)

    url = app.url
    say(f"listening on {url} (engine {config.engine})")
    admin = app.admin
    if admin is not None:
        base = f"{admin.scheme}://{_bracketed(config.admin.host)}:{admin.port}"
        say(f"admin listener on {base}/ (dashboard {base}/dashboard, metrics {base}/metrics)")
        if admin.generated_token_file is not None:
            say(
                f"admin token in {admin.generated_token_file} (mode 0600; set "
                f"WSGUARD_ADMIN_TOKEN to choose your own)"
            )
    key_info = app.guard.key_info
    if key_info.dev_key:
        config_file = config_file or app.config.source_file  # App(load_config(file)).run()
        cfg = f" --config {config_file}" if config_file else ""
        say(
            f"no JWT key configured; using the development key in "
            f"{key_info.dev_key_path} (mode 0600, loopback only).\n"
            f"wsguard: mint a token:  wsguard token{cfg} --sub alice --scope chat --ttl 1h\n"
            f"wsguard: then connect to {url} with the header "
            f"'Authorization: Bearer <token>' or the subprotocols "
            f"['wsguard.v1', 'token.<token>'] (docs: guides/standalone.md, Connect)"
        )
    if not config.origin.allowed:
        others = "; clients that send none are admitted" if config.origin.allow_missing else ""
        say(
            "browsers send an Origin, and none is allowed yet: allow your page's "
            "(origin.allowed, e.g. WSGUARD_ORIGIN__ALLOWED='[\"http://localhost:3000\"]')" + others
        )
    for note in app.startup_notes():
        say(note)


def admin_url(app: App) -> str | None:
    """The URL to reach *app*'s admin listener from this machine (None: no listener)."""
    admin = app.admin
    if admin is None or admin.port is None:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        app.config.admin.host, app.config.admin.host
    )
    return f"{admin.scheme}://{_bracketed(host)}:{admin.port}"


def record_admin_url(app: App) -> Path | None:
    """Write the admin listener's URL to :data:`ADMIN_URL_FILE` (mode 0600) while the
    server runs, so that ``wsguard admin`` finds it with no flag; the path written, or None
    (no admin listener, or the file cannot be written: nothing else depends on it)."""
    url = admin_url(app)
    if url is None:
        return None
    path = ADMIN_URL_FILE.expanduser()
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        logger.debug("cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()
        return None
    return path


def forget_admin_url(path: Path) -> None:
    """Remove the admin URL file, unless another server has written its own since."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def run_loop(config: Config, main: Awaitable[None]) -> None:
    """Run *main* to completion on uvloop, for every engine (picows is built for it, and
    the ``websockets`` engine's transports, accepts and timers are uvloop's C instead of
    asyncio's Python: measured in docs/topics/performance.md); asyncio's own loop only
    where uvloop is not installed (it is a dependency except on Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed wherever it builds
        if config.engine == "picows":
            raise
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


def _error(code: str, message: str, ref: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    ref = valid_ref(ref)  # as the policy's own refusals echo it: short, or a safe integer
    if ref is not None:
        out["ref"] = ref
    return out
