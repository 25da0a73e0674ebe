"""Optional monitor sinks: Prometheus metrics and TensorBoard events, checked against the monitor's records."""

from __future__ import annotations

import math
import socket
import sys
import urllib.request
import warnings

import pytest
import torch

from normscope.monitor import JSONLSink, Monitor, PrometheusSink, Sink, TensorBoardSink
from normscope.monitor.prometheus import PROMETHEUS_METRICS
from normscope.monitor.tensorboard import histogram_buckets


class ListSink(Sink):
    def __init__(self):
        self.batches = []

    def write(self, records):
        self.batches.append(list(records))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))


def _train(model, mon, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        x[0] = 0.5  # a constant row: eps-dominated in layer "0" (a counter and a finding)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()


def _monitored_run(sinks, steps=6, flush_every=2):
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # gamma drift from the reference: a weight_drift finding
    mon = Monitor(model, every=1, sinks=sinks, flush_every=flush_every)
    with torch.no_grad():
        model[2].weight.div_(3.0)
    _train(model, mon, steps)
    mon.close()
    return mon


def _close(a, b):
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-6, abs=1e-12)


# --- Prometheus --------------------------------------------------------------------------------------------

def test_prometheus_metrics_equal_the_records():
    from prometheus_client import generate_latest

    sink = PrometheusSink()
    mon = _monitored_run([sink])
    reg = sink.registry
    stats = [r for r in mon.records if r["type"] == "layer_stats"]
    last = {r["layer"]: r for r in stats}  # gauges hold the last window
    assert set(last) == {"0", "2", "4"}
    for layer, r in last.items():
        for stat, field in [("mean", "var_mean"), ("min", "var_min"), ("max", "var_max"), ("p50", "var_p50"),
                            ("p90", "var_p90"), ("p99", "var_p99")]:
            assert _close(reg.get_sample_value("normscope_input_variance", {"layer": layer, "stat": stat}),
                          r[field]), (layer, stat)
        for stat in ("mean", "std"):
            assert _close(reg.get_sample_value("normscope_output", {"layer": layer, "stat": stat}),
                          r[f"out_{stat}"])
        for stat, field in [("mean", "grad_input_norm"), ("min", "grad_input_norm_min"),
                            ("max", "grad_input_norm_max")]:
            assert _close(reg.get_sample_value("normscope_grad_input_norm", {"layer": layer, "stat": stat}),
                          r[field])
        assert _close(reg.get_sample_value("normscope_grad_param_norm", {"layer": layer, "stat": "mean"}),
                      r["grad_param_norm"])
        for stat, field in [("l2", "weight_drift_l2"), ("max_abs", "weight_drift_max"), ("rms", "weight_drift_rms")]:
            assert _close(reg.get_sample_value("normscope_weight_drift", {"layer": layer, "stat": stat}), r[field])
        assert reg.get_sample_value("normscope_last_step", {"layer": layer}) == r["step"] == 5
        # Counters: the sum over every window of the record's counts.
        mine = [s for s in stats if s["layer"] == layer]
        assert reg.get_sample_value("normscope_eps_dominated_rows_total", {"layer": layer}) == sum(
            s["eps_rows"] for s in mine)
        assert reg.get_sample_value("normscope_calls_total", {"layer": layer}) == sum(s["calls"] for s in mine) == 6
        assert reg.get_sample_value("normscope_rows_sampled_total", {"layer": layer}) == sum(
            s["rows_sampled"] for s in mine)
        for stat, field in [("input_nan", "nan_in"), ("input_inf", "inf_in"), ("output_nan", "nan_out"),
                            ("output_inf", "inf_out")]:
            assert reg.get_sample_value("normscope_nonfinite_elements_total", {"layer": layer, "stat": stat}) == sum(
                s[field] for s in mine)
    # Layer "0" sees the constant row; the RMSNorm "4" has no bias: no bias series at all.
    assert reg.get_sample_value("normscope_eps_dominated_rows_total", {"layer": "0"}) > 0
    assert reg.get_sample_value("normscope_bias_drift", {"layer": "4", "stat": "l2"}) is None
    bias_l2 = reg.get_sample_value("normscope_bias_drift", {"layer": "0", "stat": "l2"})
    assert _close(bias_l2, last["0"]["bias_drift_l2"])

    findings = [r for r in mon.records if r["type"] == "finding"]
    assert {f["kind"] for f in findings} >= {"eps_dominated", "weight_drift"}
    for kind in ("eps_dominated", "weight_drift", "nonfinite_input"):
        for severity in ("info", "warning", "error"):
            expected = sum(f["kind"] == kind and f["severity"] == severity for f in findings)
            assert reg.get_sample_value("normscope_findings_total", {"kind": kind, "severity": severity}) == expected

    # Names: one prefix, counters end in _total, labels from the documented sets; nothing else exported.
    text = generate_latest(reg).decode()
    assert all(line.startswith(("normscope_", "# HELP normscope_", "# TYPE normscope_")) for line in text.splitlines())
    assert all(line.split()[2].endswith("_total") for line in text.splitlines()
               if line.startswith("# TYPE") and line.endswith(" counter"))
    families = list(reg.collect())
    assert {f.name + ("_total" if f.type == "counter" else "") for f in families} == set(PROMETHEUS_METRICS)
    for fam in families:
        assert fam.name.startswith("normscope_") and not fam.name.startswith("normscope_normscope")
        kind, labels = PROMETHEUS_METRICS[fam.name + ("_total" if fam.type == "counter" else "")]
        assert fam.type == kind and fam.documentation
        for s in fam.samples:
            if fam.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total")
            if not s.name.endswith("_created"):
                assert set(s.labels) == set(labels)
            if "stat" in s.labels:  # a fixed set: never per-request values
                assert s.labels["stat"] in {"mean", "min", "max", "p50", "p90", "p99", "std", "l2", "max_abs", "rms",
                                            "input_nan", "input_inf", "output_nan", "output_inf"}


