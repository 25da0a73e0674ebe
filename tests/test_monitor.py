"""normscope.Monitor: discovery, statistics against direct computation, findings, sampling, modes."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import normscope
from normscope.discovery import find_norm_layers
from normscope.monitor import Finding, Monitor, Thresholds


def _stats(records, layer=None):
    rows = [r for r in records if r["type"] == "layer_stats"]
    return {r["layer"]: r for r in rows} if layer is None else next(r for r in rows if r["layer"] == layer)


class HFRMSNorm(torch.nn.Module):
    """Llama-style RMSNorm, recognised by duck typing only."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


class BiaslessLayerNorm(torch.nn.Module):
    """Looks like an RMSNorm (weight + eps, no bias) but centres: only a probe can tell."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = 1e-5

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


class DebertaStyleLayerNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.bias = torch.nn.Parameter(torch.zeros(n))
        self.variance_epsilon = 1e-7

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.variance_epsilon)


class Scale(torch.nn.Module):
    """Not a norm: a 1-D weight and no eps."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.weight


def test_find_norm_layers_by_type_and_duck_typing():
    model = torch.nn.ModuleDict({
        "ln": torch.nn.LayerNorm((4, 8), eps=1e-6),
        "rms": torch.nn.RMSNorm(8),
        "ns": normscope.nn.LayerNorm(8, elementwise_affine=False),
        "gn": torch.nn.GroupNorm(2, 8),
        "bn": torch.nn.BatchNorm2d(8, affine=False),
        "inorm": torch.nn.InstanceNorm1d(8),
        "hf": HFRMSNorm(8),
        "deb": DebertaStyleLayerNorm(8),
        "lookalike": BiaslessLayerNorm(8),
        "scale": Scale(8),
        "lin": torch.nn.Linear(8, 8),
    })
    found = {x.name: x for x in find_norm_layers(model)}
    assert list(found) == ["ln", "rms", "ns", "gn", "bn", "inorm", "hf", "deb", "lookalike"]
    assert [found[n].kind for n in found] == ["layer_norm", "rms_norm", "layer_norm", "group_norm", "batch_norm",
                                              "instance_norm", "rms_norm", "layer_norm", "rms_norm"]
    assert found["ln"].normalized_shape == (4, 8) and found["ln"].eps == 1e-6 and found["ln"].affine
    assert found["rms"].eps is None and not found["ns"].affine and not found["bn"].affine
    assert found["hf"].duck_typed and found["hf"].eps == 1e-6 and not found["ln"].duck_typed
    # Probing runs the duck-typed candidates only, and tells a bias-free LayerNorm from an RMSNorm.
    probed = {x.name: x.kind for x in find_norm_layers(model, probe=True)}
    assert probed["lookalike"] == "layer_norm" and probed["hf"] == "rms_norm" and probed["deb"] == "layer_norm"
    only = find_norm_layers(model, filter_fn=lambda m, name: isinstance(m, torch.nn.GroupNorm) or name == "hf")
    assert [x.name for x in only] == ["gn", "hf"]
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got str"):
        find_norm_layers("model")


