"""``wsguard proxy`` (the gateway), end to end: real backends, a real gateway, real clients.

Each backend (``support.gateway``) is a plain ``websockets`` server on its own thread and
event loop (so a test can block it or stop it reading without touching the gateway); it
records the handshake it got and every message, echoes (or not), and sends, closes or
crashes on command. The gateway is :class:`wsguard.hosts.gateway.proxy.Gateway` served
from a background thread (conftest's ``RunningServer``); clients are
``websockets.sync.client`` connections with a token.

Covers the identity headers (values, stripping of the client's, signature,
configurable names, ``forward_headers``), the message policy in front of the
upstream, upstream-to-client messages and their size limit, close codes both ways,
an unreachable or failing upstream (1013 / 1011), pings and the upstream heartbeat,
per-path routes, back-pressure both ways, and the ``wsguard proxy`` command line.

Tests raise ``GatewayBug`` where a behaviour the gateway once got wrong (found by this
module, since fixed) would come back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection as UpstreamConnection
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.sync.client import ClientConnection

from conftest import (
    SECRET,
    RunningServer,
    close_of,
    eventually,
    make_config,
    make_token,
)
from support.cli import cli_env, run_cli
from support.gateway import (
    Backend,
    BackendFactory,
    GatewayFactory,
    Upstreamed,
    chat,
    echo_roundtrip,
)
from support.net import free_port
from support.serve_process import Served
from support.wire import upgrade_answer
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.model import GatewayConfig
from wsguard.core.identity import Identity
from wsguard.errors import ConfigError
from wsguard.hosts.gateway.identity import SeenConnections, identity_headers, verify_identity
from wsguard.hosts.gateway.proxy import Gateway
from wsguard.session import Connection


class GatewayBug(Exception):
    """A gateway defect this module found once (hung upstreams, 1005 closes, ...)."""


IDENTITY_SECRET = "gateway-identity-secret-0123456789abcdef"
SIGNED_NAMES = (
    "X-Wsguard-Subject",
    "X-Wsguard-Scopes",
    "X-Wsguard-Token-Id",
    "X-Wsguard-Client",
    "X-Wsguard-Connection",
    "X-Wsguard-Path",
    "X-Wsguard-Timestamp",
    "X-Wsguard-Signature",
)
#: The most asyncio reads from a socket at once (websockets pauses reading after that).
ONE_READ = 256 * 1024
#: Rate limits out of the way, for the tests that push many messages.
NO_RATE_LIMITS: dict[str, Any] = {
    "messages_per_minute": 1_000_000,
    "message_burst": 1_000_000,
    "bytes_per_minute": 10**12,
    "subject_messages_per_minute": 1_000_000,
    "subject_bytes_per_minute": 10**12,
}


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, str), data
    out = json.loads(data)
    assert isinstance(out, dict)
    return out


def admitted_id(gw: RunningServer) -> str:
    events = eventually(lambda: gw.audit.events("connection_admitted"), what="admission")
    connection_id: str = events[-1]["connection_id"]
    return connection_id


def gateway_connections(gw: RunningServer) -> list[Connection]:
    return list(gw.call(lambda: list(gw.app.connections.values())))


def gateway_upstreams(gw: RunningServer) -> list[UpstreamConnection]:
    """The gateway's upstream connections, read from its running pump tasks."""
    assert isinstance(gw.app, Gateway)
    app = gw.app

    def find() -> list[UpstreamConnection]:
        found = []
        for task in app._pumps:
            frame = getattr(task.get_coro(), "cr_frame", None)
            if frame is not None and "upstream" in frame.f_locals:
                found.append(frame.f_locals["upstream"])
        return found

    return list(gw.call(find))


# -- 1. identity headers ------------------------------------------------------------------


def test_backend_gets_the_identity_headers(backend: Backend, gateways: GatewayFactory) -> None:
    gw = gateways(backend.url)
    token = make_token("alice", scopes="write chat read", jti="tok-42")
    with gw.connect(token) as ws:
        echo_roundtrip(ws, chat("hello"))
        record = backend.connection()
        headers = record.headers
        assert headers.get_all("X-Wsguard-Subject") == ["alice"]
        assert headers.get_all("X-Wsguard-Scopes") == ["chat read write"]
        assert headers.get_all("X-Wsguard-Token-Id") == ["tok-42"]
        assert headers.get_all("X-Wsguard-Client") == ["127.0.0.1"]
        assert headers.get_all("X-Wsguard-Connection") == [admitted_id(gw)]
        assert headers.get_all("X-Wsguard-Path") == ["/"]
        assert headers["Host"] == f"127.0.0.1:{backend.port}"
        # unsigned without gateway.identity_secret
        assert "X-Wsguard-Signature" not in headers
        assert "X-Wsguard-Timestamp" not in headers
        assert "User-Agent" not in headers  # no client header passes unless named
    assert record.path == "/"


def test_token_without_jti_or_scopes_gives_empty_headers(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect(make_token("bob", scopes=None)) as ws:
        ws.send(json.dumps({"type": "ping"}))
        ws.recv(timeout=5)
    headers = backend.connection().headers
    assert headers.get_all("X-Wsguard-Subject") == ["bob"]
    assert headers.get_all("X-Wsguard-Scopes") == [""]
    assert headers.get_all("X-Wsguard-Token-Id") == [""]


def test_client_cannot_forge_identity_or_pass_credentials(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"gateway": {"forward_headers": ["User-Agent"]}})
    forged = {
        "X-Wsguard-Subject": "root",
        "X-Wsguard-Scopes": "admin",
        "X-Wsguard-Token-Id": "forged",
        "X-Wsguard-Client": "10.0.0.1",
        "X-Wsguard-Connection": "forged",
        "X-Wsguard-Path": "/admin",
        "X-Wsguard-Timestamp": "1",
        "X-Wsguard-Signature": "00" * 32,
        "Cookie": "session=secret-session-cookie",
        "X-Forwarded-For": "10.9.9.9",
    }
    with gw.connect(make_token("alice"), headers=forged, user_agent_header="probe/1.0") as ws:
        echo_roundtrip(ws, chat("hi"))
    headers = backend.connection().headers
    for name in SIGNED_NAMES[:6]:
        assert len(headers.get_all(name)) == 1, name
    assert headers["X-Wsguard-Path"] == "/"
    assert headers["X-Wsguard-Subject"] == "alice"
    assert headers["X-Wsguard-Scopes"] == "chat"
    assert headers["X-Wsguard-Token-Id"] == ""
    assert headers["X-Wsguard-Client"] == "127.0.0.1"
    assert headers["X-Wsguard-Connection"] != "forged"
    for name in ("X-Wsguard-Timestamp", "X-Wsguard-Signature", "Authorization", "Cookie"):
        assert name not in headers, name
    assert "X-Forwarded-For" not in headers
    assert headers["User-Agent"] == "probe/1.0"  # the one forwarded header
    everything = "\n".join(f"{k}: {v}" for k, v in headers.raw_items())
    assert "secret-session-cookie" not in everything
    assert "Bearer" not in everything


@pytest.mark.parametrize("transport", ["query", "subprotocol", "cookie"])
def test_token_never_reaches_the_backend(
    transport: str, backend: Backend, gateways: GatewayFactory
) -> None:
    overrides: dict[str, Any] = {"auth": {"query": True}}
    if transport == "cookie":
        overrides = {"auth": {"cookie": True}, "origin": {"allowed": ["https://app"]}}
    gw = gateways(backend.url, overrides)
    token = make_token("carol")
    protocols = ["wsguard.v1"] if transport == "subprotocol" else None
    origin = "https://app" if transport == "cookie" else None
    with gw.connect(token, transport=transport, subprotocols=protocols, origin=origin) as ws:
        echo_roundtrip(ws, chat("x"))
    record = backend.connection()
    everything = record.path + "\n" + "\n".join(f"{k}: {v}" for k, v in record.headers.raw_items())
    assert token not in everything
    assert token.split(".")[2] not in everything
    assert record.headers["X-Wsguard-Subject"] == "carol"
    assert record.path == "/"
    if transport == "subprotocol":  # the negotiated protocol is offered upstream, alone
        assert record.headers.get_all("Sec-WebSocket-Protocol") == ["wsguard.v1"]


