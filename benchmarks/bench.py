"""wsguard against a plain ``websockets`` server, same load, same run (issue 3, "Benchmarks").

Run from the repository root:

    .venv/bin/python benchmarks/bench.py            # 3 interleaved rounds
    .venv/bin/python benchmarks/bench.py --quick    # 1 short round
    .venv/bin/python benchmarks/bench.py --rounds 5 --json /tmp/bench.json

Servers (each started fresh for every round, pinned to CPU 0):

* plain: ``benchmarks/plain_server.py``: websockets asyncio server, welcome + ping/pong, JSON
  with orjson (``--plain-json json`` for the standard library, a slower baseline);
* wsguard: ``wsguard serve --config benchmarks/bench.toml``: the full default policy (HS256
  JWT, Origin allowlist, strict schemas, rate limits, violation budget, audit log to a file)
  with only the limits raised above this load.

The load generator (``benchmarks/loadgen.py``, one or more processes pinned to CPU 1, loopback
only) drives both identically, in this order per server: a warm-up (20 connections);
idle (K connections held open: server RSS growth per connection, read from /proc after a
settle); light-load latency (1 connection, one ping in flight: p50/p99 round trip);
ping/pong (N connections, each with ``--depth`` ~100-byte JSON pings in flight, every pong
sending the next: messages/s and loaded p50/p99); handshakes (C workers each opening a
connection with an HS256 Bearer token and an Origin, waiting for the welcome frame and closing
cleanly: handshakes/s). Timed phases last ``--duration`` seconds after ``--warmup`` seconds.

Why several pings in flight: on this 2-vCPU VM one ping per connection leaves both processes
waiting on each other's wake-ups and the load generator near 100% of its core; with 8 in flight
the server is saturated and the load generator has headroom. ``--depth 1`` gives the strict
request/response form.

For every timed phase the table shows the load generator's CPU (getrusage, % of one core), the
server's CPU (/proc/<pid>/stat), and bench.py measures what *other* processes used on the two
CPUs (/proc/stat); a phase disturbed by more than ``--max-other`` % is repeated (``--retries``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "bench.toml"
LOADGEN = HERE / "loadgen.py"
CLOADGEN = HERE / "cloadgen.py"  # --client c: the C load generator, for the phases below
C_PHASES = ("pingpong", "oneway", "handshake")
PLAIN = HERE / "plain_server.py"
ORIGIN = "https://bench.example.com"
HOST = "127.0.0.1"
SERVERS = ("plain", "wsguard")
PHASES = ("idle", "latency", "pingpong", "handshake")
LISTENING = re.compile(r"listening on ws://[^:]+:(\d+)/")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# pid -> description of every child still to be reaped; killed in main()'s finally.
CHILDREN: dict[int, str] = {}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------


TASKSET = shutil.which("taskset")


def pinned(cmd: list[str], cpu: int) -> tuple[list[str], Callable[[], None] | None]:
    """*cmd* made to run on *cpu* only: through taskset, else set in the forked child."""
    if TASKSET is not None:
        return [TASKSET, "-c", str(cpu), *cmd], None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return cmd, pin


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    port: int
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def busy_seconds(cpus: set[int]) -> float:
    """Time *cpus* spent busy (not idle/iowait), from /proc/stat."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name = line.split(maxsplit=1)[0]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in line.split()[1:]]
            total += sum(ticks[:8]) - ticks[3] - ticks[4]
    return total / CLK_TCK


