"""How sensitive a model's output is to rounding the affine parameters of its normalization layers.

See :func:`quant_sensitivity` and ``docs/quantization.md``.
"""

from __future__ import annotations

import collections.abc
import copy
import itertools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from normscope.analysis.placement import _split_inputs
from normscope.discovery import find_norm_layers

__all__ = ["quant_sensitivity", "QuantReport", "LayerQuant", "DynamicInt8Report", "QUANT_FORMATS", "fake_quantize",
           "sqnr_db"]

#: The formats :func:`quant_sensitivity` rounds gamma and beta to (see :func:`fake_quantize`).
QUANT_FORMATS = ("fp16", "bf16", "int8", "fp8_e4m3")

_FP8_E4M3_MAX = 448.0
_NO_AFFINE = "no affine parameters: nothing to round"


def fake_quantize(tensor: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``tensor`` to the format ``fmt`` and back to its own dtype.

    - ``fp16`` / ``bf16``: cast round trip (round to nearest even; beyond float16's range gives ``inf``).
    - ``int8``: per-tensor symmetric, ``scale = max|t| / 127``, ``q = clamp(round_half_even(t / scale), -127, 127)``,
      result ``q * scale``, computed in float64. An all-zero tensor stays zero.
    - ``fp8_e4m3``: ``torch.float8_e4m3fn`` cast round trip after clamping to ``[-448, 448]`` (its largest finite
      value), so large values saturate instead of becoming NaN.

    Args:
        tensor: a floating-point tensor.
        fmt: one of :data:`QUANT_FORMATS`.

    Returns:
        A new tensor of ``tensor``'s dtype, shape and device.

    Example::

        >>> fake_quantize(torch.tensor([127.0, 0.5, 1.5, -63.5]), "int8")
        tensor([127.,   0.,   2., -64.])
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point Tensor, but got "
                        f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    _check_format(fmt)
    if fmt == "fp16":
        return tensor.to(torch.float16).to(tensor.dtype)
    if fmt == "bf16":
        return tensor.to(torch.bfloat16).to(tensor.dtype)
    if fmt == "int8":
        w = tensor.detach().to(torch.float64)
        amax = w.abs().max() if w.numel() else w.new_zeros(())
        if float(amax) == 0.0:
            return tensor.detach().clone()
        scale = amax / 127.0
        return (torch.round(w / scale).clamp_(-127, 127) * scale).to(tensor.dtype)
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:  # not expected with torch >= 2.1
        raise RuntimeError("Expected torch to provide torch.float8_e4m3fn for the fp8_e4m3 format, but this build "
                           f"({torch.__version__}) does not")
    return tensor.detach().clamp(-_FP8_E4M3_MAX, _FP8_E4M3_MAX).to(fp8).to(tensor.dtype)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB, in float64.

    Identical tensors give ``+inf``; a non-finite ``test`` where ``reference`` is finite gives ``-inf``.
    """
    ref = reference.detach().to(torch.float64).reshape(-1)
    out = test.detach().to(torch.float64).reshape(-1)
    if ref.shape != out.shape:
        raise ValueError(f"Expected tensors with the same number of elements, but got {ref.numel()} and "
                         f"{out.numel()}")
    noise = float(((ref - out) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    signal = float((ref ** 2).sum())
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class LayerQuant:
    """How rounding one normalization layer's gamma and beta changes the model output.

    Attributes:
        name: qualified module name.
        kind: ``layer_norm``, ``rms_norm``, ... (as :func:`normscope.discovery.find_norm_layers` says).
        sqnr_db: ``{format: SQNR in dB}`` of the model output with only this layer's parameters rounded
            (``inf``: the output did not change).
        worst_format: the format with the lowest SQNR (the first format when all are equal).
        worst_sqnr_db: that SQNR.
        outlier_ratio: ``max|gamma| / median|gamma|`` (``None`` without a weight).
        outlier_channels: ``(channel, gamma value, |gamma| / median|gamma|)`` of the channels with the largest
            ratio, largest first; channels index the flattened weight.
        rank: 1 for the layer most at risk (lowest worst SQNR).
        note: why the result is what it is, when that needs saying (e.g. no affine parameters).
    """

    name: str
    kind: str
    sqnr_db: Dict[str, float]
    worst_format: str
    worst_sqnr_db: float
    outlier_ratio: Optional[float]
    outlier_channels: List[Tuple[int, float, float]] = field(default_factory=list)
    rank: int = 0
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict (``inf`` may appear for exact results)."""
        return {"name": self.name, "kind": self.kind, "sqnr_db": dict(self.sqnr_db), "worst_format": self.worst_format,
                "worst_sqnr_db": self.worst_sqnr_db, "outlier_ratio": self.outlier_ratio,
                "outlier_channels": [list(c) for c in self.outlier_channels], "rank": self.rank}


@dataclass
class DynamicInt8Report:
    """The model output after ``torch.ao`` dynamic int8 quantization of its ``torch.nn.Linear`` layers.

    Attributes:
        linear_layers: how many Linear layers were quantized.
        sqnr_db: SQNR in dB of the whole output against the unquantized model (``None`` if nothing was quantized
            or the quantized model did not run).
        cosine_mean: mean over samples of the cosine similarity of the primary output (``sentence_embedding``
            if present, else the first floating-point tensor, flattened per sample along dim 0).
        cosine_min: the smallest such cosine.
        warning: why there is no result, else ``None``.
    """

    linear_layers: int
    sqnr_db: Optional[float] = None
    cosine_mean: Optional[float] = None
    cosine_min: Optional[float] = None
    warning: Optional[str] = None

    @property
    def cosine_delta(self) -> Optional[float]:
        """``1 - cosine_mean``: the quantization delta of the primary output (``None`` without a result)."""
        return None if self.cosine_mean is None else 1.0 - self.cosine_mean

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict."""
        return {"linear_layers": self.linear_layers, "sqnr_db": self.sqnr_db, "cosine_mean": self.cosine_mean,
                "cosine_min": self.cosine_min, "warning": self.warning}


@dataclass
class QuantReport:
    """What :func:`quant_sensitivity` measured: one :class:`LayerQuant` per normalization layer, in model order.

    ``ranking`` lists the layer names most at risk first; ``dynamic_int8`` is ``None`` when not requested.
    """

    model: str
    formats: List[str]
    layers: List[LayerQuant] = field(default_factory=list)
    ranking: List[str] = field(default_factory=list)
    dynamic_int8: Optional[DynamicInt8Report] = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerQuant:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"Expected the name of a normalization layer of {self.model}, but got {name!r}")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict: ``formats``, ``layers``, ``ranking``, ``dynamic_int8``."""
        return {"formats": list(self.formats), "layers": [layer.to_dict() for layer in self.layers],
                "ranking": list(self.ranking),
                "dynamic_int8": None if self.dynamic_int8 is None else self.dynamic_int8.to_dict()}

    def __str__(self) -> str:
        header = ("rank", "layer", "kind", *self.formats, "outlier")
        rows = []
        for layer in sorted(self.layers, key=lambda x: x.rank):
            ratio = "-" if layer.outlier_ratio is None else f"{layer.outlier_ratio:.1f}x"
            rows.append((str(layer.rank), layer.name or "<model>", layer.kind,
                         *(_fmt_db(layer.sqnr_db[f]) for f in self.formats), ratio))
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        right = set(range(3, len(header)))
        lines = [f"QuantReport({self.model}: {len(self.layers)} normalization layers; SQNR (dB) of the output with "
                 "one layer's gamma/beta rounded, lower = more at risk; outlier = max|gamma| / median|gamma|)"]
        for r in [header] + rows:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
            lines.append("  ".join(cells).rstrip())
        for layer in self.layers:
            if layer.note:
                lines.append(f"note [{layer.name}]: {layer.note}")
        d = self.dynamic_int8
        if d is not None:
            if d.sqnr_db is None:
                lines.append(f"dynamic int8 (torch.ao, {d.linear_layers} Linear layers): {d.warning}")
            else:
                lines.append(f"dynamic int8 (torch.ao, {d.linear_layers} Linear layers): SQNR {_fmt_db(d.sqnr_db)} dB, "
                             f"cosine mean {d.cosine_mean:.6f} (1 - mean = {d.cosine_delta:.2e}), "
                             f"min {d.cosine_min:.6f}")
        return "\n".join(lines)


def _fmt_db(value: float) -> str:
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.1f}"


def _check_format(fmt: Any) -> None:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"Expected a format from {QUANT_FORMATS}, but got {fmt!r}")


