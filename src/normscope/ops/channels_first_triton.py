"""Triton kernels of the channels-first LayerNorm (:mod:`normscope.ops.channels_first`) for CUDA tensors.

A contiguous ``(B, C, S)`` tensor is normalized over dim 1 without a permute copy. One program per
``(b, block of BLOCK_S positions)``: loops over channel tiles ``[BLOCK_C, BLOCK_S]`` (each channel's run of
positions is a coalesced load) accumulate per-position sums in float32 registers; two-pass statistics
(the mean, then the sum of squared deviations; never ``E[x^2] - E[x]^2``), then a last loop writes ``y``.
The backward's first loop gives ``<g>`` and ``<g * xhat>`` per position (``g = dy * w``) and each program's
``dw`` / ``db`` contribution per channel, stored into its own row of a ``(programs, C)`` buffer that float64
``sum``s reduce in a fixed order: no atomics, bitwise reproducible. float32 / float16 / bfloat16 inputs
(the statistics and partials in float32); runs on the CPU under ``TRITON_INTERPRET=1``, which is how the
suite tests it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from normscope.ops.triton_backend import _INTERPRETED, _round_to

__all__ = ["norm_cf_fwd", "norm_cf_bwd"]

_BLOCK_S = 64
_BLOCK_C = 16


@triton.jit
def _tile(c0, s, smask, base, C, S, BLOCK_C: tl.constexpr):
    """Channels ``c0 .. c0 + BLOCK_C`` at positions ``s``: channel indices, their mask, the tile's mask and offsets."""
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    m = cm[:, None] & smask[None, :]
    return c, cm, m, base + c[:, None].to(tl.int64) * S + s[None, :]


@triton.jit
def _cf_fwd_kernel(X, W, B_, Y, MEAN, RSTD, C, S, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    b = tl.program_id(0)
    ps = tl.program_id(1)
    s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    base = b.to(tl.int64) * C * S
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, cm, m, offs = _tile(c0, s, smask, base, C, S, BLOCK_C)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    mean = acc / C
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, cm, m, offs = _tile(c0, s, smask, base, C, S, BLOCK_C)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[None, :], 0.0)
        acc += tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(acc / C + eps)
    tl.store(MEAN + b.to(tl.int64) * S + s, mean, mask=smask)
    tl.store(RSTD + b.to(tl.int64) * S + s, rstd, mask=smask)
    for c0 in range(0, C, BLOCK_C):
        c, cm, m, offs = _tile(c0, s, smask, base, C, S, BLOCK_C)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * rstd[None, :]
        if HAS_W:
            y = y * tl.load(W + c, mask=cm, other=0.0)[:, None]
        if HAS_B:
            y = y + tl.load(B_ + c, mask=cm, other=0.0)[:, None]
        tl.store(Y + offs, _round_to(y, Y.dtype.element_ty, EMULATE_RTNE), mask=m)


@triton.jit
def _cf_bwd_kernel(DY, X, W, MEAN, RSTD, DX, PART, C, S, NS, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    b = tl.program_id(0)
    ps = tl.program_id(1)
    s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    base = b.to(tl.int64) * C * S
    mean = tl.load(MEAN + b.to(tl.int64) * S + s, mask=smask, other=0.0)
    rstd = tl.load(RSTD + b.to(tl.int64) * S + s, mask=smask, other=0.0)
    # this program's rows of the partials: dw at row 2 * pid, db at row 2 * pid + 1
    prow = PART + (b.to(tl.int64) * NS + ps) * 2 * C
    sg = tl.zeros([BLOCK_S], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, cm, m, offs = _tile(c0, s, smask, base, C, S, BLOCK_C)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (x - mean[None, :]) * rstd[None, :], 0.0)
        g = dy
        if HAS_W:
            g = dy * tl.load(W + c, mask=cm, other=0.0)[:, None]
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * xhat, axis=0)
        tl.store(prow + c, tl.sum(dy * xhat, axis=1), mask=cm)
        tl.store(prow + C + c, tl.sum(dy, axis=1), mask=cm)
    sg = sg / C
    sgx = sgx / C
    for c0 in range(0, C, BLOCK_C):
        c, cm, m, offs = _tile(c0, s, smask, base, C, S, BLOCK_C)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        g = dy
        if HAS_W:
            g = dy * tl.load(W + c, mask=cm, other=0.0)[:, None]
        dx = rstd[None, :] * (g - sg[None, :] - xhat * sgx[None, :])
        tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty, EMULATE_RTNE), mask=m)


def _grid(B: int, S: int) -> Tuple[int, int]:
    return (B, triton.cdiv(S, _BLOCK_S))


def norm_cf_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)`` of a contiguous ``(B, C, S)`` tensor; ``weight`` / ``bias`` float32 ``(C,)`` or None."""
    B, C, S = x.shape
    y = torch.empty_like(x)
    mean = x.new_empty((B, S), dtype=torch.float32)
    rstd = x.new_empty((B, S), dtype=torch.float32)
    dummy = mean
    _cf_fwd_kernel[_grid(B, S)](
        x, weight if weight is not None else dummy, bias if bias is not None else dummy, y, mean, rstd, C, S,
        float(eps), HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=_BLOCK_C, BLOCK_S=_BLOCK_S,
        EMULATE_RTNE=_INTERPRETED, num_warps=4,
    )
    return y, mean, rstd


def norm_cf_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                rstd: torch.Tensor, has_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                             Optional[torch.Tensor]]:
    """``(dx, dw or None, db or None)``; dw / db in float32, reduced over the programs in float64."""
    B, C, S = x.shape
    dx = torch.empty_like(x)
    grid = _grid(B, S)
    part = x.new_empty((grid[0] * grid[1], 2, C), dtype=torch.float32)
    _cf_bwd_kernel[grid](
        dy, x, weight if weight is not None else mean, mean, rstd, dx, part, C, S, grid[1],
        HAS_W=weight is not None, BLOCK_C=_BLOCK_C, BLOCK_S=_BLOCK_S, EMULATE_RTNE=_INTERPRETED, num_warps=4,
    )
    dw = part[:, 0].sum(0, dtype=torch.float64).float() if weight is not None else None
    db = part[:, 1].sum(0, dtype=torch.float64).float() if has_bias else None
    return dx, dw, db
