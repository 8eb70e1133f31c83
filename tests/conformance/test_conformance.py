"""Same policy on every engine: one conformance suite, run on the standalone server on
``picows``, on ``websockets``, and on ``WsGuardMiddleware`` under uvicorn
(``websockets-sansio``) in front of a small plain-ASGI echo app.

Each test asks every engine the same question and expects the same observable answer:
the HTTP status and headers of a refused handshake, the close code or error frame of a
refused message, the audit-log record of both, and the wire bounds of RFC 6455 (reserved
bits, close codes, UTF-8, fragments). Where an engine cannot answer the same (under an
ASGI server the request head and the framing belong to the server), the test says why:
a skip naming the limitation, or a different value asserted with its reason (docs, Engines:
"Same policy on every engine").

Malformed handshakes and hand-made frames go over raw sockets (the request builders of
``conftest`` and ``support.wire``, and its ``RawClient``); limits are small so that
nothing waits long, and every wait is a read with a socket timeout or a poll with a
deadline.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from conftest import (
    AuditCapture,
    RunningServer,
    ServerFactory,
    eventually,
    make_config,
    make_token,
    status_of,
    upgrade_request,
)
from support.asgi_server import AsgiServer, Recorder
from support.asgi_server import demo_echo_app as echo_app
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
    ping_frame,
    raw_request,
    read_head,
    reset_close,
)
from wsguard.guard import Guard

ENGINE_NAMES = ("picows", "websockets", "asgi")
ASGI_SERVER = "uvicorn-sansio"  # uvicorn with ws="websockets-sansio" (test_asgi_middleware)
OTHER_SECRET = "not-the-server-secret-but-long-enough-0123456789"
BEARER = 'Bearer realm="wsguard"'
BEARER_INVALID = 'Bearer realm="wsguard", error="invalid_token"'

# What the ASGI server owns: under uvicorn the request head is parsed, and the upgrade
# validated, by the server before the middleware is called; these name why an answer differs.
ASGI_PARSER = (
    "uvicorn's HTTP parser refuses a malformed request head with its own 400 before any "
    "application is called: the same status, but the refusal is not in wsguard's audit log"
)
ASGI_UPGRADE = (
    "uvicorn (websockets-sansio) validates the upgrade request itself before the "
    "application is called{detail}: the refusal is uvicorn's, not in wsguard's audit log"
)
ASGI_BOUNDS = (
    "uvicorn's WebSocket parser (websockets) applies the same bounds to the request head "
    "(8 KiB lines, 128 headers) before the application is called: the same status, but the "
    "refusal is not in wsguard's audit log"
)
ASGI_HEAD_LIMIT = (
    "under an ASGI server the request head is read by the server, not by wsguard: "
    "{what} is the server's to bound, and the middleware sees only complete requests"
)
ASGI_HTTP = (
    "a request that is not a WebSocket upgrade is HTTP under an ASGI server: the middleware "
    "passes HTTP through to the application untouched (here the echo app's 404)"
)
ASGI_EARLY_FRAMES = (
    "under an ASGI server the server reads the request and the frames behind it; the "
    "middleware sees them only as events after the app accepted"
)
ASGI_SERVER_FAILURE = (
    "the ASGI server fails the connection itself (1002, 1007, its own 1009); the middleware "
    "learns only of a disconnect with that code and records it as the server's failure"
)


# -- the engines ---------------------------------------------------------------------------


@dataclass
class Target:
    """One engine serving the policy, as the tests see it."""

    engine: str
    port: int
    audit: AuditCapture
    guard: Guard
    call: Callable[[Callable[[], Any]], Any]  # run on the server's loop
    run: Callable[[Coroutine[Any, Any, Any]], Any]  # await on the server's loop

    def raw(self, token: str | None = None) -> RawClient:
        """A hand-rolled client past the welcome frame (RawClient reads only ``.port``)."""
        client = RawClient(cast(RunningServer, self), token or make_token())
        welcome = client.recv_json()
        assert welcome["type"] == "welcome", welcome
        return client

    def refusals(self) -> list[tuple[Any, Any]]:
        return [(e["status"], e["reason"]) for e in self.audit.events("handshake_refused")]

    def closed(self) -> dict[str, Any]:
        """The one ``connection_closed`` record (waits for it, bounded)."""
        events = eventually(lambda: self.audit.events("connection_closed"), what="closed")
        assert len(events) == 1, events
        return events[0]


Start = Callable[..., Target]


@pytest.fixture(params=ENGINE_NAMES)
def engine(request: pytest.FixtureRequest) -> str:
    """Overrides conftest's ``engine``: both standalone engines and the ASGI middleware."""
    return str(request.param)


