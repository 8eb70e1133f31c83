"""The engines on asyncio's own event loop.

`wsguard serve` and `App.run()` run uvloop for every engine, and so does the rest of the
suite; asyncio's own loop is what an app's ``await app.serve()`` may run in, and what the
server falls back to where uvloop is not installed. The parts of the engines that touch
the loop's transports (the hand-over of a socket from the protocol that accepted it, the
paused and resumed reads, the early answers) are checked here on that loop too.
"""

from __future__ import annotations

import asyncio
import json

from conftest import ServerFactory, eventually, make_token, status_of, upgrade_request
from support.engine_garbage import engine_garbage, engine_objects_left
from support.wire import OP_CLOSE, OP_TEXT, RawClient, frame, response_head


def test_the_server_runs_on_asyncios_own_loop(server_factory: ServerFactory) -> None:
    server = server_factory(asyncio_loop=True)
    assert type(server.loop) is type(asyncio.new_event_loop())
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": "p1"}))
        pong = json.loads(ws.recv(timeout=5))
        assert (pong["type"], pong["id"]) == ("pong", "p1")
        ws.send('{"type":"ping","id":')  # truncated JSON: an error frame, still open
        assert json.loads(ws.recv(timeout=5))["code"] == "invalid_json"
        ws.send(json.dumps({"type": "ping", "id": "p2"}))
        assert json.loads(ws.recv(timeout=5))["id"] == "p2"
    eventually(lambda: server.audit.events("connection_closed"), what="connection_closed")


def test_a_flood_of_invalid_frames_is_closed_on_asyncios_own_loop(
    server_factory: ServerFactory,
) -> None:
    """Reads paused while the handler catches up, then resumed: the policy's close
    comes, and the connection is audited once."""
    server = server_factory({"limits": {"violation_budget": 3}}, asyncio_loop=True)
    with RawClient(server, make_token("flooder")) as client:
        assert client.read_frame()[0] == OP_TEXT  # the welcome
        client.send(frame(OP_TEXT, b'{"type":"ping","id":') * 2000)
        while client.read_frame()[0] != OP_CLOSE:  # error frames, then the close frame
            pass
    eventually(lambda: server.audit.events("connection_closed"), what="connection_closed")
    (event,) = server.audit.events("connection_closed")
    assert (event["code"], event["closed_by"]) == (1008, "server")


def test_a_refused_address_is_answered_from_memory_on_asyncios_own_loop(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {"limits": {"handshakes_per_minute": 1, "handshake_burst": 1}}, asyncio_loop=True
    )
    with server.connect_welcomed():
        pass
    assert status_of(response_head(server.port, upgrade_request(token=make_token()))) == 429
    # what the attempts so far (the admitted one, the policy's refusal) made is gone
    eventually(lambda: engine_objects_left(server) == 0, what="earlier connections gone")

    def attempts() -> None:  # answered from memory: no engine connection, no exception
        for _ in range(10):
            head = response_head(server.port, upgrade_request(token=make_token()))
            assert status_of(head) == 429
            assert b"Retry-After: " in head

    assert engine_garbage(server, attempts) == []
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert reasons == ["handshake_rate"]  # the policy's refusal, once; the repeats from memory
