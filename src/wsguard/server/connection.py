"""One admitted connection, as handlers see it.

Outbound messages go through a bounded queue drained by a writer task that
exists only while there is something to send, so an idle connection costs no
task. A client whose queue is full is a slow consumer: it is closed with 1008
and never allowed to stall a broadcast.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from wsguard.core.decisions import CLOSE_POLICY_VIOLATION
from wsguard.core.identity import Identity
from wsguard.core.messages import ConnectionState

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

_SLOW_CONSUMER_ABORT_SECONDS = 1.0
DIRECT_WRITE_LIMIT = 64 * 1024  # bytes already buffered in the kernel-side transport
_SENDABLE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


class Connection:
    """An authenticated WebSocket connection hosted by :class:`wsguard.App`."""

    __slots__ = (
        "_closing",
        "_loop",
        "_on_slow",
        "_queue",
        "_queue_limit",
        "_tasks",
        "_timers",
        "_writer",
        "_ws",
        "client",
        "close_cause",
        "id",
        "identity",
        "opened_at",
        "origin",
        "request",
        "sent",
        "state",
        "subprotocol",
    )

    def __init__(
        self,
        ws: ServerConnection,
        *,
        connection_id: str,
        identity: Identity,
        client: str,
        origin: str | None,
        subprotocol: str | None,
        state: ConnectionState,
        queue_limit: int,
        on_slow: Callable[[Connection], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._ws = ws
        # kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.id = connection_id
        self.identity = identity
        self.client = client
        self.origin = origin
        self.subprotocol = subprotocol
        self.state = state
        self.opened_at = time.monotonic()
        self.sent = 0
        self.request: Any = None  # what an adapter keeps of the request (the gateway: path)
        self.close_cause: str | None = None
        self._queue: collections.deque[str | bytes] | None = None  # created when needed
        self._queue_limit = queue_limit
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] | None = None
        self._timers: dict[str, asyncio.TimerHandle] | None = None
        self._on_slow = on_slow

    @property
    def subject(self) -> str:
        return self.identity.subject

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, message: dict[str, Any]) -> bool:
        """Queue a JSON message; False if the connection is closing or was dropped."""
        return self.send_text(orjson.dumps(message).decode())

    def send_raw(self, data: str | bytes) -> bool:
        """Send *data* as it is: a text frame for ``str``, a binary frame for ``bytes``
        (e.g. a message echoed or forwarded as it arrived). Never waits: the same
        bounded queue as :meth:`send`, and a full queue drops the slow client. False if
        the connection is closing or was dropped."""
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"send_raw takes str or bytes, not {type(data).__name__}")
        return self.send_text(data)

    def send_text(self, text: str | bytes) -> bool:
        """Send an already serialized frame (shared by broadcast); never waits.

        When nothing is queued and the socket's buffer has room, the frame is
        written at once; otherwise it joins the bounded queue drained by a writer
        task. A full queue marks a slow consumer, which is dropped.
        """
        if self._closing:
            return False
        queue = self._queue
        if self._writer is None and not queue and self._write_now(text):
            return True
        if queue is None:
            queue = self._queue = collections.deque()
        if len(queue) >= self._queue_limit:
            self._on_slow(self)
            self.close_soon(CLOSE_POLICY_VIOLATION, "slow consumer", cause="slow_consumer")
            queue.clear()
            self._loop.call_later(_SLOW_CONSUMER_ABORT_SECONDS, self.abort)
            return False
        queue.append(text)
        if self._writer is None:
            self._writer = self._loop.create_task(self._drain())
        return True

    def _write_now(self, text: str | bytes) -> bool:
        """Write through the engine's sans-I/O protocol without a task, if possible."""
        ws = self._ws
        if ws.protocol.state is not State.OPEN:
            return False
        if ws.transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False  # the client is not keeping up: queue (and detect a slow consumer)
        if isinstance(text, str):
            ws.protocol.send_text(text.encode())
        else:
            ws.protocol.send_binary(text)
        try:
            ws.send_data()
        except Exception as exc:  # the engine's own send path handles it the same way
            ws.set_connection_exc(exc)
            ws.transport.abort()
        self.sent += 1
        return True

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                data = queue.popleft()
                await self._ws.send(data)
                self.sent += 1
        except ConnectionClosed:
            queue.clear()
        finally:
            self._writer = None

    async def flush(self, grace: float = 1.0) -> None:
        """Wait (bounded) until frames already queued have been handed to the socket."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                await asyncio.wait_for(asyncio.shield(writer), grace)

    def close_soon(self, code: int, reason: str, *, cause: str | None = None) -> None:
        """Start closing with *code*; returns at once (safe from any callback)."""
        if self._closing:
            return
        self._closing = True
        self.close_cause = cause or reason
        task = self._loop.create_task(self._close(code, reason))
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with *code* and wait for the closing handshake.

        *code* must be 1000-1003, 1007-1014 or 3000-4999 and *reason* at most 123
        bytes of UTF-8 (RFC 6455); anything else raises ValueError.
        """
        if not (code in _SENDABLE_CODES or 3000 <= code <= 4999):
            raise ValueError(f"close code {code} cannot be sent")
        if len(reason.encode()) > 123:
            raise ValueError("close reason longer than 123 bytes")
        self._closing = True
        await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        if self.close_cause != "slow_consumer":
            await self.flush()  # replies already queued go out before the close frame
        try:
            await self._ws.close(code, reason)
        except Exception:  # the transport is broken: make sure the socket goes away
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        self._ws.transport.abort()

    async def wait_closing(self) -> None:
        """Wait for a close started with :meth:`close_soon` (if any) to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def set_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """(Re)arm a named timer; replaces the previous one of that name."""
        if self._timers is None:
            self._timers = {}
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = self._loop.call_later(max(0.0, delay), callback)

    def cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None) if self._timers else None
        if handle is not None:
            handle.cancel()

    def cancel_timers(self) -> None:
        if self._timers:
            for handle in self._timers.values():
                handle.cancel()
            self._timers = None

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code
