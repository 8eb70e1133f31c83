"""The typed configuration of wsguard.

One model serves every deployment mode (standalone server, ASGI middleware,
gateway). Every field has a secure default and a ``description``; the
configuration reference of the documentation is generated from this file, and
``examples/wsguard.toml`` lists every key.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import ssl
import types
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from wsguard.config.demo_types import DEMO_MESSAGE_TYPES

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS


#: The longest duration any ``*_seconds`` key takes: 30 days.
MAX_DURATION = 30 * 86400.0

#: The largest count of connections or handshakes any key takes (a typo such as an extra
#: row of zeros is refused instead of read as "unlimited").
MAX_CONNECTIONS = 10_000_000
#: The largest count of messages or events any key takes.
MAX_EVENTS = 1_000_000_000
#: The largest byte rate any key takes: 1 TiB a minute (exact as a JSON number everywhere).
MAX_BYTES_PER_MINUTE = 1 << 40


class EnvText(str):
    """A value as an environment variable gives it: text, converted to the key's type
    (``"8765"`` to a port, ``"true"`` to a boolean), which a file value never is."""


_WORDS: dict[Any, str] = {
    str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"
}  # fmt: skip


def type_words(annotation: Any) -> str:
    """The type of a key as the configuration reference names it (``list of strings``)."""
    if annotation in _WORDS:
        return _WORDS[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_words(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"list of {type_words(args[0])}s"
    return "table"


def _scalars(annotation: Any) -> tuple[Any, ...]:
    """The numbers and booleans a key of *annotation* takes (none: no such key)."""
    union = get_origin(annotation) in (Union, types.UnionType)
    return tuple(a for a in (get_args(annotation) if union else (annotation,)) if a in _WORDS)


def _fits(value: object, scalars: tuple[Any, ...]) -> bool:
    """*value*, as a file gives it, is one of *scalars* (an integer is a number too)."""
    if isinstance(value, bool):
        return bool in scalars
    if isinstance(value, int):
        return int in scalars or float in scalars
    if isinstance(value, float):
        return float in scalars
    return isinstance(value, str | Path) and (str in scalars or Path in scalars)


def _non_finite(value: object) -> float | None:
    """The first infinite or NaN float in *value* (nested tables and lists included)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            found = _non_finite(item)
            if found is not None:
                return found
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _typed(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """Values have types: no boolean for a number, no float for an integer, no text
        for a number or a boolean (but an environment variable's text is converted), and
        no infinite or NaN number anywhere."""
        if isinstance(value, EnvText):
            value = str(value)
        elif value is not None and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            scalars = _scalars(annotation)
            if scalars and not _fits(value, scalars):
                raise ValueError(f"not a valid {type_words(annotation)}")
        result = handler(value)
        found = _non_finite(result)
        if found is not None:
            nested = "" if isinstance(result, float) else f" (it holds {found})"
            raise ValueError(f"must be a finite number{nested}")
        return result


class AuthConfig(_Section):
    """How connections authenticate at the handshake (JWT)."""

    @field_validator("public_key_file", "jwks_file", "jwks_ca_file")
    @classmethod
    def _trusted(cls, value: Path | None) -> Path | None:
        return trusted_file(value)

    @field_validator("subprotocol_prefix", "cookie_name")
    @classmethod
    def _http_token(cls, value: str) -> str:
        from wsguard.core.headers import is_token

        if not is_token(value):  # else every credential carried there is malformed
            raise ValueError("must be an HTTP token (letters, digits and !#$%&'*+-.^_`|~)")
        return value

    algorithms: tuple[str, ...] = Field(
        default=("HS256",),
        description=(
            "Pinned JWT algorithms; a token's header can only pick among them (`none` never). HS* "
            "and public-key algorithms (RS*, PS*, ES*, EdDSA) cannot be mixed."
        ),
    )
    secret: str = Field(
        default="",
        repr=False,
        description=(
            "The HS* secret (at least 32 bytes); prefer `WSGUARD_JWT_SECRET` or `secret_file`. "
            "With no key configured: the development key, on a loopback address only."
        ),
    )
    secret_file: Path | None = Field(
        default=None, description="File holding the HS* secret (mode 0600)."
    )
    public_key_file: Path | None = Field(
        default=None, description="PEM public key for RS*, PS*, ES* or EdDSA."
    )
    jwks_file: Path | None = Field(
        default=None, description="JWKS document; the key is chosen by the token's `kid`."
    )
    jwks_url: str = Field(
        default="",
        description=(
            "An identity provider's JWKS (`https://`; `http://` only on loopback); needs "
            "`audience` and `issuer`. Empty: no identity provider."
        ),
    )
    oidc_issuer: str = Field(
        default="",
        description=(
            "Or an OpenID Connect issuer: its discovery document gives the JWKS (its `issuer` must"
            " match exactly); needs `audience` and `issuer`."
        ),
    )
    jwks_ca_file: Path | None = Field(
        default=None,
        description="CA bundle to verify the identity provider's TLS with; unset: the system CAs.",
    )
    jwks_cache_seconds: float = Field(
        default=300.0,
        ge=1,
        le=86400,
        description=(
            "Identity-provider keys are refreshed after this long (a shorter `Cache-Control: "
            "max-age` wins, but never below `jwks_min_refetch_seconds`)."
        ),
    )
    jwks_min_refetch_seconds: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description=(
            "At most one refetch per this many seconds for tokens with an unknown `kid`; also how "
            "often a provider that does not answer is tried again."
        ),
    )
    jwks_max_stale_seconds: float = Field(
        default=86400.0,
        ge=1,
        le=MAX_DURATION,
        description=(
            "Provider down: the last keys are used this long after their fetch, then handshakes "
            "get 503 `keys_unavailable`."
        ),
    )
    dev_key_file: Path = Field(
        default=Path("~/.local/share/wsguard/dev-jwt.key"),
        description=(
            "The development HS256 key, created (mode 0600) when no key is configured and the "
            "server binds a loopback address."
        ),
    )
    audience: tuple[str, ...] = Field(
        default=(),
        description=(
            "Accepted `aud` values; empty: a token that carries `aud` is refused (it was issued "
            "for another service)."
        ),
    )
    issuer: str = Field(default="", description="Required `iss`; empty: `iss` is not checked.")
    require_exp: bool = Field(default=True, description="Refuse tokens without `exp`.")
    max_token_lifetime_seconds: float = Field(
        default=86400.0,
        gt=0,
        le=366 * 86400,
        description=(
            "A token whose `exp` is further ahead than this is refused, so no token outlives a "
            "revocation."
        ),
    )
    leeway_seconds: float = Field(
        default=0.0, ge=0, le=300, description="Clock skew allowed on `exp`, `nbf` and `iat`."
    )
    subject_claim: str = Field(
        default="sub",
        min_length=1,
        description="The claim naming the subject (required; a printable string).",
    )
    scope_claims: tuple[str, ...] = Field(
        default=("scope", "scp", "roles"),
        description=(
            "Claims merged into the scopes (each a string of scopes separated by spaces, "
            "U+0020 only, or a list)."
        ),
    )
    max_token_bytes: int = Field(
        default=8192, ge=256, le=65536, description="Longer tokens are refused without parsing."
    )
    keep_claims: bool = Field(
        default=False,
        description="Keep every claim on `conn.identity.claims` (about 0.5 KB per connection).",
    )
    header: bool = Field(default=True, description="Accept `Authorization: Bearer <jwt>`.")
    subprotocol: bool = Field(
        default=True,
        description=(
            "Accept the token as a `Sec-WebSocket-Protocol` entry `token.<jwt>` (never echoed "
            "back)."
        ),
    )
    subprotocol_prefix: str = Field(
        default="token.",
        min_length=1,
        description="Prefix of the token entry in `Sec-WebSocket-Protocol`.",
    )
    cookie: bool = Field(
        default=False,
        description=(
            "Accept the token in a cookie; requires `origin.allowed` (cross-site WebSocket "
            "hijacking)."
        ),
    )
    cookie_name: str = Field(
        default="wsguard_token", min_length=1, description="Name of that cookie."
    )
    query: bool = Field(
        default=False,
        description=(
            "Accept `?token=<jwt>`; the value is written as `token=REDACTED` in every log line."
        ),
    )
    query_param: str = Field(
        default="token", min_length=1, description="Name of that query parameter."
    )

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        for alg in value:
            if alg not in SUPPORTED_ALGORITHMS:
                allowed = ", ".join(sorted(SUPPORTED_ALGORITHMS))
                raise ValueError(f"unsupported algorithm {alg!r}; allowed: {allowed}")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str) -> str:
        if value:
            check_key_url(value)
        return value

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        if value:
            check_key_url(value)
            if "?" in value or "#" in value:
                raise ValueError("an OpenID issuer has no query or fragment")
        return value

    @model_validator(mode="after")
    def _keys_match_algorithms(self) -> AuthConfig:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        asym = [a for a in self.algorithms if a in ASYMMETRIC_ALGORITHMS]
        if hmac and asym:
            raise ValueError(
                "algorithms: HMAC (HS*) and public-key algorithms cannot be mixed; "
                "an HMAC token must never be verified with a public key"
            )
        remote = self.remote_jwks
        if hmac and (self.public_key_file or self.jwks_file or remote):
            raise ValueError(
                "algorithms: HS* algorithms take a secret, not public_key_file, jwks_file, "
                "jwks_url or oidc_issuer (an identity provider's keys are public keys)"
            )
        if asym and (self.secret or self.secret_file):
            raise ValueError(
                "algorithms: public-key algorithms take public_key_file, jwks_file, "
                "jwks_url or oidc_issuer"
            )
        sources = [
            name
            for name, value in (
                ("public_key_file", self.public_key_file),
                ("jwks_file", self.jwks_file),
                ("jwks_url", self.jwks_url),
                ("oidc_issuer", self.oidc_issuer),
            )
            if value
        ]
        if asym and not sources:
            raise ValueError(
                "public_key_file, jwks_file, jwks_url or oidc_issuer is required for "
                + ", ".join(asym)
            )
        if len(sources) > 1:
            raise ValueError(f"{sources[1]}: set one key source, not {' and '.join(sources)}")
        if remote:
            # an identity provider signs tokens for every service it serves
            source = "jwks_url" if self.jwks_url else "oidc_issuer"
            if not self.audience:
                raise ValueError(
                    f"audience: required with auth.{source} (the provider's tokens for "
                    "other services must not be accepted here)"
                )
            if not self.issuer:
                raise ValueError(
                    f"issuer: required with auth.{source} (the iss of this provider's tokens)"
                )
            if self.jwks_min_refetch_seconds > self.jwks_cache_seconds:
                raise ValueError("jwks_min_refetch_seconds: must not exceed jwks_cache_seconds")
            if self.jwks_max_stale_seconds < self.jwks_cache_seconds:
                raise ValueError("jwks_max_stale_seconds: must be at least jwks_cache_seconds")
        elif self.jwks_ca_file is not None:
            raise ValueError("jwks_ca_file: only used with jwks_url or oidc_issuer")
        if self.secret and self.secret_file:
            raise ValueError("secret: set either secret or secret_file, not both")
        if self.secret and len(self.secret.encode()) < 32:
            raise ValueError("secret: an HMAC secret must be at least 32 bytes")
        if not (self.header or self.subprotocol or self.cookie or self.query):
            raise ValueError("header: at least one token transport must be enabled")
        return self

    @property
    def uses_hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS

    @property
    def remote_jwks(self) -> str:
        """The identity provider keys come from (``jwks_url`` or ``oidc_issuer``), or ""."""
        return self.jwks_url or self.oidc_issuer


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def check_key_url(value: str) -> None:
    """An identity provider URL: ``https://`` with a host, no user name or password.

    ``http://`` only on loopback (127.0.0.1, ::1, localhost), for a provider run locally in
    development: keys fetched in clear text from anywhere else could be replaced on the way.
    """
    problem = "must be an https:// URL with a host (http:// only for 127.0.0.1, ::1, localhost)"
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(problem) from None
    host = parts.hostname or ""
    if not host or parts.username is not None or parts.password is not None:
        raise ValueError(problem)
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(problem)
    if parts.scheme == "https" or (parts.scheme == "http" and host in _LOOPBACK_NAMES):
        return
    raise ValueError(problem)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(value: str) -> str:
    """An address to bind: an IP address, or a host name (labels of letters, digits, ``-``
    and ``_``, at most 253 characters)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        name = value.removesuffix(".")
        labels = name.split(".")
        if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in labels):
            raise ValueError(
                "must be an IP address or a host name, e.g. 127.0.0.1, ::1, 0.0.0.0 or localhost"
            ) from None
    return value


def ca_bundle_context(path: Path) -> ssl.SSLContext:
    """A client TLS context trusting the PEM CA bundle at *path*; ValueError saying why
    it cannot be loaded."""
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ValueError(f"not a PEM CA bundle ({exc.reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read the CA bundle: {exc.strerror}") from None


def trusted_file(value: Path | None) -> Path | None:
    """A file that decides who is trusted (a verification key, a CA bundle, a schema): one
    that users other than its owner can change is refused (see :mod:`wsguard.config.file_modes`);
    whoever could change it could let in anyone. A file that cannot be read is reported by
    the check that reads it."""
    if value is not None:
        from wsguard.config.file_modes import others_can_change

        why = others_can_change(value.expanduser())
        if why is not None:
            raise ValueError(f"{value}: {why}; whoever can change it decides who is trusted")
    return value


class OriginConfig(_Section):
    """Cross-site WebSocket hijacking defence."""

    allowed: tuple[str, ...] = Field(
        default=(),
        description=(
            "Exact origins (`https://app.example.com`) or wildcard patterns "
            "(`https://*.example.com`: any sub-domain, not the apex, never over a public suffix); "
            "`null` only when listed. Empty: every browser Origin is refused."
        ),
    )
    allow_missing: bool = Field(
        default=True,
        description=(
            "Admit handshakes without `Origin` (non-browser clients); never with cookie "
            "authentication."
        ),
    )

    @field_validator("allowed")
    @classmethod
    def _parseable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from wsguard.core.origin import parse_allowed_origin

        for entry in value:
            if entry != "null":
                parse_allowed_origin(entry)  # raises ValueError with a clear message
        return value


class ProxyConfig(_Section):
    """Which peers may tell us the real client address."""

    trusted: tuple[str, ...] = Field(
        default=(),
        description=(
            "Networks (CIDR) of the proxies whose `X-Forwarded-For` / `Forwarded` is believed; "
            "anyone else's is ignored."
        ),
    )
    header: Literal["x-forwarded-for", "forwarded"] = Field(
        default="x-forwarded-for",
        description="Which header the trusted proxies set: `x-forwarded-for` or `forwarded`.",
    )

    @field_validator("trusted")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return value


class LimitsConfig(_Section):
    """Connection, handshake and message limits. Zero never means unlimited."""

    max_connections: int = Field(
        default=10_000,
        ge=1,
        le=MAX_CONNECTIONS,
        description="Cap on open connections on this node (503 beyond).",
    )
    connections_per_address: int = Field(
        default=5,
        ge=1,
        le=MAX_CONNECTIONS,
        description="Concurrent connections per client address (429 beyond).",
    )
    connections_per_subject: int = Field(
        default=10,
        ge=1,
        le=MAX_CONNECTIONS,
        description="Concurrent connections per authenticated subject (429 beyond).",
    )
    handshakes_per_minute: int = Field(
        default=60,
        ge=1,
        le=MAX_CONNECTIONS,
        description=(
            "Handshake attempts per address per minute, paced: after a burst of "
            "`handshake_burst`, one every 60/`handshakes_per_minute` seconds (429 with "
            "Retry-After beyond)."
        ),
    )
    handshake_burst: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CONNECTIONS,
        description=(
            "Handshake attempts an address may make at once, out of `handshakes_per_minute` "
            "(never more than it): a token bucket of this size, refilled at "
            "`handshakes_per_minute`/60 per second. An address that reconnects as fast as it "
            "is closed gets this many, then one per refill, never the minute's whole "
            "allowance at once. Unset: ten seconds' worth of `handshakes_per_minute`, at "
            "least 10 (10 at the default 60 a minute)."
        ),
    )
    auth_failures_before_ban: int = Field(
        default=5,
        ge=1,
        le=MAX_EVENTS,
        description="Failed authentications within `auth_failure_window_seconds` that start a ban.",
    )
    auth_failure_window_seconds: float = Field(
        default=60.0, gt=0, le=86400, description="Window for counting authentication failures."
    )
    ban_seconds: float = Field(
        default=60.0,
        gt=0,
        le=MAX_DURATION,
        description="First ban length; doubles for each further ban.",
    )
    ban_max_seconds: float = Field(
        default=3600.0, gt=0, le=MAX_DURATION, description="Longest ban."
    )
    handshake_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Time allowed to complete the opening handshake (slowloris).",
    )
    pending_handshakes_per_address: int = Field(
        default=10,
        ge=1,
        le=MAX_CONNECTIONS,
        description=(
            "Connections per peer (an IPv4 address, an IPv6 /64) still sending their request head "
            "(429 beyond; slowloris); trusted proxies exempt."
        ),
    )
    max_pending_handshakes: int = Field(
        default=1000,
        ge=1,
        le=MAX_CONNECTIONS,
        description="Connections in total still sending their request head (503 beyond).",
    )
    max_header_bytes: int = Field(
        default=16384,
        ge=1024,
        le=65536,
        description="Largest request head, request line and headers (431 beyond).",
    )
    ipv6_prefix_length: int = Field(
        default=64,
        ge=32,
        le=128,
        description=(
            "IPv6 clients are limited and banned per network of this prefix length (one host "
            "usually owns a whole /64)."
        ),
    )
    max_message_bytes: int = Field(
        default=8192,
        ge=64,
        le=64 * 1024 * 1024,
        description=(
            "Largest message, in one frame or in fragments, enforced at the frame layer (close "
            "1009); after decompression when compression is on."
        ),
    )
    max_fragments: int = Field(
        default=4096,
        ge=1,
        le=1024 * 1024,
        description=(
            "Frames of one message at most (close 1009); each fragment counts as a message for the"
            " rates."
        ),
    )
    messages_per_minute: int = Field(
        default=100,
        ge=1,
        le=MAX_EVENTS,
        description=(
            "Sustained messages per connection (every frame counts, pings, pongs and fragments "
            "included)."
        ),
    )
    message_burst: int = Field(
        default=20,
        ge=1,
        le=MAX_EVENTS,
        description="Messages allowed at once above the sustained rate.",
    )
    bytes_per_minute: int = Field(
        default=256 * 1024,
        ge=64,
        le=MAX_BYTES_PER_MINUTE,
        description="Sustained bytes per connection (at least `max_message_bytes`).",
    )
    subject_messages_per_minute: int = Field(
        default=300,
        ge=1,
        le=MAX_EVENTS,
        description="Messages per subject across its connections (cluster-wide in cluster mode).",
    )
    subject_bytes_per_minute: int = Field(
        default=1024 * 1024,
        ge=64,
        le=MAX_BYTES_PER_MINUTE,
        description="Bytes per subject across its connections on this node.",
    )
    violation_budget: int = Field(
        default=10,
        ge=1,
        le=MAX_EVENTS,
        description=(
            "Violations (rate, invalid, forbidden, signature, stale, replayed) tolerated before "
            "close 1008."
        ),
    )
    violation_decay_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="One violation is forgiven per this many seconds."
    )
    outbound_queue: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description=(
            "Queued outgoing messages per connection; a full queue drops the slow client (1008)."
        ),
    )

    @property
    def handshake_allowance(self) -> tuple[float, int]:
        """The handshake token bucket of an address: (tokens per second, burst)."""
        per_minute = self.handshakes_per_minute
        burst = self.handshake_burst or max(10, per_minute // 6)
        return per_minute / 60.0, min(burst, per_minute)

    @model_validator(mode="after")
    def _consistent(self) -> LimitsConfig:
        if self.ban_max_seconds < self.ban_seconds:
            raise ValueError("ban_max_seconds: must be at least ban_seconds")
        if self.bytes_per_minute < self.max_message_bytes:
            raise ValueError("bytes_per_minute: must be at least max_message_bytes")
        return self


class ReplayConfig(_Section):
    """A replay window for an unsigned message type: the client's nonce and timestamp
    fields (top-level keys of the message), and how far the timestamp may be from the
    server's time."""

    nonce_field: str = Field(
        default="nonce",
        description=(
            "The field holding the nonce: a string of 8 to 128 letters, digits, `-`, `.`, `_` or "
            "`~` (a UUID, a ULID, base64url and hex all fit)."
        ),
    )
    timestamp_field: str = Field(
        default="timestamp",
        description=(
            "The field holding the time the client sent the message: Unix time in seconds, an "
            "integer or a float (milliseconds are refused as `stale`)."
        ),
    )
    window_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "How far the timestamp may be from the server's time, in the past or the future."
        ),
    )

    @field_validator("nonce_field", "timestamp_field")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if not value or len(value) > 64 or not value.isprintable():
            raise ValueError("must be a field name of 1 to 64 printable characters")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ReplayConfig:
        if self.nonce_field == self.timestamp_field:
            raise ValueError("timestamp_field: must differ from nonce_field")
        for key in ("nonce_field", "timestamp_field"):
            if getattr(self, key) == "type":
                raise ValueError(f"{key}: 'type' names the message type")
        return self


