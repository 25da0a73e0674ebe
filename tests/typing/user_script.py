"""A user's script that calls every public function of normscope, checked with ``mypy --strict``.

tests/test_typing.py runs mypy on this file (the typing contract of the public API: the package ships
``py.typed``) and runs it as a program (the calls are real, with a small model). Every name in the
``__all__`` of the modules listed in ``PUBLIC_MODULES`` must appear here: a public function added without
a call here fails that test.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

import normscope
import normscope.audit
import normscope.checks
import normscope.drift
import normscope.errors
import normscope.functional
import normscope.integrations.hf
import normscope.integrations.lightning
import normscope.integrations.mlflow
import normscope.report
import normscope.serving
from normscope.analysis import (
    PLACEMENTS,
    QUANT_FORMATS,
    DynamicInt8Report,
    ExportReport,
    FoldedNorm,
    FoldResult,
    LayerQuant,
    LayerReport,
    ModelReport,
    QuantReport,
    SkippedNorm,
    TFLiteReport,
    fake_quantize,
    sqnr_db,
)
from normscope.monitor import (
    FINDING_KINDS,
    SEVERITIES,
    SNAPSHOT_FORMAT,
    Finding,
    JSONLSink,
    Monitor,
    PrometheusSink,
    Sink,
    Table,
    TensorBoardSink,
    Thresholds,
    load,
    load_snapshot,
    save_snapshot,
)
from normscope.nn import ConvertResult, Replacement, Skipped
from normscope.ops.reference import (
    acc_dtype,
    add_layer_norm_ref,
    add_rms_norm_ref,
    layer_norm_ref,
    masked_layer_norm_ref,
    masked_rms_norm_ref,
    norm_bwd,
    norm_fwd,
    rms_norm_ref,
)

PUBLIC_MODULES = (
    "normscope",
    "normscope.nn",
    "normscope.analysis",
    "normscope.monitor",
    "normscope.checks",
    "normscope.drift",
    "normscope.errors",
    "normscope.serving",
    "normscope.report",
    "normscope.audit",
    "normscope.compare",
    "normscope.integrations.hf",
    "normscope.integrations.lightning",
    "normscope.integrations.mlflow",
    "normscope.serving.otel",
    "normscope.serving.triton",
    "normscope.functional",
    "normscope.ops.reference",
)


class Block(torch.nn.Module):
    """A pre-LN block: x + fc2(gelu(fc1(norm(x)))), then a final RMSNorm and a head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)
        self.final = torch.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        out: torch.Tensor = self.head(self.final(h))
        return out


