"""Decisions are values: what the policy core answers, for every adapter.

A refusal carries everything an adapter needs to answer on the wire (HTTP
status and headers, close code, error frame code) plus a stable machine
readable ``reason`` and a ``detail`` for the audit log that is never sent to
the client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wsguard.core.identity import Identity

# Close codes (RFC 6455 section 7.4 and wsguard's private range).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_CREDENTIALS_EXPIRED = 4001
CLOSE_REVOKED = 4003


def valid_ref(value: Any) -> str | int | None:
    """The client's ``id`` as an error frame may echo it (``ref``): a short string or a safe
    non-negative integer; None for anything else (an error frame never echoes what it
    cannot bound)."""
    if isinstance(value, str) and len(value) <= 64:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the handshake with a real HTTP response before ``101``."""

    status: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    detail: str = ""
    client: str = ""
    subject: str | None = None
    ban_started: float | None = None

    @property
    def retry_after(self) -> int | None:
        for name, value in self.headers:
            if name == "Retry-After":
                return int(value)
        return None


Release = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Admit:
    """Accept the handshake. ``release`` frees the connection's slots, once."""

    identity: Identity
    client: str
    origin: str | None
    subprotocol: str | None
    _release: Release | None = field(default=None, repr=False)
    #: when the decision started (monotonic): revocations, bans and disconnects that
    #: reach the node after it may have missed this connection (see ClusterEvents)
    checked_at: float = 0.0
    #: the store's name for this connection's slots (its leases)
    holder: str = ""

    async def release(self) -> None:
        """Free every slot this admission holds. Idempotent."""
        release, self._release = self._release, None
        if release is not None:
            await release()


HandshakeDecision = Admit | Reject


@dataclass(slots=True)  # not frozen: built for every message, and frozen __init__ is slower
class Deliver:
    """The message passed every check: hand it to the application."""

    type: str
    message: dict[str, Any]
    size: int
    nonce: Any = None  # integrity.Verified for signed types: the nonce still to be recorded


@dataclass(frozen=True, slots=True)
class Refuse:
    """Drop the message and answer with an error frame; the connection survives."""

    code: str
    message: str
    ref: str | int | None = None
    pointer: str | None = None
    retry_after: float | None = None
    type: str | None = None  # the message's type when known (allowlisted): for metrics

    def frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.pointer is not None:
            out["pointer"] = self.pointer
        if self.retry_after is not None:
            out["retry_after"] = round(self.retry_after, 3)
        if self.ref is not None:
            out["ref"] = self.ref
        return out


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``; ``reason`` is short and never echoes input."""

    code: int
    reason: str
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Reauthenticate:
    """An in-band ``auth`` message carried a valid token for the same subject."""

    identity: Identity
    ref: str | int | None = None


MessageDecision = Deliver | Refuse | Close | Reauthenticate
