"""``wsguard admin ...``: the CLI side of the admin API (one HTTP call per command).

The URL is ``--url``, else ``WSGUARD_ADMIN_URL``, else the admin listener configured the
way the server's was (``--admin-port``/``--admin-host``, ``WSGUARD_ADMIN_PORT`` or
``WSGUARD_ADMIN__PORT``, ``admin.port`` of ``--config``), else the one a server started by
this user on this machine is running (``~/.local/share/wsguard/admin.url``, written by
``wsguard serve``/``proxy`` and ``App.run()`` while they run). The credential is ``--token-file``,
else ``WSGUARD_ADMIN_TOKEN``/``admin.token``, else ``admin.token_file``, else
the token file a loopback server generated; or a client certificate
(``--cert``/``--key``) for an mTLS admin listener. Answers are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from wsguard.admin.credentials import DEFAULT_TOKEN_FILE
from wsguard.config.model import Config
from wsguard.core.client_address import is_loopback_host
from wsguard.errors import ConfigError

if TYPE_CHECKING:
    import httpx  # the admin extra: imported when a command runs


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help="admin listener URL (default WSGUARD_ADMIN_URL or the config's admin.port)"
    )
    parser.add_argument("--token-file", type=Path, help="file holding the admin token")
    parser.add_argument("--cacert", type=Path, help="CA bundle to verify an https:// listener")
    parser.add_argument("--cert", type=Path, help="admin client certificate (mTLS)")
    parser.add_argument("--key", type=Path, help="private key of --cert")


NO_LISTENER = (
    "no admin listener to talk to: start the server with one (wsguard serve --admin-port "
    "PORT) and pass the same --admin-port PORT here, or --url http://HOST:PORT (the address "
    "the server printed: 'admin listener on ...'), or set WSGUARD_ADMIN_URL or admin.port"
)


def _base_url(args: argparse.Namespace, config: Config) -> str:
    url = args.url or os.environ.get("WSGUARD_ADMIN_URL")
    if url:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("--url", "must start with http:// or https://")
        return str(url).rstrip("/")
    admin = config.admin
    if not admin.port:
        running = running_admin_url()
        if running is not None:
            return running
        raise ConfigError("admin.port", NO_LISTENER)
    host = admin.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if admin.tls.cert_file else "http"
    return f"{scheme}://{host}:{admin.port}"


def running_admin_url() -> str | None:
    """The admin URL a running server of this user wrote (``App.run()``, ``wsguard serve``),
    None when there is none or its process is gone."""
    from wsguard.hosts.app import ADMIN_URL_FILE

    try:
        record = json.loads(ADMIN_URL_FILE.expanduser().read_text())
        url, pid = record["url"], record["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: is it still running? (nothing is sent)
    except ProcessLookupError:
        return None  # stale: that server ended without removing the file (killed)
    except OSError:
        pass  # it exists (another user's process may not be signalled)
    return url.rstrip("/")


def _token(args: argparse.Namespace, config: Config) -> str | None:
    paths = [args.token_file, config.admin.token_file]
    if args.token_file is None and not config.admin.token:
        paths.append(DEFAULT_TOKEN_FILE)
    if args.token_file is None and config.admin.token:
        return config.admin.token
    for path in paths:
        if path is None:
            continue
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError:
            if path is args.token_file:
                raise ConfigError("--token-file", f"cannot read {path}") from None
    return None


def _client(args: argparse.Namespace, config: Config) -> httpx.Client:
    import httpx

    headers = {"Accept": "application/json"}
    token = _token(args, config)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    verify: ssl.SSLContext | bool = True
    if args.cacert or args.cert:
        context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
        if args.cert:
            context.load_cert_chain(str(args.cert), str(args.key) if args.key else None)
        verify = context
    base = _base_url(args, config)
    host = httpx.URL(base).host
    loopback = is_loopback_host(host)
    if token and base.startswith("http://") and not loopback:
        print(
            f"wsguard: warning: sending the admin token in clear text to {host}",
            file=sys.stderr,
        )
    # never through a proxy from the environment to a loopback listener (HTTP_PROXY would
    # otherwise receive the admin token)
    return httpx.Client(
        base_url=base, headers=headers, verify=verify, timeout=10.0, trust_env=not loopback
    )


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = client.request(method, path, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = {"error": "bad_response", "message": response.text[:200]}
    return response.status_code, body


def _print(body: Any) -> None:
    print(json.dumps(body, indent=2, sort_keys=False))


def run_admin(args: argparse.Namespace, config: Config) -> int:
    """Run one ``wsguard admin`` command; 0 on success, 1 when the API refused."""
    from wsguard.extras import require

    require("admin", "wsguard admin", modules=("httpx",))
    import httpx

    from wsguard.tokens import parse_duration

    command = args.admin_command
    try:
        with _client(args, config) as client:
            if command == "health":
                _, health = _call(client, "GET", "/healthz")
                status, ready = _call(client, "GET", "/readyz")
                _print({"health": health, "readiness": ready})
                return 0 if status == 200 else 1
            if command == "connections":
                return _connections(client, args)
            if command == "disconnect":
                body = (
                    {"connection_id": args.connection_id}
                    if args.connection_id
                    else {"subject": args.subject}
                )
                return _done(*_call(client, "POST", "/disconnect", json=body))
            if command == "revoke":
                body = {"jti": args.jti} if args.jti else {"subject": args.subject}
                if args.ttl:
                    body["ttl_seconds"] = _duration(args.ttl, "--ttl", parse_duration)
                return _done(*_call(client, "POST", "/revoke", json=body))
            if command == "ban":
                seconds = _duration(args.duration, "--duration", parse_duration)
                body = {"address": args.address, "seconds": seconds}
                return _done(*_call(client, "POST", "/bans", json=body))
            if command == "unban":
                path = "/bans/" + quote(args.address, safe=":/")
                return _done(*_call(client, "DELETE", path))
            if command == "bans":
                return _done(*_call(client, "GET", "/bans"))
            if command == "alerts":
                return _done(*_call(client, "GET", "/alerts"))
            if command == "events":
                return _done(*_call(client, "GET", "/events", params={"limit": args.limit}))
    except httpx.HTTPError as exc:
        print(f"wsguard: cannot reach the admin listener: {exc}", file=sys.stderr)
        return 1
    return 1  # pragma: no cover - argparse requires a known command


def _duration(text: str, flag: str, parse: Any) -> float:
    try:
        seconds = float(parse(text))
    except ValueError as exc:
        raise ConfigError(flag, str(exc)) from None
    if seconds <= 0:
        raise ConfigError(flag, "must be positive")
    return seconds


def _done(status: int, body: Any) -> int:
    if status >= 400:
        message = body.get("message", "") if isinstance(body, dict) else ""
        code = body.get("error", "error") if isinstance(body, dict) else "error"
        if status == 401:  # say what to pass
            message += " (pass the server's admin token: WSGUARD_ADMIN_TOKEN or --token-file)"
        print(f"wsguard: admin API refused ({status} {code}): {message}", file=sys.stderr)
        return 1
    _print(body)
    return 0


def _connections(client: httpx.Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    for name in ("subject", "address", "after"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    collected: list[Any] = []
    while True:
        status, body = _call(client, "GET", "/connections", params=params)
        if status >= 400 or not args.all:
            return _done(status, body)
        collected.extend(body["connections"])
        if not body.get("next"):
            _print({"connections": collected, "total": body["total"], "next": None})
            return 0
        params["after"] = body["next"]
