"""In-band token refresh is checked against revocations, and ``aud`` is never ignored.

A connection extends its life with ``{"type":"auth","token":...}``. The new token goes
through the same revocation check as a handshake, cluster-wide through the store and
with ``cluster.on_store_error.revocations``: a revoked token id is refused
(``invalid_token``, the old expiry still applies), a revoked subject closes the
connection (4003), a store that cannot answer refuses (``unavailable``) when
revocations fail closed. Every refresh, accepted or refused, is audited.

A token that carries ``aud`` is refused when no ``auth.audience`` is configured (401
``invalid_audience`` at the handshake, ``invalid_token`` on refresh), and public-key
verification without an audience or issuer is warned about at start.

Real servers on loopback: the standalone server on both engines, the ASGI middleware
under uvicorn and hypercorn, the gateway in front of a real backend; a real
``redis-server`` for the cluster cases.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import AuditCapture, RunningServer, ServerFactory, close_of, eventually, make_token
from support.asgi_server import AsgiServer, Serve, echo_of, ping
from support.gateway import (
    Backend,
    GatewayFactory,
    echo_roundtrip,
)
from support.paths import WSGUARD
from support.redis_process import RedisProcess

PREFIX = "wsguard:"  # the default cluster.key_prefix
OTHER_SERVICE = "https://billing.example"


# -- helpers -----------------------------------------------------------------------------


def exp_in(seconds: float) -> int:
    """An integer ``exp`` at least *seconds* - 1 and at most *seconds* from now."""
    return math.floor(time.time()) + math.ceil(seconds)


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    frame = json.loads(data)
    assert isinstance(frame, dict), frame
    return frame


def welcome_of(ws: ClientConnection) -> dict[str, Any]:
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


def refresh(ws: ClientConnection, token: str, ref: str) -> dict[str, Any]:
    """Send an ``auth`` refresh and return the answer."""
    ws.send(json.dumps({"type": "auth", "token": token, "id": ref}))
    return recv_json(ws)


def assert_pong(ws: ClientConnection, ident: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = recv_json(ws)
    assert (pong["type"], pong["id"]) == ("pong", ident), pong


def events(audit: AuditCapture, name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e for e in audit.events(name) if all(e.get(key) == value for key, value in match.items())
    ]


def wait_event(audit: AuditCapture, name: str, **match: Any) -> dict[str, Any]:
    found = eventually(lambda: events(audit, name, **match), what=f"audit {name} {match}")
    return found[0]


def assert_refused_refresh(answer: dict[str, Any], ref: str, token: str) -> None:
    assert answer == {
        "type": "error",
        "code": "invalid_token",
        "message": "Token refresh refused.",
        "ref": ref,
    }
    assert token not in json.dumps(answer)


def assert_expires_at_old_exp(ws: ClientConnection, audit: AuditCapture, conn_id: str) -> None:
    """The connection is closed by its *old* token's expiry (4001), nothing else."""
    assert close_of(ws, timeout=8) == (4001, "credentials expired")
    closed = wait_event(audit, "connection_closed", connection_id=conn_id)
    assert (closed["code"], closed["cause"]) == (4001, "token_expired")


def revoke_unannounced(uri: str, kind: str, value: str) -> None:
    """A revocation stored in Redis whose event this node never got (published while it
    was away, or lost with its subscription)."""
    with redis.Redis.from_url(uri, socket_timeout=2) as client:
        client.set(f"{PREFIX}{{rev:{kind}:{value}}}", b"1", px=60_000)


# -- the standalone server, both engines -------------------------------------------------


def test_refresh_with_a_revoked_token_id_is_refused_and_the_old_exp_holds(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    exp = exp_in(3)
    with server.connect(make_token("alice", exp=exp, jti="tok-live")) as ws:
        conn_id = welcome_of(ws)["connection_id"]
        stolen = make_token("alice", ttl=3600, jti="tok-stolen")
        server.run_coro(server.app.revoke("jti", "tok-stolen", 60))
        assert_pong(ws, "not-revoked")  # the revocation names another token

        assert_refused_refresh(refresh(ws, stolen, "r1"), "r1", stolen)
        assert_pong(ws, "still-open")
        assert_expires_at_old_exp(ws, server.audit, conn_id)
    refused = wait_event(server.audit, "token_refresh_refused", connection_id=conn_id)
    assert refused["reason"] == "revoked"
    assert refused["detail"] == "jti"
    assert refused["token_id"] == "tok-stolen"
    assert refused["subject"] == "alice"
    assert not server.audit.events("token_refreshed")


def test_refused_refreshes_spend_the_violation_budget(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"violation_budget": 1}})
    server.run_coro(server.app.revoke("jti", "tok-stolen", 60))
    stolen = make_token("alice", ttl=3600, jti="tok-stolen")
    with server.connect(make_token("alice", ttl=600)) as ws:
        welcome_of(ws)
        assert_refused_refresh(refresh(ws, stolen, "r1"), "r1", stolen)
        ws.send(json.dumps({"type": "auth", "token": stolen, "id": "r2"}))
        assert close_of(ws) == (1008, "policy violation")


