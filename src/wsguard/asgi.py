"""``from wsguard.asgi import WsGuardMiddleware``: the policy in front of any ASGI 3 app."""

from __future__ import annotations

from wsguard.hosts.asgi import WsGuardMiddleware, WsGuardUser

__all__ = ["WsGuardMiddleware", "WsGuardUser"]
