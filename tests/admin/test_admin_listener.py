"""Regression tests for the admin listener's security-review fixes.

Slowloris limits of the admin listener (a deadline per request, a cap on open
connections), the credential lock-out counting only presented credentials, the Host
allowlist against DNS rebinding, per-/64 and bounded failure tracking, ban extension
and index trimming in the Redis store, IPv6 unban by the listed key, a failed start
that leaves no admin listener behind (and ``/readyz`` while starting), the webhook
sender recovering from a broken HTTP client, notable events surviving a refusal
flood, the default auth-failure rule firing with default limits, and the CLI not
sending the admin token through a proxy to a loopback listener.

Every test runs real servers on loopback ports, real sockets, HTTP and WebSocket
clients, a real redis-server and the real ``wsguard`` executable. Nothing sleeps for
timing: asynchronous effects are polled for under a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from test_alerts import NO_DEFAULT_RULES, ROOMY_LIMITS, WRONG_SECRET, WebhookReceiver

import wsguard.admin.server
import wsguard.engines.websockets_impl
from conftest import (
    ADMIN_TOKEN,
    AuditCapture,
    RunningServer,
    ServerFactory,
    admin_headers,
    admin_overrides,
    eventually,
    make_config,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from support.cli import cli_env
from support.paths import WSGUARD
from wsguard.admin.credentials import _MAX_TRACKED, FAILURES_ALLOWED, AdminCredentials
from wsguard.config.model import ClusterConfig
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog
from wsguard.stores.base import Store
from wsguard.stores.memory import MemoryStore
from wsguard.stores.redis_store import RedisStore

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

#: Limits roomy enough that the tests' own handshakes never trip them.
ROOMY: dict[str, Any] = {
    "limits": {
        "connections_per_address": 50,
        "connections_per_subject": 50,
        "handshakes_per_minute": 1000,
        "auth_failures_before_ban": 1000,
    }
}


# -- helpers ----------------------------------------------------------------------------


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["message"]
    return str(body["error"])


def admin_server(server_factory: ServerFactory, **overrides: Any) -> RunningServer:
    """A demo server with roomy limits and the admin listener (token ``ADMIN_TOKEN``)."""
    return server_factory({**ROOMY, **admin_overrides(), **overrides})


def admin_port(server: RunningServer) -> int:
    port = server.app.admin_port
    assert port is not None
    return port


def request(
    server: RunningServer,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
) -> httpx.Response:
    """One admin request without proxies from the environment (the tests set some)."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.request(method, server.admin_url + path, headers=headers, json=json_body)


def admin_json(server: RunningServer, path: str) -> dict[str, Any]:
    response = request(server, "GET", path, headers=admin_headers())
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of GET /metrics (0 when the labelled sample is not exposed yet)."""
    response = request(server, "GET", "/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def open_socket(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes *sock* within *within* s without answering anything."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if not data:
            return True
        pytest.fail(f"the server answered a request it should not have: {data[:200]!r}")


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response (with Content-Length) read from *sock*: status and body."""
    sock.settimeout(5)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection mid-response: {buffer!r}"
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    assert len(body) == length, "more bytes than one response"
    return status_of(head + b"\r\n\r\n"), body


def response_head(port: int, data: bytes) -> bytes:
    """Send *data*; the response head the server answers (up to the blank line)."""
    with open_socket(port, data) as sock:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buffer += chunk
        return buffer.partition(b"\r\n\r\n")[0]


def healthz_ok(server: RunningServer) -> bool:
    try:
        return request(server, "GET", "/healthz").status_code == 200
    except httpx.HTTPError:
        return False


# -- 1. slowloris on the admin listener -------------------------------------------------


def test_an_incomplete_request_head_is_closed_after_the_deadline(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsguard.admin.server, "REQUEST_DEADLINE", 0.5)
    server = admin_server(server_factory)
    with open_socket(admin_port(server), HALF_SENT) as sock:
        assert closed_by_server(sock, 5), "a half-sent request head is kept open"
    assert request(server, "GET", "/healthz").status_code == 200


