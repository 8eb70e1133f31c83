"""The security audit log: one JSON object per line, no forged lines, no secrets (not in
the server's debug logs either)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from conftest import (
    SECRET,
    AuditCapture,
    RunningServer,
    ServerFactory,
    make_config,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from support.cli import cli_env
from support.serve_process import Served
from wsguard.guard import Guard
from wsguard.hosts.app import App
from wsguard.hosts.demo import install_demo
from wsguard.observability.audit import AuditLog

APP_ORIGIN = "https://app.example.com"
BAD_TOKEN = make_token("mallory", secret="not-the-server-secret-but-long-enough-0123456789")
MAX_FIELD = 256  # documented truncation length of client-supplied strings


def records(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines strictly: newline-terminated, one JSON object per line."""
    assert text.endswith("\n") or text == ""
    out = []
    for line in text.split("\n")[:-1]:
        record = json.loads(line)
        assert isinstance(record, dict), line
        out.append(record)
    return out


def wait_for(server: RunningServer, event: str, count: int = 1) -> list[dict[str, Any]]:
    """Bounded poll until *count* events named *event* were written."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in records(server.audit.getvalue()) if r["event"] == event]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def refuse(server: RunningServer, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        server.connect(**kwargs)
    return int(info.value.response.status_code)


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    out = json.loads(data)
    assert isinstance(out, dict)
    return out


def ping(ws: ClientConnection, ident: str | int) -> dict[str, Any]:
    """Send a demo ping; return the server's answer (a pong or an error frame)."""
    ws.send(json.dumps({"type": "ping", "id": ident}))
    return recv_json(ws)


def assert_alive(ws: ClientConnection, ident: str) -> None:
    answer = ping(ws, ident)
    assert (answer["type"], answer["id"]) == ("pong", ident), answer


# -- shape of every record ---------------------------------------------------------------


def test_every_line_is_one_json_object_with_time_and_event(server: RunningServer) -> None:
    assert status_of(raw_http(server.port, upgrade_request("/"))) == 401
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
    wait_for(server, "connection_closed")
    text = server.audit.getvalue()
    lines = text.split("\n")
    assert lines[-1] == ""
    parsed = records(text)
    assert len(parsed) == len(lines) - 1 == 3
    assert [r["event"] for r in parsed] == [
        "handshake_refused",
        "connection_admitted",
        "connection_closed",
    ]
    for record in parsed:
        assert isinstance(record["time"], str)
        assert record["time"].endswith("Z")
        assert record["time"][:4].isdigit() and "T" in record["time"]
        assert isinstance(record["event"], str) and record["event"]
        assert list(record)[:2] == ["time", "event"]
        assert all(v is not None for v in record.values())


def test_refused_handshake_record(server: RunningServer) -> None:
    assert status_of(raw_http(server.port, upgrade_request("/room/7?x=1"))) == 401
    (record,) = wait_for(server, "handshake_refused")
    assert record["status"] == 401
    assert record["reason"] == "missing_credentials"
    assert record["client"] == "127.0.0.1"
    assert record["path"] == "/room/7?x=1"
    assert "subject" not in record and "connection_id" not in record


def test_refused_origin_record_carries_origin(server: RunningServer) -> None:
    assert refuse(server, origin="https://evil.example") == 403
    (record,) = wait_for(server, "handshake_refused")
    assert record["status"] == 403
    assert isinstance(record["reason"], str) and "origin" in record["reason"]
    assert record["origin"] == "https://evil.example"
    assert record["client"] == "127.0.0.1"
    assert record["path"] == "/"


