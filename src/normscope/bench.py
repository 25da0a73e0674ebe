"""Benchmark harness: normscope against torch eager, torch.compile, Liger and a copy.

Library code: nothing here prints except to a stream passed in (``progress``); the ``normscope bench``
CLI and the ``benchmarks/`` scripts are thin layers over :func:`run_benchmark`.

What is measured
----------------
For every op (``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``,
``masked_layer_norm``, ``masked_rms_norm``), shape ``MxN`` (normalized over ``N``), dtype and mode,
each provider is timed on the same inputs:

* ``normscope`` -- the public functions (backend chosen by device / ``NORMSCOPE_BACKEND``; the row's
  note names the backend that ran).
* ``torch`` -- eager PyTorch: ``F.layer_norm`` / ``F.rms_norm``; ``h = x + r`` then the norm for the
  add variants; for the masked variants the composite
  :func:`normscope.ops.reference.masked_layer_norm_ref` / ``masked_rms_norm_ref`` (torch has no
  masked norm).
* ``torch_compile`` -- ``torch.compile(mode=None, dynamic=False)`` of the same eager function (one
  compiled graph per op/shape/dtype, forward and backward). Compile time (first forward+backward)
  is measured once, reported separately (``compile_s``) and excluded from the timings.
* ``liger`` -- ``LigerLayerNormFunction`` / ``LigerRMSNormFunction`` (``in_place=False``) and
  ``LigerFusedAddRMSNormFunction`` where present; ``add_layer_norm`` is ``h = x + r`` then Liger's
  LayerNorm (noted as unfused). CUDA only, and only where ``liger_kernel`` imports.
* ``copy`` -- ``buf.copy_(x)`` into a preallocated buffer: the bandwidth reference.

A provider that cannot run a case (not installed, wrong device, an error, out of memory) gets a
row with ``ms=None`` and the reason in ``note``; it is never silently dropped.

Modes: ``forward`` times the forward as in training (inputs require grad, autograd records the
graph), so ``forward + backward ~ full``; ``backward`` runs the forward once outside the timed
region and times ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)``
(``torch_compile`` excepted: its compiled backward donates saved buffers and refuses
``retain_graph``, so each timed backward follows its own untimed forward);
``full`` times forward then ``torch.autograd.grad``. Gradients are taken w.r.t. ``x`` (and
``residual``), ``weight`` and ``bias``.

Inputs (fixed seed, generated on the device): ``x``, ``residual``, ``dy``, ``dh`` ~ N(0, 1) in the
input dtype; ``weight`` ~ 1 + 0.1 N(0, 1) and ``bias`` ~ 0.1 N(0, 1) in the input dtype (fp32 for
fp32 runs), or in ``param_dtype`` when given (mixed precision); the mask is an (M, N) bool tensor,
True with probability 0.8 per element, with every 16th row fully padded (all False).
eps is 1e-5 for LayerNorm and 1e-6 for RMSNorm, for every provider.

Bytes model (GB/s = bytes / median time, 1 GB = 1e9 bytes), the same for every provider of a case;
``e`` is the input's element size, ``p`` the parameters', ``P`` the number of parameter vectors
(2 for LayerNorm, 1 for RMSNorm); mean/rstd statistics (O(M)) are not counted:

* forward reads ``x`` (MNe) [+ residual MNe] [+ mask MN bytes] + params (PNp), writes ``y`` (MNe)
  [+ ``h`` MNe];
* backward reads ``x`` or ``h`` (MNe) and ``dy`` (MNe) [+ mask MN] [+ ``dh`` MNe] + the weight (Np),
  writes ``dx`` (MNe) [+ ``dresidual`` MNe] + the parameter gradients (PNp);
* full = forward + backward; copy = 2 MNe (read ``x``, write the buffer).

Reported per row: ``ms`` (median of ``reps`` timed calls), ``gbps``, ``frac_copy`` (gbps over the copy
provider's gbps for the same case), ``ratio`` = ``provider_ms / normscope_ms`` (> 1: normscope is
faster), ``peak_mb`` and ``peak_ratio`` (over torch eager).

Timing
------
CPU: ``time.perf_counter`` around each call; ``warmup`` untimed calls per provider, then ``reps``
rounds in which every provider runs once, in an order rotated each round, so that background noise
hits all providers alike; the result is held until after the clock stops, so freeing it is not
timed; Python's GC is off while timing. CUDA: providers one after another (only one provider's
tensors and graphs alive at a time); per call a CUDA event pair around the call, preceded by a
short ``torch.cuda._sleep`` so that the CPU enqueues the call before the GPU reaches it (the
events time GPU work, not Python launch overhead); median of ``reps`` after ``warmup`` calls. No
L2 flush between reps by default: the CUDA shapes are 32 MiB or more per tensor and each call
touches several of them, larger than the L2 (50-60 MB); ``flush_l2=True`` zeroes a 256 MiB buffer
before each timed call.

Allocator
---------
CPU, ``allocator="warm"`` (default): glibc ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and
``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` once before measuring, so freed large buffers stay in the
heap and are reused without page faults (otherwise every fresh large buffer is mmapped and
page-faulted, which dominates by 3-10x and penalizes whichever provider allocates more).
``allocator="default"`` leaves glibc's defaults (mallopt is process-wide and cannot be undone, so
``default`` after ``warm`` in one process is reported as such). CUDA: the caching allocator, warmed
by the warm-up calls.

Peak memory
-----------
One extra forward+backward per provider and case, after the timings, with only that provider's
tensors alive. CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus ``memory_allocated()`` just before (the inputs and anything else already live). CPU: the
c10 CPU allocator reports every allocation and free to ``torch.profiler.profile(profile_memory=True)``
as ``[memory]`` events with a signed byte count; their running sum in time order is the allocator's
live bytes relative to the start, and its maximum is the peak above the inputs. This covers every
tensor allocated through torch (eager ops, Inductor's buffers, tensors created by C++ extensions)
but not raw ``malloc`` scratch inside a kernel.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "OPS",
    "MODES",
    "PROVIDERS",
    "DTYPES",
    "DTYPE_ALIASES",
    "OP_FAMILIES",
    "BenchError",
    "BenchConfig",
    "Row",
    "BenchResult",
    "case_bytes",
    "configure_allocator",
    "machine_info",
    "parse_list",
    "parse_shapes",
    "run_benchmark",
]

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "masked_layer_norm", "masked_rms_norm")
MODES = ("forward", "backward", "full")
PROVIDERS = ("normscope", "torch", "torch_compile", "liger", "copy")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
OP_FAMILIES: Dict[str, Tuple[str, ...]] = {
    "layer_norm": ("layer_norm",),
    "rms_norm": ("rms_norm",),
    "add_norm": ("add_layer_norm", "add_rms_norm"),
    "masked_norm": ("masked_layer_norm", "masked_rms_norm"),
}

# Long rows, and short rows (2**23 elements each), where per-row costs dominate.
CPU_SHAPES = ((8192, 1024), (4096, 4096), (1048576, 8), (131072, 64), (32768, 256))
CUDA_SHAPES = ((16384, 1024), (16384, 4096), (16384, 8192), (16384, 16384), (16384, 65536), (4096, 262144))
QUICK_SHAPES = {"cpu": ((1024, 1024),), "cuda": ((4096, 4096),)}
_DEFAULT_REPS = {("cpu", False): 5, ("cpu", True): 3, ("cuda", False): 50, ("cuda", True): 10}
_DEFAULT_WARMUP = {("cpu", False): 2, ("cpu", True): 1, ("cuda", False): 10, ("cuda", True): 3}

EPS_LN = 1e-5
EPS_RMS = 1e-6
_MASK_P = 0.8
_PAD_EVERY = 16  # every 16th row of the mask is fully padded

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class BenchError(ValueError):
    """Bad benchmark arguments (the CLI turns it into a one-line message and exit status 2)."""


# --------------------------------------------------------------------------------------------
# Argument parsing helpers (shared by the CLI and the benchmark scripts)
# --------------------------------------------------------------------------------------------


def parse_list(text: str, choices: Sequence[str], what: str,
               aliases: Optional[Dict[str, str]] = None) -> List[str]:
    """``"a,b"`` or ``"all"`` -> validated list in the given order, duplicates removed."""
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"empty {what} list (choose from {', '.join(choices)} or all)")
    if items == ["all"]:
        return list(choices)
    out: List[str] = []
    for item in items:
        item = (aliases or {}).get(item, item)
        if item not in choices:
            raise BenchError(f"unknown {what} {item!r} (choose from {', '.join(choices)} or all)")
        if item not in out:
            out.append(item)
    return out


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``"8192x1024,4096x4096"`` -> ``[(8192, 1024), (4096, 4096)]``."""
    shapes = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()] or [""]:
        parts = item.lower().split("x")
        try:
            if len(parts) != 2:
                raise ValueError
            m, n = int(parts[0]), int(parts[1])
        except ValueError:
            raise BenchError(f"malformed shape {item!r} (expected MxN, e.g. 8192x1024)") from None
        if m <= 0 or n <= 0:
            raise BenchError(f"malformed shape {item!r} (M and N must be positive)")
        shapes.append((m, n))
    return shapes


