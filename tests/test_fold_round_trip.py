"""A folded model survives its own save / reload (issue: a folded GPT-2 changed by 13% after from_pretrained)."""

from __future__ import annotations

import pytest
import torch

import normscope
import zoo

transformers = pytest.importorskip("transformers")


def _reload(model, path):
    model.save_pretrained(str(path))
    return type(model).from_pretrained(str(path)).eval()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def test_gpt2_ln_f_with_beta_is_refused_and_the_fold_reloads(tmp_path):
    model, x = zoo.gpt2_lm()  # ln_f has a non-zero beta; lm_head (tied to wte) has no bias
    before = model(**x).logits
    result = normscope.fold_norms_(model, x)
    skipped = {s.norm: s.reason for s in result.skipped}
    assert "consumer lm_head has no bias" in skipped["transformer.ln_f"]
    assert len(result.folded) == 4
    assert model.lm_head.bias is None  # no parameter the class does not create
    folded = model(**x).logits
    assert _rel(folded, before) < 1e-5
    reloaded = _reload(model, tmp_path)
    assert _rel(reloaded(**x).logits, folded) < 1e-6


def test_gpt2_ln_f_without_beta_folds_untied_and_reloads(tmp_path):
    model, x = zoo.gpt2_lm()
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()
    before = model(**x).logits
    result = normscope.fold_norms_(model, x)
    assert result.skipped == [] and len(result.folded) == 5
    assert not model.config.tie_word_embeddings
    folded = model(**x).logits
    assert _rel(folded, before) < 1e-5
    reloaded = _reload(model, tmp_path)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.transformer.wte.weight.data_ptr()
    assert _rel(reloaded(**x).logits, folded) < 1e-6


@pytest.mark.parametrize("name", ["whisper", "bert", "t5", "vit"])
def test_folded_zoo_models_reload_unchanged(name, tmp_path):
    """Whatever fold_norms_ folds, the model's own save / reload gives the folded outputs back."""
    model, x = zoo.ZOO[name]()
    for layer in normscope.discovery.find_norm_layers(model):  # non-trivial gamma and beta everywhere
        with torch.no_grad():
            layer.module.weight.uniform_(0.5, 1.5)
            if getattr(layer.module, "bias", None) is not None:
                layer.module.bias.normal_(0.0, 0.3)
    normscope.fold_norms_(model, x)
    out = model(**x)[0]
    assert _rel(_reload(model, tmp_path)(**x)[0], out) < 1e-6
