"""Monitor records out and back: sinks (fail-soft), JSONL round trip, snapshots and compare()."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from normscope import monitor
from normscope.monitor import Finding, JSONLSink, Monitor, Sink


def _train(model, mon, steps, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen) * scale
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 16),
                               torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))


class ListSink(Sink):
    def __init__(self):
        self.batches = []
        self.closed = False

    def write(self, records):
        self.batches.append(list(records))

    def close(self):
        self.closed = True


class BrokenSink(Sink):
    def __init__(self):
        self.calls = 0

    def write(self, records):
        self.calls += 1
        raise OSError("disk full")


def _same(a, b):
    """Record equality where NaN equals NaN (JSON carries NaN as a token)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_jsonl_round_trip_through_load(tmp_path):
    path = tmp_path / "run.jsonl"
    model = _mlp()
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # gamma drift: a finding in the file too
    mon = Monitor(model, every=1, sinks=JSONLSink(path), flush_every=3)
    with torch.no_grad():
        model[1].weight.div_(3.0)
    _train(model, mon, 7)
    mon.close()
    table = monitor.load(path)
    assert _same(list(table), mon.records)  # every record, in order, NaN included
    assert table[0]["type"] == "run" and table[0]["layers"] == ["1", "3", "5"]
    stats = table.where(type="layer_stats")
    assert [(r["layer"], r["window_start"], r["window_end"]) for r in stats] == [
        (name, a, b) for a, b in [(0, 2), (3, 5), (6, 6)] for name in ("1", "3", "5")]
    assert stats.column("calls") == [3, 3, 3, 3, 3, 3, 1, 1, 1]
    findings = [Finding.from_record(r) for r in monitor.load(path, type="finding")]
    assert findings == mon.findings() and findings[0].kind == "weight_drift"
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            table.to_pandas()
    else:
        assert len(table.to_pandas()) == len(table)
    lines = path.read_text().splitlines()
    assert all(json.loads(line)["type"] in ("run", "layer_stats", "finding") for line in lines)


def test_a_failing_sink_warns_once_and_nothing_else_is_lost(tmp_path):
    good, broken = ListSink(), BrokenSink()
    model = _mlp()
    mon = Monitor(model, every=1, sinks=[broken, good], flush_every=2)
    with pytest.warns(RuntimeWarning, match=r"sink BrokenSink\(\) raised OSError: disk full") as caught:
        _train(model, mon, 6)  # three flushes
        mon.close()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert broken.calls == 1  # disabled after the first failure
    assert len(good.batches) == 3 and good.closed
    assert [r for batch in good.batches for r in batch] == mon.records
    assert sum(r["type"] == "layer_stats" for r in mon.records) == 9


def test_a_sink_failing_on_close_warns_and_close_completes():
    class CloseFails(ListSink):
        def close(self):
            raise ValueError("boom")

    model = _mlp()
    mon = Monitor(model, every=1, sinks=CloseFails(), flush_every=None)
    _train(model, mon, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.close()
    assert len(caught) == 1 and "ValueError: boom" in str(caught[0].message)
    assert not model[1]._forward_hooks  # hooks gone despite the failure


def test_memory_only_monitor_keeps_records_and_bounds_them():
    model = _mlp()
    mon = Monitor(model, every=1, flush_every=1, keep_records=10)
    _train(model, mon, 6)
    assert len(mon.records) == 10 and mon.records[-1]["type"] == "layer_stats"
    assert mon.records[-1]["window_end"] == 5


def test_compare_flags_the_layer_whose_input_variance_shifted(tmp_path):
    model = _mlp()
    with Monitor(model, every=1, flush_every=None) as base_mon:
        _train(model, base_mon, 3, seed=1)
        baseline = base_mon.snapshot()
    path = tmp_path / "baseline.json"
    monitor.save_snapshot(baseline, path)
    assert baseline["layers"]["1"]["var_mean"] > 0 and len(baseline["layers"]["1"]["var_hist"]) == 162

    # Pruning-like change: the Linear feeding layer "1" now has 3x the weights (9x the input variance);
    # layers "3" and "5" see normalised activations and do not move.
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[0].bias.mul_(3.0)
    mon = Monitor(model, every=1, flush_every=None)
    _train(model, mon, 3, seed=1)
    found = mon.compare(path)
    assert [(f.layer, f.kind, f.severity) for f in found] == [("1", "variance_shift", "warning")]
    assert found[0].value == pytest.approx(9.0, rel=0.05)
    assert "input variance of layer 1 grew to 9" in found[0].message and "recalibrate" in found[0].message
    assert found[0] in mon.findings()
    assert mon.compare(baseline, factor=20.0) == []
    with pytest.raises(ValueError, match="Expected factor to be a number > 1"):
        mon.compare(baseline, factor=0.5)
    with pytest.raises(TypeError, match="Expected baseline to be a Monitor.snapshot"):
        mon.compare([1, 2])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="Expected a normscope monitor snapshot"):
        monitor.load_snapshot(bad)
