"""A real browser: headless Chromium driven over the DevTools protocol, and a static
page server to load pages from (an origin of the test's choosing)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("chromium is required in CI (scripts/test.sh installs it)")


class Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def page_server(body: bytes) -> http.server.ThreadingHTTPServer:
    handler = type("Page", (Page,), {"body": body})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class Browser:
    """Headless Chromium driven through the Chrome DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.profile = profile
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.05)  # polling for the file chromium writes, bounded by the deadline
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        self.ws.pending_legacy_warning = False  # closed explicitly in close()
        self._id = 0
        self.events: list[dict[str, Any]] = []  # DevTools events seen while waiting for replies

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=20))
            if "method" in reply and "id" not in reply:
                self.events.append(reply)
            elif reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", url=url)["targetId"]
        return str(self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])

    def logs(self, session: str) -> list[Any]:
        result = self.call(
            "Runtime.evaluate",
            session,
            expression="JSON.stringify(window.logs)",
            returnByValue=True,
        )
        value = result["result"].get("value")
        return [json.loads(entry) for entry in json.loads(value)] if value else []

    def wait_logs(self, session: str, count: int, timeout: float = 15) -> list[Any]:
        deadline = time.monotonic() + timeout
        logs = self.logs(session)
        while len(logs) < count and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the page's state, bounded by the deadline
            logs = self.logs(session)
        return logs

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()
