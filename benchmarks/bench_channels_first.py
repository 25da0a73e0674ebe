"""Channels-first LayerNorm on the CPU (ConvNeXt's stage shapes): normscope's LayerNorm2d against timm's.

For each (N, C, H, W), a contiguous NCHW input through
  - ``normscope``: normscope.nn.LayerNorm2d (the channels-first kernel: no permute copy, NCHW output),
  - ``timm``: timm's LayerNorm2d (``x.permute(0, 2, 3, 1)``, torch's ``F.layer_norm``, permute back),
  - ``torch_cl``: torch's ``F.layer_norm`` on a channels-last input (what a channels-last model pays;
    the permute of its input is free there),
forward (inference, no grad) and forward + backward, in interleaved rounds, one thread, thread CPU time
(time spent descheduled on a shared machine is not counted). Prints the median ms and the ratio
timm / normscope (> 1: normscope faster).

Usage: python benchmarks/bench_channels_first.py [--shapes 32,96,56,56 ...] [--dtype fp32,bf16] [--threads 1]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch
    import torch.nn.functional as F

    from normscope.nn import LayerNorm2d

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8,96,56,56", "8,192,28,28", "8,384,14,14", "8,768,7,7"])
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"# torch {torch.__version__}, {args.threads} thread(s), "
          f"{'thread CPU time' if args.threads == 1 else 'wall clock'}; median ms over {args.rounds} x {args.reps}")
    print(f"{'shape':>16} {'dtype':>5} {'pass':>8} {'normscope':>10} {'timm':>8} {'torch_cl':>9} {'timm/ns':>8}")
    for dname in args.dtype.split(","):
        dt = dtypes[dname]
        for spec in args.shapes:
            n, c, h, w = (int(v) for v in spec.split(","))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=g).to(dt)
            dy = torch.randn(n, c, h, w, generator=g).to(dt)
            ours = LayerNorm2d(c).to(dt)
            weight, bias = ours.weight, ours.bias
            xl = x.contiguous(memory_format=torch.channels_last)

            def timm(t):
                return F.layer_norm(t.permute(0, 2, 3, 1), (c,), weight, bias, 1e-6).permute(0, 3, 1, 2)

            def torch_cl(t):
                return F.layer_norm(t.permute(0, 2, 3, 1), (c,), weight, bias, 1e-6).permute(0, 3, 1, 2)

            variants = {"normscope": (ours, x), "timm": (timm, x), "torch_cl": (torch_cl, xl)}
            for mode in ("fwd", "fwd+bwd"):
                times = {k: [] for k in variants}

                def once(fn, inp):
                    if mode == "fwd":
                        with torch.no_grad():
                            fn(inp)
                    else:
                        xi = inp.detach().requires_grad_()
                        fn(xi).backward(dy)

                for fn, inp in variants.values():
                    once(fn, inp)  # warm-up (builds the kernels)
                for _ in range(args.rounds):
                    for k, (fn, inp) in variants.items():
                        for _ in range(args.reps):
                            t0 = clock()
                            once(fn, inp)
                            times[k].append((clock() - t0) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"{spec:>16} {dname:>5} {mode:>8} {med['normscope']:>10.2f} {med['timm']:>8.2f} "
                      f"{med['torch_cl']:>9.2f} {med['timm'] / med['normscope']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
