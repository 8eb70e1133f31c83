"""The scan's credential, and the forged ones the authentication checks send."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import shlex
import subprocess
import time
import uuid
from typing import Any

import jwt
import orjson

from wsguard.errors import ConfigError
from wsguard.scanner.options import ScanOptions

TOKEN_CMD_TIMEOUT = 30.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(orjson.dumps(value))


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{b64url_json(header)}.{b64url_json(claims)}.{signature}"


def hmac_token(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """HS256 by hand: PyJWT refuses (rightly) to use a PEM public key as an HMAC secret,
    which is exactly what the algorithm-confusion attack needs."""
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    digest = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(digest)}"


class Credentials:
    """The token the scan authenticates with, plus what it knows to forge others."""

    def __init__(self, options: ScanOptions) -> None:
        self.options = options
        self.secret = options.jwt_secret
        self.algorithm = options.jwt_algorithm
        token = options.token
        if token is None and options.token_cmd:
            token = run_token_command(options.token_cmd)
        self.given = token
        self.header: dict[str, Any] = {"alg": self.algorithm, "typ": "JWT"}
        self.claims: dict[str, Any] = {"sub": "wsguard-audit"}
        if token is not None:
            try:
                self.header = dict(jwt.get_unverified_header(token))
                self.claims = dict(jwt.decode(token, options={"verify_signature": False}))
            except jwt.PyJWTError:
                self.header, self.claims = {}, {}  # an opaque token: JWT forgeries are N/A
        self.claims.update(options.jwt_claims)
        for stale in ("exp", "iat", "nbf", "jti"):
            if stale not in options.jwt_claims:
                self.claims.pop(stale, None)
        self.token: str | None = token if token is not None else self.mint()

    def for_check(self, check_id: str) -> Credentials:
        """Tokens minted for one check carry their own subject (``<sub>.<check>``), so a
        server's per-user rate limits and violation scores from one check do not spill into
        the next. Only when the scan mints its own tokens and the subject is not pinned."""
        options = self.options
        if self.secret is None or self.given is not None or "sub" in options.jwt_claims:
            return self
        clone = object.__new__(Credentials)
        clone.options, clone.secret, clone.algorithm = options, self.secret, self.algorithm
        clone.given, clone.header = None, dict(self.header)
        clone.claims = {
            **self.claims,
            "sub": f"{self.claims.get('sub', 'wsguard-audit')}.{check_id}",
        }
        clone.token = clone.mint()
        return clone

    @property
    def is_jwt(self) -> bool:
        return bool(self.header.get("alg"))

    @property
    def can_mint(self) -> bool:
        return self.secret is not None

    def fresh_claims(self, exp_in: float | None = 3600.0, **extra: Any) -> dict[str, Any]:
        now = time.time()
        claims = dict(self.claims)
        claims["iat"] = int(now)
        claims["jti"] = uuid.uuid4().hex
        if exp_in is not None:
            claims["exp"] = math.ceil(now + exp_in)  # at least exp_in from now
        claims.update(extra)
        return claims

    def mint(self, exp_in: float | None = 3600.0, **extra: Any) -> str | None:
        """A token signed with --jwt-secret (None without one)."""
        if self.secret is None:
            return None
        header = {k: v for k, v in self.header.items() if k not in ("alg", "typ")}
        return jwt.encode(
            self.fresh_claims(exp_in, **extra),
            self.secret,
            algorithm=self.algorithm,
            headers=header or None,
        )


def run_token_command(command: str) -> str:
    try:
        completed = subprocess.run(
            shlex.split(command),
            capture_output=True,
            text=True,
            timeout=TOKEN_CMD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("--token-cmd", f"could not run: {exc}") from None
    if completed.returncode != 0:
        raise ConfigError("--token-cmd", f"exited with {completed.returncode}")
    token = completed.stdout.strip()
    if not token or "\n" in token:
        raise ConfigError("--token-cmd", "must print exactly one token on stdout")
    return token
