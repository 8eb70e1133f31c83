"""Validation of store URIs (``memory://``, ``redis://``, ``rediss://``)."""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("memory", "redis", "rediss")


def check_store_uri(uri: str) -> str:
    """Return *uri* if it names a usable store, else raise ValueError saying why."""
    if uri == "memory://":
        return uri
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid store URI: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            "expected memory://, redis://host:port/db or rediss://host:port/db "
            f"(got scheme {parts.scheme or 'none'!r})"
        )
    if not parts.hostname:
        raise ValueError("a redis:// store URI needs a host, e.g. redis://127.0.0.1:6379/0")
    if port == 0:
        raise ValueError("the redis port must be 1-65535")
    db = parts.path.lstrip("/")
    if db and not (db.isdigit() and int(db) < 16384):
        raise ValueError(f"the database after the host must be a number (got {db!r})")
    if parts.fragment:
        raise ValueError("a store URI has no #fragment")
    return uri


def redacted(uri: str) -> str:
    """The URI without its password, for logs and messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
