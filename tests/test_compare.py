"""``normscope.compare`` and ``normscope compare``: the canary gate on small config-built models."""

import copy
import json
import math
import sys
import textwrap

import pytest
import torch

import zoo
from normscope.cli import main
from normscope.compare import CHECKS, CompareThresholds, compare, load_audit_json, summary_text
from normscope.report.compare_html import render_compare_html

#: The FFN output of layer 1 feeds this norm (the residual add, then LayerNorm).
PRUNED = "encoder.layer.1.intermediate.dense"
NEXT_NORM = "encoder.layer.1.output.LayerNorm"
EPS_LAYER = "encoder.layer.0.output.LayerNorm"


def _bert():
    # a larger init than BERT's 0.02, so that the FFN branch carries a trained-like share of the residual stream
    return zoo.bert(initializer_range=0.1)


def _prune_(linear: torch.nn.Linear, amount: float = 0.3) -> None:
    """Magnitude pruning: zero the ``amount`` fraction of the weights with the smallest magnitude."""
    w = linear.weight
    with torch.no_grad():
        k = int(amount * w.numel())
        cut = w.abs().flatten().kthvalue(k).values
        w[w.abs() <= cut] = 0.0


@pytest.fixture(scope="module")
def bert():
    return _bert()


@pytest.fixture(scope="module")
def bert_audit_json(bert, tmp_path_factory):
    """What ``normscope audit --json`` writes for the baseline (through JSON, as a file would give it back)."""
    from normscope.audit import run_audit
    from normscope.cli.audit import write_json

    model, inputs = bert
    path = tmp_path_factory.mktemp("audit") / "base.json"
    write_json(run_audit(model, inputs, steps=("analysis", "monitor", "quantization")), str(path))
    return load_audit_json(str(path))


def _checks(result):
    return {c["name"]: c for c in result["checks"]}


def test_identical_copy_is_go(bert):
    model, inputs = bert
    # the latency is measured, but a loaded machine must not decide a unit test: its threshold is off here
    result = compare(model, copy.deepcopy(model), inputs, thresholds=CompareThresholds(latency_ratio=math.inf),
                     repeats=3)
    checks = _checks(result)
    assert result["verdict"] == "go" and result["exit_code"] == 0
    assert [c["name"] for c in result["checks"]] == list(CHECKS)
    assert all(c["status"] == "pass" for c in result["checks"]), [c for c in result["checks"] if c["status"] != "pass"]
    assert checks["input_change"]["value"] == 0.0 and checks["output_cosine"]["value"] == pytest.approx(1.0)
    assert checks["output_psi"]["value"] == 0.0 and result["new_findings"] == []
    assert [r["layer"] for r in result["layers"]][0] == "embeddings.LayerNorm"
    assert all(r["variance_ratio"] == pytest.approx(1.0) and r["gamma_drift"] == 0.0 for r in result["layers"])
    lat = result["latency"]
    assert lat["repeats"] == 3 and lat["baseline_ms"] > 0 and lat["candidate_ms"] > 0 and lat["calls_per_sample"] >= 1
    assert result["not_run"] == []
    json.dumps(result)  # JSON-friendly


def test_pruned_ffn_is_no_go_naming_the_next_norm(bert):
    model, inputs = bert
    cand = copy.deepcopy(model)
    _prune_(cand.get_submodule(PRUNED))
    result = compare(model, cand, inputs, latency=False)
    checks = _checks(result)
    assert result["verdict"] == "no-go" and result["exit_code"] == 1
    change = checks["input_change"]
    assert change["status"] == "fail" and change["layer"] == NEXT_NORM and NEXT_NORM in change["reason"]
    assert change["value"] > CompareThresholds().input_change
    rows = {r["layer"]: r for r in result["layers"]}
    # the layers before the pruned Linear layer see exactly the same inputs
    assert all(rows[n]["input_change"] == 0.0 for n in list(rows)[:4])
    assert checks["norm_config"]["status"] == "pass" and checks["gamma_drift"]["status"] == "pass"
    assert checks["latency"]["status"] == "skipped"
    text = summary_text(result)
    assert text.index("FAIL") < text.index("PASS") and NEXT_NORM in text and "verdict: NO-GO" in text


