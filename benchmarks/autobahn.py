"""WebSocket conformance: the Autobahn fuzzing client against an echo backend, directly and
through ``wsguard proxy``; the gateway must add no FAILED case.

Run from the repository root (needs ``pip install kosoku``, in the test extras):

    .venv/bin/python benchmarks/autobahn.py                 # the whole suite
    .venv/bin/python benchmarks/autobahn.py --quick         # a representative subset
    .venv/bin/python benchmarks/autobahn.py -i '9.*' -x '9.1.6' --parallelism 4

The fuzzing client is ``kosoku`` (PyPI), which drives the Autobahn TestSuite's own case files
on Python 3. Every process listens on 127.0.0.1 only:

* echo: a plain ``websockets`` server (this script, ``--serve-echo``) that sends every
  message back as it came (text as text, binary as binary; no compression, no keepalive,
  messages up to 64 MiB);
* run "direct": kosoku -> echo;
* run "gateway": kosoku -> relay -> ``wsguard proxy`` -> echo. The gateway's config (written
  to a temporary directory) is the real policy with every limit raised above what the suite
  sends: ``messages.format = "opaque"`` (Autobahn sends arbitrary text and binary),
  ``messages.binary = true``, 64 MiB messages both ways, an audit log in a file.
  kosoku cannot send headers, so the relay (this script, ``--serve-relay``) inserts
  ``Authorization: Bearer <HS256 JWT>`` into the client's upgrade request and from then on
  copies bytes both ways untouched (half-closes included): no frame is parsed or changed, so
  what is measured is the gateway's own conformance.

Both runs select the same cases (``--include``/``--exclude``, kosoku's ``*`` globs; default:
everything). kosoku's reports go to ``artifacts/autobahn/{direct,gateway}/`` (index.html,
index.json, one JSON and HTML file per case) and the comparison to
``artifacts/autobahn/summary.json``. The script prints the count of cases per behavior for
both runs and every case that fails (FAILED or ERROR) through the gateway but not directly,
and exits 1 if there is one (2 when the run itself could not be completed). Each run is
bounded by ``--timeout``; children are killed at exit (and die with this process).

What the baseline looks like (websockets 17.4, kosoku 0.1.0; 517 cases, about 20 s):

* 12.* and 13.* (216 cases, permessage-deflate) are UNIMPLEMENTED in both runs: neither the
  echo backend nor the gateway (``compression = false``) negotiates compression;
* 7.1.5 FAILED in both runs: on a close frame in the middle of a fragmented message,
  websockets answers 1002 "incomplete fragmented message" where Autobahn wants 1000;
* 9.3.1, 9.3.2, 9.4.1, 9.4.2 FAILED directly, OK through the gateway (listed as
  differences): a 4 MiB message in 64- or 256-byte fragments is more than websockets' cap
  of 4096 fragments per message (closed with 1009 "too many fragments", a denial-of-service
  guard; ``WEBSOCKETS_MAX_FRAGMENTS=100000`` in the environment lifts it for the backend).
  The gateway's cap is ``limits.max_fragments`` (4096 by default), raised to 65536 in its
  config, and it forwards the message reassembled;
* a few "fail fast" cases (3.*, 4.*, 5.15, 6.4.*) are NON-STRICT in both runs, and one of
  4.1.3-4.2.5 can go from OK to NON-STRICT depending on timing (listed as a difference, not a
  failure): the echo of the message sent before the bad frame is allowed to be lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from kosoku import FailureError, run_fuzzingclient
from kosoku._kosoku import CaseResult
from kosoku._report import write_reports

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
ROOT = HERE.parent
HOST = "127.0.0.1"
MAX_MESSAGE = 64 * 1024 * 1024
MAX_FRAGMENTS = 65536  # 9.3.1 and 9.4.1: 4 MiB in 64-byte fragments
TOKEN_ENV = "AUTOBAHN_RELAY_TOKEN"
SUBJECT = "autobahn"
QUICK = (
    "1.*",
    "2.*",
    "3.*",
    "4.*",
    "5.*",
    "6.1.*",
    "7.1.*",
    "7.5.*",
    "7.7.*",
    "9.1.1",
    "10.*",
)
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR")
FAILING = frozenset({"FAILED", "ERROR"})

# pid -> description of every child still to be reaped; killed in main()'s finally.


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- the echo backend and the relay (run as child processes of this script) ----------------------


def serve_echo() -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    logging.basicConfig(level=logging.CRITICAL)  # protocol errors are the point of the suite

    async def echo(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                await ws.send(message)

    async def main() -> None:
        async with serve(
            echo,
            HOST,
            0,
            max_size=MAX_MESSAGE,
            compression=None,
            ping_interval=None,
            close_timeout=10,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            log(f"echo: listening on ws://{HOST}:{port}/")
            await asyncio.Future()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close *writer* (a FIN stays a FIN)."""
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _relay(
    target_port: int,
    header: bytes,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
) -> None:
    upstream_writer: asyncio.StreamWriter | None = None
    try:
        head = await asyncio.wait_for(client_reader.readuntil(b"\r\n\r\n"), 10)
        upstream_reader, upstream_writer = await asyncio.open_connection(HOST, target_port)
        # before the empty line that ends the head; bytes after it are copied as they are
        upstream_writer.write(head[:-2] + header + b"\r\n")
        up = asyncio.ensure_future(_pipe(client_reader, upstream_writer))
        down = asyncio.ensure_future(_pipe(upstream_reader, client_writer))
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        if pending:  # a reset on one side: reset the other, as a direct connection would see
            for task in pending:
                task.cancel()
            client_writer.transport.abort()
            upstream_writer.transport.abort()
        for task in done | pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        client_writer.transport.abort()
    finally:
        for writer in (client_writer, upstream_writer):
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