def test_admitted_and_closed_records(server_factory: ServerFactory) -> None:
    server = server_factory({"origin": {"allowed": [APP_ORIGIN]}})
    with server.connect(make_token("alice"), origin=APP_ORIGIN) as ws:
        welcome = json.loads(ws.recv(timeout=5))
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
        ws.send(json.dumps({"type": "ping", "id": 2}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
    (closed,) = wait_for(server, "connection_closed")
    (admitted,) = wait_for(server, "connection_admitted")
    assert admitted["connection_id"] == welcome["connection_id"]
    assert admitted["client"] == "127.0.0.1"
    assert admitted["subject"] == "alice"
    assert admitted["origin"] == APP_ORIGIN
    assert closed["connection_id"] == welcome["connection_id"]
    assert closed["code"] == 1000
    assert isinstance(closed["duration_s"], float | int) and closed["duration_s"] >= 0
    assert closed["messages_in"] == 2
    assert closed["messages_out"] == 3  # welcome + two pongs
    assert closed["subject"] == "alice"
    assert closed["client"] == "127.0.0.1"


def test_refused_messages_are_audited_with_their_code_never_their_content(
    server: RunningServer,
) -> None:
    """Each error frame of the message policy is an audited refusal (authorization and
    validation failures belong in a security log), naming the connection, the type and
    the stable code; the message itself is never written."""
    with server.connect_welcomed(make_token("alice", scopes="chat")) as ws:
        ws.send(json.dumps({"type": "command", "id": "c1", "cmd": "secret-value-1"}))
        assert json.loads(ws.recv(timeout=5))["code"] == "forbidden"
        ws.send('{"type": "chat", "text": ["secret-value-2"], "id": "c2"}')
        assert json.loads(ws.recv(timeout=5))["code"] == "invalid_message"
        ws.send("not json secret-value-3")
        assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
    refused = wait_for(server, "message_refused", count=3)
    assert [(r["code"], r.get("type")) for r in refused] == [
        ("forbidden", "command"),
        ("invalid_message", "chat"),
        ("invalid_json", None),
    ]
    assert all(r["subject"] == "alice" and r["client"] == "127.0.0.1" for r in refused)
    assert len({r["connection_id"] for r in refused}) == 1
    assert "secret-value" not in server.audit.getvalue()


def test_admitted_without_origin_has_no_origin_field(server: RunningServer) -> None:
    with server.connect_welcomed():
        (admitted,) = wait_for(server, "connection_admitted")
    assert "origin" not in admitted
    assert admitted["subject"] == "alice"


def test_closed_record_code_of_policy_close(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"violation_budget": 2}})
    with server.connect_welcomed() as ws:
        for _ in range(2):
            ws.send("{bad json")
            assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
        ws.send("{bad json")  # the third violation exceeds the budget
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    (closed,) = wait_for(server, "connection_closed")
    assert closed["code"] == 1008
    assert closed["cause"] == "invalid_json"
    assert closed["messages_in"] == 3


def test_closed_record_code_of_oversized_message(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"max_message_bytes": 1024, "bytes_per_minute": 4096}})
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "chat", "text": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # what the server sent
    (closed,) = wait_for(server, "connection_closed")
    assert closed["code"] == 1009


# -- log injection ------------------------------------------------------------------------


def test_client_strings_cannot_forge_lines(server: RunningServer) -> None:
    tricky_origin = 'https://e"vil\\.example", "event": "forged'
    requests = [
        upgrade_request('/%0d%0a{"event":"forged"}'),
        upgrade_request('/%0A{"time":"x","event":"forged"}%0A'),
        upgrade_request("/", headers={"Origin": tricky_origin}),
        upgrade_request("/", headers={"Origin": 'https://a.example\t{"event":"forged"}'}),
    ]
    for request in requests:
        status = status_of(raw_http(server.port, request))
        assert status in (401, 403)
    found = wait_for(server, "handshake_refused", len(requests))
    assert len(found) == len(requests)
    text = server.audit.getvalue()
    parsed = records(text)
    assert len(parsed) == text.count("\n") == len(requests)
    assert all(r["event"] == "handshake_refused" for r in parsed)
    assert not any(r["event"] == "forged" for r in parsed)
    assert parsed[0]["path"] == '/%0d%0a{"event":"forged"}'
    assert parsed[2]["origin"] == tricky_origin  # escaped, and read back exactly
    assert "\r" not in text and "\t" not in text


def test_long_values_are_truncated(server: RunningServer) -> None:
    long_path = "/" + "p" * 6000
    long_origin = "https://" + "o" * 5000 + ".example"
    assert 400 <= status_of(raw_http(server.port, upgrade_request(long_path))) < 500
    assert (
        status_of(raw_http(server.port, upgrade_request("/", headers={"Origin": long_origin})))
        == 403
    )
    huge = raw_http(server.port, upgrade_request("/" + "q" * 10_240))
    assert 400 <= status_of(huge) < 500
    found = wait_for(server, "handshake_refused", 2)
    assert len(found) >= 2
    text = server.audit.getvalue()
    for record in records(text):
        for value in record.values():
            if isinstance(value, str):
                assert len(value) <= MAX_FIELD + 3
    assert "p" * (MAX_FIELD + 1) not in text
    assert "o" * (MAX_FIELD + 1) not in text
    assert "q" * (MAX_FIELD + 1) not in text
    by_path = [r for r in found if r.get("path", "").startswith("/ppp")]
    assert by_path and by_path[0]["path"].endswith("...")
    by_origin = [r for r in found if r.get("origin", "").startswith("https://ooo")]
    assert by_origin and by_origin[0]["origin"].endswith("...")
    with server.connect_welcomed():  # the server is still fine
        pass


