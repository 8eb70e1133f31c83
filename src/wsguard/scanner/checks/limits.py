"""Floods and connection limits: are they there, do they reset, can they be dodged?"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import dataclass, field

from wsguard.scanner.checks.common import require_baseline
from wsguard.scanner.context import (
    THROTTLED,
    CheckError,
    Inconclusive,
    NotApplicable,
    Outcome,
    ScanContext,
    judge,
    settle,
    throttled,
)
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import Handshake, Session

#: closes that refuse what a message is (protocol error, unsupported data, invalid data),
#: never how many there were
_REFUSES_THE_CONTENT = frozenset({1002, 1003, 1007})

RATE_REFS = (f"{OWASP}: Rate Limiting / DoS Protection", "ASVS 5.0 V2.4.1")
CONN_REFS = (f"{OWASP}: Connection Limits / DoS Protection", "RFC 6455 §10.4")


async def _flood(ctx: ScanContext, session: Session) -> tuple[int, Outcome, float]:
    """Pipeline up to flood_count pings (with no application ping: small messages); count
    answers until all came, a refusal, or a quiet reply_timeout. Answers are matched by id
    when they carry one, else counted by kind (or, with no ping at all, any reply counts).
    Returns (answered, outcome, seconds)."""
    dialect = ctx.dialect
    count = ctx.options.flood_count
    base = 700_000
    started = time.monotonic()
    pending = {str(base + i) for i in range(count)}
    outcome = Outcome()
    for start in range(0, count, 50):
        for i in range(start, min(count, start + 50)):
            await session.send_text(dialect.filler(base + i))
        if session.closed:
            break
    answered = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.options.reply_timeout * 4
    while answered < count and loop.time() < deadline:
        event = await session.next_event(min(ctx.options.reply_timeout, deadline - loop.time()))
        if event is None:
            break
        if event.kind == "close":
            outcome.close = event
            break
        if event.kind not in ("text", "binary"):
            continue
        if ctx.classify(event.text) == "error":
            outcome.errors.append(event.text)
            ctx.record("error frame", event.text)
            continue
        if dialect.mode == "echo":
            ident = dialect.answer_id(event.text)
            if ident in pending:
                pending.discard(ident)
                answered += 1
        elif dialect.mode == "control" or dialect.is_pong(event.text):
            answered += 1
    return answered, outcome, time.monotonic() - started


@check(
    "flood.rate_limit",
    "A message flood is throttled, and the limit resets",
    group="limits",
    references=RATE_REFS,
    remedy="Rate-limit messages per connection and per user with a bucket that refills "
    "(wsguard: limits.messages_per_minute, message_burst, violation_budget).",
    aggressive=True,
    budget_seconds=120.0,
)
async def flood(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    session = await ctx.open()
    try:
        answered, outcome, seconds = await _flood(ctx, session)
    finally:
        await session.close()
    count = ctx.options.flood_count
    if outcome.close is not None and outcome.close.code == 1011:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"after {answered} answered: {outcome.describe()} — a server error, not a limit",
        )
    if not outcome.refused and answered >= count:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"all {count} pipelined pings answered in {seconds:.1f}s, none refused: no rate limit",
        )
    if not outcome.refused and ctx.dialect.mode == "control" and answered == 0:
        raise Inconclusive(
            f"{count} messages sent, none refused, none answered: the endpoint answers no "
            "application message, so what it processed cannot be counted"
        )
    if not outcome.refused:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"{answered} of {count} pipelined pings answered in {seconds:.1f}s and none "
            "refused: throttled silently, or just slow",
        )
    how = outcome.describe()
    close = outcome.close
    if not throttled(outcome) and (
        answered == 0 or (close is not None and close.code in _REFUSES_THE_CONTENT)
    ):
        # a limit lets some through first; a close for what was sent (its kind, its
        # framing, its encoding) says nothing about how much was sent
        raise Inconclusive(
            f"refused after {answered} answered: {how} — a refusal of the messages "
            "themselves, not of their rate (give a message the endpoint takes: "
            "--ping-message)"
        )
    # does it reset? a new connection from the same address, backing off, bounded
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = 0.5
    last = ""
    while loop.time() - started < ctx.options.reset_wait:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 4.0)
        result = await ctx.connect()
        if result.session is None:
            last = result.describe()
            continue
        probe = await ctx.barrier(result.session)
        await result.session.close()
        if probe.answered and not probe.errors:
            return finding(
                ctx.check_id,
                Verdict.PASS,
                f"refused after {answered} answered: {how}; accepted again "
                f"{loop.time() - started:.1f}s later",
            )
        last = probe.describe()
    return finding(
        ctx.check_id,
        Verdict.WARN,
        f"refused after {answered} answered: {how}; still refused "
        f"{ctx.options.reset_wait:g}s later ({last}) — does the limit ever reset?",
    )


@dataclass(slots=True)
class Held:
    """Connections held open from one address; released on every path (``async with``)."""

    sessions: list[Session] = field(default_factory=list)
    refusal: str | None = None  # how the first excess connection was refused
    refused_at: int = 0

    async def release(self) -> None:
        sessions, self.sessions = self.sessions, []
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def __aenter__(self) -> Held:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


def _descriptors_for(count: int) -> None:
    """Holding ``count`` connections needs file descriptors: raise the soft limit if the
    hard one allows, else refuse to mistake our own EMFILE for the target's limit."""
    needed = count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise CheckError(
        f"--max-connections {count} needs {needed} file descriptors; this process may open "
        f"{hard} (ulimit -n): lower --max-connections"
    )


