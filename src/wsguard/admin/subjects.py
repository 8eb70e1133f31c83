"""Admin client certificate subjects (``admin.client_subjects``).

With mTLS every certificate the admin CA signed passes the TLS handshake; the pins
say which of them are admins. A pin is a distinguished name in the RFC 4514 string
form, ``CN=ops`` or ``CN=ops,O=Example Corp`` (``\\,`` and ``\\2C`` escape a comma).
A certificate matches a pin when, for every attribute type the pin names, the
certificate's subject holds exactly the pin's values of that type; attribute types
the pin does not name are not compared, and the order does not matter.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from typing import Any

#: A subject: (attribute type, value) pairs, sorted, types in their short upper-case form.
Subject = tuple[tuple[str, str], ...]

#: The ASGI scope key under which the admin listener passes the verified client
#: certificate's subject (absent on plain HTTP; None on TLS without a certificate).
SCOPE_KEY = "wsguard.admin.client_subject"

#: Python's (OpenSSL's long) attribute names and their RFC 4514 / common short forms.
_LONG_TO_SHORT = {
    "commonname": "CN",
    "organizationname": "O",
    "organizationalunitname": "OU",
    "countryname": "C",
    "stateorprovincename": "ST",
    "localityname": "L",
    "streetaddress": "STREET",
    "domaincomponent": "DC",
    "userid": "UID",
    "emailaddress": "EMAILADDRESS",
    "serialnumber": "SERIALNUMBER",
    "title": "TITLE",
    "surname": "SN",
    "givenname": "GIVENNAME",
}
_ALIASES = {"E": "EMAILADDRESS", "EMAIL": "EMAILADDRESS", "S": "ST", "GN": "GIVENNAME"}
KNOWN_TYPES = frozenset(_LONG_TO_SHORT.values())
_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_SPECIAL = ',+"\\<>;=#'


def attribute_type(name: str) -> str:
    """The short upper-case form of an attribute type (``commonName`` -> ``CN``)."""
    upper = name.strip().upper()
    return _ALIASES.get(upper) or _LONG_TO_SHORT.get(name.strip().lower()) or upper


def parse_subject(text: str) -> Subject:
    """Parse a pin (``CN=ops,O=Example``); ValueError naming what is wrong."""
    pairs: list[tuple[str, str]] = []
    for part in _split(text):
        name, sep, raw = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{text!r}: each part must be attribute=value (e.g. CN=ops)")
        kind = attribute_type(name)
        if kind not in KNOWN_TYPES:
            known = ", ".join(sorted(KNOWN_TYPES))
            raise ValueError(f"{text!r}: unknown attribute {name.strip()!r} (known: {known})")
        value = _unescape(raw.strip(), text)
        if not value:
            raise ValueError(f"{text!r}: the value of {kind} is empty")
        pairs.append((kind, value))
    if not pairs:
        raise ValueError("a subject must not be empty")
    return tuple(sorted(pairs))


def certificate_subject(peer_cert: dict[str, Any] | None) -> Subject | None:
    """The subject of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not peer_cert:
        return None
    pairs = [
        (attribute_type(str(name)), str(value))
        for rdn in peer_cert.get("subject", ())
        for name, value in rdn
    ]
    return tuple(sorted(pairs))


def matches(pin: Subject, subject: Subject) -> bool:
    """Whether *subject* holds exactly the pin's values of every type the pin names."""
    wanted = _by_type(pin)
    have = _by_type(subject)
    return all(have.get(kind) == values for kind, values in wanted.items())


def pinned(pins: Iterable[Subject], subject: Subject | None) -> bool:
    return subject is not None and any(matches(pin, subject) for pin in pins)


def rfc4514(subject: Subject) -> str:
    """A subject as text (for the audit log), values escaped as RFC 4514 says."""
    return ",".join(f"{kind}={_escape(value)}" for kind, value in subject)


def _by_type(subject: Subject) -> dict[str, collections.Counter[str]]:
    out: dict[str, collections.Counter[str]] = {}
    for kind, value in subject:
        out.setdefault(kind, collections.Counter())[value] += 1
    return out


def _split(text: str) -> list[str]:
    """Split on unescaped ``,`` and ``+`` (a multi-valued RDN counts as its parts)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char in ",+":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts if any(p.strip() for p in parts) else []


def _unescape(raw: str, text: str) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if _HEX.fullmatch(pair):
            out.append(int(pair, 16))
            i += 3
        elif i + 1 < len(raw):
            out += raw[i + 1].encode()
            i += 2
        else:
            raise ValueError(f"{text!r}: a value ends with a lone backslash")
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{text!r}: an escaped value is not UTF-8") from None


def _escape(value: str) -> str:
    escaped = "".join(f"\\{c}" if c in _SPECIAL else c for c in value)
    if escaped.startswith(" "):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped
