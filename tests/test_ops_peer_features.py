"""What quack's and Liger's norms offer that users ask for: RMSNorm with a bias, per-head parameters of shape
(H, D) normalized over D only (quack's rmsnorm_qk), and the statistics returned (mean / rstd). Checked against
per-head loops over torch's own ops, in float64 with gradcheck, in bfloat16 for one rounding, on every backend
this machine runs (cpu, reference, and triton through the interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope.errors import ShapeError

B, T, H, D = 2, 3, 4, 16


def _loop_rms(x, w, b, eps):
    return torch.stack([F.rms_norm(x[..., h, :], (D,), w[h], eps) + (0 if b is None else b[h])
                        for h in range(x.shape[-2])], -2)


def _loop_ln(x, w, b, eps):
    return torch.stack([F.layer_norm(x[..., h, :], (D,), w[h], None if b is None else b[h], eps)
                        for h in range(x.shape[-2])], -2)


@pytest.fixture(params=["cpu", "reference"])
def backend(request, monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", request.param)
    return request.param


def test_rms_norm_with_bias_matches_torch_plus_bias(backend):
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 7, 48), torch.randn(48), torch.randn(48)
    torch.testing.assert_close(normscope.rms_norm(x, 48, w, 1e-6, bias=b), F.rms_norm(x, (48,), w, 1e-6) + b)
    y, h = normscope.add_rms_norm(x, x, 48, w, 1e-6, bias=b)
    torch.testing.assert_close(y, F.rms_norm(2 * x, (48,), w, 1e-6) + b)
    mask = torch.rand(5, 7, 48) > 0.3
    got = normscope.masked_rms_norm(x, mask, 48, w, 1e-6, bias=b)
    ref = normscope.masked_rms_norm(x, mask, 48, w, 1e-6) + b * mask  # padded positions stay 0
    torch.testing.assert_close(got, ref)


def test_rms_norm_with_bias_gradcheck_float64(backend):
    torch.manual_seed(1)
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: normscope.rms_norm(x, 10, w, 1e-6, bias=b), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: normscope.rms_norm(x, 10, w, 1e-6, bias=b), (x, w, b))


@pytest.mark.parametrize("rms", [True, False])
def test_per_head_parameters_equal_a_loop_over_heads(backend, rms):
    torch.manual_seed(2)
    x = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(H, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(H, D, dtype=torch.float64, requires_grad=True)
    if rms:
        fn = lambda x, w, b: normscope.rms_norm(x, D, w, 1e-6, bias=b)  # noqa: E731
        ref = lambda x, w, b: _loop_rms(x, w, b, 1e-6)  # noqa: E731
    else:
        fn = lambda x, w, b: normscope.layer_norm(x, D, w, b)  # noqa: E731
        ref = lambda x, w, b: _loop_ln(x, w, b, 1e-5)  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), ref(x, w, b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_per_head_bfloat16_rounds_once():
    torch.manual_seed(3)
    x = torch.randn(8, H, D).bfloat16()
    w = (torch.randn(H, D) * 0.1).bfloat16()
    got = normscope.rms_norm(x, D, w, offset=1.0)  # Gemma-style per-head QK-norm
    want = (F.rms_norm(x.float(), (D,)) * (w.float() + 1.0)).bfloat16()  # float32 math, one rounding
    assert torch.equal(got, want)


def test_per_head_under_forward_ad_and_with_a_residual():
    torch.manual_seed(4)
    x, r, w = torch.randn(B, H, D), torch.randn(B, H, D), torch.randn(H, D)
    t = torch.randn_like(x)
    _, tan = torch.func.jvp(lambda v: normscope.rms_norm(v, D, w), (x,), (t,))
    _, want = torch.func.jvp(lambda v: _loop_rms(v, w, None, torch.finfo(torch.float32).eps), (x,), (t,))
    torch.testing.assert_close(tan, want, rtol=1e-5, atol=1e-5)
    y, h = normscope.add_layer_norm(x, r, D, w)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, _loop_ln(x + r, w, None, 1e-5))


def test_return_stats(backend):
    torch.manual_seed(5)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y, mean, rstd = normscope.layer_norm(x, 32, return_stats=True)
    assert mean.shape == rstd.shape == (3, 5) and mean.dtype == rstd.dtype == torch.float32
    assert not mean.requires_grad and not rstd.requires_grad
    torch.testing.assert_close(mean, x.detach().mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.detach().var(-1, correction=0) + 1e-5))
    torch.testing.assert_close(y, F.layer_norm(x, (32,)))
    y.sum().backward()  # y stays differentiable
    y2, rstd2 = normscope.rms_norm(x.bfloat16(), 32, eps=1e-6, return_stats=True)
    torch.testing.assert_close(rstd2, torch.rsqrt(x.detach().bfloat16().float().square().mean(-1) + 1e-6))
    _, _, rstd3 = normscope.layer_norm(x.detach().double().view(3, 5, 4, 8), 8, torch.ones(4, 8, dtype=torch.float64),
                                       return_stats=True)  # per-head: the statistics of each head's rows
    assert rstd3.shape == (3, 5, 4) and rstd3.dtype == torch.float64


def test_triton_backend_through_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NORMSCOPE_BACKEND", "triton")
    torch.manual_seed(6)
    x, w, b = torch.randn(4, H, D), torch.randn(H, D), torch.randn(D)
    torch.testing.assert_close(normscope.rms_norm(x, D, w, 1e-6, bias=b), _loop_rms(x, w, b.expand(H, D), 1e-6))
    y, rstd = normscope.rms_norm(x, D, w[0], 1e-6, bias=b, return_stats=True)
    torch.testing.assert_close(y, F.rms_norm(x, (D,), w[0], 1e-6) + b)
    torch.testing.assert_close(rstd, torch.rsqrt(x.square().mean(-1) + 1e-6))


def test_module_with_bias_and_errors():
    torch.manual_seed(7)
    m = normscope.nn.RMSNorm(12, eps=1e-6, bias=True)
    assert m.bias is not None and torch.equal(m.bias, torch.zeros(12)) and "bias=True" in repr(m)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(3, 12)
    torch.testing.assert_close(m(x), F.rms_norm(x, (12,), m.weight, 1e-6) + m.bias)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
    assert normscope.nn.RMSNorm(12).bias is None
    assert set(normscope.nn.RMSNorm(12, bias=True).state_dict()) == {"weight", "bias"}
    with pytest.raises(ShapeError, match="per-head weight"):
        normscope.rms_norm(torch.randn(2, 3, D), D, torch.randn(H, D))
    with pytest.raises(ShapeError, match="same shape as normalized_shape"):
        normscope.rms_norm(torch.randn(2, 3, D), D, bias=torch.randn(D + 1))
    with pytest.raises(ShapeError):
        normscope.masked_rms_norm(torch.randn(2, H, D), torch.ones(2, H, D, dtype=torch.bool), D,
                                  torch.randn(H, D))  # per-head parameters are not taken by the masked ops
