"""Regression tests for the review fixes.

1. the Origin check runs before every counter (handshake rate, auth-failure bans);
2. per-subject message budgets outlive connections;
3. ``log_level = "debug"`` never writes a raw token to the logs or the audit log;
4. IPv6 per-address limits are keyed by the /64;
5. ``WSGUARD_JWT_SECRET`` is taken verbatim (never parsed as JSON);
6. ``Connection.close()`` refuses close codes and reasons that cannot go on the wire;
7. a verified-token cache entry is not valid past ``exp`` + leeway;
8. ``drain_seconds = 0``: prompt 1001 closes, 503 for handshakes still in progress.

Servers run on ephemeral loopback ports and are driven by real WebSocket clients or
raw sockets; timing-sensitive rules go through the pure core with an injected clock.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from conftest import (
    SECRET,
    AuditCapture,
    RunningServer,
    ServerFactory,
    make_config,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from support.serve_process import Served
from wsguard.config.loader import load_config
from wsguard.core.auth import AuthFailure, KeyMaterial, TokenVerifier
from wsguard.core.client_address import limit_key
from wsguard.core.decisions import Deliver, Refuse
from wsguard.core.identity import Identity
from wsguard.core.messages import MessagePolicy
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog
from wsguard.session import Connection

APP_ORIGIN = "https://app.example.com"
EVIL_ORIGIN = "https://evil.example.net"
BAD_TOKEN = make_token("mallory", secret="not-the-server-secret-but-long-enough-0123456789")
TRUSTED_LOCAL: dict[str, Any] = {"proxy": {"trusted": ["127.0.0.0/8"]}}
POLL_INTERVAL = 0.02  # pause between two checks of a bounded poll, never a timing assumption
OP_TEXT, OP_CLOSE = 0x1, 0x8


# --------------------------------------------------------------------------- helpers


def poll_until(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "") -> None:
    """Re-check *predicate* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(POLL_INTERVAL)


def refused(server: RunningServer, token: str | None = None, **kwargs: Any) -> InvalidStatus:
    """Attempt a connection that must be refused before 101; return the refusal."""
    try:
        ws = server.connect(token, **kwargs)
    except InvalidStatus as exc:
        return exc
    ws.close()
    pytest.fail(f"handshake unexpectedly admitted ({kwargs})")


def status(exc: InvalidStatus) -> int:
    return exc.response.status_code


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    out = json.loads(data)
    assert isinstance(out, dict)
    return out


def ping(ws: ClientConnection, ident: str | int) -> dict[str, Any]:
    """Send a demo ping; return the server's answer (a pong or an error frame)."""
    ws.send(json.dumps({"type": "ping", "id": ident}))
    return recv_json(ws)


def assert_alive(ws: ClientConnection, ident: str) -> None:
    answer = ping(ws, ident)
    assert (answer["type"], answer["id"]) == ("pong", ident), answer


def last_event(server: RunningServer, name: str) -> dict[str, Any]:
    events = server.audit.events(name)
    assert events, f"no {name} event in the audit log"
    return events[-1]


def xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


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


# --------------------------------------------------------------------------- 1. origin first


def foreign_origin_barrage(server: RunningServer, count: int) -> None:
    """*count* handshakes from a hostile page: every credential shape, all refused 403.

    The browser sends the victim's cookie along (valid), the page adds garbage of its own
    (a bad bearer token, a bad cookie) or nothing at all.
    """
    victim = make_token("victim")
    for i in range(count):
        kind = i % 4
        if kind == 0:
            exc = refused(server, victim, transport="cookie", origin=EVIL_ORIGIN)
        elif kind == 1:
            exc = refused(server, BAD_TOKEN, transport="cookie", origin=EVIL_ORIGIN)
        elif kind == 2:
            exc = refused(server, BAD_TOKEN, origin=EVIL_ORIGIN)
        else:
            response = raw_http(server.port, upgrade_request(headers={"Origin": EVIL_ORIGIN}))
            assert status_of(response) == 403, response[:200]
            continue
        assert status(exc) == 403, (kind, status(exc))
    reasons = {e["reason"] for e in server.audit.events("handshake_refused")}
    assert reasons == {"origin_forbidden"}, reasons
    assert server.audit.events("ban_started") == []


ORIGIN_FIRST: dict[str, Any] = {
    "auth": {"cookie": True},
    "origin": {"allowed": [APP_ORIGIN]},
}


