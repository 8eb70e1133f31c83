"""WebSocket conformance: the Autobahn fuzzing client against wsguard, on every way of
running it, each with no FAILED case outside a short, documented allow-list.

Run from the repository root (needs ``pip install kosoku``, in the test extras):

    .venv/bin/python benchmarks/autobahn.py                 # the whole suite, every run
    .venv/bin/python benchmarks/autobahn.py --quick         # a representative subset
    .venv/bin/python benchmarks/autobahn.py --runs picows,websockets -i '9.*' -x '9.1.6'

The fuzzing client is ``kosoku`` (PyPI), which drives the Autobahn TestSuite's own case files
on Python 3. Every process listens on 127.0.0.1 only. The runs (``--runs``, default all):

* ``direct``: kosoku -> a plain ``websockets`` echo server (this script, ``--serve-echo``; no
  wsguard): the baseline the gateway is compared with;
* ``gateway``: kosoku -> relay -> ``wsguard proxy`` -> that echo server;
* ``picows`` and ``websockets``: kosoku -> relay -> ``examples/echo_server.py --engine
  picows|websockets`` (the standalone server, ``App`` with an ``on_message`` echo);
* ``asgi``: kosoku -> relay -> ``examples/echo_asgi.py`` (``WsGuardMiddleware`` in front of a
  Starlette echo under uvicorn with ``wsproto``).

The echo servers run with ``examples/echo.toml`` (``messages.format = "opaque"``, binary
allowed, 64 MiB messages, rates and queues above what the suite sends), the gateway with the
same limits (a config written to a temporary directory). Authentication stays on: an HS256
key file is made for the run (``WSGUARD_AUTH__SECRET_FILE``) and ``wsguard token --config
examples/echo.toml`` mints the token. kosoku cannot send headers, so a relay (this script,
``--serve-relay``) inserts ``Authorization: Bearer <token>`` into the client's upgrade request
and from then on copies bytes both ways untouched (half-closes included): no frame is parsed
or changed, so what is measured is wsguard's own conformance.

Verdicts. A case fails when its behavior or its closing behavior is FAILED or ERROR (or it is
missing from a run). For ``picows``, ``websockets`` and ``asgi`` every failed case must be in
:data:`ALLOWED`, which may only name (a) a case that fails because of a deliberate,
configurable security limit, or (b) a case that picows' own parser makes fail and the adapter
cannot fix; each entry names the case and why. For ``gateway`` the backend's own failures
are not the gateway's: it must fail no case that ``direct`` passes. The script prints the
count of cases per behavior for every run and every failed case, writes kosoku's reports to
``artifacts/autobahn/<run>/`` (index.html, index.json, one JSON and HTML file per case) and
everything to ``artifacts/autobahn/summary.json``, and exits 1 when a run has a failed case
that is not allowed (2 when a run could not be completed). Each run is bounded by
``--timeout``; children are killed at exit (and die with this process).

Known differences that are not failures: 12.* and 13.* (permessage-deflate) are
UNIMPLEMENTED everywhere (``compression = false``); a few "fail fast" cases (3.*, 4.*, 5.15,
6.4.*) are NON-STRICT (the echo of the message sent before the bad frame may be lost), and
one of 4.1.3-4.2.5 can go from OK to NON-STRICT depending on timing.
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
ECHO_CONFIG = ROOT / "examples" / "echo.toml"
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
    "7.9.1",
    "7.9.5",
    "9.1.1",
    "9.3.1",
    "10.*",
)
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR")
FAILING = frozenset({"FAILED", "ERROR", "MISSING"})
#: Every run, in the order they are made. ``direct`` is not wsguard: the gateway's baseline.
RUNS = ("direct", "gateway", "picows", "websockets", "asgi")
#: The runs judged against the allow-list (the gateway is judged against ``direct``).
JUDGED = ("picows", "websockets", "asgi")


@dataclass(frozen=True)
class Allowed:
    """A failed case a run may have, and why."""

    runs: tuple[str, ...]
    reason: str


#: Failed cases allowed per run. Only (a) a case that fails because of a deliberate,
#: configurable security limit, or (b) a case that picows' own parser makes fail and the
#: adapter cannot fix. Keyed by case number; docs/topics/engines.md (Conformance) lists the same.
ALLOWED: dict[str, Allowed] = {}


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


def gateway_config(tmp: Path, key_file: Path, upstream: str) -> Path:
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
secret_file = "{key_file}"

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
outbound_queue = 100000

[messages]
format = "opaque"
binary = true

[audit]
enabled = true
file = "{tmp / "audit-gateway.jsonl"}"

[gateway]
upstream = "{upstream}"
upstream_max_message_bytes = {MAX_MESSAGE}
"""
    )
    return path


