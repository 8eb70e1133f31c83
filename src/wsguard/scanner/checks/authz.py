"""Message-level authorization: may an ordinary user send a privileged message?"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import orjson

from wsguard.scanner.checks.common import require_baseline
from wsguard.scanner.context import (
    Inconclusive,
    Outcome,
    ScanContext,
    about_authentication,
    brief,
    short,
)
from wsguard.scanner.dialect import KIND_KEYS, Dialect, loads
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import Session

REFS = (
    f"{OWASP}: Authorization",
    "ASVS 5.0 V8.2.1 (function-level access control)",
    "CWE-285",
)


def guesses(ctx: ScanContext, marker: str) -> list[tuple[str, str]]:
    """(label, text): privileged messages in the endpoint's envelope (--privileged-message
    replaces them; ``{marker}`` in one is replaced by the scan's marker)."""
    given = ctx.options.privileged_messages
    if given:
        return [(short(text, 60), text.replace("{marker}", marker)) for text in given]
    dialect = ctx.dialect
    keys = [dialect.key] if dialect.mode != "control" else ["type", "event", "action"]
    out: list[tuple[str, str]] = []
    for key in keys:
        envelope = dialect if key == dialect.key else _with_key(ctx, key)
        for kind, fields in (
            ("command", {"name": "shutdown", "args": [marker]}),
            ("admin", {"command": "broadcast", "text": marker}),
        ):
            text = envelope.message(kind, fields)
            out.append((f"{{{key!r}: {kind!r}}}", text))
    return out


def _with_key(ctx: ScanContext, key: str) -> Dialect:
    return replace(ctx.dialect, key=key, data=False)


def _contains(value: Any, needle: Any) -> bool:
    """Is ``needle`` (the message sent) somewhere inside ``value`` (what came back)?"""
    stack = [value]
    seen = 0
    while stack and seen < 10_000:
        item = stack.pop()
        seen += 1
        if item == needle:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def carries(text: str, sent: str, marker: str) -> bool:
    """Does a message from the target carry the privileged message (relayed, re-serialized
    or wrapped in an envelope)?"""
    if marker in text:
        return True
    needle = loads(sent)
    return needle is not None and _contains(loads(text), needle)


def besides_echoes(texts: list[str], sent: str) -> list[str]:
    """The answers that are not *sent* itself coming back (an echo server's answer to
    any message: no sign that its kind was processed)."""
    value = loads(sent)
    return [t for t in texts if t != sent and (value is None or loads(t) != value)]


def kinds(texts: list[str]) -> set[str]:
    out: set[str] = set()
    for text in texts:
        value = loads(text)
        if isinstance(value, dict):
            kind = next((value[k] for k in KIND_KEYS if isinstance(value.get(k), str)), "?")
            out.add(str(kind))
        else:
            out.add(short(text, 20))
    return out


async def _observe(ctx: ScanContext, observer: Session, sent: str, marker: str) -> str | None:
    """What the other user's connection received of it (None: nothing)."""
    seen = await ctx.barrier(observer)
    for text in seen.replies + seen.errors:
        if carries(text, sent, marker):
            return text
    return None


