"""The spawned-ranks helper itself: results come back from ranks that return, and a rank that raises or dies fails
the test with its traceback (the ranks leave with ``os._exit(0)`` after a clean return, which must not hide either)."""

from __future__ import annotations

import os

import pytest

from dist_helpers import run_ranks, write_result


def _returns(rank, world, port, out_dir):
    write_result(out_dir, rank, {"rank": rank, "world": world})


def _raises_on_rank_1(rank, world, port, out_dir):
    if rank == 1:
        with open(f"{out_dir}/err{rank}.txt", "w") as f:
            f.write("ValueError: rank 1 broke\n")
        raise ValueError("rank 1 broke")
    write_result(out_dir, rank, {"rank": rank})


def _aborts_on_rank_0(rank, world, port, out_dir):
    if rank == 0:
        os.abort()
    write_result(out_dir, rank, {"rank": rank})


def test_results_of_every_rank_come_back(tmp_path):
    assert run_ranks(_returns, 2, tmp_path, timeout=60.0) == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]


def test_a_rank_that_raises_fails_the_test_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exit codes: \[0, 1\].*rank 1 broke"):
        run_ranks(_raises_on_rank_1, 2, tmp_path, timeout=60.0)


def test_a_rank_killed_by_a_signal_fails_the_test_with_its_python_stack(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exit codes: \[-6, 0\].*fatal signal.*_aborts_on_rank_0"):
        run_ranks(_aborts_on_rank_0, 2, tmp_path, timeout=60.0)
