"""The standalone server: an App hosting handlers, and the demo protocol."""

from __future__ import annotations

from wsguard.server.app import App
from wsguard.server.demo import demo_app, install_demo
from wsguard.session import Connection

__all__ = ["App", "Connection", "demo_app", "install_demo"]
