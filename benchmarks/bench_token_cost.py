"""What a token costs the event loop: a verified-token cache hit, a miss, and a miss
verified in a worker thread instead of on the loop.

    .venv/bin/python benchmarks/bench_token_cost.py [--tokens 3000]

For each algorithm family (HS256, RS256 with a 2,048-bit key, ES256), wsguard's own
``TokenVerifier`` (the one every handshake goes through) verifies distinct tokens:

* **hit**: a token verified before (a reconnecting client), CPU per token;
* **miss**: a token never seen (PyJWT and the signature check), CPU per token;
* **loop time lost**: how much of the event loop's time a miss takes from its other
  work, with each miss verified *inline* on the loop and *in a thread*
  (``loop.run_in_executor`` on a one-thread pool, 8 in flight). The other work keeps the
  loop busy throughout (small messages decoded back to back on uvloop, counted with and
  without the misses beside them, the rate without measured just before each half): a
  saturated loop, the case where a verification's cost is the users' loss. The
  signature check of the public-key algorithms runs without the GIL; PyJWT's parsing
  around it, and the hand-over to the thread and back, need it;
* **latency**: a token's wait from its turn to its result (inline: the verification
  itself; in the thread: with the wait for the thread and the GIL).

Medians of 3 passes of ``--tokens`` distinct tokens each (the two halves in turns).
Medians of 3 passes of ``--tokens`` distinct tokens each.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsguard.config.model import AuthConfig
from wsguard.core.auth import _CACHE_ENTRIES, KeyMaterial, TokenVerifier

SECRET = "bench-token-cost-secret-0123456789abcdef"
IN_FLIGHT = 8


def families(workdir: Path) -> list[tuple[str, Any, AuthConfig, KeyMaterial]]:
    """(algorithm, signing key, the verifier's configuration, its keys) per family."""
    out: list[tuple[str, Any, AuthConfig, KeyMaterial]] = [
        ("HS256", SECRET, AuthConfig(algorithms=("HS256",), secret=SECRET),
         KeyMaterial(secret=SECRET.encode())),
    ]  # fmt: skip
    for alg, private in (
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
    ):
        public = private.public_key()
        pem = workdir / f"{alg}.pem"
        pem.write_bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        config = AuthConfig(algorithms=(alg,), public_key_file=pem)
        out.append((alg, private, config, KeyMaterial(public_key=public)))
    return out


def tokens(alg: str, key: Any, count: int, tag: str) -> list[str]:
    exp = int(time.time()) + 3000
    return [
        jwt.encode({"sub": f"user-{tag}-{i}", "exp": exp, "scope": "chat"}, key, algorithm=alg)
        for i in range(count)
    ]


def cpu_per_call(call: Callable[[str], Any], items: list[str]) -> float:
    started = time.thread_time()
    for item in items:
        call(item)
    return (time.thread_time() - started) / len(items)


def message_work() -> None:
    """Stands for the loop's other work: one small message decoded and looked at."""
    message = orjson.loads(b'{"type":"chat","text":"hello there","id":"m1"}')
    if message["type"] != "chat":
        raise AssertionError(message)


async def loop_progress(verifying: Callable[[], Awaitable[None]]) -> tuple[int, float]:
    """Units of :func:`message_work` the loop does while *verifying* runs, and its time."""
    done = False
    units = 0

    async def other_work() -> None:
        nonlocal units
        while not done:
            message_work()
            units += 1
            await asyncio.sleep(0)

    started = time.perf_counter()
    worker = asyncio.create_task(other_work())
    await verifying()
    done = True
    elapsed = time.perf_counter() - started
    await worker
    return units, elapsed


async def loop_cost(
    verify: Callable[[str], Any], items: list[str], thread_first: bool
) -> dict[str, float]:
    """The loop's time lost per token, verified inline and in a worker thread (each
    against the loop's rate measured just before it), and each token's latency (from
    its turn to its result: inline, the verification itself; in the thread, the wait
    for the thread too)."""
    loop = asyncio.get_running_loop()
    half = len(items) // 2
    latencies: list[float] = []

    async def nothing() -> None:
        await asyncio.sleep(0.3)

    async def inline() -> None:
        for token in items[:half]:
            started = time.perf_counter()
            verify(token)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0)

    async def one(token: str) -> None:
        started = time.perf_counter()
        await loop.run_in_executor(pool, verify, token)
        latencies.append(time.perf_counter() - started)

    async def in_thread() -> None:
        rest = items[half : 2 * half]
        for start in range(0, len(rest), IN_FLIGHT):
            await asyncio.gather(*(one(t) for t in rest[start : start + IN_FLIGHT]))

    halves = [("inline", inline), ("thread", in_thread)]
    if thread_first:
        halves.reverse()
    out = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        await loop.run_in_executor(pool, time.perf_counter)  # the thread is started
        for name, verifying in halves:
            units, elapsed = await loop_progress(nothing)
            rate = units / elapsed
            latencies.clear()
            units, elapsed = await loop_progress(verifying)
            out[name] = (elapsed - units / rate) / half
            out[f"{name}_latency"] = statistics.mean(latencies)
    return out


def measure(count: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for alg, key, config, keys in families(Path(workdir)):
            passes: dict[str, list[float]] = {}
            for attempt in range(3):
                verifier = TokenVerifier(config, keys)
                fresh = tokens(alg, key, count, str(attempt))
                found = {
                    "miss": cpu_per_call(verifier.verify, fresh),
                    "hit": cpu_per_call(verifier.verify, fresh),
                    **uvloop.run(
                        loop_cost(TokenVerifier(config, keys).verify, fresh, attempt % 2 == 1)
                    ),
                }
                for name, value in found.items():
                    passes.setdefault(name, []).append(value)
            rows.append({"alg": alg, **{k: statistics.median(v) for k, v in passes.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=3000,
        help=f"distinct tokens per pass (at most {_CACHE_ENTRIES}: the cache's size)",
    )
    args = parser.parse_args()
    if not 16 <= args.tokens <= _CACHE_ENTRIES:
        parser.error(f"--tokens must be 16 to {_CACHE_ENTRIES} (hits must stay in the cache)")
    rows = measure(args.tokens)
    print(
        f"{'':14} {'':13} {'loop time lost':>23} {'latency':>23}\n"
        f"{'µs per token':14} {'hit':>6} {'miss':>6} {'inline':>11} {'in a thread':>11} "
        f"{'inline':>11} {'in a thread':>11}"
    )
    for row in rows:
        print(
            f"{row['alg']:14} {row['hit'] * 1e6:6.1f} {row['miss'] * 1e6:6.1f} "
            f"{row['inline'] * 1e6:11.1f} {row['thread'] * 1e6:11.1f} "
            f"{row['inline_latency'] * 1e6:11.1f} {row['thread_latency'] * 1e6:11.1f}"
        )


if __name__ == "__main__":
    main()
