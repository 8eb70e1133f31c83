"""What the configuration refuses, or warns about, beyond each key's own range: values of
the wrong type in a file, non-finite and endless durations, files the server would
refuse (checked alike by ``check-config``, ``serve`` and ``token``), two environment names
of one key, a file holding secrets that others can read or write, unusable CA bundles and
addresses, and proxy networks that together trust everyone."""

from __future__ import annotations

import grp
import io
import json
import math
import os
import pwd
import re
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm

from support.cli import SECRET, cli_env, run_cli
from support.docs import hooks_module
from support.serve_process import Served
from wsguard.config.loader import load_config, validate_config
from wsguard.core.risky_settings import config_warnings
from wsguard.errors import ConfigError
from wsguard.guard import Guard
from wsguard.observability.audit import AuditLog

#: Every documented key and its field, as the configuration reference lists them.
KEYS = list(hooks_module().config_keys())

DEV_KEY = Path(".local") / "share" / "wsguard" / "dev-jwt.key"
ADMIN_TOKEN = Path(".local") / "share" / "wsguard" / "admin.token"


#: A group that is no user's private group (its gid is not the test user's): group-write
#: by it is write by other users.
SHARED_GID = grp.getgrnam("daemon").gr_gid


def shared(path: Path) -> Path:
    """*path* put in the shared group (as root, the test user)."""
    os.chown(path, -1, SHARED_GID)
    return path


def config_file(tmp_path: Path, text: str, mode: int = 0o600, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, text), env=env or {})
    return info.value


def check_config(tmp_path: Path, text: str, **env: str) -> tuple[int, str]:
    path = config_file(tmp_path, text)
    done = run_cli(["check-config", "-c", str(path)], cli_env(tmp_path, **env))
    return done.returncode, done.stderr


def private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def toml_line(key: str, value: str) -> str:
    *table, leaf = key.split(".")
    return (f"[{'.'.join(table)}]\n" if table else "") + f"{leaf} = {value}\n"


# -- durations: finite and bounded ---------------------------------------------------------

#: The duration keys that once had no upper bound (the others always had one).
ONCE_UNBOUNDED = [
    "limits.auth_failure_window_seconds", "limits.ban_seconds", "limits.ban_max_seconds",
    "limits.violation_decay_seconds", "liveness.ping_interval_seconds",
    "liveness.ping_timeout_seconds", "liveness.idle_timeout_seconds",
    "liveness.max_lifetime_seconds", "liveness.drain_seconds",
    "gateway.upstream_ping_interval_seconds",
]  # fmt: skip


def test_every_duration_key_has_a_finite_upper_bound() -> None:
    unbounded = [
        key
        for key, field in KEYS
        if key.endswith("_seconds")
        and not any(math.isfinite(getattr(item, "le", math.inf)) for item in field.metadata)
    ]
    assert unbounded == []


@pytest.mark.parametrize("key", ONCE_UNBOUNDED)
@pytest.mark.parametrize("value", ["inf", "1e308", "9223372036854775807"])
def test_a_duration_of_no_end_is_refused_naming_the_key(
    tmp_path: Path, key: str, value: str
) -> None:
    error = refused(tmp_path, toml_line(key, value))
    assert error.key == key


def test_every_integer_key_has_an_upper_bound() -> None:
    """A count with no bound reads a typo (a row of zeros too many) as "unlimited"."""
    unbounded = [
        key
        for key, field in KEYS
        if field.annotation in (int, int | None)
        and not any(math.isfinite(getattr(item, "le", math.inf)) for item in field.metadata)
    ]
    assert unbounded == []


