"""The monitor's hooks under ``torch.compile``: ``torch.library`` custom ops, opaque to Dynamo.

When ``torch.compiler.is_compiling()``, the hooks of :class:`normscope.monitor.Monitor` do not run
Python (that would be traced, and every host-side side effect would break the graph or recompile it
at each step); they call these ops instead, which the compiled graph calls at run time:

* ``normscope::monitor_observe(x, y, token!, monitor, layer)``: one forward call of a layer. At run
  time it hands ``x`` and ``y`` to the monitor's eager measurement (``Monitor._observe``: the fused
  CPU kernel or the torch statistics, the host counters, the call order), exactly as an eager hook
  does. It declares that it mutates ``token`` (a one-element tensor of the monitor): this keeps the
  call in the graph (an op without outputs or mutations could be removed as dead code) and orders
  the calls of one step as the layers run.
* ``normscope::monitor_grad(grad!, monitor, layer)``, in the backward of the input tap (an identity
  ``autograd.Function`` that Dynamo traces): hands the gradient w.r.t. the layer's input to
  ``Monitor._on_input_grad`` (what the eager path's ``_GradTap`` does). It declares that it mutates
  ``grad`` (it does not change it), which keeps it in the backward graph, in order.

``monitor`` is a small integer naming a live monitor (:func:`register`), and ``layer`` the layer's
index: both are constants of the graph, fixed for the monitor's life. The step number, the
sampling state and everything else the measurement needs are read at run time from the monitor,
so the graph does not change from step to step; whether a step is sampled is decided outside the
ops (the hooks' Python gate, which Dynamo guards: one graph for sampled steps, one for the others).
A closed or collected monitor turns the ops into no-ops.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import Optional

import torch
from torch import Tensor

__all__ = ["register", "observe", "tap"]

_MONITORS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def register(monitor) -> int:
    """A new id under which the ops find ``monitor`` (held weakly).

    Also drops the code that torch.compile has compiled so far in this process, if any: Dynamo does
    not guard on a module's hooks, so code compiled before the monitor's hooks existed (a first
    compiled call before the monitor, or a previous monitor since closed) would otherwise go on
    running without them. It is compiled again on its next call (from Inductor's caches, mostly).
    """
    mid = next(_IDS)
    _MONITORS[mid] = monitor
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        cf = dynamo.convert_frame
        if any(w() is not None for w in cf.input_codes.seen + cf.output_codes.seen):
            dynamo.reset_code_caches()
    return mid


def _live(mid: int):
    m = _MONITORS.get(mid)
    return None if m is None or m._closed else m


@torch.library.custom_op("normscope::monitor_observe", mutates_args=("token",))
def monitor_observe(x: Optional[Tensor], y: Optional[Tensor], token: Tensor, monitor: int, layer: int) -> None:
    """Accumulate one forward call of layer ``layer`` of monitor ``monitor`` (see the module docstring)."""
    m = _live(monitor)
    if m is not None and not m._paused:
        m._observe(layer, x, y)


@monitor_observe.register_fake
def _monitor_observe_fake(x, y, token, monitor, layer) -> None:
    return None


@torch.library.custom_op("normscope::monitor_grad", mutates_args=("grad",))
def monitor_grad(grad: Tensor, monitor: int, layer: int) -> None:
    """Hand ``grad`` (w.r.t. the input of layer ``layer``) to monitor ``monitor``; ``grad`` is left unchanged."""
    m = _live(monitor)
    if m is not None:
        m._on_input_grad(layer, grad)


@monitor_grad.register_fake
def _monitor_grad_fake(grad, monitor, layer) -> None:
    return None


class _Tap(torch.autograd.Function):
    """Identity (a view) whose backward runs :func:`monitor_grad`; Dynamo traces it into the graph."""

    @staticmethod
    def forward(ctx, x, monitor, layer):
        ctx.monitor, ctx.layer = monitor, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        monitor_grad(grad, ctx.monitor, ctx.layer)
        return grad, None, None


def observe(x: Optional[Tensor], y: Optional[Tensor], token: Tensor, monitor: int, layer: int) -> None:
    """The compiled form of the forward hook's measurement."""
    monitor_observe(x, y, token, monitor, layer)


def tap(x: Tensor, monitor: int, layer: int) -> Tensor:
    """The compiled form of the input-gradient tap."""
    return _Tap.apply(x, monitor, layer)
