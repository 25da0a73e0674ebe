"""normscope's ops on distributed tensors (DTensor), 2 gloo ranks on the CPU.

One spawned run computes every case on both ranks; each test checks its cases against the same
computation in one process on the full tensors (torch's ``F.layer_norm`` / ``F.rms_norm``, or
normscope itself for the masked variants, which torch lacks): forward values, the placements of
outputs and input gradients, and weight / bias gradients after ``full_tensor()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_helpers import gloo_rank, run_ranks, write_result

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

F = torch.nn.functional
WORLD = 2


def _err(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _pl(t) -> str:
    return str(tuple(t.placements))


def _data(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _case(fn, ref_fn, tensors, mesh):
    """Run ``fn`` on DTensors and ``ref_fn`` on the full tensors; compare outputs and gradients.

    ``tensors``: name -> (full tensor, placements or None for a plain tensor, requires_grad).
    ``fn`` / ``ref_fn`` take the same keyword tensors and return a tensor or a tuple of tensors.
    """
    from torch.distributed.tensor import distribute_tensor

    dist_in, ref_in = {}, {}
    for name, (full, pl, grad) in tensors.items():
        d = full.clone() if pl is None else distribute_tensor(full, mesh, pl)
        dist_in[name] = d.requires_grad_(grad) if grad else d
        ref_in[name] = full.clone().requires_grad_(grad) if grad else full.clone()
    out, ref = fn(**dist_in), ref_fn(**ref_in)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    res = {"out_placements": [_pl(o) for o in out], "out_err": [_err(o.full_tensor(), r) for o, r in zip(out, ref)],
           "local_rows": [o.to_local().shape[0] for o in out]}
    cot = [_data(7 + i, *r.shape) for i, r in enumerate(ref)]
    torch.autograd.backward(list(out), [distribute_tensor(c, mesh, o.placements) for c, o in zip(cot, out)])
    torch.autograd.backward(list(ref), cot)
    res["grad_placements"], res["grad_err"] = {}, {}
    for name, (_, pl, grad) in tensors.items():
        if not grad:
            continue
        g = dist_in[name].grad
        res["grad_placements"][name] = _pl(g) if pl is not None else "plain"
        res["grad_err"][name] = _err(g.full_tensor() if pl is not None else g, ref_in[name].grad)
    return res


def _cases(mesh):
    from torch.distributed.tensor import Replicate, Shard

    import normscope

    R, S0, S1, S2 = [Replicate()], [Shard(0)], [Shard(1)], [Shard(2)]
    out = {}
    w, b = _data(1, 16), _data(2, 16)
    for batch in (8, 9):
        x = _data(3, batch, 4, 16)
        out[f"layer_norm_shard0_b{batch}"] = _case(
            lambda x, w, b: normscope.layer_norm(x, 16, w, b),
            lambda x, w, b: F.layer_norm(x, (16,), w, b),
            {"x": (x, S0, True), "w": (w, R, True), "b": (b, R, True)}, mesh)
    x = _data(4, 2, 9, 16)
    out["rms_norm_shard1"] = _case(
        lambda x, w: normscope.rms_norm(x, 16, w, eps=1e-6),
        lambda x, w: F.rms_norm(x, (16,), w, eps=1e-6),
        {"x": (x, S1, True), "w": (w, R, True)}, mesh)
    # two normalized dims, batch sharded; the input sharded on a normalized dim is replicated first
    x = _data(5, 9, 4, 16)
    w2, b2 = _data(6, 4, 16), _data(9, 4, 16)
    out["layer_norm_2d_shape_shard0"] = _case(
        lambda x, w, b: normscope.layer_norm(x, (4, 16), w, b),
        lambda x, w, b: F.layer_norm(x, (4, 16), w, b),
        {"x": (x, S0, True), "w": (w2, R, True), "b": (b2, R, True)}, mesh)
    out["layer_norm_shard_normalized_dim"] = _case(
        lambda x, w, b: normscope.layer_norm(x, 16, w, b),
        lambda x, w, b: F.layer_norm(x, (16,), w, b),
        {"x": (x, S2, True), "w": (w, R, True), "b": (b, R, True)}, mesh)
    # fused residual add: DTensor residual; plain (replicated) weight and bias tensors
    x, r = _data(10, 9, 4, 16), _data(11, 9, 4, 16)
    out["add_layer_norm_shard0_plain_params"] = _case(
        lambda x, r, w, b: normscope.add_layer_norm(x, r, 16, w, b),
        lambda x, r, w, b: (F.layer_norm(x + r, (16,), w, b), x + r),
        {"x": (x, S0, True), "r": (r, S0, True), "w": (w, None, True), "b": (b, None, True)}, mesh)
    x, r = _data(12, 2, 9, 16), _data(13, 2, 9, 16)
    out["add_rms_norm_shard1"] = _case(
        lambda x, r, w: normscope.add_rms_norm(x, r, 16, w, eps=1e-6),
        lambda x, r, w: (F.rms_norm(x + r, (16,), w, eps=1e-6), x + r),
        {"x": (x, S1, True), "r": (r, S1, True), "w": (w, R, True)}, mesh)
    # masked: a DTensor mask sharded with the batch, and a plain mask with a sequence-sharded input
    x = _data(14, 9, 6, 8)
    m = _data(15, 9, 6, 1) > -0.5
    wm, bm = _data(16, 6, 8), _data(17, 6, 8)
    out["masked_layer_norm_shard0"] = _case(
        lambda x, m, w, b: normscope.masked_layer_norm(x, m, (6, 8), w, b),
        lambda x, m, w, b: normscope.masked_layer_norm(x, m, (6, 8), w, b),
        {"x": (x, S0, True), "m": (m, S0, False), "w": (wm, R, True), "b": (bm, R, True)}, mesh)
    x = _data(18, 2, 9, 16)
    m = _data(19, 2, 9, 16) > -0.5
    out["masked_rms_norm_shard1_plain_mask"] = _case(
        lambda x, m, w: normscope.masked_rms_norm(x, m, 16, w),
        lambda x, m, w: normscope.masked_rms_norm(x, m, 16, w),
        {"x": (x, S1, True), "m": (m, None, False), "w": (w, R, True)}, mesh)
    # a partial-sum input (a row-parallel matmul's output) and a sharded weight: both replicated first
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    x, g = _data(35, 9, 16), _data(36, 9, 16)
    share = 0.25 if dist.get_rank() == 0 else 0.75
    xl = (x * share).requires_grad_()
    xp = DTensor.from_local(xl, mesh, [Partial()], run_check=False)
    ws = distribute_tensor(w, mesh, S0).requires_grad_()
    y = normscope.layer_norm(xp, 16, ws)
    y.backward(distribute_tensor(g, mesh, y.placements))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.layer_norm(xr, (16,), wr).backward(g)
    out["layer_norm_partial_input_sharded_weight"] = {
        "placements": [_pl(y), _pl(ws.grad)],
        "err": [_err(y.full_tensor(), F.layer_norm(x, (16,), w)), _err(xl.grad, xr.grad),
                _err(ws.grad.full_tensor(), wr.grad)],
    }
    # under torch.compile (fullgraph): the custom ops traced on DTensors, their sharding rules at compile time
    x = _data(37, 9, 4, 16)
    torch._dynamo.reset()
    out["compiled_layer_norm_shard0"] = _case(
        torch.compile(lambda x, w, b: normscope.layer_norm(x, 16, w, b), backend="aot_eager", fullgraph=True),
        lambda x, w, b: F.layer_norm(x, (16,), w, b),
        {"x": (x, S0, True), "w": (w, R, True), "b": (b, R, True)}, mesh)
    x = _data(38, 2, 9, 16)
    out["compiled_rms_norm_shard1"] = _case(
        torch.compile(lambda x, w: normscope.rms_norm(x, 16, w, eps=1e-6), backend="aot_eager", fullgraph=True),
        lambda x, w: F.rms_norm(x, (16,), w, eps=1e-6),
        {"x": (x, S1, True), "w": (w, R, True)}, mesh)
    out.update(_direct_ops(mesh))
    out["sequence_parallel_module"] = _module(mesh)
    return out


def _direct_ops(mesh):
    """The custom ops themselves on 2-D DTensors: their registered sharding strategies."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import normscope.ops

    normscope.ops.register_dtensor_sharding()
    ops = torch.ops.normscope
    out = {}
    w, b = _data(20, 16), _data(21, 16)
    for name, rows, pl in (("op_shard0_b8", 8, Shard(0)), ("op_shard0_b9", 9, Shard(0)), ("op_shard1", 8, Shard(1))):
        x = _data(22, rows, 16)
        dx = distribute_tensor(x, mesh, [pl])
        dw, db = (distribute_tensor(t, mesh, [Replicate()]) for t in (w, b))
        y, h, mean, rstd = ops.norm_fwd(dx, None, None, dw, db, 1e-5, False, None)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        ref = F.layer_norm(xr, (16,), wr, br)
        g = _data(23, rows, 16)
        ref.backward(g)
        dg = distribute_tensor(g, mesh, y.placements)
        gx, gw, gb = ops.norm_bwd(dg, None, dx, None, dw, mean, rstd, False, True, torch.float64)
        out[name] = {
            "placements": [_pl(t) for t in (y, mean, rstd, gx, gw, gb)],
            "err": [_err(y.full_tensor(), ref), _err(gx.full_tensor(), xr.grad), _err(gw.full_tensor(), wr.grad),
                    _err(gb.full_tensor(), br.grad)],
        }
    # residual and mask (RMSNorm: ``mean`` is empty): against the same ops on the full tensors
    x, r, g, gh = (_data(40 + i, 9, 16) for i in range(4))
    m = _data(44, 9, 16) > -0.5
    dist_args = [distribute_tensor(t, mesh, [Shard(0)]) for t in (x, r, m, g, gh)]
    dw = distribute_tensor(w, mesh, [Replicate()])
    errs, placements = [], []
    for (x_, r_, m_, g_, gh_), w_ in ((dist_args, dw), ((x, r, m, g, gh), w)):
        y, h, mean, rstd = ops.norm_fwd(x_, r_, m_, w_, None, 1e-6, True, torch.float64)
        gx, gw, _ = ops.norm_bwd(g_, gh_, h, m_, w_, mean, rstd, True, False, torch.float64)
        errs.append([y, h, gx, gw])
        placements.append([_pl(t) for t in (y, h, rstd, gx, gw)] if w_ is dw else None)
    out["op_residual_mask_shard0"] = {
        "placements": placements[0],
        "err": [_err(a.full_tensor(), b_) for a, b_ in zip(*errs)],
    }
    # the ops' autograd on DTensors (what a traced model runs)
    x = _data(24, 8, 16)
    dx = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    dw = distribute_tensor(w, mesh, [Replicate()]).requires_grad_()
    y = ops.norm_fwd(dx, None, None, dw, None, 1e-6, True, None)[0]
    g = _data(25, 8, 16)
    y.backward(distribute_tensor(g, mesh, y.placements))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.rms_norm(xr, (16,), wr, 1e-6).backward(g)
    out["op_autograd_shard0"] = {
        "placements": [_pl(t) for t in (y, dx.grad, dw.grad)],
        "err": [_err(y.full_tensor(), F.rms_norm(x, (16,), w, 1e-6)), _err(dx.grad.full_tensor(), xr.grad),
                _err(dw.grad.full_tensor(), wr.grad)],
    }
    return out


