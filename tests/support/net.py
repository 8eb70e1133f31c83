"""Loopback networking helpers."""

from __future__ import annotations

import itertools
import os
import socket

#: The proxy settings httpx and the CLI would take from the environment.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

# Ports handed out by free_port: a range of this test worker's own, below the kernel's
# ephemeral ports (32768 and up on Linux). A port the kernel picked for bind(0) is free
# again once released, and another worker's bind(0) (or a server of its own on port 0)
# may take it before this worker's redis-server or Sentinel binds it: a server that
# then fails to start while another answers on its port. Here no other worker hands out
# the same port, and no socket bound to port 0 is given one.
_RANGE = 1500
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_BASE = 20000 + (int(_WORKER) % 8 if _WORKER.isdigit() else 0) * _RANGE
_NEXT = itertools.count()


def free_port() -> int:
    """A loopback port nothing listens on, from this worker's own range (see above)."""
    for _ in range(_RANGE):
        port = _BASE + next(_NEXT) % _RANGE
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is exhausted: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
