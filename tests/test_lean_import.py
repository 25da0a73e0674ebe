"""`import normscope` stays light: no triton / onnx / transformers, and no CUDA initialisation."""

import subprocess
import sys

HEAVY = ["triton", "onnx", "onnxruntime", "transformers", "prometheus_client", "tensorboard", "matplotlib", "mlflow",
         "normscope.cli", "normscope.bench", "normscope.ops.triton_backend", "torch.distributed.tensor"]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_is_lean():
    out = _run(
        "import sys, torch, normscope\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
        "print('CUDA_INIT', torch.cuda.is_initialized())\n"
    )
    assert "HEAVY []" in out, out
    assert "CUDA_INIT False" in out, out


def test_cpu_ops_do_not_load_the_triton_backend_or_cuda():
    # Calling a torch.library custom op makes torch import its own compiler stack (which may import
    # triton when installed); what normscope controls is that its GPU backend stays unloaded.
    out = _run(
        "import sys, torch, normscope\n"
        "x = torch.randn(4, 8, requires_grad=True)\n"
        "normscope.layer_norm(x, 8).sum().backward(); normscope.rms_norm(x, 8)\n"
        "print('TRITON_BACKEND', 'normscope.ops.triton_backend' in sys.modules)\n"
        "print('CUDA_INIT', torch.cuda.is_initialized())\n"
    )
    assert "TRITON_BACKEND False" in out, out
    assert "CUDA_INIT False" in out, out
