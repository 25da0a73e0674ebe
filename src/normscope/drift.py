"""Prediction drift of model outputs against a stored baseline.

Distances between 1-D distributions (PSI, Jensen-Shannon distance, KL divergence, normed Wasserstein)
computed the way Evidently computes them by default, a :class:`Baseline` that keeps what a deployed
model version produced (fixed bins, proportions, summary statistics and a bounded subsample, saved
without pickle), and a :class:`DriftWindow` that compares the latest served outputs against it.

Everything is numpy in float64; torch tensors are accepted and copied to the CPU. No scipy needed.
See ``docs/drift.md`` for the binning rules and the drift decision.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_THRESHOLDS",
    "METRICS",
    "Histogram",
    "psi",
    "js_distance",
    "kl_divergence",
    "wasserstein",
    "Baseline",
    "ColumnDrift",
    "DriftReport",
    "DriftWindow",
]

#: Evidently's default threshold of each stat test; a value ``>=`` its threshold is drift.
DEFAULT_THRESHOLDS: dict[str, float] = {"psi": 0.1, "js": 0.1, "kl": 0.1, "wasserstein": 0.1}
METRICS = ("psi", "js", "kl", "wasserstein")

# Evidently treats a column with at most this many distinct reference values as categorical.
_CATEGORICAL_MAX_UNIQUE = 20
# Evidently's floor for empty bins (PSI and KL only) and the std floor of its normed Wasserstein.
_EMPTY_BIN_FLOOR = 1e-4
_STD_FLOOR = 1e-3
_FORMAT = "normscope.drift.Baseline"
_FORMAT_VERSION = 1
_SUMMARY_NAMES = ("row_norm", "row_cosine")
_STAT_FIELDS = ("count", "nonfinite", "mean", "std", "min", "max")
_AUTO_SUMMARY_MIN_FEATURES = 16


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------

def _type_name(x: Any) -> str:
    return type(x).__module__ + "." + type(x).__qualname__ if not isinstance(x, (list, tuple)) else type(x).__name__


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy float64 copy of an ndarray or tensor; raises TypeError for anything else."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"Expected {name} to have a real numeric dtype, but got {x.dtype}")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise TypeError(f"Expected {name} to have a real numeric dtype, but got {x.dtype}")
        return np.asarray(x, dtype=np.float64)
    raise TypeError(f"Expected {name} to be a numpy.ndarray or torch.Tensor, but got {_type_name(x)}")


def _finite_1d(x: Any, name: str) -> tuple[np.ndarray, int]:
    """Finite values of a 1-D sample and the number of NaN/Inf values left out."""
    a = _to_numpy(x, name)
    if a.ndim != 1:
        raise ValueError(f"Expected {name} to be 1-D, but got shape {list(a.shape)}")
    if a.size == 0:
        raise ValueError(f"Expected a non-empty {name}, but got 0 values")
    ok = np.isfinite(a)
    v = a[ok]
    if v.size == 0:
        raise ValueError(f"Expected {name} to hold at least one finite value, but got {a.size} NaN/Inf values")
    return v, int(a.size - v.size)


def _as_rows(x: Any, name: str, n_features: int | None = None) -> np.ndarray:
    """2-D float64 (rows x features) view of outputs; 1-D means one feature."""
    a = _to_numpy(x, name)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"Expected {name} to be 1-D (samples) or 2-D (samples x features), "
                         f"but got shape {list(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"Expected a non-empty {name}, but got 0 rows")
    if a.shape[1] == 0:
        raise ValueError(f"Expected {name} with at least one feature, but got shape {list(a.shape)}")
    if n_features is not None and a.shape[1] != n_features:
        raise ValueError(f"Expected {name} with {n_features} features (the baseline's), but got "
                         f"{a.shape[1]} (shape {list(a.shape)})")
    return a


_NUMPY_BIN_RULES = ("auto", "fd", "doane", "scott", "stone", "rice", "sturges", "sqrt")


def _check_bins_arg(bins: Any, name: str = "bins") -> None:
    if bins is None:
        return
    if isinstance(bins, str):
        if bins not in _NUMPY_BIN_RULES:
            raise ValueError(f"Expected {name} to be one of numpy's binning rules {list(_NUMPY_BIN_RULES)}, "
                             f"but got {bins!r}")
        return
    if isinstance(bins, (bool, np.bool_)):
        raise TypeError(f"Expected {name} to be None, an int, a numpy binning rule or an array of edges, but got bool")
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError(f"Expected {name} >= 1, but got {bins}")
        return
    if isinstance(bins, (np.ndarray, torch.Tensor)):
        return
    raise TypeError(f"Expected {name} to be None, an int, a numpy binning rule or an array of edges, "
                    f"but got {_type_name(bins)}")


def _explicit_edges(bins: Any) -> np.ndarray:
    e = _to_numpy(bins, "bins")
    if e.ndim != 1 or e.size < 2:
        raise ValueError(f"Expected bins edges to be 1-D with at least 2 values, but got shape {list(e.shape)}")
    if not np.all(np.isfinite(e)):
        raise ValueError("Expected finite bin edges, but got NaN or Inf")
    if not np.all(np.diff(e) > 0):
        raise ValueError("Expected strictly increasing bin edges, but got a non-increasing sequence")
    return e


# ----------------------------------------------------------------------------------------------
# histograms
# ----------------------------------------------------------------------------------------------

def _bin_numeric(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # bin i holds edges[i] <= v < edges[i+1] (the last bin also holds edges[-1]), as np.histogram;
    # values outside the edges fall into the outer bins, which are therefore open-ended.
    return np.searchsorted(edges[1:-1], x, side="right")


def _bin_categorical(x: np.ndarray, categories: np.ndarray) -> np.ndarray:
    # index of the value in the sorted categories; values not among them go to the trailing "other" bin
    pos = np.searchsorted(categories, x)
    hit = pos < categories.size
    hit[hit] = categories[pos[hit]] == x[hit]
    return np.where(hit, pos, categories.size)


class Histogram:
    """A binned 1-D distribution: what a baseline keeps instead of raw samples.

    Numeric histograms have ``edges`` (``n_bins + 1`` increasing values): bin ``i`` holds
    ``edges[i] <= v < edges[i+1]``, the last bin also holds ``edges[-1]``, and the two outer bins are
    open-ended (values below ``edges[0]`` count in the first bin, values above ``edges[-1]`` in the last)
    so that nothing a later sample holds is dropped. Categorical histograms have sorted ``categories``
    and one more bin at the end for values not among them ("other").

    Args:
        counts: non-negative weights per bin (counts, or proportions), 1-D float.
        edges: bin edges of a numeric histogram. Default: ``None``.
        categories: sorted distinct values of a categorical histogram. Default: ``None``.
        nonfinite: NaN/Inf values left out when the histogram was built. Default: 0.

    Example::

        >>> h = Histogram.from_samples(np.random.randn(1000), bins=10)
        >>> psi(h, np.random.randn(500) + 1.0) > 0.1
        True
    """

    def __init__(self, counts: Any, *, edges: Any = None, categories: Any = None, nonfinite: int = 0):
        c = _to_numpy(counts, "counts")
        if c.ndim != 1 or c.size == 0:
            raise ValueError(f"Expected counts to be 1-D and non-empty, but got shape {list(c.shape)}")
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("Expected finite non-negative counts, but got negative, NaN or Inf values")
        if c.sum() <= 0:
            raise ValueError("Expected counts with a positive sum, but got all zeros")
        if (edges is None) == (categories is None):
            raise ValueError("Expected exactly one of edges (numeric) or categories (categorical), "
                             f"but got edges={'set' if edges is not None else None}, "
                             f"categories={'set' if categories is not None else None}")
        if edges is not None:
            e = _explicit_edges(edges)
            if e.size != c.size + 1:
                raise ValueError(f"Expected {c.size + 1} edges for {c.size} bins, but got {e.size}")
            self.edges: np.ndarray | None = e
            self.categories: np.ndarray | None = None
        else:
            k = _to_numpy(categories, "categories")
            if k.ndim != 1 or k.size == 0 or not np.all(np.isfinite(k)) or not np.all(np.diff(k) > 0):
                raise ValueError("Expected categories to be a non-empty, finite, strictly increasing 1-D array, "
                                 f"but got shape {list(k.shape)}")
            if c.size != k.size + 1:
                raise ValueError(f"Expected {k.size + 1} counts for {k.size} categories (the last one for "
                                 f"values not among them), but got {c.size}")
            self.edges = None
            self.categories = k
        self.counts = c
        self.nonfinite = int(nonfinite)

    @property
    def categorical(self) -> bool:
        """Whether the bins are distinct values rather than intervals."""
        return self.categories is not None

    @property
    def n_bins(self) -> int:
        """Number of bins (for a categorical histogram, including the "other" bin)."""
        return int(self.counts.size)

    @property
    def total(self) -> float:
        """Sum of the counts (the number of finite values binned, for a histogram of samples)."""
        return float(self.counts.sum())

    @property
    def proportions(self) -> np.ndarray:
        """Counts divided by their sum (float64)."""
        return self.counts / self.counts.sum()

    @classmethod
    def from_samples(cls, x: Any, *, bins: Any = "sturges", categorical: bool | None = None) -> "Histogram":
        """Histogram of a 1-D sample with bins from that sample alone.

        Args:
            x: 1-D ndarray or tensor; NaN/Inf values are left out and counted in ``nonfinite``.
            bins: number of equal-width bins, a numpy rule (``np.histogram_bin_edges``: ``"sturges"``,
                ``"auto"``, ``"fd"``, ...) or explicit edges. Default: ``"sturges"``.
            categorical: bin by distinct value. ``None`` (default) follows Evidently: categorical when the
                sample has at most 20 distinct values.
        """
        _check_bins_arg(bins)
        v, bad = _finite_1d(x, "x")
        if categorical is None:
            categorical = np.unique(v).size <= _CATEGORICAL_MAX_UNIQUE
        if categorical:
            cats = np.unique(v)
            counts = np.bincount(_bin_categorical(v, cats), minlength=cats.size + 1).astype(np.float64)
            return cls(counts, categories=cats, nonfinite=bad)
        edges = _explicit_edges(bins) if isinstance(bins, (np.ndarray, torch.Tensor)) else _edges_from(v, bins)
        return cls(np.bincount(_bin_numeric(v, edges), minlength=edges.size - 1).astype(np.float64),
                   edges=edges, nonfinite=bad)

    def bin(self, x: Any) -> "Histogram":
        """Histogram of another 1-D sample on these bins (same edges or categories)."""
        v, bad = _finite_1d(x, "x")
        if self.categorical:
            idx = _bin_categorical(v, self.categories)
            return Histogram(np.bincount(idx, minlength=self.n_bins).astype(np.float64),
                             categories=self.categories, nonfinite=bad)
        idx = _bin_numeric(v, self.edges)
        return Histogram(np.bincount(idx, minlength=self.n_bins).astype(np.float64), edges=self.edges, nonfinite=bad)

    def __repr__(self) -> str:
        kind = f"categories={self.categories.size}" if self.categorical else f"edges=[{self.edges[0]:.4g}, " \
            f"{self.edges[-1]:.4g}]"
        return f"Histogram(n_bins={self.n_bins}, total={self.total:g}, {kind})"


def _edges_from(v: np.ndarray, bins: Any) -> np.ndarray:
    """Equal-width edges over v: an int count or a numpy rule; a constant sample gets one unit-wide bin."""
    edges = np.histogram_bin_edges(v, bins=bins)
    return np.asarray(edges, dtype=np.float64)


def _pair(reference: Any, current: Any, bins: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Counts of reference and current on common bins, and whether the last bin is "other"."""
    _check_bins_arg(bins)
    ref_h = reference if isinstance(reference, Histogram) else None
    cur_h = current if isinstance(current, Histogram) else None
    if ref_h is not None or cur_h is not None:
        if bins is not None:
            raise ValueError(f"Expected bins=None when a Histogram is given (its bins are used), but got {bins!r}")
        h = ref_h if ref_h is not None else cur_h
        r = ref_h if ref_h is not None else h.bin(reference)
        c = cur_h if cur_h is not None else h.bin(current)
        if r.categorical != c.categorical or (
            r.categorical and not np.array_equal(r.categories, c.categories)
        ) or (not r.categorical and not np.array_equal(r.edges, c.edges)):
            raise ValueError("Expected reference and current histograms on the same bins, but got different "
                             f"{'categories' if r.categorical else 'edges'}")
        return r.counts, c.counts, r.categorical
    ref, _ = _finite_1d(reference, "reference")
    cur, _ = _finite_1d(current, "current")
    if isinstance(bins, (np.ndarray, torch.Tensor)):
        edges = _explicit_edges(bins)
    elif bins is None and np.unique(ref).size <= _CATEGORICAL_MAX_UNIQUE:
        cats = np.union1d(ref, cur)
        n = cats.size + 1
        return (np.bincount(_bin_categorical(ref, cats), minlength=n).astype(np.float64),
                np.bincount(_bin_categorical(cur, cats), minlength=n).astype(np.float64), True)
    else:
        edges = _edges_from(np.concatenate([ref, cur]), "sturges" if bins is None else bins)
    n = edges.size - 1
    return (np.bincount(_bin_numeric(ref, edges), minlength=n).astype(np.float64),
            np.bincount(_bin_numeric(cur, edges), minlength=n).astype(np.float64), False)


