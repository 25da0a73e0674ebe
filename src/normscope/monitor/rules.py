"""The rules that turn a window's per-layer statistics into findings.

:func:`detect` sees one flushed window: per layer, the raw accumulators (:class:`~normscope.monitor._layout.WindowRaw`,
for the first-event keys and the per-step gradient norms) and the derived statistics (``WindowRaw.stats()``), plus
a :class:`RuleState` that carries over from one window to the next (the conditions already reported, the per-layer
gradient-norm history). It runs on plain records, without a model or a :class:`~normscope.monitor.Monitor`.

Gradient history: per layer and per norm (input gradient, parameter gradients), the log-norms of the last
``Thresholds.grad_history_steps`` sampled steps. Each sampled step of the window (``WindowRaw.grad_series``; one
value per window, the window mean, where the series is empty) is judged against the median of the steps before it,
so a jump is reported at the first flush after it, at the step where it happened, whatever ``flush_every`` is.
"""

from __future__ import annotations

import bisect
import collections
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from normscope.monitor import _layout as L
from normscope.monitor.findings import Finding, Thresholds

__all__ = ["RuleContext", "RuleState", "detect", "gradient_history_findings"]

#: 1 / Phi^-1(3/4): the MAD of a normal distribution times this is its standard deviation.
_MAD_TO_SIGMA = 1.4826

#: The gradient norms judged, their column in ``WindowRaw.grad_series`` and how messages name them.
_GRAD_METRICS = (("grad_input_norm", 1, "input gradient norm"), ("grad_param_norm", 2, "parameter gradient norm"))


@dataclass
class RuleContext:
    """What the rules need to know about the monitor that produced the window.

    Attributes:
        names: layer names, by layer index.
        thresholds: the :class:`~normscope.monitor.Thresholds`.
        eps_factor: the monitor's ``eps_factor`` (for the eps-dominated message).
        every: the monitor's sampling interval (one step in ``every`` is sampled).
        calls_of: ``calls_of(step)``: the layer indices called in ``step``, in call order.
        time_step_of: ``time_step_of(step, order)``: for a call of a norm inside a recurrent cell, ``(time step
            of the sequence it normalized, site)`` with site ``"input"``, ``"hidden"`` or ``"cell"``
            (:class:`normscope.recurrent.RecurrentNorm`); None when not known.
    """

    names: Sequence[str]
    thresholds: Thresholds = field(default_factory=Thresholds)
    eps_factor: float = 10.0
    every: int = 1
    calls_of: Callable[[int], Tuple[int, ...]] = lambda step: ()
    time_step_of: Callable[[int, int], Optional[Tuple[int, str]]] = lambda step, order: None


@dataclass
class RuleState:
    """What the rules carry from one window to the next.

    Attributes:
        active: the ``(layer, kind, detail)`` conditions seen in their layer's last window; one is reported
            again only after a window of that layer without it.
        nonfinite_active: whether the last window held a non-finite value (the first one is reported once).
        grad_history: per ``(layer index, "grad_input_norm" | "grad_param_norm")``, the gradient norms of the
            last sampled steps (or window means, see the module doc), oldest first.
        grad_steps: per history key, how many sampled steps it has seen (the warm-up counts these).
        sorted_logs: per history key, ``(history, sorted logs of its positive norms)``: a cache rebuilt
            whenever ``grad_history`` holds another deque (e.g. restored from a checkpoint).
        last_step: the last step seen by the previous windows (None before the first).
    """

    active: Set[tuple] = field(default_factory=set)
    nonfinite_active: bool = False
    grad_history: Dict[Tuple[int, str], Deque[float]] = field(default_factory=dict)
    grad_steps: Dict[Tuple[int, str], int] = field(default_factory=dict)
    sorted_logs: Dict[Tuple[int, str], Tuple[Deque[float], List[float]]] = field(default_factory=dict)
    last_step: Optional[int] = None


