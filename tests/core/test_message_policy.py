"""Per-message security (issue 3), end to end: real server, real clients, raw sockets.

Covers the frame-layer size limit (single frame, fragments, a lying length header,
decompression), structural bounds, the type allowlist, JSON Schema, ``ref``,
authorization per type, message/byte/subject rate limits (a subject's budget outlives
its connections), control-frame floods and the violation budget with its decay.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import ClientConnection

from conftest import (
    SECRET,
    RunningServer,
    ServerFactory,
    close_of,
    eventually,
    make_config,
    make_token,
)
from support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    frame,
    raw_welcomed,
)
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.decisions import Deliver, Refuse
from wsguard.core.identity import Identity
from wsguard.core.messages import MessagePolicy
from wsguard.errors import ConfigError
from wsguard.hosts.app import App
from wsguard.session import Connection

# -- helpers -------------------------------------------------------------------


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    out = json.loads(data)
    assert isinstance(out, dict)
    return out


def send_json(ws: ClientConnection, message: Any) -> None:
    ws.send(json.dumps(message))


def expect_close(ws: ClientConnection, timeout: float = 5) -> int:
    """The next thing from the server is its close frame; return the code."""
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=timeout)
    assert info.value.rcvd is not None, "the server did not send a close frame"
    return int(info.value.rcvd.code)


def assert_alive(ws: ClientConnection, ident: str = "alive") -> None:
    """The connection still works and nothing else was queued before the pong."""
    send_json(ws, {"type": "ping", "id": ident})
    pong = recv_json(ws)
    assert pong["type"] == "pong", pong
    assert pong["id"] == ident


def ping(ws: ClientConnection, ident: str | int) -> dict[str, Any]:
    """Send a demo ping; return the server's answer (a pong or an error frame)."""
    ws.send(json.dumps({"type": "ping", "id": ident}))
    return recv_json(ws)


def with_types(**types: dict[str, Any]) -> dict[str, Any]:
    """``messages.types`` replaces the default set: keep the demo types, add/patch some."""
    merged = {name: dict(spec) for name, spec in DEMO_MESSAGE_TYPES.items()}
    for name, spec in types.items():
        merged[name] = {**merged.get(name, {}), **spec}
    return merged


# -- size at the frame layer ---------------------------------------------------------


def test_message_at_the_limit_passes_one_byte_more_closes_1009(server: RunningServer) -> None:
    limit = 8192  # default limits.max_message_bytes
    exact = '{"type":"ping","id":"edge"}'.ljust(limit)  # trailing whitespace is valid JSON
    assert len(exact.encode()) == limit
    with server.connect_welcomed() as ws:
        ws.send(exact)
        assert recv_json(ws)["id"] == "edge"
        ws.send(exact + " ")
        assert expect_close(ws) == 1009


def test_fragmented_message_over_the_limit_closes_1009(server: RunningServer) -> None:
    with raw_welcomed(server) as client:
        # a fragmented message under the limit is reassembled and delivered
        body = b'{"type":"ping","id":"frag"}'
        client.send(
            frame(OP_TEXT, body[:5], fin=False)
            + frame(OP_CONT, body[5:12], fin=False)
            + frame(OP_CONT, body[12:])
        )
        pong = client.recv_json()
        assert (pong["type"], pong["id"]) == ("pong", "frag")
        # three fragments of 4000 bytes: each under 8192, together over it
        chunk = b" " * 4000
        client.send(
            frame(OP_TEXT, b"{" + chunk[1:], fin=False)
            + frame(OP_CONT, chunk, fin=False)
            + frame(OP_CONT, chunk, fin=False)
        )
        assert client.read_close() == 1009


def test_many_small_fragments_are_counted_and_cut_off_before_the_end(
    server_factory: ServerFactory,
) -> None:
    # every fragment costs a message of the rate: a burst the 120 fragments fit in, so
    # that the size limit is the one they cross
    server = server_factory({"limits": {"message_burst": 200}})
    with raw_welcomed(server) as client:
        # 120 x 100 bytes, never a final fragment: the server must not wait for the end
        data = frame(OP_TEXT, b"[" + b" " * 99, fin=False)
        data += b"".join(frame(OP_CONT, b" " * 100, fin=False) for _ in range(119))
        client.send(data)
        assert client.read_close() == 1009