#: The count keys that once had no upper bound, and a value just over the one they have now.
ONCE_UNBOUNDED_COUNTS = [
    ("limits.max_connections", 10_000_001), ("limits.connections_per_address", 10_000_001),
    ("limits.connections_per_subject", 10_000_001), ("limits.handshakes_per_minute", 10_000_001),
    ("limits.handshake_burst", 10_000_001), ("limits.pending_handshakes_per_address", 10_000_001),
    ("limits.max_pending_handshakes", 10_000_001),
    ("limits.auth_failures_before_ban", 1_000_000_001),
    ("limits.messages_per_minute", 1_000_000_001), ("limits.message_burst", 1_000_000_001),
    ("limits.subject_messages_per_minute", 1_000_000_001),
    ("limits.violation_budget", 1_000_000_001),
    ("limits.bytes_per_minute", 2**40 + 1), ("limits.subject_bytes_per_minute", 2**40 + 1),
    ("messages.max_string_length", 64 * 1024 * 1024 + 1),
    ("messages.max_keys", 64 * 1024 * 1024 + 1),
]  # fmt: skip


@pytest.mark.parametrize(("key", "over"), ONCE_UNBOUNDED_COUNTS)
def test_a_count_past_its_bound_is_refused_naming_the_key(
    tmp_path: Path, key: str, over: int
) -> None:
    for value in (str(over), "9223372036854775807"):
        error = refused(tmp_path, toml_line(key, value))
        assert error.key == key
        assert "less than or equal to" in error.message
    load_config(config_file(tmp_path, toml_line(key, str(over - 1))), env={})
    env_error = refused(
        tmp_path, "", env={"WSGUARD_" + key.upper().replace(".", "__"): "1" + "0" * 30}
    )
    assert env_error.key == key


def test_an_alert_rule_threshold_has_a_bound(tmp_path: Path) -> None:
    error = refused(tmp_path, "[alerts.rules.auth_failures_total]\nthreshold = 1000000001\n")
    assert error.key.startswith("alerts.rules")
    assert "less than or equal to" in error.message


def test_check_config_refuses_an_endless_ban_and_heartbeat(tmp_path: Path) -> None:
    for text, key in [
        ("[limits]\nban_seconds = inf\nban_max_seconds = inf\n", "limits.ban_"),
        ("[liveness]\nping_interval_seconds = 1e300\n", "liveness.ping_interval_seconds"),
    ]:
        status, stderr = check_config(tmp_path, text)
        assert status == 2, stderr
        assert f"configuration error: {key}" in stderr


@pytest.mark.parametrize(
    "text",
    [
        '[messages.types.x]\nschema = { type = "number", maximum = inf }\n',
        "[gateway]\nupstream_schema = { maximum = nan }\n",
    ],
)
def test_no_infinite_or_nan_number_anywhere(tmp_path: Path, text: str) -> None:
    error = refused(tmp_path, text)
    assert error.key in ("messages.types.x.schema", "gateway.upstream_schema")
    assert "finite" in error.message