# ----------------------------------------------------------------------------------------------
# distances on bin counts
# ----------------------------------------------------------------------------------------------

def _fill_zeroes(p: np.ndarray) -> np.ndarray:
    # Evidently: empty bins get 0.0001, or (smallest non-empty proportion) / 1e6 when that is <= 0.0001
    nz = p[p > 0]
    floor = nz.min() / 1e6 if nz.min() <= _EMPTY_BIN_FLOOR else _EMPTY_BIN_FLOOR
    return np.where(p > 0, p, floor)


def _rel_entr_sum(p: np.ndarray, q: np.ndarray) -> float:
    # sum of p * ln(p / q) with 0 * ln(0 / q) = 0 (q > 0 wherever p > 0 in every caller)
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def _prepare_counts(ref: np.ndarray, cur: np.ndarray, other: bool) -> tuple[np.ndarray, np.ndarray]:
    if other and ref[-1] == 0 and cur[-1] == 0:
        ref, cur = ref[:-1], cur[:-1]
    return ref / ref.sum(), cur / cur.sum()


def _psi_p(r: np.ndarray, c: np.ndarray) -> float:
    rf, cf = _fill_zeroes(r), _fill_zeroes(c)
    return float(np.sum((rf - cf) * np.log(rf / cf)))


def _kl_p(r: np.ndarray, c: np.ndarray) -> float:
    rf, cf = _fill_zeroes(r), _fill_zeroes(c)
    return _rel_entr_sum(rf / rf.sum(), cf / cf.sum())