def test_lying_length_header_is_answered_at_once_without_buffering(
    server: RunningServer,
) -> None:
    with raw_welcomed(server) as client:
        started = time.monotonic()
        # announces 1 GiB, sends 16 bytes and then nothing more
        client.send(frame(OP_TEXT, b'{"type":"ping",', length=1 << 30))
        assert client.read_close() == 1009  # socket timeout is 5 s
        assert time.monotonic() - started < 5


def test_same_for_a_continuation_frame_announcing_1_gib(server: RunningServer) -> None:
    with raw_welcomed(server) as client:
        head = frame(OP_TEXT, b"[1,", fin=False)
        client.send(head + frame(OP_CONT, b"", length=1 << 30)[:14])
        assert client.read_close() == 1009


def test_decompression_bomb_closes_1009(server_factory: ServerFactory) -> None:
    running = server_factory({"compression": True})
    with running.connect_welcomed(compression="deflate") as ws:
        assert any(isinstance(ext, PerMessageDeflate) for ext in ws.protocol.extensions), (
            "permessage-deflate was not negotiated; the test would prove nothing"
        )
        # compressible and under the limit once inflated: fine
        send_json(ws, {"type": "ping", "id": "a" * 64})
        assert recv_json(ws)["type"] == "pong"
        # ~200 bytes on the wire, 200 KB once inflated
        ws.send('{"type":"chat","text":"' + "a" * 200_000 + '"}')
        assert expect_close(ws) == 1009


# -- parsing and structural bounds ------------------------------------------------------


def _noted_server(server_factory: ServerFactory, **messages: Any) -> RunningServer:
    """A server with a schema-less type ``note`` echoed back as ``noted``."""

    def setup(app: App) -> None:
        @app.on("note")
        async def note(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "noted", "id": message.get("id")})

    overrides = {"messages": {"types": with_types(note={}), **messages}}
    return server_factory(overrides, setup=setup)


def _nest(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def test_deep_nesting_is_invalid_message_and_connection_survives(
    server: RunningServer,
) -> None:
    raw = '{"type":"chat","text":"x","id":"deep","a":' + _nest(100) + "}"
    assert len(raw) < 8192
    with server.connect_welcomed() as ws:
        ws.send(raw)
        err = recv_json(ws)
        assert (err["type"], err["code"], err["ref"]) == ("error", "invalid_message", "deep")
        assert_alive(ws)


def test_nesting_beyond_the_parser_limit_is_refused_from_the_count(server: RunningServer) -> None:
    """Refused from a count of the raw brackets, before the decoder builds 4,000 nested
    arrays (the answer says so), and the connection is still served."""
    raw = "[" * 4000 + "]" * 4000
    with server.connect_welcomed() as ws:
        ws.send(raw)
        error = recv_json(ws)
        assert error["code"] == "invalid_message", error
        assert "too many objects and arrays" in error["message"], error
        assert_alive(ws)


def test_bounds_apply_even_without_a_schema(server_factory: ServerFactory) -> None:
    running = _noted_server(server_factory, max_string_length=32, max_keys=50, max_depth=8)
    long_string = {"type": "note", "id": "s", "v": "x" * 33}
    long_key = {"type": "note", "id": "k", "k" * 33: 1}
    many_keys = {"type": "note", "id": "m", **{f"k{i}": i for i in range(60)}}
    long_list = {"type": "note", "id": "l", "v": list(range(60))}
    deep = json.loads('{"type":"note","id":"d","v":' + _nest(8) + "}")
    with running.connect_welcomed() as ws:
        send_json(ws, {"type": "note", "id": "ok", "v": "x" * 32, "w": [1, 2]})
        assert recv_json(ws) == {"type": "noted", "id": "ok"}
        for message in (long_string, long_key, many_keys, long_list, deep):
            send_json(ws, message)
            err = recv_json(ws)
            assert (err["code"], err["ref"]) == ("invalid_message", message["id"])
        assert_alive(ws)


def test_long_array_is_refused_with_default_bounds(server_factory: ServerFactory) -> None:
    running = _noted_server(server_factory)  # default max_keys = 256
    with running.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "note", "id": "arr", "v": [1] * 300}, separators=(",", ":")))
        first = recv_json(ws)  # "noted" here means the 300-item array was delivered
        assert (first.get("code"), first.get("ref")) == ("invalid_message", "arr"), first


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"ping","id":' + "9" * 300 + "}",
        '{"type":"ping","id":-' + "9" * 300 + "}",
        '{"type":"ping","id":' + "1" + "0" * 400 + "}",
        '{"type":"chat","text":' + "7" * 300 + "}",
    ],
    ids=["300-digits", "negative", "beyond-double", "in-string-field"],
)
def test_huge_integer_is_refused_never_a_crash(server: RunningServer, raw: str) -> None:
    with server.connect_welcomed() as ws:
        ws.send(raw)
        assert recv_json(ws)["code"] in ("invalid_message", "invalid_json")
        assert_alive(ws)