def test_find_norm_layers_on_a_meta_llama_runs_nothing():
    transformers = importlib.import_module("transformers")
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    with torch.device("meta"):  # any probe or forward would fail on meta tensors
        model = transformers.LlamaModel(cfg)
    layers = find_norm_layers(model)
    assert [x.name for x in layers] == ["layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                       "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm"]
    assert {x.kind for x in layers} == {"rms_norm"} and all(x.duck_typed and x.eps == 1e-6 for x in layers)


# --- first non-finite value -------------------------------------------------------------------------------


def _torch_encoder():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


def _bert():
    transformers = importlib.import_module("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).encoder


@pytest.mark.parametrize("arch", ["torch", "bert"])
def test_first_nonfinite_names_the_layer_and_step_where_it_appeared(arch):
    torch.manual_seed(0)
    model = _torch_encoder() if arch == "torch" else _bert()
    blocks = model.layers if arch == "torch" else model.layer
    k = 3

    def inject(module, args):
        if mon.current_step == k:  # one NaN in one sample's hidden state, entering block 2
            x = args[0].clone()
            x[1, 2, 5] = float("nan")
            return (x,) + args[1:]

    blocks[2].register_forward_pre_hook(inject)
    mon = Monitor(model, every=1, flush_every=None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(6):
        out = model(torch.randn(3, 4, 16))
        out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    first = [f for f in mon.findings() if f.kind.startswith("nonfinite_input")]
    expected = "layers.2.norm1" if arch == "torch" else "layer.2.attention.output.LayerNorm"
    previous = "layers.1.norm2" if arch == "torch" else "layer.1.output.LayerNorm"
    assert len(first) == 1, first
    f = first[0]
    assert (f.layer, f.step, f.severity) == (expected, k, "error")
    assert f"first non-finite input in layer {expected} at step {k}" in f.message
    assert f"between layer {previous} and this one" in f.message
    # The NaN reached every later layer (and, through the update, every layer afterwards): counted there.
    stats = _stats(mon.records)
    assert stats[expected]["nan_in"] > 0 and stats[previous]["nan_in"] > 0
    # Gradients became non-finite too; the first in backward order is reported once.
    assert [x.kind for x in mon.findings()].count("nonfinite_grad") == 1


def test_nonfinite_output_of_a_layer_with_finite_input():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    with torch.no_grad():
        model[2].weight[3] = float("inf")
    mon = Monitor(model, every=1, flush_every=None)
    model(torch.randn(5, 8))
    (f,) = [f for f in mon.findings() if f.kind.startswith("nonfinite")]
    assert (f.kind, f.layer, f.step, f.value) == ("nonfinite_output", "2", 0, 5.0)
    s = _stats(mon.records, "2")
    assert (s["nan_in"], s["inf_in"], s["inf_out"]) == (0, 0, 5)


# --- statistics against direct computation -------------------------------------------------------------


def test_eps_dominated_rows_are_counted_exactly():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16, eps=1e-5)
    mon = Monitor(torch.nn.Sequential(ln), every=1, flush_every=None)
    for step in range(3):
        x = torch.randn(32, 16) * 3
        if step >= 1:
            sign = torch.tensor([1.0, -1.0]).repeat(8)
            x[[1, 4, 9, 10, 17, 25, 31]] = 0.5 + math.sqrt(1e-9) * sign  # variance 1e-9 (<< 10 * eps)
            x[[2, 3]] = 0.5 + math.sqrt(1e-3) * sign  # variance 1e-3: above 10 * eps, not counted
        ln(x)
        mon.step()
    s = _stats(mon.flush(), "0")
    assert (s["eps_rows"], s["rows_sampled"]) == (14, 96)
    assert s["var_min"] == pytest.approx(1e-9, rel=1e-3)
    (f,) = mon.findings()
    assert (f.kind, f.layer, f.step, f.value, f.severity) == ("eps_dominated", "0", 1, 14.0, "warning")
    assert "14 of 96 sampled rows" in f.message and "masked_layer_norm" in f.message
    # Per window: exactly 7 of 32 after a flush every step.
    mon2 = Monitor(torch.nn.Sequential(ln), every=1, flush_every=1)
    x[0] = x[0] * 1e6  # finite, large: not eps-dominated
    ln(x)
    mon2.step()
    assert _stats(mon2.records, "0")["eps_rows"] == 7


def test_rms_norm_eps_criterion_uses_the_mean_square():
    rms = torch.nn.RMSNorm(8, eps=1e-6)
    mon = Monitor(torch.nn.Sequential(rms), every=1, flush_every=None)
    x = torch.full((4, 8), 2.0)  # zero variance, but mean square 4: not eps-dominated for an RMSNorm
    x[1] = 1e-5  # mean square 1e-10 < 10 * eps
    rms(x)
    s = _stats(mon.flush(), "0")
    assert s["eps_rows"] == 1 and s["var_max"] == pytest.approx(4.0)


def _reference_rows(kind, module, x):
    if kind == "group_norm":
        return x.reshape(x.shape[0] * module.num_groups, -1)
    if kind == "instance_norm":
        return x.reshape(x.shape[0] * x.shape[1], -1)
    if kind == "batch_norm":
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"])
def test_statistics_equal_direct_computation(kind):
    torch.manual_seed(0)
    module, shape = {
        "layer_norm": (torch.nn.LayerNorm(24), (6, 5, 24)),
        "rms_norm": (HFRMSNorm(24), (6, 5, 24)),
        "group_norm": (torch.nn.GroupNorm(3, 6), (4, 6, 10)),
        "batch_norm": (torch.nn.BatchNorm1d(6), (4, 6, 10)),
        "instance_norm": (torch.nn.InstanceNorm1d(6), (4, 6, 10)),
    }[kind]
    mon = Monitor(torch.nn.Sequential(module), every=1, flush_every=None, hist_bins=16, hist_range=(-4.0, 4.0))
    xs, ys = [], []
    for step in range(3):
        x = torch.randn(shape) * torch.rand(shape[:2] + (1,)) * 3 + 0.5
        if step == 1:
            x.view(-1)[[7, 8, 100]] = float("nan")
            x.view(-1)[200] = float("inf")
        y = module(x)
        xs.append(x)
        ys.append(y.detach())
        mon.step()
    s = _stats(mon.flush(), "0")

    rows = torch.cat([_reference_rows(kind, module, x) for x in xs]).double()
    row_mean = rows.mean(-1)
    row_var = rows.square().mean(-1) if kind == "rms_norm" else rows.var(-1, correction=0)
    ok = torch.isfinite(row_var)
    assert s["rows"] == s["rows_sampled"] == rows.shape[0] and s["calls"] == 3
    assert s["rows_nonfinite"] == int((~ok).sum()) > 0
    rtol = 1e-5
    assert s["var_mean"] == pytest.approx(float(row_var[ok].mean()), rel=rtol)
    assert s["var_min"] == pytest.approx(float(row_var[ok].min()), rel=rtol)
    assert s["var_max"] == pytest.approx(float(row_var[ok].max()), rel=rtol)
    assert s["in_mean"] == pytest.approx(float(row_mean[ok].mean()), rel=rtol, abs=1e-6)
    assert s["in_row_mean_min"] == pytest.approx(float(row_mean[ok].min()), rel=rtol)
    assert s["in_row_mean_max"] == pytest.approx(float(row_mean[ok].max()), rel=rtol)
    one_bin = 10 ** (1 / 8) * (1 + 1e-6)  # percentiles come from a log histogram, 8 bins per decade
    for q in (50, 90, 99):
        exact = float(torch.quantile(row_var[ok], q / 100))
        assert exact / one_bin <= s[f"var_p{q}"] <= exact * one_bin, (q, s[f"var_p{q}"], exact)
    x_all = torch.cat([x.reshape(-1) for x in xs])
    y_all = torch.cat([y.reshape(-1) for y in ys]).double()
    assert (s["nan_in"], s["inf_in"]) == (3, 1)
    assert (s["nan_out"], s["inf_out"]) == (int(torch.isnan(y_all).sum()), int(torch.isinf(y_all).sum()))
    fin = y_all[torch.isfinite(y_all)]
    assert s["out_mean"] == pytest.approx(float(fin.mean()), abs=1e-6)
    assert s["out_std"] == pytest.approx(float(fin.std(correction=0)), rel=1e-5)
    # The input histogram: [underflow, 16 bins, overflow] with bucketize(right=True) semantics; NaN left out.
    edges = np.linspace(-4.0, 4.0, 17)
    v = x_all[~torch.isnan(x_all)].numpy()
    expected = np.bincount(np.searchsorted(edges, v, side="right"), minlength=18)
    assert s["in_hist"] == expected.tolist() and sum(s["in_hist"]) == x_all.numel() - 3
    # The variance histogram holds every finite row (its percentiles above rely on that).
    snap = mon.snapshot()["layers"]["0"]
    assert sum(snap["var_hist"]) == int(ok.sum())


def test_gradient_norms_equal_autograd():
    torch.manual_seed(0)
    lin, ln, head = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
    model = torch.nn.Sequential(lin, ln, head)
    mon = Monitor(model, every=1, flush_every=None)
    expected_in, expected_p = [], []
    for step in range(3):
        x = torch.randn(5, 8)
        h = lin(x)
        h.retain_grad()  # the LayerNorm's input; it feeds nothing else
        loss = head(ln(h)).square().sum() * (step + 1)
        loss.backward()
        expected_in.append(float(h.grad.norm()))
        expected_p.append(math.sqrt(float(ln.weight.grad.norm() ** 2 + ln.bias.grad.norm() ** 2)))
        model.zero_grad()
        mon.step()
    s = _stats(mon.flush(), "1")
    assert s["grad_input_steps"] == s["grad_param_steps"] == 3
    assert s["grad_input_norm"] == pytest.approx(np.mean(expected_in), rel=1e-5)
    assert s["grad_input_norm_min"] == pytest.approx(min(expected_in), rel=1e-5)
    assert s["grad_input_norm_max"] == pytest.approx(max(expected_in), rel=1e-5)
    assert s["grad_param_norm"] == pytest.approx(np.mean(expected_p), rel=1e-5)
    assert s["grad_param_norm_max"] == pytest.approx(max(expected_p), rel=1e-5)


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x) + x


def test_input_gradient_is_the_one_through_the_layer_and_accumulation_is_handled():
    torch.manual_seed(0)
    model = Residual()
    mon = Monitor(model, every=1, flush_every=None)
    c = torch.randn(4, 8)
    x1, x2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    (model(x1) * c).sum().backward()  # two micro-batches accumulated into one step
    (model(x2) * c).sum().backward()
    through = [torch.autograd.grad(torch.nn.functional.layer_norm(x, (8,), model.norm.weight, model.norm.bias),
                                   x, c)[0] for x in (x1.detach().requires_grad_(), x2.detach().requires_grad_())]
    mon.step()
    s = _stats(mon.flush(), "norm")
    # Input: the gradient reaching x through the norm only (not x.grad, which adds the residual's c),
    # summed in squares over the step's micro-batches. Parameters: the accumulated .grad the optimizer sees.
    expected_in = math.sqrt(sum(float(g.norm()) ** 2 for g in through))
    assert s["grad_input_norm"] == pytest.approx(expected_in, rel=1e-5)
    assert expected_in != pytest.approx(float(x1.grad.norm()), rel=1e-2)
    expected_p = math.sqrt(float(model.norm.weight.grad.norm() ** 2 + model.norm.bias.grad.norm() ** 2))
    assert s["grad_param_norm"] == pytest.approx(expected_p, rel=1e-5) and s["grad_param_steps"] == 1


def test_gamma_and_beta_drift_from_the_reference():
    ln = torch.nn.LayerNorm(16)
    mon = Monitor(torch.nn.Sequential(ln), every=1, flush_every=None)
    with torch.no_grad():
        ln.weight[3] += 4.0
        ln.weight[5] -= 1.0
        ln.bias.add_(0.1)
    ln(torch.randn(2, 16))
    s = _stats(mon.flush(), "0")
    assert s["weight_drift_l2"] == pytest.approx(math.sqrt(17.0))
    assert s["weight_drift_max"] == pytest.approx(4.0)
    assert s["weight_drift_rms"] == pytest.approx(math.sqrt(17.0 / 16))
    assert s["weight_max"] == pytest.approx(5.0) and s["weight_min"] == pytest.approx(0.0)
    assert s["bias_drift_max"] == pytest.approx(0.1) and s["bias_mean"] == pytest.approx(0.1)
    (f,) = mon.findings()
    assert (f.kind, f.layer, f.value) == ("weight_drift", "0", pytest.approx(math.sqrt(17.0 / 16)))
    assert "gamma (weight) of layer 0 moved" in f.message


# --- gradient findings -------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class Parallel(torch.nn.Module):
    """Four norms on four independent inputs; ``boost`` scales the gradient reaching one of them."""

    def __init__(self):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(4))
        self.boost = {}

    def forward(self, xs, cs):
        return sum((_ScaleGrad.apply(norm(x), self.boost.get(i, 1.0)) * c).sum()
                   for i, (norm, x, c) in enumerate(zip(self.norms, xs, cs)))


