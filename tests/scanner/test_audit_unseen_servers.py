"""``wsguard audit`` against servers it has never seen, speaking protocols other than wsguard's.

Two tutorial-grade targets in other stacks (tests/targets/): a Node.js ``ws`` chat that answers
``{"type": "ping"}`` without echoing the id, and a FastAPI chat under uvicorn with an
``{"event": ..., "data": ...}`` envelope. Each documents its real defects (a table at its
top); the scan, given only what a user would give (the URL, ``--aggressive``, the token
secret, ``--server-log``), must find every documented defect class, with no ERROR and no
INCONCLUSIVE verdict, and FAIL nothing the target does right. Small in-process servers show
how the scan adapts its barrier to each kind of ping (or to none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from support.cli import cli_env, run_cli
from support.net import free_port
from support.paths import REPO
from wsguard.scanner import Report, ScanOptions, Verdict, run_scan

TARGETS = REPO / "tests" / "targets"
NODE_DIR = TARGETS / "node_ws"
SECRET = "unseen-servers-secret-0123456789abcdef0123456789"
SCAN_TIMEOUT = 300.0
START_WAIT = 30.0
PROBLEMS = {"FAIL", "WEAK", "WARN"}
# speed knobs only (the targets' own timers are short), no knowledge of the target
FAST = [
    "--reply-timeout", "1", "--slow-wait", "4", "--idle-wait", "4", "--expiry-wait", "3",
    "--reset-wait", "3", "--max-connections", "20", "--flood-count", "300",
]  # fmt: skip

# defect class -> the checks that must flag it (FAIL, WEAK or WARN); the same classes as the
# tables at the top of tests/targets/node_ws/server.js and tests/targets/fastapi_chat.py
NODE_DEFECTS: dict[str, frozenset[str]] = {
    "malformed_token": frozenset({"auth.malformed"}),
    "signature_unverified": frozenset({"auth.signature"}),
    "alg_none": frozenset({"auth.alg_none"}),
    "expired_accepted": frozenset({"auth.expired"}),
    "exp_not_required": frozenset({"auth.no_exp"}),
    "outlives_token": frozenset({"token.expiry"}),
    "no_origin_check": frozenset({"origin.foreign", "origin.null"}),
    "privileged_relayed": frozenset({"authz.privileged"}),
    "no_size_limit": frozenset({"size.limit", "size.frame", "size.fragments"}),
    "no_rate_limit": frozenset({"flood.rate_limit"}),
    "no_connection_limit": frozenset({"conns.limit"}),
    "no_heartbeat": frozenset({"liveness.heartbeat"}),
    "stack_traces": frozenset({"disclosure.errors"}),
    "log_injection": frozenset({"logs.injection"}),
    "slow_handshake": frozenset({"handshake.timeout"}),
}
FASTAPI_DEFECTS: dict[str, frozenset[str]] = {
    "expired_accepted": frozenset({"auth.expired"}),
    "exp_not_required": frozenset({"auth.no_exp"}),
    "outlives_token": frozenset({"token.expiry"}),
    "origin_prefix_match": frozenset({"origin.lookalike"}),
    "privileged_processed": frozenset({"authz.privileged"}),
    "unhandled_exceptions": frozenset(
        {"malformed.binary", "malformed.non_object", "malformed.nesting"}
    ),
    "no_size_limit": frozenset({"size.limit", "compression"}),
    "no_rate_limit": frozenset({"flood.rate_limit"}),
    "no_connection_limit": frozenset({"conns.limit"}),
    "exception_disclosure": frozenset({"disclosure.errors"}),
    "log_injection": frozenset({"logs.injection"}),
    "slow_handshake": frozenset({"handshake.timeout"}),
}
# what each target does right: never a FAIL
NODE_RIGHT = frozenset({"auth.required", "malformed.utf8"})
FASTAPI_RIGHT = frozenset(
    {"auth.required", "auth.malformed", "auth.signature", "auth.alg_none", "origin.foreign",
     "origin.null", "malformed.json", "malformed.utf8", "size.frame", "size.fragments",
     "liveness.heartbeat"}
)  # fmt: skip


# -- the targets, started as their users start them ------------------------------------


@pytest.fixture(scope="session")
def node_ready() -> Path:
    """tests/targets/node_ws with its node_modules (npm ci from the committed lock)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js ws target (not installed)")
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return NODE_DIR


