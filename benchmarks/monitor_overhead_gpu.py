"""Step-time overhead of normscope.Monitor on a GPU: the fused Triton kernels against the torch operations.

Usage (on a CUDA machine; benchmarks/gpu_suite.sh runs it):
    python benchmarks/monitor_overhead_gpu.py                       # defaults below, prints a markdown table
    python benchmarks/monitor_overhead_gpu.py --json out.json --markdown out.md
    python benchmarks/monitor_overhead_gpu.py --device cpu --steps 2 --rounds 1 --warmup 1 --tiny   # smoke run

The workload: a small Llama (``transformers.LlamaForCausalLM`` from a ``LlamaConfig``: hidden 1024,
8 layers, 16 heads, feed-forward 2816, vocabulary 8192; ``2 * layers + 1 = 17`` RMSNorms) in
bfloat16, batch 8 x sequence 1024 of fixed random tokens, trained with AdamW (``foreach``).
``--tiny`` shrinks it (hidden 64, 2 layers, batch 2 x 32) for smoke runs.

Variants, all on one shared model and optimizer (a fresh monitor per variant and round, closed untimed):

* ``none`` -- no monitor: the baseline.
* ``<kernel>`` -- ``normscope.Monitor(model)`` at its defaults (``every=10``, ``flush_every=100``,
  ``grads=True``, no sinks).
* ``<kernel>_every1`` -- the same with ``every=1``: every step measured.

``<kernel>`` is the statistics path, chosen as with ``NORMSCOPE_MONITOR_KERNEL``: ``triton`` (the
fused kernels of normscope/monitor/_triton_stats.py, the default for CUDA tensors) and ``torch`` (the
torch operations: ~45 small ops per layer call). On ``--device cpu``, ``cpp`` (the fused C++ kernel)
replaces ``triton`` unless ``TRITON_INTERPRET=1``.

Timing: ``--warmup`` untimed steps per variant (they also compile the Triton kernels), then
``--rounds`` rounds; in each round every variant runs ``--steps`` steps, in an order rotated each
round. A round's time is taken between two ``torch.cuda.synchronize()`` calls (wall clock), divided
by the steps. ``ms/step`` is the median over rounds; ``spread`` is half the inter-quartile range of
the round means in % of the median. Overhead = ``ms/step / none's ms/step - 1``. ``--steps`` is a
multiple of 10 by default so that every round of a default monitor (``every=10``) holds the same
number of sampled steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

try:
    import normscope
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import normscope

from normscope.monitor import _monitor as monitor_impl


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this benchmark needs transformers: pip install 'normscope[hf]'") from e
    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=8192, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype), cfg


def set_kernel(kernel: str) -> None:
    """Select the monitor's statistics path (as NORMSCOPE_MONITOR_KERNEL, read again)."""
    os.environ["NORMSCOPE_MONITOR_KERNEL"] = {"triton": "triton", "cpp": "auto", "torch": "torch"}[kernel]
    monitor_impl._KERNEL_MODE = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model, cfg = build_model(args.tiny, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    batch, seq = (2, 32) if args.tiny else (args.batch, args.seq)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(4)]
    kernels = args.kernels.split(",")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        kernels = ["cpp" if k == "triton" else k for k in kernels]
    variants = ["none"] + [k + suffix for k in kernels for suffix in ("", "_every1")]
    counter = [0]

    def steps(n: int, mon: Optional[normscope.Monitor]) -> None:
        for _ in range(n):
            tokens = batches[counter[0] % len(batches)]
            counter[0] += 1
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.step()

    def variant_run(name: str, n: int) -> float:
        mon = None
        if name != "none":
            kernel, _, every1 = name.partition("_")
            set_kernel(kernel)
            mon = normscope.Monitor(model, every=1 if every1 else 10)
        sync(device)
        t0 = time.perf_counter()
        steps(n, mon)
        sync(device)
        elapsed = time.perf_counter() - t0
        if mon is not None:
            mon.close()
        return elapsed / max(n, 1)

    for name in variants:
        variant_run(name, args.warmup)
    rounds: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name in order:
            rounds[name].append(variant_run(name, args.steps) * 1e3)

    def summary(xs: List[float]) -> dict:
        med = statistics.median(xs)
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [med, med, med]
        return {"ms_per_step": med, "spread_pct": 50.0 * (q[2] - q[0]) / med if med else 0.0, "rounds": xs}

    results = {v: summary(xs) for v, xs in rounds.items()}
    base = results["none"]["ms_per_step"]
    for v in variants:
        results[v]["overhead_pct"] = 100.0 * (results[v]["ms_per_step"] / base - 1.0)
    counted = normscope.Monitor(model, every=1)
    n_norms = len(counted.layers)
    counted.close()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "norm_layers": n_norms,
                  "batch": batch, "seq": seq},
        "steps": args.steps,
        "rounds": args.rounds,
        "results": results,
    }


def markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"Monitor overhead on {report['device']} (torch {report['torch']}, {report['dtype']}, Llama hidden "
             f"{m['hidden']} x {m['layers']} layers, {m['norm_layers']} norms, batch {m['batch']} x {m['seq']}; "
             f"{report['rounds']} rounds x {report['steps']} steps)", "",
             "| variant | ms/step | overhead | spread |", "|---|---:|---:|---:|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['ms_per_step']:.2f} | {r['overhead_pct']:+.1f}% | {r['spread_pct']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--kernels", default="triton,torch", help="comma-separated: triton, cpp, torch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke runs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    args = p.parse_args(argv)
    for k in args.kernels.split(","):
        if k not in ("triton", "cpp", "torch"):
            raise ValueError(f"Expected --kernels to list triton, cpp or torch, but got {k!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("Expected a CUDA device for --device cuda, but torch.cuda.is_available() is False "
                           "(use --device cpu for a smoke run)")
    report = run(args)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
