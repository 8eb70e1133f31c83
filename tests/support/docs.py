"""The documentation as the tests read it: the pages (README.md and docs/**/*.md), their
fenced code blocks and inline code, and a Python script run as a real process."""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import subprocess
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pytest

from support.paths import DOCS, README, REPO

#: A fenced code block, also indented in a list item: (indent, language, body).
FENCE = re.compile(r"^( *)```([\w-]*)\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")


def pages() -> list[Path]:
    """Every page a user reads: the README and the documentation site's pages."""
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


def page(name: str) -> str:
    """The text of ``docs/<name>`` (``README.md`` for the README)."""
    return (README if name == "README.md" else DOCS / name).read_text()


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}: {self.text.splitlines()[0] if self.text else ''}"


def blocks(lang: str | None = None, *, of: Sequence[Path] | None = None) -> list[Block]:
    """The fenced code blocks of *of* (every page), of one language or all."""
    out: list[Block] = []
    for path in of if of is not None else pages():
        for found in FENCE.finditer(path.read_text()):
            indent, language, body = found.groups()
            if lang is None or language == lang:
                text = textwrap.dedent(body) if indent else body
                out.append(Block(path, language, text))
    return out


def prose(text: str) -> str:
    """*text* without its fenced code blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    """The inline code spans of *text*, outside fenced blocks."""
    return INLINE.findall(prose(text))


def hooks_module() -> ModuleType:
    """``docs/hooks/reference.py``, the generator of the reference pages."""
    path = DOCS / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference_hook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The line ``App.run()``, ``wsguard serve`` and ``uvicorn`` print once they listen.
LISTENING = re.compile(r"(?:listening on|running on) (?:ws|http)://[^:/]+:(\d+)")


class Script:
    """A command (a documented snippet run as a user runs it) as a real process; stderr is
    read line by line so the test can wait for the line saying where it listens, stdout
    (the audit log) is kept."""

    def __init__(self, args: Sequence[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        self._out = threading.Thread(target=self._keep, args=(self.proc.stdout,), daemon=True)
        self._out.start()

    def _keep(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.stdout.extend(stream)

    def audit(self, event: str) -> list[dict[str, Any]]:
        """The audit-log records of *event* the process wrote to stdout so far."""
        records = [json.loads(line) for line in self.stdout if line.startswith("{")]
        return [r for r in records if r.get("event") == event]

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_listening(self, timeout: float = 20.0) -> int:
        """The port from the first line saying where the process listens."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"not listening within {timeout}s:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"exited ({self.proc.poll()}) before listening:\n{''.join(self.lines)}")
            found = LISTENING.search(line)
            if found:
                return int(found.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._out.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code
