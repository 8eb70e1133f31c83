"""TLS for the standalone server: context, reload on SIGHUP, client certificate identity."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from wsguard.config.model import Config, TlsConfig
from wsguard.errors import ConfigError, KeyLoadError

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
    built (its server-name callback, called for every ClientHello, switches to it)."""
    context = _certificate_context(tls)
    context.sni_callback = _newest_context
    return context


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


def _newest_context(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
    """The listener context's server-name callback: serve this handshake with the newest
    context (the listener's own until a reload)."""
    newest = getattr(context, "wsguard_newest", None)
    if newest is not None:
        ssl_object.context = newest


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
