"""On a GPU: training steps under the monitor never synchronise (CUDA sync debug mode raises if they do).

CUDA tensors take the fused Triton kernels (normscope/monitor/_triton_stats.py) by default, and the
torch operations under NORMSCOPE_MONITOR_KERNEL=cpp; both are checked for host synchronisation and
against each other and the CPU. Collected only where CUDA is available (tests/conftest.py);
tests/test_monitor_sync.py checks the same property on the CPU, tests/test_monitor_triton.py the
kernels field by field (on the GPU too when run there).
"""

from __future__ import annotations

import math

import pytest
import torch

from normscope.monitor import Monitor
from normscope.monitor import _monitor as M


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.RMSNorm(64), torch.nn.Linear(64, 1))


def _run(device, sync_check=False, inject=False, dtype=torch.float32):
    model = _model().to(device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 64, generator=gen).to(device, dtype) for _ in range(6)]
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


@pytest.fixture
def kernel_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv("NORMSCOPE_MONITOR_KERNEL", mode)
        monkeypatch.setattr(M, "_KERNEL_MODE", None)  # read again

    return set_mode


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the monitor's launches of the Triton kernels (the real launches run)."""
    from normscope.monitor import _triton_stats as TS

    calls = []
    stats, grad = TS._stats_call, TS._grad_call
    monkeypatch.setattr(TS, "_stats_call", lambda *a: calls.append("stats") or stats(*a))
    monkeypatch.setattr(TS, "_grad_call", lambda *a: calls.append("grad") or grad(*a))
    return calls


@pytest.mark.parametrize("mode", ["auto", "cpp"])  # the Triton kernels / the torch operations
def test_no_synchronisation_between_flushes_on_cuda(kernel_mode, triton_calls, mode):
    kernel_mode(mode)
    stats, mon = _run(torch.device("cuda"), sync_check=True, inject=True)
    assert (len(triton_calls) > 0) == (mode == "auto")
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


def _close_records(a, b, rel):
    for layer, r in b.items():
        for key, v in r.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(a[layer][key]), (layer, key)
            elif isinstance(v, float) and key not in ("in_mean", "out_mean"):
                assert a[layer][key] == pytest.approx(v, rel=rel, abs=1e-12), (layer, key, a[layer][key], v)
            elif key == "in_hist":
                assert sum(a[layer][key]) == sum(v) and sum(abs(p - q) for p, q in zip(a[layer][key], v)) <= 2
            elif not isinstance(v, float):
                assert a[layer][key] == v, (layer, key, a[layer][key], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_the_torch_operations_and_the_cpp_kernel(kernel_mode, triton_calls, dtype):
    kernel_mode("auto")
    tri, _ = _run(torch.device("cuda"), inject=True, dtype=dtype)
    assert triton_calls.count("stats") == 3 * 2 and "grad" in triton_calls
    kernel_mode("cpp")
    ops, _ = _run(torch.device("cuda"), inject=True, dtype=dtype)  # torch operations (float32 accumulation)
    assert sorted(tri) == sorted(ops) == ["1", "4"]
    _close_records(tri, ops, 1e-4)


def test_triton_statistics_kernel_on_cuda_is_deterministic_and_matches_the_cpp_kernel():
    from normscope.monitor import _layout as L
    from normscope.monitor import _triton_stats as TS
    from normscope.ops import cpu_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1536, generator=g).to(torch.bfloat16)
    x[7, 9] = float("nan")
    y = torch.randn(4096, 1536, generator=g).to(torch.bfloat16)

    def bufs(device):
        e = torch.tensor(L.var_edges(), dtype=torch.float64, device=device)
        return (torch.zeros(11, dtype=torch.float64, device=device),
                torch.full((7,), -math.inf, dtype=torch.float64, device=device),
                torch.zeros(len(e) + 2, dtype=torch.float64, device=device),
                torch.zeros(67, dtype=torch.float64, device=device), e)

    kw = dict(start=1, stride=3, rms=False, eps_threshold=1e-4, hist_row_step=5, hist_range=(-8.0, 8.0),
              keys=(-10.0, -11.0, -1.0))
    a, b = bufs("cuda"), bufs("cuda")
    TS.monitor_stats(x.cuda(), y.cuda(), *a, **kw)
    TS.monitor_stats(x.cuda(), y.cuda(), *b, **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # run to run, bitwise
    if cpu_backend.available():
        c = bufs("cpu")
        cpu_backend.monitor_stats(x, y, *c, **kw)
        torch.testing.assert_close(a[0].cpu(), c[0], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(a[1][:4].cpu(), c[1][:4], rtol=1e-6, atol=0)
        assert torch.equal(a[1][4:].cpu(), c[1][4:])
        for u, v in zip(a[2:4], c[2:4]):  # bins equal but for values within rounding (FMA) of an edge
            assert u.sum().item() == v.sum().item() and (u.cpu() - v).abs().sum().item() <= 4
    gr = torch.randn(3_000_000, generator=g)
    s = torch.zeros(3, dtype=torch.float64, device="cuda")
    TS.monitor_grad(gr.cuda(), s[0:1], s[1:2], s[2:3], -1.0, True)
    TS.monitor_grad(gr.cuda(), s[0:1], s[1:2], s[2:3], -1.0, True)
    assert s[0].item() == pytest.approx(2 * (gr.double() ** 2).sum().item(), rel=1e-12)
