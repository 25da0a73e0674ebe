"""The metric catalogue: every Prometheus metric normscope exports, with its type, labels and unit.

This is the contract between the code that records metrics (the monitor's
:class:`~normscope.monitor.PrometheusSink` and the serving wrapper) and everything that reads them: the
alert rules in ``deploy/prometheus``, the dashboards in ``deploy/grafana`` and docs/metrics.md. Tests check
that each of those uses only names listed here, and that the sink registers exactly the ``monitor`` entries.

The module is pure Python: it imports neither ``prometheus_client`` nor anything else heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from normscope.monitor.findings import FINDING_KINDS, SEVERITIES
from normscope.monitor.prometheus import _COUNTERS, _GAUGES, PROMETHEUS_METRICS

__all__ = [
    "Metric",
    "METRICS",
    "METRIC_TYPES",
    "SOURCES",
    "LABELS",
    "LATENCY_BUCKETS_SECONDS",
    "BATCH_SIZE_BUCKETS",
    "FAILURE_REASONS",
    "DRIFT_METRICS",
    "MAX_DRIFT_STATISTICS",
    "TRITON_METRICS",
    "TRITON_LABELS",
    "TRITON_FAILURE_REASONS",
    "get_metric",
]

METRIC_TYPES = ("counter", "gauge", "histogram")

#: Who exports a metric: the training/serving monitor (``PrometheusSink``), the serving wrapper,
#: ``prometheus_client``'s process collector, which the wrapper registers in its registry, OpenTelemetry
#: instruments of :mod:`normscope.serving.otel` written into the wrapper's registry, or Triton Inference
#: Server itself (:data:`TRITON_METRICS`: not normscope's, listed because the rules and dashboards join them).
SOURCES = ("monitor", "serving", "process", "triton", "otel")

_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_SUFFIXES = ("_bucket", "_sum", "_count", "_created")

#: Buckets of ``normscope_inference_request_duration_seconds`` (``prometheus_client``'s defaults). The
#: latency SLO threshold of the alert rules (0.25 s) is a bucket boundary, so the SLI is exact.
LATENCY_BUCKETS_SECONDS: Tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                              5.0, 7.5, 10.0)

#: Buckets of ``normscope_inference_batch_size`` (items per call of the wrapped callable).
BATCH_SIZE_BUCKETS: Tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Values of the ``reason`` label of ``normscope_inference_failures_total``.
FAILURE_REASONS: Tuple[str, ...] = ("bad_input", "nonfinite_output", "exception")

#: Values of the ``metric`` label of ``normscope_prediction_drift``: population stability index and
#: Jensen-Shannon distance (natural log, in [0, sqrt(ln 2)]), as ``normscope.drift`` computes them.
DRIFT_METRICS: Tuple[str, ...] = ("psi", "js")

#: At most this many output columns per model version carry a drift gauge (the ``statistic`` label); wider
#: outputs (embeddings) export their row summaries and ``normscope_prediction_drift_share``.
MAX_DRIFT_STATISTICS = 16

#: Every label used by a metric: name -> (meaning, bound on the number of values per process).
LABELS: Dict[str, Tuple[str, str]] = {
    "model": ("name of the served model, fixed when the wrapper is built", "1 per wrapped model (one model per "
              "process is the supported deployment)"),
    "model_version": ("version of the served model (the baseline the drift is measured against belongs to it)",
                      "the versions live in the process: 1, 2 during a reload"),
    "version": ("normscope version (``normscope.__version__``)", "1"),
    "fingerprint": ("fingerprint of the served model's normalization config (kind, eps, affine, shapes, dtypes "
                    "and, when computed with example inputs, placement of each norm layer; "
                    "``normscope.serving.config``), or ``unknown`` when the wrapped callable is not an nn.Module",
                    "1 per model version"),
    "reason": ("why a request failed: " + ", ".join(FAILURE_REASONS), str(len(FAILURE_REASONS))),
    "metric": ("drift measure: " + ", ".join(DRIFT_METRICS), str(len(DRIFT_METRICS))),
    "statistic": ("output column of the drift baseline: a row summary (row_norm, row_cosine) or, for outputs "
                  f"of at most {MAX_DRIFT_STATISTICS} columns, a feature column (its name, or its index as a string)",
                  f"at most {MAX_DRIFT_STATISTICS} + 2 per model version"),
    "layer": ("qualified module name of a normalization layer", "the number of normalization layers"),
    "stat": ("which statistic of the metric (a fixed set per metric, listed with it)", "at most 6 per metric"),
    "param": ("which affine parameter: weight (gamma) or bias (beta)", "2"),
    "outcome": ("result of a call in the OpenTelemetry metrics (normscope.serving.otel): ok or a failure reason ("
                + ", ".join(FAILURE_REASONS) + ")", str(len(FAILURE_REASONS) + 1)),
    "kind": ("kind of monitor finding (normscope.monitor.FINDING_KINDS)", str(len(FINDING_KINDS))),
    "severity": ("severity of a monitor finding: " + ", ".join(SEVERITIES), str(len(SEVERITIES))),
}

_DRIFT_STATS = ("l2", "max_abs", "rms")

#: Values of the ``reason`` label of Triton's ``nv_inference_request_failure``.
TRITON_FAILURE_REASONS: Tuple[str, ...] = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

#: Labels of Triton Inference Server's metrics: name -> (meaning, bound). Triton's ``version`` is the model
#: version, normscope's ``model_version``; the recording rules copy it into ``model_version`` to join the two.
TRITON_LABELS: Dict[str, Tuple[str, str]] = {
    "model": ("name of the Triton model (normscope.serving.triton binds it to the wrapper's ``model``)",
              "the models loaded in the server"),
    "version": ("Triton model version (equal to the wrapper's ``model_version``)", "the versions loaded"),
    "reason": ("why Triton failed a request: " + ", ".join(TRITON_FAILURE_REASONS) + " (BACKEND: the model's "
               "infer function raised, i.e. every failure normscope's wrapper counts)",
               str(len(TRITON_FAILURE_REASONS))),
}


@dataclass(frozen=True)
class Metric:
    """One exported metric.

    Attributes:
        name: the name as exposed to Prometheus (counters end in ``_total``; a histogram's name is the
            base of its ``_bucket`` / ``_sum`` / ``_count`` series). ``prometheus_client`` appends
            ``_total`` itself: construct a ``Counter`` with the name without it.
        type: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        labels: label names, in order.
        unit: unit of the value (base units: seconds, bytes; counts name what they count).
        help: the HELP text.
        source: ``"monitor"``, ``"serving"`` or ``"process"`` (see :data:`SOURCES`).
        buckets: upper bounds of a histogram's buckets (``+Inf`` implied); empty for other types.
        label_values: for labels with a fixed value set, ``((label, (value, ...)), ...)``.
    """

    name: str
    type: str
    labels: Tuple[str, ...]
    unit: str
    help: str
    source: str
    buckets: Tuple[float, ...] = ()
    label_values: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"Expected name to be a valid Prometheus metric name, but got {self.name!r}")
        if self.type not in METRIC_TYPES:
            raise ValueError(f"Expected type to be one of {METRIC_TYPES}, but got {self.type!r}")
        if self.source not in SOURCES:
            raise ValueError(f"Expected source to be one of {SOURCES}, but got {self.source!r}")
        triton = self.source == "triton"
        if triton and not self.name.startswith("nv_"):
            raise ValueError(f"Expected the name of a triton metric to start with 'nv_', but got {self.name!r}")
        if self.source not in ("process", "triton") and not self.name.startswith("normscope_"):
            raise ValueError(f"Expected the name of a {self.source} metric to start with 'normscope_', "
                             f"but got {self.name!r}")
        if not triton and (self.type == "counter") != self.name.endswith("_total"):  # Triton's lack _total
            raise ValueError(f"Expected a name ending in '_total' exactly for counters, but got {self.type} "
                             f"{self.name!r}")
        if not triton and self.name.endswith(_RESERVED_SUFFIXES):  # Triton's nv_inference_count is a counter
            raise ValueError(f"Expected a name without a reserved suffix {_RESERVED_SUFFIXES}, but got {self.name!r}")
        if not isinstance(self.labels, tuple) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"Expected labels to be a tuple of distinct names, but got {self.labels!r}")
        known = TRITON_LABELS if triton else LABELS
        unknown = [lb for lb in self.labels if lb not in known]
        if unknown:
            raise ValueError(f"Expected labels from {sorted(known)}, but got {unknown} in {self.name!r}")
        if "le" in self.labels or "quantile" in self.labels:
            raise ValueError(f"Expected no reserved label (le, quantile), but got {self.labels!r}")
        if (self.type == "histogram") != bool(self.buckets):
            raise ValueError(f"Expected buckets exactly for histograms, but got {self.type} {self.name!r} with "
                             f"buckets={self.buckets!r}")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"Expected strictly increasing buckets, but got {self.buckets!r}")
        for label, values in self.label_values:
            if label not in self.labels:
                raise ValueError(f"Expected label_values only for labels of {self.name!r} {self.labels}, "
                                 f"but got {label!r}")
            if not values or len(set(values)) != len(values):
                raise ValueError(f"Expected distinct values for label {label!r}, but got {values!r}")

    def values_of(self, label: str) -> Optional[Tuple[str, ...]]:
        """The fixed value set of ``label``, or None when the label's values are not a fixed set."""
        if label not in self.labels:
            raise KeyError(f"Expected a label of {self.name} {self.labels}, but got {label!r}")
        return dict(self.label_values).get(label)


