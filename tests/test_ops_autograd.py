"""The public ops under every autograd transform that torch's own norms support.

Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``), double backward
(gradient penalties, ``gradgradcheck``, ``hessian``), the ``torch.func`` transforms (``grad``,
``jacrev``, ``vmap`` and per-sample gradients), ExpandedWeights per-sample gradients, and an empty
``normalized_shape``. Values are compared with torch's own ops or the plain-PyTorch reference,
whose derivatives come from autograd through ordinary torch ops.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import normscope
from helpers import OPS, as_tuple, make_aux

D = 6  # normalized size: small, so that float64 gradchecks stay fast


def _inputs(op, dtype=torch.float64, shape=(3, 4, D), weight=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    aux = make_aux(op, x, 1, gen)
    w = (torch.randn(D, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype) if weight else None
    b = (torch.randn(D, generator=gen, dtype=torch.float64) * 0.1).to(dtype) if bias and op.has_bias else None
    return x, aux, w, b


def _fn(op, reference=False):
    """``f(x, aux, w, b) -> tuple of outputs`` for the op (or its reference), eps 1e-5."""
    call = op.ref if reference else op.fn

    def f(x, aux, w, b):
        return as_tuple(call(x, aux, D, w, b, 1e-5))

    return f


def _first(f):
    return lambda *a: f(*a)[0]


# ---------------------------------------------------------------------------------------------
# Forward-mode AD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_func_jvp_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 5, 8, generator=gen).to(dtype), torch.randn(2, 5, 8, generator=gen).to(dtype)
    w, tw = torch.randn(8, generator=gen).to(dtype), torch.randn(8, generator=gen).to(dtype)
    b, tb = torch.randn(8, generator=gen).to(dtype), torch.randn(8, generator=gen).to(dtype)
    for ours, theirs, args, tangents in [
        (lambda a: normscope.layer_norm(a, 8), lambda a: F.layer_norm(a, (8,)), (x,), (t,)),
        (lambda a, c, d: normscope.layer_norm(a, 8, c, d), lambda a, c, d: F.layer_norm(a, (8,), c, d),
         (x, w, b), (t, tw, tb)),
        (lambda a, c: normscope.rms_norm(a, 8, c, 1e-6), lambda a, c: F.rms_norm(a, (8,), c, 1e-6),
         (x, w), (t, tw)),
    ]:
        out, tangent = torch.func.jvp(ours, args, tangents)
        e_out, e_tangent = torch.func.jvp(theirs, args, tangents)
        torch.testing.assert_close(out, e_out)
        torch.testing.assert_close(tangent, e_tangent)
        assert tangent.abs().max() > 0.1


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_forward_ad_dual_level_matches_reference(op):
    x, aux, w, b = _inputs(op)
    gen = torch.Generator().manual_seed(1)
    tx, tw = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(D, generator=gen, dtype=x.dtype)
    results = []
    for f in (_fn(op), _fn(op, reference=True)):
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, tx), aux, fwAD.make_dual(w, tw), b)
            results.append([(fwAD.unpack_dual(o).primal, fwAD.unpack_dual(o).tangent) for o in out])
    for (p, t), (ep, et) in zip(*results):
        torch.testing.assert_close(p, ep)
        assert t is not None
        torch.testing.assert_close(t, et)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_jacfwd_equals_jacrev_equals_reference(op):
    x, aux, w, b = _inputs(op, shape=(2, 3, D))
    f = _first(_fn(op))
    fr = _first(_fn(op, reference=True))
    jf = torch.func.jacfwd(f, argnums=(0, 2))(x, aux, w, b)
    jr = torch.func.jacrev(f, argnums=(0, 2))(x, aux, w, b)
    je = torch.func.jacrev(fr, argnums=(0, 2))(x, aux, w, b)
    for a, c, e in zip(jf, jr, je):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(c, e)
    assert jf[0].abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# gradcheck, gradgradcheck, forward-AD gradcheck (float64) for all six ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_gradcheck_gradgradcheck_forward_ad(op, affine):
    x, aux, w, b = _inputs(op, shape=(3, 2, D), weight=affine != "none", bias=affine == "weight+bias")
    leaves = [x.requires_grad_()]
    if op.kind == "add":
        aux.requires_grad_()
    if w is not None:
        leaves.append(w.requires_grad_())
    if b is not None:
        leaves.append(b.requires_grad_())
    f = _fn(op)
    args = (x, aux, w, b)
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(f, args)


def test_offset_under_forward_ad_and_double_backward():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    t, tw = torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    out, tangent = torch.func.jvp(lambda a, c: normscope.rms_norm(a, 8, c, 1e-6, offset=1.0), (x, w), (t, tw))
    e_out, e_tangent = torch.func.jvp(lambda a, c: F.rms_norm(a, (8,), c + 1, 1e-6), (x, w), (t, tw))
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(tangent, e_tangent)
    args = (x.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradgradcheck(lambda a, c: normscope.layer_norm(a, 8, c, offset=1.0), args)


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_gradient_penalty_matches_reference(op, dtype):
    results = []
    for reference in (False, True):
        x, aux, w, b = _inputs(op, dtype=dtype, seed=3)
        x.requires_grad_()
        w.requires_grad_()
        y = _fn(op, reference)(x, aux, w, b)[0]
        (gx,) = torch.autograd.grad(y.float().sin().sum(), x, create_graph=True)
        penalty = gx.float().square().sum()
        penalty.backward()
        results.append((gx.detach(), x.grad, w.grad))
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, e in zip(*results):
        torch.testing.assert_close(a.float(), e.float(), **tol)


@pytest.mark.parametrize("op", OPS[:2], ids=lambda o: o.name)
def test_hessian_matches_reference(op):
    x, aux, w, b = _inputs(op, shape=(2, D))

    def scalar(fn):
        return lambda xx: fn(xx, aux, w, b)[0].sin().sum()

    h = torch.func.hessian(scalar(_fn(op)))(x)
    e = torch.func.hessian(scalar(_fn(op, reference=True)))(x)
    torch.testing.assert_close(h, e)
    # the same Hessian from two plain reverse passes (the custom op's backward, differentiated)
    h2 = torch.autograd.functional.hessian(scalar(_fn(op)), x)
    torch.testing.assert_close(h2, e)


# ---------------------------------------------------------------------------------------------
# torch.func: grad, vmap, per-sample gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_func_grad_matches_autograd(op):
    x, aux, w, b = _inputs(op, dtype=torch.float32)

    def loss(xx, ww):
        return _fn(op)(xx, aux, ww, b)[0].square().sum()

    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, w)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    ex, ew = torch.autograd.grad(loss(xx, ww), (xx, ww))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_vmap_matches_loop_without_fallback_warning(op):
    x, aux, w, b = _inputs(op, dtype=torch.float32, shape=(5, 3, D))
    aux_dim = None if aux is None else 0
    f = _fn(op)
    enabled = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)  # the slow per-sample loop raises instead
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = torch.func.vmap(f, in_dims=(0, aux_dim, None, None))(x, aux, w, b)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(enabled)
    for i in range(x.shape[0]):
        expected = f(x[i], None if aux is None else aux[i], w, b)
        for o, e in zip(out, expected):
            torch.testing.assert_close(o[i], e)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_per_sample_gradients_vmap_grad(op):
    x, aux, w, b = _inputs(op, dtype=torch.float32, shape=(4, 3, D))
    b = None if b is None else b.clone()

    def loss(ww, bb, xx, aa):
        return _fn(op)(xx.unsqueeze(0), None if aa is None else aa.unsqueeze(0), ww, bb)[0].square().sum()

    argnums = (0, 1) if b is not None else (0,)
    aux_dim = None if aux is None else 0
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=argnums), in_dims=(None, None, 0, aux_dim))(
        w, b, x, aux
    )
    for i in range(x.shape[0]):
        leaves = [w.clone().requires_grad_()] + ([b.clone().requires_grad_()] if b is not None else [])
        val = loss(leaves[0], leaves[1] if b is not None else None, x[i], None if aux is None else aux[i])
        expected = torch.autograd.grad(val, leaves)
        for g, e in zip(per_sample, expected):
            torch.testing.assert_close(g[i], e)


@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_expanded_weights_per_sample_grads(module):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    torch.manual_seed(0)
    norm = getattr(normscope.nn, module)(D)
    with torch.no_grad():
        norm.weight.add_(torch.randn(D) * 0.3)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), norm)
    x = torch.randn(4, 3, D)
    out = call_for_per_sample_grads(model)(x)
    out.square().sum().backward()
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i : i + 1]).square().sum().backward()
        for name, p in params.items():
            torch.testing.assert_close(p.grad_sample[i], p.grad, msg=name)


class _OpModule(torch.nn.Module):
    """One op with its own weight (and bias); residual and mask derived per sample from the input."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.randn(D) * 0.3 + 1)
        self.bias = torch.nn.Parameter(torch.randn(D) * 0.1) if op.has_bias else None

    def forward(self, x):
        aux = {"plain": None, "add": x.flip(-1), "masked": x[..., :1] > -0.5}[self.op.kind]
        return _fn(self.op)(x, aux, self.weight, self.bias)[0]


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_expanded_weights_every_op(op):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), _OpModule(op))
    x = torch.randn(4, 5, D)
    call_for_per_sample_grads(model)(x).sin().sum().backward()
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i : i + 1]).sin().sum().backward()
        for name, p in params.items():
            torch.testing.assert_close(p.grad_sample[i], p.grad, msg=name)


