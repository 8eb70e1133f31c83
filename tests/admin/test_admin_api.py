"""The admin HTTP API: its own credential, health and readiness, connections, operator
actions (never reported done when the shared store could not carry them to the other
nodes: 503), bans, events.

Every test runs a real wsguard server with the admin listener on a free loopback port
(``admin_overrides()``), speaks real HTTP to it (``httpx``) and holds real WebSocket
clients on the public listener. Conditions that settle asynchronously are polled with a
bounded deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import (
    ADMIN_TOKEN,
    AuditCapture,
    RunningServer,
    ServerFactory,
    admin_headers,
    close_of,
    eventually,
    make_config,
    make_token,
    raw_http,
    status_of,
)
from support.admin import ROOMY, admin_server, error_of, open_client, welcomed
from support.cluster import EVERY_CHECK_OPEN
from support.redis_process import RedisProcess, user_without_subscribe, writes_paused
from wsguard.admin.server import AdminServer
from wsguard.config.loader import load_config
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.observability.audit import AuditLog

#: Every endpoint that needs the admin credential: (method, path, JSON body or None).
PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/connections", None),
    ("GET", "/connections/x", None),
    ("POST", "/disconnect", {"subject": "nobody"}),
    ("POST", "/revoke", {"jti": "nothing"}),
    ("GET", "/bans", None),
    ("POST", "/bans", {"address": "192.0.2.1", "seconds": 5}),
    ("DELETE", "/bans/1.2.3.4", None),
    ("GET", "/alerts", None),
    ("GET", "/events", None),
]

DEFAULT_RULES = {
    "auth_failures_per_address",
    "auth_failures_total",
    "invalid_messages",
    "connection_spike",
    "store_outage",
}

WWW_AUTHENTICATE = 'Bearer realm="wsguard-admin"'


# -- helpers ----------------------------------------------------------------------------


def call(
    server: RunningServer,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    token: str | None = ADMIN_TOKEN,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One admin API request; *token* goes in ``Authorization: Bearer`` when given."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return httpx.request(
        method,
        server.admin_url + path,
        json=json_body,
        headers=sent,
        timeout=10,
        **kwargs,
    )


def get_json(server: RunningServer, path: str) -> dict[str, Any]:
    response = call(server, "GET", path)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return data


def assert_pong(ws: ClientConnection, ident: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = recv_json(ws)
    assert pong["type"] == "pong", pong
    assert pong["id"] == ident


def refused_handshake(server: RunningServer, token: str) -> tuple[int, dict[str, str]]:
    """Expect the handshake with *token* to be refused: its HTTP status and headers."""
    with pytest.raises(InvalidStatus) as info:
        server.connect(token).close()
    response = info.value.response
    return response.status_code, {k.lower(): v for k, v in response.headers.raw_items()}


def connection_ids(server: RunningServer, **query: str) -> list[str]:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    data = get_json(server, "/connections" + (f"?{params}" if params else ""))
    return [item["id"] for item in data["connections"]]


# -- the admin credential ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED]
)
def test_protected_endpoint_needs_the_admin_token(
    server_factory: ServerFactory, method: str, path: str, body: dict[str, Any] | None
) -> None:
    server = admin_server(server_factory)
    user_jwt = make_token("root", scopes="admin")
    wrong = "wrong-admin-token-0123456789abcdef"
    attempts: list[tuple[str | None, dict[str, str]]] = [
        (None, {}),
        (user_jwt, {}),
        (wrong, {}),
        (None, {"Authorization": f"Basic {ADMIN_TOKEN}"}),
    ]
    for token, headers in attempts:
        response = call(server, method, path, json_body=body, token=token, headers=headers)
        assert response.status_code == 401, (token, headers, response.text)
        assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
        assert error_of(response) == "unauthorized"

    # the token in the query string is not a credential
    response = call(server, method, f"{path}?token={ADMIN_TOKEN}", json_body=body, token=None)
    assert response.status_code == 401

    # nothing was done on behalf of the refused requests
    assert server.audit.events("admin_action") == []
    assert server.audit.events("ban_started") == []

    failures = server.audit.events("admin_auth_failed")
    assert len(failures) == len(attempts) + 1
    assert {e["client"] for e in failures} == {"127.0.0.1"}
    assert [e["credential"] for e in failures] == ["missing", "bad", "bad", "bad", "missing"]
    text = server.audit.getvalue()
    for presented in (user_jwt, wrong, ADMIN_TOKEN):
        assert presented not in text

    response = call(server, method, path, json_body=body)
    assert response.status_code not in (401, 429), response.text
    assert "www-authenticate" not in response.headers


def test_admin_token_scheme_is_case_insensitive_and_the_value_exact(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    ok = call(
        server,
        "GET",
        "/connections",
        token=None,
        headers={"Authorization": f"bearer {ADMIN_TOKEN}"},
    )
    assert ok.status_code == 200
    for near_miss in (ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", ADMIN_TOKEN.upper()):
        assert call(server, "GET", "/connections", token=near_miss).status_code == 401


def test_repeated_failures_block_wrong_tokens_from_the_address_but_never_the_right_one(
    server_factory: ServerFactory,
) -> None:
    server = admin_server(server_factory)
    for n in range(10):
        response = call(server, "GET", "/connections", token=f"guess-{n:02d}-0123456789abcdefghij")
        assert response.status_code == 401, n
    blocked = call(server, "GET", "/connections", token="guess-10-0123456789abcdefghij")
    assert blocked.status_code == 429
    assert error_of(blocked) == "too_many_failures"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert call(server, "GET", "/alerts", token="another-guess-0123456789abc").status_code == 429
    assert call(server, "GET", "/alerts", token=None).status_code == 429  # every endpoint
    assert call(server, "GET", "/connections").status_code == 200  # the right token gets in
    assert len(server.audit.events("admin_auth_failed")) == 10  # a blocked try is not audited
    (lockout,) = server.audit.events("admin_lockout")  # the lock-out is, once
    assert lockout["client"] == "127.0.0.1" and 1 <= lockout["seconds"] <= 60
    # but every try is counted: guessing shows in the metric at its real rate
    metrics = call(server, "GET", "/metrics").text
    assert "wsguard_admin_auth_failures_total 13.0" in metrics, metrics
    # public endpoints stay public
    assert call(server, "GET", "/healthz", token=None).status_code == 200
    # the block is per address: another loopback address is not throttled
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        wrong = {"Authorization": "Bearer guess-11-0123456789abcdefghij"}
        response = other.get(server.admin_url + "/connections", headers=wrong)
    assert response.status_code == 401, response.text


# -- health and readiness ---------------------------------------------------------------


def test_healthz_and_readyz_need_no_credential(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    health = call(server, "GET", "/healthz", token=None)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "node": server.app.guard.node_id}
    ready = call(server, "GET", "/readyz", token=None)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}
    assert server.audit.events("admin_auth_failed") == []


def test_readyz_is_503_while_draining(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    assert call(server, "GET", "/readyz", token=None).status_code == 200
    server.call(lambda: setattr(server.app.guard.handshakes, "draining", True))
    response = call(server, "GET", "/readyz", token=None)
    assert response.status_code == 503
    assert response.json() == {"ready": False, "reason": "draining"}
    assert call(server, "GET", "/healthz", token=None).status_code == 200  # alive all the same
    server.call(lambda: setattr(server.app.guard.handshakes, "draining", False))
    assert call(server, "GET", "/readyz", token=None).json() == {"ready": True}


def test_readyz_is_503_when_the_store_is_down_and_fails_closed(
    own_redis: RedisProcess, server_factory: ServerFactory
) -> None:
    server = admin_server(server_factory, store=own_redis.uri)
    assert call(server, "GET", "/readyz", token=None).json() == {"ready": True}
    own_redis.kill()

    def not_ready() -> httpx.Response | None:
        response = call(server, "GET", "/readyz", token=None)
        return response if response.status_code == 503 else None

    response = eventually(not_ready, 10, "/readyz reports the store outage")
    assert response.json() == {"ready": False, "reason": "store_unavailable"}
    assert call(server, "GET", "/healthz", token=None).status_code == 200


def test_readyz_is_503_while_redis_refuses_the_event_subscription(
    own_redis: RedisProcess, server_factory: ServerFactory
) -> None:
    """Redis answers commands but refuses SUBSCRIBE (an ACL without it): the node would
    hear of other nodes' revocations, disconnects and bans late, and says it is not
    ready until it can subscribe."""
    with user_without_subscribe(own_redis) as (uri, grant):
        server = admin_server(server_factory, store=uri)

        def status(code: int) -> httpx.Response | None:
            response = call(server, "GET", "/readyz", token=None)
            return response if response.status_code == code else None

        response = eventually(lambda: status(503), 10, "/readyz reports the refused subscription")
        assert response.json() == {"ready": False, "reason": "events_unavailable"}
        grant()
        eventually(lambda: status(200), 10, "/readyz ready once subscribed")


def test_readyz_stays_ready_through_an_outage_when_every_check_fails_open(
    own_redis: RedisProcess, server_factory: ServerFactory
) -> None:
    everything_open = {
        check: "open" for check in ("bans", "revocations", "nonces", "rate_limits", "connections")
    }
    server = admin_server(
        server_factory, store=own_redis.uri, cluster={"on_store_error": everything_open}
    )
    own_redis.kill()
    eventually(lambda: server.audit.events("store_outage"), 10, "the node notices the outage")
    response = call(server, "GET", "/readyz", token=None)
    assert response.status_code == 200
    assert response.json() == {"ready": True}


# -- where the admin listener is reachable ----------------------------------------------


def test_admin_listener_binds_loopback_by_default(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    assert server.app.admin.config.host == "127.0.0.1"
    port = server.app.admin_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # listening on 127.0.0.1 ...
    with pytest.raises(ConnectionRefusedError):  # ... and only there
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_admin_api_is_not_served_on_the_public_port(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    for path in ("/connections", "/healthz", "/bans"):
        response = httpx.get(f"http://127.0.0.1:{server.port}{path}", headers=admin_headers())
        assert response.status_code >= 400, response.text
        assert not response.headers.get("content-type", "").startswith("application/json")
        with pytest.raises(json.JSONDecodeError):
            response.json()


def test_non_loopback_admin_listener_without_a_credential_refuses_to_start() -> None:
    config = make_config({"admin": {"host": "0.0.0.0", "port": 0}})
    with pytest.raises(KeyLoadError) as info:
        AdminServer(App(config))
    assert info.value.key == "admin.token"
    assert "WSGUARD_ADMIN_TOKEN" in str(info.value)

    app = App(config)
    with pytest.raises(KeyLoadError) as started:
        asyncio.run(app.start())
    assert started.value.key == "admin.token"
    assert app.port is None  # the public listener did not start either


def test_non_loopback_admin_listener_without_tls_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The token and the session cookie would cross the network in clear text: allowed
    (TLS may be a proxy's), but said at start, naming the key."""
    config = make_config({"admin": {"host": "0.0.0.0", "port": 0, "token": ADMIN_TOKEN}})
    audit = AuditCapture()
    with caplog.at_level(logging.WARNING):
        Guard(config, audit=AuditLog(audit)).warn_risky_config()
    assert any(
        "admin.host" in r.getMessage() and "clear text" in r.getMessage() for r in caplog.records
    )
    [warning] = [e for e in audit.events("config_warning") if e["key"] == "admin.host"]
    assert "clear text" in warning["detail"]
    caplog.clear()
    loopback = make_config({"admin": {"port": 0, "token": ADMIN_TOKEN}})
    with caplog.at_level(logging.WARNING):
        App(loopback).guard.warn_risky_config()
    assert not any("clear text" in r.getMessage() for r in caplog.records)


