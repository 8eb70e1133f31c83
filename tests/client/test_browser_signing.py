"""The Web Crypto signing snippet of the documentation (the signing page) in a real
headless Chromium.

* served from an allowed origin with ``signing.session_keys = true`` and ``chat``
  signed, the snippet signs ``{"type": "chat", "text": "hello"}`` with the session key
  from the welcome frame; another (Python) client receives the broadcast, and the
  page gets no error frame;
* the snippet's ``canonical()`` produces exactly the text of
  ``wsguard.core.integrity.canonical`` for tricky values (key order by UTF-16 code
  units, astral characters, control characters, quotes, backslashes, non-ASCII).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from conftest import ServerFactory, make_token
from support.browser import CHROMIUM, Browser, page_server
from support.paths import DOCS
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.core.integrity import SESSION_KID, canonical

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")

SNIPPET_URL = "wss://chat.example.com/"


def _signing_snippet() -> str:
    page = DOCS / "guides" / "signing.md"
    blocks = re.findall(r"```js\n(.*?)```", page.read_text(), re.DOTALL)
    return str(next(b for b in blocks if "crypto.subtle" in b))


def _page_html(port: int, token: str) -> bytes:
    snippet = _signing_snippet()
    assert SNIPPET_URL in snippet
    js = snippet.replace(SNIPPET_URL, f"ws://127.0.0.1:{port}/")
    prelude = f"const token = {json.dumps(token)};\nwindow.logs = [];\n"
    # a second listener records every frame the page receives
    tail = '\nws.addEventListener("message", (event) => window.logs.push(event.data));\n'
    return (
        '<!doctype html><html><head><meta charset="utf-8"></head><body><script>'
        f"{prelude}{js}{tail}</script></body></html>"
    ).encode()


def _signed_chat_config(origin: str) -> dict[str, Any]:
    types = {**DEMO_MESSAGE_TYPES, "chat": {**DEMO_MESSAGE_TYPES["chat"], "signed": True}}
    return {
        "origin": {"allowed": [origin]},
        "signing": {"session_keys": True},
        "messages": {"types": types},
    }


def _evaluate(browser: Browser, session: str, expression: str) -> Any:
    result = browser.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
    assert "exceptionDetails" not in result, result["exceptionDetails"]
    return result["result"].get("value")


# Values whose canonical text is easy to get wrong in one language or the other.
TRICKY_VALUES: list[dict[str, Any]] = [
    {"b": 1, "a": 2, "A": 3, "aa": 4, "": 5},
    {
        "\U0001f600": "astral key (UTF-16 D83D sorts before FFFD)",
        "\ufffd": "replacement character key",
        "é": "latin-1 key",
        "z": "ascii key",
        "\u00ff": "y with diaeresis",
        "\uff5e": "fullwidth tilde",
    },
    {"nested": {"y": [{"b": None, "a": True}, [], {}], "x": {"d": False, "c": ""}}},
    {"controls": "\x00\x01\x07\x08\t\n\x0b\x0c\r\x0e\x1b\x1f\x7f end"},
    {"quotes": "say \"hi\" \\ back\\slash / slash 'single'"},
    {"unicode": "naïve café — 中文 😀 \u2028 \u2029 \u00a0 \ufeff \ufffd"},
    {"numbers": [0, -1, 1, 2**53 - 1, -(2**53 - 1), 1700000000]},
    {"type": "chat", "text": "hi", "kid": "k1", "nonce": "A" * 22, "ts": 1700000000},
]


def test_web_crypto_signed_chat_is_accepted_and_broadcast(
    server_factory: ServerFactory, browser: Browser
) -> None:
    page = page_server(b"")
    origin = f"http://127.0.0.1:{page.server_address[1]}"
    server = server_factory(_signed_chat_config(origin))
    page.RequestHandlerClass.body = _page_html(server.port, make_token("carol"))  # type: ignore[attr-defined]
    try:
        with server.connect_welcomed(make_token("bob")) as bob:
            session = browser.open(origin + "/")
            broadcast = json.loads(bob.recv(timeout=20))
            # a ping after the chat: its pong follows any reply to the chat in order
            _evaluate(browser, session, 'ws.send(JSON.stringify({type: "ping", id: 2}))')
            logs = browser.wait_logs(session, 2)
    finally:
        page.shutdown()
    assert broadcast == {
        "type": "broadcast",
        "from": "carol",
        "message": {"type": "chat", "text": "hello"},
    }
    assert len(logs) == 2, logs
    welcome, pong = logs
    assert welcome["type"] == "welcome"
    assert welcome["subject"] == "carol"
    assert welcome["signing"]["kid"] == SESSION_KID
    assert pong["type"] == "pong" and pong["id"] == 2  # no error frame (bad_signature) between
    assert not [m for m in logs if m.get("type") == "error"]
    admitted = server.audit.events("connection_admitted")
    assert [(e["subject"], e.get("origin")) for e in admitted] == [
        ("bob", None),
        ("carol", origin),
    ]


def test_snippet_canonical_matches_python_canonical(
    server_factory: ServerFactory, browser: Browser
) -> None:
    page = page_server(b"")
    origin = f"http://127.0.0.1:{page.server_address[1]}"
    server = server_factory(_signed_chat_config(origin))
    page.RequestHandlerClass.body = _page_html(server.port, make_token("carol"))  # type: ignore[attr-defined]
    try:
        session = browser.open(origin + "/")
        browser.wait_logs(session, 1)  # the page's script has run (welcome received)
        mismatches = []
        for value in TRICKY_VALUES:
            # the value travels as JSON text (ASCII escapes) and is parsed by the page
            literal = json.dumps(json.dumps(value))
            from_js = _evaluate(browser, session, f"canonical(JSON.parse({literal}))")
            from_py = canonical(value).decode("utf-8")
            if from_js != from_py:
                mismatches.append((value, from_js, from_py))
    finally:
        page.shutdown()
    assert mismatches == []
