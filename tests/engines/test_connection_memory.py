"""What an admitted connection keeps in memory (issue 3: memory per idle connection).

Properties of the engine's per-connection objects, checked on a live server:

* websockets' own attributes live in slots, so no instance carries a dict: CPython 3.11
  can switch a class's instances to unshared 1.6 KB dicts for good when many are created
  at once, which made the idle-memory figure swing by 1.3 KB between identical runs;
* the upgrade request (its headers, the bearer token among them) is dropped once the
  connection is admitted: it is neither needed nor worth keeping for hours;
* nothing of the handshake's own reading state stays with an open connection.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest

from conftest import RunningServer, eventually, make_token
from wsguard.engines.picows.handshake import HandshakeProtocol
from wsguard.engines.picows.listener import GuardListener
from wsguard.engines.websockets_impl import WebsocketsTransport


def engine_connections(server: RunningServer) -> list[Any]:
    """The engine's per-connection objects: websockets' connection, or the picows listener."""

    def collect() -> list[Any]:
        found: list[Any] = []
        for conn in server.app.connections.values():
            transport = conn.transport
            if isinstance(transport, GuardListener):
                found.append(transport)  # the listener is the Session's transport
            else:
                assert isinstance(transport, WebsocketsTransport)
                found.append(transport.ws)
        return found

    return list(server.call(collect))


def test_engine_connections_carry_no_instance_dict(server: RunningServer) -> None:
    clients = [server.connect(make_token(f"user-{n}")) for n in range(3)]
    for ws in clients:
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    connections = engine_connections(server)
    assert len(connections) == 3
    for engine in connections:
        leftover = getattr(engine, "__dict__", {})
        assert leftover == {}, f"attributes outside the slots: {sorted(leftover)}"
    for ws in clients:
        ws.close()


def test_the_upgrade_request_is_not_kept_after_admission(server: RunningServer) -> None:
    token = make_token("alice")
    client = server.connect(token, path="/?marker=1")
    assert json.loads(client.recv(timeout=5))["type"] == "welcome"
    (ws,) = engine_connections(server)
    if server.app.config.engine == "picows":
        assert ws.request is None  # the listener's parsed head is dropped once open
        kept = ws.transport.request  # picows keeps its parsed WSUpgradeRequest
        assert "authorization" not in kept.headers
        assert token not in str(kept.headers)
        assert b"marker" not in kept.path  # a query string may carry credentials too
    else:
        assert ws.response is None
        assert ws.request is not None  # websockets checks there is one
        assert "authorization" not in ws.request.headers
        assert token not in str(ws.request.headers)
    # the connection still works normally afterwards
    client.send(json.dumps({"type": "ping", "id": "p1"}))
    assert json.loads(client.recv(timeout=5))["type"] == "pong"
    client.close()


def test_no_request_object_keeps_the_token_after_admission(server: RunningServer) -> None:
    """websockets' parser generator keeps the upgrade Request alive in its frame for the
    connection's whole life; wsguard empties it once admitted (~2-3 KB per idle
    connection, and the bearer token no longer sits in memory for hours)."""
    import gc

    from websockets.http11 import Request

    token = make_token("bob")
    client = server.connect(token)
    assert json.loads(client.recv(timeout=5))["type"] == "welcome"
    mine = client.request  # the client's own copy of what it sent

    def holders() -> list[Request]:
        gc.collect()
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, Request) and o is not mine and token in str(o.headers)
        ]

    assert server.call(holders) == []
    client.send(json.dumps({"type": "ping", "id": "p1"}))
    assert json.loads(client.recv(timeout=5))["type"] == "pong"
    client.close()


def test_the_handshake_protocol_does_not_outlive_the_handshake(server: RunningServer) -> None:
    """picows engine: the protocol that read and decided the upgrade request is gone once
    picows has the connection (uvloop kept a plain protocol's ``data_received``, and with
    it the protocol, for the connection's life: ~150 bytes per idle connection)."""
    if server.app.config.engine != "picows":
        pytest.skip("the picows engine's handshake protocol")
    clients = [server.connect(make_token(f"user-{n}")) for n in range(3)]
    for ws in clients:
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"

    def handshakes_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, HandshakeProtocol))

    assert len(engine_connections(server)) == 3
    assert server.call(handshakes_alive) == 0
    for ws in clients:  # and the connections still work
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
        ws.close()


def test_an_ended_connection_leaves_nothing_for_the_garbage_collector(
    server: RunningServer,
) -> None:
    """An engine's per-connection objects refer to each other (picows: the listener,
    picows' transport and its view of the socket; websockets: the connection, its message
    queue's callbacks, the protocol's subprotocol selection); left in cycles, every ended
    connection would wait for the garbage collector (its pauses are every other client's
    latency), and one the server closed would be kept alive until its drop timer. Ended,
    they are freed at once, however the connection ended: the client's close, the
    server's close, a vanished client."""
    from picows import WSTransport
    from websockets.exceptions import ConnectionClosed

    from support.wire import reset_close
    from wsguard.engines.picows.socket_views import PicowsView
    from wsguard.engines.websockets_impl import GuardedServerConnection, GuardedServerProtocol
    from wsguard.session import Session

    audited = len(server.audit.events("connection_closed"))

    def connections() -> None:
        client = server.connect_welcomed(make_token("alice"))  # closed by the client
        client.send(json.dumps({"type": "ping", "id": "p1"}))
        assert json.loads(client.recv(timeout=5))["type"] == "pong"
        client.close()
        closed = server.connect_welcomed(make_token("bob"))  # closed by wsguard (1003)
        closed.send(b"binary")
        with pytest.raises(ConnectionClosed):
            closed.recv(timeout=5)
        assert closed.close_code == 1003
        vanished = server.connect_welcomed(make_token("carol"))  # the client resets TCP
        reset_close(vanished.socket)
        eventually(lambda: server.connection_count() == 0, what="all ended")
        eventually(
            lambda: len(server.audit.events("connection_closed")) == audited + 3, what="audited"
        )

    def garbage() -> list[str]:
        gc.collect()
        kinds = (GuardListener, WSTransport, PicowsView, Session, GuardedServerProtocol)
        # type(), not isinstance(): the garbage holds weak proxies of dead objects too
        return [
            type(o).__name__
            for o in gc.garbage
            if type(o) in kinds or issubclass(type(o), GuardedServerConnection)
        ]

    server.call(gc.collect)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        connections()
        left = server.call(garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
