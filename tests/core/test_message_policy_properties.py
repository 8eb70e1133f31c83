"""Property-based tests of the message policy core (no server, no I/O).

Arbitrary bytes, text and JSON go into :class:`wsguard.core.messages.MessagePolicy`;
it never raises, never falls back to its internal-error close, always answers with a
decision, and only delivers allowlisted, authorized, schema-valid, bounded messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SECRET, make_config, make_token
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.model import Config
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.decisions import Close, Deliver, Reauthenticate, Refuse
from wsguard.core.identity import Identity
from wsguard.core.messages import _STRING, ConnectionState, MessagePolicy

DECISIONS = (Deliver, Refuse, Close, Reauthenticate)
ALICE = Identity("alice", frozenset({"chat"}))
# a 19-digit run inside a string: harmless, but it forces the slow structural walk
PAD = ("~pad", "1234567890123456789")

UNLIMITED: dict[str, Any] = {
    "limits": {
        "messages_per_minute": 10**9,
        "message_burst": 10**6,
        "bytes_per_minute": 10**12,
        "subject_messages_per_minute": 10**9,
        "subject_bytes_per_minute": 10**12,
        "violation_budget": 10**9,
    }
}

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _policy(overrides: dict[str, Any] | None = None) -> MessagePolicy:
    config = make_config({**UNLIMITED, **(overrides or {})})
    return MessagePolicy(config, TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode())))


STRICT = _policy()
BINARY = _policy({"messages": {"binary": True}})
# the demo types plus a schema-less type, so only the structural bounds apply to it
LOOSE = _policy({"messages": {"types": {**DEMO_MESSAGE_TYPES, "note": {}}}})
TYPES = sorted(STRICT.config.messages.types)
VALIDATORS = {
    name: jsonschema_rs.Draft202012Validator(spec.schema_)
    for name, spec in STRICT.config.messages.types.items()
    if spec.schema_ is not None
}


@contextmanager
def connection(policy: MessagePolicy, identity: Identity = ALICE) -> Iterator[ConnectionState]:
    state = policy.open(identity, time.monotonic())
    try:
        yield state
    finally:
        policy.closed(state)


def evaluate(policy: MessagePolicy, data: str | bytes) -> Any:
    with connection(policy) as state:
        decision = policy.evaluate(state, data, time.monotonic())
    assert isinstance(decision, DECISIONS), decision
    # the internal-error close is the policy's last-resort handler for its own bugs
    assert not (isinstance(decision, Close) and decision.code == 1011), decision
    return decision


def outcome(decision: Any) -> tuple[str, str | None]:
    return type(decision).__name__, getattr(decision, "code", None)


# -- strategies ---------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)
FIELDS = ["id", "text", "room", "channel", "payload", "name", "args", "token", "extra"]
typed_objects = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=5),
)
short_text = st.text(min_size=1, max_size=64)
ids = st.none() | st.text(max_size=64) | st.integers(0, 2**53 - 1)


def _with_id(message: dict[str, Any], ident: str | int | None) -> dict[str, Any]:
    return message if ident is None else {**message, "id": ident}


valid_messages = st.one_of(
    st.builds(lambda i: _with_id({"type": "ping"}, i), ids),
    st.builds(
        lambda text, room, i: _with_id(
            {"type": "chat", "text": text, **({"room": room} if room else {})}, i
        ),
        st.text(min_size=1, max_size=300),
        st.none() | short_text,
        ids,
    ),
    st.builds(
        lambda channel, payload, i: _with_id(
            {"type": "data", "channel": channel, "payload": payload}, i
        ),
        short_text,
        st.dictionaries(
            st.text(max_size=16),
            st.none()
            | st.booleans()
            | st.integers(-(2**53), 2**53)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=256),
            max_size=32,
        ),
        ids,
    ),
)


def dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


def node_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((node_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((node_depth(v) for v in value), default=0)
    return 1


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# -- never raises, always decides --------------------------------------------------


@PROPERTY
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_with_1003_when_binary_is_off(data: bytes) -> None:
    decision = evaluate(STRICT, data)
    assert isinstance(decision, Close)
    assert decision.code == 1003


@PROPERTY
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_always_get_a_decision_when_binary_is_on(data: bytes) -> None:
    evaluate(BINARY, data)


@PROPERTY
@given(st.text(max_size=2048))
def test_arbitrary_text_always_gets_a_decision(data: str) -> None:
    decision = evaluate(STRICT, data)
    if not data.strip().startswith("{"):
        assert isinstance(decision, Refuse)
        assert decision.code in ("invalid_json", "invalid_message")


@PROPERTY
@given(json_values, st.booleans())
def test_arbitrary_json_values_always_get_a_decision(value: Any, ascii_only: bool) -> None:
    decision = evaluate(STRICT, dumps(value, ascii_only))
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        assert outcome(decision) == ("Refuse", "invalid_message")
    elif value["type"] not in TYPES:
        assert isinstance(decision, Refuse)
        assert decision.code in ("unknown_type", "invalid_message")


@PROPERTY
@given(st.one_of(typed_objects, valid_messages, json_values), st.booleans())
def test_binary_json_is_judged_like_text_when_binary_is_on(value: Any, ascii_only: bool) -> None:
    text = dumps(value, ascii_only)
    assert outcome(evaluate(BINARY, text.encode())) == outcome(evaluate(BINARY, text))


# -- what gets delivered ---------------------------------------------------------------


@PROPERTY
@given(st.one_of(typed_objects, valid_messages), st.booleans())
def test_deliver_is_allowlisted_authorized_valid_and_bounded(
    value: dict[str, Any], ascii_only: bool
) -> None:
    raw = dumps(value, ascii_only)
    decision = evaluate(STRICT, raw)
    if not isinstance(decision, Deliver):
        return
    messages = STRICT.config.messages
    assert decision.type in TYPES
    assert decision.type == decision.message["type"]
    assert set(messages.types[decision.type].scopes) <= ALICE.scopes
    assert decision.type != "auth"  # a refresh is Reauthenticate, never delivered
    assert decision.type in VALIDATORS  # every demo type has a schema
    assert VALIDATORS[decision.type].is_valid(decision.message)
    assert decision.message == json.loads(raw)
    assert decision.size == len(raw.encode())
    assert node_depth(decision.message) <= messages.max_depth
    assert all(len(s) <= messages.max_string_length for s in strings(decision.message))


@PROPERTY
@given(valid_messages, st.booleans())
def test_valid_demo_messages_are_delivered_unchanged(
    value: dict[str, Any], ascii_only: bool
) -> None:
    decision = evaluate(STRICT, dumps(value, ascii_only))
    assert isinstance(decision, Deliver), decision
    assert decision.message == value


@PROPERTY
@given(valid_messages)
def test_schema_refusals_never_echo_the_value(value: dict[str, Any]) -> None:
    poisoned = {**value, "zz_extra": "POISON-VALUE"}
    decision = evaluate(STRICT, json.dumps(poisoned))
    assert isinstance(decision, Refuse)
    assert decision.code == "invalid_message"
    assert "POISON" not in decision.message and "zz_extra" not in decision.message
    assert decision.ref == value.get("id")


@PROPERTY
@given(valid_messages)
def test_command_is_never_delivered_without_admin(value: dict[str, Any]) -> None:
    command = {"type": "command", "name": "reload"}
    if "id" in value:
        command["id"] = value["id"]
    decision = evaluate(STRICT, json.dumps(command))
    assert outcome(decision) == ("Refuse", "forbidden")
    with connection(STRICT, Identity("root", frozenset({"admin"}))) as state:
        assert isinstance(STRICT.evaluate(state, json.dumps(command), time.monotonic()), Deliver)


def test_auth_refresh_paths_are_reachable() -> None:
    same = evaluate(STRICT, json.dumps({"type": "auth", "token": make_token("alice"), "id": 1}))
    assert isinstance(same, Reauthenticate)
    assert (same.identity.subject, same.ref) == ("alice", 1)
    other = evaluate(STRICT, json.dumps({"type": "auth", "token": make_token("bob")}))
    assert isinstance(other, Close)
    assert other.code == 1008
    bad = evaluate(STRICT, json.dumps({"type": "auth", "token": "not.a.jwt", "id": "r"}))
    assert outcome(bad) == ("Refuse", "invalid_token")


# -- the structural bounds do not depend on the fast path ---------------------------------


def _nested(levels: int, kinds: list[bool]) -> Any:
    value: Any = 1
    for i in range(levels):
        value = {"a": value} if kinds[i % len(kinds)] else [value]
    return value


@PROPERTY
@given(st.integers(1, 24), st.lists(st.booleans(), min_size=1, max_size=4))
def test_depth_bound_is_the_same_with_or_without_the_slow_walk(
    levels: int, kinds: list[bool]
) -> None:
    message = {"type": "note", "v": _nested(levels, kinds)}
    plain = evaluate(LOOSE, json.dumps(message, separators=(",", ":")))
    padded = evaluate(LOOSE, json.dumps(dict([PAD], **message), separators=(",", ":")))
    assert outcome(plain) == outcome(padded)


@PROPERTY
@given(st.integers(0, 400))
def test_array_bound_is_the_same_with_or_without_the_slow_walk(items: int) -> None:
    message = {"type": "note", "v": [0] * items}
    plain = evaluate(LOOSE, json.dumps(message, separators=(",", ":")))
    padded = evaluate(LOOSE, json.dumps(dict([PAD], **message), separators=(",", ":")))
    assert outcome(plain) == outcome(padded)


def test_every_generated_type_is_in_the_config() -> None:
    assert set(TYPES) == set(DEMO_MESSAGE_TYPES)
    assert isinstance(STRICT.config, Config)


# -- the worst messages within the size limit: refused or bounded without a Python walk --


def _judge(policy: MessagePolicy, raw: str) -> Any:
    state = policy.open(Identity(subject="alice", scopes=frozenset({"chat"})), time.monotonic())
    return policy.evaluate(state, raw, time.monotonic())


def test_too_many_objects_and_arrays_are_refused_before_decoding() -> None:
    many = '{"type":"note","v":[' + ",".join(["{}"] * 300) + "]}"
    decision = _judge(LOOSE, many)
    assert isinstance(decision, Refuse)
    assert (decision.code, decision.message) == (
        "invalid_message",
        "Message has too many objects and arrays.",
    )
    # refused from the raw count even when the rest would not even parse
    assert _judge(LOOSE, many[:-2]).message == "Message has too many objects and arrays."
    # brackets inside strings are text, not structure
    text = '{"type":"note","v":"' + "{[" * 300 + '"}'
    assert isinstance(_judge(LOOSE, text), Deliver)


def test_long_strings_are_found_whatever_the_raw_bytes_look_like() -> None:
    policy = _policy({"messages": {"types": {"note": {}}, "max_string_length": 100}})
    escaped = '{"type":"note","v":"' + 'ab\\"' * 40 + '"}'  # 120 characters, escaped quotes
    assert _judge(policy, escaped).message == "Message has a string that is too long."
    key = '{"type":"note","' + "k" * 101 + '":1}'
    assert _judge(policy, key).message == "Message has a string that is too long."
    many_short = '{"type":"note","v":[' + ",".join(['"' + "x" * 90 + '"'] * 50) + "]}"
    assert isinstance(_judge(policy, many_short), Deliver)


def test_integers_are_bounded_to_64_bits_wherever_the_digits_are() -> None:
    fits = '{"type":"note","v":[9223372036854775807,-9223372036854775808]}'
    assert isinstance(_judge(LOOSE, fits), Deliver)
    over = '{"type":"note","v":[1,9223372036854775808]}'
    assert _judge(LOOSE, over).message == "Message has a number that is too large."
    in_text = '{"type":"note","v":"12345678901234567890123"}'
    assert isinstance(_judge(LOOSE, in_text), Deliver)


def test_a_large_message_that_fails_its_schema_is_refused_without_describing_it() -> None:
    """Describing a schema error converts the failing value (the whole message for a
    missing key): a message of many values gets the refusal without the pointer."""
    big = '{"type":"chat","a":[' + ",".join(["[" + ",".join(["0"] * 250) + "]"] * 15) + "]}"
    decision = _judge(STRICT, big)
    assert isinstance(decision, Refuse)
    assert (decision.code, decision.message, decision.pointer) == (
        "invalid_message",
        "Invalid message (schema).",
        None,
    )
    small = _judge(STRICT, '{"type":"chat","text":""}')
    assert (small.code, small.pointer) == ("invalid_message", "/text")


# -- counting containers before decoding: linear in the message -----------------------

hostile_pieces = st.sampled_from([b'"', b"\\", b'\\"', b"\\\n", b"[", b"{", b"a", b"\n"])


@PROPERTY
@given(st.lists(hostile_pieces, max_size=200).map(b"".join))
def test_every_string_match_that_starts_at_a_quote_succeeds(raw: bytes) -> None:
    """Brackets inside strings do not count toward ``messages.max_containers``; strings are
    stripped by a pattern whose every attempt at a quote succeeds (an unclosed string runs
    to the end), so stripping is one pass. A pattern that fails at an unclosed quote is
    retried at every later quote: quadratic, and one hostile 64 KiB frame held the event
    loop for seconds."""
    for at in (i for i, byte in enumerate(raw) if byte == 0x22):
        assert _STRING.match(raw, at) is not None, (raw, at)


@PROPERTY
@given(json_values)
def test_stripping_strings_leaves_the_brackets_of_the_containers(value: Any) -> None:
    raw = json.dumps(value).encode()
    stripped = _STRING.sub(b'""', raw)

    def containers(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + sum(containers(x) for x in v.values())
        if isinstance(v, list):
            return 1 + sum(containers(x) for x in v)
        return 0

    assert stripped.count(b"{") + stripped.count(b"[") == containers(value)


def test_a_hostile_unclosed_string_is_refused_from_the_count() -> None:
    """Over ``max_containers`` brackets then an unclosed string of escaped quotes, up to
    the size limit: counted in one pass and refused before decoding."""
    raw = b"[" * 257 + b'"\\' * 3900
    assert len(raw) <= 8192
    assert outcome(evaluate(STRICT, raw.decode())) == ("Refuse", "invalid_message")


@pytest.mark.parametrize("message", ['{"type":"auth"}', '{"type":"auth","token":5}'])
def test_a_refresh_without_a_token_string_is_refused_under_any_auth_schema(message: str) -> None:
    """An ``auth`` type configured without a schema (to give it scopes, say) still gets
    the refresh's answer to a message with no token: ``invalid_token``, never an internal
    error."""
    policy = _policy({"messages": {"types": {**DEMO_MESSAGE_TYPES, "auth": {}}}})
    assert outcome(evaluate(policy, message)) == ("Refuse", "invalid_token")
