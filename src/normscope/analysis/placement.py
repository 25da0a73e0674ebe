"""Where each normalization layer sits, what consumes it, whether it folds, and what numerical risks it carries.

See :func:`analyze` and ``docs/analysis.md``.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from normscope.analysis.tracer import Graph, NormCall, trace
from normscope.discovery import NormLayer, find_norm_layers

__all__ = ["analyze", "ModelReport", "LayerReport", "PLACEMENTS"]

#: The placements :func:`analyze` reports. ``unused``: the layer was not called in the forward pass;
#: ``recurrent``: a norm inside a recurrent cell (``LayerNormLSTM`` / ``LayerNormGRU``), called once per time step.
PLACEMENTS = ("pre", "post", "final", "other", "recurrent", "unused")

_FOLDABLE_KINDS = ("layer_norm", "rms_norm")
_REDUCED = (torch.float16, torch.bfloat16)


@dataclass
class LayerReport:
    """What :func:`analyze` found about one normalization layer.

    Attributes:
        name: qualified module name.
        kind: ``layer_norm``, ``rms_norm``, ... (as :func:`normscope.discovery.find_norm_layers` says).
        eps: the layer's epsilon (``None`` for ``torch.nn.RMSNorm(eps=None)``).
        dtype: dtype of the tensor entering the layer (``None`` if the layer was not called).
        compute_dtype: dtype in which the statistics are computed: ``float32`` for 16-bit inputs to a fused
            kernel (torch's and normscope's norms), else the dtype of the variance / rsqrt ops inside the module.
        placement: ``pre``, ``post``, ``final``, ``other``, ``recurrent`` or ``unused`` (see ``docs/analysis.md``).
        consumers: ``(kind, name)`` of what consumes the output, looking through views, casts and dropout:
            ``("linear", module)``, ``("matmul", weight parameter or "activation")``,
            ``("add", "residual" or "add")``, ``("norm", module)``, ``("output", path)``, ``("other", op)``.
        foldable: whether the affine parameters can be folded into the consumers (every consumer is a linear
            map by a weight: a Linear / Conv1D module or a matmul with a parameter, such as a tied head).
        fold_reason: why (not).
        producers: ``(kind, name)`` of what produced the input, same vocabulary as ``consumers`` plus
            ``("input", path)``, ``("param", name)``.
        risks: numerical risks of this layer, as sentences.
        calls: how many times the layer ran in the forward pass (placement is that of the first call).
    """

    name: str
    kind: str
    eps: Optional[float]
    dtype: Optional[str]
    compute_dtype: Optional[str]
    placement: str
    consumers: List[Tuple[str, str]] = field(default_factory=list)
    foldable: bool = False
    fold_reason: str = ""
    producers: List[Tuple[str, str]] = field(default_factory=list)
    risks: List[str] = field(default_factory=list)
    calls: int = 0

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["consumers"] = [list(c) for c in self.consumers]
        d["producers"] = [list(p) for p in self.producers]
        return d


@dataclass
class ModelReport:
    """What :func:`analyze` found about a model: one :class:`LayerReport` per normalization layer."""

    model: str
    layers: List[LayerReport] = field(default_factory=list)
    risks: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"Expected the name of a normalization layer of {self.model}, but got {name!r}")

    def placements(self) -> Dict[str, str]:
        """``{layer name: placement}``."""
        return {layer.name: layer.placement for layer in self.layers}

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serializable dict."""
        return {"model": self.model, "layers": [layer.to_dict() for layer in self.layers], "risks": list(self.risks)}

    def __str__(self) -> str:
        header = ("layer", "kind", "placement", "fold", "eps", "dtype", "consumers", "risks")
        rows = []
        for layer in self.layers:
            counts = collections.Counter(kind for kind, _ in layer.consumers)
            consumers = ",".join(f"{k}x{n}" if n > 1 else k for k, n in counts.items()) or "-"
            dtype = layer.dtype or "-"
            if layer.compute_dtype and layer.compute_dtype != layer.dtype:
                dtype += f"->{layer.compute_dtype}"
            rows.append((layer.name or "<model>", layer.kind, layer.placement, "yes" if layer.foldable else "no",
                         "None" if layer.eps is None else f"{layer.eps:g}", dtype, consumers,
                         str(len(layer.risks)) if layer.risks else "-"))
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        lines = [f"ModelReport({self.model}: {len(self.layers)} normalization layers)"]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
        lines += [f"risk: {r}" for r in self.risks]
        lines += [f"risk [{layer.name}]: {r}" for layer in self.layers for r in layer.risks]
        return "\n".join(lines)


