"""Non-auth handshake defences of the standalone server (issue 2).

Origin allowlist, client address behind trusted proxies, concurrency limits
(IPv6 clients keyed by their /64), slot release on every way a connection ends,
handshake rate, auth-failure bans (a foreign Origin is refused before either
counter), handshake timeout, malformed upgrades and their audit records. Every
test runs a real server on an ephemeral loopback port and drives it with real
WebSocket clients or raw sockets.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import (
    RunningServer,
    ServerFactory,
    make_config,
    make_token,
    raw_http,
    status_of,
    upgrade_request,
)
from support.wire import WS_HEADERS, raw_request, read_head, reset_close
from wsguard.core.client_address import limit_key
from wsguard.errors import ConfigError

BAD_TOKEN = make_token("mallory", secret="not-the-server-secret-but-long-enough-0123456789")
ADDR_KEY = "conn:addr:127.0.0.1"
POLL_INTERVAL = 0.02  # pause between two checks of a bounded poll, never a timing assumption
TRUSTED_LOCAL = {"proxy": {"trusted": ["127.0.0.0/8"]}}


# --------------------------------------------------------------------------- helpers


def poll_until(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "") -> None:
    """Re-check *predicate* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(POLL_INTERVAL)


def refused(server: RunningServer, token: str | None = None, **kwargs: Any) -> InvalidStatus:
    """Attempt a connection that must be refused before 101; return the refusal."""
    try:
        ws = server.connect(token, **kwargs)
    except InvalidStatus as exc:
        return exc
    ws.close()
    pytest.fail(f"handshake unexpectedly admitted ({kwargs})")


def status(exc: InvalidStatus) -> int:
    return exc.response.status_code


def retry_after(exc: InvalidStatus) -> int:
    value = exc.response.headers.get("Retry-After")
    assert value is not None, f"no Retry-After on {status(exc)}"
    assert value.isdigit(), f"Retry-After is not a number of seconds: {value!r}"
    return int(value)


def admitted(server: RunningServer, **kwargs: Any) -> bool:
    """True if the handshake gets 101 and the welcome frame; False on 403."""
    refusal: InvalidStatus | None = None
    try:
        ws = server.connect_welcomed(**kwargs)
    except InvalidStatus as exc:
        refusal = exc
    if refusal is not None:
        assert status(refusal) == 403, f"expected 101 or 403, got {status(refusal)}"
        return False
    ws.close()
    return True


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    data = json.loads(ws.recv(timeout=5))
    assert isinstance(data, dict)
    return data


def last_event(server: RunningServer, name: str) -> dict[str, Any]:
    events = server.audit.events(name)
    assert events, f"no {name} event in the audit log"
    return events[-1]


def ping(ws: ClientConnection, ident: str | int) -> dict[str, Any]:
    """Send a demo ping; return the server's answer (a pong or an error frame)."""
    ws.send(json.dumps({"type": "ping", "id": ident}))
    return recv_json(ws)


def assert_alive(ws: ClientConnection, ident: str) -> None:
    answer = ping(ws, ident)
    assert (answer["type"], answer["id"]) == ("pong", ident), answer


def xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


def admitted_client(server: RunningServer, headers: dict[str, str]) -> str:
    """Connect with *headers*, return the client address the audit log recorded."""
    with server.connect_welcomed(make_token(), headers=headers):
        client = last_event(server, "connection_admitted")["client"]
    assert isinstance(client, str)
    return client


@contextmanager
def raw_upgraded(server: RunningServer, token: str | None = None) -> Iterator[socket.socket]:
    """A raw socket that completed the handshake (101); closed by the caller or on exit."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(upgrade_request(token=token or make_token()))
        head = read_head(sock)
        assert status_of(head) == 101, head[:200]
        yield sock
    finally:
        sock.close()


def closed_by_server(sock: socket.socket) -> bytes:
    """Block (socket timeout applies) until the server closes; return what it sent."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# --------------------------------------------------------------------------- origin


def test_default_config_refuses_any_browser_origin_and_admits_absent_origin(
    server: RunningServer,
) -> None:
    for origin in ("https://app.example.com", "http://127.0.0.1", "null"):
        exc = refused(server, origin=origin)
        assert status(exc) == 403, origin
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert recv_json(ws)["type"] == "pong"


def test_absent_origin_refused_when_allow_missing_is_false(server_factory: ServerFactory) -> None:
    server = server_factory(
        {"origin": {"allowed": ["https://app.example.com"], "allow_missing": False}}
    )
    assert status(refused(server)) == 403
    assert last_event(server, "handshake_refused")["reason"] == "origin_forbidden"
    assert admitted(server, origin="https://app.example.com")


def test_exact_origin_allowlist_with_default_port_equivalence(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {"origin": {"allowed": ["https://app.example.com", "http://localhost:8080"]}}
    )
    cases = {
        "https://app.example.com": True,
        "https://app.example.com:443": True,
        "https://APP.example.com": True,
        "http://localhost:8080": True,
        "http://app.example.com": False,
        "https://app.example.com:8443": False,
        "wss://app.example.com": False,
        "http://localhost": False,
        "http://localhost:8081": False,
        "https://app.example.com.evil.com": False,
        "https://evil.com/https://app.example.com": False,
        "https://app.example.com@evil.com": False,
    }
    assert {o: admitted(server, origin=o) for o in cases} == cases


def test_allowlist_entry_with_explicit_default_port(server_factory: ServerFactory) -> None:
    server = server_factory({"origin": {"allowed": ["https://app.example.com:443"]}})
    cases = {
        "https://app.example.com": True,
        "https://app.example.com:443": True,
        "http://app.example.com:443": False,
        "https://app.example.com:444": False,
    }
    assert {o: admitted(server, origin=o) for o in cases} == cases


