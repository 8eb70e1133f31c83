"""Screening of the raw HTTP request head before the engine parses it.

The engine closes silently on input it cannot parse and buffers up to 128
header lines of 8 KiB each. wsguard holds the head until it is complete, caps
its total size, and answers anything malformed with a real 4xx.
"""

from __future__ import annotations

_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_BAD_VALUE_BYTES = frozenset(range(0x20)) - {0x09} | {0x7F}

Refusal = tuple[int, str, str]


def screen_request_line(line: bytes) -> Refusal | None:
    parts = line.split(b" ")
    if len(parts) != 3 or not line.isascii() or not parts[0].isalpha():
        return 400, "bad_request", "Malformed HTTP request line."
    if parts[2] != b"HTTP/1.1":
        return 400, "bad_http_version", "HTTP/1.1 required."
    if parts[0] != b"GET":
        return 405, "bad_method", "Only GET upgrades are accepted."
    return None


def screen_head(head: bytes) -> Refusal | None:
    """Validate a complete request head (request line and header lines, no body)."""
    lines = head.split(b"\r\n")
    refusal = screen_request_line(lines[0])
    if refusal is not None:
        return refusal
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TCHARS:
            return 400, "bad_request", "Malformed HTTP header."
        if _BAD_VALUE_BYTES.intersection(value):
            return 400, "bad_request", "Malformed HTTP header."
    return None
