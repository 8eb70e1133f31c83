"""``wsguard.client.WsguardClient`` against a real wsguard server.

The client is asyncio; every test is a sync function running an inner coroutine
with ``asyncio.run`` while the server runs on its own loop in a background thread.
Covered: both token transports, sync and async token providers, automatic
signing (session keys and per-client keys), in-band token refresh before ``exp``,
client certificates (mTLS), transparent reconnect with back-off (one connection at
a time, a send racing the reconnect waits for it and is signed for the new connection),
no reconnect after final close codes or handshake refusals, and the back-off jitter
bounds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import ssl
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import ClientConnection as AsyncClientConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import RunningServer, ServerFactory, eventually, make_token
from support.wire import upgrade_answer
from wsguard.client import ClientError, WsguardClient
from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.core.integrity import SESSION_KID
from wsguard.hosts.app import App
from wsguard.session import Connection

WRONG_SECRET = "not-the-server-secret-but-long-enough-for-hs256-0123"


def signed_chat_config(**signing: Any) -> dict[str, Any]:
    """Overrides making ``chat`` a signed type (the other demo types unchanged)."""
    types = {**DEMO_MESSAGE_TYPES, "chat": {**DEMO_MESSAGE_TYPES["chat"], "signed": True}}
    return {"signing": signing, "messages": {"types": types}}


def write_keys_file(path: Path, keys: list[dict[str, str]]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"keys": keys}, fh)
    return path


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Counter:
    """A token provider (sync or async) that counts its calls."""

    def __init__(self, tokens: Callable[[int], str]) -> None:
        self.calls = 0
        self._tokens = tokens

    def sync(self) -> str:
        self.calls += 1
        return self._tokens(self.calls)

    async def async_(self) -> str:
        await asyncio.sleep(0)  # a real coroutine that yields to the loop
        self.calls += 1
        return self._tokens(self.calls)


def wait_events(
    server: RunningServer, name: str, *, subject: str, timeout: float = 5
) -> list[dict[str, Any]]:
    """Audit events of *subject*, polled (bounded) since the server writes them async."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in server.audit.events(name) if e.get("subject") == subject]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.02)  # polling the audit log, bounded by the deadline


async def recv(client: WsguardClient) -> dict[str, Any]:
    return await asyncio.wait_for(client.recv(), 5)


async def closed_by_server(ws: AsyncClientConnection) -> ConnectionClosed:
    """Read (welcome and anything else) until the server closes; return the close."""
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as exc:
        return exc


# -- connecting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "auth"),
    [("header", {"subprotocol": False}), ("subprotocol", {"header": False})],
)
def test_connects_with_each_token_transport_and_gets_pong(
    server_factory: ServerFactory, transport: str, auth: dict[str, bool]
) -> None:
    # the server accepts only the transport under test, so the token must travel there
    server = server_factory({"auth": auth})

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with WsguardClient(
            server.url,
            token=make_token("alice"),
            transport=transport,  # type: ignore[arg-type]
            max_attempts=1,  # a refusal fails the test at once
        ) as client:
            await client.send({"type": "ping", "id": "p1"})
            return client.welcome, await recv(client)

    welcome, pong = asyncio.run(main())
    assert welcome["type"] == "welcome"
    assert welcome["subject"] == "alice"
    assert pong["type"] == "pong"
    assert pong["id"] == "p1"
    admitted = server.audit.events("connection_admitted")
    assert len(admitted) == 1
    assert admitted[0]["subject"] == "alice"
    assert admitted[0]["subprotocol"] == "wsguard.v1"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_token_provider_sync_or_async_supplies_the_token(server: RunningServer, kind: str) -> None:
    counter = Counter(lambda n: make_token("dave"))
    provider = counter.sync if kind == "sync" else counter.async_

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with WsguardClient(server.url, token_provider=provider, max_attempts=1) as client:
            await client.send({"type": "ping", "id": 3})
            return client.welcome, await recv(client)

    welcome, pong = asyncio.run(main())
    assert welcome["subject"] == "dave"
    assert pong["type"] == "pong" and pong["id"] == 3
    assert counter.calls == 1


def test_client_requires_a_token_or_provider() -> None:
    with pytest.raises(ValueError, match="token or token_provider"):
        WsguardClient("ws://127.0.0.1:1/")


# -- signing -----------------------------------------------------------------------------


def test_session_key_signed_chat_is_broadcast(server_factory: ServerFactory) -> None:
    server = server_factory(signed_chat_config(session_keys=True))

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with (
            WsguardClient(server.url, token=make_token("alice"), signed_types={"chat"}) as alice,
            WsguardClient(server.url, token=make_token("bob")) as bob,
        ):
            await alice.send({"type": "chat", "text": "signed hello"})
            got = await recv(bob)
            # no error frame for alice: her next frame is the pong
            await alice.send({"type": "ping", "id": "after"})
            return alice.welcome, got, await recv(alice)

    welcome, got, pong = asyncio.run(main())
    assert welcome["signing"]["kid"] == SESSION_KID
    assert got == {
        "type": "broadcast",
        "from": "alice",
        "message": {"type": "chat", "text": "signed hello"},  # envelope stripped
    }
    assert pong["type"] == "pong" and pong["id"] == "after"


