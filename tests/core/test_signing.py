"""Signed messages (issue 4): HMAC-SHA256 envelope with nonce, timestamp and replay store.

Integration tests drive the real server with real clients (per-client keys from a
keys file, key rotation, per-connection session keys, violation budget); unit tests
pin the canonical form with fixed vectors, an independently computed HMAC, the
configuration checks and the bounded memory nonce store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from conftest import SECRET, RunningServer, ServerFactory, make_config, make_token
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.core.integrity import (
    SESSION_KID,
    CanonicalError,
    SignatureVerifier,
    SigningKey,
    Verified,
    canonical,
    nonce_key,
    sign,
    signature,
)
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.guard import Guard
from wsguard.observability.audit import AuditLog
from wsguard.stores.memory import MemoryStore

ALICE_SECRET = bytes(range(32))
ALICE_NEW_SECRET = bytes(range(100, 132))
BOB_SECRET = bytes(range(50, 82))
WINDOW = 30
ENVELOPE = ("kid", "nonce", "ts", "sig")

SIGNED_CHAT: dict[str, Any] = {
    **DEMO_MESSAGE_TYPES,
    "chat": {**DEMO_MESSAGE_TYPES["chat"], "signed": True},
}
# room for the few dozen messages a test sends on one connection
ROOMY_LIMITS: dict[str, Any] = {"messages_per_minute": 6000, "message_burst": 200}


# -- helpers -------------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def write_keys(path: Path, entries: list[tuple[str, str, bytes]], mode: int = 0o600) -> Path:
    document = {"keys": [{"kid": k, "subject": s, "secret": b64url(v)} for k, s, v in entries]}
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=5))
    assert isinstance(frame, dict)
    return frame


def fresh_nonce() -> str:
    return secrets.token_urlsafe(16)  # 22 base64url characters, 128 bits


def signed_chat(
    text: str,
    *,
    kid: str,
    secret: bytes,
    msg_id: str | int,
    ts: int | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    return sign(
        {"type": "chat", "text": text, "id": msg_id},
        kid=kid,
        secret=secret,
        nonce=nonce if nonce is not None else fresh_nonce(),
        ts=ts if ts is not None else int(time.time()),
    )


def resign(message: dict[str, Any], secret: bytes) -> dict[str, Any]:
    """A correct signature over *message* exactly as given (even a broken envelope)."""
    out = {k: v for k, v in message.items() if k != "sig"}
    out["sig"] = signature(secret, out)
    return out


def broadcast_of(message: dict[str, Any], sender: str = "alice") -> dict[str, Any]:
    body = {k: v for k, v in message.items() if k not in ENVELOPE}
    return {"type": "broadcast", "from": sender, "message": body}


def expect_error(ws: ClientConnection, code: str, ref: str | int) -> dict[str, Any]:
    frame = recv_json(ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["ref"] == ref, frame
    return frame


def assert_only_next_delivered(
    sender: ClientConnection, receiver: ClientConnection, secret: bytes, kid: str
) -> None:
    """Prove nothing was delivered before: the receiver's next frame is a fresh message."""
    marker = signed_chat("marker", kid=kid, secret=secret, msg_id="marker")
    sender.send(json.dumps(marker))
    assert recv_json(receiver) == broadcast_of(marker)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(
        tmp_path / "signing-keys.json",
        [("alice-1", "alice", ALICE_SECRET), ("bob-1", "bob", BOB_SECRET)],
    )


@pytest.fixture
def keyed(server_factory: ServerFactory, keys_file: Path) -> RunningServer:
    """Demo server whose ``chat`` is signed with per-client keys from a keys file."""
    return server_factory(
        {
            "messages": {"types": SIGNED_CHAT},
            "signing": {"keys_file": str(keys_file), "window_seconds": WINDOW},
            "limits": ROOMY_LIMITS,
        }
    )


# -- per-client keys ------------------------------------------------------------------


