"""An identity provider's signing keys: a JWKS fetched over HTTPS, checked, cached.

``auth.jwks_url`` names the JWKS document itself; ``auth.oidc_issuer`` names an OpenID
Connect issuer, whose discovery document (``<issuer>/.well-known/openid-configuration``)
must name exactly that ``issuer`` and gives the JWKS address (``jwks_uri``).

- TLS is always verified, against ``auth.jwks_ca_file`` or the system CAs; ``http://`` is
  accepted only on loopback (a provider run locally in development), for the configured
  URL and for a discovered ``jwks_uri`` alike; redirects are not followed. One refresh
  (discovery and JWKS) has :data:`FETCH_TIMEOUT` seconds, each response at most
  :data:`MAX_DOCUMENT_BYTES` bytes, uncompressed.
- Keys are used for ``auth.jwks_cache_seconds`` (a shorter ``Cache-Control: max-age``
  wins, but never below ``auth.jwks_min_refetch_seconds``) and refreshed in the
  background.
- A token whose ``kid`` is not among the keys asks for a refetch: at most one per
  ``auth.jwks_min_refetch_seconds`` however many such tokens arrive, and handshakes that
  arrive while a fetch is under way wait for that one fetch (bounded by its timeout).
- A refused document (malformed, oversized, no usable key) or an unreachable provider keeps
  the last good keys, for at most ``auth.jwks_max_stale_seconds`` after they were fetched;
  past that, tokens are refused (503 ``keys_unavailable``) and the log and the audit log
  say why (``jwks_keys_expired``).
- Only public signature keys usable with ``auth.algorithms`` are taken: RSA (at least 2048
  bits) for RS*/PS*, EC on the curve of ES256/ES384/ES512, OKP Ed25519/Ed448 for EdDSA, a
  declared ``alg`` among ``auth.algorithms``, ``use`` absent or ``sig``, ``key_ops`` (when
  present) with ``verify``. Never ``oct`` (HMAC) keys, never private key material.
- Keys are cached by (source, kid): a key from one source is never used for a token
  checked against another, even under the same ``kid``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from wsguard.config.keys import MIN_RSA_BITS, fitting_algorithms, short_rsa_bits, why_unusable
from wsguard.config.model import AuthConfig, check_key_url
from wsguard.core.auth import KeysUnavailable, UnknownKey
from wsguard.errors import KeyLoadError

logger = logging.getLogger("wsguard.auth")

#: The largest discovery or JWKS response read (bytes, as sent: compression is refused).
MAX_DOCUMENT_BYTES = 256 * 1024
#: Seconds one refresh (discovery and JWKS: connect, send, read) may take.
FETCH_TIMEOUT = 5.0
#: The most keys a JWKS may hold (providers publish a handful).
MAX_KEYS = 100
#: The smallest RSA key accepted.
DISCOVERY_PATH = "/.well-known/openid-configuration"


#: Where events go: ``(event, **fields)``, e.g. ``AuditLog.emit``.
EventSink = Callable[..., None]


class DocumentRefused(Exception):
    """A provider response that is not used. The message never quotes the response."""


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """One usable key of a JWKS."""

    key: Any
    algorithms: frozenset[str]
    fingerprint: str  # the JWK's public members, to notice a key replaced under its kid


def parse_jwks(
    body: bytes, algorithms: tuple[str, ...]
) -> tuple[dict[str, ProviderKey], list[str]]:
    """The usable keys of a JWKS document by ``kid``, and why the others were skipped.

    Raises :class:`DocumentRefused` for a malformed document or one without a usable key.
    A ``kid`` that two usable keys share is ambiguous: neither is used.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise DocumentRefused("the JWKS is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise DocumentRefused("the JWKS has no 'keys' array")
    if len(entries) > MAX_KEYS:
        raise DocumentRefused(f"the JWKS has more than {MAX_KEYS} keys")
    keys: dict[str, ProviderKey] = {}
    ambiguous: set[str] = set()
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DocumentRefused("a JWKS key is not an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256 or not kid.isprintable():
            skipped.append(f"key #{index}: no usable kid")
            continue
        why = why_unusable(entry, algorithms)
        if why is None:
            usable = fitting_algorithms(entry, algorithms)
            try:
                key = jwt.PyJWK(entry, algorithm=min(usable)).key
            except (jwt.PyJWTError, ValueError, TypeError):
                why = "not a valid JWK"
            else:
                if short_rsa_bits(key) is not None:
                    why = f"RSA key shorter than {MIN_RSA_BITS} bits"
        if why is not None:
            skipped.append(f"key #{index}: {why}")
            continue
        if kid in keys or kid in ambiguous:
            keys.pop(kid, None)
            ambiguous.add(kid)
            skipped.append(f"key #{index}: kid shared by several keys")
            continue
        fingerprint = hashlib.sha256(
            json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        keys[kid] = ProviderKey(key, usable, fingerprint)
    if not keys:
        raise DocumentRefused("the JWKS has no key usable with auth.algorithms")
    return keys, skipped


def parse_discovery(body: bytes, issuer: str) -> str:
    """The ``jwks_uri`` of an OpenID discovery document that names *issuer* exactly."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise DocumentRefused("the discovery document is not JSON") from None
    if not isinstance(document, dict):
        raise DocumentRefused("the discovery document is not an object")
    if document.get("issuer") != issuer:
        raise DocumentRefused(
            "the discovery document names another issuer (it must equal auth.oidc_issuer)"
        )
    uri = document.get("jwks_uri")
    if not isinstance(uri, str):
        raise DocumentRefused("the discovery document has no jwks_uri")
    try:
        check_key_url(uri)
    except ValueError:
        raise DocumentRefused(
            "the discovery jwks_uri is not https:// (http:// only on loopback)"
        ) from None
    if urlsplit(uri).scheme == "http" and urlsplit(issuer).scheme != "http":
        # plain http is for a provider run on loopback; a remote issuer's document
        # pointing at this node's own loopback services is not one
        raise DocumentRefused(
            "the discovery jwks_uri is http:// on loopback while the issuer is not"
        )
    return uri


def max_age(headers: Mapping[str, str]) -> float | None:
    """``Cache-Control: max-age`` in seconds (``no-store``/``no-cache``: 0), or None."""
    found: float | None = None
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            try:
                found = float(max(0, int(value.strip().strip('"'))))
            except ValueError:
                continue
    return found


class KeyCache:
    """Provider keys by (source, kid)."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], ProviderKey] = {}

    def get(self, source: str, kid: str) -> ProviderKey | None:
        return self._keys.get((source, kid))

    def replace(self, source: str, keys: Mapping[str, ProviderKey]) -> None:
        """The keys of *source* become *keys* (the other sources' keys are untouched)."""
        for entry in [k for k in self._keys if k[0] == source]:
            del self._keys[entry]
        for kid, key in keys.items():
            self._keys[source, kid] = key

    def fingerprints(self, source: str) -> dict[str, str]:
        return {kid: key.fingerprint for (src, kid), key in self._keys.items() if src == source}


def _client_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=str(ca_file.expanduser()) if ca_file is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise KeyLoadError(
            "auth.jwks_ca_file", f"cannot load {ca_file}: {getattr(exc, 'strerror', exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _describe(exc: Exception) -> str:
    if isinstance(exc, DocumentRefused):
        return str(exc)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no complete answer within {FETCH_TIMEOUT:g} s"
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RemoteJwks:
    """The key source of ``auth.jwks_url`` / ``auth.oidc_issuer`` (see the module doc).

    Runs on one event loop: :meth:`start` (first fetch, then the background refresh),
    :meth:`lookup` from the handshake and message policies, :meth:`close`. ``clock`` (a
    monotonic clock in seconds) measures the keys' age; tests may replace it before start.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.remote_jwks:
            raise ValueError("RemoteJwks needs auth.jwks_url or auth.oidc_issuer")
        self.source = config.remote_jwks
        self.clock = clock
        self._issuer = config.oidc_issuer
        self._algorithms = config.algorithms
        self._cache_seconds = config.jwks_cache_seconds
        self._min_refetch = config.jwks_min_refetch_seconds
        self._max_stale = config.jwks_max_stale_seconds
        self._events = events
        self._context = _client_context(config.jwks_ca_file)
        self._cache = KeyCache()
        self._generation = 0
        self._fetched_at: float | None = None
        self._fresh_for = self._cache_seconds
        self._jwks_uri: str | None = config.jwks_url or None
        self._discovered_at = -math.inf
        self._demanded_at = -math.inf
        self._failing = False
        self._expired_reported = False
        self._closed = False
        self._fetch: asyncio.Task[bool] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    # -- the KeySource interface (wsguard.core.auth) ----------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def usable(self) -> bool:
        fetched = self._fetched_at
        return fetched is not None and self.clock() - fetched <= self._max_stale

    def lookup(self, source: str, kid: str) -> tuple[Any, frozenset[str]]:
        fetched = self._fetched_at
        if fetched is None:
            self._demand()
            raise KeysUnavailable("no keys from the identity provider yet")
        age = self.clock() - fetched
        if age > self._max_stale:
            self._report_expired(age)
            self._demand()
            raise KeysUnavailable("identity provider keys older than auth.jwks_max_stale_seconds")
        if age > self._fresh_for:
            self._demand()  # a safety net: the background refresh normally came first
        entry = self._cache.get(source, kid)
        if entry is None:
            self._demand()
            raise UnknownKey()
        return entry.key, entry.algorithms

    async def wait_for_fetch(self) -> bool:
        task = self._fetch
        if task is None or task.done():
            return False
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # closed under us; the caller itself was not cancelled
                return False
            raise

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> bool:
        """Fetch the keys (awaited, at most FETCH_TIMEOUT s), then refresh in the background.

        Returns whether keys were fetched. A provider that does not answer does not stop
        the node: handshakes are refused (503 ``keys_unavailable``), the node reports not
        ready, and the fetch is tried again every ``auth.jwks_min_refetch_seconds``.
        """
        if self._runner is not None:
            return self.usable()
        self._closed = False
        task = self._start_fetch()
        ok = bool(task is not None and await asyncio.shield(task))
        if not ok:
            logger.error(
                "auth: no keys from %s: handshakes are refused (503 keys_unavailable) until "
                "it answers; trying again every %g s",
                self.source,
                self._min_refetch,
            )
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name="wsguard-jwks-refresh"
        )
        return ok

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._runner, self._fetch) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            healthy = self._fetched_at is not None and not self._failing
            await asyncio.sleep(self._fresh_for if healthy else self._min_refetch)
            task = self._start_fetch()
            if task is not None:
                await asyncio.shield(task)

    # -- fetching -------------------------------------------------------------------------

    def _demand(self) -> None:
        """A refetch asked for by a token: joins the fetch under way, else at most one per
        ``jwks_min_refetch_seconds``."""
        if self._fetch is not None and not self._fetch.done():
            return
        now = self.clock()
        if now - self._demanded_at < self._min_refetch:
            return
        if self._start_fetch() is not None:
            self._demanded_at = now

    def _start_fetch(self) -> asyncio.Task[bool] | None:
        if self._fetch is not None and not self._fetch.done():
            return self._fetch
        if self._closed:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: nothing can run the fetch
            return None
        self._fetch = loop.create_task(self._refresh(), name="wsguard-jwks-fetch")
        return self._fetch

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._context,
                timeout=httpx.Timeout(FETCH_TIMEOUT),
                follow_redirects=False,
                limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
                headers={
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                    "User-Agent": "wsguard",
                },
            )
        return self._client

    async def _refresh(self) -> bool:
        """One refresh; never raises (the failure is logged and audited)."""
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                keys, skipped, lifetime = await self._download()
        except (DocumentRefused, TimeoutError, httpx.HTTPError, OSError, ssl.SSLError) as exc:
            self._refused(_describe(exc))
            return False
        except Exception as exc:  # a bug must not end the background refresh
            logger.exception("auth: refreshing the keys of %s failed", self.source)
            self._refused(f"internal error: {type(exc).__name__}")
            return False
        self._accept(keys, skipped, lifetime)
        return True

    async def _download(self) -> tuple[dict[str, ProviderKey], list[str], float | None]:
        uri = self._jwks_uri
        if self._issuer and (
            uri is None or self.clock() - self._discovered_at > self._cache_seconds
        ):
            body, _ = await self._get(self._issuer.rstrip("/") + DISCOVERY_PATH)
            uri = parse_discovery(body, self._issuer)
            self._jwks_uri, self._discovered_at = uri, self.clock()
        assert uri is not None
        body, headers = await self._get(uri)
        keys, skipped = parse_jwks(body, self._algorithms)
        return keys, skipped, max_age(headers)

    async def _get(self, url: str) -> tuple[bytes, httpx.Headers]:
        async with self._http().stream("GET", url) as response:
            if response.status_code != 200:
                raise DocumentRefused(f"HTTP {response.status_code} from {url}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise DocumentRefused(f"compressed answer from {url} (Content-Encoding)")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_DOCUMENT_BYTES:
                raise DocumentRefused(f"answer from {url} over {MAX_DOCUMENT_BYTES} bytes")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise DocumentRefused(f"answer from {url} over {MAX_DOCUMENT_BYTES} bytes")
            return bytes(body), response.headers

    # -- outcomes -------------------------------------------------------------------------

    def _emit(self, event: str, **fields: Any) -> None:
        if self._events is not None:
            self._events(event, source=self.source, **fields)

    def _accept(
        self, keys: dict[str, ProviderKey], skipped: list[str], lifetime: float | None
    ) -> None:
        before = self._cache.fingerprints(self.source)
        self._cache.replace(self.source, keys)
        self._fetched_at = self.clock()
        self._fresh_for = (
            self._cache_seconds
            if lifetime is None
            else min(self._cache_seconds, max(self._min_refetch, lifetime))
        )
        self._expired_reported = False
        after = self._cache.fingerprints(self.source)
        if after != before:
            self._generation += 1
            for reason in skipped:
                logger.warning("auth: %s: JWKS %s (skipped)", self.source, reason)
            logger.info("auth: keys of %s: %s", self.source, ", ".join(sorted(after)))
            self._emit(
                "jwks_updated",
                kids=sorted(after),
                added=sorted(after.keys() - before.keys()),
                removed=sorted(before.keys() - after.keys()),
                replaced=sorted(k for k in after.keys() & before.keys() if after[k] != before[k]),
                skipped=len(skipped),
            )
        if self._failing:
            self._failing = False
            logger.warning("auth: %s answers again", self.source)
            self._emit("jwks_recovered")

    def _refused(self, detail: str) -> None:
        if self._issuer:
            self._jwks_uri = None  # discover again next time
        self._failing = True
        # a failed fetch (the first one at start too) counts as the last one asked for:
        # tokens ask again only jwks_min_refetch_seconds later
        self._demanded_at = self.clock()
        kept = len(self._cache.fingerprints(self.source))
        age = None if self._fetched_at is None else round(self.clock() - self._fetched_at, 1)
        logger.warning(
            "auth: keys of %s not refreshed: %s (keeping %d key(s)%s)",
            self.source,
            detail,
            kept,
            "" if age is None else f" fetched {age:g} s ago",
        )
        self._emit("jwks_fetch_failed", detail=detail, keys_kept=kept, keys_age_s=age)

    def _report_expired(self, age: float) -> None:
        if self._expired_reported:
            return
        self._expired_reported = True
        logger.error(
            "auth: the keys of %s were fetched %.0f s ago, more than "
            "auth.jwks_max_stale_seconds (%g): tokens are refused (503 keys_unavailable) "
            "until the provider answers",
            self.source,
            age,
            self._max_stale,
        )
        self._emit("jwks_keys_expired", age_s=round(age, 1), max_stale_s=self._max_stale)
