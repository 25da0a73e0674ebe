"""Invariance checks for a test suite: batch and padding invariance, determinism, eps/dtype safety.

Each check is a plain function to call from a ``pytest`` test. It returns a small result (the measured
differences) when the property holds and raises ``AssertionError`` with a precise message (which output,
sample and position, the greatest absolute and relative differences, the tolerance, and what the failure
usually means) when it does not. Bad arguments raise ``TypeError`` / ``ValueError`` instead, so that an
``AssertionError`` always means "the property does not hold".

Models run under ``torch.no_grad()`` in eval mode (every module's training flag is restored afterwards),
with the input tensors moved to the device of the model's first parameter. See ``docs/checks.md``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "assert_batch_invariant",
    "assert_padding_invariant",
    "assert_deterministic",
    "assert_eps_safe",
    "eps_safety",
    "CheckResult",
    "EpsLayer",
    "EpsCheckResult",
    "TOLERANCES",
]

#: Default ``(atol, rtol)`` per output dtype for the batch and padding checks. An element passes when
#: ``|actual - expected| <= atol + rtol * |expected|``. Batched and single-sample runs may take different
#: kernel paths (matmul blocking, reduction order), so 16-bit outputs get a few units in the last place.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}

_REDUCED = (torch.float16, torch.bfloat16)

_BATCH_HINT = (
    "A per-sample model gives each sample the same output alone as in a batch. A difference usually means that "
    "something mixes samples: a BatchNorm that normalizes with batch statistics (train mode, "
    "track_running_stats=False, or F.batch_norm(..., training=True)), a normalization whose reduced dims include "
    "the batch axis (e.g. over x.transpose(0, 1) or x.shape[0:]), or attention / pooling across the batch.")
_PADDING_HINT = (
    "Outputs at real (mask=1) positions should not move when padding is appended. A difference usually means that "
    "padded positions leak into the statistics: a normalization over (time, channels) without the mask (e.g. "
    "F.layer_norm(x, x.shape[1:]); use normscope.masked_layer_norm), mean / max pooling or attention that ignores "
    "the mask, or positions that depend on the padded length.")
_DETERMINISM_HINT = (
    "Repeated runs in eval mode should give identical outputs. A difference usually means randomness that survives "
    "eval(): dropout called as F.dropout(x, training=True), noise from torch.randn / torch.rand in forward, or "
    "nondeterministic kernels (atomics in scatter / index_add / some GPU backward kernels; see "
    "torch.use_deterministic_algorithms).")


@dataclass(frozen=True)
class CheckResult:
    """What a passing check measured.

    Attributes:
        check: ``"batch_invariant"``, ``"padding_invariant"`` or ``"deterministic"``.
        max_abs_diff: greatest ``|actual - expected|`` over every compared element.
        max_rel_diff: greatest ``|actual - expected| / |expected|`` (``inf`` where expected is 0 and they differ).
        outputs: the compared outputs, as paths (``"output"``, ``"output['last_hidden_state']"``, ``"output[0]"``).
        tolerances: ``{output path: (atol, rtol)}`` that each output was held to.
        compared: number of compared elements.
    """

    check: str
    max_abs_diff: float
    max_rel_diff: float
    outputs: Tuple[str, ...]
    tolerances: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    compared: int = 0


@dataclass(frozen=True)
class EpsLayer:
    """One normalization layer as :func:`assert_eps_safe` judged it.

    Attributes:
        name: qualified module name.
        kind: ``layer_norm``, ``rms_norm``, ... (as :func:`normscope.discovery.find_norm_layers` says).
        eps: the layer's eps (``None`` for ``torch.nn.RMSNorm(eps=None)``).
        effective_eps: the eps the layer adds for inputs of the checked dtype.
        compute_dtype: the dtype the layer computes its statistics in for inputs of the checked dtype
            (``float32`` for 16-bit inputs to fused kernels).
        problem: why the layer fails the check (``""`` if it passes).
        note: a warning that does not fail the check (``""`` if none), e.g. an eps that is subnormal.
    """

    name: str
    kind: str
    eps: Optional[float]
    effective_eps: float
    compute_dtype: torch.dtype
    problem: str = ""
    note: str = ""


@dataclass(frozen=True)
class EpsCheckResult:
    """What a passing :func:`assert_eps_safe` found: the checked dtype and one :class:`EpsLayer` per norm."""

    dtype: torch.dtype
    layers: Tuple[EpsLayer, ...]

    @property
    def notes(self) -> List[str]:
        """The warnings that did not fail the check, as ``"name: note"``."""
        return [f"{layer.name or '<model>'}: {layer.note}" for layer in self.layers if layer.note]


# ----------------------------------------------------------------------------------------------------------------
# structures of inputs and outputs

def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, (torch.Tensor, tuple, list, collections.abc.Mapping)):
        raise TypeError("Expected inputs to be a Tensor (one positional argument), a tuple of positional arguments or "
                        f"a dict of keyword arguments, but got {type(inputs).__name__}")
    if isinstance(inputs, collections.abc.Mapping) and not all(isinstance(k, str) for k in inputs):
        raise TypeError("Expected inputs, when a dict, to have str keys (keyword arguments), but got keys "
                        f"{[type(k).__name__ for k in inputs]}")
    if not any(True for _ in _leaves(inputs, "inputs")):
        raise ValueError(f"Expected inputs to contain at least one Tensor, but got {_describe(inputs)}")


def _check_output_fn(output_fn: Any) -> None:
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"Expected output_fn to be callable or None, but got {type(output_fn).__name__}")


def _check_tol(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"Expected {name} to be a finite number >= 0 or None, but got {value!r}")


def _sub(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _leaves(obj: Any, path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in nested tuples / lists / mappings (ModelOutput is a mapping)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, collections.abc.Mapping):
        for k, v in obj.items():
            yield from _leaves(v, _sub(path, k))
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")


def _map(fn: Callable[[str, torch.Tensor, Optional[str]], Any], obj: Any, path: str, key: Optional[str] = None) -> Any:
    """Rebuild nested tuples / lists / mappings (as new containers) with ``fn(path, tensor, dict key)`` at tensors."""
    if isinstance(obj, torch.Tensor):
        return fn(path, obj, key)
    if isinstance(obj, collections.abc.Mapping):
        return {k: _map(fn, v, _sub(path, k), k) for k, v in obj.items()}
    if isinstance(obj, tuple):
        items = [_map(fn, v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map(fn, v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor of shape {list(obj.shape)} and dtype {obj.dtype}"
    if isinstance(obj, collections.abc.Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__ + "(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__


def _device(model: torch.nn.Module) -> Optional[torch.device]:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to_device(inputs: Any, device: Optional[torch.device]) -> Any:
    return _map(lambda _p, t, _k: t if device is None else t.to(device), inputs, "inputs")


@contextlib.contextmanager
def _eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _call(model: torch.nn.Module, inputs: Any, extra: Optional[Dict[str, Any]] = None, what: str = "") -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)``, plus keyword arguments ``extra``."""
    extra = extra or {}
    try:
        if isinstance(inputs, torch.Tensor):
            return model(inputs, **extra)
        if isinstance(inputs, collections.abc.Mapping):
            return model(**{**inputs, **extra})
        return model(*inputs, **extra)
    except Exception as e:  # an AssertionError must only mean that the checked property does not hold
        raise ValueError(f"Expected model to run on the inputs{what}, but it raised {type(e).__name__}: {e}") from e


