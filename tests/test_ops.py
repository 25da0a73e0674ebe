"""Public ops against the reference, through the custom ops, on the CPU backends.

The Triton kernels get the same checks under the interpreter in test_triton_backend.py and, at the
public-API level, in test_triton_api.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normscope
from helpers import OPS, OPS_BY_NAME, as_tuple, assert_close, make_aux

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (shape of x, normalized_shape), chosen on purpose:
SHAPES = [
    ((4, 1), (1,)),  # N = 1: variance is 0 for every row
    ((3, 7), (7,)),  # a small prime
    ((5, 1023), (1023,)),  # just below a power of two
    ((2, 4097), (4097,)),  # just above one
    ((1, 65537), (65537,)),  # above 64K elements, where several published kernels stop
    ((0, 33), (33,)),  # M = 0 rows
    ((2, 5, 48), (48,)),  # 3-D input
    ((2, 3, 4, 16), (4, 16)),  # 4-D input, normalized over two trailing dims
]


BACKENDS = ["cpu", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", request.param)
    return request.param


# The reference backend is dtype-generic: float32 covers its plumbing; the fast backend gets all.
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in DTYPES if b == "cpu" or d == torch.float32]


def _params(ns, dtype, gen, bias=True, param_dtype=None):
    pd = param_dtype or dtype
    w = (torch.randn(ns, generator=gen) * 0.5 + 1).to(pd).requires_grad_()
    b = (torch.randn(ns, generator=gen) * 0.1).to(pd).requires_grad_() if bias else None
    return w, b


def _run_both(op, x, aux, ns, w, b, eps, grads_wrt):
    """Forward and backward of normscope and of the reference on cloned leaves."""
    outs = {}
    for which in ("ns", "ref"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in grads_wrt.items()}
        xx = leaves.get("x", x)
        aa = leaves.get("aux", aux)
        ww = leaves.get("w", w)
        bb = leaves.get("b", b)
        fn = op.fn if which == "ns" else op.ref
        y = as_tuple(fn(xx, aa, ns, ww, bb, eps))
        gen = torch.Generator().manual_seed(1)
        dys = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in y]
        torch.autograd.backward(y, dys)
        outs[which] = (y, {k: v.grad for k, v in leaves.items()})
    return outs


@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}-{n}" for s, n in SHAPES])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("backend_name,dtype", BACKEND_DTYPES, ids=[f"{b}-{d}" for b, d in BACKEND_DTYPES])
def test_matches_reference(monkeypatch, backend_name, dtype, op, shape, ns):
    monkeypatch.setenv("NORMSCOPE_BACKEND", backend_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    aux = make_aux(op, x, len(ns), gen)
    w, b = _params(ns, dtype, gen, bias=op.has_bias)
    grads_wrt = {"x": x, "w": w}
    if op.has_bias:
        grads_wrt["b"] = b
    if op.kind == "add":
        grads_wrt["aux"] = aux
    out = _run_both(op, x, aux, ns, w, b, 1e-5, grads_wrt)
    (ys, gs), (yr, gr) = out["ns"], out["ref"]
    rows = max(x.numel() // max(w.numel(), 1), 1)
    for a, e in zip(ys, yr):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, msg=f"{op.name} output")
    for k in gs:
        assert gs[k].dtype == gr[k].dtype, k
        assert_close(gs[k], gr[k], rows=rows if k in ("w", "b") else 1, msg=f"{op.name} grad {k}")


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_float64_gradcheck(backend, op):
    gen = torch.Generator().manual_seed(0)
    ns = (3, 5)
    x = torch.randn((2, 3, 5), generator=gen, dtype=torch.float64)
    aux = make_aux(op, x, len(ns), gen)
    if op.kind == "masked":
        aux = torch.tensor([[True, True, False], [False, False, False]]).reshape(2, 3, 1)
    w = torch.randn(ns, generator=gen, dtype=torch.float64)
    b = torch.randn(ns, generator=gen, dtype=torch.float64) if op.has_bias else None
    inputs = [x, w] + ([b] if b is not None else []) + ([aux] if op.kind == "add" else [])
    inputs = [t.requires_grad_() for t in inputs]

    def f(*args):
        xx, ww = args[0], args[1]
        bb = args[2] if op.has_bias else None
        aa = args[-1] if op.kind == "add" else aux
        return op.fn(xx, aa, ns, ww, bb, 1e-5)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_non_contiguous_views(backend, op):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 40, 2, generator=gen)
    x = base[:, ::2, 0].t()  # (20, 6), strides (2*2, 40*2): neither row- nor column-contiguous
    assert not x.is_contiguous()
    ns = (6,)
    aux = make_aux(op, x, 1, gen)
    if aux is not None:
        aux = aux.t().contiguous().t()  # a transposed view of the same values
    w, b = _params(ns, torch.float32, gen, bias=op.has_bias)
    out = _run_both(op, x, aux, ns, w, b, 1e-5, {"x": x, "w": w})
    for a, e in zip(out["ns"][0], out["ref"][0]):
        assert_close(a, e)
    assert_close(out["ns"][1]["x"], out["ref"][1]["x"])


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_large_mean_small_variance_rows(backend, op):
    # mean 1e4 and std 1e-3: a one-pass E[x^2] - E[x]^2 in float32 loses every significant digit.
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(8, 512, generator=gen)
    aux = make_aux(op, x, 1, gen)
    if op.kind == "add":
        aux = torch.zeros_like(x)
    w, b = _params((512,), torch.float32, gen, bias=op.has_bias)
    y = as_tuple(op.fn(x, aux, 512, w, b, 1e-12))[0].detach()
    w, b = w.detach(), None if b is None else b.detach()
    y64 = as_tuple(op.ref(x.double(), aux, 512, w.double(), None if b is None else b.double(), 1e-12))[0]
    torch.testing.assert_close(y.double(), y64, atol=2e-3, rtol=2e-3)
    if "layer" in op.name:
        valid = aux if op.kind == "masked" else torch.ones_like(x, dtype=torch.bool)
        yn = ((y - (b if b is not None else 0)) / w)[valid.expand_as(x)]
        assert 0.5 < float(yn.std()) < 2.0  # normalized values really have unit scale


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_constant_rows_are_finite(backend, op):
    x = torch.full((4, 64), 3.25).requires_grad_()
    gen = torch.Generator().manual_seed(0)
    aux = make_aux(op, x.detach(), 1, gen)
    if op.kind == "add":
        aux = torch.full((4, 64), 0.75)
    w, b = _params((64,), torch.float32, gen, bias=op.has_bias)
    y = as_tuple(op.fn(x, aux, 64, w, b, 1e-5))[0]
    assert torch.isfinite(y).all()
    if "layer" in op.name and op.kind != "masked":
        torch.testing.assert_close(y, b.detach().expand_as(y))  # centered values are exactly 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("op", [o for o in OPS if o.kind == "masked"], ids=lambda o: o.name)
def test_masked_semantics(backend, op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 8, generator=gen).requires_grad_()
    # sample 0: first 4 time steps valid; sample 1: none valid; sample 2: all valid
    mask = torch.zeros(3, 6, 1, dtype=torch.bool)
    mask[0, :4] = True
    mask[2] = True
    w, b = _params((6, 8), torch.float32, gen, bias=op.has_bias)
    y = op.fn(x, mask, (6, 8), w, b, 1e-5)
    assert torch.isfinite(y).all()
    assert (y[0, 4:] == 0).all() and (y[1] == 0).all()
    # valid part equals the unmasked op applied to the valid elements only
    plain = OPS_BY_NAME[op.name.replace("masked_", "")]
    y0 = plain.fn(x[0, :4].detach(), None, (4, 8), w[:4].detach(), None if b is None else b[:4].detach(), 1e-5)
    assert_close(y[0, :4], y0)
    y2 = plain.fn(x[2].detach(), None, (6, 8), w.detach(), None if b is None else b.detach(), 1e-5)
    assert_close(y[2], y2)
    y.sum().backward()
    assert (x.grad[1] == 0).all() and (x.grad[0, 4:] == 0).all()
    assert torch.isfinite(x.grad).all()


def test_plain_ops_match_torch_functional(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 96, generator=gen)
    w = torch.randn(96, generator=gen)
    b = torch.randn(96, generator=gen)
    torch.testing.assert_close(normscope.layer_norm(x, 96, w, b), F.layer_norm(x, (96,), w, b))
    torch.testing.assert_close(normscope.rms_norm(x, 96, w), F.rms_norm(x, (96,), w))  # eps=None
    torch.testing.assert_close(normscope.rms_norm(x, 96, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6))
    torch.testing.assert_close(normscope.layer_norm(x, [96]), F.layer_norm(x, (96,)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_params(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 128, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(128, generator=gen).requires_grad_()  # float32 parameters
    b = torch.randn(128, generator=gen).requires_grad_()
    y = normscope.layer_norm(x, 128, w, b)
    assert y.dtype == dtype
    ref = normscope.ops.reference.layer_norm_ref(x.detach(), 128, w.detach(), b.detach())
    assert_close(y, ref)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    yr = normscope.rms_norm(x, 128, w)
    assert yr.dtype == dtype


@pytest.mark.parametrize("op", [o for o in OPS if o.kind == "add"], ids=lambda o: o.name)
def test_add_promotes_residual_stream(backend, op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen).to(torch.bfloat16).requires_grad_()  # sublayer output
    r = torch.randn(8, 64, generator=gen).requires_grad_()  # float32 residual stream
    w, b = _params((64,), torch.float32, gen, bias=op.has_bias)
    y, h = op.fn(x, r, 64, w, b, 1e-5)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, x.detach().float() + r.detach())
    (y.float().sum() + h.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    # dh of 1 flows straight through to both inputs on top of the norm's gradient
    yr, hr = op.ref(x.detach(), r.detach().requires_grad_(), 64, w.detach(),
                    None if b is None else b.detach(), 1e-5)
    assert_close(y, yr)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_deterministic(backend, op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(301, 257, generator=gen)
    aux = make_aux(op, x, 1, gen)
    w, b = _params((257,), torch.float32, gen, bias=op.has_bias)
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        y = as_tuple(op.fn(leaves[0], aux, 257, leaves[1], b, 1e-5))
        torch.autograd.backward(y, [torch.ones_like(t) * 0.5 for t in y])
        results.append([t.detach() for t in y] + [leaves[0].grad, leaves[1].grad])
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_zero_rows(backend, op):
    x = torch.empty(0, 3, 16, requires_grad=True)
    aux = make_aux(op, x.detach(), 1, torch.Generator().manual_seed(0))
    w = torch.ones(16, requires_grad=True)
    y = as_tuple(op.fn(x, aux, 16, w, None, 1e-5))
    assert all(t.shape == (0, 3, 16) for t in y)
    y[0].sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(16))