def _shape_str(shape: Tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to run. ``None`` fields take device-dependent defaults in :meth:`resolved`."""

    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    ops: Sequence[str] = OPS
    shapes: Optional[Sequence[Tuple[int, int]]] = None
    dtypes: Sequence[str] = ("fp32", "bf16")
    modes: Sequence[str] = ("forward", "full")
    providers: Sequence[str] = PROVIDERS
    reps: Optional[int] = None
    warmup: Optional[int] = None
    param_dtype: str = "same"  # "same": fp32 for fp32 runs, else the input dtype; or a dtype name
    allocator: str = "warm"  # "warm" or "default" (CPU)
    quick: bool = False
    seed: int = 0
    measure_memory: bool = True
    flush_l2: bool = False

    def resolved(self) -> "BenchConfig":
        """A copy with defaults filled in and every field validated (raises :class:`BenchError`)."""
        device = str(self.device).lower()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise BenchError(f"unknown device {self.device!r} (choose from cpu, cuda)")
        if device == "cuda" and not torch.cuda.is_available():
            raise BenchError(
                f"--device cuda requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'})"
            )
        ops = parse_list(",".join(self.ops), OPS, "op")
        modes = parse_list(",".join(self.modes), MODES, "mode")
        dtypes = parse_list(",".join(self.dtypes), tuple(DTYPES), "dtype", DTYPE_ALIASES)
        providers = parse_list(",".join(self.providers), PROVIDERS, "provider")
        pd = str(self.param_dtype).lower()
        pd = DTYPE_ALIASES.get(pd, pd)
        if pd not in ("same", *DTYPES):
            raise BenchError(
                f"unknown param dtype {self.param_dtype!r} (choose from same, {', '.join(DTYPES)})"
            )
        if self.allocator not in ("warm", "default"):
            raise BenchError(f"unknown allocator {self.allocator!r} (choose from warm, default)")
        shapes = self.shapes
        if shapes is None:
            shapes = QUICK_SHAPES[device] if self.quick else (CPU_SHAPES if device == "cpu" else CUDA_SHAPES)
        shapes = [(int(m), int(n)) for m, n in shapes]
        if not shapes or any(m <= 0 or n <= 0 for m, n in shapes):
            raise BenchError(f"shapes must be a non-empty list of positive MxN, got {shapes}")
        reps = _DEFAULT_REPS[(device, bool(self.quick))] if self.reps is None else int(self.reps)
        warmup = _DEFAULT_WARMUP[(device, bool(self.quick))] if self.warmup is None else int(self.warmup)
        if reps < 1:
            raise BenchError(f"reps must be >= 1, got {reps}")
        if warmup < 0:
            raise BenchError(f"warmup must be >= 0, got {warmup}")
        return replace(self, device=device, ops=tuple(ops), shapes=tuple(shapes), dtypes=tuple(dtypes),
                       modes=tuple(modes), providers=tuple(providers), reps=reps, warmup=warmup,
                       param_dtype=pd)


@dataclass
class Row:
    """One (op, mode, shape, dtype, provider) measurement; ``ms is None`` means unavailable."""

    op: str
    mode: str
    shape: str
    dtype: str
    provider: str
    ms: Optional[float] = None
    gbps: Optional[float] = None
    frac_copy: Optional[float] = None
    ratio: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""
    param_dtype: str = ""
    peak_ratio: Optional[float] = None
    compile_s: Optional[float] = None
    bytes: int = 0
    reps: int = 0

    @property
    def available(self) -> bool:
        return self.ms is not None


@dataclass
class BenchResult:
    rows: List[Row]
    machine: Dict[str, str]
    config: BenchConfig
    compile_times: Dict[Tuple[str, str, str], float] = field(default_factory=dict)

    def get(self, op: str, mode: str, shape: str, dtype: str, provider: str) -> Optional[Row]:
        for r in self.rows:
            if (r.op, r.mode, r.shape, r.dtype, r.provider) == (op, mode, shape, dtype, provider):
                return r
        return None

    def machine_line(self) -> str:
        return machine_line(self.machine)

    def to_csv(self, path: str) -> None:
        """Write the rows as CSV to ``path`` (atomically; ``-``, FIFOs and devices directly)."""
        from normscope._paths import open_output

        d = os.path.dirname(os.path.abspath(path))
        if path != "-":
            os.makedirs(d, exist_ok=True)
        names = [f.name for f in fields(Row)]
        with open_output(path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})

    def to_markdown(self) -> str:
        cfg = self.config
        provs = list(cfg.providers)
        out = ["# normscope benchmark", "", self.machine_line(), ""]
        pd = "same dtype as the input" if cfg.param_dtype == "same" else cfg.param_dtype
        out.append(
            f"Settings: device {cfg.device}, median of {cfg.reps} reps after {cfg.warmup} warm-up, "
            f"seed {cfg.seed}, params {pd}. Cells: ms, ×ratio = provider_ms / normscope_ms "
            "(> 1: normscope faster), GB/s by the bytes model of `normscope.bench`, % of the copy "
            "provider's GB/s."
        )
        out.append("")
        for op in cfg.ops:
            for mode in cfg.modes:
                out += self._time_table(op, mode, provs)
            if cfg.measure_memory:
                out += self._memory_table(op, [p for p in provs if p != "copy"])
            ct = [(k, v) for k, v in self.compile_times.items() if k[0] == op]
            if ct:
                out.append(
                    "torch.compile time (first forward+backward, once per shape/dtype, not in the "
                    "timings): " + "; ".join(f"{s} {d} {v:.1f} s" for (_, s, d), v in ct)
                )
                out.append("")
        return "\n".join(out).rstrip() + "\n"

    def _cases(self, op: str) -> List[Tuple[str, str]]:
        seen: List[Tuple[str, str]] = []
        for r in self.rows:
            if r.op == op and (r.shape, r.dtype) not in seen:
                seen.append((r.shape, r.dtype))
        return seen

    def _time_table(self, op: str, mode: str, provs: List[str]) -> List[str]:
        lines = [f"## {op} · {mode}", "", "| shape | dtype | " + " | ".join(provs) + " |",
                 "|:--|:--|" + "--:|" * len(provs)]
        notes: List[str] = []
        for shape, dtype in self._cases(op):
            cells = []
            for p in provs:
                r = self.get(op, mode, shape, dtype, p)
                if r is None:
                    cells.append("")
                elif not r.available:
                    cells.append(f"n/a [{_note_index(notes, f'{p}: {r.note}')}]")
                else:
                    c = f"{r.ms:.3f} ms"
                    if r.ratio is not None and p not in ("normscope", "copy"):
                        c += f" ×{r.ratio:.2f}"
                    if r.gbps is not None:
                        c += f" · {r.gbps:.1f} GB/s"
                    if r.frac_copy is not None and p != "copy":
                        c += f" ({r.frac_copy:.0%})"
                    cells.append(c)
            lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
        if notes:
            lines.append("")
        return lines

    def _memory_table(self, op: str, provs: List[str]) -> List[str]:
        lines = [f"### {op} · peak memory of forward+backward (MB above live inputs; ×torch eager)", "",
                 "| shape | dtype | " + " | ".join(provs) + " |", "|:--|:--|" + "--:|" * len(provs)]
        for shape, dtype in self._cases(op):
            cells = []
            for p in provs:
                r = next((r for r in self.rows
                          if (r.op, r.shape, r.dtype, r.provider) == (op, shape, dtype, p)
                          and r.peak_mb is not None), None)
                if r is None:
                    cells.append("n/a")
                else:
                    c = f"{r.peak_mb:.1f}"
                    if r.peak_ratio is not None and p != "torch":
                        c += f" ×{r.peak_ratio:.2f}"
                    cells.append(c)
            lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + " |")
        lines.append("")
        return lines


def _note_index(notes: List[str], note: str) -> int:
    if note not in notes:
        notes.append(note)
    return notes.index(note) + 1


# --------------------------------------------------------------------------------------------
# Machine description and allocator
# --------------------------------------------------------------------------------------------

_allocator_state = {"applied": False}


def configure_allocator(mode: str, device: str = "cpu") -> str:
    """Apply the allocator conditions (once per process) and describe them."""
    if device == "cuda":
        return "CUDA caching allocator, warmed by the warm-up calls"
    if mode == "default":
        if _allocator_state["applied"]:
            return "default requested, but warm mallopt settings were already applied in this process"
        return "default (glibc defaults: large buffers are mmapped and page-faulted on every allocation)"
    if mode != "warm":
        raise BenchError(f"unknown allocator {mode!r} (choose from warm, default)")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        ok1 = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        ok2 = libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError) as e:
        return f"default (warm requested but glibc mallopt is unavailable: {e})"
    _allocator_state["applied"] = True
    desc = "warm (glibc mallopt M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB)"
    if not (ok1 and ok2):
        desc += f" [mallopt returned {ok1}, {ok2}: not all settings applied]"
    return desc


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _dist_version(*names: str) -> str:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - a broken install must not break a description
            continue
    return "not installed"


def machine_info(device: str, allocator: str) -> Dict[str, str]:
    """A description of the machine and software, for the top of every report."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 0
    info = {
        "cpu": _cpu_model(),
        "cores": f"{ncpu} usable of {os.cpu_count()}",
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton"),
        "liger_kernel": _dist_version("liger-kernel", "liger_kernel", "liger-kernel-nightly"),
        "normscope": _dist_version("normscope"),
        "device": device,
        "cuda_device": "none",
        "allocator": allocator,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import normscope

        info["normscope"] = normscope.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        info["cuda_device"] = (f"{torch.cuda.get_device_name(idx)} (sm_{cap[0]}{cap[1]}, "
                               f"CUDA {torch.version.cuda})")
    return info


def machine_line(m: Dict[str, str]) -> str:
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} · "
        f"GPU: {m['cuda_device']} · Python {m['python']} · torch {m['torch']} · triton {m['triton']} · "
        f"liger_kernel {m['liger_kernel']} · normscope {m['normscope']} · device {m['device']} · "
        f"allocator: {m['allocator']} · {m['date']}"
    )


