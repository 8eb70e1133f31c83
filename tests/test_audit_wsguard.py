"""``wsguard audit`` against ``wsguard serve``: with the right configuration every check
PASSes (or is N/A for a reason stated), and the outputs are what pipelines expect."""

from __future__ import annotations

import base64
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from serve_process import WSGUARD, Served
from test_cli import cli_env, run_cli

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
    assert len(by_id) == 34
    # the table still goes to stdout for the humans reading CI logs
    assert "auth.alg_none" in done.stdout and "PASS" in done.stdout
    # the evidence says what actually happened, not just a verdict
    assert "1009" in by_id["size.frame"]["evidence"]
    assert "4001" in by_id["token.expiry"]["evidence"]
    assert "replayed" in by_id["replay"]["evidence"]
    assert "HTTP 403" in by_id["origin.null"]["evidence"]
    assert "TLSv1.3" in by_id["transport.tls_version"]["evidence"]
    assert "negotiated" in by_id["compression"]["evidence"]


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
    assert rules[:2] == ["auth.required", "auth.malformed"] and len(rules) == 34
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
    assert asyncio.run(_reachable(listed, 5.0)).addresses == ("127.0.0.1", "::1")
    nowhere = ScanTarget(parse_target("ws://localhost:1/"), ("::1", "127.0.0.1"), True)
    assert asyncio.run(_reachable(nowhere, 5.0)).addresses == ("::1", "127.0.0.1")


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