def _js_p(r: np.ndarray, c: np.ndarray) -> float:
    m = (r + c) / 2.0
    js = (_rel_entr_sum(r, m) + _rel_entr_sum(c, m)) / 2.0
    return math.sqrt(max(js, 0.0))


def psi(reference: Any, current: Any, *, bins: Any = None) -> float:
    """Population stability index of current against reference.

    .. math:: \\mathrm{PSI} = \\sum_i (r_i - c_i) \\ln(r_i / c_i)

    over the bin proportions ``r`` (reference) and ``c`` (current), with empty bins floored as Evidently
    does (0.0001, or the smallest non-empty proportion / 1e6 when that is smaller). Drift when
    ``psi >= 0.1`` (``DEFAULT_THRESHOLDS``).

    Args:
        reference: 1-D ndarray / tensor of samples, or a :class:`Histogram` (its bins are used).
        current: 1-D ndarray / tensor of samples, or a :class:`Histogram` on the same bins.
        bins: ``None`` (default) follows Evidently: a reference with at most 20 distinct values is binned by
            value, otherwise ``np.histogram_bin_edges(reference + current, "sturges")``. An int or a numpy
            rule bins reference + current that way; a 1-D array gives explicit edges (outer bins open).
            NaN/Inf values are left out.

    Example::

        >>> psi(np.random.randn(5000), np.random.randn(5000) + 0.5) > 0.1
        True
    """
    return _psi_p(*_prepare_counts(*_pair(reference, current, bins)))


def kl_divergence(reference: Any, current: Any, *, bins: Any = None) -> float:
    """Kullback-Leibler divergence KL(reference || current) of the binned samples, natural log.

    Equal to ``scipy.stats.entropy(r, c)`` on the floored proportions (Evidently's ``kl_div`` test); the
    bins, the floor and the arguments are those of :func:`psi`. Drift when ``>= 0.1``.
    """
    return _kl_p(*_prepare_counts(*_pair(reference, current, bins)))


def js_distance(reference: Any, current: Any, *, bins: Any = None) -> float:
    """Jensen-Shannon distance (square root of the JS divergence, natural log) of the binned samples.

    Equal to ``scipy.spatial.distance.jensenshannon(r, c)`` on the bin proportions, which are not floored
    (Evidently's ``jensenshannon`` test); in [0, sqrt(ln 2)]. Bins and arguments as :func:`psi`.
    Drift when ``>= 0.1``.
    """
    return _js_p(*_prepare_counts(*_pair(reference, current, bins)))


