"""normscope: fast, observable and safe layer normalization for PyTorch models.

``import normscope`` is light: it imports torch and normscope's own modules only (no Triton, ONNX
or transformers), and it does not initialise CUDA.
"""

from normscope import checks, drift, errors, nn  # noqa: F401
from normscope.analysis import analyze, export_onnx, fold_norms_, quant_sensitivity
from normscope.functional import (
    add_layer_norm,
    add_rms_norm,
    layer_norm,
    masked_layer_norm,
    masked_rms_norm,
    rms_norm,
)
from normscope.monitor import Monitor
from normscope.nn import convert


def _version() -> str:
    # One source of truth: the installed package's metadata (pyproject.toml's ``version``).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("normscope")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "masked_layer_norm",
    "masked_rms_norm",
    "nn",
    "convert",
    "Monitor",
    "analyze",
    "export_onnx",
    "fold_norms_",
    "quant_sensitivity",
    "checks",
    "drift",
    "errors",
    "__version__",
]