def test_signed_identity_verifies_and_any_change_fails(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET}})
    with gw.connect(make_token("alice", jti="j-1"), path="/room/7?token=t") as ws:
        echo_roundtrip(ws, chat("hi"))
    seen = backend.connection().headers
    assert seen["X-Wsguard-Path"] == "/room/7"  # the query (a token, maybe) is not sent
    upstream = backend.url
    assert verify_identity(seen, IDENTITY_SECRET, upstream=upstream)
    assert not verify_identity(seen, IDENTITY_SECRET[::-1], upstream=upstream)  # other secret
    timestamp = int(seen["X-Wsguard-Timestamp"])
    assert abs(timestamp - time.time()) < 30
    assert len(seen["X-Wsguard-Signature"]) == 64

    plain = {k: v for k, v in seen.raw_items()}
    assert verify_identity(plain, IDENTITY_SECRET, upstream=upstream)
    for name in SIGNED_NAMES:
        altered = dict(plain)
        value = altered[name]
        altered[name] = str(int(value) - 1) if name == "X-Wsguard-Timestamp" else value + "x"
        assert not verify_identity(altered, IDENTITY_SECRET, upstream=upstream), name
        removed = {k: v for k, v in plain.items() if k != name}
        assert not verify_identity(removed, IDENTITY_SECRET, upstream=upstream), name
    forged = dict(plain, **{"X-Wsguard-Subject": "root"})
    assert not verify_identity(forged, IDENTITY_SECRET, upstream=upstream)
    # the timestamp: fresh within max_age, stale after
    assert verify_identity(seen, IDENTITY_SECRET, upstream=upstream, now=timestamp + 59)
    assert not verify_identity(seen, IDENTITY_SECRET, upstream=upstream, now=timestamp + 61)
    assert verify_identity(
        seen, IDENTITY_SECRET, upstream=upstream, now=timestamp + 200, max_age=300
    )


def test_signed_identity_is_bound_to_its_upstream_and_route(
    backends: BackendFactory, gateways: GatewayFactory
) -> None:
    """A header set the gateway sent to one upstream, for one route, does not verify at
    another upstream, nor with the path of another route."""
    chat_backend, admin_backend = backends(), backends()
    routes = {"/chat": chat_backend.url, "/admin": admin_backend.url + "admin"}
    gw = gateways(
        chat_backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET, "routes": routes}}
    )
    with gw.connect(make_token("alice"), path="/chat/lobby") as ws:
        echo_roundtrip(ws, chat("hi"))
    captured = {k: v for k, v in chat_backend.connection().headers.raw_items()}
    assert captured["X-Wsguard-Path"] == "/chat/lobby"
    # the URL as the backend knows it: case, credentials and query do not matter
    here = chat_backend.url.replace("ws://", "WS://user:pw@")
    assert verify_identity(captured, IDENTITY_SECRET, upstream=here)
    assert verify_identity(captured, IDENTITY_SECRET, upstream=chat_backend.url + "?v=2")
    # replayed to the admin upstream (whose URL is known there), or to another path
    assert not verify_identity(captured, IDENTITY_SECRET, upstream=admin_backend.url + "admin")
    assert not verify_identity(captured, IDENTITY_SECRET, upstream=chat_backend.url + "admin")
    other_port = f"ws://127.0.0.1:{admin_backend.port}/"
    assert not verify_identity(captured, IDENTITY_SECRET, upstream=other_port)
    rerouted = dict(captured, **{"X-Wsguard-Path": "/admin"})
    assert not verify_identity(rerouted, IDENTITY_SECRET, upstream=chat_backend.url)
    with pytest.raises(ValueError, match="ws:// or wss://"):
        verify_identity(captured, IDENTITY_SECRET, upstream="http://127.0.0.1/")


def test_default_ports_are_written_out_in_the_signed_upstream() -> None:
    config = GatewayConfig(identity_secret=IDENTITY_SECRET)
    identity = Identity(subject="alice")
    headers = dict(
        identity_headers(
            config,
            identity,
            client="127.0.0.1",
            connection_id="c1",
            upstream="wss://Chat.Example:443",
            path="/",
        )
    )
    assert verify_identity(headers, IDENTITY_SECRET, upstream="wss://chat.example/")
    assert not verify_identity(headers, IDENTITY_SECRET, upstream="ws://chat.example:443/")


def test_signed_identity_refuses_replays_and_future_timestamps() -> None:
    config = GatewayConfig(identity_secret=IDENTITY_SECRET)
    identity = Identity(subject="alice", scopes=frozenset({"chat"}))
    upstream = "ws://127.0.0.1:3000/ws"
    now = time.time()

    def signed(connection_id: str, at: float) -> dict[str, str]:
        return dict(
            identity_headers(
                config,
                identity,
                client="127.0.0.1",
                connection_id=connection_id,
                upstream=upstream,
                path="/ws",
                now=at,
            )
        )

    def verify(headers: dict[str, str], at: float, seen: SeenConnections | None = None) -> bool:
        return verify_identity(headers, IDENTITY_SECRET, upstream=upstream, now=at, seen=seen)

    # a timestamp from the future: a few seconds of clock skew, not a minute
    assert verify(signed("c1", now + 4), now)
    for ahead in (6, 30, 59):
        assert not verify(signed("c1", now + ahead), now), ahead
    assert not verify(signed("c1", now - 61), now)
    # a header set accepted once is refused when it comes back within the window
    seen = SeenConnections()
    first = signed("c2", now)
    assert verify(first, now, seen)
    assert not verify(first, now + 1, seen)
    assert not verify(first, now + 60, seen)
    # an id is remembered only once its signature verified: a forgery takes no room
    forged = dict(signed("c3", now), **{"X-Wsguard-Subject": "root"})
    assert not verify(forged, now, seen)
    assert verify(signed("c3", now), now, seen)
    assert len(seen) == 2
    # expired ids are forgotten; a memory full of live ids refuses rather than forgets
    small = SeenConnections(max_entries=1)
    assert verify(signed("c4", now), now, small)
    assert not verify(signed("c5", now), now, small)
    assert verify(signed("c5", now + 62), now + 62, small)  # c4 has expired meanwhile
    assert len(small) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Wsguard-Signature", "\u00e9" * 64),
        ("X-Wsguard-Signature", "\udcff" * 64),
        ("X-Wsguard-Signature", "0" * 63 + "\u00e9"),
        ("X-Wsguard-Timestamp", "\u00b2"),  # a digit to str.isdigit, not to int()
        ("X-Wsguard-Timestamp", "\u0661\u0662"),  # Arabic-Indic digits: int() reads them
        ("X-Wsguard-Timestamp", "9" * 5000),  # past int()'s digit limit
        ("X-Wsguard-Subject", "al\u00efce"),
        ("X-Wsguard-Path", "/\udcff"),
    ],
)
def test_verify_identity_returns_false_and_never_raises(name: str, value: str) -> None:
    config = GatewayConfig(identity_secret=IDENTITY_SECRET)
    identity = Identity(subject="alice", scopes=frozenset({"chat"}))
    upstream = "ws://127.0.0.1:3000/"
    good = dict(
        identity_headers(
            config, identity, client="127.0.0.1", connection_id="c1", upstream=upstream, path="/"
        )
    )
    assert verify_identity(good, IDENTITY_SECRET, upstream=upstream)
    bad = dict(good, **{name: value})
    assert verify_identity(bad, IDENTITY_SECRET, upstream=upstream) is False


