"""LN-LSTM / LN-GRU under CUDA graphs: the fused Triton path launches two kernels per time step from Python, so on a
GPU most of its time is launch overhead, which a CUDA graph removes. The path must capture (no host
synchronisation, no allocation that outlives the capture's pool) and replay to the eager results: for inference
through ``torch.cuda.graph`` and for training through ``torch.cuda.make_graphed_callables``. Collected only where
CUDA is available (see tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from normscope.nn import LayerNormGRU, LayerNormLSTM

DEV = "cuda"


def _module(cls, dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    m = cls(32, 64, num_layers=layers).to(DEV, dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)
    assert m.fused
    return m


def _x(seed, dtype=torch.float32, shape=(24, 8, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU], ids=lambda c: c.__name__)
def test_inference_graph_replays_the_eager_outputs(cls, dtype):
    m = _module(cls, dtype)
    static_x = _x(1, dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            m(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out, static_state = m(static_x)
    for seed in (2, 3):  # new data copied into the captured input, then replayed
        x = _x(seed, dtype)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            out, state = m(x)
        assert torch.equal(static_out, out)
        for a, b in zip(torch.utils._pytree.tree_leaves(static_state), torch.utils._pytree.tree_leaves(state)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU], ids=lambda c: c.__name__)
def test_make_graphed_callables_trains_like_eager(cls):
    eager = _module(cls)
    graphed = torch.cuda.make_graphed_callables(copy.deepcopy(eager), (_x(4).requires_grad_(),))
    for seed in (5, 6):
        grads = []
        for m in (eager, graphed):
            m.zero_grad(set_to_none=True)
            x = _x(seed).requires_grad_()
            out, state = m(x)
            h = state[0] if isinstance(state, tuple) else state
            (out.square().mean() + h.sin().sum()).backward()
            grads.append([x.grad] + [p.grad for p in m.parameters()])
            grads[-1].append(out.detach())
        for a, b in zip(*grads):
            assert b is not None and a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