def test_gradient_findings_against_history_and_other_layers():
    torch.manual_seed(0)
    model = Parallel()
    # one window per step; a short warm-up (4 sampled steps) for this short run
    mon = Monitor(model, every=1, flush_every=1, thresholds=Thresholds(grad_history_min_steps=4))
    xs = [torch.randn(4, 8, requires_grad=True) for _ in range(4)]
    cs = [torch.randn(4, 8) for _ in range(4)]

    def run(scale=1.0):
        (model(xs, cs) * scale).backward()
        model.zero_grad()
        mon.step()

    for _ in range(4):
        run()
    assert mon.findings() == []
    run(scale=1e3)  # every layer's gradients jump: against their own history
    run(scale=1e3)  # still high: not reported again
    new = mon.findings()
    assert sorted((f.layer, f.kind) for f in new) == sorted(
        [(f"norms.{i}", "grad_exploding") for i in range(4)] * 2)  # input and parameter gradient norms
    assert all(f.value == pytest.approx(1e3, rel=1e-4) and f.step == 4 for f in new)
    assert any("input gradient norm of layer norms.1 is 1e+03x its median" in f.message for f in new)
    run()
    g = [_stats(mon.records)[f"norms.{i}"]["grad_input_norm"] for i in range(4)]
    model.boost = {2: 1e4}  # one layer's input gradient far above the others'
    run()
    out = [f for f in mon.findings()[8:] if f.kind == "grad_outlier"]
    expected = 1e4 * g[2] / float(np.median([g[0], g[1], g[3]]))
    assert [(f.layer, f.step, f.value) for f in out] == [("norms.2", 7, pytest.approx(expected, rel=1e-4))]
    assert "input gradient norm of layer norms.2" in out[0].message
    model.boost = {}
    for _ in range(3):  # a scale far below the history: vanishing
        run(scale=1e-4)
    assert {(f.layer, f.kind) for f in mon.findings()[9:]} >= {(f"norms.{i}", "grad_vanishing") for i in range(4)}


