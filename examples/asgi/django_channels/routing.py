"""WebSocket URL routes of the example."""

from __future__ import annotations

from django.urls import path

from django_channels.consumers import EchoConsumer

websocket_urlpatterns = [path("ws/echo/", EchoConsumer.as_asgi())]
