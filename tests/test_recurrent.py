"""LN-LSTM and LN-GRU (Ba, Kiros & Hinton, 2016) against a composite written here from the paper's equations.

The composite is a plain Python loop over time with torch.nn.functional.layer_norm, one direction and one
layer at a time; nothing of normscope's recurrence code is reused, only the parameters (read by their
documented names).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import normscope
from normscope.errors import ShapeError
from normscope.recurrent import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell, RecurrentNorm

EPS = 1e-5


def _ln_blocks(v, gamma):
    """Each gate block of H normalized on its own (float32 statistics), times its gain."""
    g, h = gamma.shape
    y = F.layer_norm(v.float().reshape(*v.shape[:-1], g, h), (h,), eps=EPS).to(v.dtype)
    return (y * gamma).reshape(*v.shape)


def ref_lstm_cell(x, h, c, p):
    a = _ln_blocks(x @ p["weight_ih"].T, p["ln_ih_weight"]) + _ln_blocks(h @ p["weight_hh"].T, p["ln_hh_weight"])
    if "bias_ih" in p:
        a = a + p["bias_ih"] + p["bias_hh"]
    i, f, g, o = a.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cn = F.layer_norm(c.float(), c.shape[-1:], p["ln_c_weight"].float(), p["ln_c_bias"].float(), EPS).to(c.dtype)
    return torch.sigmoid(o) * torch.tanh(cn), c


def ref_gru_cell(x, h, p):
    u = _ln_blocks(x @ p["weight_ih"].T, p["ln_ih_weight"])
    v = _ln_blocks(h @ p["weight_hh"].T, p["ln_hh_weight"])
    if "bias_ih" in p:
        u, v = u + p["bias_ih"], v + p["bias_hh"]
    ur, uz, un = u.chunk(3, -1)
    vr, vz, vn = v.chunk(3, -1)
    r, z = torch.sigmoid(ur + vr), torch.sigmoid(uz + vz)
    n = torch.tanh(un + r * vn)
    return (1 - z) * n + z * h


def _params(module, layer, reverse=False):
    """The parameters of one layer and direction by their documented names: ``weight_ih_l0`` ... and the norms'
    ``ln_ih_l0.weight``, ``ln_c_l0.bias`` ..., as ``weight_ih``, ``ln_ih_weight``, ``ln_c_bias`` ..."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    out = {}
    for k, v in module.named_parameters():
        owner, _, attr = k.rpartition(".")
        if owner.endswith(sfx) and owner.startswith("ln_"):
            out[f"{owner[: -len(sfx)]}_{attr}"] = v
        elif not owner and k.endswith(sfx):
            out[k[: -len(sfx)]] = v
    return out


