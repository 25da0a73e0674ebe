"""CPU backend: C++ LayerNorm / RMSNorm kernels built with the system compiler on first use.

The kernels live in ``csrc/norm_cpu.cpp`` (no torch headers). On the first call of
:func:`available` / :func:`norm_fwd` / :func:`norm_bwd` the source is compiled with
``c++ -O3 -march=native -fopenmp -fno-math-errno -fPIC`` -- as two parts in parallel (float and double
accumulation), linked with ``-shared``; a few seconds on two idle cores -- into a cache directory --
``$NORMSCOPE_CACHE_DIR``, else ``~/.cache/normscope`` -- under a name that hashes the source, the
flags, the compiler version and the CPU; it is written to a temporary file and renamed, so
concurrent processes never load a half-written library. It is loaded with :mod:`ctypes` (which
releases the GIL during calls). Nothing is compiled at import time. ``$CXX`` picks the compiler.
If there is none or the build fails, :func:`available` is False, :func:`unavailable_reason` says
why, and the contract functions raise :class:`RuntimeError`; there is no slow fallback here (the
dispatcher decides).

:func:`norm_fwd` / :func:`norm_bwd` implement the contract of :mod:`normscope.ops.reference`
(shifted two-pass statistics in float32, float64 for float64 problems), for every dtype
combination. Results are bitwise reproducible and independent of the number of threads
(``torch.get_num_threads()``, used for the OpenMP row loop): each row is reduced in a fixed order,
and dw / db are summed per chunk of rows fixed by ``(M, N)``, then over chunks in order.

Tuning knobs (environment, read at import): ``NORMSCOPE_CPU_STREAM_BYTES`` -- outputs of at least
this many bytes (default 16 MiB) are written with non-temporal stores, which skip reading the
destination into the cache; ``NORMSCOPE_CPU_PREFETCH=0`` turns off prefetching the next row;
``NORMSCOPE_CPU_SMALL_ROWS=0`` turns off the straight-line path for rows of up to 256 elements.
None of them changes any result.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from array import array
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

__all__ = ["available", "unavailable_reason", "library_path", "norm_fwd", "norm_bwd"]

_SRC = Path(__file__).resolve().parent / "csrc" / "norm_cpu.cpp"
# -fno-math-errno: sqrt never sets errno, so it vectorizes (the values are IEEE sqrt either way).
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-fPIC", "-fno-math-errno")
_LINK_FLAGS = ("-shared", "-fopenmp")
# The source is compiled as two parts in parallel (float / double accumulation), then linked.
_PARTS = (0, 1)
_ABI_VERSION = 5

_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_DTYPE_NAMES = "float32, float64, bfloat16 or float16"

# Below this many elements a call runs on one thread (thread start-up would dominate).
_PARALLEL_MIN_ELEMS = 1 << 15
# dw / db partials: at most this many row chunks and this many partial elements (K * N).
_MAX_CHUNKS = 64
_MAX_PARTIAL_ELEMS = 1 << 22
# Outputs of at least this many bytes are written with non-temporal (streaming) stores.
_STREAM_MIN_BYTES = int(os.environ.get("NORMSCOPE_CPU_STREAM_BYTES", 16 << 20))
_PREFETCH = os.environ.get("NORMSCOPE_CPU_PREFETCH", "1") != "0"
# Rows of up to 256 elements (plain, unmasked, one dtype) take a straight-line path with bitwise
# the same results; NORMSCOPE_CPU_SMALL_ROWS=0 turns it off.
_SMALL_ROWS = os.environ.get("NORMSCOPE_CPU_SMALL_ROWS", "1") != "0"

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_error: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------


def _compiler() -> str:
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return "c++"


def _cache_dir() -> Path:
    env = os.environ.get("NORMSCOPE_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "normscope"


def _cpu_id() -> str:
    # -march=native output depends on the CPU: a cache directory shared between different machines
    # must not hand one machine's build to another.
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    ident += line
                if ident.count("\n") >= 2:
                    break
    except OSError:
        pass
    return ident


def _compiler_version() -> Tuple[str, str]:
    """``(compiler, its --version text)``; RuntimeError naming the fix when there is none or it does not run."""
    cxx = _compiler()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except FileNotFoundError:
        raise RuntimeError(
            f"no C++ compiler found (tried {cxx!r}); install g++ (e.g. `apt install g++`) or set "
            "CXX to a C++17 compiler with OpenMP support"
        ) from None
    except (subprocess.SubprocessError, OSError) as e:
        raise RuntimeError(f"the C++ compiler {cxx!r} does not run ({e}); set CXX to a working one")
    return cxx, version


def _make_cache_dir(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(
            f"cannot create the kernel cache directory {cache} ({e}); set NORMSCOPE_CACHE_DIR to "
            "a writable directory"
        ) from None


def _build() -> Path:
    cxx, version = _compiler_version()
    src = _SRC.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [src, " ".join(_FLAGS + _LINK_FLAGS).encode(), version.encode(), _cpu_id().encode()]
        )
    ).hexdigest()[:20]
    cache = _cache_dir()
    out = cache / f"norm_cpu_{key}.so"
    if out.exists():
        return out
    _make_cache_dir(cache)
    # One process compiles while the others wait for it (pytest-xdist, several ranks), and it
    # compiles to a private temporary file that is then renamed: nobody loads a half-written file.
    with _file_lock(cache / f"norm_cpu_{key}.lock"):
        if out.exists():
            return out
        try:
            fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=cache)
        except OSError as e:
            raise RuntimeError(
                f"cannot write to the kernel cache directory {cache} ({e}); set "
                "NORMSCOPE_CACHE_DIR to a writable directory"
            ) from None
        os.close(fd)
        objs = [f"{tmp}.{part}.o" for part in _PARTS]
        try:
            _compile(cxx, objs, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            for path in (tmp, *objs):
                if os.path.exists(path):
                    os.unlink(path)
    return out


def _compile(cxx: str, objs, target: str) -> None:
    """Compiles the parts of the source into ``objs`` in parallel, then links them to ``target``."""

    def fail(what: str, proc: subprocess.Popen, output: str) -> RuntimeError:
        return RuntimeError(
            f"{what} {_SRC.name} with {cxx!r} failed (exit {proc.returncode}):\n"
            f"{output.strip()[-3000:]}\nInstall g++ >= 9 with OpenMP support or set CXX to one"
        )

    procs = [
        subprocess.Popen(
            [cxx, *_FLAGS, f"-DNS_PART={part}", "-c", str(_SRC), "-o", obj],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for part, obj in zip(_PARTS, objs)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiling {_SRC.name} with {cxx!r} timed out") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(procs, outputs):
        if p.returncode != 0:
            raise fail("compiling", p, output)
    link = subprocess.Popen(
        [cxx, *_LINK_FLAGS, *objs, "-o", target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = link.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        link.kill()
        link.wait()
        raise RuntimeError(f"linking {_SRC.name} with {cxx!r} timed out") from None
    if link.returncode != 0:
        raise fail("linking", link, output)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (no lock where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the temporary file + rename still keeps loads safe
        yield
        return
    try:
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.ns_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has the wrong ABI version; delete it and retry")
    lib.ns_fwd.restype = ctypes.c_int
    lib.ns_fwd.argtypes = [ctypes.c_void_p, ctypes.c_double]
    lib.ns_bwd.restype = ctypes.c_int
    lib.ns_bwd.argtypes = [ctypes.c_void_p]
    return lib


def _get_lib() -> Optional[ctypes.CDLL]:
    global _lib, _lib_path, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                path = _build()
                _lib = _load(path)
                _lib_path = path
            except Exception as e:  # noqa: BLE001 - reported through available() / norm_fwd
                _error = str(e) or type(e).__name__
    return _lib


def available() -> bool:
    """Whether the C++ kernels are usable (builds them on the first call, a few seconds)."""
    return _get_lib() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    _get_lib()
    return _error or ""


def library_path() -> Optional[str]:
    """Path of the loaded kernel library (None when not built)."""
    _get_lib()
    return str(_lib_path) if _lib_path is not None else None


def _require() -> ctypes.CDLL:
    lib = _get_lib()
    if lib is None:
        raise RuntimeError(f"normscope's CPU kernels are unavailable: {_error}")
    return lib


# --------------------------------------------------------------------------------------------
# Argument checks and helpers
# --------------------------------------------------------------------------------------------


def _check_2d(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"Expected {name} on the CPU, but got a tensor on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"Expected {name} to be 2-D (M, N), but got shape {tuple(t.shape)}")


def _code(t: torch.Tensor, name: str) -> int:
    code = _CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"Expected {name} of dtype {_DTYPE_NAMES}, but got {t.dtype}")
    return code


def _check_like(t, name: str, shape: torch.Size, ref: str) -> None:
    _check_2d(t, name)
    if t.shape != shape:
        raise ValueError(
            f"Expected {name} of the same shape as {ref} {tuple(shape)}, but got {tuple(t.shape)}"
        )


def _param(t, name: str, n: int, acc: torch.dtype, offset: float = 0.0) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor or None, but got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"Expected {name} on the CPU, but got a tensor on {t.device}")
    if not t.is_floating_point():
        raise TypeError(f"Expected {name} of a floating dtype, but got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"Expected {name} of shape ({n},), but got {tuple(t.shape)}")
    if t.dtype != acc or not t.is_contiguous():
        t = t.to(acc).contiguous()
    if offset != 0.0:
        # Gemma's ``weight.float() + 1``: the offset is added in the accumulation dtype, never in
        # the weight's own (bfloat16 would round it).
        t = t + offset
    return t


def _mask(mask, shape: torch.Size) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    _check_like(mask, "mask", shape, "x")
    if mask.dtype != torch.bool:
        raise TypeError(f"Expected mask of dtype torch.bool, but got {mask.dtype}")
    return mask.contiguous()


def _stat(t, name: str, m: int, acc: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    if t.numel() != m or t.dim() > 2 or (t.dim() == 2 and t.shape[1] != 1):
        raise ValueError(f"Expected {name} of shape ({m},), but got {tuple(t.shape)}")
    return t.reshape(m).to(acc).contiguous()


# Read-only ones / zeros standing in for an absent weight / bias (x * 1 and x + 0 are exact).
_consts: Dict[Tuple[int, torch.dtype, float], torch.Tensor] = {}


def _const(n: int, acc: torch.dtype, value: float) -> torch.Tensor:
    key = (n, acc, value)
    t = _consts.get(key)
    if t is None:
        t = torch.full((n,), value, dtype=acc)
        if len(_consts) > 64:
            _consts.clear()
        _consts[key] = t
    return t


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _threads(m: int, n: int) -> int:
    return max(1, torch.get_num_threads()) if m * n >= _PARALLEL_MIN_ELEMS and m > 1 else 1


def _flags(nbytes: int) -> int:
    # bit 0: non-temporal stores, for outputs larger than the caches could keep for the consumer;
    # bit 1: prefetch the next row; bit 2: no small-row path.
    return (1 if nbytes >= _STREAM_MIN_BYTES else 0) | (2 if _PREFETCH else 0) | (0 if _SMALL_ROWS else 4)


def _rows_per_chunk(m: int, n: int) -> int:
    # A function of (M, N) only, so dw / db do not depend on the thread count. At most 64 chunks
    # (enough to share among threads), at least 8 rows each (the partials stay below 1/8 of dx)
    # and at most 2**22 partial elements.
    chunks = max(1, min(_MAX_CHUNKS, m // 8, _MAX_PARTIAL_ELEMS // max(n, 1)))
    return -(-m // chunks)


# --------------------------------------------------------------------------------------------
# The backend contract
# --------------------------------------------------------------------------------------------


def norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    rms: bool,
    h_dtype: Optional[torch.dtype] = None,
    *,
    offset: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """See :func:`normscope.ops.reference.norm_fwd`."""
    _check_2d(x, "x")
    tx = _code(x, "x")
    shape = x.shape
    m, n = shape
    tr = 0
    if residual is not None:
        _check_like(residual, "residual", shape, "x")
        tr = _code(residual, "residual")
        if h_dtype is None:
            h_dtype = torch.promote_types(x.dtype, residual.dtype)
        elif h_dtype not in _CODES:
            raise TypeError(f"Expected h_dtype of {_DTYPE_NAMES}, but got {h_dtype}")
    mask = _mask(mask, shape)
    acc64 = tx == 1 or (residual is not None and tr == 1)
    acc = torch.float64 if acc64 else torch.float32
    w = _param(weight, "weight", n, acc, offset)
    b = _param(bias, "bias", n, acc)
    lib = _require()

    y = torch.empty(shape, dtype=x.dtype)
    h = torch.empty(shape, dtype=h_dtype) if residual is not None else None
    rstd = torch.empty((m,), dtype=acc)
    mean = None if rms else torch.empty((m,), dtype=acc)
    if m == 0:
        return y, h, mean, rstd
    if n == 0:
        # Statistics of empty rows, as in the reference: NaN, or 0 with a mask (no valid element).
        fill = 0.0 if mask is not None else float("nan")
        rstd.fill_(fill)
        if mean is not None:
            mean.fill_(fill)
        return y, h, mean, rstd
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
        tin, inp = _CODES[h_dtype], h
        out_bytes = y.nbytes + h.nbytes
    else:
        tin, inp = tx, x
        out_bytes = y.nbytes
    if w is None:
        w = _const(n, acc, 1.0)
    if b is None:
        b = _const(n, acc, 0.0)
    args = array(
        "q",
        (
            tin, tx, tx, tr, int(acc64), inp.data_ptr(), x.data_ptr(), _ptr(residual), _ptr(mask),
            w.data_ptr(), b.data_ptr(), y.data_ptr(), _ptr(mean), rstd.data_ptr(), m, n,
            int(bool(rms)), _flags(out_bytes), _threads(m, n),
        ),
    )
    rc = lib.ns_fwd(args.buffer_info()[0], float(eps))
    if rc != 0:
        raise RuntimeError(f"normscope cpu norm_fwd failed (code {rc})")
    return y, h, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    xn: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    rms: bool,
    has_bias: bool,
    dx_dtype: torch.dtype,
    *,
    offset: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """See :func:`normscope.ops.reference.norm_bwd`."""
    _check_2d(xn, "xn")
    txn = _code(xn, "xn")
    shape = xn.shape
    m, n = shape
    _check_like(dy, "dy", shape, "xn")
    tdy = _code(dy, "dy")
    tdh = 0
    if dh is not None:
        _check_like(dh, "dh", shape, "xn")
        tdh = _code(dh, "dh")
    tdx = _CODES.get(dx_dtype)
    if tdx is None:
        raise TypeError(f"Expected dx_dtype of {_DTYPE_NAMES}, but got {dx_dtype}")
    mask = _mask(mask, shape)
    acc64 = txn == 1 or tdy == 1
    acc = torch.float64 if acc64 else torch.float32
    w = _param(weight, "weight", n, acc, offset)
    rstd = _stat(rstd, "rstd", m, acc)
    # The centering is recomputed from ``xn`` exactly as forward did it; forward's ``mean`` (LayerNorm)
    # lets the kernels take the backward's two sums in the same sweep (see bwd_sums3 in the C++). A mean
    # that is not forward's gives the same result through one more sweep; none is fine too.
    mu = None
    if not rms and isinstance(mean, torch.Tensor) and mean.numel() == m:
        mu = mean.reshape(m).to(acc).contiguous()
    lib = _require()

    dx = torch.empty(shape, dtype=dx_dtype)
    dw = torch.empty((n,), dtype=acc) if w is not None else None
    db = torch.empty((n,), dtype=acc) if has_bias else None
    if m == 0 or n == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    r = _rows_per_chunk(m, n)
    k = -(-m // r)
    pw = torch.empty((k, n), dtype=acc) if dw is not None else None
    pb = torch.empty((k, n), dtype=acc) if db is not None else None
    dy = dy.contiguous()
    xn = xn.contiguous()
    if dh is not None:
        dh = dh.contiguous()
    args = array(
        "q",
        (
            tdy, txn, tdh, tdx, int(acc64), dy.data_ptr(), _ptr(dh), xn.data_ptr(), _ptr(mask),
            (w if w is not None else _const(n, acc, 1.0)).data_ptr(),
            _ptr(mu), rstd.data_ptr(), dx.data_ptr(), _ptr(pw), _ptr(pb),
            _ptr(dw), _ptr(db), m, n, r, int(bool(rms)), _flags(dx.nbytes), _threads(m, n),
        ),
    )
    rc = lib.ns_bwd(args.buffer_info()[0])
    if rc != 0:
        raise RuntimeError(f"normscope cpu norm_bwd failed (code {rc})")
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Monitor statistics (used by normscope.monitor on CPU tensors)
# --------------------------------------------------------------------------------------------

_monitor_fns: Optional[Tuple[object, object]] = None


def _monitor_lib() -> Tuple[object, object]:
    global _monitor_fns
    if _monitor_fns is None:
        lib = _require()
        stats, grad = lib.ns_monitor_stats, lib.ns_monitor_grad
        stats.restype = ctypes.c_int
        stats.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        grad.restype = ctypes.c_int
        grad.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
        _monitor_fns = (stats, grad)
    return _monitor_fns


def _check_f64_block(t, name: str, n: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    if t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"Expected {name} to be a contiguous float64 CPU tensor of {n} elements, but got "
                         f"{t.dtype} on {t.device} with shape {tuple(t.shape)}")


def monitor_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    sums: torch.Tensor,
    maxima: torch.Tensor,
    var_hist: torch.Tensor,
    in_hist: torch.Tensor,
    var_edges: torch.Tensor,
    *,
    start: int,
    stride: int,
    rms: bool,
    eps_threshold: float,
    hist_row_step: int,
    hist_range: Tuple[float, float],
    keys: Tuple[float, float, float],
) -> None:
    """Accumulate one monitored call's statistics into float64 accumulators, in place (one pass per row).

    ``x`` (a norm layer's input) and ``y`` (its output) are 2-D ``(rows, cols)`` CPU tensors of the
    same shape, of dtype float32, float64, bfloat16 or float16 (each its own). Rows
    ``start, start + stride, ...`` are sampled. Adds into ``sums`` (11 values: valid rows, sums of
    row means and variances, eps-dominated rows, NaN/Inf counts of x and y over every element,
    then the finite outputs of the sampled rows as a (count, mean, M2) triple, merged by Chan et al.'s
    parallel formula), raises ``maxima`` (7 values:
    max row mean, max row variance, -min row mean, -min row variance, then the three event keys
    ``keys`` = (input non-finite, output non-finite, eps-dominated), each where its event happened),
    and counts into ``var_hist`` (``len(var_edges) + 2``: ``bucketize(var, var_edges, right=True)``,
    non-finite rows in the last slot) and ``in_hist`` (``hist_bins + 3``: uniform bins over
    ``hist_range`` plus underflow, overflow and NaN) over every ``hist_row_step``-th sampled row.
    Row statistics are two-pass in float64 (rounded to float32 for non-float64 inputs, as the torch
    path computes them); the result is deterministic. This is the fused form of the torch
    statistics in :mod:`normscope.monitor` (tested against them).
    """
    _check_2d(x, "x")
    _check_like(y, "y", x.shape, "x")
    tx, ty = _code(x, "x"), _code(y, "y")
    bins = in_hist.numel() - 3
    ne = var_edges.numel()
    _check_f64_block(sums, "sums", 11)
    _check_f64_block(maxima, "maxima", 7)
    _check_f64_block(var_hist, "var_hist", ne + 2)
    if bins < 1:
        raise ValueError(f"Expected in_hist to have at least 4 elements, but got {in_hist.numel()}")
    _check_f64_block(in_hist, "in_hist", bins + 3)
    _check_f64_block(var_edges, "var_edges", ne)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    if stride < 1 or not 0 <= start < rows or hist_row_step < 1:
        raise ValueError(f"Expected stride >= 1, 0 <= start < {rows} and hist_row_step >= 1, but got "
                         f"stride={stride}, start={start}, hist_row_step={hist_row_step}")
    lo, hi = float(hist_range[0]), float(hist_range[1])
    _monitor_call(x.contiguous(), y.contiguous(), tx, ty, sums.data_ptr(), maxima.data_ptr(), var_hist.data_ptr(),
                  in_hist.data_ptr(), var_edges.data_ptr(), ne, start, stride, rms, eps_threshold, hist_row_step,
                  bins, lo, bins / (hi - lo), keys)


def _monitor_call(x, y, tx: int, ty: int, sums: int, maxima: int, var_hist: int, in_hist: int, edges: int, ne: int,
                  start: int, stride: int, rms: bool, eps_threshold: float, hist_row_step: int, bins: int,
                  lo: float, scale: float, keys) -> None:
    """:func:`monitor_stats` without argument checks: contiguous x / y, accumulators as addresses."""
    stats, _ = _monitor_fns if _monitor_fns is not None else _monitor_lib()
    rows, cols = x.shape
    ia = array("q", (tx, ty, x.data_ptr(), y.data_ptr(), rows, cols, start, stride, int(rms), hist_row_step, bins,
                     sums, maxima, var_hist, in_hist, edges, ne, int(tx == 1)))
    da = array("d", (eps_threshold, lo, scale, keys[0], keys[1], keys[2]))
    rc = stats(ia.buffer_info()[0], da.buffer_info()[0])
    if rc != 0:
        raise RuntimeError(f"normscope cpu monitor_stats failed (code {rc})")


def monitor_grad(grad: torch.Tensor, slot: int, fired: int, key: int, neg_key: float, accumulate: bool) -> None:
    """Sum of squares of ``grad`` (in float64) into the float64 at address ``slot``, in place.

    ``accumulate=True`` (an input gradient): adds it, and raises the float64 at ``key`` to
    ``neg_key`` when the sum is not finite. ``accumulate=False`` (a parameter gradient): stores it.
    Either way sets the float64 at ``fired`` to 1. Addresses are ``data_ptr()`` values of live
    float64 CPU tensors; ``grad`` is made contiguous.
    """
    _, fn = _monitor_fns if _monitor_fns is not None else _monitor_lib()
    code = _CODES.get(grad.dtype)
    if code is None:
        raise TypeError(f"Expected grad of dtype {_DTYPE_NAMES}, but got {grad.dtype}")
    g = grad.contiguous()
    rc = fn(code, g.data_ptr(), g.numel(), 0 if accumulate else 1, slot, fired, key, float(neg_key))
    if rc != 0:
        raise RuntimeError(f"normscope cpu monitor_grad failed (code {rc})")