def test_unicode_line_separators_are_escaped(server: RunningServer) -> None:
    # Header bytes outside ASCII reach the policy as latin-1 characters: \xc2\x85 is
    # "Â" + NEL (U+0085), a C1 control character and a line break for str.splitlines().
    request = upgrade_request("/").replace(
        b"\r\n\r\n", b"\r\nOrigin: https://a\xc2\x85{}\xc2\x85b.example\r\n\r\n"
    )
    assert status_of(raw_http(server.port, request)) == 403
    (record,) = wait_for(server, "handshake_refused")
    assert "\x85" in record["origin"]  # the value is kept (escaped), not dropped
    text = server.audit.getvalue()
    assert len(text.splitlines()) == 1, text.splitlines()
    assert not any(0x80 <= ord(ch) <= 0x9F or ch in "\u2028\u2029" for ch in text)


def test_invisible_format_characters_from_a_client_are_escaped(server: RunningServer) -> None:
    """A token id carrying a right-to-left override or zero-width characters (the subject
    refuses them; a jti is the issuer's string) is written escaped: a line in a terminal
    or a log viewer reads as it is, not reordered."""
    tricky = "ok\u202egpj.exe\u200b\u2066x\ufeff\xad\U000e0041"
    with server.connect_welcomed(make_token(jti=tricky)):
        pass
    (admitted,) = wait_for(server, "connection_admitted")
    assert admitted["token_id"] == tricky  # kept, as JSON escapes
    text = server.audit.getvalue()
    for ch in "\u202e\u200b\u2066\ufeff\xad":
        assert ch not in text
        assert f"\\u{ord(ch):04x}" in text
    assert "\U000e0041" not in text and "\\udb40\\udc41" in text  # a tag character


def test_every_invisible_format_character_is_escaped() -> None:
    """Every character of Unicode's format category (Cf) this Python knows, whatever
    field it is in, leaves the writer escaped; the line reads back as the same value."""
    import io
    import unicodedata

    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]
    stream = io.StringIO()
    log = AuditLog(stream)
    for ch in chars:
        log.emit("x", token_id=f"a{ch}b")
    lines = stream.getvalue().splitlines()
    log.close()
    assert len(lines) == len(chars)
    for ch, line in zip(chars, lines, strict=True):
        assert ch not in line, hex(ord(ch))
        assert json.loads(line)["token_id"] == f"a{ch}b"


# -- secrets are never logged ---------------------------------------------------------------


def test_tokens_cookies_and_bodies_never_logged(server_factory: ServerFactory) -> None:
    server = server_factory(
        {"auth": {"query": True, "cookie": True}, "origin": {"allowed": [APP_ORIGIN]}}
    )
    marker = "BODY-MARKER-7f3a9c"
    cookie_marker = "COOKIE-MARKER-51be2d"
    tokens = {
        transport: make_token(f"user-{transport}", jti=f"jti-{transport}")
        for transport in ("header", "subprotocol", "query", "cookie")
    }
    for transport, token in tokens.items():
        headers = {"Cookie": f"session={cookie_marker}"} if transport == "cookie" else None
        with server.connect_welcomed(
            token,
            transport=transport,
            origin=APP_ORIGIN,
            subprotocols=["wsguard.v1"] if transport == "subprotocol" else None,
            headers=headers,
        ) as ws:
            ws.send(json.dumps({"type": "chat", "text": f"{marker} {transport}"}))
            ws.send(json.dumps({"type": "chat", "text": 42, "note": marker}))
            assert json.loads(ws.recv(timeout=5))["code"] == "invalid_message"
            ws.send(f"{{not json {marker}")
            assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
            ws.send(json.dumps({"type": f"x{marker}"}))
            assert json.loads(ws.recv(timeout=5))["code"] == "unknown_type"

    refused = {
        "expired-header": make_token("eve", ttl=-60),
        "badsig-subprotocol": make_token("eve", secret="x" * 40),
        "badsig-query": make_token("eve", secret="y" * 40),
        "badsig-cookie": make_token("eve", secret="z" * 40),
    }
    # cookie auth is on, so every handshake needs an allowed Origin to reach the token check
    assert refuse(server, token=refused["expired-header"], origin=APP_ORIGIN) == 401
    assert (
        refuse(
            server, token=refused["badsig-subprotocol"], transport="subprotocol", origin=APP_ORIGIN
        )
        == 401
    )
    assert (
        refuse(server, token=refused["badsig-query"], transport="query", origin=APP_ORIGIN) == 401
    )
    assert (
        refuse(
            server,
            token=refused["badsig-cookie"],
            transport="cookie",
            origin=APP_ORIGIN,
            headers={"Cookie": f"session={cookie_marker}"},
        )
        == 401
    )

    closed = wait_for(server, "connection_closed", 4)
    assert len(closed) == 4
    refusals = wait_for(server, "handshake_refused", 4)
    assert len(refusals) == 4
    admitted = wait_for(server, "connection_admitted", 4)
    assert sorted(r["subject"] for r in admitted) == sorted(f"user-{t}" for t in tokens)
    text = server.audit.getvalue()
    for token in [*tokens.values(), *refused.values()]:
        _header, payload, signature = token.split(".")
        assert token not in text
        assert payload not in text
        assert signature not in text
    assert marker not in text
    assert cookie_marker not in text
    assert "wsguard_token" not in text
    assert any(r.get("path") == "/?token=REDACTED" for r in records(text))


