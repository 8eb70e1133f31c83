"""Screening of the raw HTTP request head before the engine parses it.

The engine closes silently on input it cannot parse and buffers up to 128
header lines of 8 KiB each. wsguard holds the head until it is complete, caps
its total size and every line of it, and answers anything malformed with a real
4xx, the same on every engine. Until the head is complete a connection is a
pending handshake, counted per address (:class:`PendingHandshakes`).
"""

from __future__ import annotations

import asyncio
import functools
import http
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from wsguard.core.client_address import parse_ip

if TYPE_CHECKING:
    from wsguard.core.refused import Early
    from wsguard.guard import Guard

Refusal = tuple[int, str, str]
MAX_HEADERS = 128  # header lines (websockets' own limit, enforced for every engine)
MAX_LINE = 8192  # bytes of a request line or header line, its CRLF included (websockets' limit)

# A header line too long: a line feed, then MAX_LINE bytes without one (with its line
# feed, the line is longer than MAX_LINE; a line still arriving is refused once that much
# of it is there). The leading literal lets the regex engine jump from line feed to line
# feed: the search is linear in the head's size.
_LONG_HEADER = re.compile(rb"\n[^\n]{%d}" % MAX_LINE)
_LINE_TOO_LONG: Refusal = (414, "request_line_too_long", "Request line too long.")
_HEADER_TOO_LONG: Refusal = (431, "headers_too_large", "Request header too large.")


_BAD_REQUEST_LINE: Refusal = (400, "bad_request", "Malformed HTTP request line.")


def screen_request_line(line: bytes) -> Refusal | None:
    parts = line.split(b" ")
    if len(parts) != 3 or not line.isascii() or not parts[0].isalpha():
        return _BAD_REQUEST_LINE
    if parts[2] != b"HTTP/1.1":
        return 400, "bad_http_version", "HTTP/1.1 required."
    if parts[0] != b"GET":
        return 405, "bad_method", "Only GET upgrades are accepted."
    return None


# A header line is a token, a colon and a value without control characters (tab
# allowed), ending with CRLF. Checked with C passes over the whole block (a translate
# that keeps only the control characters, a split, a translate of the names) and one
# short loop over the lines: a quarter of what regular expressions over the block cost
# (a typical browser head: 4 µs against 16).
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CONTROLS = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"  # CR and LF among them
_NOT_CONTROLS = bytes(c for c in range(256) if c not in _CONTROLS)
_BAD_FIELDS: Refusal = (400, "bad_request", "Malformed HTTP header.")
_TOO_MANY_FIELDS: Refusal = (431, "headers_too_large", "Too many request headers.")
_BODY: Refusal = (400, "bad_request", "An upgrade request has no body.")

Parsed = tuple[str, str, list[tuple[str, str]]]


def _split(head: bytes) -> tuple[bytes, bytes]:
    """The request line, and the header lines each ending with CRLF."""
    end = head.find(b"\r\n")
    return (head, b"") if end < 0 else (head[:end], head[end + 2 :] + b"\r\n")


def _fields(block: bytes) -> list[tuple[str, str]] | Refusal:
    """The header lines of *block* (each ending with CRLF) as (name, value) pairs, the
    value without the blanks around it; or the refusal of the block."""
    lines = block.split(b"\r\n")
    if lines.pop() or block.translate(None, _NOT_CONTROLS) != b"\r\n" * len(lines):
        return _BAD_FIELDS  # a control character, or a CR or LF not in a line's CRLF
    pairs: list[tuple[str, str]] = []
    names: list[bytes] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not name or not colon:
            return _BAD_FIELDS
        names.append(name)
        pairs.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    joined = b"".join(names)
    if joined.translate(None, _TOKEN_CHARS):
        return _BAD_FIELDS  # a name that is not a token (a blank before the colon...)
    if len(lines) > MAX_HEADERS:
        return _TOO_MANY_FIELDS
    joined = joined.lower()
    if (b"content-length" in joined or b"transfer-encoding" in joined) and _has_body(pairs):
        # nothing may follow the head but frames, after the 101 (RFC 6455 §4.1): a body
        # would be read as frames by one engine and refused by another
        return _BODY
    return pairs