def test_verify_identity_refuses_a_repeated_header() -> None:
    config = GatewayConfig(identity_secret=IDENTITY_SECRET)
    identity = Identity(subject="alice", scopes=frozenset({"chat"}))
    upstream = "ws://127.0.0.1:3000/"
    headers = Headers(
        identity_headers(
            config, identity, client="127.0.0.1", connection_id="c1", upstream=upstream, path="/"
        )
    )
    assert verify_identity(headers, IDENTITY_SECRET, upstream=upstream)
    headers["X-Wsguard-Subject"] = "root"  # a second value next to the signed one
    assert verify_identity(headers, IDENTITY_SECRET, upstream=upstream) is False


def test_identity_headers_signed_long_ago_are_refused() -> None:
    config = GatewayConfig(identity_secret=IDENTITY_SECRET)
    identity = Identity(subject="alice", scopes=frozenset({"chat"}))
    upstream = "ws://127.0.0.1:3000/"

    def signed(now: float | None = None) -> dict[str, str]:
        return dict(
            identity_headers(
                config,
                identity,
                client="127.0.0.1",
                connection_id="c1",
                upstream=upstream,
                path="/",
                now=now,
            )
        )

    assert not verify_identity(signed(time.time() - 3600), IDENTITY_SECRET, upstream=upstream)
    assert verify_identity(signed(), IDENTITY_SECRET, upstream=upstream)


def test_identity_values_cannot_inject_headers(backend: Backend, gateways: GatewayFactory) -> None:
    """Claims with CR/LF never become extra upstream headers (refused or kept in one)."""
    gw = gateways(backend.url, {"limits": {"connections_per_address": 50}})
    tokens = [
        make_token("alice\r\nX-Evil: 1"),
        make_token("bob", scopes="chat\r\nX-Evil: 2"),
        make_token("carol", jti="j\r\nX-Evil: 3"),
        make_token("dave", jti="j\nX-Evil: 4"),
    ]
    for token in tokens:
        with contextlib.suppress(InvalidStatus, ConnectionClosed), gw.connect(token) as ws:
            ws.send(chat("x"))
            ws.recv(timeout=5)
    for record in backend.connections:
        assert "X-Evil" not in record.headers
        for name, value in record.headers.raw_items():
            assert "\r" not in value and "\n" not in value, (name, value)


@pytest.mark.parametrize(
    "subject",
    [
        "jos\u00e9",
        "\u4e2d\u6587-user",
    ],
)
def test_non_ascii_subject_is_forwarded_signed(
    subject: str, backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET}})
    with gw.connect(make_token(subject)) as ws:
        try:
            echo_roundtrip(ws, chat("hi"))
        except ConnectionClosed as exc:
            raise GatewayBug(f"subject {subject!r}: closed with {exc.rcvd}") from exc
    seen = backend.connection().headers
    # sent as is (ISO-8859-1 on the wire) or percent-encoded: either way recoverable
    assert urllib.parse.unquote(seen["X-Wsguard-Subject"]) == subject
    assert verify_identity(seen, IDENTITY_SECRET, upstream=backend.url)


def test_configurable_header_names(backend: Backend, gateways: GatewayFactory) -> None:
    names = {
        "subject_header": "X-User",
        "scopes_header": "X-Roles",
        "token_id_header": "X-Jti",
        "client_header": "X-Peer",
        "connection_header": "X-Conn",
        "path_header": "X-Route",
        "signature_header": "X-Sig",
        "timestamp_header": "X-Ts",
    }
    gw = gateways(backend.url, {"gateway": {**names, "identity_secret": IDENTITY_SECRET}})
    with gw.connect(make_token("alice", jti="j-9"), headers={"X-User": "root"}) as ws:
        echo_roundtrip(ws, chat("hi"))
    seen = backend.connection().headers
    assert seen.get_all("X-User") == ["alice"]
    assert seen.get_all("X-Roles") == ["chat"]
    assert seen.get_all("X-Jti") == ["j-9"]
    assert seen.get_all("X-Peer") == ["127.0.0.1"]
    assert seen.get_all("X-Conn") == [admitted_id(gw)]
    assert seen.get_all("X-Route") == ["/"]
    assert not [k for k in seen if k.lower().startswith("x-wsguard-")]
    renamed = GatewayConfig.model_validate(names)
    assert verify_identity(seen, IDENTITY_SECRET, upstream=backend.url, config=renamed)
    assert not verify_identity(seen, IDENTITY_SECRET, upstream=backend.url)  # default names


def test_forward_headers_pass_only_the_named_ones(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"gateway": {"forward_headers": ["user-agent", "X-Request-Id"]}})
    extra = {"X-Request-Id": "req-7", "X-Other": "nope", "Accept-Language": "fr"}
    with gw.connect(headers=extra, user_agent_header="probe/2.0") as ws:
        echo_roundtrip(ws, chat("hi"))
    seen = backend.connection().headers
    assert seen.get_all("User-Agent") == ["probe/2.0"]
    assert seen.get_all("X-Request-Id") == ["req-7"]
    assert "X-Other" not in seen
    assert "Accept-Language" not in seen


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "cookie",
        "Host",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Protocol",
        "X-Wsguard-Subject",
        "x-wsguard-signature",
        "Proxy-Authorization",
        "Upgrade",
        "Connection",
        "Transfer-Encoding",
        "X-Forwarded-For",  # the client's own claim of its address
        "forwarded",
        "X-Real-IP",
        "Authorization ",  # not a header name: would never match, silently
        "X Custom",
    ],
)
def test_forward_headers_never_credentials_or_identity(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"gateway": {"upstream": "ws://127.0.0.1:1/", "forward_headers": [name]}})
    assert caught.value.key == "gateway.forward_headers"
    assert "gateway.forward_headers" in str(caught.value)


def test_forward_headers_refuse_a_renamed_identity_header() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"gateway": {"subject_header": "X-User", "forward_headers": ["x-user"]}})
    assert caught.value.key == "gateway.forward_headers"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"identity_secret": "too-short"}, "gateway.identity_secret"),
        ({"upstream": "http://127.0.0.1:1/"}, "gateway.upstream"),
        ({"routes": {"/a": "tcp://127.0.0.1:1/"}}, "gateway.routes"),
        ({"routes": {"a": "ws://127.0.0.1:1/"}}, "gateway.routes"),
        ({"subject_header": "X User"}, "gateway.subject_header"),
    ],
)
def test_gateway_config_errors_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"gateway": overrides})
    assert caught.value.key == key


def test_gateway_without_upstream_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Gateway(make_config())
    assert caught.value.key == "gateway.upstream"


def test_scope_with_a_space_keeps_its_boundary(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url, {"gateway": {"identity_secret": IDENTITY_SECRET}})
    token = make_token("alice", scopes=None, roles=["billing admin", "chat"])
    with gw.connect(token) as ws:
        echo_roundtrip(ws, chat("hi"))
    headers = backend.connection().headers
    assert headers.get_all("X-Wsguard-Scopes") == ["billing%20admin chat"]
    scopes = [urllib.parse.unquote(s) for s in headers["X-Wsguard-Scopes"].split(" ")]
    assert scopes == ["billing admin", "chat"]
    assert verify_identity(headers, IDENTITY_SECRET, upstream=backend.url)


# -- 2. the message policy in front of the upstream ------------------------------------------


