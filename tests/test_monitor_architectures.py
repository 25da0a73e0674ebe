"""The Monitor's features across architectures: GPT-2, Llama, T5 (encoder-decoder), BERT and a ConvNeXt-like conv net.

Tiny random-weight models (transformers configs, no download; the conv net written here, with ConvNeXt's
channels-first LayerNorms). Each feature was built on one small model; these run it on the others:

* ``torch.compile(fullgraph=True)``: no graph break, records equal to an eager-monitored twin, and a NaN planted
  in a weight at a known step is reported at the same layer and step, with the same message, as eagerly.
* The Hugging Face Trainer callback on a decoder-only (GPT-2) and an encoder-decoder (T5, ``Seq2SeqTrainer``)
  model: the model's own layer names, the Trainer's step numbers, one step per ``gradient_accumulation_steps``.
* The gradient-history and outlier rules: no ``grad_exploding`` / ``grad_vanishing`` / ``grad_outlier`` over a
  healthy 200-step run at ``every=1``.
"""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from normscope.monitor import Monitor  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 32


class ConvNeXtLayerNorm(torch.nn.Module):
    """As ConvNeXt's ``LayerNorm``: channels_last through F.layer_norm, channels_first by hand over dim 1."""

    def __init__(self, channels, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (channels,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class ConvNeXtBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = ConvNeXtLayerNorm(c)
        self.pwconv1 = torch.nn.Linear(c, 4 * c)
        self.pwconv2 = torch.nn.Linear(4 * c, c)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.pwconv2(F.gelu(self.pwconv1(h))).permute(0, 3, 1, 2)


class ConvNeXt(torch.nn.Module):
    """Stem, a block, a channels-first downsampling norm, a block, a pooled head: 5 LayerNorms, 2 channels-first."""

    def __init__(self, dims=(8, 16), classes=VOCAB):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, dims[0], 4, stride=4)
        self.stem_norm = ConvNeXtLayerNorm(dims[0], data_format="channels_first")
        self.stage0 = ConvNeXtBlock(dims[0])
        self.down_norm = ConvNeXtLayerNorm(dims[0], data_format="channels_first")
        self.down = torch.nn.Conv2d(dims[0], dims[1], 2, stride=2)
        self.stage1 = ConvNeXtBlock(dims[1])
        self.head_norm = torch.nn.LayerNorm(dims[1])
        self.head = torch.nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage0(self.stem_norm(self.stem(x)))
        x = self.stage1(self.down(self.down_norm(x)))
        return self.head(self.head_norm(x.mean((2, 3))))


def _make(arch):
    torch.manual_seed(0)
    T = transformers
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                              eos_token_id=0))
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=0))
    if arch == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                       num_decoder_layers=2, num_heads=2, dropout_rate=0.0,
                                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    if arch == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return ConvNeXt()


# Per architecture: its monitored layers, and a weight that turns NaN (with the layer that first sees it).
ARCHS = {
    "gpt2": (["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
              "transformer.ln_f"],
             "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.ln_1"),
    "llama": (["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"],
              "model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm"),
    "t5": ([f"{stack}.block.{b}.layer.{i}.layer_norm" for stack, n in (("encoder", 2), ("decoder", 3))
            for b in range(2) for i in range(n)],
           "encoder.block.0.layer.1.DenseReluDense.wo.weight", "encoder.block.1.layer.0.layer_norm"),
    "bert": (["bert.embeddings.LayerNorm"] + [f"bert.encoder.layer.{i}.{p}.LayerNorm" for i in range(2)
                                               for p in ("attention.output", "output")]
             + ["cls.predictions.transform.LayerNorm"],
             "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.LayerNorm"),
    "convnext": (["stem_norm", "stage0.norm", "down_norm", "stage1.norm", "head_norm"],
                 "stage0.dwconv.weight", "stage0.norm"),
}


