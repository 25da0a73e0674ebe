"""The ``normscope`` command line (``normscope = "normscope.cli:main"``, or ``python -m normscope``).

One module per subcommand, each exposing ``add_parser(subparsers)`` and ``run(args) -> int``:

* ``normscope audit`` -- audit a model's normalization layers (default: the bundled MiniLM), HTML report;
* ``normscope bench`` -- run the benchmark harness (:mod:`normscope.bench`) and print its tables;
* ``normscope compare`` -- the canary gate: a candidate model against a baseline (a model or an audit JSON),
  exit 0 go / 1 no-go;
* ``normscope env`` -- versions, CUDA and the backend normscope would choose;
* ``normscope export`` -- export a model to ONNX, count its norm operators and verify it.

Subcommand modules import nothing heavy at import time; ``import normscope`` never imports this
package. Bad usage prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from normscope import __version__

__all__ = ["main", "build_parser", "ArgumentParser", "SUBCOMMANDS"]

SUBCOMMANDS = ("audit", "bench", "compare", "env", "export")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage dump) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="normscope",
        description="normscope: fast, exact layer normalization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"normscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"normscope.cli.{name}").add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        from normscope._paths import remove_pending

        remove_pending()  # a write cut short leaves no temporary file (its own cleanup normally did this)
        print("normscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `normscope audit --json - | head`: the reader left
        _quiet_stdout()
        return 141


def _quiet_stdout() -> None:
    """Point standard output at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
