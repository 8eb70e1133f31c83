"""Cluster mode over ``rediss://``: a real redis-server speaking TLS only.

The certificates are real (``trustme``); the Redis has no plaintext port. Two nodes
share limits, a revocation and a broadcast over TLS; a node that does not trust the
Redis certificate refuses handshakes with 503 (bans and revocations fail closed)
instead of talking to an unverified server.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from conftest import RunningServer, ServerFactory, make_token
from support.cluster import (
    CHANNELS,
    chat,
    close_all,
    close_code,
    cluster_config,
    recv_json,
    refusal,
    wait_until,
    welcomed,
)
from support.net import free_port

REDIS_SERVER = shutil.which("redis-server")


class TlsRedis:
    def __init__(self, workdir: Path) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (scripts/test.sh installs it from apt)")
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_file = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = workdir / "redis.pem", workdir / "redis.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", "0",  # no plaintext listener at all
                "--tls-port", str(self.port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(cert_file),
                "--tls-key-file", str(key_file),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server with TLS did not start")
                time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.uri, ssl_ca_certs=str(self.ca_file), socket_timeout=2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "redis-tls")
    yield server
    server.stop()


def tls_nodes(server_factory: ServerFactory, tls_redis: TlsRedis) -> list[RunningServer]:
    overrides = cluster_config(
        tls_redis.uri,
        {"connections_per_subject": 2},
        cluster={"tls_ca_file": str(tls_redis.ca_file)},
    )
    nodes = [server_factory(overrides) for _ in range(2)]
    with tls_redis.client() as client:

        def subscribed() -> bool:
            return all(int(n) == 2 for _, n in client.pubsub_numsub(*CHANNELS))

        wait_until(subscribed, 10, "both nodes subscribed over TLS")
    return nodes


def test_nodes_share_limits_revocations_and_broadcast_over_tls(
    server_factory: ServerFactory, tls_redis: TlsRedis
) -> None:
    a, b = tls_nodes(server_factory, tls_redis)
    alice_a = welcomed(a, make_token("alice"))
    alice_b = welcomed(b, make_token("alice"))
    assert refusal(a, make_token("alice"))[0] == 429  # the subject limit spans both nodes
    with tls_redis.client() as client:  # the slots really are in the TLS Redis
        assert any(b"conn:sub:alice" in key for key in client.keys("*"))

    bob_b = welcomed(b, make_token("bob"))
    message = chat(alice_a, "over TLS", "m1")
    assert recv_json(bob_b) == {"type": "broadcast", "from": "alice", "message": message}

    a.run_coro(a.app.revoke("sub", "alice", 60.0))
    assert close_code(alice_a, 5) == 4003
    assert close_code(alice_b, 5) == 4003
    assert refusal(b, make_token("alice"))[0] == 401
    close_all(bob_b)


def test_a_node_that_does_not_trust_the_redis_certificate_fails_closed(
    server_factory: ServerFactory, tls_redis: TlsRedis, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    node = server_factory(cluster_config(tls_redis.uri, cluster={"tls_ca_file": str(other_ca)}))
    status, body = refusal(node, make_token("alice"))
    assert status == 503
    assert body == "Service temporarily unavailable.\n"
    outage = node.audit.events("store_outage")
    assert len(outage) == 1
    assert "certificate" in outage[0]["detail"].lower()
