"""Tests of the C++ CPU backend (normscope.ops.cpu_backend) against the reference contract."""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

from normscope.ops import cpu_backend as cb
from normscope.ops import reference as ref

pytestmark = pytest.mark.skipif(
    not cb.available(), reason=f"CPU kernels unavailable: {cb.unavailable_reason()}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerances per dtype of the compared tensor: low-precision outputs may differ from the reference
# by one rounding step; statistics and dw / db are float32 (float64) accumulations.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
STAT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}
EPS = 1e-5


def _close(actual, expected, tol):
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_close(actual, expected, **tol)


def _check_fwd(out, exp):
    y, h, mean, rstd = out
    y_r, h_r, mean_r, rstd_r = exp
    _close(y, y_r, TOL[y_r.dtype])
    if h_r is None:
        assert h is None
    else:
        # h = round(x + residual) is computed the same way (one rounding of an exact sum).
        assert h.dtype == h_r.dtype and torch.equal(h, h_r)
    _close(mean, mean_r, STAT_TOL[rstd_r.dtype])
    _close(rstd, rstd_r, STAT_TOL[rstd_r.dtype])
    assert not torch.isnan(y).any()


def _check_bwd(out, exp, acc):
    dx, dw, db = out
    dx_r, dw_r, db_r = exp
    # dx is computed in `acc` and rounded once to its dtype: the looser of the two tolerances
    dx_tol = TOL[dx_r.dtype] if TOL[dx_r.dtype]["rtol"] > TOL[acc]["rtol"] else TOL[acc]
    _close(dx, dx_r, dx_tol)
    _close(dw, dw_r, GRAD_TOL[acc])
    _close(db, db_r, GRAD_TOL[acc])


def _inputs(m, n, dtype, kind, affine, rms, seed=0, wdtype=None, rdtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    residual = mask = None
    if kind == "residual":
        residual = torch.randn(m, n, generator=g, dtype=torch.float64).to(rdtype or dtype)
    elif kind == "masked":
        mask = torch.rand(m, n, generator=g) > 0.4
        if m > 1:
            mask[0] = False  # a row without any valid element
            mask[1] = True  # a full row
    wd = wdtype or dtype
    weight = torch.randn(n, generator=g, dtype=torch.float64).to(wd) if affine != "none" else None
    bias = (
        torch.randn(n, generator=g, dtype=torch.float64).to(wd)
        if affine == "weight_bias" and not rms
        else None
    )
    return x, residual, mask, weight, bias


def _run_both(x, residual, mask, weight, bias, rms, h_dtype=None, seed=1):
    out = cb.norm_fwd(x, residual, mask, weight, bias, EPS, rms, h_dtype)
    exp = ref.norm_fwd(x, residual, mask, weight, bias, EPS, rms, h_dtype)
    _check_fwd(out, exp)
    y, h, mean, rstd = exp
    xn = h if residual is not None else x
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    dh = torch.randn(xn.shape, generator=g, dtype=torch.float64).to(xn.dtype) if residual is not None else None
    args = (dy, dh, xn, mask, weight, mean, rstd, rms, bias is not None, xn.dtype)
    _check_bwd(cb.norm_bwd(*args), ref.norm_bwd(*args), ref.acc_dtype(xn.dtype, dy.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "residual", "masked"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 1023), (4, 4097)], ids=str)
def test_matches_reference(dtype, kind, rms, affine, shape):
    x, residual, mask, weight, bias = _inputs(*shape, dtype, kind, affine, rms)
    _run_both(x, residual, mask, weight, bias, rms)


@pytest.mark.parametrize("n", [1, 7, 1023, 4097, 65537])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_lengths(n, rms, dtype):
    m = 2 if n > 5000 else 9
    x, _, _, weight, bias = _inputs(m, n, dtype, "plain", "weight_bias", rms)
    _run_both(x, None, None, weight, bias, rms)
    x, residual, _, _, _ = _inputs(m, n, dtype, "residual", "none", rms)
    _run_both(x, residual, None, weight, bias, rms)


