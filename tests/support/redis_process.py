"""A real ``redis-server`` on a free loopback port, for cluster-mode tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from support.net import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisProcess:
    """One redis-server without persistence; can be stopped, killed and restarted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (scripts/test.sh installs it from apt)")
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        assert REDIS_SERVER is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: the data is gone (no persistence), as after a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def commands_processed(self) -> int:
        with self.client() as client:
            info = client.info("stats")
        return int(info["total_commands_processed"])


@contextlib.contextmanager
def writes_paused(redis_process: RedisProcess) -> Iterator[None]:
    """A short Redis outage: write commands (PUBLISH and scripts among them) hang."""
    with redis_process.client() as client:
        client.client_pause(60_000, all=False)
        try:
            yield
        finally:
            client.client_unpause()


@contextlib.contextmanager
def user_without_subscribe(redis_process: RedisProcess) -> Iterator[tuple[str, Callable[[], None]]]:
    """A Redis user that may run every command but SUBSCRIBE (an ACL a node may be
    given by mistake): its store URI, and a function that grants it SUBSCRIBE."""
    with redis_process.client() as client:
        client.acl_setuser(
            "nosub",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-subscribe"],
        )

        def grant() -> None:
            client.acl_setuser("nosub", enabled=True, commands=["+subscribe"])

        yield f"redis://nosub:pw@127.0.0.1:{redis_process.port}/0", grant