@check(
    "authz.privileged",
    "A privileged message from an ordinary user is refused, and not relayed",
    group="authz",
    references=REFS,
    remedy="Authorize every message type against the sender's roles or scopes on the server, "
    "answer a refusal, and never relay a privileged message to other users (wsguard: "
    "messages.types.<type>.scopes).",
)
async def privileged(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    marker = f"wsguard-audit-{os.urandom(4).hex()}"
    candidates = guesses(ctx, marker)
    observer_token = ctx.credentials.for_check(f"{ctx.check_id}.observer").token
    ctx.rotate()
    observer = await ctx.open(token=observer_token)
    sender: Session | None = None
    lines: list[str] = []
    relayed: list[str] = []
    processed: list[str] = []
    refused: list[str] = []
    refused_alike: list[str] = []  # refused just as the unknown kind is: says nothing
    alike: list[str] = []
    silent: list[str] = []
    try:
        ctx.rotate()
        sender = await ctx.open()
        await ctx.barrier(observer)  # what the sender's arrival caused is not evidence
        # a message of a kind nobody has: what "answered" means on this endpoint
        unknown_marker = f"wsguard-audit-{os.urandom(4).hex()}"
        unknown = ctx.dialect.message(f"wsguard-audit-unknown-{unknown_marker[-8:]}", {})
        control = await ctx.exchange(sender, unknown)
        await ctx.barrier(observer)
        control_kinds = (
            kinds(besides_echoes(control.replies, unknown)) if not control.refused else set()
        )
        for label, text in candidates:
            if sender.closed:
                ctx.rotate()
                await sender.close()
                sender = await ctx.open()
            outcome = await ctx.exchange(sender, text)
            copy = await _observe(ctx, observer, text, marker)
            how = _describe(outcome)
            received = f"; another user received {short(copy, 80)}" if copy else ""
            lines.append(f"{label}: {how}{received}")
            if copy is not None:
                relayed.append(label)
            elif outcome.refused:
                refused.append(f"{label} ({how})")
                if control.refused and _refusal(control, unknown) == _refusal(outcome, text):
                    refused_alike.append(label)
            elif (answers := besides_echoes(outcome.replies, text)) and not (
                kinds(answers) <= control_kinds
            ):
                processed.append(f"{label} ({how})")
            elif outcome.replies:
                alike.append(label)
            else:
                silent.append(label)
    finally:
        if sender is not None:
            await sender.close()
        await observer.close()
    control_line = f"unknown kind: {_describe(control)}"
    if relayed:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"sent by an ordinary user, {', '.join(relayed)} reached another user's connection: "
            "privileged messages are relayed without authorization",
            *lines,
            control_line,
        )
    if processed:
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            f"processed for an ordinary user: {'; '.join(processed)} — while a message of an "
            f"unknown kind got {_describe(control)}",
            *lines,
            control_line,
        )
    if refused and control.refused and about_authentication(control):
        raise Inconclusive(
            f"every message, one of an unknown kind too ({_describe(control)}), is refused "
            "for authentication: the endpoint authenticates in its protocol, after the "
            "upgrade, and the scan's connection has not; nothing about privileges was seen"
        )
    if refused and len(refused_alike) == len(refused) and not alike and not silent:
        raise Inconclusive(
            f"{', '.join(refused_alike)} refused just as a message of an unknown kind is "
            f"({_describe(control)}), and not relayed: the endpoint may not know these "
            "kinds at all, so the refusal says nothing about privileges (give "
            "--privileged-message)"
        )
    if refused and not alike and not silent:
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"{len(refused)} of {len(candidates)} refused: {'; '.join(refused)}",
            *lines,
        )
    if alike:
        raise Inconclusive(
            f"{', '.join(alike)} answered just as a message of an unknown kind is "
            f"({_describe(control)}), and not relayed: cannot tell processing from an echo "
            "(give --privileged-message)"
        )
    raise Inconclusive(
        f"{', '.join(silent)}: no answer and not relayed (an unknown kind: "
        f"{_describe(control)}): cannot tell whether it was processed (give "
        "--privileged-message)"
    )


def _refusal(outcome: Outcome, sent: str) -> tuple[object, ...]:
    """How a message was refused, with its own kind left out ("unknown type: admin" and
    "unknown type: wsguard-audit-unknown-..." are the same refusal)."""
    value = loads(sent)
    kind = next(
        (value[k] for k in KIND_KEYS if isinstance(value, dict) and isinstance(value.get(k), str)),
        None,
    )

    def plain(text: str) -> str:
        return text.replace(kind, "{kind}") if kind else text

    close = outcome.close
    return (
        tuple(brief(plain(error)) for error in outcome.errors),  # codes, not timestamps
        None if close is None else (close.code, plain(close.reason)),
    )


def _describe(outcome: Outcome) -> str:
    if outcome.refused:
        return f"refused ({outcome.describe()})"
    if outcome.replies:
        return f"answered {brief_reply(outcome.replies[0])}"
    return "no answer" + ("" if outcome.answered else ", connection not answering")


def brief_reply(text: str) -> str:
    value = loads(text)
    if isinstance(value, dict):
        kind = next((f"{k}: {value[k]}" for k in KIND_KEYS if isinstance(value.get(k), str)), None)
        if kind is not None:
            return "{" + short(kind, 50) + ", ...}"
    return short(orjson.dumps(value).decode() if value is not None else text, 60)