def cpu_seconds_of(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def start_server(
    name: str,
    args: argparse.Namespace,
    tmp: Path,
    secret: str,
    n: int,
    *,
    cpu: int | None = None,
    extra: tuple[str, ...] = (),
) -> Server:
    """Start the plain server or ``wsguard serve`` (with *extra* arguments) on *cpu*."""
    stderr = tmp / f"{name}-{n}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    if name == "plain":
        cmd = [sys.executable, str(PLAIN), "--host", HOST, "--port", "0", "--json", args.plain_json]
    else:
        cmd = [*args.wsguard_command, "serve", "--config", str(CONFIG), "--port", "0", *extra]
        env["WSGUARD_JWT_SECRET"] = secret
        env["WSGUARD_AUDIT__FILE"] = str(tmp / f"audit-{n}.jsonl")
    cmd, pin = pinned(cmd, args.server_cpu if cpu is None else cpu)
    return await start_listener(name, cmd, stderr, env=env, preexec=pin)


async def start_listener(
    name: str,
    cmd: list[str],
    stderr: Path,
    *,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
    start_seconds: float = 20.0,
) -> Server:
    """Start *cmd* (stderr to a file) and wait for its "listening on ws://HOST:PORT/" line."""
    output = stderr  # a small local file, read while polling
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=ROOT,
            preexec_fn=preexec,
        )
    CHILDREN[proc.pid] = name
    deadline = time.monotonic() + start_seconds
    while time.monotonic() < deadline:
        match = LISTENING.search(output.read_text(errors="replace"))
        if match:
            return Server(name, proc, int(match.group(1)), stderr)
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await stop_process(proc)
    raise RuntimeError(f"{name} did not start:\n{output.read_text(errors='replace')}")


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 15) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    CHILDREN.pop(proc.pid, None)


def kill_children() -> None:
    for pid, what in list(CHILDREN.items()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log(f"bench: killed leftover {what} (pid {pid})")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        CHILDREN.pop(pid, None)


# -- load generator ---------------------------------------------------------------------------


@dataclass
class PhaseResult:
    count: int = 0
    wall_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    busy_s: float = 0.0
    hist: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ready: list[dict[str, Any]] = field(default_factory=list)

    def rate(self) -> float:
        return self.count / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        total = sum(self.hist.values())
        if not total:
            return float("nan")
        rank = q * (total - 1)
        seen = 0
        for us in sorted(self.hist):
            seen += self.hist[us]
            if seen > rank:
                return us / 1000
        return max(self.hist) / 1000

    def loadgen_cpu_pct(self) -> float:
        return 100 * self.loadgen_cpu_s / self.wall_s if self.wall_s > 0 else float("nan")

    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_s / self.wall_s if self.wall_s > 0 else float("nan")

    def foreign_cpu_pct(self) -> float:
        """CPU used on the two benchmark CPUs by anything but the server and load generator."""
        if self.wall_s <= 0:
            return float("nan")
        return 100 * (self.busy_s - self.server_cpu_s - self.loadgen_cpu_s) / self.wall_s


async def _readline(proc: asyncio.subprocess.Process, wait_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), wait_s)
    if not line:
        raise RuntimeError(f"load generator {proc.pid} exited (code {await proc.wait()})")
    message: dict[str, Any] = json.loads(line)
    return message


def _send(proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(message) + "\n").encode())


async def open_loadgens(
    args: argparse.Namespace,
    tmp: Path,
    phase: str,
    targets: list[tuple[int, list[str], int]],
    depth: int = 1,
) -> list[asyncio.subprocess.Process]:
    """One configured load generator per (port, tokens, connections) target, ready."""
    procs: list[asyncio.subprocess.Process] = []
    setup_timeout = 60 + sum(conns for _, _, conns in targets) / 50
    try:
        for p, (port, tokens, conns) in enumerate(targets):
            err = (tmp / f"loadgen-{phase}-{p}.stderr").open("ab")
            script, client = LOADGEN, args.client
            if args.client == "c":  # other phases: the Python load generator, raw client
                script, client = (CLOADGEN, "c") if phase in C_PHASES else (LOADGEN, "raw")
            cmd, pin = pinned([sys.executable, str(script)], args.client_cpu)
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=1 << 24,
                preexec_fn=pin,
            )
            err.close()
            CHILDREN[proc.pid] = f"load generator {p}"
            procs.append(proc)
            _send(
                proc,
                {
                    "phase": phase,
                    "client": client,
                    "host": HOST,
                    "port": port,
                    "origin": ORIGIN,
                    "tokens": tokens,
                    "conns": conns,
                    "msg_bytes": args.msg_bytes,
                    "depth": depth,
                    "timeout": args.timeout,
                    "index": p,
                    "abusers": getattr(args, "abusers", 0),
                    "spread": getattr(args, "spread", False),
                    "max_seconds": setup_timeout + args.duration + args.warmup + 120,
                },
            )
    except BaseException:
        await close_loadgens(args, procs)
        raise
    return procs


