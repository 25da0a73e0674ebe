"""Triton backend: fused LayerNorm / RMSNorm forward and backward kernels.

Implements the backend contract of :mod:`normscope.ops.reference` (``norm_fwd`` / ``norm_bwd`` on
2-D row-major problems) for float32 / float16 / bfloat16 inputs; weight and bias may have any of
those dtypes (or float64) independently of the input. All arithmetic is in float32 registers; no
atomics, and every grid depends only on the shape and the device, so results are bitwise
reproducible.

Forward
    * fused path (``next_pow2(N) <= max block``, 4096 by default): a program holds ``ROWS`` whole
      rows in registers (a ``[ROWS, next_pow2(N)]`` tile of 4096-8192 elements): one read of the
      inputs, one write of the outputs. Statistics use the *corrected two-pass* algorithm:
      ``m1 = <x>``, ``d = x - m1``, ``m2 = <d>``, ``var = <(d - m2)^2>``, ``mean = m1 + m2``,
      ``y = (d - m2) * rstd``, accurate even when ``|mean| >> std`` (never ``E[x^2] - E[x]^2``).
    * column-loop path (longer rows, any ``N``): one program per row. A first loop over column
      blocks computes per-block ``(count, mean, M2)`` of the row shifted by a pivot (the mean of
      its first block) and merges them with Chan's formula; a second loop writes ``y`` (re-reading
      the row, mostly from L2). On an H200 this beats holding 8K-16K-element rows in registers.

Backward
    A persistent grid of ``P`` programs (a few per multiprocessor; 4 on CPU). Fused path
    (``next_pow2(N) <= 8192``): program ``p`` handles row tiles ``p, p + P, ...``, reads ``xn`` /
    ``dy`` (and ``mask``, ``dh``) once, writes ``dx`` once, and accumulates its ``dw`` / ``db``
    partial in float32 registers (two levels: blocks of 16 of its tiles, then the blocks), stored
    once into row ``p`` of a ``(P, N)`` buffer. Column-loop
    path: groups of ``ROWS`` rows; a first loop over column blocks gives the row sums ``<g>``,
    ``<g * xhat>``, a second writes ``dx`` and adds the group's ``dw`` / ``db`` contribution to row
    ``p`` of the partials buffer in global memory (no other program touches that row). The
    partials are then reduced over ``P`` by deterministic float64 ``sum``s, into separate ``dw`` and ``db``
    tensors (outputs of the custom op must not alias each other).

    LayerNorm does not trust the saved float32 mean, which is rounded to a spacing of about the
    standard deviation for rows such as mean 1e4, std 1e-3: it is only a pivot ``s``, and the
    centering is recomputed from ``x`` (as in forward and the reference):
    ``delta = <x - s>``, ``c = (x - s) - delta``, ``xhat = c * rstd``. The fused path does one
    more in-register row sum for ``delta``; the column-loop path accumulates ``sum(x - s)``,
    ``sum(g)`` and ``sum(g * (x - s))`` in its first loop and uses
    ``sum(g * c) = sum(g * (x - s)) - delta * sum(g)``, with no extra pass over memory.

The largest fused block can be forced down (to test the column-loop paths on small ``N``) with the
module attribute :data:`MAX_FUSED_BLOCK` or the keyword argument ``max_block`` of
:func:`norm_fwd` / :func:`norm_bwd`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["norm_fwd", "norm_bwd", "MAX_FUSED_BLOCK"]

#: Override of the largest row block held in registers (a power of two), or None for the defaults
#: below. Rows longer than this take the column-loop path.
MAX_FUSED_BLOCK: Optional[int] = None

# Launch heuristics, tuned on an H200 (bf16, triton 3.6). Large fused blocks lose to the column
# loop there (the loop's second read hits L2 and its small programs keep more loads in flight).
_FWD_MAX_BLOCK = 4096  # largest row block of the fused forward
_FWD_LOOP_BLOCK = 4096  # column block of the looped forward
# The backward's settings: benchmarks/gpu_bwd_sweep.py on an H200 (LayerNorm, bf16, 2026-12-04; the previous
# values 8192 / 2 / 8192 / 16 in brackets): 1.33x faster at N = 16384 (fused instead of looped), 1.34-1.42x from
# N = 65536 (four rows a group), 1.04-1.08x at N = 1024-4096.
_BWD_MAX_BLOCK = 16384  # largest row block of the fused backward [8192]
_BWD_LOOP_ROWS = 4  # rows per group of the looped backward (partials updated once per group) [2]
_BWD_LOOP_TILE = 16384  # elements of a [rows, block] tile of the looped backward [8192]
_BWD_LOOP_WARPS = 16
_BWD_LOOP_PER_SM = 1  # looped backward programs per multiprocessor
_BWD_WARPS_PER_SM = 8  # fused backward: programs per multiprocessor = this // num_warps [16]
_BWD_DW_TILES = 16  # fused backward: tiles per block of the two-level dw / db sum

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PARAM_DTYPES = _IO_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_to(v, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even.

    Compiled Triton rounds float32 -> bfloat16 to nearest even; the CPU interpreter truncates, so
    under the interpreter (EMULATE_RTNE) the rounding is done with integer ops instead.
    """
    if EMULATE_RTNE and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _fwd_fused_kernel(
    X,
    R,
    H,
    MASK,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    M,
    N,
    eps,
    offset,
    HAS_RES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        h = _round_to(x + r, H.dtype.element_ty, EMULATE_RTNE)
        tl.store(H + offs, h, mask=ok)
        x = h.to(tl.float32)  # statistics on the rounded h
    if HAS_MASK:
        mk = tl.load(MASK + offs, mask=ok, other=0)
        valid = ok & (mk != 0)
        cnt = tl.sum(valid.to(tl.float32), axis=1)
        denom = tl.maximum(cnt, 1.0)
    else:
        valid = ok
        denom = N * 1.0

    if RMS:
        xv = tl.where(valid, x, 0.0)
        var = tl.sum(xv * xv, axis=1) / denom
        xc = x
    else:
        m1 = tl.sum(tl.where(valid, x, 0.0), axis=1) / denom
        d = x - m1[:, None]
        m2 = tl.sum(tl.where(valid, d, 0.0), axis=1) / denom
        xc = d - m2[:, None]
        xcv = tl.where(valid, xc, 0.0)
        var = tl.sum(xcv * xcv, axis=1) / denom
        tl.store(MEAN + rows, m1 + m2, mask=row_ok)
    rstd = tl.rsqrt(var + eps)
    if HAS_MASK:
        rstd = tl.where(cnt > 0, rstd, 0.0)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    if HAS_MASK:
        y = tl.where(valid, y, 0.0)
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty, EMULATE_RTNE), mask=ok)


