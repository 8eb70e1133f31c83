"""What the target does with hostile messages: malformed, oversized, compressed, replayed."""

from __future__ import annotations

import secrets
import time
import zlib
from collections.abc import Sequence

import orjson
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode

from wsguard.scanner.checks.common import Payload, exchange_all, require_baseline, tally
from wsguard.scanner.context import (
    CheckError,
    Inconclusive,
    NotApplicable,
    Outcome,
    ScanContext,
    about_authentication,
    short,
    throttled,
)
from wsguard.scanner.dialect import KIND_KEYS
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import frame_bytes, frame_header

INPUT_REFS = (f"{OWASP}: Input Validation", "ASVS 5.0 V2.2.1", "RFC 6455 §8.1, §10.7")
SIZE_REFS = (f"{OWASP}: Message Size Limits / DoS Protection", "RFC 6455 §10.4")
KIB = 1024
PACE = 0.005  # seconds to let a close overtake the next chunk, so "after N bytes" is true
MIB = 1024 * KIB


def _verdict_for(outcome: Outcome) -> Verdict | None:
    """FAIL for a server error, a dropped connection or a connection that stopped
    answering; None when handled."""
    if outcome.close is not None and outcome.close.code in (1011, 1006):
        return Verdict.FAIL
    if not outcome.refused and not outcome.answered:
        return Verdict.FAIL  # neither refused nor answered: the connection is stuck
    return None


def refusal(outcome: Outcome) -> str:
    """For a big or hostile message: "crash" (1011), "refused", "throttled" (only
    slow-down errors: nothing judged), "accepted" (answered) or "silent"."""
    if outcome.close is not None:
        return "crash" if outcome.close.code == 1011 else "refused"
    if outcome.errors:
        return "refused" if not all_throttled(outcome) else "throttled"
    return "accepted" if outcome.answered else "silent"


def all_throttled(outcome: Outcome) -> bool:
    return all(throttled(Outcome(errors=[error])) for error in outcome.errors)


async def judged(ctx: ScanContext, what: str, outcome: Outcome) -> str:
    """``refusal`` plus the verdicts every size check shares: a 1011 or a target that no
    longer serves is a FAIL (raised as a finding), nothing judged is an ERROR."""
    kind = refusal(outcome)
    if kind == "crash":
        raise Failed(f"{what}: {outcome.describe()} — a server error, not a limit")
    if kind in ("throttled", "silent"):
        raise Inconclusive(f"{what}: {outcome.describe()} — {_UNJUDGED[kind]}")
    return kind


_UNJUDGED = {
    "throttled": "refused as if throttled (slow down), not for its size: cannot judge the "
    "size limit",
    "silent": "neither refused nor answered in time: cannot judge the size limit",
}


class Failed(Exception):
    """A check found a flaw on the way (the verdict becomes FAIL with this message)."""


async def still_serving(ctx: ScanContext, after: str) -> None:
    alive, how = await ctx.alive()
    if not alive:
        raise Failed(f"after {after}, the target stopped serving ({how})")


async def _malformed(ctx: ScanContext, payloads: Sequence[Payload]) -> Finding:
    """Send each payload on a usable connection (reopened after a close); the target must
    answer with an error or a policy close, never 1011 or a dropped connection, and must
    still accept connections afterwards."""
    await require_baseline(ctx)
    results = await exchange_all(ctx, [(data, binary) for _, data, binary in payloads])
    lines = [f"{label}: {o.describe()}" for (label, _, _), o in zip(payloads, results, strict=True)]
    failed = [
        line for line, o in zip(lines, results, strict=True) if _verdict_for(o) is Verdict.FAIL
    ]
    alive, how = await ctx.alive()
    if not alive:
        failed.append(f"afterwards a new connection failed: {how}")
    if failed:
        return finding(ctx.check_id, Verdict.FAIL, "; ".join(failed), *lines)
    if all(about_authentication(o) for o in results):
        raise Inconclusive(
            f"every message was refused for authentication ({results[0].describe()}): the "
            "endpoint authenticates in its protocol, after the upgrade, so how it handles "
            "these was not seen"
        )
    taken = [
        f"{label}: {_answer(o)}"
        for (label, data, _), o in zip(payloads, results, strict=True)
        if label not in LENIENT and _taken(ctx, o, data)
    ]
    if taken:
        return finding(
            ctx.check_id,
            Verdict.WEAK,
            f"answered as if valid, with no error frame and no close: {'; '.join(taken)} — "
            "malformed input is processed rather than refused",
            *lines,
        )
    return finding(ctx.check_id, Verdict.PASS, tally([o.describe() for o in results]), *lines)


