"""Compare orjson and msgspec on the demo messages (the hot-path parser choice).

Run: .venv/bin/python benchmarks/json_parsers.py
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

MESSAGES: dict[str, bytes] = {
    "ping": b'{"type":"ping","id":"a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2"}',
    "chat": b'{"type":"chat","room":"general","text":"hello everyone, this is a chat message","id":42}',
    "data": b'{"type":"data","channel":"ticks","payload":{"sym":"ABC","px":101.25,"qty":300,"ok":true}}',
    "command": b'{"type":"command","name":"reload","args":["config","now"],"id":"c-1"}',
}


def bench(name: str, fn: Callable[[bytes], Any], data: bytes, number: int = 200_000) -> float:
    best = min(timeit.repeat(lambda: fn(data), number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    decoder = msgspec.json.Decoder()
    print(f"{'message':<10}{'bytes':>7}{'orjson ns':>12}{'msgspec ns':>12}{'ratio':>8}")
    for kind, data in MESSAGES.items():
        assert orjson.loads(data) == decoder.decode(data)
        o = bench("orjson", orjson.loads, data)
        m = bench("msgspec", decoder.decode, data)
        print(f"{kind:<10}{len(data):>7}{o:>12.0f}{m:>12.0f}{m / o:>8.2f}")
    encoded = {"type": "broadcast", "from": "alice", "message": orjson.loads(MESSAGES["chat"])}
    enc = msgspec.json.Encoder()
    o = min(timeit.repeat(lambda: orjson.dumps(encoded), number=200_000, repeat=5)) / 200_000
    m = min(timeit.repeat(lambda: enc.encode(encoded), number=200_000, repeat=5)) / 200_000
    print(f"{'encode':<10}{'':>7}{o * 1e9:>12.0f}{m * 1e9:>12.0f}{m / o:>8.2f}")


if __name__ == "__main__":
    main()
