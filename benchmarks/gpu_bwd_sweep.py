"""The Triton LayerNorm / RMSNorm backward's launch settings swept on a CUDA GPU: for each shape, the backward
alone (dx, dw, db from the forward's saved statistics) under every setting, against torch eager's backward
(``aten.native_layer_norm_backward`` / ``aten._fused_rms_norm_backward`` where torch has it).

    python benchmarks/gpu_bwd_sweep.py [--shapes 16384x4096 ...] [--dtype bf16] [--rms] [--markdown out.md]

The settings are the module constants of ``normscope.ops.triton_backend`` that pick the launch: the largest row
block of the fused (one read of the row) backward, ``_BWD_MAX_BLOCK``; its programs per multiprocessor,
``_BWD_WARPS_PER_SM // num_warps``; and, for longer rows, the looped backward's rows per group
(``_BWD_LOOP_ROWS``), tile (``_BWD_LOOP_TILE``), warps (``_BWD_LOOP_WARPS``) and programs per multiprocessor
(``_BWD_LOOP_PER_SM``). Times: ``triton.testing.do_bench`` medians (ms). Prints, per shape, torch's time, the
default setting's and the five fastest, with their ratios to torch (> 1: normscope faster). Without CUDA it runs
one tiny shape through Triton's interpreter (a check of the script, no timing worth reading).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

DEFAULT_SHAPES = ["16384x1024", "16384x4096", "16384x8192", "16384x16384", "16384x65536", "4096x262144"]

FUSED_GRID = {"_BWD_MAX_BLOCK": [4096, 8192, 16384], "_BWD_WARPS_PER_SM": [8, 16, 32]}
LOOPED_GRID = {"_BWD_LOOP_ROWS": [1, 2, 4], "_BWD_LOOP_TILE": [4096, 8192, 16384], "_BWD_LOOP_WARPS": [8, 16],
               "_BWD_LOOP_PER_SM": [1, 2]}


def _settings(tb) -> List[Dict[str, int]]:
    keys = list(FUSED_GRID) + list(LOOPED_GRID)
    default = {k: getattr(tb, k) for k in keys}
    out = [default]
    for vals in itertools.product(*FUSED_GRID.values()):
        out.append({**default, **dict(zip(FUSED_GRID, vals))})
    for vals in itertools.product(*LOOPED_GRID.values()):
        out.append({**default, **dict(zip(LOOPED_GRID, vals)), "_BWD_MAX_BLOCK": min(default["_BWD_MAX_BLOCK"],
                                                                                     4096)})
    seen, unique = set(), []
    for s in out:
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--rms", action="store_true")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import triton

    from normscope.ops import triton_backend as tb

    dev = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = args.shapes if cuda else ["8x48"]
    settings = _settings(tb)
    if not cuda:
        settings = settings[:3]

    def bench(fn) -> float:
        if not cuda:
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    lines = [f"# Triton {'RMSNorm' if args.rms else 'LayerNorm'} backward settings, {args.dtype}, "
             f"{torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}, torch {torch.__version__}, "
             f"triton {triton.__version__}", ""]
    for shape in shapes:
        M, N = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, N, generator=g).to(dev, dtype)
        dy = torch.randn(M, N, generator=g).to(dev, dtype)
        w = (torch.randn(N, generator=g) * 0.5 + 1).to(dev, dtype)
        b = None if args.rms else torch.randn(N, generator=g).to(dev, dtype)
        _, _, mean, rstd = tb.norm_fwd(x, None, None, w, b, 1e-5, args.rms)
        if args.rms:
            ref = getattr(torch.ops.aten, "_fused_rms_norm_backward", None)
            _, t_rstd = torch.ops.aten._fused_rms_norm(x, [N], w, 1e-5) if ref is not None else (None, None)

            def theirs():
                ref(dy, x, [N], t_rstd, w, [True, True])
        else:
            _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x, [N], w, b, 1e-5)

            def theirs():
                torch.ops.aten.native_layer_norm_backward(dy, x, [N], t_mean, t_rstd, w, b, [True, True, True])
        t_torch = bench(theirs) if (not args.rms or ref is not None) else float("nan")
        rows: List[Tuple[float, Dict[str, int]]] = []
        saved = {k: getattr(tb, k) for k in settings[0]}
        try:
            for s in settings:
                for k, v in s.items():
                    setattr(tb, k, v)
                ms = bench(lambda: tb.norm_bwd(dy, None, x, None, w, mean, rstd, args.rms, b is not None, dtype))
                rows.append((ms, s))
        finally:
            for k, v in saved.items():
                setattr(tb, k, v)
        default_ms = rows[0][0]
        best = sorted(rows, key=lambda r: r[0])[:5]
        lines += [f"## {shape}: torch {t_torch:.4f} ms, default {default_ms:.4f} ms (×{t_torch / default_ms:.2f})",
                  "", "| ms | ×torch | ×default | setting |", "|--:|--:|--:|:--|"]
        for ms, s in best:
            changed = {k: v for k, v in s.items() if v != settings[0][k]} or "default"
            lines.append(f"| {ms:.4f} | {t_torch / ms:.2f} | {default_ms / ms:.2f} | {changed} |")
        lines.append("")
        print("\n".join(lines[-(len(best) + 4):]), flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