def test_loopback_admin_listener_generates_a_private_token_file(
    server_factory: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    token_file = tmp_path / ".local" / "share" / "wsguard" / "admin.token"
    server = server_factory({**ROOMY, "admin": {"port": 0}})
    assert server.app.admin.generated_token_file == token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 24
    assert call(server, "GET", "/connections", token=token).status_code == 200
    assert call(server, "GET", "/connections", token=ADMIN_TOKEN).status_code == 401

    # the next start reuses it
    again = server_factory({**ROOMY, "admin": {"port": 0}})
    assert token_file.read_text().strip() == token
    assert call(again, "GET", "/connections", token=token).status_code == 200

    # a token file others can read is refused
    token_file.chmod(0o644)
    with pytest.raises(KeyLoadError):
        AdminServer(App(make_config({"admin": {"port": 0}})))


def test_admin_token_from_the_environment() -> None:
    token = "env-admin-token-0123456789abcdef"
    config = load_config(env={"WSGUARD_ADMIN_TOKEN": token, "WSGUARD_ADMIN__PORT": "0"})
    assert config.admin.token == token
    assert config.admin.port == 0
    assert token not in repr(config)

    with pytest.raises(ConfigError) as info:
        load_config(env={"WSGUARD_ADMIN_TOKEN": "short-token", "WSGUARD_ADMIN__PORT": "0"})
    assert info.value.key == "admin.token"
    assert "24 characters" in str(info.value)


def test_a_rejected_admin_token_is_not_echoed_in_the_error() -> None:
    presented = "short-admin-tok"
    with pytest.raises(ConfigError) as info:
        load_config(env={"WSGUARD_ADMIN_TOKEN": presented, "WSGUARD_ADMIN__PORT": "0"})
    assert info.value.key == "admin.token"
    assert presented not in str(info.value)


def test_admin_token_comes_from_one_source_only(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    with pytest.raises(ConfigError) as info:
        make_config({"admin": {"token": ADMIN_TOKEN, "token_file": str(token_file)}})
    assert info.value.key.startswith("admin.token")


# -- connections ------------------------------------------------------------------------


def test_list_filter_and_page_connections(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory)
    opened = [open_client(server, clients, make_token(sub)) for sub in "aabcc"]
    ids = [conn_id for _, conn_id in opened]
    assert_pong(opened[0][0], "one")  # one message in on the first connection

    data = get_json(server, "/connections")
    assert data["total"] == 5
    assert data["next"] is None
    assert [c["id"] for c in data["connections"]] == sorted(ids)
    first = next(c for c in data["connections"] if c["id"] == ids[0])
    assert first["subject"] == "a"
    assert first["client"] == "127.0.0.1"
    assert first["scopes"] == ["chat"]
    assert first["auth"]
    assert first["messages_in"] == 1
    assert first["messages_out"] >= 2  # welcome and pong
    assert first["connected_seconds"] >= 0
    assert isinstance(first["expires_at"], (int, float))
    assert set(first) >= {"origin", "subprotocol", "token_id"}

    assert sorted(connection_ids(server, subject="a")) == sorted(ids[:2])
    assert sorted(connection_ids(server, subject="c")) == sorted(ids[3:])
    assert connection_ids(server, subject="nobody") == []
    assert get_json(server, "/connections?subject=a")["total"] == 2
    assert len(connection_ids(server, address="127.0.0.1")) == 5
    assert connection_ids(server, address="10.9.9.9") == []
    assert connection_ids(server, address="127.0.0.1", subject="b") == [ids[2]]

    bad = call(server, "GET", "/connections?address=notanip")
    assert bad.status_code == 400
    assert error_of(bad) == "invalid_address"

    # paging: follow "next" until it is null; every id exactly once, in order
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        page = get_json(server, f"/connections?limit=2&after={after}")
        pages += 1
        assert page["total"] == 5
        assert 1 <= len(page["connections"]) <= 2
        seen += [c["id"] for c in page["connections"]]
        if page["next"] is None:
            break
        assert page["next"] == seen[-1]
        after = page["next"]
        assert pages < 10
    assert seen == sorted(ids)
    assert pages == 3
    assert get_json(server, "/connections?limit=5")["next"] is None

    for limit in ("0", "5000", "-1", "x", "%C2%B2", "%D9%A1"):  # "²", an Arabic-Indic 1
        response = call(server, "GET", f"/connections?limit={limit}")
        assert response.status_code == 400, limit
        assert error_of(response) == "invalid_request"


def test_get_one_connection(server_factory: ServerFactory, clients: list[ClientConnection]) -> None:
    server = admin_server(server_factory)
    _, conn_id = open_client(server, clients, make_token("gina", jti="gina-1"))
    one = get_json(server, f"/connections/{conn_id}")
    assert one["id"] == conn_id
    assert one["subject"] == "gina"
    assert one["token_id"] == "gina-1"
    listed = get_json(server, "/connections")["connections"][0]
    assert {k: v for k, v in one.items() if k != "connected_seconds"} == {
        k: v for k, v in listed.items() if k != "connected_seconds"
    }
    missing = call(server, "GET", "/connections/ffffffffffffffff")
    assert missing.status_code == 404
    assert error_of(missing) == "not_found"


# -- disconnect and revoke --------------------------------------------------------------


def test_disconnect_a_connection_then_a_subject(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory)
    (x, x_id), (y, _), (c1, c1_id), (c2, c2_id) = [
        open_client(server, clients, make_token(sub)) for sub in ("x", "y", "c", "c")
    ]

    response = call(server, "POST", "/disconnect", json_body={"connection_id": x_id})
    assert response.status_code == 200, response.text
    assert response.json() == {"disconnected": {"connection_id": x_id}, "local_connections": 1}
    assert close_of(x) == (1008, "disconnected by operator")
    for n, ws in enumerate((y, c1, c2)):
        assert_pong(ws, f"still-{n}")

    response = call(server, "POST", "/disconnect", json_body={"subject": "c"})
    assert response.status_code == 200, response.text
    assert response.json() == {"disconnected": {"subject": "c"}, "local_connections": 2}
    assert close_of(c1) == (1008, "disconnected by operator")
    assert close_of(c2) == (1008, "disconnected by operator")
    assert_pong(y, "survivor")
    eventually(lambda: server.connection_count() == 1, 5, "the closed connections are gone")

    dropped = server.audit.events("connection_disconnected")
    assert sorted(e["connection_id"] for e in dropped) == sorted([x_id, c1_id, c2_id])
    assert {e["by"] for e in dropped} == {"admin"}
    actions = server.audit.events("admin_action")
    assert [(e["action"], e["target"], e["value"]) for e in actions] == [
        ("disconnect", "id", x_id),  # what was acted on, for the record
        ("disconnect", "sub", "c"),
    ]

    for body in ({"connection_id": x_id, "subject": "y"}, {}, {"subject": ""}, {"subject": 7}):
        response = call(server, "POST", "/disconnect", json_body=body)
        assert response.status_code == 400, body
        assert error_of(response) == "invalid_request"
    assert_pong(y, "untouched")


def test_delete_on_a_connection_disconnects_it(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory)
    (x, x_id), (y, _) = [open_client(server, clients, make_token(sub)) for sub in ("x", "y")]
    response = call(server, "DELETE", f"/connections/{x_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"disconnected": {"connection_id": x_id}, "local_connections": 1}
    assert close_of(x) == (1008, "disconnected by operator")
    assert_pong(y, "still")
    assert call(server, "DELETE", "/connections/" + "f" * 65).status_code == 404
    assert call(server, "DELETE", "/connections/not-an-id").status_code == 404
    unauthenticated = httpx.delete(f"{server.admin_url}/connections/{x_id}", timeout=5)
    assert unauthenticated.status_code == 401


def test_revoke_a_token_id_then_a_subject(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory)
    revoked_token = make_token("dave", jti="tok-1")
    dave, _ = open_client(server, clients, revoked_token)
    dave2, _ = open_client(server, clients, make_token("dave", jti="tok-2"))
    erin1, _ = open_client(server, clients, make_token("erin"))
    erin2, _ = open_client(server, clients, make_token("erin", jti="erin-9"))
    frank, _ = open_client(server, clients, make_token("frank"))

    response = call(server, "POST", "/revoke", json_body={"jti": "tok-1"})
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == {"jti": "tok-1"}
    assert close_of(dave)[0] == 4003
    assert_pong(dave2, "other-token")  # revocation is of that token only
    assert refused_handshake(server, revoked_token)[0] == 401
    refusals = server.audit.events("handshake_refused")
    assert [e["reason"] for e in refusals] == ["revoked"]

    response = call(server, "POST", "/revoke", json_body={"subject": "erin", "ttl_seconds": 60})
    assert response.status_code == 200, response.text
    assert response.json() == {"revoked": {"subject": "erin"}, "ttl_seconds": 60}
    assert close_of(erin1)[0] == 4003
    assert close_of(erin2)[0] == 4003
    assert refused_handshake(server, make_token("erin"))[0] == 401
    for n, ws in enumerate((dave2, frank)):
        assert_pong(ws, f"kept-{n}")
    actions = server.audit.events("admin_action")
    assert [(e["action"], e["target"], e["value"]) for e in actions] == [
        ("revoke", "jti", "tok-1"),
        ("revoke", "subject", "erin"),
    ]

    for body in (
        {"jti": "a", "subject": "b"},
        {},
        {"jti": ""},
        {"jti": ["x"]},
        {"jti": "x", "ttl_seconds": 0},
        {"jti": "x", "ttl_seconds": "60"},
    ):
        response = call(server, "POST", "/revoke", json_body=body)
        assert response.status_code == 400, body
        assert error_of(response) == "invalid_request"


# -- operator actions the store could not carry to every node --------------------------


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
        unavailable(call(a, "POST", "/disconnect", json_body={"subject": "alice"}))
        unavailable(call(a, "DELETE", f"/connections/{alice_id}"))
        assert_pong(alice, "not-disconnected")  # as the answers said: nothing reached node B
    failed = a.audit.events("admin_action_failed")
    assert [(e["action"], e["target"]) for e in failed] == [
        ("disconnect", "sub"),
        ("disconnect", "id"),
    ]
    assert all(e["client"] == "127.0.0.1" and e["check"] for e in failed)
    assert a.audit.events("admin_action") == []

    # once the store answers again, the same request does what its answer says
    def disconnected() -> httpx.Response | None:
        response = call(a, "POST", "/disconnect", json_body={"subject": "alice"})
        return response if response.status_code == 200 else None

    eventually(disconnected, 15, "POST /disconnect succeeds after the outage")
    assert close_of(alice) == (1008, "disconnected by operator")
    assert_pong(bob, "untouched")


def test_actions_that_fail_open_locally_are_not_reported_done_cluster_wide(
    server_factory: ServerFactory, own_redis: RedisProcess, clients: list[ClientConnection]
) -> None:
    cluster = {"on_store_error": EVERY_CHECK_OPEN}
    a = admin_server(server_factory, store=own_redis.uri, cluster=cluster)
    b = server_factory({**ROOMY, "store": own_redis.uri, "cluster": cluster})
    alice, _ = welcomed(b, clients, "alice")
    earlier = call(a, "POST", "/bans", json_body={"address": "192.0.2.8"})
    assert earlier.status_code == 201, earlier.text
    with writes_paused(own_redis):
        unavailable(call(a, "POST", "/bans", json_body={"address": "192.0.2.7"}))
        unavailable(call(a, "POST", "/revoke", json_body={"subject": "alice"}))
        unavailable(call(a, "POST", "/disconnect", json_body={"subject": "alice"}))
        unavailable(call(a, "DELETE", "/bans/192.0.2.8"))
        assert_pong(alice, "still-here")
    failed = [e["action"] for e in a.audit.events("admin_action_failed")]
    assert failed == ["ban", "revoke", "disconnect", "unban"]
    with own_redis.client() as redis_client:
        assert redis_client.exists("wsguard:{addr:192.0.2.8}:ban") == 1  # never lifted
        assert redis_client.exists("wsguard:{addr:192.0.2.7}:ban") == 0
    assert [e["client"] for e in a.audit.events("ban_started")] == ["192.0.2.8"]


# -- bans -------------------------------------------------------------------------------


def test_ban_and_unban_an_address(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory)
    ws, _ = open_client(server, clients, make_token("alice"))

    response = call(server, "POST", "/bans", json_body={"address": "127.0.0.1", "seconds": 30})
    assert response.status_code == 201, response.text
    assert response.json() == {"banned": "127.0.0.1", "seconds": 30}
    assert close_of(ws) == (1008, "banned")
    status, headers = refused_handshake(server, make_token("alice"))
    assert status == 429
    assert int(headers["retry-after"]) > 0

    bans = get_json(server, "/bans")["bans"]
    assert [b["address"] for b in bans] == ["127.0.0.1"]
    assert 0 < bans[0]["remaining_seconds"] <= 30
    started = server.audit.events("ban_started")
    assert [(e["client"], e["reason"]) for e in started] == [("127.0.0.1", "admin")]

    response = call(server, "DELETE", "/bans/127.0.0.1")
    assert response.status_code == 200, response.text
    assert response.json() == {"unbanned": "127.0.0.1"}
    assert get_json(server, "/bans")["bans"] == []
    again, _ = open_client(server, clients, make_token("alice"))
    assert_pong(again, "back")

    response = call(server, "DELETE", "/bans/127.0.0.1")
    assert response.status_code == 404
    assert error_of(response) == "not_banned"
    response = call(server, "DELETE", "/bans/not-an-ip")
    assert response.status_code == 400
    assert error_of(response) == "invalid_address"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"address": "not-an-ip", "seconds": 30}, "invalid_address"),
        ({"seconds": 30}, "invalid_address"),
        ({"address": 127, "seconds": 30}, "invalid_address"),
        ({"address": "192.0.2.7", "seconds": 0}, "invalid_request"),
        ({"address": "192.0.2.7", "seconds": -5}, "invalid_request"),
        ({"address": "192.0.2.7", "seconds": "x"}, "invalid_request"),
        ({"address": "192.0.2.7", "seconds": True}, "invalid_request"),
        ({"address": "192.0.2.7", "seconds": 30 * 86400 + 1}, "invalid_request"),
    ],
)
def test_ban_request_is_validated(
    server_factory: ServerFactory, body: dict[str, Any], code: str
) -> None:
    server = admin_server(server_factory)
    response = call(server, "POST", "/bans", json_body=body)
    assert response.status_code == 400, response.text
    assert error_of(response) == code
    assert get_json(server, "/bans")["bans"] == []
    assert server.audit.events("ban_started") == []


