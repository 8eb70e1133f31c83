"""What a server's engine leaves in reference cycles while a test drives it."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from websockets.exceptions import InvalidMessage

from wsguard.engines.picows.handshake import HandshakeProtocol
from wsguard.engines.websockets_impl import GuardedServerConnection


def _engine_object_of(guard: Any, *, raised: bool) -> Callable[[Any], bool]:
    def belongs(o: Any) -> bool:
        if isinstance(o, GuardedServerConnection):
            return o.guard is guard
        if isinstance(o, HandshakeProtocol):
            return o.server.guard is guard
        # what websockets' parser raises when a stream ends (in the garbage: this server's)
        return raised and isinstance(o, InvalidMessage)

    return belongs


def engine_objects_left(server: Any) -> int:
    """The engine connection objects of *server* still alive (after a collection)."""
    belongs = _engine_object_of(server.app.guard, raised=False)

    def count() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if belongs(o))

    return int(server.call(count))


def engine_garbage(server: Any, drive: Callable[[], None]) -> list[str]:
    """The type names of *server*'s engine objects that *drive* left in reference cycles
    (found with ``gc.DEBUG_SAVEALL``; everything else the process collected meanwhile,
    the test's own client included, is ignored)."""
    belongs = _engine_object_of(server.app.guard, raised=True)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        drive()
        gc.collect()
        return [type(o).__qualname__ for o in gc.garbage if belongs(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
