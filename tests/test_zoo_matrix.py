"""Every family of the zoo (tests/zoo.py) through analyze, convert, fold (with save/reload for the Hugging Face
models), torch.compile and the ONNX export checked by onnxruntime. The expected placement of each norm is
written down here from the architecture (docs/analysis.md's rules), not taken from the code's output; gamma and
beta are randomized first so that folding and conversion are not no-ops."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import normscope
import zoo

# placement per layer-name pattern, from each architecture:
# pre-LN (x + f(norm(x))) blocks: GPT-2, ViT, T5, Whisper; their last norm normalizes the end of the stream
# (final). Post-LN (norm(x + f(x))): BERT, wav2vec2's encoder with do_stable_layer_norm=False. An embedding
# norm whose output is the residual stream is post (BERT's, ConvNeXt's stem). Norms inside a branch (ConvNeXt's
# block norm after the depthwise conv, wav2vec2's feature extractor GroupNorm and feature projection norm, the
# pooled head norm) are other; ConvNeXt's downsampling norm normalizes the end of a stage's pre-normalized
# residual stream (final).
EXPECTED = {
    "gpt2": [(r"transformer\.h\.\d+\.ln_[12]", "pre"), (r"transformer\.ln_f", "final")],
    "bert": [(r"embeddings\.LayerNorm", "post"), (r"encoder\.layer\.\d+\.(attention\.)?output\.LayerNorm", "post")],
    "vit": [(r".*layers\.\d+\.layernorm_(before|after)", "pre"), (r"layernorm", "final")],
    "t5": [(r"(en|de)coder\.block\.\d+\.layer\.\d\.layer_norm", "pre"), (r"(en|de)coder\.final_layer_norm", "final")],
    "whisper": [(r"(en|de)coder\.layers\.\d+\.(self_attn|encoder_attn|final)_layer_norm", "pre"),
                (r"(en|de)coder\.layer_norm", "final")],
    "wav2vec2": [(r"feature_extractor\.conv_layers\.0\.layer_norm", "other"),
                 (r"feature_projection\.layer_norm", "other"), (r"encoder\.layer_norm", "post"),
                 (r"encoder\.layers\.\d+\.(final_)?layer_norm", "post")],
    "convnext": [(r"backbone\.embeddings\.layernorm", "post"),
                 (r"backbone\.encoder\.stages\.\d+\.layers\.\d+\.layernorm", "other"),
                 (r"backbone\.encoder\.stages\.\d+\.downsampling_layer\.0", "final"), (r"head\.norm", "other")],
}
FAMILIES = sorted(zoo.ZOO)


def _randomized(name):
    model, x = zoo.ZOO[name]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in normscope.discovery.find_norm_layers(model):
            for p in (getattr(layer.module, "weight", None), getattr(layer.module, "bias", None)):
                if isinstance(p, torch.nn.Parameter):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, x


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if isinstance(v, torch.Tensor))


def test_every_family_has_expectations():
    assert sorted(EXPECTED) == FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_placements_are_those_of_the_architecture(name):
    model, x = _randomized(name)
    report = normscope.analyze(model, x)
    got = {lr.name: lr.placement for lr in report.layers}
    want = {}
    for layer in got:
        matches = [p for pattern, p in EXPECTED[name] if re.fullmatch(pattern, layer)]
        assert len(matches) == 1, f"{name}: {layer} matches {len(matches)} expectations"
        want[layer] = matches[0]
    assert got == want


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_and_compile_keep_the_outputs(name):
    model, x = _randomized(name)
    ref = _out(model, x)
    converted = copy.deepcopy(model)
    result = normscope.convert(converted)
    assert result.replaced, f"{name}: nothing converted ({result.skipped})"
    torch.testing.assert_close(_out(converted, x), ref, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(converted, backend="aot_eager")
    torch.testing.assert_close(_out(compiled, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_fold_keeps_the_outputs_and_survives_save_and_reload(name, tmp_path):
    model, x = _randomized(name)
    ref = _out(model, x)
    folded = copy.deepcopy(model)
    result = normscope.fold_norms_(folded, x)
    torch.testing.assert_close(_out(folded, x), ref, rtol=1e-4, atol=1e-4)
    if not hasattr(folded, "save_pretrained"):
        return
    folded.save_pretrained(tmp_path / name)
    reloaded = type(folded).from_pretrained(tmp_path / name).eval()
    # a fold either round-trips through the model's own save/load or was refused with the reason
    torch.testing.assert_close(_out(reloaded, x), ref, rtol=1e-4, atol=1e-4)
    assert result.folded or result.skipped


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_matches_under_onnxruntime(name, tmp_path):
    model, x = _randomized(name)
    converted = copy.deepcopy(model)
    normscope.convert(converted)
    report = normscope.export_onnx(converted, x, tmp_path / f"{name}.onnx")
    assert report.ok, report.warnings
    assert report.max_rel_diff is not None and report.max_rel_diff < 1e-4
