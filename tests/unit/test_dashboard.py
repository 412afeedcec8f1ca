"""The Grafana dashboard (ops/grafana/fiscal-worker.json), the alerts (ops/prometheus/) and the
runbook (ops/RUNBOOK.md) against each other and against what the exporter serves.

No Grafana validator runs offline, so the dashboard's structure is checked here; the PromQL
of every panel and alert is parsed by promtool in ops/prometheus/check (run at the end when
promtool is installed). Metric names are checked against the exporter's catalogue
(worker.metrics.METRIC_NAMES) and the sample names a scrape actually shows, and against
Flower's own metrics for flower_*.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker import keys, telemetry
from worker.metrics import METRIC_NAMES, RedisStateCollector
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "fiscal-worker.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "ops" / "RUNBOOK.md"
CHECK = ROOT / "ops" / "prometheus" / "check"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
EXPORTER_SOURCE = "Source: the project's exporter"
FLOWER_SOURCE = "Source: Flower's /metrics"

# Flower 2.x's /metrics (flower/events.py, PrometheusMetrics): sample name -> label names.
# test_flower_metrics_are_the_installed_flowers checks this against the installed Flower.
FLOWER_FAMILIES = {
    "flower_events_total": ("counter", {"worker", "type", "task"}),
    "flower_task_runtime_seconds": ("histogram", {"worker", "task"}),
    "flower_task_prefetch_time_seconds": ("gauge", {"worker", "task"}),
    "flower_worker_prefetched_tasks": ("gauge", {"worker", "task"}),
    "flower_worker_online": ("gauge", {"worker"}),
    "flower_worker_number_of_currently_executing_tasks": ("gauge", {"worker"}),
}


def _samples_of(family: str, kind: str, labels: set[str]) -> dict[str, set[str]]:
    if kind == "histogram":
        return {
            f"{family}_bucket": labels | {"le"},
            f"{family}_sum": set(labels),
            f"{family}_count": set(labels),
        }
    return {family: set(labels)}


FLOWER_SAMPLES: dict[str, set[str]] = {}
for _name, (_kind, _labels) in FLOWER_FAMILIES.items():
    FLOWER_SAMPLES.update(_samples_of(_name, _kind, _labels))


# --- reading the files --------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every panel, those nested in (collapsed) rows too."""
    found = []
    for panel in dashboard()["panels"] if panels is None else panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


def graph_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels() if p.get("type") != "row"]


@cache
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def runbook() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+)$", runbook(), re.M)}


