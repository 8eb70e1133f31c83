"""Starting a server: ``App.run()``, ``wsguard serve`` and ``wsguard proxy`` as real processes.

They start the same way: one ``listening on`` line, and a port already in use is one line
and exit status 1 (a configuration refused at start: status 2); ``await app.serve()`` raises
:class:`ListenError` instead.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_config
from support.cli import SECRET, cli_env, run_cli
from support.serve_process import Served
from wsguard import App, ListenError
from wsguard.errors import WsguardError

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


def test_a_host_given_no_configuration_reads_the_environment_as_serve_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``App()`` and ``WsGuardMiddleware(app)`` took the embedded defaults alone: a
    newcomer's WSGUARD_JWT_SECRET, Origin allowlist and port were dropped silently (the
    development key used instead, the browser refused)."""
    from wsguard.asgi import WsGuardMiddleware

    config_file = tmp_path / "w.toml"
    config_file.write_text("[limits]\nmax_message_bytes = 4096\n")
    config_file.chmod(0o600)
    monkeypatch.setenv("WSGUARD_JWT_SECRET", SECRET)
    monkeypatch.setenv("WSGUARD_PORT", "42718")
    monkeypatch.setenv("WSGUARD_ORIGIN__ALLOWED", '["http://localhost:3000"]')
    monkeypatch.setenv("WSGUARD_CONFIG", str(config_file))

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    for config in (App().config, WsGuardMiddleware(app).config):
        assert config.port == 42718
        assert config.origin.allowed == ("http://localhost:3000",)
        assert config.auth.secret == SECRET
        assert config.limits.max_message_bytes == 4096
    assert not App().guard.key_info.dev_key


def test_the_start_up_hints_name_the_configuration_file_and_the_origin_allowlist(
    tmp_path: Path,
) -> None:
    """``App(load_config(file)).run()`` told to mint tokens without ``--config``: a
    configuration with an issuer or audience then refused them (401). An empty Origin
    allowlist refuses every browser with no hint on the server's side."""
    config = tmp_path / "app.toml"
    config.write_text('[auth]\nissuer = "https://issuer.example"\n')
    config.chmod(0o600)
    source = APP_SCRIPT.replace("load_config()", f"load_config({str(config)!r})")
    user = ScriptServer(source, cli_env(tmp_path, WSGUARD_PORT="0"), tmp_path)
    try:
        user.wait_listening()
        hint = user.wait_for(re.compile(r"mint a token:  (wsguard token .*)$"))
        assert f"wsguard token --config {config} --sub alice" in hint.group(1)
        user.wait_for("WSGUARD_ORIGIN__ALLOWED=")
        args = hint.group(1).split()[1:]
        token = run_cli(args, cli_env(tmp_path)).stdout.strip()
        with user.connect(token) as ws:  # the token the hint mints is accepted
            assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    finally:
        user.kill()
