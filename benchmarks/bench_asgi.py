"""The ASGI middleware's cost: a Starlette echo under uvicorn, with and without it, one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_asgi.py            # 3 interleaved rounds
    .venv/bin/python benchmarks/bench_asgi.py --quick    # 1 short round
    .venv/bin/python benchmarks/bench_asgi.py --rounds 5 --json /tmp/asgi.json
    # the middleware of another checkout beside this one, interleaved in the same run:
    .venv/bin/python benchmarks/bench_asgi.py --quick --baseline-src ../main/src

Servers (each started fresh for every round, pinned to CPU 0; the load generator on CPU 1;
rounds interleaved: unguarded, guarded, [baseline,] unguarded, guarded, ...):

* ``unguarded``: a Starlette app (one ``WebSocketRoute``) served by uvicorn: on accept a
  welcome frame, then ``{"type": "ping", "id": ...}`` answered with
  ``{"type": "pong", "id": ..., "ts": ...}`` (orjson); every other text message is parsed
  and dropped: the protocol of ``plain_server.py``. It receives the same ``Authorization``
  and ``Origin`` headers as the guarded one and ignores them;
* ``guarded``: the same app wrapped in ``wsguard.asgi.WsGuardMiddleware`` with the full
  policy of ``bench.toml`` (HS256 JWT, Origin allowlist, strict schemas, rate limits,
  violation budget, audit log to a temporary file), only the limits raised above the load;
* ``baseline`` (with ``--baseline-src DIR``): ``guarded`` importing wsguard from *DIR*, to
  compare two versions of the middleware in one run.

uvicorn runs with its defaults (``loop``, ``http`` and ``ws`` "auto": uvloop; httptools when
it is installed, else h11; the ``websockets-sansio`` implementation when ``websockets`` is
installed, else ``wsproto``), ``ws_max_size`` = ``limits.max_message_bytes``, no
compression, no access log; the server prints what it resolved to, and so does the report.

Phases per server and round (``benchmarks/loadgen.py``, as in ``bench_engines.py``):

* ``idle``: RSS growth per idle authenticated connection (``--idle`` of them);
* ``pingpong``: ``--conns`` connections, ``--depth`` ~100-byte pings in flight each
  (picows client): messages/s, per second of server CPU, p99 round trip;
* ``handshake``: ``--hs-workers`` workers each opening a connection (Bearer token, Origin),
  waiting for the welcome frame and closing cleanly (raw client): handshakes/s and per
  second of server CPU.

The ratios guarded/unguarded are checked against the targets (messages >= 0.85x,
handshakes >= 0.8x, <= +3 KiB per idle connection), on the rates and on the rates per
server CPU-second: on a shared machine the latter are the steadier figures.

Internally, ``bench_asgi.py serve [--guarded] ...`` is the server process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench

HERE, HOST, CONFIG = bench.HERE, bench.HOST, bench.CONFIG
Server = bench.Server
SELF = Path(__file__).resolve()
SERVERS = ("unguarded", "guarded")
PHASES = ("idle", "pingpong", "handshake")


# -- the server process ---------------------------------------------------------------------


def make_app() -> Any:
    """The Starlette echo of the demo protocol (welcome, ping -> pong, the rest dropped)."""
    import orjson
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    loads = orjson.loads
    dumps = orjson.dumps

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        welcome = {"type": "welcome", "connection_id": secrets.token_hex(8)}
        await websocket.send_text(dumps(welcome).decode())
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                text = await websocket.receive_text()
                try:
                    message = loads(text)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("type") == "ping":
                    pong = {"type": "pong", "id": message.get("id"), "ts": time.time()}
                    await websocket.send_text(dumps(pong).decode())

    return Starlette(routes=[WebSocketRoute("/", endpoint)])


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_asgi.py serve")
    parser.add_argument("--guarded", action="store_true", help="wrap in WsGuardMiddleware")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--http", default="auto")
    parser.add_argument("--ws", default="auto")
    args = parser.parse_args(argv)

    import uvicorn

    from wsguard import load_config

    config = load_config(args.config, overrides={"host": args.host, "port": args.port})
    app = make_app()
    label = "unguarded"
    if args.guarded:
        from wsguard.asgi import WsGuardMiddleware

        app = WsGuardMiddleware(app, config=config)
        label = "guarded"
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server_config = uvicorn.Config(
        app,
        loop="auto",
        http=args.http,
        ws=args.ws,
        ws_max_size=config.limits.max_message_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server_config.load()
    loop = "asyncio"
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        loop = "uvloop"
    stack = (
        f"uvicorn {uvicorn.__version__}, loop {loop}, http "
        f"{server_config.http_protocol_class.__name__}, ws "
        f"{getattr(server_config.ws_protocol_class, '__name__', None)}"
    )
    port = sock.getsockname()[1]
    print(f"{label}: listening on ws://{args.host}:{port}/ ({stack})", file=sys.stderr, flush=True)
    uvicorn.Server(server_config).run(sockets=[sock])
    return 0


# -- the driver -------------------------------------------------------------------------------


async def start(
    name: str, args: argparse.Namespace, tmp: Path, secret: str, n: int
) -> tuple[Server, str]:
    stderr = tmp / f"{name}-{n}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    cmd = [sys.executable, str(SELF), "serve", "--config", str(CONFIG), "--port", "0"]
    cmd += ["--http", args.http, "--ws", args.ws]
    if name != "unguarded":
        cmd.append("--guarded")
        env["WSGUARD_JWT_SECRET"] = secret
        env["WSGUARD_AUDIT__FILE"] = str(tmp / f"audit-{n}.jsonl")
    if name == "baseline":
        env["PYTHONPATH"] = os.pathsep.join(
            [str(args.baseline_src), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    cmd, pin = bench.pinned(cmd, args.server_cpu)
    server = await bench.start_listener(name, cmd, stderr, env=env, preexec=pin)
    first = stderr.read_text(errors="replace").splitlines()
    stack = next((line.split("(", 1)[1].rstrip(")") for line in first if "listening" in line), "")
    return server, stack


def _rates(prefix: str, result: bench.PhaseResult) -> dict[str, Any]:
    cpu = result.server_cpu_pct()
    return {
        f"{prefix}_per_s": result.rate(),
        f"{prefix}_per_cpu_s": result.rate() * 100 / cpu if cpu > 0 else float("nan"),
        f"{prefix}_p50_ms": result.percentile_ms(0.50),
        f"{prefix}_p99_ms": result.percentile_ms(0.99),
        f"{prefix}_loadgen_cpu": result.loadgen_cpu_pct(),
        f"{prefix}_server_cpu": cpu,
        f"{prefix}_errors": result.errors,
    }


async def bench_server(
    name: str, args: argparse.Namespace, tmp: Path, secret: str, tokens: list[str], n: int, rnd: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"server": name, "round": rnd}
    server, out["stack"] = await start(name, args, tmp, secret, n)
    try:
        await bench.warm_up(args, server, tmp, tokens)
        if "idle" in args.phases:
            idle = await bench.idle_memory(args, server, tmp, tokens)
            out["idle_bytes_per_conn"] = idle["idle_bytes_per_conn"]
            out["idle_lost"] = idle["idle_conns"] - idle["idle_alive"]
        if "pingpong" in args.phases:
            pp = await bench.measured(args, server, tmp, "pingpong", args.conns, tokens, args.depth)
            out |= _rates("pp", pp)
        if "handshake" in args.phases:
            client, args.client = args.client, "raw"
            try:
                hs = await bench.measured(args, server, tmp, "handshake", args.hs_workers, tokens)
            finally:
                args.client = client
            out |= _rates("hs", hs)
        out["rss_end"] = bench.rss_bytes(server.pid)
    finally:
        await bench.stop_process(server.proc)
    short = {
        k: round(v, 3) if isinstance(v, float) else v
        for k, v in out.items()
        if not k.endswith("_errors") or v
    }
    bench.log(f"bench_asgi: round {rnd} {name:>9}: " + json.dumps(short))
    return out


ROWS = (
    ("pp_per_s", "ping/pong messages/s", "{:,.0f}"),
    ("pp_per_cpu_s", "  per server CPU-second", "{:,.0f}"),
    ("pp_p99_ms", "  p99 round trip (ms)", "{:.2f}"),
    ("pp_server_cpu", "  server CPU (%)", "{:.0f}"),
    ("pp_loadgen_cpu", "  loadgen CPU (%)", "{:.0f}"),
    ("hs_per_s", "handshakes/s", "{:,.0f}"),
    ("hs_per_cpu_s", "  per server CPU-second", "{:,.0f}"),
    ("hs_server_cpu", "  server CPU (%)", "{:.0f}"),
    ("hs_loadgen_cpu", "  loadgen CPU (%)", "{:.0f}"),
    ("idle_bytes_per_conn", "memory per idle conn (B)", "{:,.0f}"),
)

#: (row key, what is checked, check of (guarded, unguarded) -> (figure shown, pass))
Check = Callable[[float, float], tuple[str, bool]]


def _ratio(need: float) -> Check:
    def check(guarded: float, unguarded: float) -> tuple[str, bool]:
        ratio = guarded / unguarded if unguarded else float("nan")
        return f"{ratio:.2f}x (need >= {need})", ratio >= need

    return check


def _extra_bytes(limit: float) -> Check:
    def check(guarded: float, unguarded: float) -> tuple[str, bool]:
        diff = guarded - unguarded
        return f"{diff:+,.0f} B (need <= +{limit:,.0f})", diff <= limit

    return check


TARGETS: tuple[tuple[str, str, Check], ...] = (
    ("pp_per_s", "ping/pong messages/s", _ratio(0.85)),
    ("pp_per_cpu_s", "ping/pong messages per server CPU-second", _ratio(0.85)),
    ("hs_per_s", "handshakes/s", _ratio(0.8)),
    ("hs_per_cpu_s", "handshakes per server CPU-second", _ratio(0.8)),
    ("idle_bytes_per_conn", "memory per idle connection", _extra_bytes(3 * 1024)),
)


def summarize(results: list[dict[str, Any]], servers: tuple[str, ...]) -> bench.Table:
    return bench.median_table(results, (key for key, _, _ in ROWS), servers)


def print_report(results: list[dict[str, Any]], servers: tuple[str, ...]) -> dict[str, Any]:
    table = summarize(results, servers)
    guarded = [s for s in servers if s != "unguarded"]
    header = ("metric", *servers, *(f"{g}/unguarded" for g in guarded))
    rows: list[tuple[str, ...]] = [header]
    for key, label, fmt in ROWS:
        cells = [label]
        stats = table.get(key, {})
        cells += [bench.median_cell(stats.get(name), fmt) for name in servers]
        for g in guarded:
            if g in stats and "unguarded" in stats and stats["unguarded"]["median"]:
                if key == "idle_bytes_per_conn":
                    diff = stats[g]["median"] - stats["unguarded"]["median"]
                    cells.append(f"{diff:+,.0f} B")
                else:
                    cells.append(f"{stats[g]['median'] / stats['unguarded']['median']:.2f}x")
            else:
                cells.append("")
        rows.append(tuple(cells))
    bench.print_rows(rows)
    print()
    checked: list[list[Any]] = []
    for g in guarded:
        for key, label, check in TARGETS:
            stats = table.get(key, {})
            if g not in stats or "unguarded" not in stats:
                continue
            shown, ok = check(stats[g]["median"], stats["unguarded"]["median"])
            checked.append([g, label, shown, ok])
            print(f"{'PASS' if ok else 'FAIL'}  {g}: {label}: {shown}")
    return {"table": table, "targets": checked}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ours = bench.driver_parser(
        "The ASGI middleware in front of a Starlette app under uvicorn, against "
        "the same app unguarded."
    )
    ours.add_argument(
        "--phases",
        type=bench.comma_list,
        default=list(PHASES),
        help="comma-separated subset of " + ",".join(PHASES),
    )
    ours.add_argument("--http", default="auto", help="uvicorn's HTTP implementation (auto)")
    ours.add_argument("--ws", default="auto", help="uvicorn's WebSocket implementation (auto)")
    ours.add_argument(
        "--baseline-src",
        type=Path,
        help="also run the guarded server importing wsguard from this src directory",
    )
    args, known, rest = bench.driver_args(ours, argv)
    args.phases = known.phases
    args.http, args.ws, args.baseline_src = known.http, known.ws, known.baseline_src
    if args.baseline_src is not None:
        args.baseline_src = args.baseline_src.resolve()
        if not (args.baseline_src / "wsguard" / "asgi.py").is_file():
            ours.error(f"--baseline-src: no wsguard/asgi.py under {args.baseline_src}")
    if not any(a == "--client" or a.startswith("--client=") for a in rest):
        args.client = "picows"  # C framing: the load generator must outpace the server
    if not args.phases or set(args.phases) - set(PHASES):
        ours.error(f"--phases: choose from {','.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = parse_args(argv)
    servers = SERVERS + (("baseline",) if args.baseline_src is not None else ())
    bench.prepare_driver(args)
    bench.log(
        f"bench_asgi: {args.rounds} round(s) of {','.join(servers)}; phases "
        f"{','.join(args.phases)}; {args.duration:g} s per phase; {args.conns} ping/pong conns "
        f"x{args.depth} in flight; {args.hs_workers} handshake workers; {args.idle} idle"
    )
    try:
        results = asyncio.run(bench.interleaved_rounds(args, servers, bench_server))
    finally:
        bench.kill_children()
    print()
    stacks = sorted({r["stack"] for r in results})
    print(
        f"Starlette under uvicorn, unguarded vs WsGuardMiddleware (bench.toml): {args.rounds} "
        f"round(s), {args.duration:g} s per phase, {args.conns} ping/pong conns "
        f"({args.msg_bytes} B, {args.depth} in flight), {args.hs_workers} handshake workers, "
        f"{args.idle} idle conns; {'; '.join(stacks)}"
    )
    if args.baseline_src is not None:
        print(f"baseline: wsguard from {args.baseline_src}")
    report = print_report(results, servers)
    errors = {
        f"{r['server']} round {r['round']}": {**r.get("pp_errors", {}), **r.get("hs_errors", {})}
        for r in results
        if r.get("pp_errors") or r.get("hs_errors") or r.get("idle_lost")
    }
    if errors:
        print(f"errors: {errors}")
    bench.write_results(args, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
