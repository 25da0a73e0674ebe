"""Fused Triton kernels of the monitor's per-call statistics and gradient norms (GPU tensors).

The Triton counterpart of normscope's fused C++ kernel (``ns_monitor_stats`` / ``ns_monitor_grad``,
:func:`normscope.ops.cpu_backend.monitor_stats`): the same fields, computed the same way, updated
in place in the monitor's float64 device buffer, without any host synchronisation (no ``.item()``,
no data-dependent Python branch; every grid depends on shapes only) and deterministically:

* :func:`monitor_stats` runs two kernels. ``_stats_kernel`` takes a block of ``ROWS`` rows per
  program and loops over column blocks. Every row: NaN / Inf counts of the input and the output.
  Sampled rows (``start, start + stride, ...``): the row mean and the variance (mean square for
  RMS norms) by two passes in float64 (rounded to float32 for non-float64 inputs, as the C++ and
  torch paths keep them; never ``E[x^2] - E[x]^2``), the eps-dominated flag, the variance bin
  (``bucketize(var, edges, right=True)`` by binary search), and the output's finite count, mean and
  centred sum of squares (M2) in float64, by two passes per row (never ``E[y^2] - E[y]^2``).
  Every ``hist_row_step``-th sampled row enters the input histogram (``floor((v - lo) * scale + 1)``
  clamped to the under/overflow bins, in float32, or float64 for float64 inputs, NaN in the last
  slot). The program's reductions over its rows are written to its row of a float64 scratch tensor;
  ``_finish_kernel`` (one program) reduces the scratch in a fixed order and updates the sums, the
  maxima and the first-event keys; the output triples of the rows, of the programs and of the call
  are combined with the parallel formula of Chan et al. (``M2 = sum M2_p + sum n_p (mean_p -
  mean)^2``, then one pairwise merge into the accumulated triple). Histograms are counted with
  atomic adds of whole numbers (exact in float64, so the order does not matter); the input histogram
  is first counted per program with ``tl.histogram``.
* :func:`monitor_grad`: the squared norm of a gradient in float64 (per-program partials reduced in
  a fixed order), added to (input gradient) or stored into (parameter gradient) its slot, with the
  "seen" flag and, for input gradients, the first non-finite key.

Float64 scalars (the eps threshold, the histogram range, the event keys) are passed as the int64
bit patterns of the doubles: Triton types Python floats as float32, which would round them.
Floating-point contraction is disabled when compiling (``enable_fp_fusion=False``), so that bin
indices and sums round as in the C++ kernel.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which the
tests use to compare them with the C++ kernel and float64 numpy.
"""

from __future__ import annotations

