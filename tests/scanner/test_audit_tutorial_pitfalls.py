"""``wsguard audit`` against small tutorial-style servers whose behaviour once fooled it.

Each target is a websockets server on an ephemeral loopback port, written the way a
tutorial writes one: nonces remembered per connection, a chat whose admin message has
another name, a big welcome snapshot, a price feed numbering its own pushes, refusals whose
wording sounds like something else, an echo. The scan must say what a careful reader of
the traffic would say, and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from support.paths import REPO
from wsguard.scanner import Report, ScanOptions, Verdict, run_scan
from wsguard.scanner.report import to_json

Handler = Callable[[ServerConnection], Awaitable[None]]
TRANSFER = '{"type": "transfer", "amount": 1, "nonce": "n-0123456789abcdef"}'


def scan(
    handler: Handler, checks: tuple[str, ...], *, max_size: int | None = 2**20, **options: Any
) -> Report:
    """Scan a websockets server running *handler* with *checks* (and ScanOptions)."""

    async def main() -> Report:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=max_size) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            settings: dict[str, Any] = {"reply_timeout": 1.0, **options}
            return await run_scan(ScanOptions(url=url, checks=checks, **settings))

    return asyncio.run(main())


def one(report: Report) -> Any:
    (finding,) = report.findings
    return finding


def pong(message: Any) -> str | None:
    """The tutorial's ping handler: ``{"type": "ping", "id": N}`` answered with its id."""
    if isinstance(message, dict) and message.get("type") == "ping":
        return json.dumps({"type": "pong", "id": message.get("id")})
    return None


def json_server(answer: Callable[[Any, str | bytes], str | None]) -> Handler:
    """A JSON server: invalid JSON gets an error frame, a ping its pong, anything else
    ``answer(parsed, raw)`` (None: no answer)."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    value = json.loads(raw)
                except ValueError:
                    await ws.send(json.dumps({"type": "error", "error": "invalid_json"}))
                    continue
                reply = pong(value)
                if reply is None:
                    reply = answer(value, raw)
                if reply is not None:
                    await ws.send(reply)

    return handler


def unknown(value: Any, raw: str | bytes) -> str:
    return json.dumps({"type": "error", "error": "unknown_type"})


# -- replay: copies on a new connection, and copies dropped --------------------------------


def replay_server(scope: str) -> Handler:
    """``transfer`` needs a nonce, refused (``replayed``) when seen before: per connection
    (the flaw), across connections, or dropped without an answer (idempotent)."""
    seen_anywhere: set[str] = set()

    async def handler(ws: ServerConnection) -> None:
        seen = set() if scope == "connection" else seen_anywhere

        def answer(value: Any, raw: str | bytes) -> str | None:
            if not isinstance(value, dict) or value.get("type") != "transfer":
                return unknown(value, raw)
            nonce = str(value.get("nonce"))
            if nonce in seen:
                if scope == "silent":
                    return None
                return json.dumps({"type": "error", "error": "replayed"})
            seen.add(nonce)
            return json.dumps({"type": "transfer_ok", "nonce": nonce})

        await json_server(answer)(ws)

    return handler


@pytest.mark.parametrize(
    ("scope", "verdict", "evidence"),
    [
        ("connection", Verdict.WEAK, "accepted again on a new connection"),
        ("silent", Verdict.PASS, "dropped without an answer"),
        ("everywhere", Verdict.PASS, "on a new connection: refused (error frame 'replayed'"),
    ],
)
def test_a_replay_is_sent_on_a_new_connection_and_judged_by_its_answer(
    scope: str, verdict: Verdict, evidence: str
) -> None:
    """A copy replayed on another connection must be refused too: a server that forgets
    nonces with the connection is WEAK (protection on one connection only), not PASS. A
    copy dropped without the answer the first one got was not processed again: PASS, not
    "accepted twice"."""
    finding = one(scan(replay_server(scope), ("replay",), replay_message=TRANSFER))
    assert finding.verdict is verdict, finding
    assert evidence in finding.evidence, finding


def test_replay_without_a_message_needs_one_rather_than_replaying_a_ping() -> None:
    """A ping changes nothing: accepting it twice is no finding. Without --replay-message
    the check is N/A and says it needs one (not examined)."""
    report = scan(json_server(unknown), ("replay",))
    finding = one(report)
    assert finding.verdict is Verdict.NA, finding
    assert finding.needs == "--replay-message"
    assert "ping" not in finding.evidence
    assert not report.failed("warn")


# -- authz.privileged: a refusal like the unknown kind's says nothing --------------------


def chat(command_refusal: str) -> Handler:
    """A chat whose privileged message is ``announce`` (broadcast, never checked): the
    scan's guesses get *command_refusal* (``command``) and ``unknown_type`` (the rest)."""

    def answer(value: Any, raw: str | bytes) -> str:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "command":
            return json.dumps({"type": "error", "error": command_refusal})
        return unknown(value, raw)

    return json_server(answer)


