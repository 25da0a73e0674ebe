"""OpenTelemetry for the serving wrapper: a span per request and OTel metrics in the wrapper's registry.

:func:`instrument_otel` hooks an :class:`~normscope.serving.InstrumentedModel`: every call then runs in a
span ``normscope.infer`` carrying the model, its version, the batch size, the drift state, the latency and
the outcome (``ok`` or the failure reason of ``normscope_inference_failures_total``). A failed call sets
the span status to ERROR; a non-finite output adds the event ``normscope.nonfinite_output`` naming, for an
``nn.Module``, the first layer whose output was NaN/Inf. The request counter and latency histogram are
also recorded as OTel metrics and exposed through the wrapper's Prometheus registry by
:class:`PrometheusBridgeReader` (the same ``/metrics`` endpoint), so that any other reader of the meter
provider (OTLP, console) exports them too. See docs/otel.md.

``opentelemetry`` is imported when :func:`instrument_otel` runs, not when this module is imported (install
it with ``pip install 'normscope[otel]'``).
"""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from .metrics import LATENCY_BUCKETS_SECONDS

if TYPE_CHECKING:
    from .wrapper import InstrumentedModel

__all__ = [
    "OTEL_HINT",
    "SPAN_NAME",
    "OTEL_METRICS",
    "OtelInstrumentation",
    "PrometheusBridgeReader",
    "instrument_otel",
    "locate_nonfinite",
    "prometheus_name",
]

OTEL_HINT = "pip install 'normscope[otel]'"

#: Name of the span of one call of the wrapper.
SPAN_NAME = "normscope.infer"

#: The OTel instruments (name, kind, unit) and their names in the Prometheus text format.
OTEL_METRICS: Dict[str, Tuple[str, str, str]] = {
    "normscope.otel.requests": ("counter", "{request}", "normscope_otel_requests_total"),
    "normscope.otel.request.duration": ("histogram", "s", "normscope_otel_request_duration_seconds"),
}


def _otel():
    try:
        from opentelemetry import trace
        from opentelemetry.sdk import metrics as sdk_metrics
    except ImportError as e:
        raise ImportError(f"normscope.serving.otel needs opentelemetry-sdk: {OTEL_HINT}") from e
    return trace, sdk_metrics


# ----------------------------------------------------------------------------------------------
# metrics: an OTel MetricReader whose collection is driven by Prometheus scrapes
# ----------------------------------------------------------------------------------------------

_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}


def prometheus_name(name: str, unit: str, monotonic_sum: bool) -> str:
    """The Prometheus name of an OTel instrument: dots to underscores, the unit appended (annotations such as
    ``{request}`` dropped), ``_total`` for a monotonic sum."""
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    u = _UNITS.get(unit, "" if unit.startswith("{") else re.sub(r"[^a-zA-Z0-9_]", "_", unit))
    if u and not base.endswith("_" + u):
        base = f"{base}_{u}"
    if monotonic_sum and not base.endswith("_total"):
        base += "_total"
    return base