def _module(mesh):
    """A tensor- and sequence-parallel block after normscope.convert: a column- then row-parallel
    Linear pair whose output is reduce-scattered over the sequence, then a LayerNorm and an RMSNorm
    under SequenceParallel (the Megatron layout)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    import normscope

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.LayerNorm(16),
                                torch.nn.RMSNorm(16, eps=1e-6)).double()
        with torch.no_grad():
            m[2].weight.copy_(_data(30, 16))
            m[2].bias.copy_(_data(31, 16))
            m[3].weight.copy_(_data(32, 16))
        return m

    ref_model, model = make(), make()
    converted = [r.name for r in normscope.convert(model)]
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel(output_layouts=Shard(1)),
                                     "2": SequenceParallel(), "3": SequenceParallel()})
    x, g = _data(33, 2, 8, 16), _data(34, 2, 8, 16)
    y = model(x)
    y.backward(distribute_tensor(g, mesh, y.placements))
    yr = ref_model(x)
    yr.backward(g)
    return {
        "converted": converted,
        "classes": [type(mod).__module__ for mod in model][2:],
        "out_placements": _pl(y),
        "err": [_err(y.full_tensor(), yr)] + [_err(p.grad.full_tensor(), q.grad)
                                              for p, q in zip(model.parameters(), ref_model.parameters())],
    }


def _worker(rank, world, port, out_dir):
    with gloo_rank(rank, world, port, out_dir):
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        write_result(out_dir, rank, _cases(init_device_mesh("cpu", (world,))))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dtensor"), timeout=240.0)


TOL = 1e-10

FUNCTIONAL = {
    # name: (output placements, gradient placements by input, local rows of rank 0 / rank 1)
    "layer_norm_shard0_b8": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "w": "(Partial(sum),)",
                                                "b": "(Partial(sum),)"}, (4, 4)),
    "layer_norm_shard0_b9": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "w": "(Partial(sum),)",
                                                "b": "(Partial(sum),)"}, (5, 4)),
    "rms_norm_shard1": ("(Shard(dim=1),)", {"x": "(Shard(dim=1),)", "w": "(Partial(sum),)"}, (2, 2)),
    "layer_norm_2d_shape_shard0": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "w": "(Partial(sum),)",
                                                      "b": "(Partial(sum),)"}, (5, 4)),
    # replicated before normalizing; the input gradient comes back in the input's placements
    "layer_norm_shard_normalized_dim": ("(Replicate(),)", {"x": "(Shard(dim=2),)", "w": "(Replicate(),)",
                                                           "b": "(Replicate(),)"}, (9, 9)),
    "add_layer_norm_shard0_plain_params": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "r": "(Shard(dim=0),)",
                                                              "w": "plain", "b": "plain"}, (5, 4)),
    "add_rms_norm_shard1": ("(Shard(dim=1),)", {"x": "(Shard(dim=1),)", "r": "(Shard(dim=1),)",
                                               "w": "(Partial(sum),)"}, (2, 2)),
    "masked_layer_norm_shard0": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "w": "(Partial(sum),)",
                                                    "b": "(Partial(sum),)"}, (5, 4)),
    "masked_rms_norm_shard1_plain_mask": ("(Shard(dim=1),)", {"x": "(Shard(dim=1),)", "w": "(Partial(sum),)"},
                                          (2, 2)),
    "compiled_layer_norm_shard0": ("(Shard(dim=0),)", {"x": "(Shard(dim=0),)", "w": "(Partial(sum),)",
                                                      "b": "(Partial(sum),)"}, (5, 4)),
    "compiled_rms_norm_shard1": ("(Shard(dim=1),)", {"x": "(Shard(dim=1),)", "w": "(Partial(sum),)"}, (2, 2)),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_on_dtensor(results, name):
    out_pl, grad_pl, rows = FUNCTIONAL[name]
    for rank, res in enumerate(results):
        case = res[name]
        assert all(p == out_pl for p in case["out_placements"]), case
        assert max(case["out_err"]) < TOL, case
        assert case["grad_placements"] == grad_pl, case
        assert max(case["grad_err"].values()) < TOL, case
    # the 9 rows / 9 positions split 5 + 4 (torch's chunking); shape[0] of the local shard
    assert tuple(res[name]["local_rows"][0] for res in results) == rows


def test_partial_input_and_sharded_weight_are_replicated(results):
    for res in results:
        case = res["layer_norm_partial_input_sharded_weight"]
        # the weight gradient comes back in the weight's placements
        assert case["placements"] == ["(Replicate(),)", "(Shard(dim=0),)"], case
        assert max(case["err"]) < TOL, case


@pytest.mark.parametrize("name", ["op_shard0_b8", "op_shard0_b9"])
def test_custom_ops_row_sharding(results, name):
    for res in results:
        case = res[name]
        # y, mean, rstd, dx sharded on rows; dw, db partial sums
        assert case["placements"] == ["(Shard(dim=0),)"] * 4 + ["(Partial(sum),)"] * 2, case
        assert max(case["err"]) < TOL, case


def test_custom_ops_residual_and_mask_row_sharding(results):
    for res in results:
        case = res["op_residual_mask_shard0"]
        assert case["placements"] == ["(Shard(dim=0),)"] * 4 + ["(Partial(sum),)"], case
        assert max(case["err"]) < TOL, case


def test_custom_ops_input_sharded_on_normalized_dim_is_replicated(results):
    for res in results:
        case = res["op_shard1"]
        assert case["placements"] == ["(Replicate(),)"] * 6, case
        assert max(case["err"]) < TOL, case


def test_custom_op_autograd_on_dtensor(results):
    for res in results:
        case = res["op_autograd_shard0"]
        assert case["placements"] == ["(Shard(dim=0),)", "(Shard(dim=0),)", "(Partial(sum),)"], case
        assert max(case["err"]) < TOL, case


def test_converted_modules_under_tensor_and_sequence_parallel(results):
    for res in results:
        case = res["sequence_parallel_module"]
        assert case["converted"] == ["2", "3"], case
        assert case["classes"] == ["normscope.nn", "normscope.nn"], case
        assert case["out_placements"] == "(Shard(dim=1),)", case
        assert len(case["err"]) == 8 and max(case["err"]) < TOL, case
