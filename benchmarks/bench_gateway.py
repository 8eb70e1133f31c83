"""``wsguard proxy`` in front of an echo backend against the same backend directly, one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_gateway.py            # 3 rounds
    .venv/bin/python benchmarks/bench_gateway.py --quick    # 1 short round (~30 s)
    .venv/bin/python benchmarks/bench_gateway.py --rounds 5 --json /tmp/bench_gateway.json

Processes (loopback only, pinned like benchmarks/bench.py):

* backend: ``benchmarks/echo_backend.py`` (a ``websockets`` server: a welcome frame on
  connect, then every message echoed byte for byte, ``{"type":"ping"`` turned into
  ``{"type":"pong"`` so the load generator recognizes the reply), on ``--backend-cpu`` (0);
* gateway: ``wsguard proxy --config <tmp>/gateway-N.toml --port 0`` on ``--gateway-cpu`` (0).
  The configuration is ``benchmarks/bench.toml`` (the full default policy: HS256 JWT, Origin
  allowlist, strict demo schemas, rate limits raised above this load, violation budget, audit
  log to a temporary file) plus ``auth.secret``, ``gateway.upstream`` = the backend and a
  ``gateway.identity_secret`` (signed identity headers, as recommended);
* load: ``benchmarks/loadgen.py`` (bench.py's load generator) on ``--client-cpu`` (1).

By default the gateway and the backend share CPU 0 (the "server side" of bench.py) and the
load has CPU 1, so (b) costs the server side what the gateway adds per message; the CPU per
message rows (from /proc) carry over to other layouts better than messages/s. Put the backend
elsewhere with ``--backend-cpu``.

Every round, in this order:

1. (c, reference) a fresh backend alone: RSS growth per idle connection opened directly;
2. a fresh backend and a gateway in front of it; warm-up (1, then 20 connections each way);
3. (c) ``--idle`` idle connections through the gateway: RSS growth of the gateway process and,
   separately, of the backend, divided by the connections (read from /proc after a settle);
4. light load, (a) direct then (b) through the gateway (the order alternates every round):
   ``--lat-conns`` connection(s), one ~100-byte ``{"type":"ping","id":...}`` in flight: p50 and
   p99 round trip;
5. loaded, (a) then (b): ``--conns`` connections with ``--depth`` pings in flight each, every
   pong sending the next: messages/s, p50 and p99 round trip, CPU of every process.

Timed phases last ``--duration`` s after ``--warmup`` s. The "added" column is (b) - (a), the
median of the per-round differences. A timed phase during which other processes used more
than ``--max-other`` % of a core on the benchmark CPUs is repeated (``--retries``). The whole
run is bounded by ``--max-seconds``; every child process is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shlex
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import bench  # noqa: E402 - the helpers of benchmarks/bench.py

ECHO = HERE / "echo_backend.py"
PHASES = ("idle", "latency", "pingpong")
PATHS = ("direct", "gateway")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------


async def start_listener(
    name: str, cmd: list[str], cpu: int, tmp: Path, env: dict[str, str]
) -> bench.Server:
    """Start *cmd* pinned to *cpu*; wait for its "listening on ws://HOST:PORT/" line."""
    cmd, pin = bench.pinned(cmd, cpu)
    return await bench.start_listener(name, cmd, tmp / f"{name}.stderr", env=env, preexec=pin)


def clean_env() -> dict[str, str]:
    """The environment without WSGUARD_* variables (the config file decides everything)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}


def backend_command() -> list[str]:
    return [sys.executable, str(ECHO), "--host", bench.HOST, "--port", "0"]


