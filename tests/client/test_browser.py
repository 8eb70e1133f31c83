"""A real browser (headless Chromium over the DevTools protocol) against wsguard.

* the README's browser snippet (token in ``Sec-WebSocket-Protocol``) works from an
  allowed origin: welcome, then pong;
* the same page served from a foreign origin is refused before the upgrade (403),
  which is the cross-site WebSocket hijacking defence.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from conftest import RunningServer, ServerFactory, make_token

README = Path(__file__).resolve().parent.parent / "README.md"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("chromium is required in CI (scripts/test.sh installs it)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


def _snippet() -> str:
    blocks = re.findall(r"```js\n(.*?)```", README.read_text(), re.DOTALL)
    return str(next(b for b in blocks if "new WebSocket" in b))


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def _page_server(body: bytes) -> http.server.ThreadingHTTPServer:
    handler = type("Page", (_Page,), {"body": body})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _page_html(server: RunningServer, token: str) -> bytes:
    js = _snippet().replace("<output of wsguard token>", token)
    js = js.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}")
    capture = "window.logs = [];console.log = (...args) => window.logs.push(JSON.stringify(args));"
    return f"<!doctype html><html><body><script>{capture}\n{js}</script></body></html>".encode()


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


def test_readme_browser_snippet_from_an_allowed_origin(
    server_factory: ServerFactory, browser: Browser
) -> None:
    page = _page_server(b"")
    origin = f"http://127.0.0.1:{page.server_address[1]}"
    server = server_factory({"origin": {"allowed": [origin]}})
    page.RequestHandlerClass.body = _page_html(server, make_token("carol"))  # type: ignore[attr-defined]
    try:
        session = browser.open(origin + "/")
        logs = browser.wait_logs(session, 2)
    finally:
        page.shutdown()
    assert logs[0][0]["type"] == "welcome"
    assert logs[0][0]["subject"] == "carol"
    assert logs[1][0] == {"type": "pong", "id": 1, "ts": logs[1][0]["ts"]}
    admitted = server.audit.events("connection_admitted")
    assert admitted[0]["origin"] == origin
    assert admitted[0]["subprotocol"] == "wsguard.v1"


def test_foreign_origin_page_is_refused_before_upgrade(
    server_factory: ServerFactory, browser: Browser
) -> None:
    server = server_factory({"origin": {"allowed": ["https://app.example.com"]}})
    page = _page_server(b"")
    page.RequestHandlerClass.body = _page_html(server, make_token("mallory"))  # type: ignore[attr-defined]
    try:
        session = browser.open(f"http://127.0.0.1:{page.server_address[1]}/")
        logs = browser.wait_logs(session, 1)
    finally:
        page.shutdown()
    assert logs[0][0] == "closed"
    assert logs[0][1] == 1006  # the browser saw no WebSocket at all
    refused = server.audit.events("handshake_refused")
    assert refused[-1]["status"] == 403
    assert refused[-1]["reason"] == "origin_forbidden"
    assert server.audit.events("connection_admitted") == []