def test_foreign_origin_refusals_do_not_spend_the_handshake_rate(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({**ORIGIN_FIRST, "limits": {"handshakes_per_minute": 3}})
    foreign_origin_barrage(server, 20)
    # the whole budget of 3 is still there for the victim's own page ...
    for i in range(3):
        with server.connect_welcomed(make_token("victim"), transport="cookie", origin=APP_ORIGIN):
            pass
        assert len(server.audit.events("connection_admitted")) == i + 1
    # ... and the limit is real: the fourth allowed handshake is over it
    exc = refused(server, make_token("victim"), transport="cookie", origin=APP_ORIGIN)
    assert status(exc) == 429
    assert last_event(server, "handshake_refused")["reason"] == "handshake_rate"


def test_foreign_origin_refusals_do_not_count_toward_an_address_ban(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {**ORIGIN_FIRST, "limits": {"auth_failures_before_ban": 2, "handshakes_per_minute": 1000}}
    )
    foreign_origin_barrage(server, 20)
    with server.connect_welcomed(make_token("victim"), transport="cookie", origin=APP_ORIGIN) as ws:
        assert_alive(ws, "after-barrage")
    # the failure count is still zero: the first real failure does not ban ...
    assert status(refused(server, BAD_TOKEN, origin=APP_ORIGIN)) == 401
    assert server.audit.events("ban_started") == []
    # ... the second one (the configured threshold) does
    assert status(refused(server, BAD_TOKEN, origin=APP_ORIGIN)) == 401
    assert len(server.audit.events("ban_started")) == 1
    banned = refused(server, make_token("victim"), transport="cookie", origin=APP_ORIGIN)
    assert status(banned) == 429


# --------------------------------------------------------------------------- 2. subject budget


def test_subject_message_budget_survives_reconnecting(server_factory: ServerFactory) -> None:
    """Each connection stays within its own burst; only the subject's bucket runs out."""
    per_connection = 5
    server = server_factory(
        {
            "limits": {
                "message_burst": per_connection,
                "messages_per_minute": 1,
                "subject_messages_per_minute": 1,
                "connections_per_subject": 50,
            }
        }
    )
    refusal: dict[str, Any] | None = None
    for round_no in range(20):
        with server.connect_welcomed(make_token("alice")) as ws:
            for i in range(per_connection):
                answer = ping(ws, f"{round_no}-{i}")
                if answer["type"] != "pong":
                    refusal = answer
                    break
        poll_until(lambda: server.connection_count() == 0, what="the server forgot the connection")
        if refusal is not None:
            break
    assert refusal is not None, "the subject's budget was never exhausted"
    assert refusal["code"] == "rate_limited", refusal
    # a brand-new connection (fresh per-connection bucket) of the same subject is still limited
    with server.connect_welcomed(make_token("alice")) as ws:
        answer = ping(ws, "after-reconnect")
        assert (answer["type"], answer.get("code")) == ("error", "rate_limited"), answer
    poll_until(lambda: server.connection_count() == 0, what="the server forgot the connection")
    with server.connect_welcomed(make_token("alice")) as ws:
        answer = ping(ws, "after-second-reconnect")
        assert answer.get("code") == "rate_limited", answer
    # it is the subject that is limited, not the address
    with server.connect_welcomed(make_token("bob")) as ws:
        assert_alive(ws, "another-subject")


def test_subject_state_outlives_closed_connections_in_the_core() -> None:
    config = make_config(
        {"limits": {"message_burst": 3, "messages_per_minute": 1, "subject_messages_per_minute": 1}}
    )
    verifier = TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode()))
    policy = MessagePolicy(config, verifier)
    alice = Identity(subject="alice")
    now = 1000.0
    message = json.dumps({"type": "ping"})
    for _ in range(20):  # connect, spend this connection's burst, disconnect
        state = policy.open(alice, now)
        outcomes = [policy.evaluate(state, message, now) for _ in range(3)]
        policy.closed(state, now)
        if any(isinstance(o, Refuse) for o in outcomes):
            break
    else:
        pytest.fail("the subject's budget was never exhausted")
    for _ in range(3):  # no number of reconnects at the same instant buys a message
        state = policy.open(alice, now)
        outcome = policy.evaluate(state, message, now)
        policy.closed(state, now)
        assert isinstance(outcome, Refuse) and outcome.code == "rate_limited", outcome
    # another subject is unaffected
    other = policy.open(Identity(subject="bob"), now)
    assert isinstance(policy.evaluate(other, message, now), Deliver)


# --------------------------------------------------------------------------- 3. debug logging


def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(home)
    env["WSGUARD_JWT_SECRET"] = SECRET
    return env


@contextmanager
def served(args: list[str], env: dict[str, str], audit_path: Path) -> Iterator[Served]:
    proc = Served(args, env, audit_path)
    try:
        yield proc
    finally:
        proc.kill()


