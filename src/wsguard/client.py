"""``wsguard.client``: a small asyncio client for wsguard servers, built on ``websockets``.

It connects with a token (``Authorization`` header or subprotocol entry) and an
optional client certificate, signs the message types you name, refreshes its
token in-band before it expires, and reconnects with jittered exponential
back-off when the connection drops. There is at most one connection at a time: callers
that find it dropped (``recv()`` and ``send()`` at once, say) wait for the same reconnect,
and a message is signed only once the connection it goes on (and its session key) is
there::

    from wsguard.client import WsguardClient

    async with WsguardClient("wss://chat.example.com/", token_provider=get_token,
                             signed_types={"transfer"}) as client:
        await client.send({"type": "transfer", "amount": 10})
        reply = await client.recv()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal

import jwt
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

from wsguard.core.integrity import SESSION_KID, decode_secret, sign
from wsguard.observability.engine_log import quiet_logger

logger = logging.getLogger("wsguard.client")

TokenProvider = Callable[[], str | Awaitable[str]]

# A connection that lasted this long resets the reconnect back-off.
_STABLE_SECONDS = 60.0
# The shortest wait before a token refresh (one per second at most, near the expiry).
_MIN_REFRESH_SECONDS = 1.0

# Close codes after which reconnecting cannot help (the client must change something).
FINAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4003})
CLOSE_EXPIRED = 4001  # the token expired: a reconnect needs a new one (a provider)


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from wsguard.core.client_address import is_loopback_host

    host = urlsplit(url).hostname or ""
    return is_loopback_host(host)


class ClientError(Exception):
    """The server refused us in a way reconnecting will not fix."""


#: The characters of an HTTP token (RFC 7230 3.2.6): all a subprotocol entry may hold.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Connect(connect):
    """websockets' ``connect`` without following redirects: the token (in a subprotocol
    entry, which websockets does not strip on a cross-origin redirect as it does
    ``Authorization``) goes only where the caller pointed it. Browsers do not follow
    redirects on a WebSocket handshake either."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def _signing_key(kid: str, secret: bytes | str) -> tuple[str, bytes]:
    """A signing key as given: the secret's bytes, or the base64url text the server's keys
    file holds (``signing.keys_file``), decoded; at least 32 bytes either way."""
    if isinstance(secret, str):
        try:
            secret = decode_secret(secret)
        except ValueError:
            raise ValueError("signing_key: the secret text is not base64url") from None
    if not isinstance(secret, bytes) or len(secret) < 32:
        raise ValueError("signing_key: the secret must be at least 32 bytes")
    return kid, secret