import math
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["monitor_stats", "monitor_grad"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_F64 = torch.float64

_NF = 16  # fields of a program's partials (see _stats_kernel)
_TILE = 2048  # elements of a [ROWS, BLOCK_N] tile of the statistics kernel
_MAX_BLOCK_N = 1024
_HIST_REGS = 4096  # largest per-program input histogram held in registers; more bins: element atomics
_GRAD_BLOCK = 4096
_GRAD_PROGRAMS = 512  # a constant, so that the reduction order is the same on every GPU
_FINISH_BLOCK = 256


@triton.jit(do_not_specialize=["rows", "cols", "start", "stride", "hstep", "n_edges", "bins", "eps_bits", "lo_bits",
                               "scale_bits"])
def _stats_kernel(
    X,
    Y,
    sxr,
    sxc,
    syr,
    syc,
    rows,
    cols,
    start,
    stride,
    hstep,
    VE,
    n_edges,
    VH,
    IH,
    PART,
    bins,
    eps_bits,
    lo_bits,
    scale_bits,
    RMS: tl.constexpr,
    X64: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HB: tl.constexpr,
    ATOMIC_HIST: tl.constexpr,
    NF: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    in_range = r < rows
    rel = r - start
    sampled = in_range & (rel >= 0) & ((rel % stride) == 0)
    hrow = sampled & (((rel // stride) % hstep) == 0)
    r64 = r.to(tl.int64)
    xrow = X + r64[:, None] * sxr
    yrow = Y + r64[:, None] * syr
    cbase = tl.arange(0, BLOCK_N)
    inf = float("inf")

    eps_thr = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    lo64 = lo_bits.to(tl.int64).to(tl.float64, bitcast=True)
    scale64 = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    top = bins + 1

    # Pass 1: input sums and NaN / Inf counts (every row), output sums and counts, input histogram.
    # Per-row accumulators; each column block is reduced over its columns first (a fixed tree).
    sx = tl.zeros([ROWS], dtype=tl.float64)
    sy = tl.zeros([ROWS], dtype=tl.float64)
    qy = tl.zeros([ROWS], dtype=tl.float64)
    nx = tl.zeros([ROWS], dtype=tl.int32)
    ix = tl.zeros([ROWS], dtype=tl.int32)
    ny = tl.zeros([ROWS], dtype=tl.int32)
    iy = tl.zeros([ROWS], dtype=tl.int32)
    hist = tl.zeros([HB], dtype=tl.int32)
    any_hist = tl.sum(hrow.to(tl.int32), axis=0) > 0  # most blocks hold no histogram row when it is capped
    for c0 in range(0, cols, BLOCK_N):
        c = c0 + cbase
        cm = c < cols
        c64 = c.to(tl.int64)
        m = in_range[:, None] & cm[None, :]
        xv = tl.load(xrow + c64[None, :] * sxc, mask=m, other=0.0)
        x = xv.to(tl.float64)
        x_nan = x != x
        x_inf = (x == inf) | (x == -inf)
        nx += tl.sum(x_nan.to(tl.int32), axis=1)
        ix += tl.sum(x_inf.to(tl.int32), axis=1)
        sx += tl.sum(x, axis=1)
        y = tl.load(yrow + c64[None, :] * syc, mask=m, other=0.0).to(tl.float64)
        y_nan = y != y
        y_inf = (y == inf) | (y == -inf)
        ny += tl.sum(y_nan.to(tl.int32), axis=1)
        iy += tl.sum(y_inf.to(tl.int32), axis=1)
        y0 = tl.where(y_nan | y_inf, 0.0, y)
        sy += tl.sum(y0, axis=1)
        if any_hist:
            hm = hrow[:, None] & cm[None, :]
            if X64:
                v = tl.where(x_nan, 0.0, x)
                q = tl.floor((v - lo64) * scale64 + 1.0)
                q = tl.minimum(tl.maximum(q, 0.0), top.to(tl.float64))
            else:
                v = tl.where(x_nan, 0.0, xv.to(tl.float32))
                q = tl.floor((v - lo64.to(tl.float32)) * scale64.to(tl.float32) + 1.0)
                q = tl.minimum(tl.maximum(q, 0.0), top.to(tl.float32))
            idx = tl.where(x_nan, bins + 2, q.to(tl.int32))
            if ATOMIC_HIST:
                tl.atomic_add(IH + idx, tl.full([ROWS, BLOCK_N], 1.0, tl.float64), mask=hm)
            else:
                idx = tl.where(hm, idx, HB - 1)  # the last register bin (>= bins + 3) takes what is not counted
                hist += tl.histogram(tl.reshape(idx, [ROWS * BLOCK_N]), HB)
    if not ATOMIC_HIST:
        hb = tl.arange(0, HB)
        tl.atomic_add(IH + hb, hist.to(tl.float64), mask=(hb < bins + 3) & (hist > 0))

    nf = cols.to(tl.float64)
    mean = sx / nf
    if RMS:
        centre = tl.zeros([ROWS], dtype=tl.float64)
    else:
        centre = mean

    bad_y = ny + iy
    y_n = (cols - bad_y).to(tl.float64)  # finite outputs of each row
    y_mean = sy / tl.maximum(y_n, 1.0)

    # Pass 2 (sampled rows): the centred (RMS: raw) sum of squares of the input, the centred one of the
    # finite outputs.
    sq = tl.zeros([ROWS], dtype=tl.float64)
    qy = tl.zeros([ROWS], dtype=tl.float64)
    for c0 in range(0, cols, BLOCK_N):
        c = c0 + cbase
        m = sampled[:, None] & (c < cols)[None, :]
        c64 = c.to(tl.int64)
        x = tl.load(xrow + c64[None, :] * sxc, mask=m, other=0.0).to(tl.float64)
        d = x - centre[:, None]
        sq += tl.sum(tl.where(m, d * d, 0.0), axis=1)
        y = tl.load(yrow + c64[None, :] * syc, mask=m, other=0.0).to(tl.float64)
        dy = y - y_mean[:, None]
        qy += tl.sum(tl.where(m & (y == y) & (y != inf) & (y != -inf), dy * dy, 0.0), axis=1)
    var = sq / nf
    if X64:
        mean_r = mean
    else:  # float32, as the C++ and torch paths keep the row statistics of non-float64 inputs
        mean_r = mean.to(tl.float32).to(tl.float64)
        var = var.to(tl.float32).to(tl.float64)
    valid = sampled & (var < inf)
    eps_row = valid & (var < eps_thr)

    # Variance histogram: bucketize(var, edges, right=True), the number of edges <= var; NaN/Inf rows last.
    a = tl.zeros([ROWS], dtype=tl.int32)
    b = a + n_edges
    for _ in tl.static_range(SEARCH_STEPS):
        active = valid & (a < b)
        mid = (a + b) // 2
        e = tl.load(VE + mid, mask=active, other=0.0)
        if X64:
            le = e <= var
        else:
            le = e.to(tl.float32) <= var.to(tl.float32)
        a = tl.where(active & le, mid + 1, a)
        b = tl.where(active & (le == 0), mid, b)
    vbin = tl.where(valid, a, n_edges + 1)
    tl.atomic_add(VH + vbin, tl.full([ROWS], 1.0, tl.float64), mask=sampled)

    zero = tl.zeros([ROWS], dtype=tl.float64)
    # The program's output triple: count, sum (its mean times its count) and M2 about its mean.
    p_n = tl.sum(tl.where(sampled, y_n, zero), axis=0)
    p_sum = tl.sum(tl.where(sampled, sy, zero), axis=0)
    p_dev = y_mean - p_sum / tl.maximum(p_n, 1.0)
    p_m2 = tl.sum(tl.where(sampled, qy + y_n * p_dev * p_dev, zero), axis=0)
    base = PART + pid * NF
    tl.store(base + 0, tl.sum(tl.where(valid, 1.0, zero), axis=0))
    tl.store(base + 1, tl.sum(tl.where(valid, mean_r, zero), axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid, var, zero), axis=0))
    tl.store(base + 3, tl.sum(tl.where(eps_row, 1.0, zero), axis=0))
    tl.store(base + 4, tl.sum(nx.to(tl.float64), axis=0))
    tl.store(base + 5, tl.sum(ix.to(tl.float64), axis=0))
    tl.store(base + 6, tl.sum(ny.to(tl.float64), axis=0))
    tl.store(base + 7, tl.sum(iy.to(tl.float64), axis=0))
    tl.store(base + 8, p_n)
    tl.store(base + 9, p_sum)
    tl.store(base + 10, p_m2)
    tl.store(base + 11, tl.max(tl.where(valid, mean_r, -inf), axis=0))
    tl.store(base + 12, tl.max(tl.where(valid, var, -inf), axis=0))
    tl.store(base + 13, tl.max(tl.where(valid, -mean_r, -inf), axis=0))
    tl.store(base + 14, tl.max(tl.where(valid, -var, -inf), axis=0))
    tl.store(base + 15, tl.sum(tl.where(sampled, bad_y.to(tl.float64), zero), axis=0))


@triton.jit(do_not_specialize=["n_part", "key_in_bits", "key_out_bits", "key_eps_bits"])
def _finish_kernel(
    PART,
    n_part,
    SUMS,
    MX,
    key_in_bits,
    key_out_bits,
    key_eps_bits,
    NF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    f = tl.arange(0, NF)
    inf = float("inf")
    acc = tl.zeros([BLOCK_P, NF], dtype=tl.float64)
    hi = tl.full([BLOCK_P, NF], -inf, dtype=tl.float64)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = (p < n_part)[:, None] & (f < NF)[None, :]
        t = tl.load(PART + p.to(tl.int64)[:, None] * NF + f[None, :], mask=pm, other=0.0)
        acc += t
        hi = tl.maximum(hi, tl.where(pm, t, -inf))
    s = tl.sum(acc, axis=0)
    mx = tl.max(hi, axis=0)
    sm = f < 8
    tl.store(SUMS + f, tl.load(SUMS + f, mask=sm, other=0.0) + s, mask=sm)
    # Output moments: the call's (count, mean, M2) from the programs' (second pass over the scratch),
    # then merged into the accumulated triple (Chan et al.).
    n_c = tl.sum(tl.where(f == 8, s, 0.0), axis=0)
    mean_c = tl.sum(tl.where(f == 9, s, 0.0), axis=0) / tl.maximum(n_c, 1.0)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float64)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < n_part
        row = PART + p.to(tl.int64) * NF
        pn = tl.load(row + 8, mask=pm, other=0.0)
        dp = tl.load(row + 9, mask=pm, other=0.0) / tl.maximum(pn, 1.0) - mean_c
        m2 += tl.where(pn > 0, tl.load(row + 10, mask=pm, other=0.0) + pn * dp * dp, 0.0)
    m2_c = tl.sum(m2, axis=0)
    n_a = tl.load(SUMS + 8)
    mean_a = tl.load(SUMS + 9)
    n_t = n_a + n_c
    w = n_c / tl.maximum(n_t, 1.0)
    delta = mean_c - mean_a
    tl.store(SUMS + 8, n_t)
    tl.store(SUMS + 9, mean_a + delta * w)
    tl.store(SUMS + 10, tl.load(SUMS + 10) + m2_c + delta * delta * (n_a * w))
    mm = (f >= 11) & (f < 15)
    mo = tl.where(mm, f - 11, 0)
    old = tl.load(MX + mo, mask=mm, other=-inf)
    tl.store(MX + mo, tl.where(mx > old, mx, old), mask=mm)
    # First-event keys: raised where the event happened in this call.
    n_bad_in = tl.sum(tl.where((f == 4) | (f == 5), s, 0.0), axis=0)
    n_eps = tl.sum(tl.where(f == 3, s, 0.0), axis=0)
    n_bad_out = tl.sum(tl.where(f == 15, s, 0.0), axis=0)
    k_in = key_in_bits.to(tl.int64).to(tl.float64, bitcast=True)
    k_out = key_out_bits.to(tl.int64).to(tl.float64, bitcast=True)
    k_eps = key_eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    o4 = tl.load(MX + 4)
    tl.store(MX + 4, tl.where((n_bad_in > 0) & (k_in > o4), k_in, o4))
    o5 = tl.load(MX + 5)
    tl.store(MX + 5, tl.where((n_bad_out > 0) & (k_out > o5), k_out, o5))
    o6 = tl.load(MX + 6)
    tl.store(MX + 6, tl.where((n_eps > 0) & (k_eps > o6), k_eps, o6))


@triton.jit(do_not_specialize=["n", "n_prog", "neg_key_bits"])
def _grad_kernel(
    G,
    n,
    n_prog,
    PART,
    SLOT,
    FIRED,
    KEY,
    neg_key_bits,
    BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    FINISH: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for b0 in range(pid * BLOCK, n, n_prog * BLOCK):
        o = offs + b0
        g = tl.load(G + o, mask=o < n, other=0.0).to(tl.float64)
        acc += g * g
    s = tl.sum(acc, axis=0)
    if FINISH:
        _grad_store(s, SLOT, FIRED, KEY, neg_key_bits, ACCUMULATE)
    else:
        tl.store(PART + pid, s)


@triton.jit
def _grad_store(s, SLOT, FIRED, KEY, neg_key_bits, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        tl.store(SLOT, tl.load(SLOT) + s)
        nk = neg_key_bits.to(tl.int64).to(tl.float64, bitcast=True)
        old = tl.load(KEY)
        tl.store(KEY, tl.where((s < float("inf")) | (nk <= old), old, nk))
    else:
        tl.store(SLOT, s)
    tl.store(FIRED, 1.0)


@triton.jit(do_not_specialize=["n_part", "neg_key_bits"])
def _grad_finish_kernel(PART, n_part, SLOT, FIRED, KEY, neg_key_bits, ACCUMULATE: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(PART + p, mask=p < n_part, other=0.0)
    _grad_store(tl.sum(acc, axis=0), SLOT, FIRED, KEY, neg_key_bits, ACCUMULATE)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import).
_INTERPRETED = type(_stats_kernel).__name__ == "InterpretedFunction"


def _bits(v: float) -> int:
    """The int64 bit pattern of the double ``v`` (the kernels bitcast it back)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(f"Expected CUDA tensors for the Triton monitor kernels (or TRITON_INTERPRET=1 to run "
                           f"them on the CPU through Triton's interpreter), but got a tensor on {t.device}")


def _check_f64(t: torch.Tensor, name: str, n: int, device: torch.device) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == _F64 and t.numel() == n and t.device == device
            and (n <= 1 or t.stride(-1) == 1) and t.dim() == 1):
        got = (f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"Expected {name} to be a 1-D float64 tensor of {n} contiguous elements on {device}, "
                         f"but got a {got}")


def _stats_config(rows: int, cols: int, bins: int) -> Tuple[int, int, int, bool]:
    """(ROWS, BLOCK_N, HB, atomic histogram) of the statistics kernel, from the shape only."""
    block_n = min(triton.next_power_of_2(cols), _MAX_BLOCK_N)
    row_block = max(1, min(_TILE // block_n, triton.next_power_of_2(rows)))
    hb = triton.next_power_of_2(bins + 4)
    return row_block, block_n, hb, hb > _HIST_REGS


def _compile_opts() -> dict:
    return {} if _INTERPRETED else {"enable_fp_fusion": False}


def monitor_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    sums: torch.Tensor,
    maxima: torch.Tensor,
    var_hist: torch.Tensor,
    in_hist: torch.Tensor,
    var_edges: torch.Tensor,
    *,
    start: int,
    stride: int,
    rms: bool,
    eps_threshold: float,
    hist_row_step: int,
    hist_range: Tuple[float, float],
    keys: Tuple[float, float, float],
) -> None:
    """Accumulate one monitored call's statistics into float64 device accumulators, in place.

    The Triton form of :func:`normscope.ops.cpu_backend.monitor_stats`, with the same arguments and
    fields: ``x`` (a norm layer's input) and ``y`` (its output) are 2-D ``(rows, cols)`` tensors of
    the same shape (any strides) of dtype float32, float64, bfloat16 or float16 (each its own), on
    the device of the accumulators; ``sums`` (11; the last three a (count, mean, M2) triple),
    ``maxima`` (7), ``var_hist`` (``len(var_edges) + 2``), ``in_hist`` (``hist_bins + 3``) and
    ``var_edges`` are 1-D float64 tensors (views of the monitor's buffer). Nothing is read back to the host.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"Expected {name} to be a 2-D (rows, values) tensor, but got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"Expected {name} of dtype float32, float64, bfloat16 or float16, but got {t.dtype}")
    if y.shape != x.shape:
        raise ValueError(f"Expected y of the same shape as x {tuple(x.shape)}, but got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"Expected y on the device of x ({x.device}), but got {y.device}")
    _check_device(x)
    ne = var_edges.numel()
    _check_f64(sums, "sums", 11, x.device)
    _check_f64(maxima, "maxima", 7, x.device)
    _check_f64(var_hist, "var_hist", ne + 2, x.device)
    if in_hist.numel() < 4:
        raise ValueError(f"Expected in_hist to have at least 4 elements, but got {in_hist.numel()}")
    _check_f64(in_hist, "in_hist", in_hist.numel(), x.device)
    _check_f64(var_edges, "var_edges", ne, x.device)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    if stride < 1 or not 0 <= start < rows or hist_row_step < 1:
        raise ValueError(f"Expected stride >= 1, 0 <= start < {rows} and hist_row_step >= 1, but got "
                         f"stride={stride}, start={start}, hist_row_step={hist_row_step}")
    lo, hi = float(hist_range[0]), float(hist_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"Expected hist_range to be a pair (low, high) of finite numbers with low < high, but got "
                         f"{hist_range!r}")
    bins = in_hist.numel() - 3
    _stats_call(x, y, sums, maxima, var_hist, in_hist, var_edges, start, stride, rms, eps_threshold, hist_row_step,
                lo, bins / (hi - lo), keys)


def _stats_call(x, y, sums, maxima, var_hist, in_hist, var_edges, start: int, stride: int, rms: bool,
                eps_threshold: float, hist_row_step: int, lo: float, scale: float, keys) -> None:
    """:func:`monitor_stats` without argument checks (``lo`` and ``scale = bins / (high - low)`` given)."""
    rows, cols = x.shape
    ne = var_edges.numel()
    bins = in_hist.numel() - 3
    row_block, block_n, hb, atomic = _stats_config(rows, cols, bins)
    n_prog = triton.cdiv(rows, row_block)
    part = torch.empty((n_prog, _NF), dtype=_F64, device=x.device)
    opts = _compile_opts()
    _stats_kernel[(n_prog,)](
        x, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), rows, cols, start, stride, hist_row_step,
        var_edges, ne, var_hist, in_hist, part, bins, _bits(eps_threshold), _bits(lo), _bits(scale),
        RMS=bool(rms), X64=x.dtype == _F64, SEARCH_STEPS=int(ne).bit_length() + 1, ROWS=row_block, BLOCK_N=block_n,
        HB=hb, ATOMIC_HIST=atomic, NF=_NF, num_warps=4 if row_block * block_n <= 1024 else 8, **opts)
    _finish_kernel[(1,)](part, n_prog, sums, maxima, _bits(keys[0]), _bits(keys[1]), _bits(keys[2]), NF=_NF,
                         BLOCK_P=_FINISH_BLOCK, num_warps=4, **opts)


def monitor_grad(grad: torch.Tensor, slot: torch.Tensor, fired: torch.Tensor, key: torch.Tensor, neg_key: float,
                 accumulate: bool) -> None:
    """Sum of squares of ``grad`` (in float64) into the one-element float64 tensor ``slot``, in place.

    The Triton form of :func:`normscope.ops.cpu_backend.monitor_grad`: ``accumulate=True`` (an input
    gradient) adds it, and raises ``key`` to ``neg_key`` when the sum is not finite;
    ``accumulate=False`` (a parameter gradient) stores it (``key`` is not used). Either way sets
    ``fired`` to 1. ``slot``, ``fired`` and ``key`` are on the device of ``grad``.
    """
    if not isinstance(grad, torch.Tensor) or grad.dtype not in _DTYPES:
        raise TypeError(f"Expected grad of dtype float32, float64, bfloat16 or float16, but got "
                        f"{grad.dtype if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    _check_device(grad)
    for name, t in (("slot", slot), ("fired", fired), ("key", key)):
        _check_f64(t, name, 1, grad.device)
    _grad_call(grad, slot, fired, key, neg_key, accumulate)


def _grad_call(grad, slot, fired, key, neg_key: float, accumulate: bool) -> None:
    """:func:`monitor_grad` without argument checks."""
    g = grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().reshape(-1)
    n = g.numel()
    n_prog = max(1, min(triton.cdiv(n, _GRAD_BLOCK), _GRAD_PROGRAMS))
    opts = _compile_opts()
    nk = _bits(neg_key)
    if n_prog == 1:
        _grad_kernel[(1,)](g, n, 1, slot, slot, fired, key, nk, BLOCK=_GRAD_BLOCK, ACCUMULATE=bool(accumulate),
                           FINISH=True, num_warps=8, **opts)
        return
    part = torch.empty(n_prog, dtype=_F64, device=g.device)
    _grad_kernel[(n_prog,)](g, n, n_prog, part, slot, fired, key, nk, BLOCK=_GRAD_BLOCK, ACCUMULATE=bool(accumulate),
                            FINISH=False, num_warps=8, **opts)
    _grad_finish_kernel[(1,)](part, n_prog, slot, fired, key, nk, ACCUMULATE=bool(accumulate),
                              BLOCK_P=_FINISH_BLOCK, num_warps=4, **opts)
