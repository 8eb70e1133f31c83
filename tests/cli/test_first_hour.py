"""The first hour of a new user: what the README's first steps meet, as real processes.

1. ``App.run()``, ``wsguard serve`` and ``wsguard proxy`` start the same way: one
   ``listening on`` line, and a port already in use is one line and exit status 1 (a
   configuration error: 2); ``await app.serve()`` raises :class:`ListenError` instead.
2. A delivered message whose type has no handler is answered (``unhandled_type``), and the
   welcome frame's ``types`` lists only the types that are handled.
3. ``wsguard admin`` finds the admin listener of ``wsguard serve --admin-port`` with no flag,
   or takes the same ``--admin-port``, or says exactly what to pass.
4. A mistyped flag after a subcommand gets that subcommand's usage and the closest flag; a
   mistyped configuration key gets the closest valid key.
5. Under an ASGI server, a connection the server fails itself (its ``ws_max_size``: 1009;
   1002; 1007) is recorded as closed by the server with its cause, as wsguard's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from conftest import RunningServer, ServerFactory, eventually, make_config, make_token
from support.asgi_server import AsgiServer, Recorder
from support.asgi_server import demo_echo_app as echo_app
from support.cli import SECRET, cli_env, run_cli
from support.net import free_port
from support.serve_process import Served
from support.wire import OP_CLOSE, OP_TEXT, RawClient, frame, ping_frame
from wsguard import App, ListenError
from wsguard.config.loader import load_config, validate_config
from wsguard.errors import ConfigError, WsguardError
from wsguard.session import Connection

LISTENING_LINE = re.compile(
    r"^wsguard: listening on ws://127\.0\.0\.1:(\d+)/ \(engine (picows|websockets)\)$"
)
IN_USE = "wsguard: cannot listen on 127.0.0.1:{port}{what}: address already in use"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


# -- 1. one way to start: App.run(), wsguard serve, wsguard proxy ----------------------------

#: A user's program: App.run() with a handler of its own (HOME is the test's: dev key).
APP_SCRIPT = """
from wsguard import App, load_config

app = App(load_config())


@app.on("chat")
def chat(conn, message):
    conn.send({"type": "got", "text": message["text"]})