# --- sampling, modes ------------------------------------------------------------------------------------------


def test_every_n_samples_steps_and_unsampled_steps_do_no_tensor_work():
    from torch.overrides import TorchFunctionMode

    class CountOps(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountOps.n += 1
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    mon = Monitor(model, every=3, flush_every=None)
    x = torch.randn(4, 8)
    counts = []
    for step in range(7):
        CountOps.n = 0
        with CountOps():
            model(x).sum().backward()
            mon.step()
        counts.append(CountOps.n)
    s = _stats(mon.flush(), "1")
    assert (s["calls"], s["steps"], s["grad_input_steps"], s["rows"]) == (3, 3, 3, 12)  # steps 0, 3 and 6
    assert (s["window_start"], s["window_end"]) == (0, 6)
    unsampled = [counts[i] for i in (1, 2, 4, 5)]
    mon.close()
    CountOps.n = 0
    with CountOps():
        model(x).sum().backward()
    assert unsampled == [CountOps.n] * 4  # the same torch work as without a monitor
    assert counts[0] > CountOps.n + 20


def test_row_fraction_samples_every_kth_row_with_a_rotating_offset():
    ln = torch.nn.LayerNorm(4)
    mon = Monitor(torch.nn.Sequential(ln), every=1, row_fraction=0.25, flush_every=1)
    x = torch.arange(10.0)[:, None] * torch.tensor([-1.0, 1.0, -1.0, 1.0])  # row r has variance r**2
    for step in range(4):
        ln(x)
        mon.step()
    means = [(r["rows"], r["rows_sampled"], r["var_mean"]) for r in mon.records if r["type"] == "layer_stats"]
    expected = [float((torch.arange(10.0)[start::4] ** 2).mean()) for start in range(4)]
    assert [m[:2] for m in means] == [(10, 3), (10, 3), (10, 2), (10, 2)]
    assert [m[2] for m in means] == pytest.approx(expected)


def test_input_histogram_is_capped_at_hist_max_elements():
    ln = torch.nn.LayerNorm(16)
    mon = Monitor(torch.nn.Sequential(ln), every=1, hist_max_elements=40, hist_bins=4, hist_range=(-100.0, 100.0),
                  flush_every=None)
    x = torch.arange(10.0)[:, None] + torch.linspace(0, 1, 16)  # row r holds values in [r, r + 1]
    ln(x)
    s = _stats(mon.flush(), "0")
    # At most 40 // 16 = 2 rows, evenly spaced: rows 0 and 5 (all their values fall in bin [0, 50)).
    assert s["in_hist"] == [0, 0, 0, 32, 0, 0] and s["rows_sampled"] == 10 and s["var_mean"] > 0


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_inference_mode_and_no_grad(mode):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with Monitor(model, every=1, flush_every=2) as mon:
        for _ in range(3):
            with ctx():  # the accumulators are created inside the mode on the first call
                model(torch.randn(4, 8))
            mon.step()
        model(torch.randn(4, 8)).sum().backward()  # and still usable outside it afterwards
        mon.step()
    stats = [r for r in mon.records if r["type"] == "layer_stats"]
    assert [(r["layer"], r["calls"], r["grad_input_steps"]) for r in stats] == [
        ("1", 2, 0), ("2", 2, 0), ("1", 2, 1), ("2", 2, 1)]
    assert stats[0]["grad_input_norm"] is None and stats[0]["var_mean"] > 0


def test_transformers_llama_duck_typed_rmsnorm():
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaModel(cfg)
    seen = {}
    model.norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))
    with Monitor(model, every=1, flush_every=None) as mon:
        model(torch.randint(0, 50, (2, 6))).last_hidden_state.sum().backward()
    stats = _stats(mon.records)
    assert len(stats) == 5 and all(s["kind"] == "rms_norm" and s["grad_input_steps"] == 1 for s in stats.values())
    ms = seen["x"].double().square().mean(-1)
    assert stats["norm"]["var_mean"] == pytest.approx(float(ms.mean()), rel=1e-5)


