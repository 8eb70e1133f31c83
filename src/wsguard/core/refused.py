"""Addresses refused for their handshake rate or a ban, remembered until they may retry.

A client that reconnects as fast as it is refused (a broken reconnect loop, or abuse)
would otherwise cost a full handshake decision per attempt: the request parsed, the
store asked, an audit line written. While its address is known to be refused, an
attempt is answered ``429`` with the remaining ``Retry-After`` as soon as its first bytes
arrive, from the peer address alone: nothing parsed, no store, no audit line (the first
refusal was audited; the repeats are counted in the metrics). The answer is the one the
policy would give: the allowance refills only with time and a ban only ends with time,
also across nodes, so nothing is refused that would have been admitted.

Only a peer that is not a trusted proxy is remembered or answered this way: behind a
proxy the client's address is in the request's headers, which are not read here. An
address is answered this way for :data:`RECHECK_SECONDS` at most before the policy
decides again (a ban lifted by an operator on another node is seen that soon), and
:meth:`RefusedAddresses.forget` drops it at once (a ban lifted on this node).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from wsguard.core.client_address import ClientAddressResolver, parse_ip

#: Addresses remembered at most (the oldest are forgotten first beyond this).
MAX_ADDRESSES = 65_536
#: Seconds an address is answered from memory at most before the policy decides again.
RECHECK_SECONDS = 5.0

Early = tuple[int, str, str, tuple[tuple[str, str], ...]]  # status, reason, message, headers

_MESSAGES = {
    "handshake_rate": "Too many connection attempts.",
    "banned": "Too many failed attempts.",
}


class RefusedAddresses:
    """Peer addresses (by their limit key) and until when they are refused."""

    __slots__ = ("_clock", "_key", "_resolver", "_until")

    def __init__(
        self,
        resolver: ClientAddressResolver,
        key: Callable[[str], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._key = key
        self._clock = clock
        # limit key -> (answered from memory until, refused until, reason)
        self._until: dict[str, tuple[float, float, str]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def remember(self, peer: str, client: str, reason: str, seconds: float) -> None:
        """*client* (seen from *peer*) was refused for *reason* for *seconds*."""
        if seconds <= 0 or reason not in _MESSAGES or not self._direct(peer, client):
            return
        now = self._clock()
        key = self._key(client)
        self._until.pop(key, None)  # re-inserted: the newest last
        self._until[key] = (now + min(seconds, RECHECK_SECONDS), now + seconds, reason)
        if len(self._until) > MAX_ADDRESSES:
            self._prune()

    def forget(self, key: str) -> None:
        """The address with limit key *key* is no longer refused (a ban was lifted)."""
        self._until.pop(key, None)

    def early(self, peer: str) -> Early | None:
        """The refusal of an attempt from *peer*, when its address is still refused."""
        if not self._until:
            return None
        try:
            key = self._key(peer)
        except ValueError:  # not an IP address
            return None
        entry = self._until.get(key)
        if entry is None:
            return None
        recheck, until, reason = entry
        now = self._clock()
        if now >= recheck:
            del self._until[key]
            return None
        left = until - now
        address = parse_ip(peer)
        if address is None or self._resolver.is_trusted(address):
            return None
        retry = (("Retry-After", str(max(1, math.ceil(left)))),)
        return 429, reason, _MESSAGES[reason], retry

    def _direct(self, peer: str, client: str) -> bool:
        address = parse_ip(peer)
        return (
            address is not None
            and str(address) == client
            and not self._resolver.is_trusted(address)
        )

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, (recheck, _, _) in self._until.items() if recheck <= now]:
            del self._until[key]
        while len(self._until) > MAX_ADDRESSES:
            del self._until[next(iter(self._until))]