@pytest.mark.parametrize("m", [0, 1, 2, 67])
@pytest.mark.parametrize("kind", ["plain", "residual", "masked"])
def test_row_counts(m, kind):
    x, residual, mask, weight, bias = _inputs(m, 33, torch.float32, kind, "weight_bias", False)
    y, h, mean, rstd = cb.norm_fwd(x, residual, mask, weight, bias, EPS, False)
    assert y.shape == (m, 33) and mean.shape == (m,) and rstd.shape == (m,)
    assert mean.dtype == rstd.dtype == torch.float32
    if m == 0:
        dx, dw, db = cb.norm_bwd(x, None, x, mask, weight, mean, rstd, False, True, x.dtype)
        assert dx.shape == (0, 33)
        assert torch.equal(dw, torch.zeros(33)) and torch.equal(db, torch.zeros(33))
    else:
        _run_both(x, residual, mask, weight, bias, False)


@pytest.mark.parametrize(
    "xd, rd, hd",
    [
        (torch.bfloat16, torch.float32, None),  # -> float32 h
        (torch.float16, torch.bfloat16, None),  # -> float32 h
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float64, None),  # float64 accumulation
        (torch.float32, torch.float16, torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_residual_mixed_dtypes(xd, rd, hd, rms):
    x, residual, _, weight, bias = _inputs(6, 515, xd, "residual", "weight_bias", rms, rdtype=rd)
    y, h, mean, rstd = _run_both(x, residual, None, weight, bias, rms, h_dtype=hd)
    assert y.dtype == xd
    assert h.dtype == (hd or torch.promote_types(xd, rd))
    acc = torch.float64 if torch.float64 in (xd, rd) else torch.float32
    assert rstd.dtype == acc


@pytest.mark.parametrize(
    "xd, wd",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=str,
)
@pytest.mark.parametrize("kind", ["plain", "residual", "masked"])
def test_mixed_precision_weights(xd, wd, kind):
    for rms in (False, True):
        x, residual, mask, weight, bias = _inputs(7, 300, xd, kind, "weight_bias", rms, wdtype=wd)
        _run_both(x, residual, mask, weight, bias, rms)


def test_bwd_mixed_dtypes():
    # dy, xn, dh and dx of different dtypes (any combination is allowed by the contract).
    x, _, _, weight, _ = _inputs(5, 257, torch.float32, "plain", "weight", False)
    _, _, mean, rstd = ref.norm_fwd(x, None, None, weight, None, EPS, False)
    g = torch.Generator().manual_seed(3)
    for dyd, dhd, dxd in [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16, torch.float64),
    ]:
        dy = torch.randn(5, 257, generator=g).to(dyd)
        dh = torch.randn(5, 257, generator=g).to(dhd)
        args = (dy, dh, x, None, weight, mean, rstd, False, False, dxd)
        _check_bwd(cb.norm_bwd(*args), ref.norm_bwd(*args), ref.acc_dtype(x.dtype, dyd))


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_residual_with_mask(rms):
    # Not required by the contract, but supported: statistics over the masked rounded h.
    x, residual, _, weight, bias = _inputs(6, 300, torch.bfloat16, "residual", "weight_bias", rms)
    mask = torch.rand(6, 300, generator=torch.Generator().manual_seed(9)) > 0.5
    mask[2] = False
    _run_both(x, residual, mask, weight, bias, rms)


def test_concurrent_calls_from_python_threads():
    import threading

    xs = [torch.randn(64, 999) for _ in range(4)]
    expected = [cb.norm_fwd(x, None, None, None, None, EPS, False) for x in xs]
    errors = []

    def work(k):
        for _ in range(10):
            got = cb.norm_fwd(xs[k], None, None, None, None, EPS, False)
            if not all(torch.equal(a, b) for a, b in zip(got, expected[k]) if a is not None):
                errors.append(k)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


# --------------------------------------------------------------------------------------------
# Masks, numerics, special rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_masked_rows(rms):
    x, _, _, weight, bias = _inputs(4, 100, torch.float32, "plain", "weight_bias", rms)
    mask = torch.ones(4, 100, dtype=torch.bool)
    mask[1] = False
    mask[2, ::3] = False
    y, _, mean, rstd = cb.norm_fwd(x, None, mask, weight, bias, EPS, rms)
    # no valid element: statistics 0, output 0, never NaN
    assert rstd[1] == 0 and torch.equal(y[1], torch.zeros(100))
    if not rms:
        assert mean[1] == 0
    assert torch.equal(y[2][~mask[2]], torch.zeros(int((~mask[2]).sum())))
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    # a full row is the unmasked result
    y_full, _, mean_full, rstd_full = cb.norm_fwd(x, None, None, weight, bias, EPS, rms)
    assert_close(y[0], y_full[0], rtol=1e-6, atol=1e-6)
    assert_close(rstd[0], rstd_full[0], rtol=1e-6, atol=0)
    dy = torch.randn(4, 100)
    dx, dw, db = cb.norm_bwd(dy, None, x, mask, weight, mean, rstd, rms, bias is not None, x.dtype)
    assert torch.equal(dx[1], torch.zeros(100)) and torch.isfinite(dx).all()
    assert torch.isfinite(dw).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_nan_inf_in_masked_positions_never_leak(dtype, rms, threads):
    # Masked-out elements are never read into any result: NaN / Inf there (in x, dy, or as the
    # row's first element) give bitwise the results of finite values there, on 1 or 2 threads.
    m, n = 64, 300
    x, _, mask, weight, bias = _inputs(m, n, dtype, "masked", "weight_bias", rms, seed=3)
    mask[2:, 0] = False  # the shift is a later element
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    idx = torch.arange(m * n).reshape(m, n) % 3
    x_bad = torch.where(mask, x, junk[idx])
    x_zero = torch.where(mask, x, torch.zeros((), dtype=dtype))
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    dy_bad = torch.where(mask, dy, junk[(idx + 1) % 3])
    for nt in (1, 2):
        torch.set_num_threads(nt)
        clean = _fwd_bwd(x_zero, None, mask, weight, bias, rms, dy, None)
        bad = _fwd_bwd(x_bad, None, mask, weight, bias, rms, dy_bad, None)
        _assert_all_equal(clean, bad)
        for t in bad:
            assert torch.isfinite(t).all()
        y = bad[0]
        assert torch.equal(y[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))


def test_large_mean_rows():
    g = torch.Generator().manual_seed(5)
    # float32: mean 1e4, std 1 (E[x^2] - E[x]^2 would lose every digit of the variance)
    x = 1e4 + torch.randn(6, 1024, generator=g, dtype=torch.float64)
    x32 = x.float()
    y, _, mean, rstd = cb.norm_fwd(x32, None, None, None, None, 0.0, False)
    exact = ref.norm_fwd(x32.double(), None, None, None, None, 0.0, False)
    assert_close(mean.double(), exact[2], rtol=1e-7, atol=0)
    assert_close(rstd.double(), exact[3], rtol=1e-4, atol=0)
    assert_close(y.double(), exact[0], rtol=0, atol=2e-3)
    # float64: mean 1e4, std 1e-3
    x64 = 1e4 + 1e-3 * torch.randn(6, 1024, generator=g, dtype=torch.float64)
    y, _, mean, rstd = cb.norm_fwd(x64, None, None, None, None, 0.0, False)
    xc = x64 - x64.mean(-1, keepdim=True)
    true_rstd = 1 / xc.pow(2).mean(-1).sqrt()
    assert_close(rstd, true_rstd, rtol=1e-8, atol=0)
    assert_close(y, xc * true_rstd[:, None], rtol=0, atol=1e-7)


@pytest.mark.parametrize("n", [8, 64, 256, 1000])
def test_layer_norm_backward_with_and_without_the_saved_mean(n):
    # With forward's mean the backward takes its sums in one sweep (shifted by the mean, TwoSum-corrected);
    # without one, or with a mean forward did not write, in three. Both as accurate against float64, on rows
    # with a large offset and rows whose first element (forward's shift) is an outlier.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(48, n, generator=g, dtype=torch.float64)
    x[:16] += 1e4
    x[16:32, 0] = 1e4
    x32 = x.float()
    w = torch.randn(n, generator=g)
    dy = torch.randn(48, n, generator=g)
    _, _, mean, rstd = cb.norm_fwd(x32, None, None, w, w, 1e-5, False)
    one = cb.norm_bwd(dy, None, x32, None, w, mean, rstd, False, True, torch.float32)
    three = cb.norm_bwd(dy, None, x32, None, w, None, rstd, False, True, torch.float32)
    other = cb.norm_bwd(dy, None, x32, None, w, mean.double().add(1e-3).float(), rstd, False, True, torch.float32)
    for a, b in zip(three, other):  # a mean that is not forward's: the three sweeps, bit for bit
        assert torch.equal(a, b)
    assert torch.equal(one[1], three[1]) and torch.equal(one[2], three[2])  # dw, db: the same sums
    exact = ref.norm_bwd(dy.double(), None, x32.double(), None, w.double(), None, rstd.double(), False, True,
                         torch.float64)[0]
    scale = exact.abs().amax(-1, keepdim=True)
    err_one = ((one[0].double() - exact).abs() / scale).amax(-1)
    err_three = ((three[0].double() - exact).abs() / scale).amax(-1)
    assert float(err_one.max()) < 4e-6
    assert bool((err_one <= 2 * err_three + 2e-7).all()), (err_one, err_three)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_constant_rows(dtype):
    x = torch.full((3, 257), 0.1, dtype=dtype)
    x[1] = -7.0
    weight = torch.randn(257, dtype=dtype)
    bias = torch.randn(257, dtype=dtype)
    y, _, mean, rstd = cb.norm_fwd(x, None, None, weight, bias, EPS, False)
    assert_close(y, bias.expand(3, -1), **TOL[dtype])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(rstd, torch.full((3,), EPS ** -0.5, dtype=acc), rtol=1e-3, atol=0)
    assert torch.isfinite(y).all()


def test_dh_is_added():
    x, residual, _, weight, bias = _inputs(8, 129, torch.float32, "residual", "weight_bias", False)
    _, h, mean, rstd = cb.norm_fwd(x, residual, None, weight, bias, EPS, False)
    dy = torch.randn(8, 129)
    dh = torch.randn(8, 129)
    dx0, dw0, db0 = cb.norm_bwd(dy, None, h, None, weight, mean, rstd, False, True, h.dtype)
    dx1, dw1, db1 = cb.norm_bwd(dy, dh, h, None, weight, mean, rstd, False, True, h.dtype)
    assert_close(dx1, dx0 + dh, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dx0, dx1)
    assert torch.equal(dw0, dw1) and torch.equal(db0, db1)


def test_non_contiguous_inputs():
    base = torch.randn(64, 48)
    x = base.t()  # (48, 64), not contiguous
    w = torch.randn(128)[::2]
    exp = ref.norm_fwd(x, None, None, w, None, EPS, True)
    _check_fwd(cb.norm_fwd(x, None, None, w, None, EPS, True), exp)
    dy = torch.randn(64, 48).t()
    args = (dy, None, x, None, w, None, exp[3], True, False, x.dtype)
    _check_bwd(cb.norm_bwd(*args), ref.norm_bwd(*args), torch.float32)


# --------------------------------------------------------------------------------------------
# Determinism and code paths that must not change results
# --------------------------------------------------------------------------------------------


def _fwd_bwd(x, residual, mask, weight, bias, rms, dy, dh):
    y, h, mean, rstd = cb.norm_fwd(x, residual, mask, weight, bias, EPS, rms)
    xn = h if residual is not None else x
    dx, dw, db = cb.norm_bwd(dy, dh, xn, mask, weight, mean, rstd, rms, bias is not None, xn.dtype)
    return [t for t in (y, h, mean, rstd, dx, dw, db) if t is not None]


def _assert_all_equal(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert s.dtype == t.dtype and torch.equal(s, t)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("m, n", [(2600, 260), (20, 40000)], ids=["multi_block_chunks", "one_block_chunks"])
@pytest.mark.parametrize("kind", ["plain", "residual", "masked"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_weight_grads_of_both_chunk_kinds(m, n, kind, rms, threads):
    # The general rows' dw / db: chunks of more than 32 rows go through block and double rows, chunks of at
    # most 32 rows add into their partial row directly. Both against the reference, at 1 and 2 threads alike.
    assert (cb._rows_per_chunk(m, n) > 32) == (m == 2600)
    x, residual, mask, weight, bias = _inputs(m, n, torch.float32, kind, "weight_bias", rms, seed=m)
    torch.set_num_threads(2)
    _run_both(x, residual, mask, weight, bias, rms)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    dh = torch.randn(m, n) if residual is not None else None
    args = (x, residual, mask, weight, bias, rms, dy, dh)
    first = _fwd_bwd(*args)
    torch.set_num_threads(1)
    _assert_all_equal(first, _fwd_bwd(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["plain", "residual", "masked"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_deterministic_and_thread_independent(dtype, kind, rms, threads):
    m, n = 300, 257  # several threads and dw / db chunks
    x, residual, mask, weight, bias = _inputs(m, n, dtype, kind, "weight_bias", rms)
    dy = torch.randn(m, n).to(dtype)
    dh = torch.randn(m, n).to(dtype) if residual is not None else None
    args = (x, residual, mask, weight, bias, rms, dy, dh)
    torch.set_num_threads(2)
    first = _fwd_bwd(*args)
    _assert_all_equal(first, _fwd_bwd(*args))
    torch.set_num_threads(1)
    _assert_all_equal(first, _fwd_bwd(*args))
    torch.set_num_threads(3)
    _assert_all_equal(first, _fwd_bwd(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1023, 4096])
def test_streaming_and_prefetch_do_not_change_results(dtype, n, monkeypatch):
    x, residual, _, weight, bias = _inputs(40, n, dtype, "residual", "weight_bias", False)
    dy = torch.randn(40, n).to(dtype)
    dh = torch.randn(40, n).to(dtype)
    plain = _fwd_bwd(x, None, None, weight, bias, False, dy, None)
    fused = _fwd_bwd(x, residual, None, weight, bias, False, dy, dh)
    monkeypatch.setattr(cb, "_STREAM_MIN_BYTES", 0)  # non-temporal stores, also on odd rows
    monkeypatch.setattr(cb, "_PREFETCH", False)
    assert cb._flags(1) == 1
    _assert_all_equal(plain, _fwd_bwd(x, None, None, weight, bias, False, dy, None))
    _assert_all_equal(fused, _fwd_bwd(x, residual, None, weight, bias, False, dy, dh))
    # an output view that is not 32-byte aligned
    x2 = torch.empty(40 * n + 1, dtype=dtype)[1:].view(40, n).copy_(x)
    _assert_all_equal(plain, _fwd_bwd(x2, None, None, weight, bias, False, dy, None))


# --------------------------------------------------------------------------------------------
# Small rows (N <= 256: a straight-line path for plain float32 / bfloat16 rows)
# --------------------------------------------------------------------------------------------

SMALL_NS = [1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 64, 100, 128, 255, 256]


@pytest.mark.parametrize("n", SMALL_NS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
def test_small_rows_match_reference(n, dtype, rms, affine):
    # 37 rows: two full groups of 16 rows and a partial one; dw / db over several 8-row chunks.
    x, residual, mask, weight, bias = _inputs(37, n, dtype, "plain", affine, rms, seed=n)
    _run_both(x, residual, mask, weight, bias, rms)


@pytest.mark.parametrize("n", [1, 3, 8, 33, 256])
@pytest.mark.parametrize("kind", ["residual", "masked"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_rows_fused_add_and_masked(n, kind, rms, dtype):
    x, residual, mask, weight, bias = _inputs(37, n, dtype, kind, "weight_bias", rms, seed=n)
    if mask is not None and n > 1:
        # At least two valid elements per row (row 0 keeps none): with a single one, dx is 0 up to
        # float32 rounding amplified by rstd = eps**-0.5, beyond the absolute tolerance.
        mask[2:, :2] = True
    _run_both(x, residual, mask, weight, bias, rms)


@pytest.mark.parametrize("n", SMALL_NS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight_bias"])
def test_small_rows_bitwise_equal_to_the_general_path(n, dtype, rms, affine, threads, monkeypatch):
    # Enough rows for two threads and 64 dw / db chunks; the small-row path must give bitwise the
    # results of the general row loops (which the other tests hold to the reference).
    m = max(37, (1 << 15) // n + 5)
    x, _, _, weight, bias = _inputs(m, n, dtype, "plain", affine, rms, seed=n)
    x[3, 0] = 0.0  # a row starting with 0 (shift 0), and a constant row
    x[5] = 1.5
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(dtype)
    torch.set_num_threads(2)
    assert cb._SMALL_ROWS and cb._flags(1) & 4 == 0
    small = _fwd_bwd(x, None, None, weight, bias, rms, dy, None)
    monkeypatch.setattr(cb, "_SMALL_ROWS", False)
    assert cb._flags(1) & 4 == 4
    _assert_all_equal(small, _fwd_bwd(x, None, None, weight, bias, rms, dy, None))


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_small_rows_deterministic_and_thread_independent(n, dtype, rms, threads):
    m = 5000 if n == 8 else 700  # above the parallel threshold
    x, _, _, weight, bias = _inputs(m, n, dtype, "plain", "weight_bias", rms)
    dy = torch.randn(m, n).to(dtype)
    args = (x, None, None, weight, bias, rms, dy, None)
    torch.set_num_threads(2)
    first = _fwd_bwd(*args)
    _assert_all_equal(first, _fwd_bwd(*args))
    for t in (1, 3):
        torch.set_num_threads(t)
        _assert_all_equal(first, _fwd_bwd(*args))


def test_small_rows_non_finite_values_stay_in_their_row():
    # Masked lanes of a row's last lane group re-read its last element: an Inf there must not
    # turn the row's sums (or its neighbours') into NaN beyond what the reference gives.
    x = torch.randn(20, 7)
    x[4, 6] = float("inf")
    x[9, 6] = float("nan")
    y, _, mean, rstd = cb.norm_fwd(x, None, None, None, None, EPS, False)
    y_r, _, mean_r, rstd_r = ref.norm_fwd(x, None, None, None, None, EPS, False)
    finite = torch.ones(20, dtype=torch.bool)
    finite[[4, 9]] = False
    assert_close(y[finite], y_r[finite], **TOL[torch.float32])
    assert torch.equal(mean.isnan(), mean_r.isnan()) and torch.equal(rstd.isnan(), rstd_r.isnan())
    assert torch.isfinite(y[finite]).all()


# --------------------------------------------------------------------------------------------
# Errors and availability
# --------------------------------------------------------------------------------------------


def test_argument_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="Expected x of dtype"):
        cb.norm_fwd(x.int(), None, None, None, None, EPS, False)
    with pytest.raises(ValueError, match="Expected x to be 2-D"):
        cb.norm_fwd(torch.randn(8), None, None, None, None, EPS, False)
    with pytest.raises(ValueError, match="Expected weight of shape"):
        cb.norm_fwd(x, None, None, torch.randn(7), None, EPS, False)
    with pytest.raises(TypeError, match="Expected weight of a floating dtype"):
        cb.norm_fwd(x, None, None, torch.ones(8, dtype=torch.int32), None, EPS, False)
    with pytest.raises(ValueError, match="Expected residual of the same shape"):
        cb.norm_fwd(x, torch.randn(4, 9), None, None, None, EPS, False)
    with pytest.raises(TypeError, match="Expected mask of dtype torch.bool"):
        cb.norm_fwd(x, None, torch.ones(4, 8), None, None, EPS, False)
    with pytest.raises(ValueError, match="on the CPU"):
        cb.norm_fwd(x.to("meta"), None, None, None, None, EPS, False)
    with pytest.raises(TypeError, match="Expected x to be a torch.Tensor"):
        cb.norm_fwd([[1.0]], None, None, None, None, EPS, False)
    _, _, mean, rstd = cb.norm_fwd(x, None, None, None, None, EPS, False)
    with pytest.raises(ValueError, match="Expected dy of the same shape"):
        cb.norm_bwd(torch.randn(4, 7), None, x, None, None, mean, rstd, False, False, x.dtype)
    with pytest.raises(ValueError, match="Expected rstd of shape"):
        cb.norm_bwd(x, None, x, None, None, mean, rstd[:3], False, False, x.dtype)
    with pytest.raises(TypeError, match="Expected dx_dtype"):
        cb.norm_bwd(x, None, x, None, None, mean, rstd, False, False, torch.int32)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A backend module state that has not built or loaded anything yet."""
    monkeypatch.setattr(cb, "_lib", None)
    monkeypatch.setattr(cb, "_lib_path", None)
    monkeypatch.setattr(cb, "_error", None)
    monkeypatch.setenv("NORMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_missing_compiler_is_reported(fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_state / "no-such-compiler"))
    assert cb.available() is False
    assert "no C++ compiler" in cb.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable: no C\\+\\+ compiler"):
        cb.norm_fwd(torch.randn(2, 3), None, None, None, None, EPS, False)


def test_compile_error_is_reported(fresh_state, monkeypatch):
    bad = fresh_state / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cb, "_SRC", bad)
    assert cb.available() is False
    assert "compiling bad.cpp" in cb.unavailable_reason()
    with pytest.raises(RuntimeError, match="failed"):
        cb.norm_fwd(torch.randn(2, 3), None, None, None, None, EPS, False)
    # nothing half-written is left in the cache
    assert [p.name for p in (fresh_state / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_library_is_cached():
    path = cb.library_path()
    assert path is not None and os.path.exists(path)
    assert os.path.basename(path).startswith("norm_cpu_") and path.endswith(".so")


def test_concurrent_builds_share_one_library(tmp_path):
    # Two processes starting on an empty cache: one compiles, the other waits and loads the same
    # file; nothing temporary is left behind.
    import subprocess
    import sys

    src_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cb.__file__))))
    env = dict(os.environ, NORMSCOPE_CACHE_DIR=str(tmp_path), PYTHONPATH=src_dir)
    code = "from normscope.ops import cpu_backend as cb; print(cb.available(), cb.library_path())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0] == "True"
    assert outs[0][1] == outs[1][1]
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == [os.path.basename(outs[0][1])]
