"""``normscope export``: a factory model, a Hugging Face directory, and bad usage."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normscope.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]

FACTORY_MODULE = textwrap.dedent("""\
    import torch

    def mlp():
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 4))
        return model, (torch.randn(2, 8),)

    def wrong():
        return 42

    not_callable = 3
""")


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "ns_export_factories.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("ns_export_factories", None)
    yield d
    sys.modules.pop("ns_export_factories", None)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(config).save_pretrained(d, safe_serialization=True)
    return d


def test_export_factory(factory_dir, tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    assert main(["export", "ns_export_factories:mlp", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert out.is_file() and out.stat().st_size > 0
    assert "LayerNormalization x1" in stdout and "expected 1" in stdout
    assert "opset 18" in stdout and "max abs diff" in stdout and stdout.rstrip().endswith("OK")
    assert "Traceback" not in err


def test_export_hf_directory(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "gpt2.onnx"
    assert main(["export", str(gpt2_dir), str(out), "--no-verify"]) == 0
    stdout, err = capsys.readouterr()
    assert out.is_file()
    assert "LayerNormalization x3" in stdout and "GPT2Model" in stdout
    assert "not verified" in stdout and "Traceback" not in err


def test_export_subprocess(tmp_path):
    (tmp_path / "ns_export_sub.py").write_text(FACTORY_MODULE)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    p = subprocess.run([sys.executable, "-m", "normscope", "export", "ns_export_sub:mlp", str(out), "--opset", "18"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "LayerNormalization" in p.stdout and "OK" in p.stdout and out.is_file()
    assert "Traceback" not in p.stderr


def _bad_cases(tmp_path, gpt2_dir):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((gpt2_dir / "config.json").read_text())
    data = (gpt2_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "o.onnx")
    return {
        "nonexistent": (["export", str(tmp_path / "nope"), out], "no such file or directory"),
        "no_config": (["export", str(no_config), out], "no config.json"),
        "truncated": (["export", str(truncated), out], "truncated safetensors"),
        "pickled": (["export", str(pickled), out], "pickled weights"),
        "unknown_module": (["export", "ns_no_such_module_xyz:make", out], "unknown module 'ns_no_such_module_xyz'"),
        "unknown_factory": (["export", "ns_export_factories:nope", out], "unknown factory 'nope'"),
        "wrong_return": (["export", "ns_export_factories:wrong", out], "must return (model, example_inputs)"),
        "not_callable": (["export", "ns_export_factories:not_callable", out], "is not callable"),
        "unwritable_out": (["export", "ns_export_factories:mlp", str(a_file / "o.onnx")], "is not a directory"),
        "out_is_dir": (["export", "ns_export_factories:mlp", str(tmp_path)], "it is a directory"),
        "opset": (["export", "ns_export_factories:mlp", out, "--opset", "12"], "--opset must be >= 17"),
        "missing_out": (["export", "ns_export_factories:mlp"], "required"),
    }


BAD = ["nonexistent", "no_config", "truncated", "pickled", "unknown_module", "unknown_factory", "wrong_return",
       "not_callable", "unwritable_out", "out_is_dir", "opset", "missing_out"]


@pytest.mark.parametrize("case", BAD)
def test_bad_usage(case, factory_dir, gpt2_dir, tmp_path, capsys):
    argv, message = _bad_cases(tmp_path, gpt2_dir)[case]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "o.onnx").exists()


def test_missing_onnx_extra(factory_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert main(["export", "ns_export_factories:mlp", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'normscope[onnx]'" in err and "onnxscript" in err


def test_transformers_missing(tmp_path, gpt2_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["export", str(gpt2_dir), str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers" in err and "normscope[dev]" in err
