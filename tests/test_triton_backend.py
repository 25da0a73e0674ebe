"""Triton backend vs the reference contract, on CPU tensors under the Triton interpreter."""

import importlib

import pytest
import torch

triton = importlib.import_module("triton")

from normscope.ops import reference as ref  # noqa: E402
from normscope.ops import triton_backend as tb  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (atol, rtol) for tensors stored in each dtype
TOL = {F32: (1e-4, 1e-4), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}
STAT_TOL = dict(atol=1e-4, rtol=1e-4)  # float32 statistics and dw / db


def _close(actual, expected, dtype=None, **kw):
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = kw or (dict(zip(("atol", "rtol"), TOL[dtype])) if dtype is not None else STAT_TOL)
    torch.testing.assert_close(actual, expected, **tol)


def _problem(M, N, dtype, variant="plain", affine="wb", rms=False, w_dtype=F32, res_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, N, generator=g) * 2 + 0.5).to(dtype)
    res = mask = None
    if variant == "residual":
        res = torch.randn(M, N, generator=g).to(res_dtype or dtype)
    elif variant == "masked":
        mask = torch.rand(M, N, generator=g) > 0.35
    w = (torch.randn(N, generator=g) + 1).to(w_dtype) if "w" in affine else None
    b = torch.randn(N, generator=g).to(w_dtype) if ("b" in affine and not rms) else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return to(x), to(res), to(mask), to(w), to(b)


def _check_fwd_bwd(
    M,
    N,
    dtype,
    variant="plain",
    affine="wb",
    rms=False,
    w_dtype=F32,
    res_dtype=None,
    max_block=None,
    eps=1e-5,
    with_dh=None,
):
    x, res, mask, w, b = _problem(M, N, dtype, variant, affine, rms, w_dtype, res_dtype)
    y, h, mean, rstd = tb.norm_fwd(x, res, mask, w, b, eps, rms, max_block=max_block)
    ey, eh, emean, erstd = ref.norm_fwd(x, res, mask, w, b, eps, rms)
    _close(y, ey, dtype)
    if eh is None:
        assert h is None
    else:
        assert h.dtype == eh.dtype and torch.equal(h, eh)  # exact rounding of the fp32 sum
    _close(mean, emean)
    _close(rstd, erstd)

    xn = eh if eh is not None else x
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(M, N, generator=g).to(dtype).to(DEV)
    if with_dh is None:
        with_dh = res is not None
    dh = torch.randn(M, N, generator=g).to(xn.dtype).to(DEV) if with_dh else None
    has_b = b is not None
    dx, dw, db = tb.norm_bwd(dy, dh, xn, mask, w, emean, erstd, rms, has_b, xn.dtype, max_block=max_block)
    edx, edw, edb = ref.norm_bwd(dy, dh, xn, mask, w, emean, erstd, rms, has_b, xn.dtype)
    _close(dx, edx, xn.dtype)
    _close(dw, edw)
    _close(db, edb)
    return (y, h, mean, rstd), (dx, dw, db)


# --------------------------------------------------------------------------------------------
# Matches the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["wb", ""])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("variant", ["plain", "residual", "masked"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_matches_reference(rms, variant, dtype, affine):
    _check_fwd_bwd(5, 33, dtype, variant, affine, rms)


@pytest.mark.parametrize("M", [0, 1, 3])
@pytest.mark.parametrize("N", [1, 7, 33, 1023, 4097])
def test_shapes(M, N):
    # bf16 input with fp32 weight / bias (the common mixed-precision case)
    _check_fwd_bwd(M, N, BF16, "plain", "wb", rms=False, w_dtype=F32)
    if N in (7, 1023):
        _check_fwd_bwd(M, N, F32, "masked", "w", rms=True, w_dtype=F16)


def test_many_rows_multi_tile_persistent():
    # several multi-row tiles per persistent backward program, with a ragged last tile
    _check_fwd_bwd(301, 33, F32, "plain", "wb", rms=False)
    _check_fwd_bwd(70, 100, BF16, "masked", "w", rms=True)


