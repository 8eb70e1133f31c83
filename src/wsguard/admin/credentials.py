"""The admin credential: a token of its own (never a user's JWT), or mTLS.

The token comes from ``admin.token`` (``WSGUARD_ADMIN_TOKEN``) or
``admin.token_file``. With neither (and no mTLS), an admin listener on a
loopback address creates a random token on first use in
``~/.local/share/wsguard/admin.token`` (mode 0600) and reuses it, the way the
development JWT key works; on any other address a credential is required.

With mTLS (``admin.tls.client_ca_file``) the credential is a client certificate
from the admin CA; ``admin.client_subjects`` narrows it to pinned subjects.

Wrong credentials are throttled per address (an IPv6 /64): after
``FAILURES_ALLOWED`` in ``FAILURE_WINDOW`` seconds further wrong ones get 429. The
right credential is checked first and never refused by that throttle, so nobody
can lock the operator out by sending wrong tokens from the operator's address.

The browser dashboard logs in once with the token and then holds a session
cookie (random, ``HttpOnly``, ``SameSite=Strict``; on an HTTPS listener
``__Host-`` prefixed and ``Secure``); the server keeps only a digest of it. The
cookie is accepted by the dashboard and its WebSocket only, never by the JSON
API, so a page on another site cannot ride on it. Browsers send a host's cookies
to every port of it, so the cookie is named after the listener's port (two
listeners on one host do not log each other out) and a session is good only from
the address that logged in (an IPv6 /64): another service on the same host that
receives the cookie cannot use it from where it runs.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from wsguard.admin.subjects import Subject, pinned
from wsguard.config.model import AdminConfig
from wsguard.errors import KeyLoadError

DEFAULT_TOKEN_FILE = Path("~/.local/share/wsguard/admin.token")
SESSION_COOKIE = "wsguard_admin_session"
#: The cookie's name on an HTTPS listener: the browser then keeps it to this very
#: host, Secure and Path=/ (no sibling host or plain-HTTP page can set or shadow it).
SECURE_SESSION_COOKIE = "__Host-" + SESSION_COOKIE
MAX_SESSIONS = 1000
FAILURES_ALLOWED = 10  # bad admin credentials per address per FAILURE_WINDOW
FAILURE_WINDOW = 60.0
_MAX_TRACKED = 10_000


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _read_token_file(path: Path, key: str) -> str:
    try:
        info = path.stat()
        data = path.read_text().strip()
    except OSError as exc:
        raise KeyLoadError(key, f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyLoadError(key, f"{path} must be readable by its owner only (chmod 600)")
    if len(data) < 24:
        raise KeyLoadError(key, f"{path} holds fewer than 24 characters")
    return data


def load_admin_token(config: AdminConfig, *, loopback: bool) -> tuple[str | None, Path | None]:
    """The admin token and, when it was generated, the file it lives in.

    ``(None, None)`` when mTLS is the only credential.
    """
    if config.token:
        return config.token, None
    if config.token_file is not None:
        return _read_token_file(config.token_file.expanduser(), "admin.token_file"), None
    if config.tls.client_ca_file is not None:
        return None, None
    if not loopback:
        raise KeyLoadError(
            "admin.token",
            "the admin listener is not on loopback: set WSGUARD_ADMIN_TOKEN, "
            "admin.token_file or admin.tls.client_ca_file (mTLS)",
        )
    path = DEFAULT_TOKEN_FILE.expanduser()
    try:
        return _read_token_file(path, "admin.token_file"), path
    except KeyLoadError:
        if path.exists():
            raise
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created concurrently
        return _read_token_file(path, "admin.token_file"), path
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path


class AdminCredentials:
    """Checks the admin token and the dashboard's sessions."""

    def __init__(
        self,
        token: str | None,
        *,
        mtls: bool,
        session_seconds: float,
        address_key: Callable[[str], str] = str,
        https: bool = False,
        client_subjects: tuple[Subject, ...] = (),
    ) -> None:
        self._token = _digest(token) if token else None
        self._address_key = address_key
        self.mtls = mtls
        self.https = https
        self.cookie_name = SECURE_SESSION_COOKIE if https else SESSION_COOKIE
        self.client_subjects = client_subjects
        self._session_seconds = session_seconds
        # digest of the cookie -> (expiry (monotonic), the address key that logged in)
        self._sessions: dict[bytes, tuple[float, str]] = {}
        self._failures: dict[str, collections.deque[float]] = {}

    # -- guessing -------------------------------------------------------------------------

    def _key(self, address: str) -> str:
        try:
            return self._address_key(address)  # an IPv6 client counts per /64
        except ValueError:
            return address

    def blocked_for(self, address: str) -> float:
        """Seconds until *address* may try a credential again (0 when it may now)."""
        times = self._failures.get(self._key(address))
        if times is None or len(times) < FAILURES_ALLOWED:
            return 0.0
        return max(0.0, times[0] + FAILURE_WINDOW - time.monotonic())

    def failed(self, address: str) -> None:
        """Count a wrong credential presented from *address*."""
        key = self._key(address)
        times = self._failures.get(key)
        if times is None:
            if len(self._failures) >= _MAX_TRACKED:
                now = time.monotonic()
                recent = {a: t for a, t in self._failures.items() if t[-1] > now - FAILURE_WINDOW}
                # keep a tenth free, so the scan above is amortized O(1) per new address;
                # addresses locked out now are kept first (forgetting one would unlock it)
                keep = _MAX_TRACKED - _MAX_TRACKED // 10
                locked = [a for a, t in recent.items() if len(t) >= FAILURES_ALLOWED]
                others = [a for a, t in recent.items() if len(t) < FAILURES_ALLOWED]
                kept = others[-max(0, keep - len(locked)) :] if keep > len(locked) else []
                self._failures = {a: recent[a] for a in [*locked[-keep:], *kept]}
            times = self._failures[key] = collections.deque(maxlen=FAILURES_ALLOWED)
        times.append(time.monotonic())

    def token_ok(self, presented: str | None) -> bool:
        """Constant-time comparison with the admin token."""
        if self._token is None or not presented:
            return False
        return hmac.compare_digest(_digest(presented), self._token)

    def bearer_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def certificate_ok(self, subject: Subject | None) -> bool:
        """Whether a client certificate the admin CA verified is an admin's: any, unless
        ``admin.client_subjects`` pins subjects (then one of them)."""
        return not self.client_subjects or pinned(self.client_subjects, subject)

    # -- dashboard sessions ---------------------------------------------------------------

    def listening_on(self, port: int) -> None:
        """Name the session cookie after the listener's port: browsers keep one cookie per
        host and name, whatever the port."""
        base = SECURE_SESSION_COOKIE if self.https else SESSION_COOKIE
        self.cookie_name = f"{base}_{port}"

    def new_session(self, address: str) -> str:
        """A session for the dashboard, good from *address* (its IPv6 /64) only."""
        now = time.monotonic()
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
        value = secrets.token_urlsafe(32)
        self._sessions[_digest(value)] = (now + self._session_seconds, self._key(address))
        return value

    def session_ok(self, value: str | None, address: str) -> bool:
        if not value or len(value) > 128:
            return False
        digest = _digest(value)
        session = self._sessions.get(digest)
        if session is None:
            return False
        expiry, owner = session
        if expiry <= time.monotonic():
            del self._sessions[digest]
            return False
        return owner == self._key(address)

    def end_session(self, value: str | None) -> None:
        if value and len(value) <= 128:
            self._sessions.pop(_digest(value), None)

    @property
    def session_seconds(self) -> float:
        return self._session_seconds