@pytest.fixture
def start(engine: str, request: pytest.FixtureRequest) -> Iterator[Start]:
    """Start the policy with config overrides on the test's engine; all stopped after."""
    if engine != "asgi":
        server_factory: ServerFactory = request.getfixturevalue("server_factory")

        def standalone(overrides: dict[str, Any] | None = None) -> Target:
            server = server_factory(overrides)
            return Target(
                engine, server.port, server.audit, server.app.guard, server.call, server.run_coro
            )

        yield standalone
        return
    started: list[AsgiServer] = []

    def asgi(overrides: dict[str, Any] | None = None) -> Target:
        config = make_config(overrides)
        # the server's own frame limit is limits.max_message_bytes, as the ASGI guide asks
        server = AsgiServer(
            ASGI_SERVER, echo_app, config, Recorder(), config.limits.max_message_bytes
        )
        started.append(server)
        server.start()
        return Target("asgi", server.port, server.audit, server.guard, server.call, server.run)

    yield asgi
    for server in started:
        server.stop()


# -- HTTP answers ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def answer(port: int, request: bytes) -> Answer:
    """Send *request* on a fresh socket; the response, read until the server closes (or,
    for a 101, to the end of its head: an admitted connection stays open)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # the server may answer before it has read everything
        while not (data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data):
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return Answer(status_of(head), headers, body)


@dataclass(frozen=True)
class Refusal:
    """The observable answer to a refused handshake."""

    status: int
    reason: str | None  # of the handshake_refused record; None: no record
    headers: tuple[tuple[str, str], ...] = ()  # exact values
    retry_after: bool = False  # a Retry-After of whole seconds >= 1
    body: bytes | None = None


def check(
    target: Target,
    got: Answer,
    want: Refusal,
    earlier: tuple[tuple[int, str], ...] = (),
    *,
    admitted: int = 0,
    note: str = "",
) -> None:
    """*got* is *want*, and the audit log holds its one refusal (after *earlier* ones) and
    no admission but the *admitted* ones made before. *note*: why *want* differs here."""
    assert got.status == want.status, (note, got.status, got.headers, got.body[:200])
    for name, value in want.headers:
        assert got.headers.get(name.lower()) == value, (name, got.headers)
    if want.retry_after:
        value = got.headers.get("retry-after", "")
        assert value.isdigit() and int(value) >= 1, got.headers
    if want.body is not None:
        assert got.body == want.body
    if want.reason is None:
        assert target.refusals() == list(earlier)
    else:
        eventually(lambda: target.refusals()[len(earlier) :], what="the refusal's audit record")
        assert target.refusals() == [*earlier, (want.status, want.reason)]
    assert len(target.audit.events("connection_admitted")) == admitted


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upgrade(path: str = "/", **kwargs: Any) -> bytes:
    """A valid upgrade with a valid token, but for what *kwargs* change."""
    return upgrade_request(path, token=make_token(), **kwargs)


def auth_line() -> str:
    return f"Authorization: Bearer {make_token()}"


# -- 1. handshake refusals: docs/reference/refusals.md, "Handshake refusals" --------------


@dataclass(frozen=True)
class Differs:
    """What the ASGI middleware's engine answers instead, and why (None: skipped)."""

    why: str
    want: Refusal | None = None


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], bytes]
    want: Refusal
    overrides: dict[str, Any] = field(default_factory=dict)
    asgi: Differs | None = None


BAD = Refusal(400, "bad_request")
NOT_WEBSOCKET = Refusal(426, "not_websocket", (("Upgrade", "websocket"),))
ORIGINS = {"origin": {"allowed": ["https://app.example.com"]}}
TOO_LARGE = Refusal(431, "headers_too_large")