def test_debug_logs_and_audit_never_contain_a_token(tmp_path: Path) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text(
        f'[auth]\ncookie = true\nquery = true\n[origin]\nallowed = ["{APP_ORIGIN}"]\n'
    )
    tokens = {
        "header": make_token("via-header"),
        "subprotocol": make_token("via-subprotocol"),
        "cookie": make_token("via-cookie"),
        "query": make_token("via-query"),
        "refresh": make_token("via-header", ttl=7200),
        "bad-header": BAD_TOKEN,
        "bad-query": make_token("q", secret="another-wrong-secret-long-enough-0123456789"),
    }
    args = ["--config", str(config), "--port", "0", "--log-level", "debug"]
    with served(args, _cli_env(tmp_path), tmp_path / "audit.jsonl") as proc:
        port = proc.wait_listening()
        base = f"ws://{proc.host}:{port}/"

        def open_with(transport: str, token: str) -> ClientConnection:
            # cookie auth is on, so every handshake comes from the allowed page
            url, headers = base, {}
            protocols = [Subprotocol("wsguard.v1")]
            if transport == "header":
                headers["Authorization"] = f"Bearer {token}"
            elif transport == "subprotocol":
                protocols.append(Subprotocol(f"token.{token}"))
            elif transport == "cookie":
                headers["Cookie"] = f"wsguard_token={token}"
            else:
                url = f"{base}?token={token}"
            return connect(
                url,
                additional_headers=headers,
                subprotocols=protocols,
                origin=Origin(APP_ORIGIN),
                open_timeout=10,
            )

        for transport in ("header", "subprotocol", "cookie", "query"):
            with open_with(transport, tokens[transport]) as ws:
                assert recv_json(ws)["type"] == "welcome"
                assert_alive(ws, transport)
                if transport == "header":  # in-band refresh carries a token in a frame
                    ws.send(json.dumps({"type": "auth", "token": tokens["refresh"], "id": 1}))
                    assert recv_json(ws)["type"] == "auth_ok"
        for transport, name in (("header", "bad-header"), ("query", "bad-query")):
            with pytest.raises(InvalidStatus) as info:
                open_with(transport, tokens[name]).close()
            assert info.value.response.status_code == 401
        assert proc.stop() == 0
        logs = proc.stderr
        audit = proc.audit_path.read_text()
    assert " DEBUG " in logs, f"the server did not log at debug level:\n{logs}"
    events = [json.loads(line)["event"] for line in audit.splitlines() if line]
    assert events.count("connection_admitted") == 4, events
    assert events.count("handshake_refused") == 2, events
    for name, token in tokens.items():
        signature = token.rsplit(".", 1)[1]
        for where, text in (("server log", logs), ("audit log", audit)):
            assert token not in text, f"{name} token in the {where}"
            assert signature not in text, f"{name} token signature in the {where}"


# --------------------------------------------------------------------------- 4. IPv6 /64


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
        ("2001:db8:1:2::1", "2001:db8:1:2::1", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("2001:db8:1:2::1", "2001:db8:2:2::1", False),
        ("[2001:db8:1:2::7]:443", "2001:db8:1:2::8", True),
        ("198.51.100.1", "198.51.100.2", False),
        ("198.51.100.1", "198.51.100.1", True),
    ],
)
def test_limit_key_groups_ipv6_by_slash64(a: str, b: str, shared: bool) -> None:
    assert (limit_key(a, 64) == limit_key(b, 64)) is shared


def test_limit_key_values() -> None:
    assert limit_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64) == "2001:db8:1:2::/64"
    assert limit_key("203.0.113.9", 64) == "203.0.113.9"
    # a configured /128 keys by the full address
    assert limit_key("2001:db8:1:2::1", 128) != limit_key("2001:db8:1:2::2", 128)


