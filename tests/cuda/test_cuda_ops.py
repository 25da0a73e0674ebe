"""The Triton backend on a real CUDA device: every op, dtype, forward and backward, large N,
determinism and torch.compile. Collected only where CUDA is available (see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import normscope
from helpers import OPS, as_tuple, assert_close, make_aux
from normscope.ops import dispatch

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N): tiny, primes, around powers of two, beyond 64K elements, and the 262144 hidden size
SHAPES = [(3, 1), (5, 7), (64, 1023), (32, 4097), (16, 8192), (8, 65537), (4, 262144), (0, 128)]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.delenv("NORMSCOPE_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _case(op, m, n, dtype, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen).to(dtype)
    aux = make_aux(op, x, 1, gen)
    pd = param_dtype or dtype
    w = (torch.randn(n, generator=gen) * 0.5 + 1).to(pd)
    b = (torch.randn(n, generator=gen) * 0.1).to(pd) if op.has_bias else None
    return [t.to(DEV) if t is not None else None for t in (x, aux, w, b)]


def _fwd_bwd(fn, x, aux, n, w, b):
    leaves = {"x": x.clone().requires_grad_(), "w": w.clone().requires_grad_()}
    if b is not None:
        leaves["b"] = b.clone().requires_grad_()
    if aux is not None and aux.dtype != torch.bool:
        leaves["aux"] = aux.clone().requires_grad_()
    a = leaves.get("aux", aux)
    ys = as_tuple(fn(leaves["x"], a, n, leaves["w"], leaves.get("b"), 1e-5))
    gen = torch.Generator(device=DEV).manual_seed(1)
    dys = [torch.randn(y.shape, generator=gen, device=DEV).to(y.dtype) for y in ys]
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys], {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("m,n", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_matches_reference_on_cuda(op, dtype, m, n):
    x, aux, w, b = _case(op, m, n, dtype)
    assert dispatch.backend_name(x) == "triton"
    ys, gs = _fwd_bwd(op.fn, x, aux, n, w, b)
    yr, gr = _fwd_bwd(op.ref, x, aux, n, w, b)
    for a, e in zip(ys, yr):
        assert_close(a, e, msg=f"{op.name} output")
    for k in gs:
        assert_close(gs[k], gr[k], rows=m if k in ("w", "b") else 1, msg=f"{op.name} grad {k}")


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_mixed_precision_params_on_cuda(op):
    x, aux, w, b = _case(op, 64, 4096, torch.bfloat16, param_dtype=torch.float32)
    ys, gs = _fwd_bwd(op.fn, x, aux, 4096, w, b)
    yr, gr = _fwd_bwd(op.ref, x, aux, 4096, w, b)
    assert ys[0].dtype == torch.bfloat16 and gs["w"].dtype == torch.float32
    for a, e in zip(ys, yr):
        assert_close(a, e)
    assert_close(gs["x"], gr["x"])
    assert_close(gs["w"], gr["w"], rows=64)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_deterministic_on_cuda(op):
    x, aux, w, b = _case(op, 8192, 1024, torch.bfloat16)
    first = _fwd_bwd(op.fn, x, aux, 1024, w, b)
    for _ in range(2):
        again = _fwd_bwd(op.fn, x, aux, 1024, w, b)
        for a, c in zip(first[0], again[0]):
            assert torch.equal(a, c)
        for k in first[1]:
            assert torch.equal(first[1][k], again[1][k]), k


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_large_mean_small_variance_on_cuda(op):
    x = (1e4 + 1e-3 * torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))).to(DEV)
    aux = make_aux(op, x, 1, torch.Generator().manual_seed(1))
    if op.kind == "add":
        aux = torch.zeros_like(x)
    elif aux is not None:
        aux = aux.to(DEV)
    w = torch.ones(4096, device=DEV)
    b = torch.zeros(4096, device=DEV) if op.has_bias else None
    y = as_tuple(op.fn(x, aux, 4096, w, b, 1e-12))[0]
    y64 = as_tuple(op.ref(x.double(), aux, 4096, w.double(), None if b is None else b.double(), 1e-12))[0]
    torch.testing.assert_close(y.double(), y64, atol=2e-3, rtol=2e-3)


def test_bf16_rms_norm_tiny_variance_rows():
    # rows of bf16 values whose mean square is far below eps's scale must still normalize
    x = (torch.randn(128, 2048, device=DEV) * 1e-4).to(torch.bfloat16)
    y = normscope.rms_norm(x, 2048, eps=1e-12)
    ref = normscope.ops.reference.rms_norm_ref(x, 2048, eps=1e-12)
    assert_close(y, ref)
    assert 0.9 < float(y.float().pow(2).mean().sqrt()) < 1.1


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(normscope.nn.LayerNorm(256), torch.nn.Linear(256, 256),
                                normscope.nn.RMSNorm(256)).to(DEV)
    x = torch.randn(64, 256, device=DEV, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    g_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, g_eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 19, 5, 15), (8, 96, 56, 56), (4, 768, 7, 7)])
def test_layernorm2d_channels_first_kernel(dtype, shape):
    from normscope.nn import LayerNorm2d

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=gen) * 2 + 5).to(dtype).to(DEV).requires_grad_()
    dy = torch.randn(*shape, generator=gen).to(dtype).to(DEV)
    m = LayerNorm2d(shape[1]).to(DEV)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    y = m(x)
    assert y.is_contiguous() and y.dtype == dtype
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    wr, br = m.weight.detach().double().requires_grad_(), m.bias.detach().double().requires_grad_()
    yr = torch.nn.functional.layer_norm(xr.movedim(1, -1), (shape[1],), wr, br, m.eps).movedim(-1, 1)
    yr.backward(dy.double())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for a, r in ((y, yr), (x.grad, xr.grad)):
        assert float((a.double() - r).abs().max()) < tol * max(1.0, float(r.abs().max()))
    for a, r in ((m.weight.grad, wr.grad), (m.bias.grad, br.grad)):
        assert float((a.double() - r).abs().max()) < (1e-3 if dtype == torch.float32 else 0.05) * float(r.abs().max())
