"""Server CPU per refused handshake attempt from an address past its allowance.

    .venv/bin/python benchmarks/bench_refused.py               # both engines and a bare 429
    .venv/bin/python benchmarks/bench_refused.py --attempts 20000 --servers picows

One loopback address spends its handshake allowance (``limits.handshakes_per_minute =
60``, a burst of 10), then makes ``--attempts`` more, 16 at a time: every one is answered
``429`` from its address alone, before any parse. The server runs on CPU 0, the client on
this process's CPU; the figure is the server's CPU time (user + system, from /proc) per
attempt (the allowance refills one a second, so a few of them are admitted: they show as
``101``). ``bare`` is a uvloop server answering every connection's first bytes with a fixed
429 and closing: what the operating system and the event loop cost on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench

SERVERS = ("bare", "picows", "websockets")
SOURCE = "127.0.0.77"
BARE = """
import asyncio, sys, uvloop
RESPONSE = b"HTTP/1.1 429 Too Many Requests\\r\\nRetry-After: 1\\r\\nContent-Length: 0\\r\\n\\r\\n"
class Refuse(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("peername")
    def data_received(self, data):
        self.transport.write(RESPONSE)
        self.transport.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on ws://127.0.0.1:{port}/", file=sys.stderr, flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def attempts(port: int, head: bytes, count: int, parallel: int) -> dict[str, int]:
    """*count* attempts from SOURCE, *parallel* at a time: their status lines, counted."""
    statuses: dict[str, int] = {}
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(bench.HOST, port, local_addr=(SOURCE, 0))
            writer.write(head)
            status = (await reader.readline()).decode(errors="replace")[9:12]
            statuses[status] = statuses.get(status, 0) + 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return statuses


async def measure(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, int], float]:
    """The answers to the measured attempts, and the server's CPU µs per attempt."""
    secret = "s" * 48
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    if name == "bare":
        cmd = [sys.executable, "-c", BARE]
    else:
        cmd = [*args.wsguard_command, "serve", "--config", str(bench.CONFIG), "--port", "0"]
        env |= {
            "WSGUARD_JWT_SECRET": secret,
            "WSGUARD_AUDIT__FILE": str(tmp / f"audit-{name}.jsonl"),
            "WSGUARD_ENGINE": name,
            "WSGUARD_LIMITS__HANDSHAKES_PER_MINUTE": "60",
        }
    cmd, pin = bench.pinned(cmd, args.server_cpu)
    server = await bench.start_listener(name, cmd, tmp / f"{name}.stderr", env=env, preexec=pin)
    try:
        token = bench.mint_tokens(secret, 1)[0]
        head = (
            f"GET / HTTP/1.1\r\nHost: {bench.HOST}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nOrigin: https://bench.example.com\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        await attempts(server.port, head, 40, 1)  # the allowance, spent
        before = bench.cpu_seconds_of(server.pid)
        statuses = await attempts(server.port, head, args.attempts, args.parallel)
        await asyncio.sleep(0.3)  # the last closes, handled
        spent = bench.cpu_seconds_of(server.pid) - before
    finally:
        await bench.stop_process(server.proc)
    return statuses, spent / args.attempts * 1e6


async def amain(args: argparse.Namespace) -> list[tuple[str, dict[str, int], float]]:
    with tempfile.TemporaryDirectory() as tmpdir:
        return [(name, *await measure(name, args, Path(tmpdir))) for name in args.servers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=4000, help="refused attempts (4000)")
    parser.add_argument("--parallel", type=int, default=16, help="attempts in flight (16)")
    parser.add_argument("--servers", type=bench.comma_list, default=list(SERVERS))
    parser.add_argument("--server-cpu", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.servers or set(args.servers) - set(SERVERS):
        parser.error(f"--servers: choose from {','.join(SERVERS)}")
    if args.attempts < 1 or args.parallel < 1:
        parser.error("--attempts and --parallel must be positive")
    args.wsguard_command = [bench.find_wsguard() or "wsguard"]
    others = os.sched_getaffinity(0) - {args.server_cpu}
    if others:
        os.sched_setaffinity(0, others)  # the client off the server's CPU
    rows = [("server", "attempts", "answers", "server CPU per attempt (µs)")]
    for name, statuses, per_attempt in asyncio.run(amain(args)):
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        rows.append((name, f"{args.attempts:,}", answers, f"{per_attempt:.0f}"))
    bench.print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
