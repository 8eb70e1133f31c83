"""The admin listener's security properties, each checked end to end.

1. wrong admin tokens never lock out the right one: only failures are throttled
   (the JSON API, the dashboard's login and its WebSocket);
2. the admin CA is told apart from the users' CA by certificate fingerprints, not
   file paths, and ``admin.client_subjects`` pins which admin certificates are admins;
3. cluster-wide operator actions are never reported done when the shared store could
   not carry them to the other nodes (503, audited), and an alert's ban is tried again
   until it reaches every node;
4. the admin listener's TLS offers AEAD suites only, the public listener's policy;
5. the dashboard's session cookie is ``__Host-`` prefixed on an HTTPS listener.

Real listeners (both engines), real HTTP and WebSocket clients, real ``trustme``
certificates and a real ``redis-server`` (whose writes are paused for a short
outage). Asynchronous effects are polled with a deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from conftest import (
    ADMIN_TOKEN,
    RunningServer,
    ServerFactory,
    admin_headers,
    admin_overrides,
    close_of,
    eventually,
    make_config,
    make_token,
)
from support.redis_process import RedisProcess
from wsguard.admin.credentials import FAILURES_ALLOWED, SESSION_COOKIE
from wsguard.admin.server import AdminServer
from wsguard.errors import ConfigError
from wsguard.hosts.app import App

ROOMY: dict[str, Any] = {
    "limits": {
        "connections_per_address": 50,
        "connections_per_subject": 50,
        "handshakes_per_minute": 1000,
        "auth_failures_before_ban": 1000,
    }
}

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
HOST_COOKIE = "__Host-" + SESSION_COOKIE

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
EVERY_CHECK_OPEN = {
    check: "open" for check in ("bans", "revocations", "nonces", "rate_limits", "connections")
}


# -- helpers ----------------------------------------------------------------------------


def admin_server(server_factory: ServerFactory, **overrides: Any) -> RunningServer:
    return server_factory({**ROOMY, **admin_overrides(), **overrides})


def admin_port(server: RunningServer) -> int:
    port = server.app.admin_port
    assert port is not None
    return port


def call(
    url: str,
    method: str,
    path: str,
    *,
    token: str | None = ADMIN_TOKEN,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    """One admin request (no proxy from the environment, no cookie jar)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    with httpx.Client(trust_env=False, timeout=10, verify=verify) as client:
        return client.request(method, url + path, headers=sent, json=json_body)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["message"]
    return str(body["error"])


def live_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/dashboard/live"


def refused_upgrade(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=5, **kwargs).close()
    return int(info.value.response.status_code)


def first_snapshot(url: str, **kwargs: Any) -> dict[str, Any]:
    with connect(url, open_timeout=5, **kwargs) as ws:
        message: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return message


def cookie_attributes(set_cookie: str) -> tuple[str, str, list[str]]:
    """(name, value, lower-cased attributes) of one Set-Cookie header."""
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    name, _, value = first.partition("=")
    return name, value, [part.lower() for part in rest]


@pytest.fixture
def clients() -> Iterator[list[ClientConnection]]:
    opened: list[ClientConnection] = []
    yield opened
    for ws in opened:
        ws.close()


def welcomed(
    server: RunningServer, clients: list[ClientConnection], subject: str
) -> tuple[ClientConnection, str]:
    ws = server.connect(make_token(subject))
    clients.append(ws)
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome", welcome
    return ws, str(welcome["connection_id"])


