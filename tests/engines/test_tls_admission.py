"""TLS handshakes under the handshake policy: pending limits and the timeout from the TCP
accept, the audit of failed TLS handshakes, session resumption with client certificates,
and server names that are not ASCII.

Real certificates (``trustme``), real TLS clients (``ssl`` sockets), servers on loopback
ports, on every engine.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import RunningServer, ServerFactory, make_token, upgrade_request
from support.tls_client import client_context
from support.wire import frame

UTC = datetime.UTC
#: the first bytes of a TLS record announcing a ClientHello of 512 bytes, which never come
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00"
CLOSE_OPCODE = 0x8


@dataclass
class Pki:
    """The server's CA and certificate, and a CA for client certificates."""

    ca: trustme.CA
    client_ca: trustme.CA
    cert_file: Path
    key_file: Path
    client_ca_file: Path

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"tls": {"cert_file": str(self.cert_file), "key_file": str(self.key_file), **extra}}

    def mtls(self, **extra: Any) -> dict[str, Any]:
        return self.tls(client_ca_file=str(self.client_ca_file), **extra)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, client_ca = trustme.CA(), trustme.CA()
    out = Pki(
        ca, client_ca, tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "clients.pem"
    )
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(out.cert_file))
    leaf.private_key_pem.write_to_path(str(out.key_file))
    client_ca.cert_pem.write_to_path(str(out.client_ca_file))
    return out


TLS_VERSIONS = pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)


@dataclass
class Upgrade:
    """What a client got for its upgrade request over TLS."""

    answer: bytes  # the HTTP answer (b"" when none came: the connection ended)
    reused: bool  # the TLS handshake resumed a session
    session: ssl.SSLSession | None
    peer_cert: bytes | None


def tls_upgrade(
    port: int,
    ctx: ssl.SSLContext,
    *,
    session: ssl.SSLSession | None = None,
    token: str | None = None,
) -> Upgrade:
    """A TLS handshake (resuming *session* if given), an upgrade request, its answer; an
    admitted connection is closed with a close frame, answered before the end of the
    stream (a clean close: the server's TLS close_notify keeps the session resumable)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except (ssl.SSLError, OSError):
            return Upgrade(b"", False, None, None)
        with tls:
            reused, peer = bool(tls.session_reused), tls.getpeercert(binary_form=True)
            answer = b""
            try:
                tls.sendall(upgrade_request(host="localhost", token=token))
                while b"\r\n\r\n" not in answer:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                if answer.startswith(b"HTTP/1.1 101 "):
                    tls.sendall(frame(CLOSE_OPCODE, (1000).to_bytes(2, "big")))
                    while tls.recv(65536):  # the welcome, the close frame, the end
                        pass
            except (ssl.SSLError, OSError):
                pass  # TLS 1.3: a refused client certificate shows on the first read
            return Upgrade(answer, reused, tls.session, peer)


def wait_until(server: RunningServer, condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for *condition*, one round trip through the server's loop at a time
    (audit lines are written as the server handles the connection)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        server.call(lambda: None)


def tls_failures(server: RunningServer) -> list[tuple[str, str]]:
    return [(str(e["reason"]), str(e["client"])) for e in server.audit.events("tls_failed")]


def refused(server: RunningServer) -> list[tuple[Any, str, str]]:
    return [
        (e.get("status"), str(e["reason"]), str(e["client"]))
        for e in server.audit.events("handshake_refused")
    ]


def handshake_metrics(server: RunningServer) -> dict[tuple[str, str], int]:
    metrics = server.app.guard.monitor.metrics
    return dict(server.call(lambda: dict(metrics.handshakes)))


def ended_without_answer(sock: socket.socket, seconds: float = 5) -> bool:
    """The server closed *sock* within *seconds* and sent nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_open(sock: socket.socket) -> bool:
    """Nothing came on *sock*, and it is not closed (at this moment)."""
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return False


