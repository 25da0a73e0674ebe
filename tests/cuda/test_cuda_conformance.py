"""The drop-in guarantees of the ops on a real CUDA device (the Triton backend): forward-mode AD, double backward,
vmap / per-sample gradients, Gemma's weight offset in float32, NaN in masked padding, output memory format,
RMSNorm with a bias and per-head parameters, returned statistics, empty rows, and the accuracy of the weight
gradient over many rows. The CPU suite checks the same on CPU tensors (the Triton kernels under the interpreter);
here the compiled kernels run. Collected only where CUDA is available (see tests/conftest.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import normscope
from normscope import functional as F
from normscope.ops import dispatch

DEV = "cuda"
N = 256


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(DEV)


def test_inputs_take_the_triton_backend():
    assert dispatch.backend_name(_randn(4, N)) == "triton"


def test_forward_ad_matches_torch():
    x, t = _randn(4, 7, N, seed=0), _randn(4, 7, N, seed=1)
    w, tw = _randn(N, seed=2), _randn(N, seed=3)
    b, tb = _randn(N, seed=4), _randn(N, seed=5)
    for ours, theirs, args, tangents in [
        (lambda a, c, d: normscope.layer_norm(a, N, c, d), lambda a, c, d: TF.layer_norm(a, (N,), c, d),
         (x, w, b), (t, tw, tb)),
        (lambda a, c: normscope.rms_norm(a, N, c, 1e-6), lambda a, c: TF.rms_norm(a, (N,), c, 1e-6),
         (x, w), (t, tw)),
    ]:
        out, tangent = torch.func.jvp(ours, args, tangents)
        e_out, e_tangent = torch.func.jvp(theirs, args, tangents)
        torch.testing.assert_close(out, e_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tangent, e_tangent, atol=1e-4, rtol=1e-4)
        assert tangent.abs().max() > 0.1


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradient_penalty_matches_torch(rms):
    """Double backward: the gradient of a gradient norm, as in a gradient penalty."""
    results = []
    for ours in (True, False):
        x = _randn(16, N, seed=6).requires_grad_()
        w = _randn(N, seed=7, scale=0.5, shift=1.0).requires_grad_()
        if rms:
            y = normscope.rms_norm(x, N, w, 1e-6) if ours else TF.rms_norm(x, (N,), w, 1e-6)
        else:
            y = normscope.layer_norm(x, N, w) if ours else TF.layer_norm(x, (N,), w)
        (gx,) = torch.autograd.grad(y.square().sum() + y.sum(), x, create_graph=True)
        gx.square().sum().backward()
        results.append((x.grad, w.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-3, rtol=1e-3)
        assert e.abs().max() > 0


def test_per_sample_gradients_with_vmap_grad():
    w = _randn(N, seed=8, scale=0.5, shift=1.0)
    b = _randn(N, seed=9)
    xs = _randn(6, 5, N, seed=10)

    def loss(weight, bias, x):
        return normscope.layer_norm(x, N, weight, bias).square().mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap must not fall back to a slow per-sample loop with a warning
        gw, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, xs)
    for i in range(xs.shape[0]):
        ew, eb = torch.func.grad(lambda a, c: TF.layer_norm(xs[i], (N,), a, c).square().mean(), argnums=(0, 1))(w, b)
        torch.testing.assert_close(gw[i], ew, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gb[i], eb, atol=1e-5, rtol=1e-4)


_OFFSET_OPS = {
    "layer_norm": lambda x, r, m, w: F.layer_norm(x, N, w, None, 1e-5, offset=1.0),
    "rms_norm": lambda x, r, m, w: F.rms_norm(x, N, w, 1e-6, offset=1.0),
    "add_layer_norm": lambda x, r, m, w: F.add_layer_norm(x, r, N, w, None, 1e-5, offset=1.0)[0],
    "add_rms_norm": lambda x, r, m, w: F.add_rms_norm(x, r, N, w, 1e-6, offset=1.0)[0],
    "masked_layer_norm": lambda x, r, m, w: F.masked_layer_norm(x, m, N, w, None, 1e-5, offset=1.0),
    "masked_rms_norm": lambda x, r, m, w: F.masked_rms_norm(x, m, N, w, 1e-6, offset=1.0),
}


@pytest.mark.parametrize("op", sorted(_OFFSET_OPS))
def test_offset_is_added_to_a_bfloat16_weight_in_float32(op):
    """Gemma: x_hat * (1 + weight.float()); rounding 1 + weight to bfloat16 first errs by ~1e-2."""
    x, r = _randn(32, N, seed=11, scale=2.0), _randn(32, N, seed=12)
    mask = _randn(32, N, seed=13) > -0.5
    w = _randn(N, seed=14, scale=0.5).bfloat16()
    fn = _OFFSET_OPS[op]
    got = fn(x, r, mask, w)
    want = fn(x.double(), r.double(), mask, w.double())  # the exact float64 result of the same op
    assert got.dtype == torch.float32
    err = float((got.double() - want).abs().max())
    assert err < 1e-4, err


def test_masked_padding_holding_nan_and_inf_is_ignored():
    x = _randn(8, 64, N, seed=15)
    mask = _randn(8, 64, N, seed=16) > 0.0
    w, b = _randn(N, seed=17), _randn(N, seed=18)
    clean = x.masked_fill(~mask, 0.0)
    poisoned = x.masked_fill(~mask, float("nan"))
    poisoned[:, ::2] = poisoned[:, ::2].masked_fill(~mask[:, ::2], float("inf"))
    for fn in (lambda v: F.masked_layer_norm(v, mask, N, w, b), lambda v: F.masked_rms_norm(v, mask, N, w)):
        got, want = fn(poisoned), fn(clean)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_channels_last_output_and_gradients_follow_torch(kind):
    x = _randn(2, 8, 4, N, seed=19).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours = (normscope.nn.RMSNorm(N, eps=1e-6) if kind == "rms" else normscope.nn.LayerNorm(N)).to(DEV)
    theirs = (torch.nn.RMSNorm(N, eps=1e-6) if kind == "rms" else torch.nn.LayerNorm(N)).to(DEV)
    theirs.load_state_dict(ours.state_dict())
    y, e = ours(x), theirs(x)
    assert y.stride() == e.stride()
    torch.testing.assert_close(y, e, atol=1e-5, rtol=1e-5)
    dy = _randn(2, 8, 4, N, seed=20)
    (gx,) = torch.autograd.grad(y, x, dy)
    (ex,) = torch.autograd.grad(e, x, dy)
    torch.testing.assert_close(gx, ex, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_with_bias_and_per_head_weights(dtype):
    H, D = 8, 128
    x = _randn(4, 16, H, D, seed=21, dtype=dtype).requires_grad_()
    w = _randn(H, D, seed=22, dtype=dtype, scale=0.5, shift=1.0).requires_grad_()
    b = _randn(H, D, seed=23, dtype=dtype).requires_grad_()
    y = normscope.rms_norm(x, D, w, 1e-6, bias=b)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = torch.stack([TF.rms_norm(xr[..., h, :], (D,), wr[h], 1e-6) + br[h] for h in range(H)], -2)
    dy = _randn(*y.shape, seed=24)
    grads = torch.autograd.grad(y, (x, w, b), dy.to(dtype))
    grads_r = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((y.detach().double() - yr).abs().max()) < tol * 10
    for g, gr in zip(grads, grads_r):
        assert float((g.double() - gr).abs().max()) < tol * 10 * max(1.0, float(gr.abs().max()))


def test_returned_statistics():
    x = _randn(3, 5, N, seed=25, scale=2.0, shift=0.5)
    y, mean, rstd = normscope.layer_norm(x, N, return_stats=True)
    assert mean.shape == rstd.shape == (3, 5) and mean.dtype == torch.float32 and mean.device == x.device
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, correction=0) + 1e-5))
    torch.testing.assert_close(y, TF.layer_norm(x, (N,)), atol=1e-5, rtol=1e-5)
    _, rstd2 = normscope.rms_norm(x.bfloat16(), N, eps=1e-6, return_stats=True)
    torch.testing.assert_close(rstd2, torch.rsqrt(x.bfloat16().float().square().mean(-1) + 1e-6))


def test_empty_rows_and_empty_normalized_shape():
    x = torch.randn(3, 0, device=DEV, requires_grad=True)
    y = normscope.layer_norm(x, (0,), torch.randn(0, device=DEV), torch.randn(0, device=DEV))
    assert y.shape == TF.layer_norm(x, (0,)).shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0)
    assert normscope.rms_norm(torch.randn(0, 5, N, device=DEV), N).shape == (0, 5, N)


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_weight_grad_accuracy_many_rows(rms):
    M, n = 65536, 64
    x, dy, w = _randn(M, n, seed=26), _randn(M, n, seed=27), _randn(n, seed=28)
    tfn = (lambda x, w: TF.rms_norm(x, (n,), w, 1e-6)) if rms else (lambda x, w: TF.layer_norm(x, (n,), w, None, 1e-6))
    nfn = (lambda x, w: F.rms_norm(x, n, w, 1e-6)) if rms else (lambda x, w: F.layer_norm(x, n, w, None, 1e-6))

    def grad_w(fn, dtype):
        wv = w.to(dtype).requires_grad_()
        return torch.autograd.grad(fn(x.to(dtype), wv), wv, dy.to(dtype))[0].double()

    exact = grad_w(tfn, torch.float64)
    assert exact.abs().max() > 100
    torch_err = float((grad_w(tfn, torch.float32) - exact).abs().max())
    our_err = float((grad_w(nfn, torch.float32) - exact).abs().max())
    assert our_err <= 2 * torch_err, (our_err, torch_err)


def test_compiled_offset_module_matches_eager():
    m = normscope.nn.RMSNorm(N, eps=1e-6, weight_offset=1.0).to(DEV, torch.bfloat16)
    with torch.no_grad():
        m.weight.normal_(0, 0.5)
    x = _randn(64, N, seed=29, dtype=torch.bfloat16)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x))