def _expected_names(arch):
    names = ARCHS[arch][0]
    if arch == "t5":  # encoder blocks, the encoder's final norm, decoder blocks, the decoder's final norm
        enc = [n for n in names if n.startswith("encoder")]
        dec = [n for n in names if n.startswith("decoder")]
        return enc + ["encoder.final_layer_norm"] + dec + ["decoder.final_layer_norm"]
    return names


def _loss(arch, model, g):
    """A training loss on a fixed-seed batch: next-token (shifted sequences) for the language models."""
    net = getattr(model, "_orig_mod", model)
    if arch == "convnext":
        x = torch.randn(4, 3, 16, 16, generator=g)
        return F.cross_entropy(model(x), torch.randint(0, VOCAB, (4,), generator=g))
    ids = (torch.randint(1, VOCAB, (4, 1), generator=g) + torch.arange(8)) % (VOCAB - 1) + 1  # learnable runs
    if arch == "t5":
        labels = ids.flip(1)
        logits = model(input_ids=ids, decoder_input_ids=net._shift_right(labels)).logits
    else:
        # (the loss is taken outside the model: transformers' own loss function logs a warning that
        # breaks a fullgraph trace, which is not the monitor's business)
        labels = ids
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def _train(arch, model, mon, steps, *, lr=0.01, poison=None, opt="sgd"):
    net = getattr(model, "_orig_mod", model)
    params = dict(net.named_parameters())
    o = (torch.optim.SGD(net.parameters(), lr=lr) if opt == "sgd" else torch.optim.AdamW(net.parameters(), lr=lr))
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t == poison:
            with torch.no_grad():
                params[ARCHS[arch][1]].view(-1)[0] = math.nan
        _loss(arch, model, g).backward()
        o.step()
        o.zero_grad()
        mon.step()


def _stats(mon):
    return [r for r in mon.flush() if r["type"] == "layer_stats"]


