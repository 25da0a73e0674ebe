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
from typing import Any, Callable, Iterator, Tuple

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


def load_model(spec: str) -> Tuple[Any, Any, str]:
    """``(model, example_inputs, description)`` for a factory spec or a Hugging Face directory.

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
    return load_hf_directory(spec)


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


def load_hf_directory(path: str) -> Tuple[Any, Any, str]:
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
    import torch

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
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
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache object in the outputs is not exportable
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise UsageError(f"cannot build example inputs for {path!r}: its config has no vocab_size")
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(vocab, 1000), (1, HF_SEQ_LEN), generator=gen, dtype=torch.long)
    example_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    kind = getattr(config, "model_type", None) or "unknown"
    return model, example_inputs, f"{path} ({type(model).__name__}, model_type {kind})"