def assert_open(ws: ClientConnection, ident: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = json.loads(ws.recv(timeout=5))
    assert (pong["type"], pong["id"]) == ("pong", ident), pong


class Certificates:
    """A server certificate for the listeners (from *server_ca*), as files."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.server_ca = trustme.CA()
        leaf = self.server_ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = tmp_path / "server.pem", tmp_path / "server.key"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_file))
        leaf.private_key_pem.write_to_path(str(self.key_file))

    @property
    def pair(self) -> dict[str, str]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}

    def ca_file(self, name: str, *cas: trustme.CA) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(ca.cert_pem.bytes() for ca in cas))
        return path

    def client_context(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.server_ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


# -- 1. wrong tokens never lock out the right one -----------------------------------------


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
    assert name == SESSION_COOKIE
    page = call(base, "GET", "/dashboard", token=None, headers={"Cookie": f"{name}={session}"})
    assert page.status_code == 200

    # the dashboard's WebSocket: the admin token opens it, a wrong one is still throttled
    url, origin = live_url(base), Origin(base)
    snapshot = first_snapshot(url, origin=origin, additional_headers=admin_headers())
    assert snapshot["type"] == "snapshot"
    wrong_bearer = {"Authorization": f"Bearer {WRONG[0]}"}
    assert refused_upgrade(url, origin=origin, additional_headers=wrong_bearer) == 429


# -- 2. the admin CA and the admin certificates -------------------------------------------


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
    wss, origin = live_url(base), Origin(base)

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


# -- 3. operator actions that cannot reach every node are not reported done ----------------


@contextlib.contextmanager
def writes_paused(redis_process: RedisProcess) -> Iterator[None]:
    """A short Redis outage: write commands (PUBLISH and scripts among them) hang."""
    with redis_process.client() as client:
        client.client_pause(60_000, all=False)
        try:
            yield
        finally:
            client.client_unpause()


def unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert error_of(response) == "store_unavailable"
    assert int(response.headers["retry-after"]) >= 1


def test_a_disconnect_the_other_nodes_never_got_is_a_503_not_a_200(
    server_factory: ServerFactory, own_redis: RedisProcess, clients: list[ClientConnection]
) -> None:
    a = admin_server(server_factory, store=own_redis.uri)
    b = server_factory({**ROOMY, "store": own_redis.uri})
    alice, alice_id = welcomed(b, clients, "alice")
    bob, _ = welcomed(b, clients, "bob")
    with writes_paused(own_redis):
        unavailable(call(a.admin_url, "POST", "/disconnect", json_body={"subject": "alice"}))
        unavailable(call(a.admin_url, "DELETE", f"/connections/{alice_id}"))
        assert_open(alice, "not-disconnected")  # as the answers said: nothing reached node B
    failed = a.audit.events("admin_action_failed")
    assert [(e["action"], e["target"]) for e in failed] == [
        ("disconnect", "sub"),
        ("disconnect", "id"),
    ]
    assert all(e["client"] == "127.0.0.1" and e["check"] for e in failed)
    assert a.audit.events("admin_action") == []

    # once the store answers again, the same request does what its answer says
    def disconnected() -> httpx.Response | None:
        response = call(a.admin_url, "POST", "/disconnect", json_body={"subject": "alice"})
        return response if response.status_code == 200 else None

    eventually(disconnected, 15, "POST /disconnect succeeds after the outage")
    assert close_of(alice) == (1008, "disconnected by operator")
    assert_open(bob, "untouched")


def test_actions_that_fail_open_locally_are_not_reported_done_cluster_wide(
    server_factory: ServerFactory, own_redis: RedisProcess, clients: list[ClientConnection]
) -> None:
    cluster = {"on_store_error": EVERY_CHECK_OPEN}
    a = admin_server(server_factory, store=own_redis.uri, cluster=cluster)
    b = server_factory({**ROOMY, "store": own_redis.uri, "cluster": cluster})
    alice, _ = welcomed(b, clients, "alice")
    earlier = call(a.admin_url, "POST", "/bans", json_body={"address": "192.0.2.8"})
    assert earlier.status_code == 201, earlier.text
    with writes_paused(own_redis):
        unavailable(call(a.admin_url, "POST", "/bans", json_body={"address": "192.0.2.7"}))
        unavailable(call(a.admin_url, "POST", "/revoke", json_body={"subject": "alice"}))
        unavailable(call(a.admin_url, "POST", "/disconnect", json_body={"subject": "alice"}))
        unavailable(call(a.admin_url, "DELETE", "/bans/192.0.2.8"))
        assert_open(alice, "still-here")
    failed = [e["action"] for e in a.audit.events("admin_action_failed")]
    assert failed == ["ban", "revoke", "disconnect", "unban"]
    with own_redis.client() as redis_client:
        assert redis_client.exists("wsguard:{addr:192.0.2.8}:ban") == 1  # never lifted
        assert redis_client.exists("wsguard:{addr:192.0.2.7}:ban") == 0
    assert [e["client"] for e in a.audit.events("ban_started")] == ["192.0.2.8"]


def test_an_alert_ban_during_an_outage_reaches_every_node_once_the_store_is_back(
    server_factory: ServerFactory, own_redis: RedisProcess, clients: list[ClientConnection]
) -> None:
    cluster = {"on_store_error": EVERY_CHECK_OPEN}
    rule = {
        "events": ["connection"],
        "per": "address",
        "threshold": 0,
        "ban_seconds": 120,
        "webhook": False,
    }
    b = server_factory({**ROOMY, "store": own_redis.uri, "cluster": cluster})
    a = server_factory(
        {
            **ROOMY,
            "store": own_redis.uri,
            "cluster": cluster,
            "alerts": {"rules": {"ban_on_connect": rule}},
        }
    )
    alice, _ = welcomed(b, clients, "alice")
    with writes_paused(own_redis):
        mallory, _ = welcomed(a, clients, "mallory")  # fires the rule: ban 127.0.0.1
        failed = eventually(lambda: a.audit.events("ban_failed"), 15, "the failed ban is audited")
        assert failed[0]["reason"] == "alert:ban_on_connect"
        assert failed[0]["client"] == "127.0.0.1"
        assert failed[0]["retry_in"] > 0
        assert a.audit.events("ban_started") == []  # no ban is claimed
        assert_open(alice, "not-yet")
    # the store answers again: the ban is tried again and closes the address on every node
    assert close_of(alice, 30) == (1008, "banned")
    assert close_of(mallory, 10) == (1008, "banned")
    started = eventually(lambda: a.audit.events("ban_started"), 5, "the ban is audited")
    assert [(e["client"], e["reason"]) for e in started] == [("127.0.0.1", "alert:ban_on_connect")]


# -- 4. one TLS policy for both listeners ---------------------------------------------------


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


# -- 5. the session cookie of an HTTPS listener ---------------------------------------------


def test_https_dashboard_session_cookie_is_host_prefixed(
    server_factory: ServerFactory, certs: Certificates
) -> None:
    server = server_factory({**ROOMY, **admin_overrides(tls=certs.pair)})
    base = f"https://127.0.0.1:{admin_port(server)}"
    ctx = certs.client_context()
    own = {"Origin": base}

    def status(method: str, path: str, cookie: str | None, name: str = HOST_COOKIE) -> int:
        headers = {**own, "Cookie": f"{name}={cookie}"} if cookie is not None else own
        return call(base, method, path, token=None, headers=headers, verify=ctx).status_code

    login = {"token": ADMIN_TOKEN}
    ok = call(base, "POST", "/login", token=None, headers=own, json_body=login, verify=ctx)
    assert ok.status_code == 200, ok.text
    name, session, attributes = cookie_attributes(ok.headers["set-cookie"])
    assert name == HOST_COOKIE
    assert {"secure", "httponly", "path=/", "samesite=strict"} <= set(attributes)
    assert not any(a.startswith("domain") for a in attributes)

    assert status("GET", "/dashboard", session) == 200
    with_cookie = {"Cookie": f"{HOST_COOKIE}={session}"}
    url, origin = live_url(base), Origin(base)
    snapshot = first_snapshot(url, origin=origin, additional_headers=with_cookie, ssl=ctx)
    assert snapshot["type"] == "snapshot"
    # on an HTTPS listener only the prefixed cookie is a session (no sibling host can set it)
    assert status("GET", "/dashboard", session, SESSION_COOKIE) == 303
    unprefixed = {"Cookie": f"{SESSION_COOKIE}={session}"}
    assert refused_upgrade(url, origin=origin, additional_headers=unprefixed, ssl=ctx) == 401
    assert status("GET", "/connections", session) == 401  # the JSON API never takes it

    out = call(base, "POST", "/logout", token=None, headers={**own, **with_cookie}, verify=ctx)
    assert out.status_code == 200
    name, value, attributes = cookie_attributes(out.headers["set-cookie"])
    assert name == HOST_COOKIE and value in ("", '""')
    assert {"secure", "path=/"} <= set(attributes)  # else a browser ignores the deletion
    assert status("GET", "/dashboard", session) == 303


def test_plain_http_loopback_keeps_the_unprefixed_cookie(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    base = server.admin_url
    login = {"token": ADMIN_TOKEN}
    ok = call(base, "POST", "/login", token=None, headers={"Origin": base}, json_body=login)
    assert ok.status_code == 200
    name, _, attributes = cookie_attributes(ok.headers["set-cookie"])
    assert name == SESSION_COOKIE  # browsers refuse __Host- cookies without Secure
    assert "secure" not in attributes
