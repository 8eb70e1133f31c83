"""One admitted connection's whole life, the same on every engine and for every host.

The seam between the engines (bytes, frames, closes) and the hosts (what a delivered
message is for)::

    engine ──Transport──▶ Session ──Host hooks──▶ App · gateway · ASGI middleware
                             │
                             ▼
                       policy core (Guard)

- An **engine** (picows, websockets, an ASGI server) parses frames and owns the socket.
  It gives the Session a :class:`Transport` (write now or say it cannot, wait for room,
  close with a bounded closing handshake, abort, how the connection ended) and calls
  the Session for everything else: :meth:`Session.open`, :meth:`Session.receive` for
  each message, :meth:`Session.control_frame` for pings and pongs,
  :meth:`Session.data_frame` for each frame of a fragmented message,
  :meth:`Session.fail` for a protocol error, and :meth:`Session.end` once, when the
  connection is gone.
- The **Session** owns what happens between: the message policy and its answers
  (error frames, refreshes, closes), the store-backed checks of a delivered message,
  the timers (token expiry, idle timeout, maximum lifetime), the bounded outbound
  queue (a slow consumer is dropped, never waited for), closing, and the end: timers
  cancelled, slots released, the close counted and audited.
- A **host** plugs in through public hooks (:class:`Host`): the welcome frame, where a
  delivered message goes, and what happens when a connection opens, is refreshed and
  closes. The Session is what handlers get (``wsguard.Connection``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from wsguard import deadlines
from wsguard.core.decisions import (
    CLOSE_CREDENTIALS_EXPIRED,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    Admit,
    Close,
    Deliver,
    MessageDecision,
    Reauthenticate,
    Refuse,
)

if TYPE_CHECKING:
    from wsguard.core.identity import Identity
    from wsguard.guard import Guard

logger = logging.getLogger("wsguard.server")

_SLOW_CONSUMER_ABORT_SECONDS = 1.0
#: Bytes a transport may hold unsent before writes wait (and a queue builds up).
DIRECT_WRITE_LIMIT = 64 * 1024
#: Close codes an endpoint may send (RFC 6455 7.4.1), besides 3000-4999.
SENDABLE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


#: the cause audited for a close the engine made by itself, by its code
ENGINE_CAUSES = {
    1002: "protocol_error",
    1007: "invalid_utf8",
    1009: "too_big",
}
#: the refusal category and code of a connection failed by the frame parser
_ENGINE_REFUSALS = {
    CLOSE_TOO_BIG: ("size", "too_big"),
    1002: ("protocol", "protocol_error"),
    1007: ("protocol", "invalid_utf8"),
}
#: the reason of the close frame an engine sends when its frame parser fails a
#: connection, the same on every engine: short and fixed, never a quote of the frame
ENGINE_REASONS = {
    1002: "protocol error",
    1007: "invalid UTF-8",
    1009: "message too big",
}


def sendable_close_code(code: int | None) -> bool:
    """Whether *code* may be sent in a close frame (never 1005, 1006, 1015, 0...)."""
    return code is not None and (code in SENDABLE_CLOSE_CODES or 3000 <= code <= 4999)


class Transport(Protocol):
    """What an engine offers a Session: one per connection, the engine's own object
    where it can be (no extra allocation per connection)."""

    def write(self, data: str | bytes, text: bool = False) -> bool:
        """Write one data frame now (text for ``str``, or for ``bytes`` of UTF-8 with
        *text*; binary otherwise); False when that cannot be done without waiting (the
        socket's buffer is full, or writes are asynchronous): the Session then queues it
        and calls :meth:`send`."""

    async def send(self, data: str | bytes) -> bool:
        """Write one data frame, waiting for room; False when the connection is gone."""

    def is_open(self) -> bool:
        """Data frames can still be sent (no close frame sent or received)."""

    def close_now(self, code: int, reason: str) -> bool:
        """Send the close frame at once, if the engine can do so from a callback
        (picows); False: the Session closes through :meth:`close` in a task."""

    async def close(self, code: int, reason: str) -> None:
        """Close with *code* and wait (bounded) for the closing handshake."""

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake."""

    def close_result(self) -> tuple[int, str, str]:
        """How it ended: the close code and reason sent by whoever closed first and who
        that was (``server``, ``client``; 1006 and ``network``: no close frame)."""


class Host(Protocol):
    """What a Session needs of the object hosting it (App, gateway, ASGI middleware)."""

    @property
    def guard(self) -> Guard:
        """The policy this host enforces."""

    @property
    def connections(self) -> MutableMapping[str, Any]:
        """The node's live connections, by id (revocations, operators, broadcasts)."""

    def new_connection_id(self) -> str:
        """A connection id unique on this node."""

    def keep_request(self, path: str, headers: Any) -> Any:
        """What a connection keeps of its upgrade request (:attr:`Session.request`)."""

    def welcome(self, session: Session) -> dict[str, Any] | None:
        """The first frame of a new connection (None: none)."""

    def deliver(
        self, session: Session, decision: Deliver, data: str | bytes
    ) -> Awaitable[None] | None:
        """A message that passed the whole policy; returns what is still to be awaited
        (a coroutine handler, say), or None when delivery is already done."""

    def opened(self, session: Session) -> Awaitable[None] | None:
        """The connection is open (welcome sent, timers running)."""

    def refreshed(self, session: Session) -> None:
        """The connection's identity was replaced by an in-band refresh."""

    def closed(self, session: Session) -> Awaitable[None] | None:
        """The connection has ended (slots released, close audited)."""


# -- slots given back ------------------------------------------------------------------

_pending_releases: set[asyncio.Task[None]] = set()


def release(admission: Admit | None) -> None:
    """Free *admission*'s slots in the background (None: nothing to do). A release may
    need the store (Redis in cluster mode); the task is tracked so a shutdown can wait,
    bounded, until every slot is back (:func:`wait_for_releases`)."""
    if admission is not None:
        task = asyncio.get_running_loop().create_task(admission.release())
        _pending_releases.add(task)
        task.add_done_callback(_pending_releases.discard)


async def awaited(pending: Awaitable[None]) -> None:
    """Await *pending* (a host's hook) in a task of its own: ``create_task`` needs a
    coroutine, and an engine's callback cannot wait."""
    await pending


async def wait_for_releases(grace: float) -> None:
    """Wait (bounded) until slots given back by closed connections reach the store."""
    loop = asyncio.get_running_loop()  # other Apps in this process run other loops
    pending = [t for t in _pending_releases if not t.done() and t.get_loop() is loop]
    if pending:
        await asyncio.wait(pending, timeout=grace)


def first_close(sent: Any, rcvd: Any, rcvd_then_sent: bool) -> tuple[int, str, str]:
    """The close as the audit log reports it: code, reason and who closed first.

    *sent* and *rcvd* are the engine's close frames (anything with ``code`` and
    ``reason``) or None. A close frame without a status code is 1005 on every engine.
    """
    if sent is not None and (rcvd is None or not rcvd_then_sent):
        return _code(sent.code), _text(sent.reason), "server"
    if rcvd is not None:
        return _code(rcvd.code), _text(rcvd.reason), "client"
    return 1006, "", "network"


def _code(code: Any) -> int:
    value = int(getattr(code, "value", code) or 0)
    return 1005 if value == 0 else value  # "no status code" (picows reports 0)


def _text(reason: Any) -> str:
    if isinstance(reason, bytes):
        return reason.decode("utf-8", "replace")
    return str(reason or "")


# -- the session -----------------------------------------------------------------------


class Session:
    """An admitted WebSocket connection, from admission to its audited end.

    Handlers get it as ``conn``: :attr:`id`, :attr:`subject`, :attr:`identity`,
    :attr:`client`, :meth:`send`, :meth:`send_raw`, :meth:`close`.
    """

    __slots__ = (
        "_admission",
        "_closing",
        "_expiry_at",
        "_idle_at",
        "_lifetime_at",
        "_loop",
        "_queue",
        "_tasks",
        "_wheel",
        "_writer",
        "attachment",
        "client",
        "close_cause",
        "deadline_tick",
        "guard",
        "host",
        "id",
        "identity",
        "opened_at",
        "origin",
        "request",
        "sent",
        "state",
        "subprotocol",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        host: Host,
        admission: Admit,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        guard = host.guard
        now = time.monotonic()
        self.transport = transport
        self.host = host
        self.guard = guard
        # kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.id = host.new_connection_id()
        self.identity: Identity = admission.identity
        self.client = admission.client
        self.origin = admission.origin
        self.subprotocol = admission.subprotocol
        self.state = guard.messages.open(admission.identity, now)
        self.state.connection_id, self.state.client = self.id, self.client
        self.opened_at = now
        self.sent = 0
        self.request: Any = None  # what the host keeps of the upgrade request
        self.attachment: Any = None  # the host's own per-connection data
        self.close_cause: str | None = None
        self._admission: Admit | None = admission
        self._queue: collections.deque[str | bytes] | None = None  # created when needed
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] | None = None
        # deadlines (loop time), on the loop's wheel (see _start_timers)
        self._wheel = deadlines.wheel(self._loop)
        self._expiry_at: float | None = None
        self._idle_at: float | None = None
        self._lifetime_at: float | None = None
        self.deadline_tick: int | None = None  # the wheel's bucket of this connection

    @property
    def subject(self) -> str:
        return self.identity.subject

    @property
    def closing(self) -> bool:
        """A close has started (by wsguard, the handler or the peer's close frame)."""
        return self._closing

    @property
    def holder(self) -> str:
        """The store's name for this connection's slots (empty once released)."""
        admission = self._admission
        return admission.holder if admission is not None else ""

    @property
    def checked_at(self) -> float:
        """When the handshake's checks (revocations, bans) started (monotonic)."""
        admission = self._admission
        return admission.checked_at if admission is not None else self.opened_at

    @property
    def backlogged(self) -> bool:
        """Frames are waiting in the outbound queue (the client is not keeping up)."""
        return self._writer is not None

    @property
    def close_code(self) -> int | None:
        """The close code of the connection once a close frame was sent or received."""
        if self.transport.is_open():
            return None
        code, _, closed_by = self.transport.close_result()
        return None if closed_by == "network" else code

    # -- the connection's life (called by the engine) --------------------------------

    def open(self) -> Awaitable[None] | None:
        """The upgrade is done: register, audit, start the timers, welcome, tell the host.
        Returns the host's opened hook when it has to be awaited."""
        host = self.host
        host.connections[self.id] = self
        self.guard.connection_opened(self, self.subprotocol)
        self._start_timers()
        welcome = host.welcome(self)
        if welcome is not None:
            self.send(welcome)
        return host.opened(self)

    def receive(self, data: str | bytes) -> Awaitable[None] | None:
        """One message through the policy, without waiting: every answer that needs no
        I/O is given here; a message that passed (or needs the store) comes back as an
        awaitable, which the engine runs (inline where it can)."""
        guard = self.guard
        now = time.monotonic()  # the Guard's clock (Guard.now)
        decision = guard.messages.evaluate(self.state, data, now)
        if type(decision) is not Deliver:
            if isinstance(decision, Reauthenticate):
                return self._refresh(decision)
            self._answer(decision)
            return None
        quota = guard.quota
        over_local = quota is not None and not quota.take_local(self.identity.subject, now)
        if over_local or decision.nonce is not None:
            return self._deliver_checked(decision, data, over_local)
        guard.metrics.message_delivered(decision.type)
        return self.host.deliver(self, decision, data)

    def control_frame(self, size: int) -> None:
        """A ping or pong of *size* bytes arrived: counted (a ping flood is a flood)."""
        close = self.guard.messages.control_frame(self.state, time.monotonic(), size)
        if close is not None:
            self._flooded(close)

    def fragment(self) -> None:
        """A continuation frame arrived: charged to the message rate like a message (a
        message in many fragments costs as much as as many messages)."""
        close = self.guard.messages.fragment(self.state, time.monotonic())
        if close is not None:
            self._flooded(close)

    def _flooded(self, close: Close) -> None:
        """A flood of frames that are not messages (pings, fragments): a refusal like a
        message's, counted and observed once (the frames after it are not)."""
        if not self._closing:
            refusal = close.cause or "rate_limited"
            self.guard.monitor.connection_refused("rate", refusal, self.client)
        self.close_soon(close.code, close.reason, cause=close.cause)

    def fail(self, code: int, reason: str, cause: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): the close frame goes out first (queued
        frames are dropped), and nothing the peer sends afterwards is evaluated."""
        closing, self._closing = self._closing, True
        if not closing:
            self.close_cause = cause
        queue = self._queue
        if queue:
            queue.clear()
        if not self.transport.close_now(code, reason) and not closing:
            self._closing = False
            self._start_close(code, reason)

    def end(self, releaser: Callable[[Admit], None] = release) -> Awaitable[None] | None:
        """The connection is gone (called once by the engine, however it ended): the close
        counted and audited, then what :meth:`discard` does (timers, registry, slots,
        released by *releaser*: in a task by default; an engine on the memory store may
        release inline). Returns the host's closed hook when it has to be awaited."""
        self._closing = True
        guard = self.guard
        code, reason, closed_by = self.transport.close_result()
        if closed_by == "server" and self.close_cause is None:
            # the engine failed the connection itself (its parser, its heartbeat)
            if code == 1011 and reason == "keepalive ping timeout":
                self.close_cause = "ping_timeout"
            else:
                self.close_cause = ENGINE_CAUSES.get(code)
        if closed_by == "server" and code in _ENGINE_REFUSALS:
            # the frame parser's refusals: over the size limit, RFC 6455 broken, not UTF-8
            category, refusal = _ENGINE_REFUSALS[code]
            guard.monitor.connection_refused(category, refusal, self.client)
        guard.connection_closed(self, code, closed_by)
        self.discard(releaser)
        return self.host.closed(self)

    def discard(self, releaser: Callable[[Admit], None] = release) -> None:
        """Timers cancelled, the host's registry left, the policy's state of the
        connection given back, the slots released; nothing audited (alone: a connection
        that never opened, an ASGI app that did not accept)."""
        self._closing = True
        self.cancel_timers()
        self.host.connections.pop(self.id, None)
        self.guard.messages.closed(self.state, time.monotonic())
        admission, self._admission = self._admission, None
        if admission is not None:
            releaser(admission)

    def mark_closing(self) -> None:
        """A close was started outside the Session (by the peer, or by a host that
        closes itself): nothing more is sent or evaluated."""
        self._closing = True

    # -- policy answers ----------------------------------------------------------------

    def refuse(self, refusal: Refuse) -> None:
        """Refuse a message the policy passed but the host cannot take (a raw handler's
        or the gateway's duplicate keys): the error frame, and a violation like the
        policy's own refusals (closed with 1008 past the budget)."""
        self._answer(self.guard.messages.refuse(self.state, time.monotonic(), refusal))

    def _answer(self, decision: MessageDecision) -> None:
        """Answer a message that is not delivered: an error frame or a close."""
        monitor = self.guard.monitor
        if isinstance(decision, Refuse):
            monitor.message_refused(decision.code, decision.type, self.client, closed=False)
            # bounded by the message rates (a burst also spends the violation budget)
            self.guard.audit.emit(
                "message_refused",
                connection_id=self.id,
                client=self.client,
                subject=self.subject,
                type=decision.type,
                code=decision.code,
            )
            self.send(decision.frame())
        elif isinstance(decision, Close):
            monitor.message_refused(decision.cause, None, self.client, closed=True)
            self.close_soon(decision.code, decision.reason, cause=decision.cause)
        elif isinstance(decision, Reauthenticate):
            self._refreshed(decision)

    async def _refresh(self, decision: Reauthenticate) -> None:
        """An in-band refresh whose token verified: the Guard's revocation check (the
        store's, cluster-wide, as at the handshake), then the answer."""
        self._answer(await self.guard.check_refresh(self, decision))

    def _refreshed(self, decision: Reauthenticate) -> None:
        self.guard.monitor.metrics.message_delivered("auth")
        self.identity = decision.identity
        self.state.identity = decision.identity
        self._schedule_expiry(decision.identity.expires_at)
        self.host.refreshed(self)
        reply: dict[str, Any] = {"type": "auth_ok", "expires_at": decision.identity.expires_at}
        if decision.ref is not None:
            reply["ref"] = decision.ref
        self.send(reply)

    async def _deliver_checked(
        self, decision: Deliver, data: str | bytes, over_local: bool
    ) -> None:
        """The checks that need the store (cluster quota, signed nonces), then delivery."""
        guard = self.guard
        checked: MessageDecision = decision
        if over_local:
            checked = await guard.check_quota(self.state, decision)
        if isinstance(checked, Deliver) and checked.nonce is not None:
            checked = await guard.check_nonce(self.state, checked)
        if isinstance(checked, Deliver):
            guard.monitor.metrics.message_delivered(checked.type)
            pending = self.host.deliver(self, checked, data)
            if pending is not None:
                await pending
        else:
            self._answer(checked)

    # -- timers ------------------------------------------------------------------------

    def _start_timers(self) -> None:
        """Token expiry, idle timeout and maximum lifetime: deadlines on the loop's
        :class:`~wsguard.deadlines.DeadlineWheel` (no timer per connection)."""
        now = self._loop.time()
        self._expiry_at = self._expiry_deadline(self.identity.expires_at, now)
        liveness = self.guard.config.liveness
        idle = liveness.idle_timeout_seconds
        if idle:
            self._idle_at = now + idle
        lifetime = liveness.max_lifetime_seconds
        if lifetime:
            self._lifetime_at = now + lifetime
        self._wheel.update(self)

    def _expiry_deadline(self, expires_at: float | None, now: float) -> float | None:
        """When (loop time) a token expiring at *expires_at* (Unix time) closes the
        connection: the Guard's deadline (leeway included), None without one."""
        deadline = self.guard.deadline(expires_at)
        return None if deadline is None else now + max(0.0, deadline - time.time())

    def _schedule_expiry(self, expires_at: float | None) -> None:
        """A refreshed token's deadline replaces the old one (none: lifted)."""
        self._expiry_at = self._expiry_deadline(expires_at, self._loop.time())
        self._wheel.update(self)

    def next_deadline(self) -> float | None:
        """The earliest of this connection's deadlines (loop time); None once closing."""
        if self._closing:
            return None
        found = None
        for at in (self._expiry_at, self._lifetime_at, self._idle_at):
            if at is not None and (found is None or at < found):
                found = at
        return found

    def deadlines_due(self, now: float) -> None:
        """Act on what is due at *now* (loop time): expiry closes 4001, the maximum
        lifetime 1001, the idle timeout 1001 unless data arrived meanwhile (then it is
        due again that much later). The earliest first; a close ends it."""
        while not self._closing:
            due = [
                (at, name)
                for at, name in (
                    (self._expiry_at, "expiry"),
                    (self._lifetime_at, "lifetime"),
                    (self._idle_at, "idle"),
                )
                if at is not None and at <= now
            ]
            if not due:
                return
            _, name = min(due)
            if name == "expiry":
                self._expiry_at = None
                self.close_soon(
                    CLOSE_CREDENTIALS_EXPIRED, "credentials expired", cause="token_expired"
                )
            elif name == "lifetime":
                self._lifetime_at = None
                self.close_soon(CLOSE_GOING_AWAY, "max lifetime", cause="max_lifetime")
            else:
                idle = self.guard.config.liveness.idle_timeout_seconds
                quiet = time.monotonic() - self.state.last_data_at
                if quiet >= idle:
                    self._idle_at = None
                    self.close_soon(CLOSE_GOING_AWAY, "idle timeout", cause="idle_timeout")
                else:
                    self._idle_at = now + (idle - quiet)

    def cancel_timers(self) -> None:
        """No deadline any more (the connection has ended)."""
        self._expiry_at = self._lifetime_at = self._idle_at = None
        self._wheel.discard(self)

    # -- sending -----------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> bool:
        """Queue a JSON message; False if the connection is closing or was dropped."""
        if self._closing:
            return False
        payload = orjson.dumps(message)  # UTF-8 already: written as it is when it can be
        if self._writer is None and not self._queue and self.transport.write(payload, True):
            self.sent += 1
            return True
        return self.send_text(payload.decode())

    def send_text(self, text: str | bytes) -> bool:
        """Send an already serialized frame (shared by broadcast); never waits.

        When nothing is queued and the transport can write at once, the frame is
        written now; otherwise it joins the bounded queue drained by a writer task
        (one exists only while there is something to send). A full queue marks a
        slow consumer, which is dropped.
        """
        if self._closing:
            return False
        queue = self._queue
        if self._writer is None and not queue and self.transport.write(text):
            self.sent += 1
            return True
        if queue is None:
            queue = self._queue = collections.deque()
        if len(queue) >= self.guard.config.limits.outbound_queue:
            self.drop_slow_consumer()
            return False
        queue.append(text)
        if self._writer is None:
            self._writer = self._loop.create_task(self._drain())
        return True

    def send_raw(self, data: str | bytes) -> bool:
        """Send *data* as it is: a text frame for ``str``, a binary frame for ``bytes``
        (e.g. a message echoed or forwarded as it arrived). Never waits: the same
        bounded queue as :meth:`send`, and a full queue drops the slow client. False if
        the connection is closing or was dropped."""
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"send_raw takes str or bytes, not {type(data).__name__}")
        return self.send_text(data)

    def drop_slow_consumer(self) -> None:
        """Close a client that does not read (1008, audited); never waited for."""
        if self._closing:
            return
        guard = self.guard
        guard.audit.emit(
            "slow_consumer", connection_id=self.id, client=self.client, subject=self.subject
        )
        guard.monitor.connection_refused("slow_consumer", "slow_consumer", self.client)
        self.close_soon(CLOSE_POLICY_VIOLATION, "slow consumer", cause="slow_consumer")
        if self._queue:
            self._queue.clear()
        self._loop.call_later(_SLOW_CONSUMER_ABORT_SECONDS, self.transport.abort)

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        transport = self.transport
        try:
            while queue:
                data = queue.popleft()
                if not await transport.send(data):
                    queue.clear()
                    break
                self.sent += 1
        finally:
            self._writer = None
            if not queue and self._queue is queue:
                self._queue = None  # an empty deque is ~0.6 KiB: made again when needed

    async def flush(self, grace: float = 1.0) -> bool:
        """Wait (bounded) until frames already queued have been handed to the transport;
        True when nothing is left waiting."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), grace)
        return self._writer is None

    # -- closing -----------------------------------------------------------------------

    def close_soon(self, code: int, reason: str, *, cause: str | None = None) -> None:
        """Start closing with *code*; returns at once (safe from any callback)."""
        if self._closing:
            return
        self.close_cause = cause or reason
        if self._writer is None and not self._queue and self.transport.close_now(code, reason):
            # nothing queued to go first: the close frame left now
            self._closing = True
            self._track(self._loop.create_task(self.transport.close(code, reason)))
            return
        self._start_close(code, reason)

    def _start_close(self, code: int, reason: str) -> None:
        self._closing = True
        self._track(self._loop.create_task(self._close(code, reason)))

    def _track(self, task: asyncio.Task[None]) -> None:
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with *code* and wait for the closing handshake.

        *code* must be 1000-1003, 1007-1014 or 3000-4999 and *reason* at most 123
        bytes of UTF-8 (RFC 6455); anything else raises ValueError.
        """
        if not sendable_close_code(code):
            raise ValueError(f"close code {code} cannot be sent")
        if len(reason.encode()) > 123:
            raise ValueError("close reason longer than 123 bytes")
        self._closing = True
        await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        if self.close_cause != "slow_consumer":
            await self.flush()  # replies already queued go out before the close frame
        try:
            await self.transport.close(code, reason)
        except Exception:  # the transport is broken: make sure the socket goes away
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        self.transport.abort()

    async def wait_closing(self) -> None:
        """Wait for a close started with :meth:`close_soon` (if any) to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


#: What handlers receive: the Session of their connection.
Connection = Session
