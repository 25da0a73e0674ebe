"""A small zoo of config-built models (random weights, no download) for the audit and analysis tests.

Each builder returns ``(model, example_inputs)`` for a tiny configuration of one architecture family,
built from its transformers config (or, for the ConvNeXt classifier head, from plain torch modules
shaped like timm's). Every model is in eval mode and seeded, so two calls build the same weights.
:data:`ZOO` names them all, so that a test can be parametrized over the families and the zoo can grow.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

Built = Tuple[torch.nn.Module, Any]


def _ids(vocab: int, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _done(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    return model


def gpt2_config(**overrides):
    import transformers

    kw = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


def gpt2_lm(**overrides) -> Built:
    """GPT-2 with its tied ``lm_head`` (``GPT2LMHeadModel``)."""
    import transformers

    torch.manual_seed(0)
    model = _done(transformers.GPT2LMHeadModel(gpt2_config(**overrides)))
    with torch.no_grad():  # a non-trivial gamma/beta for ln_f, so that folding it changes lm_head
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0.0, 0.5)
    return model, {"input_ids": _ids(96)}


def bert_config(**overrides):
    import transformers

    kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=32)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def bert(**overrides) -> Built:
    import transformers

    torch.manual_seed(0)
    return _done(transformers.BertModel(bert_config(**overrides))), {"input_ids": _ids(96)}


def vit_config(**overrides):
    import transformers

    kw = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64)
    kw.update(overrides)
    return transformers.ViTConfig(**kw)


def vit(**overrides) -> Built:
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    return (_done(transformers.ViTModel(vit_config(**overrides), add_pooling_layer=False)),
            {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)})


def t5_config(**overrides):
    import transformers

    kw = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    kw.update(overrides)
    return transformers.T5Config(**kw)


def t5(**overrides) -> Built:
    import transformers

    torch.manual_seed(0)
    return (_done(transformers.T5Model(t5_config(**overrides))),
            {"input_ids": _ids(96), "decoder_input_ids": _ids(96, seq=4, seed=1)})


def whisper_config(**overrides):
    import transformers

    kw = dict(vocab_size=96, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
              max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0,
              bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return transformers.WhisperConfig(**kw)


def whisper(**overrides) -> Built:
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _done(transformers.WhisperModel(whisper_config(**overrides)))
    return model, {"input_features": torch.randn(1, 8, 16, generator=gen),
                   "decoder_input_ids": _ids(96, batch=1, seq=4)}


def wav2vec2_config(**overrides):
    import transformers

    kw = dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
              conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False)
    kw.update(overrides)
    return transformers.Wav2Vec2Config(**kw)


def wav2vec2(**overrides) -> Built:
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    return _done(transformers.Wav2Vec2Model(wav2vec2_config(**overrides))), {"input_values": torch.randn(
        1, 400, generator=gen)}


class LayerNorm2d(torch.nn.LayerNorm):
    """A channels-first LayerNorm as timm writes it: permute to channels-last, layer_norm, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtClassifier(torch.nn.Module):
    """transformers' ConvNeXt backbone with a timm-style head (pool, ``LayerNorm2d``, flatten, Linear)."""

    def __init__(self, config, num_classes: int = 10):
        import transformers

        super().__init__()
        self.backbone = transformers.ConvNextModel(config)
        self.backbone.layernorm = torch.nn.Identity()  # the head norm below replaces it
        c = config.hidden_sizes[-1]
        self.head = torch.nn.Module()
        self.head.norm = LayerNorm2d(c, eps=1e-6)
        self.head.fc = torch.nn.Linear(c, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.backbone(pixel_values).last_hidden_state
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.head.fc(self.head.norm(x).flatten(1))


def convnext_config(**overrides):
    import transformers

    kw = dict(num_channels=3, patch_size=4, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16)
    kw.update(overrides)
    return transformers.ConvNextConfig(**kw)


def convnext(**overrides) -> Built:
    """A freshly initialised ConvNeXt (layer scale 1e-6) with a timm-style classifier head."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ConvNeXtClassifier(convnext_config(**overrides))
    with torch.no_grad():
        model.head.norm.weight.uniform_(0.5, 1.5)
        model.head.norm.bias.normal_(0.0, 0.5)
    return model.eval(), torch.randn(2, 3, 16, 16, generator=gen)


#: name -> builder, one per architecture family.
ZOO: Dict[str, Callable[[], Built]] = {
    "gpt2": gpt2_lm, "bert": bert, "vit": vit, "t5": t5, "whisper": whisper, "wav2vec2": wav2vec2,
    "convnext": convnext,
}

#: The transformers families, with their base-model class (for ``save_pretrained`` directories).
HF_FAMILIES = ("gpt2", "bert", "vit", "t5", "whisper", "wav2vec2")


def save_hf(name: str, path, *, base: bool = True) -> str:
    """Save the ``name`` zoo model's base class (what ``AutoModel`` loads) with ``save_pretrained`` into ``path``."""
    import transformers

    builders = {"gpt2": (gpt2_config, transformers.GPT2Model), "bert": (bert_config, transformers.BertModel),
                "vit": (vit_config, transformers.ViTModel), "t5": (t5_config, transformers.T5Model),
                "whisper": (whisper_config, transformers.WhisperModel),
                "wav2vec2": (wav2vec2_config, transformers.Wav2Vec2Model)}
    config_fn, cls = builders[name]
    torch.manual_seed(0)
    cls(config_fn()).save_pretrained(str(path))
    return str(path)
