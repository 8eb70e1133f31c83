"""Frames wsguard writes itself, and the close codes a client may send."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from picows import (
    WSCloseCode,
)

if TYPE_CHECKING:
    pass


CLOSE_OP = 0x88  # the first byte of a close frame (FIN, opcode 8, no reserved bit)
logger = logging.getLogger("wsguard.server")


def server_frame(first: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented server frame (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def as_close_code(code: int) -> WSCloseCode:
    """picows types close codes as its enum; it sends any valid int (4001, say) as is."""
    return code  # type: ignore[return-value]
