"""The per-layer telemetry monitor: hooks, on-device accumulation, flushing and findings."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import numbers
import os
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from normscope.discovery import NormLayer, effective_eps, find_norm_layers
from normscope.monitor import _compiled, rules
from normscope.monitor import _layout as L
from normscope.monitor.findings import Finding, Thresholds
from normscope.monitor.sinks import Sink, as_sink_list

__all__ = ["Monitor", "save_snapshot", "load_snapshot", "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = "normscope.monitor.snapshot/1"
STATE_FORMAT = "normscope.monitor.state/1"
_F64 = torch.float64


class _DeviceState:
    """The accumulators of all layers on one device: one ``(num_layers, width)`` float64 buffer."""

    def __init__(self, device: torch.device, n_layers: int, layout: L.Layout):
        self.device = device
        # Created outside inference mode (a buffer born in inference mode could not be updated outside
        # it) and with device-side kernels only: no host-to-device copy, which would synchronise.
        with torch.inference_mode(False), torch.no_grad():
            self.template = layout.template(device)
            self.buf = self.template.repeat(n_layers, 1)
            self.slots = torch.zeros(n_layers, 3, dtype=_F64, device=device)  # per step: |g_in|^2, |g_w|^2, |g_b|^2
            self.fired = torch.zeros(n_layers, 2, dtype=_F64, device=device)  # per step: input / param grad seen
            self.one = torch.ones((), dtype=_F64, device=device)
            self.zero = torch.zeros((), dtype=_F64, device=device)
            self.neg_inf = torch.full((), -math.inf, dtype=_F64, device=device)
            # -(key) of [input non-finite, output non-finite, eps-dominated] is
            # key_step * step + key_order * order + key_const (see _layout.KEY_STEP).
            self.key_step = torch.full((3,), -float(L.KEY_STEP), dtype=_F64, device=device)
            self.key_step[2:].fill_(-1.0)
            self.key_order = torch.full((3,), -2.0, dtype=_F64, device=device)
            self.key_order[2:].fill_(0.0)
            self.key_const = torch.zeros(3, dtype=_F64, device=device)
            self.key_const[1:2].fill_(-1.0)
            # Per-layer views, made once: (sums, call maxima, variance histogram, input histogram) ...
            b, vh, ih = self.buf, layout.var_hist, layout.in_hist
            self.views = [(b[i, :L.N_CALL_SUMS], b[i, L.M_ROW_MEAN_MAX:L.M_ROW_MEAN_MAX + L.N_CALL_MAX],
                           b[i, vh:vh + L.VAR_BINS + 3], b[i, ih:ih + layout.hist_bins + 3])
                          for i in range(n_layers)]
            # ... and (|g_in|^2, |g_w|^2, |g_b|^2, input grad seen, param grad seen, grad non-finite key).
            self.grad_views = [(self.slots[i, 0:1], self.slots[i, 1:2], self.slots[i, 2:3], self.fired[i, 0:1],
                                self.fired[i, 1:2], b[i, L.M_GRAD_NONFINITE_KEY:L.M_GRAD_NONFINITE_KEY + 1])
                               for i in range(n_layers)]
        self._layout = layout
        self._edges: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor]] = {}
        # For the fused CPU kernel: addresses of each layer's row, gradient slots and flags (float64).
        self.kernel_var_edges: Optional[torch.Tensor] = None
        if self.device.type == "cpu":
            self.kernel_var_edges = self.edges(_F64)[0]
            w, e = layout.width, 8
            b0, s0, f0 = self.buf.data_ptr(), self.slots.data_ptr(), self.fired.data_ptr()
            self.addrs = [(b0 + i * w * e, b0 + (i * w + L.M_ROW_MEAN_MAX) * e, b0 + (i * w + layout.var_hist) * e,
                           b0 + (i * w + layout.in_hist) * e, b0 + (i * w + L.M_GRAD_NONFINITE_KEY) * e,
                           s0 + 3 * i * e, f0 + 2 * i * e) for i in range(n_layers)]
        self.dirty = False  # written since the last flush
        self.grad_touched = False  # a gradient hook wrote into slots during this step
        # The window's per-step gradient history: sampled-step index -> that step's (layers, 5) copy of
        # [slots, fired] (|g_in|^2, |g_w|^2, |g_b|^2, input grad seen, param grad seen), read at flush for
        # WindowRaw.grad_series (and, under torch.distributed, reduced over the ranks: the global norm of a
        # step needs the per-step sums). At most one entry per sampled step of the window.
        self.gin_hist: Dict[int, torch.Tensor] = {}

    def edges(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(variance edges, input-histogram edges) in ``dtype``, computed on the device."""
        e = self._edges.get(dtype)
        if e is None:
            with torch.inference_mode(False), torch.no_grad():
                lo = L.VAR_LOG10_RANGE[0]
                exps = torch.arange(L.VAR_BINS + 1, dtype=_F64, device=self.device) / L.VAR_BINS_PER_DECADE + lo
                var_e = torch.pow(10.0, exps).to(dtype)
                h_lo, h_hi = self._layout.hist_range
                in_e = torch.linspace(h_lo, h_hi, self._layout.hist_bins + 1, dtype=_F64, device=self.device)
                e = (var_e, in_e.to(dtype))
            self._edges[dtype] = e
        return e


class _Counters:
    """Host-side counters of one layer for the current window (known without reading the device)."""

    __slots__ = ("calls", "rows", "rows_sampled", "skipped_calls", "steps", "first_step", "last_step",
                 "grad_events", "_last_counted")

    def __init__(self):
        self.calls = self.rows = self.rows_sampled = self.skipped_calls = self.steps = self.grad_events = 0
        self.first_step: Optional[int] = None
        self.last_step: Optional[int] = None
        self._last_counted: Optional[int] = None

    def saw_step(self, step: int) -> None:
        if self._last_counted != step:
            self._last_counted = step
            self.steps += 1
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step

    @property
    def active(self) -> bool:
        return self.calls > 0 or self.grad_events > 0 or self.skipped_calls > 0


class _GradTap(torch.autograd.Function):
    """Identity whose backward hands the gradient w.r.t. one layer's input to the monitor.

    (A gradient hook on a view of the input is cheaper in forward in isolation, but gave no gain
    measurable above the noise on the CPU benchmark: not kept.)
    """

    @staticmethod
    def forward(ctx, x, monitor, index):
        ctx.monitor = monitor
        ctx.index = index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.monitor._on_input_grad(ctx.index, grad)
        return grad, None, None


