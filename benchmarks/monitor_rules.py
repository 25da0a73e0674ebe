"""Host time of the finding rules (normscope.monitor.rules.detect) per flush, with per-step gradient series.

A window of ``--steps`` sampled steps for ``--layers`` layers, each with a per-step gradient series, is
judged against a full history (``Thresholds.grad_history_steps``); the time per flush and per (layer,
sampled step) is printed, against a baseline in the same run: the same windows without the series (one
mean per window, as judged before per-step series existed).

Usage: python benchmarks/monitor_rules.py [--layers 200] [--steps 100] [--flushes 5]
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path


def main() -> int:
    try:
        import normscope  # noqa: F401
    except ImportError:  # running from a checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from normscope.monitor import Thresholds
    from normscope.monitor import _layout as L
    from normscope.monitor.rules import RuleContext, RuleState, detect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100, help="sampled steps per window (flush_every / every)")
    ap.add_argument("--flushes", type=int, default=5)
    args = ap.parse_args()
    layout = L.Layout(64, (-8.0, 8.0))
    rng = random.Random(0)

    def windows(per_step):
        for w in range(args.flushes + 2):  # two warm-up windows fill the history
            raws = {}
            for i in range(args.layers):
                raw = L.WindowRaw.from_row(layout.template_list(), layout)
                series = [(t, math.exp(rng.gauss(0, 0.3)), math.exp(rng.gauss(0, 0.3)))
                          for t in range(w * args.steps, (w + 1) * args.steps)]
                raw.first_step, raw.last_step, raw.steps = series[0][0], series[-1][0], len(series)
                for col_sum, col_n, k in ((L.S_GIN_SUM, L.S_GIN_N, 1), (L.S_GP_SUM, L.S_GP_N, 2)):
                    raw.sums[col_sum], raw.sums[col_n] = sum(e[k] for e in series), len(series)
                raw.grad_series = series if per_step else []
                raws[i] = raw
            yield w, raws, {i: raw.stats(1e-5, 10.0) for i, raw in raws.items()}

    results = {}
    for label, per_step in (("window means (baseline)", False), ("per-step series", True)):
        ctx, state = RuleContext([f"layer{i}" for i in range(args.layers)], Thresholds()), RuleState()
        total = 0.0
        for w, raws, stats in windows(per_step):
            t0 = time.perf_counter()
            detect(raws, stats, ctx, state)
            if w >= 2:
                total += time.perf_counter() - t0
        results[label] = total / args.flushes
    base = results["window means (baseline)"]
    for label, t in results.items():
        per = t / (args.layers * args.steps) * 1e6
        print(f"{label:24s} {t * 1e3:9.2f} ms per flush  {per:7.2f} us per (layer, sampled step)  "
              f"{t / base:6.2f}x baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
