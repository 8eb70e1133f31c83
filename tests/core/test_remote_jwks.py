"""Keys from an identity provider: a JWKS over HTTPS (``auth.jwks_url``) or found by
OpenID discovery (``auth.oidc_issuer``), cached, refetched for a new ``kid`` at a bounded
rate, kept while the provider is down (up to ``auth.jwks_max_stale_seconds``).

The provider is real: an HTTPS server on 127.0.0.1 with a ``trustme`` certificate, which
counts the requests it answers. Tokens are real RS256/ES256 tokens. End-to-end cases run on
the standalone server (both engines); a few rules are checked on their functions directly.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.exceptions import InvalidStatus

from conftest import RunningServer, ServerFactory, eventually
from wsguard.config.loader import validate_config
from wsguard.config.model import Config
from wsguard.core.auth import KeyMaterial, KeysUnavailable, TokenVerifier, UnknownKey
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.keys import remote_jwks
from wsguard.keys.remote_jwks import (
    DocumentRefused,
    KeyCache,
    ProviderKey,
    RemoteJwks,
    max_age,
    parse_discovery,
    parse_jwks,
)
from wsguard.observability.audit import AuditLog

ISSUER = "https://idp.example.test/"
AUDIENCE = "wsguard-api"
JWKS = "/jwks"

# -- the identity provider -------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProviderServer

    def do_GET(self) -> None:
        provider = self.server.provider
        answer = provider.answer(self.path)
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ProviderServer(ThreadingHTTPServer):
    daemon_threads = True
    provider: Provider


class Provider:
    """An HTTPS identity provider on 127.0.0.1: answers per path, counts requests."""

    def __init__(self, ca: trustme.CA, ca_path: Path) -> None:
        self.ca_path = ca_path
        self._answers: dict[str, Answer] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.released = threading.Event()  # cleared: requests hang until set again
        self.released.set()
        self._httpd = _ProviderServer(("127.0.0.1", 0), _Handler)
        self._httpd.provider = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def serve(self, path: str, document: Any, *headers: tuple[str, str], status: int = 200) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        with self._lock:
            self._answers[path] = Answer(status, body, headers)

    def fail(self, path: str, status: int = 503) -> None:
        with self._lock:
            self._answers[path] = Answer(status, b"unavailable")

    def answer(self, path: str) -> Answer:
        with self._lock:
            self.requests[path] += 1
            answer = self._answers.get(path, Answer(404, b"not found"))
        self.released.wait(timeout=30)
        return answer

    def count(self, path: str = JWKS) -> int:
        with self._lock:
            return self.requests[path]

    def close(self) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("idp-ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture
def provider(ca: tuple[trustme.CA, Path]) -> Iterator[Provider]:
    running = Provider(*ca)
    yield running
    running.close()


@pytest.fixture
def second_provider(ca: tuple[trustme.CA, Path]) -> Iterator[Provider]:
    running = Provider(*ca)
    yield running
    running.close()


# -- keys and tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    k1: rsa.RSAPrivateKey
    k2: rsa.RSAPrivateKey
    other: rsa.RSAPrivateKey
    ec1: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    k1, k2, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "abc")
    return Keys(k1, k2, other, ec.generate_private_key(ec.SECP256R1()))


def rsa_jwk(private: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256", **extra})
    return jwk


def ec_jwk(private: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": "ES256", **extra})
    return jwk


def token(
    key: Any,
    kid: str | None,
    *,
    alg: str = "RS256",
    iss: str = ISSUER,
    aud: str = AUDIENCE,
    sub: str = "alice",
) -> str:
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + 3600, "iss": iss, "aud": aud, "scope": "chat"}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def remote_auth(provider: Provider, **auth: Any) -> dict[str, Any]:
    """Config overrides: keys from *provider*'s JWKS, limits that never ban the test."""
    return {
        "auth": {
            "secret": "",
            "algorithms": ["RS256", "ES256"],
            "jwks_url": provider.url(JWKS),
            "jwks_ca_file": str(provider.ca_path),
            "audience": [AUDIENCE],
            "issuer": ISSUER,
            **auth,
        },
        "limits": {
            "auth_failures_before_ban": 10_000,
            "handshakes_per_minute": 100_000,
            "connections_per_address": 100,
            "pending_handshakes_per_address": 100,
        },
    }


