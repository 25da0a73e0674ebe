"""Train a tiny Llama with the Hugging Face Trainer under normscope's callback; print the findings.

    python examples/train_hf_trainer.py                  # 40 optimizer steps, evaluation every 10
    python examples/train_hf_trainer.py --nan-step 25    # a NaN enters the second decoder layer at step 25

The model is built from a config (no download) and trained on random tokens on the CPU in a few
seconds. The callback numbers steps as the Trainer does (``state.global_step``), counts the two
micro-batches of gradient accumulation as one step, leaves evaluation out, and logs findings through
transformers' logger and ``trainer.state.log_history``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from normscope.integrations.hf import NormscopeCallback  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq=16, vocab=64, seed=0):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nan-step", type=int, default=None, help="inject a NaN at this optimizer step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    callback = NormscopeCallback(every=1, flush_every=10)

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, use_cpu=True, report_to=[], max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=10, save_strategy="no",
            logging_steps=10, learning_rate=3e-3, disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(1024),
                          eval_dataset=RandomTokens(16, seed=1), callbacks=[callback])

        def inject_nan(module, inputs):
            if module.training and trainer.state.global_step == args.nan_step:
                h = inputs[0].clone()
                h[0, 3, 5] = float("nan")
                return (h,) + inputs[1:]

        if args.nan_step is not None:
            model.model.layers[1].register_forward_pre_hook(inject_nan)
        trainer.train()

    print(f"\nmonitored {len(callback.monitor.layers)} layers; {len(callback.findings)} findings:")
    for f in callback.findings:
        print(f"  [{f.severity}] step {f.step} {f.layer}: {f.kind}")
    logged = [e for e in trainer.state.log_history if "normscope_kind" in e]
    print(f"{len(logged)} findings in trainer.state.log_history")


if __name__ == "__main__":
    main()
