"""The async store interface: the only way the policy core reaches shared state.

Implementations are chosen by URI (``memory://`` now; ``redis://`` in cluster
mode). Each method is one atomic operation on the backing store: no caller
ever does read-modify-write across two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BanPolicy:
    """How authentication failures turn into bans of growing duration."""

    threshold: int
    window: float
    base_seconds: float
    max_seconds: float


class Store(ABC):
    """Shared security state: slots, rate counters, failures and bans."""

    uri: str = ""

    @abstractmethod
    async def acquire(self, key: str, limit: int, holder: str) -> bool:
        """Take one of *limit* slots under *key* for *holder*; False when full."""

    @abstractmethod
    async def release(self, key: str, holder: str) -> None:
        """Give back *holder*'s slot under *key*. Releasing twice is harmless."""

    @abstractmethod
    async def count(self, key: str) -> int:
        """How many slots are held under *key*."""

    @abstractmethod
    async def hit(self, key: str, limit: int, window: float) -> float:
        """Count one event in a sliding window of *window* seconds.

        Returns 0.0 when the event is within *limit*, else the seconds until
        the window has room again (the event is not counted then).
        """

    @abstractmethod
    async def ban_remaining(self, key: str) -> float:
        """Seconds left on *key*'s ban, 0.0 when not banned."""

    @abstractmethod
    async def record_failure(self, key: str, policy: BanPolicy) -> float | None:
        """Count an authentication failure; returns the ban length if one starts now."""

    @abstractmethod
    async def unban(self, key: str) -> bool:
        """Lift a ban; True if there was one."""

    @abstractmethod
    async def add_nonce(self, key: str, ttl: float) -> bool:
        """Record *key* for *ttl* seconds; False if it was already recorded (a replay)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held by the store."""