async def _fill(ctx: ScanContext, held: Held) -> None:
    """Open connections from one address until one is refused (or max_connections). A
    refusal counts as the limit only if the next attempt, with every connection still
    held, is refused too: a connection dropped at random (a flaky target, a restart) is
    no limit, and is replaced."""
    _descriptors_for(ctx.options.max_connections)
    flukes = 0
    n = 0
    while len(held.sessions) < ctx.options.max_connections:
        n += 1
        refusal = await _one_more(ctx, held, n)
        if refusal is None:
            continue
        confirmed = await _one_more(ctx, held, n + 1)
        if confirmed is not None:
            held.refusal, held.refused_at = refusal, n
            return
        n += 1
        flukes += 1
        if flukes > max(3, ctx.options.max_connections // 2):
            raise Inconclusive(
                f"{flukes} connections failed and the next one was accepted each time "
                f"(the last: {refusal}): the target drops connections, not at a limit"
            )


async def _one_more(ctx: ScanContext, held: Held, n: int) -> str | None:
    """Open connection *n* and hold it: None when upgraded and answering, else how it
    was refused."""
    result: Handshake = await ctx.connect()
    if result.session is None:
        answer = judge(result)
        if answer != "refused" and result.status not in THROTTLED:
            raise Inconclusive(
                f"connection {n} failed ({result.describe()}): cannot tell a limit from a failure"
            )
        return result.describe()
    held.sessions.append(result.session)  # released by the caller, whatever happens
    outcome = await ctx.barrier(result.session)
    if outcome.close is not None:
        held.sessions.remove(result.session)  # closed by the target: not held
        await result.session.close()
        return f"upgraded, then {outcome.describe()}"
    if not outcome.answered:
        raise Inconclusive(f"connection {n} did not answer a ping: {outcome.describe()}")
    return None


@check(
    "conns.limit",
    "Excess concurrent connections from one client are refused",
    group="limits",
    references=CONN_REFS,
    remedy="Cap concurrent connections per address and per user, before the upgrade "
    "(wsguard: limits.connections_per_address, connections_per_subject).",
    aggressive=True,
    budget_seconds=120.0,
)
async def connection_limit(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    async with Held() as held:
        await _fill(ctx, held)
        if held.refusal is None:
            return finding(
                ctx.check_id,
                Verdict.FAIL,
                f"{len(held.sessions)} concurrent connections from one address all accepted",
            )
        verdict = Verdict.WEAK if held.refusal.startswith("upgraded") else Verdict.PASS
        return finding(
            ctx.check_id, verdict, f"connection {held.refused_at} refused: {held.refusal}"
        )


@check(
    "conns.release",
    "Connection slots come back after a close",
    group="limits",
    references=CONN_REFS,
    remedy="Release the slot in a finally block (or a lease with a TTL in a shared store); "
    "counts that never go down lock users out.",
    aggressive=True,
    budget_seconds=120.0,
)
async def connection_release(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    async with Held() as held:
        await _fill(ctx, held)
    if held.refusal is None:
        raise NotApplicable("no connection limit was reached (conns.limit)")
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = 0.1
    last = ""
    while True:
        result = await ctx.connect()
        if result.session is not None:
            try:
                outcome = await ctx.barrier(result.session)
            finally:
                await result.session.close()
            if outcome.answered:
                return finding(
                    ctx.check_id,
                    Verdict.PASS,
                    f"limit reached at connection {held.refused_at} ({held.refusal}); after "
                    f"closing them, a new one was accepted {loop.time() - started:.1f}s later",
                )
            last = outcome.describe()
        else:
            last = result.describe()
        remaining = ctx.options.reset_wait - (loop.time() - started)
        if remaining <= 0:
            break
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 3.0)
    return finding(
        ctx.check_id,
        Verdict.FAIL,
        f"after closing every connection, a new one is still refused "
        f"{ctx.options.reset_wait:g}s later ({last}): slots leak (or a connection-rate limit "
        "slower than --reset-wait)",
    )


SPOOF_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded", "True-Client-IP", "CF-Connecting-IP")


@check(
    "address.spoofing",
    "X-Forwarded-For and friends do not reset per-address limits",
    group="limits",
    references=(*CONN_REFS, "OWASP: IP address spoofing via headers"),
    remedy="Use the peer address; read forwarding headers only from trusted proxies, "
    "right to left (wsguard: proxy.trusted).",
    aggressive=True,
    budget_seconds=120.0,
)
async def spoofing(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    lines: list[str] = []
    bypassed: list[str] = []
    async with Held() as held:
        await _fill(ctx, held)
        if held.refusal is None:
            raise NotApplicable("no per-address limit was reached to test against (conns.limit)")
        for name in SPOOF_HEADERS:
            await _still_at_limit(ctx, held)
            fake = f"198.51.100.{random.randint(1, 254)}"  # noqa: S311 - not a secret
            value = f"for={fake}" if name == "Forwarded" else fake
            result = await ctx.connect(headers=[(name, value)])
            state, how = await settle(ctx, result)
            lines.append(f"{name}: {value}: {how}")
            if state in ("accepted", "silent"):
                bypassed.append(f"{name}: {value}")
            elif state == "inconclusive" and result.status not in THROTTLED:
                raise Inconclusive(f"{name}: {value}: {how} — cannot judge")  # 429: the limit
    if bypassed:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"connection {held.refused_at} was refused ({held.refusal}), but accepted with "
            f"{'; '.join(bypassed)}: the client chooses its own address",
            *lines,
        )
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"at the limit ({held.refusal}), {len(SPOOF_HEADERS)} forwarding headers did not help",
        *lines,
    )


async def _still_at_limit(ctx: ScanContext, held: Held) -> None:
    """A control attempt without the header: it must be refused, or a bypass proves
    nothing (a limit that refills, a slot freed meanwhile)."""
    for _ in range(2):
        result = await ctx.connect()
        if result.session is None:
            if judge(result) == "inconclusive" and result.status not in THROTTLED:
                raise Inconclusive(f"control attempt: {result.describe()} — cannot judge")
            return
        held.sessions.append(result.session)  # a slot came free: hold it, try again
    raise Inconclusive("the limit does not hold steadily (it refills?): cannot test spoofing")
