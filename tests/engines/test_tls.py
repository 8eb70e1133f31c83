"""Encrypted transport: wss://, TLS versions and ciphers, mTLS identity, certificate reload.

Every test uses real certificates made with ``trustme`` and real TLS clients
(``websockets.sync.client`` with an ``ssl.SSLContext``, and raw ``ssl`` sockets).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection

from conftest import SECRET, RunningServer, ServerFactory, make_config, make_token, upgrade_request
from support.paths import WSGUARD
from support.serve_process import Served
from support.tls_client import client_context, connect_tls, tls_socket
from wsguard.engines.tls import check_listener
from wsguard.errors import ConfigError
from wsguard.hosts.app import App

LISTENING_WSS = re.compile(r"listening on wss://127\.0\.0\.1:(\d+)/")
UTC = datetime.UTC
# how a websockets client fails when TLS refuses it: in the handshake (TLS 1.2), or with
# TLS 1.3 client certificates after the client sent its request (alert, EOF, reset)
NOT_UPGRADED = (OSError, InvalidHandshake, ConnectionClosed)

# -------------------------------------------------------------------------- certificates


@dataclass
class ServerPki:
    """A CA and a server certificate for localhost / 127.0.0.1, written to files."""

    ca: trustme.CA
    cert_file: Path
    key_file: Path
    ca_file: Path

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"tls": {"cert_file": str(self.cert_file), "key_file": str(self.key_file), **extra}}

    def mtls(self, **extra: Any) -> dict[str, Any]:
        return self.tls(client_ca_file=str(self.ca_file), **extra)


def write_server_cert(ca: trustme.CA, cert_file: Path, key_file: Path) -> None:
    """Issue a localhost server certificate from *ca* and (over)write the files."""
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))


@pytest.fixture
def pki(tmp_path: Path) -> ServerPki:
    ca = trustme.CA()
    out = ServerPki(ca, tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")
    write_server_cert(ca, out.cert_file, out.key_file)
    ca.cert_pem.write_to_path(str(out.ca_file))
    return out


def issue_uri_cert(ca: trustme.CA, uri: str, common_name: str) -> trustme.LeafCert:
    """A client certificate with a URI SAN (trustme cannot issue those), signed by *ca*."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return trustme.LeafCert(key_pem, cert.public_bytes(serialization.Encoding.PEM), [])


# -------------------------------------------------------------------------- clients


