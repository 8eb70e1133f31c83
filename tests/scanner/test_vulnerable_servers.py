"""The targets of ``wsguard audit``'s tests really have their flaws (tests/vulnerable_servers.py).

Each protection has a probe that observes it with a real client and returns an
observation. The secure baseline must give the secure observation for every probe;
each flaw server gives the vulnerable observation for the protection it switches off
and the secure one for every other (fast) probe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from support.vulnerable_servers import ALLOWED_ORIGIN, FLAWS, SECRET, mint, vulnerable_server

WAIT = 10.0  # upper bound for anything the server should do promptly; never reached when passing
PING = json.dumps({"type": "ping", "id": 1})


# -- clients ----------------------------------------------------------------------------


def client(
    url: str,
    token: str | None,
    *,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> connect:
    extra = dict(headers or {})
    if token is not None:
        extra["Authorization"] = f"Bearer {token}"
    return connect(
        url,
        additional_headers=extra,
        origin=None if origin is None else Origin(origin),
        open_timeout=WAIT,
    )


async def handshake(url: str, token: str | None, **kwargs: Any) -> int:
    """The HTTP status the server answers a WebSocket handshake with (101: accepted)."""
    try:
        async with client(url, token, **kwargs):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@contextlib.asynccontextmanager
async def held(url: str, count: int = 5) -> AsyncIterator[list[ClientConnection]]:
    """*count* authenticated connections, open for the duration of the block."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(client(url, mint())) for _ in range(count)]


def closed(exc: ConnectionClosed) -> str:
    return "dropped" if exc.rcvd is None else f"close {exc.rcvd.code} {exc.rcvd.reason}".strip()


def describe(frame: str | bytes) -> str:
    reply = json.loads(frame)
    return f"error:{reply['code']}" if reply["type"] == "error" else str(reply["type"])


async def outcome(ws: ClientConnection, message: Any) -> str:
    """Send *message*; describe the reply ("pong", "error:<code>") or the close."""
    try:
        await ws.send(message)
        return describe(await asyncio.wait_for(ws.recv(), WAIT))
    except ConnectionClosed as exc:
        return closed(exc)


async def flood(url: str) -> frozenset[str]:
    """40 pings at once on a new connection: the distinct outcomes."""
    seen: set[str] = set()
    async with client(url, mint()) as ws:
        with contextlib.suppress(ConnectionClosed):
            for n in range(40):
                await ws.send(json.dumps({"type": "ping", "id": n}))
        try:
            for _ in range(40):
                seen.add(describe(await asyncio.wait_for(ws.recv(), WAIT)))
        except ConnectionClosed as exc:
            seen.add(closed(exc))
    return frozenset(seen)


