"""Cluster mode on Redis against the embedded memory store, same load, same run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_cluster.py                  # every set-up, 2 rounds
    .venv/bin/python benchmarks/bench_cluster.py --quick          # 1 short round
    .venv/bin/python benchmarks/bench_cluster.py --setups 2,6,7   # some set-ups

Every round runs these set-ups, each started fresh, all with ``benchmarks/bench.toml`` (the
full default policy, limits raised above the load) and only ``store`` changed:

1. ``memory x1``: one node with ``store = "memory://"`` on CPU 0 (the baseline);
2. ``redis x1``: one node on one ``redis-server`` (``redis://``), node on CPU 0;
3. ``redis x2, 1 CPU``: two nodes sharing CPU 0, the load split evenly between them: the
   same CPU budget as one node, so it shows what running a cluster costs;
4. ``redis x2, 2 CPUs``: node A on CPU 0 and node B on CPU 1, which the load generator and
   Redis also use. This machine has two CPUs, so this is the closest it gets to "two
   machines"; the per-CPU-second figures are the ones that carry over;
5. ``sentinel x1``: one node on a primary with one replica and 3 Sentinels
   (``redis+sentinel://``);
6. ``cluster 1 shard x1``: one node on a Redis Cluster of 1 primary and 1 replica
   (``redis+cluster://``): the cluster client and its command pattern, one shard;
7. ``cluster 3 shards x1``: the same on 3 primaries and 3 replicas;
8. ``cluster 3 shards x2, 2 CPUs``: two nodes (as in 4) on the 3-shard cluster.

The Redis topologies are the benchmark's own (no persistence, loopback, free ports; the
clusters and the Sentinel group from ``tests/redis_topologies.py``), every redis-server
pinned to ``--redis-cpu`` (1, beside the load generator). Load: the ``benchmarks/loadgen.py``
phases of bench.py (ping/pong with ~100-byte JSON pings several in flight, handshakes with
HS256 tokens and an Origin), one load generator process per node sharing one measurement
window. Clients connect from 250 loopback addresses (127.0.2.x for ping/pong, 127.0.3.x for
handshakes; ``--one-address`` for 127.0.0.1 only): a cluster serves many clients, and the
per-address keys (handshake rate, bans, the address's connection slots) then spread over
the hash slots like the per-subject ones.

Redis cost is read from Redis itself (``INFO commandstats`` of every primary at both ends of
the window): the commands wsguard sent, each Lua script counted once (``EVALSHA``) and the
commands scripts run inside excluded, divided by the messages or handshakes completed in
the window. A handshake's figure includes the release of its leases when it closes. Per
primary, the benchmark reports its share of the commands and of the Redis CPU, and from the
busiest primary's CPU per handshake the Redis ceiling: the handshakes/s at which that
primary would use a whole core. That ceiling, not this 2-CPU machine's throughput (the
nodes and the load generator run out of CPU long before Redis does), is what shows whether
capacity grows with shards. A phase during which other processes used more than
``--max-other`` % of a core on the two CPUs is repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from benchmarks import bench  # noqa: E402 - the helpers of benchmarks/bench.py
from support import redis_topologies  # noqa: E402 - the Redis Cluster and Sentinel set-ups of the tests

# Commands that only Lua scripts of wsguard.stores.redis_scripts run (never sent directly).
SCRIPT_ONLY = {"time", "hmget", "hset", "pexpire", "zremrangebyscore", "zscore", "zcard", "zadd"}
# Commands of this benchmark's own monitoring, of replicas and of Sentinels.
MONITORING = {"info", "hello", "client", "select", "ping", "config", "replconf", "psync", "sync"}


@dataclass(frozen=True)
class Setup:
    name: str
    store: str  # "memory", or a topology: "redis", "sentinel", "cluster1", "cluster3"
    cpus: tuple[int, ...]  # one per node


CPUS = {0, 1}

SETUPS = (
    Setup("memory x1", "memory", (0,)),
    Setup("redis x1", "redis", (0,)),
    Setup("redis x2, 1 CPU", "redis", (0, 0)),
    Setup("redis x2, 2 CPUs", "redis", (0, 1)),
    Setup("sentinel x1", "sentinel", (0,)),
    Setup("cluster 1 shard x1", "cluster1", (0,)),
    Setup("cluster 3 shards x1", "cluster3", (0,)),
    Setup("cluster 3 shards x2, 2 CPUs", "cluster3", (0, 1)),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RedisServer:
    def __init__(self, tmp: Path, cpu: int) -> None:
        self.tmp = tmp
        self.cpu = cpu
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (scripts/test.sh installs it)")
        with contextlib.closing(__import__("socket").socket()) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        cmd, pin = bench.pinned(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            self.cpu,
        )  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=pin,
        )
        bench.CHILDREN[self.proc.pid] = "redis-server"
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except (aioredis.ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                await asyncio.sleep(0.05)
        await client.aclose()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    async def reset(self) -> None:
        client = self.client()
        await client.flushall()
        await client.config_resetstat()
        await client.aclose()

    def primaries(self) -> list[tuple[str, int]]:
        assert self.proc is not None
        return [(f"127.0.0.1:{self.port}", self.proc.pid)]

    async def commands(self) -> dict[str, int]:
        """Commands wsguard sent so far, by primary: scripts once, monitoring excluded."""
        client = self.client()
        stats = await client.info("commandstats")
        await client.aclose()
        calls = {
            key.removeprefix("cmdstat_").split("|", 1)[0]: int(value["calls"])
            for key, value in stats.items()
        }
        return {self.primaries()[0][0]: wsguard_commands(calls)}

    async def stop(self) -> None:
        if self.proc is not None:
            await bench.stop_process(self.proc, grace=5)


def wsguard_commands(calls: dict[str, int]) -> int:
    return sum(n for name, n in calls.items() if name not in SCRIPT_ONLY | MONITORING)


class TopologyServers:
    """A Redis Cluster or a Sentinel group (tests/redis_topologies.py), pinned to one CPU."""

    def __init__(self, kind: str, tmp: Path, cpu: int) -> None:
        workdir = tmp / kind
        self.topology: redis_topologies.ClusterTopology | redis_topologies.SentinelTopology
        if kind == "sentinel":
            self.topology = redis_topologies.SentinelTopology(workdir)
        else:
            primaries = 1 if kind == "cluster1" else 3
            self.topology = redis_topologies.ClusterTopology(
                workdir, primaries=primaries, node_timeout_ms=15000
            )
        self.cpu = cpu

    @property
    def uri(self) -> str:
        return self.topology.uri

    def _data_primaries(self) -> list[redis_topologies.Node]:
        if isinstance(self.topology, redis_topologies.ClusterTopology):
            return self.topology.primaries()
        return [self.topology.primary()]

    async def start(self) -> None:
        await asyncio.to_thread(self.topology.start)
        nodes = list(getattr(self.topology, "nodes", []))
        nodes += [*getattr(self.topology, "data", []), *getattr(self.topology, "sentinels", [])]
        for node in nodes:
            assert node.proc is not None
            os.sched_setaffinity(node.proc.pid, {self.cpu})

    async def reset(self) -> None:
        def reset() -> None:
            self.topology.flush()
            for node in self._data_primaries():
                with node.client() as client:
                    client.config_resetstat()

        await asyncio.to_thread(reset)

    def primaries(self) -> list[tuple[str, int]]:
        out = []
        for node in self._data_primaries():
            assert node.proc is not None
            out.append((node.address, node.proc.pid))
        return out

    async def commands(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            return {
                node.address: wsguard_commands(node.commandstats())
                for node in self._data_primaries()
            }

        return await asyncio.to_thread(read)

    async def stop(self) -> None:
        await asyncio.to_thread(self.topology.stop)


Backend = RedisServer | TopologyServers


async def run_phase(
    args: argparse.Namespace,
    tmp: Path,
    nodes: list[bench.Server],
    backend: Backend | None,
    phase: str,
    conns: int,
    tokens: list[str],
    depth: int,
) -> dict[str, Any]:
    """One timed phase over every node at once (one load generator per node)."""
    result = bench.PhaseResult()
    out: dict[str, Any] = {}
    targets = [
        (node.port, tokens[i :: len(nodes)], conns // len(nodes) + int(i < conns % len(nodes)))
        for i, node in enumerate(nodes)
    ]
    procs = await bench.open_loadgens(args, tmp, phase, targets, depth)
    try:
        for proc in procs:
            result.ready.append(await bench._readline(proc, 60 + conns / 50))
        if phase == "idle":
            for proc in procs:
                bench._send(proc, {"cmd": "close"})
        else:
            t0 = time.monotonic() + args.warmup
            t1 = t0 + args.duration
            for proc in procs:
                bench._send(proc, {"cmd": "go", "t0": t0, "t1": t1})
            pids = [node.pid for node in nodes]
            primaries = backend.primaries() if backend is not None else []
            pids += [pid for _, pid in primaries]
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpu0 = [bench.cpu_seconds_of(pid) for pid in pids]
            busy0 = bench.busy_seconds(CPUS)
            cmds0 = await backend.commands() if backend is not None else {}
            await asyncio.sleep(max(0.0, t1 - time.monotonic()))
            cpu1 = [bench.cpu_seconds_of(pid) for pid in pids]
            busy1 = bench.busy_seconds(CPUS)
            cmds1 = await backend.commands() if backend is not None else {}
            out["busy_s"] = busy1 - busy0
            used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
            out["node_cpu_s"] = used[: len(nodes)]
            # every primary: (commands, CPU seconds) in the window
            out["shards"] = {
                address: (cmds1[address] - cmds0.get(address, 0), cpu)
                for (address, _), cpu in zip(primaries, used[len(nodes) :], strict=True)
            }
            out["redis_cpu_s"] = sum(cpu for _, cpu in out["shards"].values())
            out["redis_commands"] = sum(n for n, _ in out["shards"].values())
        await bench.collect_loadgens(args, procs, result)
    finally:
        await bench.close_loadgens(args, procs)
    if phase == "idle":
        return {}
    wall = result.wall_s or args.duration
    node_cpu = sum(out["node_cpu_s"])
    ours = node_cpu + out["redis_cpu_s"] + result.loadgen_cpu_s
    shards = out["shards"]
    if shards and result.count:
        busiest_cmds = max(n for n, _ in shards.values())
        busiest_cpu = max(cpu for _, cpu in shards.values())
        out["busiest_share_pct"] = (
            100 * busiest_cmds / out["redis_commands"] if out["redis_commands"] else float("nan")
        )
        out["busiest_cpu_pct"] = 100 * busiest_cpu / wall
        # the event rate at which the busiest primary would use a whole core
        out["redis_ceiling"] = result.count / busiest_cpu if busiest_cpu > 0 else float("nan")
    else:
        out.update(busiest_share_pct=float("nan"), busiest_cpu_pct=float("nan"))
        out["redis_ceiling"] = float("nan")
    out.update(
        rate=result.rate(),
        p50_ms=result.percentile_ms(0.50),
        p99_ms=result.percentile_ms(0.99),
        loadgen_cpu_pct=100 * result.loadgen_cpu_s / wall,
        node_cpu_pct=100 * node_cpu / wall,
        redis_cpu_pct=100 * out["redis_cpu_s"] / wall,
        per_node_cpu_s=result.count / node_cpu if node_cpu > 0 else float("nan"),
        redis_per_event=out["redis_commands"] / result.count if result.count else float("nan"),
        foreign_cpu_pct=100 * (out["busy_s"] - ours) / wall,
        errors=result.errors,
    )
    return out


async def bench_setup(
    setup: Setup,
    args: argparse.Namespace,
    tmp: Path,
    secret: str,
    tokens: list[str],
    backends: dict[str, Backend],
    counter: list[int],
) -> dict[str, Any]:
    store = "memory://"
    backend = backends.get(setup.store)
    if backend is not None:
        await backend.reset()
        store = backend.uri
    nodes: list[bench.Server] = []
    out: dict[str, Any] = {"setup": setup.name}
    try:
        for cpu in setup.cpus:
            counter[0] += 1
            nodes.append(
                await bench.start_server(
                    "wsguard", args, tmp, secret, counter[0], cpu=cpu, extra=("--store", store)
                )
            )
        on_redis = backend
        await run_phase(args, tmp, nodes, on_redis, "idle", 20 * len(nodes), tokens, 1)  # warm-up
        for phase, conns, depth in (
            ("pingpong", args.conns, args.depth),
            ("handshake", args.hs_workers, 1),
        ):
            for attempt in range(args.retries + 1):
                out[phase] = await run_phase(
                    args, tmp, nodes, on_redis, phase, conns, tokens, depth
                )
                other = out[phase]["foreign_cpu_pct"]
                if other <= args.max_other:
                    break
                log(
                    f"bench_cluster:   {setup.name} {phase}: other processes used {other:.0f}% "
                    f"of a core on CPUs 0-1; repeating ({attempt + 1}/{args.retries})"
                )
    finally:
        for node in nodes:
            await bench.stop_process(node.proc)
    pp, hs = out["pingpong"], out["handshake"]
    log(
        f"bench_cluster: {setup.name:>27}: {pp['rate']:,.0f} msg/s "
        f"({pp['redis_per_event']:.4f} Redis cmds/msg, nodes CPU {pp['node_cpu_pct']:.0f}%, "
        f"Redis CPU {pp['redis_cpu_pct']:.0f}%, loadgen {pp['loadgen_cpu_pct']:.0f}%) | "
        f"{hs['rate']:,.0f} handshakes/s ({hs['redis_per_event']:.2f} Redis cmds each, "
        f"nodes CPU {hs['node_cpu_pct']:.0f}%, Redis CPU {hs['redis_cpu_pct']:.0f}%, "
        f"loadgen {hs['loadgen_cpu_pct']:.0f}%)"
    )
    for phase in ("pingpong", "handshake"):
        shards = out[phase].get("shards", {})
        if len(shards) > 1:
            total_cmds = sum(n for n, _ in shards.values()) or 1
            total_cpu = sum(cpu for _, cpu in shards.values()) or 1.0
            spread = ", ".join(
                f"{address} {100 * n / total_cmds:.0f}% of cmds {100 * cpu / total_cpu:.0f}% of CPU"
                for address, (n, cpu) in sorted(shards.items())
            )
            log(f"bench_cluster: {'':>27}  {phase} per primary: {spread}")
    return out


ROWS = (
    ("pingpong", "rate", "ping/pong messages/s", "{:,.0f}"),
    ("pingpong", "per_node_cpu_s", "messages per node CPU-second", "{:,.0f}"),
    ("pingpong", "p99_ms", "ping/pong p99 RTT (ms)", "{:.2f}"),
    ("pingpong", "redis_per_event", "Redis commands per message", "{:.4f}"),
    ("pingpong", "redis_cpu_pct", "Redis CPU, ping/pong (%)", "{:.1f}"),
    ("pingpong", "loadgen_cpu_pct", "loadgen CPU, ping/pong (%)", "{:.0f}"),
    ("handshake", "rate", "handshakes/s", "{:,.0f}"),
    ("handshake", "per_node_cpu_s", "handshakes per node CPU-second", "{:,.0f}"),
    ("handshake", "redis_per_event", "Redis commands per handshake", "{:.2f}"),
    ("handshake", "redis_cpu_pct", "Redis CPU, handshakes (%)", "{:.1f}"),
    (
        "pingpong",
        "busiest_share_pct",
        "busiest primary's share of commands, ping/pong (%)",
        "{:.0f}",
    ),
    (
        "handshake",
        "busiest_share_pct",
        "busiest primary's share of commands, handshakes (%)",
        "{:.0f}",
    ),
    ("handshake", "busiest_cpu_pct", "busiest primary's CPU, handshakes (%)", "{:.1f}"),
    (
        "handshake",
        "redis_ceiling",
        "Redis ceiling: handshakes/s at 1 core on the busiest primary",
        "{:,.0f}",
    ),
    ("handshake", "loadgen_cpu_pct", "loadgen CPU, handshakes (%)", "{:.0f}"),
    ("pingpong", "node_cpu_pct", "nodes CPU, ping/pong (% of a core)", "{:.0f}"),
    ("handshake", "node_cpu_pct", "nodes CPU, handshakes (% of a core)", "{:.0f}"),
    ("pingpong", "foreign_cpu_pct", "other processes, ping/pong (%)", "{:.0f}"),
    ("handshake", "foreign_cpu_pct", "other processes, handshakes (%)", "{:.0f}"),
)


def print_table(setups: list[Setup], results: list[dict[str, Any]]) -> None:
    header = ["metric", *(s.name for s in setups)]
    rows = [header]
    for phase, key, label, fmt in ROWS:
        row = [label]
        for setup in setups:
            values = [r[phase][key] for r in results if r["setup"] == setup.name]
            values = [v for v in values if v == v]
            if not values:
                row.append("-")
                continue
            med = statistics.median(values)
            row.append(f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]")
        rows.append(row)
    base = [r["pingpong"]["rate"] for r in results if r["setup"] == SETUPS[0].name]
    hs_base = [r["handshake"]["rate"] for r in results if r["setup"] == SETUPS[0].name]
    for label, phase, ref in (("messages/s vs memory x1", "pingpong", base),
                              ("handshakes/s vs memory x1", "handshake", hs_base)):  # fmt: skip
        if not ref:
            continue
        row = [label]
        for setup in setups:
            values = [r[phase]["rate"] for r in results if r["setup"] == setup.name]
            row.append(f"{statistics.median(values) / statistics.median(ref):.2f}")
        rows.append(row)
    bench.print_rows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark wsguard cluster mode on Redis.")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s phases")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per measured phase (default 5)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--conns", type=int, default=50, help="ping/pong connections (50)")
    parser.add_argument("--hs-workers", type=int, default=32, help="handshake workers (32)")
    parser.add_argument("--msg-bytes", type=int, default=100, help="ping payload bytes (100)")
    parser.add_argument("--depth", type=int, default=8, help="pings in flight per connection")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-operation timeout")
    parser.add_argument(
        "--max-other",
        type=float,
        default=10.0,
        help="repeat a phase when other processes used more than this %% of a core (10)",
    )
    parser.add_argument("--retries", type=int, default=3, help="repeats per phase (3)")
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--redis-cpu", type=int, default=1)
    parser.add_argument(
        "--setups",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(range(1, len(SETUPS) + 1)),
        help="comma-separated numbers of the set-ups to run (default all: 1-8)",
    )
    parser.add_argument(
        "--one-address",
        action="store_true",
        help="every client from 127.0.0.1 (the per-address keys then sit on one shard)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    if not args.setups or not set(args.setups) <= set(range(1, len(SETUPS) + 1)):
        parser.error(f"--setups: numbers from 1 to {len(SETUPS)}")
    args.setups = [SETUPS[n - 1] for n in args.setups]
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    exe = bench.find_wsguard()
    if exe is None:
        parser.error("cannot find the wsguard command")
    args.wsguard_command = [exe]
    args.client = "raw"  # the load generator's client (bench.py's --client)
    args.spread = not args.one_address  # clients from loopback addresses of their own
    if not {0, 1} <= os.sched_getaffinity(0):
        parser.error("needs CPUs 0 and 1")
    return args


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    secret = secrets.token_urlsafe(48)
    tokens = bench.mint_tokens(secret, max(args.conns, args.hs_workers, 64))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsguard-bench-cluster-") as tmpdir:
        tmp = Path(tmpdir)
        backends: dict[str, Backend] = {}
        counter = [0]
        try:
            for kind in dict.fromkeys(s.store for s in args.setups if s.store != "memory"):
                backend: Backend = (
                    RedisServer(tmp, args.redis_cpu)
                    if kind == "redis"
                    else TopologyServers(kind, tmp, args.redis_cpu)
                )
                backends[kind] = backend
                await backend.start()
            for round_no in range(1, args.rounds + 1):
                for setup in args.setups:
                    out = await bench_setup(setup, args, tmp, secret, tokens, backends, counter)
                    out["round"] = round_no
                    results.append(out)
        finally:
            for backend in backends.values():
                await backend.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    os.sched_setaffinity(0, {args.client_cpu})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(
        f"bench_cluster: {args.rounds} round(s), {args.duration:g} s phases, {args.conns} "
        f"ping/pong connections ({args.depth} in flight), {args.hs_workers} handshake workers; "
        f"load generator on CPU {args.client_cpu}, redis-server on CPU {args.redis_cpu}"
    )
    try:
        results = asyncio.run(amain(args))
    finally:
        bench.kill_children()
    print()
    print(
        f"wsguard cluster mode: {args.rounds} round(s), {args.duration:g} s per phase, "
        f"{args.conns} ping/pong conns ({args.msg_bytes} B, {args.depth} in flight), "
        f"{args.hs_workers} handshake workers; median [min-max]"
    )
    print_table(args.setups, results)
    errors = {
        f"{r['setup']} round {r['round']} {phase}": r[phase]["errors"]
        for r in results
        for phase in ("pingpong", "handshake")
        if r[phase]["errors"]
    }
    if errors:
        print(f"errors: {errors}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
