"""The finding rules (normscope.monitor.rules) on plain window records, and the NaN wording with sampling."""

import collections
import math
import random
import warnings

import pytest
import torch

from normscope.monitor import Monitor, Thresholds
from normscope.monitor import _layout as L
from normscope.monitor.rules import RuleContext, RuleState, detect

LAYOUT = L.Layout(16, (-4.0, 4.0))


def _window(series, *, per_step=True):
    """One layer's window record from ``[(step, input-grad norm, param-grad norm)]``.

    ``per_step``: the per-step series is attached (``WindowRaw.grad_series``); otherwise only the window
    means, as before that series was recorded.
    """
    raw = L.WindowRaw.from_row(LAYOUT.template_list(), LAYOUT)
    steps = [s for s, _, _ in series]
    raw.first_step, raw.last_step, raw.steps, raw.calls = min(steps), max(steps), len(steps), len(steps)
    for col_sum, col_n, k in ((L.S_GIN_SUM, L.S_GIN_N, 1), (L.S_GP_SUM, L.S_GP_N, 2)):
        raw.sums[col_sum] = sum(e[k] for e in series)
        raw.sums[col_n] = len(series)
    raw.grad_series = list(series) if per_step else []
    return raw


def _run(values, flush_every, th=None, per_step=True, n_layers=1):
    """Feed a per-step gradient-norm series (the same for input and parameters) through the rules, one window
    every ``flush_every`` steps; return the findings."""
    ctx = RuleContext([f"l{i}" for i in range(n_layers)], th or Thresholds())
    state = RuleState()
    found = []
    for start in range(0, len(values), flush_every):
        chunk = [(t, v, v) for t, v in enumerate(values[start:start + flush_every], start)]
        raws = {i: _window(chunk, per_step=per_step) for i in range(n_layers)}
        stats = {i: raw.stats(1e-5, 10.0) for i, raw in raws.items()}
        found += detect(raws, stats, ctx, state)
    return found


def _stationary(n, sigma, seed=0):
    rng = random.Random(seed)
    return [0.8 * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


@pytest.mark.parametrize("flush_every", [1, 10, 100])
@pytest.mark.parametrize("spike_at", [37, 250, 731])
def test_spike_found_at_its_step_whatever_the_flush_interval(flush_every, spike_at):
    values = _stationary(1000, 0.3)
    values[spike_at] *= 40.0  # one step, as after a learning-rate spike
    found = _run(values, flush_every)
    assert sorted((f.kind, f.step) for f in found) == [("grad_exploding", spike_at)] * 2  # input and params
    f = found[0]
    assert f.value == pytest.approx(values[spike_at] / 0.8, rel=0.5)
    assert f"at step {spike_at}" in f.message and "previous sampled steps" in f.message


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.5])
def test_no_finding_in_a_stationary_noisy_series(sigma):
    # 1000 steps of log-normal noise: sigma=1.5 spreads norms over more than 10x both ways; the robust
    # spread (MAD) keeps such a layer from being flagged by the factor alone.
    for seed in range(3):
        assert _run(_stationary(1000, sigma, seed), 10) == []


def test_a_spike_in_a_noisy_layer_needs_to_stand_out_of_its_spread():
    values = _stationary(600, 1.5, seed=1)
    values[400] = 0.8 * math.exp(12.0)  # 8 standard deviations of this layer's log-norm
    assert [(f.kind, f.step) for f in _run(values, 100)] == [("grad_exploding", 400)] * 2


def test_vanishing_and_reported_once_per_episode():
    values = _stationary(300, 0.2)
    for t in range(200, 205):
        values[t] *= 1e-3  # five steps far below: one finding per norm, at the first
    for t in range(260, 262):
        values[t] *= 1e-3  # a new episode after normal windows: reported again
    found = _run(values, 10)
    assert sorted((f.kind, f.step) for f in found) == [("grad_vanishing", 200)] * 2 + [("grad_vanishing", 260)] * 2
    assert all(f.value == pytest.approx(1e-3, rel=0.6) for f in found)


def test_warm_up_counts_sampled_steps_not_windows():
    th = Thresholds(grad_history_min_steps=50)
    values = _stationary(200, 0.2)
    values[30] *= 100.0  # during the warm-up: not judged
    values[120] *= 100.0
    assert [f.step for f in _run(values, 10, th)] == [120, 120]
    # without the per-step series, one window of 100 steps is already past the warm-up: the next one is judged
    values = _stationary(100, 0.2) + [100 * v for v in _stationary(100, 0.2, seed=1)]
    assert [f.step for f in _run(values, 100, th, per_step=False)] == [199, 199]


def test_window_means_when_no_per_step_series():
    # Without WindowRaw.grad_series the rules judge each window's mean against the previous windows'
    values = [1.0] * 40 + [1000.0] * 10 + [1.0] * 10
    found = _run(values, 10, per_step=False)
    assert sorted((f.kind, f.step) for f in found) == [("grad_exploding", 49)] * 2
    assert "previous windows" in found[0].message and "in steps 40-49" in found[0].message