@contextmanager
def served(args: list[str], env: dict[str, str], audit_path: Path) -> Iterator[Served]:
    proc = Served(args, env, audit_path)
    try:
        yield proc
    finally:
        proc.kill()


def test_debug_logs_and_audit_never_contain_a_token(tmp_path: Path) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text(
        f'[auth]\ncookie = true\nquery = true\n[origin]\nallowed = ["{APP_ORIGIN}"]\n'
    )
    tokens = {
        "header": make_token("via-header"),
        "subprotocol": make_token("via-subprotocol"),
        "cookie": make_token("via-cookie"),
        "query": make_token("via-query"),
        "refresh": make_token("via-header", ttl=7200),
        "bad-header": BAD_TOKEN,
        "bad-query": make_token("q", secret="another-wrong-secret-long-enough-0123456789"),
    }
    args = ["--config", str(config), "--port", "0", "--log-level", "debug"]
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    with served(args, env, tmp_path / "audit.jsonl") as proc:
        port = proc.wait_listening()
        base = f"ws://{proc.host}:{port}/"

        def open_with(transport: str, token: str) -> ClientConnection:
            # cookie auth is on, so every handshake comes from the allowed page
            url, headers = base, {}
            protocols = [Subprotocol("wsguard.v1")]
            if transport == "header":
                headers["Authorization"] = f"Bearer {token}"
            elif transport == "subprotocol":
                protocols.append(Subprotocol(f"token.{token}"))
            elif transport == "cookie":
                headers["Cookie"] = f"wsguard_token={token}"
            else:
                url = f"{base}?token={token}"
            return connect(
                url,
                additional_headers=headers,
                subprotocols=protocols,
                origin=Origin(APP_ORIGIN),
                open_timeout=10,
            )

        for transport in ("header", "subprotocol", "cookie", "query"):
            with open_with(transport, tokens[transport]) as ws:
                assert recv_json(ws)["type"] == "welcome"
                assert_alive(ws, transport)
                if transport == "header":  # in-band refresh carries a token in a frame
                    ws.send(json.dumps({"type": "auth", "token": tokens["refresh"], "id": 1}))
                    assert recv_json(ws)["type"] == "auth_ok"
        for transport, name in (("header", "bad-header"), ("query", "bad-query")):
            with pytest.raises(InvalidStatus) as info:
                open_with(transport, tokens[name]).close()
            assert info.value.response.status_code == 401
        assert proc.stop() == 0
        logs = proc.stderr
        audit = proc.audit_path.read_text()
    assert " DEBUG " in logs, f"the server did not log at debug level:\n{logs}"
    events = [json.loads(line)["event"] for line in audit.splitlines() if line]
    assert events.count("connection_admitted") == 4, events
    assert events.count("handshake_refused") == 2, events
    for name, token in tokens.items():
        signature = token.rsplit(".", 1)[1]
        for where, text in (("server log", logs), ("audit log", audit)):
            assert token not in text, f"{name} token in the {where}"
            assert signature not in text, f"{name} token signature in the {where}"


