"""The hosts: what plugs into a connection's Session and decides what its messages are for.

- :class:`~wsguard.hosts.app.App`: your handlers (and the demo protocol), on an engine;
- :class:`~wsguard.hosts.gateway.proxy.Gateway`: ``wsguard proxy``, forwarding upstream;
- :class:`~wsguard.hosts.asgi.WsGuardMiddleware`: any ASGI 3 application.

Each implements :class:`wsguard.session.Host` (welcome, deliver, opened, refreshed,
closed) and nothing else of the connection's life.
"""

from __future__ import annotations

from wsguard.hosts.app import App
from wsguard.hosts.demo import demo_app, install_demo
from wsguard.session import Connection

__all__ = ["App", "Connection", "demo_app", "install_demo"]
