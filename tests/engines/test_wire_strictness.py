"""The wire, equally strict on both standalone engines (RFC 6455, RFC 9112 limits).

Raw sockets and hand-made frames, every test through ``server_factory`` (so on websockets
and on picows) unless it tests one object: request heads with a line over 8 KiB or more
than 128 headers, pending handshakes counted per address (per /64 for IPv6), the fragment
cap of one message and the rate charged per fragment, reserved bits, close frames that
must never be sent, and the close code the audit log reports.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import select
import socket
import time
from contextlib import ExitStack
from typing import Any

import pytest

from conftest import (
    RunningServer,
    ServerFactory,
    eventually,
    make_config,
    make_token,
    status_of,
    upgrade_request,
)
from support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WS_HEADERS,
    RawClient,
    frame,
    raw_request,
    raw_welcomed,
    response_head,
)
from wsguard.engines.screening import PendingHandshakes, check_head
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.observability.audit import AuditLog
from wsguard.session import Connection

#: Rates high enough that only the limit under test can close a connection.
UNLIMITED_RATES: dict[str, Any] = {
    "messages_per_minute": 10_000_000,
    "message_burst": 1_000_000,
    "bytes_per_minute": 10_000_000_000,
    "subject_messages_per_minute": 10_000_000,
    "subject_bytes_per_minute": 10_000_000_000,
}


def answer(port: int, request: bytes) -> int:
    """The status the server answers *request* with (read up to the end of its head)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            head += chunk
    return status_of(head)


def refused_reasons(server: Any) -> list[tuple[int, str]]:
    return [(e["status"], e["reason"]) for e in server.audit.events("handshake_refused")]


def closed_event(server: Any) -> dict[str, Any]:
    (event,) = eventually(
        lambda: server.audit.events("connection_closed"), what="connection_closed"
    )
    assert isinstance(event, dict)
    return event


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(OP_CLOSE, payload)


def frames_until_eof(client: RawClient) -> list[tuple[int, bytes]]:
    """Every frame the server still sends until it closes the TCP connection."""
    out: list[tuple[int, bytes]] = []
    while True:
        try:
            out.append(client.read_frame())
        except (ConnectionError, ConnectionResetError):
            return out


def server_close(client: RawClient) -> tuple[int | None, bytes]:
    """Read up to the server's close frame: its code (None: no status) and reason."""
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_PING:
            client.send(frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if not payload:
                return None, b""
            return int.from_bytes(payload[:2], "big"), payload[2:]


# -- request heads: per-line limits, number of headers -------------------------------------


LINE = 8192  # the longest request line or header line, its CRLF included


def with_line(name: str, total: int) -> bytes:
    """An upgrade request with a ``name: ...`` line of *total* bytes (CRLF included)."""
    value = "a" * (total - len(name) - 4)
    request = upgrade_request(token=make_token(), headers={name: value})
    assert f"\r\n{name}: {value}\r\n".encode() in request
    return request


@pytest.mark.parametrize(
    ("name", "total"),
    [("X-Big", 9000), ("X-Big", LINE + 1), ("X-Big", 8198)],
    ids=["9000", "8193", "8198"],
)
def test_a_header_line_over_8_kib_is_refused_431(
    server_factory: ServerFactory, name: str, total: int
) -> None:
    server = server_factory()
    assert answer(server.port, with_line(name, total)) == 431
    eventually(lambda: refused_reasons(server), what="the refusal's audit record")
    assert refused_reasons(server) == [(431, "headers_too_large")]


def test_a_long_host_line_is_refused_431(server_factory: ServerFactory) -> None:
    server = server_factory()
    request = upgrade_request(host="h" * 8192, token=make_token())  # an 8,198-byte line
    assert answer(server.port, request) == 431
    eventually(lambda: refused_reasons(server), what="the refusal's audit record")
    assert refused_reasons(server) == [(431, "headers_too_large")]


def test_a_header_line_of_exactly_8_kib_is_admitted(server_factory: ServerFactory) -> None:
    server = server_factory()
    assert answer(server.port, with_line("X-Big", LINE)) == 101


def test_a_request_line_over_8_kib_is_refused_414(server_factory: ServerFactory) -> None:
    server = server_factory()
    request = upgrade_request("/" + "a" * 9000, token=make_token())
    assert answer(server.port, request) == 414
    eventually(lambda: refused_reasons(server), what="the refusal's audit record")
    assert refused_reasons(server) == [(414, "request_line_too_long")]
    # a request line of exactly 8 KiB passes the screening: the policy answers it (its
    # target is over the 4 KiB a target may have)
    path = "/" + "a" * (LINE - len("GET / HTTP/1.1\r\n"))
    at_limit = upgrade_request(path, token=make_token())
    assert at_limit.index(b"\r\n") + 2 == LINE
    assert answer(server.port, at_limit) == 400
    eventually(lambda: len(refused_reasons(server)) == 2, what="the second audit record")
    assert refused_reasons(server) == [(414, "request_line_too_long"), (400, "bad_request")]


def test_a_long_request_line_is_refused_before_the_head_ends(
    server_factory: ServerFactory,
) -> None:
    """Nine KiB of request line, no line end yet: answered at once (not at the timeout)."""
    server = server_factory({"limits": {"handshake_timeout_seconds": 60}})
    assert answer(server.port, b"GET /" + b"a" * 9000) == 414


def test_a_long_header_line_is_refused_before_the_head_ends(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"limits": {"handshake_timeout_seconds": 60}})
    assert answer(server.port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000) == 431