def test_refused_messages_never_reach_the_backend(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect(make_token("alice", scopes="chat")) as ws:
        refused = {
            "{not json": "invalid_json",
            json.dumps({"type": "nope", "id": 1}): "unknown_type",
            json.dumps({"type": "command", "name": "shutdown", "id": 2}): "forbidden",
            json.dumps({"type": "chat", "text": ""}): "invalid_message",
            json.dumps(["chat"]): "invalid_message",
        }
        for text, code in refused.items():
            ws.send(text)
            error = recv_json(ws)
            assert error["type"] == "error", text
            assert error["code"] == code, (text, error)
        valid = chat("after the refusals")
        echo_roundtrip(ws, valid)
    record = backend.connection()
    assert record.received == [valid]


def test_valid_messages_arrive_byte_for_byte(backend: Backend, gateways: GatewayFactory) -> None:
    gw = gateways(backend.url)
    messages = [
        '{ "type" :"chat",\n\t"text":  "spaced \\u00e9 out" ,"room":"r1" }',
        '{"text":"key order kept","type":"chat"}',
        '{"type":"chat","text":"unicode: \u00e9\u4e2d\U0001f600"}',
        '{"type":"ping","id":  "a-1"}',
        '{"type":"data","channel":"c","payload":{"b":true,"n":null,"x":1e3}}',
    ]
    with gw.connect() as ws:
        for text in messages:
            ws.send(text)
            assert ws.recv(timeout=5) == text
    assert backend.connection().received == messages


def test_auth_refresh_is_answered_by_the_gateway(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect(make_token("alice")) as ws:
        ws.send(json.dumps({"type": "auth", "token": make_token("alice", ttl=7200), "id": 5}))
        reply = recv_json(ws)
        assert reply["type"] == "auth_ok"
        valid = chat("after refresh")
        echo_roundtrip(ws, valid)
    assert backend.connection().received == [valid]


def test_binary_frame_refused_and_the_close_goes_upstream(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("first"))
        ws.send(b"\x00\x01binary")
        assert close_of(ws) == (1003, "binary frames not accepted")
    record = backend.connection()
    assert record.closed.wait(5)
    assert record.received == [chat("first")]
    assert record.close_code == 1003


def test_rate_limited_messages_are_not_forwarded(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"limits": {"message_burst": 2, "messages_per_minute": 2}})
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("one"))
        echo_roundtrip(ws, chat("two"))
        ws.send(chat("three"))
        error = recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "rate_limited")
    assert backend.connection().received == [chat("one"), chat("two")]


