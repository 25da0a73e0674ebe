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

from normscope.ops import dispatch, reference
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
    offset: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalization forward on ``(M, N)``: returns ``(y, h or empty, mean or empty, rstd)``."""
    if torch.autograd.forward_ad._current_level >= 0 and not torch.compiler.is_compiling():
        # Reached only by direct callers of the op (a torch.jit.trace of a model, torch.ops.normscope...):
        # the public functions and the eager / scripted modules switch to torch's differentiable ops under
        # forward-mode AD. The op has no forward-AD formula, and torch.func.jvp would give a zero tangent.
        raise NotImplementedError(
            "normscope::norm_fwd has no forward-mode AD formula (torch.autograd.forward_ad, torch.func.jvp / "
            "jacfwd / hessian): call normscope's functions or modules (eager or torch.jit.script), which use "
            "torch's differentiable ops under forward-mode AD, instead of the op itself or a torch.jit.trace of "
            "the model"
        )
    backend = dispatch.backend_for(x)
    y, h, mean, rstd = backend.norm_fwd(x, residual, mask, weight, bias, eps, rms, h_dtype, offset=offset)
    acc = acc_dtype(x.dtype)
    return (
        y,
        h if h is not None else _empty(x),
        mean if mean is not None else _empty(x, acc),
        rstd,
    )


@norm_fwd.register_fake
def _norm_fwd_fake(x, residual, mask, weight, bias, eps, rms, h_dtype, offset=0.0):
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
    offset: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Normalization backward on ``(M, N)``: returns ``(dx, dw or empty, db or empty)``."""
    backend = dispatch.backend_for(xn)
    dx, dw, db = backend.norm_bwd(
        dy, dh, xn, mask, weight, None if rms else mean, rstd, rms, has_bias, dx_dtype, offset=offset
    )
    acc = acc_dtype(xn.dtype)
    return (
        dx,
        dw if dw is not None else _empty(xn, acc),
        db if db is not None else _empty(xn, acc),
    )


@norm_bwd.register_fake
def _norm_bwd_fake(dy, dh, xn, mask, weight, mean, rstd, rms, has_bias, dx_dtype, offset=0.0):
    m, n = xn.shape
    acc = acc_dtype(xn.dtype)
    dx = xn.new_empty((m, n), dtype=dx_dtype)
    dw = xn.new_empty((n,), dtype=acc) if weight is not None else _empty(xn, acc)
    db = xn.new_empty((n,), dtype=acc) if has_bias else _empty(xn, acc)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, residual, mask, weight, bias, eps, rms, h_dtype = inputs[:8]
    ctx.offset = float(inputs[8]) if len(inputs) > 8 else 0.0
    ctx.eps = eps
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
    if torch.is_grad_enabled():
        # create_graph=True (double backward, gradient penalties, hessian): a backward that
        # autograd can differentiate again, with rstd recomputed from xn so that its dependence
        # on xn is part of the graph.
        dx, dw, db = norm_bwd_composite(
            dy, dh if ctx.has_residual else None, xn, mask, weight, ctx.eps,
            ctx.rms, ctx.has_bias, dx_dtype, ctx.offset,
        )
    else:
        dx, dw, db = norm_bwd(
            dy, dh if ctx.has_residual else None, xn, mask, weight, mean, rstd,
            ctx.rms, ctx.has_bias, dx_dtype, ctx.offset,
        )
    gx = dx.to(ctx.x_dtype)
    gr = dx.to(ctx.r_dtype) if ctx.has_residual else None
    gw = dw.to(ctx.w_dtype) if ctx.w_dtype is not None else None
    gb = db.to(ctx.b_dtype) if ctx.has_bias else None
    return gx, gr, None, gw, gb, None, None, None, None


