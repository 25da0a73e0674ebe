"""Drop-in normalization modules and :func:`convert`.

:class:`LayerNorm` and :class:`RMSNorm` subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` with
the same constructor signature, parameters and state-dict keys; only ``forward`` changes, to call
normscope's ops. :func:`convert` swaps them into an existing model in place.

Both modules work with ``torch.jit.script``: the scripted ``forward`` calls the custom op
``torch.ops.normscope.norm_fwd`` (with autograd) directly, which TorchScript supports; the Python
``forward`` runs in eager mode and under ``torch.jit.trace``. A saved TorchScript module needs
``import normscope`` in the loading process, which registers the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

from normscope import functional as F
from normscope.discovery import probe_norm_dims, probe_rms_style
from normscope.errors import ShapeError

__all__ = ["LayerNorm", "LayerNorm2d", "RMSNorm", "convert", "ConvertResult", "Replacement", "Skipped",
           "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]


# ---------------------------------------------------------------------------------------------
# The TorchScript forward (compiled by torch.jit.script only; eager mode runs normscope.functional)
# ---------------------------------------------------------------------------------------------


def _script_rms_eps(dtype: torch.dtype) -> float:
    # torch.finfo(acc_dtype(dtype)).eps (torch's default eps), which TorchScript cannot call
    if dtype == torch.float64:
        return 2.220446049250313e-16
    return 1.1920928955078125e-07


def _script_param_ok(p: Optional[Tensor], shape: List[int], x: Tensor) -> bool:
    return p is None or (p.shape == shape and p.device == x.device and p.is_floating_point())


def _script_norm(
    x: Tensor,
    shape: List[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: Optional[float],
    rms: bool,
    offset: float,
) -> Tensor:
    """The scripted modules' forward: ``normscope::norm_fwd`` on the 2-D view of ``x``.

    Arguments that :mod:`normscope.functional` would reject go to torch's own op instead, which
    raises torch's exception (a ``RuntimeError`` or ``NotImplementedError`` with torch's message:
    an error raised in TorchScript code itself would reach Python as ``torch.jit.Error``) or, where
    torch accepts them, computes what torch computes; empty rows go there too.
    """
    k = len(shape)
    e = _script_rms_eps(x.dtype) if eps is None else eps
    if e < 0.0 or e != e or e == float("inf"):
        raise ValueError("Expected eps to be a finite number >= 0, but got " + str(e))
    if torch.ops.normscope.transforms_active(x):
        # forward-mode AD or a torch.func transform: torch's differentiable ops, statistics in float32 at
        # least (the custom op has no forward-AD rule and would give a zero tangent under torch.func.jvp)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        wa = None if weight is None else weight.to(acc) + offset
        ba = None if bias is None else bias.to(acc)
        if rms:
            r = torch.nn.functional.rms_norm(xa, shape, wa, e)
            r = r if ba is None else r + ba
        else:
            r = torch.nn.functional.layer_norm(xa, shape, wa, ba, e)
        return r.to(x.dtype)
    n = 1
    for s in shape:
        n *= s
    ok = (
        k > 0 and n > 0 and x.dim() >= k and x.shape[x.dim() - k:] == shape and x.is_floating_point()
        and _script_param_ok(weight, shape, x) and _script_param_ok(bias, shape, x)
    )
    if weight is None:
        offset = 0.0
    if not ok:
        if rms:
            w = weight if weight is None or offset == 0.0 else weight + offset
            r = torch.nn.functional.rms_norm(x, shape, w, e)
            return r if bias is None else r + bias
        return torch.nn.functional.layer_norm(x, shape, weight, bias, e)
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    y = torch.ops.normscope.norm_fwd(x.reshape(-1, n), None, None, w, b, e, rms, None, offset)[0]
    y = y.view(x.shape)
    if rms and not x.is_contiguous():
        # as normscope.rms_norm: a channels-last input gives a channels-last output
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            y = y.contiguous(memory_format=torch.channels_last_3d)
    return y


class LayerNorm(torch.nn.LayerNorm):
    r"""Drop-in :class:`torch.nn.LayerNorm` running :func:`normscope.layer_norm`.

    Same arguments (``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
    dtype=None``), parameters and state-dict keys; ``bias=False`` makes no bias.

    Example::

        >>> ln = normscope.nn.LayerNorm(64)
        >>> y = ln(torch.randn(2, 10, 64))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return _script_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, False, 0.0)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _channels_first_kernel(x: Tensor) -> bool:
    """Whether :class:`LayerNorm2d` normalizes ``x`` in place of a permute copy (normscope.ops.channels_first)."""
    if not x.is_contiguous() or x.device.type not in ("cpu", "cuda"):
        return False
    from normscope.ops import channels_first, core

    return not core.use_composite() and channels_first.supports(x)


