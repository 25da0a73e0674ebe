"""Numerical conformance of the ops on every backend: Gemma's weight offset, masked padding holding
NaN / Inf, memory format of the outputs, accuracy of the RMSNorm weight gradient."""

import copy

import pytest
import torch

import normscope
from normscope import functional as F
from normscope.ops import dispatch

BACKENDS = ("cpu", "reference", "triton")  # triton runs under TRITON_INTERPRET=1 without a GPU


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# weight offset (Gemma: x * (1 + weight.float()))
# --------------------------------------------------------------------------------------------


def _gemma_norm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GemmaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GemmaModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.norm.weight.normal_(0, 0.5)
    converted = copy.deepcopy(model)
    result = normscope.convert(converted)
    assert "norm" in {r.name for r in result}
    assert isinstance(converted.norm, normscope.nn.RMSNorm) and converted.norm.weight_offset == 1.0
    assert converted.norm.weight.dtype == torch.bfloat16
    return model.norm, converted.norm


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_converted_gemma_norm_matches_hugging_face(backend, x_dtype):
    hf, ns = _gemma_norm()
    x = (torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 3).to(x_dtype)
    with torch.no_grad():
        expected, actual = hf(x), ns(x)
    assert actual.dtype == expected.dtype == x_dtype
    if x_dtype == torch.bfloat16:
        # the float32 result rounds to the same bfloat16 everywhere
        assert torch.equal(actual, expected)
    else:
        # float32 output: only the order of the float32 mean-square sum and rsqrt differ from
        # Hugging Face's (a few float32 ulps); rounding 1 + weight to bfloat16 errs by ~1e-2
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def _offset_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 40, generator=g) * 2
    r = torch.randn(6, 40, generator=g)
    w = (torch.randn(40, generator=g) * 0.5).to(torch.bfloat16)
    b = torch.randn(40, generator=g)
    mask = torch.rand(6, 40, generator=g) > 0.3
    return x, r, w, b, mask


_OPS = {
    "layer_norm": lambda x, r, m, w, b, **kw: F.layer_norm(x, 40, w, b, 1e-5, **kw),
    "rms_norm": lambda x, r, m, w, b, **kw: F.rms_norm(x, 40, w, 1e-6, **kw),
    "add_layer_norm": lambda x, r, m, w, b, **kw: F.add_layer_norm(x, r, 40, w, b, 1e-5, **kw)[0],
    "add_rms_norm": lambda x, r, m, w, b, **kw: F.add_rms_norm(x, r, 40, w, 1e-6, **kw)[0],
    "masked_layer_norm": lambda x, r, m, w, b, **kw: F.masked_layer_norm(x, m, 40, w, b, 1e-5, **kw),
    "masked_rms_norm": lambda x, r, m, w, b, **kw: F.masked_rms_norm(x, m, 40, w, 1e-6, **kw),
}


@pytest.mark.parametrize("op", sorted(_OPS))
def test_offset_is_added_in_float32(backend, op):
    fn = _OPS[op]
    x, r, w, b, mask = _offset_problem()
    w = w.requires_grad_()
    dy = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    y = fn(x, r, mask, w, b, offset=1.0)
    (gw,) = torch.autograd.grad(y, w, dy)
    # the same op given the float32 weight 1 + w: identical outputs, and d(w + 1)/dw = 1
    w32 = (w.detach().float() + 1.0).requires_grad_()
    y32 = fn(x, r, mask, w32, b)
    (gw32,) = torch.autograd.grad(y32, w32, dy)
    assert torch.equal(y, y32)
    assert gw.dtype == torch.bfloat16
    assert torch.equal(gw, gw32.to(torch.bfloat16))
    # adding the offset in bfloat16 rounds it: the result must differ from that
    y16 = fn(x, r, mask, w.detach() + 1.0, b)
    assert not torch.equal(y, y16)


