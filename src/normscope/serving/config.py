"""The normalization config of a model and its fingerprint, computed the same way at audit and at serving time.

:func:`norm_config` lists, per normalization layer, what decides the numerics of the layer: its kind, eps,
whether it has a scale (gamma) and a shift (beta), the normalized shape and the dtype of its parameters;
with example inputs also the dtype of the tensor entering the layer, the dtype its statistics are computed
in and its placement (pre-LN, post-LN, ...; :func:`normscope.analysis.analyze`). :func:`config_fingerprint`
hashes it (SHA-256 of a canonical JSON, first 16 hex digits). The audit logs both with the model version
(:func:`normscope.integrations.mlflow.log_audit`); the serving wrapper computes the fingerprint of the model
it actually loaded, exports it in ``normscope_build_info`` and sets ``normscope_config_mismatch`` when it
differs from the registered one: "dev and prod differ in eps or dtype" becomes an alert.

Pure Python and torch: nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, List, Optional

import torch

__all__ = ["CONFIG_FORMAT", "norm_config", "config_fingerprint", "fingerprint", "config_differences"]

#: Version of the layout of :func:`norm_config`'s result (part of the hash: a new layout is a new fingerprint).
CONFIG_FORMAT = 1

#: Fields every layer entry has, and the ones only computed from example inputs.
STATIC_FIELDS = ("name", "kind", "eps", "affine", "bias", "normalized_shape", "param_dtype")
INPUT_FIELDS = ("dtype", "compute_dtype", "placement")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _eps(eps: Optional[float]) -> Optional[float]:
    if eps is None:
        return None
    eps = float(eps)
    if not math.isfinite(eps):
        raise ValueError(f"Expected a finite eps, but got {eps!r}")
    return eps


def norm_config(model: torch.nn.Module, example_inputs: Any = None) -> Dict[str, Any]:
    """The normalization config of ``model``: ``{"format": 1, "with_inputs": bool, "layers": [...]}``.

    Each layer entry holds ``name``, ``kind``, ``eps``, ``affine`` (has a scale), ``bias`` (has a shift),
    ``normalized_shape`` (a list, or None for batch/group/instance norms) and ``param_dtype`` (dtype of its
    parameters, or None without any); with ``example_inputs`` also ``dtype`` (of the layer's input),
    ``compute_dtype`` and ``placement`` from :func:`normscope.analysis.analyze` (one forward pass, the model
    is left as it was).

    Args:
        model: the model, as it runs (after any dtype conversion, quantization or folding).
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments; None:
            the static fields only.

    A model without normalization layers has an empty ``layers`` list.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    from normscope.discovery import find_norm_layers

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    layers = find_norm_layers(model)
    entries: List[Dict[str, Any]] = []
    for layer in layers:
        m = layer.module
        params = [p for p in m.parameters(recurse=False)]
        bias = getattr(m, "bias", None)
        entries.append({
            "name": layer.name,
            "kind": layer.kind,
            "eps": _eps(layer.eps),
            "affine": bool(layer.affine),
            "bias": isinstance(bias, torch.Tensor) and bias.numel() > 0,
            "normalized_shape": None if layer.normalized_shape is None else [int(s) for s in layer.normalized_shape],
            "param_dtype": _dtype_name(params[0].dtype) if params else None,
        })
    if example_inputs is not None:
        from normscope.analysis import analyze

        report = {lr.name: lr for lr in analyze(model, example_inputs).layers}
        for e in entries:
            lr = report.get(e["name"])
            e["dtype"] = None if lr is None else lr.dtype
            e["compute_dtype"] = None if lr is None else lr.compute_dtype
            e["placement"] = "unused" if lr is None else lr.placement
    return {"format": CONFIG_FORMAT, "with_inputs": example_inputs is not None, "layers": entries}


def _check_config(config: Any) -> Dict[str, Any]:
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise TypeError(f"Expected a normalization config (a dict from norm_config, with a 'layers' list), but "
                        f"got {type(config).__name__}")
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"Expected a normalization config of format {CONFIG_FORMAT}, but got format "
                         f"{config.get('format')!r}")
    return config


def config_fingerprint(config: Dict[str, Any]) -> str:
    """The fingerprint of a :func:`norm_config` result: the first 16 hex digits of the SHA-256 of its canonical
    JSON (sorted keys, no spaces, floats as Python's ``repr``), so equal configs have equal fingerprints on
    every machine and any change of a layer's kind, eps, affine parameters, shape or dtypes changes it."""
    config = _check_config(config)
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(model: torch.nn.Module, example_inputs: Any = None) -> str:
    """``config_fingerprint(norm_config(model, example_inputs))``."""
    return config_fingerprint(norm_config(model, example_inputs))


def config_differences(expected: Dict[str, Any], actual: Dict[str, Any], *, limit: int = 10) -> List[str]:
    """What differs between two :func:`norm_config` results, as short sentences (at most ``limit``, then a count).

    Example: ``["encoder.layer.0.ln: eps 1e-05 != 1e-06", "layer final_ln missing"]``. Empty when equal.
    """
    expected, actual = _check_config(expected), _check_config(actual)
    out: List[str] = []
    if bool(expected.get("with_inputs")) != bool(actual.get("with_inputs")):
        out.append(f"with_inputs {expected.get('with_inputs')} != {actual.get('with_inputs')}")
    exp = {e.get("name"): e for e in expected["layers"]}
    act = {e.get("name"): e for e in actual["layers"]}
    for name in exp:
        if name not in act:
            out.append(f"layer {name!r} missing")
            continue
        for key in sorted(set(exp[name]) | set(act[name])):
            a, b = exp[name].get(key), act[name].get(key)
            if a != b:
                out.append(f"{name or '<model>'}: {key} {a!r} != {b!r}")
    out += [f"layer {name!r} added" for name in act if name not in exp]
    if [e.get("name") for e in expected["layers"]] != [e.get("name") for e in actual["layers"]] and not out:
        out.append("layer order differs")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out