# --------------------------------------------------------------------------------------------
# Ops, inputs and the bytes model
# --------------------------------------------------------------------------------------------


def _kind(op: str) -> str:
    return "add" if op.startswith("add_") else "masked" if op.startswith("masked_") else "plain"


def _is_rms(op: str) -> bool:
    return op.endswith("rms_norm")


def _param_torch_dtype(dtype: str, param_dtype: str) -> torch.dtype:
    return DTYPES[dtype] if param_dtype == "same" else DTYPES[param_dtype]


def case_bytes(op: str, mode: str, m: int, n: int, dtype: str, param_dtype: str = "same",
               provider: str = "") -> int:
    """Bytes moved by one call under the model in the module docstring."""
    e = DTYPES[dtype].itemsize
    p = _param_torch_dtype(dtype, param_dtype).itemsize
    mn = m * n
    if provider == "copy":
        return 2 * mn * e
    kind = _kind(op)
    nparams = 1 if _is_rms(op) else 2
    fwd = mn * e + nparams * n * p + mn * e  # x, params, y
    bwd = 2 * mn * e + n * p + mn * e + nparams * n * p  # x|h, dy, weight, dx, param grads
    if kind == "add":
        fwd += 2 * mn * e  # residual, h
        bwd += 2 * mn * e  # dh, dresidual
    elif kind == "masked":
        fwd += mn
        bwd += mn
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    if mode == "full":
        return fwd + bwd
    raise BenchError(f"unknown mode {mode!r}")