def _hook_tensors(args, kwargs, output) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input, output) of a layer call as the forward hook sees them: the first tensor argument and the
    output (its first element when it is a tuple or list); None where not a tensor."""
    x, _ = _first_tensor(args, kwargs)
    y = output
    if isinstance(output, (tuple, list)) and output:
        y = output[0]
    return x, y if isinstance(y, torch.Tensor) else None


def _first_tensor(args, kwargs) -> Tuple[Optional[torch.Tensor], Optional[Union[int, str]]]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return a, i
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return v, k
    return None, None


def _eager(fn):
    """``fn`` run eagerly when called from code torch.compile traces: a graph break, not a traced hook."""
    return torch.compiler.disable(fn, recursive=True)


class Monitor:
    r"""Per-layer telemetry of a model's normalization layers, accumulated on the device.

    The monitor finds the normalization layers of ``model`` (:func:`normscope.discovery.find_norm_layers`)
    and hooks each: on sampled steps it accumulates statistics of the layer's input, output and
    gradients into device tensors with in-place operations, and reads them back only in
    :meth:`flush` — one packed transfer per device. Between flushes nothing is synchronised with the
    host: no ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)`` and no data-dependent Python
    branch. :meth:`flush` turns each window into one statistics record per layer and into
    :class:`~normscope.monitor.Finding`\ s, and hands them to the sinks. See docs/monitor.md.

    Call :meth:`step` once per training step (after backward); every ``flush_every`` steps it
    flushes. Without sinks the records stay in memory (:attr:`records`, :meth:`findings`). A trainer
    numbers the steps itself with ``step(step=global_step)``, leaves evaluation out with
    :meth:`paused`, and resumes a run with :meth:`state_dict` / :meth:`load_state_dict` (see
    :mod:`normscope.integrations` for the Hugging Face Trainer and Lightning).

    Args:
        model: the model (a ``torch.compile``'d module is unwrapped; hooks go on the original; with
            ``strip_wrappers``, so is a ``DistributedDataParallel`` / ``DataParallel`` one).
        every: sample one step in ``every`` (steps 0, every, 2 * every, ...). Hooks on other steps
            return at once. Statistics, gradient norms and NaN/Inf checks cover sampled steps only,
            so a non-finite value is reported at the first sampled step that sees it; ``every=1``
            checks every step (about +8% step time on the reference CPU benchmark, 9 LayerNorms;
            see docs/monitor.md, "Costs"). Default: 10 (about +1.5% there).
        sinks: where records go on each flush: a :class:`~normscope.monitor.Sink` or a sequence of
            them (e.g. ``JSONLSink("run.jsonl")``). Default: None (records kept in memory only).
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool`` choosing the layers.
        row_fraction: fraction of rows (the vectors a layer normalizes) whose statistics are
            computed: every ``round(1 / row_fraction)``-th row, at an offset that rotates with the
            step. NaN/Inf counts always cover every element. Default: 1.0.
        eps_factor: a row is eps-dominated when its variance (mean square for RMS norms) is below
            ``eps_factor * eps``. Default: 10.0.
        hist_bins: bins of the input-value histogram over ``hist_range`` (plus an underflow and an
            overflow bin). Default: 64.
        hist_range: ``(low, high)`` of the input-value histogram. Default: (-8.0, 8.0).
        hist_max_elements: at most this many input values per call enter the histogram (whole
            rows, evenly spaced among the sampled rows, the first one included; at least one row).
            The histogram is a distribution estimate: counting every value cost about half of the
            fused CPU kernel's time (see docs/monitor.md, "What is measured"). Default: 8192.
        flush_every: flush automatically every this many steps in :meth:`step`; None to flush only
            when asked (:meth:`flush`, :meth:`findings`, :meth:`snapshot`, :meth:`close`).
            Default: 100.
        grads: measure the gradient norms of each layer's input and parameters. Default: True.
        thresholds: a :class:`~normscope.monitor.Thresholds` deciding findings. Default: the defaults.
        probe: confirm duck-typed (Hugging Face-style) norms by running them once on a small probe
            (see :func:`~normscope.discovery.find_norm_layers`). Default: False.
        keep_records: how many of the most recent records :attr:`records` keeps. Default: 100000.
        process_group: the ``torch.distributed`` group whose ranks' statistics :meth:`flush` combines
            when ``torch.distributed`` is initialised; None for the default group. Gamma/beta are
            global figures over it: DTensor parameters (FSDP2) add up their shards, plain ones (DDP)
            count as replicated. Default: None.
        all_ranks: under ``torch.distributed``, feed the sinks on every rank; by default only rank 0
            of the group writes to its sinks (every rank gets the global records and findings).
            Default: False.
        cpu_kernel: measure CPU tensors with normscope's fused C++ statistics kernel (one call per
            layer call and per gradient; built with the system compiler on first use, a few
            seconds once per machine). False, or when the kernel cannot be built: the pure-torch
            path. CUDA tensors take fused Triton kernels when triton imports (the torch path
            otherwise; ``NORMSCOPE_MONITOR_KERNEL`` overrides, see docs/monitor.md, "GPU"). All
            paths give the same statistics. Default: True.
        strip_wrappers: name layers as in the user's model: unwrap ``DistributedDataParallel`` /
            ``DataParallel`` (no leading ``module.``) and drop the ``_orig_mod``,
            ``_fsdp_wrapped_module`` and ``_checkpoint_wrapped_module`` components that
            ``torch.compile``, FSDP and activation checkpointing insert in the path. Default: True.
        strip_prefix: a module path (e.g. ``"model"``, the attribute under which a LightningModule
            holds the user's model) removed from the front of the layer names that start with it.
            ``filter_fn`` still sees the names of ``named_modules()``. Renaming that makes two names
            equal raises ``ValueError``. Default: None.

    Example::

        >>> with normscope.Monitor(model, sinks=[normscope.monitor.JSONLSink("run.jsonl")]) as mon:
        ...     for batch in loader:
        ...         loss = model(batch).loss
        ...         loss.backward()
        ...         opt.step()
        ...         opt.zero_grad()
        ...         mon.step()
        >>> for f in mon.findings():
        ...     print(f.severity, f.message)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        every: int = 10,
        sinks: Optional[Union[Sink, Sequence[Sink]]] = None,
        filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
        row_fraction: float = 1.0,
        eps_factor: float = 10.0,
        hist_bins: int = 64,
        hist_range: Tuple[float, float] = (-8.0, 8.0),
        hist_max_elements: int = 8192,
        flush_every: Optional[int] = 100,
        grads: bool = True,
        thresholds: Optional[Thresholds] = None,
        probe: bool = False,
        keep_records: int = 100_000,
        process_group=None,
        all_ranks: bool = False,
        cpu_kernel: bool = True,
        strip_wrappers: bool = True,
        strip_prefix: Optional[str] = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
        orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, torch.nn.Module):
            model = orig
        if strip_wrappers and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        if strip_prefix is not None and (not isinstance(strip_prefix, str) or not strip_prefix.strip(".")):
            raise ValueError(f"Expected strip_prefix to be a non-empty module path such as 'model', but got "
                             f"{strip_prefix!r}")
        _check_int("every", every)
        _check_int("hist_bins", hist_bins)
        _check_int("hist_max_elements", hist_max_elements)
        _check_int("keep_records", keep_records)
        if flush_every is not None:
            _check_int("flush_every", flush_every)
        if not _is_real(row_fraction) or not 0.0 < row_fraction <= 1.0:
            raise ValueError(f"Expected row_fraction to be in (0, 1], but got {row_fraction!r}")
        if not _is_real(eps_factor) or not math.isfinite(eps_factor) or eps_factor <= 0:
            raise ValueError(f"Expected eps_factor to be a positive finite number, but got {eps_factor!r}")
        if (not isinstance(hist_range, (tuple, list)) or len(hist_range) != 2 or not all(map(_is_real, hist_range))
                or not (math.isfinite(hist_range[0]) and math.isfinite(hist_range[1]))
                or not hist_range[0] < hist_range[1]):
            raise ValueError(f"Expected hist_range to be a pair (low, high) of finite numbers with low < high, "
                             f"but got {hist_range!r}")
        if thresholds is None:
            thresholds = Thresholds()
        elif not isinstance(thresholds, Thresholds):
            raise TypeError(f"Expected thresholds to be a normscope.monitor.Thresholds, but got "
                            f"{type(thresholds).__name__}")
        sinks = as_sink_list(sinks)
        for s in sinks:
            if not (callable(getattr(s, "write", None)) and callable(getattr(s, "close", None))):
                raise TypeError(f"Expected each sink to have write(records) and close() methods, but got "
                                f"{type(s).__name__}")

        layers = find_norm_layers(model, filter_fn, probe=probe)
        if not layers:
            raise ValueError("Expected a model with at least one normalization layer, but found none"
                             + (" that filter_fn accepts" if filter_fn is not None else ""))
        layers = _renamed(layers, bool(strip_wrappers), strip_prefix)

        self._layers: List[NormLayer] = layers
        self._every = int(every)
        self._stride = max(1, int(round(1.0 / row_fraction)))
        self._row_fraction = float(row_fraction)
        self._eps_factor = float(eps_factor)
        self._layout = L.Layout(int(hist_bins), (float(hist_range[0]), float(hist_range[1])))
        self._hist_max_elements = int(hist_max_elements)
        self._flush_every = flush_every
        self._grads = bool(grads)
        self._cpu_kernel = bool(cpu_kernel) and _cpu_kernel_available()
        self._thresholds = thresholds
        self._sinks: List[Sink] = sinks
        self._disabled_sinks: set = set()

        self._states: Dict[torch.device, _DeviceState] = {}
        self._counters = [_Counters() for _ in layers]
        self._totals: List[Optional[L.WindowRaw]] = [None] * len(layers)
        self._step = 0
        self._sampling = True  # step 0 is sampled
        self._paused = 0  # pause() depth: nothing is recorded while > 0
        self._closed = False
        self._bwd_order = 0
        self._step_calls: List[int] = []  # the layers called so far in this step, in call order
        # (step, call order) -> (time step, site), for the calls of norms inside recurrent cells in this window
        self._time_steps: Dict[Tuple[int, int], Tuple[int, str]] = {}
        # The call sequence of sampled steps, stored only where it changes: (first step, sequence).
        self._order_changes: List[Tuple[int, Tuple[int, ...]]] = []
        self._grad_layers_step: set = set()
        self._dtypes: List[torch.dtype] = [torch.float32] * len(layers)  # last input dtype (for eps=None)

        self._records: collections.deque = collections.deque(maxlen=int(keep_records))
        self._findings: List[Finding] = []
        self._active: set = set()  # (layer, kind, detail) conditions already reported
        self._nonfinite_active = False
        self._grad_history: Dict[Tuple[int, str], collections.deque] = {}
        self._rule_state = rules.RuleState()  # what the rules carry between windows (rules.py)
        self._run_written = False
        self._group = process_group
        self._all_ranks = bool(all_ranks)
        self._gin_step_nums: List[int] = []  # the sampled steps folded in this window (gin_hist's indices)

        # Reference copies of gamma / beta for drift, taken now (DTensor parameters: DTensor copies).
        self._refs: List[Dict[str, Tuple[torch.nn.Parameter, torch.Tensor]]] = []
        self._params: List[Dict[str, Optional[torch.Tensor]]] = []  # gamma / beta as last seen (_resolve_params)
        for layer in layers:
            params = {}
            for pname in ("weight", "bias"):
                p = getattr(layer.module, pname, None)
                if isinstance(p, torch.Tensor) and p.numel() > 0 and p.device.type != "meta":
                    with torch.no_grad():
                        params[pname] = (p, p.detach().clone())
            self._refs.append(params)
            self._params.append({pname: getattr(layer.module, pname, None) for pname in ("weight", "bias")})
        # Under torch.distributed, per (layer, parameter): the global mean of the previous flush, the shift of
        # the shard-local sums that flush all-reduces (see _param_partials); the same on every rank.
        self._param_shift: Dict[Tuple[int, str], float] = {}
        self._deferred: List[Tuple[int, int, torch.Tensor]] = []  # parameter gradients read again after backward
        # Parameter gradients of this backward pass, read together when it ends (_read_param_grads).
        self._param_pending: List[Tuple[int, int, torch.Tensor]] = []
        self._param_index: Dict[Tuple[Tuple[int, int], ...], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._replaced_warned = False

        self._handles = []
        self._param_handles: Dict[Tuple[int, int], torch.utils.hooks.RemovableHandle] = {}
        for i, layer in enumerate(layers):
            m = layer.module
            self._handles.append(m.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._make_hook(i), with_kwargs=True))
            for col, pname in ((1, "weight"), (2, "bias")):
                self._watch_param(i, col, getattr(m, pname, None))
            if layer.recurrent and hasattr(m, "step_observers"):
                m.step_observers += 1  # the recurrent layer calls its input norm once per time step while > 0

    # --- public API -----------------------------------------------------------------------------------

    @property
    def layers(self) -> List[NormLayer]:
        """The monitored layers, in ``named_modules()`` order."""
        return list(self._layers)

    @property
    def current_step(self) -> int:
        """The number of the step now being recorded: 0 until the first :meth:`step` call, then the
        number :meth:`step` gave it (the previous number + 1, or the caller's ``step``).

        It is the number of steps completed before this one, as the caller counts them: a trainer's
        ``global_step`` while the step's forward and backward run. Records, findings, sampling
        (``every``) and row rotation use this number.
        """
        return self._step

    @property
    def records(self) -> List[dict]:
        """The most recent records (run, layer statistics, findings), oldest first."""
        return list(self._records)

    def step(self, step: Optional[int] = None) -> None:
        """End the current step: fold its gradient norms in, advance, and flush every ``flush_every`` steps.

        Issues a few device operations when gradients were seen, and no host synchronisation (except
        for the flush itself).

        Args:
            step: the number of the next step, i.e. how many steps are complete now, as the caller
                counts them (a trainer's ``global_step`` after its optimizer step); it must exceed
                :attr:`current_step`, and may skip numbers (steps the monitor did not see). A step is
                sampled when its number is a multiple of ``every``, and the window flushes when the
                number reaches or passes a multiple of ``flush_every``. On a new monitor it starts
                the numbering there (a resumed run). Default: :attr:`current_step` + 1.
        """
        if self._closed:
            raise RuntimeError("Expected an open Monitor, but step() was called after close()")
        if step is not None and (not isinstance(step, numbers.Integral) or isinstance(step, bool)
                                 or step <= self._step):
            raise ValueError(f"Expected step to be an int greater than the current step {self._step}, but got "
                             f"{step!r}")
        if self._paused:
            raise RuntimeError("Expected step() to be called outside paused() (after resume()), but the Monitor is "
                               "paused")
        if self._step_calls:
            t = tuple(self._step_calls)
            if not self._order_changes or self._order_changes[-1][1] != t:
                self._order_changes.append((self._step, t))
        self._fold_pending()
        prev, self._step = self._step, self._step + 1 if step is None else int(step)
        self._bwd_order = 0
        self._step_calls = []
        self._sampling = self._step % self._every == 0
        if self._flush_every is not None and self._step // self._flush_every > prev // self._flush_every:
            self.flush()

    def _fold_pending(self) -> None:
        self._deferred = []  # left over only by a backward pass that raised
        self._param_pending = []
        keep = self._sampling and self._grads  # the per-step gradient history (see flush)
        for st in self._states.values():
            if st.grad_touched:
                if keep:
                    st.gin_hist[len(self._gin_step_nums)] = torch.cat([st.slots, st.fired], 1)
                self._fold_grads(st)
        if keep:
            self._gin_step_nums.append(self._step)
        self._resolve_params()
        for i in self._grad_layers_step:
            self._counters[i].saw_step(self._step)
        self._grad_layers_step = set()

    def flush(self) -> List[dict]:
        """Read the window's statistics back (one transfer per device), derive findings, feed the sinks.

        Under ``torch.distributed`` (initialised) it is a collective: every rank of the process group
        must call it (and :meth:`findings`, :meth:`snapshot`, :meth:`compare`, :meth:`close`) in
        step; it all-reduces the window (two ``all_reduce`` calls) and every rank gets the global
        statistics. See docs/monitor.md, "Distributed".

        Returns:
            The records of this window (run record first time, one ``layer_stats`` per active layer,
            then the new findings); empty when nothing was recorded since the last flush.
        """
        if _dist_initialized():
            raws = self._read_window_dist()
            active = sorted(raws)
        else:
            active = [i for i, c in enumerate(self._counters) if c.active]
            raws = self._read_window(active) if active else {}
        for st in self._states.values():
            st.gin_hist.clear()
        self._gin_step_nums = []
        if not active:
            return []
        records: List[dict] = []
        if not self._run_written:
            records.append(self._run_record())
            self._run_written = True
        stats = {}
        for i in active:
            layer, raw = self._layers[i], raws[i]
            s = raw.stats(self._eps(i), self._eps_factor)
            stats[i] = s
            records.append({"type": "layer_stats", "step": raw.last_step, "window_start": raw.first_step,
                            "window_end": raw.last_step, "steps": raw.steps, "layer": layer.name,
                            "kind": layer.kind, **s})
            if self._totals[i] is None:
                self._totals[i] = raw.copy()
            else:
                self._totals[i].merge(raw)
        new = self._detect(raws, stats)
        self._time_steps = {}
        self._findings.extend(new)
        records.extend(f.to_record() for f in new)
        self._order_changes = self._order_changes[-1:]
        self._counters = [_Counters() for _ in self._layers]
        self._emit(records)
        return records

    def findings(self) -> List[Finding]:
        """Every finding so far, oldest first (flushes first, so that the current window counts)."""
        if not self._closed:
            self.flush()
        return list(self._findings)

    def snapshot(self) -> dict:
        """Statistics of every layer accumulated since construction, as a JSON-serialisable dict.

        Use it as the baseline of :meth:`compare` (save it with :func:`save_snapshot`). Flushes first.
        """
        if not self._closed:
            self.flush()
        layers = {}
        for i, layer in enumerate(self._layers):
            raw = self._totals[i]
            if raw is None:
                continue
            s = raw.stats(self._eps(i), self._eps_factor)
            layers[layer.name] = {"kind": layer.kind, "steps": raw.steps, **s, "var_hist": raw.var_hist[:-1]}
        return {"format": SNAPSHOT_FORMAT, "step": self._step, "hist_range": list(self._layout.hist_range),
                "hist_bins": self._layout.hist_bins, "var_log10_range": list(L.VAR_LOG10_RANGE),
                "var_bins_per_decade": L.VAR_BINS_PER_DECADE, "layers": layers}

    def compare(self, baseline: Union[dict, str, "os.PathLike[str]"], *, factor: Optional[float] = None
                ) -> List[Finding]:
        """Compare the input variance of each layer with a baseline :meth:`snapshot`.

        A layer whose mean per-row input variance (accumulated since construction) is more than
        ``factor`` times above or below the baseline's gets a ``variance_shift`` warning. Typical use:
        snapshot the model before pruning or quantisation on calibration data, run the changed model
        on the same data under a new monitor, and compare; flagged layers need recalibration. Layers
        missing on either side are ignored. The findings are also recorded and sent to the sinks.

        Args:
            baseline: a :meth:`snapshot` dict, or the path of one saved with :func:`save_snapshot`.
            factor: the ratio beyond which a layer is flagged. Default: ``thresholds.variance_shift``.

        Returns:
            The ``variance_shift`` findings, in layer order.
        """
        if isinstance(baseline, (str, os.PathLike)):
            baseline = load_snapshot(baseline)
        if not isinstance(baseline, dict) or not isinstance(baseline.get("layers"), dict):
            raise TypeError(f"Expected baseline to be a Monitor.snapshot() dict or its path, but got "
                            f"{type(baseline).__name__}")
        factor = self._thresholds.variance_shift if factor is None else factor
        if not _is_real(factor) or not factor > 1:
            raise ValueError(f"Expected factor to be a number > 1, but got {factor!r}")
        if not self._closed:
            self.flush()
        found = []
        for i, layer in enumerate(self._layers):
            base = baseline["layers"].get(layer.name)
            raw = self._totals[i]
            if base is None or raw is None:
                continue
            b, c = base.get("var_mean"), raw.stats(self._eps(i), self._eps_factor)["var_mean"]
            if not (_is_real(b) and math.isfinite(b) and b > 0 and math.isfinite(c)):
                continue
            ratio = c / b
            if ratio > factor or ratio < 1.0 / factor:
                direction = "grew" if ratio > 1 else "shrank"
                found.append(Finding(
                    layer.name, self._step, "variance_shift", "warning", ratio,
                    f"input variance of layer {layer.name} {direction} to {ratio:.3g}x its baseline "
                    f"(mean per-row variance {c:.4g} vs {b:.4g}) by step {self._step}: the layers before it "
                    f"changed (pruning, quantisation, fine-tuning); recalibrate this norm (re-estimate its "
                    f"statistics or fine-tune its gamma/beta on calibration data)"))
        self._findings.extend(found)
        if found:
            self._emit([f.to_record() for f in found])
        return found

    @property
    def is_paused(self) -> bool:
        """Whether recording is paused (:meth:`pause` / :meth:`paused`)."""
        return self._paused > 0

    def pause(self) -> None:
        """Stop recording until :meth:`resume`: the hooks return at once (forward calls, input and
        parameter gradients), and :meth:`step` raises, so steps do not advance. Pauses nest: recording
        resumes at the last matching :meth:`resume`. Prefer the :meth:`paused` context manager.
        """
        if self._closed:
            raise RuntimeError("Expected an open Monitor, but pause() was called after close()")
        self._paused += 1
        self._sampling = False

    def resume(self) -> None:
        """End a :meth:`pause`; the current step is sampled again if its number is a multiple of ``every``."""
        if not self._paused:
            raise RuntimeError("Expected a paused Monitor, but resume() was called without a matching pause()")
        self._paused -= 1
        if not self._paused and not self._closed:
            self._sampling = self._step % self._every == 0

    @contextlib.contextmanager
    def paused(self) -> Iterator["Monitor"]:
        """A context in which nothing is recorded and steps do not advance: evaluation, generation.

        Example::

            >>> with mon.paused():
            ...     val_loss = evaluate(model, val_loader)
        """
        self.pause()
        try:
            yield self
        finally:
            self.resume()

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this one's numbering and findings, for a checkpoint.

        Holds: the current step number; the reference gamma/beta of every layer (drift stays
        measured from the start of the run, not from the resume); the findings so far, the
        conditions already reported (so that a resumed run does not report them again) and the
        per-layer gradient-norm history (so that exploding/vanishing gradients are judged at once).
        Not the statistics of the current window (it does not flush: records not flushed yet are
        not in it) nor the totals behind :meth:`snapshot`. Values are tensors (on the CPU), numbers,
        strings, lists and dicts: ``torch.save`` / ``torch.load(..., weights_only=True)`` handle it.
        """
        names = [x.name for x in self._layers]
        with torch.no_grad():
            refs = [{pname: ref.detach().to("cpu", copy=True) for pname, (_, ref) in r.items()} for r in self._refs]
        return {"format": STATE_FORMAT, "step": self._step, "layers": names, "refs": refs,
                "findings": [f.to_record() for f in self._findings],
                "active": [list(k) for k in sorted(self._active)], "nonfinite_active": self._nonfinite_active,
                "grad_history": [[names[i], metric, list(h), h.maxlen]
                                 for (i, metric), h in sorted(self._grad_history.items())],
                "grad_steps": [[names[i], metric, n] for (i, metric), n in sorted(self._rule_state.grad_steps.items())],
                "rules_last_step": self._rule_state.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from a :meth:`state_dict`: the next records are numbered from its step.

        Call it before the monitor records anything (right after construction), or between steps
        with nothing unflushed (after :meth:`step` and :meth:`flush`); the monitor must watch the
        same layers (same names, same parameter shapes).
        """
        if self._closed:
            raise RuntimeError("Expected an open Monitor, but load_state_dict() was called after close()")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Expected a Monitor.state_dict() ({STATE_FORMAT}), but got {got!r}")
        names = [x.name for x in self._layers]
        if list(state["layers"]) != names:
            raise ValueError(f"Expected a state of the same layers {names}, but got {list(state['layers'])}")
        step = state["step"]
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Expected the state's step to be a non-negative int, but got {step!r}")
        if self._step_calls or self._grad_layers_step or any(c.active for c in self._counters):
            raise RuntimeError(f"Expected load_state_dict() before anything is recorded (or after step() and flush()), "
                               f"but the Monitor has unflushed records of step {self._step}")
        new_refs = []
        for i, saved in enumerate(state["refs"]):
            refs = dict(self._refs[i])
            for pname, ref in saved.items():
                entry = refs.get(pname)
                if entry is None or not isinstance(ref, torch.Tensor) or ref.shape != entry[0].shape:
                    raise ValueError(f"Expected the state's {pname} reference of layer {names[i]} to match the "
                                     f"layer's parameter {None if entry is None else tuple(entry[0].shape)}, but "
                                     f"got {tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}")
                p = entry[0]
                with torch.no_grad():
                    refs[pname] = (p, ref.detach().to(device=p.device, dtype=p.dtype, copy=True))
            new_refs.append(refs)
        self._refs = new_refs
        self._findings = [Finding.from_record(r) for r in state["findings"]]
        self._active = {tuple(k) for k in state["active"]}
        self._nonfinite_active = bool(state["nonfinite_active"])
        index = {n: i for i, n in enumerate(names)}
        self._grad_history = {(index[n], metric): collections.deque(values, maxlen=maxlen)
                              for n, metric, values, maxlen in state["grad_history"]}
        self._rule_state.grad_steps = {(index[n], metric): int(c) for n, metric, c in state["grad_steps"]}
        self._rule_state.last_step = state["rules_last_step"]
        self._step = int(step)
        self._order_changes = []
        if not self._paused:
            self._sampling = self._step % self._every == 0

    def close(self) -> None:
        """Flush, remove every hook and close the sinks. Idempotent."""
        if self._closed:
            return
        try:
            self._fold_pending()  # gradients of a last step that step() did not end
            self.flush()
        finally:
            self._closed = True
            self._sampling = False
            for h in self._handles:
                h.remove()
            self._handles = []
            for layer in self._layers:
                if layer.recurrent and getattr(layer.module, "step_observers", 0) > 0:
                    layer.module.step_observers -= 1
            self._call_sinks("close")

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor({len(self._layers)} layers, every={self._every}, row_fraction={self._row_fraction}, "
                f"step={self._step}{', closed' if self._closed else ''})")

    # --- hooks ------------------------------------------------------------------------------------------

    # Each hook is a cheap gate plus a heavy part. The gate only reads ``self._sampling``: on a step
    # that is not sampled it returns at once, and torch.compile traces it away (guarding on the flag:
    # one compiled graph for sampled steps, one for the others). In eager mode the heavy part runs
    # the measurement (wrapped in torch.compiler.disable, a no-op outside compiled code). Under
    # torch.compile (``torch.compiler.is_compiling()``) it is traced instead, and calls the custom ops
    # of normscope.monitor._compiled, which run the same measurement when the compiled graph runs:
    # no graph break, and nothing in the graph depends on the step number.

    def _make_pre_hook(self, index: int):
        heavy = _eager(functools.partial(self._pre_hook, index))
        op_id, _ = self._compiled_ids()

        def pre_hook(module, args, kwargs):
            if not self._sampling:
                return None
            if torch.compiler.is_compiling():
                return self._pre_hook(index, args, kwargs, op_id)
            return heavy(args, kwargs)

        return pre_hook

    def _pre_hook(self, index: int, args, kwargs, op_id: Optional[int] = None):
        if not self._grads or not torch.is_grad_enabled():
            return None
        x, where = _first_tensor(args, kwargs)
        if x is None or not x.requires_grad or not x.is_floating_point():
            return None
        tapped = _GradTap.apply(x, self, index) if op_id is None else _compiled.tap(x, op_id, index)
        if isinstance(where, int):
            return args[:where] + (tapped,) + args[where + 1:], kwargs
        return args, {**kwargs, where: tapped}

    def _make_hook(self, index: int):
        heavy = _eager(functools.partial(self._hook, index))
        op_id, token = self._compiled_ids()

        def hook(module, args, kwargs, output):
            if not self._sampling:
                return None
            if torch.compiler.is_compiling():
                x, y = _hook_tensors(args, kwargs, output)
                _compiled.observe(None if x is None else x.detach(), None if y is None else y.detach(), token,
                                  op_id, index)
                return None
            heavy(args, kwargs, output)
            return None

        return hook

    def _hook(self, index: int, args, kwargs, output) -> None:
        self._observe(index, *_hook_tensors(args, kwargs, output))

    def _compiled_ids(self) -> Tuple[int, torch.Tensor]:
        """This monitor's id for the custom ops that the hooks call under torch.compile, and the token
        tensor the forward op mutates (normscope.monitor._compiled); made on first use, at construction."""
        ids = self.__dict__.get("_op_ids")
        if ids is None:
            with torch.inference_mode(False):
                ids = self._op_ids = (_compiled.register(self), torch.zeros(1))
        return ids

    def _make_param_hook(self, index: int, col: int):
        heavy = _eager(functools.partial(self._param_hook, index, col))

        def hook(param):
            if self._sampling:
                heavy(param)

        return hook

    def _param_hook(self, index: int, col: int, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if not _dist_initialized():
            # Read when the backward pass ends, all parameters of a device at once (_read_param_grads):
            # one fused norm instead of a call per parameter; the accumulated gradient, as the hook sees it.
            if not self._param_pending:
                try:
                    _queue_callback(self._read_param_grads)
                except RuntimeError:  # not inside a backward pass: measure it now
                    self._on_param_grad(index, col, grad)
                    return
            self._param_pending.append((index, col, param))
            return
        if not _is_dtensor(param):
            self._defer_param_grad(index, col, param)
        grad = self._grad_part(grad)
        self._on_param_grad(index, col, grad)

    def _grad_part(self, grad: torch.Tensor) -> torch.Tensor:
        """Under torch.distributed, what this rank adds to the global squared norm of a parameter gradient:
        its local shard (a DTensor sharded over the ranks), or the whole gradient on the first replica of
        a replicated one (rank 0 of the group for a plain tensor); a zero where nothing."""
        part = _shard_part(grad, self._group)
        if part is None or part.numel() == 0:
            local = grad.to_local() if _is_dtensor(grad) else grad
            return torch.zeros(1, dtype=local.dtype, device=local.device)
        return part

    def _defer_param_grad(self, index: int, col: int, param: torch.Tensor) -> None:
        """Read ``param``'s gradient again when the backward pass ends: under DDP the hook sees this rank's
        gradient, which DDP replaces by the average over the ranks in a callback at the end of backward."""
        if not self._deferred:
            try:
                _queue_callback(self._after_backward)
            except RuntimeError:  # not inside a backward pass: the hook's reading stands
                return
        self._deferred.append((index, col, param))

    def _after_backward(self) -> None:
        # Queued by the first gradient hook of the pass, this runs before the callbacks that DDP queues
        # later in the pass (its reduction ends in one); queued again from here, the read runs after them.
        _queue_callback(self._read_deferred)

    @torch.no_grad()
    def _read_param_grads(self) -> None:
        """At the end of a backward pass: |grad|^2 of the parameters whose gradient accumulated in it, per
        device one ``torch._foreach_norm`` (float64) and one ``index_copy_`` into the slots on the CPU."""
        pending, self._param_pending = self._param_pending, []
        if self._closed:
            return
        latest: Dict[Tuple[int, int], torch.Tensor] = {}
        for index, col, param in pending:  # a parameter seen twice (shared): its last reading, as before
            grad = param.grad
            if grad is not None:
                latest[(index, col)] = grad
        cpu: List[Tuple[int, int]] = []
        for (index, col), grad in latest.items():
            if grad.device.type == "cpu" and not grad.is_sparse and not _triton_for(grad):
                cpu.append((index, col))
            else:  # other devices (and NORMSCOPE_MONITOR_KERNEL=triton): one kernel per gradient
                self._on_param_grad(index, col, grad)
        if not cpu:
            return
        key = tuple(cpu)
        idx = self._param_index.get(key)
        if idx is None:
            idx = self._param_index[key] = (torch.tensor([3 * i + c for i, c in cpu]),
                                            torch.tensor(sorted({2 * i + 1 for i, _ in cpu})))
        st = self._state(torch.device("cpu"))
        norms = torch._foreach_norm([latest[k] for k in cpu], 2, dtype=_F64)
        st.slots.view(-1).index_copy_(0, idx[0], torch.stack(norms).square_())
        st.fired.view(-1).index_fill_(0, idx[1], 1.0)
        st.grad_touched = st.dirty = True
        for index, _ in cpu:
            self._grad_layers_step.add(index)
            self._counters[index].grad_events += 1

    @torch.no_grad()
    def _read_deferred(self) -> None:
        pending, self._deferred = self._deferred, []
        for index, col, param in pending:
            if param.grad is not None and not self._closed:
                self._on_param_grad(index, col, self._grad_part(param.grad))

    def _watch_param(self, i: int, col: int, p) -> None:
        """Hook the gradient of ``p``, layer ``i``'s weight (``col`` 1) or bias (2), instead of the parameter
        it replaces."""
        old = self._param_handles.pop((i, col), None)
        if old is not None:
            old.remove()
        if self._grads and isinstance(p, torch.nn.Parameter) and p.requires_grad:
            handle = p.register_post_accumulate_grad_hook(self._make_param_hook(i, col))
            self._param_handles[(i, col)] = handle
            self._handles.append(handle)

    def _resolve_params(self) -> None:
        """Follow gamma / beta replaced since the Monitor was created (``fully_shard`` replaces them by DTensor
        parameters): hook the new ones, and keep measuring drift from the reference (its local shard).

        Called between steps. A DTensor replaced by a plain tensor is left alone: that is FSDP's unsharded
        parameter, in place only during a forward or backward pass (or with resharding after backward off).
        """
        for i, layer in enumerate(self._layers):
            seen, own, attrs = self._params[i], layer.module._parameters, layer.module.__dict__
            for col, pname in ((1, "weight"), (2, "bias")):
                old = seen[pname]
                p = own[pname] if pname in own else attrs.get(pname)  # (nn.Module.__getattr__ is slow)
                if p is old or not isinstance(p, torch.Tensor) or (_is_dtensor(old) and not _is_dtensor(p)):
                    continue
                seen[pname] = p
                self._watch_param(i, col, p)
                self._rebase_ref(i, pname, p)
                if not self._replaced_warned:
                    self._replaced_warned = True
                    warnings.warn(f"normscope.Monitor: parameter {pname} of layer {layer.name} was replaced after the "
                                  f"Monitor was created (e.g. by fully_shard); the Monitor follows the new parameters "
                                  f"from step {self._step + 1} on, but missed their gradients before: create the "
                                  f"Monitor after wrapping the model", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _rebase_ref(self, i: int, pname: str, p: torch.Tensor) -> None:
        """The drift reference of the new parameter ``p``: the old reference where the shapes agree (its
        local shard for a DTensor, without communication), else a copy of ``p`` (drift measured from now)."""
        entry = self._refs[i].pop(pname, None)
        if p.numel() == 0 or p.device.type == "meta":
            return
        ref = None
        if entry is not None and tuple(entry[1].shape) == tuple(p.shape):
            try:
                ref = _ref_like(entry[1], p)
            except Exception:  # noqa: BLE001 - a placement this cannot slice locally: drift from now
                ref = None
        self._refs[i][pname] = (p, p.detach().clone() if ref is None else ref)

    def _state(self, device: torch.device) -> _DeviceState:
        st = self._states.get(device)
        if st is None:
            st = self._states[device] = _DeviceState(device, len(self._layers), self._layout)
        return st

    def _rows(self, layer: NormLayer, t: torch.Tensor) -> Optional[torch.Tensor]:
        """``t`` as a 2-D (rows, values) tensor, a row being one vector the layer normalizes; None if unknown."""
        kind, m = layer.kind, layer.module
        if kind in ("layer_norm", "rms_norm"):
            shape, dims = layer.normalized_shape, layer.norm_dims
            if dims is not None and any(d >= 0 for d in dims):  # channels-first: the normalized axes to the end
                if t.dim() <= max(dims):
                    return None
                t = t.movedim(dims, tuple(range(-len(dims), 0)))
            k = len(shape)
            if t.dim() < k or tuple(t.shape[t.dim() - k:]) != shape:
                return None
            return t.reshape(-1, math.prod(shape))
        if t.dim() < 2:
            return None
        if kind == "group_norm":
            return t.reshape(t.shape[0] * m.num_groups, -1)
        if kind == "instance_norm":
            no_batch = m._get_no_batch_dim() if hasattr(m, "_get_no_batch_dim") else -1
            if t.dim() == no_batch:
                return t.reshape(t.shape[0], -1)
            return t.reshape(t.shape[0] * t.shape[1], -1)
        if kind == "batch_norm":
            return t.transpose(0, 1).reshape(t.shape[1], -1)
        return None

    def _eps(self, index: int) -> float:
        return effective_eps(self._layers[index], self._dtypes[index])

    @torch.no_grad()
    def _observe(self, i: int, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> None:
        """Accumulate one forward call of layer ``i``. Device operations only: no host synchronisation."""
        counters = self._counters[i]
        order = len(self._step_calls)
        if order > L.MAX_ORDER:
            counters.skipped_calls += 1
            return
        self._step_calls.append(i)
        layer = self._layers[i]
        if layer.recurrent:
            t = getattr(layer.module, "time_step", None)
            if t is not None:
                self._time_steps[(self._step, order)] = (int(t), str(getattr(layer.module, "site", "")))
        if (x is None or y is None or not x.is_floating_point() or not y.is_floating_point()
                or x.shape != y.shape or x.numel() == 0):
            counters.skipped_calls += 1
            return
        xr, yr = self._rows(layer, x), self._rows(layer, y)
        if xr is None or yr is None:
            counters.skipped_calls += 1
            return
        self._dtypes[i] = x.dtype
        n_rows = xr.shape[0]
        start = (self._step % self._stride) % n_rows
        n_s = -(-(n_rows - start) // self._stride)
        counters.calls += 1
        counters.rows += n_rows
        counters.rows_sampled += n_s
        counters.saw_step(self._step)

        st = self._state(x.device)
        st.dirty = True
        if _triton_for(x, y):
            # CUDA tensors (and any under NORMSCOPE_MONITOR_KERNEL=triton): the fused Triton kernels
            # (normscope/monitor/_triton_stats.py), the same fields as the C++ kernel below.
            key = self._step * L.KEY_STEP + 2 * order
            lo, hi = self._layout.hist_range
            _TS._stats_call(xr, yr, *st.views[i], st.edges(_F64)[0], start, self._stride, layer.kind == "rms_norm",
                            self._eps_factor * effective_eps(layer, x.dtype),
                            -(-n_s // max(1, self._hist_max_elements // xr.shape[1])), lo,
                            self._layout.hist_bins / (hi - lo), (-float(key), -float(key + 1), -float(self._step)))
            return
        if (self._cpu_kernel and x.device.type == "cpu" and y.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
                and y.dtype in _KERNEL_DTYPES):
            # One fused pass (normscope.ops.cpu_backend.monitor_stats) instead of the ~45 ops below.
            a_sums, a_max, a_vh, a_ih = st.addrs[i][:4]
            key = self._step * L.KEY_STEP + 2 * order
            lo, hi = self._layout.hist_range
            bins = self._layout.hist_bins
            edges = st.kernel_var_edges
            _CB._monitor_call(
                xr.contiguous(), yr.contiguous(), _KERNEL_DTYPES[x.dtype], _KERNEL_DTYPES[y.dtype], a_sums, a_max,
                a_vh, a_ih, edges.data_ptr(), edges.numel(), start, self._stride, layer.kind == "rms_norm",
                self._eps_factor * effective_eps(layer, x.dtype),
                -(-n_s // max(1, self._hist_max_elements // xr.shape[1])), bins, lo, bins / (hi - lo),
                (-float(key), -float(key + 1), -float(self._step)))
            return
        xs, ys = xr[start::self._stride], yr[start::self._stride]
        sums_v, max_v, var_hist_v, in_hist_v = st.views[i]
        acc = _F64 if x.dtype == _F64 else torch.float32
        xs = xs.to(acc)
        if layer.kind == "rms_norm":
            mean, var = xs.mean(-1), xs.square().mean(-1)
        else:
            var, mean = torch.var_mean(xs, dim=-1, correction=0)
        good = var < math.inf  # False for NaN and Inf: rows whose statistics are left out
        mv = torch.stack([mean, var])
        n_eps = (var < self._eps_factor * effective_eps(layer, x.dtype)).sum(dtype=_F64)
        nan_in, inf_in = torch.isnan(x).sum(dtype=_F64), torch.isinf(x).sum(dtype=_F64)
        nan_out, inf_out = torch.isnan(y).sum(dtype=_F64), torch.isinf(y).sum(dtype=_F64)
        ys = ys.to(_F64)  # output moments: two passes in float64 (deviations from a large mean stay exact)
        fin = torch.isfinite(ys)
        bad_out = nan_out + inf_out if n_s == n_rows else (~fin).sum(dtype=_F64)
        flags = torch.stack([nan_in + inf_in, bad_out, n_eps])
        sums_v[:L.S_OUT_N].add_(torch.cat([
            good.sum(dtype=_F64).reshape(1),
            torch.where(good, mv, 0.0).sum(1, dtype=_F64),
            torch.stack([n_eps, nan_in, inf_in, nan_out, inf_out]),
        ]))
        # The call's (count, mean, M2) of the finite outputs, merged into the window's (Chan et al.).
        n_c = ys.numel() - bad_out
        mean_c = torch.where(fin, ys, 0.0).sum() / n_c.clamp(min=1.0)
        m2_c = torch.where(fin, ys - mean_c, 0.0).square().sum()
        out_v = sums_v[L.S_OUT_N:L.S_OUT_M2 + 1]
        n_a, mean_a = out_v[0], out_v[1]
        n_t = n_a + n_c
        w = n_c / n_t.clamp(min=1.0)
        delta = mean_c - mean_a
        out_v.copy_(torch.stack([n_t, mean_a + delta * w, out_v[2] + m2_c + delta.square() * (n_a * w)]))
        # Maxima: [max row mean, max row var, -min row mean, -min row var, -key(input non-finite),
        # -key(output non-finite), -first eps step]; a key counts only where its event happened.
        neg_keys = st.key_step * self._step + (st.key_order * order + st.key_const)
        torch.maximum(max_v, torch.cat([
            torch.where(good, torch.cat([mv, -mv]), -math.inf).amax(1),
            torch.where(flags > 0, neg_keys, st.neg_inf),
        ]), out=max_v)

        var_e, in_e = st.edges(acc)
        v_idx = torch.where(good, torch.bucketize(var, var_e, right=True), L.VAR_BINS + 2)
        var_hist_v.scatter_add_(0, v_idx, st.one.expand(n_s))
        max_rows = max(1, self._hist_max_elements // xs.shape[1])
        hv = xs[::-(-n_s // max_rows)].reshape(-1)  # at most max_rows evenly spaced rows
        # Uniform bins: the bin index is arithmetic (a binary search per element costs several times more).
        # Equal to bucketize(hv, edges, right=True) except for values within rounding of an edge.
        bins = self._layout.hist_bins
        h_lo, h_hi = self._layout.hist_range
        pos = ((hv - h_lo) * (bins / (h_hi - h_lo)) + 1.0).floor_().clamp_(0, bins + 1)
        h_idx = torch.where(torch.isnan(hv), bins + 2, pos.long())
        in_hist_v.scatter_add_(0, h_idx, st.one.expand(hv.shape[0]))

    @torch.no_grad()
    def _on_input_grad(self, i: int, grad: Optional[torch.Tensor]) -> None:
        """Backward of layer ``i``'s input tap: add |grad|^2 to this step's slot. No host synchronisation."""
        if self._closed or self._paused or grad is None:
            return
        st = self._state(grad.device)
        order = self._bwd_order
        self._bwd_order += 1
        key = self._step * L.KEY_STEP + min(order, L.MAX_ORDER)
        if _triton_for(grad):
            g_in, _, _, fired_in, _, key_v = st.grad_views[i]
            _TS._grad_call(grad, g_in, fired_in, key_v, -float(key), True)
        elif self._cpu_kernel and grad.device.type == "cpu" and grad.dtype in _KERNEL_DTYPES:
            a = st.addrs[i]
            _CB.monitor_grad(grad, a[5], a[6], a[4], -float(key), True)
        else:
            acc = _F64 if grad.dtype == _F64 else torch.float32
            g_in, _, _, fired_in, _, key_v = st.grad_views[i]
            gsq = torch.linalg.vector_norm(grad, dtype=acc).square()
            g_in.add_(gsq)
            fired_in.fill_(1.0)
            torch.maximum(key_v, torch.where(gsq < math.inf, st.neg_inf, st.zero).sub_(key), out=key_v)
        st.grad_touched = st.dirty = True
        self._grad_layers_step.add(i)
        self._counters[i].grad_events += 1

    @torch.no_grad()
    def _on_param_grad(self, i: int, col: int, grad: torch.Tensor) -> None:
        """After a parameter's gradient accumulated: keep its |grad|^2 for this step (the last one wins)."""
        if self._closed:
            return
        st = self._state(grad.device)
        if _triton_for(grad):
            views = st.grad_views[i]
            _TS._grad_call(grad, views[col], views[4], views[4], 0.0, False)
        elif self._cpu_kernel and grad.device.type == "cpu" and grad.dtype in _KERNEL_DTYPES:
            a = st.addrs[i]
            _CB.monitor_grad(grad, a[5] + 8 * col, a[6] + 8, 0, 0.0, False)
        else:
            acc = _F64 if grad.dtype == _F64 else torch.float32
            views = st.grad_views[i]
            views[col].copy_(torch.linalg.vector_norm(grad, dtype=acc).square())
            views[4].fill_(1.0)
        st.grad_touched = st.dirty = True
        self._grad_layers_step.add(i)
        self._counters[i].grad_events += 1

    @torch.no_grad()
    def _fold_grads(self, st: _DeviceState) -> None:
        """Fold this step's gradient norms into the window, for all layers at once (device operations)."""
        s, m, b = st.slots, st.fired, st.buf
        g = torch.stack([s[:, 0], s[:, 1] + s[:, 2]], 1).sqrt_()  # (layers, [input, params])
        b[:, L.S_GIN_SUM:L.S_GIN_SUM + 2].add_(g * m)
        b[:, L.S_GIN_N:L.S_GIN_N + 2].add_(m)
        on = m > 0
        hi = b[:, L.M_GIN_MAX:L.M_GIN_MAX + 2]
        hi.copy_(torch.where(on, torch.maximum(hi, g), hi))
        lo = b[:, L.M_GIN_NEGMIN:L.M_GIN_NEGMIN + 2]
        lo.copy_(torch.where(on, torch.maximum(lo, -g), lo))
        s.zero_()
        m.zero_()
        st.grad_touched = False

    # --- flush --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _param_stats(self, i: int) -> Tuple[List[str], List[torch.Tensor]]:
        names, values = [], []
        for pname, (p, ref) in self._refs[i].items():
            if ref.device != p.device:
                ref = ref.to(p.device)
                self._refs[i][pname] = (p, ref)
            acc = _F64 if p.dtype == _F64 else torch.float32
            w = p.detach().to(acc)
            d = w - ref.to(acc)
            names.append(pname)
            values.append(torch.stack([
                w.mean(), w.std(correction=0), w.amin(), w.amax(), torch.linalg.vector_norm(w),
                torch.linalg.vector_norm(d), d.abs().amax(),
            ]).to(_F64))
        return names, values

    def _read_window(self, active: List[int]) -> Dict[int, L.WindowRaw]:
        """Pack each device's accumulators, gradient history (and the parameter statistics) and read them
        in one transfer."""
        self._resolve_params()
        per_device: Dict[torch.device, List[Tuple[int, str, torch.Tensor]]] = {}
        with torch.no_grad():
            for i in active:
                names, values = self._param_stats(i)
                for pname, v in zip(names, values):
                    per_device.setdefault(v.device, []).append((i, pname, v))
        raws: Dict[int, L.WindowRaw] = {}
        params: Dict[int, Dict[str, float]] = {}
        devices = [d for d, st in self._states.items() if st.dirty] + [d for d in per_device if
                                                                      not (d in self._states and self._states[d].dirty)]
        n, width, T = len(self._layers), self._layout.width, len(self._gin_step_nums)
        hist = [0.0] * (T * n * 5)  # the per-step gradient history, (steps, layers, 5), summed over the devices
        for dev in devices:
            st = self._states.get(dev)
            use_buf = st is not None and st.dirty
            use_hist = use_buf and bool(st.gin_hist)
            pvals = per_device.get(dev, [])
            with torch.no_grad():
                parts = ([st.buf.reshape(-1)] if use_buf else []) + [v for _, _, v in pvals]
                if use_hist:
                    zero = torch.zeros(n, 5, dtype=_F64, device=dev)
                    parts.append(torch.stack([st.gin_hist.get(t, zero) for t in range(T)]).reshape(-1))
                packed = torch.cat(parts) if len(parts) > 1 else parts[0]
                host = packed.to("cpu").tolist()  # the one device-to-host transfer for this device
                if use_buf:
                    st.buf.copy_(st.template)
                    st.dirty = False
            off = 0
            if use_buf:
                for i in active:
                    raw = L.WindowRaw.from_row(host[i * width:(i + 1) * width], self._layout)
                    raws[i] = raw if i not in raws else _merged(raws[i], raw)
                off = len(self._layers) * width
            if use_hist:
                hist = [a + b for a, b in zip(hist, host[len(host) - T * n * 5:])]
            for i, pname, _ in pvals:
                params.setdefault(i, {}).update(self._param_fields(i, pname, host[off:off + 7]))
                off += 7
        for i in active:
            raw = raws.get(i)
            if raw is None:
                raw = L.WindowRaw.from_row(self._layout.template_list(), self._layout)
            c = self._counters[i]
            raw.calls, raw.rows, raw.rows_sampled = c.calls, c.rows, c.rows_sampled
            raw.skipped_calls, raw.steps = c.skipped_calls, c.steps
            raw.first_step, raw.last_step = c.first_step, c.last_step
            raw.params = params.get(i, {})
            raw.grad_series = _series(self._gin_step_nums, hist, n, i)
            raws[i] = raw
        return raws

    def _param_fields(self, i: int, pname: str, values: Sequence[float]) -> Dict[str, float]:
        mean, std, lo, hi, norm, dl2, dmax = values
        n = self._refs[i][pname][0].numel()
        label = "weight" if pname == "weight" else "bias"
        return {f"{label}_mean": mean, f"{label}_std": std, f"{label}_min": lo, f"{label}_max": hi,
                f"{label}_norm": norm, f"{label}_drift_l2": dl2, f"{label}_drift_max": dmax,
                f"{label}_drift_rms": dl2 / math.sqrt(n)}

    @torch.no_grad()
    def _param_partials(self, i: int) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        """Layer ``i``'s gamma / beta as this rank's part of the global figures: ``(name, sums, maxima)``.

        ``sums`` (added over the ranks): [1, n, n * (m - K), M2, n * (m - K)^2, sum of w^2, sum of (w - ref)^2],
        where n, m and M2 are the count, mean and sum of squared deviations from m (two-pass) of this rank's
        part (:func:`_shard_part`) and K is the global mean of the previous flush, the same on every rank;
        ``maxima``: [max w, -min w, max |w - ref|]. :meth:`_param_fields_global` combines them (Chan et al.).
        A rank without a part (a replica other than the first, an empty shard) adds zeros and -inf.
        """
        out = []
        for pname, (p, ref) in self._refs[i].items():
            w = _shard_part(p.detach(), self._group)
            dev = (p.to_local() if _is_dtensor(p) else p).device
            if w is None or w.numel() == 0:
                out.append((pname, torch.zeros(7, dtype=_F64, device=dev),
                            torch.full((3,), -math.inf, dtype=_F64, device=dev)))
                continue
            w = w.to(_F64).reshape(-1)
            r = (ref.to_local() if _is_dtensor(ref) else ref).to(device=w.device, dtype=_F64).reshape(-1)
            n = float(w.numel())
            mean = w.mean()
            dm = mean - self._param_shift.get((i, pname), 0.0)
            d = w - r
            sums = torch.stack([torch.ones((), dtype=_F64, device=w.device), torch.full((), n, dtype=_F64,
                                device=w.device), n * dm, (w - mean).square().sum(), n * dm.square(),
                                w.square().sum(), d.square().sum()])
            out.append((pname, sums, torch.stack([w.amax(), -w.amin(), d.abs().amax()])))
        return out

    def _param_fields_global(self, i: int, pname: str, sums: Sequence[float], maxima: Sequence[float]
                             ) -> Dict[str, float]:
        """The gamma / beta fields from the all-reduced :meth:`_param_partials`; updates the shift K."""
        parts, n, b, m2, c, sq, dsq = sums
        k = self._param_shift.get((i, pname), 0.0)
        if not n > 0:
            return {}
        # Between-part term sum_r n_r (m_r - m)^2 = sum_r n_r (m_r - K)^2 - n (m - K)^2: small when K is close
        # to m (the mean of the previous flush); zero with one part (replicated parameters).
        between = c - b * b / n if parts > 1 else 0.0
        mean = k + b / n
        self._param_shift[(i, pname)] = mean if math.isfinite(mean) else 0.0
        hi, neg_lo, dmax = maxima
        dl2 = math.sqrt(dsq)
        label = "weight" if pname == "weight" else "bias"
        return {f"{label}_mean": mean, f"{label}_std": math.sqrt(max((m2 + between) / n, 0.0)),
                f"{label}_min": -neg_lo, f"{label}_max": hi, f"{label}_norm": math.sqrt(sq),
                f"{label}_drift_l2": dl2, f"{label}_drift_max": dmax, f"{label}_drift_rms": dl2 / math.sqrt(n)}

    def _read_window_dist(self) -> Dict[int, L.WindowRaw]:
        """The window combined over the ranks of the process group: two ``all_reduce`` calls, then one read.

        Every layer's row is reduced (whether active here or not, so that all ranks issue the same
        collectives): one SUM over the sums, the histograms, the per-step gradient history, the host
        counters and the partial sums of gamma / beta (:meth:`_param_partials`), one MAX over the maxima
        (minima and first-event keys are stored negated), the step range and the extrema of gamma / beta.
        Parameters are global figures: a DTensor's shards add up, a replicated parameter (DDP) counts once.
        """
        dist = torch.distributed
        self._resolve_params()
        group, lay = self._group, self._layout
        n, T, NS, H0 = len(self._layers), len(self._gin_step_nums), L.N_SUMS, L.HIST0
        world = dist.get_world_size(group)
        dev = _comm_device(group)
        with torch.no_grad():
            buf = None
            hist = torch.zeros(T, n, 5, dtype=_F64, device=dev)
            for st in self._states.values():  # this rank's devices: sums add, maxima take the maximum
                b = st.buf.to(dev, copy=True)
                if buf is None:
                    buf = b
                else:
                    out = _chan_merge_rows(buf[:, L.S_OUT_N:L.S_OUT_M2 + 1], b[:, L.S_OUT_N:L.S_OUT_M2 + 1])
                    buf[:, :NS] += b[:, :NS]
                    buf[:, L.S_OUT_N:L.S_OUT_M2 + 1] = out
                    buf[:, H0:] += b[:, H0:]
                    buf[:, NS:H0] = torch.maximum(buf[:, NS:H0], b[:, NS:H0])
                if st.gin_hist:
                    zero = torch.zeros(n, 5, dtype=_F64, device=st.device)
                    hist += torch.stack([st.gin_hist.get(t, zero) for t in range(T)]).to(dev)
                st.buf.copy_(st.template)
                st.dirty = False
            if buf is None:
                buf = lay.template(dev).repeat(n, 1)
            inf = math.inf
            csum = torch.tensor([[c.calls, c.rows, c.rows_sampled, c.skipped_calls, c.grad_events]
                                 for c in self._counters], dtype=_F64, device=dev)
            cmax = torch.tensor([[c.steps, -inf if c.last_step is None else c.last_step,
                                  -inf if c.first_step is None else -c.first_step] for c in self._counters],
                                dtype=_F64, device=dev)
            pkeys, psums, pmaxs = [], [], []
            for i in range(n):
                for pname, ps, pm in self._param_partials(i):
                    pkeys.append((i, pname))
                    psums.append(ps.to(dev))
                    pmaxs.append(pm.to(dev))
            P = len(pkeys)
            # The output moments (count, mean, M2) of each layer cannot be added over the ranks (sums of
            # squares about zero would cancel catastrophically for a large mean): the SUM gathers them
            # instead, each rank filling its own row of a (world, layers, 3) block with zeros elsewhere
            # (adding zeros is exact), and the host merges the ranks' triples in rank order (Chan et al.).
            # Exact to double precision and deterministic, for 24 bytes per layer and rank, in the same
            # all_reduce; a shifted-sums form would need a common shift and still lose digits.
            rank = dist.get_rank(group)
            out_g = torch.zeros(world, n, 3, dtype=_F64, device=dev)
            out_g[rank] = buf[:, L.S_OUT_N:L.S_OUT_M2 + 1]
            sum_v = torch.cat([buf[:, :NS].reshape(-1), buf[:, H0:].reshape(-1), hist.reshape(-1), csum.reshape(-1)]
                              + psums + [out_g.reshape(-1)])
            max_v = torch.cat([buf[:, NS:H0].reshape(-1), cmax.reshape(-1)] + pmaxs)
            dist.all_reduce(sum_v, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(max_v, op=dist.ReduceOp.MAX, group=group)
            # The norms of a step: input gradient sqrt(sum over ranks of |g_in|^2) / world size, the norm of the
            # gradient of the mean of the ranks' losses (what DDP optimises) over all samples; parameters
            # sqrt(sum over ranks of their parts of |g|^2), the norm of the gradient that the optimizer sees
            # (the sharded one under FSDP, the averaged one under DDP: see _defer_param_grad).
            o1, o2 = n * NS, n * NS + n * (lay.width - H0)
            hist = sum_v[o2:o2 + T * n * 5].view(T, n, 5)
            g = torch.stack([hist[..., 0].sqrt() / world, (hist[..., 1] + hist[..., 2]).sqrt()], 2)  # (T, n, 2)
            on = hist[..., 3:5] > 0
            none = torch.full((1, n, 2), -inf, dtype=_F64, device=dev)
            win = torch.stack([torch.where(on, g, 0.0).sum(0), on.sum(0, dtype=_F64),
                               torch.cat([torch.where(on, g, -inf), none]).amax(0),
                               torch.cat([torch.where(on, -g, -inf), none]).amax(0)], 1)  # (n, 4, 2)
            host = torch.cat([sum_v[:o2], sum_v[o2 + T * n * 5:], max_v, win.reshape(-1), hist.reshape(-1)]
                             ).to("cpu").tolist()
        nm, hw = H0 - NS, lay.width - H0
        sums, hists = host[:o1], host[o1:o2]
        o = o2
        csum, o = host[o:o + 5 * n], o + 5 * n
        psum, o = host[o:o + 7 * P], o + 7 * P
        out_g, o = host[o:o + 3 * n * world], o + 3 * n * world
        maxima, o = host[o:o + n * nm], o + n * nm
        cmax, o = host[o:o + 3 * n], o + 3 * n
        pmax, o = host[o:o + 3 * P], o + 3 * P
        win, o = host[o:o + 8 * n], o + 8 * n
        steps_hist = host[o:]
        raws: Dict[int, L.WindowRaw] = {}
        for i in range(n):
            calls, rows, rows_sampled, skipped, grad_events = (int(v) for v in csum[5 * i:5 * i + 5])
            if not (calls or skipped or grad_events):
                continue
            s, m, h = sums[i * NS:(i + 1) * NS], maxima[i * nm:(i + 1) * nm], hists[i * hw:(i + 1) * hw]
            out = (0.0, 0.0, 0.0)
            for r in range(world):
                out = L.chan_merge(out, out_g[3 * (r * n + i):3 * (r * n + i) + 3])
            s[L.S_OUT_N:L.S_OUT_M2 + 1] = out
            w = win[8 * i:8 * i + 8]  # [sum, steps, max, -min] x [input, params]
            s[L.S_GIN_SUM], s[L.S_GP_SUM], s[L.S_GIN_N], s[L.S_GP_N] = w[0:4]
            m[L.M_GIN_MAX - NS], m[L.M_GP_MAX - NS], m[L.M_GIN_NEGMIN - NS], m[L.M_GP_NEGMIN - NS] = w[4:8]
            steps, last, neg_first = cmax[3 * i:3 * i + 3]
            raws[i] = L.WindowRaw(s, m, h[:L.VAR_BINS + 3], h[L.VAR_BINS + 3:], calls, rows, rows_sampled, skipped,
                                  int(steps), None if neg_first == -inf else int(-neg_first),
                                  None if last == -inf else int(last))
            raws[i].grad_series = _series(self._gin_step_nums, steps_hist, n, i, world)
        for j, (i, pname) in enumerate(pkeys):  # every layer's (the shift K of each moves on)
            fields = self._param_fields_global(i, pname, psum[7 * j:7 * j + 7], pmax[3 * j:3 * j + 3])
            if i in raws:
                raws[i].params.update(fields)
        return raws

    def _calls_of(self, step: int) -> Tuple[int, ...]:
        """The layers called in ``step``, in call order (as far as recorded)."""
        if step == self._step:
            return tuple(self._step_calls)
        calls: Tuple[int, ...] = ()
        for first, seq in self._order_changes:
            if first > step:
                break
            calls = seq
        return calls

    def _run_record(self) -> dict:
        return {"type": "run", "format": "normscope.monitor.run/1",
                "layers": [x.name for x in self._layers], "kinds": [x.kind for x in self._layers],
                "eps": [x.eps for x in self._layers], "every": self._every, "row_fraction": self._row_fraction,
                "row_stride": self._stride, "eps_factor": self._eps_factor,
                "hist_edges": self._layout.in_edges(), "var_edges": L.var_edges()}

    def _emit(self, records: List[dict]) -> None:
        self._records.extend(records)
        if not self._all_ranks and _dist_initialized() and torch.distributed.get_rank(self._group) != 0:
            return  # the global records go to the sinks of rank 0 only
        self._call_sinks("write", records)

    def _call_sinks(self, method: str, *args) -> None:
        """Call ``method`` on every sink still enabled; one that raises is disabled with a warning."""
        for sink in self._sinks:
            if id(sink) in self._disabled_sinks:
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # a failing sink must not break the run nor lose the others' records
                self._disable_sink(sink, e)

    def _disable_sink(self, sink, error: Exception) -> None:
        self._disabled_sinks.add(id(sink))
        warnings.warn(f"normscope.Monitor: sink {sink!r} raised {type(error).__name__}: {error}; it is disabled "
                      "for the rest of the run (the other sinks and the in-memory records are unaffected)",
                      RuntimeWarning, stacklevel=3)

    # --- findings -----------------------------------------------------------------------------------------

    def _detect(self, raws: Dict[int, L.WindowRaw], stats: Dict[int, dict]) -> List[Finding]:
        """This window's new findings (:func:`normscope.monitor.rules.detect`); the reported conditions carry over."""
        st = self._rule_state
        st.active, st.nonfinite_active, st.grad_history = self._active, self._nonfinite_active, self._grad_history
        ctx = rules.RuleContext([x.name for x in self._layers], self._thresholds, self._eps_factor, self._every,
                                self._calls_of, lambda step, order: self._time_steps.get((step, order)))
        found = rules.detect(raws, stats, ctx, st)
        self._active, self._nonfinite_active = st.active, st.nonfinite_active
        return found


_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


_CB = None  # normscope.ops.cpu_backend, once the fused kernel is known to work


def _cpu_kernel_available() -> bool:
    """Whether the fused CPU statistics kernel can be used (builds the CPU kernels on first use)."""
    global _CB
    if _kernel_mode() in ("torch", "triton"):
        return False
    if _CB is not None:
        return True
    try:
        from normscope.ops import cpu_backend

        if not cpu_backend.available():
            return False
        cpu_backend._monitor_lib()
    except Exception:  # noqa: BLE001 - no compiler, or a failed build: the torch path
        return False
    _CB = cpu_backend
    return True


#: The statistics kernels: "auto" (the C++ kernel for CPU tensors, Triton for CUDA tensors when triton
#: imports, torch operations otherwise), "triton" (Triton for every tensor; CPU tensors need
#: TRITON_INTERPRET=1), "cpp" (the C++ kernel for CPU tensors, torch operations for the others) or
#: "torch" (torch operations for every tensor). Read once from NORMSCOPE_MONITOR_KERNEL.
_KERNEL_MODES = ("auto", "triton", "cpp", "torch")
_KERNEL_MODE: Optional[str] = None
_TS = None  # normscope.monitor._triton_stats, once imported
_TS_FAILED = False  # triton did not import (the "auto" mode then takes torch operations on CUDA)


def _kernel_mode() -> str:
    global _KERNEL_MODE
    if _KERNEL_MODE is None:
        mode = os.environ.get("NORMSCOPE_MONITOR_KERNEL", "").strip().lower() or "auto"
        if mode not in _KERNEL_MODES:
            raise ValueError(f"Expected NORMSCOPE_MONITOR_KERNEL to be one of {', '.join(_KERNEL_MODES)}, but got "
                             f"{mode!r}")
        _KERNEL_MODE = mode
    return _KERNEL_MODE


def _triton_for(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> bool:
    """Whether the statistics of ``x`` (and ``y``) go through the fused Triton kernels."""
    global _TS, _TS_FAILED
    mode = _kernel_mode()
    if mode == "cpp" or mode == "torch" or (mode == "auto" and x.device.type != "cuda"):
        return False
    if x.dtype not in _KERNEL_DTYPES or (y is not None and (y.dtype not in _KERNEL_DTYPES or y.device != x.device)):
        return False
    if _TS is None:
        if _TS_FAILED and mode == "auto":
            return False
        try:
            from normscope.monitor import _triton_stats
        except ImportError as e:
            _TS_FAILED = True
            if mode == "triton":
                raise ImportError("NORMSCOPE_MONITOR_KERNEL=triton needs triton: pip install 'normscope[gpu]'") from e
            return False
        _TS = _triton_stats
    return True


def _series(steps: Sequence[int], hist: Sequence[float], n: int, i: int, world: int = 1
            ) -> List[Tuple[int, float, float]]:
    """Layer ``i``'s ``WindowRaw.grad_series`` from the flat (steps, layers, 5) gradient history ``hist``
    ([|g_in|^2, |g_w|^2, |g_b|^2, input gradient seen, parameter gradient seen]); the input-gradient norm is
    divided by ``world`` (see Monitor._read_window_dist)."""
    out = []
    for t, step in enumerate(steps):
        g_in, g_w, g_b, seen_in, seen_p = hist[(t * n + i) * 5:(t * n + i + 1) * 5]
        if seen_in > 0 or seen_p > 0:
            out.append((step, math.sqrt(g_in) / world if seen_in > 0 else math.nan,
                        math.sqrt(g_w + g_b) if seen_p > 0 else math.nan))
    return out


def _chan_merge_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``(count, mean, M2)`` triples merged pairwise (Chan et al.), as device operations."""
    n_a, n_b = a[:, 0], b[:, 0]
    n = n_a + n_b
    w = n_b / n.clamp(min=1.0)
    delta = b[:, 1] - a[:, 1]
    return torch.stack([n, a[:, 1] + delta * w, a[:, 2] + b[:, 2] + delta.square() * (n_a * w)], 1)


def _merged(a: L.WindowRaw, b: L.WindowRaw) -> L.WindowRaw:
    a.merge(b)
    return a


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_dtensor(t) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # loaded with torch.distributed once in use

    return isinstance(t, DTensor)


def _shard_part(t: torch.Tensor, group) -> Optional[torch.Tensor]:
    """The part of ``t`` (a parameter or gradient) that this rank adds to global sums over ``group``: the
    local shard of a DTensor on the first replica along its unsharded mesh dimensions; a plain tensor
    (replicated, as under DDP) on rank 0 of the group only; None where nothing."""
    if _is_dtensor(t):
        coord = t.device_mesh.get_coordinate()
        if coord is None or any(c != 0 for c, pl in zip(coord, t.placements) if not pl.is_shard()):
            return None
        return t.to_local()
    return t if torch.distributed.get_rank(group) == 0 else None


def _ref_like(ref: torch.Tensor, p: torch.Tensor) -> Optional[torch.Tensor]:
    """The reference ``ref`` (of ``p``'s global shape) laid out like ``p``; None if that needs communication."""
    if _is_dtensor(p):
        if _is_dtensor(ref):
            same = ref.device_mesh == p.device_mesh and tuple(ref.placements) == tuple(p.placements)
            return ref if same else None
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = ref[tuple(slice(o, o + k) for o, k in zip(offset, shape))]
        like = p.to_local()
        return DTensor.from_local(local.to(device=like.device, dtype=like.dtype, copy=True), p.device_mesh,
                                  p.placements, run_check=False, shape=p.shape, stride=p.stride())
    if _is_dtensor(ref):
        return None
    return ref.to(device=p.device, dtype=p.dtype, copy=True)


def _queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass ends (RuntimeError outside one)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _comm_device(group) -> torch.device:
    """Where the collectives run: the current CUDA device for NCCL, the CPU otherwise."""
    if "nccl" in str(torch.distributed.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: Module-path components that wrappers insert (torch.compile, FSDP, activation checkpointing).
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _renamed(layers: List[NormLayer], strip_wrappers: bool, prefix: Optional[str]) -> List[NormLayer]:
    """``layers`` named as in the user's model: wrapper components and a leading ``prefix`` removed."""
    pre = prefix.strip(".").split(".") if prefix else []
    out, seen = [], {}
    for layer in layers:
        parts = layer.name.split(".") if layer.name else []
        if strip_wrappers:
            parts = [p for p in parts if p not in _WRAPPER_PARTS]
        if pre and parts[:len(pre)] == pre:
            parts = parts[len(pre):]
        name = ".".join(parts)
        if name in seen:
            raise ValueError(f"Expected distinct layer names after renaming, but got {name!r} for both "
                             f"{seen[name]!r} and {layer.name!r}; pass strip_wrappers=False or another strip_prefix")
        seen[name] = layer.name
        out.append(layer if name == layer.name else dataclasses.replace(layer, name=name))
    return out


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but got {value!r}")


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def save_snapshot(snapshot: dict, path: Union[str, "os.PathLike[str]"]) -> None:
    """Write a :meth:`Monitor.snapshot` to ``path`` as JSON (atomically; see :mod:`normscope._paths`)."""
    from normscope._paths import write_output

    if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT:
        raise TypeError(f"Expected a Monitor.snapshot() dict, but got {type(snapshot).__name__}")
    write_output(path, json.dumps(snapshot))


def load_snapshot(path: Union[str, "os.PathLike[str]"]) -> dict:
    """Read a snapshot written by :func:`save_snapshot`."""
    with open(path, encoding="utf-8") as f:
        snap = json.load(f)
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"Expected a normscope monitor snapshot ({SNAPSHOT_FORMAT}), but got "
                         f"{snap.get('format') if isinstance(snap, dict) else type(snap).__name__!r} in {path}")
    return snap

