"""Model loading shared by the CLI subcommands (``normscope export``, later ``normscope audit``).

A model spec is either ``package.module:factory`` (the factory is called with no arguments and
returns ``(model, example_inputs)``) or a local Hugging Face model directory (``config.json`` plus
``*.safetensors``), loaded offline with transformers. Pickled weights (``.bin`` / ``.pt``) are never
loaded. Every problem a user can fix is raised as :class:`UsageError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

__all__ = ["UsageError", "load_model", "load_factory", "load_hf_directory", "failer"]

_TRANSFORMERS_HINT = "pip install 'normscope[dev]' (or pip install transformers)"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Sequence length of the example ``input_ids`` of a Hugging Face model.
HF_SEQ_LEN = 16


def failer(args, default_prog: str) -> Callable[..., int]:
    """``fail(message, status=2) -> status`` for a subcommand: one ``PROG: error: MESSAGE`` line on stderr,
    preceded by the traceback of the exception being handled when ``args.debug`` is set."""
    prog = getattr(args, "prog", default_prog)
    debug = getattr(args, "debug", False)

    def fail(message: str, status: int = 2) -> int:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status

    return fail


class UsageError(Exception):
    """A problem with what the user asked for; ``str(e)`` is a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _is_factory_spec(spec: str) -> bool:
    if os.path.exists(spec) or ":" not in spec:
        return False
    module, _, factory = spec.rpartition(":")
    return bool(module) and "/" not in module and os.sep not in module