def test_guesses_refused_just_like_an_unknown_kind_are_inconclusive() -> None:
    finding = one(scan(chat("unknown_type"), ("authz.privileged",)))
    assert finding.verdict is Verdict.INCONCLUSIVE, finding
    assert "--privileged-message" in finding.evidence
    assert "unknown kind" in finding.evidence


def test_a_guess_refused_unlike_an_unknown_kind_still_passes() -> None:
    """As wsguard serve does: ``command`` needs a scope (``forbidden``), ``admin`` is not
    a type at all (``unknown_type``): an authorization decision was seen."""
    finding = one(scan(chat("forbidden"), ("authz.privileged",)))
    assert finding.verdict is Verdict.PASS, finding
    assert "forbidden" in finding.evidence


# -- size checks: the target's own big messages are no answer to the probe -------------


async def big_welcome(ws: ServerConnection) -> None:
    """A 6 KiB state snapshot on connect, then the JSON protocol (4 KiB message limit)."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"type": "welcome", "state": "x" * 6000}))
        await json_server(unknown)(ws)


def test_a_big_welcome_over_the_scan_limit_is_no_accepted_probe() -> None:
    """Every connection opens with a message over --max-message-bytes: the size checks
    could not send their probe, so they are ERRORs saying so, never a FAIL."""
    checks = ("size.limit", "size.frame", "size.fragments")
    report = scan(big_welcome, checks, max_size=4096, aggressive=True, max_message_bytes=4096)
    for finding in report.findings:
        assert finding.verdict is Verdict.ERROR, finding
        assert "before the oversized message was sent" in finding.evidence, finding
        assert "--max-message-bytes" in finding.evidence


@pytest.mark.parametrize(
    ("refusal", "verdict", "evidence"),
    [
        ("message exceeds the size limit of 8192 bytes", Verdict.PASS, "size limit"),
        ("rate limited, retry later", Verdict.INCONCLUSIVE, "not for its size"),
    ],
    ids=["size-refusal", "throttle"],
)
def test_a_size_refusal_is_no_throttle(refusal: str, verdict: Verdict, evidence: str) -> None:
    """An error frame that names the size limit refuses the big message (PASS); one that
    says "slow down" leaves the size limit unjudged, and the evidence says why."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if len(raw) > 8192:
                    await ws.send(json.dumps({"type": "error", "error": refusal}))
                    continue
                await ws.send(pong(json.loads(raw)) or unknown(None, raw))

    finding = one(scan(handler, ("size.limit",), max_size=2 * 2**20, aggressive=True))
    assert finding.verdict is verdict, finding
    assert evidence in finding.evidence, finding


# -- discovery: a feed's own counters are no answer --------------------------------------