def _w1_sorted(u: np.ndarray, v: np.ndarray) -> float:
    # 1-D earth mover's distance of two sorted samples: integral of |F_u - F_v|
    allv = np.concatenate([u, v])
    allv.sort(kind="mergesort")
    deltas = np.diff(allv)
    fu = np.searchsorted(u, allv[:-1], side="right") / u.size
    fv = np.searchsorted(v, allv[:-1], side="right") / v.size
    return float(np.sum(np.abs(fu - fv) * deltas))


def wasserstein(reference: Any, current: Any, *, normed: bool = True) -> float:
    """1-D Wasserstein-1 (earth mover's) distance between two samples.

    Equal to ``scipy.stats.wasserstein_distance(reference, current)``; with ``normed=True`` (default) it is
    divided by ``max(std(reference), 0.001)`` (population std), Evidently's "normed" Wasserstein, whose
    drift threshold is 0.1 reference standard deviations. NaN/Inf values are left out.

    Args:
        reference: 1-D ndarray or tensor of samples (raw samples: a :class:`Histogram` is refused).
        current: 1-D ndarray or tensor of samples.
        normed: divide by the reference standard deviation. Default: ``True``.
    """
    for name, x in (("reference", reference), ("current", current)):
        if isinstance(x, Histogram):
            raise TypeError(f"Expected {name} to be raw samples (numpy.ndarray or torch.Tensor) for wasserstein, "
                            "but got a Histogram")
    u, _ = _finite_1d(reference, "reference")
    v, _ = _finite_1d(current, "current")
    d = _w1_sorted(np.sort(u), np.sort(v))
    return d / max(float(np.std(u)), _STD_FLOOR) if normed else d


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColumnDrift:
    """Drift of one output column (a feature, or a row summary such as ``row_norm``)."""

    name: str
    kind: str  # "feature" or "summary"
    psi: float
    js: float
    kl: float
    wasserstein: float
    flags: dict  # metric -> value >= threshold
    drifted: bool  # flags[report.method]
    count: int  # finite current values compared
    nonfinite: int  # NaN/Inf current values left out
    ref_mean: float
    ref_std: float
    cur_mean: float
    cur_std: float

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class DriftReport:
    """Comparison of current outputs against a :class:`Baseline`.

    ``drifted`` is True when at least ``drift_share`` of the feature columns drifted by ``method``
    (Evidently's dataset-drift rule, default 50%). The row-summary columns (``row_norm``,
    ``row_cosine``) are reported with their own flags and listed in ``summary_drifted``; they do not
    change ``drifted``.
    """

    model_version: str
    method: str
    thresholds: dict
    drift_share: float
    n_reference: int
    n_current: int
    nonfinite: int  # NaN/Inf values left out, over all columns
    columns: tuple = field(repr=False)
    n_drifted: int = 0
    share_drifted: float = 0.0
    max_psi: float = 0.0
    summary_drifted: tuple = ()
    drifted: bool = False

    def column(self, name: str) -> ColumnDrift:
        """The :class:`ColumnDrift` of a column by name."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"Expected one of the report's columns, but got {name!r}")

    def to_dict(self) -> dict:
        """JSON-friendly dict (plain floats, ints, bools, strings, lists)."""
        return {
            "model_version": self.model_version, "method": self.method, "thresholds": dict(self.thresholds),
            "drift_share": self.drift_share, "n_reference": self.n_reference, "n_current": self.n_current,
            "nonfinite": self.nonfinite, "n_drifted": self.n_drifted, "share_drifted": self.share_drifted,
            "max_psi": self.max_psi, "summary_drifted": list(self.summary_drifted), "drifted": self.drifted,
            "columns": [c.to_dict() for c in self.columns],
        }

    def __str__(self, max_rows: int = 10) -> str:
        n_feat = sum(c.kind == "feature" for c in self.columns)
        head = (f"DriftReport(model_version={self.model_version!r}, drifted={self.drifted}, method={self.method}, "
                f"{self.n_drifted}/{n_feat} feature columns drifted ({self.share_drifted:.1%}), "
                f"max_psi={self.max_psi:.4f}, n_current={self.n_current}, nonfinite={self.nonfinite})")
        summ = [c for c in self.columns if c.kind == "summary"]
        feats = sorted((c for c in self.columns if c.kind == "feature"), key=lambda c: -c.psi)
        rows = summ + feats[:max_rows]
        lines = [head, f"{'column':<14}{'psi':>9}{'js':>9}{'kl':>9}{'wass':>9}  drifted"]
        for c in rows:
            lines.append(f"{c.name:<14}{c.psi:>9.4f}{c.js:>9.4f}{c.kl:>9.4f}{c.wasserstein:>9.4f}  {c.drifted}")
        if len(feats) > max_rows:
            lines.append(f"... {len(feats) - max_rows} more feature columns (highest PSI shown)")
        return "\n".join(lines)


def _check_compare_args(method: str, thresholds: dict | None, drift_share: float) -> dict:
    if method not in METRICS:
        raise ValueError(f"Expected method to be one of {list(METRICS)}, but got {method!r}")
    th = dict(DEFAULT_THRESHOLDS)
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            raise TypeError(f"Expected thresholds to be a dict, but got {_type_name(thresholds)}")
        unknown = set(thresholds) - set(METRICS)
        if unknown:
            raise ValueError(f"Expected threshold keys among {list(METRICS)}, but got {sorted(unknown)}")
        th.update({k: float(v) for k, v in thresholds.items()})
    if not 0.0 < float(drift_share) <= 1.0:
        raise ValueError(f"Expected 0 < drift_share <= 1, but got {drift_share}")
    return th


# ----------------------------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------------------------

class Baseline:
    """The output distribution of one model version, kept for drift checks.

    Per column it keeps fixed bins computed from the reference alone (a baseline cannot see future
    data), the reference bin counts, summary statistics (count, NaN/Inf count, mean, population std, min,
    max) and a bounded deterministic subsample of the sorted values (for Wasserstein). For wide outputs
    (``summaries``) two scalar columns are added per row: ``row_norm`` (L2 norm of the row) and
    ``row_cosine`` (cosine to the reference mean vector).

    Build it with :meth:`from_outputs`; compare with :meth:`compare`; store with :meth:`save` /
    :meth:`load` (``.npz`` or ``.json``, never pickle).
    """

    def __init__(self, *, model_version: str, created: str, columns: Sequence[str], kinds: Sequence[str],
                 n_features: int, n_reference: int, hists: Sequence[Histogram], stats: np.ndarray,
                 samples: Sequence[np.ndarray], mean_vector: np.ndarray | None, config: dict):
        self.model_version = model_version
        self.created = created
        self.columns = tuple(columns)
        self.kinds = tuple(kinds)
        self.n_features = int(n_features)
        self.n_reference = int(n_reference)
        self.hists = tuple(hists)
        self.stats = stats
        self.samples = tuple(samples)
        self.mean_vector = mean_vector
        self.config = dict(config)
        self._build_binning()

    @property
    def summaries(self) -> bool:
        """Whether the row-summary columns ``row_norm`` / ``row_cosine`` are kept."""
        return self.mean_vector is not None

    def __repr__(self) -> str:
        return (f"Baseline(model_version={self.model_version!r}, n_features={self.n_features}, "
                f"n_reference={self.n_reference}, summaries={self.summaries}, created={self.created!r})")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_outputs(cls, outputs: Any, *, model_version: str, bins: int | str = "sturges",
                     binning: str = "uniform", max_samples: int = 2048, columns: Sequence[str] | None = None,
                     summaries: bool | None = None) -> "Baseline":
        """Baseline of a model version's outputs.

        Args:
            outputs: 2-D (samples x features) or 1-D (samples) ndarray or tensor. NaN/Inf values are left
                out of each column's statistics and counted.
            model_version: the model version these outputs come from (stored and reported).
            bins: number of bins per numeric column, or a numpy rule computed on each reference column
                (``np.histogram_bin_edges``). Default: ``"sturges"`` (Evidently's rule, on the reference only).
            binning: ``"uniform"`` (equal-width edges over the reference range, default) or ``"quantile"``
                (reference quantiles, equal reference mass per bin; tied quantiles are merged).
            max_samples: raw values kept per column for Wasserstein (the sorted reference at evenly spaced
                ranks, min and max included). Default: 2048.
            columns: names of the feature columns. Default: ``"0"``, ``"1"``, ...
            summaries: add the ``row_norm`` and ``row_cosine`` columns. ``None`` (default): when there are
                at least 16 features.

        A column whose reference holds at most 20 distinct values, all integers (labels, counts, flags), is
        binned by value, with one extra bin for values the reference did not have; every other column gets
        numeric bins (Evidently bins any column with at most 20 distinct values by value, which would turn
        a small float reference into categories that no new value matches).

        Example::

            >>> base = Baseline.from_outputs(torch.randn(2000, 384), model_version="v1")
            >>> base.compare(torch.randn(500, 384)).drifted
            False
        """
        if not isinstance(model_version, str) or not model_version:
            raise TypeError(f"Expected model_version to be a non-empty str, but got {model_version!r}")
        if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer, str)):
            raise TypeError(f"Expected bins to be an int or a numpy binning rule (str), but got {_type_name(bins)}")
        _check_bins_arg(bins)
        if binning not in ("uniform", "quantile"):
            raise ValueError(f"Expected binning to be 'uniform' or 'quantile', but got {binning!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 2:
            raise ValueError(f"Expected max_samples to be an int >= 2, but got {max_samples!r}")
        x = _as_rows(outputs, "outputs")
        n, d = x.shape
        if columns is None:
            names = [str(i) for i in range(d)]
        else:
            names = [str(c) for c in columns]
            if len(names) != d:
                raise ValueError(f"Expected {d} column names (one per feature), but got {len(names)}")
            if len(set(names)) != d:
                raise ValueError("Expected distinct column names, but got duplicates")
        if summaries is None:
            summaries = d >= _AUTO_SUMMARY_MIN_FEATURES
        mean_vector = None
        kinds = ["feature"] * d
        if summaries:
            if set(names) & set(_SUMMARY_NAMES):
                raise ValueError(f"Expected column names other than {list(_SUMMARY_NAMES)} with summaries=True, "
                                 f"but got {sorted(set(names) & set(_SUMMARY_NAMES))}")
            good = np.all(np.isfinite(x), axis=1)
            if not good.any():
                raise ValueError(f"Expected at least one all-finite row for the row summaries, but got {n} rows "
                                 "with NaN/Inf")
            mean_vector = x[good].mean(axis=0)
            names += list(_SUMMARY_NAMES)
            kinds += ["summary"] * len(_SUMMARY_NAMES)
            aug = np.full((n, d + len(_SUMMARY_NAMES)), np.nan)
            aug[:, :d] = x
            summ = np.empty((int(good.sum()), len(_SUMMARY_NAMES)))
            _row_summaries(x[good], mean_vector, summ, leave_one_out=True)
            aug[good, d:] = summ
            x = aug
        hists, stats, samples = [], np.zeros((x.shape[1], len(_STAT_FIELDS))), []
        for j in range(x.shape[1]):
            col = x[:, j]
            v = col[np.isfinite(col)]
            if v.size == 0:
                raise ValueError(f"Expected column {names[j]!r} to hold at least one finite value, but got "
                                 f"{col.size} NaN/Inf values")
            v = np.sort(v)
            if np.unique(v).size <= _CATEGORICAL_MAX_UNIQUE and np.all(v == np.round(v)):
                h = Histogram.from_samples(v, categorical=True)
            else:
                h = Histogram.from_samples(v, bins=_reference_edges(v, bins, binning))
            h.nonfinite = int(col.size - v.size)
            hists.append(h)
            stats[j] = (v.size, col.size - v.size, v.mean(), v.std(), v[0], v[-1])
            if v.size > max_samples:
                v = v[np.round(np.linspace(0, v.size - 1, int(max_samples))).astype(np.int64)]
            samples.append(v)
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        config = {"bins": bins if isinstance(bins, str) else int(bins), "binning": binning,
                  "max_samples": int(max_samples)}
        return cls(model_version=model_version, created=created, columns=names, kinds=kinds, n_features=d,
                   n_reference=n, hists=hists, stats=stats, samples=samples, mean_vector=mean_vector, config=config)

    # -- binning of current rows ----------------------------------------------------------------
    def _build_binning(self) -> None:
        c = len(self.hists)
        self._n_bins = np.array([h.n_bins for h in self.hists], dtype=np.int64)
        self._bmax = int(self._n_bins.max())
        self._numeric = np.array([not h.categorical for h in self.hists])
        # interior edges of every numeric column, padded with +inf so padding never counts
        inner = np.full((c, max(self._bmax - 1, 1)), np.inf)
        for j, h in enumerate(self.hists):
            if not h.categorical:
                inner[j, : h.n_bins - 1] = h.edges[1:-1]
        self._inner = inner[self._numeric]
        self._num_idx = np.flatnonzero(self._numeric)
        self._cat_idx = np.flatnonzero(~self._numeric)
        self._ref_std = np.maximum(self.stats[:, 3], _STD_FLOOR)
        self._col_offsets = (np.arange(c, dtype=np.int64) * self._bmax)[None, :]

    def _augment(self, outputs: Any, name: str = "outputs") -> np.ndarray:
        x = _as_rows(outputs, name, self.n_features)
        if self.mean_vector is None:
            return x
        out = np.empty((x.shape[0], self.n_features + len(_SUMMARY_NAMES)))
        out[:, : self.n_features] = x
        _row_summaries(x, self.mean_vector, out[:, self.n_features:])
        return out

    def _bin_rows(self, x: np.ndarray) -> np.ndarray:
        """Bin index of every value of augmented rows (rows x columns), -1 for NaN/Inf."""
        idx = np.empty(x.shape, dtype=np.int32)
        if self._num_idx.size:
            xs = x[:, self._num_idx] if self._cat_idx.size else x
            acc = np.zeros(xs.shape, dtype=np.int32)
            # the bin index is the number of interior edges <= value (searchsorted 'right'), one edge at a time
            for b in range(self._inner.shape[1]):
                acc += xs >= self._inner[:, b]
            idx[:, self._num_idx] = acc
        for j in self._cat_idx:
            idx[:, j] = _bin_categorical(x[:, j], self.hists[j].categories)
        idx[~np.isfinite(x)] = -1
        return idx

    def _count(self, idx: np.ndarray) -> np.ndarray:
        """Counts (columns x max bins) of bin indices from :meth:`_bin_rows`."""
        c = idx.shape[1]
        flat = (self._col_offsets + idx)[idx >= 0]
        return np.bincount(flat, minlength=c * self._bmax).reshape(c, self._bmax)

    def _add_counts(self, counts: np.ndarray, idx: np.ndarray, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) the rows of bin indices ``idx`` to/from ``counts`` in place."""
        flat = (self._col_offsets + idx)[idx >= 0]
        delta = np.bincount(flat, minlength=counts.size).reshape(counts.shape)
        if sign > 0:
            counts += delta
        else:
            counts -= delta

    # -- comparison -----------------------------------------------------------------------------
    def compare(self, outputs: Any, *, method: str = "psi", thresholds: dict | None = None,
                drift_share: float = 0.5) -> DriftReport:
        """Compare outputs of the served model against this baseline.

        Args:
            outputs: ndarray or tensor of shape ``[N, n_features]`` (or ``[N]`` for a 1-feature baseline).
            method: the metric whose threshold decides each column's ``drifted``: ``"psi"`` (default),
                ``"js"``, ``"kl"`` or ``"wasserstein"``. Every metric is computed and flagged regardless.
            thresholds: per-metric thresholds overriding ``DEFAULT_THRESHOLDS`` (all 0.1).
            drift_share: share of drifted feature columns from which the outputs count as drifted
                (Evidently's dataset-drift default: 0.5).

        Returns:
            a :class:`DriftReport`.
        """
        th = _check_compare_args(method, thresholds, drift_share)
        x = self._augment(outputs)
        idx = self._bin_rows(x)
        return self._report(x, self._count(idx), method, th, float(drift_share))

    def _report(self, x: np.ndarray, counts: np.ndarray, method: str, th: dict, share: float) -> DriftReport:
        cols = []
        total_bad = 0
        for j, h in enumerate(self.hists):
            col = x[:, j]
            v = col[np.isfinite(col)]
            bad = int(col.size - v.size)
            total_bad += bad if self.kinds[j] == "feature" else 0
            if v.size == 0:
                raise ValueError(f"Expected column {self.columns[j]!r} of outputs to hold at least one finite "
                                 f"value, but got {col.size} NaN/Inf values")
            r, c = _prepare_counts(h.counts, counts[j, : h.n_bins].astype(np.float64), h.categorical)
            vals = {"psi": _psi_p(r, c), "js": _js_p(r, c), "kl": _kl_p(r, c),
                    "wasserstein": _w1_sorted(self.samples[j], np.sort(v)) / self._ref_std[j]}
            flags = {k: bool(vals[k] >= th[k]) for k in METRICS}
            cols.append(ColumnDrift(
                name=self.columns[j], kind=self.kinds[j], psi=vals["psi"], js=vals["js"], kl=vals["kl"],
                wasserstein=vals["wasserstein"], flags=flags, drifted=flags[method], count=int(v.size),
                nonfinite=bad, ref_mean=float(self.stats[j, 2]), ref_std=float(self.stats[j, 3]),
                cur_mean=float(v.mean()), cur_std=float(v.std())))
        feats = [c for c in cols if c.kind == "feature"]
        n_drifted = sum(c.drifted for c in feats)
        share_drifted = n_drifted / len(feats)
        summary_drifted = tuple(c.name for c in cols if c.kind == "summary" and c.drifted)
        return DriftReport(
            model_version=self.model_version, method=method, thresholds=th, drift_share=share,
            n_reference=self.n_reference, n_current=int(x.shape[0]), nonfinite=total_bad, columns=tuple(cols),
            n_drifted=n_drifted, share_drifted=share_drifted, max_psi=max(c.psi for c in feats),
            summary_drifted=summary_drifted, drifted=bool(share_drifted >= share))

    # -- storage --------------------------------------------------------------------------------
    def _state(self) -> tuple[dict, dict]:
        meta = {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "model_version": self.model_version,
            "created": self.created, "columns": list(self.columns), "kinds": list(self.kinds),
            "n_features": self.n_features, "n_reference": self.n_reference, "config": self.config,
            "categorical": [h.categorical for h in self.hists], "stat_fields": list(_STAT_FIELDS),
        }
        bins = [h.categories if h.categorical else h.edges for h in self.hists]
        arrays = {
            "bins_flat": np.concatenate(bins), "bins_offsets": _offsets(bins),
            "counts_flat": np.concatenate([h.counts for h in self.hists]),
            "counts_offsets": _offsets([h.counts for h in self.hists]),
            "samples_flat": np.concatenate(self.samples), "samples_offsets": _offsets(self.samples),
            "stats": self.stats, "mean_vector": self.mean_vector if self.mean_vector is not None else np.zeros(0),
        }
        return meta, arrays

    def save(self, path: str | os.PathLike) -> None:
        """Write the baseline to ``path``: ``.npz`` (numpy arrays, no object arrays) or ``.json`` by suffix."""
        import io

        from normscope._paths import write_output

        path = os.fspath(path)
        meta, arrays = self._state()
        if path.endswith(".npz"):
            buf = io.BytesIO()
            np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
            write_output(path, buf.getvalue())  # atomically; through symbolic links; FIFOs directly
        elif path.endswith(".json"):
            doc = dict(meta, arrays={k: v.tolist() for k, v in arrays.items()})
            write_output(path, json.dumps(doc))
        else:
            raise ValueError(f"Expected a path ending in .npz or .json, but got {path!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Baseline":
        """Read a baseline written by :meth:`save` (``.npz`` with ``allow_pickle=False``, or ``.json``).

        Raises:
            ValueError: the file is truncated, corrupt, not a normscope baseline, or of an unknown format
                version.
        """
        path = os.fspath(path)
        what = f"a normscope drift baseline at {path!r}"
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"][()]))
                    arrays = {k: np.asarray(z[k]) for k in z.files if k != "meta"}
            elif path.endswith(".json"):
                with open(path) as f:
                    doc = json.load(f)
                if not isinstance(doc, dict) or not isinstance(doc.get("arrays"), dict):
                    raise ValueError("no 'arrays' object")
                arrays = {k: np.asarray(v, dtype=np.float64) for k, v in doc.pop("arrays").items()}
                meta = doc
            else:
                raise ValueError(f"Expected a path ending in .npz or .json, but got {path!r}")
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
                UnicodeDecodeError) as e:
            raise ValueError(f"Expected {what}, but the file could not be read: {type(e).__name__}: {e}") from e
        try:
            return cls._from_state(meta, arrays)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"Expected {what}, but got an invalid file: {e}") from e

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict) -> "Baseline":
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                             f"not {_FORMAT!r}")
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"format_version {meta.get('format_version')!r} is not {_FORMAT_VERSION}")
        for k, v in arrays.items():
            if v.dtype.kind not in "iuf":
                raise ValueError(f"array {k!r} has dtype {v.dtype}")
        columns, kinds, cat = list(meta["columns"]), list(meta["kinds"]), list(meta["categorical"])
        c = len(columns)
        if not (c == len(kinds) == len(cat)) or c == 0:
            raise ValueError("columns, kinds and categorical differ in length")
        if set(kinds) - {"feature", "summary"}:
            raise ValueError(f"unknown column kinds {sorted(set(kinds) - {'feature', 'summary'})}")
        bins = _split(arrays["bins_flat"], arrays["bins_offsets"], c, "bins")
        counts = _split(arrays["counts_flat"], arrays["counts_offsets"], c, "counts")
        samples = _split(arrays["samples_flat"], arrays["samples_offsets"], c, "samples")
        hists = [Histogram(counts[j], categories=bins[j]) if cat[j] else Histogram(counts[j], edges=bins[j])
                 for j in range(c)]
        stats = np.asarray(arrays["stats"], dtype=np.float64)
        if stats.shape != (c, len(_STAT_FIELDS)) or not np.all(np.isfinite(stats)):
            raise ValueError(f"stats has shape {list(stats.shape)}, expected {[c, len(_STAT_FIELDS)]}")
        for j, h in enumerate(hists):
            h.nonfinite = int(stats[j, 1])
            s = samples[j]
            if s.size == 0 or not np.all(np.isfinite(s)) or np.any(np.diff(s) < 0):
                raise ValueError(f"samples of column {columns[j]!r} are empty, non-finite or unsorted")
        n_features = int(meta["n_features"])
        mv = np.asarray(arrays["mean_vector"], dtype=np.float64)
        n_summ = kinds.count("summary")
        if kinds[:n_features] != ["feature"] * n_features or c != n_features + n_summ:
            raise ValueError("column kinds do not match n_features")
        if n_summ not in (0, len(_SUMMARY_NAMES)) or (n_summ and mv.shape != (n_features,)) or (
                not n_summ and mv.size):
            raise ValueError("row summaries and mean_vector do not agree")
        return cls(model_version=str(meta["model_version"]), created=str(meta["created"]), columns=columns,
                   kinds=kinds, n_features=n_features, n_reference=int(meta["n_reference"]), hists=hists,
                   stats=stats, samples=[np.asarray(s, dtype=np.float64) for s in samples],
                   mean_vector=mv if n_summ else None, config=dict(meta.get("config", {})))


