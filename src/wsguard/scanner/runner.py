"""Run the selected checks one after another, each bounded and isolated."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import wsguard
from wsguard.errors import ConfigError
from wsguard.scanner import checks as _checks  # noqa: F401  (registers the checks)
from wsguard.scanner.context import CheckError, Inconclusive, NotApplicable, ScanContext
from wsguard.scanner.credentials import Credentials
from wsguard.scanner.dialect import Dialect
from wsguard.scanner.model import EXAMINED, REGISTRY, Check, Finding, Verdict, finding
from wsguard.scanner.options import ScanOptions, Target, resolve_target
from wsguard.scanner.probe import HostileAnswer

FAIL_ON = {
    "fail": frozenset({Verdict.FAIL}),
    "weak": frozenset({Verdict.FAIL, Verdict.WEAK}),
    "warn": frozenset({Verdict.FAIL, Verdict.WEAK, Verdict.WARN}),
}


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of the endpoint a scan examined, and what would examine the rest."""

    total: int  # checks run
    examined: int  # PASS, FAIL, WEAK, WARN
    absent: tuple[str, ...]  # N/A: the check does not apply to this endpoint
    needs: dict[str, tuple[str, ...]]  # option -> checks that need it (N/A)
    inconclusive: tuple[str, ...]
    errors: tuple[str, ...]

    @property
    def applicable(self) -> int:
        return self.total - len(self.absent)

    @property
    def percent(self) -> float:
        """Examined checks out of those that apply (100 when none does)."""
        return 100.0 if self.applicable == 0 else 100.0 * self.examined / self.applicable

    @property
    def complete(self) -> bool:
        return self.examined == self.applicable

    def describe(self) -> str:
        line = (
            f"coverage {self.percent:.0f}%: examined {self.examined} of the {self.applicable} "
            f"checks that apply"
        )
        if self.absent:
            line += f" ({len(self.absent)} of {self.total} do not apply here)"
        missing = [
            f"{len(ids)} need{'s' if len(ids) == 1 else ''} {option} ({_groups(ids)})"
            for option, ids in sorted(self.needs.items(), key=lambda item: -len(item[1]))
        ]
        if self.inconclusive:
            names = ", ".join(self.inconclusive)
            missing.append(f"{len(self.inconclusive)} INCONCLUSIVE ({names})")
        if self.errors:
            missing.append(f"{len(self.errors)} ERROR ({', '.join(self.errors)})")
        if missing:
            line += "; not examined: " + "; ".join(missing)
        if self.needs:
            options = sorted(self.needs)
            if "--jwt-secret" in options and "--jwt-secret or --token" in options:
                options.remove("--jwt-secret or --token")  # the secret does both
            line += "; pass " + ", ".join(options) + " to examine the rest"
        return line

    def as_dict(self) -> dict[str, object]:
        return {
            "percent": round(self.percent, 1),
            "examined": self.examined,
            "applicable": self.applicable,
            "total": self.total,
            "not_applicable": list(self.absent),
            "needs": {option: list(ids) for option, ids in self.needs.items()},
            "inconclusive": list(self.inconclusive),
            "errors": list(self.errors),
        }


def _groups(ids: tuple[str, ...]) -> str:
    """'auth, origin.lookalike' rather than every id of a group."""
    groups = [REGISTRY[i].group if i in REGISTRY else i for i in ids]
    whole = {g for g in groups if groups.count(g) > 1}
    names = [g if g in whole else i for g, i in zip(groups, ids, strict=True)]
    return ", ".join(dict.fromkeys(names))


