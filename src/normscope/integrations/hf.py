"""The Hugging Face Trainer integration: ``Trainer(..., callbacks=[NormscopeCallback()])``.

Importing this module imports ``transformers`` (``pip install 'normscope[hf]'``).
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("normscope.integrations.hf needs transformers and accelerate: "
                      "pip install 'normscope[hf]'") from e

from normscope.integrations._common import FindingLogSink, monitor_kwargs
from normscope.monitor import Finding, Monitor

__all__ = ["NormscopeCallback", "STATE_FILE"]

#: The file, in each checkpoint folder, that holds the monitor's :meth:`~normscope.Monitor.state_dict`.
STATE_FILE = "normscope_monitor.pt"

logger = hf_logging.get_logger(__name__)


class NormscopeCallback(TrainerCallback):
    """Runs a :class:`normscope.Monitor` on the model a ``transformers.Trainer`` trains.

    Pass it as ``Trainer(..., callbacks=[NormscopeCallback(every=1)])``; the keyword arguments go to
    :class:`~normscope.Monitor`. The callback

    * creates the monitor on train begin, on the trainer's (unwrapped) model;
    * numbers steps as the trainer does: a step is recorded under ``state.global_step`` as it is while
      the step's forward and backward run, so a NaN that enters at ``global_step == K`` is reported at
      step ``K`` (the trainer's own log line for that step, written after it, carries ``K + 1``);
      ``step(step=state.global_step)`` ends it in ``on_step_end``, after the optimizer step, so the
      micro-batches of gradient accumulation belong to one step;
    * pauses the monitor while the model is in eval mode (``evaluate``, ``predict``, ``eval_on_start``):
      evaluation adds no records and does not advance steps;
    * logs each finding with ``transformers``' logger (level by severity) and appends it to
      ``state.log_history`` (keys ``normscope_*``, ``step`` = the global step at which it was
      reported), as well as sending it to the monitor's sinks;
    * saves the monitor's state in each checkpoint folder (:data:`STATE_FILE`) and, when training
      resumes from a checkpoint, numbers steps from its ``global_step`` and restores the state (drift
      references, findings) from ``<output_dir>/checkpoint-<global_step>`` or
      ``args.resume_from_checkpoint`` when the file is there;
    * closes the monitor (a last flush) on train end; :attr:`monitor` stays readable.

    Args:
        **monitor_kwargs: keyword arguments of :class:`normscope.Monitor` (``every``, ``sinks``,
            ``flush_every``, ``thresholds``, ...).
    """

    def __init__(self, **monitor_kwargs):
        if "model" in monitor_kwargs:
            raise TypeError("Expected Monitor keyword arguments only, but got model=: the callback monitors the "
                            "model the Trainer trains")
        self._kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self._state = None
        self._model: Optional[torch.nn.Module] = None
        self._hook = None
        self._eval_paused = False

    @property
    def findings(self) -> List[Finding]:
        """The monitor's findings so far (flushes an open monitor); empty before training."""
        return [] if self.monitor is None else self.monitor.findings()

    # --- trainer events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("Expected the Trainer to pass its model to the callback, but got model=None")
        self._close()
        self._state = state
        self._model = model
        sink = FindingLogSink(logger, self._report)
        self.monitor = Monitor(model, **monitor_kwargs(self._kwargs, sink))
        if state.global_step > 0:  # resumed from a checkpoint
            saved = self._saved_state(args, state)
            if saved is not None and saved.get("step") == state.global_step:
                self.monitor.load_state_dict(saved)
            else:
                self.monitor.step(step=state.global_step)
        self._hook = model.register_forward_pre_hook(self._gate)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        self._state = state
        self._resume_training()
        if state.global_step > self.monitor.current_step:
            self.monitor.step(step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self._state = state
        self._close()

    # --- internals -----------------------------------------------------------------------------------------

    def _gate(self, module, args):
        """Forward pre-hook of the trained model: pause the monitor in eval mode, resume in train mode."""
        if module.training:
            self._resume_training()
        elif not self._eval_paused and self.monitor is not None:
            self.monitor.pause()
            self._eval_paused = True

    def _resume_training(self) -> None:
        if self._eval_paused:
            self._eval_paused = False
            self.monitor.resume()

    def _report(self, findings: List[dict]) -> None:
        state = self._state
        if state is not None:
            state.log_history.extend({**{f"normscope_{k}": v for k, v in r.items() if k != "type"},
                                      "step": state.global_step} for r in findings)

    @staticmethod
    def _saved_state(args, state) -> Optional[dict]:
        folders = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
        return None

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self._resume_training()
            self.monitor.close()
