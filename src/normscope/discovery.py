"""Which modules of a model are normalization layers, and what they compute.

One discovery serves :func:`normscope.convert`, :class:`normscope.Monitor` and the analysis. Modules
are found by type (torch's LayerNorm / RMSNorm / GroupNorm / BatchNorm / InstanceNorm, normscope's
modules) and by duck typing: a Hugging Face RMSNorm-style module (a 1-D ``weight`` plus
``variance_epsilon`` or ``eps``, e.g. ``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``).
:func:`convert` swaps such a module only after a numerical probe shows that it computes
``rms_norm(x) * weight`` or, Gemma-style, ``rms_norm(x) * (1 + weight)``;
:func:`find_norm_layers` accepts it from its attributes alone unless asked to probe. Which axes a
LayerNorm / RMSNorm-style layer normalizes (the trailing ones, or the channels of a channels-first
``(N, C, ...)`` input) is found from what it computes (:func:`probe_norm_dims`), never from its class.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from normscope.ops.reference import layer_norm_ref, rms_norm_ref

__all__ = ["NormLayer", "NORM_KINDS", "find_norm_layers", "effective_eps", "RMSStyle", "probe_norm", "probe_norm_dims",
           "probe_rms_style", "rms_style_candidate"]

#: The kinds of normalization :func:`find_norm_layers` reports, by what the layer normalizes over.
NORM_KINDS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")

# Relative L2 error under which a probed module counts as computing RMSNorm, per weight dtype.
_PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class RMSStyle:
    """What a probed RMSNorm-style module computes: ``rms_norm(x, eps) * (weight_offset + weight)``."""

    eps: float
    weight_offset: float


def rms_style_candidate(module: torch.nn.Module) -> Optional[Tuple[torch.nn.Parameter, float]]:
    """``(weight, eps)`` if ``module`` looks like a Hugging Face RMSNorm-style leaf module."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)):
        return None
    if next(module.children(), None) is not None:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if getattr(module, "bias", None) is not None:
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
            return weight, float(eps)
    return None


@torch.no_grad()
def probe_norm(
    module: torch.nn.Module,
    weight: torch.Tensor,
    eps: float,
    kinds: Tuple[str, ...] = ("rms_norm", "layer_norm"),
) -> Tuple[Optional[str], Optional[float], str]:
    """Run ``module`` on a fixed probe and match it to ``norm(x) * (offset + weight) [+ bias]``.

    Tries each of ``kinds`` (``"rms_norm"``, ``"layer_norm"``) with ``offset`` 0 (plain) and 1
    (Gemma-style ``1 + weight``), in that order, against the float64 reference. The probe is a
    ``(4, N)`` input with a non-zero mean, which tells RMSNorm (no centering) from LayerNorm.

    Returns:
        ``(kind, offset, "")`` for the first match, or ``(None, None, reason)``.
    """
    if weight.device.type == "meta":
        return None, None, "parameters are on the meta device; cannot probe what the module computes"
    n = weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(4, n, generator=gen) * 2.0 + 0.5).to(weight.device, weight.dtype)
    try:
        out = module(probe)
    except Exception as e:  # a module that cannot run on a plain (4, N) input is not a per-vector norm
        return None, None, f"probe forward failed: {type(e).__name__}: {e}"
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None, None, "probe output is not a tensor of the input's shape"
    out, x, w = out.double(), probe.double(), weight.double()
    bias = getattr(module, "bias", None)
    b = bias.double() if isinstance(bias, torch.Tensor) and bias.shape == weight.shape else None
    rtol = _PROBE_RTOL.get(weight.dtype, 1e-4)
    best = math.inf
    for kind in kinds:
        for offset in (0.0, 1.0):
            if kind == "rms_norm":
                ref = rms_norm_ref(x, n, w + offset, eps)
            else:
                ref = layer_norm_ref(x, n, w + offset, b, eps)
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            if err <= rtol:
                return kind, offset, ""
            best = min(best, err)
    names = " or ".join({"rms_norm": "RMSNorm", "layer_norm": "LayerNorm"}.get(k, k) for k in kinds)
    return None, None, f"outputs do not match {names} (relative error {best:.2e} > {rtol:.0e})"


