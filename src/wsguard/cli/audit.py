"""``wsguard audit URL``: options, progress display and output of the scanner."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from wsguard.errors import ConfigError

EXIT_FINDINGS = 1  # a check failed (from --fail-on up)
EXIT_INCOMPLETE = 3  # nothing failed, but some check could not run (ERROR)
EXIT_COVERAGE = 4  # nothing failed, but less than --min-coverage of the endpoint was examined
MIN_MESSAGE, MAX_MESSAGE = 1024, 256 * 1024 * 1024  # --max-message-bytes


def add_parser(sub: Any) -> None:
    audit: argparse.ArgumentParser = sub.add_parser(
        "audit",
        help="scan a WebSocket endpoint for security flaws (OWASP cheat sheet, ASVS 5.0 §4.4)",
        description="Black-box security scan of a WebSocket endpoint. Refuses non-loopback "
        "targets unless --i-own-this-target; floods, big messages and malformed handshakes "
        "run only with --aggressive. How the endpoint is spoken to (its ping, its "
        "envelope) is found at the baseline. Exit code 1 when a check FAILs (see --fail-on), "
        "2 for bad options, 3 when nothing failed but a check could not run (ERROR), 4 when "
        "nothing failed but the scan examined less than --min-coverage.",
    )
    audit.add_argument("url", nargs="?", help="ws:// or wss:// URL of the endpoint")
    cred = audit.add_argument_group("credentials")
    which = cred.add_mutually_exclusive_group()
    which.add_argument("--token", help="a valid token for the endpoint (or WSGUARD_AUDIT_TOKEN)")
    which.add_argument("--token-cmd", help="a command that prints a valid token")
    cred.add_argument(
        "--jwt-secret",
        help="the HMAC secret: lets the scan mint expired, exp-less and short-lived tokens "
        "(or WSGUARD_AUDIT_JWT_SECRET)",
    )
    cred.add_argument(
        "--jwt-secret-file",
        type=Path,
        help="read the HMAC secret from a file (e.g. wsguard serve's development key)",
    )
    cred.add_argument("--jwt-alg", default="HS256", help="algorithm for minted tokens (HS256)")
    cred.add_argument(
        "--jwt-claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="claim for minted tokens, e.g. aud=chat (VALUE may be JSON); repeatable",
    )
    cred.add_argument("--public-key", type=Path, help="the server's PEM public key (alg confusion)")
    cred.add_argument(
        "--token-in",
        default="header",
        metavar="WHERE",
        help="header (Authorization: Bearer, the default), header:NAME (NAME: token), "
        "query:NAME, cookie:NAME, subprotocol:PREFIX or message:JSON (the first message "
        "after the upgrade, {token} in it: an endpoint that authenticates in-band)",
    )
    cred.add_argument("--subprotocol", action="append", default=[], help="subprotocol to offer")
    cred.add_argument(
        "--cookie",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a session cookie sent with the scan's credential (and alone by origin.cookie)",
    )
    cred.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra header on every handshake (not for credentials: see --token-in)",
    )
    cred.add_argument("--origin-allowed", help="an Origin the endpoint allows (sent by default)")
    tls = audit.add_argument_group("TLS")
    tls.add_argument("--ca-file", type=Path, help="CA bundle to verify the server with")
    tls.add_argument("--client-cert", type=Path, help="PEM client certificate (mTLS)")
    tls.add_argument("--client-key", type=Path, help="PEM key of --client-cert")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify (only the transport.certificate check still verifies)",
    )
    tls.add_argument("--plain-port", type=int, help="also try ws:// on this port")
    proto = audit.add_argument_group("the endpoint's protocol")
    proto.add_argument(
        "--ping-message",
        help="a message the endpoint answers, overriding the one found at the baseline; {id} "
        "is replaced by a number the answer echoes (as id or ref, at the top or in data)",
    )
    proto.add_argument(
        "--pong-type",
        help="the answer's type when it does not echo the id (probes are then sequential)",
    )
    proto.add_argument(
        "--error-type",
        action="append",
        default=[],
        help="type of error frames (default error); repeatable",
    )
    proto.add_argument("--replay-message", help="a state-changing message for the replay check")
    proto.add_argument(
        "--privileged-message",
        action="append",
        default=[],
        metavar="JSON",
        help="a message only privileged users may send (authz.privileged; default: guesses "
        "such as command and admin in the endpoint's envelope); {marker} is replaced by a "
        "unique string to spot it when relayed; repeatable",
    )
    proto.add_argument(
        "--signing-key",
        metavar="KID:SECRET",
        help="sign --replay-message with wsguard's HMAC envelope (secret in base64url)",
    )
    proto.add_argument("--server-log", type=Path, help="the target's log file (logs.injection)")
    run = audit.add_argument_group("what to run")
    run.add_argument(
        "--checks",
        action="append",
        default=[],
        help="only these checks or "
        "groups (e.g. auth, origin.null, 'size.*'); comma-separated or repeated",
    )
    run.add_argument("--skip", action="append", default=[], help="skip these checks or groups")
    run.add_argument(
        "--aggressive",
        action="store_true",
        help="also run floods, big messages and malformed handshakes",
    )
    run.add_argument(
        "--i-own-this-target",
        action="store_true",
        help="allow a non-loopback target: you own it or may test it",
    )
    run.add_argument("--list-checks", action="store_true", help="list the checks and exit")
    bounds = audit.add_argument_group("bounds")
    bounds.add_argument("--reply-timeout", type=float, default=2.0, help="seconds (2)")
    bounds.add_argument("--connect-timeout", type=float, default=5.0, help="seconds (5)")
    bounds.add_argument(
        "--slow-wait",
        type=float,
        default=30.0,
        help="handshake.timeout: longest wait for the server to cut off slow headers (30)",
    )
    bounds.add_argument(
        "--idle-wait",
        type=float,
        default=30.0,
        help="liveness.heartbeat: wait for a ping or idle close (30)",
    )
    bounds.add_argument(
        "--expiry-wait",
        type=float,
        default=30.0,
        help="token.expiry: wait past exp for the close (30)",
    )
    bounds.add_argument(
        "--reset-wait",
        type=float,
        default=15.0,
        help="flood and conns: wait for a limit to reset (15)",
    )
    bounds.add_argument(
        "--max-connections", type=int, default=100, help="conns.*: most connections to hold (100)"
    )
    bounds.add_argument("--flood-count", type=int, default=1000, help="flood: messages (1000)")
    bounds.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="the largest frame or message taken from the target; a longer one is refused "
        "from its header and reported (4194304 = 4 MiB)",
    )
    out = audit.add_argument_group("output")
    out.add_argument("--format", choices=["table", "json", "sarif", "junit"], default="table")
    out.add_argument("--out", type=Path, help="write the report here (the table still prints)")
    out.add_argument(
        "--fail-on",
        choices=["fail", "weak", "warn"],
        default="fail",
        help="exit 1 from this verdict up (default fail)",
    )
    out.add_argument(
        "--min-coverage",
        type=float,
        metavar="PERCENT",
        help="exit 4 when the scan examined less than this share of the checks that apply "
        "(N/A for a missing option, INCONCLUSIVE and ERROR count as not examined)",
    )
    out.add_argument(
        "--require-complete",
        action="store_true",
        help="the same as --min-coverage 100",
    )
    out.add_argument("--verbose", "-v", action="store_true", help="per-variant details")
    out.add_argument("--no-progress", action="store_true", help="no progress display")


def _split(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def _positive(name: str, value: float) -> float:
    if not 0 < value <= 3600:
        raise ConfigError(name, "must be more than 0 and at most 3600 seconds")
    return value


def options_from(args: argparse.Namespace) -> Any:
    from wsguard.scanner.options import ScanOptions, parse_json_option, parse_signing_key

    if not args.url:
        raise ConfigError("url", "give the ws:// or wss:// URL to scan")
    claims: dict[str, Any] = {}
    for item in args.jwt_claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError("--jwt-claim", f"expected NAME=VALUE, got {item!r}")
        try:
            claims[name] = parse_json_option("--jwt-claim", value)
        except ConfigError:
            claims[name] = value
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError("--header", f"expected 'Name: value', got {item!r}")
        headers.append((name.strip(), value.strip()))
    for item in args.cookie:
        if "=" not in item:
            raise ConfigError("--cookie", f"expected NAME=VALUE, got {item!r}")
    placement, _, token_name = args.token_in.partition(":")
    if placement not in ("header", "query", "cookie", "subprotocol", "message"):
        raise ConfigError(
            "--token-in",
            "header, header:NAME, query:NAME, cookie:NAME, subprotocol:PREFIX or message:JSON",
        )
    if placement == "message":
        if "{token}" not in token_name:
            raise ConfigError(
                "--token-in", 'message:JSON needs {token} in it: message:{"type": "auth", ...}'
            )
        parse_json_option("--token-in", token_name.replace("{token}", "t"))
    if not args.jwt_alg.startswith("HS") or args.jwt_alg not in ("HS256", "HS384", "HS512"):
        raise ConfigError("--jwt-alg", "minting needs an HMAC algorithm: HS256, HS384 or HS512")
    for option in ("ca_file", "client_cert", "client_key", "public_key", "server_log"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise ConfigError("--" + option.replace("_", "-"), f"{path} is not a readable file")
    if args.replay_message is not None:
        parse_json_option("--replay-message", args.replay_message)
    for text in args.privileged_message:
        parse_json_option("--privileged-message", text.replace("{marker}", "m"))
    if args.min_coverage is not None and not 0 <= args.min_coverage <= 100:
        raise ConfigError("--min-coverage", "a percentage, 0-100")
    for key in (
        "reply_timeout",
        "connect_timeout",
        "slow_wait",
        "idle_wait",
        "expiry_wait",
        "reset_wait",
    ):
        _positive("--" + key.replace("_", "-"), getattr(args, key))
    if not 1 <= args.max_connections <= 10_000:
        raise ConfigError("--max-connections", "1-10000")
    if not 1 <= args.flood_count <= 100_000:
        raise ConfigError("--flood-count", "1-100000")
    if not MIN_MESSAGE <= args.max_message_bytes <= MAX_MESSAGE:
        raise ConfigError("--max-message-bytes", f"{MIN_MESSAGE}-{MAX_MESSAGE}")
    secret = args.jwt_secret or os.environ.get("WSGUARD_AUDIT_JWT_SECRET") or None
    if args.jwt_secret_file is not None:
        try:
            secret = args.jwt_secret_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("--jwt-secret-file", f"cannot read: {exc}") from None
    return ScanOptions(
        url=args.url,
        token=args.token or os.environ.get("WSGUARD_AUDIT_TOKEN") or None,
        token_cmd=args.token_cmd,
        jwt_secret=secret,
        jwt_algorithm=args.jwt_alg,
        jwt_claims=claims,
        public_key=args.public_key,
        token_in=placement,
        token_name=token_name,
        subprotocols=tuple(args.subprotocol),
        cookies=tuple(args.cookie),
        headers=tuple(headers),
        origin_allowed=args.origin_allowed,
        ca_file=args.ca_file,
        client_cert=args.client_cert,
        client_key=args.client_key,
        insecure=args.insecure,
        plain_port=args.plain_port,
        ping_message=args.ping_message,
        pong_type=args.pong_type,
        error_types=tuple(args.error_type) or ("error",),
        replay_message=args.replay_message,
        privileged_messages=tuple(args.privileged_message),
        signing_key=parse_signing_key(args.signing_key) if args.signing_key else None,
        server_log=args.server_log,
        checks=_split(args.checks),
        skip=_split(args.skip),
        aggressive=args.aggressive,
        i_own_this_target=args.i_own_this_target,
        reply_timeout=args.reply_timeout,
        connect_timeout=args.connect_timeout,
        slow_wait=args.slow_wait,
        idle_wait=args.idle_wait,
        expiry_wait=args.expiry_wait,
        reset_wait=args.reset_wait,
        max_connections=args.max_connections,
        flood_count=args.flood_count,
        max_message_bytes=args.max_message_bytes,
    )


def list_checks() -> int:
    from wsguard.scanner.runner import ordered_checks

    for spec in ordered_checks():
        flag = "  [--aggressive]" if spec.aggressive else ""
        print(f"{spec.id:<22} {spec.group:<11} {spec.title}{flag}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    if args.list_checks:
        return list_checks()
    from wsguard.extras import require

    require("audit", "wsguard audit")
    from rich.console import Console

    from wsguard.scanner.report import render, summary
    from wsguard.scanner.runner import run_scan

    options = options_from(args)
    err = Console(stderr=True, highlight=False)
    progress_display = None
    if not args.no_progress and err.is_terminal:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        progress_display = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
    state: dict[str, Any] = {"done": 0, "task": None}

    def progress(spec: Any, result: Any) -> None:
        if result is None:
            if progress_display is not None and state["task"] is not None:
                progress_display.update(state["task"], description=f"{spec.id}: {spec.title}")
            return
        state["done"] += 1
        if progress_display is not None and state["task"] is not None:
            progress_display.update(state["task"], completed=state["done"])
            progress_display.console.print(f"{result.verdict.value:<5} {spec.id}", highlight=False)
        elif not args.no_progress:
            print(f"{result.verdict.value:<5} {spec.id} ({result.seconds:.1f}s)", file=sys.stderr)

    async def scan() -> Any:
        from wsguard.scanner.runner import select

        total = len(select(options))
        if progress_display is None:
            return await run_scan(options, progress=progress)
        with progress_display:
            state["task"] = progress_display.add_task("starting", total=total)
            return await run_scan(options, progress=progress)

    report = asyncio.run(scan())
    if args.format == "table" and args.out is None and sys.stdout.isatty():
        from wsguard.scanner.report import table

        out = Console(highlight=False)
        out.print(table(report, verbose=args.verbose))
        out.print(summary(report), markup=False)
        return _finish(report, args)
    text = render(report, args.format, fail_on=args.fail_on, verbose=args.verbose)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
        if args.format != "table":
            print(render(report, "table", verbose=args.verbose), end="")
        print(f"wsguard audit: report written to {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if args.format != "table" and args.out is None:
        print(summary(report), file=sys.stderr)
    return _finish(report, args)


def _finish(report: Any, args: argparse.Namespace) -> int:
    code = _exit_code(report, args.fail_on, _min_coverage(args))
    if code == EXIT_COVERAGE:
        print(
            f"wsguard audit: examined {report.coverage().percent:.0f}% of the checks that "
            f"apply, under --min-coverage {_min_coverage(args):g} (exit {EXIT_COVERAGE})",
            file=sys.stderr,
        )
    return code


def _exit_code(report: Any, fail_on: str, min_coverage: float | None = None) -> int:
    if report.failed(fail_on):
        return EXIT_FINDINGS
    if report.counts()["ERROR"]:
        return EXIT_INCOMPLETE
    if min_coverage is not None and report.coverage().percent < min_coverage:
        return EXIT_COVERAGE
    return 0


def _min_coverage(args: argparse.Namespace) -> float | None:
    return 100.0 if args.require_complete else args.min_coverage
