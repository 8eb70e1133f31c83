"""What a hostile client can hold, on both standalone engines (and so the gateway).

Raw sockets against real servers (``server_factory``: websockets and picows): a
connection failed by the frame parser is dropped at the close timeout however long the
client keeps its side open; a refused handshake's answer survives the data sent behind
the request; a message over ``limits.max_message_bytes`` in fragments is refused from
the header of the continuation frame that crosses it, before its payload arrives.
"""

from __future__ import annotations

import functools
import socket
import struct
from typing import Any

import pytest

from conftest import (
    RunningServer,
    ServerFactory,
    eventually,
    make_token,
    status_of,
    upgrade_request,
)
from support.wire import OP_CLOSE, OP_CONT, OP_TEXT, RawClient, frame, raw_welcomed

#: the close timeout of both engines: how long a closing client may keep its socket
CLOSE_TIMEOUT = 5.0
#: scheduling slack on top of it (a loaded machine running tests in parallel)
SLACK = 3.0


def _close_code(client: RawClient) -> int:
    """The code of the server's close frame (the frames before it skipped)."""
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_CLOSE:
            return int.from_bytes(payload[:2], "big")


def _reset(sock: socket.socket) -> bool:
    """Whether the server has let go of the socket: a byte sent draws a reset (while
    it is held, half-closed, the byte is read and dropped, and nothing comes back)."""
    sock.setblocking(False)
    try:
        sock.send(b"\0")
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        pass
    return False


def _closed(server: RunningServer, count: int) -> list[dict[str, Any]] | None:
    """The audit's connection_closed records, once there are *count* of them."""
    events = server.audit.events("connection_closed")
    return events if len(events) >= count else None


# -- 1. a connection failed by the frame parser ---------------------------------------

