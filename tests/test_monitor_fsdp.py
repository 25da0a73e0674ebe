"""normscope.Monitor under FSDP2 (``torch.distributed.fsdp.fully_shard``) on two gloo ranks: the gradient hooks of
the sharded (DTensor) gamma/beta fire, and the flushed figures (gradient norms, gamma/beta statistics and drift,
the per-step gradient series) are global, equal to those of one process on the same global batch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist

from dist_helpers import gloo_rank, run_ranks, write_result
from normscope.monitor import Monitor

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()
                                     and hasattr(fsdp, "fully_shard")),
                                reason="needs torch.distributed with the gloo backend and FSDP2 (fully_shard)")

WORLD, BATCH, SEQ, DIM, STEPS, FLUSH_AT = 2, 8, 3, 9, 4, 1  # DIM = 9: shards of 5 and 4 rows
LAYERS = ("ln", "rms", "tiny", "top")
PARAM_KEYS = tuple(f"{p}_{f}" for p in ("weight", "bias") for f in
                   ("mean", "std", "min", "max", "norm", "drift_l2", "drift_max", "drift_rms"))
GRAD_KEYS = ("grad_input_norm", "grad_input_norm_min", "grad_input_norm_max", "grad_param_norm",
             "grad_param_norm_min", "grad_param_norm_max")
EXACT_KEYS = ("rows", "rows_sampled", "grad_input_steps", "grad_param_steps", "in_hist", "steps")
VAR_KEYS = ("in_mean", "var_mean", "var_min", "var_max", "out_mean", "out_std")


class Net(torch.nn.Module):
    """Norms of odd width (uneven shards), one of width 1 (an empty shard on rank 1), one in the root group."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(DIM, DIM)
        self.ln = torch.nn.LayerNorm(DIM)
        self.mid = torch.nn.Linear(DIM, DIM)
        self.rms = torch.nn.RMSNorm(DIM)
        self.gate = torch.nn.Linear(DIM, 1)
        self.tiny = torch.nn.RMSNorm(1)  # weight of shape (1,): rank 1's shard is empty
        self.top = torch.nn.LayerNorm(DIM)  # not wrapped on its own: in the root's group

    def forward(self, x):
        h = self.rms(self.mid(torch.nn.functional.gelu(self.ln(self.inp(x)))))
        t = self.tiny(self.gate(h) * 3.0 + 1.0)
        return self.top(h * t)


def _batch(step):
    g = torch.Generator().manual_seed(200 + step)
    scale = torch.linspace(0.3, 3.0, BATCH, dtype=torch.float64).view(BATCH, 1, 1)
    return torch.randn(BATCH, SEQ, DIM, generator=g, dtype=torch.float64) * scale


def _target(step):
    return torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(300 + step), dtype=torch.float64)


def _train(rank, world, shard=None, before=False):
    """Train STEPS steps on this rank's part of the batch; flush after step FLUSH_AT and at the end.

    ``shard``: a function wrapping the model (fully_shard); ``before``: create the Monitor before wrapping.
    Returns the flushed records, the per-layer grad_series of each window, and the all_reduce calls per flush.
    """
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():  # gamma/beta away from their initial values, so that their statistics mean something
        for name, p in net.named_parameters():
            if name.split(".")[0] in LAYERS:
                p.add_(torch.linspace(-0.5, 0.5, p.numel(), dtype=p.dtype).view_as(p))
    mon = Monitor(net, every=1, flush_every=None, hist_range=(-4.0, 4.0), hist_bins=8) if before else None
    if shard is not None:
        shard(net)
    if mon is None:
        mon = Monitor(net, every=1, flush_every=None, hist_range=(-4.0, 4.0), hist_bins=8)
    series, calls = [], []
    read = mon._read_window_dist if world > 1 else mon._read_window
    setattr(mon, read.__name__, lambda *a: _kept(read(*a), series))
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    windows = []
    for step in range(STEPS):
        loss = (net(_batch(step)[lo:hi]) - _target(step)[lo:hi]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step()
        if step in (FLUSH_AT, STEPS - 1):
            before_flush = len(_CALLS)
            windows.append(mon.flush())
            calls.append(_CALLS[before_flush:])
    mon.close()
    return windows, series, calls


def _kept(raws, series):
    series.append({str(i): [list(e) for e in raw.grad_series] for i, raw in raws.items()})
    return raws


_CALLS = []


def _fully_shard(net):
    for m in (net.ln, net.rms, net.tiny):
        fsdp.fully_shard(m)
    fsdp.fully_shard(net)


def _worker(rank, world, port, out_dir):
    real = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _CALLS.append(str(op))
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting  # the collectives the Monitor issues (FSDP2 does not all-reduce here)
    with gloo_rank(rank, world, port, out_dir):
        steps_calls = len(_CALLS)
        after = _train(rank, world, _fully_shard)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = _train(rank, world, _fully_shard, before=True)
        write_result(out_dir, rank, {
            "after": after, "before": before, "calls": len(_CALLS) - steps_calls,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]})


