"""JWT authentication at the handshake (issue 2).

Every refusal is a real HTTP response before ``101``: status 401 with a
``WWW-Authenticate: Bearer ...`` header and a short body that explains nothing
about the internals. Most tests drive the real server with a real client; a
few exercise :class:`wsguard.core.auth.TokenVerifier` directly.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response
from websockets.sync.client import connect

from conftest import (
    SECRET,
    RunningServer,
    ServerFactory,
    deep_merge,
    eventually,
    make_config,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from wsguard.config.keys import load_keys
from wsguard.config.loader import validate_config
from wsguard.core.auth import AuthFailure, KeyMaterial, TokenVerifier
from wsguard.core.headers import Headers
from wsguard.core.request import HandshakeRequest
from wsguard.errors import ConfigError, KeyLoadError

# Many tests below refuse several tokens on the same server: keep the
# auth-failure ban and the handshake rate out of the way (they have their own tests).
RELAXED: dict[str, Any] = {
    "limits": {"auth_failures_before_ban": 1000, "handshakes_per_minute": 1000}
}
ALLOWED_ORIGIN = "https://app.example.com"
# Words a refusal body must never contain: it may say "invalid token", not why.
INTERNAL_WORDS = frozenset(
    {
        "signature",
        "kid",
        "alg",
        "algorithm",
        "claim",
        "key",
        "aud",
        "audience",
        "iss",
        "issuer",
        "nbf",
        "exp",
        "pyjwt",
        "jwt",
        "jwk",
        "jwks",
        "traceback",
        "error",
        "exception",
        "hs256",
        "rs256",
        "secret",
        "decode",
        "none",
    }
)


# -- helpers -----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(
    header: dict[str, Any],
    payload: dict[str, Any],
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A compact JWS built by hand (no library checks on what we put in it)."""
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}"
    signature = b"" if sign is None else sign(signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def hmac_signer(key: bytes, digest: Any = hashlib.sha256) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(key, message, digest).digest()


def claims(sub: str = "mallory", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 3600, "scope": "chat admin"}
    out.update(extra)
    return out


def relaxed(factory: ServerFactory, overrides: dict[str, Any] | None = None) -> RunningServer:
    return factory(deep_merge(RELAXED, overrides or {}))


def refused(
    server: RunningServer,
    token: str | None,
    *,
    transport: str = "header",
    **kwargs: Any,
) -> Response:
    """Attempt a handshake that must be refused; return the HTTP response.

    ``token=None`` sends no credentials at all (unlike ``RunningServer.connect``,
    which mints a token when given None).
    """
    if token is None:
        token, transport = "unused", "none"
    with pytest.raises(InvalidStatus) as info:
        server.connect(token, transport=transport, **kwargs).close()
    return info.value.response


def assert_short_body(response: Response, *secrets: str) -> None:
    body = response.body.decode("utf-8", "replace")
    assert 0 < len(body) <= 64, body
    words = set(re.findall(r"[a-z0-9_]+", body.lower()))
    assert not words & INTERNAL_WORDS, body
    for secret in secrets:
        assert secret not in body


def assert_401(response: Response, *secrets: str, invalid_token: bool | None = None) -> None:
    """401 + ``WWW-Authenticate: Bearer ...`` + a short body that leaks nothing."""
    assert response.status_code == 401, (response.status_code, response.body)
    challenges = response.headers.get_all("WWW-Authenticate")
    assert len(challenges) == 1, challenges
    assert challenges[0].startswith("Bearer "), challenges
    if invalid_token is not None:
        # RFC 6750 3.1: error="invalid_token" for a bad token, no error code when
        # the request carried no credentials at all.
        assert ('error="invalid_token"' in challenges[0]) is invalid_token, challenges
    assert_short_body(response, *secrets)
    for name, value in response.headers.raw_items():
        for secret in secrets:
            assert secret not in value, name


def refusal_reason(server: RunningServer) -> str:
    events = server.audit.events("handshake_refused")
    assert events, server.audit.getvalue()
    return str(events[-1]["reason"])


def expect_401(
    server: RunningServer,
    token: str | None,
    *,
    reasons: set[str] | None = None,
    transport: str = "header",
    **kwargs: Any,
) -> Response:
    response = refused(server, token, transport=transport, **kwargs)
    secrets = () if token is None else (token,)
    reason = refusal_reason(server)
    assert_401(response, *secrets, invalid_token=reason != "missing_credentials")
    if reasons is not None:
        assert reason in reasons
    return response


def welcome(server: RunningServer, token: str, **kwargs: Any) -> dict[str, Any]:
    with server.connect(token, **kwargs) as ws:
        frame: dict[str, Any] = json.loads(ws.recv(timeout=5))
    assert frame["type"] == "welcome", frame
    return frame


def raw_response_head(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send *request* and return the status line and headers of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\r\n\r\n", 1)[0]


def header_values(head: bytes, name: str) -> list[str]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


# -- key material --------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private: Any
    public_pem: bytes
    path: Path


@pytest.fixture(scope="module")
def rsa_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("rsa") / "public.pem"
    path.write_bytes(pem)
    return KeyPair(private, pem, path)


@pytest.fixture(scope="module")
def ec_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("ec") / "public.pem"
    path.write_bytes(pem)
    return KeyPair(private, pem, path)


@dataclass(frozen=True)
class Jwks:
    k1: Any
    k2: Any
    attacker: Any
    path: Path


def public_jwk(private: Any, kid: str | None) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return jwk


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Jwks:
    k1, k2, attacker = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)
    )
    document = {"keys": [public_jwk(k1, "k1"), public_jwk(k2, "k2")]}
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(document))
    return Jwks(k1, k2, attacker, path)


def public_key_config(pair: KeyPair, alg: str) -> dict[str, Any]:
    return {"auth": {"secret": "", "algorithms": [alg], "public_key_file": str(pair.path)}}


