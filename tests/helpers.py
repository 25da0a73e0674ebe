"""Shared test helpers: the tolerance table and the table of ops under test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import normscope
from normscope.ops import reference as R

# One tolerance table per dtype (atol, rtol) for outputs and input gradients, comparing a backend
# against the reference computed from the same inputs. Both accumulate in float32, so they differ
# by summation order in float32 and, after rounding, by at most about one unit in the last place.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype: torch.dtype, rows: int = 1):
    """(atol, rtol) for ``dtype``; reductions over ``rows`` (weight grads) scale with sqrt(rows)."""
    atol, rtol = TOLERANCES[dtype]
    scale = math.sqrt(max(rows, 1))
    return atol * scale, rtol * scale


def assert_close(actual, expected, dtype=None, rows=1, msg=""):
    atol, rtol = tol(dtype or expected.dtype, rows)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


@dataclass(frozen=True)
class Op:
    """An op under test: how to call normscope's version and the reference on the same arguments."""

    name: str
    kind: str  # "plain", "add" or "masked"
    has_bias: bool
    fn: Callable
    ref: Callable


OPS = [
    Op("layer_norm", "plain", True,
       lambda x, aux, ns, w, b, eps: normscope.layer_norm(x, ns, w, b, eps),
       lambda x, aux, ns, w, b, eps: R.layer_norm_ref(x, ns, w, b, eps)),
    Op("rms_norm", "plain", False,
       lambda x, aux, ns, w, b, eps: normscope.rms_norm(x, ns, w, eps),
       lambda x, aux, ns, w, b, eps: R.rms_norm_ref(x, ns, w, eps)),
    Op("add_layer_norm", "add", True,
       lambda x, aux, ns, w, b, eps: normscope.add_layer_norm(x, aux, ns, w, b, eps),
       lambda x, aux, ns, w, b, eps: R.add_layer_norm_ref(x, aux, ns, w, b, eps)),
    Op("add_rms_norm", "add", False,
       lambda x, aux, ns, w, b, eps: normscope.add_rms_norm(x, aux, ns, w, eps),
       lambda x, aux, ns, w, b, eps: R.add_rms_norm_ref(x, aux, ns, w, eps)),
    Op("masked_layer_norm", "masked", True,
       lambda x, aux, ns, w, b, eps: normscope.masked_layer_norm(x, aux, ns, w, b, eps),
       lambda x, aux, ns, w, b, eps: R.masked_layer_norm_ref(x, aux, ns, w, b, eps)),
    Op("masked_rms_norm", "masked", False,
       lambda x, aux, ns, w, b, eps: normscope.masked_rms_norm(x, aux, ns, w, eps),
       lambda x, aux, ns, w, b, eps: R.masked_rms_norm_ref(x, aux, ns, w, eps)),
]
OPS_BY_NAME = {op.name: op for op in OPS}


def make_aux(op: Op, x: torch.Tensor, ns_len: int, gen: torch.Generator, residual_dtype=None):
    """The residual (add ops) or mask (masked ops) for ``x``; None for plain ops.

    Masks are shaped like padding masks: one flag per position of the first normalized dim,
    broadcast over the remaining normalized dims, with one fully padded sample when possible.
    """
    if op.kind == "add":
        return torch.randn(x.shape, generator=gen).to(residual_dtype or x.dtype)
    if op.kind == "masked":
        lead = x.dim() - ns_len
        shape = list(x.shape[: lead + 1]) + [1] * (ns_len - 1)
        mask = torch.rand(shape, generator=gen) > 0.3
        if x.shape[0] > 1 and lead > 0:
            mask[0] = False  # a sample with no valid element
        return mask
    return None


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)
