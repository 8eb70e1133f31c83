"""``wsguard audit`` against deliberately vulnerable servers (tests/vulnerable_servers.py):
each planted flaw is reported as FAIL, and nothing else is."""

from __future__ import annotations

import asyncio
import json
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support.cli import cli_env, run_cli
from support.vulnerable_servers import ALLOWED_ORIGIN, FLAWS, SECRET, vulnerable_server
from wsguard.scanner import Finding, Report, ScanOptions, Verdict, run_scan


async def scan(flaw: str | None, log: Path, **options: object) -> Report:
    async with vulnerable_server(flaw, log_file=log) as url:
        settings: dict[str, object] = {
            "jwt_secret": SECRET,
            "origin_allowed": ALLOWED_ORIGIN,
            "server_log": log,
            "aggressive": True,
            "reply_timeout": 1.0,
            # the servers' own timers: handshake 2 s, pings every 1 s, tokens closed at exp
            "slow_wait": 4.0,
            "idle_wait": 3.0,
            "expiry_wait": 3.0,
            "reset_wait": 3.0,
            "max_connections": 20,
            "flood_count": 300,
            **options,
        }
        return await run_scan(ScanOptions(url=url, **settings))  # type: ignore[arg-type]


def verdicts(report: Report, *wanted: Verdict) -> dict[str, str]:
    return {f.check: f.evidence for f in report.findings if f.verdict in wanted}


@pytest.mark.parametrize("flaw", [None, *FLAWS])
def test_each_planted_flaw_fails_and_nothing_else(flaw: str | None, tmp_path: Path) -> None:
    report = asyncio.run(scan(flaw, tmp_path / "server.log"))
    expected = FLAWS[flaw] if flaw is not None else frozenset()
    failed = verdicts(report, Verdict.FAIL)
    assert set(failed) == expected, failed
    unjudged = verdicts(report, Verdict.ERROR, Verdict.WEAK, Verdict.INCONCLUSIVE)
    # these servers have no privileged message: the guesses are refused as unknown kinds,
    # like the control, which says nothing (the evidence asks for --privileged-message)
    assert "--privileged-message" in unjudged.pop("authz.privileged", "--privileged-message")
    assert not unjudged
    assert report.failed() is bool(expected)


def test_version_header_is_a_warning(tmp_path: Path) -> None:
    report = asyncio.run(
        scan("version_header", tmp_path / "server.log", checks=("disclosure",), aggressive=False)
    )
    assert report.verdict("disclosure.errors") is Verdict.WARN
    evidence = verdicts(report, Verdict.WARN)["disclosure.errors"]
    assert "websockets/" in evidence and "Server header" in evidence


def test_a_crashing_check_is_an_error_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsguard.scanner.model import REGISTRY, Check

    async def boom(ctx: object) -> Finding:
        raise RuntimeError("a bug in a check")

    monkeypatch.setitem(
        REGISTRY,
        "auth.boom",
        Check("auth.boom", "crashes", "auth", (), "none", boom, order=-1),  # runs first
    )
    report = asyncio.run(scan("alg_none", tmp_path / "server.log", checks=("auth",)))
    assert report.verdict("auth.boom") is Verdict.ERROR
    assert "RuntimeError: a bug in a check" in verdicts(report, Verdict.ERROR)["auth.boom"]
    assert report.verdict("auth.alg_none") is Verdict.FAIL  # ran after the crash
    assert [f.check for f in report.findings].index("auth.alg_none") > [
        f.check for f in report.findings
    ].index("auth.boom")


class ServerThread:
    """A vulnerable server in its own event loop, for the command-line scanner."""

    def __init__(self, flaw: str, log: Path) -> None:
        self.flaw, self.log = flaw, log
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with vulnerable_server(self.flaw, log_file=self.log) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_command_line_exit_codes_and_failure_reports(tmp_path: Path) -> None:
    junit, sarif = tmp_path / "r.xml", tmp_path / "r.sarif"
    with ServerThread("alg_none", tmp_path / "server.log") as server:
        base = ["audit", server.url, "--jwt-secret", SECRET, "--checks", "auth"]
        env = cli_env(tmp_path)
        failed = run_cli([*base, "--format", "junit", "--out", str(junit)], env, timeout=120)
        run_cli([*base, "--format", "sarif", "--out", str(sarif)], env, timeout=120)
        clean = run_cli([*base, "--skip", "auth.alg_none"], env, timeout=120)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAIL" in failed.stdout and "auth.alg_none" in failed.stdout  # the table
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    [failure] = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failure.get("name", "").startswith("auth.alg_none")
    run = json.loads(sarif.read_text())["runs"][0]
    [error] = run["results"]
    assert (error["ruleId"], error["kind"], error["level"]) == ("auth.alg_none", "fail", "error")
    assert run["tool"]["driver"]["rules"][error["ruleIndex"]]["id"] == "auth.alg_none"
    assert clean.returncode == 0, clean.stdout + clean.stderr
