"""Screening of the raw HTTP request head before the engine parses it.

The engine closes silently on input it cannot parse and buffers up to 128
header lines of 8 KiB each. wsguard holds the head until it is complete, caps
its total size, and answers anything malformed with a real 4xx.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable

Refusal = tuple[int, str, str]
MAX_HEADERS = 128  # header lines (websockets' own limit, enforced for every engine)


def screen_request_line(line: bytes) -> Refusal | None:
    parts = line.split(b" ")
    if len(parts) != 3 or not line.isascii() or not parts[0].isalpha():
        return 400, "bad_request", "Malformed HTTP request line."
    if parts[2] != b"HTTP/1.1":
        return 400, "bad_http_version", "HTTP/1.1 required."
    if parts[0] != b"GET":
        return 405, "bad_method", "Only GET upgrades are accepted."
    return None


# A header line: a token, a colon, a value without control characters (tab allowed).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":" + _VALUE + rb"\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb"?)[ \t]*\r\n")

Parsed = tuple[str, str, list[tuple[str, str]]]


def _split(head: bytes) -> tuple[bytes, bytes]:
    """The request line, and the header lines each ending with CRLF."""
    end = head.find(b"\r\n")
    return (head, b"") if end < 0 else (head[:end], head[end + 2 :] + b"\r\n")


def screen_head(head: bytes) -> Refusal | None:
    """Validate a complete request head (request line and header lines, no body)."""
    line, block = _split(head)
    refusal = screen_request_line(line)
    if refusal is not None:
        return refusal
    if _FIELDS.fullmatch(block) is None:
        return 400, "bad_request", "Malformed HTTP header."
    if block.count(b"\r\n") > MAX_HEADERS:
        return 431, "headers_too_large", "Too many request headers."
    return None


def read_head(head: bytes) -> tuple[Refusal | None, Parsed | None]:
    """Validate and parse a complete request head (no blank line): either a refusal,
    or method, target and header pairs (compiled regexes, no per-line Python loop)."""
    refusal = screen_head(head)
    if refusal is not None:
        return refusal, None
    line, block = _split(head)
    method, target, _ = line.decode("ascii").split(" ")
    pairs = _FIELD.findall(block)
    return None, (method, target, [(n.decode("ascii"), v.decode("latin-1")) for n, v in pairs])


def check_head(buffer: bytes, limit: int, *, whole: bool = True) -> tuple[int, Refusal | None]:
    """Screen what has arrived of a request head: ``(end, refusal)``.

    *end* is where the head ends (the blank line), or -1 while it is incomplete;
    a refusal answers a head that is too large or malformed, without waiting for
    the rest when the request line alone is enough to tell. With ``whole=False``
    a complete head is only size-checked (the caller parses it with read_head).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > limit:
            if b"\n" in buffer:
                return -1, (431, "headers_too_large", "Request header too large.")
            return -1, (414, "request_line_too_long", "Request line too long.")
        first = buffer.find(b"\n")
        if first >= 0:  # answer a bad request line without waiting for the rest
            return -1, screen_request_line(buffer[:first].rstrip(b"\r"))
        return -1, None
    if end > limit:
        return end, (431, "headers_too_large", "Request header too large.")
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


def raw_refusal(refusal: Refusal) -> bytes:
    """The response to a head refused before the policy saw it."""
    status, _, message = refusal
    headers: list[tuple[str, str]] = [("Allow", "GET")] if status == 405 else []
    if status in (429, 503):
        headers.append(("Retry-After", "1"))
    return http_response(status, message, headers)
