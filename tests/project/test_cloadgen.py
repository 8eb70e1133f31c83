"""The C load generator of the benchmarks (benchmarks/cloadgen.py) against a real
``wsguard serve --config benchmarks/bench.toml``, over loadgen.py's JSON protocol: every
ping answered, handshakes closed cleanly, refusals counted by kind. No timing asserted."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from support.cli import cli_env
from support.paths import REPO
from support.serve_process import Served

sys.path.insert(0, str(REPO))

from benchmarks import cloadgen
from benchmarks.bench import CONFIG, ORIGIN, mint_tokens

pytestmark = pytest.mark.skipif(
    cloadgen.compiler() is None, reason="no C compiler (cc, gcc or clang) to build the program"
)

SECRET = secrets.token_urlsafe(48)


@contextmanager
def serving(home: Path, **env: str) -> Iterator[Served]:
    """The benchmark's server (its own per test: refusals ban the address)."""
    environ = cli_env(
        home, WSGUARD_JWT_SECRET=SECRET, WSGUARD_AUDIT__FILE=str(home / "audit.jsonl"), **env
    )
    server = Served(["--config", str(CONFIG), "--port", "0"], environ, home / "stdout.log")
    try:
        server.wait_listening()
        yield server
    finally:
        server.kill()


def run_phase(
    served: Served, phase: str, tokens: list[str], conns: int, depth: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One phase of 1 s through benchmarks/cloadgen.py: its ready and result lines."""
    config = {
        "phase": phase,
        "client": "c",
        "host": served.host,
        "port": served.port,
        "origin": ORIGIN,
        "tokens": tokens,
        "conns": conns,
        "msg_bytes": 100,
        "depth": depth,
        "timeout": 5.0,
        "index": 0,
        "spread": False,
        "max_seconds": 30,  # the program's own hard stop: the reads below cannot hang
    }
    script = Path(cloadgen.__file__)
    with subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(config) + "\n")
        proc.stdin.flush()
        ready = json.loads(proc.stdout.readline())
        t0 = time.monotonic() + 0.2
        proc.stdin.write(json.dumps({"cmd": "go", "t0": t0, "t1": t0 + 1.0}) + "\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=30) == 0
    assert ready["event"] == "ready" and result["event"] == "result"
    return ready, result


def test_every_ping_is_answered_and_every_handshake_closes_cleanly(tmp_path: Path) -> None:
    # the server pings every 0.2 s and closes (1011) a connection whose pong is 0.5 s late:
    # the load generator must answer the server's pings too
    fast_pings = {
        "WSGUARD_LIVENESS__PING_INTERVAL_SECONDS": "0.2",
        "WSGUARD_LIVENESS__PING_TIMEOUT_SECONDS": "0.5",
    }
    tokens = mint_tokens(SECRET, 8)
    with serving(tmp_path, **fast_pings) as served:
        ready, pingpong = run_phase(served, "pingpong", tokens, conns=4, depth=4)
        _, handshakes = run_phase(served, "handshake", tokens, conns=2)
    assert ready["opened"] == 4 and ready["open_errors"] == {}
    assert pingpong["errors"] == {}
    assert pingpong["count"] > 0
    assert sum(pingpong["hist"].values()) == pingpong["count"]
    assert handshakes["errors"] == {}
    assert handshakes["count"] > 0
    assert sum(handshakes["hist"].values()) == handshakes["count"]


def test_a_one_way_stream_ends_with_its_pong(tmp_path: Path) -> None:
    # (a pong to a server ping waits behind the stream the server has yet to read: no
    # short ping timeout here)
    with serving(tmp_path) as served:
        ready, oneway = run_phase(served, "oneway", mint_tokens(SECRET, 1), conns=1)
    assert ready["opened"] == 1
    assert oneway["errors"] == {}  # the final ping's pong came back: all were processed
    assert oneway["count"] > 0


def test_refused_handshakes_are_counted_by_kind(tmp_path: Path) -> None:
    wrong = mint_tokens(secrets.token_urlsafe(48), 1)  # signed with another secret
    with serving(tmp_path) as served:
        _, result = run_phase(served, "handshake", wrong, conns=1)
    assert result["count"] == 0
    assert result["errors"], result
    assert all(kind.startswith("HandshakeError: HTTP/1.1 4") for kind in result["errors"])