@pytest.mark.parametrize("given", ["bytes", "keys-file text"])
def test_per_client_key_signed_chat_is_broadcast(
    server_factory: ServerFactory, tmp_path: Path, given: str
) -> None:
    """The secret as bytes, or as the keys file holds it (base64url text)."""
    secret = secrets.token_bytes(32)
    keys = write_keys_file(
        tmp_path / "keys.json", [{"kid": "k1", "subject": "alice", "secret": b64url(secret)}]
    )
    server = server_factory(signed_chat_config(keys_file=str(keys)))

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with (
            WsguardClient(
                server.url,
                token=make_token("alice"),
                signing_key=("k1", secret if given == "bytes" else b64url(secret)),
                signed_types={"chat"},
            ) as alice,
            WsguardClient(server.url, token=make_token("bob")) as bob,
        ):
            await alice.send({"type": "chat", "text": "with k1", "room": "r"})
            got = await recv(bob)
            await alice.send({"type": "ping", "id": 2})
            return alice.welcome, got, await recv(alice)

    welcome, got, pong = asyncio.run(main())
    assert "signing" not in welcome  # no session keys configured
    assert got == {
        "type": "broadcast",
        "from": "alice",
        "message": {"type": "chat", "text": "with k1", "room": "r"},
    }
    assert pong["type"] == "pong" and pong["id"] == 2