def upgrade(
    *, host: str | None = "127.0.0.1", target: str = "/", token: str | None = None
) -> bytes:
    lines = [f"GET {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_status(url: str, request: bytes) -> int | None:
    """Send raw bytes; the status of the HTTP response (None if there is none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(url).port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    finally:
        writer.close()
    return int(head.split()[1])


async def stalled_handshake(url: str) -> None:
    """Send half a handshake request; return when the server drops the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(url).port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(ConnectionResetError):
            await reader.read()
    finally:
        writer.close()


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def log_events(log: Path, name: str) -> int:
    count = 0
    for line in log_lines(log):
        with contextlib.suppress(ValueError):
            count += json.loads(line).get("event") == name
    return count


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll *check* (a bounded wait for something the server does asynchronously)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {WAIT}s"
        await asyncio.sleep(0.02)


def alg_none_token(alg: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    payload = jwt.decode(mint(), SECRET, algorithms=["HS256"])
    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(payload)}."


# -- probes: one per protection, each returns an observation ------------------------------


async def auth_required(url: str, log: Path) -> object:
    return await handshake(url, None)


async def alg_none_refused(url: str, log: Path) -> object:
    return tuple(
        [await handshake(url, alg_none_token(a)) for a in ("none", "None", "NONE", "nOnE")]
    )


async def expired_refused(url: str, log: Path) -> object:
    return await handshake(url, mint(-60))


async def exp_required(url: str, log: Path) -> object:
    return await handshake(url, mint(None))


ORIGINS = ("http://evil.example", "null", "http://allowed.test.evil.example", ALLOWED_ORIGIN, None)


async def origin_checked(url: str, log: Path) -> object:
    return tuple([await handshake(url, mint(), origin=origin) for origin in ORIGINS])


async def size_limited(url: str, log: Path) -> object:
    big = json.dumps({"type": "echo", "text": "x" * 9000})
    async with client(url, mint()) as ws:
        whole = await outcome(ws, big)
    async with client(url, mint()) as ws:
        fragmented = await outcome(ws, [big[i : i + 1000] for i in range(0, len(big), 1000)])
    return tuple(" ".join(seen.split()[:2]) for seen in (whole, fragmented))  # code, no reason


async def slots_released(url: str, log: Path) -> object:
    async with held(url):
        pass
    # each handler logs "closed" after releasing its slot
    await until(lambda: log_events(log, "closed") >= 5, "5 connections closed")
    return await handshake(url, mint())


SPOOFS = (
    {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"},
    {"X-Real-IP": "203.0.113.8"},
    {"Forwarded": 'for="203.0.113.9";proto=ws'},
)


async def address_not_spoofable(url: str, log: Path) -> object:
    async with held(url):
        return tuple([await handshake(url, mint(), headers=spoof) for spoof in SPOOFS])


async def conns_limited(url: str, log: Path) -> object:
    async with held(url):
        return await handshake(url, mint())


async def flood_limited(url: str, log: Path) -> object:
    return {" ".join(seen.split()[:2]) for seen in await flood(url)}  # close code, no reason


async def expiry_enforced(url: str, log: Path) -> object:
    """A connection whose token expires in 1.5 s (rounded up to a whole second); a baseline one
    expiring 0.5 s later is the clock. When either closes, does the probe's one still answer?"""
    token = mint(1.5)
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    async with (
        vulnerable_server(None) as reference,
        client(url, token) as ws,
        client(reference, mint(exp=exp + 0.5)) as clock,
    ):
        await first_closed(ws, clock)
        return await outcome(ws, PING)


async def first_closed(*connections: ClientConnection) -> None:
    waiting = [asyncio.ensure_future(ws.wait_closed()) for ws in connections]
    await asyncio.wait(waiting, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    for task in waiting:
        task.cancel()


async def nesting_survived(url: str, log: Path) -> object:
    async with client(url, mint()) as ws:
        return (await outcome(ws, "[" * 5000), await outcome(ws, PING))


async def errors_opaque(url: str, log: Path) -> object:
    async with client(url, mint()) as ws:
        await ws.send("{oops")
        frame = await asyncio.wait_for(ws.recv(), WAIT)
    reasons = await flood(url)
    return ("Traceback" in str(frame), any("Error(" in seen for seen in reasons))


async def logs_escaped(url: str, log: Path) -> object:
    token = mint()
    async with client(url, token) as ws:
        await outcome(ws, "oops\nFORGED log line")
    lines = log_lines(log)
    return (
        any(f"Bearer {token}" in line for line in lines),
        any(line.startswith("FORGED") for line in lines),
        all(map(_is_json, lines)),
    )


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


async def handshake_timed_out(url: str, log: Path) -> object:
    """A stalled handshake; a baseline connection whose token expires 0.5 s after the
    server's open_timeout (2 s) would cut the handshake off is the clock."""
    async with vulnerable_server(None) as reference:
        target = asyncio.ensure_future(stalled_handshake(url))
        async with client(reference, mint(exp=time.time() + 2.5)) as clock:
            timer = asyncio.ensure_future(clock.wait_closed())
            await asyncio.wait({target, timer}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        result = "cut off" if target.done() else "still open"
        for task in (target, timer):
            task.cancel()
        await asyncio.gather(target, timer, return_exceptions=True)
    return result


async def bad_host_survived(url: str, log: Path) -> object:
    status = await raw_status(url, upgrade(host="a b", token=mint()))
    try:
        after: object = await handshake(url, mint())
    except OSError:
        after = "refused"
    return (status, after)


async def server_header_hidden(url: str, log: Path) -> object:
    async with client(url, mint()) as ws:
        assert ws.response is not None
        return "Server" in ws.response.headers


class Protection(NamedTuple):
    probe: Callable[[str, Path], Awaitable[object]]
    secure: object
    vulnerable: object


PROTECTIONS: dict[str, Protection] = {
    "no_auth": Protection(auth_required, 401, 101),
    "alg_none": Protection(alg_none_refused, (401,) * 4, (101,) * 4),
    "accepts_expired": Protection(expired_refused, 401, 101),
    "no_exp_required": Protection(exp_required, 401, 101),
    "no_origin_check": Protection(origin_checked, (403, 403, 403, 101, 101), (101,) * 5),
    "huge_messages": Protection(size_limited, ("close 1009",) * 2, ("echo",) * 2),
    "leaky_slots": Protection(slots_released, 101, 429),
    "trusts_xff": Protection(address_not_spoofable, (429,) * 3, (101,) * 3),
    "no_conn_limit": Protection(conns_limited, 429, 101),
    "no_rate_limit": Protection(
        flood_limited, {"pong", "error:rate_limited", "close 1008"}, {"pong"}
    ),
    "no_expiry_on_open": Protection(expiry_enforced, "close 1008 token expired", "pong"),
    "crash_on_nesting": Protection(
        nesting_survived, ("error:too_deep", "pong"), ("close 1011", "close 1011")
    ),
    "leaks_errors": Protection(errors_opaque, (False, False), (True, True)),
    "logs_raw_input": Protection(logs_escaped, (False, False, True), (True, True, False)),
    "no_handshake_timeout": Protection(handshake_timed_out, "cut off", "still open"),
    "bad_host_crash": Protection(bad_host_survived, (400, 101), (500, "refused")),
    "version_header": Protection(server_header_hidden, False, True),
}
SLOW = {"no_expiry_on_open", "no_handshake_timeout"}  # each waits seconds for a timer
IMPLIED = {  # protections a flaw takes away too, by taking away what they stand on
    "no_auth": {"alg_none", "accepts_expired", "no_exp_required"},
    "no_conn_limit": {"trusts_xff"},
    "accepts_expired": {"no_expiry_on_open"},
}


async def observe(flaw: str | None, protection: str, log: Path) -> object:
    """Run *protection*'s probe against a fresh server with *flaw*."""
    async with vulnerable_server(flaw, log_file=log) as url:
        return await PROTECTIONS[protection].probe(url, log)


def test_every_flaw_has_a_probe() -> None:
    assert PROTECTIONS.keys() == FLAWS.keys()
    assert all(isinstance(checks, frozenset) for checks in FLAWS.values())
    assert len(SECRET.encode()) >= 32


@pytest.mark.parametrize("protection", PROTECTIONS)
def test_the_baseline_has_the_protection(protection: str, tmp_path: Path) -> None:
    observed = asyncio.run(observe(None, protection, tmp_path / "server.log"))
    assert observed == PROTECTIONS[protection].secure


@pytest.mark.parametrize("flaw", PROTECTIONS)
def test_the_flaw_server_lacks_the_protection(flaw: str, tmp_path: Path) -> None:
    observed = asyncio.run(observe(flaw, flaw, tmp_path / "server.log"))
    assert observed == PROTECTIONS[flaw].vulnerable


@pytest.mark.parametrize("flaw", FLAWS)
def test_the_flaw_server_keeps_the_other_protections(flaw: str, tmp_path: Path) -> None:
    skipped = {flaw} | SLOW | IMPLIED.get(flaw, set())
    others = [name for name in PROTECTIONS if name not in skipped]

    async def scenario() -> list[object]:
        probes = (observe(flaw, name, tmp_path / f"{name}.log") for name in others)
        return list(await asyncio.gather(*probes))

    observed = dict(zip(others, asyncio.run(scenario()), strict=True))
    assert observed == {name: PROTECTIONS[name].secure for name in others}


# -- details of the baseline ---------------------------------------------------------------


def nested(depth: int) -> str:
    """An echo message whose JSON nests *depth* levels deep (the object is one)."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return f'{{"type": "echo", "text": {inner}}}'


def test_baseline_messages() -> None:
    error = {"type": "error"}
    cases: list[tuple[str | bytes, dict[str, Any]]] = [
        ('{"type": "ping", "id": 7}', {"type": "pong", "id": 7}),
        ('{"type": "echo", "text": "hi"}', {"type": "echo", "text": "hi"}),
        ("{oops", {**error, "code": "invalid_json"}),
        ("[1]", {**error, "code": "not_object"}),
        ("{}", {**error, "code": "unknown_type"}),
        ('{"type": "nope"}', {**error, "code": "unknown_type"}),
        (b"\x00", {**error, "code": "binary_not_allowed"}),
        (nested(16), json.loads(nested(16))),
        (nested(17), {**error, "code": "too_deep"}),
        ("[" * 5000, {**error, "code": "too_deep"}),
        ('{"type": "ping", "id": "still open"}', {"type": "pong", "id": "still open"}),
    ]

    async def scenario() -> None:
        async with vulnerable_server(None) as url, client(url, mint()) as ws:
            for message, expected in cases:
                await ws.send(message)
                assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == expected
            await ws.send(b"\xff\xfe", text=True)  # invalid UTF-8 in a text frame
            with pytest.raises(ConnectionClosed) as caught:
                await asyncio.wait_for(ws.recv(), WAIT)
            assert caught.value.rcvd is not None and caught.value.rcvd.code == 1007

    asyncio.run(scenario())


def test_baseline_refusals_are_plain() -> None:
    async def refusal(url: str, token: str | None, origin: str | None = None) -> bytes:
        with pytest.raises(InvalidStatus) as caught:
            async with client(url, token, origin=origin):
                pass
        assert "Server" not in caught.value.response.headers
        return bytes(caught.value.response.body)

    async def scenario() -> None:
        async with vulnerable_server(None) as url:
            assert await refusal(url, None) == b"Unauthorized"
            assert await refusal(url, mint(), "http://evil.example") == b"Forbidden"
            assert await refusal(url, "not.a.jwt") == b"Unauthorized"
            forged = jwt.encode({"sub": "scanner", "exp": 2**31}, "x" * 32, algorithm="HS256")
            assert await refusal(url, forged) == b"Unauthorized"
            hs512 = jwt.encode({"sub": "scanner", "exp": 2**31}, SECRET, algorithm="HS512")
            assert await refusal(url, hs512) == b"Unauthorized"

    asyncio.run(scenario())


def test_baseline_releases_a_slot_when_a_connection_closes(tmp_path: Path) -> None:
    log = tmp_path / "server.log"

    async def scenario() -> None:
        async with vulnerable_server(None, log_file=log) as url, held(url) as connections:
            assert await handshake(url, mint()) == 429
            await connections[0].close()
            await until(lambda: log_events(log, "closed") == 1, "the handler released the slot")
            async with client(url, mint()):
                assert await handshake(url, mint()) == 429

    asyncio.run(scenario())


def test_baseline_rate_limit_is_per_connection() -> None:
    async def scenario() -> None:
        async with vulnerable_server(None) as url:
            assert "close 1008 rate limit" in await flood(url)
            async with client(url, mint()) as ws:
                assert await outcome(ws, PING) == "pong"

    asyncio.run(scenario())


ODD_REQUESTS = [
    (upgrade(host="a b"), 400),
    (upgrade(host=""), 400),
    (upgrade(host="user@evil.example"), 400),
    (upgrade(host="127.0.0.1:99999"), 400),
    (upgrade(host=None), 400),
    (upgrade(host="127.0.0.1\r\nHost: second.example"), 400),
    (upgrade(target="*"), 401),
    (upgrade(target="http://evil.example/x?y=%00"), 401),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 401),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", None),
]


def test_baseline_survives_odd_handshakes(tmp_path: Path) -> None:
    log = tmp_path / "server.log"

    async def scenario() -> None:
        async with vulnerable_server(None, log_file=log) as url:
            for request, expected in ODD_REQUESTS:
                assert await raw_status(url, request) == expected, request
            assert await handshake(url, mint()) == 101

    asyncio.run(scenario())
    assert all(map(_is_json, log_lines(log)))