def test_mixed_residual_dtypes():
    # bf16 x + fp32 residual -> fp32 h; y stays bf16
    (y, h, _, _), (dx, _, _) = _check_fwd_bwd(4, 65, BF16, "residual", "wb", res_dtype=F32)
    assert y.dtype == BF16 and h.dtype == F32 and dx.dtype == F32
    # fp32 x with fp16 weight
    _check_fwd_bwd(4, 65, F32, "plain", "wb", w_dtype=F16)


def test_h_dtype_override():
    x, res, _, w, b = _problem(3, 40, F32, "residual")
    y, h, mean, rstd = tb.norm_fwd(x, res, None, w, b, 1e-5, False, h_dtype=BF16)
    ey, eh, emean, erstd = ref.norm_fwd(x, res, None, w, b, 1e-5, False, h_dtype=BF16)
    assert h.dtype == BF16 and torch.equal(h, eh)
    _close(y, ey, F32)
    _close(rstd, erstd)


# --------------------------------------------------------------------------------------------
# Column-loop path (forced with a small max block)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,max_block", [(37, 16), (1000, 128)], ids=["N37-block16", "N1000-block128"])
@pytest.mark.parametrize(
    "variant,dtype",
    [("plain", F32), ("residual", BF16), ("masked", F16)],
)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_column_loop_matches_reference(rms, variant, dtype, N, max_block):
    # M = 19: backward row groups of 4 (the last one ragged) over the 4 persistent programs on CPU,
    # so one program accumulates its dw / db partial over two groups
    _check_fwd_bwd(19 if N < 100 else 9, N, dtype, variant, "wb", rms, max_block=max_block)


def test_column_loop_equals_fused_closely():
    x, res, mask, w, b = _problem(4, 300, F32, "plain")
    fused = tb.norm_fwd(x, None, None, w, b, 1e-5, False)
    looped = tb.norm_fwd(x, None, None, w, b, 1e-5, False, max_block=64)
    for a, c in zip(fused, looped):
        _close(a, c, atol=1e-5, rtol=1e-5)


def test_module_level_max_block(monkeypatch):
    monkeypatch.setattr(tb, "MAX_FUSED_BLOCK", 16)
    _check_fwd_bwd(3, 50, F32, "masked", "wb", rms=False)


def test_default_column_loop_for_long_rows():
    # rows longer than the default fused blocks loop without any override
    assert 20000 > tb._FWD_MAX_BLOCK and 20000 > tb._BWD_MAX_BLOCK
    _check_fwd_bwd(2, 20000, F32, "plain", "wb", rms=False)


# --------------------------------------------------------------------------------------------
# Numerics edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_block", [None, 64], ids=["fused", "loop"])
def test_large_mean_small_std(max_block):
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-3 * torch.randn(4, 1000, generator=g, dtype=torch.float64)).float().to(DEV)
    y, _, mean, rstd = tb.norm_fwd(x, None, None, None, None, 1e-12, False, max_block=max_block)
    # exact statistics of the (float32) data
    ey, _, emean, erstd = ref.norm_fwd(x.double(), None, None, None, None, 1e-12, False)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    torch.testing.assert_close(rstd.double(), erstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), emean, rtol=0, atol=1e-3)
    torch.testing.assert_close(y.double(), ey, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "masked"])
