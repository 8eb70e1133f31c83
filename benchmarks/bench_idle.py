"""Many idle authenticated connections on one node: memory, CPU at rest, latency among them.

Run from the repository root:

    .venv/bin/python benchmarks/bench_idle.py                    # 2,000 and 100,000
    .venv/bin/python benchmarks/bench_idle.py --quick            # 1,000 and 10,000, 5 s pings
    .venv/bin/python benchmarks/bench_idle.py --counts 2000,50000 --json /tmp/idle.json

Servers, one after the other, each pinned to CPU 0:

* ``wsguard``: ``wsguard serve --config benchmarks/bench.toml`` on its default engine (picows),
  the full policy (HS256 JWT, Origin allowlist, strict schemas, rate limits, audit log to a
  file, server pings every ``--ping-interval`` seconds: bench.toml's 20 by default) with the
  limits raised above the load;
* ``picows``: ``benchmarks/plain_picows.py``, a plain picows server (no authentication, no
  pings): the floor of what a connection costs.

Clients, pinned to CPU 1: ``--clients`` processes of this script (``--hold``) each holding a
share of the connections, with a minimal asyncio Protocol (upgrade with an HS256 Bearer
token, an Origin and the ``wsguard.v1`` subprotocol; read the welcome; answer pings with
pongs; otherwise idle). Connection ``i`` comes from loopback address ``i mod --sources``
(127.0.10.1 and up), so no address needs more than a few hundred ephemeral ports.

For each server the connections are opened in steps, up to every count of ``--counts`` (and
``--latency-base``, 1,000); at each step, after a settle:

* server RSS growth per connection (RSS settled, minus RSS before any idle connection, over
  the connections held) and the server's open file descriptors;
* server CPU at rest (/proc/<pid>/stat utime+stime) over a window one ping interval plus
  one second long (so every connection is pinged in it), as % of one core;
* latency among them: a separate probe process (``--probe``) with one connection and one
  ping message in flight, ``--round-trips`` round trips paced over several seconds (so
  they meet the heartbeat ticks): p50/p99.

Printed: the kernel and process limits that matter (open files, fs.file-max, fs.nr_open,
ephemeral ports, somaxconn, SYN backlog), a table per server and step, listen-queue
overflows seen while opening (/proc/net/netstat), and the targets: wsguard's bytes per
connection at the largest count within 10 % of the 2,000 figure, CPU at rest under 5 % of
a core, probe p99 under 2x the p99 among ``--latency-base`` connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import math
import os
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench

HERE, HOST, CONFIG, ORIGIN = bench.HERE, bench.HOST, bench.CONFIG, bench.ORIGIN
PICOWS = HERE / "plain_picows.py"
SERVERS = ("picows", "wsguard")
SUBPROTOCOL = "wsguard.v1"
SCRIPT = str(Path(__file__).resolve())
SECRET_ENV = "BENCH_IDLE_SECRET"  # the holders mint their own tokens: never on a command line
PER_HOLDER = 25_000  # connections per client process at most by default
FD_MARGIN = 256  # descriptors a process needs besides its connections
SYSCTLS = (
    "fs.file-max",
    "fs.nr_open",
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
)

log = bench.log


# -- the client processes (--hold, --probe) --------------------------------------------------


def source_address(i: int, sources: int) -> str:
    """Loopback address of connection *i*: 127.0.10.1, 127.0.10.2, ... (250 per /24)."""
    k = i % sources
    return f"127.0.{10 + k // 250}.{k % 250 + 1}"


def upgrade_request(port: int, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\nOrigin: {ORIGIN}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payloads under 126 bytes: pongs, pings, a close)."""
    mask = os.urandom(4)
    masked = int.from_bytes(payload, "big") ^ int.from_bytes((mask * 32)[: len(payload)], "big")
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked.to_bytes(len(payload), "big")


class Holder:
    """What one client process counts, across its connections."""

    def __init__(self) -> None:
        self.pongs = 0
        self.closed: collections.Counter[str] = collections.Counter()
        self.conns: list[Idle] = []