def _run_ranks(world, out_dir, timeout=150.0):
    return run_ranks(_worker, world, out_dir, timeout)


def _stats(records):
    return {r["layer"]: r for r in records if r["type"] == "layer_stats"}


def _close(a, b, rel=1e-9):
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _same_series(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and _close(x[1], y[1]) and _close(x[2], y[2]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_ranks(WORLD, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def single():
    return _train(0, 1)


def test_fsdp2_gives_the_single_process_figures(ranks, single):
    s_windows, s_series, _ = single
    windows, series, calls = ranks[0]["after"]
    assert ranks[1]["after"] == ranks[0]["after"]  # every rank gets the same global records and series
    assert len(windows) == len(s_windows) == 2
    for w, (sw, dw) in enumerate(zip(s_windows, windows)):
        s, d = _stats(sw), _stats(dw)
        assert set(d) == set(s) == set(LAYERS)
        for name in LAYERS:
            for key in EXACT_KEYS:
                assert d[name][key] == s[name][key], (w, name, key)
            for key in GRAD_KEYS + PARAM_KEYS + VAR_KEYS:
                assert (key in d[name]) == (key in s[name]), (w, name, key)
                if key in s[name]:  # variances: other summation orders (the ranks' moments merged by Chan)
                    rel = 1e-6 if key in VAR_KEYS else 1e-9
                    assert _close(d[name][key], s[name][key], rel), (w, name, key, d[name][key], s[name][key])
            assert d[name]["grad_param_steps"] == d[name]["steps"]  # steps, not (rank, step) pairs
        assert d["tiny"]["weight_std"] == 0.0 and "bias_mean" not in d["tiny"]
    for w in range(2):  # the per-step series: (step, |dL/dx|, |dL/d(gamma, beta)|) of every sampled step
        assert set(series[w]) == set(s_series[w]) == {"0", "1", "2", "3"}
        for i in s_series[w]:
            assert len(s_series[w][i]) == (FLUSH_AT + 1 if w == 0 else STEPS - FLUSH_AT - 1)
            assert _same_series(series[w][i], s_series[w][i]), (w, i, series[w][i], s_series[w][i])
            assert all(math.isfinite(e[1]) and e[2] > 0 for e in series[w][i])


def test_fsdp2_flush_issues_one_sum_and_one_max(ranks):
    for r in range(WORLD):
        windows, _, calls = ranks[r]["after"]
        assert calls == [[str(dist.ReduceOp.SUM), str(dist.ReduceOp.MAX)]] * 2
    # Between flushes the Monitor issues none: every all_reduce of the run came from a flush (and close()).
    assert ranks[0]["calls"] == sum(len(c) for run in ("after", "before") for c in ranks[0][run][2]) + 2 * 2


def test_monitor_created_before_fully_shard_follows_the_dtensor_parameters(ranks, single):
    s_windows, s_series, _ = single
    windows, series, _ = ranks[0]["before"]
    assert any("was replaced after the Monitor was created" in m for m in ranks[0]["warnings"])
    for w, (sw, dw) in enumerate(zip(s_windows, windows)):
        s, d = _stats(sw), _stats(dw)
        for name in LAYERS:
            for key in PARAM_KEYS:  # drift still from the values at construction
                if key in s[name]:
                    assert _close(d[name][key], s[name][key]), (w, name, key, d[name][key], s[name][key])
            # The parameter gradients of the first step went to the replaced parameters: missed.
            assert d[name]["grad_param_steps"] == s[name]["grad_param_steps"] - (w == 0)
    for w in range(2):
        for i, entries in s_series[w].items():
            expected = [[e[0], e[1], math.nan if e[0] == 0 else e[2]] for e in entries]
            assert _same_series(series[w][i], expected), (w, i)
