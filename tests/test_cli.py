"""The ``normscope`` command line: ``env``, ``bench`` and bad usage."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normscope.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_env():
    p = _run("-m", "normscope", "env")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert torch.__version__ in p.stdout
    for key in ("python:", "triton:", "onnxruntime:", "transformers:", "CUDA available:",
                "backend (CPU tensors):", "backend (CUDA tensors):", "NORMSCOPE_BACKEND:"):
        assert key in p.stdout


def test_bench_quick(tmp_path):
    csv_path, md_path = tmp_path / "r.csv", tmp_path / "r.md"
    p = _run("-m", "normscope", "bench", "--quick", "--device", "cpu", "--op", "rms_norm",
             "--providers", "normscope,torch,copy", "--dtype", "fp32", "--modes", "forward,backward",
             "--reps", "2", "--csv", str(csv_path), "--markdown", str(md_path))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "| shape | dtype | normscope | torch | copy |" in p.stdout
    assert "## rms_norm · forward" in p.stdout and "## rms_norm · backward" in p.stdout
    assert "allocator: warm" in p.stdout
    assert "[1/6] rms_norm forward 1024x1024 fp32 normscope" in p.stderr
    assert md_path.read_text() == p.stdout
    assert len(csv_path.read_text().splitlines()) == 1 + 6


BAD = [
    (["bench", "--op", "nope"], "unknown op 'nope'"),
    (["bench", "--shapes", "8192"], "malformed shape '8192'"),
    (["bench", "--shapes", "8192xN"], "malformed shape"),
    (["bench", "--dtype", "fp64"], "unknown dtype 'fp64'"),
    (["bench", "--modes", "sideways"], "unknown mode"),
    (["bench", "--providers", "apex"], "unknown provider"),
    (["bench", "--reps", "0"], "reps must be >= 1"),
    (["bench", "--reps", "x"], "invalid int value"),
    (["bench", "--device", "tpu"], "invalid choice"),
    (["bench", "--allocator", "huge"], "invalid choice"),
    (["bench", "--param-dtype", "int8"], "unknown param dtype"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_usage(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], err
    assert "Traceback" not in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err


def test_bad_usage_subprocess_and_script():
    p = _run("-m", "normscope", "bench", "--op", "layer_norm", "--shapes", "12x")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "normscope bench: error: malformed shape '12x' (expected MxN, e.g. 8192x1024)"
    p = _run(str(ROOT / "benchmarks" / "bench_rms_norm.py"), "--op", "layer_norm")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "bench_rms_norm.py: error: unknown op 'layer_norm' (choose from rms_norm or all)"]


def test_import_normscope_stays_light():
    p = _run("-c", "import sys, normscope; print(sorted(m for m in sys.modules "
                   "if m.startswith(('normscope.cli', 'normscope.bench', 'triton'))))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_help_exits_zero(capsys):
    assert main(["bench", "--help"]) == 0
    assert "--allocator" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-m", "normscope", "--version"], ["-m", "normscope.cli", "--version"]])
def test_version_comes_from_the_package_metadata(argv):
    from importlib.metadata import version

    if argv[1] == "normscope.cli":  # the console script's entry point, called the way the script calls it
        argv = ["-c", "import sys; from normscope.cli import main; sys.exit(main(['--version']))"]
    p = _run(*argv)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"normscope {version('normscope')}"
    import normscope

    assert normscope.__version__ == version("normscope")
