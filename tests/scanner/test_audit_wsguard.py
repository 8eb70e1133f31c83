"""``wsguard audit`` against ``wsguard serve``: with the right configuration every check
PASSes (or is N/A for a reason stated), and the outputs are what pipelines expect."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.cli import cli_env, run_cli
from support.paths import WSGUARD
from support.serve_process import Served

SECRET = "audit-test-secret-0123456789abcdef0123"
ORIGIN = "http://allowed.test"
SIGNING = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")
WSS = r"listening on wss://(\[[^\]]+\]|[^:/]+):(\d+)/"
SCAN_TIMEOUT = 240.0
FAST = [
    "--reply-timeout", "1", "--slow-wait", "8", "--idle-wait", "5",
    "--expiry-wait", "8", "--reset-wait", "8",
]  # fmt: skip


def write_config(tmp: Path, extra: str = "") -> Path:
    keys = tmp / "signing-keys.json"
    keys.write_text(
        json.dumps({"keys": [{"kid": "audit", "subject": "wsguard-audit", "secret": SIGNING}]})
    )
    keys.chmod(0o600)
    schemas: dict[str, dict[str, Any]] = {
        "ping": {"id": {"type": ["string", "integer"]}},
        "transfer": {"amount": {"type": "integer"}},
    }
    for name, properties in schemas.items():
        (tmp / f"{name}.json").write_text(
            json.dumps(
                {
                    "type": "object",
                    "properties": {"type": {"type": "string"}, **properties},
                    "required": ["type"],
                    "additionalProperties": False,
                }
            )
        )
    config = tmp / "wsguard.toml"
    config.write_text(
        f"""
compression = true

[auth]
secret = "{SECRET}"
cookie = true

[origin]
allowed = ["{ORIGIN}"]

[limits]
handshake_timeout_seconds = 2.0

[liveness]
ping_interval_seconds = 1.0
ping_timeout_seconds = 2.0

[signing]
keys_file = "{keys}"

[messages.types.ping]
schema_file = "{tmp / "ping.json"}"

[messages.types.transfer]
signed = true
schema_file = "{tmp / "transfer.json"}"