def test_wildcard_origin_matches_subdomains_by_parsing(server_factory: ServerFactory) -> None:
    server = server_factory({"origin": {"allowed": ["https://*.example.com"]}})
    cases = {
        "https://a.example.com": True,
        "https://x.y.example.com": True,
        "https://a.example.com:443": True,
        "https://example.com": False,
        "https://evilexample.com": False,
        "https://a.evilexample.com": False,
        "https://example.com.evil.com": False,
        "https://a.example.com.evil.com": False,
        "http://a.example.com": False,
        "https://a.example.com:8443": False,
        "https://.example.com": False,
    }
    assert {o: admitted(server, origin=o) for o in cases} == cases


def test_null_origin_refused_unless_listed(server_factory: ServerFactory) -> None:
    strict = server_factory({"origin": {"allowed": ["https://app.example.com"]}})
    assert status(refused(strict, origin="null")) == 403
    lenient = server_factory({"origin": {"allowed": ["null"]}})
    assert admitted(lenient, origin="null")
    assert not admitted(lenient, origin="https://app.example.com")


def test_two_origin_headers_are_refused(server_factory: ServerFactory) -> None:
    server = server_factory({"origin": {"allowed": ["https://app.example.com"]}})
    request = raw_request(
        "GET / HTTP/1.1",
        "Host: 127.0.0.1",
        *WS_HEADERS,
        f"Authorization: Bearer {make_token()}",
        "Origin: https://app.example.com",
        "Origin: https://evil.example.net",
    )
    assert status_of(raw_http(server.port, request)) == 403
    # the same request with one allowed Origin is admitted
    single = raw_request(
        "GET / HTTP/1.1",
        "Host: 127.0.0.1",
        *WS_HEADERS,
        f"Authorization: Bearer {make_token()}",
        "Origin: https://app.example.com",
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(single)
        assert status_of(read_head(sock)) == 101


@pytest.mark.parametrize(
    "allowed",
    [["https://*"], ["https://a.com/path"], ["https://a.*.com"], ["app.example.com"]],
)
def test_config_rejects_invalid_origin_entries(allowed: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"origin": {"allowed": allowed}})
    assert info.value.key == "origin.allowed"
    assert "origin.allowed" in str(info.value)


# --------------------------------------------------------------------------- client address


def test_forwarded_for_from_untrusted_peer_is_ignored(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"connections_per_address": 1}})
    with server.connect_welcomed(headers=xff("1.2.3.4")):
        admitted_event = last_event(server, "connection_admitted")
        assert admitted_event["client"] == "127.0.0.1"
        assert server.slots(ADDR_KEY) == 1
        assert server.slots("conn:addr:1.2.3.4") == 0
        # a different spoofed address does not buy a fresh quota
        exc = refused(server, headers=xff("5.6.7.8"))
        assert status(exc) == 429
        retry_after(exc)
        refusal = last_event(server, "handshake_refused")
        assert refusal["client"] == "127.0.0.1"
        assert "1.2.3.4" not in server.audit.getvalue()
        assert "5.6.7.8" not in server.audit.getvalue()


def test_forwarded_header_from_untrusted_peer_is_ignored(server_factory: ServerFactory) -> None:
    server = server_factory({"proxy": {"header": "forwarded"}})
    assert admitted_client(server, {"Forwarded": "for=5.6.7.8"}) == "127.0.0.1"