def _reference_edges(v: np.ndarray, bins: int | str, binning: str) -> np.ndarray:
    if binning == "uniform":
        return _edges_from(v, bins)
    n = int(bins) if not isinstance(bins, str) else _edges_from(v, bins).size - 1
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, n + 1)))
    return edges if edges.size >= 2 else _edges_from(v, 1)


def _row_summaries(x: np.ndarray, mean_vector: np.ndarray, out: np.ndarray, *, leave_one_out: bool = False) -> None:
    """Write the L2 norm of each row and its cosine to the mean vector into ``out`` (rows x 2).

    Rows with NaN/Inf get NaN. With ``leave_one_out`` (the reference rows the mean was computed from), each
    row's cosine is taken to the mean of the other rows, so that the reference is not biased towards the
    mean it helped to form (on isotropic data that bias is 1/sqrt(n) in cosine).
    """
    sq = np.einsum("ij,ij->i", x, x)
    dot = x @ mean_vector
    norm = np.sqrt(sq)
    msq = float(mean_vector @ mean_vector)
    if leave_one_out and x.shape[0] > 1:
        n = x.shape[0]
        dot = (n * dot - sq) / (n - 1)
        mnorm = np.sqrt(np.maximum(n * n * msq - 2 * n * (x @ mean_vector) + sq, 0.0)) / (n - 1)
    else:
        mnorm = math.sqrt(msq)
    denom = norm * mnorm
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    bad = ~np.isfinite(norm) | ~np.isfinite(dot)
    norm[bad] = np.nan
    cos[bad] = np.nan
    # 5 significant digits: finer differences are rounding noise of float32 outputs (the norms of
    # L2-normalized embeddings then all read 1.0 instead of a handful of values around it)
    out[:, 0] = _round_sig(norm)
    out[:, 1] = _round_sig(cos)


