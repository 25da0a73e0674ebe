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


def _torch_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with torch's own norms (weight_offset folded into the weight), for the transforms."""
    twin = torch.nn.Sequential()
    for m in model:
        if isinstance(m, RMSNorm):
            t = torch.nn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, dtype=torch.float64)
            if m.weight is not None:
                with torch.no_grad():
                    t.weight.copy_(m.weight + m.weight_offset)
            m = t
        elif isinstance(m, LayerNorm):
            t = torch.nn.LayerNorm(m.normalized_shape, m.eps, bias=m.bias is not None, dtype=torch.float64)
            t.load_state_dict(m.state_dict())
            m = t
        twin.append(m)
    return twin


def test_scripted_modules_under_forward_ad_and_torch_func_transforms():
    # the scripted forward calls normscope::norm_fwd, which has no forward-AD rule (torch.func.jvp gave a zero
    # tangent, forward_ad / grad / jacrev raised): under a transform it runs torch's differentiable ops
    import torch.autograd.forward_ad as fwAD

    model = _model().double()
    twin = _torch_twin(model)
    scripted = torch.jit.script(model)
    g = torch.Generator().manual_seed(3)
    x, t = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for _ in range(3):  # past TorchScript's profiling runs, after which it optimizes the graph
        scripted(x)
    results = {
        "jvp": (torch.func.jvp(scripted, (x,), (t,))[1], torch.func.jvp(twin, (x,), (t,))[1]),
        "grad": (torch.func.grad(lambda a: scripted(a).pow(2).sum())(x),
                 torch.func.grad(lambda a: twin(a).pow(2).sum())(x)),
        "jacrev": (torch.func.jacrev(scripted)(x), torch.func.jacrev(twin)(x)),
        "jacfwd": (torch.func.jacfwd(scripted)(x), torch.func.jacfwd(twin)(x)),
        "vmap": (torch.func.vmap(scripted)(x), torch.func.vmap(twin)(x)),
        "hessian": (torch.func.hessian(lambda a: scripted(a).pow(3).sum())(x[0]),
                    torch.func.hessian(lambda a: twin(a).pow(3).sum())(x[0])),
    }
    with fwAD.dual_level():
        results["forward_ad"] = (fwAD.unpack_dual(scripted(fwAD.make_dual(x, t))).tangent,
                                 fwAD.unpack_dual(twin(fwAD.make_dual(x, t))).tangent)
    for name, (ours, ref) in results.items():
        assert ours is not None and ref.abs().max() > 0.1, name
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12, msg=name)
    # outside the transforms the scripted model still runs normscope's op (same values as eager normscope)
    assert _uses_normscope_op(scripted)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


def test_the_op_itself_under_forward_mode_ad_raises_instead_of_a_zero_tangent():
    # a traced model records normscope::norm_fwd itself; under torch.func.jvp the op gave a zero tangent
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    traced = torch.jit.trace(LayerNorm(8).double(), x)
    # (the TorchScript interpreter re-raises it as a RuntimeError carrying the message)
    with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
        torch.func.jvp(traced, (x,), (t,))
    with pytest.raises(NotImplementedError, match="no forward-mode AD formula"):
        torch.func.jvp(lambda a: torch.ops.normscope.norm_fwd(a, None, None, None, None, 1e-5, False, None)[0],
                       (x,), (t,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD formula"):
        torch.ops.normscope.norm_fwd(fwAD.make_dual(x, t), None, None, None, None, 1e-5, True, None)


def test_script_layernorm2d_and_a_converted_channels_first_model():
    import zoo

    torch.manual_seed(4)
    ours = normscope.nn.LayerNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    x = torch.randn(2, 6, 5, 4)
    scripted = torch.jit.script(ours)
    assert _uses_normscope_op(scripted)
    torch.testing.assert_close(scripted(x), ours(x), rtol=1e-6, atol=1e-6)
    # a model with timm's LayerNorm2d scripts before convert; after convert it still does
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), zoo.LayerNorm2d(6), torch.nn.GELU())
    ref = torch.jit.script(model)(torch.randn(1, 3, 2, 2))
    assert ref.shape == (1, 6, 2, 2)
    assert [r.replacement for r in normscope.convert(model)] == ["LayerNorm2d"]
    xi = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(torch.jit.script(model)(xi), model(xi), rtol=1e-6, atol=1e-6)
