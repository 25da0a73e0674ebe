"""Audit of the normalization sites of an ONNX graph (``normscope audit model.onnx``).

For models that come from another exporter (TensorFlow, JAX, an onnxruntime-optimised graph), there is
no PyTorch module to trace: :func:`audit_onnx` reads the graph itself. It finds

* fused nodes: ``LayerNormalization``, ``RMSNormalization`` (opset 23), and the ``com.microsoft`` contrib
  ops ``SimplifiedLayerNormalization``, ``SkipLayerNormalization`` and ``SkipSimplifiedLayerNormalization``;
* decomposed LayerNorm: ``ReduceMean -> Sub -> Pow(2)/Mul -> ReduceMean -> Add(eps) -> Sqrt -> Div``
  (or ``Reciprocal`` + ``Mul``), optionally followed by ``Mul(gamma)`` and ``Add(beta)``;
* decomposed RMSNorm: ``Pow(2)/Mul -> ReduceMean -> Add(eps) -> Sqrt -> Div`` (or ``Reciprocal`` + ``Mul``),
  optionally followed by ``Mul(gamma)``;

looking through ``Cast`` nodes. Each site gets a kind, axis, eps, dtypes, gamma/beta outliers and a
placement with the definitions of :func:`normscope.analyze`; then, under onnxruntime, the SQNR of the
model's output when only that site's output is fake-quantized to int8 (per-tensor, symmetric).

The result has the keys of :func:`normscope.audit.run_audit`'s, so the terminal summary and the HTML
report render it unchanged.
"""

from __future__ import annotations

import collections
import datetime
import math
import os
import platform
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["audit_onnx", "find_onnx_norms", "OnnxNormSite", "ONNX_STEPS"]

#: The steps of an ONNX audit, in order.
ONNX_STEPS = ("analysis", "quantization")

_INSTALL_HINT = "pip install 'normscope[onnx]'"
_FUSED_LN = {"LayerNormalization": "layer_norm", "SkipLayerNormalization": "layer_norm",
             "RMSNormalization": "rms_norm", "SimplifiedLayerNormalization": "rms_norm",
             "SkipSimplifiedLayerNormalization": "rms_norm"}


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the ONNX audit needs onnx and onnxruntime ({e}); install them with: {_INSTALL_HINT}") from e


