"""Django settings of the wsguard + Channels example: the smallest that runs.

No database: wsguard authenticates the WebSocket (the JWT), so neither
``django.contrib.auth`` nor sessions are needed. ``DJANGO_SECRET_KEY`` should be
set outside development.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-wsguard-channels-example")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")

INSTALLED_APPS = ["channels"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_channels.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

ASGI_APPLICATION = "django_channels.asgi.application"
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
