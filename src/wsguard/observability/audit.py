"""The security audit log: one JSON object per line.

Fields are set by wsguard, never by the client: client-supplied strings
(origin, path, close reasons) are truncated and JSON-escaped, so a newline or
control character can never forge a line. Tokens, cookies and message bodies
are never passed to this module.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from wsguard.errors import ConfigError

_MAX_FIELD = 256
_LINGER = 0.01  # seconds the writer thread waits after a batch (see AuditLog._drain)
#: DEL and C1 controls, the Unicode line separators (which some log tools treat as line
#: breaks), and every invisible format character (Unicode's Cf: bidirectional overrides
#: and isolates, zero-width characters, the soft hyphen, the BOM, tag characters) and the
#: combining grapheme joiner, which reorder, hide or smuggle text on screen: a field from
#: a client (a token id, a path) must not make a line read differently than it is
_UNSAFE = re.compile(
    "[\x7f-\x9f\xad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]"
)


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return value[:_MAX_FIELD] + "..."
    return value


_second: list[Any] = [0, ""]  # cache of the formatted current second


def _stamp(now: float) -> str:
    second = int(now)
    if second != _second[0]:
        stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0], _second[1] = second, stamp
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def _line(now: float, name: str, fields: MutableMapping[str, Any]) -> str:
    """One audit line: the time of the event, its name, then its fields (None left out,
    long strings clipped), as one line of JSON (no control, line-breaking or invisible
    format character unescaped)."""
    clean: dict[str, Any] = {"time": _stamp(now), "event": name}
    for key, value in fields.items():
        if value is not None:
            clean[key] = _clip(value)
    line = orjson.dumps(clean).decode()
    if line.isascii() and "\x7f" not in line:
        return line
    # orjson escapes U+0000-U+001F; also escape what _UNSAFE names. They only occur
    # inside JSON strings, where \uXXXX is an exact equivalent.
    return _UNSAFE.sub(_escape, line)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code > 0xFFFF:  # JSON escapes it as its UTF-16 surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


_Event = tuple[float, str, dict[str, Any]]


class AuditLog:
    """Writes audit events, one JSON object per line; never blocks, never raises.

    With ``background=True`` (what :meth:`open` uses for stdout and files) events go
    through a bounded queue to a writer thread, which renders them (JSON, one line
    each) and writes them in batches: the event loop only stamps the time and queues
    the fields, so a slow disk or a pipe nobody reads can never stall it. When the
    queue is full, events are dropped and counted, and an ``audit_lines_dropped``
    event reports how many. Without it (an in-memory stream, as in tests) lines are
    rendered and written at once.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        enabled: bool = True,
        background: bool = False,
        queue_size: int = 10_000,
    ) -> None:
        self.enabled = enabled
        self.dropped = 0
        self.write_errors = 0
        self._stream = stream if stream is not None else sys.stdout
        self._queue: queue.SimpleQueue[_Event | None] | None = None
        self._queue_size = queue_size
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()  # C put(); the bound is checked in emit
            self._thread = threading.Thread(target=self._drain, name="wsguard-audit", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, target: str, *, enabled: bool = True) -> AuditLog:
        """``-`` is standard output; anything else is a file opened for append (one that
        cannot be is a configuration error naming ``audit.file``), created readable by its
        owner only (it names clients, subjects and token ids); an existing file keeps
        its mode."""
        if target == "-":
            return cls(sys.stdout, enabled=enabled, background=True)
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(Path(target).expanduser(), flags, 0o600)
            stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise ConfigError("audit.file", f"cannot open {target}: {exc.strerror}") from None
        return cls(stream, enabled=enabled, background=True)

    @staticmethod
    def check_target(target: str) -> None:
        """Raise ConfigError (``audit.file``) unless :meth:`open` could open *target* for
        append; nothing is created."""
        if target == "-":
            return
        path = Path(target).expanduser()
        if path.is_dir():
            raise ConfigError("audit.file", f"cannot open {target}: is a directory")
        if path.exists():
            if not os.access(path, os.W_OK):
                raise ConfigError("audit.file", f"cannot open {target}: permission denied")
            return
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError("audit.file", f"cannot open {target}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("audit.file", f"cannot create {target}: permission denied")

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        pending = self._queue
        if pending is None:
            try:
                line = _line(time.time(), event, fields)
            except Exception:  # an audit failure must never break a handshake
                self.write_errors += 1
                return
            self._write(line)
        elif pending.qsize() >= self._queue_size:
            self.dropped += 1
        else:
            pending.put((time.time(), event, fields))

    def _write(self, line: str) -> bool:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            self.write_errors += 1
            return False
        return True

    def _render_batch(self, batch: list[_Event | None]) -> list[str]:
        lines = []
        for item in batch:
            if item is not None:
                try:
                    lines.append(_line(*item))
                except Exception:  # a field that cannot be rendered: counted, not fatal
                    self.write_errors += 1
        return lines

    def _drain(self) -> None:
        """Render and write what is queued, many lines per write.

        After each batch the writer lingers (``_LINGER`` seconds) before it waits
        on the queue again, so under a flood of events it wakes at most ~100 times
        a second instead of once per line (each wake-up takes the GIL from the
        event loop). A lone event is still written at once; lines wait at most
        ``_LINGER`` seconds more under load.
        """
        assert self._queue is not None
        get, get_nowait, empty = self._queue.get, self._queue.get_nowait, queue.Empty
        reported = 0
        first = True
        while True:
            if not first:
                time.sleep(_LINGER)
            first = False
            batch = [get()]
            try:
                while len(batch) < self._queue_size:
                    batch.append(get_nowait())
            except empty:
                pass
            stop = None in batch
            lines = self._render_batch(batch)
            dropped = self.dropped
            if dropped != reported:
                count = dropped - reported
                lines.append(_line(time.time(), "audit_lines_dropped", {"count": count}))
            if lines and not self._write("\n".join(lines)) and len(lines) > 1:
                # the batch failed (disk full, an unencodable character...): save what
                # can be saved, one line at a time, each failure counted
                self.write_errors -= 1
                ok = [self._write(line) for line in lines]
                if dropped != reported and not ok[-1]:
                    dropped = reported  # the drop report did not make it: report it later
            reported = dropped
            if stop:
                return

    def close(self) -> None:
        """Flush queued lines (bounded wait) and close a file target."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
        if self._stream not in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):
                self._stream.close()
