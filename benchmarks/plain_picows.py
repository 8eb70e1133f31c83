"""The picows baseline of benchmarks/bench_engines.py: a plain picows server on uvloop.

The same minimal demo protocol as ``plain_server.py``: a welcome frame on connect, then
``{"type": "ping", "id": ...}`` -> ``{"type": "pong", "id": ..., "ts": ...}`` with orjson;
every other text frame is parsed and ignored. No authentication, no limits: picows'
defaults (auto-pong on, a 10 MiB frame limit, 16 KiB initial read buffer).

Run: .venv/bin/python benchmarks/plain_picows.py --port 0   (prints "listening on ws://HOST:PORT/")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
import time

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server


class Plain(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        welcome = {"type": "welcome", "connection_id": secrets.token_hex(8)}
        transport.send(WSMsgType.TEXT, orjson.dumps(welcome))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            try:
                message = orjson.loads(frame.get_payload_as_memoryview())
            except ValueError:
                return
            if isinstance(message, dict) and message.get("type") == "ping":
                pong = {"type": "pong", "id": message.get("id"), "ts": time.time()}
                transport.send(WSMsgType.TEXT, orjson.dumps(pong))
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await ws_create_server(lambda _request: Plain(), host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"picows: listening on ws://{host}:{bound}/", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
