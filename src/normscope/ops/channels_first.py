"""Channels-first LayerNorm on the CPU without a permute copy (``csrc/norm_cf_cpu.cpp``).

``normscope::norm_cf_fwd`` / ``normscope::norm_cf_bwd`` normalize a contiguous ``(B, C, S)`` tensor over
dim 1 (an ``NCHW`` tensor with ``S = H * W``; timm's ``LayerNorm2d``, ConvNeXt's ``channels_first``
LayerNorm) and return the result in the same layout, where the channels-last route first copies the input
into ``NHWC`` and returns a permuted view. Statistics in double inside the kernel, stored in float32
(float64 for float64 input); weight / bias gradients summed per block of positions, then over the blocks in
order (deterministic for any thread count). :class:`normscope.nn.LayerNorm2d` calls :func:`layer_norm_cf`
for contiguous CPU inputs; everything else (CUDA, channels-last input, forward-mode AD and ``torch.func``
transforms, DTensors) takes the channels-last route.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from normscope.ops import dispatch
from normscope.ops._native import NativeLib
from normscope.ops.reference import acc_dtype

__all__ = ["available", "loaded", "unavailable_reason", "supports", "layer_norm_cf"]

_SRC = Path(__file__).resolve().parent / "csrc" / "norm_cf_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-fPIC", "-fno-math-errno", "-shared")
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_PARALLEL_MIN = 1 << 14


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    lib.ns_cf_fwd.argtypes = [cint, i64, i64, i64, ptr, ptr, ptr, dbl, ptr, ptr, ptr, cint]
    lib.ns_cf_bwd.argtypes = [cint, i64, i64, i64] + [ptr] * 8 + [cint]
    lib.ns_cf_fwd.restype = lib.ns_cf_bwd.restype = cint


_LIB = NativeLib(_SRC, _FLAGS, "norm_cf_cpu", "ns_cf_abi_version", 1, _declare)


def available() -> bool:
    """Whether the channels-first kernels are usable (builds them on the first call, about a second)."""
    return _LIB.get() is not None


def loaded() -> bool:
    """Whether the kernels are already loaded (never builds them)."""
    return _LIB.loaded


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    return _LIB.error()


def supports(x: Tensor) -> bool:
    """Whether :func:`layer_norm_cf` runs ``x``: a contiguous CPU or CUDA tensor of a floating dtype, ``dim >= 2``,
    not empty, whose backend can run (the CPU kernels built, or Triton importable for CUDA)."""
    if not (type(x) is Tensor or isinstance(x, torch.nn.Parameter)) or x.dtype not in _CODES or x.dim() < 2 \
            or x.numel() == 0 or not x.is_contiguous():
        return False
    if torch.compiler.is_compiling():
        # while torch.compile traces: only a backend already loaded (building or importing is not traceable);
        # the op picks the backend when it runs
        return _LIB.loaded if x.device.type == "cpu" else "triton" in dispatch._loaded
    try:
        name = dispatch.backend_name(x)
        if name == "triton":
            dispatch.backend_for(x)  # imports Triton: ImportError when it is not installed
    except (ValueError, RuntimeError, ImportError):
        return False
    return available() if name == "cpu" else True


def _p(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _threads(n: int) -> int:
    return max(1, torch.get_num_threads()) if n >= _PARALLEL_MIN else 1


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("normscope::norm_cf_fwd", mutates_args=())
def norm_cf_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Channels-first LayerNorm forward on a contiguous ``(B, C, S)`` tensor: ``(y, mean, rstd)``, stats ``(B, S)``."""
    name = dispatch.backend_name(x)
    if name == "triton":
        from normscope.ops import channels_first_triton

        return channels_first_triton.norm_cf_fwd(x, weight, bias, eps)
    if name == "reference":
        return _reference_fwd(x, weight, bias, eps)
    B, C, S = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    mean, rstd = x.new_empty((B, S), dtype=acc), x.new_empty((B, S), dtype=acc)
    lib = _LIB.get()
    if lib is None:
        raise RuntimeError(f"normscope's channels-first CPU kernels are unavailable: {_LIB.error()}")
    rc = lib.ns_cf_fwd(_CODES[x.dtype], B, C, S, x.data_ptr(), _p(weight), _p(bias), float(eps), y.data_ptr(),
                       mean.data_ptr(), rstd.data_ptr(), _threads(x.numel()))
    if rc != 0:
        raise RuntimeError(f"normscope channels-first kernel: unsupported dtype {x.dtype}")
    return y, mean, rstd


