"""normscope.serving.triton: the parts that need no Triton (arguments, the infer function, text decoding, the
backend's library path), then, marked ``triton_server``, the real thing: ``python -m normscope.serving.triton`` in
``.venv-triton`` (PyTriton's ``tritonserver``) scraped by a real Prometheus together with Triton's own metrics.

The end-to-end test sends 300 requests from 4 threads (4 texts each; 20% with an empty text, which the wrapper
rejects as ``bad_input``, 40% random character strings, which drift MiniLM's embeddings) plus 10 requests with
an unknown input name (Triton rejects those before the model: neither side counts them), and 4 over gRPC with
Triton's own client (one with an empty text). It then reads back from
Prometheus normscope's and Triton's counters, which must equal what was sent, the recording rules that join the
two by model and version, and the drift and error-budget alerts, which must fire (rules rewritten as in
test_serving_integration.py so that they fire within seconds).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_helpers import free_port
from normscope.serving import instrument
from normscope.serving.triton import (
    MAX_CHARS,
    TensorSpec,
    TritonService,
    backend_library_dir,
    decode_texts,
    infer_texts,
    prepare_backend_environment,
)
from test_serving_integration import _alerts, _prometheus_binary, _query, _stop, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
SPECS = dict(inputs=[TensorSpec("x", np.float32, (4,))], outputs=[TensorSpec("y", np.float32, (2,))])


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.norm(x))


def _preprocess(request):
    x = request["x"]
    if x.ndim != 2 or x.shape[1] != 4:
        raise ValueError(f"Expected x of shape [batch, 4], but got {list(x.shape)}")
    return (torch.from_numpy(x),)


def _wrapped(**kw):
    torch.manual_seed(0)
    return instrument(Head().eval(), model="head", model_version="2", preprocess=_preprocess, monitor_every=None, **kw)


def _sample(registry, name, **labels):
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


# --- the library path of the backend stub --------------------------------------------------------------------------

def test_prepare_backend_environment_puts_the_interpreter_library_first():
    libdir = backend_library_dir()
    if libdir is None:  # a static build: nothing to fix, nothing changed
        env = {"LD_LIBRARY_PATH": "/opt/x"}
        assert prepare_backend_environment(env) is None and env == {"LD_LIBRARY_PATH": "/opt/x"}
        return
    assert any(f.startswith("libpython") for f in os.listdir(libdir))
    env = {}
    assert prepare_backend_environment(env) == libdir
    assert env["LD_LIBRARY_PATH"] == libdir
    env = {"LD_LIBRARY_PATH": os.pathsep.join(["/usr/lib/x86_64-linux-gnu", libdir, "/opt/cuda/lib"])}
    assert prepare_backend_environment(env) == libdir  # moved to the front, not repeated
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/usr/lib/x86_64-linux-gnu", "/opt/cuda/lib"]
    before = dict(env)
    assert prepare_backend_environment(env) is None and env == before  # already first: unchanged


# --- arguments -------------------------------------------------------------------------------------------------------

def test_tensor_spec_validation():
    assert TensorSpec("x", np.float32, [3, -1]).shape == (3, -1)
    with pytest.raises(ValueError, match="Expected the tensor name to be a non-empty str"):
        TensorSpec("", np.float32, (1,))
    with pytest.raises(ValueError, match=r"Expected the shape of 'x' to hold positive ints or -1, but got \(0,\)"):
        TensorSpec("x", np.float32, (0,))


def test_service_takes_name_and_version_from_the_wrapper_and_checks_them():
    wrapped = _wrapped()
    try:
        svc = TritonService(wrapped, **SPECS, http_port=0)
        assert (svc.model_name, svc.model_version, svc.instrumented) == ("head", 2, wrapped)
        assert "stopped" in repr(svc) and svc.metrics_url is None and not svc.is_alive()
        with pytest.raises(ValueError, match=r"Expected model_name and model_version to equal the wrapper's labels"):
            TritonService(wrapped, **SPECS, model_version=3)
    finally:
        wrapped.close()
    plain = lambda request: request["x"][:, :2]  # noqa: E731
    with pytest.raises(ValueError, match="Expected model_name to be a non-empty str"):
        TritonService(plain, **SPECS)
    for bad in ("v2", "0", 0, -1, True, "02"):
        with pytest.raises(ValueError, match="Expected model_version to be a positive integer"):
            TritonService(plain, **SPECS, model_name="m", model_version=bad)
    assert TritonService(plain, **SPECS, model_name="m", model_version="7").model_version == 7
    with pytest.raises(ValueError, match="Expected a postprocess function for 2 outputs"):
        TritonService(plain, inputs=SPECS["inputs"], outputs=[TensorSpec("a", np.float32, (1,)),
                                                              TensorSpec("b", np.float32, (1,))],
                      model_name="m", model_version=1)
    with pytest.raises(ValueError, match="Expected distinct inputs names"):
        TritonService(plain, inputs=SPECS["inputs"] * 2, outputs=SPECS["outputs"], model_name="m", model_version=1)
    with pytest.raises(TypeError, match="Expected outputs to be a non-empty sequence of TensorSpec"):
        TritonService(plain, inputs=SPECS["inputs"], outputs=[], model_name="m", model_version=1)
    with pytest.raises(ValueError, match=r"Expected http_port to be an int in \[0, 65535\], but got 70000"):
        TritonService(plain, **SPECS, model_name="m", model_version=1, http_port=70000)
    with pytest.raises(ValueError, match="Expected max_batch_size to be a positive int"):
        TritonService(plain, **SPECS, model_name="m", model_version=1, max_batch_size=0)
    with pytest.raises(TypeError, match="Expected predict to be callable"):
        TritonService(3, **SPECS, model_name="m", model_version=1)


# --- the infer function ------------------------------------------------------------------------------------------

def test_infer_runs_each_request_through_the_wrapper_and_counts_each_once():
    wrapped = _wrapped()
    try:
        svc = TritonService(wrapped, **SPECS)
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((3, 4), dtype=np.float32), rng.standard_normal((1, 4), dtype=np.float32)
        out = svc.infer([{"x": a}, {"x": b}])
        with torch.inference_mode():
            expect = wrapped.fn(torch.from_numpy(np.concatenate([a, b]))).numpy()
        assert [o["y"].shape for o in out] == [(3, 2), (1, 2)] and out[0]["y"].dtype == np.float32
        np.testing.assert_allclose(np.concatenate([out[0]["y"], out[1]["y"]]), expect, rtol=1e-6, atol=1e-6)
        # a bad request among good ones: the others still run (and are counted), then the error fails the call
        with pytest.raises(ValueError, match=r"Expected x of shape \[batch, 4\], but got \[2, 3\]"):
            svc.infer([{"x": a}, {"x": np.zeros((2, 3), np.float32)}, {"x": b}])
        reg = wrapped.registry
        labels = dict(model="head", model_version="2")
        assert _sample(reg, "normscope_inference_requests_total", **labels) == 5
        assert _sample(reg, "normscope_inference_failures_total", reason="bad_input", **labels) == 1
        assert _sample(reg, "normscope_inference_batch_size_sum", **labels) == 3 + 1 + 3 + 2 + 1  # rows of each
    finally:
        wrapped.close()


def test_start_without_pytriton_names_the_extra():
    pytest.importorskip("numpy")
    try:
        import pytriton  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("nvidia-pytriton is installed here; the ImportError path is for environments without it")
    svc = TritonService(lambda r: r["x"], **SPECS, model_name="m", model_version=1)
    with pytest.raises(ImportError, match=r"normscope\[triton-server\].*numpy<2"):
        svc.start()


# --- text decoding of the default service --------------------------------------------------------------------------

def test_decode_texts():
    assert decode_texts(np.array([[b"a b"], ["c"]], dtype=object)) == ["a b", "c"]
    assert decode_texts(np.array([["\u00e9t\u00e9".encode()]], dtype=object)) == ["\u00e9t\u00e9"]
    with pytest.raises(ValueError, match=r"Expected 'text' of shape \[batch, 1\], but got \[2\]"):
        decode_texts(np.array([b"a", b"b"], dtype=object))
    with pytest.raises(ValueError, match=r"Expected text\[1\] to be UTF-8, but got undecodable bytes"):
        decode_texts(np.array([[b"ok"], [b"\xff\xfe"]], dtype=object))
    with pytest.raises(ValueError, match=r"Expected text\[0\] to be a non-empty string, but got '  '"):
        decode_texts(np.array([[b"  "]], dtype=object))
    with pytest.raises(ValueError, match=f"Expected texts of at most {MAX_CHARS} characters"):
        decode_texts(np.array([[b"x" * (MAX_CHARS + 1)]], dtype=object))
    with pytest.raises(TypeError, match=r"Expected text\[0\] to be bytes or str, but got int"):
        decode_texts(np.array([[3]], dtype=object))
    with pytest.raises(TypeError, match="Expected texts to be strings, but got bytes"):
        infer_texts("http://127.0.0.1:9", [b"x"])


# --- the real server -----------------------------------------------------------------------------------------------

def _venv_python() -> str:
    if not VENV_PYTHON.exists():
        msg = ".venv-triton is missing (bash scripts/extra-venv.sh triton triton-server,demo,hf)"
        if os.environ.get("CI"):
            pytest.fail(msg + ", and CI is set")
        pytest.skip(msg)
    return str(VENV_PYTHON)


def _texts(rng: random.Random, kind: str):
    from normscope.demo import SENTENCES

    if kind == "drift":
        chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?#@%&*"
        return ["".join(rng.choice(chars) for _ in range(40)) for _ in range(4)]
    texts = [rng.choice(SENTENCES) + " " + rng.choice(SENTENCES) for _ in range(4)]
    if kind == "bad":
        texts[rng.randrange(4)] = ""
    return texts


_GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

client = grpcclient.InferenceServerClient(sys.argv[1])
shapes = []
for i in range(3):
    inp = grpcclient.InferInput("text", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"layer norm over gRPC"], [str(i).encode() + b" rms norm"]], dtype=object))
    shapes.append(list(client.infer("minilm", [inp]).as_numpy("embedding").shape))
bad = "answered"
try:
    inp = grpcclient.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b""]], dtype=object))
    client.infer("minilm", [inp])
except InferenceServerException:
    bad = "failed"
print(json.dumps({"shapes": shapes, "bad": bad}))
"""


