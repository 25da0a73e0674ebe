"""Short rows on the CPU: normscope's kernels against torch eager, one thread, thread CPU time.

For each row length N, a (2**21 / N, N) problem: LayerNorm (weight and bias) and RMSNorm (weight),
forward and backward (dx and the parameter gradients), normscope's CPU backend called directly and
torch eager (``F.layer_norm`` / ``F.rms_norm``, autograd for backward), in rounds of interleaved
batches. One thread and ``time.thread_time``: on a shared machine the time a thread spends
descheduled is not counted, which keeps the ratios stable when other work runs.

Usage: python benchmarks/bench_small_rows.py [--n 1,8,64,256] [--dtype fp32,bf16] [--elems 2097152]
Prints one line per case: median ms of normscope and torch, and torch / normscope (> 1: normscope faster).
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

    from normscope.ops import cpu_backend as cb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="1,2,4,8,16,32,64,128,256", help="row lengths")
    p.add_argument("--dtype", default="fp32,bf16", help="fp32, bf16")
    p.add_argument("--elems", type=int, default=1 << 21, help="elements per problem")
    p.add_argument("--reps", type=int, default=7, help="timed calls per batch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the minimum of the batch medians)")
    args = p.parse_args()
    torch.set_num_threads(1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    g = torch.Generator().manual_seed(0)

    def median_ms(f) -> float:
        ts = []
        for _ in range(args.reps):
            t0 = time.thread_time()
            f()
            ts.append(time.thread_time() - t0)
        return statistics.median(ts) * 1e3

    for dname in args.dtype.split(","):
        dt = dtypes[dname]
        for n in (int(v) for v in args.n.split(",")):
            m = max(1, args.elems // n)
            x = torch.randn(m, n, generator=g).to(dt)
            dy = torch.randn(m, n, generator=g).to(dt)
            w = torch.randn(n, generator=g).to(dt)
            b = torch.randn(n, generator=g).to(dt)
            for rms in (False, True):
                bias = None if rms else b
                _, _, mean, rstd = cb.norm_fwd(x, None, None, w, bias, 1e-5, rms)
                xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
                if rms:
                    yr, ins = F.rms_norm(xr, [n], wr, 1e-5), (xr, wr)
                else:
                    yr, ins = F.layer_norm(xr, [n], wr, br, 1e-5), (xr, wr, br)
                fns = {
                    "ns_fwd": lambda: cb.norm_fwd(x, None, None, w, bias, 1e-5, rms),
                    "torch_fwd": (lambda: F.rms_norm(x, [n], w, 1e-5)) if rms
                    else (lambda: F.layer_norm(x, [n], w, b, 1e-5)),
                    "ns_bwd": lambda: cb.norm_bwd(dy, None, x, None, w, mean, rstd, rms, not rms, dt),
                    "torch_bwd": lambda: torch.autograd.grad(yr, ins, dy, retain_graph=True),
                }
                for f in fns.values():
                    f()
                runs = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for k, f in fns.items():
                        runs[k].append(median_ms(f))
                best = {k: min(v) for k, v in runs.items()}
                name = "rms_norm  " if rms else "layer_norm"
                print(f"{dname} {name} {m}x{n}: forward {best['ns_fwd']:.2f} ms vs torch {best['torch_fwd']:.2f} "
                      f"(x{best['torch_fwd'] / best['ns_fwd']:.2f}) | backward {best['ns_bwd']:.2f} ms vs torch "
                      f"{best['torch_bwd']:.2f} (x{best['torch_bwd'] / best['ns_bwd']:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
