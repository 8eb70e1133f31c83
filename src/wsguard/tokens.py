"""Minting tokens that the configured server accepts (the ``wsguard token`` tool)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt

from wsguard.config.keys import has_configured_key, load_or_create_dev_key
from wsguard.config.model import Config
from wsguard.core.auth import KeyMaterial
from wsguard.errors import ConfigError, KeyLoadError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def mint_token(
    config: Config,
    *,
    subject: str,
    scopes: Iterable[str] = (),
    ttl: float = 3600.0,
    keys: KeyMaterial | None = None,
    private_key_file: Path | None = None,
    kid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A token for *subject* signed the way *config* verifies it."""
    auth = config.auth
    alg = auth.algorithms[0]
    now = int(time.time())
    claims: dict[str, Any] = {
        auth.subject_claim: subject,
        "iat": now,
        "exp": now + round(ttl),
        "jti": secrets.token_urlsafe(12),
    }
    scope_list = [s for scope in scopes for s in scope.split()]
    if scope_list:
        claims[auth.scope_claims[0] if auth.scope_claims else "scope"] = " ".join(scope_list)
    if auth.audience:
        claims["aud"] = auth.audience[0]
    if auth.issuer:
        claims["iss"] = auth.issuer
    claims.update(extra or {})
    headers = {"kid": kid} if kid else None
    if auth.uses_hmac:
        secret = keys.secret if keys is not None else None
        if secret is None:
            secret = _hmac_secret(config)
        return jwt.encode(claims, secret, algorithm=alg, headers=headers)
    if private_key_file is None:
        raise ConfigError("auth.algorithms", f"{alg} tokens need --private-key")
    from wsguard.extras import require

    require("publickey", f"minting {alg} tokens", key="auth.algorithms")
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(private_key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KeyLoadError("private_key", f"cannot load {private_key_file}: {exc}") from None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)  # type: ignore[arg-type]


def _hmac_secret(config: Config) -> bytes:
    from wsguard.config.keys import load_keys

    if has_configured_key(config.auth):
        secret = load_keys(config.auth).secret
        assert secret is not None
        return secret
    return load_or_create_dev_key(config.auth)[0]
