"""Configuration: the example file, defaults, precedence (an environment secret is taken
verbatim), validation errors, keys."""

from __future__ import annotations

import io
import os
import stat
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import BaseModel

from support.cli import cli_env, run_cli
from support.paths import EXAMPLES
from wsguard.config.keys import load_or_create_dev_key
from wsguard.config.loader import load_config, validate_config
from wsguard.config.model import AuthConfig, Config
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.guard import Guard
from wsguard.observability.audit import AuditLog

EXAMPLE = EXAMPLES / "wsguard.toml"

# Keys of the model deliberately shown only as comments in the example file.
COMMENTED_KEYS = frozenset(
    {
        "auth.secret_file",
        "auth.public_key_file",
        "auth.jwks_file",
        "auth.jwks_ca_file",
        "limits.handshake_burst",
        "messages.types",
        "tls.cert_file",
        "tls.key_file",
        "tls.client_ca_file",
        "signing.keys_file",
        "cluster.tls_ca_file",
        "admin.port",
        "admin.token",
        "admin.token_file",
        "gateway.upstream_ca_file",
        "gateway.upstream_schema",
        "admin.tls.cert_file",
        "admin.tls.key_file",
        "admin.tls.client_ca_file",
    }
)

LONG_SECRET = "a-config-test-secret-long-enough-for-hs256-000000"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def model_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted leaf key of *model*, recursing into section models."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from model_keys(annotation, f"{key}.")
        else:
            yield key


DICT_KEYS = frozenset({"alerts.rules"})  # model keys whose value is a table of entries


def toml_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, value in data.items():
        if f"{prefix}{name}" in DICT_KEYS:
            out.add(f"{prefix}{name}")
        elif isinstance(value, dict) and value:  # an empty inline table is a leaf value
            out |= toml_keys(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def config_error(tmp_path: Path, toml: str = "", env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value


def quiet_guard(config: Config) -> Guard:
    return Guard(config, audit=AuditLog(io.StringIO()))


# -- the example file ---------------------------------------------------------------


def test_example_file_loads_to_exactly_the_defaults() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.model_dump() == Config().model_dump()
    assert config.source_file == str(EXAMPLE)  # where it came from, apart from its values
    assert Config().source_file is None


def test_example_file_lists_every_model_key() -> None:
    with EXAMPLE.open("rb") as fh:
        data = tomllib.load(fh)
    present = toml_keys(data)
    expected = set(model_keys(Config)) - COMMENTED_KEYS
    missing = expected - present
    assert not missing, f"keys missing from examples/wsguard.toml: {sorted(missing)}"
    # messages.types is a dict field: it must not be descended into, but it is a model key
    assert "messages.types" in set(model_keys(Config))
    # and nothing in the example is unknown to the model
    assert present <= set(model_keys(Config)), sorted(present - set(model_keys(Config)))


def test_example_file_shows_optional_keys_as_comments() -> None:
    text = EXAMPLE.read_text()
    for key in (
        "secret_file",
        "public_key_file",
        "jwks_file",
        "cert_file",
        "key_file",
        "client_ca_file",
        "keys_file",
    ):
        assert f"# {key} = " in text, key
    assert "# [messages.types.chat]" in text


def test_every_example_line_explains_its_key() -> None:
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "[")):
            assert "#" in stripped, f"no explanation: {line!r}"


# -- defaults ------------------------------------------------------------------------


def test_the_defaults_are_secure() -> None:
    config = load_config(None, env={})
    assert config.limits.max_message_bytes == 8192
    assert config.limits.connections_per_address == 5
    assert config.limits.messages_per_minute == 100
    assert config.limits.handshake_timeout_seconds == 10.0
    assert config.compression is False
    assert config.host == "127.0.0.1"
    assert config.port == 8765
    assert config.store == "memory://"
    assert config.auth.cookie is False
    assert config.auth.query is False
    assert config.auth.header is True
    assert config.auth.subprotocol is True
    assert config.auth.require_exp is True
    assert config.auth.algorithms == ("HS256",)
    assert config.origin.allowed == ()
    assert config.proxy.trusted == ()
    assert config.audit.enabled is True


def test_secret_is_not_in_the_config_repr() -> None:
    config = load_config(None, env={"WSGUARD_JWT_SECRET": LONG_SECRET})
    assert config.auth.secret == LONG_SECRET
    assert LONG_SECRET not in repr(config)
    assert LONG_SECRET not in str(config)


