"""``normscope env``: versions, CUDA, and the backend normscope would choose. Never fails."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from typing import List, Tuple

HELP = "print versions, CUDA and the backend normscope would choose"

# (label, distribution names to try, module to import if no distribution metadata is found)
_PACKAGES = (
    ("torch", ("torch",), "torch"),
    ("triton", ("triton", "pytorch-triton"), "triton"),
    ("numpy", ("numpy",), "numpy"),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "onnxruntime"),
    ("transformers", ("transformers",), "transformers"),
    ("liger_kernel", ("liger-kernel", "liger_kernel", "liger-kernel-nightly"), "liger_kernel"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help=HELP, description=HELP)
    p.set_defaults(run=run, prog=p.prog)
    return p


def _version(dists, module: str) -> str:
    """Installed version from package metadata (no import); an import only as a last resort."""
    try:
        from importlib import metadata

        for d in dists:
            try:
                return metadata.version(d)
            except metadata.PackageNotFoundError:
                continue
    except Exception:  # noqa: BLE001
        pass
    try:
        import importlib
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return "not installed"
        return str(getattr(importlib.import_module(module), "__version__", "installed (version unknown)"))
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return f"not importable ({type(e).__name__})"


def _backend(device: str) -> str:
    """``default_backend`` and ``backend_name`` for an empty tensor on ``device``."""
    try:
        import torch

        from normscope.ops import dispatch

        default = dispatch.default_backend(torch.device(device))
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"
    if device == "cuda":
        try:
            available = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            available = False
        if not available:
            return f"{default} (default; CUDA not available here)"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.empty(0, device=device)
            chosen = dispatch.backend_name(x)
    except Exception as e:  # noqa: BLE001
        msg = (str(e).splitlines() or [""])[0]
        return f"{default} (default); choosing failed: {type(e).__name__}: {msg}"
    text = f"{chosen} (default {default})" if chosen != default else chosen
    warned = [str(w.message).splitlines()[0] for w in caught if "normscope" in str(w.message)]
    if warned:
        text += f" [{warned[0]}]"
    return text


def collect() -> List[Tuple[str, str]]:
    rows: List[Tuple[str, str]] = [
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("platform", platform.platform()),
    ]
    try:
        import normscope

        rows.append(("normscope", f"{normscope.__version__} ({os.path.dirname(normscope.__file__)})"))
    except Exception as e:  # noqa: BLE001
        rows.append(("normscope", f"not importable ({type(e).__name__}: {e})"))
    for label, dists, module in _PACKAGES:
        rows.append((label, _version(dists, module)))
    try:
        import torch

        rows.append(("torch build", f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"))
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            for i in range(n):
                cap = torch.cuda.get_device_capability(i)
                rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, capability {cap[0]}.{cap[1]}"))
            rows.insert(len(rows) - n, ("CUDA available", f"yes ({n} device{'s' if n != 1 else ''})"))
        else:
            rows.append(("CUDA available", "no"))
    except Exception as e:  # noqa: BLE001
        rows.append(("CUDA available", f"unknown ({type(e).__name__}: {e})"))
    rows.append(("backend (CPU tensors)", _backend("cpu")))
    rows.append(("backend (CUDA tensors)", _backend("cuda")))
    value = os.environ.get("NORMSCOPE_BACKEND")
    rows.append(("NORMSCOPE_BACKEND", "(unset)" if value is None else repr(value)))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0
