"""The ``wsguard`` command, run as a real subprocess: serve, token, check-config."""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from support.cli import SECRET, cli_env, mint, run_cli
from support.net import free_port
from support.paths import EXAMPLES
from support.serve_process import Served

EXAMPLE = EXAMPLES / "wsguard.toml"
LISTENING = re.compile(r"listening on ws://(\[[^\]]+\]|[^:/]+):(\d+)/")
DEV_KEY = Path(".local") / "share" / "wsguard" / "dev-jwt.key"


ServeFactory = Callable[[Sequence[str], dict[str, str]], "Served"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start ``wsguard serve`` subprocesses; every one is killed after the test."""
    started: list[Served] = []

    def start(args: Sequence[str], env: dict[str, str]) -> Served:
        served = Served(args, env, tmp_path / f"audit-{len(started)}.jsonl")
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def welcome_of(served: Served, token: str) -> dict[str, Any]:
    with served.connect(token) as ws:
        welcome: dict[str, Any] = json.loads(ws.recv(timeout=5))
    assert welcome["type"] == "welcome"
    return welcome


# -- configuration errors stop the server at once -------------------------------------


def test_serve_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_message_bytes = -1\n")
    started = time.monotonic()
    done = run_cli(["serve", "--config", str(bad)], cli_env(tmp_path))
    assert done.returncode == 2
    assert time.monotonic() - started < 10
    assert "limits.max_message_bytes" in done.stderr
    assert "greater than or equal to" in done.stderr
    assert "listening" not in done.stderr


def test_serve_bad_env_port_exits_2_naming_port(tmp_path: Path) -> None:
    done = run_cli(["serve"], cli_env(tmp_path, WSGUARD_PORT="notaport"))
    assert done.returncode == 2
    assert re.search(r"\bport: ", done.stderr), done.stderr
    assert "listening" not in done.stderr


def test_serve_missing_config_file_exits_2(tmp_path: Path) -> None:
    done = run_cli(["serve", "--config", str(tmp_path / "absent.toml")], cli_env(tmp_path))
    assert done.returncode == 2
    assert "config: file not found" in done.stderr


def test_serve_without_key_on_public_host_exits_nonzero(tmp_path: Path) -> None:
    done = run_cli(["serve", "--host", "0.0.0.0", "--port", "0"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "auth.secret" in done.stderr
    assert "listening" not in done.stderr
    assert not (tmp_path / DEV_KEY).exists()


def test_serve_unknown_log_level_flag_exits_2(tmp_path: Path) -> None:
    done = run_cli(["serve", "--log-level", "loud"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "--log-level" in done.stderr


# -- embedded defaults, dev key, token round trip ----------------------------------------


def test_serve_on_defaults_creates_dev_key_and_accepts_minted_token(
    tmp_path: Path, serve: ServeFactory
) -> None:
    served = serve(["--port", "0"], cli_env(tmp_path))
    port = served.wait_listening()
    assert served.host == "127.0.0.1"
    assert port > 0
    served.wait_for("wsguard token")
    assert "--sub alice" in served.stderr

    key_file = tmp_path / DEV_KEY
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    dev_secret = key_file.read_bytes().strip()
    assert len(dev_secret) >= 32
    assert dev_secret.decode() not in served.stderr  # the key is named, never printed

    token = mint(tmp_path, "--sub", "alice", "--scope", "chat", "--ttl", "1h")
    claims = jwt.decode(token, dev_secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 3600
    welcome = welcome_of(served, token)
    assert welcome["subject"] == "alice"
    assert welcome["scopes"] == ["chat"]
    assert welcome["limits"]["max_message_bytes"] == 8192

    # a token from another machine's dev key is refused before the upgrade
    other_home = tmp_path / "other"
    other_home.mkdir()
    foreign = mint(other_home, "--sub", "mallory", "--scope", "chat")
    with pytest.raises(InvalidStatus) as info:
        served.connect(foreign)
    assert info.value.response.status_code == 401

    assert served.stop() == 0  # SIGTERM is a clean shutdown
    events = served.audit_events()
    admitted = [e for e in events if e["event"] == "connection_admitted"]
    assert [e["subject"] for e in admitted] == ["alice"]
    refused = [e for e in events if e["event"] == "handshake_refused"]
    assert [e["status"] for e in refused] == [401]
    audit_text = served.audit_path.read_text()
    assert token not in audit_text and foreign not in audit_text


@pytest.mark.parametrize("ttl", ["bogus", "0", "1w", "0s"])
def test_token_bad_ttl_exits_2(tmp_path: Path, ttl: str) -> None:
    done = run_cli(["token", "--sub", "alice", "--ttl", ttl], cli_env(tmp_path))
    assert done.returncode == 2
    assert "--ttl" in done.stderr
    assert done.stdout == ""


def test_token_longer_than_the_server_accepts_exits_2(tmp_path: Path) -> None:
    """``token`` prints a token the configured server accepts: never one whose expiry is
    beyond ``auth.max_token_lifetime_seconds`` (1 day by default), which it refuses."""
    env = cli_env(tmp_path)
    done = run_cli(["token", "--sub", "alice", "--ttl", "2d"], env)
    assert done.returncode == 2
    assert "auth.max_token_lifetime_seconds" in done.stderr
    assert done.stdout == ""
    assert run_cli(["token", "--sub", "alice", "--ttl", "1d"], env).returncode == 0
    longer = {
        **env,
        "WSGUARD_AUTH__MAX_TOKEN_LIFETIME_SECONDS": str(3 * 86400),
        "WSGUARD_CLUSTER__REVOCATION_TTL_SECONDS": str(3 * 86400),
    }
    assert run_cli(["token", "--sub", "alice", "--ttl", "2d"], longer).returncode == 0


def test_token_requires_sub(tmp_path: Path) -> None:
    done = run_cli(["token", "--scope", "chat"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "--sub" in done.stderr
    assert done.stdout == ""


# -- precedence: flags over env over file ------------------------------------------------


def test_port_flag_over_env_over_file(tmp_path: Path, serve: ServeFactory) -> None:
    # X and Y are held by us: if the server tried to bind either, it would fail.
    with socket.socket() as hold_x, socket.socket() as hold_y:
        hold_x.bind(("127.0.0.1", 0))
        hold_x.listen()
        hold_y.bind(("127.0.0.1", 0))
        hold_y.listen()
        port_x, port_y = hold_x.getsockname()[1], hold_y.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f"port = {port_x}\n")
        env = cli_env(tmp_path, WSGUARD_PORT=str(port_y), WSGUARD_JWT_SECRET=SECRET)
        served = serve(["--config", str(config), "--port", "0"], env)
        port = served.wait_listening()
        assert port not in (port_x, port_y)
        assert port > 0

    # env over file: the file's port is held, the env one is free
    with socket.socket() as hold_x:
        hold_x.bind(("127.0.0.1", 0))
        hold_x.listen()
        config.write_text(f"port = {hold_x.getsockname()[1]}\n")
        port_z = free_port()
        env = cli_env(tmp_path, WSGUARD_PORT=str(port_z), WSGUARD_JWT_SECRET=SECRET)
        served = serve(["--config", str(config)], env)
        assert served.wait_listening() == port_z

    # file over defaults
    port_w = free_port()
    config.write_text(f'port = {port_w}\nlog_level = "warning"\n')
    served = serve(["--config", str(config)], cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET))
    assert served.wait_listening() == port_w


def test_log_level_flag_over_invalid_env_is_accepted(tmp_path: Path, serve: ServeFactory) -> None:
    env = cli_env(tmp_path, WSGUARD_LOG_LEVEL="loud", WSGUARD_JWT_SECRET=SECRET)
    served = serve(["--port", "0", "--log-level", "debug"], env)
    served.wait_listening()
    token = jwt.encode(
        {"sub": "dbg", "iat": int(time.time()), "exp": int(time.time()) + 60}, SECRET, "HS256"
    )
    assert welcome_of(served, token)["subject"] == "dbg"
    # without the flag the invalid env value is refused, naming the key
    done = run_cli(["serve", "--port", "0"], env)
    assert done.returncode == 2
    assert "log_level" in done.stderr


def test_host_flag_binds_another_loopback_address(tmp_path: Path, serve: ServeFactory) -> None:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not bindable here")
    served = serve(["--host", "127.0.0.2", "--port", "0"], cli_env(tmp_path))
    served.wait_listening()
    assert served.host == "127.0.0.2"
    token = mint(tmp_path, "--sub", "bob", "--scope", "chat")
    assert welcome_of(served, token)["subject"] == "bob"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", served.port), 2):
        pass


# -- token tool follows the configuration -------------------------------------------------


def test_token_carries_configured_audience_issuer_and_is_accepted(
    tmp_path: Path, serve: ServeFactory
) -> None:
    config = tmp_path / "aud.toml"
    config.write_text('[auth]\naudience = ["api"]\nissuer = "https://issuer"\n')
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    done = run_cli(
        [
            "token",
            "--config",
            str(config),
            "--sub",
            "alice",
            "--scope",
            "chat",
            "--scope",
            "read",
            "--ttl",
            "1h",
        ],
        env,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience="api", issuer="https://issuer"
    )
    assert claims["sub"] == "alice"
    assert claims["aud"] == "api"
    assert claims["iss"] == "https://issuer"
    assert claims["scope"] == "chat read"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert not (tmp_path / DEV_KEY).exists()  # a configured secret needs no dev key

    served = serve(["--config", str(config), "--port", "0"], env)
    served.wait_listening()
    assert "development key" not in served.stderr
    welcome = welcome_of(served, token)
    assert welcome["subject"] == "alice"
    assert welcome["scopes"] == ["chat", "read"]

    # the same secret without the configured audience is refused: the server checks aud
    now = int(time.time())
    no_aud = jwt.encode(
        {"sub": "alice", "iss": "https://issuer", "iat": now, "exp": now + 60}, SECRET, "HS256"
    )
    with pytest.raises(InvalidStatus) as info:
        served.connect(no_aud)
    assert info.value.response.status_code == 401


# -- check-config -------------------------------------------------------------------------


def test_check_config_on_example_exits_0(tmp_path: Path) -> None:
    done = run_cli(["check-config", "--config", str(EXAMPLE)], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout


def test_check_config_reads_wsguard_config_env(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('log_level = "loud"\n')
    done = run_cli(["check-config"], cli_env(tmp_path, WSGUARD_CONFIG=str(bad)))
    assert done.returncode == 2
    assert "log_level" in done.stderr
    assert "debug" in done.stderr  # says what is allowed


def test_check_config_bad_secret_not_echoed(tmp_path: Path) -> None:
    short = "tiny-secret-Zq9"
    done = run_cli(["check-config"], cli_env(tmp_path, WSGUARD_JWT_SECRET=short))
    assert done.returncode == 2
    assert "auth.secret" in done.stderr
    assert short not in done.stderr and short not in done.stdout


# -- a mistyped flag gets the subcommand usage and the closest flag -----------------------


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


# -- check-config: what serve would refuse, and nothing written -----------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('host = "0.0.0.0"\n', "tls.cert_file"),
        ('[admin]\nhost = "0.0.0.0"\nport = 9999\n', "admin.token"),
    ],
    ids=["plaintext-beyond-loopback", "admin-without-credential"],
)
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, toml: str, key: str) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text(toml)
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET="s" * 40)
    done = run_cli(["check-config", "--config", str(config)], env)
    assert done.returncode == 2, done.stderr
    assert f"configuration error: {key}:" in done.stderr
    assert run_cli(["serve", "--config", str(config)], env).returncode == 2  # the same


def _files_that_do_not_load(tmp_path: Path, case: str) -> tuple[str, str]:
    """A configuration whose named files ``serve`` refuses at start, and the key."""
    import trustme

    ca, other_ca = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    other = ca.issue_cert("127.0.0.1")
    paths = {
        "cert": tmp_path / "cert.pem",
        "key": tmp_path / "key.pem",
        "other_key": tmp_path / "other-key.pem",
        "ca": tmp_path / "ca.pem",
        "ca_copy": tmp_path / "ca-copy.pem",
        "other_ca": tmp_path / "other-ca.pem",
        "token": tmp_path / "admin-token",
    }
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    ca.cert_pem.write_to_path(str(paths["ca_copy"]))
    other_ca.cert_pem.write_to_path(str(paths["other_ca"]))
    paths["token"].write_text("t" * 32 + "\n")
    paths["token"].chmod(0o644)
    missing = tmp_path / "missing.pem"
    tls = f'[tls]\ncert_file = "{paths["cert"]}"\nkey_file = "{paths["key"]}"\n'
    admin = "[admin]\nport = 0\n"
    admin_tls = f'[admin.tls]\ncert_file = "{paths["cert"]}"\nkey_file = "{paths["key"]}"\n'
    cases = {
        "tls-cert-missing": (
            f'[tls]\ncert_file = "{missing}"\nkey_file = "{paths["key"]}"\n',
            "tls.cert_file",
        ),
        "tls-key-mismatch": (
            f'[tls]\ncert_file = "{paths["cert"]}"\nkey_file = "{paths["other_key"]}"\n',
            "tls.cert_file",
        ),
        "tls-client-ca-missing": (f'{tls}client_ca_file = "{missing}"\n', "tls.client_ca_file"),
        "admin-tls-cert-missing": (
            f'{admin}[admin.tls]\ncert_file = "{missing}"\nkey_file = "{paths["key"]}"\n',
            "admin.tls.cert_file",
        ),
        "admin-token-file-readable-by-others": (
            f'{admin}token_file = "{paths["token"]}"\n',
            "admin.token_file",
        ),
        "admin-ca-shared-with-users": (
            f'{tls}client_ca_file = "{paths["ca"]}"\n'
            f'{admin}{admin_tls}client_ca_file = "{paths["ca_copy"]}"\n',
            "admin.tls.client_ca_file",
        ),
        "audit-file-in-a-missing-directory": (
            f'[audit]\nfile = "{tmp_path / "nowhere" / "audit.log"}"\n',
            "audit.file",
        ),
        "audit-file-a-directory": (f'[audit]\nfile = "{tmp_path}"\n', "audit.file"),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "tls-cert-missing",
        "tls-key-mismatch",
        "tls-client-ca-missing",
        "admin-tls-cert-missing",
        "admin-token-file-readable-by-others",
        "admin-ca-shared-with-users",
        "audit-file-in-a-missing-directory",
        "audit-file-a-directory",
    ],
)
def test_check_config_refuses_the_files_serve_cannot_use(tmp_path: Path, case: str) -> None:
    """check-config loads what serve loads before it listens: a file that fails there
    fails here, with the same key, and serve says the same (exit 2, no traceback)."""
    toml, key = _files_that_do_not_load(tmp_path, case)
    config = tmp_path / "wsguard.toml"
    config.write_text(toml)
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET="s" * 40)
    done = run_cli(["check-config", "--config", str(config)], env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"configuration error: {key}:" in done.stderr
    served = run_cli(["serve", "--config", str(config), "--port", "0"], env)
    assert served.returncode == 2, served.stderr
    assert f"configuration error: {key}:" in served.stderr
    assert "Traceback" not in served.stderr


def test_check_config_warns_of_an_admin_listener_in_clear_text(tmp_path: Path) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text('[admin]\nhost = "0.0.0.0"\nport = 9999\ntoken = "' + "t" * 32 + '"\n')
    done = run_cli(["check-config", "--config", str(config)], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "warning: admin.host: the admin listener is on a network address" in done.stderr


def test_check_config_writes_nothing_and_warns_of_risky_settings(tmp_path: Path) -> None:
    """No development key is created (serve makes it when it starts); a proxy network of
    every address and a message type without a schema are valid but said."""
    config = tmp_path / "wsguard.toml"
    config.write_text('[proxy]\ntrusted = ["0.0.0.0/0"]\n[messages.types.note]\n')
    home = tmp_path / "home"
    home.mkdir()
    done = run_cli(["check-config", "--config", str(config)], cli_env(home))
    assert done.returncode == 0, done.stderr
    assert "configuration is valid" in done.stdout
    assert "warning: proxy.trusted: 0.0.0.0/0 trusts every address" in done.stderr
    assert "warning: messages.types.note: no schema" in done.stderr
    assert list(home.rglob("*")) == []  # nothing written under HOME