def test_more_than_128_headers_are_refused_431(server_factory: ServerFactory) -> None:
    server = server_factory()
    base = upgrade_request(token=make_token()).count(b"\r\n") - 2  # its own header lines
    fits = {f"X-H{i}": "v" for i in range(128 - base)}
    assert answer(server.port, upgrade_request(headers=fits, token=make_token())) == 101
    over = {f"X-H{i}": "v" for i in range(129 - base)}
    assert answer(server.port, upgrade_request(headers=over, token=make_token())) == 431
    eventually(lambda: refused_reasons(server), what="the refusal's audit record")
    assert refused_reasons(server) == [(431, "headers_too_large")]


@pytest.mark.parametrize(
    ("buffer", "status"),
    [
        (b"GET /" + b"a" * 8200, 414),
        (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 8200, 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 8200 + b"\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 8200 + b"\r\n\r\n", 431),
    ],
    ids=["line-incomplete", "line-complete", "header-incomplete", "header", "last-header"],
)
def test_check_head_refuses_long_lines_however_the_head_arrived(buffer: bytes, status: int) -> None:
    for whole in (True, False):
        _, refusal = check_head(buffer, 16384, whole=whole)
        assert refusal is not None and refusal[0] == status


# -- pending handshakes: per address, per /64 for IPv6 -------------------------------------


def pending_of(*, trusted: tuple[str, ...] = (), **limits: Any) -> PendingHandshakes:
    """The pending-handshake counter of a server whose cap is 2 per address."""
    config = make_config(
        {
            "limits": {"pending_handshakes_per_address": 2, **limits},
            "proxy": {"trusted": list(trusted)},
        }
    )
    return PendingHandshakes(Guard(config, audit=AuditLog(io.StringIO())))


_TOKEN_LINE = "Authorization: Bearer {token}"


@pytest.mark.parametrize(
    ("extra", "status", "reason"),
    [
        ([b"Connection:"], 400, "bad_request"),  # a field line with no element
        ([b"Connection: Upgrade, @"], 400, "bad_request"),
        ([b'Connection: Upgrade, "x"'], 400, "bad_request"),
        ([b"Upgrade: websocket\xa0"], 400, "bad_request"),  # only SP and HTAB are whitespace
        ([b"Upgrade: websocket\x85"], 400, "bad_request"),
        ([b"Sec-WebSocket-Protocol:"], 400, "bad_handshake"),
        ([b"Sec-WebSocket-Protocol: ,"], 400, "bad_handshake"),
        ([b"Sec-WebSocket-Protocol: wsguard.v1\x85"], 400, "bad_handshake"),
        ([b"Sec-WebSocket-Protocol: chat, bad token"], 400, "bad_handshake"),
        ([b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\xa0"], 400, "bad_request"),
        ([b"Upgrade: websocket/13"], 426, "not_websocket"),  # a list of protocols, not ours
        ([b"Connection: keep-alive, , Upgrade"], 101, None),  # empty elements are allowed
        ([b"Sec-WebSocket-Protocol: chat ,\twsguard.v1"], 101, None),
    ],
)
def test_upgrade_header_grammar_gets_the_same_answer_on_every_engine(
    server_factory: ServerFactory, extra: list[bytes], status: int, reason: str | None
) -> None:
    """The upgrade headers are lists of tokens (RFC 9110 §5.6.1, RFC 6455 §4.1) with
    only space and tab around elements: every engine answers what the policy decided,
    before the credential is looked at (a token is sent: the answer is the grammar's)."""
    server = server_factory({"limits": {"handshakes_per_minute": 600}})
    # Upgrade and the key are replaced; Connection and subprotocol lines are added
    replaced = {line.split(b":", 1)[0].lower() for line in extra} & {
        b"upgrade",
        b"sec-websocket-key",
    }
    base = [
        line.encode()
        for line in ("Host: 127.0.0.1", *WS_HEADERS)
        if line.split(":", 1)[0].lower().encode() not in replaced
    ]
    request = raw_request(
        "GET / HTTP/1.1", *base, *extra, _TOKEN_LINE.format(token=make_token()).encode()
    )
    head = response_head(server.port, request)
    assert status_of(head) == status, head
    if reason is not None:
        eventually(lambda: server.audit.events("handshake_refused"), what="the refusal")
        [refused] = server.audit.events("handshake_refused")
        assert (refused["status"], refused["reason"]) == (status, reason)


def test_pending_handshakes_of_one_ipv6_64_share_the_cap() -> None:
    pending = pending_of()
    assert pending.enter("2001:db8::1") is None
    assert pending.enter("2001:db8::2:3") is None
    refusal = pending.enter("2001:db8::ffff:1")  # same /64, third pending handshake
    assert refusal is not None and refusal[:2] == (429, "too_many_pending")
    assert pending.enter("2001:db8:0:1::1") is None  # the next /64 counts on its own
    pending.leave("2001:db8::1")
    assert pending.enter("2001:db8::9") is None  # a slot of the /64 came back
    assert pending.total == 3


def test_pending_handshakes_ipv4_per_address_and_mapped_addresses_alike() -> None:
    pending = pending_of()
    assert pending.enter("10.0.0.1") is None
    assert pending.enter("::ffff:10.0.0.1") is None  # the same IPv4 client
    assert pending.enter("10.0.0.1") is not None
    assert pending.enter("10.0.0.2") is None


def test_pending_handshakes_follow_the_configured_ipv6_prefix() -> None:
    pending = pending_of(ipv6_prefix_length=128)
    for _ in range(2):
        assert pending.enter("2001:db8::1") is None
    assert pending.enter("2001:db8::1") is not None
    assert pending.enter("2001:db8::2") is None  # /128: every address on its own


def test_trusted_proxies_are_exempt_from_the_per_address_cap() -> None:
    pending = pending_of(trusted=("2001:db8::/64", "10.9.0.0/16"))
    for _ in range(5):
        assert pending.enter("2001:db8::7") is None
        assert pending.enter("10.9.0.1") is None
    assert pending.total == 10


def test_pending_handshakes_are_counted_per_loopback_address(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"limits": {"pending_handshakes_per_address": 2}})
    with ExitStack() as stack:
        for _ in range(2):
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", server.port), timeout=5)
            )
            sock.sendall(b"GET / HTTP/1.1\r\n")
        assert answer(server.port, upgrade_request(token=make_token())) == 429
        other = stack.enter_context(
            socket.create_connection(
                ("127.0.0.1", server.port), timeout=5, source_address=("127.0.0.2", 0)
            )
        )
        other.sendall(upgrade_request(token=make_token()))
        assert status_of(other.recv(4096)) == 101


# -- fragments: the per-message cap, and every fragment charged to the rates -----------------


def test_max_fragments_is_validated_naming_the_key() -> None:
    assert make_config().limits.max_fragments == 4096
    with pytest.raises(ConfigError) as info:
        make_config({"limits": {"max_fragments": 0}})
    assert info.value.key == "limits.max_fragments"


def test_an_endless_fragmented_message_closes_1009_at_the_cap(
    server_factory: ServerFactory,
) -> None:
    cap = 64
    server = server_factory({"limits": {"max_fragments": cap, **UNLIMITED_RATES}})
    with raw_welcomed(server) as client:
        empty = frame(OP_CONT, b"", fin=False)
        client.send(frame(OP_TEXT, b'{"type":', fin=False) + empty * (cap - 1))
        client.send(frame(OP_PING, b"still open"))  # allowed between fragments
        assert client.read_frame() == (OP_PONG, b"still open")
        client.send(empty)  # one fragment more than the cap
        code, reason = server_close(client)
        assert (code, reason) == (1009, b"too many fragments")
    event = closed_event(server)
    assert (event["code"], event["closed_by"], event["cause"]) == (1009, "server", "too_big")


def test_the_default_cap_is_4096_fragments(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": UNLIMITED_RATES})
    with raw_welcomed(server) as client:
        client.send(frame(OP_TEXT, b"{", fin=False) + frame(OP_CONT, b"", fin=False) * 4096)
        assert server_close(client) == (1009, b"too many fragments")


def test_raising_max_fragments_lets_a_5000_fragment_message_through(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"limits": {"max_fragments": 5000, **UNLIMITED_RATES}})
    body = b'{"type":"ping","id":"many"}'
    with raw_welcomed(server) as client:
        client.send(
            frame(OP_TEXT, body[:1], fin=False)
            + frame(OP_CONT, b"", fin=False) * 4998
            + frame(OP_CONT, body[1:])
        )
        reply = client.recv_json()
    assert (reply["type"], reply["id"]) == ("pong", "many")


def test_continuation_frames_are_charged_to_the_message_rate(
    server_factory: ServerFactory,
) -> None:
    """Each fragment costs a message of the rate, like a ping does: a flood of empty
    continuation frames spends the violation budget and gets the rate-limit close."""
    server = server_factory(
        {"limits": {"messages_per_minute": 60, "message_burst": 5, "violation_budget": 3}}
    )
    with raw_welcomed(server) as client:
        client.send(frame(OP_TEXT, b"{", fin=False) + frame(OP_CONT, b"", fin=False) * 50)
        assert server_close(client)[0] == 1008
    event = closed_event(server)
    assert (event["code"], event["cause"]) == (1008, "rate_limited")


def test_a_fragmented_message_costs_one_message_per_frame(server_factory: ServerFactory) -> None:
    """Under the burst, a message in 3 fragments spends 3 of it (the message delivered)."""
    server = server_factory({"limits": {"messages_per_minute": 1, "message_burst": 4}})
    body = b'{"type":"ping","id":"a"}'
    with raw_welcomed(server) as client:
        client.send(
            frame(OP_TEXT, body[:5], fin=False)
            + frame(OP_CONT, body[5:9], fin=False)
            + frame(OP_CONT, body[9:])
        )
        assert client.recv_json()["id"] == "a"
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"b"}'))  # the 4th of the burst
        assert client.recv_json()["id"] == "b"
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"c"}'))
        refused = client.recv_json()
        assert (refused["type"], refused["code"]) == ("error", "rate_limited")


