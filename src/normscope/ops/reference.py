"""Plain-PyTorch reference implementations: the oracle every backend is tested against.

Two layers live here:

* public, differentiable functions with the same signatures as the public API
  (:func:`layer_norm_ref`, :func:`rms_norm_ref`, :func:`add_layer_norm_ref`, ...). They are written
  with ordinary torch operations, upcast to float32 (float64 stays float64), and get their
  gradients from autograd, so they are an independent check of every backend's backward formula.
* the backend contract :func:`norm_fwd` / :func:`norm_bwd` on 2-D row-major problems. Every backend
  (``cpu``, ``triton``, ``reference``) implements these two functions with exactly these
  semantics; the custom ops in :mod:`normscope.ops.core` call them.

Statistics are two-pass (mean first, then the mean of squared deviations), never
``E[x^2] - E[x]^2``, and always in float32 or wider. Both passes work on values shifted by the
row's first valid element (``s``; 0 for a row with none), so that a row with mean 1e4 and
standard deviation 1e-3 keeps its digits: ``x - s`` is exact for such rows, while a float32 mean
cannot even represent the mean to better than its spacing of about 1e-3 there. The same holds for
backward, which recomputes the centering from ``x`` rather than trusting the rounded saved mean::

    d = sum(m * (x - s)) / count        mean = s + d        c = (x - s) - d
    var = sum(m * c * c) / count        rstd = 1 / sqrt(var + eps)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "acc_dtype",
    "norm_fwd",
    "norm_bwd",
    "layer_norm_ref",
    "rms_norm_ref",
    "add_layer_norm_ref",
    "add_rms_norm_ref",
    "masked_layer_norm_ref",
    "masked_rms_norm_ref",
]

_Shape = Union[int, Sequence[int], torch.Size]
_OptTensor = Optional[torch.Tensor]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtypes``: float64 if any is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --------------------------------------------------------------------------------------------
# Backend contract (2-D)
# --------------------------------------------------------------------------------------------


def _scale(weight: torch.Tensor, acc: torch.dtype, offset: float) -> torch.Tensor:
    """``weight + offset`` formed in ``acc`` (never rounded to the weight's dtype)."""
    w = weight.to(acc)
    return w + offset if offset != 0.0 else w


def _center(x: torch.Tensor, m: Optional[torch.Tensor], denom):
    """Shifted two-pass centering over the last dim: returns ``(s, d, c)`` with ``c = (x - s) - d``.

    ``s`` is each row's first valid element (0 for a row with none); ``d`` is the mean of ``x - s``
    over valid elements. Gradients do not flow through ``s`` (the result does not depend on it).
    """
    if m is None:
        s = x[..., :1].detach()
    else:
        first = m.argmax(-1, keepdim=True)  # index of the first valid element (0 if none)
        s = (x.gather(-1, first) * m.gather(-1, first)).detach()
    xs = x - s
    d = (xs * m if m is not None else xs).sum(-1, keepdim=True) / denom
    return s, d, xs - d



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
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Forward of every normalization op on a 2-D problem.

    Args:
        x: ``(M, N)`` float16 / bfloat16 / float32 / float64.
        residual: ``(M, N)`` or None. When given, ``h = x + residual`` is computed in the
            accumulation dtype and rounded to ``h_dtype``; the statistics are taken over that
            rounded ``h`` (the tensor that backward will read back).
        mask: ``(M, N)`` bool or None. Statistics over the True elements of each row only;
            outputs are 0 where False, whatever ``x`` holds there (NaN and Inf included); a row
            with no True element has mean 0, rstd 0, output 0. Backends need not support
            ``residual`` and ``mask`` together.
        weight, bias: ``(N,)`` of any floating dtype, or None.
        offset: the scale applied is ``weight + offset``, formed in the accumulation dtype (the
            Gemma form ``weight.float() + 1``); ignored without ``weight``.
        eps: added to the variance (the mean square for RMS) before the reciprocal square root.
        rms: RMSNorm (no centering) when True, LayerNorm otherwise.
        h_dtype: dtype of ``h``; defaults to ``torch.promote_types(x.dtype, residual.dtype)``.

    Returns:
        ``(y, h, mean, rstd)``: ``y`` of shape ``(M, N)`` in ``x.dtype``; ``h`` (``None`` without
        residual); ``mean`` of shape ``(M,)`` (``None`` for RMS); ``rstd`` of shape ``(M,)``.
        ``mean`` and ``rstd`` are in the accumulation dtype (float32, float64 for float64 input).
    """
    acc = acc_dtype(x.dtype, residual.dtype if residual is not None else x.dtype)
    h = None
    if residual is not None:
        if h_dtype is None:
            h_dtype = torch.promote_types(x.dtype, residual.dtype)
        h = (x.to(acc) + residual.to(acc)).to(h_dtype)
        xn = h.to(acc)
    else:
        xn = x.to(acc)
    n = xn.shape[-1]
    if mask is not None:
        m = mask.to(acc)
        count = m.sum(-1, keepdim=True)
        denom = count.clamp_min(1.0)
        # padded positions are replaced, not multiplied by 0 (NaN * 0 is NaN)
        xn = torch.where(mask, xn, torch.zeros((), dtype=acc, device=xn.device))
        xm = xn
    else:
        m = None
        denom = float(n)
        xm = xn
    if rms:
        mean = None
        var = (xm * xm).sum(-1, keepdim=True) / denom
        centered = xn
    else:
        shift, d, centered = _center(xn, m, denom)
        cm = centered * m if m is not None else centered
        var = (cm * cm).sum(-1, keepdim=True) / denom
        mean = (shift + d).squeeze(-1)
    rstd = torch.rsqrt(var + eps)
    if m is not None:
        rstd = torch.where(count > 0, rstd, torch.zeros_like(rstd))
    y = centered * rstd
    if weight is not None:
        y = y * _scale(weight, acc, offset)
    if bias is not None:
        y = y + bias.to(acc)
    if m is not None:
        y = torch.where(mask, y, torch.zeros((), dtype=acc, device=y.device))
    if mean is not None and m is not None:
        mean = mean * (count.squeeze(-1) > 0)
    return y.to(x.dtype), h, mean, rstd.squeeze(-1)


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
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`norm_fwd`.

    Args:
        dy: ``(M, N)`` gradient of ``y``.
        dh: ``(M, N)`` gradient flowing into ``h`` from its other consumers (add variants), or None;
            it is added to the result.
        xn: the normalized input saved by forward (``h`` for the add variants, else ``x``).
        mask, weight: as in forward.
        mean, rstd: the statistics returned by forward (``mean`` None for RMS). Backends recompute
            the centering from ``xn`` (see the module docstring) and may ignore ``mean``.
        has_bias: whether forward had a bias (``db`` is returned only then).
        dx_dtype: dtype of the returned input gradient.
        offset: as in forward (``dw`` is the same with or without it: d(w + offset)/dw = 1).

    Returns:
        ``(dx, dw, db)``: ``dx`` ``(M, N)`` in ``dx_dtype``; ``dw`` and ``db`` of shape ``(N,)`` in
        float32 (float64 for float64 inputs), reduced over rows from accumulation-dtype values, or
        None when there is no weight / bias.

    With ``xhat = (xn - mean) * rstd`` (``xn * rstd`` for RMS) and ``g = dy * weight``, both zero
    where the mask is False, and ``<.>`` the mean over the valid elements of a row::

        LayerNorm: dx = rstd * (g - <g> - xhat * <g * xhat>)
        RMSNorm:   dx = rstd * (g - xhat * <g * xhat>)
    """
    acc = acc_dtype(xn.dtype, dy.dtype)
    x = xn.to(acc)
    g0 = dy.to(acc)
    n = x.shape[-1]
    r = rstd.to(acc).unsqueeze(-1)
    if mask is not None:
        m = mask.to(acc)
        denom = m.sum(-1, keepdim=True).clamp_min(1.0)
        zero = torch.zeros((), dtype=acc, device=x.device)
        x = torch.where(mask, x, zero)
        g0 = torch.where(mask, g0, zero)
    else:
        m = None
        denom = float(n)
    # The centering is recomputed from x exactly as forward did it (see the module docstring);
    # ``mean`` rounded to float32 is too coarse for rows with a large mean and a tiny variance.
    xhat = x * r if rms else _center(x, m, denom)[2] * r
    if m is not None:
        xhat = xhat * m
    g = g0 * _scale(weight, acc, offset) if weight is not None else g0
    c2 = (g * xhat).sum(-1, keepdim=True) / denom
    if rms:
        dx = r * (g - xhat * c2)
    else:
        c1 = g.sum(-1, keepdim=True) / denom
        dx = r * (g - c1 - xhat * c2)
    if m is not None:
        dx = dx * m
    if dh is not None:
        dx = dx + dh.to(acc)
    dw = (g0 * xhat).sum(0) if weight is not None else None
    db = g0.sum(0) if has_bias else None
    return dx.to(dx_dtype), dw, db


# --------------------------------------------------------------------------------------------
# Public differentiable references (autograd through plain torch ops)
# --------------------------------------------------------------------------------------------


def _dims(x: torch.Tensor, normalized_shape: _Shape) -> Tuple[int, ...]:
    k = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    return tuple(range(x.dim() - k, x.dim()))


def _stats_norm(x, dims, eps, rms, m=None):
    acc = acc_dtype(x.dtype)
    lead = x.shape[: x.dim() - len(dims)]
    n = math.prod(x.shape[x.dim() - len(dims):])
    xf = x.to(acc).reshape(*lead, n)
    if m is None:
        if rms:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        else:
            c = _center(xf, None, xf.shape[-1])[2]
            y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
        return y.reshape(x.shape)
    mf = m.to(acc).reshape(*lead, n)
    # padded positions are replaced, not multiplied by 0 (NaN * 0 is NaN)
    xf = torch.where(mf > 0, xf, torch.zeros((), dtype=acc, device=xf.device))
    count = mf.sum(-1, keepdim=True)
    denom = count.clamp_min(1.0)
    c = xf if rms else _center(xf, mf, denom)[2]
    var = (c * c * mf).sum(-1, keepdim=True) / denom
    # where() keeps NaN/inf of empty rows out of both the value and its gradient
    safe_var = torch.where(count > 0, var, torch.ones_like(var))
    rstd = torch.where(count > 0, torch.rsqrt(safe_var + eps), torch.zeros_like(var))
    return (c * rstd * mf).reshape(x.shape)


def _affine(y, weight, bias, acc):
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y


def layer_norm_ref(
    x: torch.Tensor, normalized_shape: _Shape, weight: _OptTensor = None, bias: _OptTensor = None, eps: float = 1e-5
) -> torch.Tensor:
    """Reference LayerNorm: float32 (or float64) two-pass statistics, output in ``x.dtype``."""
    y = _stats_norm(x, _dims(x, normalized_shape), eps, rms=False)
    return _affine(y, weight, bias, y.dtype).to(x.dtype)


def rms_norm_ref(
    x: torch.Tensor,
    normalized_shape: _Shape,
    weight: _OptTensor = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Reference RMSNorm; ``eps=None`` means the epsilon of the accumulation dtype, as in torch:
    ``torch.finfo(torch.float32).eps`` for 16- and 32-bit input, float64's for float64."""
    if eps is None:
        eps = torch.finfo(acc_dtype(x.dtype)).eps
    y = _stats_norm(x, _dims(x, normalized_shape), eps, rms=True)
    return _affine(y, weight, None, y.dtype).to(x.dtype)


def _add(x, residual):
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    acc = acc_dtype(x.dtype, residual.dtype)
    return (x.to(acc) + residual.to(acc)).to(h_dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: _Shape,
    weight: _OptTensor = None,
    bias: _OptTensor = None,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``h = x + residual; y = layer_norm(h)``; returns ``(y, h)``, ``y`` in x's dtype."""
    h = _add(x, residual)
    return layer_norm_ref(h, normalized_shape, weight, bias, eps).to(x.dtype), h


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: _Shape,
    weight: _OptTensor = None,
    eps: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``h = x + residual; y = rms_norm(h)``; returns ``(y, h)``, ``y`` in x's dtype."""
    h = _add(x, residual)
    if eps is None:
        eps = torch.finfo(acc_dtype(h.dtype)).eps
    return rms_norm_ref(h, normalized_shape, weight, eps).to(x.dtype), h


def masked_layer_norm_ref(
    x: torch.Tensor,
    mask: torch.Tensor,
    normalized_shape: _Shape,
    weight: _OptTensor = None,
    bias: _OptTensor = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Reference masked LayerNorm: statistics over ``mask``-True elements; 0 where False."""
    m = mask.expand(x.shape)
    y = _stats_norm(x, _dims(x, normalized_shape), eps, rms=False, m=m)
    y = _affine(y, weight, bias, y.dtype) * m.to(y.dtype)
    return y.to(x.dtype)


def masked_rms_norm_ref(
    x: torch.Tensor,
    mask: torch.Tensor,
    normalized_shape: _Shape,
    weight: _OptTensor = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Reference masked RMSNorm: mean square over ``mask``-True elements; 0 where False."""
    if eps is None:
        eps = torch.finfo(acc_dtype(x.dtype)).eps
    m = mask.expand(x.shape)
    y = _stats_norm(x, _dims(x, normalized_shape), eps, rms=True, m=m)
    return (_affine(y, weight, None, y.dtype) * m.to(y.dtype)).to(x.dtype)