def jwks_config(keys: Jwks) -> dict[str, Any]:
    return {"auth": {"secret": "", "algorithms": ["RS256"], "jwks_file": str(keys.path)}}


# -- missing and valid credentials --------------------------------------------


def test_no_credentials_is_401_with_bearer_challenge(server: RunningServer) -> None:
    response = expect_401(server, None, reasons={"missing_credentials"})
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="wsguard"'
    assert server.connection_count() == 0


def test_no_credentials_raw_socket_gets_401_before_upgrade(server: RunningServer) -> None:
    answer = raw_http(server.port, upgrade_request())
    assert status_of(answer) == 401
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert header_values(head, "WWW-Authenticate")[0].startswith("Bearer ")
    assert b"101" not in answer.split(b"\r\n", 1)[0]
    assert not header_values(head, "Sec-WebSocket-Accept")


def test_valid_header_token_gets_welcome_with_subject_and_scopes(server: RunningServer) -> None:
    token = make_token("alice", scopes="chat read", jti="tok-1")
    frame = welcome(server, token)
    assert frame["subject"] == "alice"
    assert frame["scopes"] == ["chat", "read"]
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert frame["expires_at"] == exp
    admitted = server.audit.events("connection_admitted")
    assert admitted[-1]["subject"] == "alice"
    assert admitted[-1]["token_id"] == "tok-1"