def test_signed_chat_is_delivered_without_envelope(keyed: RunningServer) -> None:
    with (
        keyed.connect(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        welcome = recv_json(alice)
        assert welcome["type"] == "welcome"
        assert "signing" not in welcome  # no session keys configured
        message = signed_chat("hello", kid="alice-1", secret=ALICE_SECRET, msg_id="m1")
        alice.send(json.dumps(message))
        got = recv_json(bob)
    assert got == {
        "type": "broadcast",
        "from": "alice",
        "message": {"type": "chat", "text": "hello", "id": "m1"},
    }
    assert not set(ENVELOPE) & set(got["message"])


def test_a_signed_message_naming_a_key_twice_is_refused(keyed: RunningServer) -> None:
    """RFC 8785 signs I-JSON only: a text with two values for one key (the signature
    over the last one, which the policy keeps) would be another message to a parser that
    keeps the first; refused (invalid_message), never delivered, on every host."""
    message = signed_chat("ten", kid="alice-1", secret=ALICE_SECRET, msg_id="d1")
    body = json.dumps(message)
    doubled = body.replace('"text": "ten"', '"text": "a million", "text": "ten"', 1)
    assert doubled != body
    with (
        keyed.connect(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        recv_json(alice)  # the welcome
        alice.send(doubled)
        error = expect_error(alice, "invalid_message", "d1")
        assert error["message"] == "Message has duplicate keys."
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "text": lambda m: m.update(text="hellp"),
    "id": lambda m: m.update(id="m2"),
    "added_field": lambda m: m.update(room="general"),
    "removed_field": lambda m: m.pop("text"),
    "ts_plus_one": lambda m: m.update(ts=m["ts"] + 1),
    "nonce_char": lambda m: m.update(nonce=("B" if m["nonce"][0] != "B" else "C") + m["nonce"][1:]),
    "kid_other_alice_key": lambda m: m.update(kid="alice-2"),
    "sig_char": lambda m: m.update(sig=m["sig"][:-1] + ("A" if m["sig"][-1] != "A" else "B")),
    "text_type": lambda m: m.update(text=["hello"]),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_message_is_refused_and_not_delivered(
    server_factory: ServerFactory, tmp_path: Path, tamper: str
) -> None:
    keys = write_keys(
        tmp_path / "keys.json",
        [("alice-1", "alice", ALICE_SECRET), ("alice-2", "alice", ALICE_NEW_SECRET)],
    )
    running = server_factory(
        {"messages": {"types": SIGNED_CHAT}, "signing": {"keys_file": str(keys)}}
    )
    with (
        running.connect_welcomed(make_token("alice")) as alice,
        running.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat("hello", kid="alice-1", secret=ALICE_SECRET, msg_id="t1")
        TAMPERS[tamper](message)
        alice.send(json.dumps(message))
        frame = expect_error(alice, "bad_signature", message["id"])
        assert frame["message"] == "Missing or invalid message signature."
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


def _drop(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(message: dict[str, Any]) -> dict[str, Any]:
        return resign({k: v for k, v in message.items() if k != field}, ALICE_SECRET)

    return build


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(message: dict[str, Any]) -> dict[str, Any]:
        return resign({**message, field: value}, ALICE_SECRET)

    return build


# each broken envelope carries a signature that is correct for exactly what is sent,
# so only the envelope rule can be the reason for the refusal
BROKEN_ENVELOPES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "missing_sig": lambda m: {k: v for k, v in m.items() if k != "sig"},
    "missing_nonce": _drop("nonce"),
    "missing_ts": _drop("ts"),
    "missing_kid": lambda m: {k: v for k, v in m.items() if k != "kid"},
    "nonce_15_chars": _set("nonce", "A" * 15),
    "nonce_65_chars": _set("nonce", "A" * 65),
    "nonce_not_base64url_plus": _set("nonce", "AAAAAAAA+AAAAAAAAAAA"),
    "nonce_not_base64url_padding": _set("nonce", "AAAAAAAAAAAAAAAAAAA="),
    "nonce_not_a_string": _set("nonce", 1234567890123456),
    "ts_as_string": lambda m: resign({**m, "ts": str(m["ts"])}, ALICE_SECRET),
    "ts_as_bool": _set("ts", True),
    "ts_as_float": lambda m: {**m, "ts": m["ts"] + 0.5},
    "sig_not_a_string": lambda m: {**m, "sig": 7},
    "sig_too_long": lambda m: {**m, "sig": "A" * 200},
    "sig_empty": lambda m: {**m, "sig": ""},
    "unsafe_integer_field": lambda m: {**m, "big": 2**60},
}


@pytest.mark.parametrize("broken", sorted(BROKEN_ENVELOPES))
def test_broken_envelope_is_bad_signature(keyed: RunningServer, broken: str) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = BROKEN_ENVELOPES[broken](
            signed_chat("hello", kid="alice-1", secret=ALICE_SECRET, msg_id=f"b-{broken}")
        )
        alice.send(json.dumps(message))
        expect_error(alice, "bad_signature", f"b-{broken}")
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


def test_replay_is_refused_and_delivered_once(keyed: RunningServer) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat("pay 10", kid="alice-1", secret=ALICE_SECRET, msg_id=7)
        raw = json.dumps(message)
        alice.send(raw)
        assert recv_json(bob) == broadcast_of(message)
        alice.send(raw)
        frame = expect_error(alice, "replayed", 7)
        assert frame["message"] == "Message was already received."
        # the same bytes with the keys in another order are the same message: still a replay
        alice.send(json.dumps(dict(reversed(list(message.items())))))
        expect_error(alice, "replayed", 7)
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


def test_replay_on_another_connection_of_the_same_subject_is_refused(
    keyed: RunningServer,
) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as first,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat("once", kid="alice-1", secret=ALICE_SECRET, msg_id="r1")
        first.send(json.dumps(message))
        assert recv_json(bob) == broadcast_of(message)
        with keyed.connect_welcomed(make_token("alice")) as second:
            second.send(json.dumps(message))
            expect_error(second, "replayed", "r1")
            assert_only_next_delivered(second, bob, ALICE_SECRET, "alice-1")


def test_captured_message_replayed_by_another_subject_is_bad_signature(
    keyed: RunningServer,
) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat("mine", kid="alice-1", secret=ALICE_SECRET, msg_id="c1")
        bob.send(json.dumps(message))  # alice's key only verifies alice's connections
        expect_error(bob, "bad_signature", "c1")
        alice.send(json.dumps(message))  # the nonce was not burnt by bob's attempt
        assert recv_json(bob) == broadcast_of(message)


@pytest.mark.parametrize(("offset", "code"), [(-(WINDOW + 60), "stale"), (WINDOW + 60, "stale")])
def test_timestamp_outside_window_is_stale(keyed: RunningServer, offset: int, code: str) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat(
            "late", kid="alice-1", secret=ALICE_SECRET, msg_id="s1", ts=int(time.time()) + offset
        )
        alice.send(json.dumps(message))
        frame = expect_error(alice, code, "s1")
        assert frame["message"] == "Message signature is too old."
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


@pytest.mark.parametrize("offset", [-(WINDOW - 10), WINDOW - 10])
def test_timestamp_inside_window_is_accepted(keyed: RunningServer, offset: int) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat(
            "ok", kid="alice-1", secret=ALICE_SECRET, msg_id="w1", ts=int(time.time()) + offset
        )
        alice.send(json.dumps(message))
        assert recv_json(bob) == broadcast_of(message)


def test_key_of_another_subject_is_bad_signature(keyed: RunningServer) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        # a perfect signature with bob's key, but the connection is alice's
        message = signed_chat("as bob", kid="bob-1", secret=BOB_SECRET, msg_id="k1")
        alice.send(json.dumps(message))
        expect_error(alice, "bad_signature", "k1")
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")
        # and bob's own connection accepts it
        bob.send(json.dumps(message))
        assert recv_json(alice) == broadcast_of(message, sender="bob")


@pytest.mark.parametrize("kid", ["alice-9", "", SESSION_KID, "ALICE-1"])
def test_unknown_kid_is_bad_signature(keyed: RunningServer, kid: str) -> None:
    with (
        keyed.connect_welcomed(make_token("alice")) as alice,
        keyed.connect_welcomed(make_token("bob")) as bob,
    ):
        message = signed_chat("who", kid=kid, secret=ALICE_SECRET, msg_id="u1")
        alice.send(json.dumps(message))
        expect_error(alice, "bad_signature", "u1")
        assert_only_next_delivered(alice, bob, ALICE_SECRET, "alice-1")


def test_scopes_are_checked_before_signature_and_schema_after(
    server_factory: ServerFactory, keys_file: Path
) -> None:
    types = {**SIGNED_CHAT, "command": {**DEMO_MESSAGE_TYPES["command"], "signed": True}}
    running = server_factory(
        {"messages": {"types": types}, "signing": {"keys_file": str(keys_file)}}
    )
    with running.connect_welcomed(make_token("alice", scopes="chat")) as alice:
        command = sign(
            {"type": "command", "name": "reload", "id": "o1"},
            kid="alice-1",
            secret=ALICE_SECRET,
            nonce=fresh_nonce(),
            ts=int(time.time()),
        )
        alice.send(json.dumps({**command, "sig": "x"}))
        expect_error(alice, "forbidden", "o1")  # not bad_signature: no scope, no verification
        wrong_type = sign(
            {"type": "chat", "text": 42, "id": "o2"},
            kid="alice-1",
            secret=ALICE_SECRET,
            nonce=fresh_nonce(),
            ts=int(time.time()),
        )
        alice.send(json.dumps(wrong_type))
        frame = expect_error(alice, "invalid_message", "o2")
        assert frame["pointer"] == "/text"


# -- key rotation -------------------------------------------------------------------------


def test_key_rotation_old_and_new_key_then_old_removed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    keys = write_keys(
        tmp_path / "rotating.json",
        [("alice-old", "alice", ALICE_SECRET), ("alice-new", "alice", ALICE_NEW_SECRET)],
    )
    overrides = {"messages": {"types": SIGNED_CHAT}, "signing": {"keys_file": str(keys)}}
    during = server_factory(overrides)
    with (
        during.connect_welcomed(make_token("alice")) as alice,
        during.connect_welcomed(make_token("bob")) as bob,
    ):
        for kid, secret in (("alice-old", ALICE_SECRET), ("alice-new", ALICE_NEW_SECRET)):
            message = signed_chat(f"via {kid}", kid=kid, secret=secret, msg_id=kid)
            alice.send(json.dumps(message))
            assert recv_json(bob) == broadcast_of(message)
    during.stop()

    write_keys(keys, [("alice-new", "alice", ALICE_NEW_SECRET)])
    after = server_factory(overrides)
    with (
        after.connect_welcomed(make_token("alice")) as alice,
        after.connect_welcomed(make_token("bob")) as bob,
    ):
        old = signed_chat("old key", kid="alice-old", secret=ALICE_SECRET, msg_id="old")
        alice.send(json.dumps(old))
        expect_error(alice, "bad_signature", "old")
        new = signed_chat("new key", kid="alice-new", secret=ALICE_NEW_SECRET, msg_id="new")
        alice.send(json.dumps(new))
        assert recv_json(bob) == broadcast_of(new)


# -- session keys ---------------------------------------------------------------------------


def _session_server(server_factory: ServerFactory) -> RunningServer:
    return server_factory(
        {
            "messages": {"types": SIGNED_CHAT},
            "signing": {"session_keys": True, "window_seconds": WINDOW},
        }
    )


def _session_key(welcome: dict[str, Any]) -> bytes:
    signing = welcome["signing"]
    assert set(signing) == {"kid", "key", "window_seconds"}
    assert signing["kid"] == SESSION_KID
    assert signing["window_seconds"] == WINDOW
    key = signing["key"]
    assert isinstance(key, str) and "=" not in key
    raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    assert len(raw) == 32
    return raw


def test_session_key_in_welcome_signs_messages(server_factory: ServerFactory) -> None:
    running = _session_server(server_factory)
    with (
        running.connect(make_token("alice")) as alice,
        running.connect_welcomed(make_token("bob")) as bob,
    ):
        key = _session_key(recv_json(alice))
        message = signed_chat("session", kid=SESSION_KID, secret=key, msg_id="s1")
        alice.send(json.dumps(message))
        assert recv_json(bob) == broadcast_of(message)
        alice.send(json.dumps(message))
        expect_error(alice, "replayed", "s1")


def test_session_keys_differ_per_connection_and_do_not_cross(
    server_factory: ServerFactory,
) -> None:
    running = _session_server(server_factory)
    with (
        running.connect(make_token("alice")) as first,
        running.connect(make_token("alice")) as second,
        running.connect_welcomed(make_token("bob")) as bob,
    ):
        key_first = _session_key(recv_json(first))
        key_second = _session_key(recv_json(second))
        assert key_first != key_second
        # the same subject, but the other connection's key
        message = signed_chat("cross", kid=SESSION_KID, secret=key_second, msg_id="x1")
        first.send(json.dumps(message))
        expect_error(first, "bad_signature", "x1")
        own = signed_chat("own", kid=SESSION_KID, secret=key_first, msg_id="x2")
        first.send(json.dumps(own))
        assert recv_json(bob) == broadcast_of(own)


# -- violation budget ---------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["bad_signature", "stale", "replayed"])
def test_signature_failures_spend_violation_budget(
    server_factory: ServerFactory, keys_file: Path, failure: str
) -> None:
    running = server_factory(
        {
            "messages": {"types": SIGNED_CHAT},
            "signing": {"keys_file": str(keys_file), "window_seconds": WINDOW},
            "limits": {"violation_budget": 3, "violation_decay_seconds": 3600},
        }
    )

    def bad(i: int) -> dict[str, Any]:
        if failure == "bad_signature":
            return {**signed_chat("x", kid="alice-1", secret=ALICE_SECRET, msg_id=i), "text": "y"}
        if failure == "stale":
            ts = int(time.time()) - 10 * WINDOW
            return signed_chat("x", kid="alice-1", secret=ALICE_SECRET, msg_id=i, ts=ts)
        return original

    original = signed_chat("x", kid="alice-1", secret=ALICE_SECRET, msg_id=0)
    with running.connect_welcomed(make_token("alice")) as alice:
        if failure == "replayed":
            alice.send(json.dumps(original))  # delivered once (nobody else listens)
        for i in range(3):
            alice.send(json.dumps(bad(i)))
            expect_error(alice, failure, 0 if failure == "replayed" else i)
        alice.send(json.dumps(bad(3)))
        with pytest.raises(ConnectionClosed) as closed:
            alice.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    deadline = time.monotonic() + 5
    while not running.audit.events("connection_closed") and time.monotonic() < deadline:
        running.call(lambda: None)  # one turn of the server's loop per poll
    [event] = running.audit.events("connection_closed")
    assert event["cause"] == failure


# -- unsigned types and configuration -------------------------------------------------------


def test_unsigned_types_are_unaffected(keyed: RunningServer, server: RunningServer) -> None:
    with keyed.connect_welcomed(make_token("alice")) as alice:
        alice.send(json.dumps({"type": "ping", "id": "p1"}))  # ping is not signed
        assert recv_json(alice)["type"] == "pong"
        alice.send(json.dumps({"type": "chat", "text": "plain", "id": "p2"}))
        expect_error(alice, "bad_signature", "p2")  # chat is signed on this server
    # where chat is not signed, plain chat passes and envelope fields are not stripped
    with (
        server.connect_welcomed(make_token("alice")) as alice,
        server.connect_welcomed(make_token("bob")) as bob,
    ):
        plain = {"type": "chat", "text": "plain", "id": "p3"}
        alice.send(json.dumps(plain))
        assert recv_json(bob) == {"type": "broadcast", "from": "alice", "message": plain}
        enveloped = signed_chat("env", kid="alice-1", secret=ALICE_SECRET, msg_id="p4")
        alice.send(json.dumps(enveloped))
        frame = expect_error(alice, "invalid_message", "p4")  # additionalProperties: false
        assert frame["pointer"] == ""


def test_signed_type_without_keys_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"messages": {"types": SIGNED_CHAT}})
    assert info.value.key == "signing.keys_file"
    assert "chat" in str(info.value)
    # either source of keys makes the configuration valid
    assert make_config(
        {"messages": {"types": SIGNED_CHAT}, "signing": {"session_keys": True}}
    ).signing.session_keys


def test_opaque_format_with_a_signed_type_is_a_config_error(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys.json", [("alice-1", "alice", ALICE_SECRET)])
    signing = {"keys_file": str(keys)}
    make_config({"messages": {"types": SIGNED_CHAT}, "signing": signing})  # fine with json
    with pytest.raises(ConfigError) as caught:
        make_config({"messages": {"format": "opaque", "types": SIGNED_CHAT}, "signing": signing})
    assert caught.value.key == "messages.format"
    assert "chat" in caught.value.message


def _guard(overrides: dict[str, Any]) -> Guard:
    return Guard(make_config(overrides), audit=AuditLog(io.StringIO()))


def test_keys_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "k.json", [("a", "alice", ALICE_SECRET)], mode=0o644)
    overrides = {"messages": {"types": SIGNED_CHAT}, "signing": {"keys_file": str(keys)}}
    with pytest.raises(KeyLoadError) as info:
        _guard(overrides)
    assert info.value.key == "signing.keys_file"
    assert "chmod 600" in info.value.message
    keys.chmod(0o600)
    assert _guard(overrides).messages.signatures is not None


@pytest.mark.parametrize("size", [0, 16, 31])
def test_short_signing_secret_is_refused(tmp_path: Path, size: int) -> None:
    keys = write_keys(tmp_path / "k.json", [("a", "alice", b"\x01" * size)])
    overrides = {"messages": {"types": SIGNED_CHAT}, "signing": {"keys_file": str(keys)}}
    with pytest.raises(KeyLoadError) as info:
        _guard(overrides)
    assert info.value.key == "signing.keys_file"
    write_keys(keys, [("a", "alice", b"\x01" * 32)])
    _guard(overrides)  # exactly 32 bytes is enough


# -- canonical form (unit) ----------------------------------------------------------------


CANONICAL_VECTORS: list[tuple[dict[str, Any], bytes]] = [
    # README example: keys sorted, no whitespace
    (
        {
            "type": "chat",
            "text": "hi",
            "kid": "k1",
            "nonce": "AAAAAAAAAAAAAAAAAAAAAA",
            "ts": 1700000000,
        },
        b'{"kid":"k1","nonce":"AAAAAAAAAAAAAAAAAAAAAA","text":"hi","ts":1700000000,"type":"chat"}',
    ),
    # UTF-16 code unit order: U+1F600 (D83D DE00) sorts before U+FFFD, unlike code points;
    # upper case before lower case; a prefix before its extensions
    (
        {"\ufffd": 1, "\U0001f600": 2, "a": 3, "B": 4, "aa": 5, "\u00e9": 6},
        '{"B":4,"a":3,"aa":5,"\u00e9":6,"\U0001f600":2,"\ufffd":1}'.encode(),
    ),
    (
        {"\uff61": 0, "\U00010000": 1, "\ud7ff": 2},
        '{"\ud7ff":2,"\U00010000":1,"\uff61":0}'.encode(),
    ),
    # string escaping as JSON.stringify: short escapes, other controls as lower-case \u00xx,
    # DEL, "/" and non-ASCII (incl. U+2028) as themselves in UTF-8
    (
        {"s": '\b\t\n\f\r"\\'},
        b'{"s":"\\b\\t\\n\\f\\r\\"\\\\"}',
    ),
    (
        {"s": "\x00\x01\x0b\x0e\x1b\x1f"},
        b'{"s":"\\u0000\\u0001\\u000b\\u000e\\u001b\\u001f"}',
    ),
    (
        {"s": "\x7f/\u00e9\u2028\u20ac\U0001f600"},
        b'{"s":"\x7f/\xc3\xa9\xe2\x80\xa8\xe2\x82\xac\xf0\x9f\x98\x80"}',
    ),
    ({"k\n": "v"}, b'{"k\\n":"v"}'),
    # nested objects sorted at every depth, arrays keep their order
    (
        {"z": {"b": [3, {"y": None, "x": True}], "a": []}, "m": [{}, [], "s", False]},
        b'{"m":[{},[],"s",false],"z":{"a":[],"b":[3,{"x":true,"y":null}]}}',
    ),
    # integers, booleans, null; booleans are never written as numbers
    (
        {"i": [0, -1, 42, 2**53 - 1, -(2**53 - 1)], "t": True, "f": False, "n": None},
        b'{"f":false,"i":[0,-1,42,9007199254740991,-9007199254740991],"n":null,"t":true}',
    ),
    # only the top-level sig is left out; a nested one is signed
    ({"sig": "x", "a": {"sig": "y"}}, b'{"a":{"sig":"y"}}'),
    ({}, b"{}"),
]


@pytest.mark.parametrize(("message", "expected"), CANONICAL_VECTORS)
def test_canonical_vectors(message: dict[str, Any], expected: bytes) -> None:
    assert canonical(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        {"x": 1.0},
        {"x": 0.5},
        {"x": [1, {"y": 2.5}]},
        {"x": 2**53},
        {"x": -(2**53)},
        {"x": [10**20]},
        {"x": b"bytes"},
        {"x": (1, 2)},
    ],
)
def test_canonical_rejects_values_without_interoperable_form(message: dict[str, Any]) -> None:
    with pytest.raises(CanonicalError):
        canonical(message)


@pytest.mark.parametrize("extra", [{"t": "\ud800"}, {"\udc00": 1}, {"n": {1: "x"}}])
def test_values_without_canonical_form_are_canonical_errors(extra: dict[Any, Any]) -> None:
    verifier = SignatureVerifier(
        {"k1": SigningKey("k1", "alice", ALICE_SECRET)},
        window=WINDOW,
        max_nonce=64,
        clock=time.time,
    )
    message = {"kid": "k1", "nonce": "N" * 16, "ts": int(time.time()), "sig": "A" * 43, **extra}
    try:
        outcome: Any = verifier.check(message, "alice", None)
    except Exception as exc:  # the documented contract: a code, never an exception
        outcome = type(exc).__name__
    assert outcome == "bad_signature"
    with pytest.raises(CanonicalError):
        canonical(extra)


def test_hmac_vector_matches_an_independent_computation() -> None:
    secret = b"k" * 32
    message = {
        "type": "chat",
        "text": "hi",
        "kid": "k1",
        "nonce": "AAAAAAAAAAAAAAAAAAAAAA",
        "ts": 1700000000,
    }
    signed_bytes = (
        b'{"kid":"k1","nonce":"AAAAAAAAAAAAAAAAAAAAAA","text":"hi","ts":1700000000,"type":"chat"}'
    )
    digest = hmac.new(secret, signed_bytes, hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert len(expected) == 43
    assert signature(secret, message) == expected
    assert signature(secret, {**message, "sig": "ignored"}) == expected
    signed = sign(
        {"type": "chat", "text": "hi"},
        kid="k1",
        secret=secret,
        nonce="AAAAAAAAAAAAAAAAAAAAAA",
        ts=1700000000,
    )
    assert signed == {**message, "sig": expected}


def test_verifier_outcomes_with_a_fixed_clock() -> None:
    now = 1_700_000_000
    verifier = SignatureVerifier(
        {"k1": SigningKey("k1", "alice", ALICE_SECRET)},
        window=WINDOW,
        max_nonce=64,
        clock=lambda: float(now),
    )
    nonce = "N" * 16
    ok = sign({"type": "chat"}, kid="k1", secret=ALICE_SECRET, nonce=nonce, ts=now + WINDOW)
    outcome = verifier.check(ok, "alice", None)
    assert outcome == Verified(
        nonce_key=f"nonce:alice:k1:{nonce}", timestamp=now + WINDOW, window=WINDOW
    )
    assert verifier.check(ok, "bob", None) == "bad_signature"
    late = sign({"type": "chat"}, kid="k1", secret=ALICE_SECRET, nonce=nonce, ts=now - WINDOW - 1)
    assert verifier.check(late, "alice", None) == "stale"
    session = sign({"type": "chat"}, kid=SESSION_KID, secret=BOB_SECRET, nonce=nonce, ts=now)
    assert isinstance(verifier.check(session, "alice", BOB_SECRET), Verified)
    assert verifier.check(session, "alice", None) == "bad_signature"
    assert verifier.check(session, "alice", ALICE_SECRET) == "bad_signature"


def test_nonce_keys_encode_their_parts() -> None:
    """Subjects may contain ':': the parts are encoded, so two subjects and key ids can
    never name the same nonce."""
    assert nonce_key("a:b", "c", "n") != nonce_key("a", "b:c", "n")
    assert nonce_key("a:b", "c", "n") == "nonce:a%3Ab:c:n"
    assert nonce_key("alice", "k1", "N" * 16) == "nonce:alice:k1:" + "N" * 16


# -- memory nonce store ---------------------------------------------------------------------


def test_memory_nonce_store_expires_and_stays_bounded() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        ttl = 0.05
        assert await store.add_nonce("nonce:alice:k1:a", ttl) is True
        assert await store.add_nonce("nonce:alice:k1:a", ttl) is False  # replay
        for i in range(500):
            assert await store.add_nonce(f"nonce:alice:k1:{i}", ttl) is True
        assert len(store._nonces) == 501
        # wait (bounded by the ttl, however slow the loop above was) until every entry
        # has expired; the same key is then accepted again ...
        last_expiry = store._nonce_order[-1][0]
        await asyncio.sleep(max(0.0, last_expiry - time.monotonic()) + 0.01)
        assert await store.add_nonce("nonce:alice:k1:a", ttl) is True
        # ... and everything else expired with it: the store shrank to the one live entry
        assert set(store._nonces) == {"nonce:alice:k1:a"}
        assert len(store._nonce_order) == 1
        # a long-lived entry is not dropped by the pruning of expired ones
        assert await store.add_nonce("nonce:alice:k1:long", 3600) is True
        assert await store.add_nonce("nonce:alice:k1:long", 3600) is False

    asyncio.run(scenario())


def test_sighup_reloads_the_signing_keys(tmp_path: Path) -> None:
    """Rotation without a restart: after SIGHUP a key added to the file verifies and a key
    removed from it no longer does (a leaked key stops working at once); a file that
    cannot be used keeps the keys in force."""
    import signal

    from websockets.sync.client import connect

    from support.cli import cli_env
    from support.serve_process import LISTENING, Served

    keys = write_keys(tmp_path / "keys.json", [("alice-old", "alice", ALICE_SECRET)])
    env = cli_env(
        tmp_path,
        WSGUARD_JWT_SECRET=SECRET,
        WSGUARD_MESSAGES__TYPES=json.dumps(SIGNED_CHAT),
        WSGUARD_SIGNING__KEYS_FILE=str(keys),
    )
    served = Served(["--port", "0"], env, tmp_path / "audit.jsonl")
    try:
        port = int(served.wait_for(LISTENING).group(2))

        def answer(kid: str, secret: bytes) -> str:
            """The error code of a chat signed with *kid*, or "accepted" (a ping after it
            is answered first)."""
            headers = {"Authorization": f"Bearer {make_token('alice')}"}
            with connect(f"ws://127.0.0.1:{port}/", additional_headers=headers) as ws:
                assert recv_json(ws)["type"] == "welcome"
                ws.send(json.dumps(signed_chat("hi", kid=kid, secret=secret, msg_id=kid)))
                ws.send(json.dumps({"type": "ping", "id": "after"}))
                reply = recv_json(ws)
                return str(reply["code"]) if reply["type"] == "error" else "accepted"

        assert answer("alice-new", ALICE_NEW_SECRET) == "bad_signature"
        assert answer("alice-old", ALICE_SECRET) == "accepted"
        write_keys(keys, [("alice-new", "alice", ALICE_NEW_SECRET)])
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for("signing keys reloaded")
        assert answer("alice-new", ALICE_NEW_SECRET) == "accepted"
        assert answer("alice-old", ALICE_SECRET) == "bad_signature"
        keys.write_text("not json")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for("signing keys not reloaded")
        assert answer("alice-new", ALICE_NEW_SECRET) == "accepted"
        assert served.stop() == 0
    finally:
        served.kill()