@pytest.mark.parametrize("max_block", [None, 64], ids=["fused", "loop"])
def test_large_mean_small_std_backward(max_block, variant):
    # The saved float32 mean is rounded to a spacing of ~1e-3 at 1e4, as large as the std; the
    # 3e-4 offset puts the true mean between two float32 values. Backward must recompute the
    # centering from x (the saved mean is only a pivot), or dx / dw are off by percents.
    g = torch.Generator().manual_seed(0)
    M, N = 5, 300
    x = (1e4 + 3e-4 + 1e-3 * torch.randn(M, N, generator=g, dtype=torch.float64)).float().to(DEV)
    mask = (torch.rand(M, N, generator=g) > 0.3).to(DEV) if variant == "masked" else None
    w = (torch.randn(N, generator=g) + 1).to(DEV)
    dy = torch.randn(M, N, generator=g).to(DEV)
    _, _, mean, rstd = tb.norm_fwd(x, None, mask, w, w, 1e-12, False, max_block=max_block)
    dx, dw, db = tb.norm_bwd(dy, None, x, mask, w, mean, rstd, False, True, F32, max_block=max_block)
    _, _, emean, erstd = ref.norm_fwd(x.double(), None, mask, w, w, 1e-12, False)
    edx, edw, edb = ref.norm_bwd(dy.double(), None, x.double(), mask, w, emean, erstd, False, True, F32)
    for a, e in ((dx, edx), (dw, edw), (db, edb)):
        scale = float(e.abs().max())
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("M", [0, 5])
@pytest.mark.parametrize("max_block", [None, 16], ids=["fused", "loop"])
def test_bwd_outputs_do_not_alias(M, max_block):
    # normscope::norm_bwd (a custom op) rejects outputs that alias each other or an input
    x, _, _, w, b = _problem(M, 40, F32, "plain")
    dy = torch.ones_like(x)
    _, _, mean, rstd = tb.norm_fwd(x, None, None, w, b, 1e-5, False)
    outs = tb.norm_bwd(dy, None, x, None, w, mean, rstd, False, True, F32, max_block=max_block)
    dx, dw, db = outs
    assert dw is not None and db is not None and dw.numel() == db.numel() == 40
    # (empty tensors have no storage to share: a null data pointer)
    ptrs = [t.untyped_storage().data_ptr() for t in outs if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert not set(ptrs) & {t.untyped_storage().data_ptr() for t in (dy, x, w, mean, rstd) if t.numel()}


@pytest.mark.parametrize("max_block", [None, 16], ids=["fused", "loop"])
def test_constant_rows(max_block):
    x = torch.full((3, 33), 3.0, device=DEV)
    x[1] = -0.1
    w = torch.linspace(-1, 1, 33, device=DEV)
    b = torch.linspace(2, 3, 33, device=DEV)
    y, _, mean, rstd = tb.norm_fwd(x, None, None, w, b, 1e-5, False, max_block=max_block)
    torch.testing.assert_close(mean, torch.tensor([3.0, -0.1, 3.0], device=DEV))
    torch.testing.assert_close(rstd, torch.full((3,), 1e-5**-0.5, device=DEV), rtol=1e-5, atol=0)
    torch.testing.assert_close(y, b.expand(3, 33), atol=1e-3, rtol=0)
    ey, _, _, _ = ref.norm_fwd(x, None, None, w, b, 1e-5, False)
    torch.testing.assert_close(y, ey, atol=1e-3, rtol=0)


@pytest.mark.parametrize("max_block", [None, 16], ids=["fused", "loop"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_mask_all_false_and_all_true_rows(rms, max_block):
    M, N = 4, 40
    x, _, _, w, b = _problem(M, N, F32, "plain", "wb", rms)
    x[1] = float("nan")  # masked-out values must not leak into anything
    mask = torch.rand(M, N, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[1] = False
    mask[2] = True
    mask = mask.to(DEV)
    y, _, mean, rstd = tb.norm_fwd(x, None, mask, w, b, 1e-5, rms, max_block=max_block)
    assert torch.isfinite(y).all()
    assert rstd[1] == 0 and torch.all(y[1] == 0) and torch.all(y[~mask] == 0)
    if not rms:
        assert mean[1] == 0
    # all-True row equals the unmasked computation
    yu, _, meanu, rstdu = tb.norm_fwd(x[2:3], None, None, w, b, 1e-5, rms)
    _close(y[2:3], yu, F32)
    _close(rstd[2:3], rstdu)
    xr = x.clone()
    xr[1] = 0.0
    ey, _, emean, erstd = ref.norm_fwd(xr, None, mask, w, b, 1e-5, rms)
    _close(y, ey, F32)
    _close(rstd, erstd)

    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(DEV)
    dh = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(DEV)
    dx, dw, db = tb.norm_bwd(dy, dh, xr, mask, w, mean, rstd, rms, not rms, F32, max_block=max_block)
    assert torch.equal(dx[1], dh[1])  # empty row: only the dh pass-through
    edx, edw, edb = ref.norm_bwd(dy, dh, xr, mask, w, emean, erstd, rms, not rms, F32)
    _close(dx, edx, F32)
    _close(dw, edw)
    _close(db, edb)


@pytest.mark.parametrize("max_block", [None, 16], ids=["fused", "loop"])
def test_dh_is_added(max_block):
    x, _, _, w, b = _problem(3, 50, F32, "plain")
    _, _, mean, rstd = tb.norm_fwd(x, None, None, w, b, 1e-5, False)
    dy = torch.randn(3, 50, generator=torch.Generator().manual_seed(7)).to(DEV)
    dh = torch.randn(3, 50, generator=torch.Generator().manual_seed(8)).to(DEV)
    dx0, dw0, db0 = tb.norm_bwd(dy, None, x, None, w, mean, rstd, False, True, F32, max_block=max_block)
    dx1, dw1, db1 = tb.norm_bwd(dy, dh, x, None, w, mean, rstd, False, True, F32, max_block=max_block)
    torch.testing.assert_close(dx1, dx0 + dh, atol=1e-6, rtol=1e-6)
    assert torch.equal(dw0, dw1) and torch.equal(db0, db1)


@pytest.mark.parametrize("max_block", [None, 16], ids=["fused", "loop"])
def test_deterministic(max_block):
    M, N = 301 if max_block is None else 19, 33
    x, _, mask, w, b = _problem(M, N, BF16, "masked", "wb")
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(BF16).to(DEV)
    outs = []
    for _ in range(2):
        y, _, mean, rstd = tb.norm_fwd(x, None, mask, w, b, 1e-5, False, max_block=max_block)
        dx, dw, db = tb.norm_bwd(dy, None, x, mask, w, mean, rstd, False, True, BF16, max_block=max_block)
        outs.append((y, mean, rstd, dx, dw, db))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Empty problems and errors
# --------------------------------------------------------------------------------------------


def test_empty_rows():
    x = torch.empty(0, 16, dtype=BF16, device=DEV)
    res = torch.empty(0, 16, dtype=F32, device=DEV)
    w = torch.ones(16, device=DEV)
    y, h, mean, rstd = tb.norm_fwd(x, res, None, w, w, 1e-5, False)
    assert y.shape == (0, 16) and y.dtype == BF16 and h.dtype == F32 and h.shape == (0, 16)
    assert mean.shape == (0,) and rstd.shape == (0,) and rstd.dtype == F32
    dx, dw, db = tb.norm_bwd(x, None, h, None, w, mean, rstd, False, True, F32)
    assert dx.shape == (0, 16) and dx.dtype == F32
    assert torch.equal(dw, torch.zeros(16, device=DEV)) and torch.equal(db, dw)
    _, _, m2, _ = tb.norm_fwd(x, None, None, None, None, 1e-5, True)
    assert m2 is None


def test_errors():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(TypeError, match="Expected x of dtype .* but got torch.float64"):
        tb.norm_fwd(x.double(), None, None, None, None, 1e-5, False)
    with pytest.raises(TypeError, match="Expected mask of dtype torch.bool"):
        tb.norm_fwd(x, None, torch.ones(2, 8, device=DEV), None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"Expected weight of shape \(8,\), but got \(7,\)"):
        tb.norm_fwd(x, None, None, torch.ones(7, device=DEV), None, 1e-5, False)
    with pytest.raises(ValueError, match="Expected x to be 2-D"):
        tb.norm_fwd(x[0], None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="Expected at most one of residual and mask"):
        tb.norm_fwd(x, x, x > 0, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="Expected max_block to be a power of two"):
        tb.norm_fwd(x, None, None, None, None, 1e-5, False, max_block=24)
    with pytest.raises(TypeError, match="Expected dy of dtype .* but got torch.float64"):
        tb.norm_bwd(x.double(), None, x, None, None, None, torch.ones(2, device=DEV), True, False, F32)
    with pytest.raises(ValueError, match="Expected mean for LayerNorm"):
        tb.norm_bwd(x, None, x, None, None, None, torch.ones(2, device=DEV), False, False, F32)


def test_gpu_memcheck_script_runs_every_case_under_the_interpreter():
    """scripts/gpu-memcheck.py (run under compute-sanitizer on GPU machines by benchmarks/gpu_suite.sh) keeps
    working: on CPU tensors through the interpreter it runs every kernel case and says so."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-memcheck.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all cases ran"
    ran = [ln for ln in lines if ln.startswith("ok  ")]
    assert any("LayerNormGRU" in ln for ln in ran) and any("Monitor" in ln for ln in ran)
    assert len(ran) == 20, lines
