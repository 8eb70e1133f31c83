"""Two wsguard nodes behind a real nginx, one real Redis.

nginx (started by the test on loopback, its own config and prefix directory)
balances WebSocket connections round-robin between two ``wsguard serve`` nodes
and appends the client address to ``X-Forwarded-For``; the nodes trust only
127.0.0.1 (nginx) as a proxy. Clients connect to nginx from *other* loopback
addresses (127.0.0.2, ...), so each test client has an address of its own that
nginx reports and that the client cannot forge.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import make_token
from support.cluster import (
    ServeNode,
    close_code,
    recv_json,
    served_events,
    served_events_eventually,
    wait_subscribed,
    wait_until,
    wsguard_revoke,
)
from support.net import free_port
from support.serve_process import Served

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

NGINX_CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream wsguard {{
        server 127.0.0.1:{port_a};
        server 127.0.0.1:{port_b};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://wsguard;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

SECTIONS: dict[str, dict[str, Any]] = {
    "proxy": {"trusted": ["127.0.0.1/32"]},
    "limits": {
        "connections_per_address": 2,
        "connections_per_subject": 100,
        "handshakes_per_minute": 10_000,
        "auth_failures_before_ban": 2,
    },
}


class Balancer:
    """nginx in front of two wsguard nodes."""

    def __init__(self, workdir: Path, port_a: int, port_b: int) -> None:
        if NGINX is None:
            pytest.fail("nginx is not installed (scripts/test.sh installs it from apt)")
        self.port = free_port()
        (workdir / "tmp").mkdir(parents=True)
        conf = workdir / "nginx.conf"
        user = "user root root;" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(user=user, dir=workdir, port=self.port, port_a=port_a, port_b=port_b)
        )
        self.error_log = workdir / "error.log"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def listening() -> bool:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"nginx exited: {stderr}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, "nginx listening")

    def connect(
        self, source: str, token: str, headers: dict[str, str] | None = None
    ) -> ClientConnection:
        """A WebSocket client connected to nginx from the loopback address *source*."""
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        ws = connect(
            f"ws://127.0.0.1:{self.port}/",
            sock=sock,
            additional_headers={"Authorization": f"Bearer {token}", **(headers or {})},
            open_timeout=10,
            close_timeout=5,
        )
        ws.pending_legacy_warning = False  # callers close it themselves
        return ws

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


Cluster = tuple[Balancer, Served, Served]


@pytest.fixture
def cluster(redis_uri: str, serve_node: ServeNode, tmp_path: Path) -> Iterator[Cluster]:
    a = serve_node(redis_uri, SECTIONS)
    b = serve_node(redis_uri, SECTIONS)
    wait_subscribed(redis_uri, 2)
    balancer = Balancer(tmp_path / "nginx", a.port, b.port)
    yield balancer, a, b
    balancer.stop()


def welcomed(
    balancer: Balancer, source: str, token: str, headers: dict[str, str] | None = None
) -> tuple[ClientConnection, str]:
    """Connect through nginx; (connection, node id from the welcome's connection id)."""
    ws = balancer.connect(source, token, headers)
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, str(welcome["connection_id"])[:8]


def refused_status(
    balancer: Balancer, source: str, token: str, headers: dict[str, str] | None = None
) -> int:
    try:
        ws = balancer.connect(source, token, headers)
    except InvalidStatus as exc:
        return exc.response.status_code
    ws.close()
    pytest.fail("the handshake was admitted")


def direct_status(node: Served, source: str, token: str) -> int:
    """Handshake straight to *node* from *source* (no proxy): the status, 101 if admitted."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((node.host, node.port))
    try:
        ws = connect(
            f"ws://{node.host}:{node.port}/",
            sock=sock,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
        )
    except InvalidStatus as exc:
        return exc.response.status_code
    ws.close()
    return 101


def test_per_address_limit_holds_across_nodes_behind_nginx(cluster: Cluster) -> None:
    balancer, a, b = cluster
    first, node1 = welcomed(balancer, "127.0.0.2", make_token("alice"))
    second, node2 = welcomed(balancer, "127.0.0.2", make_token("bob"))
    assert node1 != node2, "round-robin put both connections on one node"
    # the third from the same address is refused whichever node it lands on
    for _ in range(2):
        assert refused_status(balancer, "127.0.0.2", make_token("carol")) == 429
    # a forged X-Forwarded-For does not give the client another address
    spoofed = {"X-Forwarded-For": "198.51.100.9"}
    for _ in range(2):
        assert refused_status(balancer, "127.0.0.2", make_token("carol"), spoofed) == 429
    refusals = served_events_eventually((a, b), "handshake_refused", 4)
    assert len(refusals) == 4
    assert {(e["client"], e["reason"]) for e in refusals} == {("127.0.0.2", "too_many_connections")}
    assert served_events(a, "handshake_refused")  # both nodes refused some
    assert served_events(b, "handshake_refused")
    # another address is unaffected
    other, _ = welcomed(balancer, "127.0.0.3", make_token("dave"))
    # a slot freed on one node can be used through the other
    first.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            again, _ = welcomed(balancer, "127.0.0.2", make_token("erin"))
            break
        except InvalidStatus as exc:
            if exc.response.status_code != 429:
                pytest.fail(f"refused with {exc.response.status_code}, expected 429")
            if time.monotonic() > deadline:
                pytest.fail("the freed slot was not usable within 10 s")
            time.sleep(0.05)
    for ws in (second, other, again):
        ws.close()


def test_ban_from_auth_failures_applies_on_both_nodes(cluster: Cluster) -> None:
    balancer, a, b = cluster
    for _ in range(2):  # auth_failures_before_ban = 2, failures land on both nodes
        assert refused_status(balancer, "127.0.0.4", make_token("mallory") + "x") == 401
    assert len(served_events_eventually((a, b), "ban_started", 1)) == 1
    # valid tokens from the banned address are refused through nginx and on each node
    for _ in range(2):
        assert refused_status(balancer, "127.0.0.4", make_token("mallory")) == 429
    assert direct_status(a, "127.0.0.4", make_token("mallory")) == 429
    assert direct_status(b, "127.0.0.4", make_token("mallory")) == 429
    # other addresses are not affected
    ws, _ = welcomed(balancer, "127.0.0.5", make_token("alice"))
    ws.close()


def test_revocation_closes_on_both_nodes_behind_nginx(
    cluster: Cluster, redis_uri: str, tmp_path: Path
) -> None:
    balancer, _, _ = cluster
    one, node1 = welcomed(balancer, "127.0.0.6", make_token("alice"))
    two, node2 = welcomed(balancer, "127.0.0.7", make_token("alice"))
    bob, _ = welcomed(balancer, "127.0.0.8", make_token("bob"))
    assert node1 != node2
    done = wsguard_revoke(tmp_path, "--subject", "alice", "--store", redis_uri, "--ttl", "60")
    assert done.returncode == 0, done.stderr
    assert close_code(one, 1.0) == 4003
    assert close_code(two, 1.0) == 4003
    bob.send(json.dumps({"type": "ping", "id": 1}))
    assert recv_json(bob)["type"] == "pong"
    for _ in range(2):
        assert refused_status(balancer, "127.0.0.6", make_token("alice")) == 401
    bob.close()


def test_broadcast_crosses_nodes_behind_nginx(cluster: Cluster) -> None:
    balancer, _, _ = cluster
    sender, node1 = welcomed(balancer, "127.0.0.9", make_token("alice", scopes="chat"))
    receiver, node2 = welcomed(balancer, "127.0.0.10", make_token("bob", scopes="chat"))
    assert node1 != node2
    sender.send(json.dumps({"type": "chat", "text": "across nginx", "id": "c1"}))
    frame = recv_json(receiver)
    assert frame["type"] == "broadcast"
    assert frame["from"] == "alice"
    assert frame["message"]["text"] == "across nginx"
    with pytest.raises(TimeoutError):
        receiver.recv(timeout=0.3)  # exactly once
    with pytest.raises(TimeoutError):
        sender.recv(timeout=0.3)  # never echoed to the sender
    sender.close()
    receiver.close()
