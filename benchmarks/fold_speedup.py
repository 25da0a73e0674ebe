"""CPU inference time of a pre-LN model before and after ``normscope.fold_norms_``.

Workload: a transformers GPT-2 built from a config (random weights, no download), eval mode, no grad,
fp32, token ids of shape (batch, seq). Variants, each on its own deep copy of the same model:

* ``torch``: the model as built (torch LayerNorm with gamma/beta);
* ``folded``: after ``fold_norms_`` (gamma/beta folded into c_attn / c_fc / an untied lm_head; the
  norms keep unit gamma and zero beta);
* ``normscope``: after ``normscope.convert`` (normscope's CPU kernels);
* ``normscope+folded``: converted, then folded.

The variants run interleaved in rounds (median of round times), with the allocator conditions of
``normscope.bench``. Usage: ``python benchmarks/fold_speedup.py [--layers 6] [--d-model 768] ...``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch
    import transformers

    import normscope
    from normscope.bench import configure_allocator, machine_info, machine_line

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)

    alloc = configure_allocator("warm")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=8192, n_embd=args.d_model, n_layer=args.layers,
                                  n_head=max(1, args.d_model // 64), n_positions=max(args.seq, 128))
    base = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial gamma/beta, as in a trained model
        for name, prm in base.named_parameters():
            if ".ln_" in name:
                prm.add_(torch.randn_like(prm) * 0.2)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    example = {"input_ids": ids}

    models = {"torch": base, "folded": copy.deepcopy(base), "normscope": copy.deepcopy(base),
              "normscope+folded": copy.deepcopy(base)}
    folded = normscope.fold_norms_(models["folded"], example)
    normscope.convert(models["normscope"])
    normscope.convert(models["normscope+folded"])
    normscope.fold_norms_(models["normscope+folded"], example)

    with torch.no_grad():
        ref = base(**example).logits
        for name, m in models.items():
            out = m(**example).logits
            err = float((out - ref).abs().max() / ref.abs().max())
            if err > 1e-4:
                raise SystemExit(f"{name}: outputs differ from the original by {err:.2e} (relative)")
        times = {name: [] for name in models}
        for m in models.values():
            m(**example)  # warm-up (and the CPU kernels' first build)
        for r in range(args.rounds):
            order = list(models)[r % len(models):] + list(models)[: r % len(models)]
            for name in order:
                t0 = time.perf_counter()
                models[name](**example)
                times[name].append(time.perf_counter() - t0)

    print(machine_line(machine_info("cpu", alloc)))
    print(f"\nGPT-2 config: {args.layers} layers, d_model {args.d_model}, batch {args.batch} x seq {args.seq}, fp32, "
          f"eval, no grad; {len(folded.folded)} norms folded, {len(folded.skipped)} skipped; "
          f"median of {args.rounds} interleaved rounds.\n")
    base_ms = statistics.median(times["torch"]) * 1e3
    print("| variant | ms / forward | time saved vs torch |")
    print("|:--|--:|--:|")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"| {name} | {ms:.1f} | {100 * (base_ms - ms) / base_ms:+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