def test_huge_integer_in_a_field_that_accepts_numbers_is_refused(
    server: RunningServer,
) -> None:
    raw = '{"type":"data","channel":"c","payload":{"x":' + "9" * 300 + "}}"
    with server.connect_welcomed() as ws:
        ws.send(raw)
        first = recv_json(ws)  # a pong here means the message was delivered
        assert first.get("code") in ("invalid_message", "invalid_json"), first


@pytest.mark.parametrize("raw", ["[1,2]", '"text"', "42", "null", "true", "1.5", "[]"])
def test_non_object_json_is_invalid_message(server: RunningServer, raw: str) -> None:
    with server.connect_welcomed() as ws:
        ws.send(raw)
        err = recv_json(ws)
        assert (err["type"], err["code"]) == ("error", "invalid_message")
        assert "ref" not in err
        assert_alive(ws)


@pytest.mark.parametrize(
    "message",
    [
        {"id": "t"},
        {"type": 5, "id": "t"},
        {"type": None, "id": "t"},
        {"type": ["ping"], "id": "t"},
        {"type": {"x": "ping"}, "id": "t"},
    ],
    ids=["missing", "number", "null", "list", "object"],
)
def test_missing_or_non_string_type_is_invalid_message(
    server: RunningServer, message: dict[str, Any]
) -> None:
    with server.connect_welcomed() as ws:
        send_json(ws, message)
        err = recv_json(ws)
        assert (err["code"], err["ref"], err["pointer"]) == ("invalid_message", "t", "/type")
        assert_alive(ws)


# -- binary frames -------------------------------------------------------------------


def test_binary_frame_closes_1003_by_default(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        ws.send(b'{"type":"ping","id":"b"}')
        assert expect_close(ws) == 1003


def test_binary_allowed_for_one_type_only(server_factory: ServerFactory) -> None:
    running = server_factory({"messages": {"types": with_types(ping={"binary": True})}})
    with running.connect_welcomed() as ws:
        ws.send(b'{"type":"ping","id":"bin"}')
        pong = recv_json(ws)
        assert (pong["type"], pong["id"]) == ("pong", "bin")
        ws.send(b'{"type":"chat","text":"hi"}')  # chat does not allow binary
        assert expect_close(ws) == 1003


def test_binary_allowed_globally(server_factory: ServerFactory) -> None:
    running = server_factory({"messages": {"binary": True}})
    with (
        running.connect_welcomed(make_token("alice")) as a,
        running.connect_welcomed(make_token("bob")) as b,
    ):
        a.send(b'{"type":"chat","text":"bin"}')
        got = recv_json(b)
        assert got == {
            "type": "broadcast",
            "from": "alice",
            "message": {"type": "chat", "text": "bin"},
        }
        a.send(b"\xff\xfe not json")
        assert recv_json(a)["code"] == "invalid_json"
        assert_alive(a)


# -- allowlist, schema, ref -----------------------------------------------------------


def test_unknown_type_is_refused_with_ref(server: RunningServer) -> None:
    with server.connect_welcomed() as ws:
        send_json(ws, {"type": "admin_shell", "id": 77})
        assert recv_json(ws) == {
            "type": "error",
            "code": "unknown_type",
            "message": "Unknown message type.",
            "ref": 77,
        }
        send_json(ws, {"type": "Ping"})  # the allowlist is exact
        err = recv_json(ws)
        assert err["code"] == "unknown_type"
        assert "ref" not in err
        assert_alive(ws)


def test_schema_failure_names_the_pointer_never_the_value(server: RunningServer) -> None:
    secret = "SECRET-VALUE-" + "z" * 2100  # over chat.text maxLength (2000)
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "chat", "text": secret, "id": "s1"}))
        raw = ws.recv(timeout=5)
        assert isinstance(raw, str)
        err = json.loads(raw)
        assert (err["code"], err["pointer"], err["ref"]) == ("invalid_message", "/text", "s1")
        assert "SECRET-VALUE" not in raw and "zzz" not in raw
        # nested pointer
        send_json(ws, {"type": "data", "channel": "c", "payload": {"k": ["LEAKME"]}, "id": 3})
        raw = ws.recv(timeout=5)
        assert isinstance(raw, str)
        err = json.loads(raw)
        assert (err["code"], err["pointer"], err["ref"]) == ("invalid_message", "/payload/k", 3)
        assert "LEAKME" not in raw
        # an extra property is refused without echoing it
        send_json(ws, {"type": "chat", "text": "hi", "evil_key": "PAYLOAD-123"})
        raw = ws.recv(timeout=5)
        assert isinstance(raw, str)
        assert json.loads(raw)["code"] == "invalid_message"
        assert "PAYLOAD-123" not in raw and "evil_key" not in raw
        assert_alive(ws)


