"""``wsguard proxy``: the policy in front of a WebSocket backend written in anything.

The gateway listens like ``wsguard serve`` (same engine, handshake policy,
limits, TLS, admin listener) and, for each admitted connection, opens one
connection to the upstream (``gateway.upstream``, or the longest matching
``gateway.routes`` prefix). Only messages that passed the message policy are
forwarded upstream, byte for byte; messages from the upstream go to the client
untouched (at most ``gateway.upstream_max_message_bytes`` each).

Close codes and reasons propagate both ways. The client's pings are answered
by the gateway, which keeps its own heartbeat with the upstream. When the
upstream cannot be reached the client is closed with ``1013`` (try again
later), when it refuses the client's handshake with 401 or 403 with ``1008``;
when the upstream connection fails mid-way (no close frame, a frame the gateway
refused, an unanswered heartbeat), with ``1011``. Back-pressure: a slow upstream stops the
gateway reading from the client (the engine's bounded queue, then TCP); a slow
client stops it reading from the upstream, and is dropped as a slow consumer
after ``gateway.client_drain_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidHeader,
    InvalidURI,
    NegotiationError,
)
from websockets.protocol import State

from wsguard.config.model import Config, ca_bundle_context
from wsguard.core.decisions import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    Deliver,
)
from wsguard.core.duplicate_keys import duplicate_keys_refusal, has_duplicate_keys
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.gateway.identity import identity_headers
from wsguard.session import Connection, sendable_close_code

logger = logging.getLogger("wsguard.gateway")

#: 1010: "an extension the server did not negotiate", sent by a client only (RFC 6455
#: 7.4.1); the upstream is a server to the gateway, and the gateway one to the client
_CLIENT_ONLY_CLOSE = 1010


async def _send_upstream(upstream: ClientConnection, data: str | bytes) -> None:
    with contextlib.suppress(ConnectionClosed):  # the pump closes the client
        await upstream.send(data)


def _reason(text: str | None) -> str:
    data = (text or "").encode()[:123]
    return data.decode("utf-8", "ignore")


def redacted_url(url: str) -> str:
    """*url* without user info or query (for logs and the audit log)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Upstream(ClientConnection):
    """The gateway's connection to its upstream: a heartbeat that goes unanswered ends it
    at once. websockets would send a close frame and wait ``close_timeout`` for an
    answer that a dead or wedged peer never gives; meanwhile the client's messages
    would still be accepted and lost, and its 1011 would come that much later.

    A closing handshake started by a frame (the upstream's close, or a frame the gateway
    must fail) is cut at its deadline too: websockets then waits for the upstream to end
    TCP and enforces the deadline only in its own sends, so an upstream that closed but
    kept its socket held the client open, and the socket, until the next heartbeat."""

    _cut: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.close_deadline is not None and self._cut is None:
            self._cut = self.loop.call_at(self.close_deadline, self._cut_if_open)

    def _cut_if_open(self) -> None:
        if self.protocol.state is not State.CLOSED:
            self.transport.abort()  # the pump then closes the client, audited

    def connection_lost(self, exc: Exception | None) -> None:
        if self._cut is not None:
            self._cut.cancel()
        super().connection_lost(exc)

    async def keepalive(self) -> None:
        assert self.ping_interval is not None
        latency = 0.0
        try:
            while True:
                await asyncio.sleep(self.ping_interval - latency)
                pong = await self.ping()
                if self.ping_timeout is None:
                    continue
                try:
                    async with asyncio.timeout(self.ping_timeout):
                        latency = await pong
                except TimeoutError:
                    self.transport.abort()  # the pump closes the client with 1011
                    return
        except ConnectionClosed:
            return