def test_non_bearer_authorization_scheme_is_401(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    token = make_token()
    expect_401(
        server, None, headers={"Authorization": f"Basic {token}"}, reasons={"malformed_credentials"}
    )
    expect_401(server, None, headers={"Authorization": "Bearer"})
    # the failed attempts did not disturb a correct one
    assert welcome(server, token)["subject"] == "alice"


# -- algorithm pinning ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize(("alg", "digest"), [("HS384", hashlib.sha384), ("HS512", hashlib.sha512)])
def test_other_hmac_algorithm_is_refused(server: RunningServer, alg: str, digest: Any) -> None:
    token = make_token(alg=alg)  # correct secret, algorithm not pinned
    expect_401(server, token, reasons={"algorithm_not_allowed"})
    hand = craft({"alg": alg, "typ": "JWT"}, claims(), hmac_signer(SECRET.encode(), digest))
    expect_401(server, hand, reasons={"algorithm_not_allowed"})


def test_additionally_pinned_hmac_algorithm_is_admitted(server_factory: ServerFactory) -> None:
    secret = "s" * 64  # long enough for HS512
    server = relaxed(server_factory, {"auth": {"algorithms": ["HS256", "HS512"], "secret": secret}})
    assert welcome(server, make_token("hs512", alg="HS512", secret=secret))["subject"] == "hs512"
    assert welcome(server, make_token("hs256", secret=secret))["subject"] == "hs256"
    expect_401(server, make_token(alg="HS384", secret=secret), reasons={"algorithm_not_allowed"})


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_spelling_is_refused(server: RunningServer, spelling: str) -> None:
    token = craft({"alg": spelling, "typ": "JWT"}, claims("root", scope="admin"))
    assert token.endswith(".")
    expect_401(server, token, reasons={"algorithm_not_allowed"})
    assert not server.audit.events("connection_admitted")


@pytest.mark.parametrize("spelling", ["hs256", "Hs256", "HS256 ", ""])
def test_algorithm_name_must_match_exactly(server_factory: ServerFactory, spelling: str) -> None:
    server = relaxed(server_factory)
    token = craft({"alg": spelling, "typ": "JWT"}, claims(), hmac_signer(SECRET.encode()))
    expect_401(server, token, reasons={"algorithm_not_allowed"})
    no_alg = craft({"typ": "JWT"}, claims(), hmac_signer(SECRET.encode()))
    expect_401(server, no_alg, reasons={"algorithm_not_allowed"})


# -- algorithm confusion (HMAC token verified with a public key) ----------------


def test_rs256_genuine_token_admitted(server_factory: ServerFactory, rsa_pair: KeyPair) -> None:
    server = server_factory(public_key_config(rsa_pair, "RS256"))
    token = jwt.encode(claims("rsa-user", scope="chat"), rsa_pair.private, algorithm="RS256")
    frame = welcome(server, token)
    assert frame["subject"] == "rsa-user"
    assert frame["scopes"] == ["chat"]


@pytest.mark.parametrize(
    ("alg", "digest"),
    [("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)],
)
def test_rs256_hmac_confusion_with_public_pem_is_refused(
    server_factory: ServerFactory, rsa_pair: KeyPair, alg: str, digest: Any
) -> None:
    server = relaxed(server_factory, public_key_config(rsa_pair, "RS256"))
    for secret in (rsa_pair.public_pem, rsa_pair.public_pem.strip()):
        token = craft(
            {"alg": alg, "typ": "JWT"}, claims("root", scope="admin"), hmac_signer(secret, digest)
        )
        expect_401(server, token, reasons={"algorithm_not_allowed"})
    assert not server.audit.events("connection_admitted")


def test_rs256_other_asymmetric_algorithms_are_refused(
    server_factory: ServerFactory, rsa_pair: KeyPair
) -> None:
    server = relaxed(server_factory, public_key_config(rsa_pair, "RS256"))
    for alg in ("RS512", "PS256"):
        token = jwt.encode(claims(), rsa_pair.private, algorithm=alg)
        expect_401(server, token, reasons={"algorithm_not_allowed"})


def test_rs256_token_signed_by_another_key_is_refused(
    server_factory: ServerFactory, rsa_pair: KeyPair, jwks: Jwks
) -> None:
    server = server_factory(public_key_config(rsa_pair, "RS256"))
    token = jwt.encode(claims(), jwks.attacker, algorithm="RS256")
    expect_401(server, token, reasons={"bad_signature"})


def test_es256_genuine_admitted_and_confusion_refused(
    server_factory: ServerFactory, ec_pair: KeyPair, rsa_pair: KeyPair
) -> None:
    server = relaxed(server_factory, public_key_config(ec_pair, "ES256"))
    genuine = jwt.encode(claims("ec-user", scope="data"), ec_pair.private, algorithm="ES256")
    frame = welcome(server, genuine)
    assert frame["subject"] == "ec-user"
    assert frame["scopes"] == ["data"]

    confused = craft(
        {"alg": "HS256", "typ": "JWT"}, claims("root"), hmac_signer(ec_pair.public_pem)
    )
    expect_401(server, confused, reasons={"algorithm_not_allowed"})
    rsa_token = jwt.encode(claims(), rsa_pair.private, algorithm="RS256")
    expect_401(server, rsa_token, reasons={"algorithm_not_allowed"})
    forged = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    expect_401(server, forged, reasons={"bad_signature"})


def test_a_token_of_another_key_family_than_the_key_is_a_401_never_a_hang(
    server_factory: ServerFactory, ec_pair: KeyPair, rsa_pair: KeyPair
) -> None:
    """With two public-key families pinned and one public key (EC), an RS256 token makes
    PyJWT raise TypeError, not a PyJWTError: refused 401 ``invalid_token`` and counted
    toward a ban like any bad token, not a handshake left without an answer."""
    config = public_key_config(ec_pair, "ES256")
    config["auth"]["algorithms"] = ["ES256", "RS256"]
    server = relaxed(server_factory, config)
    rsa_token = jwt.encode(claims(), rsa_pair.private, algorithm="RS256")
    expect_401(server, rsa_token, reasons={"invalid_token"})
    genuine = jwt.encode(claims("ec-user"), ec_pair.private, algorithm="ES256")
    assert welcome(server, genuine)["subject"] == "ec-user"


def test_mixing_hmac_and_public_key_algorithms_is_refused_by_validation(
    rsa_pair: KeyPair,
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(
            {"auth": {"algorithms": ["RS256", "HS256"], "public_key_file": str(rsa_pair.path)}}
        )
    assert info.value.key.startswith("auth.")
    with pytest.raises(ConfigError) as info:
        validate_config({"auth": {"algorithms": ["HS256"], "public_key_file": str(rsa_pair.path)}})
    assert info.value.key.startswith("auth.")


# -- registered claims -----------------------------------------------------------


def test_exp_required_by_default(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    expect_401(server, make_token(exp=None), reasons={"missing_claim"})
    expect_401(server, make_token(exp="soon"))
    expect_401(server, make_token(exp=None, nbf=int(time.time()) - 5), reasons={"missing_claim"})


def test_string_exp_is_refused_or_honoured(server: RunningServer) -> None:
    # RFC 7519: exp is a NumericDate (a JSON number). PyJWT converts a numeric
    # string with int(), so the token verifies; wsguard must then either refuse it
    # or carry that expiry with the connection (welcome.expires_at, close 4001).
    exp = int(time.time()) + 3600
    token = make_token("str-exp", exp=str(exp))
    try:
        frame = welcome(server, token)
    except InvalidStatus as exc:
        assert_401(exc.response, token, invalid_token=True)
        return
    assert frame["expires_at"] == exp


def test_exp_optional_when_configured(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"require_exp": False}})
    frame = welcome(server, make_token("forever", exp=None))
    assert frame["subject"] == "forever"
    assert frame["expires_at"] is None


def test_expired_token_is_refused(server: RunningServer) -> None:
    expect_401(server, make_token(ttl=-5), reasons={"token_expired"})


def test_token_living_longer_than_the_maximum_lifetime_is_refused(
    server_factory: ServerFactory,
) -> None:
    """No token may outlive a revocation of it: exp further ahead than
    auth.max_token_lifetime_seconds (24 h by default) is refused."""
    server = relaxed(server_factory)
    expect_401(server, make_token(ttl=86400 + 600), reasons={"invalid_token"})
    assert welcome(server, make_token("day", ttl=86400 - 600))["subject"] == "day"
    short = relaxed(server_factory, {"auth": {"max_token_lifetime_seconds": 600}})
    expect_401(short, make_token(ttl=1200), reasons={"invalid_token"})
    assert welcome(short, make_token("brief", ttl=300))["subject"] == "brief"


@pytest.mark.parametrize(
    "claim",
    [{"exp": 10**400}, {"nbf": -(10**400)}, {"iat": 10**400}, {"exp": -(2**60)}],
    ids=["exp-huge", "nbf-huge-negative", "iat-huge", "exp-far-past"],
)
def test_a_time_claim_no_float_holds_is_a_401_never_a_crash(
    server_factory: ServerFactory, claim: dict[str, Any]
) -> None:
    """PyJWT takes integers of any size: a signed token whose exp or nbf no float holds
    is refused 401 like any bad token, not an OverflowError that left the handshake
    without an answer (picows) or answered 500 (websockets)."""
    server = relaxed(server_factory)
    reasons = {"invalid_token", "token_expired", "token_not_yet_valid"}  # PyJWT's checks first
    expect_401(server, make_token(**claim), reasons=reasons)


def test_a_policy_that_fails_answers_500_and_closes(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the handshake policy fails closed with an answer (500, audited), never a
    socket left waiting past the handshake timeout."""
    server = relaxed(server_factory)

    async def broken(request: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.app.guard.handshakes, "evaluate", broken)
    response = refused(server, make_token())
    assert response.status_code == 500
    [record] = eventually(lambda: server.audit.events("handshake_refused"), what="the audit")
    assert record["reason"] == "policy_error"
    refusals = server.app.guard.monitor.metrics.refusals
    assert refusals["handshake", "policy"] == 1  # its own category, for an alert on bugs


def test_leeway_admits_just_expired_token(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, {"auth": {"leeway_seconds": 60}})
    assert welcome(server, make_token("late", ttl=-5))["subject"] == "late"
    expect_401(server, make_token(ttl=-120), reasons={"token_expired"})


def test_nbf_in_future_is_refused(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    now = int(time.time())
    expect_401(server, make_token(nbf=now + 600), reasons={"token_not_yet_valid"})
    assert welcome(server, make_token("ready", nbf=now - 10))["subject"] == "ready"


def test_nbf_within_leeway_is_admitted(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"leeway_seconds": 60}})
    assert welcome(server, make_token("soon", nbf=int(time.time()) + 5))["subject"] == "soon"


AUD_ISS: dict[str, Any] = {
    "auth": {"audience": ["wsguard-api"], "issuer": "https://issuer.example"}
}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"aud": "wsguard-api", "iss": "https://issuer.example"}, id="both-right"),
        pytest.param(
            {"aud": ["other", "wsguard-api"], "iss": "https://issuer.example"}, id="aud-list"
        ),
    ],
)
def test_right_audience_and_issuer_admitted(
    server_factory: ServerFactory, extra: dict[str, Any]
) -> None:
    server = server_factory(AUD_ISS)
    assert welcome(server, make_token("bob", **extra))["subject"] == "bob"


@pytest.mark.parametrize(
    ("extra", "reasons"),
    [
        pytest.param(
            {"aud": "other-api", "iss": "https://issuer.example"},
            {"invalid_audience"},
            id="wrong-aud",
        ),
        pytest.param(
            {"iss": "https://issuer.example"},
            {"missing_claim", "invalid_audience"},
            id="missing-aud",
        ),
        pytest.param(
            {"aud": "wsguard-api", "iss": "https://evil.example"},
            {"invalid_issuer"},
            id="wrong-iss",
        ),
        pytest.param({"aud": "wsguard-api"}, {"missing_claim", "invalid_issuer"}, id="missing-iss"),
        pytest.param(
            {"aud": "wsguard-api-x", "iss": "https://issuer.example.evil"},
            {"invalid_audience", "invalid_issuer"},
            id="prefix-lookalikes",
        ),
    ],
)
def test_wrong_or_missing_audience_or_issuer_refused(
    server_factory: ServerFactory, extra: dict[str, Any], reasons: set[str]
) -> None:
    server = server_factory(AUD_ISS)
    expect_401(server, make_token(**extra), reasons=reasons)


def test_missing_subject_is_refused(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    expect_401(server, make_token(sub=None))  # type: ignore[arg-type]
    expect_401(server, make_token(""))
    expect_401(server, make_token("evil\nsubject"))


# -- JWKS ---------------------------------------------------------------------------


def test_jwks_key_chosen_by_kid(server_factory: ServerFactory, jwks: Jwks) -> None:
    server = relaxed(server_factory, jwks_config(jwks))
    t1 = jwt.encode(claims("one"), jwks.k1, algorithm="RS256", headers={"kid": "k1"})
    t2 = jwt.encode(claims("two"), jwks.k2, algorithm="RS256", headers={"kid": "k2"})
    assert welcome(server, t1)["subject"] == "one"
    assert welcome(server, t2)["subject"] == "two"
    # signed by k1 but naming k2: verified with k2, so refused
    swapped = jwt.encode(claims(), jwks.k1, algorithm="RS256", headers={"kid": "k2"})
    expect_401(server, swapped, reasons={"bad_signature"})


@pytest.mark.parametrize("kid", ["k3", "", None, "K1"])
def test_jwks_unknown_or_missing_kid_refused(
    server_factory: ServerFactory, jwks: Jwks, kid: str | None
) -> None:
    server = server_factory(jwks_config(jwks))
    headers = {} if kid is None else {"kid": kid}
    token = jwt.encode(claims(), jwks.k1, algorithm="RS256", headers=headers)
    expect_401(server, token, reasons={"invalid_token"})


@pytest.mark.parametrize("kid", ["k1", "attacker", None])
def test_jwks_token_bringing_its_own_jwk_refused(
    server_factory: ServerFactory, jwks: Jwks, kid: str | None
) -> None:
    server = server_factory(jwks_config(jwks))
    headers: dict[str, Any] = {"jwk": public_jwk(jwks.attacker, kid)}
    if kid is not None:
        headers["kid"] = kid
    token = jwt.encode(
        claims("root", scope="admin"), jwks.attacker, algorithm="RS256", headers=headers
    )
    expect_401(server, token)
    assert not server.audit.events("connection_admitted")


@pytest.mark.parametrize("name", ["jku", "x5u"])
def test_jwks_token_with_key_url_header_refused(
    server_factory: ServerFactory, jwks: Jwks, name: str
) -> None:
    server = server_factory(jwks_config(jwks))
    # even correctly signed by a configured key: a key URL is never honoured
    token = jwt.encode(
        claims(),
        jwks.k1,
        algorithm="RS256",
        headers={"kid": "k1", name: "https://evil.example/jwks.json"},
    )
    expect_401(server, token, reasons={"invalid_token"})


def test_jwks_hmac_token_refused(server_factory: ServerFactory, jwks: Jwks) -> None:
    server = server_factory(jwks_config(jwks))
    jwk_bytes = json.dumps(public_jwk(jwks.k1, "k1")).encode()
    token = craft({"alg": "HS256", "kid": "k1"}, claims("root"), hmac_signer(jwk_bytes))
    expect_401(server, token, reasons={"algorithm_not_allowed"})


# -- bad signatures and malformed tokens -------------------------------------------


def test_wrong_secret_is_refused(server: RunningServer) -> None:
    token = make_token(secret="another-secret-that-is-also-long-enough-0123456789")
    expect_401(server, token, reasons={"bad_signature"})


def test_tampered_payload_is_refused(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    head, _, sig = make_token("alice", scopes="chat").split(".")
    forged_payload = b64url(json.dumps(claims("root", scope="admin")).encode())
    expect_401(server, f"{head}.{forged_payload}.{sig}", reasons={"bad_signature"})
    good = make_token()
    truncated = good[:-4]
    expect_401(server, truncated)
    expect_401(server, good.rsplit(".", 1)[0] + ".", reasons={"bad_signature"})


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("abc", id="one-segment"),
        pytest.param("a.b", id="two-segments"),
        pytest.param("!!!.@@@.###", id="garbage-3"),
        pytest.param("eyJub3QiOiJqc29u.e30.c2ln", id="header-not-jwt"),
        pytest.param("W10.e30.", id="header-is-array"),
        pytest.param("a.b.c.d.e", id="five-segments"),
        pytest.param("..", id="empty-segments"),
        pytest.param("x" * 3000 + "." + "y" * 3000 + "." + "z" * 1900, id="very-long"),
    ],
)
def test_malformed_token_strings_refused(server: RunningServer, token: str) -> None:
    expect_401(server, token)
    assert server.connection_count() == 0


def test_token_longer_than_max_token_bytes_refused_even_if_valid(
    server_factory: ServerFactory,
) -> None:
    server = relaxed(server_factory, {"auth": {"max_token_bytes": 512}})
    long_token = make_token("big", padding="p" * 1500)
    assert len(long_token) > 1500
    expect_401(server, long_token, reasons={"malformed_token"})
    expect_401(
        server,
        long_token,
        transport="subprotocol",
        subprotocols=["wsguard.v1"],
        reasons={"malformed_token"},
    )
    assert welcome(server, make_token("small"))["subject"] == "small"


def test_oversized_authorization_header_refused_without_upgrade(server: RunningServer) -> None:
    token = make_token(padding="p" * 40_000)
    answer = raw_http(server.port, upgrade_request(token=token))
    assert 400 <= status_of(answer) < 500
    assert token.encode() not in answer
    assert token not in server.audit.getvalue()
    # the server still works
    assert welcome(server, make_token("after"))["subject"] == "after"


# -- transports: Authorization header and Sec-WebSocket-Protocol ------------------


def test_subprotocol_transport_selects_app_protocol(server: RunningServer) -> None:
    token = make_token("sp", scopes="chat")
    with server.connect(token, transport="subprotocol", subprotocols=["wsguard.v1"]) as ws:
        assert ws.subprotocol == "wsguard.v1"
        frame = json.loads(ws.recv(timeout=5))
    assert frame["type"] == "welcome"
    assert frame["subject"] == "sp"
    assert server.audit.events("connection_admitted")[-1]["subprotocol"] == "wsguard.v1"


def test_subprotocol_response_never_echoes_the_token(server: RunningServer) -> None:
    token = make_token("raw")
    request = upgrade_request(headers={"Sec-WebSocket-Protocol": f"wsguard.v1, token.{token}"})
    head = raw_response_head(server.port, request)
    assert status_of(head) == 101
    assert header_values(head, "Sec-WebSocket-Protocol") == ["wsguard.v1"]
    assert token.encode() not in head
    assert token.split(".")[2].encode() not in head


def test_subprotocol_token_first_in_list_still_selects_app_protocol(
    server: RunningServer,
) -> None:
    token = make_token("order")
    request = upgrade_request(headers={"Sec-WebSocket-Protocol": f"token.{token}, wsguard.v1"})
    head = raw_response_head(server.port, request)
    assert status_of(head) == 101
    assert header_values(head, "Sec-WebSocket-Protocol") == ["wsguard.v1"]


def test_subprotocol_token_alone_admitted_without_subprotocol(server: RunningServer) -> None:
    token = make_token("solo")
    with server.connect(token, transport="subprotocol") as ws:
        assert ws.subprotocol is None
        assert json.loads(ws.recv(timeout=5))["subject"] == "solo"
    head = raw_response_head(
        server.port, upgrade_request(headers={"Sec-WebSocket-Protocol": f"token.{token}"})
    )
    assert status_of(head) == 101
    assert header_values(head, "Sec-WebSocket-Protocol") == []
    assert token.encode() not in head


def test_unknown_app_subprotocol_is_not_selected(server: RunningServer) -> None:
    token = make_token("other")
    with server.connect(token, transport="subprotocol", subprotocols=["chat.v9"]) as ws:
        assert ws.subprotocol is None
        assert json.loads(ws.recv(timeout=5))["subject"] == "other"


def test_bad_subprotocol_token_refused(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory)
    bad = make_token(secret="wrong-secret-wrong-secret-wrong-secret-0123")
    expect_401(
        server, bad, transport="subprotocol", subprotocols=["wsguard.v1"], reasons={"bad_signature"}
    )
    two = [f"token.{make_token('a')}", f"token.{make_token('b')}", "wsguard.v1"]
    expect_401(server, None, subprotocols=two, reasons={"malformed_credentials"})


def test_header_transport_can_be_disabled(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"header": False}})
    token = make_token("h")
    expect_401(server, token, transport="header", reasons={"missing_credentials"})
    with server.connect(token, transport="subprotocol", subprotocols=["wsguard.v1"]) as ws:
        assert json.loads(ws.recv(timeout=5))["subject"] == "h"


def test_subprotocol_transport_can_be_disabled(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"subprotocol": False}})
    token = make_token("s")
    expect_401(
        server,
        token,
        transport="subprotocol",
        subprotocols=["wsguard.v1"],
        reasons={"missing_credentials"},
    )
    assert welcome(server, token)["subject"] == "s"


def test_custom_subprotocol_prefix(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, {"auth": {"subprotocol_prefix": "bearer."}})
    token = make_token("px")
    expect_401(server, token, transport="subprotocol", subprotocols=["wsguard.v1"])
    with server.connect(
        "unused", transport="none", subprotocols=["wsguard.v1", f"bearer.{token}"]
    ) as ws:
        assert ws.subprotocol == "wsguard.v1"
        assert json.loads(ws.recv(timeout=5))["subject"] == "px"


# -- cookie transport ----------------------------------------------------------


def test_cookie_transport_off_by_default(server: RunningServer) -> None:
    token = make_token()
    expect_401(server, token, transport="cookie", reasons={"missing_credentials"})


def test_cookie_without_origin_allowlist_refused_by_validation() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"auth": {"secret": SECRET, "cookie": True}})
    assert info.value.key == "auth.cookie"
    # with an allowlist the same setting is valid
    config = validate_config(
        {"auth": {"secret": SECRET, "cookie": True}, "origin": {"allowed": [ALLOWED_ORIGIN]}}
    )
    assert config.auth.cookie


COOKIE_ON: dict[str, Any] = {"auth": {"cookie": True}, "origin": {"allowed": [ALLOWED_ORIGIN]}}


def test_cookie_with_allowed_origin_admitted(server_factory: ServerFactory) -> None:
    server = server_factory(COOKIE_ON)
    frame = welcome(
        server, make_token("cookie-user", scopes="chat"), transport="cookie", origin=ALLOWED_ORIGIN
    )
    assert frame["subject"] == "cookie-user"
    assert frame["scopes"] == ["chat"]


@pytest.mark.parametrize(
    "origin",
    [
        pytest.param(None, id="no-origin"),
        pytest.param("https://evil.example", id="foreign"),
        pytest.param("https://app.example.com.evil.example", id="suffix-lookalike"),
        pytest.param("http://app.example.com", id="other-scheme"),
        pytest.param("null", id="null"),
    ],
)
def test_cookie_without_allowed_origin_is_403(
    server_factory: ServerFactory, origin: str | None
) -> None:
    server = server_factory(COOKIE_ON)
    token = make_token()
    with pytest.raises(InvalidStatus) as info:
        server.connect(token, transport="cookie", origin=origin).close()
    response = info.value.response
    assert response.status_code == 403
    assert_short_body(response, token)
    assert refusal_reason(server) == "origin_forbidden"
    assert server.connection_count() == 0


def test_cookie_name_is_exact(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, COOKIE_ON)
    token = make_token()
    expect_401(
        server,
        None,
        origin=ALLOWED_ORIGIN,
        headers={"Cookie": f"other=1; xwsguard_token={token}"},
        reasons={"missing_credentials"},
    )
    frame = welcome(
        server,
        "unused",
        transport="none",
        origin=ALLOWED_ORIGIN,
        headers={"Cookie": f"theme=dark; wsguard_token={make_token('c2')}"},
    )
    assert frame["subject"] == "c2"


# -- query transport -------------------------------------------------------------


def test_query_transport_off_by_default(server: RunningServer) -> None:
    token = make_token()
    expect_401(server, token, transport="query", reasons={"missing_credentials"})
    refusal = server.audit.events("handshake_refused")[-1]
    assert refusal["path"] == "/?token=REDACTED"
    assert token not in server.audit.getvalue()


def test_query_transport_when_enabled_and_redacted(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, {"auth": {"query": True}})
    good = make_token("q-user", scopes="chat")
    assert welcome(server, good, transport="query")["subject"] == "q-user"
    assert welcome(server, good, transport="query", path="/room?x=1")["subject"] == "q-user"

    bad = make_token("q-user", secret="not-the-server-secret-but-long-enough-01234")
    expect_401(server, bad, transport="query", path="/room?x=1", reasons={"bad_signature"})
    refusal = server.audit.events("handshake_refused")[-1]
    assert refusal["path"] == "/room?x=1&token=REDACTED"

    audit = server.audit.getvalue()
    for secret in (good, bad, good.split(".")[2], bad.split(".")[2]):
        assert secret not in audit
    assert len(server.audit.events("connection_admitted")) == 2


@pytest.mark.parametrize("query", [True, False], ids=["query-on", "query-off"])
@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/?TOKEN={t}", "/?TOKEN=REDACTED"),
        ("/?a=1;token={t}", "/?a=1;token=REDACTED"),
        ("/?token+={t}", "/?token+=REDACTED"),
        ("/?x=%26token%3D{t}", "/?x=%26token%3DREDACTED"),
        ("/rooms/{t}", "/rooms/REDACTED"),
        ("/?access_token={h}%2E{p}%2E{s}", "/?access_token=REDACTED"),
        ("/rooms/%65{t1}", "/rooms/REDACTED"),
        ("/?a={h}==.{p}.{s}", "/?a=REDACTED"),  # padded: a verifier decodes it all the same
        ("/?auth=Bearer+{t}", "/?auth=Bearer+REDACTED"),  # glued to a prefix
        ("/ws/v1-{t}", "/ws/v1-REDACTED"),
    ],
    ids=[
        "upper-case-name", "semicolon", "plus-in-name", "encoded-in-a-value", "in-the-path",
        "dots-encoded", "first-letter-encoded", "padded", "after-bearer-plus", "after-dash",
    ],
)  # fmt: skip
def test_a_token_in_the_target_under_any_name_is_not_written_to_the_audit_log(
    server_factory: ServerFactory, query: bool, path: str, logged: str
) -> None:
    """A client that puts its token in the URL under the wrong name (or in the path,
    percent-encoded or padded) is refused, and the target it sent is logged without the
    token: a live credential in a log line is one leaked."""
    server = relaxed(server_factory, {"auth": {"query": query}})
    token = make_token("leaky", scopes="chat")
    h, p, s = token.split(".")
    sent = path.format(t=token, t1=token[1:], h=h, p=p, s=s)
    expect_401(server, None, path=sent, reasons={"missing_credentials"})
    refusal = server.audit.events("handshake_refused")[-1]
    assert refusal["path"] == logged
    audit = server.audit.getvalue()
    for secret in (token, p, s):
        assert secret not in audit


def test_ordinary_dotted_names_in_a_target_are_not_redacted() -> None:
    target = "/?next=https://www.example.co.uk/&f=export.csv.gz&h=example.com.au&v=1.2.3"
    request = HandshakeRequest(peer="127.0.0.1", target=target, headers=Headers([]))
    assert request.redacted_target(frozenset({"token"})) == target


def test_query_token_percent_encoded_name_still_redacted(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, {"auth": {"query": True}})
    bad = make_token(secret="not-the-server-secret-but-long-enough-01234")
    expect_401(server, None, path=f"/?%74oken={bad}", reasons={"bad_signature"})
    assert bad not in server.audit.getvalue()
    assert bad.split(".")[2] not in server.audit.getvalue()


# -- secrets never in the audit log ----------------------------------------------


def test_tokens_and_cookies_never_in_audit_log(server_factory: ServerFactory) -> None:
    server = relaxed(server_factory, deep_merge(COOKIE_ON, {"auth": {"query": True}}))
    wrong = "wrong-secret-wrong-secret-wrong-secret-0123456"
    tokens = {
        "header": make_token("h1"),
        "subprotocol": make_token("s1"),
        "cookie": make_token("c1"),
        "query": make_token("q1"),
    }
    bad_tokens = {name: make_token("x", secret=wrong) for name in tokens}
    session_cookie = "session=SESSIONSECRET0123456789"
    for transport, token in tokens.items():
        frame = welcome(
            server,
            token,
            transport=transport,
            origin=ALLOWED_ORIGIN,
            subprotocols=["wsguard.v1"],
            headers={"Cookie": session_cookie} if transport != "cookie" else None,
        )
        assert frame["type"] == "welcome"
    for transport, token in bad_tokens.items():
        expect_401(
            server, token, transport=transport, origin=ALLOWED_ORIGIN, subprotocols=["wsguard.v1"]
        )
    # a refusal for another reason (foreign origin) with a cookie
    with pytest.raises(InvalidStatus) as info:
        server.connect(tokens["cookie"], transport="cookie", origin="https://evil.example")
    assert info.value.response.status_code == 403

    deadline = time.monotonic() + 5
    while len(server.audit.events("connection_closed")) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # bounded poll: closed records are written after the close
    assert len(server.audit.events("connection_closed")) == 4
    audit = server.audit.getvalue()
    assert len(server.audit.events("connection_admitted")) == 4
    assert len(server.audit.events("handshake_refused")) == 5
    for token in [*tokens.values(), *bad_tokens.values()]:
        assert token not in audit
        assert token.split(".")[1] not in audit
        assert token.split(".")[2] not in audit
    assert "SESSIONSECRET" not in audit
    assert "wsguard_token" not in audit
    assert SECRET not in audit


# -- identity ------------------------------------------------------------------------


def test_scopes_merged_from_scope_scp_and_roles(server: RunningServer) -> None:
    token = make_token("merged", scopes="chat read", scp=["write", "chat"], roles=["admin", "ops"])
    frame = welcome(server, token)
    assert frame["subject"] == "merged"
    assert frame["scopes"] == ["admin", "chat", "ops", "read", "write"]


def test_scp_as_string_and_non_strings_ignored(server: RunningServer) -> None:
    token = make_token("mixed", scopes=None, scp="a b", roles=["c", 7, None, ""])
    assert welcome(server, token)["scopes"] == ["a", "b", "c"]


@pytest.mark.parametrize("separator", ["\u00a0", "\u2003", "\t", "\n"])
def test_a_scope_string_is_split_on_spaces_only(server: RunningServer, separator: str) -> None:
    """RFC 6749 3.3: scopes are delimited by a space. One scope holding another whitespace
    ("read\u00a0admin") is one scope that grants nothing, not ``admin``."""
    token = make_token("ws", scopes=f"read{separator}admin  chat")
    assert welcome(server, token)["scopes"] == ["chat", f"read{separator}admin"]


def test_configured_scope_and_subject_claims(server_factory: ServerFactory) -> None:
    server = server_factory({"auth": {"scope_claims": ["permissions"], "subject_claim": "email"}})
    token = make_token(
        "ignored-sub", scopes="chat", email="eve@example.com", permissions=["read", "write"]
    )
    frame = welcome(server, token)
    assert frame["subject"] == "eve@example.com"
    assert frame["scopes"] == ["read", "write"]


# -- TokenVerifier directly --------------------------------------------------------


@pytest.fixture
def verifier() -> TokenVerifier:
    auth = make_config().auth
    return TokenVerifier(auth, load_keys(auth))


def test_verifier_returns_identity(verifier: TokenVerifier) -> None:
    identity = verifier.verify(make_token("unit", scopes="chat", jti="j-1", roles=["admin"]))
    assert identity.subject == "unit"
    assert identity.scopes == frozenset({"chat", "admin"})
    assert identity.token_id == "j-1"
    assert identity.expires_at is not None and identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("token_factory", "reason"),
    [
        pytest.param(
            lambda: craft({"alg": "none"}, claims()), "algorithm_not_allowed", id="alg-none"
        ),
        pytest.param(
            lambda: craft(
                {"alg": "HS256", "crit": ["exp"]}, claims(), hmac_signer(SECRET.encode())
            ),
            "invalid_token",
            id="crit",
        ),
        pytest.param(
            lambda: craft(
                {"alg": "HS256", "jku": "https://x.example/"},
                claims(),
                hmac_signer(SECRET.encode()),
            ),
            "invalid_token",
            id="jku",
        ),
        pytest.param(lambda: make_token(ttl=-1), "token_expired", id="expired"),
        pytest.param(lambda: make_token(exp=None), "missing_claim", id="no-exp"),
        pytest.param(lambda: "abc", "malformed_token", id="abc"),
        pytest.param(lambda: "%%%.e30.", "malformed_token", id="bad-base64"),
    ],
)
def test_verifier_refusals(
    verifier: TokenVerifier, token_factory: Callable[[], str], reason: str
) -> None:
    with pytest.raises(AuthFailure) as info:
        verifier.verify(token_factory())
    assert info.value.reason == reason


def test_verifier_leeway_boundary() -> None:
    auth = make_config({"auth": {"leeway_seconds": 30}}).auth
    verifier = TokenVerifier(auth, load_keys(auth))
    assert verifier.verify(make_token("edge", ttl=-10)).subject == "edge"
    with pytest.raises(AuthFailure) as info:
        verifier.verify(make_token(ttl=-100))
    assert info.value.reason == "token_expired"


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


def test_the_token_cache_keeps_no_bearer_token() -> None:
    """Verified tokens are remembered (a reconnect skips the signature check) by digest:
    nothing reachable from the verifier holds the token or its signature."""
    auth = make_config({}).auth
    verifier = TokenVerifier(auth, KeyMaterial(secret=SECRET.encode()))
    token = make_token("alice", ttl=600)
    signature = token.rsplit(".", 1)[1]
    assert verifier.verify(token).subject == "alice"
    assert verifier.verify(token).subject == "alice"  # from the cache
    seen: set[int] = set()
    todo: list[object] = [verifier]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes):
            text = obj if isinstance(obj, str) else obj.decode("latin-1")
            assert signature not in text, "the verifier keeps the bearer token"
            continue
        todo.extend(gc.get_referents(obj))
        if isinstance(obj, dict):
            todo.extend(obj)  # str keys are not among a dict's referents
    assert len(seen) > 20  # the walk did reach the cache's entries


def test_direct_client_without_helper_gets_401(server: RunningServer) -> None:
    """Sanity check of the helpers: a plain client with no credentials is refused."""
    with pytest.raises(InvalidStatus) as info:
        connect(server.url, open_timeout=5).close()
    assert_401(info.value.response, invalid_token=False)


# -- key files hold the same bar as an identity provider's keys --------------------------


def test_an_rsa_key_under_2048_bits_is_refused_from_either_file(tmp_path: Path) -> None:
    """RFC 7518 §3.3: RSA keys of at least 2048 bits, from a file as from an identity
    provider (a 1024-bit key's tokens were admitted)."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = tmp_path / "weak.pem"
    pem.write_bytes(
        weak.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwks = tmp_path / "weak.json"
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(weak, as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "weak"}]}))
    for key, path in (("public_key_file", pem), ("jwks_file", jwks)):
        config = validate_config({"auth": {"algorithms": ["RS256"], key: str(path)}})
        with pytest.raises(KeyLoadError) as info:
            load_keys(config.auth)
        assert info.value.key == f"auth.{key}"
        assert "1024 bits" in info.value.message


@pytest.mark.parametrize(
    ("make", "algorithm"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "RS256"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "ES256"),
    ],
    ids=["p384-for-es256", "secp256k1", "ec-for-rs256", "rsa-for-es256"],
)
def test_a_public_key_that_fits_no_pinned_algorithm_is_refused_at_start(
    tmp_path: Path, make: Any, algorithm: str
) -> None:
    """Every token would be refused 401: said at start (and by check-config) instead."""
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        make()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = validate_config({"auth": {"algorithms": [algorithm], "public_key_file": str(pem)}})
    with pytest.raises(KeyLoadError) as info:
        load_keys(config.auth)
    assert info.value.key == "auth.public_key_file"
    assert "fits none of auth.algorithms" in info.value.message


def test_a_jwks_file_follows_the_providers_rules_for_each_key(tmp_path: Path) -> None:
    """A JWKS file's keys are taken as a provider's are: RSA and EC keys side by side
    (each built for an algorithm of its own type, no alg member needed), and a key whose
    key_ops or use says it does not verify, or whose curve does not fit its declared alg,
    is left out."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    p384_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(p384.public_key()))
    keys = [
        public_jwk(rsa_key, "r1"),
        {**ec_jwk, "kid": "e1"},
        {**public_jwk(rsa_key, "encrypting"), "key_ops": ["encrypt"]},
        {**public_jwk(rsa_key, "enc"), "use": "enc"},
        {**p384_jwk, "kid": "wrong-curve", "alg": "ES256"},
        {**public_jwk(rsa_key, "r1"), "use": "enc"},  # shares r1's kid, verifies nothing
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    for order in (["RS256", "ES256"], ["ES256", "RS256"]):
        config = validate_config({"auth": {"algorithms": order, "jwks_file": str(path)}})
        loaded = load_keys(config.auth)
        assert sorted(loaded.jwks) == ["e1", "r1"], order


def test_a_kid_naming_two_keys_in_a_jwks_file_is_refused(tmp_path: Path) -> None:
    """Which of two keys under one kid verifies would be a guess (the last one, silently):
    the file is refused, naming the kid."""
    first, second = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)
    )
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps({"keys": [public_jwk(first, "shared"), public_jwk(second, "shared")]})
    )
    config = validate_config({"auth": {"algorithms": ["RS256"], "jwks_file": str(path)}})
    with pytest.raises(KeyLoadError) as info:
        load_keys(config.auth)
    assert info.value.key == "auth.jwks_file"
    assert "'shared'" in info.value.message