@pytest.mark.parametrize(
    ("ident", "expected"),
    [
        ("abc", "abc"),
        (0, 0),
        (2**53 - 1, 2**53 - 1),
        (None, None),
        ({"x": 1}, None),
        ("x" * 65, None),
        (-1, None),
        (True, None),
        (1.5, None),
    ],
)
def test_ref_echoes_only_a_valid_client_id(
    server: RunningServer, ident: Any, expected: Any
) -> None:
    message: dict[str, Any] = {"type": "nope"}
    if ident is not None:
        message["id"] = ident
    with server.connect_welcomed() as ws:
        send_json(ws, message)
        err = recv_json(ws)
        assert err["code"] == "unknown_type"
        if expected is None:
            assert "ref" not in err
        else:
            assert err["ref"] == expected


def test_custom_schema_from_config_is_enforced(server_factory: ServerFactory) -> None:
    schema = {
        "type": "object",
        "properties": {
            "type": {"const": "note"},
            "id": {"type": "string"},
            "n": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["type", "n"],
        "additionalProperties": False,
    }

    def setup(app: App) -> None:
        @app.on("note")
        async def note(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "noted", "n": message["n"]})

    running = server_factory(
        {"messages": {"types": with_types(note={"schema": schema})}}, setup=setup
    )
    with running.connect_welcomed() as ws:
        send_json(ws, {"type": "note", "n": 5})
        assert recv_json(ws) == {"type": "noted", "n": 5}
        for bad in ({"type": "note", "n": 11, "id": "a"}, {"type": "note", "n": "5", "id": "b"}):
            send_json(ws, bad)
            err = recv_json(ws)
            assert (err["code"], err["pointer"], err["ref"]) == ("invalid_message", "/n", bad["id"])
        send_json(ws, {"type": "note", "id": "c"})
        assert recv_json(ws)["code"] == "invalid_message"
        assert_alive(ws)