class Idle(asyncio.Protocol):
    """One idle connection: upgrade, welcome, pongs to pings, nothing else. No future or
    task once open (a probe connection sets ``on_text``)."""

    __slots__ = ("buf", "holder", "on_text", "open", "ready", "request", "transport")

    def __init__(self, holder: Holder, request: bytes, ready: asyncio.Future[None]) -> None:
        self.holder = holder
        self.request = request
        self.ready: asyncio.Future[None] | None = ready
        self.buf = b""
        self.open = False
        self.transport: asyncio.Transport | None = None
        self.on_text: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]
        self.request = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.open = False
            self.holder.closed["lost"] += 1
        self._settle(ConnectionError("lost before the welcome"))

    def _settle(self, error: Exception | None) -> None:
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.ready is not None and not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._settle(ConnectionError(buf[: buf.find(b"\r\n")].decode("latin-1")))
                self.abort()
                return
            self.open = True
            buf = buf[end + 4 :]
        while len(buf) >= 2:
            length, pos = buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + length:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[pos : pos + length], buf[pos + length :]
            if opcode == 0x9:
                self.holder.pongs += 1
                self.send(0xA, payload)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.holder.closed[str(code)] += 1
                self.open = False
                self.send(0x8, payload[:2])
                self.abort()
            elif opcode in (0x1, 0x2):
                if self.ready is not None:
                    self._settle(None)  # the welcome
                elif self.on_text is not None:
                    self.on_text(payload)
        self.buf = buf

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def mint(secret: str, i: int) -> str:
    import jwt  # only the client processes mint

    now = int(time.time())
    claims = {"sub": f"idle-{i}", "scope": "bench", "iat": now, "exp": now + 4 * 3600}
    claims["jti"] = secrets.token_urlsafe(12)
    return jwt.encode(claims, secret, algorithm="HS256")


async def open_one(
    holder: Holder, port: int, secret: str, i: int, source: str | None, wait_s: float
) -> Idle:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    proto = Idle(holder, upgrade_request(port, mint(secret, i)), ready)
    local = (source, 0) if source is not None else None
    try:
        async with asyncio.timeout(wait_s):
            await loop.create_connection(lambda: proto, HOST, port, local_addr=local)
            await ready
    except BaseException:
        proto.abort()
        raise
    return proto


