"""Findings: typed records of what the monitor noticed, and the thresholds that decide them."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

__all__ = ["Finding", "Thresholds", "FINDING_KINDS", "SEVERITIES"]

SEVERITIES = ("info", "warning", "error")

# Deprecated Thresholds fields, and what replaces them.
_DEPRECATED = {"grad_history_windows": "grad_history_steps", "grad_history_min_windows": "grad_history_min_steps"}

#: Every ``Finding.kind``, with what it means.
FINDING_KINDS: Dict[str, str] = {
    "nonfinite_input": "the first NaN/Inf, in execution order, entered this layer (it arose upstream)",
    "nonfinite_output": "the first NaN/Inf appeared in this layer's output while its input was finite",
    "nonfinite_grad": "the first NaN/Inf gradient, in backward order, w.r.t. this layer's input",
    "eps_dominated": "rows whose variance is below eps_factor * eps: eps, not the data, sets their scale",
    "weight_drift": "gamma moved further than Thresholds.drift (RMS) from its reference",
    "bias_drift": "beta moved further than Thresholds.drift (RMS) from its reference",
    "grad_exploding": "a sampled step's gradient norm far above the layer's own per-step history",
    "grad_vanishing": "a sampled step's gradient norm far below the layer's own per-step history",
    "grad_outlier": "a gradient norm far from the median over the other layers",
    "variance_shift": "input variance moved away from a baseline snapshot (Monitor.compare)",
}


@dataclass(frozen=True)
class Finding:
    """One thing the monitor noticed.

    Attributes:
        layer: qualified name of the layer concerned.
        step: the step at which it was seen (see docs/monitor.md for each kind).
        kind: one of :data:`FINDING_KINDS`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        value: the number behind it (a count, a ratio or a distance; see the kind).
        message: a sentence naming the layer and step and saying what to do.
    """

    layer: str
    step: int
    kind: str
    severity: str
    value: float
    message: str

    def __post_init__(self):
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"Expected kind to be one of {sorted(FINDING_KINDS)}, but got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Expected severity to be one of {SEVERITIES}, but got {self.severity!r}")

    def to_record(self) -> dict:
        """This finding as a flat record (``type="finding"``), as written to sinks."""
        return {"type": "finding", **asdict(self)}

    @classmethod
    def from_record(cls, record: dict) -> "Finding":
        """The inverse of :meth:`to_record`."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Thresholds:
    """When statistics become findings.

    Attributes:
        eps_fraction: an ``eps_dominated`` finding is a warning when at least this fraction of the
            sampled rows is eps-dominated, else info. Default: 0.01.
        drift: ``weight_drift`` / ``bias_drift`` when the RMS distance of gamma / beta from the
            reference (``||p - p_ref|| / sqrt(numel)``) exceeds this. Default: 0.5.
        grad_history: ``grad_exploding`` / ``grad_vanishing`` when a sampled step's gradient norm
            (input, or parameters) is more than this factor above / below the median of the layer's
            previous sampled steps (and more than ``grad_history_mad`` robust standard deviations away,
            on a log scale). Default: 10.
        grad_history_steps: how many previous sampled steps that median covers (at most). Default: 100.
        grad_history_min_steps: no history finding before the layer's history holds this many sampled
            steps (whatever ``flush_every`` is). Default: 10.
        grad_history_mad: the deviation of the log-norm from the median must also exceed this many
            robust standard deviations (1.4826 times the median absolute deviation of the history's
            log-norms), so that a noisy layer is judged against its own spread. Default: 6.
        grad_history_windows, grad_history_min_windows: deprecated (the history is per sampled step,
            independent of the windows): setting one warns and has no effect; use
            ``grad_history_steps`` / ``grad_history_min_steps``. Default: None.
        grad_layers: ``grad_outlier`` when a layer's gradient norm is more than this factor away from
            the median over the layers in the same window (needs at least 3 layers). Default: 100.
        variance_shift: :meth:`Monitor.compare` flags a layer whose mean input variance changed by more
            than this factor (either way) from the baseline. Default: 1.5.
    """

    eps_fraction: float = 0.01
    drift: float = 0.5
    grad_history: float = 10.0
    grad_history_steps: int = 100
    grad_history_min_steps: int = 10
    grad_history_mad: float = 6.0
    grad_layers: float = 100.0
    variance_shift: float = 1.5
    grad_history_windows: Optional[int] = None
    grad_history_min_windows: Optional[int] = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _DEPRECATED:
                if v is not None:
                    warnings.warn(f"Thresholds.{f.name} is deprecated and has no effect: the gradient history is "
                                  f"per sampled step; use Thresholds.{_DEPRECATED[f.name]}", DeprecationWarning,
                                  stacklevel=3)
                continue
            if f.type == "int" or isinstance(f.default, int):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"Expected Thresholds.{f.name} to be a positive int, but got {v!r}")
            elif not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"Expected Thresholds.{f.name} to be a positive finite number, but got {v!r}")
        for name in ("grad_history", "grad_layers", "variance_shift"):
            if getattr(self, name) <= 1:
                raise ValueError(f"Expected Thresholds.{name} to be a factor > 1, but got {getattr(self, name)!r}")
