"""Writing a user-named output file: one writer for every place that writes one.

* A regular file (or a new one) is written atomically: a temporary file in the same directory, flushed,
  fsync'ed and renamed over the path, so an existing file is untouched when writing fails (full disk,
  file-size limit, Ctrl-C) and no temporary file is left behind. An existing file keeps its mode (and,
  where permitted, its owner); a new one gets ``0o666`` less the umask, as ``>`` in a shell.
* A symbolic link is resolved (a chain of links too) and its target is written atomically in the
  target's directory; the link stays a link. A dangling link creates its target when the target's
  directory exists. A loop is an error.
* A FIFO, a character device (``/dev/null``, ``/dev/full``, a terminal), ``/dev/stdout``, ``/dev/fd/N``
  (e.g. ``>(jq .)``) and ``-`` (standard output) are written directly, streaming, without a temporary
  file: they are never replaced by a regular file.

Errors are :class:`OSError` with ``strerror`` set to a short reason, e.g. ``"File too large"``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import IO, Iterator, Optional, Set, Union

__all__ = ["STDOUT", "Target", "resolve_output", "is_stdout", "check_output", "open_output", "write_output",
           "copy_output", "work_dir", "move_output", "open_stream", "remove_pending"]

#: The path that means standard output.
STDOUT = "-"

PathLike = Union[str, "os.PathLike[str]"]

_MAX_LINKS = 40  # as Linux's MAXSYMLINKS
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/thread-self/fd)/(\d+)$")
_STD_NAMES = {"/dev/stdout": 1, "/dev/stderr": 2}

#: Temporary files being written right now; removed by :func:`remove_pending` (e.g. after Ctrl-C).
_PENDING: Set[str] = set()


@dataclass(frozen=True)
class Target:
    """Where writing ``path`` goes.

    ``kind`` is ``"stdout"`` (``-``), ``"fd"`` (an inherited descriptor: ``/dev/stdout``, ``/dev/fd/N``),
    ``"stream"`` (an existing FIFO, character device or other non-regular file, opened and written
    directly) or ``"file"`` (a regular file, existing or not, written atomically at ``real``).
    """

    path: str
    kind: str
    real: str
    fd: Optional[int] = None
    st: Optional[os.stat_result] = None


def _error(code: int, reason: str, path: str) -> OSError:
    return OSError(code, reason, path)


def _fd_of(path: str) -> Optional[int]:
    if path in _STD_NAMES:
        return _STD_NAMES[path]
    m = _FD_PATH.match(path)
    return int(m.group(1)) if m else None


def resolve_output(path: PathLike) -> Target:
    """Where writing ``path`` goes (see the module docstring).

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        OSError: the path cannot be written: a directory, a missing directory, a symbolic link loop.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected path to be a str or os.PathLike, but got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise _error(errno.ENOENT, "empty path", path)
    if path == STDOUT:
        return Target(path, "stdout", path)
    current = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        fd = _fd_of(current)
        if fd is not None:
            try:
                st = os.fstat(fd)
            except OSError:
                raise _error(errno.EBADF, f"file descriptor {fd} is not open", path) from None
            return Target(path, "fd", current, fd=fd, st=st)
        directory, name = os.path.split(current)
        directory = os.path.realpath(directory)
        current = os.path.join(directory, name)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not os.path.isdir(directory):
                what = "is not a directory" if os.path.exists(directory) else "does not exist"
                via = "" if current == os.path.abspath(path) else f" (the symbolic link's target {current!r})"
                raise _error(errno.ENOENT, f"directory {directory!r} {what}{via}", path) from None
            return Target(path, "file", current)
        except NotADirectoryError:
            raise _error(errno.ENOTDIR, f"{directory!r} is not a directory", path) from None
        if stat.S_ISLNK(st.st_mode):
            current = os.path.join(directory, os.readlink(current))
            continue
        if stat.S_ISDIR(st.st_mode):
            raise _error(errno.EISDIR, "it is a directory", path)
        if stat.S_ISREG(st.st_mode):
            return Target(path, "file", current, st=st)
        return Target(path, "stream", current, st=st)
    raise _error(errno.ELOOP, "too many levels of symbolic links (a symbolic link loop?)", path)


def is_stdout(path: Optional[PathLike]) -> bool:
    """Whether writing ``path`` writes this process's standard output (``-``, ``/dev/stdout``, ``/dev/fd/1``)."""
    if path is None:
        return False
    try:
        target = resolve_output(path)
    except (OSError, TypeError):
        return False
    return target.kind == "stdout" or (target.kind == "fd" and target.fd == 1)


