"""Engine-neutral behaviour of the App that the two engine adapters reach differently.

Every test here runs on both engines (``server_factory`` is parametrized): handlers that
are plain functions run inline, coroutine handlers run in a real task (``asyncio.timeout``
and ``current_task`` work), the order of messages is kept when a handler waits, and the
engine in use is the configured one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerFactory, eventually
from wsguard.engines import LISTEN_BACKLOG
from wsguard.hosts.app import App
from wsguard.session import Connection


def test_coroutine_handlers_run_in_a_task_and_keep_message_order(
    server_factory: ServerFactory,
) -> None:
    seen: list[str] = []

    def setup(app: App) -> None:
        @app.on("chat")
        async def chat(conn: Connection, message: dict[str, Any]) -> None:
            # asyncio.timeout needs a current task: a handler run outside one would fail
            assert asyncio.current_task() is not None
            async with asyncio.timeout(5):
                for _ in range(3):
                    await asyncio.sleep(0)  # really waits: later messages queue meanwhile
            seen.append(message["text"])
            conn.send({"type": "pong", "id": message["id"]})

        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:  # inline, no task
            seen.append(message["id"])
            conn.send({"type": "pong", "id": message["id"]})

    server = server_factory({"limits": {"message_burst": 100}}, demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        sent = []
        for n in range(20):
            if n % 3:
                sent.append(f"p{n}")
                ws.send(json.dumps({"type": "ping", "id": f"p{n}"}))
            else:
                sent.append(f"c{n}")
                ws.send(json.dumps({"type": "chat", "text": f"c{n}", "id": f"c{n}"}))
        replies = [json.loads(ws.recv(timeout=5))["id"] for _ in sent]
    assert replies == sent
    assert server.call(lambda: list(seen)) == sent


def test_a_failing_handler_answers_internal_error_on_both_kinds(
    server_factory: ServerFactory,
) -> None:
    def setup(app: App) -> None:
        @app.on("chat")
        async def chat(conn: Connection, message: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:
            raise RuntimeError("boom")

    server = server_factory(demo=False, setup=setup)
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "chat", "text": "x", "id": "c1"}))
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        errors = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
        assert [(e["code"], e["ref"]) for e in errors] == [
            ("internal_error", "c1"),
            ("internal_error", "p1"),
        ]
        assert "boom" not in json.dumps(errors)
        ws.send(json.dumps({"type": "ping", "id": "p2"}))  # the connection survives
        assert json.loads(ws.recv(timeout=5))["ref"] == "p2"


def test_handshake_decisions_are_paced_per_turn_of_the_event_loop(
    server_factory: ServerFactory, engine: str
) -> None:
    """A storm of handshakes whose requests arrive together is decided a few per turn of
    the event loop (the open connections' messages are handled in between), in order,
    and every one of them is decided."""
    if engine != "picows":
        pytest.skip("the websockets engine decides each handshake in its own task")
    from wsguard.engines.picows.server import _DECISIONS_PER_TURN

    server = server_factory()
    started: list[int] = []

    async def decide(i: int) -> None:
        started.append(i)

    def storm() -> list[int]:
        picows_server: Any = server.app._server
        for i in range(3 * _DECISIONS_PER_TURN + 1):
            picows_server.run(decide(i))
        return list(started)  # what was decided within this one callback

    assert server.call(storm) == list(range(_DECISIONS_PER_TURN))
    eventually(lambda: len(started) == 3 * _DECISIONS_PER_TURN + 1, what="every decision")
    assert started == list(range(3 * _DECISIONS_PER_TURN + 1))
    with server.connect_welcomed():  # and the server still admits
        pass


def test_the_configured_engine_serves(server_factory: ServerFactory, engine: str) -> None:
    server = server_factory()
    assert server.app.config.engine == engine
    module = type(server.app._server).__module__
    assert (
        module.startswith("wsguard.engines.picows")
        if engine == "picows"
        else module.endswith("asyncio.server")
    )
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": "x"}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"


def test_the_engine_stops_parsing_a_client_it_closes_and_half_closes_at_once(
    server_factory: ServerFactory,
) -> None:
    """After wsguard's close frame a flooding client costs nothing more: the server sends
    its FIN right after the close frame (the client reads the 1008, then EOF, before it
    has sent its own close), parses nothing the client still sends, and the connection
    ends once the client closes."""
    from conftest import make_token
    from support.wire import OP_TEXT, RawClient, frame

    server = server_factory({"limits": {"violation_budget": 3}})

    def received() -> list[int]:
        return list(
            server.call(lambda: [c.state.received for c in server.app.connections.values()])
        )

    with RawClient(server, make_token("flooder")) as client:
        assert client.read_frame()[0] == OP_TEXT  # the welcome
        garbage = frame(OP_TEXT, b'{"type":"ping","id":')  # truncated JSON: a violation
        client.send(garbage * 10)
        while True:  # error frames for the first violations, then the close frame
            opcode, payload = client.read_frame()
            if opcode == 0x8:
                break
        assert int.from_bytes(payload[:2], "big") == 1008
        at_close = received()
        assert len(at_close) == 1 and at_close[0] >= 4  # budget 3: the 4th violation closes
        # the client keeps flooding (its own close not sent): the server has already
        # half-closed, so the next read is the end of the stream
        client.send(garbage * 2000)
        client.sock.settimeout(5)
        assert client.sock.recv(65536) == b""
        closed = server.audit.events("connection_closed")
        assert closed == [], "the connection ends only when the client closes too"
        assert received() == at_close, "frames after the close frame were parsed"
        client.send(frame(0x8, (1000).to_bytes(2, "big")))
    eventually(lambda: server.audit.events("connection_closed"), what="connection_closed")
    (event,) = server.audit.events("connection_closed")
    assert (event["code"], event["closed_by"], event["cause"]) == (1008, "server", "invalid_json")


def test_a_flood_in_one_read_is_parsed_no_further_than_the_policy_needs(
    server_factory: ServerFactory, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client writing thousands of invalid frames at once costs a few dozen frame
    parses before the close, not one per frame it sent: the websockets engine hands a
    read to its (Python) frame parser in slices and stops at a full queue."""
    if engine != "websockets":
        pytest.skip("picows parses in C and hands each frame to the policy as it parses it")
    from conftest import make_token
    from support.wire import OP_TEXT, RawClient, frame
    from wsguard.engines.websockets_impl import GuardedServerProtocol

    parsed = [0]
    original = GuardedServerProtocol.recv_frame

    def counting(self: Any, frame: Any) -> None:
        parsed[0] += 1
        original(self, frame)

    monkeypatch.setattr(GuardedServerProtocol, "recv_frame", counting)
    server = server_factory({"limits": {"violation_budget": 3}})
    with RawClient(server, make_token("flooder")) as client:
        assert client.read_frame()[0] == OP_TEXT  # the welcome
        garbage = frame(OP_TEXT, b'{"type":"ping","id":')  # truncated JSON: a violation
        client.send(garbage * 2000)  # ~52 KB in one write
        while client.read_frame()[0] != 0x8:  # error frames, then the close frame
            pass
    eventually(lambda: server.audit.events("connection_closed"), what="connection_closed")
    (event,) = server.audit.events("connection_closed")
    assert (event["code"], event["closed_by"]) == (1008, "server")
    assert 4 <= server.call(lambda: parsed[0]) <= 100, parsed  # 4: the budget's 3, + 1


def test_a_client_flooding_past_its_close_is_not_read_any_more_and_is_dropped(
    server_factory: ServerFactory,
) -> None:
    """A client that keeps sending after wsguard's close frame (past 64 KiB) is flooding,
    not closing: the server stops reading it (each read costs a system call and a
    callback), and drops the connection at the close timeout; the close is audited."""
    import errno

    from conftest import make_token
    from support.wire import OP_TEXT, RawClient, frame

    server = server_factory({"limits": {"violation_budget": 1}})
    metrics: Any = server.app.guard.monitor.metrics
    with RawClient(server, make_token("flooder")) as client:
        assert client.read_frame()[0] == OP_TEXT  # the welcome
        garbage = frame(OP_TEXT, b'{"type":"ping","id":')  # truncated JSON: a violation
        client.send(garbage * 4)
        while client.read_frame()[0] != 0x8:  # error frames, then the close frame
            pass
        at_close = server.call(lambda: metrics.bytes_in)
        # flood 4 MiB more (never waiting for room: what the kernel takes is sent)
        client.sock.setblocking(False)
        chunk, sent = garbage * 2000, 0
        deadline = time.monotonic() + 5
        while sent < 4 << 20 and time.monotonic() < deadline:
            try:
                sent += client.sock.send(chunk)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break  # the server dropped the connection
                time.sleep(0.01)  # the socket buffers are full: the server is not reading
        read_after = server.call(lambda: metrics.bytes_in) - at_close
        assert read_after < 1 << 20, f"the server read {read_after} bytes after its close"
        eventually(lambda: server.audit.events("connection_closed"), timeout=15, what="the drop")
    (event,) = server.audit.events("connection_closed")
    assert (event["code"], event["closed_by"]) == (1008, "server")


def test_plain_handlers_create_no_task_per_message(
    server_factory: ServerFactory, engine: str
) -> None:
    """The fast path: a plain-function handler runs inline in the frame callback. On picows
    a message creates no task at all (the websockets engine reads in the connection's own
    task, one per connection, which is also not per message)."""
    created: list[int] = []

    def setup(app: App) -> None:
        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "pong", "id": message["id"]})

    roomy = {"message_burst": 1000, "subject_messages_per_minute": 100_000}
    server = server_factory({"limits": roomy}, demo=False, setup=setup)

    def count_tasks() -> int:
        return len(asyncio.all_tasks(server.loop))

    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": "warm"}))
        assert json.loads(ws.recv(timeout=5))["id"] == "warm"
        before = server.call(count_tasks)
        for n in range(200):
            ws.send(json.dumps({"type": "ping", "id": n}))
        replies = [json.loads(ws.recv(timeout=5))["id"] for _ in range(200)]
        created.append(server.call(count_tasks) - before)
    assert replies == list(range(200))
    if engine == "picows":
        assert created == [0]
    else:
        assert created[0] <= 1  # at most a writer that exists while frames are queued


def listen_queue(port: int) -> int:
    """The listen queue the kernel gave the listening socket on *port* (``ss``'s Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


def test_every_engine_asks_for_the_same_listen_queue(server_factory: ServerFactory) -> None:
    """Accepted connections waiting for the server: LISTEN_BACKLOG on every engine (the
    kernel lowers it to net.core.somaxconn), not asyncio's 100, which a reconnect storm
    overflows (the clients' SYNs are dropped and retried seconds later)."""
    server = server_factory({})
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_queue(server.port) == min(LISTEN_BACKLOG, somaxconn)