class MessageTypeConfig(_Section):
    """Policy of one message type."""

    @field_validator("schema_file")
    @classmethod
    def _trusted(cls, value: Path | None) -> Path | None:
        return trusted_file(value)

    schema_: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description=(
            "Inline JSON Schema (Draft 2020-12) the message must meet; compiled once at start-up."
        ),
    )
    schema_file: Path | None = Field(default=None, description="Or a file holding that schema.")
    scopes: tuple[str, ...] = Field(
        default=(),
        description="Scopes (or roles) the token must carry to send this type (error `forbidden`).",
    )
    binary: bool = Field(default=False, description="Accept this type in binary frames.")
    signed: bool = Field(
        default=False, description="Require the HMAC envelope (`kid`, `nonce`, `ts`, `sig`)."
    )
    replay: ReplayConfig | None = Field(
        default=None,
        description="A replay window for an unsigned type (the keys below); unset: none.",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_replay_defence(self) -> MessageTypeConfig:
        if self.signed and self.replay is not None:
            raise ValueError(
                "replay: a signed type is already replay-protected by its envelope "
                "(nonce, ts); set either signed or replay"
            )
        return self


class MessagesConfig(_Section):
    """What clients may say once connected."""

    format: Literal["json", "opaque"] = Field(
        default="json",
        description=(
            "`json`: the full message policy; `opaque`: frames are not parsed, only sized, checked"
            " for binary and rate-limited (a protocol that is not JSON)."
        ),
    )
    max_depth: int = Field(default=16, ge=1, le=256, description="Deepest JSON nesting accepted.")
    max_string_length: int = Field(
        default=4096,
        ge=1,
        le=64 * 1024 * 1024,
        description="Longest JSON string (values and keys).",
    )
    max_keys: int = Field(
        default=256, ge=1, le=64 * 1024 * 1024, description="Most keys per object, items per array."
    )
    max_containers: int = Field(
        default=256,
        ge=1,
        le=65536,
        description=(
            "Most objects and arrays in one message (refused from a count of the raw bytes, before"
            " decoding)."
        ),
    )
    binary: bool = Field(
        default=False, description="Accept binary frames at all (otherwise close 1003)."
    )
    types: dict[str, MessageTypeConfig] = Field(
        default_factory=lambda: {
            name: MessageTypeConfig.model_validate(spec)
            for name, spec in DEMO_MESSAGE_TYPES.items()
        },
        description=(
            "The allowlist of message types, one table per type (`[messages.types.<name>]`). "
            "Default: the demo types with strict JSON Schemas (`command` needs the scope `admin`);"
            " setting any type replaces that list. `auth`, the in-band token refresh, is always "
            "understood."
        ),
    )

    @field_validator("types")
    @classmethod
    def _names(cls, value: dict[str, MessageTypeConfig]) -> dict[str, MessageTypeConfig]:
        for name in value:
            if not name or len(name) > 64 or not name.isprintable():
                raise ValueError(f"invalid message type name {name!r}")
        auth = value.get("auth")
        if auth is not None and (auth.replay is not None or auth.signed):
            key = "replay" if auth.replay is not None else "signed"
            raise ValueError(
                f"messages.types.auth.{key}: a token refresh is not a delivered message "
                "(its token is verified and checked for revocation instead)"
            )
        return value


class LivenessConfig(_Section):
    """Heartbeats, idle and lifetime limits, shutdown."""

    ping_interval_seconds: float = Field(
        default=20.0, gt=0, le=3600, description="Server ping interval."
    )
    ping_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        le=3600,
        description="Close (1011) when the pong does not come back within this time.",
    )
    idle_timeout_seconds: float = Field(
        default=0.0,
        ge=0,
        le=MAX_DURATION,
        description="Close (1001) after this long without data frames; 0 = off.",
    )
    max_lifetime_seconds: float = Field(
        default=0.0,
        ge=0,
        le=MAX_DURATION,
        description="Close (1001) after this long, forcing reconnects; 0 = off.",
    )
    drain_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="On SIGTERM/SIGINT, wait this long for connections to close (0 = not at all).",
    )


