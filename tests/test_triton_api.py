"""Public ops through the custom ops on the triton backend.

Without a GPU the Triton kernels run on CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Unlike test_triton_backend.py, which calls the backend directly, these go
through ``normscope::norm_fwd`` / ``normscope::norm_bwd`` and autograd, so they also check what
only the custom ops enforce (e.g. that no output aliases another output or an input).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from helpers import OPS, as_tuple, assert_close, make_aux

triton = importlib.import_module("triton")

import normscope  # noqa: E402
from normscope.ops import dispatch  # noqa: E402
from normscope.ops import triton_backend as tb  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
LN_OPS = [o for o in OPS if "layer" in o.name]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", "triton")


def _params(ns, dtype, gen, bias=True):
    w = (torch.randn(ns, generator=gen) * 0.5 + 1).to(dtype).to(DEV).requires_grad_()
    b = (torch.randn(ns, generator=gen) * 0.1).to(dtype).to(DEV).requires_grad_() if bias else None
    return w, b


def _leaves(op, x, aux, w, b):
    """Fresh leaves for every differentiable input of ``op``."""
    leaves = {"x": x, "w": w}
    if b is not None:
        leaves["b"] = b
    if op.kind == "add":
        leaves["aux"] = aux
    return {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}


def _fwd_bwd(fn, op, x, aux, ns, w, b, eps, seed=1):
    """Outputs and gradients of ``fn`` (normscope's op or the reference) on fresh leaves."""
    lv = _leaves(op, x, aux, w, b)
    y = as_tuple(fn(lv["x"], lv.get("aux", aux), ns, lv["w"], lv.get("b"), eps))
    gen = torch.Generator().manual_seed(seed)
    dys = [torch.randn(t.shape, generator=gen).to(t.dtype).to(t.device) for t in y]
    torch.autograd.backward(y, dys)
    return [t.detach() for t in y], {k: v.grad for k, v in lv.items()}


def _compare(op, x, aux, ns, w, b, eps=1e-5):
    (ys, gs), (yr, gr) = (_fwd_bwd(fn, op, x, aux, ns, w, b, eps) for fn in (op.fn, op.ref))
    rows = max(x.numel() // max(w.numel(), 1), 1)
    for a, e in zip(ys, yr):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, msg=f"{op.name} output")
    assert gs.keys() == gr.keys()
    for k in gs:
        assert gs[k] is not None and gs[k].dtype == gr[k].dtype and gs[k].shape == gr[k].shape, k
        assert_close(gs[k], gr[k], rows=rows if k in ("w", "b") else 1, msg=f"{op.name} grad {k}")
    return gs


SHAPES = [((3, 7), (7,)), ((4, 33), (33,)), ((2, 3, 16), (16,)), ((0, 33), (33,))]
# (input dtype, parameter dtype)
DTYPES = [(F32, F32), (BF16, BF16), (BF16, F32)]


@pytest.mark.parametrize("dtype,pdtype", DTYPES, ids=[f"x{d}-w{p}".replace("torch.", "") for d, p in DTYPES])
@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}" for s, _ in SHAPES])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_matches_reference(op, shape, ns, dtype, pdtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    aux = make_aux(op, x.cpu(), len(ns), gen)
    aux = aux.to(DEV) if aux is not None else None
    w, b = _params(ns, pdtype, gen, bias=op.has_bias)
    gs = _compare(op, x, aux, ns, w, b)
    assert gs["w"].dtype == pdtype and gs["x"].dtype == dtype
    if shape[0] == 0:
        assert torch.equal(gs["w"], torch.zeros_like(gs["w"]))


@pytest.mark.parametrize("max_block", [None, 64], ids=["fused", "loop"])
@pytest.mark.parametrize("op", LN_OPS, ids=lambda o: o.name)
def test_large_mean_backward(monkeypatch, op, max_block):
    # Rows with mean ~1e4 and std 1e-3: the float32 mean saved by forward is rounded to a spacing
    # of ~1e-3, as large as the std. The 3e-4 offset puts the true mean between two float32 values,
    # so centering with the saved mean would shift xhat by ~0.3 (dx, dw off by percents).
    monkeypatch.setattr(tb, "MAX_FUSED_BLOCK", max_block)
    gen = torch.Generator().manual_seed(0)
    M, N = 6, 256
    x = (1e4 + 3e-4 + 1e-3 * torch.randn(M, N, generator=gen, dtype=torch.float64)).float().to(DEV)
    aux = make_aux(op, x.cpu(), 1, gen)
    if op.kind == "add":
        aux = torch.zeros(M, N)  # h == x exactly, so the float64 reference sees the same h
    aux = aux.to(DEV) if aux is not None else None
    w, b = _params((N,), F32, gen, bias=op.has_bias)
    eps = 1e-12
    _, g = _fwd_bwd(op.fn, op, x, aux, N, w, b, eps)
    aux64 = aux.double() if op.kind == "add" else aux
    b64 = None if b is None else b.double()
    _, g64 = _fwd_bwd(op.ref, op, x.double(), aux64, N, w.double(), b64, eps)
    for k in ("x", "w"):
        scale = float(g64[k].abs().max())
        assert scale > 0
        # float32 rounding of the data and the final results only: ~1e-7 of the scale
        torch.testing.assert_close(g[k].double(), g64[k], atol=1e-5 * scale, rtol=0, msg=f"grad {k}")


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_deterministic(op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=gen).to(DEV)
    aux = make_aux(op, x.cpu(), 1, gen)
    aux = aux.to(DEV) if aux is not None else None
    w, b = _params((48,), F32, gen, bias=op.has_bias)
    runs = [_fwd_bwd(op.fn, op, x, aux, 48, w, b, 1e-5) for _ in range(2)]
    (y0, g0), (y1, g1) = runs
    assert len(y0) == len(y1) and g0.keys() == g1.keys()
    for a, c in zip(y0, y1):
        assert torch.equal(a, c)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


@pytest.mark.parametrize("op", [o for o in OPS if o.kind == "add"], ids=lambda o: o.name)
def test_add_bf16_x_fp32_residual(op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=gen).to(BF16).to(DEV)  # sublayer output
    r = torch.randn(5, 40, generator=gen).to(DEV)  # float32 residual stream
    w, b = _params((40,), F32, gen, bias=op.has_bias)
    y, h = op.fn(x, r, 40, w, b, 1e-5)
    assert y.dtype == BF16 and h.dtype == F32
    torch.testing.assert_close(h, x.float() + r, atol=0, rtol=0)
    gs = _compare(op, x, r, (40,), w, b)
    assert gs["x"].dtype == BF16 and gs["aux"].dtype == F32 and gs["w"].dtype == F32


def test_compile_fullgraph_aot_eager():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=gen).to(DEV)
    r = torch.randn(3, 5, 32, generator=gen).to(DEV)
    w, b = _params((32,), F32, gen)

    assert dispatch.backend_name(x) == "triton"

    def g(x, r, w, b):
        y, h = normscope.add_layer_norm(x, r, 32, w, b)
        return (normscope.rms_norm(y, 32, w) * h).sin().sum()

    results = []
    for fn in (g, torch.compile(g, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
        val = fn(*leaves)
        val.backward()
        results.append([val.detach()] + [t.grad for t in leaves])
    for a, e in zip(*results):
        assert e is not None
        torch.testing.assert_close(a, e)
