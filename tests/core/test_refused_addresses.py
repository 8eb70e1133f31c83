"""An address refused for its handshake rate (or banned) is answered 429 at once while it
stays refused: from its peer address alone, before its request is parsed, counted in the
metrics but not written to the audit log once per attempt.

The policy part runs on a clock the test moves; the engines' part on real servers (both
engines) with a real client.
"""

from __future__ import annotations

import io
import socket
import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from conftest import (
    RunningServer,
    ServerFactory,
    eventually,
    make_config,
    make_token,
    status_of,
    upgrade_request,
)
from support.engine_garbage import engine_garbage, engine_objects_left
from support.wire import read_head, response_head
from wsguard.core.client_address import ClientAddressResolver, limit_key
from wsguard.core.refused import MAX_ADDRESSES, RECHECK_SECONDS, RefusedAddresses
from wsguard.guard import Guard
from wsguard.observability.audit import AuditLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused_addresses(trusted: list[str] | None = None) -> tuple[RefusedAddresses, Clock]:
    clock = Clock()
    resolver = ClientAddressResolver(trusted or [], header="x-forwarded-for")
    return RefusedAddresses(resolver, lambda a: limit_key(a, 64), clock), clock


def test_a_refused_address_is_answered_429_with_the_time_left_then_decided_again() -> None:
    refused, clock = refused_addresses()
    assert refused.early("192.0.2.7") is None
    refused.remember("192.0.2.7", "192.0.2.7", "handshake_rate", 2.5)
    assert refused.early("192.0.2.7") == (
        429,
        "handshake_rate",
        "Too many connection attempts.",
        (("Retry-After", "3"),),
    )
    assert refused.early("192.0.2.8") is None  # another address: the policy decides
    clock.now += 2.5
    assert refused.early("192.0.2.7") is None  # its allowance may be back: decided again
    assert len(refused) == 0


def test_a_ban_is_answered_from_memory_for_a_few_seconds_at_most() -> None:
    """Bans last minutes; other nodes may lift one (an operator's unban): memory answers
    for RECHECK_SECONDS at most, with the ban's real Retry-After, then the store decides."""
    refused, clock = refused_addresses()
    refused.remember("192.0.2.9", "192.0.2.9", "banned", 300)
    early = refused.early("192.0.2.9")
    assert early is not None
    assert early[:2] == (429, "banned") and early[3] == (("Retry-After", "300"),)
    clock.now += RECHECK_SECONDS
    assert refused.early("192.0.2.9") is None


def test_an_unban_on_this_node_is_seen_at_once() -> None:
    refused, _ = refused_addresses()
    refused.remember("192.0.2.9", "192.0.2.9", "banned", 300)
    refused.forget("192.0.2.9")
    assert refused.early("192.0.2.9") is None


def test_ipv6_addresses_are_refused_per_network_like_every_limit() -> None:
    refused, _ = refused_addresses()
    refused.remember("2001:db8::1", "2001:db8::1", "handshake_rate", 5)
    assert refused.early("2001:db8::2") is not None  # same /64
    assert refused.early("2001:db8:0:1::1") is None


def test_an_ipv4_client_of_a_dual_stack_listener_is_known_by_its_ipv4_address() -> None:
    """On a listener bound to ``::`` an IPv4 client's peer address is IPv4-mapped
    (``::ffff:192.0.2.7``); the policy refuses the client ``192.0.2.7``, and its next
    attempts are answered from memory like any other address's (not decided, and
    audited, again each time)."""
    refused, _ = refused_addresses()
    refused.remember("::ffff:192.0.2.7", "192.0.2.7", "handshake_rate", 2.5)
    early = refused.early("::ffff:192.0.2.7")
    assert early is not None and early[:2] == (429, "handshake_rate")
    assert refused.early("192.0.2.7") is not None
    assert limit_key("::ffff:192.0.2.7", 64) == limit_key("192.0.2.7", 64) == "192.0.2.7"


def test_clients_behind_a_trusted_proxy_are_never_answered_from_the_peer_address() -> None:
    """Behind a proxy the client is named by a header, which is not read before the answer:
    the proxy's address must not stand for all of its clients."""
    refused, _ = refused_addresses(trusted=["10.0.0.0/8"])
    refused.remember("10.0.0.1", "203.0.113.5", "handshake_rate", 5)  # via the proxy
    refused.remember("10.0.0.1", "10.0.0.1", "handshake_rate", 5)  # the proxy itself
    assert len(refused) == 0
    assert refused.early("10.0.0.1") is None


@pytest.mark.parametrize("reason", ["too_many_connections", "invalid_token"])
def test_only_rate_and_ban_refusals_are_remembered(reason: str) -> None:
    """Other refusals depend on the request (its token, the connections open now)."""
    refused, _ = refused_addresses()
    refused.remember("192.0.2.7", "192.0.2.7", reason, 5)
    assert refused.early("192.0.2.7") is None


def test_memory_is_bounded() -> None:
    refused, _ = refused_addresses()
    for i in range(MAX_ADDRESSES + 10):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        refused.remember(address, address, "handshake_rate", 5)
    assert len(refused) == MAX_ADDRESSES
    assert refused.early("10.0.0.0") is None  # the oldest went first
    assert refused.early("10.1.0.9") is not None