def _round_sig(a: np.ndarray, digits: int = 5) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log10(np.abs(a)))
    f = 10.0 ** (digits - 1 - np.where(np.isfinite(e), e, 0.0))
    return np.round(a * f) / f


def _offsets(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.cumsum([0] + [p.size for p in parts]).astype(np.int64)


def _split(flat: np.ndarray, offsets: np.ndarray, n: int, name: str) -> list[np.ndarray]:
    flat = np.asarray(flat, dtype=np.float64)
    off = np.asarray(offsets)
    if (off.ndim != 1 or off.size != n + 1 or not np.all(off == np.round(off)) or off[0] != 0
            or off[-1] != flat.size or np.any(np.diff(off) < 0)):
        raise ValueError(f"{name} offsets do not match {n} columns")
    off = off.astype(np.int64)
    return [flat[off[j]: off[j + 1]] for j in range(n)]


# ----------------------------------------------------------------------------------------------
# serving window
# ----------------------------------------------------------------------------------------------

class DriftWindow:
    """Sliding window of the latest served outputs, compared against a :class:`Baseline`.

    ``update`` copies the new rows into a fixed ring buffer (``window`` rows) and adjusts per-column bin
    counts by the rows that enter and leave, so its cost is proportional to the new rows only; memory is
    fixed at construction. ``report`` compares the rows held against the baseline and gives the same
    result as ``baseline.compare`` on those rows.

    Args:
        baseline: the :class:`Baseline` to compare against.
        window: rows kept (the most recent). Default: 1000.

    Example::

        >>> win = DriftWindow(base, window=1000)
        >>> win.update(model_outputs)      # per request or per batch
        >>> win.report().drifted
    """

    def __init__(self, baseline: Baseline, *, window: int = 1000):
        if not isinstance(baseline, Baseline):
            raise TypeError(f"Expected baseline to be a normscope.drift.Baseline, but got {_type_name(baseline)}")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"Expected window to be an int >= 1, but got {window!r}")
        self.baseline = baseline
        self.window = int(window)
        c = len(baseline.columns)
        self._values = np.zeros((self.window, c), dtype=np.float64)
        self._idx = np.full((self.window, c), -1, dtype=np.int32)
        self._counts = np.zeros((c, baseline._bmax), dtype=np.int64)
        self._pos = 0
        self._size = 0
        self.rows_seen = 0

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """Rows currently held (at most ``window``)."""
        return self._size

    def reset(self) -> None:
        """Forget every row."""
        self._counts[:] = 0
        self._idx[:] = -1
        self._pos = self._size = 0

    def update(self, outputs: Any) -> None:
        """Add rows (``[N, n_features]``, or ``[N]`` for a 1-feature baseline); the oldest rows leave."""
        x = self.baseline._augment(outputs)
        self.rows_seen += x.shape[0]
        if x.shape[0] > self.window:
            x = x[-self.window:]
        k = x.shape[0]
        idx = self.baseline._bin_rows(x)
        slots = (self._pos + np.arange(k)) % self.window
        if self._size == self.window:
            old = slots
        else:
            old = slots[slots < self._size]
        self.baseline._add_counts(self._counts, idx, 1)
        if old.size:
            self.baseline._add_counts(self._counts, self._idx[old], -1)
        self._values[slots] = x
        self._idx[slots] = idx
        self._pos = int((self._pos + k) % self.window)
        self._size = min(self.window, self._size + k)

    def report(self, *, method: str = "psi", thresholds: dict | None = None, drift_share: float = 0.5) -> DriftReport:
        """Compare the rows held against the baseline (arguments as :meth:`Baseline.compare`)."""
        th = _check_compare_args(method, thresholds, drift_share)
        if self._size == 0:
            raise ValueError("Expected at least one row in the window, but got 0 (call update() first)")
        x = self._values if self._size == self.window else self._values[: self._size]
        return self.baseline._report(x, self._counts, method, th, float(drift_share))
