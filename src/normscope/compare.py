"""``normscope.compare``: the canary gate -- is a candidate model safe to roll out in place of a baseline?

:func:`compare` runs a baseline and a candidate model (or takes a stored audit JSON for the baseline) on the
same inputs and measures what a normalization-aware canary should watch:

* the norm layers' configuration (eps, kind), which must not change;
* per layer, the relative change of each norm's *input* between the two models (the first layer where it
  moves points at what changed before it: a pruned or re-quantised Linear layer), and the ratio of its mean
  per-row input variance (the statistic a norm divides by);
* gamma/beta drift (relative L2 and max abs difference of each layer's affine parameters);
* output drift: PSI and Jensen-Shannon distance of the output value distribution (:mod:`normscope.drift`),
  cosine similarity of the outputs row by row;
* latency change: the forward time of each model, timed interleaved, the minimum of the repeats;
* quantization delta: the drop of the per-layer gamma/beta rounding SQNR and of the dynamic int8 output SQNR
  (the audit's quantization step on both models);
* new findings: audit findings of the candidate that the baseline does not have, by ``(kind, layer)``.

Each measurement becomes a *check* (``pass`` / ``fail`` / ``skipped``) against :class:`CompareThresholds`;
the verdict is ``"no-go"`` when one check fails, else ``"go"`` (exit code 1 / 0 of ``normscope compare``).
See ``docs/compare.md``.
"""

from __future__ import annotations

import datetime
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["compare", "CompareThresholds", "summary_text", "CHECKS", "load_audit_json"]

#: The checks of a comparison, in the order of the result's ``checks`` list.
CHECKS = ("norm_config", "input_change", "variance_ratio", "gamma_drift", "beta_drift", "output_psi",
          "output_js", "output_cosine", "latency", "quantization", "new_findings")

_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
_AUDIT_STEPS = ("analysis", "monitor", "quantization")


class CompareThresholds:
    """The thresholds of the canary gate (defaults in parentheses). A check fails when its value crosses its
    threshold; set a threshold to ``math.inf`` (``variance_ratio``, ``latency_ratio``: ``inf``; ``output_cosine``:
    ``0``) to turn a check off.

    Attributes:
        eps_rtol: a norm layer whose eps differs from the baseline's by more than this relative tolerance fails
            ``norm_config`` (0: any change).
        input_change: relative L2 change of a norm layer's input, ``||x_cand - x_base|| / ||x_base||`` on the same
            inputs, above this fails ``input_change`` (0.01).
        variance_ratio: mean per-row input variance of a layer more than this factor above or below the
            baseline's fails ``variance_ratio`` (1.1).
        gamma_drift, beta_drift: relative L2 change of a layer's gamma (weight) / beta (bias) above this fails
            ``gamma_drift`` / ``beta_drift`` (0.01 each; a beta that was all zeros and changed counts as inf).
        output_psi, output_js: PSI / Jensen-Shannon distance of the output values at or above this fails
            ``output_psi`` / ``output_js`` (0.1 each, Evidently's defaults, as in
            :data:`normscope.drift.DEFAULT_THRESHOLDS`).
        output_cosine: the smallest per-row cosine similarity of the outputs below this fails ``output_cosine``
            (0.99).
        latency_ratio: candidate forward time over the baseline's above this fails ``latency`` (1.5).
        quant_drop_db: a drop of the worst per-layer gamma/beta rounding SQNR or of the dynamic int8 output SQNR
            by more than this many dB fails ``quantization`` (6 dB, a factor of 4 in noise power).
        new_findings: a candidate finding absent from the baseline fails ``new_findings`` when its severity is
            this or worse (``"warning"``; ``"error"``, ``"info"``, or ``"none"`` to never fail).
    """

    def __init__(self, *, eps_rtol: float = 0.0, input_change: float = 0.01, variance_ratio: float = 1.1,
                 gamma_drift: float = 0.01, beta_drift: float = 0.01, output_psi: float = 0.1, output_js: float = 0.1,
                 output_cosine: float = 0.99, latency_ratio: float = 1.5, quant_drop_db: float = 6.0,
                 new_findings: str = "warning"):
        def real(name, v, lo, strict=False):
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not number or math.isnan(v) or v < lo or (strict and v == lo):
                rel = ">" if strict else ">="
                raise ValueError(f"Expected thresholds.{name} to be a number {rel} {lo:g}, but got {v!r}")
            return float(v)

        self.eps_rtol = real("eps_rtol", eps_rtol, 0.0)
        self.input_change = real("input_change", input_change, 0.0)
        self.variance_ratio = real("variance_ratio", variance_ratio, 1.0, strict=True)
        self.gamma_drift = real("gamma_drift", gamma_drift, 0.0)
        self.beta_drift = real("beta_drift", beta_drift, 0.0)
        self.output_psi = real("output_psi", output_psi, 0.0, strict=True)
        self.output_js = real("output_js", output_js, 0.0, strict=True)
        self.output_cosine = real("output_cosine", output_cosine, -1.0)
        self.latency_ratio = real("latency_ratio", latency_ratio, 1.0, strict=True)
        self.quant_drop_db = real("quant_drop_db", quant_drop_db, 0.0)
        if new_findings not in ("error", "warning", "info", "none"):
            raise ValueError("Expected thresholds.new_findings to be one of 'error', 'warning', 'info', 'none', "
                             f"but got {new_findings!r}")
        self.new_findings = new_findings

    def to_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, str]) -> "CompareThresholds":
        """Defaults with ``{name: text}`` overrides (the CLI's ``--threshold NAME=VALUE``)."""
        known = cls().to_dict()
        kw: Dict[str, Any] = {}
        for name, text in overrides.items():
            if name not in known:
                raise ValueError(f"Expected a threshold name from {', '.join(known)}, but got {name!r}")
            if name == "new_findings":
                kw[name] = text
                continue
            try:
                kw[name] = float(text)
            except ValueError:
                raise ValueError(f"Expected thresholds.{name} to be a number, but got {text!r}") from None
        return cls(**kw)

    def __repr__(self) -> str:
        return f"CompareThresholds({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    from normscope.audit import _fmt as fmt

    return fmt(x, digits)