# --- PromQL, as far as these checks need it -------------------------------------------------

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-z]*|[A-Za-z_:][A-Za-z0-9_:]*")


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels, numbers)."""
    text = _strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = GROUPING.sub(" ", text)  # by (...), on (...), ...
    names = set()
    for match in TOKEN.finditer(text):
        word = match.group()
        if word[0].isdigit() or word.lower() in KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        names.add(word)
    return names


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """{metric name: label names of its {...} matchers}."""
    found: dict[str, set[str]] = {}
    for name, body in SELECTOR.findall(expr):
        labels = {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)", body)}
        found.setdefault(name, set()).update(labels)
    return found


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for _, body in GROUPING.findall(_strip_strings(expr))
        for label in body.split(",")
        if label.strip()
    }


def test_the_promql_reader_finds_names_and_labels():
    expr = (
        "histogram_quantile(0.95, sum by (le, since) (rate(fiscal_e2e_latency_seconds_bucket"
        '{since=~"$since"}[$__rate_interval]))) / on () group_left max(fiscal_results_due '
        'offset 5m) > bool 1e3 and absent(fiscal_workers_alive{job="a{b}"})'
    )
    assert metric_names(expr) == {
        "fiscal_e2e_latency_seconds_bucket",
        "fiscal_results_due",
        "fiscal_workers_alive",
    }
    assert matcher_labels(expr)["fiscal_e2e_latency_seconds_bucket"] == {"since"}
    assert grouping_labels(expr) == {"le", "since"}


# --- what the exporter serves ---------------------------------------------------------------


@pytest.fixture
def served(r) -> dict[str, set[str]]:
    """{sample name: label names} of a scrape of the exporter, with a brand and a worker
    registered and one API call counted, so that every family has its series."""
    now = time.time()
    r.zadd(keys.BRANDS, {"alpha": now})
    r.zadd(keys.WORKERS, {"host:1": now})
    r.hincrby(keys.COUNTERS, telemetry.api_call("get_receipt", 429), 1)
    registry = CollectorRegistry()
    registry.register(RedisStateCollector(r, Settings()))
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        assert family.name in METRIC_NAMES, f"{family.name} is served but not in METRIC_NAMES"
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    families = set()
    for name in samples:
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
                name = name.removesuffix(suffix)
        families.add(name)
    assert families == METRIC_NAMES, "the scrape should show every family of the catalogue"
    return samples


def _check_names_and_labels(where: str, expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    names = metric_names(expr)
    if not names:
        problems.append(f"{where}: no metric in {expr!r}")
    for name in sorted(names - set(known)):
        problems.append(f"{where}: unknown metric {name}")
    for name, labels in matcher_labels(expr).items():
        for label in sorted(labels - known.get(name, labels)):
            problems.append(f"{where}: {name} has no label {label!r}")
    available = set().union(*(known.get(n, set()) for n in names)) if names else set()
    for label in sorted(grouping_labels(expr) - available):
        problems.append(f"{where}: grouping by {label!r}, which none of {sorted(names)} has")
    return problems


# --- the dashboard --------------------------------------------------------------------------


def test_the_dashboard_is_json_with_its_identity_and_variables():
    doc = dashboard()
    assert doc["schemaVersion"] >= 36
    assert doc["uid"] == "fiscal-worker" and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    brand = variables["brand"]
    assert brand["type"] == "query"
    assert brand["datasource"] == DATASOURCE
    assert brand["definition"] == "label_values(fiscal_brand_circuit_open, brand)"
    assert brand["query"]["query"] == brand["definition"]
    assert brand["includeAll"] and brand["allValue"] == ".*"


def test_panel_ids_are_unique():
    ids = [p.get("id") for p in all_panels()]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_panels_lie_on_the_grid_without_overlapping():
    taken: dict[tuple[int, int], int] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] >= 0 and pos["y"] >= 0
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['id']} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"panels {taken[(x, y)]} and {panel['id']} overlap"
                taken[(x, y)] = panel["id"]


def test_every_panel_has_the_datasource_variable_and_a_target_with_an_expr():
    panels = graph_panels()
    assert len(panels) >= 20
    for panel in panels:
        assert panel.get("title"), panel["id"]
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        targets = panel.get("targets") or []
        assert targets and all(t.get("expr", "").strip() for t in targets), panel["title"]
        assert all(t.get("datasource") == DATASOURCE for t in targets), panel["title"]
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_metric_and_label_in_a_panel_is_served(served):
    known = {**served, **FLOWER_SAMPLES}
    problems = []
    for panel in graph_panels():
        for target in panel["targets"]:
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            problems += _check_names_and_labels(where, target["expr"], known)
    assert not problems, "\n".join(problems)


def test_the_panels_show_the_figures_the_issue_asks_for():
    used = set().union(*(metric_names(t["expr"]) for p in graph_panels() for t in p["targets"]))
    exporter = {n for n in used if n.startswith("fiscal_")}
    for family in METRIC_NAMES:
        assert any(n == family or n.startswith(family + "_") for n in exporter), family
    assert set(FLOWER_SAMPLES) - used <= {
        "flower_task_runtime_seconds_sum",
        "flower_task_runtime_seconds_count",
    }
    quantiles = [
        t["expr"]
        for p in graph_panels()
        for t in p["targets"]
        if "fiscal_e2e_latency_seconds_bucket" in t["expr"]
    ]
    for q in ("0.50", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") and "since" in e for e in quantiles)


def test_brand_panels_follow_the_brand_variable():
    for panel in graph_panels():
        for target in panel["targets"]:
            for name, labels in matcher_labels(target["expr"]).items():
                if name.startswith("fiscal_brand_"):
                    assert "brand" in labels and '$brand"' in target["expr"], panel["title"]
            for name in metric_names(target["expr"]):
                if name.startswith("fiscal_brand_"):
                    assert name in matcher_labels(target["expr"]), panel["title"]


def test_each_panel_says_where_its_figures_come_from():
    for panel in graph_panels():
        names = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
        description = panel.get("description", "")
        if all(n.startswith("fiscal_") for n in names):
            assert description.startswith(EXPORTER_SOURCE), panel["title"]
        elif all(n.startswith("flower_") for n in names):
            assert description.startswith(FLOWER_SOURCE), panel["title"]
        else:
            pytest.fail(f"panel {panel['title']!r} mixes sources: {sorted(names)}")


def test_the_runbook_lists_every_panel_with_its_source():
    section = runbook().split("## Dashboard panels and their sources", 1)[1]
    listed = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("panel", "---"):
            listed[cells[0]] = cells[1]
    expected = {}
    for panel in graph_panels():
        flower = panel["description"].startswith(FLOWER_SOURCE)
        expected[panel["title"]] = "Flower" if flower else "exporter"
    assert listed == expected


def test_flower_metrics_are_the_installed_flowers():
    spec = find_spec("flower")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("Flower is not installed (the [ops] extra)")
    source = (Path(next(iter(spec.submodule_search_locations))) / "events.py").read_text()
    declared = {}
    kinds = {"PrometheusCounter": "counter", "Histogram": "histogram", "Gauge": "gauge"}
    pattern = r"\b(PrometheusCounter|Histogram|Gauge)\(\s*'(\w+)',\s*(?:\"[^\"]*\"|'[^']*'),"
    for kind, name, labels in re.findall(pattern + r"\s*\[([^\]]*)\]", source):
        declared[name] = (kinds[kind], set(re.findall(r"'(\w+)'", labels)))
    assert declared == FLOWER_FAMILIES


# --- the alerts -----------------------------------------------------------------------------


def test_every_alert_has_a_duration_severity_annotations_and_a_runbook_section():
    rules = alert_rules()
    assert len(rules) >= 10
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    anchors = runbook_anchors()
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"[1-9][0-9]*[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"ops/RUNBOOK.md#{name.lower()}", name
        assert name.lower() in anchors, f"ops/RUNBOOK.md has no section {name}"


def test_the_runbook_sections_of_alerts_say_what_it_means_how_to_look_and_what_to_do():
    text = runbook()
    for rule in alert_rules():
        section = text.split(f"### {rule['alert']}\n", 1)[1].split("\n#", 1)[0]
        for part in ("**Means.**", "**Look.**", "**Do.**"):
            assert part in section, f"{rule['alert']}: {part}"


def test_every_alert_expression_uses_served_metrics_and_labels(served):
    problems = []
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert all(n.startswith("fiscal_") for n in names), rule["alert"]
        problems += _check_names_and_labels(rule["alert"], rule["expr"], served)
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_must_not():
    doc = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "no case fires these"
    assert names - quiet == set(), "no case checks these stay quiet"
    assert fires | quiet <= names, "tests of alerts that do not exist"


def test_runbook_links_inside_the_file_resolve():
    anchors = runbook_anchors()
    links = set(re.findall(r"\]\(#([^)]+)\)", runbook()))
    assert links and links - anchors == set()


# --- promtool -------------------------------------------------------------------------------


def _run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install -y prometheus); ops/prometheus/check "
    "runs in CI",
)
def test_promtool_checks_the_rules_the_alert_tests_and_every_panel_expression(tmp_path):
    done = _run_check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "all passed" in done.stdout
    panel_exprs = sum(len(p["targets"]) for p in graph_panels())
    assert f"{panel_exprs} panel expressions" in done.stdout

    broken = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panel = next(p for p in broken["panels"] if p.get("type") != "row")
    panel["targets"][0]["expr"] = "sum(rate(fiscal_results_ingested_total[5m]"
    (tmp_path / "broken.json").write_text(json.dumps(broken), encoding="utf-8")
    failed = _run_check(str(tmp_path / "broken.json"))
    assert failed.returncode == 1
    assert f"dashboard:panel_{panel['id']}_A" in failed.stdout + failed.stderr
