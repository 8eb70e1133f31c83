"""Reference pages generated from the code, so they cannot drift from it.

An mkdocs hook (``hooks:`` in mkdocs.yml): a page holding a marker gets it replaced at
build time by

* ``<!-- generated: configuration -->``: every configuration key, with its type, bounds,
  default and meaning, from the pydantic models in ``wsguard.config.model`` (the field
  ``description`` texts);
* ``<!-- generated: cli -->``: every ``wsguard`` command and flag, from the argparse
  parser of ``wsguard.cli.main``.

``python docs/hooks/reference.py configuration|cli`` prints the generated text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from wsguard.config.model import Config

CONFIG_MARKER = "<!-- generated: configuration -->"
CLI_MARKER = "<!-- generated: cli -->"


# -- mkdocs hook -------------------------------------------------------------------------


def on_page_markdown(markdown: str, **_: object) -> str:
    for marker, build in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    return markdown


# -- configuration -----------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested section (``X``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _optional_table(annotation: Any) -> type[BaseModel] | None:
    """The model of an optional table (``X | None``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            return _nested(models[0])
    return None


def _entry_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a table of named entries (``dict[str, X]``)."""
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}


def type_name(annotation: Any) -> str:
    """A TOML-minded name for a field's type."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in rest)
    if origin is tuple:
        return f"list of {_plural(type_name(args[0]))}"
    if origin is dict:
        if _entry_model(annotation) is not None:
            return "tables (below)"
        if args[1] is Any:
            return "table (JSON Schema)"
        return f"table of {_plural(type_name(args[1]))}"
    if _nested(annotation) is not None:
        return "table (below)"
    raise ValueError(f"no documentation name for the type {annotation!r}")


def _plural(name: str) -> str:
    return name.replace("list of", "lists of", 1) if name.startswith("list of") else name + "s"


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def bounds(field: FieldInfo) -> list[str]:
    out: list[str] = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            out.append(f"≥ {_number(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            out.append(f"> {_number(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            out.append(f"≤ {_number(item.le)}")
        elif isinstance(item, annotated_types.Lt):
            out.append(f"< {_number(item.lt)}")
        elif isinstance(item, annotated_types.MinLen):
            out.append("not empty" if item.min_length == 1 else f"at least {item.min_length} long")
        elif getattr(item, "pattern", None):
            out.append(f"pattern `{item.pattern}`")
    return out


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in TOML (``unset`` when there is none)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return _toml_value(value)


def _toml_value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, str | Path):
        return f"`{json.dumps(str(value))}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(json.dumps(str(v)) for v in value) + "]`"
    if isinstance(value, dict):
        if not value:
            return "`{}`"
        if all(isinstance(v, BaseModel) for v in value.values()):
            return ", ".join(f"`{name}`" for name in value)
    raise ValueError(f"no documentation form for the default {value!r}")


def _env_name(path: list[str]) -> str:
    return "WSGUARD_" + "__".join(part.upper() for part in path)


def config_keys(
    model: type[BaseModel] = Config, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, FieldInfo]]:
    """Every documented key: (dotted key, field), recursing into sections and entries
    (written ``<name>`` in the key of a table of named entries)."""
    for name, field in model.model_fields.items():
        key = (*prefix, field.alias or name)
        section = _nested(field.annotation)
        if section is not None:
            yield from config_keys(section, key)
            continue
        yield ".".join(key), field
        table = _optional_table(field.annotation)
        entry = _entry_model(field.annotation)
        if table is not None:
            yield from config_keys(table, key)
        if entry is not None:
            yield from config_keys(entry, (*key, "<name>"))


def _anchor(path: tuple[str, ...]) -> str:
    return "-".join(part for part in path if part != "<name>").replace("_", "-") or "top-level"


def _section(fields: dict[str, FieldInfo], path: tuple[str, ...], doc: str, env: bool) -> list[str]:
    """A heading and a table of *fields* (the keys under *path*), then its sub-tables."""
    title = f"`[{'.'.join(path)}]`" if path else "Top level"
    lines = [f"### {title} {{#{_anchor(path)}}}", ""]
    if doc:
        lines += [" ".join(doc.replace("``", "`").split()), ""]
    if env:
        example = next(n for n, f in fields.items() if _nested(f.annotation) is None)
        lines += [
            f"Environment: `{_env_name([*path, '<KEY>'])}`, e.g. `{_env_name([*path, example])}`.",
            "",
        ]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    later: list[str] = []
    for name, field in fields.items():
        key = (*path, field.alias or name)
        section = _nested(field.annotation)
        if section is not None:
            later += _section(section.model_fields, key, section.__doc__ or "", env)
            continue
        if not field.description:
            raise ValueError(f"{'.'.join(key)}: the model field has no description")
        kind = type_name(field.annotation)
        limits = bounds(field)
        if limits:
            kind += " (" + ", ".join(limits) + ")"
        lines.append(
            f"| `{'.'.join(key)}` | {_cell(kind)} | {_cell(default_text(field))} "
            f"| {_cell(field.description)} |"
        )
        table = _optional_table(field.annotation)
        entry = _entry_model(field.annotation)
        if table is not None:  # an optional table of its own
            later += _section(table.model_fields, key, table.__doc__ or "", env=False)
        if entry is not None:
            later += _section(entry.model_fields, (*key, "<name>"), entry.__doc__ or "", False)
    return [*lines, "", *later]


def configuration_reference() -> str:
    """The Markdown of every configuration key: the top-level keys, then each section."""
    fields = Config.model_fields
    top = {n: f for n, f in fields.items() if _nested(f.annotation) is None}
    lines = _section(top, (), "", env=False)
    for name, field in fields.items():
        section = _nested(field.annotation)
        if section is not None:
            lines += _section(section.model_fields, (name,), section.__doc__ or "", env=True)
    return "\n".join(lines).rstrip() + "\n"


# -- command line ------------------------------------------------------------------------


@contextmanager
def _no_config_env() -> Iterator[None]:
    """Build the parser without the caller's WSGUARD_CONFIG (it is a flag's default)."""
    saved = os.environ.pop("WSGUARD_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WSGUARD_CONFIG"] = saved


def build_parser() -> argparse.ArgumentParser:
    from wsguard.cli.main import _parser

    with _no_config_env():
        return _parser()


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand of *parser*, in the order they were added."""
    out: list[tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    return text


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return ", ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or action.dest.upper()
    return f"`{metavar}`"


def _with_default(action: argparse.Action, text: str) -> str:
    """*text*, with the default appended unless it says it already."""
    default = action.default
    if default in (None, False, [], argparse.SUPPRESS):
        return text
    shown = _number(default)
    if "default" in text or f"({shown}" in text:
        return text
    return f"{text} (default {shown})" if text else f"default {shown}"


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    """A table per argument group; the positional arguments and the untitled options
    share the first one."""
    groups: dict[str, list[argparse.Action]] = {}
    for group in parser._action_groups:
        title = group.title if group.title not in ("options", "positional arguments") else ""
        groups.setdefault(title or "", []).extend(
            a
            for a in group._group_actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        )
    lines: list[str] = []
    for title, actions in groups.items():
        if not actions:
            continue
        if title:
            lines += [f"*{title}*", ""]
        lines += ["| argument | value | meaning |", "|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            text = _with_default(action, _help(action, parser.prog))
            text = text.replace("*", "\\*").replace("<", "&lt;")
            lines.append(f"| {names} | {_cell(_value(action))} | {_cell(text)} |")
        lines.append("")
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=88)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _command(name: str, help_text: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{parser.prog}` {{#{parser.prog.replace(' ', '-')}}}", ""]
    if help_text:
        lines += [help_text[0].upper() + help_text[1:] + ".", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", _usage(parser), "```", "", *_options_table(parser)]
    for sub_name, sub_help, sub in subcommands(parser):
        lines += _command(sub_name, sub_help, sub, level + 1)
    return lines


def cli_reference() -> str:
    """The Markdown of every ``wsguard`` command and flag."""
    parser = build_parser()
    lines = ["```text", _usage(parser), "```", "", *_options_table(parser)]
    for name, help_text, sub in subcommands(parser):
        lines += _command(name, help_text, sub, 2)
    return "\n".join(lines).rstrip() + "\n"


GENERATED: dict[str, Callable[[], str]] = {
    CONFIG_MARKER: configuration_reference,
    CLI_MARKER: cli_reference,
}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    builders = {"configuration": configuration_reference, "cli": cli_reference}
    if which not in builders:
        sys.exit(f"usage: python {sys.argv[0]} configuration|cli")
    sys.stdout.write(builders[which]())
