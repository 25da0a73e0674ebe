"""An LN-LSTM forecaster on a synthetic seasonal series, trained under normscope.Monitor; gradient norms across
time steps with and without layer normalization in the cell.

    python examples/ln_lstm_forecaster.py                          # writes ln_lstm_forecaster.png
    python examples/ln_lstm_forecaster.py --steps 100 --out forecast.png --jsonl monitor.jsonl

The series is a daily plus a weekly cycle (hourly samples) with noise; each model reads a window of ``--window``
steps and predicts the next value. Two models with the same sizes are trained with Adam on the same batches:
``normscope.nn.LayerNormLSTM`` (Ba et al., 2016) and ``torch.nn.LSTM``. The LN-LSTM trains under
``normscope.Monitor`` (every 10th step, findings printed at the end, records to ``--jsonl`` if given): the
Monitor sees each of the cell's norms once per time step.

The plot shows, at initialisation and after training, the norm of the gradient of the loss (on the last
prediction) with respect to the input at each time step, ``||dL/dx_t||``: how far back in the window the
training signal reaches (the vanishing / exploding gradient picture that layer normalization in the cell is
meant to improve). The same figures are printed as a table, so the example also runs without matplotlib
(``pip install matplotlib`` for the plot).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, List, Optional, Sequence

import torch

import normscope


def seasonal_series(n: int, seed: int = 0) -> torch.Tensor:
    """Hourly samples: a daily and a weekly cycle, a slow trend and noise; float32 of shape ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)
    y = (torch.sin(2 * math.pi * t / 24) + 0.5 * torch.sin(2 * math.pi * t / 168) + 0.002 * t
         + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    return ((y - y.mean()) / y.std()).float()


FEATURES = 5  # the value and the time of day and of week as (sin, cos)


def windows(series: torch.Tensor, window: int, batch: int, g: torch.Generator):
    """A random batch of (inputs ``(batch, window, FEATURES)``, next values ``(batch, 1)``).

    The inputs carry calendar features next to the value, as forecasting models usually do. (With the value
    alone, ``input_size=1``, the layer norm of the input projection would normalize its magnitude away:
    ``LN(w * x) = sign(x) * LN(w)``; the Monitor flags that as ``eps_dominated`` rows of ``ln_ih_l0``, those
    with ``x`` near 0, and the model cannot learn.)"""
    start = torch.randint(0, series.numel() - window - 1, (batch,), generator=g)
    idx = start.unsqueeze(1) + torch.arange(window + 1)
    seq = series[idx]
    t = idx[:, :window].to(torch.float32)
    day, week = 2 * math.pi * t / 24, 2 * math.pi * t / 168
    x = torch.stack([seq[:, :window], day.sin(), day.cos(), week.sin(), week.cos()], -1)
    return x, seq[:, window:]


class Forecaster(torch.nn.Module):
    def __init__(self, hidden: int, layer_norm: bool):
        super().__init__()
        rnn_cls = normscope.nn.LayerNormLSTM if layer_norm else torch.nn.LSTM
        self.rnn = rnn_cls(FEATURES, hidden, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def gradient_profile(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> List[float]:
    """``||dL/dx_t||`` for each time step ``t`` of the window (mean over the batch of the per-sequence norms)."""
    x = x.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.norm(dim=-1).mean(0).tolist()


def train(model, series, args, g, monitor: Optional[normscope.Monitor] = None) -> List[float]:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.steps):
        x, y = windows(series, args.window, args.batch, g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step()
        losses.append(loss.item())
    return losses


def run(args) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    series = seasonal_series(4000, args.seed)
    train_part, test_part = series[:3000], series[3000:]
    probe_x, probe_y = windows(test_part, args.window, 64, torch.Generator().manual_seed(123))
    result: Dict[str, object] = {"window": args.window}
    for name, ln in (("LN-LSTM", True), ("LSTM", False)):
        torch.manual_seed(args.seed)
        model = Forecaster(args.hidden, ln)
        before = gradient_profile(model, probe_x, probe_y)
        g = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
        if ln:
            sinks = [normscope.monitor.JSONLSink(args.jsonl)] if args.jsonl else []
            with normscope.Monitor(model, every=10, flush_every=50, sinks=sinks) as mon:
                losses = train(model, train_part, args, g, mon)
            result["findings"] = [f"{f.kind} [{f.layer}] step {f.step}: {f.message}" for f in mon.findings()]
        else:
            losses = train(model, train_part, args, g)
        after = gradient_profile(model, probe_x, probe_y)
        with torch.no_grad():
            test_mse = torch.nn.functional.mse_loss(model(probe_x), probe_y).item()
        result[name] = {"grad_before": before, "grad_after": after, "losses": losses, "test_mse": test_mse}
    return result


def _table(result: Dict[str, object]) -> str:
    window = int(result["window"])  # type: ignore[arg-type]
    cols = sorted({0, window // 4, window // 2, 3 * window // 4, window - 1})
    lines = ["||dL/dx_t|| at time step t (t = window - 1 is the last input)",
             f"{'model':<10} {'when':<7} " + " ".join(f"{'t=' + str(t):>10}" for t in cols) + f" {'first/last':>11}"]
    for name in ("LN-LSTM", "LSTM"):
        r = result[name]  # type: ignore[index]
        for when in ("before", "after"):
            prof = r[f"grad_{when}"]
            ratio = prof[0] / prof[-1] if prof[-1] > 0 else float("nan")
            lines.append(f"{name:<10} {when:<7} " + " ".join(f"{prof[t]:>10.3g}" for t in cols) + f" {ratio:>11.3g}")
    for name in ("LN-LSTM", "LSTM"):
        r = result[name]  # type: ignore[index]
        lines.append(f"{name}: training loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
                     f"held-out MSE {r['test_mse']:.4f}")
    return "\n".join(lines)


def plot(result: Dict[str, object], out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = {"LN-LSTM": "#1f77b4", "LSTM": "#d62728"}
    for k, when in enumerate(("before", "after")):
        for name in ("LN-LSTM", "LSTM"):
            prof = result[name][f"grad_{when}"]  # type: ignore[index]
            ax[k].semilogy(range(len(prof)), prof, label=name, color=colors[name])
        ax[k].set_title(f"{'at initialisation' if when == 'before' else 'after training'}")
        ax[k].set_xlabel("time step t of the input window")
        ax[k].grid(True, which="both", alpha=0.3)
    ax[0].set_ylabel("||dL/dx_t|| (loss on the last prediction)")
    ax[1].legend()
    fig.suptitle("How far back the gradient reaches: LN-LSTM (normscope) vs torch.nn.LSTM")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument("--window", type=int, default=48, help="input window in time steps (default 48)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ln_lstm_forecaster.png", help="the plot ('' for none)")
    p.add_argument("--jsonl", default=None, help="write the Monitor's records to this JSONL file")
    args = p.parse_args(argv)
    result = run(args)
    print(_table(result))
    findings = result.get("findings") or []
    print(f"Monitor findings on the LN-LSTM: {len(findings)}")  # type: ignore[arg-type]
    for f in findings:  # type: ignore[union-attr]
        print("  " + f)
    if args.out:
        plot(result, args.out)
    return result


if __name__ == "__main__":
    main()
