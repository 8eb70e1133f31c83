"""Transport security: TLS everywhere, modern versions, a certificate that verifies."""

from __future__ import annotations

import ssl
import time
import warnings
from dataclasses import replace

from websockets.uri import WebSocketURI

from wsguard.scanner.context import NotApplicable, ScanContext, tls_context
from wsguard.scanner.model import OWASP, Finding, Verdict, check, finding
from wsguard.scanner.probe import handshake, open_stream

REFS = (f"{OWASP}: Transport Security", "ASVS 5.0 V4.4.1", "ASVS 5.0 V12.1.1")


@check(
    "transport.plaintext",
    "No plaintext ws:// next to wss://",
    group="transport",
    references=REFS,
    remedy="Serve only wss:// (wsguard: tls.cert_file); redirect or close port 80.",
)
async def plaintext(ctx: ScanContext) -> Finding:
    uri = ctx.target.uri
    if not uri.secure:
        if ctx.target.loopback:
            raise NotApplicable("ws:// on loopback: TLS is terminated in front, or not needed")
        return finding(
            ctx.check_id,
            Verdict.FAIL,
            "the target is ws://: tokens and messages cross the network in clear",
        )
    ports = [uri.port]
    if ctx.options.plain_port is not None:
        ports.append(ctx.options.plain_port)
    elif uri.port == 443:
        ports.append(80)
    lines = []
    listening: list[str] = []
    for port in dict.fromkeys(ports):
        plain = WebSocketURI(False, uri.host, port, uri.path, uri.query)
        endpoint = replace(ctx.endpoint, uri=plain, ssl_context=None)
        result = await handshake(endpoint, wait=ctx.options.connect_timeout)
        if result.session is not None or result.status == 101:
            if result.session is not None:
                await result.session.close()
            return finding(
                ctx.check_id,
                Verdict.FAIL,
                f"ws://{uri.host}:{port}{uri.resource_name} upgrades in clear",
            )
        lines.append(f"ws:// on port {port}: {result.describe()}")
        status = result.status
        if status is not None and not (300 <= status < 400 or status in (400, 426)):
            listening.append(f"port {port} answers {result.describe()}")
    if listening:
        return finding(
            ctx.check_id,
            Verdict.WARN,
            f"a plaintext WebSocket endpoint answers ({'; '.join(listening)}): a client "
            "pointed at ws:// would send its token in clear",
            *lines,
        )
    return finding(ctx.check_id, Verdict.PASS, "; ".join(lines))


def _require_tls(ctx: ScanContext) -> None:
    if not ctx.target.uri.secure:
        raise NotApplicable("not a wss:// target")


@check(
    "transport.tls_version",
    "Only TLS 1.2 or newer is accepted",
    group="transport",
    references=(*REFS, "RFC 8996"),
    remedy="Set the minimum to TLS 1.2 (wsguard: tls.min_version).",
)
async def tls_version(ctx: ScanContext) -> Finding:
    _require_tls(ctx)
    context = tls_context(ctx.options, verify=False)
    reader, writer = await open_stream(ctx.endpoint, ssl_context=context)
    ssl_object = writer.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object else "?"
    cipher = ssl_object.cipher()[0] if ssl_object else "?"
    writer.close()
    del reader
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.check_hostname = False
    legacy.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # offering them is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy.minimum_version = ssl.TLSVersion.TLSv1
            legacy.maximum_version = ssl.TLSVersion.TLSv1_1
        legacy.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"negotiated {version} ({cipher}); this machine's OpenSSL cannot offer TLS 1.0/1.1",
        )
    try:
        _, old = await open_stream(ctx.endpoint, ssl_context=legacy)
    except ssl.SSLError as exc:
        reason = exc.reason or "refused"
        if reason in ("NO_PROTOCOLS_AVAILABLE", "UNSUPPORTED_PROTOCOL") and "alert" not in str(exc):
            note = "this machine's OpenSSL cannot offer TLS 1.0/1.1"
        else:
            note = f"TLS 1.0/1.1 refused ({reason})"
        return finding(ctx.check_id, Verdict.PASS, f"negotiated {version} ({cipher}); {note}")
    except (OSError, TimeoutError) as exc:
        how = {ConnectionResetError: "connection reset", TimeoutError: "timeout"}.get(
            type(exc), exc.strerror or type(exc).__name__
        )
        return finding(
            ctx.check_id,
            Verdict.PASS,
            f"negotiated {version} ({cipher}); TLS 1.0/1.1 refused ({how})",
        )
    old_object = old.get_extra_info("ssl_object")
    accepted = old_object.version() if old_object else "TLS < 1.2"
    old.close()
    return finding(ctx.check_id, Verdict.FAIL, f"accepts {accepted} (RFC 8996 deprecates it)")


@check(
    "transport.certificate",
    "The certificate verifies for the host and is not about to expire",
    group="transport",
    references=REFS,
    remedy="Use a certificate from a trusted CA for this host name; renew automatically.",
)
async def certificate(ctx: ScanContext) -> Finding:
    _require_tls(ctx)
    context = tls_context(ctx.options, verify=True, ignore_insecure=True)
    try:
        _, writer = await open_stream(ctx.endpoint, ssl_context=context)
    except ssl.SSLCertVerificationError as exc:
        return finding(
            ctx.check_id, Verdict.FAIL, f"does not verify: {exc.verify_message or exc.reason}"
        )
    ssl_object = writer.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object else None
    writer.close()
    if not cert:
        return finding(ctx.check_id, Verdict.ERROR, "no certificate information")
    expires = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    days = (expires - time.time()) / 86400
    issuer = dict(x[0] for x in cert.get("issuer", ()))
    by = issuer.get("organizationName") or issuer.get("commonName") or "?"
    if days < 14:
        return finding(
            ctx.check_id, Verdict.WARN, f"verifies, but expires in {days:.0f} days (issuer {by})"
        )
    return finding(
        ctx.check_id,
        Verdict.PASS,
        f"verifies for {ctx.target.uri.host}; issuer {by}; expires in {days:.0f} days",
    )
