"""Layout of the per-layer accumulator row, and the host-side summaries built from it.

Every monitored layer owns one row of a float64 buffer per device (``(num_layers, width)``). The row
has four blocks:

* **sums**, updated with one in-place ``add_`` per call (counts are exact in float64 up to 2**53),
  except the output moments, a ``(count, mean, M2)`` triple merged per call with Chan et al.'s
  parallel formula (:func:`chan_merge`; never ``E[y^2] - E[y]^2``);
* **maxima**, updated with one ``torch.maximum`` per call; minima are stored negated, and so are
  the "first event" keys (``-(step * 2**21 + 2 * order + is_output)``), so that the smallest key wins;
* the log-spaced histogram of per-row variance (``var_bins`` bins plus underflow, overflow and a
  slot that absorbs NaN rows), filled with one ``scatter_add_``;
* the linear histogram of input values (``hist_bins`` bins plus underflow, overflow and a NaN slot).

:class:`WindowRaw` holds one flushed row on the host, merges windows (for :meth:`Monitor.snapshot`)
and derives the reported statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# --- sums -----------------------------------------------------------------------------------------
S_VALID_ROWS = 0  # sampled rows whose statistic is finite
S_ROW_MEAN = 1  # sum of per-row means (valid rows)
S_ROW_VAR = 2  # sum of per-row variances (mean squares for RMS norms) (valid rows)
S_EPS_ROWS = 3  # sampled rows with variance < eps_factor * eps
S_NAN_IN = 4  # NaN elements in the input (all rows)
S_INF_IN = 5
S_NAN_OUT = 6
S_INF_OUT = 7
S_OUT_N = 8  # finite output elements in sampled rows           } a (count, mean, M2) triple, merged with
S_OUT_MEAN = 9  # their mean                                      } chan_merge (per call, across windows,
S_OUT_M2 = 10  # their sum of squared deviations from the mean  } devices and ranks), never added
N_CALL_SUMS = 11  # the sums a forward call updates, contiguous from 0
S_GIN_SUM = 11  # sum over steps of the input-gradient norm     } folded by step(), as pairs
S_GP_SUM = 12  # sum over steps of the parameter-gradient norm  }
S_GIN_N = 13  # steps with an input gradient
S_GP_N = 14  # steps with a parameter gradient
N_SUMS = 15

# --- maxima (minima negated) ------------------------------------------------------------------------
M_ROW_MEAN_MAX = 15
M_ROW_VAR_MAX = 16
M_ROW_MEAN_NEGMIN = 17
M_ROW_VAR_NEGMIN = 18
M_NONFINITE_KEY = 19  # -(first key with a non-finite input)
M_NONFINITE_OUT_KEY = 20  # -(first key with a non-finite output)
M_EPS_KEY = 21  # -(first step with an eps-dominated row)
N_CALL_MAX = 7  # the maxima a forward call updates, contiguous from M_ROW_MEAN_MAX
M_GIN_MAX = 22
M_GP_MAX = 23
M_GIN_NEGMIN = 24
M_GP_NEGMIN = 25
M_GRAD_NONFINITE_KEY = 26  # -(first (step, backward order) with a non-finite input gradient)
HIST0 = 27

#: Keys of first events: ``step * KEY_STEP + 2 * order + is_output``.
KEY_STEP = 2**21
MAX_ORDER = KEY_STEP // 2 - 1

#: Per-row variance histogram: 8 bins per decade over [1e-12, 1e8), plus under/overflow.
VAR_LOG10_RANGE = (-12, 8)
VAR_BINS_PER_DECADE = 8
VAR_BINS = (VAR_LOG10_RANGE[1] - VAR_LOG10_RANGE[0]) * VAR_BINS_PER_DECADE


def var_edges() -> List[float]:
    lo = VAR_LOG10_RANGE[0]
    return [10.0 ** (lo + i / VAR_BINS_PER_DECADE) for i in range(VAR_BINS + 1)]


@dataclass(frozen=True)
class Layout:
    """Column offsets of one accumulator row for ``hist_bins`` input-histogram bins."""

    hist_bins: int
    hist_range: tuple

    @property
    def var_hist(self) -> int:  # offset of the variance histogram: [under, bins..., over, nan]
        return HIST0

    @property
    def in_hist(self) -> int:  # offset of the input histogram: [under, bins..., over, nan]
        return HIST0 + VAR_BINS + 3

    @property
    def width(self) -> int:
        return self.in_hist + self.hist_bins + 3

    def in_edges(self) -> List[float]:
        lo, hi = self.hist_range
        n = self.hist_bins
        return [lo + (hi - lo) * i / n for i in range(n + 1)]

    def template_list(self) -> List[float]:
        """The initial row as a Python list."""
        return [0.0] * N_SUMS + [-math.inf] * (HIST0 - N_SUMS) + [0.0] * (self.width - HIST0)

    def template(self, device) -> torch.Tensor:
        """The initial (empty-window) row: zeros, and -inf in the maxima."""
        f64 = torch.float64
        return torch.cat([torch.zeros(N_SUMS, dtype=f64, device=device),  # fills only: no host copy
                          torch.full((HIST0 - N_SUMS,), -math.inf, dtype=f64, device=device),
                          torch.zeros(self.width - HIST0, dtype=f64, device=device)])


def chan_merge(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """Two ``(count, mean, M2)`` triples (M2: the sum of squared deviations from the mean) merged into
    one, by Chan et al.'s parallel formula: exact where ``E[x^2] - E[x]^2`` cancels catastrophically."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if not n_b > 0:
        return float(n_a), float(mean_a), float(m2_a)
    if not n_a > 0:
        return float(n_b), float(mean_b), float(m2_b)
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def quantile(counts: Sequence[float], edges: Sequence[float], q: float, vmin: float, vmax: float) -> float:
    """Quantile ``q`` of a histogram ``[under, bins..., over]`` with bin ``edges``, clamped to [vmin, vmax].

    Interpolates geometrically inside a bin with positive edges, linearly otherwise; exact to within
    one bin.
    """
    total = float(sum(counts))
    if total <= 0 or not (math.isfinite(vmin) and math.isfinite(vmax)):
        return math.nan
    target = q * total
    cum = 0.0
    last = len(counts) - 1
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= target:
            lo = vmin if i == 0 else max(edges[i - 1], vmin)
            hi = vmax if i == last else min(edges[i], vmax)
            frac = min(max((target - cum) / c, 0.0), 1.0)
            if lo > 0 and hi > 0:
                value = lo * (hi / lo) ** frac
            else:
                value = lo + (hi - lo) * frac
            return min(max(value, vmin), vmax)
        cum += c
    return vmax


