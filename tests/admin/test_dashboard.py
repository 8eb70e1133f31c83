"""The live security dashboard on the admin listener.

* end to end in headless Chromium (DevTools protocol): ``/dashboard`` sends an
  anonymous browser to ``/login``; logging in with the admin token opens the
  dashboard, whose own WebSocket then shows a live client connection, refusals
  a test client caused (handshakes without a token, a message of unknown type,
  invalid JSON) as events, per-reason charts and an offending address, and a
  ban made through the admin API; a screenshot is kept as an artefact;
* the page loads nothing from anywhere but the admin listener itself;
* the dashboard's WebSocket is held to the policy without a browser: 401 without
  a credential, 403 from a foreign or missing ``Origin``, 503 beyond
  ``admin.max_dashboards``, read-only (a data frame closes 1008, an oversized one
  1009), and closed with 4001 when its session ends;
* logging in: a wrong token is 401, a foreign ``Origin`` 403, and the session
  cookie is ``HttpOnly`` and ``SameSite=Strict`` and opens the dashboard only; on an
  HTTPS listener it is ``__Host-`` prefixed (the unprefixed name is no session there).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from conftest import ADMIN_TOKEN, RunningServer, ServerFactory, admin_headers, admin_overrides
from support.admin import (
    ROOMY,
    Certificates,
    admin_port,
    admin_server,
    call,
    cookie_attributes,
    dashboard_url,
    first_snapshot,
    refused_upgrade,
    session_cookie_name,
)
from support.browser import CHROMIUM, Browser
from support.paths import REPO

EVIL = "http://evil.example"

T = TypeVar("T")

browser_only = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


def eventually(check: Callable[[], T | None], timeout: float = 10.0) -> T | None:
    """Poll *check* until it returns something other than None (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None or time.monotonic() > deadline:
            return result
        time.sleep(0.05)  # polling a condition, bounded by the deadline


def artifacts_dir() -> Path:
    path = Path(os.environ.get("WSGUARD_ARTIFACTS") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the browser ------------------------------------------------------------------------


class Chromium(Browser):
    """support.browser's Browser, with the page helpers of the dashboard tests."""

    def blank_page(self) -> str:
        """A new tab on about:blank (so domains can be enabled before navigating)."""
        session = self.open("about:blank")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=1280,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of *expression* in the page, or None while the page is navigating."""
        try:
            result = self.call(
                "Runtime.evaluate", session, expression=expression, returnByValue=True
            )
        except RuntimeError:  # no execution context during a navigation
            return None
        if "exceptionDetails" in result:
            return None
        return result["result"].get("value")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    b = Chromium(tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


STATE_JS = """(() => {
  const text = (id) => {
    const el = document.getElementById(id);
    return el ? el.textContent : null;
  };
  const rows = (id) => Array.from(document.querySelectorAll(`#${id} tbody tr`),
                                  (tr) => Array.from(tr.cells, (td) => td.textContent));
  return JSON.stringify({
    path: location.pathname,
    ready: document.readyState,
    updated: document.body ? (document.body.dataset.updated || null) : null,
    connections: text("connections"),
    refusal_total: text("refusal-total"),
    charts: Array.from(document.querySelectorAll("#refusal-charts figure[data-reason]"),
                       (f) => [f.dataset.reason, f.dataset.total || ""]),
    events: rows("events"),
    offenders: rows("offenders"),
    bans: rows("bans"),
    who: rows("connection-list"),
    login_error: text("login-error"),
  });
})()"""


def page_state(browser: Chromium, session: str) -> dict[str, Any] | None:
    raw = browser.evaluate(session, STATE_JS)
    return json.loads(raw) if isinstance(raw, str) else None


def wait_state(
    browser: Chromium,
    session: str,
    condition: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll the page until *condition* holds; the last state seen either way."""
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        state = page_state(browser, session)
        if state is None:
            return None
        last = state
        return state if condition(state) else None

    return eventually(check, timeout) or last


def submit_token(browser: Chromium, session: str, token: str) -> None:
    browser.evaluate(
        session,
        f"document.getElementById('token').value = {json.dumps(token)};"
        "document.getElementById('login-button').click(); true",
    )


def log_in(
    browser: Chromium, session: str, server: RunningServer, *, wrong_first: bool = False
) -> dict[str, Any]:
    """Open /dashboard, get sent to /login, log in there; the dashboard's first state."""
    browser.call("Page.navigate", session, url=server.admin_url + "/dashboard")
    state = wait_state(
        browser,
        session,
        lambda s: s["path"] == "/login" and s["ready"] == "complete",
    )
    assert state.get("path") == "/login", state
    if wrong_first:
        submit_token(browser, session, "not-the-admin-token-0123456789")
        state = wait_state(browser, session, lambda s: bool(s["login_error"]))
        assert state["path"] == "/login", state
        assert state["login_error"] == "Wrong admin token.", state
    submit_token(browser, session, ADMIN_TOKEN)
    state = wait_state(browser, session, lambda s: s["path"] == "/dashboard" and bool(s["updated"]))
    assert state.get("path") == "/dashboard", state
    assert state["updated"], state
    return state


def screenshot(browser: Chromium, session: str, name: str) -> Path:
    data = browser.call("Page.captureScreenshot", session, format="png")["data"]
    path = artifacts_dir() / name
    path.write_bytes(base64.b64decode(data))
    return path


def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status a WebSocket handshake to *url* is refused with."""
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=5, **kwargs).close()
    return refused.value.response.status_code


# -- end to end in Chromium -------------------------------------------------------------


def _has_row(rows: list[list[str]], **cells: str) -> bool:
    columns = {"time": 0, "kind": 1, "code": 2, "client": 3}
    return any(all(row[columns[k]] == v for k, v in cells.items()) for row in rows)


def _int(text: str | None) -> int:
    return int(text) if text is not None and text.strip().isdigit() else -1


@browser_only
def test_dashboard_shows_live_refusals_bans_and_offenders(
    server_factory: ServerFactory, chromium: Chromium
) -> None:
    server = server_factory(admin_overrides())
    session = chromium.blank_page()
    state = log_in(chromium, session, server)
    assert state["connections"] == "0", state

    # A ban through the admin API first: the snapshot reads bans every 5 s.
    banned = httpx.post(
        server.admin_url + "/bans",
        headers=admin_headers(),
        json={"address": "10.1.2.3", "seconds": 600},
    )
    assert banned.status_code == 201, banned.text

    with server.connect_welcomed() as client:
        state = wait_state(chromium, session, lambda s: s["connections"] == "1" and s["who"])
        assert state["connections"] == "1", state
        assert [row[1:3] for row in state["who"]] == [["alice", "127.0.0.1"]], state

        missing = 3  # below limits.auth_failures_before_ban (5): 127.0.0.1 stays unbanned
        for _ in range(missing):
            assert refused_status(server.url) == 401
        client.send(json.dumps({"type": "no_such_type", "id": 1}))
        assert json.loads(client.recv(timeout=5))["code"] == "unknown_type"
        client.send("{this is not json")
        assert json.loads(client.recv(timeout=5))["code"] == "invalid_json"
        caused = missing + 2

        def shown(s: dict[str, Any]) -> bool:
            charts = dict(s["charts"])
            return (
                _has_row(s["events"], kind="refusal", code="missing_credentials")
                and _has_row(s["events"], kind="refusal", code="unknown_type")
                and _has_row(s["events"], kind="refusal", code="invalid_json")
                and _has_row(s["events"], kind="ban", client="10.1.2.3")
                and _int(charts.get("auth")) >= missing
                and "unknown_type" in charts
                and "invalid_json" in charts
                and any(r[0] == "127.0.0.1" and _int(r[1]) >= caused for r in s["offenders"])
                and any(r[0] == "10.1.2.3" for r in s["bans"])
                and _int(s["refusal_total"]) >= caused
            )

        state = wait_state(chromium, session, shown, timeout=12)
        shot = screenshot(chromium, session, "dashboard.png")

    events = state["events"]
    assert _has_row(events, kind="refusal", code="missing_credentials", client="127.0.0.1"), events
    assert _has_row(events, kind="refusal", code="unknown_type", client="127.0.0.1"), events
    assert _has_row(events, kind="refusal", code="invalid_json", client="127.0.0.1"), events
    assert _has_row(events, kind="ban", code="admin", client="10.1.2.3"), events
    charts = dict(state["charts"])
    assert _int(charts.get("auth")) >= missing, charts
    assert {"auth", "unknown_type", "invalid_json"} <= set(charts), charts
    offenders = {row[0]: _int(row[1]) for row in state["offenders"]}
    assert offenders.get("127.0.0.1", -1) >= caused, offenders
    assert "10.1.2.3" in [row[0] for row in state["bans"]], state["bans"]
    assert _int(state["refusal_total"]) >= caused, state["refusal_total"]
    assert state["path"] == "/dashboard"

    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000, len(png)

    # the browser holds the session as an HttpOnly, SameSite=Strict cookie ...
    cookies = chromium.call("Network.getCookies", session, urls=[server.admin_url])["cookies"]
    cookie = next(c for c in cookies if c["name"] == session_cookie_name(server))
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    with_cookie = {"Cookie": f"{session_cookie_name(server)}={cookie['value']}"}
    assert httpx.get(server.admin_url + "/dashboard", headers=with_cookie).status_code == 200
    # ... and the page's own "Log out" button ends it and goes back to /login
    chromium.evaluate(session, "document.getElementById('logout').click(); true")
    state = wait_state(chromium, session, lambda s: s["path"] == "/login")
    assert state["path"] == "/login", state
    assert httpx.get(server.admin_url + "/dashboard", headers=with_cookie).status_code == 303


@browser_only
def test_dashboard_loads_nothing_from_other_origins(
    server_factory: ServerFactory, chromium: Chromium
) -> None:
    server = server_factory(admin_overrides())
    origin = server.admin_url
    ws_origin = origin.replace("http://", "ws://", 1)
    session = chromium.blank_page()
    chromium.call("Network.enable", session)
    log_in(chromium, session, server, wrong_first=True)
    resources = chromium.evaluate(
        session, "JSON.stringify(performance.getEntriesByType('resource').map((e) => e.name))"
    )
    assert isinstance(resources, str)

    urls = [
        e["params"]["request"]["url"]
        for e in chromium.events
        if e["method"] == "Network.requestWillBeSent"
    ]
    sockets = [
        e["params"]["url"] for e in chromium.events if e["method"] == "Network.webSocketCreated"
    ]
    urls += sockets + json.loads(resources)
    assert urls
    foreign = [u for u in urls if not (u.startswith(origin + "/") or u.startswith(ws_origin + "/"))]
    assert foreign == []
    paths = {u.split("://", 1)[1].partition("/")[2] for u in urls}
    expected = {
        "dashboard",
        "login",
        "static/login.js",
        "static/dashboard.css",
        "static/dashboard.js",
        "dashboard/live",
    }
    assert expected <= paths, paths
    assert f"{ws_origin}/dashboard/live" in sockets


# -- the dashboard's WebSocket, without a browser ----------------------------------------


def live_url(server: RunningServer) -> str:
    return server.admin_url.replace("http://", "ws://", 1) + "/dashboard/live"


def log_in_http(server: RunningServer) -> httpx.Response:
    return httpx.post(
        server.admin_url + "/login",
        json={"token": ADMIN_TOKEN},
        headers={"Origin": server.admin_url},
    )


def session_cookie(server: RunningServer) -> str:
    response = log_in_http(server)
    assert response.status_code == 200, response.text
    cookie = response.cookies.get(session_cookie_name(server))
    assert cookie
    return cookie


def open_dashboard(
    server: RunningServer, *, cookie: str | None = None, bearer: bool = False
) -> ClientConnection:
    headers: dict[str, str] = {}
    if cookie is not None:
        headers["Cookie"] = f"{session_cookie_name(server)}={cookie}"
    if bearer:
        headers.update(admin_headers())
    ws = connect(
        live_url(server),
        origin=Origin(server.admin_url),
        additional_headers=headers,
        open_timeout=5,
    )
    ws.pending_legacy_warning = False  # callers use it as a context manager
    return ws


def snapshot(ws: ClientConnection) -> dict[str, Any]:
    message = json.loads(ws.recv(timeout=5))
    assert isinstance(message, dict)
    return message


def close_code(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read (and drop) snapshots until the server closes; its close code."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.05, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    except TimeoutError:
        return None
    return None


def test_dashboard_socket_needs_a_credential_and_its_own_origin(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(admin_overrides())
    url = live_url(server)
    own = Origin(server.admin_url)
    cookie = {"Cookie": f"{session_cookie_name(server)}={session_cookie(server)}"}
    assert refused_status(url, origin=own) == 401
    unknown = {"Cookie": f"{session_cookie_name(server)}=not-a-session"}
    assert refused_status(url, origin=own, additional_headers=unknown) == 401
    assert refused_status(url, origin=Origin(EVIL), additional_headers=cookie) == 403
    assert refused_status(url, additional_headers=cookie) == 403  # no Origin at all
    assert refused_status(url, origin=Origin(EVIL), additional_headers=admin_headers()) == 403
    with connect(url, origin=own, additional_headers=cookie, open_timeout=5) as ws:
        assert snapshot(ws)["type"] == "snapshot"
    refused = server.audit.events("dashboard_refused")
    assert len(refused) == 3
    assert {e["reason"] for e in refused} == {"origin_forbidden"}


def test_dashboard_socket_streams_snapshots_and_is_read_only(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(admin_overrides())
    with server.connect_welcomed(), open_dashboard(server, bearer=True) as ws:
        first = snapshot(ws)
        assert first["type"] == "snapshot"
        assert first["node"] == server.app.guard.node_id
        assert first["connections"] == 1
        (who,) = first["recent_connections"]
        assert (who["subject"], who["client"]) == ("alice", "127.0.0.1")
        assert who["id"] in server.app.connections
        assert first["dashboards"] == 1
        assert {"handshakes", "messages", "refusals"} <= set(first["totals"])
        assert {"handshakes", "messages", "refusals"} <= set(first["rates"])
        assert isinstance(first["events"], list)
        second = snapshot(ws)  # the next one, about a second later
        assert second["type"] == "snapshot"
        assert second["time"] > first["time"]
        ws.send("anything")
        assert close_code(ws) == 1008
    with open_dashboard(server, bearer=True) as ws:
        assert snapshot(ws)["type"] == "snapshot"
        ws.send("x" * 5000)
        assert close_code(ws) == 1009


def test_dashboards_beyond_the_limit_are_refused_with_503(server_factory: ServerFactory) -> None:
    server = server_factory(admin_overrides(max_dashboards=2))
    url = live_url(server)
    own = Origin(server.admin_url)
    with open_dashboard(server, bearer=True) as a, open_dashboard(server, bearer=True) as b:
        assert snapshot(a)["type"] == snapshot(b)["type"] == "snapshot"
        assert refused_status(url, origin=own, additional_headers=admin_headers()) == 503
        a.close()

        statuses: list[int] = []

        def third() -> ClientConnection | None:
            try:
                return open_dashboard(server, bearer=True)
            except InvalidStatus as refused:
                statuses.append(refused.response.status_code)
                return None

        reopened = eventually(third, 5)
        assert set(statuses) <= {503}, statuses
        assert reopened is not None, "a closed dashboard did not free its slot"
        with reopened:
            assert snapshot(reopened)["type"] == "snapshot"
            assert refused_status(url, origin=own, additional_headers=admin_headers()) == 503


def test_logout_closes_the_dashboard_socket_with_4001(server_factory: ServerFactory) -> None:
    server = server_factory(admin_overrides())
    cookie = session_cookie(server)
    with open_dashboard(server, cookie=cookie) as ws:
        assert snapshot(ws)["type"] == "snapshot"
        out = httpx.post(
            server.admin_url + "/logout",
            headers={
                "Origin": server.admin_url,
                "Cookie": f"{session_cookie_name(server)}={cookie}",
            },
        )
        assert out.status_code == 200, out.text
        assert close_code(ws, timeout=5) == 4001
    ended = {"Cookie": f"{session_cookie_name(server)}={cookie}"}
    url = live_url(server)
    assert refused_status(url, origin=Origin(server.admin_url), additional_headers=ended) == 401


# -- logging in ---------------------------------------------------------------------------


def test_login_checks_token_and_origin_and_sets_a_strict_cookie(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(admin_overrides())
    base = server.admin_url
    own = {"Origin": base}

    wrong = httpx.post(
        base + "/login", json={"token": "not-the-admin-token-0123456789"}, headers=own
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "unauthorized"
    assert "set-cookie" not in wrong.headers
    foreign = httpx.post(base + "/login", json={"token": ADMIN_TOKEN}, headers={"Origin": EVIL})
    assert foreign.status_code == 403
    assert foreign.json()["error"] == "origin_forbidden"
    assert "set-cookie" not in foreign.headers
    missing = httpx.post(base + "/login", json={"token": ADMIN_TOKEN})
    assert missing.status_code == 403

    anonymous = httpx.get(base + "/dashboard")
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/login"
    assert httpx.get(base + "/").headers["location"] == "/dashboard"
    page = httpx.get(base + "/login")
    assert page.status_code == 200
    assert 'id="token"' in page.text and 'id="login-button"' in page.text

    ok = log_in_http(server)
    assert ok.status_code == 200
    set_cookie = ok.headers["set-cookie"]
    attributes = [part.strip().lower() for part in set_cookie.split(";")]
    assert attributes[0].startswith(session_cookie_name(server) + "=")
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    cookie = ok.cookies[session_cookie_name(server)]
    with_cookie = {"Cookie": f"{session_cookie_name(server)}={cookie}"}

    dashboard = httpx.get(base + "/dashboard", headers=with_cookie)
    assert dashboard.status_code == 200
    assert 'src="/static/dashboard.js"' in dashboard.text
    assert "default-src 'none'" in dashboard.headers["content-security-policy"]
    # the cookie opens the dashboard only, never the JSON API
    assert httpx.get(base + "/connections", headers=with_cookie).status_code == 401

    assert httpx.post(base + "/logout", headers={**own, **with_cookie}).status_code == 200
    assert httpx.get(base + "/dashboard", headers=with_cookie).status_code == 303


def test_https_dashboard_session_cookie_is_host_prefixed(
    server_factory: ServerFactory, certs: Certificates
) -> None:
    server = server_factory({**ROOMY, **admin_overrides(tls=certs.pair)})
    base = f"https://127.0.0.1:{admin_port(server)}"
    ctx = certs.client_context()
    own = {"Origin": base}
    host_cookie = session_cookie_name(server, https=True)

    def status(method: str, path: str, cookie: str | None, name: str = host_cookie) -> int:
        headers = {**own, "Cookie": f"{name}={cookie}"} if cookie is not None else own
        return call(base, method, path, token=None, headers=headers, verify=ctx).status_code

    login = {"token": ADMIN_TOKEN}
    ok = call(base, "POST", "/login", token=None, headers=own, json_body=login, verify=ctx)
    assert ok.status_code == 200, ok.text
    name, session, attributes = cookie_attributes(ok.headers["set-cookie"])
    assert name == session_cookie_name(server, https=True)
    assert {"secure", "httponly", "path=/", "samesite=strict"} <= set(attributes)
    assert not any(a.startswith("domain") for a in attributes)

    assert status("GET", "/dashboard", session) == 200
    with_cookie = {"Cookie": f"{session_cookie_name(server, https=True)}={session}"}
    url, origin = dashboard_url(base), Origin(base)
    snapshot = first_snapshot(url, origin=origin, additional_headers=with_cookie, ssl=ctx)
    assert snapshot["type"] == "snapshot"
    # on an HTTPS listener only the prefixed cookie is a session (no sibling host can set it)
    assert status("GET", "/dashboard", session, session_cookie_name(server)) == 303
    unprefixed = {"Cookie": f"{session_cookie_name(server)}={session}"}
    assert refused_upgrade(url, origin=origin, additional_headers=unprefixed, ssl=ctx) == 401
    assert status("GET", "/connections", session) == 401  # the JSON API never takes it

    out = call(base, "POST", "/logout", token=None, headers={**own, **with_cookie}, verify=ctx)
    assert out.status_code == 200
    name, value, attributes = cookie_attributes(out.headers["set-cookie"])
    assert name == session_cookie_name(server, https=True) and value in ("", '""')
    assert {"secure", "path=/"} <= set(attributes)  # else a browser ignores the deletion
    assert status("GET", "/dashboard", session) == 303


def test_plain_http_loopback_keeps_the_unprefixed_cookie(server_factory: ServerFactory) -> None:
    server = admin_server(server_factory)
    base = server.admin_url
    login = {"token": ADMIN_TOKEN}
    ok = call(base, "POST", "/login", token=None, headers={"Origin": base}, json_body=login)
    assert ok.status_code == 200
    name, _, attributes = cookie_attributes(ok.headers["set-cookie"])
    assert name == session_cookie_name(server)  # browsers refuse __Host- cookies without Secure
    assert "secure" not in attributes


def test_two_admin_listeners_on_one_host_keep_their_own_sessions(
    server_factory: ServerFactory,
) -> None:
    """Browsers keep one cookie per host and name whatever the port: one jar (as a browser
    holds) logged in to two listeners on 127.0.0.1 keeps both sessions."""
    first, second = admin_server(server_factory), admin_server(server_factory)
    assert session_cookie_name(first) != session_cookie_name(second)
    with httpx.Client() as browser:
        for server in (first, second):
            own = {"Origin": server.admin_url}
            ok = browser.post(server.admin_url + "/login", json={"token": ADMIN_TOKEN}, headers=own)
            assert ok.status_code == 200, ok.text
        assert len(browser.cookies.jar) == 2
        for server in (first, second):
            assert browser.get(server.admin_url + "/dashboard").status_code == 200
        # logging out of one leaves the other logged in
        out = browser.post(first.admin_url + "/logout", headers={"Origin": first.admin_url})
        assert out.status_code == 200
        assert browser.get(first.admin_url + "/dashboard").status_code == 303
        assert browser.get(second.admin_url + "/dashboard").status_code == 200


def test_a_session_cookie_is_good_only_from_the_address_that_logged_in(
    server_factory: ServerFactory,
) -> None:
    """Another service of the same host receives the admin cookie (cookies ignore the port):
    replayed from anywhere but the address that logged in, it opens nothing."""
    server = admin_server(server_factory)
    cookie = {"Cookie": f"{session_cookie_name(server)}={session_cookie(server)}"}
    elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=elsewhere) as other:
        page = other.get(server.admin_url + "/dashboard", headers=cookie)
    assert page.status_code == 303
    assert httpx.get(server.admin_url + "/dashboard", headers=cookie).status_code == 200
    url, origin = live_url(server), Origin(server.admin_url)
    refused = refused_status(
        url, origin=origin, additional_headers=cookie, source_address=("127.0.0.2", 0)
    )
    assert refused == 401
    with connect(url, origin=origin, additional_headers=cookie, open_timeout=5) as ws:
        assert snapshot(ws)["type"] == "snapshot"