async def run_command(cmd: Sequence[str], env: dict[str, str], what: str) -> str:
    """Run *cmd* to completion (bounded); its output, or RuntimeError naming *what*."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err.decode(errors='replace')}")
    return out.decode()


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


def fails(result: CaseResult | None) -> bool:
    return (
        result is None or result.behavior.value in FAILING or result.behavior_close.value in FAILING
    )


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


def judge(run: Run, cases: list[str]) -> dict[str, Any]:
    """A run's counts and failed cases, each marked allowed (with the reason) or not."""
    failed: list[dict[str, Any]] = []
    for case in cases:
        result = run.results.get(case)
        if not fails(result):
            continue
        allowed = ALLOWED.get(case)
        reason = allowed.reason if allowed is not None and run.name in allowed.runs else None
        failed.append({"case": case, **_describe(result), "allowed": reason})
    judged: dict[str, Any] = {
        "seconds": round(run.seconds, 1),
        "cases": len(run.results),
        "behavior": dict(run.counts()),
        "behaviorClose": dict(run.close_counts()),
        "failed": failed,
    }
    if run.name in JUDGED:
        judged["not_allowed"] = [f["case"] for f in failed if f["allowed"] is None]
    return judged


def compare(direct: Run, gateway: Run, cases: list[str]) -> dict[str, Any]:
    """What the gateway changes: failed cases it adds, and other differences."""
    added: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    both: list[str] = []
    for case in cases:
        d, g = direct.results.get(case), gateway.results.get(case)
        entry: dict[str, Any] = {"case": case, "direct": _describe(d), "gateway": _describe(g)}
        if fails(g) and not fails(d):
            added.append(entry)
        elif fails(g):
            both.append(case)
        elif entry["direct"]["behavior"] != entry["gateway"]["behavior"] or entry["direct"].get(
            "behaviorClose"
        ) != entry["gateway"].get("behaviorClose"):
            changed.append(entry)
    return {"failed_added_by_gateway": added, "failed_in_both": both, "other_differences": changed}


def _row(label: str, counts: dict[str, int], total: int) -> str:
    known = [f"{counts.get(b, 0):>15}" for b in BEHAVIORS]
    other = sum(v for k, v in counts.items() if k not in BEHAVIORS)
    return f"{label:<11}" + "".join(known) + f"{other:>7}{total:>7}"


def print_summary(summary: dict[str, Any]) -> None:
    runs: dict[str, Any] = summary["runs"]
    print()
    print(f"{'':<11}" + "".join(f"{b:>15}" for b in BEHAVIORS) + f"{'other':>7}{'total':>7}")
    for name, run in runs.items():
        counts = run["behavior"]
        print(_row(name, counts, sum(counts.values())) + f"   ({run['seconds']} s)")
    print()
    for name, run in runs.items():
        closes = ", ".join(f"{k} {v}" for k, v in sorted(run["behaviorClose"].items()))
        print(f"closing behavior, {name}: {closes}")
    for name, run in runs.items():
        failed = run["failed"]
        print(f"\n{name}: {len(failed)} failed case(s)" + (":" if failed else ""))
        for f in failed:
            if "not_allowed" not in run:  # direct (not wsguard), gateway (against direct)
                verdict = ""
            else:
                verdict = f" allowed: {f['allowed']}" if f["allowed"] else " NOT ALLOWED"
            print(
                f"  {f['case']:<9} {f['behavior']}/{f.get('behaviorClose')} "
                f"(close {f.get('remoteCloseCode')}){verdict}"
            )
            if not f["allowed"]:
                print(f"            {f.get('result')} / {f.get('resultClose')}")
    gateway = summary.get("gateway_comparison")
    if gateway is not None:
        diffs = gateway["other_differences"]
        if diffs:
            print(f"\ngateway: other differences from direct ({len(diffs)}; not failures):")
            for entry in diffs:
                d, g = entry["direct"], entry["gateway"]
                print(
                    f"  {entry['case']:<9} direct {d['behavior']}/{d.get('behaviorClose')} "
                    f"(close {d.get('remoteCloseCode')}) -> gateway {g['behavior']}/"
                    f"{g.get('behaviorClose')} (close {g.get('remoteCloseCode')})"
                )
        if gateway["failed_in_both"]:
            print(
                "\nfailed directly too (the backend's, not the gateway's): "
                + " ".join(gateway["failed_in_both"])
            )
        added = gateway["failed_added_by_gateway"]
        if added:
            print(f"\nFAILED through the gateway, not directly ({len(added)}):")
            for entry in added:
                d, g = entry["direct"], entry["gateway"]
                print(
                    f"  {entry['case']:<9} direct {d['behavior']} -> gateway {g['behavior']} "
                    f"(close {g.get('remoteCloseCode')}): {g.get('result')} / "
                    f"{g.get('resultClose')}"
                )
        else:
            print("\nthe gateway adds no failed case")
    for name, notes in summary["notes"].items():
        if notes:
            print(f"\n{name}:")
            for note in notes:
                print(f"  {note}")
    print()
    for line in summary["verdicts"]:
        print(line)


