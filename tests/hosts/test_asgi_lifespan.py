"""WsGuardMiddleware and the ASGI lifespan protocol: the Guard starts and closes with it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import MutableMapping
from typing import Any

import pytest

from conftest import make_config
from wsguard.guard import Guard
from wsguard.hosts.asgi import WsGuardMiddleware
from wsguard.observability.audit import AuditLog

Message = MutableMapping[str, Any]


async def run_lifespan(app: Any) -> list[str]:
    """Drive the lifespan protocol as a server does; returns what the app sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []
    done = asyncio.Event()
    up = asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message["type"])
        if message["type"].startswith("lifespan.startup"):
            up.set()
        if message["type"].startswith("lifespan.shutdown"):
            done.set()

    task = asyncio.get_running_loop().create_task(app({"type": "lifespan"}, receive, send))
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(up.wait(), 5)
    started = app._started
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.wait_for(task, 5)
    assert started
    return sent


async def app_without_lifespan(scope: Message, receive: Any, send: Any) -> None:
    """Like Channels' ProtocolTypeRouter without a lifespan entry: raises at once."""
    raise ValueError(f"No application configured for scope type {scope['type']!r}")


async def app_with_lifespan(scope: Message, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@pytest.mark.parametrize("inner", [app_without_lifespan, app_with_lifespan])
def test_the_guard_starts_and_closes_with_the_lifespan(inner: Any) -> None:
    stream = io.StringIO()
    guard = Guard(make_config(), audit=AuditLog(stream))
    middleware = WsGuardMiddleware(inner, guard=guard)
    sent = asyncio.run(run_lifespan(middleware))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not middleware._started  # shut down: the store and the audit log were closed
    assert guard.handshakes.draining
