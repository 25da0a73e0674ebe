"""The Monitor under torch.compile(fullgraph=True) with inductor on the CPU.

The hooks call normscope's monitor custom ops when traced (normscope.monitor._compiled): no graph
break, the same records and findings as an eager-monitored twin, one compiled graph for sampled steps
and one for the others (none per step), and a closed monitor leaves a compiled model that runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import normscope
from normscope.monitor import Monitor

D = 16


class Net(torch.nn.Module):
    """torch LayerNorm, RMSNorm, GroupNorm and normscope.nn LayerNorm / RMSNorm, with linear layers between."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(D)
        self.fc1 = torch.nn.Linear(D, D)
        self.rms = torch.nn.RMSNorm(D)
        self.ns_ln = normscope.nn.LayerNorm(D)
        self.fc2 = torch.nn.Linear(D, D)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.ns_rms = normscope.nn.RMSNorm(D, eps=1e-6)

    def forward(self, x):
        h = self.fc1(self.ln(x))
        h = self.fc2(self.ns_ln(self.rms(h)))
        g = self.gn(h.reshape(h.shape[0], 4, -1)).reshape(h.shape)
        return self.ns_rms(g + h)


def _twins():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    return a, b


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)) for _ in range(n)]


def _train(model, mon, batches, poison_step=None):
    """SGD steps on ``batches``; at ``poison_step`` fc1's weight turns NaN (so rms is the first layer to see it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    net = getattr(model, "_orig_mod", model)
    for t, (x, w) in enumerate(batches):
        if t == poison_step:
            with torch.no_grad():
                net.fc1.weight[0, 0] = math.nan
        x = x.clone().requires_grad_()
        (model(x) * w).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.step()


def _stats(mon):
    return [r for r in mon.flush() if r["type"] == "layer_stats"]


def _assert_records_close(got, want):
    assert [(r["layer"], r["step"], r["window_start"], r["steps"]) for r in got] == \
        [(r["layer"], r["step"], r["window_start"], r["steps"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k, wv in w.items():
            gv = g[k]
            if isinstance(wv, float):
                assert (math.isnan(gv) and math.isnan(wv)) or gv == pytest.approx(wv, rel=1e-4, abs=1e-6), \
                    (g["layer"], k, gv, wv)
            elif isinstance(wv, list):
                torch.testing.assert_close(torch.tensor(gv, dtype=torch.float64),
                                           torch.tensor(wv, dtype=torch.float64), rtol=1e-4, atol=1e-6)
            else:
                assert gv == wv, (g["layer"], k, gv, wv)


@pytest.mark.slow
def test_fullgraph_train_and_eval_match_eager_twin():
    eager_net, net = _twins()
    eager_mon = Monitor(eager_net, every=2, flush_every=None)
    mon = Monitor(net, every=2, flush_every=None)  # before torch.compile
    compiled = torch.compile(net, fullgraph=True)
    batches = _batches(6)
    counters.clear()
    _train(eager_net, eager_mon, batches)
    _train(compiled, mon, batches)
    assert dict(counters["graph_break"]) == {}
    got, want = _stats(mon), _stats(eager_mon)
    assert len(want) == 5 and all(r["calls"] == 3 and r["grad_input_norm"] is not None for r in want)
    _assert_records_close(got, want)

    # Evaluation: a no-grad forward under the same compiled model is measured too (no input gradient).
    with torch.no_grad():
        x = batches[0][0]
        torch.testing.assert_close(compiled(x), eager_net(x), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}
    got, want = _stats(mon), [r for r in eager_mon.flush() if r["type"] == "layer_stats"]
    assert len(got) == 5 and all(r["calls"] == 1 for r in got)
    assert [r["var_mean"] for r in got] == pytest.approx([r["var_mean"] for r in want], rel=1e-4)
    eager_mon.close()
    mon.close()


@pytest.mark.slow
def test_nan_reported_at_same_layer_and_step_as_eager():
    eager_net, net = _twins()
    eager_mon = Monitor(eager_net, every=1, flush_every=None)
    net.compile(fullgraph=True)
    mon = Monitor(net, every=1, flush_every=None)  # after Module.compile()
    batches = _batches(5)
    counters.clear()
    _train(eager_net, eager_mon, batches, poison_step=3)
    _train(net, mon, batches, poison_step=3)
    assert dict(counters["graph_break"]) == {}
    want = [(f.layer, f.step, f.kind, f.message) for f in eager_mon.findings() if f.kind.startswith("nonfinite")]
    got = [(f.layer, f.step, f.kind, f.message) for f in mon.findings() if f.kind.startswith("nonfinite")]
    assert want[0][:3] == ("rms", 3, "nonfinite_input") and "between layer ln and this one" in want[0][3]
    assert got == want
    eager_mon.close()
    mon.close()


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(D)
        self.fc = torch.nn.Linear(D, D)
        self.rms = torch.nn.RMSNorm(D)

    def forward(self, x):
        return self.rms(self.fc(self.ln(x)))


@pytest.mark.slow
@pytest.mark.parametrize("every", [10, 1])
def test_no_recompilation_per_step(every):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Small()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, fullgraph=True, backend=cnt)
    mon = Monitor(net, every=every, flush_every=10)
    x = torch.randn(4, D, requires_grad=True)
    for _ in range(30):
        compiled(x).square().sum().backward()
        mon.step()
    # One graph for sampled steps, one for the others (every=1: sampled steps only).
    assert cnt.frame_count == (2 if every > 1 else 1)
    recs = [r for r in mon.records if r["type"] == "layer_stats"]
    assert [(r["layer"], r["window_start"], r["calls"]) for r in recs] == \
        [(name, start, 10 // every) for start in (0, 10, 20) for name in ("ln", "rms")]
    assert all(r["grad_input_steps"] == 10 // every for r in recs if r["layer"] == "rms")

    # Closing leaves a compiled model that still runs (the unsampled graph: no monitor ops), and records nothing.
    n = len(mon.records)
    mon.close()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    frames = cnt.frame_count
    for _ in range(3):
        compiled(x).sum().backward()
    assert cnt.frame_count == frames
    assert len(mon.records) == n


@pytest.mark.slow
def test_monitor_attached_after_compiled_calls_records():
    # Dynamo does not guard on module hooks: a monitor attached after the model ran compiled (here a
    # second monitor, after a first one was closed) must still have its hooks traced.
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Small()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, fullgraph=True, backend=cnt)
    x = torch.randn(4, D, requires_grad=True)
    compiled(x).sum().backward()  # compiled without hooks
    for _ in range(2):
        mon = Monitor(net, every=1, flush_every=None)
        for _ in range(3):
            compiled(x).sum().backward()
            mon.step()
        recs = [r for r in mon.flush() if r["type"] == "layer_stats"]
        assert [(r["layer"], r["calls"], r["grad_input_steps"]) for r in recs] == [("ln", 3, 3), ("rms", 3, 3)]
        mon.close()
    assert cnt.frame_count == 3  # unmonitored, then one graph per monitor