"""The Lightning integration: ``Trainer(..., callbacks=[NormscopeCallback()])``.

Importing this module imports ``lightning.pytorch`` or, where only that is installed,
``pytorch_lightning`` (``pip install 'normscope[lightning]'``). Where both are installed the callback
is a ``Callback`` of both, so either package's ``Trainer`` accepts it.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

_bases = []
try:
    import lightning.pytorch as _pl

    _bases.append(_pl.Callback)
except ImportError:
    pass
try:
    import pytorch_lightning as _ptl

    _bases.append(_ptl.Callback)
except ImportError:
    pass
if not _bases:
    raise ImportError("normscope.integrations.lightning needs Lightning (lightning.pytorch or pytorch_lightning): "
                      "pip install 'normscope[lightning]'")

from normscope.integrations._common import FindingLogSink, monitor_kwargs  # noqa: E402
from normscope.monitor import Finding, Monitor  # noqa: E402

__all__ = ["NormscopeCallback"]

logger = logging.getLogger(__name__)


class NormscopeCallback(*_bases):
    """Runs a :class:`normscope.Monitor` on the LightningModule a Lightning ``Trainer`` fits.

    Pass it as ``Trainer(..., callbacks=[NormscopeCallback(every=1)])``; the keyword arguments go to
    :class:`~normscope.Monitor`. The callback

    * creates the monitor on train start, on the LightningModule, with the attribute that holds the
      user's model stripped from the layer names (``model_attr``);
    * numbers steps as the trainer does: a step is recorded under ``trainer.global_step`` as it is
      while the step's forward and backward run, and ends in ``on_train_batch_end`` once the optimizer
      stepped (``global_step`` grew), so the batches of ``accumulate_grad_batches`` belong to one step;
    * pauses the monitor during the validation loop (``on_validation_start`` / ``on_validation_end``);
      the sanity check runs before the monitor exists;
    * logs each finding with Python logging (logger ``normscope.integrations.lightning``, level by
      severity) and the running counts ``normscope/findings`` and ``normscope/errors`` to each of the
      trainer's loggers (at ``trainer.global_step``), as well as sending it to the monitor's sinks;
    * stores the monitor's :meth:`~normscope.Monitor.state_dict` in checkpoints (the callback's
      state) and, when ``fit(ckpt_path=...)`` resumes, restores it and numbers steps from the
      checkpoint's ``global_step``;
    * closes the monitor (a last flush) on train end; :attr:`monitor` stays readable.

    Args:
        model_attr: the attribute of the LightningModule that holds the user's model, stripped from
            the front of layer names (``model.layers.0.norm`` instead of ``model.model.layers.0.norm``
            for a module with ``self.model = ...``). ``"auto"``: ``"model"`` when the LightningModule
            has a child module of that name; None: names as in the LightningModule. Default: ``"auto"``.
        **monitor_kwargs: keyword arguments of :class:`normscope.Monitor` (``every``, ``sinks``,
            ``flush_every``, ``thresholds``, ...).
    """

    def __init__(self, model_attr: Optional[str] = "auto", **monitor_kwargs):
        if "model" in monitor_kwargs:
            raise TypeError("Expected Monitor keyword arguments only, but got model=: the callback monitors the "
                            "LightningModule the Trainer fits")
        if "strip_prefix" in monitor_kwargs:
            raise TypeError("Expected model_attr instead of strip_prefix, but got strip_prefix=")
        if model_attr is not None and not isinstance(model_attr, str):
            raise TypeError(f"Expected model_attr to be a str or None, but got {type(model_attr).__name__}")
        self._model_attr = model_attr
        self._kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self._restored: Optional[dict] = None
        self._trainer = None
        self._counts = [0, 0]  # findings, errors
        self._open = False

    @property
    def findings(self) -> List[Finding]:
        """The monitor's findings so far (flushes an open monitor); empty before training."""
        return [] if self.monitor is None else self.monitor.findings()

    # --- trainer hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module):
        self._close()
        self._trainer = trainer
        attr = self._model_attr
        if attr == "auto":
            attr = "model" if isinstance(pl_module._modules.get("model"), torch.nn.Module) else None
        sink = FindingLogSink(logger, self._report)
        self.monitor = Monitor(pl_module, strip_prefix=attr, **monitor_kwargs(self._kwargs, sink))
        if self._restored is not None:
            self.monitor.load_state_dict(self._restored)
            self._restored = None
        if trainer.global_step > self.monitor.current_step:
            self.monitor.step(step=trainer.global_step)
        self._open = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._open and trainer.global_step > self.monitor.current_step:
            self.monitor.step(step=trainer.global_step)

    def on_validation_start(self, trainer, pl_module):
        if self._open:
            self.monitor.pause()

    def on_validation_end(self, trainer, pl_module):
        if self._open and self.monitor.is_paused:
            self.monitor.resume()

    def on_train_end(self, trainer, pl_module):
        self._close()

    def state_dict(self) -> dict:
        if self.monitor is None:
            return {}
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("monitor")

    # --- internals -----------------------------------------------------------------------------------------

    def _close(self) -> None:
        if self._open:
            self._open = False
            while self.monitor.is_paused:
                self.monitor.resume()
            self.monitor.close()

    def _report(self, findings: List[dict]) -> None:
        self._counts[0] += len(findings)
        self._counts[1] += sum(r["severity"] == "error" for r in findings)
        trainer = self._trainer
        if trainer is None:
            return
        metrics = {"normscope/findings": float(self._counts[0]), "normscope/errors": float(self._counts[1])}
        for lg in getattr(trainer, "loggers", []):
            lg.log_metrics(metrics, step=trainer.global_step)

