"""The engines the standalone server runs on, picked by name (``engine`` in the config).

Every engine has the same small surface: ``start_server(host, ssl_context)`` binds the
configured address and returns a :class:`Server`; each admitted connection gets a
:class:`~wsguard.session.Session` and a :class:`~wsguard.session.Transport` of the
engine's own, so the policy, the timers and the close codes are the same on all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import ssl

    from wsguard.session import Host

#: accepted connections the kernel keeps waiting for the server, on every engine (the
#: kernel lowers it to net.core.somaxconn; asyncio's default, 100, overflows in a
#: reconnect storm and the clients' SYNs are dropped and retried seconds later)
LISTEN_BACKLOG = 1024

#: engine name -> the module that implements it (imported only when used)
ENGINES: dict[str, str] = {
    "picows": "wsguard.engines.picows",
    "websockets": "wsguard.engines.websockets_impl",
}


class Server(Protocol):
    """A listening engine, as the host drives it."""

    @property
    def sockets(self) -> tuple[Any, ...]: ...

    def close(self, *, close_connections: bool = True, code: int = 1001, reason: str = "") -> None:
        """Stop accepting; close every connection with *code*."""

    async def wait_closed(self) -> None:
        """Wait until every connection has ended."""


async def start_server(name: str, host: Host, ssl_context: ssl.SSLContext | None) -> Server:
    """Start the engine called *name* for *host* (already serving when this returns)."""
    try:
        module = importlib.import_module(ENGINES[name])
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    server: Server = await module.start_server(host, ssl_context)
    return server
