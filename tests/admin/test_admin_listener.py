"""The admin listener as a server: what it answers, to whom, and for how long.

Slowloris limits (a deadline per request head, a cap on open connections), the Host
allowlist against DNS rebinding (``admin.hosts``), one AEAD-only TLS policy shared with
the public listener, and its start: a failed start leaves no admin listener behind, and
``/readyz`` answers 503 ``starting`` until the public listener is up.

Every test runs real servers on loopback ports, with real sockets and HTTP clients.
Nothing sleeps for timing: asynchronous effects are polled for under a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import ssl
import time
from typing import Any

import httpx
import pytest

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
    status_of,
    upgrade_request,
)
from support.admin import ROOMY, Certificates, admin_port, admin_server, call, request
from support.net import free_port
from support.wire import open_socket, response_head
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"

#: TLS 1.2 suites in CBC mode (RSA and ECDSA keys), none of them AEAD.
CBC_ONLY = ":".join(
    [
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-RSA-AES256-SHA",
        "ECDHE-RSA-AES128-SHA256",
        "AES128-SHA",
        "AES256-SHA",
        "AES128-SHA256",
    ]
)


# -- helpers ----------------------------------------------------------------------------


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


def healthz_ok(server: RunningServer) -> bool:
    try:
        return request(server, "GET", "/healthz").status_code == 200
    except httpx.HTTPError:
        return False


# -- slowloris ---------------------------------------------------------------------------


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
    deadline = 1.5  # generous: a loaded CI machine answers a probe slowly
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


def test_one_address_holding_half_sent_requests_cannot_shut_out_another(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unauthenticated client holding requests it never finishes gets at most
    ``MAX_PER_ADDRESS`` connections: the next is closed at once, and the probes of another
    address are still answered, however many of the listener's ``MAX_OPEN`` it tried to
    take."""
    monkeypatch.setattr(wsguard.admin.server, "MAX_PER_ADDRESS", 4)
    monkeypatch.setattr(wsguard.admin.server, "MAX_OPEN", 6)
    server = admin_server(server_factory)
    port = admin_port(server)

    def from_other_address() -> socket.socket:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
        )
        sock.sendall(HALF_SENT)
        return sock

    held = [from_other_address() for _ in range(4)]
    try:
        with from_other_address() as fifth:
            assert closed_by_server(fifth, 5), "a fifth connection from one address was kept"
        assert request(server, "GET", "/healthz").status_code == 200  # from 127.0.0.1
        for sock in held:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # still held, unanswered (the deadline is 10 s)
    finally:
        for sock in held:
            sock.close()


# -- the Host allowlist (DNS rebinding) ---------------------------------------------------


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
    assert f"wsguard_admin_session_{port}=" in accepted.headers["set-cookie"]


def test_dashboard_socket_from_a_rebound_host_is_not_opened(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    port = admin_port(server)
    name = f"wsguard_admin_session_{port}"
    session = login(server, f"127.0.0.1:{port}").cookies[name]

    def upgrade(host: str) -> int:
        head = response_head(
            port,
            upgrade_request(
                "/dashboard/live",
                host=host,
                headers={"Origin": f"http://{host}", "Cookie": f"{name}={session}"},
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


# -- one TLS policy for both listeners ----------------------------------------------------


def tls_handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Complete a TLS handshake with 127.0.0.1:*port*: (protocol version, cipher)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0]


def tls12_client(certs: Certificates, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = certs.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def test_admin_tls_offers_only_the_public_listeners_aead_suites(
    server_factory: ServerFactory, certs: Certificates
) -> None:
    server = server_factory({**ROOMY, "tls": certs.pair, **admin_overrides(tls=certs.pair)})
    listeners = {"public": server.port, "admin": admin_port(server)}
    for name, port in listeners.items():
        with pytest.raises(ssl.SSLError):
            tls_handshake(port, tls12_client(certs, CBC_ONLY))
        version, cipher = tls_handshake(port, tls12_client(certs))
        assert version == "TLSv1.2", name
        assert "GCM" in cipher or "CHACHA20" in cipher, (name, cipher)
        assert tls_handshake(port, certs.client_context())[0] == "TLSv1.3", name
    # and the admin API still answers over it
    base = f"https://127.0.0.1:{listeners['admin']}"
    response = call(base, "GET", "/connections", verify=tls12_client(certs))
    assert response.status_code == 200, response.text


# -- a failed start leaves no admin listener; /readyz while starting ----------------------


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