@dataclass
class _Inputs:
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    dy: torch.Tensor
    dh: Optional[torch.Tensor]

    @property
    def grad_inputs(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.x, self.residual, self.weight, self.bias) if t is not None)

    @property
    def grad_outputs(self) -> Tuple[torch.Tensor, ...]:
        return (self.dy,) if self.dh is None else (self.dy, self.dh)


def _make_inputs(op: str, m: int, n: int, dtype: torch.dtype, pdtype: torch.dtype,
                 device: torch.device, seed: int) -> _Inputs:
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    kind = _kind(op)
    x = randn(m, n).requires_grad_()
    residual = randn(m, n).requires_grad_() if kind == "add" else None
    mask = None
    if kind == "masked":
        mask = torch.rand(m, n, generator=g, device=device) < _MASK_P
        mask[_PAD_EVERY - 1::_PAD_EVERY] = False
    weight = (1.0 + 0.1 * randn(n, dt=torch.float32)).to(pdtype).requires_grad_()
    bias = None if _is_rms(op) else (0.1 * randn(n, dt=torch.float32)).to(pdtype).requires_grad_()
    dy = randn(m, n)
    dh = randn(m, n) if kind == "add" else None
    return _Inputs(x, residual, mask, weight, bias, dy, dh)


# Eager torch functions (module level: torch.compile caches on their code objects).