def serve_relay(target_port: int) -> None:
    token = os.environ[TOKEN_ENV]
    header = f"Authorization: Bearer {token}\r\n".encode()

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _relay(target_port, header, reader, writer)

        server = await asyncio.start_server(handle, HOST, 0, limit=1024 * 1024)
        port = server.sockets[0].getsockname()[1]
        log(f"relay: listening on ws://{HOST}:{port}/ (to port {target_port})")
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when this script dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


Child = bench.Server  # a started child: name, process, port, stderr file


async def start_child(
    name: str, cmd: Sequence[str], stderr: Path, env: dict[str, str] | None = None
) -> Child:
    """Start *cmd* and wait for its "listening on ws://HOST:PORT/" line on stderr."""
    return await bench.start_listener(
        name, list(cmd), stderr, env=env, preexec=_die_with_parent, start_seconds=30
    )


stop_process = bench.stop_process
kill_children = bench.kill_children


def wsguard_command() -> list[str]:
    local = ROOT / ".venv" / "bin" / "wsguard"
    if local.exists():
        return [str(local)]
    found = shutil.which("wsguard")
    return [found] if found else [sys.executable, "-m", "wsguard.cli.main"]


def gateway_config(tmp: Path, secret: str, upstream: str) -> Path:
    """The gateway's policy for the suite: the real one, every limit above what it sends."""
    path = tmp / "wsguard-autobahn.toml"
    path.write_text(
        f"""\
host = "{HOST}"
port = 0
log_level = "warning"
compression = false

[auth]
algorithms = ["HS256"]
secret = "{secret}"

[limits]
max_connections = 10000
connections_per_address = 1000
connections_per_subject = 1000
handshakes_per_minute = 100000
pending_handshakes_per_address = 1000
max_message_bytes = {MAX_MESSAGE}
max_fragments = {MAX_FRAGMENTS}
messages_per_minute = 100000000
message_burst = 10000000
bytes_per_minute = 1000000000000
subject_messages_per_minute = 100000000
subject_bytes_per_minute = 1000000000000
violation_budget = 1000000

[messages]
format = "opaque"
binary = true

[audit]
enabled = true
file = "{tmp / "audit.jsonl"}"

[gateway]
upstream = "{upstream}"
upstream_max_message_bytes = {MAX_MESSAGE}
"""
    )
    return path


def mint_token(secret: str) -> str:
    now = int(time.time())
    claims = {"sub": SUBJECT, "iat": now, "exp": now + 86400}
    return jwt.encode(claims, secret, algorithm="HS256")


# -- the runs -------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    results: dict[str, CaseResult]
    seconds: float

    def counts(self) -> Counter[str]:
        return Counter(r.behavior.value for r in self.results.values())

    def close_counts(self) -> Counter[str]:
        return Counter(r.behavior_close.value for r in self.results.values())


def _case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


async def run_suite(
    name: str, port: int, args: argparse.Namespace, include: list[str] | None, outdir: Path
) -> Run:
    log(f"autobahn: {name}: running kosoku against 127.0.0.1:{port} ...")
    started = time.monotonic()
    try:
        results = await asyncio.wait_for(
            run_fuzzingclient(
                f"{HOST}:{port}", include, args.exclude, concurrency=args.parallelism
            ),
            args.timeout,
        )
    except FailureError as failure:
        results = failure.results
    except TimeoutError:
        raise RuntimeError(f"{name}: the suite did not finish within {args.timeout:g} s") from None
    seconds = time.monotonic() - started
    target = outdir / name
    shutil.rmtree(target, ignore_errors=True)
    write_reports(results, str(target))
    log(f"autobahn: {name}: {len(results)} cases in {seconds:.1f} s, reports in {target}/")
    return Run(name, {r.case_id: r for r in results}, seconds)


