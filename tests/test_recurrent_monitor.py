"""LN-LSTM / LN-GRU seen by the rest of normscope: the Monitor once per time step (padding and the zero initial
state kept out of the statistics, the time step of the first non-finite value), analyze (placement
``recurrent``), convert / fold (left alone, with the reason), ONNX export checked by onnxruntime."""

from __future__ import annotations

import copy

import pytest
import torch

import normscope
from normscope.nn import LayerNormGRU, LayerNormLSTM


class Forecaster(torch.nn.Module):
    """A small sequence model: an input LayerNorm, a 2-layer LN-LSTM (or LN-GRU), a linear head."""

    def __init__(self, rnn_cls=LayerNormLSTM, bidirectional=False):
        super().__init__()
        self.inp = torch.nn.Linear(3, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.rnn = rnn_cls(8, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = torch.nn.Linear(16 * (2 if bidirectional else 1), 1)

    def forward(self, x, lengths=None):
        out, _ = self.rnn(self.norm(self.inp(x)), lengths=lengths)
        return self.head(out)


def _records(mon):
    return {r["layer"]: r for r in mon.flush() if r.get("type") == "layer_stats"}


@pytest.mark.parametrize("rnn_cls", [LayerNormLSTM, LayerNormGRU])
def test_monitor_sees_each_time_step_and_only_valid_rows(rnn_cls):
    torch.manual_seed(0)
    model = Forecaster(rnn_cls, bidirectional=True)
    lengths = torch.tensor([9, 4, 7])
    x = torch.randn(3, 9, 3)
    x[1, 4:] = float("nan")  # padding: must reach no statistic
    mon = normscope.Monitor(model, flush_every=None)
    model(x, lengths).nansum().backward()
    mon.step()
    recs = _records(mon)
    gates = 4 if rnn_cls is LayerNormLSTM else 3
    valid = int(lengths.sum())
    B = len(lengths)
    names = [layer.name for layer in mon.layers if layer.name.startswith("rnn.")]
    want = {"ln_ih", "ln_hh"} | ({"ln_c"} if rnn_cls is LayerNormLSTM else set())
    assert {n.split(".")[1].rsplit("_l", 1)[0] for n in names} == want
    for d in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        ih, hh = recs[f"rnn.ln_ih{d}"], recs[f"rnn.ln_hh{d}"]
        # the input norm: one call per time step (observed), every valid (step, sequence) once per gate block
        assert ih["calls"] == 9 and ih["rows"] == gates * valid
        # the hidden norm: not on a sequence's first step (the zero initial state), never on padding
        assert hh["rows"] == gates * (valid - B)
        assert hh["eps_rows"] == 0 and ih["nan_in"] == 0 and hh["nan_in"] == 0
        if rnn_cls is LayerNormLSTM:
            c = recs[f"rnn.ln_c{d}"]
            assert c["calls"] == 9 and c["rows"] == valid
    assert not [f for f in mon.findings() if f.layer.startswith("rnn.")]
    mon.close()


def test_nonfinite_input_reported_with_its_time_step():
    torch.manual_seed(1)
    model = Forecaster()
    x = torch.randn(2, 10, 3)
    x[1, 6, 0] = float("nan")
    mon = normscope.Monitor(model, flush_every=None)
    model(x, torch.tensor([10, 8]))
    mon.step()
    mon.flush()
    found = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    mon.close()
    assert len(found) == 1 and found[0].layer == "norm"  # the first norm in execution order: the input norm
    # with the input LayerNorm left out, the recurrent layer's input norm names the time step
    mon = normscope.Monitor(model, flush_every=None, filter_fn=lambda m, name: name.startswith("rnn."))
    model(x, torch.tensor([10, 8]))
    mon.step()
    mon.flush()
    found = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    mon.close()
    assert len(found) == 1 and found[0].layer == "rnn.ln_ih_l0" and found[0].step == 0
    assert "time step 6 of the sequence" in found[0].message and "input sequence" in found[0].message


def test_nonfinite_in_the_recurrence_reported_at_the_hidden_norm_and_time_step():
    torch.manual_seed(2)
    model = Forecaster()
    with torch.no_grad():
        model.rnn.weight_hh_l1[0, 0] = float("inf")
    mon = normscope.Monitor(model, flush_every=None)
    for _ in range(2):
        model(torch.randn(2, 5, 3))
        mon.step()
    mon.flush()
    found = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    mon.close()
    # step 0 of layer 1 has the zero initial state (not computed); step 1 multiplies a live state by inf
    assert len(found) == 1 and found[0].layer == "rnn.ln_hh_l1" and found[0].step == 0
    assert "time step 1 of the sequence" in found[0].message and "recurrence" in found[0].message


def test_monitor_under_training_loop_keeps_values_and_gradients():
    torch.manual_seed(3)
    model = Forecaster()
    ref = copy.deepcopy(model)
    x, lengths = torch.randn(4, 6, 3), torch.tensor([6, 5, 2, 1])
    mon = normscope.Monitor(model, flush_every=None)
    out = model(x, lengths)
    out.sum().backward()
    want = ref(x, lengths)
    want.sum().backward()
    # watched: per-step module calls; not watched: the fused CPU kernels; the same values to rounding
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()), msg=name)
    mon.step()
    recs = _records(mon)
    assert recs["rnn.ln_hh_l0"]["grad_input_norm"] > 0 and recs["rnn.ln_c_l1"]["grad_param_norm"] > 0
    mon.close()


def test_analyze_convert_fold_treat_them_as_recurrent_norms():
    torch.manual_seed(4)
    model = Forecaster()
    x = torch.randn(2, 5, 3)
    report = normscope.analyze(model, x)
    assert report["norm"].placement != "recurrent"
    for name in ("rnn.ln_ih_l0", "rnn.ln_hh_l0", "rnn.ln_c_l1"):
        assert report[name].placement == "recurrent" and not report[name].foldable
        assert "recurrent cell" in report[name].fold_reason
    assert report["rnn.ln_hh_l0"].calls == 4  # once per time step after the first (zero initial state)
    converted = normscope.convert(copy.deepcopy(model))
    assert [r.name for r in converted.replaced] == ["norm"] and not converted.skipped
    folded = copy.deepcopy(model)
    res = normscope.fold_norms_(folded, x)
    reasons = {s.name: s.reason for s in res.skipped}
    assert "recurrent cell" in reasons["rnn.ln_c_l0"]
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("rnn_cls", [LayerNormLSTM, LayerNormGRU])
def test_onnx_export_matches_under_onnxruntime(tmp_path, rnn_cls):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(5)
    model = Forecaster(rnn_cls, bidirectional=True).eval()
    x = torch.randn(2, 6, 3)
    report = normscope.export_onnx(model, x, tmp_path / "rnn.onnx")
    # 1 input norm + per layer and direction: 1 input norm, 5 hidden norms (not on the zero initial state),
    # 6 cell norms (LSTM)
    per_dir = 1 + 5 + (6 if rnn_cls is LayerNormLSTM else 0)
    assert report.expected_norms == 1 + 4 * per_dir
    assert report.ok and report.max_abs_diff < 1e-5, report


def test_gradcheck_float64_with_the_zero_initial_state():
    torch.manual_seed(6)
    m = LayerNormLSTM(3, 4, num_layers=1, bidirectional=True).double()
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().requires_grad_(True) for p in m.parameters()]

    def f(x, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,), {"lengths": lengths})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