# -- reserved bits ---------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0x40, 0x20, 0x10], ids=["rsv1", "rsv2", "rsv3"])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_PING], ids=["text", "ping"])
def test_a_reserved_bit_closes_1002(server_factory: ServerFactory, bit: int, opcode: int) -> None:
    server = server_factory()
    raw = bytearray(frame(opcode, b'{"type":"ping","id":"rsv"}'))
    raw[0] |= bit
    with raw_welcomed(server) as client:
        client.send(bytes(raw))
        code, _ = server_close(client)
        assert code == 1002
        assert not client.texts, "the frame was handled"
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1002, "server")


def test_a_clients_protocol_errors_write_nothing_to_the_server_log(
    server_factory: ServerFactory,
) -> None:
    """A client sending bad frames in a loop must not fill the server log (its close is
    audited instead), nor cost a log record each: none is even built."""
    built: list[logging.LogRecord] = []
    make_record = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        built.append(record)
        return record

    logging.setLogRecordFactory(counting)
    try:
        server = server_factory()
        for bad in (b"\x8f\x80\x00\x00\x00\x00", b"\xc1\x80\x00\x00\x00\x00"):  # opcode 15, rsv1
            with raw_welcomed(server) as client:
                client.send(bad)
                code, _ = server_close(client)
                assert code == 1002
        eventually(lambda: len(server.audit.events("connection_closed")) == 2)
    finally:
        logging.setLogRecordFactory(make_record)
    engine = [r for r in built if r.name.startswith("wsguard.engine")]
    assert [r.getMessage() for r in engine if r.levelno >= logging.WARNING] == []
    assert not any(str(r.msg).startswith("WS parser error") for r in built)


