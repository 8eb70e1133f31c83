"""wsguard: a security layer for WebSocket services.

One policy (authentication, origin, client address, limits, message
validation) enforced the same way by every adapter.
"""

from __future__ import annotations

from wsguard.config import Config, load_config
from wsguard.errors import ConfigError, KeyLoadError, StoreError, WsguardError
from wsguard.guard import Guard
from wsguard.server import App, Connection, demo_app

__version__ = "0.1.0"

__all__ = [
    "App",
    "Config",
    "ConfigError",
    "Connection",
    "Guard",
    "KeyLoadError",
    "StoreError",
    "WsguardError",
    "__version__",
    "demo_app",
    "load_config",
]
