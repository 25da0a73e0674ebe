"""Serving: Prometheus metrics for inference services.

:data:`METRICS` is the catalogue of every metric normscope exports (the monitor's and the serving
wrapper's); docs/metrics.md renders it, and the alert rules and dashboards in ``deploy/`` use only its
names.
"""

from .metrics import METRICS, Metric

__all__ = ["METRICS", "Metric"]
