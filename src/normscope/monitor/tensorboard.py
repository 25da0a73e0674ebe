"""A :class:`~normscope.monitor.Sink` that writes the monitor's records as TensorBoard events.

``tensorboard`` (through ``torch.utils.tensorboard``) is imported when a :class:`TensorBoardSink` is
constructed, not when normscope is imported (install it with ``pip install 'normscope[monitor]'``).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Union

from normscope.monitor.sinks import Sink

__all__ = ["TensorBoardSink"]

PathLike = Union[str, "os.PathLike[str]"]

#: ``layer_stats`` fields that are not written as scalars (the step itself and fixed per-layer values).
_NOT_SCALARS = frozenset({"type", "step", "window_start", "window_end", "layer", "kind", "eps", "eps_threshold",
                          "in_hist"})


def _scalar(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def histogram_buckets(edges: Sequence[float], counts: Sequence[int]) -> Dict[str, object]:
    """The TensorBoard histogram (``add_histogram_raw`` arguments) of a fixed-bin input histogram.

    ``counts`` is a record's ``in_hist``: ``[underflow, bins..., overflow]`` over ``edges``. Bucket ``i``
    of a TensorBoard histogram ends at ``bucket_limits[i]`` and starts where the previous one ends (the
    first at ``min``). The underflow / overflow counts become a bucket one bin wide below / above the
    range, and are left out when empty. ``sum`` and ``sum_squares`` use bin centres (the monitor keeps
    counts only), so they are approximate.
    """
    edges = [float(e) for e in edges]
    counts = [int(c) for c in counts]
    if len(counts) != len(edges) + 1:
        raise ValueError(f"Expected {len(edges) + 1} counts for {len(edges)} edges, but got {len(counts)}")
    width = edges[1] - edges[0]
    lefts = [edges[0] - width] + edges
    rights = edges + [edges[-1] + width]
    keep = [i for i in range(len(counts)) if not ((i == 0 or i == len(counts) - 1) and counts[i] == 0)]
    lefts, rights, counts = [lefts[i] for i in keep], [rights[i] for i in keep], [counts[i] for i in keep]
    centres = [(a + b) / 2 for a, b in zip(lefts, rights)]
    return {"min": lefts[0], "max": rights[-1], "num": sum(counts),
            "sum": sum(c * x for c, x in zip(counts, centres)),
            "sum_squares": sum(c * x * x for c, x in zip(counts, centres)),
            "bucket_limits": rights, "bucket_counts": counts}


class TensorBoardSink(Sink):
    """Writes the monitor's records to a TensorBoard event file in ``logdir`` (requires ``tensorboard``).

    For each ``layer_stats`` record, at ``global_step`` = the record's ``step`` (the last step of the
    window):

    * every numeric field as a scalar tagged ``normscope/<layer>/<field>`` (e.g.
      ``normscope/encoder.0.norm/var_p99``; fields without a value in the window, such as gradient
      norms in inference, are skipped);
    * the input-value histogram as ``normscope/<layer>/in_hist``, built from the monitor's fixed bins
      (see :func:`histogram_buckets`).

    Findings are written as text under ``normscope/findings`` at their own step (one entry per step,
    listing the findings of that step), and the run record as text under ``normscope/run``.

    The writer (``torch.utils.tensorboard.SummaryWriter``) is created on the first write, so an
    unusable ``logdir`` is reported by the monitor once, with a ``RuntimeWarning``, and the sink
    disabled while training carries on. Events are flushed to disk after each monitor flush.

    Args:
        logdir: the directory of the event file (created if missing).
    """

    def __init__(self, logdir: PathLike):
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"Expected logdir to be a str or os.PathLike, but got {type(logdir).__name__}")
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("normscope.monitor.TensorBoardSink requires tensorboard: "
                              "pip install 'normscope[monitor]'") from e
        self.logdir = os.fspath(logdir)
        self._writer_cls = SummaryWriter
        self._writer = None
        self._edges: Optional[List[float]] = None

    def write(self, records: Sequence[dict]) -> None:
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=self.logdir)
        w = self._writer
        findings: Dict[int, List[dict]] = {}
        for r in records:
            t = r.get("type")
            if t == "run":
                self._edges = list(r.get("hist_edges") or []) or None
                layers = ", ".join(f"`{n}` ({k})" for n, k in zip(r.get("layers", []), r.get("kinds", [])))
                w.add_text("normscope/run", f"normscope monitor run: {len(r.get('layers', []))} layers: {layers}",
                           global_step=0)
            elif t == "layer_stats":
                self._layer_stats(w, r)
            elif t == "finding":
                findings.setdefault(int(r.get("step") or 0), []).append(r)
        for step in sorted(findings):
            text = "\n".join(f"- **{f.get('severity')}** `{f.get('kind')}` in layer `{f.get('layer')}`: "
                             f"{f.get('message')}" for f in findings[step])
            w.add_text("normscope/findings", text, global_step=step)
        w.flush()

    def _layer_stats(self, w, r: dict) -> None:
        layer, step = r.get("layer"), int(r.get("step") or 0)
        for field, value in r.items():
            if field in _NOT_SCALARS:
                continue
            v = _scalar(value)
            if v is not None:
                w.add_scalar(f"normscope/{layer}/{field}", v, global_step=step)
        counts = r.get("in_hist")
        if self._edges is not None and isinstance(counts, list) and len(counts) == len(self._edges) + 1:
            h = histogram_buckets(self._edges, counts)
            if h["num"] > 0 and all(math.isfinite(x) for x in (h["sum"], h["sum_squares"])):
                w.add_histogram_raw(f"normscope/{layer}/in_hist", global_step=step, **h)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.logdir!r})"
