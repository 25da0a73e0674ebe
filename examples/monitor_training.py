"""Train a small transformer on random data under normscope.Monitor; print its findings, write JSONL.

    python examples/monitor_training.py                      # 60 steps, writes monitor_run.jsonl
    python examples/monitor_training.py --nan-step 40        # also inject a NaN at step 40
    python examples/monitor_training.py --out /tmp/run.jsonl --steps 200 --every 4

Part of each batch is padding (all-zero embeddings), which makes the first norm see rows of zero
variance: the monitor reports them as eps-dominated. With ``--nan-step`` one hidden state of one sample
becomes NaN on its way into the third block, and the monitor names the layer and step where it first
appeared.
"""

from __future__ import annotations

import argparse

import torch

import normscope
from normscope.monitor import JSONLSink, load


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=64, d=32, layers=4, heads=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d, padding_idx=0)
        block = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = normscope.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.embed(tokens))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=1, help="sample one step in this many")
    parser.add_argument("--flush-every", type=int, default=20)
    parser.add_argument("--nan-step", type=int, default=None, help="inject a NaN at this step")
    parser.add_argument("--out", default="monitor_run.jsonl", help="JSONL file to write")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def inject_nan(module, inputs):
        if mon.current_step == args.nan_step:
            x = inputs[0].clone()
            x[0, 3, 5] = float("nan")
            return (x,) + inputs[1:]

    if args.nan_step is not None:
        model.encoder.layers[2].register_forward_pre_hook(inject_nan)

    with normscope.Monitor(model, every=args.every, flush_every=args.flush_every,
                           sinks=[JSONLSink(args.out)]) as mon:
        print(f"monitoring {len(mon.layers)} layers: {', '.join(x.name for x in mon.layers)}")
        for step in range(args.steps):
            tokens = torch.randint(1, 64, (8, 16))
            tokens[:, 12:] = 0  # padding: zero embeddings, zero-variance rows in the first norm
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step()

    print(f"\n{len(mon.findings())} findings:")
    for f in mon.findings():
        print(f"  [{f.severity}] {f.message}")

    rows = load(args.out, type="layer_stats")
    last = max(r["window_end"] for r in rows)
    print(f"\nlast window (steps up to {last}), from {args.out}:")
    print(f"  {'layer':28} {'var p50':>9} {'var p99':>9} {'eps rows':>8} {'NaN in':>7} {'|grad in|':>10}")
    for r in rows:
        if r["window_end"] == last:
            g = r["grad_input_norm"]
            print(f"  {r['layer']:28} {r['var_p50']:9.3g} {r['var_p99']:9.3g} {r['eps_rows']:8d} {r['nan_in']:7d} "
                  f"{g if g is None else format(g, '10.3g')}")


if __name__ == "__main__":
    main()
