"""uvicorn's log, without the one error record every WebSocket denial makes it write."""

from __future__ import annotations

import logging


class _DenialIsNotAnError(logging.Filter):
    """uvicorn's sans-I/O WebSocket logs an error after every denial response (an HTTP
    refusal before the upgrade, which is how wsguard refuses); the refusal itself is
    in the audit log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def quiet_uvicorn_denial_errors() -> None:
    """Drop that one misleading record from uvicorn's error log (idempotent)."""
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DenialIsNotAnError) for f in target.filters):
        target.addFilter(_DenialIsNotAnError())
