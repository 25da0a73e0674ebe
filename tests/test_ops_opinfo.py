"""PyTorch's own OpInfo samples for ``nn.functional.layer_norm`` / ``rms_norm``, run on normscope.

Each sample's arguments go to normscope's function and to torch's; values and gradients must match
(float32 and float64), and in float64 normscope must pass ``gradcheck`` (reverse and forward mode,
batched gradients included) and ``gradgradcheck``. torch accepts a negative ``eps``; normscope
rejects it, and the test checks that it does so with its documented error.
"""

from __future__ import annotations

import pytest
import torch

import normscope

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="torch.testing._internal needs expecttest and hypothesis: pip install 'normscope[dev]'",
)

OURS = {"nn.functional.layer_norm": normscope.layer_norm, "nn.functional.rms_norm": normscope.rms_norm}
OPINFOS = [o for o in common_methods_invocations.op_db if o.name in OURS]


def test_both_opinfos_are_found():
    assert sorted(o.name for o in OPINFOS) == sorted(OURS)


def _samples(opinfo, dtype):
    return list(opinfo.sample_inputs("cpu", dtype, requires_grad=True))


def _leaves(sample):
    return [t for t in (sample.input, *sample.args, *sample.kwargs.values()) if isinstance(t, torch.Tensor)]


def _negative_eps(sample):
    return sample.kwargs.get("eps", 0.0) < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("opinfo", OPINFOS, ids=lambda o: o.name)
def test_values_and_gradients_match_torch(opinfo, dtype):
    ours = OURS[opinfo.name]
    samples = _samples(opinfo, dtype)
    assert len(samples) >= 4
    for i, sample in enumerate(samples):
        args, kwargs = sample.args, sample.kwargs
        if _negative_eps(sample):
            with pytest.raises(ValueError, match=r"Expected eps to be a finite number >= 0, but got -"):
                ours(sample.input, *args, **kwargs)
            continue
        leaves = _leaves(sample)
        y = ours(sample.input, *args, **kwargs)
        e = opinfo.op(sample.input, *args, **kwargs)
        torch.testing.assert_close(y, e, msg=lambda m: f"sample {i}: {m}")
        if y.numel() == 0:
            continue
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=dtype)
        grads = torch.autograd.grad(y, leaves, dy)
        expected = torch.autograd.grad(e, leaves, dy)
        # A one-element row has variance 0 and rstd = eps**-0.5 (about 316): torch's float32
        # input gradient there is rounding noise of about 1e-4 around the exact 0.
        tol = dict(atol=2e-4, rtol=1.3e-6) if dtype == torch.float32 else {}
        for g, eg in zip(grads, expected):
            torch.testing.assert_close(g, eg, **tol, msg=lambda m: f"sample {i} gradient: {m}")


@pytest.mark.parametrize("opinfo", OPINFOS, ids=lambda o: o.name)
def test_gradcheck_gradgradcheck_on_opinfo_samples(opinfo):
    ours = OURS[opinfo.name]
    checked = 0
    for sample in _samples(opinfo, torch.float64):
        if _negative_eps(sample):
            continue
        leaves = _leaves(sample)
        n_args = len(sample.args)

        def f(x, *rest, _sample=sample, _n=n_args):
            return ours(x, *rest[:_n], **dict(zip(_sample.kwargs, rest[_n:])))

        inputs = (sample.input, *sample.args, *sample.kwargs.values())
        assert torch.autograd.gradcheck(
            f, inputs, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
        )
        assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True)
        checked += len(leaves) > 0
    assert checked >= 4
