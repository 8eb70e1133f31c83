"""Authentication at the handshake: no credential, forged and stale tokens."""

from __future__ import annotations

import base64
import os

from wsguard.scanner.checks.common import require_auth, require_baseline, try_handshakes
from wsguard.scanner.context import NotApplicable, ScanContext
from wsguard.scanner.credentials import b64url, hmac_token, unsigned
from wsguard.scanner.model import OWASP, Finding, check

REFS = (f"{OWASP}: Authentication", "ASVS 5.0 V4.4.3", "ASVS 5.0 V9.1 (self-contained tokens)")
REFUSED = "the server verifies tokens before upgrading"


@check(
    "auth.required",
    "Connecting without a credential is refused",
    group="auth",
    references=REFS,
    remedy="Authenticate in the handshake and answer 401 before the upgrade "
    "(wsguard: auth is always on).",
)
async def no_credential(ctx: ScanContext) -> Finding:
    return await try_handshakes(
        ctx,
        [("no credential", {"token": None})],
        refused_means="authentication happens before the upgrade",
        accepted_means="anyone can connect",
        credential=True,
    )


def _jwt_parts(ctx: ScanContext) -> tuple[str, str, str]:
    token = ctx.credentials.token
    if token is None:
        raise NotApplicable(
            "needs a JWT credential (--token, --token-cmd or --jwt-secret)",
            needs="--jwt-secret or --token",
        )
    if not ctx.credentials.is_jwt or token.count(".") != 2:
        raise NotApplicable("the credential is not a JWT: no JWT to forge from")
    header, payload, signature = token.split(".")
    return header, payload, signature


@check(
    "auth.malformed",
    "Malformed credentials are refused",
    group="auth",
    references=REFS,
    remedy="Treat any token that does not parse as no token: 401 before the upgrade.",
)
async def malformed(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    junk = b64url(os.urandom(24))
    variants = [
        ("empty token", ""),
        ("not a JWT", "not-a-jwt"),
        ("three junk segments", f"{junk}.{junk}.{junk}"),
        ("JSON garbage", "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln"),
        ("16 KiB token", "A" * 16384),
        ("four segments", "a.b.c.d"),
    ]
    return await try_handshakes(
        ctx,
        [(label, {"token": token}) for label, token in variants],
        refused_means="malformed credentials are refused",
        accepted_means="a token that is not even a JWT opens a connection",
        credential=True,
    )


@check(
    "auth.signature",
    "Tokens with a wrong signature are refused",
    group="auth",
    references=REFS,
    remedy="Verify the signature with the configured key before anything else.",
)
async def bad_signature(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    header, payload, signature = _jwt_parts(ctx)
    await require_baseline(ctx)
    forged_sig = b64url(os.urandom(max(16, len(base64.urlsafe_b64decode(signature + "==")))))
    claims = dict(ctx.credentials.fresh_claims())
    claims["sub"] = "wsguard-audit-admin"
    tampered_payload = unsigned({}, claims).split(".")[1]
    return await try_handshakes(
        ctx,
        [
            ("random signature", {"token": f"{header}.{payload}.{forged_sig}"}),
            ("signature removed", {"token": f"{header}.{payload}."}),
            ("payload changed", {"token": f"{header}.{tampered_payload}.{signature}"}),
        ],
        refused_means=REFUSED,
        accepted_means="signatures are not verified",
        credential=True,
    )


@check(
    "auth.alg_none",
    "Unsigned tokens (alg: none) are refused",
    group="auth",
    references=(*REFS, "RFC 8725 §2.1, §3.1"),
    remedy="Pin the accepted algorithms (PyJWT: algorithms=[...]); never accept 'none'.",
)
async def alg_none(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    _header, _payload, signature = _jwt_parts(ctx)
    await require_baseline(ctx)
    claims = ctx.credentials.fresh_claims()
    variants: list[tuple[str, dict[str, object]]] = []
    for alg in ("none", "None", "NONE", "nOnE"):
        head = {**ctx.credentials.header, "alg": alg}
        variants.append((f"alg {alg!r}", {"token": unsigned(head, claims)}))
    head = {**ctx.credentials.header, "alg": "none"}
    variants.append(("alg 'none' + old signature", {"token": unsigned(head, claims, signature)}))
    return await try_handshakes(
        ctx,
        variants,
        refused_means="unsigned tokens are refused",
        accepted_means="anyone can forge a token for any subject",
        credential=True,
    )


@check(
    "auth.alg_confusion",
    "An HMAC token signed with the server's public key is refused",
    group="auth",
    references=(*REFS, "RFC 8725 §2.1, §3.1", "CVE-2022-29217 (PyJWT)"),
    remedy="Pin one algorithm family per key; never let the token's header choose HMAC "
    "for an asymmetric key.",
)
async def alg_confusion(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    _jwt_parts(ctx)
    alg = str(ctx.credentials.header.get("alg", ""))
    if alg.upper().startswith("HS"):
        raise NotApplicable(f"the credential is {alg}: no public key to confuse it with")
    if ctx.options.public_key is None:
        raise NotApplicable(
            f"the credential is {alg}; give --public-key (the server's PEM)", needs="--public-key"
        )
    await require_baseline(ctx)
    pem = ctx.options.public_key.read_bytes()
    claims = ctx.credentials.fresh_claims()
    variants: list[tuple[str, dict[str, object]]] = []
    for hs in ("HS256",):
        head = {**ctx.credentials.header, "alg": hs}
        for label, key in (("PEM", pem), ("PEM, trimmed", pem.strip())):
            variants.append(
                (f"{hs} keyed with the {label}", {"token": hmac_token(head, claims, key)})
            )
    return await try_handshakes(
        ctx,
        variants,
        refused_means="the algorithm is pinned to the key type",
        accepted_means="anyone with the public key can forge tokens",
        credential=True,
    )


def _mintable(ctx: ScanContext) -> None:
    if not ctx.credentials.can_mint:
        raise NotApplicable("needs --jwt-secret to mint test tokens", needs="--jwt-secret")


@check(
    "auth.expired",
    "Expired tokens are refused",
    group="auth",
    references=(*REFS, "RFC 7519 §4.1.4"),
    remedy="Verify exp (with at most a small leeway).",
)
async def expired(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    _mintable(ctx)
    await require_baseline(ctx)
    return await try_handshakes(
        ctx,
        [
            ("expired 1 h ago", {"token": ctx.credentials.mint(exp_in=-3600)}),
            ("expired 10 min ago", {"token": ctx.credentials.mint(exp_in=-600)}),
        ],
        refused_means="exp is verified",
        accepted_means="a stolen token works forever",
        credential=True,
    )


@check(
    "auth.no_exp",
    "Tokens without an expiry are refused",
    group="auth",
    references=(*REFS, "RFC 8725 §3.10"),
    remedy="Require exp (PyJWT: options={'require': ['exp']}).",
)
async def no_exp(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    _mintable(ctx)
    await require_baseline(ctx)
    return await try_handshakes(
        ctx,
        [("token without exp", {"token": ctx.credentials.mint(exp_in=None)})],
        refused_means="exp is required",
        accepted_means="a token without exp never expires",
        credential=True,
    )