# -- values have types ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("port = true", "port", "not a valid integer (got true)"),
        ('port = "8765"', "port", "not a valid integer (got '8765')"),
        ("port = 8765.0", "port", "not a valid integer (got 8765.0)"),
        ("[limits]\nmax_message_bytes = 1e4", "limits.max_message_bytes", "not a valid integer"),
        ("[limits]\nban_seconds = true", "limits.ban_seconds", "not a valid number (got true)"),
        ('[limits]\nban_seconds = "60"', "limits.ban_seconds", "not a valid number"),
        ("[auth]\nrequire_exp = 0", "auth.require_exp", "not a valid boolean (got 0)"),
        ('[auth]\nrequire_exp = "n"', "auth.require_exp", "not a valid boolean"),
        ('[origin]\nallow_missing = "yes"', "origin.allow_missing", "not a valid boolean"),
        ("[admin]\nport = 9000.0", "admin.port", "not a valid integer"),
        ('[auth]\nalgorithms = "HS256"', "auth.algorithms", "not a valid list of strings"),
        ('[tls]\ncert_scopes = { a = "b" }', "tls.cert_scopes.a", "not a valid list of strings"),
    ],
)
def test_a_file_value_of_another_type_is_refused_naming_the_expected_type(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    error = refused(tmp_path, text + "\n")
    assert error.key == key
    assert expected in error.message


def test_environment_text_is_still_converted_while_the_same_text_in_a_file_is_not(
    tmp_path: Path,
) -> None:
    env = {
        "WSGUARD_PORT": "9001",
        "WSGUARD_AUTH__REQUIRE_EXP": "no",
        "WSGUARD_LIMITS__BAN_SECONDS": "90",
    }
    config = load_config(None, env=env)
    assert (config.port, config.auth.require_exp, config.limits.ban_seconds) == (9001, False, 90)
    assert refused(tmp_path, 'port = "9001"\n').key == "port"
    assert refused(tmp_path, "", {"WSGUARD_LIMITS__BAN_SECONDS": "inf"}).key == (
        "limits.ban_seconds"
    )


def test_check_config_refuses_a_boolean_port(tmp_path: Path) -> None:
    status, stderr = check_config(tmp_path, "port = true\n")
    assert status == 2
    assert "configuration error: port: not a valid integer (got true)" in stderr


# -- the development key and the generated admin token, checked where they exist -------------


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (b"k" * 48, 0o644, "readable by its owner only"),
        (b"short\n", 0o600, "fewer than 32 bytes"),
        (None, 0o700, "not a file"),
    ],
    ids=["mode-0644", "short", "directory"],
)
def test_check_config_checks_an_existing_default_dev_key_as_serve_does(
    tmp_path: Path, content: bytes | None, mode: int, problem: str
) -> None:
    path = tmp_path / DEV_KEY
    if content is None:
        path.mkdir(parents=True)
        os.chmod(path, mode)
    else:
        private_file(path, content, mode)
    for command in (["check-config"], ["serve", "--port", "0"]):
        done = run_cli(command, cli_env(tmp_path))
        assert done.returncode == 2, (command, done.stderr)
        assert f"auth.dev_key_file: {path} " in done.stderr
        assert problem in done.stderr
    # absent, it is created by serve only, never by check-config
    other = tmp_path / "other" / "dev.key"
    status, stderr = check_config(tmp_path, f'[auth]\ndev_key_file = "{other}"\n')
    assert status == 0, stderr
    assert not other.parent.exists()


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--port", "0"], ["token"]])
def test_a_dev_key_under_a_regular_file_is_a_configuration_error(
    tmp_path: Path, command: list[str]
) -> None:
    blocker = private_file(tmp_path / "a-file", b"x" * 48)
    config = config_file(tmp_path, f'[auth]\ndev_key_file = "{blocker}/sub/dev.key"\n')
    args = [*command, "-c", str(config)] + (["--sub", "alice"] if command == ["token"] else [])
    done = run_cli(args, cli_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "configuration error: auth.dev_key_file: " in done.stderr
    assert "Not a directory" in done.stderr


def test_check_config_checks_an_existing_generated_admin_token(tmp_path: Path) -> None:
    path = private_file(tmp_path / ADMIN_TOKEN, b"t" * 43 + b"\n", 0o644)
    status, stderr = check_config(tmp_path, "[admin]\nport = 0\n")
    assert status == 2, stderr
    assert f"admin.token_file: {path} must be readable by its owner only" in stderr
    os.chmod(path, 0o600)
    assert check_config(tmp_path, "[admin]\nport = 0\n")[0] == 0


# -- the configuration file itself: bytes, nesting, secrets ----------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'host = "\xff\xfe"\n', "not UTF-8"),
        (b"a = " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    ],
    ids=["not-utf8", "deep"],
)
def test_a_file_that_is_not_toml_text_is_a_configuration_error(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = private_file(tmp_path / "c.toml", content)
    done = run_cli(["check-config", "-c", str(path)], cli_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"configuration error: config: {path} is not valid TOML: {problem}" in done.stderr


SECRET_LINES = {
    "auth.secret": f'[auth]\nsecret = "{SECRET}"\n',
    "admin.token": f'[admin]\ntoken = "{SECRET}"\n',
    "gateway.identity_secret": f'[gateway]\nidentity_secret = "{SECRET}"\n',
    "store": 'store = "redis://app:pw-of-redis@127.0.0.1:6379/0"\n',
}


@pytest.mark.parametrize("key", sorted(SECRET_LINES))
def test_a_file_holding_a_secret_that_others_can_read_is_warned_about(
    tmp_path: Path, key: str
) -> None:
    path = config_file(tmp_path, SECRET_LINES[key], 0o644)
    config = load_config(path, env={})
    assert [k for k, _ in config_warnings(config)] == [key]
    assert str(path) in config_warnings(config)[0][1]
    assert config_warnings(load_config(config_file(tmp_path, SECRET_LINES[key]), env={})) == []


def test_check_config_and_serve_warn_about_a_readable_file_holding_a_secret(
    tmp_path: Path,
) -> None:
    path = config_file(tmp_path, f'port = 0\n[auth]\nsecret = "{SECRET}"\n', 0o640)
    done = run_cli(["check-config", "-c", str(path)], cli_env(tmp_path))
    assert done.returncode == 0
    assert f"wsguard: warning: auth.secret: {path} holds secrets (auth.secret)" in done.stderr
    assert SECRET not in done.stderr
    served = Served(["-c", str(path)], cli_env(tmp_path), tmp_path / "audit.jsonl")
    try:
        served.wait_for("listening on")
        assert f"auth.secret: {path} holds secrets" in served.stderr
    finally:
        served.kill()
    records = [json.loads(line) for line in served.audit_path.read_text().splitlines()]
    warnings = [r for r in records if r.get("event") == "config_warning"]
    assert [w["key"] for w in warnings] == ["auth.secret"], warnings


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_file_holding_a_secret_that_others_can_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = shared(config_file(tmp_path, SECRET_LINES["auth.secret"], mode))
    done = run_cli(["check-config", "-c", str(path)], cli_env(tmp_path))
    assert done.returncode == 2
    assert f"configuration error: auth.secret: {path} holds secrets" in done.stderr
    assert "other users can write it" in done.stderr
    assert SECRET not in done.stderr


def test_a_secret_from_the_environment_is_not_about_the_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port = 9000\n", 0o644)
    config = load_config(path, env={"WSGUARD_JWT_SECRET": SECRET})
    assert config_warnings(config) == []
    # the same secret in that file is refused
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, SECRET_LINES["auth.secret"], 0o666), env={})
    assert info.value.key == "auth.secret"