def test_changed_eps_is_no_go_naming_the_layer(bert):
    model, inputs = bert
    cand = copy.deepcopy(model)
    cand.get_submodule(EPS_LAYER).eps = 1e-5
    result = compare(model, cand, inputs, latency=False, quantization=False)
    cfg = _checks(result)["norm_config"]
    assert result["verdict"] == "no-go"
    assert cfg["status"] == "fail" and cfg["layer"] == EPS_LAYER and "1e-12 -> 1e-05" in cfg["reason"]
    row = next(r for r in result["layers"] if r["layer"] == EPS_LAYER)
    assert row["eps_baseline"] == 1e-12 and row["eps_candidate"] == 1e-5
    # a tolerance above the change lets it pass
    loose = compare(model, cand, inputs, latency=False, quantization=False,
                    thresholds=CompareThresholds(eps_rtol=1e8))
    assert _checks(loose)["norm_config"]["status"] == "pass"


def test_gamma_drift_and_variance_ratio(bert):
    model, inputs = bert
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.get_submodule(EPS_LAYER).weight.mul_(1.5)  # gamma drift 0.5, and the next layers' inputs move
        cand.get_submodule("encoder.layer.1.attention.output.dense").weight.mul_(8.0)
    result = compare(model, cand, inputs, latency=False, quantization=False)
    checks = _checks(result)
    assert checks["gamma_drift"]["status"] == "fail" and checks["gamma_drift"]["layer"] == EPS_LAYER
    assert checks["gamma_drift"]["value"] == pytest.approx(0.5, rel=1e-5)
    rows = {r["layer"]: r for r in result["layers"]}
    assert rows[EPS_LAYER]["gamma_max_abs"] == pytest.approx(0.5, rel=1e-5)
    assert checks["variance_ratio"]["status"] == "fail"
    assert checks["variance_ratio"]["layer"] == "encoder.layer.1.attention.output.LayerNorm"
    assert rows["encoder.layer.1.attention.output.LayerNorm"]["variance_ratio"] > 1.1


def test_gamma_outlier_is_a_quantization_no_go(bert):
    model, inputs = bert
    cand = copy.deepcopy(model)
    layer = "encoder.layer.1.attention.output.LayerNorm"
    with torch.no_grad():
        cand.get_submodule(layer).weight[3] = 300.0  # one channel sets the int8 scale of the whole gamma
    result = compare(model, cand, inputs, latency=False)
    quant = _checks(result)["quantization"]
    assert quant["status"] == "fail" and quant["layer"] == layer
    assert "dropped from inf to" in quant["reason"] and "dynamic int8 output SQNR dropped" in quant["reason"]
    assert result["quantization"]["int8_drop_db"] > CompareThresholds().quant_drop_db
    row = next(r for r in result["layers"] if r["layer"] == layer)
    assert row["sqnr_baseline_db"] == math.inf and row["sqnr_candidate_db"] < 20
    assert any(f["kind"] == "gamma_outliers" and f["layer"] == layer for f in result["new_findings"])


def test_nonfinite_candidate_fails_new_findings_and_outputs(bert):
    model, inputs = bert
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.get_submodule(PRUNED).weight[0, 0] = float("nan")
    result = compare(model, cand, inputs, latency=False, quantization=False)
    checks = _checks(result)
    assert checks["new_findings"]["status"] == "fail" and checks["new_findings"]["layer"] == NEXT_NORM
    assert any(f["severity"] == "error" and f["layer"] == NEXT_NORM for f in result["new_findings"])
    assert checks["output_cosine"]["status"] == "fail" and "NaN/Inf" in checks["output_cosine"]["reason"]
    assert result["output"]["nonfinite_candidate"] > 0 == result["output"]["nonfinite_baseline"]
    assert checks["input_change"]["layer"] == NEXT_NORM and checks["input_change"]["value"] == math.inf


def test_latency_check_uses_the_ratio(bert, monkeypatch):
    import normscope.compare as mod

    model, inputs = bert
    monkeypatch.setattr(mod, "_latency", lambda b, c, x, repeats: {
        "baseline_ms": 1.0, "candidate_ms": 2.0, "ratio": 2.0, "repeats": repeats, "clock": "test"})
    result = compare(model, copy.deepcopy(model), inputs, quantization=False, repeats=3)
    lat = _checks(result)["latency"]
    assert result["verdict"] == "no-go" and lat["status"] == "fail" and lat["value"] == 2.0
    assert "fastest of 3 interleaved samples" in lat["reason"]
    ok = compare(model, copy.deepcopy(model), inputs, quantization=False, repeats=3,
                 thresholds=CompareThresholds(latency_ratio=2.5))
    assert ok["verdict"] == "go" and _checks(ok)["latency"]["status"] == "pass"


