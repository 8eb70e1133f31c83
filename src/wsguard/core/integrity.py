"""Signed messages: an HMAC-SHA256 envelope with nonce and timestamp.

A signed message carries, next to its own fields:

* ``kid``   the signing key's id (``"session"`` for the per-connection key);
* ``nonce`` random, 16 to ``max_nonce_bytes`` characters of base64url (>= 96 bits);
* ``ts``    Unix time in seconds (integer);
* ``sig``   base64url (no padding) of HMAC-SHA256(key, canonical(message without sig)).

The canonical form is the JSON Canonicalization Scheme (RFC 8785) restricted to
what every language serializes identically: objects with keys sorted by their
UTF-16 code units, no insignificant whitespace, strings escaped as JSON.stringify
does (``\\b \\t \\n \\f \\r \\" \\\\``, other controls as lower-case ``\\u00xx``, everything
else as UTF-8), integers in [-(2**53-1), 2**53-1], true, false, null. Floats are
not allowed in signed messages (their text form differs between languages).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

SESSION_KID = "session"
ENVELOPE_FIELDS = ("kid", "nonce", "ts", "sig")
_MAX_SAFE = 2**53 - 1
_NONCE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_MIN_NONCE = 16  # 16 base64url characters = 96 bits


class CanonicalError(ValueError):
    """The message holds a value that has no canonical form (e.g. a float)."""


def _string(text: str) -> bytes:
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:  # lone surrogates have no UTF-8 form
        raise CanonicalError("strings must be valid Unicode") from None


def _utf16(key: str) -> bytes:
    try:
        return key.encode("utf-16-be")
    except UnicodeEncodeError:
        raise CanonicalError("strings must be valid Unicode") from None


def _write(value: Any, out: list[bytes]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None or isinstance(value, bool):
        out.append(b"null" if value is None else (b"true" if value else b"false"))
    elif isinstance(value, int):
        if not -_MAX_SAFE <= value <= _MAX_SAFE:
            raise CanonicalError("integer out of the interoperable range")
        out.append(str(value).encode())
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise CanonicalError("object keys must be strings")
        out.append(b"{")
        keys = list(value)
        if all(key.isascii() for key in keys):
            keys.sort()  # code point order equals UTF-16 order for ASCII
        else:
            keys.sort(key=_utf16)
        for i, key in enumerate(keys):
            if i:
                out.append(b",")
            out.append(_string(key))
            out.append(b":")
            _write(value[key], out)
        out.append(b"}")
    elif isinstance(value, list):
        out.append(b"[")
        for i, item in enumerate(value):
            if i:
                out.append(b",")
            _write(item, out)
        out.append(b"]")
    else:
        raise CanonicalError(f"{type(value).__name__} values cannot be signed")


def _plain(value: Any) -> bool:
    """True when orjson's sorted output is already the canonical form: only
    interoperable values, and no key character at or above U+E000 (below it,
    code point order and UTF-16 order agree)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or (not key.isascii() and max(key) >= "\ue000"):
                return False
            if not _plain(item):
                return False
        return True
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    return isinstance(value, int) and -_MAX_SAFE <= value <= _MAX_SAFE


def canonical(message: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: *message* without ``sig``, canonicalized."""
    body = {k: v for k, v in message.items() if k != "sig"}
    if _plain(body):
        try:
            return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: the general path raises CanonicalError
    out: list[bytes] = []
    _write(body, out)
    return b"".join(out)


def signature(secret: bytes, message: Mapping[str, Any]) -> str:
    digest = hmac.new(secret, canonical(message), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(
    message: Mapping[str, Any], *, kid: str, secret: bytes, nonce: str, ts: int
) -> dict[str, Any]:
    """A copy of *message* with the envelope fields added and signed."""
    signed = {**message, "kid": kid, "nonce": nonce, "ts": ts}
    signed["sig"] = signature(secret, signed)
    return signed


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    subject: str
    secret: bytes = b""


@dataclass(frozen=True, slots=True)
class Verified:
    """The signature and timestamp hold (a signed type), or the nonce and timestamp are
    well formed and the timestamp is within the type's replay window (an unsigned type
    with ``replay``); the nonce must still be unseen.

    The store records ``nonce_key`` until ``timestamp + window`` on its own clock (and
    checks the window again on it), so nodes with skewed clocks agree on what is a
    replay: a nonce is remembered exactly as long as any node could accept it.
    """

    nonce_key: str
    timestamp: float
    window: float


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def decode_secret(text: str) -> bytes:
    """A signing secret written as base64url (padding optional): its bytes; ValueError
    for any character outside that alphabet (a lenient decoder drops them, and so reads
    another key than the one written)."""
    if _BASE64URL.fullmatch(text) is None:  # '+' and '/' too: base64's, not base64url's
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error included: a length no encoding gives
        raise ValueError("not base64url") from None


def nonce_key(subject: str, kid: str, nonce: str) -> str:
    """The store key of a nonce: its parts percent-encoded (a subject may hold ``:``)."""
    return f"nonce:{quote(subject, safe='')}:{quote(kid, safe='')}:{quote(nonce, safe='')}"


def replay_key(subject: str, message_type: str, nonce: str) -> str:
    """The store key of an unsigned message's nonce, per subject and message type: its
    parts percent-encoded, and apart from every signed nonce (:func:`nonce_key`)."""
    parts = (quote(part, safe="") for part in (subject, message_type, nonce))
    return "replay:" + ":".join(parts)


class SignatureVerifier:
    """Checks envelopes against configured per-client keys or the connection's session key."""

    __slots__ = ("_clock", "_keys", "_max_nonce", "_window")

    def __init__(
        self,
        keys: Mapping[str, SigningKey],
        *,
        window: float,
        max_nonce: int,
        clock: Callable[[], float],
    ) -> None:
        self._keys = dict(keys)
        self._window = window
        self._max_nonce = max_nonce
        self._clock = clock

    def replace_keys(self, keys: Mapping[str, SigningKey]) -> None:
        """Verify with *keys* from now on (a reload: a key removed verifies nothing more)."""
        self._keys = dict(keys)

    def check(
        self, message: Mapping[str, Any], subject: str, session_key: bytes | None
    ) -> Verified | str:
        """Verified, or the stable error code (``bad_signature`` / ``stale``)."""
        kid, nonce, ts, sig = (message.get(f) for f in ENVELOPE_FIELDS)
        if not isinstance(kid, str) or not isinstance(sig, str) or len(sig) > 128:
            return "bad_signature"
        if (
            not isinstance(nonce, str)
            or not _MIN_NONCE <= len(nonce) <= self._max_nonce
            or not set(nonce) <= _NONCE_CHARS
            or not isinstance(ts, int)
            or isinstance(ts, bool)
        ):
            return "bad_signature"
        if kid == SESSION_KID:
            secret = session_key
        else:
            key = self._keys.get(kid)
            secret = key.secret if key is not None and key.subject == subject else None
        if secret is None:
            return "bad_signature"
        try:
            expected = signature(secret, message)
        except CanonicalError:
            return "bad_signature"
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            return "bad_signature"
        if abs(self._clock() - ts) > self._window:
            return "stale"
        return Verified(nonce_key=nonce_key(subject, kid, nonce), timestamp=ts, window=self._window)
