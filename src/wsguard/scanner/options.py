"""What the user asked the scanner to do, validated before any packet leaves."""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from websockets.exceptions import InvalidURI
from websockets.uri import WebSocketURI, parse_uri

from wsguard.errors import ConfigError

TokenPlacement = Literal["header", "query", "cookie", "subprotocol", "message"]
DEFAULT_PING = '{"type": "ping", "id": "{id}"}'


@dataclass(slots=True)
class ScanOptions:
    url: str
    # credentials
    token: str | None = None
    token_cmd: str | None = None
    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_claims: dict[str, Any] = field(default_factory=dict)
    public_key: Path | None = None  # for algorithm confusion (RS*/ES* tokens)
    token_in: TokenPlacement = "header"
    token_name: str = ""  # query parameter, cookie name, subprotocol prefix or message
    subprotocols: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()  # "name=value", sent as the Cookie header
    headers: tuple[tuple[str, str], ...] = ()
    origin_allowed: str | None = None
    # TLS
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False
    plain_port: int | None = None
    # the target's protocol
    ping_message: str | None = None  # None: discovered at the baseline (scanner.dialect)
    pong_type: str | None = None
    error_types: tuple[str, ...] = ("error",)
    replay_message: str | None = None
    privileged_messages: tuple[str, ...] = ()  # () : guesses in the endpoint's envelope
    signing_key: tuple[str, bytes] | None = None  # (kid, secret) for wsguard's HMAC envelope
    server_log: Path | None = None
    # what to run
    checks: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    aggressive: bool = False
    i_own_this_target: bool = False
    # bounds
    reply_timeout: float = 2.0
    connect_timeout: float = 5.0
    slow_wait: float = 30.0
    idle_wait: float = 30.0
    expiry_wait: float = 30.0
    reset_wait: float = 15.0
    max_connections: int = 100
    flood_count: int = 1000
    rotate_sources: bool | None = None  # None: on for IPv4 loopback targets
    max_message_bytes: int = 4 * 1024 * 1024  # the largest frame or message taken in

    def selected(self, check_id: str, group: str = "") -> bool:
        """Whether the check is chosen: a pattern names its id, an id prefix
        (``auth`` for ``auth.required``), its group (``limits`` for ``flood.rate_limit``)
        or is a glob of its id."""

        def matches(patterns: tuple[str, ...]) -> bool:
            return any(
                check_id == p
                or p == group
                or check_id.startswith(p + ".")
                or fnmatch.fnmatchcase(check_id, p)
                for p in patterns
            )

        if self.checks and not matches(self.checks):
            return False
        return not matches(self.skip)


@dataclass(frozen=True, slots=True)
class Target:
    uri: WebSocketURI
    addresses: tuple[str, ...]  # resolved, in getaddrinfo order
    loopback: bool

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def label(self) -> str:
        scheme = "wss" if self.uri.secure else "ws"
        host = f"[{self.uri.host}]" if ":" in self.uri.host else self.uri.host
        return f"{scheme}://{host}:{self.uri.port}{self.uri.resource_name}"


def parse_target(url: str) -> WebSocketURI:
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise ConfigError("url", f"not a ws:// or wss:// URL: {exc}") from None
    if uri.username or uri.password:
        raise ConfigError("url", "no credentials in the URL; use --token or --header")
    return uri


def resolve_target(options: ScanOptions) -> Target:
    """Resolve once (the scan then pins the address) and enforce the loopback rule."""
    uri = parse_target(options.url)
    try:
        infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError("url", f"cannot resolve {uri.host!r}: {exc.strerror}") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not loopback and not options.i_own_this_target:
        raise ConfigError(
            "url",
            f"{uri.host} resolves to {', '.join(addresses)}, which is not loopback. "
            "Scanning sends hostile traffic; pass --i-own-this-target if you own it or "
            "have written permission to test it",
        )
    return Target(uri, addresses, loopback)


def parse_signing_key(value: str) -> tuple[str, bytes]:
    from wsguard.core.integrity import decode_secret

    kid, sep, secret = value.partition(":")
    if not sep or not kid or not secret:
        raise ConfigError("--signing-key", "expected KID:SECRET (secret in base64url)")
    try:
        raw = decode_secret(secret)
    except ValueError:
        raise ConfigError("--signing-key", "the secret is not base64url") from None
    return kid, raw


def parse_json_option(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ConfigError(name, f"not JSON: {exc}") from None