def test_offset_without_weight_and_validation():
    x = torch.randn(3, 8)
    assert torch.equal(F.rms_norm(x, 8, offset=1.0), F.rms_norm(x, 8))
    with pytest.raises(TypeError, match="Expected offset to be a real number"):
        F.rms_norm(x, 8, torch.ones(8), offset="1")
    with pytest.raises(ValueError, match="Expected offset to be a finite number"):
        F.layer_norm(x, 8, torch.ones(8), offset=float("nan"))


def test_offset_under_torch_compile(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    x = torch.randn(4, 16)
    w = torch.randn(16, dtype=torch.bfloat16)
    fn = torch.compile(lambda x, w: F.rms_norm(x, 16, w, 1e-6, offset=1.0), fullgraph=True, backend="eager")
    assert torch.equal(fn(x, w), F.rms_norm(x, 16, w, 1e-6, offset=1.0))


# --------------------------------------------------------------------------------------------
# masked ops with NaN / Inf in the padded positions
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Triton's interpreter (numpy)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_padding_nonfinite_is_ignored(backend, rms, x_dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 8, 16, generator=g)
    lengths = torch.tensor([8, 5, 1, 0])
    mask = (torch.arange(8)[None, :] < lengths[:, None])[..., None]  # (4, 8, 1)
    pad = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(4 * 8 * 16 // 3 + 1)[: 4 * 8 * 16]
    x = torch.where(mask, x0, pad.view(4, 8, 16)).to(x_dtype).requires_grad_()
    xz = torch.where(mask, x0, torch.zeros(())).to(x_dtype).requires_grad_()
    w = torch.randn(8, 16, generator=g).requires_grad_()
    b = torch.randn(8, 16, generator=g)
    dy = torch.randn(4, 8, 16, generator=g).to(x_dtype)

    def run(inp):
        if rms:
            return F.masked_rms_norm(inp, mask, (8, 16), w, 1e-5)
        return F.masked_layer_norm(inp, mask, (8, 16), w, b, 1e-5)

    y = run(x)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    yz = run(xz)
    gxz, gwz = torch.autograd.grad(yz, (xz, w), dy)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    # padded positions contribute nothing: same result as zeros there, and 0 output / gradient there
    assert torch.equal(y, yz) and torch.equal(gx, gxz) and torch.equal(gw, gwz)
    pad_pos = ~mask.expand_as(y)
    assert (y[pad_pos] == 0).all() and (gx[pad_pos] == 0).all()
    # and every backend agrees with the reference backend, with the NaN / Inf present
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.ENV_VAR, "reference")
        y_ref = run(x)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    tol = dict(atol=1e-5, rtol=1e-5) if x_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, atol=1e-4, rtol=1e-4)


def test_masked_reference_functions_ignore_nonfinite_padding():
    from normscope.ops import reference as ref

    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)[..., None]
    xb = x.masked_fill(~mask, float("nan"))
    xz = x.masked_fill(~mask, 0.0)
    assert torch.equal(ref.masked_layer_norm_ref(xb, mask, (5, 8)), ref.masked_layer_norm_ref(xz, mask, (5, 8)))
    assert torch.equal(ref.masked_rms_norm_ref(xb, mask, (5, 8)), ref.masked_rms_norm_ref(xz, mask, (5, 8)))
    assert torch.isfinite(ref.masked_rms_norm_ref(xb, mask, (5, 8))).all()


