"""Connection lifetime, liveness and back-pressure (issue 3).

Token expiry and in-band refresh, maximum lifetime, idle timeout, server
heartbeats, the bounded outbound queue (slow consumers), ``Connection.close()``
(refusing codes and reasons that cannot go on the wire), graceful shutdown (with
``drain_seconds = 0`` too), and the ``connection_closed`` audit record every close
leaves behind.

Everything runs against a real server on a loopback port; clients that must
misbehave at the protocol level (never answer pings, never read) are raw
sockets. Timing is driven by short configured limits and blocking waits with
timeouts, never by fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import (
    AuditCapture,
    RunningServer,
    ServerFactory,
    make_config,
    make_token,
    status_of,
    upgrade_request,
)
from support.paths import WSGUARD
from support.wire import OP_CLOSE
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog
from wsguard.session import Connection

# How early a timed close may arrive and still count as "at" its deadline
# (timer granularity; the deadline itself is computed from wall-clock time).
EARLY_MARGIN = 0.25

# Per-connection and per-subject message limits high enough for the floods
# some tests need to create on purpose.
HIGH_RATE_LIMITS: dict[str, Any] = {
    "messages_per_minute": 1_000_000,
    "message_burst": 100_000,
    "bytes_per_minute": 1_000_000_000,
    "subject_messages_per_minute": 1_000_000,
    "subject_bytes_per_minute": 1_000_000_000,
}


# -- helpers -----------------------------------------------------------------------------


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=timeout))
    assert isinstance(frame, dict), frame
    return frame


def welcomed(ws: ClientConnection) -> dict[str, Any]:
    """Consume the welcome frame and return it."""
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


def wait_close(ws: ClientConnection, timeout: float) -> tuple[int | None, float, list[Any]]:
    """Block until the server closes *ws*: (close code received, wall time, frames before)."""
    deadline = time.monotonic() + timeout
    frames: list[Any] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"connection still open after {timeout} s; frames: {frames!r}")
        try:
            frames.append(ws.recv(timeout=remaining))
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), time.time(), frames


def assert_stays_open(ws: ClientConnection, until: float) -> None:
    """Nothing (in particular no close) arrives on *ws* before wall time *until*."""
    remaining = until - time.time()
    if remaining <= 0:
        return
    try:
        got = ws.recv(timeout=remaining)
    except TimeoutError:
        return
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        pytest.fail(f"closed ({code}) {until - time.time():.3f} s before it was allowed to")
    pytest.fail(f"unexpected frame while waiting: {got!r}")


def ping_pong(ws: ClientConnection, ident: str | int, timeout: float = 2.0) -> float:
    """Send a demo ping, require the matching pong within *timeout*; return the latency."""
    sent = time.monotonic()
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = recv_json(ws, timeout=timeout)
    assert pong["type"] == "pong", pong
    assert pong["id"] == ident
    return time.monotonic() - sent


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded poll of *condition* (for server-side state with no event to wait on)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.02)


def closed_events(server: RunningServer, connection_id: str) -> list[dict[str, Any]]:
    return [
        e for e in server.audit.events("connection_closed") if e["connection_id"] == connection_id
    ]


def closed_event(server: RunningServer, connection_id: str, timeout: float = 8.0) -> dict[str, Any]:
    """The single ``connection_closed`` audit event of *connection_id* (waits for it)."""
    wait_until(
        lambda: bool(closed_events(server, connection_id)),
        timeout,
        f"connection_closed of {connection_id}",
    )
    events = closed_events(server, connection_id)
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event["code"], int)
    assert isinstance(event["duration_s"], (int, float)) and event["duration_s"] >= 0
    assert isinstance(event["messages_in"], int) and event["messages_in"] >= 0
    return event


def exp_in(seconds: float) -> int:
    """An integer ``exp`` at least *seconds* - 1 and at most *seconds* from now."""
    return math.floor(time.time()) + math.ceil(seconds)


class RawClient:
    """A WebSocket client on a bare socket: it does only what the test tells it to."""

    def __init__(self, port: int, token: str, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(upgrade_request(token=token))
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"EOF during the handshake: {self.buffer!r}"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = status_of(head)

    def _fill(self, size: int, deadline: float) -> bool:
        """Read until *size* bytes are buffered; False on EOF/reset."""
        while len(self.buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from the server in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self.buffer += chunk
        return True

    def read_frame(self, deadline: float) -> tuple[int, bytes] | None:
        """The next (opcode, payload) from the server, None at EOF. Never answers pings."""
        if not self._fill(2, deadline):
            return None
        first, second = self.buffer[0], self.buffer[1]
        assert second & 0x80 == 0, "server frames must not be masked"
        length, offset = second & 0x7F, 2
        if length == 126:
            if not self._fill(4, deadline):
                return None
            (length,) = struct.unpack("!H", self.buffer[2:4])
            offset = 4
        elif length == 127:
            if not self._fill(10, deadline):
                return None
            (length,) = struct.unpack("!Q", self.buffer[2:10])
            offset = 10
        if not self._fill(offset + length, deadline):
            return None
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return first & 0x0F, payload

    def close(self) -> None:
        self.sock.close()


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read an HTTP response head; return it and whatever followed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class FrameReader:
    """Reads unmasked server frames from a raw socket (never answers anything)."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buf = buffered

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the TCP connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b0 & 0x0F, self._read(n)

    def close_code(self) -> int:
        """Skip data frames until the server's close frame; return its code."""
        while True:
            opcode, payload = self.frame()
            if opcode == OP_CLOSE:
                assert len(payload) >= 2, payload
                return int.from_bytes(payload[:2], "big")

    def wait_eof(self) -> None:
        """Block (the socket timeout applies) until the server drops the TCP connection."""
        while True:
            try:
                if not self.sock.recv(65536):
                    return
            except ConnectionResetError:
                return


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


