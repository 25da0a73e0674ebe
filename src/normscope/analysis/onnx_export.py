"""ONNX export of models that contain normscope modules or ops, with a count of the norm operators
in the exported graph and a numerical check against PyTorch under onnxruntime.

How normscope ops export: the model is captured with :func:`torch.export.export`, then the
``normscope::norm_fwd`` custom op is decomposed (:func:`onnx_decompositions`) into the ATen ops
that torch's own norms trace to (``aten.native_layer_norm``, ``aten.rms_norm``, an ``add`` for the
residual variants), and the result goes through torch's dynamo ONNX exporter. A normscope
``LayerNorm`` therefore becomes exactly what ``torch.nn.LayerNorm`` becomes (one
``LayerNormalization``, ``stash_type=1``) and a normscope ``RMSNorm`` what ``torch.nn.RMSNorm``
becomes (one ``RMSNormalization`` at opset >= 23; below, torch's primitive pattern
``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul``); the only extra nodes are the
``Reshape`` s to and from the op's 2-D layout. Masked ops export as the float32 reference
computation (primitive ops only; no norm operator).

``onnx``, ``onnxruntime`` and ``onnxscript`` are imported only when :func:`export_onnx` runs
(``pip install 'normscope[onnx]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import normscope.ops.core  # noqa: F401  (registers normscope::norm_fwd)
from normscope.discovery import find_norm_layers
from normscope.ops import reference as R

__all__ = ["export_onnx", "ExportReport", "onnx_decompositions", "count_norm_nodes", "NORM_OP_TYPES",
           "DEFAULT_OPSET"]

#: Default opset: the lowest that torch's dynamo exporter emits natively (opset 17 is reached by a
#: version conversion, which may fail and leave the model at 18). Use 23 for ``RMSNormalization``.
DEFAULT_OPSET = 18

#: ONNX operator types counted as one normalization each (``com.microsoft`` fused ops included).
NORM_OP_TYPES = (
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
#: Names under which :func:`count_norm_nodes` reports primitive-op normalization patterns.
RMS_PATTERN = "RMSNormPattern"
LAYER_NORM_PATTERN = "LayerNormPattern"

# Tolerance (atol, rtol) on max |onnx - torch| <= atol + rtol * max |torch|, by output dtype.
_TOLERANCES = {
    torch.float64: (1e-8, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

_INSTALL_HINT = "pip install 'normscope[onnx]'"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and found.

    Attributes:
        path: the ONNX file written.
        opset: the default-domain opset of the written model (may differ from the one asked for when
            torch's exporter could not convert down to it; see ``warnings``).
        exporter: ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)`` on a ``torch.export`` program).
        norm_nodes: count per norm operator type in the graph (:data:`NORM_OP_TYPES`) and per
            primitive pattern (``"RMSNormPattern"``, ``"LayerNormPattern"``); only non-zero entries.
        expected_norms: LayerNorm / RMSNorm layers of the model (found by
            :func:`normscope.discovery.find_norm_layers`), a layer called several times in one forward on the
            example inputs counting once per call: a shared layer, or a norm inside a recurrent cell (once per
            time step: the exported graph unrolls the recurrence for the example's sequence length).
        max_abs_diff: max absolute difference between onnxruntime's and PyTorch's outputs over all
            floating outputs (``None`` when ``verify=False``).
        max_rel_diff: ``max_abs_diff / max |PyTorch output|`` (relative to the output's scale, not
            element by element, which would blow up at outputs near 0); ``None`` when not verified.
        ok: True when the norm node count equals ``expected_norms`` and (if verified) every output is
            within the dtype's tolerance.
        warnings: why ``ok`` is False, and other things worth knowing about the export.
        cached: the graph was copied from the export cache (``cache_dir``) instead of exported again.
    """

    path: str
    opset: int
    exporter: str
    norm_nodes: Dict[str, int]
    expected_norms: int
    max_abs_diff: Optional[float]
    max_rel_diff: Optional[float]
    ok: bool
    warnings: Tuple[str, ...] = ()
    cached: bool = False

    @property
    def total_norm_nodes(self) -> int:
        """Norm operators plus recognised primitive norm patterns in the graph."""
        return sum(self.norm_nodes.values())


