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
comma-separated values. A table of named entries (``messages.types``, ``alerts.rules``)
is set whole, as JSON (``WSGUARD_MESSAGES__TYPES='{"chat": {...}}'``): the keys inside
an entry have no variable of their own. Two names of one key (``WSGUARD_JWT_SECRET`` and
``WSGUARD_AUTH__SECRET``) with different values are a configuration error.

Values in the file have types: a number is never taken from a boolean or a string, an
integer never from a float; the text of an environment variable is converted to its key's
type. A file that holds a secret (``auth.secret``, ``admin.token``...) and that other
users can write is refused; one they can read is noted as a warning
(:attr:`Config.source_warnings`).

An unknown key (in the file, the overrides or a ``WSGUARD_*`` name) is reported with the
closest valid key, e.g. ``limits.max_mesage_bytes: unknown key (did you mean
limits.max_message_bytes?)``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from wsguard.config.model import Config, EnvText, type_words
from wsguard.errors import ConfigError

ENV_PREFIX = "WSGUARD_"
_ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "WSGUARD_JWT_SECRET": ("auth", "secret"),
    "WSGUARD_ADMIN_TOKEN": ("admin", "token"),
    "WSGUARD_ADMIN_PORT": ("admin", "port"),
    "WSGUARD_ADMIN_HOST": ("admin", "host"),
}
# Variables read elsewhere (the CLI, later modules); not configuration keys.
_ENV_NOT_KEYS = frozenset(
    {"WSGUARD_CONFIG", "WSGUARD_ADMIN_URL", "WSGUARD_AUDIT_TOKEN", "WSGUARD_AUDIT_JWT_SECRET"}
)
# Keys whose values may hold credentials: never echoed in an error message.
_NO_ECHO_WORDS = ("secret", "token", "password")
_NO_ECHO_KEYS = frozenset(
    {
        "store",
        "alerts.webhook_url",
        "gateway.upstream",
        "gateway.routes",
        "auth.jwks_url",  # an identity provider's URL may carry a password or a secret
        "auth.oidc_issuer",
    }
)
_KEY_IN_MESSAGE = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.DOTALL)
# pydantic's errors for a value of the wrong type: reworded with the reference's type names
_TYPE_ERRORS = frozenset(
    {
        "bool_type", "bool_parsing", "int_type", "int_parsing", "int_from_float",
        "float_type", "float_parsing", "string_type", "tuple_type", "list_type",
        "dict_type", "model_type", "model_attributes_type", "path_type", "is_instance_of",
    }
)  # fmt: skip


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    warnings: tuple[tuple[str, str], ...] = ()
    if path is not None:
        data = _read_toml(Path(path))
        warnings = _check_file_mode(Path(path), data)
    environ = os.environ if env is None else env
    for keys, value in _env_values(environ):
        _set(data, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(data, tuple(dotted.split(".")), value)
    source = None if path is None else os.fspath(path)
    return validate_config(data).with_source_warnings(warnings, source)


def environment_config() -> Config:
    """The configuration of a host given none (``App()``, ``WsGuardMiddleware(app)``): the
    file ``WSGUARD_CONFIG`` names, if any, and the ``WSGUARD_*`` variables over the
    embedded defaults, as ``wsguard serve`` reads them."""
    return load_config(os.environ.get("WSGUARD_CONFIG") or None)


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
        raise ConfigError(
            "config",
            f"file not found: {path} (an empty file holds the defaults; the source's "
            "examples/wsguard.toml is a commented one)",
        ) from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not valid TOML: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError("config", f"{path} is not valid TOML: nested too deeply") from None


def _check_file_mode(path: Path, data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The configuration decides who is trusted: a file other users can write is refused
    (as the key files and CA bundles it names are); one holding a secret should not be
    readable by them either (a warning)."""
    from wsguard.config.file_modes import others_can_change

    secrets = list(_secret_keys(data))
    mode = path.stat().st_mode
    names = ", ".join(secrets)
    why = others_can_change(path, "chmod 600" if secrets else "chmod go-w")
    if why is not None:
        if secrets:
            raise ConfigError(secrets[0], f"{path} holds secrets ({names}) and {why}")
        raise ConfigError("config", f"{path}: {why}; whoever can change it decides who is trusted")
    if not secrets:
        return ()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            (
                secrets[0],
                f"{path} holds secrets ({names}) and other users can read it: chmod 600, or "
                "move them to the environment or to *_file keys",
            ),
        )
    return ()


def _secret_keys(data: Mapping[str, Any], model: type[BaseModel] = Config) -> Iterator[str]:
    """The keys of *data* (as read from a file) that hold a secret: those the model keeps
    out of its repr (``auth.secret``, ``admin.token``...) and a store URI with a password."""
    fields = _names(model)
    for name, value in data.items():
        field = fields.get(name)
        if field is None or not value:
            continue
        sub, keyed = _submodel(field.annotation)
        if sub is not None and not keyed and isinstance(value, dict):
            yield from (f"{name}.{key}" for key in _secret_keys(value, sub))
        elif not field.repr or (model is Config and name == "store" and _has_password(value)):
            yield name


def _has_password(uri: object) -> bool:
    from wsguard.stores.uri import redacted

    return isinstance(uri, str) and redacted(uri) != uri


def _env_values(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []
    seen: dict[tuple[str, ...], tuple[str, str]] = {}  # keys -> (name, value)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name in _ENV_ALIASES:
            keys = _ENV_ALIASES[name]
        else:
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            if not _known_key(keys):
                print(
                    f"wsguard: ignoring unknown environment variable {name}"
                    f"{_env_hint(keys) or _did_you_mean(_closest_env_name(name))}",
                    file=sys.stderr,
                )
                continue
        other = seen.setdefault(keys, (name, raw))
        if other[1] != raw:
            raise ConfigError(
                ".".join(keys),
                f"{other[0]} and {name} both set this key, to different values: set one",
            )
        found.append((keys, _parse_env_value(keys, raw)))
    return found


def _env_hint(keys: tuple[str, ...]) -> str:
    """How to set a key inside a table of named entries (``messages.types.chat.scopes``):
    the whole table, as JSON."""
    for i in range(1, len(keys) - 1):
        model = _model_at(list(keys[:i]))
        field = _names(model).get(keys[i]) if model is not None else None
        if field is not None and _submodel(field.annotation)[1]:
            table = ".".join(keys[: i + 1])
            inner = keys[i + 2] if len(keys) > i + 2 else "key"
            example = json.dumps({keys[i + 1]: {inner: "..."}})
            return (
                f" (a key inside {table}.<name> has no variable of its own: set the whole "
                f"table as JSON, e.g. {ENV_PREFIX}{table.upper().replace('.', '__')}='{example}')"
            )
    return ""


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
        return EnvText(raw)  # scalars (secrets included) are taken verbatim
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            raise ConfigError(".".join(keys), "invalid JSON in environment variable") from None
    if kind == "list":
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return EnvText(raw)


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
        message = f"unknown key{_did_you_mean(_closest_key(loc))}"
    elif first["type"] in _TYPE_ERRORS:
        annotation = _annotation_at(loc)
        message = f"not a valid {type_words(annotation)}" if annotation else message
    elif first["type"] in ("literal_error", "enum"):
        message = f"{message} (got {first.get('input')!r})"
    key = ".".join(loc) or "config"
    if key not in _NO_ECHO_KEYS and not any(word in key for word in _NO_ECHO_WORDS):
        given = first.get("input")
        given = str(given) if isinstance(given, Path) else given
        scalar = isinstance(given, (int, float, str, bool))
        if scalar and first["type"] != "extra_forbidden" and "(got" not in message:
            shown = str(given).lower() if isinstance(given, bool) else repr(given)
            message = f"{message} (got {shown})"
    return ConfigError(key, message)


# -- the closest valid key, for an unknown one ----------------------------------------------


def _did_you_mean(key: str | None) -> str:
    return f" (did you mean {key}?)" if key else ""


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds, and whether it is the value of a table keyed by name
    (``messages.types.<name>``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def _names(model: type[BaseModel]) -> dict[str, Any]:
    """The keys of *model* as written in a file (aliases: ``schema``) and their fields."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _model_at(path: list[str]) -> type[BaseModel] | None:
    """The model of the table at *path* (None: not a table of the configuration)."""
    model: type[BaseModel] = Config
    i = 0
    while i < len(path):
        field = _names(model).get(path[i])
        if field is None:
            return None
        sub, keyed = _submodel(field.annotation)
        if sub is None or (keyed and i + 1 >= len(path)):
            return None
        model, i = sub, i + (2 if keyed else 1)
    return model


def _annotation_at(loc: list[str]) -> Any:
    """The type of the value at *loc* (a key, an entry of a list or table), or None."""
    annotation: Any = Config
    for part in loc:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is not dict and len(args) == 1:
            annotation = args[0]  # X | None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = _names(annotation).get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (tuple, dict):
            annotation = get_args(annotation)[-1 if get_origin(annotation) is dict else 0]
        else:
            return None
    return annotation


def _all_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the configuration (the tables keyed by name as one key)."""
    for name, field in _names(model).items():
        sub, keyed = _submodel(field.annotation)
        if sub is not None and not keyed:
            yield from _all_keys(sub, f"{prefix}{name}.")
        else:
            yield prefix + name


def _closest_key(loc: list[str]) -> str | None:
    """The valid key closest to the unknown key at *loc*: a sibling in the same table, or
    the same name in another table (``[limits] ping_interval_seconds``); None when no key
    is close enough to be the one meant."""
    if not loc:
        return None
    *parent, name = loc
    model = _model_at(parent)
    candidates: list[tuple[float, int, str]] = []  # (similarity, sibling first, key)
    if model is not None:
        candidates += [
            (_similarity(name, key), 1, ".".join([*parent, key])) for key in _names(model)
        ]
    for key in _all_keys():
        leaf = key.rsplit(".", 1)[-1]
        candidates.append((_similarity(name, leaf) - 0.1, 0, key))  # elsewhere: closer only
    score, _, best = max(candidates, default=(0.0, 0, ""))
    return best if score >= 0.7 and best != ".".join(loc) else None


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _closest_env_name(name: str) -> str | None:
    """The ``WSGUARD_*`` name closest to the unknown *name*."""
    names = [*_ENV_ALIASES, *_ENV_NOT_KEYS]
    names += [ENV_PREFIX + key.upper().replace(".", "__") for key in _all_keys()]
    close = difflib.get_close_matches(name.upper(), names, n=1, cutoff=0.8)
    return close[0] if close else None