def _has_body(pairs: list[tuple[str, str]]) -> bool:
    """A ``Transfer-Encoding`` header, or a ``Content-Length`` other than 0."""
    for name, value in pairs:
        lowered = name.lower()
        if lowered == "transfer-encoding" or (lowered == "content-length" and value != "0"):
            return True
    return False


def screen_head(head: bytes) -> Refusal | None:
    """Validate a complete request head (request line and header lines, no body)."""
    refusal, _ = read_head(head)
    return refusal


def read_head(head: bytes) -> tuple[Refusal | None, Parsed | None]:
    """Validate and parse a complete request head (no blank line): either a refusal,
    or method, target and header pairs."""
    line, block = _split(head)
    refusal = screen_request_line(line)
    if refusal is not None:
        return refusal, None
    fields = _fields(block)
    if isinstance(fields, tuple):
        return fields, None
    method, target, _ = line.decode("ascii").split(" ")
    return None, (method, target, fields)


def _long_line(buffer: bytes, end: int) -> Refusal | None:
    """414 for a request line, 431 for a header line over :data:`MAX_LINE` bytes, in
    ``buffer[:end]`` (lines with their CRLF, the last one possibly incomplete)."""
    if end < MAX_LINE:  # the usual head: no line can be too long
        return None
    first = buffer.find(b"\n", 0, end)
    if first < 0 or first >= MAX_LINE:
        return _LINE_TOO_LONG
    return _HEADER_TOO_LONG if _LONG_HEADER.search(buffer, first, end) else None


def check_head(buffer: bytes, limit: int, *, whole: bool = True) -> tuple[int, Refusal | None]:
    """Screen what has arrived of a request head: ``(end, refusal)``.

    *end* is where the head ends (the blank line), or -1 while it is incomplete;
    a refusal answers a head that is too large, has a line over 8 KiB or is
    malformed, without waiting for the rest when what arrived is enough to tell.
    With ``whole=False`` a complete head is only size-checked (the caller parses
    it with read_head).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        refusal = _long_line(buffer, len(buffer))
        if refusal is not None:
            return -1, refusal
        if len(buffer) > limit:
            return -1, _HEADER_TOO_LONG if b"\n" in buffer else _LINE_TOO_LONG
        first = buffer.find(b"\n")
        if first < 0:
            return -1, None
        # answer a bad request line, or a line ended by a bare LF (a head that would
        # never end with CRLF CRLF), without waiting for the rest
        refusal = screen_request_line(buffer[:first].rstrip(b"\r"))
        if refusal is None and buffer.count(b"\n") != buffer.count(b"\r\n"):
            refusal = _BAD_REQUEST_LINE if buffer[first - 1 : first] != b"\r" else _BAD_FIELDS
        return -1, refusal
    refusal = _long_line(buffer, end + 2)  # every line with its CRLF
    if refusal is not None:
        return end, refusal
    if end > limit:
        return end, _HEADER_TOO_LONG
    return end, screen_head(buffer[:end]) if whole else None


def http_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete ``Connection: close`` response with a short plain-text body."""
    body = (message + "\n").encode()
    phrase = http.HTTPStatus(status).phrase
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (
        f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\n{extra}"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n\r\n"
    ).encode() + body


@functools.lru_cache(maxsize=64)
def early_response(early: Early) -> bytes:
    """The answer to an attempt from an address still refused
    (:meth:`~wsguard.guard.Guard.early_refusal`): the same few answers, each with the
    seconds left in Retry-After, so each is built once per second of those."""
    status, _, message, headers = early
    return http_response(status, message, headers)


def raw_refusal(refusal: Refusal) -> bytes:
    """The response to a head refused before the policy saw it."""
    status, _, message = refusal
    headers: list[tuple[str, str]] = [("Allow", "GET")] if status == 405 else []
    if status in (429, 503):
        headers.append(("Retry-After", "1"))
    return http_response(status, message, headers)


