"""Local rate limiting for the per-message hot path: GCRA as plain arithmetic.

The Generic Cell Rate Algorithm is a token bucket expressed with one float
(the theoretical arrival time), so it has no fixed-window boundary where two
bursts can follow each other. A bucket allows ``burst`` units at once and
refills at ``rate`` units per second. Cluster-wide counters (handshakes,
failures) use the ``limits`` library through the store instead; per message
we avoid its per-call overhead (locks, key formatting) because a connection's
counters never leave its node.
"""

from __future__ import annotations


class Gcra:
    """A token bucket of capacity ``burst`` refilled at ``rate`` per second."""

    __slots__ = ("_interval", "_tat", "_tolerance")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._interval = 1.0 / rate
        self._tolerance = burst * self._interval
        self._tat = 0.0

    def idle(self, now: float) -> bool:
        """True when the bucket is full again (nothing to remember)."""
        return self._tat <= now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take *cost* units at time *now*; 0.0 if allowed, else seconds to wait."""
        tat = self._tat if self._tat > now else now
        new_tat = tat + cost * self._interval
        allow_at = new_tat - self._tolerance
        if allow_at > now:
            return allow_at - now
        self._tat = new_tat
        return 0.0