@dataclass(slots=True)
class Report:
    target: str
    started: datetime
    aggressive: bool
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    version: str = wsguard.__version__
    protocol: str = ""  # how the scan spoke to the endpoint (scanner.dialect)
    unreachable: str = ""  # why no address of the target accepted a TCP connection

    def coverage(self) -> Coverage:
        needs: dict[str, list[str]] = {}
        for item in self.findings:
            if item.verdict is Verdict.NA and item.needs:
                needs.setdefault(item.needs, []).append(item.check)
        return Coverage(
            total=len(self.findings),
            examined=sum(1 for f in self.findings if f.verdict in EXAMINED),
            absent=tuple(f.check for f in self.findings if f.verdict is Verdict.NA and not f.needs),
            needs={option: tuple(ids) for option, ids in needs.items()},
            inconclusive=tuple(f.check for f in self.findings if f.verdict is Verdict.INCONCLUSIVE),
            errors=tuple(f.check for f in self.findings if f.verdict is Verdict.ERROR),
        )

    def verdict(self, check_id: str) -> Verdict:
        for item in self.findings:
            if item.check == check_id:
                return item.verdict
        raise KeyError(check_id)

    def counts(self) -> dict[str, int]:
        counts = {v.value: 0 for v in Verdict}
        for item in self.findings:
            counts[item.verdict.value] += 1
        return counts

    def failed(self, fail_on: str = "fail") -> bool:
        verdicts = FAIL_ON[fail_on]
        return any(item.verdict in verdicts for item in self.findings)


DISCOVERY_SECONDS = 20.0  # at most, to find how the endpoint can be spoken to

# run order: cheap and harmless first; floods late (they can throttle a whole subject for a
# while); a check that may kill the target (handshake.malformed, order 100) last
GROUPS = (
    "transport",
    "auth",
    "origin",
    "authz",
    "messages",
    "size",
    "lifecycle",
    "handshake",
    "disclosure",
    "limits",
)


def ordered_checks() -> list[Check]:
    position = {check_id: n for n, check_id in enumerate(REGISTRY)}
    return sorted(REGISTRY.values(), key=lambda c: (c.order, GROUPS.index(c.group), position[c.id]))


def select(options: ScanOptions) -> list[Check]:
    known = ordered_checks()
    for key, patterns in (("--checks", options.checks), ("--skip", options.skip)):
        for pattern in patterns:
            probe = ScanOptions(url="", checks=(pattern,))
            if not any(probe.selected(c.id, c.group) for c in known):
                raise ConfigError(
                    key, f"{pattern!r} matches no check (wsguard audit --list-checks)"
                )
    chosen = [c for c in known if options.selected(c.id, c.group)]
    if not chosen:
        raise ConfigError("--checks", "selects no check")
    return chosen


Progress = Callable[[Check, Finding | None], None]


async def run_scan(options: ScanOptions, *, progress: Progress | None = None) -> Report:
    """Scan ``options.url``. Raises ConfigError before any traffic for bad options or a
    non-loopback target without ``i_own_this_target``."""
    chosen = select(options)
    target, unreachable = await _reachable(resolve_target(options), options.connect_timeout)
    credentials = Credentials(options)
    context = ScanContext(options, target, credentials)
    report = Report(target.label, datetime.now(UTC), options.aggressive, unreachable=unreachable)
    began = time.monotonic()
    needs_endpoint = [c for c in chosen if c.group != "transport"]
    if not unreachable and any(options.aggressive or not c.aggressive for c in needs_endpoint):
        report.protocol = (await _discover(context)).describe()
    waits = options.slow_wait + options.idle_wait + options.expiry_wait + options.reset_wait
    for spec in chosen:
        if progress is not None:
            progress(spec, None)
        started = time.monotonic()
        if spec.aggressive and not options.aggressive:
            result = finding(
                spec.id, Verdict.NA, "destructive: runs with --aggressive", needs="--aggressive"
            )
        else:
            result = await _run_one(
                spec,
                context.for_check(spec.id, own_subject=spec.own_subject),
                spec.budget_seconds + waits,
            )
            if unreachable and result.verdict is Verdict.ERROR:
                # every check that needed the endpoint fails the same way: one cause
                result = finding(spec.id, Verdict.ERROR, unreachable, result.evidence)
        result = replace(result, seconds=round(time.monotonic() - started, 3))
        report.findings.append(result)
        if progress is not None:
            progress(spec, result)
    report.seconds = round(time.monotonic() - began, 3)
    return report


