"""Dataflow tracer behind :func:`normscope.analyze`.

One forward pass runs under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch function
call, plus forward hooks on the normalization layers and on ``Linear`` / transformers ``Conv1D`` modules.
Each call becomes a :class:`Node`; tensors are mapped to the node that produced them by ``id`` (every
tensor seen is kept alive until the trace ends, so ids are not reused). Ops that only move or relabel
data (views, reshapes, dtype casts, dropout, slicing, ...) produce no node: their output maps to the node of
their input. A norm or Linear module is one node (its input is the tensor entering ``forward``, its output
the tensor leaving it); the ops inside it are not recorded, except that the ops inside a norm tell in
which dtype it computes its statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Node", "Graph", "trace", "TRANSPARENT_OPS"]

#: Ops that only move, relabel or cast data: looked through when following a tensor.
TRANSPARENT_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clone", "detach",
    "expand", "expand_as", "__getitem__", "narrow", "select", "split", "chunk", "unbind", "T", "mT", "t",
    "movedim", "moveaxis", "swapaxes", "swapdims", "cpu", "cuda", "requires_grad_", "identity",
})
# Ops that add two tensors.
ADD_OPS = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})
# Ops that multiply by a matrix; with a 2-D parameter as the other operand they are foldable consumers.
MATMUL_OPS = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "linear", "einsum"})
# Fused normalization kernels (statistics accumulate in float32 for 16-bit inputs).
FUSED_NORM_OPS = frozenset({"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
                            "native_layer_norm", "fused_rms_norm"})
# Ops that compute normalization statistics in an op-by-op norm (e.g. Hugging Face RMSNorm modules).
STAT_OPS = frozenset({"mean", "var", "var_mean", "std", "std_mean", "norm", "rsqrt", "sqrt", "pow", "square"})


@dataclass
class Node:
    """One recorded operation (or a leaf: model input, parameter, buffer or unseen tensor).

    ``kind`` is ``"input"``, ``"param"``, ``"leaf"``, ``"norm"``, ``"linear"``, ``"add"``, ``"matmul"``
    or ``"op"``; ``name`` is the module name for modules, the parameter name for parameters, the input path
    for model inputs, else the op name. ``inputs`` are the operand nodes (looked through transparent ops).
    """

    index: int
    kind: str
    name: str
    inputs: List[int] = field(default_factory=list)
    consumers: List[int] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class NormCall:
    """One call of a normalization module: its node and what it saw."""

    name: str
    node: int
    input_node: Optional[int]
    input_dtype: Optional[torch.dtype]
    stat_dtypes: List[torch.dtype] = field(default_factory=list)
    fused: bool = False
    out_shape: Optional[Tuple[int, ...]] = None


@dataclass
class Graph:
    """The dataflow graph of one forward pass."""

    nodes: List[Node] = field(default_factory=list)
    norm_calls: Dict[str, List[NormCall]] = field(default_factory=dict)
    outputs: List[Tuple[str, int]] = field(default_factory=list)

    def add(self, kind: str, name: str, inputs: List[int], **meta) -> int:
        index = len(self.nodes)
        self.nodes.append(Node(index, kind, name, list(inputs), [], dict(meta)))
        for i in inputs:
            self.nodes[i].consumers.append(index)
        return index

    def is_ancestor(self, a: int, b: int, through: Optional[set] = None) -> bool:
        """Whether node ``a`` is an ancestor of node ``b`` (``b`` derives from ``a``)."""
        if a >= b:
            return False
        stack, seen = [b], {b}
        while stack:
            n = stack.pop()
            for i in self.nodes[n].inputs:
                if i == a:
                    return True
                if i > a and i not in seen:
                    seen.add(i)
                    stack.append(i)
        return False

    def between(self, a: int, b: int) -> set:
        """Nodes strictly between ``a`` and ``b`` on some path ``a -> ... -> b``."""
        back, stack = set(), [b]
        while stack:
            for i in self.nodes[stack.pop()].inputs:
                if i > a and i not in back:
                    back.add(i)
                    stack.append(i)
        fwd, stack = set(), [a]
        while stack:
            for c in self.nodes[stack.pop()].consumers:
                if c < b and c in back and c not in fwd:
                    fwd.add(c)
                    stack.append(c)
        return fwd


def _func_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name.split(".")[-1]


def _tensors(obj, path: str = "", out: Optional[List[Tuple[str, torch.Tensor]]] = None, depth: int = 0):
    """``(path, tensor)`` for every tensor in ``obj`` (tensors, sequences, mappings, dataclasses)."""
    if out is None:
        out = []
    if depth > 8:
        return out
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):  # includes transformers' ModelOutput (an OrderedDict)
        for k, v in obj.items():
            _tensors(v, f"{path}.{k}" if path else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}[{i}]", out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name, None), f"{path}.{f.name}" if path else f.name, out, depth + 1)
    return out


def is_linear_module(module: torch.nn.Module) -> bool:
    """``torch.nn.Linear`` (and subclasses) or a transformers-style ``Conv1D`` (a linear with a transposed weight)."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and hasattr(module, "nf"))


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: Graph, param_names: Dict[int, str]):
        super().__init__()
        self.g = graph
        self.param_names = param_names
        self.value: Dict[int, int] = {}  # id(tensor) -> node
        self.keep: List[Any] = []  # keeps every seen tensor alive so that ids stay unique
        self.stack: List[Tuple[str, str, Optional[NormCall]]] = []  # (kind, name, norm call) of open modules

    # tensor -> node
    def node_of(self, t: torch.Tensor) -> int:
        n = self.value.get(id(t))
        if n is None:
            name = self.param_names.get(id(t))
            n = self.g.add("param" if name is not None else "leaf", name or "tensor", [])
            self.bind(t, n)
        return n

    def bind(self, t: torch.Tensor, n: int) -> None:
        self.keep.append(t)
        self.value[id(t)] = n

    # module hooks
    def pre_hook(self, kind: str, name: str):
        def hook(module, args, kwargs):
            if self.stack:  # inside another recorded module: its inner modules are not recorded
                self.stack.append(("inner", name, None))
                return None
            tensors = [t for _, t in _tensors((args, kwargs))]
            call = None
            if kind == "norm":
                inp = self.node_of(tensors[0]) if tensors else None
                call = NormCall(name, -1, inp, tensors[0].dtype if tensors else None)
            self.stack.append((kind, name, call))
            return None
        return hook

    def post_hook(self, kind: str, name: str):
        def hook(module, args, kwargs, output):
            entry = self.stack.pop()
            if entry[0] == "inner":
                return None
            tensors = [t for _, t in _tensors((args, kwargs))]
            inputs = [self.node_of(t) for t in tensors[:1]]
            call = entry[2]
            if call is not None and call.input_node is not None:
                inputs = [call.input_node]
            meta = {}
            if kind == "linear":
                weight = getattr(module, "weight", None)
                meta["weight"] = self.param_names.get(id(weight), "")
                meta["in_shape"] = tuple(tensors[0].shape) if tensors else None
            n = self.g.add(kind, name, inputs, **meta)
            if call is not None:
                call.node = n
                outs = [t for _, t in _tensors(output)]
                call.out_shape = tuple(outs[0].shape) if outs else None
                self.g.norm_calls.setdefault(name, []).append(call)
            for _, t in _tensors(output):
                self.bind(t, n)
            return None
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _func_name(func)
        if self.stack:
            kind, _, call = self.stack[-1]
            if call is not None:  # inside a norm: note in which dtype the statistics are computed
                if name in FUSED_NORM_OPS:
                    call.fused = True
                elif name in STAT_OPS and args and isinstance(args[0], torch.Tensor):
                    call.stat_dtypes.append(args[0].dtype)
            return out
        outs = [t for _, t in _tensors(out)]
        in_tensors = [t for _, t in _tensors((args, kwargs))]
        if not in_tensors and not outs:
            return out
        if name in TRANSPARENT_OPS and args and isinstance(args[0], torch.Tensor):
            src = self.node_of(args[0])
            for t in outs:
                self.bind(t, src)
            return out
        if not outs and name != "__setitem__":  # shape / dtype / item queries consume nothing of interest
            return out
        inputs = [self.node_of(t) for t in in_tensors]
        kind = "op"
        meta: Dict[str, Any] = {}
        if name in ADD_OPS and len(in_tensors) == 2:
            kind = "add"
        elif name in MATMUL_OPS:
            kind = "matmul"
            params = [self.g.nodes[i].name for i in inputs[1:] if self.g.nodes[i].kind == "param"]
            meta["weight"] = params[0] if params else ""
        n = self.g.add(kind, name, inputs, **meta)
        for t in outs:
            self.bind(t, n)
        if name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            self.bind(args[0], n)
        return out


def trace(model: torch.nn.Module, args: tuple, kwargs: dict, norm_names: Dict[torch.nn.Module, str]):
    """Run ``model(*args, **kwargs)`` once under the tracer; returns ``(graph, output)``."""
    graph = Graph()
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    param_names.update({id(b): n for n, b in model.named_buffers(remove_duplicate=False)})
    tracer = _Tracer(graph, param_names)
    for path, t in _tensors((args, kwargs)):
        tracer.bind(t, graph.add("input", path, []))
    handles = []
    try:
        for name, module in model.named_modules():
            if module in norm_names:
                kind = "norm"
            elif is_linear_module(module):
                kind = "linear"
            else:
                continue
            handles.append(module.register_forward_pre_hook(tracer.pre_hook(kind, name), with_kwargs=True))
            handles.append(module.register_forward_hook(tracer.post_hook(kind, name), with_kwargs=True))
        with torch.no_grad(), tracer:
            output = model(*args, **kwargs)
        for path, t in _tensors(output):
            n = tracer.value.get(id(t))
            if n is not None:
                graph.outputs.append((path or "output", n))
    finally:
        for h in handles:
            h.remove()
    return graph, output
