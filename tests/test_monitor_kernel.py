"""The fused CPU statistics kernel of the monitor (normscope.ops.cpu_backend.monitor_stats / monitor_grad).

Checked against float64 numpy on hand-made tensors, and end to end against the monitor's pure-torch
path (``Monitor(cpu_kernel=False)``, the path CUDA tensors take) on every norm kind and dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normscope.monitor import Monitor
from normscope.monitor import _layout as L
from normscope.ops import cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.available(), reason="no C++ compiler for the CPU kernels")

F64 = torch.float64


def _buffers(bins=8):
    edges = torch.tensor(L.var_edges(), dtype=F64)
    return (torch.zeros(11, dtype=F64), torch.full((7,), -math.inf, dtype=F64),
            torch.zeros(len(edges) + 2, dtype=F64), torch.zeros(bins + 3, dtype=F64), edges)


def _call(x, y, bufs, **kw):
    sums, maxima, vh, ih, edges = bufs
    args = dict(start=0, stride=1, rms=False, eps_threshold=1e-4, hist_row_step=1, hist_range=(-4.0, 4.0),
                keys=(-10.0, -11.0, -1.0))
    args.update(kw)
    cpu_backend.monitor_stats(x, y, sums, maxima, vh, ih, edges, **args)


def test_monitor_stats_matches_float64_numpy_with_nonfinite_values_and_row_sampling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 13, generator=g) * 2 + 0.5
    y = torch.randn(9, 13, generator=g)
    x[1, 3] = float("nan")  # row 1: sampled (stride 2, start 1), left out of the row statistics
    x[4, 0] = float("inf")  # row 4: not sampled, but counted
    x[5] = 1e-4  # a constant (eps-dominated) sampled row
    y[3, 2] = float("-inf")  # sampled output row: left out of the output sums, counted
    y[6, 1] = float("nan")  # not sampled: counted only
    bufs = _buffers()
    _call(x, y, bufs, start=1, stride=2, hist_row_step=2)
    sums, maxima, vh, ih, edges = bufs

    xn, yn = x.double().numpy(), y.double().numpy()
    rows = list(range(1, 9, 2))
    good = [r for r in rows if np.isfinite(xn[r]).all()]
    mean = {r: np.float32(xn[r].mean()) for r in good}  # rounded to float32, as the torch path keeps them
    var = {r: np.float32(xn[r].var()) for r in good}
    ys = yn[rows]
    fin = ys[np.isfinite(ys)]
    expected = [len(good), sum(float(mean[r]) for r in good), sum(float(var[r]) for r in good),
                sum(var[r] < 1e-4 for r in good), 1, 1, 1, 1, fin.size, fin.mean(), ((fin - fin.mean()) ** 2).sum()]
    np.testing.assert_allclose(sums.numpy(), expected, rtol=1e-12)
    assert sums[3] == 1 and sums[0] == 3  # the constant row is eps-dominated; the NaN row is not valid
    np.testing.assert_allclose(maxima[:4].numpy(), [max(mean.values()), max(var.values()), -min(mean.values()),
                                                    -min(var.values())], rtol=1e-7)
    assert maxima[4:].tolist() == [-10.0, -11.0, -1.0]  # all three events happened
    # Variance histogram: bucketize(var, edges, right=True) for valid rows, the last slot for the NaN row.
    want_vh = np.zeros(len(edges) + 2)
    for r in good:
        want_vh[np.searchsorted(edges.numpy().astype(np.float32), var[r], side="right")] += 1
    want_vh[-1] += 1
    np.testing.assert_array_equal(vh.numpy(), want_vh)
    # Input histogram over every 2nd sampled row (rows 1 and 5): 8 bins over [-4, 4), under/overflow, NaN.
    want_ih = np.zeros(11)
    for r in (1, 5):
        for v in xn[r]:
            want_ih[10 if np.isnan(v) else int(np.clip(np.floor(v + 4.0 + 1.0), 0, 9))] += 1
    np.testing.assert_array_equal(ih.numpy(), want_ih)


def test_monitor_stats_accumulates_in_place_deterministically_and_keeps_the_smallest_key():
    x = torch.randn(64, 32)
    y = torch.randn(64, 32)
    a, b = _buffers(), _buffers()
    for bufs in (a, b):
        _call(x, y, bufs)
        _call(x, y, bufs)
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # bitwise reproducible
    one = _buffers()
    _call(x, y, one)
    # Sums double; the output (count, mean, M2) merges: twice the count and M2, the same mean.
    twice = 2 * one[0]
    twice[L.S_OUT_MEAN] = one[0][L.S_OUT_MEAN]
    assert torch.allclose(a[0], twice, rtol=1e-12) and torch.equal(a[2], 2 * one[2])
    assert torch.equal(a[1][:4], one[1][:4])  # maxima are maxima, not sums
    assert a[1][4:6].tolist() == [-math.inf, -math.inf]  # no non-finite value: no key
    x[3, 3] = float("nan")
    _call(x, y, a, keys=(-500.0, -501.0, -7.0))
    _call(x, y, a, keys=(-900.0, -901.0, -9.0))
    assert a[1][4] == -500.0  # the first (smallest) key wins


def test_monitor_stats_variance_is_two_pass_not_the_difference_of_moments():
    # Rows with mean 1e4 and standard deviation 1e-3 (float64 input): E[x^2] - E[x]^2 would lose
    # every digit of the variance (1e-6) against the moments (1e8).
    g = torch.Generator().manual_seed(1)
    x = 1e4 + 1e-3 * torch.randn(16, 256, generator=g, dtype=F64)
    bufs = _buffers()
    _call(x, x.clone(), bufs)
    want = x.numpy().var(axis=1)
    np.testing.assert_allclose(bufs[0][2].item(), want.sum(), rtol=1e-9)
    np.testing.assert_allclose(bufs[1][1].item(), want.max(), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_monitor_stats_reads_16_bit_and_float64_inputs(dtype):
    x = (torch.randn(20, 24) * 3).to(dtype)
    y = torch.randn(20, 24).to(dtype)
    a, b = _buffers(), _buffers()
    _call(x, y, a, rms=True)
    _call(x.float() if dtype != F64 else x, y.float() if dtype != F64 else y, b, rms=True)  # the same values
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a[0][2].item(), np.float32((x.double() ** 2).mean(1).numpy()).astype(np.float64).sum()
                               if dtype != F64 else (x ** 2).mean(1).sum().item(), rtol=1e-6)


def test_monitor_stats_rejects_bad_arguments():
    x = torch.randn(4, 8)
    sums, maxima, vh, ih, edges = _buffers()
    with pytest.raises(ValueError, match="Expected sums to be a contiguous float64 CPU tensor of 11 elements"):
        cpu_backend.monitor_stats(x, x, sums[:5], maxima, vh, ih, edges, start=0, stride=1, rms=False,
                                  eps_threshold=1.0, hist_row_step=1, hist_range=(-1.0, 1.0), keys=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"Expected y of the same shape as x \(4, 8\), but got \(2, 8\)"):
        cpu_backend.monitor_stats(x, x[:2], sums, maxima, vh, ih, edges, start=0, stride=1, rms=False,
                                  eps_threshold=1.0, hist_row_step=1, hist_range=(-1.0, 1.0), keys=(0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="Expected x of dtype"):
        cpu_backend.monitor_stats(x.int(), x, sums, maxima, vh, ih, edges, start=0, stride=1, rms=False,
                                  eps_threshold=1.0, hist_row_step=1, hist_range=(-1.0, 1.0), keys=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="Expected stride >= 1, 0 <= start < 4"):
        cpu_backend.monitor_stats(x, x, sums, maxima, vh, ih, edges, start=4, stride=1, rms=False,
                                  eps_threshold=1.0, hist_row_step=1, hist_range=(-1.0, 1.0), keys=(0.0, 0.0, 0.0))


def test_monitor_grad_adds_or_stores_the_sum_of_squares_and_flags_non_finite_input_gradients():
    slot, fired, key = torch.zeros(2, dtype=F64), torch.zeros(1, dtype=F64), torch.full((1,), -math.inf, dtype=F64)
    g = torch.randn(3, 50)
    cpu_backend.monitor_grad(g, slot.data_ptr(), fired.data_ptr(), key.data_ptr(), -7.0, True)
    cpu_backend.monitor_grad(g.t(), slot.data_ptr(), fired.data_ptr(), key.data_ptr(), -7.0, True)  # non-contiguous
    want = (g.double() ** 2).sum().item()
    assert slot[0].item() == pytest.approx(2 * want, rel=1e-12) and fired.item() == 1.0 and key.item() == -math.inf
    cpu_backend.monitor_grad(g.to(torch.bfloat16), slot.data_ptr() + 8, fired.data_ptr(), 0, 0.0, False)
    cpu_backend.monitor_grad(g, slot.data_ptr() + 8, fired.data_ptr(), 0, 0.0, False)  # stores: the last wins
    assert slot[1].item() == pytest.approx(want, rel=1e-12)
    g[0, 0] = float("inf")
    cpu_backend.monitor_grad(g, slot.data_ptr(), fired.data_ptr(), key.data_ptr(), -9.0, True)
    assert key.item() == -9.0 and math.isinf(slot[0].item())


# --- end to end: the kernel path against the torch path ---------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.inorm = torch.nn.InstanceNorm1d(8, affine=True)
        self.fc = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.inorm(self.gn(self.bn(self.conv(x)))).transpose(1, 2)
        return self.head(self.rms(self.ln(self.fc(h))))


def _run(cpu_kernel, dtype, **kw):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, every=1, flush_every=None, cpu_kernel=cpu_kernel, **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(6, 4, 20, generator=g).to(dtype)
        if step == 1:
            x[:, :, 5] = 0.0  # constant positions: eps-dominated rows for the LayerNorm / RMSNorm
        if step == 2:
            x[2, 1, 7] = float("nan")
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    records = mon.flush()
    findings = [(f.layer, f.step, f.kind) for f in mon.findings()]
    snap = mon.snapshot()
    mon.close()
    return {r["layer"]: r for r in records if r["type"] == "layer_stats"}, findings, snap


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.float32, {"row_fraction": 0.5,
                                                                            "hist_max_elements": 64}),
                                      (torch.bfloat16, {}), (torch.float64, {})])
def test_kernel_path_gives_the_torch_paths_records_and_findings(dtype, kw):
    fast, f_findings, f_snap = _run(True, dtype, **kw)
    ref, r_findings, r_snap = _run(False, dtype, **kw)
    assert f_findings == r_findings and any(k == "nonfinite_input" for _, _, k in f_findings)
    assert sorted(fast) == sorted(ref) == ["bn", "gn", "inorm", "ln", "rms"]
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    for layer, r in ref.items():
        f = fast[layer]
        assert f.keys() == r.keys()
        for k, v in r.items():
            if k == "in_hist":
                # Bins are equal except for a value within rounding of an edge (here: none or one).
                assert sum(f[k]) == sum(v) and sum(abs(a - b) for a, b in zip(f[k], v)) <= 2, (layer, k)
            elif isinstance(v, float) and not math.isnan(v):
                # Gradient norms: the kernel sums squares in float64, the torch path in float32.
                tol = 1e-4 if k.startswith("grad_") and dtype != torch.float64 else rtol
                assert f[k] == pytest.approx(v, rel=tol, abs=1e-6 if k.startswith(("in_mean", "in_row", "out_"))
                                             else 0), (layer, k, f[k], v)
            elif isinstance(v, float):
                assert math.isnan(f[k]), (layer, k)
            else:
                assert f[k] == v, (layer, k, f[k], v)
        vf, vr = f_snap["layers"][layer]["var_hist"], r_snap["layers"][layer]["var_hist"]
        assert sum(vf) == sum(vr) and sum(abs(a - b) for a, b in zip(vf, vr)) <= 2, layer


def test_default_every_samples_one_step_in_ten_and_reports_a_nan_at_the_next_sampled_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8),
                                torch.nn.LayerNorm(8))
    mon = Monitor(model, flush_every=None)
    for step in range(25):
        x = torch.randn(4, 8)
        out = model[1](model[0](x))
        if step >= 13:  # from step 13 on, a NaN enters the second norm (between the two norms)
            out = out + torch.tensor(float("nan"))
        model[3](model[2](out)).sum().backward()
        mon.step()
    stats = {r["layer"]: r for r in mon.flush() if r["type"] == "layer_stats"}
    assert stats["1"]["steps"] == 3 and (stats["1"]["window_start"], stats["1"]["window_end"]) == (0, 20)
    assert stats["1"]["grad_input_steps"] == 3
    first = [f for f in mon.findings() if f.kind == "nonfinite_input"]
    assert [(f.layer, f.step) for f in first] == [("3", 20)]
    assert "between layer 1 and this one" in first[0].message
    mon.close()
