"""What a scan produces: verdicts, findings and the registry of checks."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsguard.scanner.context import ScanContext


class Verdict(enum.StrEnum):
    PASS = "PASS"  # the protection holds
    FAIL = "FAIL"  # the protection is missing: exploitable as it stands
    WEAK = "WEAK"  # present but late or partial (e.g. refused after the upgrade)
    WARN = "WARN"  # worth a look; not a flaw on its own
    NA = "N/A"  # does not apply, or needs an option the scan was not given
    INCONCLUSIVE = "INCONCLUSIVE"  # ran, but the target's behaviour left nothing to judge
    ERROR = "ERROR"  # the check itself could not run (unreachable target, timeout)


# verdicts that mean the check examined the endpoint (the coverage counts them)
EXAMINED = frozenset({Verdict.PASS, Verdict.FAIL, Verdict.WEAK, Verdict.WARN})


# how a problem verdict reads in SARIF
SEVERITY = {
    Verdict.FAIL: "error",
    Verdict.WEAK: "warning",
    Verdict.WARN: "note",
}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # stable check id, e.g. "auth.alg_none"
    verdict: Verdict
    evidence: str  # one line: what was sent and what came back
    details: tuple[str, ...] = ()  # further lines (per-variant results)
    seconds: float = 0.0
    needs: str = ""  # N/A only: the option that would let the check run ("" : does not apply)


CheckFunction = Callable[["ScanContext"], Awaitable[Finding]]


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    title: str
    group: str  # transport, auth, origin, messages, limits, lifecycle, handshake, disclosure
    references: tuple[str, ...]  # OWASP cheat sheet / ASVS 5.0 / RFC sections
    remedy: str
    run: CheckFunction
    aggressive: bool = False  # floods, big messages, malformed handshakes
    budget_seconds: float = 60.0  # hard cap on the check's run time
    order: int = field(default=0)  # run order: destructive and server-killing checks last
    own_subject: bool = True  # minted tokens get a per-check subject (see Credentials)


REGISTRY: dict[str, Check] = {}


def check(
    id: str,
    title: str,
    *,
    group: str,
    references: tuple[str, ...],
    remedy: str,
    aggressive: bool = False,
    budget_seconds: float = 60.0,
    order: int = 0,
    own_subject: bool = True,
) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check function under a stable id."""

    def register(function: CheckFunction) -> CheckFunction:
        if id in REGISTRY:
            raise ValueError(f"check {id!r} registered twice")
        REGISTRY[id] = Check(
            id=id,
            title=title,
            group=group,
            references=references,
            remedy=remedy,
            run=function,
            aggressive=aggressive,
            budget_seconds=budget_seconds,
            order=order,
            own_subject=own_subject,
        )
        return function

    return register


def finding(
    check_id: str, verdict: Verdict, evidence: str, *details: str, needs: str = ""
) -> Finding:
    return Finding(
        check=check_id,
        verdict=verdict,
        evidence=printable(evidence),
        details=tuple(printable(line) for line in details),
        needs=needs,
    )


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """Text from the target is data: control characters are shown escaped, never sent to a
    terminal or into XML raw."""
    return text.translate(_CONTROL)


OWASP = "OWASP WebSocket Security Cheat Sheet"