def ops() -> None:
    x = torch.randn(4, 8, 16)
    w, b = torch.randn(16), torch.randn(16)
    mask = torch.ones(4, 8, 1, dtype=torch.bool)
    y: torch.Tensor = normscope.layer_norm(x, 16, w, b, 1e-5, offset=0.0)
    r: torch.Tensor = normscope.rms_norm(x, (16,), w, None)
    s: Tuple[torch.Tensor, torch.Tensor] = normscope.add_layer_norm(x, y, [16], w, b)
    t: Tuple[torch.Tensor, torch.Tensor] = normscope.add_rms_norm(x, r, 16, w)
    m1: torch.Tensor = normscope.masked_layer_norm(x, mask, 16, w, b)
    m2: torch.Tensor = normscope.masked_rms_norm(x, mask, 16, w)
    m3: torch.Tensor = normscope.masked_rms_norm(x, mask, 16, w, bias=b)
    torch.testing.assert_close(m3, m2 + b * mask)
    y_s, mean_s, rstd_s = normscope.layer_norm(x, 16, w, b, return_stats=True)
    r_s: Tuple[torch.Tensor, torch.Tensor] = normscope.rms_norm(x, 16, w, 1e-6, bias=b, return_stats=True)
    qk: torch.Tensor = normscope.rms_norm(x.view(4, 8, 2, 8), 8, torch.ones(2, 8))  # per-head weight
    print("stats:", tuple(mean_s.shape), tuple(rstd_s.shape), tuple(r_s[1].shape), tuple(qk.shape), y_s.dtype)
    ln: torch.nn.Module = normscope.nn.LayerNorm(16)
    ln2d: torch.nn.Module = normscope.nn.LayerNorm2d(4)
    print("channels-first:", tuple(ln2d(torch.randn(2, 4, 3, 3)).shape))
    rms: torch.nn.Module = normscope.nn.RMSNorm(16, weight_offset=1.0, bias=True)
    lstm = normscope.nn.LayerNormLSTM(16, 8, batch_first=True, bidirectional=True)
    seq, (h_n, c_n) = lstm(x, lengths=torch.tensor([8, 5, 3, 1]))
    gru = normscope.nn.LayerNormGRU(16, 8)
    seq2, g_n = gru(x.transpose(0, 1))
    h1, c1 = normscope.nn.LayerNormLSTMCell(16, 8)(x[:, 0])
    g1: torch.Tensor = normscope.nn.LayerNormGRUCell(16, 8)(x[:, 0], h1)
    print("recurrent:", tuple(seq.shape), tuple(h_n.shape), tuple(c_n.shape), tuple(seq2.shape), tuple(g_n.shape),
          tuple(c1.shape), tuple(g1.shape))
    outs = [y, r, s[0], s[1], t[0], t[1], m1, m2, ln(x), rms(x)]
    if not all(bool(torch.isfinite(o).all()) for o in outs):
        raise RuntimeError("Expected finite outputs from every op")
    refs = [
        layer_norm_ref(x, 16, w, b), rms_norm_ref(x, 16, w), add_layer_norm_ref(x, y, 16, w, b)[0],
        add_rms_norm_ref(x, r, 16, w)[0], masked_layer_norm_ref(x, mask, 16, w, b), masked_rms_norm_ref(x, mask, 16, w),
    ]
    for got, want in zip([y, r, s[0], t[0], m1, m2], refs):
        torch.testing.assert_close(got, want)
    same: torch.Tensor = normscope.functional.layer_norm(x, 16, w, b)
    torch.testing.assert_close(same, y)
    x2 = x.reshape(-1, 16)
    yy, hh, mean, rstd = norm_fwd(x2, None, None, w, b, 1e-5, False, None)
    dx, dw, db = norm_bwd(torch.ones_like(yy), None, x2, None, w, mean, rstd, False, True, x2.dtype)
    print("contract:", acc_dtype(x.dtype, torch.bfloat16), tuple(dx.shape), dw is not None, db is not None, hh)
    try:
        normscope.layer_norm(x, 15)
    except normscope.errors.ShapeError as e:
        err: normscope.errors.NormscopeError = e
        print("shape error:", type(err).__name__)
    for cls in (normscope.errors.DtypeError, normscope.errors.DeviceError):
        if not issubclass(cls, normscope.errors.NormscopeError):
            raise TypeError(f"Expected a NormscopeError subclass, but got {cls}")