def _eager_layer_norm(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _eager_rms_norm(x, weight, eps: float):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _eager_add_layer_norm(x, residual, weight, bias, eps: float):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def _eager_add_rms_norm(x, residual, weight, eps: float):
    h = x + residual
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


def _eager_masked_layer_norm(x, mask, weight, bias, eps: float):
    from normscope.ops.reference import masked_layer_norm_ref

    return masked_layer_norm_ref(x, mask, (x.shape[-1],), weight, bias, eps)


def _eager_masked_rms_norm(x, mask, weight, eps: float):
    from normscope.ops.reference import masked_rms_norm_ref

    return masked_rms_norm_ref(x, mask, (x.shape[-1],), weight, eps)


_EAGER = {
    "layer_norm": _eager_layer_norm,
    "rms_norm": _eager_rms_norm,
    "add_layer_norm": _eager_add_layer_norm,
    "add_rms_norm": _eager_add_rms_norm,
    "masked_layer_norm": _eager_masked_layer_norm,
    "masked_rms_norm": _eager_masked_rms_norm,
}


def _eager_args(op: str, inp: _Inputs) -> tuple:
    kind = _kind(op)
    eps = EPS_RMS if _is_rms(op) else EPS_LN
    first = (inp.x,) if kind == "plain" else (inp.x, inp.residual) if kind == "add" else (inp.x, inp.mask)
    params = (inp.weight,) if _is_rms(op) else (inp.weight, inp.bias)
    return first + params + (eps,)


def _normscope_fn(op: str, inp: _Inputs) -> Callable:
    import normscope.functional as nf

    x, r, mask, w, b = inp.x, inp.residual, inp.mask, inp.weight, inp.bias
    n = x.shape[-1]
    return {
        "layer_norm": lambda: nf.layer_norm(x, n, w, b, EPS_LN),
        "rms_norm": lambda: nf.rms_norm(x, n, w, EPS_RMS),
        "add_layer_norm": lambda: nf.add_layer_norm(x, r, n, w, b, EPS_LN),
        "add_rms_norm": lambda: nf.add_rms_norm(x, r, n, w, EPS_RMS),
        "masked_layer_norm": lambda: nf.masked_layer_norm(x, mask, n, w, b, EPS_LN),
        "masked_rms_norm": lambda: nf.masked_rms_norm(x, mask, n, w, EPS_RMS),
    }[op]


def _liger_fn(op: str, inp: _Inputs, device: torch.device) -> Tuple[Callable, str]:
    if device.type != "cuda":
        raise _Unavailable("liger_kernel runs on CUDA only")
    if _kind(op) == "masked":
        raise _Unavailable("liger_kernel has no masked norm")
    try:
        if _is_rms(op):
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        else:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        raise _Unavailable(f"liger_kernel not importable ({_reason(e)})") from None
    x, r, w, b = inp.x, inp.residual, inp.weight, inp.bias
    if op == "layer_norm":
        return (lambda: LigerLayerNormFunction.apply(x, w, b, EPS_LN)), ""
    if op == "rms_norm":
        return (lambda: LigerRMSNormFunction.apply(x, w, EPS_RMS, 0.0, "llama", False)), ""
    if op == "add_layer_norm":
        def f():
            h = x + r
            return LigerLayerNormFunction.apply(h, w, b, EPS_LN), h
        return f, "unfused: h = x + r, then LigerLayerNormFunction"
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except Exception:  # noqa: BLE001 - older liger_kernel without the fused add
        def f():
            h = x + r
            return LigerRMSNormFunction.apply(h, w, EPS_RMS, 0.0, "llama", False), h
        return f, "unfused: h = x + r, then LigerRMSNormFunction"
    return (lambda: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS_RMS, 0.0, "llama", False)), ""


