"""Backend choice: ``triton`` for CUDA tensors, ``cpu`` for CPU tensors, ``reference`` anywhere.

The environment variable ``NORMSCOPE_BACKEND`` (``triton``, ``cpu`` or ``reference``) overrides the
choice for every call; it is read at call time, so tests and benchmarks can switch it.
Backends are imported on first use, so ``import normscope`` never imports Triton.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Dict

import torch

from normscope.errors import DeviceError

BACKENDS = ("triton", "cpu", "reference")
ENV_VAR = "NORMSCOPE_BACKEND"

_loaded: Dict[str, ModuleType] = {}
_warned = set()


def requested_backend() -> str:
    """The backend named by ``NORMSCOPE_BACKEND``, or ``""`` for automatic choice."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(
            f"Expected {ENV_VAR} to be one of {', '.join(BACKENDS)} (or unset), but got {name!r}"
        )
    return name


def default_backend(device: torch.device) -> str:
    """The backend chosen automatically for tensors on ``device``."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"


def _import(name: str) -> ModuleType:
    mod = _loaded.get(name)
    if mod is None:
        if name == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "normscope's triton backend needs Triton, which is not installed: "
                    "pip install 'normscope[gpu]' (or set NORMSCOPE_BACKEND=reference)"
                ) from e
        mod = importlib.import_module(f"normscope.ops.{name}_backend" if name != "reference"
                                      else "normscope.ops.reference")
        _loaded[name] = mod
    return mod


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend_name(x: torch.Tensor) -> str:
    """Name of the backend that will run an op on ``x`` (after any documented fallback)."""
    name = requested_backend() or default_backend(x.device)
    if name == "triton":
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise DeviceError(
                "Expected CUDA tensors for the triton backend (or TRITON_INTERPRET=1 to run its "
                f"kernels on the CPU), but got a tensor on {x.device}"
            )
        if x.dtype == torch.float64:
            # The GPU kernels are written for 16- and 32-bit inputs; float64 is a checking dtype.
            return "reference"
    elif name == "cpu":
        if x.device.type != "cpu":
            raise DeviceError(f"Expected CPU tensors for the cpu backend, but got a tensor on {x.device}")
        cpu = _import("cpu")
        if not cpu.available():
            reason = getattr(cpu, "unavailable_reason", lambda: "no C++ compiler")()
            _warn_once(
                "cpu-unavailable",
                f"normscope: the fast CPU kernels could not be built ({reason}); "
                "running the slower reference backend instead",
            )
            return "reference"
    return name


def backend_for(x: torch.Tensor) -> ModuleType:
    """The backend module (with ``norm_fwd`` / ``norm_bwd``) that runs an op on ``x``."""
    return _import(backend_name(x))
