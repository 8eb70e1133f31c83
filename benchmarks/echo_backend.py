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
import secrets
import sys
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.plain_server import serve_until_signalled

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
    await serve_until_signalled(handler, host, port, "echo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