# -- token expiry and refresh ----------------------------------------------------------------


def test_expired_token_closes_connection_with_4001_at_exp(server_factory: ServerFactory) -> None:
    server = server_factory()
    exp = exp_in(2)
    with server.connect(make_token("alice", exp=exp)) as ws:
        welcome = welcomed(ws)
        assert welcome["expires_at"] == exp
        code, closed_at, frames = wait_close(ws, timeout=6)
    assert code == 4001
    assert frames == []
    assert closed_at >= exp - EARLY_MARGIN, f"closed {exp - closed_at:.3f} s before exp"
    assert closed_at <= exp + 1.5, f"closed {closed_at - exp:.3f} s after exp"
    event = closed_event(server, welcome["connection_id"])
    assert event["code"] == 4001
    assert event["cause"] == "token_expired"


def test_expiry_waits_for_the_configured_leeway(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"leeway_seconds": 1}})
    exp = exp_in(1)  # accepted at the handshake even if already past: leeway
    with server.connect(make_token("alice", exp=exp)) as ws:
        welcome = welcomed(ws)
        code, closed_at, _ = wait_close(ws, timeout=7)
    assert code == 4001
    assert closed_at > exp, "closed before exp despite the leeway"
    assert closed_at >= exp + 1 - EARLY_MARGIN, f"closed {closed_at - exp:.3f} s after exp"
    assert closed_at <= exp + 2.5
    assert closed_event(server, welcome["connection_id"])["code"] == 4001


def test_refresh_with_new_token_extends_the_deadline(server_factory: ServerFactory) -> None:
    server = server_factory()
    old_exp = exp_in(2)
    new_exp = int(time.time()) + 3600
    with server.connect(make_token("alice", exp=old_exp)) as ws:
        welcome = welcomed(ws)
        assert welcome["expires_at"] == old_exp
        ws.send(json.dumps({"type": "auth", "token": make_token("alice", exp=new_exp), "id": "r"}))
        reply = recv_json(ws)
        assert reply == {"type": "auth_ok", "ref": "r", "expires_at": new_exp}
        # The old deadline passes without a close (or any other frame) ...
        assert_stays_open(ws, until=old_exp + 0.5)
        # ... and the connection still works afterwards.
        assert time.time() > old_exp
        ping_pong(ws, "after-old-exp")
    assert closed_event(server, welcome["connection_id"])["code"] == 1000


