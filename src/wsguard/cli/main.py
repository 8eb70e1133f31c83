"""The ``wsguard`` command: a thin layer over the same API Python users call."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wsguard
from wsguard.config.loader import load_config
from wsguard.config.model import Config
from wsguard.errors import ConfigError, WsguardError


class _CommandParser(argparse.ArgumentParser):
    """The parser of a subcommand: it reports the arguments it does not know itself, with
    its own usage (argparse would hand them up to ``wsguard``'s usage) and the closest
    option it has."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return parsed, extras

    def _suggestion(self, extras: list[str]) -> str:
        options = [
            option
            for action in self._actions
            for option in action.option_strings
            if option.startswith("--")
        ]
        for extra in extras:
            if extra.startswith("--"):
                close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsguard", description="A security layer for WebSocket services."
    )
    parser.add_argument("--version", action="version", version=f"wsguard {wsguard.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    serve = sub.add_parser("serve", help="run the standalone server (demo protocol)")
    _listener_options(serve)
    proxy = sub.add_parser(
        "proxy", help="run the gateway: the policy in front of an upstream WebSocket server"
    )
    _listener_options(proxy)
    proxy.add_argument(
        "--upstream", help="upstream WebSocket URL, e.g. ws://127.0.0.1:3000/ws (gateway.upstream)"
    )

    token = sub.add_parser("token", help="print a token the configured server accepts")
    _common(token)
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument(
        "--scope",
        action="append",
        default=[],
        help="scope or role; repeat or space-separate for several",
    )
    token.add_argument(
        "--ttl",
        default="1h",
        help="lifetime, e.g. 90s, 15m, 1h, 1d (default 1h; at most "
        "auth.max_token_lifetime_seconds, 1d by default)",
    )
    token.add_argument(
        "--private-key", type=Path, help="PEM private key, for RS*/PS*/ES*/EdDSA configurations"
    )
    token.add_argument("--kid", help="key id to put in the token header")

    check = sub.add_parser("check-config", help="validate a configuration and exit")
    _common(check)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a token id or a subject on every node of a cluster (redis:// store)",
    )
    _common(revoke)
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--jti", help="token id (the token's jti claim) to revoke")
    what.add_argument("--subject", "--sub", dest="subject", help="subject to log out everywhere")
    revoke.add_argument(
        "--ttl",
        help="how long the revocation lasts, e.g. 15m, 1h, 2d "
        "(default cluster.revocation_ttl_seconds, 24h)",
    )
    revoke.add_argument("--store", help="state store URI (default: the config's store)")
    _admin_commands(sub)
    from wsguard.cli import audit

    audit.add_parser(sub)
    return parser


def _admin_commands(sub: Any) -> None:
    from wsguard.cli import admin_client

    admin = sub.add_parser(
        "admin", help="talk to a running server's admin API (needs its admin listener)"
    )
    commands = admin.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
        _common(parser)
        admin_client.add_connection_options(parser)
        parser.add_argument(
            "--admin-port",
            type=int,
            help="the admin listener's port, as given to wsguard serve (admin.port)",
        )
        parser.add_argument(
            "--admin-host", help="the admin listener's address (admin.host; default 127.0.0.1)"
        )
        return parser

    command("health", "health and readiness of the node")
    listing = command("connections", "list connections (paged; --all follows every page)")
    listing.add_argument("--subject", help="only this subject's connections")
    listing.add_argument("--address", help="only connections from this address (or its /64)")
    listing.add_argument("--limit", type=int, default=100, help="per page, 1-1000 (default 100)")
    listing.add_argument("--after", help="continue after this connection id")
    listing.add_argument("--all", action="store_true", help="follow every page")
    disconnect = command("disconnect", "close a connection or every connection of a subject")
    target = disconnect.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", dest="connection_id", help="connection id")
    target.add_argument("--subject", "--sub", dest="subject", help="subject")
    revoke = command("revoke", "revoke a token id or a subject and close its connections")
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--jti", help="token id (the token's jti claim)")
    what.add_argument("--subject", "--sub", dest="subject", help="subject")
    revoke.add_argument("--ttl", help="how long the revocation lasts, e.g. 15m, 1h, 2d")
    ban = command("ban", "ban an address (its /64 for IPv6) and close its connections")
    ban.add_argument("address", help="IP address")
    ban.add_argument("--duration", default="1h", help="e.g. 90s, 15m, 1h, 2d (default 1h)")
    unban = command("unban", "lift an address's ban")
    unban.add_argument("address", help="IP address")
    command("bans", "list current bans")
    command("alerts", "list recent alerts and the alert rules")
    events = command("events", "list the latest security events")
    events.add_argument("--limit", type=int, default=50, help="how many, 1-1000 (default 50)")


def _listener_options(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8765; 0 = any free port)")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="diagnostic log level (default info)",
    )
    parser.add_argument("--store", help="state store URI (default memory://)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve wss://")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="CA bundle for client certificates (mTLS)"
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        help="serve metrics, health, the admin API and the dashboard on this port "
        "(admin.port; default off; 0 = any free port)",
    )
    parser.add_argument("--admin-host", help="address of the admin listener (default 127.0.0.1)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=_default_config_path(),
        help="TOML configuration file (or WSGUARD_CONFIG)",
    )


def _default_config_path() -> Path | None:
    value = os.environ.get("WSGUARD_CONFIG")
    return Path(value) if value else None


def _load(args: argparse.Namespace, **overrides: Any) -> Config:
    return load_config(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("serve", "proxy"):
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "revoke":
            return _revoke(args)
        if args.command == "admin":
            from wsguard.cli.admin_client import run_admin

            admin = {"admin.port": args.admin_port, "admin.host": args.admin_host}
            return run_admin(args, _load(args, **admin))
        if args.command == "audit":
            from wsguard.cli.audit import run_audit

            return run_audit(args)
        if args.command == "check-config":
            return _check_config(args)
    except WsguardError as exc:
        from wsguard.hosts.app import report

        return report(exc)  # one line; 2 for a configuration error
    return 1  # pragma: no cover


def _check_config(args: argparse.Namespace) -> int:
    """Validate as ``serve`` would before it listens: the model, plaintext beyond
    loopback, the TLS certificates and CA bundles, the audit file, then what the
    configuration builds (the keys, the store's client, the alert webhook, the admin
    listener's credential and TLS), each with the extra it needs. Nothing is started,
    connected or written: the development key and a generated admin token are checked
    when their files exist, never created."""
    import asyncio
    import io
    import secrets

    from wsguard.config.keys import has_configured_key, read_dev_key
    from wsguard.core.auth import KeyMaterial
    from wsguard.core.client_address import is_loopback_host
    from wsguard.core.risky_settings import config_warnings
    from wsguard.engines.tls import check_listener
    from wsguard.extras import require
    from wsguard.guard import Guard
    from wsguard.observability.audit import AuditLog

    config = _load(args)
    keys = None
    if not has_configured_key(config.auth) and is_loopback_host(config.host):
        # the development key: checked if it exists, else created at start
        keys = KeyMaterial(secret=read_dev_key(config.auth) or secrets.token_bytes(32))
    # in serve's order: the Guard (the keys first) is built before the listener is checked
    guard = Guard(config, audit=AuditLog(io.StringIO(), enabled=False), keys=keys)
    asyncio.run(guard.close())
    check_listener(config)
    if config.tls.enabled:
        from wsguard.engines.tls import server_context

        server_context(config.tls)  # the certificate, its key and the client CA load
    AuditLog.check_target(config.audit.file)  # opened at start, enabled or not
    if config.admin.enabled:
        require("admin", "the admin listener", key="admin.port")
        from wsguard.admin.credentials import DEFAULT_TOKEN_FILE, load_admin_token
        from wsguard.admin.server import admin_tls_context

        loopback = is_loopback_host(config.admin.host)
        generated = DEFAULT_TOKEN_FILE.expanduser()
        if config.admin.token_file is not None or not loopback or os.path.lexists(generated):
            # read (and its mode checked) as at start; on loopback without one the token
            # file is generated at start, which a check does not do
            load_admin_token(config.admin, loopback=loopback)
        admin_tls_context(config)  # its certificate, key and client CA (apart from the users')
    for key, message in config_warnings(config):
        print(f"wsguard: warning: {key}: {message}", file=sys.stderr)
    print("configuration is valid")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from wsguard.hosts.app import run_main

    config = _load(
        args,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        store=args.store,
        **{
            "tls.cert_file": args.tls_cert,
            "tls.key_file": args.tls_key,
            "tls.client_ca_file": args.tls_client_ca,
            "admin.port": args.admin_port,
            "admin.host": args.admin_host,
            "gateway.upstream": getattr(args, "upstream", None),
        },
    )
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The engine's debug records carry raw headers (tokens, cookies) and frames: never
    # let them through, whatever the log level.
    logging.getLogger("wsguard.engine").setLevel(logging.WARNING)
    if args.command == "proxy":
        from wsguard.hosts.gateway.proxy import Gateway, redacted_url

        app: Any = Gateway(config)
        print(
            f"wsguard: forwarding to {redacted_url(config.gateway.upstream)}",
            file=sys.stderr,
            flush=True,
        )
    else:
        from wsguard.hosts.demo import demo_app

        app = demo_app(config)
    # the same path as App.run(): the "listening on" line, one line when it cannot start
    return run_main(app, config_file=args.config)


def _token(args: argparse.Namespace) -> int:
    from wsguard.tokens import mint_token, parse_duration

    config = _load(args)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise ConfigError("--ttl", str(exc)) from None
    if ttl <= 0:
        raise ConfigError("--ttl", "must be positive")
    longest = config.auth.max_token_lifetime_seconds
    if ttl > longest:  # the server would refuse it (invalid_token)
        raise ConfigError(
            "--ttl",
            f"longer than auth.max_token_lifetime_seconds ({longest:g} s): the server "
            "refuses such a token; raise that key or ask for less",
        )
    _check_subject(config, args.sub, ttl)
    token = mint_token(
        config,
        subject=args.sub,
        scopes=args.scope,
        ttl=ttl,
        private_key_file=args.private_key,
        kid=args.kid,
    )
    print(token)
    return 0


def _check_subject(config: Config, subject: str, ttl: float) -> None:
    """Refuse a subject the server would refuse: a token carrying it, signed with a
    throwaway key, goes through the server's own verifier."""
    import secrets

    from wsguard.core.auth import AuthFailure, KeyMaterial, TokenVerifier
    from wsguard.tokens import mint_token

    auth = config.auth.model_copy(update={"algorithms": ("HS256",)})
    probe = KeyMaterial(secret=secrets.token_bytes(32))
    probe_config = config.model_copy(update={"auth": auth})
    token = mint_token(probe_config, subject=subject, ttl=ttl, keys=probe)
    try:
        TokenVerifier(auth, probe).verify(token)
    except AuthFailure as exc:
        raise ConfigError(
            "--sub",
            f"the server refuses this subject ({exc.detail}); a subject is 1 to 256 "
            "printable characters",
        ) from None


def _revoke(args: argparse.Namespace) -> int:
    from wsguard.stores import StoreUnavailable, open_store
    from wsguard.stores.uri import is_shared, redacted
    from wsguard.tokens import parse_duration

    config = _load(args, store=args.store)
    if not is_shared(config.store):
        raise ConfigError(
            "store",
            "revocation needs the cluster store (redis://...): with memory:// the "
            "state lives inside the running server; pass --store or set store",
        )
    ttl = config.revocation_seconds
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl)
        except ValueError as exc:
            raise ConfigError("--ttl", str(exc)) from None
        if ttl <= 0:
            raise ConfigError("--ttl", "must be positive")
    kind, value = ("jti", args.jti) if args.jti is not None else ("sub", args.subject)
    if not value or len(value) > 1024:
        raise ConfigError("--" + ("jti" if kind == "jti" else "subject"), "1-1024 characters")
    # a revocation must never be silently dropped: fail closed whatever the config says
    cluster = config.cluster.model_copy(
        update={
            "on_store_error": config.cluster.on_store_error.model_copy(
                update={"revocations": "closed"}
            )
        }
    )
    store = open_store(config.store, cluster)

    async def run() -> None:
        try:
            await store.revoke(kind, value, ttl)  # type: ignore[arg-type]
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except StoreUnavailable:
        print(f"wsguard: cannot reach {redacted(config.store)}; nothing revoked", file=sys.stderr)
        return 1
    label = "token id" if kind == "jti" else "subject"
    print(f"revoked {label} {value!r} for {ttl:g}s on {redacted(config.store)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