async def start_backend(args: argparse.Namespace, tmp: Path, n: int) -> bench.Server:
    return await start_listener(
        f"backend-{n}", backend_command(), args.backend_cpu, tmp, clean_env()
    )


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """*data* as TOML (scalars, arrays and tables: enough for benchmarks/bench.toml)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        name = key if BARE_KEY.fullmatch(key) else json.dumps(key)
        if isinstance(value, dict):
            tables.append((f"{prefix}.{name}" if prefix else name, value))
        else:
            lines.append(f"{name} = {toml_value(value)}")
    text = "".join(line + "\n" for line in lines)
    for name, table in tables:
        text += f"\n[{name}]\n" + to_toml(table, name)
    return text


def gateway_config(tmp: Path, n: int, secret: str, upstream: str) -> Path:
    """benchmarks/bench.toml + auth.secret + [gateway] upstream, written to *tmp* (0600)."""
    data = tomllib.loads(bench.CONFIG.read_text())
    data.setdefault("auth", {})["secret"] = secret
    data.setdefault("audit", {})["file"] = str(tmp / f"audit-{n}.jsonl")
    data.setdefault("gateway", {}).update(
        upstream=upstream, identity_secret=secrets.token_urlsafe(32)
    )
    path = tmp / f"gateway-{n}.toml"
    path.touch(mode=0o600)
    path.write_text(
        "# written by benchmarks/bench_gateway.py from benchmarks/bench.toml\n" + to_toml(data)
    )
    assert tomllib.loads(path.read_text()) == data
    return path


def gateway_command(args: argparse.Namespace, config: Path) -> list[str]:
    return [*args.wsguard_command, "proxy", "--config", str(config), "--port", "0"]


async def start_gateway(
    args: argparse.Namespace, tmp: Path, n: int, secret: str, backend: bench.Server
) -> bench.Server:
    config = gateway_config(tmp, n, secret, f"ws://{bench.HOST}:{backend.port}/")
    cmd = gateway_command(args, config)
    return await start_listener(f"gateway-{n}", cmd, args.gateway_cpu, tmp, clean_env())


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a phase's load goes: the backend directly, or the gateway in front of it."""

    path: str  # "direct" or "gateway"
    port: int
    pids: dict[str, int]  # role ("gateway", "backend") -> pid


@dataclass
class Measured:
    result: bench.PhaseResult
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the window
    busy_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.result.wall_s

    def pct(self, seconds: float) -> float:
        return 100 * seconds / self.wall_s if self.wall_s > 0 else float("nan")

    def foreign_cpu_pct(self) -> float:
        """CPU used on the benchmark CPUs by anything but our servers and load generators."""
        return self.pct(self.busy_s - sum(self.cpu_s.values()) - self.result.loadgen_cpu_s)

    def us_per_msg(self, *roles: str) -> float:
        count = self.result.count
        used = sum(self.cpu_s.get(role, 0.0) for role in roles)
        return 1e6 * used / count if count else float("nan")


def benchmark_cpus(args: argparse.Namespace) -> set[int]:
    return {args.gateway_cpu, args.backend_cpu, args.client_cpu}


