"""The loggers handed to the WebSocket libraries (websockets, picows)."""

from __future__ import annotations

import logging


def quiet_logger(name: str) -> logging.Logger:
    """The logger *name*, never below WARNING: the libraries' debug records carry raw
    request headers (bearer tokens, cookies) and frames, whatever the app's log level."""
    logger = logging.getLogger(name)
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    return logger
