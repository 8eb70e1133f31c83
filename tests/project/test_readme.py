"""The README's snippets work as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SECRET, RunningServer, make_token
from support.paths import README, WSGUARD


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def test_python_client_snippet_runs_against_the_server(
    server: RunningServer, tmp_path: Path
) -> None:
    client = next(b for b in _blocks("python") if "websockets.asyncio.client" in b)
    assert "ws://127.0.0.1:8765/" in client
    script = tmp_path / "client.py"
    script.write_text(client.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}"))
    env = {**os.environ, "TOKEN": make_token("alice", scopes="chat", secret=SECRET)}
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'type': 'welcome'" in lines[0] and "'subject': 'alice'" in lines[0]
    assert "'type': 'pong'" in lines[1] and "'id': 1" in lines[1]


def test_quick_start_has_exactly_two_setup_commands() -> None:
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [
        line
        for block in re.findall(r"```sh\n(.*?)```", quick, re.DOTALL)[:1]
        for line in block.splitlines()
        if line.strip()
    ]
    assert [c.split("#")[0].strip() for c in commands] == [
        "bash scripts/serve.sh",
        "bash scripts/test.sh",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_scanner_section_shows_only_real_flags_and_every_check() -> None:
    from wsguard.scanner import REGISTRY

    section = README.read_text().split("## Security scanner", 1)[1].split("\n## ", 1)[0]
    usage = subprocess.run(
        [WSGUARD, "audit", "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", section))
    assert shown - set(re.findall(r"--[a-z][a-z0-9-]+", usage)) == set()
    assert "--aggressive" in shown and "--i-own-this-target" in shown
    for check in REGISTRY:
        name = check.split(".", 1)[-1]
        assert f"`{check}`" in section or f"`.{name}`" in section, check