class TlsConfig(_Section):
    """TLS termination and client certificates (mTLS) for ``wsguard serve``."""

    @field_validator("client_ca_file")
    @classmethod
    def _trusted(cls, value: Path | None) -> Path | None:
        return trusted_file(value)

    cert_file: Path | None = Field(
        default=None,
        description=(
            "PEM certificate chain: serve `wss://` (`--tls-cert`). Unset: plaintext, on loopback "
            "addresses only."
        ),
    )
    key_file: Path | None = Field(default=None, description="Its private key (`--tls-key`).")
    client_ca_file: Path | None = Field(
        default=None,
        description="CA bundle for client certificates; turns on mTLS (`--tls-client-ca`).",
    )
    client_cert: Literal["required", "optional"] = Field(
        default="required",
        description=(
            "With `client_ca_file`: `required` (the certificate authenticates) or `optional` (a "
            "token is still required)."
        ),
    )
    identity_from: Literal["cn", "san_dns", "san_email", "san_uri"] = Field(
        default="cn",
        description=(
            "The certificate's identity: its subject `cn`, or a SAN: `san_dns`, `san_email` or "
            "`san_uri`."
        ),
    )
    cert_scopes: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description='Certificate identity to scopes, e.g. `{ "sensor-1" = ["telemetry"] }`.',
    )
    min_version: Literal["1.2", "1.3"] = Field(
        default="1.2", description="Oldest TLS version accepted: `1.2` or `1.3`."
    )
    behind_proxy: bool = Field(
        default=False,
        description=(
            "Serve plaintext on a non-loopback address because a TLS-terminating proxy (listed in "
            "`proxy.trusted`) is in front."
        ),
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: cert_file and key_file must be set together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file: mTLS needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class SigningConfig(_Section):
    """Signed messages: HMAC envelope with nonce and timestamp (replay protection)."""

    keys_file: Path | None = Field(
        default=None,
        description=(
            'Per-client HMAC keys, `{"keys": [{"kid": ..., "subject": ..., "secret": ...}]}` (mode'
            " 0600)."
        ),
    )
    session_keys: bool = Field(
        default=False,
        description=(
            "Give each connection its own signing key in the welcome frame (`kid` `session`)."
        ),
    )
    window_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "A signed message's `ts` must be within this many seconds of the server's time."
        ),
    )
    max_nonce_bytes: int = Field(
        default=64,
        ge=16,
        le=256,
        description="Longest nonce accepted (the shortest is 16 base64url characters, 96 bits).",
    )


