"""On a GPU: training steps under the monitor never synchronise (CUDA sync debug mode raises if they do).

Collected only where CUDA is available (tests/conftest.py); tests/test_monitor_sync.py checks the same
property on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from normscope.monitor import Monitor


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.RMSNorm(64), torch.nn.Linear(64, 1))


def _run(device, sync_check=False, inject=False):
    model = _model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 64, generator=gen).to(device) for _ in range(6)]
    if inject:  # the non-finite path runs the same device code: it must not sync either
        xs[4][5, 7] = float("inf")
    mon = Monitor(model, every=2, row_fraction=0.5, flush_every=None)
    if sync_check:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises from here on
    try:
        for x in xs:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
    records = mon.flush()
    return {r["layer"]: r for r in records if r["type"] == "layer_stats"}, mon


def test_no_synchronisation_between_flushes_on_cuda():
    stats, mon = _run(torch.device("cuda"), sync_check=True, inject=True)
    assert stats["1"]["calls"] == 3 and stats["1"]["grad_input_steps"] == 3  # steps 0, 2 and 4
    assert stats["1"]["inf_in"] + stats["1"]["nan_in"] > 0
    assert any(f.kind == "nonfinite_input" and f.layer == "1" and f.step == 4 for f in mon.findings())


def test_cuda_statistics_match_cpu():
    gpu, _ = _run(torch.device("cuda"))
    cpu, _ = _run(torch.device("cpu"))
    for key in ("calls", "rows_sampled", "var_mean", "var_min", "var_max", "out_std", "grad_input_norm",
                "grad_param_norm"):
        assert gpu["1"][key] == pytest.approx(cpu["1"][key], rel=1e-3, abs=1e-6), key
    g, c = gpu["1"]["in_hist"], cpu["1"]["in_hist"]
    assert sum(g) == sum(c) and sum(abs(a - b) for a, b in zip(g, c)) <= 0.01 * sum(c)