def check_output(path: PathLike) -> str:
    """A one-line reason why ``path`` cannot be written, or ``""``: the checks done before long work."""
    try:
        target = resolve_output(path)
    except OSError as e:
        return e.strerror or str(e)
    if target.kind == "file":
        directory = os.path.dirname(target.real)
        if not os.access(directory, os.W_OK) or (target.st is not None and not os.access(target.real, os.W_OK)):
            return "permission denied"
    elif target.kind == "stream" and not os.access(target.real, os.W_OK):
        return "permission denied"
    return ""


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Unclosed(io.RawIOBase):
    """A binary writer on a descriptor that the caller owns (standard output): closing only flushes."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done


def _wrap(raw: IO[bytes], mode: str, encoding: str, newline: Optional[str]) -> IO:
    if "b" in mode:
        return raw
    return io.TextIOWrapper(raw, encoding=encoding, newline=newline, write_through=True)


def _open_direct(target: Target, append: bool, mode: str, encoding: str, newline: Optional[str]) -> IO:
    """A writer on a stdout / fd / stream target (no temporary file)."""
    if target.kind == "stdout" or (target.kind == "fd" and target.fd in (1, 2)):
        std = sys.stdout if target.kind == "stdout" or target.fd == 1 else sys.stderr
        try:
            std.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            fd = std.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            fd = None
        if fd is None:  # a replaced sys.stdout (tests, notebooks): write through it
            if "b" in mode:
                buf = getattr(std, "buffer", None)
                if buf is None:
                    raise _error(errno.EBADF, "standard output takes no bytes", target.path)
                return _NoClose(buf)
            return _NoClose(std)
        return _wrap(io.BufferedWriter(_Unclosed(fd)), mode, encoding, newline)
    if target.kind == "fd":
        fd = os.dup(target.fd)
    else:
        flags = os.O_WRONLY | (os.O_APPEND if append else 0)
        if target.st is not None and stat.S_ISREG(target.st.st_mode):
            flags |= os.O_CREAT | (0 if append else os.O_TRUNC)
        fd = os.open(target.real, flags, 0o666)
    return _wrap(os.fdopen(fd, "ab" if append else "wb"), mode, encoding, newline)


class _NoClose(io.IOBase):
    """Writes go to ``inner``; closing flushes it but leaves it open."""

    def __init__(self, inner):
        super().__init__()
        self._inner = inner

    def writable(self) -> bool:
        return True

    def write(self, data):
        return self._inner.write(data)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        if not self.closed:
            self._inner.flush()
        super().close()


@contextlib.contextmanager
def open_output(path: PathLike, mode: str = "w", *, encoding: str = "utf-8",
                newline: Optional[str] = None) -> Iterator[IO]:
    """Open ``path`` for writing (``mode`` ``"w"`` or ``"wb"``) as described in the module docstring.

    A regular file is published only when the ``with`` block completes; on an exception (OSError,
    KeyboardInterrupt, ...) the temporary file is removed and an existing file is left as it was.

    Example::

        >>> with open_output("result.json") as f:
        ...     json.dump(result, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"Expected mode 'w' or 'wb', but got {mode!r}")
    target = resolve_output(path)
    if target.kind != "file":
        f = _open_direct(target, False, mode, encoding, newline)
        try:
            yield f
            f.flush()
        finally:
            try:
                f.close()
            except OSError:
                pass
        return
    directory, name = os.path.split(target.real)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        _PENDING.add(tmp)
        _take_mode(fd, target)
        with _wrap(os.fdopen(fd, "wb"), mode, encoding, newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target.real)
        _PENDING.discard(tmp)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _PENDING.discard(tmp)


def _take_mode(where: Union[int, str], target) -> None:
    """Give the file ``where`` (a descriptor or a path) the mode and owner of the file it replaces, or, for a
    new file, ``0o666`` less the umask."""
    if target.st is not None:
        os.chmod(where, stat.S_IMODE(target.st.st_mode))
        with contextlib.suppress(OSError):
            os.chown(where, target.st.st_uid, target.st.st_gid)
    else:
        os.chmod(where, 0o666 & ~_umask())


def write_output(path: PathLike, data: Union[str, bytes], *, encoding: str = "utf-8") -> None:
    """Write ``data`` (text or bytes) to ``path`` with :func:`open_output`."""
    with open_output(path, "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w",
                     encoding=encoding) as f:
        f.write(data)


def copy_output(src: PathLike, path: PathLike, *, chunk: int = 1 << 20) -> None:
    """Copy the file ``src`` to ``path`` with :func:`open_output` (streamed in chunks)."""
    with open(src, "rb") as fin, open_output(path, "wb") as fout:
        while True:
            block = fin.read(chunk)
            if not block:
                break
            fout.write(block)


def work_dir(path: PathLike) -> Optional[str]:
    """The directory to build a file for ``path`` in before :func:`move_output` publishes it: the
    directory of the (resolved) regular file, so the move is a rename; None (the system's temporary
    directory) for standard output, FIFOs and devices."""
    target = resolve_output(path)
    return os.path.dirname(target.real) if target.kind == "file" else None


def move_output(src: PathLike, path: PathLike) -> None:
    """Publish the finished file ``src`` at ``path``: renamed over a regular file (through symbolic
    links; the mode of an existing file kept, a new one ``0o666`` less the umask) when both are on one
    file system, else copied with :func:`copy_output`. ``src`` is gone afterwards."""
    src = os.fspath(src)
    target = resolve_output(path)
    if target.kind == "file":
        try:
            same = os.stat(src).st_dev == os.stat(os.path.dirname(target.real)).st_dev
        except OSError:
            same = False
        if same:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _take_mode(src, target)
            os.replace(src, target.real)
            return
    copy_output(src, path)
    os.unlink(src)


def open_stream(path: PathLike, *, append: bool = False, encoding: str = "utf-8") -> IO[str]:
    """A text stream on ``path`` for records written over time (not atomic by nature): truncated, or
    appended to with ``append=True``, through resolved symbolic links; FIFOs, devices and ``-`` directly."""
    target = resolve_output(path)
    if target.kind == "file":
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(target.real, flags, 0o666)
        return _wrap(os.fdopen(fd, "ab" if append else "wb"), "w", encoding, None)
    return _open_direct(target, append, "w", encoding, None)


def remove_pending() -> None:
    """Remove the temporary files of writes still in progress (after an interrupt)."""
    for tmp in list(_PENDING):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _PENDING.discard(tmp)