def test_trusted_proxy_right_most_untrusted_hop_is_the_client(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(TRUSTED_LOCAL)
    assert admitted_client(server, xff("9.9.9.9, 5.6.7.8")) == "5.6.7.8"
    assert admitted_client(server, xff("1.2.3.4")) == "1.2.3.4"
    # a trusted proxy hop on the right is skipped
    assert admitted_client(server, xff("9.9.9.9, 5.6.7.8, 127.0.0.2")) == "5.6.7.8"
    # no header from the trusted proxy: the proxy itself is the client
    assert admitted_client(server, {}) == "127.0.0.1"


def test_several_forwarded_for_lines_form_one_list(server_factory: ServerFactory) -> None:
    """A client-written line first, the proxy's appended line last: the last one wins."""
    server = server_factory(TRUSTED_LOCAL)
    request = raw_request(
        "GET / HTTP/1.1",
        "Host: 127.0.0.1",
        *WS_HEADERS,
        f"Authorization: Bearer {make_token()}",
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-For: 5.6.7.8",
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        assert status_of(read_head(sock)) == 101
        assert server.slots("conn:addr:5.6.7.8") == 1
        assert server.slots("conn:addr:6.6.6.6") == 0
        poll_until(lambda: bool(server.audit.events("connection_admitted")))
        assert last_event(server, "connection_admitted")["client"] == "5.6.7.8"


def test_trusted_networks_are_skipped_from_the_right(server_factory: ServerFactory) -> None:
    server = server_factory({"proxy": {"trusted": ["127.0.0.0/8", "5.6.7.0/24"]}})
    assert admitted_client(server, xff("9.9.9.9, 5.6.7.8")) == "9.9.9.9"
    assert admitted_client(server, xff("8.8.8.8, 9.9.9.9, 5.6.7.8")) == "9.9.9.9"


def test_forwarded_header_when_configured(server_factory: ServerFactory) -> None:
    server = server_factory({"proxy": {"trusted": ["127.0.0.0/8"], "header": "forwarded"}})
    assert admitted_client(server, {"Forwarded": "for=5.6.7.8"}) == "5.6.7.8"
    chain = 'for=9.9.9.9, for="5.6.7.8:4711";proto=https'
    assert admitted_client(server, {"Forwarded": chain}) == "5.6.7.8"
    assert admitted_client(server, {"Forwarded": 'for="[2001:db8::1]:4711"'}) == "2001:db8::1"
    # with proxy.header="forwarded", X-Forwarded-For is not read at all
    assert admitted_client(server, xff("1.2.3.4")) == "127.0.0.1"


@pytest.mark.parametrize("trusted", ["::ffff:127.0.0.1/128", "::ffff:127.0.0.0/104"])
def test_a_trusted_network_written_ipv4_mapped_trusts_those_ipv4_addresses(
    server_factory: ServerFactory, trusted: str
) -> None:
    """Peers and hops are matched as IPv4 (an IPv4 client of a dual-stack listener comes as
    ``::ffff:...``): a mapped network trusted nothing, so the proxy's own address took
    every client's limits and bans."""
    server = server_factory({"proxy": {"trusted": [trusted]}})
    assert admitted_client(server, xff("5.6.7.8")) == "5.6.7.8"


def test_an_ipv6_zone_in_a_forwarded_address_is_no_part_of_it(
    server_factory: ServerFactory,
) -> None:
    """A zone (``%eth0``) names an interface of the host that wrote it: the address is the
    same without it, for the limits and bans, the audit log and the gateway's header."""
    server = server_factory(TRUSTED_LOCAL)
    assert admitted_client(server, xff("2001:db8::9%zz")) == "2001:db8::9"
    assert admitted_client(server, xff("[fe80::1%eth0]:7")) == "fe80::1"
    assert limit_key("2001:db8::1%a", 128) == limit_key("2001:db8::1%b", 128) == "2001:db8::1"


def test_per_address_limit_applies_to_forwarded_address(server_factory: ServerFactory) -> None:
    server = server_factory({**TRUSTED_LOCAL, "limits": {"connections_per_address": 1}})
    with server.connect_welcomed(headers=xff("5.6.7.8")):
        assert server.slots("conn:addr:5.6.7.8") == 1
        assert server.slots(ADDR_KEY) == 0
        exc = refused(server, headers=xff("5.6.7.8"))
        assert status(exc) == 429
        retry_after(exc)
        assert last_event(server, "handshake_refused")["client"] == "5.6.7.8"
        with server.connect_welcomed(headers=xff("5.6.7.9")):
            assert server.slots("conn:addr:5.6.7.9") == 1
    poll_until(lambda: server.slots("conn:all") == 0, what="all slots released")


# --------------------------------------------------------------------------- concurrency


def test_per_address_concurrency_limit(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"connections_per_address": 2}})
    first = server.connect_welcomed(make_token("alice"))
    with server.connect_welcomed(make_token("bob")):
        exc = refused(server, make_token("carol"))
        assert status(exc) == 429
        assert retry_after(exc) >= 1
        refusal = last_event(server, "handshake_refused")
        assert refusal["reason"] == "too_many_connections"
        assert refusal["status"] == 429
        first.close()
        poll_until(lambda: server.slots(ADDR_KEY) == 1, what="slot of the closed connection")
        with server.connect_welcomed(make_token("carol")) as third:
            third.send(json.dumps({"type": "ping", "id": "x"}))
            assert recv_json(third)["id"] == "x"


def test_per_subject_concurrency_limit_across_addresses(server_factory: ServerFactory) -> None:
    server = server_factory({**TRUSTED_LOCAL, "limits": {"connections_per_subject": 2}})
    with (
        server.connect_welcomed(make_token("alice"), headers=xff("5.6.7.1")),
        server.connect_welcomed(make_token("alice"), headers=xff("5.6.7.2")),
    ):
        exc = refused(server, make_token("alice"), headers=xff("5.6.7.3"))
        assert status(exc) == 429
        retry_after(exc)
        refusal = last_event(server, "handshake_refused")
        assert refusal["reason"] == "too_many_connections"
        assert refusal["subject"] == "alice"
        assert refusal["client"] == "5.6.7.3"
        # the refused attempt holds no slot of any kind
        assert server.slots("conn:addr:5.6.7.3") == 0
        assert server.slots("conn:sub:alice") == 2
        assert server.slots("conn:all") == 2
        # another subject from the same address is admitted
        with server.connect_welcomed(make_token("bob"), headers=xff("5.6.7.3")):
            pass


def test_global_connection_cap_answers_503(server_factory: ServerFactory) -> None:
    server = server_factory({**TRUSTED_LOCAL, "limits": {"max_connections": 2}})
    with (
        server.connect_welcomed(make_token("a"), headers=xff("10.0.0.1")),
        server.connect_welcomed(make_token("b"), headers=xff("10.0.0.2")),
    ):
        exc = refused(server, make_token("c"), headers=xff("10.0.0.3"))
        assert status(exc) == 503
        refusal = last_event(server, "handshake_refused")
        assert (refusal["status"], refusal["reason"]) == (503, "server_full")
        assert server.slots("conn:addr:10.0.0.3") == 0
        assert server.slots("conn:sub:c") == 0
    poll_until(lambda: server.slots("conn:all") == 0, what="global slots released")
    with server.connect_welcomed(make_token("c"), headers=xff("10.0.0.3")):
        pass


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
        ("2001:db8:1:2::1", "2001:db8:1:2::1", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("2001:db8:1:2::1", "2001:db8:2:2::1", False),
        ("[2001:db8:1:2::7]:443", "2001:db8:1:2::8", True),
        ("198.51.100.1", "198.51.100.2", False),
        ("198.51.100.1", "198.51.100.1", True),
    ],
)
def test_limit_key_groups_ipv6_by_slash64(a: str, b: str, shared: bool) -> None:
    assert (limit_key(a, 64) == limit_key(b, 64)) is shared


def test_limit_key_values() -> None:
    assert limit_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64) == "2001:db8:1:2::/64"
    assert limit_key("203.0.113.9", 64) == "203.0.113.9"
    # a configured /128 keys by the full address
    assert limit_key("2001:db8:1:2::1", 128) != limit_key("2001:db8:1:2::2", 128)