def _describe(result: CaseResult | None) -> dict[str, Any]:
    if result is None:
        return {"behavior": "MISSING"}
    return {
        "behavior": result.behavior.value,
        "behaviorClose": result.behavior_close.value,
        "remoteCloseCode": result.remote_close_code,
        "result": result.result,
        "resultClose": result.result_close,
    }


def compare(direct: Run, gateway: Run) -> dict[str, Any]:
    cases = sorted(set(direct.results) | set(gateway.results), key=_case_key)
    added: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    both: list[str] = []
    for case in cases:
        d, g = direct.results.get(case), gateway.results.get(case)
        d_beh = d.behavior.value if d is not None else "MISSING"
        g_beh = g.behavior.value if g is not None else "MISSING"
        d_close = d.behavior_close.value if d is not None else "MISSING"
        g_close = g.behavior_close.value if g is not None else "MISSING"
        entry = {"case": case, "direct": _describe(d), "gateway": _describe(g)}
        if (g_beh in FAILING or g_beh == "MISSING") and d_beh not in FAILING:
            added.append(entry)
        elif g_beh in FAILING:
            both.append(case)
        elif d_beh != g_beh or d_close != g_close:
            changed.append(entry)
    return {
        "cases": len(cases),
        "direct": {
            "seconds": round(direct.seconds, 1),
            "behavior": dict(direct.counts()),
            "behaviorClose": dict(direct.close_counts()),
        },
        "gateway": {
            "seconds": round(gateway.seconds, 1),
            "behavior": dict(gateway.counts()),
            "behaviorClose": dict(gateway.close_counts()),
        },
        "failed_added_by_gateway": added,
        "failed_in_both": both,
        "other_differences": changed,
    }


def _row(label: str, counts: dict[str, int], total: int) -> str:
    known = [f"{counts.get(b, 0):>15}" for b in BEHAVIORS]
    other = sum(v for k, v in counts.items() if k not in BEHAVIORS)
    return f"{label:<8}" + "".join(known) + f"{other:>7}{total:>7}"


def print_summary(summary: dict[str, Any], gateway_notes: list[str]) -> None:
    print()
    print(f"{'':<8}" + "".join(f"{b:>15}" for b in BEHAVIORS) + f"{'other':>7}{'total':>7}")
    for name in ("direct", "gateway"):
        counts = summary[name]["behavior"]
        print(_row(name, counts, sum(counts.values())) + f"   ({summary[name]['seconds']} s)")
    print()
    for name in ("direct", "gateway"):
        closes = ", ".join(f"{k} {v}" for k, v in sorted(summary[name]["behaviorClose"].items()))
        print(f"closing behavior, {name}: {closes}")
    diffs = summary["other_differences"]
    if diffs:
        print(f"\nother differences ({len(diffs)}; not failures):")
        for entry in diffs:
            d, g = entry["direct"], entry["gateway"]
            print(
                f"  {entry['case']:<9} direct {d['behavior']}/{d.get('behaviorClose')} "
                f"(close {d.get('remoteCloseCode')}) -> gateway {g['behavior']}/"
                f"{g.get('behaviorClose')} (close {g.get('remoteCloseCode')})"
            )
    if summary["failed_in_both"]:
        print(f"\nFAILED in both runs: {' '.join(summary['failed_in_both'])}")
    added = summary["failed_added_by_gateway"]
    if added:
        print(f"\nFAILED through the gateway, not directly ({len(added)}):")
        for entry in added:
            d, g = entry["direct"], entry["gateway"]
            print(
                f"  {entry['case']:<9} direct {d['behavior']} -> gateway {g['behavior']} "
                f"(close {g.get('remoteCloseCode')}): {g.get('result')} / {g.get('resultClose')}"
            )
    else:
        print("\nthe gateway adds no FAILED case")
    for note in gateway_notes:
        print(note)


def gateway_notes(tmp: Path, gateway: Child) -> list[str]:
    """What the gateway said: audit events by type and its warnings (to explain a failure)."""
    notes: list[str] = []
    events: Counter[str] = Counter()
    audit = tmp / "audit.jsonl"
    if audit.exists():
        for line in audit.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                events[str(record.get("event", record.get("type", "?")))] += 1
    if events:
        notes.append(
            "gateway audit events: " + ", ".join(f"{k} {v}" for k, v in events.most_common())
        )
    lines = [ln for ln in gateway.stderr.read_text(errors="replace").splitlines() if ln.strip()]
    warnings = [ln for ln in lines if "listening on" not in ln]
    if warnings:
        notes.append(f"gateway stderr ({len(warnings)} lines, last 10):")
        notes.extend(f"  {ln}" for ln in warnings[-10:])
    return notes


