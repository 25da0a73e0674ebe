"""Which modules of a model are normalization layers, and what they compute.

One discovery serves :func:`normscope.convert`, and later the monitor and the analysis. Modules
are found by type (torch's LayerNorm / RMSNorm, normscope's modules) and by duck typing: a
Hugging Face RMSNorm-style module (a 1-D ``weight`` plus ``variance_epsilon`` or ``eps``, e.g.
``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``) is accepted only after a numerical probe shows
that it computes ``rms_norm(x) * weight`` or, Gemma-style, ``rms_norm(x) * (1 + weight)``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from normscope.ops.reference import rms_norm_ref

__all__ = ["RMSStyle", "probe_rms_style", "rms_style_candidate"]

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
def probe_rms_style(module: torch.nn.Module) -> Tuple[Optional[RMSStyle], str]:
    """Run ``module`` on a small probe and decide whether it is RMSNorm, plain or Gemma-style.

    Returns ``(style, "")`` on success, ``(None, reason)`` when the module is not RMSNorm-style.
    """
    cand = rms_style_candidate(module)
    if cand is None:
        return None, "not an RMSNorm-style module (needs a 1-D weight and variance_epsilon/eps)"
    weight, eps = cand
    if weight.device.type == "meta":
        return None, "parameters are on the meta device; cannot probe what the module computes"
    n = weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    # A non-zero mean tells RMSNorm (no centering) from LayerNorm.
    probe = (torch.randn(4, n, generator=gen) * 2.0 + 0.5).to(weight.device, weight.dtype)
    try:
        out = module(probe)
    except Exception as e:  # a module that cannot run on a plain (4, N) input is not ours to swap
        return None, f"probe forward failed: {type(e).__name__}: {e}"
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None, "probe output is not a tensor of the input's shape"
    out = out.double()
    rtol = _PROBE_RTOL.get(weight.dtype, 1e-4)
    errors = {}
    for offset in (0.0, 1.0):
        ref = rms_norm_ref(probe.double(), n, weight.double() + offset, eps)
        errors[offset] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    offset = min(errors, key=errors.get)
    if errors[offset] > rtol:
        return None, (
            f"outputs do not match RMSNorm (relative error {errors[offset]:.2e} > {rtol:.0e})"
        )
    return RMSStyle(eps=eps, weight_offset=offset), ""