class Clock:
    """The key source's clock, moved forward by the test (the keys' age, refetch gate)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def with_clock(clock: Clock) -> Any:
    def setup(app: App) -> None:
        assert app.guard.remote_keys is not None
        app.guard.remote_keys.clock = clock

    return setup


def readiness(server: RunningServer) -> tuple[bool, str | None]:
    ready: tuple[bool, str | None] = server.call(lambda: server.app.guard.ready)
    return ready


def admitted(server: RunningServer, credential: str) -> str:
    with server.connect(credential) as ws:
        frame = json.loads(ws.recv(timeout=5))
    assert frame["type"] == "welcome", frame
    return str(frame["subject"])


def refused(server: RunningServer, credential: str) -> tuple[int, str, str | None]:
    """(HTTP status, audit reason, audit detail) of a refused handshake."""
    with pytest.raises(InvalidStatus) as info:
        server.connect(credential).close()
    event = server.audit.events("handshake_refused")[-1]
    return info.value.response.status_code, event["reason"], event.get("detail")


# -- end to end: the standalone server -----------------------------------------------------


def test_provider_keys_admit_their_tokens_and_nothing_else(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1"), ec_jwk(keys.ec1, "e1")]})
    server = server_factory(remote_auth(provider))
    assert provider.count() == 1  # fetched at start, before any handshake
    (updated,) = server.audit.events("jwks_updated")
    assert (updated["source"], updated["kids"]) == (provider.url(JWKS), ["e1", "k1"])
    assert readiness(server) == (True, None)

    assert admitted(server, token(keys.k1, "k1")) == "alice"
    assert admitted(server, token(keys.ec1, "e1", alg="ES256", sub="bob")) == "bob"
    assert refused(server, token(keys.other, "k1")) == (
        401,
        "bad_signature",
        "signature does not verify",
    )
    assert refused(server, token(keys.k1, "k1", aud="another-api"))[:2] == (401, "invalid_audience")
    assert refused(server, token(keys.k1, "k1", iss="https://evil.test/"))[:2] == (
        401,
        "invalid_issuer",
    )
    assert refused(server, token(keys.k1, None)) == (401, "invalid_token", "no kid")
    # the RSA key does not verify ES256, the EC key not RS256, whatever the token says
    assert refused(server, token(keys.ec1, "k1", alg="ES256"))[:2] == (401, "algorithm_not_allowed")
    assert refused(server, token(keys.k1, "e1"))[:2] == (401, "algorithm_not_allowed")
    # no token named a kid the provider lacks: no refetch
    assert provider.count() == 1


def test_a_rotated_key_is_fetched_once_then_admitted_and_a_removed_key_refused(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    clock = Clock()
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    server = server_factory(remote_auth(provider), setup=with_clock(clock))
    old = token(keys.k1, "k1")
    assert admitted(server, old) == "alice"

    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1"), rsa_jwk(keys.k2, "k2")]})
    assert admitted(server, token(keys.k2, "k2", sub="bob")) == "bob"  # waited for the refetch
    assert provider.count() == 2
    assert admitted(server, token(keys.k2, "k2", sub="carol")) == "carol"
    assert provider.count() == 2  # now known: no fetch
    assert server.audit.events("jwks_updated")[-1]["added"] == ["k2"]

    # k1 is withdrawn; the next refetch (a later unknown kid) drops it, and the token
    # verified with it before is verified again, not taken from the verification cache
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k2, "k2")]})
    clock.advance(31)
    assert refused(server, token(keys.k2, "k3")) == (401, "invalid_token", "unknown kid")
    assert provider.count() == 3
    assert server.audit.events("jwks_updated")[-1]["removed"] == ["k1"]
    assert refused(server, old) == (401, "invalid_token", "unknown kid")
    assert provider.count() == 3  # within jwks_min_refetch_seconds of the last refetch


def test_an_unknown_kid_flood_makes_one_refetch(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    server = server_factory(remote_auth(provider))
    assert provider.count() == 1
    forged = [token(keys.other, secrets.token_hex(8)) for _ in range(40)]

    def attempt(credential: str) -> int:
        with pytest.raises(InvalidStatus) as info:
            server.connect(credential).close()
        return info.value.response.status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(attempt, forged))
    assert statuses == [401] * 40
    # 40 unknown kids, concurrent: one shared refetch, and none more within 30 s
    assert provider.count() == 2
    assert all(attempt(credential) == 401 for credential in forged[:5])
    assert provider.count() == 2
    reasons = {(e["reason"], e["detail"]) for e in server.audit.events("handshake_refused")}
    assert reasons == {("invalid_token", "unknown kid")}
    assert admitted(server, token(keys.k1, "k1")) == "alice"


def test_provider_outage_keeps_the_keys_until_max_stale_then_refuses(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    clock = Clock()
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    server = server_factory(
        remote_auth(provider, jwks_max_stale_seconds=3600), setup=with_clock(clock)
    )
    known = token(keys.k1, "k1")
    assert admitted(server, known) == "alice"

    provider.fail(JWKS)  # the provider answers 503 from now on
    clock.advance(600)  # past jwks_cache_seconds (300): keys stale, a refetch is due
    # a token verified with stale keys admits at once and asks for a refetch behind it
    assert admitted(server, token(keys.k1, "k1", sub="bob")) == "bob"
    failed = eventually(lambda: server.audit.events("jwks_fetch_failed"), what="the refetch")
    assert admitted(server, known) == "alice"  # the refetch failed: the last keys are kept
    assert admitted(server, token(keys.k1, "k1", sub="carol")) == "carol"
    assert failed[-1]["keys_kept"] == 1
    assert failed[-1]["detail"] == f"HTTP 503 from {provider.url(JWKS)}"
    assert readiness(server) == (True, None)

    clock.advance(3600)  # fetched more than jwks_max_stale_seconds ago
    assert refused(server, known) == (
        503,
        "keys_unavailable",
        "identity provider keys older than auth.jwks_max_stale_seconds",
    )
    assert refused(server, token(keys.k1, "k1", sub="bob"))[:2] == (503, "keys_unavailable")
    (expired,) = server.audit.events("jwks_keys_expired")  # said once, not per handshake
    assert expired["max_stale_s"] == 3600
    assert readiness(server) == (False, "keys_unavailable")
    # a provider outage is not the clients' failure: nobody is banned for it
    assert server.audit.events("ban_started") == []

    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    clock.advance(31)  # the next refetch is allowed
    assert admitted(server, known) == "alice"
    assert server.audit.events("jwks_recovered")
    assert readiness(server) == (True, None)


BAD_DOCUMENTS: list[tuple[bytes | dict[str, Any], str]] = [
    (b"<html>sign in</html>", "the JWKS is not JSON"),
    ({"keys": "k1"}, "the JWKS has no 'keys' array"),
    ({"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}]}, "no key usable"),
    ({"keys": [{"kid": "k1", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]}, "no key usable"),
    ({"keys": [], "padding": "x" * (300 * 1024)}, "over 262144 bytes"),
]


def test_malformed_or_oversized_documents_are_refused_and_the_keys_kept(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    clock = Clock()
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    server = server_factory(remote_auth(provider), setup=with_clock(clock))
    for document, why in BAD_DOCUMENTS:
        provider.serve(JWKS, document)
        clock.advance(31)
        fetches = provider.count()
        assert refused(server, token(keys.k2, "k2"))[:2] == (401, "invalid_token")
        assert provider.count() == fetches + 1
        assert why in server.audit.events("jwks_fetch_failed")[-1]["detail"]
        assert admitted(server, token(keys.k1, "k1")) == "alice"  # the last good keys
    assert len(server.audit.events("jwks_updated")) == 1


def test_oidc_discovery_finds_the_jwks_of_the_issuer(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    issuer = provider.url("/realms/demo")  # Keycloak-style: the realm is the issuer
    certs = "/realms/demo/protocol/openid-connect/certs"
    discovery = "/realms/demo/.well-known/openid-configuration"
    provider.serve(discovery, {"issuer": issuer, "jwks_uri": provider.url(certs)})
    provider.serve(certs, {"keys": [rsa_jwk(keys.k1, "k1")]})
    overrides = remote_auth(provider, jwks_url="", oidc_issuer=issuer, issuer=issuer)
    server = server_factory(overrides)
    assert admitted(server, token(keys.k1, "k1", iss=issuer)) == "alice"
    assert refused(server, token(keys.k1, "k1"))[:2] == (401, "invalid_issuer")
    assert (provider.count(discovery), provider.count(certs)) == (1, 1)
    assert server.audit.events("jwks_updated")[0]["source"] == issuer


def test_oidc_discovery_naming_another_issuer_is_refused(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    issuer = provider.url("/realms/demo")
    discovery = "/realms/demo/.well-known/openid-configuration"
    # e.g. a discovery document of another tenant, or served by someone else
    provider.serve(
        discovery, {"issuer": provider.url("/realms/other"), "jwks_uri": provider.url(JWKS)}
    )
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    server = server_factory(remote_auth(provider, jwks_url="", oidc_issuer=issuer, issuer=issuer))
    assert provider.count(JWKS) == 0  # its keys were never fetched
    assert "another issuer" in server.audit.events("jwks_fetch_failed")[0]["detail"]
    assert refused(server, token(keys.k1, "k1", iss=issuer)) == (
        503,
        "keys_unavailable",
        "no keys from the identity provider yet",
    )
    assert readiness(server) == (False, "keys_unavailable")
    assert provider.count(JWKS) == 0


def test_a_provider_down_at_start_leaves_the_node_up_but_refusing(
    server_factory: ServerFactory, provider: Provider, keys: Keys
) -> None:
    clock = Clock()
    provider.fail(JWKS)
    server = server_factory(remote_auth(provider), setup=with_clock(clock))
    assert readiness(server) == (False, "keys_unavailable")
    fetches = provider.count(JWKS)
    assert refused(server, token(keys.k1, "k1"))[:2] == (503, "keys_unavailable")
    clock.advance(20)
    assert refused(server, token(keys.k1, "k1", sub="bob"))[:2] == (503, "keys_unavailable")
    # the failed fetch at start counts: no handshake asks again within 30 s
    assert provider.count(JWKS) == fetches

    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    clock.advance(31)
    assert admitted(server, token(keys.k1, "k1")) == "alice"  # the handshake waited for it
    assert readiness(server) == (True, None)


def test_the_same_kid_at_two_providers_is_never_confused(
    server_factory: ServerFactory, provider: Provider, second_provider: Provider, keys: Keys
) -> None:
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "shared")]})
    second_provider.serve(JWKS, {"keys": [rsa_jwk(keys.k2, "shared")]})
    first = server_factory(remote_auth(provider))
    second = server_factory(remote_auth(second_provider))
    assert admitted(first, token(keys.k1, "shared")) == "alice"
    assert admitted(second, token(keys.k2, "shared")) == "alice"
    assert refused(first, token(keys.k2, "shared"))[:2] == (401, "bad_signature")
    assert refused(second, token(keys.k1, "shared"))[:2] == (401, "bad_signature")


# -- the key source on its own ---------------------------------------------------------------


def remote_config(provider: Provider, **auth: Any) -> Config:
    return validate_config({"auth": remote_auth(provider, **auth)["auth"]})


def test_a_verifier_never_gets_a_key_of_another_source(
    provider: Provider, second_provider: Provider, keys: Keys
) -> None:
    second_provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    mine, theirs = remote_config(provider), remote_config(second_provider)

    async def run() -> None:
        source = RemoteJwks(theirs.auth)
        assert await source.start()
        try:
            # a verifier configured for `provider`, handed the other provider's key source
            verifier = TokenVerifier(mine.auth, KeyMaterial(), key_source=source)
            with pytest.raises(UnknownKey):
                verifier.verify(token(keys.k1, "k1"))
            right = TokenVerifier(theirs.auth, KeyMaterial(), key_source=source)
            assert right.verify(token(keys.k1, "k1")).subject == "alice"
        finally:
            await source.close()

    asyncio.run(run())
    assert provider.count() == 0


def test_the_key_cache_is_keyed_by_source_and_kid() -> None:
    cache = KeyCache()
    a, b = ProviderKey("key-a", frozenset({"RS256"}), "fa"), ProviderKey("key-b", frozenset(), "fb")
    cache.replace("https://a.test/jwks", {"k1": a})
    cache.replace("https://b.test/jwks", {"k1": b})
    assert cache.get("https://a.test/jwks", "k1") is a
    assert cache.get("https://b.test/jwks", "k1") is b
    assert cache.get("https://c.test/jwks", "k1") is None
    cache.replace("https://a.test/jwks", {})
    assert cache.get("https://a.test/jwks", "k1") is None
    assert cache.get("https://b.test/jwks", "k1") is b


def test_tls_is_verified_against_the_configured_ca(
    provider: Provider, keys: Keys, tmp_path: Path
) -> None:
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    events: list[tuple[str, dict[str, Any]]] = []

    async def run() -> bool:
        source = RemoteJwks(
            remote_config(provider, jwks_ca_file=str(stranger)).auth,
            events=lambda event, **fields: events.append((event, fields)),
        )
        try:
            return await source.start()
        finally:
            await source.close()

    assert asyncio.run(run()) is False
    assert [e for e, _ in events] == ["jwks_fetch_failed"]
    assert "CERTIFICATE_VERIFY_FAILED" in events[0][1]["detail"]
    assert provider.count() == 0  # no request was sent over the unverified connection


def test_a_provider_that_does_not_answer_is_given_up_on_in_time(
    provider: Provider, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_jwks, "FETCH_TIMEOUT", 0.3)
    provider.serve(JWKS, {"keys": [rsa_jwk(keys.k1, "k1")]})
    provider.released.clear()  # the provider accepts the request and never answers
    events: list[tuple[str, dict[str, Any]]] = []

    async def run() -> bool:
        source = RemoteJwks(
            remote_config(provider).auth,
            events=lambda event, **fields: events.append((event, fields)),
        )
        try:
            ok = await source.start()
            with pytest.raises(KeysUnavailable):
                source.lookup(provider.url(JWKS), "k1")
            return ok
        finally:
            await source.close()

    try:
        assert asyncio.run(run()) is False
    finally:
        provider.released.set()
    assert events[0][1]["detail"] == "no complete answer within 0.3 s"


def test_an_unreadable_ca_file_is_a_start_up_error(provider: Provider, tmp_path: Path) -> None:
    config = remote_config(provider, jwks_ca_file=str(tmp_path / "absent.pem"))
    with pytest.raises(KeyLoadError) as info:
        Guard(config, audit=AuditLog(io.StringIO()))
    assert info.value.key == "auth.jwks_ca_file"


# -- which keys of a JWKS are taken -----------------------------------------------------------


def test_only_public_signature_keys_fitting_the_algorithms_are_taken(keys: Keys) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    document = {
        "keys": [
            rsa_jwk(keys.k1, "good"),
            ec_jwk(keys.ec1, "good-ec"),
            {**rsa_jwk(keys.k2, "no-alg"), "alg": None},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
            {**rsa_jwk(keys.k2, "private"), "d": "AQAB"},
            rsa_jwk(keys.k2, "encryption", use="enc"),
            rsa_jwk(keys.k2, "ops", key_ops=["encrypt"]),
            rsa_jwk(keys.k2, "rs512", alg="RS512"),
            ec_jwk(p384, "p384", alg="ES384"),
            {**ec_jwk(p384, "p384-claims-es256")},
            rsa_jwk(small, "short"),
            rsa_jwk(keys.k2, "twice"),
            rsa_jwk(keys.other, "twice"),
            {**rsa_jwk(keys.k2, "x"), "kid": 7},
        ]
    }
    document["keys"][2].pop("alg")
    taken, skipped = parse_jwks(json.dumps(document).encode(), ("RS256", "ES256"))
    assert sorted(taken) == ["good", "good-ec", "no-alg"]
    assert taken["good"].algorithms == frozenset({"RS256"})
    assert taken["good-ec"].algorithms == frozenset({"ES256"})
    assert taken["no-alg"].algorithms == frozenset({"RS256"})
    assert len(skipped) == 10  # "twice" is said once: the second key makes the kid ambiguous
    assert any("HMAC (oct)" in why for why in skipped)
    assert any("private key material" in why for why in skipped)
    assert any("shorter than 2048" in why for why in skipped)
    assert any("kid shared" in why for why in skipped)


def test_eddsa_keys_are_taken_for_eddsa_only() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    body = json.dumps({"keys": [{**jwk, "kid": "ed"}]}).encode()
    taken, _ = parse_jwks(body, ("EdDSA",))
    assert taken["ed"].algorithms == frozenset({"EdDSA"})
    with pytest.raises(DocumentRefused):
        parse_jwks(body, ("RS256",))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not JSON"),
        (b"[]", "no 'keys' array"),
        (b'{"keys": [1]}', "not an object"),
        (
            json.dumps({"keys": [{"kty": "RSA", "kid": str(i)} for i in range(101)]}).encode(),
            "more than 100",
        ),
        (b'{"keys": [{"kty": "oct", "kid": "a", "k": "AAAA"}]}', "no key usable"),
    ],
)
def test_malformed_documents_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(DocumentRefused) as info:
        parse_jwks(body, ("RS256",))
    assert why in str(info.value)


def test_discovery_must_name_the_issuer_and_an_https_jwks() -> None:
    issuer = "https://login.example.test/tenant/v2.0"
    good = {"issuer": issuer, "jwks_uri": "https://login.example.test/tenant/keys"}
    assert parse_discovery(json.dumps(good).encode(), issuer) == good["jwks_uri"]
    for document, why in [
        ({**good, "issuer": issuer + "/"}, "another issuer"),
        ({**good, "issuer": None}, "another issuer"),
        ({**good, "jwks_uri": "http://login.example.test/keys"}, "not https"),
        ({**good, "jwks_uri": "https://user:pw@login.example.test/keys"}, "not https"),
        ({"issuer": issuer}, "no jwks_uri"),
        # a remote issuer pointing the node at its own loopback services in clear text
        ({**good, "jwks_uri": "http://127.0.0.1:9090/metrics"}, "while the issuer is not"),
        ({**good, "jwks_uri": "http://localhost/keys"}, "while the issuer is not"),
        ({**good, "jwks_uri": "http://[::1]/keys"}, "while the issuer is not"),
    ]:
        with pytest.raises(DocumentRefused) as info:
            parse_discovery(json.dumps(document).encode(), issuer)
        assert why in str(info.value), document


def test_a_provider_on_loopback_may_serve_its_keys_over_http() -> None:
    issuer = "http://127.0.0.1:8080/realms/dev"
    document = {"issuer": issuer, "jwks_uri": "http://127.0.0.1:8080/realms/dev/certs"}
    assert parse_discovery(json.dumps(document).encode(), issuer) == document["jwks_uri"]


def test_cache_control_max_age() -> None:
    assert max_age({"cache-control": "public, max-age=120, must-revalidate"}) == 120
    assert max_age({"cache-control": "no-store"}) == 0
    assert max_age({"cache-control": "max-age=-5"}) == 0
    assert max_age({"cache-control": "max-age=soon"}) is None
    assert max_age({}) is None


# -- configuration ---------------------------------------------------------------------


def auth_error(**auth: Any) -> ConfigError:
    base = {"secret": "", "algorithms": ["RS256"], "audience": [AUDIENCE], "issuer": ISSUER}
    with pytest.raises(ConfigError) as info:
        validate_config({"auth": {**base, **auth}})
    return info.value


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"jwks_url": "http://idp.example.test/jwks"}, "auth.jwks_url"),
        ({"jwks_url": "ftp://idp.example.test/jwks"}, "auth.jwks_url"),
        ({"jwks_url": "https://user:pw@idp.example.test/jwks"}, "auth.jwks_url"),
        ({"jwks_url": "https:///jwks"}, "auth.jwks_url"),
        ({"oidc_issuer": "http://idp.example.test/realms/x"}, "auth.oidc_issuer"),
        ({"oidc_issuer": "https://idp.example.test/?tenant=x"}, "auth.oidc_issuer"),
        ({"jwks_url": "https://idp.example.test/jwks", "audience": []}, "auth.audience"),
        ({"oidc_issuer": "https://idp.example.test", "issuer": ""}, "auth.issuer"),
        (
            {"jwks_url": "https://idp.example.test/jwks", "algorithms": ["HS256"]},
            "auth.algorithms",
        ),
        (
            {"jwks_url": "https://a.test/jwks", "oidc_issuer": "https://a.test"},
            "auth.oidc_issuer",
        ),
        ({"jwks_url": "https://a.test/jwks", "jwks_file": "/etc/jwks.json"}, "auth.jwks_url"),
        ({"public_key_file": "/etc/k.pem", "jwks_ca_file": "/etc/ca.pem"}, "auth.jwks_ca_file"),
        (
            {"jwks_url": "https://a.test/jwks", "jwks_min_refetch_seconds": 600},
            "auth.jwks_min_refetch_seconds",
        ),
        (
            {"jwks_url": "https://a.test/jwks", "jwks_max_stale_seconds": 60},
            "auth.jwks_max_stale_seconds",
        ),
    ],
)
def test_remote_key_config_errors_name_the_key(auth: dict[str, Any], key: str) -> None:
    assert auth_error(**auth).key == key


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/jwks", "http://[::1]:8080/jwks", "http://localhost/realms/dev"],
)
def test_plain_http_is_accepted_on_loopback_only(url: str) -> None:
    config = validate_config(
        {
            "auth": {
                "secret": "",
                "algorithms": ["RS256"],
                "jwks_url": url,
                "audience": [AUDIENCE],
                "issuer": ISSUER,
            }
        }
    )
    assert config.auth.remote_jwks == url
    assert (
        auth_error(
            jwks_url=url.replace("localhost", "localhost.example")
            .replace("127.0.0.1", "10.0.0.1")
            .replace("[::1]", "[2001:db8::1]")
        ).key
        == "auth.jwks_url"
    )
