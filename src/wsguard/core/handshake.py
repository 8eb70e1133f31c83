"""The handshake policy: an upgrade request in, Admit or Reject out.

Order of checks (cheapest and most abusive first):

1. the request is a well-formed WebSocket upgrade (400 / 405 / 426);
2. the Origin is allowed (403; absent Origin refused when cookie auth is on) -- checked
   before any counter so that a cross-site page cannot spend its visitors' quota;
3. the client address (trusted proxies only) is not banned (429);
4. the address is within its handshake allowance (a token bucket; 429);
5. the node is not draining (503);
6. credentials are present and verify (401, counted toward an address ban; 503 when
   the identity provider's keys cannot be used, which is not the client's failure);
7. global, per-address and per-subject connection slots are free (503 / 429).

Slots taken in step 7 are released by :meth:`Admit.release`, which adapters call
from the one place every connection ends (transport closed).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from dataclasses import replace

from wsguard.config.model import Config
from wsguard.core.auth import (
    AuthFailure,
    Credentials,
    KeysUnavailable,
    TokenVerifier,
    extract_credentials,
)
from wsguard.core.client_address import ClientAddressResolver, limit_key
from wsguard.core.decisions import Admit, HandshakeDecision, Reject
from wsguard.core.headers import OWS, split_list, token_list
from wsguard.core.identity import Identity
from wsguard.core.origin import OriginPolicy
from wsguard.core.refused import RefusedAddresses
from wsguard.core.request import HandshakeRequest
from wsguard.stores.base import BanPolicy, Store, StoreUnavailable

_MAX_TARGET = 4096
_CONCURRENCY_RETRY_AFTER = 5
_STORE_RETRY_AFTER = 5
_BEARER = 'Bearer realm="wsguard"'


def _retry_after(seconds: float) -> tuple[tuple[str, str], ...]:
    return (("Retry-After", str(max(1, math.ceil(seconds)))),)


# RFC 6455: the key is the base64 encoding of 16 bytes: 22 characters of the alphabet
# and the padding (what base64.b64decode(validate=True) accepts as 16 bytes, decided by
# one C match)
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
# a request target's characters that are never in one: controls, space and DEL, and
# "#" (a fragment is the client's own, never sent: RFC 9112 §3.2, RFC 6455 §3)
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f#]")


def _valid_key(value: str) -> bool:
    """RFC 6455: the key is the base64 encoding of 16 bytes."""
    return _KEY.fullmatch(value.strip(OWS)) is not None


def _names(values: list[str], token: str, *, alone: bool) -> bool | None:
    """Whether the list in *values* holds *token* (with *alone*: is exactly it, and its
    elements are protocols: ``token ["/" token]``), case-insensitively; None when it is
    not such a list (RFC 9110 §5.6.1, §7.8)."""
    if len(values) == 1 and values[0].lower() == token:
        return True  # the usual request: one header holding just the token
    items = token_list(values, versioned=alone)
    if items is None:
        return None
    names = [item.lower() for item in items]
    return names == [token] if alone else token in names


# RFC 9110 §7.2 / RFC 3986 §3.2.2: host = IP-literal / IPv4address / reg-name, then an
# optional port. No spaces, no userinfo ("@"), no control characters.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")


def check_upgrade(request: HandshakeRequest) -> Reject | None:
    """Structural checks of the upgrade request (no policy, no state)."""
    headers = request.headers
    if request.method != "GET":
        return Reject(
            405,
            "bad_method",
            "Only GET upgrades are accepted.",
            (("Allow", "GET"),),
            detail="method",
        )
    host = headers.get_all("host")
    if len(host) != 1 or not _HOST.fullmatch(host[0].strip(OWS)):
        return Reject(400, "bad_request", "Missing or invalid Host header.", detail="host")
    target = request.target
    if (
        not target.startswith("/")
        or target.startswith("//")
        or len(target) > _MAX_TARGET
        or not target.isascii()
        or _NOT_IN_TARGET.search(target) is not None
    ):
        return Reject(400, "bad_request", "Invalid request target.", detail="target")
    # Connection is a list that must hold "upgrade" (browsers send "keep-alive, Upgrade");
    # Upgrade must name websocket alone: the one protocol this server switches to
    upgrade = _names(headers.get_all("upgrade"), "websocket", alone=True)
    connection = _names(headers.get_all("connection"), "upgrade", alone=False)
    if upgrade is None or connection is None:
        return Reject(
            400,
            "bad_request",
            "Invalid Upgrade or Connection header.",
            detail="upgrade" if upgrade is None else "connection",
        )
    if not upgrade or not connection:
        return Reject(
            426,
            "not_websocket",
            "This endpoint only accepts WebSocket upgrades.",
            headers=(("Upgrade", "websocket"), ("Connection", "Upgrade")),
            detail="missing upgrade headers",
        )
    if headers.get_all("sec-websocket-version") != ["13"]:
        return Reject(
            426,
            "unsupported_version",
            "Unsupported WebSocket version.",
            headers=(("Sec-WebSocket-Version", "13"),),
            detail="version",
        )
    keys = headers.get_all("sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        return Reject(400, "bad_request", "Invalid Sec-WebSocket-Key.", detail="key")
    offered = headers.get_all("sec-websocket-protocol")
    if offered and token_list(offered) is None:  # RFC 6455 §4.1: 1#token
        return Reject(400, "bad_handshake", "Invalid WebSocket handshake.", detail="subprotocol")
    return None


#: This node's own capacity (``limits.max_connections``): always counted locally.
_NODE_SLOTS = "conn:all"


class Lease:
    """The connection slots one admitted connection holds (released once, at its end)."""

    __slots__ = ("holder", "keys", "store")

    def __init__(self, store: Store, holder: str) -> None:
        self.store = store
        self.holder = holder
        self.keys: tuple[str, ...] = ()

    async def release(self) -> None:
        keys, self.keys = self.keys, ()
        store = self.store
        shared = [key for key in keys if key != _NODE_SLOTS]
        if len(shared) < len(keys):
            await store.local.release(_NODE_SLOTS, self.holder)
        if shared:
            await store.release_all(shared, self.holder)

    # the Admit's release callable is the lease itself: no bound method kept per connection
    __call__ = release


class HandshakePolicy:
    """Evaluates handshake requests. One instance per node, shared by all adapters.

    Holds no per-connection state: everything a connection owns lives in the
    :class:`Admit` it receives and in the store.
    """

    def __init__(self, config: Config, store: Store, verifier: TokenVerifier) -> None:
        self.config = config
        self.store = store
        self.verifier = verifier
        self.resolver = ClientAddressResolver(config.proxy.trusted, header=config.proxy.header)
        prefix = config.limits.ipv6_prefix_length
        #: addresses refused for their handshake rate or a ban, until they may retry
        self.refused = RefusedAddresses(self.resolver, lambda address: limit_key(address, prefix))
        self.origins = OriginPolicy(
            config.origin.allowed, allow_missing=config.origin.allow_missing
        )
        limits = config.limits
        # the handshake token bucket of an address (the configuration never changes here)
        self._allowance = limits.handshake_allowance
        self.ban_policy = BanPolicy(
            threshold=limits.auth_failures_before_ban,
            window=limits.auth_failure_window_seconds,
            base_seconds=limits.ban_seconds,
            max_seconds=limits.ban_max_seconds,
        )
        self.draining = False
        self._holder_ids = itertools.count(1)
        self.node_id = os.urandom(4).hex()

    def select_subprotocol(self, offered: list[str]) -> str | None:
        """The first configured application subprotocol the client offered.

        Never the token entry: the token is a credential, not a protocol.
        """
        prefix = self.config.auth.subprotocol_prefix
        names = [p for p in offered if not p.startswith(prefix)]
        for supported in self.config.subprotocols:
            if supported in names:
                return supported
        return None

    async def evaluate(self, request: HandshakeRequest) -> HandshakeDecision:
        bad = check_upgrade(request)
        client = self.resolver.resolve(request.peer, request.headers)
        if bad is not None:
            return _with_client(bad, client)

        # A foreign Origin is refused before anything is counted: otherwise any web
        # page a user visits could spend that user's handshake quota or get them banned.
        origin = request.headers.get("origin")
        if request.headers.count("origin") > 1 or not self.origins.check(
            origin, cookie_auth=self.config.auth.cookie
        ):
            return Reject(403, "origin_forbidden", "Origin not allowed.", client=client)
        try:
            return await self._evaluate(request, client, origin)
        except StoreUnavailable as exc:  # a check configured to fail closed
            return Reject(
                503,
                "store_unavailable",
                "Service temporarily unavailable.",
                _retry_after(_STORE_RETRY_AFTER),
                detail=exc.check,
                client=client,
            )

    async def _evaluate(
        self, request: HandshakeRequest, client: str, origin: str | None
    ) -> HandshakeDecision:
        store, limits = self.store, self.config.limits
        key = limit_key(client, limits.ipv6_prefix_length)
        rate, burst = self._allowance  # paced: a burst, then one per 60/N s
        banned, wait = await store.screen_address(key, rate, burst)
        if banned > 0:
            self.refused.remember(request.peer, client, "banned", banned)
            return Reject(
                429, "banned", "Too many failed attempts.", _retry_after(banned), client=client
            )
        if wait > 0:
            self.refused.remember(request.peer, client, "handshake_rate", wait)
            return Reject(
                429,
                "handshake_rate",
                "Too many connection attempts.",
                _retry_after(wait),
                client=client,
            )
        if self.draining:
            return Reject(503, "draining", "Server is shutting down.", client=client)

        try:
            credentials = extract_credentials(request, self.config.auth)
        except AuthFailure as failure:
            return await self._auth_failed(client, key, failure)
        try:
            identity = await self._authenticate(credentials, request.client_cert)
        except KeysUnavailable as failure:  # the identity provider's fault, not the client's
            return Reject(
                503,
                failure.reason,
                "Service temporarily unavailable.",
                _retry_after(_STORE_RETRY_AFTER),
                detail=failure.detail,
                client=client,
            )
        except AuthFailure as failure:
            return await self._auth_failed(client, key, failure)

        lease = Lease(store, f"{self.node_id}:{next(self._holder_ids)}")
        try:
            refused = await self._acquire_slots(lease, client, key, identity)
        except BaseException:  # cancelled mid-way (handshake timeout): give slots back
            await lease.release()
            raise
        if refused is not None:
            await lease.release()
            return refused

        subprotocol = None
        if self.config.subprotocols:
            offered = list(split_list(request.headers.get_all("sec-websocket-protocol")))
            subprotocol = self.select_subprotocol(offered)
        return Admit(
            identity=identity,
            client=client,
            # an allowed origin is one of a few: its connections share one string
            origin=None if origin is None else sys.intern(origin),
            subprotocol=subprotocol,
            _release=lease,
            holder=lease.holder,
        )

    async def _authenticate(self, credentials: Credentials | None, cert: str | None) -> Identity:
        """Token and/or client certificate -> identity; raises AuthFailure.

        With mTLS ``client_cert = "required"`` the certificate alone authenticates;
        a token sent as well must name the same subject. With ``"optional"`` a
        token is always required and a certificate, when present, must match it.
        """
        tls = self.config.tls
        mtls = tls.client_ca_file is not None and cert is not None
        if mtls and not cert:
            # a verified certificate that names no usable identity: never skip the binding
            raise AuthFailure("certificate_mismatch", "certificate names no usable identity")
        if credentials is None:
            if mtls and tls.client_cert == "required":
                assert cert is not None
                return Identity(
                    subject=cert,
                    scopes=frozenset(tls.cert_scopes.get(cert, ())),
                    method="mtls",
                )
            raise AuthFailure("missing_credentials")
        identity = await self.verifier.verify_fetching(credentials.token)
        if mtls:
            if cert != identity.subject:
                raise AuthFailure("certificate_mismatch", "certificate and token disagree")
            extra = frozenset(tls.cert_scopes.get(cert, ()))
            identity = replace(identity, scopes=identity.scopes | extra, method="jwt+mtls")
        return identity

    async def _acquire_slots(
        self, lease: Lease, client: str, address_key: str, identity: Identity
    ) -> Reject | None:
        """This node's capacity (local), then revocation and the shared slots (one step)."""
        store, limits = self.store, self.config.limits
        subject = identity.subject
        if not await store.local.acquire(_NODE_SLOTS, limits.max_connections, lease.holder):
            return Reject(
                503,
                "server_full",
                "Server is full.",
                _retry_after(_CONCURRENCY_RETRY_AFTER),
                detail="all",
                client=client,
                subject=subject,
            )
        lease.keys = (_NODE_SLOTS,)
        # interned: the connections of one address (or one subject) share their keys
        address_slots = sys.intern("conn:addr:" + address_key)
        admission = await store.admit(
            subject,
            identity.token_id,
            (
                (address_slots, limits.connections_per_address),
                (sys.intern("conn:sub:" + subject), limits.connections_per_subject),
            ),
            lease.holder,
        )
        lease.keys += admission.taken
        if admission.revoked:
            return Reject(
                401,
                "revoked",
                "Invalid or expired token.",
                (("WWW-Authenticate", _BEARER + ', error="invalid_token"'),),
                client=client,
                subject=subject,
            )
        if admission.full is None:
            return None
        per_address = admission.full == address_slots
        return Reject(
            429,
            "too_many_connections",
            "Too many connections from this address."
            if per_address
            else "Too many connections for this user.",
            _retry_after(_CONCURRENCY_RETRY_AFTER),
            detail="addr" if per_address else "sub",
            client=client,
            subject=subject,
        )

    async def _auth_failed(self, client: str, key: str, failure: AuthFailure) -> Reject:
        ban = await self.store.record_failure("addr:" + key, self.ban_policy)
        error = "" if failure.reason == "missing_credentials" else ', error="invalid_token"'
        message = (
            "Missing credentials."
            if failure.reason == "missing_credentials"
            else "Invalid or expired token."
        )
        return Reject(
            401,
            failure.reason,
            message,
            (("WWW-Authenticate", _BEARER + error),),
            detail=failure.detail,
            client=client,
            ban_started=ban,
        )


def _with_client(reject: Reject, client: str) -> Reject:
    return Reject(
        reject.status,
        reject.reason,
        reject.message,
        reject.headers,
        reject.detail,
        client,
        reject.subject,
        reject.ban_started,
    )
