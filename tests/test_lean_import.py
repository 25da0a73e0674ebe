"""`import normscope` stays light: no triton / onnx / transformers, and no CUDA initialisation."""

import subprocess
import sys

HEAVY = ["triton", "onnx", "onnxruntime", "transformers", "prometheus_client", "tensorboard", "matplotlib"]


def test_import_is_lean():
    code = (
        "import sys, torch, normscope\n"
        "x = torch.randn(4, 8)\n"
        "normscope.layer_norm(x, 8); normscope.rms_norm(x, 8)\n"  # the CPU path stays lean too
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "print('CUDA_INIT', torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
    assert "CUDA_INIT False" in out, out
