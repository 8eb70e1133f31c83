"""The typed configuration of wsguard.

One model serves every deployment mode (standalone server, ASGI middleware,
gateway). Every field has a secure default; ``examples/wsguard.toml`` lists
them all and the README's configuration table mirrors this file.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wsguard.config.demo_types import DEMO_MESSAGE_TYPES

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AuthConfig(_Section):
    """How connections authenticate at the handshake (JWT)."""

    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = Field(default="", repr=False)
    secret_file: Path | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    jwks_url: str = ""
    oidc_issuer: str = ""
    jwks_ca_file: Path | None = None
    jwks_cache_seconds: float = Field(default=300.0, ge=1, le=86400)
    jwks_min_refetch_seconds: float = Field(default=30.0, ge=1, le=3600)
    jwks_max_stale_seconds: float = Field(default=86400.0, ge=1, le=30 * 86400)
    dev_key_file: Path = Path("~/.local/share/wsguard/dev-jwt.key")
    audience: tuple[str, ...] = ()
    issuer: str = ""
    require_exp: bool = True
    max_token_lifetime_seconds: float = Field(default=86400.0, gt=0, le=366 * 86400)
    leeway_seconds: float = Field(default=0.0, ge=0, le=300)
    subject_claim: str = Field(default="sub", min_length=1)
    scope_claims: tuple[str, ...] = ("scope", "scp", "roles")
    max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    keep_claims: bool = False
    header: bool = True
    subprotocol: bool = True
    subprotocol_prefix: str = Field(default="token.", min_length=1)
    cookie: bool = False
    cookie_name: str = Field(default="wsguard_token", min_length=1)
    query: bool = False
    query_param: str = Field(default="token", min_length=1)

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


class OriginConfig(_Section):
    """Cross-site WebSocket hijacking defence."""

    allowed: tuple[str, ...] = ()
    allow_missing: bool = True

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

    trusted: tuple[str, ...] = ()
    header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"

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

    max_connections: int = Field(default=10_000, ge=1)
    connections_per_address: int = Field(default=5, ge=1)
    connections_per_subject: int = Field(default=10, ge=1)
    handshakes_per_minute: int = Field(default=60, ge=1)
    auth_failures_before_ban: int = Field(default=5, ge=1)
    auth_failure_window_seconds: float = Field(default=60.0, gt=0)
    ban_seconds: float = Field(default=60.0, gt=0)
    ban_max_seconds: float = Field(default=3600.0, gt=0)
    handshake_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    pending_handshakes_per_address: int = Field(default=10, ge=1)
    max_pending_handshakes: int = Field(default=1000, ge=1)
    max_header_bytes: int = Field(default=16384, ge=1024, le=65536)
    ipv6_prefix_length: int = Field(default=64, ge=32, le=128)
    max_message_bytes: int = Field(default=8192, ge=64, le=64 * 1024 * 1024)
    max_fragments: int = Field(default=4096, ge=1, le=1024 * 1024)
    messages_per_minute: int = Field(default=100, ge=1)
    message_burst: int = Field(default=20, ge=1)
    bytes_per_minute: int = Field(default=256 * 1024, ge=64)
    subject_messages_per_minute: int = Field(default=300, ge=1)
    subject_bytes_per_minute: int = Field(default=1024 * 1024, ge=64)
    violation_budget: int = Field(default=10, ge=1)
    violation_decay_seconds: float = Field(default=10.0, gt=0)
    outbound_queue: int = Field(default=64, ge=1, le=100_000)

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

    nonce_field: str = "nonce"
    timestamp_field: str = "timestamp"
    window_seconds: float = Field(default=30.0, gt=0, le=3600)

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

    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_file: Path | None = None
    scopes: tuple[str, ...] = ()
    binary: bool = False
    signed: bool = False
    replay: ReplayConfig | None = None

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

    format: Literal["json", "opaque"] = "json"
    max_depth: int = Field(default=16, ge=1, le=256)
    max_string_length: int = Field(default=4096, ge=1)
    max_keys: int = Field(default=256, ge=1)
    max_containers: int = Field(default=256, ge=1, le=65536)
    binary: bool = False
    types: dict[str, MessageTypeConfig] = Field(
        default_factory=lambda: {
            name: MessageTypeConfig.model_validate(spec)
            for name, spec in DEMO_MESSAGE_TYPES.items()
        }
    )

    @field_validator("types")
    @classmethod
    def _names(cls, value: dict[str, MessageTypeConfig]) -> dict[str, MessageTypeConfig]:
        for name in value:
            if not name or len(name) > 64 or not name.isprintable():
                raise ValueError(f"invalid message type name {name!r}")
        auth = value.get("auth")
        if auth is not None and auth.replay is not None:
            raise ValueError(
                "messages.types.auth.replay: a token refresh is not a delivered message "
                "(its token is verified and checked for revocation instead)"
            )
        return value


class LivenessConfig(_Section):
    """Heartbeats, idle and lifetime limits, shutdown."""

    ping_interval_seconds: float = Field(default=20.0, gt=0)
    ping_timeout_seconds: float = Field(default=20.0, gt=0)
    idle_timeout_seconds: float = Field(default=0.0, ge=0)
    max_lifetime_seconds: float = Field(default=0.0, ge=0)
    drain_seconds: float = Field(default=10.0, ge=0)


class TlsConfig(_Section):
    """TLS termination and client certificates (mTLS) for ``wsguard serve``."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    client_cert: Literal["required", "optional"] = "required"
    identity_from: Literal["cn", "san_dns", "san_email", "san_uri"] = "cn"
    cert_scopes: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    min_version: Literal["1.2", "1.3"] = "1.2"
    behind_proxy: bool = False

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

    keys_file: Path | None = None
    session_keys: bool = False
    window_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_nonce_bytes: int = Field(default=64, ge=16, le=256)


