"""Engine adapter: the standalone server on ``picows`` (Cython framing, uvloop).

The same policy core as the websockets adapter, reached differently:

- **Handshake.** A small asyncio protocol reads and screens the request head
  (size, slowloris, malformed lines: real 4xx answers), builds the
  :class:`~wsguard.core.request.HandshakeRequest` from one parse and awaits
  the Guard, which may need the store. A refusal is written as a real HTTP
  response; an admitted socket is handed to a picows protocol, fed the head,
  and upgraded by picows (``101``, with the chosen subprotocol).
- **Frames.** picows calls :class:`GuardListener` for every frame. Control
  frames and continuation frames are counted by the policy (a ping flood, a
  fragment flood is a flood) and pings answered here; fragments are assembled
  with the message size and the number of fragments checked as each one arrives
  (``1009`` as soon as a limit is crossed; picows itself refuses a single
  frame over the limit from its header, before reading the payload). No
  extension is negotiated: a reserved bit is a protocol error (``1002``), and so
  is a close frame with a code that must never be sent.
- **Messages** go through :meth:`Session.receive` in the frame callback: refusals,
  closes and plain-function handlers need no task. A coroutine handler runs in
  the connection's task (made when needed, gone when idle); messages that arrive
  while it waits queue (at most 16, then the socket stops being read), in order.

What picows cannot do is refused at config validation (``engine``):
permessage-deflate and the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from wsguard.adapters.http_screen import (
    PendingHandshakes,
    check_head,
    http_response,
    raw_refusal,
    read_head,
)
from wsguard.adapters.tls import certificate_identity
from wsguard.core.decisions import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_BIG,
    Admit,
    Reject,
)
from wsguard.core.headers import Headers, is_token
from wsguard.core.request import HandshakeRequest
from wsguard.session import DIRECT_WRITE_LIMIT, Host, Session, first_close, release

if TYPE_CHECKING:
    import ssl

    from wsguard.guard import Guard

logger = logging.getLogger("wsguard.server")

_TEXT, _BINARY, _CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
_PING, _PONG, _CLOSE = WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE
_BACKLOG_LIMIT = 16  # messages queued behind a handler that waits, before reads pause
_CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's close frame
_DRAIN_BYTES = 64 * 1024  # read (and dropped) after our close frame, before reads stop
_READ_BUFFER = 2048  # picows' initial read buffer (it grows for bigger frames)
_READ_CHUNK = 8192  # bytes read per callback at most (fairness; see _BoundedReads)
_NO_HEADERS: CIMultiDict[str] = CIMultiDict()
_EARLY_DATA_LIMIT = 64 * 1024  # bytes a client may send before its 101 is written
_BATCH_FRAME_BYTES = 1024  # a bigger frame is written at once, not batched (see write)
_BATCH_FRAMES = 256  # frames batched per read at most (~200 replies fit one 8 KiB read)
_CLOSE_OP = 0x88  # the first byte of a close frame (FIN, opcode 8, no reserved bit)
# The close codes a client may send besides 3000-4999 (RFC 6455 7.4.1, IANA registry):
# never 1004, 1005, 1006, 1015 or anything else under 3000, nor above 4999.
_RECEIVABLE_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013, 1014))  # fmt: skip
# The reasons of the close frames picows sends on its own (protocol errors it finds):
# short and fixed, never the client's input (its own messages quote it).
_ENGINE_REASONS = {1002: b"protocol error", 1007: b"invalid UTF-8", 1009: b"message too big",
                   1011: b"internal error"}  # fmt: skip


# -- running wsguard's own steps without a task when they cannot wait --------------------


class _Resume:
    """Await a coroutine that :func:`run_inline` started and that waited after all."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation goes into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


async def _awaited(pending: Awaitable[None]) -> None:
    await pending


async def _resumed(resume: _Resume) -> None:
    await resume


