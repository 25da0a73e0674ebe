"""What a sampled step measures on the monitor's cheaper hot path.

The input histogram is subsampled by default (whole rows, evenly spaced, deterministic), and the
parameter-gradient norms of a backward pass are read together when the pass ends (one fused norm per
device): the statistics must be the ones described in docs/monitor.md, "What is measured".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normscope.monitor import Monitor


def _stats(records, layer):
    (s,) = [r for r in records if r["type"] == "layer_stats" and r["layer"] == layer]
    return s


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_default_input_histogram_counts_every_eighth_row_of_512_rows_of_128(cpu_kernel):
    model = torch.nn.Sequential(torch.nn.LayerNorm(128))
    mon = Monitor(model, every=1, flush_every=None, grads=False, cpu_kernel=cpu_kernel, hist_bins=16,
                  hist_range=(-4.0, 4.0))
    x = torch.randn(8, 64, 128, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        model(x)
    s = _stats(mon.flush(), "0")
    rows = x.reshape(512, 128)
    # hist_max_elements = 8192 values: 64 rows of 128, every ceil(512 / 64) = 8th row from row 0.
    chosen = rows[0::8].reshape(-1).numpy()
    edges = np.linspace(-4.0, 4.0, 17)
    expected = np.bincount(np.searchsorted(edges, chosen, side="right"), minlength=18)
    assert sum(s["in_hist"]) == 8192 and s["in_hist"] == expected.tolist()
    assert s["rows_sampled"] == 512  # the row statistics still cover every row
    mon.close()
    # Asking for every value counts every value.
    full = Monitor(model, every=1, flush_every=None, grads=False, cpu_kernel=cpu_kernel,
                   hist_max_elements=512 * 128)
    with torch.no_grad():
        model(x)
    assert sum(_stats(full.flush(), "0")["in_hist"]) == 512 * 128
    full.close()


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.LayerNorm(6)
        self.b = torch.nn.LayerNorm(6, bias=False)  # weight only
        self.c = torch.nn.LayerNorm(6, elementwise_affine=False)  # no parameters
        self.d = torch.nn.GroupNorm(2, 6)

    def forward(self, x):
        h = self.b(self.a(x) * 3.0)
        return self.d(self.c(h).transpose(1, 2)).transpose(1, 2)


def test_parameter_gradient_norms_of_each_layer_from_the_end_of_each_backward_pass():
    torch.manual_seed(0)
    model = _Mixed()
    mon = Monitor(model, every=1, flush_every=None)
    norms = []
    for step in range(2):
        x = torch.randn(4, 5, 6)
        out = model(x)
        (out[:2] * torch.randn(2, 5, 6)).sum().backward(retain_graph=True)  # two passes in one step:
        (out[2:] ** 2).sum().backward()  # the accumulated gradient counts
        norms.append({name: math.sqrt(sum(float(p.grad.double().square().sum()) for p in m.parameters()))
                      for name, m in (("a", model.a), ("b", model.b), ("d", model.d))})
        model.zero_grad(set_to_none=True)
        mon.step()
    records = mon.flush()
    for name in ("a", "b", "d"):
        s = _stats(records, name)
        per_step = [n[name] for n in norms]
        assert s["grad_param_steps"] == 2
        assert s["grad_param_norm"] == pytest.approx(sum(per_step) / 2, rel=1e-12)
        assert s["grad_param_norm_max"] == pytest.approx(max(per_step), rel=1e-12)
        assert s["grad_param_norm_min"] == pytest.approx(min(per_step), rel=1e-12)
    assert _stats(records, "c")["grad_param_steps"] == 0 and _stats(records, "c")["grad_param_norm"] is None
    mon.close()