_FRESH_NOTE = ("backward timed after an untimed fresh forward per rep (compiled backward donates "
               "buffers, so retain_graph=True is refused)")


class _Unavailable(Exception):
    pass


def _reason(e: BaseException) -> str:
    if isinstance(e, _Unavailable):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    msg = (str(e).strip().splitlines() or [""])[0]
    msg = re.sub(r" \(with implementation in <module [^>]*>\)", "", msg)
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FreshBackward:
    """Backward timed alone without ``retain_graph``: ``prepare`` (untimed) runs a new forward.

    Used for ``torch_compile``, whose compiled backward donates saved buffers and therefore refuses
    ``retain_graph=True``.
    """

    def __init__(self, fn: Callable, gi, go):
        self.fn, self.gi, self.go, self.outs = fn, gi, go, None

    def prepare(self) -> None:
        self.outs = None
        self.outs = self.fn()

    def __call__(self):
        outs, self.outs = self.outs, None
        return torch.autograd.grad(outs, self.gi, self.go)


def _make_step(fn: Callable, mode: str, inp: _Inputs, fresh_backward: bool = False) -> Callable:
    gi, go = inp.grad_inputs, inp.grad_outputs
    if mode == "forward":
        return fn
    if mode == "full":
        def full():
            return torch.autograd.grad(fn(), gi, go)
        return full
    if fresh_backward:
        return _FreshBackward(fn, gi, go)
    outs = fn()  # forward once, outside the timed region

    def backward():
        return torch.autograd.grad(outs, gi, go, retain_graph=True)
    return backward


def _prepare(step: Callable) -> None:
    prep = getattr(step, "prepare", None)
    if prep is not None:
        prep()


