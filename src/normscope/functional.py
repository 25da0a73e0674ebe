"""Public functional API: LayerNorm, RMSNorm, fused residual-add and masked variants.

Every function validates its arguments (raising ``TypeError`` / ``ValueError`` in PyTorch's
"Expected X, but got Y" form), flattens the input to ``(M, N)`` with ``N`` the product of
``normalized_shape``, and calls the ``normscope::norm_fwd`` custom op, which picks a backend per
device (see :mod:`normscope.ops.dispatch`). Statistics are float32 (float64 for float64 input),
two-pass, and saved in float32 for backward; outputs take the dtype of ``x``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import normscope.ops.core  # registers the normscope:: custom ops

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
    if len(shape) == 0 or any(s < 0 for s in shape):
        raise ValueError(
            f"Expected normalized_shape to be non-empty with non-negative sizes, but got {list(shape)}"
        )
    return shape


def _check_input(x: Tensor, shape: Tuple[int, ...], name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"Expected {name} of dtype float16, bfloat16, float32 or float64, but got {x.dtype}"
        )
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        dims = ", ".join(str(s) for s in shape)
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected {name} with shape [*, {dims}], "
            f"but got {name} of size {list(x.shape)}"
        )


def _check_param(p: Optional[Tensor], name: str, shape: Tuple[int, ...], x: Tensor) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor or None, but got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"Expected {name} of dtype float16, bfloat16, float32 or float64, but got {p.dtype}"
        )
    if tuple(p.shape) != shape:
        raise ValueError(f"Expected {name} of shape {list(shape)}, but got {list(p.shape)}")
    if p.device != x.device:
        raise ValueError(
            f"Expected {name} on the input's device {x.device}, but got {name} on {p.device}"
        )


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"Expected eps to be a real number, but got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Expected eps to be a finite number >= 0, but got {eps}")
    return eps


def _rms_eps(eps, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if eps is None else _check_eps(eps)


def _check_residual(residual: Tensor, x: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"Expected residual to be a torch.Tensor, but got {type(residual).__name__}")
    if residual.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "Expected residual of dtype float16, bfloat16, float32 or float64, but got "
            f"{residual.dtype}"
        )
    if residual.shape != x.shape:
        raise ValueError(
            f"Expected residual of the input's size {list(x.shape)}, but got {list(residual.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(
            f"Expected residual on the input's device {x.device}, but got residual on {residual.device}"
        )


def _check_mask(mask: Tensor, x: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"Expected mask to be a torch.Tensor, but got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"Expected mask of dtype torch.bool, but got {mask.dtype}")
    try:
        ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"Expected mask broadcastable to the input's size {list(x.shape)}, but got mask of "
            f"size {list(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"Expected mask on the input's device {x.device}, but got mask on {mask.device}")


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


def _run(x, residual, mask, weight, bias, shape, eps, rms, offset=0.0):
    n = math.prod(shape)
    if n == 0 or _transformed(x, residual, mask, weight, bias):
        return _run_transformed(x, residual, mask, weight, bias, shape, eps, rms, offset)
    m2 = None if mask is None else mask.expand(x.shape).reshape(-1, n)
    h_dtype = None if residual is None else torch.promote_types(x.dtype, residual.dtype)
    args = (x.reshape(-1, n), _flat(residual, n), m2, _vec(weight, n), _vec(bias, n), eps, rms, h_dtype)
    if offset != 0.0 and weight is not None:
        y, h, _, _ = torch.ops.normscope.norm_fwd(*args, offset)
    else:
        y, h, _, _ = torch.ops.normscope.norm_fwd(*args)
    y = y.view(x.shape)
    h = h.view(x.shape) if residual is not None else None
    # RMSNorm keeps a channels-last input's layout, as torch's (elementwise) RMSNorm does;
    # LayerNorm returns a contiguous output, as torch's does.
    fmt = _layout(x) if rms else None
    if fmt is not None:
        y = y.contiguous(memory_format=fmt)
        h = h.contiguous(memory_format=fmt) if h is not None else None
    return (y, h) if residual is not None else y


def layer_norm(
    x: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    offset: float = 0.0,
) -> Tensor:
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
        weight: :math:`\gamma` of shape ``normalized_shape``, or None. Default: None.
        bias: :math:`\beta` of shape ``normalized_shape``, or None. Default: None.
        eps: added to the variance. Default: ``1e-5``.
        offset: keyword-only; the scale applied is ``weight + offset``, formed in float32 (float64
            for float64 input) inside the kernels, never rounded to the weight's dtype; the gradient
            w.r.t. ``weight`` is unchanged. ``offset=1`` is Gemma's ``x * (1 + weight)``. Ignored
            without ``weight``. Default: 0.

    Shape:
        Output has the shape and dtype of ``x``, contiguous.

    Example::

        >>> x = torch.randn(2, 5, 8)
        >>> y = normscope.layer_norm(x, 8)
        >>> torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_param(weight, "weight", shape, x)
    _check_param(bias, "bias", shape, x)
    return _run(x, None, None, weight, bias, shape, _check_eps(eps), False, _check_offset(offset))


def rms_norm(
    x: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
) -> Tensor:
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    Args:
        x: input of shape ``(*, *normalized_shape)``.
        normalized_shape: int or sequence of ints.
        weight: :math:`\gamma` of shape ``normalized_shape``, or None. Default: None.
        eps: added to the mean square. Default: None, meaning ``torch.finfo(x.dtype).eps`` as in
            :func:`torch.nn.functional.rms_norm`.
        offset: keyword-only, as in :func:`layer_norm`: ``weight + offset`` formed in float32
            (Gemma: ``offset=1``). Default: 0.

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
    _check_param(weight, "weight", shape, x)
    return _run(x, None, None, weight, None, shape, _rms_eps(eps, x.dtype), True, _check_offset(offset))


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
    _check_param(weight, "weight", shape, x)
    _check_param(bias, "bias", shape, x)
    return _run(x, residual, None, weight, bias, shape, _check_eps(eps), False, _check_offset(offset))


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    r"""Fused residual add and RMSNorm: ``h = x + residual; y = rms_norm(h)`` in one pass.

    ``eps=None`` means ``torch.finfo(h.dtype).eps`` (``h`` is the tensor normalized). Dtype rules as
    in :func:`add_layer_norm`.

    Returns:
        ``(y, h)``, both of the shape of ``x``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_residual(residual, x)
    _check_param(weight, "weight", shape, x)
    eps = _rms_eps(eps, torch.promote_types(x.dtype, residual.dtype))
    return _run(x, residual, None, weight, None, shape, eps, True, _check_offset(offset))


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
    offset: float = 0.0,
) -> Tensor:
    r"""RMSNorm whose mean square covers only the elements where ``mask`` is True.

    Output is 0 where ``mask`` is False; a sample with no valid element gives 0. ``eps=None``
    means ``torch.finfo(x.dtype).eps``. Arguments as in :func:`masked_layer_norm`.
    """
    shape = _normalized_shape(normalized_shape)
    _check_input(x, shape)
    _check_mask(mask, x)
    _check_param(weight, "weight", shape, x)
    return _run(x, None, mask, weight, None, shape, _rms_eps(eps, x.dtype), True, _check_offset(offset))
