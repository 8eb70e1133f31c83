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

from typing import Protocol


class Buckets(Protocol):
    """An owner of a message bucket and a byte bucket: each is one float, its theoretical
    arrival time (a connection's state, a subject's limits). Kept in the owner's own
    slots: two bucket objects per connection would add ~160 bytes to every connection."""

    msg_tat: float
    vol_tat: float


Rates = tuple[float, float, float, float]
"""Two buckets' sizes and refills: seconds per message and the message burst in seconds,
then the same for bytes (see :func:`rates`)."""


def rates(msg_rate: float, msg_burst: float, byte_rate: float, byte_burst: float) -> Rates:
    """:data:`Rates` for a message bucket and a byte bucket (rates per second, bursts in
    messages and bytes)."""
    if min(msg_rate, msg_burst, byte_rate, byte_burst) <= 0:
        raise ValueError("rates and bursts must be positive")
    msg_interval, byte_interval = 1.0 / msg_rate, 1.0 / byte_rate
    return (msg_interval, msg_burst * msg_interval, byte_interval, byte_burst * byte_interval)


def spend(owner: Buckets, now: float, rates: Rates, cost: float) -> float:
    """Take one message, then *cost* bytes (none: no byte is taken), from *owner*'s
    buckets at time *now*: 0.0 if both allow it, else the seconds the refusing one needs
    (a message taken before the byte bucket refuses stays taken)."""
    m_interval, m_tolerance, v_interval, v_tolerance = rates
    tat = owner.msg_tat
    if tat < now:
        tat = now
    tat += m_interval
    if tat - m_tolerance > now:
        return tat - m_tolerance - now
    owner.msg_tat = tat
    if cost:
        tat = owner.vol_tat
        if tat < now:
            tat = now
        tat += cost * v_interval
        if tat - v_tolerance > now:
            return tat - v_tolerance - now
        owner.vol_tat = tat
    return 0.0