[messages.types.command]
scopes = ["admin"]
{extra}
"""
    )
    return config


def run_audit(args: Sequence[str], home: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["audit", *args], cli_env(home), timeout=SCAN_TIMEOUT)


class Target:
    def __init__(self, served: Served, url: str, ca_file: Path, token: str) -> None:
        self.served, self.url, self.ca_file, self.token = served, url, ca_file, token

    def args(self, *extra: str) -> list[str]:
        return [
            self.url,
            "--jwt-secret", SECRET,
            "--origin-allowed", ORIGIN,
            "--ca-file", str(self.ca_file),
            "--cookie", f"wsguard_token={self.token}",
            "--server-log", str(self.served.audit_path),
            "--replay-message", '{"type": "transfer", "amount": 1}',
            "--signing-key", f"audit:{SIGNING}",
            *FAST,
            *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("audit-wsguard")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    config = write_config(tmp)
    served = Served(
        ["--config", str(config), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)],
        cli_env(tmp),
        tmp / "audit.jsonl",
    )
    import re

    match = served.wait_for(re.compile(WSS))
    url = f"wss://127.0.0.1:{match.group(2)}/"
    token = subprocess.run(
        [WSGUARD, "token", "--config", str(config), "--sub", "cookie-user"],
        env=cli_env(tmp),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.strip()
    try:
        yield Target(served, url, ca_file, token)
    finally:
        served.kill()


def findings(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["check"]: item for item in report["findings"]}


# the default scan runs first: the aggressive one leaves flooded connections closing
def test_default_scan_runs_no_destructive_check(target: Target, tmp_path: Path) -> None:
    started = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out = tmp_path / "report.json"
    done = run_audit(target.args("--format", "json", "--out", str(out)), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    by_id = findings(json.loads(out.read_text()))
    destructive = {"size.limit", "size.frame", "size.fragments", "flood.rate_limit",
                   "conns.limit", "conns.release", "address.spoofing",
                   "handshake.malformed"}  # fmt: skip
    for check in destructive:
        assert by_id[check]["verdict"] == "N/A", by_id[check]
        assert "--aggressive" in by_id[check]["evidence"]
    assert by_id["compression"]["verdict"] == "N/A"  # negotiated, but no bomb without it
    events = [e for e in target.served.audit_events() if e["time"] >= started]
    assert events
    closes = {e.get("code") for e in events if e["event"] == "connection_closed"}
    assert 1009 not in closes  # nothing too big was sent
    assert not [e for e in events if e.get("reason") == "too_many_connections"]
    assert not [e for e in events if e.get("cause") == "rate_limited"]


def test_aggressive_scan_of_wsguard_serve_passes_every_check(
    target: Target, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    done = run_audit(target.args("--aggressive", "--format", "json", "--out", str(out)), tmp_path)
    report = json.loads(out.read_text())
    by_id = findings(report)
    not_passed = {
        check: f"{item['verdict']}: {item['evidence']}"
        for check, item in by_id.items()
        if item["verdict"] != "PASS"
    }
    # the one check that cannot apply: an HS256 deployment has no public key to confuse
    assert not_passed == {
        "auth.alg_confusion": "N/A: the credential is HS256: no public key to confuse it with"
    }, done.stdout + done.stderr
    assert done.returncode == 0, done.stderr
    assert len(by_id) == 35
    # a user may not send an admin-scoped message: refused with forbidden, relayed to nobody
    assert "forbidden" in by_id["authz.privileged"]["evidence"], by_id["authz.privileged"]
    assert report["coverage"]["percent"] == 100.0 and report["coverage"]["needs"] == {}
    # the table still goes to stdout for the humans reading CI logs
    assert "auth.alg_none" in done.stdout and "PASS" in done.stdout
    # the evidence says what actually happened, not just a verdict
    assert "1009" in by_id["size.frame"]["evidence"]
    assert "4001" in by_id["token.expiry"]["evidence"]
    assert "replayed" in by_id["replay"]["evidence"]
    assert "HTTP 403" in by_id["origin.null"]["evidence"]
    assert "TLSv1.3" in by_id["transport.tls_version"]["evidence"]
    assert "negotiated" in by_id["compression"]["evidence"]


def test_coverage_says_what_was_examined_and_can_gate_ci(target: Target, tmp_path: Path) -> None:
    """Without options most checks cannot run: the summary says how much was examined and
    what to pass for the rest, and --min-coverage / --require-complete fail the gate (4)."""
    out = tmp_path / "r.json"
    base = [target.url, "--ca-file", str(target.ca_file), *FAST]
    done = run_audit([*base, "--format", "json", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    coverage = json.loads(out.read_text())["coverage"]
    assert 0 < coverage["examined"] < coverage["applicable"] <= coverage["total"] == 35
    assert {"--aggressive", "--jwt-secret or --token", "--server-log"} <= set(coverage["needs"])
    assert "size.limit" in coverage["needs"]["--aggressive"]
    assert "auth.signature" in coverage["needs"]["--jwt-secret or --token"]
    summary = re.search(r"coverage \d+%: examined \d+ of the \d+ checks that apply", done.stdout)
    assert summary is not None, done.stdout
    assert "pass --aggressive" in done.stdout.replace("\n", " ")
    gated = run_audit([*base, "--require-complete"], tmp_path)
    assert gated.returncode == 4, gated.stdout + gated.stderr
    assert "--min-coverage 100" in gated.stderr
    assert run_audit([*base, "--min-coverage", "1"], tmp_path).returncode == 0


def test_rs256_deployment_refuses_algorithm_confusion(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private_pem.chmod(0o600)
    config = tmp_path / "rs.toml"
    config.write_text(f'[auth]\nalgorithms = ["RS256"]\npublic_key_file = "{public_pem}"\n')
    served = Served(["--config", str(config), "--port", "0"], cli_env(tmp_path), tmp_path / "a")
    try:
        port = served.wait_listening()
        token = subprocess.run(
            [WSGUARD, "token", "--config", str(config), "--sub", "rs", "--private-key",
             str(private_pem)],
            env=cli_env(tmp_path), capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()  # fmt: skip
        out = tmp_path / "r.json"
        done = run_audit(
            [f"ws://127.0.0.1:{port}/", "--token", token, "--public-key", str(public_pem),
             "--checks", "auth", "--format", "json", "--out", str(out)],
            tmp_path,
        )  # fmt: skip
    finally:
        served.kill()
    by_id = findings(json.loads(out.read_text()))
    assert by_id["auth.alg_confusion"]["verdict"] == "PASS", by_id["auth.alg_confusion"]
    assert "HTTP 401" in by_id["auth.alg_confusion"]["evidence"]
    assert by_id["auth.alg_none"]["verdict"] == "PASS"
    # a given token (no secret): minted variants are N/A and say what they need
    assert by_id["auth.expired"]["verdict"] == "N/A"
    assert "--jwt-secret" in by_id["auth.expired"]["evidence"]
    assert done.returncode == 0, done.stdout + done.stderr


def test_sarif_and_junit_outputs(target: Target, tmp_path: Path) -> None:
    sarif_path, junit_path = tmp_path / "r.sarif", tmp_path / "r.xml"
    args = target.args("--checks", "auth,origin")
    sarif = run_audit([*args, "--format", "sarif", "--out", str(sarif_path)], tmp_path)
    junit = run_audit([*args, "--format", "junit", "--out", str(junit_path)], tmp_path)
    assert sarif.returncode == 0 and junit.returncode == 0, sarif.stderr + junit.stderr
    log = json.loads(sarif_path.read_text())
    assert log["version"] == "2.1.0"
    run = log["runs"][0]
    rules = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    assert rules[:2] == ["auth.required", "auth.malformed"] and len(rules) == 35
    assert run["results"] == []  # only problems are results: code scanning alerts on each
    assert run["invocations"][0]["executionSuccessful"] is True
    suite = ET.parse(junit_path).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "11" and suite.get("failures") == "0"
    assert suite.get("skipped") == "1"  # auth.alg_confusion
    names = [case.get("name", "") for case in suite.iter("testcase")]
    assert names[0].startswith("auth.required: ")


def test_non_loopback_target_is_refused_without_explicit_consent(tmp_path: Path) -> None:
    done = run_audit(["ws://192.0.2.10/"], tmp_path)  # TEST-NET-1: never contacted
    assert done.returncode == 2
    assert "--i-own-this-target" in done.stderr
    assert "not loopback" in done.stderr


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["ws://127.0.0.1:1/", "--checks", "nosuchcheck"], "--checks"),
        (["ws://127.0.0.1:1/", "--skip", "auth.nope"], "--skip"),
        (["ws://127.0.0.1:1/", "--jwt-claim", "aud"], "--jwt-claim"),
        (["ws://127.0.0.1:1/", "--header", "NoColon"], "--header"),
        (["ws://127.0.0.1:1/", "--token-in", "body"], "--token-in"),
        (["ws://127.0.0.1:1/", "--signing-key", "nokid"], "--signing-key"),
        (["ws://127.0.0.1:1/", "--reply-timeout", "0"], "--reply-timeout"),
        (["ws://127.0.0.1:1/", "--max-message-bytes", "10"], "--max-message-bytes"),
        (["http://127.0.0.1:1/"], "url"),
        ([], "url"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: list[str], key: str, tmp_path: Path) -> None:
    done = run_audit(args, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert key in done.stderr


def test_unreachable_target_is_error_not_pass(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "r.json"
    done = run_audit(
        [f"ws://127.0.0.1:{port}/", "--jwt-secret", SECRET, "--checks", "auth.required,origin",
         "--format", "json", "--out", str(out)],
        tmp_path,
    )  # fmt: skip
    by_id = findings(json.loads(out.read_text()))
    assert by_id["origin.foreign"]["verdict"] == "ERROR", by_id
    assert "refused" in by_id["origin.foreign"]["evidence"].lower()
    # no response at all is not a refusal to trust: auth.required must not PASS either
    assert by_id["auth.required"]["verdict"] == "ERROR", by_id["auth.required"]
    assert done.returncode == 3


def test_token_in_a_subprotocol_is_where_every_probe_puts_it(
    target: Target, tmp_path: Path
) -> None:
    """--token-in decides where the valid and the forged credentials go: with the token in
    the subprotocol list (as browsers must), the forged ones are refused and the real one
    works (else every check would be an ERROR)."""
    out = tmp_path / "r.json"
    args = target.args("--checks", "auth.signature,auth.alg_none,origin.null")
    args += ["--token-in", "subprotocol:token.", "--subprotocol", "wsguard.v1"]
    done = run_audit([*args, "--format", "json", "--out", str(out)], tmp_path)
    by_id = findings(json.loads(out.read_text()))
    assert {check: item["verdict"] for check, item in by_id.items()} == {
        "auth.signature": "PASS",
        "auth.alg_none": "PASS",
        "origin.null": "PASS",
    }, done.stdout
    audit = [e for e in target.served.audit_events() if e["event"] == "connection_admitted"]
    assert audit and all(e.get("subject") != "cookie-user" for e in audit[-3:])


def test_the_first_address_that_accepts_is_scanned(target: Target) -> None:
    """A name may resolve to ::1 first while the server listens on 127.0.0.1 only (e.g.
    localhost); the scan pins the address that answers, not the first one listed."""
    import asyncio

    from wsguard.scanner.options import Target as ScanTarget
    from wsguard.scanner.options import parse_target
    from wsguard.scanner.runner import _reachable

    uri = parse_target(target.url.replace("127.0.0.1", "localhost"))
    listed = ScanTarget(uri, ("::1", "127.0.0.1"), loopback=True)
    assert asyncio.run(_reachable(listed, 5.0)) == (
        ScanTarget(uri, ("127.0.0.1", "::1"), loopback=True),
        "",
    )
    nowhere = ScanTarget(parse_target("ws://localhost:1/"), ("::1", "127.0.0.1"), True)
    unchanged, why = asyncio.run(_reachable(nowhere, 5.0))
    assert unchanged.addresses == ("::1", "127.0.0.1")
    assert why == "cannot reach the target (127.0.0.1:1: Connection refused)"


def test_token_cmd_supplies_the_credential(target: Target, tmp_path: Path) -> None:
    """--token-cmd runs a command for the token (no secret: minting checks are N/A)."""
    token_file = tmp_path / "token.txt"
    token_file.write_text(target.token + "\n")
    out = tmp_path / "r.json"
    done = run_audit(
        [target.url, "--token-cmd", f"cat {token_file}", "--ca-file", str(target.ca_file),
         "--origin-allowed", ORIGIN, "--checks", "auth.signature,auth.expired",
         "--format", "json", "--out", str(out)],
        tmp_path,
    )  # fmt: skip
    by_id = findings(json.loads(out.read_text()))
    assert by_id["auth.signature"]["verdict"] == "PASS", done.stdout + done.stderr
    assert by_id["auth.expired"]["verdict"] == "N/A"
    failing = run_audit([target.url, "--token-cmd", "false"], tmp_path)
    assert failing.returncode == 2 and "--token-cmd" in failing.stderr


# -- a hostile target: the scanner takes in only what it can hold ---------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ANNOUNCED = 2**40  # the frame header the hostile target sends: 1 TiB
STREAMED = 512 * 1024 * 1024  # bytes of that frame it streams at most, per connection
#: runs the command in argv, then prints its exit status and peak RSS (the only child: KiB)
MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, timeout=180)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"measured: exit {done.returncode} peak {peak}")
"""


