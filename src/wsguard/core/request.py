"""The handshake request as the policy core sees it: no sockets, just values."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from wsguard.core.headers import Headers

#: Three dot-separated runs of base64 (either alphabet but "/", the path's separator;
#: padded or not): a compact JWS when the first decodes to a JSON object (_header_like).
_SEGMENT = r"[A-Za-z0-9_+-]*={0,2}"
_DOTTED = re.compile(rf"(?<![A-Za-z0-9_+-])[A-Za-z0-9_+-]{{4}}{_SEGMENT}\.{_SEGMENT}\.{_SEGMENT}")


#: The usual compact JWS (a ``{"`` header encodes as ``eyJ``): found wherever it starts,
#: glued to a prefix too (``Bearer+eyJ...``, ``v1-eyJ...``).
_EYJ = re.compile(r"eyJ[A-Za-z0-9_+-]*={0,2}\.[A-Za-z0-9_+-]*={0,2}\.[A-Za-z0-9_+-]*={0,2}")


def _header_like(segment: str) -> bool:
    """Whether *segment* decodes (as a verifier would, padding or not) to a JSON object's
    start: ``{`` then ``"``, whitespace allowed between."""
    text = segment.rstrip("=").replace("+", "-").replace("/", "_")
    text += "=" * (-len(text) % 4)
    try:
        head = base64.urlsafe_b64decode(text[:16])
    except (binascii.Error, ValueError):
        return False
    head = head.lstrip(b" \t\r\n")
    return head.startswith(b"{") and head[1:].lstrip(b" \t\r\n").startswith(b'"')


def _redact_jwts(text: str) -> str:
    text = _EYJ.sub("REDACTED", text) if "eyJ" in text else text
    return _DOTTED.sub(
        lambda match: "REDACTED" if _header_like(match.group().split(".", 1)[0]) else match.group(),
        text,
    )


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
    local: str | None = None
    """The address the connection came in on, when the host cannot vouch that it is
    loopback (the ASGI middleware: the ASGI server's bind is unknown to it); None: the
    host bound it itself (checked at start)."""

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
        if "." not in target and "%2" not in target.upper():
            return target  # no dot, not even encoded: no JWT
        redacted = _redact_jwts(target)
        # a token percent-encoded (a dot as %2E, a letter as %65...) is one all the same:
        # then the decoded target is what is logged, with it redacted
        decoded = unquote(redacted)
        if decoded != redacted:
            cleaned = _redact_jwts(decoded)
            if cleaned != decoded:
                return cleaned
        return redacted
