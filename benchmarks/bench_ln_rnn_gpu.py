"""LN-LSTM / LN-GRU speed on a CUDA GPU: normscope.nn.LayerNormLSTM/GRU through the fused Triton step kernels
against the same module with ``fused=False`` (the per-step module calls: many small kernels per step) and against
torch.nn.LSTM/GRU without layer norm (cuDNN: the price of LN), forward and forward+backward, timed with CUDA events.

    python benchmarks/bench_ln_rnn_gpu.py [--shapes T,B,I,H ...] [--dtype bf16] [--repeats 20] [--warmup 3]
                                          [--json out.json] [--markdown out.md]

Prints one row per (cell, shape, dtype, mode) with median milliseconds of the fused path, the module path and
torch, and the ratios module/fused (the fused kernels' speed-up) and fused/torch (the price of LN; 1.0 = free).
Before timing, each shape checks that the fused path's outputs match the module path's (max abs difference
printed). Exits with status 2 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = ["100,32,256,256", "200,64,512,512", "50,128,1024,1024"]


def _time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, each timed with a pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _step(module: torch.nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def run() -> None:
        out, _ = module(x)
        if backward:
            out.float().sum().backward()

    return run


def bench_one(cell: str, T: int, B: int, n_in: int, H: int, dtype: torch.dtype, warmup: int,
              repeats: int) -> List[Dict]:
    from normscope import recurrent
    from normscope.nn import LayerNormGRU, LayerNormLSTM

    dev = torch.device("cuda")
    cls = LayerNormLSTM if cell == "lstm" else LayerNormGRU
    torch.manual_seed(0)
    ln = cls(n_in, H).to(dev, dtype)
    ref = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(n_in, H).to(dev, dtype)
    x = torch.randn(T, B, n_in, device=dev, dtype=dtype, requires_grad=True)
    kernels = recurrent._fused_kernels("triton")
    if not kernels.available():
        raise SystemExit(f"the fused Triton kernels are unavailable: {kernels.unavailable_reason()}")
    with torch.no_grad():
        ln.fused = True
        a = ln(x)[0]
        ln.fused = False
        b = ln(x)[0]
    diff = (a.float() - b.float()).abs().max().item()
    rows = []
    for mode, backward in (("forward", False), ("forward+backward", True)):
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            ln.fused = True
            fused = _time(_step(ln, x, backward), warmup, repeats)
            ln.fused = False
            module = _time(_step(ln, x, backward), warmup, repeats)
            ln.fused = True
            torch_ms = _time(_step(ref, x, backward), warmup, repeats)
        rows.append({"cell": cell, "T": T, "B": B, "I": n_in, "H": H, "dtype": str(dtype).replace("torch.", ""),
                     "mode": mode, "fused_ms": fused, "module_ms": module, "torch_ms": torch_ms,
                     "module_over_fused": module / fused, "fused_over_torch": fused / torch_ms,
                     "max_abs_diff_vs_module": diff})
    return rows


def _markdown(rows: List[Dict]) -> str:
    head = ("| cell | T,B,I,H | dtype | mode | fused ms | module ms | torch (cuDNN) ms | module/fused | fused/torch |"
            " max diff |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['cell']} | {r['T']},{r['B']},{r['I']},{r['H']} | {r['dtype']} | {r['mode']} | {r['fused_ms']:.3f} | "
        f"{r['module_ms']:.3f} | {r['torch_ms']:.3f} | {r['module_over_fused']:.2f} | {r['fused_over_torch']:.2f} |"
        f" {r['max_abs_diff_vs_module']:.2e} |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="T,B,I,H (default: %(default)s)")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--dtype", default="bf16", help="comma-separated: fp32, bf16, fp16 (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--markdown", help="write the table as Markdown here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ln_rnn_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); for the CPU kernels run "
              "benchmarks/bench_ln_rnn.py", file=sys.stderr)
        return 2
    for d in args.dtype.split(","):
        if d not in DTYPES:
            ap.error(f"Expected --dtype among {sorted(DTYPES)}, but got {d!r}")
    rows: List[Dict] = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for shape in args.shapes:
        try:
            T, B, n_in, H = (int(v) for v in shape.split(","))
        except ValueError:
            ap.error(f"Expected a shape T,B,I,H, but got {shape!r}")
        for cell in args.cells.split(","):
            for d in args.dtype.split(","):
                for r in bench_one(cell, T, B, n_in, H, DTYPES[d], args.warmup, args.repeats):
                    rows.append(r)
                    print(f"{cell} T={T} B={B} I={n_in} H={H} {d} {r['mode']:>16}: fused {r['fused_ms']:8.3f} ms  "
                          f"module {r['module_ms']:8.3f} ms  torch {r['torch_ms']:8.3f} ms  "
                          f"module/fused {r['module_over_fused']:5.2f}  fused/torch {r['fused_over_torch']:5.2f}  "
                          f"max diff {r['max_abs_diff_vs_module']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