def child_notes(audit: Path, child: Child) -> list[str]:
    """What a wsguard process said: audit events by type, the causes of the closes it
    made, and its stderr (to explain a failure)."""
    notes: list[str] = []
    events: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for line in text_of(audit).splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            event = str(record.get("event", "?"))
            events[event] += 1
            if event == "connection_closed" and record.get("cause"):
                causes[f"{record.get('code')} {record['cause']}"] += 1
    if events:
        notes.append("audit events: " + ", ".join(f"{k} {v}" for k, v in events.most_common()))
    if causes:
        notes.append("closed by wsguard: " + ", ".join(f"{k} ({v})" for k, v in causes.items()))
    lines = [ln for ln in text_of(child.stderr).splitlines() if ln.strip()]
    warnings = [ln for ln in lines if "listening on" not in ln]
    if warnings:
        notes.append(f"stderr ({len(warnings)} lines, last 10):")
        notes.extend(f"  {ln}" for ln in warnings[-10:])
    return notes


def echo_command(run: str) -> list[str]:
    """The wsguard echo server of *run*, on the conformance configuration."""
    config = ["--config", str(ECHO_CONFIG), "--port", "0", "--host", HOST]
    if run == "asgi":
        # uvicorn's wsproto: its websockets-sansio fails 7.1.5 (websockets' own parser
        # answers a close frame between two fragments with 1002), with or without wsguard
        ws = ["--ws", "wsproto"]
        return [sys.executable, str(ROOT / "examples" / "echo_asgi.py"), *ws, *config]
    return [sys.executable, str(ROOT / "examples" / "echo_server.py"), "--engine", run, *config]


@dataclass
class Started:
    targets: dict[str, Child]  # run -> what kosoku connects to (the echo, or a relay)
    servers: dict[str, Child]  # run -> the server under test (for its notes)


async def start_all(runs: Sequence[str], tmp: Path, children: list[Child]) -> Started:
    """The servers of *runs*, and a relay in front of every wsguard one."""
    home = tmp / "home"
    home.mkdir()
    key_file = tmp / "hs256.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGUARD_")}
    env["HOME"] = str(home)
    env.pop(TOKEN_ENV, None)
    env["WSGUARD_AUTH__SECRET_FILE"] = str(key_file)

    async def start(name: str, cmd: list[str], extra: dict[str, str] | None = None) -> Child:
        child = await start_child(name, cmd, tmp / f"{name}.stderr", {**env, **(extra or {})})
        children.append(child)
        return child

    # every child starts before kosoku's threads exist (fork with preexec_fn)
    servers: dict[str, Child] = {}
    targets: dict[str, Child] = {}
    starting: dict[str, Any] = {}
    if "direct" in runs or "gateway" in runs:
        starting["direct"] = start("echo", [sys.executable, str(SCRIPT), "--serve-echo"])
    for run in runs:
        if run in JUDGED:
            audit = {"WSGUARD_AUDIT__FILE": str(tmp / f"audit-{run}.jsonl")}
            starting[run] = start(f"{run} echo", echo_command(run), audit)
    for run, child in zip(starting, await asyncio.gather(*starting.values()), strict=True):
        servers[run] = child
    if "direct" in runs:
        targets["direct"] = servers["direct"]
    wsguard = wsguard_command()
    if "gateway" in runs:
        upstream = f"ws://{HOST}:{servers['direct'].port}/"
        config = gateway_config(tmp, key_file, upstream)
        await run_command([*wsguard, "check-config", "--config", str(config)], env, "check-config")
        servers["gateway"] = await start(
            "wsguard proxy",
            [*wsguard, "proxy", "--config", str(config), "--port", "0", "--upstream", upstream],
        )
    token = (
        await run_command(
            [*wsguard, "token", "--config", str(ECHO_CONFIG), "--sub", SUBJECT, "--ttl", "1d"],
            env,
            "wsguard token",
        )
    ).strip()
    relays = [run for run in runs if run != "direct"]
    started = await asyncio.gather(
        *(
            start(
                f"relay-{run}",
                [sys.executable, str(SCRIPT), "--serve-relay", str(servers[run].port)],
                {TOKEN_ENV: token},
            )
            for run in relays
        )
    )
    targets.update(zip(relays, started, strict=True))
    return Started(targets, servers)


