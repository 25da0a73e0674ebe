"""Static analysis of the normalization layers of a model: placement, folding, numerical risks.

``normscope.analysis.analyze(model, example_inputs)`` traces one forward pass and returns a
:class:`ModelReport`; ``fold_norms_`` folds gamma/beta into the consuming Linear layers;
``export_onnx`` exports a model and checks it with onnxruntime (extra ``onnx``);
``export_tflite`` exports to LiteRT (TFLite) and checks it with the LiteRT interpreter (extra ``edge``);
``quant_sensitivity`` measures how rounding each norm's gamma/beta (fp16, bf16, int8, fp8) changes the output.
Importing this package imports torch only (no transformers, no onnx).
"""

from normscope.analysis.fold import FoldedNorm, FoldResult, SkippedNorm, fold_norms_
from normscope.analysis.onnx_export import ExportReport, export_onnx
from normscope.analysis.placement import PLACEMENTS, LayerReport, ModelReport, analyze
from normscope.analysis.quant import (
    QUANT_FORMATS,
    DynamicInt8Report,
    LayerQuant,
    QuantReport,
    fake_quantize,
    quant_sensitivity,
    sqnr_db,
)
from normscope.analysis.tflite_export import TFLiteReport, export_tflite

__all__ = ["analyze", "ModelReport", "LayerReport", "PLACEMENTS", "export_onnx", "ExportReport", "export_tflite",
           "TFLiteReport",
           "fold_norms_", "FoldResult", "FoldedNorm", "SkippedNorm", "quant_sensitivity", "QuantReport", "LayerQuant",
           "DynamicInt8Report", "QUANT_FORMATS", "fake_quantize", "sqnr_db"]
