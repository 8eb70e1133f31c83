"""Connection slots given back when a connection ends, for every engine adapter.

A slot release may need the store (Redis in cluster mode): it runs as a task,
tracked here so a shutdown can wait (bounded) until every slot is back.
"""

from __future__ import annotations

import asyncio

from wsguard.core.decisions import Admit

_pending_releases: set[asyncio.Task[None]] = set()


def release(admission: Admit | None) -> None:
    """Free *admission*'s slots in the background (None: nothing to do)."""
    if admission is not None:
        task = asyncio.get_running_loop().create_task(admission.release())
        _pending_releases.add(task)
        task.add_done_callback(_pending_releases.discard)


async def wait_for_releases(grace: float) -> None:
    """Wait (bounded) until slots given back by closed connections reach the store."""
    loop = asyncio.get_running_loop()  # other Apps in this process run other loops
    pending = [t for t in _pending_releases if not t.done() and t.get_loop() is loop]
    if pending:
        await asyncio.wait(pending, timeout=grace)
