"""The audit is right on every architecture: config-built models of the zoo (tests/zoo.py), one test per bug."""

from __future__ import annotations

import importlib.util
import json
import time
import types

import pytest
import torch

import normscope
import zoo
from normscope.audit import run_audit, summary_text
from normscope.cli import main

transformers = pytest.importorskip("transformers")


def kinds(result, kind):
    return [f for f in result["findings"] if f["kind"] == kind]


def step(result, name):
    return next(s for s in result["steps"] if s["name"] == name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: zoo.save_hf(name, root / name) for name in zoo.HF_FAMILIES}


# ---- 3. a failed step is a failed step everywhere -----------------------------------------------------------


def test_failed_dynamic_int8_is_a_failed_step_with_its_reason():
    model, x = zoo.bert()
    result = run_audit(model, x, dtype=torch.float16, steps=("analysis", "quantization"))
    q = step(result, "quantization")
    assert q["status"] == "failed" and q["message"].startswith("dynamic int8: ")
    assert result["quant"]["layers"] if "layers" in result["quant"] else result["quant"]["ranking"]  # sweep kept
    assert f"step quantization failed: {q['message']}" in summary_text(result).splitlines()


def test_cli_shows_a_failed_step_in_the_progress_line_and_the_summary(hf_dirs, capsys):
    code = main(["audit", hf_dirs["bert"], "--dtype", "fp16", "--skip", "export", "--skip", "profile",
                 "--skip", "monitor", "--no-report"])
    out, err = capsys.readouterr()
    assert code == 1  # fp16 BERT: eps 1e-12 underflows (bug 5), an error
    assert "quantization: failed in" in err and "(dynamic int8: " in err
    assert any(line.startswith("step quantization failed: dynamic int8: ") for line in out.splitlines())


# ---- 2. inputs built from the config, or the one to pass named ---------------------------------------------


