"""PyTorch's own ModuleInfo samples for ``nn.LayerNorm`` / ``nn.RMSNorm``, run on normscope.nn.

Each sample's constructor arguments build torch's module and normscope's, with the same parameters;
outputs and gradients must match (tolerances by dtype), normscope's module must pass ``gradcheck``
(reverse and forward mode) and ``gradgradcheck`` in float64, and the module-level behaviours that
torch's ``test_modules.py`` checks must hold: state-dict keys, repr, ``reset_parameters``,
``to(dtype)``, factory kwargs, pickling / deepcopy, non-contiguous and channels-last inputs,
train / eval, TorchScript.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import normscope

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="torch.testing._internal needs expecttest and hypothesis: pip install 'normscope[dev]'",
)

OURS = {torch.nn.LayerNorm: normscope.nn.LayerNorm, torch.nn.RMSNorm: normscope.nn.RMSNorm}
MODULEINFOS = [m for m in common_modules.module_db if m.module_cls in OURS]
ids = lambda m: m.name  # noqa: E731


def test_both_moduleinfos_are_found():
    assert sorted(m.module_cls.__name__ for m in MODULEINFOS) == ["LayerNorm", "RMSNorm"]


def _samples(mi, dtype, requires_grad=True):
    samples = list(mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=requires_grad, training=True))
    assert len(samples) >= 6
    return samples


def _pair(mi, sample, dtype):
    """torch's module and normscope's, built from the sample's constructor input, same parameters."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = mi.module_cls(*args, **kwargs, device="cpu", dtype=dtype)
    ours = OURS[mi.module_cls](*args, **kwargs, device="cpu", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():  # not the ones / zeros of a fresh module
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _input(sample):
    (x,) = sample.forward_input.args
    assert not sample.forward_input.kwargs
    return x


def _tol(dtype):
    # bfloat16: one rounding of a float32 result may land one ulp apart (2**-8 relative)
    return dict(rtol=8e-3, atol=8e-3) if dtype == torch.bfloat16 else {}


def _grads(module, x, dy):
    x = x.detach().requires_grad_()
    y = module(x)
    leaves = [x, *module.parameters()]
    return y, (torch.autograd.grad(y, leaves, dy) if y.numel() else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mi", MODULEINFOS, ids=ids)
def test_outputs_and_gradients_match_torch(mi, dtype):
    for i, sample in enumerate(_samples(mi, dtype)):
        theirs, ours = _pair(mi, sample, dtype)
        x = _input(sample)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        y, g = _grads(ours, x, dy)
        e, eg = _grads(theirs, x, dy)
        assert y.dtype == e.dtype == dtype and y.shape == e.shape
        torch.testing.assert_close(y, e, **_tol(dtype), msg=lambda m: f"{sample.desc}: {m}")
        if sample.reference_fn is not None:
            # (ModuleInput passes the parameters on; the reference computes in float32 for any dtype)
            r = sample.reference_fn(ours, x)
            tol = _tol(dtype) or dict(rtol=1.3e-6, atol=1e-5)
            torch.testing.assert_close(y, r, **tol, msg=lambda m: f"{sample.desc} reference: {m}")
        if dtype == torch.bfloat16:
            # bfloat16 gradients of LayerNorm's input cancel: compare both with the float64 result
            exact = _grads(copy.deepcopy(theirs).double(), x.double(), dy.double())[1]
            for a, b, c in zip(g, eg, exact):
                ours_err, torch_err = (a.double() - c).abs().max(), (b.double() - c).abs().max()
                assert ours_err <= 1.5 * torch_err + 1e-3, f"{sample.desc}: {ours_err} vs torch's {torch_err}"
            continue
        for a, b in zip(g, eg):
            # a weight gradient sums over the rows, in an order that differs from torch's
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{sample.desc} gradient: {m}")


@pytest.mark.parametrize("mi", MODULEINFOS, ids=ids)
def test_gradcheck_gradgradcheck_forward_ad_float64(mi):
    checked = 0
    for sample in _samples(mi, torch.float64):
        _, ours = _pair(mi, sample, torch.float64)
        x = _input(sample)
        names = [n for n, _ in ours.named_parameters()]
        params = [p.detach().requires_grad_() for p in ours.parameters()]

        def f(x, *ps, _m=ours, _names=names):
            return torch.func.functional_call(_m, dict(zip(_names, ps)), (x,))

        inputs = (x, *params)
        fast = x.numel() > 200  # the large-batch sample: fast mode, as torch's ModuleInfo runs it
        assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, fast_mode=fast)
        assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, fast_mode=fast)
        checked += x.numel() > 0
    assert checked >= 5


@pytest.mark.parametrize("mi", MODULEINFOS, ids=ids)
def test_module_behaviours(mi):
    for sample in _samples(mi, torch.float32, requires_grad=False):
        theirs, ours = _pair(mi, sample, torch.float32)
        x = _input(sample)
        cls = OURS[mi.module_cls]
        # state dict: same keys, loadable both ways
        assert list(ours.state_dict()) == list(theirs.state_dict())
        back = mi.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        back.load_state_dict(ours.state_dict())
        torch.testing.assert_close(back(x), theirs(x))
        # repr: torch's, apart from the class's module
        assert repr(ours) == repr(theirs)
        # reset_parameters: torch's initial values
        ours.reset_parameters()
        fresh = mi.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        for a, b in zip(ours.parameters(), fresh.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ours(x), fresh(x))
        ours.load_state_dict(theirs.state_dict())
        # train / eval give the same output (no running statistics)
        torch.testing.assert_close(ours.eval()(x), ours.train()(x), rtol=0, atol=0)
        # to(dtype), and factory kwargs
        ours64, theirs64 = copy.deepcopy(ours).to(torch.float64), copy.deepcopy(theirs).to(torch.float64)
        assert all(p.dtype == torch.float64 for p in ours64.parameters())
        torch.testing.assert_close(ours64(x.double()), theirs64(x.double()))
        meta = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs, device="meta")
        assert all(p.device.type == "meta" for p in meta.parameters())
        half = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs, dtype=torch.float16)
        assert all(p.dtype == torch.float16 for p in half.parameters())
        # pickling and deepcopy keep the class, the parameters and the output
        for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
            assert type(clone) is cls
            torch.testing.assert_close(clone(x), ours(x), rtol=0, atol=0)
        # TorchScript: the same output
        torch.testing.assert_close(torch.jit.script(ours)(x), ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("mi", MODULEINFOS, ids=ids)
def test_non_contiguous_and_channels_last_inputs(mi):
    for sample in _samples(mi, torch.float32, requires_grad=False):
        theirs, ours = _pair(mi, sample, torch.float32)
        x = _input(sample)
        if x.numel() == 0:
            continue
        # non-contiguous: every other element of a tensor twice as wide in the last dim
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)
        strided = wide[..., ::2]
        assert not strided.is_contiguous()
        dy = torch.randn(x.shape)
        y, g = _grads(ours, strided, dy)
        y0, g0 = _grads(ours, x, dy)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b)
        if x.dim() == 4:
            cl = x.contiguous(memory_format=torch.channels_last)
            y, e = ours(cl), theirs(cl)
            torch.testing.assert_close(y, e)
            # the output's layout is torch's (RMSNorm keeps channels-last, LayerNorm does not)
            assert y.stride() == e.stride()
