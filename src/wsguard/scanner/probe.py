"""Talking to the target: handshakes and frames under the scanner's full control.

Built on the sans-I/O ``websockets.client.ClientProtocol`` so the scanner sees every frame
(pings included), can send frames a normal client never would (invalid UTF-8, a header
announcing 64 MiB, endless fragments) and never buffers more than it asked for. Every read
and every connect is bounded by a timeout, and every read is bounded in size: an HTTP
response by websockets' limits (8 KiB lines, 128 headers, 1 MiB body), a frame or message
from the target by :class:`ReadBudget` (refused from its header, before its payload is read),
and what all connections hold unread by the same budget. A target that sends more is
evidence (:class:`HostileAnswer`), never a reason to grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.base import ClientExtensionFactory
from websockets.frames import Frame, Opcode
from websockets.headers import build_host
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin, Subprotocol
from websockets.uri import WebSocketURI

EventKind = Literal["text", "binary", "ping", "pong", "close"]

# a response body or header block bigger than this is cut: the scanner reads, never hoards
MAX_READ = 256 * 1024
CHUNK = 64 * 1024  # one read from a socket
MAX_EVENTS = 10_000  # events queued per connection; past it the connection stops reading
MIB = 1024 * 1024
MAX_MESSAGE = 4 * MIB  # default: the largest frame or message taken from the target
EVENT_COST = 64  # bytes counted for a queued event on top of its payload


class HostileAnswer(Exception):
    """The target sent what the scan refuses to take in (a frame or message over the
    limit); the message is the one-line evidence for the report."""


class ReadBudget:
    """What the scan takes in from the target, shared by all of a scan's connections.

    Every frame or message is at most ``max_message`` bytes: websockets refuses a longer
    one from its header, before reading the payload, and the connection is closed (1009).
    All connections together hold at most ``total`` bytes of messages not yet read by a
    check and of partly received frames; past it (or past ``max_message`` of unread
    messages on one connection) a connection stops reading the socket until the check
    catches up. ``violations`` lists the evidence of every refusal, in order."""

    def __init__(self, max_message: int = MAX_MESSAGE, total: int | None = None) -> None:
        self.max_message = max_message
        self.total = total if total is not None else max(8 * max_message, 32 * MIB)
        self.used = 0
        self.peak = 0  # the most held at once
        self.violations: list[str] = []
        self._freed: asyncio.Event | None = None

    def adjust(self, delta: int) -> None:
        self.used += delta
        self.peak = max(self.peak, self.used)
        if delta < 0 and self._freed is not None:
            self._freed.set()

    async def freed(self) -> None:
        """Return once some connection held less than before."""
        if self._freed is None:
            self._freed = asyncio.Event()
        self._freed.clear()
        await self._freed.wait()

    def refuse(self, exc: PayloadTooBig) -> str:
        """The evidence line for a frame or message over ``max_message``."""
        limit = f"the scan's limit of {_bytes(self.max_message, exact=False)} (--max-message-bytes)"
        if exc.message is None and exc.size is not None:
            so_far = f" after {_bytes(exc.current_size)} of its message" if exc.current_size else ""
            what = f"a frame announcing {_bytes(exc.size)}{so_far}, over {limit}"
        else:
            what = f"a compressed message inflating past {limit}"
        evidence = (
            f"the target sent an oversized frame: {what}; the scan closed the connection "
            "(1009) without reading it"
        )
        if len(self.violations) < 1000:
            self.violations.append(evidence)
        return evidence


def _bytes(n: int, *, exact: bool = True) -> str:
    """``1 TiB (1099511627776 bytes)``; ``4 MiB`` when not ``exact``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}" + (f" ({n} bytes)" if exact else "")
    return f"{n} bytes"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    data: bytes = b""
    code: int | None = None  # close events: the peer's close code (1005 when none, 1006 no frame)
    reason: str = ""

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def host_header(uri: WebSocketURI) -> str:
    """The Host header value for raw requests (IPv6 literals in brackets)."""
    return build_host(uri.host, uri.port, uri.secure, always_include_port=True)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect and what to call it (the pinned address defeats DNS rebinding)."""

    uri: WebSocketURI
    address: str  # resolved IP to connect to
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    source: str | None = None  # local address to bind (loopback targets: one per check)
    budget: ReadBudget = field(default_factory=ReadBudget)  # shared by the scan's endpoints

    def with_source(self, source: str | None) -> Endpoint:
        return replace(self, source=source)


async def open_stream(
    endpoint: Endpoint, *, ssl_context: ssl.SSLContext | Literal["default"] | None = "default"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = endpoint.ssl_context if ssl_context == "default" else ssl_context
    local = (endpoint.source, 0) if endpoint.source else None
    return await asyncio.wait_for(
        asyncio.open_connection(
            endpoint.address,
            endpoint.uri.port,
            ssl=context,
            server_hostname=endpoint.uri.host if context is not None else None,
            local_addr=local,
            limit=MAX_READ,
        ),
        endpoint.connect_timeout,
    )


@dataclass(slots=True)
class Handshake:
    """The outcome of one opening handshake."""

    status: int | None  # 101, an HTTP status, or None when no response came
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    session: Session | None = None  # open when status == 101
    error: str = ""  # why no response: "timeout", "connection closed", a TLS error
    reached: bool = True  # False: TCP or TLS connect failed, the request was never sent
    invalid_upgrade: str = ""  # a 101 that websockets rejects (e.g. a bad Sec-WebSocket-Accept)

    def describe(self) -> str:
        if self.status is None:
            return f"no response ({self.error})"
        if self.status == 101 and self.invalid_upgrade:
            return f"101 with an invalid handshake ({self.invalid_upgrade})"
        if self.status == 101:
            return "101 Switching Protocols"
        return f"HTTP {self.status}"


class Session:
    """An upgraded connection: send anything, receive every frame as an :class:`Event`.

    What the target sends is bounded by the endpoint's :class:`ReadBudget`: a frame over
    its limit ends the connection and every later read raises :class:`HostileAnswer`."""

    def __init__(
        self,
        protocol: ClientProtocol,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: Sequence[object] = (),
        budget: ReadBudget | None = None,
    ) -> None:
        self.protocol = protocol
        self._reader = reader
        self._writer = writer
        self._budget = budget if budget is not None else ReadBudget()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._queued = 0  # bytes of the queued events (payload + EVENT_COST each)
        self._charged = 0  # what this connection counts against the budget
        self._fragments = bytearray()
        self._fragment_kind: EventKind = "text"
        self.close_event: Event | None = None
        self.violation: str | None = None  # evidence: the target sent more than allowed
        self._closed = asyncio.Event()
        self._released = False
        self._dispatch(pending)  # frames that came in the same read as the 101
        self._pump = asyncio.get_running_loop().create_task(self._read_loop())

    # -- receiving ---------------------------------------------------------------
    def _put(self, event: Event) -> None:
        self._events.put_nowait(event)
        self._queued += len(event.data) + EVENT_COST

    def _recharge(self) -> None:
        """Count what this connection holds (unread events, a partly received frame or
        message) against the scan's budget."""
        held = 0
        if not self._released:
            held = self._queued + len(self.protocol.reader.buffer) + len(self._fragments)
        self._budget.adjust(held - self._charged)
        self._charged = held

    def _full(self) -> bool:
        if self._queued >= self._budget.max_message or self._events.qsize() >= MAX_EVENTS:
            return True  # the check has not read what came: wait for it
        # the scan as a whole holds too much; this connection's own share never blocks it
        budget = self._budget
        return budget.used + CHUNK > budget.total and budget.used > self._charged

    def _oversized(self) -> bool:
        """Did the target send a frame or message over the limit (websockets refused it
        and queued a 1009 close)? Recorded once, as evidence."""
        exc = self.protocol.parser_exc
        if self.violation is None and isinstance(exc, PayloadTooBig):
            self.violation = self._budget.refuse(exc)
        return self.violation is not None

    async def _read_loop(self) -> None:
        try:
            await self._flush()  # e.g. the echo of a close that came with the 101
            # (the 1009 close too, when an oversized header came with the 101)
            while self.protocol.state is not State.CLOSED and not self._oversized():
                while self._full():
                    await self._budget.freed()
                data = await self._reader.read(CHUNK)
                if not data:
                    self.protocol.receive_eof()
                    break
                self.protocol.receive_data(data)
                self._dispatch()
                self._recharge()
                await self._flush()  # after an oversized header: the 1009 close, then stop
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.violation is not None:
                self._writer.close()  # nothing more is read from a hostile peer
            self._dispatch()
            self._finish(ended=True)
            self._recharge()

    def _dispatch(self, events: Sequence[object] | None = None) -> None:
        for event in self.protocol.events_received() if events is None else events:
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if opcode is Opcode.PING:
                self._put(Event("ping", bytes(event.data[:125])))
            elif opcode is Opcode.PONG:
                self._put(Event("pong", bytes(event.data[:125])))
            elif opcode is Opcode.CLOSE:
                self._finish()
            elif opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                if opcode is not Opcode.CONT:
                    self._fragment_kind = "text" if opcode is Opcode.TEXT else "binary"
                    self._fragments = bytearray()
                # websockets bounds the whole message (max_size): no cut needed here
                self._fragments += event.data
                if event.fin:
                    self._complete()

    def _complete(self) -> None:
        self._put(Event(self._fragment_kind, bytes(self._fragments)))
        self._fragments = bytearray()

    def _finish(self, *, ended: bool = False) -> None:
        """Record the close: on a close frame, or when the stream ended without one."""
        if self.close_event is not None:
            return
        rcvd = self.protocol.close_rcvd
        if rcvd is None and not ended:
            return
        code = rcvd.code if rcvd is not None else 1006  # 1006: TCP dropped, no close frame
        reason = rcvd.reason if rcvd is not None else ""
        self.close_event = Event("close", code=code, reason=reason)
        self._events.put_nowait(self.close_event)
        self._closed.set()

    def _hostile(self) -> None:
        if self.violation is not None:
            raise HostileAnswer(self.violation)

    async def next_event(self, wait: float) -> Event | None:
        """The next message, ping, pong or close; None when nothing came within timeout.
        Raises :class:`HostileAnswer` instead of the close when the target sent more than
        the scan takes (what came before is still returned first)."""
        if self.close_event is not None and self._events.empty():
            self._hostile()
            return self.close_event
        try:
            event = await asyncio.wait_for(self._events.get(), wait)
        except TimeoutError:
            return None
        if event.kind == "close":
            self._hostile()
        else:
            self._queued -= len(event.data) + EVENT_COST
            self._recharge()
        return event

    async def wait_closed(self, wait: float) -> Event | None:
        """Skip messages until the close; None if the connection is still open at timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = await self.next_event(max(0.0, deadline - loop.time()))
            if event is None:
                return None
            if event.kind == "close":
                return event

    async def closed_within(self, wait: float) -> bool:
        """Has the peer closed (or does it within ``wait``)? Messages stay queued."""
        if not self.closed:
            try:
                await asyncio.wait_for(self._closed.wait(), wait)
            except TimeoutError:
                return False
        self._hostile()
        return True

    @property
    def closed(self) -> bool:
        return self.close_event is not None or self.protocol.state is State.CLOSED

    @property
    def broken(self) -> str | None:
        """What breaks RFC 6455 in the target's frames (reserved bits, a bad opcode,
        invalid UTF-8...), as the parser found it; None while they are valid."""
        exc = self.protocol.parser_exc
        if isinstance(exc, ProtocolError | UnicodeDecodeError):
            return str(exc)
        return None

    # -- sending -----------------------------------------------------------------
    async def _flush(self) -> None:
        data = self.protocol.data_to_send()
        if not data:
            return
        for chunk in data:
            if chunk:
                self._writer.write(chunk)
            else:  # the protocol asks to half-close
                with contextlib.suppress(OSError, RuntimeError):
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.drain()

    async def send_text(self, text: str | bytes) -> None:
        if self.closed or self.protocol.state is not State.OPEN:
            return
        self.protocol.send_text(text.encode() if isinstance(text, str) else text)
        await self._flush()

    async def send_ping(self, data: bytes) -> None:
        """A WebSocket ping control frame (every RFC 6455 endpoint answers with a pong)."""
        if self.closed or self.protocol.state is not State.OPEN:
            return
        self.protocol.send_ping(data)
        await self._flush()

    async def send_binary(self, data: bytes) -> None:
        if self.closed or self.protocol.state is not State.OPEN:
            return
        self.protocol.send_binary(data)
        await self._flush()

    async def send_raw(self, data: bytes, *, drain_timeout: float = 5.0) -> bool:
        """Write bytes as they are (hand-made frames); False if the peer stopped reading."""
        if self.closed:
            return False
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), drain_timeout)
        except (TimeoutError, OSError, ConnectionError):
            return False
        return True

    async def close(self, code: int = 1000) -> None:
        """Close and release everything; safe to call twice and under cancellation (the
        socket and the reader task go away first, whatever happens next)."""
        try:
            if self.protocol.state is State.OPEN:
                with contextlib.suppress(Exception):
                    self.protocol.send_close(code)
                    for chunk in self.protocol.data_to_send():
                        if chunk:
                            self._writer.write(chunk)
        finally:
            self._writer.close()
            self._pump.cancel()
            self._released = True  # what it still holds no longer counts
            self._recharge()
        await asyncio.wait({self._pump}, timeout=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


def frame_bytes(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame, built by websockets (valid framing, any payload)."""
    return Frame(opcode, payload, fin=fin).serialize(mask=True)