def test_refresh_with_token_without_exp_cancels_the_old_deadline(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"auth": {"require_exp": False}})
    old_exp = exp_in(2)
    with server.connect(make_token("alice", exp=old_exp)) as ws:
        welcomed(ws)
        ws.send(json.dumps({"type": "auth", "token": make_token("alice", exp=None), "id": "r"}))
        assert recv_json(ws) == {"type": "auth_ok", "ref": "r", "expires_at": None}
        assert_stays_open(ws, until=old_exp + 0.5)
        ping_pong(ws, "after-old-exp")


def test_refresh_for_another_subject_closes_with_1008(server_factory: ServerFactory) -> None:
    server = server_factory()
    with server.connect(make_token("alice", ttl=60)) as ws:
        welcome = welcomed(ws)
        ws.send(json.dumps({"type": "auth", "token": make_token("mallory", jti="m-1"), "id": "x"}))
        code, _, frames = wait_close(ws, timeout=5)
    assert code == 1008
    assert not any("auth_ok" in str(f) for f in frames), frames
    event = closed_event(server, welcome["connection_id"])
    assert event["code"] == 1008
    assert event["cause"] == "auth_subject_mismatch"
    assert event["subject"] == "alice"
    # the security event says which connection, from where, and which token
    [refused] = server.audit.events("token_refresh_refused")
    assert refused["reason"] == "subject_mismatch"
    assert refused["connection_id"] == welcome["connection_id"]
    assert refused["client"] == "127.0.0.1"
    assert (refused["subject"], refused["token_id"]) == ("alice", "m-1")


BAD_REFRESH_TOKENS = {
    "bad-signature": make_token("alice", secret="another-secret-that-is-long-enough-0123456789"),
    "expired": make_token("alice", ttl=-120),
    "garbage": "not.a.jwt",
}


def test_invalid_refresh_is_refused_and_original_expiry_still_applies(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    exp = exp_in(2)
    with server.connect(make_token("alice", exp=exp)) as ws:
        welcome = welcomed(ws)
        for name, bad_token in BAD_REFRESH_TOKENS.items():
            ws.send(json.dumps({"type": "auth", "token": bad_token, "id": name}))
            error = recv_json(ws)
            assert error["type"] == "error", name
            assert error["code"] == "invalid_token", name
            assert error["ref"] == name
            assert bad_token not in json.dumps(error)
            ping_pong(ws, f"alive-after-{name}")
        code, closed_at, frames = wait_close(ws, timeout=6)
    assert code == 4001
    assert frames == []
    assert closed_at >= exp - EARLY_MARGIN, f"closed {exp - closed_at:.3f} s before exp"
    assert closed_at <= exp + 1.5
    event = closed_event(server, welcome["connection_id"])
    assert event["code"] == 4001
    assert event["cause"] == "token_expired"


# -- lifetime, idle, heartbeat ------------------------------------------------------------------


def test_max_lifetime_closes_with_1001(server_factory: ServerFactory) -> None:
    server = server_factory({"liveness": {"max_lifetime_seconds": 1}})
    with server.connect() as ws:
        opened = time.monotonic()
        welcome = welcomed(ws)
        ping_pong(ws, 1)  # activity does not extend the lifetime
        code, _, _ = wait_close(ws, timeout=5)
        elapsed = time.monotonic() - opened
    assert code == 1001
    assert 1 - EARLY_MARGIN <= elapsed <= 2.5, elapsed
    event = closed_event(server, welcome["connection_id"])
    assert event["code"] == 1001
    assert event["cause"] == "max_lifetime"


def test_idle_timeout_closes_silent_connection_but_not_active_one(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"liveness": {"idle_timeout_seconds": 1}})
    with server.connect(make_token("quiet")) as silent, server.connect(make_token("busy")) as busy:
        opened = time.monotonic()
        silent_id = welcomed(silent)["connection_id"]
        busy_id = welcomed(busy)["connection_id"]
        pace = threading.Event()
        count = 0
        while time.monotonic() - opened < 2.2:
            ping_pong(busy, count)
            count += 1
            pace.wait(0.3)
        # the active connection is still open past twice the idle timeout
        ping_pong(busy, "last")
        # the silent one was closed after about one idle period
        code, _, frames = wait_close(silent, timeout=1)
        assert code == 1001
        assert frames == []
    event = closed_event(server, silent_id)
    assert event["code"] == 1001
    assert event["cause"] == "idle_timeout"
    assert 1 - EARLY_MARGIN <= event["duration_s"] <= 2.0, event
    assert event["messages_in"] == 0
    busy_event = closed_event(server, busy_id)
    assert busy_event["code"] == 1000
    assert busy_event["messages_in"] == count + 1


