"""normscope.export_onnx: normscope modules and ops export as cleanly as torch's norms, and verify."""

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import normscope

importlib.import_module("onnx")
importlib.import_module("onnxruntime")
importlib.import_module("onnxscript")

from normscope.analysis.onnx_export import ExportReport, count_norm_nodes, export_onnx  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(16, 32), nn.LayerNorm(32)
        self.fc2, self.ln2 = nn.Linear(32, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.ln2(self.fc2(torch.relu(self.ln1(self.fc1(x)))))


class RMSModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(16, 16), normscope.nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        return self.norm(self.fc(x))


class AddNorm(nn.Module):
    """Pre-LN residual block calling the fused functional op with a LayerNorm module's parameters."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        return normscope.add_layer_norm(self.fc(x), x, 16, self.norm.weight, self.norm.bias, self.norm.eps)


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture
def x():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def test_torch_layer_norm_and_converted_model_export_alike(tmp_path, x):
    torch.manual_seed(0)
    model = _perturb(MLP())
    ref = export_onnx(model, x, tmp_path / "torch.onnx")
    assert isinstance(ref, ExportReport) and ref.exporter == "dynamo" and ref.opset == 18
    assert ref.norm_nodes == {"LayerNormalization": 2} and ref.expected_norms == 2
    assert ref.ok and ref.warnings == () and ref.max_abs_diff < 1e-5 and ref.max_rel_diff < 1e-5

    model.train()
    assert len(normscope.convert(model)) == 2
    report = export_onnx(model, (x,), str(tmp_path / "normscope.onnx"))
    assert model.training and all(m.training for m in model.modules())  # training flags restored
    assert report.norm_nodes == ref.norm_nodes and report.expected_norms == 2
    assert report.ok and report.max_abs_diff < 1e-5
    # LayerNormalization on the last axis with float32 statistics, as torch's exporter writes it
    import onnx

    lns = [n for n in onnx.load(report.path).graph.node if n.op_type == "LayerNormalization"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in lns]
    assert all(a.get("axis") == -1 and a.get("stash_type", 1) == 1 for a in attrs), attrs
    assert sorted(round(a["epsilon"], 9) for a in attrs) == [1e-5, 1e-5]


@pytest.mark.parametrize("opset, expected", [(18, {"RMSNormPattern": 1}), (23, {"RMSNormalization": 1})])
def test_rms_norm(tmp_path, x, opset, expected):
    torch.manual_seed(0)
    model = _perturb(RMSModel())
    report = export_onnx(model, x, tmp_path / "rms.onnx", opset=opset)
    assert report.opset == opset and report.norm_nodes == expected
    assert report.ok and report.max_abs_diff < 1e-5, report
    # same graph as torch's own RMSNorm
    torch_model = RMSModel()
    torch_model.norm.__class__ = nn.RMSNorm
    assert count_norm_nodes(export_onnx(torch_model, x, tmp_path / "t.onnx", opset=opset).path) == expected


def test_add_layer_norm_exports_as_add_and_layer_normalization(tmp_path, x):
    import onnx

    torch.manual_seed(0)
    model = _perturb(AddNorm())
    report = export_onnx(model, {"x": x}, tmp_path / "add.onnx")
    assert report.norm_nodes == {"LayerNormalization": 1} and report.ok and report.max_abs_diff < 1e-5
    graph = onnx.load(report.path).graph
    ln = next(n for n in graph.node if n.op_type == "LayerNormalization")
    producer = {o: n for n in graph.node for o in n.output}
    node = producer[ln.input[0]]
    while node.op_type in ("Reshape", "Cast"):
        node = producer[node.input[0]]
    assert node.op_type == "Add"
    assert len(graph.output) == 2  # y and h


def test_masked_op_exports_as_reference_pattern(tmp_path, x):
    class Masked(nn.Module):
        def forward(self, x, mask):
            return normscope.masked_rms_norm(x, mask, 16, eps=1e-6)

    mask = torch.rand(2, 5, 1, generator=torch.Generator().manual_seed(1)) > 0.4
    report = export_onnx(Masked(), (x, mask), tmp_path / "masked.onnx")
    assert report.ok and report.expected_norms == 0 and report.max_abs_diff < 1e-5


def test_mismatched_norm_count_is_reported(tmp_path, x):
    model = MLP()
    model.unused = nn.LayerNorm(16)  # discovered, never called
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert not report.ok and report.expected_norms == 3 and report.norm_nodes == {"LayerNormalization": 2}
    assert any("expected 3 norm operator(s)" in w for w in report.warnings)


def test_verify_false_skips_onnxruntime(tmp_path, x):
    report = export_onnx(MLP(), x, tmp_path / "m.onnx", verify=False)
    assert report.ok and report.max_abs_diff is None and report.max_rel_diff is None


def test_bad_arguments(tmp_path, x):
    model = MLP()
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module, but got str"):
        export_onnx("model", x, tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="Expected example_inputs to be a torch.Tensor, a tuple"):
        export_onnx(model, 3, tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="Expected path to be a str or os.PathLike, but got int"):
        export_onnx(model, x, 3)
    with pytest.raises(ValueError, match="but got the directory"):
        export_onnx(model, x, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "a.onnx")
    with pytest.raises(ValueError, match=r"Expected opset >= 17 .*but got 16"):
        export_onnx(model, x, tmp_path / "a.onnx", opset=16)
    with pytest.raises(TypeError, match="Expected opset to be an int, but got float"):
        export_onnx(model, x, tmp_path / "a.onnx", opset=18.0)
    with pytest.raises(TypeError, match="Expected verify to be a bool"):
        export_onnx(model, x, tmp_path / "a.onnx", verify="yes")


def test_missing_extra_names_the_install_command(tmp_path, x, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'normscope\[onnx\]'"):
        export_onnx(MLP(), x, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_module_import_does_not_import_onnx():
    code = ("import sys, normscope, normscope.analysis.onnx_export\n"
            "print([m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow
def test_gpt2_from_config(tmp_path):
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = _perturb(transformers.GPT2Model(cfg))
    assert len(normscope.convert(model)) == 5
    report = export_onnx(model, {"input_ids": torch.randint(0, 99, (2, 7))}, tmp_path / "gpt2.onnx")
    assert report.norm_nodes == {"LayerNormalization": 5} and report.expected_norms == 5
    assert report.ok and report.max_abs_diff < 1e-4, report


def test_export_cache_reuses_the_graph_of_an_identical_model_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    cache = tmp_path / "cache"
    first = normscope.export_onnx(model, x, tmp_path / "a.onnx", cache_dir=cache)
    second = normscope.export_onnx(model, x, tmp_path / "b.onnx", cache_dir=cache)
    assert not first.cached and second.cached and second.ok and second.max_abs_diff is not None
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert len(list(cache.glob("*.onnx"))) == 1
    # other weights, other input shape: exported again (and checked against the new weights)
    with torch.no_grad():
        model[1].weight.mul_(2.0)
    third = normscope.export_onnx(model, x, tmp_path / "c.onnx", cache_dir=cache)
    fourth = normscope.export_onnx(model, torch.randn(5, 8), tmp_path / "d.onnx", cache_dir=cache)
    assert not third.cached and not fourth.cached and third.ok and fourth.ok
    assert len(list(cache.glob("*.onnx"))) == 3


def test_output_comparison_shared_by_the_onnx_and_tflite_exports():
    import numpy as np

    from normscope.analysis.onnx_export import compare_outputs

    ref = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 2.0])
    same = np.array([np.nan, np.inf, -np.inf, 1.0 + 1e-7, 2.0], dtype=np.float32)
    max_abs, max_rel, within, bad = compare_outputs([same], [ref], "ONNX")
    assert within and bad == [] and 0 < max_abs < 1e-6  # NaN and +-Inf in the same places count as equal
    flipped = same.copy()
    flipped[1] = -np.inf  # an Inf of the other sign
    assert compare_outputs([flipped], [ref], "ONNX")[3] == ["output 0 has non-finite values in other places than "
                                                            "PyTorch's"]
    moved = same.copy()
    moved[0], moved[3] = 1.0, np.nan
    assert not compare_outputs([moved], [ref], "ONNX")[2]
    far = np.array([np.nan, np.inf, -np.inf, 1.5, 2.0], dtype=np.float32)
    (msg,) = compare_outputs([far], [ref], "TFLite")[3]
    assert msg.startswith("output 0 (torch.float32): max abs diff 0.5 >")
    assert compare_outputs([np.zeros(3)], [torch.zeros(4)], "TFLite")[3] == [
        "output 0 has shape [3] in TFLite but [4] in PyTorch"]
    ids = torch.tensor([3, 1, 2])
    assert compare_outputs([np.array([3, 1, 2], dtype=np.int32)], [ids], "TFLite")[2]  # int32 on the device
    assert compare_outputs([np.array([3, 1, 0])], [ids], "ONNX")[3] == ["output 0 (torch.int64) differs"]