async def read_client_frame(reader: asyncio.StreamReader) -> bytes:
    """One small masked frame from the client, unmasked."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
    elif length == 127:
        raise ValueError("the scanner's ping is small")
    mask = await reader.readexactly(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = await reader.readexactly(length)
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class HostileTarget:
    """A raw-socket WebSocket server on its own thread and loop: it upgrades any request,
    answers the first message (the scanner's ping) with a pong, then sends a text frame
    header announcing 1 TiB and streams its payload (at most STREAMED bytes) until the
    client hangs up. ``at_once``: the header comes right behind the 101, in one write, and
    nothing after it (the client must not wait for more to notice)."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.at_once = at_once
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.streamed: list[int] = []  # bytes of the huge frame sent, per connection
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        sent = 0
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head)
            if key is None:
                return
            accept = base64.b64encode(hashlib.sha1(key.group(1) + GUID).digest())
            upgrade = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            huge = bytes([0x81, 127]) + struct.pack("!Q", ANNOUNCED)
            if self.at_once:
                writer.write(upgrade + huge)
                await asyncio.wait_for(reader.read(), 30)  # silent until the client hangs up
                return
            else:
                writer.write(upgrade)
                ping = json.loads(await asyncio.wait_for(read_client_frame(reader), 10))
                pong = json.dumps({"type": "pong", "id": ping.get("id")}).encode()
                writer.write(bytes([0x81, len(pong)]) + pong + huge)
            chunk = b" " * (1024 * 1024)
            while sent < STREAMED:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
                sent += len(chunk)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self.streamed.append(sent)
            writer.close()

    def __enter__(self) -> HostileTarget:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.mark.parametrize("at_once", [False, True], ids=["after-a-pong", "with-the-101"])
