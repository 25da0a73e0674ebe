"""Static analysis of the normalization layers of a model: placement, folding, numerical risks.

``normscope.analysis.analyze(model, example_inputs)`` traces one forward pass and returns a
:class:`ModelReport`; ``fold_norms_`` folds gamma/beta into the consuming Linear layers;
``export_onnx`` exports a model and checks it with onnxruntime (extra ``onnx``).
Importing this package imports torch only (no transformers, no onnx).
"""

from normscope.analysis.fold import FoldedNorm, FoldResult, SkippedNorm, fold_norms_
from normscope.analysis.onnx_export import ExportReport, export_onnx
from normscope.analysis.placement import PLACEMENTS, LayerReport, ModelReport, analyze

__all__ = ["analyze", "ModelReport", "LayerReport", "PLACEMENTS", "export_onnx", "ExportReport",
           "fold_norms_", "FoldResult", "FoldedNorm", "SkippedNorm"]