def _outputs(output: Any, output_fn: Optional[Callable[[Any], torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
    """The floating-point tensors of ``output`` (or the tensor ``output_fn(output)``), with their paths."""
    if output_fn is not None:
        try:
            t = output_fn(output)
        except Exception as e:
            raise ValueError(f"Expected output_fn to accept the model output, but it raised {type(e).__name__}: "
                             f"{e}") from e
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected output_fn to return a Tensor, but got {type(t).__name__}")
        return [("output_fn(output)", t)] if t.is_floating_point() else []
    return [(p, t) for p, t in _leaves(output, "output") if t.is_floating_point()]


def _tolerance(dtype: torch.dtype, atol: Optional[float], rtol: Optional[float]) -> Tuple[float, float]:
    default_atol, default_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return (default_atol if atol is None else float(atol)), (default_rtol if rtol is None else float(rtol))


# ----------------------------------------------------------------------------------------------------------------
# comparison

@dataclass
class _Diff:
    max_abs: float
    max_rel: float
    bad: torch.Tensor  # bool, shape of the compared tensors
    excess: torch.Tensor  # how far each element is beyond its tolerance (float64)
    compared: int


def _diff(expected: torch.Tensor, actual: torch.Tensor, atol: float, rtol: float,
          where: Optional[torch.Tensor] = None) -> _Diff:
    """Elementwise comparison in float64: an element passes when ``|a - e| <= atol + rtol * |e|``, or both are NaN,
    or both are the same infinity."""
    e = expected.detach().to(torch.float64)
    a = actual.detach().to(e.device, torch.float64)
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(e), (a - e).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)  # NaN against a number, inf - inf
    tol = atol + rtol * e.abs()
    bad = (diff > tol) | (~same & ~(e.isfinite() & a.isfinite()))
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / e.abs())
    if where is not None:
        where = where.to(e.device).expand_as(e)
        bad = bad & where
        diff = torch.where(where, diff, torch.zeros_like(diff))
        rel = torch.where(where, rel, torch.zeros_like(rel))
        compared = int(where.sum())
    else:
        compared = e.numel()
    excess = torch.where(bad, torch.where(tol.isfinite(), diff - tol, diff), torch.full_like(diff, -math.inf))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    return _Diff(max_abs, max_rel, bad, excess, compared)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _index(flat: int, shape: torch.Size) -> Tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def _worst(d: _Diff) -> Tuple[int, ...]:
    return _index(int(d.excess.reshape(-1).argmax()), d.bad.shape)


def _first(d: _Diff) -> Tuple[int, ...]:
    return _index(int(d.bad.reshape(-1).nonzero()[0, 0]), d.bad.shape)


def _mismatch_lines(d: _Diff, atol: float, rtol: float) -> List[str]:
    n_bad = int(d.bad.sum())
    pct = 100.0 * n_bad / max(d.compared, 1)
    return [f"Mismatched elements: {n_bad} / {d.compared} ({pct:.1f}%) beyond |actual - expected| <= "
            f"atol + rtol * |expected| with atol={atol:g}, rtol={rtol:g}.",
            f"Greatest absolute difference: {_fmt(d.max_abs)}; greatest relative difference: {_fmt(d.max_rel)}."]


# ----------------------------------------------------------------------------------------------------------------
# batch invariance

def _batch_size(inputs: Any) -> int:
    for path, t in _leaves(inputs, "inputs"):
        if t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError("Expected at least one input tensor with a batch dim (dim 0), but got "
                     f"{_describe(inputs)}")


def assert_batch_invariant(
    model: torch.nn.Module,
    inputs: Any,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
) -> CheckResult:
    r"""Assert that each sample's output is the same when the sample runs alone as when it runs in the batch.

    The batch size ``B`` is dim 0 of the first tensor in ``inputs`` (in argument order); every input tensor whose
    dim 0 is ``B`` is split into samples ``t[i:i+1]``, anything else is passed as is. Every floating-point output
    tensor whose dim 0 is ``B`` (in a tensor, tuple, dict, Hugging Face ``ModelOutput`` or sentence-transformers
    feature dict) is compared, sample by sample, with the sample's output alone: an element passes when
    ``|alone - batched| <= atol + rtol * |batched|``. This fails for BatchNorm that normalizes with batch
    statistics and for a normalization over the batch axis.

    Args:
        model: the model; it runs under ``torch.no_grad()`` in eval mode (training flags are restored).
        inputs: a Tensor (``model(x)``), a tuple of positional arguments (``model(*inputs)``; a module that
            takes one dict positionally, such as ``SentenceTransformer``, gets ``(features,)``) or a dict of
            keyword arguments (``model(**inputs)``), with at least 2 samples.
        atol, rtol: tolerances; ``None`` takes the output dtype's default from :data:`TOLERANCES` (float32:
            ``atol=1e-5, rtol=1e-4``; float16: ``1e-3, 1e-2``; bfloat16: ``1e-2, 5e-2``).
        output_fn: optional ``output_fn(output) -> Tensor`` selecting what to compare (its dim 0 must be ``B``).

    Returns:
        A :class:`CheckResult` with the greatest differences measured.

    Raises:
        AssertionError: a sample's output differs; the message names the output, the sample, the position and
            both values.
        TypeError, ValueError: bad arguments, or the model raised.

    Example::

        >>> model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        >>> normscope.checks.assert_batch_invariant(model, torch.randn(4, 5, 16)).max_abs_diff < 1e-5
        True
    """
    _check_model(model)
    _check_inputs(inputs)
    _check_output_fn(output_fn)
    _check_tol("atol", atol)
    _check_tol("rtol", rtol)
    inputs = _to_device(inputs, _device(model))
    b = _batch_size(inputs)
    if b < 2:
        raise ValueError(f"Expected inputs with a batch of at least 2 samples (dim 0), but got batch size {b}")

    def sample(i: int) -> Any:
        return _map(lambda _p, t, _k: t[i:i + 1] if t.dim() >= 1 and t.shape[0] == b else t, inputs, "inputs")

    with _eval_no_grad(model):
        batched = _outputs(_call(model, _map(lambda _p, t, _k: t, inputs, "inputs"), what=" (the whole batch)"),
                           output_fn)
        batched = [(p, t) for p, t in batched if t.dim() >= 1 and t.shape[0] == b]
        if not batched:
            raise ValueError(f"Expected the model output to contain a floating-point tensor with the batch size {b} "
                             "at dim 0, but got none; pass output_fn to select the output to compare")
        alone: List[Dict[str, torch.Tensor]] = []
        for i in range(b):
            outs = dict(_outputs(_call(model, sample(i), what=f" (sample {i} alone)"), output_fn))
            alone.append(outs)

    max_abs = max_rel = 0.0
    compared = 0
    tolerances = {}
    for path, t in batched:
        for i in range(b):
            a = alone[i].get(path)
            if a is None or tuple(a.shape) != (1,) + tuple(t.shape[1:]):
                got = "no such output" if a is None else f"shape {list(a.shape)}"
                raise AssertionError(
                    f"Batch invariance does not hold: sample {i} alone gives {path} of {got}, but in the batch its "
                    f"slice has shape {[1] + list(t.shape[1:])}. {_BATCH_HINT}")
        stacked = torch.cat([alone[i][path].to(t.device) for i in range(b)])
        tol_a, tol_r = _tolerance(t.dtype, atol, rtol)
        tolerances[path] = (tol_a, tol_r)
        d = _diff(t, stacked, tol_a, tol_r)
        if bool(d.bad.any()):
            idx = _worst(d)
            samples = sorted({int(i) for i in d.bad.reshape(b, -1).any(1).nonzero()[:, 0]})
            pos = idx[1:]
            raise AssertionError("\n".join([
                f"Batch invariance does not hold: sample {idx[0]} of {b} gives a different {path} alone than in "
                f"the batch.",
                f"Worst element: {path}[{', '.join(map(str, idx))}] (sample {idx[0]}, position "
                f"{pos if len(pos) != 1 else pos[0]}) is {_fmt(float(t[idx]))} in the batch but "
                f"{_fmt(float(stacked[idx]))} alone.",
                *_mismatch_lines(d, tol_a, tol_r),
                f"Samples that differ: {samples}.",
                _BATCH_HINT]))
        max_abs, max_rel = max(max_abs, d.max_abs), max(max_rel, d.max_rel)
        compared += d.compared
    return CheckResult("batch_invariant", max_abs, max_rel, tuple(p for p, _ in batched), tolerances, compared)


# ----------------------------------------------------------------------------------------------------------------
# padding invariance

def assert_padding_invariant(
    model: torch.nn.Module,
    inputs: Any,
    attention_mask: torch.Tensor,
    *,
    pad_to: Optional[int] = None,
    pad_value: Any = 0,
    mask_arg: Optional[str] = "attention_mask",
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
) -> CheckResult:
    r"""Assert that outputs at real (mask != 0) positions do not move when padding is appended to the sequence.

    ``attention_mask`` has shape ``(B, T)`` (trailing dims of size 1 allowed, e.g. ``(B, T, 1)``); nonzero marks
    a real position. The model runs twice: on ``inputs``, and on ``inputs`` padded to length ``pad_to`` along the
    sequence dim (dim 1): every input tensor of shape ``(B, T, ...)`` is padded with ``pad_value``, and the mask
    with zeros. Outputs of shape ``(B, T, ...)`` (``(B, pad_to, ...)`` when padded) are compared at the real
    positions; other floating-point outputs (pooled embeddings, logits per sample) must have the same shape in
    both runs and are compared whole. An element passes when ``|padded - unpadded| <= atol + rtol * |unpadded|``.
    This fails for a normalization over ``(time, channels)`` that ignores the mask (``F.layer_norm(x,
    x.shape[1:])``) and for pooling that ignores it.

    How the mask reaches the model: wherever ``inputs`` already carry it (the ``attention_mask`` tensor itself
    at any position, or a dict entry named ``mask_arg``: HF-style ``{"input_ids": ..., "attention_mask": ...}``,
    or a sentence-transformers feature dict passed as ``(features,)``) it is replaced by the padded mask;
    otherwise it is passed as the keyword argument ``mask_arg`` (``model(x, attention_mask=mask)``), or not at
    all when ``mask_arg`` is None.

    Args:
        model: the model; it runs under ``torch.no_grad()`` in eval mode (training flags are restored).
        inputs: as in :func:`assert_batch_invariant`.
        attention_mask: ``(B, T)`` mask of the given inputs (bool, integer or floating; may already contain
            padding).
        pad_to: padded length, greater than ``T``; default ``max(2 * T, T + 8)``.
        pad_value: fill value for the padded positions of input tensors other than the mask (e.g. the pad
            token id).
        mask_arg: the keyword / dict key under which the model takes the mask (see above).
        atol, rtol: tolerances; ``None`` takes the output dtype's default from :data:`TOLERANCES`.
        output_fn: optional ``output_fn(output) -> Tensor`` selecting what to compare.

    Returns:
        A :class:`CheckResult` with the greatest differences measured.

    Raises:
        AssertionError: an output at a real position moved; the message names the output, sample and position.
        TypeError, ValueError: bad arguments (e.g. a mask whose shape does not match the inputs), or the model
            raised.

    Example::

        >>> features = {"input_ids": ids, "attention_mask": mask}          # HF-style keyword arguments
        >>> normscope.checks.assert_padding_invariant(bert, features, features["attention_mask"])
    """
    _check_model(model)
    _check_inputs(inputs)
    _check_output_fn(output_fn)
    _check_tol("atol", atol)
    _check_tol("rtol", rtol)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"Expected attention_mask to be a Tensor, but got {type(attention_mask).__name__}")
    if attention_mask.dim() < 2 or any(s != 1 for s in attention_mask.shape[2:]) or attention_mask.shape[1] < 1:
        raise ValueError("Expected attention_mask of shape (B, T) (trailing dims of size 1 allowed), but got shape "
                         f"{list(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise TypeError(f"Expected attention_mask to be bool, integer or floating, but got {attention_mask.dtype}")
    if mask_arg is not None and not isinstance(mask_arg, str):
        raise TypeError(f"Expected mask_arg to be a str or None, but got {type(mask_arg).__name__}")
    b, t_len = int(attention_mask.shape[0]), int(attention_mask.shape[1])
    if pad_to is None:
        pad_to = max(2 * t_len, t_len + 8)
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to <= t_len:
        raise ValueError(f"Expected pad_to to be an int greater than the sequence length {t_len}, but got {pad_to!r}")

    device = _device(model)
    mask_id = id(attention_mask)
    mask = attention_mask if device is None else attention_mask.to(device)
    real = (mask != 0).reshape(b, t_len)
    carried = []
    padded_shapes = []

    def is_mask(t: torch.Tensor, key: Optional[str]) -> bool:
        return id(t) == mask_id or (mask_arg is not None and key == mask_arg)

    def prepare(path: str, t: torch.Tensor, key: Optional[str]) -> torch.Tensor:
        if is_mask(t, key):
            if tuple(t.shape) != tuple(attention_mask.shape) or not torch.equal(t.to(mask.device, mask.dtype), mask):
                raise ValueError(f"Expected {path} to equal attention_mask (shape {list(attention_mask.shape)}), "
                                 f"but got a different tensor of shape {list(t.shape)}")
            carried.append(path)
            return mask
        t = t if device is None else t.to(device)
        if t.dim() >= 2 and t.shape[0] == b and t.shape[1] == t_len:
            padded_shapes.append(path)
        return t

    inputs = _map(prepare, inputs, "inputs")
    if not padded_shapes:
        raise ValueError(f"Expected at least one input tensor of shape (B, T, ...) = ({b}, {t_len}, ...) besides the "
                         f"mask to pad, but got {_describe(inputs)}")

    def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
        shape = list(t.shape)
        shape[1] = pad_to - t_len
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)

    padded_mask = pad(mask, 0)

    def pad_leaf(path: str, t: torch.Tensor, key: Optional[str]) -> torch.Tensor:
        if t is mask:
            return padded_mask
        if path in padded_shapes:
            return pad(t, pad_value)
        return t

    padded_inputs = _map(pad_leaf, inputs, "inputs")
    extra = extra_padded = None
    if not carried and mask_arg is not None:
        extra, extra_padded = {mask_arg: mask}, {mask_arg: padded_mask}

    with _eval_no_grad(model):
        ref = _outputs(_call(model, inputs, extra, what=" (unpadded)"), output_fn)
        new = dict(_outputs(_call(model, padded_inputs, extra_padded, what=f" (padded to length {pad_to})"),
                            output_fn))
    if not ref:
        raise ValueError("Expected the model output to contain a floating-point tensor, but got none; pass output_fn "
                         "to select the output to compare")

    max_abs = max_rel = 0.0
    compared = 0
    tolerances = {}
    for path, r in ref:
        p = new.get(path)
        if p is None:
            raise AssertionError(f"Padding invariance does not hold: the padded run has no {path}. {_PADDING_HINT}")
        seq = r.dim() >= 2 and tuple(r.shape[:2]) == (b, t_len)
        if seq and tuple(p.shape) == (b, pad_to) + tuple(r.shape[2:]):
            p = p[:, :t_len]
            where = real.reshape((b, t_len) + (1,) * (r.dim() - 2))
        elif p.shape == r.shape:
            where = None
        else:
            raise AssertionError(
                f"Padding invariance does not hold: {path} has shape {list(r.shape)} unpadded but {list(p.shape)} "
                f"padded to length {pad_to}, which is neither the same shape nor the same with dim 1 = {pad_to}. "
                f"{_PADDING_HINT}")
        tol_a, tol_r = _tolerance(r.dtype, atol, rtol)
        tolerances[path] = (tol_a, tol_r)
        d = _diff(r, p, tol_a, tol_r, where)
        if bool(d.bad.any()):
            idx = _worst(d)
            per_sample = r.dim() >= 1 and r.shape[0] == b
            if where is not None:
                at = f" (sample {idx[0]}, position {idx[1]})"
            else:
                at = f" (sample {idx[0]})" if per_sample else ""
            lines = [
                f"Padding invariance does not hold: {path} moves at real positions when the sequence is padded from "
                f"length {t_len} to {pad_to}.",
                f"Worst element: {path}[{', '.join(map(str, idx))}]{at} is {_fmt(float(r[idx]))} unpadded but "
                f"{_fmt(float(p[idx]))} padded.",
                *_mismatch_lines(d, tol_a, tol_r)]
            if per_sample:
                samples = sorted({int(i) for i in d.bad.reshape(b, -1).any(1).nonzero()[:, 0]})
                lines.append(f"Samples that differ: {samples}.")
            lines.append(_PADDING_HINT)
            raise AssertionError("\n".join(lines))
        max_abs, max_rel = max(max_abs, d.max_abs), max(max_rel, d.max_rel)
        compared += d.compared
    return CheckResult("padding_invariant", max_abs, max_rel, tuple(p for p, _ in ref), tolerances, compared)