async def _discover(context: ScanContext) -> Dialect:
    """The endpoint's dialect; wsguard's own when discovery itself cannot finish."""
    try:
        async with asyncio.timeout(DISCOVERY_SECONDS + 4 * context.options.connect_timeout):
            return await context.discover()
    except (HostileAnswer, OSError, TimeoutError) as exc:
        why = str(exc) if isinstance(exc, HostileAnswer) else type(exc).__name__
        context.dialect = replace(context.dialect, note=f"discovery stopped: {why[:120]}")
        return context.dialect


async def _reachable(target: Target, wait: float) -> tuple[Target, str]:
    """Put first the resolved address that accepts TCP (``localhost`` may resolve to ::1
    first while the server listens on 127.0.0.1 only); with why none does when none does
    (every check's ERROR then names that one cause)."""
    why = ""
    for address in target.addresses:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address, target.uri.port), wait
            )
        except TimeoutError:
            why = f"no answer from {_where(address, target.uri.port)} within {wait:g}s"
            continue
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            why = f"{_where(address, target.uri.port)}: {reason}"
            continue
        writer.close()
        others = tuple(a for a in target.addresses if a != address)
        return replace(target, addresses=(address, *others)), ""
    return target, f"cannot reach the target ({why})" if why else ""


def _where(address: str, port: int | None) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _run_one(spec: Check, ctx: ScanContext, seconds: float) -> Finding:
    """The check's finding; ERROR when the target sent more than the scan takes in during
    the check (what the check saw then is no evidence; its own verdict is a detail)."""
    seen = len(ctx.budget.violations)
    result = await _run_bounded(spec, ctx, seconds)
    hostile = ctx.budget.violations[seen:]
    own = f"the check's own verdict: {result.verdict.value}: {result.evidence}"
    if hostile and spec.group == "size" and ctx.oversized_answers:
        # what a size check sends is over the limit it looks for: an answer over the
        # scan's own limit, once the oversized message was sent, is that message
        # processed (an echo of it, say), accepted
        return finding(
            spec.id,
            Verdict.FAIL,
            f"the target answered the oversized message: {ctx.oversized_answers[0]} — it "
            "was accepted",
            f"the check's own verdict: {result.verdict.value}: {result.evidence}",
            *result.details,
        )
    if hostile and spec.group == "size":
        # before the oversized message went out: the target's own traffic (a big welcome,
        # a snapshot), no answer to the probe; the check could not do its work
        return finding(
            spec.id,
            Verdict.ERROR,
            f"before the oversized message was sent, {hostile[0]} — not an answer to it; "
            "raise --max-message-bytes over the largest message the target sends",
            *([] if result.evidence == hostile[0] else [own]),
            *result.details,
        )
    if hostile and result.evidence != hostile[0]:
        return finding(spec.id, Verdict.ERROR, hostile[0], own, *result.details)
    return result


async def _run_bounded(spec: Check, ctx: ScanContext, seconds: float) -> Finding:
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            return await spec.run(ctx)
    except HostileAnswer as exc:
        return finding(spec.id, Verdict.ERROR, str(exc))
    except NotApplicable as exc:
        return finding(spec.id, Verdict.NA, str(exc), needs=exc.needs)
    except Inconclusive as exc:
        return finding(spec.id, Verdict.INCONCLUSIVE, str(exc))
    except CheckError as exc:
        return finding(spec.id, Verdict.ERROR, str(exc))
    except TimeoutError as exc:
        if limit.expired():
            return finding(spec.id, Verdict.ERROR, f"did not finish within {seconds:g}s")
        return finding(spec.id, Verdict.ERROR, f"timed out: {exc or 'no answer in time'}")
    except OSError as exc:
        return finding(spec.id, Verdict.ERROR, f"network error: {exc.strerror or exc}")
    except Exception as exc:  # a bug in a check must not stop the others
        return finding(spec.id, Verdict.ERROR, f"{type(exc).__name__}: {exc}")
