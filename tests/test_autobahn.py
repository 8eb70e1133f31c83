"""The Autobahn cases (kosoku) directly and through ``wsguard proxy``: the gateway adds no
FAILED case. The full run is ``benchmarks/autobahn.py``; the suite runs ``--quick``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gateway_adds_no_failed_autobahn_case(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "autobahn.py"), "--quick",
         "--outdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed_added_by_gateway"] == []
    assert summary["cases"] >= 80  # the quick subset really ran, through both paths
    assert summary["direct"] and summary["gateway"]
