"""Building and loading a single-source C++ kernel library (``csrc/*.cpp``) with the system compiler.

The library is compiled on first use with the given flags, cached under ``$NORMSCOPE_CACHE_DIR`` or
``~/.cache/normscope`` by a hash of the source, flags, compiler and CPU (``-march=native`` output depends on
the CPU), written atomically under a file lock (several processes may build at once), and loaded with ctypes.
A library that cannot be built or loaded is reported once, with the reason, through :meth:`NativeLib.error`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

from normscope.ops import cpu_backend as _cb

__all__ = ["NativeLib", "build_library"]


def build_library(src: Path, flags: Sequence[str], stem: str) -> Path:
    """Compile ``src`` into a cached shared library; returns its path."""
    cxx, version = _cb._compiler_version()
    key = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join(flags).encode(), version.encode(),
                                     _cb._cpu_id().encode()])).hexdigest()[:20]
    cache = _cb._cache_dir()
    out = cache / f"{stem}_{key}.so"
    if out.exists():
        return out
    _cb._make_cache_dir(cache)
    with _cb._file_lock(cache / f"{stem}_{key}.lock"):
        if out.exists():
            return out
        fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=cache)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {src.name} with {cxx!r} failed (exit {proc.returncode}):\n"
                                   f"{(proc.stdout + proc.stderr).strip()[-3000:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


class NativeLib:
    """A kernel library built and loaded on first use.

    ``abi``: the value the library's ``abi_symbol()`` must return; ``declare(lib)`` sets the ctypes
    signatures.
    """

    def __init__(self, src: Path, flags: Sequence[str], stem: str, abi_symbol: str, abi: int,
                 declare: Callable[[ctypes.CDLL], None]) -> None:
        self._args = (src, tuple(flags), stem)
        self._abi_symbol, self._abi, self._declare = abi_symbol, abi, declare
        self._lock = threading.Lock()
        self._lib: Optional[ctypes.CDLL] = None
        self._error: Optional[str] = None

    def get(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or None when it cannot be built (see :meth:`error`)."""
        if self._lib is not None or self._error is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._error is None:
                try:
                    lib = ctypes.CDLL(str(build_library(*self._args)))
                    if getattr(lib, self._abi_symbol)() != self._abi:
                        raise RuntimeError(f"the kernel library {self._args[2]} has the wrong ABI version; "
                                           "delete it from the cache directory and retry")
                    self._declare(lib)
                    self._lib = lib
                except Exception as e:  # noqa: BLE001 - reported through error()
                    self._error = str(e) or type(e).__name__
        return self._lib

    @property
    def loaded(self) -> bool:
        """Whether the library is loaded (never builds it)."""
        return self._lib is not None

    def error(self) -> Optional[str]:
        """Why :meth:`get` returns None (None when the library loads)."""
        self.get()
        return self._error