def _split_inputs(example_inputs) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, collections.abc.Mapping):  # dict, transformers' BatchEncoding, ...
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("Expected example_inputs, when a dict, to have str keys (keyword arguments), but got "
                            f"keys {[type(k).__name__ for k in example_inputs]}")
        return (), dict(example_inputs)
    raise TypeError("Expected example_inputs to be a Tensor, a tuple of positional arguments or a dict of keyword "
                    f"arguments, but got {type(example_inputs).__name__}")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _compute_dtype(layer: NormLayer, call: NormCall) -> Optional[torch.dtype]:
    dtype = call.input_dtype
    if dtype is None or not dtype.is_floating_point:
        return dtype
    floats = [d for d in call.stat_dtypes if d.is_floating_point]
    if floats:  # op-by-op module: the narrowest dtype any statistics op ran in
        return min(floats, key=lambda d: torch.finfo(d).bits)
    if call.fused or not layer.duck_typed:  # fused kernels accumulate 16-bit inputs in float32
        return torch.float32 if dtype in _REDUCED else dtype
    return dtype


class _Analysis:
    def __init__(self, model: torch.nn.Module, graph: Graph):
        self.g = graph
        self.model = model
        self.outputs: Dict[int, List[str]] = collections.defaultdict(list)
        for path, n in graph.outputs:
            self.outputs[n].append(path)
        self._residual: Dict[int, bool] = {}
        self.aliases: Dict[int, List[str]] = collections.defaultdict(list)
        for name, p in model.named_parameters(remove_duplicate=False):
            self.aliases[id(p)].append(name)

    def residual(self, add: int) -> Optional[Tuple[int, int]]:
        """``(bypass, branch)`` operands if node ``add`` is a residual add ``x + f(x)``, else None."""
        node = self.g.nodes[add]
        if node.kind != "add" or len(node.inputs) != 2 or node.inputs[0] == node.inputs[1]:
            return None
        a, b = node.inputs
        if self.g.is_ancestor(a, b):
            return a, b
        if self.g.is_ancestor(b, a):
            return b, a
        return None

    def describe(self, n: int, user: Optional[int] = None) -> Tuple[str, str]:
        node = self.g.nodes[n]
        if node.kind in ("linear", "norm", "input", "param"):
            return node.kind, node.name
        if node.kind == "add":
            return "add", "residual" if self.residual(n) else "add"
        if node.kind == "matmul":
            first = node.inputs[0] if node.inputs else None
            if node.meta.get("weight") and (user is None or first == user):
                return "matmul", node.meta["weight"]
            return "matmul", "activation"
        if node.kind == "leaf":
            return "other", "tensor"
        return "other", node.name

    def consumers(self, n: int) -> List[Tuple[str, str]]:
        found = [self.describe(c, n) for c in self.g.nodes[n].consumers]
        found += [("output", path) for path in self.outputs.get(n, [])]
        return list(dict.fromkeys(found))

    def placement(self, call: NormCall) -> str:
        n, i = call.node, call.input_node
        if i is not None:
            for c in self.g.nodes[i].consumers:  # the input also bypasses the norm into x + f(norm(x))
                res = self.residual(c) if c != n else None
                if res and res[0] == i and self.g.is_ancestor(n, res[1]):
                    return "pre"
        feeds_residual = False
        for c in self.g.nodes[n].consumers:  # the output is the residual stream of x + f(x)
            res = self.residual(c)
            if res and res[0] == n:
                feeds_residual = True
        res = self.residual(i) if i is not None else None
        if res is not None:
            branch = self.g.between(res[0], res[1]) | {res[1]}
            if not any(self.g.nodes[b].kind == "norm" for b in branch):
                return "post"  # norm(x + f(x)) with an un-normalized sublayer f
        if feeds_residual:
            return "post"
        if res is not None:
            return "final"  # normalizes the end of a residual stream whose sublayers are pre-normalized
        return "other"

    def fold(self, layer: NormLayer, consumers: List[Tuple[str, str]]) -> Tuple[bool, str]:
        if layer.recurrent:
            return False, ("a norm inside a recurrent cell: its output enters the gate arithmetic of every time "
                           "step, not a linear map")
        if layer.kind not in _FOLDABLE_KINDS:
            return False, f"only layer_norm / rms_norm layers are folded into their consumers, not {layer.kind}"
        if not layer.affine and getattr(layer.module, "bias", None) is None:
            return False, "the layer has no weight or bias to fold"
        if not consumers:
            return False, "its output is not consumed in the forward pass"
        bad = [c for c in consumers if not (c[0] == "linear" or (c[0] == "matmul" and c[1] != "activation"))]
        if bad:
            return False, "its output also feeds " + ", ".join(f"{k} ({n})" for k, n in bad)
        names, tied = [], []
        beta = getattr(layer.module, "bias", None)
        has_beta = isinstance(beta, torch.Tensor) and bool(beta.detach().any())
        for kind, name in consumers:
            names.append(name)
            weight = name if kind == "matmul" else None
            if kind == "linear":
                module = self.model.get_submodule(name)
                if has_beta and getattr(module, "bias", None) is None:
                    return False, (f"consumer {name} has no bias to fold beta into (a bias added to it would not "
                                   "survive the model's save / reload)")
                others = [a for a in self.aliases.get(id(module.weight), []) if a != f"{name}.weight"]
                if others:
                    tied.append(f"{name} (weight tied to {others[0]})")
            elif weight is not None:
                p = self._param(weight)
                if p is not None and len(self.aliases.get(id(p), [])) > 1:
                    tied.append(f"matmul with {weight} (shared with {self.aliases[id(p)][0]})")
        reason = "every consumer is a linear map by a weight: " + ", ".join(names)
        if tied:
            reason += "; folding needs untying " + ", ".join(tied)
        return True, reason

    def fold_axes(self, layer: NormLayer, calls) -> str:
        """Why the normalized axis of ``layer`` is not the feature axis of its Linear consumers ("" if it is).

        gamma scales the axes :attr:`NormLayer.norm_dims` of the norm's output; folding it into a Linear is right
        only when those are the features the Linear reads: the trailing axis, or (for a channels-first norm) the
        channel axis of an output with a single position per channel (``(N, C, 1, 1)`` then flattened)."""
        size = int(layer.normalized_shape[0]) if layer.normalized_shape else None
        dims = layer.norm_dims
        for call in calls:
            shape = call.out_shape
            if shape is None or dims is None:
                continue
            if tuple(dims) == (1,) and len(shape) > 2 and math.prod(shape[2:]) != 1:
                return (f"it normalizes the channel axis of a channels-first {tuple(shape)} output, which reaches its "
                        "consumers with the spatial positions; only a trailing normalized axis (or a (N, C, 1, 1) "
                        "output flattened) is folded")
            for consumer in self.g.nodes[call.node].consumers:
                node = self.g.nodes[consumer]
                in_shape = node.meta.get("in_shape") if node.kind == "linear" else None
                if in_shape and size is not None and in_shape[-1] != size:
                    return (f"consumer {node.name} reads {in_shape[-1]} features per row, not the {size} normalized "
                            "ones (the normalized axis is not its feature axis)")
        return ""

    def _param(self, name: str) -> Optional[torch.Tensor]:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return None


