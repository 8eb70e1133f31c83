"""The security audit log: one JSON object per line.

Fields are set by wsguard, never by the client: client-supplied strings
(origin, path, close reasons) are truncated and JSON-escaped, so a newline or
control character can never forge a line. Tokens, cookies and message bodies
are never passed to this module.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import structlog

_MAX_FIELD = 256
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return value[:_MAX_FIELD] + "..."
    return value


def _render(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    clean: dict[str, Any] = {"time": now, "event": event.pop("event")}
    clean.update((k, _clip(v)) for k, v in event.items() if v is not None)
    line = orjson.dumps(clean).decode()
    # orjson escapes U+0000-U+001F; also escape DEL, C1 controls and the Unicode line
    # separators, which some log tools treat as line breaks. They only occur inside
    # JSON strings, where \uXXXX is an exact equivalent.
    return _UNSAFE.sub(_escape, line)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class AuditLog:
    """Writes audit events; thread-safe, line-buffered, one object per line."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()
        self._logger = structlog.wrap_logger(
            _LineWriter(self._stream, self._lock),
            processors=[_render],
        )

    @classmethod
    def open(cls, target: str, *, enabled: bool = True) -> AuditLog:
        """``-`` is standard output; anything else is a file opened for append."""
        if target == "-":
            return cls(sys.stdout, enabled=enabled)
        stream = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        return cls(stream, enabled=enabled)

    def emit(self, event: str, **fields: Any) -> None:
        if self.enabled:
            self._logger.msg(event, **fields)

    def close(self) -> None:
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()


class _LineWriter:
    """structlog logger that writes each rendered event as one line."""

    def __init__(self, stream: IO[str], lock: threading.Lock) -> None:
        self._stream = stream
        self._lock = lock

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            self._stream.flush()

    info = msg
