"""The identity headers the gateway adds to each upstream handshake, and their signature.

The gateway builds the upstream request itself: no header of the client is
forwarded unless named in ``gateway.forward_headers`` (never credentials, never
the identity headers), so a client cannot forge them. With
``gateway.identity_secret`` the headers are signed::

    signature = hex(HMAC-SHA256(secret, "wsguard-identity-v2\\n" + timestamp + "\\n" +
                                upstream + "\\n" + path + "\\n" + connection + "\\n" +
                                subject + "\\n" + scopes + "\\n" + token_id + "\\n" + client))

where ``upstream`` is the URL the gateway connected to, as ``scheme://host:port/path``
(:func:`signed_upstream`: lower-case scheme and host, the port always written, no
credentials, no query) and ``path`` the path the client asked the gateway for (sent in
``gateway.path_header``). A header set is therefore good for one upstream and one route
only. A backend checks it with :func:`verify_identity` (or the same few lines in its own
language): it gives the URL it is reached at, refuses timestamps older than ``max_age``
or more than ``max_skew`` seconds ahead of its clock, and refuses a connection id it has
already accepted within the window (:class:`SeenConnections`): every upstream connection
has its own id, so a header set seen twice is a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from wsguard.config.model import GatewayConfig
from wsguard.core.identity import Identity

VERSION = "wsguard-identity-v2"
MAX_AGE = 60.0  # seconds a signature stays good
MAX_SKEW = 5.0  # seconds a timestamp may be ahead of the verifier's clock
_DEFAULT_PORTS = {"ws": 80, "wss": 443}


def signed_upstream(url: str) -> str:
    """The upstream URL as it is signed: ``scheme://host:port/path``.

    Scheme and host in lower case, the port always written (80, 443 by default), the path
    as given (``/`` when empty); credentials and the query are left out (they may hold
    secrets, and the upstream sees its own path). Raises ValueError for anything but a
    ws:// or wss:// URL with a host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("the upstream must be a ws:// or wss:// URL with a host")
    port = parts.port or _DEFAULT_PORTS[scheme]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{parts.path or '/'}"


def _signed_text(
    timestamp: str,
    upstream: str,
    path: str,
    connection: str,
    subject: str,
    scopes: str,
    token_id: str,
    client: str,
) -> bytes:
    fields = (VERSION, timestamp, upstream, path, connection, subject, scopes, token_id, client)
    return "\n".join(fields).encode()


#: Printable ASCII but "%": kept as is in header values; anything else is percent-encoded
#: (UTF-8), so every subject is a valid header value and decodes with unquote().
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _header_value(value: str) -> str:
    return quote(value, safe=_SAFE)


def identity_headers(
    config: GatewayConfig,
    identity: Identity,
    *,
    client: str,
    connection_id: str,
    upstream: str,
    path: str,
    now: float | None = None,
) -> list[tuple[str, str]]:
    """The headers that tell *upstream* who is connected, by which *path* (the client's
    request path on the gateway); signed, for that upstream and path, when a secret is
    set."""
    subject = _header_value(identity.subject)
    # a space inside one scope is encoded, so the list splits back into the same scopes
    scopes = " ".join(_header_value(scope).replace(" ", "%20") for scope in sorted(identity.scopes))
    token_id = _header_value(identity.token_id or "")
    route = _header_value(path)
    headers = [
        (config.subject_header, subject),
        (config.scopes_header, scopes),
        (config.token_id_header, token_id),
        (config.client_header, client),
        (config.connection_header, connection_id),
        (config.path_header, route),
    ]
    if config.identity_secret:
        timestamp = str(int(now if now is not None else time.time()))
        text = _signed_text(
            timestamp,
            signed_upstream(upstream),
            route,
            connection_id,
            subject,
            scopes,
            token_id,
            client,
        )
        digest = hmac.new(config.identity_secret.encode(), text, hashlib.sha256).hexdigest()
        headers += [(config.timestamp_header, timestamp), (config.signature_header, digest)]
    return headers


class SeenConnections:
    """The connection ids a backend has accepted, each kept until its signature expires:
    give it to :func:`verify_identity` (``seen=``) and a header set that comes back is
    refused. Bounded: when ``max_entries`` ids are all still live, new ones are refused
    (never forgotten early). For one process (thread-safe); several backend processes
    share the memory in their store instead (e.g. Redis ``SET id 1 NX EX 65``)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}  # insertion order: about expiry order
        self._lock = threading.Lock()

    def first_use(self, connection_id: str, until: float, now: float) -> bool:
        """Record *connection_id* as used until *until*; False if it already was."""
        with self._lock:
            while self._until:
                oldest = next(iter(self._until))
                if self._until[oldest] > now:
                    break
                del self._until[oldest]
            if connection_id in self._until or len(self._until) >= self.max_entries:
                return False
            self._until[connection_id] = until
            return True

    def __len__(self) -> int:
        return len(self._until)


def verify_identity(
    headers: Mapping[str, str],
    secret: str,
    *,
    upstream: str,
    config: GatewayConfig | None = None,
    max_age: float = MAX_AGE,
    max_skew: float = MAX_SKEW,
    now: float | None = None,
    seen: SeenConnections | None = None,
) -> bool:
    """For a Python backend: whether the identity headers came from the gateway, for this
    backend, within ``max_age`` seconds (and at most ``max_skew`` ahead of this clock), and
    (with *seen*) for the first time.

    *upstream* is the URL the gateway connects to for this backend (``gateway.upstream``
    or the route's URL; a bad one raises ValueError). *headers* is a case-insensitive
    mapping (or any mapping with the configured names). Whatever the headers hold, the
    answer is True or False: a missing, repeated, non-ASCII or malformed header is False.
    """
    names = config or GatewayConfig()
    expected_upstream = signed_upstream(upstream)

    def get(name: str) -> str | None:
        try:
            value = headers.get(name)
            if value is None:
                value = headers.get(name.lower())
        except LookupError:  # e.g. websockets' Headers with the name twice
            return None
        if value is None:
            return ""
        return value if isinstance(value, str) and value.isascii() else None

    values = [
        get(name)
        for name in (
            names.timestamp_header,
            names.signature_header,
            names.path_header,
            names.connection_header,
            names.subject_header,
            names.scopes_header,
            names.token_id_header,
            names.client_header,
        )
    ]
    if any(value is None for value in values):
        return False
    timestamp, signature, path, connection, subject, scopes, token_id, client = (
        value or "" for value in values
    )
    if not (timestamp.isdigit() and len(timestamp) <= 12) or not signature:
        return False
    current = now if now is not None else time.time()
    stamped = int(timestamp)
    if current - stamped > max_age or stamped - current > max_skew:
        return False
    text = _signed_text(
        timestamp, expected_upstream, path, connection, subject, scopes, token_id, client
    )
    expected = hmac.new(secret.encode(), text, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, signature.encode()):
        return False
    return seen is None or seen.first_use(connection, stamped + max_age + 1.0, current)
