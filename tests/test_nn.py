"""Drop-in modules and convert() on real model code (transformers models built from configs)."""

from __future__ import annotations

import importlib

import pytest
import torch

import normscope
from normscope.nn import LayerNorm, RMSNorm


def test_layernorm_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm((4, 8), eps=1e-6)
    ours = LayerNorm((4, 8), eps=1e-6)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), ref(x))
    assert "eps=1e-06" in repr(ours)


def test_layernorm_without_bias_has_no_bias():
    ln = LayerNorm(16, bias=False)
    assert ln.bias is None and list(ln.state_dict()) == ["weight"]
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    x = torch.randn(2, 16)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.weight))
    none = LayerNorm(16, elementwise_affine=False)
    assert none.weight is None and len(list(none.parameters())) == 0


def test_rmsnorm_is_a_drop_in():
    ref = torch.nn.RMSNorm(8)
    ours = RMSNorm(8)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), ref(x))
    gemma = RMSNorm(8, weight_offset=1.0)
    with torch.no_grad():
        gemma.weight.zero_()
    torch.testing.assert_close(gemma(x), torch.nn.functional.rms_norm(x, (8,)))
    assert "weight_offset=1.0" in repr(gemma)


def test_modules_follow_dtype_and_device_arguments():
    ln = LayerNorm(8, dtype=torch.bfloat16, device="cpu")
    assert ln.weight.dtype == torch.bfloat16
    out = ln(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_convert_plain_torch_model_keeps_objects_and_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8),
                                torch.nn.BatchNorm1d(8))
    ln = model[1]
    seen = []
    ln.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    x = torch.randn(4, 8)
    model.eval()
    before = model(x)
    result = normscope.convert(model)
    assert [(r.name, r.original, r.replacement) for r in result] == [
        ("1", "LayerNorm", "LayerNorm"), ("2", "RMSNorm", "RMSNorm")]
    assert model[1] is ln and type(ln) is LayerNorm and type(model[2]) is RMSNorm
    assert [s.name for s in result.skipped] == ["3"]  # BatchNorm is not a per-sample norm to swap
    torch.testing.assert_close(model(x), before)
    assert seen[-1] is LayerNorm
    assert len(normscope.convert(model)) == 0  # idempotent


def test_convert_filter_fn_and_bad_model():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.LayerNorm(8))
    result = normscope.convert(model, filter_fn=lambda m, name: name == "1")
    assert [r.name for r in result] == ["1"]
    assert type(model[0]) is torch.nn.LayerNorm
    assert result.skipped[0].reason == "filter_fn returned False"
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got str"):
        normscope.convert("model")


class NotRMS(torch.nn.Module):
    """Has a weight and an eps but computes something else: must be skipped, not swapped."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.variance_epsilon)


class Scale(NotRMS):
    """Has a weight and an eps but is no norm at all."""

    def forward(self, x):
        return x * self.weight


def test_convert_skips_lookalikes():
    model = torch.nn.Sequential(Scale(8))
    result = normscope.convert(model)
    assert len(result) == 0 and isinstance(model[0], Scale)
    assert "do not match RMSNorm" in result.skipped[0].reason


def test_convert_swaps_a_layernorm_written_by_hand_for_normscopes_after_the_probes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(NotRMS(8))  # a LayerNorm without bias, over the last axis, not an RMSNorm
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 8)
    want = model(x)
    result = normscope.convert(model)
    assert [(r.original, r.replacement) for r in result.replaced] == [("NotRMS", "LayerNorm")]
    assert isinstance(model[0], normscope.nn.LayerNorm) and model[0].bias is None
    torch.testing.assert_close(model(x), want)


transformers = importlib.import_module("transformers")


def _perturb_norm_weights(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln" in name.lower() or "layer_norm" in name.lower():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)


def _build(kind):
    t = transformers
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
        return t.BertModel(cfg), 2 * 2 + 1, "LayerNorm"
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        return t.GPT2Model(cfg), 2 * 2 + 1, "LayerNorm"
    if kind == "llama":
        cfg = t.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return t.LlamaModel(cfg), 2 * 2 + 1, "LlamaRMSNorm"
    if kind == "t5":
        cfg = t.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                         decoder_start_token_id=0)
        return t.T5Model(cfg), (2 * 2 + 1) + (2 * 3 + 1), "T5LayerNorm"
    if kind == "gemma":
        cfg = t.GemmaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
        return t.GemmaModel(cfg), 2 * 2 + 1, "GemmaRMSNorm"
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5", "gemma"])
def test_convert_transformers_models(kind, dtype):
    torch.manual_seed(0)
    model, n_norms, norm_class = _build(kind)
    model = model.to(dtype).eval()
    _perturb_norm_weights(model)
    ids = torch.randint(0, 99, (2, 7))
    kwargs = {"decoder_input_ids": ids[:, :5]} if kind == "t5" else {}
    keys_before = list(model.state_dict())
    with torch.no_grad():
        before = model(ids, **kwargs).last_hidden_state
    result = normscope.convert(model)
    assert len(result) == n_norms, (result.replaced, result.skipped)
    assert {r.original for r in result} == {norm_class}
    assert all(isinstance(m, (LayerNorm, RMSNorm)) for n, m in model.named_modules() if
               "norm" in type(m).__name__.lower())
    assert list(model.state_dict()) == keys_before
    assert all(p.dtype == dtype for p in model.parameters())
    with torch.no_grad():
        after = model(ids, **kwargs).last_hidden_state
    assert after.dtype == before.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    else:  # rounding points differ by one bf16 step; judge the whole output by relative error
        rel = (after.float() - before.float()).norm() / before.float().norm()
        assert rel < 2e-2, rel
    if kind == "gemma":
        assert all(m.weight_offset == 1.0 for m in model.modules() if isinstance(m, RMSNorm))
