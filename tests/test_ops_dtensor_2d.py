"""normscope's ops on a 2-D device mesh (data parallel x tensor/sequence parallel), 4 gloo ranks on the CPU.

Each case runs normscope's function and torch's own op on the same DTensors: outputs, input and
parameter gradients must agree in value (float64) and in placements, eager and under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_helpers import gloo_rank, run_ranks, write_result

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

F = torch.nn.functional
WORLD = 4
TOL = 1e-10


def _data(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _run(fn, x, w, b, mesh, x_pl, p_pl, g):
    from torch.distributed.tensor import distribute_tensor

    dx = distribute_tensor(x, mesh, x_pl).requires_grad_()
    dw = distribute_tensor(w, mesh, p_pl).requires_grad_()
    db = None if b is None else distribute_tensor(b, mesh, p_pl).requires_grad_()
    y = fn(dx, dw, db)
    y.backward(distribute_tensor(g, mesh, y.placements))
    grads = [dx.grad, dw.grad] + ([] if db is None else [db.grad])
    return ([str(tuple(t.placements)) for t in [y] + grads],
            [t.full_tensor().detach() for t in [y] + grads])


def _cases(mesh):
    from torch.distributed.tensor import Replicate, Shard

    import normscope

    x, g = _data(1, 8, 6, 16), _data(2, 8, 6, 16)
    w, b = _data(3, 16), _data(4, 16)
    fns = {
        "layer_norm": (lambda x, w, b: normscope.layer_norm(x, 16, w, b),
                       lambda x, w, b: F.layer_norm(x, (16,), w, b)),
        "rms_norm": (lambda x, w, b: normscope.rms_norm(x, 16, w, eps=1e-6),
                     lambda x, w, b: F.rms_norm(x, (16,), w, eps=1e-6)),
    }
    layouts = {
        "dp_sp": [Shard(0), Shard(1)],   # batch over dp, sequence over tp (sequence parallel)
        "dp_rep": [Shard(0), Replicate()],
        "rep_sp": [Replicate(), Shard(1)],
    }
    out = {}
    for fname, (ours, theirs) in fns.items():
        bias = b if fname == "layer_norm" else None
        for lname, pl in layouts.items():
            for mode in ("eager", "compiled"):
                torch._dynamo.reset()
                f = torch.compile(ours, backend="aot_eager", fullgraph=True) if mode == "compiled" else ours
                pl_ours, vals_ours = _run(f, x, w, bias, mesh, pl, [Replicate(), Replicate()], g)
                pl_torch, vals_torch = _run(theirs, x, w, bias, mesh, pl, [Replicate(), Replicate()], g)
                out[f"{fname}-{lname}-{mode}"] = {
                    "placements": pl_ours, "torch_placements": pl_torch,
                    "err": [float((a - c).abs().max()) for a, c in zip(vals_ours, vals_torch)],
                }
    return out


def _worker(rank, world, port, out_dir):
    with gloo_rank(rank, world, port, out_dir):
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        write_result(out_dir, rank, _cases(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dtensor2d"), timeout=300.0)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("layout", ["dp_sp", "dp_rep", "rep_sp"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_two_dimensional_mesh_matches_torch(results, fn, layout, mode):
    for res in results:
        case = res[f"{fn}-{layout}-{mode}"]
        assert case["placements"] == case["torch_placements"], case
        # the output keeps the input's sharding on both mesh dims
        assert case["placements"][0] == case["placements"][1], case
        assert len(case["err"]) == (4 if fn == "layer_norm" else 3) and max(case["err"]) < TOL, case
