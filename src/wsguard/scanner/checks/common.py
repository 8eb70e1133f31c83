"""Helpers the checks share: judging a list of hostile handshakes."""

from __future__ import annotations

from collections.abc import Sequence

from wsguard.scanner.context import CheckError, NotApplicable, ScanContext, settle
from wsguard.scanner.model import Finding, Verdict, finding

# statuses that mean "slow down / go away" rather than "no"
THROTTLED = frozenset({429, 503})


async def try_handshakes(
    ctx: ScanContext,
    variants: Sequence[tuple[str, dict[str, object]]],
    *,
    refused_means: str,
    accepted_means: str,
) -> Finding:
    """Each variant is a label and ``ctx.connect`` arguments; every one must be refused
    before the upgrade. Accepted: FAIL; refused only after the upgrade: WEAK."""
    accepted: list[str] = []
    late: list[str] = []
    throttled: list[str] = []
    lines: list[str] = []
    refusals: set[str] = set()
    for label, kwargs in variants:
        ctx.rotate()  # a fresh source (loopback), so a ban on one variant hides no other
        result = await ctx.connect(**kwargs)  # type: ignore[arg-type]
        state, how = await settle(ctx, result)
        lines.append(f"{label}: {how}")
        if state == "accepted":
            accepted.append(label)
        elif state == "late":
            late.append(label)
        elif result.status in THROTTLED:
            throttled.append(label)
        else:
            refusals.add(how)
    if accepted:
        return finding(
            ctx.check_id, Verdict.FAIL, f"accepted {'; '.join(accepted)} — {accepted_means}", *lines
        )
    if late:
        return finding(
            ctx.check_id,
            Verdict.WEAK,
            f"refused only after the upgrade: {'; '.join(late)}",
            *lines,
        )
    if throttled and not refusals:
        raise CheckError(
            "every attempt was throttled (HTTP 429/503) before its credential was judged; "
            "scan from loopback or wait out the ban"
        )
    count = len(variants) - len(throttled)
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"{count} of {len(variants)} refused before the upgrade ({', '.join(sorted(refusals))})"
        f" — {refused_means}",
        *lines,
    )


async def require_auth(ctx: ScanContext) -> None:
    """N/A when the endpoint needs no credential at all: auth.required reports that."""
    ctx.rotate()
    result = await ctx.connect(token=None)
    state, _ = await settle(ctx, result)
    if state == "accepted":
        raise NotApplicable(
            "the endpoint accepts connections without any credential (auth.required)"
        )


async def require_baseline(ctx: ScanContext, **kwargs: object) -> None:
    """The scan's own connection must work, or nothing else can be judged. Without a
    credential, an endpoint that needs none still gets every check."""
    ctx.rotate()
    try:
        session = await ctx.open(**kwargs)
    except CheckError as exc:
        if ctx.credentials.token is None:
            raise NotApplicable(
                f"needs a credential (--token, --token-cmd or --jwt-secret): {exc}"
            ) from None
        if "HTTP 403" in str(exc) and ctx.options.origin_allowed is None:
            raise CheckError(
                f"{exc}; if the endpoint requires an Origin, give --origin-allowed"
            ) from None
        raise
    await session.close()


def tally(outcomes: Sequence[str]) -> str:
    """'5 sent: 3x HTTP 400, 2x HTTP 431' (or the one outcome)."""
    if len(outcomes) == 1:
        return outcomes[0]
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return f"{len(outcomes)} sent: " + ", ".join(f"{n}x {o}" for o, n in ranked)
