"""The matrix multiplications an LSTM / GRU layer cannot avoid, timed alone: a floor under any implementation of
the layer (with or without layer norm) that does them with torch's GEMM, for the shapes of bench_ln_rnn.py.

    python benchmarks/ln_rnn_gemm_floor.py [--threads 2]

Forward: the input projection of all steps (one [T*B, I] x [I, G*H] matmul) and T recurrent matmuls
([B, H] x [H, G*H]). Backward: the input gradient and the input-weight gradient (one matmul each), T recurrent
input-gradient matmuls and the recurrent-weight gradient over all steps (one matmul). G = 4 (LSTM) or 3 (GRU).
Median of 7 runs after two warm-ups, milliseconds. Compare with bench_ln_rnn.py's columns: a target of "k times
faster than the composite" is out of reach for any such implementation where composite / k is below this floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_ms(f, reps: int = 7) -> float:
    f()
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["64,16,128,128", "128,32,256,256", "32,64,512,512"],
                   help="T,B,I,H")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for cell, G in (("LSTM", 4), ("GRU", 3)):
        for shape in a.shapes:
            T, B, n_in, H = (int(v) for v in shape.split(","))
            x, wih, whh = torch.randn(T * B, n_in), torch.randn(G * H, n_in), torch.randn(G * H, H)
            h, hs, dg = torch.randn(B, H), torch.randn(T * B, H), torch.randn(T * B, G * H)
            steps = dg.view(T, B, G * H)

            def forward():
                torch.mm(x, wih.t())
                for _ in range(T):
                    torch.mm(h, whh.t())

            def backward():
                torch.mm(dg, wih)
                torch.mm(dg.t(), x)
                for t in range(T):
                    torch.mm(steps[t], whh)
                torch.mm(dg.t(), hs)

            f, b = median_ms(forward), median_ms(backward)
            print(f"{cell} {shape}: GEMM floor fwd {f:.2f} ms, fwd+bwd {f + b:.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
