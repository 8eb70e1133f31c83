"""What ``pip install wsguard`` gives without extras, and what asking for an extra says.

The core install is built for real: a fresh virtualenv, ``pip install`` of a copy of this
checkout (pinned by constraints.txt), no extras. In it ``wsguard serve`` starts on the
default engine and welcomes a client, the middleware admits a connection without
Starlette, and each feature that needs an extra stops at start with one line naming it.
Those tests need pip and a package index (or pip's cache); they are skipped, saying so,
only when the index cannot be reached. The other tests read pyproject.toml and the
imports and run anywhere.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import importlib.metadata
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.sync.client import connect

from wsguard.extras import EXTRAS

pytestmark = pytest.mark.timeout(900)  # building the venv: a minute with pip's cache


def _repo() -> Path:
    here = Path(__file__).resolve().parent
    while not (here / "pyproject.toml").is_file():
        if here.parent == here:
            raise RuntimeError("no pyproject.toml above the tests")
        here = here.parent
    return here


REPO = _repo()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CORE_REQUIREMENTS: list[str] = PYPROJECT["project"]["dependencies"]
EXTRA_REQUIREMENTS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
#: what only extras may install (normalized distribution names)
OPTIONAL = frozenset(
    {"cryptography", "cffi", "redis", "hiredis", "starlette", "uvicorn", "httpx", "httpcore"}
    | {"anyio", "rich", "pygments", "fastapi", "django", "channels", "hypercorn", "click"}
)
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ \(engine (\w+)\)")


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _distributions_of(module: str) -> set[str]:
    found = importlib.metadata.packages_distributions().get(module, [])
    return {_name(d) for d in found}


# -- pyproject.toml and the imports (no network) ----------------------------------------


def test_every_extra_the_code_names_exists_and_installs_its_modules() -> None:
    assert set(EXTRAS) <= set(EXTRA_REQUIREMENTS)
    for extra, modules in EXTRAS.items():
        provided = {_name(r) for r in EXTRA_REQUIREMENTS[extra]}
        for module in modules:
            assert _distributions_of(module) & provided, (extra, module)


def test_all_holds_every_feature_and_test_holds_all_and_the_examples() -> None:
    features = [e for e in EXTRA_REQUIREMENTS if e not in ("all", "examples", "test")]
    assert sorted(features) == sorted(EXTRAS)
    everything = {r for e in features for r in EXTRA_REQUIREMENTS[e]}
    assert set(EXTRA_REQUIREMENTS["all"]) == everything
    assert set(EXTRA_REQUIREMENTS["test"]) >= everything | set(EXTRA_REQUIREMENTS["examples"])


def test_the_core_requires_no_optional_package() -> None:
    assert {_name(r) for r in CORE_REQUIREMENTS} & OPTIONAL == set()


def test_the_examples_extra_covers_what_the_examples_import() -> None:
    allowed = {_name(r) for r in CORE_REQUIREMENTS + EXTRA_REQUIREMENTS["examples"]}
    imported: set[str] = set()
    for path in (REPO / "examples").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {
        m for m in imported if m not in sys.stdlib_module_names and m not in ("wsguard",)
    }
    third_party.discard("django_channels")  # the example's own package
    assert {"fastapi", "django", "channels", "uvicorn"} <= third_party
    for module in sorted(third_party):
        assert _distributions_of(module) & allowed, module


def test_optional_packages_are_imported_only_when_asked_for() -> None:
    """Installed or not, the middleware and ``wsguard serve`` on defaults import none of them
    (cryptography is left out: PyJWT imports it when present)."""
    probe = textwrap.dedent(
        """
        import json, sys
        import wsguard.asgi, wsguard.client, wsguard.hosts, wsguard.engines.picows
        from wsguard.cli.main import _parser
        _parser()
        print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert loaded & {"redis", "starlette", "uvicorn", "httpx", "fastapi", "django", "rich"} == set()


# -- a fresh core install ----------------------------------------------------------------


def _index_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    parts = urlsplit(index)
    if parts.scheme == "file":
        return True
    try:
        with socket.create_connection((parts.hostname or "pypi.org", parts.port or 443), timeout=5):
            return True
    except OSError:
        return False