def analysis(tmp: Path) -> None:
    model, x = Block().eval(), torch.randn(2, 5, 16)
    report: ModelReport = normscope.analyze(model, (x,))
    layers: List[LayerReport] = report.layers
    print("placements:", [(layer.name, layer.placement) for layer in layers], "of", PLACEMENTS)
    converted: ConvertResult = normscope.convert(Block())
    replaced: List[Replacement] = converted.replaced
    skipped: List[Skipped] = converted.skipped
    print("converted", len(replaced), "skipped", len(skipped))
    converted2: ConvertResult = normscope.nn.convert(Block(), filter_fn=lambda mod, name: name != "final")
    print("converted with a filter:", len(converted2.replaced))
    fold: FoldResult = normscope.fold_norms_(Block().eval(), (x,))
    folded: List[FoldedNorm] = fold.folded
    fskipped: List[SkippedNorm] = fold.skipped
    print("folded", [f.norm for f in folded], "skipped", [f.reason for f in fskipped])
    quant: QuantReport = normscope.quant_sensitivity(model, (x,), formats=("fp16", "int8"))
    lq: List[LayerQuant] = quant.layers
    dyn: Optional[DynamicInt8Report] = quant.dynamic_int8
    print("quant formats", QUANT_FORMATS, "worst", [q.worst_format for q in lq], dyn is not None)
    q: torch.Tensor = fake_quantize(x, "int8")
    print("sqnr", round(sqnr_db(x, q), 1))
    exported: ExportReport = normscope.export_onnx(model, (x,), tmp / "block.onnx")
    print("onnx ok:", exported.ok, exported.norm_nodes)
    export2: ExportReport = normscope.analysis.export_onnx(model, (x,), tmp / "block2.onnx", verify=False)
    print("exported without a check:", export2.path)
    try:
        tl: TFLiteReport = normscope.analysis.export_tflite(model, (x,), tmp / "block.tflite")
        print("tflite ok:", tl.ok, tl.norm_ops, tl.size_bytes)
    except ImportError as e:  # needs normscope[edge]
        print("tflite export needs the edge extra:", "normscope[edge]" in str(e))