def detect(raws: Dict[int, L.WindowRaw], stats: Dict[int, dict], ctx: RuleContext, state: RuleState) -> List[Finding]:
    """The new findings of one window; updates ``state``.

    Args:
        raws: per layer index, the window's raw accumulators (only the layers active in the window).
        stats: per layer index, ``raws[i].stats(eps, eps_factor)``.
        ctx: the :class:`RuleContext`.
        state: the :class:`RuleState`, carried over between windows.
    """
    found: List[Finding] = []
    current: set = set()
    th = ctx.thresholds
    names = ctx.names

    found.extend(_nonfinite_forward(raws, stats, ctx, state))

    gkeys = [(raw.first_key(L.M_GRAD_NONFINITE_KEY), i) for i, raw in raws.items()]
    gkeys = [(k, i) for k, i in gkeys if k is not None]
    if gkeys:
        key, i = min(gkeys)
        step = key // L.KEY_STEP
        current.add(("", "nonfinite_grad", ""))
        if ("", "nonfinite_grad", "") not in state.active:
            found.append(Finding(
                names[i], step, "nonfinite_grad", "error", math.nan,
                f"first non-finite gradient (in backward order) w.r.t. the input of layer {names[i]} at "
                f"step {step}: it arose in the backward pass between the loss and this layer; use gradient "
                f"clipping / loss scaling, or torch.autograd.detect_anomaly() to find the operation"))

    for i, s in stats.items():
        name = names[i]
        raw = raws[i]
        if s["eps_rows"] > 0:
            current.add((name, "eps_dominated", ""))
            if (name, "eps_dominated", "") not in state.active:
                frac = s["eps_fraction"]
                first = raw.first_key(L.M_EPS_KEY)
                step = first if first is not None else raw.last_step
                found.append(Finding(
                    name, step, "eps_dominated", "warning" if frac >= th.eps_fraction else "info",
                    float(s["eps_rows"]),
                    f"{s['eps_rows']} of {s['rows_sampled']} sampled rows ({frac:.1%}) entering layer {name} "
                    f"had variance below {ctx.eps_factor:g} * eps = {s['eps_threshold']:.3g} (first at step "
                    f"{step}): eps, not the data, sets their scale; these are usually padding or constant "
                    f"rows: mask them (normscope.masked_layer_norm / masked_rms_norm) or use a smaller eps"))
        for label, greek in (("weight", "gamma"), ("bias", "beta")):
            rms = s.get(f"{label}_drift_rms")
            if rms is None or not rms > th.drift:  # NaN parameters follow a non-finite finding instead
                continue
            kind = f"{label}_drift"
            current.add((name, kind, ""))
            if (name, kind, "") not in state.active:
                found.append(Finding(
                    name, raw.last_step, kind, "warning", rms,
                    f"{greek} ({label}) of layer {name} moved {rms:.3g} RMS ({s[f'{label}_drift_max']:.3g} "
                    f"max-abs) from its reference by step {raw.last_step}: check the learning rate and weight "
                    f"decay of normalization parameters (usually excluded from weight decay)"))

    # Gradient norms: against the layer's own per-step history, and against the other layers.
    for metric, col, label in _GRAD_METRICS:
        for i in stats:
            series, per_window = _grad_series(raws[i], stats[i], metric, col)
            found.extend(gradient_history_findings(
                names[i], (i, metric), label, series, th, state, current, per_window=per_window,
                window=(raws[i].first_step, raws[i].last_step)))
        if metric == "grad_input_norm":
            # Across layers only for the input gradient: parameter gradients scale with each layer's
            # position (the last norm before the loss has far larger ones), input gradients do not.
            found.extend(_grad_outliers(raws, stats, metric, label, ctx, state, current))

    observed = {names[i] for i in stats}
    state.active = {k for k in state.active if k[0] not in observed and k[0] != ""} | current
    last = [raw.last_step for raw in raws.values() if raw.last_step is not None]
    if last:
        state.last_step = max(last + ([] if state.last_step is None else [state.last_step]))
    return found