# ---------------------------------------------------------------------------------------------
# Edge cases and the fast path
# ---------------------------------------------------------------------------------------------


def test_empty_normalized_shape_matches_torch():
    x = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(0, requires_grad=True)
    y = normscope.layer_norm(x, (0,), w, torch.randn(0))
    e = F.layer_norm(x, (0,), w)
    assert y.shape == e.shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0)
    assert normscope.rms_norm(x, (0,)).shape == F.rms_norm(x, (0,)).shape
    y, h = normscope.add_rms_norm(x, torch.randn(3, 0), 0)
    assert y.shape == h.shape == (3, 0)
    assert normscope.masked_layer_norm(torch.randn(2, 3, 0), torch.ones(2, 3, 1, dtype=torch.bool), 0).shape == (
        2, 3, 0)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_calls_keep_the_custom_ops():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    with _RecordOps() as rec:
        y = normscope.layer_norm(x, 16, w)
        y.sum().backward()
    assert any("normscope.norm_fwd" in n for n in rec.names), rec.names
    assert any("normscope.norm_bwd" in n for n in rec.names), rec.names


def test_compiled_backward_keeps_the_custom_op():
    from functorch.compile import aot_function, make_boxed_func

    codes = []

    def compiler(gm, example_inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    f = aot_function(lambda x, w: normscope.layer_norm(x, 16, w).sin().sum(), fw_compiler=compiler,
                     bw_compiler=compiler)
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    f(x, w).backward()
    assert len(codes) == 2
    assert "normscope.norm_fwd" in codes[0] and "normscope.norm_bwd" in codes[1], codes