def _monitor_metrics() -> Tuple[Metric, ...]:
    """The ``PrometheusSink``'s metrics, from its own tables (names, types, labels, help, stat values)."""
    units = {
        "normscope_input_variance": "(input units)^2",
        "normscope_input_mean": "input units",
        "normscope_output": "output units",
        "normscope_weight_drift": "parameter units",
        "normscope_bias_drift": "parameter units",
        "normscope_grad_input_norm": "gradient units",
        "normscope_grad_param_norm": "gradient units",
        "normscope_last_step": "steps",
        "normscope_calls_total": "calls",
        "normscope_rows_sampled_total": "rows",
        "normscope_eps_dominated_rows_total": "rows",
        "normscope_nonfinite_elements_total": "elements",
        "normscope_findings_total": "findings",
    }
    helps: Dict[str, str] = {f"normscope_{n}": h for n, (h, _) in _GAUGES.items()}
    helps.update({f"normscope_{n}_total": h for n, (h, _) in _COUNTERS.items()})
    helps["normscope_last_step"] = "Last step of the layer's most recently flushed window"
    helps["normscope_findings_total"] = "Findings recorded by the monitor, by kind and severity"
    stats: Dict[str, Tuple[str, ...]] = {f"normscope_{n}": tuple(f) for n, (_, f) in _GAUGES.items()}
    stats.update({f"normscope_{n}_total": tuple(f) for n, (_, f) in _COUNTERS.items() if None not in f})
    out = []
    for name, (kind, labels) in PROMETHEUS_METRICS.items():
        values = []
        if "stat" in labels:
            values.append(("stat", stats[name]))
        if name == "normscope_findings_total":
            values += [("kind", tuple(FINDING_KINDS)), ("severity", tuple(SEVERITIES))]
        out.append(Metric(name, kind, tuple(labels), units[name], helps[name], "monitor",
                          label_values=tuple(values)))
    return tuple(out)