def wss_connect(port: int, ctx: ssl.SSLContext, token: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    ws = connect_tls(
        f"wss://127.0.0.1:{port}/",  # not localhost: ::1 may be another worker's server
        ssl=ctx,
        additional_headers=headers,
        open_timeout=10,
        close_timeout=5,
    )
    ws.pending_legacy_warning = False  # callers use it as a context manager
    return ws


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return data


def welcome_of(port: int, ctx: ssl.SSLContext, token: str | None = None) -> dict[str, Any]:
    """Connect, read the welcome, check ping/pong works, close."""
    with wss_connect(port, ctx, token) as ws:
        welcome = recv_json(ws)
        assert welcome["type"] == "welcome", welcome
        assert_ping(ws, "after-welcome")
    return welcome


def assert_ping(ws: ClientConnection, ident: str) -> None:
    ws.send(json.dumps({"type": "ping", "id": ident}))
    pong = recv_json(ws)
    assert pong["type"] == "pong", pong
    assert pong["id"] == ident


def status_over_tls(port: int, ctx: ssl.SSLContext, token: str | None = None) -> int:
    """The HTTP status of a refused wss handshake (fails the test if it is admitted)."""
    with pytest.raises(InvalidStatus) as info:
        wss_connect(port, ctx, token).close()
    return info.value.response.status_code


def raw_tls_upgrade(port: int, ctx: ssl.SSLContext, token: str | None) -> bytes:
    """TLS handshake on a raw socket, send an upgrade request, return the answer.

    TLS errors (in the handshake or, with TLS 1.3 client certificates, on the first
    read) propagate as ``ssl.SSLError`` / ``OSError``.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(upgrade_request(host="localhost", token=token))
        chunks: list[bytes] = []
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def assert_not_upgraded(port: int, ctx: ssl.SSLContext, token: str | None) -> None:
    """The TLS layer refuses the client: no HTTP answer at all, certainly no 101."""
    try:
        answer = raw_tls_upgrade(port, ctx, token)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return
    assert not answer.startswith(b"HTTP/"), answer[:200]


def refusals(server: RunningServer) -> list[str]:
    return [str(e["reason"]) for e in server.audit.events("handshake_refused")]


# ========================================================================== wss basics


def test_wss_handshake_with_trusted_certificate(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    with wss_connect(server.port, client_context(pki.ca), make_token("alice")) as ws:
        welcome = recv_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["subject"] == "alice"
        assert tls_socket(ws).version() in ("TLSv1.2", "TLSv1.3")
        assert_ping(ws, "tls-1")
    admitted = server.audit.events("connection_admitted")
    assert len(admitted) == 1
    assert admitted[0]["subject"] == "alice"
    assert admitted[0]["client"] == "127.0.0.1"


def test_wss_still_requires_a_token_without_mtls(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    assert status_over_tls(server.port, client_context(pki.ca)) == 401
    assert refusals(server) == ["missing_credentials"]


def test_a_refused_address_is_answered_from_memory_over_tls(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    """Over TLS too, an address past its handshake allowance gets its 429 (Retry-After)
    at its request's first bytes on every later attempt: decided once by the policy,
    audited once; the socket is only answered once its TLS handshake is done."""
    limits = {"handshakes_per_minute": 1, "handshake_burst": 1}
    server = server_factory({**pki.tls(), "limits": limits})
    ctx = client_context(pki.ca)
    welcome_of(server.port, ctx, make_token())
    for _ in range(4):
        answer = raw_tls_upgrade(server.port, ctx, make_token())
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:100]
        assert b"\r\nRetry-After: " in answer
    assert refusals(server) == ["handshake_rate"]
    assert len(server.audit.events("connection_admitted")) == 1


def test_wss_on_asyncios_own_loop(server_factory: ServerFactory, pki: ServerPki) -> None:
    """The socket is handed from the protocol that accepted it to the engine's through
    the TLS transport of asyncio's own loop too (``await app.serve()`` in an app's loop)."""
    server = server_factory(pki.tls(), asyncio_loop=True)
    assert welcome_of(server.port, client_context(pki.ca), make_token("alice"))["type"] == (
        "welcome"
    )


def test_client_that_does_not_trust_the_ca_fails_verification(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    stranger = trustme.CA()
    with pytest.raises(ssl.SSLCertVerificationError):
        wss_connect(server.port, client_context(stranger), make_token()).close()
    # the same with the system default trust store (a self-made CA is in none)
    default = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        wss_connect(server.port, default, make_token()).close()
    assert server.audit.events("connection_admitted") == []


def test_plaintext_client_on_the_tls_port_is_not_upgraded(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(upgrade_request(token=make_token()))
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer[:200]
    assert server.audit.events("connection_admitted") == []


# ========================================================================== versions, ciphers


def legacy_client(ca: trustme.CA, version: str) -> ssl.SSLContext:
    """A client that offers only TLS 1.0 or 1.1 (SECLEVEL 0 so OpenSSL 3 really offers it)."""
    ctx = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls_version = ssl.TLSVersion.TLSv1 if version == "1.0" else ssl.TLSVersion.TLSv1_1
        ctx.minimum_version = tls_version
        ctx.maximum_version = tls_version
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def legacy_client_can_offer(ca: trustme.CA, version: str) -> bool:
    """Whether the local OpenSSL really speaks *version* (against a permissive server)."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    server_ctx.set_ciphers("ALL:@SECLEVEL=0")
    leaf.configure_cert(server_ctx)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result: list[str | None] = []

        def accept() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    result.append(tls.version())
            except (ssl.SSLError, OSError):
                result.append(None)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                legacy_client(ca, version).wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                negotiated = tls.version()
        except (ssl.SSLError, OSError):
            negotiated = None
        thread.join(timeout=5)
    return negotiated is not None


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_tls_below_1_2_is_refused(
    server_factory: ServerFactory, pki: ServerPki, version: str
) -> None:
    server = server_factory(pki.tls())
    offered = legacy_client_can_offer(pki.ca, version)
    with pytest.raises(ssl.SSLError) as info:
        wss_connect(server.port, legacy_client(pki.ca, version), make_token()).close()
    if offered:
        # the client really offered the old version, so the refusal came from the server
        # (a protocol_version alert, or the server hanging up mid-handshake)
        message = str(info.value).upper()
        assert "NO_CIPHERS" not in message and "NO_PROTOCOLS" not in message, info.value
    assert server.audit.events("connection_admitted") == []
    # control: a TLS 1.2 client is fine on the same server
    tls12 = client_context(pki.ca, maximum=ssl.TLSVersion.TLSv1_2)
    assert welcome_of(server.port, tls12, make_token())["subject"] == "alice"