# -- precedence ------------------------------------------------------------------------


def test_precedence_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        'port = 1111\nlog_level = "warning"\n[limits]\n'
        "max_message_bytes = 10000\nconnections_per_address = 7\n",
    )
    assert load_config(path, env={}).port == 1111
    env = {"WSGUARD_PORT": "2222", "WSGUARD_LIMITS__MAX_MESSAGE_BYTES": "16384"}
    from_env = load_config(path, env=env)
    assert from_env.port == 2222
    assert from_env.log_level == "warning"  # untouched TOML key survives
    assert from_env.limits.max_message_bytes == 16384
    assert from_env.limits.connections_per_address == 7  # same section, merged not replaced
    flagged = load_config(path, env=env, overrides={"port": 3333, "log_level": "debug"})
    assert flagged.port == 3333
    assert flagged.log_level == "debug"
    assert flagged.limits.max_message_bytes == 16384
    # an absent flag (None) does not hide the lower layers
    assert load_config(path, env=env, overrides={"port": None}).port == 2222


def test_dotted_override_reaches_a_section(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[limits]\nmessages_per_minute = 50\n")
    config = load_config(
        path,
        env={"WSGUARD_LIMITS__MESSAGES_PER_MINUTE": "60"},
        overrides={"limits.messages_per_minute": 70},
    )
    assert config.limits.messages_per_minute == 70


def test_explicit_env_mapping_ignores_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WSGUARD_PORT", "4444")
    assert load_config(None, env={}).port == 8765
    assert load_config(None).port == 4444


def test_jwt_secret_env_sets_auth_secret() -> None:
    config = load_config(None, env={"WSGUARD_JWT_SECRET": LONG_SECRET})
    assert config.auth.secret == LONG_SECRET


def test_nested_env_key_with_double_underscore() -> None:
    config = load_config(None, env={"WSGUARD_LIMITS__MAX_MESSAGE_BYTES": "16384"})
    assert config.limits.max_message_bytes == 16384
    assert load_config(None, env={"WSGUARD_COMPRESSION": "true"}).compression is True


JSON_LOOKING_SECRETS = [
    "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]",
    '"quoted-secret-that-is-long-enough-for-hs256"',
    "12345678901234567890123456789012345678",
    '{"a": 1, "b": "padding-to-reach-32-bytes"}',
    "  surrounding whitespace is part of the secret too  ",
]


@pytest.mark.parametrize("name", ["WSGUARD_JWT_SECRET", "WSGUARD_AUTH__SECRET"])
@pytest.mark.parametrize("secret", JSON_LOOKING_SECRETS)
def test_env_secret_is_taken_verbatim(name: str, secret: str) -> None:
    config = load_config(None, env={name: secret})
    assert config.auth.secret == secret
    # and it is the key tokens are verified with
    guard = Guard(config, audit=AuditLog(io.StringIO()))
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert guard.verifier.verify(token).subject == "alice"


@pytest.mark.parametrize("secret", ["[1,2]", '"quoted"', "123", '{"a":1}'])
def test_short_json_looking_env_secret_is_a_too_short_string(secret: str) -> None:
    """Parsed as JSON these would be a list, a str, an int, a table: a type error."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_JWT_SECRET": secret})
    assert info.value.key == "auth.secret"
    assert "at least 32 bytes" in info.value.message
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        '["https://app.example.com", "https://*.example.org"]',
        "https://app.example.com, https://*.example.org",
        "https://app.example.com,https://*.example.org,",
    ],
    ids=["json", "comma-space", "comma-trailing"],
)
def test_list_env_as_json_or_comma_separated(raw: str) -> None:
    config = load_config(None, env={"WSGUARD_ORIGIN__ALLOWED": raw})
    assert config.origin.allowed == ("https://app.example.com", "https://*.example.org")


def test_list_env_with_invalid_json_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_ORIGIN__ALLOWED": '["https://a.example.com"'})
    assert info.value.key == "origin.allowed"
    assert "JSON" in info.value.message


# -- validation errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ("port = -1", "port", "greater than or equal to 0"),
        ("port = 70000", "port", "less than or equal to 65535"),
        ('port = "notaport"', "port", "valid integer"),
        ('log_level = "loud"', "log_level", "'debug', 'info', 'warning' or 'error'"),
        ("[limits]\nmax_mesage_bytes = 100", "limits.max_mesage_bytes", "unknown key"),
        ("bogus_top_level = 1", "bogus_top_level", "unknown key"),
        ("[limits]\nmax_message_bytes = -1", "limits.max_message_bytes", "greater than"),
        ("[limits]\nhandshake_burst = 0", "limits.handshake_burst", "greater than"),
        ('[auth]\nalgorithms = ["none"]', "auth.algorithms", "allowed: "),
        ('[auth]\nalgorithms = ["HS256", "RS256"]', "auth.algorithms", "cannot be mixed"),
        ("[auth]\ncookie = true", "auth.cookie", "origin.allowed"),
        ('[proxy]\ntrusted = ["10.0.0.0/33"]', "proxy.trusted", "not an IP network"),
        ('[proxy]\ntrusted = ["not-a-network"]', "proxy.trusted", "not an IP network"),
        ('store = "postgres://x"', "store", "expected memory://, redis://"),
        ('store = "redis://"', "store", "needs a host"),
        ('store = "redis://127.0.0.1:6379/abc"', "store", "must be a number"),
        ('store = "redis://127.0.0.1:99999/0"', "store", "invalid store URI"),
        ('[cluster.on_store_error]\nbans = "maybe"', "cluster.on_store_error.bans", "open"),
        ("[cluster]\nlease_ttl_seconds = 0", "cluster.lease_ttl_seconds", "greater than"),
        ('[origin]\nallowed = ["https://*evil.com"]', "origin.allowed", "first label"),
        ('[origin]\nallowed = ["https://a.example.com/path"]', "origin.allowed", "no path"),
    ],
)
def test_bad_value_names_key_and_what_is_allowed(
    tmp_path: Path, toml: str, key: str, allowed: str
) -> None:
    error = config_error(tmp_path, toml + "\n")
    assert error.key == key
    assert allowed in error.message
    assert str(error).startswith(f"{key}: ")


def test_revocations_must_outlive_the_longest_token(tmp_path: Path) -> None:
    error = config_error(tmp_path, "[cluster]\nrevocation_ttl_seconds = 3600\n")
    assert error.key == "cluster.revocation_ttl_seconds"
    assert "auth.max_token_lifetime_seconds" in error.message
    config = validate_config(
        {
            "auth": {"max_token_lifetime_seconds": 3600, "leeway_seconds": 30},
            "cluster": {"revocation_ttl_seconds": 3600},
        }
    )
    assert config.revocation_seconds == 3630  # a revocation outlives exp + leeway


def test_algorithm_none_in_any_spelling_is_refused(tmp_path: Path) -> None:
    for spelling in ("none", "None", "NONE", "nOnE"):
        error = config_error(tmp_path, f'[auth]\nalgorithms = ["{spelling}"]\n')
        assert error.key == "auth.algorithms"
        assert "HS256" in error.message  # says what is allowed


def test_bad_env_value_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_PORT": "notaport"})
    assert info.value.key == "port"
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_LIMITS__MAX_MESSAGE_BYTES": "-5"})
    assert info.value.key == "limits.max_message_bytes"


def test_cookie_with_origin_allowlist_is_accepted() -> None:
    config = validate_config(
        {"auth": {"cookie": True}, "origin": {"allowed": ["https://app.example.com"]}}
    )
    assert config.auth.cookie is True


SHORT_SECRET = "short-Secret-Value-7x"  # 21 bytes: refused


@pytest.mark.parametrize(
    ("toml", "env", "key", "allowed"),
    [
        (f'[auth]\nsecret = "{SHORT_SECRET}"', {}, "auth.secret", "at least 32 bytes"),
        ("", {"WSGUARD_JWT_SECRET": SHORT_SECRET}, "auth.secret", "at least 32 bytes"),
        (
            f'[auth]\nsecret = "{LONG_SECRET}"\nsecret_file = "/nonexistent"',
            {},
            "auth.secret",
            "either",
        ),
        (
            f'[auth]\nsecret = "{LONG_SECRET}"\nalgorithms = ["RS256"]\n'
            'public_key_file = "/nonexistent.pem"',
            {},
            "auth.algorithms",
            "public_key_file",
        ),
        ("[auth]\ncookie = true", {"WSGUARD_JWT_SECRET": LONG_SECRET}, "auth.cookie", "origin"),
        ("port = 99999", {"WSGUARD_JWT_SECRET": LONG_SECRET}, "port", "65535"),
    ],
    ids=["short-toml", "short-env", "secret-and-file", "secret-with-rs256", "cookie", "port"],
)
def test_secret_value_never_appears_in_errors(
    tmp_path: Path, toml: str, env: dict[str, str], key: str, allowed: str
) -> None:
    error = config_error(tmp_path, toml + "\n", env)
    assert error.key == key
    assert allowed in error.message
    for secret in (SHORT_SECRET, LONG_SECRET):
        assert secret not in str(error)
        assert secret not in repr(error)
        assert secret not in error.message
        assert all(secret not in str(arg) for arg in error.args)


def test_invalid_toml_file(tmp_path: Path) -> None:
    error = config_error(tmp_path, "port = \n[limits\n")
    assert error.key == "config"
    assert "not valid TOML" in error.message
    assert "bad.toml" in error.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", env={})
    assert info.value.key == "config"
    assert "not found" in info.value.message
    assert "nope.toml" in info.value.message


def test_public_key_file_not_pem_refused_by_guard(tmp_path: Path) -> None:
    not_pem = write(tmp_path / "key.pem", "this is not a PEM public key\n")
    config = validate_config(
        {"port": 0, "auth": {"algorithms": ["RS256"], "public_key_file": str(not_pem)}}
    )
    with pytest.raises(KeyLoadError) as info:
        quiet_guard(config)
    assert info.value.key == "auth.public_key_file"
    assert "PEM" in info.value.message
    assert isinstance(info.value, ConfigError)


def test_public_key_file_missing_refused_by_guard(tmp_path: Path) -> None:
    config = validate_config(
        {"auth": {"algorithms": ["ES256"], "public_key_file": str(tmp_path / "absent.pem")}}
    )
    with pytest.raises(KeyLoadError) as info:
        quiet_guard(config)
    assert info.value.key == "auth.public_key_file"


# -- the development key ------------------------------------------------------------------


def dev_auth(path: Path) -> AuthConfig:
    return AuthConfig(dev_key_file=path)


def test_dev_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "dir" / "dev-jwt.key"
    secret, created = load_or_create_dev_key(dev_auth(path))
    assert created is True
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    assert path.read_bytes().strip() == secret
    again, created_again = load_or_create_dev_key(dev_auth(path))
    assert created_again is False
    assert again == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_dev_keys_are_random_per_file(tmp_path: Path) -> None:
    first, _ = load_or_create_dev_key(dev_auth(tmp_path / "a.key"))
    second, _ = load_or_create_dev_key(dev_auth(tmp_path / "b.key"))
    assert first != second


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_dev_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "dev.key"
    load_or_create_dev_key(dev_auth(path))
    os.chmod(path, mode)
    with pytest.raises(KeyLoadError) as info:
        load_or_create_dev_key(dev_auth(path))
    assert info.value.key == "auth.dev_key_file"
    assert "600" in info.value.message


def test_dev_key_file_too_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short\n")
    os.close(fd)
    with pytest.raises(KeyLoadError) as info:
        load_or_create_dev_key(dev_auth(path))
    assert info.value.key == "auth.dev_key_file"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_guard_without_key_on_public_host_is_refused(tmp_path: Path, host: str) -> None:
    path = tmp_path / "dev.key"
    config = validate_config({"host": host, "auth": {"dev_key_file": str(path)}})
    with pytest.raises(KeyLoadError) as info:
        quiet_guard(config)
    assert info.value.key == "auth.secret"
    assert "WSGUARD_JWT_SECRET" in info.value.message
    assert not path.exists()  # no development key is created for a public listener


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_guard_without_key_on_loopback_uses_dev_key(tmp_path: Path, host: str) -> None:
    path = tmp_path / "dev.key"
    config = validate_config({"host": host, "auth": {"dev_key_file": str(path)}})
    guard = quiet_guard(config)
    assert guard.key_info.dev_key is True
    assert guard.key_info.dev_key_path == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert guard.keys.secret == path.read_bytes().strip()


def test_guard_with_secret_on_public_host_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    config = validate_config(
        {"host": "0.0.0.0", "auth": {"secret": LONG_SECRET, "dev_key_file": str(path)}}
    )
    guard = quiet_guard(config)
    assert guard.key_info.dev_key is False
    assert guard.keys.secret == LONG_SECRET.encode()
    assert not path.exists()


def test_unknown_env_variable_is_reported_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, env={"WSGUARD_LIMITS__MAX_MESAGE_BYTES": "1"})
    assert config.limits.max_message_bytes == 8192  # the secure default stays
    assert "WSGUARD_LIMITS__MAX_MESAGE_BYTES" in capsys.readouterr().err


def test_admin_environment_variables_set_the_admin_listener() -> None:
    config = load_config(
        env={
            "WSGUARD_ADMIN_PORT": "9091",
            "WSGUARD_ADMIN_HOST": "::1",
            "WSGUARD_ADMIN_TOKEN": "an-admin-token-long-enough-0123",
        }
    )
    assert (config.admin.port, config.admin.host) == (9091, "::1")
    assert config.admin.token == "an-admin-token-long-enough-0123"
    assert "an-admin-token" not in repr(config)
    with pytest.raises(ConfigError) as bad:
        load_config(env={"WSGUARD_ADMIN_PORT": "99999"})
    assert bad.value.key == "admin.port"


def test_engine_auto_picks_picows_unless_a_feature_needs_websockets() -> None:
    from wsguard.config.loader import validate_config

    assert Config().engine == "picows"
    assert validate_config({}).engine == "picows"
    assert validate_config({"compression": True}).engine == "websockets"
    gateway = {"gateway": {"upstream": "ws://127.0.0.1:9000/"}}
    assert validate_config(gateway).engine == "websockets"
    assert validate_config({"engine": "websockets"}).engine == "websockets"


@pytest.mark.parametrize(
    "overrides",
    [{"compression": True}, {"gateway": {"upstream": "ws://127.0.0.1:9000/"}}],
    ids=["compression", "gateway"],
)
def test_what_picows_cannot_do_is_refused_naming_engine(overrides: dict[str, Any]) -> None:
    from wsguard.config.loader import validate_config
    from wsguard.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_config({"engine": "picows", **overrides})
    assert info.value.key == "engine"
    assert 'engine = "websockets"' in str(info.value)


def test_unknown_engine_is_refused_naming_the_choices() -> None:
    from wsguard.config.loader import validate_config
    from wsguard.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_config({"engine": "tornado"})
    assert info.value.key == "engine"
    assert "picows" in str(info.value)


# -- a mistyped key gets the closest valid key -------------------------------------------


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


def test_handshake_allowance_is_a_burst_then_paced() -> None:
    def allowance(**limits: int) -> tuple[float, int]:
        return validate_config({"limits": limits}).limits.handshake_allowance

    assert allowance() == (1.0, 10)  # 60 a minute: 10 at once, then one a second
    assert allowance(handshakes_per_minute=600) == (10.0, 100)  # unset: 10 s worth
    assert allowance(handshakes_per_minute=3) == (0.05, 3)  # never more than a minute's
    assert allowance(handshake_burst=5) == (1.0, 5)
    assert allowance(handshakes_per_minute=6, handshake_burst=100) == (0.1, 6)


@pytest.mark.parametrize("key", ["jwks_url", "oidc_issuer"])
def test_an_identity_provider_url_with_credentials_is_refused_without_echoing_them(
    key: str,
) -> None:
    """An identity provider's URL may carry a password or a client secret: the error
    names the key and never prints the value."""
    url = "https://svc:IdPpassw0rd@idp.example.com/jwks?client_secret=S3cr3tValue"
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSGUARD_AUTH__" + key.upper(): url})
    assert info.value.key == f"auth.{key}"
    assert "IdPpassw0rd" not in str(info.value)
    assert "S3cr3tValue" not in str(info.value)


def test_the_handshake_allowance_follows_a_copy_with_other_limits() -> None:
    """Derived from the limits each time: a copy with another rate gets its own (a value
    remembered on the model would be carried into the copy)."""
    limits = validate_config({"limits": {"handshakes_per_minute": 60}}).limits
    assert limits.handshake_allowance == (1.0, 10)
    copy = limits.model_copy(update={"handshakes_per_minute": 600})
    assert copy.handshake_allowance == (10.0, 100)