@pytest.mark.parametrize("name", zoo.HF_FAMILIES)
def test_cli_builds_inputs_from_the_config(name, hf_dirs, tmp_path, capsys):
    code = main(["audit", hf_dirs[name], "--skip", "export", "--skip", "quantization", "--skip", "profile",
                 "--no-report", "--quiet", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert all(s["status"] == "ok" for s in result["steps"])
    main_input = {"vit": "pixel_values", "whisper": "input_features", "wav2vec2": "input_values"}.get(name, "input_ids")
    assert result["model"]["inputs"].startswith(main_input)
    if name in ("t5", "whisper"):
        assert "decoder_input_ids" in result["model"]["inputs"]


def test_cli_takes_pixel_values_from_inputs(hf_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"pixel_values": torch.randn(2, 3, 16, 16)}, str(tmp_path / "px.safetensors"))
    code = main(["audit", hf_dirs["vit"], "--inputs", str(tmp_path / "px.safetensors"), "--skip", "export",
                 "--skip", "quantization", "--skip", "profile", "--no-report", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "inputs: tensors from px.safetensors" in out


def test_cli_completes_decoder_inputs_of_given_tensors(hf_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 90, (2, 6))}, str(tmp_path / "ids.safetensors"))
    code = main(["audit", hf_dirs["t5"], "--inputs", str(tmp_path / "ids.safetensors"), "--skip", "export",
                 "--skip", "quantization", "--skip", "profile", "--no-report", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err


def test_an_input_that_cannot_be_built_is_named():
    from normscope.cli._models import UsageError, hf_example_inputs

    class Vision(torch.nn.Module):
        main_input_name = "pixel_values"

        def forward(self, pixel_values):
            return pixel_values

    with pytest.raises(UsageError, match=r"no image_size\); pass 'pixel_values' with --inputs"):
        hf_example_inputs(Vision(), types.SimpleNamespace(model_type="custom"))


# ---- 5. one eps rule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_fp16_eps_findings_are_those_of_assert_eps_safe(name):
    model, x = zoo.ZOO[name]()
    with pytest.raises(AssertionError) as e:
        normscope.checks.assert_eps_safe(model, torch.float16)
    failing = {line.split(" (")[0].strip() for line in str(e.value).splitlines()[1:] if line.startswith("  ")}
    result = run_audit(model, x, dtype=torch.float16, steps=("analysis",))
    errors = {f["layer"] for f in kinds(result, "eps_underflow") if f["severity"] == "error"}
    assert errors == failing and len(errors) == 5 and result["exit_code"] == 1


def test_fp32_eps_is_safe_by_both():
    model, x = zoo.bert()
    normscope.checks.assert_eps_safe(model, torch.float32)
    assert not kinds(run_audit(model, x, steps=("analysis",)), "eps_underflow")


# ---- 6. fold / convert / quiet / baseline / table ------------------------------------------------------------


def test_convnext_head_norm_is_folded_as_analyze_says():
    model, x = zoo.convnext()
    report = normscope.analyze(model, x)
    assert report["head.norm"].foldable
    before = model(x)
    result = normscope.fold_norms_(model, x)
    assert "head.norm" in {f.norm for f in result.folded}
    assert {f.norm for f in result.folded} == {lr.name for lr in report.layers if lr.foldable}
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_convert_and_fold_skip_with_the_same_type_and_the_right_reason():
    model, x = zoo.wav2vec2()  # a GroupNorm in the feature extractor
    converted = normscope.convert(model)
    folded = normscope.fold_norms_(model, x)
    c = {s.name: s for s in converted.skipped}
    f = {s.name: s for s in folded.skipped}
    name = "feature_extractor.conv_layers.0.layer_norm"
    assert type(c[name]) is type(f[name]) is normscope.nn.Skipped
    assert "GroupNorm normalizes over the batch, groups or instances" in c[name].reason
    assert c[name].module == f[name].module == "GroupNorm"
    bn = normscope.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    assert "BatchNorm2d normalizes over the batch" in bn.skipped[0].reason


def test_quiet_shows_no_loading_bar(hf_dirs, capsys):
    code = main(["audit", hf_dirs["gpt2"], "--skip", "export", "--skip", "quantization", "--skip", "profile",
                 "--no-report", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""


def test_unrelated_baseline_is_refused(hf_dirs, tmp_path, capsys):
    model, x = zoo.bert()
    base = run_audit(model, x, steps=("analysis", "monitor"))
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(base, default=str))
    gpt2, ids = zoo.gpt2_lm()
    with pytest.raises(ValueError, match="Expected a baseline of the same architecture"):
        run_audit(gpt2, ids, baseline=base["snapshot"], steps=("analysis", "monitor"))
    code = main(["audit", hf_dirs["gpt2"], "--baseline", str(path), "--skip", "export", "--skip", "quantization",
                 "--skip", "profile", "--no-report", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the comparison would find nothing" in err and len(err.strip().splitlines()) == 1


def test_table_with_the_kind_column_fits_the_width():
    model, x = zoo.wav2vec2()  # GroupNorm and LayerNorm: the kind column appears
    text = summary_text(run_audit(model, x, steps=("analysis", "profile")))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("layer "))
    assert " kind " in header and header.rstrip().endswith(" ms") and len(header) <= 120
    table = lines[lines.index(header) + 2:lines.index(header) + 7]
    assert all(len(line) <= 120 for line in table) and all(line.split()[-1] != "" for line in table)


# ---- 7. findings that do not mislead ------------------------------------------------------------------------


def test_conv_stem_norm_is_not_post_ln():
    model, x = zoo.convnext()
    result = run_audit(model, x, steps=("analysis",))
    assert {e["placement"] for e in result["layers"] if e["name"] == "backbone.embeddings.layernorm"} == {"post"}
    assert not kinds(result, "post_ln_depth")


def test_bert_post_ln_counts_the_residual_norms():
    model, x = zoo.bert()
    (f,) = kinds(run_audit(model, x, steps=("analysis",)), "post_ln_depth")
    assert f["value"] == 4 and f["layer"] == "encoder.layer.0.attention.output.LayerNorm"


def test_fresh_convnext_layer_scale_is_no_gradient_warning():
    model, x = zoo.convnext(depths=[3, 3])
    result = run_audit(model, x, steps=("analysis", "monitor"))
    grads = kinds(result, "grad_outlier")
    assert grads, "the monitor flags the layer-scaled branches at initialisation"
    assert {f["severity"] for f in grads} == {"info"}
    assert all("layer scale" in f["message"] for f in grads)
    assert any("explode" in f["message"] and f["layer"] == "head.norm" for f in grads)


def test_gradient_outlier_without_layer_scale_stays_a_warning():
    model, x = zoo.convnext(depths=[3, 3])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.fill_(1.0)
        model.backbone.encoder.stages[0].layers[1].layernorm.weight.mul_(1e6)  # a real explosion
    result = run_audit(model, x, steps=("analysis", "monitor"))
    assert any(f["severity"] == "warning" for f in kinds(result, "grad_outlier"))


# ---- norm_dims: a channels-first LayerNorm2d whose width differs from its channels ---------------------------


class ChannelsFirst(torch.nn.Module):
    def __init__(self, pool: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 1)
        self.norm = zoo.LayerNorm2d(6)
        self.fc = torch.nn.Linear(6, 4)
        self.pool = pool
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_(0.0, 0.5)

    def forward(self, x):
        h = self.conv(x)
        if self.pool:
            h = torch.nn.functional.adaptive_avg_pool2d(h, 1)
            return self.fc(self.norm(h).flatten(1))
        return self.fc(self.norm(h).permute(0, 2, 3, 1))  # the Linear reads the channel axis (6), width is 7


@pytest.mark.parametrize("pool", [True, False])
def test_channels_first_norm_in_every_analysis_step(pool, tmp_path):
    model = ChannelsFirst(pool).eval()
    x = torch.randn(2, 3, 5, 7)
    (layer,) = normscope.discovery.find_norm_layers(model)
    assert layer.norm_dims == (1,)
    rep = normscope.analyze(model, x)["norm"]
    before = model(x)
    folded = normscope.fold_norms_(model, x)
    assert rep.foldable == pool and [f.norm for f in folded.folded] == (["norm"] if pool else [])
    if not pool:
        assert "channel axis" in rep.fold_reason and folded.skipped[0].reason == rep.fold_reason
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    q = normscope.quant_sensitivity(model, x)
    assert q["norm"].worst_sqnr_db is not None
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        rep = normscope.export_onnx(model, x, str(tmp_path / "m.onnx"))
        assert rep.ok and rep.expected_norms == 1 and rep.max_abs_diff < 1e-4


# ---- 4. norm latency: robust to a disturbed run, advice by layer kind ---------------------------------------


class Load:
    """A machine under load, made deterministic: in one forward the norm is preempted (20 ms), in every other
    forward the rest of the model is (30 ms). The fastest forward by the wall clock is then the one with the
    preempted norm. The rest of the model computes for 3 ms in every forward."""

    def __init__(self):
        self.calls = 0
        self.active = False


class PreemptedNorm(torch.nn.LayerNorm):
    def __init__(self, n, load):
        super().__init__(n)
        self.load = load

    def forward(self, x):
        if self.load.active and x.shape[0] == 3:  # not the discovery's probes of what the module computes
            self.load.calls += 1
            if self.load.calls == 5:  # the 2nd timed forward (after the audit's check run and 2 warm-up runs)
                time.sleep(0.02)
        return super().forward(x)


class PreemptedRest(torch.nn.Module):
    def __init__(self, load):
        super().__init__()
        self.load = load

    def forward(self, x):
        if self.load.active:
            end = time.thread_time() + 0.003
            while time.thread_time() < end:
                pass
            if self.load.calls != 5:
                time.sleep(0.03)
        return x


def test_one_preempted_norm_call_does_not_raise_norm_latency():
    load = Load()
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), PreemptedNorm(64, load), PreemptedRest(load),
                                torch.nn.Linear(64, 16)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(50):  # a warm process (torch's first calls of an op in a process are slow)
            model(x)
    load.active = True
    result = run_audit(model, x, steps=("profile",))
    assert load.calls > 5 and result["profile"]["repeats"] == 7
    p = result["profile"]
    assert p["norm_ms"] < 10 and p["share"] < 0.1 and not kinds(result, "norm_latency"), (p, load.calls)


class SlowBatchNorm(torch.nn.BatchNorm1d):
    """A BatchNorm that computes for 5 ms (busy, as a slow kernel is: CPU time, not a sleep)."""

    def forward(self, x):
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return super().forward(x)


def test_batchnorm_latency_advice_fits_batchnorm():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), SlowBatchNorm(8)).eval()
    result = run_audit(model, torch.randn(4, 8), steps=("profile",))
    (f,) = kinds(result, "norm_latency")
    assert "fold it into the preceding convolution" in f["message"]
    assert "normscope.convert" not in f["message"] and "fold_norms_" not in f["message"]
    p = result["profile"]
    assert p["share"] > 0.5 and p["share_noise"] is not None
    assert sum(o[1] for o in p["top_ops"]) <= p["forward_ms"] * 1.0001
