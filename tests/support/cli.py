"""The ``wsguard`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from support.paths import WSGUARD

#: The HS256 secret the command-line tests configure.
SECRET = "cli-test-secret-that-is-long-enough-for-hs256-42"
QUICK = 20.0  # upper bound for a command that should exit at once


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str], env: dict[str, str], *, timeout: float = QUICK
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WSGUARD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def mint(home: Path, *args: str, **extra_env: str) -> str:
    done = run_cli(["token", *args], cli_env(home, **extra_env))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2, done.stdout
    return token
