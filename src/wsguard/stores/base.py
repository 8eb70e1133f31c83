"""The async store interface: the only way the policy core reaches shared state.

Implementations are chosen by URI (``memory://`` now; ``redis://`` in cluster
mode). Each method is one atomic operation on the backing store: no caller
ever does read-modify-write across two calls.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from wsguard.errors import StoreError

#: what recording a message's nonce found
NonceOutcome = Literal["fresh", "replayed", "stale"]

#: What kind of thing a revocation names: a token id (``jti``) or a whole subject.
RevocationKind = Literal["jti", "sub"]

#: Event channels shared by every node of a cluster.
CHANNEL_REVOKE = "revoke"
CHANNEL_BROADCAST = "broadcast"
CHANNEL_DISCONNECT = "disconnect"

EventHandler = Callable[[str, bytes], None]


class StoreUnavailable(StoreError):
    """The shared store cannot answer and *check* is configured to fail closed."""

    def __init__(self, check: str) -> None:
        super().__init__(f"store unavailable ({check})")
        self.check = check


@dataclass(frozen=True, slots=True)
class BanPolicy:
    """How authentication failures turn into bans of growing duration."""

    threshold: int
    window: float
    base_seconds: float
    max_seconds: float


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`Store.admit` found: revoked, or the slots taken and the full key."""

    revoked: bool = False
    taken: tuple[str, ...] = ()
    full: str | None = None


class Store(ABC):
    """Shared security state: slots, rate counters, failures, bans, nonces, revocations.

    ``shared`` is True when other nodes see the same state (cluster mode). Any
    method of a shared store may raise :class:`StoreUnavailable` when the backing
    store is unreachable and that check is configured to fail closed.
    """

    uri: str = ""
    shared: bool = False

    @property
    def local(self) -> Store:
        """A store for state that is always per node (e.g. this node's capacity)."""
        return self

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
    async def pace(self, key: str, rate: float, burst: int) -> float:
        """Take one token from *key*'s bucket of *burst* tokens, refilled at *rate* tokens
        per second (full when unknown).

        Returns 0.0 when a token was taken, else the seconds until one is back (nothing
        is taken then): at most *burst* events at once, then one per ``1 / rate`` seconds.
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
    async def ban(self, key: str, seconds: float) -> None:
        """Ban *key* for *seconds* (an operator's or an alert's ban), replacing a shorter one."""

    @abstractmethod
    async def bans(self, limit: int = 1000) -> list[tuple[str, float]]:
        """Current bans as (key, seconds left), longest first, at most *limit*."""

    def error_counts(self) -> dict[str, int]:
        """Failed operations on the backing store so far, per check (none for memory)."""
        return {}

    @abstractmethod
    async def add_nonce(self, key: str, ttl: float) -> bool:
        """Record *key* for *ttl* seconds; False if it was already recorded (a replay)."""

    async def record_nonce(self, key: str, timestamp: float, window: float) -> NonceOutcome:
        """Record the nonce *key* of a message stamped *timestamp* (Unix seconds) until
        ``timestamp + window`` on the store's clock: ``stale`` when that clock says the
        message is outside the window, ``replayed`` when *key* is recorded already.

        One clock (the store's) decides both, so nodes whose clocks differ agree. This
        default is for stores on the node itself (its clock is the store's)."""
        now = time.time()
        if abs(now - timestamp) > window:
            return "stale"
        fresh = await self.add_nonce(key, max(0.001, timestamp + window - now))
        return "fresh" if fresh else "replayed"

    @abstractmethod
    async def take(self, key: str, want: int, limit: int, window: float) -> tuple[int, float]:
        """Take up to *want* events from *key*'s sliding window of *limit* per *window*.

        Returns (granted, retry_after): ``granted`` is between 0 and *want*;
        when it is 0, ``retry_after`` is the seconds until there is room.
        """

    @abstractmethod
    async def revoke(self, kind: RevocationKind, value: str, ttl: float) -> None:
        """Revoke a token id or a subject for *ttl* seconds and tell every node."""

    @abstractmethod
    async def is_revoked(self, subject: str, token_id: str | None) -> bool:
        """Whether the subject, or the token id when given, is revoked."""

    async def revoked_among(self, pairs: list[tuple[str, str | None]]) -> list[bool]:
        """For each (subject, token id), whether it is revoked (never raises)."""
        out = []
        for subject, token_id in pairs:
            try:
                out.append(await self.is_revoked(subject, token_id))
            except StoreUnavailable:
                out.append(False)
        return out

    # -- combined steps of a handshake: one round trip each on a remote store ---------

    async def screen_address(self, key: str, rate: float, burst: int) -> tuple[float, float]:
        """A handshake's first look at a client address: (ban seconds left, rate wait).

        The ban is the one :meth:`record_failure` starts under ``"addr:" + key``; the
        handshake rate takes one token from ``"hs:" + key``'s bucket (:meth:`pace`: *burst*
        at once, refilled at *rate* per second). A banned address is answered without
        taking a token.
        """
        banned = await self.ban_remaining("addr:" + key)
        if banned > 0:
            return banned, 0.0
        return 0.0, await self.pace("hs:" + key, rate, burst)

    async def admit(
        self,
        subject: str,
        token_id: str | None,
        slots: Sequence[tuple[str, int]],
        holder: str,
    ) -> Admission:
        """After authentication: revocation check, then one slot under each key in order.

        Stops at the first full key; the slots taken before it stay held (the caller
        releases them). Nothing is taken for a revoked subject or token.
        """
        if await self.is_revoked(subject, token_id):
            return Admission(revoked=True)
        taken: list[str] = []
        try:
            for key, limit in slots:
                if not await self.acquire(key, limit, holder):
                    return Admission(taken=tuple(taken), full=key)
                taken.append(key)
        except BaseException:  # cancelled (handshake timeout) or failed: give back
            await self.release_all(taken, holder)
            raise
        return Admission(taken=tuple(taken))

    async def release_all(self, keys: Sequence[str], holder: str) -> None:
        """Give back *holder*'s slots under every key (one round trip on a remote store)."""
        for key in keys:
            await self.release(key, holder)

    @abstractmethod
    async def publish(self, channel: str, payload: bytes) -> None:
        """Send *payload* to every node's event handlers (this node's included)."""

    @abstractmethod
    def subscribe(self, handler: EventHandler) -> None:
        """Call *handler(channel, payload)* for every event published on any node."""

    def on_resync(self, callback: Callable[[], None]) -> None:  # noqa: B027 - optional hook
        """Call *callback* whenever events may have been missed (after an outage)."""

    def on_lease_lost(self, callback: Callable[[set[str]], object]) -> None:  # noqa: B027
        """Call *callback(holders)* when leases of this node lapsed in the store and could
        not be taken again within their limit (after a pause or a partition longer than
        the lease TTL): those connections hold slots that others took meanwhile."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (lease renewal, event subscription)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held by the store."""
