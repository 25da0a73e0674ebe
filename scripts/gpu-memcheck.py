"""Every Triton kernel of normscope, once per case, for compute-sanitizer's memcheck on a CUDA machine:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python3 scripts/gpu-memcheck.py

With the caching allocator off, every tensor is its own cudaMalloc, so a read or a write past a tensor's end is
reported (with the allocator on, it would land in the same cached segment and go unseen). The cases end tensors
exactly where the last program of a kernel reads: one row, odd sizes, rows longer than one block, the last batch
row of a recurrent step. Prints one line per case; exits 0 when every case ran.

Without a GPU it runs on CPU tensors through Triton's interpreter (``--device cpu``): a check of the script, not
of the kernels' memory accesses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("NORMSCOPE_BACKEND", "triton")
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    import normscope
    from normscope import functional as F
    from normscope import recurrent
    from normscope.nn import LayerNorm2d, LayerNormGRU, LayerNormLSTM

    dev = torch.device(args.device)
    if dev.type == "cpu":
        recurrent._FUSED_BACKEND = "triton"
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=gen).to(dev, dtype)
        return t.requires_grad_() if grad else t

    def want(name: str) -> bool:
        return args.only in name

    def done(name: str, t0: float) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"ok  {name}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    shapes = [(1, 7), (3, 1000), (2, 65537)] if not args.quick else [(1, 7), (3, 1000)]
    for m, n in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            if not want(f"norm ops {m}x{n} {dtype}"):
                continue
            t0 = time.perf_counter()
            x, r = rand(m, n, dtype=dtype, grad=True), rand(m, n, dtype=dtype, grad=True)
            w, b = rand(n, dtype=dtype, grad=True), rand(n, dtype=dtype, grad=True)
            mask = rand(m, n) > 0
            outs = [F.layer_norm(x, n, w, b), F.rms_norm(x, n, w, offset=1.0), F.rms_norm(x, n, w, bias=b),
                    *F.add_layer_norm(x, r, n, w, b), *F.add_rms_norm(x, r, n, w),
                    F.masked_layer_norm(x, mask, n, w, b), F.masked_rms_norm(x, mask, n, w)]
            sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
            done(f"norm ops {m}x{n} {dtype}", t0)
    t0 = time.perf_counter()
    if want("per-head rms_norm"):
        heads = rand(3, 5, 4, 16, dtype=torch.bfloat16, grad=True)
        hw = rand(4, 16, dtype=torch.bfloat16, grad=True)
        F.rms_norm(heads, 16, hw).float().sum().backward()
        done("per-head rms_norm", t0)

    rnn_shapes = [(3, 1, 5, 6), (2, 3, 8, 1024), (3, 2, 4, 100)]
    for cls in (LayerNormLSTM, LayerNormGRU):
        for T, B, n_in, H in rnn_shapes:
            for dtype in (torch.bfloat16, torch.float32):
                name = f"{cls.__name__} T={T} B={B} I={n_in} H={H} {dtype}"
                if not want(name):
                    continue
                t0 = time.perf_counter()
                torch.manual_seed(0)
                mod = cls(n_in, H).to(dev, dtype)
                x = rand(T, B, n_in, dtype=dtype, grad=True)
                out, _ = mod(x)
                out.float().sum().backward()
                if B > 1:  # padded sequences: the live rows shrink over the steps
                    out, _ = mod(x, lengths=torch.arange(T, T - B, -1).clamp(min=1))
                    out.float().sum().backward()
                done(name, t0)

    for shape in [(2, 19, 5, 15), (1, 96, 7, 7)]:
        if not want(f"LayerNorm2d {shape}"):
            continue
        t0 = time.perf_counter()
        ln2d = LayerNorm2d(shape[1]).to(dev)
        x = rand(*shape, grad=True)
        ln2d(x).square().sum().backward()
        done(f"LayerNorm2d {shape}", t0)

    if want("Monitor statistics kernels"):
        t0 = time.perf_counter()
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 24),
                                    torch.nn.RMSNorm(24)).to(dev)
        mon = normscope.Monitor(model, every=1, flush_every=None)
        for _ in range(2):
            model(rand(7, 24)).square().mean().backward()
            mon.step()
        mon.close()
        done("Monitor statistics kernels", t0)
    print("all cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