def test_tls12_client_negotiates_an_ecdhe_aead_suite(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    ctx = client_context(pki.ca, maximum=ssl.TLSVersion.TLSv1_2)
    with wss_connect(server.port, ctx, make_token()) as ws:
        assert recv_json(ws)["type"] == "welcome"
        cipher = tls_socket(ws).cipher()
        version = tls_socket(ws).version()
    assert version == "TLSv1.2"
    assert cipher is not None
    name = cipher[0]
    assert name.startswith("ECDHE-"), name
    assert "GCM" in name or "CHACHA20" in name, name


def test_tls12_client_offering_only_weak_suites_is_refused(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    """No forward secrecy (static RSA kex) or no AEAD (CBC): no common suite."""
    server = server_factory(pki.tls())
    ctx = client_context(pki.ca, maximum=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        wss_connect(server.port, ctx, make_token()).close()
    assert server.audit.events("connection_admitted") == []


def test_min_version_1_3_refuses_a_tls12_only_client(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls(min_version="1.3"))
    tls12 = client_context(pki.ca, maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError) as info:
        wss_connect(server.port, tls12, make_token()).close()
    message = str(info.value).upper()
    assert "NO_CIPHERS" not in message and "NO_PROTOCOLS" not in message, info.value
    assert server.audit.events("connection_admitted") == []
    with wss_connect(server.port, client_context(pki.ca), make_token()) as ws:
        assert recv_json(ws)["type"] == "welcome"
        assert tls_socket(ws).version() == "TLSv1.3"


# ========================================================================== plaintext refusal


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_app_start_refuses_plaintext_on_non_loopback(host: str) -> None:
    config = make_config({"host": host})
    app = App(config)

    async def start() -> None:
        try:
            await app.start()
        finally:
            await app.stop()
            await app.guard.close()

    with pytest.raises(ConfigError) as info:
        asyncio.run(start())
    assert info.value.key == "tls.cert_file"
    assert host in str(info.value)
    assert app.port is None  # never bound


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_check_listener_allows_plaintext_on_loopback(host: str) -> None:
    check_listener(make_config({"host": host}))


def test_check_listener_allows_non_loopback_with_tls(pki: ServerPki) -> None:
    check_listener(make_config({"host": "0.0.0.0", **pki.tls()}))


def test_behind_proxy_requires_trusted_proxies() -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"host": "0.0.0.0", "tls": {"behind_proxy": True}})
    assert info.value.key == "tls.behind_proxy"
    assert "proxy.trusted" in str(info.value)


def test_behind_proxy_with_trusted_proxies_passes_the_listener_check() -> None:
    config = make_config(
        {"host": "0.0.0.0", "tls": {"behind_proxy": True}, "proxy": {"trusted": ["10.0.0.0/8"]}}
    )
    check_listener(config)  # does not raise
    with pytest.raises(ConfigError):  # the same host without the proxy flag does
        check_listener(make_config({"host": "0.0.0.0"}))


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(home)
    env["WSGUARD_JWT_SECRET"] = SECRET
    env.update(extra)
    return env


def test_cli_serve_refuses_plaintext_on_public_host(tmp_path: Path) -> None:
    done = subprocess.run(
        [WSGUARD, "serve", "--host", "0.0.0.0", "--port", "0"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "tls.cert_file" in done.stderr
    assert "listening" not in done.stderr


def test_cli_tls_key_without_cert_exits_2(tmp_path: Path, pki: ServerPki) -> None:
    done = subprocess.run(
        [WSGUARD, "serve", "--port", "0", "--tls-key", str(pki.key_file)],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "tls.cert_file" in done.stderr
    assert "listening" not in done.stderr


# ========================================================================== mTLS required


@pytest.fixture
def client_ca() -> trustme.CA:
    """The CA of client certificates (distinct from the server's CA)."""
    return trustme.CA()


def mtls_overrides(
    pki: ServerPki, client_ca: trustme.CA, tmp_path: Path, **extra: Any
) -> dict[str, Any]:
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    return pki.tls(client_ca_file=str(ca_file), **extra)


@pytest.fixture
def mtls_server(
    server_factory: ServerFactory, pki: ServerPki, client_ca: trustme.CA, tmp_path: Path
) -> RunningServer:
    return server_factory(
        mtls_overrides(pki, client_ca, tmp_path, cert_scopes={"alice": ["admin", "chat"]})
    )


def alice_cert(client_ca: trustme.CA) -> trustme.LeafCert:
    return client_ca.issue_cert("alice@example.com", common_name="alice")


def test_mtls_required_cert_alone_authenticates_with_cn_and_mapped_scopes(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    welcome = welcome_of(mtls_server.port, ctx)  # no token at all
    assert welcome["subject"] == "alice"
    assert welcome["scopes"] == ["admin", "chat"]
    admitted = mtls_server.audit.events("connection_admitted")
    assert [e["subject"] for e in admitted] == ["alice"]
    assert admitted[0].get("token_id") is None


def test_mtls_required_unmapped_identity_gets_no_scopes(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=client_ca.issue_cert("bob@example.com", common_name="bob"))
    with wss_connect(mtls_server.port, ctx) as ws:
        welcome = recv_json(ws)
        assert welcome["subject"] == "bob"
        assert welcome["scopes"] == []
        # command needs the admin scope: the certificate's identity has none
        ws.send(json.dumps({"type": "command", "name": "reload", "id": 7}))
        error = recv_json(ws)
    assert error["type"] == "error"
    assert error["code"] == "forbidden"
    assert error["ref"] == 7


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mtls_required_client_without_certificate_is_not_upgraded(
    mtls_server: RunningServer, pki: ServerPki, maximum: ssl.TLSVersion
) -> None:
    # with a valid token: only the TLS layer can stop this client
    ctx = client_context(pki.ca, maximum=maximum)
    assert_not_upgraded(mtls_server.port, ctx, make_token("alice"))
    with pytest.raises(NOT_UPGRADED):
        wss_connect(mtls_server.port, ctx, make_token("alice")).close()
    assert mtls_server.audit.events("connection_admitted") == []
    assert mtls_server.connection_count() == 0


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mtls_required_certificate_from_another_ca_fails(
    mtls_server: RunningServer, pki: ServerPki, maximum: ssl.TLSVersion
) -> None:
    rogue = trustme.CA().issue_cert("alice@example.com", common_name="alice")
    ctx = client_context(pki.ca, cert=rogue, maximum=maximum)
    assert_not_upgraded(mtls_server.port, ctx, make_token("alice"))
    with pytest.raises(NOT_UPGRADED):
        wss_connect(mtls_server.port, ctx).close()
    assert mtls_server.audit.events("connection_admitted") == []


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mtls_required_expired_certificate_fails(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA, maximum: ssl.TLSVersion
) -> None:
    past = datetime.datetime.now(UTC) - datetime.timedelta(days=1)
    expired = client_ca.issue_cert(
        "alice@example.com",
        common_name="alice",
        not_before=past - datetime.timedelta(days=30),
        not_after=past,
    )
    ctx = client_context(pki.ca, cert=expired, maximum=maximum)
    assert_not_upgraded(mtls_server.port, ctx, make_token("alice"))
    with pytest.raises(NOT_UPGRADED):
        wss_connect(mtls_server.port, ctx).close()
    assert mtls_server.audit.events("connection_admitted") == []
    # control: a fresh certificate of the same CA and name is accepted
    fresh = client_context(pki.ca, cert=alice_cert(client_ca), maximum=maximum)
    assert welcome_of(mtls_server.port, fresh)["subject"] == "alice"


@pytest.mark.parametrize(
    ("source", "identities", "common_name", "expected"),
    [
        ("cn", ("carol@example.com", "carol.example.com"), "carol", "carol"),
        ("san_email", ("carol@example.com", "carol.example.com"), "not-carol", "carol@example.com"),
        ("san_dns", ("carol@example.com", "carol.example.com"), "not-carol", "carol.example.com"),
    ],
)
def test_mtls_identity_from_maps_subject_and_scopes(
    server_factory: ServerFactory,
    pki: ServerPki,
    client_ca: trustme.CA,
    tmp_path: Path,
    source: str,
    identities: tuple[str, ...],
    common_name: str,
    expected: str,
) -> None:
    server = server_factory(
        mtls_overrides(
            pki,
            client_ca,
            tmp_path,
            identity_from=source,
            # only the configured source may match: every other name maps to "admin"
            cert_scopes={
                name: (["chat"] if name == expected else ["admin"])
                for name in (*identities, common_name)
            },
        )
    )
    cert = client_ca.issue_cert(*identities, common_name=common_name)
    welcome = welcome_of(server.port, client_context(pki.ca, cert=cert))
    assert welcome["subject"] == expected
    assert welcome["scopes"] == ["chat"]


def test_mtls_identity_from_san_uri(
    server_factory: ServerFactory, pki: ServerPki, client_ca: trustme.CA, tmp_path: Path
) -> None:
    uri = "spiffe://example.org/svc/billing"
    server = server_factory(
        mtls_overrides(
            pki, client_ca, tmp_path, identity_from="san_uri", cert_scopes={uri: ["data"]}
        )
    )
    cert = issue_uri_cert(client_ca, uri, common_name="billing")
    welcome = welcome_of(server.port, client_context(pki.ca, cert=cert))
    assert welcome["subject"] == uri
    assert welcome["scopes"] == ["data"]


def test_mtls_certificate_without_the_configured_san_is_refused(
    server_factory: ServerFactory, pki: ServerPki, client_ca: trustme.CA, tmp_path: Path
) -> None:
    """identity_from = san_email but the certificate has no email SAN: no identity, so
    the certificate is refused, with or without a token (dave's own included)."""
    server = server_factory(mtls_overrides(pki, client_ca, tmp_path, identity_from="san_email"))
    cert = client_ca.issue_cert("dave.example.com", common_name="dave")
    ctx = client_context(pki.ca, cert=cert)
    assert status_over_tls(server.port, ctx) == 401
    assert status_over_tls(server.port, ctx, make_token("dave")) == 401
    assert refusals(server) == ["certificate_mismatch", "certificate_mismatch"]
    assert server.audit.events("connection_admitted") == []


def issue_names_cert(
    ca: trustme.CA, common_names: list[str], emails: list[str]
) -> trustme.LeafCert:
    """A client certificate with any number of CNs and email SANs, signed by *ca*."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in common_names]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if emails:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return trustme.LeafCert(key_pem, cert.public_bytes(serialization.Encoding.PEM), [])


@pytest.mark.parametrize(
    ("common_names", "emails"),
    [
        ([], ["mallory@example.com"]),  # no CN at all, only an email SAN
        (["mallory", "alice"], []),  # two CNs: which one wins differs between TLS stacks
        (["alice", "alice"], []),  # the same CN twice is still ambiguous
        (["ali\tce"], []),  # a control character: not a subject a token could carry
    ],
    ids=["no-cn", "two-cns", "cn-twice", "control-character"],
)
@pytest.mark.parametrize("mode", ["required", "optional"])
def test_mtls_certificate_naming_no_single_usable_identity_is_refused(
    server_factory: ServerFactory,
    pki: ServerPki,
    client_ca: trustme.CA,
    tmp_path: Path,
    common_names: list[str],
    emails: list[str],
    mode: str,
) -> None:
    """A verified certificate from the users' CA that yields no single printable identity,
    together with another user's valid token, is refused: the binding is never skipped."""
    server = server_factory(mtls_overrides(pki, client_ca, tmp_path, client_cert=mode))
    ctx = client_context(pki.ca, cert=issue_names_cert(client_ca, common_names, emails))
    assert status_over_tls(server.port, ctx, make_token("alice")) == 401
    if mode == "required":
        assert status_over_tls(server.port, ctx) == 401  # nor does it authenticate alone
    assert set(refusals(server)) == {"certificate_mismatch"}
    assert server.audit.events("connection_admitted") == []
    # control: a certificate naming alice once, with alice's token, is admitted
    good = client_context(pki.ca, cert=issue_names_cert(client_ca, ["alice"], []))
    assert welcome_of(server.port, good, make_token("alice"))["subject"] == "alice"


def test_mtls_required_token_for_another_subject_is_certificate_mismatch(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    with pytest.raises(InvalidStatus) as info:
        wss_connect(mtls_server.port, ctx, make_token("mallory", scopes="admin")).close()
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert refusals(mtls_server) == ["certificate_mismatch"]
    assert mtls_server.audit.events("connection_admitted") == []


def test_mtls_required_token_for_the_same_subject_merges_scopes(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    welcome = welcome_of(mtls_server.port, ctx, make_token("alice", scopes="data"))
    assert welcome["subject"] == "alice"
    assert welcome["scopes"] == ["admin", "chat", "data"]
    assert [e["subject"] for e in mtls_server.audit.events("connection_admitted")] == ["alice"]


def test_mtls_required_with_invalid_token_is_refused_even_with_a_good_cert(
    mtls_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    bad = make_token("alice", secret="another-secret-that-is-long-enough-for-hs256-xx")
    assert status_over_tls(mtls_server.port, ctx, bad) == 401
    assert refusals(mtls_server) == ["bad_signature"]


# ========================================================================== mTLS optional


@pytest.fixture
def optional_server(
    server_factory: ServerFactory, pki: ServerPki, client_ca: trustme.CA, tmp_path: Path
) -> RunningServer:
    return server_factory(
        mtls_overrides(
            pki, client_ca, tmp_path, client_cert="optional", cert_scopes={"alice": ["admin"]}
        )
    )


def test_mtls_optional_no_cert_with_token_is_admitted(
    optional_server: RunningServer, pki: ServerPki
) -> None:
    welcome = welcome_of(optional_server.port, client_context(pki.ca), make_token("bob"))
    assert welcome["subject"] == "bob"
    assert welcome["scopes"] == ["chat"]


def test_mtls_optional_no_cert_no_token_is_401(
    optional_server: RunningServer, pki: ServerPki
) -> None:
    assert status_over_tls(optional_server.port, client_context(pki.ca)) == 401
    assert refusals(optional_server) == ["missing_credentials"]


def test_mtls_optional_cert_alone_is_not_enough(
    optional_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    assert status_over_tls(optional_server.port, ctx) == 401
    assert refusals(optional_server) == ["missing_credentials"]


def test_mtls_optional_cert_with_matching_token_is_admitted_with_merged_scopes(
    optional_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    welcome = welcome_of(optional_server.port, ctx, make_token("alice", scopes="chat"))
    assert welcome["subject"] == "alice"
    assert welcome["scopes"] == ["admin", "chat"]


def test_mtls_optional_cert_with_other_subject_token_is_401(
    optional_server: RunningServer, pki: ServerPki, client_ca: trustme.CA
) -> None:
    ctx = client_context(pki.ca, cert=alice_cert(client_ca))
    assert status_over_tls(optional_server.port, ctx, make_token("bob")) == 401
    assert refusals(optional_server) == ["certificate_mismatch"]
    assert optional_server.audit.events("connection_admitted") == []


def test_mtls_optional_untrusted_cert_still_fails_tls(
    optional_server: RunningServer, pki: ServerPki
) -> None:
    rogue = trustme.CA().issue_cert("alice@example.com", common_name="alice")
    ctx = client_context(pki.ca, cert=rogue, maximum=ssl.TLSVersion.TLSv1_2)
    assert_not_upgraded(optional_server.port, ctx, make_token("alice"))
    assert optional_server.audit.events("connection_admitted") == []


# ========================================================================== certificate reload


def test_reload_tls_switches_certificate_and_keeps_open_connections(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    old_ctx = client_context(pki.ca)
    with wss_connect(server.port, old_ctx, make_token("early")) as early:
        assert recv_json(early)["type"] == "welcome"
        new_ca = trustme.CA()
        write_server_cert(new_ca, pki.cert_file, pki.key_file)
        assert server.call(server.app.reload_tls) is True
        # the connection made before the reload is untouched
        assert_ping(early, "still-here")
        # new handshakes present the new certificate
        assert welcome_of(server.port, client_context(new_ca), make_token())["subject"] == "alice"
        with pytest.raises(ssl.SSLCertVerificationError):
            wss_connect(server.port, old_ctx, make_token()).close()
        assert_ping(early, "still-here-2")
    assert [e["subject"] for e in server.audit.events("connection_admitted")] == [
        "early",
        "alice",
    ]


@pytest.mark.parametrize("broken", ["garbage-cert", "empty-cert", "missing-cert"])
def test_reload_with_broken_certificate_keeps_the_old_one(
    server_factory: ServerFactory, pki: ServerPki, broken: str
) -> None:
    server = server_factory(pki.tls())
    if broken == "garbage-cert":
        pki.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n")
    elif broken == "empty-cert":
        pki.cert_file.write_bytes(b"")
    else:
        pki.cert_file.unlink()
    assert server.call(server.app.reload_tls) is False
    assert welcome_of(server.port, client_context(pki.ca), make_token())["subject"] == "alice"


RELOAD_BUG = (
    "BUG: reload_certificate loads into the live SSLContext; when the key fails after the "
    "certificate was loaded, the context keeps the new certificate without a usable key and "
    "every new TLS handshake fails"
)


def test_reload_with_new_cert_but_stale_key_keeps_the_old_one(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    """A half-finished rotation (certificate replaced, key not yet) must not break TLS."""
    server = server_factory(pki.tls())
    new_ca = trustme.CA()
    new_leaf = new_ca.issue_cert("127.0.0.1", "localhost")
    new_leaf.cert_chain_pems[0].write_to_path(str(pki.cert_file))  # key file unchanged
    assert server.call(server.app.reload_tls) is False
    assert welcome_of(server.port, client_context(pki.ca), make_token())["subject"] == "alice"


def test_reload_with_new_cert_and_unreadable_key_keeps_the_old_one(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    server = server_factory(pki.tls())
    new_ca = trustme.CA()
    new_leaf = new_ca.issue_cert("127.0.0.1", "localhost")
    new_leaf.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    pki.key_file.write_text("not a key\n")
    assert server.call(server.app.reload_tls) is False
    assert welcome_of(server.port, client_context(pki.ca), make_token())["subject"] == "alice"


def served_certificate(port: int, ca: trustme.CA) -> bytes:
    """The certificate (DER) the server presents to a client connecting by address (no
    SNI sent), with the client's default signature algorithms."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize(
    ("old", "new"),
    [(trustme.KeyType.ECDSA, trustme.KeyType.RSA), (trustme.KeyType.RSA, trustme.KeyType.ECDSA)],
    ids=["ecdsa-to-rsa", "rsa-to-ecdsa"],
)
def test_a_reload_to_another_key_type_serves_only_the_new_certificate(
    server_factory: ServerFactory, tmp_path: Path, old: trustme.KeyType, new: trustme.KeyType
) -> None:
    """A certificate replaced by one with another key type (a compromised or expiring
    one rotated out): after the reload no client gets the old one. Loading into the live
    context would have added the new one beside it, and clients offering the old key
    type would still be served the old certificate."""
    ca = trustme.CA(key_type=old)
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    first = ca.issue_cert("127.0.0.1", "localhost", key_type=old)
    first.cert_chain_pems[0].write_to_path(str(cert_file))
    first.private_key_pem.write_to_path(str(key_file))
    server = server_factory({"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}})
    assert served_certificate(server.port, ca) == ssl.PEM_cert_to_DER_cert(
        first.cert_chain_pems[0].bytes().decode()
    )
    second = ca.issue_cert("127.0.0.1", "localhost", key_type=new)
    second.cert_chain_pems[0].write_to_path(str(cert_file))
    second.private_key_pem.write_to_path(str(key_file))
    assert server.call(server.app.reload_tls) is True
    assert served_certificate(server.port, ca) == ssl.PEM_cert_to_DER_cert(
        second.cert_chain_pems[0].bytes().decode()
    )
    assert welcome_of(server.port, client_context(ca), make_token())["subject"] == "alice"


def test_complete_rotation_after_a_failed_reload_takes_effect(
    server_factory: ServerFactory, pki: ServerPki
) -> None:
    """Certificate first (reload fails), then the key: the second reload succeeds."""
    server = server_factory(pki.tls())
    new_ca = trustme.CA()
    new_leaf = new_ca.issue_cert("127.0.0.1", "localhost")
    new_leaf.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    assert server.call(server.app.reload_tls) is False
    new_leaf.private_key_pem.write_to_path(str(pki.key_file))
    assert server.call(server.app.reload_tls) is True
    assert welcome_of(server.port, client_context(new_ca), make_token())["subject"] == "alice"
    with pytest.raises(ssl.SSLCertVerificationError):
        wss_connect(server.port, client_context(pki.ca), make_token()).close()


def test_reload_tls_without_tls_is_a_no_op(server: RunningServer) -> None:
    assert server.call(server.app.reload_tls) is False
    with server.connect_welcomed() as ws:
        assert_ping(ws, "plain")


@pytest.fixture
def serve_process() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for proc in started:
        proc.kill()


def test_cli_serves_wss_and_reloads_certificate_on_sighup(
    tmp_path: Path, pki: ServerPki, serve_process: list[Served]
) -> None:
    proc = Served(
        ["--port", "0", "--tls-cert", str(pki.cert_file), "--tls-key", str(pki.key_file)],
        cli_env(tmp_path),
        tmp_path / "audit.jsonl",
    )
    serve_process.append(proc)
    port = int(proc.wait_for(LISTENING_WSS).group(1))
    old_ctx = client_context(pki.ca)
    assert welcome_of(port, old_ctx, make_token("first"))["subject"] == "first"

    with wss_connect(port, old_ctx, make_token("early")) as early:
        assert recv_json(early)["type"] == "welcome"
        new_ca = trustme.CA()
        write_server_cert(new_ca, pki.cert_file, pki.key_file)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for(re.compile(r"certificate reloaded"))
        assert_ping(early, "after-sighup")
        assert welcome_of(port, client_context(new_ca), make_token("late"))["subject"] == "late"
        with pytest.raises(ssl.SSLCertVerificationError):
            wss_connect(port, old_ctx, make_token()).close()
        assert_ping(early, "after-sighup-2")

    # a broken reload keeps the current (new) certificate
    pki.cert_file.write_text("garbage\n")
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(re.compile(r"certificate reload failed"))
    assert welcome_of(port, client_context(new_ca), make_token("later"))["subject"] == "later"

    assert proc.stop() == 0


def test_cli_mtls_flag_requires_client_certificate(
    tmp_path: Path, pki: ServerPki, client_ca: trustme.CA, serve_process: list[Served]
) -> None:
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    proc = Served(
        [
            "--port",
            "0",
            "--tls-cert",
            str(pki.cert_file),
            "--tls-key",
            str(pki.key_file),
            "--tls-client-ca",
            str(ca_file),
        ],
        cli_env(tmp_path),
        tmp_path / "audit.jsonl",
    )
    serve_process.append(proc)
    port = int(proc.wait_for(LISTENING_WSS).group(1))
    welcome = welcome_of(port, client_context(pki.ca, cert=alice_cert(client_ca)))
    assert welcome["subject"] == "alice"
    assert_not_upgraded(port, client_context(pki.ca), make_token("alice"))
    assert proc.stop() == 0


# ========================================================================== handshake timeout


@pytest.fixture
def quick_tls_server(server_factory: ServerFactory, pki: ServerPki) -> RunningServer:
    # 2 s, not 1: the clients that check the server still serves after a timeout must
    # finish their own handshake within it, on a loaded 2-core CI machine
    return server_factory({**pki.tls(), "limits": {"handshake_timeout_seconds": 2}})


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Wait until the peer closes *sock*; return the elapsed time (fail past *seconds*)."""
    sock.settimeout(seconds)
    started = time.monotonic()
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"server kept the connection open for more than {seconds}s")
    return time.monotonic() - started


def test_handshake_timeout_closes_tcp_client_that_never_starts_tls(
    quick_tls_server: RunningServer, pki: ServerPki
) -> None:
    server = quick_tls_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        elapsed = closed_within(sock, 8)
    assert elapsed < 7, elapsed
    assert welcome_of(server.port, client_context(pki.ca), make_token())["subject"] == "alice"


def silent_tls_client(server: RunningServer, ctx: ssl.SSLContext) -> tuple[bytes, float]:
    """Complete the TLS handshake, send no HTTP request; return (answer, seconds to close)."""
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        started = time.monotonic()
        tls.settimeout(8)
        try:
            answer = tls.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            answer = b""
        except TimeoutError:
            pytest.fail("server kept a TLS client without a request past the timeout")
        return answer, time.monotonic() - started


def wait_for_refusal(server: RunningServer) -> list[dict[str, Any]]:
    """The audit record is written when the server tears the connection down: poll for it."""
    deadline = time.monotonic() + 5
    while not server.audit.events("handshake_refused") and time.monotonic() < deadline:
        server.call(lambda: None)  # one round trip through the server loop
    return server.audit.events("handshake_refused")


def test_handshake_timeout_closes_tls_client_that_never_sends_a_request(
    quick_tls_server: RunningServer, pki: ServerPki
) -> None:
    server = quick_tls_server
    answer, elapsed = silent_tls_client(server, client_context(pki.ca))
    assert answer == b"", answer
    assert 1.5 <= elapsed < 7, elapsed
    assert len(wait_for_refusal(server)) == 1
    assert server.audit.events("connection_admitted") == []
    assert welcome_of(server.port, client_context(pki.ca), make_token())["subject"] == "alice"


def test_handshake_timeout_over_tls_is_audited_as_such(
    quick_tls_server: RunningServer, pki: ServerPki
) -> None:
    server = quick_tls_server
    silent_tls_client(server, client_context(pki.ca))
    events = wait_for_refusal(server)
    assert [(e["reason"], e["client"]) for e in events] == [("handshake_timeout", "127.0.0.1")]
