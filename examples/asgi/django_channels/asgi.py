"""ASGI entry point: Django Channels behind wsguard's ``WsGuardMiddleware``.

Run (from the repository root)::

    WSGUARD_JWT_SECRET=... uvicorn --app-dir examples/asgi \\
        django_channels.asgi:application --ws-max-size 8192 --ws-per-message-deflate false

``DJANGO_SETTINGS_MODULE`` defaults to ``django_channels.settings``; wsguard reads
its configuration from ``WSGUARD_*`` variables (``load_config()``). Then connect to
``ws://127.0.0.1:8000/ws/echo/`` with ``Authorization: Bearer <JWT>`` (or the
``token.<JWT>`` subprotocol); ``GET /health/`` is plain Django.
``--ws-max-size`` = ``limits.max_message_bytes``, so the server refuses oversized
frames before buffering them; no compression, as ``compression = false`` says.

wsguard sets ``scope["user"]`` (a ``WsGuardUser``) and ``scope["state"]["wsguard"]``
and removes the credential from the scope. Do **not** wrap the WebSocket router in
Channels' ``AuthMiddlewareStack``: it would replace ``scope["user"]`` with Django's
session user (and needs ``django.contrib.auth`` and a database).

Channels' router does not speak the ASGI lifespan protocol; the middleware answers
it itself, starting the Guard at server start and closing it at shutdown.
"""

from __future__ import annotations

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_channels.settings")
django_http = get_asgi_application()  # sets Django up before the consumers are imported

from django_channels.routing import websocket_urlpatterns  # noqa: E402
from wsguard import load_config  # noqa: E402
from wsguard.asgi import WsGuardMiddleware  # noqa: E402


def build_router() -> ProtocolTypeRouter:
    """The Channels application wsguard wraps (tests wrap it with their own Guard)."""
    return ProtocolTypeRouter(
        {
            "http": django_http,
            "websocket": URLRouter(websocket_urlpatterns),
        }
    )


application = WsGuardMiddleware(build_router(), config=load_config())