def monitor(tmp: Path) -> None:
    model = Block()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks: List[Sink] = [JSONLSink(tmp / "m.jsonl"), TensorBoardSink(tmp / "tb"), PrometheusSink(port=None)]
    mon = Monitor(model, every=1, sinks=sinks, thresholds=Thresholds(variance_shift=2.0))
    for step in range(1, 4):
        loss = model(torch.randn(2, 5, 16)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(step)
    records: List[Dict[str, Any]] = mon.flush()
    found: List[Finding] = mon.findings()
    snap: Dict[str, Any] = mon.snapshot()
    save_snapshot(snap, tmp / "snap.json")
    again: Dict[str, Any] = load_snapshot(tmp / "snap.json")
    late: List[Finding] = mon.compare(again)
    state: Dict[str, Any] = mon.state_dict()
    mon.load_state_dict(state)
    with mon.paused():
        model(torch.randn(1, 16))
    mon.close()
    table: Table = load(tmp / "m.jsonl")
    print("records", len(records), "findings", len(found), len(late), "rows", len(table), SNAPSHOT_FORMAT)
    print("kinds", len(FINDING_KINDS), "severities", SEVERITIES)
    print("layers in the table:", sorted({str(v) for v in table.column("layer") if v is not None}))
    print("hf callback:", normscope.integrations.hf.NormscopeCallback.__name__, normscope.integrations.hf.STATE_FILE)
    print("lightning callback:", normscope.integrations.lightning.NormscopeCallback.__name__)


def checks() -> None:
    model, x = Block().eval(), torch.randn(3, 5, 16)
    ok: normscope.checks.CheckResult = normscope.checks.assert_batch_invariant(model, (x,))
    det: normscope.checks.CheckResult = normscope.checks.assert_deterministic(model, (x,), runs=2)
    mask = torch.ones(3, 5, dtype=torch.long)
    pad: normscope.checks.CheckResult = normscope.checks.assert_padding_invariant(model, (x,), mask, mask_arg=None)
    eps: normscope.checks.EpsCheckResult = normscope.checks.assert_eps_safe(model, torch.bfloat16)
    layers: List[normscope.checks.EpsLayer] = normscope.checks.eps_safety(model, torch.float16)
    print(ok.max_abs_diff, det.max_abs_diff, pad.check, len(eps.layers), len(layers))
    print("tolerances:", sorted(str(k) for k in normscope.checks.TOLERANCES))


def drift(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    ref, cur = rng.normal(size=(500, 3)), rng.normal(0.5, 1.0, size=(500, 3))
    print(normscope.drift.psi(ref[:, 0], cur[:, 0]), normscope.drift.js_distance(ref[:, 0], cur[:, 0]))
    print(normscope.drift.kl_divergence(ref[:, 0], cur[:, 0]), normscope.drift.wasserstein(ref[:, 0], cur[:, 0]))
    hist = normscope.drift.Histogram(np.array([1, 2, 3]), edges=np.array([0.0, 1.0, 2.0, 3.0]))
    print("histogram", hist, sorted(normscope.drift.METRICS), normscope.drift.DEFAULT_THRESHOLDS)
    base: normscope.drift.Baseline = normscope.drift.Baseline.from_outputs(ref, model_version="1")
    base.save(tmp / "base.npz")
    loaded = normscope.drift.Baseline.load(tmp / "base.npz")
    rep: normscope.drift.DriftReport = loaded.compare(cur)
    cols: Tuple[normscope.drift.ColumnDrift, ...] = tuple(rep.columns)
    window = normscope.drift.DriftWindow(loaded, window=200)
    window.update(cur)
    print("drifted", rep.drifted, len(cols), window.report().drifted)


def serving_and_report(tmp: Path) -> None:
    model = Block().eval()
    wrapped: normscope.serving.InstrumentedModel = normscope.serving.instrument(
        model, model="block", model_version="1", monitor_every=None
    )
    out = wrapped(torch.randn(2, 5, 16))
    print("served", tuple(out.shape), len(wrapped.metrics_text()) > 0)
    from normscope.serving.otel import (
        OTEL_HINT,
        OTEL_METRICS,
        SPAN_NAME,
        OtelInstrumentation,
        PrometheusBridgeReader,
        instrument_otel,
        locate_nonfinite,
        prometheus_name,
    )

    traced: OtelInstrumentation = instrument_otel(wrapped, metrics=True)
    wrapped(torch.randn(2, 5, 16))
    bridge = PrometheusBridgeReader(__import__("prometheus_client").CollectorRegistry())
    layer: Optional[str] = locate_nonfinite(torch.nn.LayerNorm(8), (torch.randn(2, 8),))
    otel_name: str = prometheus_name("a.b", "s", False)
    print("otel:", OTEL_HINT[:10], SPAN_NAME, len(OTEL_METRICS), layer, otel_name, type(bridge).__name__)
    traced.uninstrument()
    from normscope.serving.triton import (
        TRITON_HINT,
        TensorSpec,
        TritonService,
        backend_library_dir,
        decode_texts,
        infer_texts,
        main,
        minilm_service,
        prepare_backend_environment,
    )

    env: Dict[str, str] = {}
    libdir: Optional[str] = backend_library_dir()
    added: Optional[str] = prepare_backend_environment(env)
    texts: List[str] = decode_texts(np.array([[b"a text"]], dtype=object))

    def from_request(request: Dict[str, Any]) -> Tuple[torch.Tensor]:
        return (torch.from_numpy(request["x"]),)

    for_triton = normscope.serving.instrument(model, model="block", model_version="1", monitor_every=None,
                                              preprocess=from_request)
    service = TritonService(for_triton, inputs=[TensorSpec("x", np.float32, (5, 16))],
                            outputs=[TensorSpec("y", np.float32, (5, 16))], model_version=1)
    responses: List[Dict[str, Any]] = service.infer([{"x": np.zeros((1, 5, 16), np.float32)}])
    for_triton.close()
    try:
        http_status, http_body = infer_texts("http://127.0.0.1:9", ["a"], timeout=0.5)  # nothing listens there
    except OSError:
        http_status, http_body = 0, {}
    minilm: TritonService = minilm_service(telemetry=False)
    code: int = main(["--model-version", "v1"])  # not a Triton version: exit code 2, nothing started
    print("triton:", TRITON_HINT[:10], libdir == added or added is None, texts, len(responses), http_status, http_body,
          minilm.model_name, code, service.http_url)

    @normscope.serving.instrumented(model="fn", model_version="2")
    def predict(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    predict(torch.ones(2, 3))
    server: normscope.serving.MetricsServer = normscope.serving.start_http_server(wrapped.registry, 0)
    print("metrics at", server.url)
    server.close()
    text: bytes = normscope.serving.metrics_text(wrapped.registry)
    print("metrics", len(text), normscope.serving.CONTENT_TYPE_LATEST)
    metric: normscope.serving.Metric = normscope.serving.get_metric("normscope_inference_requests_total") \
        if hasattr(normscope.serving, "get_metric") else normscope.serving.METRICS[0]
    print("catalogue", len(normscope.serving.METRICS), metric.name)
    drift_of: Dict[Tuple[str, str], Dict[str, float]] = normscope.serving.param_drift(model, model.state_dict())
    config: Dict[str, Any] = normscope.serving.norm_config(model)
    fp: str = normscope.serving.config_fingerprint(config)
    diffs: List[str] = normscope.serving.config_differences(config, config)
    print(len(drift_of), fp == normscope.serving.fingerprint(model), diffs)
    for exc in (normscope.serving.BadInputError, normscope.serving.NonFiniteOutputError):
        print("serving error:", exc.__name__)
    wrapped.close()
    predict.close()

    result: Dict[str, Any] = normscope.audit.run_audit(
        model, (torch.randn(2, 5, 16),), steps=("analysis", "monitor"),
        thresholds=normscope.audit.AuditThresholds(),
    )
    print(normscope.audit.summary_text(result), normscope.audit.STEPS, len(normscope.audit.AUDIT_FINDING_KINDS))
    normscope.report.write_html(result, tmp / "r.html")
    html: str = normscope.report.render_html(result)
    mit: normscope.report.Mitigation = normscope.report.mitigation_for("nonfinite")
    print(len(html), mit.failure_mode, len(normscope.report.MITIGATIONS), len(normscope.report.FAILURE_MODES))
    (tmp / "audit.json").write_text(__import__("json").dumps(result))
    baseline: Dict[str, Any] = normscope.audit.load_baseline(str(tmp / "audit.json"))
    print("baseline keys", len(baseline))
    import normscope.compare as canary

    gate: Dict[str, Any] = canary.compare(
        model, __import__("copy").deepcopy(model), (torch.randn(2, 5, 16),),
        thresholds=canary.CompareThresholds(latency_ratio=float("inf")), latency=False, quantization=False)
    stored: Dict[str, Any] = canary.load_audit_json(str(tmp / "audit.json"))
    print(canary.summary_text(gate), len(canary.CHECKS), len(stored))
    if gate["verdict"] != "go":
        raise RuntimeError(f"Expected an identical model to be a go, but got {gate['verdict']}")
    try:
        chromium: str = normscope.report.find_chromium()
    except FileNotFoundError:
        print("no chromium: screenshot not taken")
    else:
        png: Path = normscope.report.screenshot(tmp / "r.html", tmp / "r.png", width=800, height=600,
                                                chromium=chromium)
        dom: str = normscope.report.dump_dom(tmp / "r.html", chromium=chromium)
        print("screenshot", png.stat().st_size > 0, len(dom))

    status: str = normscope.integrations.mlflow.audit_status(result)
    print("mlflow status", status, normscope.integrations.mlflow.ARTIFACT_DIR)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    example = (torch.randn(2, 5, 16),)
    logged: normscope.integrations.mlflow.LoggedAudit = normscope.integrations.mlflow.log_audit(
        result, model=model, example_inputs=example, tracking_uri=uri,
        register="block",
    )
    reg: normscope.integrations.mlflow.RegisteredAudit = normscope.integrations.mlflow.load_registered(
        "block", logged.model_version, tracking_uri=uri
    )
    served: normscope.serving.InstrumentedModel = normscope.integrations.mlflow.instrument_registered(
        model, "block", logged.model_version, tracking_uri=uri, config_inputs=example, monitor_every=None
    )
    served.close()
    print("registered", reg.status)


def main(argv: List[str]) -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(argv[1]) if len(argv) > 1 else Path(d)
        ops()
        analysis(tmp)
        monitor(tmp)
        checks()
        drift(tmp)
        serving_and_report(tmp)
    print("normscope", normscope.__version__, "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
