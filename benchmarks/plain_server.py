"""The baseline of benchmarks/bench.py: a plain ``websockets`` server, no policy.

It answers the demo protocol minimally: a welcome frame on connect, then
``{"type": "ping", "id": ...}`` -> ``{"type": "pong", "id": ..., "ts": ...}``
(parsed and serialized with the standard ``json`` module, or ``orjson`` with
``--json orjson``). Everything else is ignored.
Settings are the websockets defaults except compression (off, as in wsguard; the load
generator does not offer it anyway).

Run: .venv/bin/python benchmarks/plain_server.py --port 0   (prints "listening on ws://HOST:PORT/")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


def _orjson_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


loads: Callable[[str | bytes], Any] = json.loads
dumps: Callable[[Any], str] = json.dumps


async def handler(ws: ServerConnection) -> None:
    await ws.send(dumps({"type": "welcome", "connection_id": secrets.token_hex(8)}))
    try:
        async for data in ws:
            try:
                message = loads(data)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("type") == "ping":
                await ws.send(dumps({"type": "pong", "id": message.get("id"), "ts": time.time()}))
    except ConnectionClosed:
        pass


async def run(host: str, port: int) -> None:
    await serve_until_signalled(handler, host, port, "plain")


async def serve_until_signalled(
    handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int, label: str
) -> None:
    """Serve *handler* (no compression) until SIGTERM/SIGINT; announce the port on stderr."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, host, port, compression=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"{label}: listening on ws://{host}:{bound}/", file=sys.stderr, flush=True)
        await stop.wait()
        server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--json", choices=["json", "orjson"], default="json", help="JSON library (json)"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (default: asyncio's own loop)"
    )
    args = parser.parse_args()
    if args.json == "orjson":
        global loads, dumps
        loads, dumps = orjson.loads, _orjson_dumps
    if args.uvloop:
        import uvloop

        uvloop.run(run(args.host, args.port))
    else:
        asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
