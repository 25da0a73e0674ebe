"""Live inference telemetry: :class:`InstrumentedModel` wraps any inference callable or ``nn.Module``.

The wrapper records exactly the serving metrics of the catalogue (:mod:`normscope.serving.metrics`,
docs/metrics.md) with ``prometheus_client``: latency and batch-size histograms, requests and failures by
reason, non-finite output elements, prediction drift against a :class:`normscope.drift.Baseline`, the
distance of each norm layer's gamma/beta from a reference checkpoint, ``normscope_build_info`` and the
process collector. For an ``nn.Module`` it can also sample the per-layer statistics of
:class:`normscope.Monitor` into the same registry. See docs/serving.md.

``prometheus_client`` is imported when a wrapper is built, not when this module is imported (install it
with ``pip install 'normscope[monitor]'``).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .metrics import FAILURE_REASONS, MAX_DRIFT_STATISTICS, METRICS

__all__ = [
    "InstrumentedModel",
    "instrument",
    "instrumented",
    "BadInputError",
    "NonFiniteOutputError",
    "metrics_text",
    "start_http_server",
    "CONTENT_TYPE_LATEST",
    "MONITOR_HINT",
    "MetricsServer",
    "param_drift",
]

MONITOR_HINT = "pip install 'normscope[monitor]'"

#: The Content-Type of :func:`metrics_text` (Prometheus text format 0.0.4), for frameworks that serve it.
CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


class BadInputError(ValueError):
    """The input of an instrumented call was rejected before the model ran (reason ``bad_input``).

    Raised by the wrapper when the ``validate`` or ``preprocess`` function raises ``ValueError`` or
    ``TypeError`` (the original error is the ``__cause__``); the wrapped callable may raise it itself.
    """


class NonFiniteOutputError(RuntimeError):
    """The output of an instrumented call held NaN or Inf (reason ``nonfinite_output``); it was not returned.

    Raised by the wrapper with ``count`` (NaN/Inf elements) and ``shape`` (of the checked output) set.
    """

    count: Optional[int] = None
    shape: Optional[list] = None


def _prometheus():
    try:
        import prometheus_client
    except ImportError as e:
        raise ImportError(f"normscope.serving needs prometheus_client: {MONITOR_HINT}") from e
    return prometheus_client


def metrics_text(registry) -> bytes:
    """The metrics of ``registry`` in the Prometheus text format (``prometheus_client.generate_latest``).

    Serve it with the Content-Type :data:`CONTENT_TYPE_LATEST` from your framework's own route
    (FastAPI, Flask, TorchServe); :meth:`InstrumentedModel.metrics_text` does the same for a wrapper.
    """
    return _prometheus().generate_latest(registry)


class MetricsServer:
    """A running ``/metrics`` endpoint (see :func:`start_http_server`): ``addr``, ``port``, ``close()``."""

    def __init__(self, server, thread, addr: str):
        self._server = server
        self._thread = thread
        self.addr = addr
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsServer({self.url})"


def start_http_server(registry, port: int = 0, *, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Args:
        registry: a ``prometheus_client.CollectorRegistry`` (e.g. ``wrapped.registry``).
        port: TCP port; 0 picks a free one (then in the result's ``port``). Default: 0.
        addr: address to bind. Default: ``"127.0.0.1"`` (this machine only); ``"0.0.0.0"`` to let a
            Prometheus on another host scrape it.

    Returns:
        a :class:`MetricsServer`; ``close()`` stops it.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"Expected port to be an int in [0, 65535], but got {port!r}")
    server, thread = _prometheus().start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (so it is never starved)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _first_tensor(out: Any) -> Any:
    """The first tensor or ndarray in ``out`` (itself, or depth-first through tuples, lists and dicts)."""
    if isinstance(out, torch.Tensor) or _is_ndarray(out):
        return out
    if isinstance(out, Mapping):
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    else:
        return None
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _is_ndarray(x: Any) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _default_batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """Rows of the first argument: a tensor's or ndarray's first dimension, a list's length, or those of the
    first tensor in a mapping; None when none of these applies."""
    x = args[0] if args else (next(iter(kwargs.values())) if kwargs else None)
    if isinstance(x, Mapping):
        x = _first_tensor(x)
    if isinstance(x, torch.Tensor) or _is_ndarray(x):
        return int(x.shape[0]) if x.ndim >= 1 else 1
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def _nonfinite_count(pred: Any) -> int:
    """NaN and Inf elements of a tensor or ndarray (0 for integer dtypes)."""
    if isinstance(pred, torch.Tensor):
        if not (pred.is_floating_point() or pred.is_complex()):
            return 0
        return int(pred.numel() - torch.isfinite(pred).sum().item())
    if _is_ndarray(pred):
        if pred.dtype.kind not in "fc":
            return 0
        import numpy as np

        return int(pred.size - np.isfinite(pred).sum())
    return 0


def _rows_of(pred: Any) -> Optional[int]:
    if isinstance(pred, torch.Tensor) or _is_ndarray(pred):
        return int(pred.shape[0]) if pred.ndim >= 1 else 1
    return None


def _load_reference(reference: Any) -> Dict[str, torch.Tensor]:
    if isinstance(reference, torch.nn.Module):
        return {k: v.detach() for k, v in reference.state_dict().items()}
    if isinstance(reference, (str, os.PathLike)):
        state = torch.load(os.fspath(reference), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        reference = state
    if not isinstance(reference, Mapping):
        raise TypeError(f"Expected reference to be a state dict, an nn.Module or a path to a saved state dict, "
                        f"but got {type(reference).__name__}")
    return dict(reference)


def param_drift(module: torch.nn.Module, reference: Any) -> Dict[Tuple[str, str], Dict[str, float]]:
    """Distance of each norm layer's gamma/beta in ``module`` from ``reference`` (computed in float64).

    Args:
        module: the served model.
        reference: the version's reference parameters: a state dict, an ``nn.Module`` or the path of a
            ``torch.save``'d state dict (keys as in ``module.state_dict()``).

    Returns:
        ``{(layer, "weight" | "bias"): {"l2": ..., "max_abs": ..., "rms": ...}}`` over the layers that
        :func:`normscope.discovery.find_norm_layers` finds (rms = l2 / sqrt(numel)).

    Raises:
        ValueError: the reference lacks a parameter of a norm layer or holds it with another shape.
    """
    from normscope.discovery import find_norm_layers

    ref = _load_reference(reference)
    out: Dict[Tuple[str, str], Dict[str, float]] = {}
    for layer in find_norm_layers(module):
        for pname in ("weight", "bias"):
            p = getattr(layer.module, pname, None)
            if not isinstance(p, torch.Tensor) or p.numel() == 0:
                continue
            key = f"{layer.name}.{pname}" if layer.name else pname
            if key not in ref:
                raise ValueError(f"Expected the reference to hold {key!r} (a parameter of norm layer "
                                 f"{layer.name!r}), but it has no such key")
            r = torch.as_tensor(ref[key])
            if tuple(r.shape) != tuple(p.shape):
                raise ValueError(f"Expected reference {key!r} of shape {list(p.shape)}, but got {list(r.shape)}")
            with torch.no_grad():
                d = p.detach().to("cpu", torch.float64) - r.detach().to("cpu", torch.float64)
                l2 = float(torch.linalg.vector_norm(d))
                out[(layer.name, pname)] = {"l2": l2, "max_abs": float(d.abs().max()),
                                            "rms": l2 / math.sqrt(d.numel())}
    return out


def _expected_fingerprint(expected: Any) -> Optional[str]:
    """The fingerprint of ``expected_config``: the str itself, or that of a norm_config dict; None for None."""
    if expected is None:
        return None
    if isinstance(expected, str):
        if len(expected) != 16 or any(c not in "0123456789abcdef" for c in expected):
            raise ValueError(f"Expected expected_config to be a fingerprint of 16 lowercase hex digits or a "
                             f"normalization config dict, but got {expected!r}")
        return expected
    if isinstance(expected, Mapping):
        from .config import config_fingerprint

        return config_fingerprint(dict(expected))
    raise TypeError(f"Expected expected_config to be a normalization config dict or its fingerprint (str), but got "
                    f"{type(expected).__name__}")


# Metric objects per registry, shared by the wrappers of one registry (model versions side by side).
_REGISTRY_METRICS: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _serving_metrics(prom, registry) -> Dict[str, Any]:
    with _REGISTRY_LOCK:
        found = _REGISTRY_METRICS.get(registry)
        if found is not None:
            return found
        made: Dict[str, Any] = {}
        for m in METRICS:
            if m.source != "serving":
                continue
            if m.type == "counter":
                made[m.name] = prom.Counter(m.name[: -len("_total")], m.help, m.labels, registry=registry)
            elif m.type == "gauge":
                made[m.name] = prom.Gauge(m.name, m.help, m.labels, registry=registry)
            else:
                made[m.name] = prom.Histogram(m.name, m.help, m.labels, buckets=m.buckets, registry=registry)
        if registry is not prom.REGISTRY:  # the default registry has its own process collector
            try:
                prom.ProcessCollector(registry=registry)
            except ValueError:  # pragma: no cover - someone registered one already
                pass
        _REGISTRY_METRICS[registry] = made
        return made


# ----------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------

class InstrumentedModel:
    """An inference callable or ``nn.Module`` that records the catalogue's serving metrics on every call.

    ``wrapped(*args, **kwargs)`` runs ``validate(*args, **kwargs)`` (if given), then
    ``preprocess(*args, **kwargs)`` (if given; a dict result is passed as keyword arguments, a tuple as
    positional arguments), then the model, then checks its output, and returns the model's output
    unchanged. Each call increments ``normscope_inference_requests_total`` once and observes its wall
    time (everything above included) and batch size; a failed call also increments
    ``normscope_inference_failures_total`` once with one reason and re-raises:

    - ``bad_input``: ``validate`` or ``preprocess`` raised ``ValueError`` / ``TypeError`` (re-raised as
      :class:`BadInputError`, the original as ``__cause__``), or anything raised :class:`BadInputError`;
    - ``nonfinite_output``: the prediction held NaN/Inf; the elements are counted in
      ``normscope_output_nonfinite_total`` and :class:`NonFiniteOutputError` is raised instead of returning;
    - ``exception``: any other exception.

    Drift: successful predictions go to a queue; a background thread moves them into a
    :class:`normscope.drift.DriftWindow` and recomputes the drift gauges every ``drift_every`` new
    predictions or every ``drift_interval`` seconds (when new predictions arrived), so the report
    (about 0.3 s for 384 columns) never runs on a request. :meth:`drift_report` computes it on demand.

    Thread safe: calls may run concurrently from any number of threads; counts are exact.

    Args:
        fn: the inference callable, or an ``nn.Module`` (then the monitor and ``reference`` apply).
        model: value of the ``model`` label (the served model's name).
        model_version: value of the ``model_version`` label.
        registry: the ``prometheus_client.CollectorRegistry`` to register in. Default: a new private one
            (in :attr:`registry`); pass ``prometheus_client.REGISTRY`` to use the process-wide one.
            Wrappers of several model versions may share a registry.
        validate: ``validate(*args, **kwargs)`` raising ``ValueError``/``TypeError`` for a bad input.
        preprocess: ``preprocess(*args, **kwargs)`` turning the request into the model's arguments
            (e.g. tokenization). Default: the arguments are passed through.
        output_fn: ``output_fn(output)`` giving the prediction tensor ``[batch, features]`` (or ``[batch]``)
            that is checked for NaN/Inf and fed to drift. Default: the output if it is a tensor or ndarray,
            else the first tensor in it (tuples, lists, dicts).
        batch_size_fn: ``batch_size_fn(*args, **kwargs) -> int``. Default: the rows of the first argument
            (a tensor's first dimension, a list's length, the first tensor of a mapping), else the rows of
            the prediction; a call whose batch size cannot be told (a rejected malformed input) observes none.
        baseline: a :class:`normscope.drift.Baseline` of this model version, or the path of a saved one;
            None: no drift metrics.
        drift_window: predictions kept in the sliding window. Default: 1000.
        drift_every: recompute drift after this many new predictions. Default: 1000.
        drift_interval: also recompute after this many seconds when new predictions arrived. Default: 30.0.
        reference: the version's reference parameters (state dict, ``nn.Module`` or path of a saved state
            dict) for ``normscope_layer_param_drift``, computed once here. Needs an ``nn.Module``.
        monitor_every: run one call in ``monitor_every`` under :class:`normscope.Monitor` (per-layer
            statistics, exported by a :class:`~normscope.monitor.PrometheusSink` in the same registry);
            0 or None: no monitor. Ignored (off) when ``fn`` is not an ``nn.Module``. Default: 100.
        monitor_flush_every: flush the monitor (update its metrics) after this many sampled calls.
            Default: 10.
        inference_mode: run an ``nn.Module`` under ``torch.inference_mode()``. Default: True.
        expected_config: the normalization config registered with this model version (a
            :func:`normscope.serving.config.norm_config` dict, e.g. from
            :func:`normscope.integrations.mlflow.load_registered`) or its fingerprint (a str). The wrapper
            computes the config of the model it serves and sets ``normscope_config_mismatch`` to 1 (and warns,
            naming the differences when a dict was given) when the fingerprints differ, else to 0. Needs an
            ``nn.Module``. Default: None (no ``normscope_config_mismatch`` series).
        config_inputs: example inputs for the served model's config (input dtypes, compute dtypes and
            placement of the norm layers; one forward pass at construction). Required when
            ``expected_config`` was computed with inputs (``with_inputs``); default: the static config.

    The label ``fingerprint`` of ``normscope_build_info`` is the fingerprint of the served model's config
    (``unknown`` when ``fn`` is not an ``nn.Module``), in :attr:`fingerprint`; the config is in :attr:`config`.

    Example::

        >>> wrapped = normscope.serving.instrument(model, model="minilm", model_version="3",
        ...                                        baseline="minilm-3.baseline.npz")
        >>> server = wrapped.start_http_server(9108)        # http://127.0.0.1:9108/metrics
        >>> emb = wrapped(input_ids=ids, attention_mask=mask)
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        model: str,
        model_version: str,
        registry=None,
        validate: Optional[Callable[..., Any]] = None,
        preprocess: Optional[Callable[..., Any]] = None,
        output_fn: Optional[Callable[[Any], Any]] = None,
        batch_size_fn: Optional[Callable[..., int]] = None,
        baseline: Any = None,
        drift_window: int = 1000,
        drift_every: int = 1000,
        drift_interval: float = 30.0,
        reference: Any = None,
        monitor_every: Optional[int] = 100,
        monitor_flush_every: int = 10,
        inference_mode: bool = True,
        expected_config: Any = None,
        config_inputs: Any = None,
    ):
        if not callable(fn):
            raise TypeError(f"Expected fn to be callable (a function or an nn.Module), but got {type(fn).__name__}")
        for name, value in (("model", model), ("model_version", model_version)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected {name} to be a non-empty str, but got {value!r}")
        for name, value in (("validate", validate), ("preprocess", preprocess), ("output_fn", output_fn),
                            ("batch_size_fn", batch_size_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"Expected {name} to be callable or None, but got {type(value).__name__}")
        for name, value in (("drift_window", drift_window), ("drift_every", drift_every),
                            ("monitor_flush_every", monitor_flush_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int, but got {value!r}")
        if monitor_every is not None and (isinstance(monitor_every, bool) or not isinstance(monitor_every, int)
                                          or monitor_every < 0):
            raise ValueError(f"Expected monitor_every to be a non-negative int or None, but got {monitor_every!r}")
        if (isinstance(drift_interval, bool) or not isinstance(drift_interval, (int, float))
                or not drift_interval > 0 or not math.isfinite(drift_interval)):
            raise ValueError(f"Expected drift_interval to be a positive number of seconds, but got {drift_interval!r}")
        is_module = isinstance(fn, torch.nn.Module)
        if reference is not None and not is_module:
            raise ValueError("Expected fn to be an nn.Module when reference is given, but got "
                             f"{type(fn).__name__}")
        if (expected_config is not None or config_inputs is not None) and not is_module:
            raise ValueError("Expected fn to be an nn.Module when expected_config or config_inputs is given, but got "
                             f"{type(fn).__name__}")
        expected_fp = _expected_fingerprint(expected_config)
        if isinstance(expected_config, Mapping) and expected_config.get("with_inputs") and config_inputs is None:
            raise ValueError("Expected config_inputs (example inputs of the served model) since the expected_config "
                             "was computed with example inputs (with_inputs=True), but got None")

        prom = _prometheus()
        self.fn = fn
        self.model = model
        self.model_version = model_version
        self.registry = prom.CollectorRegistry() if registry is None else registry
        self._validate = validate
        self._preprocess = preprocess
        self._output_fn = output_fn
        self._batch_size_fn = batch_size_fn
        self._inference_mode = bool(inference_mode) and is_module
        self._closed = False
        self._call_hook: Optional[Callable[..., Any]] = None  # hook(call, args, kwargs), e.g. instrument_otel

        m = _serving_metrics(prom, self.registry)
        mv = (model, model_version)
        self._metrics = m
        self._duration = m["normscope_inference_request_duration_seconds"].labels(*mv)
        self._requests = m["normscope_inference_requests_total"].labels(*mv)
        self._failures = {r: m["normscope_inference_failures_total"].labels(*mv, r) for r in FAILURE_REASONS}
        self._batch = m["normscope_inference_batch_size"].labels(*mv)
        self._nonfinite = m["normscope_output_nonfinite_total"].labels(*mv)
        from normscope import __version__

        # the normalization config of the model actually served, against the registered one
        self.config: Optional[Dict[str, Any]] = None
        self.fingerprint = "unknown"
        self.config_mismatch: Optional[bool] = None
        if is_module:
            from .config import config_differences, config_fingerprint, norm_config

            self.config = norm_config(fn, config_inputs)
            self.fingerprint = config_fingerprint(self.config)
        m["normscope_build_info"].labels(__version__, *mv, self.fingerprint).set(1)
        if expected_fp is not None:
            self.config_mismatch = expected_fp != self.fingerprint
            m["normscope_config_mismatch"].labels(*mv).set(int(self.config_mismatch))
            if self.config_mismatch:
                diff = config_differences(dict(expected_config), self.config) if isinstance(expected_config,
                                                                                          Mapping) else []
                warnings.warn(f"the normalization config of model {model!r} version {model_version!r} differs from "
                              f"the registered one: fingerprint {self.fingerprint} != {expected_fp}"
                              + (f" ({'; '.join(diff)})" if diff else ""), UserWarning, stacklevel=2)

        # gamma/beta against the reference, once
        self.param_drift: Dict[Tuple[str, str], Dict[str, float]] = {}
        if reference is not None:
            self.param_drift = param_drift(fn, reference)
            g = m["normscope_layer_param_drift"]
            for (layer, pname), stats in self.param_drift.items():
                for stat, v in stats.items():
                    g.labels(*mv, layer, pname, stat).set(v)

        # drift
        self.baseline = None
        self._window = None
        self._drift_every = int(drift_every)
        self._drift_interval = float(drift_interval)
        self._pending: collections.deque = collections.deque()
        self._pending_rows = 0
        self._new_rows = 0  # rows queued since the last report
        self._drift_lock = threading.Lock()  # the window and the report
        self._queue_cond = threading.Condition(threading.Lock())
        self._thread: Optional[threading.Thread] = None
        self.last_drift_report = None
        self.drift_errors = 0
        if baseline is not None:
            from normscope.drift import Baseline, DriftWindow

            if isinstance(baseline, (str, os.PathLike)):
                baseline = Baseline.load(baseline)
            if not isinstance(baseline, Baseline):
                raise TypeError(f"Expected baseline to be a normscope.drift.Baseline or a path, but got "
                                f"{type(baseline).__name__}")
            if baseline.model_version != model_version:
                warnings.warn(f"the drift baseline belongs to model_version {baseline.model_version!r}, but the "
                              f"wrapper serves {model_version!r}", UserWarning, stacklevel=2)
            self.baseline = baseline
            self._window = DriftWindow(baseline, window=int(drift_window))
            narrow = baseline.n_features <= MAX_DRIFT_STATISTICS
            self._drift_columns = [c for c, k in zip(baseline.columns, baseline.kinds) if k == "summary" or narrow]
            m["normscope_prediction_drift_window_samples"].labels(*mv).set(0)
            self._thread = threading.Thread(target=self._drift_loop, name=f"normscope-drift-{model}", daemon=True)
            self._thread.start()

        # per-layer monitor, sampled
        self.monitor = None
        self._monitor_every = 0
        self._rw = _RWLock()
        self._count_lock = threading.Lock()
        self._calls = 0
        self._sampled = 0
        if is_module and monitor_every:
            from normscope.monitor import Monitor, PrometheusSink

            sink = PrometheusSink(registry=self.registry)
            # every=2 with step() around each sampled call: odd steps (all other calls) are not measured
            self.monitor = Monitor(fn, every=2, sinks=[sink], flush_every=None, grads=False)
            self.monitor.step()
            self._monitor_every = int(monitor_every)
            self._monitor_flush_every = int(monitor_flush_every)

    # --- calling ---------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        """Run one inference call with telemetry (see the class docstring); returns the model's output."""
        hook = self._call_hook
        if hook is not None:
            return hook(self._call, args, kwargs)
        return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        t0 = time.perf_counter()
        reason = None
        bs = None
        try:
            bs = self._batch_size(args, kwargs)
            if self._validate is not None or self._preprocess is not None:
                try:
                    if self._validate is not None:
                        self._validate(*args, **kwargs)
                    if self._preprocess is not None:
                        x = self._preprocess(*args, **kwargs)
                        if isinstance(x, Mapping):
                            args, kwargs = (), dict(x)
                        elif isinstance(x, tuple):
                            args, kwargs = x, {}
                        else:
                            args, kwargs = (x,), {}
                except BadInputError:
                    raise
                except (ValueError, TypeError) as e:
                    raise BadInputError(str(e)) from e
            out = self._run(args, kwargs)
            pred = self._output_fn(out) if self._output_fn is not None else _first_tensor(out)
            bad = _nonfinite_count(pred)
            if bad:
                self._nonfinite.inc(bad)
                err = NonFiniteOutputError(f"Expected finite outputs from model {self.model!r} version "
                                           f"{self.model_version!r}, but got {bad} NaN/Inf elements "
                                           f"(shape {list(pred.shape)}); the output was not returned")
                err.count, err.shape = bad, list(pred.shape)
                raise err
            if bs is None:
                bs = _rows_of(pred)
            if self._window is not None and pred is not None:
                self._queue(pred)
            return out
        except BadInputError:
            reason = "bad_input"
            raise
        except NonFiniteOutputError:
            reason = "nonfinite_output"
            raise
        except BaseException:
            reason = "exception"
            raise
        finally:
            self._requests.inc()
            self._duration.observe(time.perf_counter() - t0)
            if bs is not None:
                self._batch.observe(bs)
            if reason is not None:
                self._failures[reason].inc()

    def _batch_size(self, args: tuple, kwargs: dict) -> Optional[int]:
        try:
            n = self._batch_size_fn(*args, **kwargs) if self._batch_size_fn is not None else \
                _default_batch_size(args, kwargs)
        except Exception:
            return None
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    def _run(self, args: tuple, kwargs: dict):
        ctx = torch.inference_mode() if self._inference_mode else contextlib.nullcontext()
        if self.monitor is None or self._closed:
            with ctx:
                return self.fn(*args, **kwargs)
        with self._count_lock:
            sampled = self._calls % self._monitor_every == 0
            self._calls += 1
        if not sampled:
            with self._rw.shared(), ctx:
                return self.fn(*args, **kwargs)
        with self._rw.exclusive():  # no other call runs while the monitor measures this one
            if self._closed:  # closed while this call waited
                with ctx:
                    return self.fn(*args, **kwargs)
            self.monitor.step()  # -> an even (sampled) step
            try:
                with ctx:
                    return self.fn(*args, **kwargs)
            finally:
                self.monitor.step()  # -> an odd (unsampled) step
                self._sampled += 1
                if self._sampled % self._monitor_flush_every == 0:
                    self.monitor.flush()

    # --- drift -----------------------------------------------------------------------------------

    def _queue(self, pred: Any) -> None:
        if isinstance(pred, torch.Tensor):
            a = pred.detach().to("cpu", torch.float64).numpy()
        else:
            import numpy as np

            a = np.array(pred, dtype=np.float64)
        if a.ndim == 0:
            a = a.reshape(1)
        with self._queue_cond:
            self._pending.append(a)
            self._pending_rows += a.shape[0]
            self._new_rows += a.shape[0]
            # only the latest drift_window rows can matter
            while self._pending and self._pending_rows - self._pending[0].shape[0] >= self._window.window:
                self._pending_rows -= self._pending.popleft().shape[0]
            if self._new_rows >= self._drift_every:
                self._queue_cond.notify()

    def drift_report(self):
        """Move the queued predictions into the window, recompute the drift gauges now and return the report.

        Returns:
            the :class:`normscope.drift.DriftReport` of the window, or None when there is no baseline or the
            window is still empty.
        """
        if self._window is None:
            return None
        import numpy as np

        with self._drift_lock:
            with self._queue_cond:
                parts = list(self._pending)
                self._pending.clear()
                self._pending_rows = 0
                self._new_rows = 0
            if parts:
                self._window.update(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
            if len(self._window) == 0:
                return None
            report = self._window.report()
            mv = (self.model, self.model_version)
            g = self._metrics["normscope_prediction_drift"]
            wanted = set(self._drift_columns)
            for c in report.columns:
                if c.name in wanted:
                    g.labels(*mv, "psi", c.name).set(c.psi)
                    g.labels(*mv, "js", c.name).set(c.js)
            self._metrics["normscope_prediction_drift_share"].labels(*mv).set(report.share_drifted)
            self._metrics["normscope_prediction_drift_window_samples"].labels(*mv).set(len(self._window))
            self.last_drift_report = report
            return report

    def _drift_loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._queue_cond:
                while not self._closed:
                    due = self._new_rows >= self._drift_every or (
                        self._new_rows > 0 and time.monotonic() - last >= self._drift_interval)
                    if due:
                        break
                    self._queue_cond.wait(timeout=max(0.05, self._drift_interval - (time.monotonic() - last)))
                if self._closed:
                    return
            try:
                self.drift_report()
            except Exception as e:  # a drift failure never reaches the requests
                self.drift_errors += 1
                if self.drift_errors == 1:
                    warnings.warn(f"normscope.serving: drift report failed and is skipped: {e!r}", RuntimeWarning)
            last = time.monotonic()

    # --- exposition, lifetime --------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        """The registry's metrics in the Prometheus text format (serve with :data:`CONTENT_TYPE_LATEST`)."""
        return metrics_text(self.registry)

    def start_http_server(self, port: int = 0, *, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve :attr:`registry` at ``http://addr:port/metrics`` (see :func:`start_http_server`)."""
        return start_http_server(self.registry, port, addr=addr)

    def close(self) -> None:
        """Stop the drift thread and close the monitor (removing its hooks). Idempotent; metrics stay registered."""
        if self._closed:
            return
        with self._queue_cond:
            self._closed = True
            self._queue_cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.monitor is not None:
            with self._rw.exclusive():
                self.monitor.close()

    def remove_series(self) -> None:
        """Remove this model version's series from the registry (after a reload, so that they go stale).

        Other wrappers sharing the registry keep theirs. Calls made afterwards create the series anew.
        """
        from normscope import __version__

        mv = (self.model, self.model_version)
        m = self._metrics
        sets = [(name, mv) for name in ("normscope_inference_request_duration_seconds",
                                        "normscope_inference_requests_total", "normscope_inference_batch_size",
                                        "normscope_output_nonfinite_total", "normscope_prediction_drift_share",
                                        "normscope_prediction_drift_window_samples")]
        sets += [("normscope_inference_failures_total", mv + (r,)) for r in FAILURE_REASONS]
        sets.append(("normscope_build_info", (__version__,) + mv + (self.fingerprint,)))
        if self.config_mismatch is not None:
            sets.append(("normscope_config_mismatch", mv))
        if self._window is not None:
            sets += [("normscope_prediction_drift", mv + (k, c)) for k in ("psi", "js") for c in self._drift_columns]
        sets += [("normscope_layer_param_drift", mv + (layer, pname, stat))
                 for (layer, pname), stats in self.param_drift.items() for stat in stats]
        for name, labels in sets:
            try:
                m[name].remove(*labels)
            except KeyError:
                pass

    def __enter__(self) -> "InstrumentedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"InstrumentedModel(model={self.model!r}, model_version={self.model_version!r}, "
                f"drift={'on' if self._window is not None else 'off'}, "
                f"monitor_every={self._monitor_every or None})")


def instrument(fn: Callable[..., Any], *, model: str, model_version: str, **kwargs) -> InstrumentedModel:
    """Wrap ``fn`` (an inference callable or ``nn.Module``) with serving telemetry.

    Same arguments as :class:`InstrumentedModel`; returns it. Example::

        >>> wrapped = normscope.serving.instrument(model, model="minilm", model_version="1")
        >>> out = wrapped(batch)
    """
    return InstrumentedModel(fn, model=model, model_version=model_version, **kwargs)


def instrumented(*, model: str, model_version: str, **kwargs) -> Callable[[Callable[..., Any]], InstrumentedModel]:
    """Decorator form of :func:`instrument`::

        >>> @normscope.serving.instrumented(model="scorer", model_version="7")
        ... def predict(features):
        ...     return scorer(features)
    """
    def wrap(fn: Callable[..., Any]) -> InstrumentedModel:
        return InstrumentedModel(fn, model=model, model_version=model_version, **kwargs)

    return wrap