HANDSHAKE_CASES = [
    # 400 bad_request / bad_http_version
    Case(
        "host-missing",
        lambda: upgrade(host=None),
        BAD,
        asgi=Differs(ASGI_PARSER, Refusal(400, None)),
    ),
    Case("host-empty", lambda: upgrade(host=""), BAD),
    Case("host-with-userinfo", lambda: upgrade(host="evil@127.0.0.1"), BAD),
    Case(
        "host-repeated",
        lambda: raw_request(
            "GET / HTTP/1.1", "Host: 127.0.0.1", "Host: evil.example", *WS_HEADERS, auth_line()
        ),
        BAD,
        asgi=Differs(ASGI_PARSER, Refusal(400, None)),
    ),
    Case("target-asterisk", lambda: upgrade("*"), BAD),
    Case("target-absolute-form", lambda: upgrade("http://127.0.0.1/"), BAD),
    Case("target-scheme-relative", lambda: upgrade("//evil.example/"), BAD),
    Case(
        "target-control-character",
        lambda: upgrade("/a\x01b"),
        BAD,
        asgi=Differs(ASGI_PARSER, Refusal(400, None)),
    ),
    Case(
        "key-invalid",
        lambda: upgrade(headers={"Sec-WebSocket-Key": "c2hvcnQ="}),
        BAD,
        asgi=Differs(ASGI_UPGRADE.format(detail=""), Refusal(400, None)),
    ),
    Case(
        "key-missing",
        lambda: raw_request(
            "GET / HTTP/1.1", "Host: 127.0.0.1", *WS_HEADERS[:2], WS_HEADERS[3], auth_line()
        ),
        BAD,
        asgi=Differs(ASGI_UPGRADE.format(detail=""), Refusal(400, None)),
    ),
    Case(
        "request-line-malformed",
        lambda: raw_request("GET / HTTP/1.1 extra", "Host: 127.0.0.1", *WS_HEADERS, auth_line()),
        BAD,
        asgi=Differs(ASGI_PARSER, Refusal(400, None)),
    ),
    Case(
        "header-line-malformed",
        lambda: raw_request("GET / HTTP/1.1", "Host: 127.0.0.1", *WS_HEADERS, "X-No-Colon"),
        BAD,
        asgi=Differs(ASGI_PARSER, Refusal(400, None)),
    ),
    Case(
        "http-1.0",
        lambda: raw_request("GET / HTTP/1.0", "Host: 127.0.0.1", *WS_HEADERS, auth_line()),
        Refusal(400, "bad_http_version"),
        asgi=Differs(
            "uvicorn upgrades an HTTP/1.0 request (it rewrites the request line and the "
            "ASGI scope says HTTP/1.1): the middleware cannot see the version"
        ),
    ),
    # 405 + Allow
    Case(
        "method-post",
        lambda: raw_request("POST / HTTP/1.1", "Host: 127.0.0.1", *WS_HEADERS, auth_line()),
        Refusal(405, "bad_method", (("Allow", "GET"),)),
        asgi=Differs(
            ASGI_UPGRADE.format(detail=" (405 + Allow: GET as well)"),
            Refusal(405, None, (("Allow", "GET"),)),
        ),
    ),
    # 426
    Case(
        "plain-get",
        lambda: raw_request("GET / HTTP/1.1", "Host: 127.0.0.1", auth_line()),
        NOT_WEBSOCKET,
        asgi=Differs(ASGI_HTTP),
    ),
    Case(
        "upgrade-without-connection",
        lambda: raw_request(
            "GET / HTTP/1.1", "Host: 127.0.0.1", WS_HEADERS[0], *WS_HEADERS[2:], auth_line()
        ),
        NOT_WEBSOCKET,
        asgi=Differs(ASGI_HTTP),
    ),
    Case(
        "version-8",
        lambda: upgrade(headers={"Sec-WebSocket-Version": "8"}),
        Refusal(426, "unsupported_version", (("Sec-WebSocket-Version", "13"),)),
        asgi=Differs(
            ASGI_UPGRADE.format(detail=", and answers another version with 400, not 426"),
            Refusal(400, None),
        ),
    ),
    # 403 origin_forbidden
    Case(
        "origin-not-listed",
        lambda: upgrade(headers={"Origin": "https://evil.example"}),
        Refusal(403, "origin_forbidden"),
        ORIGINS,
    ),
    Case(
        "origin-missing-not-allowed",
        lambda: upgrade(),
        Refusal(403, "origin_forbidden"),
        {"origin": {"allowed": ["https://app.example.com"], "allow_missing": False}},
    ),
    Case(
        "origin-missing-with-cookie-auth",
        lambda: upgrade_request(headers={"Cookie": f"wsguard_token={make_token()}"}),
        Refusal(403, "origin_forbidden"),
        {**ORIGINS, "auth": {"cookie": True}},
    ),
    Case(
        "origin-null",
        lambda: upgrade(headers={"Origin": "null"}),
        Refusal(403, "origin_forbidden"),
        ORIGINS,
    ),
    Case(
        "origin-repeated",
        lambda: raw_request(
            "GET / HTTP/1.1",
            "Host: 127.0.0.1",
            *WS_HEADERS,
            auth_line(),
            "Origin: https://app.example.com",
            "Origin: https://evil.example",
        ),
        Refusal(403, "origin_forbidden"),
        ORIGINS,
        asgi=Differs(
            ASGI_UPGRADE.format(detail=", and refuses two Origin headers with 400"),
            Refusal(400, None),
        ),
    ),
    # an upgrade names websocket alone; a request with a body is not an upgrade
    Case(
        "upgrade-lists-another-protocol",
        lambda: upgrade(headers={"Upgrade": "websocket, h2c"}),
        Refusal(426, "not_websocket"),
        asgi=Differs(ASGI_UPGRADE.format(detail="")),
    ),
    Case(
        "request-with-a-body",
        lambda: upgrade(headers={"Content-Length": "5"}) + b"hello",
        Refusal(400, "bad_request"),
        asgi=Differs(ASGI_PARSER),
    ),
    Case(
        "request-with-a-chunked-body",
        lambda: upgrade(headers={"Transfer-Encoding": "chunked"}) + b"0\r\n\r\n",
        Refusal(400, "bad_request"),
        asgi=Differs(ASGI_PARSER),
    ),
    # 431 / 414: the wire bounds of the request head
    Case(
        "head-over-max-header-bytes",
        lambda: upgrade(headers={f"X-H{i}": "v" * 40 for i in range(60)}),  # ~3 KB
        TOO_LARGE,
        {"limits": {"max_header_bytes": 1024}},
        asgi=Differs(ASGI_HEAD_LIMIT.format(what="the size of the head (limits.max_header_bytes)")),
    ),
    Case(
        "header-line-over-8KiB",
        lambda: upgrade(headers={"X-Big": "a" * 8300}),  # the head stays under 16 KiB
        TOO_LARGE,
        asgi=Differs(ASGI_BOUNDS, Refusal(431, None)),
    ),
    Case(
        "more-than-128-headers",
        # Host, 4 upgrade headers, Authorization and 123 more: 129 header lines
        lambda: upgrade(headers={f"X-H{i}": "v" for i in range(123)}),
        TOO_LARGE,
        asgi=Differs(ASGI_BOUNDS, Refusal(431, None)),
    ),
    Case(
        "request-line-over-8KiB",
        lambda: upgrade("/" + "a" * 8300),  # the head stays under 16 KiB
        Refusal(414, "request_line_too_long"),
        asgi=Differs(ASGI_BOUNDS, Refusal(414, None)),
    ),
]