def _taken(ctx: ScanContext, outcome: Outcome, data: str | bytes) -> bool:
    """Was this malformed input answered as if it were valid: no error frame, no close,
    and a message back (its echo, an answer)? With no application ping (ping frames as the
    barrier) only its echo counts: other messages may be the target's own pushes."""
    if outcome.refused or not outcome.answered or not outcome.replies:
        return False
    if ctx.dialect.mode != "control":
        return True
    sent = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return sent in outcome.replies


def _answer(outcome: Outcome) -> str:
    return f"answered {short(outcome.replies[0], 60)}"


REMEDY_INPUT = (
    "Parse defensively: catch every decoding error, bound depth and size before parsing, "
    "answer an error frame (or close 1003/1007/1008), never let a handler error close 1011."
)
# JSON extensions many parsers take (NaN, an escaped lone surrogate): a ping that holds one,
# answered as a ping, is leniency, not malformed input processed
LENIENT = frozenset({"NaN literal", "lone surrogate"})
DEPTH = 3000  # 6 KB of nested arrays: under common size limits, far over any sane depth
# check id -> title, payloads (label, data, binary; bytes sent as text: a hand-made frame)
MALFORMED: dict[str, tuple[str, tuple[Payload, ...]]] = {
    "malformed.json": (
        "Invalid JSON is handled",
        (
            ("truncated JSON", '{"type": "ping", "id": ', False),
            ("not JSON", "wsguard-audit: hello", False),
            ("NaN literal", '{"type": "ping", "x": NaN}', False),
            ("lone surrogate", '{"type": "ping", "x": "\\ud800"}', False),
        ),
    ),
    "malformed.non_object": (
        "JSON that is not an object is handled",
        (
            ("array", "[1, 2, 3]", False),
            ("string", '"ping"', False),
            ("number", "42", False),
            ("null", "null", False),
            ("type not a string", '{"type": {"$ne": null}}', False),
        ),
    ),
    "malformed.nesting": (
        "Deeply nested JSON is handled",
        (
            (f"{DEPTH} nested arrays", "[" * DEPTH + "]" * DEPTH, False),
            (
                "1000 nested objects in a ping",
                '{"type": "ping", "x": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}",
                False,
            ),
        ),
    ),
    "malformed.binary": (
        "Unexpected binary frames are handled",
        (
            ("binary frame", b"\x00\x01\x02wsguard-audit\xff", True),
            ("binary JSON", orjson.dumps({"type": "ping", "id": "b"}), True),
        ),
    ),
}


def _register_malformed(check_id: str, title: str, payloads: tuple[Payload, ...]) -> None:
    async def run(ctx: ScanContext) -> Finding:
        return await _malformed(ctx, payloads)

    check(check_id, title, group="messages", references=INPUT_REFS, remedy=REMEDY_INPUT)(run)


for _id, (_title, _payloads) in MALFORMED.items():
    _register_malformed(_id, _title, _payloads)


@check(
    "malformed.utf8",
    "Text frames with invalid UTF-8 are refused",
    group="messages",
    references=INPUT_REFS,
    remedy="Close with 1007 (RFC 6455 §8.1); websockets does this.",
)
async def invalid_utf8(ctx: ScanContext) -> Finding:
    result = await _malformed(ctx, [("invalid UTF-8 text frame", b'{"type": "\xff\xfe"}', False)])
    if result.verdict is Verdict.PASS and "closed 1007" not in result.evidence:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"{result.evidence} — RFC 6455 §8.1 requires closing with 1007",
        )
    return result


def _padded_ping(ctx: ScanContext, size: int) -> str:
    """A valid ping (with no application ping: a small message), padded with JSON whitespace
    to exactly ``size`` bytes."""
    ping = ctx.dialect.filler(990_000 + size % 1000)
    return " " * max(0, size - len(ping.encode())) + ping