@pytest.mark.parametrize(
    "schema", [{"type": 12}, {"type": "notatype"}, {"minLength": -1}, {"pattern": "("}]
)
def test_invalid_schema_in_config_is_a_config_error(
    server_factory: ServerFactory, schema: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as info:
        server_factory({"messages": {"types": {"widget": {"schema": schema}}}})
    assert info.value.key == "messages.types.widget.schema"


# -- authorization -------------------------------------------------------------------


def test_command_without_admin_is_forbidden_and_not_delivered(server: RunningServer) -> None:
    with (
        server.connect_welcomed(make_token("mallory", scopes="chat")) as m,
        server.connect_welcomed(make_token("bob")) as b,
    ):
        send_json(m, {"type": "command", "name": "reload", "id": "c1"})
        err = recv_json(m)
        assert (err["code"], err["ref"]) == ("forbidden", "c1")
        # the command was evaluated before the reply; had it been broadcast, it would be
        # queued to b before b's pong
        assert_alive(b, "after-forbidden")
        assert_alive(m)


def test_command_with_admin_is_broadcast(server: RunningServer) -> None:
    with (
        server.connect_welcomed(make_token("root", scopes="chat admin")) as admin,
        server.connect_welcomed(make_token("bob")) as b,
    ):
        send_json(admin, {"type": "command", "name": "reload", "args": ["x"]})
        got = recv_json(b)
        assert got == {
            "type": "broadcast",
            "from": "root",
            "message": {"type": "command", "name": "reload", "args": ["x"]},
        }


def test_forbidden_spends_the_violation_budget(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"violation_budget": 2}})
    with running.connect_welcomed(make_token("mallory")) as ws:
        for i in range(2):
            send_json(ws, {"type": "command", "name": "reload", "id": i})
            assert recv_json(ws)["code"] == "forbidden"
        send_json(ws, {"type": "command", "name": "reload", "id": 3})
        assert expect_close(ws) == 1008


# -- rate limits ---------------------------------------------------------------------


def _drain(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [recv_json(ws) for _ in range(n)]


def test_message_burst_then_rate_limited_with_retry_hint(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"messages_per_minute": 60, "message_burst": 5}})
    with running.connect_welcomed() as ws:
        started = time.monotonic()
        for i in range(10):
            send_json(ws, {"type": "ping", "id": i})
        frames = _drain(ws, 10)
        assert time.monotonic() - started < 3
        pongs = [f["id"] for f in frames if f["type"] == "pong"]
        errors = [f for f in frames if f["type"] == "error"]
        assert pongs == [0, 1, 2, 3, 4]
        assert [e["code"] for e in errors] == ["rate_limited"] * 5
        for e in errors:
            assert 0 < e["retry_after"] <= 1.0


def test_bytes_per_minute_limit(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"max_message_bytes": 1024, "bytes_per_minute": 1024}})
    text = "t" * 400  # ~430 bytes per message: two fit in the 1024-byte bucket
    with (
        running.connect_welcomed(make_token("alice")) as a,
        running.connect_welcomed(make_token("bob")) as b,
    ):
        for i in range(3):
            send_json(a, {"type": "chat", "text": text, "id": f"c{i}"})
        err = recv_json(a)  # c0 and c1 pass silently (broadcast), c2 is refused
        assert err["code"] == "rate_limited"
        assert err["retry_after"] > 0
        assert_alive(a)  # a small message still fits
        assert [recv_json(b)["message"]["id"] for _ in range(2)] == ["c0", "c1"]
        assert_alive(b)  # c2 was dropped, not delivered


def test_subject_limit_spans_that_subjects_connections(server_factory: ServerFactory) -> None:
    running = server_factory(
        {
            "limits": {
                "messages_per_minute": 600,
                "message_burst": 5,
                "subject_messages_per_minute": 60,
            }
        }
    )
    # the subject bucket holds 2 x message_burst = 10 messages
    with (
        running.connect_welcomed(make_token("alice")) as a1,
        running.connect_welcomed(make_token("alice")) as a2,
        running.connect_welcomed(make_token("alice")) as a3,
        running.connect_welcomed(make_token("bob")) as b,
    ):
        for ws, tag in ((a1, "a1"), (a2, "a2")):
            for i in range(5):  # each within its own connection burst
                send_json(ws, {"type": "ping", "id": f"{tag}-{i}"})
            assert [f["type"] for f in _drain(ws, 5)] == ["pong"] * 5
        # a3 has not sent anything yet: only the subject bucket can refuse it
        send_json(a3, {"type": "ping", "id": "a3"})
        err = recv_json(a3)
        assert err["code"] == "rate_limited"
        assert err["retry_after"] > 0
        assert_alive(b, "other-subject")