_MV = ("model", "model_version")

_SERVING = (
    Metric("normscope_inference_request_duration_seconds", "histogram", _MV, "seconds",
           "Wall time of one call of the wrapped inference callable, input validation and output checks included",
           "serving", buckets=LATENCY_BUCKETS_SECONDS),
    Metric("normscope_inference_requests_total", "counter", _MV, "requests",
           "Calls of the wrapped inference callable, failed ones included", "serving"),
    Metric("normscope_inference_failures_total", "counter", _MV + ("reason",), "requests",
           "Calls that failed: bad_input (rejected before the model ran), nonfinite_output (NaN/Inf in the "
           "output), exception (the model raised)", "serving", label_values=(("reason", FAILURE_REASONS),)),
    Metric("normscope_inference_batch_size", "histogram", _MV, "items",
           "Items (rows of the batch dimension) per call of the wrapped inference callable", "serving",
           buckets=BATCH_SIZE_BUCKETS),
    Metric("normscope_output_nonfinite_total", "counter", _MV, "elements",
           "NaN and Inf elements in the outputs of the wrapped inference callable", "serving"),
    Metric("normscope_prediction_drift", "gauge", _MV + ("metric", "statistic"), "1",
           "Distance between the distribution of an output column over the sliding window and the model "
           "version's baseline: psi (population stability index) or js (Jensen-Shannon distance, natural log)",
           "serving", label_values=(("metric", DRIFT_METRICS),)),
    Metric("normscope_prediction_drift_share", "gauge", _MV, "ratio",
           "Share of the output's feature columns whose PSI over the sliding window is at least 0.1 "
           "(normscope.drift DriftReport.share_drifted; dataset drift from 0.5)", "serving"),
    Metric("normscope_prediction_drift_window_samples", "gauge", _MV, "predictions",
           "Predictions in the sliding window that normscope_prediction_drift was computed on", "serving"),
    Metric("normscope_layer_param_drift", "gauge", _MV + ("layer", "param", "stat"), "parameter units",
           "Distance of a norm layer's gamma (weight) or beta (bias) in the served model from the model "
           "version's reference parameters (the unquantized training checkpoint), computed at load", "serving",
           label_values=(("param", ("weight", "bias")), ("stat", _DRIFT_STATS))),
    Metric("normscope_build_info", "gauge", ("version",) + _MV + ("fingerprint",), "1",
           "Always 1; the labels say which normscope version serves which model version, and the fingerprint of "
           "the normalization config of the model actually loaded", "serving"),
    Metric("normscope_config_mismatch", "gauge", _MV, "1",
           "1 when the fingerprint of the served model's normalization config differs from the one registered with "
           "the model version (its audit), 0 when they agree; absent when no registered config was given", "serving"),
    Metric("normscope_otel_requests_total", "counter", _MV + ("outcome",), "requests",
           "Calls of the wrapped inference callable by outcome (ok or the failure reason), from the OpenTelemetry "
           "instrument normscope.otel.requests (normscope.serving.otel, metrics=True)", "otel",
           label_values=(("outcome", ("ok",) + FAILURE_REASONS),)),
    Metric("normscope_otel_request_duration_seconds", "histogram", _MV + ("outcome",), "seconds",
           "Wall time of one call of the wrapped inference callable by outcome, from the OpenTelemetry instrument "
           "normscope.otel.request.duration", "otel", buckets=LATENCY_BUCKETS_SECONDS,
           label_values=(("outcome", ("ok",) + FAILURE_REASONS),)),
    Metric("process_resident_memory_bytes", "gauge", (), "bytes",
           "Resident memory size of the serving process (prometheus_client's process collector, Linux)", "process"),
    Metric("process_cpu_seconds_total", "counter", (), "seconds",
           "User and system CPU time of the serving process (prometheus_client's process collector, Linux)",
           "process"),
)