async def run_phase(
    args: argparse.Namespace,
    tmp: Path,
    target: Target,
    phase: str,
    conns: int,
    tokens: list[str],
    depth: int = 1,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> Measured:
    """One load-generator phase against *target*: ``args.loadgen_procs`` processes, one window."""
    nprocs = max(1, min(args.loadgen_procs, conns))
    targets = [
        (target.port, tokens[p::nprocs], conns // nprocs + int(p < conns % nprocs))
        for p in range(nprocs)
    ]
    out = Measured(bench.PhaseResult())
    procs = await bench.open_loadgens(args, tmp, phase, targets, depth)
    try:
        for proc in procs:
            out.result.ready.append(await bench._readline(proc, 60 + conns / 50))
        if phase == "idle":
            if on_ready is not None:
                await on_ready()
            for proc in procs:
                bench._send(proc, {"cmd": "close"})
        else:
            t0 = time.monotonic() + args.warmup
            t1 = t0 + args.duration
            for proc in procs:
                bench._send(proc, {"cmd": "go", "t0": t0, "t1": t1})
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpus = benchmark_cpus(args)
            cpu0 = {role: bench.cpu_seconds_of(pid) for role, pid in target.pids.items()}
            busy0 = bench.busy_seconds(cpus)
            await asyncio.sleep(max(0.0, t1 - time.monotonic()))
            out.cpu_s = {
                role: bench.cpu_seconds_of(pid) - cpu0[role] for role, pid in target.pids.items()
            }
            out.busy_s = bench.busy_seconds(cpus) - busy0
        await bench.collect_loadgens(args, procs, out.result)
    finally:
        await bench.close_loadgens(args, procs)
    for ready in out.result.ready:
        for kind, n in ready.get("open_errors", {}).items():
            out.result.errors[kind] = out.result.errors.get(kind, 0) + n
    if out.result.errors and phase != "idle":  # idle reports its open errors as its errors
        log(f"bench_gateway:   {target.path} {phase}: errors {out.result.errors}")
    return out


async def measured(
    args: argparse.Namespace,
    tmp: Path,
    target: Target,
    conns: int,
    tokens: list[str],
    depth: int,
) -> Measured:
    """A timed ping/pong phase, repeated (up to --retries) while other processes disturbed it."""
    attempt = 0
    while True:
        out = await run_phase(args, tmp, target, "pingpong", conns, tokens, depth)
        other = out.foreign_cpu_pct()
        if other <= args.max_other or attempt >= args.retries:
            return out
        attempt += 1
        log(
            f"bench_gateway:   {target.path} {conns}x{depth}: other processes used {other:.0f}% "
            f"of a core on the benchmark CPUs; repeating ({attempt}/{args.retries})"
        )


async def idle_memory(
    args: argparse.Namespace, tmp: Path, target: Target, tokens: list[str]
) -> dict[str, Any]:
    """RSS growth per idle connection of every process of *target*."""
    roles = list(target.pids)

    async def rss_all() -> dict[str, int]:
        values = await asyncio.gather(
            *(bench.settled_rss(target.pids[role], args.settle) for role in roles)
        )
        return dict(zip(roles, values, strict=True))

    before = await rss_all()
    after: dict[str, int] = {}

    async def measure() -> None:
        after.update(await rss_all())

    idle = await run_phase(args, tmp, target, "idle", args.idle, tokens, on_ready=measure)
    opened = sum(int(r["opened"]) for r in idle.result.ready)
    out: dict[str, Any] = {
        "idle_conns": opened,
        "idle_alive": idle.result.count,
        "idle_errors": idle.result.errors,
    }
    for role in roles:
        out[f"rss_before_{role}"] = before[role]
        out[f"rss_after_{role}"] = after[role]
        out[f"idle_{role}_b"] = (after[role] - before[role]) / opened if opened else float("nan")
    out["idle_total_b"] = sum(out[f"idle_{role}_b"] for role in roles)
    return out


def timed_figures(prefix: str, m: Measured, roles: list[str]) -> dict[str, Any]:
    r = m.result
    out: dict[str, Any] = {
        f"{prefix}per_s": r.rate(),
        f"{prefix}p50_ms": r.percentile_ms(0.50),
        f"{prefix}p99_ms": r.percentile_ms(0.99),
        f"{prefix}loadgen_cpu_pct": r.loadgen_cpu_pct(),
        f"{prefix}foreign_cpu_pct": m.foreign_cpu_pct(),
        f"{prefix}errors": r.errors,
        f"{prefix}server_us_per_msg": m.us_per_msg(*roles),
    }
    for role in roles:
        out[f"{prefix}{role}_cpu_pct"] = m.pct(m.cpu_s[role])
        out[f"{prefix}{role}_us_per_msg"] = m.us_per_msg(role)
    return out


# -- one round --------------------------------------------------------------------------------


async def bench_round(
    args: argparse.Namespace,
    tmp: Path,
    secret: str,
    tokens: list[str],
    round_no: int,
    counter: list[int],
) -> dict[str, Any]:
    out: dict[str, Any] = {"round": round_no, "direct": {}, "gateway": {}}
    phases = args.phases

    async def warm(targets: list[Target]) -> None:
        # one connection alone first, then 20 (see bench.py: CPython 3.11 shares one
        # attribute-key table among a class's instances until a burst of half-built ones)
        for conns in (1, 20):
            for target in targets:
                await run_phase(args, tmp, target, "idle", conns, tokens)

    if "idle" in phases:  # (c, reference): the backend alone, fresh
        counter[0] += 1
        backend = await start_backend(args, tmp, counter[0])
        try:
            direct = Target("direct", backend.port, {"backend": backend.pid})
            await warm([direct])
            out["direct"].update(await idle_memory(args, tmp, direct, tokens))
        finally:
            await bench.stop_process(backend.proc)

    counter[0] += 1
    backend = await start_backend(args, tmp, counter[0])
    gateway: bench.Server | None = None
    try:
        gateway = await start_gateway(args, tmp, counter[0], secret, backend)
        direct = Target("direct", backend.port, {"backend": backend.pid})
        via = Target("gateway", gateway.port, {"gateway": gateway.pid, "backend": backend.pid})
        await warm([direct, via])
        if "idle" in phases:  # (c): through the gateway, gateway and backend RSS apart
            out["gateway"].update(await idle_memory(args, tmp, via, tokens))
        order = [direct, via] if round_no % 2 else [via, direct]
        if "latency" in phases and args.lat_conns:
            for target in order:
                lat = await measured(args, tmp, target, args.lat_conns, tokens, 1)
                out[target.path].update(timed_figures("lat_", lat, list(target.pids)))
        if "pingpong" in phases:
            for target in order:
                pp = await measured(args, tmp, target, args.conns, tokens, args.depth)
                out[target.path].update(timed_figures("pp_", pp, list(target.pids)))
        out["gateway"]["rss_end_gateway"] = bench.rss_bytes(gateway.pid)
        out["gateway"]["rss_end_backend"] = bench.rss_bytes(backend.pid)
    finally:
        if gateway is not None:
            await bench.stop_process(gateway.proc)
        await bench.stop_process(backend.proc)
    for path in PATHS:
        log(f"bench_gateway: round {round_no} {path:>7}: " + progress(out[path]))
    return out


def progress(out: dict[str, Any]) -> str:
    parts: list[str] = []
    if "pp_per_s" in out:
        parts.append(
            f"{out['pp_per_s']:,.0f} msg/s (p50 {out['pp_p50_ms']:.2f} ms, p99 "
            f"{out['pp_p99_ms']:.2f} ms; {out['pp_server_us_per_msg']:.1f} server CPU-µs/msg, "
            f"loadgen CPU {out['pp_loadgen_cpu_pct']:.0f}%, other "
            f"{out['pp_foreign_cpu_pct']:.0f}%)"
        )
    if "lat_p50_ms" in out:
        parts.append(
            f"light load p50 {out['lat_p50_ms']:.3f} ms, p99 {out['lat_p99_ms']:.3f} ms "
            f"({out['lat_per_s']:,.0f} msg/s)"
        )
    if "idle_total_b" in out:
        parts.append(
            f"{out['idle_total_b']:,.0f} B/idle conn ({out['idle_alive']}/{out['idle_conns']} open)"
        )
    return " | ".join(parts)


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str
    compare: bool = True  # show (b - a) and b/a


ROWS = (
    Row("pp_per_s", "messages/s, loaded", "{:,.0f}"),
    Row("pp_p50_ms", "p50 RTT, loaded (ms)", "{:.2f}"),
    Row("pp_p99_ms", "p99 RTT, loaded (ms)", "{:.2f}"),
    Row("lat_p50_ms", "p50 RTT, light load (ms)", "{:.3f}"),
    Row("lat_p99_ms", "p99 RTT, light load (ms)", "{:.3f}"),
    Row("lat_per_s", "messages/s, light load", "{:,.0f}"),
    Row("pp_server_us_per_msg", "server CPU per message, loaded (µs)", "{:.1f}"),
    Row("pp_gateway_us_per_msg", "  gateway process (µs)", "{:.1f}"),
    Row("pp_backend_us_per_msg", "  backend process (µs)", "{:.1f}"),
    Row("idle_total_b", "memory per idle connection (B)", "{:,.0f}"),
    Row("idle_gateway_b", "  gateway process (B)", "{:,.0f}"),
    Row("idle_backend_b", "  backend process (B)", "{:,.0f}"),
    Row("pp_gateway_cpu_pct", "gateway CPU, loaded (% of a core)", "{:.0f}", False),
    Row("pp_backend_cpu_pct", "backend CPU, loaded (% of a core)", "{:.0f}", False),
    Row("pp_loadgen_cpu_pct", "loadgen CPU, loaded (% of a core)", "{:.0f}", False),
    Row("pp_foreign_cpu_pct", "other processes, loaded (% of a core)", "{:.0f}", False),
)


def cell(fmt: str, values: list[float]) -> str:
    values = [v for v in values if v == v]  # not NaN
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" [{fmt.format(min(values))}, {fmt.format(max(values))}]"
    return text


def signed(fmt: str) -> str:
    return fmt.replace("{:", "{:+")


def print_table(results: list[dict[str, Any]]) -> None:
    many = len(results) > 1
    header = (
        "metric",
        "(a) direct" + (" median [min, max]" if many else ""),
        "(b) via gateway" + (" median [min, max]" if many else ""),
        "added (b - a)",
        "b/a",
    )
    rows = [header]
    for row in ROWS:
        a = [float(r["direct"][row.key]) for r in results if row.key in r["direct"]]
        b = [float(r["gateway"][row.key]) for r in results if row.key in r["gateway"]]
        if not a and not b:
            continue
        diffs = [
            float(r["gateway"][row.key]) - float(r["direct"][row.key])
            for r in results
            if row.key in r["direct"] and row.key in r["gateway"]
        ]
        added = cell(signed(row.fmt), diffs) if diffs and row.compare else "-"
        ratio = "-"
        if row.compare and a and b and statistics.median(a):
            ratio = f"{statistics.median(b) / statistics.median(a):.2f}"
        rows.append((row.label, cell(row.fmt, a), cell(row.fmt, b), added, ratio))
    bench.print_rows(rows)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark wsguard proxy against the same echo backend directly."
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s phases, 500 idle")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per measured phase (default 5)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--conns", type=int, default=50, help="loaded connections (50)")
    parser.add_argument("--idle", type=int, help="idle connections (default 2000; quick 500)")
    parser.add_argument("--msg-bytes", type=int, default=100, help="ping payload bytes (100)")
    parser.add_argument(
        "--depth", type=int, default=8, help="pings in flight per loaded connection (8)"
    )
    parser.add_argument(
        "--lat-conns",
        type=int,
        default=1,
        help="connections of the light-load phase, one ping in flight each (1; 0 = skip)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before RSS reads")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-operation timeout")
    parser.add_argument(
        "--max-other",
        type=float,
        default=10.0,
        help="repeat a timed phase when other processes used more than this %% of a core "
        "on the benchmark CPUs (10)",
    )
    parser.add_argument("--retries", type=int, help="repeats per phase (default 3; quick 1)")
    parser.add_argument(
        "--max-seconds", type=float, help="bound on the whole run (default 900; quick 120)"
    )
    parser.add_argument("--client", choices=["raw", "websockets"], default="raw")
    parser.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--backend-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--wsguard-command",
        type=shlex.split,
        help="command that runs the wsguard CLI (default: the venv's wsguard)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PHASES),
        help="comma-separated subset of " + ",".join(PHASES),
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (2.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.idle = args.idle or (500 if quick else 2000)
    args.retries = args.retries if args.retries is not None else (1 if quick else 3)
    args.max_seconds = args.max_seconds or (120.0 if quick else 900.0)
    if args.wsguard_command is None:
        exe = bench.find_wsguard()
        if exe is None:
            parser.error("cannot find the wsguard command; use --wsguard-command")
        args.wsguard_command = [exe]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose from {','.join(PHASES)}")
    if args.rounds < 1 or args.duration <= 0 or args.conns < 1 or args.idle < 1:
        parser.error("--rounds, --duration, --conns and --idle must be positive")
    cpus = os.sched_getaffinity(0)
    if benchmark_cpus(args) - cpus:
        parser.error(f"--gateway-cpu, --backend-cpu and --client-cpu must be among {sorted(cpus)}")
    if args.client_cpu in (args.gateway_cpu, args.backend_cpu):
        log("bench_gateway: warning: the load generator shares a CPU with a server")
    return args


class OverBudget(Exception):
    """The run took longer than --max-seconds."""


def count_lines(tmp: Path, pattern: str) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in tmp.glob(pattern))


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(48)
    tokens = bench.mint_tokens(secret, max(args.conns, args.idle, args.lat_conns, 64))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsguard-bench-gateway-") as tmpdir:
        tmp = Path(tmpdir)
        counter = [0]
        budget = asyncio.timeout(args.max_seconds)
        try:
            async with budget:
                for round_no in range(1, args.rounds + 1):
                    results.append(await bench_round(args, tmp, secret, tokens, round_no, counter))
        except TimeoutError:
            if budget.expired():
                raise OverBudget from None
            raise
        audit_lines = count_lines(tmp, "audit-*.jsonl")
    return {"results": results, "audit_lines": audit_lines}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 6 * args.idle + 1024))  # the gateway holds 2 sockets per conn
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 3 * args.idle + 256:
        log(f"bench_gateway: warning: open-file limit {want} may be too low for --idle {args.idle}")
    os.sched_setaffinity(0, {args.client_cpu})  # this process; servers are pinned in the child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    log(f"bench_gateway: {command}")
    log(
        f"bench_gateway: {args.rounds} round(s), {args.duration:g} s phases (+{args.warmup:g} s "
        f"warm-up), {args.conns} loaded connections x{args.depth} in flight, {args.lat_conns} "
        f"light-load connection(s), {args.idle} idle connections; gateway on CPU "
        f"{args.gateway_cpu}, backend on CPU {args.backend_cpu}, load on CPU {args.client_cpu}"
    )
    started = time.monotonic()
    try:
        run = asyncio.run(amain(args))
    except OverBudget:
        log(f"bench_gateway: stopped after --max-seconds {args.max_seconds:g}")
        return 1
    finally:
        bench.kill_children()
    elapsed = time.monotonic() - started
    results = run["results"]
    print()
    print(
        f"wsguard proxy vs the echo backend directly: {args.rounds} round(s), "
        f"{args.duration:g} s per phase; loaded: {args.conns} conns x {args.depth} in flight, "
        f"{args.msg_bytes} B pings; light load: {args.lat_conns} conn x 1 in flight; "
        f"{args.idle} idle conns; gateway CPU {args.gateway_cpu}, backend CPU "
        f"{args.backend_cpu}, load CPU {args.client_cpu}"
    )
    print_table(results)
    errors: dict[str, Any] = {}
    for r in results:
        for path in PATHS:
            out = r[path]
            merged = {
                **out.get("idle_errors", {}),
                **out.get("lat_errors", {}),
                **out.get("pp_errors", {}),
            }
            if out.get("idle_alive") != out.get("idle_conns"):
                merged["idle connections lost"] = out["idle_conns"] - out["idle_alive"]
            if merged:
                errors[f"{path} round {r['round']}"] = merged
    if errors:
        print(f"errors: {errors}")
    foreign = [
        v
        for r in results
        for path in PATHS
        for k, v in r[path].items()
        if k.endswith("foreign_cpu_pct") and v == v
    ]
    if foreign:
        worst = max(foreign)
        print(
            f"other processes on CPUs {','.join(map(str, sorted(benchmark_cpus(args))))} during "
            f"the measured windows: max {worst:.0f}% of a core"
            + ("  WARNING: the machine was not quiet; figures are indicative" if worst > 10 else "")
        )
    print(f"wsguard audit log lines written: {run['audit_lines']}")
    print(f"backend: {shlex.join(backend_command())}")
    print(
        f"gateway: {shlex.join(args.wsguard_command)} proxy --config <tmpdir>/gateway-N.toml "
        "--port 0  (benchmarks/bench.toml + auth.secret, gateway.upstream = the backend, "
        "gateway.identity_secret)"
    )
    print(f"command: {command}  (cwd {Path.cwd()}; {elapsed:.0f} s)")
    if args.json is not None:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "command": command,
            "cpu": os.cpu_count(),
            "results": results,
            "audit_lines": run["audit_lines"],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
