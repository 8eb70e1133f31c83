"""Load generator of benchmarks/bench.py (one process; bench.py pins it to CPU 1).

Driven over stdin/stdout with JSON lines, so that several processes can share one
measurement window:

1. bench.py writes the configuration: ``{"phase": "pingpong" | "handshake" | "idle",
   "client": "raw" | "websockets", "host", "port", "origin", "tokens", "conns",
   "msg_bytes", "depth", "timeout", "index", "max_seconds"}``;
2. the load generator opens what the phase needs and answers ``{"event": "ready", ...}``;
3. bench.py writes ``{"cmd": "go", "t0": ..., "t1": ...}`` (``time.monotonic()`` values, the
   clock is system-wide) for pingpong/handshake, or ``{"cmd": "close"}`` for idle;
4. the load generator answers ``{"event": "result", ...}`` and exits. Only events completed
   inside [t0, t1) are counted; the CPU it used in that window comes from getrusage.

Two client implementations drive the same wire traffic:

* ``raw`` (default): an asyncio Protocol speaking RFC 6455 directly (client frames masked
  with a fresh random key, C ``apply_mask`` from websockets). It does the minimum per
  message, so one core of it outpaces one core of either server.
* ``websockets``: the ``websockets`` asyncio client, for cross-checking.

Every connection sends ``Origin`` and ``Authorization: Bearer <HS256 JWT>``; the plain server
ignores both. Ping messages are ``{"type":"ping","id":"<64 chars>"}`` padded with JSON
whitespace to ``msg_bytes`` (the demo schema bounds ``id`` to 64 characters).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import resource
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from websockets.asyncio.client import ClientConnection, connect
from websockets.speedups import apply_mask
from websockets.typing import Origin

Config = dict[str, Any]
Result = dict[str, Any]

ID_LENGTH = 64
OPEN_CONCURRENCY = 64


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Stats:
    """Events counted inside the measurement window, latencies in a µs histogram."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.count = 0
        self.hist: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def record(self, now: float, seconds: float) -> None:
        if self.t0 <= now < self.t1:
            self.count += 1
            self.hist[int(seconds * 1e6)] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def running(self, now: float) -> bool:
        return now < self.t1

    def as_dict(self) -> Result:
        return {
            "count": self.count,
            "hist": {str(k): v for k, v in self.hist.items()},
            "errors": dict(self.errors),
        }


def ping_payload(ident: str, msg_bytes: int) -> bytes:
    body = f'{{"type":"ping","id":"{ident}"'
    return (body + " " * max(0, msg_bytes - len(body) - 1) + "}").encode()


def ident_factory(prefix: str) -> Callable[[int], str]:
    """64-character ids ``<prefix>xxx...<hex counter>``, never 19 digits in a row.

    (wsguard's structural-bounds fast path treats a run of 19+ digits as a possible huge
    number and walks the whole message; realistic ids do not look like that.)
    """
    width = ID_LENGTH - len(prefix)
    return lambda seq: f"{prefix}{seq:x>{width}x}"


# -- raw RFC 6455 client ---------------------------------------------------------------------


class HandshakeError(Exception):
    pass


def frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + mask + apply_mask(payload, mask)


def upgrade_request(cfg: Config, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\n"
        f"Host: {cfg['host']}:{cfg['port']}\r\n"
        f"Upgrade: websocket\r\n"
        f"Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n"
        f"Origin: {cfg['origin']}\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"User-Agent: wsguard-bench\r\n\r\n"
    ).encode()


