"""Distributed tensors (``torch.distributed.tensor.DTensor``) for the normscope ops.

Two parts, both loaded only when a DTensor is met (``torch.distributed.tensor`` is never imported
by ``import normscope``):

* :func:`register` gives the ``normscope::norm_fwd`` / ``normscope::norm_bwd`` custom ops DTensor
  sharding strategies (``torch.distributed.tensor.experimental.register_sharding``). On the 2-D
  problem ``(M, N)`` the rows are independent: inputs sharded on rows (``Shard(0)``) give outputs
  sharded on rows (``y``, ``h``, ``mean``, ``rstd``, ``dx``), with ``weight`` / ``bias``
  replicated and their gradients ``Partial()`` (a sum over the ranks' rows). An input sharded on
  the normalized dim or partial is redistributed to the all-replicated strategy.
* :func:`run` is what the public functions do with a DTensor input of any rank: they cannot
  flatten a tensor sharded unevenly, or on a dim other than the first, into ``(M, N)`` without an
  all-gather, so they run the ops on each rank's local shard instead (every normalized row lies
  whole on one rank) and wrap the outputs as DTensors with the input's placements and global
  shape. Gradients get the same placements (``Partial()`` for weight / bias on every mesh dim
  where the input is sharded).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor

_registered = False


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed.tensor``)."""
    if type(t) is Tensor or type(t) is torch.nn.Parameter:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _opt(t, placement):
    return None if t is None else placement


def _rows_fwd(x, residual, mask, weight, bias, *flags, **kwflags):
    """Strategies of ``norm_fwd``: ``[y, h, mean, rstd]`` and the placements of its arguments."""
    from torch.distributed.tensor import Replicate, Shard

    opt = _opt
    tail = [None] * len(flags)
    strategies = []
    rms = flags[1] if len(flags) > 1 else kwflags["rms"]
    # Rows sharded: everything row-shaped is sharded the same way; the empty outputs (``h`` without
    # a residual, ``mean`` for RMSNorm) are replicated.
    strategies.append((
        [Shard(0), Shard(0) if residual is not None else Replicate(), Replicate() if rms else Shard(0), Shard(0)],
        [Shard(0), opt(residual, Shard(0)), opt(mask, Shard(0)), opt(weight, Replicate()),
         opt(bias, Replicate()), *tail],
    ))
    strategies.append((
        [Replicate()] * 4,
        [Replicate(), opt(residual, Replicate()), opt(mask, Replicate()), opt(weight, Replicate()),
         opt(bias, Replicate()), *tail],
    ))
    return strategies


def _rows_bwd(dy, dh, xn, mask, weight, mean, rstd, *flags, **kwflags):
    """Strategies of ``norm_bwd``: ``[dx, dw, db]`` and the placements of its arguments."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    opt = _opt
    tail = [None] * len(flags)
    rms = flags[0] if flags else kwflags["rms"]
    # dw / db are sums over rows: partial on each rank (size-0 without weight / bias); ``mean`` is
    # size-0 for RMSNorm, replicated.
    strategies = [
        (
            [Shard(0), Partial(), Partial()],
            [Shard(0), opt(dh, Shard(0)), Shard(0), opt(mask, Shard(0)), opt(weight, Replicate()),
             Replicate() if rms else Shard(0), Shard(0), *tail],
        ),
        (
            [Replicate()] * 3,
            [Replicate(), opt(dh, Replicate()), Replicate(), opt(mask, Replicate()), opt(weight, Replicate()),
             Replicate(), Replicate(), *tail],
        ),
    ]
    return strategies


def register() -> None:
    """Register the DTensor sharding strategies of ``normscope::norm_fwd`` / ``norm_bwd`` (once)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    import normscope.ops.core  # noqa: F401  (defines the ops)

    ops = torch.ops.normscope
    for op, fn, first_static in ((ops.norm_fwd.default, _rows_fwd, 5), (ops.norm_bwd.default, _rows_bwd, 7)):
        register_sharding(op)(fn)
        # The flags after the tensors (rms, has_bias, dtypes) belong in the sharding cache's key.
        DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
            static_argnum=first_static, needs_pytree=True
        )
    _registered = True


def _local_placements(x, lead: int) -> tuple:
    """``x``'s placements with normalized dims, partial sums and strided shards replicated."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in x.placements:
        if type(p) is Shard and p.dim < lead:
            out.append(p)
        else:
            out.append(Replicate())
    return tuple(out)


def _as_dtensor(t: Tensor, mesh):
    """``t`` as a DTensor of ``mesh``: a plain tensor is taken as replicated (equal on every rank)."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise ValueError(
                f"Expected every DTensor argument on the input's device mesh {mesh}, but got {t.device_mesh}"
            )
        return t
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _mask_placements(mask, x_placements, x_dim: int) -> tuple:
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in x_placements:
        md = p.dim - (x_dim - mask.dim()) if p.is_shard() else -1
        out.append(Shard(md) if md >= 0 and mask.shape[md] != 1 else Replicate())
    return tuple(out)


def run(fn: Callable, x, residual: Optional[Tensor], mask: Optional[Tensor], weight: Optional[Tensor],
        bias: Optional[Tensor], k: int):
    """Run ``fn(x, residual, mask, weight, bias)`` (a public op on plain tensors) on DTensor ``x``.

    ``k`` is the number of normalized (trailing) dims. ``residual``, ``mask``, ``weight`` and
    ``bias`` may be DTensors on ``x``'s mesh or plain tensors, taken as equal on every rank.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    register()
    mesh = x.device_mesh
    lead = x.dim() - k
    placements = _local_placements(x, lead)
    if x.placements != placements:
        x = x.redistribute(mesh, placements)
    if residual is not None:
        residual = _as_dtensor(residual, mesh)
        if residual.placements != placements:
            residual = residual.redistribute(mesh, placements)
    if mask is not None:
        mask = _as_dtensor(mask, mesh)
        mp = _mask_placements(mask, placements, x.dim())
        if mask.placements != mp:
            mask = mask.redistribute(mesh, mp)
    replicated = tuple(Replicate() for _ in placements)
    # Each rank's weight / bias gradient sums its own rows: partial wherever the rows are sharded.
    grad_placements = tuple(Partial() if p.is_shard() else Replicate() for p in placements)

    def param(p):
        if p is None:
            return None
        p = _as_dtensor(p, mesh)
        if p.placements != replicated:
            p = p.redistribute(mesh, replicated)
        return p.to_local(grad_placements=grad_placements)

    out = fn(
        x.to_local(),
        None if residual is None else residual.to_local(),
        None if mask is None else mask.to_local(),
        param(weight),
        param(bias),
    )
    stride = torch._prims_common.make_contiguous_strides_for(x.shape)

    def wrap(t: Tensor):
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=x.shape, stride=stride)

    if isinstance(out, tuple):
        return tuple(wrap(t) for t in out)
    return wrap(out)