def _eps_risks(eps: Optional[float], compute: Optional[torch.dtype]) -> List[str]:
    if eps is None or eps <= 0 or compute is None or not compute.is_floating_point:
        return []
    info = torch.finfo(compute)
    name = _dtype_name(compute)
    if float(torch.tensor(eps, dtype=compute)) == 0.0:
        return [f"eps={eps:g} underflows to 0 in {name}, the dtype the statistics are computed in "
                f"(smallest {name} value {info.smallest_normal * info.eps:g})"]
    if eps < info.smallest_normal:
        return [f"eps={eps:g} is subnormal in {name} (smallest normal {info.smallest_normal:g}): imprecise, and "
                "flushed to 0 where denormals are disabled"]
    return []


def analyze(
    model: torch.nn.Module,
    example_inputs,
    *,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> ModelReport:
    """Trace one forward pass of ``model`` and report placement, consumers, foldability and risks of its norms.

    The normalization layers are those :func:`normscope.discovery.find_norm_layers` finds. The forward runs
    once under ``torch.no_grad()`` with the model temporarily in eval mode (training flags are restored), and
    keeps every intermediate tensor alive until it ends: use small example inputs.

    Args:
        model: the model.
        example_inputs: a Tensor (one positional argument), a tuple of positional arguments, or a dict of
            keyword arguments, e.g. ``{"input_ids": ids, "decoder_input_ids": ids}``.
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool`` to analyze only some layers.

    Returns:
        A :class:`ModelReport`.

    Example::

        >>> report = normscope.analyze(model, {"input_ids": ids})
        >>> report["transformer.h.0.ln_1"].placement, report["transformer.h.0.ln_1"].foldable
        ('pre', True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    layers = find_norm_layers(model, filter_fn)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        graph, _ = trace(model, args, kwargs, {layer.module: layer.name for layer in layers})
    finally:
        for m, training in modes:
            m.training = training
    analysis = _Analysis(model, graph)
    report = ModelReport(type(model).__name__)
    for layer in layers:
        calls = graph.norm_calls.get(layer.name, [])
        if not calls:
            report.layers.append(LayerReport(layer.name, layer.kind, layer.eps, None, None, "unused",
                                             fold_reason="the layer was not called in the forward pass"))
            continue
        call = calls[0]
        consumers = list(dict.fromkeys(c for call_ in calls for c in analysis.consumers(call_.node)))
        producers = [] if call.input_node is None else [analysis.describe(call.input_node)]
        foldable, reason = analysis.fold(layer, consumers)
        if foldable:
            problem = analysis.fold_axes(layer, calls)
            if problem:
                foldable, reason = False, problem
        compute = _compute_dtype(layer, call)
        risks = []
        if compute in _REDUCED:
            risks.append(f"statistics are computed in {_dtype_name(compute)} without a float32 upcast")
        risks += _eps_risks(layer.eps, compute)
        placement = "recurrent" if layer.recurrent else analysis.placement(call)
        report.layers.append(LayerReport(
            layer.name, layer.kind, layer.eps, _dtype_name(call.input_dtype), _dtype_name(compute),
            placement, consumers, foldable, reason, producers, risks, len(calls)))
    _eps_consistency(report)
    return report


def _eps_consistency(report: ModelReport) -> None:
    by_kind: Dict[str, List[LayerReport]] = collections.defaultdict(list)
    for layer in report.layers:
        if layer.eps is not None:
            by_kind[layer.kind].append(layer)
    for kind, group in by_kind.items():
        counts = collections.Counter(layer.eps for layer in group)
        if len(counts) < 2:
            continue
        common = counts.most_common(1)[0][0]
        parts = []
        for eps, n in counts.most_common():
            names = [layer.name for layer in group if layer.eps == eps]
            parts.append(f"{eps:g} ({n} layer{'s' if n > 1 else ''}" + (f": {', '.join(names[:3])})" if eps != common
                                                                          else ")"))
        report.risks.append(f"eps differs between {kind} layers: " + ", ".join(parts))
        for layer in group:
            if layer.eps != common:
                layer.risks.append(f"eps={layer.eps:g} differs from the eps={common:g} of the other {kind} layers")