@triton.jit
def _load_row_block(
    X,
    R,
    H,
    MASK,
    base,
    cols,
    N,
    HAS_RES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_H: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Load one column block of a row as float32 (h rounded to H's dtype when HAS_RES)."""
    ok = cols < N
    if HAS_RES:
        if STORE_H:
            x = tl.load(X + base + cols, mask=ok, other=0.0).to(tl.float32)
            r = tl.load(R + base + cols, mask=ok, other=0.0).to(tl.float32)
            h = _round_to(x + r, H.dtype.element_ty, EMULATE_RTNE)
            tl.store(H + base + cols, h, mask=ok)
        else:
            h = tl.load(H + base + cols, mask=ok, other=0.0)
        x = h.to(tl.float32)
    else:
        x = tl.load(X + base + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        mk = tl.load(MASK + base + cols, mask=ok, other=0)
        valid = ok & (mk != 0)
    else:
        valid = ok
    return x, valid


@triton.jit
def _fwd_looped_kernel(
    X,
    R,
    H,
    MASK,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    N,
    eps,
    offset,
    HAS_RES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols0 = tl.arange(0, BLOCK_N)

    if RMS:
        ss = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        cnt = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        for start in range(0, N, BLOCK_N):
            x, valid = _load_row_block(
                X, R, H, MASK, base, start + cols0, N, HAS_RES, HAS_MASK, True, EMULATE_RTNE
            )
            xv = tl.where(valid, x, 0.0)
            ss += tl.sum(xv * xv, axis=0)
            cnt += tl.sum(valid.to(tl.float32), axis=0)
        var = ss / tl.maximum(cnt, 1.0)
        shift = 0.0
        mean = 0.0
    else:
        # Pivot: mean of the first block (rows are shifted by it so that the running statistics
        # stay small and exact-ish when |mean| >> std).
        x, valid = _load_row_block(X, R, H, MASK, base, cols0, N, HAS_RES, HAS_MASK, True, EMULATE_RTNE)
        c0 = tl.sum(valid.to(tl.float32), axis=0)
        shift = tl.sum(tl.where(valid, x, 0.0), axis=0) / tl.maximum(c0, 1.0)
        cnt = c0 * 0.0
        mean_s = c0 * 0.0  # running mean of (x - shift)
        m2 = c0 * 0.0
        for start in range(0, N, BLOCK_N):
            x, valid = _load_row_block(
                X, R, H, MASK, base, start + cols0, N, HAS_RES, HAS_MASK, True, EMULATE_RTNE
            )
            d = tl.where(valid, x - shift, 0.0)
            cb = tl.sum(valid.to(tl.float32), axis=0)
            mb = tl.sum(d, axis=0) / tl.maximum(cb, 1.0)
            e = tl.where(valid, d - mb, 0.0)
            m2b = tl.sum(e * e, axis=0)
            n_new = cnt + cb
            delta = mb - mean_s
            frac = cb / tl.maximum(n_new, 1.0)
            mean_s = mean_s + delta * frac
            m2 = m2 + m2b + delta * delta * cnt * frac
            cnt = n_new
        var = m2 / tl.maximum(cnt, 1.0)
        mean = shift + mean_s
        tl.store(MEAN + row, mean)
    rstd = tl.rsqrt(var + eps)
    if HAS_MASK:
        rstd = tl.where(cnt > 0, rstd, 0.0)
    tl.store(RSTD + row, rstd)

    # h written above is read back below by other threads of this program
    tl.debug_barrier()
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        col_ok = cols < N
        x, valid = _load_row_block(X, R, H, MASK, base, cols, N, HAS_RES, HAS_MASK, False, EMULATE_RTNE)
        if RMS:
            y = x * rstd
        else:
            y = ((x - shift) - mean_s) * rstd
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
            y = y * w
        if HAS_B:
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y + b
        if HAS_MASK:
            y = tl.where(valid, y, 0.0)
        tl.store(Y + base + cols, _round_to(y, Y.dtype.element_ty, EMULATE_RTNE), mask=col_ok)


@triton.jit
def _bwd_fused_kernel(
    DY,
    DH,
    XN,
    MASK,
    W,
    MEAN,
    RSTD,
    DX,
    DW_P,
    DB_P,
    M,
    N,
    num_tiles,
    offset,
    HAS_DH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    DW_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    # dw / db: a two-level sum -- each block of up to DW_TILES of the program's tiles is summed on
    # its own, then added into the program's total (one running sum over every tile of a program
    # loses accuracy when there are few programs and many rows)
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for t0 in range(pid, num_tiles, nprog * DW_TILES):
        dw_blk = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        db_blk = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        n_in = tl.minimum((num_tiles - t0 + nprog - 1) // nprog, DW_TILES)
        for i in range(0, n_in):
            tile = t0 + i * nprog
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < M
            ok = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            x = tl.load(XN + offs, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_MASK:
                mk = tl.load(MASK + offs, mask=ok, other=0)
                valid = ok & (mk != 0)
                denom = tl.maximum(tl.sum(valid.to(tl.float32), axis=1), 1.0)
            else:
                valid = ok
                denom = N * 1.0
            if RMS:
                xhat = x * rstd[:, None]
            else:
                # The saved float32 mean is only a pivot s: the centering is recomputed from x as
                # c = (x - s) - <x - s>, exact even when |mean| >> std (where s is off by ~ std).
                s = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(tl.float32)
                d = tl.where(valid, x - s[:, None], 0.0)
                delta = tl.sum(d, axis=1) / denom
                xhat = (d - delta[:, None]) * rstd[:, None]
            xhat = tl.where(valid, xhat, 0.0)
            g0 = tl.where(valid, dy, 0.0)
            if HAS_W:
                g = g0 * w[None, :]
            else:
                g = g0
            c2 = tl.sum(g * xhat, axis=1) / denom
            if RMS:
                dx = (g - xhat * c2[:, None]) * rstd[:, None]
            else:
                c1 = tl.sum(g, axis=1) / denom
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            if HAS_MASK:
                dx = tl.where(valid, dx, 0.0)
            if HAS_DH:
                dx += tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty, EMULATE_RTNE), mask=ok)
            if HAS_W:
                dw_blk += g0 * xhat
            if HAS_B:
                db_blk += g0
        if HAS_W:
            dw_acc += dw_blk
        if HAS_B:
            db_acc += db_blk
    prow = pid.to(tl.int64) * N
    if HAS_W:
        tl.store(DW_P + prow + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB_P + prow + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _bwd_load_block(
    DY,
    XN,
    MASK,
    W,
    offs,
    cols,
    col_ok,
    ok,
    offset,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
):
    """One [ROWS, BLOCK_N] block of the backward: (x, g0 = dy, g = dy * w, valid), g masked."""
    x = tl.load(XN + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        mk = tl.load(MASK + offs, mask=ok, other=0)
        valid = ok & (mk != 0)
    else:
        valid = ok
    g0 = tl.where(valid, dy, 0.0)
    if HAS_W:
        g = g0 * (tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset)[None, :]
    else:
        g = g0
    return x, g0, g, valid


@triton.jit
def _bwd_looped_kernel(
    DY,
    DH,
    XN,
    MASK,
    W,
    MEAN,
    RSTD,
    DX,
    DW_P,
    DB_P,
    M,
    N,
    num_groups,
    offset,
    HAS_DH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_N)
    prow = pid.to(tl.int64) * N
    # groups of ROWS rows: the partials in global memory are updated once per group, not per row
    for grp in range(pid, num_groups, nprog):
        rows = grp * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        base = rows.to(tl.int64)[:, None] * N
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(tl.float32)
        if RMS:
            s = rstd  # unused
        else:
            # pivot s: the saved (rounded) mean; the exact centering is recomputed from x - s
            s = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(tl.float32)
        s0 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)  # sum(m * (x - s))
        s1 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)  # sum(g)
        s2 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)  # sum(g * (x - s)); RMS: sum(g * xhat)
        cv = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            x, g0, g, valid = _bwd_load_block(
                DY, XN, MASK, W, base + cols[None, :], cols, col_ok, ok, offset, HAS_MASK, HAS_W
            )
            if RMS:
                s2 += g * tl.where(valid, x * rstd[:, None], 0.0)
            else:
                d = tl.where(valid, x - s[:, None], 0.0)
                s0 += d
                s1 += g
                s2 += g * d
            if HAS_MASK:
                cv += tl.sum(valid.to(tl.float32), axis=1)
        if HAS_MASK:
            denom = tl.maximum(cv, 1.0)
        else:
            denom = N * 1.0
        if RMS:
            c1 = tl.zeros([ROWS], dtype=tl.float32)
            delta = c1
            c2 = tl.sum(s2, axis=1) / denom
        else:
            # with c = (x - s) - delta: <g * xhat> = rstd * (sum(g * (x - s)) - delta * sum(g)) / n
            sg = tl.sum(s1, axis=1)
            delta = tl.sum(s0, axis=1) / denom
            c1 = sg / denom
            c2 = (tl.sum(s2, axis=1) - delta * sg) * rstd / denom
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            offs = base + cols[None, :]
            x, g0, g, valid = _bwd_load_block(DY, XN, MASK, W, offs, cols, col_ok, ok, offset, HAS_MASK, HAS_W)
            if RMS:
                xhat = tl.where(valid, x * rstd[:, None], 0.0)
                dx = (g - xhat * c2[:, None]) * rstd[:, None]
            else:
                xhat = tl.where(valid, ((x - s[:, None]) - delta[:, None]) * rstd[:, None], 0.0)
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            if HAS_MASK:
                dx = tl.where(valid, dx, 0.0)
            if HAS_DH:
                dx += tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty, EMULATE_RTNE), mask=ok)
            # the program's own row of the partials: no other program touches it
            if HAS_W:
                pw = tl.load(DW_P + prow + cols, mask=col_ok, other=0.0)
                tl.store(DW_P + prow + cols, pw + tl.sum(g0 * xhat, axis=0), mask=col_ok)
            if HAS_B:
                pb = tl.load(DB_P + prow + cols, mask=col_ok, other=0.0)
                tl.store(DB_P + prow + cols, pb + tl.sum(g0, axis=0), mask=col_ok)
        # make this group's partial updates visible to every thread before the next group
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import).
_INTERPRETED = type(_fwd_fused_kernel).__name__ == "InterpretedFunction"

_SM_COUNT = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _num_warps(elems: int, per_warp: int) -> int:
    return max(1, min(16, elems // per_warp))


def _rows_for(target_rows: int, m: int, min_programs: int) -> int:
    """Largest power of two <= target_rows that still gives >= min_programs row groups."""
    rows = max(1, target_rows)
    while rows > 1 and triton.cdiv(m, rows) < min_programs:
        rows //= 2
    return rows


def _fwd_config(M: int, N: int, mb: int, dev: torch.device):
    """(fused, rows, block_n, num_warps) of the forward."""
    block_n = triton.next_power_of_2(N)
    sms = _num_sms(dev)
    if block_n <= mb:
        tile = 4096 if block_n <= 1024 else 8192
        rows = _rows_for(max(1, tile // block_n), M, 2 * sms)
        return True, rows, block_n, _num_warps(rows * block_n, 1024)
    bn = min(mb, _FWD_LOOP_BLOCK)
    return False, 1, bn, (4 if M >= 8 * sms else 8) if bn >= 4096 else _num_warps(bn, 512)


def _bwd_config(M: int, N: int, mb: int, dev: torch.device):
    """(fused, rows, block_n, num_warps, programs) of the backward."""
    block_n = triton.next_power_of_2(N)
    sms = _num_sms(dev)
    fused = block_n <= mb
    if fused:
        rows = _rows_for(max(1, 4096 // block_n), M, 2 * sms)
        warps = _num_warps(rows * block_n, 512)
        per_sm = max(1, _BWD_WARPS_PER_SM // warps)
    else:
        rows = _rows_for(_BWD_LOOP_ROWS, M, sms)
        block_n = min(mb, max(16, _BWD_LOOP_TILE // rows))
        warps = min(_BWD_LOOP_WARPS, max(1, rows * block_n // 256))
        per_sm = _BWD_LOOP_PER_SM
    groups = triton.cdiv(M, rows)
    programs = min(groups, 4 if dev.type != "cuda" else sms * per_sm)
    return fused, rows, block_n, warps, programs


def _max_block(max_block: Optional[int], default: int) -> int:
    mb = max_block if max_block is not None else MAX_FUSED_BLOCK
    if mb is None:
        return default
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1 or (mb & (mb - 1)) != 0:
        raise ValueError(f"Expected max_block to be a power of two >= 1, but got {mb!r}")
    return mb


def _check_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"Expected {name} of dtype in ({names}), but got {t.dtype}")


def _check_2d(name: str, t: torch.Tensor, shape, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"Expected {name} of shape {tuple(shape)}, but got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"Expected {name} on device {device}, but got {t.device}")
    return t.contiguous()


def _check_mask(mask: torch.Tensor, shape, device) -> torch.Tensor:
    mask = _check_2d("mask", mask, shape, device)
    if mask.dtype != torch.bool:
        raise TypeError(f"Expected mask of dtype torch.bool, but got {mask.dtype}")
    return mask.view(torch.uint8)


def _check_param(name: str, t: Optional[torch.Tensor], n: int, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _check_2d(name, t, (n,), device)
    _check_dtype(name, t, _PARAM_DTYPES)
    return t.contiguous()


def norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    rms: bool,
    h_dtype: Optional[torch.dtype] = None,
    *,
    offset: float = 0.0,
    max_block: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Triton forward; same contract as :func:`normscope.ops.reference.norm_fwd`.

    ``max_block`` (a power of two) overrides the largest row block held in registers.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected x to be a torch.Tensor, but got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"Expected x to be 2-D (M, N), but got shape {tuple(x.shape)}")
    _check_dtype("x", x, _IO_DTYPES)
    M, N = x.shape
    dev = x.device
    x = x.contiguous()
    if residual is not None and mask is not None:
        raise ValueError("Expected at most one of residual and mask, but got both")
    if residual is not None:
        residual = _check_2d("residual", residual, (M, N), dev)
        _check_dtype("residual", residual, _IO_DTYPES)
        if h_dtype is None:
            h_dtype = torch.promote_types(x.dtype, residual.dtype)
        if h_dtype not in _IO_DTYPES:
            names = ", ".join(str(d) for d in _IO_DTYPES)
            raise TypeError(f"Expected h_dtype in ({names}), but got {h_dtype}")
    if mask is not None:
        mask = _check_mask(mask, (M, N), dev)
    weight = _check_param("weight", weight, N, dev)
    bias = _check_param("bias", bias, N, dev)
    if M > 0 and N == 0:
        raise ValueError(f"Expected a non-empty normalized dimension, but got shape {(M, N)}")

    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    h = torch.empty((M, N), dtype=h_dtype, device=dev) if residual is not None else None
    mean = None if rms else torch.empty((M,), dtype=torch.float32, device=dev)
    rstd = torch.empty((M,), dtype=torch.float32, device=dev)
    if M == 0:
        return y, h, mean, rstd

    mb = _max_block(max_block, _FWD_MAX_BLOCK)
    fused, rows, block_n, warps = _fwd_config(M, N, mb, dev)
    dummy = y
    args = (
        x,
        residual if residual is not None else dummy,
        h if h is not None else dummy,
        mask if mask is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        y,
        mean if mean is not None else rstd,
        rstd,
    )
    flags = dict(
        HAS_RES=residual is not None,
        HAS_MASK=mask is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        RMS=bool(rms),
        EMULATE_RTNE=_INTERPRETED,
    )
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if fused:
            _fwd_fused_kernel[(triton.cdiv(M, rows),)](
                *args,
                M,
                N,
                float(eps),
                float(offset),
                ROWS=rows,
                BLOCK_N=block_n,
                num_warps=warps,
                **flags,
            )
        else:
            _fwd_looped_kernel[(M,)](
                *args,
                N,
                float(eps),
                float(offset),
                BLOCK_N=block_n,
                num_warps=warps,
                **flags,
            )
    return y, h, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    xn: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    rms: bool,
    has_bias: bool,
    dx_dtype: torch.dtype,
    *,
    offset: float = 0.0,
    max_block: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Triton backward; same contract as :func:`normscope.ops.reference.norm_bwd`.

    ``max_block`` (a power of two) overrides the largest row block held in registers.
    """
    if not isinstance(xn, torch.Tensor):
        raise TypeError(f"Expected xn to be a torch.Tensor, but got {type(xn).__name__}")
    if xn.dim() != 2:
        raise ValueError(f"Expected xn to be 2-D (M, N), but got shape {tuple(xn.shape)}")
    _check_dtype("xn", xn, _IO_DTYPES)
    M, N = xn.shape
    dev = xn.device
    xn = xn.contiguous()
    dy = _check_2d("dy", dy, (M, N), dev)
    _check_dtype("dy", dy, _IO_DTYPES)
    if dh is not None:
        dh = _check_2d("dh", dh, (M, N), dev)
        _check_dtype("dh", dh, _IO_DTYPES)
    if mask is not None:
        mask = _check_mask(mask, (M, N), dev)
    weight = _check_param("weight", weight, N, dev)
    if dx_dtype not in _IO_DTYPES:
        names = ", ".join(str(d) for d in _IO_DTYPES)
        raise TypeError(f"Expected dx_dtype in ({names}), but got {dx_dtype}")
    if not isinstance(rstd, torch.Tensor):
        raise TypeError(f"Expected rstd to be a torch.Tensor, but got {type(rstd).__name__}")
    rstd = _check_2d("rstd", rstd, (M,), dev)
    if not rms:
        if mean is None:
            raise ValueError("Expected mean for LayerNorm (rms=False), but got None")
        mean = _check_2d("mean", mean, (M,), dev)
    if M > 0 and N == 0:
        raise ValueError(f"Expected a non-empty normalized dimension, but got shape {(M, N)}")

    dx = torch.empty((M, N), dtype=dx_dtype, device=dev)
    has_w = weight is not None
    has_b = bool(has_bias)
    n_part = int(has_w) + int(has_b)
    if M == 0:
        z = torch.zeros((N,), dtype=torch.float32, device=dev)
        return dx, (z if has_w else None), (z.clone() if has_b else None)

    mb = _max_block(max_block, _BWD_MAX_BLOCK)
    fused, rows, block_n, warps, P = _bwd_config(M, N, mb, dev)
    flags = dict(
        HAS_DH=dh is not None,
        HAS_MASK=mask is not None,
        HAS_W=has_w,
        HAS_B=has_b,
        RMS=bool(rms),
        EMULATE_RTNE=_INTERPRETED,
    )
    alloc = torch.empty if fused else torch.zeros
    part = alloc((max(n_part, 1), P, N), dtype=torch.float32, device=dev)
    args = (
        dy,
        dh if dh is not None else dy,
        xn,
        mask if mask is not None else dy,
        weight if weight is not None else dy,
        mean if mean is not None else rstd,
        rstd,
        dx,
        part[0],
        part[n_part - 1] if n_part else part[0],
    )
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kernel = _bwd_fused_kernel if fused else _bwd_looped_kernel
        extra = dict(DW_TILES=_BWD_DW_TILES) if fused else {}
        kernel[(P,)](
            *args,
            M,
            N,
            triton.cdiv(M, rows),
            float(offset),
            ROWS=rows,
            BLOCK_N=block_n,
            num_warps=warps,
            **flags,
            **extra,
        )
    # Deterministic reductions over the P partial rows, into two separate tensors: the custom op
    # normscope::norm_bwd forbids outputs that alias each other (views of one result) or an input.
    # (summed in float64 and rounded once: P x N values, negligible next to the kernel)
    dw = torch.sum(part[0], 0, dtype=torch.float64).float() if has_w else None
    db = torch.sum(part[n_part - 1], 0, dtype=torch.float64).float() if has_b else None
    return dx, dw, db