def test_subject_message_budget_survives_reconnecting(server_factory: ServerFactory) -> None:
    """Each connection stays within its own burst; only the subject's bucket runs out."""
    per_connection = 5
    server = server_factory(
        {
            "limits": {
                "message_burst": per_connection,
                "messages_per_minute": 1,
                "subject_messages_per_minute": 1,
                "connections_per_subject": 50,
            }
        }
    )
    refusal: dict[str, Any] | None = None
    for round_no in range(20):
        with server.connect_welcomed(make_token("alice")) as ws:
            for i in range(per_connection):
                answer = ping(ws, f"{round_no}-{i}")
                if answer["type"] != "pong":
                    refusal = answer
                    break
        eventually(lambda: server.connection_count() == 0, what="the server forgot the connection")
        if refusal is not None:
            break
    assert refusal is not None, "the subject's budget was never exhausted"
    assert refusal["code"] == "rate_limited", refusal
    # a brand-new connection (fresh per-connection bucket) of the same subject is still limited
    with server.connect_welcomed(make_token("alice")) as ws:
        answer = ping(ws, "after-reconnect")
        assert (answer["type"], answer.get("code")) == ("error", "rate_limited"), answer
    eventually(lambda: server.connection_count() == 0, what="the server forgot the connection")
    with server.connect_welcomed(make_token("alice")) as ws:
        answer = ping(ws, "after-second-reconnect")
        assert answer.get("code") == "rate_limited", answer
    # it is the subject that is limited, not the address
    with server.connect_welcomed(make_token("bob")) as ws:
        assert_alive(ws, "another-subject")


def test_subject_state_outlives_closed_connections_in_the_core() -> None:
    config = make_config(
        {"limits": {"message_burst": 3, "messages_per_minute": 1, "subject_messages_per_minute": 1}}
    )
    verifier = TokenVerifier(config.auth, KeyMaterial(secret=SECRET.encode()))
    policy = MessagePolicy(config, verifier)
    alice = Identity(subject="alice")
    now = 1000.0
    message = json.dumps({"type": "ping"})
    for _ in range(20):  # connect, spend this connection's burst, disconnect
        state = policy.open(alice, now)
        outcomes = [policy.evaluate(state, message, now) for _ in range(3)]
        policy.closed(state, now)
        if any(isinstance(o, Refuse) for o in outcomes):
            break
    else:
        pytest.fail("the subject's budget was never exhausted")
    for _ in range(3):  # no number of reconnects at the same instant buys a message
        state = policy.open(alice, now)
        outcome = policy.evaluate(state, message, now)
        policy.closed(state, now)
        assert isinstance(outcome, Refuse) and outcome.code == "rate_limited", outcome
    # another subject is unaffected
    other = policy.open(Identity(subject="bob"), now)
    assert isinstance(policy.evaluate(other, message, now), Deliver)


def test_invalid_messages_count_toward_the_rate(server_factory: ServerFactory) -> None:
    running = server_factory(
        {
            "limits": {
                "messages_per_minute": 60,
                "message_burst": 5,
                "violation_budget": 100,
            }
        }
    )
    with running.connect_welcomed() as ws:
        for _ in range(10):
            ws.send("{not json")
        codes = [f["code"] for f in _drain(ws, 10)]
        assert codes == ["invalid_json"] * 5 + ["rate_limited"] * 5


def test_control_frames_count_toward_the_rate(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"messages_per_minute": 60, "message_burst": 5}})
    with running.connect_welcomed() as ws:
        for _ in range(5):
            assert ws.ping().wait(5)
        send_json(ws, {"type": "ping", "id": "after-pings"})
        assert recv_json(ws)["code"] == "rate_limited"


def test_ping_flood_closes_1008(server_factory: ServerFactory) -> None:
    running = server_factory(
        {
            "limits": {
                "messages_per_minute": 60,
                "message_burst": 5,
                "violation_budget": 3,
            }
        }
    )
    with running.connect_welcomed() as ws:
        with contextlib.suppress(ConnectionClosed):  # the close may overtake our pings
            for _ in range(200):
                ws.ping()
        assert expect_close(ws) == 1008
    deadline = time.monotonic() + 5
    while not running.audit.events("connection_closed") and time.monotonic() < deadline:
        time.sleep(0.01)
    [closed] = running.audit.events("connection_closed")
    assert (closed["code"], closed["cause"]) == (1008, "rate_limited")