def _nonfinite_forward(raws: Dict[int, L.WindowRaw], stats: Dict[int, dict], ctx: RuleContext,
                       state: RuleState) -> List[Finding]:
    """The first non-finite value in execution order: the smallest (step, order, output?) key."""
    names = ctx.names
    found = []
    keys = [(raw.first_key(col), i) for i, raw in raws.items() for col in (L.M_NONFINITE_KEY, L.M_NONFINITE_OUT_KEY)]
    keys = [(k, i) for k, i in keys if k is not None]
    if keys and not state.nonfinite_active:
        key, i = min(keys)
        step, rest = divmod(key, L.KEY_STEP)
        order, is_out = divmod(rest, 2)
        s = stats[i]
        ts = ctx.time_step_of(step, order)
        t, site = (None, None) if ts is None else ts
        at = f"at step {step}" + ("" if t is None else f", time step {t} of the sequence")
        if is_out:
            found.append(Finding(
                names[i], step, "nonfinite_output", "error", float(s["nan_out"] + s["inf_out"]),
                f"first non-finite output in layer {names[i]} {at}, while its input was finite: "
                f"the normalization itself overflowed; check its gamma/beta and eps, or compute it in "
                f"float32"))
        else:
            calls = ctx.calls_of(step)
            prev = names[calls[order - 1]] if 0 < order <= len(calls) else None
            clean = None if prev is not None or ctx.every == 1 else _previous_sampled_step(step, raws, ctx, state)
            if site == "input":
                where = (f"the NaN/Inf is in the recurrent layer's input sequence at time step {t} (the data, "
                         f"padding passed as valid steps, or the layer below)")
            elif site is not None:
                where = (f"the NaN/Inf arose in the recurrence at time step {t}, from the previous step's state "
                         f"or the recurrent weights (check the gradient norms across time steps; clip gradients)")
            elif prev is not None:
                where = (f"the NaN/Inf arose upstream, between layer {prev} and this one; inspect those "
                         f"operations (attention scores, activations, residual adds in low precision)")
            elif clean is None:
                where = ("the NaN/Inf arose upstream, before the first monitored layer (model inputs, "
                         "embeddings); inspect those operations")
            else:
                where = (f"it appeared between step {clean}, the previous sampled step (where every monitored "
                         f"input was finite), and step {step} (with every={ctx.every} the steps between are not "
                         f"watched): before the first monitored layer of step {step}, or in a step between (a "
                         f"parameter update that made weights non-finite); to pin it, monitor with every=1, or "
                         f"rerun from a checkpoint before step {step} with every=1")
            found.append(Finding(
                names[i], step, "nonfinite_input", "error", float(s["nan_in"] + s["inf_in"]),
                f"first non-finite input in layer {names[i]} {at}: {where}; lower the learning rate "
                f"or clip gradients"))
    state.nonfinite_active = bool(keys) or any(
        s["nan_in"] or s["inf_in"] or s["nan_out"] or s["inf_out"] for s in stats.values())
    return found


def _previous_sampled_step(step: int, raws: Dict[int, L.WindowRaw], ctx: RuleContext,
                           state: RuleState) -> Optional[int]:
    """The sampled step before ``step`` that the monitor saw (every input finite then), or None if none."""
    firsts = [raw.first_step for raw in raws.values() if raw.first_step is not None]
    if firsts and step - ctx.every >= min(firsts):
        return step - ctx.every  # in this window, before the first non-finite key: clean
    if state.last_step is not None and state.last_step < step:
        return state.last_step  # the previous window had no non-finite value (else this one is not reported)
    return None


def _grad_series(raw: L.WindowRaw, s: dict, metric: str, col: int) -> Tuple[List[Tuple[int, float, int]], bool]:
    """``[(step, norm, sampled steps it stands for)]`` of a window, and whether it is one value per window."""
    series = getattr(raw, "grad_series", None) or []
    if series:
        out = sorted((int(e[0]), float(e[col]), 1) for e in series if not math.isnan(e[col]))
        return out, False
    v = s.get(metric)
    if v is None or raw.last_step is None:
        return [], True
    n = int(s.get("grad_input_steps" if metric == "grad_input_norm" else "grad_param_steps") or 1)
    return [(raw.last_step, float(v), max(n, 1))], True


