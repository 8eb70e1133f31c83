"""What a node does with cluster events: revocations and broadcasts.

Revocations close the live connections they name with ``4003`` on every node
(the store publishes them; each node, the revoking one included, reacts).
Events can be lost while a node is cut off from the store, so after every
reconnection the node checks all its live connections against the stored
revocations (one pipelined round trip).

A connection is registered only once its handshake is decided, so an event that
arrives while a handshake is being decided (after its revocation and ban checks,
before registration) would miss it: the node keeps the events of the last
``RECENT_SECONDS`` and applies those received since a connection's checks to it
when it registers (:meth:`ClusterEvents.catch_up`).

Broadcasts are published with the sending node's id; that node has already
delivered to its own clients, so it skips its own copy (no double delivery).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from wsguard.core.decisions import CLOSE_POLICY_VIOLATION, CLOSE_REVOKED, CLOSE_TRY_AGAIN_LATER
from wsguard.observability.audit import AuditLog
from wsguard.stores.base import (
    CHANNEL_BROADCAST,
    CHANNEL_DISCONNECT,
    CHANNEL_REVOKE,
    Store,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from wsguard.session import Connection

logger = logging.getLogger("wsguard.cluster")

OUTBOX_LIMIT = 10_000
#: how long revocations, bans and disconnects are kept for handshakes still being
#: decided when they arrived (longer than any handshake decision takes)
RECENT_SECONDS = 60.0
RECENT_LIMIT = 4096


class Closable(Protocol):
    """A live connection as cluster events close it (the App's and the middleware's)."""

    id: str
    client: str

    @property
    def subject(self) -> str: ...

    @property
    def identity(self) -> Any: ...

    @property
    def closing(self) -> bool: ...

    @property
    def holder(self) -> str: ...

    def close_soon(self, code: int, reason: str, *, cause: str | None = None) -> None: ...


def close_revoked(audit: AuditLog, conn: Closable, kind: str) -> None:
    """A revocation names *conn*: audit it and close with 4003."""
    if conn.closing:
        return
    audit.emit(
        "connection_revoked",
        connection_id=conn.id,
        client=conn.client,
        subject=conn.subject,
        by=kind,
    )
    conn.close_soon(CLOSE_REVOKED, "revoked", cause="revoked")


def close_disconnected(audit: AuditLog, conn: Closable, why: str) -> None:
    """An operator (``admin``) or a ban (``banned``) closes *conn* with 1008."""
    banned = why == "banned"
    audit.emit(
        "connection_disconnected",
        connection_id=conn.id,
        client=conn.client,
        subject=conn.subject,
        by="ban" if banned else "admin",
    )
    conn.close_soon(
        CLOSE_POLICY_VIOLATION,
        "banned" if banned else "disconnected by operator",
        cause="banned" if banned else "admin",
    )


class ClusterEvents:
    """Connects one node's live connections to the store's event channels."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        connections: Callable[[], Iterable[Connection]],
        deliver: Callable[[bytes], None],
        on_revoked: Callable[[Closable, str], None],
        *,
        on_disconnect: Callable[[Closable, str], None] | None = None,
        address_key: Callable[[str], str] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self._audit = audit
        self.node_id = node_id.encode()
        self._connections = connections
        self._deliver = deliver
        self._on_revoked = on_revoked
        self._on_disconnect = on_disconnect
        self._address_key = address_key
        self._outbox: asyncio.Queue[bytes] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.dropped = 0
        # (received at, channel, kind, value, why) of recent revocations and disconnects
        self._recent: collections.deque[tuple[float, str, str, str, str]] = collections.deque(
            maxlen=RECENT_LIMIT
        )
        store.subscribe(self.handle)
        store.on_resync(self.resync)
        store.on_lease_lost(self.close_over_limit)

    # -- incoming -------------------------------------------------------------------

    def handle(self, channel: str, payload: bytes) -> None:
        if channel == CHANNEL_BROADCAST:
            node, _, text = payload.partition(b"\n")
            if node != self.node_id:
                self._deliver(text)
        elif channel == CHANNEL_REVOKE:
            kind, _, value = payload.decode("utf-8", "replace").partition(":")
            self._remember(channel, kind, value, "")
            self.close_revoked(kind, value)
        elif channel == CHANNEL_DISCONNECT:
            why, _, target = payload.decode("utf-8", "replace").partition("|")
            kind, _, value = target.partition(":")
            self._remember(channel, kind, value, why)
            self.disconnect(kind, value, why)

    def _remember(self, channel: str, kind: str, value: str, why: str) -> None:
        now = time.monotonic()
        recent = self._recent
        while recent and recent[0][0] < now - RECENT_SECONDS:
            recent.popleft()
        recent.append((now, channel, kind, value, why))

    def catch_up(self, conn: Closable, since: float) -> bool:
        """Apply to *conn*, just registered, the revocations and disconnects this node
        received since *since* (when its handshake checks started): they were meant for
        it but could not find it. True when it is being closed.

        Every handshake calls this: only the events since *since* are looked at (the
        newest, from the end of the time-ordered log), not the whole minute's log."""
        fresh: list[tuple[float, str, str, str, str]] = []
        for entry in reversed(self._recent):
            if entry[0] < since:
                break
            fresh.append(entry)
        for _, channel, kind, value, why in reversed(fresh):
            if conn.closing:
                break
            if channel == CHANNEL_REVOKE and self._revoked(conn, kind, value):
                self._on_revoked(conn, kind)
            elif (
                channel == CHANNEL_DISCONNECT
                and self._on_disconnect is not None
                and self._named(conn, kind, value)
            ):
                self._on_disconnect(conn, why)
        return conn.closing

    def _named(self, conn: Closable, kind: str, value: str) -> bool:
        """Whether a disconnect of *kind* (``sub``, ``id``, ``addr``) names *conn*."""
        if kind == "sub":
            return conn.subject == value
        if kind == "id":
            return conn.id == value
        if kind == "addr" and self._address_key is not None:
            return self._address_key(conn.client) == value
        return False

    @staticmethod
    def _revoked(conn: Closable, kind: str, value: str) -> bool:
        identity = conn.identity
        return (kind == "sub" and identity.subject == value) or (
            kind == "jti" and identity.token_id == value
        )

    def disconnect(self, kind: str, value: str, why: str) -> int:
        """Close this node's connections of a subject (``sub``), address key (``addr``)
        or connection id (``id``), as an operator or a ban asked."""
        if self._on_disconnect is None:
            return 0
        closed = 0
        for conn in list(self._connections()):
            if self._named(conn, kind, value) and not conn.closing:
                self._on_disconnect(conn, why)
                closed += 1
        return closed

    def close_revoked(self, kind: str, value: str) -> int:
        closed = 0
        for conn in list(self._connections()):
            if self._revoked(conn, kind, value):
                self._on_revoked(conn, kind)
                closed += 1
        return closed

    def close_over_limit(self, holders: set[str]) -> int:
        """Leases that lapsed in the store (a pause or partition longer than their TTL)
        and were taken by other connections meanwhile: these connections are over their
        limit now, and are closed with 1013 (try again later)."""
        closed = 0
        for conn in list(self._connections()):
            if conn.holder in holders and not conn.closing:
                self._audit_over_limit(conn)
                conn.close_soon(CLOSE_TRY_AGAIN_LATER, "over the limit", cause="over_limit")
                closed += 1
        return closed

    def _audit_over_limit(self, conn: Closable) -> None:
        if self._audit is not None:
            self._audit.emit(
                "connection_over_limit",
                connection_id=conn.id,
                client=conn.client,
                subject=conn.subject,
            )

    def resync(self) -> None:
        self._spawn(self.sweep())

    async def sweep(self) -> int:
        """Close every live connection whose subject or token is revoked now."""
        conns = [c for c in self._connections() if not c.closing]
        if not conns:
            return 0
        flags = await self.store.revoked_among([(c.subject, c.identity.token_id) for c in conns])
        closed = 0
        for conn, revoked in zip(conns, flags, strict=True):
            if revoked:
                self._on_revoked(conn, "sweep")
                closed += 1
        return closed

    # -- outgoing --------------------------------------------------------------------

    def publish_broadcast(self, text: bytes) -> bool:
        """Queue a broadcast for the other nodes; never waits (drops when backed up)."""
        if self._outbox is None:
            self._outbox = asyncio.Queue(OUTBOX_LIMIT)
            self._spawn(self._publisher(self._outbox))
        try:
            self._outbox.put_nowait(self.node_id + b"\n" + text)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("cluster broadcast backlog full: %d dropped", self.dropped)
            return False
        return True

    async def _publisher(self, outbox: asyncio.Queue[bytes]) -> None:
        while True:
            payload = await outbox.get()
            try:
                await self.store.publish(CHANNEL_BROADCAST, payload)
            except StoreUnavailable:
                self.dropped += 1

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._outbox = None