class AuditConfig(_Section):
    """The structured security audit log."""

    enabled: bool = Field(default=True, description="Write the JSON-lines security audit log.")
    file: str = Field(default="-", description="`-`: standard output; else a file path (appended).")


FailureMode = Literal["open", "closed"]


class StoreFailureConfig(_Section):
    """Per check, what a node does while the shared store is unreachable.

    ``closed`` refuses (handshakes get 503, signed messages an ``unavailable``
    error); ``open`` falls back to this node's local state and limits.
    """

    bans: FailureMode = Field(
        default="closed",
        description=(
            "`closed`: handshakes get 503 (`store_unavailable`) while bans cannot be checked."
        ),
    )
    revocations: FailureMode = Field(
        default="closed",
        description=(
            "`closed`: handshakes get 503 and in-band token refreshes the error frame "
            "`unavailable` while revocations cannot be checked."
        ),
    )
    nonces: FailureMode = Field(
        default="closed",
        description=(
            "`closed`: signed messages and messages of types with a replay window get the error "
            "frame `unavailable`; `open`: the nonce is remembered on this node only."
        ),
    )
    rate_limits: FailureMode = Field(
        default="open",
        description=(
            "`open`: handshake and per-subject message rates are counted on this node only."
        ),
    )
    connections: FailureMode = Field(
        default="open",
        description=(
            "`open`: per-address and per-subject connection limits are counted on this node only."
        ),
    )


