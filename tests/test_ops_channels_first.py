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
    assert y.is_contiguous()  # normalized in place of timm's permute copy: the input's NCHW layout


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


def _count_kernel_calls(monkeypatch):
    from normscope.ops import channels_first

    calls = []
    real = channels_first.layer_norm_cf

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(channels_first, "layer_norm_cf", counting)
    return calls


def _errors_vs_float64(fn, x, w, b, g):
    """Max abs errors of (y, dx, dw, db) of ``fn`` against torch's LayerNorm in float64 on the permuted input."""
    xs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*xs)
    y.backward(g.to(y.dtype))
    rs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = torch.nn.functional.layer_norm(rs[0].movedim(1, -1), (x.shape[1],), rs[1], rs[2], 1e-6).movedim(-1, 1)
    yr.backward(g.double())
    return [float((a.detach().double() - c).abs().max()) for a, c in zip([y] + [t.grad for t in xs],
                                                                          [yr] + [t.grad for t in rs])]


def test_nchw_input_runs_the_channels_first_kernel_without_a_copy(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    ours = _ours_from(_timm_like(8))
    x = torch.randn(2, 8, 5, 6)
    y = ours(x)
    assert calls == [x.shape] and y.is_contiguous()
    ours(x.contiguous(memory_format=torch.channels_last))  # channels-last: the no-copy channels-last route
    ours(torch.randn(2, 8, 5, 6)[:, :, :, :4])  # a strided (non-contiguous) NCHW view: permuted and copied
    assert len(calls) == 1


@pytest.mark.parametrize("C,S", [(96, (14, 14)), (7, (3, 5)), (384, (1, 3))])
def test_float32_error_no_worse_than_torchs(C, S):
    # rows with a large mean and a small spread: the case two-pass statistics exist for
    g = torch.Generator().manual_seed(C)
    x = torch.randn(3, C, *S, generator=g) * 0.05 + 300.0
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    dy = torch.randn(3, C, *S, generator=g, dtype=torch.float64)
    ours = _ours_from(_timm_like(C))
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.bias.copy_(b)

    def run_ours(x, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,))

    def run_torch(x, w, b):
        return torch.nn.functional.layer_norm(x.movedim(1, -1), (C,), w, b, 1e-6).movedim(-1, 1)

    err_ours = _errors_vs_float64(run_ours, x, w, b, dy)
    err_torch = _errors_vs_float64(run_torch, x, w, b, dy)
    for name, a, t in zip(("y", "dx", "dw", "db"), err_ours, err_torch):
        assert a <= 2 * t + 1e-6, (name, a, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 16, 4, 4, generator=g) * 2 + 1).to(dtype)
    ours = _ours_from(_timm_like(16)).to(dtype)
    y = ours(x)
    assert y.dtype == dtype and y.is_contiguous()
    want = torch.nn.functional.layer_norm(x.double().movedim(1, -1), (16,), ours.weight.double(), ours.bias.double(),
                                          ours.eps).movedim(-1, 1)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=(0.05 if dtype == torch.bfloat16 else 0.01))


def test_weight_gradients_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 32, 40, 40, generator=g)  # large enough to run on every thread
    dy = torch.randn(x.shape, generator=g)
    ours = _ours_from(_timm_like(32))
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            ours.zero_grad()
            xi = x.clone().requires_grad_()
            ours(xi).backward(dy)
            grads.append((xi.grad, ours.weight.grad.clone(), ours.bias.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradgradcheck_and_compile():
    torch.manual_seed(7)
    ours = _ours_from(_timm_like(3)).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w, b = ours.weight.detach().requires_grad_(), ours.bias.detach().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w, b: torch.func.functional_call(ours, {"weight": w, "bias": b},
                                                                                  (x,)), (x, w, b))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), ours).double()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xs = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(compiled(xs), model(xs), rtol=0, atol=0)
    compiled(xs).sum().backward()
    assert ours.weight.grad is not None and torch.isfinite(ours.weight.grad).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_first_op_on_the_triton_and_reference_backends(monkeypatch, backend, dtype):
    # the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest without a GPU)
    monkeypatch.setenv("NORMSCOPE_BACKEND", backend)
    calls = _count_kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(8)
    C, S = 19, (5, 15)  # channels not a multiple of the channel tile, positions not of the position block
    x = (torch.randn(2, C, *S, generator=g) * 2 + 40).to(dtype)
    dy = torch.randn(2, C, *S, generator=g, dtype=torch.float64)
    ours = _ours_from(_timm_like(C)).to(dtype)

    def run(x, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,))

    errs = _errors_vs_float64(run, x, ours.weight.detach(), ours.bias.detach(), dy)
    assert len(calls) == 1
    tol = [1e-4, 1e-4, 1e-3, 1e-3] if dtype == torch.float32 else [0.2, 0.05, 0.5, 0.5]
    for name, e, t in zip(("y", "dx", "dw", "db"), errs, tol):
        assert e < t, (name, e)
    # the same bits on a second run (no atomics; fixed reduction order)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [run(xi, ours.weight, ours.bias) for xi in xs]
    for o in outs:
        o.backward(dy.to(dtype))
    assert torch.equal(outs[0], outs[1]) and torch.equal(xs[0].grad, xs[1].grad)
