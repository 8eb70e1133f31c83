"""Property-based tests of the signed-message envelope (no server, no I/O).

For arbitrary signable messages: ``sign`` then :meth:`SignatureVerifier.check` verifies,
any single mutation anywhere (a value changed or retyped, a field added, removed or
renamed at any depth, an item inserted or dropped, the kid, nonce, ts or one character
of sig changed) is refused, and the canonical form survives a JSON round trip.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsguard.core.integrity import (
    ENVELOPE_FIELDS,
    SESSION_KID,
    SignatureVerifier,
    SigningKey,
    Verified,
    canonical,
    sign,
)

NOW = 1_700_000_000
WINDOW = 30
K1_SECRET = bytes(range(32))
K2_SECRET = bytes(range(32, 64))
SESSION_SECRET = bytes(range(64, 96))
VERIFIER = SignatureVerifier(
    {
        "k1": SigningKey("k1", "alice", K1_SECRET),
        "k2": SigningKey("k2", "alice", K2_SECRET),  # alice's second key (rotation)
        "kb": SigningKey("kb", "bob", bytes(range(96, 128))),
    },
    window=WINDOW,
    max_nonce=64,
    clock=lambda: float(NOW),
)
OTHER_SESSION_SECRET = bytes(range(128, 160))
SECRETS = {"k1": K1_SECRET, "k2": K2_SECRET, SESSION_KID: SESSION_SECRET}
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
MAX_SAFE = 2**53 - 1

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(PROPERTY, max_examples=150)

# any Unicode scalar value (no lone surrogates: they are not valid JSON text on the wire)
TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
SCALARS = st.none() | st.booleans() | st.integers(-MAX_SAFE, MAX_SAFE) | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.dictionaries(TEXT.filter(lambda k: k not in ENVELOPE_FIELDS), VALUES, max_size=6)
NONCES = st.text(st.sampled_from(B64URL), min_size=16, max_size=64)
TIMESTAMPS = st.integers(NOW - WINDOW, NOW + WINDOW)
KIDS = st.sampled_from(sorted(SECRETS))


def same(a: Any, b: Any) -> bool:
    """Equality that tells 1 from True from 1.0 (Python's == does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


Path = tuple[str | int, ...]


def paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    """The path of every value inside *value*, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def at(root: Any, path: Path) -> Any:
    for step in path:
        root = root[step]
    return root


def retyped(value: Any) -> list[Any]:
    """Values of another JSON type that look like *value* (never the same canonical form)."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), None, [value]]
    if isinstance(value, int):
        return [str(value), float(value), value == 1, [value], {"": value}]
    if isinstance(value, str):
        return [[value], {value: value}, None, len(value)]
    if value is None:
        return ["null", 0, False, [], {}]
    if isinstance(value, list):
        return [{str(i): v for i, v in enumerate(value)}, orjson.dumps(value).decode()]
    assert isinstance(value, dict)
    return [[list(kv) for kv in value.items()], list(value), orjson.dumps(value).decode()]


@st.composite
def signed_messages(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    kid = draw(KIDS)
    message = sign(
        draw(MESSAGES), kid=kid, secret=SECRETS[kid], nonce=draw(NONCES), ts=draw(TIMESTAMPS)
    )
    return message, kid


def check(message: Any) -> Verified | str:
    return VERIFIER.check(message, "alice", SESSION_SECRET)


@st.composite
def mutations(draw: st.DrawFn, signed: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One single change to *signed*: (description, mutated deep copy)."""
    mutated = copy.deepcopy(signed)
    every = list(paths(mutated))
    kind = draw(
        st.sampled_from(
            ["replace", "retype", "add", "remove", "rename", "insert", "sig", "kid", "nonce", "ts"]
        )
    )
    if kind == "sig":
        sig = mutated["sig"]
        i = draw(st.integers(0, len(sig) - 1))
        char = draw(st.sampled_from(B64URL).filter(lambda c: c != sig[i]))
        mutated["sig"] = sig[:i] + char + sig[i + 1 :]
    elif kind == "kid":
        mutated["kid"] = draw(st.sampled_from(["k1", "k2", "kb", SESSION_KID, "k3", ""]))
    elif kind == "nonce":
        mutated["nonce"] = draw(NONCES)
    elif kind == "ts":
        mutated["ts"] = draw(st.integers(NOW - 3 * WINDOW, NOW + 3 * WINDOW))
    elif kind in ("replace", "retype"):
        path = draw(st.sampled_from(every[1:]))
        old = at(mutated, path)
        new = draw(VALUES) if kind == "replace" else draw(st.sampled_from(retyped(old)))
        at(mutated, path[:-1])[path[-1]] = new
    elif kind == "add":
        dicts = [p for p in every if isinstance(at(mutated, p), dict)]
        target = at(mutated, draw(st.sampled_from(dicts)))
        key = draw(TEXT.filter(lambda k: k not in target))
        target[key] = draw(VALUES)
    elif kind == "remove":
        path = draw(st.sampled_from(every[1:]))
        del at(mutated, path[:-1])[path[-1]]
    elif kind == "rename":
        keyed = [p for p in every[1:] if isinstance(p[-1], str)]
        path = draw(st.sampled_from(keyed))
        parent = at(mutated, path[:-1])
        new_key = draw(TEXT.filter(lambda k: k not in parent))
        parent[new_key] = parent.pop(path[-1])
    else:  # insert an item into a list, or into an empty spot of the top level
        lists = [p for p in every if isinstance(at(mutated, p), list)]
        if lists:
            target = at(mutated, draw(st.sampled_from(lists)))
            target.insert(draw(st.integers(0, len(target))), draw(VALUES))
        else:
            mutated["\x00extra"] = draw(VALUES)
    return kind, mutated


@SMALL
@given(signed_messages())
def test_signed_message_verifies(case: tuple[dict[str, Any], str]) -> None:
    message, kid = case
    outcome = check(message)
    assert isinstance(outcome, Verified)
    assert outcome.nonce_key == f"nonce:alice:{kid}:{message['nonce']}"
    assert outcome.window == WINDOW
    assert outcome.timestamp == message["ts"]
    # what arrives is JSON: the message verifies after a wire round trip and in any key order
    assert isinstance(check(msgspec.json.decode(orjson.dumps(message))), Verified)
    assert isinstance(check(dict(reversed(list(message.items())))), Verified)


@PROPERTY
@given(st.data())
def test_any_single_mutation_is_refused(data: st.DataObject) -> None:
    signed, _ = data.draw(signed_messages())
    tried = 0
    for _ in range(4):  # several independent single mutations of the same message
        kind, mutated = data.draw(mutations(signed))
        if same(mutated, signed):
            continue  # a change without effect is no mutation
        tried += 1
        outcome = check(mutated)
        ts = mutated.get("ts")
        out_of_window = not isinstance(ts, int) or abs(NOW - ts) > WINDOW
        assert outcome == "bad_signature" or (outcome == "stale" and out_of_window), (
            kind,
            outcome,
        )
    assume(tried > 0)


@SMALL
@given(signed_messages())
def test_every_character_of_sig_matters(case: tuple[dict[str, Any], str]) -> None:
    message, _ = case
    sig = message["sig"]
    assert len(sig) == 43  # base64url of 32 bytes, no padding
    for i, char in enumerate(sig):
        other = B64URL[(B64URL.index(char) + 1) % len(B64URL)]
        assert check({**message, "sig": sig[:i] + other + sig[i + 1 :]}) == "bad_signature"
    for bad in (sig + "=", sig[:-1], sig + "A", sig.swapcase(), ""):
        if bad != sig:
            assert check({**message, "sig": bad}) == "bad_signature"


@SMALL
@given(signed_messages(), st.sampled_from(["bob", "mallory"]))
def test_key_only_verifies_its_subject(case: tuple[dict[str, Any], str], subject: str) -> None:
    message, _ = case
    # another subject's connection, with its own session key, never accepts it
    assert VERIFIER.check(message, subject, OTHER_SESSION_SECRET) == "bad_signature"


@PROPERTY
@given(MESSAGES)
def test_canonical_survives_json_round_trip(message: dict[str, Any]) -> None:
    form = canonical(message)
    assert canonical(orjson.loads(orjson.dumps(message))) == form
    assert canonical(msgspec.json.decode(orjson.dumps(message))) == form
    # and the canonical form is itself JSON that reads back as the same message
    assert same(orjson.loads(form), message)