def run_inline(coro: Coroutine[Any, Any, None]) -> None:
    """Run one of wsguard's own steps on the memory store (a handshake decision, a slot
    release) to its end, now.

    Only for code that does not wait (the memory store answers without I/O); should
    it wait after all, it continues in a task rather than being lost.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return
    except Exception:  # pragma: no cover - the steps handle their own errors
        logger.exception("handshake step failed")
        return
    asyncio.get_running_loop().create_task(_resumed(_Resume(coro, first)))


def _server_frame(first: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented server frame (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


# -- frames of one admitted connection --------------------------------------------------


class GuardListener(WSListener):
    """Every frame of one admitted connection, through its Session; also the Session's
    :class:`~wsguard.session.Transport` (no other object per connection)."""

    __slots__ = (
        "_backlog", "_busy", "_close_refused", "_closed", "_draining", "_engine_close",
        "_fragments", "_fragments_size", "_fragments_text", "_out", "_paused", "_ping_due",
        "_ping_payload", "_pong_deadline", "_writable", "admission", "close_sent", "conn",
        "host", "metrics", "raw", "request", "server", "transport",
    )  # fmt: skip

    def __init__(
        self, server: PicowsServer, admission: Admit, request: Any, raw: asyncio.Transport
    ) -> None:
        self.server = server
        self.raw = raw  # the socket's transport (picows gets a _PicowsView of it)
        self.host = server.host
        self.metrics = server.metrics
        self.admission: Admit | None = admission  # until the Session takes it
        self.request = request
        self.transport: WSTransport | None = None
        self.conn: Session | None = None
        self.close_sent = False  # a close frame was written (ours, or picows' own)
        self._closed: asyncio.Future[None] | None = None  # the peer's close frame (or EOF)
        self._close_refused = False  # the client's close frame was invalid (answered 1002)
        self._engine_close: bytes | None = None  # picows' own close frame, not written yet
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._fragments_text = False
        self._backlog: collections.deque[str | bytes] | None = None
        self._busy: asyncio.Task[None] | None = None
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._out: list[bytes] | None = None  # frames to write when the read batch ends
        self._draining = False
        self._ping_payload: bytes | None = None  # the heartbeat ping awaiting its pong
        self._ping_due = 0.0
        self._pong_deadline = 0.0

    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps its parsed request and our response for the connection's life:
        # drop their headers (the bearer token, cookies; ~1.5 KB) now that they are used
        transport.request.headers = _NO_HEADERS
        transport.response.headers = _NO_HEADERS
        host, admission = self.host, self.admission
        assert admission is not None
        self.admission = None
        conn = Session(self, host, admission, loop=self.server.loop)
        request, self.request = self.request, None
        _, target, headers = request
        conn.request = host.keep_request(target, headers)
        self.conn = conn
        self._ping_due = time.monotonic() + self.server.ping_interval
        opened = conn.open()
        if opened is not None:
            self._run(self._work(opened, None))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Frames parsed from one read arrive one after another; what the connection
        sends meanwhile is written once, after the last (one send() instead of one per
        reply: measured, it halves the server's CPU per ping/pong message)."""
        if (self.close_sent or transport.is_close_frame_sent) and (
            self._draining or frame.msg_type is not _CLOSE
        ):
            # closing (picows' own close on a protocol error included): only the client's
            # close frame still matters, when frames are still parsed (TLS), or when picows
            # found an error in what followed it (see engine_close)
            return
        if self._out is None:
            self._out = []
        try:
            self._frame(transport, frame)
        finally:
            if frame.last_in_buffer:
                self.flush()

    @property
    def batching(self) -> bool:
        """Writes are being collected, to leave in one send() (see :meth:`flush`)."""
        return self._out is not None

    def start_batch(self) -> None:
        if self._out is None:
            self._out = []

    def heartbeat(
        self, now: float, interval: float, timeout: float, ping_ids: Iterator[int]
    ) -> None:
        """Ping when due; fail (1011) when the pong of the last ping is overdue."""
        transport = self.transport
        if transport is None or self.close_sent or self.conn is None:
            return
        if self._ping_payload is not None:
            if now >= self._pong_deadline:
                self._fail(1011, "keepalive ping timeout", "ping_timeout")
        elif now >= self._ping_due:
            self._ping_payload = payload = next(ping_ids).to_bytes(8, "big")
            self._pong_deadline = now + timeout
            self._ping_due = now + interval
            transport.send_ping(payload)

    def write_bytes(self, frame: bytes) -> None:
        """Write *frame*, or add it to the current read batch's replies."""
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            self.raw.write(frame)

    def flush(self) -> None:
        """Write the replies of the current read batch, in one piece."""
        out, self._out = self._out, None
        if out and not self.raw.is_closing():
            self.raw.write(out[0] if len(out) == 1 else b"".join(out))

    def _frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        conn = self.conn
        if conn is None:
            return
        size = frame.payload_size
        self.metrics.bytes_in += size + (6 if size < 126 else 8 if size < 65536 else 14)
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is ever negotiated here
            if kind is _CLOSE:
                self._close_refused = True
            self._protocol_error("reserved bits set")
            return
        if kind is _TEXT or kind is _BINARY:
            if self._fragments is not None:
                self._protocol_error("expected a continuation frame")
                return
            if frame.fin:
                if kind is _TEXT:
                    try:
                        data: str | bytes = frame.get_payload_as_utf8_text()
                    except UnicodeDecodeError:
                        self._fail(1007, "invalid UTF-8", "invalid_utf8")
                        return
                else:
                    data = frame.get_payload_as_bytes()
                self._message(conn, data)
                return
            self._fragments = [frame.get_payload_as_bytes()]
            self._fragments_size = frame.payload_size
            self._fragments_text = kind is _TEXT
            self._check_fragments_size()
        elif kind is _CONT:
            fragments = self._fragments
            if fragments is None:
                self._protocol_error("unexpected continuation frame")
                return
            if len(fragments) >= self.server.max_fragments:
                self._fragments = None
                self._fail(CLOSE_TOO_BIG, "too many fragments", "too_big")
                return
            conn.fragment()  # charged to the message rate
            if conn.closing:
                return
            fragments.append(frame.get_payload_as_bytes())
            self._fragments_size += frame.payload_size
            if not self._check_fragments_size() or not frame.fin:
                return
            raw = b"".join(fragments)
            self._fragments = None
            if self._fragments_text:
                try:
                    data = raw.decode()
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8", "invalid_utf8")
                    return
            else:
                data = raw
            self._message(conn, data)
        elif kind is _PING or kind is _PONG:
            conn.control_frame(frame.payload_size)
            if kind is _PING:
                if not self.close_sent:
                    self.write_bytes(_server_frame(0x8A, frame.get_payload_as_bytes()))
            elif (
                self._ping_payload is not None
                and frame.get_payload_as_bytes() == self._ping_payload
            ):
                self._ping_payload = None
        elif kind is _CLOSE:
            if not self.close_sent:
                self._answer_close(frame)
            self.raw.close()
            self._peer_closed()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._peer_closed()
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        conn, self.conn = self.conn, None
        admission, self.admission = self.admission, None
        server = self.server
        server.release(admission)  # the upgrade failed: no Session took it
        if conn is None:
            return
        server.forget(self)
        closed = conn.end(server.release)
        if closed is not None:
            server.loop.create_task(_awaited(closed))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.server.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # messages, in order

    def _message(self, conn: Session, data: str | bytes) -> None:
        if conn.closing:
            return  # a close is under way: the rest is discarded, the close frame read
        if self._busy is not None:  # a handler is waiting: keep the order, bounded
            backlog = self._backlog
            if backlog is None:
                backlog = self._backlog = collections.deque()
            backlog.append(data)
            if len(backlog) >= _BACKLOG_LIMIT and not self._paused and self.transport:
                self._paused = True
                self.raw.pause_reading()
            return
        started = time.perf_counter()
        pending = conn.receive(data)
        if pending is None:
            self.metrics.latency(time.perf_counter() - started)
        else:
            self._run(self._work(pending, started))

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        """Run *work* (a coroutine handler, the connect hooks) in this connection's task;
        messages that arrive meanwhile wait in the backlog, in order."""
        self._busy = self.server.loop.create_task(work)

    async def _work(self, pending: Awaitable[None], started: float | None) -> None:
        latency = self.metrics.latency
        clock = time.perf_counter
        try:
            await pending
            if started is not None:  # None: the connect hooks, not a message
                latency(clock() - started)
            backlog = self._backlog
            while backlog:
                conn = self.conn
                if conn is None:
                    break
                data = backlog.popleft()
                if self._paused and len(backlog) < _BACKLOG_LIMIT // 2 and self.transport:
                    self._paused = False
                    self.raw.resume_reading()
                if conn.closing:
                    continue
                started = clock()
                step = conn.receive(data)
                if step is not None:
                    await step
                latency(clock() - started)
        except Exception:  # pragma: no cover - the Session and handlers never raise
            logger.exception("message processing failed")
        finally:
            self._busy = None
            if self._paused and self.transport:
                self._paused = False
                self.raw.resume_reading()

    # fragments, errors, heartbeat, closing

    def _answer_close(self, frame: WSFrame) -> None:
        """The client closes first: echo its code (RFC 6455 5.5.1; no code, no code back,
        as websockets does), or answer 1002 to a code that must never be sent (picows
        has refused a 1-byte payload, codes under 3000 it does not know and a reason
        that is not UTF-8 already; not 0, 1006 or codes over 4999). A close of picows'
        own for what followed this frame is dropped: data after a close frame is
        discarded (RFC 6455 1.4)."""
        payload = b""
        if frame.payload_size:
            payload = frame.get_payload_as_bytes()[:2]
            code = int.from_bytes(payload, "big")
            if not (code in _RECEIVABLE_CLOSE or 3000 <= code <= 4999):
                self._close_refused = True
                if self._engine_close is not None:  # a protocol error too: it goes out now
                    self.write_engine_close()
                else:
                    self._protocol_error("invalid close code")
                return
        self._engine_close = None
        self.close_sent = True
        self.flush()
        self.raw.write(_server_frame(_CLOSE_OP, payload))

    def engine_close(self, data: bytes) -> None:
        """picows closes on its own: a protocol error it found (a frame over the size
        limit, a bad opcode, a bad close frame...). Written once the frames parsed
        before the error are handled, at the end of this read: picows parses one
        frame ahead, so a client's close frame may still come (then answered instead).
        Never a second close frame."""
        if self.close_sent or self._engine_close is not None:
            return
        code = int.from_bytes(data[2:4], "big") if len(data) >= 4 else 1002
        self._engine_close = _server_frame(
            _CLOSE_OP, code.to_bytes(2, "big") + _ENGINE_REASONS.get(code, b"")
        )
        self.server.loop.call_soon(self.write_engine_close)

    def write_engine_close(self) -> None:
        frame, self._engine_close = self._engine_close, None
        if frame is None or self.close_sent:
            return
        self.close_sent = True
        self.flush()
        if not self.raw.is_closing():
            self.raw.write(frame)

    def _check_fragments_size(self) -> bool:
        if self._fragments_size > self.server.max_message_bytes:
            self._fragments = None
            self._fail(CLOSE_TOO_BIG, "message too big", "too_big")
            return False
        return True

    def _protocol_error(self, reason: str) -> None:
        self._fail(1002, reason, "protocol_error")

    def _fail(self, code: int, reason: str, cause: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, and nothing the client
        sends afterwards is parsed (see :meth:`_close_and_drain`)."""
        conn = self.conn
        if conn is not None:
            conn.fail(code, reason, cause)  # back here through close_now
        else:
            self._close_and_drain(code, reason)

    def _close_and_drain(self, code: int, reason: str) -> None:
        """Send the close frame; then, where TCP can be half-closed, stop parsing.

        What the client still sends is read and discarded unparsed (a flooding client
        costs one read per 64 KiB instead of a frame callback each), and our side of
        the connection is half-closed after the close frame, so a compliant client
        answers and closes at once; the socket is dropped after ``_CLOSE_TIMEOUT``
        at the latest. Reading on (rather than closing with unread data) keeps the
        kernel from answering with a reset that could discard the close frame.
        Over TLS (no half-close) frames are still parsed until the client's close.
        """
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if not self.close_sent:
            self.close_sent = True
            self.flush()
            transport.send_close(_close_code(code), reason.encode())
        self.drain()

    def drain(self) -> bool:
        """Stop parsing and half-close (see _close_and_drain); False where TCP cannot be
        half-closed (TLS)."""
        raw = self.raw
        if self._draining:
            return True
        if raw.is_closing() or not raw.can_write_eof():
            return False
        self._draining = True
        raw.set_protocol(_Discard(raw.get_protocol(), raw))
        raw.write_eof()
        self.server.loop.call_later(_CLOSE_TIMEOUT, self._drop)
        return True

    def _drop(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.raw.abort()

    async def writable(self) -> None:
        """Wait until the transport drains: it pauses writing above DIRECT_WRITE_LIMIT
        (its high-water mark, set at the upgrade) and picows passes that on here."""
        if self._writable is None:
            self._writable = self.server.loop.create_future()
        await self._writable

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait (bounded) for the connection to end."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        self._close_and_drain(code, reason)
        if self._closed is None:
            self._closed = self.server.loop.create_future()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self.raw.abort()
            return
        self.raw.close()

    def _peer_closed(self) -> None:
        closed = self._closed
        if closed is None:
            self._closed = closed = self.server.loop.create_future()
        if not closed.done():
            closed.set_result(None)

    # the Session's transport

    def write(self, data: str | bytes) -> bool:
        """One data frame now, unless the connection is closing or the client is not
        keeping up (then the Session queues it)."""
        transport = self.transport
        if transport is None or self.close_sent or transport.is_disconnected:
            return False
        if self.raw.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False
        if isinstance(data, str):
            frame = _server_frame(0x81, data.encode())
        else:
            frame = _server_frame(0x82, data)
        self.metrics.bytes_out += len(frame)
        out = self._out
        if out is not None and (len(frame) > _BATCH_FRAME_BYTES or len(out) >= _BATCH_FRAMES):
            # a big frame, or many: the read batch leaves now, so that the write buffer
            # checked above counts what a handler sends in one go (a slow consumer is
            # still found when a handler sends a lot without returning)
            out.append(frame)
            self.flush()
            self._out = []
        else:
            self.write_bytes(frame)
        return True

    async def send(self, data: str | bytes) -> bool:
        while True:
            transport = self.transport
            if transport is None or self.close_sent or transport.is_disconnected:
                return False
            if self.raw.get_write_buffer_size() <= DIRECT_WRITE_LIMIT:
                return self.write(data)
            await self.writable()

    def is_open(self) -> bool:
        transport = self.transport
        return transport is not None and not self.close_sent and not transport.is_disconnected

    def close_now(self, code: int, reason: str) -> bool:
        """The close frame leaves now, so the rest of the current read (a flood, often)
        is not even parsed."""
        self._close_and_drain(code, reason)
        return True

    def abort(self) -> None:
        self.raw.abort()

    def close_result(self) -> tuple[int, str, str]:
        """The close as the audit log reports it: the one sent by whoever closed first."""
        transport = self.transport
        handshake = transport.close_handshake if transport is not None else None
        if handshake is None:
            return 1006, "", "network"
        rcvd = None if self._close_refused else handshake.recv  # as if never received
        return first_close(handshake.sent, rcvd, handshake.recv_then_sent)


# -- the handshake, before picows --------------------------------------------------------


class HandshakeProtocol(asyncio.Protocol):
    """Reads, screens and decides one upgrade request, then hands the socket to picows."""

    __slots__ = (
        "_buffer", "_deciding", "_fd", "_peer", "_pending", "_timer", "server", "transport",
    )  # fmt: skip

    def __init__(self, server: PicowsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._deciding = False
        self._fd = -1
        self._peer = "unknown"
        self._pending = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        refusal = self.server.pending.enter(self._peer)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._pending = True
        self._timer = self.server.loop.call_later(
            self.server.guard.config.limits.handshake_timeout_seconds, self._timed_out
        )

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.metrics.bytes_in += len(data)
        buffer = self._buffer + data
        if self._deciding:  # frames sent before the 101: kept (bounded) for picows
            self._buffer = buffer
            if len(buffer) > _EARLY_DATA_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        limit = server.guard.config.limits.max_header_bytes
        end, refusal = check_head(buffer, limit, whole=False)
        if refusal is None and end >= 0:
            refusal, parsed = read_head(buffer[:end])
        if refusal is not None:
            self._refuse(refusal)
            return
        self._buffer = buffer
        if end < 0:
            return
        assert parsed is not None
        self._end_pending()
        self._deciding = True
        transport = self.transport
        assert transport is not None
        method, target, headers = parsed
        cert = None
        tls = transport.get_extra_info("sslcontext") is not None
        if tls:
            cert = certificate_identity(
                transport.get_extra_info("peercert"), server.guard.config.tls.identity_from
            )
        request = HandshakeRequest(
            peer=self._peer,
            target=target,
            headers=Headers(headers),
            tls=tls,
            method=method,
            client_cert=cert,
        )
        server.run(self._decide(request, parsed))

    async def _decide(self, request: HandshakeRequest, parsed: Any) -> None:
        server = self.server
        decision = await server.guard.admit(request)
        transport = self.transport
        if isinstance(decision, Reject):
            if transport is not None and not transport.is_closing():
                response = http_response(decision.status, decision.message, decision.headers)
                transport.write(response)
                transport.close()
            return
        if transport is None or transport.is_closing():
            server.release(decision)  # the client left while we were deciding
            return
        if not _subprotocols_parse(request.headers.get_all("sec-websocket-protocol")):
            # what websockets refuses after the policy admitted: the same fixed answer
            server.release(decision)
            transport.write(http_response(400, "Invalid WebSocket handshake."))
            transport.close()
            server.guard.record_raw_refusal(400, "bad_handshake", decision.client)
            return
        listener = GuardListener(server, decision, parsed, transport)
        response = WSUpgradeResponse.create_101_response(
            [("Sec-WebSocket-Protocol", decision.subprotocol)] if decision.subprotocol else None
        )
        picked = WSUpgradeResponseWithListener(response, listener)

        def factory(_: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
            return picked

        protocol = server.ws_protocol(factory)
        transport.set_write_buffer_limits(high=DIRECT_WRITE_LIMIT)  # see GuardListener.writable
        transport.set_protocol(protocol)
        listener.start_batch()  # picows' 101 and the welcome frame leave in one write
        protocol.connection_made(_PicowsView(transport, listener, self._fd))
        server.adopt(listener)
        head, self._buffer = self._buffer, b""
        self.transport = None
        _feed(protocol, head)
        listener.flush()
        if listener.transport is None:  # picows refused the upgrade (it answered 400)
            server.release(decision)
            transport.abort()
            server.guard.record_raw_refusal(400, "bad_handshake", decision.client)
            return
        if len(head) > _EARLY_DATA_LIMIT:
            transport.resume_reading()

    def _refuse(self, refusal: tuple[int, str, str]) -> None:
        self._end_pending()
        transport = self.transport
        if transport is not None:
            transport.write(raw_refusal(refusal))
            transport.close()
        self.server.guard.record_raw_refusal(refusal[0], refusal[1], self._peer)

    def _timed_out(self) -> None:
        self._timer = None
        if self._pending and self.transport is not None:
            self._end_pending()
            self.transport.abort()
            self.server.guard.record_raw_refusal(None, "handshake_timeout", self._peer)

    def _end_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._pending = False
            self.server.pending.leave(self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_pending()
        self.transport = None


def _close_code(code: int) -> WSCloseCode:
    """picows types close codes as its enum; it sends any valid int (4001, say) as is."""
    return code  # type: ignore[return-value]


class _BoundedReads(WSProtocol):  # type: ignore[misc]
    """picows' protocol, reading at most ``_READ_CHUNK`` bytes at a time.

    picows doubles its read buffer whenever a read fills it, and never shrinks it: a
    client streaming small frames faster than they are processed would grow it to the
    size of the kernel's socket buffer (megabytes per connection) and make the server
    process all of that in one callback, while every other connection waits. Bounded
    reads keep both small: the buffer only grows for a frame that does not fit yet
    (at most ``limits.max_message_bytes``), and one callback handles at most 8 KiB.
    """

    def get_buffer(self, size_hint: int) -> memoryview:
        buffer: memoryview = WSProtocol.get_buffer(self, size_hint)
        return buffer[:_READ_CHUNK] if len(buffer) > _READ_CHUNK else buffer


class _Discard(asyncio.Protocol):
    """What reads a connection after wsguard's close frame (see _close_and_drain):
    bytes are dropped unparsed; the end of the connection still reaches picows. A
    client that keeps sending past ``_DRAIN_BYTES`` is not read any more (it is
    flooding, not closing): the close timeout drops it."""

    __slots__ = ("_inner", "_left", "_transport")

    def __init__(self, inner: Any, transport: asyncio.Transport) -> None:
        self._inner = inner
        self._transport = transport
        self._left = _DRAIN_BYTES

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # the client closed its side too: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


class _Socket:
    """The socket as picows sees it: its descriptor (picows would write small frames with
    send() itself, see _PicowsView), and no-op options. uvloop and asyncio already set
    TCP_NODELAY; picows' other calls (TCP_QUICKACK and four getsockopt() for a log line
    nobody reads) cost system calls on every handshake."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def setsockopt(self, *args: Any) -> None:
        return None

    def getsockopt(self, *args: Any) -> int:
        return 0


