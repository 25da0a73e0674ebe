"""Render an HTML report with headless Chromium: a PNG screenshot, or the DOM after load.

Usage::

    python -m normscope.report.screenshot REPORT.html OUT.png [--width W] [--height H]

The browser is ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH, the ``chromium``
argument, or the ``NORMSCOPE_CHROMIUM`` environment variable. It runs with a fresh temporary profile,
without network services, sandbox or GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["find_chromium", "screenshot", "dump_dom", "main"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
          "--disable-dev-shm-usage", "--force-device-scale-factor=1", "--mute-audio")
_TIMEOUT_S = 60.0
_INSTALL_HINT = "install Chromium (Debian/Ubuntu: apt-get install chromium) or set NORMSCOPE_CHROMIUM"


def find_chromium(chromium: Optional[str] = None) -> str:
    """The Chromium binary to use: ``chromium`` if given, else ``$NORMSCOPE_CHROMIUM``, else the first on PATH.

    Raises:
        FileNotFoundError: no binary found (the message names the Debian package ``chromium``).
    """
    for candidate in (chromium, os.environ.get("NORMSCOPE_CHROMIUM")):
        if candidate:
            found = shutil.which(candidate)
            if found is None:
                raise FileNotFoundError(f"Expected a Chromium executable, but got {candidate!r}, which is not an "
                                        f"executable file; {_INSTALL_HINT}")
            return found
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no Chromium found on PATH (tried {', '.join(_CANDIDATES)}); {_INSTALL_HINT}")


def _run(binary: str, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="normscope-chromium-") as profile:
        cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"Chromium did not finish within {timeout:g} s: {' '.join(cmd)}") from exc
    return proc


def _tail(data: bytes, n: int = 2000) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-n:] if text else "(no output)"


def _page_url(html_path) -> tuple:
    p = Path(html_path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"Expected an HTML file, but got {str(html_path)!r}, which does not exist")
    return p, p.as_uri()


def screenshot(html_path, png_path, *, width: int = 1400, height: int = 2400, chromium: Optional[str] = None,
               timeout: float = _TIMEOUT_S) -> Path:
    """Render ``html_path`` in headless Chromium and save the top ``width`` x ``height`` pixels as a PNG.

    Args:
        html_path: the page to render.
        png_path: the PNG file to write (its directory must exist; a symbolic link writes its target, a FIFO
            or a device is written directly).
        width, height: the browser window size in CSS pixels (device scale factor 1). Default: 1400 x 2400.
        chromium: the browser binary (default: see :func:`find_chromium`).
        timeout: seconds before the browser is given up on. Default: 60.

    Returns:
        The PNG path (absolute; a symbolic link's target).

    Raises:
        FileNotFoundError: no Chromium, or ``html_path`` does not exist.
        ValueError: a non-positive width or height.
        RuntimeError: Chromium failed or wrote no PNG (the message has the end of its stderr).
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"Expected {name} to be a positive int, but got {v!r}")
    binary = find_chromium(chromium)
    from normscope._paths import move_output, resolve_output, work_dir

    _, url = _page_url(html_path)
    target = resolve_output(png_path)  # a directory, a missing directory or a link loop fails here
    out = Path(os.path.abspath(png_path))
    # Chromium writes into a temporary directory; the PNG is then published at png_path (renamed over a
    # regular file or a symbolic link's target, streamed to a FIFO or device): never a half-written file
    with tempfile.TemporaryDirectory(prefix=".normscope-screenshot-", dir=work_dir(png_path)) as d:
        shot = Path(d) / "screenshot.png"
        proc = _run(binary, [f"--screenshot={shot}", f"--window-size={width},{height}", url], timeout)
        if proc.returncode != 0 or not shot.is_file() or shot.stat().st_size == 0:
            raise RuntimeError(f"Chromium failed to write {str(out)!r} (exit status {proc.returncode}): "
                               f"{_tail(proc.stderr)}")
        move_output(shot, png_path)
    return Path(target.real) if target.kind == "file" else out


def dump_dom(html_path, *, chromium: Optional[str] = None, timeout: float = _TIMEOUT_S) -> str:
    """Load ``html_path`` in headless Chromium and return the serialized DOM after load (``--dump-dom``).

    Raises:
        FileNotFoundError: no Chromium, or ``html_path`` does not exist.
        RuntimeError: Chromium failed (the message has the end of its stderr).
    """
    binary = find_chromium(chromium)
    _, url = _page_url(html_path)
    proc = _run(binary, ["--dump-dom", url], timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"Chromium failed to load {url} (exit status {proc.returncode}): {_tail(proc.stderr)}")
    return proc.stdout.decode("utf-8", "replace")


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: ``python -m normscope.report.screenshot REPORT.html OUT.png [--width W --height H]``."""
    parser = argparse.ArgumentParser(prog="python -m normscope.report.screenshot",
                                     description="screenshot an HTML report with headless Chromium")
    parser.add_argument("html", metavar="REPORT.html")
    parser.add_argument("png", metavar="OUT.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--chromium", default=None, help="the browser binary (default: found on PATH)")
    args = parser.parse_args(argv)
    try:
        out = screenshot(args.html, args.png, width=args.width, height=args.height, chromium=args.chromium)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