def gradient_history_findings(
    name: str,
    key: Tuple[int, str],
    label: str,
    series: Iterable[Tuple[int, float, int]],
    th: Thresholds,
    state: RuleState,
    current: set,
    *,
    per_window: bool = False,
    window: Tuple[Optional[int], Optional[int]] = (None, None),
) -> List[Finding]:
    """Judge each ``(step, norm, steps)`` of ``series`` against the history of ``key``, then add it to it.

    A norm is ``grad_exploding`` (``grad_vanishing``) when its log is above (below) the median log-norm of
    the previous ``th.grad_history_steps`` values by more than ``log(th.grad_history)`` and by more than
    ``th.grad_history_mad`` robust standard deviations (1.4826 times the median absolute deviation of the
    log-norms), once ``th.grad_history_min_steps`` sampled steps are in the history. Non-finite norms are
    left out (``nonfinite_grad`` reports them). The condition is added to ``current``; it is reported once
    per episode (not when already in ``state.active``), at the first step that shows it.
    """
    maxlen = th.grad_history_steps
    hist = state.grad_history.get(key)
    if hist is None or hist.maxlen != maxlen:  # new, or restored without the bound
        hist = state.grad_history[key] = collections.deque([] if hist is None else hist, maxlen=maxlen)
    cached = state.sorted_logs.get(key)
    if cached is None or cached[0] is not hist or len(cached[1]) != sum(1 for u in hist if u > 0):
        cached = state.sorted_logs[key] = (hist, sorted(math.log(u) for u in hist if u > 0))
    logs = cached[1]  # the positive norms' logs, sorted, kept in step with hist
    seen = state.grad_steps.get(key, len(hist))
    log_factor = math.log(th.grad_history)
    found: List[Finding] = []
    for step, v, n in series:
        if not math.isfinite(v) or v < 0:
            continue
        if seen >= th.grad_history_min_steps and logs:
            med = _sorted_median(logs)
            dev = math.log(v) - med if v > 0 else -math.inf
            kind = None
            if abs(dev) > log_factor:  # only then can it pass the bound: the spread is needed
                mad = statistics.median(abs(u - med) for u in logs)
                bound = max(log_factor, th.grad_history_mad * _MAD_TO_SIGMA * mad)
                kind = "grad_exploding" if dev > bound else "grad_vanishing" if dev < -bound else None
            cond = (name, kind, key[1])
            if kind is not None and cond not in current:
                current.add(cond)
                if cond not in state.active:
                    ratio, ref = math.exp(dev), math.exp(med)
                    advice = ("clip gradients or lower the learning rate; eps-dominated rows also amplify "
                              "gradients (by up to 1/sqrt(eps))" if kind == "grad_exploding"
                              else "look for saturated or dead units, eps-dominated rows or a detached path "
                                   "before this layer")
                    if per_window:
                        what = f"{len(logs)} previous windows ({v:.3g} vs {ref:.3g}) in steps {window[0]}-{window[1]}"
                    else:
                        what = f"{len(logs)} previous sampled steps ({v:.3g} vs {ref:.3g}) at step {step}"
                    found.append(Finding(name, step, kind, "warning", ratio,
                                         f"{label} of layer {name} is {ratio:.3g}x its median over the {what}: "
                                         f"{advice}"))
        if len(hist) == maxlen and hist[0] > 0:  # the oldest value leaves the history
            del logs[bisect.bisect_left(logs, math.log(hist[0]))]
        hist.append(v)
        if v > 0:
            bisect.insort(logs, math.log(v))
        seen += n
    state.grad_steps[key] = seen
    return found


def _sorted_median(xs: List[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _grad_outliers(raws: Dict[int, L.WindowRaw], stats: Dict[int, dict], metric: str, label: str,
                   ctx: RuleContext, state: RuleState, current: set) -> List[Finding]:
    """``grad_outlier``: a layer's window-mean norm far from the median over the other layers."""
    th, names = ctx.thresholds, ctx.names
    finite = {i: s[metric] for i, s in stats.items() if s[metric] is not None and math.isfinite(s[metric])}
    found: List[Finding] = []
    if len([v for v in finite.values() if v > 0]) < 3:
        return found
    for i, v in finite.items():
        others = [u for j, u in finite.items() if j != i and u > 0]
        med = statistics.median(others)
        ratio = v / med
        if th.grad_layers >= ratio >= 1.0 / th.grad_layers:
            continue
        name, raw = names[i], raws[i]
        current.add((name, "grad_outlier", metric))
        if (name, "grad_outlier", metric) not in state.active:
            found.append(Finding(
                name, raw.last_step, "grad_outlier", "warning", ratio,
                f"{label} of layer {name} is {ratio:.3g}x the median over the {len(others)} other layers "
                f"({v:.3g} vs {med:.3g}) in steps {raw.first_step}-{raw.last_step}: gradients "
                f"{'explode' if ratio > 1 else 'vanish'} around this layer; check its scale (gamma), "
                f"the branch feeding it, eps-dominated rows (which amplify gradients) and the learning "
                f"rate"))
    return found