@pytest.mark.parametrize("case", HANDSHAKE_CASES, ids=[c.id for c in HANDSHAKE_CASES])
def test_handshake_refusal(start: Start, engine: str, case: Case) -> None:
    want, note = case.want, ""
    if engine == "asgi" and case.asgi is not None:
        if case.asgi.want is None:
            pytest.skip(case.asgi.why)
        want, note = case.asgi.want, case.asgi.why  # docs: Same policy on every engine
    target = start(case.overrides)
    check(target, answer(target.port, case.request()), want, note=note)


def test_128_headers_are_still_admitted(start: Start) -> None:
    """The bound of more-than-128-headers is exact: 128 header lines pass."""
    target = start()
    request = upgrade(headers={f"X-H{i}": "v" for i in range(122)})  # 128 header lines
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(request)
        assert status_of(read_head(sock)) == 101


def test_request_line_longer_than_the_head_limit_is_414(start: Start, engine: str) -> None:
    """A request line still arriving when the head limit is reached: 414 at once."""
    if engine == "asgi":
        pytest.skip(ASGI_HEAD_LIMIT.format(what="the size of the head (limits.max_header_bytes)"))
    target = start({"limits": {"max_header_bytes": 1024}})
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * 2048)  # no line end yet: the server must not wait
        got = status_of(read_head(sock))
    assert got == 414
    eventually(target.refusals, what="the refusal's audit record")
    assert target.refusals() == [(414, "request_line_too_long")]


# -- 401 + WWW-Authenticate, one per token failure ---------------------------------------


@dataclass(frozen=True)
class TokenCase:
    reason: str
    headers: Callable[[], dict[str, str]]
    overrides: dict[str, Any] = field(default_factory=dict)


TOKEN_CASES = [
    TokenCase("missing_credentials", dict),
    TokenCase("malformed_credentials", lambda: {"Authorization": "Basic dXNlcjpwYXNz"}),
    TokenCase("malformed_token", lambda: bearer("not-a-jwt")),
    TokenCase(
        "algorithm_not_allowed", lambda: bearer(make_token(alg="HS512", secret=OTHER_SECRET * 2))
    ),
    TokenCase("bad_signature", lambda: bearer(make_token(secret=OTHER_SECRET))),
    TokenCase("token_expired", lambda: bearer(make_token(ttl=-60))),
    TokenCase("token_not_yet_valid", lambda: bearer(make_token(nbf=int(time.time()) + 3600))),
    TokenCase(
        "invalid_audience",
        lambda: bearer(make_token(aud="someone-else")),
        {"auth": {"audience": ["wsguard-tests"]}},
    ),
    TokenCase(
        "invalid_issuer",
        lambda: bearer(make_token(iss="https://evil.example")),
        {"auth": {"issuer": "https://issuer.example"}},
    ),
    TokenCase("missing_claim", lambda: bearer(make_token(exp=None))),
    TokenCase("invalid_token", lambda: bearer(make_token(headers={"crit": ["exp"]}))),
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c.reason for c in TOKEN_CASES])
def test_token_failure_is_401_with_a_bearer_challenge(start: Start, case: TokenCase) -> None:
    target = start(case.overrides)
    got = answer(target.port, upgrade_request(headers=case.headers()))
    missing = case.reason == "missing_credentials"
    want = Refusal(
        401,
        case.reason,
        (("WWW-Authenticate", BEARER if missing else BEARER_INVALID),),
        body=b"Missing credentials.\n" if missing else b"Invalid or expired token.\n",
    )
    check(target, got, want)


def test_revoked_subject_is_401_invalid_token(start: Start) -> None:
    target = start()
    target.run(target.guard.store.revoke("sub", "alice", 60))
    got = answer(target.port, upgrade_request(token=make_token("alice")))
    want = Refusal(401, "revoked", (("WWW-Authenticate", BEARER_INVALID),))
    check(target, got, want)