def test_latency_check_counts_a_slowdown_only_beyond_the_timing_noise(bert, monkeypatch):
    import normscope.compare as mod

    model, inputs = bert
    figures = {"baseline_ms": 1.0, "candidate_ms": 1.6, "ratio": 1.6, "noise": 0.2, "repeats": 7, "clock": "test"}
    monkeypatch.setattr(mod, "_latency", lambda b, c, x, repeats: dict(figures))
    noisy = _checks(compare(model, copy.deepcopy(model), inputs, quantization=False))["latency"]
    assert noisy["status"] == "pass" and "within the timing noise" in noisy["reason"]
    figures.update(candidate_ms=2.5, ratio=2.5, noise=0.1)
    slow = _checks(compare(model, copy.deepcopy(model), inputs, quantization=False))["latency"]
    assert slow["status"] == "fail" and "2.5x" in slow["reason"]


def test_latency_noise_is_the_spread_of_paired_ratios(monkeypatch):
    import normscope.compare as mod

    # per timed sample (two clock reads): warm-up base, cand; then rounds alternating the order, the baseline
    # always 1.0 s, the candidate 1.0, 2.0, 1.0, 1.4 s
    durations = [1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.4, 1.0]
    reads, t = [], 0.0
    for d in durations:
        reads += [t, t + d]
        t += d
    ticks = iter(reads)
    monkeypatch.setattr("normscope.audit._clock", lambda device: lambda: next(ticks))
    monkeypatch.setattr("normscope.audit._call", lambda model, inputs: None)
    monkeypatch.setattr(mod, "LATENCY_SAMPLE_S", 0.0)
    lat = mod._latency(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.zeros(1, 2), 4)
    assert lat["ratio"] == 1.0  # fastest candidate sample over fastest baseline sample
    q = __import__("statistics").quantiles([1.0, 1.0, 1.4, 2.0], n=4)
    assert lat["noise"] == pytest.approx((q[2] - q[0]) / 2) and lat["noise"] > 0


def test_audit_json_baseline(bert, bert_audit_json):
    model, inputs = bert
    same = compare(bert_audit_json, copy.deepcopy(model), inputs, quantization=True)
    checks = _checks(same)
    assert same["verdict"] == "go" and same["baseline"]["source"] == "audit JSON"
    assert checks["variance_ratio"]["status"] == "pass" and checks["variance_ratio"]["value"] == pytest.approx(1.0)
    assert checks["gamma_drift"]["status"] == "pass" and checks["quantization"]["status"] == "pass"
    skipped = {n["check"] for n in same["not_run"]}
    assert skipped == {"input_change", "beta_drift", "output_psi", "output_js", "output_cosine", "latency"}
    assert all("audit JSON" in n["reason"] for n in same["not_run"])

    cand = copy.deepcopy(model)
    cand.get_submodule(EPS_LAYER).eps = 1e-6
    with torch.no_grad():
        cand.get_submodule("embeddings.LayerNorm").weight.add_(0.25)
    changed = compare(bert_audit_json, cand, inputs, latency=False, quantization=False)
    checks = _checks(changed)
    assert changed["verdict"] == "no-go"
    assert checks["norm_config"]["layer"] == EPS_LAYER
    assert checks["gamma_drift"]["status"] == "fail" and checks["gamma_drift"]["layer"] == "embeddings.LayerNorm"


def test_mismatched_models_are_refused(bert):
    model, inputs = bert
    other, _ = zoo.bert(initializer_range=0.1, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"Expected the candidate's normalization layers .* only in the baseline: "
                                         r"'encoder\.layer\.1\.attention\.output\.LayerNorm'"):
        compare(model, other, inputs)
    with pytest.raises(TypeError, match="Expected baseline to be a torch.nn.Module or an audit result dict"):
        compare([1], model, inputs)
    with pytest.raises(ValueError, match="Expected the baseline dict to be an audit result"):
        compare({"layers": 3}, model, inputs)
    with pytest.raises(ValueError, match="Expected two models"):
        compare(model, model, inputs)


def test_thresholds_validation_and_overrides():
    t = CompareThresholds.from_overrides({"input_change": "0.05", "new_findings": "error"})
    assert t.input_change == 0.05 and t.new_findings == "error" and t.variance_ratio == 1.1
    with pytest.raises(ValueError, match=r"Expected thresholds.variance_ratio to be a number > 1, but got 0.5"):
        CompareThresholds(variance_ratio=0.5)
    with pytest.raises(ValueError, match="Expected a threshold name from"):
        CompareThresholds.from_overrides({"nope": "1"})
    with pytest.raises(ValueError, match="Expected thresholds.new_findings"):
        CompareThresholds(new_findings="fatal")


