"""Handshake authentication: find the token, verify it with PyJWT, build an Identity.

Algorithms are pinned by configuration. The token's header may only *select*
among them; it can never introduce one (``none`` in any spelling, an HMAC
algorithm when the configured key is public) nor bring its own key (``jwk``,
``jku``, ``x5u``, ``x5c`` are refused; JWKS keys are chosen by ``kid`` from the
configured set only).

Keys come from the configuration (``KeyMaterial``, loaded at start-up) or from a
:class:`KeySource`: an identity provider's JWKS that ``wsguard.keys.remote_jwks`` fetches
and caches. The core asks the source for the key of (source, kid) from its cache and never
performs I/O itself; a miss may start a fetch, which an async caller can wait for
(:meth:`TokenVerifier.verify_fetching`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol

import jwt
import orjson

from wsguard.config.model import HMAC_ALGORITHMS, AuthConfig
from wsguard.core.headers import split_list
from wsguard.core.identity import NO_CLAIMS, Identity
from wsguard.core.request import HandshakeRequest

#: The largest time claim taken (about the year 285,000,000: any real one is far below;
#: every integer up to it is a float exactly)
_MAX_TIME = 2**53
_NUMERIC_CLAIMS = ("exp", "nbf", "iat")
_CACHE_ENTRIES = 4096
_CACHEABLE_TOKEN = 2048
_EMBEDDED_KEY_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256"})


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """Verification keys, loaded once at start-up (see ``wsguard.config.keys``)."""

    secret: bytes | None = None
    public_key: Any = None
    jwks: Mapping[str, tuple[Any, str | None]] = field(default_factory=dict)
    """kid -> (key object, the JWK's declared ``alg`` or None)."""


class AuthFailure(Exception):
    """Internal: why a credential was refused. Converted into a Reject."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class KeyNotReady(AuthFailure):
    """The key source cannot answer from its cache: a fetch under way may change that."""


class UnknownKey(KeyNotReady):
    """The token's ``kid`` is not among the identity provider's current keys (401)."""

    def __init__(self, detail: str = "unknown kid") -> None:
        super().__init__("invalid_token", detail)


class KeysUnavailable(KeyNotReady):
    """No usable keys: never fetched, or kept past their stale bound (503, not a ban)."""

    def __init__(self, detail: str) -> None:
        super().__init__("keys_unavailable", detail)


class KeySource(Protocol):
    """Verification keys held outside the configuration (an identity provider's JWKS).

    Implementations cache keys by (source, kid): a key fetched from one source is never
    returned for another, whatever its ``kid``.
    """

    @property
    def generation(self) -> int:
        """Changes whenever the set of keys changes (cached verifications are redone)."""
        ...

    def lookup(self, source: str, kid: str) -> tuple[Any, frozenset[str]]:
        """The key of (*source*, *kid*) and the algorithms it may verify, from the cache.

        Raises :class:`UnknownKey` or :class:`KeysUnavailable` (and may start a fetch).
        """
        ...

    def usable(self) -> bool:
        """Whether the cached keys may be used now (fetched, not past their stale bound)."""
        ...

    async def wait_for_fetch(self) -> bool:
        """Wait (bounded) for the fetch under way, if any; True when it brought keys."""
        ...


def _cache_key(token: str) -> bytes:
    """The verified-token cache's key for *token*: its SHA-256 (a second token with the
    same key would be a SHA-256 second preimage)."""
    try:
        raw = token.encode()
    except UnicodeEncodeError:  # a lone surrogate (never a valid token): still a key
        raw = token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class Credentials:
    token: str
    transport: str  # header | subprotocol | cookie | query


def extract_credentials(request: HandshakeRequest, config: AuthConfig) -> Credentials | None:
    """Find the bearer token in the enabled transports, in a fixed order.

    Raises AuthFailure("malformed_credentials") for ambiguous input such as
    two Authorization headers or two tokens in the subprotocol list.
    """
    headers = request.headers
    if config.header and "authorization" in headers:
        values = headers.get_all("authorization")
        if len(values) != 1:
            raise AuthFailure("malformed_credentials", "several Authorization headers")
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return Credentials(token.strip(), "header")
        raise AuthFailure("malformed_credentials", "Authorization is not a Bearer token")
    if config.subprotocol:
        prefix = config.subprotocol_prefix
        tokens = [
            p[len(prefix) :]
            for p in split_list(headers.get_all("sec-websocket-protocol"))
            if p.startswith(prefix)
        ]
        if len(tokens) > 1:
            raise AuthFailure("malformed_credentials", "several tokens in Sec-WebSocket-Protocol")
        if tokens:
            return Credentials(tokens[0], "subprotocol")
    if config.cookie:
        for raw in headers.get_all("cookie"):
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw)
            except CookieError:
                continue
            morsel = jar.get(config.cookie_name)
            if morsel is not None and morsel.value:
                return Credentials(morsel.value, "cookie")
    if config.query:
        values = request.query_values(config.query_param)
        if len(values) > 1:
            raise AuthFailure("malformed_credentials", "several token query parameters")
        if values and values[0]:
            return Credentials(values[0], "query")
    return None


def _unverified_header(token: str) -> dict[str, Any]:
    head = token.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
        header = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise AuthFailure("malformed_token", "header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise AuthFailure("malformed_token", "header is not an object")
    return header


def _scopes(claims: Mapping[str, Any], names: tuple[str, ...]) -> frozenset[str]:
    found: set[str] = set()
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):  # space-delimited (RFC 6749 3.3): no other separator
            found.update(v for v in value.split(" ") if v)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str) and v)
    return frozenset(found)


def auth_warnings(config: AuthConfig) -> list[tuple[str, str]]:
    """Valid but risky authentication settings, as (config key, message).

    A public key or a JWKS is usually an identity provider's, shared by every service it
    issues tokens for: without ``audience`` and ``issuer`` this service accepts any token
    of that provider (tokens carrying ``aud`` are refused when no audience is set).
    """
    out: list[tuple[str, str]] = []
    if not config.require_exp:
        out.append(
            (
                "auth.require_exp",
                "tokens without exp are accepted: they never expire, and a revocation of one "
                "lasts only cluster.revocation_ttl_seconds",
            )
        )
    if config.uses_hmac:
        return out
    source = "auth.jwks_file" if config.jwks_file else "auth.public_key_file"
    if config.remote_jwks:
        source = "auth.jwks_url" if config.jwks_url else "auth.oidc_issuer"
    if not config.audience:
        out.append(
            (
                "auth.audience",
                f"tokens are verified with {source} and no audience is set: tokens without "
                "aud issued for other services are accepted (tokens with aud are refused)",
            )
        )
    if not config.issuer:
        out.append(
            (
                "auth.issuer",
                f"tokens are verified with {source} and no issuer is set: iss is not checked",
            )
        )
    return out


class TokenVerifier:
    """Verifies JWTs against the pinned algorithms and the configured keys."""

    __slots__ = (
        "_audience_detail",
        "_cache",
        "_clock",
        "_config",
        "_keys",
        "_options",
        "_required",
        "_scope_sets",
        "_source",
        "_source_name",
    )

    def __init__(
        self,
        config: AuthConfig,
        keys: KeyMaterial,
        *,
        clock: Callable[[], float] = time.time,
        key_source: KeySource | None = None,
    ) -> None:
        self._config = config
        self._keys = keys
        self._clock = clock
        self._source = key_source
        # the source this verifier's tokens are checked against: the key source is asked
        # for (this source, kid), never for a kid alone
        self._source_name = config.remote_jwks
        # SHA-256 of the token -> (identity, not-before, key generation): a verified token is
        # deterministic for a fixed key set, so reconnecting clients skip the signature
        # check; exp and nbf are still checked against the clock on every hit, and a
        # token verified with an identity provider's key is verified again once that
        # provider's key set changed or its keys may no longer be used. Keyed by digest:
        # the cache keeps no bearer token (nothing to find in a heap dump) and 32 bytes,
        # not the token's few hundred, for each of its entries.
        self._cache: dict[bytes, tuple[Identity, float | None, int]] = {}
        # equal scope sets are shared between connections (a few distinct sets is typical)
        self._scope_sets: dict[frozenset[str], frozenset[str]] = {}
        self._required = ["exp"] if config.require_exp else []
        self._audience_detail = (
            "aud does not match" if config.audience else "aud present, auth.audience not set"
        )
        self._options: dict[str, Any] = {
            "require": self._required,
            # always on: with no audience configured, PyJWT refuses a token that has one
            "verify_aud": True,
            "verify_iss": bool(config.issuer),
        }

    def _key_for(self, header: Mapping[str, Any], alg: str) -> Any:
        if self._source is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthFailure("invalid_token", "no kid")
            key, algorithms = self._source.lookup(self._source_name, kid)
            if alg not in algorithms:
                raise AuthFailure("algorithm_not_allowed", "alg does not fit the JWK")
            return key
        if alg in HMAC_ALGORITHMS:
            if self._keys.secret is None:
                raise AuthFailure("invalid_token", "no HMAC secret configured")
            return self._keys.secret
        if self._keys.jwks:
            kid = header.get("kid")
            if not isinstance(kid, str) or kid not in self._keys.jwks:
                raise AuthFailure("invalid_token", "unknown kid")
            key, declared_alg = self._keys.jwks[kid]
            if declared_alg is not None and declared_alg != alg:
                raise AuthFailure("algorithm_not_allowed", "alg does not match the JWK")
            return key
        if self._keys.public_key is None:
            raise AuthFailure("invalid_token", "no public key configured")
        return self._keys.public_key

    def verify(self, token: str) -> Identity:
        """Verify *token*; raises AuthFailure with a stable reason.

        With a key source, a key not in its cache raises :class:`KeyNotReady` (and may
        start a fetch); :meth:`verify_fetching` waits for that fetch and tries again.
        """
        key = _cache_key(token)
        cached = self._cache.get(key)
        source = self._source
        if (
            cached is not None
            and source is not None
            and (cached[2] != source.generation or not source.usable())
        ):
            del self._cache[key]  # keys changed or expired: verify from scratch
            cached = None
        if cached is not None:
            identity, not_before, _ = cached
            now = self._clock()
            leeway = self._config.leeway_seconds
            if identity.expires_at is not None and now >= identity.expires_at + leeway:
                del self._cache[key]
                raise AuthFailure("token_expired", "exp is in the past")
            if not_before is not None and now < not_before - leeway:
                raise AuthFailure("token_not_yet_valid", "nbf in the future")
            return identity
        generation = source.generation if source is not None else 0
        identity, not_before = self._verify(token)
        if len(token) <= _CACHEABLE_TOKEN:
            if len(self._cache) >= _CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]  # oldest first
            self._cache[key] = (identity, not_before, generation)
        return identity

    async def verify_fetching(self, token: str) -> Identity:
        """:meth:`verify`, waiting once for the key source's fetch when the key was not
        in its cache (a rotated key, or keys not fetched yet). Concurrent callers share
        the one fetch; the key source bounds its rate and its duration."""
        try:
            return self.verify(token)
        except KeyNotReady:
            if self._source is None or not await self._source.wait_for_fetch():
                raise
        return self.verify(token)

    def _verify(self, token: str) -> tuple[Identity, float | None]:
        config = self._config
        if len(token) > config.max_token_bytes:
            raise AuthFailure("malformed_token", "token too long")
        if token.count(".") != 2:
            raise AuthFailure("malformed_token", "not a compact JWS")
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise AuthFailure("algorithm_not_allowed", "alg is not in the configured list")
        if _EMBEDDED_KEY_HEADERS & header.keys():
            raise AuthFailure("invalid_token", "token carries its own key")
        if "crit" in header:
            raise AuthFailure("invalid_token", "unsupported critical header")
        key = self._key_for(header, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=list(config.audience) or None,
                issuer=config.issuer or None,
                leeway=config.leeway_seconds,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure("token_expired", "exp is in the past") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailure("token_not_yet_valid", "nbf/iat in the future") from None
        except jwt.InvalidAudienceError:
            raise AuthFailure("invalid_audience", self._audience_detail) from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("invalid_issuer", "iss does not match") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailure("missing_claim", f"claim {exc.claim} is required") from None
        except jwt.InvalidSignatureError:
            raise AuthFailure("bad_signature", "signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthFailure("algorithm_not_allowed", "algorithm refused by PyJWT") from None
        except jwt.InvalidKeyError:
            raise AuthFailure("invalid_token", "key does not fit the algorithm") from None
        except jwt.PyJWTError as exc:
            raise AuthFailure("invalid_token", type(exc).__name__) from None
        except (TypeError, ValueError):
            # PyJWT raises these when the configured key is of another family than the
            # token's algorithm (an RS256 token, an EC key): a refused token, never a crash
            raise AuthFailure("invalid_token", "key does not fit the algorithm") from None
        if "aud" in claims and not config.audience:
            # a token meant for another service is never accepted here by default
            raise AuthFailure("invalid_audience", self._audience_detail)
        for name in _NUMERIC_CLAIMS:
            value = claims.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_TIME:
                # a signed integer no float holds (PyJWT takes any size): refused, never
                # an OverflowError in the arithmetic below
                raise AuthFailure("invalid_token", f"claim {name} out of range")
        exp = claims.get("exp")
        if (
            isinstance(exp, (int, float))
            and exp - self._clock() > config.max_token_lifetime_seconds
        ):
            # longer than any revocation lasts (cluster.revocation_ttl_seconds is at least this)
            raise AuthFailure("invalid_token", "exp beyond auth.max_token_lifetime_seconds")
        nbf = claims.get("nbf")
        return self._identity(claims), float(nbf) if isinstance(nbf, (int, float)) else None

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        for name in _NUMERIC_CLAIMS:
            value = claims.get(name)
            if name in claims and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise AuthFailure("invalid_token", f"claim {name} must be a number")
        subject = claims.get(self._config.subject_claim)
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            raise AuthFailure("missing_claim", f"claim {self._config.subject_claim} is required")
        if not subject.isprintable():
            raise AuthFailure("invalid_token", "subject has control characters")
        exp = claims.get("exp")
        jti = claims.get("jti")
        scopes = _scopes(claims, self._config.scope_claims)
        scopes = (
            self._scope_sets.setdefault(scopes, scopes) if len(self._scope_sets) < 4096 else scopes
        )
        return Identity(
            subject=subject,
            scopes=scopes,
            token_id=jti if isinstance(jti, str) else None,
            expires_at=float(exp) if isinstance(exp, (int, float)) else None,
            method="jwt",
            claims=claims if self._config.keep_claims else NO_CLAIMS,
        )