# -- close frames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00",
        (999).to_bytes(2, "big"),
        (1004).to_bytes(2, "big"),
        (1005).to_bytes(2, "big"),
        (1006).to_bytes(2, "big"),
        (1015).to_bytes(2, "big"),
        (1016).to_bytes(2, "big"),
        (2999).to_bytes(2, "big"),
        (5000).to_bytes(2, "big"),
        (65535).to_bytes(2, "big") + b"bye",
        b"\x03",
    ],
    ids=["0", "999", "1004", "1005", "1006", "1015", "1016", "2999", "5000", "65535", "1-byte"],
)
def test_a_close_frame_that_must_never_be_sent_is_answered_1002(
    server_factory: ServerFactory, payload: bytes
) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(frame(OP_CLOSE, payload))
        code, _ = server_close(client)
        assert code == 1002
        assert [op for op, _ in frames_until_eof(client)] == []
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1002, "server")


def test_a_close_reason_that_is_not_utf8_is_answered_1007(server_factory: ServerFactory) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"))
        assert server_close(client)[0] == 1007
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1007, "server")


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 1014, 3000, 4001, 4999])
def test_a_valid_close_code_is_echoed(server_factory: ServerFactory, code: int) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(close_frame(code, b"done"))
        assert server_close(client)[0] == code
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (code, "client")


