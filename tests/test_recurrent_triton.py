"""The fused Triton kernels of LayerNormLSTM / LayerNormGRU (normscope.ops.rnn_triton) against the per-step module
path, through the whole module. Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), with the backend forced to ``"triton"``; shapes are tiny because the interpreter is slow."""

import importlib
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

importlib.import_module("triton")

from normscope import recurrent  # noqa: E402
from normscope.nn import LayerNormGRU, LayerNormLSTM  # noqa: E402
from normscope.ops import rnn_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def triton_backend(monkeypatch):
    """Run the fused path through the Triton kernels, and count their calls."""
    monkeypatch.setattr(recurrent, "_FUSED_BACKEND", "triton")
    calls = {"lstm": 0, "gru": 0}
    for name in ("lstm", "gru"):
        fn = getattr(rnn_triton, f"{name}_sequence")

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(rnn_triton, f"{name}_sequence", counted)
    return calls


def _run(m, x, hx, fused, **kw):
    """Outputs, final state(s) and the gradients of a loss touching all of them (input, hx, every parameter)."""
    m.fused = fused
    m.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    states = None if hx is None else tuple(s.detach().clone().requires_grad_(True) for s in hx)
    arg = None if states is None else (states if len(states) == 2 else states[0])
    out, st = m(x, arg, **kw)
    st = st if isinstance(st, tuple) else (st,)
    data = out.data if hasattr(out, "batch_sizes") else out
    w = torch.linspace(-1, 1, data.numel(), device=data.device).view_as(data)
    loss = (data.float() * w).sum() + sum((s.float() * (i + 1.5)).sin().sum() for i, s in enumerate(st))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    grads["input"] = x.grad
    if states is not None:
        for i, s in enumerate(states):
            grads[f"hx{i}"] = s.grad
    return data.detach(), [s.detach() for s in st], grads


