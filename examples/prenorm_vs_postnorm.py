"""Pre-LN vs post-LN gradient norms at initialisation, per layer, as normscope.Monitor reports them.

    python examples/prenorm_vs_postnorm.py                       # writes prenorm_vs_postnorm.png
    python examples/prenorm_vs_postnorm.py --out /tmp/xiong.png --seeds 1

Reproduces the trend of Xiong et al. (2020), "On Layer Normalization in the Transformer Architecture":
at initialisation, post-LN Transformers have large gradients near the output and pre-LN ones small,
and the gap grows with depth. Each model (``torch.nn.TransformerEncoder``, d_model 128, post-LN
``norm_first=False`` vs pre-LN ``norm_first=True`` with a final LayerNorm, 6 and 12 layers, an
embedding and a cross-entropy head) gets a few random batches with backward and no optimizer step,
under ``normscope.Monitor``; the plot shows, per layer, the monitor's ``grad_param_norm`` (gamma and
beta gradients) of the feed-forward-block norm ``norm2`` and, for reference, the feed-forward weight
``W^2`` gradient norm (the paper's quantity; not a norm layer, so read directly). Averaged over seeds.
The same measurement is tested in tests/test_monitor_xiong.py.

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import normscope

D, HEADS, VOCAB, BATCH, SEQ = 128, 4, 64, 8, 16


def build(layers: int, norm_first: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = torch.nn.TransformerEncoderLayer(D, HEADS, 4 * D, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = torch.nn.TransformerEncoder(block, layers, norm=torch.nn.LayerNorm(D) if norm_first else None,
                                          enable_nested_tensor=False)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, D), encoder, torch.nn.Linear(D, VOCAB))


def profile(layers: int, norm_first: bool, seed: int, batches: int):
    """Per-layer (monitor grad_param_norm of norm2, direct W^2 grad norm), averaged over ``batches``."""
    model = build(layers, norm_first, seed)
    blocks = model[1].layers
    g = torch.Generator().manual_seed(1000 + seed)
    ff = [[] for _ in range(layers)]
    with normscope.Monitor(model, every=1, flush_every=None) as mon:
        for _ in range(batches):
            x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).backward()
            for i, b in enumerate(blocks):
                ff[i].append(b.linear2.weight.grad.norm().item())
            model.zero_grad(set_to_none=True)
            mon.step()
        stats = {r["layer"]: r for r in mon.flush() if r["type"] == "layer_stats"}
    norm2 = [stats[f"1.layers.{i}.norm2"]["grad_param_norm"] for i in range(layers)]
    return norm2, [statistics.fmean(v) for v in ff]


def averaged(layers: int, norm_first: bool, seeds: int, batches: int):
    runs = [profile(layers, norm_first, s, batches) for s in range(seeds)]
    return tuple([statistics.fmean(r[k][i] for r in runs) for i in range(layers)] for k in (0, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="prenorm_vs_postnorm.png", help="PNG to write")
    parser.add_argument("--seeds", type=int, default=3, help="seeds to average over (default: 3)")
    parser.add_argument("--batches", type=int, default=4, help="batches per model (default: 4)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("This example needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    for ax, layers in zip(axes, (6, 12)):
        x = list(range(1, layers + 1))
        for norm_first, label, color in ((False, "post-LN", "tab:red"), (True, "pre-LN", "tab:blue")):
            norm2, ff = averaged(layers, norm_first, args.seeds, args.batches)
            ax.plot(x, norm2, "o-", color=color, label=f"{label}: norm2 gamma/beta grad (Monitor grad_param_norm)")
            ax.plot(x, ff, "s--", color=color, alpha=0.6, label=f"{label}: FF weight W2 grad (direct)")
            print(f"{layers} layers, {label}: last-layer norm2 grad_param_norm {norm2[-1]:.3g}, "
                  f"W2 grad {ff[-1]:.3g}")
        ax.set_yscale("log")
        ax.set_title(f"{layers} layers")
        ax.set_xlabel("layer (1 = nearest the input)")
        ax.set_xticks(x)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("gradient L2 norm at initialisation (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(f"Pre-LN vs post-LN gradient norms at initialisation (d_model {D}, mean of {args.seeds} seeds "
                 f"x {args.batches} batches)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