@pytest.mark.parametrize("code", [1000, None, 5000], ids=["1000", "no-status", "invalid"])
def test_bytes_after_the_clients_close_frame_draw_no_reset(
    server_factory: ServerFactory, code: int | None
) -> None:
    """After answering the client's close frame the server half-closes and reads on,
    discarding: bytes the client still sends (a late message, a second close) never
    meet a closed socket, whose reset would erase the close frame from the client's
    buffer (RFC 9112 §9.6). Over plain TCP, on every engine."""
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(close_frame(code))
        opcode, _ = client.read_frame()
        assert opcode == OP_CLOSE
        client.send(b"x")
        client.send(b"x")
        sock = client.sock
        deadline = time.monotonic() + 0.5  # a reset comes back within a loopback round trip
        while time.monotonic() < deadline:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0, "reset"
            select.select([], [], [], 0.02)
        assert client.sock.recv(16) == b""  # the server's end of the stream, then nothing


def test_a_close_frame_without_status_is_answered_alike_and_audited_1005(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(close_frame())
        assert server_close(client) == (None, b"")  # RFC 6455 5.5.1: no code to echo
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1005, "client")


def test_a_connection_that_ends_without_close_frame_is_audited_1006(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    client = raw_welcomed(server)
    client.sock.close()
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1006, "network")


def test_a_second_close_frame_from_the_client_is_not_answered(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(close_frame(1000, b"one") + close_frame(1001, b"two"))
        assert server_close(client)[0] == 1000
        assert frames_until_eof(client) == []
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1000, "client")