FACTORIES = textwrap.dedent("""\
    import copy
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import zoo

    def base():
        return zoo.bert(initializer_range=0.1)

    def pruned():
        model, inputs = zoo.bert(initializer_range=0.1)
        w = model.encoder.layer[1].intermediate.dense.weight
        with torch.no_grad():
            cut = w.abs().flatten().kthvalue(int(0.3 * w.numel())).values
            w[w.abs() <= cut] = 0.0
        return model, inputs

    def small():
        return zoo.bert(initializer_range=0.1, num_hidden_layers=1)
""")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    from pathlib import Path

    d = tmp_path / "mods"
    d.mkdir()
    (d / "ns_compare_factories.py").write_text(FACTORIES.format(tests=str(Path(__file__).parent)))
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("ns_compare_factories", None)
    yield d
    sys.modules.pop("ns_compare_factories", None)


def test_cli_go_no_go_json_and_report(factories, tmp_path, capsys):
    js, html = tmp_path / "c.json", tmp_path / "c.html"
    code = main(["compare", "ns_compare_factories:base", "ns_compare_factories:base", "--skip", "latency",
                 "--json", str(js), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["verdict"] == "go" and data["exit_code"] == 0 and len(data["checks"]) == len(CHECKS)
    assert "verdict: GO" in out and f"wrote {js}" in out

    code = main(["compare", "ns_compare_factories:base", "ns_compare_factories:pruned", "--skip", "latency",
                 "--skip", "quantization", "--json", str(js), "--report", str(html), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1, err
    data = json.loads(js.read_text())
    assert data["verdict"] == "no-go"
    failed = [c for c in data["checks"] if c["status"] == "fail"]
    assert failed and failed[0]["name"] == "input_change" and failed[0]["layer"] == NEXT_NORM
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("FAIL", "PASS", "SKIPPED")))
    assert lines[first].startswith("FAIL") and NEXT_NORM in lines[first]
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-verdict="no-go"' in page
    assert NEXT_NORM in page and 'data-plot="variance-ratio"' in page and 'data-plot="input-change"' in page

    # threshold raised above the measured change: go again
    code = main(["compare", "ns_compare_factories:base", "ns_compare_factories:pruned", "--skip", "latency",
                 "--skip", "quantization", "--threshold", "input_change=1", "--quiet"])
    assert code == 0, capsys.readouterr().err


def test_cli_audit_json_baseline(factories, bert_audit_json, tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(bert_audit_json))
    code = main(["compare", str(base), "ns_compare_factories:base", "--skip", "quantization", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "SKIPPED" in out and "audit JSON" in out and "verdict: GO" in out


@pytest.mark.parametrize("argv, message", [
    (["ns_compare_factories:base", "ns_compare_factories:small"], "only in the baseline"),
    (["missing.json", "ns_compare_factories:base"], "no such file: BASELINE 'missing.json'"),
    (["ns_compare_factories:base", "ns_compare_factories:base", "--threshold", "bogus=1"], "--threshold:"),
    (["ns_compare_factories:base", "ns_compare_factories:base", "--threshold", "input_change"], "NAME=VALUE"),
    (["ns_compare_factories:base", "ns_compare_factories:base", "--json", "-", "--report", "-"], "standard output"),
])
def test_cli_bad_usage_exits_2(factories, argv, message, capsys):
    code = main(["compare", *argv, "--skip", "latency", "--skip", "quantization", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_json_candidate_and_bad_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["compare", "x:y", str(bad)]) == 2
    assert "the candidate must be a model" in capsys.readouterr().err
    assert main(["compare", str(bad), "x:y"]) == 2
    assert "expected BASELINE" in capsys.readouterr().err


def test_html_renders_skipped_and_new_findings():
    result = {"verdict": "no-go", "exit_code": 1, "baseline": {"name": "a<b", "source": "model"},
              "candidate": {"name": "c"}, "thresholds": CompareThresholds().to_dict(),
              "checks": [{"name": "latency", "status": "skipped", "value": None, "threshold": 1.5, "layer": None,
                          "reason": "not asked for"},
                         {"name": "new_findings", "status": "fail", "value": 1, "threshold": "warning", "layer": "ln",
                          "reason": "new warning"}],
              "layers": [{"layer": "ln", "kind": "layer_norm", "variance_ratio": math.inf, "input_change": None,
                          "gamma_drift": 0.0}],
              "new_findings": [{"kind": "variance_shift", "layer": "ln", "severity": "warning", "message": "m"}],
              "not_run": [{"check": "latency", "reason": "not asked for"}]}
    page = render_compare_html(result)
    assert "a&lt;b" in page and "a<b" not in page
    assert page.index('data-check="new_findings"') < page.index('data-check="latency"')
    assert "render-error" not in page and "Not run" in page
    with pytest.raises(ValueError, match="Expected a comparison result"):
        render_compare_html({"layers": []})