def frame_header(opcode: Opcode, length: int, *, fin: bool = True) -> bytes:
    """A masked frame header announcing ``length`` bytes (the payload is sent separately,
    masked with the all-zero key, so it goes on the wire as it is)."""
    first = (0x80 if fin else 0) | int(opcode)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\x00\x00\x00\x00"


async def handshake(
    endpoint: Endpoint,
    *,
    resource: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    origin: str | None = None,
    subprotocols: Sequence[str] = (),
    extensions: Sequence[ClientExtensionFactory] = (),
    wait: float = 5.0,
) -> Handshake:
    """Open a WebSocket connection; report the response whatever it is."""
    try:
        reader, writer = await open_stream(endpoint)
    except TimeoutError:
        return Handshake(None, error="connect timeout", reached=False)
    except ssl.SSLError as exc:
        return Handshake(None, error=f"TLS: {exc.reason or exc}", reached=False)
    except OSError as exc:
        return Handshake(None, error=exc.strerror or type(exc).__name__, reached=False)
    protocol = ClientProtocol(
        endpoint.uri,
        origin=Origin(origin) if origin is not None else None,
        subprotocols=[Subprotocol(s) for s in subprotocols] or None,
        extensions=list(extensions) or None,
        max_size=endpoint.budget.max_message,  # refused from the header, never buffered
    )
    request: Request = protocol.connect()
    if resource is not None:
        request.path = resource
    replaced: set[str] = set()
    for name, value in headers:
        if name.lower() in ("host", "origin") and name.lower() not in replaced:
            del request.headers[name]  # --header Host/Origin replaces, never duplicates
            replaced.add(name.lower())
        request.headers[name] = value
    protocol.send_request(request)
    try:
        for chunk in protocol.data_to_send():
            writer.write(chunk)
        await writer.drain()
        response, pending = await asyncio.wait_for(_read_response(protocol, reader), wait)
    except _InvalidResponse as exc:
        writer.close()
        return Handshake(None, error=str(exc))
    except TimeoutError:
        writer.close()
        return Handshake(None, error="timeout")
    except (OSError, ssl.SSLError, EOFError) as exc:
        writer.close()
        return Handshake(None, error=str(exc) or "connection closed")
    except BaseException:  # cancelled: never leave the socket behind
        writer.close()
        raise
    if response is None:
        writer.close()
        return Handshake(None, error="connection closed")
    if response.status_code != 101:
        writer.close()
        return Handshake(response.status_code, response.headers, bytes(response.body or b""))
    if protocol.state is State.CONNECTING or protocol.handshake_exc is not None:
        writer.close()
        problem = str(protocol.handshake_exc or "not accepted by websockets")
        return Handshake(101, response.headers, invalid_upgrade=problem[:120])
    # OPEN, or already CLOSING when a close frame came in the same read as the 101
    session = Session(protocol, reader, writer, pending, endpoint.budget)
    return Handshake(101, response.headers, b"", session=session)


