"""LN-LSTM / LN-GRU speed: normscope.nn.LayerNormLSTM/GRU against the Python-loop composite users write today
(nn.LayerNorm per gate block around a per-step matmul) and against torch.nn.LSTM/GRU without layer norm (the
price of LN), forward and forward+backward, on the CPU (or --device cuda).

    python benchmarks/bench_ln_rnn.py [--shapes T,B,I,H ...] [--repeats 5] [--threads N] [--device cpu]

Prints one row per (cell, shape, mode) with median milliseconds of normscope (the fused CPU kernels where they
apply: the time loop in C++), normscope with the time loop's matmuls through torch's BLAS gemm instead of the loop's
own small-row kernel (``NORMSCOPE_RNN_GEMM=blas``; the same where the loop picks the BLAS itself), normscope with
the time loop in Python (one matmul and one kernel call per step, what runs where torch has no MKL gemm to hand to
the kernels), normscope with ``fused=False`` (the per-step module calls that a Monitor or forward hooks get), the
composite and torch, and the ratios composite/normscope (higher is better for normscope), blas-gemm/normscope,
py-loop/normscope and normscope/torch (the price of LN; 1.0 = free), each with its spread (min-max over the
repeats, ratios of the same repeat).

Fairness: every variant runs under the same torch thread count, gets two warm-up calls, and the repeats are
interleaved (variant A, B, C, ... then again), so a load change on the machine hits all variants alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from normscope.ops import rnn_cpu
from normscope.recurrent import LayerNormGRU, LayerNormLSTM


class CompositeLNLSTM(torch.nn.Module):
    """What users write today: a Python loop over time with nn.LayerNorm modules (one per gate block)."""

    def __init__(self, ref: torch.nn.Module, gru: bool):
        super().__init__()
        self.ref, self.gru = ref, gru
        H, G = ref.hidden_size, ref.gates
        self.ln_ih = torch.nn.ModuleList(torch.nn.LayerNorm(H, elementwise_affine=False) for _ in range(G))
        self.ln_hh = torch.nn.ModuleList(torch.nn.LayerNorm(H, elementwise_affine=False) for _ in range(G))
        self.ln_c = torch.nn.LayerNorm(H)

    def forward(self, x):
        r, H = self.ref, self.ref.hidden_size
        T, B, _ = x.shape
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        outs = []
        for t in range(T):
            xi = F.linear(x[t], r.weight_ih_l0).split(H, -1)
            hh = F.linear(h, r.weight_hh_l0).split(H, -1)
            gi = [ln(v) * r.ln_ih_l0.weight[k] + r.bias_ih_l0[k * H:(k + 1) * H] for k, (ln, v) in
                  enumerate(zip(self.ln_ih, xi))]
            gh = [ln(v) * r.ln_hh_l0.weight[k] + r.bias_hh_l0[k * H:(k + 1) * H] for k, (ln, v) in
                  enumerate(zip(self.ln_hh, hh))]
            if self.gru:
                rr = torch.sigmoid(gi[0] + gh[0])
                z = torch.sigmoid(gi[1] + gh[1])
                n = torch.tanh(gi[2] + rr * gh[2])
                h = (1 - z) * n + z * h
            else:
                i, f, g, o = (a + b for a, b in zip(gi, gh))
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outs.append(h)
        return torch.stack(outs), h


def _python_loop(fn):
    """``fn`` with the fused kernels' time loop in Python (no gemm address: one matmul + kernel call per step)."""
    def f():
        real = rnn_cpu._gemm_address
        rnn_cpu._gemm_address = lambda dtype: None
        try:
            fn()
        finally:
            rnn_cpu._gemm_address = real
    return f


def _blas_gemm(fn):
    """``fn`` with the C++ time loop's matmuls through torch's BLAS gemm (NORMSCOPE_RNN_GEMM=blas) instead of the
    loop's own small-row kernel."""
    def f():
        old = os.environ.get("NORMSCOPE_RNN_GEMM")
        os.environ["NORMSCOPE_RNN_GEMM"] = "blas"
        try:
            fn()
        finally:
            if old is None:
                del os.environ["NORMSCOPE_RNN_GEMM"]
            else:
                os.environ["NORMSCOPE_RNN_GEMM"] = old
    return f


def _time_interleaved(fns, repeats: int, sync):
    """Per variant, the list of the wall times (ms) of ``repeats`` interleaved runs after two warm-ups each."""
    for fn in fns:
        for _ in range(2):
            fn()
        sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def _fmt(v) -> str:
    return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["64,16,128,128", "128,32,256,256", "32,64,512,512"],
                    help="T,B,I,H per case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="lstm,gru")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, device {dev}")
    print("cell  T,B,I,H  mode | ms, median [min-max]: normscope | blas-gemm | py-loop | unfused | composite | torch "
          "| ratios, median [min-max]: composite/ns | blas-gemm/ns | py-loop/ns | ns/torch")
    for cell in args.cells.split(","):
        gru = cell == "gru"
        for shape in args.shapes:
            T, B, n_in, H = (int(v) for v in shape.split(","))
            torch.manual_seed(0)
            ours = (LayerNormGRU if gru else LayerNormLSTM)(n_in, H).to(dev)
            unfused = (LayerNormGRU if gru else LayerNormLSTM)(n_in, H).to(dev)
            unfused.load_state_dict(ours.state_dict())
            unfused.fused = False
            comp = CompositeLNLSTM(ours, gru).to(dev)
            plain = (torch.nn.GRU if gru else torch.nn.LSTM)(n_in, H).to(dev)
            x = torch.randn(T, B, n_in, device=dev, requires_grad=True)
            for mode in ("fwd", "fwd+bwd"):
                def call(m, mode=mode):
                    if mode == "fwd":
                        def f():
                            with torch.no_grad():
                                m(x)
                        return f
                    return lambda: m(x)[0].sum().backward()

                fns = [call(ours), _blas_gemm(call(ours)), _python_loop(call(ours)), call(unfused), call(comp),
                       call(plain)]
                t_ns, t_blas, t_py, t_unf, t_comp, t_torch = _time_interleaved(fns, args.repeats, sync)
                ratios = [[a / b for a, b in zip(num, den)] for num, den in
                          ((t_comp, t_ns), (t_blas, t_ns), (t_py, t_ns), (t_ns, t_torch))]
                print(f"{cell} {shape} {mode} | "
                      + " | ".join(_fmt(v) for v in (t_ns, t_blas, t_py, t_unf, t_comp, t_torch))
                      + " | " + " | ".join(_fmt(v) for v in ratios), flush=True)


if __name__ == "__main__":
    main()