@check(
    "size.limit",
    "Messages just over common limits are refused",
    group="size",
    references=SIZE_REFS,
    remedy="Set a message size limit that fits the protocol (wsguard: limits.max_message_bytes,"
    " 8 KiB by default).",
    aggressive=True,
)
async def size_limit(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    lines: list[str] = []
    first_refused: int | None = None
    try:
        for size in (64 * KIB + 1, MIB + 1):
            ctx.rotate()
            session = await ctx.open()
            try:
                with ctx.oversized():
                    await session.send_text(_padded_ping(ctx, size))
                    outcome = await ctx.barrier(session, wait=max(ctx.options.reply_timeout, 5.0))
            finally:
                await session.close()
            lines.append(f"{_size(size)}: {outcome.describe()}")
            if await judged(ctx, _size(size), outcome) == "refused":
                first_refused = size
                break
        await still_serving(ctx, "the big messages")
    except Failed as exc:
        return finding(ctx.check_id, Verdict.FAIL, str(exc), *lines)
    if first_refused == 64 * KIB + 1:
        return finding(ctx.check_id, Verdict.PASS, lines[0])
    if first_refused is not None:
        return finding(ctx.check_id, Verdict.WEAK, "; ".join(lines) + " — the limit is over 64 KiB")
    return finding(ctx.check_id, Verdict.FAIL, "; ".join(lines) + " — no practical size limit")


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:g} MiB" if n % MIB == 0 else f"{n // MIB} MiB + {n % MIB} B"
    return f"{n // KIB} KiB + {n % KIB} B" if n % KIB else f"{n // KIB} KiB"


@check(
    "size.frame",
    "A frame announcing 64 MiB is refused from its header",
    group="size",
    references=SIZE_REFS,
    remedy="Check the announced payload length against the limit before reading the payload "
    "(websockets: max_size).",
    aggressive=True,
)
async def size_frame(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    session = await ctx.open()
    announced = 64 * MIB
    sent = 0
    try:
        with ctx.oversized():
            await session.send_raw(frame_header(Opcode.TEXT, announced))
            chunk = b" " * (64 * KIB)
            while sent < MIB and not session.closed:
                if not await session.send_raw(chunk, drain_timeout=ctx.options.reply_timeout):
                    break
                sent += len(chunk)
                await session.closed_within(PACE)
            event = await session.wait_closed(max(ctx.options.reply_timeout, 2.0))
    finally:
        await session.close()
    if event is None:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"after {_size(sent)} of a 64 MiB frame the connection was still open, waiting "
            "for the rest: the server buffers before checking the size",
        )
    reason = f" {event.reason!r}" if event.reason else ""
    try:
        if event.code == 1011:
            raise Failed(f"closed 1011{reason}: a server error, not a limit")
        await still_serving(ctx, "the 64 MiB frame")
    except Failed as exc:
        return finding(ctx.check_id, Verdict.FAIL, str(exc))
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"closed {event.code}{reason} after {_size(sent)} of a 64 MiB frame had been sent",
    )


@check(
    "size.fragments",
    "A message split into many small fragments is refused once over the limit",
    group="size",
    references=SIZE_REFS,
    remedy="Count fragments toward the message size as they arrive (websockets: max_size).",
    aggressive=True,
)
async def size_fragments(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    session = await ctx.open()
    total = 16 * MIB
    # fragments of 1 KiB doubling up to 256 KiB: the first ones pass any frame limit (the
    # total is what must be refused) and 16 MiB takes ~70, under any fragment-count limit
    piece = KIB
    sent = count = 0
    try:
        with ctx.oversized():
            opcode = Opcode.TEXT
            while sent < total and not session.closed:
                piece = min(piece * 2, 256 * KIB) if count else piece
                frame = frame_bytes(opcode, b" " * piece, fin=False)
                if not await session.send_raw(frame, drain_timeout=ctx.options.reply_timeout):
                    break  # the peer stopped reading: judged by what comes back below
                opcode = Opcode.CONT
                sent += piece
                count += 1
                await session.closed_within(PACE)
            if session.closed:
                outcome = Outcome(close=session.close_event)
            else:
                tail = ctx.dialect.filler(990_001).encode()
                await session.send_raw(frame_bytes(Opcode.CONT, tail, fin=True))
                outcome = await ctx.barrier(session, wait=max(ctx.options.reply_timeout, 5.0))
    finally:
        await session.close()
    kind = refusal(outcome)
    try:
        if kind == "crash":
            raise Failed(f"{outcome.describe()} — a server error, not a limit")
        if kind == "throttled":
            raise Inconclusive(f"{outcome.describe()} — {_UNJUDGED[kind]}")
        await still_serving(ctx, "the fragmented message")
    except Failed as exc:
        return finding(ctx.check_id, Verdict.FAIL, str(exc))
    if kind == "refused":
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"{outcome.describe()} by the time {_size(sent)} had been sent in {count} fragments",
        )
    if kind == "accepted":
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"a {_size(sent)} message in {count} fragments was accepted ({outcome.describe()})",
        )
    return finding(
        ctx.check_id,
        Verdict.FAIL,
        f"{_size(sent)} in {count} fragments: no refusal and no answer within "
        f"{max(ctx.options.reply_timeout, 5.0):g}s — still buffering",
    )


