"""normscope.integrations.hf.NormscopeCallback under a real transformers Trainer (tiny Llama, CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from normscope.integrations.hf import STATE_FILE, NormscopeCallback  # noqa: E402

MAX_STEPS = 8
ACCUM = 2
NAN_STEP = 5


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.x = torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def _trainer(model, out, cb, **kw):
    args = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=MAX_STEPS, per_device_train_batch_size=2,
                gradient_accumulation_steps=ACCUM, eval_strategy="steps", eval_steps=4, save_strategy="no",
                logging_steps=1, disable_tqdm=True, learning_rate=1e-2, seed=0)
    args.update(kw)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_Tokens(64, 0),
                   eval_dataset=_Tokens(8, 1), callbacks=[cb])


def _stats(cb, layer):
    return [r for r in cb.monitor.records if r["type"] == "layer_stats" and r["layer"] == layer]


def test_nan_reported_at_the_trainers_step_and_evaluation_not_recorded(tmp_path):
    model = _model()
    cb = NormscopeCallback(every=1, flush_every=3)
    trainer = _trainer(model, tmp_path, cb)

    def inject(module, args):  # a NaN enters the second decoder layer during optimizer step NAN_STEP
        if module.training and trainer.state.global_step == NAN_STEP:
            h = args[0].clone()
            h[0, 2, 3] = float("nan")
            return (h,) + args[1:]

    model.model.layers[1].register_forward_pre_hook(inject)
    trainer.train()

    first = [f for f in cb.findings if f.kind == "nonfinite_input"]
    assert [(f.layer, f.step) for f in first] == [("model.layers.1.input_layernorm", NAN_STEP)]
    # Steps are the trainer's: windows of flush_every=3 steps over global steps 0..MAX_STEPS-1.
    norm = _stats(cb, "model.norm")
    assert [(r["window_start"], r["window_end"]) for r in norm] == [(0, 2), (3, 5), (6, 7)]
    # Two evaluations ran (on model.norm too), yet only the training forwards are recorded:
    # ACCUM micro-batches per optimizer step, counted as one step.
    assert sum("eval_loss" in e for e in trainer.state.log_history) == 2
    assert sum(r["calls"] for r in norm) == MAX_STEPS * ACCUM
    assert sum(r["steps"] for r in norm) == MAX_STEPS
    # The finding is in the trainer's log too.
    logged = [e for e in trainer.state.log_history if e.get("normscope_kind") == "nonfinite_input"]
    assert [(e["normscope_layer"], e["normscope_step"]) for e in logged] == [("model.layers.1.input_layernorm",
                                                                              NAN_STEP)]


def test_resume_from_checkpoint_continues_numbering_and_drift_reference(tmp_path):
    model = _model()
    init = model.model.norm.weight.detach().clone()
    cb = NormscopeCallback(every=1, flush_every=None)
    _trainer(model, tmp_path, cb, max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="no").train()
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file()
    at_ckpt = LlamaForCausalLM.from_pretrained(ckpt).model.norm.weight.detach()

    model2 = _model()
    cb2 = NormscopeCallback(every=1, flush_every=None)
    trainer2 = _trainer(model2, tmp_path, cb2, max_steps=6, save_strategy="no", eval_strategy="no")
    trainer2.train(resume_from_checkpoint=str(ckpt))

    (rec,) = _stats(cb2, "model.norm")
    assert (rec["window_start"], rec["window_end"], rec["steps"]) == (3, 5, 3)
    assert rec["calls"] == 3 * ACCUM
    # gamma drift is measured from the start of the first run, not from the checkpoint.
    final = model2.model.norm.weight.detach()
    assert not torch.allclose(at_ckpt, init)
    assert rec["weight_drift_l2"] == pytest.approx(torch.linalg.vector_norm(final - init).item(), rel=1e-5)
    assert rec["weight_drift_l2"] != pytest.approx(torch.linalg.vector_norm(final - at_ckpt).item(), rel=1e-3)
    assert cb2.monitor.current_step == 6


def test_callback_rejects_a_model_argument():
    with pytest.raises(TypeError, match="Monitor keyword arguments"):
        NormscopeCallback(model=torch.nn.LayerNorm(4))
