"""The App API for raw messages, on both engines: ``@app.on(type, raw=True)``,
``@app.on_message``, ``conn.send_raw`` and ``App(welcome=False)``."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import (
    ServerFactory,
    close_of,
    eventually,
    make_config,
    make_token,
    status_of,
    upgrade_request,
)
from wsguard import App, Connection
from wsguard.errors import ConfigError

JSON_TYPES = {"messages": {"binary": True, "types": {"note": {}, "blob": {}, "plain": {}}}}
OPAQUE = {"messages": {"format": "opaque", "binary": True}}


def recv(ws: Any) -> str | bytes:
    data: str | bytes = ws.recv(timeout=5)
    return data


# -- raw per-type handlers ---------------------------------------------------------------------


def test_a_raw_handler_gets_the_frame_as_it_arrived(server_factory: ServerFactory) -> None:
    seen: list[tuple[str, str | bytes]] = []

    def setup(app: App) -> None:
        @app.on("note", raw=True)
        def note(conn: Connection, data: str | bytes) -> None:  # plain: inline
            seen.append(("note", data))
            conn.send_raw(data)

        @app.on("blob", raw=True)
        async def blob(conn: Connection, data: str | bytes) -> None:  # coroutine: a task
            seen.append(("blob", data))
            conn.send_raw(data)

        @app.on("plain")
        def plain(conn: Connection, message: dict[str, Any]) -> None:  # parsed, as before
            seen.append(("plain", json.dumps(message)))
            conn.send({"type": "parsed", "keys": sorted(message)})

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    # spacing and key order a re-serialization would not keep
    text = '{ "type" : "note",  "z": 1, "a": [1,2] }'
    binary = b'{"type":"note","bin":true}'
    blob_text = '{"type":"blob","n":"\\u00e9"}'
    blob_binary = b'{"type": "blob"}'
    with server.connect_welcomed() as ws:
        ws.send(text)
        assert recv(ws) == text  # a text frame back, byte for byte
        ws.send(binary)
        assert recv(ws) == binary  # bytes: a binary frame back
        ws.send(blob_text)
        assert recv(ws) == blob_text
        ws.send(blob_binary)
        assert recv(ws) == blob_binary
        ws.send('{"type":"plain","b":2}')
        assert json.loads(recv(ws)) == {"type": "parsed", "keys": ["b", "type"]}
    assert seen[:4] == [
        ("note", text),
        ("note", binary),
        ("blob", blob_text),
        ("blob", blob_binary),
    ]
    assert seen[4][0] == "plain"


def test_a_later_registration_replaces_the_raw_handler(server_factory: ServerFactory) -> None:
    def setup(app: App) -> None:
        @app.on("note", raw=True)
        def first(conn: Connection, data: str | bytes) -> None:
            conn.send_raw("raw")

        @app.on("note")
        def second(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "parsed"})

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        ws.send('{"type":"note"}')
        assert json.loads(recv(ws)) == {"type": "parsed"}


def test_the_policy_still_comes_first_for_raw_handlers(server_factory: ServerFactory) -> None:
    calls: list[str | bytes] = []

    def setup(app: App) -> None:
        app.on("note", raw=True)(lambda conn, data: calls.append(data))

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        ws.send("not json")
        assert json.loads(recv(ws))["code"] == "invalid_json"
        ws.send('{"type":"unknown"}')
        assert json.loads(recv(ws))["code"] == "unknown_type"
    assert calls == []


def test_a_message_naming_a_key_twice_never_reaches_a_raw_handler(
    server_factory: ServerFactory,
) -> None:
    """The policy decodes a message once (the last of two equal keys wins) and checks
    that; a raw handler gets the frame itself, which a parser keeping the first key
    would read as another message (a "command" checked as a "note"). Refused with
    ``invalid_message``, as the gateway refuses it; parsed handlers, which get what the
    policy checked, are not concerned."""
    raw: list[str | bytes] = []
    parsed: list[dict[str, Any]] = []

    def setup(app: App) -> None:
        app.on("note", raw=True)(lambda conn, data: raw.append(data))
        app.on("plain")(lambda conn, message: parsed.append(message))

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    duplicates: list[str | bytes] = [
        '{"type":"note","text":"x","text":"y"}',
        '{"type":"command","type":"note"}',
        b'{"type":"note","a":{"k":1,"k":2}}',  # at any depth, in a binary frame too
    ]
    with server.connect_welcomed() as ws:
        for text in duplicates:
            ws.send(text)
            error = json.loads(recv(ws))
            assert (error["type"], error["code"]) == ("error", "invalid_message"), text
            assert error["message"] == "Message has duplicate keys."
        ws.send('{"type":"note","id":"n1","id":"n2"}')
        assert json.loads(recv(ws)).get("ref") == "n2"  # the id the policy decoded
        ws.send('{"type":"plain","x":1,"x":2}')
        ws.send('{"type":"note","ok":true}')
        eventually(lambda: raw, what="the valid note")
    assert raw == ['{"type":"note","ok":true}']
    assert parsed == [{"type": "plain", "x": 2}]


def test_messages_naming_a_key_twice_spend_the_violation_budget(
    server_factory: ServerFactory,
) -> None:
    """Refused as invalid, they count as invalid messages do: past the budget, 1008."""
    raw: list[str | bytes] = []

    def setup(app: App) -> None:
        app.on("note", raw=True)(lambda conn, data: raw.append(data))

    overrides = {**JSON_TYPES, "limits": {"violation_budget": 3}}
    server = server_factory(overrides, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        for _ in range(3):
            ws.send('{"type":"note","a":1,"a":2}')
            assert json.loads(recv(ws))["code"] == "invalid_message"
        ws.send('{"type":"note","a":1,"a":2}')
        assert close_of(ws) == (1008, "policy violation")
    assert raw == []
    [closed] = eventually(lambda: server.audit.events("connection_closed"), what="the close")
    assert (closed["code"], closed["cause"]) == (1008, "invalid_message")


# -- the catch-all handler ---------------------------------------------------------------------


def test_on_message_gets_every_opaque_message(server_factory: ServerFactory) -> None:
    seen: list[str | bytes] = []

    def setup(app: App) -> None:
        @app.on_message
        def echo(conn: Connection, data: str | bytes) -> None:
            seen.append(data)
            assert conn.send_raw(data)

    server = server_factory(OPAQUE, demo=False, setup=setup, welcome=False)
    frames: list[str | bytes] = [
        "not json",
        "{bad",
        "\u00e9t\u00e9 \U0001f600",
        b"\x00\xff\x80",
        b"",
    ]
    with server.connect() as ws:
        for frame in frames:
            ws.send(frame)
            assert recv(ws) == frame
    assert seen == frames
    assert [type(f) for f in seen] == [str, str, str, bytes, bytes]


def test_on_message_coroutine_keeps_the_order(server_factory: ServerFactory) -> None:
    def setup(app: App) -> None:
        @app.on_message
        async def echo(conn: Connection, data: str | bytes) -> None:
            conn.send_raw(data)

    limits = {"limits": {"message_burst": 100, "messages_per_minute": 6000}}
    server = server_factory({**OPAQUE, **limits}, demo=False, setup=setup, welcome=False)
    with server.connect() as ws:
        for i in range(40):  # more than the picows backlog (16) while handlers wait
            ws.send(f"m{i}" if i % 2 else f"m{i}".encode())
        got = [recv(ws) for _ in range(40)]
    assert got == [f"m{i}" if i % 2 else f"m{i}".encode() for i in range(40)]


def test_on_message_catches_only_types_without_a_handler(server_factory: ServerFactory) -> None:
    def setup(app: App) -> None:
        @app.on("note")
        def note(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "note_handler"})

        @app.on_message
        def rest(conn: Connection, data: str | bytes) -> None:
            conn.send({"type": "catch_all", "data": data if isinstance(data, str) else None})

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        ws.send('{"type":"note"}')
        assert json.loads(recv(ws)) == {"type": "note_handler"}
        ws.send('{"type":"blob", "x": 1}')
        assert json.loads(recv(ws)) == {"type": "catch_all", "data": '{"type":"blob", "x": 1}'}


def test_a_failing_raw_handler_answers_internal_error(server_factory: ServerFactory) -> None:
    def setup(app: App) -> None:
        @app.on_message
        def broken(conn: Connection, data: str | bytes) -> None:
            raise RuntimeError("handler bug")

    server = server_factory(OPAQUE, demo=False, setup=setup, welcome=False)
    with server.connect() as ws:
        ws.send("x")
        assert json.loads(recv(ws))["code"] == "internal_error"
        ws.send("y")  # the connection survives
        assert json.loads(recv(ws))["code"] == "internal_error"


# -- send_raw and welcome ------------------------------------------------------------------------


def test_send_raw_sends_text_and_binary_frames(server_factory: ServerFactory) -> None:
    results: list[bool] = []
    errors: list[str] = []

    def setup(app: App) -> None:
        @app.on_connect
        async def hello(conn: Connection) -> None:
            results.append(conn.send_raw("text hello"))
            results.append(conn.send_raw(b"\x01binary hello"))
            try:
                conn.send_raw({"type": "dict"})  # type: ignore[arg-type]
            except TypeError as exc:
                errors.append(str(exc))

    server = server_factory(OPAQUE, demo=False, setup=setup, welcome=False)
    with server.connect() as ws:
        assert recv(ws) == "text hello"
        assert recv(ws) == b"\x01binary hello"
    assert results == [True, True]
    assert errors == ["send_raw takes str or bytes, not dict"]


def test_welcome_false_sends_no_welcome_frame(server_factory: ServerFactory) -> None:
    def setup(app: App) -> None:
        @app.on_message
        def echo(conn: Connection, data: str | bytes) -> None:
            conn.send_raw(data)

    quiet = server_factory(OPAQUE, demo=False, setup=setup, welcome=False)
    with quiet.connect() as ws:
        ws.send("first")
        assert recv(ws) == "first"  # the first frame from the server is the echo
    assert quiet.app.send_welcome is False
    greeting = server_factory(OPAQUE, demo=False, setup=setup)
    with greeting.connect() as ws:
        ws.send("first")
        welcome = json.loads(recv(ws))
        assert welcome["type"] == "welcome"
        assert welcome["types"] == ["opaque"]
        assert recv(ws) == "first"


# -- back-pressure ---------------------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    head = bytes((0x80 | opcode, 0x80 | size)) if size < 126 else b""
    assert head, "short payloads only"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_slow_consumer_of_send_raw_is_dropped(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    chunk = os.urandom(64 * 1024)
    accepted: list[int] = []

    def setup(app: App) -> None:
        @app.on_message
        def flood(conn: Connection, data: str | bytes) -> None:
            sent = 0
            for _ in range(2000):  # bounded: 125 MiB if nothing were ever refused
                if not conn.send_raw(chunk):
                    break
                sent += 1
            accepted.append(sent)

    server = server_factory(
        {**OPAQUE, "limits": {"outbound_queue": 8}}, demo=False, setup=setup, welcome=False
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window; never read
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(upgrade_request(token=make_token("slow")))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk_in = sock.recv(1)  # byte by byte: no frame bytes are consumed past the head
        assert chunk_in, "EOF during the handshake"
        head += chunk_in
    assert status_of(head) == 101
    sock.sendall(masked_frame(0x1, b"flood"))

    event = eventually(lambda: server.audit.events("slow_consumer"), what="slow_consumer")
    assert event[0]["subject"] == "slow"
    assert len(accepted) == 1
    assert accepted[0] < 2000  # send_raw refused once the bounded queue was full
    eventually(lambda: server.connection_count() == 0, what="the slow client to be dropped")
    closed = [e for e in server.audit.events("connection_closed") if e["subject"] == "slow"]
    assert closed and closed[0]["cause"] == "slow_consumer", closed


def test_send_raw_after_close_returns_false(server_factory: ServerFactory) -> None:
    results: list[bool] = []

    def setup(app: App) -> None:
        @app.on_message
        async def close_then_send(conn: Connection, data: str | bytes) -> None:
            await conn.close(1000, "bye")
            results.append(conn.send_raw(data))

    server = server_factory(OPAQUE, demo=False, setup=setup, welcome=False)
    with server.connect() as ws:
        ws.send("x")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    eventually(lambda: results, what="the handler to finish")
    assert results == [False]


def test_raw_handlers_need_an_allowlisted_type() -> None:
    app = App(make_config(JSON_TYPES))
    with pytest.raises(ConfigError) as error:
        app.on("missing", raw=True)
    assert error.value.key == "messages.types.missing"


def test_no_welcome_frame_means_no_session_keys() -> None:
    config = make_config({"signing": {"session_keys": True}})
    with pytest.raises(ConfigError) as error:
        App(config, welcome=False)
    assert error.value.key == "signing.session_keys"
    assert App(config).send_welcome is True


def test_every_error_frame_echoes_the_id_only_when_short_or_a_safe_integer(
    server_factory: ServerFactory,
) -> None:
    """The policy's refusals echo a client's ``id`` bounded (a string of at most 64
    characters, an integer in 0..2^53-1); the host's own answers (duplicate keys, no
    handler, a handler that failed) echoed any string or integer a schema let through."""

    def setup(app: App) -> None:
        app.on("note", raw=True)(lambda conn, data: None)

        @app.on("plain")
        def boom(conn: Connection, message: dict[str, Any]) -> None:
            raise RuntimeError("handler bug")

    server = server_factory(JSON_TYPES, demo=False, setup=setup)
    cases = {
        '{"type":"note","id":"a","id":ID}': "invalid_message",  # duplicate keys
        '{"type":"blob","id":ID}': "unhandled_type",
        '{"type":"plain","id":ID}': "internal_error",
    }
    with server.connect_welcomed() as ws:
        for template, code in cases.items():
            for ident in ['"' + "L" * 290 + '"', str(2**63 - 1), "-5", "1.5", "true"]:
                ws.send(template.replace("ID", ident))
                error = json.loads(recv(ws))
                assert error["code"] == code, (template, ident)
                assert "ref" not in error, (template, ident, error)
            for ident, ref in [('"r-1"', "r-1"), ("42", 42)]:
                ws.send(template.replace("ID", ident))
                assert json.loads(recv(ws)).get("ref") == ref, (template, ident)