@contextlib.contextmanager
def partial_hellos(port: int, count: int) -> Iterator[list[socket.socket]]:
    """*count* sockets that each sent the start of a ClientHello and nothing more."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(sock)
            sock.sendall(PARTIAL_CLIENT_HELLO)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def welcomed(port: int, ctx: ssl.SSLContext, token: str | None = None) -> bool:
    return tls_upgrade(port, ctx, token=token).answer.startswith(b"HTTP/1.1 101 ")


# ========================================================================== pending limits


def test_tls_handshakes_in_progress_count_per_address(
    server_factory: ServerFactory, pki: Pki
) -> None:
    """Sockets still in their TLS handshake are pending handshakes from their accept:
    past ``pending_handshakes_per_address`` the next one is closed at once (no TLS yet,
    so no HTTP answer), audited as the plaintext refusal is (status none)."""
    limits = {"pending_handshakes_per_address": 3, "handshake_timeout_seconds": 30}
    server = server_factory({**pki.tls(), "limits": limits})
    with partial_hellos(server.port, 3) as held:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            extra.sendall(PARTIAL_CLIENT_HELLO)
            assert ended_without_answer(extra)
        assert all(still_open(sock) for sock in held)  # counted first, held on
        wait_until(server, lambda: bool(refused(server)), "the refusal's audit line")
        assert refused(server) == [(None, "too_many_pending", "127.0.0.1")]
        assert not welcomed(server.port, client_context(pki.ca), make_token())
    # the held sockets gone, their slots come back
    deadline = time.monotonic() + 10
    while not welcomed(server.port, client_context(pki.ca), make_token()):
        assert time.monotonic() < deadline, "the pending slots never came back"
    assert handshake_metrics(server).get(("refused", "too_many_pending"), 0) >= 2


def test_tls_handshakes_in_progress_count_toward_the_global_cap(
    server_factory: ServerFactory, pki: Pki
) -> None:
    limits = {"max_pending_handshakes": 4, "handshake_timeout_seconds": 30}
    server = server_factory({**pki.tls(), "limits": limits})
    with partial_hellos(server.port, 4) as held:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert ended_without_answer(extra)
        assert all(still_open(sock) for sock in held)
        wait_until(server, lambda: bool(refused(server)), "the refusal's audit line")
        assert refused(server) == [(None, "server_full", "127.0.0.1")]


def test_one_timeout_covers_the_tls_handshake_and_is_audited(
    server_factory: ServerFactory, pki: Pki
) -> None:
    """A socket stuck in its TLS handshake is dropped at ``handshake_timeout_seconds``
    from its accept and audited as a handshake timeout, as a slow request head is."""
    server = server_factory({**pki.tls(), "limits": {"handshake_timeout_seconds": 1}})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(PARTIAL_CLIENT_HELLO)
        started = time.monotonic()
        assert ended_without_answer(sock, 8)
        assert time.monotonic() - started < 6
    wait_until(server, lambda: bool(refused(server)), "the timeout's audit line")
    assert refused(server) == [(None, "handshake_timeout", "127.0.0.1")]
    assert tls_failures(server) == []  # audited once
    assert welcomed(server.port, client_context(pki.ca), make_token())


# ========================================================================== failed TLS


def expired_cert(client_ca: trustme.CA) -> trustme.LeafCert:
    past = datetime.datetime.now(UTC) - datetime.timedelta(days=1)
    return client_ca.issue_cert(
        "alice@example.com",
        common_name="alice",
        not_before=past - datetime.timedelta(days=30),
        not_after=past,
    )


def future_cert(client_ca: trustme.CA) -> trustme.LeafCert:
    soon = datetime.datetime.now(UTC) + datetime.timedelta(days=1)
    return client_ca.issue_cert(
        "alice@example.com",
        common_name="alice",
        not_before=soon,
        not_after=soon + datetime.timedelta(days=30),
    )


CERT_CASES: dict[str, Callable[[trustme.CA], trustme.LeafCert | None]] = {
    "no_certificate": lambda ca: None,
    "certificate_expired": expired_cert,
    "certificate_not_yet_valid": future_cert,
    "certificate_untrusted": lambda ca: trustme.CA().issue_cert("alice@x", common_name="alice"),
}


@TLS_VERSIONS
@pytest.mark.parametrize("reason", list(CERT_CASES))
def test_a_client_certificate_refused_by_tls_is_audited(
    server_factory: ServerFactory, pki: Pki, version: ssl.TLSVersion, reason: str
) -> None:
    server = server_factory(pki.mtls())
    cert = CERT_CASES[reason](pki.client_ca)
    got = tls_upgrade(server.port, client_context(pki.ca, cert=cert, maximum=version))
    assert got.answer == b""
    wait_until(server, lambda: bool(tls_failures(server)), "the tls_failed audit line")
    assert tls_failures(server) == [(reason, "127.0.0.1")]
    line = server.audit.events("tls_failed")[0]
    assert set(line) == {"time", "event", "reason", "client"}  # nothing of the certificate
    assert server.audit.events("connection_admitted") == []
    refusals = server.app.guard.monitor.metrics.refusals
    assert refusals["handshake", "auth"] == 1  # counted: alert rules on auth failures see it
    good = client_context(pki.ca, cert=pki.client_ca.issue_cert("a@x", common_name="alice"))
    assert welcomed(server.port, good)


def test_a_plaintext_request_on_the_tls_port_is_audited_as_a_protocol_failure(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory(pki.tls())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(upgrade_request(token=make_token()))
        with contextlib.suppress(OSError):
            sock.recv(4096)  # a TLS alert, no HTTP
    wait_until(server, lambda: bool(tls_failures(server)), "the tls_failed audit line")
    assert tls_failures(server) == [("protocol", "127.0.0.1")]
    assert server.app.guard.monitor.metrics.refusals["handshake", "protocol"] == 1


# ========================================================================== resumption


def alice(pki: Pki) -> trustme.LeafCert:
    return pki.client_ca.issue_cert("alice@example.com", common_name="alice")


@TLS_VERSIONS
def test_with_client_certificates_no_session_is_ever_resumed(
    server_factory: ServerFactory, pki: Pki, version: ssl.TLSVersion
) -> None:
    """With a client CA no session resumes: a resumption would skip the verification of
    the client's chain. TLS 1.3 gets no ticket at all; a TLS 1.2 session resumed by its
    id (OpenSSL's server cache) is refused, and the next attempt is a full handshake."""
    server = server_factory(pki.mtls())
    ctx = client_context(pki.ca, cert=alice(pki), maximum=version)
    first = tls_upgrade(server.port, ctx)
    assert first.answer.startswith(b"HTTP/1.1 101 "), first.answer
    assert first.session is not None
    assert not first.session.has_ticket
    second = tls_upgrade(server.port, ctx, session=first.session)
    assert second.reused is (version is ssl.TLSVersion.TLSv1_2)
    if second.reused:  # TLS 1.2: by session id
        assert second.answer == b""
        wait_until(server, lambda: bool(tls_failures(server)), "the tls_failed audit line")
        assert tls_failures(server) == [("session_resumed", "127.0.0.1")]
        # not an authentication failure of the client's (alert rules count those)
        assert server.app.guard.monitor.metrics.refusals["handshake", "auth"] == 0
        # the refused session left the server's cache: a retry is a full handshake
        third = tls_upgrade(server.port, ctx, session=first.session)
        assert not third.reused
        assert third.answer.startswith(b"HTTP/1.1 101 "), third.answer
    else:
        assert second.answer.startswith(b"HTTP/1.1 101 "), second.answer
        assert tls_failures(server) == []
    admitted = server.audit.events("connection_admitted")
    assert len(admitted) == 2


@TLS_VERSIONS
def test_a_session_from_before_a_client_ca_reload_is_not_admitted(
    server_factory: ServerFactory, pki: Pki, version: ssl.TLSVersion
) -> None:
    """The client CA file is replaced (SIGHUP): a client of the old CA is refused by a full
    handshake, and resuming a session it made before the reload admits it neither."""
    server = server_factory(pki.mtls())
    ctx = client_context(pki.ca, cert=alice(pki), maximum=version)
    first = tls_upgrade(server.port, ctx)
    assert first.answer.startswith(b"HTTP/1.1 101 "), first.answer
    trustme.CA().cert_pem.write_to_path(str(pki.client_ca_file))  # another CA only
    assert server.call(server.app.reload_tls) is True
    assert tls_upgrade(server.port, ctx).answer == b""
    resumed = tls_upgrade(server.port, ctx, session=first.session)
    assert resumed.answer == b""
    assert len(server.audit.events("connection_admitted")) == 1


@TLS_VERSIONS
def test_without_client_certificates_sessions_resume_until_a_reload(
    server_factory: ServerFactory, pki: Pki, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Without client certificates sessions resume (a TLS 1.2 or 1.3 client skips the
    full handshake); after a reload, a session made with the old certificate is not
    resumed: the client gets a full handshake and the new certificate."""
    server = server_factory(pki.tls())
    new_ca = trustme.CA()
    ctx = client_context(pki.ca, new_ca, maximum=version)
    first = tls_upgrade(server.port, ctx, token=make_token())
    assert first.answer.startswith(b"HTTP/1.1 101 "), first.answer
    again = tls_upgrade(server.port, ctx, session=first.session, token=make_token())
    assert again.reused
    assert again.answer.startswith(b"HTTP/1.1 101 "), again.answer
    leaf = new_ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    leaf.private_key_pem.write_to_path(str(pki.key_file))
    assert server.call(server.app.reload_tls) is True
    after = tls_upgrade(server.port, ctx, session=first.session, token=make_token())
    assert not after.reused
    assert after.peer_cert == ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert after.answer.startswith(b"HTTP/1.1 101 "), after.answer


# ========================================================================== server names


def client_hello(server_name: str) -> bytes:
    """The first flight of a TLS client that sends *server_name* (as it is, ASCII)."""
    ctx = client_context(trustme.CA())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_server_name_that_is_not_ascii_prints_nothing(
    server_factory: ServerFactory, pki: Pki
) -> None:
    """A ClientHello whose server name has bytes over 0x7F: no "Exception ignored" on the
    server's stderr (nothing reaches sys.unraisablehook), and the server serves on."""
    server = server_factory(pki.tls())
    hello = client_hello("aaaa.example.com")
    assert hello.count(b"aaaa.example.com") == 1
    hello = hello.replace(b"aaaa.example.com", b"\xc3\xa9\xc3\xa9.example.com")
    unraisable: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(hello)
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                sock.recv(65536)  # the server's answer (a ServerHello, or an alert)
        # a full handshake after it: the one before it has been handled by then
        assert welcomed(server.port, client_context(pki.ca), make_token())
    finally:
        sys.unraisablehook = previous
    assert [repr(u.exc_value) for u in unraisable] == []
