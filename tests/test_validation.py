"""Bad input gets TypeError / ValueError in PyTorch's "Expected X, but got Y" form (or torch's own
wording where torch has one); the classes of normscope.errors also derive from torch's classes for
the same misuse (tests/test_ops_errors.py compares them with torch's)."""

from __future__ import annotations

import pytest
import torch

import normscope
from normscope.ops import dispatch

X = torch.randn(2, 3, 8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: normscope.layer_norm(X, 4), ValueError,
         r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\], but got input of size\[2, 3, 8\]"),
        (lambda: normscope.layer_norm(X, (3, 4)), ValueError, r"expected input with shape \[\*, 3, 4\]"),
        (lambda: normscope.layer_norm(torch.randn(8), (2, 8)), ValueError, r"but got input of size\[8\]"),
        (lambda: normscope.layer_norm(X, 8, torch.ones(4)), ValueError,
         r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\] "
         r"and normalized_shape = \[8\]"),
        (lambda: normscope.layer_norm(X, 8, None, torch.ones(2, 4)), ValueError,
         r"Expected bias to be of same shape as normalized_shape, but got bias of shape \[2, 4\]"),
        (lambda: normscope.rms_norm(X, 8, torch.ones(7)), ValueError, r"but got weight of shape \[7\]"),
        (lambda: normscope.layer_norm(X, 8, eps=-1e-5), ValueError,
         r"Expected eps to be a finite number >= 0, but got -1e-05"),
        (lambda: normscope.rms_norm(X, 8, eps=float("nan")), ValueError, r"but got nan"),
        (lambda: normscope.layer_norm(X, 8, eps="1e-5"), TypeError, r"Expected eps to be a real number, but got str"),
        (lambda: normscope.layer_norm(X.long(), 8), TypeError,
         r"Expected input of dtype float16, bfloat16, float32 or float64, but got torch.int64 "
         r"\(not implemented for 'Long'\)"),
        (lambda: normscope.layer_norm(X.numpy(), 8), TypeError,
         r"Expected input to be a torch.Tensor, but got ndarray"),
        (lambda: normscope.layer_norm(X, 8, torch.ones(8, dtype=torch.int32)), TypeError,
         r"Expected weight of dtype .*, but got torch.int32"),
        (lambda: normscope.layer_norm(X, 8, torch.ones(8, device="meta")), ValueError,
         r"Expected all tensors to be on the same device, but got weight on meta and input on cpu"),
        (lambda: normscope.layer_norm(X, "8"), TypeError,
         r"Expected normalized_shape to be an int or a sequence of ints"),
        (lambda: normscope.layer_norm(X, []), ValueError,
         r"Expected normalized_shape to be at least 1-dimensional, .* but got normalized_shape = \[\]"),
        (lambda: normscope.layer_norm(X, -1), ValueError,
         r"Given normalized_shape=\[-1\], expected input with shape \[\*, -1\]"),
        (lambda: normscope.layer_norm(X, 0), ValueError,
         r"Given normalized_shape=\[0\], expected input with shape \[\*, 0\], but got input of size\[2, 3, 8\]"),
        (lambda: normscope.add_layer_norm(X, torch.randn(2, 3, 4), 8), ValueError,
         r"Expected residual of the input's size \[2, 3, 8\], but got \[2, 3, 4\]"),
        (lambda: normscope.add_rms_norm(X, X.int(), 8), TypeError,
         r"Expected residual of dtype .*, but got torch.int32"),
        (lambda: normscope.add_rms_norm(X, None, 8), TypeError,
         r"Expected residual to be a torch.Tensor, but got NoneType"),
        (lambda: normscope.masked_layer_norm(X, torch.ones(2, 3, 1), 8), TypeError,
         r"Expected mask of dtype torch.bool, but got torch.float32"),
        (lambda: normscope.masked_rms_norm(X, torch.ones(2, 4, 1, dtype=torch.bool), 8), ValueError,
         r"Expected mask broadcastable to the input's size \[2, 3, 8\], but got mask of size \[2, 4, 1\]"),
        (lambda: normscope.masked_layer_norm(X, torch.ones(5, 2, 3, 8, dtype=torch.bool), 8), ValueError,
         r"but got mask of size \[5, 2, 3, 8\]"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_backend_variable(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", "cuda-fast")
    with pytest.raises(ValueError, match=r"Expected NORMSCOPE_BACKEND to be one of triton, cpu, reference"):
        normscope.layer_norm(X, 8)


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"Expected CUDA tensors for the triton backend .* but got a tensor on cpu"):
        dispatch.backend_name(X)


def test_cpu_backend_refuses_other_devices(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_BACKEND", "cpu")
    with pytest.raises(ValueError, match=r"Expected CPU tensors for the cpu backend, but got a tensor on meta"):
        dispatch.backend_name(torch.empty(2, 8, device="meta"))


def test_default_backends():
    assert dispatch.default_backend(torch.device("cpu")) == "cpu"
    assert dispatch.default_backend(torch.device("cuda", 0)) == "triton"
    assert dispatch.default_backend(torch.device("meta")) == "reference"
