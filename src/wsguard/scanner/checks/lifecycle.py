"""Time on the target's side: token expiry on open sockets, slow handshakes, idle peers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import jwt

from wsguard.scanner.checks.common import require_auth, require_baseline
from wsguard.scanner.context import Inconclusive, NotApplicable, Outcome, ScanContext
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import host_header, open_stream

TOKEN_LIFETIME = 2.0  # seconds: the short-lived token token.expiry mints


@check(
    "token.expiry",
    "A connection does not outlive its token",
    group="lifecycle",
    references=(f"{OWASP}: Authentication (token expiry)", "ASVS 5.0 V7.3.1"),
    remedy="Close the connection when the token expires, or require an in-band refresh "
    '(wsguard closes with 4001 and accepts {"type": "auth"} refreshes).',
    budget_seconds=90.0,
)
async def token_expiry(ctx: ScanContext) -> Finding:
    await require_auth(ctx)
    given: str | None = None
    if not ctx.credentials.can_mint and ctx.credentials.token is not None:
        exp = _exp_of(ctx.credentials.token)
        if exp is not None and 0 < exp - time.time() < ctx.options.expiry_wait:
            given = ctx.credentials.token
        else:
            raise NotApplicable(
                "needs --jwt-secret (to mint a short-lived token) or a token expiring within "
                f"--expiry-wait ({ctx.options.expiry_wait:g}s)",
                needs="--jwt-secret",
            )
    elif not ctx.credentials.can_mint:
        raise NotApplicable(
            "needs --jwt-secret (to mint a short-lived token)", needs="--jwt-secret"
        )
    await require_baseline(ctx)
    token = given or ctx.credentials.mint(exp_in=TOKEN_LIFETIME)  # minted just before use
    assert token is not None
    exp = _exp_of(token) or time.time()
    ctx.rotate()
    session = await ctx.open(token=token)
    deadline = exp + min(10.0, ctx.options.expiry_wait)
    outcome = Outcome()
    try:
        # a ping every second: an idle timeout must not pass for an expiry check
        while time.time() < deadline and outcome.close is None:
            if await session.closed_within(min(1.0, max(0.0, deadline - time.time()))):
                outcome.close = session.close_event
                break
            outcome = await ctx.barrier(session, wait=1.0)
    finally:
        await session.close()
    if outcome.close is not None:
        late = time.time() - exp
        reason = f" {outcome.close.reason!r}" if outcome.close.reason else ""
        if late < -0.5:
            raise Inconclusive(
                f"closed {outcome.close.code}{reason} {-late:.1f}s before exp — not about the "
                "token (a lifetime limit?); cannot judge"
            )
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"closed {outcome.close.code}{reason} {max(late, 0):.1f}s after exp",
        )
    overdue = time.time() - exp
    if outcome.answered and not outcome.errors:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"still open and answering {overdue:.0f}s after the token expired: a revoked or "
            "stolen token keeps working as long as the socket lives",
        )
    return finding(
        ctx.check_id,
        Verdict.WEAK,
        f"still open {overdue:.0f}s after exp, but messages are refused ({outcome.describe()})",
    )


def _exp_of(token: str) -> float | None:
    with contextlib.suppress(jwt.PyJWTError):
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        if isinstance(exp, int | float):
            return float(exp)
    return None


@check(
    "handshake.timeout",
    "A client sending its handshake slowly is cut off",
    group="handshake",
    references=(f"{OWASP}: DoS Protection", "Slowloris"),
    remedy="Bound the time to complete the handshake (wsguard: "
    "limits.handshake_timeout_seconds; websockets: open_timeout).",
    budget_seconds=330.0,
)
async def slow_headers(ctx: ScanContext) -> Finding:
    ctx.rotate()
    reader, writer = await open_stream(ctx.endpoint)
    uri = ctx.target.uri
    started = time.monotonic()
    limit = ctx.options.slow_wait
    try:
        writer.write(f"GET {uri.resource_name} HTTP/1.1\r\nHost: {host_header(uri)}\r\n".encode())
        await writer.drain()
        n = 0
        while time.monotonic() - started < limit:
            try:
                data = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                n += 1
                writer.write(f"X-Wsguard-Audit-{n}: {'a' * 8}\r\n".encode())
                try:
                    await writer.drain()
                except (OSError, ConnectionError):
                    break
                continue
            except (OSError, ConnectionError):
                break
            status = data.split(b"\r\n", 1)[0].decode("latin-1", "replace") if data else ""
            elapsed = time.monotonic() - started
            answer = f" with {status!r}" if status else ""
            return finding(
                ctx.check_id,
                Verdict.PASS,
                f"closed{answer} after {elapsed:.1f}s of one header line a second",
            )
        else:
            return finding(
                ctx.check_id,
                Verdict.FAIL,
                f"still waiting after {limit:g}s of one header line a second: a few hundred "
                "slow clients hold every slot (a cut-off later than that is too late to "
                "matter; --slow-wait waits longer to see when it comes)",
            )
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"connection reset after {time.monotonic() - started:.1f}s of slow headers",
        )
    finally:
        writer.close()


@check(
    "liveness.heartbeat",
    "Idle or dead peers are detected (pings or an idle timeout)",
    group="lifecycle",
    references=(f"{OWASP}: DoS Protection", "RFC 6455 §5.5.2"),
    remedy="Send pings and close peers that do not answer (wsguard: "
    "liveness.ping_interval_seconds, ping_timeout_seconds, idle_timeout_seconds).",
    budget_seconds=330.0,
)
async def heartbeat(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    session = await ctx.open()
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < ctx.options.idle_wait:
            event = await session.next_event(ctx.options.idle_wait - elapsed)
            if event is None:
                break
            if event.kind == "ping":
                return finding(
                    ctx.check_id,
                    Verdict.PASS,
                    f"the server pinged an idle connection after {time.monotonic() - started:.1f}s",
                )
            if event.kind == "close":
                return finding(
                    ctx.check_id,
                    Verdict.PASS,
                    f"the server closed an idle connection after "
                    f"{time.monotonic() - started:.1f}s ({event.code})",
                )
    finally:
        await session.close()
    return finding(
        ctx.check_id,
        Verdict.WARN,
        f"no ping and no idle close in {ctx.options.idle_wait:g}s: dead peers hold their "
        "slots until TCP gives up (raise --idle-wait if the interval is longer)",
    )
