"""Public functional API: LayerNorm, RMSNorm, fused residual-add and masked variants.

Every function validates its arguments, raising the classes of :mod:`normscope.errors` (each a
subclass of both the ``TypeError`` / ``ValueError`` normscope raises and the ``RuntimeError`` /
``NotImplementedError`` torch raises for the same misuse) with torch's wording where torch has one,
else in PyTorch's "Expected X, but got Y" form. It then flattens the input to ``(M, N)`` with ``N`` the product of
``normalized_shape``, and calls the ``normscope::norm_fwd`` custom op, which picks a backend per
device (see :mod:`normscope.ops.dispatch`). Statistics are float32 (float64 for float64 input),
two-pass, and saved in float32 for backward; outputs take the dtype of ``x``.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Literal, Optional, Sequence, Tuple, Union, overload

import torch
from torch import Tensor

import normscope.ops.core  # registers the normscope:: custom ops
from normscope.errors import DeviceError, DtypeError, ShapeError
from normscope.ops import _sharding

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "masked_layer_norm",
    "masked_rms_norm",
]

Shape = Union[int, Sequence[int], torch.Size]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch's names of dtypes in "... not implemented for 'Long'" messages
_TORCH_DTYPE_NAMES = {
    torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
    torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _quiet_under_trace(check):
    """Run ``check`` without ``TracerWarning``s under ``torch.jit.trace``: its shape comparisons
    are decided for the traced shapes, which a traced module keeps (only the batch dims vary)."""

    @functools.wraps(check)
    def wrapper(*args):
        if not torch.jit.is_tracing():
            return check(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check(*args)

    return wrapper


def _dtype_error(name: str, dtype: torch.dtype, allowed: str = "float16, bfloat16, float32 or float64") -> DtypeError:
    torch_name = _TORCH_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    return DtypeError(f"Expected {name} of dtype {allowed}, but got {dtype} (not implemented for '{torch_name}')")


def _normalized_shape(normalized_shape: Shape) -> Tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        shape = (int(normalized_shape),)
    else:
        try:
            if isinstance(normalized_shape, (str, bytes)):
                raise TypeError
            shape = tuple(int(s) for s in normalized_shape)
        except (TypeError, ValueError):
            raise TypeError(
                "Expected normalized_shape to be an int or a sequence of ints, but got "
                f"{type(normalized_shape).__name__}"
            ) from None
    if len(shape) == 0:
        raise ShapeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            "element, but got normalized_shape = []"
        )
    # a negative size never matches the input's, which _check_input reports in torch's words
    return shape


def _device_error(name: str, t: Tensor, x: Tensor) -> DeviceError:
    return DeviceError(
        f"Expected all tensors to be on the same device, but got {name} on {t.device} and input on {x.device}"
    )


@_quiet_under_trace
def _check_input(x: Tensor, shape: Tuple[int, ...], name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise _dtype_error(name, x.dtype)
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        dims = ", ".join(str(s) for s in shape)
        # torch's message, word for word (no space before the size)
        raise ShapeError(
            f"Given normalized_shape={list(shape)}, expected {name} with shape [*, {dims}], "
            f"but got {name} of size{list(x.shape)}"
        )


@_quiet_under_trace
def _check_param(p: Optional[Tensor], name: str, shape: Tuple[int, ...], x: Tensor, heads: bool = False) -> None:
    """``heads``: also accept a per-head parameter of shape ``(H, *normalized_shape)`` for an input
    ``(*, H, *normalized_shape)``."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor or None, but got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES:
        raise _dtype_error(name, p.dtype)
    k = len(shape)
    if heads and len(p.shape) == k + 1 and k > 0 and tuple(p.shape[1:]) == shape:
        if x.dim() < k + 1 or x.shape[x.dim() - k - 1] != p.shape[0]:
            raise ShapeError(
                f"Expected input of shape [*, {p.shape[0]}, {', '.join(map(str, shape))}] for a per-head {name} of "
                f"shape {list(p.shape)}, but got input of size {list(x.shape)}"
            )
        if p.device != x.device:
            raise _device_error(name, p, x)
        return
    if tuple(p.shape) != shape:
        raise ShapeError(
            f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
            f"{list(p.shape)} and normalized_shape = {list(shape)}"
        )
    if p.device != x.device:
        raise _device_error(name, p, x)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"Expected eps to be a real number, but got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Expected eps to be a finite number >= 0, but got {eps}")
    return eps


