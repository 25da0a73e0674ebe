"""``normscope.audit``: everything normscope can say about the normalization layers of one model, in one pass.

:func:`run_audit` runs, in order, each as a *step* that may fail without stopping the others:

1. ``analysis`` -- :func:`normscope.analyze`: placement, consumers, foldability, eps/dtype risks.
2. ``monitor`` -- a :class:`normscope.Monitor`-ed forward pass over the inputs and, when the model has
   trainable parameters, a backward pass of a fixed random linear probe of the outputs (so that every
   layer gets a gradient whatever the model's head): per-layer input statistics, histograms, NaN/Inf,
   eps-dominated rows, gradient norms, and ``compare(baseline)`` when a baseline is given.
3. ``export`` -- :func:`normscope.export_onnx` into a temporary file, checked with onnxruntime.
4. ``quantization`` -- :func:`normscope.analysis.quant_sensitivity`: SQNR of the output per layer and
   format, and of the whole model after dynamic int8 quantization of its Linear layers.
5. ``profile`` -- forward time, the time spent inside the normalization layers (the guide's F3 latency
   signal), and the top operators under ``torch.profiler``.

The result is one JSON-friendly dict (schema: ``docs/audit.md``) that the terminal summary
(:func:`summary_text`) and the HTML report (:func:`normscope.report.write_html`) both render. Its
``findings`` merge the monitor's findings with the audit's own (kinds in :data:`AUDIT_FINDING_KINDS`);
``exit_code`` is 1 when one of them has severity ``error``, else 0.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import datetime
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from normscope.analysis.onnx_export import _eval_mode
from normscope.analysis.placement import _split_inputs

__all__ = ["run_audit", "summary_text", "AUDIT_FINDING_KINDS", "AuditThresholds", "STEPS", "load_baseline"]

#: The steps of an audit, in order.
STEPS = ("analysis", "monitor", "export", "quantization", "profile")

#: Finding kinds the audit adds to the monitor's (``normscope.monitor.FINDING_KINDS``).
AUDIT_FINDING_KINDS: Dict[str, str] = {
    "eps_underflow": "eps underflows to 0 (or is subnormal) in the dtype the statistics are computed in",
    "reduced_precision": "statistics computed in float16/bfloat16 without a float32 upcast",
    "eps_inconsistent": "eps differs between layers of the same kind",
    "post_ln_depth": "post-LN layers: gradients of the first layers shrink with depth (warm-up needed)",
    "not_foldable": "norms that cannot be folded into the following Linear layers, and why",
    "quant_sensitive": "rounding this layer's gamma/beta alone costs output SQNR below the threshold",
    "gamma_outliers": "gamma channels far larger than the layer's median: they set the quantization scale",
    "int8_degradation": "dynamic int8 quantization of the Linear layers moves the output beyond the threshold",
    "export_failed": "the ONNX export failed",
    "export_mismatch": "the ONNX model under onnxruntime differs from PyTorch, or lost norm operators",
    "export_unverified": "onnxruntime could not run the exported graph, so it was not compared with PyTorch",
    "norm_latency": "a large share of the forward time is spent in normalization layers",
}


class AuditThresholds:
    """The thresholds that turn audit measurements into findings (defaults in parentheses).

    Attributes:
        quant_sqnr_db: a layer whose worst per-format output SQNR is below this is ``quant_sensitive`` (20 dB,
            warning; below ``quant_sqnr_error_db`` (10 dB) an error).
        gamma_outlier_ratio: max |gamma| / median |gamma| above this is ``gamma_outliers`` (info) (20).
        int8_sqnr_db, int8_cosine: dynamic int8 output SQNR below (20 dB) or mean cosine below (0.99) is
            ``int8_degradation`` (warning).
        norm_share: normalization share of the forward time above this is ``norm_latency`` (warning) (0.10).
    """

    def __init__(self, *, quant_sqnr_db: float = 20.0, quant_sqnr_error_db: float = 10.0,
                 gamma_outlier_ratio: float = 20.0, int8_sqnr_db: float = 20.0, int8_cosine: float = 0.99,
                 norm_share: float = 0.10):
        self.quant_sqnr_db = quant_sqnr_db
        self.quant_sqnr_error_db = quant_sqnr_error_db
        self.gamma_outlier_ratio = gamma_outlier_ratio
        self.int8_sqnr_db = int8_sqnr_db
        self.int8_cosine = int8_cosine
        self.norm_share = norm_share

    def to_dict(self) -> Dict[str, float]:
        return dict(vars(self))


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _finite_or_none(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _call(model: torch.nn.Module, example_inputs):
    args, kwargs = _split_inputs(example_inputs)
    return model(*args, **kwargs)


def _cast_inputs(example_inputs, dtype: torch.dtype):
    """Floating tensors of the inputs cast to ``dtype`` (ids and masks untouched)."""
    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return v

    if isinstance(example_inputs, torch.Tensor):
        return cast(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(cast(v) for v in example_inputs)
    if isinstance(example_inputs, collections.abc.Mapping):
        return {k: cast(v) for k, v in example_inputs.items()}
    return example_inputs


def _describe_inputs(example_inputs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__

    if isinstance(example_inputs, torch.Tensor):
        return one(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return ", ".join(one(v) for v in example_inputs)
    if isinstance(example_inputs, collections.abc.Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in example_inputs.items())
    return type(example_inputs).__name__


def _small_config(model: torch.nn.Module) -> Dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        for m in model.modules():
            config = getattr(m, "config", None)
            if config is not None:
                break
    if config is None or not hasattr(config, "to_dict"):
        return {}
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "n_embd", "n_layer", "n_head",
            "d_model", "num_layers", "vocab_size", "max_position_embeddings", "torch_dtype", "dtype")
    try:
        d = config.to_dict()
    except Exception:  # noqa: BLE001 - a config we cannot read is left out
        return {}
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()
            if k in keep}


def _environment(device: torch.device) -> Dict[str, str]:
    import normscope
    from normscope.ops import dispatch

    try:
        backend = dispatch.default_backend(device)
    except Exception as e:  # noqa: BLE001
        backend = f"unknown ({type(e).__name__})"
    return {"python": platform.python_version(), "torch": torch.__version__, "normscope": normscope.__version__,
            "platform": platform.platform(terse=True), "machine": platform.machine(),
            "threads": str(torch.get_num_threads()), "backend": backend, "device": str(device)}


def read_json(path: str, expected: str) -> Any:
    """The JSON in ``path``; a ValueError "Expected the baseline PATH to be {expected}, but it does not parse"
    when it is not JSON (OSError when it cannot be read)."""
    import json

    with open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"Expected the baseline {path!r} to be {expected}, but it does not parse: {e}") from e


def load_baseline(path: str) -> dict:
    """A monitor snapshot to compare against: a snapshot file (``save_snapshot``) or an audit JSON.

    Raises:
        ValueError: the file is neither.
        OSError: it cannot be read.
    """
    data = read_json(path, "JSON (a monitor snapshot or an audit JSON)")
    if isinstance(data, dict) and isinstance(data.get("snapshot"), dict):
        data = data["snapshot"]
    if not (isinstance(data, dict) and isinstance(data.get("layers"), dict) and "format" in data):
        raise ValueError(f"Expected the baseline {path!r} to be a monitor snapshot (normscope.monitor.save_snapshot) "
                         "or the JSON of a previous audit (--json), but it is neither")
    return data


# ----------------------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------------------


class _StepFailed(Exception):
    """Raised by a step whose own error handling kept partial results: the step is reported as failed."""


class _Audit:
    def __init__(self, model, example_inputs, thresholds: AuditThresholds, progress):
        self.model = model
        self.inputs = example_inputs
        self.t = thresholds
        self.progress = progress
        self.findings: List[dict] = []
        self.steps: List[dict] = []
        self.layers: Dict[str, dict] = {}  # name -> layer entry, in discovery order
        self.result: Dict[str, Any] = {}

    def finding(self, kind: str, severity: str, message: str, *, layer: Optional[str] = None,
                step: Optional[int] = None, value: Optional[float] = None, source: str) -> None:
        self.findings.append({"layer": layer, "step": step, "kind": kind, "severity": severity,
                              "value": None if value is None else float(value), "message": message,
                              "source": source})

    def run_step(self, index: int, total: int, name: str, fn: Callable[[], Optional[str]]) -> None:
        if self.progress is not None:
            self.progress(index, total, name, None)
        t0 = time.perf_counter()
        status, message = "ok", None
        try:
            note = fn()
            if note:
                status, message = "skipped", note
        except _StepFailed as e:
            status, message = "failed", str(e)
        except ImportError as e:
            status, message = "skipped", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        except Exception as e:  # noqa: BLE001 - one failing step must not lose the others
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            status, message = "failed", f"{type(e).__name__}: {line}" if line else type(e).__name__
        seconds = time.perf_counter() - t0
        self.steps.append({"name": name, "status": status, "seconds": round(seconds, 3), "message": message})
        if self.progress is not None:
            self.progress(index, total, name, self.steps[-1])

    # --- 1. analysis ------------------------------------------------------------------------------------

    def analysis(self) -> None:
        from normscope.analysis import analyze

        report = analyze(self.model, self.inputs)
        for lr in report.layers:
            entry = self.layers.setdefault(lr.name, {"name": lr.name})
            entry.update(lr.to_dict())
            for risk in lr.risks:
                if "without a float32 upcast" in risk:
                    kind, severity = "reduced_precision", "warning"
                elif "differs from the eps" in risk:
                    kind, severity = "eps_inconsistent", "info"
                else:  # eps underflow / subnormal: judged below by the rule of checks.assert_eps_safe
                    continue
                self.finding(kind, severity, f"{lr.name}: {risk}", layer=lr.name, source="analysis")
        self._eps_rule()
        # Post-LN in Xiong et al.'s sense: the norm takes the residual sum x + f(x). A stem or embedding norm that
        # only feeds the residual stream (a conv stem's norm, BERT's embeddings.LayerNorm) is not one.
        post = [lr for lr in report.layers if lr.placement == "post"
                and any(tuple(p) == ("add", "residual") for p in lr.producers)]
        if post:
            n = len(post)
            self.finding("post_ln_depth", "info",
                         f"{n} of {len(report.layers)} norm layers are post-LN (the norm follows the residual add): "
                         "at initialisation the gradients of the first layers shrink with depth (Xiong et al., "
                         "2020); fine-tune with learning-rate warm-up, or prefer pre-LN for deep models",
                         layer=post[0].name, value=n, source="analysis")
        called = [lr for lr in report.layers if lr.placement != "unused"]
        not_foldable = [lr for lr in called if not lr.foldable]
        if called and not_foldable:
            reasons = collections.Counter(lr.fold_reason for lr in not_foldable)
            reason, count = reasons.most_common(1)[0]
            self.finding("not_foldable", "info",
                         f"{len(not_foldable)} of {len(called)} norm layers cannot be folded into the following "
                         f"Linear layers for inference (most common reason, {count} layers: {reason})",
                         value=len(not_foldable), source="analysis")
        self.result["analysis"] = {"model": report.model, "risks": list(report.risks)}

    def _eps_rule(self) -> None:
        """``eps_underflow`` findings by the one eps/dtype rule (:func:`normscope.checks.eps_safety`), in the
        dtype the model runs in: an error where :func:`normscope.checks.assert_eps_safe` fails, else a warning
        for a subnormal eps."""
        from normscope.checks import eps_safety

        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        for layer in eps_safety(self.model, dtype):
            if layer.problem:
                self.finding("eps_underflow", "error", f"{layer.name}: {layer.problem} (as assert_eps_safe judges "
                             f"it: use an eps that {str(dtype).replace('torch.', '')} represents, e.g. 1e-5, or keep "
                             "this layer in float32)", layer=layer.name, value=layer.effective_eps, source="analysis")
            elif "subnormal" in layer.note:
                note = next(n for n in layer.note.split("; ") if "subnormal" in n)
                self.finding("eps_underflow", "warning", f"{layer.name}: {note}", layer=layer.name,
                             value=layer.effective_eps, source="analysis")

    # --- 2. monitor -------------------------------------------------------------------------------------

    def monitor(self, baseline: Optional[dict]) -> None:
        from normscope.analysis.quant import _float_tensors
        from normscope.discovery import find_norm_layers
        from normscope.monitor import Monitor

        model = self.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        backward = bool(trainable) and torch.is_grad_enabled()
        try:  # eval mode, dropout off: statistics of what the model computes at inference
            with _eval_mode(model), Monitor(model, every=1, flush_every=None, grads=backward) as mon:
                if backward:
                    out = _call(model, self.inputs)
                    outs: List[torch.Tensor] = []
                    _float_tensors(out, outs)
                    if not outs:
                        raise ValueError("Expected the model output to contain a floating-point tensor, but found "
                                         f"none in {type(out).__name__}")
                    gen = torch.Generator().manual_seed(0)
                    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
                               / math.sqrt(o.numel()) for o in outs)
                    loss.backward()
                else:
                    with torch.no_grad():
                        _call(model, self.inputs)
                mon.step()
                records = mon.flush()
                snapshot = mon.snapshot()
                findings = list(mon.findings())
                if baseline is not None:
                    findings += mon.compare(baseline)
        finally:
            if backward:
                for p in trainable:
                    p.grad = None
        run = next((r for r in mon.records if r.get("type") == "run"), None)
        self.result["hist_edges"] = list(run["hist_edges"]) if run else None
        self.result["snapshot"] = snapshot
        self.result["monitor"] = {"backward": backward, "trainable_parameters": sum(p.numel() for p in trainable),
                                  "baseline": baseline is not None,
                                  "backward_note": None if backward else "no backward pass: the model has no "
                                  "trainable parameters (or grad mode is off)"}
        for r in records:
            if r.get("type") != "layer_stats":
                continue
            entry = self.layers.setdefault(r["layer"], {"name": r["layer"]})
            stats = {k: v for k, v in r.items() if k not in ("type", "layer", "in_hist")}
            entry["stats"] = stats
            entry["in_hist"] = list(r["in_hist"]) if r.get("in_hist") is not None else None
        scaled = _layer_scaled(model)
        for f in findings:
            severity, message = f.severity, f.message
            if f.kind == "grad_outlier" and scaled:
                severity, message = self._grad_outlier_in_context(f, scaled)
            self.finding(f.kind, severity, message, layer=f.layer, step=f.step, value=f.value, source="monitor")
        # gamma vectors and their outlier channels (cheap, from the parameters themselves)
        for layer in find_norm_layers(model):
            entry = self.layers.setdefault(layer.name, {"name": layer.name})
            w = getattr(layer.module, "weight", None)
            if isinstance(w, torch.Tensor) and w.numel() > 0 and w.device.type != "meta":
                g = w.detach().float().flatten().cpu()
                entry["gamma"] = [round(float(v), 6) for v in g]
                entry["gamma_outliers"] = _outliers(g)

    def _grad_outlier_in_context(self, f, scaled: Dict[str, float]) -> Tuple[str, str]:
        """``(severity, message)`` of a ``grad_outlier`` finding in a model with layer scale (ConvNeXt, CaiT):
        at initialisation a layer scale of ~1e-6 multiplies each residual branch, so the norms inside the branches
        get ~1e-6 of the gradient by design. A vanishing gradient inside such a branch, and an exploding one that
        is large only next to those branches, are expected there: reported as info, with the reason."""
        name = f.layer
        if name in scaled and (f.value or 0.0) < 1.0:
            return "info", (f"{f.message} (expected at initialisation: a layer scale of {scaled[name]:.0e} "
                            "multiplies this residual branch)")
        if (f.value or 0.0) > 1.0:
            metric = "grad_input_norm" if f.message.startswith("input gradient") else "grad_param_norm"
            values = {n: (e.get("stats") or {}).get(metric) for n, e in self.layers.items()}
            mine = values.get(name)
            others = [v for n, v in values.items() if n != name and n not in scaled and v and math.isfinite(v)]
            if mine and len(others) >= 2:
                ratio = mine / statistics.median(others)
                if ratio <= 100.0:
                    return "info", (f"{f.message} (expected at initialisation: {sum(n in scaled for n in values)} "
                                    f"layers sit in residual branches scaled by a layer scale of about "
                                    f"{max(scaled.values()):.0e}; against the other layers it is {ratio:.3g}x)")
        return f.severity, f.message

    # --- 3. export --------------------------------------------------------------------------------------

    def export(self, opset: Optional[int], cache: bool) -> Optional[str]:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)}: pip install 'normscope[onnx]'"
        from normscope.analysis.onnx_export import DEFAULT_OPSET, export_onnx

        opset = DEFAULT_OPSET if opset is None else opset
        with tempfile.TemporaryDirectory(prefix="normscope-audit-") as d:
            try:
                with warnings.catch_warnings(), _quiet():
                    warnings.simplefilter("ignore")
                    rep = export_onnx(self.model, self.inputs, os.path.join(d, "model.onnx"), opset=opset,
                                      cache_dir=_export_cache_dir() if cache else None)
            except Exception as e:  # noqa: BLE001 - a model that does not export is a finding, not a crash
                line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                msg = f"{type(e).__name__}: {line}" if line else type(e).__name__
                self.result["export"] = {"ok": False, "opset": opset, "exporter": "dynamo", "norm_nodes": {},
                                         "expected_norms": None, "max_abs_diff": None, "max_rel_diff": None,
                                         "error": msg, "warnings": []}
                self.finding("export_failed", "warning", f"the ONNX export (opset {opset}) failed: {msg}",
                             source="export")
                raise _StepFailed(msg) from e
        self.result["export"] = {"ok": rep.ok, "opset": rep.opset, "exporter": rep.exporter,
                                 "norm_nodes": dict(rep.norm_nodes), "expected_norms": rep.expected_norms,
                                 "max_abs_diff": rep.max_abs_diff, "max_rel_diff": rep.max_rel_diff, "error": None,
                                 "warnings": list(rep.warnings), "cached": rep.cached}
        if not rep.ok:
            why = "; ".join(rep.warnings) or "the check failed"
            counts_ok = rep.total_norm_nodes == rep.expected_norms
            if rep.max_abs_diff is None and counts_ok:  # onnxruntime could not run it: unknown, not wrong
                self.finding("export_unverified", "warning", f"the ONNX model was exported but not verified: {why}",
                             source="export")
            else:
                self.finding("export_mismatch", "error", f"the ONNX model does not match PyTorch: {why}",
                             value=rep.max_abs_diff, source="export")
        return None

    # --- 4. quantization --------------------------------------------------------------------------------

    def quantization(self) -> None:
        from normscope.analysis import quant_sensitivity

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inputs, n = _first_samples(self.inputs, QUANT_SAMPLES)
            rep = quant_sensitivity(self.model, inputs)
        d = rep.to_dict()
        self.result["quant"] = {"samples": n, "formats": d["formats"], "ranking": d["ranking"],
                                "dynamic_int8": d["dynamic_int8"],
                                "warnings": sorted({str(w.message) for w in caught
                                                    if issubclass(w.category, UserWarning)})}
        t = self.t
        for lq in d["layers"]:
            entry = self.layers.setdefault(lq["name"], {"name": lq["name"]})
            entry["quant"] = {k: lq.get(k) for k in ("sqnr_db", "worst_format", "worst_sqnr_db", "outlier_ratio",
                                                     "rank")}
            worst = lq.get("worst_sqnr_db")
            if worst is not None and worst < t.quant_sqnr_db:
                severity = "error" if worst < t.quant_sqnr_error_db else "warning"
                self.finding("quant_sensitive", severity,
                             f"{lq['name']}: rounding only this layer's gamma/beta to {lq['worst_format']} brings the "
                             f"output SQNR down to {worst:.1f} dB (threshold {t.quant_sqnr_db:g} dB); keep this "
                             "layer's parameters in higher precision", layer=lq["name"], value=worst,
                             source="quant")
            ratio = lq.get("outlier_ratio")
            if ratio is not None and ratio > t.gamma_outlier_ratio and lq.get("outlier_channels"):
                chans = ", ".join(str(int(c[0])) for c in lq["outlier_channels"][:5]
                                  if c[2] is not None and c[2] > t.gamma_outlier_ratio)
                self.finding("gamma_outliers", "info",
                             f"{lq['name']}: gamma has outlier channels ({chans}); the largest |gamma| is "
                             f"{ratio:.0f}x the median, so per-tensor int8 rounds the other channels coarsely",
                             layer=lq["name"], value=ratio, source="quant")
        dyn = d.get("dynamic_int8")
        if dyn and dyn.get("warning") and dyn.get("sqnr_db") is None and not dyn["warning"].startswith(
                "the model has no torch.nn.Linear"):
            # the per-layer sweep stands; the whole-model int8 measurement did not happen: the step failed
            raise _StepFailed(f"dynamic int8: {dyn['warning'].splitlines()[0]}")
        if dyn and dyn.get("linear_layers"):
            sq, cos = dyn.get("sqnr_db"), dyn.get("cosine_mean")
            bad = (sq is not None and sq < t.int8_sqnr_db) or (cos is not None and cos < t.int8_cosine)
            if bad:
                self.finding("int8_degradation", "warning",
                             f"dynamic int8 quantization of the {dyn['linear_layers']} Linear layers gives output "
                             f"SQNR {_fmt(sq)} dB and mean cosine {_fmt(cos, 4)} (thresholds {t.int8_sqnr_db:g} dB, "
                             f"{t.int8_cosine:g})", value=sq, source="quant")

    # --- 5. profile -------------------------------------------------------------------------------------

    def profile(self, repeats: int = 7) -> None:
        from normscope.discovery import find_norm_layers

        model = self.model
        layers = find_norm_layers(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        clock = _clock(device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        per_layer: Dict[str, List[float]] = {layer.name: [] for layer in layers}
        starts: Dict[str, float] = {}
        handles = []

        def pre(name):
            def hook(module, args):
                sync()
                starts[name] = clock()
            return hook

        def post(name):
            def hook(module, args, output):
                sync()
                t1 = clock()
                per_layer[name][-1] += t1 - starts.pop(name, t1)
            return hook

        forward: List[float] = []
        try:
            with _eval_mode(model), torch.no_grad():
                for _ in range(2):  # warm-up (lazy initialisation, allocator caches)
                    _call(model, self.inputs)
                for layer in layers:
                    handles.append(layer.module.register_forward_pre_hook(pre(layer.name)))
                    handles.append(layer.module.register_forward_hook(post(layer.name)))
                t_budget = time.perf_counter()
                for i in range(repeats):
                    for v in per_layer.values():
                        v.append(0.0)
                    sync()
                    t0 = clock()
                    _call(model, self.inputs)
                    sync()
                    forward.append(clock() - t0)
                    if i >= 2 and time.perf_counter() - t_budget > PROFILE_SECONDS:  # a large model: 3 are enough
                        break
                for h in handles:
                    h.remove()
                handles = []
                top_ops = _top_ops(model, self.inputs, repeats=min(3, len(forward)))
        finally:
            for h in handles:
                h.remove()
        n = len(forward)
        # On CPU the times are the CPU time of the calling thread (time.thread_time): time the process spends
        # descheduled on a loaded machine is not counted. Other processes still slow it down (caches, memory
        # bandwidth), and only ever add time: each layer's time is its minimum over the runs, the forward time
        # the minimum too. The noise is the spread of the per-run shares (each run's norm over its own forward).
        layer_ms = {name: 1e3 * min(v[:n]) for name, v in per_layer.items()}
        forward_ms = 1e3 * min(forward)
        norm_ms = sum(layer_ms.values())
        share = norm_ms / forward_ms if forward_ms > 0 else None
        run_shares = sorted(sum(v[i] for v in per_layer.values()) / forward[i] for i in range(n) if forward[i] > 0)
        noise = _spread(run_shares)
        for name, ms in layer_ms.items():
            self.layers.setdefault(name, {"name": name})["time_ms"] = round(ms, 4)
        total_op_ms = sum(o[1] for o in top_ops[1]) if top_ops[1] else 0.0
        # each operator gets the share of the forward time that it takes of the operator-timed runs, so that the
        # operator chart adds up to at most the forward time it sits under
        ops = [[name, round(ms * forward_ms / top_ops[0], 4) if top_ops[0] > 0 else None, calls]
               for name, ms, calls in top_ops[1]]
        self.result["profile"] = {"forward_ms": round(forward_ms, 3), "norm_ms": round(norm_ms, 3),
                                  "share": None if share is None else round(share, 4),
                                  "share_noise": None if noise is None else round(noise, 4), "repeats": n,
                                  "top_ops": ops, "top_ops_timed_ms": round(top_ops[0], 3),
                                  "top_ops_listed_ms": round(total_op_ms, 3), "threads": torch.get_num_threads()}
        if share is not None and share - 2.0 * (noise or 0.0) > self.t.norm_share:
            kinds = collections.Counter()
            for layer in layers:
                kinds["recurrent" if layer.recurrent else layer.kind] += layer_ms[layer.name]
            kind = kinds.most_common(1)[0][0] if kinds else "layer_norm"
            noise_txt = f" ± {100 * noise:.1f}%" if noise else ""
            self.finding("norm_latency", "warning",
                         f"normalization layers take {100 * share:.1f}%{noise_txt} of the forward time ({norm_ms:.2f} "
                         f"of {forward_ms:.2f} ms, the fastest of {n} runs): {_LATENCY_ADVICE.get(kind, '')}",
                         value=share, source="profile")


#: What to do about slow normalization, by the kind of layer that takes most of the time.
_LATENCY_ADVICE = {
    "layer_norm": "fuse them (normscope.convert, add_layer_norm) or fold their affine parameters into the next "
                  "Linear layers (normscope.fold_norms_)",
    "rms_norm": "fuse them (normscope.convert, add_rms_norm) or fold their scale into the next Linear layers "
                "(normscope.fold_norms_)",
    "batch_norm": "BatchNorm is an affine map at inference: fold it into the preceding convolution "
                  "(torch.ao.quantization.fuse_modules, or torch.fx's fuse pass) or compile the model (torch.compile)",
    "group_norm": "GroupNorm cannot be folded; compile the model (torch.compile) or use channels-last inputs",
    "instance_norm": "InstanceNorm cannot be folded; compile the model (torch.compile)",
    "recurrent": "the norms inside LayerNormLSTM / LayerNormGRU run as separate calls at every time step and "
                 "cannot be folded (there is no fused per-step kernel yet); larger batches amortise the per-step "
                 "overhead",
}

#: The profile step stops repeating after this many seconds (at least 3 runs).
PROFILE_SECONDS = 5.0


def _clock(device: torch.device) -> Callable[[], float]:
    """The profile's clock: the calling thread's CPU time on CPU (a descheduled thread's time is not counted; the
    threads of an intra-op parallel region wait for each other, so the calling thread's time spans each op), the
    wall clock with a device synchronisation around each measured region elsewhere."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _spread(values: Sequence[float]) -> Optional[float]:
    """A robust spread of ``values``: 1.4826 x the median absolute deviation (the standard deviation for normal
    data, insensitive to one disturbed run); None for fewer than 3 values."""
    if len(values) < 3:
        return None
    med = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - med) for v in values)