def _build_core_venv(where: Path) -> str | None:
    """Create *where*/venv with the core install; the reason to skip, or None when built."""
    source = where / "source"
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    venv = where / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    if made.returncode != 0:
        return f"python -m venv is not available: {made.stderr.strip()[-300:]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            *("install", "-q", "--disable-pip-version-check"),
            *("-c", str(REPO / "constraints.txt"), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=700,
        env=env,
    )
    if installed.returncode != 0:
        if not _index_reachable():
            said = [ln.strip() for ln in installed.stderr.splitlines() if "ERROR:" in ln]
            return "no package index reachable, pip cannot install the core: " + (
                said[0] if said else installed.stderr.strip()[-200:]
            )
        pytest.fail(f"pip install of the core failed:\n{installed.stdout}\n{installed.stderr}")
    return None


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core install's venv, built once per run (the xdist workers share it)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    where = shared / "core-install"
    with (shared / "core-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done, skipped = where / "built", where / "skipped"
        if not done.exists() and not skipped.exists():
            shutil.rmtree(where, ignore_errors=True)  # a failed attempt: start over
            where.mkdir()
            reason = _build_core_venv(where)
            (skipped if reason else done).write_text(reason or "")
        if skipped.exists():
            pytest.skip(skipped.read_text())
    return where / "venv"


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no PYTHONPATH (the installed copy runs), no WSGUARD_*."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **extra}


def _wsguard(venv: Path, *args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "wsguard"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(home, **env),
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def _running(venv: Path, *args: str, home: Path, **env: str) -> Iterator[tuple[int, str]]:
    """``wsguard ARGS`` running until the block ends: (port, engine) it listens on."""
    proc = subprocess.Popen(
        [str(venv / "bin" / "wsguard"), *args],
        env=_env(home, **env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        seen: list[str] = []
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"wsguard {' '.join(args)} said nothing for 60 s:\n{''.join(seen)}")
            if line is None:
                pytest.fail(f"wsguard {' '.join(args)} exited {proc.wait()}:\n{''.join(seen)}")
            seen.append(line)
            found = LISTENING.search(line)
            if found:
                break
        yield int(found.group(1)), found.group(2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang is the bug to see
            proc.kill()
            proc.wait()


def _installed(venv: Path) -> set[str]:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {_name(entry["name"]) for entry in json.loads(out.stdout)}


def test_the_core_install_holds_no_optional_package(core_venv: Path) -> None:
    installed = _installed(core_venv)
    assert {"wsguard", "picows", "uvloop", "pyjwt", "websockets"} <= installed
    assert installed & OPTIONAL == set()
    check = subprocess.run(
        [str(core_venv / "bin" / "python"), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout


def test_the_core_serves_the_demo_on_the_default_engine(core_venv: Path, tmp_path: Path) -> None:
    minted = _wsguard(core_venv, "token", "--sub", "alice", "--scope", "chat", home=tmp_path)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    with _running(core_venv, "serve", "--port", "0", home=tmp_path) as (port, engine):
        assert engine == "picows"
        headers = {"Authorization": f"Bearer {token}"}
        with connect(f"ws://127.0.0.1:{port}/", additional_headers=headers) as ws:
            welcome = json.loads(ws.recv(timeout=10))
            assert (welcome["type"], welcome["subject"]) == ("welcome", "alice")
            ws.send(json.dumps({"type": "ping", "id": 7}))
            assert json.loads(ws.recv(timeout=10))["type"] == "pong"


@pytest.mark.parametrize("command", ["engine-websockets", "proxy"])
def test_the_core_runs_the_websockets_engine_and_the_gateway(
    core_venv: Path, tmp_path: Path, command: str
) -> None:
    args: tuple[str, ...] = ("serve", "--port", "0")
    env = {"WSGUARD_ENGINE": "websockets"}
    if command == "proxy":
        args, env = ("proxy", "--port", "0", "--upstream", "ws://127.0.0.1:9/"), {}
    with _running(core_venv, *args, home=tmp_path, **env) as (port, engine):
        assert (engine, port > 0) == ("websockets", True)


def _public_key_pem(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _install_line(extra: str) -> str:
    return f"needs the {extra} extra: pip install 'wsguard[{extra}]'"


MISSING: dict[str, tuple[tuple[str, ...], str]] = {
    "redis-store": (
        ("serve", "--port", "0", "--store", "redis://:hunter2@127.0.0.1:9/0"),
        'wsguard: store: "redis://:***@127.0.0.1:9/0" ' + _install_line("redis"),
    ),
    "revoke": (
        ("revoke", "--jti", "abc", "--store", "redis://127.0.0.1:9"),
        'wsguard: store: "redis://127.0.0.1:9" ' + _install_line("redis"),
    ),
    "admin-port": (
        ("serve", "--port", "0", "--admin-port", "0"),
        "wsguard: admin.port: the admin listener " + _install_line("admin"),
    ),
    "admin-command": (
        ("admin", "health", "--url", "http://127.0.0.1:9"),
        "wsguard: wsguard admin " + _install_line("admin"),
    ),
    "audit": (
        ("audit", "ws://127.0.0.1:9/"),
        "wsguard: wsguard audit " + _install_line("audit"),
    ),
    "public-key": (
        ("serve", "--port", "0", "--config", "{es256}"),
        "wsguard: auth.algorithms: ES256 " + _install_line("publickey"),
    ),
    "public-key-token": (
        ("token", "--sub", "a", "--config", "{es256}", "--private-key", "{pem}"),
        "wsguard: auth.algorithms: minting ES256 tokens " + _install_line("publickey"),
    ),
    "webhook": (
        ("serve", "--port", "0", "--config", "{webhook}"),
        "wsguard: alerts.webhook_url: the alert webhook " + _install_line("webhook"),
    ),
    # check-config refuses what serve would refuse at start
    "check-config-public-key": (
        ("check-config", "--config", "{es256}"),
        "wsguard: auth.algorithms: ES256 " + _install_line("publickey"),
    ),
    "check-config-webhook": (
        ("check-config", "--config", "{webhook}"),
        "wsguard: alerts.webhook_url: the alert webhook " + _install_line("webhook"),
    ),
    "check-config-redis-store": (
        ("check-config", "--config", "{redis}"),
        'wsguard: store: "redis://:***@127.0.0.1:9/0" ' + _install_line("redis"),
    ),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_asking_for_a_missing_extra_says_which_in_one_line(
    core_venv: Path, tmp_path: Path, case: str
) -> None:
    args, expected = MISSING[case]
    pem = _public_key_pem(tmp_path / "es256.pem")
    es256 = tmp_path / "es256.toml"
    es256.write_text(f'[auth]\nalgorithms = ["ES256"]\npublic_key_file = "{pem}"\n')
    webhook = tmp_path / "webhook.toml"
    webhook.write_text('[alerts]\nwebhook_url = "https://hooks.example.com/wsguard"\n')
    redis = tmp_path / "redis.toml"
    redis.write_text('store = "redis://:hunter2@127.0.0.1:9/0"\n')
    files = {"es256": str(es256), "webhook": str(webhook), "pem": str(pem), "redis": str(redis)}
    result = _wsguard(core_venv, *(a.format(**files) for a in args), home=tmp_path)
    assert (result.returncode, result.stderr) == (2, expected + "\n")
    assert "hunter2" not in result.stdout + result.stderr


PROBE = """
import asyncio, json, sys

import wsguard
from wsguard.asgi import WsGuardMiddleware
from wsguard.config import Config
from wsguard.tokens import mint_token

config = Config(auth={"secret": "s" * 40})
seen: dict = {}


async def app(scope, receive, send):
    seen["user"] = scope["user"].display_name
    seen["auth"] = scope["auth"]
    await receive()
    await send({"type": "websocket.accept"})


async def main():
    middleware = WsGuardMiddleware(app, config=config)
    token = mint_token(config, subject="alice", scopes=["chat"]).encode()
    headers = [
        (b"host", b"127.0.0.1:8000"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket"),
        (b"sec-websocket-version", b"13"), (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"authorization", b"Bearer " + token),
    ]
    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
        "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "subprotocols": [],
        "headers": headers,
    }
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    sent = []

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "websocket.accept":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    await asyncio.wait_for(middleware(scope, inbox.get, send), 10)
    await middleware.shutdown()
    return sent


sent = asyncio.run(main())
try:
    WsGuardMiddleware(app, config=Config(auth={"secret": "s" * 40}, admin={"port": 0}))
    admin_error = ""
except wsguard.ConfigError as exc:
    admin_error = f"{exc.key}: {exc.message}"
optional = ("starlette", "uvicorn", "httpx", "redis", "cryptography", "rich", "fastapi")
print(json.dumps({
    "version": wsguard.__version__,
    "sent": sent,
    **seen,
    "imported": sorted(m for m in optional if m in sys.modules),
    "admin_error": admin_error,
}))
"""


def test_the_middleware_and_wsguard_import_and_admit_in_the_core(
    core_venv: Path, tmp_path: Path
) -> None:
    """``import wsguard`` and ``wsguard.asgi`` need no extra: the middleware admits a
    handshake (driven through the ASGI protocol) and, without Starlette, hands the app
    the token's scopes as a list in ``scope["auth"]``; asked for an admin listener, it
    names the extra when it is created."""
    result = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sent"] == ["websocket.accept"]
    assert (report["user"], report["auth"]) == ("alice", ["chat"])
    assert report["imported"] == []
    assert report["admin_error"] == "admin.port: the admin listener " + _install_line("admin")
