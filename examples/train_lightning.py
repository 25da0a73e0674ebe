"""Train a small LayerNorm MLP with Lightning under normscope's callback; print the findings.

    python examples/train_lightning.py                   # 40 optimizer steps, validation every 10
    python examples/train_lightning.py --nan-step 25     # a NaN enters the second block at step 25

Runs on the CPU in a few seconds. The callback numbers steps as the Trainer does
(``trainer.global_step``), counts the two batches of ``accumulate_grad_batches=2`` as one step, leaves
the validation loop out, names layers as in the user's model (``blocks.1.0``, not
``model.blocks.1.0``), and logs findings through Python logging and the trainer's loggers.
"""

from __future__ import annotations

import argparse
import logging

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # only the older package name installed
    import pytorch_lightning as pl

from normscope.integrations.lightning import NormscopeCallback


class Net(torch.nn.Module):
    def __init__(self, d=32, depth=3):
        super().__init__()
        self.inp = torch.nn.Linear(8, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d), torch.nn.GELU()) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


class Regressor(pl.LightningModule):
    def __init__(self, nan_step=None):
        super().__init__()
        self.model = Net()
        self.nan_step = nan_step
        self.model.blocks[1].register_forward_pre_hook(self._inject_nan)

    def _inject_nan(self, module, inputs):
        if self.training and self.trainer.global_step == self.nan_step:
            h = inputs[0].clone()
            h[0, 5] = float("nan")
            return (h,)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n, seed):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sin().sum(1, keepdim=True)), batch_size=16)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nan-step", type=int, default=None, help="inject a NaN at this optimizer step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    callback = NormscopeCallback(every=1, flush_every=10)
    trainer = pl.Trainer(max_steps=args.steps, accumulate_grad_batches=2, val_check_interval=20, limit_val_batches=2,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Regressor(args.nan_step), loader(2048, 0), loader(64, 1))

    print(f"\nmonitored {', '.join(x.name for x in callback.monitor.layers)}; {len(callback.findings)} findings:")
    for f in callback.findings:
        print(f"  [{f.severity}] step {f.step} {f.layer}: {f.kind}")


if __name__ == "__main__":
    main()
