"""Load verification and signing keys named by the configuration.

The development key: when no key is configured, ``wsguard serve`` on a
loopback address creates a random HS256 secret on first use in
``auth.dev_key_file`` with mode 0600 (owner read/write only) and reuses it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt

from wsguard.config.model import ASYMMETRIC_ALGORITHMS, AuthConfig
from wsguard.core.auth import KeyMaterial
from wsguard.core.integrity import SESSION_KID, SigningKey, decode_secret
from wsguard.errors import KeyLoadError


def has_configured_key(config: AuthConfig) -> bool:
    return bool(
        config.secret
        or config.secret_file
        or config.public_key_file
        or config.jwks_file
        or config.remote_jwks
    )


def dev_key_path(config: AuthConfig) -> Path:
    return config.dev_key_file.expanduser()


def read_dev_key(config: AuthConfig) -> bytes | None:
    """The development key if its file exists (None if not), checked as the server
    checks it: a file, mode 0600, at least 32 bytes. Nothing is created."""
    path = dev_key_path(config)
    try:
        return _read_private_file(path, _DEV_KEY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyLoadError(_DEV_KEY, f"cannot read {path}: {exc.strerror}") from None


def load_or_create_dev_key(config: AuthConfig) -> tuple[bytes, bool]:
    """Return (secret, created). The file is created with mode 0600."""
    secret = read_dev_key(config)
    if secret is not None:
        return secret, False
    path = dev_key_path(config)
    secret = secrets.token_urlsafe(48).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created concurrently (or a parent is not a directory)
        existing = read_dev_key(config)
        if existing is None:
            raise KeyLoadError(_DEV_KEY, f"cannot create {path}") from None
        return existing, False
    except OSError as exc:
        raise KeyLoadError(_DEV_KEY, f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret + b"\n")
    return secret, True


_DEV_KEY = "auth.dev_key_file"


def _read_private_file(path: Path, key: str) -> bytes:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise KeyLoadError(key, f"{path} is not a file")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyLoadError(key, f"{path} must be readable by its owner only (chmod 600)")
    data = path.read_bytes().strip()
    if len(data) < 32:
        raise KeyLoadError(key, f"{path} holds fewer than 32 bytes")
    return data


#: Where a JWT key comes from, for the messages asking for one.
KEY_SOURCES = (
    "WSGUARD_JWT_SECRET, auth.secret_file, auth.public_key_file, auth.jwks_file, "
    "auth.jwks_url or auth.oidc_issuer"
)


def load_keys(config: AuthConfig, *, allow_dev_key: bool = True) -> KeyMaterial:
    """Load the configured verification keys (or the dev key when allowed).

    An identity provider's keys (``auth.jwks_url``, ``auth.oidc_issuer``) are not loaded
    here: ``wsguard.keys.remote_jwks`` fetches them once the node starts.
    """
    if config.remote_jwks:
        return KeyMaterial()
    if config.secret:
        return KeyMaterial(secret=config.secret.encode())
    if config.secret_file:
        try:
            return KeyMaterial(
                secret=_read_private_file(config.secret_file.expanduser(), "auth.secret_file")
            )
        except OSError as exc:
            raise KeyLoadError("auth.secret_file", f"cannot read: {exc.strerror}") from None
    if config.public_key_file or config.jwks_file:
        from wsguard.extras import require  # cryptography: not needed for HS*

        require("publickey", config.algorithms[0], key="auth.algorithms")
    if config.public_key_file:
        key = _load_public_key(config.public_key_file.expanduser())
        _check_key_fits(key, tuple(config.algorithms))
        return KeyMaterial(public_key=key)
    if config.jwks_file:
        return KeyMaterial(jwks=_load_jwks(config.jwks_file.expanduser(), config))
    if not allow_dev_key:
        raise KeyLoadError(
            "auth.secret",
            f"no JWT key configured (set {KEY_SOURCES})",
        )
    secret, _ = load_or_create_dev_key(config)
    return KeyMaterial(secret=secret)


def load_signing_keys(path: Path | None) -> dict[str, SigningKey]:
    """Per-client message signing keys: ``{"keys": [{"kid", "subject", "secret"}]}``.

    ``secret`` is base64url (at least 32 bytes once decoded). A subject may have
    several keys at once, which is how keys are rotated.
    """
    if path is None:
        return {}
    key = "signing.keys_file"
    try:
        data = path.expanduser().read_bytes()
        info = path.expanduser().stat()
    except OSError as exc:
        raise KeyLoadError(key, f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyLoadError(key, f"{path} must be readable by its owner only (chmod 600)")
    try:
        document = json.loads(data)
    except ValueError:
        raise KeyLoadError(key, f"{path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyLoadError(key, f"{path} has no 'keys' array")
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise KeyLoadError(key, "every entry must be an object")
        kid, subject, secret = entry.get("kid"), entry.get("subject"), entry.get("secret")
        if not all(isinstance(v, str) and v for v in (kid, subject, secret)):
            raise KeyLoadError(key, "every key needs string 'kid', 'subject' and 'secret'")
        assert isinstance(kid, str) and isinstance(subject, str) and isinstance(secret, str)
        if kid == SESSION_KID or kid in keys:
            raise KeyLoadError(key, f"kid {kid!r} is reserved or duplicated")
        try:
            raw = decode_secret(secret)
        except ValueError:
            raise KeyLoadError(key, f"key {kid!r}: secret is not base64url") from None
        if len(raw) < 32:
            raise KeyLoadError(key, f"key {kid!r}: secret must be at least 32 bytes")
        keys[kid] = SigningKey(kid, subject, raw)
    return keys


def _load_public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyLoadError("auth.public_key_file", f"cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyLoadError("auth.public_key_file", f"{path} is not a PEM public key") from None
    _check_rsa_size(key, "auth.public_key_file", str(path))
    return key


def _check_key_fits(key: Any, algorithms: tuple[str, ...]) -> None:
    """A public key that none of *algorithms* can use would refuse every token: a
    configuration error at start, not a 401 for everyone."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    kind: str
    fits: frozenset[str]
    if isinstance(key, rsa.RSAPublicKey):
        kind, fits = "an RSA key", _RSA_ALGORITHMS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        name = curve.get(key.curve.name, key.curve.name)
        alg = _EC_CURVES.get(name)
        kind, fits = f"an EC key on {name}", frozenset({alg}) if alg else frozenset()
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        kind, fits = "an EdDSA key", frozenset({"EdDSA"})
    else:
        kind, fits = f"a {type(key).__name__}", frozenset()
    if not fits & frozenset(algorithms):
        raise KeyLoadError(
            "auth.public_key_file",
            f"{kind} fits none of auth.algorithms ({', '.join(algorithms)}): every token "
            "would be refused",
        )