def test_close_frames_after_the_servers_close_are_not_answered(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        client.send(frame(OP_BINARY, b"\x00"))  # binary is not accepted: the server closes
        assert server_close(client)[0] == 1003
        client.send(close_frame(1003) + close_frame(1000))
        assert frames_until_eof(client) == []
    event = closed_event(server)
    assert (event["code"], event["closed_by"]) == (1003, "server")


def test_messages_after_the_clients_close_are_not_handled(server_factory: ServerFactory) -> None:
    server = server_factory()
    with raw_welcomed(server) as client:
        ping = json.dumps({"type": "ping", "id": "late"}).encode()
        client.send(close_frame(1000) + frame(OP_TEXT, ping))
        assert server_close(client)[0] == 1000
        assert frames_until_eof(client) == []


# -- messages and the client's close frame in one read -------------------------------------


def ping_frames(*idents: str) -> bytes:
    return b"".join(
        frame(OP_TEXT, json.dumps({"type": "ping", "id": ident}).encode()) for ident in idents
    )


def replies_and_close(frames: list[tuple[int, bytes]]) -> tuple[list[str], int | None]:
    """The ids of the text frames the server sent, then the code of its close frame (which
    must be the last frame it sent)."""
    assert frames, "no frame before the end of the connection"
    opcode, payload = frames[-1]
    assert opcode == OP_CLOSE, frames
    assert all(op == OP_TEXT for op, _ in frames[:-1]), frames
    ids = [json.loads(data)["id"] for _, data in frames[:-1]]
    code = int.from_bytes(payload[:2], "big") if payload else None
    return ids, code


def exchange(
    server: RunningServer, data: bytes, *, half_close: bool = False
) -> tuple[list[str], int | None]:
    """Send *data* in one write on a welcomed connection: the replies and the close code
    the server sends until the end of the connection, all within 3 s (under the server's
    close timeout of 5 s: a close held until it expires fails the read). *half_close*:
    the client ends its side right after its write."""
    with raw_welcomed(server) as client:
        client.send(data)
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        client.sock.settimeout(3)
        return replies_and_close(frames_until_eof(client))


def closed_as(server: RunningServer) -> tuple[int, str]:
    """The audited close: its code and who closed first."""
    event = closed_event(server)
    return event["code"], event["closed_by"]


def slow_pings(app: App) -> None:
    """A coroutine ping handler: it waits a little, then answers."""

    @app.on("ping")
    async def ping(conn: Connection, message: dict[str, Any]) -> None:
        for _ in range(3):
            await asyncio.sleep(0.01)
        conn.send({"type": "pong", "id": message["id"]})


def test_a_message_and_the_close_in_one_read_are_answered_in_order(
    server_factory: ServerFactory,
) -> None:
    """The message before the client's close frame is handled and its reply written
    before the close frame answers (RFC 6455 5.5.1 allows the delay): websockets handles
    a close frame while parsing the read, before the handler has the message."""
    server = server_factory()
    assert exchange(server, ping_frames("p1") + close_frame(1000)) == (["p1"], 1000)
    assert closed_as(server) == (1000, "client")


def test_several_messages_and_the_close_in_one_read_are_all_answered_in_order(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    idents = [f"p{n}" for n in range(5)]
    assert exchange(server, ping_frames(*idents) + close_frame(1000, b"bye")) == (idents, 1000)
    assert closed_as(server) == (1000, "client")


def test_a_message_the_close_and_the_end_of_the_stream_in_one_read(
    server_factory: ServerFactory,
) -> None:
    """The client half-closes right after its close frame: the message is still answered
    (TCP half-closed: the server can write), then the close frame, and the server ends
    the connection without waiting for a close timeout."""
    server = server_factory()
    sent = ping_frames("p1") + close_frame(1000)
    assert exchange(server, sent, half_close=True) == (["p1"], 1000)
    assert closed_as(server) == (1000, "client")


def test_a_coroutine_handlers_reply_goes_before_the_close_in_the_same_read(
    server_factory: ServerFactory,
) -> None:
    """A coroutine handler that waits: its reply still precedes the close frame, and the
    messages queued behind it are handled too (the close waits for them)."""
    server = server_factory(demo=False, setup=slow_pings)
    sent = ping_frames("p1", "p2", "p3") + close_frame(1001)
    assert exchange(server, sent) == (["p1", "p2", "p3"], 1001)
    assert closed_as(server) == (1001, "client")


def test_a_close_frame_that_cuts_a_fragmented_message_short_waits_for_the_messages_before(
    server_factory: ServerFactory,
) -> None:
    """The client's close frame between the fragments of a message: that message is
    dropped, the one before it still answered first, without waiting for a timeout."""
    server = server_factory(demo=False, setup=slow_pings)
    first_fragment = frame(OP_TEXT, b'{"type"', fin=False)
    sent = ping_frames("p1") + first_fragment + close_frame(1000)
    assert exchange(server, sent) == (["p1"], 1000)
    assert closed_as(server) == (1000, "client")


def test_a_handler_slower_than_the_close_timeout_does_not_hold_the_clients_close(
    server_factory: ServerFactory,
) -> None:
    """The close frame waits for the message before it at most the close timeout (5 s):
    a handler still busy then does not keep the connection open, nor its slots and its
    audit line waiting (the connection ends while the handler works on)."""
    release = asyncio.Event()  # set at the end of the test: the handler then finishes

    def setup(app: App) -> None:
        @app.on("ping")
        async def ping(conn: Connection, message: dict[str, Any]) -> None:
            await release.wait()

    server = server_factory(demo=False, setup=setup)
    try:
        with raw_welcomed(server) as client:
            client.sock.settimeout(10)  # past the close timeout: a close held for good fails
            client.send(ping_frames("p1") + close_frame(1000))
            frames = frames_until_eof(client)
        assert replies_and_close(frames) == ([], 1000)
        assert closed_as(server) == (1000, "client")
        assert server.connection_count() == 0
    finally:
        server.call(release.set)


def test_a_policy_close_on_a_message_before_the_clients_close_is_audited_as_sent(
    server_factory: ServerFactory,
) -> None:
    """A message the policy closes on (binary: 1003) and the client's close frame in one
    read: the server's close frame is the only one sent, and the audit reports it, on
    both engines (picows parses the client's close one frame ahead, before the policy
    has decided on the message before it)."""
    server = server_factory()
    assert exchange(server, frame(OP_BINARY, b"\x00\x01") + close_frame(1000)) == ([], 1003)
    assert closed_as(server) == (1003, "server")


# a reserved opcode (RFC 6455 5.2: fail the connection), after the close frame
AFTER_THE_CLOSE = frame(0x3, b"x")


def test_a_protocol_error_after_a_held_close_frame_is_discarded(
    server_factory: ServerFactory,
) -> None:
    """What follows the client's close frame is discarded, a frame that breaks the
    protocol included: while the close waits for a coroutine handler, that frame does not
    turn the answer into a 1002 nor cut the replies short."""
    server = server_factory(demo=False, setup=slow_pings)
    sent = ping_frames("p1") + close_frame(1000) + AFTER_THE_CLOSE
    assert exchange(server, sent) == (["p1"], 1000)
    assert closed_as(server) == (1000, "client")


def test_a_protocol_error_after_the_clients_close_frame_is_discarded(
    server_factory: ServerFactory,
) -> None:
    """The same with a plain handler (nothing held): the close frame is answered with its
    own code; picows, which parses one frame ahead, finds the error before it delivers
    the close frame, and wsguard answers the close frame it had parsed."""
    server = server_factory()
    sent = ping_frames("p1") + close_frame(1000) + AFTER_THE_CLOSE
    assert exchange(server, sent) == (["p1"], 1000)
    assert closed_as(server) == (1000, "client")


@pytest.mark.parametrize(
    "frames",
    [
        [frame(OP_TEXT, b'{"type":"a\xff', fin=False)],
        [frame(OP_TEXT, b'{"type":', fin=False), frame(OP_CONT, b"\xc0\xaf", fin=False)],
        [frame(OP_TEXT, b'{"t', fin=False), frame(OP_CONT, b"\xed\xa0\x80", fin=False)],
    ],
    ids=["first-fragment", "continuation", "surrogate"],
)
def test_invalid_utf8_in_a_fragment_fails_the_connection_at_once(
    server_factory: ServerFactory, frames: list[bytes]
) -> None:
    """RFC 6455 8.1: an endpoint that finds the text is not UTF-8 fails the connection;
    at the fragment that shows it, not once the client ends the message (which it may
    never do, holding up to max_message_bytes of it)."""
    server = server_factory()
    with raw_welcomed(server) as client:
        for data in frames:
            client.send(data)
        assert server_close(client)[0] == 1007
    event = closed_event(server)
    assert (event["code"], event["closed_by"], event["cause"]) == (1007, "server", "invalid_utf8")


def test_a_character_split_across_fragments_is_one_character(server_factory: ServerFactory) -> None:
    server = server_factory()
    text = '{"type":"ping","id":"κ€😀"}'.encode()
    cut = text.index("€".encode()) + 1  # inside the euro sign's three bytes
    with raw_welcomed(server) as client:
        client.send(frame(OP_TEXT, text[: cut - 2], fin=False))
        client.send(frame(OP_CONT, text[cut - 2 : cut], fin=False))
        client.send(frame(OP_CONT, text[cut:], fin=True))
        opcode, payload = client.read_frame()
        assert opcode == OP_TEXT
        assert json.loads(payload)["id"] == "κ€😀"
