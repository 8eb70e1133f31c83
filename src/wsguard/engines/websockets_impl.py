"""Engine adapter: the standalone server on the ``websockets`` asyncio implementation.

Thin by design: it turns a websockets request into a
:class:`~wsguard.core.request.HandshakeRequest`, asks the Guard, and turns the
decision back into an HTTP response or an open connection. Connection slots
are released in ``connection_lost``, the one callback every connection reaches
however it ends (clean close, error, timeout, refused or failed handshake).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, cast

from websockets.asyncio import messages as engine_messages
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers as WsHeaders
from websockets.exceptions import (
    ConnectionClosed,
    HeaderLineTooLong,
    ProtocolError,
    RequestLineTooLong,
    TooManyHeaders,
)
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsguard.core.decisions import CLOSE_TOO_BIG, Admit, Reject
from wsguard.core.headers import Headers
from wsguard.core.request import HandshakeRequest
from wsguard.engines import LISTEN_BACKLOG
from wsguard.engines.screening import (
    PendingHandshakes,
    check_head,
    early_response,
    raw_refusal,
    refuse,
)
from wsguard.engines.tls import certificate_identity, refused_resumption, start_tls, tls_ended
from wsguard.observability.engine_log import quiet_logger
from wsguard.observability.metrics import Metrics
from wsguard.session import (
    DIRECT_WRITE_LIMIT,
    ENGINE_REASONS,
    Host,
    Session,
    awaited,
    first_close,
    release,
)

if TYPE_CHECKING:
    import ssl

    from wsguard.guard import Guard

logger = logging.getLogger("wsguard.server")

# The instance attributes websockets' ServerConnection sets (websockets 14-17). As slots
# of our subclass they stay out of the instance dict, whose shared key table CPython
# 3.11 can give up for good when many connections are created at once: every later
# connection of the process then carries an unshared dict of about 1.6 KB (measured:
# RSS per idle connection swung by 1.3 KB between identical runs). Names that
# websockets defines on a class (a property, say) are left to it; close_deadline is a
# property of GuardedServerConnection (see there).
_ENGINE_NAMES = (
    "protocol", "ping_interval", "ping_timeout", "close_timeout", "max_queue_high",
    "max_queue_low", "write_limit_high", "write_limit_low", "id", "logger", "debug",
    "request", "response", "loop", "send_in_progress",
    "pending_pings", "latency", "keepalive_task", "connection_exc",
    "connection_lost_waiter", "paused", "drain_waiters", "server", "request_rcvd",
    "recv_messages", "transport",
)  # fmt: skip
_ENGINE_ATTRIBUTES = tuple(
    name for name in _ENGINE_NAMES if not any(name in vars(cls) for cls in ServerConnection.__mro__)
)

# What an admitted connection keeps as its request: after the handshake websockets only
# checks that there is one. The real request (headers, the bearer token) is dropped.
_ADMITTED = Request("/", WsHeaders())
_CONTROL_COUNTED = (Opcode.PING, Opcode.PONG)
_CONT, _TEXT, _BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_DATA = (_CONT, _TEXT, _BINARY)
# Bytes of a read handed to websockets' parser at a time (see GuardedServerConnection._feed):
# a slice of tiny invalid frames is ~80 frame parses before the queue check, not ~160 as
# with 4 KiB. Measured (bench_engines.py --quick --servers wsguard): users' p99 under the
# flood 73/45 ms with 4 KiB, 31/36 with 2 KiB, 25/19 with 1 KiB; one-way 74k, 73k and
# 65k msg/s (smaller slices pause and resume a streaming client's reads more often).
_FEED_SLICE = 2048
_FEED_MAX = 16384  # the slice while a frame bigger than _FEED_SLICE arrives (see _feed)
# bytes read (and dropped) after the close frame, before reads stop (as the picows engine)
_DRAIN_BYTES = 64 * 1024
_EARLY_DATA_LIMIT = 64 * 1024  # bytes a client may send before its 101 (as the picows engine)


# websockets' protocol errors (its parser's messages) named as the picows engine names
# them; any other protocol error is "protocol error", as picows' own are
_PROTOCOL_ERRORS = (
    ("reserved bits must be 0", "reserved bits set"),
    ("unexpected continuation frame", "unexpected continuation frame"),
    ("expected a continuation frame", "expected a continuation frame"),
)


class GuardedServerProtocol(ServerProtocol):
    """websockets' sans-I/O protocol, with a ping counted by the policy as it is parsed,
    before websockets answers it (a read of hundreds of pings gets the rates' worth of
    pongs, then the policy's close), and two changes to its handling of the client's
    close frame:

    * a close frame that interrupts a fragmented message closes cleanly (RFC 6455 allows
      control frames between fragments; websockets fails the connection with 1002
      instead: Autobahn case 7.1.5). The incomplete message is discarded, never
      delivered;
    * a close frame that follows messages the handler has not handled yet is held (see
      :meth:`GuardedServerConnection.close_waits`): websockets would answer it while
      parsing the read, before the handler has seen the messages that came before it,
      and their replies would be dropped (the connection no longer open). It is
      answered once they are handled, as the picows engine answers (RFC 6455 5.5.1: an
      endpoint "MAY delay sending a Close frame until its current message is sent").
      What follows the close frame is discarded unparsed meanwhile (RFC 6455 1.4)."""

    # its connection, set by GuardedServerConnection (websockets' protocol has an instance
    # dict: one key more, 27 of the 30 a CPython 3.11 shared-key dict holds)
    connection: GuardedServerConnection | None = None

    def recv_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode in _CONTROL_COUNTED:
            # counted as parsed, before websockets answers a ping: a read of hundreds of
            # pings gets the rates' worth of pongs, then the policy's close (as on picows)
            connection = self.connection
            if connection is not None:
                session = connection.guarded
                if session is not None:
                    session.control_frame(len(frame.data))
                    if session.closing:
                        return  # nothing is answered once closing (the flood's last ping)
            super().recv_frame(frame)
            return
        if opcode is Opcode.CLOSE:
            if self.current_size is not None:
                self.current_size = None  # the incomplete message is dropped, never delivered
            if self.state is State.OPEN:
                connection = self.connection
                if (
                    connection is not None
                    and connection.close_waits(self.events)
                    and _valid_close(frame)
                ):
                    connection.hold_close(frame)
                    # parsing stops here: what follows is discarded, never delivered
                    self.parser = self._discard_after_held_close(connection)
                    next(self.parser)
                    return
        super().recv_frame(frame)

    def _discard_after_held_close(self, connection: GuardedServerConnection) -> Generator[None]:
        """The parser while the client's close frame is held: what follows it is read and
        dropped unparsed, counted as what a closing client sends (see
        GuardedServerConnection._feed). At the end of the stream (websockets' discard()
        would mark the connection closed), the close is answered first."""
        reader = self.reader
        while not (yield from reader.at_eof()):
            connection.drained(len(reader.buffer))
            reader.discard()
        connection.release_close()  # discard() replaces this parser: the stream ends there
        yield
        raise AssertionError("stepped after the end of the stream")  # pragma: no cover

    def answer_held_close(self, frame: Frame) -> None:
        """The held close frame is processed now, as websockets processes one it parses:
        answered, the stream half-closed, the rest discarded. If our own close went out
        meanwhile (the policy's, websockets' keepalive), it is a close received after
        ours: recorded, not answered."""
        if self.eof_sent:
            self.close_rcvd = Close.parse(frame.data)
            self.close_rcvd_then_sent = False
        else:
            ServerProtocol.recv_frame(self, frame)

    def fail(self, code: int, reason: str = "") -> None:
        """websockets' parser fails a connection with a reason that may quote the
        client's frame ("invalid start byte at position 0", the announced length...): the
        close frame carries the reason the picows engine gives for the same fault, short
        and fixed. wsguard's own closes call :meth:`fail_as_is` with their own reason."""
        if code == 1002:
            for prefix, fixed in _PROTOCOL_ERRORS:
                if reason.startswith(prefix):
                    reason = fixed
                    break
            else:
                reason = ENGINE_REASONS[1002]
        else:
            reason = ENGINE_REASONS.get(code, reason)
        self.fail_as_is(code, reason)

    def fail_as_is(self, code: int, reason: str) -> None:
        """websockets' fail() with *reason* as it is; a client's close frame still held
        is then a close received after ours (see :meth:`answer_held_close`)."""
        super().fail(code, reason)
        connection = self.connection
        if connection is not None and connection.held_close is not None:
            connection.release_close()


def _valid_close(frame: Frame) -> bool:
    """A close frame websockets accepts. One it refuses (a code that must never be sent,
    a reason that is not UTF-8) is not held: it fails the connection at once (1002, 1007),
    the replies to the messages parsed with it dropped, as on the picows engine."""
    try:
        Close.parse(frame.data)
    except (ProtocolError, UnicodeDecodeError):
        return False
    return True


class GuardedServerConnection(ServerConnection):
    """A websockets connection that carries its admission and counts control frames and
    the fragments of a message."""

    # Slots keep wsguard's per-connection attributes out of the instance dict: past
    # ~30 keys CPython switches the dict to a larger, unshared layout (about 1.6 KB).
    __slots__ = (
        "_backlog",
        "_close_at",
        "_close_timer",
        "_deadline",
        "_drained",
        "_early",
        "_eof_held",
        "_fragments",
        "_head",
        "_held_timer",
        "_opened_at",
        "_peer_address",
        "_pending",
        "_screened",
        "_utf8",
        "admission",
        "decided",
        "end_hook",
        "guarded",
        "held_close",
        *_ENGINE_ATTRIBUTES,
    )
    guard: Guard  # set on the per-server subclass made by start_server()
    protocol: GuardedServerProtocol

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        protocol.__class__ = GuardedServerProtocol  # same layout, a few methods differ
        cast(GuardedServerProtocol, protocol).connection = self
        self._close_timer: asyncio.TimerHandle | None = None  # see close_deadline
        super().__init__(protocol, *args, **kwargs)
        self.admission: Admit | None = None
        self.guarded: Session | None = None
        self.end_hook: asyncio.Task[None] | None = None  # the host's closed hook, running
        self.decided = False  # the policy answered this handshake (and audited a refusal)
        self._head = b""
        self._screened = False
        self._opened_at = 0.0
        self._peer_address = "unknown"
        self._pending = False
        self._fragments = 0  # frames of the message being received so far (0: none)
        # a fragmented text message's UTF-8 so far: invalid is failed at the fragment that
        # shows it (RFC 6455 8.1), not when the message is read whole (None: none)
        self._utf8: codecs.IncrementalDecoder | None = None
        self._backlog = b""  # what was read but not parsed yet (the handler is behind)
        self._drained = 0  # bytes read and dropped since the connection started closing
        # bytes after the request head, held until the handshake is answered (None: not
        # holding): websockets would parse them as frames before its 101 is written
        self._early: bytes | None = None
        # the client's close frame, held until the messages before it are handled (see
        # GuardedServerProtocol), the timer that bounds the wait, and whether the client's
        # EOF came meanwhile (not given to websockets yet: see eof_received)
        self.held_close: Frame | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self._eof_held = False
        self._deadline: asyncio.TimerHandle | None = None  # see adopt_pending

    @property
    def close_deadline(self) -> float | None:
        """When (loop time) a closing connection is dropped, whoever set it.

        websockets sets it whenever the connection starts closing, but only a coroutine
        that sends (or closes) waits for it: when its own parser fails the connection
        inside ``data_received`` (an unmasked frame, a reserved bit, a bad close code,
        a frame over the size), nothing does, and the handler's ``async for`` ends only
        when the socket does. So a client that keeps TCP open and never answers the
        close frame kept its socket and its slots until the next heartbeat. Here the
        deadline drops the socket itself, as the picows engine's close timeout does."""
        return self._close_at

    @close_deadline.setter
    def close_deadline(self, deadline: float | None) -> None:
        self._close_at = deadline
        timer = self._close_timer
        if timer is not None:
            timer.cancel()
            self._close_timer = None
        if deadline is not None:
            self._close_timer = self.loop.call_at(deadline, self._close_deadline_passed)

    def _close_deadline_passed(self) -> None:
        self._close_timer = None
        if not self.connection_lost_waiter.done():
            self.set_connection_exc(TimeoutError("timed out while closing connection"))
            self.transport.abort()

    pending: PendingHandshakes  # shared by the connections of one server
    tls: ssl.SSLContext | None = None  # the listener's TLS context (RefusedAddressFront)
    metrics: Metrics  # the node's counters (bytes in and out)
    max_fragments: int  # limits.max_fragments

    def send_data(self) -> None:
        protocol = self.protocol
        writes = protocol.writes
        for data in writes:  # what super().send_data() is about to write
            self.metrics.bytes_out += len(data)
        if protocol.state is State.CONNECTING and writes and writes[0]:
            # websockets refuses the handshake (the policy's answer, its own 400...): the
            # answer, then the socket read on and dropped until the client closes,
            # bounded, rather than websockets' half-close with the rest held unread
            refuse(self.transport, b"".join(protocol.data_to_send()), self.pending, self)
            return
        super().send_data()
        early = self._early
        if early is not None and self.protocol.state is State.OPEN:
            # the 101 is written: what the client sent after its request is parsed now,
            # in a callback of its own, before any later read (the backlog keeps order)
            self._early = None
            self._backlog = early
            self.loop.call_soon(self._feed_backlog)

    def adopt_pending(self, accepted: float, timeout: float) -> None:
        """Before ``connection_made``: the socket was accepted at *accepted* (monotonic)
        and counted as a pending handshake then (by RefusedAddressFront, which made its
        TLS handshake): the count is this connection's now, and the request head must be
        complete by *timeout* seconds after the accept, as on a plaintext socket."""
        self._pending = True
        self._opened_at = accepted
        delay = max(0.0, accepted + timeout - time.monotonic())
        self._deadline = asyncio.get_running_loop().call_later(delay, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._pending:
            self._end_pending()
            self.decided = True  # audited here, not again by connection_lost
            self.transport.abort()
            self.guard.record_raw_refusal(None, "handshake_timeout", self._peer_address)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        adopted = self._pending  # counted already (see adopt_pending)
        if not adopted:
            self._opened_at = time.monotonic()
        super().connection_made(transport)
        self.recv_messages.resume = self._resume_reading
        self._peer_address = _peer(self)  # kept: the TLS transport forgets it when torn down
        if adopted:
            return
        refusal = self.pending.enter(self._peer_address)
        if refusal is not None:
            self._refuse_raw(*refusal)
            return
        self._pending = True

    def _end_pending(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            deadline.cancel()
        if self._pending:
            self._pending = False
            self.pending.leave(self._peer_address)

    def data_received(self, data: bytes) -> None:
        self.metrics.bytes_in += len(data)
        if self._screened:
            if self._early is not None:  # the handshake is not answered yet
                self._hold(data)
                return
            self._feed(data)
            return
        if not self._head:
            early = self.guard.early_refusal(self._peer_address)
            if early is not None:  # its address is refused still: nothing parsed
                self._screened = True
                self._end_pending()
                self.decided = True
                refuse(self.transport, early_response(early), self.pending, self)
                return
        head = self._head + data
        end, refusal = check_head(head, self.guard.config.limits.max_header_bytes)
        if refusal is not None:
            self._screened, self._head = end >= 0, b""
            self._end_pending()
            self._refuse_raw(*refusal)
            return
        if end < 0:
            self._head = head
            return
        self._screened, self._head = True, b""
        self._end_pending()
        cut = end + 4
        self._early = b""
        self._hold(head[cut:])
        super().data_received(head[:cut])

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the handshake is answered (bounded: reads pause
        beyond _EARLY_DATA_LIMIT; the handshake timeout ends a client that waits)."""
        held = self._early = (self._early or b"") + data
        if len(held) > _EARLY_DATA_LIMIT:
            self.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        """Parse a read no further than the handler is ready for.

        websockets parses a whole read (up to 256 KiB) before its handler sees the first
        message, and pauses reading only afterwards, once its queue of messages is full.
        A client flooding tiny frames (a flood of invalid messages) would have thousands
        parsed, at a Python frame parse each, before the policy's close. Fed in slices,
        parsing stops once the queue is full: the rest waits, unparsed, until the handler
        has caught up (and is discarded unparsed if the handler closed meanwhile)."""
        if self._backlog:  # a read arrived before the pause took effect: keep the order
            self._backlog += data
            return
        state = self.protocol.state
        if state is State.CLOSING or state is State.CLOSED:
            # closing: websockets discards it unparsed; a client that keeps sending past
            # _DRAIN_BYTES is flooding, not closing: it is not read any more (each read
            # costs a system call and a callback), the close timeout drops it
            self._drained += len(data)
            if self._drained > _DRAIN_BYTES:
                self.transport.pause_reading()
            super().data_received(data)
            return
        if len(data) <= _FEED_SLICE or state is not State.OPEN:
            super().data_received(data)
            return
        messages, waiting = self.recv_messages, self.protocol.reader.buffer
        start, size = 0, len(data)
        step = _FEED_SLICE if len(waiting) < _FEED_SLICE else _FEED_MAX
        while start < size:
            if messages.paused:
                self._backlog = data[start:]
                return
            end = start + step
            super().data_received(data[start:end])
            start = end
            # bytes left unparsed in websockets' reader: a frame bigger than the slice is
            # arriving (nothing in it to parse ahead of the queue check), so larger slices
            # until it ends (a 60 KB message: 6 slices, not 30); tiny frames: 2 KiB each
            step = _FEED_SLICE if len(waiting) < _FEED_SLICE else min(2 * step, _FEED_MAX)

    def _resume_reading(self) -> None:
        """The handler caught up (websockets' queue below its low mark): parse what was
        held back, in a callback of its own (not inside the handler's read), then read."""
        self.loop.call_soon(self._feed_backlog)

    def _feed_backlog(self) -> None:
        if self.transport.is_closing():
            self._backlog = b""
            return
        backlog, self._backlog = self._backlog, b""
        if backlog:
            self._feed(backlog)
        if not self.recv_messages.paused and self._drained <= _DRAIN_BYTES and not self._eof_held:
            self.transport.resume_reading()

    def _refuse_raw(self, status: int, reason: str, message: str) -> None:
        self.decided = True
        refuse(self.transport, raw_refusal((status, reason, message)), self.pending, self)
        self.guard.record_raw_refusal(status, reason, self._peer_address)

    def process_event(self, event: Any) -> None:
        """Count every frame before websockets' assembler sees it: continuation frames
        are charged to the rates (control frames as they are parsed, see
        GuardedServerProtocol.recv_frame), and a message in more than
        ``limits.max_fragments`` frames is refused (1009) at the frame that crosses it."""
        if isinstance(event, Frame):
            opcode = event.opcode
            if opcode is _CONT:
                self._fragments += 1
                if self._fragments > self.max_fragments:
                    self._fail_now(CLOSE_TOO_BIG, "too many fragments")
                    return
                self._charge_fragment()
                if self._utf8 is not None and not self._utf8_so_far(event.data, event.fin):
                    return
            elif opcode is _TEXT or opcode is _BINARY:
                if self._fragments > self.max_fragments:
                    return  # refused: nothing reaches the assembler any more
                self._fragments = 0 if event.fin else 1
                self._utf8 = _utf8_decoder() if opcode is _TEXT and not event.fin else None
                if self._utf8 is not None and not self._utf8_so_far(event.data, False):
                    return
        super().process_event(event)

    def _utf8_so_far(self, data: bytes | bytearray | memoryview, final: bool) -> bool:
        """Whether a fragmented text message is UTF-8 so far (1007 at once when not)."""
        decoder = self._utf8
        assert decoder is not None
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError:
            self._utf8 = None
            self._fragments = self.max_fragments + 1  # nothing more reaches the assembler
            self._fail_now(1007, "invalid UTF-8")
            return False
        if final:
            self._utf8 = None
        return True

    def _charge_fragment(self) -> None:
        session = self.guarded
        if session is not None:
            session.fragment()

    def _fail_now(self, code: int, reason: str) -> None:
        """Fail the connection like websockets fails a message over ``max_size``: the
        close frame now, nothing parsed after it (the frames of the current read that
        follow are dropped here, the fragments so far with the connection)."""
        protocol = self.protocol
        if protocol.close_sent is None:
            protocol.fail_as_is(code, reason)
            self.send_data()
            if self.close_deadline is None and self.close_timeout is not None:
                self.close_deadline = self.loop.time() + self.close_timeout

    # the client's close frame after messages not handled yet

    def close_waits(self, events: list[Any]) -> bool:
        """Whether the client's close frame, just parsed, waits for messages that came
        before it: frames parsed from this read (*events*, not given to the connection
        yet), frames the handler has not taken yet, or the message it is handling (it is
        not waiting for the next one). Not while a close of the policy is under way: what
        came before is discarded then."""
        session = self.guarded
        if session is not None and session.closing:
            return False
        messages = self.recv_messages
        if _whole_message_queued(messages):
            return True
        # a message's last frame parsed from this read (not the first frames of one the
        # close frame cuts short: that one is never delivered)
        for event in events:
            if isinstance(event, Frame) and event.opcode in _DATA and event.fin:
                return True
        return session is not None and not messages.get_in_progress

    def hold_close(self, frame: Frame) -> None:
        """Hold the client's close frame (see close_waits), at most ``close_timeout``: a
        handler that does not finish does not keep the connection from closing."""
        self.held_close = frame
        if self.close_timeout is not None:
            self._held_timer = self.loop.call_later(self.close_timeout, self.release_close)

    def drained(self, size: int) -> None:
        """*size* bytes that followed the client's held close frame were dropped: past
        _DRAIN_BYTES the client is flooding, not closing, and is not read any more."""
        self._drained += size
        if self._drained > _DRAIN_BYTES:
            self.transport.pause_reading()

    def release_close(self) -> None:
        """Answer the client's held close frame now (what data_received does after
        websockets parsed one): the messages before it were handled, the connection ends
        otherwise (EOF, lost, our own close), or the wait timed out."""
        frame, self.held_close = self.held_close, None
        if frame is None:
            return
        timer, self._held_timer = self._held_timer, None
        if timer is not None:
            timer.cancel()
        protocol = self.protocol
        protocol.answer_held_close(frame)
        events = protocol.events_received()
        try:
            self.send_data()
        except Exception as exc:
            self.set_connection_exc(exc)
        if (
            protocol.close_expected()
            and self.close_deadline is None
            and self.close_timeout is not None
        ):
            self.close_deadline = self.loop.time() + self.close_timeout
        for event in events:
            self.process_event(event)
        if self._eof_held:
            # the client's EOF came while the close was held: websockets sees it now
            self._eof_held = False
            super().eof_received()
            self.transport.close()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client ended its side of the stream. While its close frame is held, on TCP
        (which can be half-closed), the connection stays open for what the handler still
        answers to the messages before it; websockets sees the EOF once the close is
        answered (release_close). Otherwise (TLS cannot write after the peer's EOF) the
        held close is answered now, what the handler answers later is dropped."""
        if self._eof_held:
            return True  # read again after the EOF (reads resumed): the same EOF
        if (
            self.held_close is not None
            and self.protocol.state is State.OPEN
            and self.transport.can_write_eof()
        ):
            self._eof_held = True
            return True
        super().eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_pending()
        timer, self._close_timer = self._close_timer, None
        if timer is not None:
            timer.cancel()
        self._backlog = b""
        self._early = None
        self._eof_held = False  # the held close, if any, is answered by websockets' EOF
        super().connection_lost(exc)
        self.protocol.connection = None  # a reference cycle less
        release_admission(self)
        session = self.guarded
        if session is not None:
            # the connection's end is the Session's, now, even when its handler is still
            # busy with a message (one that never finishes must not keep the slots, the
            # count of connections and the audit line waiting): run_guarded sees it ended
            self.guarded = None
            closed = session.end()
            if closed is not None:  # the host's hook: awaited by run_guarded too, if it can
                self.end_hook = self.loop.create_task(awaited(closed))
        if not self.decided:
            self._audit_engine_refusal()

    def _audit_engine_refusal(self) -> None:
        """Audit handshakes that ended before the policy saw them (engine limits, timeouts)."""
        failure = self.protocol.handshake_exc
        if failure is not None and isinstance(failure.__cause__ or failure, EOFError):
            failure = None  # the stream ended before a complete request: not malformed
        status: int | None = None
        timed_out = time.monotonic() - self._opened_at >= (
            self.guard.config.limits.handshake_timeout_seconds
        )
        if self.request is None and timed_out and failure is None:
            reason = "handshake_timeout"
        elif isinstance(failure, RequestLineTooLong):
            status, reason = 414, "request_line_too_long"
        elif isinstance(failure, (HeaderLineTooLong, TooManyHeaders)):
            status, reason = 431, "headers_too_large"
        elif failure is not None:
            status, reason = 400, "bad_request"
        else:
            return  # the client went away before sending a request: not a refusal
        self.guard.record_raw_refusal(status, reason, self._peer_address)


class RefusedAddressFront(asyncio.Protocol):
    """What accepts each socket first. A socket from an address that is still refused
    (:meth:`~wsguard.guard.Guard.early_refusal`) is answered here: ``429`` at its first
    bytes, then closed, without websockets' connection being built for it (its sans-I/O
    protocol, its futures, its handler task, and the exceptions its parser raises when
    the stream ends: ~45 objects of cyclic garbage per attempt, measured, which under a
    flood of reconnecting clients made the garbage collector's pauses the users' p99).
    Every other socket is handed to websockets at once, before it has sent anything.

    Over TLS it also makes the TLS handshake: the socket is a pending handshake from its
    accept (counted per address and in total, under the one handshake timeout), TLS is
    started here, and ``connection_made`` is called again with the TLS transport; the
    count and the time left pass to websockets' connection with the socket."""

    __slots__ = (
        "_accepted", "_engine", "_in_tls", "_kind", "_peer", "_pending", "_timer", "transport",
    )  # fmt: skip

    def __init__(
        self, engine: Callable[[], asyncio.Protocol], kind: type[GuardedServerConnection]
    ) -> None:
        self._engine = engine  # websockets' protocol factory
        self._kind = kind  # the server's connection class (its guard, counters)
        self._pending: PendingHandshakes | None = None
        self._peer = "unknown"
        self._timer: asyncio.TimerHandle | None = None
        self._accepted = 0.0  # (monotonic) when TLS is made here
        self._in_tls = False  # the TLS handshake is under way
        # while its first bytes are awaited; the TCP transport during the TLS handshake
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._in_tls:  # the TLS handshake is done
            self._tls_done(transport)
            return
        guard, pending = self._kind.guard, self._kind.pending
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        tls = self._kind.tls
        if tls is None and not guard.is_refused(self._peer):
            self._hand_over(transport)
            return
        # held until its first bytes (a refused address) or through its TLS handshake:
        # a pending handshake
        refusal = pending.enter(self._peer)
        if refusal is not None:
            if tls is None:
                refuse(cast(asyncio.Transport, transport), raw_refusal(refusal), pending)
            else:
                transport.close()  # no TLS yet, so no HTTP answer
            guard.record_raw_refusal(None if tls else refusal[0], refusal[1], self._peer)
            return
        self.transport = transport  # type: ignore[assignment]
        self._pending = pending
        loop = asyncio.get_running_loop()
        timeout = guard.config.limits.handshake_timeout_seconds
        self._timer = loop.call_later(timeout, self._timed_out)
        if tls is not None:
            self._in_tls = True
            self._accepted = time.monotonic()
            waiter: asyncio.Future[None] = loop.create_future()
            waiter.add_done_callback(self._tls_ended)
            start_tls(
                loop, transport, self, tls, waiter,
                handshake_timeout=timeout + 1,  # backs ours up (ours covers the head too)
                shutdown_timeout=5,  # websockets' close_timeout
            )  # fmt: skip

    def _tls_done(self, transport: asyncio.BaseTransport) -> None:
        self._in_tls = False
        guard = self._kind.guard
        tls = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        if refused_resumption(tls, guard, self._peer):
            self.transport = None
            self._end_pending()
            return
        if guard.is_refused(self._peer):
            self.transport = tls
            return  # answered at its first bytes (data_received), still pending
        self.transport = None
        self._hand_over(tls, adopt=True)

    def _tls_ended(self, waiter: asyncio.Future[None]) -> None:
        """The TLS handshake ended: a failure (audited), or the connection lost during it;
        nothing to do when it completed (``connection_made`` came first)."""
        counted = self._in_tls and self._pending is not None
        if self._in_tls:
            self._in_tls = False
            self.transport = None
            self._end_pending()
        tls_ended(waiter, self._kind.guard, self._peer, audit=counted)

    def _hand_over(
        self, transport: asyncio.BaseTransport, data: bytes = b"", *, adopt: bool = False
    ) -> None:
        connection = self._engine()
        if adopt:  # the pending count and the time left go with the socket
            assert isinstance(connection, GuardedServerConnection)
            pending, self._pending = self._pending, None
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            if pending is not None:
                connection.adopt_pending(
                    self._accepted, self._kind.guard.config.limits.handshake_timeout_seconds
                )
        transport.set_protocol(connection)
        connection.connection_made(transport)
        if data:
            connection.data_received(data)

    def data_received(self, data: bytes) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return  # answered already: what else arrives before the close is dropped
        self._end_pending()
        early = self._kind.guard.early_refusal(self._peer)  # decided, and counted, now
        if early is None:  # no longer refused: the request is websockets' like any other
            self._hand_over(transport, data)
            return
        self._kind.metrics.bytes_in += len(data)
        refuse(transport, early_response(early), self._kind.pending)

    def _timed_out(self) -> None:
        self._timer = None
        transport, self.transport = self.transport, None
        if transport is not None:
            self._end_pending()
            transport.abort()
            self._kind.guard.record_raw_refusal(None, "handshake_timeout", self._peer)

    def _end_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.leave(self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_pending()
        self.transport = None


def _front_every_socket(server: Server, kind: type[GuardedServerConnection]) -> bool:
    """Put :class:`RefusedAddressFront` in front of websockets' protocol factory, before
    the server listens; whether it could. websockets builds its server from a factory of
    its own, local to ``serve()`` (the one that knows every option): it is taken from the
    closure of the server's ``create_server``. Where websockets is built otherwise
    nothing changes: refused attempts then cost websockets' connection (a test counts
    them), and TLS is websockets' (see start_server)."""
    create = server.create_server
    cells = dict(zip(create.__code__.co_freevars, create.__closure__ or (), strict=False))
    cell = cells.get("protocol_factory")
    if cell is not None and callable(cell.cell_contents):
        cell.cell_contents = functools.partial(RefusedAddressFront, cell.cell_contents, kind)
        return True
    return False


def release_admission(connection: GuardedServerConnection) -> None:
    admission, connection.admission = connection.admission, None
    release(admission)


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "unknown"


def to_request(connection: ServerConnection, request: Request) -> HandshakeRequest:
    guard: Guard = connection.guard  # type: ignore[attr-defined]
    transport = connection.transport
    cert_identity = None
    if transport.get_extra_info("sslcontext") is not None:
        cert_identity = certificate_identity(
            transport.get_extra_info("peercert"), guard.config.tls.identity_from
        )
    return HandshakeRequest(
        client_cert=cert_identity,
        peer=_peer(connection),
        target=request.path,
        headers=Headers(request.headers.raw_items()),
        tls=connection.transport.get_extra_info("sslcontext") is not None,
        method=request.method,
    )


def reject_response(connection: ServerConnection, decision: Reject) -> Response:
    response = connection.respond(decision.status, decision.message + "\n")
    for name, value in decision.headers:
        response.headers[name] = value
    response.headers["Cache-Control"] = "no-store"
    return response


async def start_server(host: Host, ssl_context: ssl.SSLContext | None) -> Server:
    """Start the websockets server for *host* and return it (already serving)."""
    guard = host.guard
    config = guard.config

    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        assert isinstance(connection, GuardedServerConnection)
        connection.decided = True
        decision = await guard.admit(to_request(connection, request))
        if isinstance(decision, Reject):
            return reject_response(connection, decision)
        connection.admission = decision
        if connection.connection_lost_waiter.done():
            release_admission(connection)  # the client left while we were deciding
        return None

    def process_response(
        connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        """The engine refused a request the policy admitted: answer with fixed text
        (its own bodies echo client input) and audit it."""
        if response.status_code == 101 or not getattr(connection, "admission", None):
            return None
        guard.record_raw_refusal(
            response.status_code,
            "bad_handshake",
            connection.admission.client,  # type: ignore[attr-defined]
        )
        fixed = connection.respond(response.status_code, "Invalid WebSocket handshake.\n")
        for name in ("Allow", "Upgrade", "Sec-WebSocket-Version"):
            if name in response.headers:
                fixed.headers[name] = response.headers[name]
        return fixed

    def select_subprotocol(connection: ServerConnection, offered: Any) -> Any:
        admission = getattr(connection, "admission", None)
        return admission.subprotocol if admission is not None else None

    handler = functools.partial(run_guarded, host)  # one coroutine frame per connection
    # websockets' assembler has its own cap on the frames of a message, a module global
    # (WEBSOCKETS_MAX_FRAGMENTS, 4096) that closes with 1009 from the reading task, after
    # the fragments were queued. wsguard counts them first (process_event, at the frame
    # that crosses limits.max_fragments): the global is raised above every cap of this
    # process, so that ours is the one that fires (and a higher configured cap works).
    # It applies to the gateway's upstream connections too, bounded by their size limit.
    engine_messages.MAX_FRAGMENTS = max(
        engine_messages.MAX_FRAGMENTS, config.limits.max_fragments + 1
    )

    kind: type[GuardedServerConnection] = type(
        "ServerGuardedConnection",
        (GuardedServerConnection,),
        {
            "guard": guard,
            "pending": PendingHandshakes(guard),
            "metrics": guard.monitor.metrics,
            "max_fragments": config.limits.max_fragments,
            "tls": ssl_context,
        },
    )
    options: dict[str, Any] = {
        "process_request": process_request,
        "process_response": process_response,
        "select_subprotocol": select_subprotocol,
        "compression": "deflate" if config.compression else None,
        "server_header": None,
        "open_timeout": config.limits.handshake_timeout_seconds,
        "ping_interval": config.liveness.ping_interval_seconds,
        "ping_timeout": config.liveness.ping_timeout_seconds,
        "close_timeout": 5,
        "max_size": config.limits.max_message_bytes,
        "max_queue": 16,
        "create_connection": kind,
        "logger": quiet_logger("wsguard.engine"),
        "backlog": LISTEN_BACKLOG,  # to loop.create_server
    }
    # TCP only: TLS is made by RefusedAddressFront, after the socket is counted as a
    # pending handshake (limits, timeout, audit)
    server = serve(handler, config.host, config.port, **options)
    if not _front_every_socket(server, kind) and ssl_context is not None:
        kind.tls = None  # websockets' own TLS then (pending counted once it is done)
        server = serve(handler, config.host, config.port, ssl=ssl_context, **options)
    return await server


class WebsocketsTransport:
    """The :class:`~wsguard.session.Transport` of a websockets connection."""

    __slots__ = ("ws",)

    def __init__(self, ws: GuardedServerConnection) -> None:
        self.ws = ws

    def write(self, data: str | bytes, text: bool = False) -> bool:
        """Write through the engine's sans-I/O protocol without a task, if possible."""
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return False
        if ws.transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False  # the client is not keeping up: queue (and detect a slow consumer)
        if isinstance(data, str):
            ws.protocol.send_text(data.encode())
        elif text:
            ws.protocol.send_text(data)
        else:
            ws.protocol.send_binary(data)
        try:
            ws.send_data()
        except Exception as exc:  # the engine's own send path handles it the same way
            ws.set_connection_exc(exc)
            ws.transport.abort()
        return True

    async def send(self, data: str | bytes) -> bool:
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            return False
        return True

    def is_open(self) -> bool:
        return self.ws.protocol.state is State.OPEN

    def close_now(self, code: int, reason: str) -> bool:
        """Send the close frame now and stop parsing: what the client still sends is
        read and discarded unparsed (websockets' "fail the connection", RFC 6455 7.1.7),
        and our side is half-closed after the close frame, so a compliant client answers
        and closes at once; the socket is dropped after ``close_timeout`` at the latest.

        Waiting for the client's close frame instead would parse every frame it sent
        before it (a flooding client: megabytes of socket buffers, a Python frame parse
        each), the cost the picows engine avoids the same way. The audit reports the
        close frame we sent either way."""
        ws = self.ws
        protocol = ws.protocol
        if protocol.state is not State.OPEN or ws.send_in_progress is not None:
            return False  # already closing, or in a fragmented send: the engine's close
        # the policy's reason, not the engine's; the client's close frame if held is then
        # received after ours (the picows engine handles the messages before it first too)
        protocol.fail_as_is(code, reason)
        try:
            ws.send_data()
        except Exception as exc:  # the engine's own send path handles it the same way
            ws.set_connection_exc(exc)
            ws.transport.abort()
        if ws.close_deadline is None and ws.close_timeout is not None:
            ws.close_deadline = ws.loop.time() + ws.close_timeout
        return True

    async def close(self, code: int, reason: str) -> None:
        """The close frame (see :meth:`close_now`), then wait for the connection to end:
        bounded by ``close_timeout``, after which the socket is aborted."""
        self.close_now(code, reason)
        await self.ws.close(code, reason)

    def abort(self) -> None:
        self.ws.transport.abort()

    def close_result(self) -> tuple[int, str, str]:
        protocol = self.ws.protocol
        return first_close(
            protocol.close_sent, protocol.close_rcvd, bool(protocol.close_rcvd_then_sent)
        )


async def run_guarded(host: Host, ws: ServerConnection) -> None:
    """Own one admitted connection: its Session from open to end."""
    assert isinstance(ws, GuardedServerConnection)
    admission, ws.admission = ws.admission, None
    if admission is None:  # pragma: no cover - process_request always sets it
        await ws.close(1011, "internal error")
        return
    session = Session(WebsocketsTransport(ws), host, admission, loop=ws.loop)
    ws.guarded = session
    task = asyncio.current_task()
    if task is not None:  # websockets' task for the connection: done after its close
        task.add_done_callback(functools.partial(_let_go_when_lost, ws))
    request = ws.request
    if request is not None:
        session.request = host.keep_request(request.path, request.headers.raw_items())
        # websockets' parser generator keeps this Request alive in its frame for the
        # connection's whole life: empty it, so neither the headers (~2-3 KB) nor the token
        # stay in memory
        request.headers.clear()
        request.path = ""
    ws.request, ws.response = _ADMITTED, None
    latency = host.guard.monitor.metrics.latency
    clock = time.perf_counter
    try:
        opened = session.open()
        if opened is not None:
            await opened
            if ws.held_close is not None:
                await _answer_held_close(ws, session)
        receive = session.receive
        async for data in ws:
            # a close under way: what the peer had already sent is discarded, so its close
            # frame is read and the slot comes back now rather than after close_timeout
            if not session.closing:
                started = clock()
                pending = receive(data)
                if pending is not None:
                    await pending
                latency(clock() - started)
            if ws.held_close is not None:
                await _answer_held_close(ws, session)
        await session.wait_closing()
    except ConnectionClosed:
        pass
    finally:
        if ws.guarded is session:  # (else ended with the connection: connection_lost)
            ws.guarded = None
            protocol = ws.protocol
            if protocol.close_sent is None or protocol.close_rcvd is None:
                # our close is still in flight: wait (bounded) for the code the audit reports
                try:
                    async with asyncio.timeout(5):
                        await ws.wait_closed()
                except TimeoutError:
                    ws.transport.abort()
            closed = session.end()
            if closed is not None:
                await closed
        elif ws.end_hook is not None:
            # the server's shutdown waits for this handler: and so for the host's hook (a
            # gateway closes the upstream there)
            hook, ws.end_hook = ws.end_hook, None
            await hook


def _let_go_when_lost(ws: GuardedServerConnection, _: object = None) -> None:
    """Once websockets is done with a connection (its task over, the socket lost), break
    the reference cycles it leaves, so the connection's objects are freed at once
    instead of waiting for the garbage collector: the message queue refers to bound
    methods of the connection and its transport, the protocol to websockets' closure
    over the connection (its subprotocol selection, used by the handshake only) and to
    its parser, a suspended generator that refers back to it, and, for a connection that
    ended without a closing handshake, to the parser's exception, whose traceback holds
    the protocol."""
    lost = ws.connection_lost_waiter
    if not lost.done():
        lost.add_done_callback(functools.partial(_let_go_when_lost, ws))
        return
    messages = ws.recv_messages
    messages.pause = messages.resume = _nothing
    protocol = ws.protocol
    vars(protocol).pop("select_subprotocol", None)  # back to the class's method
    protocol.parser.close()
    protocol.parser_exc = None


def _nothing() -> None:
    return None


async def _answer_held_close(ws: GuardedServerConnection, session: Session) -> None:
    """The handler is between messages and the client's close frame is held: it is
    answered once every message before it is handled (none left in websockets' queue),
    after the replies still queued for the client (bounded by Session.flush)."""
    if _whole_message_queued(ws.recv_messages):
        return
    if session.backlogged:
        await session.flush()
    ws.release_close()


def _whole_message_queued(messages: engine_messages.Assembler) -> bool:
    """A message's last frame is in websockets' queue, not taken by the handler yet (the
    first frames of a message the client's close frame cut short never complete)."""
    return any(frame.fin for frame in messages.frames.queue)