class _PicowsView:
    """The transport as picows sees it. While the listener batches (``_out`` is a list),
    picows' writes join the batch: its 101 response and wsguard's welcome frame leave
    in one send(). A close frame picows sends on its own goes to the listener
    (:meth:`GuardListener.engine_close`). Everything else goes to the real transport.
    (picows writes through the transport only when it reports buffered data; otherwise
    it calls send() on the descriptor: the view always reports one byte.)"""

    __slots__ = ("_listener", "_raw", "_socket")

    def __init__(self, raw: asyncio.Transport, listener: GuardListener, fd: int) -> None:
        self._raw, self._listener, self._socket = raw, listener, _Socket(fd)

    def get_write_buffer_size(self) -> int:
        return 1

    def write(self, data: Any) -> None:
        listener = self._listener
        if len(data) > 1 and data[0] == _CLOSE_OP:  # picows writes a frame in one piece
            if not listener.close_sent:
                listener.engine_close(bytes(data))  # picows' own, on a protocol error
                return
            if self._raw.is_closing():
                return  # picows' answer to a frame after the client's close: never sent
        self._put(data)

    def _put(self, data: Any) -> None:
        listener = self._listener
        if listener.batching:
            listener.write_bytes(bytes(data))
        else:
            self._raw.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:  # a large data frame: header and payload
            self._put(chunk)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._socket
        if name in ("peername", "sockname"):
            return default  # picows only logs them
        return self._raw.get_extra_info(name, default)

    def close(self) -> None:
        """picows closes after a protocol error it found (a frame over the size limit,
        a bad opcode...) and its close frame: drain like wsguard's own closes do."""
        self._listener.write_engine_close()
        self._listener.flush()
        if not self._listener.drain():
            self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _subprotocols_parse(values: list[str]) -> bool:
    """Every Sec-WebSocket-Protocol value is a comma-separated list of tokens."""
    return all(
        is_token(item.strip()) for value in values for item in value.split(",") if item.strip()
    )


def _feed(protocol: Any, data: bytes) -> None:
    """Give bytes already read to a picows protocol, through its own buffer."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(-1)
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


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
        return _BoundedReads(None, None, False, factory, *self._protocol_args)

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