async def open_range(holder: Holder, cfg: dict[str, Any], start: int, count: int) -> dict[str, Any]:
    """Open connections start..start+count-1, ``concurrency`` handshakes at a time."""
    errors: collections.Counter[str] = collections.Counter()
    indices = iter(range(start, start + count))
    t0, cpu0 = time.monotonic(), time.process_time()

    async def worker() -> None:
        for i in indices:
            source = source_address(i, cfg["sources"])
            try:
                conn = await open_one(holder, cfg["port"], cfg["secret"], i, source, cfg["timeout"])
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:100]] += 1
                if sum(errors.values()) > max(100, count // 10):
                    return  # bounded: a broken server does not cost count x timeout
                continue
            holder.conns.append(conn)

    await asyncio.gather(*(worker() for _ in range(min(cfg["concurrency"], count))))
    return {
        "opened": count - sum(errors.values()),
        "errors": dict(errors),
        "seconds": time.monotonic() - t0,
        "cpu_s": time.process_time() - cpu0,
    }


async def hold(cfg: dict[str, Any]) -> None:
    """A client process: JSON commands on stdin, one JSON answer per command on stdout."""
    holder = Holder()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    answer(event="started")
    while line := await reader.readline():
        command = json.loads(line)
        what = command["cmd"]
        if what == "open":
            answer(
                event="opened", **await open_range(holder, cfg, command["start"], command["count"])
            )
        elif what == "warm":  # one alone, then 20, then closed: see bench.warm_up
            warm = Holder()
            for n in (1, 20):
                done = await asyncio.gather(
                    *(
                        open_one(warm, cfg["port"], cfg["secret"], -1 - k, None, cfg["timeout"])
                        for k in range(n)
                    ),
                    return_exceptions=True,
                )
                for conn in done:
                    if isinstance(conn, Idle):
                        conn.send(0x8, (1000).to_bytes(2, "big"))
                await asyncio.sleep(0.2)
                for conn in done:
                    if isinstance(conn, Idle):
                        conn.abort()
            answer(event="warm")
        elif what == "stats":
            alive = sum(1 for c in holder.conns if c.open)
            answer(event="stats", alive=alive, pongs=holder.pongs, closed=dict(holder.closed))
        else:
            break
    for conn in holder.conns:
        conn.abort()
    answer(event="bye")


async def probe(cfg: dict[str, Any]) -> None:
    """One connection, one ping message in flight, ``round_trips`` round trips paced at
    ``rate`` per second (after 100 unmeasured); prints the latencies' summary."""
    holder = Holder()
    conn = await open_one(holder, cfg["port"], cfg["secret"], 10**9, None, cfg["timeout"])
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = []

    def on_text(payload: bytes) -> None:
        if waiting and not waiting[0].done():
            waiting[0].set_result(None)

    conn.on_text = on_text
    samples: list[float] = []
    errors = 0
    gap = 1.0 / cfg["rate"]
    deadline = time.monotonic() + cfg["round_trips"] * (gap + 0.05) + 30
    for seq in range(100 + cfg["round_trips"]):
        if time.monotonic() > deadline:
            break
        done: asyncio.Future[None] = loop.create_future()
        waiting[:] = [done]
        message = json.dumps({"type": "ping", "id": f"probe-{seq}"}).encode()
        started = time.perf_counter()
        conn.send(0x1, message)
        try:
            await asyncio.wait_for(done, cfg["timeout"])
        except TimeoutError:
            errors += 1
            continue
        elapsed = time.perf_counter() - started
        if seq >= 100:
            samples.append(elapsed)
        await asyncio.sleep(max(0.0, gap - elapsed))
    conn.send(0x8, (1000).to_bytes(2, "big"))
    conn.abort()
    samples.sort()

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))] * 1000 if samples else math.nan

    result = {"n": len(samples), "errors": errors, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}
    result["mean_ms"] = statistics.fmean(samples) * 1000 if samples else math.nan
    sys.stdout.write(json.dumps(result) + "\n")


# -- the benchmark process --------------------------------------------------------------------


def kernel_facts() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    facts: dict[str, Any] = {"ulimit -n soft": soft, "ulimit -n hard": hard}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name.replace(".", "/")
        try:
            facts[name] = " ".join(path.read_text().split())
        except OSError:
            facts[name] = "?"
    return facts