# the healthy client's pongs must arrive within the timeout: 1 s, for a loaded CI machine
HEARTBEAT = {"liveness": {"ping_interval_seconds": 0.5, "ping_timeout_seconds": 1.0}}


def read_until_eof(client: RawClient, timeout: float) -> tuple[list[int], int | None, str | None]:
    """Read frames (never answering pings) until EOF, then close like a real client would.

    Returns the opcodes seen, the close code of the close frame, the connection id of
    the welcome frame.
    """
    deadline = time.monotonic() + timeout
    opcodes: list[int] = []
    close_code: int | None = None
    connection_id: str | None = None
    while (frame := client.read_frame(deadline)) is not None:
        opcode, payload = frame
        opcodes.append(opcode)
        if opcode == 0x1 and connection_id is None:
            connection_id = json.loads(payload)["connection_id"]
        elif opcode == 0x8:
            assert len(payload) >= 2, payload
            (close_code,) = struct.unpack("!H", payload[:2])
    client.close()
    return opcodes, close_code, connection_id


def test_heartbeat_closes_client_that_never_answers_pings(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    server = server_factory(HEARTBEAT)
    with server.connect(make_token("healthy")) as healthy:
        opened = time.time()
        healthy_id = welcomed(healthy)["connection_id"]

        deaf = RawClient(server.port, make_token("deaf"))
        raw_clients.append(deaf)
        assert deaf.status == 101
        started = time.monotonic()
        opcodes, close_code, deaf_id = read_until_eof(deaf, timeout=5)
        assert 0x9 in opcodes, f"the server never pinged: {opcodes}"
        assert 0x8 in opcodes, f"EOF without a close frame: {opcodes}"
        assert close_code == 1011
        # one interval plus one timeout, with slack for the event loop
        assert time.monotonic() - started < 4

        # a client that answers pings (websockets does it automatically) stays open
        assert_stays_open(healthy, until=opened + 2.2)
        ping_pong(healthy, "alive")
    assert deaf_id is not None
    deaf_event = closed_event(server, deaf_id)
    assert deaf_event["messages_in"] == 0
    assert deaf_event["duration_s"] < 4, deaf_event
    wait_until(lambda: server.connection_count() == 0, 5, "both connections to be released")
    assert closed_event(server, healthy_id)["code"] == 1000


def test_heartbeat_close_is_audited_with_1011(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    server = server_factory(HEARTBEAT)
    deaf = RawClient(server.port, make_token("deaf"))
    raw_clients.append(deaf)
    _, close_code, deaf_id = read_until_eof(deaf, timeout=5)
    assert close_code == 1011
    assert deaf_id is not None
    assert closed_event(server, deaf_id)["code"] == 1011


# -- back-pressure -------------------------------------------------------------------------------


def test_slow_consumer_is_dropped_without_stalling_others(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    server = server_factory({"limits": {"outbound_queue": 8, **HIGH_RATE_LIMITS}})
    with (
        server.connect(make_token("alice")) as sender,
        server.connect(make_token("carol")) as reader,
    ):
        welcomed(sender)
        welcomed(reader)
        slow = RawClient(server.port, make_token("bob"), rcvbuf=4096)  # never reads again
        raw_clients.append(slow)
        assert slow.status == 101
        wait_until(lambda: server.connection_count() == 3, 5, "three connections")
        slow_id = next(
            c.id
            for c in server.call(lambda: list(server.app.connections.values()))
            if c.subject == "bob"
        )

        filler = "x" * 1990
        received = 0
        pong_latencies: list[float] = []
        dropped_at: int | None = None
        sent = 0
        while sent < 6000 and (dropped_at is None or sent < dropped_at + 50):
            sender.send(json.dumps({"type": "chat", "id": sent, "text": f"{sent:08d}{filler}"}))
            got = recv_json(reader, timeout=2)  # every broadcast, promptly and in order
            assert got["type"] == "broadcast"
            assert got["from"] == "alice"
            assert got["message"]["id"] == sent
            assert got["message"]["text"].startswith(f"{sent:08d}")
            received += 1
            sent += 1
            if sent % 50 == 0:
                pong_latencies.append(ping_pong(reader, f"p{sent}", timeout=2))
                if dropped_at is None and server.audit.events("slow_consumer"):
                    dropped_at = sent
        assert dropped_at is not None, f"no slow_consumer after {sent} broadcasts"
        assert received == sent
        assert max(pong_latencies) < 2.0, pong_latencies

        slow_events = server.audit.events("slow_consumer")
        assert len(slow_events) == 1, slow_events
        assert slow_events[0]["connection_id"] == slow_id
        assert slow_events[0]["subject"] == "bob"
        # the dropped client's state is gone: only the two healthy clients remain
        wait_until(lambda: server.connection_count() == 2, 5, "the slow client to be dropped")
        event = closed_event(server, slow_id)
        assert event["cause"] == "slow_consumer"
        ping_pong(reader, "after-drop")


def test_slow_consumer_close_is_audited_with_1008(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    server = server_factory({"limits": {"outbound_queue": 8, **HIGH_RATE_LIMITS}})
    with server.connect(make_token("alice")) as sender:
        welcomed(sender)
        slow = RawClient(server.port, make_token("bob"), rcvbuf=4096)
        raw_clients.append(slow)
        wait_until(lambda: server.connection_count() == 2, 5, "two connections")
        filler = "x" * 1990
        for i in range(6000):
            sender.send(json.dumps({"type": "chat", "id": i, "text": f"{i:08d}{filler}"}))
            if i % 50 == 49:
                ping_pong(sender, i)  # pace the sender on the server's progress
                if server.audit.events("slow_consumer"):
                    break
        slow_id = server.audit.events("slow_consumer")[0]["connection_id"]
        event = closed_event(server, slow_id)
    assert event["code"] == 1008


# -- closing a connection from the application ----------------------------------------------


def only_connection(server: RunningServer) -> Connection:
    conns = server.call(lambda: list(server.app.connections.values()))
    assert len(conns) == 1, conns
    conn = conns[0]
    assert isinstance(conn, Connection)
    return conn


def expect_close(ws: ClientConnection, timeout: float = 5) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=timeout)
    assert info.value.rcvd is not None, "the server sent no close frame"
    return int(info.value.rcvd.code), info.value.rcvd.reason


@pytest.mark.parametrize("code", [1005, 1006, 1015, 1004, 999, 0, 2999, 5000, 65535, -1])
def test_close_refuses_codes_that_cannot_be_sent(server: RunningServer, code: int) -> None:
    with server.connect_welcomed() as ws:
        conn = only_connection(server)
        with pytest.raises(ValueError, match=f"close code {code} "):
            server.run_coro(conn.close(code, "nope"))
        # nothing went on the wire and the connection is not left half-closed
        assert server.call(lambda: conn.closing) is False
        ping_pong(ws, "still-open")
        server.run_coro(conn.close(4000, "valid"))
        assert expect_close(ws) == (4000, "valid")


def test_close_refuses_reasons_over_123_bytes(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        conn = only_connection(server)
        for reason in ("x" * 124, "\u00e9" * 62, "x" * 1000):  # 124 bytes of UTF-8 in 62 chars
            with pytest.raises(ValueError, match="123 bytes"):
                server.run_coro(conn.close(1000, reason))
            assert server.call(lambda: conn.closing) is False
            ping_pong(ws, f"still-open-{len(reason)}")
        longest = "\u00e9" * 61 + "x"  # exactly 123 bytes
        server.run_coro(conn.close(1000, longest))
        assert expect_close(ws) == (1000, longest)


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 1014, 3000, 4999])
def test_close_accepts_every_sendable_code(server: RunningServer, code: int) -> None:
    with server.connect_welcomed() as ws:
        server.run_coro(only_connection(server).close(code, "bye"))
        assert expect_close(ws) == (code, "bye")


# -- shutdown ---------------------------------------------------------------------------------


def test_stop_closes_every_client_with_1001(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_factory()
    # App.stop closes the audit stream; keep the in-memory capture readable afterwards.
    monkeypatch.setattr(server.audit, "close", lambda: None)
    with server.connect(make_token("alice")) as a, server.connect(make_token("bob")) as b:
        ids = [welcomed(a)["connection_id"], welcomed(b)["connection_id"]]
        ping_pong(a, 1)
        server.stop()
        for ws in (a, b):
            code, _, frames = wait_close(ws, timeout=5)
            assert code == 1001
            assert frames == []
    for connection_id in ids:
        assert closed_event(server, connection_id)["code"] == 1001
    with pytest.raises((ConnectionRefusedError, OSError)):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_draining_refuses_new_handshakes_with_503(server_factory: ServerFactory) -> None:
    server = server_factory()
    with server.connect_welcomed(make_token("alice")) as existing:
        server.call(lambda: setattr(server.app.guard.handshakes, "draining", True))
        with pytest.raises(InvalidStatus) as refused:
            server.connect(make_token("bob"))
        assert refused.value.response.status_code == 503
        # connections already open are not affected by draining
        ping_pong(existing, "still-served")
    refusals = server.audit.events("handshake_refused")
    assert [e.get("reason") for e in refusals] == ["draining"], refusals


class KeptAudit(AuditCapture):
    """An audit capture that stays readable after the server closes its audit log."""

    def close(self) -> None:
        pass


class LingeringServer(RunningServer):
    """A RunningServer whose event loop outlives the app until :meth:`finish`.

    The app runs as in RunningServer (``App.serve()``, its cleanup included), but the
    loop keeps running after ``App.stop()`` -- as in a process embedding the app -- so
    a handshake accepted before the stop is still answered after it.
    """

    def __init__(self, app: App, audit: AuditCapture) -> None:
        super().__init__(app, audit)
        self._finish = asyncio.Event()

    async def _main(self) -> None:
        await super()._main()  # start, then serve until stopped
        await self._finish.wait()

    async def _wind_down(self) -> None:
        await self.app.stop()  # a no-op once stopped
        self._finish.set()

    def finish(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._wind_down(), self.loop)
            self._done.result(timeout=30)


@pytest.fixture
def lingering_server() -> Iterator[LingeringServer]:
    audit = KeptAudit()
    config = make_config({"liveness": {"drain_seconds": 0}})
    app = App(guard=Guard(config, audit=AuditLog(audit)))
    install_demo(app)
    server = LingeringServer(app, audit)
    server.start()
    yield server
    server.finish()


def test_drain_zero_closes_promptly_with_1001_and_refuses_handshakes_with_503(
    lingering_server: LingeringServer,
) -> None:
    server = lingering_server
    port = server.port
    # a handshake in progress: accepted, its request not complete yet
    pending = socket.create_connection(("127.0.0.1", port), timeout=5)
    pending.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # a client that never answers the closing handshake (raw socket, never writes again)
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    polite: ClientConnection | None = None
    try:
        silent.sendall(upgrade_request(token=make_token("silent")))
        head, rest = read_head(silent)
        assert status_of(head) == 101, head[:200]
        polite = server.connect_welcomed(make_token("polite"))
        wait_until(lambda: server.connection_count() == 2, 5.0, "two admitted connections")

        started = time.monotonic()
        server.run_coro(server.app.stop())
        elapsed = time.monotonic() - started
        # drain_seconds = 0: no waiting for the silent client's close frame
        assert elapsed < 2.0, f"stop() took {elapsed:.2f}s with drain_seconds = 0"

        assert expect_close(polite)[0] == 1001
        reader = FrameReader(silent, rest)
        assert reader.close_code() == 1001
        reader.wait_eof()  # dropped, not left open for close_timeout

        # the handshake that was still in progress is refused by the draining policy
        pending.sendall(
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {make_token('late')}\r\n\r\n".encode()
        )
        late_head, _ = read_head(pending)
        assert status_of(late_head) == 503, late_head[:200]
        wait_until(
            lambda: any(
                e["reason"] == "draining" for e in server.audit.events("handshake_refused")
            ),
            5.0,
            "the draining refusal in the audit log",
        )
        # and the listener is gone: nothing new is accepted
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        wait_until(
            lambda: len(server.audit.events("connection_closed")) == 2,
            5.0,
            "both connections audited as closed",
        )
        codes = sorted(
            (e["subject"], e["code"], e["closed_by"])
            for e in server.audit.events("connection_closed")
        )
        assert codes == [("polite", 1001, "server"), ("silent", 1001, "server")]
    finally:
        pending.close()
        silent.close()
        if polite is not None:
            polite.close()


def _read_port(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Read the server's stderr until it announces its port."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                continue
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                return int(match.group(1)), seen
    pytest.fail(f"no 'listening on' line from wsguard serve; stderr: {seen!r}")


def test_sigterm_closes_clients_with_1001_and_exits_0(tmp_path: Path) -> None:
    secret = "subprocess-secret-0123456789-abcdefghijklmnop"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "WSGUARD_JWT_SECRET": secret,
    }
    audit_path = tmp_path / "audit.jsonl"
    with audit_path.open("w") as audit_out:
        proc = subprocess.Popen(
            [WSGUARD, "serve", "--port", "0"],
            env=env,
            cwd=tmp_path,
            stdout=audit_out,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            port, _ = _read_port(proc, timeout=15)
            token = make_token("alice", secret=secret)
            with connect(
                f"ws://127.0.0.1:{port}/",
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=10,
            ) as ws:
                welcome = recv_json(ws)
                assert welcome["type"] == "welcome"
                ping_pong(ws, 1)
                proc.send_signal(signal.SIGTERM)
                code, _, frames = wait_close(ws, timeout=10)
                assert code == 1001
                assert frames == []
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            assert proc.stderr is not None
            proc.stderr.close()
    events = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
    closed = [e for e in events if e.get("event") == "connection_closed"]
    assert len(closed) == 1, events
    assert closed[0]["connection_id"] == welcome["connection_id"]
    assert closed[0]["code"] == 1001


# -- audit of every close ------------------------------------------------------------------------


def test_every_close_writes_one_connection_closed_event(server: RunningServer) -> None:
    started = time.monotonic()
    with server.connect(make_token("alice")) as ws:
        welcome = welcomed(ws)
        ping_pong(ws, 1)
        ws.send(json.dumps({"type": "chat", "text": "hi"}))
        ws.send("{not json")
        assert recv_json(ws)["code"] == "invalid_json"
        ping_pong(ws, 2)
    event = closed_event(server, welcome["connection_id"])
    assert event["code"] == 1000
    assert event["subject"] == "alice"
    assert event["messages_in"] == 4
    assert 0 < event["duration_s"] <= time.monotonic() - started
    # a second, server-side close also produces exactly one event
    with server.connect(make_token("bob")) as ws2:
        second = welcomed(ws2)
        ws2.send(json.dumps({"type": "auth", "token": make_token("eve"), "id": 1}))
        code, _, _ = wait_close(ws2, timeout=5)
        assert code == 1008
    event2 = closed_event(server, second["connection_id"])
    assert event2["code"] == 1008
    assert event2["messages_in"] == 1
    assert len(server.audit.events("connection_closed")) == 2
