"""Serving: Prometheus metrics for inference services.

:data:`METRICS` is the catalogue of every metric normscope exports (the monitor's and the serving
wrapper's); docs/metrics.md renders it, and the alert rules and dashboards in ``deploy/`` use only its
names. :func:`instrument` (:class:`InstrumentedModel`) wraps an inference callable or ``nn.Module`` and
records the serving metrics (docs/serving.md). :func:`norm_config` / :func:`fingerprint` describe the
normalization config of a model, which the wrapper exports in ``normscope_build_info`` and compares with the
registered one (``normscope_config_mismatch``). ``prometheus_client`` is imported only when a wrapper is built.
"""

from .config import config_differences, config_fingerprint, fingerprint, norm_config
from .metrics import METRICS, Metric
from .wrapper import (
    CONTENT_TYPE_LATEST,
    BadInputError,
    InstrumentedModel,
    MetricsServer,
    NonFiniteOutputError,
    instrument,
    instrumented,
    metrics_text,
    param_drift,
    start_http_server,
)

__all__ = [
    "METRICS",
    "Metric",
    "InstrumentedModel",
    "instrument",
    "instrumented",
    "BadInputError",
    "NonFiniteOutputError",
    "MetricsServer",
    "metrics_text",
    "start_http_server",
    "param_drift",
    "CONTENT_TYPE_LATEST",
    "norm_config",
    "config_fingerprint",
    "fingerprint",
    "config_differences",
]