# --------------------------------------------------------------------------------------------
# Decomposition of normscope::norm_fwd into exportable ATen ops
# --------------------------------------------------------------------------------------------


def _norm_fwd_decomposition(x, residual, mask, weight, bias, eps, rms, h_dtype, offset=0.0):
    m, n = x.shape
    acc = R.acc_dtype(x.dtype, residual.dtype if residual is not None else x.dtype)
    if mask is not None:
        y, h, mean, rstd = R.norm_fwd(x, residual, mask, weight, bias, eps, rms, h_dtype, offset=offset)
        h = x.new_empty((0,)) if h is None else h
        mean = x.new_empty((0,), dtype=acc) if mean is None else mean
        return y, h, mean, rstd
    if residual is not None:
        h_dtype = h_dtype or torch.promote_types(x.dtype, residual.dtype)
        h = x + residual if x.dtype == residual.dtype == h_dtype else (x.to(acc) + residual.to(acc)).to(h_dtype)
        xn = h
    else:
        h = x.new_empty((0,))
        xn = x
    if weight is not None and offset != 0.0:
        weight = weight.to(acc) + offset  # Gemma's weight.float() + 1, as the kernels form it
    params = [p for p in (weight, bias) if p is not None]
    if any(p.dtype != xn.dtype for p in params):
        # Mixed precision (e.g. float32 gamma with bfloat16 input): compute in the accumulation dtype
        # as normscope does, then round once.
        xn = xn.to(acc)
        weight = None if weight is None else weight.to(acc)
        bias = None if bias is None else bias.to(acc)
    if rms:
        y = torch.ops.aten.rms_norm.default(xn, [n], weight, eps)
        mean = x.new_empty((0,), dtype=acc)
        # rstd is never used at inference; a cheap placeholder keeps the op's output signature and is
        # removed by the exporter's dead-code elimination.
        rstd = x.new_zeros((m,), dtype=acc)
    else:
        y, mean, rstd = torch.ops.aten.native_layer_norm.default(xn, [n], weight, bias, eps)
        mean, rstd = mean.reshape(m).to(acc), rstd.reshape(m).to(acc)
    return y.to(x.dtype), h, mean, rstd


def onnx_decompositions() -> Dict[Any, Any]:
    """The decomposition table that makes normscope ops exportable with ``torch.onnx``.

    Use it when calling the exporter yourself::

        ep = torch.export.export(model, args).run_decompositions(onnx_decompositions())
        torch.onnx.export(ep, args, "model.onnx", dynamo=True)

    Only ``normscope::norm_fwd`` is decomposed (every other op is left to the ONNX exporter).
    """
    return {torch.ops.normscope.norm_fwd.default: _norm_fwd_decomposition}


# --------------------------------------------------------------------------------------------
# Counting norm operators and primitive patterns in an ONNX graph
# --------------------------------------------------------------------------------------------

_PASS_THROUGH = ("Cast", "Identity", "CastLike")


def _constant_value(name: str, producers: Mapping[str, Any], initializers: Mapping[str, Any]):
    from onnx import numpy_helper

    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name == "value_float":
                return attr.f
            if attr.name == "value_int":
                return attr.i
    return None