def _compare(a, b, **tol):
    torch.testing.assert_close(b[0].float(), a[0].float(), **tol)
    for sa, sb in zip(a[1], b[1]):
        torch.testing.assert_close(sb.float(), sa.float(), **tol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        ga, gb = a[2][name].float(), b[2][name].float()
        scale = max(ga.abs().max().item(), 1.0)
        torch.testing.assert_close(gb / scale, ga / scale, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _inputs(cls, T, B, n_in, H, layers, dirs, seed, hx=True, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, n_in, generator=g).to(DEV, dtype)
    if not hx:
        return x, None
    n = 2 if cls is LayerNormLSTM else 1
    return x, tuple(torch.randn(layers * dirs, B, H, generator=g).to(DEV, dtype) for _ in range(n))


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("given_hx", [True, False])
def test_fp32_matches_module_path(triton_backend, cls, given_hx):
    """2 layers, bidirectional, lengths (packed), hx given or zeros: values, final states and every gradient."""
    torch.manual_seed(0)
    m = cls(5, 6, num_layers=2, bidirectional=True).to(DEV)
    with torch.no_grad():  # gains and shifts away from 1 / 0, so that their gradients matter
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)
    x, hx = _inputs(cls, 4, 3, 5, 6, 2, 2, seed=1, hx=given_hx)
    lengths = torch.tensor([4, 2, 3])
    ref = _run(m, x, hx, fused=False, lengths=lengths)
    assert sum(triton_backend.values()) == 0
    got = _run(m, x, hx, fused=True, lengths=lengths)
    assert triton_backend["lstm" if cls is LayerNormLSTM else "gru"] == 4  # 2 layers x 2 directions
    _compare(ref, got, atol=2e-5, rtol=2e-5)
    # padded steps stay zero, as in the module path
    out = got[0].view(4, 3, -1)
    assert torch.all(out[2:, 1] == 0) and torch.all(out[3:, 2] == 0)


def test_gru_packed_sequence_no_bias_zero_length(triton_backend):
    """A PackedSequence (unsorted lengths) and a GRU without biases; a zero-length sequence in a batch."""
    torch.manual_seed(2)
    m = LayerNormGRU(4, 5, bias=False).to(DEV)
    x, hx = _inputs(LayerNormGRU, 5, 3, 4, 5, 1, 1, seed=3)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)

    def run(fused):
        m.fused = fused
        m.zero_grad()
        data = packed.data.detach().clone().requires_grad_(True)
        h0 = hx[0].detach().clone().requires_grad_(True)
        pin = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                                packed.unsorted_indices)
        out, h = m(pin, h0)
        (out.data.sin().sum() + (h * 2).cos().sum()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        return out.data.detach(), [h.detach()], {**grads, "input": data.grad, "hx": h0.grad}

    ref = run(False)
    got = run(True)
    assert triton_backend["gru"] >= 1
    _compare(ref, got, atol=2e-5, rtol=2e-5)

    x0 = x.clone()
    ref = _run(m, x0, hx, fused=False, lengths=torch.tensor([3, 0, 5]))
    got = _run(m, x0, hx, fused=True, lengths=torch.tensor([3, 0, 5]))
    _compare(ref, got, atol=2e-5, rtol=2e-5)
    assert torch.equal(got[1][0][0, 1], hx[0][0, 1])  # a sequence of length 0 keeps its initial state


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_half_precision_close_to_float32(triton_backend, cls, dtype):
    """bf16 / fp16 modules through the kernels (fp32 math inside) against a float32 reference of the same
    parameters, within the storage dtype's tolerance."""
    torch.manual_seed(4)
    m32 = cls(5, 8, bidirectional=True).to(DEV)
    m16 = cls(5, 8, bidirectional=True).to(DEV, dtype)
    m16.load_state_dict({k: v.to(dtype) for k, v in m32.state_dict().items()})
    with torch.no_grad():  # the reference sees exactly the parameters the low-precision module holds
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            p32.copy_(p16.float())
    x, hx = _inputs(cls, 4, 2, 5, 8, 1, 2, seed=5, dtype=dtype)
    lengths = torch.tensor([4, 3])
    ref = _run(m32, x.float(), tuple(s.float() for s in hx), fused=False, lengths=lengths)
    got = _run(m16, x, hx, fused=True, lengths=lengths)
    assert got[0].dtype == dtype and all(s.dtype == dtype for s in got[1])
    assert all(g.dtype == dtype for g in got[2].values())
    tol = 5e-2 if dtype == BF16 else 5e-3  # about 12 ulps of the storage dtype, relative to each tensor's max
    _compare(ref, got, atol=tol, rtol=tol)
    # no less accurate than the per-step module path in the same dtype (which rounds after every op)
    mod = _run(m16, x, hx, fused=False, lengths=lengths)
    assert _max_error(ref, got) <= 1.5 * _max_error(ref, mod) + 1e-3


def _max_error(ref, got):
    errs = [(got[0].float() - ref[0]).abs().max().item()]
    for name, g in ref[2].items():
        errs.append((got[2][name].float() - g).abs().max().item() / max(g.abs().max().item(), 1.0))
    return max(errs)


def test_direct_function_matches_cpu_kernels():
    """The bare functions against normscope.ops.rnn_cpu (the same signature), reverse direction with zero_init."""
    from normscope.ops import rnn_cpu

    if not rnn_cpu.available():
        pytest.skip(f"the fused CPU kernels could not be built: {rnn_cpu.unavailable_reason()}")
    g = torch.Generator().manual_seed(6)
    H, bs = 6, [3, 3, 2, 1]
    N = sum(bs)
    args = [torch.randn(N, 4, H, generator=g), torch.zeros(3, H), torch.zeros(3, H), torch.randn(4 * H, H, generator=g),
            torch.rand(4, H, generator=g) + 0.5, torch.rand(H, generator=g) + 0.5, torch.randn(H, generator=g)]
    outs = {}
    for name, mod in (("cpu", rnn_cpu), ("triton", rnn_triton)):
        leaves = [a.clone().to(DEV if name == "triton" else "cpu").requires_grad_(True) for a in args]
        out, h, c = mod.lstm_sequence(*leaves, bs, True, True, 1e-5)
        (out.sin().sum() + h.sum() + (c * 0.5).cos().sum()).backward()
        outs[name] = [t.detach().cpu() for t in (out, h, c)] + [a.grad.cpu() for a in leaves]
    for a, b in zip(outs["cpu"], outs["triton"]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)


def test_input_validation():
    xg = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="Expected a float32, float16 or bfloat16 input, but got dtype torch.float64"):
        rnn_triton.gru_sequence(xg, torch.zeros(1, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64),
                                torch.ones(3, 4, dtype=torch.float64), None, [1, 1], False, True, 1e-5)