def test_ipv6_clients_in_one_slash64_share_the_per_address_limit(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({**TRUSTED_LOCAL, "limits": {"connections_per_address": 1}})
    first, neighbour, elsewhere = "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"
    with server.connect_welcomed(make_token("a"), headers=xff(first)) as ws_a:
        assert last_event(server, "connection_admitted")["client"] == first
        assert server.slots("conn:addr:2001:db8:1:2::/64") == 1
        exc = refused(server, make_token("b"), headers=xff(neighbour))
        assert status(exc) == 429
        refusal = last_event(server, "handshake_refused")
        assert (refusal["reason"], refusal["client"]) == ("too_many_connections", neighbour)
        # the next /64 has its own quota
        with server.connect_welcomed(make_token("c"), headers=xff(elsewhere)) as ws_c:
            assert server.slots("conn:addr:2001:db8:1:3::/64") == 1
            assert_alive(ws_c, "other-64")
        assert_alive(ws_a, "first")
    poll_until(lambda: server.slots("conn:addr:2001:db8:1:2::/64") == 0, what="slot released")
    with server.connect_welcomed(make_token("b"), headers=xff(neighbour)):
        assert last_event(server, "connection_admitted")["client"] == neighbour


# --------------------------------------------------------------------------- 5. env secret


JSON_LOOKING_SECRETS = [
    "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]",
    '"quoted-secret-that-is-long-enough-for-hs256"',
    "12345678901234567890123456789012345678",
    '{"a": 1, "b": "padding-to-reach-32-bytes"}',
    "  surrounding whitespace is part of the secret too  ",
]


@pytest.mark.parametrize("name", ["WSGUARD_JWT_SECRET", "WSGUARD_AUTH__SECRET"])
@pytest.mark.parametrize("secret", JSON_LOOKING_SECRETS)
def test_env_secret_is_taken_verbatim(name: str, secret: str) -> None:
    config = load_config(None, env={name: secret})
    assert config.auth.secret == secret
    # and it is the key tokens are verified with
    guard = Guard(config, audit=AuditLog(io.StringIO()))
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert guard.verifier.verify(token).subject == "alice"


@pytest.mark.parametrize("secret", ["[1,2]", '"quoted"', "123", '{"a":1}'])
def test_short_json_looking_env_secret_is_a_too_short_string(secret: str) -> None:
    """Parsed as JSON these would be a list, a str, an int, a table: a type error."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_JWT_SECRET": secret})
    assert info.value.key == "auth.secret"
    assert "at least 32 bytes" in info.value.message
    assert secret not in str(info.value)


# --------------------------------------------------------------------------- 6. close()


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
        assert_alive(ws, "still-open")
        server.run_coro(conn.close(4000, "valid"))
        assert expect_close(ws) == (4000, "valid")


def test_close_refuses_reasons_over_123_bytes(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        conn = only_connection(server)
        for reason in ("x" * 124, "\u00e9" * 62, "x" * 1000):  # 124 bytes of UTF-8 in 62 chars
            with pytest.raises(ValueError, match="123 bytes"):
                server.run_coro(conn.close(1000, reason))
            assert server.call(lambda: conn.closing) is False
            assert_alive(ws, f"still-open-{len(reason)}")
        longest = "\u00e9" * 61 + "x"  # exactly 123 bytes
        server.run_coro(conn.close(1000, longest))
        assert expect_close(ws) == (1000, longest)


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 1014, 3000, 4999])
def test_close_accepts_every_sendable_code(server: RunningServer, code: int) -> None:
    with server.connect_welcomed() as ws:
        server.run_coro(only_connection(server).close(code, "bye"))
        assert expect_close(ws) == (code, "bye")


# --------------------------------------------------------------------------- 7. token cache


def test_cached_token_is_refused_past_exp_plus_leeway() -> None:
    leeway = 5.0
    auth = make_config({"auth": {"leeway_seconds": leeway}}).auth
    now = [time.time()]
    verifier = TokenVerifier(auth, KeyMaterial(secret=SECRET.encode()), clock=lambda: now[0])
    token = make_token("alice", ttl=600)  # valid in real time: PyJWT verifies it first
    exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
    assert verifier.verify(token).expires_at == exp  # verified and cached
    now[0] = exp - 1
    assert verifier.verify(token).subject == "alice"  # before exp
    now[0] = exp + leeway - 0.5
    assert verifier.verify(token).subject == "alice"  # within the leeway
    now[0] = exp + leeway
    with pytest.raises(AuthFailure) as info:
        verifier.verify(token)
    assert info.value.reason == "token_expired"
    # another token, still valid, is not affected by the clock jump
    fresh = make_token("bob", ttl=3600)
    now[0] = time.time()
    assert verifier.verify(fresh).subject == "bob"
    now[0] = exp + leeway + 1
    assert verifier.verify(fresh).subject == "bob"


# --------------------------------------------------------------------------- 8. drain = 0


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
        poll_until(lambda: server.connection_count() == 2, what="two admitted connections")

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
        poll_until(
            lambda: any(
                e["reason"] == "draining" for e in server.audit.events("handshake_refused")
            ),
            what="the draining refusal in the audit log",
        )
        # and the listener is gone: nothing new is accepted
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        poll_until(
            lambda: len(server.audit.events("connection_closed")) == 2,
            what="both connections audited as closed",
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


def test_embedded_app_with_debug_logging_never_logs_tokens(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An App embedded in a program that logs everything at DEBUG: the engine's debug
    records (raw request headers) stay suppressed, so no token reaches any handler."""
    import logging

    caplog.set_level(logging.DEBUG)
    logging.getLogger("wsguard.server").debug("capture check")  # proves DEBUG is captured
    running = server_factory()
    token = make_token("alice", scopes="chat")
    with running.connect(token) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        ws.recv(timeout=5)
    with pytest.raises(InvalidStatus):
        running.connect(token + "x")
    # the test's own client logs its headers too: only the server side is checked
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert server_records, "debug logging was not captured at all"
    text = "\n".join(record.getMessage() for record in server_records)
    signature = token.rsplit(".", 1)[1]
    assert signature not in text
    assert token.split(".")[1] not in text
