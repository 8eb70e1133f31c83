"""The handshake's bytes, against their references, on any input.

``read_head`` validates and splits header lines with C passes over the bytes and one
short loop; the reference here is the grammar written as regular expressions (RFC 9112:
a token, a colon, a value without control characters but tab, CRLF). Every head,
valid or not, gets the same answer from both: the same refusal, or the same pairs.
The picows engine's 101 response is byte for byte the one picows itself builds.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from picows import WSUpgradeResponse

from wsguard.engines.picows.handshake import Switching
from wsguard.engines.screening import MAX_HEADERS, Refusal, read_head, screen_head

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_LINES = re.compile(rb"(?:" + _TOKEN + rb":" + _VALUE + rb"\r\n)*")
_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb"?)[ \t]*\r\n")
_BODY = re.compile(rb"(?:\A|\n)(content-length|transfer-encoding):([^\r]*)")

REQUEST_LINE = b"GET /chat?x=1 HTTP/1.1"


def reference(head: bytes) -> tuple[Refusal | None, list[tuple[str, str]] | None]:
    """What the grammar says of a head whose request line is ``REQUEST_LINE``."""
    end = head.find(b"\r\n")
    block = b"" if end < 0 else head[end + 2 :] + b"\r\n"
    if _LINES.fullmatch(block) is None:
        return (400, "bad_request", "Malformed HTTP header."), None
    if block.count(b"\r\n") > MAX_HEADERS:
        return (431, "headers_too_large", "Too many request headers."), None
    for name, value in _BODY.findall(block.lower()):
        if name == b"transfer-encoding" or value.strip() != b"0":
            return (400, "bad_request", "An upgrade request has no body."), None
    pairs = [(n.decode("ascii"), v.decode("latin-1")) for n, v in _LINE.findall(block)]
    return None, pairs


# Header lines from pieces that matter to the grammar: token characters, blanks,
# colons, control characters (CR, LF and others), bytes above 127, body headers.
_PIECES = st.sampled_from(
    [b"a", b"Z", b"-", b"!", b"~", b"0", b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"\x00",
     b"\x7f", b"\x0b", b"\xe9", b"\xff", b"(", b"@", b",", b"\"", b"content-length",
     b"Transfer-Encoding", b"Content-Length: 0", b"Content-Length:5", b"Host: x"]
)  # fmt: skip
_LINE_BYTES = st.lists(_PIECES, max_size=8).map(b"".join)
_HEADS = st.lists(_LINE_BYTES, max_size=6).map(lambda lines: b"\r\n".join([REQUEST_LINE, *lines]))


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_HEADS)
@example(REQUEST_LINE)
@example(REQUEST_LINE + b"\r\nHost: a\r\n")  # an empty line inside the head
@example(REQUEST_LINE + b"\r\n: no name")
@example(REQUEST_LINE + b"\r\nno colon")
@example(REQUEST_LINE + b"\r\nName : blank before the colon")
@example(REQUEST_LINE + b"\r\n folded: line")
@example(REQUEST_LINE + b"\r\nX: a\rb")
@example(REQUEST_LINE + b"\r\nX: a\nb")
@example(REQUEST_LINE + b"\r\nX: \t value with blanks \t ")
@example(REQUEST_LINE + b"\r\nX: :colons: in:value:")
@example(REQUEST_LINE + b"\r\nX: caf\xe9")
@example(REQUEST_LINE + b"\r\nContent-Length:  0 ")
@example(REQUEST_LINE + b"\r\ncontent-LENGTH: 00")
@example(REQUEST_LINE + b"\r\nX-content-length: 5")
@example(REQUEST_LINE + b"\r\ncontent-\r\nlength: 5")
def test_read_head_answers_every_head_as_the_grammar_does(head: bytes) -> None:
    refusal, parsed = read_head(head)
    expected_refusal, expected_pairs = reference(head)
    assert refusal == expected_refusal
    assert screen_head(head) == expected_refusal
    if expected_pairs is not None:
        assert parsed == ("GET", "/chat?x=1", expected_pairs)
    else:
        assert parsed is None


def test_too_many_header_lines_are_refused_431_and_the_limit_itself_admitted() -> None:
    lines = [b"X-%d: v" % i for i in range(MAX_HEADERS)]
    refusal, parsed = read_head(b"\r\n".join([REQUEST_LINE, *lines]))
    assert refusal is None and parsed is not None and len(parsed[2]) == MAX_HEADERS
    refusal, _ = read_head(b"\r\n".join([REQUEST_LINE, *lines, b"X-last: v"]))
    assert refusal == (431, "headers_too_large", "Too many request headers.")


@pytest.mark.parametrize("subprotocol", [None, "chat.v2"])
def test_the_101_response_is_the_one_picows_builds(subprotocol: str | None) -> None:
    extra = [("Sec-WebSocket-Protocol", subprotocol)] if subprotocol else None
    picows_own = WSUpgradeResponse.create_101_response(extra)
    ours = Switching(subprotocol)
    for response in (picows_own, ours):  # what picows does before writing it
        response.headers["Sec-WebSocket-Accept"] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ours.to_bytes() == picows_own.to_bytes()
    assert ours.status == 101 and isinstance(ours.to_bytes(), bytearray)