def test_guard_address_keys_are_remembered_and_stay_right() -> None:
    """Guard.address_key remembers each address's key: asked again (and past the number
    it remembers) it gives the same keys, and an address that is not one still raises."""
    import io

    from wsguard.guard import _ADDRESS_KEYS, Guard
    from wsguard.observability.audit import AuditLog

    guard = Guard(
        make_config({"limits": {"ipv6_prefix_length": 48}}), audit=AuditLog(io.StringIO())
    )
    for _ in range(2):
        assert guard.address_key("2001:db8:1:2::9") == "2001:db8:1::/48"
        assert guard.address_key("[2001:db8:1:3::1]:443") == "2001:db8:1::/48"
        assert guard.address_key("203.0.113.9") == "203.0.113.9"
        assert guard.address_key("2001:db8:1::/48") == "2001:db8:1::/48"  # a key is its own
        for wrong in ("not-an-address", "10.0.0.0/8", ""):
            with pytest.raises(ValueError):
                guard.address_key(wrong)
    for n in range(_ADDRESS_KEYS + 10):  # more addresses than it keeps at a time
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert guard.address_key(address) == address
    assert guard.address_key("2001:db8:1:2::9") == "2001:db8:1::/48"


def test_ipv6_clients_in_one_slash64_share_the_per_address_limit(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({**TRUSTED_LOCAL, "limits": {"connections_per_address": 1}})
    first, neighbour, elsewhere = "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"
    with server.connect_welcomed(make_token("a"), headers=xff(first)) as ws_a:
        assert last_event(server, "connection_admitted")["client"] == first
        assert server.slots("conn:addr:2001:db8:1:2::/64") == 1
        exc = refused(server, make_token("b"), headers=xff(neighbour))
        assert status(exc) == 429
        refusal = last_event(server, "handshake_refused")
        assert (refusal["reason"], refusal["client"]) == ("too_many_connections", neighbour)
        # the next /64 has its own quota
        with server.connect_welcomed(make_token("c"), headers=xff(elsewhere)) as ws_c:
            assert server.slots("conn:addr:2001:db8:1:3::/64") == 1
            assert_alive(ws_c, "other-64")
        assert_alive(ws_a, "first")
    poll_until(lambda: server.slots("conn:addr:2001:db8:1:2::/64") == 0, what="slot released")
    with server.connect_welcomed(make_token("b"), headers=xff(neighbour)):
        assert last_event(server, "connection_admitted")["client"] == neighbour


# --------------------------------------------------------------------------- slot release

RELEASE_CONFIG: dict[str, Any] = {
    "limits": {
        "connections_per_address": 2,
        "handshakes_per_minute": 10_000,
        "auth_failures_before_ban": 10_000,
    }
}


def assert_slots_released(server: RunningServer) -> None:
    poll_until(lambda: server.slots(ADDR_KEY) == 0, what=f"{ADDR_KEY} back to 0")
    assert server.slots("conn:all") == 0
    poll_until(lambda: server.connection_count() == 0, what="no live connection")


def test_clean_close_releases_slots(server_factory: ServerFactory) -> None:
    server = server_factory(RELEASE_CONFIG)
    for _ in range(30):
        with server.connect_welcomed():
            pass
    assert_slots_released(server)
    assert server.slots("conn:sub:alice") == 0
    with server.connect_welcomed():
        pass
    poll_until(
        lambda: len(server.audit.events("connection_closed")) == 31,
        what="31 connection_closed events",
    )


def test_abrupt_tcp_close_releases_slots(server_factory: ServerFactory) -> None:
    server = server_factory(RELEASE_CONFIG)
    for i in range(30):
        with raw_upgraded(server) as sock:
            if i % 2:
                reset_close(sock)  # RST
            # else: plain close() on exit: FIN without a close frame
        poll_until(lambda: server.slots(ADDR_KEY) == 0, what=f"slot released after abort {i}")
    assert_slots_released(server)
    with server.connect_welcomed():
        pass


def test_client_library_socket_close_releases_slots(server_factory: ServerFactory) -> None:
    server = server_factory(RELEASE_CONFIG)
    for i in range(10):
        ws = server.connect_welcomed()
        ws.socket.shutdown(socket.SHUT_RDWR)
        ws.socket.close()
        ws.close_socket()
        poll_until(lambda: server.slots(ADDR_KEY) == 0, what=f"slot released after close {i}")
    assert_slots_released(server)
    with server.connect_welcomed():
        pass


def test_refused_handshakes_in_between_release_slots(server_factory: ServerFactory) -> None:
    server = server_factory(RELEASE_CONFIG)
    for _ in range(15):
        with server.connect_welcomed():
            assert status(refused(server, BAD_TOKEN)) == 401
            assert status(refused(server, origin="https://evil.example")) == 403
            assert raw_http(server.port, upgrade_request(host=None)).startswith(b"HTTP/1.1 400")
            assert server.slots(ADDR_KEY) == 1
        with raw_upgraded(server) as sock:
            reset_close(sock)
    assert_slots_released(server)
    with server.connect_welcomed():
        pass


def test_client_that_vanishes_after_handshake_releases_slots(
    server_factory: ServerFactory,
) -> None:
    """A peer that completes the handshake then goes silent (never answers pings)."""
    server = server_factory(
        {
            **RELEASE_CONFIG,
            "liveness": {"ping_interval_seconds": 0.2, "ping_timeout_seconds": 0.3},
        }
    )
    with ExitStack() as stack:
        silent = [stack.enter_context(raw_upgraded(server)) for _ in range(2)]
        assert server.slots(ADDR_KEY) == 2
        assert status(refused(server)) == 429
        # the server gives up on both silent peers and frees their slots while
        # their sockets are still open on our side
        poll_until(lambda: server.slots(ADDR_KEY) == 0, timeout=10, what="silent peers dropped")
        for sock in silent:
            sock.settimeout(5)
            closed_by_server(sock)
    poll_until(lambda: len(server.audit.events("connection_closed")) == 2, what="close records")
    codes = {e["code"] for e in server.audit.events("connection_closed")}
    assert codes <= {1006, 1011}, codes  # abnormal closure / keepalive timeout, never 1000
    assert_slots_released(server)
    with server.connect_welcomed():
        pass


# --------------------------------------------------------------------------- handshake rate


def test_handshake_rate_limit_applies_even_with_valid_tokens(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"limits": {"handshakes_per_minute": 3}})
    for _ in range(3):
        with server.connect_welcomed():
            pass
    exc = refused(server, make_token())
    assert status(exc) == 429
    assert 1 <= retry_after(exc) <= 60
    refusal = last_event(server, "handshake_refused")
    assert (refusal["status"], refusal["reason"], refusal["client"]) == (
        429,
        "handshake_rate",
        "127.0.0.1",
    )
    assert len(server.audit.events("connection_admitted")) == 3


