"""Benchmark the masked_norm family; the same flags as `normscope bench` (see --help).

Usage: python benchmarks/bench_masked_norm.py [--quick] [--device cpu|cuda] [--csv PATH] ...
"""

import sys
from pathlib import Path


def main() -> int:
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from normscope.bench import OP_FAMILIES
    from normscope.cli.bench import script_main

    return script_main(OP_FAMILIES["masked_norm"])


if __name__ == "__main__":
    raise SystemExit(main())