def load_audit_json(path: str) -> Dict[str, Any]:
    """The audit result stored by ``normscope audit --json PATH``, to use as the baseline of :func:`compare`.

    Raises:
        ValueError: the file is not an audit JSON.
        OSError: it cannot be read.
    """
    from normscope.audit import read_json

    data = read_json(path, "the JSON of an audit (normscope audit --json)")
    _check_audit_json(data, repr(path))
    return data


def _check_audit_json(data: Any, what: str) -> None:
    if not (isinstance(data, dict) and isinstance(data.get("layers"), list) and isinstance(data.get("model"), dict)
            and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in data["layers"])):
        got = type(data).__name__ if not isinstance(data, dict) else f"a dict with keys {sorted(data)[:6]}"
        raise ValueError(f"Expected the baseline {what} to be an audit result (normscope audit --json: 'model' and "
                         f"a 'layers' list), but got {got}")


def _rel_l2(base: torch.Tensor, cand: torch.Tensor) -> float:
    d = float(torch.linalg.vector_norm(cand - base))
    n = float(torch.linalg.vector_norm(base))
    if n > 0:
        return d / n
    return 0.0 if d == 0 else math.inf


def _param(module: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    p = getattr(module, name, None)
    if isinstance(p, torch.Tensor) and p.numel() > 0 and p.device.type != "meta":
        return p.detach().float().flatten().cpu()
    return None


def _drift(base: Optional[torch.Tensor], cand: Optional[torch.Tensor]) -> Tuple[Optional[float], Optional[float]]:
    """``(relative L2, max abs)`` between two parameter vectors; ``(None, None)`` when one is missing."""
    if base is None or cand is None:
        return None, None
    if base.shape != cand.shape:
        return math.inf, math.inf
    return _rel_l2(base, cand), float((cand - base).abs().max())


def _capture(model: torch.nn.Module, layers, example_inputs) -> Tuple[Dict[str, List[torch.Tensor]], Any]:
    """``({layer: [input of each call, float32]}, output)`` of one eval-mode forward without gradients."""
    from normscope.analysis.onnx_export import _eval_mode
    from normscope.audit import _call

    seen: Dict[str, List[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = []

    def hook(name):
        def pre(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen[name].append(args[0].detach().float().clone())
        return pre

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(hook(layer.name)))
        with _eval_mode(model), torch.no_grad():
            out = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def _input_change(base: List[torch.Tensor], cand: List[torch.Tensor]) -> Optional[float]:
    if not base or len(base) != len(cand):
        return None if not base and not cand else math.inf
    num = den = 0.0
    for b, c in zip(base, cand):
        if b.shape != c.shape:
            return math.inf
        b64, c64 = b.double(), c.to(b.device).double()
        num += float(((c64 - b64) ** 2).sum())
        den += float((b64 ** 2).sum())
    if not math.isfinite(num):
        return math.inf
    if den > 0:
        return math.sqrt(num / den)
    return 0.0 if num == 0 else math.inf


def _outputs(out: Any) -> List[torch.Tensor]:
    from normscope.analysis.quant import _float_tensors

    found: List[torch.Tensor] = []
    _float_tensors(out, found)
    return [t.detach().float().cpu() for t in found]


def _output_drift(base_out: Any, cand_out: Any) -> Dict[str, Any]:
    from normscope.drift import js_distance, psi

    b, c = _outputs(base_out), _outputs(cand_out)
    if not b or not c:
        return {"error": "a model output holds no floating-point tensor"}
    if [tuple(t.shape) for t in b] != [tuple(t.shape) for t in c]:
        return {"error": f"the output shapes differ: {[tuple(t.shape) for t in b]} vs {[tuple(t.shape) for t in c]}"}
    bf = torch.cat([t.flatten() for t in b])
    cf = torch.cat([t.flatten() for t in c])
    nonfinite_base = int((~torch.isfinite(bf)).sum())
    nonfinite_cand = int((~torch.isfinite(cf)).sum())
    cos: List[torch.Tensor] = []
    for tb, tc in zip(b, c):
        rows_b = tb.reshape(tb.shape[0], -1) if tb.dim() > 1 else tb.reshape(1, -1)
        rows_c = tc.reshape(rows_b.shape)
        cos.append(torch.nn.functional.cosine_similarity(rows_b.double(), rows_c.double(), dim=1, eps=1e-30))
    cos_all = torch.cat(cos)
    identical = bool(torch.equal(bf, cf))
    # identical outputs have no drift whatever the binning; otherwise the distances of the finite values (none
    # finite on one side only: infinitely far; on neither side: nothing to tell apart)
    fb, fc = bf[torch.isfinite(bf)], cf[torch.isfinite(cf)]
    if identical or (fb.numel() == 0 and fc.numel() == 0):
        psi_v = js_v = 0.0
    elif fb.numel() == 0 or fc.numel() == 0:
        psi_v = js_v = math.inf
    else:
        psi_v, js_v = psi(fb, fc), js_distance(fb, fc)
    both_zero = (bf == 0).all() and (cf == 0).all()
    finite_diff = (cf - bf)[torch.isfinite(cf - bf)]
    return {"error": None, "tensors": len(b), "values": int(bf.numel()), "psi": float(psi_v), "js": float(js_v),
            "cosine_min": 1.0 if both_zero else float(cos_all.min()),
            "cosine_mean": 1.0 if both_zero else float(cos_all.mean()),
            "max_abs_diff": float(finite_diff.abs().max()) if finite_diff.numel() else None,
            "nonfinite_baseline": nonfinite_base, "nonfinite_candidate": nonfinite_cand}


def _latency(base: torch.nn.Module, cand: torch.nn.Module, example_inputs, repeats: int) -> Dict[str, Any]:
    """Forward time of both models, interleaved (the order alternates each round), the minimum of ``repeats``."""
    from normscope.analysis.onnx_export import _eval_mode
    from normscope.audit import _call, _clock

    device = next((p.device for p in cand.parameters()), torch.device("cpu"))
    clock = _clock(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: Dict[str, List[float]] = {"baseline": [], "candidate": []}
    models = {"baseline": base, "candidate": cand}

    def timed(model, calls: int) -> float:
        sync()
        t0 = clock()
        for _ in range(calls):
            _call(model, example_inputs)
        sync()
        return (clock() - t0) / calls

    with _eval_mode(base), _eval_mode(cand), torch.no_grad():
        for m in (base, cand):  # warm-up (lazy initialisation, allocator caches)
            for _ in range(2):
                _call(m, example_inputs)
        # a fast model is timed over several calls per sample, so that one sample lasts at least LATENCY_SAMPLE_S
        one = max(min(timed(base, 1), timed(cand, 1)), 1e-6)
        calls = max(1, min(LATENCY_MAX_CALLS, math.ceil(LATENCY_SAMPLE_S / one)))
        for i in range(repeats):
            order = ("baseline", "candidate") if i % 2 == 0 else ("candidate", "baseline")
            for which in order:
                times[which].append(timed(models[which], calls))
    b, c = min(times["baseline"]), min(times["candidate"])
    paired = sorted(tc / tb for tb, tc in zip(times["baseline"], times["candidate"]) if tb > 0)
    # the noise of the ratio: half the interquartile range of the paired (same round) ratios
    noise = None
    if len(paired) >= 4:
        q = statistics.quantiles(paired, n=4)
        noise = (q[2] - q[0]) / 2
    return {"baseline_ms": round(1e3 * b, 4), "candidate_ms": round(1e3 * c, 4),
            "ratio": (c / b) if b > 0 else None, "paired_ratio_median": statistics.median(paired) if paired else None,
            "noise": noise,
            "repeats": repeats, "calls_per_sample": calls,
            "clock": "wall" if device.type == "cuda" else "thread CPU time"}


#: The latency check times a fast model over several calls per sample, so that a sample lasts at least this long
#: (at most LATENCY_MAX_CALLS calls).
LATENCY_SAMPLE_S = 0.02
LATENCY_MAX_CALLS = 50


def _quant_rows(audit: Mapping) -> Tuple[Optional[Dict[str, Optional[float]]], Optional[float], Optional[str]]:
    """``({layer: worst SQNR dB}, dynamic int8 SQNR dB, why missing)`` of an audit result."""
    if not audit.get("quant"):
        step = next((s for s in audit.get("steps") or [] if s.get("name") == "quantization"), None)
        if step is None:
            return None, None, "the audit did not run its quantization step"
        return None, None, f"its quantization step {step.get('status')}: {step.get('message')}"
    per = {e["name"]: (e.get("quant") or {}).get("worst_sqnr_db") for e in audit["layers"]}
    dyn = (audit["quant"].get("dynamic_int8") or {}).get("sqnr_db")
    return per, dyn, None


def _sqnr_drop(base: Optional[float], cand: Optional[float]) -> Optional[float]:
    if base is None or cand is None:
        return None
    base, cand = float(base), float(cand)
    if base == cand:  # inf == inf: both exact
        return 0.0
    return base - cand


def _check(name: str, status: str, reason: str, *, value=None, threshold=None, layer=None) -> Dict[str, Any]:
    return {"name": name, "status": status, "value": value, "threshold": threshold, "layer": layer, "reason": reason}


def _layer_check(name: str, rows: List[dict], key: str, bad: Callable[[float], bool], threshold, what: str,
                 unit: Callable[[float], str], missing: Optional[str]) -> Dict[str, Any]:
    """One check over a per-layer value: fails at the first failing layer in model order (where the change
    starts), its reason counting the others and naming the worst."""
    vals = [(r["layer"], r.get(key)) for r in rows if r.get(key) is not None]
    if not vals:
        return _check(name, "skipped", missing or f"no layer has a {what}", threshold=threshold)
    failing = [(n, v) for n, v in vals if bad(v)]

    def severity(v):  # how far from "no change": ratios by their log
        return abs(math.log(v)) if key == "variance_ratio" and v > 0 else (math.inf if v <= 0 and key ==
                                                                          "variance_ratio" else v)

    worst = max(vals, key=lambda nv: severity(nv[1]))
    if not failing:
        return _check(name, "pass", f"every layer within the threshold (largest {what} {unit(worst[1])} at "
                                    f"{worst[0]})", value=worst[1], threshold=threshold, layer=worst[0])
    first = failing[0]
    more = f"; {len(failing) - 1} more layer{'s' if len(failing) > 2 else ''} after it" if len(failing) > 1 else ""
    worst_f = max(failing, key=lambda nv: severity(nv[1]))
    if worst_f[0] != first[0]:
        more += f", the largest {unit(worst_f[1])} at {worst_f[0]}"
    return _check(name, "fail", f"{first[0]}: {what} {unit(first[1])}{more}", value=first[1], threshold=threshold,
                  layer=first[0])


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def compare(
    baseline: Any,
    candidate: torch.nn.Module,
    example_inputs,
    *,
    thresholds: Optional[CompareThresholds] = None,
    latency: bool = True,
    quantization: bool = True,
    repeats: int = 7,
    baseline_name: Optional[str] = None,
    candidate_name: Optional[str] = None,
    inputs_description: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Compare a candidate model with a baseline on the same inputs; return the comparison result dict.

    The verdict is ``"go"`` when no check fails and ``"no-go"`` otherwise (``exit_code`` 0 / 1). Both models are
    run in eval mode without gradients (the audits run one backward pass each for the gradient statistics) and
    left as they were. The inputs of every norm layer of the baseline are kept (float32, on the model's device)
    for one forward of the candidate, so pass canary-sized inputs.

    Args:
        baseline: the model in production (a ``torch.nn.Module``), or its audit result
            (``normscope audit --json``, loaded with :func:`load_audit_json`). With an audit JSON the layer
            statistics, gamma, eps, quantization figures and findings come from it; the input change, beta drift,
            output drift and latency checks need the model and are reported as ``skipped`` with the reason. Its
            statistics are only comparable when it was audited on the same inputs.
        candidate: the model to roll out; its norm layers must have the same names as the baseline's.
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments.
        thresholds: :class:`CompareThresholds` (default: its defaults).
        latency: time both models (interleaved repeats, the minimum of each).
        quantization: run the audit's quantization step on both models for the quantization delta.
        repeats: timed samples of each model for the latency (a fast model's sample averages several calls).
        baseline_name, candidate_name, inputs_description: how the report names the models and the inputs.
        progress: ``progress(line)``, called with one line before each phase.

    Returns:
        A dict: ``verdict``, ``exit_code``, ``checks`` (name, status ``pass``/``fail``/``skipped``, value,
        threshold, layer, reason; in :data:`CHECKS` order), ``layers`` (one row per norm layer), ``output``,
        ``latency``, ``quantization``, ``new_findings``, ``not_run`` and the two models' descriptions
        (schema in ``docs/compare.md``).

    Raises:
        TypeError: ``candidate`` (or a model ``baseline``) is not a module, or ``baseline`` is neither a module
            nor a dict.
        ValueError: the norm layers of the two do not correspond (the message names the difference), the baseline
            dict is not an audit result, the model has no norm layer, or a model does not run on the inputs.
    """
    from normscope.audit import _split_inputs, run_audit
    from normscope.discovery import find_norm_layers

    if not isinstance(candidate, torch.nn.Module):
        raise TypeError(f"Expected candidate to be a torch.nn.Module, but got {type(candidate).__name__}")
    if isinstance(baseline, torch.nn.Module):
        from_json = False
    elif isinstance(baseline, dict):
        from_json = True
        _check_audit_json(baseline, "dict")
    else:
        raise TypeError("Expected baseline to be a torch.nn.Module or an audit result dict (normscope audit --json), "
                        f"but got {type(baseline).__name__}")
    if baseline is candidate:
        raise ValueError("Expected two models, but got the same module object as baseline and candidate "
                         "(compare a copy: copy.deepcopy(model))")
    _split_inputs(example_inputs)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"Expected repeats to be an int >= 1, but got {repeats!r}")
    t = thresholds or CompareThresholds()
    if not isinstance(t, CompareThresholds):
        raise TypeError(f"Expected thresholds to be a CompareThresholds, but got {type(t).__name__}")
    say = progress or (lambda line: None)

    cand_layers = find_norm_layers(candidate)
    if not cand_layers:
        raise ValueError(f"Expected a candidate with at least one normalization layer, but "
                         f"{type(candidate).__name__} has none")
    cand_names = [layer.name for layer in cand_layers]
    base_layers = None if from_json else find_norm_layers(baseline)
    base_names = [e["name"] for e in baseline["layers"]] if from_json else [layer.name for layer in base_layers]
    if base_names != cand_names:
        only_b = [n for n in base_names if n not in set(cand_names)]
        only_c = [n for n in cand_names if n not in set(base_names)]

        def few(names):
            return ", ".join(repr(n) for n in names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

        diff = []
        if only_b:
            diff.append(f"only in the baseline: {few(only_b)}")
        if only_c:
            diff.append(f"only in the candidate: {few(only_c)}")
        if not diff:
            diff.append("the same names in another order")
        raise ValueError(f"Expected the candidate's normalization layers to correspond to the baseline's (the same "
                         f"names), but got {len(base_names)} vs {len(cand_names)} layers, {'; '.join(diff)}")

    t_start = time.perf_counter()
    steps = [s for s in _AUDIT_STEPS if quantization or s != "quantization"]
    not_run: List[Dict[str, str]] = []
    say(f"auditing the candidate ({', '.join(steps)}) ...")
    cand_audit = run_audit(candidate, example_inputs, name=candidate_name, inputs_description=inputs_description,
                           steps=steps)
    if from_json:
        base_audit = baseline
        base_out = None
        base_inputs = None
    else:
        say(f"auditing the baseline ({', '.join(steps)}) ...")
        base_audit = run_audit(baseline, example_inputs, name=baseline_name, inputs_description=inputs_description,
                               steps=steps)
        say("running both models on the inputs ...")
        base_inputs, base_out = _capture(baseline, base_layers, example_inputs)
    cand_inputs, cand_out = _capture(candidate, cand_layers, example_inputs)

    # ---- per-layer rows ------------------------------------------------------------------------------------
    base_by_name = {e["name"]: e for e in base_audit["layers"]}
    cand_by_name = {e["name"]: e for e in cand_audit["layers"]}
    rows: List[Dict[str, Any]] = []
    for i, layer in enumerate(cand_layers):
        be, ce = base_by_name.get(layer.name) or {}, cand_by_name.get(layer.name) or {}
        vb, vc = (be.get("stats") or {}).get("var_mean"), (ce.get("stats") or {}).get("var_mean")
        ratio = None
        if vb is not None and vc is not None and math.isfinite(vb) and math.isfinite(vc) and vb > 0:
            ratio = vc / vb
        elif vb is not None and vc is not None and (not math.isfinite(vc) or (vb == 0 and vc > 0)):
            ratio = math.inf
        elif vb == 0 and vc == 0:
            ratio = 1.0
        g_c, b_c = _param(layer.module, "weight"), _param(layer.module, "bias")
        if from_json:
            g_b = torch.tensor(be["gamma"], dtype=torch.float32) if isinstance(be.get("gamma"), list) else None
            b_b = None
            # the audit JSON keeps gamma rounded to 6 decimals: round the candidate's the same way
            g_c = None if g_c is None else torch.round(g_c * 1e6) / 1e6
            change = None
        else:
            bm = base_layers[i].module
            g_b, b_b = _param(bm, "weight"), _param(bm, "bias")
            change = _input_change(base_inputs[layer.name], cand_inputs[layer.name])
        g_rel, g_max = _drift(g_b, g_c)
        b_rel, b_max = _drift(b_b, b_c)
        qb, qc = (be.get("quant") or {}).get("worst_sqnr_db"), (ce.get("quant") or {}).get("worst_sqnr_db")
        rows.append({"layer": layer.name, "kind": ce.get("kind") or layer.kind, "kind_baseline": be.get("kind"),
                     "eps_baseline": be.get("eps"), "eps_candidate": ce.get("eps", layer.eps),
                     "var_baseline": vb, "var_candidate": vc, "variance_ratio": ratio, "input_change": change,
                     "gamma_drift": g_rel, "gamma_max_abs": g_max, "beta_drift": b_rel, "beta_max_abs": b_max,
                     "sqnr_baseline_db": qb, "sqnr_candidate_db": qc, "sqnr_drop_db": _sqnr_drop(qb, qc),
                     "calls": len(cand_inputs[layer.name])})
    del base_inputs, cand_inputs

    checks: List[Dict[str, Any]] = []
    json_why = "the baseline is an audit JSON, which holds no {}"

    # ---- norm_config: eps and kind -------------------------------------------------------------------------
    changed = []
    for r in rows:
        eb, ec = r["eps_baseline"], r["eps_candidate"]
        if r["kind_baseline"] is not None and r["kind_baseline"] != r["kind"]:
            changed.append((r["layer"], f"kind {r['kind_baseline']} -> {r['kind']}"))
        elif eb is not None and ec is not None and abs(float(ec) - float(eb)) > t.eps_rtol * abs(float(eb)):
            changed.append((r["layer"], f"eps {_fmt(eb)} -> {_fmt(ec)}"))
    if changed:
        more = f" (and {len(changed) - 1} more layers)" if len(changed) > 1 else ""
        checks.append(_check("norm_config", "fail", f"{changed[0][0]}: {changed[0][1]}{more}", value=len(changed),
                             threshold=t.eps_rtol, layer=changed[0][0]))
    else:
        checks.append(_check("norm_config", "pass", f"eps and kind of all {len(rows)} norm layers unchanged",
                             value=0, threshold=t.eps_rtol))

    checks.append(_layer_check("input_change", rows, "input_change", lambda v: v > t.input_change, t.input_change,
                               "input change", lambda v: f"{_fmt(v)} (relative L2)",
                               json_why.format("layer inputs") if from_json else None))
    checks.append(_layer_check("variance_ratio", rows, "variance_ratio",
                               lambda v: not (1.0 / t.variance_ratio <= v <= t.variance_ratio), t.variance_ratio,
                               "input variance ratio", lambda v: f"{_fmt(v, 4)}x the baseline's",
                               "no layer statistics (the monitor step did not run on both)"))
    checks.append(_layer_check("gamma_drift", rows, "gamma_drift", lambda v: v > t.gamma_drift, t.gamma_drift,
                               "gamma drift", lambda v: f"{_fmt(v)} (relative L2)",
                               "no layer has a gamma (weight) on both sides"))
    checks.append(_layer_check("beta_drift", rows, "beta_drift", lambda v: v > t.beta_drift, t.beta_drift,
                               "beta drift", lambda v: f"{_fmt(v)} (relative L2)",
                               json_why.format("beta") if from_json else "no layer has a beta (bias) on both sides"))

    # ---- output drift --------------------------------------------------------------------------------------
    output: Optional[Dict[str, Any]] = None
    if from_json:
        why = json_why.format("outputs")
        for name in ("output_psi", "output_js", "output_cosine"):
            checks.append(_check(name, "skipped", why, threshold=getattr(t, name)))
    else:
        output = _output_drift(base_out, cand_out)
        if output["error"]:
            for name in ("output_psi", "output_js", "output_cosine"):
                checks.append(_check(name, "fail", output["error"], threshold=getattr(t, name)))
        else:
            nf = ""
            if output["nonfinite_candidate"] > output["nonfinite_baseline"]:
                nf = f"; the candidate's output has {output['nonfinite_candidate']} NaN/Inf values " \
                     f"(baseline {output['nonfinite_baseline']})"
            for name, key, bad, what in (
                    ("output_psi", "psi", output["psi"] >= t.output_psi, "PSI of the output values"),
                    ("output_js", "js", output["js"] >= t.output_js, "Jensen-Shannon distance of the output values"),
                    ("output_cosine", "cosine_min", output["cosine_min"] < t.output_cosine,
                     "smallest per-row cosine similarity of the outputs")):
                v = output[key]
                bad = bad or bool(nf)
                rel = ("below" if name == "output_cosine" else "at or above") if bad else "within"
                checks.append(_check(name, "fail" if bad else "pass", f"{what} {_fmt(v, 4)}, {rel} the threshold "
                                     f"{getattr(t, name):g}{nf}", value=v, threshold=getattr(t, name)))

    # ---- latency -------------------------------------------------------------------------------------------
    lat: Optional[Dict[str, Any]] = None
    if not latency:
        checks.append(_check("latency", "skipped", "not asked for (latency=False)", threshold=t.latency_ratio))
    elif from_json:
        fwd = (baseline.get("profile") or {}).get("forward_ms")
        note = f" (its profile says {_fmt(fwd)} ms, measured at another time)" if fwd is not None else ""
        checks.append(_check("latency", "skipped", "a latency change needs both models timed interleaved on this "
                             f"machine, and the baseline is an audit JSON{note}", threshold=t.latency_ratio))
    else:
        say(f"timing both models ({repeats} interleaved forwards each) ...")
        lat = _latency(baseline, candidate, example_inputs, repeats)
        ratio = lat["ratio"]
        if ratio is None:
            checks.append(_check("latency", "skipped", "the baseline's forward time measured 0",
                                 threshold=t.latency_ratio))
        else:
            # a slowdown counts only beyond the measurement's own noise (twice the spread of the paired ratios):
            # on a busy machine two identical models can time 1.5x apart
            noise = lat.get("noise") or 0.0
            bad = ratio - 2.0 * noise > t.latency_ratio
            within = " (within the timing noise)" if ratio > t.latency_ratio and not bad else ""
            checks.append(_check("latency", "fail" if bad else "pass",
                                 f"forward {lat['candidate_ms']:.3g} ms vs {lat['baseline_ms']:.3g} ms "
                                 f"({ratio:.3g}x \u00b1 {noise:.2g}{within}; fastest of {repeats} interleaved samples "
                                 f"of {lat.get('calls_per_sample', 1)} call(s), {lat['clock']})",
                                 value=ratio, threshold=t.latency_ratio))

    # ---- quantization delta --------------------------------------------------------------------------------
    quant: Optional[Dict[str, Any]] = None
    if not quantization:
        checks.append(_check("quantization", "skipped", "not asked for (quantization=False)",
                             threshold=t.quant_drop_db))
    else:
        qb, db, why_b = _quant_rows(base_audit)
        qc, dc, why_c = _quant_rows(cand_audit)
        if why_b or why_c:
            why = f"baseline: {why_b}" if why_b else f"candidate: {why_c}"
            checks.append(_check("quantization", "skipped", f"no quantization figures ({why})",
                                 threshold=t.quant_drop_db))
        else:
            drops = [(r["layer"], r["sqnr_drop_db"]) for r in rows if r["sqnr_drop_db"] is not None]
            worst = max(drops, key=lambda x: x[1]) if drops else (None, None)
            int8_drop = _sqnr_drop(db, dc)
            quant = {"int8_sqnr_baseline_db": db, "int8_sqnr_candidate_db": dc, "int8_drop_db": int8_drop,
                     "worst_layer_drop_db": worst[1], "worst_layer": worst[0]}
            fails = []
            if worst[1] is not None and worst[1] > t.quant_drop_db:
                row = next(r for r in rows if r["layer"] == worst[0])
                fails.append((worst[0], worst[1], f"{worst[0]}: gamma/beta rounding SQNR dropped from "
                              f"{_fmt(row['sqnr_baseline_db'])} to {_fmt(row['sqnr_candidate_db'])} dB"))
            if int8_drop is not None and int8_drop > t.quant_drop_db:
                fails.append((None, int8_drop, f"dynamic int8 output SQNR dropped by {_fmt(int8_drop)} dB "
                              f"({_fmt(db)} -> {_fmt(dc)} dB)"))
            if fails:
                checks.append(_check("quantization", "fail", "; ".join(f[2] for f in fails), value=fails[0][1],
                                     threshold=t.quant_drop_db, layer=fails[0][0]))
            else:
                checks.append(_check("quantization", "pass", f"largest SQNR drop {_fmt(worst[1])} dB per layer, "
                                     f"{_fmt(int8_drop)} dB dynamic int8", value=max(
                                         [v for v in (worst[1], int8_drop) if v is not None], default=None),
                                     threshold=t.quant_drop_db, layer=worst[0]))

    # ---- new findings --------------------------------------------------------------------------------------
    have = {(f.get("kind"), f.get("layer")) for f in base_audit.get("findings") or []}
    new = [f for f in cand_audit["findings"] if (f["kind"], f["layer"]) not in have and f["kind"] != "variance_shift"]
    limit = _SEVERITY_RANK.get(t.new_findings, -1)
    blocking = [f for f in new if _SEVERITY_RANK.get(f["severity"], 3) <= limit]
    if blocking:
        f = blocking[0]
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        checks.append(_check("new_findings", "fail", f"new {f['severity']} {f['kind']}"
                             f"{' at ' + f['layer'] if f['layer'] else ''}: {f['message']}{more}",
                             value=len(blocking), threshold=t.new_findings, layer=f["layer"]))
    else:
        info = f"{len(new)} new finding{'s' if len(new) != 1 else ''}, none of severity {t.new_findings} or worse" \
            if new else "no finding of the candidate is new"
        checks.append(_check("new_findings", "pass", info, value=0, threshold=t.new_findings))

    for c in checks:
        if c["status"] == "skipped":
            not_run.append({"check": c["name"], "reason": c["reason"]})
    failed = [c for c in checks if c["status"] == "fail"]
    verdict = "no-go" if failed else "go"
    import normscope

    def describe(audit: Mapping, source: str) -> Dict[str, Any]:
        m = audit.get("model") or {}
        return {"name": m.get("name"), "class": m.get("class"), "parameters": m.get("parameters"),
                "dtype": m.get("dtype"), "device": m.get("device"), "inputs": m.get("inputs"), "source": source,
                "audit_created": audit.get("created")}

    return {
        "normscope_version": normscope.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t_start, 3),
        "verdict": verdict,
        "exit_code": 1 if failed else 0,
        "baseline": describe(base_audit, "audit JSON" if from_json else "model"),
        "candidate": describe(cand_audit, "model"),
        "thresholds": t.to_dict(),
        "checks": checks,
        "layers": rows,
        "output": output,
        "latency": lat,
        "quantization": quant,
        "new_findings": new,
        "not_run": not_run,
    }


def _checks_sorted(checks: Sequence[Mapping]) -> List[Mapping]:
    rank = {"fail": 0, "pass": 1, "skipped": 2}
    return sorted(checks, key=lambda c: rank.get(c["status"], 3))


def summary_text(result: Mapping[str, Any], *, width: int = 120) -> str:
    """The terminal summary of a comparison: the verdict, then one table of the checks, failing ones first."""
    b, c = result["baseline"], result["candidate"]
    verdict = result["verdict"].upper()
    lines = [f"normscope compare: {b.get('name')} ({b.get('source')}) -> {c.get('name')}",
             f"inputs: {c.get('inputs')}", ""]
    rows = [(ch["status"].upper(), ch["name"], ch["value"] if isinstance(ch.get("value"), str)
             else _fmt(ch.get("value"), 4), ch["threshold"] if isinstance(ch.get("threshold"), str)
             else _fmt(ch.get("threshold"), 4), ch["reason"]) for ch in _checks_sorted(result["checks"])]
    head = ("status", "check", "value", "threshold", "reason")
    w = [max(len(head[i]), *(len(str(r[i])) for r in rows)) for i in range(4)]
    indent = sum(w) + 4
    lines.append(f"{head[0]:<{w[0]}} {head[1]:<{w[1]}} {head[2]:>{w[2]}} {head[3]:>{w[3]}} {head[4]}")
    lines.append("-" * min(width, indent + 40))
    for r in rows:  # the reason (which names the layer) wraps under itself rather than being cut
        left = f"{r[0]:<{w[0]}} {r[1]:<{w[1]}} {r[2]:>{w[2]}} {r[3]:>{w[3]}} "
        lines += _wrap(r[4], max(30, width - indent), left, " " * indent)
    lines.append("")
    n_fail = sum(ch["status"] == "fail" for ch in result["checks"])
    n_skip = sum(ch["status"] == "skipped" for ch in result["checks"])
    lines.append(f"verdict: {verdict} ({n_fail} failed, {len(result['checks']) - n_fail - n_skip} passed, "
                 f"{n_skip} skipped of {len(result['checks'])} checks)")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, first: str, rest: str) -> List[str]:
    import textwrap

    parts = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]
    return [(first if i == 0 else rest) + p for i, p in enumerate(parts)]