#: After an HTTP refusal, what the client still sends is read and dropped: this many bytes
#: at most (then the socket is not read any more) ...
REFUSAL_DRAIN_BYTES = 64 * 1024
#: ... until the client ends its side, or for this many seconds at most.
REFUSAL_LINGER_SECONDS = 2.0


def refuse(
    transport: asyncio.Transport,
    answer: bytes,
    pending: PendingHandshakes,
    inner: asyncio.BaseProtocol | None = None,
) -> None:
    """Write *answer* (an HTTP refusal) and end the connection without a reset.

    Closing a socket with unread data makes the kernel answer with a reset, which can
    erase the answer from the client's buffer before it is read (RFC 9112 9.6): a
    client that sent frames (or anything) behind its request, or whose request was
    still arriving, would see a reset instead of its 401 or 503. So our side is
    half-closed after the answer and the socket read on, what arrives dropped
    (:data:`REFUSAL_DRAIN_BYTES` at most), until the client ends its side, for
    :data:`REFUSAL_LINGER_SECONDS` at most. At most ``limits.max_pending_handshakes``
    refused sockets linger at a time (counted with *pending*); beyond, and over TLS
    (no half-close), the socket is closed at once. *inner*: the protocol the transport
    had, told when the connection is lost."""
    transport.write(answer)
    if transport.is_closing():
        return
    if pending.lingering >= pending.total_limit or not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    transport.set_protocol(_Lingering(transport, pending, inner))
    transport.resume_reading()  # (reads may have been paused for the early data)


class _Lingering(asyncio.Protocol):
    """A refused connection after its answer (see :func:`refuse`)."""

    __slots__ = ("_inner", "_left", "_pending", "_timer", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        pending: PendingHandshakes,
        inner: asyncio.BaseProtocol | None,
    ) -> None:
        self._transport = transport
        self._pending = pending
        self._inner = inner
        self._left = REFUSAL_DRAIN_BYTES
        pending.lingering += 1
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSAL_LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._transport.pause_reading()  # flooding, not closing: the timer ends it

    def eof_received(self) -> bool:
        return False  # the client has read what it wanted: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._pending.lingering -= 1
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc)


class PendingHandshakes:
    """Connections whose request head has not arrived yet, per address and in total.

    Every limit of the policy applies once a request is parsed; this bounds what
    a client can hold open before that (slowloris). Addresses are counted like
    every other per-address limit (:meth:`Guard.address_key`: IPv4 per address,
    IPv6 per ``limits.ipv6_prefix_length`` network). Trusted proxies are exempt
    from the per-address cap: their peers are many clients.
    """

    __slots__ = (
        "_address_key",
        "by_address",
        "lingering",
        "per_address",
        "resolver",
        "total",
        "total_limit",
    )

    def __init__(self, guard: Guard) -> None:
        limits = guard.config.limits
        self.per_address = limits.pending_handshakes_per_address
        self.total_limit = limits.max_pending_handshakes
        self.resolver = guard.handshakes.resolver
        self._address_key = guard.address_key
        self.by_address: dict[str, int] = {}
        self.total = 0
        self.lingering = 0  # refused sockets read on after their answer (see refuse)

    def _key(self, peer: str) -> str:
        try:
            return self._address_key(peer)
        except ValueError:  # not an IP address (a Unix socket): counted as it is
            return peer

    def enter(self, peer: str) -> Refusal | None:
        if self.total >= self.total_limit:
            return 503, "server_full", "Too many pending handshakes."
        key = self._key(peer)
        count = self.by_address.get(key, 0)
        if count >= self.per_address:
            address = parse_ip(peer)
            if address is None or not self.resolver.is_trusted(address):
                return 429, "too_many_pending", "Too many pending handshakes from this address."
        self.by_address[key] = count + 1
        self.total += 1
        return None

    def leave(self, peer: str) -> None:
        self.total -= 1
        key = self._key(peer)
        count = self.by_address.get(key, 1) - 1
        if count <= 0:
            self.by_address.pop(key, None)
        else:
            self.by_address[key] = count
