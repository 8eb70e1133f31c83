"""Server heartbeats: pings keep coming while they are answered, an unanswered one closes
1011, whichever of ping interval and pong timeout is the shorter; and the picows engine's
timing wheel (:class:`~wsguard.engines.picows.server.HeartbeatWheel`), which touches only
the connections that are due, driven here by an injected clock.

The server tests run on both engines (``server_factory``); timing comes from the short
configured intervals, bounded by the raw client's socket timeout, never by sleeps. Pongs
are counted by the policy like pings: the one that answers the server's ping too, and a
flood of them (unsolicited, or the awaited one repeated) is closed 1008.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import RunningServer, ServerFactory, eventually, make_token
from support.wire import OP_CLOSE, OP_PING, OP_PONG, RawClient, frame, ping_frame
from wsguard.engines.picows.server import HeartbeatWheel

# -- the wheel ------------------------------------------------------------------------------


def test_wheel_gives_back_only_the_members_whose_tick_has_begun() -> None:
    wheel: HeartbeatWheel[str] = HeartbeatWheel(1.0)
    wheel.schedule("a", 10.2)  # tick 11: not before its due time
    wheel.schedule("b", 11.0)  # tick 11
    wheel.schedule("c", 12.5)  # tick 13
    assert wheel.pop_due(10.99) == []
    assert wheel.pop_due(11.0) == ["a", "b"]
    assert wheel.pop_due(12.9) == []
    assert wheel.pop_due(13.0) == ["c"]
    # given back, they stay members, in no bucket, until scheduled again
    assert sorted(wheel) == ["a", "b", "c"]
    assert not wheel.scheduled
    assert wheel.pop_due(100.0) == []


def test_wheel_gives_back_every_late_bucket_earliest_first() -> None:
    """A sweep that comes late (a busy loop) still finds every bucket that came due."""
    wheel: HeartbeatWheel[str] = HeartbeatWheel(0.5)
    for name, due in (("late", 3.0), ("early", 1.2), ("middle", 2.0), ("future", 9.0)):
        wheel.schedule(name, due)
    assert wheel.pop_due(5.0) == ["early", "middle", "late"]
    assert wheel.scheduled
    assert wheel.pop_due(9.0) == ["future"]


def test_wheel_moves_a_member_instead_of_keeping_it_twice() -> None:
    wheel: HeartbeatWheel[str] = HeartbeatWheel(1.0)
    wheel.schedule("a", 5.0)
    wheel.schedule("a", 8.0)
    assert len(wheel) == 1
    assert wheel.pop_due(7.0) == []
    assert wheel.pop_due(8.0) == ["a"]


def test_wheel_schedules_after_the_tick_being_swept() -> None:
    """Something due now (a late pong awaited) goes to the next tick, never to the one
    being swept: a sweep ends."""
    wheel: HeartbeatWheel[str] = HeartbeatWheel(1.0)
    wheel.schedule("a", 4.0)
    assert wheel.pop_due(4.3) == ["a"]
    wheel.schedule("a", 4.3, after=wheel.tick(4.3))
    assert wheel.pop_due(4.9) == []
    assert wheel.pop_due(5.0) == ["a"]


def test_wheel_forgets_removed_and_parked_members_at_once() -> None:
    """A closed connection leaves the wheel when it ends, not at its next tick; a closing
    one stays a member (a shutdown still reaches it) but is never due again."""
    wheel: HeartbeatWheel[str] = HeartbeatWheel(1.0)
    for name in ("gone", "closing", "open"):
        wheel.schedule(name, 3.0)
    wheel.remove("gone")
    wheel.remove("gone")  # twice: nothing happens
    wheel.park("closing")
    assert sorted(wheel) == ["closing", "open"]
    assert wheel.pop_due(3.0) == ["open"]
    wheel.remove("open")
    wheel.remove("closing")
    assert len(wheel) == 0
    assert not wheel.scheduled


# -- real servers ---------------------------------------------------------------------------

# interval shorter than the timeout, and longer: the wheel visits a connection at its next
# ping or at its pong deadline, whichever comes first
PERIODS = {
    "interval-shorter": {"ping_interval_seconds": 0.1, "ping_timeout_seconds": 1.0},
    "timeout-shorter": {"ping_interval_seconds": 0.3, "ping_timeout_seconds": 0.1},
}


def welcomed(server: RunningServer, name: str) -> RawClient:
    client = RawClient(server, make_token(name))
    assert client.recv_json()["type"] == "welcome"
    return client


@pytest.mark.parametrize("liveness", PERIODS.values(), ids=PERIODS.keys())
def test_pings_keep_coming_while_they_are_answered(
    server_factory: ServerFactory, liveness: dict[str, Any]
) -> None:
    server = server_factory({"liveness": liveness})
    with welcomed(server, "alive") as client:
        client.wait_pings(4)  # each answered: the next one still comes
        client.send(ping_frame("alive"))  # and the connection still serves messages
        reply = client.recv_json()
        assert (reply["type"], reply["id"]) == ("pong", "alive")


@pytest.mark.parametrize("liveness", PERIODS.values(), ids=PERIODS.keys())
def test_an_unanswered_ping_closes_1011(
    server_factory: ServerFactory, liveness: dict[str, Any]
) -> None:
    server = server_factory({"liveness": liveness})
    with welcomed(server, "deaf") as client:
        opcodes: list[int] = []
        payload = b""
        for _ in range(10):  # a ping, then the close (bounded by the socket's timeout)
            opcode, payload = client.read_frame()
            opcodes.append(opcode)
            if opcode == OP_CLOSE:
                break
        assert opcodes == [OP_PING, OP_CLOSE]
        assert int.from_bytes(payload[:2], "big") == 1011


def server_close(client: RawClient) -> int:
    """Read up to the server's close frame, answering nothing; its code."""
    for _ in range(1000):  # bounded by the frames a test can provoke
        opcode, payload = client.read_frame()
        if opcode == OP_CLOSE:
            return int.from_bytes(payload[:2], "big")
    raise AssertionError("no close frame")