def _float_tensors(output: Any, found: List[torch.Tensor], depth: int = 0) -> None:
    """Collect the floating-point tensors of ``output`` in order (tensors, sequences, mappings, ModelOutput)."""
    if depth > 32:
        return
    if isinstance(output, torch.Tensor):
        if output.dtype.is_floating_point:
            found.append(output)
    elif isinstance(output, collections.abc.Mapping):  # dict, HF ModelOutput (an OrderedDict), feature dicts
        for value in output.values():
            _float_tensors(value, found, depth + 1)
    elif isinstance(output, (tuple, list)):
        for value in output:
            _float_tensors(value, found, depth + 1)


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a Tensor of dtype {output.dtype}"
    if isinstance(output, collections.abc.Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    return type(output).__name__


def _run(model: torch.nn.Module, args: tuple, kwargs: dict, when: str = "") -> Any:
    # A fresh dict per call: SentenceTransformer adds its outputs to the feature dict it is given.
    args = tuple(dict(a) if type(a) is dict else a for a in args)
    try:
        return model(*args, **dict(kwargs))
    except Exception as e:
        raise RuntimeError(f"Expected the model to run on example_inputs{when}, but it raised "
                           f"{type(e).__name__}: {e}") from e


def _signal(output: Any, output_fn: Optional[Callable[[Any], torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(flat float64 output, primary output as (samples, features) float64)``."""
    if output_fn is not None:
        picked = output_fn(output)
        if not isinstance(picked, torch.Tensor) or not picked.dtype.is_floating_point:
            raise TypeError("Expected output_fn to return a floating-point Tensor, but got "
                            f"{_describe(picked)}")
        tensors = [picked]
        primary = picked
    else:
        tensors = []
        _float_tensors(output, tensors)
        if not tensors:
            raise ValueError("Expected the model output to contain at least one floating-point tensor, but got "
                             f"{_describe(output)}")
        primary = tensors[0]
        if isinstance(output, collections.abc.Mapping):
            emb = output.get("sentence_embedding")
            if isinstance(emb, torch.Tensor) and emb.dtype.is_floating_point:
                primary = emb
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    primary = primary.detach().to(torch.float64)
    primary = primary.reshape(primary.shape[0], -1) if primary.dim() > 0 else primary.reshape(1, 1)
    return flat, primary


def _sqnr(ref: torch.Tensor, signal: float, test: torch.Tensor) -> float:
    if test.shape != ref.shape:
        raise RuntimeError(f"Expected the model output to keep its size of {ref.numel()} elements when parameters "
                           f"are rounded, but got {test.numel()}")
    noise = float(((ref - test) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise) or signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosines(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    dot = (ref * test).sum(dim=1)
    norms = ref.norm(dim=1) * test.norm(dim=1)
    both_zero = (ref.norm(dim=1) == 0) & (test.norm(dim=1) == 0)
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot))
    return torch.where(both_zero, torch.ones_like(cos), cos)


def _outliers(weight: torch.Tensor, top_k: int) -> Tuple[float, List[Tuple[int, float, float]]]:
    w = weight.detach().reshape(-1).to(torch.float64)
    mag = w.abs()
    s = mag.sort().values
    n = s.numel()
    median = float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)
    if median > 0:
        ratio = mag / median
    else:  # more than half the channels are zero: any nonzero channel is an unbounded outlier
        ratio = torch.where(mag > 0, torch.full_like(mag, math.inf), torch.ones_like(mag))
    k = min(top_k, n)
    top = ratio.topk(k).indices.tolist() if k else []
    channels = [(int(i), float(w[i]), float(ratio[i])) for i in top]
    return float(ratio.max()), channels


def _affine(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    found = []
    for attr in ("weight", "bias"):
        p = getattr(module, attr, None)
        if isinstance(p, torch.Tensor) and p.dtype.is_floating_point and p.numel():
            found.append((attr, p))
    return found


def _dynamic_int8(model: torch.nn.Module, args: tuple, kwargs: dict, ref_flat: torch.Tensor, ref_signal: float,
                  ref_primary: torch.Tensor, output_fn) -> DynamicInt8Report:
    quantization = getattr(getattr(torch, "ao", None), "quantization", None)
    quantize_dynamic = getattr(quantization, "quantize_dynamic", None)
    if quantize_dynamic is None:
        msg = f"torch.ao.quantization.quantize_dynamic is not available in torch {torch.__version__}"
        warnings.warn(msg, UserWarning, stacklevel=3)
        return DynamicInt8Report(0, warning=msg)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao; it still works on CPU.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        try:
            # The copy shares every parameter and buffer with the model (they are only read: quantize_dynamic
            # packs new int8 weights and swaps modules of the copy), so only the module tree is duplicated.
            shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
            qmodel = quantize_dynamic(copy.deepcopy(model, shared), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        except Exception as e:  # a model that cannot be deep-copied, an unsupported engine, ...
            msg = f"could not quantize a deep copy of the model: {type(e).__name__}: {e}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return DynamicInt8Report(0, warning=msg)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        count = sum(isinstance(m, DynamicLinear) for m in qmodel.modules())
        if count == 0:
            subclasses = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
            msg = ("the model has no torch.nn.Linear layer for torch.ao dynamic int8 quantization to quantize"
                   + (f" ({subclasses} modules subclass Linear but quantize_dynamic leaves them alone)" if subclasses
                      else " (e.g. Hugging Face GPT-2's linear layers are transformers' Conv1D)")
                   + "; nothing was quantized, so there is no SQNR")
            warnings.warn(msg, UserWarning, stacklevel=3)
            return DynamicInt8Report(0, warning=msg)
        try:
            out = qmodel(*tuple(dict(a) if type(a) is dict else a for a in args), **dict(kwargs))
            flat, primary = _signal(out, output_fn)
        except Exception as e:
            msg = f"the dynamically quantized model did not run: {type(e).__name__}: {e}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return DynamicInt8Report(count, warning=msg)
    if primary.shape != ref_primary.shape or flat.shape != ref_flat.shape:
        msg = (f"the quantized model's output has {flat.numel()} elements and primary shape {tuple(primary.shape)}, "
               f"not {ref_flat.numel()} and {tuple(ref_primary.shape)}")
        warnings.warn(msg, UserWarning, stacklevel=3)
        return DynamicInt8Report(count, warning=msg)
    cos = _cosines(ref_primary, primary)
    return DynamicInt8Report(count, _sqnr(ref_flat, ref_signal, flat), float(cos.mean()), float(cos.min()))


def quant_sensitivity(
    model: torch.nn.Module,
    example_inputs,
    *,
    formats: Tuple[str, ...] = QUANT_FORMATS,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
    dynamic_int8: bool = True,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    outlier_top_k: int = 8,
) -> QuantReport:
    """Measure how much rounding each normalization layer's gamma and beta changes the model output.

    For each normalization layer (as :func:`normscope.discovery.find_norm_layers` finds them) and each format,
    only that layer's ``weight`` (gamma) and ``bias`` (beta) are rounded to the format and back
    (:func:`fake_quantize`), the model runs on ``example_inputs``, and the output ``y_q`` is compared with the
    unmodified output ``y`` as SQNR in dB, in float64::

        SQNR = 10 * log10(sum(y ** 2) / sum((y - y_q) ** 2))      (+inf when y_q == y)

    ``y`` is every floating-point tensor of the output (tensor, tuple / list, dict, Hugging Face ``ModelOutput``,
    sentence-transformers feature dict), flattened and concatenated, or ``output_fn(output)``. Layers are ranked by
    their lowest SQNR over the formats (rank 1 = most at risk). Each layer also reports its outlier channels:
    those with the largest ``|gamma| / median|gamma|``.

    With ``dynamic_int8``, a deep copy of the model has its ``torch.nn.Linear`` layers quantized by
    ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantized on the fly) and its output is
    compared by SQNR and by the per-sample cosine similarity of the primary output (``sentence_embedding`` if the
    output has it, else the first floating-point tensor, one row per index of dim 0). A model without
    ``torch.nn.Linear`` gets a ``UserWarning`` and no SQNR.

    The model runs under ``torch.no_grad()`` in eval mode (training flags are restored afterwards), once for the
    reference and once per (layer, format) whose rounding changes a parameter. Parameters are swapped for their
    rounded copies only for the duration of one forward and the original tensors are always put back, also when
    the model raises: ``state_dict()`` is bitwise unchanged.

    Args:
        model: the model.
        example_inputs: a Tensor (one positional argument), a tuple of positional arguments, or a dict of keyword
            arguments (as for :func:`normscope.analysis.analyze`).
        formats: formats to round to, from :data:`QUANT_FORMATS`. Default: all four.
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool`` to measure only some layers.
        dynamic_int8: also measure dynamic int8 quantization of the Linear layers. Default: True.
        output_fn: optional ``output_fn(output) -> Tensor`` picking the floating-point tensor to compare.
        outlier_top_k: how many outlier channels to report per layer. Default: 8.

    Returns:
        A :class:`QuantReport`.

    Example::

        >>> report = quant_sensitivity(minilm, (features,))  # all-MiniLM-L6-v2, 8 sentences
        >>> report.ranking[0], round(report["0.model.embeddings.LayerNorm"].sqnr_db["bf16"], 1)
        ('0.model.encoder.layer.1.attention.output.LayerNorm', 50.7)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    if isinstance(formats, str) or not isinstance(formats, collections.abc.Sequence):
        raise TypeError(f"Expected formats to be a tuple or list of format names, but got {type(formats).__name__}")
    if not formats:
        raise ValueError(f"Expected at least one format from {QUANT_FORMATS}, but got an empty "
                         f"{type(formats).__name__}")
    for fmt in formats:
        _check_format(fmt)
    formats = list(dict.fromkeys(formats))
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"Expected output_fn to be callable or None, but got {type(output_fn).__name__}")
    if not isinstance(outlier_top_k, numbers.Integral) or isinstance(outlier_top_k, bool) or outlier_top_k < 0:
        raise ValueError(f"Expected outlier_top_k to be a non-negative int, but got {outlier_top_k!r}")
    args, kwargs = _split_inputs(example_inputs)
    layers = find_norm_layers(model, filter_fn)
    if not layers:
        raise ValueError(f"Expected {type(model).__name__} to contain at least one normalization layer"
                         f"{' accepted by filter_fn' if filter_fn is not None else ''}, but found none")

    report = QuantReport(type(model).__name__, formats)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ref_flat, ref_primary = _signal(_run(model, args, kwargs), output_fn)
            bad = int((~torch.isfinite(ref_flat)).sum())
            if bad:
                raise ValueError(f"Expected the model output on example_inputs to be finite, but it has {bad} "
                                 "non-finite values; SQNR is undefined")
            ref_signal = float((ref_flat ** 2).sum())
            for layer in layers:
                report.layers.append(_sweep_layer(model, layer, formats, args, kwargs, ref_flat, ref_signal,
                                                  output_fn, int(outlier_top_k)))
            if dynamic_int8:
                report.dynamic_int8 = _dynamic_int8(model, args, kwargs, ref_flat, ref_signal, ref_primary,
                                                    output_fn)
    finally:
        for m, training in modes:
            m.training = training

    order = sorted(range(len(report.layers)), key=lambda i: (
        report.layers[i].worst_sqnr_db, -(report.layers[i].outlier_ratio or 0.0), i))
    for rank, i in enumerate(order, 1):
        report.layers[i].rank = rank
    report.ranking = [report.layers[i].name for i in order]
    return report


def _sweep_layer(model, layer, formats, args, kwargs, ref_flat, ref_signal, output_fn, top_k) -> LayerQuant:
    params = _affine(layer.module)
    sqnr: Dict[str, float] = {}
    note = ""
    if not params:
        sqnr = {fmt: math.inf for fmt in formats}
        note = _NO_AFFINE
    for fmt in formats if params else ():
        rounded = [fake_quantize(p.detach(), fmt) for _, p in params]
        if all(torch.equal(r, p) for r, (_, p) in zip(rounded, params)):
            sqnr[fmt] = math.inf  # exactly representable: the output cannot change
            continue
        originals = [p.data for _, p in params]
        try:
            for (_, p), r in zip(params, rounded):
                p.data = r
            out = _run(model, args, kwargs, f" with {layer.name}'s parameters rounded to {fmt}")
        finally:
            for (_, p), orig in zip(params, originals):
                p.data = orig
        flat, _ = _signal(out, output_fn)
        sqnr[fmt] = _sqnr(ref_flat, ref_signal, flat)
    worst = min(formats, key=lambda f: sqnr[f])
    weight = dict(params).get("weight")
    ratio, channels = (None, []) if weight is None else _outliers(weight, top_k)
    if params and weight is None:
        note = "no weight (gamma): no outlier ratio"
    return LayerQuant(layer.name, layer.kind, sqnr, worst, sqnr[worst], ratio, channels, note=note)
