"""TLS for the standalone server: context, reload on SIGHUP, client certificate identity."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from wsguard.config.model import Config, TlsConfig
from wsguard.errors import ConfigError, KeyLoadError

if TYPE_CHECKING:
    from wsguard.guard import Guard

logger = logging.getLogger("wsguard.tls")

# TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3 suites are OpenSSL's defaults.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def policy_context(min_version: str = "1.2") -> ssl.SSLContext:
    """A server SSLContext with the one TLS policy of every wsguard listener (the public
    one and the admin one): TLS 1.2+ (or 1.3), forward secrecy and AEAD suites only, no
    compression, no renegotiation. No certificate loaded yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's SSLContext: TLS 1.2+ (or 1.3), modern ciphers, optional client
    certs. Each handshake is served by the newest context :func:`reload_certificate`
    built: the engines take it per connection (:func:`current_context`), so its own
    session cache and ticket keys are the ones a resumption is looked up in. No
    server-name callback: CPython would decode the client's server name for it first,
    and print a traceback for each name that is not ASCII."""
    return _certificate_context(tls)


def _certificate_context(tls: TlsConfig) -> ssl.SSLContext:
    """A complete server context from the files *tls* names (certificate, key, client CA)."""
    assert tls.cert_file is not None and tls.key_file is not None
    context = policy_context(tls.min_version)
    load_certificate(context, tls)
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file.expanduser()))
        except (OSError, ssl.SSLError) as exc:
            raise KeyLoadError("tls.client_ca_file", f"cannot load: {exc}") from None
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
        )
        # a resumed session skips the verification of the client's chain (expiry, the
        # CA file as reloaded): no session tickets (TLS 1.3 then cannot resume at all),
        # and a TLS 1.2 session resumed by its id, which OpenSSL's server cache allows
        # and Python cannot switch off, is refused (refused_resumption)
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


def load_certificate(context: ssl.SSLContext, tls: TlsConfig) -> None:
    assert tls.cert_file is not None and tls.key_file is not None
    try:
        context.load_cert_chain(str(tls.cert_file.expanduser()), str(tls.key_file.expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise KeyLoadError("tls.cert_file", f"cannot load certificate and key: {exc}") from None


def reload_certificate(context: ssl.SSLContext, tls: TlsConfig) -> bool:
    """Load the certificate, key and client CA again (SIGHUP) into a new context, which
    new handshakes use; open connections are untouched. On error the previous context
    stays in use. (Loading into the live context would add a certificate of a new key
    type beside the old one, which clients offering the old type would still get.)"""
    try:
        fresh = _certificate_context(tls)
    except KeyLoadError as exc:
        logger.error("certificate reload failed, keeping the previous one: %s", exc)
        return False
    context.wsguard_newest = fresh  # type: ignore[attr-defined]
    logger.info("certificate reloaded from %s", tls.cert_file)
    return True


def current_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """The context a new connection's handshake uses: the newest one
    :func:`reload_certificate` built from *context* (the listener's), else *context*.
    Sessions and tickets are kept per context: after a reload none made before it can
    be resumed."""
    newest: ssl.SSLContext | None = getattr(context, "wsguard_newest", None)
    return context if newest is None else newest


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol of *loop*: uvloop's own (C) on uvloop, else asyncio's."""
    import asyncio.sslproto

    try:
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is not installed on Windows
        return asyncio.sslproto.SSLProtocol
    if isinstance(loop, uvloop.Loop):
        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    return asyncio.sslproto.SSLProtocol


def start_tls(
    loop: asyncio.AbstractEventLoop,
    raw: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    waiter: asyncio.Future[None],
    *,
    handshake_timeout: float,
    shutdown_timeout: float | None = None,
) -> None:
    """Start the server side of TLS on an accepted TCP transport, now: what the loop's
    ``create_server(ssl=...)`` does for each socket, after wsguard counted it. Called
    from *protocol*'s ``connection_made(raw)``, before any byte is read (a task, as
    ``loop.start_tls`` needs, would run after the loop's first read). *protocol*'s
    ``connection_made`` is called again, with the TLS transport, once the handshake
    completes; *waiter* is done when it completes or fails (with the failure: the
    socket is closed then, and *protocol* hears nothing else)."""
    tls_protocol = _ssl_protocol_class(loop)(
        loop,
        protocol,
        current_context(context),
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
        ssl_shutdown_timeout=shutdown_timeout,
    )
    raw.set_protocol(tls_protocol)
    tls_protocol.connection_made(raw)


# OpenSSL's verification results (X509_V_ERR_*) a client certificate fails with
_CERT_NOT_YET_VALID = 9
_CERT_EXPIRED = 10

#: audit reason of a failed TLS handshake -> the ``reason`` it is counted under in
#: ``wsguard_handshakes_total`` (None: audited only: not a refusal of the client's
#: credential, which must not feed the alert rules on authentication failures)
TLS_FAILURES: dict[str, str | None] = {
    "no_certificate": "tls_certificate",
    "certificate_expired": "tls_certificate",
    "certificate_not_yet_valid": "tls_certificate",
    "certificate_untrusted": "tls_certificate",
    "session_resumed": None,  # our own refusal by design: the retry is a full handshake
    "protocol": "tls_protocol",
    "client_alert": None,  # the client gave up (it does not trust our certificate, say)
}


def failure_reason(exc: BaseException | None) -> str | None:
    """The audit reason of a TLS handshake that failed with *exc*: a fixed word from
    OpenSSL's verdict (never its message, which may quote the client), or None when
    the client just went away (reset, end of stream), which is no refusal."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _CERT_EXPIRED:
            return "certificate_expired"
        if code == _CERT_NOT_YET_VALID:
            return "certificate_not_yet_valid"
        return "certificate_untrusted"
    if isinstance(exc, ssl.SSLEOFError) or not isinstance(exc, ssl.SSLError):
        return None
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    if "ALERT" in reason:  # TLSV1_ALERT_UNKNOWN_CA, SSLV3_ALERT_BAD_CERTIFICATE...
        return "client_alert"
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return None
    return "protocol"


def refused_resumption(transport: asyncio.Transport, guard: Guard, peer: str | None) -> bool:
    """Whether a completed handshake resumed a session while client certificates are
    verified: a resumption does not verify the client's chain again (its expiry, the
    CA file as reloaded since), so the connection is aborted (without close_notify:
    OpenSSL drops the session from its cache, the retry is a full handshake) and audited
    (``session_resumed``)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or not ssl_object.session_reused:
        return False
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return False
    transport.abort()
    record_failure(guard, "session_resumed", peer)
    return True