def closed_cause(server: RunningServer) -> tuple[int, str]:
    [event] = eventually(lambda: server.audit.events("connection_closed"), what="the close")
    return event["code"], event["cause"]


def test_each_ping_carries_its_own_payload(server_factory: ServerFactory) -> None:
    """(8 bytes on picows, 4 on websockets: what answers it is the same bytes back.)"""
    server = server_factory({"liveness": PERIODS["interval-shorter"]})
    with welcomed(server, "payloads") as client:
        payloads: list[bytes] = []
        while len(payloads) < 3:
            opcode, payload = client.read_frame()
            assert opcode == OP_PING
            payloads.append(payload)
            client.send(frame(OP_PONG, payload))
        assert all(4 <= len(p) <= 8 for p in payloads)
        assert len(set(payloads)) == 3


def test_a_pong_that_does_not_answer_the_ping_closes_1011(server_factory: ServerFactory) -> None:
    """Only the ping's own payload answers it: other pongs leave it unanswered."""
    server = server_factory(
        {"liveness": {"ping_interval_seconds": 0.1, "ping_timeout_seconds": 0.3}}
    )
    with welcomed(server, "wrong-pong") as client:
        opcode, payload = client.read_frame()
        assert opcode == OP_PING
        client.send(frame(OP_PONG, bytes(8)) + frame(OP_PONG, payload[::-1] + b"x"))
        assert server_close(client) == 1011
    assert closed_cause(server) == (1011, "ping_timeout")


def test_the_awaited_pong_counts_toward_the_message_rate(server_factory: ServerFactory) -> None:
    """A burst of 3 messages a minute: three answered pings spend it."""
    server = server_factory(
        {
            "limits": {"messages_per_minute": 1, "message_burst": 3, "violation_budget": 50},
            "liveness": PERIODS["interval-shorter"],
        }
    )
    with welcomed(server, "pongs-counted") as client:
        client.wait_pings(3)  # each answered with its own payload
        client.send(ping_frame("over"))
        refused = client.recv_json()
        assert (refused["type"], refused["code"]) == ("error", "rate_limited")


@pytest.mark.parametrize("repeated", [False, True], ids=["unsolicited", "awaited-repeated"])
def test_a_pong_flood_closes_1008(server_factory: ServerFactory, repeated: bool) -> None:
    """Pongs nobody asked for are charged like pings, and so is the awaited pong sent
    again and again: only its first copy answers the ping."""
    server = server_factory(
        {
            "limits": {"messages_per_minute": 60, "message_burst": 5, "violation_budget": 3},
            "liveness": {"ping_interval_seconds": 0.1, "ping_timeout_seconds": 5.0},
        }
    )
    with welcomed(server, "pong-flood") as client:
        payload = b"unasked"
        if repeated:
            opcode, payload = client.read_frame()
            assert opcode == OP_PING
        client.send(frame(OP_PONG, payload) * 50)
        assert server_close(client) == 1008
    assert closed_cause(server) == (1008, "rate_limited")