def test_history_bound_by_grad_history_steps():
    th = Thresholds(grad_history_steps=20, grad_history_min_steps=5)
    ctx, state = RuleContext(["l0"], th), RuleState()
    raws = {0: _window([(t, 1.0 + 0.01 * t, 2.0) for t in range(50)])}
    detect(raws, {0: raws[0].stats(1e-5, 10.0)}, ctx, state)
    hist = state.grad_history[(0, "grad_input_norm")]
    assert list(hist) == pytest.approx([1.0 + 0.01 * t for t in range(30, 50)])
    assert state.grad_steps[(0, "grad_input_norm")] == 50
    assert state.sorted_logs[(0, "grad_input_norm")][1] == sorted(math.log(u) for u in hist)
    # a history replaced from outside (restored from a checkpoint, without its bound) is re-bounded and re-sorted
    state.grad_history[(0, "grad_input_norm")] = collections.deque([5.0, 1.0, 3.0] * 10)
    raws = {0: _window([(50, 3.0, 2.0)])}
    detect(raws, {0: raws[0].stats(1e-5, 10.0)}, ctx, state)
    hist = state.grad_history[(0, "grad_input_norm")]
    assert hist.maxlen == 20 and list(hist) == [3.0, 5.0, 1.0] * 6 + [3.0, 3.0]
    assert state.sorted_logs[(0, "grad_input_norm")][1] == sorted(math.log(u) for u in hist)


def test_deprecated_window_thresholds_warn():
    with pytest.warns(DeprecationWarning, match="grad_history_windows is deprecated.*grad_history_steps"):
        Thresholds(grad_history_windows=20)
    with pytest.warns(DeprecationWarning, match="grad_history_min_steps"):
        Thresholds(grad_history_min_windows=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Thresholds()
    for bad in (dict(grad_history_steps=0), dict(grad_history_min_steps=1.5), dict(grad_history_mad=-1.0)):
        with pytest.raises(ValueError, match="Expected Thresholds.grad_history"):
            Thresholds(**bad)


# --- NaN first seen at a sampled step ---------------------------------------------------------------------------


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(8)
        self.lin = torch.nn.Linear(8, 8)
        self.ln2 = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.ln2(self.lin(self.ln1(x)))


def _nan_run(every, nan_from, flush_every=None, steps=8):
    torch.manual_seed(0)
    model = Chain()
    mon = Monitor(model, every=every, flush_every=flush_every, grads=False)
    for t in range(steps):
        x = torch.randn(4, 8)
        if t >= nan_from:
            x[0, 0] = float("nan")  # the model's input is NaN from this step on
        with torch.no_grad():
            model(x)
        mon.step()
    found = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    mon.close()
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("flush_every", [None, 2])
def test_nan_at_a_sampled_step_says_since_the_last_clean_sampled_step(flush_every):
    # every=4: steps 0 and 4 are sampled; the NaN appears at step 5 (not watched) and is seen at step 8
    f = _nan_run(every=4, nan_from=5, flush_every=flush_every, steps=10)
    assert (f.layer, f.step) == ("ln1", 8)
    assert "between step 4, the previous sampled step" in f.message and "and step 8" in f.message
    assert "every=1" in f.message and "checkpoint" in f.message
    assert "before the first monitored layer (model inputs" not in f.message


@pytest.mark.parametrize("every, nan_from", [(1, 5), (4, 0)])
def test_nan_before_the_first_monitored_layer(every, nan_from):
    # every=1: step 4 was watched and clean; at the first step there is no earlier one: in both cases the NaN
    # arose in this step, before the first monitored layer
    f = _nan_run(every=every, nan_from=nan_from)
    assert (f.layer, f.step) == ("ln1", nan_from)
    assert "before the first monitored layer (model inputs, embeddings)" in f.message
    assert "previous sampled step" not in f.message


def test_nan_between_layers_with_sampling_keeps_the_layer_wording():
    torch.manual_seed(0)
    model = Chain()
    mon = Monitor(model, every=2, flush_every=None, grads=False)
    for t in range(6):
        if t == 3:
            with torch.no_grad():
                model.lin.weight[0, 0] = float("nan")  # between ln1 and ln2, from step 3 (not sampled)
        with torch.no_grad():
            model(torch.randn(4, 8))
        mon.step()
    (f,) = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    assert (f.layer, f.step) == ("ln2", 4) and "between layer ln1 and this one" in f.message


# --- a real training run with a learning-rate spike ---------------------------------------------------------------


class Residual(torch.nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.lin = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        for lin, norm in zip(self.lin, self.norm):
            x = x + torch.relu(lin(norm(x)))
        return self.head(x)


def _train(flush_every, spike, spike_at=150, steps=300):
    torch.manual_seed(0)
    model = Residual()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randn(16, 1)
    mon = Monitor(model, every=1, flush_every=flush_every)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.01 * (spike if t == spike_at else 1.0)
        x = torch.randn(32, 16)
        (model(x) - x @ target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    found = mon.findings()
    mon.close()
    return found


@pytest.mark.parametrize("flush_every", [1, 10, 100])
def test_learning_rate_spike_found_at_the_next_step(flush_every):
    # The update of step 150 uses 100x the learning rate: the gradients of step 151 jump in every layer.
    assert _train(flush_every, spike=1.0) == []
    found = _train(flush_every, spike=100.0)
    assert {(f.layer, f.kind, f.step) for f in found} == {(f"norm.{i}", "grad_exploding", 151) for i in range(3)}
