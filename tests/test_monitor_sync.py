"""The monitor reads nothing back from the device between flushes, and one packed buffer per flush.

On CUDA a host read of device data (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, a
device-to-host or pageable host-to-device copy, an op whose output shape depends on the data such as
``nonzero`` or boolean indexing) blocks the CPU until the GPU catches up. On the CPU such reads are
free, so they are made visible here: :class:`HostReads` records every one of them at two levels,
the torch-function level (Tensor methods and torch functions, as the monitor's Python code calls
them) and the dispatcher level (the aten ops that read a scalar or need the data to size their
output). The first test proves it catches each pattern, also inside hooks, backward and
``torch.compiler.disable``'d code; the others run training steps under it. tests/test_monitor_cuda.py
checks the same on a GPU with ``torch.cuda.set_sync_debug_mode("error")``. A third level patches the
reading methods on ``torch.Tensor`` itself, for code that modes do not reach.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from normscope.monitor import Monitor

# Tensor methods / torch functions that read data on the host, copy between host and device, or
# produce an output whose size depends on the data.
HOST_FUNCS = {
    "item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__format__", "__repr__", "__str__", "cpu", "tensor", "as_tensor", "from_numpy", "asarray", "equal",
    "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "histc",
    "repeat_interleave", "is_nonzero",
}
HOST_ATEN = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero",
    "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount", "aten.repeat_interleave",
    "aten.histc",
}


def _is_cpu_device(a) -> bool:
    return (isinstance(a, str) and a.startswith("cpu")) or (isinstance(a, torch.device) and a.type == "cpu")


# Tensor methods also patched on the class: torch-function modes do not reach some code (the backward
# of a custom autograd.Function runs with them off), and CPU reads such as tolist() never reach the
# dispatcher.
PATCHED_METHODS = ["item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__",
                   "__format__", "__repr__", "cpu"]


class HostReads:
    """Context manager recording every host read of tensor data (see the module docstring)."""

    def __init__(self):
        self.events = []
        self._saved = {}
        self._suppress = None
        outer = self

        class Funcs(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", str(func))
                if name in HOST_FUNCS:
                    outer.events.append(name)
                elif name == "to" and any(_is_cpu_device(a) for a in list(args[1:]) + list(kwargs.values())):
                    outer.events.append("to(cpu)")
                elif name == "copy_" and isinstance(args[1], torch.Tensor) and args[0].device != args[1].device:
                    outer.events.append("copy_(cross-device)")
                if name in PATCHED_METHODS:
                    outer._suppress = name  # the patched method called next is this very call: count it once
                return func(*args, **kwargs)

        class Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if name in HOST_ATEN:
                    outer.events.append(name)
                elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
                    outer.events.append(name + "(bool)")
                return func(*args, **(kwargs or {}))

        self._modes = (Funcs(), Aten())

    def __enter__(self):
        for name in PATCHED_METHODS:
            original = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._recording(name, original))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _recording(self, name, original):
        @functools.wraps(original)
        def method(*args, **kwargs):
            if self._suppress == name:
                self._suppress = None
            else:
                self.events.append(f"Tensor.{name}")
            return original(*args, **kwargs)

        return method


def _in_backward_hook():
    x = torch.randn(3, requires_grad=True)
    x.register_hook(lambda g: g.sum().item() and None)
    return (x * 2).sum().backward


def _in_forward_hook():
    lin = torch.nn.Linear(2, 2)
    lin.register_forward_hook(lambda m, a, o: o.sum().tolist() and None)
    return lambda: lin(torch.randn(1, 2))


def _in_disabled_function():
    fn = torch.compiler.disable(lambda t: bool(t.sum() > 0))
    return lambda: fn(torch.randn(3))


t = torch.randn(4)
PATTERNS = {
    "item": lambda: t.sum().item(),
    "tolist": lambda: t.tolist(),
    "bool": lambda: bool(t.sum() > 0),
    "if": lambda: 1 if (t > 10).any() else 0,
    "float": lambda: float(t.sum()),
    "int": lambda: int(t.argmax()),
    "index": lambda: [1, 2, 3, 4][t.argmax()],
    "numpy": lambda: t.numpy(),
    "np.asarray": lambda: np.asarray(t),
    "cpu": lambda: t.cpu(),
    "to(cpu)": lambda: t.to("cpu"),
    "torch.tensor": lambda: torch.tensor([1.0, 2.0]),
    "equal": lambda: torch.equal(t, t),
    "nonzero": lambda: t.nonzero(),
    "bool index": lambda: t[t > 0],
    "f-string": lambda: f"{t.sum():.3f}",
    "max()": lambda: max(t[0], t[1]),
    "in backward hook": lambda: _in_backward_hook()(),
    "in forward hook": lambda: _in_forward_hook()(),
    "in disabled function": lambda: _in_disabled_function()(),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_detector_catches_every_kind_of_host_read(name):
    with HostReads() as reads:
        PATTERNS[name]()
    assert reads.events, name


def test_the_detector_is_quiet_on_device_side_work():
    buf = torch.zeros(8, dtype=torch.float64)
    with HostReads() as reads:
        x = torch.randn(16, 4)
        var, mean = torch.var_mean(x, -1)
        buf[:2].add_(torch.stack([var.sum(dtype=torch.float64), torch.isnan(x).sum(dtype=torch.float64)]))
        buf.scatter_add_(0, torch.bucketize(var, torch.linspace(0, 2, 5)), torch.ones(16, dtype=torch.float64))
        torch.maximum(buf[:3], torch.where(var[:3] > 1, var[:3], -1.0).double(), out=buf[:3])
    assert reads.events == []


class HFRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class Net(torch.nn.Module):
    """Every kind of norm the monitor knows, in a small conv + MLP model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.inorm = torch.nn.InstanceNorm1d(8, affine=True)
        self.fc = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16)
        self.hf = HFRMSNorm(16)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        h = self.inorm(self.gn(self.bn(self.conv(x)))).transpose(1, 2)
        return self.head(self.hf(self.rms(self.ln(self.fc(h)))))


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_no_host_reads_between_flushes(cpu_kernel):
    # cpu_kernel=False: the pure-torch path, the one CUDA tensors take; True: the fused CPU kernel.
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    xs = [torch.randn(6, 4, 10) for _ in range(7)]
    xs[4][2, 1, 3] = float("nan")  # the non-finite path, too, must stay on the device
    mon = Monitor(model, every=2, row_fraction=0.5, flush_every=None, cpu_kernel=cpu_kernel)
    with HostReads() as reads:
        for step, x in enumerate(xs):
            if step == 5:
                with torch.inference_mode():
                    model(x)
            else:
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            mon.step()
    assert reads.events == []
    # ... and the steps did real work: every layer was sampled on steps 0, 2, 4 and 6, with gradients.
    stats = {r["layer"]: r for r in mon.flush() if r["type"] == "layer_stats"}
    assert sorted(stats) == sorted(["bn", "gn", "inorm", "ln", "rms", "hf"])
    assert all(s["calls"] == 4 and s["grad_input_steps"] == 4 and s["grad_param_steps"] == 4 for s in stats.values())
    assert stats["bn"]["nan_in"] > 0 and stats["ln"]["nan_in"] > 0
    assert any(f.kind == "nonfinite_input" and f.layer == "bn" and f.step == 4 for f in mon.findings())


