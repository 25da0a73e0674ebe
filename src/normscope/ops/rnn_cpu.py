"""Fused CPU kernels of the layer-normalized LSTM / GRU recurrence (``csrc/ln_rnn_cpu.cpp``).

Built on first use like :mod:`normscope.ops.cpu_backend` (the system C++ compiler, ``-O3 -march=native
-fopenmp``, cached under ``$NORMSCOPE_CACHE_DIR`` or ``~/.cache/normscope`` by a hash of the source, flags,
compiler and CPU; loaded with ctypes). The time loop of a direction runs in C++, one call per sequence: per step,
the recurrent matmul (torch's own BLAS ``sgemm_`` / ``dgemm_``, whose address is looked up in ``libtorch_cpu``
and handed to the kernel, so the library needs no torch headers) and one fused pass for the rest (the per-gate-block
layer norm of the hidden pre-activations, the gate nonlinearities, the state update and the LSTM's cell-state
norm). The threads split the batch rows once for the whole sequence (a row's recurrence reads no other row), so
the steps run without a barrier and each thread's gemm is single-threaded on its own rows. The backward mirrors
it, with the weight gradients of all steps as one matmul and the norm-gain gradients summed in a fixed row order
(bitwise the same for any number of threads). :func:`input_gates` does the input-gate norms of all steps, their
gains and the biases in one pass. Where torch exports no Fortran gemm (builds without MKL), or with
``NORMSCOPE_RNN_CPU_LOOP=python``, the loop stays in Python (one ``torch.mm`` and one kernel call per step), with
the same values to rounding.

:func:`lstm_sequence` / :func:`gru_sequence` run one direction of one layer over a packed batch and are
differentiable (first order; see docs/recurrent.md for what takes the unfused path). float32 and float64.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from normscope.ops._native import NativeLib

__all__ = ["available", "unavailable_reason", "lstm_sequence", "gru_sequence", "input_gates"]

_SRC = Path(__file__).resolve().parent / "csrc" / "ln_rnn_cpu.cpp"
# -fno-trapping-math: comparisons may be if-converted (the clamps in vexp / vtanh vectorize); no value changes.
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-shared")
_ABI = 7
_SFX = {torch.float32: "f32", torch.float64: "f64"}
_PARALLEL_MIN = 1 << 14  # below this many elements per step, one thread

def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for sfx in _SFX.values():
        for name, args in (
            ("ns_lstm_fwd", [i64, i64, i64] + [ptr] * 7 + [dbl] + [ptr] * 9 + [cint]),
            ("ns_lstm_bwd", [i64, i64, i64] + [ptr] * 15 + [cint]),
            ("ns_gru_fwd", [i64, i64, i64] + [ptr] * 5 + [dbl] + [ptr] * 6 + [cint]),
            ("ns_gru_bwd", [i64, i64, i64] + [ptr] * 11 + [cint]),
            ("ns_rnn_colsum", [i64, i64, ptr, ptr, ptr, ptr, cint]),
            ("ns_gate_norm_fwd", [i64, i64, i64, ptr, ptr, ptr, dbl, ptr, ptr, ptr, cint]),
            ("ns_gate_norm_xhat", [i64, i64] + [ptr] * 4 + [cint]),
            ("ns_gate_norm_bwd", [i64, i64, i64] + [ptr] * 5 + [cint]),
            ("ns_lstm_seq_fwd", [i64, ptr, i64] + [ptr] * 9 + [dbl] + [ptr] * 9 + [cint, i64, cint]),
            ("ns_lstm_seq_bwd", [i64, ptr, i64] + [ptr] * 17 + [cint, i64]),
            ("ns_gru_seq_fwd", [i64, ptr, i64] + [ptr] * 7 + [dbl] + [ptr] * 6 + [cint, i64, cint]),
            ("ns_gru_seq_bwd", [i64, ptr, i64] + [ptr] * 13 + [cint, i64]),
        ):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes = args
            fn.restype = None


_LIB = NativeLib(_SRC, _FLAGS, "ln_rnn_cpu", "ns_rnn_abi_version", _ABI, _declare)
_get_lib = _LIB.get


def available() -> bool:
    """Whether the fused recurrent kernels are usable (builds them on the first call, a few seconds)."""
    return _get_lib() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    return _LIB.error()


def _fn(name: str, dtype: torch.dtype):
    lib = _get_lib()
    if lib is None:
        raise RuntimeError(f"normscope's fused recurrent CPU kernels are unavailable: {_LIB.error()}")
    return getattr(lib, f"{name}_{_SFX[dtype]}")


_gemm_cache: dict = {}


def _find_gemm(name: str) -> Optional[int]:
    """Address of torch's exported Fortran BLAS ``name`` (``sgemm_`` / ``dgemm_``), or None where torch has none
    (builds on OpenBLAS / without MKL: the per-step Python loop is used there)."""
    # NORMSCOPE_RNN_CPU_LOOP=python: the per-step Python loop (the fallback, kept selectable for comparisons).
    if os.environ.get("NORMSCOPE_RNN_CPU_LOOP", "cpp").strip().lower() == "python":
        return None
    if name not in _gemm_cache:
        addr = None
        if "BLAS_INFO=mkl" in torch.__config__.show():
            try:
                lib = ctypes.CDLL(str(Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"))
                addr = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            except (OSError, AttributeError):
                addr = None
        _gemm_cache[name] = addr
    return _gemm_cache[name]


def _gemm_address(dtype: torch.dtype) -> Optional[int]:
    """The BLAS gemm the C++ time loop calls for ``dtype``; None selects the per-step Python loop."""
    return _find_gemm("sgemm_" if dtype == torch.float32 else "dgemm_")


def _p(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads(elems: int) -> int:
    return max(1, torch.get_num_threads()) if elems >= _PARALLEL_MIN else 1


def _colsum(a: Tensor, b: Optional[Tensor], shape: Sequence[int]) -> Tensor:
    """``(a * b).sum(0)`` (or ``a.sum(0)``) over rows in a fixed order, accumulated in float64."""
    R = a.shape[0]
    C = a.numel() // max(R, 1)
    out = a.new_empty(C)
    _fn("ns_rnn_colsum", a.dtype)(R, C, _p(a), _p(b), _p(out), None, _threads(R * C))
    return out.view(*shape)


def _colsum2(a: Tensor, b: Tensor, shape: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """``((a * b).sum(0), a.sum(0))`` from one pass over ``a``, each like :func:`_colsum`."""
    R = a.shape[0]
    C = a.numel() // max(R, 1)
    out, out_a = a.new_empty(C), a.new_empty(C)
    _fn("ns_rnn_colsum", a.dtype)(R, C, _p(a), _p(b), _p(out), _p(out_a), _threads(R * C))
    return out.view(*shape), out_a.view(*shape)


class _Plan:
    """The order of the steps of one direction over a packed batch, and the live rows of each step."""

    def __init__(self, batch_sizes: Sequence[int], reverse: bool, zero_init: bool) -> None:
        self.offsets = [0]
        for n in batch_sizes:
            self.offsets.append(self.offsets[-1] + int(n))
        order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
        self.steps: List[Tuple[int, int, int]] = []  # (offset, n, live)
        started = 0
        for t in order:
            n = int(batch_sizes[t])
            if n == 0:
                continue
            live = min(started, n) if zero_init else n
            started = max(started, n)
            self.steps.append((self.offsets[t], n, live))
        self.table = torch.tensor(self.steps, dtype=torch.int64).reshape(-1, 3)  # for the C++ time loop


class _Rows:
    """Addresses of row ``r`` of contiguous tensors, by arithmetic (no view per step)."""

    def __init__(self, *tensors: Tensor) -> None:
        self.base = [t.data_ptr() for t in tensors]
        self.row = [t.stride(0) * t.element_size() for t in tensors]

    def at(self, r: int) -> List[int]:
        return [b + r * s for b, s in zip(self.base, self.row)]


def _recurrent_mm(h: Tensor, w_t: Tensor, p: Tensor, k: int) -> None:
    """``p[:k] = h[:k] @ w_t``: the recurrent pre-activations of the ``k`` live rows (none when ``k`` is 0)."""
    if k == h.shape[0]:
        torch.mm(h, w_t, out=p)
    elif k:
        torch.mm(h[:k], w_t, out=p[:k])


_BLOCK_MAX_BYTES = 24 << 20  # below glibc's largest dynamic mmap threshold (32 MiB on 64-bit)


def _block(like: Tensor, *shapes: Sequence[int]) -> List[Tensor]:
    """Tensors of ``shapes`` carved out of one allocation (64-byte aligned) when together they are under
    ``_BLOCK_MAX_BYTES``, else one allocation each. What a forward keeps for its backward lives and dies together;
    glibc's allocator returns medium blocks freed at the top of its heap to the system and faults the pages in
    again on the next call (measured: a third of the LSTM forward's time at T=64, B=16, H=128), while one larger
    block raises its reuse thresholds. Above 32 MiB a block is always a fresh mapping, so large shapes keep
    separate tensors (each reused from the heap once the thresholds have grown)."""
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) * like.element_size() > _BLOCK_MAX_BYTES:
        return [like.new_empty(*s) for s in shapes]
    align = max(1, 64 // like.element_size())
    padded = [(n + align - 1) // align * align for n in sizes]
    flat = like.new_empty(sum(padded))
    out, off = [], 0
    for shape, n, pn in zip(shapes, sizes, padded):
        out.append(flat[off:off + n].view(*shape))
        off += pn
    return out


def _needs_backward(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will record the call (grad mode on and an input requiring grad): only then are the values
    the backward reads kept for every row (the Functions' ``needs_input_grad`` ignores grad mode)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _GateNorm(torch.autograd.Function):
    """``LN(pre) * gamma + bias`` per gate block, ``pre`` ``(N, G, H)``, ``gamma`` / ``bias`` ``(G, H)``. Keeps
    ``pre`` (the input projection's output, alive anyway) and the row statistics for the backward, not a
    normalized copy."""

    @staticmethod
    def forward(ctx, pre, gamma, bias, eps, save, inplace):  # type: ignore[override]
        N, G, H = pre.shape
        pre, gamma = pre.contiguous(), gamma.contiguous()
        b = None if bias is None else bias.contiguous()
        # In place when asked and without a backward (a second buffer of pre's size was, at T=64, B=16, H=128,
        # freed back to the system and faulted in again on every call).
        y = pre if inplace and not save else pre.new_empty(N, G, H)
        mean, rstd = _block(pre, (N, G), (N, G))
        _fn("ns_gate_norm_fwd", pre.dtype)(N * G, G, H, _p(pre), _p(gamma), _p(b), float(eps), _p(y), _p(mean),
                                           _p(rstd), _threads(N * G * H))
        ctx.has_bias = bias is not None
        if save:
            ctx.save_for_backward(pre, gamma, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        pre, gamma, mean, rstd = ctx.saved_tensors
        N, G, H = pre.shape
        dy = dy.contiguous()
        dpre = torch.empty_like(pre)  # holds xhat first, then (in place) the input gradient
        threads = _threads(N * G * H)
        _fn("ns_gate_norm_xhat", pre.dtype)(N * G, H, _p(pre), _p(mean), _p(rstd), _p(dpre), threads)
        d_gamma, d_bias = _colsum2(dy, dpre, (G, H))
        _fn("ns_gate_norm_bwd", pre.dtype)(N * G, G, H, _p(dy), _p(gamma), _p(dpre), _p(rstd), _p(dpre), threads)
        d_gamma = d_gamma if ctx.needs_input_grad[1] else None
        d_bias = d_bias if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dpre, d_gamma, d_bias, None, None, None


def input_gates(pre: Tensor, gamma: Tensor, bias: Optional[Tensor], eps: float, inplace: bool = False) -> Tensor:
    """The normalized input pre-activations of all steps plus the gate biases in one pass: ``LN(pre) * gamma +
    bias`` over the last dim of each gate block, ``pre`` ``(N, G, H)``, ``gamma`` and ``bias`` ``(G, H)`` (bias
    may be None). Differentiable (first order); the same values as the input ``RecurrentNorm`` followed by the
    bias add, up to rounding (statistics two-pass, summed in float64). ``inplace``: when autograd does not record
    the call, the result is written into (a contiguous) ``pre`` and returned."""
    return _GateNorm.apply(pre, gamma, bias, eps, _needs_backward(pre, gamma, bias), inplace)


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh, g_hh, g_c, b_c, plan, eps, save):  # type: ignore[override]
        N, H = xg.shape[0], h0.shape[1]
        fwd = _fn("ns_lstm_fwd", xg.dtype)
        xg, w_hh, g_hh, g_c, b_c = (t.contiguous() for t in (xg, w_hh, g_hh, g_c, b_c))
        h, c = h0.clone(memory_format=torch.contiguous_format), c0.clone(memory_format=torch.contiguous_format)
        # Without a backward to come, what the backward reads is kept for one step only (B rows, overwritten).
        R = N if save else h.shape[0]
        out = xg.new_empty(N, H)
        hprev, cprev, cn, th, xhat, gates, rstd, rstd_c = _block(xg, (R, H), (R, H), (R, H), (R, H), (R, 4, H),
                                                                  (R, 4, H), (R, 4), (R,))
        p = xg.new_empty(h.shape[0], 4 * H)
        gemm = _gemm_address(xg.dtype)
        if gemm is not None:
            _fn("ns_lstm_seq_fwd", xg.dtype)(
                len(plan.steps), _p(plan.table), H, gemm, _p(xg), _p(w_hh), _p(p), _p(h), _p(c), _p(g_hh), _p(g_c),
                _p(b_c), float(eps), _p(out), _p(hprev), _p(cprev), _p(xhat), _p(rstd), _p(gates), _p(cn),
                _p(rstd_c), _p(th), max(1, torch.get_num_threads()), _PARALLEL_MIN, int(save))
        else:
            w_t = w_hh.t()
            io, kept = _Rows(xg, out), _Rows(hprev, cprev, xhat, rstd, gates, cn, rstd_c, th)
            fixed = (_p(p), _p(h), _p(c), _p(g_hh), _p(g_c), _p(b_c), float(eps))
            for off, n, k in plan.steps:
                _recurrent_mm(h, w_t, p, k)
                x_a, out_a = io.at(off)
                fwd(n, k, H, x_a, *fixed, out_a, *kept.at(off if save else 0), _threads(n * 4 * H))
        ctx.plan = plan
        ctx.save_for_backward(w_hh, g_hh, g_c, hprev, cprev, xhat, rstd, gates, cn, rstd_c, th)
        return out, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT, dcT):  # type: ignore[override]
        w_hh, g_hh, g_c, hprev, cprev, xhat, rstd, gates, cn, rstd_c, th = ctx.saved_tensors
        N, H = hprev.shape
        bwd = _fn("ns_lstm_bwd", hprev.dtype)
        dout = dout.contiguous()
        dh = dhT.clone(memory_format=torch.contiguous_format)
        dc = dcT.clone(memory_format=torch.contiguous_format)
        # (dp: rows >= k of a step are zeros from the kernel)
        dxg, dp, dy = _block(hprev, (N, 4, H), (N, 4 * H), (N, H))
        gemm = _gemm_address(hprev.dtype)
        if gemm is not None:
            plan = ctx.plan
            _fn("ns_lstm_seq_bwd", hprev.dtype)(
                len(plan.steps), _p(plan.table), H, gemm, _p(w_hh), _p(dout), _p(dh), _p(dc), _p(cprev), _p(g_hh),
                _p(g_c), _p(xhat), _p(rstd), _p(gates), _p(cn), _p(rstd_c), _p(th), _p(dxg), _p(dp), _p(dy),
                max(1, torch.get_num_threads()), _PARALLEL_MIN)
        else:
            rows = _Rows(dout, cprev, xhat, rstd, gates, cn, rstd_c, th, dxg, dp, dy)
            fixed = (_p(dh), _p(dc))
            consts = (_p(g_hh), _p(g_c))
            for off, n, k in reversed(ctx.plan.steps):
                d_a, cp_a, xh_a, r_a, g_a, cn_a, rc_a, th_a, dx_a, dp_a, dy_a = rows.at(off)
                bwd(n, k, H, d_a, *fixed, cp_a, *consts, xh_a, r_a, g_a, cn_a, rc_a, th_a, dx_a, dp_a, dy_a,
                    _threads(n * 4 * H))
                if k:
                    torch.mm(dp[off:off + k], w_hh, out=dh[:k])
        dw = dp.t().mm(hprev)
        d_ghh = _colsum(dxg, xhat, (4, H))
        d_gc, d_bc = _colsum2(dy, cn, (H,))
        return dxg, dh, dc, dw, d_ghh, d_gc, d_bc, None, None, None


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, w_hh, g_hh, b_hh, plan, eps, save):  # type: ignore[override]
        N, H = xg.shape[0], h0.shape[1]
        fwd = _fn("ns_gru_fwd", xg.dtype)
        xg, w_hh, g_hh = (t.contiguous() for t in (xg, w_hh, g_hh))
        b = None if b_hh is None else b_hh.contiguous()
        h = h0.clone(memory_format=torch.contiguous_format)
        R = N if save else h.shape[0]
        out = xg.new_empty(N, H)
        hprev, hn, xhat, gates, rstd = _block(xg, (R, H), (R, H), (R, 3, H), (R, 3, H), (R, 3))
        p = xg.new_empty(h.shape[0], 3 * H)
        gemm = _gemm_address(xg.dtype)
        if gemm is not None:
            _fn("ns_gru_seq_fwd", xg.dtype)(
                len(plan.steps), _p(plan.table), H, gemm, _p(xg), _p(w_hh), _p(p), _p(h), _p(g_hh), _p(b),
                float(eps), _p(out), _p(hprev), _p(xhat), _p(rstd), _p(gates), _p(hn),
                max(1, torch.get_num_threads()), _PARALLEL_MIN, int(save))
        else:
            w_t = w_hh.t()
            io, kept = _Rows(xg, out), _Rows(hprev, xhat, rstd, gates, hn)
            fixed = (_p(p), _p(h), _p(g_hh), _p(b), float(eps))
            for off, n, k in plan.steps:
                _recurrent_mm(h, w_t, p, k)
                x_a, out_a = io.at(off)
                fwd(n, k, H, x_a, *fixed, out_a, *kept.at(off if save else 0), _threads(n * 3 * H))
        ctx.plan, ctx.has_bias = plan, b_hh is not None
        ctx.save_for_backward(w_hh, g_hh, hprev, xhat, rstd, gates, hn)
        return out, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT):  # type: ignore[override]
        w_hh, g_hh, hprev, xhat, rstd, gates, hn = ctx.saved_tensors
        N, H = hprev.shape
        bwd = _fn("ns_gru_bwd", hprev.dtype)
        dout = dout.contiguous()
        dh = dhT.clone(memory_format=torch.contiguous_format)
        dxg, dhg, dp = _block(hprev, (N, 3, H), (N, 3, H), (N, 3 * H))
        gemm = _gemm_address(hprev.dtype)
        if gemm is not None:
            plan = ctx.plan
            _fn("ns_gru_seq_bwd", hprev.dtype)(
                len(plan.steps), _p(plan.table), H, gemm, _p(w_hh), _p(dout), _p(dh), _p(hprev), _p(g_hh),
                _p(xhat), _p(rstd), _p(gates), _p(hn), _p(dxg), _p(dhg), _p(dp),
                max(1, torch.get_num_threads()), _PARALLEL_MIN)
        else:
            rows = _Rows(dout, hprev, xhat, rstd, gates, hn, dxg, dhg, dp)
            for off, n, k in reversed(ctx.plan.steps):
                d_a, hp_a, xh_a, r_a, g_a, hn_a, dx_a, dg_a, dp_a = rows.at(off)
                bwd(n, k, H, d_a, _p(dh), hp_a, _p(g_hh), xh_a, r_a, g_a, hn_a, dx_a, dg_a, dp_a,
                    _threads(n * 3 * H))
                if k:
                    dh[:k].addmm_(dp[off:off + k], w_hh)
        dw = dp.t().mm(hprev)
        d_ghh, d_bhh = _colsum2(dhg, xhat, (3, H))
        d_bhh = d_bhh.view(3 * H) if ctx.has_bias else None
        return dxg, dh, dw, d_ghh, d_bhh, None, None, None


def lstm_sequence(xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, g_hh: Tensor, g_c: Tensor, b_c: Tensor,
                  batch_sizes: Sequence[int], reverse: bool, zero_init: bool, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """One direction of an LN-LSTM layer over packed rows. ``xg`` ``(N, 4, H)``: the normalized input
    pre-activations plus both biases; ``h0``, ``c0`` ``(B, H)`` (sorted like the packed batch). Returns
    (outputs ``(N, H)``, final ``h``, final ``c``)."""
    save = _needs_backward(xg, h0, c0, w_hh, g_hh, g_c, b_c)
    out, h, c = _LSTMSequence.apply(xg, h0, c0, w_hh, g_hh, g_c, b_c, _Plan(batch_sizes, reverse, zero_init), eps,
                                    save)
    return out, h, c


def gru_sequence(xg: Tensor, h0: Tensor, w_hh: Tensor, g_hh: Tensor, b_hh: Optional[Tensor],
                 batch_sizes: Sequence[int], reverse: bool, zero_init: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """One direction of an LN-GRU layer over packed rows. ``xg`` ``(N, 3, H)``: the normalized input
    pre-activations plus ``b_ih``. Returns (outputs ``(N, H)``, final ``h``)."""
    save = _needs_backward(xg, h0, w_hh, g_hh, b_hh)
    out, h = _GRUSequence.apply(xg, h0, w_hh, g_hh, b_hh, _Plan(batch_sizes, reverse, zero_init), eps, save)
    return out, h
