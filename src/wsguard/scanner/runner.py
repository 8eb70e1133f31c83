"""Run the selected checks one after another, each bounded and isolated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import wsguard
from wsguard.errors import ConfigError
from wsguard.scanner import checks as _checks  # noqa: F401  (registers the checks)
from wsguard.scanner.context import CheckError, NotApplicable, ScanContext
from wsguard.scanner.credentials import Credentials
from wsguard.scanner.model import REGISTRY, Check, Finding, Verdict, finding
from wsguard.scanner.options import ScanOptions, Target, resolve_target
from wsguard.scanner.probe import HostileAnswer

FAIL_ON = {
    "fail": frozenset({Verdict.FAIL}),
    "weak": frozenset({Verdict.FAIL, Verdict.WEAK}),
    "warn": frozenset({Verdict.FAIL, Verdict.WEAK, Verdict.WARN}),
}


@dataclass(slots=True)
class Report:
    target: str
    started: datetime
    aggressive: bool
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    version: str = wsguard.__version__

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


# run order: cheap and harmless first; floods late (they can throttle a whole subject for a
# while); a check that may kill the target (handshake.malformed, order 100) last
GROUPS = (
    "transport",
    "auth",
    "origin",
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
            if not any(probe.selected(c.id) for c in known):
                raise ConfigError(
                    key, f"{pattern!r} matches no check (wsguard audit --list-checks)"
                )
    chosen = [c for c in known if options.selected(c.id)]
    if not chosen:
        raise ConfigError("--checks", "selects no check")
    return chosen


Progress = Callable[[Check, Finding | None], None]


async def run_scan(options: ScanOptions, *, progress: Progress | None = None) -> Report:
    """Scan ``options.url``. Raises ConfigError before any traffic for bad options or a
    non-loopback target without ``i_own_this_target``."""
    chosen = select(options)
    target = await _reachable(resolve_target(options), options.connect_timeout)
    credentials = Credentials(options)
    context = ScanContext(options, target, credentials)
    report = Report(target.label, datetime.now(UTC), options.aggressive)
    began = time.monotonic()
    waits = options.slow_wait + options.idle_wait + options.expiry_wait + options.reset_wait
    for spec in chosen:
        if progress is not None:
            progress(spec, None)
        started = time.monotonic()
        if spec.aggressive and not options.aggressive:
            result = finding(spec.id, Verdict.NA, "destructive: runs with --aggressive")
        else:
            result = await _run_one(
                spec,
                context.for_check(spec.id, own_subject=spec.own_subject),
                spec.budget_seconds + waits,
            )
        result = replace(result, seconds=round(time.monotonic() - started, 3))
        report.findings.append(result)
        if progress is not None:
            progress(spec, result)
    report.seconds = round(time.monotonic() - began, 3)
    return report


async def _reachable(target: Target, wait: float) -> Target:
    """Put first the resolved address that accepts TCP (``localhost`` may resolve to ::1
    first while the server listens on 127.0.0.1 only); unchanged if none does."""
    if len(target.addresses) == 1:
        return target
    for address in target.addresses:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address, target.uri.port), wait
            )
        except (OSError, TimeoutError):
            continue
        writer.close()
        others = tuple(a for a in target.addresses if a != address)
        return replace(target, addresses=(address, *others))
    return target


async def _run_one(spec: Check, ctx: ScanContext, seconds: float) -> Finding:
    """The check's finding; ERROR when the target sent more than the scan takes in during
    the check (what the check saw then is no evidence; its own verdict is a detail)."""
    seen = len(ctx.budget.violations)
    result = await _run_bounded(spec, ctx, seconds)
    hostile = ctx.budget.violations[seen:]
    if hostile and result.evidence != hostile[0]:
        own = f"the check's own verdict: {result.verdict.value}: {result.evidence}"
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
        return finding(spec.id, Verdict.NA, str(exc))
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