# -- on a real server ------------------------------------------------------------------


def refusal(server: RunningServer) -> InvalidStatus:
    try:
        ws = server.connect(make_token())
    except InvalidStatus as exc:
        return exc
    ws.close()
    pytest.fail("handshake unexpectedly admitted")


def metric(server: RunningServer, reason: str) -> int:
    guard: Any = server.app.guard
    return int(guard.monitor.metrics.handshakes.get(("refused", reason), 0))


def test_repeated_attempts_of_a_rate_limited_address_are_refused_unparsed_and_unaudited(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"limits": {"handshakes_per_minute": 2, "handshake_burst": 2}})
    for _ in range(2):
        with server.connect_welcomed():
            pass
    first = refusal(server)
    assert first.response.status_code == 429
    repeats = [refusal(server) for _ in range(5)]
    assert {r.response.status_code for r in repeats} == {429}
    for answer in (first, *repeats):
        assert 1 <= int(answer.response.headers["Retry-After"]) <= 30
    assert repeats[0].response.body == first.response.body  # the same answer
    # counted every time, audited once (the policy's decision), like a ban
    assert metric(server, "handshake_rate") == 6
    audited = [e for e in server.audit.events("handshake_refused")]
    assert [e["reason"] for e in audited] == ["handshake_rate"]
    assert len(server.audit.events("connection_admitted")) == 2


def test_a_repeated_attempt_leaves_no_engine_connection_for_the_garbage_collector(
    server_factory: ServerFactory,
) -> None:
    """An attempt answered from memory is cheap in objects too: under a flood of clients
    reconnecting as fast as they are refused, the garbage collector's pauses become the
    other users' latency. Neither engine builds its WebSocket connection for it, and
    nothing it made is left in a reference cycle (websockets' connection for each attempt
    left ~45 objects, its parser's exceptions and their tracebacks among them)."""
    server = server_factory({"limits": {"handshakes_per_minute": 1, "handshake_burst": 1}})
    with server.connect_welcomed():
        pass
    assert refusal(server).response.status_code == 429  # the policy's refusal

    # what the attempts so far (the admitted one, the policy's refusal) made is gone
    eventually(lambda: engine_objects_left(server) == 0, what="earlier connections gone")

    def attempts() -> None:
        for _ in range(20):  # raw sockets: the test's own client makes no objects
            head = response_head(server.port, upgrade_request(token=make_token()))
            assert status_of(head) == 429

    assert engine_garbage(server, attempts) == []


def test_a_refused_address_that_sends_nothing_is_dropped_at_the_handshake_timeout(
    server_factory: ServerFactory,
) -> None:
    """A socket from a refused address waits for its first bytes to be answered; one that
    sends none is a pending handshake like any other: bounded per address, dropped at
    ``limits.handshake_timeout_seconds`` and audited as a timeout."""
    server = server_factory(
        {
            "limits": {
                "handshakes_per_minute": 1,
                "handshake_burst": 1,
                "handshake_timeout_seconds": 1.0,
                "pending_handshakes_per_address": 1,
            }
        }
    )
    with server.connect_welcomed():
        pass
    assert refusal(server).response.status_code == 429
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        # the pending slot of this address is the silent socket's: a second is refused
        head = response_head(server.port, upgrade_request(token=make_token()))
        assert status_of(head) == 429
        eventually(lambda: "too_many_pending" in reasons(server))
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server, nothing written
        assert time.monotonic() - started < 8
    eventually(lambda: "handshake_timeout" in reasons(server))


def reasons(server: RunningServer) -> list[str]:
    return [e["reason"] for e in server.audit.events("handshake_refused")]


def test_a_socket_opened_while_refused_is_decided_at_its_first_bytes(
    server_factory: ServerFactory,
) -> None:
    """The answer is decided when the request arrives, not when the socket opened: a
    socket opened while its address was refused, whose request comes once the address's
    allowance is back, is decided by the policy like any other (here: admitted)."""
    server = server_factory({"limits": {"handshakes_per_minute": 60, "handshake_burst": 1}})
    with server.connect_welcomed():
        pass
    assert refusal(server).response.status_code == 429  # refused for about a second
    guard: Any = server.app.guard
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert server.call(lambda: guard.is_refused("127.0.0.1"))
        eventually(lambda: not server.call(lambda: guard.is_refused("127.0.0.1")), timeout=10)
        sock.sendall(upgrade_request(token=make_token()))
        assert status_of(read_head(sock)) == 101
    # audit lines are written by a background thread: the 101 may arrive first
    eventually(
        lambda: len(server.audit.events("connection_admitted")) == 2 or None,
        what="both admissions audited",
    )


def test_refusals_of_a_dual_stack_ipv4_client_count_under_one_address() -> None:
    """The same address, seen as ``::ffff:192.0.2.7`` by the engine (a refusal before
    the policy: a malformed request) and as ``192.0.2.7`` by the policy (its own
    refusal), is one offender for the per-address alerts and the dashboard, not two."""
    guard = Guard(make_config({}), audit=AuditLog(io.StringIO()))
    guard.record_raw_refusal(400, "bad_request", "::ffff:192.0.2.7")
    guard.monitor.handshake_refused("bad_origin", "192.0.2.7", 403)
    assert guard.monitor.offenders.top() == [("192.0.2.7", 2)]
