"""Cross-site WebSocket hijacking: the Origin header at the handshake."""

from __future__ import annotations

from urllib.parse import urlsplit

from wsguard.scanner.checks.common import require_baseline, try_handshakes
from wsguard.scanner.context import NotApplicable, ScanContext, settle
from wsguard.scanner.model import OWASP, Finding, check

REFS = (
    f"{OWASP}: Cross-Site WebSocket Hijacking",
    "ASVS 5.0 V4.4.2",
    "RFC 6455 §10.2",
)
REMEDY = (
    "Check Origin against an exact allowlist before the upgrade and answer 403 "
    "(wsguard: origin.allowed); refuse 'null'."
)
FOREIGN = "https://wsguard-audit.invalid"


@check(
    "origin.foreign", "A foreign Origin is refused", group="origin", references=REFS, remedy=REMEDY
)
async def foreign(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    return await try_handshakes(
        ctx,
        [(f"Origin: {FOREIGN}", {"origin": FOREIGN})],
        refused_means="Origin is checked",
        accepted_means="any web page can open this socket with its visitors' credentials",
    )


@check("origin.null", "Origin 'null' is refused", group="origin", references=REFS, remedy=REMEDY)
async def null(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    return await try_handshakes(
        ctx,
        [("Origin: null", {"origin": "null"})],
        refused_means="sandboxed iframes and data: URLs cannot connect",
        accepted_means="a sandboxed iframe on any site can connect",
    )


def lookalikes(allowed: str) -> list[str]:
    parts = urlsplit(allowed)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    other = "http" if parts.scheme == "https" else "https"
    return [
        f"{parts.scheme}://{host}.wsguard-audit.invalid{port}",  # suffix
        f"{parts.scheme}://evil{host}{port}",  # prefix
        f"{other}://{host}{port}",  # scheme swapped
        f"{parts.scheme}://{host}:1{port[1:] or '1'}",  # another port
        f"{parts.scheme}://{host}{port}@wsguard-audit.invalid",  # userinfo trick
    ]


def _candidates(ctx: ScanContext) -> list[str]:
    """Origins a deployment commonly allows: the endpoint's own, then development ones."""
    uri = ctx.target.uri
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    scheme = "https" if uri.secure else "http"
    default = uri.port == (443 if uri.secure else 80)
    own = f"{scheme}://{host}" if default else f"{scheme}://{host}:{uri.port}"
    guesses = [own, f"{scheme}://localhost:{uri.port}", "http://localhost:3000"]
    guesses += ["http://localhost:8080", "http://localhost:5173", "http://localhost"]
    return list(dict.fromkeys(guesses))


async def _allowed_origin(ctx: ScanContext) -> str:
    """Without --origin-allowed: an Origin the endpoint accepts while it refuses a foreign
    one (N/A when it accepts any, or none of the usual ones)."""
    ctx.rotate()
    state, how = await settle(ctx, await ctx.connect(origin=FOREIGN))
    if state in ("accepted", "silent"):
        raise NotApplicable("any Origin is accepted (origin.foreign): no allowlist to resemble")
    for origin in _candidates(ctx):
        ctx.rotate()
        state, _ = await settle(ctx, await ctx.connect(origin=origin))
        if state == "accepted":
            return origin
    raise NotApplicable(
        f"a foreign Origin is refused ({how}) and none of {len(_candidates(ctx))} usual ones is "
        "allowed: give --origin-allowed",
        needs="--origin-allowed",
    )


@check(
    "origin.lookalike",
    "Origins that only resemble the allowed one are refused",
    group="origin",
    references=REFS,
    remedy="Compare the whole origin (scheme, host, port) exactly; no prefix, suffix or "
    "substring matching.",
)
async def lookalike(ctx: ScanContext) -> Finding:
    allowed = ctx.options.origin_allowed
    if not allowed:
        await require_baseline(ctx)  # refusals for want of a credential say nothing
        allowed = await _allowed_origin(ctx)
    await require_baseline(ctx, origin=allowed)
    return await try_handshakes(
        ctx,
        [(f"Origin: {o}", {"origin": o}) for o in lookalikes(allowed)],
        refused_means="the allowlist is matched exactly",
        accepted_means="the allowlist is matched loosely",
    )


@check(
    "origin.cookie",
    "Cookie-authenticated connections from a foreign Origin are refused",
    group="origin",
    references=REFS,
    remedy="With cookie authentication, require Origin and check it; add SameSite cookies "
    "(wsguard: auth.cookie refuses a missing Origin).",
)
async def cookie(ctx: ScanContext) -> Finding:
    if not ctx.options.cookies:
        raise NotApplicable(
            "needs --cookie (the session cookie a browser would send), if the endpoint "
            "authenticates with one",
            needs="--cookie",
        )
    ctx.rotate()
    cookies = ctx.options.cookies
    result = await ctx.connect(token=None, cookies=cookies)
    state, how = await settle(ctx, result)
    if state != "accepted":
        raise NotApplicable(f"the cookie alone does not authenticate ({how})")
    return await try_handshakes(
        ctx,
        [
            (f"cookie + Origin: {FOREIGN}", {"token": None, "cookies": cookies, "origin": FOREIGN}),
            ("cookie + Origin: null", {"token": None, "cookies": cookies, "origin": "null"}),
        ],
        refused_means="cross-site pages cannot ride the cookie",
        accepted_means="any web page can act as its logged-in visitors",
    )