def tls_ended(waiter: asyncio.Future[None], guard: Guard, peer: str | None, *, audit: bool) -> None:
    """A TLS handshake ended without completing: with *audit* (it was still a pending
    handshake: not one our own timeout ended, which is audited as a handshake timeout),
    its failure is recorded, unless the client just went away. The waiter's exception is
    retrieved either way."""
    failure = None if waiter.cancelled() else waiter.exception()
    if audit:
        reason = failure_reason(failure)
        if reason is not None:
            record_failure(guard, reason, peer)


def record_failure(guard: Guard, reason: str, client: str | None) -> None:
    """Audit a TLS handshake that failed (``tls_failed``): one line, as cheap as a refused
    request head (the audit writer's queue bounds what a flood of them costs), and count
    it as a handshake refusal (``tls_certificate``: auth; ``tls_protocol``: protocol)."""
    guard.audit.emit("tls_failed", reason=reason, client=client)
    counted = TLS_FAILURES.get(reason)
    if counted is not None:
        guard.monitor.handshake_refused(counted, client, None)


#: ``HandshakeRequest.client_cert`` of a verified certificate that names no usable
#: identity (none, more than one value, or one a token subject could not be)
NO_CERT_IDENTITY = ""


def certificate_identity(peer_cert: dict[str, Any] | None, source: str) -> str | None:
    """The identity named by a verified client certificate (its CN or a SAN, by config).

    None when no certificate was presented; :data:`NO_CERT_IDENTITY` when one was but it
    names no usable identity: the attribute is missing, appears more than once (which
    one "wins" differs between TLS stacks), or is not what a token subject may be
    (printable, 1-256 characters). Such a certificate is refused, never skipped.
    """
    if not peer_cert:
        return None
    if source == "cn":
        values = [
            value
            for rdn in peer_cert.get("subject", ())
            for name, value in rdn
            if name == "commonName"
        ]
    else:
        kind = {"san_dns": "DNS", "san_email": "email", "san_uri": "URI"}[source]
        values = [value for name, value in peer_cert.get("subjectAltName", ()) if name == kind]
    if len(values) != 1:
        return NO_CERT_IDENTITY
    value = values[0]
    if not isinstance(value, str) or not 0 < len(value) <= 256 or not value.isprintable():
        return NO_CERT_IDENTITY
    return value


def check_listener(config: Config) -> None:
    """Refuse configurations that would serve plaintext beyond loopback."""
    from wsguard.core.client_address import is_loopback_host

    if config.tls.enabled or is_loopback_host(config.host) or config.tls.behind_proxy:
        return
    raise ConfigError(
        "tls.cert_file",
        f"refusing plaintext ws:// on non-loopback address {config.host!r}: set "
        "tls.cert_file and tls.key_file (--tls-cert/--tls-key), or tls.behind_proxy = true "
        "with proxy.trusted when a TLS-terminating proxy is in front",
    )
