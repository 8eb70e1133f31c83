"""The Guard: one node's policy core, store and audit log, wired from a Config.

Every adapter (standalone server, and later ASGI middleware and gateway) is
given a Guard and asks it for decisions; no adapter re-implements a check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsguard.cluster.quota import SubjectQuota
from wsguard.config.keys import KEY_SOURCES, has_configured_key, load_keys, load_signing_keys
from wsguard.config.model import Config
from wsguard.core.auth import KeyMaterial, TokenVerifier
from wsguard.core.client_address import is_loopback_host, limit_key, parse_ip
from wsguard.core.decisions import (
    CLOSE_REVOKED,
    Admit,
    Close,
    Deliver,
    MessageDecision,
    Reauthenticate,
    Reject,
)
from wsguard.core.handshake import HandshakePolicy
from wsguard.core.integrity import SignatureVerifier
from wsguard.core.messages import ConnectionState, MessagePolicy
from wsguard.core.refused import Early
from wsguard.core.request import HandshakeRequest
from wsguard.core.risky_settings import config_warnings
from wsguard.errors import KeyLoadError
from wsguard.observability.audit import AuditLog
from wsguard.observability.monitor import Monitor
from wsguard.stores import Store, open_store
from wsguard.stores.base import CHANNEL_DISCONNECT, StoreUnavailable
from wsguard.stores.uri import redacted

if TYPE_CHECKING:
    from wsguard.keys.remote_jwks import RemoteJwks

logger = logging.getLogger("wsguard.auth")


#: Longest wait between two tries of an alert's ban while the shared store is away.
ALERT_BAN_RETRY_MAX = 30.0
_ADDRESS_KEYS = 4096  # addresses whose limit key is remembered (see Guard.address_key)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """How the verification key was obtained, for start-up messages."""

    dev_key: bool
    dev_key_path: str | None


def _from_afar(request: HandshakeRequest) -> bool:
    """Whether a request came from beyond this machine, as far as the host can tell: a
    proxy forwarded it, or it came in on an address that is not loopback."""
    if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
        return True
    local = request.local
    if local is None:
        return False
    address = parse_ip(local)
    return address is None or not address.is_loopback


class Guard:
    """Policy core + store + audit log for one node."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        audit: AuditLog | None = None,
        keys: KeyMaterial | None = None,
    ) -> None:
        self.config = config
        self._address_keys: dict[str, str] = {}  # see address_key
        dev = not has_configured_key(config.auth) and keys is None
        if dev and not is_loopback_host(config.host):
            raise KeyLoadError(
                "auth.secret",
                "no JWT key configured and the server is not bound to loopback; the "
                f"development key is only used on 127.0.0.1/::1 (set {KEY_SOURCES})",
            )
        self.key_info = KeyInfo(dev, str(config.auth.dev_key_file.expanduser()) if dev else None)
        self._dev_key_warned_at = float("-inf")  # see admit
        self.keys = keys if keys is not None else load_keys(config.auth)
        self.audit = (
            audit
            if audit is not None
            else AuditLog.open(config.audit.file, enabled=config.audit.enabled)
        )
        # an identity provider's keys (auth.jwks_url / oidc_issuer), fetched from start()
        self.remote_keys: RemoteJwks | None = None
        if config.auth.remote_jwks and keys is None:
            from wsguard.extras import require

            require(
                "publickey",
                "keys from an identity provider",
                "auth.oidc_issuer" if config.auth.oidc_issuer else "auth.jwks_url",
            )
            from wsguard.keys.remote_jwks import RemoteJwks

            self.remote_keys = RemoteJwks(config.auth, events=self.audit.emit)
        self.verifier = TokenVerifier(config.auth, self.keys, key_source=self.remote_keys)
        self.store = store if store is not None else open_store(config.store, config.cluster)
        self.handshakes = HandshakePolicy(config, self.store, self.verifier)
        self.signatures = signatures = SignatureVerifier(
            load_signing_keys(config.signing.keys_file),
            window=config.signing.window_seconds,
            max_nonce=config.signing.max_nonce_bytes,
            clock=time.time,
        )
        self.messages = MessagePolicy(config, self.verifier, signatures)
        self.messages.on_refresh_refused = self._refresh_failed
        self.node_id = self.handshakes.node_id
        self.monitor = Monitor(config, self.audit, self.messages.type_names())
        self.monitor.ban_action = self.alert_ban
        #: the node's counters (the Monitor's), for the per-message path
        self.metrics = metrics = self.monitor.metrics
        metrics.store_errors = self.store.error_counts
        metrics.store_up = lambda: bool(getattr(self.store, "available", True))
        ban_count = getattr(self.store, "ban_count", None)
        if ban_count is not None:
            metrics.active_bans = ban_count
        self.quota: SubjectQuota | None = None
        if self.store.shared:
            self.quota = SubjectQuota(
                self.store,
                config.limits.subject_messages_per_minute,
                60.0,
                config.cluster.subject_quota_batch,
            )
        on_health = getattr(self.store, "on_health", None)
        if on_health is not None:
            on_health(self._store_health)
        self._warned = False

    def _store_health(self, event: str, detail: str) -> None:
        """Write a store outage (once) and its recovery to the audit log."""
        if event == "outage":
            self.audit.emit("store_outage", store=redacted(self.store.uri), detail=detail)
            self.monitor.store_outage(detail)
        else:
            self.audit.emit("store_recovered", store=redacted(self.store.uri))
            self.monitor.store_recovered()

    @property
    def ready(self) -> tuple[bool, str | None]:
        """Whether this node should get traffic: (ready, reason when not)."""
        if self.handshakes.draining:
            return False, "draining"
        if self.remote_keys is not None and not self.remote_keys.usable():
            return False, "keys_unavailable"
        if not getattr(self.store, "available", True):
            modes = self.config.cluster.on_store_error
            if "closed" in (modes.bans, modes.revocations, modes.connections, modes.rate_limits):
                return False, "store_unavailable"
        if getattr(self.store, "events_failing", False):
            # Redis answers but refuses the event subscription: other nodes' revocations,
            # disconnects and bans reach this node's connections late
            return False, "events_unavailable"
        return True, None

    async def start(self) -> None:
        """Start the store's background work (lease renewal, cluster events) and fetch the
        identity provider's keys (a provider that does not answer leaves the node started
        but refusing handshakes with 503 ``keys_unavailable``, and not ready)."""
        self.warn_risky_config()
        await self.store.start()
        if self.remote_keys is not None:
            await self.remote_keys.start()

    def warn_risky_config(self) -> None:
        """Log and audit, once, the valid but risky settings (public keys without an
        audience, a proxy network of every address, message types without a schema)."""
        if self._warned:
            return
        self._warned = True
        for key, message in config_warnings(self.config):
            logger.warning("%s: %s", key, message)
            self.audit.emit("config_warning", key=key, detail=message)

    async def admit(self, request: HandshakeRequest) -> Admit | Reject:
        """Evaluate a handshake and write the audit record of a refusal."""
        started = time.monotonic()
        try:
            decision = await self.handshakes.evaluate(request)
        except Exception:  # a bug: fail closed with an answer, never a socket left hanging
            logger.exception("handshake policy failed")
            decision = Reject(500, "policy_error", "Internal error.")
        if isinstance(decision, Admit) and self.key_info.dev_key and _from_afar(request):
            # the development key is for clients on this machine
            await decision.release()
            decision = Reject(500, "dev_key_beyond_loopback", "Server misconfigured.")
            if started >= self._dev_key_warned_at + 60.0:
                self._dev_key_warned_at = started
                logger.error(
                    "refusing a WebSocket handshake that came through a proxy (it carries "
                    "X-Forwarded-For or Forwarded) or in on an address that is not "
                    "loopback: no JWT key is configured, and the development key is only "
                    f"for clients on this machine (set {KEY_SOURCES})"
                )
        if isinstance(decision, Reject):
            self.record_refusal(decision, request)
        else:
            decision.checked_at = started
            self.monitor.handshake_admitted(decision.client)
        return decision

    def early_refusal(self, peer: str) -> Early | None:
        """The refusal of an attempt from *peer* while its address is refused for its
        handshake rate or a ban (see :class:`~wsguard.core.refused.RefusedAddresses`):
        status, reason, message and headers, counted in the metrics but not audited
        again; None when the policy must decide."""
        early = self.handshakes.refused.early(peer)
        if early is not None:
            self.monitor.handshake_refused(early[1], peer, early[0])
        return early

    def is_refused(self, peer: str) -> bool:
        """Whether an attempt from *peer* would be answered by :meth:`early_refusal` now
        (nothing counted: the attempt is counted when it is answered)."""
        return self.handshakes.refused.early(peer) is not None

    def record_raw_refusal(self, status: int | None, reason: str, client: str | None) -> None:
        """A handshake the adapter refused before the policy saw it (malformed, timeout);
        *client* None: its address is not known (not counted against any address)."""
        self.audit.emit("handshake_refused", status=status, reason=reason, client=client)
        self.monitor.handshake_refused(reason, client, status)

    def record_refusal(self, decision: Reject, request: HandshakeRequest) -> None:
        self.monitor.handshake_refused(
            decision.reason, decision.client or request.peer, decision.status
        )
        if decision.reason == "banned":
            return  # a ban is logged once (ban_started), not once per attempt
        secret = frozenset({self.config.auth.query_param})
        fields: dict[str, Any] = {
            "status": decision.status,
            "reason": decision.reason,
            "client": decision.client or request.peer,
            "subject": decision.subject,
            "origin": request.headers.get("origin"),
            "path": request.redacted_target(secret),
            "detail": decision.detail or None,
        }
        self.audit.emit("handshake_refused", **fields)
        if decision.ban_started is not None:
            self.audit.emit(
                "ban_started",
                client=decision.client,
                seconds=round(decision.ban_started, 3),
                reason="auth_failures",
            )
            self.monitor.ban_started(
                decision.client, decision.ban_started, "auth_failures", "auth_failures"
            )

    # -- the life of an admitted connection (every adapter) -----------------------------

    def connection_opened(self, conn: Any, subprotocol: str | None) -> None:
        """Audit an admitted connection (an App ``Connection`` or the middleware's)."""
        self.audit.emit(  # never raises: AuditLog.emit swallows write errors
            "connection_admitted",
            connection_id=conn.id,
            client=conn.client,
            subject=conn.subject,
            token_id=conn.identity.token_id,
            origin=conn.origin,
            subprotocol=subprotocol,
        )

    def connection_closed(self, conn: Any, code: int, closed_by: str) -> None:
        """Count and audit the end of a connection: the code sent by whoever closed first."""
        self.monitor.connection_closed(code, closed_by)
        self.audit.emit(
            "connection_closed",
            connection_id=conn.id,
            client=conn.client,
            subject=conn.subject,
            code=code,
            closed_by=closed_by,
            cause=conn.close_cause,
            duration_s=round(time.monotonic() - conn.opened_at, 3),
            messages_in=conn.state.received,
            messages_out=conn.sent,
        )

    # -- the cluster-wide steps of a delivered message (every adapter) -------------------

    async def settle(self, state: ConnectionState, decision: Deliver) -> MessageDecision:
        """After the local policy delivered: the subject's cluster quota, then the nonce.

        Adapters call this (the standalone server inlines the quota's local fast path).
        """
        quota = self.quota
        if quota is not None and not quota.take_local(state.identity.subject, self.now()):
            outcome = await self.check_quota(state, decision)
            if not isinstance(outcome, Deliver):
                return outcome
        if decision.nonce is not None:
            return await self.check_nonce(state, decision)
        return decision

    async def check_quota(self, state: ConnectionState, decision: Deliver) -> MessageDecision:
        """Spend one message of the subject's cluster-wide budget (batched)."""
        quota = self.quota
        assert quota is not None
        now = self.now()
        ref = decision.message.get("id")
        try:
            wait = await quota.refill(state.identity.subject, now)
        except StoreUnavailable:  # rate limits configured to fail closed
            return self.messages.unavailable(state, now, ref, decision.type)
        if wait <= 0:
            return decision
        return self.messages.rate_limited(state, self.now(), ref, wait, decision.type)

    async def check_nonce(self, state: ConnectionState, decision: Deliver) -> MessageDecision:
        """Record a message's nonce (a signed type's, or an unsigned type's with a replay
        window); a nonce seen before is a replay."""
        verified = decision.nonce
        ref = decision.message.get("id")
        try:
            outcome = await self.store.record_nonce(
                verified.nonce_key, verified.timestamp, verified.window
            )
        except StoreUnavailable:
            return self.messages.unavailable(state, self.now(), ref, decision.type)
        if outcome == "fresh":
            return decision
        if outcome == "stale":  # on the store's clock, which every node shares
            return self.messages.stale(state, self.now(), ref, decision.type)
        return self.messages.replayed(state, self.now(), ref, decision.type)

    # -- in-band token refresh (every adapter) -------------------------------------------

    async def check_refresh(self, conn: Any, decision: Reauthenticate) -> MessageDecision:
        """A refresh the message policy verified, checked as a handshake is: is its token id
        or its subject revoked (cluster-wide)? Returns *decision* when the new token may
        replace the old one, else the answer to send. Audited either way.

        *conn* is an App ``Connection`` or the middleware's: ``id``, ``client``, ``state``.
        A revoked token id is refused (``invalid_token``, a violation: the connection keeps
        its old expiry); a revoked subject closes the connection (4003), as the revocation
        event would have; a store that cannot answer, with revocations failing closed,
        refuses (``unavailable``, retryable).
        """
        identity = decision.identity
        subject, token_id = identity.subject, identity.token_id
        try:
            revoked = await self.store.is_revoked(subject, token_id)
            if revoked and token_id is not None:  # which of the two: one more look
                revoked_subject = await self.store.is_revoked(subject, None)
            else:
                revoked_subject = revoked
        except StoreUnavailable:
            self._refresh_refused(conn, token_id, "store_unavailable", "revocations")
            return self.messages.unavailable(conn.state, self.now(), decision.ref, "auth")
        if revoked_subject:
            self._refresh_refused(conn, token_id, "revoked", "sub")
            return Close(CLOSE_REVOKED, "revoked", cause="revoked")
        if revoked:
            self._refresh_refused(conn, token_id, "revoked", "jti")
            return self.messages.refresh_refused(conn.state, self.now(), decision.ref)
        self.audit.emit(
            "token_refreshed",
            connection_id=conn.id,
            client=conn.client,
            subject=subject,
            token_id=token_id,
            expires_at=identity.expires_at,
        )
        return decision

    def _refresh_refused(self, conn: Any, token_id: str | None, reason: str, detail: str) -> None:
        self.audit.emit(
            "token_refresh_refused",
            connection_id=conn.id,
            client=conn.client,
            subject=conn.subject,
            token_id=token_id,
            reason=reason,
            detail=detail,
        )

    def _refresh_failed(
        self, state: ConnectionState, reason: str, detail: str, token_id: str | None
    ) -> None:
        """The message policy refused a refresh token (*token_id*: once it verified)."""
        self.audit.emit(
            "token_refresh_refused",
            connection_id=state.connection_id,
            client=state.client,
            subject=state.identity.subject,
            token_id=token_id,
            reason=reason,
            detail=detail or None,
        )

    # -- operator actions (admin API, alert rules) --------------------------------------

    def address_key(self, address: str) -> str:
        """The key an address is limited and banned under; ValueError if not an IP.

        The key itself is accepted too: an IPv6 network of ``limits.ipv6_prefix_length``
        bits (``2001:db8::/64``, as ``GET /bans`` lists it) or an IPv4 ``/32``.
        Remembered per address (each handshake asks several times; parsing an address
        costs ~1 µs), for the last few thousand addresses (at most ~0.7 MB).
        """
        key = self._address_keys.get(address)
        if key is None:
            key = self._address_key(address)
            if len(self._address_keys) >= _ADDRESS_KEYS:
                self._address_keys.clear()
            self._address_keys[address] = key
        return key

    def _address_key(self, address: str) -> str:
        text = address.strip()
        prefix = self.config.limits.ipv6_prefix_length
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)  # ValueError if malformed
            if network.version == 6 and network.prefixlen == prefix:
                return str(network)
            if network.version == 4 and network.prefixlen == 32:
                return str(network.network_address)
            raise ValueError("not an address or a ban key")
        ip = parse_ip(text)
        if ip is None:
            raise ValueError("not an IP address")
        return limit_key(str(ip), prefix)

    async def ban_address(self, address: str, seconds: float, reason: str = "admin") -> str:
        """Ban *address* (its /64 for IPv6) on every node and close its live connections.

        *reason* is ``admin`` or ``alert:<rule>``. Returns the banned key. Raises
        :class:`StoreUnavailable` unless every node got it: ``bans`` when the ban is not
        stored for the cluster (it holds on this node), ``disconnect`` when it is but the
        other nodes could not be told to close the address's connections.
        """
        key = self.address_key(address)
        await self.store.ban("addr:" + key, seconds)
        self._reached_every_node("bans")
        source = "alert" if reason.startswith("alert:") else "admin"
        self.audit.emit("ban_started", client=key, seconds=round(seconds, 3), reason=reason)
        self.monitor.ban_started(key, seconds, source, reason)
        await self.disconnect("addr", key, "banned")
        return key

    async def alert_ban(self, address: str, seconds: float, reason: str) -> str | None:
        """An alert rule's ban (``monitor.ban_action``). While the shared store cannot
        carry it, each failure is audited (``ban_failed``) and the ban, or the closing of
        the address's connections, is tried again with back-off for as long as the ban
        would last. Returns the banned key, or None when it never reached every node."""
        key = self.address_key(address)
        started = self.now()
        delay = self.config.cluster.retry_seconds
        stored = False
        while True:
            left = seconds - (self.now() - started)
            if left <= 0:
                return None  # the ban would be over by now
            try:
                if stored:
                    await self.disconnect("addr", key, "banned")
                else:
                    await self.ban_address(key, left, reason)
                return key
            except StoreUnavailable as exc:
                stored = stored or exc.check == "disconnect"
                again = left - delay > 0
                self.audit.emit(
                    "ban_failed",
                    client=key,
                    reason=reason,
                    check=exc.check,
                    retry_in=round(delay, 3) if again else None,
                )
                if not again:
                    return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, ALERT_BAN_RETRY_MAX)

    async def unban_address(self, address: str) -> bool:
        """Lift a ban on every node; StoreUnavailable when the shared store did not."""
        key = self.address_key(address)
        lifted = await self.store.unban("addr:" + key)
        self.handshakes.refused.forget(key)
        self._reached_every_node("bans")
        if lifted:
            self.audit.emit("ban_lifted", client=key, reason="admin")
            self.monitor.ban_lifted(key)
        return lifted

    async def disconnect(self, kind: str, value: str, why: str = "admin") -> None:
        """Ask every node to close the connections of a subject, address key or id.

        Raises ``StoreUnavailable("disconnect")`` when the shared store could not carry
        the request to the other nodes (this node may have closed its own already).
        """
        try:
            await self.store.publish(CHANNEL_DISCONNECT, f"{why}|{kind}:{value}".encode())
        except StoreUnavailable:
            raise StoreUnavailable("disconnect") from None
        self._reached_every_node("disconnect")

    def _reached_every_node(self, check: str) -> None:
        """After a write to a shared store: raise StoreUnavailable(*check*) if it fell back
        to this node's own state (a check failing open) instead of reaching the others.
        (No await between the write and this test: nothing else ran in between.)"""
        if self.store.shared and not getattr(self.store, "available", True):
            raise StoreUnavailable(check)

    def deadline(self, expires_at: float | None) -> float | None:
        """Wall-clock time at which a token's connection must close (exp + leeway)."""
        if expires_at is None:
            return None
        return expires_at + self.config.auth.leeway_seconds

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def reload_signing_keys(self) -> bool:
        """Read ``signing.keys_file`` again (SIGHUP): keys added verify from now on, keys
        removed no more. A file that cannot be used keeps the keys in force (logged and
        audited). Returns whether the keys were replaced."""
        path = self.config.signing.keys_file
        if path is None:
            return False
        try:
            keys = load_signing_keys(path)
        except KeyLoadError as exc:
            logger.error("signing keys not reloaded, keeping the previous ones: %s", exc)
            self.audit.emit("keys_reload_failed", key="signing.keys_file", detail=exc.message)
            return False
        self.signatures.replace_keys(keys)
        logger.info("signing keys reloaded from %s: %d keys", path, len(keys))
        self.audit.emit("keys_reloaded", key="signing.keys_file", keys=len(keys))
        return True

    async def close(self) -> None:
        if self.remote_keys is not None:
            await self.remote_keys.close()
        await self.monitor.close()
        if self.quota is not None:
            await self.quota.close()
        await self.store.close()
        self.audit.close()
