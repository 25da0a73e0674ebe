"""Step-time overhead of normscope.Monitor on a small transformer training loop, against two peer monitors.

Usage:
    python benchmarks/monitor_overhead.py                          # defaults below, prints a markdown table
    python benchmarks/monitor_overhead.py --steps 20 --rounds 10 --json out.json --markdown out.md
    python benchmarks/monitor_overhead.py --shared-model --compile                 # torch.compile(fullgraph=True)

The workload: an embedding, ``torch.nn.TransformerEncoder`` (pre-LN blocks, ``nhead=4``, feed-forward
``4 * d_model``, no dropout, a final LayerNorm), a linear head and cross-entropy, trained with AdamW on
a few fixed random token batches. With the defaults (d_model 128, 4 layers, batch 8, seq 64, vocabulary 256) the model
has ``2 * layers + 1 = 9`` LayerNorms and one step takes about 80 ms on one thread of a 2-core VM.

Variants, each on its own copy of the same model (same seed, same batches):

* ``none`` -- no monitor: the baseline.
* ``normscope`` -- ``normscope.Monitor(model)`` at its defaults (``every=10``: one step in ten
  sampled, ``row_fraction=1.0``, ``flush_every=100``, ``grads=True``, ``cpu_kernel=True``, no sinks),
  ``step()`` after each optimizer step.
* ``normscope_every1`` -- the same with ``every=1``: every step measured (the cost of one sampled step).
* ``normscope_every1_torch`` -- ``every=1, cpu_kernel=False``: the pure-torch statistics path (the
  one CUDA tensors take) on every step, for comparison with the fused CPU kernel.
* ``naive`` -- the obvious hand-written hook monitor: on every step and every norm layer, a forward
  hook computes mean, variance, min, max, NaN and Inf counts of the input and the output, and the
  mean / min / max of the per-row variance, each with its own ``.item()``; a full backward hook reads
  the input- and output-gradient norms with ``.item()``; a post-accumulate hook per norm parameter
  reads its gradient norm, and the step reads gamma / beta mean and std, each with ``.item()``.
  Roughly the statistics normscope keeps, but one host read per statistic.
* ``wandb_like`` -- what ``wandb.watch(model, log="all", log_freq=1)`` does, without wandb: a forward
  hook on the model that, for every parameter, takes ``min().item()``, ``max().item()``, a 64-bin
  ``torch.histc`` and a ``.cpu()`` copy of the histogram, and a gradient hook on every parameter
  that does the same to its gradient. Unlike the others it covers all parameters, not only norms.

Timing: after ``--warmup`` untimed steps per variant, ``--rounds`` rounds; in each round every variant
runs ``--steps`` consecutive steps, in an order rotated each round, so that background load hits all
variants alike. Each step (forward, backward, ``opt.step()``, ``zero_grad``, the monitor's ``step()``)
is timed with ``time.perf_counter``; Python's GC is off while timing. ``ms/step`` is the median over
rounds of the round's mean step time: ``--steps`` and ``--warmup`` are multiples of 10, so every round
of ``normscope`` (``every=10``) holds the same number of sampled steps. normscope's flush (every 100 steps)
falls in some rounds only and is therefore left out of the median; the ``mean`` column (all timed steps)
includes it. ``spread`` is half the inter-quartile range of the round means, in % of the median: the
noise level of the run. The same figures are also taken in thread CPU time (``time.thread_time``,
``CPU ms/step``): with one torch thread all the step's work runs on the timing thread, and CPU time
does not count the time other processes hold the core, so on a shared machine it is the steadier
measure (it still sees their effect on caches). Overhead = ``ms/step / none's ms/step - 1``. The ratio
of overheads is the naive monitor's overhead over normscope's (default settings).

``--shared-model``: all variants train one model (and optimizer); in each round a variant attaches a
fresh monitor, runs its steps (the monitor's steps 0 .. steps-1) and closes it untimed. Separate model
copies differ by a few % in step time on a shared VM (memory placement; an A/B of two unmonitored
copies shows it), which hides overheads of 1-3%; one shared model does not, at the price of leaving
out normscope's periodic flush (it happens in ``close()``, untimed).

Threads: ``--threads 1`` by default. With torch's default (one thread per core) on a shared small VM, any
other process on a core stalls the OpenMP barriers of every op and step times jump 5-20x at random;
one thread makes the comparison stable. ``--threads 0`` keeps torch's default.

Allocator: glibc ``mallopt`` warm settings, as in ``normscope.bench`` (``--allocator default`` to skip).

``--compile``: the model runs as ``torch.compile(model, fullgraph=True)`` (inductor) in every variant;
the monitors' hooks are traced into the compiled graph (normscope's monitor custom ops). Only
``none`` and the ``normscope*`` variants (the peers' ``.item()`` calls cannot be traced without a
graph break). The warm-up steps compile every graph (a sampled and an unsampled one per monitor).
With ``--shared-model`` each monitor is attached once, before the first compiled call, and paused
(``Monitor.paused``) outside its variant's steps, so that the compiled graphs are made once: its
steps are numbered on across rounds (2 of every 20 sampled at ``every=10``), and its periodic flush
falls in the timed steps of some rounds, as without ``--shared-model``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

try:
    import normscope
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import normscope

from normscope.bench import configure_allocator, machine_info

VARIANTS = ("none", "normscope", "normscope_every1", "normscope_every1_torch", "naive", "wandb_like")
COMPILE_VARIANTS = ("none", "normscope", "normscope_every1", "normscope_every1_torch")
VOCAB = 256


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self, d_model: int, layers: int, vocab: int = VOCAB):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        block = torch.nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, layers, norm=torch.nn.LayerNorm(d_model),
                                                   enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def norm_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]


# --------------------------------------------------------------------------------------------
# Peer monitors
# --------------------------------------------------------------------------------------------


class NaiveMonitor:
    """One ``.item()`` per statistic, per norm layer, per step."""

    def __init__(self, model: torch.nn.Module):
        self.log: List[dict] = []
        self.handles = []
        self.norms = norm_modules(model)
        for i, m in enumerate(self.norms):
            self.handles.append(m.register_forward_hook(self._fwd(i)))
            self.handles.append(m.register_full_backward_hook(self._bwd(i)))
            for name, p in m.named_parameters(recurse=False):
                self.handles.append(p.register_post_accumulate_grad_hook(self._pgrad(i, name)))

    @staticmethod
    def _stats(prefix: str, t: torch.Tensor, out: dict) -> None:
        t = t.detach().float()
        out[prefix + "mean"] = t.mean().item()
        out[prefix + "var"] = t.var().item()
        out[prefix + "min"] = t.min().item()
        out[prefix + "max"] = t.max().item()
        out[prefix + "nan"] = torch.isnan(t).sum().item()
        out[prefix + "inf"] = torch.isinf(t).sum().item()

    def _fwd(self, i: int):
        def hook(module, args, output):
            with torch.no_grad():
                rec = {"layer": i}
                x = args[0]
                self._stats("in_", x, rec)
                self._stats("out_", output, rec)
                rv = x.detach().float().reshape(-1, x.shape[-1]).var(dim=-1, unbiased=False)
                rec["row_var_mean"] = rv.mean().item()
                rec["row_var_min"] = rv.min().item()
                rec["row_var_max"] = rv.max().item()
                self.log.append(rec)
        return hook

    def _bwd(self, i: int):
        def hook(module, grad_input, grad_output):
            with torch.no_grad():
                rec = {"layer": i}
                if grad_input[0] is not None:
                    rec["grad_in_norm"] = grad_input[0].norm().item()
                rec["grad_out_norm"] = grad_output[0].norm().item()
                self.log.append(rec)
        return hook

    def _pgrad(self, i: int, name: str):
        def hook(p):
            self.log.append({"layer": i, f"grad_{name}_norm": p.grad.norm().item()})
        return hook

    def step(self) -> None:
        with torch.no_grad():
            for i, m in enumerate(self.norms):
                rec = {"layer": i}
                for name, p in m.named_parameters(recurse=False):
                    rec[name + "_mean"] = p.mean().item()
                    rec[name + "_std"] = p.std().item()
                self.log.append(rec)
        if len(self.log) > 100_000:
            del self.log[:50_000]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class WandbLikeWatch:
    """What ``wandb.watch(model, log="all", log_freq=1)`` does per step: histograms copied to the host."""

    bins = 64

    def __init__(self, model: torch.nn.Module):
        self.log: Dict[str, torch.Tensor] = {}
        self.params = list(model.named_parameters())
        self.handles = [model.register_forward_hook(self._fwd)]
        for name, p in self.params:
            if p.requires_grad:
                self.handles.append(p.register_hook(self._grad(name)))

    def _histogram(self, key: str, t: torch.Tensor) -> None:
        flat = t.detach().reshape(-1).float()
        tmin, tmax = flat.min().item(), flat.max().item()
        if tmin == tmax:
            tmax = tmin + 1.0
        hist = torch.histc(flat, bins=self.bins, min=tmin, max=tmax)
        self.log[key] = (tmin, tmax, hist.cpu().clone())

    def _fwd(self, module, args, output):
        with torch.no_grad():
            for name, p in self.params:
                self._histogram("parameters/" + name, p)

    def _grad(self, name: str):
        def hook(grad):
            self._histogram("gradients/" + name, grad)
        return hook

    def step(self) -> None:
        pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, variant: str, args, batches, shared: Optional["Runner"] = None):
        if shared is None:
            torch.manual_seed(args.seed)
            self.model = TinyLM(args.d_model, args.layers)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            self.fn = torch.compile(self.model, fullgraph=True) if args.compile else self.model
        else:  # --shared-model: one model and optimizer for all variants, monitors attached per round
            self.model, self.opt, self.fn = shared.model, shared.opt, shared.fn
        self.variant = variant
        # Compiled and shared: monitors stay attached (paused outside their steps), see the docstring.
        self.pause_between = args.compile and (shared is not None or args.shared_model)
        self.per_round = (shared is not None or args.shared_model) and not args.compile
        self.batches = batches
        self.i = 0
        self.times: List[float] = []
        self.round_means: List[float] = []
        self.cpu_round_means: List[float] = []
        self.monitor = None
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}")
        if not self.per_round:
            self.attach()
            if self.pause_between and isinstance(self.monitor, normscope.Monitor):
                self.monitor.pause()

    def attach(self) -> None:
        v = self.variant
        if v == "normscope":
            self.monitor = normscope.Monitor(self.model)
        elif v == "normscope_every1":
            self.monitor = normscope.Monitor(self.model, every=1)
        elif v == "normscope_every1_torch":
            self.monitor = normscope.Monitor(self.model, every=1, cpu_kernel=False)
        elif v == "naive":
            self.monitor = NaiveMonitor(self.model)
        elif v == "wandb_like":
            self.monitor = WandbLikeWatch(self.model)

    def one_step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        logits = self.fn(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.monitor is not None:
            self.monitor.step()

    def run(self, steps: int, timed: bool) -> None:
        if self.per_round:  # a fresh monitor on the shared model for these steps (its steps 0..steps-1)
            self.attach()
        paused = self.pause_between and isinstance(self.monitor, normscope.Monitor)
        if paused:
            self.monitor.resume()
        ts = []
        c0 = time.thread_time()
        for _ in range(steps):
            t0 = time.perf_counter()
            self.one_step()
            ts.append(time.perf_counter() - t0)
        cpu = time.thread_time() - c0
        if paused:
            self.monitor.pause()
        if timed:
            self.times.extend(ts)
            self.round_means.append(sum(ts) / len(ts))
            self.cpu_round_means.append(cpu / len(ts))
        if self.per_round:  # closing (its flush included) is not timed
            self.close()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _quartiles(xs: List[float]):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 when it was never used)."""
    dynamo = sys.modules.get("torch._dynamo")
    return int(dynamo.utils.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def measure(args, progress: Callable[[str], None] = lambda s: None) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randint(0, VOCAB, (args.batch, args.seq), generator=g),
                torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)) for _ in range(4)]
    runners: Dict[str, Runner] = {}
    for v in args.variants:
        runners[v] = Runner(v, args, batches, next(iter(runners.values())) if args.shared_model and runners else None)
    n_norms = len(norm_modules(runners[args.variants[0]].model))
    n_params = sum(p.numel() for p in runners[args.variants[0]].model.parameters())
    for v, r in runners.items():
        progress(f"warm-up {v}")
        r.run(args.warmup, timed=False)
    gc.collect()
    graphs0 = _compiled_graphs()
    gc.disable()
    try:
        for k in range(args.rounds):
            order = list(args.variants)
            order = order[k % len(order):] + order[:k % len(order)]
            for v in order:
                runners[v].run(args.steps, timed=True)
            progress(f"round {k + 1}/{args.rounds}: "
                     + ", ".join(f"{v} {1e3 * runners[v].round_means[-1]:.1f}" for v in args.variants) + " ms")
    finally:
        gc.enable()
    new_graphs = _compiled_graphs() - graphs0  # graphs compiled during the timed rounds (recompilations)
    rows = {}
    for v, r in runners.items():
        med = statistics.median(r.round_means)
        q1, q3 = _quartiles(r.round_means)
        cmed = statistics.median(r.cpu_round_means)
        c1, c3 = _quartiles(r.cpu_round_means)
        rows[v] = {"variant": v, "ms": 1e3 * med, "mean_ms": 1e3 * sum(r.times) / len(r.times),
                   "step_median_ms": 1e3 * statistics.median(r.times),
                   "spread_pct": 100.0 * (q3 - q1) / 2 / med, "round_ms": [1e3 * t for t in r.round_means],
                   "cpu_ms": 1e3 * cmed, "cpu_spread_pct": 100.0 * (c3 - c1) / 2 / cmed,
                   "cpu_round_ms": [1e3 * t for t in r.cpu_round_means]}
        r.close()
    base = rows.get("none")
    for row in rows.values():
        row["overhead_pct"] = 100.0 * (row["ms"] / base["ms"] - 1) if base else None
        row["overhead_mean_pct"] = 100.0 * (row["mean_ms"] / base["mean_ms"] - 1) if base else None
        row["cpu_overhead_pct"] = 100.0 * (row["cpu_ms"] / base["cpu_ms"] - 1) if base else None
    ratio = cpu_ratio = None
    if base and "naive" in rows and "normscope" in rows:
        ns, nv = rows["normscope"]["overhead_pct"], rows["naive"]["overhead_pct"]
        ratio = nv / ns if ns > 0 else float("inf")
        ns, nv = rows["normscope"]["cpu_overhead_pct"], rows["naive"]["cpu_overhead_pct"]
        cpu_ratio = nv / ns if ns > 0 else float("inf")
    return {"config": {k: getattr(args, k) for k in ("d_model", "layers", "batch", "seq", "steps", "rounds",
                                                     "warmup", "seed", "shared_model", "compile")}
            | {"variants": list(args.variants)},
            "norm_layers": n_norms, "parameters": n_params, "rows": list(rows.values()),
            "graphs_compiled_while_timed": new_graphs if args.compile else None,
            "overhead_ratio_naive_over_normscope": ratio, "cpu_overhead_ratio_naive_over_normscope": cpu_ratio}