class RawConnection(asyncio.Protocol):
    """One client connection: upgrade, welcome, text frames to ``on_text``, close."""

    def __init__(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._request = request
        self._buf = bytearray()
        self._open = False
        self._close_sent = False
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.on_text: Callable[[bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("connection lost before the welcome"))

    def _fail(self, reason: str) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(HandshakeError(reason))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail("response headers too large")
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(status.decode("latin-1"))
                return
            self._open = True
            del buf[: end + 4]
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                pos = 10
            end = pos + length
            if len(buf) < end:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[pos:end])
            del buf[:end]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode in (0, 1, 2):
            if not self.welcome.done():
                self.welcome.set_result(None)
            elif self.on_text is not None:
                self.on_text(payload)
        elif opcode == 9:
            self.send(10, payload)
        elif opcode == 8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.welcome.done():
                self.welcome.set_exception(HandshakeError(f"closed {self.close_code}"))
            self.close(1000)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(opcode, payload))

    def close(self, code: int = 1000) -> None:
        if not self._close_sent:
            self._close_sent = True
            self.send(8, code.to_bytes(2, "big"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def raw_open(cfg: Config, token: str, source: str | None = None) -> RawConnection:
    """Open and wait for the welcome; *source*: the local address to connect from."""
    loop = asyncio.get_running_loop()
    proto = RawConnection(upgrade_request(cfg, token))
    local = (source, 0) if source is not None else None
    await loop.create_connection(lambda: proto, cfg["host"], cfg["port"], local_addr=local)
    try:
        await asyncio.wait_for(proto.welcome, cfg["timeout"])
    except BaseException:
        proto.abort()
        raise
    return proto


async def raw_close(conns: list[Any], wait_s: float) -> None:
    for conn in conns:
        conn.close(1000)
    pending = [conn.lost for conn in conns if not conn.lost.done()]
    if pending:
        await asyncio.wait(pending, timeout=wait_s)
    for conn in conns:
        if not conn.lost.done():
            conn.abort()


_PONG_HEAD = b'{"type":"pong","id":"'


class RawPinger:
    """Closed loop on one connection: ``depth`` pings in flight, each pong sends the next.

    Lean on purpose (it shares one core with the rest of the load generator): pings are
    built from bytes, and pongs (``{"type":"pong","id":"<64 chars>",...}`` from every
    server benchmarked) are matched by slicing; anything else is parsed as JSON.
    """

    def __init__(self, conn: Any, prefix: str, msg_bytes: int, depth: int, stats: Stats) -> None:
        self.conn = conn
        self.stats = stats
        self.depth = depth
        self.prefix = prefix.encode()
        self.width = ID_LENGTH - len(prefix)
        head = b'{"type":"ping","id":"'
        self.head = head
        self.tail = b'"' + b" " * max(0, msg_bytes - len(head) - ID_LENGTH - 2) + b"}"
        self.seq = 0
        self.in_flight: dict[bytes, float] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.on_text = self.on_text
        conn.lost.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def start(self) -> None:
        for _ in range(self.depth):
            self.send_next()

    def send_next(self) -> None:
        self.seq += 1
        ident = self.prefix + (b"%x" % self.seq).rjust(self.width, b"x")
        self.in_flight[ident] = time.monotonic()
        self.conn.send(1, self.head + ident + self.tail)

    def on_text(self, payload: bytes) -> None:
        now = time.monotonic()
        if payload.startswith(_PONG_HEAD):
            sent = self.in_flight.pop(payload[21 : 21 + ID_LENGTH], None)
            if sent is None:
                self.stats.error("pong with an unknown id")
                return
            self.stats.record(now, now - sent)
        else:
            message = orjson.loads(payload)
            kind = message.get("type")
            self.stats.error(f"reply:{kind}:{message.get('code')}")
            ref = message.get("ref")
            if kind != "error" or not isinstance(ref, str):
                return  # an unrelated frame: keep waiting for the pongs
            if self.in_flight.pop(ref.encode(), None) is None:
                return
        if now < self.stats.t1:
            self.send_next()
        elif not self.in_flight:
            self._finish()


# -- phases, raw client ---------------------------------------------------------------------


async def open_many(
    cfg: Config, opener: Callable[..., Awaitable[Any]], count: int
) -> tuple[list[Any], collections.Counter[str]]:
    tokens: list[str] = cfg["tokens"]
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    errors: collections.Counter[str] = collections.Counter()

    spread = cfg.get("spread", False)  # each connection from its own loopback address

    async def one(i: int) -> Any:
        async with sem:
            try:
                if spread:
                    return await opener(cfg, tokens[i % len(tokens)], f"127.0.2.{i % 250 + 1}")
                return await opener(cfg, tokens[i % len(tokens)])
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                return None

    opened = await asyncio.gather(*(one(i) for i in range(count)))
    return [c for c in opened if c is not None], errors


async def read_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "eof"}
    command: dict[str, Any] = json.loads(line)
    return command


async def phase_pingpong_raw(cfg: Config, reader: asyncio.StreamReader) -> Result:
    opener = picows_open if cfg["client"] == "picows" else raw_open
    conns, open_errors = await open_many(cfg, opener, cfg["conns"])
    emit("ready", opened=len(conns), open_errors=dict(open_errors))
    command = await read_command(reader)
    stats = Stats()
    cpu = 0.0
    try:
        if command["cmd"] != "go":
            return {"aborted": True}
        stats.t0, stats.t1 = command["t0"], command["t1"]
        pingers = [
            RawPinger(conn, f"p{cfg['index']}c{i}-", cfg["msg_bytes"], cfg["depth"], stats)
            for i, conn in enumerate(conns)
        ]
        for pinger in pingers:
            pinger.start()
        await sleep_until(stats.t0)
        cpu0 = cpu_seconds()
        await sleep_until(stats.t1)
        cpu = cpu_seconds() - cpu0
        if pingers:
            await asyncio.wait([p.done for p in pingers], timeout=cfg["timeout"])
        lost = sum(1 for conn in conns if conn.lost.done())
        if lost:
            stats.errors["connections closed by the server"] = lost
    finally:
        await raw_close(conns, cfg["timeout"])
    return {**stats.as_dict(), "cpu_s": cpu, "wall_s": stats.t1 - stats.t0}


async def closed_cleanly(conn: Any, cfg: Config) -> None:
    """Close with 1000 and wait (bounded) for the end; the server must answer 1000."""
    conn.close(1000)
    try:
        await asyncio.wait_for(asyncio.shield(conn.lost), cfg["timeout"])
    finally:
        conn.abort()
    if conn.close_code != 1000:
        raise HandshakeError(f"close code {conn.close_code}")


async def raw_handshake(cfg: Config, token: str) -> None:
    # spread: each user from a loopback address of its own (many clients, not one)
    source = f"127.0.3.{zlib.crc32(token.encode()) % 250 + 1}" if cfg.get("spread") else None
    await closed_cleanly(await raw_open(cfg, token, source), cfg)


async def ready_then_go(reader: asyncio.StreamReader) -> Stats | None:
    """For phases that open nothing beforehand: report ready, then wait for the window
    (None when told anything but go)."""
    emit("ready", opened=0, open_errors={})
    command = await read_command(reader)
    if command["cmd"] != "go":
        return None
    stats = Stats()
    stats.t0, stats.t1 = command["t0"], command["t1"]
    return stats


async def phase_handshake(
    cfg: Config, reader: asyncio.StreamReader, once: Callable[[Config, str], Awaitable[None]]
) -> Result:
    stats = await ready_then_go(reader)
    if stats is None:
        return {"aborted": True}
    tokens: list[str] = cfg["tokens"]

    async def worker(w: int) -> None:
        i = w
        failures = 0
        while stats.running(time.monotonic()) and failures < 1000:
            start = time.monotonic()
            try:
                await once(cfg, tokens[i % len(tokens)])
            except Exception as exc:
                failures += 1
                stats.error(f"{type(exc).__name__}: {exc}"[:120])
                continue
            finally:
                i += cfg["conns"]
            now = time.monotonic()
            stats.record(now, now - start)

    workers = [asyncio.ensure_future(worker(w)) for w in range(cfg["conns"])]
    await sleep_until(stats.t0)
    cpu0 = cpu_seconds()
    await sleep_until(stats.t1)
    cpu = cpu_seconds() - cpu0
    _, pending = await asyncio.wait(workers, timeout=cfg["timeout"] * 3)
    for task in pending:
        task.cancel()
    return {**stats.as_dict(), "cpu_s": cpu, "wall_s": stats.t1 - stats.t0}


async def phase_idle(
    cfg: Config,
    reader: asyncio.StreamReader,
    opener: Callable[[Config, str], Awaitable[Any]],
    alive: Callable[[Any], bool],
    closer: Callable[[list[Any], float], Awaitable[None]],
) -> Result:
    start, cpu0 = time.monotonic(), cpu_seconds()
    conns, open_errors = await open_many(cfg, opener, cfg["conns"])
    wall, cpu = time.monotonic() - start, cpu_seconds() - cpu0
    emit("ready", opened=len(conns), open_errors=dict(open_errors))
    await read_command(reader)
    still = sum(1 for c in conns if alive(c))
    await closer(conns, cfg["timeout"])
    return {"count": still, "hist": {}, "errors": dict(open_errors), "cpu_s": cpu, "wall_s": wall}


# -- the picows client: C framing, so one core of it outpaces a picows server ---------------


class PicowsConnection(WSListener):
    """The RawConnection interface (welcome, on_text, send, close, lost) over picows."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: WSTransport | None = None
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.on_text: Callable[[bytes], None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if not self.welcome.done():
                self.welcome.set_result(None)
            elif self.on_text is not None:
                self.on_text(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            self.close_code = int(getattr(frame.get_close_code(), "value", 1005))
            if not self.welcome.done():
                self.welcome.set_exception(HandshakeError(f"closed {self.close_code}"))
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("connection lost before the welcome"))

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send(WSMsgType(opcode), payload)

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send_close(WSCloseCode(code))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def picows_open(cfg: Config, token: str, source: str | None = None) -> PicowsConnection:
    local: dict[str, Any] = {"local_addr": (source, 0)} if source is not None else {}
    _, conn = await ws_connect(
        PicowsConnection,
        f"ws://{cfg['host']}:{cfg['port']}/",
        extra_headers={
            "Origin": cfg["origin"],
            "Authorization": f"Bearer {token}",
            "User-Agent": "wsguard-bench",
        },
        websocket_handshake_timeout=cfg["timeout"],
        **local,
    )
    assert isinstance(conn, PicowsConnection)
    try:
        await asyncio.wait_for(asyncio.shield(conn.welcome), cfg["timeout"])
    except BaseException:
        conn.abort()
        raise
    return conn


async def picows_handshake(cfg: Config, token: str) -> None:
    await closed_cleanly(await picows_open(cfg, token), cfg)


# -- one-way: a stream of messages, no replies --------------------------------------------------


class Streamer:
    """Writes ``batch`` pre-masked messages at a time while the socket takes them."""

    def __init__(self, conn: RawConnection, blob: bytes, batch: int, stats: Stats) -> None:
        self.conn = conn
        self.blob = blob
        self.batch = batch
        self.stats = stats
        self.sent_in_window = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.on_text = self.on_text
        conn.lost.add_done_callback(lambda _: self._end())

    def _end(self) -> None:
        for fut in (self.done, self.confirmed):
            if not fut.done():
                fut.set_result(None)

    def on_text(self, payload: bytes) -> None:
        message = orjson.loads(payload)
        if message.get("type") == "pong" and message.get("id", "").startswith("end-"):
            if not self.confirmed.done():
                self.confirmed.set_result(None)
        else:
            self.stats.error(f"reply:{message.get('type')}:{message.get('code')}")

    async def run(self) -> None:
        transport = self.conn.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        while not transport.is_closing():
            now = time.monotonic()
            if now >= self.stats.t1:
                break
            # keep at most ~256 KiB queued in user space: the kernel buffers the rest, and
            # the server's reading speed sets the pace (TCP flow control)
            if transport.get_write_buffer_size() > 256 * 1024:
                await asyncio.sleep(0.0005)
                continue
            transport.write(self.blob)
            if self.stats.t0 <= now:
                self.sent_in_window += self.batch
            await asyncio.sleep(0)
        # every message before this ping is processed once its pong comes back
        self.conn.send(1, ping_payload(ident_factory("end-")(1), 100))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.confirmed), 30)
        if not self.confirmed.done():
            self.stats.error("no pong after the stream")
        del loop
        self._end()


def oneway_blob(msg_bytes: int, batch: int) -> bytes:
    """*batch* masked ``data`` messages (valid under the demo schema), ~msg_bytes each."""
    body = '{"type":"data","channel":"bench","payload":{"seq":1,"v":"'
    pad = "x" * max(1, min(256, msg_bytes - len(body) - 3))
    payload = (body + pad + '"}}').encode()
    return frame(1, payload) * batch


async def phase_oneway_raw(cfg: Config, reader: asyncio.StreamReader) -> Result:
    conns, open_errors = await open_many(cfg, raw_open, cfg["conns"])
    emit("ready", opened=len(conns), open_errors=dict(open_errors))
    command = await read_command(reader)
    stats = Stats()
    cpu = 0.0
    batch = 64
    blob = oneway_blob(cfg["msg_bytes"], batch)
    try:
        if command["cmd"] != "go":
            return {"aborted": True}
        stats.t0, stats.t1 = command["t0"], command["t1"]
        streamers = [Streamer(conn, blob, batch, stats) for conn in conns]
        tasks = [asyncio.ensure_future(s.run()) for s in streamers]
        await sleep_until(stats.t0)
        cpu0 = cpu_seconds()
        await sleep_until(stats.t1)
        cpu = cpu_seconds() - cpu0
        ended = time.monotonic()
        await asyncio.wait(tasks, timeout=cfg["timeout"] + 30)
        # the window's messages, over the window plus the time the server took to catch up
        drained = time.monotonic() - ended
        stats.count = sum(s.sent_in_window for s in streamers)
        for s in streamers:
            if s.conn.lost.done() and not s.confirmed.done():
                stats.error(f"closed {s.conn.close_code}")
    finally:
        await raw_close(conns, cfg["timeout"])
    wall = stats.t1 - stats.t0 + drained
    return {**stats.as_dict(), "cpu_s": cpu, "wall_s": wall}


# -- flood: abusive connections beside well-behaved ones ---------------------------------------


async def abuser(cfg: Config, token: str, stats: Stats, stop: float, kind: int) -> None:
    """Reconnects and floods invalid (odd *kind*) or oversized messages until *stop*,
    from an address of its own (127.0.1.<kind + 1>): attackers are not the users'
    address, and each abuser gets the per-address allowance in full."""
    invalid = frame(1, b'{"type":"ping","id":') * 64  # truncated JSON
    oversized = frame(1, b'{"type":"chat","text":"' + b"x" * 70_000 + b'"}')
    blob = invalid if kind % 2 else oversized
    while time.monotonic() < stop:
        try:
            conn = await raw_open(cfg, token, f"127.0.1.{kind % 250 + 1}")
        except Exception as exc:
            stats.error(f"abuser open: {type(exc).__name__}"[:60])
            await asyncio.sleep(0.01)
            continue
        transport = conn.transport
        assert transport is not None
        while not conn.lost.done() and time.monotonic() < stop:
            if transport.get_write_buffer_size() < 256 * 1024:
                transport.write(blob)
                stats.count += 1
            await asyncio.sleep(0)
        conn.abort()


async def phase_abuse_raw(cfg: Config, reader: asyncio.StreamReader) -> Result:
    """``abusers`` flooding connections (no measurement of their own): the ``flood``
    phase of bench_engines.py runs this in a second, low-priority process beside the
    measured ping/pong connections, so the clients' own CPU never adds to their latency."""
    stats = await ready_then_go(reader)
    if stats is None:
        return {"aborted": True}
    tokens: list[str] = cfg["tokens"]
    abusers = [
        asyncio.ensure_future(abuser(cfg, tokens[-1 - a % 8], stats, stats.t1, a))
        for a in range(cfg.get("abusers", 100))
    ]
    await sleep_until(stats.t0)
    cpu0 = cpu_seconds()
    await sleep_until(stats.t1)
    cpu = cpu_seconds() - cpu0
    await asyncio.wait(abusers, timeout=cfg["timeout"])
    return {**stats.as_dict(), "cpu_s": cpu, "wall_s": stats.t1 - stats.t0}


# -- the websockets client --------------------------------------------------------------------


async def ws_open(cfg: Config, token: str) -> ClientConnection:
    ws = await connect(
        f"ws://{cfg['host']}:{cfg['port']}/",
        additional_headers={"Authorization": f"Bearer {token}"},
        origin=Origin(cfg["origin"]),
        user_agent_header="wsguard-bench",
        compression=None,
        ping_interval=None,
        open_timeout=cfg["timeout"],
        close_timeout=cfg["timeout"],
    )
    try:
        await asyncio.wait_for(ws.recv(), cfg["timeout"])
    except BaseException:
        await ws.close()
        raise
    return ws


async def ws_close(conns: list[ClientConnection], wait_s: float) -> None:
    if conns:
        await asyncio.wait([asyncio.ensure_future(ws.close()) for ws in conns], timeout=wait_s + 1)


async def ws_handshake(cfg: Config, token: str) -> None:
    ws = await ws_open(cfg, token)
    await ws.close()
    if ws.close_code != 1000:
        raise HandshakeError(f"close code {ws.close_code}")


async def phase_pingpong_ws(cfg: Config, reader: asyncio.StreamReader) -> Result:
    conns, open_errors = await open_many(cfg, ws_open, cfg["conns"])
    emit("ready", opened=len(conns), open_errors=dict(open_errors))
    command = await read_command(reader)
    stats = Stats()
    cpu = 0.0

    async def pinger(ws: ClientConnection, prefix: str) -> None:
        ident = ident_factory(prefix)
        seq = 0
        in_flight: dict[str, float] = {}

        async def send_next() -> None:
            nonlocal seq
            seq += 1
            expect = ident(seq)
            in_flight[expect] = time.monotonic()
            await ws.send(ping_payload(expect, cfg["msg_bytes"]).decode())

        for _ in range(cfg["depth"]):
            await send_next()
        while in_flight:
            message = orjson.loads(await ws.recv())
            now = time.monotonic()
            kind = message.get("type")
            if kind == "pong" and (sent := in_flight.pop(message.get("id"), None)) is not None:
                stats.record(now, now - sent)
            else:
                stats.error(f"reply:{kind}:{message.get('code')}")
                if kind != "error" or in_flight.pop(message.get("ref"), None) is None:
                    continue
            if stats.running(now):
                await send_next()

    try:
        if command["cmd"] != "go":
            return {"aborted": True}
        stats.t0, stats.t1 = command["t0"], command["t1"]
        tasks = [
            asyncio.ensure_future(pinger(ws, f"p{cfg['index']}c{i}-")) for i, ws in enumerate(conns)
        ]
        await sleep_until(stats.t0)
        cpu0 = cpu_seconds()
        await sleep_until(stats.t1)
        cpu = cpu_seconds() - cpu0
        done, pending = await asyncio.wait(tasks, timeout=cfg["timeout"])
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                stats.error(f"pinger: {task.exception()!r}"[:120])
    finally:
        await ws_close(conns, cfg["timeout"])
    return {**stats.as_dict(), "cpu_s": cpu, "wall_s": stats.t1 - stats.t0}


# -- main ----------------------------------------------------------------------------------------


def _raw_alive(conn: RawConnection) -> bool:
    return not conn.lost.done()


def _ws_alive(ws: ClientConnection) -> bool:
    return ws.close_code is None


async def run(reader: asyncio.StreamReader, cfg: Config) -> Result:
    raw = cfg["client"] in ("raw", "picows")
    phase = cfg["phase"]
    if phase == "pingpong":
        return await (phase_pingpong_raw if raw else phase_pingpong_ws)(cfg, reader)
    if phase == "handshake":
        once = {"raw": raw_handshake, "picows": picows_handshake}.get(cfg["client"], ws_handshake)
        return await phase_handshake(cfg, reader, once)
    if phase == "oneway":
        return await phase_oneway_raw(cfg, reader)
    if phase == "abuse":
        return await phase_abuse_raw(cfg, reader)
    if phase == "idle":
        if raw:
            return await phase_idle(cfg, reader, raw_open, _raw_alive, raw_close)
        return await phase_idle(cfg, reader, ws_open, _ws_alive, ws_close)
    raise ValueError(f"unknown phase {phase!r}")


async def amain() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cfg: Config = json.loads(await reader.readline())
    result = await asyncio.wait_for(run(reader, cfg), cfg.get("max_seconds", 600))
    emit("result", **result)


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with wsguard on Linux
        asyncio.run(amain())
    else:
        uvloop.run(amain())


if __name__ == "__main__":
    main()