def test_a_hostile_target_cannot_blow_up_the_scanner(tmp_path: Path, at_once: bool) -> None:
    """A target that answers the ping, then announces a 1 TiB frame and streams it: the
    scan refuses the frame from its header, reports it as evidence, finishes, and the
    scanner process stays small (it would otherwise buffer all it is sent). The same
    evidence when the header comes with the 101 and nothing follows it."""
    out = tmp_path / "r.json"
    with HostileTarget(at_once=at_once) as hostile:
        command = [
            sys.executable, "-c", MEASURE, WSGUARD, "audit", f"ws://127.0.0.1:{hostile.port}/",
            "--checks", "malformed.json,liveness.heartbeat", "--reply-timeout", "3",
            "--idle-wait", "5", "--format", "json", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        done = subprocess.run(
            command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=SCAN_TIMEOUT
        )
    measured = re.search(r"measured: exit (-?\d+) peak (\d+)", done.stdout)
    assert measured is not None, done.stdout + done.stderr
    peak_mib = int(measured.group(2)) / 1024
    assert peak_mib < 300, f"the scanner grew to {peak_mib:.0f} MiB"
    assert int(measured.group(1)) == 3, done.stdout + done.stderr  # ERROR: incomplete
    by_id = findings(json.loads(out.read_text()))
    for check in ("malformed.json", "liveness.heartbeat"):
        assert by_id[check]["verdict"] == "ERROR", by_id[check]
        evidence = by_id[check]["evidence"]
        assert evidence.startswith("the target sent an oversized frame"), evidence
        assert "1 TiB (1099511627776 bytes)" in evidence and "4 MiB" in evidence, evidence
    # the scanner stopped reading at the header: far less than a frame's worth streamed
    assert hostile.streamed and max(hostile.streamed) < STREAMED, hostile.streamed


async def upgrade_any(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head)
    assert key is not None
    accept = base64.b64encode(hashlib.sha1(key.group(1) + GUID).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def test_messages_no_check_reads_are_held_back_not_hoarded_nor_dropped() -> None:
    """A target that sends 32 MiB of messages nobody reads yet: the connection stops
    reading past the scan's budget (the target feels the back-pressure), and once the
    check reads, every message arrives, in order."""
    from websockets.uri import parse_uri

    from wsguard.scanner.probe import Endpoint, ReadBudget, handshake

    count, size = 512, 64 * 1024

    async def scenario() -> tuple[bool, int, list[int], ReadBudget]:
        pushed_back = asyncio.Event()

        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upgrade_any(reader, writer)
            try:
                for n in range(count):
                    payload = n.to_bytes(4, "big") + b"x" * (size - 4)
                    writer.write(bytes([0x82, 127]) + struct.pack("!Q", size) + payload)
                    try:
                        await asyncio.wait_for(writer.drain(), 1.0)
                    except TimeoutError:
                        pushed_back.set()  # the scanner stopped reading
                        await asyncio.wait_for(writer.drain(), 30)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(flood, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        budget = ReadBudget(max_message=256 * 1024, total=1024 * 1024)
        uri = parse_uri(f"ws://127.0.0.1:{port}/")
        endpoint = Endpoint(uri, "127.0.0.1", None, 5.0, budget=budget)
        result = await handshake(endpoint)
        assert result.session is not None, result.describe()
        session = result.session
        try:
            await asyncio.wait_for(pushed_back.wait(), 30)
            held = budget.used
            numbers = []
            for _ in range(count):
                event = await session.next_event(10)
                assert event is not None and event.kind == "binary"
                assert len(event.data) == size
                numbers.append(int.from_bytes(event.data[:4], "big"))
        finally:
            await session.close()
            server.close()
        return pushed_back.is_set(), held, numbers, budget

    pushed_back, held, numbers, budget = asyncio.run(scenario())
    assert pushed_back
    assert held <= budget.total and budget.peak <= budget.total + 64 * 1024, budget.peak
    assert numbers == list(range(count))  # nothing dropped, nothing reordered
    assert budget.used == 0  # a closed connection holds nothing


def test_an_endless_http_answer_ends_the_handshake_at_once() -> None:
    """A target answering the upgrade with a header line that never ends: websockets
    refuses it past 8 KiB and the scanner stops reading there, naming the problem."""
    from websockets.uri import parse_uri

    from wsguard.scanner.probe import Endpoint, handshake

    async def scenario() -> tuple[str, int]:
        streamed = 0

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal streamed
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nX-Endless: ")
            try:
                while streamed < 256 * 1024 * 1024:
                    writer.write(b"a" * 65536)
                    await asyncio.wait_for(writer.drain(), 10)
                    streamed += 65536
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(endless, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = Endpoint(parse_uri(f"ws://127.0.0.1:{port}/"), "127.0.0.1", None, 5.0)
        result = await handshake(endpoint, wait=60)
        server.close()
        return result.describe(), streamed

    described, streamed = asyncio.run(scenario())
    assert described.startswith("no response (invalid HTTP response"), described
    assert streamed < 256 * 1024 * 1024  # the scanner hung up, it did not read it all


def test_malformed_tokens_without_a_credential_are_judged_against_the_endpoint_s_401(
    tmp_path: Path,
) -> None:
    """Without a credential the scan's own handshake is refused 401 (one is required): the
    malformed tokens refused 401, and the 16 KiB one 431 (too big to read), are refusals of
    the credential. It said INCONCLUSIVE, "the credential given is refused too", with none
    given."""
    served = Served(["--port", "0"], cli_env(tmp_path), tmp_path / "audit.jsonl")
    try:
        port = served.wait_listening()
        out = tmp_path / "r.json"
        url = f"ws://127.0.0.1:{port}/"
        args = [url, "--checks", "auth.malformed", "--format", "json", "--out", str(out), *FAST]
        done = run_audit(args, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        malformed = findings(json.loads(out.read_text()))["auth.malformed"]
        assert malformed["verdict"] == "PASS", malformed["evidence"]
        assert "HTTP 431" in malformed["evidence"]
        assert "credential given" not in done.stdout
    finally:
        served.stop()
