"""``normscope bench``: run the benchmark harness and print the machine line and markdown tables.

Also the shared entry point of the ``benchmarks/bench_*.py`` scripts (:func:`script_main`), which
take the same flags restricted to one op family.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

HELP = "benchmark normscope against torch eager, torch.compile, Liger and a copy"

_EPILOG = """\
examples:
  normscope bench                                  # all ops, default shapes, fp32+bf16, forward+full
  normscope bench --quick --op rms_norm            # smoke run
  normscope bench --op add_rms_norm --shapes 8192x1024 --dtype bf16 --modes forward,backward,full
  normscope bench --device cuda --csv out.csv --markdown out.md

ratio = provider_ms / normscope_ms (> 1: normscope faster); GB/s follow the bytes model in
normscope.bench's docstring; peak memory is of one forward+backward, above the live inputs.
"""


def add_arguments(p: argparse.ArgumentParser, default_ops: str = "all") -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device to run on (default: cuda if available, else cpu)")
    p.add_argument("--op", default=default_ops, metavar="OPS",
                   help=f"comma-separated ops, or all (default: {default_ops})")
    p.add_argument("--shapes", default=None, metavar="MxN,...",
                   help="comma-separated shapes (default: 8192x1024,4096x4096,1048576x8,131072x64,32768x256 "
                        "on cpu; M=16384 with "
                        "N in 1024..65536 and 4096x262144 on cuda)")
    p.add_argument("--dtype", default="fp32,bf16", metavar="DTYPES",
                   help="fp32, bf16, fp16 (default: fp32,bf16)")
    p.add_argument("--param-dtype", default="same", metavar="DTYPE",
                   help="weight/bias dtype: same (as the input) or fp32/bf16/fp16 (default: same)")
    p.add_argument("--modes", default="forward,full", metavar="MODES",
                   help="forward, backward, full, or all (default: forward,full)")
    p.add_argument("--providers", default="all", metavar="PROVIDERS",
                   help="normscope, torch, torch_compile, liger, copy, or all (default: all)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed reps per case (default: 5 cpu, 50 cuda; --quick: 3, 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up calls (default: 2 cpu, 10 cuda; --quick: 1, 3)")
    p.add_argument("--quick", action="store_true", help="small shapes and few reps: a smoke run")
    p.add_argument("--allocator", default="warm", choices=("warm", "default"),
                   help="CPU allocator conditions: warm (glibc mallopt, no page faults on reuse) or "
                        "default (default: warm)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--flush-l2", action="store_true",
                   help="CUDA: zero a 256 MiB buffer before each timed call")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write every row as CSV ('-': standard output)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write the markdown report ('-': standard output)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=HELP, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run, prog=p.prog, allowed_ops=None)
    return p


def config_from_args(args: argparse.Namespace, allowed_ops: Optional[Sequence[str]] = None):
    """A resolved :class:`normscope.bench.BenchConfig`; raises ``BenchError`` on bad usage."""
    from normscope import bench

    ops = bench.parse_list(args.op, tuple(allowed_ops or bench.OPS), "op")
    cfg = bench.BenchConfig(
        device=args.device,
        ops=ops,
        shapes=None if args.shapes is None else bench.parse_shapes(args.shapes),
        dtypes=bench.parse_list(args.dtype, tuple(bench.DTYPES), "dtype", bench.DTYPE_ALIASES),
        modes=bench.parse_list(args.modes, bench.MODES, "mode"),
        providers=bench.parse_list(args.providers, bench.PROVIDERS, "provider"),
        reps=args.reps,
        warmup=args.warmup,
        param_dtype=args.param_dtype,
        allocator=args.allocator,
        quick=args.quick,
        seed=args.seed,
        measure_memory=not args.no_memory,
        flush_l2=args.flush_l2,
    )
    return cfg.resolved()


def run(args: argparse.Namespace) -> int:
    from normscope import bench

    prog = getattr(args, "prog", "normscope bench")
    try:
        cfg = config_from_args(args, getattr(args, "allowed_ops", None))
    except bench.BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from normscope._paths import check_output, is_stdout, write_output

    for path in (args.csv, args.markdown):
        d = os.path.dirname(os.path.abspath(path)) if path and path != "-" else None
        if d and not os.path.isdir(d):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                print(f"{prog}: error: cannot create {d}: {e.strerror}", file=sys.stderr)
                return 2
        problem = check_output(path) if path else ""
        if problem:
            print(f"{prog}: error: cannot write {path!r}: {problem}", file=sys.stderr)
            return 2
    if is_stdout(args.csv) and is_stdout(args.markdown):
        print(f"{prog}: error: --csv - and --markdown - both ask for standard output; give one of them a file",
              file=sys.stderr)
        return 2
    result = bench.run_benchmark(cfg, progress=sys.stderr)
    text = result.to_markdown()
    if not is_stdout(args.markdown):  # the table once; on stderr when stdout carries the CSV
        table = sys.stderr if is_stdout(args.csv) else sys.stdout
        table.write(text)
        table.flush()
    for path, write in ((args.csv, result.to_csv), (args.markdown, lambda p: write_output(p, text))):
        if not path:
            continue
        try:
            write(path)
        except OSError as e:
            print(f"{prog}: error: cannot write {path!r}: {e.strerror or e}", file=sys.stderr)
            return 2
        if not is_stdout(path):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def script_main(ops: Sequence[str], argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of a ``benchmarks/bench_*.py`` script: the CLI's flags, ops limited to ``ops``."""
    from normscope.cli import ArgumentParser

    prog = prog or os.path.basename(sys.argv[0] or "bench")
    p = ArgumentParser(prog=prog, description=f"{HELP} ({', '.join(ops)})", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, default_ops=",".join(ops))
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args.prog, args.allowed_ops = prog, tuple(ops)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
