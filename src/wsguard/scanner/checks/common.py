"""Helpers the checks share: judging a list of hostile handshakes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from websockets.frames import Opcode

from wsguard.scanner.context import (
    CheckError,
    Inconclusive,
    NotApplicable,
    Outcome,
    ScanContext,
    settle,
)
from wsguard.scanner.model import Finding, Verdict, finding
from wsguard.scanner.probe import Session, frame_bytes

RETRIES = (1.0, 2.0)  # back-off before retrying an inconclusive handshake


async def try_handshakes(
    ctx: ScanContext,
    variants: Sequence[tuple[str, dict[str, object]]],
    *,
    refused_means: str,
    accepted_means: str,
    credential: bool = False,
) -> Finding:
    """Each variant is a label and ``ctx.connect`` arguments; every one must be refused
    before the upgrade. Accepted: FAIL; refused only after the upgrade, or upgraded with
    nothing past the upgrade to see (an endpoint whose protocol the scan cannot speak):
    WEAK; a variant
    that got no judgement (timeout, 5xx, 429) even after retries: INCONCLUSIVE, never PASS.

    *credential*: the variants differ in the credential only. When it goes in the first
    message (``--token-in message:JSON``), its refusal can only come after the upgrade:
    a close or an error about authentication is then the refusal looked for."""
    in_band = credential and ctx.in_band
    accepted: list[str] = []
    late: list[str] = []
    silent: list[str] = []  # upgraded, and nothing past the upgrade could be seen
    unjudged: list[str] = []
    lines: list[str] = []
    refusals: set[str] = set()
    for label, kwargs in variants:
        for delay in (0.0, *RETRIES):
            if delay:
                await asyncio.sleep(delay)
            ctx.rotate()  # a fresh source (loopback): a ban on one variant hides no other
            result = await ctx.connect(**kwargs)  # type: ignore[arg-type]
            state, how = await settle(ctx, result)
            if state != "inconclusive":
                break
        if state == "inconclusive" and result.error == "timeout":
            # no answer at all, even after retries: the scan could not do its work here
            raise CheckError(f"{label}: {how}, even after {len(RETRIES)} retries")
        lines.append(f"{label}: {how}")
        if state == "accepted":
            accepted.append(label)
        elif state == "late" and in_band:
            refusals.add(how)
        elif state == "late":
            late.append(label)
        elif state == "silent":
            silent.append(f"{label} ({how})")
        elif state == "inconclusive":
            unjudged.append(f"{label}: {how}")
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
    if silent and in_band:
        # kept open and silent says something only if the scan's own credential works
        await _refusals_are_about_the_variants(ctx, set(), in_band=True)
        return finding(
            ctx.check_id,
            Verdict.WEAK,
            f"not refused: {'; '.join(silent)} — the connection is kept open, its messages "
            "unanswered: close a connection whose credential is refused or missing",
            *lines,
        )
    if silent:
        return finding(
            ctx.check_id,
            Verdict.WEAK,
            f"upgraded, not refused before the upgrade: {'; '.join(silent)} — whether it is "
            "refused later cannot be seen without a message the endpoint answers "
            "(--ping-message)",
            *lines,
        )
    if unjudged:
        raise Inconclusive(
            f"{len(unjudged)} of {len(variants)} could not be judged ({'; '.join(unjudged)}); "
            "none accepted so far"
        )
    await _refusals_are_about_the_variants(ctx, refusals, in_band=in_band)
    if in_band:
        means = refused_means.replace(" before the upgrade", "").replace(" before upgrading", "")
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"{len(variants)} of {len(variants)} refused (the credential in the first message): "
            f"{', '.join(sorted(refusals))} — {means}",
            *lines,
        )
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"{len(variants)} of {len(variants)} refused before the upgrade "
        f"({', '.join(sorted(refusals))}) — {refused_means}",
        *lines,
    )


async def _refusals_are_about_the_variants(
    ctx: ScanContext, refusals: set[str], *, in_band: bool = False
) -> None:
    """Every variant was refused before the upgrade: that says something about what the
    variants changed only if the scan's own handshake (its credential, Origin,
    subprotocol and path) is upgraded. A target that refuses that one too (an Origin
    allowlist, a required subprotocol, a wrong path, a redirect) refused for another
    reason: INCONCLUSIVE, saying what to give. Without a credential there is no own
    handshake to compare with: where the own handshake is refused 401 (a credential is
    required), a 401, or a 400 or 431 for a credential too big or malformed to read, is a
    refusal of the credential; any other refusal is not judged."""
    ctx.rotate()
    control = await ctx.connect()
    if in_band and control.session is not None:
        # upgraded whatever the credential: the scan's own must be accepted after it
        state, how = await settle(ctx, control)
        if state == "accepted":
            return
        raise Inconclusive(
            f"the scan's own credential, in the first message, is refused too ({how}): the "
            "refusals say nothing about what the probes changed; give a token the endpoint "
            "accepts and the message it expects (--token-in message:JSON)"
        )
    if control.session is not None:
        await control.session.close()
    if control.status == 101:
        return
    status = control.status
    if ctx.credentials.token is None and (
        refusals == {"HTTP 401"}
        or (status == 401 and refusals <= {"HTTP 401", "HTTP 400", "HTTP 431"})
    ):
        return
    if status == 403:
        hint = (
            "if the endpoint checks Origin, give --origin-allowed; if it needs a credential, "
            "--token or --jwt-secret"
        )
    elif status == 400:
        hint = "a required subprotocol (--subprotocol) or header (--header)?"
    elif status == 404:
        hint = "is the URL's path the endpoint's?"
    elif status is not None and 300 <= status < 400:
        hint = "it redirects: scan the URL it redirects to"
    elif status == 401 and ctx.credentials.token is None:
        hint = "the endpoint requires a credential: give --token or --jwt-secret"
    elif status == 401:
        hint = "the credential given is refused too: give one the endpoint accepts"
    else:
        hint = "give what the endpoint needs (--token, --origin-allowed, --subprotocol)"
    raise Inconclusive(
        f"the scan's own handshake is refused too ({control.describe()}): the refusals say "
        f"nothing about what the probes changed; {hint}"
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
        if ctx.credentials.token is None and ("HTTP 401" in str(exc) or "HTTP 403" in str(exc)):
            raise NotApplicable(
                f"needs a credential (--token, --token-cmd or --jwt-secret): {exc}",
                needs="--jwt-secret or --token",
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


Payload = tuple[str, bytes | str, bool]  # label, data, binary (bytes sent as text: raw frame)


async def exchange_all(
    ctx: ScanContext, payloads: Sequence[tuple[bytes | str, bool]]
) -> list[Outcome]:
    """Send each payload (data, binary), each followed by a ping barrier, on a working
    connection: a new one (from a new source) after the target closed the last. Bytes sent
    as text go out as a hand-made frame, so they can be invalid UTF-8."""
    outcomes: list[Outcome] = []
    session: Session | None = None
    try:
        for data, binary in payloads:
            if session is None or session.closed:
                ctx.rotate()
                session = await ctx.open()
            if isinstance(data, bytes) and not binary:
                await session.send_raw(frame_bytes(Opcode.TEXT, data))
                outcomes.append(await ctx.barrier(session))
            else:
                outcomes.append(await ctx.exchange(session, data, binary=binary))
    finally:
        if session is not None:
            await session.close()
    return outcomes