def test_prometheus_prefix_and_two_sinks_do_not_collide():
    a, b = PrometheusSink(), PrometheusSink(prefix="myapp_")
    _monitored_run([a, b], steps=2)
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("myapp_calls_total", {"layer": "0"}) == 2
    assert a.registry.get_sample_value("normscope_calls_total", {"layer": "0"}) == 2
    with pytest.raises(ValueError, match="Expected prefix"):
        PrometheusSink(prefix="bad-prefix")
    with pytest.raises(ValueError, match="Expected port"):
        PrometheusSink(port=-1)


def test_prometheus_http_endpoint_serves_metrics():
    sink = PrometheusSink(port=0)
    assert sink.port and sink.port > 0
    model = _mlp()
    mon = Monitor(model, every=1, sinks=sink, flush_every=2)
    try:
        _train(model, mon, 2)  # one flush
        r = [r for r in mon.records if r["type"] == "layer_stats"][-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert f'normscope_calls_total{{layer="{r["layer"]}"}} 2.0' in body
        assert "# TYPE normscope_input_variance gauge" in body
    finally:
        mon.close()  # closes the sink: the server stops
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=2)


def test_prometheus_taken_port_warns_once_and_training_continues(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        prom = PrometheusSink(port=port)  # does not raise: the error waits for the first write
        good = ListSink()
        path = tmp_path / "run.jsonl"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mon = _monitored_run([prom, JSONLSink(path), good], steps=6, flush_every=2)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(w.message) for w in caught]
        msg = str(runtime[0].message)
        assert "PrometheusSink" in msg and f"127.0.0.1:{port}" in msg and "port taken" in msg
        assert mon.current_step == 6 and len(good.batches) == 3
        assert [r for batch in good.batches for r in batch] == mon.records
        assert len(path.read_text().splitlines()) == len(mon.records)
    finally:
        taken.close()


def test_prometheus_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'normscope\[monitor\]'"):
        PrometheusSink()


# --- TensorBoard -------------------------------------------------------------------------------------------

def test_tensorboard_events_equal_the_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    mon = _monitored_run([TensorBoardSink(logdir)], steps=6, flush_every=2)
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    stats = [r for r in mon.records if r["type"] == "layer_stats"]
    edges = mon.records[0]["hist_edges"]
    for layer in ("0", "2", "4"):
        mine = [r for r in stats if r["layer"] == layer]
        for field in ("var_mean", "var_p99", "out_std", "eps_rows", "grad_param_norm", "weight_drift_l2"):
            events = acc.Scalars(f"normscope/{layer}/{field}")
            assert [e.step for e in events] == [r["step"] for r in mine] == [1, 3, 5]
            for e, r in zip(events, mine):
                assert e.value == pytest.approx(r[field], rel=1e-6, abs=1e-30)  # float32 in the event file
        hists = acc.Histograms(f"normscope/{layer}/in_hist")
        assert [h.step for h in hists] == [1, 3, 5]
        for h, r in zip(hists, mine):
            expected = histogram_buckets(edges, r["in_hist"])
            assert h.histogram_value.num == sum(r["in_hist"]) == expected["num"]
            assert list(h.histogram_value.bucket) == expected["bucket_counts"]
            assert list(h.histogram_value.bucket_limit) == pytest.approx(expected["bucket_limits"])
    assert "normscope/4/bias_drift_l2" not in tags["scalars"]  # RMSNorm: no bias
    assert "normscope/0/grad_input_norm" not in tags["scalars"]  # the model input needs no gradient: None
    assert acc.Scalars("normscope/2/grad_input_norm")[-1].value == pytest.approx(stats[-2]["grad_input_norm"])
    # Findings as text, at their steps.
    findings = [r for r in mon.records if r["type"] == "finding"]
    assert findings
    texts = acc.Tensors("normscope/findings/text_summary")
    assert sorted({e.step for e in texts}) == sorted({f["step"] for f in findings})
    body = " ".join(t.tensor_proto.string_val[0].decode() for t in texts)
    for f in findings:
        assert f["kind"] in body and f["message"] in body


def test_histogram_buckets_drop_empty_under_and_overflow():
    h = histogram_buckets([0.0, 1.0, 2.0], [0, 3, 1, 0])
    assert h["bucket_limits"] == [1.0, 2.0] and h["bucket_counts"] == [3, 1]
    assert (h["min"], h["max"], h["num"]) == (0.0, 2.0, 4)
    h = histogram_buckets([0.0, 1.0, 2.0], [2, 0, 0, 1])
    assert h["bucket_limits"] == [0.0, 1.0, 2.0, 3.0] and h["bucket_counts"] == [2, 0, 0, 1]
    assert (h["min"], h["max"]) == (-1.0, 3.0)
    with pytest.raises(ValueError, match="Expected 4 counts"):
        histogram_buckets([0.0, 1.0, 2.0], [1, 2])


def test_tensorboard_unwritable_logdir_warns_once_and_training_continues(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    good = ListSink()
    tb = TensorBoardSink(blocker / "tb")  # does not raise: the writer is made on the first write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = _monitored_run([tb, good], steps=4, flush_every=2)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "TensorBoardSink" in str(runtime[0].message)
    assert mon.current_step == 4 and [r for b in good.batches for r in b] == mon.records


def test_tensorboard_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'normscope\[monitor\]'"):
        TensorBoardSink(tmp_path)
    with pytest.raises(TypeError, match="Expected logdir"):
        TensorBoardSink(3)