def _rms_eps(eps, dtype: torch.dtype) -> float:
    # torch's default: the epsilon of the accumulation ("opmath") dtype, float32's for 16-bit input
    return torch.finfo(normscope.ops.core.acc_dtype(dtype)).eps if eps is None else _check_eps(eps)


@_quiet_under_trace
def _check_residual(residual: Tensor, x: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"Expected residual to be a torch.Tensor, but got {type(residual).__name__}")
    if residual.dtype not in _FLOAT_DTYPES:
        raise _dtype_error("residual", residual.dtype)
    if residual.shape != x.shape:
        raise ShapeError(
            f"Expected residual of the input's size {list(x.shape)}, but got {list(residual.shape)}"
        )
    if residual.device != x.device:
        raise _device_error("residual", residual, x)


@_quiet_under_trace
def _check_mask(mask: Tensor, x: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"Expected mask to be a torch.Tensor, but got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise _dtype_error("mask", mask.dtype, "torch.bool")
    try:
        ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError(
            f"Expected mask broadcastable to the input's size {list(x.shape)}, but got mask of "
            f"size {list(mask.shape)}"
        )
    if mask.device != x.device:
        raise _device_error("mask", mask, x)


def _check_offset(offset) -> float:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise TypeError(f"Expected offset to be a real number, but got {type(offset).__name__}")
    offset = float(offset)
    if offset != offset or abs(offset) == math.inf:  # (math.isfinite breaks torch.compile's tracing)
        raise ValueError(f"Expected offset to be a finite number, but got {offset}")
    return offset


def _layout(x: Tensor) -> Optional[torch.memory_format]:
    """The channels-last format ``x`` is laid out in (and not also contiguous), else None."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _flat(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1, n)


def _vec(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(n)


def _transformed(x, residual, mask, weight, bias) -> bool:
    """Whether a call needs :func:`_run_transformed`: forward AD, torch.func, ExpandedWeights."""
    if torch.compiler.is_compiling():
        return False
    return (
        normscope.ops.core.use_composite()
        or normscope.ops.core.is_expanded_weight(weight)
        or normscope.ops.core.is_expanded_weight(bias)
    )


def _run_transformed(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0):
    """:func:`_run` under forward-mode AD and ``torch.func`` transforms, with ExpandedWeight
    parameters, and for an empty ``normalized_shape``: the same computation in differentiable
    torch ops (see :mod:`normscope.ops.core`)."""
    core = normscope.ops.core
    n = math.prod(shape)
    m = math.prod(x.shape[: x.dim() - len(shape)])
    h_dtype = None if residual is None else torch.promote_types(x.dtype, residual.dtype)
    offset = offset if weight is not None else 0.0
    if n == 0:
        # Nothing to normalize: empty outputs, as torch's, still connected to every input.
        acc = core.acc_dtype(x.dtype, h_dtype or x.dtype)
        h = None if residual is None else (x.to(acc) + residual.to(acc)).to(h_dtype)
        y = (x if h is None else h).to(acc)
        y = y * (weight.to(acc) + offset) if weight is not None else y
        y = y + bias.to(acc) if bias is not None else y
        y = y.to(x.dtype)
    elif core.is_expanded_weight(weight) or core.is_expanded_weight(bias):
        out = core.ExpandedWeightsNorm.apply(x, residual, mask, weight, bias, n, eps, rms, h_dtype, offset)
        y, h = out if residual is not None else (out, None)
    else:
        m2 = None if mask is None else mask.expand(x.shape).reshape(m, n)
        r2 = None if residual is None else residual.reshape(m, n)
        y, h = core.norm_fwd_composite(
            x.reshape(m, n), r2, m2, _vec(weight, n), _vec(bias, n), eps, rms, h_dtype, offset
        )
        y = y.reshape(x.shape)
        h = None if h is None else h.reshape(x.shape)
    fmt = _layout(x) if rms else None
    if fmt is not None:
        y = y.contiguous(memory_format=fmt)
        h = h.contiguous(memory_format=fmt) if h is not None else None
    return (y, h) if residual is not None else y


def _stats_of(x, residual, mask, shape, eps, rms) -> Tuple[Optional[Tensor], Tensor]:
    """(mean or None for RMSNorm, rstd) of each normalized row, shaped like the leading dims of ``x``, in the
    accumulation dtype, detached: the statistics a call normalizes with (torch ops; used where the call itself
    ran through differentiable torch ops or the per-head path)."""
    n = math.prod(shape)
    lead = x.shape[: x.dim() - len(shape)]
    with torch.no_grad():
        h_dtype = None if residual is None else torch.promote_types(x.dtype, residual.dtype)
        acc = normscope.ops.core.acc_dtype(x.dtype, h_dtype or x.dtype)
        v = x.reshape(-1, n).to(acc)
        if residual is not None:
            v = (v + residual.reshape(-1, n).to(acc)).to(h_dtype).to(acc)
        m = None if mask is None else mask.expand(x.shape).reshape(-1, n)
        _, _, mean, rstd = normscope.ops.reference.norm_fwd(v, None, m, None, None, eps, rms, None)
    return (None if mean is None else mean.reshape(lead)), rstd.reshape(lead)


def _per_head(weight: Optional[Tensor], bias: Optional[Tensor], shape: Tuple[int, ...]) -> bool:
    # (len(shape), not dim(): ExpandedWeights parameters handle no dim())
    k = len(shape)
    return (weight is not None and len(weight.shape) > k) or (bias is not None and len(bias.shape) > k)


def _run_stats(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0):
    """``_run`` that also returns the statistics: ``(y, h, mean or None, rstd)``, mean / rstd detached, shaped
    like the leading dims of ``x``, in the accumulation dtype."""
    n = math.prod(shape)
    lead = x.shape[: x.dim() - len(shape)]
    if _per_head(weight, bias, shape):
        out, stats = _run_per_head(x, residual, mask, weight, bias, shape, eps, rms, offset, with_stats=True)
        y, h = out if residual is not None else (out, None)
        return (y, h, *stats)
    if type(x) is Tensor and n > 0 and not _transformed(x, residual, mask, weight, bias):
        y, h, mean, rstd = _run_op(x, residual, mask, weight, bias, shape, eps, rms, offset)
        return y, h, (None if rms else mean.detach().reshape(lead)), rstd.detach().reshape(lead)
    out = _run(x, residual, mask, weight, bias, shape, eps, rms, offset)
    y, h = out if residual is not None else (out, None)
    mean, rstd = _stats_of(x, residual, mask, shape, eps, rms)
    return y, h, mean, rstd


def _run_per_head(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0, with_stats=False):
    """``weight`` / ``bias`` of shape ``(H, *normalized_shape)`` for an input ``(*, H, *normalized_shape)``: each
    row is normalized over ``normalized_shape`` only and scaled by its head's parameters (per-head QK-norm).
    The statistics by the norm op in the accumulation dtype, the scale and shift applied in that dtype, then one
    rounding to ``x``'s dtype (the numerics of the fused case; not fused: two passes)."""
    core = normscope.ops.core
    h_dtype = None if residual is None else torch.promote_types(x.dtype, residual.dtype)
    acc = core.acc_dtype(x.dtype, h_dtype or x.dtype)
    h = None if residual is None else (x.to(acc) + residual.to(acc)).to(h_dtype)  # what is normalized, as fused
    xa = (x if h is None else h).to(acc)
    ya, _, mean, rstd = _run_stats(xa, None, mask, None, None, shape, eps, rms)
    if weight is not None:
        ya = ya * (weight.to(acc) + offset)
    if bias is not None:
        ya = ya + bias.to(acc)
    y = ya.to(x.dtype)
    out = (y, h) if residual is not None else y
    return (out, (mean, rstd)) if with_stats else out


def _run(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0):
    if _per_head(weight, bias, shape):
        return _run_per_head(x, residual, mask, weight, bias, shape, eps, rms, offset)
    if type(x) is not Tensor and _sharding.is_dtensor(x):
        # DTensor: the ops on each rank's local rows (see normscope.ops._sharding).
        return _sharding.run(
            lambda *a: _run(*a, shape, eps, rms, offset), x, residual, mask, weight, bias, len(shape)
        )
    n = math.prod(shape)
    if n == 0 or _transformed(x, residual, mask, weight, bias):
        return _run_transformed(x, residual, mask, weight, bias, shape, eps, rms, offset)
    y, h, _, _ = _run_op(x, residual, mask, weight, bias, shape, eps, rms, offset)
    return (y, h) if residual is not None else y


def _run_op(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0):
    """``normscope::norm_fwd`` on the 2-D view: ``(y, h or None, mean, rstd)`` with ``y`` / ``h`` in ``x``'s shape."""
    n = math.prod(shape)
    m2 = None if mask is None else mask.expand(x.shape).reshape(-1, n)
    h_dtype = None if residual is None else torch.promote_types(x.dtype, residual.dtype)
    args = (x.reshape(-1, n), _flat(residual, n), m2, _vec(weight, n), _vec(bias, n), eps, rms, h_dtype)
    if offset != 0.0 and weight is not None:
        y, h, mean, rstd = torch.ops.normscope.norm_fwd(*args, offset)
    else:
        y, h, mean, rstd = torch.ops.normscope.norm_fwd(*args)
    y = y.view(x.shape)
    h = h.view(x.shape) if residual is not None else None
    # RMSNorm keeps a channels-last input's layout, as torch's (elementwise) RMSNorm does;
    # LayerNorm returns a contiguous output, as torch's does.
    fmt = _layout(x) if rms else None
    if fmt is not None:
        y = y.contiguous(memory_format=fmt)
        h = h.contiguous(memory_format=fmt) if h is not None else None
    return y, h, mean, rstd


@overload
def layer_norm(x: Tensor, normalized_shape: Shape, weight: Optional[Tensor] = ..., bias: Optional[Tensor] = ...,
               eps: float = ..., *, offset: float = ..., return_stats: Literal[False] = ...) -> Tensor: ...


@overload
def layer_norm(x: Tensor, normalized_shape: Shape, weight: Optional[Tensor] = ..., bias: Optional[Tensor] = ...,
               eps: float = ..., *, offset: float = ..., return_stats: Literal[True]) -> Tuple[Tensor, Tensor, Tensor]:
    ...


def layer_norm(
    x: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    offset: float = 0.0,
    return_stats: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    r"""Layer normalization over the trailing ``normalized_shape`` dims.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance are taken over the last ``len(normalized_shape)`` dims of each
    sample, two-pass, in float32 (float64 for float64 input). Same semantics as
    :func:`torch.nn.functional.layer_norm`, with ``weight`` / ``bias`` allowed in a wider dtype
    than ``x`` (mixed precision: float32 parameters with bfloat16 activations).

    Args:
        x: input of shape ``(*, *normalized_shape)``, float16 / bfloat16 / float32 / float64.
        normalized_shape: int or sequence of ints, the trailing dims to normalize over.
        weight: :math:`\gamma` of shape ``normalized_shape``, or per head, ``(H, *normalized_shape)`` for an
            input ``(*, H, *normalized_shape)`` (each head's rows normalized over ``normalized_shape`` only and
            scaled by that head's row of ``weight``: per-head QK-norm, without a Python loop), or None.
            Default: None.
        bias: :math:`\beta`, the same shapes as ``weight``, or None. Default: None.
        eps: added to the variance. Default: ``1e-5``.
        offset: keyword-only; the scale applied is ``weight + offset``, formed in float32 (float64
            for float64 input) inside the kernels, never rounded to the weight's dtype; the gradient
            w.r.t. ``weight`` is unchanged. ``offset=1`` is Gemma's ``x * (1 + weight)``. Ignored
            without ``weight``. Default: 0.
        return_stats: keyword-only; also return the statistics each row was normalized with: ``(y, mean,
            rstd)``, ``mean`` and ``rstd`` of shape ``x.shape[:-len(normalized_shape)]`` in float32 (float64
            for float64 input), detached. Default: False.

    Shape:
        Output has the shape and dtype of ``x``, contiguous.

    Per-head parameters are applied after the norm op, in float32, with one rounding to ``x``'s dtype (the
    numerics of a fused kernel, in two passes).

    Example::

        >>> x = torch.randn(2, 5, 8)
        >>> y = normscope.layer_norm(x, 8)
        >>> torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_param(weight, "weight", shape, x, True)
    _check_param(bias, "bias", shape, x, True)
    eps, offset = _check_eps(eps), _check_offset(offset)
    if return_stats:
        y, _, mean, rstd = _run_stats(x, None, None, weight, bias, shape, eps, False, offset)
        return y, mean, rstd
    return _run(x, None, None, weight, bias, shape, eps, False, offset)


@overload
def rms_norm(x: Tensor, normalized_shape: Shape, weight: Optional[Tensor] = ..., eps: Optional[float] = ..., *,
             bias: Optional[Tensor] = ..., offset: float = ..., return_stats: Literal[False] = ...) -> Tensor: ...


@overload
def rms_norm(x: Tensor, normalized_shape: Shape, weight: Optional[Tensor] = ..., eps: Optional[float] = ..., *,
             bias: Optional[Tensor] = ..., offset: float = ..., return_stats: Literal[True]) -> Tuple[Tensor, Tensor]:
    ...


def rms_norm(
    x: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    bias: Optional[Tensor] = None,
    offset: float = 0.0,
    return_stats: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    Args:
        x: input of shape ``(*, *normalized_shape)``.
        normalized_shape: int or sequence of ints.
        weight: :math:`\gamma` of shape ``normalized_shape``, or per head ``(H, *normalized_shape)`` as in
            :func:`layer_norm` (quack's ``rmsnorm_qk``), or None. Default: None.
        eps: added to the mean square. Default: None, meaning the epsilon of the accumulation
            dtype, ``torch.finfo(torch.float32).eps`` (float64's for float64 input), which is what
            :func:`torch.nn.functional.rms_norm` adds (also for float16 / bfloat16 input).
        bias: keyword-only; a shift added after the scale (``y = x * rstd * gamma + beta``, as quack's and
            some models' RMSNorm with bias), the shapes of ``weight``, or None. Default: None.
        offset: keyword-only, as in :func:`layer_norm`: ``weight + offset`` formed in float32
            (Gemma: ``offset=1``). Default: 0.
        return_stats: keyword-only; also return ``rstd`` (``(y, rstd)``; shape
            ``x.shape[:-len(normalized_shape)]``, float32, detached). Default: False.

    Shape:
        Output has the shape and dtype of ``x``, in ``x``'s memory format when that is
        ``torch.channels_last`` (4-D) or ``torch.channels_last_3d`` (5-D), as
        :func:`torch.nn.functional.rms_norm` keeps it; contiguous otherwise.

    Example::

        >>> x = torch.randn(4, 16)
        >>> torch.testing.assert_close(normscope.rms_norm(x, 16, eps=1e-6),
        ...                            torch.nn.functional.rms_norm(x, (16,), eps=1e-6))
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    if isinstance(weight, Tensor) and not (weight.dtype.is_floating_point or weight.dtype.is_complex):
        # an integer or bool weight: torch multiplies by it in float32 (float64 for float64 input)
        weight = weight.to(normscope.ops.core.acc_dtype(x.dtype))
    _check_param(weight, "weight", shape, x, True)
    _check_param(bias, "bias", shape, x, True)
    eps_, offset = _rms_eps(eps, x.dtype), _check_offset(offset)
    if return_stats:
        y, _, _, rstd = _run_stats(x, None, None, weight, bias, shape, eps_, True, offset)
        return y, rstd
    return _run(x, None, None, weight, bias, shape, eps_, True, offset)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    offset: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    r"""Fused residual add and LayerNorm: ``h = x + residual; y = layer_norm(h)`` in one pass.

    The pre-LN residual pattern. ``x`` and ``residual`` may differ in dtype (a bfloat16 sublayer
    output added into a float32 residual stream): ``h`` takes the promoted dtype and is what the
    statistics are computed from; ``y`` takes the dtype of ``x``.

    Returns:
        ``(y, h)``, both of the shape of ``x``.

    Example::

        >>> x, r = torch.randn(3, 8), torch.randn(3, 8)
        >>> y, h = normscope.add_layer_norm(x, r, 8)
        >>> torch.testing.assert_close(h, x + r)
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_residual(residual, x)
    _check_param(weight, "weight", shape, x, True)
    _check_param(bias, "bias", shape, x, True)
    return _run(x, residual, None, weight, bias, shape, _check_eps(eps), False, _check_offset(offset))


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    bias: Optional[Tensor] = None,
    offset: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    r"""Fused residual add and RMSNorm: ``h = x + residual; y = rms_norm(h)`` in one pass.

    ``eps=None`` means the epsilon of ``h``'s accumulation dtype (``h`` is the tensor normalized), as
    in :func:`rms_norm`. Dtype rules as in :func:`add_layer_norm`; ``bias`` (keyword-only) and per-head
    parameters as in :func:`rms_norm`.

    Returns:
        ``(y, h)``, both of the shape of ``x``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_residual(residual, x)
    _check_param(weight, "weight", shape, x, True)
    _check_param(bias, "bias", shape, x, True)
    eps = _rms_eps(eps, torch.promote_types(x.dtype, residual.dtype))
    return _run(x, residual, None, weight, bias, shape, eps, True, _check_offset(offset))


def masked_layer_norm(
    x: Tensor,
    mask: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    offset: float = 0.0,
) -> Tensor:
    r"""LayerNorm whose statistics cover only the elements where ``mask`` is True.

    For each sample, mean and biased variance are taken over the elements of the normalized dims
    where ``mask`` is True (for example LayerNorm over ``(time, channels)`` with padded time steps
    masked out); the output is 0 where ``mask`` is False, and a sample with no valid element gives
    0 everywhere, never NaN. Gradients flow to ``x``, ``weight`` and ``bias`` from valid elements.

    Args:
        x: input of shape ``(*, *normalized_shape)``.
        mask: bool tensor broadcastable to ``x`` (e.g. ``(B, T, 1)`` for ``x`` of ``(B, T, C)``).
        normalized_shape, weight, bias, eps: as in :func:`layer_norm`.

    Example::

        >>> x = torch.randn(2, 4, 8)
        >>> mask = torch.tensor([[True, True, True, False], [True, False, False, False]])[..., None]
        >>> y = normscope.masked_layer_norm(x, mask, (4, 8))
        >>> bool((y[0, 3] == 0).all())
        True
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_mask(mask, x)
    _check_param(weight, "weight", shape, x)
    _check_param(bias, "bias", shape, x)
    return _run(x, None, mask, weight, bias, shape, _check_eps(eps), False, _check_offset(offset))


def masked_rms_norm(
    x: Tensor,
    mask: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    bias: Optional[Tensor] = None,
    offset: float = 0.0,
) -> Tensor:
    r"""RMSNorm whose mean square covers only the elements where ``mask`` is True.

    Output is 0 where ``mask`` is False; a sample with no valid element gives 0. ``eps=None``
    means float32's epsilon (float64's for float64 input), as in :func:`rms_norm`. Arguments as in
    :func:`masked_layer_norm`; ``bias`` (keyword-only) as in :func:`rms_norm`.
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_mask(mask, x)
    _check_param(weight, "weight", shape, x)
    _check_param(bias, "bias", shape, x)
    return _run(x, None, mask, weight, bias, shape, _rms_eps(eps, x.dtype), True, _check_offset(offset))