# --------------------------------------------------------------------------- bans

BAN_CONFIG: dict[str, Any] = {
    "limits": {
        "auth_failures_before_ban": 3,
        "ban_seconds": 2,
        "handshakes_per_minute": 10_000,
    }
}


def fail_auth_until_banned(server: RunningServer, threshold: int) -> None:
    """Fail authentication *threshold* times (each 401); then the address is banned."""
    for i in range(threshold):
        exc = refused(server, BAD_TOKEN)
        assert status(exc) == 401, f"failure {i + 1} got {status(exc)}"
        assert exc.response.headers["WWW-Authenticate"].startswith("Bearer")


def wait_until_admitted(server: RunningServer, timeout: float) -> float:
    """Bounded poll of real connection attempts until one is admitted; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        refusal: InvalidStatus | None = None
        try:
            ws = server.connect_welcomed(make_token())
        except InvalidStatus as exc:
            refusal = exc
        if refusal is None:
            ws.close()
            return time.monotonic()
        assert status(refusal) == 429, status(refusal)
        assert refusal.response.body == b"Too many failed attempts.\n"
        if time.monotonic() > deadline:
            pytest.fail(f"still banned after {timeout}s")
        time.sleep(POLL_INTERVAL * 5)


def test_auth_failure_ban_refuses_valid_tokens_and_is_logged_once(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(BAN_CONFIG)
    fail_auth_until_banned(server, 3)
    exc = refused(server, make_token())
    assert status(exc) == 429
    assert 1 <= retry_after(exc) <= 2
    assert exc.response.body == b"Too many failed attempts.\n"
    for token in (make_token(), BAD_TOKEN, make_token("bob"), BAD_TOKEN):
        assert status(refused(server, token)) == 429
    # logged once per ban, not once per attempt
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert "banned" not in reasons
    bans = server.audit.events("ban_started")
    assert len(bans) == 1, bans
    assert bans[0]["client"] == "127.0.0.1"
    assert bans[0]["seconds"] == 2
    assert server.audit.events("connection_admitted") == []


def test_ban_expires_and_grows(server_factory: ServerFactory) -> None:
    server = server_factory(BAN_CONFIG)
    fail_auth_until_banned(server, 3)
    banned_at = time.monotonic()
    assert status(refused(server, make_token())) == 429
    lifted_at = wait_until_admitted(server, timeout=6)
    assert lifted_at - banned_at >= 1.0  # the ban really held for about ban_seconds
    assert len(server.audit.events("ban_started")) == 1
    # a second round of failures: a longer ban
    fail_auth_until_banned(server, 3)
    exc = refused(server, make_token())
    assert status(exc) == 429
    assert retry_after(exc) > 2
    bans = server.audit.events("ban_started")
    assert len(bans) == 2, bans
    assert bans[1]["seconds"] > bans[0]["seconds"]


def test_first_failures_before_threshold_do_not_ban(server_factory: ServerFactory) -> None:
    server = server_factory(BAN_CONFIG)
    fail_auth_until_banned(server, 2)
    with server.connect_welcomed():
        pass
    assert server.audit.events("ban_started") == []


# --------------------------------------------------------------------------- origin first


APP_ORIGIN = "https://app.example.com"
EVIL_ORIGIN = "https://evil.example.net"


def foreign_origin_barrage(server: RunningServer, count: int) -> None:
    """*count* handshakes from a hostile page: every credential shape, all refused 403.

    The browser sends the victim's cookie along (valid), the page adds garbage of its own
    (a bad bearer token, a bad cookie) or nothing at all.
    """
    victim = make_token("victim")
    for i in range(count):
        kind = i % 4
        if kind == 0:
            exc = refused(server, victim, transport="cookie", origin=EVIL_ORIGIN)
        elif kind == 1:
            exc = refused(server, BAD_TOKEN, transport="cookie", origin=EVIL_ORIGIN)
        elif kind == 2:
            exc = refused(server, BAD_TOKEN, origin=EVIL_ORIGIN)
        else:
            response = raw_http(server.port, upgrade_request(headers={"Origin": EVIL_ORIGIN}))
            assert status_of(response) == 403, response[:200]
            continue
        assert status(exc) == 403, (kind, status(exc))
    reasons = {e["reason"] for e in server.audit.events("handshake_refused")}
    assert reasons == {"origin_forbidden"}, reasons
    assert server.audit.events("ban_started") == []


ORIGIN_FIRST: dict[str, Any] = {
    "auth": {"cookie": True},
    "origin": {"allowed": [APP_ORIGIN]},
}


def test_foreign_origin_refusals_do_not_spend_the_handshake_rate(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({**ORIGIN_FIRST, "limits": {"handshakes_per_minute": 3}})
    foreign_origin_barrage(server, 20)
    # the whole budget of 3 is still there for the victim's own page ...
    for i in range(3):
        with server.connect_welcomed(make_token("victim"), transport="cookie", origin=APP_ORIGIN):
            pass
        assert len(server.audit.events("connection_admitted")) == i + 1
    # ... and the limit is real: the fourth allowed handshake is over it
    exc = refused(server, make_token("victim"), transport="cookie", origin=APP_ORIGIN)
    assert status(exc) == 429
    assert last_event(server, "handshake_refused")["reason"] == "handshake_rate"


def test_foreign_origin_refusals_do_not_count_toward_an_address_ban(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {**ORIGIN_FIRST, "limits": {"auth_failures_before_ban": 2, "handshakes_per_minute": 1000}}
    )
    foreign_origin_barrage(server, 20)
    with server.connect_welcomed(make_token("victim"), transport="cookie", origin=APP_ORIGIN) as ws:
        assert_alive(ws, "after-barrage")
    # the failure count is still zero: the first real failure does not ban ...
    assert status(refused(server, BAD_TOKEN, origin=APP_ORIGIN)) == 401
    assert server.audit.events("ban_started") == []
    # ... the second one (the configured threshold) does
    assert status(refused(server, BAD_TOKEN, origin=APP_ORIGIN)) == 401
    assert len(server.audit.events("ban_started")) == 1
    banned = refused(server, make_token("victim"), transport="cookie", origin=APP_ORIGIN)
    assert status(banned) == 429


# --------------------------------------------------------------------------- handshake timeout


@pytest.fixture
def quick_timeout_server(server_factory: ServerFactory) -> RunningServer:
    return server_factory({"limits": {"handshake_timeout_seconds": 1}})


@pytest.mark.parametrize(
    "partial",
    [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n", b"GET / HT"],
    ids=["nothing", "half-headers", "half-request-line"],
)
def test_handshake_timeout_disconnects_idle_client(
    quick_timeout_server: RunningServer, partial: bytes
) -> None:
    server = quick_timeout_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        if partial:
            sock.sendall(partial)
        started = time.monotonic()
        try:
            closed_by_server(sock)
        except TimeoutError:
            pytest.fail("server kept a silent client past its handshake timeout")
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 4, elapsed
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert recv_json(ws)["type"] == "pong"


def test_handshake_timeout_disconnects_slow_drip_client(
    quick_timeout_server: RunningServer,
) -> None:
    """Slowloris: one header line at a time, each well within any per-read timeout."""
    server = quick_timeout_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.settimeout(0.2)  # the pace of the drip: wait for the server to close
        closed = False
        for i in range(50):
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                try:
                    sock.sendall(f"X-Drip-{i}: a\r\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, "server kept a slow-drip client open"
    assert elapsed < 4, elapsed
    with server.connect_welcomed():
        pass


# --------------------------------------------------------------------------- malformed upgrades

MALFORMED: list[tuple[str, bytes, set[int]]] = [
    ("missing Host", upgrade_request(host=None), {400}),
    ("empty Host", upgrade_request(host=""), {400}),
    ("blank Host", upgrade_request(host="   "), {400}),
    ("Host with a space", upgrade_request(host="a b"), {400}),
    ("Host with userinfo", upgrade_request(host="evil@127.0.0.1"), {400}),
    ("Host with a path", upgrade_request(host="127.0.0.1/x"), {400}),
    (
        "two Host headers",
        raw_request("GET / HTTP/1.1", "Host: 127.0.0.1", "Host: evil.example", *WS_HEADERS),
        {400},
    ),
    ("target *", upgrade_request("*"), {400}),
    ("absolute-form target", upgrade_request("http://x/"), {400}),
    ("scheme-relative target", upgrade_request("//evil.example/"), {400}),
    ("control char in target", upgrade_request("/a\x01b"), {400}),
    ("DEL in target", upgrade_request("/a\x7fb"), {400}),
    ("plain GET", raw_request("GET / HTTP/1.1", "Host: 127.0.0.1"), {426}),
    (
        "Upgrade without Connection",
        raw_request(
            "GET / HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ),
        {426},
    ),
    (
        "missing Sec-WebSocket-Key",
        raw_request(
            "GET / HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
        ),
        {400},
    ),
    ("20 KB header line", upgrade_request(headers={"X-Big": "a" * 20_000}), {400, 431}),
    ("20 KB request target", upgrade_request("/" + "a" * 20_000), {400, 414, 431}),
    (
        "200 headers",
        upgrade_request(headers={f"X-H{i}": "v" for i in range(200)}),
        {400, 431},
    ),
]


def test_malformed_upgrades_get_4xx(server: RunningServer) -> None:
    got = {name: status_of(raw_http(server.port, request)) for name, request, _ in MALFORMED}
    expected = {name: statuses for name, _, statuses in MALFORMED}
    wrong = {name: got[name] for name in got if got[name] not in expected[name]}
    assert wrong == {}, f"unexpected statuses (expected {expected})"
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert recv_json(ws)["type"] == "pong"


def test_wrong_websocket_version_gets_426_with_supported_version(server: RunningServer) -> None:
    response = raw_http(
        server.port,
        upgrade_request(headers={"Sec-WebSocket-Version": "8"}, token=make_token()),
    )
    assert status_of(response) == 426
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nsec-websocket-version: 13" in head
    refusal = last_event(server, "handshake_refused")
    assert (refusal["status"], refusal["reason"]) == (426, "unsupported_version")


def test_plain_get_gets_426_with_upgrade_header(server: RunningServer) -> None:
    response = raw_http(server.port, raw_request("GET / HTTP/1.1", "Host: 127.0.0.1"))
    assert status_of(response) == 426
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nupgrade: websocket" in head


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send *data*, read until the server closes; fail if it is still open after *timeout*."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            return closed_by_server(sock)
        except TimeoutError:
            pytest.fail(f"server neither answered nor closed within {timeout}s")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\r\n\r\n",
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    ],
    ids=["nul-ff", "empty-lines", "short-line", "bad-version", "bad-header", "tls-client-hello"],
)
def test_garbage_bytes_are_refused_and_server_survives(
    quick_timeout_server: RunningServer, garbage: bytes
) -> None:
    server = quick_timeout_server
    response = exchange(server.port, garbage)
    # refused with a 4xx, or the connection simply closed; never a 101 or a 5xx
    assert response == b"" or 400 <= status_of(response) < 500, response[:200]
    assert server.connection_count() == 0
    assert server.slots("conn:all") == 0
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 3}))
        assert recv_json(ws)["id"] == 3


def test_non_get_method_is_refused_without_taking_a_slot(server: RunningServer) -> None:
    for method in ("POST", "PUT", "CONNECT"):
        request = upgrade_request(token=make_token()).replace(b"GET ", method.encode() + b" ", 1)
        response = raw_http(server.port, request)
        assert 400 <= status_of(response) < 500, (method, response[:200])
    assert server.audit.events("connection_admitted") == []
    poll_until(lambda: server.slots(ADDR_KEY) == 0, what="no slot kept by non-GET requests")
    assert server.slots("conn:all") == 0
    with server.connect_welcomed():
        pass


def test_many_malformed_upgrades_do_not_stall_the_server(server_factory: ServerFactory) -> None:
    """Open many half-sent requests at once; a normal client is still served promptly."""
    server = server_factory({"limits": {"pending_handshakes_per_address": 50}})
    with ExitStack() as stack:
        for _ in range(20):
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", server.port), timeout=5)
            )
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        with server.connect_welcomed() as ws:
            ws.send(json.dumps({"type": "ping", "id": 2}))
            assert recv_json(ws)["id"] == 2
        assert time.monotonic() - started < 2


def test_pending_handshakes_per_address_are_capped(server_factory: ServerFactory) -> None:
    """Slowloris: connections still sending their request are limited per peer."""
    server = server_factory({"limits": {"pending_handshakes_per_address": 3}})
    with ExitStack() as stack:
        for _ in range(3):
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", server.port), timeout=5)
            )
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        response = raw_http(server.port, upgrade_request(token=make_token()))
        assert status_of(response) == 429
        assert b"\r\nRetry-After: 1\r\n" in response
    # once those are gone, the address is served again
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if status_of(raw_http(server.port, upgrade_request(token=make_token()))) == 101:
            break
        time.sleep(0.02)  # bounded poll until the server has seen the sockets close
    else:
        pytest.fail("address still refused after its pending handshakes closed")
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert "too_many_pending" in reasons


def test_request_head_size_is_capped(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"max_header_bytes": 2048}})
    many = {f"X-H{i}": "v" * 40 for i in range(60)}  # ~3 KB in lines well under 8 KiB each
    response = raw_http(server.port, upgrade_request(headers=many, token=make_token()))
    assert status_of(response) == 431
    with server.connect_welcomed() as ws:
        ws.send(json.dumps({"type": "ping", "id": 3}))
        assert recv_json(ws)["id"] == 3


@pytest.mark.parametrize(
    "line",
    [b"X-No-Colon", b"Bad Name: v", b"X-Ctl: a\x01b", b" folded", b"X-\x80: v"],
    ids=["no-colon", "space-in-name", "control-in-value", "obs-fold", "non-ascii-name"],
)
def test_malformed_header_lines_get_400(server: RunningServer, line: bytes) -> None:
    request = upgrade_request(token=make_token()).replace(
        b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n", 1
    )
    assert status_of(raw_http(server.port, request)) == 400


@pytest.mark.parametrize(
    ("ending", "message"),
    [
        ("every-line", b"Malformed HTTP request line."),
        ("header-lines", b"Malformed HTTP header."),
        ("blank-line", b"Malformed HTTP header."),
    ],
)
def test_a_head_with_bare_lf_line_ends_is_answered_400_at_once(
    server_factory: ServerFactory, ending: str, message: bytes
) -> None:
    """A head whose lines end with a bare LF never ends with CRLF CRLF: it is refused as
    soon as the LF arrives, as a bare LF inside a CRLF head is, not held (with its
    pending-handshake slot) until the handshake timeout."""
    server = server_factory({"limits": {"handshake_timeout_seconds": 60}})
    request = upgrade_request(token=make_token())
    if ending == "every-line":
        request = request.replace(b"\r\n", b"\n")
    elif ending == "header-lines":
        line, rest = request.split(b"\r\n", 1)
        request = line + b"\r\n" + rest.replace(b"\r\n", b"\n")
    else:
        request = request[:-2] + b"\n"  # the last line's CRLF, then a bare LF
    response = raw_http(server.port, request, timeout=5)  # well under the 60 s timeout
    assert status_of(response) == 400
    assert response.endswith(message + b"\n")


# --------------------------------------------------------------------------- audit of refusals


def test_every_refused_handshake_is_audited(server_factory: ServerFactory) -> None:
    server = server_factory(
        {
            **TRUSTED_LOCAL,
            "origin": {"allowed": ["https://app.example.com"]},
            "limits": {"connections_per_address": 1, "max_connections": 2},
        }
    )
    expected: list[tuple[int, str, str]] = []

    def check(got_status: int, want_status: int, reason: str, client: str) -> None:
        assert got_status == want_status, reason
        expected.append((want_status, reason, client))
        event = last_event(server, "handshake_refused")
        assert (event["status"], event["reason"], event["client"]) == (
            want_status,
            reason,
            client,
        )

    port = server.port
    check(status_of(raw_http(port, upgrade_request(host=None))), 400, "bad_request", "127.0.0.1")
    check(status_of(raw_http(port, upgrade_request("*"))), 400, "bad_request", "127.0.0.1")
    check(
        status_of(raw_http(port, raw_request("GET / HTTP/1.1", "Host: a"))),
        426,
        "not_websocket",
        "127.0.0.1",
    )
    check(
        status_of(raw_http(port, upgrade_request(headers={"Sec-WebSocket-Version": "8"}))),
        426,
        "unsupported_version",
        "127.0.0.1",
    )
    check(status_of(raw_http(port, upgrade_request())), 401, "missing_credentials", "127.0.0.1")
    bad = refused(server, BAD_TOKEN, headers=xff("7.7.7.7"))
    assert bad.response.headers["WWW-Authenticate"].startswith("Bearer")
    check(status(bad), 401, "bad_signature", "7.7.7.7")
    check(
        status(refused(server, origin="https://evil.example")),
        403,
        "origin_forbidden",
        "127.0.0.1",
    )
    with server.connect_welcomed(make_token("a"), headers=xff("10.0.0.1")):
        check(
            status(refused(server, make_token("b"), headers=xff("10.0.0.1"))),
            429,
            "too_many_connections",
            "10.0.0.1",
        )
        with server.connect_welcomed(make_token("c"), headers=xff("10.0.0.2")):
            check(
                status(refused(server, make_token("d"), headers=xff("10.0.0.3"))),
                503,
                "server_full",
                "10.0.0.3",
            )
    events = server.audit.events("handshake_refused")
    assert [(e["status"], e["reason"], e["client"]) for e in events] == expected
    raw_log = server.audit.getvalue()
    assert BAD_TOKEN not in raw_log
    for e in events:
        assert isinstance(e["time"], str) and e["time"]


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("header too large", upgrade_request(headers={"X-Big": "a" * 20_000})),
        ("too many headers", upgrade_request(headers={f"X-H{i}": "v" for i in range(200)})),
        (
            "non-GET method",
            upgrade_request(token=make_token()).replace(b"GET ", b"POST ", 1),
        ),
    ],
)
def test_engine_level_refusals_are_audited(
    server: RunningServer, name: str, request_bytes: bytes
) -> None:
    response = raw_http(server.port, request_bytes)
    code = status_of(response)
    assert 400 <= code < 500, name
    # engine-level refusals are audited when the server's side of the connection is
    # torn down, which can trail the client seeing EOF by a loop iteration
    deadline = time.monotonic() + 5
    events = server.audit.events("handshake_refused")
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)  # bounded poll of a condition
        events = server.audit.events("handshake_refused")
    assert [e["status"] for e in events] == [code], f"{name}: {events}"
    assert events[0]["client"] == "127.0.0.1"
    assert events[0]["reason"]


@pytest.mark.parametrize(
    "key",
    ["<script>alert(1)</script>", "dGhlIHNhbXBsZQ==", "", "!!!!!!!!!!!!!!!!!!!!!!=="],
    ids=["markup", "short", "empty", "not-base64"],
)
def test_invalid_websocket_key_is_refused_by_the_policy(server: RunningServer, key: str) -> None:
    request = upgrade_request(token=make_token(), headers={"Sec-WebSocket-Key": key})
    response = raw_http(server.port, request)
    assert status_of(response) == 400
    assert b"script" not in response
    assert server.audit.events("connection_admitted") == []
    refused = server.audit.events("handshake_refused")
    assert refused[-1]["reason"] == "bad_request"


def test_engine_refusal_after_admission_has_fixed_text_and_is_audited(
    server: RunningServer,
) -> None:
    # a subprotocol list the engine cannot parse, sent with a valid header token
    bad_protocols = {"Sec-WebSocket-Protocol": "wsguard.v1, <script>x"}
    response = raw_http(server.port, upgrade_request(token=make_token(), headers=bad_protocols))
    assert status_of(response) == 400
    assert b"<script>" not in response
    deadline = time.monotonic() + 5
    while not server.audit.events("handshake_refused") and time.monotonic() < deadline:
        time.sleep(0.01)  # bounded poll of a condition
    assert server.audit.events("handshake_refused")[-1]["reason"] == "bad_handshake"


@pytest.mark.parametrize("entry", ["https://*.co.uk", "https://*.github.io", "https://*.com"])
def test_wildcard_over_a_public_suffix_is_refused(entry: str) -> None:
    from wsguard.config.loader import validate_config
    from wsguard.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_config({"origin": {"allowed": [entry]}})
    assert info.value.key == "origin.allowed"
    assert "public suffix" in info.value.message or "registrable" in info.value.message


def test_wildcard_under_a_multi_label_suffix_is_accepted() -> None:
    from wsguard.core.origin import OriginPolicy

    policy = OriginPolicy(("https://*.example.co.uk",), allow_missing=True)
    assert policy.check("https://app.example.co.uk")
    assert not policy.check("https://example.co.uk")
    assert not policy.check("https://evil.co.uk")


def test_the_development_key_refuses_a_request_a_proxy_forwarded(
    server_factory: ServerFactory, tmp_path: Any
) -> None:
    """The development key is for clients on this machine: behind a reverse proxy on the
    same host the server binds loopback, but the request comes from elsewhere (it carries
    the proxy's X-Forwarded-For or Forwarded). Refused 500, after the policy's own answer
    (a client over its limit still gets its 429), slots given back."""
    from wsguard.config.keys import load_or_create_dev_key
    from wsguard.config.model import AuthConfig

    key_file = tmp_path / "dev.key"
    server = server_factory({"auth": {"secret": "", "dev_key_file": str(key_file)}})
    secret, _ = load_or_create_dev_key(AuthConfig(dev_key_file=key_file))
    token = make_token("alice", secret=secret.decode())
    for headers in (xff("203.0.113.9"), {"Forwarded": "for=203.0.113.9"}):
        exc = refused(server, token=token, headers=headers)
        assert status(exc) == 500
    with server.connect_welcomed(token):  # straight from this machine: admitted
        assert server.slots(ADDR_KEY) == 1
    reasons = [e["reason"] for e in server.audit.events("handshake_refused")]
    assert reasons == ["dev_key_beyond_loopback"] * 2
