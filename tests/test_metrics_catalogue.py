"""normscope.serving.metrics: the catalogue agrees with what the PrometheusSink registers and with docs/metrics.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normscope.monitor import FINDING_KINDS, SEVERITIES, Monitor, PrometheusSink
from normscope.monitor.prometheus import PROMETHEUS_METRICS
from normscope.serving import METRICS, Metric
from normscope.serving.metrics import (
    BATCH_SIZE_BUCKETS,
    FAILURE_REASONS,
    LABELS,
    LATENCY_BUCKETS_SECONDS,
    get_metric,
)

ROOT = Path(__file__).resolve().parents[1]


def _registered(registry) -> dict:
    """name as exposed (counters with _total) -> (type, label names of the samples, help, {label: values})."""
    out = {}
    for fam in registry.collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        labels = {frozenset(s.labels) - {"le"} for s in samples}
        values: dict = {}
        for s in samples:
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
        out[name] = (fam.type, labels, fam.documentation, values)
    return out


def test_monitor_entries_equal_what_the_sink_registers_after_a_flush():
    # A LayerNorm (gamma and beta), a Linear and an RMSNorm (gamma only), trained two steps so that every
    # statistic has a value: gradients, drift, eps-dominated rows (a constant row).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))
    sink = PrometheusSink()
    mon = Monitor(model, every=1, sinks=[sink], flush_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randn(8, 16)
        x[0] = 0.5
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    mon.close()
    assert any(r["type"] == "layer_stats" for r in mon.records)

    reg = _registered(sink.registry)
    mine = {m.name: m for m in METRICS if m.source == "monitor"}
    assert set(reg) == set(mine) == set(PROMETHEUS_METRICS)
    for name, m in mine.items():
        kind, label_sets, help_text, values = reg[name]
        assert kind == m.type, name
        assert label_sets == {frozenset(m.labels)}, name
        assert help_text == m.help, name
        assert (m.type, m.labels) == PROMETHEUS_METRICS[name]
        for label, allowed in m.label_values:  # the run exercised every value of every fixed set
            assert values[label] == set(allowed), (name, label)
    assert get_metric("normscope_findings_total").values_of("kind") == tuple(FINDING_KINDS)
    assert get_metric("normscope_findings_total").values_of("severity") == SEVERITIES


def test_catalogue_can_be_registered_with_prometheus_client():
    """What the serving wrapper will do: one prometheus_client metric per serving entry, the process collector."""
    import prometheus_client

    reg = prometheus_client.CollectorRegistry()
    kinds = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge}
    for m in METRICS:
        if m.source != "serving":
            continue
        if m.type == "histogram":
            prometheus_client.Histogram(m.name, m.help, m.labels, buckets=m.buckets, registry=reg)
        else:
            kinds[m.type](m.name.removesuffix("_total"), m.help, m.labels, registry=reg)
    got = _registered(reg)
    serving = {m.name: m for m in METRICS if m.source == "serving"}
    assert set(got) == set(serving)
    for name, m in serving.items():
        assert got[name][0] == m.type and got[name][2] == m.help
    if sys.platform.startswith("linux"):  # the process collector reads /proc
        proc = prometheus_client.CollectorRegistry()
        prometheus_client.ProcessCollector(registry=proc)
        exported = _registered(proc)
        for m in METRICS:
            if m.source == "process":
                assert m.name in exported and exported[m.name][0] == m.type, m.name


def test_serving_metrics_follow_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    serving = {m.name: m for m in METRICS if m.source == "serving"}
    required = {
        "normscope_inference_request_duration_seconds": ("histogram", ("model", "model_version")),
        "normscope_inference_requests_total": ("counter", ("model", "model_version")),
        "normscope_inference_failures_total": ("counter", ("model", "model_version", "reason")),
        "normscope_inference_batch_size": ("histogram", ("model", "model_version")),
        "normscope_prediction_drift": ("gauge", ("model", "model_version", "metric", "statistic")),
        "normscope_prediction_drift_window_samples": ("gauge", ("model", "model_version")),
        "normscope_prediction_drift_share": ("gauge", ("model", "model_version")),
        "normscope_build_info": ("gauge", ("version", "model", "model_version", "fingerprint")),
        "normscope_config_mismatch": ("gauge", ("model", "model_version")),
        "normscope_output_nonfinite_total": ("counter", ("model", "model_version")),
        "normscope_layer_param_drift": ("gauge", ("model", "model_version", "layer", "param", "stat")),
    }
    for name, (kind, labels) in required.items():
        assert (serving[name].type, serving[name].labels) == (kind, labels), name
    assert serving["normscope_inference_failures_total"].values_of("reason") == FAILURE_REASONS
    assert serving["normscope_prediction_drift"].values_of("metric") == ("psi", "js")
    for m in METRICS:
        if m.unit == "seconds":
            assert m.name.endswith(("_seconds", "_seconds_total")), m.name
        if m.unit == "bytes":
            assert m.name.endswith("_bytes"), m.name
        for label in m.labels:  # bounded: every label is documented with its bound; none is per request
            assert label in LABELS and label not in ("request_id", "user", "input", "trace_id")
    # The latency SLO threshold (0.25 s) is a bucket bound; batch buckets start at one item.
    assert 0.25 in LATENCY_BUCKETS_SECONDS and BATCH_SIZE_BUCKETS[0] == 1
    assert get_metric("normscope_inference_request_duration_seconds").buckets == LATENCY_BUCKETS_SECONDS


def test_metric_validation():
    ok = dict(name="normscope_x_total", type="counter", labels=("model",), unit="requests", help="h",
              source="serving")
    assert Metric(**ok).values_of("model") is None
    cases = [
        (dict(name="normscope-x_total"), "Expected name to be a valid Prometheus metric name"),
        (dict(type="summary"), "Expected type to be one of"),
        (dict(source="trainer"), "Expected source to be one of"),
        (dict(name="x_total"), "to start with 'normscope_'"),
        (dict(name="normscope_x"), "Expected a name ending in '_total' exactly for counters"),
        (dict(type="gauge"), "Expected a name ending in '_total' exactly for counters"),
        (dict(name="normscope_x_count", type="gauge"), "without a reserved suffix"),
        (dict(labels=("model", "model")), "Expected labels to be a tuple of distinct names"),
        (dict(labels=["model"]), "Expected labels to be a tuple of distinct names"),
        (dict(labels=("request_id",)), r"Expected labels from \["),
        (dict(name="normscope_x_seconds", type="histogram"), "Expected buckets exactly for histograms"),
        (dict(buckets=(1.0,)), "Expected buckets exactly for histograms"),
        (dict(name="normscope_x_seconds", type="histogram", buckets=(1.0, 0.5)), "Expected strictly increasing"),
        (dict(label_values=(("reason", ("a",)),)), "Expected label_values only for labels of"),
        (dict(label_values=(("model", ()),)), "Expected distinct values for label 'model'"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            Metric(**{**ok, **change})
    with pytest.raises(KeyError, match="Expected a label of normscope_x_total"):
        Metric(**ok).values_of("reason")
    with pytest.raises(KeyError, match="Expected the name of a metric in normscope.serving.METRICS"):
        get_metric("normscope_inference_request_duration")
    m = get_metric("normscope_inference_requests_total")
    with pytest.raises(AttributeError):
        m.name = "other"  # frozen


def _doc_tables(text: str) -> dict:
    """Rows of docs/metrics.md tables whose first cell is a metric name: name -> list of cells."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`((?:normscope|process)_[a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_docs_list_exactly_the_catalogue():
    text = (ROOT / "docs" / "metrics.md").read_text()
    rows = _doc_tables(text)
    assert set(rows) == {m.name for m in METRICS}
    for m in METRICS:
        kind, labels, unit = rows[m.name][:3]
        assert kind == m.type, m.name
        assert re.findall(r"`([a-z_]+)`", labels) == list(m.labels), m.name
        assert unit == m.unit, m.name
    for label in LABELS:  # every label's value set and bound is documented
        assert re.search(rf"^\|\s*`{label}`\s*\|", text, re.M), label
    for name in ("histogram_quantile(0.95", "histogram_quantile(0.99", "normscope_inference_failures_total",
                 'normscope_prediction_drift{metric="psi"'):  # example PromQL for the SLIs
        assert name in text, name


def test_import_is_light():
    code = ("import sys, normscope.serving\n"
            "print([m for m in ('prometheus_client', 'transformers', 'onnx', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_docs_list_exactly_the_triton_metrics_the_rules_join():
    from normscope.serving.metrics import TRITON_LABELS, TRITON_METRICS

    text = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\|\s*`(nv_[a-z0-9_]+)`\s*\|(.*)\|\s*$", text, re.M)}
    assert set(rows) == {m.name for m in TRITON_METRICS}
    for m in TRITON_METRICS:
        assert m.source == "triton" and m.name.startswith("nv_") and set(m.labels) <= set(TRITON_LABELS)
        kind, labels, unit = rows[m.name][:3]
        assert (kind, re.findall(r"`([a-z_]+)`", labels), unit) == (m.type, list(m.labels), m.unit), m.name
    with pytest.raises(ValueError, match="Expected the name of a triton metric to start with 'nv_'"):
        Metric("triton_requests", "counter", ("model",), "requests", "x", "triton")
    with pytest.raises(ValueError, match="Expected labels from"):
        Metric("nv_x", "counter", ("model_version",), "requests", "x", "triton")  # Triton says version
