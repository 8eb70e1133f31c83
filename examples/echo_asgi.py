"""An echo WebSocket (Starlette) behind :class:`WsGuardMiddleware`, served by uvicorn.

Every message that passes the policy is sent back as it arrived: text as text, binary as
binary. The Autobahn conformance run drives it (``benchmarks/autobahn.py``) with
``examples/echo.toml``:

    .venv/bin/python examples/echo_asgi.py --config examples/echo.toml --port 9001

or with uvicorn's own command line (its maximum message size = ``limits.max_message_bytes``;
no compression, as ``compression = false`` says):

    WSGUARD_CONFIG=examples/echo.toml .venv/bin/uvicorn --app-dir examples --factory \\
        echo_asgi:create_app --port 9001 --ws wsproto --ws-max-size 67108864 \\
        --ws-per-message-deflate false

``--port 0`` picks a free port; the server says where it listens on stderr
(``echo: listening on ws://HOST:PORT/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsguard import Config, WsguardError, load_config
from wsguard.asgi import WsGuardMiddleware

DEFAULT_CONFIG = Path(__file__).resolve().with_name("echo.toml")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()  # only messages that passed the policy
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None:
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])


def echo_app(config: Config) -> WsGuardMiddleware:
    """The echo app at ``/`` (every path) behind the policy of *config*."""
    inner = Starlette(routes=[WebSocketRoute("/{path:path}", echo)])
    return WsGuardMiddleware(inner, config=config)


def create_app() -> WsGuardMiddleware:
    """For ``uvicorn --factory``: the configuration file in ``WSGUARD_CONFIG``, else
    ``echo.toml`` beside this file."""
    return echo_app(load_config(os.environ.get("WSGUARD_CONFIG") or DEFAULT_CONFIG))


async def serve(config: Config, ws: str) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    server = uvicorn.Server(
        uvicorn.Config(
            echo_app(config),
            ws=ws,
            ws_max_size=config.limits.max_message_bytes,  # the frame layer enforces it
            ws_per_message_deflate=config.compression,
            lifespan="on",
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=math.ceil(config.liveness.drain_seconds),
        )
    )
    port = sock.getsockname()[1]
    print(f"echo: listening on ws://{config.host}:{port}/ (uvicorn, {ws})", file=sys.stderr)
    sys.stderr.flush()
    await server.serve(sockets=[sock])  # until SIGTERM/SIGINT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="An echo WebSocket behind the wsguard ASGI middleware (uvicorn)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"TOML configuration (default {DEFAULT_CONFIG.name} beside this script)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="default 9001 (0: any free port)")
    parser.add_argument(
        "--ws",
        choices=("wsproto", "websockets-sansio"),
        default="wsproto",
        # websockets-sansio fails Autobahn 7.1.5 (a close frame between two fragments is
        # answered with 1002 by websockets' own parser), with or without wsguard
        help="uvicorn's WebSocket implementation (default wsproto)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port})
    except WsguardError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.ws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