class _InvalidResponse(Exception):
    """The target's answer to the handshake is not an HTTP response websockets takes
    (a line over 8 KiB, over 128 headers, a body over 1 MiB, garbage)."""


async def _read_response(
    protocol: ClientProtocol, reader: asyncio.StreamReader
) -> tuple[Response | None, list[object]]:
    """The response, and whatever frames arrived after it in the same reads. An answer
    websockets refuses ends the read at once (it is never read to its end)."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            protocol.receive_eof()
        else:
            protocol.receive_data(data)
        events = protocol.events_received()
        for index, event in enumerate(events):
            if isinstance(event, Response):
                return event, list(events[index + 1 :])
        if not data:
            return None, []
        if protocol.handshake_exc is not None:
            cause = protocol.handshake_exc.__cause__ or protocol.handshake_exc
            raise _InvalidResponse(f"invalid HTTP response: {str(cause)[:100]}")


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int | None  # None: the server closed or said nothing parseable
    head: str = ""
    body: bytes = b""
    error: str = ""

    def describe(self) -> str:
        if self.status is None:
            return f"no response ({self.error})" if self.error else "no response"
        return f"HTTP {self.status}"


async def raw_request(endpoint: Endpoint, data: bytes, *, wait: float = 5.0) -> RawResponse:
    """Send arbitrary bytes as a request; read one HTTP response head and a bounded body."""
    try:
        reader, writer = await open_stream(endpoint)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return RawResponse(None, error=f"connect failed: {exc}")
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), wait)
        return await asyncio.wait_for(_read_raw_response(reader), wait)
    except TimeoutError:
        return RawResponse(None, error="timeout")
    except (OSError, ssl.SSLError) as exc:
        return RawResponse(None, error=str(exc) or type(exc).__name__)
    finally:
        writer.close()


async def _read_raw_response(reader: asyncio.StreamReader) -> RawResponse:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return RawResponse(None, error="connection closed")
        head = exc.partial
    except asyncio.LimitOverrunError:
        return RawResponse(None, error="response head too large")
    text = head.decode("latin-1")
    parts = text.split(" ", 2)
    try:
        status = int(parts[1]) if parts[0].startswith("HTTP/") else None
    except (IndexError, ValueError):
        status = None
    length = 0
    for line in text.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            with contextlib.suppress(ValueError):
                length = min(int(value.strip()), MAX_READ)
    body = b""
    if length and status != 101:
        with contextlib.suppress(asyncio.IncompleteReadError):
            body = await reader.readexactly(length)
    return RawResponse(status, text, body)
