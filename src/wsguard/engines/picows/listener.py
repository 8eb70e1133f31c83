"""Every frame of one admitted picows connection, through its Session."""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import time
from collections.abc import Awaitable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
)

from wsguard.core.decisions import (
    CLOSE_TOO_BIG,
    Admit,
)
from wsguard.session import DIRECT_WRITE_LIMIT, ENGINE_REASONS, Session, awaited, first_close

if TYPE_CHECKING:
    from wsguard.engines.picows.server import PicowsServer

    pass

from wsguard.engines.picows.socket_views import (
    BoundedReads,
    Discard,
    FragmentWatch,
    over_allowance,
)
from wsguard.engines.picows.wire import CLOSE_OP, as_close_code, server_frame

logger = logging.getLogger("wsguard.server")

_TEXT, _BINARY, _CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_PING, _PONG, _CLOSE = WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE
_BACKLOG_LIMIT = 16  # messages queued behind a handler that waits, before reads pause
_CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's close frame
_NO_HEADERS: CIMultiDict[str] = CIMultiDict()
_BATCH_FRAME_BYTES = 1024  # a bigger frame is written at once, not batched (see write)
_BATCH_FRAMES = 256  # frames batched per read at most (~200 replies fit one 8 KiB read)
_PING_HEAD = 0x8908 << 64  # a server ping's first two bytes: FIN + PING, 8 bytes of payload
# The close codes a client may send besides 3000-4999 (RFC 6455 7.4.1, IANA registry):
# never 1004, 1005, 1006, 1015 or anything else under 3000, nor above 4999.
_RECEIVABLE_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013, 1014))  # fmt: skip
# The reasons of the close frames picows sends on its own (protocol errors it finds):
# short and fixed, never the client's input (its own messages quote it).
_ENGINE_REASONS = {code: reason.encode() for code, reason in ENGINE_REASONS.items()}
_ENGINE_REASONS[1011] = b"internal error"


def _receivable(payload: bytes) -> bool:
    """A client's close frame (its first two bytes) that is answered with its own code:
    no code, or one a client may send."""
    if not payload:
        return True
    code = int.from_bytes(payload, "big")
    return code in _RECEIVABLE_CLOSE or 3000 <= code <= 4999