def count_norm_nodes(model) -> Dict[str, int]:
    """Count normalization operators and primitive norm patterns in an ONNX model.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        ``{op_type or pattern: count}`` with only non-zero entries. Operators: :data:`NORM_OP_TYPES`.
        Patterns (each counted once): ``"RMSNormPattern"`` is ``ReduceMean(x*x or Pow(x, 2)) -> Add
        -> Sqrt -> Reciprocal | Div`` (torch's RMSNorm below opset 23, Hugging Face ``LlamaRMSNorm``
        and the like), ``"LayerNormPattern"`` the same over ``x - ReduceMean(x)``; ``Cast`` nodes in
        between are skipped.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    graph = model.graph
    counts: Counter = Counter()
    nodes = list(graph.node)
    producers = {out: node for node in nodes for out in node.output}
    consumers: Dict[str, List[Any]] = {}
    for node in nodes:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    initializers = {init.name: init for init in graph.initializer}

    def producer(name):
        node = producers.get(name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producers.get(node.input[0])
        return node

    def next_op(node, op_types):
        stack = list(consumers.get(node.output[0], []))
        while stack:
            cand = stack.pop()
            if cand.op_type in op_types:
                return cand
            if cand.op_type in _PASS_THROUGH:
                stack.extend(consumers.get(cand.output[0], []))
        return None

    def squared_operand(node):
        """The tensor name ``z`` if ``node`` computes ``z * z`` or ``z ** 2``, else None."""
        if node is None:
            return None
        if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
            return node.input[0]
        if node.op_type == "Pow" and len(node.input) == 2:
            value = _constant_value(node.input[1], producers, initializers)
            try:
                if value is None or float(getattr(value, "item", lambda: value)()) == 2.0:
                    return node.input[0]
            except (TypeError, ValueError):
                return None
        return None

    for node in nodes:
        if node.op_type in NORM_OP_TYPES:
            counts[node.op_type] += 1
            continue
        if node.op_type != "ReduceMean":
            continue
        z = squared_operand(producer(node.input[0]))
        if z is None:
            continue
        add = next_op(node, ("Add",))
        sqrt = next_op(add, ("Sqrt",)) if add is not None else None
        inv = next_op(sqrt, ("Reciprocal", "Div")) if sqrt is not None else None
        if inv is None:
            continue
        src = producer(z)
        centered = src is not None and src.op_type == "Sub" and (
            (lambda p: p is not None and p.op_type == "ReduceMean")(producer(src.input[1]))
        )
        counts[LAYER_NORM_PATTERN if centered else RMS_PATTERN] += 1
    return {k: v for k, v in sorted(counts.items()) if v}


# --------------------------------------------------------------------------------------------
# export_onnx
# --------------------------------------------------------------------------------------------


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"normscope.export_onnx needs onnx, onnxruntime and onnxscript ({e}); install them with: "
            f"{_INSTALL_HINT}"
        ) from e


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected path to be a str or os.PathLike, but got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("Expected path to be a non-empty file path, but got ''")
    from normscope._paths import check_output

    if os.path.isdir(path):
        raise ValueError(f"Expected path to be a file path, but got the directory {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"Expected path in an existing directory, but {parent!r} does not exist")
    problem = check_output(path)  # symbolic links resolved: a dangling link's directory, a loop
    if problem == "permission denied":
        raise PermissionError(f"Expected a writable path, but cannot write {path!r}")
    if problem:
        raise ValueError(f"Expected a writable path, but cannot write {path!r}: {problem}")
    return path


def _check_opset(opset) -> int:
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise TypeError(f"Expected opset to be an int, but got {type(opset).__name__}")
    if opset < 17:
        raise ValueError(f"Expected opset >= 17 (LayerNormalization needs opset 17), but got {opset}")
    return int(opset)


def _split_inputs(example_inputs) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("Expected example_inputs as a dict to have str keys (keyword arguments)")
        return (), dict(example_inputs)
    raise TypeError(
        "Expected example_inputs to be a torch.Tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, but got {type(example_inputs).__name__}"
    )


def _flat_tensors(obj) -> List[Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(obj) if isinstance(t, Tensor)]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str], level: int = logging.ERROR):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _to_numpy(t: Tensor):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # installed with onnx

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Union[Tensor, tuple, list, Mapping[str, Any]],
    path: Union[str, os.PathLike],
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> ExportReport:
    """Export ``model`` to ONNX, count its norm operators and check the file under onnxruntime.

    normscope modules and ops export exactly as torch's norms do (see the module docstring): one
    ``LayerNormalization`` per LayerNorm, one ``RMSNormalization`` per RMSNorm at ``opset >= 23``
    (torch's ``Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul`` pattern below), ``Add`` + ``LayerNormalization``
    for the fused residual ops. The model is exported in eval mode under ``torch.no_grad()`` with
    static shapes (those of ``example_inputs``); its training flags are restored afterwards.

    Args:
        model: the model.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        path: the ``.onnx`` file to write (its directory must exist).
        opset: ONNX opset, >= 17. Default: 18 (the exporter's native minimum; 17 is reached by a version
            conversion that may fail, in which case the file stays at 18 and a warning says so).
        verify: run the file with onnxruntime (``CPUExecutionProvider``) on ``example_inputs`` and
            compare every floating output with PyTorch's. Default: True.
        cache_dir: keep exported graphs in this directory and reuse one when the same model is exported
            again: the key hashes every parameter and buffer (names, dtypes, shapes, bytes), the source of
            every module class, the input shapes and dtypes, the opset and the versions of normscope, torch,
            onnx and onnxscript. The check with onnxruntime always runs. At most
            :data:`EXPORT_CACHE_ENTRIES` graphs are kept (least recently used go first). Default: None (no
            cache).

    Returns:
        An :class:`ExportReport`. ``ok`` is False, with a warning, when the graph holds a different
        number of norm operators / patterns than the model has LayerNorm / RMSNorm layers (calls, for a layer
        called several times), or when an
        output differs from PyTorch's by more than the dtype's tolerance (float32: ``1e-4 + 1e-4 *
        max|y|``).

    Raises:
        ImportError: onnx, onnxruntime or onnxscript is missing (``pip install 'normscope[onnx]'``).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), normscope.nn.LayerNorm(8))
        >>> report = normscope.export_onnx(model, torch.randn(2, 8), "model.onnx")
        >>> report.norm_nodes, report.ok
        ({'LayerNormalization': 1}, True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    kwargs = _without_cache(model, kwargs)
    path = _check_path(path)
    opset = _check_opset(opset)
    if not isinstance(verify, bool):
        raise TypeError(f"Expected verify to be a bool, but got {type(verify).__name__}")
    _require_onnx()

    layers = [layer for layer in find_norm_layers(model) if layer.kind in ("layer_norm", "rms_norm")]

    cached_file = None
    if cache_dir is not None:
        cache = Path(os.fspath(cache_dir)).expanduser()
        cached_file = cache / f"{_cache_key(model, args, kwargs, opset)}.onnx"
    cached = cached_file is not None and cached_file.is_file()
    with _ExportFile(path) as work:  # written and checked in a temporary file, published at the end
        report = _export_and_check(model, args, kwargs, work.file, opset, verify, cached_file, cached, layers)
        work.publish()
    return dataclasses.replace(report, path=path)


def run_counting_norms(model: torch.nn.Module, args: tuple, kwargs: dict, layers) -> Tuple[Any, int]:
    """``(model(*args, **kwargs), expected)``: the norm operators an export should hold, one per LayerNorm /
    RMSNorm layer, or per call where a layer is called several times in this forward (a shared layer; a norm
    inside a recurrent cell, once per time step). A layer whose module is not called still counts once (its
    parameters may be used by a functional op)."""
    calls = [0] * len(layers)

    def counter(i):
        return lambda *_: calls.__setitem__(i, calls[i] + 1)

    handles = [layer.module.register_forward_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, sum(max(1, n) for n in calls)


def _without_cache(model: torch.nn.Module, kwargs: dict) -> dict:
    """``use_cache=False`` for a model whose ``forward`` takes ``use_cache`` when the caller did not set it: a Hugging
    Face decoder or encoder-decoder otherwise returns its key/value cache object (T5, Whisper return one even with
    ``config.use_cache=False``), which the exporter cannot flatten; the exported graph is the no-cache forward."""
    import inspect

    if "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    return {**kwargs, "use_cache": False} if "use_cache" in params else kwargs


def _export_and_check(model, args, kwargs, path, opset, verify, cached_file, cached, layers) -> ExportReport:
    import onnx

    warnings: List[str] = []
    with _eval_mode(model), torch.no_grad():
        if cached:
            shutil.copyfile(cached_file, path)
            os.utime(cached_file)  # least recently used goes first
        else:
            ep = torch.export.export(model, args, kwargs)
            ep = ep.run_decompositions(onnx_decompositions())
            with _quiet_loggers(["onnxscript", "torch.onnx", "onnx_ir"]):
                program = torch.onnx.export(ep, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                            verbose=False, optimize=True)
            program.save(path)
            if cached_file is not None:
                _cache_store(path, cached_file)
        out, expected = run_counting_norms(model, args, kwargs, layers)
        reference = _flat_tensors(out) if verify else []

    proto = onnx.load(path, load_external_data=False)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if written != opset:
        warnings.append(f"asked for opset {opset}, but the exporter wrote opset {written}")
    norm_nodes = count_norm_nodes(proto)
    found = sum(norm_nodes.values())
    if found != expected:
        warnings.append(
            f"expected {expected} norm operator(s) (one per LayerNorm / RMSNorm layer, or per call), but the graph has "
            f"{found}: {norm_nodes or '{}'}"
        )
    ok = found == expected

    max_abs = max_rel = None
    if verify:
        max_abs, max_rel, within, note = _verify(path, args, kwargs, reference)
        if note:
            warnings.append(note)
        ok = ok and within
    return ExportReport(path=path, opset=int(written), exporter="dynamo", norm_nodes=norm_nodes,
                        expected_norms=expected, max_abs_diff=max_abs, max_rel_diff=max_rel, ok=ok,
                        warnings=tuple(warnings), cached=cached)


#: How many exported graphs an export cache directory keeps.
EXPORT_CACHE_ENTRIES = 4


def _cache_key(model: torch.nn.Module, args: tuple, kwargs: dict, opset: int) -> str:
    import hashlib
    import inspect
    from importlib import metadata

    import normscope

    h = hashlib.blake2b(digest_size=20)

    def add(*parts) -> None:
        for part in parts:
            h.update(part if isinstance(part, bytes) else str(part).encode())
            h.update(b"\0")

    add("normscope-onnx-cache/1", normscope.__version__, torch.__version__, opset)
    for dist in ("onnx", "onnxscript"):
        try:
            add(dist, metadata.version(dist))
        except metadata.PackageNotFoundError:
            add(dist, "none")
    add(Path(__file__).read_bytes())  # the decompositions and export settings
    classes = {}
    for m in model.modules():
        cls = type(m)
        classes.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    for name in sorted(classes):
        try:
            source = inspect.getsource(classes[name])
        except (OSError, TypeError):
            source = ""
        add(name, source)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        add(name, t.dtype, tuple(t.shape), t.device.type)
        data = t.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        h.update(data.numpy().tobytes() if data.numel() else b"")
    for t in _flat_tensors((args, kwargs)):
        add("input", t.dtype, tuple(t.shape))
    return h.hexdigest()


class _ExportFile:
    """The temporary file an export is written to and checked in, then published at ``path`` with
    :mod:`normscope._paths` (renamed over a regular file or a symbolic link's target, streamed to a FIFO,
    a device or ``-``); removed with its directory on failure or Ctrl-C."""

    def __init__(self, path: str):
        import tempfile

        from normscope._paths import resolve_output, work_dir

        self.path = path
        target = resolve_output(path)
        self.dir = tempfile.mkdtemp(prefix=".normscope-export-", dir=work_dir(path))
        name = os.path.basename(target.real) if target.kind == "file" else "model.onnx"
        self.file = os.path.join(self.dir, name)

    def __enter__(self) -> "_ExportFile":
        return self

    def publish(self) -> None:
        from normscope._paths import move_output, work_dir

        extra = [n for n in os.listdir(self.dir) if n != os.path.basename(self.file)]
        directory = work_dir(self.path)
        if extra and directory is not None:  # external data files (models over 2 GB) go next to the graph
            for n in extra:
                os.replace(os.path.join(self.dir, n), os.path.join(directory, n))
        move_output(self.file, self.path)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _cache_store(path: str, cached_file: Path) -> None:
    """Copy an exported file into the cache (atomically) and drop the least recently used entries."""
    from normscope._paths import copy_output

    try:
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        copy_output(path, cached_file)
        entries = sorted(cached_file.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[EXPORT_CACHE_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written costs time, never correctness


def compare_outputs(outputs: Sequence[Any], reference: List[Tensor], engine: str):
    """Compare an exported model's outputs (arrays, in order) with PyTorch's, output by output.

    Integer outputs must be equal; floating outputs must have NaN and +-Inf in the same places and a max abs
    difference within ``_TOLERANCES`` of the reference's dtype (atol + rtol * max |reference|), computed in
    float64. Returns ``(max_abs, max_rel, within, problems)``; ``problems`` name each output that fails, with
    ``engine`` ("ONNX", "TFLite") in the shape message.
    """
    import numpy as np

    max_abs, max_rel, within, bad = 0.0, 0.0, True, []
    for i, (got, ref) in enumerate(zip(outputs, reference)):
        r = ref.detach().cpu()
        g = torch.from_numpy(np.asarray(got))
        if g.shape != r.shape:
            within = False
            bad.append(f"output {i} has shape {list(g.shape)} in {engine} but {list(r.shape)} in PyTorch")
            continue
        if not r.dtype.is_floating_point:
            if not torch.equal(g.to(r.dtype), r):
                within = False
                bad.append(f"output {i} ({r.dtype}) differs")
            continue
        if r.numel() == 0:
            continue
        r, g = r.double(), g.double()
        finite = torch.isfinite(r)
        inf = torch.isinf(r)
        if not (bool((torch.isfinite(g) == finite).all()) and bool((torch.isnan(g) == torch.isnan(r)).all())
                and bool((g[inf] == r[inf]).all())):
            within = False
            bad.append(f"output {i} has non-finite values in other places than PyTorch's")
        diff = (g - r).abs()[finite]
        if diff.numel() == 0:
            continue
        a = float(diff.max())
        scale = float(r[finite].abs().max())
        rel = a / scale if scale > 0 else (0.0 if a == 0 else math.inf)
        atol, rtol = _TOLERANCES.get(ref.dtype, _TOLERANCES[torch.float32])
        if not a <= atol + rtol * scale:
            within = False
            bad.append(f"output {i} ({ref.dtype}): max abs diff {a:.3g} > {atol:g} + {rtol:g} * {scale:.3g}")
        max_abs, max_rel = max(max_abs, a), max(max_rel, rel)
    return max_abs, max_rel, within, bad


def _verify(path: str, args: tuple, kwargs: dict, reference: List[Tensor]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. bfloat16 graphs: ORT's CPU provider lacks most bfloat16 kernels
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, None, False, f"cannot verify: onnxruntime (CPUExecutionProvider) cannot load the model: {msg}"
    inputs = _flat_tensors((args, kwargs))
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        return None, None, False, (
            f"cannot verify: the ONNX graph has {len(names)} input(s) but example_inputs hold {len(inputs)} tensor(s)"
        )
    outputs = session.run(None, {n: _to_numpy(t) for n, t in zip(names, inputs)})
    return verdict(outputs, reference, "ONNX", "onnxruntime")


def verdict(outputs: Sequence[Any], reference: List[Tensor], engine: str, runtime: str):
    """``(max_abs, max_rel, within, note)`` of an exported model's outputs against PyTorch's: a note that the
    output counts differ (nothing compared), else :func:`compare_outputs` with its problems joined into one note
    naming ``runtime`` ("onnxruntime", "the LiteRT interpreter")."""
    if len(outputs) != len(reference):
        return None, None, False, (
            f"cannot verify: the {engine} graph has {len(outputs)} output(s) but the model returned "
            f"{len(reference)} tensor(s)"
        )
    max_abs, max_rel, within, bad = compare_outputs(outputs, reference, engine)
    note = (f"{runtime} and PyTorch disagree: " + "; ".join(bad)) if bad else ""
    return max_abs, max_rel, within, note