class ClusterConfig(_Section):
    """Cluster mode (``store = "redis://..."``): leases, timeouts, quotas, failures."""

    key_prefix: str = Field(
        default="wsguard:",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description=(
            "Prefix of every Redis key and channel (one per deployment); nodes sharing a Redis and"
            " this prefix form one cluster."
        ),
    )
    lease_ttl_seconds: float = Field(
        default=15.0,
        ge=1,
        le=600,
        description=(
            "Connection slots of a dead node free themselves within this time (leases are renewed "
            "every third of it)."
        ),
    )
    timeout_seconds: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description="A Redis command slower than this counts as an outage.",
    )
    retry_seconds: float = Field(
        default=1.0, gt=0, le=60, description="After an outage, try Redis again after this long."
    )
    revocation_ttl_seconds: float = Field(
        default=86400.0,
        gt=0,
        le=MAX_DURATION,
        description=(
            "Default duration of a revocation (`wsguard revoke`); at least "
            "`auth.max_token_lifetime_seconds` (plus the leeway), so a revocation outlives the "
            "token."
        ),
    )
    subject_quota_batch: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Per-subject messages taken from Redis at once; 0: the limit / 20 (1 to 50).",
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle (PEM, loaded when the configuration is) to verify a `rediss://` server; "
            "unset: the system CAs."
        ),
    )
    on_store_error: StoreFailureConfig = StoreFailureConfig()

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            value = value.expanduser()  # the Redis client is given this path as it is
            trusted_file(value)
            ca_bundle_context(value)  # as the Redis client will load it
        return value


#: What an alert rule counts. Refusal categories are the ``reason`` label values of
#: ``wsguard_refusals_total``; ``connection`` is an admitted connection and
#: ``store_outage`` a node losing its shared store.
ALERT_EVENTS = (
    "auth", "origin", "ban", "rate", "capacity", "protocol", "timeout", "revoked",
    "draining", "store", "size", "invalid_json", "schema", "unknown_type", "binary",
    "forbidden", "replay", "signature", "slow_consumer", "policy", "other",
    "connection", "store_outage",
)  # fmt: skip


class AlertRuleConfig(_Section):
    """One alert rule: more than ``threshold`` matching events within ``window_seconds``."""

    events: tuple[str, ...] = Field(
        description="What the rule counts: refusal categories (the `reason` labels of "
        "`wsguard_refusals_total`), `connection` (an admitted handshake) and `store_outage`."
    )
    enabled: bool = Field(default=True, description="`false` turns the rule off.")
    per: Literal["address", "total"] = Field(
        default="total",
        description="`total`, or `address`: counted per client address (IPv6 per /64).",
    )
    threshold: int = Field(
        default=10,
        ge=0,
        le=MAX_EVENTS,
        description="The rule fires when more than this many events happen within the window.",
    )
    window_seconds: float = Field(default=60.0, gt=0, le=86400, description="The sliding window.")
    cooldown_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Quiet period after a firing (per address for per-address rules).",
    )
    ban_seconds: float = Field(
        default=0.0,
        ge=0,
        le=MAX_DURATION,
        description=(
            'With `per = "address"`: also ban the address for this long, on every node; 0: no ban.'
        ),
    )
    webhook: bool = Field(
        default=True, description="Post this rule's alerts to `alerts.webhook_url`."
    )

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one event is required")
        for event in value:
            if event not in ALERT_EVENTS:
                raise ValueError(f"unknown event {event!r}; allowed: {', '.join(ALERT_EVENTS)}")
        return value

    @model_validator(mode="after")
    def _ban_needs_address(self) -> AlertRuleConfig:
        if self.ban_seconds and self.per != "address":
            raise ValueError('ban_seconds: automatic bans need per = "address"')
        return self


