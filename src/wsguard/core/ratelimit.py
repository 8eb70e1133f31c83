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

_PARAMS: dict[tuple[float, float], tuple[float, float]] = {}


class Gcra:
    """A token bucket of capacity ``burst`` refilled at ``rate`` per second.

    A bucket holds its own arrival time and a reference to its rate's parameters,
    shared by every bucket of the same rate and burst (one per connection adds up at
    100,000 connections)."""

    __slots__ = ("_params", "_tat")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        params = _PARAMS.get((rate, burst))
        if params is None:
            interval = 1.0 / rate
            params = (interval, burst * interval)
            if len(_PARAMS) < 1024:
                _PARAMS[rate, burst] = params
        self._params = params  # (seconds per unit, burst in seconds)
        self._tat = 0.0

    def idle(self, now: float) -> bool:
        """True when the bucket is full again (nothing to remember)."""
        return self._tat <= now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take *cost* units at time *now*; 0.0 if allowed, else seconds to wait."""
        interval, tolerance = self._params
        tat = self._tat if self._tat > now else now
        new_tat = tat + cost * interval
        allow_at = new_tat - tolerance
        if allow_at > now:
            return allow_at - now
        self._tat = new_tat
        return 0.0
