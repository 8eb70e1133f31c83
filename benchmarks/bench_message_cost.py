"""Policy CPU per message: a typical chat against the worst messages within the size limit.

    .venv/bin/python benchmarks/bench_message_cost.py

Runs the message policy in-process (no sockets: decoding, structural bounds, type,
scopes, schema, rate limits raised out of the way) on a typical chat message and on
shapes built to be expensive within ``limits.max_message_bytes`` (8 KiB), and prints
the best of 5 runs per shape in µs and as a multiple of the typical message.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from wsguard.config.model import Config
from wsguard.core.identity import Identity
from wsguard.guard import Guard

UNLIMITED = {
    "messages_per_minute": 10**9,
    "message_burst": 10**8,
    "bytes_per_minute": 10**12,
    "subject_messages_per_minute": 10**9,
    "subject_bytes_per_minute": 10**12,
    "violation_budget": 10**9,
}


def nested(depth: int, keys: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = {**{str(i): 0 for i in range(keys)}, "n": node}
    return node


def shapes() -> dict[str, str]:
    return {
        "typical chat": orjson.dumps({"type": "chat", "text": "hello there", "id": "m1"}).decode(),
        "15 levels x 30 keys": orjson.dumps({"type": "chat", "x": nested(15, 30)}).decode(),
        "15 levels x 14 keys": orjson.dumps({"type": "chat", "x": nested(15, 14)}).decode(),
        "2,600 empty objects": '{"type":"chat","a":['
        + ",".join(["[" + ",".join(["{}"] * 200) + "]"] * 13)
        + "]}",
        "250 empty objects": '{"type":"chat","a":[' + ",".join(["{}"] * 250) + "]}",
        "3,750 integers": '{"type":"chat","a":['
        + ",".join(["[" + ",".join(["0"] * 250) + "]"] * 15)
        + "]}",
        "430 18-digit integers": '{"type":"chat","a":['
        + ",".join(["123456789012345678"] * 430)
        + "]}",
        "240 strings": '{"type":"chat","a":[' + ",".join(['"' + "x" * 30 + '"'] * 240) + "]}",
        "one 8 KB string": '{"type":"chat","text":"' + "y" * 8100 + '"}',
    }


def main() -> None:
    guard = Guard(Config.model_validate({"limits": UNLIMITED}))
    policy = guard.messages
    state = policy.open(Identity(subject="alice", scopes=frozenset({"chat"})), time.monotonic())

    def cost(data: str, reps: int) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(reps):
                policy.evaluate(state, data, time.monotonic())
            best = min(best, (time.perf_counter() - started) / reps)
        return best * 1e6

    typical = 0.0
    print(f"{'message':<24} {'bytes':>6} {'µs':>8} {'x typical':>10}  decision")
    for name, data in shapes().items():
        micros = cost(data, 3000 if name == "typical chat" else 300)
        typical = typical or micros
        decision = policy.evaluate(state, data, time.monotonic())
        what = getattr(decision, "message", None) or type(decision).__name__
        print(f"{name:<24} {len(data):>6} {micros:>8.1f} {micros / typical:>9.1f}x  {what}")


if __name__ == "__main__":
    main()