def probe_rms_style(module: torch.nn.Module) -> Tuple[Optional[RMSStyle], str]:
    """Run ``module`` on a small probe and decide whether it is RMSNorm, plain or Gemma-style.

    Returns ``(style, "")`` on success, ``(None, reason)`` when the module is not RMSNorm-style.
    """
    cand = rms_style_candidate(module)
    if cand is None:
        return None, "not an RMSNorm-style module (needs a 1-D weight and variance_epsilon/eps)"
    weight, eps = cand
    kind, offset, reason = probe_norm(module, weight, eps, kinds=("rms_norm",))
    if kind is None:
        return None, reason
    return RMSStyle(eps=eps, weight_offset=offset), ""


def _probe_sizes(n: int, count: int) -> List[int]:
    """``count`` small sizes different from ``n`` and from each other (so no axis can pass for another)."""
    return [s for s in (3, 5, 7, 11, 13) if s != n][:count]


@torch.no_grad()
def probe_norm_dims(
    module: torch.nn.Module,
    size: int,
    eps: Optional[float],
    kinds: Tuple[str, ...] = ("rms_norm", "layer_norm"),
) -> Tuple[Optional[str], Optional[float], Optional[Tuple[int, ...]], str]:
    """Find which axis of its input ``module`` normalizes over, by running it on small probes.

    ``module`` is a per-vector norm with ``size`` features and (optionally) a 1-D ``weight`` / ``bias``
    of that size. Its ``forward`` (without hooks, under ``no_grad``) is run on a channels-first input
    ``(2, size, H, W)``, then ``(2, size, L)``, then on a plain ``(4, size)`` input (with ``H``, ``W``,
    ``L`` different from ``size``, so that only one axis has ``size`` entries), and each output is
    compared with the float64 reference normalized
    over that axis (axis 1 for the first two, the last axis for the third), for each of ``kinds`` and
    for a scale of ``weight`` or ``1 + weight``. The first probe that runs and matches decides.

    Returns:
        ``(kind, offset, norm_dims, "")`` with ``norm_dims`` ``(1,)`` (channels-first) or ``(-1,)``
        (trailing), or ``(None, None, None, reason)`` when no probe matches.
    """
    params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
              if isinstance(p, torch.Tensor)]
    if any(p.device.type == "meta" for p in params):
        return None, None, None, "parameters are on the meta device; cannot probe what the module computes"
    device, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)
    weight = getattr(module, "weight", None)
    w = weight.double() if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (size,) else None
    bias = getattr(module, "bias", None)
    b = bias.double() if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (size,) else None
    h, wd = _probe_sizes(size, 2)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rtol = _PROBE_RTOL.get(dtype, 1e-4)
    best, reasons = math.inf, []
    for shape, dim in (((2, size, h, wd), 1), ((2, size, h), 1), ((4, size), -1)):
        probe = (torch.randn(*shape, generator=gen) * 2.0 + 0.5).to(device, dtype)
        try:
            out = module.forward(probe)  # without the module's hooks (a Monitor's, say): nothing records the probe
        except Exception as e:  # this layout is not what the module takes: try the next
            reasons.append(f"{tuple(shape)}: {type(e).__name__}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
            reasons.append(f"{tuple(shape)}: output of another shape")
            continue
        x = probe.double().movedim(dim, -1)
        out = out.double().movedim(dim, -1)
        for kind in kinds:
            for offset in (0.0, 1.0) if w is not None else (0.0,):
                scale = None if w is None else w + offset
                if kind == "rms_norm":
                    ref = rms_norm_ref(x, size, scale, eps)
                else:
                    ref = layer_norm_ref(x, size, scale, b, 1e-5 if eps is None else eps)
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
                if err <= rtol:
                    return kind, offset, (dim,), ""
                best = min(best, err)
    names = " or ".join({"rms_norm": "RMSNorm", "layer_norm": "LayerNorm"}.get(k, k) for k in kinds)
    detail = f" (relative error {best:.2e} > {rtol:.0e})" if math.isfinite(best) else ""
    return None, None, None, (f"outputs do not match {names} over the channel or the last axis{detail}"
                              + (f"; probes that did not run: {', '.join(reasons)}" if reasons else ""))


def _torch_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs torch's or normscope's own LayerNorm / RMSNorm forward (trailing axes)."""
    from normscope import nn as nsnn

    for cls in (torch.nn.LayerNorm, torch.nn.RMSNorm, nsnn.LayerNorm, nsnn.RMSNorm):
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer of a model, as found by :func:`find_norm_layers`.

    Attributes:
        name: qualified module name (``""`` for the model itself).
        module: the module.
        kind: one of :data:`NORM_KINDS`. ``layer_norm`` and ``rms_norm`` normalize each vector over
            the axes :attr:`norm_dims` (the trailing ``normalized_shape``, or the channel axis of a
            channels-first norm); ``group_norm`` each (sample, group); ``instance_norm`` each
            (sample, channel); ``batch_norm`` each channel over the batch and spatial positions.
        eps: the epsilon added to the variance (``None`` for ``torch.nn.RMSNorm(eps=None)``, which
            uses ``torch.finfo(input.dtype).eps``).
        affine: whether the layer has a learnable scale ``weight`` (gamma).
        normalized_shape: the trailing shape normalized over, for ``layer_norm`` / ``rms_norm``;
            ``None`` for the other kinds.
        duck_typed: True when the module was recognised by its attributes (a Hugging Face-style
            module such as ``LlamaRMSNorm``) rather than by its type.
        norm_dims: for ``layer_norm`` / ``rms_norm``, the axes of the layer's input it normalizes
            over, as found from what the module computes: trailing axes as negative indices
            (``(-1,)``, or ``(-2, -1)`` for a 2-D ``normalized_shape``), or ``(1,)`` for a
            channels-first norm that normalizes the channels of an ``(N, C, ...)`` input at each
            position (timm's ``LayerNorm2d``, ConvNeXt's ``LayerNorm(data_format="channels_first")``).
            ``None`` for the other kinds, and when it could not be found (parameters on the meta
            device, or a probe that matched nothing): then the trailing ``normalized_shape`` is used.
        recurrent: True for a norm inside a recurrent cell (:class:`normscope.recurrent.RecurrentNorm` of
            ``LayerNormLSTM`` / ``LayerNormGRU``): called once per time step (the input norm once per forward),
            never folded or converted.
    """

    name: str
    module: torch.nn.Module
    kind: str
    eps: Optional[float]
    affine: bool
    normalized_shape: Optional[Tuple[int, ...]] = None
    duck_typed: bool = False
    norm_dims: Optional[Tuple[int, ...]] = None
    recurrent: bool = False


def _eps_attr(module: torch.nn.Module) -> Optional[float]:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
            return float(eps)
    return None


def _layer_norm_style_candidate(module: torch.nn.Module) -> Optional[Tuple[torch.nn.Parameter, float]]:
    """``(weight, eps)`` for a leaf module that looks like a hand-written LayerNorm with a bias.

    For example Hugging Face's ``DebertaLayerNorm``: a class whose name contains "norm", a 1-D
    ``weight`` and a ``bias`` of the same shape, and a numeric ``variance_epsilon`` or ``eps``.
    """
    if next(module.children(), None) is not None or "norm" not in type(module).__name__.lower():
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape:
        return None
    eps = _eps_attr(module)
    return None if eps is None else (weight, eps)


def find_norm_layers(
    model: torch.nn.Module,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
    *,
    probe: bool = False,
) -> List[NormLayer]:
    """Find the normalization layers of ``model``, in ``named_modules()`` order.

    Found by type: ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` (and their subclasses, which include
    :class:`normscope.nn.LayerNorm` / :class:`normscope.nn.RMSNorm`), ``torch.nn.GroupNorm``,
    ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``, lazy variants) and ``InstanceNorm1d/2d/3d``. Found
    by duck typing (leaf modules only): Hugging Face RMSNorm-style modules as recognised by
    :func:`rms_style_candidate` (``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``, ...), reported
    as ``rms_norm``, and LayerNorm-style modules with a bias whose class name contains "norm"
    (``DebertaLayerNorm``, ConvNeXt's ``LayerNorm``), reported as ``layer_norm``.

    Which axes a ``layer_norm`` / ``rms_norm`` layer normalizes (:attr:`NormLayer.norm_dims`) comes
    from what it computes: the trailing ``normalized_shape`` for torch's and normscope's own modules;
    a module that overrides ``forward`` (timm's ``LayerNorm2d``) or is duck-typed is run on small
    probes (:func:`probe_norm_dims`, a few microseconds each) to tell a channels-first norm (over
    axis 1 of an ``(N, C, ...)`` input) from a trailing one.

    Args:
        model: the model to search.
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool``; layers for which it
            returns False are left out.
        probe: if True, a duck-typed candidate is kept only when the probes confirm what it
            computes (RMSNorm or LayerNorm over the channel or the last axis, with ``weight`` or
            ``1 + weight`` as scale), and its kind is the one they found; candidates that compute
            neither are left out. Default: False: candidates are kept with the kind their attributes
            suggest, and the probes only find their axes. Modules on the meta device are never run
            (their ``norm_dims`` stays None unless known from the class).

    Returns:
        A list of :class:`NormLayer`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> [(layer.name, layer.kind) for layer in normscope.discovery.find_norm_layers(model)]
        [('1', 'layer_norm')]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"Expected filter_fn to be callable or None, but got {type(filter_fn).__name__}")
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    layers = []
    for name, module in model.named_modules():
        found = None
        if getattr(type(module), "_normscope_recurrent_norm", False):
            found = NormLayer(name, module, "layer_norm", float(module.eps), True,
                              tuple(int(d) for d in module.normalized_shape), norm_dims=(-1,), recurrent=True)
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            kind = "layer_norm" if isinstance(module, torch.nn.LayerNorm) else "rms_norm"
            shape = tuple(int(d) for d in module.normalized_shape)
            eps = None if module.eps is None else float(module.eps)
            if _torch_forward(module):
                dims: Optional[Tuple[int, ...]] = tuple(range(-len(shape), 0))
            elif getattr(type(module), "_normscope_channels_first", False):  # normscope.nn.LayerNorm2d
                dims = (1,)
            elif len(shape) == 1:  # a subclass with its own forward (timm's LayerNorm2d permutes around it)
                dims = probe_norm_dims(module, shape[0], eps, kinds=(kind,))[2]
            else:
                dims = None
            found = NormLayer(name, module, kind, eps, module.weight is not None, shape, norm_dims=dims)
        elif isinstance(module, torch.nn.GroupNorm):
            found = NormLayer(name, module, "group_norm", float(module.eps), bool(module.affine))
        elif isinstance(module, _BatchNorm):
            found = NormLayer(name, module, "batch_norm", float(module.eps), bool(module.affine))
        elif isinstance(module, _InstanceNorm):
            found = NormLayer(name, module, "instance_norm", float(module.eps), bool(module.affine))
        else:
            for kind, candidate in (("rms_norm", rms_style_candidate), ("layer_norm", _layer_norm_style_candidate)):
                cand = candidate(module)
                if cand is None:
                    continue
                weight, eps = cand
                probed, _, dims, _ = probe_norm_dims(module, int(weight.shape[0]), eps)
                if probe:
                    if probed is None:
                        break
                    kind = probed
                found = NormLayer(name, module, kind, eps, True, (int(weight.shape[0]),), duck_typed=True,
                                  norm_dims=dims)
                break
        if found is None or (filter_fn is not None and not filter_fn(module, name)):
            continue
        layers.append(found)
    return layers


def effective_eps(layer: NormLayer, dtype: torch.dtype) -> float:
    """The epsilon ``layer`` adds for inputs of ``dtype``.

    With ``eps=None`` (``torch.nn.RMSNorm``'s default) torch adds ``finfo(float32).eps`` for float16 and bfloat16
    inputs (it computes them in float32) and ``finfo(dtype).eps`` for float32 and float64 inputs.
    """
    if layer.eps is not None:
        return layer.eps
    if not dtype.is_floating_point:
        return math.nan
    compute = torch.float32 if torch.finfo(dtype).bits < 32 else dtype
    return float(torch.finfo(compute).eps)