def test_opaque_format_forwards_any_frame_within_the_limits(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(
        backend.url,
        {"messages": {"format": "opaque", "binary": True}, "limits": {"max_message_bytes": 1024}},
    )
    frames: list[str | bytes] = ["plain text, not JSON", b"\x00\xffbinary", '{"type":"nope"}']
    with gw.connect() as ws:
        for data in frames:
            ws.send(data)
            assert ws.recv(timeout=5) == data
        ws.send("z" * 1025)
        assert close_of(ws)[0] == 1009
    record = backend.connection()
    assert record.received == frames
    eventually(record.closed.is_set, what="backend connection closed")
    assert record.close_code == 1009


def test_handshake_refusals_open_no_upstream_connection(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    url = f"ws://127.0.0.1:{gw.port}/"
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as no_token:
        connect(url, open_timeout=5)
    assert no_token.value.response.status_code == 401
    bad = make_token("mallory", secret="another-secret-that-is-long-enough-for-hs256!!")
    with pytest.raises(InvalidStatus) as bad_token:
        connect(url, additional_headers={"Authorization": f"Bearer {bad}"}, open_timeout=5)
    assert bad_token.value.response.status_code == 401
    # a connection afterwards is the first the backend ever sees
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
    assert backend.handshakes == 1
    assert len(backend.connections) == 1
    assert not gw.audit.events("upstream_unavailable")


def test_duplicate_keys_never_reach_the_backend(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url)
    duplicates = [
        '{"type":"chat","text":"x","text":"y"}',
        '{"type":"command","type":"chat","text":"z"}',  # a "command" to a first-key parser
    ]
    with gw.connect(make_token("alice", scopes="chat")) as ws:
        for text in duplicates:
            ws.send(text)
            error = recv_json(ws)  # an echo of the backend would show it got through
            assert (error.get("type"), error.get("code")) == ("error", "invalid_message"), (
                text,
                error,
            )
        valid = chat("normal")
        echo_roundtrip(ws, valid)
    assert backend.connection().received == [valid]


def test_duplicate_keys_spend_the_violation_budget(
    backend: Backend,
    gateways: GatewayFactory,
) -> None:
    gw = gateways(backend.url, {"limits": {"violation_budget": 2}})
    with gw.connect(make_token("alice", scopes="chat")) as ws:
        for _ in range(2):
            ws.send('{"type":"chat","text":"x","text":"y"}')
            assert recv_json(ws)["code"] == "invalid_message"
        ws.send('{"type":"chat","text":"x","text":"y"}')
        assert close_of(ws) == (1008, "policy violation")
    assert backend.connection().received == []


# -- 3. upstream to client ---------------------------------------------------------------------


def test_upstream_messages_reach_the_client_untouched(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        record = backend.connection()
        downstream: list[str | bytes] = [
            "not json at all {",
            '{"type":"whatever","x" : 1}',
            b"\x00\xff\x10binary",
            "",
            b"",
            "\u00e9" * 1000,
            bytes(range(256)) * 100,
        ]
        for data in downstream:
            backend.send(record, data)
        for data in downstream:
            got = ws.recv(timeout=5)
            assert type(got) is type(data)
            assert got == data


def test_upstream_message_over_the_limit_closes_the_client_1011(
    backend: Backend, gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = gateways(backend.url, {"gateway": {"upstream_max_message_bytes": 1024}})
    with caplog.at_level(logging.WARNING, logger="wsguard.gateway"), gw.connect() as ws:
        record = backend.connection()
        backend.send(record, "a" * 1024)  # at the limit: passes
        assert ws.recv(timeout=5) == "a" * 1024
        backend.send(record, "b" * 1025)
        assert close_of(ws) == (1011, "upstream error")
    assert record.closed.wait(5)
    assert record.close_code == 1009  # the gateway told the backend: message too big
    closed = eventually(lambda: gw.audit.events("connection_closed"), what="close audited")
    assert closed[-1]["code"] == 1011
    assert closed[-1]["cause"] == "upstream_closed"
    assert any("failed for connection" in r.getMessage() for r in caplog.records)


# -- 4. close codes both ways ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"), [(4321, "bye"), (1000, ""), (1001, "backend restarting"), (3000, "x")]
)
def test_backend_close_reaches_the_client(
    code: int, reason: str, backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        backend.close(backend.connection(), code, reason)
        assert close_of(ws) == (code, reason)
    event = eventually(lambda: gw.audit.events("upstream_closed"), what="upstream_closed")
    assert event[-1]["code"] == code


def test_a_close_code_only_clients_send_is_not_passed_to_the_client(
    backend: Backend, gateways: GatewayFactory
) -> None:
    """1010 (an extension the server did not negotiate) is the client's to send (RFC 6455
    7.4.1): from the backend it is an upstream error to the client."""
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        backend.close(backend.connection(), 1010, "m")
        assert close_of(ws) == (1011, "upstream error")
    event = eventually(lambda: gw.audit.events("upstream_closed"), what="upstream_closed")
    assert event[-1]["code"] == 1010


@pytest.mark.parametrize(
    ("code", "reason"), [(4000, "done"), (1000, ""), (1001, "tab closed"), (3999, "r" * 123)]
)
def test_client_close_reaches_the_backend(
    code: int, reason: str, backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    ws = gw.connect()
    echo_roundtrip(ws, chat("hi"))
    ws.close(code, reason)
    record = backend.connection()
    eventually(record.closed.is_set, what="backend connection closed")
    assert (record.close_code, record.close_reason) == (code, reason)
    eventually(lambda: gw.connection_count() == 0, what="gateway connection gone")


async def send_empty_close(ws: ServerConnection) -> None:
    """A close frame without a status code (what browsers and Node's ws send by default)."""
    async with ws.send_context():
        ws.protocol.send_close()


def test_backend_close_without_status_is_a_normal_close(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        backend.run(send_empty_close(backend.connection().ws))
        code, reason = close_of(ws)
    if code not in (1000, 1005):
        raise GatewayBug(f"a normal close of the upstream reached the client as {code} {reason!r}")


def test_client_close_without_status_is_a_normal_close(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    ws = gw.connect()
    try:
        echo_roundtrip(ws, chat("hi"))
        with ws.send_context():
            ws.protocol.send_close()
        record = backend.connection()
        eventually(record.closed.is_set, what="backend connection closed")
    finally:
        ws.close_socket()
    if record.close_code not in (1000, 1005):  # 1005: an empty close frame, passed on
        raise GatewayBug(
            f"a normal client close reached the upstream as {record.close_code} "
            f"{record.close_reason!r}"
        )


def test_client_dropped_closes_the_upstream_promptly(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    ws = gw.connect()
    try:
        echo_roundtrip(ws, chat("hi"))
        record = backend.connection()
        ws.socket.shutdown(socket.SHUT_RDWR)  # the TCP connection ends, no close frame
        eventually(record.closed.is_set, timeout=5, what="backend connection closed")
        assert record.close_code == 1001
        assert record.close_reason == "client went away"
    finally:
        ws.close_socket()
    eventually(lambda: gw.connection_count() == 0, what="gateway connection gone")


def test_a_client_gone_while_its_upstream_opens_does_not_leave_it_open(
    backend: Backend, gateways: GatewayFactory
) -> None:
    """The client drops right after its 101, while the gateway is still opening its
    upstream: once that upstream opens it is closed at once (1001), never left open
    (kept alive by the heartbeat, counted by no limit)."""
    gw = gateways(backend.url)
    with backend.blocked():  # the backend answers no handshake until the block ends
        ws = gw.connect()
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone, no close frame
        ws.close_socket()
        eventually(lambda: gw.connection_count() == 0, what="the client's connection ended")
    record = backend.connection()  # the upstream's handshake, answered now
    eventually(record.closed.is_set, timeout=5, what="the late upstream closed")
    assert record.close_code == 1001


def test_client_gone_releases_the_upstream_of_a_hung_backend(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(
        backend.url,
        {"gateway": {"upstream_ping_interval_seconds": 60, "connect_timeout_seconds": 1.0}},
    )
    ws = gw.connect()
    echo_roundtrip(ws, chat("hi"))
    [upstream] = eventually(lambda: gateway_upstreams(gw), what="the gateway's upstream")
    with backend.blocked():  # the backend never answers the close
        ws.close(4000, "done")
        released = 0.0
        started = time.monotonic()
        while time.monotonic() - started < 3:  # close_timeout (1 s) then abort
            if gw.call(lambda: upstream.state is State.CLOSED):
                released = time.monotonic() - started
                break
            time.sleep(0.05)
        frame = gw.call(lambda: upstream.protocol.close_sent)
        assert frame is not None  # the client's code went upstream at once
        assert (frame.code, frame.reason) == (4000, "done")
        if not released:
            raise GatewayBug("the upstream connection was still open 3 s after the client left")
    eventually(lambda: gw.connection_count() == 0, what="gateway connection gone")


def test_gateway_shutdown_closes_client_and_upstream(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        record = backend.connection()
        stopping = threading.Thread(target=gw.stop, daemon=True)
        stopping.start()
        assert close_of(ws) == (1001, "server shutdown")
    eventually(record.closed.is_set, what="backend connection closed")
    assert record.close_code == 1001
    stopping.join(30)
    assert not stopping.is_alive()


@pytest.mark.parametrize("answer", ["1000", "echo"])
def test_revocation_close_code_reaches_the_backend(
    answer: str,
    backend: Backend,
    gateways: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = gateways(backend.url)
    with gw.connect(make_token("alice")) as ws:
        echo_roundtrip(ws, chat("hi"))
        record = backend.connection()
        if answer == "1000":  # the client answers wsguard's close with 1000, not 4003
            protocol = ws.protocol
            original = protocol.send_frame

            def answer_1000(frame: Frame) -> None:
                if frame.opcode is Opcode.CLOSE:
                    frame = Frame(Opcode.CLOSE, Close(1000, "").serialize())
                original(frame)

            monkeypatch.setattr(protocol, "send_frame", answer_1000)
        gw.run_coro(gw.app.guard.store.revoke("sub", "alice", 60))
        assert close_of(ws, timeout=3)[0] == 4003
    assert record.closed.wait(3)
    assert record.close_code == 4003  # what wsguard said, not the client's answer
    assert record.received == [chat("hi")]


# -- 5. upstream down or failing ---------------------------------------------------------------


def test_unreachable_upstream_closes_the_client_1013(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    gw = gateways(f"ws://user:hunter2@127.0.0.1:{port}/ws?key=s3cret")
    with caplog.at_level(logging.WARNING, logger="wsguard.gateway"), gw.connect() as ws:
        assert close_of(ws) == (1013, "upstream unavailable")  # admitted, then closed
    event = eventually(lambda: gw.audit.events("upstream_unavailable"), what="audit")[-1]
    assert event["upstream"] == f"ws://127.0.0.1:{port}/ws"
    assert event["subject"] == "alice"
    assert event["detail"] == "ConnectionRefusedError"
    closed = eventually(lambda: gw.audit.events("connection_closed"), what="close audited")
    assert closed[-1]["code"] == 1013
    assert closed[-1]["cause"] == "upstream_unavailable"
    lines = [r.getMessage() for r in caplog.records if r.name == "wsguard.gateway"]
    assert any(f"upstream ws://127.0.0.1:{port}/ws unavailable" in line for line in lines), lines
    everything = gw.audit.getvalue() + "\n".join(lines)
    assert "hunter2" not in everything
    assert "s3cret" not in everything


@pytest.mark.parametrize(
    ("status", "closed", "cause"),
    [
        (HTTPStatus.SERVICE_UNAVAILABLE, (1013, "upstream unavailable"), "upstream_unavailable"),
        (HTTPStatus.NOT_FOUND, (1013, "upstream unavailable"), "upstream_unavailable"),
        # the backend refused this client: 1013 would tell it to try again, in a loop
        (HTTPStatus.FORBIDDEN, (1008, "upstream refused"), "upstream_refused"),
        (HTTPStatus.UNAUTHORIZED, (1008, "upstream refused"), "upstream_refused"),
    ],
)
def test_upstream_refusing_the_handshake_closes_the_client(
    backends: BackendFactory,
    gateways: GatewayFactory,
    status: HTTPStatus,
    closed: tuple[int, str],
    cause: str,
) -> None:
    backend = backends(refuse=status)
    gw = gateways(backend.url)
    with gw.connect() as ws:
        assert close_of(ws) == closed
    event = eventually(lambda: gw.audit.events("upstream_unavailable"), what="audit")[-1]
    assert event["status"] == status
    assert event["detail"] == "InvalidStatus"
    assert backend.handshakes == 1
    assert backend.connections == []
    [record] = eventually(lambda: gw.audit.events("connection_closed"), what="the close")
    assert (record["code"], record["cause"]) == (closed[0], cause)


@pytest.mark.parametrize(
    "answer",
    [
        "evil.v9",  # a subprotocol the gateway did not offer
        "wsguard.v1, evil.v9",  # two at once
    ],
)
def test_a_backend_answering_a_subprotocol_not_offered_closes_the_client_1011(
    backends: BackendFactory, gateways: GatewayFactory, answer: str
) -> None:
    """RFC 6455 4.1: the gateway, as the backend's client, fails a 101 naming a protocol it
    did not offer; the client hears a server fault (1011), not "try again later" (1013),
    which would send it round in a loop against a deployment error."""
    backend = backends(answer_protocol=answer)
    gw = gateways(backend.url)
    with gw.connect(subprotocols=["wsguard.v1"]) as ws:
        assert ws.subprotocol == "wsguard.v1"
        assert close_of(ws) == (1011, "upstream error")
    event = eventually(lambda: gw.audit.events("upstream_unavailable"), what="audit")[-1]
    assert event["detail"] in ("NegotiationError", "InvalidHeader")
    [record] = eventually(lambda: gw.audit.events("connection_closed"), what="the close")
    assert (record["code"], record["cause"]) == (1011, "upstream_unavailable")


def test_the_granted_subprotocol_is_the_one_the_backend_speaks(
    backends: BackendFactory, gateways: GatewayFactory
) -> None:
    backend = backends(subprotocols=["chat.v2"])
    gw = gateways(backend.url, {"subprotocols": ["chat.v2", "wsguard.v1"]})
    with gw.connect(subprotocols=["wsguard.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        echo_roundtrip(ws, chat("x"))
    record = backend.connection()
    assert record.headers.get_all("Sec-WebSocket-Protocol") == ["chat.v2"]
    assert record.ws.subprotocol == "chat.v2"
    # a backend that negotiates no subprotocol serves the client's wsguard.v1 as it is
    with gateways(backends().url).connect(subprotocols=["wsguard.v1"]) as ws:
        assert ws.subprotocol == "wsguard.v1"
        echo_roundtrip(ws, chat("y"))


def test_upstream_handshake_timeout_closes_the_client_1013(gateways: GatewayFactory) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog), never answers the upgrade
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        gw = gateways(f"ws://127.0.0.1:{port}/", {"gateway": {"connect_timeout_seconds": 0.5}})
        with gw.connect() as ws:
            started = time.monotonic()
            assert close_of(ws) == (1013, "upstream unavailable")
            assert time.monotonic() - started < 4
    event = eventually(lambda: gw.audit.events("upstream_unavailable"), what="audit")[-1]
    assert event["detail"] == "TimeoutError"


def test_upstream_crash_closes_the_client_1011(backend: Backend, gateways: GatewayFactory) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        backend.crash(backend.connection())
        assert close_of(ws) == (1011, "upstream error")
    event = eventually(lambda: gw.audit.events("upstream_closed"), what="upstream_closed")
    assert event[-1]["code"] == 1006


def test_backend_stopping_closes_the_client_with_its_code(
    backends: BackendFactory, gateways: GatewayFactory
) -> None:
    backend = backends()
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        backend.stop(graceful=True)  # a websockets server closes its connections with 1001
        assert close_of(ws)[0] == 1001
    with gw.connect() as ws:  # now it is down: try again later
        assert close_of(ws) == (1013, "upstream unavailable")


# -- 6. pings and the upstream heartbeat -------------------------------------------------------


def test_client_ping_is_answered_by_the_gateway(backend: Backend, gateways: GatewayFactory) -> None:
    gw = gateways(backend.url)
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        with backend.blocked():  # the backend could not answer anything
            assert ws.ping(b"are you there").wait(5)
            assert ws.ping().wait(5)
        echo_roundtrip(ws, chat("still here"))
    assert backend.connection().received == [chat("hi"), chat("still here")]


def test_upstream_heartbeat_detects_a_hung_backend(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(
        backend.url,
        {"gateway": {"upstream_ping_interval_seconds": 0.2, "connect_timeout_seconds": 1.0}},
    )
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        with backend.blocked():  # TCP still up, nothing answered: a wedged backend
            started = time.monotonic()
            closed = close_of(ws, timeout=15)
            elapsed = time.monotonic() - started
    if closed != (1011, "upstream error"):
        pytest.fail(f"a hung upstream gave the client {closed}, not 1011")
    eventually(lambda: gw.audit.events("upstream_closed"), what="upstream_closed")
    if elapsed > 3:  # ping interval + ping timeout = 0.4 s
        raise GatewayBug(f"the hung upstream was detected after {elapsed:.1f}s")


def test_a_dead_heartbeat_closes_the_client_without_waiting_for_a_closing_handshake(
    backend: Backend, gateways: GatewayFactory
) -> None:
    """An unanswered heartbeat ends the upstream at once: the client gets its 1011 then,
    not after a closing handshake the wedged backend never completes
    (``gateway.connect_timeout_seconds``, 30 s here), during which its messages would be
    accepted and lost."""
    gw = gateways(
        backend.url,
        {"gateway": {"upstream_ping_interval_seconds": 0.2, "connect_timeout_seconds": 30.0}},
    )
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        with backend.blocked():
            assert close_of(ws, timeout=10) == (1011, "upstream error")
    [closed] = eventually(lambda: gw.audit.events("upstream_closed"), what="upstream_closed")
    assert closed["code"] == 1006  # dropped, not closed: nothing to wait for


def test_upstream_heartbeat_runs_and_keeps_an_idle_backend(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(backend.url, {"gateway": {"upstream_ping_interval_seconds": 0.1}})
    with gw.connect() as ws:
        echo_roundtrip(ws, chat("hi"))
        [upstream] = gateway_upstreams(gw)
        # the gateway's own pings, answered by the backend (websockets records the latency)
        eventually(lambda: gw.call(lambda: upstream.latency > 0), what="a keepalive pong")
        echo_roundtrip(ws, chat("still open"))
    assert not gw.audit.events("upstream_closed")


# -- 7. per-path routing -----------------------------------------------------------------------


def test_routes_pick_the_upstream_by_longest_prefix(
    backends: BackendFactory, gateways: GatewayFactory
) -> None:
    default, a, b, deep = backends(), backends(), backends(), backends()
    routes = {"/a": a.url + "a-side", "/b": b.url, "/a/deep": deep.url + "deep?x=1"}
    gw = gateways(
        default.url, {"gateway": {"routes": routes}, "limits": {"connections_per_address": 50}}
    )
    cases = [
        ("/a/x", a, "/a-side"),
        ("/a", a, "/a-side"),
        ("/b", b, "/"),
        ("/b/room/1?q=2", b, "/"),
        ("/a/deep/1", deep, "/deep?x=1"),
        ("/", default, "/"),
        ("/c", default, "/"),
    ]
    for path, target, upstream_path in cases:
        before = len(target.connections)
        with gw.connect(path=path) as ws:
            echo_roundtrip(ws, chat(path))
        record = target.connection(before)
        assert record.received == [chat(path)], path
        assert record.path == upstream_path, path
    for target, expected in ((default, 2), (a, 2), (b, 2), (deep, 1)):
        assert len(target.connections) == expected


def test_route_down_closes_only_its_clients(backend: Backend, gateways: GatewayFactory) -> None:
    down = f"ws://127.0.0.1:{free_port()}/"
    gw = gateways(backend.url, {"gateway": {"routes": {"/down": down}}})
    with gw.connect(path="/down/x") as ws:
        assert close_of(ws) == (1013, "upstream unavailable")
    with gw.connect(path="/up") as ws:
        echo_roundtrip(ws, chat("fine"))


def test_route_matches_a_path_with_a_query(
    backends: BackendFactory,
    gateways: GatewayFactory,
) -> None:
    default, side_a = backends(), backends()
    gw = gateways(default.url, {"gateway": {"routes": {"/a": side_a.url}}})
    with gw.connect(path="/a?room=1") as ws:
        echo_roundtrip(ws, chat("to a"))
    assert default.connections == []  # not the default upstream
    record = side_a.connection()
    assert record.received == [chat("to a")]
    assert record.path == "/"  # the client's query is not passed on


# -- 8. back-pressure ------------------------------------------------------------------------


@dataclass
class SlowClientRun:
    """What :func:`drop_slow_client` observed."""

    record: Upstreamed
    upstream: UpstreamConnection
    sending: Future[None]
    count: int
    peak_queue: int = 0
    peak_frames: int = 0
    upstream_paused: bool = False


def drop_slow_client(gw: RunningServer, backend: Backend, count: int, size: int) -> SlowClientRun:
    """The backend streams *count* messages to a client that reads nothing until the
    gateway drops it as a slow consumer; then the client reads (to the close frame)."""
    ws = gw.connect()
    try:
        echo_roundtrip(ws, chat("hi"))
        [upstream] = gateway_upstreams(gw)
        record = backend.connection()
        run = SlowClientRun(record, upstream, backend.send_many(record, count, size), count)

        def sample() -> tuple[int, int, bool]:
            queued = max((len(c._queue or ()) for c in gw.app.connections.values()), default=0)
            return queued, len(upstream.recv_messages.frames), upstream.recv_messages.paused

        def dropped() -> list[dict[str, Any]]:
            queued, frames, paused = gw.call(sample)
            run.peak_queue = max(run.peak_queue, queued)
            run.peak_frames = max(run.peak_frames, frames)
            run.upstream_paused = run.upstream_paused or paused
            return gw.audit.events("slow_consumer")

        eventually(dropped, timeout=20, what="slow consumer dropped")
        assert record.sent < count, record.sent  # the backend could not push everything
        # the client now reads: what was in flight, then the close
        assert close_of(ws, timeout=15) == (1008, "slow consumer")
    finally:
        ws.close_socket()
    return run


def test_slow_client_holds_the_backend_back_and_is_dropped(
    backend: Backend, gateways: GatewayFactory
) -> None:
    """A client that reads nothing: the gateway stops reading the upstream (the backend's
    sends block) and drops the client as a slow consumer after client_drain_seconds."""
    outbound_queue = 8
    gw = gateways(
        backend.url,
        {"gateway": {"client_drain_seconds": 1.0}, "limits": {"outbound_queue": outbound_queue}},
    )
    count, size = 5000, 16 * 1024  # 80 MB: far more than every socket buffer on the way
    run = drop_slow_client(gw, backend, count, size)
    assert run.upstream_paused, "the gateway never paused reading from the upstream"
    assert run.peak_queue <= outbound_queue
    assert run.peak_frames <= 16 + ONE_READ // size + 1  # websockets' max_queue + one read
    # the backend gets the client's code at once
    record = run.record
    rcvd = eventually(lambda: record.ws.protocol.close_rcvd, what="close frame upstream")
    assert (rcvd.code, rcvd.reason) == (1008, "slow consumer")
    assert record.sent < count
    backend.stop()  # drop what is left
    assert run.sending.exception(timeout=10) is None


def test_slow_client_dropped_releases_its_upstream(
    backend: Backend, gateways: GatewayFactory
) -> None:
    gw = gateways(
        backend.url,
        {
            "gateway": {
                "client_drain_seconds": 1.0,
                "connect_timeout_seconds": 1.0,
                "upstream_ping_interval_seconds": 60,
            }
        },
    )
    run = drop_slow_client(gw, backend, 5000, 16 * 1024)
    upstream = run.upstream
    started = time.monotonic()
    while time.monotonic() - started < 3:  # close_timeout (1 s) then abort
        if gw.call(lambda: upstream.state is State.CLOSED):
            return
        time.sleep(0.05)
    raise GatewayBug("the upstream of a dropped slow consumer was still open after 3 s")


def test_stalled_backend_stops_the_gateway_reading_from_the_client(
    backends: BackendFactory, gateways: GatewayFactory
) -> None:
    """A backend that reads nothing: the gateway's forward blocks, it stops reading the
    client (bounded queue, then TCP) and the client's sends block; nothing is lost."""
    backend = backends(stall=True, echo=False, keep=False)
    blob = {
        "schema": {
            "type": "object",
            "properties": {"type": {"const": "blob"}, "text": {"type": "string"}},
            "required": ["type", "text"],
            "additionalProperties": False,
        }
    }
    gw = gateways(
        backend.url,
        {
            "limits": {**NO_RATE_LIMITS, "max_message_bytes": 65536},
            "messages": {"max_string_length": 65536, "types": {**DEMO_MESSAGE_TYPES, "blob": blob}},
        },
    )
    total = 3000
    message = json.dumps({"type": "blob", "text": "y" * 32000})  # 96 MB in all
    ws = gw.connect()
    sent = [0]
    failed: queue.Queue[BaseException] = queue.Queue()

    def pump() -> None:
        try:
            for _ in range(total):
                ws.send(message)
                sent[0] += 1
        except BaseException as exc:
            failed.put(exc)

    sender = threading.Thread(target=pump, daemon=True)
    try:
        record = backend.connection()
        sender.start()

        def stalled() -> bool:  # no progress over 0.5 s, bounded by eventually()
            before = sent[0]
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if sent[0] != before or not sender.is_alive():
                    return False
                time.sleep(0.05)
            return True

        eventually(stalled, timeout=20, what="the client's sends blocked")
        assert sender.is_alive()
        blocked_at = sent[0]
        assert blocked_at < total
        assert record.count == 0  # the backend read nothing

        [upstream] = gateway_upstreams(gw)
        [conn] = gateway_connections(gw)

        def gateway_side() -> tuple[int, bool, int]:
            server_ws = conn.transport.ws  # type: ignore[attr-defined]  # the websockets engine
            frames = len(server_ws.recv_messages.frames)
            buffered = upstream.transport.get_write_buffer_size()
            return frames, server_ws.recv_messages.paused, buffered

        frames, paused, buffered = gw.call(gateway_side)
        assert paused, "the gateway kept reading from the client"
        assert frames <= 16 + ONE_READ // len(message) + 1
        assert buffered <= 2**15 + 2 * len(message)  # websockets' write limit + a frame
        assert gw.connection_count() == 1  # not dropped: only slow

        backend.resume()  # the backend reads again: everything arrives, in order
        eventually(lambda: record.count == total, timeout=30, what="all messages forwarded")
        sender.join(10)
        assert not sender.is_alive()
        assert failed.empty()
        assert sent[0] == total
    finally:
        ws.close_socket()
        sender.join(10)


# -- 9. the command line ---------------------------------------------------------------------


def start_proxy(args: Sequence[str], env: dict[str, str], audit_path: Path) -> Served:
    """A running ``wsguard proxy`` subprocess."""
    return Served(args, env, audit_path, command="proxy")


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Callable[[Sequence[str], dict[str, str]], Served]]:
    started: list[Served] = []

    def start(args: Sequence[str], env: dict[str, str]) -> Served:
        running = start_proxy(args, env, tmp_path / f"audit-{len(started)}.jsonl")
        started.append(running)
        return running

    yield start
    for running in started:
        running.kill()


def test_cli_proxy_forwards_to_the_upstream(
    tmp_path: Path,
    backend: Backend,
    proxied: Callable[[Sequence[str], dict[str, str]], Served],
) -> None:
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    running = proxied(["--port", "0", "--upstream", backend.url], env)
    running.wait_for(f"forwarding to ws://127.0.0.1:{backend.port}/")
    port = running.wait_listening()
    assert port > 0
    assert running.host == "127.0.0.1"
    with running.connect(make_token("dave")) as ws:
        text = chat("through the command line")
        ws.send(text)
        assert ws.recv(timeout=5) == text
        ws.send("{bad")
        assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
    record = backend.connection()
    assert record.received == [text]
    assert record.headers["X-Wsguard-Subject"] == "dave"
    assert running.stop() == 0
    events = [e["event"] for e in running.audit_events()]
    assert "connection_admitted" in events


def test_cli_proxy_reads_the_gateway_section(
    tmp_path: Path,
    backend: Backend,
    proxied: Callable[[Sequence[str], dict[str, str]], Served],
) -> None:
    config = tmp_path / "wsguard.toml"
    config.write_text(
        f'[gateway]\nupstream = "ws://127.0.0.1:{free_port()}/unused"\n'
        f'subject_header = "X-User"\nidentity_secret = "{IDENTITY_SECRET}"\n'
    )
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    url = f"ws://user:pw-in-url@127.0.0.1:{backend.port}/ws?api_key=k3y"
    running = proxied(["--config", str(config), "--port", "0", "--upstream", url], env)
    running.wait_for(f"forwarding to ws://127.0.0.1:{backend.port}/ws\n")  # --upstream wins
    running.wait_listening()
    with running.connect(make_token("erin")) as ws:
        text = chat("configured")
        ws.send(text)
        assert ws.recv(timeout=5) == text
    seen = backend.connection().headers
    assert seen["X-User"] == "erin"
    assert verify_identity(
        seen,
        IDENTITY_SECRET,
        upstream=f"ws://127.0.0.1:{backend.port}/ws",
        config=GatewayConfig(subject_header="X-User"),
    )
    running.stop()
    assert "pw-in-url" not in running.stderr
    assert "k3y" not in running.stderr


def test_cli_proxy_without_upstream_exits_2(tmp_path: Path) -> None:
    done = run_cli(["proxy", "--port", "0"], cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET))
    assert done.returncode == 2, done.stderr
    assert "gateway.upstream" in done.stderr


@pytest.mark.parametrize("upstream", ["http://127.0.0.1:3000/", "x", "ws://"])
def test_cli_proxy_with_a_non_ws_upstream_exits_2(tmp_path: Path, upstream: str) -> None:
    done = run_cli(
        ["proxy", "--port", "0", "--upstream", upstream],
        cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET),
    )
    assert done.returncode == 2, done.stderr
    assert "gateway.upstream" in done.stderr


def test_routes_match_whole_path_segments() -> None:
    config = make_config(
        {"gateway": {"upstream": "ws://d/", "routes": {"/a": "ws://a/", "/a/b/": "ws://ab/"}}}
    ).gateway
    assert config.upstream_for("/a") == "ws://a/"
    assert config.upstream_for("/a/x") == "ws://a/"
    assert config.upstream_for("/apple") == "ws://d/"  # not a segment of /a
    assert config.upstream_for("/a/b/c") == "ws://ab/"
    assert config.upstream_for("/") == "ws://d/"


def test_a_bad_upstream_url_is_not_echoed_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"gateway": {"upstream": "http://user:s3cret-pw@x/"}})
    assert caught.value.key == "gateway.upstream"
    assert "s3cret-pw" not in str(caught.value)


def test_upstream_messages_can_be_held_to_a_schema(
    backend: Backend, gateways: GatewayFactory
) -> None:
    schema = {
        "type": "object",
        "properties": {"type": {"const": "event"}, "n": {"type": "integer"}},
        "required": ["type", "n"],
        "additionalProperties": False,
    }
    gw = gateways(backend.url, {"gateway": {"upstream_schema": schema}})
    with gw.connect() as ws:
        record = backend.connection()
        for data in (
            '{"type":"event","n":1}',
            "not json",
            '{"type":"event","n":"x"}',
            b"\x00binary",
            '{"type":"event","n":2,"extra":1}',
            '{"type":"event","n":3}',
        ):
            backend.send(record, data)
        assert ws.recv(timeout=5) == '{"type":"event","n":1}'
        assert ws.recv(timeout=5) == '{"type":"event","n":3}'  # the four others never came
        refused = eventually(
            lambda: len(gw.audit.events("upstream_message_refused")) == 4 or None,
            5,
            "four upstream messages refused",
        )
        assert refused
        backend.send(record, '{"type":"event","n":4}')  # the connection is still open
        assert ws.recv(timeout=5) == '{"type":"event","n":4}'


def test_an_invalid_upstream_schema_is_a_config_error() -> None:
    """Refused where the configuration is loaded (so check-config refuses it too)."""
    with pytest.raises(ConfigError) as caught:
        make_config({"gateway": {"upstream": "ws://127.0.0.1:1/", "upstream_schema": {"type": 5}}})
    assert caught.value.key == "gateway.upstream_schema"


class _WedgedUpstream:
    """A raw upstream that completes the upgrade, sends *frame* (a close, or one the
    gateway must fail) and then keeps its TCP connection open, reading, until the gateway
    ends it: a closing handshake it never finishes."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ended = threading.Event()  # the gateway ended the TCP connection
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(upgrade_answer(head))
            conn.sendall(self.frame)
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass  # the gateway's close frame, then nothing: never closed from here
            self.ended.set()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    ("frame", "closed"),
    [
        (b"\x88\x05\x03\xe8bye", (1000, "bye")),  # its close frame, TCP kept open
        (
            b"\x81\x82abcd" + bytes(x ^ y for x, y in zip(b"hi", b"ab", strict=True)),
            (1011, "upstream error"),
        ),
    ],
    ids=["close-kept-open", "masked-frame"],
)
def test_an_upstream_that_never_ends_its_closing_handshake_is_cut_at_the_close_timeout(
    gateways: GatewayFactory, frame: bytes, closed: tuple[int, str]
) -> None:
    """The client hears the upstream's close (or its 1011) within the close timeout, not
    at the next heartbeat (20 s by default, up to an hour), and the upstream socket is not
    left open meanwhile."""
    upstream = _WedgedUpstream(frame)
    try:
        settings = {"connect_timeout_seconds": 0.5, "upstream_ping_interval_seconds": 3600}
        gw = gateways(f"ws://127.0.0.1:{upstream.port}/", {"gateway": settings})
        with gw.connect() as ws:
            assert close_of(ws, timeout=10) == closed
        assert upstream.ended.wait(10)  # the gateway cut the upstream's socket
        event = eventually(lambda: gw.audit.events("upstream_closed"), what="audit")[-1]
        assert event["subject"] == "alice"
    finally:
        upstream.close()


def test_session_keys_are_refused_on_the_gateway() -> None:
    """The session key travels in the welcome frame, which the gateway never sends (the
    upstream speaks first): every signed type would be refused bad_signature."""
    from wsguard.errors import ConfigError
    from wsguard.hosts.gateway.proxy import Gateway

    config = make_config(
        {"gateway": {"upstream": "ws://127.0.0.1:9/"}, "signing": {"session_keys": True}}
    )
    with pytest.raises(ConfigError) as refused:
        Gateway(config)
    assert refused.value.key == "signing.session_keys"


def test_wsguard_proxy_says_when_it_enforces_the_demo_protocol(tmp_path: Path) -> None:
    """A gateway is put in front of a backend of its own protocol: with no message types
    configured, the demo protocol's refuse every message of it; the start-up says so."""
    served = Served(
        ["--upstream", "ws://127.0.0.1:9/", "--port", "0"],
        cli_env(tmp_path),
        tmp_path / "audit.jsonl",
        command="proxy",
    )
    try:
        served.wait_for("the message policy is the demo protocol")
        served.wait_for('messages.format = "opaque"')
    finally:
        served.kill()