#: framing errors, each after its connection is open: (the bytes, the close code)
FRAMING_ERRORS: dict[str, tuple[bytes, int]] = {
    "unmasked": (bytes((0x80 | OP_TEXT, 1)) + b"x", 1002),
    "rsv1": (bytes([0xC0 | OP_TEXT]) + frame(OP_TEXT, b"x")[1:], 1002),
    "close 1005": (frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "over the size": (frame(OP_TEXT, b"", length=4096)[:8], 1009),
}


def test_a_failed_connection_is_dropped_at_the_close_timeout(
    server_factory: ServerFactory,
) -> None:
    """The client keeps TCP open and never answers the close frame: its socket and its
    slots are given back at the close timeout, not at the next heartbeat (set far off
    here), with the parser's close code and cause in the audit log."""
    count = len(FRAMING_ERRORS)
    server = server_factory(
        {
            "limits": {"max_message_bytes": 1024, "connections_per_address": count},
            "liveness": {"ping_interval_seconds": 120, "ping_timeout_seconds": 60},
        }
    )
    clients = [raw_welcomed(server, make_token(f"user{i}")) for i in range(count)]
    try:
        codes = []
        for client, (data, _) in zip(clients, FRAMING_ERRORS.values(), strict=True):
            client.send(data)
            codes.append(_close_code(client))
        assert codes == [code for _, code in FRAMING_ERRORS.values()]
        events = eventually(
            lambda: _closed(server, count), timeout=CLOSE_TIMEOUT + SLACK, what="every close"
        )
        assert sorted((e["code"], e["closed_by"], e["cause"]) for e in events) == sorted(
            (code, "server", "protocol_error" if code == 1002 else "too_big")
            for _, code in FRAMING_ERRORS.values()
        )
        assert all(e["duration_s"] < CLOSE_TIMEOUT + SLACK for e in events)
        for client in clients:  # the sockets are closed, not only counted as closed
            eventually(functools.partial(_reset, client.sock), timeout=2, what="a reset")
        # the address's connection slots are back: a new connection is admitted
        with raw_welcomed(server, make_token("next")) as fresh:
            assert fresh.sock.fileno() >= 0
    finally:
        for client in clients:
            client.sock.close()


# -- 3. a refused handshake's answer is not erased by a reset -------------------------

#: how long a refused socket is kept at most for what the client still sends
REFUSAL_LINGER = 2.0

#: refused requests: (the request, the status): by the policy, and by the screening of
#: the request head before it
REFUSED = {
    "policy": (upgrade_request(), 401),
    "screening": (upgrade_request().replace(b"GET", b"PUT", 1), 405),
}


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it ends its side (a reset fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("refused", REFUSED.values(), ids=REFUSED.keys())
def test_a_refusal_reaches_a_client_that_sent_more_behind_its_request(
    server_factory: ServerFactory, refused: tuple[bytes, int]
) -> None:
    """Frames sent behind a refused request (more than one read of them) are read and
    dropped, so closing the socket does not reset the connection and erase the answer;
    a client that then keeps its side open is let go within a bound."""
    server = server_factory()
    request, status = refused
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request + b"\x81\x80abcd" * 11_000)  # 66,000 bytes of empty frames
        answer = _answer(sock)
        assert status_of(answer) == status
        assert answer.endswith(b".\n")  # the whole body (its length is in the head)
        eventually(functools.partial(_reset, sock), timeout=REFUSAL_LINGER + SLACK, what="let go")


def test_a_client_over_the_pending_handshakes_gets_its_503(
    server_factory: ServerFactory,
) -> None:
    """With every pending-handshake place taken, a client that sends its request at once
    gets the 503, not a reset."""
    server = server_factory({"limits": {"max_pending_handshakes": 3}})
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        line = b"GET / HTTP/1.1\r\n"
        for sock in held:
            sock.sendall(line)
        metrics = server.app.guard.monitor.metrics
        eventually(  # read by the server: each is a pending handshake (from its accept)
            lambda: server.call(lambda: metrics.bytes_in) >= 3 * len(line),
            what="three pending handshakes",
        )
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(upgrade_request(token=make_token()))
                answer = _answer(sock)
                assert status_of(answer) == 503
                assert b"Retry-After: 1\r\n" in answer
    finally:
        for sock in held:
            sock.close()


# -- 2. a continuation frame over the message size ------------------------------------

#: a small message size, so that a continuation frame can cross it
MAX_MESSAGE = 8192


def _continuation_head(length: int) -> bytes:
    """The header (and mask) of a final continuation frame announcing *length* bytes."""
    return frame(OP_CONT, b"", length=length)


def _pong_after(client: RawClient, data: bytes) -> None:
    """Send *data*, then a ping; return once its pong is back: the server has read and
    handled *data* (the next bytes arrive in a read of their own)."""
    client.send(data + frame(0x9, b"sync"))
    while True:
        opcode, payload = client.read_frame()
        if opcode == 0xA and payload == b"sync":
            return
        assert opcode != OP_CLOSE, payload


def test_a_continuation_over_the_size_is_refused_from_its_header(
    server_factory: ServerFactory,
) -> None:
    """A message in fragments up to the limit exactly (in reads of their own, a ping
    between two, the last one in two writes) passes; then 4,000 bytes of a message and
    a continuation frame announcing 5,000 more (the limit: 8,192): the 1009 comes once
    its header is there, not its payload."""
    server = server_factory({"limits": {"max_message_bytes": MAX_MESSAGE}})
    message = b'{"type":"ping","id":"' + b"x" * (MAX_MESSAGE - 23) + b'"}'
    assert len(message) == MAX_MESSAGE
    last = frame(OP_CONT, message[6000:])
    with raw_welcomed(server) as client:
        _pong_after(client, frame(OP_TEXT, message[:3000], fin=False))
        _pong_after(client, frame(OP_CONT, message[3000:6000], fin=False))
        client.send(last[:100])
        client.send(last[100:])
        assert client.recv_json()["type"] in ("pong", "error")  # handled, not closed

        _pong_after(client, frame(OP_TEXT, b"a" * 4000, fin=False))
        client.send(_continuation_head(5000) + b"a" * 100)
        assert _close_code(client) == 1009


def test_a_continuation_over_the_size_is_refused_before_its_end(
    server_factory: ServerFactory,
) -> None:
    """The header of the continuation frame in the same write as the frame before it:
    refused at the latest once the bytes received of it cross the limit, without
    waiting for the rest of it (a client that stalls there holds nothing more)."""
    server = server_factory({"limits": {"max_message_bytes": MAX_MESSAGE}})
    with raw_welcomed(server) as client:
        first = frame(OP_TEXT, b"a" * 4000, fin=False)
        client.send(first + _continuation_head(5000) + b"a" * 100)
        client.send(b"a" * 4899)  # all of it but its last byte
        assert _close_code(client) == 1009
        # the server's parser is inside the frame: a close frame would be read as its
        # payload; the client's end of the stream ends it now (not at the close timeout)
        client.sock.shutdown(socket.SHUT_WR)
        closed = eventually(lambda: _closed(server, 1), what="the close audited")
        assert (closed[0]["code"], closed[0]["cause"]) == (1009, "too_big")


def test_a_continuation_over_the_size_held_whole_in_one_read_is_refused(
    server_factory: ServerFactory,
) -> None:
    """The first fragment, the continuation's header and more of its bytes than the
    limit allows, all in one read, then nothing: refused without waiting for a read that
    never comes."""
    server = server_factory({"limits": {"max_message_bytes": 2048}})
    with raw_welcomed(server) as client:
        first = frame(OP_TEXT, b"a" * 1000, fin=False)
        client.send(first + _continuation_head(5000) + b"a" * 1100)
        assert _close_code(client) == 1009
        # the server's parser is inside the frame: a close frame would be read as its
        # payload; the client's end of the stream ends it now (not at the close timeout)
        client.sock.shutdown(socket.SHUT_WR)
        closed = eventually(lambda: _closed(server, 1), what="the close audited")
        assert (closed[0]["code"], closed[0]["cause"]) == (1009, "too_big")