def test_client_signing_with_the_wrong_secret_is_refused(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    keys = write_keys_file(
        tmp_path / "keys.json",
        [{"kid": "k1", "subject": "alice", "secret": b64url(secrets.token_bytes(32))}],
    )
    server = server_factory(signed_chat_config(keys_file=str(keys)))

    async def main() -> dict[str, Any]:
        async with WsguardClient(
            server.url,
            token=make_token("alice"),
            signing_key=("k1", secrets.token_bytes(32)),
            signed_types={"chat"},
        ) as alice:
            await alice.send({"type": "chat", "text": "forged", "id": "f1"})
            return await recv(alice)

    error = asyncio.run(main())
    assert error["type"] == "error"
    assert error["code"] == "bad_signature"
    assert error["ref"] == "f1"


def test_sign_without_any_key_raises_client_error(server: RunningServer) -> None:
    async def main() -> None:
        async with WsguardClient(
            server.url, token=make_token("alice"), signed_types={"chat"}
        ) as client:
            assert "signing" not in client.welcome
            with pytest.raises(ClientError, match="no signing key"):
                await client.send({"type": "chat", "text": "x"})

    asyncio.run(main())


def test_unsigned_signed_type_from_raw_client_gets_bad_signature(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(signed_chat_config(session_keys=True))
    with server.connect_welcomed(make_token("mallory")) as ws:
        ws.send(json.dumps({"type": "chat", "text": "unsigned", "id": "u1"}))
        error = json.loads(ws.recv(timeout=5))
        ws.send(json.dumps({"type": "ping", "id": "u2"}))
        pong = json.loads(ws.recv(timeout=5))
    assert error["type"] == "error"
    assert error["code"] == "bad_signature"
    assert error["ref"] == "u1"
    assert pong["type"] == "pong" and pong["id"] == "u2"  # refused, not closed


# -- token refresh ---------------------------------------------------------------------


def test_refresh_keeps_the_connection_past_the_first_tokens_exp(
    server: RunningServer,
) -> None:
    first_exp = int(time.time()) + 3
    counter = Counter(
        lambda n: make_token("alice", exp=first_exp) if n == 1 else make_token("alice", ttl=3600)
    )
    # a witness whose token ends one second after alice's first one, never refreshed:
    # its 4001 close marks the moment exp + 1 s has passed on the server
    witness_token = make_token("witness", exp=first_exp + 1)

    async def main() -> tuple[WsguardClient, int, dict[str, Any]]:
        async with WsguardClient(
            server.url,
            token_provider=counter.sync,
            refresh_margin=2,
            backoff_initial=0.01,
        ) as client:
            assert client.expires_at == first_exp
            async with async_connect(
                server.url,
                additional_headers={"Authorization": f"Bearer {witness_token}"},
                open_timeout=5,
            ) as witness:
                closed = await asyncio.wait_for(closed_by_server(witness), 10)
            assert closed.rcvd is not None
            assert time.time() >= first_exp + 1 - 0.05
            await client.send({"type": "ping", "id": "late"})
            pong = await recv(client)
            # still the first connection: the server never closed alice (no 4001)
            alice_closed = [
                e for e in server.audit.events("connection_closed") if e["subject"] == "alice"
            ]
            assert alice_closed == []
            return client, closed.rcvd.code, pong

    client, witness_code, pong = asyncio.run(main())
    assert witness_code == 4001
    assert pong["type"] == "pong" and pong["id"] == "late"  # auth_ok was consumed
    assert counter.calls == 2  # connect + one refresh, no reconnect
    assert client.reconnects == 0
    assert client.expires_at is not None and client.expires_at > first_exp + 3000
    witness_closed = wait_events(server, "connection_closed", subject="witness")
    assert [(e["code"], e["cause"]) for e in witness_closed] == [(4001, "token_expired")]
    assert (
        len([e for e in server.audit.events("connection_admitted") if e["subject"] == "alice"]) == 1
    )


# -- client certificate ------------------------------------------------------------------


def test_client_certificate_and_token_over_wss(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    key_file = tmp_path / "server.key"
    server_cert.private_key_pem.write_to_path(str(key_file))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = server_factory(
        {
            "tls": {
                "cert_file": str(cert_file),
                "key_file": str(key_file),
                "client_ca_file": str(ca_file),
                "client_cert": "optional",
                "cert_scopes": {"alice": ["admin"]},
            }
        }
    )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    ca.issue_cert("alice.example", common_name="alice").configure_cert(context)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with WsguardClient(
            f"wss://127.0.0.1:{server.port}/",  # not localhost: ::1 may be another worker's
            token=make_token("alice", scopes="chat"),
            ssl_context=context,
        ) as client:
            await client.send({"type": "ping", "id": "tls"})
            return client.welcome, await recv(client)

    welcome, pong = asyncio.run(main())
    assert welcome["type"] == "welcome"
    assert welcome["subject"] == "alice"
    # the admin scope comes only from the certificate mapping: the certificate was used
    assert welcome["scopes"] == ["admin", "chat"]
    assert pong["type"] == "pong" and pong["id"] == "tls"


# -- reconnect ---------------------------------------------------------------------------


def _greeting(app: App) -> None:
    @app.on_connect
    async def hello(conn: Connection) -> None:
        conn.send({"type": "hello", "server": "second"})


def _restart_on(factory: ServerFactory, port: int) -> RunningServer:
    """A new server on *port*, retrying (bounded) while the port is not yet free."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return factory({"port": port}, setup=_greeting)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for the port to be free, bounded by the deadline


def test_recv_reconnects_transparently_after_server_restart(
    server_factory: ServerFactory,
) -> None:
    first = server_factory()
    port = first.port

    async def main() -> tuple[WsguardClient, str, dict[str, Any], dict[str, Any], RunningServer]:
        async with WsguardClient(
            first.url,
            token=make_token("alice"),
            backoff_initial=0.02,
            backoff_max=0.1,
            max_attempts=200,
        ) as client:
            old_id = client.welcome["connection_id"]
            # the client's loop keeps running, so it answers the server's close at once
            await asyncio.to_thread(first.stop)
            pending = asyncio.get_running_loop().create_task(client.recv())
            second = await asyncio.to_thread(_restart_on, server_factory, port)
            message = await asyncio.wait_for(pending, 15)
            await client.send({"type": "ping", "id": "again"})
            return client, old_id, message, await recv(client), second

    client, old_id, message, pong, second = asyncio.run(main())
    assert second.port == port
    assert client.reconnects == 1
    assert message == {"type": "hello", "server": "second"}  # the welcome is not returned
    assert client.welcome["connection_id"] != old_id
    assert pong["type"] == "pong" and pong["id"] == "again"
    assert [e["subject"] for e in second.audit.events("connection_admitted")] == ["alice"]


def test_send_racing_a_reconnect_waits_for_it_on_one_connection(
    server_factory: ServerFactory,
) -> None:
    """The server drops alice while recv() waits; recv() starts the reconnect and, while it
    is under way, send() is called with a signed message. There must be one reconnect
    (not a second connection left open, holding a slot), and the message must be signed
    with the new connection's session key (not refused as bad_signature)."""
    server = server_factory(signed_chat_config(session_keys=True))
    calls = 0

    async def main() -> tuple[WsguardClient, str, str, dict[str, Any] | None, dict[str, Any]]:
        reconnecting, go = asyncio.Event(), asyncio.Event()

        async def provider() -> str:
            nonlocal calls
            calls += 1
            if calls == 2:  # the reconnect after the drop: held until send() has started
                reconnecting.set()
                await go.wait()
            return make_token("alice")

        async with (
            WsguardClient(
                server.url,
                token_provider=provider,
                signed_types={"chat"},
                backoff_initial=0.01,
            ) as alice,
            WsguardClient(server.url, token=make_token("bob")) as bob,
        ):
            first_key = alice.welcome["signing"]["key"]
            pending = asyncio.get_running_loop().create_task(alice.recv())

            def drop_alice() -> None:
                for conn in list(server.app.connections.values()):
                    if conn.subject == "alice":
                        conn.close_soon(1012, "service restart")  # not a final code

            await asyncio.to_thread(server.call, drop_alice)
            await asyncio.wait_for(reconnecting.wait(), 10)
            sending = asyncio.get_running_loop().create_task(
                alice.send({"type": "chat", "text": "raced", "id": "r1"})
            )
            asyncio.get_running_loop().call_soon(go.set)  # after send()'s first step
            await asyncio.wait_for(sending, 10)
            try:
                broadcast: dict[str, Any] | None = await recv(bob)
            except TimeoutError:
                broadcast = None
            await alice.send({"type": "ping", "id": "after"})
            answer = await asyncio.wait_for(pending, 10)

            def alices() -> int:
                live = server.call(lambda: list(server.app.connections.values()))
                return sum(conn.subject == "alice" for conn in live)

            # one live connection on the server: none left open behind the reconnect
            await asyncio.to_thread(eventually, lambda: alices() == 1, 5.0, "one alice")
            return alice, first_key, alice.welcome["signing"]["key"], broadcast, answer

    alice, first_key, second_key, broadcast, answer = asyncio.run(main())
    assert second_key != first_key  # a new connection, with its own session key
    admitted = [e["subject"] for e in server.audit.events("connection_admitted")]
    assert admitted.count("alice") == 2, admitted  # the first one and one reconnect
    assert alice.reconnects == 1
    assert calls == 2
    # the message went on the new connection, signed with its key, and was accepted
    assert (answer["type"], answer["id"]) == ("pong", "after"), answer  # no bad_signature
    assert broadcast == {
        "type": "broadcast",
        "from": "alice",
        "message": {"type": "chat", "text": "raced", "id": "r1"},
    }
    eventually(lambda: server.connection_count() == 0, what="every connection closed")


def test_send_after_an_unnoticed_drop_goes_on_the_next_connection(
    server_factory: ServerFactory,
) -> None:
    """The server dropped alice and nothing read since (no recv() pending): send() finds
    the connection closed before writing anything, reconnects (once) and sends the
    message, signed with the new connection's key."""
    server = server_factory(signed_chat_config(session_keys=True))

    async def main() -> tuple[WsguardClient, dict[str, Any], dict[str, Any]]:
        async with (
            WsguardClient(
                server.url, token=make_token("alice"), signed_types={"chat"}, backoff_initial=0.01
            ) as alice,
            WsguardClient(server.url, token=make_token("bob")) as bob,
        ):

            def drop_alice() -> None:
                for conn in list(server.app.connections.values()):
                    if conn.subject == "alice":
                        conn.close_soon(1012, "service restart")

            def alices() -> int:
                live = server.call(lambda: list(server.app.connections.values()))
                return sum(conn.subject == "alice" for conn in live)

            await asyncio.to_thread(server.call, drop_alice)
            await asyncio.to_thread(eventually, lambda: alices() == 0, 5.0, "alice dropped")
            await alice.send({"type": "chat", "text": "after the drop"})
            broadcast = await recv(bob)
            await alice.send({"type": "ping", "id": "p"})
            return alice, broadcast, await recv(alice)

    alice, broadcast, pong = asyncio.run(main())
    assert broadcast["message"] == {"type": "chat", "text": "after the drop"}
    assert (pong["type"], pong["id"]) == ("pong", "p")  # no bad_signature before it
    assert alice.reconnects == 1
    admitted = [e["subject"] for e in server.audit.events("connection_admitted")]
    assert admitted.count("alice") == 2


def test_reconnect_after_expiry_close_asks_the_provider_for_a_fresh_token(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(setup=_greeting)
    first_exp = int(time.time()) + 2
    counter = Counter(
        lambda n: make_token("alice", exp=first_exp) if n == 1 else make_token("alice", ttl=3600)
    )

    async def main() -> tuple[WsguardClient, dict[str, Any], dict[str, Any]]:
        async with WsguardClient(
            server.url,
            token_provider=counter.sync,
            refresh_margin=-60,  # no in-band refresh in time: the server closes with 4001
            backoff_initial=0.01,
        ) as client:
            first = await recv(client)  # the hello of the first connection
            second = await asyncio.wait_for(client.recv(), 10)  # after 4001 and a reconnect
            return client, first, second

    client, first, second = asyncio.run(main())
    assert first["type"] == second["type"] == "hello"
    assert first["server"] == second["server"] == "second"
    assert client.reconnects == 1
    closes = wait_events(server, "connection_closed", subject="alice")
    assert (closes[0]["code"], closes[0]["cause"]) == (4001, "token_expired")
    assert counter.calls == 2
    # the client knew its token had expired: it must not present it again
    assert server.audit.events("handshake_refused") == []
    assert [e["subject"] for e in server.audit.events("connection_admitted")] == ["alice"] * 2


def test_policy_close_1008_is_final(server_factory: ServerFactory) -> None:
    server = server_factory({"limits": {"violation_budget": 1}})

    async def main() -> tuple[WsguardClient, dict[str, Any], int | None]:
        async with WsguardClient(
            server.url, token=make_token("alice"), backoff_initial=0.01
        ) as client:
            await client.send({"type": "nope", "id": 1})
            await client.send({"type": "nope", "id": 2})
            error = await recv(client)
            with pytest.raises(ConnectionClosed) as closed:
                await recv(client)
            rcvd = closed.value.rcvd
            return client, error, rcvd.code if rcvd is not None else None

    client, error, code = asyncio.run(main())
    assert error["type"] == "error" and error["code"] == "unknown_type" and error["ref"] == 1
    assert code == 1008
    assert client.reconnects == 0
    assert len(server.audit.events("connection_admitted")) == 1


def test_handshake_refused_with_403_is_not_retried(server_factory: ServerFactory) -> None:
    server = server_factory({"origin": {"allowed": ["https://app.example.com"]}})
    counter = Counter(lambda n: make_token("alice"))

    async def main() -> None:
        client = WsguardClient(
            server.url,
            token_provider=counter.sync,
            origin="https://evil.example.com",
            backoff_initial=0.01,
            max_attempts=5,
        )
        await client.connect()

    with pytest.raises(ClientError, match="HTTP 403") as raised:
        asyncio.run(main())
    cause = raised.value.__cause__
    assert isinstance(cause, InvalidStatus) and cause.response.status_code == 403
    assert counter.calls == 1
    refused = server.audit.events("handshake_refused")
    assert [(e["status"], e["reason"]) for e in refused] == [(403, "origin_forbidden")]


def test_a_refused_token_is_tried_once_more_fresh_then_given_up(
    server_factory: ServerFactory,
) -> None:
    """Each 401 counts toward a ban of the address (every user behind it): a provider's
    fresh token is tried once, then the client stops, far from the ban's threshold."""
    server = server_factory()
    counter = Counter(lambda n: make_token(f"alice{n}", secret=WRONG_SECRET))

    async def main() -> None:
        client = WsguardClient(
            server.url, token_provider=counter.sync, backoff_initial=0.01, max_attempts=10
        )
        await client.connect()

    with pytest.raises(ClientError, match="HTTP 401"):
        asyncio.run(main())
    assert counter.calls == 2  # a fresh token for the second attempt, then no third
    statuses = [e["status"] for e in server.audit.events("handshake_refused")]
    assert statuses == [401, 401]
    assert server.audit.events("connection_admitted") == []
    assert server.audit.events("ban_started") == []


@pytest.mark.parametrize("kind", ["static", "same-from-provider"])
def test_a_token_that_cannot_change_is_refused_once(
    server_factory: ServerFactory, kind: str
) -> None:
    server = server_factory()
    wrong = make_token("alice", secret=WRONG_SECRET)
    counter = Counter(lambda n: wrong)

    async def main() -> None:
        options: dict[str, Any] = (
            {"token": wrong} if kind == "static" else {"token_provider": counter.sync}
        )
        client = WsguardClient(server.url, backoff_initial=0.01, max_attempts=10, **options)
        await client.connect()

    with pytest.raises(ClientError, match="HTTP 401") as raised:
        asyncio.run(main())
    assert wrong not in str(raised.value)
    statuses = [e["status"] for e in server.audit.events("handshake_refused")]
    assert statuses == [401]


def test_an_expired_static_token_is_not_presented_again(server_factory: ServerFactory) -> None:
    """The server closes 4001 at the token's exp; a token that cannot change would only
    be refused (each refusal toward a ban of the address): the close is final."""
    server = server_factory(setup=_greeting)

    async def main() -> tuple[WsguardClient, int | None]:
        token = make_token("alice", exp=int(time.time()) + 2)
        async with WsguardClient(server.url, token=token, backoff_initial=0.01) as client:
            await recv(client)  # the hello
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.recv(), 10)
            rcvd = closed.value.rcvd
            return client, rcvd.code if rcvd is not None else None

    client, code = asyncio.run(main())
    assert code == 4001
    assert client.reconnects == 0
    assert server.audit.events("handshake_refused") == []


# -- back-off ------------------------------------------------------------------------------


def test_jitter_stays_within_full_jitter_bounds() -> None:
    client = WsguardClient("ws://127.0.0.1:1/", token="t", backoff_initial=0.1, backoff_max=1.0)
    for attempt in range(12):
        bound = min(1.0, 0.1 * 2**attempt)
        samples = [client._jitter(attempt) for _ in range(300)]
        assert all(0 <= s <= bound for s in samples), (attempt, max(samples), bound)
        assert max(samples) > bound / 2  # spread over the range, not a constant
        assert min(samples) < bound / 2


# -- servers that misbehave ----------------------------------------------------------------


def run_against(
    handler: Callable[[Any], Any], client_main: Callable[[str], Any], **serve_kw: Any
) -> Any:
    """Run *client_main(url)* against a scripted websockets server running *handler*."""
    from websockets.asyncio.server import serve

    async def main() -> Any:
        async with serve(handler, "127.0.0.1", 0, **serve_kw) as server:
            port = server.sockets[0].getsockname()[1]
            scheme = "wss" if serve_kw.get("ssl") else "ws"
            return await client_main(f"{scheme}://127.0.0.1:{port}/")

    return asyncio.run(main())


def test_a_server_closing_right_after_the_welcome_makes_the_back_off_grow_then_give_up() -> None:
    """1013 (try again later) right after every welcome: the pauses grow as for failed
    connects, and after ``max_attempts`` such connections in a row the client gives up,
    instead of reconnecting about once a second forever."""
    opened: list[float] = []

    async def handler(ws: Any) -> None:
        opened.append(time.monotonic())
        await ws.send(json.dumps({"type": "welcome"}))
        await ws.close(1013, "try again later")

    counter = Counter(lambda n: make_token("alice"))

    async def client_main(url: str) -> None:
        client = WsguardClient(
            url, token_provider=counter.sync, backoff_initial=0.05, backoff_max=10, max_attempts=4
        )
        async with client:
            while True:
                await client.recv()

    with pytest.raises(ClientError, match="in a row"):
        run_against(handler, client_main)
    assert len(opened) == 5  # the first connection and 4 reconnects
    assert counter.calls == 5


def test_a_token_shorter_than_the_refresh_margin_is_refreshed_without_a_loop() -> None:
    """A token with less life left than ``refresh_margin`` (or a provider that hands out
    the same token again): the refresh waits half of what is left, at least a second,
    never a loop of refreshes."""
    auths: list[float] = []
    expires = time.time() + 20

    async def handler(ws: Any) -> None:
        await ws.send(json.dumps({"type": "welcome", "expires_at": expires}))
        async for raw in ws:
            if json.loads(raw).get("type") == "auth":
                auths.append(time.monotonic())
                await ws.send(json.dumps({"type": "auth_ok", "expires_at": expires}))

    counter = Counter(lambda n: make_token("alice"))

    async def client_main(url: str) -> None:
        async with WsguardClient(url, token_provider=counter.sync, refresh_margin=30):
            await asyncio.sleep(1.5)

    run_against(handler, client_main)
    assert auths == []  # the first refresh is due in ~10 s (half of 20 s)
    assert counter.calls == 1


def test_the_client_never_logs_its_token(caplog: pytest.LogCaptureFixture) -> None:
    """websockets logs the request headers at DEBUG: the client's connections use a logger
    kept at WARNING, so the bearer token is in no record, whatever the app's level."""
    token = make_token("alice")

    async def handler(ws: Any) -> None:
        await ws.send(json.dumps({"type": "welcome"}))
        await ws.wait_closed()

    async def client_main(url: str) -> None:
        async with WsguardClient(url, token=token, transport="header"):
            pass
        async with WsguardClient(url, token=token, transport="subprotocol"):
            pass

    with caplog.at_level(logging.DEBUG):
        run_against(handler, client_main, subprotocols=["wsguard.v1"])
    # the scripted server's own records (websockets.server) are not the client's
    records = [r for r in caplog.records if not r.name.startswith("websockets.server")]
    assert [r for r in caplog.records if r.name.startswith("websockets.server")]  # DEBUG on
    assert not [r for r in records if token in r.getMessage()]


def test_wss_without_a_context_verifies_and_a_refused_certificate_is_not_retried(
    tmp_path: Path,
) -> None:
    """No ``ssl_context``: a verifying default context (the system's CAs), not an error.
    A certificate it refuses ends the connect at once, with the cause: retrying cannot fix
    it, and each retry would ask the provider for a token."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handler(ws: Any) -> None:
        await ws.send(json.dumps({"type": "welcome"}))

    counter = Counter(lambda n: make_token("alice"))

    async def client_main(url: str) -> None:
        await WsguardClient(url, token_provider=counter.sync, max_attempts=5).connect()

    with pytest.raises(ClientError, match="server certificate refused") as raised:
        run_against(handler, client_main, ssl=server_context)
    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    assert counter.calls == 1


# -- servers other than wsguard's own, and what they may send -------------------------------


async def _with_server(
    handler: Callable[[Any], Any], client_part: Callable[[str], Any], **serve_options: Any
) -> Any:
    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", 0, **serve_options) as server:
        port = server.sockets[0].getsockname()[1]
        return await client_part(f"ws://127.0.0.1:{port}/")


def test_a_server_that_sends_no_welcome_fails_within_open_timeout() -> None:
    async def silent(ws: Any) -> None:
        await ws.wait_closed()

    async def client_part(url: str) -> None:
        client = WsguardClient(url, token=make_token(), open_timeout=0.5, max_attempts=1)
        await client.connect()

    with pytest.raises(ClientError, match="expect_welcome=False"):
        asyncio.run(asyncio.wait_for(_with_server(silent, client_part), 10))


def test_an_app_that_speaks_first_keeps_its_first_message() -> None:
    """Behind the ASGI middleware the app speaks first, if at all: its first message is
    the first recv(), not taken for a welcome; with expect_welcome=False nothing is
    awaited at all."""

    async def hello(ws: Any) -> None:
        await ws.send(json.dumps({"type": "hello", "n": 1}))
        async for message in ws:
            await ws.send(message)

    async def client_part(url: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with WsguardClient(url, token=make_token()) as client:
            first = await recv(client)
            welcome = client.welcome
        async with WsguardClient(url, token=make_token(), expect_welcome=False) as quiet:
            await quiet.send({"type": "ping", "id": 7})
            echoed = await recv(quiet)
            # the hello came first on this connection too: recv() delivers it in order
            return first, welcome, echoed if echoed["type"] != "hello" else await recv(quiet)

    first, welcome, echoed = asyncio.run(asyncio.wait_for(_with_server(hello, client_part), 10))
    assert first == {"type": "hello", "n": 1}
    assert welcome == {}
    assert echoed == {"type": "ping", "id": 7}


def test_a_retry_after_is_bounded_by_backoff_max() -> None:
    from websockets.datastructures import Headers as WsHeaders
    from websockets.http11 import Response

    async def handler(ws: Any) -> None:  # never reached
        await ws.close()

    def unavailable(connection: Any, request: Any) -> Response:
        return Response(503, "Service Unavailable", WsHeaders({"Retry-After": "86400"}), b"")

    async def client_part(url: str) -> float:
        started = time.monotonic()
        client = WsguardClient(url, token=make_token(), backoff_max=0.1, max_attempts=3)
        with pytest.raises(ClientError, match="gave up after 3 attempts"):
            await client.connect()
        return time.monotonic() - started

    coro = _with_server(handler, client_part, process_request=unavailable)
    asyncio.run(asyncio.wait_for(coro, 20))  # a day's Retry-After obeyed would time out


def test_a_token_with_whitespace_inside_is_refused_without_being_quoted() -> None:
    token = make_token()
    client = WsguardClient("ws://127.0.0.1:1/", token=token[:20] + " " + token[20:])
    with pytest.raises(ClientError, match="not a bearer token") as raised:
        asyncio.run(client.connect())
    assert token[:20] not in str(raised.value) and token[20:] not in str(raised.value)


def test_a_token_with_a_trailing_newline_is_used_stripped(server: RunningServer) -> None:
    async def main() -> dict[str, Any]:
        async with WsguardClient(server.url, token_provider=lambda: make_token() + "\n") as c:
            return c.welcome

    assert asyncio.run(main())["type"] == "welcome"


def test_a_message_over_max_size_ends_the_client_without_reconnecting() -> None:
    handshakes = 0

    async def huge(ws: Any) -> None:
        nonlocal handshakes
        handshakes += 1
        await ws.send(json.dumps({"type": "welcome"}))
        with contextlib.suppress(ConnectionClosed):
            await ws.send("x" * 70_000)
            await ws.wait_closed()

    async def client_part(url: str) -> None:
        async with WsguardClient(url, token=make_token(), max_size=65_536) as client:
            await client.recv()

    with pytest.raises(ClientError, match="over max_size"):
        asyncio.run(asyncio.wait_for(_with_server(huge, client_part), 10))
    assert handshakes == 1


def test_a_send_after_the_clients_own_1009_does_not_reconnect() -> None:
    """The server drops the connection on the client's 1009 without a close frame of its
    own (no close frame received): send() must not take that for a drop to recover from,
    the next connection would get the same message."""
    handshakes = 0

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handshakes
        head = await reader.readuntil(b"\r\n\r\n")
        handshakes += 1
        writer.write(upgrade_answer(head))
        welcome = b'{"type":"welcome"}'
        writer.write(bytes([0x81, len(welcome)]) + welcome)
        writer.write(b"\x81\x7f" + (70_000).to_bytes(8, "big") + b"x" * 70_000)
        await reader.read(2)  # the client's close frame begins: drop without answering
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(huge, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            client = WsguardClient(f"ws://127.0.0.1:{port}/", token=make_token(), max_size=65_536)
            await client.connect()
            ws = client._ws
            assert ws is not None
            await ws.wait_closed()
            try:
                await client.send({"type": "ping", "id": "1"})
            finally:
                await client.close()

    with pytest.raises(ClientError, match="over max_size"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert handshakes == 1


def test_a_server_that_drops_the_handshake_unanswered_is_retried_then_a_client_error() -> None:
    """No HTTP response at all (a server requiring a client certificate drops the
    connection after TLS; a proxy in between): retried like a refused connect, then
    ClientError naming the cause; never a raw websockets exception."""
    attempts = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            client = WsguardClient(
                f"ws://127.0.0.1:{port}/", token=make_token(), max_attempts=2, backoff_max=0.05
            )
            await client.connect()

    with pytest.raises(ClientError, match="gave up after 2 attempts: did not receive a valid"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert attempts == 2


def test_a_welcome_late_on_the_first_connection_is_waited_for_on_the_next() -> None:
    """A server still warming up (no welcome within open_timeout) is retried like a
    handshake that timed out, not given up on for good."""
    connections = 0

    async def warming(ws: Any) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            await ws.send(json.dumps({"type": "welcome", "subject": "alice"}))
        await ws.wait_closed()

    async def client_part(url: str) -> dict[str, Any]:
        client = WsguardClient(
            url, token=make_token(), open_timeout=0.3, backoff_initial=0.01, max_attempts=3
        )
        try:
            return await client.connect()
        finally:
            await client.close()

    welcome = asyncio.run(asyncio.wait_for(_with_server(warming, client_part), 10))
    assert welcome["subject"] == "alice"
    assert connections == 2


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else() -> None:
    """websockets strips Authorization on a cross-origin redirect, not a subprotocol
    entry: the token in one went to whatever host the redirect named (browsers follow no
    redirect on a WebSocket handshake)."""
    elsewhere: list[bytes] = []

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        elsewhere.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async def main() -> None:
        target = await asyncio.start_server(other, "127.0.0.2", 0)
        port = target.sockets[0].getsockname()[1]

        async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            location = f"ws://127.0.0.2:{port}/elsewhere".encode()
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\n\r\n")
            await writer.drain()
            writer.close()

        first = await asyncio.start_server(redirect, "127.0.0.1", 0)
        async with target, first:
            url = f"ws://127.0.0.1:{first.sockets[0].getsockname()[1]}/"
            for transport in ("subprotocol", "header"):
                client = WsguardClient(url, token=make_token(), transport=transport)
                with pytest.raises(ClientError, match="redirected with HTTP 302: not followed"):
                    await client.connect()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert elsewhere == []


@pytest.mark.parametrize("failing", [False, True], ids=["provider-ok", "provider-fails-once"])
def test_a_client_that_only_sends_keeps_refreshing_its_token(
    server: RunningServer, failing: bool
) -> None:
    """The next refresh was scheduled only when recv() read the auth_ok: a producer that
    never reads refreshed once, then was closed 4001 at the second token's exp; and a
    provider failing once then left no retry (computed from the first token's exp)."""

    def tokens(n: int) -> str:
        if failing and n == 3:
            raise RuntimeError("the identity provider is down")
        return make_token("producer", ttl=3)

    counter = Counter(tokens)

    async def main() -> WsguardClient:
        async with WsguardClient(server.url, token_provider=counter.sync, refresh_margin=2) as c:
            deadline = time.monotonic() + 15
            while counter.calls < 4 and time.monotonic() < deadline:
                await c.send({"type": "ping", "id": counter.calls})  # sends, never reads
                await asyncio.sleep(0.5)  # within the default message rate
            return c

    client = asyncio.run(main())
    assert counter.calls >= 4  # connect + three refreshes (or attempts), all without a recv()
    assert client.reconnects == 0
    refreshed = wait_events(server, "token_refreshed", subject="producer")
    assert len(refreshed) >= (2 if failing else 3)
    closes = [e for e in server.audit.events("connection_closed") if e["subject"] == "producer"]
    assert all(e["code"] != 4001 for e in closes), closes


def test_the_token_is_never_quoted_in_a_client_error() -> None:
    token = make_token()

    async def echo_protocols(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        offered = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-protocol:")
        )
        answer = upgrade_answer(head)[:-2] + b"Sec-WebSocket-Protocol: " + offered + b"\r\n\r\n"
        writer.write(answer)  # the whole list back, token entry included
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo_protocols, "127.0.0.1", 0)
        async with server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
            client = WsguardClient(url, token=token, transport="subprotocol", max_attempts=2)
            with pytest.raises(ClientError) as echoed:
                await client.connect()
            # not in the message, nor anywhere in the traceback a logger would print
            printed = "".join(traceback.format_exception(echoed.value))
            assert token.split(".")[2] not in printed, printed
            for odd in ("abc/def=", "a,b", 'a"b', "a(b)"):
                client = WsguardClient(url, token=odd, transport="subprotocol")
                with pytest.raises(ClientError, match="transport='header'") as refused:
                    await client.connect()
                assert odd not in str(refused.value)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_message_over_the_servers_max_message_bytes_is_not_sent(server: RunningServer) -> None:
    """The server would close 1009, a close the client cannot come back from: refused
    before sending, by the limit the welcome announces."""

    async def main() -> dict[str, Any]:
        async with WsguardClient(server.url, token=make_token()) as client:
            limit = client.welcome["limits"]["max_message_bytes"]
            with pytest.raises(ClientError, match="over the server's max_message_bytes"):
                await client.send({"type": "chat", "text": "x" * limit})
            await client.send({"type": "ping", "id": "after"})
            return await recv(client)

    pong = asyncio.run(main())
    assert (pong["type"], pong["id"]) == ("pong", "after")


@pytest.mark.parametrize(
    "secret",
    [
        b"short",
        "c2hvcnQ",
        "this is my long shared passphrase!! it is certainly not base64url text at all",
        "A" * 42 + "+/",  # standard base64, not base64url
    ],
)
def test_an_unusable_signing_key_is_refused_when_the_client_is_made(secret: bytes | str) -> None:
    """Not at the first send, from inside hmac (a str), nor as the server's bad_signature
    (the text's bytes taken for the key)."""
    with pytest.raises(ValueError, match="signing_key"):
        WsguardClient("ws://127.0.0.1:1/", token=make_token(), signing_key=("k1", secret))
