"""Which texts name ``type`` twice in their top-level object: what the ASGI middleware
refuses (a parser keeping the first value would read another type than the one checked),
found cheaply for the usual shapes and exactly for every shape."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsguard.core.duplicate_keys import names_type_twice

TWICE = [
    '{"type":"command","type":"chat","text":"x"}',
    '{"type":"command","\\u0074ype":"chat"}',  # an escape spelling the key
    '{"\\u0074\\u0079\\u0070\\u0065":"command","type":"chat"}',
    '{"type" : "command", "type"\n:"chat"}',  # whitespace before the colon
    '{"type":"command","x":{"type":1},"type":"chat"}',
]
ONCE = [
    '{"type":"chat","text":"hi"}',
    '{"type":"data","payload":{"type":"point","items":[{"type":1},{"type":2}]}}',
    '{"a":{"type":1,"type":2},"type":"x"}',  # twice, but in a nested object
    '{"type":"chat","text":"\\"type\\": 1, \\"type\\": 2"}',  # inside a string
    '{"type":"chat","room":"type","text":"type"}',  # as values
    '{"type":"chat","text":"caf\\u00e9"}',
]


@pytest.mark.parametrize("text", TWICE)
def test_a_type_named_twice_at_the_top_is_found(text: str) -> None:
    message = msgspec.json.decode(text)
    assert names_type_twice(text, message)
    assert names_type_twice(text.encode(), message)


@pytest.mark.parametrize("text", ONCE)
def test_a_type_named_once_at_the_top_is_not(text: str) -> None:
    message = msgspec.json.decode(text)
    assert not names_type_twice(text, message)
    assert not names_type_twice(text.encode(), message)


KEYS = st.sampled_from(["type", "text", "x", "t\\u0079pe", "\\u0074ype"])
VALUES = st.recursive(
    st.integers(0, 9) | st.sampled_from(["type", '"type":', "a"]),
    lambda inner: (
        st.lists(st.tuples(KEYS, inner), max_size=4).map(lambda p: ("obj", p))
        | st.lists(inner, max_size=3)
    ),
    max_leaves=12,
)


def _text(value: object) -> str:
    if isinstance(value, tuple) and value[0] == "obj":
        pairs = value[1]
        assert isinstance(pairs, list)
        return "{" + ",".join(f'"{k}":{_text(v)}' for k, v in pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return json.dumps(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=5))
def test_the_cheap_answer_is_the_exact_one(pairs: list[tuple[str, object]]) -> None:
    """Against a parse that keeps every pair: any key order, escapes, nesting, values."""
    text = _text(("obj", pairs))
    top: list[list[tuple[str, object]]] = []

    def keep(found: list[tuple[str, object]]) -> dict[str, object]:
        top.append(found)
        return dict(found)

    json.loads(text, object_pairs_hook=keep)
    exact = sum(key == "type" for key, _ in top[-1]) > 1
    assert names_type_twice(text, msgspec.json.decode(text)) is exact, text
