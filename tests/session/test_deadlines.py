"""The deadline wheel: connections' expiry, idle and lifetime deadlines on one loop timer.

Driven by a clock the test moves (the wheel only calls ``time()`` and ``call_at()`` of its
loop), so every case is exact and nothing sleeps. The Session's use of it (a token that
expires closes 4001, idle and lifetime closes) is covered end to end on real servers by
tests/session/test_connection_lifetime.py and the ASGI middleware tests.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from wsguard.deadlines import COARSE, NEAR, RESOLUTION, DeadlineWheel


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ClockLoop:
    """time() and call_at() over a clock moved by :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._calls: list[tuple[float, int, _Handle, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.timers_armed = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        self.timers_armed += 1
        heapq.heappush(self._calls, (when, next(self._seq), handle, callback))
        return handle

    def pending(self) -> int:
        return sum(1 for *_, h, _ in self._calls if not h.cancelled)

    def advance(self, to: float) -> None:
        while self._calls and self._calls[0][0] <= to:
            when, _, handle, callback = heapq.heappop(self._calls)
            if not handle.cancelled:
                self.now = max(self.now, when)
                callback()
        self.now = to


class Member:
    def __init__(self, *deadlines: float) -> None:
        self.deadline_tick: int | None = None
        self.pending = sorted(deadlines)
        self.fired: list[tuple[float, float]] = []  # (deadline, when it was acted on)

    def next_deadline(self) -> float | None:
        return self.pending[0] if self.pending else None

    def deadlines_due(self, now: float) -> None:
        while self.pending and self.pending[0] <= now:
            self.fired.append((self.pending.pop(0), now))


def wheel_on(loop: ClockLoop) -> DeadlineWheel:
    return DeadlineWheel(loop)  # type: ignore[arg-type]


def test_a_near_deadline_fires_on_time_never_early_at_most_one_resolution_late() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    member = Member(loop.now + 1.02)
    wheel.update(member)
    loop.advance(loop.now + 1.0)
    assert member.fired == []
    loop.advance(loop.now + 1.0)
    ((deadline, when),) = member.fired
    assert deadline <= when <= deadline + RESOLUTION
    assert len(wheel) == 0 and member.deadline_tick is None


def test_a_far_deadline_waits_in_a_coarse_bucket_then_fires_on_time() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    member = Member(start + 3600.3)
    wheel.update(member)
    loop.advance(start + 3600.2)
    assert member.fired == []  # never early
    assert len(wheel) == 1
    loop.advance(start + 3601)
    ((deadline, when),) = member.fired
    assert deadline <= when <= deadline + RESOLUTION
    # refiled on the way: a coarse bucket every COARSE seconds at most, not a timer per tick
    assert loop.timers_armed <= (3600 - NEAR) / COARSE + 4


def test_thousands_of_far_deadlines_share_a_few_buckets_and_all_fire() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    members = [Member(start + 600 + i * 0.37) for i in range(5000)]  # ~31 minutes apart in all
    for member in members:
        wheel.update(member)
    assert len(wheel) == 5000
    assert loop.pending() == 1  # one loop timer for all of them
    loop.advance(start + 600 + 5000 * 0.37 + 1)
    assert all(len(m.fired) == 1 for m in members)
    assert all(d <= w <= d + RESOLUTION for m in members for d, w in m.fired)
    assert len(wheel) == 0


def test_a_member_is_filed_under_its_earliest_deadline_and_refiled_after_it() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    member = Member(start + 5, start + 2, start + 9)
    wheel.update(member)
    loop.advance(start + 3)
    assert [d for d, _ in member.fired] == [start + 2]
    assert len(wheel) == 1  # still waiting for the next one
    loop.advance(start + 10)
    assert [d for d, _ in member.fired] == [start + 2, start + 5, start + 9]
    assert len(wheel) == 0


def test_discarded_and_deadline_free_members_never_fire() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    gone, lifted, kept = Member(start + 1), Member(start + 1), Member(start + 1)
    for member in (gone, lifted, kept):
        wheel.update(member)
    wheel.discard(gone)
    lifted.pending.clear()  # its deadline was lifted (a refreshed token without exp)
    wheel.update(lifted)
    assert len(wheel) == 1
    loop.advance(start + 2)
    assert gone.fired == [] and lifted.fired == [] and len(kept.fired) == 1
    wheel.discard(kept)  # discarding a member that is no longer filed is harmless
    assert len(wheel) == 0


def test_moving_a_deadline_earlier_rearms_the_timer() -> None:
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    member = Member(start + 20)
    wheel.update(member)
    member.pending = [start + 1]  # e.g. a refresh with a shorter-lived token
    wheel.update(member)
    loop.advance(start + 1.5)
    assert [d for d, _ in member.fired] == [start + 1]


def test_an_action_that_files_a_member_again_in_the_past_does_not_loop() -> None:
    """A deadline that is due again at once (a clock that went backwards, say) is acted
    on at the next turn of the loop, not in a loop inside the wheel's callback."""
    loop = ClockLoop()
    wheel = wheel_on(loop)
    start = loop.now
    calls: list[float] = []

    class Stubborn(Member):
        def deadlines_due(self, now: float) -> None:
            calls.append(now)
            if len(calls) < 3:
                self.pending = [now - 1]  # due again
            else:
                self.pending = []

    member: Any = Stubborn(start + 1)
    wheel.update(member)
    loop.advance(start + 2)
    assert len(calls) == 3 and len(wheel) == 0