def test_a_flush_reads_one_packed_buffer_per_device():
    torch.manual_seed(0)
    model = Net()
    mon = Monitor(model, every=1, flush_every=None)
    for _ in range(2):
        model(torch.randn(6, 4, 10)).sum().backward()
        mon.step()
    with HostReads() as reads:
        records = mon.flush()
    # Statistics, histograms and gamma/beta statistics together: one .to("cpu") and one .tolist()
    # (seen by the patched method, then by the torch-function mode).
    assert reads.events == ["to(cpu)", "Tensor.tolist", "tolist"]
    assert sum(r["type"] == "layer_stats" for r in records) == 6
    with HostReads() as reads:
        assert mon.flush() == []  # nothing new: no transfer at all
    assert reads.events == []


@pytest.mark.parametrize("entry", ["_observe", "_on_input_grad", "_read_param_grads", "_fold_grads"])
def test_the_detector_sees_a_host_read_planted_in_any_monitor_code_path(entry, monkeypatch):
    original = getattr(Monitor, entry)

    def planted(self, *args):
        original(self, *args)
        torch.ones(2).sum().item()  # what a careless change to the monitor would do

    monkeypatch.setattr(Monitor, entry, planted)
    model = Net()
    mon = Monitor(model, every=1, flush_every=None, cpu_kernel=False)
    with HostReads() as reads:
        model(torch.randn(6, 4, 10)).sum().backward()
        mon.step()
    assert "Tensor.item" in reads.events and "aten._local_scalar_dense" in reads.events
