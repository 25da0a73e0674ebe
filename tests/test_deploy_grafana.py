"""deploy/grafana: importable Grafana 10 dashboards that query only catalogue metrics and recording rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_deploy_prometheus import (
    check_promql_syntax,
    promql_metric_names,
    recording_rule_names,
    selector_problems,
    unknown_metric_names,
)

ROOT = Path(__file__).resolve().parents[1]
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA_DIR.glob("*.json"))
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _panels(board: dict) -> list:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def _exprs(board: dict) -> list:
    """(where, PromQL) for every query of the dashboard: panel targets, variables, annotations."""
    out = []
    for p in _panels(board):
        out += [(f"panel {p['id']} {p['title']!r}", t["expr"]) for t in p.get("targets", [])]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", q)
            assert m, f"variable {v['name']}: expected label_values(selector, label), but got {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    return out


def test_three_dashboards_with_unique_uids():
    assert [p.name for p in DASHBOARDS] == ["normscope-debug.json", "normscope-executive.json",
                                            "normscope-oncall.json"]
    boards = [_load(p) for p in DASHBOARDS]
    uids = [b["uid"] for b in boards]
    assert len(set(uids)) == len(uids) and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", u) for u in uids)
    assert len({b["title"] for b in boards}) == len(boards)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_model(path):
    board = _load(path)
    for key in ("title", "uid", "panels", "templating", "time", "schemaVersion"):
        assert key in board, key
    assert board["schemaVersion"] >= 36  # Grafana 9.x / 10.x
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = _panels(board)
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"} and g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps another at {(x, y)}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"] == DS, p["id"]
        assert p["targets"], f"panel {p['id']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == DS
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_only_catalogue_metrics_and_recording_rules(path):
    recording = recording_rule_names()
    board = _load(path)
    exprs = _exprs(board)
    assert exprs
    for where, expr in exprs:
        if re.fullmatch(r"vector\([0-9.e+-]+\)", expr):  # a threshold line
            continue
        assert promql_metric_names(expr), f"{where}: no metric in {expr!r}"
        assert unknown_metric_names(expr, recording) == [], f"{where}: {expr}"
        assert selector_problems(expr) == [], f"{where}: {expr}"
        # Template variables are the ones the dashboard defines (Grafana's own start with $__).
        defined = {v["name"] for v in board["templating"]["list"]}
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in defined, f"{where}: ${var} is not a variable of the dashboard"


def test_queries_parse(tmp_path):
    """Every query is valid PromQL once Grafana has substituted its variables (checked by promtool)."""
    exprs = []
    for path in DASHBOARDS:
        for where, expr in _exprs(_load(path)):
            e = expr.replace("$__range", "1h").replace("$__rate_interval", "1m")
            exprs.append((f"{path.stem}: {where}", re.sub(r"\$\w+", ".*", e)))
    check_promql_syntax(exprs, tmp_path)


def test_dashboards_cover_their_audience():
    names = {p.stem: set().union(*(promql_metric_names(e) for _, e in _exprs(_load(p)))) for p in DASHBOARDS}
    assert {"model_version:normscope_inference_request_duration_seconds:p95_5m",
            "normscope_inference_failures_total", "normscope_prediction_drift"} <= names["normscope-executive"]
    assert {"model_version:normscope_inference_request_duration_seconds:p99_5m",
            "model_version_reason:normscope_inference_failures:rate5m", "normscope_output_nonfinite_total",
            "normscope_prediction_drift", "ALERTS", "normscope_build_info"} <= names["normscope-oncall"]
    # Triton Inference Server's own metrics next to normscope's, joined by model and version
    assert {"model_version:nv_inference_request_success:rate5m", "model_version:normscope_inference_requests:rate5m",
            "model_version:normscope_inference_requests:per_triton_request_ratio_rate5m",
            "model_version:nv_inference_queue_duration_us:mean_seconds_5m",
            "model_version:normscope_inference_request_duration_seconds:share_of_triton_mean5m",
            } <= names["normscope-oncall"]
    assert {"normscope_input_variance", "instance_layer:normscope_eps_dominated_rows:ratio_rate15m",
            "normscope_weight_drift", "normscope_bias_drift", "normscope_layer_param_drift",
            "normscope_grad_input_norm", "normscope_grad_param_norm", "normscope_nonfinite_elements_total",
            "normscope_findings_total"} <= names["normscope-debug"]
    debug_vars = {v["name"] for v in _load(GRAFANA_DIR / "normscope-debug.json")["templating"]["list"]}
    assert {"model", "model_version", "layer"} <= debug_vars


def test_checker_rejects_a_dashboard_with_an_unknown_metric():
    board = _load(GRAFANA_DIR / "normscope-oncall.json")
    board["panels"][1]["targets"][0]["expr"] = 'rate(normscope_inference_errors_total{reason="oops"}[5m])'
    bad = [(w, e) for w, e in _exprs(board) if unknown_metric_names(e, recording_rule_names())]
    assert [w for w, _ in bad] == [f"panel {board['panels'][1]['id']} {board['panels'][1]['title']!r}"]


def _by_labels(expr: str) -> set:
    """The labels of every ``by (...)`` clause of ``expr``."""
    return {lb.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lb in group.split(",") if lb.strip()}


def test_oncall_shows_the_config_mismatch_and_the_served_fingerprint():
    from normscope.serving.metrics import get_metric

    board = _load(GRAFANA_DIR / "normscope-oncall.json")
    uses: dict = {}
    for p in _panels(board):
        for t in p.get("targets", []):
            for name in promql_metric_names(t["expr"]):
                uses.setdefault(name, []).append((p, t["expr"]))
    # one panel plots normscope_config_mismatch, a catalogue gauge of the serving wrapper, per model version
    ((panel, expr),) = uses["normscope_config_mismatch"]
    mismatch = get_metric("normscope_config_mismatch")
    assert (mismatch.source, mismatch.type) == ("serving", "gauge")
    assert {"model", "model_version"} <= _by_labels(expr) <= set(mismatch.labels) | {"instance", "job"}
    assert "mismatch" in panel["title"].lower() and panel["fieldConfig"]["defaults"]["max"] == 1
    # and one shows the served fingerprint, a label of normscope_build_info
    fingerprint_panels = [(p, e) for p, e in uses["normscope_build_info"] if "fingerprint" in _by_labels(e)]
    assert len(fingerprint_panels) == 1
    assert _by_labels(fingerprint_panels[0][1]) <= set(get_metric("normscope_build_info").labels)