app.run()
"""


class ScriptServer(Served):
    """A Python program run as a subprocess, read like ``Served`` (stderr lines)."""

    def __init__(self, source: str, env: dict[str, str], tmp_path: Path) -> None:
        script = tmp_path / "user_app.py"
        script.write_text(source)
        self.audit_path = tmp_path / "user-audit.jsonl"
        self._audit_fh = self.audit_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._audit_fh,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        self.host = ""
        self.port = 0


def run_script(
    source: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_app.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_app_run_prints_the_listening_line_of_wsguard_serve(tmp_path: Path) -> None:
    env = cli_env(tmp_path, WSGUARD_PORT="0")
    user = ScriptServer(APP_SCRIPT, env, tmp_path)
    served = Served(["--port", "0"], env, tmp_path / "serve-audit.jsonl")
    try:
        lines = []
        for process in (user, served):
            port = process.wait_listening()
            line = next(li for li in process.stderr_lines if "listening on" in li).rstrip("\n")
            match = LISTENING_LINE.match(line)
            assert match is not None, line
            assert int(match.group(1)) == port
            lines.append(LISTENING_LINE.sub("wsguard: listening on <url> (engine <e>)", line))
        assert lines[0] == lines[1]
        # both print how to mint a token for the development key, too
        user.wait_for("mint a token")
        token = run_cli(["token", "--sub", "alice", "--scope", "chat"], env).stdout.strip()
        with user.connect(token) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
            ws.send(json.dumps({"type": "chat", "text": "hi"}))
            assert json.loads(ws.recv(timeout=5)) == {"type": "got", "text": "hi"}
        assert user.stop() == 0  # SIGTERM: a clean exit
    finally:
        user.kill()
        served.kill()


@pytest.mark.parametrize("how", ["App.run", "serve", "proxy"])
def test_a_port_in_use_is_one_line_and_status_1(tmp_path: Path, busy_port: int, how: str) -> None:
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_PORT=str(busy_port))
    if how == "App.run":
        done = run_script(APP_SCRIPT, env, tmp_path)
    elif how == "serve":
        done = run_cli(["serve"], env)
    else:
        done = run_cli(["proxy", "--upstream", "ws://127.0.0.1:9/"], env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == IN_USE.format(port=busy_port, what=""), done.stderr
    if how == "proxy":
        assert done.stderr.splitlines()[0] == "wsguard: forwarding to ws://127.0.0.1:9/"
    else:
        assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.parametrize("how", ["App.run", "serve"])
def test_an_admin_port_in_use_is_one_line_and_status_1(
    tmp_path: Path, busy_port: int, how: str
) -> None:
    env = cli_env(
        tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_PORT="0", WSGUARD_ADMIN_PORT=str(busy_port)
    )
    done = run_script(APP_SCRIPT, env, tmp_path) if how == "App.run" else run_cli(["serve"], env)
    assert done.returncode == 1, done.stderr
    want = IN_USE.format(port=busy_port, what=" (admin listener)")
    assert done.stderr.splitlines() == [want], done.stderr


@pytest.mark.parametrize("how", ["App.run", "serve"])
def test_a_configuration_refused_at_start_is_one_line_and_status_2(
    tmp_path: Path, how: str
) -> None:
    # plaintext on a non-loopback address: refused by App.start(), not by load_config()
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_HOST="0.0.0.0", WSGUARD_PORT="0")
    done = run_script(APP_SCRIPT, env, tmp_path) if how == "App.run" else run_cli(["serve"], env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("wsguard: configuration error: tls.cert_file: refusing plaintext")


def test_await_serve_raises_listen_error_with_the_same_message(busy_port: int) -> None:
    app = App(make_config({"port": busy_port, "engine": "websockets"}))

    async def main() -> None:
        await app.serve()

    with pytest.raises(ListenError) as info:
        asyncio.run(main())
    assert str(info.value) == f"cannot listen on 127.0.0.1:{busy_port}: address already in use"
    assert isinstance(info.value, WsguardError) and isinstance(info.value, OSError)
    assert info.value.errno == 98  # EADDRINUSE, as the bind said
    assert app.url is None


# -- 2. every delivered type is answered; the welcome frame tells the truth ----------------------


def chat_only(app: App) -> None:
    @app.on("chat")
    def chat(conn: Connection, message: dict[str, Any]) -> None:
        conn.send({"type": "got", "text": message["text"]})


def test_a_type_without_a_handler_gets_an_unhandled_type_error(
    server_factory: ServerFactory,
) -> None:
    budget = 3
    server = server_factory({"limits": {"violation_budget": budget}}, demo=False, setup=chat_only)
    with server.connect() as ws:
        welcome = json.loads(ws.recv(timeout=5))
        assert welcome["types"] == ["auth", "chat"]  # not ping, data, command: no handler
        for i in range(budget + 2):  # not a violation: the policy passed it
            ws.send(json.dumps({"type": "ping", "id": f"p{i}"}))
            error = json.loads(ws.recv(timeout=5))
            assert isinstance(error.pop("message"), str)
            assert error == {"type": "error", "code": "unhandled_type", "ref": f"p{i}"}
        ws.send(json.dumps({"type": "chat", "text": "still here"}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "got", "text": "still here"}


def test_welcome_types_follow_the_handlers(server_factory: ServerFactory) -> None:
    def raw_and_typed(app: App) -> None:
        chat_only(app)

        @app.on("data", raw=True)
        def data(conn: Connection, raw: str | bytes) -> None:
            conn.send_raw(raw)

    def catch_all(app: App) -> None:
        chat_only(app)

        @app.on_message
        def anything(conn: Connection, raw: str | bytes) -> None:
            conn.send({"type": "caught"})

    def types_of(server: RunningServer) -> list[str]:
        with server.connect() as ws:
            welcome: dict[str, Any] = json.loads(ws.recv(timeout=5))
        return list(welcome["types"])

    everything = ["auth", "chat", "command", "data", "ping"]
    assert types_of(server_factory()) == everything  # the demo handles all of them
    assert types_of(server_factory(demo=False, setup=raw_and_typed)) == ["auth", "chat", "data"]
    with_catch_all = server_factory(demo=False, setup=catch_all)
    assert types_of(with_catch_all) == everything
    with with_catch_all.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "caught"}
    assert types_of(server_factory(demo=False)) == ["auth"]


# -- 3. wsguard admin finds the listener wsguard serve --admin-port opened -------------------


def test_admin_finds_the_listener_of_serve_admin_port_without_a_flag(tmp_path: Path) -> None:
    admin_port = free_port()
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    served = Served(["--port", "0", "--admin-port", str(admin_port)], env, tmp_path / "a.jsonl")
    try:
        served.wait_listening()
        served.wait_for("admin listener on")
        done = run_cli(["admin", "health"], env)  # no --url, no WSGUARD_ADMIN_*
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["readiness"] == {"ready": True}
        bans = run_cli(["admin", "bans"], env)  # with the generated token, found as before
        assert (bans.returncode, json.loads(bans.stdout)) == (0, {"bans": []}), bans.stderr
        # another user's HOME has no running server: the same flag as the server's, or the URL
        elsewhere = cli_env(tmp_path / "other")
        assert run_cli(["admin", "health"], elsewhere).returncode == 2
        flag = run_cli(["admin", "health", "--admin-port", str(admin_port)], elsewhere)
        assert flag.returncode == 0, flag.stderr
        url = f"http://127.0.0.1:{admin_port}"
        by_env = run_cli(["admin", "health"], {**elsewhere, "WSGUARD_ADMIN_URL": url})
        assert by_env.returncode == 0, by_env.stderr
        assert "ignoring unknown environment variable" not in by_env.stderr
        assert served.stop() == 0
        gone = run_cli(["admin", "health"], env)  # the server removed what it wrote
        assert gone.returncode == 2
        assert "--admin-port PORT" in gone.stderr and "--url" in gone.stderr
    finally:
        served.kill()


def test_admin_ignores_the_url_of_a_server_that_is_gone(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    record = tmp_path / ".local" / "share" / "wsguard" / "admin.url"
    record.parent.mkdir(parents=True)
    port = free_port()
    record.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": int(ended.stdout)}))
    done = run_cli(["admin", "health"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "no admin listener to talk to" in done.stderr
    assert "cannot reach" not in done.stderr
    # a running server's record is used (here the test itself is the "server")
    record.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": os.getpid()}))
    done = run_cli(["admin", "health"], cli_env(tmp_path))
    assert done.returncode == 1
    assert "cannot reach the admin listener" in done.stderr


def test_admin_refused_for_want_of_a_token_says_what_to_pass(tmp_path: Path) -> None:
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_ADMIN_TOKEN="x" * 32)
    served = Served(["--port", "0", "--admin-port", "0"], env, tmp_path / "a.jsonl")
    try:
        served.wait_listening()
        url = served.wait_for(re.compile(r"admin listener on (http://\S+)/ ")).group(1)
        assert httpx.get(url + "/healthz").status_code == 200
        without = {k: v for k, v in env.items() if k != "WSGUARD_ADMIN_TOKEN"}
        done = run_cli(["admin", "bans"], without)
        assert done.returncode == 1
        assert "401 unauthorized" in done.stderr and "WSGUARD_ADMIN_TOKEN" in done.stderr
    finally:
        served.kill()


# -- 4. mistyped flags and keys -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "usage", "unknown", "closest"),
    [
        (["serve", "--prot", "9000"], "wsguard serve", "--prot", "--port"),
        (["proxy", "--upstreem", "ws://x/"], "wsguard proxy", "--upstreem", "--upstream"),
        (["admin", "health", "--admin-prot", "1"], "wsguard admin health", "--admin-prot",
         "--admin-port"),
        (["token", "--sub", "a", "--tll", "1h"], "wsguard token", "--tll", "--ttl"),
        (["check-config", "--bogus"], "wsguard check-config", "--bogus", None),
    ],
)  # fmt: skip
def test_a_mistyped_flag_gets_the_subcommand_usage(
    tmp_path: Path, args: list[str], usage: str, unknown: str, closest: str | None
) -> None:
    done = run_cli(args, cli_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: {usage} "), done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"{usage}: error: unrecognized arguments: {unknown}"), error
    if closest is not None:
        assert error.endswith(f"(did you mean {closest}?)"), error
    assert "usage: wsguard [-h]" not in done.stderr


@pytest.mark.parametrize(
    ("data", "key", "closest"),
    [
        ({"limits": {"max_mesage_bytes": 100}}, "limits.max_mesage_bytes",
         "limits.max_message_bytes"),
        ({"limit": {"max_message_bytes": 100}}, "limit", "limits"),
        ({"max_message_bytes": 100}, "max_message_bytes", "limits.max_message_bytes"),
        ({"limits": {"ping_interval_seconds": 5}}, "limits.ping_interval_seconds",
         "liveness.ping_interval_seconds"),
        ({"messages": {"types": {"note": {"shema": {}}}}}, "messages.types.note.shema",
         "messages.types.note.schema"),
        ({"admin": {"prot": 9090}}, "admin.prot", "admin.port"),
        ({"bogus_top_level": 1}, "bogus_top_level", None),
    ],
)  # fmt: skip
def test_a_mistyped_key_suggests_the_closest(
    data: dict[str, Any], key: str, closest: str | None
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert info.value.key == key
    suffix = f" (did you mean {closest}?)" if closest else ""
    assert info.value.message == f"unknown key{suffix}"


def test_a_mistyped_key_in_a_file_or_the_environment_suggests_the_closest(
    tmp_path: Path,
) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text("[limits]\nmax_mesage_bytes = 100\n")
    done = run_cli(["check-config", "--config", str(config)], cli_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "wsguard: configuration error: limits.max_mesage_bytes: unknown key "
        "(did you mean limits.max_message_bytes?)"
    )
    for name, closest in [
        ("WSGUARD_LIMITS__MAX_MESAGE_BYTES", "WSGUARD_LIMITS__MAX_MESSAGE_BYTES"),
        ("WSGUARD_LIMITS_MAX_MESSAGE_BYTES", "WSGUARD_LIMITS__MAX_MESSAGE_BYTES"),
        ("WSGUARD_ADMIN_PROT", "WSGUARD_ADMIN_PORT"),
    ]:
        done = run_cli(["check-config"], cli_env(tmp_path, **{name: "100"}))
        assert done.returncode == 0, done.stderr
        assert (
            f"wsguard: ignoring unknown environment variable {name} (did you mean {closest}?)"
            in done.stderr
        ), done.stderr
    # an unrelated name gets no guess
    assert load_config(env={"WSGUARD_ZZZ": "1"}) is not None


# -- 5. under ASGI, the server's own failures are the server's -----------------------------


@pytest.fixture
def asgi_server() -> Iterator[AsgiServer]:
    config = make_config({"limits": {"max_message_bytes": 1024}})
    server = AsgiServer("uvicorn-sansio", echo_app, config, Recorder(), 1024)
    server.start()
    yield server
    server.stop()


def raw_client(server: AsgiServer) -> RawClient:
    client = RawClient(cast(RunningServer, server), make_token())
    assert client.recv_json()["type"] == "welcome"
    return client


def closed_record(server: AsgiServer) -> dict[str, Any]:
    events = eventually(lambda: server.audit.events("connection_closed"), what="closed")
    assert len(events) == 1, events
    return events[0]


def read_close(client: RawClient) -> int:
    code = client.read_close()
    client.send(frame(OP_CLOSE, client.close_payload[:2]))
    client.sock.close()
    return code


def test_asgi_servers_own_1009_is_a_server_size_refusal(asgi_server: AsgiServer) -> None:
    metrics = asgi_server.guard.monitor.metrics
    with raw_client(asgi_server) as client:
        client.send(frame(OP_TEXT, b'{"type":"ping","id":"big"}'.ljust(1025)))
        assert read_close(client) == 1009  # uvicorn's ws_max_size, not wsguard's check
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record["cause"]) == (1009, "server", "too_big")
    counted = asgi_server.call(lambda: (metrics.refusals["message", "size"], dict(metrics.closes)))
    assert counted == (1, {("1009", "server"): 1})  # as wsguard counts its own 1009


@pytest.mark.parametrize(
    ("payload", "code", "cause"),
    [
        (frame(OP_TEXT, b'{"type":"ping","id":"\xff"}'), 1007, "invalid_utf8"),
        (bytes([ping_frame("rsv")[0] | 0x20]) + ping_frame("rsv")[1:], 1002, "protocol_error"),
    ],
    ids=["1007", "1002"],
)
def test_asgi_server_failures_are_the_servers(
    asgi_server: AsgiServer, payload: bytes, code: int, cause: str
) -> None:
    with raw_client(asgi_server) as client:
        client.send(payload)
        assert read_close(client) == code
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record["cause"]) == (code, "server", cause)


def test_asgi_client_close_stays_the_clients(asgi_server: AsgiServer) -> None:
    with raw_client(asgi_server) as client:
        client.send(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        read_close(client)
    record = closed_record(asgi_server)
    assert (record["code"], record["closed_by"], record.get("cause")) == (1000, "client", None)
