"""wsguard on both engines against plain websockets and plain picows, one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_engines.py            # 3 interleaved rounds
    .venv/bin/python benchmarks/bench_engines.py --quick    # 1 short round
    # wsguard from another checkout beside this one, interleaved in the same run:
    .venv/bin/python benchmarks/bench_engines.py --quick --servers picows --baseline-src ../main/src

Servers (started fresh for every round, pinned to CPU 0; the load generator on CPU 1):

* ``websockets``: ``benchmarks/plain_server.py --json orjson`` (asyncio loop);
* ``picows``: ``benchmarks/plain_picows.py`` (uvloop);
* ``wsguard``: ``wsguard serve --config benchmarks/bench.toml``, ``engine = "websockets"``;
* ``wsguard-picows``: the same with ``WSGUARD_ENGINE=picows``;
* ``baseline`` (with ``--baseline-src DIR``): ``wsguard-picows`` importing wsguard from
  *DIR* (another checkout's ``src``), to compare two versions in one run
  (``--baseline-engine websockets``: ``wsguard`` instead).

The wsguard servers run the full policy of ``bench.toml`` (HS256 JWT, Origin allowlist,
strict schemas, rate limits, violation budget, audit log to a file) with the limits raised
above the load.

Phases per server and round. Ping/pong, one-way and handshakes are driven by the C load
generator (``benchmarks/cloadgen.py``, built on first use; ``--client c``, the default when
a C compiler is found, else ``--client picows``), the rest by ``benchmarks/loadgen.py`` on
uvloop (idle with the raw client, the abusers with pre-built raw frames):

* ``idle``: RSS growth per idle authenticated connection (``--idle`` of them);
* ``pingpong``: ``--conns`` connections, ``--depth`` ~100-byte pings in flight each;
* ``oneway``: one connection streaming ~100-byte ``data`` messages (valid under the demo
  schema; wsguard relays each to the other connections, of which there are none) as fast
  as the server reads them; a final ping's pong proves every message was processed;
* ``handshake``: ``--hs-workers`` workers each opening a connection (HS256 Bearer token,
  Origin), waiting for the welcome frame and closing cleanly;
* ``flood`` (wsguard servers only, on a second server started with the default violation
  budget, 10, and the default 60 handshakes per minute per address, so abuse costs what it
  costs in production): 50 well-behaved connections (each from its own loopback address,
  127.0.2.x) doing strict ping/pong (one in flight), first alone (``calm``), then beside
  ``--abusers`` connections, each from its own address too (127.0.1.x), that flood
  truncated JSON or 70 KB messages at full speed and reconnect whenever they are closed. Reported: p99 of the well-behaved round trips in both,
  and how many of them were disconnected (must be 0).

Every figure is the median of the rounds with its [min-max]; the load generator's CPU is in
the table (it must stay below 100% of its core for a rate to be the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench, cloadgen

HERE, HOST, PLAIN, CONFIG = bench.HERE, bench.HOST, bench.PLAIN, bench.CONFIG
Server = bench.Server
kill_children, log, measured = bench.kill_children, bench.log, bench.measured
pinned, rss_bytes, run_loadgen = bench.pinned, bench.rss_bytes, bench.run_loadgen
start_listener, stop_process = bench.start_listener, bench.stop_process

PICOWS = HERE / "plain_picows.py"
SERVERS = ("websockets", "picows", "wsguard", "wsguard-picows")
PHASES = ("idle", "pingpong", "oneway", "handshake", "flood")
GUARDED = ("wsguard", "wsguard-picows", "baseline")


async def start(
    name: str, args: argparse.Namespace, tmp: Path, secret: str, n: int, *, flood: bool = False
) -> Server:
    stderr = tmp / f"{name}-{n}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    if name == "websockets":
        cmd = [sys.executable, str(PLAIN), "--host", HOST, "--port", "0", "--json", "orjson"]
        if args.plain_uvloop:
            cmd.append("--uvloop")
    elif name == "picows":
        cmd = [sys.executable, str(PICOWS), "--host", HOST, "--port", "0"]
    else:
        cmd = [*args.wsguard_command, "serve", "--config", str(CONFIG), "--port", "0"]
        env["WSGUARD_JWT_SECRET"] = secret
        env["WSGUARD_AUDIT__FILE"] = str(tmp / f"audit-{n}.jsonl")
        env["WSGUARD_ENGINE"] = "websockets" if name == "wsguard" else "picows"
        if name == "baseline":  # wsguard from another checkout's src (on picows by default)
            env["WSGUARD_ENGINE"] = args.baseline_engine
            env["PYTHONPATH"] = os.pathsep.join(
                [str(args.baseline_src), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        if flood:  # what abuse may spend: the defaults (10 violations, 60 handshakes/min/address)
            env["WSGUARD_LIMITS__VIOLATION_BUDGET"] = "10"
            env["WSGUARD_LIMITS__HANDSHAKES_PER_MINUTE"] = "60"
    cmd, pin = pinned(cmd, args.server_cpu)
    return await start_listener(name, cmd, stderr, env=env, preexec=pin)


async def bench_server(
    name: str, args: argparse.Namespace, tmp: Path, secret: str, tokens: list[str], n: int, rnd: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"server": name, "round": rnd}
    phases = args.phases
    server = await start(name, args, tmp, secret, n)
    try:
        await bench.warm_up(args, server, tmp, tokens)
        if "idle" in phases:
            idle = await bench.idle_memory(args, server, tmp, tokens)
            out["idle_bytes_per_conn"] = idle["idle_bytes_per_conn"]
            out["idle_lost"] = idle["idle_conns"] - idle["idle_alive"]
        if "pingpong" in phases:
            pp = await measured(args, server, tmp, "pingpong", args.conns, tokens, args.depth)
            out |= _rates("pp", pp)
        if "oneway" in phases:
            ow = await measured(args, server, tmp, "oneway", 1, tokens)
            # the rate's time includes draining what was sent in the window; CPU is read
            # over the window itself
            out |= _rates("ow", ow, window=args.duration)
        if "handshake" in phases:
            # the raw client: picows' ws_connect costs the load generator more per handshake
            client = args.client
            args.client = "raw" if client == "picows" else client
            try:
                hs = await measured(args, server, tmp, "handshake", args.hs_workers, tokens)
            finally:
                args.client = client
            out |= _rates("hs", hs)
        out["rss_end"] = rss_bytes(server.pid)
    finally:
        await stop_process(server.proc)
    if "flood" in phases and name in GUARDED:
        server = await start(name, args, tmp, secret, n, flood=True)
        try:
            # warm-up: within the default burst of 10 handshakes per address
            await run_loadgen(args, server, tmp, "idle", 8, tokens)
            args.spread = True  # users from addresses of their own, as abusers are
            try:
                calm = await measured(args, server, tmp, "pingpong", args.flood_conns, tokens, 1)
                abuse = await start_abusers(args, tmp, server, tokens)
                try:
                    flood = await run_loadgen(
                        args, server, tmp, "pingpong", args.flood_conns, tokens, depth=1
                    )
                    abused = await bench._readline(abuse, 3 * args.timeout + 30)
                finally:
                    await stop_process(abuse, grace=args.timeout + 5)
            finally:
                args.spread = False
            out |= _rates("calm", calm)
            out |= _rates("flood", flood)
            out["flood_disconnected"] = flood.errors.get("connections closed by the server", 0)
            out["abuse_writes"] = abused["count"]
            out["abuse_errors"] = abused["errors"]
        finally:
            await stop_process(server.proc)
    log(f"bench: round {rnd} {name:>14}: " + json.dumps(_short(out)))
    return out


async def start_abusers(
    args: argparse.Namespace, tmp: Path, server: Server, tokens: list[str]
) -> asyncio.subprocess.Process:
    """The abusive connections: a load generator at nice 19 on the load generator's CPU,
    flooding through the whole ping/pong window that follows."""
    cmd, pin = pinned([sys.executable, str(bench.LOADGEN)], args.client_cpu)
    with (tmp / "loadgen-abuse.stderr").open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            "nice", "-n", "19", *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            limit=1 << 24,
            preexec_fn=pin,
        )  # fmt: skip
    bench.CHILDREN[proc.pid] = "abusers"
    config = {
        "phase": "abuse",
        "client": "raw",
        "host": HOST,
        "port": server.port,
        "origin": bench.ORIGIN,
        "tokens": tokens,
        "conns": 0,
        "msg_bytes": args.msg_bytes,
        "depth": 1,
        "timeout": args.timeout,
        "index": 9,
        "abusers": args.abusers,
        "max_seconds": args.warmup + args.duration + 180,
    }
    bench._send(proc, config)
    await bench._readline(proc, 30)
    now = time.monotonic()  # flood from now until after the ping/pong window ends
    bench._send(proc, {"cmd": "go", "t0": now, "t1": now + args.warmup + args.duration + 2})
    return proc


def _rates(prefix: str, result: bench.PhaseResult, window: float = 0.0) -> dict[str, Any]:
    cpu = result.server_cpu_pct()
    loadgen_cpu = result.loadgen_cpu_pct()
    if window:
        cpu = 100 * result.server_cpu_s / window
        loadgen_cpu = 100 * result.loadgen_cpu_s / window
    return {
        f"{prefix}_per_s": result.rate(),
        f"{prefix}_per_cpu_s": result.rate() * 100 / cpu if cpu > 0 else float("nan"),
        f"{prefix}_p50_ms": result.percentile_ms(0.50),
        f"{prefix}_p99_ms": result.percentile_ms(0.99),
        f"{prefix}_loadgen_cpu": loadgen_cpu,
        f"{prefix}_server_cpu": cpu,
        f"{prefix}_errors": result.errors,
    }


def _short(out: dict[str, Any]) -> dict[str, Any]:
    return {
        k: round(v, 3) if isinstance(v, float) else v
        for k, v in out.items()
        if not k.endswith("_errors") or v
    }


ROWS = (
    ("pp_per_s", "ping/pong messages/s", "{:,.0f}"),
    ("pp_p99_ms", "  p99 round trip (ms)", "{:.2f}"),
    ("pp_server_cpu", "  server CPU (%)", "{:.0f}"),
    ("pp_per_cpu_s", "  per server CPU-second", "{:,.0f}"),
    ("pp_loadgen_cpu", "  loadgen CPU (%)", "{:.0f}"),
    ("ow_per_s", "one-way messages/s", "{:,.0f}"),
    ("ow_server_cpu", "  server CPU (%)", "{:.0f}"),
    ("ow_per_cpu_s", "  per server CPU-second", "{:,.0f}"),
    ("ow_loadgen_cpu", "  loadgen CPU (%)", "{:.0f}"),
    ("hs_per_s", "handshakes/s", "{:,.0f}"),
    ("hs_server_cpu", "  server CPU (%)", "{:.0f}"),
    ("hs_per_cpu_s", "  per server CPU-second", "{:,.0f}"),
    ("hs_loadgen_cpu", "  loadgen CPU (%)", "{:.0f}"),
    ("idle_bytes_per_conn", "memory per idle conn (B)", "{:,.0f}"),
    ("calm_p99_ms", "50 conns p99, calm (ms)", "{:.3f}"),
    ("flood_p99_ms", "50 conns p99, flood (ms)", "{:.3f}"),
    ("flood_disconnected", "  well-behaved disconnected", "{:.0f}"),
    ("flood_loadgen_cpu", "  loadgen CPU, flood (%)", "{:.0f}"),
)


def summarize(results: list[dict[str, Any]]) -> bench.Table:
    return bench.median_table(results, (key for key, _, _ in ROWS), (*SERVERS, "baseline"))


def targets(table: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, bool]]:
    def med(key: str, name: str) -> float:
        return table.get(key, {}).get(name, {}).get("median", float("nan"))

    guarded = "wsguard-picows"

    def ratio(key: str) -> float:
        return med(key, guarded) / med(key, "picows")

    def flood(name: str) -> float:  # 2x calm over flood: >= 1 when flood p99 < 2x calm
        return 2 * med("calm_p99_ms", name) / med("flood_p99_ms", name)

    # wsguard (full policy) against plain picows in the same run; rates where both servers
    # ran at their core's limit, per server CPU-second as well (the fair figure when the
    # load generator or another process kept a server below 100 %)
    checks = [
        ("handshakes >= 0.75x plain picows", ratio("hs_per_s"), 0.75),
        ("  per server CPU-second", ratio("hs_per_cpu_s"), 0.75),
        ("one-way >= 0.5x plain picows", ratio("ow_per_s"), 0.5),
        ("  per server CPU-second", ratio("ow_per_cpu_s"), 0.5),
        ("ping/pong >= 0.8x plain picows", ratio("pp_per_s"), 0.8),
        ("  per server CPU-second", ratio("pp_per_cpu_s"), 0.8),
        ("idle memory <= 8 KiB", 8 * 1024 / med("idle_bytes_per_conn", guarded), 1.0),
        ("flood p99 < 2x calm (picows engine)", flood(guarded), 1.0),
        ("flood p99 < 2x calm (websockets engine)", flood("wsguard"), 1.0),
    ]
    return [
        (label, f"{value:.2f} (need >= {need})", value >= need) for label, value, need in checks
    ]


def print_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    table = summarize(results)
    shown = (*SERVERS, *(["baseline"] if any(r["server"] == "baseline" for r in results) else []))
    header = ("metric", *shown)
    rows: list[tuple[str, ...]] = [header]
    for key, label, fmt in ROWS:
        cells = [label]
        cells += [bench.median_cell(table.get(key, {}).get(name), fmt) for name in shown]
        rows.append(tuple(cells))
    bench.print_rows(rows)
    print()
    checked = targets(table)
    for label, value, ok in checked:
        print(f"{'PASS' if ok else 'FAIL'}  wsguard-picows {label}: {value}")
    return {"table": table, "targets": [list(t) for t in checked]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ours = bench.driver_parser("wsguard on both engines vs plain engines.")
    ours.add_argument("--abusers", type=int, default=100, help="flooding connections (100)")
    ours.add_argument("--flood-conns", type=int, default=50, help="well-behaved conns (50)")
    ours.add_argument(
        "--plain-uvloop",
        action="store_true",
        help="run plain websockets on uvloop, as wsguard runs (default: asyncio's own loop)",
    )
    ours.add_argument(
        "--servers",
        type=bench.comma_list,
        default=list(SERVERS),
        help="comma-separated subset of " + ",".join(SERVERS),
    )
    ours.add_argument(
        "--phases",
        type=bench.comma_list,
        default=list(PHASES),
        help="comma-separated subset of " + ",".join(PHASES),
    )
    ours.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run wsguard importing wsguard from this src directory "
        "(another checkout), interleaved in the same run",
    )
    ours.add_argument(
        "--baseline-engine",
        choices=("picows", "websockets"),
        default="picows",
        help="the engine of the --baseline-src server (picows)",
    )
    args, known, rest = bench.driver_args(ours, argv)
    args.abusers, args.flood_conns = known.abusers, known.flood_conns
    args.servers, args.phases = known.servers, known.phases
    args.plain_uvloop = known.plain_uvloop
    if not any(a == "--client" or a.startswith("--client=") for a in rest):
        # the load generator must outpace picows servers: the C one, else picows' C framing
        try:
            cloadgen.build()
            args.client = "c"
        except cloadgen.BuildError as exc:
            log(f"bench_engines: {exc}; using the picows client (--client picows)")
            args.client = "picows"
    if set(args.servers) - set(SERVERS) or set(args.phases) - set(PHASES):
        ours.error(f"--servers from {','.join(SERVERS)}; --phases from {','.join(PHASES)}")
    args.baseline_src, args.baseline_engine = known.baseline_src, known.baseline_engine
    if args.baseline_src is not None:
        args.baseline_src = args.baseline_src.resolve()
        if not (args.baseline_src / "wsguard" / "guard.py").is_file():
            ours.error(f"--baseline-src: no wsguard/guard.py under {args.baseline_src}")
        args.servers = [*args.servers, "baseline"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.prepare_driver(args)
    log(
        f"bench_engines: {args.rounds} round(s) of {','.join(args.servers)}; phases "
        f"{','.join(args.phases)}; {args.duration:g} s per phase; {args.conns} ping/pong conns "
        f"x{args.depth} in flight; {args.hs_workers} handshake workers; {args.idle} idle; "
        f"flood: {args.flood_conns} well-behaved + {args.abusers} abusers"
    )
    try:
        results = asyncio.run(bench.interleaved_rounds(args, args.servers, bench_server))
    finally:
        kill_children()
    print()
    bench.write_results(args, results, print_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
