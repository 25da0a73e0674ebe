"""Each misuse that torch's ``layer_norm`` / ``rms_norm`` (functions and modules) reject is run
against torch and against normscope: normscope's exception must be an instance of torch's class, so
``except RuntimeError`` written for torch still catches it, and a regex a user would write for
torch's message (where given) must match normscope's message too. Arguments that torch accepts
must be accepted by normscope, with torch's result.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normscope
from normscope.errors import DeviceError, DtypeError, NormscopeError, ShapeError

X = torch.randn(2, 3, 8)


class Lib:
    """The same call spelled for torch (``ours=False``) or for normscope (``ours=True``)."""

    def __init__(self, ours: bool):
        self.layer_norm = normscope.layer_norm if ours else TF.layer_norm
        self.rms_norm = normscope.rms_norm if ours else TF.rms_norm
        self.LayerNorm = normscope.nn.LayerNorm if ours else torch.nn.LayerNorm
        self.RMSNorm = normscope.nn.RMSNorm if ours else torch.nn.RMSNorm


TORCH, OURS = Lib(False), Lib(True)

# (id, call, regex a user would write for torch's message, or None where normscope words it its own way)
MISUSES = [
    ("ln-input-shape", lambda t: t.layer_norm(X, (4,)),
     r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\], but got input of size\[2, 3, 8\]"),
    ("ln-input-shape-2d", lambda t: t.layer_norm(X, (3, 4)), r"expected input with shape \[\*, 3, 4\]"),
    ("ln-input-rank", lambda t: t.layer_norm(torch.randn(8), (2, 8)), r"but got input of size\[8\]"),
    ("ln-input-0d", lambda t: t.layer_norm(torch.tensor(1.0), (1,)), r"Given normalized_shape=\[1\]"),
    ("rms-input-shape", lambda t: t.rms_norm(X, (4,)), r"Given normalized_shape=\[4\]"),
    ("ln-zero-size-shape", lambda t: t.layer_norm(X, (0,)), r"expected input with shape \[\*, 0\]"),
    ("ln-negative-shape", lambda t: t.layer_norm(X, (-1,)), r"Given normalized_shape=\[-1\]"),
    ("ln-empty-shape", lambda t: t.layer_norm(X, []), r"Expected normalized_shape to be at least 1-dimensional"),
    ("rms-empty-shape", lambda t: t.rms_norm(X, []), r"but got normalized_shape = \[\]"),
    ("ln-weight-shape", lambda t: t.layer_norm(X, (8,), torch.ones(4)),
     r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\] "
     r"and normalized_shape = \[8\]"),
    ("ln-bias-shape", lambda t: t.layer_norm(X, (8,), None, torch.ones(2, 4)),
     r"but got bias of shape \[2, 4\] and normalized_shape = \[8\]"),
    ("rms-weight-shape", lambda t: t.rms_norm(X, (8,), torch.ones(7)), r"same shape as normalized_shape"),
    ("ln-input-long", lambda t: t.layer_norm(X.long(), (8,)), r"not implemented for 'Long'"),
    ("ln-input-bool", lambda t: t.layer_norm(X > 0, (8,)), r"not implemented for 'Bool'"),
    ("ln-input-complex", lambda t: t.layer_norm(X.to(torch.complex64), (8,)), r"not implemented for 'ComplexFloat'"),
    ("rms-input-int", lambda t: t.rms_norm(X.int(), (8,)), r"not implemented for 'Int'"),
    ("ln-weight-int", lambda t: t.layer_norm(X, (8,), torch.ones(8, dtype=torch.int32)), None),
    ("ln-weight-device", lambda t: t.layer_norm(X, (8,), torch.ones(8, device="meta")), None),
    ("ln-bias-device", lambda t: t.layer_norm(X, (8,), torch.ones(8), torch.ones(8, device="meta")), None),
    ("rms-weight-device", lambda t: t.rms_norm(X, (8,), torch.ones(8, device="meta")), None),
    ("ln-input-numpy", lambda t: t.layer_norm(X.numpy(), (8,)), None),
    ("rms-input-none", lambda t: t.rms_norm(None, (8,)), None),
    ("ln-weight-list", lambda t: t.layer_norm(X, (8,), [1.0] * 8), None),
    ("ln-shape-str", lambda t: t.layer_norm(X, "8"), None),
    ("ln-eps-str", lambda t: t.layer_norm(X, (8,), eps="1e-5"), None),
    ("ln-eps-none", lambda t: t.layer_norm(X, (8,), eps=None), None),
    ("LayerNorm-input-shape", lambda t: t.LayerNorm(8)(torch.randn(2, 7)), r"Given normalized_shape=\[8\]"),
    ("LayerNorm-input-shape-2d", lambda t: t.LayerNorm((3, 8))(torch.randn(2, 4, 8)),
     r"expected input with shape \[\*, 3, 8\], but got input of size\[2, 4, 8\]"),
    ("RMSNorm-input-shape", lambda t: t.RMSNorm(8)(torch.randn(2, 7)), r"Given normalized_shape=\[8\]"),
    ("LayerNorm-input-long", lambda t: t.LayerNorm(8)(X.long()), None),  # torch: "mixed dtype (CPU)"
    ("RMSNorm-input-long", lambda t: t.RMSNorm(8)(X.long()), r"not implemented for 'Long'"),
    ("LayerNorm-params-device", lambda t: t.LayerNorm(8, device="meta")(X), None),
    ("RMSNorm-params-device", lambda t: t.RMSNorm(8, device="meta")(X), None),
]


def _raised(call, lib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Mismatch dtype between input and weight" warning
        try:
            call(lib)
        except Exception as e:  # noqa: BLE001 - the point is to look at whatever was raised
            return e
    return None


@pytest.mark.parametrize("call,pattern", [m[1:] for m in MISUSES], ids=[m[0] for m in MISUSES])
def test_misuse_raises_torchs_exception_class(call, pattern):
    theirs = _raised(call, TORCH)
    assert theirs is not None, "torch accepts this call; the table is out of date"
    ours = _raised(call, OURS)
    assert ours is not None, f"normscope accepted a call torch rejects with {theirs!r}"
    assert isinstance(ours, type(theirs)), f"torch raised {type(theirs).__name__}, normscope {ours!r}"
    if pattern is not None:
        assert re.search(pattern, str(theirs)), f"the regex does not match torch's message {theirs}"
        assert re.search(pattern, str(ours)), f"torch's regex {pattern!r} does not match {ours}"


@pytest.mark.parametrize("call,pattern", [m[1:] for m in MISUSES], ids=[m[0] for m in MISUSES])
def test_misuse_keeps_normscopes_classes(call, pattern):
    """What normscope raised before (TypeError / ValueError) is still caught by the same clause."""
    ours = _raised(call, OURS)
    assert isinstance(ours, (TypeError, ValueError))
    if isinstance(ours, NormscopeError):
        assert isinstance(ours, (ShapeError, DtypeError, DeviceError))


def test_error_classes():
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, RuntimeError)
    assert issubclass(DtypeError, TypeError) and issubclass(DtypeError, NotImplementedError)
    assert issubclass(DtypeError, RuntimeError)
    assert issubclass(DeviceError, ValueError) and issubclass(DeviceError, RuntimeError)
    assert normscope.errors.ShapeError is ShapeError


def test_residual_and_mask_misuse_raise_the_same_classes():
    # no torch counterpart: torch's `x + residual` and masking raise RuntimeError for these shapes
    with pytest.raises(RuntimeError) as theirs:
        X + torch.randn(2, 3, 4)
    with pytest.raises(type(theirs.value), match=r"Expected residual of the input's size"):
        normscope.add_layer_norm(X, torch.randn(2, 3, 4), 8)
    with pytest.raises(ShapeError, match=r"Expected mask broadcastable"):
        normscope.masked_rms_norm(X, torch.ones(2, 4, 1, dtype=torch.bool), 8)
    with pytest.raises(DtypeError, match=r"Expected mask of dtype torch.bool, but got torch.float32"):
        normscope.masked_layer_norm(X, torch.ones(2, 3, 1), 8)
    with pytest.raises(DeviceError, match=r"Expected all tensors to be on the same device, but got residual on meta"):
        normscope.add_rms_norm(X, torch.empty(2, 3, 8, device="meta"), 8)


# Calls torch accepts: normscope must accept them too and compute torch's result.
ACCEPTED = [
    ("rms-weight-long", lambda t: t.rms_norm(X, (8,), torch.arange(8))),
    ("rms-weight-bool", lambda t: t.rms_norm(X, (8,), torch.arange(8) > 3)),
    ("rms-weight-long-bf16", lambda t: t.rms_norm(X.bfloat16(), (8,), torch.arange(8))),
    ("rms-weight-float64", lambda t: t.rms_norm(X, (8,), torch.linspace(0.5, 1.5, 8, dtype=torch.float64))),
    ("ln-empty-batch", lambda t: t.layer_norm(torch.randn(0, 8), (8,), torch.ones(8), torch.zeros(8))),
    ("ln-zero-size-rows", lambda t: t.layer_norm(torch.randn(3, 0), (0,))),
    ("rms-zero-size-rows", lambda t: t.rms_norm(torch.randn(3, 0), (0,), torch.ones(0))),
    ("ln-0d-input-empty-shape-of-size-1", lambda t: t.layer_norm(torch.randn(1), (1,))),
]


@pytest.mark.parametrize("call", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_calls_torch_accepts_are_accepted(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = call(TORCH)
        got = call(OURS)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_integer_weight_matches_float_weight_gradient_for_input():
    x = X.clone().requires_grad_()
    normscope.rms_norm(x, 8, torch.arange(8)).sum().backward()
    g = x.grad
    x.grad = None
    TF.rms_norm(x, (8,), torch.arange(8).float()).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_numpy_is_rejected_with_the_type_name():
    with pytest.raises(TypeError, match=r"Expected input to be a torch.Tensor, but got ndarray"):
        normscope.layer_norm(np.zeros((2, 8), dtype=np.float32), 8)
