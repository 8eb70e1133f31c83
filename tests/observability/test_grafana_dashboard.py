"""examples/grafana-dashboard.json only queries metrics and labels a live server exposes.

A real server with the admin listener is scraped on GET /metrics. Every
``wsguard_*`` name in the dashboard's queries must be a sample name of that
scrape (what Prometheus stores: counters with ``_total``, the histogram as
``_bucket``/``_sum``/``_count``; a bare counter family name is not a series).
Every label in a ``by (...)`` clause or a ``{label="value"}`` matcher must be
a label of that metric, and an exact matcher's value one the server reports.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, ServerFactory, admin_overrides
from support.paths import EXAMPLES

DASHBOARD = EXAMPLES / "grafana-dashboard.json"

METRIC = re.compile(r"\bwsguard_[A-Za-z0-9_]+")
BY = re.compile(r"\bby\s*\(([^()]*)\)")
SELECTOR = re.compile(r"\b(wsguard_[A-Za-z0-9_]+)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
#: Target labels Prometheus adds at scrape time; the exposition never has them.
TARGET_LABELS = frozenset({"instance", "job"})


class Scrape:
    """Names and labels of one /metrics exposition."""

    def __init__(self, text: str) -> None:
        self.families: set[str] = set()
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = {}
        self.values: dict[tuple[str, str], set[str]] = {}
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.names.add(sample.name)
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    self.values.setdefault((sample.name, label), set()).add(value)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and templating queries."""
    exprs = [
        str(target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        exprs.append(str(query["query"] if isinstance(query, dict) else query))
    return exprs


def balanced(expr: str, start: int, step: int) -> str:
    """The parenthesised group that opens (step 1) or closes (step -1) at *start*."""
    opening, closing = ("(", ")") if step == 1 else (")", "(")
    assert expr[start] == opening, (expr, start)
    depth = 0
    index = start
    while 0 <= index < len(expr):
        if expr[index] == opening:
            depth += 1
        elif expr[index] == closing:
            depth -= 1
            if depth == 0:
                low, high = sorted((start, index))
                return expr[low : high + 1]
        index += step
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def grouping_clauses(expr: str) -> list[tuple[list[str], str]]:
    """(labels, aggregated expression) of each ``by (...)``, prefix or postfix form."""
    out: list[tuple[list[str], str]] = []
    for match in BY.finditer(expr):
        labels = [name.strip() for name in match.group(1).split(",") if name.strip()]
        after = expr[match.end() :].lstrip()
        if after.startswith("("):  # sum by (a) (inner)
            inner = balanced(expr, len(expr) - len(after), 1)
        else:  # sum(inner) by (a)
            before = expr[: match.start()].rstrip()
            assert before.endswith(")"), f"cannot tell what {match.group(0)!r} groups: {expr}"
            inner = balanced(expr, len(before) - 1, -1)
        out.append((labels, inner))
    return out


def scrape_with_traffic(server: RunningServer) -> Scrape:
    """Scrape after one connection closed, so the close-code counter has samples."""
    with server.connect_welcomed() as ws:
        ws.close()

    def get() -> Scrape:
        response = httpx.get(server.admin_url + "/metrics", timeout=5)
        assert response.status_code == 200, response.text
        return Scrape(response.text)

    scrapes: list[Scrape] = []

    def closed_counted() -> bool:
        scrapes.append(get())
        return "wsguard_connections_closed_total" in scrapes[-1].names

    eventually(closed_counted)
    return scrapes[-1]


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "wsguard security"
    assert dashboard["uid"] == "wsguard-security"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["id"] is None
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    instance = variables["instance"]
    assert instance["query"]["query"] == "label_values(wsguard_connections_active, instance)"
    assert instance["datasource"]["uid"] == "${DS_PROMETHEUS}"

    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert METRIC.search(target["expr"]), target["expr"]
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_only_metrics_and_labels_the_server_exposes(
    server_factory: ServerFactory,
) -> None:
    dashboard = load_dashboard()
    exprs = dashboard_exprs(dashboard)
    scrape = scrape_with_traffic(server_factory(admin_overrides()))

    referenced = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(referenced) >= 15
    missing = sorted(referenced - scrape.names)
    assert not missing, (
        f"the dashboard queries series /metrics does not expose: {missing} "
        f"(families exposed: {sorted(scrape.families)})"
    )

    for expr in exprs:
        for labels, inner in grouping_clauses(expr):
            metrics = METRIC.findall(inner)
            assert metrics, f"no wsguard metric under {labels} in {expr}"
            for metric in metrics:
                unknown = sorted(set(labels) - scrape.labels.get(metric, set()) - TARGET_LABELS)
                assert not unknown, f"{metric} has no label {unknown} (in {expr})"
        for metric, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                assert label in scrape.labels.get(metric, set()), f"{metric} has no {label}"
                if op == "=":
                    seen = scrape.values.get((metric, label), set())
                    assert value in seen, f'{metric}{{{label}="{value}"}} is never reported'


def test_checks_catch_an_unknown_metric_or_label() -> None:
    """The parsing the checks rely on finds names and grouping labels."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(wsguard_x_bucket{a="b"}[1m])))'
        " + sum(rate(wsguard_y_total[1m])) by (code, closed_by)"
    )
    assert METRIC.findall(expr) == ["wsguard_x_bucket", "wsguard_y_total"]
    assert grouping_clauses(expr) == [
        (["le"], '(rate(wsguard_x_bucket{a="b"}[1m]))'),
        (["code", "closed_by"], "(rate(wsguard_y_total[1m]))"),
    ]
    assert SELECTOR.findall(expr) == [("wsguard_x_bucket", 'a="b"')]
    assert MATCHER.findall('instance=~"$instance", outcome="refused"') == [
        ("instance", "=~", "$instance"),
        ("outcome", "=", "refused"),
    ]
