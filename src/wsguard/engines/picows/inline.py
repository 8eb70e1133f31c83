"""Running wsguard's own steps without a task when they cannot wait (memory store)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


logger = logging.getLogger("wsguard.server")


class Resume:
    """Await a coroutine that :func:`run_inline` started and that waited after all."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation goes into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


async def resumed(resume: Resume) -> None:
    await resume


def run_inline(coro: Coroutine[Any, Any, None]) -> None:
    """Run one of wsguard's own steps on the memory store (a handshake decision, a slot
    release) to its end, now.

    Only for code that does not wait (the memory store answers without I/O); should
    it wait after all, it continues in a task rather than being lost.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return
    except Exception:  # pragma: no cover - the steps handle their own errors
        logger.exception("handshake step failed")
        return
    asyncio.get_running_loop().create_task(resumed(Resume(coro, first)))