DEFAULT_ALERT_RULES: dict[str, dict[str, Any]] = {
    "auth_failures_per_address": {
        "events": ["auth", "ban"], "per": "address", "threshold": 20, "window_seconds": 60,
        "cooldown_seconds": 300,
    },
    "auth_failures_total": {
        "events": ["auth"], "per": "total", "threshold": 200, "window_seconds": 60,
        "cooldown_seconds": 300,
    },
    "invalid_messages": {
        "events": ["size", "invalid_json", "schema", "unknown_type", "binary"],
        "per": "total", "threshold": 100, "window_seconds": 60, "cooldown_seconds": 300,
    },
    "connection_spike": {
        "events": ["connection"], "per": "total", "threshold": 3000, "window_seconds": 60,
        "cooldown_seconds": 300,
    },
    "store_outage": {
        "events": ["store_outage"], "per": "total", "threshold": 0, "window_seconds": 60,
        "cooldown_seconds": 300,
    },
}  # fmt: skip


class AlertsConfig(_Section):
    """Alert rules over sliding windows, their webhook and automatic bans."""

    enabled: bool = Field(default=True, description="Evaluate the alert rules.")
    webhook_url: str = Field(
        default="",
        repr=False,
        description="POST every alert as JSON here (`http://` or `https://`); empty: no webhook.",
    )
    webhook_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="Timeout of one webhook attempt."
    )
    webhook_retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description=(
            "Retries after a failed attempt (back-off from 0.5 s, doubling; no retry on a 4xx "
            "other than 408 and 429)."
        ),
    )
    max_addresses: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Addresses tracked per per-address rule (the oldest dropped beyond).",
    )
    rules: dict[str, AlertRuleConfig] = Field(
        default_factory=lambda: {
            name: AlertRuleConfig.model_validate(spec) for name, spec in DEFAULT_ALERT_RULES.items()
        },
        description=(
            "Alert rules by name (`[alerts.rules.<name>]`); default: five rules. Setting a field "
            "of a default rule changes only that field; a new name adds a rule."
        ),
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value:
            return value
        problem = "must be an http:// or https:// URL with a host"
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(problem) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
            raise ValueError(problem)
        return value

    @field_validator("rules", mode="before")
    @classmethod
    def _over_defaults(cls, value: object) -> object:
        """A rule named like a default changes only the fields it sets."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = dict(DEFAULT_ALERT_RULES)
        for name, spec in value.items():
            base = DEFAULT_ALERT_RULES.get(name)
            merged[name] = {**base, **spec} if base and isinstance(spec, dict) else spec
        return merged

    @field_validator("rules")
    @classmethod
    def _names(cls, value: dict[str, AlertRuleConfig]) -> dict[str, AlertRuleConfig]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"invalid rule name {name!r} (letters, digits, _ and -)")
        return value


class AdminTlsConfig(_Section):
    """TLS for the admin listener; ``client_ca_file`` turns on mTLS as its credential."""

    @field_validator("client_ca_file")
    @classmethod
    def _trusted(cls, value: Path | None) -> Path | None:
        return trusted_file(value)

    cert_file: Path | None = Field(
        default=None,
        description="Serve the admin listener over HTTPS. Unset: HTTP, with the admin token.",
    )
    key_file: Path | None = Field(default=None, description="Its private key.")
    client_ca_file: Path | None = Field(
        default=None,
        description=(
            "Require an admin client certificate (mTLS) signed by this CA, which must share no "
            "certificate or key with `tls.client_ca_file`."
        ),
    )

    @model_validator(mode="after")
    def _pairs(self) -> AdminTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: cert_file and key_file must be set together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file: mTLS needs cert_file and key_file")
        return self


class AdminConfig(_Section):
    """The admin listener: metrics, health, admin API and the live dashboard."""

    host: str = Field(
        default="127.0.0.1",
        description=(
            "Address of the admin listener: loopback by default; elsewhere it needs a token or "
            "mTLS."
        ),
    )
    port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description=(
            "Turn the admin listener on (`--admin-port`; 0 = any free port). Unset: no admin "
            "listener."
        ),
    )
    token: str = Field(
        default="",
        repr=False,
        description=(
            "The admin credential (at least 24 characters); better `WSGUARD_ADMIN_TOKEN`. Unset "
            "(and no `token_file`): on loopback, a generated token file."
        ),
    )
    token_file: Path | None = Field(
        default=None,
        description=(
            "Or read the admin credential from a file (mode 0600). Unset on loopback: a generated "
            "`~/.local/share/wsguard/admin.token`."
        ),
    )
    public_metrics: bool = Field(
        default=True,
        description=(
            "Serve `/metrics` without the admin credential (it holds no addresses or subjects)."
        ),
    )
    session_seconds: float = Field(
        default=8 * 3600.0,
        gt=0,
        le=7 * 86400,
        description="Dashboard login session lifetime (cookie: `HttpOnly`, `SameSite=Strict`).",
    )
    origins: tuple[str, ...] = Field(
        default=(),
        description=(
            "Extra origins allowed to open the dashboard's WebSocket (its own origin always is)."
        ),
    )
    hosts: tuple[str, ...] = Field(
        default=(),
        description=(
            "`Host` names the listener answers besides its bind address and the loopback names "
            "(421 otherwise, against DNS rebinding); with a wildcard bind and none set, any."
        ),
    )
    max_dashboards: int = Field(
        default=16, ge=1, le=1000, description="Open dashboard WebSockets at once (503 beyond)."
    )
    client_subjects: tuple[str, ...] = Field(
        default=(),
        description=(
            'With mTLS: pinned admin certificate subjects in RFC 4514 form, e.g. `["CN=ops"]` '
            "(others get 403); empty: any certificate of `admin.tls.client_ca_file`."
        ),
    )
    tls: AdminTlsConfig = AdminTlsConfig()

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("token")
    @classmethod
    def _strong(cls, value: str) -> str:
        if value and len(value) < 24:
            raise ValueError("must be at least 24 characters (e.g. openssl rand -hex 32)")
        return value

    @field_validator("origins")
    @classmethod
    def _parseable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from wsguard.core.origin import parse_allowed_origin

        for entry in value:
            parse_allowed_origin(entry)
        return value

    @field_validator("client_subjects")
    @classmethod
    def _subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from wsguard.admin.subjects import parse_subject

        for entry in value:
            parse_subject(entry)
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> AdminConfig:
        if self.token and self.token_file:
            raise ValueError("token: set either token (WSGUARD_ADMIN_TOKEN) or token_file")
        if self.client_subjects and self.tls.client_ca_file is None:
            raise ValueError(
                "client_subjects: pinned certificate subjects need mTLS (admin.tls.client_ca_file)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.port is not None


_IDENTITY_HEADER = r"^[A-Za-z0-9-]{1,64}$"
_NEVER_FORWARDED = frozenset(
    {
        "authorization", "cookie", "sec-websocket-protocol", "host",
        "proxy-authorization", "connection", "upgrade", "transfer-encoding",
        "content-length", "keep-alive", "te", "trailer", "proxy-connection",
    }
)  # fmt: skip
#: Headers that carry a client's address: forwarded, they would pass the client's own
#: claim upstream (the gateway sends the address it resolved in its client header).
_ADDRESS_HEADERS = frozenset(
    {
        "x-forwarded-for", "forwarded", "x-real-ip", "true-client-ip", "x-client-ip",
        "cf-connecting-ip", "x-cluster-client-ip", "fastly-client-ip",
    }
)  # fmt: skip
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class GatewayConfig(_Section):
    """``wsguard proxy``: forward admitted connections to an upstream WebSocket server."""

    upstream: str = Field(
        default="",
        description=(
            "Default upstream WebSocket URL, e.g. `ws://127.0.0.1:3000/ws` (`--upstream`); "
            "required by `wsguard proxy`."
        ),
    )
    routes: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Path prefix to upstream URL; whole path segments, the longest prefix wins, e.g. `{ "
            '"/chat" = "ws://127.0.0.1:3001/" }`.'
        ),
    )
    subject_header: str = Field(
        default="X-Wsguard-Subject",
        pattern=_IDENTITY_HEADER,
        description=(
            "Identity header: the token's subject (a client's own identity headers never pass)."
        ),
    )
    scopes_header: str = Field(
        default="X-Wsguard-Scopes",
        pattern=_IDENTITY_HEADER,
        description="Identity header: the scopes, space-separated.",
    )
    token_id_header: str = Field(
        default="X-Wsguard-Token-Id",
        pattern=_IDENTITY_HEADER,
        description="Identity header: the token's `jti` (empty when none).",
    )
    client_header: str = Field(
        default="X-Wsguard-Client",
        pattern=_IDENTITY_HEADER,
        description="Identity header: the client address as wsguard resolved it.",
    )
    connection_header: str = Field(
        default="X-Wsguard-Connection",
        pattern=_IDENTITY_HEADER,
        description="Identity header: the connection id (as in the audit log).",
    )
    path_header: str = Field(
        default="X-Wsguard-Path",
        pattern=_IDENTITY_HEADER,
        description="Identity header: the path the client asked for (without the query).",
    )
    signature_header: str = Field(
        default="X-Wsguard-Signature",
        pattern=_IDENTITY_HEADER,
        description="HMAC-SHA256 of the identity headers, with `identity_secret`.",
    )
    timestamp_header: str = Field(
        default="X-Wsguard-Timestamp",
        pattern=_IDENTITY_HEADER,
        description="Unix seconds, signed with the rest.",
    )
    identity_secret: str = Field(
        default="",
        repr=False,
        description=(
            "Sign the identity headers (at least 32 bytes; better "
            "`WSGUARD_GATEWAY__IDENTITY_SECRET`); empty: unsigned."
        ),
    )
    forward_headers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Client headers passed upstream (never `Authorization`, `Proxy-Authorization`, "
            "`Cookie`, `Host`, `Sec-*`, hop-by-hop or identity headers, nor the headers of "
            "a client's address such as `X-Forwarded-For`, `Forwarded`, `X-Real-IP`)."
        ),
    )
    upstream_max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=64,
        le=64 * 1024 * 1024,
        description="Largest message accepted from the upstream (bigger: the client gets 1011).",
    )
    upstream_schema: dict[str, Any] | None = Field(
        default=None,
        description=(
            "JSON Schema (Draft 2020-12) every upstream JSON text message must meet (others are "
            "dropped and audited); unset: none."
        ),
    )
    connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description=(
            "Connecting to the upstream (failure: the client gets 1013); also how long a close the"
            " upstream never answers is waited for."
        ),
    )
    upstream_ping_interval_seconds: float = Field(
        default=20.0, gt=0, le=3600, description="The gateway's own heartbeat with the upstream."
    )
    upstream_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle (PEM, loaded when the configuration is) to verify a `wss://` upstream; "
            "unset: the system CAs."
        ),
    )
    client_drain_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "A client this long behind the upstream's messages is dropped as a slow consumer "
            "(1008)."
        ),
    )

    @field_validator("upstream")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        if value:
            _check_ws_url(value)
        return value

    @field_validator("routes")
    @classmethod
    def _route_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for prefix, url in value.items():
            if not prefix.startswith("/"):
                raise ValueError("a route is a path prefix starting with /")
            _check_ws_url(url)
        return value

    @field_validator("upstream_schema")
    @classmethod
    def _upstream_schema_compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema_rs

            try:  # as the gateway compiles it
                jsonschema_rs.Draft202012Validator(value, validate_formats=True)
            except (ValueError, jsonschema_rs.ValidationError) as exc:
                raise ValueError(f"invalid JSON Schema: {exc}") from None
        return value

    @field_validator("upstream_ca_file")
    @classmethod
    def _upstream_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            trusted_file(value)
            ca_bundle_context(value.expanduser())
        return value

    @field_validator("identity_secret")
    @classmethod
    def _long_secret(cls, value: str) -> str:
        if value and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value

    @model_validator(mode="after")
    def _headers_apart(self) -> GatewayConfig:
        fields = (
            "subject_header", "scopes_header", "token_id_header", "client_header",
            "connection_header", "signature_header", "timestamp_header", "path_header",
        )  # fmt: skip
        identity: dict[str, str] = {}
        for field_name in fields:
            name = getattr(self, field_name)
            lowered = name.lower()
            if lowered in identity:
                raise ValueError(
                    f"{field_name}: {name!r} is already {identity[lowered]}: each identity "
                    "header has its own name (a backend reading the first would read another)"
                )
            if lowered in _NEVER_FORWARDED or lowered.startswith("sec-"):
                raise ValueError(f"{field_name}: {name!r} is a header the HTTP exchange owns")
            if lowered in _ADDRESS_HEADERS:
                raise ValueError(
                    f"{field_name}: {name!r} carries a client's address to proxies and "
                    "backends: give the identity a header of its own"
                )
            identity[lowered] = field_name
        for name in self.forward_headers:
            lowered = name.lower()
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"forward_headers: {name!r} is not a header name")
            if lowered in _NEVER_FORWARDED or lowered in identity or lowered.startswith("sec-"):
                raise ValueError(f"forward_headers: {name!r} is never forwarded")
            if lowered in _ADDRESS_HEADERS:
                raise ValueError(
                    f"forward_headers: {name!r} would pass upstream the address the client "
                    f"claims; the gateway sends the address it resolved as {self.client_header}"
                )
        return self

    def upstream_for(self, path: str) -> str:
        """The upstream of *path*: the longest matching route prefix, else ``upstream``.

        Prefixes match whole path segments: ``/a`` matches ``/a`` and ``/a/x``, not ``/apple``.
        """
        best = ""
        for prefix in self.routes:
            base = prefix.rstrip("/")
            if (path == base or path.startswith(base + "/")) and len(prefix) > len(best):
                best = prefix
        return self.routes[best] if best else self.upstream


def _check_ws_url(value: str) -> None:
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("must be a ws:// or wss:// URL with a host") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL with a host")


LogLevel = Literal["debug", "info", "warning", "error"]


class Config(_Section):
    """The whole wsguard configuration."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to bind. The development key is only used on a loopback address.",
    )
    port: int = Field(default=8765, ge=0, le=65535, description="Port to bind (0 = any free port).")
    log_level: LogLevel = Field(
        default="info",
        description=(
            "Diagnostic log level (the audit log is separate): `debug`, `info`, `warning` or "
            "`error`."
        ),
    )
    store: str = Field(
        default="memory://",
        description=(
            "State store: `memory://` (this node only), `redis://[user:password@]host:port/db` or "
            "`rediss://...` (TLS): cluster mode, shared by the nodes with the same store and "
            "`cluster.key_prefix`."
        ),
    )
    subprotocols: tuple[str, ...] = Field(
        default=("wsguard.v1",),
        description=(
            "Application subprotocols the server may select (the token entry is never selected or "
            "echoed)."
        ),
    )
    compression: bool = Field(
        default=False,
        description=(
            "Negotiate permessage-deflate; when on, size limits apply after decompression. Needs "
            "the `websockets` engine."
        ),
    )
    engine: Literal["auto", "websockets", "picows"] = Field(
        default="auto",
        description=(
            "`auto`: `picows`, unless `compression` or the gateway (`gateway.upstream`) needs "
            "`websockets`; or `picows`, or `websockets`."
        ),
    )
    auth: AuthConfig = AuthConfig()
    origin: OriginConfig = OriginConfig()
    proxy: ProxyConfig = ProxyConfig()
    limits: LimitsConfig = LimitsConfig()
    messages: MessagesConfig = MessagesConfig()
    liveness: LivenessConfig = LivenessConfig()
    tls: TlsConfig = TlsConfig()
    signing: SigningConfig = SigningConfig()
    audit: AuditConfig = AuditConfig()
    cluster: ClusterConfig = ClusterConfig()
    admin: AdminConfig = AdminConfig()
    alerts: AlertsConfig = AlertsConfig()
    gateway: GatewayConfig = GatewayConfig()

    #: Warnings about where the configuration came from (a file that holds secrets and
    #: others can read), as (key, message); set by the loader.
    _source_warnings: tuple[tuple[str, str], ...] = PrivateAttr(default=())
    _source_file: str | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> str | None:
        """The TOML file this configuration was loaded from (None: none)."""
        return self._source_file

    @property
    def source_warnings(self) -> tuple[tuple[str, str], ...]:
        return self._source_warnings

    def with_source_warnings(
        self, warnings: tuple[tuple[str, str], ...], file: str | None = None
    ) -> Config:
        """This configuration, noting *warnings* about its source and the *file* it came
        from."""
        self._source_warnings = warnings
        self._source_file = file
        return self

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("store")
    @classmethod
    def _store_uri(cls, value: str) -> str:
        from wsguard.stores.uri import check_store_uri

        return check_store_uri(value)

    @field_validator("subprotocols")
    @classmethod
    def _subprotocol_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from wsguard.core.headers import is_token

        for name in value:
            if not is_token(name):
                raise ValueError(f"{name!r} is not a valid subprotocol token")
        return value

    @property
    def revocation_seconds(self) -> float:
        """How long a revocation lasts by default: ``cluster.revocation_ttl_seconds`` plus
        the leeway a token gets past its ``exp`` (so it outlives every token it names)."""
        return self.cluster.revocation_ttl_seconds + self.auth.leeway_seconds

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.engine == "auto":  # picows (faster), unless a feature needs websockets
            needs_websockets = self.compression or bool(self.gateway.upstream)
            object.__setattr__(self, "engine", "websockets" if needs_websockets else "picows")
        elif self.engine == "picows" and self.compression:
            raise ValueError(
                'engine: permessage-deflate (compression = true) needs engine = "websockets"'
            )
        elif self.engine == "picows" and self.gateway.upstream:
            raise ValueError('engine: the gateway (gateway.upstream) needs engine = "websockets"')
        if self.tls.behind_proxy and not self.proxy.trusted:
            raise ValueError(
                "tls.behind_proxy: a TLS-terminating proxy must be listed in proxy.trusted"
            )
        if self.messages.format == "opaque" and self.signing.session_keys:
            raise ValueError('signing.session_keys: signed messages need messages.format = "json"')
        signed = [n for n, t in self.messages.types.items() if t.signed]
        if self.messages.format == "opaque" and signed:
            raise ValueError(
                f"messages.format: signed types ({', '.join(signed)}) need messages.format "
                '= "json" (opaque frames are not parsed, so nothing would be verified)'
            )
        windowed = [n for n, t in self.messages.types.items() if t.replay is not None]
        if self.messages.format == "opaque" and windowed:
            raise ValueError(
                f"messages.format: types with a replay window ({', '.join(windowed)}) need "
                'messages.format = "json" (opaque frames are not parsed, so nothing would be '
                "checked)"
            )
        if signed and not (self.signing.keys_file or self.signing.session_keys):
            raise ValueError(
                f"signing.keys_file: signed types ({', '.join(signed)}) need "
                "signing.keys_file or signing.session_keys = true"
            )
        if self.auth.cookie and not self.origin.allowed:
            raise ValueError(
                "auth.cookie: cookie authentication requires origin.allowed "
                "(cross-site WebSocket hijacking)"
            )
        longest = self.auth.max_token_lifetime_seconds
        if self.cluster.revocation_ttl_seconds < longest:
            raise ValueError(
                f"cluster.revocation_ttl_seconds: a revocation must outlive the tokens it "
                f"revokes: {self.cluster.revocation_ttl_seconds:g} s is shorter than "
                f"auth.max_token_lifetime_seconds ({longest:g} s)"
            )
        if self.admin.enabled and self.admin.port == self.port and self.port != 0:
            raise ValueError("admin.port: the admin listener needs its own port")
        ca = self.admin.tls.client_ca_file
        if ca is not None and ca == self.tls.client_ca_file:
            raise ValueError(
                "admin.tls.client_ca_file: must not be the users' CA (tls.client_ca_file)"
            )
        for prefix_sub in self.subprotocols:
            if prefix_sub.startswith(self.auth.subprotocol_prefix):
                raise ValueError(
                    f"subprotocols: {prefix_sub!r} starts with the token prefix "
                    f"{self.auth.subprotocol_prefix!r}"
                )
        return self