# -- 429 + Retry-After, 503 ---------------------------------------------------------------


def test_handshake_rate_is_429(start: Start) -> None:
    target = start({"limits": {"handshakes_per_minute": 2}})
    for _ in range(2):  # refused for want of a token, but counted
        assert answer(target.port, upgrade_request()).status == 401
    got = answer(target.port, upgrade())
    missing = (401, "missing_credentials")
    check(target, got, Refusal(429, "handshake_rate", retry_after=True), (missing, missing))


def test_auth_failure_ban_is_429_and_logged_once(start: Start) -> None:
    target = start({"limits": {"auth_failures_before_ban": 2, "ban_seconds": 30}})
    for _ in range(2):
        bad = bearer(make_token(secret=OTHER_SECRET))
        assert answer(target.port, upgrade_request(headers=bad)).status == 401
    for _ in range(2):  # a valid token does not help while banned
        got = answer(target.port, upgrade())
        assert got.status == 429
        assert got.headers.get("retry-after") == "30", got.headers
    assert target.refusals() == [(401, "bad_signature"), (401, "bad_signature")]
    bans = target.audit.events("ban_started")
    assert [(b["client"], b["seconds"], b["reason"]) for b in bans] == [
        ("127.0.0.1", 30.0, "auth_failures")
    ]


def test_too_many_connections_is_429(start: Start) -> None:
    target = start({"limits": {"connections_per_address": 1}})
    with target.raw(make_token("alice")):
        got = answer(target.port, upgrade_request(token=make_token("bob")))
        check(target, got, Refusal(429, "too_many_connections", retry_after=True), admitted=1)


