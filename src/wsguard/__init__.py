"""wsguard: a security layer for WebSocket services.

One policy (authentication, origin, client address, limits, message
validation) enforced the same way by every adapter.

Top-level names are imported lazily so that ``import wsguard.core`` stays free
of event loops, servers and network libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wsguard.errors import ConfigError, KeyLoadError, ListenError, StoreError, WsguardError

if TYPE_CHECKING:
    from wsguard.config import Config, load_config
    from wsguard.guard import Guard
    from wsguard.hosts import App, Connection, demo_app

__version__ = "0.1.0"

_LAZY = {
    "App": "wsguard.hosts",
    "Connection": "wsguard.hosts",
    "demo_app": "wsguard.hosts",
    "Config": "wsguard.config",
    "load_config": "wsguard.config",
    "Guard": "wsguard.guard",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsguard' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "App",
    "Config",
    "ConfigError",
    "Connection",
    "Guard",
    "KeyLoadError",
    "ListenError",
    "StoreError",
    "WsguardError",
    "__version__",
    "demo_app",
    "load_config",
]
