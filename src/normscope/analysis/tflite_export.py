"""TFLite (LiteRT) export of models that contain normscope modules or ops, checked with the LiteRT interpreter.

The model is captured with :func:`torch.export.export`, the ``normscope::norm_fwd`` custom op is decomposed
with :func:`normscope.analysis.onnx_export.onnx_decompositions` (into ``aten.native_layer_norm`` /
``aten.rms_norm``, as for ONNX), and the resulting program goes through ``litert_torch.convert``. A model
converted with :func:`normscope.convert` therefore exports as the same model with torch's norms would; no
normscope kernel ends up in the flatbuffer. TFLite has no normalization operator: each LayerNorm / RMSNorm
lowers to primitive ops (``MEAN``, ``SQUARED_DIFFERENCE``, ``ADD``, ``RSQRT``, ``MUL``), and the report counts
the ``RSQRT`` ops (one per norm) next to the number of norm layers.

``litert-torch`` and ``ai-edge-litert`` are imported only when :func:`export_tflite` runs
(``pip install 'normscope[edge]'``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from normscope.analysis.onnx_export import (
    _check_path,
    _eval_mode,
    _ExportFile,
    _flat_tensors,
    _split_inputs,
    _without_cache,
    onnx_decompositions,
    run_counting_norms,
    verdict,
)
from normscope.discovery import find_norm_layers

__all__ = ["export_tflite", "TFLiteReport"]

_INSTALL_HINT = "pip install 'normscope[edge]'"


@dataclass(frozen=True)
class TFLiteReport:
    """What :func:`export_tflite` wrote and found.

    Attributes:
        path: the ``.tflite`` file written.
        size_bytes: its size.
        seconds: wall time of the conversion (capture, lowering, writing), without the check.
        ops: count per TFLite builtin operator in the main subgraph (``DELEGATE`` entries excluded).
        norm_ops: ``RSQRT`` operators in the graph (each LayerNorm / RMSNorm lowers to one).
        expected_norms: LayerNorm / RMSNorm layers of the model, a layer called several times counting once
            per call (as :attr:`normscope.analysis.ExportReport.expected_norms`).
        max_abs_diff: max absolute difference between the LiteRT interpreter's and PyTorch's floating
            outputs (``None`` when ``verify=False``).
        max_rel_diff: ``max_abs_diff / max |PyTorch output|``; ``None`` when not verified.
        ok: True when (if verified) every output is within the dtype's tolerance (float32: ``1e-4 + 1e-4 *
            max|y|``). A norm count that differs from ``expected_norms`` is a warning only: other ops
            (e.g. a hand-written attention scale) may lower to ``RSQRT`` as well.
        warnings: why ``ok`` is False, and other things worth knowing about the export.
    """

    path: str
    size_bytes: int
    seconds: float
    ops: Dict[str, int]
    norm_ops: int
    expected_norms: int
    max_abs_diff: Optional[float]
    max_rel_diff: Optional[float]
    ok: bool
    warnings: Tuple[str, ...] = ()


def _require_edge():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"normscope.analysis.export_tflite needs litert-torch and ai-edge-litert ({e}); install them with: "
            f"{_INSTALL_HINT}"
        ) from e


def export_tflite(
    model: torch.nn.Module,
    example_inputs: Union[Tensor, tuple, list, Mapping[str, Any]],
    path: Union[str, os.PathLike],
    *,
    verify: bool = True,
) -> TFLiteReport:
    """Export ``model`` to a ``.tflite`` flatbuffer with litert-torch and check it with the LiteRT interpreter.

    The model is exported in eval mode under ``torch.no_grad()`` with static shapes (those of
    ``example_inputs``); its training flags are restored afterwards. normscope ops are decomposed into
    torch's norm ops first (see the module docstring), so a model after :func:`normscope.convert` exports too.
    The file is written and checked in a temporary file and published at ``path`` only at the end
    (atomically for a regular file; see :mod:`normscope._paths`).

    Args:
        model: the model.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        path: the ``.tflite`` file to write (its directory must exist).
        verify: run the file with ``ai_edge_litert``'s interpreter on ``example_inputs`` and compare every
            output with PyTorch's. Default: True.

    Returns:
        A :class:`TFLiteReport`; ``ok`` is False, with a warning, when an output differs from PyTorch's
        beyond the dtype's tolerance.

    Raises:
        ImportError: litert-torch or ai-edge-litert is missing (``pip install 'normscope[edge]'``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    kwargs = _without_cache(model, kwargs)
    path = _check_path(path)
    if not isinstance(verify, bool):
        raise TypeError(f"Expected verify to be a bool, but got {type(verify).__name__}")
    _require_edge()

    layers = [layer for layer in find_norm_layers(model) if layer.kind in ("layer_norm", "rms_norm")]
    with _ExportFile(path) as work:
        report = _export_and_check(model, args, kwargs, work.file, verify, layers)
        work.publish()
    return dataclasses.replace(report, path=path)


def _export_and_check(model, args, kwargs, path, verify, layers) -> TFLiteReport:
    import litert_torch

    warnings: List[str] = []
    with _eval_mode(model), torch.no_grad():
        start = time.perf_counter()
        # Non-tensor keyword arguments (use_cache=False) are fixed in a wrapper: the converter's inputs are tensors.
        tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
        fixed = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
        wrapped = _Fixed(model, fixed) if fixed else model
        ep = torch.export.export(wrapped, args, tensor_kwargs).run_decompositions(onnx_decompositions())
        edge_model = litert_torch.convert(ep.module(), args, tensor_kwargs)
        edge_model.export(path)
        seconds = time.perf_counter() - start

        out, expected = run_counting_norms(model, args, kwargs, layers)
        reference = _flat_tensors(out)

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    ops = Counter(d["op_name"] for d in interpreter._get_ops_details() if d["op_name"] != "DELEGATE")
    norm_ops = ops.get("RSQRT", 0)
    if norm_ops != expected:
        warnings.append(f"expected {expected} norm(s) (one RSQRT per LayerNorm / RMSNorm layer, or per call), "
                        f"but the graph has {norm_ops} RSQRT op(s)")
    ok = True
    max_abs = max_rel = None
    if verify:
        max_abs, max_rel, ok, note = _verify(interpreter, args, kwargs, reference)
        if note:
            warnings.append(note)
    return TFLiteReport(path=path, size_bytes=os.path.getsize(path), seconds=seconds,
                        ops=dict(sorted(ops.items())), norm_ops=norm_ops, expected_norms=expected,
                        max_abs_diff=max_abs, max_rel_diff=max_rel, ok=ok, warnings=tuple(warnings))


class _Fixed(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, fixed: Dict[str, Any]):
        super().__init__()
        self.model = model
        self.fixed = fixed

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs, **self.fixed)


def _index(name: str) -> Tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


def _verify(interpreter, args: tuple, kwargs: dict, reference: List[Tensor]):

    runner = interpreter.get_signature_runner()
    names = list(runner.get_input_details())
    kwargs = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    inputs = _flat_tensors((args, kwargs))
    if len(names) != len(inputs):
        return None, None, False, (
            f"cannot verify: the TFLite graph has {len(names)} input(s) but example_inputs hold {len(inputs)} "
            "tensor(s)"
        )
    if set(names) != set(kwargs) or args:
        names = sorted(names, key=_index)  # args_0, args_1, ...
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    else:
        feed = {n: kwargs[n].detach().cpu().numpy() for n in names}
    details = runner.get_input_details()
    feed = {n: v.astype(details[n]["dtype"], copy=False) for n, v in feed.items()}  # int64 ids -> int32
    result = runner(**feed)
    outputs = [result[k] for k in sorted(result, key=_index)]
    return verdict(outputs, reference, "TFLite", "the LiteRT interpreter")