def test_a_request_head_dripped_slowly_does_not_extend_the_deadline(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsguard.admin.server, "REQUEST_DEADLINE", 0.5)
    server = admin_server(server_factory)
    deadline = time.monotonic() + 5
    with open_socket(admin_port(server), b"GET /healthz HTTP/1.1\r\n") as sock:
        n = 0
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                assert closed_by_server(sock, 1)
                return
            try:
                sock.sendall(f"X-Drip-{n}: x\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                return  # closed by the server
            n += 1
    pytest.fail("a request head sent one header line at a time is kept open")


def test_completed_requests_on_a_keep_alive_connection_are_answered_past_the_deadline(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deadline = 0.6
    monkeypatch.setattr(wsguard.admin.server, "REQUEST_DEADLINE", deadline)
    server = admin_server(server_factory)
    started = time.monotonic()
    with open_socket(admin_port(server)) as sock:
        answered = 0
        # each request completes well within the deadline; together they outlast it twice
        while answered < 3 or time.monotonic() - started < 2 * deadline:
            sock.sendall(HEALTHZ)
            status, body = read_response(sock)
            assert status == 200, body
            assert json.loads(body)["status"] == "ok"
            answered += 1
            # a pause shorter than the deadline; the server must not close meanwhile
            readable, _, _ = select.select([sock], [], [], deadline / 3)
            assert not readable, f"the keep-alive connection was closed after {answered} requests"
    assert answered >= 3


def test_connections_beyond_max_open_are_closed_at_once_and_probes_recover(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsguard.admin.server, "REQUEST_DEADLINE", 1.0)
    monkeypatch.setattr(wsguard.admin.server, "MAX_OPEN", 5)
    server = admin_server(server_factory)
    port = admin_port(server)
    held = [open_socket(port, HALF_SENT) for _ in range(5)]
    try:
        # a sixth connection, even with a complete request, is closed without an answer
        with open_socket(port) as sixth:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sixth.sendall(HEALTHZ)  # unless already closed by the server
            assert closed_by_server(sixth, 5), "the sixth connection was kept open"
        # the deadline closes the half-sent requests, then probes are answered again
        for sock in held:
            assert closed_by_server(sock, 5), "a half-sent request outlived the deadline"
        eventually(lambda: healthz_ok(server), 5, "GET /healthz answered 200 again")
    finally:
        for sock in held:
            sock.close()


# -- 2. the lock-out counts presented credentials only ----------------------------------


def test_requests_without_a_credential_do_not_lock_the_address_out(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    for n in range(15):
        response = request(server, "GET", "/connections")
        assert response.status_code == 401, (n, response.text)
        assert error_of(response) == "unauthorized"
    assert len(server.audit.events("admin_auth_failed")) == 15  # still audited
    assert request(server, "GET", "/connections", headers=admin_headers()).status_code == 200


def test_dashboard_socket_attempts_without_a_credential_do_not_lock_out(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    port = admin_port(server)
    origin = {"Origin": f"http://127.0.0.1:{port}"}
    for _ in range(12):
        head = response_head(
            port, upgrade_request("/dashboard/live", host=f"127.0.0.1:{port}", headers=origin)
        )
        assert status_of(head + b"\r\n\r\n") == 401, head
    assert request(server, "GET", "/connections", headers=admin_headers()).status_code == 200


def test_wrong_credentials_still_lock_the_address_out(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    for n in range(FAILURES_ALLOWED):
        wrong = {"Authorization": f"Bearer guess-{n:02d}-0123456789abcdefghij"}
        assert request(server, "GET", "/connections", headers=wrong).status_code == 401
    wrong = {"Authorization": "Bearer guess-xx-0123456789abcdefghij"}
    blocked = request(server, "GET", "/connections", headers=wrong)
    assert blocked.status_code == 429
    assert error_of(blocked) == "too_many_failures"
    # the right token is never refused by the throttle
    assert request(server, "GET", "/connections", headers=admin_headers()).status_code == 200


# -- 3. the Host allowlist (DNS rebinding) ---------------------------------------------


def login(server: RunningServer, host: str) -> httpx.Response:
    """POST /login with the right token, sent with Host *host* and Origin ``http://host``."""
    return request(
        server,
        "POST",
        "/login",
        headers={"Host": host, "Origin": f"http://{host}"},
        json_body={"token": ADMIN_TOKEN},
    )


def test_unknown_host_is_refused_and_loopback_names_are_answered(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    port = admin_port(server)
    refused = request(server, "GET", "/healthz", headers={"Host": f"attacker.example:{port}"})
    assert refused.status_code == 421, refused.text
    assert refused.json()["error"] == "bad_host"
    assert refused.headers["cache-control"] == "no-store"  # still a wsguard response
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
        response = request(server, "GET", "/healthz", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)
    # the API refuses it before the credential is looked at
    response = request(
        server,
        "GET",
        "/connections",
        headers={"Host": f"attacker.example:{port}", **admin_headers()},
    )
    assert response.status_code == 421


def test_login_from_a_rebound_host_gets_no_session(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    port = admin_port(server)
    refused = login(server, f"attacker.example:{port}")
    assert refused.status_code == 421, refused.text
    assert "set-cookie" not in refused.headers
    accepted = login(server, f"127.0.0.1:{port}")  # the same request on the real name
    assert accepted.status_code == 200, accepted.text
    assert "wsguard_admin_session=" in accepted.headers["set-cookie"]


def test_dashboard_socket_from_a_rebound_host_is_not_opened(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    port = admin_port(server)
    session = login(server, f"127.0.0.1:{port}").cookies["wsguard_admin_session"]

    def upgrade(host: str) -> int:
        head = response_head(
            port,
            upgrade_request(
                "/dashboard/live",
                host=host,
                headers={"Origin": f"http://{host}", "Cookie": f"wsguard_admin_session={session}"},
            ),
        )
        return status_of(head + b"\r\n\r\n")

    assert upgrade(f"127.0.0.1:{port}") == 101  # the session and request are good
    status = upgrade(f"attacker.example:{port}")
    assert status != 101
    assert 400 <= status < 500


def test_configured_admin_hosts_are_answered(server_factory: ServerFactory) -> None:
    server = server_factory({**ROOMY, **admin_overrides(hosts=["admin.internal"])})
    port = admin_port(server)
    response = request(server, "GET", "/healthz", headers={"Host": f"admin.internal:{port}"})
    assert response.status_code == 200, response.text
    refused = request(server, "GET", "/healthz", headers={"Host": f"other.internal:{port}"})
    assert refused.status_code == 421


# -- 4. AdminCredentials: per-/64 counting, bounded table --------------------------------


def guard_credentials() -> AdminCredentials:
    guard = Guard(make_config(), audit=AuditLog(io.StringIO()))
    return AdminCredentials(
        ADMIN_TOKEN, mtls=False, session_seconds=60, address_key=guard.address_key
    )


def test_ipv6_failures_count_per_prefix() -> None:
    creds = guard_credentials()
    for n in range(1, FAILURES_ALLOWED + 1):
        assert creds.blocked_for(f"2001:db8::{n:x}") == 0
        creds.failed(f"2001:db8::{n:x}")
    assert creds.blocked_for("2001:db8::ff") > 0  # the same /64
    assert creds.blocked_for("2001:db8:0:0:ffff::1") > 0
    assert creds.blocked_for("2001:db9::1") == 0
    assert creds.blocked_for("2001:db8:0:1::1") == 0  # the next /64


def test_a_non_ip_address_is_counted_under_itself() -> None:
    creds = guard_credentials()
    for _ in range(FAILURES_ALLOWED):
        creds.failed("unknown")
    assert creds.blocked_for("unknown") > 0
    assert creds.blocked_for("127.0.0.1") == 0


def test_the_failure_table_stays_bounded() -> None:
    creds = guard_credentials()
    for n in range(12_000):
        creds.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        assert len(creds._failures) <= _MAX_TRACKED
    assert len(creds._failures) <= _MAX_TRACKED
    # the newest addresses are still tracked
    for _ in range(FAILURES_ALLOWED - 1):
        creds.failed("10.0.46.223")  # n = 11999
    assert creds.blocked_for("10.0.46.223") > 0


# -- 5. bans in the stores: never shortened, the index trimmed ---------------------------


async def close_store(store: Store) -> None:
    await asyncio.wait_for(store.close(), 10)


def store_of(kind: str, uri: str) -> tuple[Store, str]:
    prefix = f"hardening-{uuid.uuid4().hex[:12]}:"
    if kind == "memory":
        return MemoryStore(), prefix
    return RedisStore(uri, ClusterConfig(key_prefix=prefix, retry_seconds=0.1)), prefix


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    uri = request.getfixturevalue("redis_uri") if request.param == "redis" else "memory://"
    return request.param, uri


def test_a_shorter_ban_never_shortens_a_longer_one(store_kind: tuple[str, str]) -> None:
    kind, uri = store_kind

    async def scenario() -> None:
        store, _ = store_of(kind, uri)
        await store.start()
        try:
            await store.ban("addr:10.0.0.1", 60)
            await store.ban("addr:10.0.0.1", 5)
            assert await store.ban_remaining("addr:10.0.0.1") > 5
            listed = dict(await store.bans())
            assert listed["addr:10.0.0.1"] > 5
            await store.ban("addr:10.0.0.2", 5)  # a longer one does extend a shorter one
            await store.ban("addr:10.0.0.2", 60)
            assert await store.ban_remaining("addr:10.0.0.2") > 5
        finally:
            await close_store(store)

    asyncio.run(scenario())


def test_redis_ban_index_counts_bans_in_force_and_drops_expired_ones(redis_uri: str) -> None:
    index_client = redis.Redis.from_url(redis_uri, decode_responses=True)

    async def scenario() -> None:
        store, _ = store_of("redis", redis_uri)
        assert isinstance(store, RedisStore)
        await store.start()
        index = store._key("bans")
        try:
            await store.ban("addr:10.0.0.1", 0.2)
            await store.ban("addr:10.0.0.2", 0.2)
            await store.ban("addr:10.0.0.3", 60)
            assert await store.active_ban_count() == 3
            assert index_client.zcard(index) == 3

            deadline = time.monotonic() + 5
            while await store.active_ban_count() != 1:
                assert time.monotonic() < deadline, "the short bans did not expire"
                await asyncio.sleep(0.02)
            assert await store.ban_remaining("addr:10.0.0.1") == 0
            # the next write trims the expired members from the index
            await store.ban("addr:10.0.0.4", 60)
            members = {str(m) for m in index_client.zrange(index, 0, -1)}
            assert members == {"addr:10.0.0.3", "addr:10.0.0.4"}
            assert await store.active_ban_count() == 2
        finally:
            await close_store(store)

    try:
        asyncio.run(scenario())
    finally:
        index_client.close()


# -- 6. IPv6 unban by the listed key ------------------------------------------------------


def test_ipv6_ban_is_lifted_by_the_key_get_bans_lists(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    banned = request(
        server, "POST", "/bans", headers=admin_headers(), json_body={"address": "2001:db8::1"}
    )
    assert banned.status_code == 201, banned.text
    assert banned.json()["banned"] == "2001:db8::/64"
    listed = [b["address"] for b in admin_json(server, "/bans")["bans"]]
    assert listed == ["2001:db8::/64"]

    wrong_prefix = request(server, "DELETE", "/bans/2001:db8::/48", headers=admin_headers())
    assert wrong_prefix.status_code == 400, wrong_prefix.text
    assert error_of(wrong_prefix) == "invalid_address"
    assert [b["address"] for b in admin_json(server, "/bans")["bans"]] == listed

    lifted = request(server, "DELETE", f"/bans/{listed[0]}", headers=admin_headers())
    assert lifted.status_code == 200, lifted.text
    assert lifted.json() == {"unbanned": "2001:db8::/64"}
    assert admin_json(server, "/bans")["bans"] == []


# -- 7. a failed start leaves no admin listener; /readyz while starting -------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:*port*."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return False
    writer.close()
    return True


def test_a_failed_start_leaves_no_admin_listener() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        admin = free_port()
        config = make_config({"port": busy_port, "admin": {"port": admin, "token": ADMIN_TOKEN}})
        app = App(guard=Guard(config, audit=AuditLog(AuditCapture())))
        install_demo(app)

        async def scenario() -> None:
            try:
                with pytest.raises(OSError):
                    await app.start()
                assert app.admin is None
                assert app.admin_port is None
                # nothing listens on the admin port any more (checked while the loop runs)
                assert not await listening(admin)
            finally:
                if app.admin is not None:
                    await app.admin.stop()
                await app.guard.close()

        asyncio.run(scenario())


def test_readyz_is_503_starting_until_the_public_listener_is_up(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsguard.engines

    original = wsguard.engines.start_server
    seen: list[tuple[int, dict[str, Any]]] = []

    async def observed(name: str, app: App, ssl_context: Any) -> Any:
        # the admin listener is up, the public one not yet: ask it whether we are ready
        assert app.admin_port is not None
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{app.admin_port}/readyz")
        seen.append((response.status_code, response.json()))
        return await original(name, app, ssl_context)

    monkeypatch.setattr(wsguard.engines, "start_server", observed)
    server = admin_server(server_factory)
    assert seen == [(503, {"ready": False, "reason": "starting"})]
    ready = request(server, "GET", "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


# -- 8. the webhook sender restarts after its HTTP client failed --------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


def socksio_missing() -> bool:
    return importlib.util.find_spec("socksio") is None


def test_webhook_sender_starts_over_after_its_client_failed(
    server_factory: ServerFactory,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not socksio_missing():
        pytest.skip("socksio is installed: a SOCKS proxy setting does not break httpx here")
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    rule = {"events": ["auth"], "per": "address", "window_seconds": 60, "cooldown_seconds": 300}
    server = server_factory(
        {
            **admin_overrides(),
            "limits": ROOMY_LIMITS,
            "alerts": {
                "webhook_url": receiver.url,
                "webhook_retries": 0,
                "rules": {
                    **NO_DEFAULT_RULES,
                    # fires on the first auth failure of an address, then the other rule on
                    # the second (each is quiet for its cool-down afterwards)
                    "first_failure": {**rule, "threshold": 0},
                    "second_failure": {**rule, "threshold": 1},
                },
            },
        }
    )

    def fail_auth() -> None:
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as info:
            server.connect(make_token(secret=WRONG_SECRET), proxy=None).close()
        assert info.value.response.status_code == 401

    # httpx without socksio cannot create a client with a SOCKS proxy from the environment
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")
    fail_auth()
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="failed") == 1,
        5,
        "the first alert's post counted as failed",
    )
    assert receiver.count() == 0

    monkeypatch.delenv("ALL_PROXY")
    fail_auth()
    eventually(lambda: receiver.count() == 1, 5, "the second alert posted")
    assert receiver.posts()[0]["rule"] == "second_failure"
    eventually(
        lambda: metric(server, "wsguard_alert_webhooks_total", result="ok") == 1,
        5,
        "the second alert's post counted as ok",
    )
    assert metric(server, "wsguard_alert_webhooks_total", result="failed") == 1
    fired = [e["rule"] for e in server.audit.events("alert")]
    assert fired == ["first_failure", "second_failure"]


# -- 9. notable events survive a refusal flood --------------------------------------------


def test_a_ban_event_survives_a_flood_of_refusals(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    banned = request(
        server,
        "POST",
        "/bans",
        headers=admin_headers(),
        json_body={"address": "10.9.8.7", "seconds": 600},
    )
    assert banned.status_code == 201, banned.text

    for _ in range(250):
        answer = raw_http(server.port, b"BAD\r\n\r\n")
        assert status_of(answer) == 400

    def flooded() -> list[dict[str, Any]] | None:
        events: list[dict[str, Any]] = admin_json(server, "/events?limit=1000")["events"]
        return events if sum(e["kind"] == "refusal" for e in events) >= 200 else None

    events = eventually(flooded, 5, "the refusal flood in GET /events")
    bans = [e for e in events if e["kind"] == "ban" and e.get("client") == "10.9.8.7"]
    assert len(bans) == 1, [e for e in events if e["kind"] != "refusal"]
    times = [e["time"] for e in events]
    assert times == sorted(times, reverse=True)  # still newest first
    newest = admin_json(server, "/events?limit=1")["events"]
    assert newest[0]["kind"] == "refusal"


# -- 10. the per-address auth-failure rule sees an address keep trying through its ban --------


def guess_through_the_ban(server: RunningServer) -> list[dict[str, Any]]:
    """26 handshakes with a bad token from 127.0.0.1: 5 x 401, then 21 x 429 (banned).

    Returns the rule's firings (audit ``alert`` events), polled for.
    """
    from websockets.exceptions import InvalidStatus

    statuses: list[int] = []
    for _ in range(26):
        with pytest.raises(InvalidStatus) as info:
            server.connect(make_token(secret=WRONG_SECRET)).close()
        statuses.append(info.value.response.status_code)
    assert statuses == [401] * 5 + [429] * 21  # the default limits' handshake ban

    def fired() -> list[dict[str, Any]]:
        alerts = server.audit.events("alert")
        return [e for e in alerts if e["rule"] == "auth_failures_per_address"]

    alerts = eventually(fired, 5, "the auth_failures_per_address alert")
    assert len(alerts) == 1
    assert alerts[0]["client"] == "127.0.0.1"
    assert alerts[0]["count"] == 21
    return alerts


def test_default_auth_failure_rule_fires_with_default_limits(
    server_factory: ServerFactory,
) -> None:
    # only 5 attempts are auth refusals: the rule fires because it counts the banned ones
    server = server_factory(admin_overrides())  # default limits and alert rules
    rule = server.app.config.alerts.rules["auth_failures_per_address"]
    (alert,) = guess_through_the_ban(server)
    assert alert.get("ban_s") == (rule.ban_seconds or None)
    bans = {b["address"]: b["remaining_seconds"] for b in admin_json(server, "/bans")["bans"]}
    assert "127.0.0.1" in bans
    if not rule.ban_seconds:  # the default only alerts: the 60 s handshake ban stays
        assert bans["127.0.0.1"] <= 60
        assert [e["reason"] for e in server.audit.events("ban_started")] == ["auth_failures"]


def test_auth_failure_rule_ban_extends_the_handshake_ban(server_factory: ServerFactory) -> None:
    server = server_factory(
        {
            **admin_overrides(),
            "alerts": {"rules": {"auth_failures_per_address": {"ban_seconds": 900}}},
        }
    )
    (alert,) = guess_through_the_ban(server)
    assert alert["ban_s"] == 900

    def extended() -> list[dict[str, Any]] | None:
        bans = admin_json(server, "/bans")["bans"]
        found = [b for b in bans if b["address"] == "127.0.0.1" and b["remaining_seconds"] > 60]
        return found or None

    (ban,) = eventually(extended, 5, "the alert's 900 s ban of 127.0.0.1")
    assert ban["remaining_seconds"] <= 900
    reasons = [e["reason"] for e in server.audit.events("ban_started")]
    assert reasons == ["auth_failures", "alert:auth_failures_per_address"]


# -- 11. the CLI never sends the admin token through a proxy to loopback ---------------------


def test_cli_ignores_proxy_settings_for_a_loopback_admin_url(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(admin_overrides())
    request(server, "POST", "/bans", headers=admin_headers(), json_body={"address": "192.0.2.9"})
    env = cli_env(tmp_path, WSGUARD_ADMIN_TOKEN=ADMIN_TOKEN)
    for name in PROXY_VARIABLES:
        env.pop(name, None)
        env.pop(name.lower(), None)
    proxy = "http://127.0.0.1:1"
    env.update(HTTP_PROXY=proxy, http_proxy=proxy, ALL_PROXY=proxy, all_proxy=proxy)
    done = subprocess.run(
        [WSGUARD, "admin", "bans", "--url", server.admin_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [b["address"] for b in listed["bans"]] == ["192.0.2.9"]
    assert ADMIN_TOKEN not in done.stdout + done.stderr


def test_a_locked_out_address_stays_locked_when_the_table_is_full() -> None:
    """Spraying failures from many addresses must not evict (and so unlock) a locked one."""
    creds = guard_credentials()
    for _ in range(FAILURES_ALLOWED):
        creds.failed("192.0.2.1")
    assert creds.blocked_for("192.0.2.1") > 0
    for n in range(2 * _MAX_TRACKED):
        creds.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(creds._failures) <= _MAX_TRACKED
    assert creds.blocked_for("192.0.2.1") > 0
