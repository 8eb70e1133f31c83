"""The listening socket, its connections, heartbeats and a graceful close."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from picows import (
    WSAutoPingStrategy,
)

from wsguard.core.decisions import (
    CLOSE_GOING_AWAY,
    Admit,
)
from wsguard.engines.screening import (
    PendingHandshakes,
)
from wsguard.session import Host, release

if TYPE_CHECKING:
    import ssl

    from wsguard.guard import Guard

from wsguard.engines.picows.handshake import HandshakeProtocol
from wsguard.engines.picows.inline import run_inline
from wsguard.engines.picows.listener import GuardListener
from wsguard.engines.picows.socket_views import BoundedReads

logger = logging.getLogger("wsguard.server")

_READ_BUFFER = 2048  # picows' initial read buffer (it grows for bigger frames)


class _ClientFaults(logging.Filter):
    """picows logs a client's protocol error at ERROR: wsguard audits the close instead,
    so a client cannot write error lines into the server log at will."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("WS parser error", "Disconnect because HTTP"))


def _engine_logger() -> logging.LoggerAdapter[logging.Logger]:
    """picows' logger: never below WARNING (its debug records carry frames). An adapter,
    so picows does not create a child logger per connection."""
    engine = logging.getLogger("wsguard.engine")
    if engine.getEffectiveLevel() < logging.WARNING:
        engine.setLevel(logging.WARNING)
    if not any(isinstance(f, _ClientFaults) for f in engine.filters):
        engine.addFilter(_ClientFaults())
    return logging.LoggerAdapter(engine, {})


# -- the server ------------------------------------------------------------------------


class PicowsServer:
    """The listening socket, its connections, and a graceful close (websockets' API)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.guard: Guard = host.guard
        self.metrics = host.guard.monitor.metrics
        self.pending = PendingHandshakes(host.guard)
        self.max_fragments = host.guard.config.limits.max_fragments
        self.deciding: set[asyncio.Task[None]] = set()
        self.listeners: set[GuardListener] = set()
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None
        config = host.guard.config
        liveness = config.liveness
        self.ping_interval = liveness.ping_interval_seconds
        self.max_message_bytes = config.limits.max_message_bytes
        self.inline = not host.guard.store.shared  # slot releases need no task
        self.loop = asyncio.get_running_loop()  # kept: each lookup costs a getpid() on 3.11
        self._sweeper: asyncio.TimerHandle | None = None
        self._ping_ids = itertools.count(1)
        shortest = min(liveness.ping_interval_seconds, liveness.ping_timeout_seconds)
        self._period = min(1.0, max(0.02, shortest / 4))
        self._protocol_args = (
            _engine_logger(),
            True,  # disconnect when a listener callback raises (never expected)
            None,  # the handshake timeout is HandshakeProtocol's
            False,  # heartbeats are the listener's (pings counted, pongs matched)
            liveness.ping_interval_seconds,
            liveness.ping_timeout_seconds,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # pings are answered by the listener, after the policy counted them
            config.limits.max_message_bytes,
            None,
            _READ_BUFFER,
        )

    def ws_protocol(self, factory: Any) -> Any:
        return BoundedReads(None, None, False, factory, *self._protocol_args)

    def adopt(self, listener: GuardListener) -> None:
        self.listeners.add(listener)
        if self._sweeper is None and self._period:
            self._sweeper = self.loop.call_later(self._period, self._sweep)

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Decide a handshake: inline on the memory store (it answers without I/O; a task
        measured ~6 % fewer handshakes/s), in a task when the store does I/O."""
        if self.inline:
            run_inline(coro)
            return
        task = self.loop.create_task(coro)
        self.deciding.add(task)
        task.add_done_callback(self.deciding.discard)

    def release(self, admission: Admit | None) -> None:
        """Give *admission*'s slots back: inline on the memory store, else in a task."""
        if admission is None:
            return
        if self.inline:
            run_inline(admission.release())
        else:
            release(admission)

    def _sweep(self) -> None:
        """Heartbeats of every connection, from one timer: ping the ones that are due,
        fail (1011) the ones whose pong is overdue. No timer objects per connection."""
        self._sweeper = None
        now = time.monotonic()
        liveness = self.guard.config.liveness
        interval, timeout = liveness.ping_interval_seconds, liveness.ping_timeout_seconds
        for listener in list(self.listeners):
            listener.heartbeat(now, interval, timeout, self._ping_ids)
        if self.listeners:
            self._sweeper = self.loop.call_later(self._period, self._sweep)

    def forget(self, listener: GuardListener) -> None:
        self.listeners.discard(listener)
        if not self.listeners and self._idle is not None:
            self._idle.set()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self, ssl: Any) -> None:
        config = self.guard.config
        loop = asyncio.get_running_loop()
        # the loop's own transports (uvloop's under wsguard serve), not aiofastnet's (what
        # ws_create_server picks): measured 7.6 KB per idle connection against 12.8 KB,
        # at the same handshake rate
        self._server = await loop.create_server(
            lambda: HandshakeProtocol(self),
            config.host,
            config.port,
            ssl=ssl,
            ssl_handshake_timeout=config.limits.handshake_timeout_seconds if ssl else None,
            backlog=1024,
        )

    def close(
        self, *, close_connections: bool = True, code: int = CLOSE_GOING_AWAY, reason: str = ""
    ) -> None:
        """Stop accepting; close every connection with *code* (1001: going away)."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle = asyncio.Event()
        if not self.listeners:
            self._idle.set()
        if close_connections:
            for listener in list(self.listeners):
                conn = listener.conn
                if conn is not None:
                    conn.close_soon(code, reason, cause="shutdown")
                elif listener.transport is not None:
                    listener.raw.close()

    async def wait_closed(self) -> None:
        if self._idle is not None:
            await self._idle.wait()
        if self._server is not None:
            await self._server.wait_closed()


async def start_server(host: Host, ssl_context: ssl.SSLContext | None) -> PicowsServer:
    """Start the picows server for *host* and return it (already serving)."""
    server = PicowsServer(host)
    await server.start(ssl_context)
    return server
