"""Cluster nodes sharing one real ``redis-server``, in-process (conftest's
``RunningServer``) or as ``wsguard serve`` subprocesses (``Served``), and the client
helpers the cluster tests share."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import SECRET, RunningServer, ServerFactory
from support.cli import cli_env
from support.paths import WSGUARD
from support.serve_process import Served

PREFIX = "wsguard:"  # the default cluster.key_prefix
CHANNELS = (PREFIX + "revoke", PREFIX + "broadcast")

#: ``cluster.on_store_error`` with every check failing open while the store is unreachable.
EVERY_CHECK_OPEN = {
    check: "open" for check in ("bans", "revocations", "nonces", "rate_limits", "connections")
}

#: Limits no test reaches unless it lowers one on purpose (every client is 127.0.0.1).
ROOMY: dict[str, Any] = {
    "handshakes_per_minute": 10_000,
    "connections_per_address": 1_000,
    "connections_per_subject": 1_000,
    "messages_per_minute": 6_000,
    "message_burst": 500,
    "violation_budget": 1_000,
}


class Node(Protocol):
    """What the tests need of a node, in-process or subprocess."""

    def connect(self, token: str) -> ClientConnection: ...


def cluster_config(
    store: str,
    limits: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """Overrides for an in-process node on *store*: roomy limits unless lowered."""
    return {
        "store": store,
        "limits": {**ROOMY, **(limits or {})},
        "cluster": cluster or {},
        **sections,
    }


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll *check* until true; fail naming *what* after *timeout*. Returns seconds taken."""
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - started


def wait_subscribed(uri: str, nodes: int, timeout: float = 10.0) -> None:
    """Wait until exactly *nodes* nodes listen on the cluster event channels.

    Exactly: a node of an earlier test that is still going away must not count.
    """
    with redis.Redis.from_url(uri, socket_timeout=2) as client:

        def ready() -> bool:
            counts = client.pubsub_numsub(*CHANNELS)
            return all(int(n) == nodes for _, n in counts)

        wait_until(ready, timeout, f"{nodes} nodes subscribed to {CHANNELS}")


def start_nodes(
    server_factory: ServerFactory, uri: str, overrides: dict[str, Any], count: int = 2
) -> list[RunningServer]:
    nodes = [server_factory(overrides) for _ in range(count)]
    wait_subscribed(uri, count)
    return nodes


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=timeout))
    assert isinstance(frame, dict)
    return frame


def open_ws(node: Node, token: str) -> ClientConnection:
    """A client connection to *node* (raises InvalidStatus when refused)."""
    ws = node.connect(token)
    ws.pending_legacy_warning = False  # callers close it themselves
    return ws


def welcomed(node: Node, token: str) -> ClientConnection:
    """Connect and consume the welcome frame."""
    ws = open_ws(node, token)
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


def refusal(node: Node, token: str) -> tuple[int, str]:
    """The status and body of a handshake that must be refused."""
    try:
        ws = open_ws(node, token)
    except InvalidStatus as exc:
        body = exc.response.body or b""
        return exc.response.status_code, body.decode()
    ws.close()
    pytest.fail("the handshake was admitted")


def connect_eventually(
    node: Node, token: str, timeout: float, what: str, refused: tuple[int, ...] = (429,)
) -> tuple[ClientConnection, float]:
    """Retry a handshake refused with one of *refused* until admitted; (connection, seconds)."""
    started = time.monotonic()
    while True:
        try:
            ws = open_ws(node, token)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status not in refused:
                pytest.fail(f"{what}: refused with {status}, expected one of {refused}")
            if time.monotonic() - started > timeout:
                pytest.fail(f"{what}: not within {timeout}s")
            time.sleep(0.05)
            continue
        welcome = recv_json(ws)
        assert welcome["type"] == "welcome", welcome
        return ws, time.monotonic() - started


def ping(ws: ClientConnection, msg_id: str | int) -> dict[str, Any]:
    ws.send(json.dumps({"type": "ping", "id": msg_id}))
    return recv_json(ws)


def assert_pong(ws: ClientConnection, msg_id: str | int) -> None:
    reply = ping(ws, msg_id)
    assert reply["type"] == "pong", reply
    assert reply["id"] == msg_id


def chat(ws: ClientConnection, text: str, msg_id: str) -> dict[str, Any]:
    message = {"type": "chat", "text": text, "id": msg_id}
    ws.send(json.dumps(message))
    return message


def assert_silent(ws: ClientConnection, timeout: float = 0.3) -> None:
    """Nothing (more) arrives within *timeout*."""
    try:
        frame = ws.recv(timeout=timeout)
    except TimeoutError:
        return
    pytest.fail(f"unexpected frame: {frame!r}")


def close_code(ws: ClientConnection, timeout: float) -> int:
    """The close code the server sends within *timeout* (frames before it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws.recv(timeout=max(0.001, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                pytest.fail(f"closed without a close frame: {exc}")
            return exc.rcvd.code
        except TimeoutError:
            pytest.fail(f"the server did not close the connection within {timeout}s")


def events(node: RunningServer, name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in node.audit.events(name)
        if all(e.get(key) == value for key, value in match.items())
    ]


def wait_event(node: RunningServer, name: str, timeout: float = 5.0, **match: Any) -> None:
    wait_until(lambda: bool(events(node, name, **match)), timeout, f"audit event {name} {match}")


def served_events(served: Served, name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in served.audit_events()
        if e["event"] == name and all(e.get(key) == value for key, value in match.items())
    ]


def served_events_eventually(
    nodes: tuple[Served, ...], name: str, count: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The *name* events of all *nodes* once there are at least *count* of them.

    A served node writes its audit log from a background thread: a line can land
    a few milliseconds after the client saw the response it records.
    """
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = [e for node in nodes for e in served_events(node, name)]
        return len(found) >= count

    wait_until(enough, timeout, f"{count} {name} audit events")
    return found


def node_env(home: Path) -> dict[str, str]:
    """The environment of a ``wsguard`` subprocess of the cluster (conftest's SECRET)."""
    return cli_env(home, WSGUARD_JWT_SECRET=SECRET)


def wsguard_revoke(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``wsguard revoke`` command."""
    return subprocess.run(
        [WSGUARD, "revoke", *args],
        env=node_env(home),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def toml(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document of flat tables (JSON scalars and string lists are valid TOML)."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


ServeNode = Callable[[str, dict[str, dict[str, Any]]], Served]


@pytest.fixture
def serve_node(tmp_path: Path) -> Iterator[ServeNode]:
    """Start ``wsguard serve --store URI`` subprocesses; all are killed after the test."""
    started: list[Served] = []

    def start(store: str, sections: dict[str, dict[str, Any]]) -> Served:
        index = len(started)
        config = tmp_path / f"node-{index}.toml"
        config.write_text(toml(sections))
        served = Served(
            ["--config", str(config), "--port", "0", "--store", store],
            node_env(tmp_path),
            tmp_path / f"audit-{index}.jsonl",
        )
        started.append(served)
        served.wait_listening()
        return served

    yield start
    for served in started:
        served.kill()


def close_all(*connections: ClientConnection) -> None:
    for ws in connections:
        ws.close()