class AuditConfig(_Section):
    """The structured security audit log."""

    enabled: bool = True
    file: str = "-"


FailureMode = Literal["open", "closed"]


class StoreFailureConfig(_Section):
    """Per check, what a node does while the shared store is unreachable.

    ``closed`` refuses (handshakes get 503, signed messages an ``unavailable``
    error); ``open`` falls back to this node's local state and limits.
    """

    bans: FailureMode = "closed"
    revocations: FailureMode = "closed"
    nonces: FailureMode = "closed"
    rate_limits: FailureMode = "open"
    connections: FailureMode = "open"


class ClusterConfig(_Section):
    """Cluster mode (``store = "redis://..."``): leases, timeouts, quotas, failures."""

    key_prefix: str = Field(default="wsguard:", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    lease_ttl_seconds: float = Field(default=15.0, ge=1, le=600)
    timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    retry_seconds: float = Field(default=1.0, gt=0, le=60)
    revocation_ttl_seconds: float = Field(default=86400.0, gt=0, le=30 * 86400)
    subject_quota_batch: int = Field(default=0, ge=0, le=10_000)
    tls_ca_file: Path | None = None
    on_store_error: StoreFailureConfig = StoreFailureConfig()


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

    events: tuple[str, ...]
    enabled: bool = True
    per: Literal["address", "total"] = "total"
    threshold: int = Field(default=10, ge=0)
    window_seconds: float = Field(default=60.0, gt=0, le=86400)
    cooldown_seconds: float = Field(default=300.0, gt=0, le=86400)
    ban_seconds: float = Field(default=0.0, ge=0, le=30 * 86400)
    webhook: bool = True

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

    enabled: bool = True
    webhook_url: str = Field(default="", repr=False)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    webhook_retries: int = Field(default=3, ge=0, le=10)
    max_addresses: int = Field(default=10_000, ge=1, le=1_000_000)
    rules: dict[str, AlertRuleConfig] = Field(
        default_factory=lambda: {
            name: AlertRuleConfig.model_validate(spec) for name, spec in DEFAULT_ALERT_RULES.items()
        }
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

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _pairs(self) -> AdminTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: cert_file and key_file must be set together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file: mTLS needs cert_file and key_file")
        return self


class AdminConfig(_Section):
    """The admin listener: metrics, health, admin API and the live dashboard."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    token: str = Field(default="", repr=False)
    token_file: Path | None = None
    public_metrics: bool = True
    session_seconds: float = Field(default=8 * 3600.0, gt=0, le=7 * 86400)
    origins: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    max_dashboards: int = Field(default=16, ge=1, le=1000)
    client_subjects: tuple[str, ...] = ()
    tls: AdminTlsConfig = AdminTlsConfig()

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


class GatewayConfig(_Section):
    """``wsguard proxy``: forward admitted connections to an upstream WebSocket server."""

    upstream: str = ""
    routes: dict[str, str] = Field(default_factory=dict)
    subject_header: str = Field(default="X-Wsguard-Subject", pattern=_IDENTITY_HEADER)
    scopes_header: str = Field(default="X-Wsguard-Scopes", pattern=_IDENTITY_HEADER)
    token_id_header: str = Field(default="X-Wsguard-Token-Id", pattern=_IDENTITY_HEADER)
    client_header: str = Field(default="X-Wsguard-Client", pattern=_IDENTITY_HEADER)
    connection_header: str = Field(default="X-Wsguard-Connection", pattern=_IDENTITY_HEADER)
    path_header: str = Field(default="X-Wsguard-Path", pattern=_IDENTITY_HEADER)
    signature_header: str = Field(default="X-Wsguard-Signature", pattern=_IDENTITY_HEADER)
    timestamp_header: str = Field(default="X-Wsguard-Timestamp", pattern=_IDENTITY_HEADER)
    identity_secret: str = Field(default="", repr=False)
    forward_headers: tuple[str, ...] = ()
    upstream_max_message_bytes: int = Field(default=1024 * 1024, ge=64, le=64 * 1024 * 1024)
    upstream_schema: dict[str, Any] | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    upstream_ping_interval_seconds: float = Field(default=20.0, gt=0)
    upstream_ca_file: Path | None = None
    client_drain_seconds: float = Field(default=10.0, gt=0, le=300)

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

    @field_validator("identity_secret")
    @classmethod
    def _long_secret(cls, value: str) -> str:
        if value and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value

    @model_validator(mode="after")
    def _headers_apart(self) -> GatewayConfig:
        identity = {
            h.lower()
            for h in (
                self.subject_header, self.scopes_header, self.token_id_header,
                self.client_header, self.connection_header, self.signature_header,
                self.timestamp_header, self.path_header,
            )
        }  # fmt: skip
        for name in self.forward_headers:
            lowered = name.lower()
            if lowered in _NEVER_FORWARDED or lowered in identity or lowered.startswith("sec-"):
                raise ValueError(f"forward_headers: {name!r} is never forwarded")
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

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    log_level: LogLevel = "info"
    store: str = "memory://"
    subprotocols: tuple[str, ...] = ("wsguard.v1",)
    compression: bool = False
    engine: Literal["auto", "websockets", "picows"] = "auto"
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
