"""An echo server behind the wsguard policy, on the public API only.

Every message that passes the policy is sent back as it arrived: text as text, binary as
binary. No welcome frame. This is what the Autobahn conformance run drives
(``benchmarks/autobahn.py``), with ``examples/echo.toml``:

    .venv/bin/python examples/echo_server.py --config examples/echo.toml --engine picows
    .venv/bin/wsguard token --config examples/echo.toml --sub alice --ttl 1h

then connect to ``ws://127.0.0.1:9001/`` with ``Authorization: Bearer <token>`` (or the
subprotocols ``wsguard.v1`` and ``token.<token>``). ``--port 0`` picks a free port; the
server says where it listens on stderr (``echo: listening on ws://HOST:PORT/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from wsguard import App, Config, Connection, WsguardError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().with_name("echo.toml")


def echo_app(config: Config) -> App:
    """An App that echoes every delivered message, without a welcome frame."""
    app = App(config, welcome=False)

    @app.on_message  # every message (opaque format), or every type without a handler
    def echo(conn: Connection, data: str | bytes) -> None:  # plain function: runs inline
        conn.send_raw(data)  # str: a text frame, bytes: a binary frame

    return app


async def serve(app: App) -> None:
    await app.start()
    print(
        f"echo: listening on ws://{app.config.host}:{app.port}/ (engine {app.config.engine})",
        file=sys.stderr,
        flush=True,
    )
    await app.serve()  # until SIGTERM/SIGINT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An echo server behind the wsguard policy")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"TOML configuration (default {DEFAULT_CONFIG.name} beside this script)",
    )
    parser.add_argument(
        "--engine",
        choices=("picows", "websockets"),
        default=None,
        help="the engine (default: the configuration's)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="default 9001 (0: any free port)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(
            args.config, overrides={"host": args.host, "port": args.port, "engine": args.engine}
        )
        app = echo_app(config)
    except WsguardError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        if config.engine == "picows":  # picows is built for uvloop, as `wsguard serve` runs it
            import uvloop

            uvloop.run(serve(app))
        else:
            asyncio.run(serve(app))
    return 0


if __name__ == "__main__":
    sys.exit(main())
