"""The listening socket, its connections, heartbeats and a graceful close."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from picows import (
    WSAutoPingStrategy,
)

from wsguard.core.decisions import (
    CLOSE_GOING_AWAY,
    Admit,
)
from wsguard.engines import LISTEN_BACKLOG
from wsguard.engines.screening import (
    PendingHandshakes,
)
from wsguard.observability.engine_log import quiet_logger
from wsguard.session import Host, release

if TYPE_CHECKING:
    import ssl

    from wsguard.guard import Guard

from wsguard.engines.picows.handshake import HandshakeProtocol
from wsguard.engines.picows.inline import run_inline
from wsguard.engines.picows.listener import GuardListener
from wsguard.engines.picows.socket_views import BoundedReads

logger = logging.getLogger("wsguard.server")

#: Handshakes decided per turn of the event loop at most (see PicowsServer.run).
_DECISIONS_PER_TURN = 4
_READ_BUFFER = 2048  # picows' initial read buffer (it grows for bigger frames)
_HEAD_READ = 64 * 1024  # bytes read at most per callback before the upgrade


_CLIENT_FAULTS = ("WS parser error", "Disconnect because HTTP")


class _ClientFaults(logging.Filter):
    """picows logs a client's protocol error at ERROR: wsguard audits the close instead,
    so a client cannot write error lines into the server log at will."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CLIENT_FAULTS)