@norm_cf_fwd.register_fake
def _norm_cf_fwd_fake(x, weight, bias, eps):
    B, C, S = x.shape
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty((B, S), dtype=acc), x.new_empty((B, S), dtype=acc)


@torch.library.custom_op("normscope::norm_cf_bwd", mutates_args=())
def norm_cf_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Channels-first LayerNorm backward: ``(dx, dw or empty, db or empty)``, dw / db in the statistics' dtype."""
    B, C, S = x.shape
    acc = acc_dtype(x.dtype)
    dy = dy.contiguous()
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    name = dispatch.backend_name(x)
    if name in ("triton", "reference"):
        if name == "triton":
            from normscope.ops import channels_first_triton

            dx, dw_, db_ = channels_first_triton.norm_cf_bwd(dy, x, weight, mean, rstd, has_bias)
        else:
            dx, dw_, db_ = _reference_bwd(dy, x, weight, mean, rstd, has_bias)
        return dx, dw_ if dw_ is not None else _empty(x, acc), db_ if db_ is not None else _empty(x, acc)
    dx = torch.empty_like(x)
    dw = x.new_empty((C,), dtype=acc) if weight is not None else _empty(x, acc)
    db = x.new_empty((C,), dtype=acc) if has_bias else _empty(x, acc)
    lib = _LIB.get()
    if lib is None:
        raise RuntimeError(f"normscope's channels-first CPU kernels are unavailable: {_LIB.error()}")
    rc = lib.ns_cf_bwd(_CODES[x.dtype], B, C, S, dy.data_ptr(), x.data_ptr(), _p(weight), mean.data_ptr(),
                       rstd.data_ptr(), dx.data_ptr(), _p(dw), _p(db), _threads(x.numel()))
    if rc != 0:
        raise RuntimeError(f"normscope channels-first kernel: unsupported dtype {x.dtype}")
    return dx, dw, db


@norm_cf_bwd.register_fake
def _norm_cf_bwd_fake(dy, x, weight, mean, rstd, has_bias):
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    dw = x.new_empty((C,), dtype=acc) if weight is not None else _empty(x, acc)
    db = x.new_empty((C,), dtype=acc) if has_bias else _empty(x, acc)
    return torch.empty_like(x), dw, db


def _reference_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward op in torch ops on ``(B, C, S)``: two-pass statistics in the accumulation dtype."""
    xa = x.to(acc_dtype(x.dtype))
    mean = xa.mean(1)
    d = xa - mean[:, None]
    rstd = torch.rsqrt((d * d).mean(1) + eps)
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight[None, :, None]
    if bias is not None:
        y = y + bias[None, :, None]
    return y.to(x.dtype), mean, rstd


def _reference_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool
                   ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    acc = mean.dtype
    g0 = dy.to(acc)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    g = g0 * weight[None, :, None] if weight is not None else g0
    dx = rstd[:, None] * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    dw = (g0 * xhat).sum((0, 2)) if weight is not None else None
    db = g0.sum((0, 2)) if has_bias else None
    return dx.to(x.dtype), dw, db


def reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The same computation in differentiable torch ops (two-pass, float32 at least), output in ``x``'s dtype."""
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    mean = xa.mean(1, keepdim=True)
    d = xa - mean
    y = d * torch.rsqrt((d * d).mean(1, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(x.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps = eps


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the reference's graph on the saved inputs, differentiable again
        ins = (x, weight, bias)
        want = [t for t in ins if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(reference(x, weight, bias, ctx.eps), want, dy, create_graph=True)
                     if want else ())
        gx, gw, gb = (next(grads) if t is not None and t.requires_grad else None for t in ins)
        return gx, gw, gb, None
    dx, dw, db = norm_cf_bwd(dy, x, weight, mean, rstd, bias is not None)
    return dx, dw if weight is not None else None, db if bias is not None else None, None


torch.library.register_autograd("normscope::norm_cf_fwd", _backward, setup_context=_setup_context)


def layer_norm_cf(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over dim 1 of a contiguous ``(N, C, *spatial)`` CPU tensor, output in the same layout.

    ``weight`` / ``bias``: ``(C,)`` or None. Gradients reach ``x``, ``weight`` and ``bias`` in their dtypes.
    """
    B, C = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    b = None if bias is None else bias.to(acc).contiguous()
    y = norm_cf_fwd(x.view(B, C, -1), w, b, float(eps))[0]
    return y.view(x.shape)
