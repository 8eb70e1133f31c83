"""A real browser (headless Chromium over the DevTools protocol) against wsguard.

* the documentation's browser snippet (token in ``Sec-WebSocket-Protocol``, on the
  standalone server's page) works from an
  allowed origin: welcome, then pong;
* the same page served from a foreign origin is refused before the upgrade (403),
  which is the cross-site WebSocket hijacking defence.
"""

from __future__ import annotations

import re

import pytest

from conftest import RunningServer, ServerFactory, make_token
from support.browser import CHROMIUM, Browser, page_server
from support.paths import DOCS

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


def _snippet() -> str:
    page = DOCS / "guides" / "standalone.md"
    blocks = re.findall(r"```js\n(.*?)```", page.read_text(), re.DOTALL)
    return str(next(b for b in blocks if "new WebSocket" in b))


def _page_html(server: RunningServer, token: str) -> bytes:
    js = _snippet().replace("<output of wsguard token>", token)
    js = js.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}")
    capture = "window.logs = [];console.log = (...args) => window.logs.push(JSON.stringify(args));"
    return f"<!doctype html><html><body><script>{capture}\n{js}</script></body></html>".encode()


def test_docs_browser_snippet_from_an_allowed_origin(
    server_factory: ServerFactory, browser: Browser
) -> None:
    page = page_server(b"")
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
    page = page_server(b"")
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
