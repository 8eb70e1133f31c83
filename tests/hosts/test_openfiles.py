"""The open-file limit at start: ``wsguard serve`` raises its soft limit to the hard one,
and says so in one warning line when ``limits.max_connections`` cannot fit in it. The
server runs as a real subprocess whose limits are lowered before it starts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.cli import SECRET, cli_env
from support.serve_process import Served
from wsguard.hosts.openfiles import OWN_FILES, open_files_warning

resource = pytest.importorskip("resource")

LISTENING = re.compile(r"listening on ws://")
WARNING = "warning: limits.max_connections"


def open_files_of(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process *pid*, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def limited(soft: int, hard: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[Callable[[], None], dict[str, str]], Served]]:
    servers: list[Served] = []

    def start(preexec: Callable[[], None], extra: dict[str, str]) -> Served:
        env = cli_env(tmp_path, WSGUARD_JWT_SECRET=SECRET, **extra)
        served = Served(["--port", "0"], env, tmp_path / "audit.jsonl", preexec_fn=preexec)
        servers.append(served)
        served.wait_listening()
        return served

    yield start
    for served in servers:
        served.kill()


@pytest.fixture
def hard_limit() -> int:
    if not Path("/proc/self/limits").exists():
        pytest.skip("needs /proc/<pid>/limits")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip(f"a finite hard open-file limit of 1024 or more is needed (here {hard})")
    return int(hard)


def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(
    started: Callable[[Callable[[], None], dict[str, str]], Served], hard_limit: int
) -> None:
    # a soft limit far below the hard one, as many shells and service managers set it
    connections = hard_limit - OWN_FILES  # fits once the limit is raised, not before
    served = started(
        limited(256, hard_limit), {"WSGUARD_LIMITS__MAX_CONNECTIONS": str(connections)}
    )
    assert open_files_of(served.proc.pid) == (hard_limit, hard_limit)
    # the warning comes before the listening line: none was given
    assert WARNING not in served.stderr


def test_serve_warns_when_max_connections_exceeds_the_hard_limit(
    started: Callable[[Callable[[], None], dict[str, str]], Served], hard_limit: int
) -> None:
    # a hard limit below limits.max_connections (the default, 10,000): not raisable
    served = started(limited(512, 512), {})
    assert open_files_of(served.proc.pid) == (512, 512)
    [line] = [line for line in served.stderr_lines if WARNING in line]
    assert "10,000" in line and "512" in line
    assert "ulimit -n" in line and "LimitNOFILE" in line
    assert not line.startswith("wsguard: error")


def test_the_warning_leaves_room_for_the_servers_own_files() -> None:
    assert open_files_warning(10_000, 10_000 + OWN_FILES) is None
    warning = open_files_warning(10_001, 10_000 + OWN_FILES)
    assert warning is not None and "about 10,000 connections" in warning
    assert open_files_warning(5, None) is None  # no such limit here (Windows)