@contextlib.contextmanager
def _gc_off():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _time_cpu_interleaved(steps: Dict[str, Callable], reps: int, warmup: int,
                          announce: Callable[[str], None]) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds per call for each provider; providers that raise are returned in the second dict."""
    failed: Dict[str, str] = {}
    live = dict(steps)
    for name in list(live):
        announce(name)
        try:
            for _ in range(warmup):
                _prepare(live[name])
                r = live[name]()
                del r
        except Exception as e:  # noqa: BLE001
            failed[name] = _reason(e)
            del live[name]
    times: Dict[str, List[float]] = {name: [] for name in live}
    names = list(live)
    with _gc_off():
        for i in range(reps):
            k = i % len(names) if names else 0
            for name in names[k:] + names[:k]:
                if name in failed:
                    continue
                try:
                    _prepare(live[name])
                    t0 = time.perf_counter()
                    r = live[name]()
                    t1 = time.perf_counter()
                    del r
                except Exception as e:  # noqa: BLE001
                    failed[name] = _reason(e)
                    continue
                times[name].append(t1 - t0)
    return {k: v for k, v in times.items() if k not in failed}, failed


def _time_cuda(step: Callable, reps: int, warmup: int, device: torch.device,
               flush: Optional[torch.Tensor]) -> List[float]:
    """Seconds per call from CUDA events, each call queued behind a GPU sleep."""
    t_cpu = 0.0
    for _ in range(max(warmup, 1)):
        _prepare(step)
        t0 = time.perf_counter()
        r = step()
        t_cpu = time.perf_counter() - t0
        del r
    torch.cuda.synchronize(device)
    # Sleep long enough (at <= 2 GHz) for the CPU to enqueue the call behind it.
    cycles = int(min(max(3.0 * t_cpu, 50e-6), 0.05) * 2e9)
    sleep = getattr(torch.cuda, "_sleep", None)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    with _gc_off():
        for i in range(reps):
            _prepare(step)
            if flush is not None:
                flush.zero_()
            if sleep is not None:
                sleep(cycles)
            starts[i].record()
            r = step()
            ends[i].record()
            del r
        torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C++ logging on fd 2 (Kineto prints profiler start/stop lines there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_bytes(full_step: Callable, device: torch.device) -> int:
    """Peak bytes allocated above what was live before one forward+backward (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        r = full_step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del r
        return max(int(peak), 0)
    from torch.profiler import ProfilerActivity, profile

    with _gc_off(), _quiet_fd2():  # no collection of unrelated garbage inside the window
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = full_step()
            del r
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _dynamo_limits(needed: bool = True):
    """Room for one graph per shape/dtype per op (dynamic=False recompiles on each)."""
    if not needed:
        yield
        return
    try:
        import torch._dynamo.config as dc
    except Exception:  # noqa: BLE001
        yield
        return
    patch = {}
    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(dc, name) and getattr(dc, name) < value:
            patch[name] = value
    with dc.patch(patch) if patch else contextlib.nullcontext():
        yield


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Runner:
    def __init__(self, cfg: BenchConfig, progress: Optional[TextIO]):
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(cfg.device)
        self.total = (len(cfg.ops) * len(cfg.shapes) * len(cfg.dtypes) * len(cfg.modes)
                      * len(cfg.providers))
        self.count = 0
        self.compiled: Dict[str, Callable] = {}
        self.compile_times: Dict[Tuple[str, str, str], float] = {}
        self.flush = None
        if self.device.type == "cuda" and cfg.flush_l2:
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)

    def say(self, text: str) -> None:
        if self.progress is not None:
            print(text, file=self.progress, flush=True)

    def _announce(self, op, mode, shape, dtype):
        done = set()

        def announce(provider: str) -> None:
            if provider in done:
                return
            done.add(provider)
            self.count += 1
            self.say(f"[{self.count}/{self.total}] {op} {mode} {_shape_str(shape)} {dtype} {provider}")
        return announce

    def _provider_fn(self, p: str, op: str, inp: _Inputs) -> Tuple[Callable, str]:
        if p == "normscope":
            return _normscope_fn(op, inp), ""
        if p == "torch":
            f, args = _EAGER[op], _eager_args(op, inp)
            return (lambda: f(*args)), ("masked_*_ref composite (torch has no masked norm)"
                                        if _kind(op) == "masked" else "")
        if p == "torch_compile":
            cf = self.compiled.get(op)
            if cf is None:
                cf = self.compiled[op] = torch.compile(_EAGER[op], mode=None, dynamic=False)
            args = _eager_args(op, inp)
            return (lambda: cf(*args)), ""
        if p == "liger":
            return _liger_fn(op, inp, self.device)
        raise AssertionError(p)

    def run_case(self, op: str, shape: Tuple[int, int], dtype: str) -> List[Row]:
        cfg, dev = self.cfg, self.device
        m, n = shape
        pdt = _param_torch_dtype(dtype, cfg.param_dtype)
        inp = _make_inputs(op, m, n, DTYPES[dtype], pdt, dev, cfg.seed)
        sshape = _shape_str(shape)
        pname = "same" if cfg.param_dtype == "same" else cfg.param_dtype
        fns: Dict[str, Callable] = {}
        notes: Dict[str, str] = {p: "" for p in cfg.providers}
        unavailable: Dict[str, str] = {}
        compile_s: Optional[float] = None
        # Prepare: build each provider and run one forward+backward (compiles torch_compile, and
        # turns an unsupported case into an 'unavailable' row rather than a failure mid-timing).
        bwd_failed: Dict[str, str] = {}  # providers whose forward runs but backward does not
        for p in cfg.providers:
            if p == "copy":
                continue
            try:
                fn, note = self._provider_fn(p, op, inp)
                notes[p] = note
                if p == "torch_compile":
                    self.say(f"      compiling {op} {sshape} {dtype} (torch.compile, forward+backward)")
                try:
                    dt, caught = self._first_call(_make_step(fn, "full", inp))
                except Exception as e:  # noqa: BLE001 - keep the forward if only the backward fails
                    bwd_failed[p] = f"backward: {_reason(e)}"
                    self._cleanup(collect=True)
                    dt, caught = self._first_call(fn)
                if p == "torch_compile":
                    compile_s = dt
                    self.compile_times[(op, sshape, dtype)] = dt
                if p == "normscope":
                    from normscope.ops.dispatch import backend_name

                    extra = [f"backend {backend_name(inp.x)}"]
                    extra += [str(w.message).splitlines()[0] for w in caught
                              if issubclass(w.category, RuntimeWarning)
                              and "normscope" in str(w.message)][:1]
                    notes[p] = "; ".join(x for x in [notes[p], *extra] if x)
                fns[p] = fn
            except Exception as e:  # noqa: BLE001
                unavailable[p] = _reason(e)
                self._cleanup(collect=True)
        if "copy" in cfg.providers:
            xd = inp.x.detach()
            buf = torch.empty_like(xd)
            fns["copy"] = lambda: buf.copy_(xd)

        fresh = {p: p == "torch_compile" for p in cfg.providers}
        rows: List[Row] = []
        for mode in cfg.modes:
            announce = self._announce(op, mode, shape, dtype)
            secs: Dict[str, List[float]] = {}
            failed: Dict[str, str] = {}
            for p in bwd_failed:
                if mode != "forward":
                    failed[p] = bwd_failed[p]
            if dev.type == "cpu":
                steps = {}
                for p in cfg.providers:
                    if p not in fns or p in failed:
                        continue
                    try:
                        steps[p] = fns[p] if p == "copy" else _make_step(fns[p], mode, inp, fresh[p])
                    except Exception as e:  # noqa: BLE001
                        failed[p] = _reason(e)
                secs, f2 = _time_cpu_interleaved(steps, cfg.reps, cfg.warmup, announce)
                failed.update(f2)
                del steps
            else:
                for p in cfg.providers:
                    if p not in fns or p in failed:
                        continue
                    announce(p)
                    try:
                        step = fns[p] if p == "copy" else _make_step(fns[p], mode, inp, fresh[p])
                        secs[p] = _time_cuda(step, cfg.reps, cfg.warmup, dev, self.flush)
                    except Exception as e:  # noqa: BLE001
                        failed[p] = _reason(e)
                    step = None
                    self._cleanup(collect=p in failed)
            for p in cfg.providers:
                announce(p)  # no-op for those already announced
                nbytes = case_bytes(op, mode, m, n, dtype, cfg.param_dtype, provider=p)
                row = Row(op=op, mode=mode, shape=sshape, dtype=dtype, provider=p, param_dtype=pname,
                          bytes=nbytes, reps=cfg.reps, note=notes.get(p, ""))
                if p in secs and secs[p]:
                    row.ms = statistics.median(secs[p]) * 1e3
                    row.gbps = nbytes / (row.ms * 1e-3) / 1e9
                    if p == "torch_compile":
                        row.compile_s = compile_s
                        if mode == "backward":
                            row.note = "; ".join(x for x in [row.note, _FRESH_NOTE] if x)
                else:
                    row.note = unavailable.get(p) or failed.get(p) or "not run"
                rows.append(row)
            self._cleanup()

        if cfg.measure_memory:
            for p in cfg.providers:
                if p == "copy" or p not in fns or all(not r.available for r in rows if r.provider == p):
                    continue
                if p in bwd_failed:
                    for r in rows:
                        if r.provider == p and r.available:
                            r.note = "; ".join(x for x in [r.note, f"no peak memory ({bwd_failed[p]})"] if x)
                    continue
                try:
                    peak = _peak_bytes(_make_step(fns[p], "full", inp), dev)
                except Exception as e:  # noqa: BLE001
                    for r in rows:
                        if r.provider == p:
                            r.note = "; ".join(x for x in [r.note, f"peak memory: {_reason(e)}"] if x)
                    self._cleanup(collect=True)
                    continue
                for r in rows:
                    if r.provider == p:
                        r.peak_mb = peak / 2**20
        fns.clear()
        del inp
        self._cleanup(collect=True)
        return rows

    def _first_call(self, step: Callable):
        """Run ``step`` once (compiling, if it compiles): seconds taken and warnings raised."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            r = step()
            _sync(self.device)
            dt = time.perf_counter() - t0
            del r
        return dt, list(caught)

    def _cleanup(self, collect: bool = False) -> None:
        """Release memory; refcounting frees graphs and tensors, a full GC (slow) only if asked."""
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fill_derived(rows: List[Row]) -> None:
    """ratio (vs normscope), frac_copy (vs copy) and peak_ratio (vs torch) from rows of one case."""
    index = {(r.op, r.mode, r.shape, r.dtype, r.provider): r for r in rows}
    for r in rows:
        key = (r.op, r.mode, r.shape, r.dtype)
        ns, cp, te = index.get(key + ("normscope",)), index.get(key + ("copy",)), index.get(key + ("torch",))
        if r.available and ns is not None and ns.available and ns.ms > 0:
            r.ratio = r.ms / ns.ms
        if r.gbps is not None and cp is not None and cp.gbps:
            r.frac_copy = r.gbps / cp.gbps
        if r.peak_mb is not None and te is not None and te.peak_mb:
            r.peak_ratio = r.peak_mb / te.peak_mb


def run_benchmark(config: Optional[BenchConfig] = None, progress: Optional[TextIO] = None) -> BenchResult:
    """Run every (op, shape, dtype, mode, provider) of ``config``; progress lines go to ``progress``."""
    cfg = (config or BenchConfig()).resolved()
    allocator = configure_allocator(cfg.allocator, cfg.device)
    machine = machine_info(cfg.device, allocator)
    runner = _Runner(cfg, progress)
    runner.say(machine_line(machine))
    rows: List[Row] = []
    with _dynamo_limits("torch_compile" in cfg.providers):
        for op in cfg.ops:
            for shape in cfg.shapes:
                for dtype in cfg.dtypes:
                    rows += runner.run_case(op, shape, dtype)
    _fill_derived(rows)
    return BenchResult(rows=rows, machine=machine, config=cfg, compile_times=dict(runner.compile_times))