def ref_rnn(module, x, lengths=None):
    """(T, B, I) -> output (T, B, D*H), final states, by the paper's equations, sequence by sequence."""
    T, B, _ = x.shape
    lengths = torch.full((B,), T) if lengths is None else lengths
    dirs = 2 if module.bidirectional else 1
    lstm = isinstance(module, LayerNormLSTM)
    H = module.hidden_size
    outs = torch.zeros(T, B, dirs * H, dtype=x.dtype)
    h_n = torch.zeros(module.num_layers * dirs, B, H, dtype=x.dtype)
    c_n = torch.zeros_like(h_n)
    for b in range(B):
        seq = x[: int(lengths[b]), b]
        for layer in range(module.num_layers):
            layer_out = []
            for d in range(dirs):
                p = _params(module, layer, bool(d))
                h = torch.zeros(H, dtype=x.dtype)
                c = torch.zeros(H, dtype=x.dtype)
                steps = range(seq.shape[0]) if d == 0 else range(seq.shape[0] - 1, -1, -1)
                out = [None] * seq.shape[0]
                for t in steps:
                    if lstm:
                        h, c = ref_lstm_cell(seq[t], h, c, p)
                    else:
                        h = ref_gru_cell(seq[t], h, p)
                    out[t] = h
                layer_out.append(torch.stack(out) if out else seq.new_zeros(0, H))
                h_n[layer * dirs + d, b], c_n[layer * dirs + d, b] = h, c
            seq = torch.cat(layer_out, -1)
        outs[: seq.shape[0], b] = seq
    return outs, (h_n, c_n) if lstm else h_n


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # gains and shifts away from 1 / 0 so that they matter
            if name.startswith("ln_"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if "weight" in name else torch.randn(p.shape,
                                                                                                      generator=gen))
    return module


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
def test_matches_the_paper_composite_fp32(cls, layers, bidir):
    torch.manual_seed(0)
    m = _randomize(cls(6, 8, num_layers=layers, bidirectional=bidir))
    x = torch.randn(5, 3, 6)
    out, state = m(x)
    ref_out, ref_state = ref_rnn(m, x)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    for got, want in zip(state if isinstance(state, tuple) else (state,),
                         ref_state if isinstance(ref_state, tuple) else (ref_state,)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_bf16_close_to_the_float32_composite(cls):
    torch.manual_seed(1)
    m = _randomize(cls(8, 16, bidirectional=True))
    x = torch.randn(6, 4, 8)
    ref_out, _ = ref_rnn(m, x)
    out, _ = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=4e-2, rtol=0)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_padded_steps_neither_update_the_state_nor_leak(cls):
    torch.manual_seed(2)
    m = _randomize(cls(5, 7, num_layers=2, bidirectional=True, batch_first=True))
    lengths = torch.tensor([6, 3, 1, 4])
    x = torch.randn(4, 6, 5)
    pad = torch.arange(6).unsqueeze(0) >= lengths.unsqueeze(1)
    x = x.masked_fill(pad.unsqueeze(-1), float("nan"))  # NaN padding (the seed's F6): must not leak anywhere
    x.requires_grad_(True)
    out, state = m(x, lengths=lengths)
    ref_out, ref_state = ref_rnn(m, torch.nan_to_num(x.detach().transpose(0, 1), nan=0.0), lengths)
    torch.testing.assert_close(out, ref_out.transpose(0, 1), atol=2e-5, rtol=1e-5)
    h = state[0] if isinstance(state, tuple) else state
    torch.testing.assert_close(h, ref_state[0] if isinstance(ref_state, tuple) else ref_state, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    (out.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad[~pad]).all()
    assert torch.equal(x.grad[pad], torch.zeros_like(x.grad[pad]))
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    # the same answer from a mask of valid steps and from a PackedSequence
    out_m, _ = m(x.detach(), mask=~pad)
    torch.testing.assert_close(out_m, out.detach())
    m.batch_first = False
    packed = pack_padded_sequence(torch.nan_to_num(x.detach(), nan=0.0).transpose(0, 1), lengths,
                                  enforce_sorted=False)
    out_p, state_p = m(packed)
    padded, got_len = pad_packed_sequence(out_p)
    assert torch.equal(got_len, lengths)
    torch.testing.assert_close(padded, out.detach().transpose(0, 1))
    hp = state_p[0] if isinstance(state_p, tuple) else state_p
    torch.testing.assert_close(hp, h.detach())


def test_one_sequence_alone_equals_it_in_a_padded_batch():
    torch.manual_seed(3)
    m = _randomize(LayerNormLSTM(4, 6, bidirectional=True))
    x = torch.randn(7, 3, 4)
    lengths = torch.tensor([7, 2, 5])
    out, (h, c) = m(x, lengths=lengths)
    for b in range(3):
        alone, (hb, cb) = m(x[: int(lengths[b]), b : b + 1])
        torch.testing.assert_close(out[: int(lengths[b]), b], alone[:, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(h[:, b], hb[:, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(c[:, b], cb[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_gradcheck_float64(cls):
    torch.manual_seed(4)
    m = _randomize(cls(3, 4, num_layers=2, bidirectional=True)).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def f(x, h0, *params):
        out, state = torch.func.functional_call(m, dict(zip(names, params)), (x, (h0, h0) if cls is LayerNormLSTM
                                                                           else h0), {"lengths": lengths})
        return out, state[0] if isinstance(state, tuple) else state

    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().requires_grad_(True) for _, p in m.named_parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell_cls,ref", [(LayerNormLSTMCell, "lstm"), (LayerNormGRUCell, "gru")])
def test_cells_match_the_composite_and_take_unbatched_input(cell_cls, ref):
    torch.manual_seed(5)
    cell = cell_cls(5, 6)
    with torch.no_grad():
        cell.ln_ih.weight.uniform_(0.5, 1.5)
        cell.ln_hh.weight.uniform_(0.5, 1.5)
    p = {k.replace(".", "_"): v for k, v in cell.named_parameters()}  # ln_ih.weight -> ln_ih_weight
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    if ref == "lstm":
        c = torch.randn(3, 6)
        got = cell(x, (h, c))
        want = ref_lstm_cell(x, h, c, p)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)
        h1, c1 = cell(x[0], (h[0], c[0]))
        torch.testing.assert_close(h1, got[0][0])
        assert cell(x)[0].shape == (3, 6)
    else:
        got = cell(x, h)
        torch.testing.assert_close(got, ref_gru_cell(x, h, p), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(cell(x[1], h[1]), got[1])


def test_shapes_like_torch_lstm_and_gru():
    for ours, theirs in ((LayerNormLSTM, torch.nn.LSTM), (LayerNormGRU, torch.nn.GRU)):
        kw = dict(num_layers=2, bidirectional=True, batch_first=True)
        a, b = ours(5, 7, **kw), theirs(5, 7, **kw)
        x = torch.randn(3, 4, 5)
        oa, sa = a(x)
        ob, sb = b(x)
        assert oa.shape == ob.shape
        sa = sa if isinstance(sa, tuple) else (sa,)
        sb = sb if isinstance(sb, tuple) else (sb,)
        assert [s.shape for s in sa] == [s.shape for s in sb]
        ua, _ = a(x[0])  # unbatched
        ub, _ = b(x[0])
        assert ua.shape == ub.shape
        # torch's projection and bias parameters have the same names and shapes
        theirs_shapes = {k: v.shape for k, v in b.named_parameters()}
        ours_shapes = {k: v.shape for k, v in a.named_parameters()}
        assert all(ours_shapes[k] == s for k, s in theirs_shapes.items())
        missing, unexpected = a.load_state_dict(b.state_dict(), strict=False)  # a trained nn.LSTM's weights load
        assert not unexpected and missing and all(k.startswith("ln_") for k in missing)
        assert torch.equal(a.weight_hh_l1_reverse, b.weight_hh_l1_reverse)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(6)
    m = LayerNormGRU(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 4)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    b = m(x)[0]
    assert not torch.allclose(a, b)


def test_errors_are_pytorch_style():
    m = LayerNormLSTM(4, 6, batch_first=True)
    with pytest.raises(ShapeError, match=r"Expected input with 4 features"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ShapeError, match=r"Expected lengths of size \[2\]"):
        m(torch.randn(2, 3, 4), lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"Expected lengths in \[0, 3\]"):
        m(torch.randn(2, 3, 4), lengths=torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="prefix of valid steps"):
        m(torch.randn(2, 3, 4), mask=torch.tensor([[True, False, True], [True, True, True]]))
    with pytest.raises(ShapeError, match=r"Expected h_0 of size \[1, 2, 6\]"):
        m(torch.randn(2, 3, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6)))
    with pytest.raises(ValueError, match="Expected num_layers"):
        LayerNormGRU(4, 6, num_layers=0)
    with pytest.raises(ValueError, match="Expected eps"):
        LayerNormGRUCell(4, 6, eps=0.0)
    with pytest.raises(ShapeError, match=r"Expected input of size \[\*, 4\]"):
        LayerNormGRUCell(4, 6)(torch.randn(2, 5))
    assert issubclass(ShapeError, RuntimeError)


def test_torch_compile_matches_eager():
    torch.manual_seed(7)
    m = _randomize(LayerNormLSTM(4, 8, batch_first=True))
    x = torch.randn(2, 4, 4)
    lengths = torch.tensor([4, 2])
    eager, _ = m(x, lengths=lengths)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got, _ = compiled(x, lengths=lengths)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)


def test_public_in_normscope_nn():
    assert normscope.nn.LayerNormLSTM is LayerNormLSTM
    assert normscope.nn.LayerNormGRUCell is LayerNormGRUCell


# ---- the fused CPU kernels (normscope.ops.rnn_cpu) against the per-step module path -------------------------


def _run(m, x, hx, lengths, packed=False):
    if packed:
        seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, st = m(seq, hx)
        out = pad_packed_sequence(out)[0]
    else:
        out, st = m(x, hx, lengths=lengths)
    st = st if isinstance(st, tuple) else (st,)
    (out.square().sum() + sum((s * s.detach().sign()).sum() for s in st)).backward()
    return out, st, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("hx_given,bidir,packed", [(False, False, False), (True, True, False), (False, True, True),
                                                   (True, False, True)])
def test_fused_kernels_match_the_module_path_float64(monkeypatch, cls, hx_given, bidir, packed):
    from normscope.ops import rnn_cpu

    if not rnn_cpu.available():
        pytest.fail(f"the fused recurrent kernels did not build: {rnn_cpu.unavailable_reason()}")
    calls = []
    for name in ("lstm_sequence", "gru_sequence"):
        real = getattr(rnn_cpu, name)
        monkeypatch.setattr(rnn_cpu, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    torch.manual_seed(11)
    m = _randomize(cls(3, 5, num_layers=2, bidirectional=bidir, bias=not packed).double(), seed=3)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4, 1])
    hx = None
    if hx_given:
        h0 = torch.randn(2 * (2 if bidir else 1), 4, 5, dtype=torch.float64)
        hx = (h0, torch.randn_like(h0)) if cls is LayerNormLSTM else h0
    fused = _run(m, x, hx, lengths, packed)
    assert len(calls) == 2 * (2 if bidir else 1)  # every layer and direction went through the kernels
    slow = copy.deepcopy(m)
    slow.zero_grad()
    slow.fused = False
    ref = _run(slow, x, hx, lengths, packed)
    assert len(calls) == 2 * (2 if bidir else 1)  # fused=False: not called again
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(fused[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in ref[2]:
        torch.testing.assert_close(fused[2][name], ref[2][name], rtol=1e-10, atol=1e-11, msg=name)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_fused_float32_as_accurate_as_the_module_path(cls):
    torch.manual_seed(12)
    m64 = _randomize(cls(8, 32, num_layers=2).double(), seed=4)
    x64 = torch.randn(40, 8, 8, dtype=torch.float64)
    lengths = torch.randint(1, 41, (8,))
    truth = _run(copy.deepcopy(m64), x64, None, lengths)
    errs = {}
    for fused in (True, False):
        m = copy.deepcopy(m64).float()
        m.fused = fused
        out, st, grads = _run(m, x64.float(), None, lengths)
        errs[fused] = [float((out.double() - truth[0]).abs().max())] + [
            float((grads[n].double() - truth[2][n]).abs().max() / truth[2][n].abs().max()) for n in truth[2]]
    for a, b in zip(errs[True], errs[False]):
        assert a <= 2 * b + 1e-6, (errs[True], errs[False])


def test_fused_path_gives_way_to_observers_and_transforms(monkeypatch):
    from normscope.ops import rnn_cpu

    calls = []
    real = rnn_cpu.lstm_sequence
    monkeypatch.setattr(rnn_cpu, "lstm_sequence", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(13)
    m = LayerNormLSTM(3, 4)
    x = torch.randn(5, 2, 3)
    m(x)
    assert len(calls) == 1
    handle = m.ln_hh_l0.register_forward_hook(lambda *a: None)  # a hook wants every per-step call
    m(x)
    handle.remove()
    m(x.double().float().to(torch.bfloat16).float())
    assert len(calls) == 2
    m.to(torch.bfloat16)(x.to(torch.bfloat16))  # bfloat16: the module path (float32 statistics)
    assert len(calls) == 2
    m.float()
    t = torch.randn_like(x)
    out, jvp_out = torch.func.jvp(lambda v: m(v)[0], (x,), (t,))  # forward AD: the module path
    assert len(calls) == 2 and torch.isfinite(jvp_out).all()
    torch.testing.assert_close(out, m(x)[0], rtol=1e-5, atol=1e-6)
    assert len(calls) == 3


def test_unavailable_fused_kernels_warn_once_and_keep_the_values(monkeypatch):
    import normscope.recurrent as rec
    from normscope.ops import rnn_cpu

    torch.manual_seed(14)
    m = LayerNormGRU(3, 4)
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    monkeypatch.setattr(rnn_cpu, "available", lambda: False)
    monkeypatch.setattr(rnn_cpu, "unavailable_reason", lambda: "no C++ compiler found")
    monkeypatch.setattr(rec, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="no C.. compiler found"):
        got = m(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once per process


def test_fused_input_gates_match_the_input_norm_and_bias():
    from normscope.ops import rnn_cpu

    torch.manual_seed(15)
    pre = torch.randn(7, 4, 6, dtype=torch.float64, requires_grad=True)
    gamma = (torch.randn(4, 6, dtype=torch.float64) * 0.5 + 1).requires_grad_()
    bias = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    norm = RecurrentNorm(6, 4, "input").double()
    with torch.no_grad():
        norm.weight.copy_(gamma)
    torch.testing.assert_close(rnn_cpu.input_gates(pre, gamma, bias, 1e-5), norm(pre) + bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rnn_cpu.input_gates(pre, gamma, None, 1e-5), norm(pre), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda p, g, b: rnn_cpu.input_gates(p, g, b, 1e-5), (pre, gamma, bias))
    assert torch.autograd.gradcheck(lambda p, g: rnn_cpu.input_gates(p, g, None, 1e-5), (pre, gamma))
    # inplace: only where autograd records nothing; the same values either way
    want = rnn_cpu.input_gates(pre, gamma, bias, 1e-5).detach()
    kept = pre.detach().clone()
    y = rnn_cpu.input_gates(pre, gamma, bias, 1e-5, inplace=True)
    assert y.data_ptr() != pre.data_ptr() and torch.equal(pre.detach(), kept) and torch.equal(y.detach(), want)
    with torch.no_grad():
        scratch = pre.detach().clone()
        y = rnn_cpu.input_gates(scratch, gamma, bias, 1e-5, inplace=True)
    assert y.data_ptr() == scratch.data_ptr() and torch.equal(y, want) and torch.equal(scratch, want)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_input_norm_runs_fused_unless_observed(cls):
    torch.manual_seed(16)
    m = _randomize(cls(3, 5), seed=8)
    x = torch.randn(6, 2, 3)
    seen = []
    want = m(x)[0]  # no hook: the fused pass, the input-norm module is not called
    handle = m.ln_ih_l0.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    got = m(x)[0]  # a hook on the input norm: the module runs (once, over all steps), the hidden part stays fused
    handle.remove()
    assert seen == [torch.Size([12, 4 if cls is LayerNormLSTM else 3, 5])]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32; the statistics summed differently
    m.ln_ih_l0.weight.data.mul_(2)
    assert not torch.allclose(m(x)[0], want)  # the fused pass reads the gains
