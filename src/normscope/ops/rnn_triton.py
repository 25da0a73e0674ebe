"""Fused Triton (GPU) step kernels of the layer-normalized LSTM / GRU recurrence.

The same functions, signatures and semantics as :mod:`normscope.ops.rnn_cpu`, for CUDA tensors: per time step,
torch does the recurrent matmul (``torch.mm``) and one Triton kernel does the rest, one program per batch row (the
per-gate-block layer norm of the hidden pre-activations, the addition of the already normalized input gates, the
gate nonlinearities, the state update and, for the LSTM, the cell-state norm and the output). The backward mirrors
it: one Triton kernel per step and one ``torch.mm`` for the recurrent gradient, then the weight gradient of all
steps as one matmul and the norm-gain gradients as column sums of saved per-row products (no atomics, so the
result does not depend on scheduling).

float32, float16 and bfloat16 inputs. The statistics and all the arithmetic are in float32 registers (two-pass:
the mean, then the variance of the centered values, never ``E[x^2] - E[x]^2``); the recurrent state between steps
is kept in the input dtype (it feeds the next step's matmul), the tensors saved for the backward and the
gradients flowing through the recurrence in float32. Triton is imported on first use; on CPU tensors the kernels
run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from normscope.ops.rnn_cpu import _Plan

__all__ = ["available", "unavailable_reason", "lstm_sequence", "gru_sequence", "DTYPES"]

#: The input dtypes the kernels take (float64 runs the per-step module path on CUDA).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_kernels = None
_error: Optional[str] = None


def _build():
    import triton

    from normscope.ops import _rnn_triton_kernels as K

    return {"lstm_fwd": K.lstm_fwd, "lstm_bwd": K.lstm_bwd, "gru_fwd": K.gru_fwd, "gru_bwd": K.gru_bwd,
            "interpreted": K.INTERPRETED, "next_pow2": triton.next_power_of_2}


def _get():
    global _kernels, _error
    if _kernels is not None or _error is not None:
        return _kernels
    with _lock:
        if _kernels is None and _error is None:
            try:
                _kernels = _build()
            except ImportError as e:
                _error = f"triton is not importable ({e}); install it with: pip install 'normscope[gpu]'"
            except Exception as e:  # noqa: BLE001 - reported through available() / unavailable_reason()
                _error = str(e) or type(e).__name__
    return _kernels


def available() -> bool:
    """Whether the Triton recurrent kernels are usable (imports triton on the first call)."""
    return _get() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _get()
    return _error


def _k():
    k = _get()
    if k is None:
        raise RuntimeError(f"normscope's fused recurrent Triton kernels are unavailable: {_error}")
    return k


def _check(xg: Tensor, others: Sequence[Optional[Tensor]]) -> None:
    if xg.dtype not in DTYPES:
        raise TypeError(f"Expected a float32, float16 or bfloat16 input, but got dtype {xg.dtype}")
    for t in others:
        if t is not None and t.device != xg.device:
            raise RuntimeError(f"Expected all tensors on {xg.device}, but got one on {t.device}")


def _block(H: int, k) -> int:
    return max(16, k["next_pow2"](H))


def _warps(H: int) -> int:
    return 1 if H <= 256 else (4 if H <= 2048 else 8)


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh, g_hh, g_c, b_c, plan, eps):  # type: ignore[override]
        kn = _k()
        N, H = xg.shape[0], h0.shape[1]
        f32 = dict(device=xg.device, dtype=torch.float32)
        xg, w_hh, g_hh, g_c, b_c = (t.contiguous() for t in (xg, w_hh, g_hh, g_c, b_c))
        h, c = h0.clone(memory_format=torch.contiguous_format), c0.clone(memory_format=torch.contiguous_format)
        out = xg.new_empty(N, H)
        hprev, cprev, cn, th = (torch.empty(N, H, **f32) for _ in range(4))
        xhat, gates = torch.empty(N, 4, H, **f32), torch.empty(N, 4, H, **f32)
        rstd, rstd_c = torch.empty(N, 4, **f32), torch.empty(N, **f32)
        p = h.new_empty(h.shape[0], 4 * H)
        w_t = w_hh.t().to(h.dtype)
        block, warps = _block(H, kn), _warps(H)
        for off, n, live in plan.steps:
            if live:
                torch.mm(h[:live], w_t, out=p[:live])
            kn["lstm_fwd"][(n,)](xg, p, h, c, g_hh, g_c, b_c, out, hprev, cprev, xhat, rstd, gates, cn, rstd_c, th,
                                 off, live, H, float(eps), BLOCK=block, EMULATE_RTNE=kn["interpreted"],
                                 num_warps=warps)
        ctx.plan, ctx.dtypes = plan, (xg.dtype, h0.dtype, c0.dtype)
        ctx.save_for_backward(w_hh, g_hh, g_c, b_c, hprev, cprev, xhat, rstd, gates, cn, rstd_c, th)
        return out, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT, dcT):  # type: ignore[override]
        w_hh, g_hh, g_c, b_c, hprev, cprev, xhat, rstd, gates, cn, rstd_c, th = ctx.saved_tensors
        x_dt, h_dt, c_dt = ctx.dtypes
        kn = _k()
        N, H = hprev.shape
        f32 = dict(device=hprev.device, dtype=torch.float32)
        dout = dout.contiguous()
        dh = dhT.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        dc = dcT.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        dxg, dp = torch.empty(N, 4, H, **f32), torch.zeros(N, 4 * H, **f32)
        dy = torch.empty(N, H, **f32)
        w32 = w_hh.to(torch.float32)
        block, warps = _block(H, kn), _warps(H)
        for off, n, live in reversed(ctx.plan.steps):
            kn["lstm_bwd"][(n,)](dout, dh, dc, cprev, g_hh, g_c, xhat, rstd, gates, cn, rstd_c, th, dxg, dp, dy,
                                 off, live, H, BLOCK=block, num_warps=warps)
            if live:
                torch.mm(dp[off:off + live], w32, out=dh[:live])
        dw = dp.t().mm(hprev)
        d_ghh = (dxg * xhat).sum(0)
        d_gc = (dy * cn).sum(0)
        d_bc = dy.sum(0)
        return (dxg.to(x_dt), dh.to(h_dt), dc.to(c_dt), dw.to(w_hh.dtype), d_ghh.to(g_hh.dtype),
                d_gc.to(g_c.dtype), d_bc.to(b_c.dtype), None, None)


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, w_hh, g_hh, b_hh, plan, eps):  # type: ignore[override]
        kn = _k()
        N, H = xg.shape[0], h0.shape[1]
        f32 = dict(device=xg.device, dtype=torch.float32)
        xg, w_hh, g_hh = (t.contiguous() for t in (xg, w_hh, g_hh))
        b = None if b_hh is None else b_hh.contiguous()
        h = h0.clone(memory_format=torch.contiguous_format)
        out = xg.new_empty(N, H)
        hprev, vn = torch.empty(N, H, **f32), torch.empty(N, H, **f32)
        xhat, gates = torch.empty(N, 3, H, **f32), torch.empty(N, 3, H, **f32)
        rstd = torch.empty(N, 3, **f32)
        p = h.new_empty(h.shape[0], 3 * H)
        w_t = w_hh.t().to(h.dtype)
        block, warps = _block(H, kn), _warps(H)
        for off, n, live in plan.steps:
            if live:
                torch.mm(h[:live], w_t, out=p[:live])
            kn["gru_fwd"][(n,)](xg, p, h, g_hh, g_hh if b is None else b, out, hprev, xhat, rstd, gates, vn,
                                off, live, H, float(eps), HAS_BIAS=b is not None, BLOCK=block,
                                EMULATE_RTNE=kn["interpreted"], num_warps=warps)
        ctx.plan, ctx.dtypes = plan, (xg.dtype, h0.dtype)
        ctx.save_for_backward(w_hh, g_hh, b_hh, hprev, xhat, rstd, gates, vn)
        return out, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT):  # type: ignore[override]
        w_hh, g_hh, b_hh, hprev, xhat, rstd, gates, vn = ctx.saved_tensors
        x_dt, h_dt = ctx.dtypes
        kn = _k()
        N, H = hprev.shape
        f32 = dict(device=hprev.device, dtype=torch.float32)
        dout = dout.contiguous()
        dh = dhT.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        dxg, dv = torch.empty(N, 3, H, **f32), torch.empty(N, 3, H, **f32)
        dp = torch.zeros(N, 3 * H, **f32)
        w32 = w_hh.to(torch.float32)
        block, warps = _block(H, kn), _warps(H)
        for off, n, live in reversed(ctx.plan.steps):
            kn["gru_bwd"][(n,)](dout, dh, hprev, g_hh, xhat, rstd, gates, vn, dxg, dv, dp, off, live, H,
                                BLOCK=block, num_warps=warps)
            if live:
                dh[:live].addmm_(dp[off:off + live], w32)
        dw = dp.t().mm(hprev)
        d_ghh = (dv * xhat).sum(0)
        d_bhh = None if b_hh is None else dv.sum(0).view(3 * H).to(b_hh.dtype)
        return (dxg.to(x_dt), dh.to(h_dt), dw.to(w_hh.dtype), d_ghh.to(g_hh.dtype), d_bhh, None, None)


def lstm_sequence(xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, g_hh: Tensor, g_c: Tensor, b_c: Tensor,
                  batch_sizes: Sequence[int], reverse: bool, zero_init: bool, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """One direction of an LN-LSTM layer over packed rows (as :func:`normscope.ops.rnn_cpu.lstm_sequence`).
    ``xg`` ``(N, 4, H)``: the normalized input pre-activations plus both biases; ``h0``, ``c0`` ``(B, H)``
    (sorted like the packed batch). Returns (outputs ``(N, H)``, final ``h``, final ``c``)."""
    _check(xg, (h0, c0, w_hh, g_hh, g_c, b_c))
    out, h, c = _LSTMSequence.apply(xg, h0, c0, w_hh, g_hh, g_c, b_c, _Plan(batch_sizes, reverse, zero_init), eps)
    return out, h, c


def gru_sequence(xg: Tensor, h0: Tensor, w_hh: Tensor, g_hh: Tensor, b_hh: Optional[Tensor],
                 batch_sizes: Sequence[int], reverse: bool, zero_init: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """One direction of an LN-GRU layer over packed rows (as :func:`normscope.ops.rnn_cpu.gru_sequence`).
    ``xg`` ``(N, 3, H)``: the normalized input pre-activations plus ``b_ih``. Returns (outputs ``(N, H)``,
    final ``h``)."""
    _check(xg, (h0, w_hh, g_hh, b_hh))
    out, h = _GRUSequence.apply(xg, h0, w_hh, g_hh, b_hh, _Plan(batch_sizes, reverse, zero_init), eps)
    return out, h
