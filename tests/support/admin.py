"""The admin listener: a demo server with it on, its HTTP API spoken with ``httpx``, the
dashboard's WebSocket, and TLS certificates for it (``trustme``)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import ADMIN_TOKEN, RunningServer, ServerFactory, admin_overrides, make_token
from support.tls_client import connect_tls

#: Limits roomy enough that the tests' own handshakes never trip them.
ROOMY: dict[str, Any] = {
    "limits": {
        "connections_per_address": 50,
        "connections_per_subject": 50,
        "handshakes_per_minute": 1000,
        "auth_failures_before_ban": 1000,
    }
}


def admin_server(server_factory: ServerFactory, **overrides: Any) -> RunningServer:
    """A demo server with roomy limits and the admin listener (token ``ADMIN_TOKEN``)."""
    return server_factory({**ROOMY, **admin_overrides(), **overrides})


def admin_port(server: RunningServer) -> int:
    port = server.app.admin_port
    assert port is not None
    return port


def call(
    url: str,
    method: str,
    path: str,
    *,
    token: str | None = ADMIN_TOKEN,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    """One admin request (no proxy from the environment, no cookie jar)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    with httpx.Client(trust_env=False, timeout=10, verify=verify) as client:
        return client.request(method, url + path, headers=sent, json=json_body)


def request(
    server: RunningServer,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
) -> httpx.Response:
    """One admin request to *server* with exactly *headers* (no credential of its own)."""
    return call(server.admin_url, method, path, token=None, headers=headers, json_body=json_body)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["message"]
    return str(body["error"])


def cookie_attributes(set_cookie: str) -> tuple[str, str, list[str]]:
    """(name, value, lower-cased attributes) of one Set-Cookie header."""
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    name, _, value = first.partition("=")
    return name, value, [part.lower() for part in rest]


def dashboard_url(base: str) -> str:
    """The dashboard's WebSocket on the admin listener at *base* (http or https)."""
    return base.replace("http", "ws", 1) + "/dashboard/live"


def _connect(url: str, **kwargs: Any) -> ClientConnection:
    """websockets' sync client; over TLS, without its read/write race (support.tls_client)."""
    if kwargs.get("ssl") is not None:
        return connect_tls(url, open_timeout=10, **kwargs)
    ws: ClientConnection = connect(url, open_timeout=10, **kwargs)
    return ws


def refused_upgrade(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        _connect(url, **kwargs).close()
    return int(info.value.response.status_code)


def first_snapshot(url: str, **kwargs: Any) -> dict[str, Any]:
    with _connect(url, **kwargs) as ws:
        message: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return message


# -- WebSocket clients on the public listener -------------------------------------------


@pytest.fixture
def clients() -> Iterator[list[ClientConnection]]:
    """WebSocket clients a test opened; all closed at the end."""
    opened: list[ClientConnection] = []
    yield opened
    for ws in opened:
        ws.close()


def open_client(
    server: RunningServer, clients: list[ClientConnection], token: str
) -> tuple[ClientConnection, str]:
    """Connect with *token*, read the welcome; returns the client and its connection id."""
    ws = server.connect(token)
    clients.append(ws)
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome", welcome
    return ws, str(welcome["connection_id"])


def welcomed(
    server: RunningServer, clients: list[ClientConnection], subject: str
) -> tuple[ClientConnection, str]:
    """A client of *subject* (a fresh token), welcomed: the client and its connection id."""
    return open_client(server, clients, make_token(subject))


# -- TLS -------------------------------------------------------------------------------


class Certificates:
    """A server certificate for the listeners (from *server_ca*), as files."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.server_ca = trustme.CA()
        leaf = self.server_ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = tmp_path / "server.pem", tmp_path / "server.key"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_file))
        leaf.private_key_pem.write_to_path(str(self.key_file))

    @property
    def pair(self) -> dict[str, str]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}

    def ca_file(self, name: str, *cas: trustme.CA) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(ca.cert_pem.bytes() for ca in cas))
        return path

    def client_context(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.server_ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


def session_cookie_name(server: RunningServer, *, https: bool = False) -> str:
    """The dashboard's session cookie on *server*'s admin listener: named after its port."""
    return f"{'__Host-' if https else ''}wsguard_admin_session_{admin_port(server)}"
