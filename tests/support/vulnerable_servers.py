"""Deliberately vulnerable WebSocket servers, the targets of ``wsguard audit``'s tests.

``vulnerable_server(None)`` is a small but careful server (the secure baseline);
``vulnerable_server(flaw)`` is the same server with exactly one protection switched off.
``FLAWS`` maps each flaw to the ids of the scanner checks expected to FAIL against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import math
import pathlib
import re
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import jwt
from jwt.types import Options
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import SERVER, Request, Response
from websockets.protocol import State

SECRET = "wsguard-audit-vulnerable-server-secret-0123456789abcdef0123456789abcdef"
ALLOWED_ORIGIN = "http://allowed.test"

FLAWS: dict[str, frozenset[str]] = {
    "no_auth": frozenset({"auth.required"}),
    "alg_none": frozenset({"auth.alg_none"}),
    # a server that never looks at exp also lets open connections outlive it
    "accepts_expired": frozenset({"auth.expired", "token.expiry"}),
    "no_exp_required": frozenset({"auth.no_exp"}),
    "no_origin_check": frozenset({"origin.foreign", "origin.null", "origin.lookalike"}),
    "huge_messages": frozenset({"size.limit", "size.frame", "size.fragments"}),
    "leaky_slots": frozenset({"conns.release"}),
    "trusts_xff": frozenset({"address.spoofing"}),
    "no_conn_limit": frozenset({"conns.limit"}),
    "no_rate_limit": frozenset({"flood.rate_limit"}),
    "no_expiry_on_open": frozenset({"token.expiry"}),
    "crash_on_nesting": frozenset({"malformed.nesting"}),
    "leaks_errors": frozenset({"disclosure.errors"}),
    "logs_raw_input": frozenset({"logs.injection"}),
    "no_handshake_timeout": frozenset({"handshake.timeout"}),
    "bad_host_crash": frozenset({"handshake.malformed"}),
    "version_header": frozenset(),  # the scanner only WARNs on a Server header
}

MAX_SIZE = 8192
MAX_DEPTH = 16
CONNECTIONS_PER_ADDRESS = 5
BURST = 20
REFILL_PER_SECOND = 10.0
REFUSALS_BEFORE_CLOSE = 10
HANDSHAKE_TIMEOUT = 2.0

_HOST = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?")


def mint(exp_in: float | None = 3600, **claims: Any) -> str:
    """An HS256 token signed with SECRET; ``exp`` is ``exp_in`` seconds away (rounded up)."""
    payload: dict[str, Any] = {"sub": "scanner"}
    if exp_in is not None:
        payload["exp"] = math.ceil(time.time() + exp_in)
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def vulnerable_server(
    flaw: str | None, *, log_file: pathlib.Path | None = None
) -> AsyncIterator[str]:
    """Serve on 127.0.0.1:<ephemeral> in the current event loop; yield its ws:// URL.

    ``flaw=None`` is the secure baseline. ``log_file``: where the server writes its
    log lines (one per event).
    """
    if flaw is not None and flaw not in FLAWS:
        raise ValueError(f"unknown flaw {flaw!r}")
    state = _Server(flaw, log_file)
    async with serve(
        state.handler,
        "127.0.0.1",
        0,
        process_request=state.process_request,
        max_size=None if flaw == "huge_messages" else MAX_SIZE,
        compression=None,
        open_timeout=None if flaw == "no_handshake_timeout" else HANDSHAKE_TIMEOUT,
        ping_interval=1,
        ping_timeout=2,
        server_header=SERVER if flaw == "version_header" else None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


class _Bucket:
    """Token bucket: BURST messages at once, refilled at REFILL_PER_SECOND."""

    def __init__(self) -> None:
        self.tokens = float(BURST)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.stamp) * REFILL_PER_SECOND)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Server:
    """The baseline server; ``flaw`` switches off one protection."""

    def __init__(self, flaw: str | None, log_file: pathlib.Path | None) -> None:
        self.flaw = flaw
        self.log_file = log_file
        self.counts: Counter[str] = Counter()  # open connections per address
        self.slots: dict[ServerConnection, str] = {}  # connection -> address it counts against
        self.claims: dict[ServerConnection, dict[str, Any]] = {}

    # -- logging ---------------------------------------------------------------------

    def log(self, event: str, **fields: Any) -> None:
        """One escaped JSON line per event; never tokens, headers or message bodies."""
        self.write(json.dumps({"event": event, **fields}) + "\n")

    def write(self, text: str) -> None:
        if self.log_file is not None:
            with self.log_file.open("a", encoding="utf-8") as out:
                out.write(text)

    # -- the opening handshake -------------------------------------------------------

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if self.flaw == "logs_raw_input":
            self.write(f"request {request.path}\n{request.headers}")
        peer = _peer(ws)
        if not _valid_host(request.headers.get_all("Host")):
            if self.flaw == "bad_host_crash":
                ws.server.server.close()  # stop listening now, before the response goes out
                ws.server.close()
                return ws.respond(http.HTTPStatus.INTERNAL_SERVER_ERROR, "Internal Server Error")
            return self.refuse(ws, peer, http.HTTPStatus.BAD_REQUEST, "Bad Request")
        claims = self.authenticate(request)
        if claims is None:
            return self.refuse(ws, peer, http.HTTPStatus.UNAUTHORIZED, "Unauthorized")
        if not self.origin_allowed(request.headers.get_all("Origin")):
            return self.refuse(ws, peer, http.HTTPStatus.FORBIDDEN, "Forbidden")
        if not self.acquire(ws, self.address(peer, request)):
            return self.refuse(ws, peer, http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests")
        self.claims[ws] = claims
        # The handler cleans up; this covers handshakes that fail after this point.
        ws.connection_lost_waiter.add_done_callback(lambda _: self.forget(ws))
        return None

    def refuse(
        self, ws: ServerConnection, peer: str, status: http.HTTPStatus, text: str
    ) -> Response:
        self.log("refused", peer=peer, status=int(status))
        return ws.respond(status, text)

    def authenticate(self, request: Request) -> dict[str, Any] | None:
        """The token's claims, or None when the request is not authenticated."""
        if self.flaw == "no_auth":
            return {}
        values = request.headers.get_all("Authorization")
        scheme, _, token = values[0].strip().partition(" ") if len(values) == 1 else ("", "", "")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip()
        options: Options = {"require": ["exp"]}
        if self.flaw == "accepts_expired":
            options["verify_exp"] = False
        elif self.flaw == "no_exp_required":
            options["require"] = []
        try:
            if self.flaw == "alg_none" and _alg(token).lower() == "none":
                unverified: Options = {**options, "verify_signature": False, "verify_exp": True}
                return dict(jwt.decode(token, options=unverified))
            return dict(jwt.decode(token, SECRET, algorithms=["HS256"], options=options))
        except Exception:  # any malformed token is just unauthenticated
            return None

    def origin_allowed(self, origins: list[str]) -> bool:
        if self.flaw == "no_origin_check" or not origins:
            return True
        return origins == [ALLOWED_ORIGIN]

    def address(self, peer: str, request: Request) -> str:
        """The address the connection limit counts against: the TCP peer."""
        if self.flaw == "trusts_xff":
            return _forwarded_for(request) or peer
        return peer

    def acquire(self, ws: ServerConnection, address: str) -> bool:
        if self.flaw == "no_conn_limit":
            return True
        if self.counts[address] >= CONNECTIONS_PER_ADDRESS:
            return False
        self.counts[address] += 1
        if self.flaw != "leaky_slots":
            self.slots[ws] = address
        return True

    def forget(self, ws: ServerConnection) -> None:
        """Release the connection's slot (idempotent)."""
        self.claims.pop(ws, None)
        address = self.slots.pop(ws, None)
        if address is not None:
            self.counts[address] -= 1
            if self.counts[address] <= 0:
                del self.counts[address]

    # -- the connection --------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        claims = self.claims.pop(ws, {})
        self.log("opened", peer=peer)
        expiry: asyncio.Task[None] | None = None
        if "exp" in claims and self.flaw not in ("no_expiry_on_open", "accepts_expired"):
            expiry = asyncio.create_task(self.expire(ws, claims["exp"]))
        bucket = _Bucket()
        refusals = 0
        closing: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                if closing is not None or ws.state is not State.OPEN:
                    continue  # drain what the client sent before the close (flow control)
                if self.flaw != "no_rate_limit" and not bucket.take():
                    refusals += 1
                    self.log("refused", peer=peer, code="rate_limited")
                    await _send(ws, _error("rate_limited"))
                    if refusals >= REFUSALS_BEFORE_CLOSE:
                        detail = OverflowError(f"bucket empty for {peer}: {refusals} refusals")
                        closing = asyncio.create_task(self.policy_close(ws, "rate limit", detail))
                    continue
                await _send(ws, self.reply(message))
        except ConnectionClosed:
            pass
        finally:
            if expiry is not None:
                expiry.cancel()
            self.forget(ws)
            self.log("closed", peer=peer)

    async def expire(self, ws: ServerConnection, exp: Any) -> None:
        try:
            delay = float(exp) - time.time()
        except (TypeError, ValueError):
            delay = 0.0  # an unusable exp (only reachable when exp is not verified)
        await asyncio.sleep(max(0.0, delay))
        self.log("expired", peer=_peer(ws))
        await self.policy_close(
            ws, "token expired", jwt.ExpiredSignatureError("Signature has expired")
        )

    async def policy_close(self, ws: ServerConnection, reason: str, exc: Exception) -> None:
        if self.flaw == "leaks_errors":
            reason = f"{reason}: {exc!r}".encode()[:123].decode(errors="ignore")
        await ws.close(1008, reason)

    def reply(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            return self.error("binary_not_allowed")
        if self.flaw == "logs_raw_input":
            self.write(f"message {message}\n")
        try:
            data = json.loads(message)
        except ValueError:
            return self.error("invalid_json", leak=traceback.format_exc())
        except RecursionError:
            if self.flaw == "crash_on_nesting":
                raise
            return self.error("too_deep", leak=traceback.format_exc())
        if _depth(data) > MAX_DEPTH:
            return self.error("too_deep")
        if not isinstance(data, dict):
            return self.error("not_object")
        kind = data.get("type")
        if kind == "ping":
            self.log("message", type="ping")
            return {"type": "pong", "id": data.get("id")}
        if kind == "echo":
            self.log("message", type="echo")
            return {"type": "echo", "text": data.get("text")}
        return self.error("unknown_type")

    def error(self, code: str, *, leak: str | None = None) -> dict[str, Any]:
        self.log("error", code=code)
        frame = _error(code)
        if leak is not None and self.flaw == "leaks_errors":
            frame["detail"] = leak
        return frame


async def _send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    """Send a frame unless the connection is closing (the handler keeps draining it)."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(frame))


def _error(code: str) -> dict[str, Any]:
    return {"type": "error", "code": code}


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return str(address[0]) if address else "unknown"


def _valid_host(values: list[str]) -> bool:
    if len(values) != 1:
        return False
    match = _HOST.fullmatch(values[0])
    return match is not None and (match.group(1) is None or int(match.group(1)) <= 65535)


def _alg(token: str) -> str:
    return str(jwt.get_unverified_header(token).get("alg", ""))


def _forwarded_for(request: Request) -> str | None:
    """The client address proxies claim (the flaw trusts_xff believes it)."""
    headers = request.headers
    for value in headers.get_all("X-Forwarded-For"):
        if first := value.split(",")[0].strip():
            return first
    for value in headers.get_all("X-Real-IP"):
        if value.strip():
            return value.strip()
    for value in headers.get_all("Forwarded"):
        for pair in value.split(",")[0].split(";"):
            name, _, node = pair.strip().partition("=")
            if name.lower() == "for" and node.strip('"'):
                return node.strip('"')
    return None


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), measured iteratively."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest
