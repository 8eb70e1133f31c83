"""``wsguard serve --admin-port`` and ``wsguard admin ...`` as real subprocesses.

The server is a real ``wsguard serve`` with its admin listener (or, where only the
command is under test, a server of the ``server_factory`` fixture); every ``wsguard admin``
command is a separate process talking to it over HTTP, as an operator would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import ADMIN_TOKEN, ServerFactory, admin_headers, admin_overrides
from support.admin import request
from support.cli import SECRET, cli_env, mint, run_cli
from support.cli import run_cli as run
from support.net import PROXY_VARIABLES, free_port
from support.paths import WSGUARD
from support.serve_process import Served

ADMIN = "cli-admin-token-0123456789abcdefgh"
ADMIN_LINE = re.compile(r"admin listener on (http://127\.0\.0\.1:(\d+))/")


class Node:
    def __init__(self, served: Served, url: str, env: dict[str, str]) -> None:
        self.served = served
        self.url = url
        self.env = env

    def admin(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run(["admin", *args, "--url", self.url], {**self.env, **extra})

    def admin_json(self, *args: str) -> Any:
        done = self.admin(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_ADMIN_TOKEN=ADMIN)
    served = Served(["--port", "0", "--admin-port", "0"], env, tmp_path / "audit.log")
    try:
        served.wait_listening()
        url = served.wait_for(ADMIN_LINE).group(1)
        yield Node(served, url, env)
    finally:
        served.stop()


def open_ws(node: Node, token: str) -> ClientConnection:
    ws = node.served.connect(token)
    ws.pending_legacy_warning = False  # closed by the server or explicitly
    return ws


def user_token(home: Path, subject: str, *args: str) -> str:
    return mint(home, "--sub", subject, *args, WSGUARD_JWT_SECRET=SECRET)


def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)  # polling a condition, bounded by the deadline


def test_serve_announces_the_admin_listener_on_loopback(node: Node) -> None:
    assert node.url.startswith("http://127.0.0.1:")
    assert httpx.get(node.url + "/healthz").json()["status"] == "ok"
    health = node.admin_json("health")
    assert health["health"]["status"] == "ok"
    assert health["readiness"] == {"ready": True}
    # the admin listener is not the public one
    assert int(node.url.rsplit(":", 1)[1]) != node.served.port


def test_admin_connections_disconnect_and_revoke(node: Node, tmp_path: Path) -> None:
    alice = open_ws(node, user_token(tmp_path, "alice"))
    bob = open_ws(node, user_token(tmp_path, "bob"))
    for ws in (alice, bob):
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    listing = node.admin_json("connections", "--all", "--limit", "1")
    assert sorted(c["subject"] for c in listing["connections"]) == ["alice", "bob"]
    assert listing["total"] == 2
    only = node.admin_json("connections", "--subject", "alice")
    assert [c["subject"] for c in only["connections"]] == ["alice"]

    done = node.admin_json("disconnect", "--subject", "alice")
    assert done["disconnected"] == {"subject": "alice"}
    with pytest.raises(ConnectionClosed) as closed:
        alice.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "disconnected by operator"

    bob_id = listing_id(node, "bob")
    revoked = node.admin_json("revoke", "--subject", "bob", "--ttl", "10m")
    assert revoked["ttl_seconds"] == 600
    with pytest.raises(ConnectionClosed) as closed:
        bob.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4003
    assert eventually(lambda: node.admin("connections").stdout.count(bob_id) == 0)


def listing_id(node: Node, subject: str) -> str:
    listing = node.admin_json("connections", "--subject", subject)
    return str(listing["connections"][0]["id"])


def test_admin_ban_bans_and_unban(node: Node, tmp_path: Path) -> None:
    token = user_token(tmp_path, "carol")
    ws = open_ws(node, token)
    assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    banned = node.admin_json("ban", "127.0.0.1", "--duration", "2m")
    assert banned == {"banned": "127.0.0.1", "seconds": 120.0}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    with pytest.raises(InvalidStatus) as refused:
        open_ws(node, token)
    assert refused.value.response.status_code == 429
    bans = node.admin_json("bans")["bans"]
    assert [b["address"] for b in bans] == ["127.0.0.1"]
    assert 0 < bans[0]["remaining_seconds"] <= 120
    assert node.admin_json("unban", "127.0.0.1") == {"unbanned": "127.0.0.1"}
    again = node.admin("unban", "127.0.0.1")
    assert again.returncode == 1
    assert "404 not_banned" in again.stderr
    open_ws(node, token).close()
    events = node.admin_json("events", "--limit", "10")["events"]
    assert [e["kind"] for e in events][:2] == ["unban", "ban"]
    audit = [e["event"] for e in node.served.audit_events()]
    assert "ban_started" in audit
    assert "ban_lifted" in audit
    alerts = node.admin_json("alerts")
    assert "auth_failures_per_address" in alerts["rules"]


def test_admin_refuses_a_wrong_token_and_a_user_token(node: Node, tmp_path: Path) -> None:
    wrong = node.admin("bans", WSGUARD_ADMIN_TOKEN="not-the-admin-token-000000000")
    assert wrong.returncode == 1
    assert "401 unauthorized" in wrong.stderr
    user = tmp_path / "user.token"
    user.write_text(user_token(tmp_path, "root", "--scope", "admin"))
    with_user = node.admin("bans", "--token-file", str(user))
    assert with_user.returncode == 1
    assert "401 unauthorized" in with_user.stderr
    # and nothing was done on its behalf
    assert node.admin_json("bans") == {"bans": []}


def test_admin_without_a_listener_to_talk_to_is_a_config_error(tmp_path: Path) -> None:
    done = run(["admin", "bans"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "admin.port" in done.stderr
    bad = run(["admin", "bans", "--url", "ftp://x"], cli_env(tmp_path))
    assert bad.returncode == 2
    assert "--url" in bad.stderr
    port = free_port()
    unreachable = run(["admin", "bans", "--url", f"http://127.0.0.1:{port}"], cli_env(tmp_path))
    assert unreachable.returncode == 1
    assert "cannot reach the admin listener" in unreachable.stderr


def test_admin_finds_the_listener_and_generated_token_from_config(tmp_path: Path) -> None:
    """No token configured: the loopback listener generates one (0600) and the CLI uses it."""
    port = free_port()
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    served = Served(["--port", "0", "--admin-port", str(port)], env, tmp_path / "audit.log")
    try:
        served.wait_listening()
        path = Path(served.wait_for(re.compile(r"admin token in (\S+) ")).group(1))
        assert path.stat().st_mode & 0o777 == 0o600
        done = run(["admin", "bans"], {**env, "WSGUARD_ADMIN__PORT": str(port)})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"bans": []}
        headers = {"Authorization": f"Bearer {path.read_text().strip()}"}
        assert httpx.get(f"http://127.0.0.1:{port}/bans", headers=headers).status_code == 200
    finally:
        served.stop()


def test_cli_ignores_proxy_settings_for_a_loopback_admin_url(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(admin_overrides())
    request(server, "POST", "/bans", headers=admin_headers(), json_body={"address": "192.0.2.9"})
    env = cli_env(tmp_path, WSGUARD_ADMIN_TOKEN=ADMIN_TOKEN)
    for name in PROXY_VARIABLES:
        env.pop(name, None)
        env.pop(name.lower(), None)
    proxy = "http://127.0.0.1:1"
    env.update(HTTP_PROXY=proxy, http_proxy=proxy, ALL_PROXY=proxy, all_proxy=proxy)
    done = subprocess.run(
        [WSGUARD, "admin", "bans", "--url", server.admin_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [b["address"] for b in listed["bans"]] == ["192.0.2.9"]
    assert ADMIN_TOKEN not in done.stdout + done.stderr


# -- finding the admin listener, or saying what to pass ----------------------------------


def test_admin_finds_the_listener_of_serve_admin_port_without_a_flag(tmp_path: Path) -> None:
    admin_port = free_port()
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET)
    served = Served(["--port", "0", "--admin-port", str(admin_port)], env, tmp_path / "a.jsonl")
    try:
        served.wait_listening()
        served.wait_for("admin listener on")
        done = run_cli(["admin", "health"], env)  # no --url, no WSGUARD_ADMIN_*
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["readiness"] == {"ready": True}
        bans = run_cli(["admin", "bans"], env)  # with the generated token, found as before
        assert (bans.returncode, json.loads(bans.stdout)) == (0, {"bans": []}), bans.stderr
        # another user's HOME has no running server: the same flag as the server's, or the URL
        elsewhere = cli_env(tmp_path / "other")
        assert run_cli(["admin", "health"], elsewhere).returncode == 2
        flag = run_cli(["admin", "health", "--admin-port", str(admin_port)], elsewhere)
        assert flag.returncode == 0, flag.stderr
        url = f"http://127.0.0.1:{admin_port}"
        by_env = run_cli(["admin", "health"], {**elsewhere, "WSGUARD_ADMIN_URL": url})
        assert by_env.returncode == 0, by_env.stderr
        assert "ignoring unknown environment variable" not in by_env.stderr
        assert served.stop() == 0
        gone = run_cli(["admin", "health"], env)  # the server removed what it wrote
        assert gone.returncode == 2
        assert "--admin-port PORT" in gone.stderr and "--url" in gone.stderr
    finally:
        served.kill()


def test_admin_ignores_the_url_of_a_server_that_is_gone(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    record = tmp_path / ".local" / "share" / "wsguard" / "admin.url"
    record.parent.mkdir(parents=True)
    port = free_port()
    record.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": int(ended.stdout)}))
    done = run_cli(["admin", "health"], cli_env(tmp_path))
    assert done.returncode == 2
    assert "no admin listener to talk to" in done.stderr
    assert "cannot reach" not in done.stderr
    # a running server's record is used (here the test itself is the "server")
    record.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": os.getpid()}))
    done = run_cli(["admin", "health"], cli_env(tmp_path))
    assert done.returncode == 1
    assert "cannot reach the admin listener" in done.stderr


def test_admin_refused_for_want_of_a_token_says_what_to_pass(tmp_path: Path) -> None:
    env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, WSGUARD_ADMIN_TOKEN="x" * 32)
    served = Served(["--port", "0", "--admin-port", "0"], env, tmp_path / "a.jsonl")
    try:
        served.wait_listening()
        url = served.wait_for(re.compile(r"admin listener on (http://\S+)/ ")).group(1)
        assert httpx.get(url + "/healthz").status_code == 200
        without = {k: v for k, v in env.items() if k != "WSGUARD_ADMIN_TOKEN"}
        done = run_cli(["admin", "bans"], without)
        assert done.returncode == 1
        assert "401 unauthorized" in done.stderr and "WSGUARD_ADMIN_TOKEN" in done.stderr
    finally:
        served.kill()