def markdown(result: dict, machine: str, command: str) -> str:
    cfg = result["config"]
    lines = [
        f"Command: `{command}`",
        "",
        machine,
        "",
        f"Workload: TransformerEncoder pre-LN, d_model {cfg['d_model']}, {cfg['layers']} layers, "
        f"batch {cfg['batch']} x seq {cfg['seq']}, AdamW"
        + (", torch.compile(fullgraph=True, inductor)" if cfg.get("compile") else "")
        + f"; {result['norm_layers']} LayerNorms, "
        f"{result['parameters'] / 1e6:.2f} M parameters. {cfg['rounds']} rounds x {cfg['steps']} steps per "
        f"variant after {cfg['warmup']} warm-up steps"
        + ("; one shared model, each variant's monitor attached for its steps of a round (flushes not timed)."
           if cfg.get("shared_model") and not cfg.get("compile") else
           "; one shared compiled model, each variant's monitor attached once and paused outside its steps "
           "(flushes timed)." if cfg.get("shared_model") else "; one model copy per variant."),
        "",
        "| variant | ms/step | overhead vs none | spread | mean ms/step (incl. flushes) | overhead (mean) "
        "| CPU ms/step | overhead (CPU) | spread (CPU) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        none = r["variant"] == "none"
        oh = "—" if none else f"{r['overhead_pct']:+.1f}%"
        ohm = "—" if none else f"{r['overhead_mean_pct']:+.1f}%"
        ohc = "—" if none else f"{r['cpu_overhead_pct']:+.1f}%"
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {oh} | ±{r['spread_pct']:.1f}% | {r['mean_ms']:.2f} | "
                     f"{ohm} | {r['cpu_ms']:.2f} | {ohc} | ±{r['cpu_spread_pct']:.1f}% |")
    if result.get("graphs_compiled_while_timed") is not None:
        lines += ["", f"Graphs compiled during the timed rounds (recompilations): "
                      f"{result['graphs_compiled_while_timed']}"]
    for key, what in (("overhead_ratio_naive_over_normscope", "wall clock"),
                      ("cpu_overhead_ratio_naive_over_normscope", "thread CPU time")):
        ratio = result.get(key)
        if ratio is not None:
            txt = ("∞ (normscope's overhead is not above zero in this run)" if ratio == float("inf")
                   else f"{ratio:.1f}x")
            lines += ["", f"Ratio of overheads, naive / normscope (default settings, {what}): {txt}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round, a multiple of 10 "
                                                         "(default: 20)")
    p.add_argument("--rounds", type=int, default=8, help="rounds (default: 8)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant, a multiple of 10 "
                                                          "(default: 10)")
    p.add_argument("--d-model", type=int, default=128, help="model width (default: 128)")
    p.add_argument("--layers", type=int, default=4, help="encoder layers (default: 4)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (default: 64)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; 0 keeps torch's default. On a shared 2-core VM, 2 OpenMP "
                        "threads stall whenever another process takes a core, which swamps the overheads)")
    p.add_argument("--allocator", default="warm", choices=("warm", "default"),
                   help="CPU allocator conditions, as in normscope.bench (default: warm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-model", action="store_true",
                   help="train one model for all variants, attaching each variant's monitor for its steps of each "
                        "round (and closing it, untimed, after them): removes the differences between separate "
                        "model copies (memory placement: a few %% on a shared VM), but leaves out normscope's "
                        "periodic flush")
    p.add_argument("--compile", action="store_true",
                   help="run the model as torch.compile(model, fullgraph=True) (inductor); variants "
                        f"{', '.join(COMPILE_VARIANTS)} only (default variants then: those)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the markdown report")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.steps % 10 or args.warmup < 0 or args.warmup % 10 or args.rounds <= 0:
        p.error("--steps must be a positive multiple of 10, --warmup a multiple of 10, --rounds positive")
    allowed = COMPILE_VARIANTS if args.compile else VARIANTS
    if args.variants is None:
        args.variants = ",".join(allowed)
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in args.variants if v not in allowed]
    if unknown or not args.variants:
        p.error(f"unknown variants {unknown}{' with --compile' if args.compile else ''}; choose from "
                f"{', '.join(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    allocator = configure_allocator(args.allocator, "cpu")
    m = machine_info("cpu", allocator)
    machine = (f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} · Python "
               f"{m['python']} · torch {m['torch']} · normscope {m['normscope']} · allocator: {allocator} · "
               f"{m['date']}")
    print(machine, flush=True)
    progress = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    result = measure(args, progress)
    result["machine"] = m
    command = "python benchmarks/monitor_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(result, machine, command.strip())
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
