"""Channels-first LayerNorm (timm's LayerNorm2d, ConvNeXt): normscope.nn.LayerNorm2d, and convert() replacing
the channels-first and trailing LayerNorm-style modules that the probes confirm, on a config-built ConvNeXt."""

from __future__ import annotations

import copy

import pytest
import torch

import normscope
import zoo
from normscope.errors import ShapeError
from normscope.nn import LayerNorm2d


def _timm_like(c, eps=1e-6):
    m = zoo.LayerNorm2d(c, eps=eps)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    return m


def _ours_from(m):
    ours = LayerNorm2d(m.normalized_shape[0], eps=m.eps)
    ours.load_state_dict(m.state_dict())
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_timms_layernorm2d(dtype):
    torch.manual_seed(0)
    ref = _timm_like(6).to(dtype)
    ours = _ours_from(ref).to(dtype)
    x = (torch.randn(2, 6, 5, 7) * 3 + 1).to(dtype)
    y = ours(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref(x), **tol)
    assert y.stride() == ref(x).stride()  # the layout timm's module gives


def test_channels_last_input_gives_channels_last_output_and_other_ranks():
    torch.manual_seed(1)
    ours = _ours_from(_timm_like(4))
    x = torch.randn(3, 4, 6, 5)
    xl = x.contiguous(memory_format=torch.channels_last)
    y = ours(xl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ours(x))
    x1 = torch.randn(2, 4, 9)  # (N, C, L)
    want = torch.nn.functional.layer_norm(x1.transpose(1, 2), (4,), ours.weight, ours.bias, ours.eps).transpose(1, 2)
    torch.testing.assert_close(ours(x1), want)
    x3 = torch.randn(2, 4, 3, 3, 3)
    want3 = torch.nn.functional.layer_norm(x3.movedim(1, -1), (4,), ours.weight, ours.bias, ours.eps).movedim(-1, 1)
    torch.testing.assert_close(ours(x3), want3)


def test_gradcheck_float64():
    torch.manual_seed(2)
    ours = _ours_from(_timm_like(3)).double()
    x = torch.randn(2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,)),
                                    (x, ours.weight.detach().requires_grad_(), ours.bias.detach().requires_grad_()))


def test_errors():
    ours = LayerNorm2d(4)
    with pytest.raises(ShapeError, match="4 channels in dim 1"):
        ours(torch.randn(2, 5, 3, 3))
    with pytest.raises(ShapeError, match="Expected input of shape"):
        ours(torch.randn(4))


def test_convert_replaces_confirmed_layernorm_styles_on_convnext():
    model, x = zoo.convnext()
    ref = model(x)
    keys = set(model.state_dict())
    converted = copy.deepcopy(model)
    res = normscope.convert(converted)
    kinds = {r.name: r.replacement for r in res.replaced}
    # written down from the architecture: the stem and downsampling norms are channels-first (HF's
    # ConvNextLayerNorm(data_format="channels_first")), the in-block norms channels-last, the head timm's LayerNorm2d
    assert kinds == {"backbone.embeddings.layernorm": "LayerNorm2d",
                     "backbone.encoder.stages.0.layers.0.layernorm": "LayerNorm",
                     "backbone.encoder.stages.1.downsampling_layer.0": "LayerNorm2d",
                     "backbone.encoder.stages.1.layers.0.layernorm": "LayerNorm",
                     "head.norm": "LayerNorm2d"}
    assert not res.skipped and set(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-5)
    ref.sum().backward()
    converted(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    dims = {layer.name: layer.norm_dims for layer in normscope.discovery.find_norm_layers(converted)}
    assert dims["head.norm"] == (1,) and dims["backbone.encoder.stages.0.layers.0.layernorm"] == (-1,)
    with normscope.Monitor(converted, flush_every=None) as mon:
        converted(x)
        mon.step()
        recs = {r["layer"]: r for r in mon.flush() if r["type"] == "layer_stats"}
    assert recs["head.norm"]["rows"] == x.shape[0]  # pooled (N, C, 1, 1): one channel vector per sample


def test_convert_probes_never_touch_batchnorm_statistics():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), _timm_like(4)).train()
    before = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
    res = normscope.convert(model)
    assert torch.equal(model[1].running_mean, before[0]) and int(model[1].num_batches_tracked) == before[1]
    assert [r.name for r in res.replaced] == ["2"] and [s.name for s in res.skipped] == ["1"]