# -- files that decide who is trusted: nobody else may write them ----------------------------


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_a_configuration_file_other_users_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever can change the configuration decides who is trusted, secrets in it or not."""
    path = shared(config_file(tmp_path, "port = 9000\n", mode))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "config"
    assert "chmod go-w" in info.value.message
    done = run_cli(["check-config", "-c", str(path)], cli_env(tmp_path))
    assert done.returncode == 2 and "configuration error: config:" in done.stderr, done.stderr
    load_config(config_file(tmp_path, "port = 9000\n", 0o644), env={})  # readable is fine


def test_group_write_by_the_owners_private_group_is_the_owners(tmp_path: Path) -> None:
    """umask 002 distributions give every user a private group and files 664: that group
    is the owner alone (as Debian's OpenSSH reads StrictModes)."""
    private = config_file(tmp_path, "port = 9000\n", 0o664)
    assert grp.getgrgid(private.stat().st_gid).gr_mem == []  # root's own group
    load_config(private, env={})


def test_a_configuration_file_of_another_user_or_in_a_directory_others_write_is_refused(
    tmp_path: Path,
) -> None:
    """Another user can change a file it owns (chmod it first); anyone who can write its
    directory can replace it (``mv``), unless the directory is sticky, as /tmp is."""
    owned = config_file(tmp_path, "port = 9000\n", 0o644, name="owned.toml")
    os.chown(owned, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(ConfigError, match="belongs to another user"):
        load_config(owned, env={})
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    in_open = config_file(open_dir, "port = 9000\n", 0o644)
    os.chmod(open_dir, 0o777)
    with pytest.raises(ConfigError, match=r"its directory .* is writable by them"):
        load_config(in_open, env={})
    os.chmod(open_dir, 0o1777)  # sticky: nobody replaces another's file
    load_config(in_open, env={})


def trust_files(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """Every key naming a file that decides who is trusted: its TOML and the file."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    jwk = json.loads(ECAlgorithm.to_jwk(public_key))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    tls = f'cert_file = "{cert_file}"\nkey_file = "{key_file}"\n'
    public = '[auth]\nalgorithms = ["ES256"]\naudience = ["a"]\nissuer = "i"\n'
    return {
        "auth.public_key_file": (f'{public}public_key_file = "{pem}"\n', pem),
        "auth.jwks_file": (f'{public}jwks_file = "{jwks}"\n', jwks),
        "auth.jwks_ca_file": (
            f'{public}jwks_url = "https://idp.example/jwks"\njwks_ca_file = "{bundle}"\n',
            bundle,
        ),
        "tls.client_ca_file": (f'[tls]\n{tls}client_ca_file = "{bundle}"\n', bundle),
        "admin.tls.client_ca_file": (
            f'[admin]\nport = 9100\n[admin.tls]\n{tls}client_ca_file = "{bundle}"\n',
            bundle,
        ),
        "cluster.tls_ca_file": (
            f'store = "rediss://127.0.0.1:6380/0"\n[cluster]\ntls_ca_file = "{bundle}"\n',
            bundle,
        ),
        "gateway.upstream_ca_file": (
            f'[gateway]\nupstream = "wss://127.0.0.1:9/"\nupstream_ca_file = "{bundle}"\n',
            bundle,
        ),
        "messages.types.x.schema_file": (f'[messages.types.x]\nschema_file = "{schema}"\n', schema),
    }


@pytest.mark.parametrize(
    "key",
    [
        "auth.public_key_file", "auth.jwks_file", "auth.jwks_ca_file", "tls.client_ca_file",
        "admin.tls.client_ca_file", "cluster.tls_ca_file", "gateway.upstream_ca_file",
        "messages.types.x.schema_file",
    ],
)  # fmt: skip
def test_a_key_ca_or_schema_file_other_users_can_write_is_refused(tmp_path: Path, key: str) -> None:
    text, path = trust_files(tmp_path)[key]
    os.chmod(path, 0o644)
    load_config(config_file(tmp_path, text), env={})  # readable by all: fine
    shared(path)
    for mode in (0o666, 0o664):
        os.chmod(path, mode)
        error = refused(tmp_path, text)
        assert error.key == key
        assert "chmod go-w" in error.message
    status, stderr = check_config(tmp_path, text)
    assert status == 2 and f"configuration error: {key}:" in stderr, stderr


# -- two environment names for one key ------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name", "first", "second", "key"),
    [
        ("WSGUARD_JWT_SECRET", "WSGUARD_AUTH__SECRET", SECRET, SECRET[::-1], "auth.secret"),
        ("WSGUARD_ADMIN_PORT", "WSGUARD_ADMIN__PORT", "9001", "9002", "admin.port"),
        ("WSGUARD_ADMIN_TOKEN", "WSGUARD_ADMIN__TOKEN", SECRET, SECRET[::-1], "admin.token"),
        ("WSGUARD_PORT", "WSGUARD_port", "9001", "9002", "port"),
    ],
)
def test_two_names_of_one_key_that_disagree_are_an_error_naming_both(
    alias: str, name: str, first: str, second: str, key: str
) -> None:
    for env in ({alias: first, name: second}, {name: second, alias: first}):
        with pytest.raises(ConfigError) as info:
            load_config(None, env=env)
        assert info.value.key == key
        assert alias in info.value.message and name in info.value.message
        assert SECRET not in str(info.value) and SECRET[::-1] not in str(info.value)
    agreed = load_config(None, env={alias: first, name: first})
    value = agreed.model_dump()
    for part in key.split("."):
        value = value[part]
    assert str(value) == first


# -- environment variables inside tables of named entries -----------------------------------


def test_a_variable_inside_a_named_table_says_how_to_set_the_table(
    tmp_path: Path,
) -> None:
    done = run_cli(["check-config"], cli_env(tmp_path, WSGUARD_MESSAGES__TYPES__CHAT__SCOPES="a"))
    assert done.returncode == 0
    assert (
        "WSGUARD_MESSAGES__TYPES__CHAT__SCOPES (a key inside messages.types.<name> has no "
        "variable of its own: set the whole table as JSON, e.g. "
        """WSGUARD_MESSAGES__TYPES='{"chat": {"scopes": "..."}}')"""
    ) in done.stderr
    # and that form works
    whole = {"WSGUARD_MESSAGES__TYPES": '{"chat": {"scopes": ["a"], "schema": {}}}'}
    assert load_config(None, env=whole).messages.types["chat"].scopes == ("a",)


# -- CA bundles are loaded with the configuration -------------------------------------------


@pytest.fixture
def ca_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("key", ["gateway.upstream_ca_file", "cluster.tls_ca_file"])
def test_a_ca_bundle_that_is_missing_or_not_pem_is_refused(
    tmp_path: Path, ca_pem: Path, key: str
) -> None:
    store = 'store = "rediss://127.0.0.1:1/0"\n' if key.startswith("cluster") else ""
    not_pem = private_file(tmp_path / "not.pem", b"not a certificate\n")
    for path, problem in [(tmp_path / "absent.pem", "No such file"), (not_pem, "PEM")]:
        status, stderr = check_config(tmp_path, store + toml_line(key, f'"{path}"'))
        assert status == 2, stderr
        assert f"configuration error: {key}: " in stderr
        assert problem in stderr
    assert check_config(tmp_path, store + toml_line(key, f'"{ca_pem}"'))[0] == 0
    assert ca_pem.parent == tmp_path  # the HOME of check_config: ~ is expanded, as for keys
    assert check_config(tmp_path, store + toml_line(key, '"~/ca.pem"'))[0] == 0


def test_the_gateway_refuses_a_missing_upstream_ca_without_a_traceback(tmp_path: Path) -> None:
    config = config_file(
        tmp_path,
        f'port = 0\n[gateway]\nupstream = "wss://127.0.0.1:1/"\n'
        f'upstream_ca_file = "{tmp_path / "absent.pem"}"\n',
    )
    done = run_cli(["proxy", "-c", str(config)], cli_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "configuration error: gateway.upstream_ca_file: " in done.stderr


# -- addresses to bind ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["host", "admin.host"])
@pytest.mark.parametrize("value", ["", "not a host", "-x.example", "a..b", "[::1]"])
def test_a_bind_address_that_is_no_address_is_refused(tmp_path: Path, key: str, value: str) -> None:
    error = refused(tmp_path, toml_line(key, json.dumps(value)))
    assert error.key == key
    assert "IP address or a host name" in error.message
    for address in ("127.0.0.1", "::1", "0.0.0.0", "::", "localhost", "my_svc", "a.example."):
        assert validate_config({"admin": {"host": address}}).admin.host == address


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--port", "0"]])
def test_check_config_and_serve_refuse_an_empty_host(tmp_path: Path, command: list[str]) -> None:
    config = config_file(tmp_path, 'host = ""\n')
    done = run_cli([*command, "-c", str(config)], cli_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "configuration error: host: must be an IP address or a host name" in done.stderr


# -- proxy networks that together trust everyone ---------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "named"),
    [
        (["0.0.0.0/1", "128.0.0.0/1"], "0.0.0.0/1, 128.0.0.0/1 together trust"),
        (["::ffff:0:0/96"], "::ffff:0:0/96 trusts"),
        (["::/1", "8000::/1"], "::/1, 8000::/1 together trust"),
        (["0.0.0.0/2", "10.0.0.0/8", "64.0.0.0/2", "128.0.0.0/1"], "together trust"),
    ],
)
def test_proxy_networks_that_together_hold_every_address_are_warned_about(
    trusted: list[str], named: str
) -> None:
    warnings = dict(config_warnings(validate_config({"proxy": {"trusted": trusted}})))
    assert named in warnings["proxy.trusted"]
    assert "every address" in warnings["proxy.trusted"]
    # one network fewer: a part of the addresses only, no warning
    fewer = validate_config({"proxy": {"trusted": trusted[1:] or ["::ffff:0:0/97"]}})
    assert "proxy.trusted" not in dict(config_warnings(fewer))


def test_check_config_warns_about_two_halves_of_ipv4(tmp_path: Path) -> None:
    status, stderr = check_config(tmp_path, '[proxy]\ntrusted = ["0.0.0.0/1", "128.0.0.0/1"]\n')
    assert status == 0
    assert "warning: proxy.trusted: 0.0.0.0/1, 128.0.0.0/1 together trust every address" in (stderr)


# -- wsguard token refuses a subject the server refuses ----------------------------------------


@pytest.mark.parametrize("subject", ["", "a\x01b", "tab\there", "x" * 257])
def test_token_refuses_a_subject_the_server_refuses(tmp_path: Path, subject: str) -> None:
    done = run_cli(["token", "--sub", subject], cli_env(tmp_path))
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    assert re.search(r"configuration error: --sub: the server refuses this subject", done.stderr)


def test_token_accepts_the_longest_subject_the_server_accepts(tmp_path: Path) -> None:
    longest = run_cli(["token", "--sub", "é" * 256], cli_env(tmp_path))
    assert longest.returncode == 0, longest.stderr
    token = longest.stdout.strip()
    config = load_config(None, env={})
    guard = Guard(
        config.model_copy(
            update={"auth": config.auth.model_copy(update={"dev_key_file": tmp_path / DEV_KEY})}
        ),
        audit=AuditLog(io.StringIO()),
    )
    assert guard.verifier.verify(token).subject == "é" * 256
    assert run_cli(["token", "--sub", "é" * 257], cli_env(tmp_path)).returncode == 2


def test_an_invalid_upstream_schema_is_refused_by_check_config_as_by_proxy(
    tmp_path: Path,
) -> None:
    text = '[gateway]\nupstream = "ws://127.0.0.1:1/"\nupstream_schema = { type = "objekt" }\n'
    status, stderr = check_config(tmp_path, text)
    assert status == 2, stderr
    assert "configuration error: gateway.upstream_schema: invalid JSON Schema" in stderr
    good = text.replace('"objekt"', '"object"')
    assert check_config(tmp_path, good)[0] == 0


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('subject_header = "X-Wsguard-Scopes"', "is already subject_header"),
        ('subject_header = "X-Forwarded-For"', "carries a client's address"),
        ('client_header = "Host"', "the HTTP exchange owns"),
        ('token_id_header = "Sec-WebSocket-Key"', "the HTTP exchange owns"),
        ('path_header = "Cookie"', "the HTTP exchange owns"),
    ],
)
def test_identity_headers_have_names_of_their_own(tmp_path: Path, line: str, needle: str) -> None:
    """The gateway's identity headers reach the backend as facts it trusts: two with one
    name, or one named like a header the exchange or proxies own, would make it read
    another value (the subject as the scopes, a subject as the client's address)."""
    status, stderr = check_config(tmp_path, f'[gateway]\nupstream = "ws://127.0.0.1:1/"\n{line}\n')
    assert status == 2, stderr
    assert "configuration error: gateway" in stderr and needle in stderr, stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('host = "0.0.0.0"\n', "auth.secret"),  # no key beyond loopback: the key first
        (f'host = "0.0.0.0"\n[auth]\nsecret = "{SECRET}"\n', "tls.cert_file"),
    ],
)
def test_check_config_names_the_key_serve_names_first(tmp_path: Path, text: str, key: str) -> None:
    path = config_file(tmp_path, text)
    for command in (["check-config"], ["serve", "--port", "0"]):
        done = run_cli([*command, "-c", str(path)], cli_env(tmp_path))
        assert done.returncode == 2, (command, done.stderr)
        assert f"configuration error: {key}:" in done.stderr, (command, done.stderr)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("auth.subprotocol_prefix", "token:"),  # ':' is no token character
        ("auth.subprotocol_prefix", "tok en"),
        ("auth.cookie_name", "a=b"),
        ("auth.cookie_name", "wsguard token"),
    ],
)
def test_where_a_credential_travels_is_named_with_http_token_characters(
    tmp_path: Path, key: str, value: str
) -> None:
    """A prefix or cookie name no client can send would refuse every credential sent there
    as malformed; refused when the configuration loads instead."""
    error = refused(tmp_path, toml_line(key, f'"{value}"'))
    assert error.key == key
    assert "HTTP token" in error.message