class Gateway(App):
    """An App whose admitted connections are forwarded to an upstream WebSocket server."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        guard: Guard | None = None,
    ) -> None:
        super().__init__(config, guard=guard)
        if self.config.signing.session_keys:
            raise ConfigError(
                "signing.session_keys",
                "the session key is sent in the welcome frame, and the gateway sends none "
                "(the upstream speaks first): use signing.keys_file",
            )
        gateway = self.config.gateway
        self.gateway = gateway
        if not gateway.upstream:
            raise ConfigError(
                "gateway.upstream",
                "wsguard proxy needs an upstream (--upstream ws://host:port/path)",
            )
        self._upstream_ssl: ssl.SSLContext | None = None
        if gateway.upstream_ca_file is not None:
            try:  # as the configuration loaded it when it was validated
                self._upstream_ssl = ca_bundle_context(gateway.upstream_ca_file.expanduser())
            except ValueError as exc:
                raise ConfigError("gateway.upstream_ca_file", str(exc)) from None
        self._forward = tuple(h.lower() for h in gateway.forward_headers)
        self._downstream = _compile_downstream(gateway.upstream_schema)
        self._pumps: set[asyncio.Task[None]] = set()
        self._check_duplicates = self.config.messages.format == "json"

    def keep_request(self, path: str, headers: Any) -> Any:
        """The path (routing) and the headers named in ``gateway.forward_headers``."""
        forwarded = tuple((k, v) for k, v in headers if k.lower() in self._forward)
        return path.split("?", 1)[0], forwarded  # the query (a token, maybe) is not kept

    # -- the host's hooks ------------------------------------------------------------

    def welcome(self, conn: Connection) -> dict[str, Any] | None:
        return None  # the upstream speaks first, if at all

    def startup_notes(self) -> list[str]:
        messages = self.config.messages
        if messages.format != "json" or "types" in messages.model_fields_set:
            return []
        return [
            "the message policy is the demo protocol (types auth, chat, command, data, "
            'ping): set messages.types to your backend\'s, or messages.format = "opaque" '
            "(docs: guides/gateway.md)"
        ]

    async def opened(self, conn: Connection) -> None:
        """Open the connection's upstream (routed by path) and start pumping it down."""
        path, forwarded = conn.request if conn.request is not None else ("/", ())
        target = self.gateway.upstream_for(path)
        upstream = await self._open_upstream(conn, target, forwarded)
        if upstream is None:
            return
        if conn.closing:
            # the client went (or is being closed) while the upstream opened: its closed
            # hook found nothing to close, so this one is closed here, with its code
            await self._close_upstream(conn, upstream)
            return
        conn.attachment = upstream
        pump = asyncio.get_running_loop().create_task(self._pump_down(conn, upstream, target))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)

    def deliver(
        self, conn: Connection, decision: Deliver, data: str | bytes
    ) -> Awaitable[None] | None:
        """Forward a message that passed the policy upstream, byte for byte."""
        upstream: ClientConnection | None = conn.attachment
        if upstream is None:
            return None
        if self._check_duplicates and has_duplicate_keys(data):
            # the bytes go upstream as they are: a backend parser that keeps the first
            # of two equal keys would read another message than the policy checked
            conn.refuse(duplicate_keys_refusal(decision))
            return None
        return _send_upstream(upstream, data)

    async def closed(self, conn: Connection) -> None:
        """The client's side ended: the upstream is closed with its code."""
        upstream: ClientConnection | None = conn.attachment
        if upstream is not None:
            conn.attachment = None
            await self._close_upstream(conn, upstream)
        hooks = super().closed(conn)
        if hooks is not None:
            await hooks

    async def _open_upstream(
        self, conn: Connection, target: str, forwarded: tuple[tuple[str, str], ...]
    ) -> ClientConnection | None:
        gateway = self.gateway
        path = conn.request[0] if conn.request is not None else "/"
        headers = identity_headers(
            gateway,
            conn.identity,
            client=conn.client,
            connection_id=conn.id,
            upstream=target,
            path=path,
        )
        headers += list(forwarded)
        try:
            return await connect(
                target,
                create_connection=_Upstream,
                additional_headers=headers,
                subprotocols=[conn.subprotocol] if conn.subprotocol else None,  # type: ignore[list-item]
                open_timeout=gateway.connect_timeout_seconds,
                close_timeout=gateway.connect_timeout_seconds,
                ping_interval=gateway.upstream_ping_interval_seconds,
                ping_timeout=gateway.upstream_ping_interval_seconds,
                max_size=gateway.upstream_max_message_bytes,
                max_queue=2,  # at most ~2 upstream messages buffered per connection
                compression=None,
                user_agent_header=None,
                proxy=None,
                ssl=self._upstream_ssl if target.startswith("wss://") else None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            detail = type(exc).__name__
            status = getattr(getattr(exc, "response", None), "status_code", None)
            logger.warning(
                "upstream %s unavailable for connection %s: %s%s",
                redacted_url(target),
                conn.id,
                detail,
                f" (HTTP {status})" if status else "",
            )
            self.guard.audit.emit(
                "upstream_unavailable",
                connection_id=conn.id,
                client=conn.client,
                subject=conn.subject,
                upstream=redacted_url(target),
                detail=detail,
                status=status,
            )
            if status in (401, 403):
                # the backend refused this client: trying again would not help
                conn.close_cause = "upstream_refused"
                await conn.close(CLOSE_POLICY_VIOLATION, "upstream refused")
                return None
            conn.close_cause = "upstream_unavailable"
            if isinstance(exc, (NegotiationError, InvalidHeader)):
                # the backend's 101 broke the handshake (a subprotocol or an extension the
                # gateway did not offer): a fault of the deployment, not a passing one
                await conn.close(CLOSE_INTERNAL_ERROR, "upstream error")
                return None
            await conn.close(CLOSE_TRY_AGAIN_LATER, "upstream unavailable")
            return None

    async def _pump_down(self, conn: Connection, upstream: ClientConnection, target: str) -> None:
        """Upstream to client, untouched; then the upstream's close goes to the client."""
        drain = self.gateway.client_drain_seconds
        try:
            async for message in upstream:
                if self._downstream is not None and not self._downstream(message):
                    self._refuse_downstream(conn, target)
                    continue
                if not conn.send_text(message):
                    break
                # the client is behind: stop reading upstream until it catches up
                if conn.backlogged and not await conn.flush(drain) and not conn.closing:
                    conn.drop_slow_consumer()
                    break
        except ConnectionClosed:
            pass
        if conn.closing or not conn.transport.is_open():
            return  # the client's side ended first (its code went upstream)
        code, reason = upstream.close_code, upstream.close_reason
        protocol = upstream.protocol
        if protocol.close_sent is not None and (
            protocol.close_rcvd is None or not protocol.close_rcvd_then_sent
        ):
            # the gateway closed the upstream first (a frame over the limit, a dead heartbeat)
            code, reason = CLOSE_INTERNAL_ERROR, "upstream error"
        elif code == 1005:  # a close frame without a status code: a normal close
            code, reason = 1000, ""
        elif not sendable_close_code(code) or code == _CLIENT_ONLY_CLOSE:
            code, reason = CLOSE_INTERNAL_ERROR, "upstream error"
        if code == CLOSE_INTERNAL_ERROR:
            logger.warning(
                "upstream %s failed for connection %s (close code %s)",
                redacted_url(target),
                conn.id,
                upstream.close_code,
            )
        self.guard.audit.emit(
            "upstream_closed",
            connection_id=conn.id,
            subject=conn.subject,
            upstream=redacted_url(target),
            code=upstream.close_code,
        )
        assert code is not None
        conn.close_soon(code, _reason(reason), cause="upstream_closed")

    def _refuse_downstream(self, conn: Connection, target: str) -> None:
        """An upstream message failed ``gateway.upstream_schema``: dropped, never sent."""
        self.guard.monitor.metrics.refusals["message", "schema"] += 1
        self.guard.audit.emit(
            "upstream_message_refused",
            connection_id=conn.id,
            subject=conn.subject,
            upstream=redacted_url(target),
            reason="schema",
        )

    async def _close_upstream(self, conn: Connection, upstream: ClientConnection) -> None:
        """The client's side ended: close the upstream promptly, with the client's code."""
        if upstream.protocol.close_sent is not None or upstream.protocol.close_rcvd is not None:
            return
        # whoever closed the client first: the client, or wsguard (revoked, banned...)
        code, reason, closed_by = conn.transport.close_result()
        if code == 1005:  # a close frame without a status code: a normal close
            code, reason = 1000, ""
        elif closed_by == "network" or not sendable_close_code(code):
            code, reason = CLOSE_GOING_AWAY, "client went away"
        else:
            reason = _reason(reason)
        with contextlib.suppress(Exception):  # close_timeout: gateway.connect_timeout_seconds
            await asyncio.wait_for(upstream.close(code, reason), upstream.close_timeout)
        if upstream.protocol.state is not State.CLOSED:
            upstream.transport.abort()  # the upstream never finished the closing handshake

    async def serve(self) -> None:
        try:
            await super().serve()
        finally:
            for task in list(self._pumps):
                task.cancel()
            for task in list(self._pumps):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _compile_downstream(schema: dict[str, Any] | None) -> Any:
    """A check of upstream messages: JSON text valid against *schema* (None: no check)."""
    if schema is None:
        return None
    import jsonschema_rs
    import msgspec

    # (a schema that does not compile is refused when the configuration is loaded)
    validator = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
    decode = msgspec.json.Decoder().decode

    def valid(message: str | bytes) -> bool:
        if not isinstance(message, str):
            return False  # a schema describes JSON text
        try:
            return bool(validator.is_valid(decode(message)))
        except (msgspec.DecodeError, ValueError, RecursionError):
            return False

    return valid
