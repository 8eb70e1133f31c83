"""``messages.format = "opaque"``: the policy for a gateway in front of a non-JSON protocol.

Frames are not parsed: size (at the frame layer), binary, and the message and byte
rates still apply; the JSON checks (type allowlist, schemas, scopes) do not.
"""

from __future__ import annotations

import pytest

from conftest import SECRET, make_config
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.decisions import Close, Deliver, Refuse
from wsguard.core.identity import Identity
from wsguard.core.messages import OPAQUE_TYPE, MessagePolicy
from wsguard.errors import ConfigError


def policy(**messages: object) -> MessagePolicy:
    config = make_config({"messages": {"format": "opaque", **messages}})
    return MessagePolicy(config, TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode())))


def test_any_text_is_delivered_unparsed() -> None:
    p = policy()
    state = p.open(Identity("alice"), 0.0)
    for text in ("not json", "{bad", '{"type":"command"}', "\u00e9t\u00e9"):
        decision = p.evaluate(state, text, 0.0)
        assert isinstance(decision, Deliver), text
        assert decision.type == OPAQUE_TYPE
        assert decision.size == len(text.encode())
    assert p.type_names() == [OPAQUE_TYPE]


def test_binary_needs_messages_binary() -> None:
    refused = policy()
    state = refused.open(Identity("alice"), 0.0)
    closed = refused.evaluate(state, b"\x00\x01", 0.0)
    assert isinstance(closed, Close)
    assert closed.code == 1003
    allowed = policy(binary=True)
    state = allowed.open(Identity("alice"), 0.0)
    assert isinstance(allowed.evaluate(state, b"\x00\x01", 0.0), Deliver)


def test_opaque_binary_type_does_not_allow_binary_frames() -> None:
    refused = policy(binary=False, types={"blob": {"binary": True}})
    state = refused.open(Identity("alice"), 0.0)
    closed = refused.evaluate(state, b"\x00\x01", 0.0)
    assert isinstance(closed, Close), closed
    assert closed.code == 1003
    assert isinstance(refused.evaluate(state, "text passes unparsed", 0.0), Deliver)
    allowed = policy(binary=True, types={"blob": {"binary": True}})
    state = allowed.open(Identity("alice"), 0.0)
    assert isinstance(allowed.evaluate(state, b"\x00\x01", 0.0), Deliver)


def test_rates_still_apply() -> None:
    config = make_config(
        {"messages": {"format": "opaque"}, "limits": {"message_burst": 2, "messages_per_minute": 1}}
    )
    p = MessagePolicy(config, TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode())))
    state = p.open(Identity("alice"), 0.0)
    outcomes = [p.evaluate(state, "x", 0.0) for _ in range(3)]
    assert [type(o) for o in outcomes] == [Deliver, Deliver, Refuse]
    refused = outcomes[2]
    assert isinstance(refused, Refuse)
    assert refused.code == "rate_limited"


def test_signed_session_keys_need_json() -> None:
    with pytest.raises(ConfigError) as error:
        make_config({"messages": {"format": "opaque"}, "signing": {"session_keys": True}})
    assert error.value.key == "signing.session_keys"
