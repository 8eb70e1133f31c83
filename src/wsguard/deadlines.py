"""Deadlines of many connections on one loop timer (token expiry, idle timeout, maximum
lifetime).

A timer handle per connection costs ~0.8 KiB with its bookkeeping (uvloop's handle and
its libuv timer, a dict of them): at 100,000 idle connections that is 80 MB for timers
that almost never fire. Here a connection is in one bucket, the one of its earliest
deadline: rounded *up* to :data:`RESOLUTION` when the deadline is near (it is never
early, at most that much late), or, when it is further than :data:`NEAR` seconds away,
rounded *down* to :data:`COARSE` seconds (a few large buckets for tokens that expire in
hours; at that bucket's time the connection is filed again, nearer). One loop timer
waits for the earliest bucket. Adding, moving and removing a connection are O(1) set
operations; at rest nothing runs.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Protocol

logger = logging.getLogger("wsguard.server")

#: Seconds per near bucket: how late a deadline may fire at most.
RESOLUTION = 0.05
#: Deadlines further away than this are filed in coarse buckets of COARSE seconds.
NEAR = 30.0
COARSE = 10.0
_COARSE_TICKS = round(COARSE / RESOLUTION)


class HasDeadlines(Protocol):
    """What a connection offers the wheel (and where the wheel files it)."""

    deadline_tick: int | None

    def next_deadline(self) -> float | None:
        """Its earliest pending deadline (loop time), None when it has none."""

    def deadlines_due(self, now: float) -> None:
        """Act on every deadline at or before *now* (loop time)."""


class DeadlineWheel:
    """The deadlines of every connection on one event loop."""

    __slots__ = ("_buckets", "_count", "_handle", "_loop", "_next", "_ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, set[HasDeadlines]] = {}
        self._count = 0
        self._ticks: list[int] = []  # heap of bucket ticks (a tick may be there twice)
        self._handle: asyncio.TimerHandle | None = None
        self._next: int | None = None  # the tick the loop timer waits for

    def __len__(self) -> int:
        return self._count

    def update(self, member: HasDeadlines) -> None:
        """(Re)file *member* under its earliest deadline (none: taken out)."""
        deadline = member.next_deadline()
        old = member.deadline_tick
        if deadline is None:
            if old is not None:
                self._take_out(member, old)
            return
        if deadline - self._loop.time() > NEAR:
            tick = math.floor(deadline / COARSE) * _COARSE_TICKS
        else:
            tick = math.ceil(deadline / RESOLUTION)
        if tick == old:
            return
        if old is not None:
            self._take_out(member, old)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
        bucket.add(member)
        member.deadline_tick = tick
        self._count += 1
        if self._next is None or tick < self._next:
            self._arm(tick)

    def discard(self, member: HasDeadlines) -> None:
        """Take *member* out (it has ended)."""
        old = member.deadline_tick
        if old is not None:
            self._take_out(member, old)

    def _take_out(self, member: HasDeadlines, tick: int) -> None:
        member.deadline_tick = None
        self._count -= 1
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(member)
            if not bucket:
                del self._buckets[tick]  # its tick stays in the heap: skipped when popped

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._next = tick
        self._handle = self._loop.call_at(tick * RESOLUTION, self._fire)

    def _fire(self) -> None:
        self._handle = self._next = None
        now = self._loop.time()
        ticks, buckets = self._ticks, self._buckets
        due: list[set[HasDeadlines]] = []
        while ticks and ticks[0] * RESOLUTION <= now:
            bucket = buckets.pop(heapq.heappop(ticks), None)
            if bucket:
                due.append(bucket)
                self._count -= len(bucket)
                for member in bucket:
                    member.deadline_tick = None
        for bucket in due:
            for member in bucket:
                try:
                    member.deadlines_due(now)
                except Exception:  # pragma: no cover - a deadline's action never raises
                    logger.exception("deadline failed")
                self.update(member)  # its next deadline, if any
        while ticks and ticks[0] not in buckets:  # emptied buckets
            heapq.heappop(ticks)
        if ticks and (self._next is None or ticks[0] < self._next):
            self._arm(ticks[0])


_wheels: dict[asyncio.AbstractEventLoop, DeadlineWheel] = {}


def wheel(loop: asyncio.AbstractEventLoop) -> DeadlineWheel:
    """The deadline wheel of *loop* (created on first use)."""
    found = _wheels.get(loop)
    if found is None:
        if len(_wheels) > 16:  # loops that are gone (tests run many): forget the idle ones
            for old in [lp for lp, w in _wheels.items() if not w and lp.is_closed()]:
                del _wheels[old]
        found = _wheels[loop] = DeadlineWheel(loop)
    return found
