"""Xiong et al. (2020), "On Layer Normalization in the Transformer Architecture", from the monitor's numbers.

The robust part of the paper's analysis: at initialisation the gradients of the last layer are larger in a
post-LN Transformer than in a pre-LN one, and the gap grows with depth (the pre-LN gradient shrinks as
layers are added, the post-LN one does not).

The paper measures the gradient of the last layer's feed-forward weight ``W^2``. ``normscope.Monitor``
watches normalization layers only, so it does not report that weight's gradient. What it does report
for each norm layer is ``grad_param_norm`` (the L2 norm of the layer's gamma and beta gradients) and
``grad_input_norm`` (the L2 norm of the gradient w.r.t. the layer's input through that layer), both
averaged over the sampled steps of a window. The test uses those of the last layer's feed-forward-block
norm (``layers[-1].norm2``): in post-LN it is the LayerNorm right after the feed-forward residual sum,
so its gradients are the ones flowing into ``W^2``'s output; in pre-LN it is the LayerNorm feeding the
feed-forward block. The same comparison is made on ``W^2``'s gradient itself, read directly from
``linear2.weight.grad`` as a reference, and the monitor's ``grad_param_norm`` is checked against
gamma/beta gradients read directly.

Setup: ``torch.nn.TransformerEncoder`` (d_model 128, 4 heads, feed-forward 512, no dropout),
``norm_first=False`` (post-LN) vs ``True`` (pre-LN, with the usual final LayerNorm), an embedding and a
linear cross-entropy head over 64 classes, PyTorch's default initialisation, 4 random batches of 8 x 16
tokens, gradients at initialisation (no optimizer step), 3 seeds, at 6 and 12 layers. Measured on CPU:
``W^2`` gradient post/pre about 1.75x at 6 layers and 3.6x at 12 (the paper's trend); the monitor's
``grad_param_norm`` about 10x and 21x, ``grad_input_norm`` about 13x and 55x: the monitor's quantities
show the same effect, larger.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import normscope

D, HEADS, VOCAB, BATCH, SEQ, BATCHES = 128, 4, 64, 8, 16, 4
SEEDS = (0, 1, 2)


def build(layers: int, norm_first: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = torch.nn.TransformerEncoderLayer(D, HEADS, 4 * D, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = torch.nn.TransformerEncoder(block, layers, norm=torch.nn.LayerNorm(D) if norm_first else None,
                                          enable_nested_tensor=False)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, D), encoder, torch.nn.Linear(D, VOCAB))


def measure(layers: int, norm_first: bool, seed: int) -> dict:
    """Gradient norms of the last layer at initialisation, averaged over BATCHES batches."""
    model = build(layers, norm_first, seed)
    last = model[1].layers[-1]
    g = torch.Generator().manual_seed(1000 + seed)
    ff, direct_param = [], []
    with normscope.Monitor(model, every=1, flush_every=None) as mon:
        for _ in range(BATCHES):
            x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            ff.append(last.linear2.weight.grad.norm().item())
            direct_param.append(torch.cat([last.norm2.weight.grad, last.norm2.bias.grad]).norm().item())
            model.zero_grad(set_to_none=True)
            mon.step()
        records = mon.flush()
    name = f"1.layers.{layers - 1}.norm2"
    (rec,) = [r for r in records if r["type"] == "layer_stats" and r["layer"] == name]
    assert rec["grad_param_steps"] == BATCHES and rec["grad_input_steps"] == BATCHES
    return {"ff_weight": statistics.fmean(ff), "direct_param": statistics.fmean(direct_param),
            "grad_param_norm": rec["grad_param_norm"], "grad_input_norm": rec["grad_input_norm"]}


@pytest.fixture(scope="module")
def ratios():
    """post-LN / pre-LN ratio of each quantity, averaged over seeds, for 6 and 12 layers."""
    out = {}
    for layers in (6, 12):
        per_seed = []
        for seed in SEEDS:
            post, pre = measure(layers, False, seed), measure(layers, True, seed)
            for m in (post, pre):  # the monitor's reading matches the gradients read directly
                assert m["grad_param_norm"] == pytest.approx(m["direct_param"], rel=1e-4)
            per_seed.append({k: post[k] / pre[k] for k in ("ff_weight", "grad_param_norm", "grad_input_norm")})
        out[layers] = {k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0]}
    return out


@pytest.mark.parametrize("quantity", ["grad_param_norm", "grad_input_norm"])
def test_post_ln_last_layer_gradient_larger_and_gap_grows_with_depth(ratios, quantity):
    r6, r12 = ratios[6][quantity], ratios[12][quantity]
    assert r6 > 1.0, f"{quantity}: post/pre = {r6:.2f} at 6 layers"
    assert r12 > r6, f"{quantity}: post/pre = {r6:.2f} at 6 layers, {r12:.2f} at 12"


def test_reference_ff_weight_gradient(ratios):
    """The paper's own quantity, read directly: about 1.7x at 6 layers and 3.5-4x at 12."""
    r6, r12 = ratios[6]["ff_weight"], ratios[12]["ff_weight"]
    assert r6 > 1.0 and r12 > r6, (r6, r12)