class OnnxNormSite:
    """One normalization site of an ONNX graph.

    Attributes:
        name: from the gamma initializer (``...LayerNorm.weight`` -> ``...LayerNorm``), else the node names.
        kind: ``layer_norm`` or ``rms_norm``.
        op: the fused op type, or ``decomposed``.
        input, output: the tensor the site normalizes and the tensor it produces (after gamma/beta).
        axis: the normalized axis (or axes); eps: the constant added to the variance (None when not constant).
        gamma, beta: initializer names (or None); nodes: the names of the nodes of the site.
    """

    def __init__(self, *, kind: str, op: str, input: str, output: str, axis, eps: Optional[float],
                 gamma: Optional[str], beta: Optional[str], nodes: List[str], stats_dtype: Optional[str] = None,
                 skip: Optional[str] = None):
        self.name = ""
        self.kind, self.op, self.input, self.output = kind, op, input, output
        self.axis, self.eps, self.gamma, self.beta, self.nodes = axis, eps, gamma, beta, nodes
        self.stats_dtype, self.skip = stats_dtype, skip

    def __repr__(self) -> str:
        return f"OnnxNormSite({self.name!r}, {self.kind}, op={self.op}, eps={self.eps}, axis={self.axis})"


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.init = {t.name: t for t in g.initializer}
        self._arrays: Dict[str, Any] = {}
        self._np = numpy_helper
        self.producer: Dict[str, Any] = {}
        self.consumers: Dict[str, List[Any]] = collections.defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.types: Dict[str, int] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
        self._anc: Dict[str, frozenset] = {}
        self._norm_outputs: set = set()

    def array(self, name: str):
        if name in self._arrays:
            return self._arrays[name]
        import numpy as np

        value = None
        if name in self.init:
            value = self._np.to_array(self.init[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        value = self._np.to_array(attr.t)
                    elif attr.name in ("value_float", "value_int"):
                        value = np.array(attr.f if attr.name == "value_float" else attr.i)
                    elif attr.name in ("value_floats", "value_ints"):
                        value = np.array(list(attr.floats) if attr.name == "value_floats" else list(attr.ints))
            elif node is not None and node.op_type in ("Cast", "Identity") and node.input:
                value = self.array(node.input[0])
        self._arrays[name] = value
        return value

    def is_const(self, name: str) -> bool:
        return self.array(name) is not None

    def src(self, name: str) -> str:
        """The tensor ``name`` is a Cast (or Identity) of, followed back."""
        seen = 0
        while name in self.producer and self.producer[name].op_type in ("Cast", "Identity") and seen < 16:
            name = self.producer[name].input[0]
            seen += 1
        return name

    def users(self, name: str) -> List[Tuple[Any, str]]:
        """``(node, the tensor it reads)`` for the consumers of ``name``, looking through Cast nodes."""
        out, stack, seen = [], [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in self.consumers.get(t, []):
                if n.op_type in ("Cast", "Identity"):
                    stack.append(n.output[0])
                else:
                    out.append((n, t))
        return out

    def the_user(self, name: str, ops: Sequence[str]):
        for n, t in self.users(name):
            if n.op_type in ops:
                return n, t
        return None, None

    def other(self, node, tensor: str) -> Optional[str]:
        ins = [i for i in node.input if i]
        if len(ins) != 2:
            return None
        return ins[1] if ins[0] == tensor else ins[0] if ins[1] == tensor else None

    def scalar(self, name: Optional[str]) -> Optional[float]:
        if name is None:
            return None
        a = self.array(name)
        if a is None or a.size != 1:
            return None
        return float(a.reshape(-1)[0])

    def attr(self, node, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                if a.type == a.FLOAT:
                    return a.f
                if a.type == a.INT:
                    return a.i
                if a.type == a.INTS:
                    return list(a.ints)
                if a.type == a.FLOATS:
                    return list(a.floats)
        return default

    def reduce_axes(self, node):
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            a = self.array(node.input[1])
            axes = None if a is None else [int(v) for v in a.reshape(-1)]
        if axes is not None and len(axes) == 1:
            return axes[0]
        return axes

    def ancestors(self, name: str) -> frozenset:
        """Non-constant tensors ``name`` is computed from (itself excluded), through every node."""
        if name in self._anc:
            return self._anc[name]
        stack, visiting = [name], set()
        while stack:  # iterative post-order over tensors not yet memoised
            t = stack[-1]
            if t in self._anc:
                stack.pop()
                continue
            node = self.producer.get(t)
            ins = [i for i in (node.input if node is not None else []) if i and not self.is_const(i)]
            pending = [i for i in ins if i not in self._anc and i not in visiting]
            if pending and t not in visiting:
                visiting.add(t)
                stack.extend(pending)
                continue
            stack.pop()
            visiting.discard(t)
            acc = set()
            for i in ins:
                acc.add(i)
                acc |= self._anc.get(i, frozenset())
            self._anc[t] = frozenset(acc)
        return self._anc[name]

    def residual(self, add) -> Optional[Tuple[str, str]]:
        """``(bypass, branch)`` if the Add node ``add`` is a residual add ``x + f(x)``, else None."""
        if add is None or add.op_type != "Add":
            return None
        ins = [i for i in add.input if i]
        if len(ins) != 2 or ins[0] == ins[1] or any(self.is_const(i) for i in ins):
            return None
        a, b = ins
        if a in self.ancestors(b):
            return a, b
        if b in self.ancestors(a):
            return b, a
        return None

    def dtype_name(self, name: Optional[str]) -> Optional[str]:
        if name is None:
            return None
        from onnx import helper

        t = self.types.get(name) or self.types.get(self.src(name))
        if not t:
            return None
        try:
            return str(helper.tensor_dtype_to_np_dtype(t)) if t != 16 else "bfloat16"
        except Exception:  # noqa: BLE001 - an exotic type is reported as unknown
            return None


# ----------------------------------------------------------------------------------------------------------
# site detection
# ----------------------------------------------------------------------------------------------------------


def _affine(g: _Graph, y: str, nodes: List[str], with_beta: bool) -> Tuple[str, Optional[str], Optional[str]]:
    """Follow ``y`` through an optional ``Mul(gamma)`` and ``Add(beta)`` with constant operands."""
    gamma = beta = None
    mul, t = g.the_user(y, ("Mul",))
    users = g.users(y)
    if mul is not None and len(users) == 1:
        o = g.other(mul, t)
        if o is not None and g.is_const(o) and g.array(o).size > 1:
            gamma, y = o, mul.output[0]
            nodes.append(mul.name)
    if with_beta:
        add, t = g.the_user(y, ("Add",))
        if add is not None and len(g.users(y)) == 1:
            o = g.other(add, t)
            if o is not None and g.is_const(o) and g.array(o).size > 1:
                beta, y = o, add.output[0]
                nodes.append(add.name)
    return y, gamma, beta


def _squared(g: _Graph, node) -> Optional[str]:
    """The tensor ``node`` squares (``Pow(x, 2)`` or ``Mul(x, x)``), else None."""
    if node.op_type == "Pow" and len(node.input) == 2 and g.scalar(node.input[1]) == 2.0:
        return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2 and g.src(node.input[0]) == g.src(node.input[1]):
        return node.input[0]
    return None


def _decomposed(g: _Graph, sq_node) -> Optional[OnnxNormSite]:
    s = _squared(g, sq_node)
    if s is None:
        return None
    nodes = [sq_node.name]
    rm, _ = g.the_user(sq_node.output[0], ("ReduceMean",))
    if rm is None:
        return None
    add, t = g.the_user(rm.output[0], ("Add",))
    if add is None:
        return None
    eps_name = g.other(add, t)
    eps = g.scalar(eps_name)
    if eps is None:
        return None
    sqrt, _ = g.the_user(add.output[0], ("Sqrt",))
    if sqrt is None:
        return None
    nodes += [rm.name, add.name, sqrt.name]
    x = g.src(s)
    y = None
    for n, t in g.users(sqrt.output[0]):
        if n.op_type == "Div" and n.input[1] == t and g.src(n.input[0]) == x:
            y = n.output[0]
            nodes.append(n.name)
        elif n.op_type == "Reciprocal":
            mul, t2 = g.the_user(n.output[0], ("Mul",))
            if mul is not None and g.src(g.other(mul, t2) or "") == x:
                y = mul.output[0]
                nodes += [n.name, mul.name]
        if y is not None:
            break
    if y is None:
        return None
    kind, inp = "rms_norm", x
    centre = g.producer.get(x)
    if centre is not None and centre.op_type == "Sub":
        mean = g.producer.get(g.src(centre.input[1]))
        if mean is not None and mean.op_type == "ReduceMean" and g.src(mean.input[0]) == g.src(centre.input[0]):
            kind, inp = "layer_norm", centre.input[0]
            nodes = [mean.name, centre.name] + nodes
    out, gamma, beta = _affine(g, y, nodes, with_beta=kind == "layer_norm")
    return OnnxNormSite(kind=kind, op="decomposed", input=inp, output=out, axis=g.reduce_axes(rm), eps=eps,
                        gamma=gamma, beta=beta, nodes=nodes, stats_dtype=g.dtype_name(sq_node.output[0]))


def _fused(g: _Graph, node) -> OnnxNormSite:
    kind = _FUSED_LN[node.op_type]
    ins = list(node.input) + [""] * 5
    skip = None
    if node.op_type.startswith("Skip"):
        gamma, beta = ins[2] or None, (ins[3] or None) if kind == "layer_norm" else None
        skip = ins[1] or None
    else:
        gamma, beta = ins[1] or None, (ins[2] or None) if kind == "layer_norm" else None
    axis = g.attr(node, "axis", -1)
    eps = g.attr(node, "epsilon", 1e-5)
    stash = g.attr(node, "stash_type", 1)
    stats = {1: "float32", 11: "float64", 10: "float16", 16: "bfloat16"}.get(stash, "float32")
    if node.domain == "com.microsoft" and node.op_type != "LayerNormalization":
        stats = "float32"  # onnxruntime's contrib kernels accumulate in float32
    return OnnxNormSite(kind=kind, op=node.op_type, input=ins[0], output=node.output[0], axis=axis,
                        eps=None if eps is None else float(eps), gamma=gamma, beta=beta, nodes=[node.name],
                        stats_dtype=stats, skip=skip)


def _site_name(site: OnnxNormSite, used: Dict[str, int]) -> str:
    base = None
    for p in (site.gamma, site.beta):
        if p:
            base = p
            for suffix in (".weight", ".gamma", ".scale", ".bias", ".beta", "/gamma", "/beta", ":0"):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
            break
    if not base:
        base = next((n for n in site.nodes if n), site.output)
    if base.startswith("encoder_model.") or base.startswith("model."):
        base = base.split(".", 1)[1]
    n = used.get(base, 0)
    used[base] = n + 1
    return base if n == 0 else f"{base}#{n}"


def find_onnx_norms(model) -> List[OnnxNormSite]:
    """The normalization sites of an ONNX model (an ``onnx.ModelProto`` or a path), in graph order."""
    _require()
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return _find(_Graph(model))


def _find(g: _Graph) -> List[OnnxNormSite]:
    sites: List[OnnxNormSite] = []
    claimed: set = set()
    for node in g.nodes:
        if node.op_type in _FUSED_LN and node.domain in ("", "ai.onnx", "com.microsoft"):
            sites.append(_fused(g, node))
        elif node.op_type in ("Pow", "Mul") and node.name not in claimed:
            site = _decomposed(g, node)
            if site is not None and not claimed.intersection(site.nodes):
                claimed.update(site.nodes)
                sites.append(site)
    used: Dict[str, int] = {}
    for s in sites:
        s.name = _site_name(s, used)
    return sites


# ----------------------------------------------------------------------------------------------------------
# placement (the definitions of normscope.analysis.placement, on tensors of the graph)
# ----------------------------------------------------------------------------------------------------------


def _placement(g: _Graph, site: OnnxNormSite, outputs: set) -> Tuple[str, List[List[str]], List[List[str]]]:
    x, y = g.src(site.input), site.output
    producers: List[List[str]] = []
    consumers: List[List[str]] = []
    prod = g.producer.get(x)
    res = g.residual(prod)
    if site.skip is not None:  # Skip*LayerNormalization normalizes input + skip
        producers.append(["add", "residual"])
    elif prod is not None:
        producers.append(["add", "residual" if res else "add"] if prod.op_type == "Add" else ["other", prod.op_type])
    else:
        producers.append(["input", x])
    feeds_residual = False
    for n, t in g.users(y):
        r = g.residual(n)
        if n.op_type == "Add":
            consumers.append(["add", "residual" if r else "add"])
        elif n.op_type in ("MatMul", "Gemm"):
            w = n.input[1] if len(n.input) > 1 else ""
            consumers.append(["matmul", w if g.is_const(w) else "activation"])
        else:
            consumers.append(["other", n.op_type])
        if r and g.src(r[0]) == g.src(y):
            feeds_residual = True
    if y in outputs:
        consumers.append(["output", y])
    consumers = [list(c) for c in dict.fromkeys(tuple(c) for c in consumers)]
    for n, t in g.users(x):  # the input also bypasses the norm into x + f(norm(x))
        if site.nodes and n.name in site.nodes:
            continue
        r = g.residual(n)
        if r and g.src(r[0]) == x and y in g.ancestors(r[1]):
            return "pre", producers, consumers
    if site.skip is not None:
        return "post", producers, consumers
    if res is not None:
        branch = (g.ancestors(res[1]) | {res[1]}) - g.ancestors(res[0]) - {res[0]}
        if not any(o in branch for o in g._norm_outputs):
            return "post", producers, consumers
    if feeds_residual:
        return "post", producers, consumers
    if res is not None:
        return "final", producers, consumers
    return "other", producers, consumers


# ----------------------------------------------------------------------------------------------------------
# inputs and onnxruntime
# ----------------------------------------------------------------------------------------------------------


def _example_inputs(g: _Graph, seed: int = 0, batch: int = 2, seq: int = 16) -> Dict[str, Any]:
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(seed)
    feeds = {}
    for v in g.model.graph.input:
        if v.name in g.init:
            continue
        tt = v.type.tensor_type
        dims, dynamic = [], 0
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(batch if dynamic == 0 else seq)
                dynamic += 1
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dt.kind in "iu":
            vocab = None
            for n, _ in g.users(v.name):
                if n.op_type == "Gather" and n.input[0] in g.init:
                    vocab = int(g.init[n.input[0]].dims[0])
                    break
            if "mask" in v.name.lower():
                arr = np.ones(dims, dtype=dt)
            elif vocab:
                arr = rng.integers(0, vocab, size=dims).astype(dt)
            else:
                arr = np.zeros(dims, dtype=dt)
        elif dt.kind == "b":
            arr = np.ones(dims, dtype=bool)
        else:
            arr = rng.standard_normal(dims).astype(dt)
        feeds[v.name] = arr
    return feeds


def _session(model_or_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the norm sites observable
    return ort.InferenceSession(model_or_bytes, so, providers=["CPUExecutionProvider"])


def _float_outputs(values) -> Any:
    import numpy as np

    parts = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values
             if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    return np.concatenate(parts) if parts else None


def _sqnr_db(ref, test) -> Optional[float]:
    import numpy as np

    noise = float(np.sum((ref - test) ** 2))
    signal = float(np.sum(ref ** 2))
    if not math.isfinite(noise) or not math.isfinite(signal):
        return None
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else None


def _quantized_copy(model, tensor: str, amax: float, elem_type: int):
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for n in g.node:
        for k, i in enumerate(n.input):
            if i == tensor:
                n.input[k] = tensor + "__ns_dq"
    scale_type = elem_type if elem_type in (TensorProto.FLOAT16,) else TensorProto.FLOAT
    scale = max(float(amax), 1e-30) / 127.0
    g.initializer.extend([helper.make_tensor(tensor + "__ns_scale", scale_type, [], [scale]),
                          helper.make_tensor(tensor + "__ns_zp", TensorProto.INT8, [], [0])])
    pre = [] if elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, 0) else [
        helper.make_node("Cast", [tensor], [tensor + "__ns_f"], to=TensorProto.FLOAT)]
    src = tensor + "__ns_f" if pre else tensor
    nodes = pre + [helper.make_node("QuantizeLinear", [src, tensor + "__ns_scale", tensor + "__ns_zp"],
                                    [tensor + "__ns_q"]),
                   helper.make_node("DequantizeLinear", [tensor + "__ns_q", tensor + "__ns_scale",
                                                         tensor + "__ns_zp"],
                                    [tensor + ("__ns_dqf" if pre else "__ns_dq")])]
    if pre:
        nodes.append(helper.make_node("Cast", [tensor + "__ns_dqf"], [tensor + "__ns_dq"], to=elem_type))
    g.node.extend(nodes)
    # keep the nodes topologically sorted: the new ones go right after the producer of the tensor
    order = list(g.node)
    prod = next((k for k, n in enumerate(order[:-len(nodes)]) if tensor in n.output), None)
    if prod is not None:
        rest = order[:-len(nodes)]
        order = rest[:prod + 1] + nodes + rest[prod + 1:]
        del g.node[:]
        g.node.extend(order)
    for o in g.output:
        if o.name == tensor:  # a site that is a graph output: the output itself is the quantized one
            o.name = tensor + "__ns_dq"
    if m.opset_import and all(o.version < 13 for o in m.opset_import if o.domain in ("", "ai.onnx")):
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 13
    return m


# ----------------------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------------------


class _OnnxAudit:
    def __init__(self, model, path: str, feeds, thresholds, progress):
        from normscope.audit import _Audit

        self.base = _Audit(None, feeds, thresholds, progress)
        self.model, self.path, self.feeds, self.t = model, path, feeds, thresholds
        self.g = _Graph(model)
        self.sites: List[OnnxNormSite] = []

    def analysis(self) -> Optional[str]:
        import numpy as np
        import torch

        from normscope.analysis.placement import _eps_risks
        from normscope.audit import _outliers

        g, a = self.g, self.base
        self.sites = _find(g)
        if not self.sites:
            return "no normalization site in the graph"
        g._norm_outputs = {s.output for s in self.sites}
        outputs = {o.name for o in self.model.graph.output}
        for s in self.sites:
            placement, producers, consumers = _placement(g, s, outputs)
            gamma = g.array(s.gamma) if s.gamma else None
            entry = a.layers.setdefault(s.name, {"name": s.name})
            entry.update({"kind": s.kind, "op": s.op, "eps": s.eps, "axis": s.axis, "placement": placement,
                          "producers": producers, "consumers": consumers, "dtype": g.dtype_name(s.input),
                          "compute_dtype": s.stats_dtype, "gamma_dtype": g.dtype_name(s.gamma),
                          "gamma_name": s.gamma, "beta_name": s.beta, "input": s.input, "output": s.output,
                          "nodes": s.nodes, "foldable": False,
                          "fold_reason": "folding is not performed on ONNX graphs", "risks": []})
            if gamma is not None and gamma.size > 0:
                gt = torch.from_numpy(np.asarray(gamma, dtype=np.float32).reshape(-1).copy())
                med = float(gt.abs().median())
                ratio = float(gt.abs().max()) / med if med > 0 else None
                entry["gamma"] = {"mean": float(gt.mean()), "min": float(gt.min()), "max": float(gt.max()),
                                  "abs_median": med, "outlier_ratio": ratio}
                entry["gamma_outliers"] = _outliers(gt)
                if ratio is not None and ratio > self.t.gamma_outlier_ratio:
                    chans = ", ".join(str(int(c[0])) for c in entry["gamma_outliers"][:5]
                                      if c[2] > self.t.gamma_outlier_ratio)
                    a.finding("gamma_outliers", "info",
                              f"{s.name}: gamma has outlier channels ({chans}); the largest |gamma| is {ratio:.0f}x "
                              "the median, so per-tensor int8 rounds the other channels coarsely",
                              layer=s.name, value=ratio, source="analysis")
            # the eps rule of normscope.checks.eps_safety, in the dtype the statistics are computed in
            compute = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                       "float64": torch.float64}.get(s.stats_dtype or "", torch.float32)
            if s.eps is not None:
                if not math.isfinite(s.eps) or s.eps <= 0:
                    risk = f"eps={s.eps:g} is not a positive number"
                    entry["risks"].append(risk)
                    a.finding("eps_underflow", "error", f"{s.name}: {risk}", layer=s.name, value=s.eps,
                              source="analysis")
                for risk in _eps_risks(s.eps, compute):
                    entry["risks"].append(risk)
                    if "underflows" in risk:
                        a.finding("eps_underflow", "error", f"{s.name}: {risk} (use an eps that "
                                  f"{s.stats_dtype} represents, e.g. 1e-5, or compute the statistics in float32)",
                                  layer=s.name, value=s.eps, source="analysis")
                    else:
                        a.finding("eps_underflow", "warning", f"{s.name}: {risk}", layer=s.name, value=s.eps,
                                  source="analysis")
            if s.stats_dtype in ("float16", "bfloat16"):
                risk = f"statistics computed in {s.stats_dtype} without a float32 upcast"
                entry["risks"].append(risk)
                a.finding("reduced_precision", "warning", f"{s.name}: {risk}", layer=s.name, source="analysis")
        by_kind: Dict[str, set] = collections.defaultdict(set)
        for s in self.sites:
            if s.eps is not None:
                by_kind[s.kind].add(s.eps)
        for kind, values in by_kind.items():
            if len(values) > 1:
                a.finding("eps_inconsistent", "info", f"{kind} sites use different eps values: "
                          + ", ".join(f"{v:g}" for v in sorted(values)), source="analysis")
        post = [e for e in a.layers.values() if e.get("placement") == "post"
                and ["add", "residual"] in e.get("producers", [])]
        if post:
            a.finding("post_ln_depth", "info",
                      f"{len(post)} of {len(self.sites)} norm sites are post-LN (the norm follows the residual add): "
                      "at initialisation the gradients of the first layers shrink with depth (Xiong et al., 2020); "
                      "fine-tune with learning-rate warm-up, or prefer pre-LN for deep models",
                      layer=post[0]["name"], value=len(post), source="analysis")
        a.result["analysis"] = {"model": os.path.basename(self.path), "risks": [],
                                "opset": g.opset, "sites": len(self.sites)}
        return None

    def quantization(self) -> Optional[str]:
        import onnx

        from normscope.audit import _StepFailed

        if not self.sites:
            return "no normalization site to quantize"
        a, g, t = self.base, self.g, self.t
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        known = {o.name for o in probe.graph.output}
        extra = [s.output for s in self.sites if s.output not in known]
        probe.graph.output.extend([onnx.ValueInfoProto(name=n) for n in extra])
        n_out = len(self.model.graph.output)
        values = _session(probe.SerializeToString()).run(None, self.feeds)
        ref = _float_outputs(values[:n_out])
        if ref is None:
            raise _StepFailed("the model has no floating-point output to measure the SQNR on")
        by_name = dict(zip([o.name for o in probe.graph.output], values))
        rows, failed = [], []
        for s in self.sites:
            import numpy as np

            act = np.asarray(by_name[s.output])
            amax = float(np.max(np.abs(act.astype(np.float64)))) if act.size else 0.0
            elem = g.types.get(s.output, 0) or (1 if act.dtype == np.float32 else 10 if act.dtype == np.float16 else 0)
            try:
                q = _quantized_copy(self.model, s.output, amax, elem)
                outs = _session(q.SerializeToString()).run(None, self.feeds)
                sq = _sqnr_db(ref, _float_outputs(outs[:n_out]))
            except Exception as e:  # noqa: BLE001 - one site that cannot be quantized does not stop the others
                failed.append(f"{s.name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                continue
            entry = a.layers[s.name]
            entry["quant"] = {"sqnr_db": {"int8": sq}, "worst_format": "int8",
                              "worst_sqnr_db": None if sq is None else (sq if math.isfinite(sq) else 1e9),
                              "outlier_ratio": (entry.get("gamma") or {}).get("outlier_ratio"), "rank": None,
                              "activation_absmax": amax}
            rows.append((sq, s.name))
        ranked = sorted((r for r in rows if r[0] is not None), key=lambda r: r[0])
        for rank, (sq, name) in enumerate(ranked, 1):
            a.layers[name]["quant"]["rank"] = rank
            if sq < t.quant_sqnr_db:
                severity = "error" if sq < t.quant_sqnr_error_db else "warning"
                a.finding("quant_sensitive", severity,
                          f"{name}: fake-quantizing only this norm's output to int8 (per-tensor, symmetric) brings the "
                          f"model output SQNR down to {sq:.1f} dB (threshold {t.quant_sqnr_db:g} dB); keep it in "
                          "higher precision or use a per-channel scale", layer=name, value=sq, source="quant")
        a.result["quant"] = {"samples": int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 0,
                             "formats": ["int8"], "ranking": [name for _, name in ranked],
                             "method": "QuantizeLinear/DequantizeLinear (int8, per-tensor symmetric) after each norm, "
                                       "under onnxruntime", "dynamic_int8": None, "warnings": failed}
        if failed:
            raise _StepFailed(f"{len(failed)} of {len(self.sites)} sites could not be quantized: {failed[0]}")
        return None


def audit_onnx(
    path: str,
    *,
    inputs: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
    steps: Sequence[str] = ONNX_STEPS,
    thresholds=None,
    progress: Optional[Callable[[int, int, str, Optional[dict]], None]] = None,
) -> Dict[str, Any]:
    """Audit the normalization sites of the ONNX model at ``path``; return a dict shaped as ``run_audit``'s.

    Args:
        path: an ``.onnx`` file (external data next to it is loaded).
        inputs: ``{graph input name: array}`` (numpy arrays or tensors); default: built from the graph's input
            specs (ids in ``[0, vocab)`` where a Gather gives the vocabulary, masks of ones, floats ~N(0, 1)).
        name: how the report names the model (default: the file name).
        steps: which of :data:`ONNX_STEPS` to run.
        thresholds: :class:`normscope.audit.AuditThresholds`.
        progress: as :func:`normscope.audit.run_audit`'s.

    Raises:
        ImportError: onnx or onnxruntime is missing (``pip install 'normscope[onnx]'``).
        ValueError: the file is not a loadable ONNX model, it has no normalization site, an unknown step, or
            inputs that do not match the graph.
    """
    _require()
    import numpy as np
    import onnx
    import onnxruntime

    import normscope
    from normscope.audit import AuditThresholds

    unknown = [s for s in steps if s not in ONNX_STEPS]
    if unknown:
        raise ValueError(f"Expected steps from {ONNX_STEPS}, but got {unknown}")
    path = os.fspath(path)
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - any parse error is a bad file
        raise ValueError(f"Expected {path!r} to be an ONNX model, but it does not load: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    thresholds = thresholds or AuditThresholds()
    t_start = time.perf_counter()
    audit = _OnnxAudit(model, path, None, thresholds, progress)
    if not _find(audit.g):
        raise ValueError(f"Expected an ONNX model with at least one normalization site, but {os.path.basename(path)!r} "
                         "has none (LayerNormalization, RMSNormalization, the com.microsoft (Skip)(Simplified)"
                         "LayerNormalization ops, or a decomposed mean/variance/sqrt/div pattern)")
    graph_inputs = [v.name for v in model.graph.input if v.name not in audit.g.init]
    if inputs is None:
        feeds = _example_inputs(audit.g)
        desc = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in feeds.items()) + " (generated)"
    else:
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in inputs.items()}
        missing = [k for k in graph_inputs if k not in feeds]
        extra = [k for k in feeds if k not in graph_inputs]
        if missing or extra:
            raise ValueError(f"Expected inputs named {graph_inputs}, but got {sorted(feeds)}"
                             + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
        feeds = {k: feeds[k] for k in graph_inputs}
        desc = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in feeds.items())
    audit.feeds = feeds
    a = audit.base
    plan = [(s, getattr(audit, s)) for s in ONNX_STEPS if s in steps]
    if "analysis" not in steps and "quantization" in steps:
        audit.sites = _find(audit.g)
        audit.g._norm_outputs = {s.output for s in audit.sites}
        for s in audit.sites:
            a.layers.setdefault(s.name, {"name": s.name, "kind": s.kind, "eps": s.eps})
    for i, (step, fn) in enumerate(plan):
        a.run_step(i + 1, len(plan), step, fn)

    severity_rank = {"error": 0, "warning": 1, "info": 2}
    order = {n: i for i, n in enumerate(a.layers)}
    findings = sorted(a.findings, key=lambda f: (severity_rank.get(f["severity"], 3),
                                                 order.get(f["layer"], len(order)), f["kind"]))
    counts = collections.Counter(f["severity"] for f in findings)
    layer_list = [a.layers[n] for n in a.layers]
    for entry in layer_list:
        for key in ("kind", "eps", "placement", "dtype", "compute_dtype", "fold_reason", "stats", "in_hist", "gamma",
                    "quant", "time_ms"):
            entry.setdefault(key, None)
        entry.setdefault("foldable", False)
        for key in ("consumers", "producers", "risks", "gamma_outliers"):
            entry.setdefault(key, [])
        entry.setdefault("calls", 1)
    quant_layers = [e for e in layer_list if e.get("quant") and e["quant"].get("worst_sqnr_db") is not None]
    worst = min(quant_layers, key=lambda e: e["quant"]["worst_sqnr_db"]) if quant_layers else None
    params = sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer)
    ftypes = collections.Counter(audit.g.dtype_name(t.name) for t in model.graph.initializer
                                 if t.data_type in (1, 10, 11, 16))
    summary = {
        "layers": len(layer_list),
        "kinds": dict(collections.Counter(e["kind"] for e in layer_list)),
        "placements": dict(collections.Counter(e["placement"] for e in layer_list if e.get("placement"))),
        "foldable": 0,
        "findings": {s: counts.get(s, 0) for s in ("error", "warning", "info")},
        "nonfinite": None, "eps_rows": None,
        "worst_sqnr_db": worst["quant"]["worst_sqnr_db"] if worst else None,
        "worst_sqnr_layer": worst["name"] if worst else None,
        "int8_sqnr_db": None, "int8_cosine": None, "export_max_abs_diff": None, "norm_time_share": None,
    }
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x)
    return {
        "normscope_version": normscope.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t_start, 3),
        "exit_code": 1 if counts.get("error") else 0,
        "model": {"name": name or os.path.basename(path), "source": os.path.abspath(path),
                  "class": f"ONNX graph (opset {audit.g.opset})", "parameters": params,
                  "trainable_parameters": 0, "dtype": ftypes.most_common(1)[0][0] if ftypes else None,
                  "device": "cpu (onnxruntime)", "inputs": desc,
                  "config": {"opset": audit.g.opset, "ir_version": model.ir_version, "producer": producer,
                             "nodes": len(model.graph.node)}},
        "environment": {"python": platform.python_version(), "onnx": onnx.__version__,
                        "onnxruntime": onnxruntime.__version__, "normscope": normscope.__version__,
                        "platform": platform.platform(terse=True), "machine": platform.machine(),
                        "backend": "onnxruntime CPUExecutionProvider", "device": "cpu"},
        "thresholds": thresholds.to_dict(),
        "summary": summary,
        "layers": layer_list,
        "hist_edges": None,
        "findings": findings,
        "analysis": a.result.get("analysis"),
        "monitor": None,
        "export": None,
        "quant": a.result.get("quant"),
        "profile": None,
        "snapshot": None,
        "steps": a.steps,
    }