@check(
    "compression",
    "Compression is off, or decompression is bounded",
    group="size",
    references=(*SIZE_REFS, "RFC 7692 §8"),
    remedy="Leave permessage-deflate off unless needed; if on, bound the decompressed size "
    "(websockets applies max_size after decompression).",
)
async def compression(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    ctx.rotate()
    result = await ctx.connect(extensions=[ClientPerMessageDeflateFactory()])
    if result.session is None:
        raise CheckError(f"handshake offering permessage-deflate refused: {result.describe()}")
    session = result.session
    try:
        negotiated = result.headers.get("Sec-WebSocket-Extensions", "")
        if "permessage-deflate" not in negotiated:
            return finding(
                ctx.check_id, Verdict.NA, "permessage-deflate not negotiated: nothing to bomb"
            )
        if not ctx.options.aggressive:
            return finding(
                ctx.check_id,
                Verdict.NA,
                f"negotiated ({negotiated}); the decompression bomb runs with --aggressive",
                needs="--aggressive",
            )
        await ctx.barrier(session)
        # 4 MiB of JSON whitespace deflates to ~4 KiB: under any wire limit, so only a bound
        # on the inflated size can stop it
        bomb = _padded_ping(ctx, 4 * MIB)
        wire = _size(len(zlib.compress(bomb.encode(), 9)))
        with ctx.oversized():
            await session.send_text(bomb)
            outcome = await ctx.barrier(session, wait=max(ctx.options.reply_timeout, 5.0))
    finally:
        await session.close()
    try:
        kind = await judged(ctx, "the deflate bomb", outcome)
        await still_serving(ctx, "the deflate bomb")
    except Failed as exc:
        return finding(ctx.check_id, Verdict.FAIL, str(exc))
    if kind == "refused":
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"negotiated; a 4 MiB message deflated to ~{wire}: {outcome.describe()}",
        )
    return finding(
        ctx.check_id,
        Verdict.FAIL,
        f"negotiated; a 4 MiB message deflated to ~{wire} was inflated and accepted "
        f"({outcome.describe()})",
    )


def _signed(ctx: ScanContext, text: str) -> str:
    key = ctx.options.signing_key
    if key is None:
        return text
    from wsguard.core.integrity import sign

    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise CheckError("--replay-message is not JSON, so it cannot be signed") from None
    nonce = secrets.token_urlsafe(16)  # 128 bits, as wsguard.client does
    kid, secret = key
    return orjson.dumps(
        sign(message, kid=kid, secret=secret, nonce=nonce, ts=int(time.time()))
    ).decode()


