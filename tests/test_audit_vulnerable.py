"""``wsguard audit`` against deliberately vulnerable servers (tests/vulnerable_servers.py):
each planted flaw is reported as FAIL, and nothing else is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vulnerable_servers import ALLOWED_ORIGIN, FLAWS, SECRET, vulnerable_server
from wsguard.scanner import Report, ScanOptions, Verdict, run_scan


async def scan(flaw: str | None, log: Path, **options: object) -> Report:
    async with vulnerable_server(flaw, log_file=log) as url:
        settings: dict[str, object] = {
            "jwt_secret": SECRET,
            "origin_allowed": ALLOWED_ORIGIN,
            "server_log": log,
            "aggressive": True,
            "reply_timeout": 1.0,
            "slow_wait": 5.0,
            "idle_wait": 4.0,
            "expiry_wait": 6.0,
            "reset_wait": 6.0,
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
    assert not verdicts(report, Verdict.ERROR, Verdict.WEAK)
    assert report.failed() is bool(expected)


def test_version_header_is_a_warning(tmp_path: Path) -> None:
    report = asyncio.run(
        scan("version_header", tmp_path / "server.log", checks=("disclosure",), aggressive=False)
    )
    assert report.verdict("disclosure.errors") is Verdict.WARN
    evidence = verdicts(report, Verdict.WARN)["disclosure.errors"]
    assert "websockets/" in evidence and "Server header" in evidence
