"""deploy/prometheus: promtool checks and unit tests of the rules, and the rules' contract with the metric catalogue."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from normscope.serving.metrics import METRICS, TRITON_METRICS, get_metric

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(p for p in PROM_DIR.glob("*rules*.yml") if "test" not in p.name)
TEST_FILES = sorted(PROM_DIR.glob("*test*.yml"))

#: normscope's metrics and the Triton Inference Server metrics the rules join with them.
CATALOGUE = {m.name: m for m in METRICS + TRITON_METRICS}
#: Series Prometheus makes itself, which rules and dashboards may use besides the catalogue.
PROMETHEUS_OWN = {"up": ("job", "instance"), "ALERTS": None, "ALERTS_FOR_STATE": None}
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = ("job", "instance")
_HIST_SUFFIXES = ("_bucket", "_count", "_sum")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "start", "end"}
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''


# --- PromQL helpers (also used by test_deploy_grafana.py) ------------------------------------------------------

def promql_metric_names(expr: str) -> set:
    """The metric names (and recording-rule names) an expression selects; functions and keywords left out."""
    s = re.sub(_STRING, '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def promql_selectors(expr: str) -> list:
    """``[(metric name, [(label, op, value), ...]), ...]`` for every ``name{...}`` selector."""
    out = []
    for m in re.finditer(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2))
        out.append((m.group(1), matchers))
    return out


def unknown_metric_names(expr: str, recording_rules: set) -> list:
    """Names in ``expr`` that are neither in the catalogue (histogram suffixes allowed), nor a recording rule,
    nor a series Prometheus makes itself."""
    bad = []
    for name in sorted(promql_metric_names(expr)):
        if ":" in name:
            if name not in recording_rules:
                bad.append(name)
            continue
        if name in CATALOGUE or name in PROMETHEUS_OWN:
            continue
        base = next((name[: -len(s)] for s in _HIST_SUFFIXES if name.endswith(s)), None)
        if base is None or base not in CATALOGUE or CATALOGUE[base].type != "histogram":
            bad.append(name)
    return bad


def selector_problems(expr: str) -> list:
    """Label matchers on catalogue metrics that use a label the metric lacks, or a value outside its fixed set
    (``le`` values must be bucket bounds of the histogram)."""
    problems = []
    for name, matchers in promql_selectors(expr):
        base = next((name[: -len(s)] for s in _HIST_SUFFIXES if name.endswith(s) and name[: -len(s)] in CATALOGUE),
                    name)
        if base not in CATALOGUE:
            if name in PROMETHEUS_OWN and PROMETHEUS_OWN[name] is not None:
                problems += [f"{name}: label {lb}" for lb, _, _ in matchers if lb not in PROMETHEUS_OWN[name]]
            continue
        metric = CATALOGUE[base]
        allowed = set(metric.labels) | set(TARGET_LABELS) | ({"le"} if name.endswith("_bucket") else set())
        for label, op, value in matchers:
            if label not in allowed:
                problems.append(f"{name}: label {label!r} not in {sorted(allowed)}")
            elif label == "le" and op == "=":
                if value != "+Inf" and float(value) not in metric.buckets:
                    problems.append(f"{name}: le={value!r} is not a bucket bound {metric.buckets}")
            elif op == "=" and label in metric.labels and metric.values_of(label) is not None:
                if value not in metric.values_of(label):
                    problems.append(f"{name}: {label}={value!r} not in {metric.values_of(label)}")
    return problems


def load_rules() -> list:
    """Every rule of every rules file, with its group name added as ``_group``."""
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [dict(r, _group=group["name"]) for r in group["rules"]]
    return rules


def recording_rule_names() -> set:
    return {r["record"] for r in load_rules() if "record" in r}


def _promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found on PATH; CI installs it (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def check_promql_syntax(exprs: list, tmp_path: Path) -> None:
    """Fail naming the expression when promtool does not parse one of ``[(where, expr), ...]``."""
    rules = [{"record": f"check:expr:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    (tmp_path / "exprs.yml").write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    r = _promtool("check", "rules", "exprs.yml", cwd=tmp_path)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        bad = [f"{w}: {e}" for i, (w, e) in enumerate(exprs) if f"check:expr:{i}\"" in out or f"rule {i + 1}," in out]
        pytest.fail(f"promtool does not parse {bad or 'the expressions'}:\n{out}")


def _promtool_ok(*args: str) -> str:
    r = _promtool(*args)
    if r.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


# --- the helpers themselves ---------------------------------------------------------------------------------

def test_promql_helpers():
    expr = ('histogram_quantile(0.95, sum by (model, le) (rate(normscope_inference_request_duration_seconds_bucket'
            '{model=~"$model", le="0.25"}[5m]))) / ignoring(le) group_left a:b:c offset 5m > bool 1e-9 '
            'and on (job) up{job="x"} unless changes(foo[2m:]) or vector(1) * ALERTS{alertname=~"by(x)"}')
    assert promql_metric_names(expr) == {"normscope_inference_request_duration_seconds_bucket", "a:b:c", "up", "foo",
                                         "ALERTS"}
    assert promql_selectors('x{a="1", b=~"c|d"} + y{}') == [("x", [("a", "=", "1"), ("b", "=~", "c|d")]), ("y", [])]
    assert unknown_metric_names("normscope_inference_batch_size_count + normscope_calls_total + a:b:c", {"a:b:c"}) == []
    # A suffix only on histograms; an unknown recording rule; a name that is not in the catalogue.
    assert unknown_metric_names("normscope_calls_total_count + x:y:z + normscope_nope", set()) == [
        "normscope_calls_total_count", "normscope_nope", "x:y:z"]
    assert selector_problems('normscope_inference_failures_total{reason="timeout", job="a"}') == [
        "normscope_inference_failures_total: reason='timeout' not in ('bad_input', 'nonfinite_output', 'exception')"]
    assert selector_problems('normscope_inference_request_duration_seconds_bucket{le="0.3"}')[0].startswith(
        "normscope_inference_request_duration_seconds_bucket: le='0.3' is not a bucket bound")
    assert selector_problems('normscope_calls_total{stat="x"}') == [
        "normscope_calls_total: label 'stat' not in ['instance', 'job', 'layer']"]
    assert selector_problems('normscope_prediction_drift{metric="psi", statistic="anything"}') == []


def test_syntax_checker_names_the_bad_expressions(tmp_path):
    exprs = [("fine", "up"), ("unclosed", "sum(rate(up[5m])"), ("braces", "up{")]
    with pytest.raises(pytest.fail.Exception, match=r"\['unclosed: sum\(rate\(up\[5m\]\)', 'braces: up\{'\]"):
        check_promql_syntax(exprs, tmp_path)
    check_promql_syntax(exprs[:1], tmp_path)


# --- promtool ---------------------------------------------------------------------------------------------------

def test_rule_and_test_files_exist():
    assert [p.name for p in RULE_FILES] == ["normscope_rules.yml"]
    assert "normscope_rules_test.yml" in [p.name for p in TEST_FILES]


def test_promtool_check_rules():
    out = _promtool_ok("check", "rules", *[p.name for p in RULE_FILES])
    assert f"SUCCESS: {len(load_rules())} rules found" in out


def test_promtool_check_config():
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert sorted(config["rule_files"]) == sorted(p.name for p in RULE_FILES)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "normscope-serving")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    out = _promtool_ok("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_unit_tests_pass():
    out = _promtool_ok("test", "rules", *[p.name for p in TEST_FILES])
    assert "SUCCESS" in out and "FAILED" not in out


def _mutated_run(tmp_path: Path, mutate) -> str:
    """Run the unit tests against a copy of the rules changed by ``mutate(rule)``; return promtool's output."""
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                mutate(rule)
        (tmp_path / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    for path in TEST_FILES:
        shutil.copy(path, tmp_path / path.name)
    r = _promtool("test", "rules", *[p.name for p in TEST_FILES], cwd=tmp_path)
    assert r.returncode != 0, "the unit tests passed against mutated rules"
    return r.stdout + r.stderr


#: For each alert, a change that moves its threshold (or `for:`) just past a not-firing case of the unit tests.
ALERT_MUTATIONS = {
    "NormscopeLatencyP95High": ("expr", "> 0.25", "> 0.24"),
    "NormscopeErrorBudgetFastBurn": ("expr", "(14.4 * 0.005)", "(13.9 * 0.005)"),
    "NormscopeErrorBudgetSlowBurn": ("expr", "(3 * 0.005)", "(2.7 * 0.005)"),
    "NormscopeNonfiniteOutputs": ("for", "1m", "0m"),
    "NormscopePredictionDrift": ("expr", ">= 500", ">= 499"),
    "NormscopePredictionDriftShare": ("expr", "share >= 0.5", "share >= 0.49"),
    "NormscopeNormParamDrift": ("expr", "> 0.01", "> 0.0098"),
    "NormscopeConfigMismatch": ("for", "5m", "2m"),
    "NormscopeEpsDominatedRows": ("expr", "> 0.01", "> 0.0089"),
    "NormscopeMonitorErrorFinding": ("expr", 'severity="error"', 'severity=~"error|warning"'),
    "NormscopeServingTargetDown": ("for", "2m", "1m"),
    "NormscopeServingTargetMissing": ("for", "5m", "3m"),
    "NormscopeServingMetricsMissing": ("for", "10m", "8m"),
    "NormscopeTritonTelemetryGap": ("expr", "< 0.95", "< 0.96"),
}


def test_unit_tests_catch_each_alert_moved_past_its_threshold(tmp_path):
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert set(ALERT_MUTATIONS) == alerts

    def mutate(rule):
        if "alert" in rule:
            key, old, new = ALERT_MUTATIONS[rule["alert"]]
            assert old in str(rule[key]), (rule["alert"], key, rule[key])
            rule[key] = str(rule[key]).replace(old, new)

    out = _mutated_run(tmp_path, mutate)
    failed = set(re.findall(r"alertname: (\w+)", out))
    assert failed == alerts, f"alerts whose tests did not notice: {sorted(alerts - failed)}\n{out}"


def test_unit_tests_check_every_recording_rule_value(tmp_path):
    def mutate(rule):
        if "record" in rule:
            rule["expr"] = f"({rule['expr']}) * 1.001"

    out = _mutated_run(tmp_path, mutate)
    missed = [name for name in recording_rule_names() if f"abs({name}{{" not in out]
    assert not missed, f"recording rules whose values are not checked: {missed}\n{out}"


# --- the rules' contract --------------------------------------------------------------------------------------

def test_every_alert_is_tested_firing_and_not_firing():
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    firing, quiet, exprs = set(), set(), []
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        for test in doc["tests"]:
            for t in test.get("alert_rule_test", []):
                assert t["alertname"] in alerts, f"test of an unknown alert {t['alertname']}"
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
                for a in t.get("exp_alerts") or []:  # exact expectations: the severity and every annotation
                    assert a["exp_labels"]["severity"] in ("page", "ticket")
                    assert set(a["exp_annotations"]) == {"summary", "description", "runbook_url"}
            exprs += [t["expr"] for t in test.get("promql_expr_test", [])]
    assert firing == alerts, f"never tested firing: {sorted(alerts - firing)}"
    assert quiet == alerts, f"never tested not firing: {sorted(alerts - quiet)}"
    tested = set().union(*(promql_metric_names(e) for e in exprs))
    assert recording_rule_names() <= tested, f"no promql_expr_test: {sorted(recording_rule_names() - tested)}"


def test_rule_expressions_use_only_catalogue_metrics():
    recording = recording_rule_names()
    names_used = set()
    for rule in load_rules():
        what = rule.get("alert") or rule.get("record")
        assert unknown_metric_names(rule["expr"], recording) == [], what
        assert selector_problems(rule["expr"]) == [], what
        names_used |= promql_metric_names(rule["expr"])
    # The rules watch the serving SLIs and the monitor's findings, not a token subset.
    for name in ("normscope_inference_requests_total", "normscope_inference_failures_total",
                 "normscope_inference_request_duration_seconds_bucket", "normscope_output_nonfinite_total",
                 "normscope_prediction_drift", "normscope_prediction_drift_window_samples",
                 "normscope_prediction_drift_share",
                 "normscope_layer_param_drift", "normscope_findings_total", "normscope_eps_dominated_rows_total",
                 "normscope_rows_sampled_total", "normscope_build_info", "normscope_config_mismatch", "up"):
        assert name in names_used, name
    get_metric("normscope_inference_request_duration_seconds")  # the latency SLO's histogram exists


def test_docs_promql_examples_parse_and_use_catalogue_metrics(tmp_path):
    text = (ROOT / "docs" / "metrics.md").read_text()
    block = re.search(r"```promql\n(.*?)```", text, re.S).group(1)
    exprs = []
    for line in block.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():  # continuation of the previous expression
            exprs[-1] += " " + line.strip()
        else:
            exprs.append(line.strip())
    assert len(exprs) >= 10
    for e in exprs:
        assert unknown_metric_names(e, recording_rule_names()) == [], e
        assert selector_problems(e) == [], e
    check_promql_syntax([("docs/metrics.md", e) for e in exprs], tmp_path)


def test_recording_rules_follow_the_naming_convention():
    for name in recording_rule_names():
        level, metric, ops = name.split(":")
        assert level and ops, name
        assert metric in CATALOGUE or metric + "_total" in CATALOGUE, name


def test_every_alert_has_severity_for_annotations_and_runbook():
    alerts = [r for r in load_rules() if "alert" in r]
    assert len(alerts) >= 12
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for a in alerts:
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in ("page", "ticket"), name
        assert re.fullmatch(r"\d+[smh]", str(a.get("for", ""))), name
        ann = a.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), name
        assert "$labels" in ann["summary"] + ann["description"], name
        if not a["expr"].startswith("absent("):  # absent() has no value to report
            assert "$value" in ann["description"], name
        runbook = ann.get("runbook_url", "")
        assert runbook.startswith("docs/runbooks/") and runbook.endswith(".md"), name
        assert (ROOT / runbook).is_file(), f"{name}: {runbook} does not exist"
        assert name in (ROOT / runbook).read_text(), f"{runbook} does not mention {name}"
    severities = {a["alert"]: a["labels"]["severity"] for a in alerts}
    # Users are hurt now: page. Model quality and the monitor's statistics: tickets.
    assert severities["NormscopeErrorBudgetFastBurn"] == severities["NormscopeNonfiniteOutputs"] == "page"
    assert severities["NormscopePredictionDrift"] == severities["NormscopeEpsDominatedRows"] == "ticket"