class LayerNorm2d(torch.nn.LayerNorm):
    r"""Channels-first LayerNorm: normalizes over dim 1 (the channels) of an ``(N, C, *spatial)`` input at each
    position, as timm's ``LayerNorm2d`` and ConvNeXt's ``LayerNorm(data_format="channels_first")``.

    Same arguments as :class:`torch.nn.LayerNorm` with ``normalized_shape = C`` (``num_channels, eps=1e-6,
    elementwise_affine=True, bias=True, device=None, dtype=None``; timm's default eps); parameters ``weight`` /
    ``bias`` of shape ``(C,)``, the state-dict keys of timm's module. Runs :func:`normscope.layer_norm` on the
    channels-last view: a channels-last input (``torch.channels_last`` / ``channels_last_3d``) is normalized
    without a copy and the output is channels-last too. A contiguous ``NCHW`` input is normalized over dim 1
    directly by the channels-first kernels (C++ on the CPU, Triton on CUDA; no permute copy; the output is
    contiguous ``NCHW``); otherwise (a non-contiguous input, DTensors, forward-mode AD and ``torch.func``
    transforms) it is permuted and copied once, as timm's module does.
    """

    _normscope_channels_first = True

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: normscope's op on the NHWC view
            y = _script_norm(input.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps, False,
                             0.0)
            return y.movedim(-1, 1)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise ShapeError(f"Expected input of shape (N, C, ...) with C = {self.normalized_shape[0]}, but got "
                             f"{input.dim()}-D tensor of size {list(input.shape)}")
        if input.shape[1] != self.normalized_shape[0]:
            raise ShapeError(f"Expected input with {self.normalized_shape[0]} channels in dim 1, but got input of "
                             f"size {list(input.shape)}")
        if _channels_first_kernel(input):
            from normscope.ops.channels_first import layer_norm_cf

            return layer_norm_cf(input, self.weight, self.bias, self.eps)
        y = F.layer_norm(input.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class RMSNorm(torch.nn.RMSNorm):
    r"""Drop-in :class:`torch.nn.RMSNorm` running :func:`normscope.rms_norm`.

    Same arguments as torch's (``normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None``) plus keyword-only ``weight_offset`` (default 0): the scale applied is
    ``weight_offset + weight``, formed in float32 (as Gemma's ``1.0 + weight.float()``), so
    Gemma-style modules that store ``weight`` around 0 and multiply by ``1 + weight`` convert with
    their checkpoints unchanged; and ``bias`` (default False): a learnable shift of shape
    ``normalized_shape`` added after the scale (``y = x * rstd * weight + bias``; with
    ``elementwise_affine=True`` only). A channels-last input gives a channels-last output, as in torch.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None, *, weight_offset: float = 0.0, bias: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.weight_offset = float(weight_offset)
        if bias and elementwise_affine:
            self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return _script_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, True,
                                self.weight_offset)
        # the offset is added in float32 inside the kernels (Gemma's ``weight.float() + 1``), not
        # in the weight's dtype, where bfloat16 would round it
        offset = getattr(self, "weight_offset", 0.0)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, bias=getattr(self, "bias", None),
                          offset=offset)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        offset = getattr(self, "weight_offset", 0.0)
        s += f", weight_offset={offset}" if offset != 0.0 else ""
        return s + (", bias=True" if getattr(self, "bias", None) is not None else "")


@dataclass(frozen=True)
class Replacement:
    """One module that :func:`convert` replaced: its qualified name, old and new class names."""

    name: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Skipped:
    """A normalization-like module that :func:`convert` (or :func:`normscope.fold_norms_`) left alone, and why:
    its qualified ``name``, its class name ``module`` and the ``reason``."""

    name: str
    module: str
    reason: str

    @property
    def norm(self) -> str:
        """The qualified name (``name``), as :class:`normscope.analysis.FoldResult` items used to call it."""
        return self.name


@dataclass
class ConvertResult:
    """What :func:`convert` did. Iterating or ``len()`` goes over the replacements."""

    replaced: List[Replacement] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    def __iter__(self):
        return iter(self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)


_SWAP = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}
# norms of other kinds (they have a weight and an eps, but nothing to swap in): skipped with that reason
_NOT_CONVERTED = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                  torch.nn.modules.instancenorm._InstanceNorm)


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def convert(
    model: torch.nn.Module,
    *,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> ConvertResult:
    """Replace normalization modules of ``model`` by normscope modules, in place.

    Replaced: ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` (exactly those classes; the object is
    kept and its class switched, so parameters, hooks and references stay valid) and Hugging Face
    RMSNorm-style modules (``LlamaRMSNorm``, ``T5LayerNorm``, Gemma's ``1 + weight`` form, ...),
    which are replaced by a :class:`RMSNorm` that shares the original ``weight`` Parameter after a
    numerical probe confirms what the module computes. Weights, dtype, device, state-dict keys and
    outputs (within the dtype's tolerance) are kept.

    Args:
        model: the model to convert in place.
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool``; modules for which it
            returns False are left alone.

    Returns:
        A :class:`ConvertResult` listing each replacement and each skipped candidate with its reason.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> [r.name for r in normscope.convert(model)]
        ['1']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    result = ConvertResult()
    for name, module in list(model.named_modules()):
        cls = type(module)
        if isinstance(module, (LayerNorm, LayerNorm2d, RMSNorm)) or getattr(cls, "_normscope_recurrent_norm", False):
            continue  # normscope's own (the norms inside LayerNormLSTM / LayerNormGRU run normscope's op already)
        target = _SWAP.get(cls)
        is_subclass = target is None and isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
        if target is None and not is_subclass:
            if not hasattr(module, "weight") or next(module.children(), None) is not None:
                continue
            if not (hasattr(module, "variance_epsilon") or hasattr(module, "eps")):
                continue
        if filter_fn is not None and not filter_fn(module, name):
            result.skipped.append(Skipped(name, cls.__name__, "filter_fn returned False"))
            continue
        probe_cf = (is_subclass or target is None) and not isinstance(module, _NOT_CONVERTED)
        probed = _probed_layer_norm(module) if probe_cf else None
        if probed is not None:
            weight, bias, eps, dims = probed
            target_cls = LayerNorm2d if dims == (1,) else LayerNorm
            if not name:
                raise ValueError(f"Expected a model containing normalization layers, but got a bare {cls.__name__}; "
                                 f"wrap it in a container or use normscope.nn.{target_cls.__name__} directly")
            new = target_cls(weight.shape[0], eps=eps, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            new.weight = weight
            if bias is not None:
                new.bias = bias
            new.train(module.training)
            _set_submodule(model, name, new)
            result.replaced.append(Replacement(name, cls.__name__, target_cls.__name__))
            continue
        if is_subclass:
            result.skipped.append(
                Skipped(name, cls.__name__, "subclass of a torch norm with its own forward that the probes did not "
                                            "confirm as a LayerNorm over the channels or the last axis")
            )
            continue
        if target is not None:
            module.__class__ = target
            if target is RMSNorm:
                module.weight_offset = 0.0
                if "bias" not in module._parameters:
                    module.register_parameter("bias", None)
            result.replaced.append(Replacement(name, cls.__name__, target.__name__))
            continue
        if isinstance(module, _NOT_CONVERTED):
            result.skipped.append(Skipped(name, cls.__name__, (
                f"a {cls.__name__} normalizes over the batch, groups or instances, not each vector's features; "
                "convert replaces only LayerNorm / RMSNorm-style layers")))
            continue
        style, reason = probe_rms_style(module)
        if style is None:
            result.skipped.append(Skipped(name, cls.__name__, reason))
            continue
        if not name:
            raise ValueError(
                f"Expected a model containing normalization layers, but got a bare {cls.__name__}; "
                "wrap it in a container or use normscope.nn.RMSNorm directly"
            )
        weight = module.weight
        new = RMSNorm(weight.shape[0], eps=style.eps, device=weight.device, dtype=weight.dtype,
                      weight_offset=style.weight_offset)
        new.weight = weight
        new.train(module.training)
        _set_submodule(model, name, new)
        result.replaced.append(Replacement(name, cls.__name__, RMSNorm.__name__))
    return result


def _probed_layer_norm(module: torch.nn.Module):
    """``(weight, bias or None, eps, norm_dims)`` of a module with its own ``forward`` that the probes confirm as a
    LayerNorm with scale ``weight`` over the channels (``norm_dims == (1,)``: timm's ``LayerNorm2d``, ConvNeXt's
    ``LayerNorm(data_format="channels_first")``) or over the last axis (``(-1,)``: a ``LayerNorm`` subclass that
    permutes nothing, Hugging Face's ``ConvNextLayerNorm(data_format="channels_last")``), else None."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or next(module.children(), None) is not None:
        return None
    if bias is not None and (not isinstance(bias, torch.nn.Parameter) or bias.shape != weight.shape):
        return None
    eps = None
    for attr in ("eps", "variance_epsilon"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            eps = float(v)
            break
    if eps is None:
        return None
    kind, offset, dims, _ = probe_norm_dims(module, int(weight.shape[0]), eps, kinds=("layer_norm",))
    if kind != "layer_norm" or dims not in ((1,), (-1,)) or offset:
        return None
    return weight, bias, eps, dims


# Layer-normalized recurrent layers (normscope.recurrent), public here with the other modules.
from normscope.recurrent import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell  # noqa: E402
