"""The end of a connection, the same for every engine adapter.

Slots given back (a release may need the store, Redis in cluster mode: it runs as
a task, tracked here so a shutdown can wait, bounded, until every slot is back),
and the close code the audit log reports.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from wsguard.core.decisions import CLOSE_TOO_BIG, Admit

CLOSE_NO_STATUS = 1005  # a close frame without status code (RFC 6455 7.1.5)

if TYPE_CHECKING:
    from wsguard.guard import Guard
    from wsguard.server.connection import Connection

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


def first_close(sent: Any, rcvd: Any, rcvd_then_sent: bool) -> tuple[int, str]:
    """The close code as the audit log reports it: the one sent by whoever closed first.

    *sent* and *rcvd* are the engine's close frames (anything with a ``code``) or None
    (*rcvd* is None too for a close frame the server refused as invalid). A close frame
    without status code is reported as 1005 (no status received), whichever engine
    parsed it (picows says 0); 1006 is a connection that ended without any close frame.
    """
    if sent is not None and (rcvd is None or not rcvd_then_sent):
        return int(getattr(sent.code, "value", sent.code)), "server"
    if rcvd is not None:
        code = int(getattr(rcvd.code, "value", rcvd.code))
        return code or CLOSE_NO_STATUS, "client"
    return 1006, "network"


def record_close(guard: Guard, conn: Connection, code: int, closed_by: str) -> None:
    """Count and audit a connection's end (a 1009 of ours is a size refusal too)."""
    if code == CLOSE_TOO_BIG and closed_by == "server":
        guard.monitor.connection_refused("size", "too_big", conn.client)
        conn.close_cause = conn.close_cause or "too_big"
    guard.connection_closed(conn, code, closed_by)
