"""The process' open-file limit: raised to what the system allows at start, and a
warning when ``limits.max_connections`` cannot fit in it.

Every connection is a file descriptor. The soft limit (``ulimit -n``) is often 1,024
while the hard limit, which an unprivileged process may raise its soft limit up to, is
much higher: a server raises it itself, as Go programs and nginx's
``worker_rlimit_nofile`` do. Beyond the hard limit only the operator can help
(``ulimit -Hn``, systemd's ``LimitNOFILE``), hence the warning.
"""

from __future__ import annotations

import contextlib

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

#: Descriptors the server keeps besides its connections (listeners, the loop's epoll and
#: wakeup pipes, the audit file, store and JWKS connections, handshakes under way).
OWN_FILES = 100


def raise_open_files() -> int | None:
    """Raise the soft open-file limit to the hard one (or, when the hard one is
    unlimited, as far as the kernel lets a process go). The soft limit in force
    afterwards; None where there is no such limit (Windows)."""
    if resource is None:  # pragma: no cover - not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if target is not None and (soft == resource.RLIM_INFINITY or soft < target):
        # (refused e.g. on macOS, which caps the soft limit lower: it is kept as it is)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nr_open() -> int | None:
    """Linux's cap on a process' open files (fs.nr_open), when the hard limit is
    unlimited (the soft one cannot be)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def open_files_warning(max_connections: int, limit: int | None) -> str | None:
    """The warning to give when *max_connections* connections (and the server's own
    files) do not fit in the open-file *limit*; None when they do."""
    if limit is None or limit == getattr(resource, "RLIM_INFINITY", -1):
        return None
    room = max(limit - OWN_FILES, 0)
    if max_connections <= room:
        return None
    return (
        f"warning: limits.max_connections is {max_connections:,} but the open-file limit "
        f"({limit:,}) allows about {room:,} connections: raise it (ulimit -n in the shell "
        f"that starts wsguard, LimitNOFILE= in a systemd unit) or lower "
        f"limits.max_connections"
    )
