"""The handshake request as the policy core sees it: no sockets, just values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from wsguard.core.headers import Headers

#: A compact JWS as it appears in a URL: a base64url JSON header (``{"`` encodes as
#: ``eyJ``), a payload and a signature.
_JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """An HTTP upgrade request: peer address, request target, headers, TLS facts."""

    peer: str
    target: str
    headers: Headers
    tls: bool = False
    method: str = "GET"
    client_cert: str | None = None
    """Identity named by a verified TLS client certificate (mTLS): None without a
    certificate, ``""`` for a certificate that names no usable identity (refused)."""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def query_values(self, name: str) -> list[str]:
        query = urlsplit(self.target).query
        return [v for k, v in parse_qsl(query, keep_blank_values=True) if k == name]

    def redacted_target(self, secret_params: frozenset[str]) -> str:
        """The target for logs: the values of *secret_params* replaced, and anything
        shaped like a JWT anywhere in it too (a token sent under another parameter
        name, after another separator, or in the path is still a live credential)."""
        target = self.target
        parts = urlsplit(target)
        if parts.query and secret_params:
            pairs = []
            for chunk in parts.query.split("&"):
                name = unquote_plus(chunk.split("=", 1)[0])
                pairs.append(f"{name}=REDACTED" if name in secret_params else chunk)
            target = parts.path + "?" + "&".join(pairs)
        return _JWT_SHAPED.sub("REDACTED", target) if "eyJ" in target else target