def test_accepted_refresh_is_audited(server_factory: ServerFactory) -> None:
    server = server_factory()
    with server.connect(make_token("alice", ttl=600, jti="tok-1")) as ws:
        conn_id = welcome_of(ws)["connection_id"]
        new_exp = int(time.time()) + 3600
        answer = refresh(ws, make_token("alice", exp=new_exp, jti="tok-2"), "r1")
        assert answer == {"type": "auth_ok", "expires_at": new_exp, "ref": "r1"}
    refreshed = wait_event(server.audit, "token_refreshed", connection_id=conn_id)
    assert (refreshed["subject"], refreshed["token_id"]) == ("alice", "tok-2")
    assert refreshed["expires_at"] == new_exp
    assert refreshed["client"] == "127.0.0.1"
    assert not server.audit.events("token_refresh_refused")


def test_refresh_for_a_subject_whose_revocation_event_was_missed_closes_4003(
    server_factory: ServerFactory, redis_uri: str
) -> None:
    server = server_factory({"store": redis_uri})
    with server.connect(make_token("alice", ttl=600)) as ws:
        conn_id = welcome_of(ws)["connection_id"]
        revoke_unannounced(redis_uri, "sub", "alice")
        assert_pong(ws, "event-missed")  # nothing told this node yet
        ws.send(json.dumps({"type": "auth", "token": make_token("alice", ttl=3600), "id": "r"}))
        assert close_of(ws) == (4003, "revoked")
    refused = wait_event(server.audit, "token_refresh_refused", connection_id=conn_id)
    assert (refused["reason"], refused["detail"]) == ("revoked", "sub")
    closed = wait_event(server.audit, "connection_closed", connection_id=conn_id)
    assert (closed["code"], closed["cause"]) == (4003, "revoked")
    assert not server.audit.events("token_refreshed")


def test_refresh_with_a_token_id_revoked_on_another_node_is_refused(
    server_factory: ServerFactory, redis_uri: str
) -> None:
    server = server_factory({"store": redis_uri})
    with server.connect(make_token("alice", exp=exp_in(3))) as ws:
        conn_id = welcome_of(ws)["connection_id"]
        revoke_unannounced(redis_uri, "jti", "tok-stolen")
        stolen = make_token("alice", ttl=3600, jti="tok-stolen")
        assert_refused_refresh(refresh(ws, stolen, "r1"), "r1", stolen)
        assert_expires_at_old_exp(ws, server.audit, conn_id)


def test_refresh_while_redis_is_down_is_refused_when_revocations_fail_closed(
    server_factory: ServerFactory, own_redis: RedisProcess
) -> None:
    server = server_factory({"store": own_redis.uri})  # revocations: "closed" by default
    with server.connect(make_token("alice", exp=exp_in(4))) as ws:
        conn_id = welcome_of(ws)["connection_id"]
        own_redis.kill()
        answer = refresh(ws, make_token("alice", ttl=3600), "r1")
        assert answer == {
            "type": "error",
            "code": "unavailable",
            "message": "Try again shortly.",
            "retry_after": 1.0,
            "ref": "r1",
        }
        assert_pong(ws, "still-open")  # established connections keep working
        assert_expires_at_old_exp(ws, server.audit, conn_id)
    refused = wait_event(server.audit, "token_refresh_refused", connection_id=conn_id)
    assert (refused["reason"], refused["detail"]) == ("store_unavailable", "revocations")


def test_refresh_while_redis_is_down_is_accepted_when_revocations_fail_open(
    server_factory: ServerFactory, own_redis: RedisProcess
) -> None:
    server = server_factory(
        {"store": own_redis.uri, "cluster": {"on_store_error": {"revocations": "open"}}}
    )
    with server.connect(make_token("alice", ttl=600)) as ws:
        welcome_of(ws)
        own_redis.kill()
        new_exp = int(time.time()) + 3600
        answer = refresh(ws, make_token("alice", exp=new_exp), "r1")
        assert answer == {"type": "auth_ok", "expires_at": new_exp, "ref": "r1"}