def _token_exp(token: str) -> float | None:
    """The ``exp`` a JWT says it has (read, not verified: only to schedule its refresh)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


async def _discard(ws: ClientConnection) -> None:
    """Close a connection that is no longer current (bounded by its close timeout)."""
    with contextlib.suppress(Exception):
        await ws.close()


class WsguardClient:
    """One logical connection to a wsguard server, re-established when it drops."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        transport: Literal["header", "subprotocol"] = "header",
        subprotocol: str = "wsguard.v1",
        ssl_context: ssl.SSLContext | None = None,
        signing_key: tuple[str, bytes | str] | None = None,
        signed_types: Collection[str] = (),
        refresh_margin: float = 30.0,
        reconnect: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_attempts: int = 10,
        origin: str | None = None,
        open_timeout: float = 10.0,
        expect_welcome: bool = True,
        max_size: int | None = 1 << 20,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("token or token_provider is required")
        if url.startswith("ws://") and not _loopback_url(url):
            logger.warning(
                "%s is plain ws://: the token and every message cross the network in clear "
                "text (use wss://)",
                url.split("?", 1)[0],
            )
        self.url = url
        self._token = token
        self._provider = token_provider
        self._transport = transport
        self._subprotocol = subprotocol
        self._ssl = ssl_context
        self._signing_key = None if signing_key is None else _signing_key(*signing_key)
        self._signed = frozenset(signed_types)
        self._margin = refresh_margin
        self._reconnect = reconnect
        self._backoff = (backoff_initial, backoff_max)
        self._max_attempts = max_attempts
        self._origin = origin
        self._open_timeout = open_timeout
        self._expect_welcome = expect_welcome
        self._max_size = max_size
        self._early: list[dict[str, Any]] = []  # the app's first message, when no welcome
        self._ws: ClientConnection | None = None
        self._session_key: bytes | None = None
        self._connecting: asyncio.Task[None] | None = None  # the one (re)connect under way
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self.welcome: dict[str, Any] = {}
        self.expires_at: float | None = None
        self.reconnects = 0
        self._opened_at = 0.0  # when the current connection opened (monotonic)
        self._drops = 0  # connections in a row that closed soon after they opened

    # -- connection ----------------------------------------------------------------

    async def _token_now(self, *, fresh: bool = False) -> str:
        if self._provider is not None and (fresh or self._token is None):
            value = self._provider()
            self._token = await value if inspect.isawaitable(value) else value
        assert self._token is not None
        token = self._token.strip(" \t\r\n")  # a provider that forgot strip()
        if not token or not all("!" <= ch <= "~" for ch in token):
            if self._provider is not None:
                self._token = None  # not kept: the provider is asked again next time
            # said without the token: the engine's own errors would quote it whole
            raise ClientError(
                "the token is not a bearer token (empty, or with spaces or control "
                "characters inside)"
            )
        if self._transport == "subprotocol" and not set(token) <= _TCHARS:
            if self._provider is not None:
                self._token = None
            raise ClientError(
                "the token cannot travel as a subprotocol entry (characters outside an HTTP "
                "token, such as '/', '=' or ','): use transport='header'"
            )
        self._token = token
        return token

    def _cause(self, exc: BaseException | None) -> BaseException | None:
        """*exc* as the cause of a ClientError, unless it (or what it chains) quotes the
        token (a server that echoes the token entry back): then none, so that no traceback
        prints it."""
        token = self._token
        seen = exc
        while token and seen is not None:
            if token in str(seen) or token in repr(seen.args):
                return None
            seen = seen.__cause__ or seen.__context__
        return exc

    def _hidden(self, text: str) -> str:
        """*text* (an engine's error) without the token, should it quote it."""
        token = self._token
        return text.replace(token, "<token>") if token else text

    async def _open(self, *, fresh_token: bool = False) -> None:
        token = await self._token_now(fresh=fresh_token)
        headers: dict[str, str] = {}
        protocols = [Subprotocol(self._subprotocol)]
        if self._transport == "header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            protocols.append(Subprotocol(f"token.{token}"))
        options: dict[str, Any] = {}
        if self._ssl is not None:  # else websockets' default: a verifying context for wss://
            options["ssl"] = self._ssl
        ws = await _Connect(
            self.url,
            additional_headers=headers,
            subprotocols=protocols,
            origin=self._origin,  # type: ignore[arg-type]
            open_timeout=self._open_timeout,
            max_size=self._max_size,
            logger=quiet_logger("wsguard.client.engine"),  # its records hold the token
            **options,
        )
        welcome: dict[str, Any] = {}
        self._early = []
        if self._expect_welcome:
            try:
                first = await self._first_message(ws)
            except BaseException:
                await _discard(ws)  # never left open behind us
                raise
            if first.get("type") == "welcome":
                welcome = first
            else:  # an app that speaks first (the ASGI middleware sends no welcome)
                self._early.append(first)
        # the connection and its session key become current together
        self.welcome = welcome
        signing = welcome.get("signing")
        self._session_key = None
        if isinstance(signing, dict) and isinstance(signing.get("key"), str):
            key = signing["key"]
            self._session_key = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        exp = welcome.get("expires_at")
        self.expires_at = float(exp) if isinstance(exp, (int, float)) else None
        self._ws = ws
        self._opened_at = time.monotonic()
        self._schedule_refresh()

    async def _first_message(self, ws: ClientConnection) -> dict[str, Any]:
        """The server's first message, within ``open_timeout``."""
        try:
            async with asyncio.timeout(self._open_timeout):
                data = await ws.recv()
        except TimeoutError:
            # retried like a handshake that timed out (a server still warming up)
            raise TimeoutError(
                f"no message within {self._open_timeout:g}s of the upgrade: a wsguard "
                "server sends a welcome frame first (for one that does not, such as an app "
                "behind the ASGI middleware or the gateway: expect_welcome=False)"
            ) from None
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ClientError("the server's first message is not JSON") from None
        if not isinstance(message, dict):
            raise ClientError("the server's first message is not a JSON object")
        return message

    async def connect(self) -> dict[str, Any]:
        """Connect (retrying with back-off when allowed); returns the welcome frame.

        An open connection is closed first (there is never more than one), and callers
        arriving while a (re)connect is under way share it."""
        await self._current(replace=self._ws)
        return self.welcome

    async def _current(
        self, *, replace: ClientConnection | None = None, dropped: bool = False
    ) -> ClientConnection:
        """The connection, once it is there: a new one when there is none, or when the
        current one is still *replace* (``dropped``: it closed under us, so the new one
        comes after a jittered pause). Concurrent callers wait for the same attempt."""
        while True:
            ws = self._ws
            if ws is not None and ws is not replace:
                return ws
            if self._closed:
                raise ClientError("the client is closed")
            task = self._connecting
            if task is None:
                self._ws = None  # from now on, every caller waits for the new one
                task = asyncio.get_running_loop().create_task(
                    self._replace(ws, dropped=dropped and ws is not None)
                )
                self._connecting = task
                task.add_done_callback(self._connected)
            await asyncio.wait({task})  # a caller cancelled here leaves it to the others
            if task.cancelled():
                raise ClientError("the client is closed")
            error = task.exception()
            if error is not None:
                raise error
            replace = None  # the old one is gone: whatever is current now is new

    def _connected(self, task: asyncio.Task[None]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: every caller got it

    async def _replace(self, old: ClientConnection | None, *, dropped: bool) -> None:
        """The one (re)connect under way: close *old* (its slot on the server comes back
        first), wait a jittered pause when it dropped, open the new one."""
        if old is not None:
            await _discard(old)
        if dropped:
            code = old.close_code if old else None
            logger.info("connection closed (%s); reconnecting", code)
            if self._provider is not None:
                self._token = None  # never retry with a token that may have expired
            self.reconnects += 1
            # a connection the server closes soon after opening it (1013: try again
            # later, 1011...) makes the pauses grow as failed attempts do, and gives up
            lived = time.monotonic() - self._opened_at
            self._drops = self._drops + 1 if lived < _STABLE_SECONDS else 1
            if self._drops > self._max_attempts:
                raise ClientError(
                    f"the server closed {self._drops - 1} connections in a row soon after "
                    f"opening them (last close code {code})"
                )
            await asyncio.sleep(self._jitter(self._drops))
        await self._connect_with_retries()
        if self._closed:  # closed while connecting: leave nothing open
            ws, self._ws = self._ws, None
            if ws is not None:
                await _discard(ws)
            raise ClientError("the client is closed")

    def _may_reconnect(self, code: int | None) -> bool:
        """After a close with *code* (None: no close frame), is a reconnect worth it?
        Not after a final code, nor after 4001 (expired) with a token that cannot change."""
        if self._closed or not self._reconnect or (code or 1006) in FINAL_CLOSE_CODES:
            return False
        return not (code == CLOSE_EXPIRED and self._provider is None)

    def _reconnect_after(self, ws: ClientConnection) -> bool:
        """*ws* is closed: is a reconnect worth it? A close this client sent itself with
        1009 (a message from the server over ``max_size``) is final: the next connection
        would get the same message."""
        sent, rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
        if rcvd is None and sent is not None and sent.code == 1009:
            raise ClientError(
                f"a message from the server was over max_size ({self._max_size} "
                "bytes): closed 1009, not reconnecting"
            )
        return self._may_reconnect(rcvd.code if rcvd is not None else None)

    async def _connect_with_retries(self) -> None:
        attempt = 0
        refusals = 0  # 401s: the token refused
        last: Exception | None = None
        last_why = ""
        while True:
            try:
                await self._open(fresh_token=attempt > 0)
                return
            except ssl.SSLCertVerificationError as exc:  # retrying cannot fix it
                raise ClientError(
                    f"server certificate refused: {exc.verify_message}"
                ) from self._cause(exc)
            except InvalidStatus as exc:
                last, last_why = exc, self._hidden(str(exc))
                status = exc.response.status_code
                if 300 <= status < 400:
                    raise ClientError(
                        f"handshake redirected with HTTP {status}: not followed (the token "
                        "goes only to the URL given); connect to the URL it names"
                    ) from self._cause(exc)
                if status in (400, 403, 405, 426) or not self._reconnect:
                    raise ClientError(f"handshake refused with HTTP {status}") from self._cause(exc)
                if status == 401:
                    # the token is refused: only another one can help, and every refusal
                    # counts toward a ban of the address (every user behind it): one
                    # fresh token from the provider, then no more
                    refused = self._token
                    if self._provider is None or refusals >= 1:
                        raise ClientError(
                            "handshake refused with HTTP 401: the token is refused (not "
                            "retried: each refusal counts toward a ban of this address)"
                        ) from self._cause(exc)
                    refusals += 1
                    if await self._token_now(fresh=True) == refused:
                        raise ClientError(
                            "handshake refused with HTTP 401, and the token provider "
                            "returns the same token"
                        ) from self._cause(exc)
                    continue
                retry_after = exc.response.headers.get("Retry-After")
                delay = (
                    min(float(retry_after), self._backoff[1])  # a server's wish, bounded
                    if retry_after and retry_after.isdigit()
                    else None
                )
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                # InvalidHandshake: no valid HTTP response (the server dropped the
                # connection: a client certificate it requires, a proxy in between...)
                why = f"{exc} ({exc.__cause__})" if exc.__cause__ is not None else str(exc)
                why = self._hidden(why)  # a server echoing the token entry gets it quoted
                if not self._reconnect:
                    raise ClientError(f"cannot connect: {why}") from self._cause(exc)
                last, last_why = exc, why
                delay = None
            attempt += 1
            if attempt >= self._max_attempts:
                raise ClientError(f"gave up after {attempt} attempts: {last_why}") from self._cause(
                    last
                )
            await asyncio.sleep(delay if delay is not None else self._jitter(attempt))

    def _jitter(self, attempt: int) -> float:
        """Full-jitter exponential back-off."""
        initial, maximum = self._backoff
        return random.uniform(0, min(maximum, initial * 2**attempt))  # noqa: S311

    # -- token refresh ---------------------------------------------------------------

    def _schedule_refresh(self, expires_at: float | None = None) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        expires_at = self.expires_at if expires_at is None else expires_at
        if expires_at is None or self._provider is None:
            return
        remaining = expires_at - time.time()
        delay = remaining - self._margin
        if delay < _MIN_REFRESH_SECONDS:
            # a token with less life than the margin (or a provider that returns the same
            # token again): half of what is left, never a refresh loop
            delay = max(_MIN_REFRESH_SECONDS, remaining / 2)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_after(delay))

    async def _refresh_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            token = await self._token_now(fresh=True)
        except Exception as exc:  # the provider failed: said, and tried again
            logger.warning("token refresh failed (%s); trying again", type(exc).__name__)
            remaining = (self.expires_at or time.time()) - time.time()
            if remaining > _MIN_REFRESH_SECONDS:
                self._refresher = asyncio.get_running_loop().create_task(
                    self._refresh_after(max(_MIN_REFRESH_SECONDS, min(30.0, remaining / 2)))
                )
            return
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(orjson.dumps({"type": "auth", "token": token}).decode())
                # the next refresh, from the new token's own exp: a client that only sends
                # never reads the auth_ok that would schedule it (it reschedules this)
                exp = _token_exp(token)
                if exp is not None:
                    self.expires_at = exp  # the token in use now (auth_ok confirms it)
                    self._refresher = None  # this task: not cancelled by the scheduling
                    self._schedule_refresh()

    # -- messages ------------------------------------------------------------------------

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """Add the envelope (kid, nonce, ts, sig) with the configured or session key."""
        if self._signing_key is not None:
            kid, secret = self._signing_key
        elif self._session_key is not None:
            kid, secret = SESSION_KID, self._session_key
        else:
            raise ClientError("no signing key: pass signing_key or enable session keys")
        nonce = secrets.token_urlsafe(16)  # 128 bits
        return sign(message, kid=kid, secret=secret, nonce=nonce, ts=int(time.time()))

    async def send(self, message: dict[str, Any]) -> None:
        """Send a JSON message, signed when its type is in ``signed_types``.

        It is signed for the connection it goes on (with that connection's session key),
        once that connection is there: sent while a reconnect is under way, it waits for
        it; found already closed (nothing written yet), it goes on the next connection."""
        dropped: ClientConnection | None = None
        while True:
            ws = await self._current(replace=dropped, dropped=dropped is not None)
            closed = ws.protocol.state is not State.OPEN
            if closed and dropped is None and self._reconnect_after(ws):
                dropped = ws  # closed before anything was written: use the next one
                continue
            out = self.sign(message) if message.get("type") in self._signed else message
            data = orjson.dumps(out)
            limits = self.welcome.get("limits")
            limit = limits.get("max_message_bytes") if isinstance(limits, dict) else None
            if isinstance(limit, int) and len(data) > limit:
                # the server would close the connection 1009, for good
                raise ClientError(
                    f"a message of {len(data)} bytes is over the server's max_message_bytes "
                    f"({limit}): not sent"
                )
            await ws.send(data.decode())
            return

    async def recv(self) -> dict[str, Any]:
        """The next message from the server; reconnects transparently when allowed.

        ``auth_ok`` replies to background token refreshes are consumed here.
        """
        dropped: ClientConnection | None = None
        while True:
            ws = await self._current(replace=dropped, dropped=dropped is not None)
            if self._early:
                return self._early.pop(0)
            try:
                message: dict[str, Any] = orjson.loads(await ws.recv())
            except ConnectionClosed:
                if not self._reconnect_after(ws):
                    raise
                dropped = ws
                continue
            if message.get("type") == "auth_ok":
                exp = message.get("expires_at")
                self.expires_at = float(exp) if isinstance(exp, (int, float)) else None
                self._schedule_refresh()
                continue
            return message

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
        task = self._connecting
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # a connection it opened is closed by it
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> WsguardClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