# ----------------------------------------------------------------------------------------------------------------
# determinism

def assert_deterministic(
    model: torch.nn.Module,
    inputs: Any,
    *,
    runs: int = 3,
    atol: float = 0.0,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
) -> CheckResult:
    r"""Assert that ``runs`` repeated forward passes give equal outputs (bitwise with the default ``atol=0``).

    Every floating-point output tensor of runs 2..``runs`` is compared with run 1; NaN equals NaN at the same
    position. An element passes when ``|run_k - run_1| <= atol``. The failure message names the first differing
    element (in row-major order) of the first output that differs.

    Args:
        model: the model; it runs under ``torch.no_grad()`` in eval mode (training flags are restored).
        inputs: as in :func:`assert_batch_invariant` (any batch size).
        runs: number of forward passes, at least 2.
        atol: allowed absolute difference (0: bitwise equal).
        output_fn: optional ``output_fn(output) -> Tensor`` selecting what to compare.

    Returns:
        A :class:`CheckResult` with the greatest differences measured.

    Raises:
        AssertionError: two runs differ.
        TypeError, ValueError: bad arguments, or the model raised.

    Example::

        >>> normscope.checks.assert_deterministic(torch.nn.LayerNorm(8), torch.randn(2, 8)).max_abs_diff
        0.0
    """
    _check_model(model)
    _check_inputs(inputs)
    _check_output_fn(output_fn)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ValueError(f"Expected runs to be an int >= 2, but got {runs!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0 or math.isinf(atol):
        raise ValueError(f"Expected atol to be a finite number >= 0, but got {atol!r}")
    inputs = _to_device(inputs, _device(model))
    results = []
    with _eval_no_grad(model):
        for k in range(runs):
            results.append(_outputs(_call(model, _map(lambda _p, t, _k: t, inputs, "inputs"), what=f" (run {k + 1})"),
                                    output_fn))
    if not results[0]:
        raise ValueError("Expected the model output to contain a floating-point tensor, but got none; pass output_fn "
                         "to select the output to compare")
    max_abs = max_rel = 0.0
    compared = 0
    first = dict(results[0])
    for k in range(1, runs):
        other = dict(results[k])
        for path, r in results[0]:
            o = other.get(path)
            if o is None or o.shape != r.shape:
                got = "no such output" if o is None else f"shape {list(o.shape)}"
                raise AssertionError(f"Determinism does not hold: run {k + 1} gives {path} of {got}, run 1 of shape "
                                     f"{list(r.shape)}. {_DETERMINISM_HINT}")
            d = _diff(r, o, float(atol), 0.0)
            if bool(d.bad.any()):
                idx = _first(d)
                raise AssertionError("\n".join([
                    f"Determinism does not hold: run {k + 1} of {runs} differs from run 1 in {path}.",
                    f"First differing element: {path}[{', '.join(map(str, idx))}] is {_fmt(float(r[idx]))} in run 1 "
                    f"but {_fmt(float(o[idx]))} in run {k + 1}.",
                    *_mismatch_lines(d, float(atol), 0.0),
                    _DETERMINISM_HINT]))
            max_abs, max_rel = max(max_abs, d.max_abs), max(max_rel, d.max_rel)
            compared += d.compared
    tolerances = {p: (float(atol), 0.0) for p in first}
    return CheckResult("deterministic", max_abs, max_rel, tuple(first), tolerances, compared)


# ----------------------------------------------------------------------------------------------------------------
# eps / dtype safety

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _probe_compute_dtype(layer, dtype: torch.dtype) -> Tuple[torch.dtype, str]:
    """The dtype a duck-typed (Hugging Face-style) norm computes its statistics in for ``dtype`` inputs.

    Runs the module once on a small probe under the analysis tracer; if it cannot run, assumes ``dtype``.
    """
    from normscope.analysis.placement import _compute_dtype
    from normscope.analysis.tracer import trace

    module = layer.module
    weight = getattr(module, "weight", None)
    n = layer.normalized_shape[-1] if layer.normalized_shape else None
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or not n:
        return dtype, "could not be run to see its compute dtype (assumed " + _dtype_name(dtype) + ")"
    probe = torch.randn(2, n, generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        graph, _ = trace(module, (probe,), {}, {module: layer.name})
    except Exception as e:  # a module that cannot run alone: judge it by the dtype it is given
        return dtype, f"could not be run on a {_dtype_name(dtype)} probe ({type(e).__name__}: {e}); assumed it " \
                      f"computes in {_dtype_name(dtype)}"
    finally:
        for m, training in modes:
            m.training = training
    calls = next(iter(graph.norm_calls.values()), [])  # the traced module is the root: its calls are under ""
    if not calls:
        return dtype, ""
    compute = _compute_dtype(layer, calls[0])
    return (compute if compute is not None and compute.is_floating_point else dtype), ""


def assert_eps_safe(model: torch.nn.Module, dtype: torch.dtype) -> EpsCheckResult:
    r"""Assert that every normalization layer's eps survives in ``dtype``, the dtype the model runs in.

    The layers are those :func:`normscope.discovery.find_norm_layers` finds. The eps a layer adds is its ``eps``,
    or, for ``torch.nn.RMSNorm(eps=None)``, the epsilon torch adds (float32's for 16-bit inputs; always safe).
    A layer **fails** when:

    - its eps is 0, negative or not finite: a zero-variance row (a constant or all-zero vector, a padded
      position) divides by ``sqrt(0)`` and gives inf / NaN in any dtype;
    - its eps rounds to 0 in ``dtype`` (float16: eps below about 3e-8, half the smallest subnormal 6e-8; e.g.
      BERT's 1e-12). When the layer computes its statistics in ``dtype`` (a Hugging Face-style module without a
      float32 upcast) that is a division by zero in PyTorch. torch's and normscope's fused kernels compute
      statistics in float32 for 16-bit inputs, where the eps survives, but the same layer computed in ``dtype``
      anywhere else (an ONNX graph converted to float16, a float16 runtime, a decomposed or hand-written norm)
      loses it, so the layer fails too and the message says which case it is.

    Not failures, reported in :attr:`EpsLayer.note`: an eps that is subnormal in the compute dtype (float16: below
    6.1e-5, e.g. 1e-5 or 1e-6: representable to within a few percent, but flushed to 0 where denormals are
    flushed). An eps that vanishes next to a typical variance (``1 + eps == 1`` in float16 for eps below 4.9e-4)
    is not a failure: eps only has to matter when the variance is near 0, and there it does.

    Duck-typed (Hugging Face-style) modules are run once on a small ``(2, N)`` probe in ``dtype`` to see the dtype
    of their statistics ops (``LlamaRMSNorm`` upcasts to float32, a module computing ``x.pow(2).mean()`` in float16
    does not), with the logic of :func:`normscope.analysis.analyze`.

    Args:
        model: the model (its parameters' dtype does not matter; ``dtype`` is that of the activations).
        dtype: the floating-point dtype the model runs in, e.g. ``torch.float16``.

    Returns:
        An :class:`EpsCheckResult` listing every layer with its effective eps, compute dtype and notes.

    Raises:
        AssertionError: some layer fails; the message names every offending layer with its eps and the dtype.
        TypeError: ``model`` is not a module or ``dtype`` not a floating-point dtype.

    Example::

        >>> normscope.checks.assert_eps_safe(torch.nn.LayerNorm(8, eps=1e-12), torch.float16)
        Traceback (most recent call last):
        AssertionError: eps/dtype safety does not hold for 1 of 1 normalization layers in float16: ...
    """
    _check_model(model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"Expected dtype to be a floating-point torch.dtype, but got {dtype!r}")
    name = _dtype_name(dtype)
    checked = eps_safety(model, dtype)
    bad = [layer for layer in checked if layer.problem]
    if bad:
        info = torch.finfo(dtype)
        lines = [f"eps/dtype safety does not hold for {len(bad)} of {len(checked)} normalization layers in {name}:"]
        lines += [f"  {layer.name or '<model>'} ({layer.kind}, eps={layer.effective_eps:g}): {layer.problem}"
                  for layer in bad]
        lines.append(f"An eps of 0 lets a zero-variance row (a constant or all-zero vector, a padded position) divide "
                     f"by sqrt(0) and give inf/NaN. The smallest {name} value is {info.smallest_normal * info.eps:g}.")
        if any("survives" in layer.problem for layer in bad):
            lines.append(f"A layer that PyTorch computes in float32 runs fine in PyTorch, but loses its eps wherever "
                         f"it is computed in {name}: an ONNX graph converted to {name}, a {name} runtime, a decomposed "
                         "or hand-written norm.")
        lines.append(f"Use an eps that {name} represents (e.g. 1e-5), or keep these layers in float32.")
        raise AssertionError("\n".join(lines))
    return EpsCheckResult(dtype, tuple(checked))


def eps_safety(model: torch.nn.Module, dtype: torch.dtype) -> List[EpsLayer]:
    """The verdict of :func:`assert_eps_safe` on every normalization layer, without raising.

    The one eps/dtype rule of normscope: :func:`assert_eps_safe` raises when a layer has a ``problem``, and
    ``normscope audit`` reports the same layers (``eps_underflow`` errors for problems, warnings for notes).

    Returns:
        One :class:`EpsLayer` per layer (``problem`` empty when it passes).
    """
    from normscope.analysis.placement import _eps_risks
    from normscope.discovery import effective_eps, find_norm_layers

    name = _dtype_name(dtype)
    checked = []
    for layer in find_norm_layers(model):
        eps = effective_eps(layer, dtype)
        note = ""
        if layer.eps is None:
            added = "float32" if torch.finfo(dtype).bits < 32 else name
            note = f"eps=None: adds torch.finfo({added}).eps = {eps:g}"
        if layer.duck_typed:
            compute, note = _probe_compute_dtype(layer, dtype)
        else:
            compute = torch.float32 if dtype in _REDUCED else dtype
        problem = ""
        if not math.isfinite(eps) or eps <= 0:
            problem = f"eps={eps:g} is not a positive number"
        elif float(torch.tensor(eps, dtype=dtype)) == 0.0:
            if torch.finfo(compute).bits <= torch.finfo(dtype).bits:
                problem = f"eps={eps:g} underflows to 0 in {name}, the dtype this layer computes its statistics in"
            else:
                problem = (f"eps={eps:g} underflows to 0 in {name} (PyTorch's fused kernel computes this layer in "
                           f"{_dtype_name(compute)}, where it survives)")
        else:
            risks = _eps_risks(eps, compute)
            if risks:
                note = "; ".join(filter(None, [note, *risks]))
        checked.append(EpsLayer(layer.name, layer.kind, layer.eps, eps, compute, problem, note))
    return checked