def test_pending_handshakes_per_address_is_429(start: Start, engine: str) -> None:
    if engine == "asgi":
        pytest.skip(
            ASGI_HEAD_LIMIT.format(
                what="the number of connections still sending their request "
                "(limits.pending_handshakes_per_address)"
            )
        )
    target = start({"limits": {"pending_handshakes_per_address": 2}})
    socks = [socket.create_connection(("127.0.0.1", target.port), timeout=5) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        got = answer(target.port, upgrade())
    finally:
        for sock in socks:
            sock.close()
    check(target, got, Refusal(429, "too_many_pending", (("Retry-After", "1"),)))


def test_server_full_is_503(start: Start) -> None:
    target = start({"limits": {"max_connections": 1}})
    with target.raw(make_token("alice")):
        got = answer(target.port, upgrade_request(token=make_token("bob")))
        check(target, got, Refusal(503, "server_full", retry_after=True), admitted=1)


def test_draining_is_503(start: Start) -> None:
    target = start()
    # the state a shutdown puts the node in while open connections drain
    target.call(lambda: setattr(target.guard.handshakes, "draining", True))
    check(target, answer(target.port, upgrade()), Refusal(503, "draining"))


# -- 2. the message policy: docs/reference/refusals.md, "The message policy" ------------


def assert_pong(client: RawClient, ident: str) -> None:
    client.send(ping_frame(ident))
    reply = client.recv_json()
    assert (reply["type"], reply["id"]) == ("pong", ident), reply


def next_close(client: RawClient) -> bytes:
    """The payload of the server's next close frame (other frames skipped, pings unanswered)."""
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_CLOSE:
            return payload


def finish(client: RawClient) -> None:
    """After the close frames: wait until the server closes TCP (RFC 6455 7.1.1), then
    close ours, as a client does."""
    with contextlib.suppress(ConnectionResetError):
        while client.sock.recv(65536):
            pass  # bounded by the socket's timeout: a server that never closes fails here
    client.sock.close()


def closed_with(client: RawClient) -> int:
    """The code of the server's close frame, answered with a close frame as a client does."""
    code = client.read_close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send(frame(OP_CLOSE, client.close_payload[:2]))
    finish(client)
    return code


def assert_closed(target: Target, client: RawClient, code: int, cause: str) -> None:
    """The server's close frame has *code* (answered as a client does); the audit log:
    closed by the server, for *cause*."""
    assert closed_with(client) == code
    record = target.closed()
    assert (record["code"], record["closed_by"], record.get("cause")) == (code, "server", cause)


LIMIT = 1024  # limits.max_message_bytes of the size tests
SMALL = {"limits": {"max_message_bytes": LIMIT}}


def test_message_over_the_limit_in_one_frame_closes_1009(start: Start) -> None:
    target = start(SMALL)
    exact = b'{"type":"ping","id":"edge"}'.ljust(LIMIT)
    with target.raw() as client:
        client.send(frame(OP_TEXT, exact))
        assert client.recv_json()["id"] == "edge"  # at the limit: delivered
        client.send(frame(OP_TEXT, exact + b" "))
        # under ASGI uvicorn's own frame limit (ws_max_size = limits.max_message_bytes)
        # closes it, and the middleware records that as wsguard records its own 1009
        assert_closed(target, client, 1009, "too_big")


def test_message_over_the_limit_in_fragments_closes_1009(start: Start) -> None:
    target = start(SMALL)
    with target.raw() as client:
        body = b'{"type":"ping","id":"frag"}'
        client.send(
            frame(OP_TEXT, body[:5], fin=False)
            + frame(OP_CONT, body[5:12], fin=False)
            + frame(OP_CONT, body[12:])
        )
        assert client.recv_json()["id"] == "frag"  # reassembled under the limit
        chunk = b" " * 400  # each fragment under the limit, three of them over it
        client.send(
            b"".join(frame(OP_TEXT if i == 0 else OP_CONT, chunk, fin=False) for i in range(3))
        )
        # the ASGI server reassembles fragments; its ws_max_size closes (see above)
        assert_closed(target, client, 1009, "too_big")


def test_binary_frame_closes_1003(start: Start) -> None:
    target = start()
    with target.raw() as client:
        client.send(frame(OP_BINARY, b"\x00\x01binary"))
        assert_closed(target, client, 1003, "binary")


ERROR_CASES = [
    ("invalid_json", b'{"type": "ping", "id": ', {"type": "error", "code": "invalid_json"}),
    (
        "invalid_message",
        b'{"type": "chat", "text": 5, "id": "m1"}',
        {"type": "error", "code": "invalid_message", "pointer": "/text", "ref": "m1"},
    ),
    (
        "unknown_type",
        b'{"type": "launch", "id": "u1"}',
        {"type": "error", "code": "unknown_type", "ref": "u1"},
    ),
    (
        "forbidden",
        b'{"type": "command", "name": "reload", "id": "c1"}',
        {"type": "error", "code": "forbidden", "ref": "c1"},
    ),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(p, e) for _, p, e in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_refused_message_gets_an_error_frame(
    start: Start, payload: bytes, expected: dict[str, Any]
) -> None:
    target = start()
    with target.raw(make_token("alice", scopes="chat")) as client:
        client.send(frame(OP_TEXT, payload))
        error = client.recv_json()
        assert isinstance(error.pop("message"), str)
        assert error == expected
        assert_pong(client, "after")  # the connection survives


def test_rate_limited_error_carries_retry_after_and_ref(start: Start) -> None:
    target = start({"limits": {"messages_per_minute": 60, "message_burst": 2}})
    with target.raw() as client:
        client.send(b"".join(ping_frame(f"r{i}") for i in range(3)))
        first, second, third = (client.recv_json() for _ in range(3))
        assert [first["type"], second["type"]] == ["pong", "pong"]
        assert (third["type"], third["code"], third["ref"]) == ("error", "rate_limited", "r2")
        assert 0 < third["retry_after"] <= 1.0


def test_violations_past_the_budget_close_1008(start: Start) -> None:
    target = start({"limits": {"violation_budget": 3}})
    with target.raw() as client:
        for _ in range(3):
            client.send(frame(OP_TEXT, b"{bad"))
            assert client.recv_json()["code"] == "invalid_json"
        client.send(frame(OP_TEXT, b"{bad"))
        assert_closed(target, client, 1008, "invalid_json")
        assert b"bad" not in client.close_payload


def test_expired_token_closes_4001(start: Start) -> None:
    target = start()
    # 2.5 s: the handshake (under ASGI, through uvicorn) must finish before it expires,
    # also on a loaded machine; the close comes at expiry, within the client's 5 s reads
    with target.raw(make_token(exp=time.time() + 2.5)) as client:
        assert_closed(target, client, 4001, "token_expired")


@pytest.mark.parametrize(
    ("liveness", "cause"),
    [
        ({"idle_timeout_seconds": 0.3}, "idle_timeout"),
        ({"max_lifetime_seconds": 0.3}, "max_lifetime"),
    ],
    ids=["idle", "lifetime"],
)
def test_idle_and_lifetime_close_1001(start: Start, liveness: dict[str, Any], cause: str) -> None:
    target = start({"liveness": liveness})
    with target.raw() as client:
        assert_closed(target, client, 1001, cause)


ASGI_NO_PINGS = (
    "ASGI exposes no ping/pong frames: keepalive pings and their timeout are the ASGI "
    "server's (uvicorn's ws_ping_interval / ws_ping_timeout), not liveness.ping_*"
)
QUICK_PINGS = {"liveness": {"ping_interval_seconds": 0.2, "ping_timeout_seconds": 0.2}}


def close_code(client: RawClient) -> int:
    """Read (never answering a ping: RawClient.read_close would) up to the close frame."""
    payload = next_close(client)
    finish(client)
    return int.from_bytes(payload[:2], "big")


def test_unanswered_pings_close_1011(start: Start, engine: str) -> None:
    if engine == "asgi":
        pytest.skip(ASGI_NO_PINGS)
    target = start(QUICK_PINGS)
    with target.raw() as client:
        assert close_code(client) == 1011
    record = target.closed()
    assert (record["code"], record["closed_by"]) == (1011, "server")


# -- 3. wire bounds: RFC 6455 framing --------------------------------------------------------


FAILURE_CAUSES = {1002: "protocol_error", 1007: "invalid_utf8", 1009: "too_big"}


def assert_failed(target: Target, code: int) -> None:
    """The audit record of a connection the server failed with *code*: closed by the
    server, with the cause of that code (under ASGI: ASGI_SERVER_FAILURE)."""
    record = target.closed()
    want = (code, "server", FAILURE_CAUSES[code])
    assert (record["code"], record["closed_by"], record.get("cause")) == want, record


def test_fragment_count_is_capped_1009(start: Start, engine: str) -> None:
    """``limits.max_fragments``: a message in more fragments closes 1009, however small."""
    if engine == "asgi":
        pytest.skip(
            "the ASGI server reassembles fragmented messages and bounds only their total "
            "size (ws_max_size); the middleware sees whole messages, so limits.max_fragments "
            "cannot apply"
        )
    # every fragment counts as a message: a burst that lets 33 of them through
    target = start({"limits": {"max_fragments": 16, "message_burst": 100}})

    def fragmented(body: bytes, count: int) -> bytes:
        step = -(-len(body) // count)
        parts = [body[i : i + step] for i in range(0, len(body), step)]
        assert len(parts) == count
        return b"".join(
            frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == count - 1)
            for i, part in enumerate(parts)
        )

    with target.raw() as client:
        client.send(fragmented(b'{"type":"ping","id":"sixteen"}'.ljust(32), 16))
        assert client.recv_json()["id"] == "sixteen"  # at the cap: delivered
        client.send(fragmented(b'{"type":"ping","id":"seventeen"}'.ljust(34), 17))
        assert_closed(target, client, 1009, "too_big")


@pytest.mark.parametrize(
    "connection",
    ["keep-alive, Upgrade", "Upgrade, keep-alive", "keep-alive\r\nConnection: Upgrade"],
    ids=["firefox", "upgrade-first", "two-lines"],
)
def test_a_connection_header_listing_upgrade_is_admitted(start: Start, connection: str) -> None:
    """``Connection`` is a list of tokens (RFC 7230 §6.1); Firefox sends
    ``keep-alive, Upgrade``. Every engine admits it."""
    target = start()
    request = upgrade_request(token=make_token()).replace(
        b"Connection: Upgrade", f"Connection: {connection}".encode()
    )
    assert answer(target.port, request).status == 101


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (unmasked) frames in *data*: opcode and payload."""
    frames = []
    while len(data) >= 2:
        n, at = data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        frames.append((data[0] & 0x0F, data[at : at + n]))
        data = data[at + n :]
    return frames


def read_response_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head and what followed it in the same reads."""
    head, _, rest = read_head(sock).partition(b"\r\n\r\n")
    return head, rest


def test_frames_sent_with_the_request_are_answered_after_the_101(start: Start, engine: str) -> None:
    """A client may send its first frames right behind its request, in one packet: the
    response starts with the status line, frames only follow an admission, and the
    early frames are handled then, in order (RFC 6455 §4.2.2)."""
    if engine == "asgi":
        pytest.skip(ASGI_EARLY_FRAMES)
    target = start()
    ping = frame(OP_PING, b"early")
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(upgrade_request(token=make_token()) + ping + frame(OP_CLOSE, b"\x03\xe8"))
        head, rest = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 101 "), head
        data = rest
        while all(op != OP_CLOSE for op, _ in server_frames(data)):  # its close echoed
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    frames = server_frames(data)
    kinds = [(op, payload) for op, payload in frames if op in (OP_PONG, OP_CLOSE)]
    assert kinds == [(OP_PONG, b"early"), (OP_CLOSE, b"\x03\xe8")], frames


def test_frames_sent_with_a_refused_request_get_no_answer(start: Start) -> None:
    """Frames behind a request that is refused are never parsed: the refusal is the
    whole answer."""
    target = start()
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(upgrade_request() + frame(OP_PING, b"early"))  # no token
        head, rest = read_response_head(sock)
        data = rest
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
    assert status_of(head) == 401
    assert b"early" not in data and not head.startswith(b"\x8a")


ENGINE_FAILURES = [
    ("unmasked", lambda: bytes([0x80 | OP_TEXT, 2]) + b"{}", 1002, b"protocol error"),
    ("invalid-utf8", lambda: frame(OP_TEXT, b'"\xff"'), 1007, b"invalid UTF-8"),
    ("too-big", lambda: frame(OP_TEXT, b"x" * 70000), 1009, b"message too big"),
    ("reserved-bits", lambda: with_rsv(frame(OP_TEXT, b"{}"), 0x40), 1002, b"reserved bits set"),
    ("stray-continuation", lambda: frame(OP_CONT, b"x"), 1002, b"unexpected continuation frame"),
    (
        "new-message-mid-fragments",
        lambda: frame(OP_TEXT, b"{", fin=False) + frame(OP_TEXT, b"{}"),
        1002,
        b"expected a continuation frame",
    ),
    ("close-code-1005", lambda: frame(OP_CLOSE, b"\x03\xed"), 1002, b"protocol error"),
    ("close-code-5000", lambda: frame(OP_CLOSE, b"\x13\x88"), 1002, b"protocol error"),
]


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [f[1:] for f in ENGINE_FAILURES],
    ids=[f[0] for f in ENGINE_FAILURES],
)
def test_a_frame_the_parser_fails_is_closed_with_a_fixed_reason(
    start: Start, engine: str, data: Callable[[], bytes], code: int, reason: bytes
) -> None:
    """The close frame of a parser failure carries a short fixed reason, the same on
    every engine, never a quote of the client's frame."""
    if engine == "asgi":
        pytest.skip(ASGI_SERVER_FAILURE)
    target = start()
    with target.raw() as client:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(data())
        assert client.read_close() == code
        assert client.close_payload[2:] == reason


def with_rsv(data: bytes, bit: int) -> bytes:
    return bytes([data[0] | bit]) + data[1:]


@pytest.mark.parametrize("bit", [0x40, 0x20, 0x10], ids=["rsv1", "rsv2", "rsv3"])
def test_reserved_bits_without_an_extension_close_1002(start: Start, bit: int) -> None:
    target = start()
    with target.raw() as client:
        client.send(with_rsv(ping_frame("rsv"), bit))
        assert closed_with(client) == 1002
        assert client.texts == [], "the frame was handled"
    assert_failed(target, 1002)


@pytest.mark.parametrize("code", [0, 999, 1005, 1006, 1015, 5000])
def test_invalid_close_code_received_closes_1002(start: Start, code: int) -> None:
    target = start()
    with target.raw() as client:
        client.send(frame(OP_CLOSE, code.to_bytes(2, "big") + b"bye"))
        assert closed_with(client) == 1002
    assert_failed(target, 1002)


def test_invalid_utf8_text_closes_1007(start: Start) -> None:
    target = start()
    with target.raw() as client:
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"\xff\xfe"}'))
        assert closed_with(client) == 1007
    assert_failed(target, 1007)


