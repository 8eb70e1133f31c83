"""The identity headers the gateway adds to each upstream handshake, and their signature.

The gateway builds the upstream request itself: no header of the client is
forwarded unless named in ``gateway.forward_headers`` (never credentials, never
the identity headers), so a client cannot forge them. With
``gateway.identity_secret`` the headers are signed::

    signature = hex(HMAC-SHA256(secret, "wsguard-identity-v1\\n" + timestamp + "\\n" +
                                connection + "\\n" + subject + "\\n" + scopes + "\\n" +
                                token_id + "\\n" + client))

A backend checks it with :func:`verify_identity` (or the same few lines in its
own language) and rejects a timestamp older than a minute or so.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote

from wsguard.config.model import GatewayConfig
from wsguard.core.identity import Identity

VERSION = "wsguard-identity-v1"


def _signed_text(
    timestamp: str, connection: str, subject: str, scopes: str, token_id: str, client: str
) -> bytes:
    return "\n".join((VERSION, timestamp, connection, subject, scopes, token_id, client)).encode()


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
    now: float | None = None,
) -> list[tuple[str, str]]:
    """The headers that tell the upstream who is connected (signed when a secret is set)."""
    subject = _header_value(identity.subject)
    # a space inside one scope is encoded, so the list splits back into the same scopes
    scopes = " ".join(_header_value(scope).replace(" ", "%20") for scope in sorted(identity.scopes))
    token_id = _header_value(identity.token_id or "")
    headers = [
        (config.subject_header, subject),
        (config.scopes_header, scopes),
        (config.token_id_header, token_id),
        (config.client_header, client),
        (config.connection_header, connection_id),
    ]
    if config.identity_secret:
        timestamp = str(int(now if now is not None else time.time()))
        text = _signed_text(timestamp, connection_id, subject, scopes, token_id, client)
        digest = hmac.new(config.identity_secret.encode(), text, hashlib.sha256).hexdigest()
        headers += [(config.timestamp_header, timestamp), (config.signature_header, digest)]
    return headers


def verify_identity(
    headers: Mapping[str, str],
    secret: str,
    *,
    config: GatewayConfig | None = None,
    max_age: float = 60.0,
    now: float | None = None,
) -> bool:
    """For a Python backend: whether the identity headers came from the gateway.

    *headers* is a case-insensitive mapping (or any mapping with the configured names).
    """
    names = config or GatewayConfig()

    def get(name: str) -> str:
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
        return value or ""

    timestamp = get(names.timestamp_header)
    signature = get(names.signature_header)
    if not timestamp.isdigit() or not signature:
        return False
    current = now if now is not None else time.time()
    if abs(current - int(timestamp)) > max_age:
        return False
    text = _signed_text(
        timestamp,
        get(names.connection_header),
        get(names.subject_header),
        get(names.scopes_header),
        get(names.token_id_header),
        get(names.client_header),
    )
    expected = hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
