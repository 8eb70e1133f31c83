"""Build a :class:`Config` from a TOML file, ``WSGUARD_*`` variables and overrides.

Precedence, lowest first: embedded defaults, the TOML file, environment
variables, explicit overrides (CLI flags). Every error is a
:class:`~wsguard.errors.ConfigError` naming the dotted key.

Environment variables: ``WSGUARD_HOST``, ``WSGUARD_PORT``, ``WSGUARD_LOG_LEVEL``,
``WSGUARD_STORE``, ``WSGUARD_JWT_SECRET`` (= ``auth.secret``),
``WSGUARD_ADMIN_TOKEN`` (= ``admin.token``), ``WSGUARD_ADMIN_PORT``,
``WSGUARD_ADMIN_HOST``, and for any key
``WSGUARD_<SECTION>__<KEY>`` (double underscore), e.g.
``WSGUARD_LIMITS__MAX_MESSAGE_BYTES=16384``. Lists take JSON (``["a","b"]``) or
comma-separated values.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from wsguard.config.model import Config
from wsguard.errors import ConfigError

ENV_PREFIX = "WSGUARD_"
_ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "WSGUARD_JWT_SECRET": ("auth", "secret"),
    "WSGUARD_ADMIN_TOKEN": ("admin", "token"),
    "WSGUARD_ADMIN_PORT": ("admin", "port"),
    "WSGUARD_ADMIN_HOST": ("admin", "host"),
}
# Variables read elsewhere (the CLI, later modules); not configuration keys.
_ENV_NOT_KEYS = frozenset({"WSGUARD_CONFIG"})
# Keys whose values may hold credentials: never echoed in an error message.
_NO_ECHO_WORDS = ("secret", "token", "password")
_NO_ECHO_KEYS = frozenset({"store", "alerts.webhook_url", "gateway.upstream", "gateway.routes"})
_KEY_IN_MESSAGE = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.DOTALL)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
    environ = os.environ if env is None else env
    for keys, value in _env_values(environ):
        _set(data, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(data, tuple(dotted.split(".")), value)
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> Config:
    """Validate a plain mapping (as parsed from TOML) into a :class:`Config`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def _env_values(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name in _ENV_ALIASES:
            keys = _ENV_ALIASES[name]
        else:
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            if not _known_key(keys):
                print(f"wsguard: ignoring unknown environment variable {name}", file=sys.stderr)
                continue
        found.append((keys, _parse_env_value(keys, raw)))
    return found


def _known_key(keys: tuple[str, ...]) -> bool:
    model: type[BaseModel] = Config
    for i, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return i == len(keys) - 1
    return True


def _parse_env_value(keys: tuple[str, ...], raw: str) -> Any:
    stripped = raw.strip()
    kind = _container_kind(keys)
    if kind is None:
        return raw  # scalars (secrets included) are taken verbatim
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            raise ConfigError(".".join(keys), "invalid JSON in environment variable") from None
    if kind == "list":
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return raw


def _container_kind(keys: tuple[str, ...]) -> str | None:
    """ "list" or "table" for keys whose value is a list or a table, else None."""
    model: type[BaseModel] = Config
    for key in keys[:-1]:
        annotation = model.model_fields[key].annotation
        assert isinstance(annotation, type)
        model = annotation
    text = str(model.model_fields[keys[-1]].annotation)
    if text.startswith("tuple["):
        return "list"
    if text.startswith("dict["):
        return "table"
    return None


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys), "conflicts with a non-table value")
        node = child
    node[keys[-1]] = value


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    match = _KEY_IN_MESSAGE.match(message)
    if match:
        sub, message = match.group(1), match.group(2)
        loc = sub.split(".") if "." in sub else [*loc, sub]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] in ("literal_error", "enum"):
        message = f"{message} (got {first.get('input')!r})"
    key = ".".join(loc) or "config"
    if key not in _NO_ECHO_KEYS and not any(word in key for word in _NO_ECHO_WORDS):
        given = first.get("input")
        scalar = isinstance(given, (int, float, str, bool))
        if scalar and first["type"] != "extra_forbidden" and "(got" not in message:
            message = f"{message} (got {given!r})"
    return ConfigError(key, message)