def test_dispatch_picks_triton_for_cuda(monkeypatch):
    """The decision, without a GPU: CUDA tensors in float32 / float16 / bfloat16 go to the Triton kernels, CUDA
    float64 to the module path, CPU tensors to the C++ kernels (float32 / float64)."""
    monkeypatch.setattr(recurrent, "_FUSED_BACKEND", "auto")
    for dt in (F32, F16, BF16):
        assert recurrent._pick_backend("cuda", dt) == "triton"
    assert recurrent._pick_backend("cuda", torch.float64) is None
    assert recurrent._pick_backend("cpu", F32) == "cpu"
    assert recurrent._pick_backend("cpu", torch.float64) == "cpu"
    assert recurrent._pick_backend("cpu", BF16) is None
    assert recurrent._pick_backend("mps", F32) is None
    assert recurrent._fused_kernels("triton") is rnn_triton
    monkeypatch.setattr(recurrent, "_FUSED_BACKEND", "triton")
    assert recurrent._pick_backend("cpu", BF16) == "triton"
    assert recurrent._pick_backend("cpu", torch.float64) is None

    # the full decision of a layer whose tensors look like CUDA ones (device type patched in the pick)
    m = LayerNormLSTM(3, 4)
    x = torch.randn(2, 1, 3)
    seen = []

    def pick(device_type, dtype):
        seen.append(device_type)
        return "triton" if dtype in rnn_triton.DTYPES else None

    monkeypatch.setattr(recurrent, "_pick_backend", pick)
    state = [torch.zeros(1, 4), torch.zeros(1, 4)]
    assert m._fused_backend(x, state, m._params(0)) == "triton"
    m.fused = False
    assert m._fused_backend(x, state, m._params(0)) is None
    m.fused = True
    handle = m.ln_hh_l0.register_forward_hook(lambda *a: None)
    assert m._fused_backend(x, state, m._params(0)) is None  # a hook on a per-step norm: the module path
    handle.remove()
    monkeypatch.setattr(rnn_triton, "_kernels", None)
    monkeypatch.setattr(rnn_triton, "_error", "triton is not importable")
    monkeypatch.setattr(recurrent, "_WARNED", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert m._fused_backend(x, state, m._params(0)) is None
    assert any("Triton kernels are unavailable (triton is not importable)" in str(e.message) for e in w)


def test_hooked_module_takes_module_path(triton_backend):
    """A forward hook on a hidden norm sees each time step: the Triton path is not taken, the values are the same."""
    m = LayerNormGRU(3, 4).to(DEV)
    x, hx = _inputs(LayerNormGRU, 3, 2, 3, 4, 1, 1, seed=7)
    steps = []
    m.ln_hh_l0.register_forward_hook(lambda mod, i, o: steps.append(mod.time_step))
    out, _ = m(x, hx[0])
    assert triton_backend["gru"] == 0 and steps == [0, 1, 2]


def test_gradients_are_reproducible(triton_backend):
    """No atomics: two identical runs give the same bits, gain gradients included."""
    torch.manual_seed(8)
    m = LayerNormLSTM(4, 5, bidirectional=True).to(DEV)
    x, hx = _inputs(LayerNormLSTM, 4, 3, 4, 5, 1, 2, seed=9)
    a = _run(m, x, hx, fused=True, lengths=torch.tensor([4, 1, 3]))
    b = _run(m, x, hx, fused=True, lengths=torch.tensor([4, 1, 3]))
    assert triton_backend["lstm"] == 4
    assert torch.equal(a[0], b[0])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name
    assert a[2]["ln_hh_l0.weight"].abs().sum() > 0 and a[2]["ln_c_l0_reverse.bias"].abs().sum() > 0