@check(
    "replay",
    "An identical message sent twice is refused the second time",
    group="messages",
    references=(f"{OWASP}: Message Integrity", "ASVS 5.0 V4.4"),
    remedy="For state-changing messages, require a nonce and a signature and refuse a nonce "
    "seen before (wsguard: messages.types.<t>.signed).",
    own_subject=False,  # signing keys belong to the credential's own subject
)
async def replay(ctx: ScanContext) -> Finding:
    """The message once, then a copy on a new connection (where an attacker replays it)
    and one on the first connection: both must be refused (or dropped unanswered)."""
    await require_baseline(ctx)
    message = ctx.options.replay_message
    if message is None:  # a ping changes nothing: accepting it twice proves nothing
        raise NotApplicable(
            "needs --replay-message: a state-changing message of the endpoint's protocol",
            needs="--replay-message",
        )
    text = _signed(ctx, message)
    ctx.rotate()
    session = await ctx.open()
    copies: list[tuple[str, Outcome]] = []
    try:
        first = await ctx.exchange(session, text)
        if throttled(first):  # an earlier check may have spent this subject's limits
            shared = (
                "; with --token every check uses that token's subject: rerun with --checks replay"
                if not ctx.credentials.can_mint
                else ""
            )
            raise Inconclusive(
                f"the first copy was refused as if throttled: {first.describe()}{shared}"
            )
        if refusal(first) not in ("accepted", "silent") or not first.answered:
            raise NotApplicable(
                f"the message is refused the first time: {first.describe()}",
                needs="--replay-message",
            )
        ctx.rotate()
        other = await ctx.open()
        try:
            copies.append(("on a new connection", await ctx.exchange(other, text)))
        finally:
            await other.close()
        if not session.closed:
            copies.append(("on the same connection", await ctx.exchange(session, text)))
    finally:
        await session.close()
    judged_copies = [(where, _copy(first, copy), copy) for where, copy in copies]
    lines = [f"first copy: {_seen(first)}"] + [
        f"copy {where}: {state} ({_seen(copy)})" for where, state, copy in judged_copies
    ]
    for where, state, copy in judged_copies:
        if state == "unjudged":
            raise Inconclusive(f"the copy {where}: {copy.describe()} — cannot judge")
        if state == "answered differently":
            raise Inconclusive(
                f"the copy {where} was answered unlike the first ({_kinds(copy.replies)} vs "
                f"{_kinds(first.replies)}), without an error: cannot tell whether it was "
                "processed"
            )
    accepted = [where for where, state, _ in judged_copies if state == "accepted"]
    held = [
        f"the copy {where}: {_held(state, copy, first)}"
        for where, state, copy in judged_copies
        if state != "accepted"
    ]
    sample = short(text, 60)
    if not accepted:
        return finding(ctx.check_id, Verdict.PASS, "; ".join(held), *lines)
    if len(accepted) == len(judged_copies):
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"the replay message ({sample}) was accepted again, {' and '.join(accepted)}: no "
            "replay protection — a flaw for state-changing messages",
            *lines,
        )
    return finding(
        ctx.check_id,
        Verdict.WEAK,
        f"the replay message ({sample}) was accepted again {accepted[0]}, while "
        f"{'; '.join(held)}: replay protection holds on one connection only (seen nonces "
        "must be remembered across connections)",
        *lines,
    )


def _copy(first: Outcome, copy: Outcome) -> str:
    """A replayed copy: "refused"; "dropped" (no answer where the first copy got one: not
    processed again); "accepted" (answered as the first was); "answered differently" (no
    error, but another kind of answer); "unjudged" (a crash, a throttle, no answer)."""
    kind = refusal(copy)
    if kind == "refused":
        return "refused"
    if kind != "accepted":
        return "unjudged"
    if first.replies and not copy.replies:
        return "dropped"
    if copy.replies and _kinds(copy.replies) != _kinds(first.replies):
        return "answered differently"
    return "accepted"


def _held(state: str, copy: Outcome, first: Outcome) -> str:
    if state == "dropped":
        return (
            f"dropped without an answer, where the first copy was answered "
            f"{_kinds(first.replies)!r} (not processed again)"
        )
    return f"{state} ({copy.describe()})"


def _seen(outcome: Outcome) -> str:
    if outcome.replies and not outcome.refused:
        return f"answered {short(outcome.replies[0], 60)}; {outcome.describe()}"
    return outcome.describe()


def _kinds(texts: Sequence[str]) -> str:
    """The kinds of some messages ('transfer_ok'), for comparing answers."""
    out: list[str] = []
    for text in texts:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        kind = next(
            (
                value[k]
                for k in KIND_KEYS
                if isinstance(value, dict) and isinstance(value.get(k), str)
            ),
            short(text, 20),
        )
        if kind not in out:
            out.append(kind)
    return ", ".join(out) or "nothing"
