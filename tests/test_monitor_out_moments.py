"""The monitor's output mean / standard deviation: (count, mean, M2) merged by Chan et al.'s formula.

A layer whose outputs have mean 1e4 and standard deviation 1e-3 (gamma 1e-3, beta 1e4): the sum of
squares about zero (1e8 per value) holds the variance (1e-6) only in its last digits, so
``E[y^2] - E[y]^2`` loses it. The monitor must report float64 ``torch.std`` (population) of every
output it saw, through each collection path (C++ kernel, torch operations, Triton kernels under
Triton's interpreter), per window and merged over windows (:meth:`Monitor.snapshot`).
"""

from __future__ import annotations

import math

import pytest
import torch

from normscope.monitor import Monitor
from normscope.monitor import _layout as L
from normscope.monitor import _monitor as M
from normscope.ops import cpu_backend


def _triton_interpreted() -> bool:
    try:
        from normscope.monitor import _triton_stats
    except ImportError:
        return False
    return _triton_stats._INTERPRETED


PATHS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not cpu_backend.available(), reason="no C++ compiler")),
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_interpreted(),
                                                    reason="CPU tensors through Triton need TRITON_INTERPRET=1")),
]


@pytest.fixture
def path(request, monkeypatch):
    mode = {"cpp": "auto", "torch": "torch", "triton": "triton"}[request.param]
    monkeypatch.setenv("NORMSCOPE_MONITOR_KERNEL", mode)
    monkeypatch.setattr(M, "_KERNEL_MODE", None)  # read again
    return request.param


def _run(dtype, flush_at=()):
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(256, dtype=dtype)
    with torch.no_grad():
        layer.weight.fill_(1e-3)
        layer.bias.fill_(1e4)
    mon = Monitor(layer, every=1, flush_every=None, grads=False)
    g = torch.Generator().manual_seed(1)
    outs, records = [], []
    for step in range(5):  # several calls with different shapes and scales
        x = (torch.randn(3 + step, 7, 256, generator=g, dtype=torch.float64) * (1 + step) + step).to(dtype)
        with torch.no_grad():
            outs.append(layer(x).double().reshape(-1))
        mon.step()
        if step in flush_at:
            records += mon.flush()
    records += mon.flush()
    snap = mon.snapshot()
    mon.close()
    stats = [r for r in records if r["type"] == "layer_stats"]
    return torch.cat(outs), stats, snap["layers"][""]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_out_std_of_a_large_mean_small_spread_output_matches_float64_torch_std(path, dtype):
    y, stats, snap = _run(dtype)
    want_std, want_mean = y.std(correction=0).item(), y.mean().item()
    assert 5e-4 < want_std < 2e-3 and abs(want_mean - 1e4) < 1e-2  # the problem is the one described
    (rec,) = stats
    assert rec["out_std"] == pytest.approx(want_std, rel=1e-6)
    assert rec["out_mean"] == pytest.approx(want_mean, rel=1e-12)
    assert snap["out_std"] == pytest.approx(want_std, rel=1e-6)
    # E[y^2] - E[y]^2 from the same float64 values (pairwise sums) is off by more than the tolerance.
    n, s, q = y.numel(), y.sum().item(), y.square().sum().item()
    naive = math.sqrt(max(q / n - (s / n) ** 2, 0.0))
    assert abs(naive - want_std) > 1e-5 * want_std  # 10 times the tolerance above


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_out_std_merged_over_windows_matches_the_whole_run(path):
    y, stats, snap = _run(torch.float64, flush_at=(1, 3))
    assert len(stats) == 3  # three windows: steps 0-1, 2-3, 4
    assert snap["out_std"] == pytest.approx(y.std(correction=0).item(), rel=1e-6)
    assert snap["out_mean"] == pytest.approx(y.mean().item(), rel=1e-12)


def test_chan_merge_is_exact_where_the_moments_cancel():
    g = torch.Generator().manual_seed(2)
    a = 1e4 + 1e-3 * torch.randn(1000, generator=g, dtype=torch.float64)
    b = 1e4 + 2e-3 + 1e-3 * torch.randn(300, generator=g, dtype=torch.float64)

    def triple(t):
        return (float(t.numel()), t.mean().item(), (t - t.mean()).square().sum().item())

    n, mean, m2 = L.chan_merge(triple(a), triple(b))
    both = torch.cat([a, b])
    assert n == 1300
    assert mean == pytest.approx(both.mean().item(), rel=1e-15)
    assert math.sqrt(m2 / n) == pytest.approx(both.std(correction=0).item(), rel=1e-9)
    assert L.chan_merge((0.0, 0.0, 0.0), triple(b)) == triple(b)  # an empty side is the other one
    assert L.chan_merge(triple(a), (0.0, 0.0, 0.0)) == triple(a)