#: Every metric normscope exports: the monitor's (``source="monitor"``), then the serving wrapper's (with the
#: OpenTelemetry instruments that ``normscope.serving.otel`` writes into its registry, ``source="otel"``).
METRICS: Tuple[Metric, ...] = _monitor_metrics() + _SERVING

_TV = ("model", "version")
_TRITON_US = "microseconds, summed over successful requests"

#: Triton Inference Server's per-model metrics (on its own ``/metrics``, port 8002 by default) that the recording
#: rules in ``deploy/prometheus`` and the dashboards join with normscope's by model and version
#: (:mod:`normscope.serving.triton`). Not exported by normscope; ``source="triton"``. Triton names its counters
#: without ``_total`` and its durations in microseconds.
TRITON_METRICS: Tuple[Metric, ...] = (
    Metric("nv_inference_request_success", "counter", _TV, "requests",
           "Successful inference requests (Triton)", "triton"),
    Metric("nv_inference_request_failure", "counter", _TV + ("reason",), "requests",
           "Failed inference requests, by reason (Triton); requests Triton rejects before scheduling them (an "
           "unknown input name, a wrong shape) are counted in neither series", "triton",
           label_values=(("reason", TRITON_FAILURE_REASONS),)),
    Metric("nv_inference_count", "counter", _TV, "items",
           "Inferences performed: items of the batch dimension of successful requests (Triton)", "triton"),
    Metric("nv_inference_exec_count", "counter", _TV, "executions",
           "Model executions (batches; several requests per execution with dynamic batching) (Triton)", "triton"),
    Metric("nv_inference_request_duration_us", "counter", _TV, _TRITON_US,
           "End-to-end time of requests inside Triton: queue, input, compute and output (Triton)", "triton"),
    Metric("nv_inference_queue_duration_us", "counter", _TV, _TRITON_US,
           "Time requests waited in the scheduling queue (Triton)", "triton"),
    Metric("nv_inference_compute_input_duration_us", "counter", _TV, _TRITON_US,
           "Time spent handing the inputs to the model (Triton)", "triton"),
    Metric("nv_inference_compute_infer_duration_us", "counter", _TV, _TRITON_US,
           "Time spent executing the model: for PyTriton, the round trip to the infer function that normscope's "
           "wrapper times (Triton)", "triton"),
    Metric("nv_inference_compute_output_duration_us", "counter", _TV, _TRITON_US,
           "Time spent taking the outputs from the model (Triton)", "triton"),
    Metric("nv_inference_pending_request_count", "gauge", _TV, "requests",
           "Requests received and not yet executed (Triton)", "triton"),
)

_BY_NAME = {m.name: m for m in METRICS}
if len(_BY_NAME) != len(METRICS):  # pragma: no cover - a catalogue edit that repeats a name
    raise RuntimeError("normscope.serving.metrics: duplicate metric names in METRICS")


def get_metric(name: str) -> Metric:
    """The catalogue entry named ``name`` (the exposed name: counters with ``_total``).

    Raises:
        KeyError: when no metric has that name.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"Expected the name of a metric in normscope.serving.METRICS, but got {name!r}") from None