@pytest.mark.slow
def test_torch_compile_aot_eager_matches_eager():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _torch_encoder()
    xs = [torch.randn(2, 5, 16) for _ in range(4)]

    def run(fn):
        mon = Monitor(model, every=2, flush_every=None)  # hooks registered before compiling
        graphs = []
        for x in xs:
            fn(x).square().mean().backward()
            model.zero_grad()
            mon.step()
            graphs.append(counters["stats"]["unique_graphs"])
        mon.close()
        return _stats(mon.records), graphs

    eager, _ = run(model)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = run(torch.compile(model, backend="aot_eager"))
    # The hooks call the monitor's custom ops in the graph; nothing recompiles from step to step.
    assert graphs[1] == graphs[-1] > 0
    assert list(compiled) == list(eager) and len(eager) == 8
    for name, e in eager.items():
        c = compiled[name]
        assert (c["calls"], c["grad_input_steps"], c["grad_param_steps"]) == (2, 2, 2)
        for key in ("var_mean", "var_max", "out_std", "grad_input_norm", "grad_param_norm"):
            assert c[key] == pytest.approx(e[key], rel=1e-5), (name, key)


def test_validation_and_lifecycle():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got int"):
        Monitor(3)
    with pytest.raises(ValueError, match="Expected every to be a positive int, but got 0"):
        Monitor(model, every=0)
    with pytest.raises(ValueError, match=r"Expected row_fraction to be in \(0, 1\], but got 1.5"):
        Monitor(model, row_fraction=1.5)
    with pytest.raises(ValueError, match="Expected hist_range"):
        Monitor(model, hist_range=(1.0, -1.0))
    with pytest.raises(TypeError, match="Expected each sink to have write"):
        Monitor(model, sinks=[object()])
    with pytest.raises(ValueError, match="at least one normalization layer, but found none that filter_fn"):
        Monitor(model, filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="Expected Thresholds.drift to be a positive finite number"):
        Thresholds(drift=-1.0)
    with pytest.raises(ValueError, match="Expected kind to be one of"):
        Finding("a", 0, "bogus", "info", 0.0, "")
    with Monitor(model, every=1) as mon:
        assert len(model[0]._forward_hooks) == 1 and len(model[0]._forward_pre_hooks) == 1
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert not model[0].weight._post_accumulate_grad_hooks
    mon.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        mon.step()
    assert normscope.Monitor is Monitor and "Monitor" in normscope.__all__