def listen_counters() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (system-wide, loopback included)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {"ListenOverflows": 0, "ListenDrops": 0}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process' open-file limit (inherited by every child) to *needed*: the
    soft limit up to the hard one, the hard one too where allowed (root, CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, needed
    target = needed if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Client:
    """One --hold process and its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: dict[str, Any], wait_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read(wait_s)

    async def read(self, wait_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait_s)
        if not line:
            raise RuntimeError(f"client process {self.proc.pid} ended")
        answer: dict[str, Any] = json.loads(line)
        return answer


def client_config(args: argparse.Namespace, port: int, secret: str) -> str:
    cfg = {
        "port": port,
        "sources": args.sources,
        "timeout": args.timeout,
        "concurrency": args.concurrency,
        "rate": args.probe_rate,
        "round_trips": args.round_trips,
    }
    return json.dumps(cfg)


def client_command(
    args: argparse.Namespace, port: int, secret: str, mode: str
) -> tuple[list[str], Any, dict[str, str]]:
    """A client process (*mode*: ``--hold`` or ``--probe``) on the load generator's CPU:
    its command, the function that pins it, its environment (the secret, never on the
    command line)."""
    cmd, pin = bench.pinned(
        [sys.executable, SCRIPT, mode, client_config(args, port, secret)], args.client_cpu
    )
    return cmd, pin, {**os.environ, SECRET_ENV: secret}


async def start_clients(
    args: argparse.Namespace, port: int, secret: str, count: int
) -> list[Client]:
    cmd, pin, env = client_command(args, port, secret, "--hold")
    clients = []
    for _ in range(count):
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=pin,
            limit=1 << 20,
        )
        bench.CHILDREN[proc.pid] = "client"
        client = Client(proc)
        clients.append(client)
        await client.read(30)  # started
    return clients


async def stop_clients(clients: list[Client]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.ask({"cmd": "exit"}, 30)
    for client in clients:
        await bench.stop_process(client.proc, grace=10)


async def run_probe(args: argparse.Namespace, port: int, secret: str) -> dict[str, Any]:
    cmd, pin, env = client_command(args, port, secret, "--probe")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, env=env, preexec_fn=pin
    )
    bench.CHILDREN[proc.pid] = "probe"
    assert proc.stdout is not None
    limit = args.round_trips / args.probe_rate + 60
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), limit)
    finally:
        await bench.stop_process(proc, grace=5)
    result: dict[str, Any] = json.loads(line) if line else {"errors": "no result"}
    return result


async def start_server(name: str, args: argparse.Namespace, tmp: Path, secret: str) -> bench.Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    if name == "picows":
        cmd = [sys.executable, str(PICOWS), "--host", HOST, "--port", "0"]
    else:
        cmd = [*args.wsguard_command, "serve", "--config", str(CONFIG), "--port", "0"]
        env["WSGUARD_JWT_SECRET"] = secret
        env["WSGUARD_AUDIT__FILE"] = str(tmp / "audit.jsonl")
        env["WSGUARD_LIVENESS__PING_INTERVAL_SECONDS"] = str(args.ping_interval)
        env["WSGUARD_LIVENESS__PING_TIMEOUT_SECONDS"] = str(args.ping_interval)
    cmd, pin = bench.pinned(cmd, args.server_cpu)
    return await bench.start_listener(name, cmd, tmp / f"{name}.stderr", env=env, preexec=pin)


async def bench_server(
    name: str, args: argparse.Namespace, tmp: Path, secret: str
) -> list[dict[str, Any]]:
    steps = sorted({*args.counts, args.latency_base})
    server = await start_server(name, args, tmp, secret)
    per_client = min(PER_HOLDER, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_MARGIN)
    clients_n = args.clients or max(1, math.ceil(max(steps) / per_client))
    clients: list[Client] = []
    rows: list[dict[str, Any]] = []
    try:
        clients = await start_clients(args, server.port, secret, clients_n)
        await clients[0].ask({"cmd": "warm"}, 60)
        base_rss = await bench.settled_rss(server.pid, args.settle)
        held = 0
        for step in steps:
            row: dict[str, Any] = {"server": name, "conns": step}
            listen0 = listen_counters()
            t0 = time.monotonic()
            share, extra = divmod(step - held, len(clients))
            starts, start = [], held
            for k in range(len(clients)):
                count = share + (1 if k < extra else 0)
                starts.append((start, count))
                start += count
            wait_s = args.timeout * 3 + (step - held) / 200
            opened = await asyncio.gather(
                *(
                    c.ask({"cmd": "open", "start": s, "count": n}, wait_s)
                    for c, (s, n) in zip(clients, starts, strict=True)
                )
            )
            row["open_s"] = time.monotonic() - t0
            held = step
            errors: collections.Counter[str] = collections.Counter()
            for answer in opened:
                errors.update(answer["errors"])
            row["open_errors"] = dict(errors)
            row["handshakes_per_s"] = sum(a["opened"] for a in opened) / row["open_s"]
            listen1 = listen_counters()
            row["listen_overflows"] = listen1["ListenOverflows"] - listen0["ListenOverflows"]
            rss = await bench.settled_rss(server.pid, args.settle)
            row["rss_mib"] = rss / 2**20
            row["bytes_per_conn"] = (rss - base_rss) / step
            row["fds"] = fd_count(server.pid)
            if step in args.counts:
                # a full ping interval (plain picows sends none: a few seconds tell)
                window = args.ping_interval + 1.0 if name == "wsguard" else 5.0
                ours = [server.pid, *(c.proc.pid for c in clients)]
                cpus = {args.server_cpu, args.client_cpu}
                cpu0, w0 = bench.cpu_seconds_of(server.pid), time.monotonic()
                all0, busy0 = sum(map(bench.cpu_seconds_of, ours)), bench.busy_seconds(cpus)
                await asyncio.sleep(window)
                cpu1, w1 = bench.cpu_seconds_of(server.pid), time.monotonic()
                all1, busy1 = sum(map(bench.cpu_seconds_of, ours)), bench.busy_seconds(cpus)
                row["rest_cpu_pct"] = 100 * (cpu1 - cpu0) / (w1 - w0)
                row["rest_window_s"] = w1 - w0
                # what other processes used on the two CPUs meanwhile (noise on this host)
                row["other_cpu_pct"] = 100 * ((busy1 - busy0) - (all1 - all0)) / (w1 - w0)
            latency = await run_probe(args, server.port, secret)
            row |= {f"probe_{k}": v for k, v in latency.items()}
            stats = await asyncio.gather(*(c.ask({"cmd": "stats"}, 30) for c in clients))
            row["alive"] = sum(s["alive"] for s in stats)
            row["pongs"] = sum(s["pongs"] for s in stats)
            closed: collections.Counter[str] = collections.Counter()
            for s in stats:
                closed.update(s["closed"])
            row["closed"] = dict(closed)
            log(f"bench_idle: {name} {step}: " + json.dumps(row, default=str))
            rows.append(row)
            if row["alive"] < step * 0.99:
                log(f"bench_idle: {name}: only {row['alive']} of {step} open; stopping here")
                break
    finally:
        await stop_clients(clients)
        await bench.stop_process(server.proc, grace=30)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, bool]]:
    head = ("server", "conns", "alive", "open s", "hs/s", "RSS MiB", "KiB/conn", "fds",
            "CPU% rest", "others%", "p50 ms", "p99 ms", "overflows")  # fmt: skip
    table = [head]
    for r in rows:
        rest = r.get("rest_cpu_pct")
        table.append(
            (
                r["server"],
                f"{r['conns']:,}",
                f"{r['alive']:,}",
                f"{r['open_s']:.1f}",
                f"{r['handshakes_per_s']:,.0f}",
                f"{r['rss_mib']:.0f}",
                f"{r['bytes_per_conn'] / 1024:.2f}",
                f"{r['fds']:,}",
                "-" if rest is None else f"{rest:.2f}",
                "-" if rest is None else f"{r['other_cpu_pct']:.0f}",
                f"{r.get('probe_p50_ms', math.nan):.3f}",
                f"{r.get('probe_p99_ms', math.nan):.3f}",
                str(r["listen_overflows"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    errors = {f"{r['server']} {r['conns']}": r["open_errors"] for r in rows if r["open_errors"]}
    closed = {f"{r['server']} {r['conns']}": r["closed"] for r in rows if r["closed"]}
    if errors:
        print(f"open errors: {errors}")
    if closed:
        print(f"closed by the server (code: count): {closed}")
    guarded = {r["conns"]: r for r in rows if r["server"] == "wsguard"}
    top = max(args.counts)
    checks: list[tuple[str, bool]] = []
    small = guarded.get(min(args.counts))
    big = guarded.get(top)
    base = guarded.get(args.latency_base)
    if small and big and top != min(args.counts):
        ratio = big["bytes_per_conn"] / small["bytes_per_conn"]
        checks.append((f"RSS/conn at {top:,} = {ratio:.2f}x the {min(args.counts):,} figure "
                       f"(target <= 1.10)", ratio <= 1.10))  # fmt: skip
    if big and "rest_cpu_pct" in big:
        cpu = big["rest_cpu_pct"]
        checks.append((f"CPU at rest with {top:,}: {cpu:.2f}% of a core (target < 5%)", cpu < 5))
    if base and big and top != args.latency_base:
        ratio = big["probe_p99_ms"] / base["probe_p99_ms"]
        checks.append((f"probe p99 with {top:,} = {ratio:.2f}x with {args.latency_base:,} "
                       f"(target < 2)", ratio < 2))  # fmt: skip
    if big:
        checks.append((f"all {top:,} connections open and authenticated", big["alive"] == top))
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'MISSED'}] wsguard: {text}")
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Many idle authenticated connections: RSS per connection, CPU at rest, "
        "latency among them (wsguard serve against plain picows)."
    )
    parser.add_argument("--hold", help=argparse.SUPPRESS)  # a client process
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the latency probe
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000; 5 s pings")
    parser.add_argument(
        "--counts", type=bench.comma_list, help="idle connection counts (2000,100000)"
    )
    parser.add_argument(
        "--latency-base",
        type=int,
        default=1000,
        help="connections of the reference probe p99 (1000)",
    )
    parser.add_argument(
        "--ping-interval",
        type=float,
        help="wsguard's ping interval and timeout, seconds (20, bench.toml's; quick 5)",
    )
    parser.add_argument("--round-trips", type=int, help="probe round trips (3000; quick 1000)")
    parser.add_argument("--probe-rate", type=float, default=500, help="probe round trips/s (500)")
    parser.add_argument("--clients", type=int, help="client processes (one per 25,000)")
    parser.add_argument("--sources", type=int, default=1000, help="loopback source addresses")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight/client")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before RSS reads")
    parser.add_argument("--timeout", type=float, default=15.0, help="per-operation timeout")
    parser.add_argument(
        "--servers", type=bench.comma_list, default=list(SERVERS), help="picows,wsguard"
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    if args.hold is not None or args.probe is not None:
        return args
    quick = args.quick
    args.counts = [int(c) for c in args.counts] if args.counts else (
        [1000, 10000] if quick else [2000, 100000]
    )  # fmt: skip
    args.ping_interval = args.ping_interval or (5.0 if quick else 20.0)
    args.round_trips = args.round_trips or (1000 if quick else 3000)
    if min(args.counts) < 1 or args.latency_base < 1 or args.round_trips < 1:
        parser.error("--counts, --latency-base and --round-trips must be positive")
    if not 1 <= args.sources <= 250 * 240:
        parser.error("--sources: 1 to 60000 loopback addresses")
    if not args.servers or set(args.servers) - set(SERVERS):
        parser.error(f"--servers: choose from {','.join(SERVERS)}")
    cpus = os.sched_getaffinity(0)
    if {args.server_cpu, args.client_cpu} - cpus or args.server_cpu == args.client_cpu:
        parser.error(f"--server-cpu and --client-cpu must be two different CPUs of {sorted(cpus)}")
    args.wsguard_command = [bench.find_wsguard() or "wsguard"]
    return args


def client_main(raw: str, what: str) -> int:
    cfg = json.loads(raw)
    cfg["secret"] = os.environ[SECRET_ENV]
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the benchmarks
        runner = asyncio.run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runner(hold(cfg) if what == "hold" else probe(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hold is not None:
        return client_main(args.hold, "hold")
    if args.probe is not None:
        return client_main(args.probe, "probe")
    needed = max(args.counts) + FD_MARGIN  # the server's; each client process holds a share
    soft, _ = raise_nofile(needed)
    facts = kernel_facts()
    print("limits: " + ", ".join(f"{k} = {v}" for k, v in facts.items()))
    if soft < needed:
        print(f"bench_idle: the open-file limit ({soft}) is below the {needed} the server "
              f"needs, and this process may not raise it (no CAP_SYS_RESOURCE); raise the hard "
              f"limit (ulimit -Hn, LimitNOFILE) or use --counts up to {soft - FD_MARGIN}")  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    secret = secrets.token_urlsafe(48)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="wsguard-idle-") as tmpdir:
            for name in args.servers:
                rows += asyncio.run(bench_server(name, args, Path(tmpdir), secret))
    finally:
        bench.kill_children()
    elapsed = time.monotonic() - started
    print()
    print(
        f"idle connections: counts {','.join(map(str, args.counts))}, wsguard pings every "
        f"{args.ping_interval:g} s, {args.sources} source addresses, probe {args.round_trips} "
        f"round trips at {args.probe_rate:g}/s; {elapsed:.0f} s in all"
    )
    checks = report(rows, args)
    if args.json is not None:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "hold", "probe")},
            "limits": facts,
            "rows": rows,
            "checks": checks,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
