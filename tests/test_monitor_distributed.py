"""normscope.Monitor under torch.distributed: flush all-reduces the window, so that the statistics of
two ranks on halves of a batch equal those of one process on the whole batch (DDP here; FSDP2 in
test_monitor_fsdp.py)."""

from __future__ import annotations

import datetime
import json
import math

import pytest
import torch
import torch.distributed as dist

from dist_helpers import gloo_rank, run_ranks, write_result
from normscope.monitor import JSONLSink, Monitor

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

BATCH, SEQ, DIM, STEPS, NAN_STEP = 8, 5, 16, 4, 4
NAN_SAMPLE = 5  # in rank 1's half (samples 4..7): rank 1's local sample 1
KEYS_EXACT = ("rows", "rows_sampled", "rows_nonfinite", "eps_rows", "nan_in", "inf_in", "nan_out", "inf_out",
              "grad_input_steps", "grad_param_steps", "in_hist", "steps", "window_start", "window_end")
KEYS_CLOSE = ("in_mean", "in_row_mean_min", "in_row_mean_max", "var_mean", "var_min", "var_p50", "var_p90",
              "var_p99", "var_max", "out_mean", "out_std", "grad_input_norm", "grad_input_norm_min",
              "grad_input_norm_max", "grad_param_norm", "grad_param_norm_min", "grad_param_norm_max") + tuple(
    f"{p}_{f}" for p in ("weight", "bias") for f in ("mean", "std", "min", "max", "norm", "drift_l2", "drift_max",
                                                      "drift_rms"))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(DIM, DIM)
        self.ln1 = torch.nn.LayerNorm(DIM)
        self.mid = torch.nn.Linear(DIM, DIM)
        self.ln2 = torch.nn.LayerNorm(DIM)
        self.rms = torch.nn.RMSNorm(DIM)
        self.nan_sample = None  # a local sample whose activation before ln2 becomes NaN

    def forward(self, x):
        h = self.mid(torch.nn.functional.gelu(self.ln1(self.inp(x))))
        if self.nan_sample is not None:
            h = h.clone()
            h[self.nan_sample, 0, 0] = math.nan
        return self.rms(self.ln2(h) * 3.0)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    scale = torch.linspace(0.2, 4.0, BATCH, dtype=torch.float64).view(BATCH, 1, 1)  # ranks see different ranges
    return torch.randn(BATCH, SEQ, DIM, generator=g, dtype=torch.float64) * scale


def _train(rank, world, sinks=None, ddp=False, series=None):
    """Run STEPS clean steps (flush), then one step with a NaN (flush); return the monitor and window records.

    ``series``: a list that receives each window's per-layer ``WindowRaw.grad_series``."""
    torch.manual_seed(0)
    net = Net().double()
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    mon = Monitor(net, every=1, sinks=sinks, flush_every=None, hist_range=(-6.0, 6.0), hist_bins=24)
    if series is not None:
        read = mon._read_window_dist if dist.is_initialized() else mon._read_window
        setattr(mon, read.__name__, lambda *a: _kept(read(*a), series))
    windows = []
    for step in range(STEPS + 1):
        if step == NAN_STEP and lo <= NAN_SAMPLE < hi:
            net.nan_sample = NAN_SAMPLE - lo
        loss = model(_batch(step)[lo:hi]).square().mean()
        loss.backward()
        net.nan_sample = None
        if step < NAN_STEP:  # keep the weights finite (and equal to the single process's)
            opt.step()
        opt.zero_grad()
        mon.step()
        if step in (NAN_STEP - 1, NAN_STEP):
            windows.append(mon.flush())
    return mon, windows


def _kept(raws, series):
    series.append({str(i): [list(e) for e in raw.grad_series] for i, raw in raws.items()})
    return raws


def _worker(rank, world, port, out_dir):
    calls = []
    real = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(str(op))
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting  # the Monitor's collectives (DDP reduces gradients in its C++ reducer)
    with gloo_rank(rank, world, port, out_dir):
        series = []
        mon, windows = _train(rank, world, sinks=[JSONLSink(f"{out_dir}/sink{rank}.jsonl")], ddp=True,
                              series=series)
        train_calls = list(calls)
        findings = [f.to_record() for f in mon.findings()]
        mon.close()
        write_result(out_dir, rank, {"windows": windows, "findings": findings, "series": series,
                                     "calls": train_calls})


def _run_ranks(world, out_dir, timeout=120.0):
    return run_ranks(_worker, world, out_dir, timeout)


def _layer_stats(records):
    return {r["layer"]: r for r in records if r["type"] == "layer_stats"}


def _same(a, b, key, rel=1e-9):
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _same_series(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and _same(x[1], y[1], "") and _same(x[2], y[2], "")
                                    for x, y in zip(a, b))