class GuardListener(WSListener):
    """Every frame of one admitted connection, through its Session; also the Session's
    :class:`~wsguard.session.Transport` (no other object per connection)."""

    __slots__ = (
        "_backlog", "_busy", "_close_refused", "_closed", "_draining", "_engine_close",
        "_fragments", "_fragments_size", "_fragments_utf8", "_held", "_ours_first", "_out",
        "_paused", "_ping_due",
        "_ping_payload", "_pong_deadline", "_writable", "admission", "close_sent", "conn",
        "host", "metrics", "raw", "request", "server", "tail", "transport",
    )  # fmt: skip

    def __init__(
        self, server: PicowsServer, admission: Admit, request: Any, raw: asyncio.Transport
    ) -> None:
        self.server = server
        self.raw = raw  # the socket's transport (picows gets a PicowsView of it)
        self.host = server.host
        self.metrics = server.metrics
        self.admission: Admit | None = admission  # until the Session takes it
        self.request = request
        self.transport: WSTransport | None = None
        self.conn: Session | None = None
        self.close_sent = False  # a close frame was written (ours, or picows' own)
        self._closed: asyncio.Future[None] | None = None  # the peer's close frame (or EOF)
        self._close_refused = False  # the client's close frame was invalid (answered 1002)
        # the client's close frame (its code) while the messages before it are handled
        self._held: tuple[bytes, asyncio.TimerHandle, Discard] | None = None
        self._ours_first = False  # our own close frame went out, not an answer to theirs
        self._engine_close: bytes | None = None  # picows' own close frame, not written yet
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        # a fragmented text message's UTF-8 so far: invalid is failed at the fragment that
        # shows it (RFC 6455 8.1), not at the message's end (None: binary, or none)
        self._fragments_utf8: codecs.IncrementalDecoder | None = None
        self._backlog: collections.deque[str | bytes] | None = None
        self._busy: asyncio.Task[None] | None = None
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._out: list[bytes] | None = None  # frames to write when the read batch ends
        self._draining: asyncio.TimerHandle | None = None  # the drop timer while draining
        self._ping_payload: bytes | None = None  # the heartbeat ping awaiting its pong
        self._ping_due = 0.0
        self._pong_deadline = 0.0
        # bytes picows holds after the last frame delivered, while a fragmented message
        # is reassembled (see FragmentWatch; set for every frame then, in _frame and _pong)
        self.tail = 0

    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps its parsed request and our response for the connection's life:
        # drop what they hold (the bearer token, cookies; ~1.6 KB) now that it is used
        request = transport.request
        request.headers = _NO_HEADERS
        request.method = request.path = request.version = b""
        transport.response.headers = _NO_HEADERS
        host, admission = self.host, self.admission
        assert admission is not None
        self.admission = None
        conn = Session(self, host, admission, loop=self.server.loop)
        parsed, self.request = self.request, None
        _, target, headers = parsed
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
        kind = frame.msg_type
        if self._held is not None:
            return  # after the client's close frame: discarded (RFC 6455 1.4)
        if (self.close_sent or transport.is_close_frame_sent) and (
            self._draining or kind is not _CLOSE
        ):
            # closing (picows' own close on a protocol error included): only the client's
            # close frame still matters, when frames are still parsed (TLS), or when picows
            # found an error in what followed it (see engine_close)
            return
        if kind is _PONG:
            # most often the answer to our heartbeat: nothing to write back, so no batch
            # of its own (one that frames before it began still leaves with the read)
            self._pong(frame)
            if frame.last_in_buffer and self._out is not None:
                self.flush()
            return
        if self._out is None:
            self._out = []
        try:
            conn = self.conn
            if (
                kind is _TEXT
                and frame.fin
                and self._fragments is None
                and self._busy is None
                and conn is not None
                and not conn.closing
                and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
            ):
                # the common case: a whole text message, nothing before it waiting, no
                # fragment pending, straight to _message (what _frame checks, at once)
                size = frame.payload_size
                self.metrics.bytes_in += size + (6 if size < 126 else 8 if size < 65536 else 14)
                try:
                    data = frame.get_payload_as_utf8_text()
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8", "invalid_utf8")
                    return
                self._message(conn, data)
            else:
                self._frame(transport, frame)
        finally:
            if frame.last_in_buffer:
                self.flush()

    @property
    def holding_close(self) -> bool:
        """The client's close frame waits for the messages before it (see _hold_close)."""
        return self._held is not None

    @property
    def batching(self) -> bool:
        """Writes are being collected, to leave in one send() (see :meth:`flush`)."""
        return self._out is not None

    def start_batch(self) -> None:
        if self._out is None:
            self._out = []

    def heartbeat(
        self, now: float, interval: float, timeout: float, ping_ids: Iterator[int]
    ) -> float | None:
        """Ping when due; fail (1011) when the pong of the last ping is overdue. Returns
        when to look again (None: never, the connection is closing or closed)."""
        transport = self.transport
        if transport is None or self.close_sent or self.conn is None:
            return None
        if self._ping_payload is not None:
            if now >= self._pong_deadline:
                self._fail(1011, "keepalive ping timeout", "ping_timeout")
                return None
            # the next ping waits for the pong: at its due time, then every tick after
            due = self._ping_due
            return min(due, self._pong_deadline) if now < due else now
        if now < self._ping_due:
            return self._ping_due
        raw = self.raw
        if transport.is_close_frame_sent or raw.is_closing():
            return None  # closing (picows' own close frame on its way), or gone
        # the frame built at once (FIN + PING, 8 bytes of payload) and written to the
        # socket's transport: one send(), none of picows' Python-visible layers (a ping
        # changes nothing picows keeps: its close state is the close frames')
        frame = (_PING_HEAD | next(ping_ids)).to_bytes(10, "big")
        self._ping_payload = frame[2:]
        self._pong_deadline = deadline = now + timeout
        # pings every interval on average: the next is due one interval after this one
        # was due (the wheel's tick makes each a little late), unless this one was late
        due = self._ping_due + interval
        if due < now + interval / 2:
            due = now + interval
        self._ping_due = due
        out = self._out
        if out is None:
            raw.write(frame)
        else:  # never from the sweep's timer, but a batch keeps its order
            out.append(frame)
        return due if due < deadline else deadline

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
        self.tail = frame.tail_size
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
            payload = frame.get_payload_as_bytes()
            self._fragments = [payload]
            self._fragments_size = frame.payload_size
            self._fragments_utf8 = _utf8_decoder() if kind is _TEXT else None
            if self._check_fragments_size() and self._utf8_so_far(payload, final=False):
                self._watch_fragments()
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
            payload = frame.get_payload_as_bytes()
            fragments.append(payload)
            self._fragments_size += frame.payload_size
            if not self._check_fragments_size():
                return
            if not self._utf8_so_far(payload, final=frame.fin) or not frame.fin:
                return
            raw = b"".join(fragments)
            self._fragments = None
            if self._fragments_utf8 is not None:
                self._fragments_utf8 = None
                try:
                    data = raw.decode()
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8", "invalid_utf8")
                    return
            else:
                data = raw
            self._message(conn, data)
        elif kind is _PING:
            conn.control_frame(frame.payload_size)
            if not self.close_sent:
                self.write_bytes(server_frame(0x8A, frame.get_payload_as_bytes()))
        elif kind is _PONG:  # (on_ws_frame takes them first)
            self._pong(frame)
        elif kind is _CLOSE:
            if self._client_close(frame.get_payload_as_bytes()[:2]):
                return
            if not self.drain():  # TLS: no half-close
                self.raw.close()

    def _client_close(self, payload: bytes) -> bool:
        """The client's close frame (*payload*: its first two bytes): answered now, or held
        while a handler works on the messages before it (True). Not answered when ours
        went first."""
        if not self.close_sent:
            if self._busy is not None and _receivable(payload):
                self._hold_close(payload)
                return True
            self._answer_close(payload)
        self._peer_closed()
        return False

    def _pong(self, frame: WSFrame) -> None:
        """A pong: the awaited answer to our ping ends the wait for it. Every pong is
        counted by the policy like a ping (a pong flood is a flood), the awaited one
        included."""
        conn = self.conn
        if conn is None:
            return
        size = frame.payload_size  # a control frame's: under 126 (picows refuses more)
        self.tail = frame.tail_size
        self.metrics.bytes_in += size + 6
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is ever negotiated here
            self._protocol_error("reserved bits set")
            return
        conn.control_frame(size)
        expected = self._ping_payload
        if expected is not None and size == 8 and frame.get_payload_as_bytes() == expected:
            self._ping_payload = None

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        held, self._held = self._held, None
        if held is not None:  # gone before the held close was answered
            held[1].cancel()
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
            server.loop.create_task(awaited(closed))
        # what picows keeps refers back here (its transport's view of the socket): let go
        # of it, so the connection's objects are freed now, not by a garbage collection
        # (the Session has its close result; its writes find the connection closed)
        self.transport = None
        drop = self._draining
        if drop is not None:
            drop.cancel()  # (the listener stays draining: nothing is parsed any more)

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
            if self._held is not None:
                self._release_close()
            elif self._paused and self.transport:
                self._paused = False
                self.raw.resume_reading()

    # fragments, errors, heartbeat, closing

    def _answer_close(self, payload: bytes) -> None:
        """The client closes first: echo its code (RFC 6455 5.5.1; no code, no code back,
        as websockets does), or answer 1002 to a code that must never be sent (picows
        has refused a 1-byte payload, codes under 3000 it does not know and a reason
        that is not UTF-8 already; not 0, 1006 or codes over 4999). A close of picows'
        own for what followed this frame is dropped: data after a close frame is
        discarded (RFC 6455 1.4). *payload*: the close frame's first two bytes."""
        if not _receivable(payload):
            self._close_refused = True
            if self._engine_close is not None:  # a protocol error too: it goes out now
                self.write_engine_close()
            else:
                # the reason picows gives the codes it refuses itself (999-2999)
                self._protocol_error("protocol error")
            return
        self._engine_close = None
        self.close_sent = True
        self.flush()
        self.raw.write(server_frame(CLOSE_OP, payload))

    def _hold_close(self, payload: bytes) -> None:
        """The client's close frame came while a handler still works on the messages
        before it: it is answered once they are handled, their replies written first (RFC
        6455 5.5.1: an endpoint "MAY delay sending a Close frame until its current
        message is sent"), at most ``_CLOSE_TIMEOUT`` later. What follows it is discarded
        unparsed; the client's end of the stream keeps our side open until then."""
        raw = self.raw
        reader = Discard(raw.get_protocol(), raw, half_open=raw.can_write_eof())
        raw.set_protocol(reader)
        timer = self.server.loop.call_later(_CLOSE_TIMEOUT, self._release_close)
        self._held = (payload, timer, reader)
        self._peer_closed()

    def _release_close(self) -> None:
        """Answer the held close frame (the handler is done, or the wait timed out); if
        the policy closed the connection meanwhile, ours was first."""
        held, self._held = self._held, None
        if held is None:
            return
        payload, timer, reader = held
        timer.cancel()
        reader.half_open = False
        if not self.close_sent and self.transport is not None:
            self._answer_close(payload)
        # half-closed and read on (see drain): a full close would meet the client's bytes;
        # closed when nothing more can arrive, or where TCP cannot be half-closed (TLS)
        if reader.ended or self._draining or not self.drain():
            self.raw.close()

    def engine_close(self, data: bytes) -> None:
        """picows closes on its own: a protocol error it found (a frame over the size
        limit, a bad opcode, a bad close frame...). Written once the frames parsed
        before the error are handled, at the end of this read: picows parses one
        frame ahead, so a client's close frame may still come (then answered instead).
        Never a second close frame."""
        if self.close_sent or self._engine_close is not None or self._held is not None:
            return  # (after a held close frame: an error in what followed it is discarded)
        code = int.from_bytes(data[2:4], "big") if len(data) >= 4 else 1002
        self._engine_close = server_frame(
            CLOSE_OP, code.to_bytes(2, "big") + _ENGINE_REASONS.get(code, b"")
        )
        self.server.loop.call_soon(self.write_engine_close)

    def write_engine_close(self) -> None:
        frame, self._engine_close = self._engine_close, None
        if frame is None or self.close_sent:
            return
        transport = self.transport
        handshake = transport.close_handshake if transport is not None else None
        if handshake is not None and handshake.recv is not None:
            # picows parsed the client's close frame (one frame ahead) and found the error
            # in what followed it, so never delivered the close: the close is answered,
            # what followed it discarded (RFC 6455 1.4), as the websockets engine does
            code = int(handshake.recv.code.value)  # 0: no status code
            self._client_close(code.to_bytes(2, "big") if code else b"")
            return
        self.close_sent = self._ours_first = True
        self.flush()
        if not self.raw.is_closing():
            self.raw.write(frame)

    def _watch_fragments(self) -> None:
        """A fragmented message begins: its continuation frames' headers are watched (see
        FragmentWatch) until it ends."""
        raw = self.raw
        inner = raw.get_protocol()
        if isinstance(inner, BoundedReads):  # (else watched already, or closing)
            watch = FragmentWatch(inner, self, raw, self.server.head_reads)
            raw.set_protocol(watch)
            self.server.loop.call_soon(watch.check_held)  # once this read is parsed

    def fragment_pending(self, head: bytes | None, pending: int) -> bool:
        """After a read while a fragmented message is reassembled: picows holds *pending*
        bytes of a frame it has not delivered (*head*: its first bytes, None when they
        were not seen). A continuation frame that takes the message over the size limit
        closes it now (1009), as websockets does from the header, not once its whole
        payload has arrived. False: nothing left to watch."""
        if self._fragments is None or self.close_sent or self._engine_close is not None:
            return False
        if self._held is not None or self.transport is None:
            return False
        allowance = self.server.max_message_bytes - self._fragments_size
        if over_allowance(head, pending, allowance):
            self._fragments = None
            self._fail(CLOSE_TOO_BIG, "message too big", "too_big")
            return False
        return True

    def _utf8_so_far(self, payload: bytes, *, final: bool) -> bool:
        """Whether a fragmented text message is UTF-8 so far (1007 at once when not)."""
        decoder = self._fragments_utf8
        if decoder is None:
            return True
        try:
            decoder.decode(payload, final)
        except UnicodeDecodeError:
            self._fragments = self._fragments_utf8 = None
            self._fail(1007, "invalid UTF-8", "invalid_utf8")
            return False
        return True

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
            self.close_sent = self._ours_first = True
            self.flush()
            transport.send_close(as_close_code(code), reason.encode())
        self.drain()

    def drain(self) -> bool:
        """Stop parsing and half-close (see _close_and_drain); False where TCP cannot be
        half-closed (TLS)."""
        raw = self.raw
        if self._draining:
            return True
        if raw.is_closing() or not raw.can_write_eof():
            return False
        if not isinstance(raw.get_protocol(), Discard):  # (a held close installed one)
            raw.set_protocol(Discard(raw.get_protocol(), raw))
        raw.write_eof()
        self._draining = self.server.loop.call_later(_CLOSE_TIMEOUT, self._drop)
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

    def write(self, data: str | bytes, text: bool = False) -> bool:
        """One data frame now, unless the connection is closing or the client is not
        keeping up (then the Session queues it)."""
        transport = self.transport
        if transport is None or self.close_sent or transport.is_disconnected:
            return False
        if self.raw.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False
        if isinstance(data, str):
            frame = server_frame(0x81, data.encode())
        else:
            frame = server_frame(0x81 if text else 0x82, data)
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
        # picows counts a close frame it parsed before ours was written as the first, even
        # when the policy closed on a message before it (parsed one frame ahead)
        return first_close(handshake.sent, rcvd, handshake.recv_then_sent and not self._ours_first)
