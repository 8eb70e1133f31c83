"""The demo protocol: the default handlers of ``wsguard serve``.

* ``ping`` -> ``{"type": "pong", "id": <same id>, "ts": <server time>}``
* ``chat``, ``data``, ``command``, and any other type the configuration adds -> delivered
  to every *other* connection as
  ``{"type": "broadcast", "from": <subject>, "message": <validated message>}``,
  re-serialized by the server (never the client's raw bytes).

Both handlers are plain functions: they never wait, so they run inline with no task.
"""

from __future__ import annotations

import time
from typing import Any

from wsguard.config.model import Config
from wsguard.hosts.app import App
from wsguard.session import Connection


def install_demo(app: App) -> App:
    """Register the demo handlers for the demo types present in the config."""
    types = app.config.messages.types

    if "ping" in types:

        @app.on("ping")
        def ping(conn: Connection, message: dict[str, Any]) -> None:
            conn.send({"type": "pong", "id": message.get("id"), "ts": time.time()})

    def relay(conn: Connection, message: dict[str, Any]) -> None:
        app.broadcast({"type": "broadcast", "from": conn.subject, "message": message}, exclude=conn)

    for name in types:  # the demo types, and those a configuration adds: relayed
        if name not in ("ping", "auth"):
            app.on(name)(relay)
    return app


def demo_app(config: Config | None = None) -> App:
    """An App running the demo protocol."""
    return install_demo(App(config))