#: The quantization sweep (one forward per layer and format) runs on at most this many samples of the inputs.
QUANT_SAMPLES = 8


def _first_samples(example_inputs, k: int):
    """``(inputs, n)``: the first ``k`` samples when every tensor input has the same batch size ``> k``."""
    tensors = [v for v in (example_inputs.values() if isinstance(example_inputs, collections.abc.Mapping)
                           else (example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs]))
               if isinstance(v, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= k:
        return example_inputs, (next(iter(sizes)) if len(sizes) == 1 else None)

    def cut(v):
        return v[:k] if isinstance(v, torch.Tensor) else v

    if isinstance(example_inputs, collections.abc.Mapping):
        return {key: cut(v) for key, v in example_inputs.items()}, k
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(cut(v) for v in example_inputs), k
    return cut(example_inputs), k


def _export_cache_dir() -> str:
    from normscope.ops.cpu_backend import _cache_dir

    return os.path.join(str(_cache_dir()), "onnx")


def _quiet():
    """Silence the exporter's prints (torch.onnx writes progress lines to stdout)."""
    import io

    return contextlib.redirect_stdout(io.StringIO())


def _layer_scaled(model: torch.nn.Module, tiny: float = 1e-3) -> Dict[str, float]:
    """``{norm layer name: layer scale}`` for the norms inside a residual branch scaled by a small layer scale.

    A layer scale is a 1-D parameter of the norm's parent module (``gamma`` / ``layer_scale_parameter`` of a
    ConvNeXt block, or the ``gamma`` of a child module whose class name contains "scale", timm's ``LayerScale``)
    whose largest magnitude is at most ``tiny``."""
    from normscope.discovery import find_norm_layers

    found: Dict[str, float] = {}
    norms = find_norm_layers(model)
    norm_modules = {id(layer.module) for layer in norms}
    for layer in norms:
        parent_name = layer.name.rpartition(".")[0]
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            continue
        params = list(parent.named_parameters(recurse=False))
        for child in parent.children():
            if id(child) not in norm_modules and "scale" in type(child).__name__.lower():
                params += list(child.named_parameters(recurse=False))
        for pname, p in params:
            lname = pname.lower()
            if p.dim() == 1 and p.numel() > 0 and ("scale" in lname or lname in ("gamma", "ls", "ls1", "ls2")):
                m = float(p.detach().abs().max())
                if m <= tiny:
                    found[layer.name] = max(m, found.get(layer.name, 0.0))
    return found


def _outliers(g: torch.Tensor, top_k: int = 5, min_ratio: float = 5.0) -> List[List[float]]:
    """``[[channel, value, ratio to median |gamma|], ...]`` for the largest |gamma| channels above ``min_ratio``."""
    a = g.abs()
    med = float(a.median())
    if not med > 0:
        return []
    ratio = a / med
    k = min(top_k, g.numel())
    vals, idx = torch.topk(ratio, k)
    return [[int(i), round(float(g[i]), 6), round(float(r), 3)] for r, i in zip(vals, idx) if float(r) >= min_ratio]


def _top_ops(model, inputs, k: int = 8, repeats: int = 3) -> Tuple[float, List[List[Any]]]:
    """``(total ms, [[name, ms, calls], ...])``: the ``k`` ATen operators with the most time in one forward.

    Timed around each operator under a ``TorchDispatchMode`` (quiet, unlike torch.profiler's console
    lines) over ``repeats`` forwards; each operator's time is its minimum over the forwards and the total the
    sum of those minima over every operator. On CUDA each operator is synchronised, so the figures are per-op
    latencies, not overlap.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = device.type == "cuda"
    clock = _clock(device)
    runs: List[Dict[str, List[float]]] = []

    class _Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = clock()
            out = func(*args, **(kwargs or {}))
            if cuda:
                torch.cuda.synchronize(device)
            entry = runs[-1][str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)]
            entry[0] += clock() - t0
            entry[1] += 1
            return out

    for _ in range(max(1, repeats)):
        runs.append(collections.defaultdict(lambda: [0.0, 0]))
        with _Timer():
            _call(model, inputs)
    best = {name: min(r[name][0] if name in r else math.inf for r in runs) for name in runs[0]}
    total = sum(v for v in best.values() if math.isfinite(v))
    rows = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return 1e3 * total, [[f"aten::{name}", 1e3 * t, int(runs[0][name][1])] for name, t in rows]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def run_audit(
    model: torch.nn.Module,
    example_inputs,
    *,
    name: Optional[str] = None,
    source: Optional[str] = None,
    inputs_description: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    baseline: Optional[dict] = None,
    steps: Sequence[str] = STEPS,
    opset: Optional[int] = None,
    export_cache: bool = True,
    thresholds: Optional[AuditThresholds] = None,
    progress: Optional[Callable[[int, int, str, Optional[dict]], None]] = None,
) -> Dict[str, Any]:
    """Audit the normalization layers of ``model`` on ``example_inputs``; return the audit result dict.

    The model is used in place and left as it was (training flags, parameters and gradients restored);
    with ``dtype`` it is converted first (``model.to(dtype)``: pass a model you do not need in float32,
    as the CLI does).

    Args:
        model: the model; it must hold at least one normalization layer
            (:func:`normscope.discovery.find_norm_layers`).
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments.
        name, source, inputs_description: how the report names the model, where it came from and its inputs.
        dtype: run in this floating dtype (float32 / bfloat16 / float16); floating inputs are cast too.
        baseline: a monitor snapshot (:func:`load_baseline`) to compare the layers' input variance with.
        steps: which of :data:`STEPS` to run (``analysis`` and ``monitor`` always run first when listed).
        opset: ONNX opset of the export check (default: :data:`normscope.analysis.onnx_export.DEFAULT_OPSET`).
        export_cache: reuse the exported graph of an identical model and input shapes from the export cache
            (``$NORMSCOPE_CACHE_DIR/onnx`` or ``~/.cache/normscope/onnx``; see
            :func:`normscope.export_onnx`'s ``cache_dir``); the onnxruntime check always runs.
        thresholds: :class:`AuditThresholds`.
        progress: ``progress(index, total, step_name, step_record_or_None)``, called before (None) and after
            each step.

    Raises:
        TypeError: ``model`` is not a module, or the inputs are of the wrong type.
        ValueError: the model has no normalization layer, an unknown step, or the model does not run on the
            inputs.
    """
    from normscope.discovery import find_norm_layers

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    _split_inputs(example_inputs)  # type check
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"Expected steps from {STEPS}, but got {unknown}")
    if dtype is not None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Expected dtype to be float32, bfloat16 or float16, but got {dtype}")
        model.to(dtype)
        example_inputs = _cast_inputs(example_inputs, dtype)
    layers = find_norm_layers(model)
    if not layers:
        raise ValueError(f"Expected a model with at least one normalization layer, but {type(model).__name__} has "
                         "none (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm or a Hugging Face RMSNorm-style "
                         "module)")
    if baseline is not None and "monitor" in steps:
        theirs = list((baseline.get("layers") or {}).keys())
        ours = [layer.name for layer in layers]
        if not set(theirs) & set(ours):
            raise ValueError(f"Expected a baseline of the same architecture (layer names in common with this model), "
                             f"but none of its {len(theirs)} layers ({', '.join(repr(n) for n in theirs[:2]) or 'none'}"
                             f"{', ...' if len(theirs) > 2 else ''}) is a norm layer of this model "
                             f"({', '.join(repr(n) for n in ours[:2])}{', ...' if len(ours) > 2 else ''}): "
                             "the comparison would find nothing")
    try:
        with _eval_mode(model), torch.no_grad():
            _call(model, example_inputs)
    except Exception as e:  # noqa: BLE001
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"Expected the model to run on the example inputs, but it raised {type(e).__name__}"
                         + (f": {line}" if line else "")) from e

    thresholds = thresholds or AuditThresholds()
    t_start = time.perf_counter()
    audit = _Audit(model, example_inputs, thresholds, progress)
    for layer in layers:
        audit.layers[layer.name] = {"name": layer.name, "kind": layer.kind, "eps": layer.eps}
    plan: List[Tuple[str, Callable[[], Optional[str]]]] = []
    for step in STEPS:
        if step not in steps:
            continue
        if step == "monitor":
            plan.append((step, lambda: audit.monitor(baseline)))
        elif step == "export":
            plan.append((step, lambda: audit.export(opset, export_cache)))
        else:
            plan.append((step, getattr(audit, step)))
    for i, (step, fn) in enumerate(plan):
        audit.run_step(i + 1, len(plan), step, fn)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pdtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    severity_rank = {"error": 0, "warning": 1, "info": 2}
    order = {name: i for i, name in enumerate(audit.layers)}
    findings = sorted(audit.findings, key=lambda f: (severity_rank.get(f["severity"], 3),
                                                     order.get(f["layer"], len(order)), f["kind"]))
    counts = collections.Counter(f["severity"] for f in findings)
    layer_list = [audit.layers[n] for n in audit.layers]
    for entry in layer_list:
        for key in ("placement", "dtype", "compute_dtype", "fold_reason", "stats", "in_hist", "gamma", "quant",
                    "time_ms"):
            entry.setdefault(key, None)
        entry.setdefault("foldable", False)
        entry.setdefault("consumers", [])
        entry.setdefault("producers", [])
        entry.setdefault("risks", [])
        entry.setdefault("gamma_outliers", [])
        entry.setdefault("calls", 0)
    r = audit.result
    quant_layers = [e for e in layer_list if e.get("quant") and e["quant"].get("worst_sqnr_db") is not None]
    worst = min(quant_layers, key=lambda e: e["quant"]["worst_sqnr_db"]) if quant_layers else None
    dyn = (r.get("quant") or {}).get("dynamic_int8") or {}
    stats = [e["stats"] for e in layer_list if e.get("stats")]
    summary = {
        "layers": len(layer_list),
        "kinds": dict(collections.Counter(e["kind"] for e in layer_list)),
        "placements": dict(collections.Counter(e["placement"] for e in layer_list if e.get("placement"))),
        "foldable": sum(1 for e in layer_list if e.get("foldable")),
        "findings": {s: counts.get(s, 0) for s in ("error", "warning", "info")},
        "nonfinite": sum(int(s.get(k) or 0) for s in stats for k in ("nan_in", "inf_in", "nan_out", "inf_out"))
        if stats else None,
        "eps_rows": sum(int(s.get("eps_rows") or 0) for s in stats) if stats else None,
        "worst_sqnr_db": worst["quant"]["worst_sqnr_db"] if worst else None,
        "worst_sqnr_layer": worst["name"] if worst else None,
        "int8_sqnr_db": dyn.get("sqnr_db"),
        "int8_cosine": dyn.get("cosine_mean"),
        "export_max_abs_diff": (r.get("export") or {}).get("max_abs_diff"),
        "norm_time_share": (r.get("profile") or {}).get("share"),
    }
    import normscope

    exit_code = 1 if counts.get("error") else 0
    return {
        "normscope_version": normscope.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t_start, 3),
        "exit_code": exit_code,
        "model": {"name": name or type(model).__name__, "source": source or "", "class": type(model).__name__,
                  "parameters": params, "trainable_parameters": trainable,
                  "dtype": None if pdtype is None else str(pdtype).replace("torch.", ""), "device": str(device),
                  "inputs": inputs_description or _describe_inputs(example_inputs), "config": _small_config(model)},
        "environment": _environment(device),
        "thresholds": thresholds.to_dict(),
        "summary": summary,
        "layers": layer_list,
        "hist_edges": r.get("hist_edges"),
        "findings": findings,
        "analysis": r.get("analysis"),
        "monitor": r.get("monitor"),
        "export": r.get("export"),
        "quant": r.get("quant"),
        "profile": r.get("profile"),
        "snapshot": r.get("snapshot"),
        "steps": audit.steps,
    }


def _common_prefix(names: Sequence[str]) -> str:
    """The longest common dotted prefix (ending in ".") of several layer names; "" for fewer than two."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    if len(common) >= min(len(p) for p in parts):  # a name would become empty
        common = common[:-1]
    return ".".join(common) + "." if common else ""


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def summary_text(result: Dict[str, Any], *, width: int = 120, max_findings: int = 20) -> str:
    """The concise terminal summary of an audit result: headline, one table of layers, the findings."""
    m, s = result["model"], result.get("summary") or {}
    lines = [f"normscope audit: {m['name']}  ({m['class']}, {m['parameters']:,} parameters, {m.get('dtype')}, "
             f"{m.get('device')})"]
    if m.get("inputs"):
        lines.append(f"inputs: {m['inputs']}")
    kinds = ", ".join(f"{n} {k}" for k, n in (s.get("kinds") or {}).items())
    places = ", ".join(f"{n} {p}" for p, n in (s.get("placements") or {}).items())
    lines.append(f"norm layers: {s.get('layers', 0)} ({kinds}); placement: {places or 'n/a'}; "
                 f"foldable: {s.get('foldable', 0)}")
    lines.append("")
    names = [e["name"] for e in result["layers"]]
    prefix = _common_prefix(names)
    if prefix:
        lines.append(f"layer names below omit the common prefix {prefix!r}")
    shown = [n[len(prefix):] for n in names]
    kinds_set = {e.get("kind") for e in result["layers"]}
    eps_set = {e.get("eps") for e in result["layers"]}
    if len(kinds_set) == 1 or len(eps_set) == 1:
        same = []
        if len(kinds_set) == 1:
            same.append(f"kind {next(iter(kinds_set))}")
        if len(eps_set) == 1:
            same.append(f"eps {_fmt(next(iter(eps_set)), 2)}")
        lines.append("every layer: " + ", ".join(same))
    name_w = max(12, min(44, max((len(n) for n in shown), default=12)))
    cols = [("layer", 0, "<")]
    if len(kinds_set) > 1:
        cols.append(("kind", 10, "<"))
    cols.append(("place", max([6] + [len(e.get("placement") or "") for e in result["layers"]]), "<"))
    if len(eps_set) > 1:
        cols.append(("eps", 7, ">"))
    cols += [("var mean", 9, ">"), ("var p99", 9, ">"), ("eps rows", 8, ">"), ("nan/inf", 7, ">"),
             ("grad in", 8, ">"), ("SQNR dB", 7, ">"), ("ms", 6, ">")]
    # the layer column gives way so that the table fits the width (names are shortened from the left)
    name_w = max(12, min(name_w, width - sum(w for _, w, _ in cols[1:]) - (len(cols) - 1)))
    cols[0] = ("layer", name_w, "<")
    header = " ".join(f"{c:{a}{w}}" for c, w, a in cols)
    lines.append("")
    lines.append(header)
    lines.append("-" * len(header))
    for e, short in zip(result["layers"], shown):
        st = e.get("stats") or {}
        q = e.get("quant") or {}
        nonfinite = sum(int(st.get(k) or 0) for k in ("nan_in", "inf_in", "nan_out", "inf_out")) if st else None
        values = {"layer": _short(short, name_w), "kind": e.get("kind") or "", "place": e.get("placement") or "",
                  "eps": _fmt(e.get("eps"), 2), "var mean": _fmt(st.get("var_mean")),
                  "var p99": _fmt(st.get("var_p99")), "eps rows": "" if not st else str(int(st.get("eps_rows") or 0)),
                  "nan/inf": "" if nonfinite is None else str(nonfinite), "grad in": _fmt(st.get("grad_input_norm")),
                  "SQNR dB": _fmt(q.get("worst_sqnr_db")), "ms": _fmt(e.get("time_ms"), 2)}
        lines.append(" ".join(f"{values[c]:{a}{w}}" for c, w, a in cols))
    lines.append("")
    f_counts = s.get("findings") or {}
    lines.append(f"findings: {f_counts.get('error', 0)} error, {f_counts.get('warning', 0)} warning, "
                 f"{f_counts.get('info', 0)} info")
    for f in result.get("findings", [])[:max_findings]:
        where = f" [{f['layer']}]" if f.get("layer") and f["layer"] not in f["message"] else ""
        lines.append(f"  {f['severity'].upper():<7} {f['kind']}{where}: {f['message']}")
    if len(result.get("findings", [])) > max_findings:
        lines.append(f"  ... and {len(result['findings']) - max_findings} more (see the report)")
    lines.append("")
    heads = []
    if s.get("worst_sqnr_db") is not None:
        onnx_graph = str((result.get("model") or {}).get("class", "")).startswith("ONNX graph")
        what = "worst int8 norm-output SQNR" if onnx_graph else "worst gamma/beta rounding SQNR"
        heads.append(f"{what} {_fmt(s['worst_sqnr_db'])} dB ({s.get('worst_sqnr_layer')})")
    if s.get("int8_cosine") is not None:
        heads.append(f"dynamic int8: SQNR {_fmt(s.get('int8_sqnr_db'))} dB, cosine {_fmt(s['int8_cosine'], 5)}")
    ex = result.get("export")
    if ex:
        heads.append(f"ONNX opset {ex.get('opset')}: " + ("failed" if ex.get("error") else
                     f"{'ok' if ex.get('ok') else 'NOT OK'}, max abs diff {_fmt(ex.get('max_abs_diff'))}"))
    pr = result.get("profile")
    if pr and pr.get("share") is not None:
        noise = f" ± {100 * pr['share_noise']:.1f}%" if pr.get("share_noise") else ""
        heads.append(f"norm time {100 * pr['share']:.1f}%{noise} of the forward ({_fmt(pr['norm_ms'])} of "
                     f"{_fmt(pr['forward_ms'])} ms)")
    for h in heads:
        lines.append(h)
    failed = [st for st in result.get("steps", []) if st["status"] != "ok"]
    for st in failed:
        lines.append(f"step {st['name']} {st['status']}: {st['message']}")
    return "\n".join(line[:width] if len(line) > width and not line.startswith(("  ", "step ")) else line
                     for line in lines) + "\n"

