"""normscope.serving.otel: a span per request, error spans, OTLP/HTTP export, OTel metrics on /metrics."""

import http.server
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import normscope.serving as serving  # noqa: E402
from normscope.drift import Baseline  # noqa: E402
from normscope.serving import BadInputError, NonFiniteOutputError, instrument  # noqa: E402
from normscope.serving.metrics import LATENCY_BUCKETS_SECONDS, METRICS  # noqa: E402
from normscope.serving.otel import (  # noqa: E402
    OTEL_METRICS,
    SPAN_NAME,
    PrometheusBridgeReader,
    instrument_otel,
    locate_nonfinite,
    prometheus_name,
)


class Net(torch.nn.Module):
    """LayerNorm(eps=0) -> Linear: a constant input row has zero variance, so ``norm`` outputs NaN (0/0).
    ``x[:, 0] == -999`` raises; ``x[:, 0] == 555`` makes the output NaN outside any layer."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8, eps=0.0)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        if bool((x[:, 0] == -999).any()):
            raise RuntimeError("model failure")
        y = self.lin(self.norm(x))
        return torch.where(x[:, :1] == 555, torch.full_like(y, float("nan")), y)


def _validate(x):
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 8:
        raise ValueError(f"Expected a tensor of shape [N, 8], but got {getattr(x, 'shape', type(x).__name__)}")


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def setup():
    provider, exporter = _tracing()
    reg = prometheus_client.CollectorRegistry()
    w = instrument(_net(), model="net", model_version="2", registry=reg, validate=_validate, monitor_every=0)
    otel = instrument_otel(w, tracer_provider=provider)
    yield w, otel, exporter, reg
    otel.uninstrument()
    w.close()


def _samples(text):
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples, name, **labels):
    found = [v for n, lb, v in samples if n == name and lb == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------


def test_one_span_per_request_with_model_version_batch_size_latency_and_drift_state():
    model = _net()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = Baseline.from_outputs(model(torch.randn(300, 8, generator=gen)), model_version="2")
    provider, exporter = _tracing()
    w = instrument(model, model="net", model_version="2", registry=prometheus_client.CollectorRegistry(),
                   baseline=base, drift_every=10**6, drift_interval=3600.0, monitor_every=0)
    otel = instrument_otel(w, tracer_provider=provider)
    try:
        sizes = [1, 5, 17]
        for n in sizes:
            out = w(torch.randn(n, 8, generator=gen))
            assert out.shape == (n, 4)  # the output is returned unchanged
        report = w.drift_report()
        w(3.0 * torch.randn(64, 8, generator=gen) + 2.0)
    finally:
        otel.uninstrument()
        w.close()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [SPAN_NAME] * 4
    assert len({s.context.span_id for s in spans}) == 4 and all(s.parent is None for s in spans)
    for s, n in zip(spans, sizes + [64]):
        a = s.attributes
        assert a["normscope.model"] == "net" and a["normscope.model_version"] == "2"
        assert a["normscope.config.fingerprint"] == serving.fingerprint(model)
        assert a["normscope.batch_size"] == n
        assert a["normscope.outcome"] == "ok" and "error.type" not in a
        assert 0 < a["normscope.latency_seconds"] <= (s.end_time - s.start_time) / 1e9
        assert s.status.status_code == StatusCode.UNSET and not s.events
    # no drift report yet during the first three calls; the last call carries the report's state
    assert {s.attributes["normscope.drift.state"] for s in spans[:3]} == {"warming_up"}
    last = spans[3].attributes
    assert last["normscope.drift.state"] == ("drifted" if report.drifted else "ok")
    assert last["normscope.drift.share"] == pytest.approx(report.share_drifted)
    assert last["normscope.drift.window_samples"] == sum(sizes)


def test_drift_state_off_and_config_mismatch_attribute():
    provider, exporter = _tracing()
    other = serving.norm_config(torch.nn.Sequential(torch.nn.LayerNorm(8, eps=1e-3)))
    with pytest.warns(UserWarning, match="differs from the registered one"):
        w = instrument(_net(), model="net", model_version="2", registry=prometheus_client.CollectorRegistry(),
                       expected_config=other, monitor_every=0)
    with instrument_otel(w, tracer_provider=provider, metrics=False) as otel:
        assert otel.meter_provider is None
        w(torch.randn(2, 8))
    w.close()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["normscope.drift.state"] == "off"
    assert span.attributes["normscope.config.mismatch"] is True


def test_nonfinite_output_gives_an_error_span_naming_the_layer(setup):
    w, otel, exporter, reg = setup
    x = torch.randn(3, 8)
    x[1] = 0.5  # a constant row: zero variance, eps=0 -> NaN in `norm`
    with pytest.raises(NonFiniteOutputError) as info:
        w(x)
    assert info.value.count == 4 and info.value.shape == [3, 4]
    y = torch.randn(2, 8)
    y[0, 0] = 555  # NaN made by forward() itself, outside any leaf module
    with pytest.raises(NonFiniteOutputError):
        w(y)
    s1, s2 = exporter.get_finished_spans()
    for s in (s1, s2):
        assert s.status.status_code == StatusCode.ERROR and "nonfinite_output" in s.status.description
        assert s.attributes["normscope.outcome"] == "nonfinite_output"
        assert s.attributes["error.type"] == "nonfinite_output"
        assert [e.name for e in s.events] == ["normscope.nonfinite_output"]
    assert s1.attributes["normscope.batch_size"] == 3 and s2.attributes["normscope.batch_size"] == 2
    e1, e2 = s1.events[0].attributes, s2.events[0].attributes
    assert e1["normscope.nonfinite.count"] == 4 and tuple(e1["normscope.nonfinite.shape"]) == (3, 4)
    assert e1["normscope.nonfinite.layer"] == "norm" and s1.attributes["normscope.nonfinite.layer"] == "norm"
    assert e2["normscope.nonfinite.count"] == 4 and "normscope.nonfinite.layer" not in e2  # no layer did it
    # the wrapper's own metrics are unchanged by the instrumentation
    assert reg.get_sample_value("normscope_output_nonfinite_total", {"model": "net", "model_version": "2"}) == 8
    assert reg.get_sample_value("normscope_inference_failures_total",
                                {"model": "net", "model_version": "2", "reason": "nonfinite_output"}) == 2


def test_bad_request_and_model_exception_spans(setup):
    w, otel, exporter, reg = setup
    with pytest.raises(BadInputError):
        w(torch.randn(2, 7))
    boom = torch.randn(3, 8)
    boom[0, 0] = -999
    with pytest.raises(RuntimeError, match="model failure"):
        w(boom)
    bad, exc = exporter.get_finished_spans()
    assert bad.status.status_code == StatusCode.ERROR
    assert bad.attributes["normscope.outcome"] == "bad_input" and bad.attributes["error.type"] == "bad_input"
    assert bad.attributes["normscope.batch_size"] == 2
    assert "Expected a tensor of shape [N, 8]" in bad.status.description
    assert exc.status.status_code == StatusCode.ERROR and exc.attributes["normscope.outcome"] == "exception"
    assert [e.name for e in exc.events] == ["exception"]
    assert exc.events[0].attributes["exception.type"] == "RuntimeError"
    assert exc.events[0].attributes["exception.message"] == "model failure"


def test_spans_nest_under_the_callers_span_and_threads_get_one_span_each(setup):
    w, otel, exporter, reg = setup
    tracer = otel.tracer
    with tracer.start_as_current_span("http.request") as parent:
        w(torch.randn(2, 8))
    errors = []

    def worker():
        try:
            for _ in range(5):
                w(torch.randn(3, 8))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spans = [s for s in exporter.get_finished_spans() if s.name == SPAN_NAME]
    assert len(spans) == 21 and len({s.context.span_id for s in spans}) == 21
    assert spans[0].parent.span_id == parent.get_span_context().span_id
    assert all(s.parent is None for s in spans[1:])


def test_otel_metrics_on_the_prometheus_endpoint_next_to_the_catalogue(setup):
    w, otel, exporter, reg = setup
    w(torch.randn(4, 8))
    w(torch.randn(2, 8))
    with pytest.raises(BadInputError):
        w(torch.randn(1, 3))
    server = w.start_http_server()
    try:
        with urllib.request.urlopen(server.url, timeout=10) as r:
            samples = _samples(r.read().decode())
    finally:
        server.close()
    mv = {"model": "net", "model_version": "2"}
    assert _value(samples, "normscope_otel_requests_total", outcome="ok", **mv) == 2
    assert _value(samples, "normscope_otel_requests_total", outcome="bad_input", **mv) == 1
    assert _value(samples, "normscope_otel_request_duration_seconds_count", outcome="ok", **mv) == 2
    assert _value(samples, "normscope_otel_request_duration_seconds_sum", outcome="ok", **mv) > 0
    les = [lb["le"] for n, lb, _ in samples
           if n == "normscope_otel_request_duration_seconds_bucket" and lb["outcome"] == "ok"]
    assert [float(x) for x in les] == list(LATENCY_BUCKETS_SECONDS) + [float("inf")]
    # the catalogue's metrics are still there, counting the same calls
    assert _value(samples, "normscope_inference_requests_total", **mv) == 3
    names = {n for n, _, _ in samples}
    assert {v[2] + s for v in OTEL_METRICS.values() for s in (("",) if v[0] == "counter" else ("_count",))} <= names
    # the catalogue lists exactly these (source "otel"), with the labels the samples carry
    otel_entries = {m.name: m for m in METRICS if m.source == "otel"}
    assert set(otel_entries) == {v[2] for v in OTEL_METRICS.values()}
    for v in OTEL_METRICS.values():
        m = otel_entries[v[2]]
        assert m.type == v[0]
        got = [lb for n, lb, _ in samples if n in (m.name, m.name + "_count")]
        assert got and all(set(lb) == set(m.labels) for lb in got), (m.name, got)
        assert {lb["outcome"] for lb in got} <= set(m.values_of("outcome"))
    # uninstrumented: no more spans, and the OTel families leave the registry
    otel.uninstrument()
    otel.uninstrument()
    w(torch.randn(1, 8))
    assert len(exporter.get_finished_spans()) == 3
    text = prometheus_client.generate_latest(reg).decode()
    assert "normscope_otel_" not in text and "normscope_inference_requests_total" in text


def test_user_meter_provider_feeds_prometheus_and_its_other_readers():
    provider, exporter = _tracing()
    reg = prometheus_client.CollectorRegistry()
    w = instrument(_net(), model="net", model_version="2", registry=reg, monitor_every=0)
    memory = InMemoryMetricReader()
    bridge = PrometheusBridgeReader(reg)
    assert isinstance(bridge, PrometheusBridgeReader) and isinstance(bridge, MetricReader)
    assert prometheus_client.generate_latest(reg)  # scraped before it is attached: nothing, no error
    mp = MeterProvider(metric_readers=[memory, bridge])
    otel = instrument_otel(w, tracer_provider=provider, meter_provider=mp)
    try:
        for _ in range(3):
            w(torch.randn(2, 8))
        samples = _samples(prometheus_client.generate_latest(reg).decode())
        assert _value(samples, "normscope_otel_requests_total", model="net", model_version="2", outcome="ok") == 3
        points = {m.name: m.data.data_points for rm in memory.get_metrics_data().resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics}
        assert [p.value for p in points["normscope.otel.requests"]] == [3]
        assert [p.count for p in points["normscope.otel.request.duration"]] == [3]
    finally:
        otel.uninstrument()
        assert otel.reader is None
        mp.shutdown()  # the user's provider is theirs to shut down
        w.close()
    assert "normscope_otel_" not in prometheus_client.generate_latest(reg).decode()


class _OTLPReceiver(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        self.requests.append((self.path, self.headers.get("Content-Type"), req))
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_spans_reach_an_otlp_http_receiver():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource

    _OTLPReceiver.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OTLPReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    provider = TracerProvider(resource=Resource.create({"service.name": "net-service"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces", timeout=10)))
    w = instrument(_net(), model="net", model_version="2", registry=prometheus_client.CollectorRegistry(),
                   monitor_every=0)
    try:
        with instrument_otel(w, tracer_provider=provider, metrics=False):
            w(torch.randn(3, 8))
            x = torch.ones(2, 8)
            with pytest.raises(NonFiniteOutputError):
                w(x)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
        server.shutdown()
        server.server_close()
        w.close()
    assert _OTLPReceiver.requests
    assert {(p, ct) for p, ct, _ in _OTLPReceiver.requests} == {("/v1/traces", "application/x-protobuf")}
    spans, services = [], set()
    for _, _, req in _OTLPReceiver.requests:
        for rs in req.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                assert ss.scope.name == "normscope.serving"
                spans += list(ss.spans)
    assert services == {"net-service"}
    assert [s.name for s in spans] == [SPAN_NAME, SPAN_NAME]

    def attrs(s):
        return {a.key: a.value for a in s.attributes}

    ok, bad = spans
    assert attrs(ok)["normscope.batch_size"].int_value == 3
    assert attrs(ok)["normscope.model"].string_value == "net"
    assert attrs(ok)["normscope.outcome"].string_value == "ok"
    assert ok.status.code == 0  # STATUS_CODE_UNSET
    assert bad.status.code == 2  # STATUS_CODE_ERROR
    assert attrs(bad)["normscope.outcome"].string_value == "nonfinite_output"
    (event,) = bad.events
    assert event.name == "normscope.nonfinite_output"
    ev = {a.key: a.value for a in event.attributes}
    assert ev["normscope.nonfinite.layer"].string_value == "norm" and ev["normscope.nonfinite.count"].int_value == 8


def test_locate_nonfinite():
    net = _net()
    x = torch.randn(4, 8)
    assert locate_nonfinite(net, (x,)) is None  # finite all the way
    x[2] = 3.0
    assert locate_nonfinite(net, (x,)) == "norm"
    x[0, 1] = float("inf")
    assert locate_nonfinite(net, (x,)) == "<input>"
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.LayerNorm(8, eps=0.0)))
    with torch.no_grad():
        seq[0].weight.zero_()  # a constant row out of the Linear -> NaN in the nested LayerNorm
        seq[0].bias.fill_(0.3)
    assert locate_nonfinite(seq, (torch.randn(2, 8),)) == "1.0"
    assert not seq[0]._forward_hooks and not seq[1][0]._forward_hooks  # hooks removed
    with pytest.raises(TypeError, match="Expected module to be a torch.nn.Module"):
        locate_nonfinite(lambda x: x, (x,))


def test_prometheus_name():
    assert [prometheus_name(n, u, m) for n, (k, u, _) in OTEL_METRICS.items() for m in [k == "counter"]] == \
        [v[2] for v in OTEL_METRICS.values()]
    assert prometheus_name("queue.size", "By", False) == "queue_size_bytes"
    assert prometheus_name("x.ratio", "1", False) == "x_ratio"


def test_errors():
    provider, _ = _tracing()
    with pytest.raises(TypeError, match="Expected wrapped to be a normscope.serving.InstrumentedModel, but got Net"):
        instrument_otel(_net(), tracer_provider=provider)
    w = instrument(_net(), model="net", model_version="2", registry=prometheus_client.CollectorRegistry(),
                   monitor_every=0)
    with instrument_otel(w, tracer_provider=provider):
        with pytest.raises(ValueError, match="Expected a wrapper without OTel instrumentation"):
            instrument_otel(w, tracer_provider=provider)
    instrument_otel(w, tracer_provider=provider).uninstrument()  # allowed again after uninstrument()
    w.close()


def test_missing_opentelemetry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    w = instrument(_net(), model="net", model_version="2", registry=prometheus_client.CollectorRegistry(),
                   monitor_every=0)
    with pytest.raises(ImportError, match=r"pip install 'normscope\[otel\]'"):
        instrument_otel(w)
    w(torch.randn(1, 8))  # the wrapper still works
    w.close()


def test_importing_serving_does_not_import_opentelemetry():
    code = ("import sys, normscope, normscope.serving, normscope.serving.otel; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
