"""Who may use the admin listener: its credential, checked end to end.

* wrong admin tokens never lock out the right one: only failures are throttled (the JSON
  API, the dashboard's login and its WebSocket), only presented credentials count (a
  request without one is refused but never locks its address out), and the failure table
  counts IPv6 addresses per /64 and stays bounded without unlocking a locked address;
* the admin CA is told apart from the users' CA by certificate fingerprints, not file
  paths, and ``admin.client_subjects`` pins which admin certificates are admins.

Real listeners (both engines), real HTTP and WebSocket clients and real ``trustme``
certificates. Asynchronous effects are polled with a deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.typing import Origin

from conftest import (
    ADMIN_TOKEN,
    RunningServer,
    ServerFactory,
    admin_headers,
    make_config,
    status_of,
    upgrade_request,
)
from support.admin import (
    ROOMY,
    Certificates,
    admin_port,
    admin_server,
    call,
    cookie_attributes,
    dashboard_url,
    error_of,
    first_snapshot,
    refused_upgrade,
    request,
)
from support.wire import response_head
from wsguard.admin.credentials import (
    _MAX_TRACKED,
    FAILURES_ALLOWED,
    SESSION_COOKIE,
    AdminCredentials,
)
from wsguard.admin.server import AdminServer
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.observability.audit import AuditLog

#: Routes that need the admin credential, with a request each that the API accepts.
PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/connections", None),
    ("GET", "/connections/x", None),
    ("POST", "/disconnect", {"subject": "nobody"}),
    ("POST", "/revoke", {"jti": "nothing"}),
    ("GET", "/bans", None),
    ("POST", "/bans", {"address": "192.0.2.1", "seconds": 5}),
    ("DELETE", "/bans/192.0.2.1", None),
    ("GET", "/alerts", None),
    ("GET", "/events", None),
]

WRONG = [f"wrong-{n:02d}-0123456789abcdefghijklmn" for n in range(FAILURES_ALLOWED + 2)]


# -- wrong tokens never lock out the right one -------------------------------------------


def test_wrong_tokens_never_lock_out_the_right_one(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    base = server.admin_url
    for n in range(FAILURES_ALLOWED):
        assert call(base, "GET", "/connections", token=WRONG[n]).status_code == 401, n
    blocked = call(base, "GET", "/connections", token=WRONG[FAILURES_ALLOWED])
    assert blocked.status_code == 429
    assert error_of(blocked) == "too_many_failures"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60

    # the right token is never refused by the failure throttle, on any route
    for method, path, body in PROTECTED:
        response = call(base, method, path, json_body=body)
        assert response.status_code not in (401, 429), (method, path, response.text)
    revoked = call(base, "POST", "/revoke", json_body={"subject": "mallory"})
    assert revoked.status_code == 200, revoked.text

    # wrong tokens from that address are still throttled, before and after the right one
    again = call(base, "GET", "/alerts", token=WRONG[FAILURES_ALLOWED + 1])
    assert again.status_code == 429
    assert int(again.headers["retry-after"]) >= 1
    assert len(server.audit.events("admin_auth_failed")) == FAILURES_ALLOWED
    assert {e["action"] for e in server.audit.events("admin_action")} >= {"revoke", "disconnect"}


def test_wrong_tokens_never_lock_the_operator_out_of_the_dashboard(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    base = server.admin_url
    own = {"Origin": base}
    for n in range(FAILURES_ALLOWED):
        wrong = call(base, "POST", "/login", token=None, headers=own, json_body={"token": WRONG[n]})
        assert wrong.status_code == 401, n
    blocked = call(base, "POST", "/login", token=None, headers=own, json_body={"token": WRONG[-1]})
    assert blocked.status_code == 429
    assert "retry-after" in blocked.headers
    assert "set-cookie" not in blocked.headers

    ok = call(base, "POST", "/login", token=None, headers=own, json_body={"token": ADMIN_TOKEN})
    assert ok.status_code == 200, ok.text
    name, session, _ = cookie_attributes(ok.headers["set-cookie"])
    assert name == f"{SESSION_COOKIE}_{admin_port(server)}"
    page = call(base, "GET", "/dashboard", token=None, headers={"Cookie": f"{name}={session}"})
    assert page.status_code == 200

    # the dashboard's WebSocket: the admin token opens it, a wrong one is still throttled
    url, origin = dashboard_url(base), Origin(base)
    snapshot = first_snapshot(url, origin=origin, additional_headers=admin_headers())
    assert snapshot["type"] == "snapshot"
    wrong_bearer = {"Authorization": f"Bearer {WRONG[0]}"}
    assert refused_upgrade(url, origin=origin, additional_headers=wrong_bearer) == 429


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


def test_a_locked_out_dashboard_socket_is_told_when_to_try_again(
    server_factory: ServerFactory,
) -> None:
    """The dashboard WebSocket's 429 carries Retry-After, as the API's, and the listener's
    security headers, as every answer of the admin listener."""
    server = admin_server(server_factory)
    port = admin_port(server)
    for n in range(FAILURES_ALLOWED + 1):
        wrong = {"Authorization": f"Bearer guess-{n:02d}-0123456789abcdefghij"}
        request(server, "GET", "/connections", headers=wrong)
    headers = {
        "Origin": f"http://127.0.0.1:{port}",
        "Authorization": "Bearer wrong-0123456789abcdef",
    }
    head = response_head(
        port, upgrade_request("/dashboard/live", host=f"127.0.0.1:{port}", headers=headers)
    ).decode("latin-1")
    assert head.startswith("HTTP/1.1 429 "), head
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
    }
    assert fields.get("retry-after", "").isdigit() and int(fields["retry-after"]) >= 1, fields
    assert fields.get("x-content-type-options") == "nosniff", fields
    assert fields.get("cache-control") == "no-store", fields


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


# -- the failure table: per-/64 counting, bounded ------------------------------------------


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


# -- the admin CA and the admin certificates -----------------------------------------------


def ca_separation_config(certs: Certificates, admin_ca_file: Path, users_ca: Path) -> Any:
    return make_config(
        {
            **ROOMY,
            "tls": {**certs.pair, "client_ca_file": str(users_ca)},
            "admin": {"port": 0, "tls": {**certs.pair, "client_ca_file": str(admin_ca_file)}},
        }
    )


def test_a_copy_of_the_users_ca_is_refused_as_the_admin_ca(certs: Certificates) -> None:
    users_ca, admin_ca = trustme.CA(), trustme.CA()
    users_file = certs.ca_file("ca.pem", users_ca)
    refused = {
        "a copy at another path": certs.ca_file("admin/ca.pem", users_ca),
        "a bundle holding it": certs.ca_file("admin/bundle.pem", admin_ca, users_ca),
    }
    for what, admin_file in refused.items():
        config = ca_separation_config(certs, admin_file, users_file)
        with pytest.raises(ConfigError) as info:
            AdminServer(App(config))
        assert info.value.key == "admin.tls.client_ca_file", what
        assert "tls.client_ca_file" in info.value.message, what

        app = App(config)
        with pytest.raises(ConfigError) as started:
            asyncio.run(app.start())
        assert started.value.key == "admin.tls.client_ca_file", what
        assert app.port is None and app.admin is None, what  # nothing listens

    # a CA of its own is accepted (the bundle of the users' CA's sibling too)
    own = ca_separation_config(certs, certs.ca_file("admin/own.pem", admin_ca), users_file)
    assert AdminServer(App(own)).scheme == "https"


def pinned_admin(
    server_factory: ServerFactory, certs: Certificates, admin_ca: trustme.CA, pins: list[str]
) -> RunningServer:
    admin_file = certs.ca_file("admin-ca.pem", admin_ca)
    return server_factory(
        {
            **ROOMY,
            "admin": {
                "port": 0,
                "client_subjects": pins,
                "tls": {**certs.pair, "client_ca_file": str(admin_file)},
            },
        }
    )


def test_admin_client_subjects_pin_which_admin_certificates_are_admins(
    server_factory: ServerFactory, certs: Certificates
) -> None:
    admin_ca = trustme.CA()
    server = pinned_admin(server_factory, certs, admin_ca, ["CN=ops", "CN=auditor, O=Example"])
    base = f"https://127.0.0.1:{admin_port(server)}"
    wss, origin = dashboard_url(base), Origin(base)

    ops = certs.client_context(admin_ca.issue_cert("ops@example.com", common_name="ops"))
    response = call(base, "GET", "/connections", token=None, verify=ops)
    assert response.status_code == 200, response.text
    banned = call(base, "POST", "/bans", token=None, verify=ops, json_body={"address": "192.0.2.9"})
    assert banned.status_code == 201, banned.text
    assert call(base, "GET", "/dashboard", token=None, verify=ops).status_code == 200
    assert first_snapshot(wss, origin=origin, ssl=ops)["type"] == "snapshot"

    # verified by the admin CA, but not a pinned subject: forbidden everywhere but probes
    eve = admin_ca.issue_cert("eve@example.com", common_name="eve")
    # an auditor of another organisation: O is named in the pin, so it is compared
    auditor = admin_ca.issue_cert("auditor@example.com", common_name="auditor")
    for cert in (eve, auditor):
        ctx = certs.client_context(cert)
        for method, path, body in PROTECTED:
            response = call(base, method, path, token=None, verify=ctx, json_body=body)
            assert response.status_code == 403, (method, path, response.text)
            assert error_of(response) == "certificate_forbidden"
        assert call(base, "GET", "/dashboard", token=None, verify=ctx).status_code == 403
        assert refused_upgrade(wss, origin=origin, ssl=ctx) == 403
        assert call(base, "GET", "/healthz", token=None, verify=ctx).status_code == 200
    bans = [e for e in server.audit.events("ban_started") if e["reason"] == "admin"]
    assert [e["client"] for e in bans] == ["192.0.2.9"]  # the forbidden POST /bans did nothing
    refused = server.audit.events("admin_auth_failed")
    assert refused and {e["credential"] for e in refused} == {"certificate"}
    assert any("CN=eve" in e["subject"] for e in refused)


def test_admin_certificates_are_verified_on_every_connection(
    server_factory: ServerFactory, certs: Certificates
) -> None:
    """A resumed TLS session skips the client chain's verification (an expired or
    removed certificate would go on for a ticket's lifetime): with admin client
    certificates no session resumes, and TLS 1.2 (which resumes by session id whatever
    the server's tickets) is not offered."""
    import socket
    import ssl

    admin_ca = trustme.CA()
    port = admin_port(pinned_admin(server_factory, certs, admin_ca, []))
    ops = admin_ca.issue_cert("ops@example.com", common_name="ops")

    def healthz(ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert tls.recv(4096).startswith(b"HTTP/1.1 200"), "the probe is answered"
        return tls

    ctx = certs.client_context(ops)
    with healthz(ctx) as first:
        session = first.session
    with healthz(ctx, session) as second:
        assert not second.session_reused
    old = certs.client_context(ops)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        healthz(old).close()


@pytest.mark.parametrize(
    ("pins", "tls", "needle"),
    [
        (["ops"], True, "attribute=value"),
        (["XQ=ops"], True, "XQ"),
        (["CN="], True, "empty"),
        (["CN=ops"], False, "client_ca_file"),
    ],
    ids=["no-attribute", "unknown-attribute", "empty-value", "without-mtls"],
)
def test_client_subjects_are_checked_when_the_configuration_loads(
    certs: Certificates, pins: list[str], tls: bool, needle: str
) -> None:
    admin: dict[str, Any] = {"port": 0, "token": ADMIN_TOKEN, "client_subjects": pins}
    if tls:
        admin["tls"] = {**certs.pair, "client_ca_file": str(certs.ca_file("a.pem", trustme.CA()))}
    with pytest.raises(ConfigError) as info:
        make_config({"admin": admin})
    assert info.value.key == "admin.client_subjects"
    assert needle in info.value.message
