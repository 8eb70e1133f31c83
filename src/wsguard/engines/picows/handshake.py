"""The handshake before picows: read, screen and decide the request head."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from wsguard.core.decisions import (
    Reject,
)
from wsguard.core.headers import Headers
from wsguard.core.request import HandshakeRequest
from wsguard.engines.screening import (
    check_head,
    early_response,
    http_response,
    raw_refusal,
    read_head,
    refuse,
)
from wsguard.engines.tls import certificate_identity, refused_resumption, start_tls, tls_ended
from wsguard.session import DIRECT_WRITE_LIMIT

if TYPE_CHECKING:
    from wsguard.engines.picows.server import PicowsServer

    pass

from wsguard.engines.picows.listener import GuardListener
from wsguard.engines.picows.socket_views import PicowsView

logger = logging.getLogger("wsguard.server")

_EARLY_DATA_LIMIT = 64 * 1024  # bytes a client may send before its 101 is written


class HandshakeProtocol(asyncio.BufferedProtocol):
    """Reads, screens and decides one upgrade request, then hands the socket to picows.

    A buffered protocol, reading into the server's one buffer: uvloop keeps a simple
    protocol's ``data_received`` (and with it the protocol) for the connection's life
    when the transport is handed to picows' buffered protocol; this one leaves nothing.

    Over TLS it is the protocol of the TCP socket first: the connection is a pending
    handshake from its accept (counted, under the one handshake timeout), and TLS is
    started here (``connection_made`` is then called again, with the TLS transport).
    """

    __slots__ = (
        "_buffer", "_deciding", "_fd", "_in_tls", "_peer", "_pending", "_timer", "server",
        "transport",
    )  # fmt: skip

    def __init__(self, server: PicowsServer) -> None:
        self.server = server
        # the socket's transport; over TLS, the TCP one until the TLS handshake is done
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._deciding = False
        self._fd = -1
        self._in_tls = False  # the TLS handshake is under way
        self._peer = "unknown"
        self._pending = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._in_tls:  # the TLS handshake is done: the request head comes next
            self._tls_done(transport)
            return
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        server = self.server
        tls = server.tls
        refusal = server.pending.enter(self._peer)
        if refusal is not None:
            if tls is None:
                self._refuse(refusal)
            else:  # no TLS yet, so no HTTP answer: the socket is closed
                self.transport = None
                transport.close()
                server.guard.record_raw_refusal(None, refusal[1], self._peer)
            return
        self._pending = True
        timeout = server.guard.config.limits.handshake_timeout_seconds
        self._timer = server.loop.call_later(timeout, self._timed_out)
        if tls is not None:
            self._in_tls = True
            waiter: asyncio.Future[None] = server.loop.create_future()
            waiter.add_done_callback(self._tls_ended)
            # the TLS protocol's own timeout only backs ours up (ours covers the head too)
            start_tls(server.loop, transport, self, tls, waiter, handshake_timeout=timeout + 1)

    def _tls_done(self, transport: asyncio.BaseTransport) -> None:
        self._in_tls = False
        tls = self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        if refused_resumption(tls, self.server.guard, self._peer):
            self._end_pending()
            self.transport = None

    def _tls_ended(self, waiter: asyncio.Future[None]) -> None:
        """The TLS handshake ended: a failure (audited), or the connection lost during it;
        nothing to do when it completed (``connection_made`` came first)."""
        counted = self._in_tls and self._pending
        if self._in_tls:
            self._in_tls = False
            self.transport = None
            self._end_pending()
        tls_ended(waiter, self.server.guard, self._peer, audit=counted)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.head_reads  # the loop reads, then calls buffer_updated at once

    def buffer_updated(self, nbytes: int) -> None:
        if self.transport is not None:  # (none: refused right after the TLS handshake)
            self._received(bytes(self.server.head_reads[:nbytes]))

    def _received(self, data: bytes) -> None:
        server = self.server
        server.metrics.bytes_in += len(data)
        if not self._buffer and not self._deciding:
            early = server.guard.early_refusal(self._peer)
            if early is not None:  # its address is refused still: nothing parsed
                self._end_pending()
                transport, self.transport = self.transport, None
                if transport is not None:
                    refuse(transport, early_response(early), server.pending)
                return
        buffer = self._buffer + data
        if self._deciding:  # frames sent before the 101: kept (bounded) for picows
            self._buffer = buffer
            if len(buffer) > _EARLY_DATA_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        limit = server.guard.config.limits.max_header_bytes
        end, refusal = check_head(buffer, limit, whole=False)
        if refusal is None and end >= 0:
            refusal, parsed = read_head(buffer[:end])
        if refusal is not None:
            self._refuse(refusal)
            return
        self._buffer = buffer
        if end < 0:
            return
        assert parsed is not None
        self._end_pending()
        self._deciding = True
        transport = self.transport
        assert transport is not None
        method, target, headers = parsed
        cert = None
        tls = transport.get_extra_info("sslcontext") is not None
        if tls:
            cert = certificate_identity(
                transport.get_extra_info("peercert"), server.guard.config.tls.identity_from
            )
        request = HandshakeRequest(
            peer=self._peer,
            target=target,
            headers=Headers(headers),
            tls=tls,
            method=method,
            client_cert=cert,
        )
        server.run(self._decide(request, parsed, end + 4))

    async def _decide(self, request: HandshakeRequest, parsed: Any, head_end: int) -> None:
        server = self.server
        decision = await server.guard.admit(request)
        transport = self.transport
        if isinstance(decision, Reject):
            if transport is not None and not transport.is_closing():
                self.transport = None
                response = http_response(decision.status, decision.message, decision.headers)
                refuse(transport, response, server.pending)
            return
        if transport is None or transport.is_closing():
            server.release(decision)  # the client left while we were deciding
            return
        listener = GuardListener(server, decision, parsed, transport)
        picked = WSUpgradeResponseWithListener(Switching(decision.subprotocol), listener)

        def factory(_: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
            return picked

        protocol = server.ws_protocol(factory)
        transport.set_write_buffer_limits(high=DIRECT_WRITE_LIMIT)  # see GuardListener.writable
        transport.set_protocol(protocol)
        listener.start_batch()  # picows' 101 and the welcome frame leave in one write
        protocol.connection_made(PicowsView(transport, listener, self._fd))
        server.adopt(listener)
        early, self._buffer = self._buffer[head_end:], b""
        self.transport = None
        # picows reads the request again: it gets the request the policy admitted in the
        # one form it accepts (its own checks are stricter than RFC 6455's: it refuses
        # "Connection: keep-alive, Upgrade", which browsers send), then the early frames
        _feed(protocol, _engine_head(request) + early)
        listener.flush()
        if listener.transport is None:  # picows refused the upgrade (it answered 400)
            server.release(decision)
            transport.abort()
            server.guard.record_raw_refusal(400, "bad_handshake", decision.client)
            return
        if len(early) > _EARLY_DATA_LIMIT:
            transport.resume_reading()

    def _refuse(self, refusal: tuple[int, str, str]) -> None:
        self._end_pending()
        transport, self.transport = self.transport, None
        if transport is not None:
            refuse(transport, raw_refusal(refusal), self.server.pending)
        self.server.guard.record_raw_refusal(refusal[0], refusal[1], self._peer)

    def _timed_out(self) -> None:
        self._timer = None
        if self._pending and self.transport is not None:
            self._end_pending()
            self.transport.abort()
            self.server.guard.record_raw_refusal(None, "handshake_timeout", self._peer)

    def _end_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._pending = False
            self.server.pending.leave(self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_pending()
        self.transport = None


class Switching(WSUpgradeResponse):
    """The 101 response picows sends (it adds the key's accept value to ``headers``):
    the same bytes as picows' own, written without its general-purpose builder (a
    multidict, a format per header and the status phrase per handshake)."""

    __slots__ = ()

    def __init__(self, subprotocol: str | None) -> None:
        self.version = b"HTTP/1.1"
        self.status = HTTPStatus.SWITCHING_PROTOCOLS
        self.body = None
        self.headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else {}  # type: ignore[assignment]

    def to_bytes(self) -> bytearray:
        headers = self.headers
        subprotocol = headers.get("Sec-WebSocket-Protocol")
        out = bytearray(b"HTTP/1.1 101 Switching Protocols\r\n")
        if subprotocol is not None:
            out += b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode()
        out += b"Connection: upgrade\r\nUpgrade: websocket\r\n"
        accept = headers.get("Sec-WebSocket-Accept")
        if accept is not None:
            out += b"Sec-WebSocket-Accept: %s\r\n" % accept.encode()
        out += b"\r\n"
        return out


def _engine_head(request: HandshakeRequest) -> bytes:
    """The admitted request as picows needs it: the target, the upgrade and the key (the
    policy checked them; picows answers with the key's accept value)."""
    key = request.headers.get("sec-websocket-key")
    return (
        f"GET {request.target} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _feed(protocol: Any, data: bytes) -> None:
    """Give bytes already read to a picows protocol, through its own buffer."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(-1)
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
