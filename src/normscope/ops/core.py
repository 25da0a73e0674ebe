"""The two ``torch.library`` custom ops behind every public function, and their autograd.

``normscope::norm_fwd`` and ``normscope::norm_bwd`` work on 2-D problems ``(M, N)``; the public
functions reshape to that fixed rank first, so ``torch.compile(fullgraph=True)`` sees one opaque
op with a fake implementation and no graph break. The semantics of both ops are those of
:func:`normscope.ops.reference.norm_fwd` / :func:`~normscope.ops.reference.norm_bwd`; the backend
that runs them is chosen per call by :mod:`normscope.ops.dispatch`.

Ops return empty tensors in place of absent outputs (``h`` without a residual, ``mean`` for
RMSNorm, ``dw`` / ``db`` without weight / bias): custom ops cannot return ``None``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from normscope.ops import dispatch
from normscope.ops.reference import acc_dtype

__all__ = ["norm_fwd", "norm_bwd"]


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype if dtype is not None else like.dtype)


@torch.library.custom_op("normscope::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    h_dtype: Optional[torch.dtype],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalization forward on ``(M, N)``: returns ``(y, h or empty, mean or empty, rstd)``."""
    backend = dispatch.backend_for(x)
    y, h, mean, rstd = backend.norm_fwd(x, residual, mask, weight, bias, eps, rms, h_dtype)
    acc = acc_dtype(x.dtype)
    return (
        y,
        h if h is not None else _empty(x),
        mean if mean is not None else _empty(x, acc),
        rstd,
    )


@norm_fwd.register_fake
def _norm_fwd_fake(x, residual, mask, weight, bias, eps, rms, h_dtype):
    m, n = x.shape
    acc = acc_dtype(x.dtype)
    y = x.new_empty((m, n))
    if residual is not None:
        h = x.new_empty((m, n), dtype=h_dtype or torch.promote_types(x.dtype, residual.dtype))
    else:
        h = _empty(x)
    mean = _empty(x, acc) if rms else x.new_empty((m,), dtype=acc)
    return y, h, mean, x.new_empty((m,), dtype=acc)


@torch.library.custom_op("normscope::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    dh: Optional[Tensor],
    xn: Tensor,
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    has_bias: bool,
    dx_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Normalization backward on ``(M, N)``: returns ``(dx, dw or empty, db or empty)``."""
    backend = dispatch.backend_for(xn)
    dx, dw, db = backend.norm_bwd(
        dy, dh, xn, mask, weight, None if rms else mean, rstd, rms, has_bias, dx_dtype
    )
    acc = acc_dtype(xn.dtype)
    return (
        dx,
        dw if dw is not None else _empty(xn, acc),
        db if db is not None else _empty(xn, acc),
    )


@norm_bwd.register_fake
def _norm_bwd_fake(dy, dh, xn, mask, weight, mean, rstd, rms, has_bias, dx_dtype):
    m, n = xn.shape
    acc = acc_dtype(xn.dtype)
    dx = xn.new_empty((m, n), dtype=dx_dtype)
    dw = xn.new_empty((n,), dtype=acc) if weight is not None else _empty(xn, acc)
    db = xn.new_empty((n,), dtype=acc) if has_bias else _empty(xn, acc)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, residual, mask, weight, bias, eps, rms, h_dtype = inputs
    _, h, mean, rstd = output
    xn = h if residual is not None else x
    ctx.save_for_backward(xn, mask, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype
    ctx.r_dtype = residual.dtype if residual is not None else None
    ctx.w_dtype = weight.dtype if weight is not None else None
    ctx.b_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, dh, _dmean, _drstd):
    xn, mask, weight, mean, rstd = ctx.saved_tensors
    dx_dtype = xn.dtype if ctx.has_residual else ctx.x_dtype
    dx, dw, db = norm_bwd(
        dy, dh if ctx.has_residual else None, xn, mask, weight, mean, rstd,
        ctx.rms, ctx.has_bias, dx_dtype,
    )
    gx = dx.to(ctx.x_dtype)
    gr = dx.to(ctx.r_dtype) if ctx.has_residual else None
    gw = dw.to(ctx.w_dtype) if ctx.w_dtype is not None else None
    gb = db.to(ctx.b_dtype) if ctx.has_bias else None
    return gx, gr, None, gw, gb, None, None, None


torch.library.register_autograd("normscope::norm_fwd", _backward, setup_context=_setup_context)
