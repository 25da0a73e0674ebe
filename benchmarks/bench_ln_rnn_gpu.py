"""LN-LSTM / LN-GRU speed on a CUDA GPU: normscope.nn.LayerNormLSTM/GRU through the fused Triton step kernels
against the same module with ``fused=False`` (the per-step module calls: many small kernels per step) and against
torch.nn.LSTM/GRU without layer norm (cuDNN: the price of LN), forward and forward+backward, timed with CUDA events.

    python benchmarks/bench_ln_rnn_gpu.py [--shapes T,B,I,H ...] [--dtype bf16] [--repeats 20] [--warmup 3]
                                          [--json out.json] [--markdown out.md]

Prints one row per (cell, shape, dtype, mode) with median milliseconds of the fused path, the module path and
torch, and the ratios module/fused (the fused kernels' speed-up) and fused/torch (the price of LN; 1.0 = free).
``graphed`` replays the fused path from CUDA graphs: the forward row a forward captured under no_grad
(``torch.cuda.CUDAGraph``), the forward+backward row ``torch.cuda.make_graphed_callables`` (a copy of the
module): the time left once the per-step launches from Python are gone.

Accuracy, per shape, before timing: ``fp32 diff`` is the largest difference between the fused and the module
outputs in float32 (the kernels' exactness); ``err fused`` / ``err module`` are the largest differences of each
path in the benchmarked dtype from the float32 module path. An LN-LSTM at its default initialization amplifies a
perturbation of its input about 1e4-fold over 200 steps (measured in float64), so in bfloat16 both paths drift
from float32 by O(1) on long sequences; the two errors, not the difference between the paths, say whether the
fused path is as accurate as the module path. Exits with status 2 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import copy
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


def _accuracy(ln: torch.nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """The fused path against the module path in float32, and each path's error in ``x.dtype`` from float32."""
    ref_mod = copy.deepcopy(ln).float()
    x32 = x.detach().float()
    outs = {}
    with torch.no_grad():
        for name, mod, inp in (("fused32", ref_mod, x32), ("fused", ln, x)):
            for fused in (True, False):
                mod.fused = fused
                outs[(name, fused)] = mod(inp)[0].float()
        ln.fused = True
    ref = outs[("fused32", False)]

    def dist(a: torch.Tensor) -> float:
        return (a - ref).abs().max().item()

    return {"fp32_diff": dist(outs[("fused32", True)]), "err_fused": dist(outs[("fused", True)]),
            "err_module": dist(outs[("fused", False)])}


def _graphed(ln: torch.nn.Module, x: torch.Tensor):
    """The fused forward (no grad) captured in a CUDA graph, as a replay callable; None (with the reason printed)
    when the capture fails."""
    try:
        ln.fused = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                ln(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            ln(x)
        return graph.replay
    except Exception as e:  # noqa: BLE001 - reported, and the column left empty
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _graphed_train(ln: torch.nn.Module, x: torch.Tensor):
    """Forward + backward of a copy of ``ln`` through ``torch.cuda.make_graphed_callables``; None (reason printed)
    when that fails."""
    try:
        graphed = torch.cuda.make_graphed_callables(copy.deepcopy(ln), (x,))
    except Exception as e:  # noqa: BLE001 - reported, and the column left empty
        print(f"make_graphed_callables failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None

    def run() -> None:
        out, _ = graphed(x)
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
    acc = _accuracy(ln, x)
    graphed = {False: _graphed(ln, x), True: _graphed_train(ln, x)}
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
        graph_ms = None if graphed[backward] is None else _time(graphed[backward], warmup, repeats)
        rows.append({"cell": cell, "T": T, "B": B, "I": n_in, "H": H, "dtype": str(dtype).replace("torch.", ""),
                     "mode": mode, "fused_ms": fused, "module_ms": module, "torch_ms": torch_ms,
                     "fused_graph_ms": graph_ms, "module_over_fused": module / fused,
                     "fused_over_torch": fused / torch_ms, **acc})
    return rows


def _markdown(rows: List[Dict]) -> str:
    head = ("| cell | T,B,I,H | dtype | mode | fused ms | graphed ms | module ms | torch (cuDNN) ms | module/fused |"
            " fused/torch | fp32 diff | err fused | err module |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")

    return head + "".join(
        f"| {r['cell']} | {r['T']},{r['B']},{r['I']},{r['H']} | {r['dtype']} | {r['mode']} | {r['fused_ms']:.3f} | "
        f"{_graph_cell(r, '', '')} | {r['module_ms']:.3f} | {r['torch_ms']:.3f} | {r['module_over_fused']:.2f} | "
        f"{r['fused_over_torch']:.2f} | {r['fp32_diff']:.1e} | {r['err_fused']:.1e} | {r['err_module']:.1e} |\n"
        for r in rows)


def _graph_cell(r: Dict, missing: str, unit: str) -> str:
    """The graphed time of a row, or ``missing`` where there is none (the forward+backward of a failed capture)."""
    return missing if r["fused_graph_ms"] is None else f"{r['fused_graph_ms']:.3f}{unit}"


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
                          f"graphed {_graph_cell(r, '-', ' ms')}  fp32 diff {r['fp32_diff']:.1e}  "
                          f"err fused {r['err_fused']:.1e}  err module {r['err_module']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
