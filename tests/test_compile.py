"""torch.compile(fullgraph=True) over normscope modules and ops: no graph break, same numbers."""

from __future__ import annotations

import pytest
import torch

import normscope
from helpers import OPS, as_tuple, make_aux


class Block(torch.nn.Module):
    """A pre-LN block using every kind of normscope op."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = normscope.nn.LayerNorm(d)
        self.rms = normscope.nn.RMSNorm(d, eps=1e-6)
        self.fc1 = torch.nn.Linear(d, d)
        self.fc2 = torch.nn.Linear(d, d)
        self.w = torch.nn.Parameter(torch.ones(d))

    def forward(self, x, mask):
        a = self.fc1(self.ln(x))
        y, h = normscope.add_rms_norm(a, x, x.shape[-1], self.w, eps=1e-6)
        z = self.fc2(self.rms(y))
        y2, h2 = normscope.add_layer_norm(z, h, z.shape[-1])
        return normscope.masked_layer_norm(y2, mask, z.shape[-1]) + normscope.masked_rms_norm(h2, mask, z.shape[-1])


def _grads(model, x, mask):
    model.zero_grad()
    xx = x.clone().requires_grad_()
    out = model(xx, mask)
    out.square().sum().backward()
    return out.detach(), [xx.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 6, 32)
    mask = torch.rand(4, 6, 1) > 0.2
    eager_out, eager_grads = _grads(model, x, mask)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _grads(compiled, x, mask)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_ops_appear_as_custom_ops_in_the_graph():
    torch.manual_seed(0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Block()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 32)
    out = compiled(x, torch.ones(2, 3, 1, dtype=torch.bool))
    torch.testing.assert_close(out, model(x, torch.ones(2, 3, 1, dtype=torch.bool)))
    assert len(graphs) == 1  # fullgraph: one graph, no break
    code = graphs[0].code
    assert code.count("normscope.norm_fwd") == 6, code


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_each_op_compiles_with_autograd(op):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen)
    aux = make_aux(op, x, 1, gen)
    w = torch.randn(16, generator=gen)
    b = torch.randn(16, generator=gen) if op.has_bias else None

    def f(x, aux, w, b):
        return as_tuple(op.fn(x, aux, 16, w, b, 1e-5))[0].sin().sum()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)):
        xs = x.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        val = fn(xs, aux, ws, b)
        val.backward()
        results.append((val.detach(), xs.grad, ws.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)
