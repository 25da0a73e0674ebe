"""The C++ time loop of the fused LN-LSTM / LN-GRU CPU kernels (one call per sequence and direction, the
recurrent matmul through its own small-row kernel or torch's BLAS gemm, NORMSCOPE_RNN_GEMM=own / blas) against
the per-step Python loop it replaces, which is still what runs where torch exports no Fortran gemm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from normscope.ops import rnn_cpu
from normscope.recurrent import LayerNormGRU, LayerNormLSTM


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    monkeypatch.delenv("NORMSCOPE_RNN_CPU_LOOP", raising=False)  # the default: the C++ loop (rnn_cpu._find_gemm)
    if not rnn_cpu.available():
        pytest.fail(f"the fused recurrent kernels did not build: {rnn_cpu.unavailable_reason()}")


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return m


def _run(m, x, hx, lengths, packed):
    if packed:
        out, st = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        out = pad_packed_sequence(out)[0]
    else:
        out, st = m(x, hx, lengths=lengths)
    st = st if isinstance(st, tuple) else (st,)
    (out.square().sum() + sum((s * s.detach().sign()).sum() for s in st)).backward()
    return out, st, {n: p.grad.clone() for n, p in m.named_parameters()}


def _counting(monkeypatch):
    """Counts the C++ time-loop calls (the ``ns_*_seq_*`` entry points) by wrapping :func:`rnn_cpu._fn`."""
    calls = []
    real = rnn_cpu._fn

    def fn(name, dtype):
        if "_seq_" in name:
            calls.append(name)
        return real(name, dtype)

    monkeypatch.setattr(rnn_cpu, "_fn", fn)
    return calls


def test_gemm_found_in_an_mkl_torch(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_RNN_CPU_LOOP", "python")
    assert rnn_cpu._gemm_address(torch.float32) is None  # asked for: the per-step loop
    monkeypatch.delenv("NORMSCOPE_RNN_CPU_LOOP")
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        assert rnn_cpu._gemm_address(torch.float32) is None  # the per-step loop: tested below either way
        return
    assert rnn_cpu._gemm_address(torch.float32) and rnn_cpu._gemm_address(torch.float64)


@pytest.mark.parametrize("gemm", ["own", "blas"])  # the loop's matmuls: its small-row kernel, or torch's BLAS
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hx_given,bidir,packed", [(False, False, False), (True, True, False), (False, True, True),
                                                   (True, False, True)])
def test_cpp_loop_equals_the_per_step_loop(monkeypatch, cls, dtype, hx_given, bidir, packed, gemm):
    monkeypatch.setenv("NORMSCOPE_RNN_GEMM", gemm)
    if rnn_cpu._gemm_address(dtype) is None:
        pytest.fail("torch exports no Fortran gemm here; the C++ time loop is untested on this build")
    torch.manual_seed(21)
    H = 40  # 4H * rows crosses the threshold of the threaded rows loop on the early steps
    m = _randomize(cls(7, H, num_layers=2, bidirectional=bidir, bias=not packed).to(dtype), seed=5)
    x = torch.randn(9, 110, 7, dtype=dtype)
    lengths = torch.randint(1, 10, (110,))
    lengths[0] = 9
    hx = None
    if hx_given:
        h0 = torch.randn(2 * (2 if bidir else 1), 110, H, dtype=dtype)
        hx = (h0, torch.randn_like(h0)) if cls is LayerNormLSTM else h0
    calls = _counting(monkeypatch)
    fused = _run(m, x, hx, lengths, packed)
    assert len(calls) == 2 * 2 * (2 if bidir else 1)  # forward and backward of each layer and direction in C++
    slow = copy.deepcopy(m)
    slow.zero_grad()
    monkeypatch.setattr(rnn_cpu, "_gemm_address", lambda dtype: None)  # the fallback: the per-step Python loop
    ref = _run(slow, x, hx, lengths, packed)
    assert len(calls) == 2 * 2 * (2 if bidir else 1)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(fused[0], ref[0], **tol)
    for a, b in zip(fused[1], ref[1]):
        torch.testing.assert_close(a, b, **tol)
    gtol = dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name in ref[2]:
        torch.testing.assert_close(fused[2][name], ref[2][name], **gtol, msg=name)


@pytest.mark.parametrize("gemm", ["own", "blas"])
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_cpp_loop_is_deterministic_across_thread_counts(monkeypatch, cls, gemm):
    monkeypatch.setenv("NORMSCOPE_RNN_GEMM", gemm)
    torch.manual_seed(22)
    m = _randomize(cls(6, 48, num_layers=1), seed=6)
    x = torch.randn(7, 96, 6)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            mm = copy.deepcopy(m)
            outs.append(_run(mm, x, None, torch.full((96,), 7), False))
    finally:
        torch.set_num_threads(threads)
    a, b = outs
    assert torch.equal(a[0], b[0])
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_gradcheck_through_the_cpp_loop(cls):
    torch.manual_seed(23)
    m = _randomize(cls(3, 4, bidirectional=True).double(), seed=7)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    assert torch.autograd.gradcheck(lambda v: m(v, lengths=lengths)[0], (x,))


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("loop", ["cpp", "python"])
def test_inference_keeps_one_step_and_gives_the_training_values(monkeypatch, cls, loop):
    monkeypatch.setenv("NORMSCOPE_RNN_CPU_LOOP", loop)
    torch.manual_seed(24)
    m = _randomize(cls(5, 24, num_layers=2, bidirectional=True), seed=9)
    x = torch.randn(8, 40, 5)
    lengths = torch.randint(1, 9, (40,))
    lengths[3] = 8
    seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
    kept = []  # the first dim of what each direction's forward keeps for the backward (rnn_cpu._block)
    real_block = rnn_cpu._block

    def block(like, *shapes):
        if len(shapes) > 2:  # the sequence's block, not the input-gate statistics
            kept.append({s[0] for s in shapes})
        return real_block(like, *shapes)

    monkeypatch.setattr(rnn_cpu, "_block", block)
    N = int(lengths.sum())
    out, st = m(seq)  # parameters require grad: everything the backward reads is kept for all N packed rows
    assert kept == [{N}] * 4  # 2 layers x 2 directions
    kept.clear()
    with torch.no_grad():
        out_ng, st_ng = m(seq)
    assert kept == [{40}] * 4  # one step's rows (the batch), overwritten at every step
    assert torch.equal(out.data, out_ng.data)
    for a, b in zip(st if isinstance(st, tuple) else (st,), st_ng if isinstance(st_ng, tuple) else (st_ng,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_large_saved_values_take_separate_tensors_with_the_same_results(monkeypatch, cls):
    torch.manual_seed(25)
    m = _randomize(cls(4, 16), seed=10)
    x = torch.randn(6, 5, 4)
    one = _run(copy.deepcopy(m), x, None, None, False)
    blocks = []
    real_block = rnn_cpu._block
    monkeypatch.setattr(rnn_cpu, "_BLOCK_MAX_BYTES", 0)  # every block above the limit: one tensor per shape
    monkeypatch.setattr(rnn_cpu, "_block", lambda like, *shapes: blocks.append(
        [t.untyped_storage().data_ptr() for t in real_block(like, *shapes)]) or real_block(like, *shapes))
    sep = _run(copy.deepcopy(m), x, None, None, False)
    assert blocks and all(len(set(ptrs)) == len(ptrs) for ptrs in blocks)  # separate storages
    assert torch.equal(one[0], sep[0])
    for n in one[2]:
        assert torch.equal(one[2][n], sep[2][n]), n