# --------------------------------------------------------------------------------------------
# memory format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("fmt", ["channels_last", "channels_last_3d", "contiguous"])
def test_output_memory_format_follows_torch(backend, kind, fmt):
    shape = (2, 3, 4, 5, 6) if fmt == "channels_last_3d" else (2, 3, 4, 6)
    memory_format = getattr(torch, fmt if fmt != "contiguous" else "contiguous_format")
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    if kind == "rms":
        ours, theirs = normscope.nn.RMSNorm(6, eps=1e-6), torch.nn.RMSNorm(6, eps=1e-6)
    else:
        ours, theirs = normscope.nn.LayerNorm(6), torch.nn.LayerNorm(6)
    theirs.load_state_dict(ours.state_dict())
    y, expected = ours(x), theirs(x)
    check = getattr(torch, fmt) if fmt != "contiguous" else torch.contiguous_format
    assert y.is_contiguous(memory_format=check) == expected.is_contiguous(memory_format=check)
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if kind == "rms":  # the functional op and the fused add variant too
        assert F.rms_norm(x, 6).stride() == expected.stride()
        y2, h = F.add_rms_norm(x, x, 6)
        assert y2.stride() == h.stride() == expected.stride()


def test_channels_last_gradients():
    x = torch.randn(2, 3, 4, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    norm = normscope.nn.RMSNorm(6, eps=1e-6)
    dy = torch.randn(2, 3, 4, 6)
    (gx,) = torch.autograd.grad(norm(x), x, dy)
    x2 = x.detach().clone().requires_grad_()
    (gx2,) = torch.autograd.grad(torch.nn.functional.rms_norm(x2, (6,), norm.weight, 1e-6), x2, dy)
    torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# accuracy of the RMSNorm weight gradient over many rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_weight_grad_accuracy_many_rows(monkeypatch, name, rms):
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    M, N = 65536, 64
    g = torch.Generator().manual_seed(0)
    x, dy, w = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g), torch.randn(N, generator=g)
    tfn = (lambda x, w: torch.nn.functional.rms_norm(x, (N,), w, 1e-6)) if rms else \
        (lambda x, w: torch.nn.functional.layer_norm(x, (N,), w, None, 1e-6))
    nfn = (lambda x, w: F.rms_norm(x, N, w, 1e-6)) if rms else (lambda x, w: F.layer_norm(x, N, w, None, 1e-6))

    def grad_w(fn, dtype):
        wv = w.to(dtype).requires_grad_()
        return torch.autograd.grad(fn(x.to(dtype), wv), wv, dy.to(dtype))[0].double()

    exact = grad_w(tfn, torch.float64)
    assert exact.abs().max() > 100  # large sums: rounding over 65536 rows matters
    torch_err = (grad_w(tfn, torch.float32) - exact).abs().max()
    our_err = (grad_w(nfn, torch.float32) - exact).abs().max()
    assert our_err <= torch_err, (our_err.item(), torch_err.item())


def test_offset_exports_to_onnx(tmp_path):
    from normscope.analysis.onnx_export import export_onnx

    class Gemma(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = torch.nn.Linear(16, 16), normscope.nn.RMSNorm(16, eps=1e-6, weight_offset=1.0)

        def forward(self, x):
            return self.norm(self.fc(x))

    torch.manual_seed(0)
    model = Gemma()
    with torch.no_grad():
        model.norm.weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, x, tmp_path / "gemma.onnx", opset=18)
    assert report.ok and report.max_abs_diff < 1e-5, report


# --------------------------------------------------------------------------------------------
# default RMSNorm eps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_rms_default_eps_is_torchs(dtype):
    # torch's rms_norm(eps=None) adds the epsilon of its accumulation dtype: float32's for 16-bit
    # input, not torch.finfo(float16).eps. Rows of small values are where the two differ.
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e-2
    r = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(dtype) * 1e-2
    mask = torch.ones(4, 1, dtype=torch.bool)
    expected = torch.nn.functional.rms_norm(x, (16,))
    torch.testing.assert_close(normscope.rms_norm(x, 16), expected)
    torch.testing.assert_close(normscope.nn.RMSNorm(16, dtype=dtype)(x), torch.nn.RMSNorm(16, dtype=dtype)(x))
    torch.testing.assert_close(normscope.masked_rms_norm(x, mask, 16), expected)
    h = x + r
    torch.testing.assert_close(normscope.add_rms_norm(x, r, 16)[0], torch.nn.functional.rms_norm(h, (16,)))