def _assert_records_close(got, want):
    assert [(r["layer"], r["step"], r["calls"], r["rows"]) for r in got] == \
        [(r["layer"], r["step"], r["calls"], r["rows"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k, wv in w.items():
            gv = g[k]
            if isinstance(wv, float):
                assert (math.isnan(gv) and math.isnan(wv)) or gv == pytest.approx(wv, rel=1e-3, abs=1e-5), \
                    (g["layer"], k, gv, wv)
            elif isinstance(wv, list):
                torch.testing.assert_close(torch.tensor(gv, dtype=torch.float64),
                                           torch.tensor(wv, dtype=torch.float64), rtol=1e-3, atol=1e-5)
            else:
                assert gv == wv, (g["layer"], k, gv, wv)


# Inductor's code generation takes most of a compiled test's time; "aot_eager" runs the same Dynamo trace and
# AOTAutograd (where the monitor's custom ops and the input tap's backward are functionalised and ordered), so
# the architectures run under it, and the conv net (whose channels-first rows inductor lays out) under inductor.
BACKENDS = {"convnext": "inductor"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_compiled_fullgraph_matches_eager_twin_and_finds_the_nan(arch):
    eager = _make(arch)
    net = copy.deepcopy(eager)
    eager_mon = Monitor(eager, every=1, flush_every=None)
    mon = Monitor(net, every=1, flush_every=None)
    compiled = torch.compile(net, fullgraph=True, backend=BACKENDS.get(arch, "aot_eager"))
    assert [layer.name for layer in mon.layers] == _expected_names(arch)

    counters.clear()
    _train(arch, eager, eager_mon, 2)
    _train(arch, compiled, mon, 2)
    assert dict(counters["graph_break"]) == {}
    want = _stats(eager_mon)
    assert [r["layer"] for r in want] == _expected_names(arch)
    assert all(r["calls"] == 2 and r["skipped_calls"] == 0 and r["grad_input_steps"] == 2 for r in want)
    _assert_records_close(_stats(mon), want)

    # A NaN written into a weight before step 1 of the next run of steps (monitor step 3): same layer and step.
    _train(arch, eager, eager_mon, 2, poison=1)
    _train(arch, compiled, mon, 2, poison=1)
    assert dict(counters["graph_break"]) == {}
    want = [(f.layer, f.step, f.kind, f.message) for f in eager_mon.findings() if f.kind.startswith("nonfinite")]
    got = [(f.layer, f.step, f.kind, f.message) for f in mon.findings() if f.kind.startswith("nonfinite")]
    assert want[0][:3] == (ARCHS[arch][2], 3, "nonfinite_input")
    assert got == want
    eager_mon.close()
    mon.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "convnext"])
def test_no_gradient_findings_over_a_healthy_run(arch):
    """200 AdamW steps that learn (the loss falls), every step sampled: the gradient norms move a lot early on (by
    design of the optimizer's warm start), yet neither the per-layer history nor the cross-layer rule reports."""
    model = _make(arch)
    mon = Monitor(model, every=1, flush_every=20)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        first = _loss(arch, model, g).item()
    _train(arch, model, mon, 200, lr=3e-3, opt="adamw")
    with torch.no_grad():
        last = _loss(arch, model, torch.Generator().manual_seed(1)).item()
    assert last < first
    stats = [r for r in mon.records if r["type"] == "layer_stats"]
    assert all(r["grad_input_steps"] == 20 and r["grad_param_steps"] == 20 for r in stats)
    assert len({r["step"] for r in stats}) == 10
    found = [(f.kind, f.layer, f.step) for f in mon.findings()]
    assert not [f for f in found if f[0].startswith("grad_")], found
    mon.close()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed, seq2seq):
        self.x = torch.randint(2, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))
        self.seq2seq = seq2seq

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i].flip(0) if self.seq2seq else self.x[i]}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_hf_trainer_callback_names_steps_and_nan(arch, tmp_path):
    from normscope.integrations.hf import NormscopeCallback

    seq2seq = arch == "t5"
    model = _make(arch)
    # A NaN enters the hidden states of the second (decoder) block during optimizer step 3.
    block, first = ((model.decoder.block[1], "decoder.block.1.layer.0.layer_norm") if seq2seq
                    else (model.transformer.h[1], "transformer.h.1.ln_1"))
    T = transformers
    trainer_cls, args_cls = (T.Seq2SeqTrainer, T.Seq2SeqTrainingArguments) if seq2seq else (T.Trainer,
                                                                                           T.TrainingArguments)
    cb = NormscopeCallback(every=1, flush_every=3)
    args = args_cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no",
                    logging_steps=1, disable_tqdm=True, learning_rate=1e-2, seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=_Tokens(32, 0, seq2seq),
                          eval_dataset=_Tokens(4, 1, seq2seq), callbacks=[cb])

    def inject(module, args, kwargs):
        if module.training and trainer.state.global_step == 3:
            key = "hidden_states" if "hidden_states" in kwargs else None
            h = (kwargs[key] if key else args[0]).clone()
            h[0, 2, 3] = float("nan")
            return (args, {**kwargs, key: h}) if key else ((h,) + args[1:], kwargs)

    block.register_forward_pre_hook(inject, with_kwargs=True)
    trainer.train()

    assert [layer.name for layer in cb.monitor.layers] == _expected_names(arch)
    assert [(f.layer, f.step) for f in cb.findings if f.kind == "nonfinite_input"] == [(first, 3)]
    stats = [r for r in cb.monitor.records if r["type"] == "layer_stats"]
    # Every layer (the encoder's too) in windows of the trainer's steps 0-2 and 3-5; the evaluations (at steps 3
    # and 6) not recorded: 2 micro-batches per optimizer step.
    assert sorted({(r["layer"], r["window_start"], r["window_end"], r["calls"], r["steps"]) for r in stats}) == \
        sorted((name, s, s + 2, 6, 3) for name in _expected_names(arch) for s in (0, 3))
    assert sum("eval_loss" in e for e in trainer.state.log_history) == 2
