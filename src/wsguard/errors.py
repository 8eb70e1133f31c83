"""The one exception hierarchy of wsguard.

Exceptions are for bugs and misconfiguration. Everything a *peer* can cause
(bad token, foreign origin, oversized message, ...) is a decision value, never
an exception escaping the policy core: see :mod:`wsguard.core.decisions`.

    WsguardError
    ├── ConfigError        invalid configuration (names the key)
    ├── KeyLoadError       a signing or verification key cannot be loaded
    ├── StoreError         the state store failed or is unreachable
    │   └── StoreUnavailable   (wsguard.stores) a check configured to fail closed cannot be made
    └── ListenError        a listener cannot bind its address (also an OSError)
"""

from __future__ import annotations


class WsguardError(Exception):
    """Root of every exception raised by wsguard itself."""


class ConfigError(WsguardError):
    """The configuration is invalid. ``key`` is the dotted name of the bad key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class KeyLoadError(ConfigError):
    """A key file named in the configuration cannot be read or parsed."""


class StoreError(WsguardError):
    """The state store failed (unreachable, bad URI, protocol error)."""


class ListenError(WsguardError, OSError):
    """A listener cannot bind: ``str(exc)`` is the one line wsguard prints, e.g.
    ``cannot listen on 127.0.0.1:8765: address already in use``; ``errno`` is the
    bind error's."""