# -- audience ----------------------------------------------------------------------------


def handshake_refusal(server: RunningServer, token: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        server.connect(token).close()
    return info.value.response.status_code, bytes(info.value.response.body or b"")


def test_token_with_aud_is_refused_when_no_audience_is_configured(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    status, body = handshake_refusal(server, make_token("alice", aud=OTHER_SERVICE))
    assert (status, body) == (401, b"Invalid or expired token.\n")
    refused = wait_event(server.audit, "handshake_refused")
    assert (refused["reason"], refused["detail"]) == (
        "invalid_audience",
        "aud present, auth.audience not set",
    )
    for aud in ([OTHER_SERVICE], ["a", "b"]):
        assert handshake_refusal(server, make_token("alice", aud=aud))[0] == 401

    with server.connect(make_token("alice", ttl=600)) as ws:  # without aud: admitted
        welcome_of(ws)
        foreign = make_token("alice", ttl=3600, aud=OTHER_SERVICE)
        assert_refused_refresh(refresh(ws, foreign, "r1"), "r1", foreign)
        assert_pong(ws, "still-open")
    failed = wait_event(server.audit, "token_refresh_refused", reason="invalid_audience")
    assert failed["subject"] == "alice"
    assert not server.audit.events("token_refreshed")


def test_configured_audience_still_admits_and_refreshes_its_own_tokens(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"auth": {"audience": ["chat-api"]}})
    with server.connect(make_token("alice", ttl=600, aud="chat-api")) as ws:
        welcome_of(ws)
        answer = refresh(ws, make_token("alice", ttl=3600, aud=["x", "chat-api"]), "r1")
        assert answer["type"] == "auth_ok"
        foreign = make_token("alice", ttl=3600, aud=OTHER_SERVICE)
        assert_refused_refresh(refresh(ws, foreign, "r2"), "r2", foreign)
    assert handshake_refusal(server, make_token("alice", aud=OTHER_SERVICE))[0] == 401


# -- the start-up warning -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(private key, public PEM file, JWKS file with kid "k1")."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    folder = tmp_path_factory.mktemp("rsa")
    pem = folder / "public.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    return private, pem, jwks


def public_key_auth(rsa_key: tuple[Any, Path, Path], source: str, **extra: Any) -> dict[str, Any]:
    _, pem, jwks = rsa_key
    path = pem if source == "public_key_file" else jwks
    return {"auth": {"secret": "", "algorithms": ["RS256"], source: str(path), **extra}}


@pytest.mark.parametrize("source", ["public_key_file", "jwks_file"])
def test_public_key_without_audience_or_issuer_is_warned_about_at_start(
    server_factory: ServerFactory,
    rsa_key: tuple[Any, Path, Path],
    source: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="wsguard.auth")
    server = server_factory(public_key_auth(rsa_key, source))
    warnings = server.audit.events("config_warning")
    assert [e["key"] for e in warnings] == ["auth.audience", "auth.issuer"]
    assert all(f"auth.{source}" in e["detail"] for e in warnings)
    logged = [r.getMessage() for r in caplog.records if r.name == "wsguard.auth"]
    assert [line.split(":", 1)[0] for line in logged] == ["auth.audience", "auth.issuer"]

    private = rsa_key[0]
    headers = {"kid": "k1"} if source == "jwks_file" else None
    claims = {"sub": "alice", "exp": int(time.time()) + 600}
    with server.connect(jwt.encode(claims, private, algorithm="RS256", headers=headers)) as ws:
        welcome_of(ws)  # a warning, not a refusal
    foreign = jwt.encode({**claims, "aud": OTHER_SERVICE}, private, "RS256", headers=headers)
    assert handshake_refusal(server, foreign)[0] == 401


def test_no_warning_with_audience_and_issuer_or_with_hmac(
    server_factory: ServerFactory, rsa_key: tuple[Any, Path, Path]
) -> None:
    checked = public_key_auth(
        rsa_key, "jwks_file", audience=["chat-api"], issuer="https://idp.example"
    )
    for overrides in (checked, {}):
        server = server_factory(overrides)
        assert server.audit.events("config_warning") == []


def test_check_config_prints_the_warning(tmp_path: Path, rsa_key: tuple[Any, Path, Path]) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text(f'[auth]\nalgorithms = ["RS256"]\npublic_key_file = "{rsa_key[1]}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [WSGUARD, "check-config", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "configuration is valid"
    lines = done.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["auth.audience", "auth.issuer"]
    assert all(line.startswith("wsguard: warning: ") for line in lines)


# -- the ASGI middleware (uvicorn with websockets-sansio and wsproto, hypercorn) ---------------


def hello(server: AsgiServer, token: str) -> ClientConnection:
    ws = server.connect(token)
    assert recv_json(ws)["type"] == "hello"
    return ws


def asgi_connection_id(server: AsgiServer, subject: str) -> str:
    """The id of *subject*'s one live connection (another may still be going away)."""

    def find() -> list[str]:
        live = server.middleware.connections.values()
        return [conn.id for conn in live if conn.subject == subject and not conn.closing]

    ids = server.call(find)
    assert len(ids) == 1, ids
    return ids[0]


def test_asgi_refresh_with_a_revoked_token_id_is_refused(serve: Serve) -> None:
    server = serve()
    server.run(server.middleware.revoke("jti", "tok-stolen", 60))
    with hello(server, make_token("alice", exp=exp_in(3), jti="tok-live")) as ws:
        conn_id = asgi_connection_id(server, "alice")
        stolen = make_token("alice", ttl=3600, jti="tok-stolen")
        assert_refused_refresh(refresh(ws, stolen, "r1"), "r1", stolen)
        echo_of(ws, ping("still-open"))
        assert_expires_at_old_exp(ws, server.audit, conn_id)
    assert server.rec.received == [ping("still-open")]  # the app never saw the refresh
    refused = wait_event(server.audit, "token_refresh_refused", connection_id=conn_id)
    assert (refused["reason"], refused["detail"]) == ("revoked", "jti")


def test_asgi_refresh_and_handshake_refuse_a_foreign_audience(serve: Serve) -> None:
    server = serve()
    refused = server.refused(make_token("alice", aud=OTHER_SERVICE))
    assert refused.response.status_code == 401
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert reasons == ["invalid_audience"]
    with hello(server, make_token("alice", ttl=600)) as ws:
        foreign = make_token("alice", ttl=3600, aud=OTHER_SERVICE)
        assert_refused_refresh(refresh(ws, foreign, "r1"), "r1", foreign)
        fresh = refresh(ws, make_token("alice", ttl=3600, jti="tok-2"), "r2")
        assert (fresh["type"], fresh["ref"]) == ("auth_ok", "r2")
    refreshed = wait_event(server.audit, "token_refreshed")
    assert (refreshed["subject"], refreshed["token_id"]) == ("alice", "tok-2")


def test_asgi_refresh_with_redis_down_or_a_missed_subject_revocation(
    serve: Serve,
    own_redis: RedisProcess,
) -> None:
    server = serve({"store": own_redis.uri})
    with hello(server, make_token("alice", ttl=600)) as ws:
        revoke_unannounced(own_redis.uri, "sub", "alice")
        ws.send(json.dumps({"type": "auth", "token": make_token("alice", ttl=3600)}))
        assert close_of(ws) == (4003, "revoked")
    with hello(server, make_token("bob", exp=exp_in(4))) as ws:
        conn_id = asgi_connection_id(server, "bob")
        own_redis.kill()
        answer = refresh(ws, make_token("bob", ttl=3600), "r1")
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", "unavailable", "r1")
        assert_expires_at_old_exp(ws, server.audit, conn_id)
    reasons = [(e["subject"], e["reason"]) for e in server.audit.events("token_refresh_refused")]
    assert reasons == [("alice", "revoked"), ("bob", "store_unavailable")]


# -- the gateway ----------------------------------------------------------------------------


def test_gateway_refresh_with_a_revoked_token_id_never_reaches_the_backend(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url)
    gw.run_coro(gw.app.revoke("jti", "tok-stolen", 60))
    with gw.connect(make_token("alice", ttl=600)) as ws:
        stolen = make_token("alice", ttl=3600, jti="tok-stolen")
        assert_refused_refresh(refresh(ws, stolen, "r1"), "r1", stolen)
        foreign = make_token("alice", ttl=3600, aud=OTHER_SERVICE)
        assert_refused_refresh(refresh(ws, foreign, "r2"), "r2", foreign)
        after = json.dumps({"type": "chat", "text": "after"})
        echo_roundtrip(ws, after)
    assert backend.connection().received == [after]
    reasons = [e["reason"] for e in gw.audit.events("token_refresh_refused")]
    assert reasons == ["revoked", "invalid_audience"]