def test_two_ranks_report_the_single_process_statistics(tmp_path):
    out = _run_ranks(2, tmp_path)
    single_series = []
    _, single_windows = _train(0, 1, series=single_series)
    single_findings = [r for w in single_windows for r in w if r["type"] == "finding"]

    for w, (single, dist0, dist1) in enumerate(zip(single_windows, out[0]["windows"], out[1]["windows"])):
        s, d0, d1 = _layer_stats(single), _layer_stats(dist0), _layer_stats(dist1)
        assert set(s) == set(d0) == {"ln1", "ln2", "rms"}
        assert json.dumps(d1) == json.dumps(d0)  # every rank gets the global figures (NaN included)
        for name in s:
            for key in KEYS_EXACT:
                assert d0[name][key] == s[name][key], (w, name, key)
            for key in KEYS_CLOSE:
                assert _same(d0[name].get(key), s[name].get(key), key), (w, name, key, d0[name].get(key),
                                                                          s[name].get(key))
            assert d0[name]["calls"] == 2 * s[name]["calls"]  # forward calls over all ranks
            # The gradient of gamma/beta that DDP averaged (what the optimizer uses), counted once per step.
            assert d0[name]["grad_param_steps"] == s[name]["grad_param_steps"] == s[name]["steps"]
        if w == 0:
            assert all(d0[n]["nan_in"] == 0 for n in d0)
            assert all(math.isfinite(d0[n]["grad_input_norm"]) for n in d0)
        else:
            assert d0["ln2"]["nan_in"] == 1 and d0["ln1"]["nan_in"] == 0
            assert d0["rms"]["nan_in"] == DIM  # the NaN row of ln2's output

    # The NaN arose on rank 1 only; rank 0 names the layer and the step, as the single process does.
    nonfinite = [f for f in out[0]["findings"] if f["kind"] == "nonfinite_input"]
    assert [(f["layer"], f["step"]) for f in nonfinite] == [("ln2", NAN_STEP)]
    assert "between layer ln1 and this one" in nonfinite[0]["message"]
    key = sorted((f["kind"], f["layer"], f["step"]) for f in single_findings)
    assert sorted((f["kind"], f["layer"], f["step"]) for f in out[0]["findings"]) == key
    assert out[1]["findings"] == out[0]["findings"]

    # The per-step series (step, |dL/dx|, |dL/d(gamma, beta)|): global, the single process's.
    assert out[1]["series"] == out[0]["series"]
    assert len(single_series) == 2 and out[0]["series"][2:] == [{}, {}]  # then findings() and close(): empty
    for w, (d, s) in enumerate(zip(out[0]["series"], single_series)):
        assert set(d) == set(s) == {"0", "1", "2"}
        for i in s:
            assert [e[0] for e in s[i]] == (list(range(NAN_STEP)) if w == 0 else [NAN_STEP])
            assert _same_series(d[i], s[i]), (w, i, d[i], s[i])
    # One SUM and one MAX per flush, nothing per step.
    assert out[0]["calls"] == out[1]["calls"] == [str(dist.ReduceOp.SUM), str(dist.ReduceOp.MAX)] * 2

    # Sinks: rank 0 only (all_ranks=False).
    lines = (tmp_path / "sink0.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(w) for w in out[0]["windows"])
    assert not (tmp_path / "sink1.jsonl").exists()


def test_single_rank_group_matches_local_and_issues_two_collectives_per_flush(tmp_path, monkeypatch):
    _, local = _train(0, 1)
    calls = []
    real = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(op)
        return real(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", counting)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        mon, windows = _train(0, 1)
        assert calls == [dist.ReduceOp.SUM, dist.ReduceOp.MAX] * 2  # two flushes; nothing per step
        assert mon.flush() == []  # an empty window still reduces (every rank must issue the same collectives)
        assert len(calls) == 6
        mon.close()
    finally:
        dist.destroy_process_group()
    for a, b in zip(local, windows):
        sa, sb = _layer_stats(a), _layer_stats(b)
        for name in sa:
            for key in KEYS_EXACT + ("calls", "grad_param_steps"):
                assert sb[name][key] == sa[name][key], (name, key)
            for key in KEYS_CLOSE + ("grad_param_norm", "grad_param_norm_max"):
                assert _same(sb[name].get(key), sa[name].get(key), key, rel=1e-12), (name, key)


def test_grad_series_holds_each_sampled_steps_norms_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    ln = model[1]
    mon = Monitor(model, every=2, flush_every=6)
    series = []
    read = mon._read_window
    mon._read_window = lambda active: _kept(read(active), series)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {}
    for step in range(12):
        h = model[0](torch.randn(4, 6) * (1 + step))
        h.retain_grad()
        model[2](ln(h)).square().mean().backward()
        if step % 2 == 0:
            gp = torch.sqrt(ln.weight.grad.square().sum() + ln.bias.grad.square().sum())
            expected[step] = (h.grad.norm().item(), gp.item())
        opt.step()
        opt.zero_grad()
        mon.step()
    mon.close()
    assert len(series) == 2  # flushed at steps 6 and 12 (close() has nothing left)
    for w, window in enumerate(series):
        entries = window["0"]
        assert len(entries) == 6 // 2 and [e[0] for e in entries] == [6 * w, 6 * w + 2, 6 * w + 4]
        for step, g_in, g_p in entries:
            assert math.isclose(g_in, expected[step][0], rel_tol=1e-5), (step, g_in, expected[step])
            assert math.isclose(g_p, expected[step][1], rel_tol=1e-5), (step, g_p, expected[step])