torch.library.register_autograd("normscope::norm_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Autograd transforms beyond first-order reverse mode
# ---------------------------------------------------------------------------------------------
#
# A custom op has no forward-AD formula, and torch.func cannot see through it. Under forward-mode
# AD and torch.func transforms the public functions therefore run the same computation written in
# differentiable torch ops (the reference contract, statistics in float32 or float64), which every
# transform supports; eager reverse mode and torch.compile keep the custom ops.


def use_composite() -> bool:
    """Whether a call must run the differentiable composite instead of the custom op.

    True inside ``torch.autograd.forward_ad.dual_level`` and inside any ``torch.func`` transform
    (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``); never while
    ``torch.compile`` traces. Costs well under a microsecond.
    """
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _transforms_active(x: Tensor) -> bool:
    return use_composite() or torch._C._functorch.is_functorch_wrapped_tensor(x)


# ``use_composite`` as an op, for TorchScript code (the scripted modules), which cannot call Python. A scripted
# module calls ``normscope::norm_fwd`` directly; under ``torch.func.jvp`` that op would give a zero tangent, and
# under ``forward_ad``, ``grad`` or ``jacrev`` it raises, so the scripted forward asks this op first (with its
# input, which the transforms wrap) and runs torch's own differentiable ops while forward-mode AD or a transform
# is active. CONSERVATIVE alias analysis keeps TorchScript from folding it into a constant on its first run;
# under vmap (a bool output cannot be batched) the answer is True.
_LIB = torch.library.Library("normscope", "FRAGMENT")
_LIB.define("transforms_active(Tensor x) -> bool", alias_analysis="CONSERVATIVE")
_LIB.impl("transforms_active", _transforms_active, "CompositeImplicitAutograd")
torch.library.register_vmap("normscope::transforms_active", lambda info, in_dims, x: (True, None))


def norm_fwd_composite(
    x: Tensor,
    residual: Optional[Tensor],
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    h_dtype: Optional[torch.dtype],
    offset: float = 0.0,
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`norm_fwd` in differentiable torch ops: returns ``(y, h or None)``."""
    y, h, _, _ = reference.norm_fwd(x, residual, mask, weight, bias, eps, rms, h_dtype, offset=offset)
    return y, h


def norm_bwd_composite(
    dy: Tensor,
    dh: Optional[Tensor],
    xn: Tensor,
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    eps: float,
    rms: bool,
    has_bias: bool,
    dx_dtype: torch.dtype,
    offset: float = 0.0,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:func:`norm_bwd` in differentiable torch ops, ``rstd`` recomputed from ``xn`` and ``eps``."""
    rstd = reference.norm_fwd(xn, None, mask, None, None, eps, rms)[3]
    return reference.norm_bwd(
        dy, dh, xn, mask, weight, None, rstd, rms, has_bias, dx_dtype, offset=offset
    )


# ---------------------------------------------------------------------------------------------
# ExpandedWeights (torch.nn.utils._per_sample_grad.call_for_per_sample_grads, Opacus-style)
# ---------------------------------------------------------------------------------------------


def is_expanded_weight(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is a ``torch.nn.utils._expanded_weights.ExpandedWeight``."""
    if t is None or type(t) in (Tensor, torch.nn.Parameter):
        return False
    from torch.nn.utils._expanded_weights import ExpandedWeight

    return isinstance(t, ExpandedWeight)


def _unpack(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.orig_weight if is_expanded_weight(t) else t


class ExpandedWeightsNorm(torch.autograd.Function):
    """The public ops with ExpandedWeight parameters: ``grad_sample`` per sample for weight / bias.

    ``x``, ``residual`` and ``mask`` come with their full shapes (batch first, or second where the
    weight says ``batch_first=False``); ``n`` is the normalized size. The input gradient comes from
    ``normscope::norm_bwd``; the weight and bias get no ``.grad``, only ``.grad_sample``, as with
    torch's own ExpandedWeights layers.
    """

    @staticmethod
    def forward(ctx, x, residual, mask, weight, bias, n, eps, rms, h_dtype, offset):
        w, b = _unpack(weight), _unpack(bias)
        m2 = None if mask is None else mask.expand(x.shape).reshape(-1, n)
        args = (
            x.reshape(-1, n), None if residual is None else residual.reshape(-1, n), m2,
            None if w is None else w.detach().reshape(n), None if b is None else b.detach().reshape(n),
            eps, rms, h_dtype,
        )
        y, h, mean, rstd = norm_fwd(*args, offset) if offset != 0.0 else norm_fwd(*args)
        ctx.save_for_backward(h if residual is not None else args[0], m2, args[3], mean, rstd)
        ctx.expanded = (weight, bias)
        ctx.info = (x.shape, x.dtype, None if residual is None else residual.dtype, n, eps, rms, offset)
        y = y.view(x.shape)
        return (y, h.view(x.shape)) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        from torch.nn.utils._expanded_weights.expanded_weights_utils import (
            set_grad_sample_if_exists,
            sum_over_all_but_batch_and_last_n,
        )

        xn, m2, w, mean, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype, n, eps, rms, offset = ctx.info
        weight, bias = ctx.expanded
        dy2 = dy.reshape(-1, n)
        dh2 = None if dh is None else dh.reshape(-1, n)
        dx_dtype = xn.dtype if r_dtype is not None else x_dtype
        extra = (offset,) if offset != 0.0 else ()
        dx = norm_bwd(dy2, dh2, xn, m2, w, mean, rstd, rms, False, dx_dtype, *extra)[0].view(shape)
        acc = acc_dtype(xn.dtype, dy.dtype)
        g = dy2.to(acc)
        if m2 is not None:
            g = torch.where(m2, g, torch.zeros((), dtype=acc, device=g.device))
        batch_first = getattr(weight if is_expanded_weight(weight) else bias, "batch_first", True)

        def per_sample(t: Tensor, p: Tensor) -> Tensor:
            t = t.view(shape)
            if not batch_first:
                t = t.movedim(1, 0)
            return sum_over_all_but_batch_and_last_n(t, p.dim()).to(p.dtype)

        if is_expanded_weight(weight):
            xhat = reference.norm_fwd(xn.to(acc), None, m2, None, None, eps, rms)[0]
            set_grad_sample_if_exists(weight, lambda p: per_sample(g * xhat, p))
        if is_expanded_weight(bias):
            set_grad_sample_if_exists(bias, lambda p: per_sample(g, p))
        gx = dx.to(x_dtype)
        gr = dx.to(r_dtype) if r_dtype is not None else None
        return gx, gr, None, None, None, None, None, None, None, None
