"""A :class:`~normscope.monitor.Sink` that exports the monitor's records as Prometheus metrics.

``prometheus_client`` is imported when a :class:`PrometheusSink` is constructed, not when normscope is
imported (install it with ``pip install 'normscope[monitor]'``). Every metric is documented in
docs/monitor.md ("Prometheus").
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence, Tuple

from normscope.monitor.findings import FINDING_KINDS, SEVERITIES
from normscope.monitor.sinks import Sink

__all__ = ["PrometheusSink", "PROMETHEUS_METRICS"]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

#: Gauges fed from ``layer_stats`` records: name (without prefix) -> (help, {stat label: record field}).
_GAUGES: Dict[str, Tuple[str, Dict[str, str]]] = {
    "input_variance": (
        "Per-row input variance (mean square for rms_norm) of the layer over the last flushed window",
        {"mean": "var_mean", "min": "var_min", "max": "var_max", "p50": "var_p50", "p90": "var_p90",
         "p99": "var_p99"}),
    "input_mean": (
        "Per-row input mean of the layer over the last flushed window: mean, min and max over rows",
        {"mean": "in_mean", "min": "in_row_mean_min", "max": "in_row_mean_max"}),
    "output": (
        "Mean and standard deviation of the finite output elements of the layer over the last flushed window",
        {"mean": "out_mean", "std": "out_std"}),
    "weight_drift": (
        "Distance of gamma (weight) from the reference taken when the monitor was built, at the last flush",
        {"l2": "weight_drift_l2", "max_abs": "weight_drift_max", "rms": "weight_drift_rms"}),
    "bias_drift": (
        "Distance of beta (bias) from the reference taken when the monitor was built, at the last flush",
        {"l2": "bias_drift_l2", "max_abs": "bias_drift_max", "rms": "bias_drift_rms"}),
    "grad_input_norm": (
        "L2 norm of the gradient w.r.t. the layer's input (through the layer), per step: mean, min, max over "
        "the steps of the last flushed window",
        {"mean": "grad_input_norm", "min": "grad_input_norm_min", "max": "grad_input_norm_max"}),
    "grad_param_norm": (
        "L2 norm of the layer's parameter gradients (weight and bias together), per step: mean, min, max over "
        "the steps of the last flushed window",
        {"mean": "grad_param_norm", "min": "grad_param_norm_min", "max": "grad_param_norm_max"}),
}

#: Counters fed from ``layer_stats`` records: name (without prefix and ``_total``) -> (help, {stat: field}).
#: A ``None`` stat means the counter has the ``layer`` label only.
_COUNTERS: Dict[str, Tuple[str, Dict[Optional[str], str]]] = {
    "calls": ("Forward calls of the layer measured by the monitor (sampled steps only)", {None: "calls"}),
    "rows_sampled": ("Rows whose statistics were computed (row_fraction of the rows of measured calls)",
                     {None: "rows_sampled"}),
    "eps_dominated_rows": ("Sampled rows whose variance was below eps_factor * eps (eps-dominated)",
                           {None: "eps_rows"}),
    "nonfinite_elements": ("NaN and Inf elements in the layer's input and output (all rows of measured calls)",
                           {"input_nan": "nan_in", "input_inf": "inf_in", "output_nan": "nan_out",
                            "output_inf": "inf_out"}),
}

#: Every metric the sink exports (with the default prefix): name -> (type, labels).
PROMETHEUS_METRICS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    **{f"normscope_{n}": ("gauge", ("layer", "stat")) for n in _GAUGES},
    "normscope_last_step": ("gauge", ("layer",)),
    **{f"normscope_{n}_total": ("counter", ("layer", "stat") if None not in f else ("layer",))
       for n, (_, f) in _COUNTERS.items()},
    "normscope_findings_total": ("counter", ("kind", "severity")),
}


def _number(v) -> Optional[float]:
    """``v`` as a float, or None when the record has no value (None, a string, a list)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class PrometheusSink(Sink):
    """Exports the monitor's records as Prometheus metrics (requires ``prometheus_client``).

    Each flush sets per-layer gauges to the statistics of the window just flushed and increases
    counters by the window's counts; each finding increases ``<prefix>_findings_total{kind, severity}``.
    Metrics use the labels ``layer`` (the layer's qualified name) and ``stat`` (from a fixed set per
    metric), so the number of series is bounded by the number of monitored layers. Values are in
    base units (variance and norms in the units of the tensors; counts). See docs/monitor.md for the
    list of metrics.

    The metrics live in :attr:`registry`: a private ``CollectorRegistry`` unless one is given (pass
    ``prometheus_client.REGISTRY`` to export through an endpoint your process already serves).
    With ``port``, the sink also serves ``registry`` at ``http://addr:port/metrics`` (``port=0``: an
    ephemeral port, see :attr:`port`). The server starts in the constructor; if it cannot (the port
    is taken), the error is kept and raised by the first :meth:`write`, so the monitor reports it
    once with a ``RuntimeWarning`` and disables the sink while training carries on.

    Args:
        port: serve the metrics over HTTP on this port; None (the default) to serve nothing.
        addr: the address to listen on. Default: ``"127.0.0.1"`` (this machine only; ``"0.0.0.0"``
            to accept scrapes from the network).
        registry: the ``prometheus_client.CollectorRegistry`` to register the metrics in. Default: a
            new private one.
        prefix: the namespace of every metric name. Default: ``"normscope"``.

    Example::

        >>> sink = normscope.monitor.PrometheusSink(port=9108)
        >>> mon = normscope.Monitor(model, sinks=[sink], flush_every=50)
    """

    def __init__(self, port: Optional[int] = None, *, addr: str = "127.0.0.1", registry=None,
                 prefix: str = "normscope"):
        try:
            import prometheus_client
        except ImportError as e:
            raise ImportError("normscope.monitor.PrometheusSink requires prometheus_client: "
                              "pip install 'normscope[monitor]'") from e
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
            raise ValueError(f"Expected port to be None or an int in [0, 65535], but got {port!r}")
        if not isinstance(addr, str):
            raise TypeError(f"Expected addr to be a str, but got {type(addr).__name__}")
        if not isinstance(prefix, str) or not _NAME_RE.match(prefix.rstrip("_") or "-"):
            raise ValueError(f"Expected prefix to be a valid Prometheus metric name prefix, but got {prefix!r}")
        prefix = prefix.rstrip("_")
        if registry is None:
            registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.prefix = prefix
        self.addr = addr
        self.port: Optional[int] = None  # the bound port once serving
        self._requested_port = port
        self._server = None
        self._thread = None
        self._start_error: Optional[BaseException] = None

        Gauge, Counter = prometheus_client.Gauge, prometheus_client.Counter
        self._gauges = {n: Gauge(f"{prefix}_{n}", h, ["layer", "stat"], registry=registry)
                        for n, (h, _) in _GAUGES.items()}
        self._last_step = Gauge(f"{prefix}_last_step", "Last step of the layer's most recently flushed window",
                                ["layer"], registry=registry)
        self._counters = {n: Counter(f"{prefix}_{n}", h, ["layer"] if None in f else ["layer", "stat"],
                                     registry=registry)
                          for n, (h, f) in _COUNTERS.items()}
        self._findings = Counter(f"{prefix}_findings", "Findings recorded by the monitor, by kind and severity",
                                 ["kind", "severity"], registry=registry)
        for kind in FINDING_KINDS:  # every series from the start, so that increase() sees the first finding
            for severity in SEVERITIES:
                self._findings.labels(kind, severity)
        self._set_gauges: set = set()  # (metric, layer, stat) already exported

        if port is not None:
            try:
                started = prometheus_client.start_http_server(port, addr=addr, registry=registry)
            except OSError as e:  # reported by the first write(), through the monitor's fail-soft path
                self._start_error = e
            else:
                if isinstance(started, tuple):  # prometheus_client >= 0.17 returns (server, thread)
                    self._server, self._thread = started
                    self.port = int(self._server.server_address[1])
                else:
                    self.port = port

    def write(self, records: Sequence[dict]) -> None:
        if self._start_error is not None:
            e = self._start_error
            raise OSError(f"could not serve Prometheus metrics on {self.addr}:{self._requested_port} "
                          f"({type(e).__name__}: {e}); is the port taken?") from e
        for r in records:
            t = r.get("type")
            if t == "run":
                for layer in r.get("layers", []):
                    self._init_layer(str(layer))
            elif t == "layer_stats":
                self._layer_stats(r)
            elif t == "finding":
                kind, severity = str(r.get("kind")), str(r.get("severity"))
                if kind in FINDING_KINDS and severity in SEVERITIES:  # keep the label sets bounded
                    self._findings.labels(kind, severity).inc()

    def _init_layer(self, layer: str) -> None:
        for name, (_, fields) in _COUNTERS.items():
            for stat in fields:
                c = self._counters[name]
                c.labels(layer) if stat is None else c.labels(layer, stat)

    def _layer_stats(self, r: dict) -> None:
        layer = str(r.get("layer"))
        for name, (_, fields) in _GAUGES.items():
            g = self._gauges[name]
            for stat, field in fields.items():
                v = _number(r.get(field))
                key = (name, layer, stat)
                if v is None:
                    # No value in this window (no gradient, no bias): NaN if the series exists, so that
                    # it does not keep a stale value; else leave it absent.
                    if key in self._set_gauges:
                        g.labels(layer, stat).set(math.nan)
                    continue
                g.labels(layer, stat).set(v)
                self._set_gauges.add(key)
        step = _number(r.get("step"))
        if step is not None:
            self._last_step.labels(layer).set(step)
        for name, (_, fields) in _COUNTERS.items():
            c = self._counters[name]
            for stat, field in fields.items():
                v = _number(r.get(field))
                if v is None or not v >= 0 or math.isinf(v):
                    continue
                (c.labels(layer) if stat is None else c.labels(layer, stat)).inc(v)

    def close(self) -> None:
        """Stop the HTTP server, if one runs. The metrics stay in :attr:`registry`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __repr__(self) -> str:
        where = f"port={self._requested_port!r}, addr={self.addr!r}" if self._requested_port is not None else ""
        return f"PrometheusSink({where})"
