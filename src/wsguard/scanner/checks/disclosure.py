"""Information disclosure in what the target says, and injection into what it logs."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

from wsguard.scanner.checks.common import exchange_all, require_baseline
from wsguard.scanner.context import CheckError, NotApplicable, ScanContext, short
from wsguard.scanner.dialect import loads
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import host_header, raw_request

LEAKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "a Python traceback",
        re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+"),
    ),
    ("a JavaScript stack", re.compile(r"\n\s+at [\w.$<>\[\] ]+ \(?[^)\s]+:\d+:\d+\)?")),
    ("a Java/.NET stack", re.compile(r"\bat [\w.$]+\([\w]+\.(java|cs):\d+\)|Exception in thread")),
    ("a Go panic", re.compile(r"goroutine \d+ \[|panic: ")),
    ("an exception name", re.compile(r"\b[A-Z]\w*(Error|Exception)(: |\(|:$)")),
    (
        "a file system path",
        re.compile(r"(/home/|/usr/(local/)?lib/|/var/www/|/opt/|/srv/|[A-Z]:\\\\)\w"),
    ),
    ("a database error", re.compile(r"SQL syntax|sqlite3\.|psycopg|ORA-\d{5}|SQLSTATE")),
)
VERSION = re.compile(r"\d+\.\d+")


@check(
    "disclosure.errors",
    "Error frames, close reasons and error pages reveal no internals",
    group="disclosure",
    references=(f"{OWASP}: Error Handling", "ASVS 5.0 V16.5.1", "CWE-209"),
    remedy="Answer stable error codes; log details server-side only; drop the Server "
    "version (websockets: server_header=None).",
)
async def errors(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)
    marker = f"wsguard-audit-{os.urandom(4).hex()}"
    provocations = (
        '{"type": "' + marker,
        '{"type": "' + marker + '"}',
        '{"type": "ping", "id": {"' + marker + '": [1e999]}}',
        marker + "'\"; --",
    )
    await exchange_all(ctx, [(text, False) for text in provocations])  # answers: transcript
    uri = ctx.target.uri
    plain_get = f"GET {uri.resource_name} HTTP/1.1\r\nHost: {host_header(uri)}\r\n\r\n".encode()
    page = await raw_request(ctx.endpoint, plain_get, wait=ctx.options.connect_timeout)
    if page.head:
        for line in page.head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() in ("server", "x-powered-by"):
                ctx.record(f"{name.strip()} header", value.strip())
    if page.body:
        ctx.record(f"HTTP {page.status} body", page.body.decode("utf-8", "replace"))
    leaks: list[str] = []
    versions: list[str] = []
    reflected: list[str] = []
    seen = 0
    for where, text in ctx.transcript:
        seen += 1
        readable = f"{text}\n{_strings(text)}"  # a stack inside a JSON string, unescaped
        for what, pattern in LEAKS:
            if pattern.search(readable):
                leaks.append(f"{what} in a {where}: {short(text, 80)}")
                break
        if where.endswith("header") and VERSION.search(text):
            versions.append(f"{where}: {text}")
        elif marker in text and where in ("error frame", "close reason"):
            reflected.append(where)
    if leaks:
        return finding(ctx.check_id, Verdict.FAIL, leaks[0], *leaks[1:6])
    if versions:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"software versions disclosed: {'; '.join(sorted(set(versions)))}",
        )
    note = f"; input echoed in {', '.join(sorted(set(reflected)))}" if reflected else ""
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"{seen} texts from the target (messages, errors, close reasons, headers, pages): "
        f"no stack traces, paths, exception names or versions{note}",
    )


def _strings(text: str) -> str:
    """The string values of a JSON message, decoded (newlines real again), one per line."""
    value = loads(text)
    if not isinstance(value, dict | list):
        return ""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack and len(out) < 200:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item[:200])
    return "\n".join(out)


@check(
    "logs.injection",
    "Client input cannot forge log lines, and credentials are not logged",
    group="disclosure",
    references=(f"{OWASP}: Logging", "ASVS 5.0 V16.4.1", "CWE-117", "CWE-532"),
    remedy="Log structured records (JSON) with control characters escaped; never log tokens "
    "or payloads (wsguard's audit log does neither).",
)
async def log_injection(ctx: ScanContext) -> Finding:
    path = ctx.options.server_log
    if path is None:
        raise NotApplicable(
            "needs --server-log (the target's log file, readable here)", needs="--server-log"
        )
    await require_baseline(ctx)
    start = _size(path)
    marker = f"wsguard-audit-{os.urandom(4).hex()}"
    forged = f"FORGED {marker}"
    injections = (
        '{"type": "ping", "id": "' + marker + "\\nFORGED " + marker + '"}',
        '{"type": "' + marker + "\\r\\nFORGED " + marker + '"}',
        marker + "\nFORGED " + marker + "\x1b[2J",
    )
    await exchange_all(ctx, [(text, False) for text in injections])
    token = ctx.credentials.token or ""
    text = ""
    # the target may write asynchronously: poll (bounded, 3 s) until the marker shows or
    # the log has grown and then stayed still for 0.3 s
    quiet, last = 0, -1
    for _ in range(30):
        text = _read_from(path, start)
        if marker in text or (token and token in text):
            break
        quiet = quiet + 1 if len(text) == last and text else 0
        if quiet >= 3:
            break
        last = len(text)
        await asyncio.sleep(0.1)
    if not text:
        raise CheckError(
            f"{path} did not grow while the scan connected and sent messages: is it the "
            "target's log (and is it flushed)?"
        )
    problems = []
    if any(
        line.startswith(forged) or line.lstrip().startswith(forged) for line in text.splitlines()
    ):
        problems.append("a newline in a message forged a log line")
    if "\x1b[" in text:
        problems.append("raw escape sequences reached the log")
    if token and token in text:
        problems.append("the credential was written to the log")
    if problems:
        return finding(ctx.check_id, Verdict.FAIL, "; ".join(problems) + f" ({path})")
    seen = "marker logged, escaped" if marker in text else "input not logged"
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"{seen}; no forged lines, no escape sequences, no credential ({_size(path) - start} "
        f"bytes of new log read)",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except OSError as exc:
        raise NotApplicable(
            f"cannot read --server-log: {exc.strerror}", needs="--server-log"
        ) from None
