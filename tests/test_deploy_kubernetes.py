"""deploy/kubernetes: every manifest parses, and ports, labels, selectors, paths and metric names agree with the
example server, the metric catalogue and the promtool-tested alert rules (checked offline, without a cluster)."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_deploy_prometheus import (
    CATALOGUE,
    RULE_FILES,
    _promtool_ok,
    check_promql_syntax,
    load_rules,
    recording_rule_names,
    unknown_metric_names,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
SERVER = ROOT / "examples" / "serving" / "server.py"
ADAPTER_VALUES = K8S / "prometheus-adapter-values.yaml"
NOT_MANIFESTS = {"kustomization.yaml", ADAPTER_VALUES.name}


def _manifests() -> dict:
    """kind -> the one manifest of that kind (every file but the kustomization and the adapter's Helm values)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_MANIFESTS:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path.name
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = dict(doc, _file=path.name)
    return out


def _server_interface() -> tuple:
    """(routes {path: methods}, argparse option names) of examples/serving/server.py, read from its source."""
    tree = ast.parse(SERVER.read_text())
    routes, options = None, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "routes" for t in node.targets):
            routes = ast.literal_eval(node.value)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    assert routes and options
    return routes, options


def _serving_job() -> str:
    """The scrape job the alert rules select (``job="..."``)."""
    jobs = {m for r in load_rules() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert len(jobs) == 1, jobs
    return jobs.pop()


def _quantity(value) -> float:
    """A Kubernetes quantity ("200m", "1", "0.5") as a float."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _container(manifests) -> dict:
    containers = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _arg(args: list, name: str) -> str:
    assert name in args, (name, args)
    return args[args.index(name) + 1]


def test_every_manifest_parses_and_the_kustomization_lists_them():
    manifests = _manifests()
    assert set(manifests) == {"Deployment", "Service", "ServiceMonitor", "PrometheusRule",
                              "HorizontalPodAutoscaler"}
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == sorted(m["_file"] for m in manifests.values())
    assert manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert manifests["Deployment"]["apiVersion"] == "apps/v1"
    assert manifests["ServiceMonitor"]["apiVersion"] == manifests["PrometheusRule"]["apiVersion"] == \
        "monitoring.coreos.com/v1"


def test_deployment_runs_the_example_server_with_probes_on_its_endpoints():
    m = _manifests()
    routes, options = _server_interface()
    dep = m["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    c = _container(m)
    assert c["command"][-1] == "examples/serving/server.py" and (ROOT / c["command"][-1]).is_file()
    args = c["args"]
    assert {a for a in args if a.startswith("--")} <= options, "an option the server does not have"
    assert _arg(args, "--host") == "0.0.0.0"  # the default 127.0.0.1 is unreachable from the kubelet
    (port,) = c["ports"]
    assert port["containerPort"] == int(_arg(args, "--port"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and "GET" in routes[get["path"]], probe
        assert get["port"] in (port["name"], port["containerPort"]), probe
    req = c["resources"]["requests"]
    assert _quantity(req["cpu"]) > 0 and req["memory"]
    assert c["resources"]["limits"]["memory"]
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {port['containerPort']}$", dockerfile, re.M)


def test_service_and_servicemonitor_select_the_pods_and_give_the_job_the_rules_expect():
    m = _manifests()
    routes, _ = _server_interface()
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = m["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    c = _container(m)
    assert svc_port["targetPort"] in (c["ports"][0]["name"], c["ports"][0]["containerPort"])
    mon = m["ServiceMonitor"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"]
    assert endpoint["path"] == "/metrics" and "GET" in routes["/metrics"]
    # the operator sets job from the Service label named by jobLabel: it must be the job the alerts select
    assert svc["metadata"]["labels"][mon["spec"]["jobLabel"]] == _serving_job() == "normscope-serving"
    # the PrometheusRule is picked by a ruleSelector on the same labels as the rest of the app
    assert m["PrometheusRule"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == \
        svc["metadata"]["labels"]["app.kubernetes.io/part-of"]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prometheusrule_is_generated_from_the_promtool_tested_rules(tmp_path):
    gen = _generator()
    assert (K8S / "prometheusrule.yaml").read_text() == gen.render(), \
        "stale: run python deploy/kubernetes/gen_prometheusrule.py"
    (rules_file,) = RULE_FILES
    spec = _manifests()["PrometheusRule"]["spec"]
    assert spec["groups"] == yaml.safe_load(rules_file.read_text())["groups"]
    # the groups as the operator hands them to Prometheus pass promtool too
    (tmp_path / "from_k8s.yml").write_text(yaml.safe_dump({"groups": spec["groups"]}))
    _promtool_ok("check", "rules", str(tmp_path / "from_k8s.yml"))
    # a changed rule makes the generated text differ (the equality above is not vacuous)
    changed = tmp_path / "rules.yml"
    changed.write_text(rules_file.read_text().replace("> 0.25", "> 0.3", 1))
    assert gen.render(changed) != gen.render()
    proc = subprocess.run([sys.executable, str(K8S / "gen_prometheusrule.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _adapter_rule() -> dict:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_hpa_scales_the_deployment_on_the_adapter_p95_metric_below_the_slo():
    m = _manifests()
    hpa, dep = m["HorizontalPodAutoscaler"], m["Deployment"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (dep["apiVersion"], dep["kind"], dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = _adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    slo = [r for r in load_rules() if r.get("alert") == "NormscopeLatencyP95High"][0]
    threshold = float(re.search(r">\s*([0-9.]+)", slo["expr"]).group(1))
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < _quantity(metric["pods"]["target"]["averageValue"]) < threshold


def test_adapter_rule_uses_the_latency_histogram_of_the_catalogue(tmp_path):
    rule = _adapter_rule()
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series.endswith("_bucket") and CATALOGUE[series[: -len("_bucket")]].type == "histogram"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per pod, for a Pods metric
    # the query as prometheus-adapter expands it for one pod
    expr = (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="default",pod="normscope-serving-0"')
            .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in expr
    assert unknown_metric_names(expr, recording_rule_names()) == []
    quantile = float(re.search(r"histogram_quantile\(([0-9.]+)", expr).group(1))
    assert f"_p{round(quantile * 100)}" in rule["name"]["as"]
    check_promql_syntax([("prometheus-adapter metricsQuery", expr)], tmp_path)


def test_the_checks_catch_a_metric_outside_the_catalogue():
    # the helper the adapter test relies on flags a latency histogram name that the code does not export
    assert unknown_metric_names("rate(normscope_request_latency_seconds_bucket[2m])", set()) == \
        ["normscope_request_latency_seconds_bucket"]


# --- Triton Inference Server (deploy/kubernetes/triton) -------------------------------------------------------------

TRITON = K8S / "triton"


def _triton_manifests() -> dict:
    out = {}
    for path in sorted(TRITON.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = dict(doc, _file=path.name)
    return out


def test_triton_manifests_parse_and_the_kustomization_lists_them():
    m = _triton_manifests()
    assert set(m) == {"Deployment", "Service", "ServiceMonitor"}
    kust = yaml.safe_load((TRITON / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(d["_file"] for d in m.values())
    # the shared rules are named in its comment, to be applied once for both services
    assert "prometheusrule.yaml" in (TRITON / "kustomization.yaml").read_text()
    assert (K8S / "prometheusrule.yaml").is_file()


def test_triton_deployment_runs_the_module_with_its_ports_and_tritons_health_endpoints():
    from normscope.serving.triton import _parser

    m = _triton_manifests()
    dep = m["Deployment"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = _container(m)
    assert c["command"] == ["python", "-m", "normscope.serving.triton"]
    a = _parser().parse_args(c["args"])  # every option exists (argparse exits on an unknown one)
    assert a.host == "0.0.0.0" and int(a.model_version) >= 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": a.http_port, "grpc": a.grpc_port, "triton-metrics": a.triton_metrics_port,
                     "metrics": a.metrics_port}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):  # KServe v2 (tests/test_serving_triton.py)
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    mounts = {v["mountPath"] for v in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm"} <= mounts and c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HOME"].startswith("/tmp") and env["TMPDIR"].startswith("/tmp")
    dockerfile = (TRITON / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE " + " ".join(str(p) for p in sorted(ports.values())) + "$", dockerfile, re.M)
    assert "triton-server" in dockerfile


def test_triton_service_and_servicemonitor_scrape_both_endpoints_as_the_jobs_the_rules_expect():
    m = _triton_manifests()
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = m["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in _container(m)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == container_ports
    mon = m["ServiceMonitor"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    jobs = {}
    for e in mon["spec"]["endpoints"]:
        assert e["port"] in {p["name"] for p in svc["spec"]["ports"]} and e["path"] == "/metrics"
        (relabel,) = e["relabelings"]
        assert relabel["targetLabel"] == "job"
        jobs[e["port"]] = relabel["replacement"]
    assert jobs == {"triton-metrics": "triton", "metrics": _serving_job()}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(K8S)) for p in [*K8S.glob("*.yaml"), *TRITON.glob("*.yaml")]))
def test_yaml_files_have_no_tabs_and_end_with_a_newline(path):
    text = (K8S / path).read_text()
    assert "\t" not in text and text.endswith("\n")