class _Collector:
    """A ``prometheus_client`` collector that collects the reader on each scrape and translates the result."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def describe(self) -> list:  # no fixed names: registering never clashes with the catalogue's collectors
        return []

    def collect(self) -> list:
        return self._reader._families()


def _reader_base():
    _, sdk_metrics = _otel()
    from opentelemetry.sdk.metrics.export import MetricReader

    return sdk_metrics, MetricReader


class PrometheusBridgeReader:
    """An OTel ``MetricReader`` that exposes a meter provider's metrics in a ``prometheus_client`` registry.

    On each scrape of ``registry`` (``/metrics``, ``generate_latest``) it collects the meter provider and
    translates counters, up-down counters, gauges and histograms (cumulative) into metric families: names as
    :func:`prometheus_name`, attributes as labels. Pass it to ``MeterProvider(metric_readers=[...])``;
    ``shutdown()`` unregisters it.

    ``PrometheusBridgeReader(registry)`` returns an instance of a subclass of both this class and the SDK's
    ``MetricReader``, made when first used (so that ``opentelemetry`` is imported lazily).
    """

    _cls = None

    def __new__(cls, registry: Any) -> Any:
        if cls._cls is None:
            cls._cls = _make_reader_class()
        return cls._cls(registry)


def _make_reader_class():
    sdk_metrics, MetricReader = _reader_base()
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Histogram, Sum

    cumulative = {k: AggregationTemporality.CUMULATIVE for k in (
        sdk_metrics.Counter, sdk_metrics.UpDownCounter, sdk_metrics.Histogram, sdk_metrics.ObservableCounter,
        sdk_metrics.ObservableUpDownCounter, sdk_metrics.ObservableGauge)}

    class _PrometheusBridgeReader(MetricReader, PrometheusBridgeReader):
        __doc__ = PrometheusBridgeReader.__doc__

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return object.__new__(cls)

        def __init__(self, registry):
            if "_collector" in self.__dict__:  # PrometheusBridgeReader(registry) initialises it twice
                return
            super().__init__(preferred_temporality=cumulative)
            self.registry = registry
            self._lock = threading.Lock()
            self._latest = None
            self._collector = _Collector(self)
            registry.register(self._collector)

        def _receive_metrics(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> None:
            self._latest = metrics_data

        def _families(self):
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

            if getattr(self, "_collect", None) is None:  # not attached to a meter provider (yet)
                return []
            with self._lock:
                self._latest = None
                self.collect()
                data = self._latest
            if data is None:
                return []
            fams: Dict[str, Any] = {}
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        d = metric.data
                        monotonic = isinstance(d, Sum) and d.is_monotonic
                        name = prometheus_name(metric.name, metric.unit or "", monotonic)
                        help_ = metric.description or metric.name
                        for p in d.data_points:
                            attrs = {re.sub(r"[^a-zA-Z0-9_]", "_", str(k)): str(v)
                                     for k, v in sorted(p.attributes.items())}
                            keys = list(attrs)
                            if isinstance(d, Histogram):
                                fam = fams.setdefault((name, tuple(keys)), HistogramMetricFamily(
                                    name, help_, labels=keys))
                                acc, buckets = 0, []
                                for bound, n in zip(list(p.explicit_bounds) + [float("inf")], p.bucket_counts):
                                    acc += n
                                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
                                fam.add_metric(list(attrs.values()), buckets, p.sum)
                            elif monotonic:
                                fam = fams.setdefault((name, tuple(keys)), CounterMetricFamily(
                                    name[: -len("_total")], help_, labels=keys))
                                fam.add_metric(list(attrs.values()), p.value)
                            elif isinstance(d, (Sum, Gauge)):
                                fam = fams.setdefault((name, tuple(keys)), GaugeMetricFamily(name, help_, labels=keys))
                                fam.add_metric(list(attrs.values()), p.value)
            return list(fams.values())

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            try:
                self.registry.unregister(self._collector)
            except KeyError:
                pass

    return _PrometheusBridgeReader


# ----------------------------------------------------------------------------------------------
# the layer that produced a non-finite output
# ----------------------------------------------------------------------------------------------

def _has_nonfinite(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return any(_has_nonfinite(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return any(_has_nonfinite(v) for v in x)
    return False


def locate_nonfinite(module: torch.nn.Module, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[str]:
    """The qualified name of the first leaf module that turned finite inputs into a NaN/Inf output.

    Runs ``module(*args, **kwargs)`` once more under ``torch.inference_mode()`` with forward hooks on its
    leaf modules (calls of the module from other threads are not looked at). Returns ``"<input>"`` when
    the inputs themselves hold NaN/Inf, and None when no leaf module did it (the non-finite values come
    from an operation outside any leaf module) or the run raised.
    """
    kwargs = kwargs or {}
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"Expected module to be a torch.nn.Module, but got {type(module).__name__}")
    if _has_nonfinite(args) or _has_nonfinite(kwargs):
        return "<input>"
    me = threading.get_ident()
    found: List[str] = []
    handles = []

    def hook(name):
        def fn(mod, inputs, output):
            if found or threading.get_ident() != me:
                return
            if _has_nonfinite(output) and not _has_nonfinite(inputs):
                found.append(name)
        return fn

    try:
        for name, sub in module.named_modules():
            if name and next(sub.children(), None) is None:
                handles.append(sub.register_forward_hook(hook(name)))
        with torch.inference_mode():
            module(*args, **kwargs)
    except Exception:
        return found[0] if found else None
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------
# the instrumentation
# ----------------------------------------------------------------------------------------------


class OtelInstrumentation:
    """The OTel instrumentation of one :class:`~normscope.serving.InstrumentedModel` (see :func:`instrument_otel`).

    Attributes:
        wrapped: the instrumented wrapper.
        tracer: the ``opentelemetry.trace.Tracer`` of the spans.
        meter_provider: the meter provider of the metrics (None with ``metrics=False``).
        reader: the :class:`PrometheusBridgeReader` made for the wrapper's registry; None when a
            ``meter_provider`` was given or with ``metrics=False``.
    """

    def __init__(self, wrapped: "InstrumentedModel", tracer: Any, meter_provider: Any, reader: Any,
                 owns_provider: bool, locate: bool) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from .wrapper import BadInputError, NonFiniteOutputError

        self.wrapped = wrapped
        self.tracer = tracer
        self.meter_provider = meter_provider
        self.reader = reader
        self._owns_provider = owns_provider
        self._locate = bool(locate) and isinstance(wrapped.fn, torch.nn.Module)
        self._kind = SpanKind.INTERNAL
        self._status, self._code = Status, StatusCode
        self._errors = (BadInputError, NonFiniteOutputError)
        self._requests = self._duration = None
        if meter_provider is not None:
            from normscope import __version__

            meter = meter_provider.get_meter("normscope.serving", __version__)
            self._requests = meter.create_counter(
                "normscope.otel.requests", unit="{request}",
                description="Calls of the wrapped inference callable by outcome (ok or the failure reason)")
            self._duration = meter.create_histogram(
                "normscope.otel.request.duration", unit="s",
                description="Wall time of one call of the wrapped inference callable, by outcome",
                explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_SECONDS))
        self._base = {"normscope.model": wrapped.model, "normscope.model_version": wrapped.model_version,
                      "normscope.config.fingerprint": wrapped.fingerprint}
        if wrapped.config_mismatch is not None:
            self._base["normscope.config.mismatch"] = bool(wrapped.config_mismatch)
        self._metric_labels = {o: {"model": wrapped.model, "model_version": wrapped.model_version, "outcome": o}
                               for o in ("ok", "bad_input", "nonfinite_output", "exception")}

    def _drift(self) -> Dict[str, Any]:
        w = self.wrapped
        if w.baseline is None:
            return {"normscope.drift.state": "off"}
        report = w.last_drift_report
        if report is None:
            return {"normscope.drift.state": "warming_up"}
        return {"normscope.drift.state": "drifted" if report.drifted else "ok",
                "normscope.drift.share": float(report.share_drifted),
                "normscope.drift.window_samples": int(report.n_current)}

    def _model_inputs(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        pre = self.wrapped._preprocess
        if pre is None:
            return args, kwargs
        x = pre(*args, **kwargs)
        if isinstance(x, dict):
            return (), dict(x)
        if isinstance(x, tuple):
            return x, {}
        return (x,), {}

    def _layer(self, args: tuple, kwargs: dict) -> Optional[str]:
        w = self.wrapped
        try:
            a, k = self._model_inputs(args, kwargs)
            if w.monitor is not None:
                with w._rw.shared():  # not measured by a sampled monitor step
                    return locate_nonfinite(w.fn, a, k)
            return locate_nonfinite(w.fn, a, k)
        except Exception:
            return None

    def __call__(self, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        w = self.wrapped
        with self.tracer.start_as_current_span(SPAN_NAME, kind=self._kind, attributes=self._base,
                                               record_exception=False, set_status_on_exception=False) as span:
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                out = call(*args, **kwargs)
            except BaseException as e:
                outcome = "exception"
                for cls, reason in zip(self._errors, ("bad_input", "nonfinite_output")):
                    if isinstance(e, cls):
                        outcome = reason
                if outcome == "nonfinite_output":
                    event = {"normscope.nonfinite.count": int(getattr(e, "count", None) or 0)}
                    if getattr(e, "shape", None) is not None:
                        event["normscope.nonfinite.shape"] = [int(n) for n in e.shape]
                    layer = self._layer(args, kwargs) if self._locate else None
                    if layer is not None:
                        event["normscope.nonfinite.layer"] = layer
                        span.set_attribute("normscope.nonfinite.layer", layer)
                    span.add_event("normscope.nonfinite_output", event)
                elif isinstance(e, Exception):
                    span.record_exception(e)
                span.set_attribute("error.type", outcome)
                span.set_status(self._status(self._code.ERROR, f"{outcome}: {e}"))
                raise
            finally:
                dt = time.perf_counter() - t0
                attrs = self._drift()
                attrs["normscope.latency_seconds"] = dt
                attrs["normscope.outcome"] = outcome
                bs = w._batch_size(args, kwargs)
                if bs is not None:
                    attrs["normscope.batch_size"] = bs
                span.set_attributes(attrs)
                if self._requests is not None:
                    labels = self._metric_labels[outcome]
                    self._requests.add(1, labels)
                    self._duration.record(dt, labels)
            return out

    def uninstrument(self) -> None:
        """Remove the hook from the wrapper and shut down the meter provider made for it. Idempotent."""
        if self.wrapped._call_hook is self:
            self.wrapped._call_hook = None
        if self._owns_provider and self.meter_provider is not None:
            self.meter_provider.shutdown()
            self._owns_provider = False

    def __enter__(self) -> "OtelInstrumentation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstrument()

    def __repr__(self) -> str:
        return (f"OtelInstrumentation(model={self.wrapped.model!r}, model_version={self.wrapped.model_version!r}, "
                f"metrics={'on' if self.meter_provider is not None else 'off'})")


def instrument_otel(wrapped: "InstrumentedModel", *, tracer_provider: Any = None, meter_provider: Any = None,
                    metrics: bool = True, locate_nonfinite_layer: bool = True) -> OtelInstrumentation:
    """Trace every call of ``wrapped`` with OpenTelemetry and record OTel request metrics.

    Args:
        wrapped: an :class:`~normscope.serving.InstrumentedModel` (not yet instrumented).
        tracer_provider: the ``TracerProvider`` of the spans. Default: the global one
            (``opentelemetry.trace.get_tracer_provider()``).
        meter_provider: the ``MeterProvider`` of the metrics; give it a :class:`PrometheusBridgeReader` of
            ``wrapped.registry`` for them to appear on ``/metrics``. Default: a new one whose only reader is a
            :class:`PrometheusBridgeReader` of ``wrapped.registry`` (shut down by ``uninstrument()``).
        metrics: record the metrics ``normscope.otel.requests`` and ``normscope.otel.request.duration``
            (attributes model, model_version, outcome). Default: True.
        locate_nonfinite_layer: for an ``nn.Module``, when an output is NaN/Inf, run the failed input once more
            with forward hooks to name the first layer that produced it (:func:`locate_nonfinite`; one extra
            forward pass per such failure, none otherwise). Default: True.

    Returns:
        an :class:`OtelInstrumentation`; ``uninstrument()`` removes it.

    Raises:
        ImportError: ``opentelemetry-sdk`` is not installed.
        TypeError: ``wrapped`` is not an InstrumentedModel.
        ValueError: ``wrapped`` is already instrumented.

    Example::

        >>> wrapped = normscope.serving.instrument(model, model="minilm", model_version="3")
        >>> otel = instrument_otel(wrapped)             # spans to the global tracer provider
        >>> server = wrapped.start_http_server(9108)    # normscope_otel_* next to the catalogue's metrics
    """
    trace, sdk_metrics = _otel()
    from .wrapper import InstrumentedModel

    if not isinstance(wrapped, InstrumentedModel):
        raise TypeError(f"Expected wrapped to be a normscope.serving.InstrumentedModel, but got "
                        f"{type(wrapped).__name__}")
    if wrapped._call_hook is not None:
        raise ValueError(f"Expected a wrapper without OTel instrumentation, but got one already instrumented "
                         f"({wrapped._call_hook!r}); call uninstrument() first")
    from normscope import __version__

    tp = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = tp.get_tracer("normscope.serving", __version__)
    reader, owns = None, False
    if metrics and meter_provider is None:
        reader = PrometheusBridgeReader(wrapped.registry)
        meter_provider, owns = sdk_metrics.MeterProvider(metric_readers=[reader]), True
    inst = OtelInstrumentation(wrapped, tracer, meter_provider if metrics else None, reader, owns,
                               locate_nonfinite_layer)
    wrapped._call_hook = inst
    return inst
