"""Per-message cost of the signed-message check (issue 4, "Benchmarks show the cost").

Run from the repository root:

    .venv/bin/python benchmarks/bench_signing.py
    .venv/bin/python benchmarks/bench_signing.py --number 5000 --repeat 3   # quicker

Measures, in the policy core only (no network), the best of ``--repeat`` runs:

* ``MessagePolicy.evaluate`` of the demo chat unsigned vs the same chat signed
  (per-client key from a key table, and the per-connection session key): the delta is
  what signing adds to every message before the handler;
* ``SignatureVerifier.check`` alone (envelope checks, canonical form, HMAC, compare);
* ``canonical()`` alone, and one HMAC-SHA256 over the canonical bytes;
* ``MemoryStore.add_nonce`` (the replay record the server adds after ``evaluate``), timed
  with fresh nonces inside one coroutine, so it excludes the event loop's scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import secrets
import time
import timeit
from collections.abc import Callable
from typing import Any

import orjson

from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.loader import validate_config
from wsguard.config.model import Config
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.decisions import Deliver
from wsguard.core.identity import Identity
from wsguard.core.integrity import (
    SESSION_KID,
    SignatureVerifier,
    SigningKey,
    Verified,
    canonical,
    sign,
)
from wsguard.core.messages import MessagePolicy
from wsguard.stores.memory import MemoryStore

JWT_SECRET = "bench-secret-that-is-long-enough-for-hs256-0123456789"
ALICE_SECRET = secrets.token_bytes(32)
CHAT: dict[str, Any] = {
    "type": "chat",
    "room": "general",
    "text": "hello everyone, this is a chat message",
    "id": 42,
}
UNLIMITED: dict[str, Any] = {
    "messages_per_minute": 10**9,
    "message_burst": 10**9,
    "bytes_per_minute": 10**12,
    "subject_messages_per_minute": 10**9,
    "subject_bytes_per_minute": 10**12,
    "violation_budget": 10**9,
}


def make_config(signed: bool) -> Config:
    chat = {**DEMO_MESSAGE_TYPES["chat"], "signed": signed}
    return validate_config(
        {
            "auth": {"secret": JWT_SECRET},
            "limits": UNLIMITED,
            "messages": {"types": {**DEMO_MESSAGE_TYPES, "chat": chat}},
            # session keys on, so each connection state also carries its own key
            "signing": {"session_keys": True, "window_seconds": 3600},
        }
    )


def make_policy(config: Config) -> MessagePolicy:
    verifier = TokenVerifier(config.auth, KeyMaterial(secret=JWT_SECRET.encode()))
    signatures = SignatureVerifier(
        {"alice-1": SigningKey("alice-1", "alice", ALICE_SECRET)},
        window=config.signing.window_seconds,
        max_nonce=config.signing.max_nonce_bytes,
        clock=time.time,
    )
    return MessagePolicy(config, verifier, signatures)


def per_call_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=repeat))
    return best / number * 1e9


def nonce_store_ns(number: int, repeat: int) -> float:
    keys = [f"nonce:alice:alice-1:{secrets.token_urlsafe(16)}" for _ in range(number)]

    async def run() -> float:
        best = float("inf")
        for _ in range(repeat):
            store = MemoryStore()
            start = time.perf_counter()
            for key in keys:
                await store.add_nonce(key, 7200.0)
            best = min(best, time.perf_counter() - start)
        return best

    return asyncio.run(run()) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-message cost of the signed-message check.")
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs; the best is kept")
    args = parser.parse_args()
    number, repeat = args.number, args.repeat

    unsigned_policy = make_policy(make_config(signed=False))
    signed_policy = make_policy(make_config(signed=True))
    identity = Identity("alice", frozenset({"chat"}))
    unsigned_state = unsigned_policy.open(identity, time.monotonic())
    signed_state = signed_policy.open(identity, time.monotonic())
    session_key = signed_state.session_key
    assert session_key is not None

    now = int(time.time())
    nonce = secrets.token_urlsafe(16)
    signed_msg = sign(CHAT, kid="alice-1", secret=ALICE_SECRET, nonce=nonce, ts=now)
    session_msg = sign(CHAT, kid=SESSION_KID, secret=session_key, nonce=nonce, ts=now)
    unsigned_text = orjson.dumps(CHAT).decode()
    signed_text = orjson.dumps(signed_msg).decode()
    session_text = orjson.dumps(session_msg).decode()

    # every path must really deliver (a refusal would be cheaper and skew the numbers)
    for policy, state, text in (
        (unsigned_policy, unsigned_state, unsigned_text),
        (signed_policy, signed_state, signed_text),
        (signed_policy, signed_state, session_text),
    ):
        decision = policy.evaluate(state, text, time.monotonic())
        assert isinstance(decision, Deliver), decision
        assert decision.message == CHAT, decision.message
    checker = signed_policy.signatures
    assert checker is not None
    assert isinstance(checker.check(signed_msg, "alice", session_key), Verified)
    canonical_bytes = canonical(signed_msg)

    clock = time.monotonic
    rows: list[tuple[str, int, float]] = [
        (
            "evaluate chat, unsigned",
            len(unsigned_text),
            per_call_ns(
                lambda: unsigned_policy.evaluate(unsigned_state, unsigned_text, clock()),
                number,
                repeat,
            ),
        ),
        (
            "evaluate chat, signed (key file kid)",
            len(signed_text),
            per_call_ns(
                lambda: signed_policy.evaluate(signed_state, signed_text, clock()), number, repeat
            ),
        ),
        (
            "evaluate chat, signed (session key)",
            len(session_text),
            per_call_ns(
                lambda: signed_policy.evaluate(signed_state, session_text, clock()),
                number,
                repeat,
            ),
        ),
        (
            "SignatureVerifier.check alone",
            len(signed_text),
            per_call_ns(lambda: checker.check(signed_msg, "alice", session_key), number, repeat),
        ),
        (
            "canonical() alone",
            len(canonical_bytes),
            per_call_ns(lambda: canonical(signed_msg), number, repeat),
        ),
        (
            "HMAC-SHA256 of canonical bytes",
            len(canonical_bytes),
            per_call_ns(
                lambda: hmac.new(ALICE_SECRET, canonical_bytes, hashlib.sha256).digest(),
                number,
                repeat,
            ),
        ),
        ("MemoryStore.add_nonce (fresh)", 0, nonce_store_ns(number, repeat)),
    ]

    print(f"{'per message':<40}{'bytes':>7}{'ns':>10}")
    for name, size, ns in rows:
        print(f"{name:<40}{size or '':>7}{ns:>10.0f}")
    unsigned_ns = rows[0][2]
    print()
    for name, _, ns in rows[1:3]:
        delta = ns - unsigned_ns
        print(
            f"delta {name[len('evaluate chat, ') :]:<34}{delta:>+17.0f} ns  ({ns / unsigned_ns:.2f}x)"
        )
    with_nonce = rows[1][2] + rows[6][2] - unsigned_ns
    print(f"{'delta signed + nonce record':<40}{with_nonce:>+17.0f} ns")


if __name__ == "__main__":
    main()
