"""Malformed opening handshakes: does the target answer each one and stay up?"""

from __future__ import annotations

import asyncio
import base64
import os

from wsguard.scanner.checks.common import require_baseline, tally
from wsguard.scanner.context import ScanContext
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import host_header, raw_request


def _requests(ctx: ScanContext) -> list[tuple[str, bytes]]:
    uri = ctx.target.uri
    path = uri.resource_name
    host = host_header(uri)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = ""
    token = ctx.credentials.token
    if token is not None and ctx.options.token_in == "header":
        name = ctx.options.token_name
        auth = f"{name}: {token}\r\n" if name else f"Authorization: Bearer {token}\r\n"
    extra = "".join(f"{name}: {value}\r\n" for name, value in ctx.options.headers)
    ws = (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{auth}{extra}"
    )

    def req(
        target: str = path,
        hosts: str = f"Host: {host}\r\n",
        rest: str = ws,
        line_end: str = " HTTP/1.1",
    ) -> bytes:
        return f"GET {target}{line_end}\r\n{hosts}{rest}\r\n".encode("latin-1", "replace")

    return [
        ("Host with a space", req(hosts="Host: a b\r\n")),
        ("Host with userinfo", req(hosts=f"Host: evil@{host}\r\n")),
        ("empty Host", req(hosts="Host: \r\n")),
        ("no Host", req(hosts="")),
        ("two Hosts", req(hosts=f"Host: {host}\r\nHost: wsguard-audit.invalid\r\n")),
        ("Host with a control character", req(hosts="Host: a\x01b\r\n")),
        ("8 KiB Host", req(hosts=f"Host: {'h' * 8192}\r\n")),
        ("target '*'", req(target="*")),
        ("absolute-form target", req(target="http://wsguard-audit.invalid/")),
        ("target '//x/../'", req(target="//wsguard-audit.invalid/../")),
        ("percent-encoded NUL", req(target=f"{path.rstrip('/')}/%00%ff")),
        (
            "raw non-ASCII target",
            f"GET /\xff\xfe HTTP/1.1\r\nHost: {host}\r\n{ws}\r\n".encode("latin-1"),
        ),
        ("bad Sec-WebSocket-Key", req(rest=ws.replace(key, "not-a-key"))),
        ("Sec-WebSocket-Version: 8", req(rest=ws.replace("Version: 13", "Version: 8"))),
        ("HTTP/1.0", req(line_end=" HTTP/1.0")),
        ("method FOO", b"FOO" + req()[3:]),
        ("header line without a colon", req(rest=ws + "no colon here\r\n")),
        ("200 headers", req(rest=ws + "".join(f"X-A{i}: b\r\n" for i in range(200)))),
        ("32 KiB header", req(rest=ws + f"X-Big: {'b' * 32768}\r\n")),
        (
            "binary garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        ),
    ]


SHOULD_NOT_UPGRADE = frozenset(
    {
        "no Host",
        "two Hosts",
        "bad Sec-WebSocket-Key",
        "Sec-WebSocket-Version: 8",
        "HTTP/1.0",
        "method FOO",
        "target '*'",
        "empty Host",
        "Host with a control character",
    }
)


@check(
    "handshake.malformed",
    "Malformed handshakes are answered and the server stays up",
    group="handshake",
    references=(f"{OWASP}: Input Validation", "RFC 6455 §4.2.1", "RFC 9110 §7.2"),
    remedy="Parse the request defensively; answer 400/405/426/431 and keep serving.",
    aggressive=True,
    order=100,  # last: a target that dies here takes every later check with it
    budget_seconds=180.0,
)
async def malformed_handshakes(ctx: ScanContext) -> Finding:
    await require_baseline(ctx)  # "stopped serving" means nothing if it never served us
    lines: list[str] = []
    outcomes: list[str] = []
    server_errors: list[str] = []
    upgraded: list[str] = []
    for label, data in _requests(ctx):
        ctx.rotate()
        response = await raw_request(ctx.endpoint, data, wait=ctx.options.connect_timeout)
        if response.body:
            ctx.record(f"HTTP {response.status} body", response.body.decode("utf-8", "replace"))
        lines.append(f"{label}: {response.describe()}")
        outcomes.append(response.describe())
        if response.status == 500:  # an unhandled error (505, 503 are answers)
            server_errors.append(f"{label}: {response.describe()}")
        if response.status == 101 and label in SHOULD_NOT_UPGRADE:
            upgraded.append(label)
        alive, how = await ctx.alive()
        if not alive:  # one hiccup is not a crash: look again, after a second
            await asyncio.sleep(1.0)
            alive, how = await ctx.alive()
        if not alive:
            return finding(
                ctx.check_id,
                Verdict.FAIL,
                f"after '{label}' ({response.describe()}) the server stopped accepting "
                f"connections ({how})",
                *lines,
            )
    if server_errors:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"survived, but answered with server errors: {'; '.join(server_errors)}",
            *lines,
        )
    if upgraded:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"survived, but upgraded malformed requests: {', '.join(upgraded)}",
            *lines,
        )
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"{tally(outcomes)}; still serving",
        *lines,
    )