def test_embedded_app_with_debug_logging_never_logs_tokens(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An App embedded in a program that logs everything at DEBUG: the engine's debug
    records (raw request headers) stay suppressed, so no token reaches any handler."""
    import logging

    caplog.set_level(logging.DEBUG)
    logging.getLogger("wsguard.server").debug("capture check")  # proves DEBUG is captured
    running = server_factory()
    token = make_token("alice", scopes="chat")
    with running.connect(token) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        ws.recv(timeout=5)
    with pytest.raises(InvalidStatus):
        running.connect(token + "x")
    # the test's own client logs its headers too: only the server side is checked
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert server_records, "debug logging was not captured at all"
    text = "\n".join(record.getMessage() for record in server_records)
    signature = token.rsplit(".", 1)[1]
    assert signature not in text
    assert token.split(".")[1] not in text


# -- where the audit goes ---------------------------------------------------------------------


def test_audit_log_open_appends_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"time":"earlier","event":"kept"}\n')
    first = AuditLog.open(str(path))
    first.emit("one", client="127.0.0.1", subject=None)
    first.close()
    second = AuditLog.open(str(path))
    second.emit("two", connection_id="c1")
    second.close()
    parsed = records(path.read_text())
    assert [r["event"] for r in parsed] == ["kept", "one", "two"]
    assert parsed[1]["client"] == "127.0.0.1"
    assert "subject" not in parsed[1]  # None fields are left out
    assert parsed[2]["connection_id"] == "c1"


def test_a_new_audit_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It names clients, subjects and token ids: created 0600 whatever the umask; an
    existing file keeps the mode its operator gave it."""
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        created = tmp_path / "new.jsonl"
        AuditLog.open(str(created)).close()
        assert stat.S_IMODE(created.stat().st_mode) == 0o600
        shared = tmp_path / "shared.jsonl"
        shared.touch(mode=0o640)
        shared.chmod(0o640)
        AuditLog.open(str(shared)).close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_audit_log_disabled_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "off.jsonl"
    log = AuditLog.open(str(path), enabled=False)
    log.emit("handshake_refused", status=401)
    log.close()
    assert path.read_text() == ""


def run_with_config_audit(overrides: dict[str, Any]) -> None:
    """Run a server whose audit log comes from the configuration, and exercise it."""
    guard = Guard(make_config(overrides))
    app = App(guard=guard)
    install_demo(app)
    running = RunningServer(app, AuditCapture()).start()
    try:
        assert status_of(raw_http(running.port, upgrade_request("/"))) == 401
        with running.connect_welcomed() as ws:
            ws.send(json.dumps({"type": "ping", "id": 1}))
            assert json.loads(ws.recv(timeout=5))["type"] == "pong"
        deadline = time.monotonic() + 5
        while running.connection_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.connection_count() == 0
    finally:
        running.stop()


def test_configured_audit_file_receives_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    run_with_config_audit({"audit": {"enabled": True, "file": str(path)}})
    events = [r["event"] for r in records(path.read_text())]
    assert events[0] == "handshake_refused"
    assert "connection_admitted" in events
    assert "connection_closed" in events


def test_audit_enabled_false_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    run_with_config_audit({"audit": {"enabled": False, "file": str(path)}})
    assert not path.exists() or path.read_text() == ""
    out = capsys.readouterr()
    assert '"event"' not in out.out and '"event"' not in out.err


def test_background_audit_never_blocks_on_a_stuck_pipe() -> None:
    """A pipe nobody reads must not stall the server: lines are dropped and counted."""
    import os
    import threading

    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    log = AuditLog(stream, background=True, queue_size=100)
    done = threading.Event()

    def flood() -> None:
        for i in range(20_000):
            log.emit("handshake_refused", status=400, reason="bad_request", n=i)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(timeout=10), "emit blocked on a full pipe"
    assert log.dropped > 0
    os.close(read_fd)
    log.close()  # bounded: returns even though the pipe was never drained


def test_emit_never_raises_on_a_closed_stream() -> None:
    import io

    stream = io.StringIO()
    log = AuditLog(stream)
    stream.close()
    log.emit("connection_admitted", client="127.0.0.1")
    assert log.write_errors == 1


def test_background_writer_keeps_every_line_whole_and_in_order(tmp_path: Path) -> None:
    """Lines are written in batches: none lost, split, merged or reordered."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(str(path))
    for n in range(5000):
        log.emit("probe", n=n, text="x" * (n % 50))
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["n"] for r in records] == list(range(5000))
    assert log.dropped == 0


def test_one_unwritable_line_does_not_lose_its_batch() -> None:
    """A line the stream refuses (say, unencodable) costs that line only."""

    class Picky(io.StringIO):
        def write(self, text: str) -> int:
            if "poison" in text:
                raise UnicodeEncodeError("ascii", text, 0, 1, "not ascii")
            return super().write(text)

        def close(self) -> None:  # keep the text readable after AuditLog.close()
            pass

    stream = Picky()
    log = AuditLog(stream, background=True)
    for n in range(300):
        log.emit("probe", n=n, origin="poison" if n == 150 else "https://ok.example")
    log.close()
    written = [json.loads(line)["n"] for line in stream.getvalue().splitlines()]
    assert written == [n for n in range(300) if n != 150]
    assert log.write_errors == 1