def wait_listening(out: Path, process: subprocess.Popen[bytes]) -> int:
    """The port from the target's "listening on 127.0.0.1:PORT" line (bounded poll)."""
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", out.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        assert process.poll() is None, out.read_text(errors="replace")
        time.sleep(0.05)
    raise AssertionError(f"the target did not start: {out.read_text(errors='replace')}")


@contextlib.contextmanager
def target(command: list[str], out: Path, cwd: Path) -> Iterator[int]:
    with out.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield wait_listening(out, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def node_target(tmp: Path, directory: Path) -> Iterator[tuple[str, Path]]:
    log = tmp / "node.log"  # its stdout is its log
    with target(["node", "server.js", "0"], log, directory) as port:
        yield f"ws://127.0.0.1:{port}/", log


@contextlib.contextmanager
def fastapi_target(tmp: Path) -> Iterator[tuple[str, Path]]:
    log = tmp / "chat.log"
    script = str(TARGETS / "fastapi_chat.py")
    command = [sys.executable, script, "--secret", SECRET, "--log", str(log)]
    with target(command, tmp / "uvicorn.out", TARGETS) as port:
        yield f"ws://127.0.0.1:{port}/ws", log


def audit(url: str, log: Path, tmp: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """Scan as a user would: the URL, --aggressive, the token secret, --server-log."""
    out = tmp / "report.json"
    done = run_cli(
        ["audit", url, "--aggressive", "--jwt-secret", SECRET, "--server-log", str(log),
         *FAST, *extra, "--format", "json", "--out", str(out), "--no-progress"],
        cli_env(tmp),
        timeout=SCAN_TIMEOUT,
    )  # fmt: skip
    assert out.is_file(), done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert done.returncode == 1, done.stdout + done.stderr  # FAILs: the gate fails
    return report, done.stdout + done.stderr


def judge_defects(
    report: dict[str, Any], defects: dict[str, frozenset[str]], right: frozenset[str]
) -> dict[str, str]:
    """Assert every documented class is found and the scan stayed honest; per class, what
    found it (the per-target table of the report)."""
    verdicts = {item["check"]: item["verdict"] for item in report["findings"]}
    evidence = {item["check"]: item["evidence"] for item in report["findings"]}
    # no verdict caused by the protocol being another: no ERROR, no INCONCLUSIVE
    assert not {c: evidence[c] for c, v in verdicts.items() if v in ("ERROR", "INCONCLUSIVE")}
    table = {}
    for name, checks in defects.items():
        table[name] = ", ".join(f"{c} {verdicts[c]}" for c in sorted(checks))
        missed = {c: f"{verdicts[c]}: {evidence[c]}" for c in checks if verdicts[c] not in PROBLEMS}
        assert not missed, f"{name} not found: {missed}"
    documented = set().union(*defects.values())
    stray = {c: evidence[c] for c, v in verdicts.items() if v == "FAIL" and c not in documented}
    assert not stray, f"FAIL on what the target does not get wrong: {stray}"
    assert all(verdicts[c] == "PASS" for c in right), {c: verdicts[c] for c in right}
    return table


def test_node_ws_tutorial_server(node_ready: Path, tmp_path: Path) -> None:
    with node_target(tmp_path, node_ready) as (url, log):
        report, output = audit(url, log, tmp_path)
    table = judge_defects(report, NODE_DEFECTS, NODE_RIGHT)
    assert len(table) == len(NODE_DEFECTS) == 15
    # the barrier it chose: its pong carries no id, so probes go one at a time
    assert "without the id" in report["protocol"] and "sequential" in report["protocol"]
    assert "protocol: detected" in output  # the summary says so too
    privileged = next(i for i in report["findings"] if i["check"] == "authz.privileged")
    assert "reached another user's connection" in privileged["evidence"]


def test_fastapi_tutorial_server(tmp_path: Path) -> None:
    with fastapi_target(tmp_path) as (url, log):
        report, _ = audit(url, log, tmp_path)
    table = judge_defects(report, FASTAPI_DEFECTS, FASTAPI_RIGHT)
    assert len(table) == len(FASTAPI_DEFECTS) == 12
    assert '{"event": "ping", "data": {"id": "{id}"}}' in report["protocol"], report["protocol"]
    assert "answered with its id" in report["protocol"]
    by_id = {item["check"]: item for item in report["findings"]}
    # found without --origin-allowed: the scan found an Origin the target allows
    assert "localhost" in by_id["origin.lookalike"]["evidence"]
    assert "admin_result" in by_id["authz.privileged"]["evidence"]
    # a ping is no state-changing message: replay needs one of the target's own
    assert report["coverage"]["needs"] == {
        "--cookie": ["origin.cookie"],
        "--replay-message": ["replay"],
    }


def test_the_documented_tables_match_the_targets() -> None:
    """The defect classes the tests expect are the ones each target documents."""
    node = (NODE_DIR / "server.js").read_text()
    fastapi = (TARGETS / "fastapi_chat.py").read_text()
    for name, checks in NODE_DEFECTS.items():
        row = re.search(rf"^// \| {name} +\|.*$", node, re.MULTILINE)
        assert row is not None, name
        assert all(c in row.group(0) for c in checks), row.group(0)
    for name, checks in FASTAPI_DEFECTS.items():
        row = re.search(rf"^\* ``{name}`` \[([^\]]+)\]", fastapi, re.MULTILINE)
        assert row is not None, name
        assert set(row.group(1).split(", ")) == checks, row.group(0)


# -- the barrier, adapted to each kind of ping (or none) ---------------------------------


def dialect_server(answer: Callable[[Any, str], list[str]]) -> Any:
    """A websockets server answering each text message with ``answer(parsed, raw)``."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                raw = message if isinstance(message, str) else message.decode(errors="replace")
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
                for reply in answer(parsed, raw):
                    await ws.send(reply)

    return serve(handler, "127.0.0.1", 0, max_size=64 * 1024, compression=None, server_header=None)


def _kind(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _error(value: Any, raw: str) -> list[str]:
    return [json.dumps({"error": "bad message"})]


DIALECTS: dict[str, tuple[Callable[[Any, str], list[str]], str]] = {
    "id echo": (
        lambda v, r: (
            [json.dumps({"type": "pong", "id": v.get("id")})]
            if _kind(v, "type") == "ping"
            else _error(v, r)
        ),
        "answered with its id",
    ),
    "pong without id": (
        lambda v, r: (
            [json.dumps({"type": "pong", "timestamp": 1})]
            if _kind(v, "type") == "ping"
            else _error(v, r)
        ),
        "without the id",
    ),
    "action key": (
        lambda v, r: (
            [json.dumps({"action": "pong"})] if _kind(v, "action") == "ping" else _error(v, r)
        ),
        "matched by action",
    ),
    "op key": (
        lambda v, r: (
            [json.dumps({"op": "pong", "id": v.get("id")})]
            if _kind(v, "op") == "ping"
            else _error(v, r)
        ),
        '{"op": "ping"',
    ),
    "socket.io-style": (
        lambda v, r: (
            [json.dumps({"event": "pong", "data": v["data"]})]
            if _kind(v, "event") == "ping" and isinstance(v.get("data"), dict)
            else _error(v, r)
        ),
        '{"event": "ping", "data"',
    ),
    "text ping": (lambda v, r: ["pong"] if r == "ping" else [], "text ping"),
    "no application ping": (lambda v, r: [], "WebSocket ping frames are the barrier"),
}


async def scan_dialect(name: str, checks: tuple[str, ...]) -> Report:
    answer, _ = DIALECTS[name]
    async with dialect_server(answer) as server:
        port = server.sockets[0].getsockname()[1]
        options = ScanOptions(url=f"ws://127.0.0.1:{port}/", checks=checks, reply_timeout=1.0)
        return await run_scan(options)


@pytest.mark.parametrize("name", DIALECTS)
def test_the_scan_finds_how_to_talk_to_the_endpoint(name: str) -> None:
    """Each kind of ping is found and used: the message checks run (no ERROR, no
    INCONCLUSIVE), and the report says which barrier was chosen."""
    checks = ("malformed.json", "malformed.non_object", "malformed.utf8", "auth.required")
    report = asyncio.run(scan_dialect(name, checks))
    assert DIALECTS[name][1] in report.protocol, report.protocol
    verdicts = {f.check: f for f in report.findings}
    for check in ("malformed.json", "malformed.non_object", "malformed.utf8"):
        assert verdicts[check].verdict is Verdict.PASS, verdicts[check]
    # no credential needed: every one of them lets anyone in
    expected = Verdict.WEAK if name == "no application ping" else Verdict.FAIL
    assert verdicts["auth.required"].verdict is expected, verdicts["auth.required"]


def test_an_endpoint_without_application_ping_says_what_it_cannot_judge() -> None:
    """With only ping frames to go by, a check that needs answers to messages is
    INCONCLUSIVE with its reason in one line, never an ERROR."""
    checks = ("authz.privileged", "replay", "disclosure.errors")
    report = asyncio.run(scan_dialect("no application ping", checks))
    verdicts = {f.check: f for f in report.findings}
    assert verdicts["authz.privileged"].verdict is Verdict.INCONCLUSIVE
    assert "cannot tell" in verdicts["authz.privileged"].evidence
    assert verdicts["replay"].verdict is Verdict.NA
    assert verdicts["replay"].needs == "--replay-message"
    assert verdicts["disclosure.errors"].verdict is Verdict.PASS
    assert not [f for f in report.findings if f.verdict is Verdict.ERROR]
    coverage = report.coverage()
    assert coverage.inconclusive == ("authz.privileged",)
    assert coverage.needs == {"--replay-message": ("replay",)}


# -- endpoints that are slow, silent or not WebSocket at all -----------------------------


def scan_handler(
    handler: Callable[[ServerConnection], Any], checks: tuple[str, ...], **options: Any
) -> Report:
    """Scan a websockets server running *handler* with *checks* (and ScanOptions)."""

    async def main() -> Report:
        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            return await run_scan(ScanOptions(url=url, checks=checks, **options))

    return asyncio.run(main())


def test_an_endpoint_slower_than_its_ping_frames_is_still_understood() -> None:
    """An echo whose handler answers 0.3 s after the message, while its library answers
    ping frames at once: the scan waits (up to --reply-timeout) for the message, finds it,
    and sees that anyone gets in (no false PASS because the answer came late)."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                await asyncio.sleep(0.3)
                await ws.send(message)

    report = scan_handler(handler, ("auth.required", "origin.foreign"), reply_timeout=1.0)
    assert "answered only after its ping frame" in report.protocol, report.protocol
    verdicts = {f.check: f.verdict for f in report.findings}
    assert verdicts == {"auth.required": Verdict.FAIL, "origin.foreign": Verdict.FAIL}


async def _raw_target(answer: bytes | None) -> asyncio.Server:
    """A TCP server that reads a request and answers *answer* (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await reader.read()  # holds the connection until the client leaves
            else:
                writer.write(answer)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "evidence"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "not a WebSocket endpoint: HTTP 200"),
        (None, "no response (timeout)"),
    ],
    ids=["http-200", "no-answer"],
)
def test_an_endpoint_that_upgrades_nothing_is_an_error_never_a_pass(
    answer: bytes | None, evidence: str
) -> None:
    """A 200 is no refusal, and silence is no answer: the authentication checks could not
    do their work, so they are ERRORs (a CI gate fails, exit 3), never PASS or
    INCONCLUSIVE."""

    async def main() -> Report:
        server = await _raw_target(answer)
        async with server:
            port = server.sockets[0].getsockname()[1]
            options = ScanOptions(
                url=f"ws://127.0.0.1:{port}/",
                checks=("auth.required",),
                reply_timeout=0.5,
                connect_timeout=0.5,
            )
            return await run_scan(options)

    (finding,) = asyncio.run(main()).findings
    assert finding.verdict is Verdict.ERROR, finding
    assert evidence in finding.evidence, finding.evidence


def test_an_echo_is_no_sign_that_a_privileged_message_was_processed() -> None:
    """An echo server answers a privileged kind with itself, as it answers an unknown
    kind: INCONCLUSIVE (say --privileged-message), never a FAIL."""
    report = asyncio.run(scan_echo(("authz.privileged",)))
    (finding,) = report.findings
    assert finding.verdict is Verdict.INCONCLUSIVE, finding
    assert "cannot tell processing from an echo" in finding.evidence


async def scan_echo(checks: tuple[str, ...]) -> Report:
    async with dialect_server(lambda value, raw: [raw]) as server:
        port = server.sockets[0].getsockname()[1]
        options = ScanOptions(url=f"ws://127.0.0.1:{port}/", checks=checks, reply_timeout=1.0)
        return await run_scan(options)


@pytest.mark.parametrize(
    ("code", "reason", "verdict"),
    [(1000, "", Verdict.INCONCLUSIVE), (1008, "unauthorized", Verdict.WEAK)],
    ids=["normal-close", "policy-close"],
)
def test_a_close_right_after_the_upgrade_is_a_late_refusal_only_when_it_says_so(
    code: int, reason: str, verdict: Verdict
) -> None:
    """An endpoint that closes every connection right after its upgrade: with a normal
    close (1000, 1001, none) and no reason about authentication nothing says the credential
    was refused (INCONCLUSIVE); with a refusing close (1008, say) it is a refusal after the
    upgrade (WEAK)."""

    async def handler(ws: ServerConnection) -> None:
        await ws.close(code, reason)

    (finding,) = scan_handler(handler, ("auth.required",), reply_timeout=0.5).findings
    assert finding.verdict is verdict, finding


def test_a_replay_probe_refused_as_throttled_is_inconclusive_not_na() -> None:
    """When the first copy of the replay probe is refused the way a rate limit refuses
    (closed 1008), an earlier check may have spent the subject's allowance: INCONCLUSIVE
    with that reason, not N/A asking for another message."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                value = json.loads(message)
                if value.get("type") == "transfer":
                    await ws.close(1008, "rate limited")
                    return
                await ws.send(json.dumps({"type": "pong", "id": value.get("id")}))

    replay_message = '{"type": "transfer", "amount": 1}'
    report = scan_handler(handler, ("replay",), reply_timeout=0.5, replay_message=replay_message)
    (finding,) = report.findings
    assert finding.verdict is Verdict.INCONCLUSIVE, finding
    assert "as if throttled" in finding.evidence


def test_frames_that_break_rfc_6455_are_an_error_that_names_the_fault() -> None:
    """An endpoint that answers its upgrade with a frame of a reserved opcode (and stays
    open): nothing it sends can be read, so the check is an ERROR naming the fault, not a
    verdict about authentication drawn from its silence."""

    async def handler(ws: ServerConnection) -> None:
        ws.transport.write(b"\x83\x00")  # FIN, opcode 3: reserved
        await ws.wait_closed()

    (finding,) = scan_handler(handler, ("auth.required",), reply_timeout=0.5).findings
    assert finding.verdict is Verdict.ERROR, finding
    assert "breaks RFC 6455: invalid opcode" in finding.evidence


# -- refusals for another reason than the one a check probes ------------------------------


def test_an_origin_refusal_is_no_proof_of_authentication() -> None:
    """An endpoint with an Origin allowlist and no authentication refuses the scan's
    handshakes with 403 for their Origin: without --origin-allowed that says nothing
    about credentials (INCONCLUSIVE, naming the option); with it, anyone gets in."""
    allowed = "http://app.example"

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                await ws.send(message)

    async def main(**options: Any) -> Report:
        origins = [Origin(allowed)]
        async with serve(handler, "127.0.0.1", 0, origins=origins, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            return await run_scan(ScanOptions(url=url, reply_timeout=1.0, **options))

    blind = asyncio.run(main(checks=("auth.required", "auth.malformed")))
    verdicts = {f.check: f for f in blind.findings}
    assert verdicts["auth.required"].verdict is Verdict.INCONCLUSIVE, verdicts["auth.required"]
    assert "--origin-allowed" in verdicts["auth.required"].evidence
    assert not [f for f in blind.findings if f.verdict is Verdict.PASS], blind.findings
    informed = asyncio.run(main(checks=("auth.required",), origin_allowed=allowed))
    (finding,) = informed.findings
    assert finding.verdict is Verdict.FAIL, finding


async def _binary_only(ws: ServerConnection) -> None:
    """A binary protocol: text frames are closed with 1003, binary ones echoed."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if isinstance(message, str):
                await ws.close(1003, "binary only")
                return
            await ws.send(message)


def test_an_endpoint_the_scan_cannot_speak_to_is_not_said_to_refuse() -> None:
    """No credential needed, and no message the scan can send is answered: upgraded and
    not refused (WEAK, as documented), never described as a refusal; and a close for
    the kind of message sent is no rate limit (INCONCLUSIVE, not PASS)."""
    report = scan_handler(
        _binary_only,
        ("auth.required", "flood.rate_limit"),
        reply_timeout=0.5,
        aggressive=True,
        flood_count=50,
        reset_wait=1.0,
    )
    verdicts = {f.check: f for f in report.findings}
    required = verdicts["auth.required"]
    assert required.verdict is Verdict.WEAK, required
    assert "refused" not in required.evidence.split("—")[0].replace("not refused", ""), required
    flood = verdicts["flood.rate_limit"]
    assert flood.verdict is Verdict.INCONCLUSIVE, flood
    assert "not of their rate" in flood.evidence


def test_connections_dropped_now_and_then_are_no_connection_limit() -> None:
    """An endpoint with no limit that drops every third connection right after its
    upgrade: a drop followed by an accepted connection is no limit (it was reported as
    one, PASS), so all the connections the scan holds are accepted: FAIL."""
    accepted = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal accepted
        accepted += 1
        if accepted % 3 == 0:
            ws.transport.abort()
            return
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                await ws.send(message)

    report = scan_handler(
        handler,
        ("conns.limit", "conns.release"),
        reply_timeout=0.5,
        aggressive=True,
        max_connections=12,
        reset_wait=1.0,
    )
    verdicts = {f.check: f for f in report.findings}
    assert verdicts["conns.limit"].verdict is Verdict.FAIL, verdicts["conns.limit"]
    assert verdicts["conns.release"].verdict is Verdict.NA, verdicts["conns.release"]


def test_checks_are_selected_by_group_too() -> None:
    """--checks and --skip take a group name (as --list-checks shows them)."""
    from wsguard.scanner.runner import select

    chosen = {c.id for c in select(ScanOptions(url="ws://127.0.0.1:1/", checks=("limits",)))}
    assert {"flood.rate_limit", "conns.limit", "conns.release"} <= chosen
    assert all(c.group == "limits" for c in select(ScanOptions(url="", checks=("limits",))))
    skipped = select(ScanOptions(url="", skip=("lifecycle", "messages")))
    assert not [c for c in skipped if c.group in ("lifecycle", "messages")]


def test_an_echo_of_an_oversized_message_is_its_acceptance() -> None:
    """An echo server with no size limit sends the 16 MiB fragmented message back, over
    the scan's own read limit: that answer is the message accepted (FAIL), not a scan
    ERROR."""

    async def main() -> Report:
        async def handler(ws: ServerConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    await ws.send(message)

        async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            options = ScanOptions(
                url=f"ws://127.0.0.1:{port}/",
                checks=("size.fragments",),
                reply_timeout=1.0,
                aggressive=True,
            )
            return await run_scan(options)

    (finding,) = asyncio.run(main()).findings
    assert finding.verdict is Verdict.FAIL, finding
    assert "accepted" in finding.evidence


def test_an_endpoint_that_authenticates_in_its_protocol_gets_no_hollow_pass() -> None:
    """The credential goes in the first message; anything else is answered
    ``unauthorized`` and closed 4001. Malformed and privileged messages refused that way
    (a message of an unknown kind too) were tested for nothing: INCONCLUSIVE, not PASS."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _message in ws:
                await ws.send(json.dumps({"type": "error", "error": "unauthorized"}))
                await ws.close(4001, "unauthorized")
                return

    report = scan_handler(handler, ("malformed.json", "authz.privileged"), reply_timeout=0.5)
    verdicts = {f.check: f for f in report.findings}
    for check in ("malformed.json", "authz.privileged"):
        assert verdicts[check].verdict is Verdict.INCONCLUSIVE, verdicts[check]
        assert "authentication" in verdicts[check].evidence


def test_a_late_pong_is_not_credited_to_the_next_probe() -> None:
    """A pong that carries an earlier probe's id, arriving while the next kind of ping is
    tried (a handler slower than its library's ping frames), is that earlier probe's
    late answer: the scan finds the ping that is answered with its id, not a pong
    "without the id" for a message the endpoint never understood."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                value = json.loads(message) if isinstance(message, str) else None
                if isinstance(value, dict) and value.get("type") == "ping":
                    await asyncio.sleep(0.4)
                    await ws.send(json.dumps({"type": "pong", "id": value.get("id")}))
                else:
                    await ws.send(json.dumps({"type": "error", "error": "unknown message"}))

    report = scan_handler(handler, ("auth.required",), reply_timeout=1.0)
    assert "answered with its id" in report.protocol, report.protocol


def test_the_verbose_table_shows_the_fix_of_each_problem() -> None:
    from datetime import UTC, datetime

    import wsguard.scanner.checks  # noqa: F401 - the registry
    from wsguard.scanner.model import REGISTRY, finding
    from wsguard.scanner.report import render_table

    report = Report("ws://127.0.0.1:1/", datetime.now(UTC), aggressive=False)
    report.findings = [
        finding("auth.required", Verdict.FAIL, "accepted no credential"),
        finding("origin.null", Verdict.PASS, "refused"),
    ]
    verbose = render_table(report, verbose=True, width=400)
    assert f"fix: {REGISTRY['auth.required'].remedy}" in verbose
    assert REGISTRY["origin.null"].remedy not in verbose  # a PASS needs no fix
    assert "fix:" not in render_table(report, width=400)


def test_a_target_nobody_listens_on_is_one_error_named_once(tmp_path: Path) -> None:
    """Nothing listens: every check that needed the endpoint ERRORs (exit 3, a CI gate
    fails) with the one cause, shown once in the table rather than once per check; the
    checks decided by options alone keep saying what they need."""
    port = free_port()  # bound and released: nothing listens on it
    url = f"ws://127.0.0.1:{port}/"
    out = tmp_path / "report.json"
    done = run_cli(
        ["audit", url, "--connect-timeout", "1", "--format", "json", "--out", str(out)],
        cli_env(tmp_path),
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(out.read_text())
    cause = f"cannot reach the target (127.0.0.1:{port}: Connection refused)"
    assert report["unreachable"] == cause
    verdicts = {f["check"]: (f["verdict"], f["evidence"]) for f in report["findings"]}
    assert verdicts["auth.required"] == ("ERROR", cause)
    assert verdicts["handshake.timeout"] == ("ERROR", cause)
    assert verdicts["origin.cookie"][0] == "N/A"  # needs --cookie, reachable or not
    table = run_cli(["audit", url, "--connect-timeout", "1"], cli_env(tmp_path), timeout=60)
    assert table.returncode == 3
    assert table.stdout.count("Connection refused") == 1, table.stdout
    errors = sum(1 for v, _ in verdicts.values() if v == "ERROR")
    assert re.search(rf"{errors} checks\s+│ ERROR", table.stdout), table.stdout


IN_BAND_SECRET = "in-band-secret-at-least-32-bytes-long!"
IN_BAND = '{"type": "auth", "token": "{token}"}'


def in_band_server(
    *, verify_signature: bool, ignore_refused: bool = False, serve_refused: bool = False
) -> Callable[[ServerConnection], Any]:
    """The tutorial pattern: the token in the first message, verified (or, the flaw,
    only decoded); a refused one is answered ``unauthorized`` and closed 1008 (or, the
    other flaws, the connection is kept and whatever it sends ignored, or served)."""
    import jwt

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            try:
                first = json.loads(await asyncio.wait_for(ws.recv(), 5))
                jwt.decode(
                    first["token"],
                    IN_BAND_SECRET,
                    algorithms=["HS256"],
                    options={"require": ["exp"], "verify_signature": verify_signature},
                )
            except (TimeoutError, ValueError, KeyError, TypeError, jwt.PyJWTError):
                if ignore_refused:
                    await ws.wait_closed()
                    return
                if serve_refused:  # the flaw: it says so, and serves anyway
                    await ws.send(json.dumps({"type": "error", "code": "invalid_token"}))
                else:
                    await ws.send(json.dumps({"type": "error", "error": "unauthorized"}))
                    await ws.close(1008, "invalid token")
                    return
            if not serve_refused:
                await ws.send(json.dumps({"type": "auth_ok"}))
            async for message in ws:
                value = json.loads(message) if isinstance(message, str) else None
                if isinstance(value, dict) and value.get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": value.get("id")}))
                else:
                    await ws.send(json.dumps({"type": "error", "error": "unknown message"}))

    return handler


def test_a_credential_in_the_first_message_is_judged_in_band() -> None:
    """--token-in message:JSON: the scan's token goes in the first message after the
    upgrade; a forged, expired or missing one refused in-band (error, close 1008) is the
    refusal looked for (PASS), not a late one (WEAK); a server that only decodes the
    token FAILs the forgeries."""
    checks: tuple[str, ...] = ("auth.required", "auth.malformed", "auth.signature")
    checks += ("auth.alg_none", "auth.expired", "auth.no_exp")
    options = {"jwt_secret": IN_BAND_SECRET, "token_in": "message", "token_name": IN_BAND}
    strict = scan_handler(
        in_band_server(verify_signature=True), checks, reply_timeout=0.5, **options
    )
    for item in strict.findings:
        assert item.verdict is Verdict.PASS, item
        assert "in the first message" in item.evidence, item
    flawed = scan_handler(
        in_band_server(verify_signature=False), checks, reply_timeout=0.5, **options
    )
    verdicts = {f.check: f.verdict for f in flawed.findings}
    assert verdicts["auth.signature"] is Verdict.FAIL, flawed.findings
    assert verdicts["auth.alg_none"] is Verdict.FAIL, flawed.findings
    assert verdicts["auth.required"] is Verdict.PASS  # no message at all: still refused


def test_an_in_band_credential_the_endpoint_refuses_too_judges_nothing() -> None:
    """The scan's own token (signed with another secret) is refused as the probes are:
    a connection without any credential refused says nothing then (INCONCLUSIVE, naming
    the option, never PASS); the checks that need the scan's own connection are ERRORs
    (the credential refused)."""
    options = {"jwt_secret": "x" * 40, "token_in": "message", "token_name": IN_BAND}
    report = scan_handler(
        in_band_server(verify_signature=True),
        ("auth.required", "auth.no_exp"),
        reply_timeout=0.5,
        **options,
    )
    verdicts = {f.check: f for f in report.findings}
    assert verdicts["auth.required"].verdict is Verdict.INCONCLUSIVE, verdicts
    assert "--token-in message:JSON" in verdicts["auth.required"].evidence
    assert verdicts["auth.no_exp"].verdict is Verdict.ERROR, verdicts
    assert "invalid token" in verdicts["auth.no_exp"].evidence


def test_an_in_band_refusal_that_keeps_the_connection_open_is_weak() -> None:
    """A forged token's connection kept open, its messages unanswered: not accepted, but
    every such connection stays (WEAK, saying so)."""
    options = {"jwt_secret": IN_BAND_SECRET, "token_in": "message", "token_name": IN_BAND}
    report = scan_handler(
        in_band_server(verify_signature=True, ignore_refused=True),
        ("auth.signature",),
        reply_timeout=0.5,
        **options,
    )
    (finding,) = report.findings
    assert finding.verdict is Verdict.WEAK, finding
    assert "kept open" in finding.evidence, finding


def test_an_in_band_refusal_that_still_serves_the_connection_fails() -> None:
    """An error frame that says the token is invalid, and the connection answers the
    probe's messages anyway: the forged token got in (FAIL), whatever the error said."""
    options = {"jwt_secret": IN_BAND_SECRET, "token_in": "message", "token_name": IN_BAND}
    report = scan_handler(
        in_band_server(verify_signature=True, serve_refused=True),
        ("auth.signature", "auth.alg_none"),
        reply_timeout=0.5,
        **options,
    )
    for item in report.findings:
        assert item.verdict is Verdict.FAIL, item
