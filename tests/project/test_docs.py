"""The documentation works as written: README.md and every page of docs/.

* every Python snippet runs, as a user runs it, against a real server (each is claimed by
  one test below, and a new snippet nobody runs fails ``test_every_python_snippet_is_run``);
* every ``wsguard`` command and flag shown exists (the subcommand's ``--help``), every
  configuration key and ``WSGUARD_*`` variable shown is one the model knows, every file of
  the checkout named exists, every TOML snippet loads and every JSON snippet parses;
* the reference pages generated from the code cover every key, command and flag;
* the README stays a short introduction with exactly two set-up commands.

The browser snippets run in headless Chromium (tests/client/test_browser*.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import trustme
from pydantic import BaseModel
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import SECRET, RunningServer, ServerFactory, make_token
from support.cli import cli_env, mint
from support.docs import Block, Script, blocks, hooks_module, inline_code, page, pages, prose
from support.gateway import Backend, GatewayFactory, chat, echo_roundtrip
from support.net import free_port
from support.paths import DOCS, EXAMPLES, README, REPO, WSGUARD
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.loader import load_config
from wsguard.config.model import Config
from wsguard.errors import ConfigError
from wsguard.hosts.app import App
from wsguard.hosts.gateway.identity import verify_identity
from wsguard.session import Connection

# -- the README ---------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize(
    ("name", "heading"), [("README.md", "Quick start"), ("install.md", "Set up")]
)
def test_set_up_is_exactly_two_commands(name: str, heading: str) -> None:
    section = _section(page(name), heading)
    first = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_readme_is_a_short_introduction_that_links_to_the_pages() -> None:
    text = README.read_text()
    assert len(text.encode()) < 12 * 1024, "the manual belongs in docs/, the README stays short"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the documentation"
    missing = [link for link in local if not (REPO / link).exists()]
    assert missing == []
    for mode in ("standalone.md", "handlers.md", "asgi.md", "gateway.md", "scanner.md"):
        assert f"docs/guides/{mode}" in local, mode


# -- commands -----------------------------------------------------------------------------

#: Wrong on purpose: the pages show what a typo gets (the closest flag, key or variable).
MISTYPED = {"wsguard serve --prot", "limits.max_mesage_bytes", "WSGUARD_LIMITS_MAX_MESSAGE_BYTES"}
#: Read by the test suite, not by wsguard (where the dashboard test saves its screenshot).
TEST_VARIABLES = {"WSGUARD_ARTIFACTS"}

_WSGUARD = re.compile(r"(?:^|(?<=[\s(`]))wsguard(?=\s|$)")
_END = re.compile(r"\)|`|\s#|;|&&|\s&|>")


def _command_tree() -> dict[str, set[str]]:
    """Each ``wsguard`` subcommand and its own subcommands, from the argument parser."""
    hook = hooks_module()
    return {
        name: {sub_name for sub_name, _, _ in hook.subcommands(sub)}
        for name, _, sub in hook.subcommands(hook.build_parser())
    }


def invocations(text: str) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(subcommand path, words) of every ``wsguard`` command in *text* (one line of shell
    or one inline code span); ``a | b`` alternatives of a synopsis continue the command
    (a sibling subcommand starts a new one)."""
    tree = _command_tree()
    for found in _WSGUARD.finditer(text):
        rest = text[found.end() :]
        end = _END.search(rest)
        rest = rest[: end.start()] if end else rest
        path: tuple[str, ...] = ()
        for piece in re.split(r"\s\|\s", rest):
            words = [w.strip("[]") for w in piece.split()]
            if not words:
                continue
            if not path:
                path = tuple(words[:1]) if words[0] in tree else ()
                if path and len(words) > 1 and words[1] in tree[path[0]]:
                    path = (path[0], words[1])
            elif len(path) == 2 and words[0] in tree[path[0]]:
                path = (path[0], words[0])
            if not path and not words[0].startswith("-"):
                raise AssertionError(f"unknown wsguard subcommand in {text!r}")
            yield path, words