@pytest.mark.triton_server
def test_triton_service_metrics_join_tritons_in_a_real_prometheus():
    python = _venv_python()
    prom_bin = _prometheus_binary()
    start = time.monotonic()
    deadline = start + 240.0
    tmp = tempfile.mkdtemp(prefix="normscope-triton-it-")
    server = prom = None
    server_err = open(os.path.join(tmp, "server.err"), "w+")
    prom_log = open(os.path.join(tmp, "prometheus.log"), "w+")
    ports = {k: free_port() for k in ("http", "grpc", "triton_metrics", "metrics")}
    try:
        server = subprocess.Popen(
            [python, "-m", "normscope.serving.triton", "--baseline", "builtin", "--drift-every", "100",
             "--drift-interval", "1", "--monitor-every", "10", "--threads", "1",
             "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
             "--triton-metrics-port", str(ports["triton_metrics"]), "--metrics-port", str(ports["metrics"])],
            stdout=subprocess.PIPE, stderr=server_err, text=True, cwd=tmp)
        lines: list = []
        threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")), daemon=True).start()
        ready = None
        while ready is None and time.monotonic() < deadline and server.poll() is None:
            ready = next((json.loads(s) for s in list(lines) if s.startswith('{"event": "ready"')), None)
            time.sleep(0.2)
        if ready is None:
            server_err.seek(0)
            pytest.fail(f"the Triton service did not start: {server_err.read()[-3000:]}")
        assert ready["model"] == "minilm" and ready["model_version"] == "1"
        assert ready["metrics"] == f"http://127.0.0.1:{ports['metrics']}/metrics"
        http = ready["http"]
        for path in ("/v2/health/ready", "/v2/health/live"):  # the Kubernetes probes (deploy/kubernetes/triton)
            with urllib.request.urlopen(http + path, timeout=10) as r:
                assert r.status == 200, path

        prom, papi = start_prometheus(prom_bin, tmp, {"triton": ports["triton_metrics"],
                                                      "normscope-serving": ports["metrics"]}, prom_log)

        rng = random.Random(0)
        kinds = ["bad"] * 60 + ["drift"] * 120 + ["good"] * 120
        rng.shuffle(kinds)
        requests = [(k, _texts(rng, k)) for k in kinds]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: (r[0], infer_texts(http, r[1])), requests))
        wrong_name = [infer_texts(http, ["a text"], input_name="texts") for _ in range(10)]
        ok = [body for k, (st, body) in results if k != "bad"]
        assert all(st == 200 for k, (st, _) in results if k != "bad"), [r for r in results if r[1][0] != 200][:3]
        assert all(o["outputs"][0]["shape"] == [4, 384] and o["model_version"] == "1" for o in ok)
        assert all(st == 500 and "non-empty string" in body["error"] for k, (st, body) in results if k == "bad")
        assert all(st == 400 and "unexpected inference input 'texts'" in body["error"] for st, body in wrong_name)

        # the gRPC endpoint, with Triton's own client (installed with PyTriton): 3 good requests, 1 bad
        grpc = subprocess.run([python, "-c", _GRPC_CLIENT, ready["grpc"]], capture_output=True, text=True, timeout=120)
        assert grpc.returncode == 0, grpc.stderr[-2000:]
        assert json.loads(grpc.stdout.strip().splitlines()[-1]) == {"shapes": [[2, 384]] * 3, "bad": "failed"}

        n_bad, n_ok = kinds.count("bad") + 1, len(kinds) - kinds.count("bad") + 3
        items = 4 * (len(kinds) - kinds.count("bad")) + 2 * 3
        want = {
            'sum(normscope_inference_requests_total{model="minilm",model_version="1"})': n_bad + n_ok,
            'sum(normscope_inference_failures_total{reason="bad_input"})': n_bad,
            'sum(normscope_inference_failures_total{reason!="bad_input"})': 0,
            'sum(nv_inference_request_success{model="minilm",version="1"})': n_ok,
            'sum(nv_inference_request_failure{model="minilm",version="1",reason="BACKEND"})': n_bad,
            'sum(nv_inference_request_failure{model="minilm",version="1",reason!="BACKEND"})': 0,
            'sum(nv_inference_count{model="minilm",version="1"})': items,
        }
        want_firing = {"NormscopePredictionDrift", "NormscopeErrorBudgetFastBurn"}
        values, firing, join = {}, set(), {}
        while time.monotonic() < deadline:
            try:
                values = {q: [float(r["value"][1]) for r in _query(papi, q)] for q in want}
                join = {q: _query(papi, q) for q in (
                    "model_version:normscope_inference_requests:per_triton_request_ratio_rate5m",
                    "model_version:normscope_inference_request_duration_seconds:share_of_triton_mean5m",
                    "model_version:nv_inference_queue_duration_us:mean_seconds_5m")}
                firing = {(a["labels"]["alertname"], a["labels"].get("model_version")) for a in _alerts(papi)
                          if a["state"] == "firing"}
            except (OSError, ValueError, KeyError):
                time.sleep(0.5)
                continue
            if (all(values[q] == [float(v)] for q, v in want.items()) and all(join.values())
                    and {(a, "1") for a in want_firing} <= firing):
                break
            time.sleep(0.5)
        assert {q: values.get(q) for q in want} == {q: [float(v)] for q, v in want.items()}
        for name, result in join.items():  # the join by (model, model_version) found both sides
            assert [r["metric"] for r in result] == [{"__name__": name, "model": "minilm", "model_version": "1"}], join
        ratio = float(join["model_version:normscope_inference_requests:per_triton_request_ratio_rate5m"][0]["value"][1])
        share = float(join["model_version:normscope_inference_request_duration_seconds:share_of_triton_mean5m"][0]
                      ["value"][1])
        assert 0.8 < ratio < 1.25, ratio  # one normscope request per Triton request (rates of two scrape offsets)
        assert 0.0 < share < 1.5, share
        assert {(a, "1") for a in want_firing} <= firing, firing
        drift = _query(papi, 'normscope_prediction_drift{metric="psi",statistic="row_cosine",model_version="1"}')
        assert drift and float(drift[0]["value"][1]) >= 0.1
        assert server.poll() is None
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert any(s.startswith('{"event": "stopped"}') for s in lines), lines[-3:]
    finally:
        _stop(server)
        _stop(prom)
        server_err.close()
        prom_log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.triton_server
def test_module_exits_2_with_a_clear_message_for_a_version_triton_cannot_serve():
    python = _venv_python()
    proc = subprocess.run([python, "-m", "normscope.serving.triton", "--model-version", "v2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"error: Expected model_version to be a positive integer \(Triton versions are\), but got 'v2'",
                     proc.stderr)