def forwarded_client(
    server: RunningServer, clients: list[ClientConnection], subject: str, address: str
) -> tuple[ClientConnection, str]:
    """A client whose address is *address*, as told by the trusted proxy (127.0.0.1)."""
    ws = server.connect(make_token(subject), headers={"X-Forwarded-For": address})
    clients.append(ws)
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, str(welcome["connection_id"])


def test_ipv6_addresses_are_filtered_and_banned_by_their_prefix(
    server_factory: ServerFactory, clients: list[ClientConnection]
) -> None:
    server = admin_server(server_factory, proxy={"trusted": ["127.0.0.1"]})
    v6a, v6a_id = forwarded_client(server, clients, "ann", "2001:db8::1")
    v6b, v6b_id = forwarded_client(server, clients, "ben", "2001:db8::2")
    v4, v4_id = forwarded_client(server, clients, "cat", "198.51.100.7")

    # the address filter matches by the key addresses are limited and banned under
    assert sorted(connection_ids(server, address="2001:db8::99")) == sorted([v6a_id, v6b_id])
    assert connection_ids(server, address="2001:db8:0:1::1") == []
    assert connection_ids(server, address="198.51.100.7") == [v4_id]
    assert connection_ids(server, address="127.0.0.1") == []
    assert get_json(server, f"/connections/{v6a_id}")["client"] == "2001:db8::1"

    response = call(server, "POST", "/bans", json_body={"address": "2001:db8::ffff", "seconds": 30})
    assert response.status_code == 201, response.text
    assert response.json() == {"banned": "2001:db8::/64", "seconds": 30}
    assert [b["address"] for b in get_json(server, "/bans")["bans"]] == ["2001:db8::/64"]
    assert close_of(v6a) == (1008, "banned")
    assert close_of(v6b) == (1008, "banned")
    assert_pong(v4, "other-address")
    with pytest.raises(InvalidStatus) as info:
        server.connect(make_token("dan"), headers={"X-Forwarded-For": "2001:db8::3"}).close()
    assert info.value.response.status_code == 429

    response = call(server, "DELETE", "/bans/2001:db8::5")  # same /64
    assert response.status_code == 200, response.text
    assert response.json() == {"unbanned": "2001:db8::/64"}
    assert get_json(server, "/bans")["bans"] == []
    back, _ = forwarded_client(server, clients, "dan", "2001:db8::3")
    assert_pong(back, "unbanned")