def shell_lines() -> Iterator[tuple[str, str]]:
    """(where, line) of every command line of the shell snippets, continuations joined."""
    for block in blocks("sh"):
        for line in block.text.replace("\\\n", " ").splitlines():
            command = re.sub(r"(^|\s)#.*$", "", line).strip()  # no comment
            if command:
                yield block.where, command


@functools.cache
def help_flags(path: tuple[str, ...]) -> frozenset[str]:
    done = subprocess.run(
        [WSGUARD, *path, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"wsguard {' '.join(path)} --help: {done.stderr}"
    return frozenset(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", done.stdout))


def _flags(words: list[str]) -> set[str]:
    return {
        w.split("=", 1)[0].rstrip(",") for w in words if re.fullmatch(r"--?[a-zA-Z][\w=-]*.*", w)
    }


def test_every_wsguard_command_and_flag_shown_exists() -> None:
    shown: list[tuple[str, str]] = list(shell_lines())
    for path in pages():
        shown += [(str(path.relative_to(REPO)), span) for span in inline_code(path.read_text())]
    checked = 0
    wrong = []
    for where, text in shown:
        for sub, words in invocations(text):
            flags = _flags(words) - {"-h", "--help"}
            unknown = flags - help_flags(sub)
            for flag in unknown:
                if f"wsguard {' '.join(sub)} {flag}" not in MISTYPED:
                    wrong.append(f"{where}: wsguard {' '.join(sub)} {flag}")
            checked += 1
    assert wrong == []
    assert checked > 40  # the pages show many commands: the search found them
    for typo in (t for t in MISTYPED if t.startswith("wsguard ")):
        *command, flag = typo.split()[1:]
        assert flag not in help_flags(tuple(command)), f"{typo} is meant to be a typo"


def test_files_of_the_checkout_named_in_the_pages_exist() -> None:
    named = {
        found
        for path in pages()
        for found in re.findall(
            r"(?<![\w./~-])((?:benchmarks|examples|scripts|tests|src|docs)/[\w./-]*[\w/])",
            path.read_text(),
        )
    }
    assert named, "the pages name files of the checkout"
    assert sorted(name for name in named if not (REPO / name).exists()) == []


def test_commands_assume_the_activated_virtualenv() -> None:
    """One convention everywhere: commands as typed with .venv activated (install page)."""
    for path in pages():
        assert re.findall(r"\.venv/bin/(?!activate)\w+", path.read_text()) == [], path
    assert "source .venv/bin/activate" in page("install.md")
    assert "source .venv/bin/activate" in page("README.md")


def test_pages_speak_of_the_product_not_its_history() -> None:
    history = re.compile(r"\bissues?\b|#\d{2,}\b|round two|review fix|git history", re.I)
    for path in pages():
        assert history.findall(prose(path.read_text())) == [], path


# -- configuration ------------------------------------------------------------------------

SECTIONS = tuple(
    name
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
)
_KEY = re.compile(rf"(?<![\w./~-])((?:{'|'.join(SECTIONS)})(?:\.[\w*<>]+)+)")
_ENV = re.compile(r"\bWSGUARD_[A-Z0-9_]*[A-Z0-9]")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model of a section, an optional table or a table's entries, if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def key_exists(dotted: str) -> bool:
    """Whether *dotted* names a key: ``*`` globs a name; in a table of named entries
    (``messages.types``, ``alerts.rules``) the next part is the entry's name."""
    return _exists(Config, dotted.split("."))


def _exists(model: type[BaseModel], parts: list[str]) -> bool:
    part, rest = parts[0], parts[1:]
    pattern = re.compile(re.escape(part).replace(r"\*", ".*") + "$")
    matches = [f for n, f in model.model_fields.items() if pattern.match(f.alias or n)]
    if not matches or not rest:
        return bool(matches)
    return any(_below(field.annotation, rest) for field in matches)


def _below(annotation: Any, rest: list[str]) -> bool:
    if get_origin(annotation) is dict:  # rest[0] is an entry's name
        entry = _model_of(get_args(annotation)[1])
        return len(rest) == 1 or (entry is not None and _exists(entry, rest[1:]))
    sub = _model_of(annotation)
    return sub is not None and _exists(sub, rest)


def test_key_exists_knows_the_shapes_the_pages_use() -> None:
    assert key_exists("limits.max_message_bytes")
    assert key_exists("admin.tls.client_ca_file")
    assert key_exists("cluster.on_store_error.nonces")
    assert key_exists("gateway.*_header") and key_exists("liveness.ping_*")
    assert key_exists("messages.types.<name>") and key_exists("messages.types.*")
    assert key_exists("messages.types.<name>.replay.window_seconds")
    assert key_exists("alerts.rules.<name>.ban_seconds")
    assert not key_exists("limits.max_mesage_bytes")
    assert not key_exists("gateway.*_headerz")
    assert not key_exists("messages.types.<name>.nonce_field")


def env_exists(name: str) -> bool:
    from wsguard.config import loader

    if name in loader._ENV_ALIASES or name in loader._ENV_NOT_KEYS:
        return True
    return loader._known_key(tuple(p.lower() for p in name[len("WSGUARD_") :].split("__")))


def test_every_configuration_key_and_variable_shown_exists() -> None:
    from wsguard.scanner import REGISTRY

    checks = set(REGISTRY)
    unknown: list[str] = []
    keys = variables = 0
    for path in pages():
        text = path.read_text()
        for span in inline_code(text):
            for dotted in _KEY.findall(span):
                if dotted in checks or dotted.endswith((".py", ".jsonl")):
                    continue  # a scanner check id, a file name
                keys += 1
                if not key_exists(dotted) and dotted not in MISTYPED:
                    unknown.append(f"{path.name}: {dotted}")
        for name in _ENV.findall(text):
            variables += 1
            if not env_exists(name) and name not in MISTYPED | TEST_VARIABLES:
                unknown.append(f"{path.name}: {name}")
    assert unknown == []
    assert keys > 150 and variables > 10
    assert not key_exists("limits.max_mesage_bytes")
    assert not env_exists("WSGUARD_LIMITS_MAX_MESSAGE_BYTES")


@pytest.mark.parametrize("block", blocks("toml"), ids=lambda b: b.where)
def test_toml_snippet_loads(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "snippet.toml"
    path.write_text(block.text)
    try:
        load_config(path, env={})
    except ConfigError as exc:
        pytest.fail(f"{block.where}: {exc}")


@pytest.mark.parametrize("block", blocks("json"), ids=lambda b: b.where)
def test_json_snippet_parses(block: Block) -> None:
    lines = [line for line in block.text.splitlines() if line.strip()]
    documents = [json.loads(line) for line in lines]
    assert all(isinstance(d, dict) for d in documents)


# -- the generated reference --------------------------------------------------------------


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_keys(annotation, f"{key}.")
            continue
        yield key
        sub = _model_of(annotation)
        if sub is not None:  # an optional table, or the entries of a table of tables
            entry = "<name>." if get_origin(annotation) is dict else ""
            yield from _leaf_keys(sub, f"{key}.{entry}")


def test_configuration_reference_has_every_key_with_type_default_and_meaning() -> None:
    hook = hooks_module()
    assert hook.CONFIG_MARKER in page("reference/configuration.md")
    text = hook.configuration_reference()
    documented = dict(hook.config_keys())
    assert set(_leaf_keys(Config)) == set(documented)
    for key, field in documented.items():
        assert field.description, f"{key}: add Field(description=...) in config/model.py"
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert field.description.replace("|", "\\|") in row, key
        assert hook.default_text(field) in row, key
    assert "| `limits.max_message_bytes` | integer (≥ 64, ≤ 67108864) | `8192` |" in text
    assert "| `auth.audience` | list of strings | `[]` |" in text


def test_cli_reference_has_every_command_and_flag() -> None:
    hook = hooks_module()
    assert hook.CLI_MARKER in page("reference/cli.md")
    text = hook.cli_reference()

    def walk(parser: Any) -> Iterator[Any]:
        yield parser
        for _, _, sub in hook.subcommands(parser):
            yield from walk(sub)

    parsers = list(walk(hook.build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        heading = f"`{parser.prog}`"
        assert parser.prog == "wsguard" or f"# {heading}" in text, parser.prog
        section = text.split(f"# {heading}", 1)[-1].split("\n#", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in section, f"{parser.prog} {option}"


# -- the scanner page ---------------------------------------------------------------------


def test_scanner_page_shows_only_real_flags_and_every_check() -> None:
    from wsguard.scanner import REGISTRY

    text = page("guides/scanner.md")
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))
    assert shown - help_flags(("audit",)) == set()
    assert "--aggressive" in shown and "--i-own-this-target" in shown
    for check in REGISTRY:
        name = check.split(".", 1)[-1]
        assert f"`{check}`" in text or f"`.{name}`" in text, check


# -- install ------------------------------------------------------------------------------


def _declared_extras() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"])


def test_readme_names_the_extras_of_the_install_page() -> None:
    table = _section(page("install.md"), "Extras")
    extras = re.findall(r"^\| `([a-z]+)` \|", table, re.MULTILINE)
    assert extras == ["publickey", "redis", "admin", "webhook", "audit", "all", "examples", "test"]
    readme = _section(page("README.md"), "Install")
    assert [e for e in extras if f"`{e}`" in readme] == extras


def test_install_page_extras_are_the_packages_extras() -> None:
    table = _section(page("install.md"), "Extras")
    extras = re.findall(r"^\| `([a-z]+)` \|", table, re.MULTILINE)
    assert extras == _declared_extras()  # each one, in pyproject's order


def test_install_page_shows_the_missing_extra_messages_the_code_prints() -> None:
    from wsguard.extras import EXTRAS, MissingExtra

    text = page("install.md")
    for extra in EXTRAS:
        line = str(MissingExtra("", "x", extra)).removeprefix("x ")
        assert line in text, extra


# -- Python snippets ----------------------------------------------------------------------

#: The marker each runner below finds its snippets by: every Python snippet holds one.
RUNNERS = {
    "client": "websockets.asyncio.client",
    "handlers": "inbox: asyncio.Queue",
    "readme_handler": "conn.subject, conn.identity, conn.send(...)",
    "echo": "conn.send_raw(data)",
    "asgi": "who = websocket.user.display_name",
    "readme_asgi": 'await websocket.send_json({"from"',
    "identity": "verify_identity(headers",
    "wsguard_client": "WsguardClient(",
}


def snippets(runner: str) -> list[Block]:
    found = [b for b in blocks("python") if RUNNERS[runner] in b.text]
    assert found, f"no Python snippet holds {RUNNERS[runner]!r}"
    return found


def test_every_python_snippet_is_run() -> None:
    for block in blocks("python"):
        claimed = [name for name, marker in RUNNERS.items() if marker in block.text]
        assert len(claimed) == 1, f"{block.where}: run by {claimed or 'no test'}"


def _env(home: Path, **extra: str) -> dict[str, str]:
    return cli_env(home, **extra)


def _connect(port: int, token: str, path: str = "/") -> ClientConnection:
    ws = connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
        close_timeout=5,
    )
    ws.pending_legacy_warning = False  # closed by the with block
    return ws


def _recv(ws: ClientConnection) -> Any:
    return json.loads(ws.recv(timeout=10))


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory with the ``wsguard.toml`` the snippets load (a known HS256 secret)."""
    (tmp_path / "wsguard.toml").write_text(f'[auth]\nsecret = "{SECRET}"\n')
    return tmp_path


def _run_app(code: str, where: Path) -> Script:
    (where / "app.py").write_text(code)
    return Script([sys.executable, "app.py"], cwd=where, env=_env(where, WSGUARD_PORT="0"))


@pytest.mark.parametrize("block", snippets("client"), ids=lambda b: b.where)
def test_client_snippet_runs_against_the_server(
    block: Block, server: RunningServer, tmp_path: Path
) -> None:
    assert "ws://127.0.0.1:8765/" in block.text
    script = tmp_path / "client.py"
    script.write_text(block.text.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}"))
    env = {**os.environ, "TOKEN": make_token("alice", scopes="chat", secret=SECRET)}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'type': 'welcome'" in lines[0] and "'subject': 'alice'" in lines[0]
    assert "'type': 'pong'" in lines[1] and "'id': 1" in lines[1]


@pytest.mark.parametrize("block", snippets("handlers"), ids=lambda b: b.where)
def test_handlers_snippet_serves_its_handlers(block: Block, app_dir: Path) -> None:
    app = _run_app(block.text, app_dir)
    try:
        port = app.wait_listening()
        with _connect(port, make_token("alice")) as alice, _connect(port, make_token("bob")) as bob:
            welcome = _recv(alice)
            assert welcome["type"] == "welcome" and welcome["subject"] == "alice"
            assert welcome["types"] == ["auth", "chat", "data"]  # as the page says
            assert _recv(alice) == {"type": "hello", "scopes": ["chat"]}
            assert _recv(bob)["type"] == "welcome" and _recv(bob)["type"] == "hello"
            alice.send(json.dumps({"type": "chat", "text": "hi"}))
            assert _recv(bob) == {
                "type": "broadcast",
                "from": "alice",
                "message": {"type": "chat", "text": "hi"},
            }
            alice.send(json.dumps({"type": "data", "channel": "c", "payload": {"n": 1}}))
            assert _recv(alice) == {"type": "queued"}
    finally:
        assert app.stop() == 0, "".join(app.lines)
    assert any("(engine picows)" in line for line in app.lines), "the default engine"


@pytest.mark.parametrize("block", snippets("readme_handler"), ids=lambda b: b.where)
def test_readme_handler_snippet_broadcasts_chat(block: Block, app_dir: Path) -> None:
    app = _run_app(block.text, app_dir)
    try:
        port = app.wait_listening()
        with _connect(port, make_token("alice")) as alice, _connect(port, make_token("bob")) as bob:
            assert _recv(alice)["types"] == ["auth", "chat"]
            assert _recv(bob)["type"] == "welcome"
            alice.send(json.dumps({"type": "chat", "text": "hi"}))
            message = _recv(bob)
            assert message == {"type": "broadcast", "from": "alice", "message": message["message"]}
            alice.send(json.dumps({"type": "ping", "id": 1}))  # allowlisted, no handler
            assert _recv(alice)["code"] == "unhandled_type"
    finally:
        assert app.stop() == 0, "".join(app.lines)


@pytest.mark.parametrize("block", snippets("echo"), ids=lambda b: b.where)
def test_echo_snippet_echoes_text_and_binary(block: Block, tmp_path: Path) -> None:
    assert 'load_config("examples/echo.toml")' in block.text  # run from the checkout
    (tmp_path / "echo.py").write_text(block.text)
    echo = Script(
        [sys.executable, str(tmp_path / "echo.py")],
        cwd=REPO,
        env=_env(tmp_path, WSGUARD_PORT="0"),  # HOME: the development key, as echo.toml says
    )
    try:
        port = echo.wait_listening()
        token = mint(tmp_path, "--config", str(EXAMPLES / "echo.toml"), "--sub", "alice")
        with _connect(port, token) as ws:
            ws.send("not JSON at all")  # no welcome frame: the first frame is the echo
            assert ws.recv(timeout=10) == "not JSON at all"
            ws.send(b"\x00\xff binary")
            assert ws.recv(timeout=10) == b"\x00\xff binary"
    finally:
        assert echo.stop() == 0, "".join(echo.lines)


def _run_uvicorn(code: str, where: Path) -> tuple[Script, int]:
    (where / "app.py").write_text(code)
    port = free_port()
    server = Script(
        [sys.executable, "-m", "uvicorn", "app:app", "--ws-max-size", "8192", "--port", str(port)],
        cwd=where,
        env=_env(where),
    )
    return server, server.wait_listening()


@pytest.mark.parametrize("block", snippets("asgi"), ids=lambda b: b.where)
def test_asgi_snippet_admits_only_with_a_token(block: Block, app_dir: Path) -> None:
    server, port = _run_uvicorn(block.text, app_dir)
    try:
        with pytest.raises(InvalidStatus) as refused:
            _connect(port, "not-a-token", "/chat")
        assert refused.value.response.status_code == 401
        with _connect(port, make_token("alice"), "/chat") as ws:
            ws.send(json.dumps({"type": "chat", "text": "hi"}))  # the one message it reads
            with pytest.raises(ConnectionClosed):  # the handler returned: no error frame
                ws.recv(timeout=10)
    finally:
        server.stop()
    assert [e["status"] for e in server.audit("handshake_refused")] == [401]
    assert [e["subject"] for e in server.audit("connection_admitted")] == ["alice"]


@pytest.mark.parametrize("block", snippets("readme_asgi"), ids=lambda b: b.where)
def test_readme_asgi_snippet_answers_with_the_subject(block: Block, app_dir: Path) -> None:
    server, port = _run_uvicorn(block.text, app_dir)
    try:
        with _connect(port, make_token("alice"), "/chat") as ws:
            ws.send(json.dumps({"type": "chat", "text": "hi"}))
            assert _recv(ws) == {"from": "alice", "message": {"type": "chat", "text": "hi"}}
            ws.send(json.dumps({"type": "nope"}))  # refused by wsguard, not by the app
            assert _recv(ws)["code"] == "unknown_type"
    finally:
        server.stop()


IDENTITY_SECRET = "docs-identity-secret-0123456789abcdef"


@pytest.mark.parametrize("block", snippets("identity"), ids=lambda b: b.where)
def test_identity_snippet_verifies_the_gateways_headers(
    block: Block, backend: Backend, gateways: GatewayFactory
) -> None:
    shown = '"ws://127.0.0.1:3000/ws"'
    assert shown in block.text
    gateway = gateways(backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET}})
    with gateway.connect(make_token("alice")) as ws:
        echo_roundtrip(ws, chat("hi"))
    headers = dict(backend.connection().headers.raw_items())
    code = compile(block.text.replace(shown, repr(backend.url)), block.where, "exec")
    namespace: dict[str, Any] = {"headers": headers, "secret": IDENTITY_SECRET}
    exec(code, namespace)
    assert namespace["ok"] is True
    again = verify_identity(headers, IDENTITY_SECRET, upstream=backend.url, seen=namespace["seen"])
    assert again is False  # the same header set twice: a replay


def _transfer_type() -> dict[str, Any]:
    """The signed ``transfer`` type as the signing page configures it."""
    [block] = [b for b in blocks("toml") if "[messages.types.transfer]" in b.text]
    spec: dict[str, Any] = tomllib.loads(block.text)["messages"]["types"]["transfer"]
    return spec


@pytest.mark.parametrize("block", snippets("wsguard_client"), ids=lambda b: b.where)
def test_wsguard_client_snippet_signs_over_mtls(
    block: Block, server_factory: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    served = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "server.pem").write_bytes(b"".join(b.bytes() for b in served.cert_chain_pems))
    served.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert(
        "alice.example", common_name="alice"
    ).private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    (tmp_path / "token.txt").write_text(make_token("alice") + "\n")

    def transfers(app: App) -> None:
        @app.on("transfer")
        def transfer(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "transfer_ok", "amount": message["amount"]})

    server = server_factory(
        {
            "tls": {
                "cert_file": str(tmp_path / "server.pem"),
                "key_file": str(tmp_path / "server.key"),
                "client_ca_file": str(tmp_path / "ca.pem"),
                "client_cert": "optional",  # the token names the subject, the certificate too
            },
            "signing": {"session_keys": True},
            "messages": {"types": {**DEMO_MESSAGE_TYPES, "transfer": _transfer_type()}},
        },
        setup=transfers,
    )
    shown = "wss://chat.example.com/"
    assert shown in block.text
    (tmp_path / "client.py").write_text(
        block.text.replace(shown, f"wss://127.0.0.1:{server.port}/")
    )
    result = subprocess.run(
        [sys.executable, "client.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["alice", "{'type': 'transfer_ok', 'amount': 10}"]
    admitted = server.audit.events("connection_admitted")
    assert [e["subject"] for e in admitted] == ["alice"]


# -- every page is reached ----------------------------------------------------------------


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    for path in pages()[1:]:
        assert str(path.relative_to(DOCS)) in nav, path


def test_server_hint_points_at_a_page_that_exists() -> None:
    """``wsguard serve`` says where to read how to connect."""
    from wsguard.hosts import app as app_module

    source = Path(app_module.__file__).read_text()
    [(name, heading)] = re.findall(r"\(docs: ([\w/.-]+), (\w[\w ]*)\)", source)
    assert f"\n## {heading}\n" in page(name)