def keep_logs(tmp: Path, outdir: Path) -> None:
    for path in tmp.iterdir():
        if path.suffix in (".jsonl", ".stderr", ".toml"):
            shutil.copy(path, outdir / path.name)


def selected_runs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown run {', '.join(unknown) or '(none)'}; choose from {', '.join(RUNS)}"
        )
    if "gateway" in names and "direct" not in names:
        names.append("direct")  # the gateway is judged against it
    return [n for n in RUNS if n in names]


async def amain(args: argparse.Namespace) -> int:
    include: list[str] | None = list(args.include or []) or None
    if args.quick:
        include = [*QUICK, *(include or [])]
    runs: list[str] = args.runs
    outdir: Path = args.outdir
    started = time.monotonic()
    children: list[Child] = []
    results: dict[str, Run] = {}
    notes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="wsguard-autobahn-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            up = await start_all(runs, tmp, children)
            log(
                "autobahn: "
                + ", ".join(f"{run} on {child.port}" for run, child in up.targets.items())
                + f"; cases: {' '.join(include) if include else 'all'}"
                + (f" except {' '.join(args.exclude)}" if args.exclude else "")
            )
            for run in runs:
                results[run] = await run_suite(run, up.targets[run].port, args, include, outdir)
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
                keep_logs(tmp, outdir)
        for run, server in up.servers.items():
            if run != "direct":
                notes[run] = child_notes(tmp / f"audit-{run}.jsonl", server)

    cases = sorted({c for run in results.values() for c in run.results}, key=_case_key)
    summary: dict[str, Any] = {
        "cases": len(cases),
        "include": include,
        "exclude": args.exclude,
        "parallelism": args.parallelism,
        "runs": {name: judge(run, cases) for name, run in results.items()},
        "allow_list": {
            case: {"runs": list(a.runs), "reason": a.reason} for case, a in ALLOWED.items()
        },
        "notes": notes,
    }
    verdicts: list[str] = []
    failing = False
    for name in runs:
        if name not in JUDGED:
            continue
        judged = summary["runs"][name]
        bad = judged["not_allowed"]
        allowed = len(judged["failed"]) - len(bad)
        failing = failing or bool(bad)
        verdicts.append(
            f"{name}: "
            + (
                f"{len(bad)} failed case(s) not allowed: {' '.join(bad)}"
                if bad
                else "no failed case"
            )
            + (f" ({allowed} allowed)" if allowed else "")
        )
    if "gateway" in results:
        comparison = compare(results["direct"], results["gateway"], cases)
        summary["gateway_comparison"] = comparison
        summary["failed_added_by_gateway"] = comparison["failed_added_by_gateway"]
        added = [e["case"] for e in comparison["failed_added_by_gateway"]]
        failing = failing or bool(added)
        verdicts.append(
            "gateway: "
            + (
                f"fails {len(added)} case(s) direct passes: {' '.join(added)}"
                if added
                else "no failed case that direct passes"
            )
        )
    summary["verdicts"] = verdicts
    summary["seconds"] = round(time.monotonic() - started, 1)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\ntotal {summary['seconds']} s; summary in {outdir / 'summary.json'}")
    return 1 if failing else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Autobahn conformance (kosoku) of wsguard: echo servers on each engine, "
        "the ASGI middleware and the gateway"
    )
    parser.add_argument(
        "--runs",
        type=selected_runs,
        default=list(RUNS),
        metavar="RUN[,RUN]",
        help=f"which runs, comma-separated (default all: {','.join(RUNS)}; gateway adds direct)",
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
        help="copy the servers' audit logs, stderr and the gateway's config to --outdir",
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