class _EngineLog(logging.LoggerAdapter[logging.Logger]):
    """picows' logger. A client's protocol error is dropped before a log record is
    built for it (a client sending bad frames in a loop would otherwise cost a record
    each); everything else goes to ``wsguard.engine`` as usual."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith(_CLIENT_FAULTS):
            return
        super().log(level, msg, *args, **kwargs)  # error(), info() ... all come here


def _engine_logger() -> logging.LoggerAdapter[logging.Logger]:
    """picows' logger: never below WARNING (its debug records carry frames). An adapter,
    so picows does not create a child logger per connection."""
    engine = quiet_logger("wsguard.engine")
    if not any(isinstance(f, _ClientFaults) for f in engine.filters):
        engine.addFilter(_ClientFaults())  # for records picows makes without the adapter
    return _EngineLog(engine, {})


# -- heartbeats -------------------------------------------------------------------------

_T = TypeVar("_T")


class HeartbeatWheel(Generic[_T]):
    """Every connection, each in the bucket of the tick (``period`` seconds) at which
    it is next due: a sweep touches the buckets that are due, so heartbeats cost in
    proportion to the pings and deadlines that fall due, not to the connections held.

    A member is in at most one bucket; ``members`` maps it to that tick (0: in none).
    Removing one is O(1), so a closed connection is not kept until its tick.
    """

    __slots__ = ("_buckets", "members", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self.members: dict[_T, int] = {}
        self._buckets: dict[int, dict[_T, None]] = {}

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[_T]:
        return iter(self.members)

    @property
    def scheduled(self) -> bool:
        """Some member is in a bucket (a sweep has something to do, some day)."""
        return bool(self._buckets)

    def tick(self, now: float) -> int:
        """The last tick begun at *now*."""
        return math.floor(now / self.period)

    def schedule(self, member: _T, due: float, after: int = 0) -> None:
        """Put *member* in the bucket of the first tick at or after *due* (and after the
        tick *after*), out of the one it was in."""
        tick = max(math.ceil(due / self.period), after + 1)
        old = self.members.get(member)
        if old == tick:
            return
        if old:
            self._unbucket(member, old)
        self.members[member] = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = {member: None}
        else:
            bucket[member] = None

    def park(self, member: _T) -> None:
        """Keep *member*, in no bucket (nothing due any more: a closing connection)."""
        old = self.members.get(member)
        if old:
            self._unbucket(member, old)
        self.members[member] = 0

    def remove(self, member: _T) -> None:
        old = self.members.pop(member, None)
        if old:
            self._unbucket(member, old)

    def pop_due(self, now: float) -> list[_T]:
        """The members of every bucket whose tick has begun at *now*, earliest first;
        they stay members, parked until scheduled again."""
        current = self.tick(now)
        ticks = sorted(t for t in self._buckets if t <= current)
        due: list[_T] = []
        members = self.members
        for tick in ticks:
            bucket = self._buckets.pop(tick)
            for member in bucket:
                members[member] = 0
            due.extend(bucket)
        return due

    def bucket(self, tick: int) -> dict[_T, None]:
        """The bucket of *tick* (made when missing), for :meth:`PicowsServer._sweep`,
        which puts parked members in it itself (and sets ``members`` to *tick*)."""
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
        return bucket

    def _unbucket(self, member: _T, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(member, None)
            if not bucket:
                del self._buckets[tick]


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
        # handshakes waiting for a turn of the event loop with decisions left (see run)
        self._waiting: collections.deque[Coroutine[Any, Any, None]] = collections.deque()
        self._budget = _DECISIONS_PER_TURN  # decisions left in this turn
        self._turn_scheduled = False
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None
        # the listener's TLS context (None: plaintext): TLS is started by each
        # HandshakeProtocol, after the connection is counted as a pending handshake
        self.tls: ssl.SSLContext | None = None
        config = host.guard.config
        liveness = config.liveness
        self.ping_interval = liveness.ping_interval_seconds
        self.max_message_bytes = config.limits.max_message_bytes
        self.inline = not host.guard.store.shared  # slot releases need no task
        self.loop = asyncio.get_running_loop()  # kept: each lookup costs a getpid() on 3.11
        # every handshake reads into this one buffer (see HandshakeProtocol.get_buffer)
        self.head_reads = memoryview(bytearray(_HEAD_READ))
        self._sweeper: asyncio.TimerHandle | None = None
        self._ping_ids = itertools.count(1)
        shortest = min(liveness.ping_interval_seconds, liveness.ping_timeout_seconds)
        # every connection, in the bucket of its next ping or pong deadline
        self.listeners: HeartbeatWheel[GuardListener] = HeartbeatWheel(
            min(1.0, max(0.02, shortest / 4))
        )
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
        """A new connection: its first ping is due one interval from now."""
        self.listeners.schedule(listener, time.monotonic() + self.ping_interval)
        if self._sweeper is None:
            self._arm(time.monotonic())

    def _arm(self, now: float) -> None:
        """The next sweep, just after the next tick begins."""
        period = self.listeners.period
        delay = (self.listeners.tick(now) + 1) * period - now
        self._sweeper = self.loop.call_later(delay + 0.001, self._sweep)

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Decide a handshake, at most ``_DECISIONS_PER_TURN`` per turn of the event loop:
        under a storm of handshakes (a reconnect flood, a restart's reconnections) the
        messages of the open connections are handled between every few decisions
        instead of waiting behind all of them; the others wait, in order, for the next
        turns. Inline on the memory store (it answers without I/O; a task measured ~6 %
        fewer handshakes/s), in a task when the store does I/O."""
        if self._budget > 0 and not self._waiting:
            self._budget -= 1
            self._next_turn_soon()
            self._start(coro)
            return
        self._waiting.append(coro)
        self._next_turn_soon()

    def _next_turn_soon(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self._next_turn)  # runs after this turn's I/O callbacks

    def _next_turn(self) -> None:
        """A new turn: a new allowance of decisions, spent first on those waiting."""
        self._turn_scheduled = False
        self._budget = _DECISIONS_PER_TURN
        self._decide_waiting(_DECISIONS_PER_TURN)

    def _decide_waiting(self, limit: int) -> None:
        waiting = self._waiting
        count = min(limit, len(waiting))
        self._budget -= count
        for _ in range(count):
            self._start(waiting.popleft())
        if waiting:
            self._next_turn_soon()

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
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
        """Heartbeats, from one timer: the connections whose ping or pong deadline has
        come are pinged, or failed (1011), and go to the bucket of what they wait for
        next. Nothing per connection at rest, no timer objects per connection."""
        self._sweeper = None
        now = time.monotonic()
        liveness = self.guard.config.liveness
        interval, timeout = liveness.ping_interval_seconds, liveness.ping_timeout_seconds
        wheel = self.listeners
        after = wheel.tick(now)
        ping_ids = self._ping_ids
        members, period = wheel.members, wheel.period
        tick = 0  # and its bucket: the last one scheduled in (most of a sweep's share it)
        bucket: dict[GuardListener, None] = {}
        for listener in wheel.pop_due(now):
            due = listener.heartbeat(now, interval, timeout, ping_ids)
            if due is None:
                if listener.transport is None:  # never connected (picows refused the upgrade)
                    self.forget(listener)
                continue
            # what wheel.schedule does, for a member pop_due left parked (0)
            if members.get(listener) != 0:  # forgotten, or scheduled meanwhile
                if listener in members:
                    wheel.schedule(listener, due, after)
                continue
            next_tick = math.ceil(due / period)
            if next_tick <= after:
                next_tick = after + 1
            if next_tick != tick or not bucket:  # (an emptied bucket leaves the wheel)
                tick, bucket = next_tick, wheel.bucket(next_tick)
            members[listener] = tick
            bucket[listener] = None
        if wheel.scheduled:
            self._arm(now)

    def forget(self, listener: GuardListener) -> None:
        self.listeners.remove(listener)
        if not self.listeners and self._idle is not None:
            self._idle.set()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self, tls: ssl.SSLContext | None) -> None:
        config = self.guard.config
        loop = asyncio.get_running_loop()
        self.tls = tls
        # the loop's own transports (uvloop's under wsguard serve), not aiofastnet's (what
        # ws_create_server picks): measured 7.6 KB per idle connection against 12.8 KB,
        # at the same handshake rate. TCP only: TLS is started by HandshakeProtocol, so a
        # TLS handshake is a pending handshake from its accept (limits, timeout, audit)
        self._server = await loop.create_server(
            lambda: HandshakeProtocol(self), config.host, config.port, backlog=LISTEN_BACKLOG
        )

    def close(
        self, *, close_connections: bool = True, code: int = CLOSE_GOING_AWAY, reason: str = ""
    ) -> None:
        """Stop accepting; close every connection with *code* (1001: going away)."""
        if self._server is not None:
            self._server.close()
        self._decide_waiting(len(self._waiting))  # requests already read: decided, closed
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
