"""normscope.integrations.lightning.NormscopeCallback under a real Lightning Trainer (tiny model, CPU)."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from normscope.integrations.lightning import NormscopeCallback

MAX_STEPS = 8
ACCUM = 2
NAN_STEP = 5


class Net(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = torch.nn.Linear(4, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d), torch.nn.GELU()) for _ in range(2))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = Net()
        self.loss_fn = torch.nn.MSELoss()
        self.nan_at = None  # inject a NaN into the second block's input at this global step

        def inject(module, args):
            if self.training and self.trainer.global_step == self.nan_at:
                h = args[0].clone()
                h[0, 3] = float("nan")
                return (h,)

        self.model.blocks[1].register_forward_pre_hook(inject)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n, seed):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, cb, max_steps=MAX_STEPS, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=max_steps, accumulate_grad_batches=ACCUM, val_check_interval=8, limit_val_batches=2,
                      num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, default_root_dir=str(tmp_path), callbacks=[cb], **kw)


def _stats(cb, layer):
    return [r for r in cb.monitor.records if r["type"] == "layer_stats" and r["layer"] == layer]


def test_nan_reported_at_the_trainers_step_and_validation_not_recorded(tmp_path, caplog):
    torch.manual_seed(0)
    module = Regressor()
    module.nan_at = NAN_STEP
    cb = NormscopeCallback(every=1, flush_every=3)
    trainer = _trainer(tmp_path, cb, logger=CSVLogger(str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="normscope.integrations.lightning"):
        trainer.fit(module, _loader(64, 0), _loader(8, 1))

    # Names as in the user's model (no "model." of the LightningModule's attribute).
    assert [x.name for x in cb.monitor.layers] == ["blocks.0.0", "blocks.1.0", "norm"]
    first = [f for f in cb.findings if f.kind == "nonfinite_input"]
    assert [(f.layer, f.step) for f in first] == [("blocks.1.0", NAN_STEP)]
    norm = _stats(cb, "norm")
    assert [(r["window_start"], r["window_end"]) for r in norm] == [(0, 2), (3, 5), (6, 7)]
    # The sanity check and two validation passes ran through model.norm; only training is recorded.
    assert sum(r["calls"] for r in norm) == MAX_STEPS * ACCUM
    assert sum(r["steps"] for r in norm) == MAX_STEPS
    # Reported through Python logging and the trainer's logger.
    assert any("blocks.1.0 at step 5" in r.getMessage() for r in caplog.records)
    trainer.logger.save()
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert "normscope/errors" in header


def _plain_trainer(tmp_path, callbacks):
    return pl.Trainer(max_steps=6, accumulate_grad_batches=ACCUM, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      default_root_dir=str(tmp_path), callbacks=callbacks)


def test_resume_from_checkpoint_continues_numbering_and_drift_reference(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    init = module.model.norm.weight.detach().clone()
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    _plain_trainer(tmp_path, [NormscopeCallback(every=1, flush_every=None), ckpt_cb]).fit(module, _loader(64, 0))
    (path,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=3" in p.name]
    at_ckpt = torch.load(path, weights_only=True)["state_dict"]["model.norm.weight"]
    assert not torch.allclose(at_ckpt, init)

    torch.manual_seed(1)
    module2 = Regressor()
    cb2 = NormscopeCallback(every=1, flush_every=None)
    _plain_trainer(tmp_path, [cb2]).fit(module2, _loader(64, 0), ckpt_path=str(path))

    (rec,) = _stats(cb2, "norm")
    assert (rec["window_start"], rec["window_end"], rec["steps"], rec["calls"]) == (3, 5, 3, 3 * ACCUM)
    # gamma drift is measured from the start of the first run, not from the checkpoint.
    final = module2.model.norm.weight.detach()
    assert rec["weight_drift_l2"] == pytest.approx(torch.linalg.vector_norm(final - init).item(), rel=1e-5)
    assert rec["weight_drift_l2"] != pytest.approx(torch.linalg.vector_norm(final - at_ckpt).item(), rel=1e-3)
    assert cb2.monitor.current_step == 6


def test_model_attr_none_keeps_the_lightning_module_names():
    cb = NormscopeCallback(model_attr=None, every=1)
    trainer = pl.Trainer(max_steps=1, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(Regressor(), _loader(8, 0))
    assert [x.name for x in cb.monitor.layers] == ["model.blocks.0.0", "model.blocks.1.0", "model.norm"]
    with pytest.raises(TypeError, match="model_attr"):
        NormscopeCallback(strip_prefix="model")