def test_ipv6_ban_is_lifted_by_the_key_get_bans_lists(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    banned = call(server, "POST", "/bans", json_body={"address": "2001:db8::1"})
    assert banned.status_code == 201, banned.text
    assert banned.json()["banned"] == "2001:db8::/64"
    listed = [b["address"] for b in get_json(server, "/bans")["bans"]]
    assert listed == ["2001:db8::/64"]

    wrong_prefix = call(server, "DELETE", "/bans/2001:db8::/48")
    assert wrong_prefix.status_code == 400, wrong_prefix.text
    assert error_of(wrong_prefix) == "invalid_address"
    assert [b["address"] for b in get_json(server, "/bans")["bans"]] == listed

    lifted = call(server, "DELETE", f"/bans/{listed[0]}")
    assert lifted.status_code == 200, lifted.text
    assert lifted.json() == {"unbanned": "2001:db8::/64"}
    assert get_json(server, "/bans")["bans"] == []


# -- request bodies ---------------------------------------------------------------------


def test_post_bodies_are_checked(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    json_type = {"Content-Type": "application/json"}

    plain = call(
        server,
        "POST",
        "/bans",
        content=b'{"address": "192.0.2.1"}',
        headers={"Content-Type": "text/plain"},
    )
    assert plain.status_code == 415
    assert error_of(plain) == "unsupported_media_type"
    missing = call(server, "POST", "/bans", content=b'{"address": "192.0.2.1"}')
    assert missing.status_code == 415

    big = json.dumps({"address": "192.0.2.1", "pad": "x" * 20_000}).encode()
    too_large = call(server, "POST", "/bans", content=big, headers=json_type)
    assert too_large.status_code == 413
    assert error_of(too_large) == "too_large"

    # without a Content-Length (chunked) the size is enforced while reading
    def chunks() -> Iterator[bytes]:
        yield b'{"address": "192.0.2.1", "pad": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    chunked = call(server, "POST", "/bans", content=chunks(), headers=json_type)
    assert chunked.status_code == 413
    assert error_of(chunked) == "too_large"

    not_object = call(server, "POST", "/bans", content=b"[1]", headers=json_type)
    assert not_object.status_code == 400
    assert error_of(not_object) == "invalid_request"
    not_json = call(server, "POST", "/bans", content=b"{bad", headers=json_type)
    assert not_json.status_code == 400
    assert error_of(not_json) == "invalid_json"

    assert get_json(server, "/bans")["bans"] == []


def test_wrong_method_and_unknown_path_are_json_errors(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    wrong_method = call(server, "GET", "/disconnect")
    assert wrong_method.status_code == 405
    assert error_of(wrong_method) == "method_not_allowed"
    unknown = call(server, "GET", "/no-such-endpoint")
    assert unknown.status_code == 404
    assert error_of(unknown) == "not_found"


# -- alerts and events ------------------------------------------------------------------


def test_alerts_list_the_rules(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    data = get_json(server, "/alerts")
    assert data["alerts"] == []
    assert set(data["rules"]) >= DEFAULT_RULES
    rule = data["rules"]["auth_failures_per_address"]
    assert rule["per"] == "address"
    assert "auth" in rule["events"]


def test_events_list_the_refusals(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    assert get_json(server, "/events")["events"] == []
    with pytest.raises(InvalidStatus):
        server.connect(None, transport="none").close()
    assert refused_handshake(server, make_token("mallory", secret="x" * 40))[0] == 401

    def refusals() -> list[dict[str, Any]]:
        return [e for e in get_json(server, "/events")["events"] if e["kind"] == "refusal"]

    def two_refusals() -> list[dict[str, Any]] | None:
        found = refusals()
        return found if len(found) >= 2 else None

    found = eventually(two_refusals, 5, "two refusal events")
    assert len(found) == 2
    newest, oldest = found
    assert oldest["code"] == "missing_credentials"
    assert newest["code"] == "bad_signature"
    for event in found:
        assert event["stage"] == "handshake"
        assert event["reason"] == "auth"
        assert event["status"] == 401
        assert event["client"] == "127.0.0.1"
        assert isinstance(event["time"], (int, float))

    assert len(get_json(server, "/events?limit=1")["events"]) == 1
    assert call(server, "GET", "/events?limit=0").status_code == 400


def test_a_ban_event_survives_a_flood_of_refusals(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    banned = call(
        server,
        "POST",
        "/bans",
        json_body={"address": "10.9.8.7", "seconds": 600},
    )
    assert banned.status_code == 201, banned.text

    for _ in range(250):
        answer = raw_http(server.port, b"BAD\r\n\r\n")
        assert status_of(answer) == 400

    def flooded() -> list[dict[str, Any]] | None:
        events: list[dict[str, Any]] = get_json(server, "/events?limit=1000")["events"]
        return events if sum(e["kind"] == "refusal" for e in events) >= 200 else None

    events = eventually(flooded, 5, "the refusal flood in GET /events")
    bans = [e for e in events if e["kind"] == "ban" and e.get("client") == "10.9.8.7"]
    assert len(bans) == 1, [e for e in events if e["kind"] != "refusal"]
    times = [e["time"] for e in events]
    assert times == sorted(times, reverse=True)  # still newest first
    newest = get_json(server, "/events?limit=1")["events"]
    assert newest[0]["kind"] == "refusal"


# -- response headers -------------------------------------------------------------------


def test_every_response_has_the_security_headers(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    responses = [
        call(server, "GET", "/healthz", token=None),
        call(server, "GET", "/readyz", token=None),
        call(server, "GET", "/connections"),
        call(server, "GET", "/connections", token=None),
        call(server, "GET", "/connections/ffff"),
        call(server, "POST", "/bans", content=b"{bad", headers={"Content-Type": "text/plain"}),
        call(server, "GET", "/nowhere"),
    ]
    for response in responses:
        headers = response.headers
        assert headers["cache-control"] == "no-store", response.url
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "default-src 'none'" in csp
        assert len(headers.get_list("cache-control")) == 1


# -- mTLS as the admin credential -------------------------------------------------------


def admin_mtls_overrides(
    tmp_path: Path, server_ca: trustme.CA, admin_ca: trustme.CA
) -> dict[str, Any]:
    leaf = server_ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "admin.pem", tmp_path / "admin.key"
    admin_ca_file = tmp_path / "admin-ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    admin_ca.cert_pem.write_to_path(str(admin_ca_file))
    return {
        **ROOMY,
        "admin": {
            "port": 0,
            "tls": {
                "cert_file": str(cert_file),
                "key_file": str(key_file),
                "client_ca_file": str(admin_ca_file),
            },
        },
    }


def tls_context(server_ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    server_ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def test_admin_client_certificate_is_the_credential(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server_ca, admin_ca, users_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_factory(admin_mtls_overrides(tmp_path, server_ca, admin_ca))
    assert server.app.admin.generated_token_file is None
    base = f"https://127.0.0.1:{server.app.admin_port}"
    operator = admin_ca.issue_cert("ops@example.com", common_name="ops")

    with httpx.Client(verify=tls_context(server_ca, operator), timeout=10) as client:
        response = client.get(base + "/connections")
        assert response.status_code == 200, response.text
        assert response.json()["total"] == 0
        assert client.get(base + "/healthz").status_code == 200

    stranger = users_ca.issue_cert("eve@example.com", common_name="eve")
    for ctx in (tls_context(server_ca), tls_context(server_ca, stranger)):
        with (
            httpx.Client(verify=ctx, timeout=10) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.get(base + "/connections", headers=admin_headers())
    with pytest.raises(httpx.TransportError):  # no plaintext on the TLS listener
        httpx.get(f"http://127.0.0.1:{server.app.admin_port}/connections", timeout=10)


def test_admin_ca_must_not_be_the_users_ca(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    pair = {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}
    with pytest.raises(ConfigError) as info:
        make_config(
            {
                "tls": {**pair, "client_ca_file": str(ca_file)},
                "admin": {"port": 0, "tls": {**pair, "client_ca_file": str(ca_file)}},
            }
        )
    assert info.value.key == "admin.tls.client_ca_file"
