"""The upstream of benchmarks/bench_gateway.py: a minimal ``websockets`` echo server, no policy.

On connect it sends one welcome frame (the load generator, ``benchmarks/loadgen.py``, waits
for a first frame before it counts a connection as open; through ``wsguard proxy`` the
gateway stays transparent and the upstream greets). Then it sends every text message back
as it came, with one change: a message starting ``{"type":"ping"`` comes back starting
``{"type":"pong"`` (same length, nothing else touched; the load generator matches replies on
``type == "pong"`` and the ``id``). Nothing is parsed. Binary messages are echoed unchanged.
Settings are the websockets defaults except compression (off, as in wsguard and the gateway's
upstream connections).

Run: .venv/bin/python benchmarks/echo_backend.py --port 0   (prints "listening on ws://HOST:PORT/")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

PING = '{"type":"ping"'
PONG = '{"type":"pong"'


async def handler(ws: ServerConnection) -> None:
    try:
        await ws.send(f'{{"type":"welcome","connection_id":"{secrets.token_hex(8)}"}}')
        async for data in ws:
            if isinstance(data, str) and data.startswith(PING):
                data = PONG + data[len(PING) :]
            await ws.send(data)
    except ConnectionClosed:
        pass


async def run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, host, port, compression=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"echo: listening on ws://{host}:{bound}/", file=sys.stderr, flush=True)
        await stop.wait()
        server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
