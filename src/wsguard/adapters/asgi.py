"""Compatibility alias of :mod:`wsguard.asgi` (import ``WsGuardMiddleware`` from there)."""

from __future__ import annotations

from wsguard.hosts.asgi import WsGuardMiddleware, WsGuardUser

__all__ = ["WsGuardMiddleware", "WsGuardUser"]