async def collect_loadgens(
    args: argparse.Namespace, procs: list[asyncio.subprocess.Process], result: PhaseResult
) -> None:
    """Add every load generator's final report to *result*."""
    for proc in procs:
        out = await _readline(proc, 3 * args.timeout + 30)
        result.count += out["count"]
        result.loadgen_cpu_s += out["cpu_s"]
        result.wall_s = max(result.wall_s, out["wall_s"])
        for us, n in out["hist"].items():
            result.hist[int(us)] = result.hist.get(int(us), 0) + n
        for kind, n in out["errors"].items():
            result.errors[kind] = result.errors.get(kind, 0) + n


async def close_loadgens(args: argparse.Namespace, procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
        await stop_process(proc, grace=args.timeout + 5)


async def run_loadgen(
    args: argparse.Namespace,
    server: Server,
    tmp: Path,
    phase: str,
    conns: int,
    tokens: list[str],
    on_ready: Callable[[], Awaitable[None]] | None = None,
    depth: int = 1,
) -> PhaseResult:
    """Run one phase with ``args.loadgen_procs`` processes sharing one window."""
    nprocs = max(1, min(args.loadgen_procs, conns))
    targets = [
        (server.port, tokens[p::nprocs], conns // nprocs + (1 if p < conns % nprocs else 0))
        for p in range(nprocs)
    ]
    result = PhaseResult()
    procs = await open_loadgens(args, tmp, phase, targets, depth)
    try:
        for proc in procs:
            result.ready.append(await _readline(proc, 60 + conns / 50))
        if phase == "idle":
            if on_ready is not None:
                await on_ready()
            for proc in procs:
                _send(proc, {"cmd": "close"})
        else:
            t0 = time.monotonic() + args.warmup
            t1 = t0 + args.duration
            for proc in procs:
                _send(proc, {"cmd": "go", "t0": t0, "t1": t1})
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpus = {args.server_cpu, args.client_cpu}
            cpu0, busy0 = cpu_seconds_of(server.pid), busy_seconds(cpus)
            await asyncio.sleep(max(0.0, t1 - time.monotonic()))
            result.server_cpu_s = cpu_seconds_of(server.pid) - cpu0
            result.busy_s = busy_seconds(cpus) - busy0
        await collect_loadgens(args, procs, result)
    finally:
        await close_loadgens(args, procs)
    if result.errors:
        log(f"bench:   {server.name} {phase}: errors {result.errors}")
    return result


async def measured(
    args: argparse.Namespace,
    server: Server,
    tmp: Path,
    phase: str,
    conns: int,
    tokens: list[str],
    depth: int = 1,
) -> PhaseResult:
    """A timed phase, repeated (up to --retries) while other processes disturbed it."""
    attempt = 0
    while True:
        result = await run_loadgen(args, server, tmp, phase, conns, tokens, depth=depth)
        other = result.foreign_cpu_pct()
        if other <= args.max_other or attempt >= args.retries:
            return result
        attempt += 1
        log(
            f"bench:   {server.name} {phase}: other processes used {other:.0f}% of a core "
            f"on the benchmark CPUs; repeating ({attempt}/{args.retries})"
        )


# -- one server, one round ----------------------------------------------------------------------


async def settled_rss(pid: int, settle: float) -> int:
    """RSS after *settle* seconds, then until two readings 0.25 s apart agree (max 5 s)."""
    await asyncio.sleep(settle)
    previous = rss_bytes(pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        current = rss_bytes(pid)
        if current == previous:
            return current
        previous = current
    return previous


async def warm_up(args: argparse.Namespace, server: Server, tmp: Path, tokens: list[str]) -> None:
    """One connection alone, then 20: every server starts the measured phases alike.

    One alone first: CPython 3.11 shares one attribute-key table among a class's
    instances, and a first burst of half-built connections can make every later one carry
    its own 1.6 KB dict (websockets' plain server is exposed to this; wsguard keeps those
    attributes in slots).
    """
    await run_loadgen(args, server, tmp, "idle", 1, tokens)
    await run_loadgen(args, server, tmp, "idle", 20, tokens)


async def idle_memory(
    args: argparse.Namespace, server: Server, tmp: Path, tokens: list[str]
) -> dict[str, Any]:
    """RSS growth per idle connection: ``args.idle`` held open, RSS settled before/after."""
    before = await settled_rss(server.pid, args.settle)
    after = 0

    async def measure() -> None:
        nonlocal after
        after = await settled_rss(server.pid, args.settle)

    idle = await run_loadgen(args, server, tmp, "idle", args.idle, tokens, measure)
    opened = sum(r["opened"] for r in idle.ready)
    return {
        "idle_conns": opened,
        "idle_alive": idle.count,
        "rss_before": before,
        "rss_after": after,
        "idle_bytes_per_conn": (after - before) / opened if opened else float("nan"),
        "idle_loadgen_cpu_pct": idle.loadgen_cpu_pct(),
    }


async def bench_server(
    name: str,
    args: argparse.Namespace,
    tmp: Path,
    secret: str,
    tokens: list[str],
    n: int,
    round_no: int,
) -> dict[str, Any]:
    server = await start_server(name, args, tmp, secret, n)
    out: dict[str, Any] = {"server": name, "round": round_no, "pid": server.pid}
    phases = args.phases
    try:
        await warm_up(args, server, tmp, tokens)
        if "idle" in phases:
            out |= await idle_memory(args, server, tmp, tokens)

        if "latency" in phases and args.lat_conns:
            lat = await measured(args, server, tmp, "pingpong", args.lat_conns, tokens)
            out["lat_p50_ms"] = lat.percentile_ms(0.50)
            out["lat_p99_ms"] = lat.percentile_ms(0.99)
            out["lat_per_s"] = lat.rate()
            out["lat_loadgen_cpu_pct"] = lat.loadgen_cpu_pct()
            out["lat_server_cpu_pct"] = lat.server_cpu_pct()
            out["lat_errors"] = lat.errors
            out["lat_foreign_cpu_pct"] = lat.foreign_cpu_pct()

        if "pingpong" in phases:
            pp = await measured(args, server, tmp, "pingpong", args.conns, tokens, args.depth)
            out["msgs_per_s"] = pp.rate()
            out["p50_ms"] = pp.percentile_ms(0.50)
            out["p99_ms"] = pp.percentile_ms(0.99)
            out["pp_loadgen_cpu_pct"] = pp.loadgen_cpu_pct()
            out["pp_server_cpu_pct"] = pp.server_cpu_pct()
            out["pp_errors"] = pp.errors
            out["pp_foreign_cpu_pct"] = pp.foreign_cpu_pct()

        if "handshake" in phases:
            hs = await measured(args, server, tmp, "handshake", args.hs_workers, tokens)
            out["handshakes_per_s"] = hs.rate()
            out["hs_p50_ms"] = hs.percentile_ms(0.50)
            out["hs_loadgen_cpu_pct"] = hs.loadgen_cpu_pct()
            out["hs_server_cpu_pct"] = hs.server_cpu_pct()
            out["hs_errors"] = hs.errors
            out["hs_foreign_cpu_pct"] = hs.foreign_cpu_pct()
        out["server_rss_end"] = rss_bytes(server.pid)
    finally:
        await stop_process(server.proc)
    log(f"bench: round {out['round']} {name:>7}: " + progress(out))
    return out


def progress(out: dict[str, Any]) -> str:
    parts: list[str] = []
    if "msgs_per_s" in out:
        parts.append(
            f"{out['msgs_per_s']:.0f} msg/s (p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} "
            f"ms; loadgen CPU {out['pp_loadgen_cpu_pct']:.0f}%, server CPU "
            f"{out['pp_server_cpu_pct']:.0f}%, other {out['pp_foreign_cpu_pct']:.0f}%)"
        )
    if "lat_p50_ms" in out:
        parts.append(
            f"light load p50 {out['lat_p50_ms']:.3f} ms, p99 {out['lat_p99_ms']:.3f} ms "
            f"({out['lat_per_s']:.0f} msg/s)"
        )
    if "handshakes_per_s" in out:
        parts.append(
            f"{out['handshakes_per_s']:.0f} handshakes/s (loadgen CPU "
            f"{out['hs_loadgen_cpu_pct']:.0f}%, server CPU {out['hs_server_cpu_pct']:.0f}%, "
            f"other {out['hs_foreign_cpu_pct']:.0f}%)"
        )
    if "idle_bytes_per_conn" in out:
        parts.append(
            f"{out['idle_bytes_per_conn']:.0f} B/idle conn "
            f"({out['idle_alive']}/{out['idle_conns']} open)"
        )
    return " | ".join(parts)


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    target: str = ""
    check: Callable[[float, float], bool] | None = None


METRICS = (
    Metric(
        "msgs_per_s", "ping/pong messages/s", "{:,.0f}", "ratio >= 0.85", lambda w, p: w >= 0.85 * p
    ),
    Metric("p50_ms", "ping/pong p50 RTT, loaded (ms)", "{:.2f}"),
    Metric("p99_ms", "ping/pong p99 RTT, loaded (ms)", "{:.2f}"),
    Metric("lat_p50_ms", "p50 RTT, light load (ms)", "{:.3f}"),
    Metric("lat_p99_ms", "p99 RTT, light load (ms)", "{:.3f}"),
    Metric(
        "handshakes_per_s", "handshakes/s", "{:,.0f}", "ratio >= 0.80", lambda w, p: w >= 0.8 * p
    ),
    Metric("hs_p50_ms", "handshake p50 (ms)", "{:.2f}"),
    Metric(
        "idle_bytes_per_conn",
        "memory per idle conn (B)",
        "{:,.0f}",
        "diff <= +4096 B",
        lambda w, p: w - p <= 4096,
    ),
    Metric("pp_loadgen_cpu_pct", "loadgen CPU, ping/pong (%)", "{:.0f}"),
    Metric("hs_loadgen_cpu_pct", "loadgen CPU, handshakes (%)", "{:.0f}"),
    Metric("pp_server_cpu_pct", "server CPU, ping/pong (%)", "{:.0f}"),
    Metric("hs_server_cpu_pct", "server CPU, handshakes (%)", "{:.0f}"),
)


Table = dict[str, dict[str, dict[str, float]]]


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table: the first row is the header, underlined; columns aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def median_cell(stats: dict[str, float] | None, fmt: str) -> str:
    """``median [min-max]`` of a :func:`median_table` entry ("" when missing)."""
    if stats is None:
        return ""
    return f"{fmt.format(stats['median'])} [{fmt.format(stats['min'])}-{fmt.format(stats['max'])}]"


def median_table(
    results: list[dict[str, Any]], keys: Iterable[str], servers: Iterable[str]
) -> Table:
    """Per metric key and server, the median, min and max over the rounds that have it."""
    table: Table = {}
    servers = list(servers)
    for key in keys:
        for name in servers:
            values = [r[key] for r in results if r["server"] == name and key in r]
            if values:
                table.setdefault(key, {})[name] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
    return table


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for metric in METRICS:
        if any(metric.key not in r for r in results):
            continue
        row: dict[str, Any] = {}
        for name in SERVERS:
            values = [r[metric.key] for r in results if r["server"] == name]
            row[name] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "values": values,
            }
        plain, guarded = row["plain"]["median"], row["wsguard"]["median"]
        row["ratio"] = guarded / plain if plain else float("nan")
        row["diff"] = guarded - plain
        if metric.check is not None:
            row["target"] = metric.target
            row["pass"] = metric.check(guarded, plain)
        summary[metric.key] = row
    return summary


def print_table(summary: dict[str, Any]) -> None:
    def cell(metric: Metric, stats: dict[str, float]) -> str:
        f = metric.fmt
        return f"{f.format(stats['median'])} [{f.format(stats['min'])}-{f.format(stats['max'])}]"

    header = ("metric", "plain median [min-max]", "wsguard median [min-max]", "ws/plain", "target")
    rows = [header]
    for metric in METRICS:
        if metric.key not in summary:
            continue
        row = summary[metric.key]
        ratio = f"{row['ratio']:.3f}"
        if metric.key == "idle_bytes_per_conn":
            ratio += f" ({row['diff']:+,.0f} B)"
        target = ""
        if "target" in row:
            target = f"{row['target']}: {'PASS' if row['pass'] else 'FAIL'}"
        rows.append(
            (metric.label, cell(metric, row["plain"]), cell(metric, row["wsguard"]), ratio, target)
        )
    print_rows(rows)


# -- main ---------------------------------------------------------------------------------------


def mint_tokens(secret: str, count: int) -> list[str]:
    now = int(time.time())
    return [
        jwt.encode(
            {
                "sub": f"bench-{i}",
                "scope": "bench",
                "iat": now,
                "exp": now + 4 * 3600,
                "jti": secrets.token_urlsafe(12),
            },
            secret,
            algorithm="HS256",
        )
        for i in range(count)
    ]


def find_wsguard() -> str | None:
    """The ``wsguard`` command beside this Python (its virtual environment), else on PATH."""
    return shutil.which("wsguard", path=str(Path(sys.executable).parent)) or shutil.which("wsguard")


def comma_list(text: str) -> list[str]:
    """An option's comma-separated values, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark wsguard serve against a plain websockets server."
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s phases, 500 idle")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per measured phase (default 5)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--conns", type=int, default=50, help="ping/pong connections (50)")
    parser.add_argument("--hs-workers", type=int, default=32, help="handshake workers (32)")
    parser.add_argument("--idle", type=int, help="idle connections (default 2000; quick 500)")
    parser.add_argument("--msg-bytes", type=int, default=100, help="ping payload bytes (100)")
    parser.add_argument(
        "--depth",
        type=int,
        default=8,
        help="pings in flight per ping/pong connection (8; 1 = strict request/response)",
    )
    parser.add_argument(
        "--lat-conns",
        type=int,
        default=1,
        help="connections of the light-load latency phase, one ping in flight each (1; 0 = skip)",
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
    parser.add_argument("--retries", type=int, default=3, help="repeats per phase (3)")
    parser.add_argument(
        "--client",
        choices=["raw", "picows", "websockets", "c"],
        default="raw",
        help="load generator client: raw (Python RFC 6455), picows (C framing), websockets, "
        "or c (benchmarks/cloadgen.py, a C program, for the ping/pong, one-way and "
        "handshake phases; the Python raw client for the others)",
    )
    parser.add_argument(
        "--plain-json",
        choices=["json", "orjson"],
        default="orjson",
        help="JSON library of the plain server (orjson, as fast as wsguard's own parsing "
        "and serialization; json = the standard library, a slower baseline)",
    )
    parser.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--wsguard-command",
        type=shlex.split,
        help="command that runs the wsguard CLI (default: the venv's wsguard), "
        "e.g. '.venv/bin/python -m cProfile -o /tmp/ws.prof -m wsguard.cli.main'",
    )
    parser.add_argument(
        "--phases",
        type=comma_list,
        default=list(PHASES),
        help="comma-separated subset of " + ",".join(PHASES),
    )
    parser.add_argument("--only", choices=SERVERS, help="benchmark one server (no ratios)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (2.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.idle = args.idle or (500 if quick else 2000)
    if args.wsguard_command is None:
        exe = find_wsguard()
        if exe is None:
            parser.error("cannot find the wsguard command; use --wsguard-command")
        args.wsguard_command = [exe]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose from {','.join(PHASES)}")
    if args.rounds < 1 or args.duration <= 0 or args.conns < 1 or args.idle < 1:
        parser.error("--rounds, --duration, --conns and --idle must be positive")
    cpus = os.sched_getaffinity(0)
    if {args.server_cpu, args.client_cpu} - cpus or args.server_cpu == args.client_cpu:
        parser.error(f"--server-cpu and --client-cpu must be two different CPUs of {sorted(cpus)}")
    return args


def driver_parser(description: str) -> argparse.ArgumentParser:
    """The options every multi-server driver has (``--quick``, ``--rounds``, ``--json``,
    ``--workdir``); each adds its own, then calls :func:`driver_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s phases, 500 idle")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs (servers, load generators) here, not in a temp dir"
    )
    return parser


def driver_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(the shared options of bench.py with the driver's rounds, JSON file and working
    directory; the driver's own options; what bench.py parsed)."""
    known, rest = parser.parse_known_args(argv)
    # the shared options (durations, connections, CPUs, ...) are bench.py's
    args = parse_args([*rest, *(["--quick"] if known.quick else [])])
    args.rounds = known.rounds or (1 if known.quick else 3)
    args.json, args.workdir = known.json, known.workdir
    return args, known, rest


def prepare_driver(args: argparse.Namespace) -> None:
    """The driver process of a multi-server benchmark: enough descriptors for its idle
    connections, on the load generator's CPU, ended cleanly by SIGTERM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.idle + 4096))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    os.sched_setaffinity(0, {args.client_cpu})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


BenchServer = Callable[
    [str, argparse.Namespace, Path, str, list[str], int, int], Awaitable[dict[str, Any]]
]


async def interleaved_rounds(
    args: argparse.Namespace, servers: Iterable[str], bench_one: BenchServer
) -> list[dict[str, Any]]:
    """``args.rounds`` rounds of every server in turn (``bench_one(name, args, tmp,
    secret, tokens, n, round)``), in ``args.workdir`` or a temporary directory."""
    secret = secrets.token_urlsafe(48)
    tokens = mint_tokens(secret, max(args.conns, args.idle, args.hs_workers, 64) + 8)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            tmpdir = str(args.workdir)
        else:
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="wsguard-bench-"))
        n = 0
        for rnd in range(1, args.rounds + 1):
            for name in servers:
                results.append(await bench_one(name, args, Path(tmpdir), secret, tokens, n, rnd))
                n += 1
    return results


def write_results(
    args: argparse.Namespace, results: list[dict[str, Any]], report: dict[str, Any]
) -> None:
    """The raw results and the report as JSON, to ``args.json`` when it is set."""
    if args.json is not None:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.json.write_text(json.dumps({**payload, **report}, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")


def count_audit_lines(tmp: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in tmp.glob("audit-*.jsonl"))


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(48)
    tokens = mint_tokens(secret, max(args.conns, args.idle, args.hs_workers, 64))
    servers = (args.only,) if args.only else SERVERS
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsguard-bench-") as tmpdir:
        tmp = Path(tmpdir)
        n = 0
        for round_no in range(1, args.rounds + 1):
            for name in servers:
                results.append(await bench_server(name, args, tmp, secret, tokens, n, round_no))
                n += 1
        audit_lines = count_audit_lines(tmp)
    return {"results": results, "audit_lines": audit_lines}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.idle + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * args.idle + 256:
        log(f"bench: warning: open-file limit {want} may be too low for --idle {args.idle}")
    os.sched_setaffinity(0, {args.client_cpu})  # this process; servers are pinned in the child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(
        f"bench: {args.rounds} round(s), {args.duration:g} s phases (+{args.warmup:g} s warm-up), "
        f"{args.conns} ping/pong connections, {args.hs_workers} handshake workers, "
        f"{args.idle} idle connections, {args.msg_bytes}-byte pings x{args.depth} in flight, "
        f"{args.lat_conns} light-load connection(s), client={args.client} "
        f"x{args.loadgen_procs}, servers on CPU {args.server_cpu}, load on CPU {args.client_cpu}"
    )
    try:
        run = asyncio.run(amain(args))
    finally:
        kill_children()
    results = run["results"]
    print()
    print(
        f"wsguard vs plain websockets: {args.rounds} round(s), {args.duration:g} s per phase, "
        f"{args.conns} ping/pong conns ({args.msg_bytes} B, {args.depth} in flight), "
        f"{args.lat_conns} light-load conn(s), {args.hs_workers} handshake "
        f"workers, {args.idle} idle conns, client={args.client} x{args.loadgen_procs}, "
        f"plain server JSON: {args.plain_json}"
    )
    summary: dict[str, Any] = {}
    if not args.only:
        summary = summarize(results)
        print_table(summary)
    errors: dict[str, dict[str, int]] = {}
    for r in results:
        merged = {**r.get("lat_errors", {}), **r.get("pp_errors", {}), **r.get("hs_errors", {})}
        if r.get("idle_alive") != r.get("idle_conns"):
            merged["idle connections lost"] = r["idle_conns"] - r["idle_alive"]
        if merged:
            errors[f"{r['server']} round {r['round']}"] = merged
    if errors:
        print(f"errors: {errors}")
    foreign = [
        v for r in results for k, v in r.items() if k.endswith("_foreign_cpu_pct") and v == v
    ]
    if foreign:
        worst = max(foreign)
        print(
            f"other processes on CPUs {args.server_cpu},{args.client_cpu} during the measured "
            f"windows: max {worst:.0f}% of a core"
            + ("  WARNING: the machine was not quiet; rerun" if worst > 10 else "")
        )
    print(f"wsguard audit log lines written: {run['audit_lines']}")
    if args.json is not None:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "cpu": os.cpu_count(),
            "results": results,
            "summary": summary,
            "audit_lines": run["audit_lines"],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
