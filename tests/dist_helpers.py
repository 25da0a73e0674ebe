"""Shared test helpers for multi-process tests: a free loopback port and a spawned group of ranks."""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import traceback
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, out_dir: str, timeout: float = 60.0) -> Iterator[None]:
    """In a spawned rank: a gloo process group for the body, destroyed after it; a failure (of the set-up or the
    body) leaves its traceback in ``err{rank}.txt`` for :func:`run_ranks` to report, and is re-raised."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            yield
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(f"{out_dir}/err{rank}.txt", "w") as f:
            f.write(traceback.format_exc())
        raise


def write_result(out_dir: str, rank: int, result) -> None:
    """A rank's JSON result, read back by :func:`run_ranks`."""
    with open(f"{out_dir}/out{rank}.json", "w") as f:
        json.dump(result, f)


def _traced(worker: Callable, rank: int, world: int, port: int, out_dir: str) -> None:
    """Run ``worker`` with faulthandler writing to ``fault{rank}.txt``: a rank killed by a signal (SIGABRT from a
    C++ exception in a gloo thread, SIGSEGV) leaves the Python stacks of all its threads there.

    A worker that returned has written its result and destroyed its process group; the rank then leaves with
    ``os._exit(0)``, without the interpreter's finalization. That finalization runs the C++ static destructors of
    torch's distributed libraries, which on a loaded machine now and then destroy a still-joinable background
    thread ("terminate called without an active exception", SIGABRT) after everything the test checks is done.
    A worker that raised still exits through the interpreter with a non-zero code and its traceback.
    """
    import faulthandler
    import os
    import sys

    with open(f"{out_dir}/fault{rank}.txt", "w") as f:
        faulthandler.enable(file=f, all_threads=True)
        try:
            worker(rank, world, port, out_dir)
        finally:
            faulthandler.disable()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker: Callable, world: int, out_dir: Path, timeout: float) -> List[dict]:
    """Spawn ``worker(rank, world, port, out_dir)`` for every rank and return each rank's ``out{rank}.json``.

    A worker writes its traceback to ``err{rank}.txt`` when it fails; any failure, hang or non-zero exit
    fails the test with every rank's traceback.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_traced, args=(worker, r, world, port, str(out_dir)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = "".join(f"--- rank {r} ---\n{(out_dir / f'err{r}.txt').read_text()}" for r in range(world)
                     if (out_dir / f"err{r}.txt").exists())
    errors += "".join(f"--- rank {r}: fatal signal ---\n{(out_dir / f'fault{r}.txt').read_text()}"
                      for r in range(world)
                      if (out_dir / f"fault{r}.txt").exists() and (out_dir / f"fault{r}.txt").stat().st_size)
    if hung or errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"distributed workers failed (hung ranks: {hung}, exit codes: {[p.exitcode for p in procs]})"
                    f"\n{errors}")
    return [json.loads((out_dir / f"out{r}.json").read_text()) for r in range(world)]