FAILURES = [
    ("reserved-bits", lambda c: c.send(with_rsv(ping_frame("x"), 0x40)), 1002, "protocol_error"),
    ("close-code-1005", lambda c: c.send(frame(OP_CLOSE, b"\x03\xed")), 1002, "protocol_error"),
    ("invalid-utf8", lambda c: c.send(frame(OP_TEXT, b'"\xff"')), 1007, "invalid_utf8"),
    ("pings-unanswered", lambda c: None, 1011, "ping_timeout"),
]


@pytest.mark.parametrize(
    ("act", "code", "cause"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
def test_protocol_failures_are_audited_with_their_cause(
    start: Start, engine: str, act: Callable[[RawClient], None], code: int, cause: str
) -> None:
    """The audit record of a failed connection names why, whichever layer failed it
    (under ASGI the server's own parser: ASGI_SERVER_FAILURE)."""
    if engine == "asgi" and code == 1011:
        pytest.skip(ASGI_NO_PINGS)
    target = start(QUICK_PINGS if code == 1011 else None)
    with target.raw() as client:
        act(client)
        assert close_code(client) == code
    record = target.closed()
    assert (record["code"], record["closed_by"], record.get("cause")) == (code, "server", cause)


# -- close accounting in the audit log ----------------------------------------------------


def test_client_close_without_status_is_recorded_1005(start: Start) -> None:
    target = start()
    with target.raw() as client:
        assert_pong(client, "before")
        client.send(frame(OP_CLOSE))  # no status code
        next_close(client)  # answered (with no code, or 1000)
        finish(client)
    record = target.closed()
    assert (record["code"], record["closed_by"]) == (1005, "client")


def test_client_close_with_status_is_recorded_as_sent(start: Start) -> None:
    target = start()
    with target.raw() as client:
        client.send(frame(OP_CLOSE, (4000).to_bytes(2, "big") + b"done"))
        echo = next_close(client)
        assert echo[:2] == (4000).to_bytes(2, "big")  # echoed (RFC 6455 5.5.1)
        finish(client)
    record = target.closed()
    assert (record["code"], record["closed_by"]) == (4000, "client")


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_connection_lost_without_a_close_frame_is_1006_network(
    start: Start, engine: str, how: str
) -> None:
    target = start()
    client = target.raw()
    assert_pong(client, "before")
    if how == "reset":
        reset_close(client.sock)
    else:
        client.sock.close()
    record = target.closed()
    if engine == "asgi":
        # uvicorn (websockets-sansio) reports a connection lost without a close frame to
        # the application as code 1005, which ASGI cannot tell from a client's close
        # without a status code
        assert (record["code"], record["closed_by"]) == (1005, "client")
        return
    assert (record["code"], record["closed_by"]) == (1006, "network")
