"""``wsguard serve`` as a subprocess, for tests of the real command line."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from support.paths import WSGUARD

LISTENING = re.compile(r"listening on ws://(\[[^\]]+\]|[^:/]+):(\d+)/")


class Served:
    """A running ``wsguard serve`` (or *command*, e.g. ``proxy``) subprocess; stdout (the
    audit log) goes to a file."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str],
        audit_path: Path,
        *,
        command: str = "serve",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.audit_path = audit_path
        self._audit_fh = audit_path.open("w")
        self.proc = subprocess.Popen(
            [WSGUARD, command, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._audit_fh,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        self.host = ""
        self.port = 0

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.stderr_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_for(self, needle: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """Block until a stderr line matches; fail with what was seen otherwise."""
        pattern = needle if isinstance(needle, re.Pattern) else re.compile(re.escape(needle))
        for seen in self.stderr_lines:
            found = pattern.search(seen)
            if found:
                return found
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {pattern.pattern!r} on stderr within {timeout}s:\n{self.stderr}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"server exited ({self.proc.poll()}) before {pattern.pattern!r}:\n{self.stderr}"
                )
            match = pattern.search(line)
            if match:
                return match

    def wait_listening(self) -> int:
        match = self.wait_for(LISTENING)
        self.host = match.group(1).strip("[]")
        self.port = int(match.group(2))
        return self.port

    def connect(self, token: str) -> ClientConnection:
        return connect(
            f"ws://{self.host}:{self.port}/",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
            close_timeout=5,
        )

    def audit_events(self) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().split("\n")
        return [json.loads(line) for line in lines if line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._audit_fh.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._audit_fh.close()