def feed(push: Callable[[int], dict[str, Any]]) -> Handler:
    """A read-only feed: ``push(n)`` (n from 1 per connection) every 50 ms; what clients
    send is ignored."""

    async def handler(ws: ServerConnection) -> None:
        async def pushes() -> None:
            with contextlib.suppress(ConnectionClosed):
                for n in itertools.count(1):
                    await ws.send(json.dumps(push(n)))
                    await asyncio.sleep(0.05)  # the feed's pace (the server's behaviour)

        task = asyncio.create_task(pushes())
        try:
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
        finally:
            task.cancel()

    return handler


FEEDS = {
    "ticks numbered from 1": lambda n: {"type": "tick", "id": n, "price": 100 + n % 7},
    "heartbeat pongs": lambda n: {"type": "pong", "seq": n},
}


@pytest.mark.parametrize("name", FEEDS)
def test_a_feed_of_its_own_is_not_taken_for_an_answer(name: str) -> None:
    """The probes' ids are not 1, 2, 3...: a feed's own ``id`` fields answer nothing;
    pongs that come with no probe at all answer nothing either. With no application
    ping the scan uses ping frames (as documented)."""
    report = scan(feed(FEEDS[name]), ("malformed.json",))
    assert "WebSocket ping frames are the barrier" in report.protocol, report.protocol
    assert one(report).verdict is Verdict.PASS  # ignored, still serving


# -- malformed input: refusals worded like authentication, and input accepted ------------


def binary_refusing(close: bool) -> Handler:
    """A JSON server that refuses binary frames with words of "forbidden": a close 1003
    (*close*) or an error frame, serving on."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if isinstance(raw, bytes):
                    if close:
                        await ws.close(1003, "binary frames forbidden")
                        return
                    await ws.send(json.dumps({"type": "error", "error": "binary data forbidden"}))
                    continue
                try:
                    value = json.loads(raw)
                except ValueError:
                    await ws.send(json.dumps({"type": "error", "error": "invalid_json"}))
                    continue
                await ws.send(pong(value) or unknown(value, raw))

    return handler


binary_closed = binary_refusing(close=True)
binary_refused_with_error = binary_refusing(close=False)


@pytest.mark.parametrize(
    "handler", [binary_closed, binary_refused_with_error], ids=["1003", "error"]
)
def test_a_refusal_that_says_forbidden_is_no_authentication_refusal(handler: Handler) -> None:
    """ "binary frames forbidden" (close 1003, or an error frame) refuses the frame, not
    the connection's credential: the server handled it (PASS), nothing inconclusive."""
    finding = one(scan(handler, ("malformed.binary",)))
    assert finding.verdict is Verdict.PASS, finding
    assert "forbidden" in finding.evidence


async def echo(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)


async def binary_as_json(ws: ServerConnection) -> None:
    """Takes binary frames as JSON messages (a binary ping is answered)."""
    await json_server(unknown)(ws)


@pytest.mark.parametrize(
    ("handler", "checks"),
    [
        (echo, ("malformed.json", "malformed.non_object", "malformed.binary")),
        (binary_as_json, ("malformed.binary",)),
    ],
    ids=["echo", "binary-processed"],
)
def test_malformed_input_answered_as_valid_is_weak(
    handler: Handler, checks: tuple[str, ...]
) -> None:
    """Malformed input echoed or processed, with no error frame and no policy close, is
    not handled: WEAK, never PASS (a crash would be FAIL)."""
    report = scan(handler, checks)
    for finding in report.findings:
        assert finding.verdict is Verdict.WEAK, finding
        assert "answered as if valid" in finding.evidence


# -- the JSON report is what the documentation says ---------------------------------------


def test_the_documented_json_keys_are_the_reports() -> None:
    text = (REPO / "docs" / "guides" / "scanner.md").read_text()
    match = re.search(r"`--format json` \(findings with (.*?)\), `--format sarif`", text, re.S)
    assert match is not None
    documented = set(re.findall(r"`([a-z_]+)`", match.group(1)))
    report = scan(echo, ("replay", "malformed.json"))
    keys: set[str] = set()
    for item in to_json(report)["findings"]:
        keys |= set(item)
    assert keys == documented, (keys, documented)
