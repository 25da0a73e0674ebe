"""``torch.jit.script`` / ``torch.jit.trace`` of models containing normscope's modules.

The scripted forward calls ``normscope::norm_fwd`` (autograd included); results and gradients must
equal eager mode's, and a saved module must load and run in a fresh process that imports normscope.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import normscope
from normscope.nn import LayerNorm, RMSNorm


class LlamaStyleRMSNorm(torch.nn.Module):
    """A Hugging Face style RMSNorm, which :func:`normscope.convert` replaces."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8),
        LayerNorm(8),
        RMSNorm(8, eps=1e-6, weight_offset=1.0),
        RMSNorm(8, elementwise_affine=False),
        torch.nn.Unflatten(-1, (2, 4)),
        LayerNorm((2, 4), bias=False),
        torch.nn.Flatten(-2),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _grads(model, x):
    x = x.detach().requires_grad_()
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    leaves = [x, *model.parameters()]
    return y, torch.autograd.grad(y, leaves, dy)


def _assert_same(ref, other, x):
    y, g = _grads(ref, x)
    y2, g2 = _grads(other, x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for a, b in zip(g2, g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _uses_normscope_op(scripted) -> bool:
    return "normscope::norm_fwd" in str(scripted.inlined_graph)


def test_script_matches_eager_with_gradients():
    model = _model()
    scripted = torch.jit.script(model)
    assert _uses_normscope_op(scripted)
    _assert_same(model, scripted, torch.randn(4, 3, 8))
    _assert_same(model, scripted, torch.randn(8))  # no batch dims


def test_script_mixed_precision_and_layouts():
    ln = LayerNorm(8)  # float32 parameters, bfloat16 activations
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.jit.script(ln)(x), ln(x), rtol=0, atol=0)
    rms = RMSNorm(6)
    x = torch.randn(2, 5, 3, 6).to(memory_format=torch.channels_last)
    y, ys = rms(x), torch.jit.script(rms)(x)
    torch.testing.assert_close(ys, y, rtol=0, atol=0)
    assert ys.stride() == y.stride()
    empty = torch.randn(0, 8)
    assert torch.jit.script(LayerNorm(8))(empty).shape == (0, 8)


def test_script_rms_eps_none_is_torchs_default():
    rms = RMSNorm(8)  # eps=None: float32's epsilon (float64's for float64), as torch
    scripted = torch.jit.script(rms)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(3, 8, dtype=dtype) * 1e-4  # small rows, where eps matters
        torch.testing.assert_close(scripted(x), rms(x), rtol=0, atol=0)
        torch.testing.assert_close(scripted(x), torch.nn.functional.rms_norm(x, (8,)))


def test_script_after_convert():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8), LlamaStyleRMSNorm(8)
    )
    x = torch.randn(3, 8)
    expected = model(x)
    result = normscope.convert(model)
    assert len(result) == 3
    scripted = torch.jit.script(model)
    assert _uses_normscope_op(scripted)
    torch.testing.assert_close(scripted(x), expected)
    _assert_same(model, scripted, x)


def test_scripted_errors_are_torchs():
    scripted = torch.jit.script(torch.nn.Sequential(LayerNorm(8)))
    theirs = torch.jit.script(torch.nn.Sequential(torch.nn.LayerNorm(8)))
    for bad, exc in ((torch.randn(2, 7), RuntimeError), (torch.ones(2, 8, dtype=torch.long), RuntimeError)):
        with pytest.raises(exc) as e_theirs:
            theirs(bad)
        with pytest.raises(type(e_theirs.value), match=r"Given normalized_shape=\[8\]|mixed dtype") as e_ours:
            scripted(bad)
        assert type(e_ours.value) is type(e_theirs.value)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        torch.jit.script(RMSNorm(8))(torch.ones(2, 8, dtype=torch.long))


def test_trace_matches_eager_and_generalizes_over_batch_dims():
    model = _model()
    x = torch.randn(4, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    assert _uses_normscope_op(traced)
    _assert_same(model, traced, x)
    _assert_same(model, traced, torch.randn(7, 2, 8))  # other batch dims than the traced ones


def test_save_and_load_in_a_fresh_process(tmp_path):
    model = _model()
    x = torch.randn(4, 3, 8)
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "traced.pt")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch, normscope\n"
        "d = sys.argv[1]\n"
        "io = torch.load(d + '/io.pt')\n"
        "for name in ('scripted', 'traced'):\n"
        "    m = torch.jit.load(d + '/' + name + '.pt')\n"
        "    x = io['x'].clone().requires_grad_()\n"
        "    y = m(x)\n"
        "    torch.testing.assert_close(y, io['y'], rtol=0, atol=0)\n"
        "    y.sum().backward()\n"
        "    assert x.grad is not None and bool(torch.isfinite(x.grad).all())\n"
        "    assert 'normscope::norm_fwd' in str(m.inlined_graph)\n"
        "print('LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LOADED"
    # without normscope imported the op is unknown: the documented reason to import it first
    bare = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.jit.load({str(tmp_path / 'scripted.pt')!r})"],
        capture_output=True, text=True,
    )
    assert bare.returncode != 0 and "normscope" in bare.stderr