#: the shortest RSA key accepted, from a file or an identity provider (RFC 7518 §3.3)
MIN_RSA_BITS = 2048


def short_rsa_bits(key: Any) -> int | None:
    """The size of an RSA public key under :data:`MIN_RSA_BITS`; None for any other key."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return int(key.key_size)
    return None


def _check_rsa_size(key: Any, config_key: str, what: str) -> None:
    """RSA keys of at least 2048 bits (RFC 7518 §3.3), as from an identity provider."""
    bits = short_rsa_bits(key)
    if bits is not None:
        raise KeyLoadError(config_key, f"{what}: RSA key of {bits} bits (at least {MIN_RSA_BITS})")


#: What a JWK can verify, by its type and curve (RFC 7518 §3, RFC 8037).
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def fitting_algorithms(entry: Mapping[str, Any], configured: tuple[str, ...]) -> frozenset[str]:
    """The algorithms of *configured* a public JWK can verify (its type, curve, ``alg``)."""
    kty = entry.get("kty")
    fits: frozenset[str] = frozenset()
    if kty == "RSA":
        fits = _RSA_ALGORITHMS
    elif kty == "EC":
        alg = _EC_CURVES.get(str(entry.get("crv")))
        fits = frozenset({alg}) if alg else frozenset()
    elif kty == "OKP" and entry.get("crv") in _OKP_CURVES:
        fits = frozenset({"EdDSA"})
    # anything else, "oct" (an HMAC secret) first of all, fits no algorithm
    usable = fits & frozenset(configured) & ASYMMETRIC_ALGORITHMS
    declared = entry.get("alg")
    if declared is not None:
        usable = usable & {declared} if isinstance(declared, str) else frozenset()
    return usable


def why_unusable(entry: Mapping[str, Any], configured: tuple[str, ...]) -> str | None:
    """Why a JWK cannot verify tokens of *configured* (RFC 7517 ``use``/``key_ops``,
    its type and curve), or None: the same rules for a JWKS file and a provider's."""
    if entry.get("kty") == "oct":
        return "an HMAC (oct) key is never taken from a JWKS"
    if any(name in entry for name in _PRIVATE_MEMBERS):
        return "private key material published"
    if entry.get("use", "sig") != "sig":
        return "not a signature key (use)"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops without verify"
    if not fitting_algorithms(entry, configured):
        return "fits none of auth.algorithms (kty, crv or alg)"
    return None


def _load_jwks(path: Path, config: AuthConfig) -> dict[str, tuple[Any, str | None]]:
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise KeyLoadError("auth.jwks_file", f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise KeyLoadError("auth.jwks_file", f"{path} is not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise KeyLoadError("auth.jwks_file", f"{path} has no 'keys' array")
    out: dict[str, tuple[Any, str | None]] = {}
    algorithms = tuple(config.algorithms)
    for entry in keys:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            raise KeyLoadError("auth.jwks_file", "every key needs a string 'kid'")
        if entry.get("kty") == "oct" or any(name in entry for name in _PRIVATE_MEMBERS):
            raise KeyLoadError("auth.jwks_file", f"key {entry['kid']!r}: only public keys allowed")
    # which of two verifying keys under one kid verifies would be a guess; a key that
    # does not verify (another use, key_ops...) is left out first, as a provider's is
    usable = [entry for entry in keys if why_unusable(entry, algorithms) is None]
    kids = [entry["kid"] for entry in usable]
    for entry in usable:
        if kids.count(entry["kid"]) > 1:
            raise KeyLoadError("auth.jwks_file", f"kid {entry['kid']!r} names several keys")
        declared = entry.get("alg")
        try:
            # each key built for an algorithm its own type fits (RSA and EC keys mixed)
            algorithm = min(fitting_algorithms(entry, algorithms))
            jwk = jwt.PyJWK(entry, algorithm=algorithm)
        except jwt.PyJWTError as exc:
            raise KeyLoadError("auth.jwks_file", f"key {entry['kid']!r}: {exc}") from None
        _check_rsa_size(jwk.key, "auth.jwks_file", f"key {entry['kid']!r}")
        out[entry["kid"]] = (jwk.key, declared)
    if not out:
        raise KeyLoadError("auth.jwks_file", "no usable signing key for the configured algorithms")
    return out