def test_a_ping_flood_in_one_write_gets_no_more_pongs_than_the_rates_allow(
    server_factory: ServerFactory,
) -> None:
    """Hundreds of pings in one write: each is counted before it is answered, so the
    client gets at most the burst plus the violation budget of pongs, then the 1008,
    on every engine (a parser that answered a whole read's pings first would send
    hundreds)."""
    running = server_factory(
        {"limits": {"messages_per_minute": 60, "message_burst": 5, "violation_budget": 3}}
    )
    with raw_welcomed(running) as client:
        client.send(frame(OP_PING) * 600)  # 3,600 bytes: one write, several reads' worth
        pongs = 0
        while (opcode := client.read_frame()[0]) != OP_CLOSE:
            pongs += opcode == OP_PONG
    assert pongs <= 5 + 3
    [closed] = eventually(lambda: running.audit.events("connection_closed"), what="the close")
    assert (closed["code"], closed["cause"]) == (1008, "rate_limited")


def test_a_flood_closed_1008_completes_the_closing_handshake_at_once(
    server_factory: ServerFactory,
) -> None:
    """The server keeps reading (and discarding) what the flooder had already sent, so the
    client's close frame is seen and the slot freed, instead of waiting out close_timeout
    (5 s) behind a full receive queue."""
    running = server_factory({"limits": {"message_burst": 5, "violation_budget": 3}})
    with running.connect_welcomed() as ws:
        with contextlib.suppress(ConnectionClosed):  # the close may overtake our pings
            for i in range(3000):
                send_json(ws, {"type": "ping", "id": f"{i:0>60}"})
        # recv raises only once the closing handshake is over and TCP is closed
        assert close_of(ws, timeout=2.5)[0] == 1008
    [closed] = eventually(lambda: running.audit.events("connection_closed"), what="the close")
    assert (closed["code"], closed["cause"]) == (1008, "rate_limited")
    assert running.connection_count() == 0


# -- violation budget ------------------------------------------------------------------


def test_violations_past_the_budget_close_1008(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"violation_budget": 3}})
    with running.connect_welcomed() as ws:
        for _ in range(3):
            ws.send("{bad json")
            assert recv_json(ws)["code"] == "invalid_json"
        ws.send("{bad json")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1008
        assert "bad" not in info.value.rcvd.reason


def test_honest_client_with_spaced_violations_is_never_closed(
    server_factory: ServerFactory,
) -> None:
    # the server's own heartbeat paces the client: two pings >= 0.15 s >= the decay time
    running = server_factory(
        {
            "limits": {"violation_budget": 3, "violation_decay_seconds": 0.1},
            "liveness": {"ping_interval_seconds": 0.15, "ping_timeout_seconds": 5},
        }
    )
    with raw_welcomed(running) as client:
        for i in range(6):  # twice the budget
            client.send(frame(OP_TEXT, b'{"id":' + str(i).encode()))
            err = client.recv_json()
            assert err["code"] == "invalid_json"
            client.wait_pings(2)
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"still-here"}'))
        pong = client.recv_json()
        assert (pong["type"], pong["id"]) == ("pong", "still-here")


@pytest.mark.parametrize("scenario", ["violations", "binary"])
def test_frames_queued_before_a_policy_close_are_delivered_first(
    server_factory: ServerFactory, scenario: str
) -> None:
    running = server_factory({"limits": {"violation_budget": 3}})
    with raw_welcomed(running) as client:
        if scenario == "violations":
            # one TCP write: four invalid messages, the fourth exceeds the budget
            client.send(b"".join(frame(OP_TEXT, b"{bad") for _ in range(4)))
            expected, code = ["invalid_json"] * 3, 1008
        else:
            client.send(frame(OP_TEXT, b'{"type":"ping","id":"p"}') + frame(OP_BINARY, b"{}"))
            expected, code = ["pong"], 1003
        assert client.read_close() == code
        assert [t.get("code", t["type"]) for t in client.texts] == expected


def test_rate_limited_error_carries_ref(server_factory: ServerFactory) -> None:
    running = server_factory({"limits": {"messages_per_minute": 60, "message_burst": 1}})
    with running.connect_welcomed() as ws:
        send_json(ws, {"type": "ping", "id": "first"})
        assert recv_json(ws)["type"] == "pong"
        send_json(ws, {"type": "ping", "id": "second"})
        err = recv_json(ws)
        assert err["code"] == "rate_limited"
        assert err.get("ref") == "second"
