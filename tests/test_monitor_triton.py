"""The monitor's fused Triton kernels (normscope.monitor._triton_stats), under Triton's interpreter.

Without a GPU the kernels run on CPU tensors through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). Checked field by field against float64 numpy and
against the fused C++ kernel, then end to end: the whole Monitor through the Triton kernels
(``NORMSCOPE_MONITOR_KERNEL=triton``) gives the C++ path's records and findings.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = importlib.import_module("triton")

from normscope.monitor import Monitor  # noqa: E402
from normscope.monitor import _layout as L  # noqa: E402
from normscope.monitor import _monitor as M  # noqa: E402
from normscope.monitor import _triton_stats as TS  # noqa: E402
from normscope.ops import cpu_backend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
needs_cpp = pytest.mark.skipif(not cpu_backend.available(), reason="no C++ compiler for the CPU kernels")
# The whole monitor on CPU tensors through Triton: only in the interpreter (tests/cuda/ covers the GPU).
needs_interpreter = pytest.mark.skipif(not TS._INTERPRETED, reason="CPU tensors through Triton need TRITON_INTERPRET=1")


def _buffers(bins=8, device=DEV):
    edges = torch.tensor(L.var_edges(), dtype=F64, device=device)
    return (torch.zeros(11, dtype=F64, device=device), torch.full((7,), -math.inf, dtype=F64, device=device),
            torch.zeros(len(edges) + 2, dtype=F64, device=device), torch.zeros(bins + 3, dtype=F64, device=device),
            edges)


def _args(**kw):
    args = dict(start=0, stride=1, rms=False, eps_threshold=1e-4, hist_row_step=1, hist_range=(-4.0, 4.0),
                keys=(-10.0, -11.0, -1.0))
    args.update(kw)
    return args


def _triton(x, y, bins=8, bufs=None, **kw):
    bufs = bufs if bufs is not None else _buffers(bins)
    TS.monitor_stats(x.to(DEV), y.to(DEV), *bufs, **_args(**kw))
    return [t.cpu() for t in bufs]


def _cpp(x, y, bins=8, **kw):
    bufs = _buffers(bins, "cpu")
    cpu_backend.monitor_stats(x.cpu(), y.cpu(), *bufs, **_args(**kw))
    return bufs


def _numpy(x, y, bins=8, **kw):
    """The kernel's fields in float64 numpy, row by row (float32 rounding of row statistics and bins)."""
    a = _args(**kw)
    x64 = x.dtype == F64
    xn, yn = x.double().numpy(), y.double().numpy()
    rows, cols = xn.shape
    sampled = list(range(a["start"], rows, a["stride"]))
    rnd = (lambda v: v) if x64 else (lambda v: float(np.float32(v)))
    edges = np.array(L.var_edges()) if x64 else np.array(L.var_edges()).astype(np.float32)
    sums = np.zeros(11)
    vh = np.zeros(len(edges) + 2)
    ih = np.zeros(bins + 3)
    means, variances = [], []
    bad_out = 0
    outs = []
    sums[4:8] = [np.isnan(xn).sum(), np.isinf(xn).sum(), np.isnan(yn).sum(), np.isinf(yn).sum()]
    lo, hi = a["hist_range"]
    for k, r in enumerate(sampled):
        row = xn[r]
        mean = row.sum() / cols
        var = rnd(((row - (0.0 if a["rms"] else mean)) ** 2).sum() / cols)
        if var < math.inf:
            means.append(rnd(mean))
            variances.append(var)
            sums[3] += var < a["eps_threshold"]
            vh[np.searchsorted(edges, var if x64 else np.float32(var), side="right")] += 1
        else:
            vh[-1] += 1
        if k % a["hist_row_step"] == 0:
            if x64:
                q = np.floor((row - lo) * (bins / (hi - lo)) + 1.0)
            else:
                v = row.astype(np.float32)
                q = np.floor((v - np.float32(lo)) * np.float32(bins / (hi - lo)) + np.float32(1.0))
            idx = np.where(np.isnan(row), bins + 2, np.clip(np.nan_to_num(q), 0, bins + 1)).astype(int)
            np.add.at(ih, idx, 1.0)
        out = yn[r]
        fin = out[np.isfinite(out)]
        bad_out += cols - fin.size
        outs.append(fin)
    sums[0:3] = [len(means), sum(means), sum(variances)]
    fin = np.concatenate(outs) if outs else np.zeros(0)
    if fin.size:  # the output (count, mean, M2), two-pass
        sums[8:11] = [fin.size, fin.mean(), ((fin - fin.mean()) ** 2).sum()]
    ninf = -math.inf
    maxima = [max(means, default=ninf), max(variances, default=ninf), max((-m for m in means), default=ninf),
              max((-v for v in variances), default=ninf),
              a["keys"][0] if sums[4] + sums[5] > 0 else ninf, a["keys"][1] if bad_out > 0 else ninf,
              a["keys"][2] if sums[3] > 0 else ninf]
    return sums, np.array(maxima), vh, ih