@dataclass
class WindowRaw:
    """One layer's accumulated row (device part and host counters) for a window, or for a run."""

    sums: List[float]
    maxima: List[float]
    var_hist: List[float]
    in_hist: List[float]
    calls: int = 0
    rows: int = 0
    rows_sampled: int = 0
    skipped_calls: int = 0
    steps: int = 0
    first_step: Optional[int] = None
    last_step: Optional[int] = None
    params: Dict[str, float] = field(default_factory=dict)
    #: One ``(step, input-gradient norm, parameter-gradient norm)`` per sampled step of the window in which
    #: gradients were seen, in step order; ``math.nan`` where one of them was not seen. Global figures under
    #: torch.distributed. Per window only: :meth:`merge` and :meth:`copy` (the run totals) leave it out.
    grad_series: List[Tuple[int, float, float]] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: Sequence[float], layout: Layout) -> "WindowRaw":
        vh, ih = layout.var_hist, layout.in_hist
        return cls(sums=list(row[:N_SUMS]), maxima=list(row[N_SUMS:HIST0]),
                   var_hist=list(row[vh:vh + VAR_BINS + 3]), in_hist=list(row[ih:ih + layout.hist_bins + 3]))

    def merge(self, other: "WindowRaw") -> None:
        """Add ``other`` (a later window, or the same window on another device) into this one."""
        out = chan_merge(self.sums[S_OUT_N:S_OUT_M2 + 1], other.sums[S_OUT_N:S_OUT_M2 + 1])
        self.sums = [a + b for a, b in zip(self.sums, other.sums)]
        self.sums[S_OUT_N:S_OUT_M2 + 1] = out
        self.maxima = [_nanmax(a, b) for a, b in zip(self.maxima, other.maxima)]
        self.var_hist = [a + b for a, b in zip(self.var_hist, other.var_hist)]
        self.in_hist = [a + b for a, b in zip(self.in_hist, other.in_hist)]
        for name in ("calls", "rows", "rows_sampled", "skipped_calls", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.first_step is not None:
            self.first_step = other.first_step if self.first_step is None else min(self.first_step, other.first_step)
        if other.last_step is not None:
            self.last_step = other.last_step if self.last_step is None else max(self.last_step, other.last_step)
        if other.params:
            self.params = dict(other.params)

    def copy(self) -> "WindowRaw":
        return WindowRaw(list(self.sums), list(self.maxima), list(self.var_hist), list(self.in_hist), self.calls,
                         self.rows, self.rows_sampled, self.skipped_calls, self.steps, self.first_step,
                         self.last_step, dict(self.params))

    def _max(self, col: int) -> float:
        return self.maxima[col - N_SUMS]

    def first_key(self, col: int) -> Optional[int]:
        """The smallest event key recorded in maximum column ``col``, or None."""
        v = self._max(col)
        return int(-v) if math.isfinite(v) else None

    def stats(self, eps: float, eps_factor: float) -> Dict[str, object]:
        """The reported statistics, as a flat dict (see docs/monitor.md for each field)."""
        s = self.sums
        valid = s[S_VALID_ROWS]
        out_n = s[S_OUT_N]
        out_mean = s[S_OUT_MEAN] if out_n else math.nan
        out_var = s[S_OUT_M2] / out_n if out_n else math.nan
        var_min, var_max = -self._max(M_ROW_VAR_NEGMIN), self._max(M_ROW_VAR_MAX)
        vh = self.var_hist[:VAR_BINS + 2]  # without the NaN slot
        edges = var_edges()
        gin_n, gp_n = s[S_GIN_N], s[S_GP_N]
        return {
            "calls": self.calls,
            "skipped_calls": self.skipped_calls,
            "rows": self.rows,
            "rows_sampled": self.rows_sampled,
            "rows_nonfinite": self.rows_sampled - int(valid),
            "in_mean": s[S_ROW_MEAN] / valid if valid else math.nan,
            "in_row_mean_min": -self._max(M_ROW_MEAN_NEGMIN) if valid else math.nan,
            "in_row_mean_max": self._max(M_ROW_MEAN_MAX) if valid else math.nan,
            "var_mean": s[S_ROW_VAR] / valid if valid else math.nan,
            "var_min": var_min if valid else math.nan,
            "var_p50": quantile(vh, edges, 0.50, var_min, var_max) if valid else math.nan,
            "var_p90": quantile(vh, edges, 0.90, var_min, var_max) if valid else math.nan,
            "var_p99": quantile(vh, edges, 0.99, var_min, var_max) if valid else math.nan,
            "var_max": var_max if valid else math.nan,
            "eps": eps,
            "eps_threshold": eps_factor * eps,
            "eps_rows": int(s[S_EPS_ROWS]),
            "eps_fraction": s[S_EPS_ROWS] / self.rows_sampled if self.rows_sampled else 0.0,
            "nan_in": int(s[S_NAN_IN]),
            "inf_in": int(s[S_INF_IN]),
            "nan_out": int(s[S_NAN_OUT]),
            "inf_out": int(s[S_INF_OUT]),
            "out_mean": out_mean,
            "out_std": math.sqrt(max(out_var, 0.0)) if out_n else math.nan,
            "grad_input_norm": s[S_GIN_SUM] / gin_n if gin_n else None,
            "grad_input_norm_min": -self._max(M_GIN_NEGMIN) if gin_n else None,
            "grad_input_norm_max": self._max(M_GIN_MAX) if gin_n else None,
            "grad_input_steps": int(gin_n),
            "grad_param_norm": s[S_GP_SUM] / gp_n if gp_n else None,
            "grad_param_norm_min": -self._max(M_GP_NEGMIN) if gp_n else None,
            "grad_param_norm_max": self._max(M_GP_MAX) if gp_n else None,
            "grad_param_steps": int(gp_n),
            **self.params,
            "in_hist": [int(c) for c in self.in_hist[:-1]],
        }


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)
