"""Scan reports: a terminal table, JSON, SARIF 2.1.0 and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from wsguard.scanner.model import REGISTRY, SEVERITY, Verdict
from wsguard.scanner.runner import FAIL_ON, Report

COLOURS = {
    Verdict.PASS: "green",
    Verdict.FAIL: "bold red",
    Verdict.WEAK: "yellow",
    Verdict.WARN: "yellow",
    Verdict.NA: "dim",
    Verdict.INCONCLUSIVE: "cyan",
    Verdict.ERROR: "magenta",
}
INFO_URI = "https://github.com/wsguard/wsguard#security-scanner-wsguard-audit"
#: verdicts whose fix the table shows with --verbose
_PROBLEMS = frozenset({Verdict.FAIL, Verdict.WEAK, Verdict.WARN})


def summary(report: Report) -> str:
    """Three lines: the counts, how the endpoint was spoken to, and the coverage."""
    counts = ", ".join(f"{n} {v}" for v, n in report.counts().items() if n)
    lines = [f"{report.target}: {len(report.findings)} checks in {report.seconds:.1f}s — {counts}"]
    if report.protocol:
        lines.append(f"protocol: {report.protocol}")
    lines.append(report.coverage().describe())
    return "\n".join(lines)


def table(report: Report, *, verbose: bool = False) -> Any:
    """The report as a rich Table (colours when printed to a terminal)."""
    from rich.table import Table

    grid = Table(title=f"wsguard audit {report.target}", title_justify="left", expand=False)
    grid.add_column("check", no_wrap=True)
    grid.add_column("verdict", no_wrap=True)
    grid.add_column("evidence", overflow="fold")
    unreachable = report.unreachable or None
    for item in report.findings:
        if item.evidence == unreachable and not verbose:
            continue  # one row below for all of them
        evidence = escape(item.evidence)
        if verbose and item.details:
            evidence += "".join(f"\n  · {escape(line)}" for line in item.details)
        if verbose and item.verdict in _PROBLEMS and item.check in REGISTRY:
            evidence += f"\n  fix: {escape(REGISTRY[item.check].remedy)}"
        grid.add_row(item.check, f"[{COLOURS[item.verdict]}]{item.verdict.value}[/]", evidence)
    same = [item.check for item in report.findings if item.evidence == unreachable]
    if same and not verbose:
        colour = COLOURS[Verdict.ERROR]
        grid.add_row(f"{len(same)} checks", f"[{colour}]ERROR[/]", escape(str(unreachable)))
    return grid


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def render_table(report: Report, *, verbose: bool = False, width: int = 120) -> str:
    from rich.console import Console

    console = Console(width=width, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(table(report, verbose=verbose))
        console.print(summary(report), highlight=False, markup=False)
    return capture.get()


def to_json(report: Report) -> dict[str, Any]:
    return {
        "tool": "wsguard audit",
        "version": report.version,
        "target": report.target,
        "started": report.started.isoformat(),
        "seconds": report.seconds,
        "aggressive": report.aggressive,
        "summary": report.counts(),
        "protocol": report.protocol,
        "unreachable": report.unreachable or None,
        "coverage": report.coverage().as_dict(),
        "findings": [
            {
                "check": item.check,
                "title": REGISTRY[item.check].title,
                "group": REGISTRY[item.check].group,
                "verdict": item.verdict.value,
                "evidence": item.evidence,
                "details": list(item.details),
                "references": list(REGISTRY[item.check].references),
                "remedy": REGISTRY[item.check].remedy,
                "seconds": item.seconds,
                **({"needs": item.needs} if item.needs else {}),
            }
            for item in report.findings
        ],
    }


def to_sarif(report: Report) -> dict[str, Any]:
    """SARIF 2.1.0 for code-scanning tools: every check is a rule; only problems (FAIL,
    WEAK, WARN) are results, with kind "fail" and a level; checks that could not run are
    tool execution notifications. PASS and N/A stay out (code scanning shows every result
    as an alert), and are in the JSON and JUnit reports."""
    ids = list(REGISTRY)
    rules = [
        {
            "id": check_id,
            "name": check_id.replace(".", "_"),
            "shortDescription": {"text": REGISTRY[check_id].title},
            "help": {"text": REGISTRY[check_id].remedy},
            "properties": {
                "tags": ["security", "websocket", REGISTRY[check_id].group],
                "references": list(REGISTRY[check_id].references),
            },
        }
        for check_id in ids
    ]
    index = {check_id: n for n, check_id in enumerate(ids)}
    results = [
        {
            "ruleId": item.check,
            "ruleIndex": index[item.check],
            "kind": "fail",
            "level": SEVERITY[item.verdict],
            "message": {"text": f"{item.verdict.value}: {item.evidence}"},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": report.target}}}],
            "properties": {"verdict": item.verdict.value, "details": list(item.details)},
        }
        for item in report.findings
        if item.verdict in SEVERITY
    ]
    notifications = [
        {
            "level": "error" if item.verdict is Verdict.ERROR else "warning",
            "message": {"text": f"{item.check}: {item.verdict.value}: {item.evidence}"},
            "descriptor": {"id": item.check},
        }
        for item in report.findings
        if item.verdict in (Verdict.ERROR, Verdict.INCONCLUSIVE)
    ]
    errors = [n for n in notifications if n["level"] == "error"]
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "wsguard audit",
                        "version": report.version,
                        "informationUri": INFO_URI,
                        "rules": rules,
                    }
                },
                "invocations": [
                    {
                        "executionSuccessful": not errors,
                        "startTimeUtc": report.started.isoformat().replace("+00:00", "Z"),
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "results": results,
            }
        ],
    }


def to_junit(report: Report, fail_on: str = "fail") -> str:
    failing = FAIL_ON[fail_on]
    counts = report.counts()
    suite = ET.Element(
        "testsuite",
        name=f"wsguard audit {report.target}",
        tests=str(len(report.findings)),
        failures=str(sum(1 for f in report.findings if f.verdict in failing)),
        errors=str(counts[Verdict.ERROR.value]),
        skipped=str(counts[Verdict.NA.value] + counts[Verdict.INCONCLUSIVE.value]),
        time=f"{report.seconds:.3f}",
        timestamp=report.started.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    for item in report.findings:
        spec = REGISTRY[item.check]
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"wsguard.audit.{spec.group}",
            name=f"{item.check}: {spec.title}",
            time=f"{item.seconds:.3f}",
        )
        text = "\n".join((item.evidence, *item.details, f"remedy: {spec.remedy}"))
        if item.verdict in failing:
            node = ET.SubElement(case, "failure", message=item.evidence, type=item.verdict.value)
            node.text = text
        elif item.verdict is Verdict.ERROR:
            node = ET.SubElement(case, "error", message=item.evidence, type="ERROR")
            node.text = text
        elif item.verdict is Verdict.NA:
            ET.SubElement(case, "skipped", message=item.evidence)
        elif item.verdict is Verdict.INCONCLUSIVE:
            ET.SubElement(case, "skipped", message=f"INCONCLUSIVE: {item.evidence}")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{item.verdict.value}: {text}"
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render(report: Report, fmt: str, *, fail_on: str = "fail", verbose: bool = False) -> str:
    if fmt == "json":
        return json.dumps(to_json(report), indent=2) + "\n"
    if fmt == "sarif":
        return json.dumps(to_sarif(report), indent=2) + "\n"
    if fmt == "junit":
        return to_junit(report, fail_on)
    return render_table(report, verbose=verbose)