def _check_numpy(got, x, y, bins=8, **kw):
    sums, maxima, vh, ih = _numpy(x, y, bins, **kw)
    np.testing.assert_array_equal(got[0][[0, 3, 4, 5, 6, 7, 8]].numpy(), sums[[0, 3, 4, 5, 6, 7, 8]])  # counts
    np.testing.assert_allclose(got[0].numpy(), sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), maxima, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got[2].numpy(), vh)
    np.testing.assert_array_equal(got[3].numpy(), ih)


def _check_same(a, b):
    """Fields of the Triton and C++ kernels: counts and keys equal, float64 sums to summation order.

    Histogram bins are equal but for a value within rounding of an edge (the C++ kernel may be
    compiled with FMA contraction): at most one value moved here.
    """
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(a[0][[0, 3, 4, 5, 6, 7, 8]], b[0][[0, 3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(a[1][:4], b[1][:4], rtol=1e-12, atol=0)  # float64 rows: to summation order
    assert torch.equal(a[1][4:], b[1][4:])
    for u, v in ((a[2], b[2]), (a[3], b[3])):
        assert u.sum() == v.sum() and (u - v).abs().sum() <= 2


def _problem(rows=9, cols=13, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2 + 0.5
    y = torch.randn(rows, cols, generator=g)
    return x.to(dtype), y.to(dtype)


# --- the statistics kernel, field by field --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
def test_stats_match_float64_numpy_and_the_cpp_kernel_with_nonfinite_values_and_row_sampling(dtype):
    x, y = _problem(dtype=dtype)
    x[1, 3] = float("nan")  # row 1: sampled (stride 2, start 1), left out of the row statistics
    x[4, 0] = float("inf")  # row 4: not sampled, but counted
    x[5] = 1e-4  # a constant (eps-dominated) sampled row
    x[7, 2] = 9.0  # sampled, in the histogram's overflow bin
    y[3, 2] = float("-inf")  # sampled output row: left out of the output sums, counted
    y[6, 1] = float("nan")  # not sampled: counted only
    kw = dict(start=1, stride=2, hist_row_step=1)
    got = _triton(x, y, **kw)
    _check_numpy(got, x, y, **kw)
    assert got[0][0] == 3 and got[0][3] == 1 and got[2][-1] == 1  # the NaN row is in the last variance slot
    assert got[1][4:].tolist() == [-10.0, -11.0, -1.0]  # all three events happened
    if cpu_backend.available():
        _check_same(got, _cpp(x, y, **kw))


@pytest.mark.parametrize("dtype,rms", [(F32, True), (BF16, False), (F64, True)])
def test_stats_on_layer_norm_rms_norm_and_group_norm_rows_longer_than_one_column_block(dtype, rms):
    # GroupNorm rows are long (C / G * H * W values): 1500 > the 1024-value column block, so the
    # kernel's column loops take two blocks; LayerNorm / RMSNorm rows come from (batch, seq, hidden).
    g = torch.Generator().manual_seed(2)
    gn_input = (torch.randn(2, 8, 25, 30, generator=g) * 3 - 1).to(dtype)  # GroupNorm(4, 8): rows of 2*25*30
    x = gn_input.reshape(2 * 4, -1)
    y = torch.nn.functional.group_norm(gn_input.float(), 4).to(dtype).reshape(2 * 4, -1)
    kw = dict(rms=rms, hist_row_step=3, hist_range=(-6.0, 6.0), eps_threshold=5.0)
    got = _triton(x, y, bins=16, **kw)
    _check_numpy(got, x, y, bins=16, **kw)
    ln_x = (torch.randn(3, 5, 48, generator=g) + 0.25).to(dtype)
    ln_y = torch.nn.functional.layer_norm(ln_x.float(), (48,)).to(dtype)
    got = _triton(ln_x.reshape(-1, 48), ln_y.reshape(-1, 48), stride=4, start=3, rms=rms)
    _check_numpy(got, ln_x.reshape(-1, 48), ln_y.reshape(-1, 48), stride=4, start=3, rms=rms)
    if cpu_backend.available():
        _check_same(got, _cpp(ln_x.reshape(-1, 48), ln_y.reshape(-1, 48), stride=4, start=3, rms=rms))


def test_stats_read_strided_rows_without_a_copy_and_ignore_empty_inputs():
    # BatchNorm-style rows (a transposed view) and a column-strided view: the kernel reads the strides.
    x, y = _problem(12, 10)
    xt, yt = x.t(), y.t()  # (10, 12), strides (1, 10)
    got = _triton(xt, yt, stride=3, start=2)
    _check_numpy(got, xt.contiguous(), yt.contiguous(), stride=3, start=2)
    bufs = _buffers()
    before = [t.clone() for t in bufs]
    TS.monitor_stats(x[:0].to(DEV), y[:0].to(DEV), *bufs, **_args())  # no rows: nothing to accumulate
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))


def test_stats_of_a_single_row_and_of_a_row_of_one_value():
    x, y = _problem(1, 7)
    got = _triton(x, y)
    _check_numpy(got, x, y)
    assert got[1][0] == got[1][2] * -1 == float(np.float32(x.double().mean()))  # max = min = the only row
    one_x, one_y = _problem(5, 1)
    got = _triton(one_x, one_y, eps_threshold=1e-30)
    _check_numpy(got, one_x, one_y, eps_threshold=1e-30)
    assert got[0][2] == 0 and got[2][0] == 5  # variance 0: five rows in the underflow bin


def test_stats_histogram_cap_and_the_per_element_histogram_path():
    # hist_row_step=4: rows 0, 4, 8 of the sampled rows enter the input histogram. With 5000 bins the
    # per-program register histogram would be too large: the kernel counts with element atomics.
    x, y = _problem(10, 40, seed=4)
    x[8, :3] = float("nan")
    for bins in (8, 5000):
        got = _triton(x, y, bins=bins, hist_row_step=4, hist_range=(-3.0, 3.0))
        _check_numpy(got, x, y, bins=bins, hist_row_step=4, hist_range=(-3.0, 3.0))
        assert got[3].sum() == 3 * 40 and got[3][-1] == 3
    assert TS._stats_config(10, 40, 8)[3] is False and TS._stats_config(10, 40, 5000)[3] is True


def test_stats_variance_is_two_pass_and_float64_inputs_keep_float64_statistics():
    # mean 1e4, standard deviation 1e-3: E[x^2] - E[x]^2 would lose every digit of the variance (1e-6).
    g = torch.Generator().manual_seed(1)
    x = 1e4 + 1e-3 * torch.randn(16, 256, generator=g, dtype=F64)
    got = _triton(x, x.clone())
    want = x.numpy().var(axis=1)
    np.testing.assert_allclose(got[0][2].item(), want.sum(), rtol=1e-9)
    np.testing.assert_allclose(got[1][1].item(), want.max(), rtol=1e-9)
    assert got[1][0].item() != float(np.float32(got[1][0].item()))  # not rounded to float32


def test_stats_accumulate_in_place_deterministically_and_keep_the_smallest_exact_key():
    x, y = _problem(64, 32, seed=5)
    a, b = _buffers(), _buffers()
    for bufs in (a, b):
        _triton(x, y, bufs=bufs)
        _triton(x, y, bufs=bufs)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # bitwise reproducible
    one = _triton(x, y)
    twice = 2 * one[0]  # sums double; the output (count, mean, M2) merges: the same mean
    twice[L.S_OUT_MEAN] = one[0][L.S_OUT_MEAN]
    torch.testing.assert_close(a[0].cpu(), twice, rtol=1e-12, atol=0)
    assert torch.equal(a[1][:4].cpu(), one[1][:4]) and a[1][4:6].tolist() == [-math.inf, -math.inf]
    x[3, 3] = float("nan")
    x[5] = 0.5  # an eps-dominated row
    # A key of step 10**6: -(10**6 * 2**21 + 2 * 5) is exact in float64, not in float32.
    big = -float(10**6 * L.KEY_STEP + 2 * 5)
    _triton(x, y, bufs=a, keys=(big, big - 1, -1e6))
    _triton(x, y, bufs=a, keys=(big - 2**21, big - 2**21 - 1, -2e6))
    assert a[1][4].item() == big and a[1][6].item() == -1e6  # the first (smallest) key, to the unit


def test_stats_reject_bad_arguments():
    x = torch.randn(4, 8, device=DEV)
    sums, maxima, vh, ih, edges = _buffers()
    with pytest.raises(ValueError, match="Expected sums to be a 1-D float64 tensor of 11 contiguous elements"):
        TS.monitor_stats(x, x, sums[:5], maxima, vh, ih, edges, **_args())
    with pytest.raises(ValueError, match=r"Expected y of the same shape as x \(4, 8\), but got \(2, 8\)"):
        TS.monitor_stats(x, x[:2], sums, maxima, vh, ih, edges, **_args())
    with pytest.raises(TypeError, match="Expected x of dtype float32, float64, bfloat16 or float16, but got"):
        TS.monitor_stats(x.int(), x, sums, maxima, vh, ih, edges, **_args())
    with pytest.raises(ValueError, match="Expected stride >= 1, 0 <= start < 4"):
        TS.monitor_stats(x, x, sums, maxima, vh, ih, edges, **_args(start=4))


# --- the gradient kernel -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 3 * TS._GRAD_BLOCK + 7])  # one program / per-program partials
def test_grad_adds_or_stores_the_float64_sum_of_squares_and_flags_non_finite_input_gradients(n):
    slot, fired = torch.zeros(2, dtype=F64, device=DEV), torch.zeros(2, dtype=F64, device=DEV)
    key = torch.full((1,), -math.inf, dtype=F64, device=DEV)
    g = torch.randn(n, 3, device=DEV)
    TS.monitor_grad(g, slot[0:1], fired[0:1], key, -7.0, True)
    TS.monitor_grad(g.t(), slot[0:1], fired[0:1], key, -7.0, True)  # non-contiguous
    want = (g.double() ** 2).sum().item()
    assert slot[0].item() == pytest.approx(2 * want, rel=1e-12) and fired[0].item() == 1.0
    assert key.item() == -math.inf and fired[1].item() == 0.0
    TS.monitor_grad(g.to(BF16), slot[1:2], fired[1:2], key, 0.0, False)
    TS.monitor_grad(g, slot[1:2], fired[1:2], key, 0.0, False)  # stores: the last wins
    assert slot[1].item() == pytest.approx(want, rel=1e-12) and fired[1].item() == 1.0
    g[n // 2, 1] = float("inf")
    TS.monitor_grad(g, slot[0:1], fired[0:1], key, -9.0, True)
    TS.monitor_grad(g, slot[0:1], fired[0:1], key, -12.0, True)  # a later event: the first key stays
    assert key.item() == -9.0 and math.isinf(slot[0].item())
    if cpu_backend.available():
        c_slot, c_fired, c_key = torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64)
        h = torch.randn(n, 3)
        cpu_backend.monitor_grad(h, c_slot.data_ptr(), c_fired.data_ptr(), c_key.data_ptr(), -1.0, True)
        t_slot = torch.zeros(1, dtype=F64, device=DEV)
        TS.monitor_grad(h.to(DEV), t_slot, fired[0:1], key, -1.0, True)
        assert t_slot.item() == pytest.approx(c_slot.item(), rel=1e-13)


# --- the whole monitor through the Triton kernels --------------------------------------------------------


@pytest.fixture
def kernel_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv("NORMSCOPE_MONITOR_KERNEL", mode)
        monkeypatch.setattr(M, "_KERNEL_MODE", None)  # read again

    return set_mode


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.fc = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.gn(self.bn(self.conv(x))).transpose(1, 2)
        return self.head(self.rms(self.ln(self.fc(h))))


def _run_monitor(dtype, **kw):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, every=1, flush_every=None, **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(4, 4, 12, generator=g).to(dtype)
        if step == 1:
            x[:, :, 5] = 0.0  # constant positions: eps-dominated rows for the LayerNorm / RMSNorm
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


@needs_cpp
@needs_interpreter
@pytest.mark.parametrize("dtype,kw", [(F32, {}), (BF16, {"row_fraction": 0.5, "hist_max_elements": 32})])
def test_monitor_through_the_triton_kernels_gives_the_cpp_paths_records_and_findings(kernel_mode, monkeypatch,
                                                                                       dtype, kw):
    calls = []
    real_stats, real_grad = TS._stats_call, TS._grad_call
    monkeypatch.setattr(TS, "_stats_call", lambda *a: calls.append("stats") or real_stats(*a))
    monkeypatch.setattr(TS, "_grad_call", lambda *a: calls.append("grad") or real_grad(*a))
    kernel_mode("triton")
    tri, t_findings, t_snap = _run_monitor(dtype, **kw)
    assert calls.count("stats") == 3 * 4 and calls.count("grad") > 3 * 4  # every layer call and gradient
    kernel_mode("auto")
    n_calls = len(calls)
    ref, r_findings, r_snap = _run_monitor(dtype, **kw)
    assert len(calls) == n_calls  # CPU tensors: the C++ kernel
    assert t_findings == r_findings and ("bn", 1, "nonfinite_input") in t_findings
    assert sorted(tri) == sorted(ref) == ["bn", "gn", "ln", "rms"]
    for layer, r in ref.items():
        t = tri[layer]
        assert t.keys() == r.keys()
        for k, v in r.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(t[k]), (layer, k)
            elif isinstance(v, float):
                assert t[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (layer, k, t[k], v)
            else:
                assert t[k] == v, (layer, k, t[k], v)
        assert t_snap["layers"][layer]["var_hist"] == r_snap["layers"][layer]["var_hist"]


def test_kernel_mode_is_validated_and_chooses_the_path(kernel_mode):
    x = torch.randn(2, 4)
    kernel_mode("bogus")
    with pytest.raises(ValueError, match="Expected NORMSCOPE_MONITOR_KERNEL to be one of auto, triton, cpp, torch"):
        Monitor(torch.nn.LayerNorm(4))
    kernel_mode("auto")
    assert not M._triton_for(x)  # CPU tensors: the C++ kernel (or torch operations)
    kernel_mode("triton")
    assert M._triton_for(x) and not M._triton_for(x.int())
    assert not Monitor(torch.nn.LayerNorm(4))._cpu_kernel
    for mode in ("cpp", "torch"):
        kernel_mode(mode)
        assert not M._triton_for(x)
    assert not Monitor(torch.nn.LayerNorm(4))._cpu_kernel  # "torch": torch operations on CPU too


def test_monitor_on_cpu_does_not_load_the_triton_kernels():
    code = ("import sys, torch, normscope\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))\n"
            "mon = normscope.Monitor(m, every=1)\n"
            "m(torch.randn(4, 8, requires_grad=True)).sum().backward(); mon.step(); mon.flush()\n"
            "print('TRITON_STATS', 'normscope.monitor._triton_stats' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TRITON_STATS False" in out, out