async def start_all(
    args: argparse.Namespace, tmp: Path, children: list[Child]
) -> tuple[Child, Child, Child]:
    """The echo backend, the gateway in front of it and the relay in front of the gateway."""
    home = tmp / "home"
    home.mkdir()
    secret = secrets.token_urlsafe(48)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(home)
    env.pop(TOKEN_ENV, None)

    # every child starts before kosoku's threads exist (fork with preexec_fn)
    echo = await start_child(
        "echo backend", [sys.executable, str(SCRIPT), "--serve-echo"], tmp / "echo.stderr", env
    )
    children.append(echo)
    upstream = f"ws://{HOST}:{echo.port}/"
    config = gateway_config(tmp, secret, upstream)
    wsguard = wsguard_command()
    check = await asyncio.create_subprocess_exec(
        *wsguard,
        "check-config",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:
        out, _ = await asyncio.wait_for(check.communicate(), 60)
    finally:
        if check.returncode is None:
            check.kill()
            await check.wait()
    if check.returncode != 0:
        raise RuntimeError(f"gateway config refused:\n{out.decode(errors='replace')}")
    gateway = await start_child(
        "wsguard proxy",
        [*wsguard, "proxy", "--config", str(config), "--port", "0", "--upstream", upstream],
        tmp / "gateway.stderr",
        env,
    )
    children.append(gateway)
    relay = await start_child(
        "relay",
        [sys.executable, str(SCRIPT), "--serve-relay", str(gateway.port)],
        tmp / "relay.stderr",
        {**env, TOKEN_ENV: mint_token(secret)},
    )
    children.append(relay)
    return echo, gateway, relay


async def amain(args: argparse.Namespace) -> int:
    include: list[str] | None = list(args.include or []) or None
    if args.quick:
        include = [*QUICK, *(include or [])]
    outdir: Path = args.outdir
    started = time.monotonic()
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="wsguard-autobahn-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            echo, gateway, relay = await start_all(args, tmp, children)
            log(
                f"autobahn: echo on {echo.port}, wsguard proxy on {gateway.port}, relay on "
                f"{relay.port}; cases: {' '.join(include) if include else 'all'}"
                + (f" except {' '.join(args.exclude)}" if args.exclude else "")
            )
            direct = await run_suite("direct", echo.port, args, include, outdir)
            through = await run_suite("gateway", relay.port, args, include, outdir)
            for child in children:
                if child.proc.returncode is not None:
                    raise RuntimeError(
                        f"{child.name} exited ({child.proc.returncode}) during the run:\n"
                        + text_of(child.stderr)[-4000:]
                    )
        finally:
            for child in reversed(children):
                await stop_process(child.proc, grace=10)
            if args.keep_logs:
                for name in ("audit.jsonl", "gateway.stderr", "echo.stderr", "relay.stderr"):
                    if (tmp / name).exists():
                        shutil.copy(tmp / name, outdir / name)
                if (tmp / "wsguard-autobahn.toml").exists():
                    shutil.copy(tmp / "wsguard-autobahn.toml", outdir / "wsguard-autobahn.toml")
        notes = gateway_notes(tmp, gateway)

    summary = compare(direct, through)
    summary["include"] = include
    summary["exclude"] = args.exclude
    summary["parallelism"] = args.parallelism
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["gateway_notes"] = notes
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, notes)
    print(f"\ntotal {summary['seconds']} s; summary in {outdir / 'summary.json'}")
    return 1 if summary["failed_added_by_gateway"] else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Autobahn conformance (kosoku) directly and through wsguard proxy"
    )
    parser.add_argument(
        "-i",
        "--include",
        action="append",
        metavar="CASE",
        help="case id or `*` glob to run, repeatable (default: the whole suite)",
    )
    parser.add_argument(
        "-x",
        "--exclude",
        action="append",
        metavar="CASE",
        help="case id or `*` glob to leave out, repeatable (default: none)",
    )
    parser.add_argument(
        "-p", "--parallelism", type=int, default=2, help="cases run at once (default 2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a representative subset: {' '.join(QUICK)}"
    )
    parser.add_argument(
        "--outdir",
        type=Path,
        default=ROOT / "artifacts" / "autobahn",
        help="reports and summary.json (default artifacts/autobahn)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds allowed per run (default 900)"
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="copy the gateway's audit log, stderr and config to --outdir",
    )
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallelism < 1:
        parser.error("--parallelism must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    if args.serve_echo:
        serve_echo()
        return 0
    if args.serve_relay is not None:
        serve_relay(args.serve_relay)
        return 0

    args.outdir.mkdir(parents=True, exist_ok=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return asyncio.run(amain(args))
    except RuntimeError as exc:
        log(f"autobahn: {exc}")
        return 2
    except KeyboardInterrupt:
        log("autobahn: interrupted")
        return 130
    finally:
        kill_children()


if __name__ == "__main__":
    sys.exit(main())