def load_model(spec: str, *, example_inputs: bool = True) -> Tuple[Any, Any, str]:
    """``(model, example_inputs, description)`` for a factory spec or a Hugging Face directory.

    With ``example_inputs=False`` (the caller has its own inputs) a Hugging Face directory's inputs are not
    built from its config and are ``None``.

    Raises:
        UsageError: nonexistent path, a directory that is not a model, corrupt safetensors, an
            unknown module or factory, a factory returning the wrong thing, transformers missing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("expected MODEL to be package.module:factory or a model directory, but got ''")
    if _is_factory_spec(spec):
        return load_factory(spec)
    if not os.path.exists(spec):
        raise UsageError(f"no such file or directory: {spec!r} (MODEL is package.module:factory or a model directory)")
    if not os.path.isdir(spec):
        raise UsageError(f"{spec!r} is not a directory (MODEL is package.module:factory or a model directory)")
    return load_hf_directory(spec, example_inputs=example_inputs)


# --------------------------------------------------------------------------------------------
# package.module:factory
# --------------------------------------------------------------------------------------------


def load_factory(spec: str) -> Tuple[Any, Any, str]:
    import torch

    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"malformed factory spec {spec!r} (expected package.module:factory)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(f"unknown module {module_name!r} (not importable from sys.path)") from e
        raise UsageError(f"cannot import module {module_name!r}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise UsageError(f"cannot import module {module_name!r}: {_first_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            raise UsageError(f"unknown factory {attr!r} in module {module_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec!r} is not callable (got {type(obj).__name__})")
    try:
        result = obj()
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise UsageError(f"factory {spec!r} raised {_first_line(e)}") from e
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError(f"factory {spec!r} must return (model, example_inputs), but returned "
                         f"{type(result).__name__}")
    model, example_inputs = result
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"factory {spec!r} must return (model, example_inputs) with model a torch.nn.Module, "
                         f"but got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise UsageError(f"factory {spec!r} must return example_inputs as a tensor, tuple or dict, but got "
                         f"{type(example_inputs).__name__}")
    return model, example_inputs, f"{spec} ({type(model).__name__})"


# --------------------------------------------------------------------------------------------
# Hugging Face model directory
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_safetensors(path: str) -> None:
    """Raise UsageError unless ``path`` is a complete safetensors file (header and data sizes)."""
    import json
    import struct

    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UsageError(f"corrupt safetensors file {name!r}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise UsageError(f"corrupt or truncated safetensors file {name!r}: header of {n} bytes but the "
                                 f"file has {size} bytes")
            header = json.loads(f.read(n))
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"cannot read {name!r}: {e.strerror or e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"corrupt safetensors file {name!r}: unreadable header") from e
    if not isinstance(header, dict):
        raise UsageError(f"corrupt safetensors file {name!r}: unreadable header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise UsageError(f"corrupt safetensors file {name!r}: bad entry for tensor {key!r}") from e
    if 8 + n + end != size:
        raise UsageError(f"corrupt or truncated safetensors file {name!r}: its header describes {8 + n + end} "
                         f"bytes but the file has {size}")


def hf_example_inputs(model, config, given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Example inputs of a Hugging Face model built from its config: the model's main input (``input_ids``,
    ``pixel_values``, ``input_features`` or ``input_values``, by ``model.main_input_name``) and, for an
    encoder-decoder model, ``decoder_input_ids``; inputs already ``given`` are kept and only the missing ones
    are added.

    Raises:
        UsageError: an input the forward needs cannot be built from the config (the message names it, to be
            passed with ``--inputs``).
    """
    import inspect

    import torch

    inputs: Dict[str, Any] = dict(given or {})
    gen = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", None) or "input_ids"
    kind = getattr(config, "model_type", None) or type(model).__name__
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}

    def need(what: str) -> UsageError:
        return UsageError(f"cannot build example inputs for this {kind} model from its config ({what}); pass "
                          f"{main!r} with --inputs FILE.safetensors or .npz")

    def sub(name: str):
        value = getattr(config, name, None)
        if value is None:
            for nested in ("vision_config", "audio_config", "encoder"):
                value = getattr(getattr(config, nested, None), name, None)
                if value is not None:
                    break
        return value

    def batch() -> int:
        sizes = [v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return int(sizes[0]) if sizes else 1

    if not inputs:
        if main == "input_ids":
            vocab = sub("vocab_size")
            if not isinstance(vocab, int) or vocab < 1:
                raise need("its config has no vocab_size")
            ids = torch.randint(0, min(vocab, 1000), (1, HF_SEQ_LEN), generator=gen, dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        elif main == "pixel_values":
            size, channels = sub("image_size"), sub("num_channels") or 3
            size = size[0] if isinstance(size, (list, tuple)) else size
            if not isinstance(size, int) or size < 1:
                raise need("its config has no image_size")
            inputs = {"pixel_values": torch.randn(1, int(channels), size, size, generator=gen)}
        elif main == "input_features":
            mels, positions = sub("num_mel_bins"), sub("max_source_positions")
            if not isinstance(mels, int) or not isinstance(positions, int):
                raise need("its config has no num_mel_bins / max_source_positions")
            # Whisper's encoder takes exactly 2 * max_source_positions frames (its second conv has stride 2)
            inputs = {"input_features": torch.randn(1, mels, 2 * positions, generator=gen)}
        elif main == "input_values":
            inputs = {"input_values": torch.randn(1, 16000, generator=gen)}  # one second of 16 kHz audio
        else:
            raise need(f"its main input is {main!r}")
    if ("decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False)
            and inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None):
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "pad_token_id", None)
        if not isinstance(start, int):
            raise UsageError(f"cannot build decoder_input_ids for this {kind} model: its config has no "
                             "decoder_start_token_id; pass 'decoder_input_ids' with --inputs FILE.safetensors or .npz")
        inputs["decoder_input_ids"] = torch.full((batch(), 4), start, dtype=torch.long)
    return inputs


def load_hf_directory(path: str, *, example_inputs: bool = True) -> Tuple[Any, Any, str]:
    files = sorted(os.listdir(path))
    if "config.json" not in files:
        raise UsageError(f"{path!r} is not a model directory: no config.json (expected a Hugging Face model saved "
                         "with save_pretrained, or package.module:factory)")
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise UsageError(f"{path!r} holds only pickled weights ({', '.join(pickled[:3])}), which normscope "
                             "does not load; re-save the model with save_pretrained(..., safe_serialization=True)")
        raise UsageError(f"{path!r} is not a model directory: no *.safetensors weights")
    for w in weights:
        _check_safetensors(os.path.join(path, w))
    try:
        import transformers
    except ImportError as e:
        raise UsageError(f"loading a Hugging Face model directory needs transformers: {_TRANSFORMERS_HINT}") from e
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the CLI prints its own progress lines (none with --quiet)
    with _offline():
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot read the config of {path!r}: {_first_line(e)}") from e
        try:
            model = transformers.AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot load the model in {path!r}: {_first_line(e)}") from e
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache object in the outputs is not exportable
    kind = getattr(config, "model_type", None) or "unknown"
    inputs = hf_example_inputs(model, config) if example_inputs else None
    return model, inputs, f"{path} ({type(model).__name__}, model_type {kind})"
