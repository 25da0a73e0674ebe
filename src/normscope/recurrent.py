"""Layer-normalized recurrent cells and layers: LN-LSTM and LN-GRU (Ba, Kiros & Hinton, 2016).

PyTorch has no LSTM or GRU with layer normalization inside the cell; users write a Python loop over
``nn.LSTMCell`` plus ``nn.LayerNorm``. These modules follow the paper: layer normalization is applied to the
input-to-hidden and to the hidden-to-hidden pre-activations separately, per gate block (each gate's ``H``
units are normalized on their own, with their own gain), and, for the LSTM, to the cell state before the
output ``tanh``::

    LSTM (gates i, f, g, o, as in torch.nn.LSTM):
        a   = LN_g(W_ih x_t) * gamma_ih + LN_g(W_hh h_{t-1}) * gamma_hh + b_ih + b_hh
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN(c_t) * gamma_c + beta_c)

    GRU (gates r, z, n, as in torch.nn.GRU):
        u = LN_g(W_ih x_t) * gamma_ih + b_ih          v = LN_g(W_hh h_{t-1}) * gamma_hh + b_hh
        r = sigmoid(u_r + v_r)    z = sigmoid(u_z + v_z)    n = tanh(u_n + r * v_n)
        h_t = (1 - z) * n + z * h_{t-1}

``LN_g`` normalizes each gate block of ``H`` units (mean and variance over those ``H`` values, in float32,
two-pass, through :func:`normscope.layer_norm`). The paper's per-block shifts ``beta_ih`` and ``beta_hh`` only
add to the gate biases, so they are the biases ``b_ih`` / ``b_hh`` here (the same function class, no redundant
parameters). Parameter names follow ``torch.nn.LSTM`` / ``torch.nn.GRU`` (``weight_ih_l0``, ``bias_hh_l1_reverse``,
...) plus ``ln_ih_weight_l0`` (``gamma_ih``, shape ``(gates, H)``), ``ln_hh_weight_l0`` and, for the LSTM,
``ln_c_weight_l0`` / ``ln_c_bias_l0``.

The input projection of all time steps is one matmul and one normalization call up front; each step then does
one matmul, one normalization of the hidden pre-activations and the gate arithmetic.

Padded sequences: pass a :class:`torch.nn.utils.rnn.PackedSequence`, or ``lengths`` (or a ``mask`` of valid
steps, a prefix per sequence). A padded step neither updates the state nor reaches the statistics (its input
is replaced by zeros before the projection, so NaN/Inf padding cannot leak into values or gradients), and its
output is zero, as ``pad_packed_sequence`` gives. The final state is the state after each sequence's last valid
step; the reverse direction of a bidirectional layer starts at each sequence's own last valid step.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from normscope.errors import ShapeError
from normscope.functional import layer_norm

__all__ = ["LayerNormLSTMCell", "LayerNormGRUCell", "LayerNormLSTM", "LayerNormGRU"]

_LSTMState = Tuple[Tensor, Tensor]


def _gate_norm(pre: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """``LN_g(pre) * gamma``: ``pre`` of shape ``(*, G*H)`` normalized per block of ``H``; returns ``(*, G, H)``."""
    g, h = gamma.shape
    y = layer_norm(pre.reshape(*pre.shape[:-1], g, h), h, eps=eps)
    return y * gamma


def _lstm_step(xg: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, g_hh: Tensor, g_c: Tensor, b_c: Tensor,
               eps: float) -> _LSTMState:
    gates = xg + _gate_norm(torch.nn.functional.linear(h, w_hh), g_hh, eps)
    i, f, g, o = gates.unbind(-2)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h2 = torch.sigmoid(o) * torch.tanh(layer_norm(c2, c2.shape[-1], g_c, b_c, eps))
    return h2, c2


def _gru_step(xg: Tensor, h: Tensor, w_hh: Tensor, g_hh: Tensor, b_hh: Optional[Tensor], eps: float) -> Tensor:
    hg = _gate_norm(torch.nn.functional.linear(h, w_hh), g_hh, eps)
    if b_hh is not None:
        hg = hg + b_hh.view_as(g_hh)
    xr, xz, xn = xg.unbind(-2)
    hr, hz, hn = hg.unbind(-2)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _check_eps(eps: float) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"Expected eps to be a positive finite number, but got {eps!r}")
    return float(eps)


def _check_sizes(input_size: int, hidden_size: int) -> None:
    for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"Expected {name} to be a positive int, but got {v!r}")


class _CellParams(torch.nn.Module):
    """Parameters shared by the cells: projections, biases and the layer-norm gains."""

    gates: int = 4
    has_cell_norm: bool = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias, self.eps = input_size, hidden_size, bool(bias), _check_eps(eps)
        gh = self.gates * hidden_size
        self.weight_ih = torch.nn.Parameter(torch.empty(gh, input_size, **kw))
        self.weight_hh = torch.nn.Parameter(torch.empty(gh, hidden_size, **kw))
        self.bias_ih = torch.nn.Parameter(torch.empty(gh, **kw)) if bias else None
        self.bias_hh = torch.nn.Parameter(torch.empty(gh, **kw)) if bias else None
        self.ln_ih_weight = torch.nn.Parameter(torch.empty(self.gates, hidden_size, **kw))
        self.ln_hh_weight = torch.nn.Parameter(torch.empty(self.gates, hidden_size, **kw))
        if self.has_cell_norm:
            self.ln_c_weight = torch.nn.Parameter(torch.empty(hidden_size, **kw))
            self.ln_c_bias = torch.nn.Parameter(torch.empty(hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases uniform in ``(-1/sqrt(H), 1/sqrt(H))`` as torch's cells; gains 1, shifts 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                torch.nn.init.zeros_(p) if name.endswith("bias") else torch.nn.init.ones_(p)
            else:
                torch.nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}, eps={self.eps}"

    def _input(self, x: Tensor) -> Tuple[Tensor, bool]:
        if x.dim() not in (1, 2):
            raise ShapeError(f"Expected input to be 1-D or 2-D, but got {x.dim()}-D tensor of size {list(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ShapeError(f"Expected input of size [*, {self.input_size}], but got {list(x.shape)}")
        return (x.unsqueeze(0), True) if x.dim() == 1 else (x, False)

    def _state(self, s: Optional[Tensor], x: Tensor, name: str, batched: bool) -> Tensor:
        want = [x.shape[0], self.hidden_size]
        if s is None:
            return x.new_zeros(want)
        s = s.unsqueeze(0) if not batched else s
        if list(s.shape) != want:
            raise ShapeError(f"Expected {name} of size {want if batched else want[1:]}, but got {list(s.shape)}")
        return s


class LayerNormLSTMCell(_CellParams):
    """An LSTM cell with layer normalization (Ba et al., 2016); a drop-in for :class:`torch.nn.LSTMCell`.

    Args:
        input_size, hidden_size: as :class:`torch.nn.LSTMCell`.
        bias: with the gate biases ``bias_ih`` / ``bias_hh``. Default: True.
        eps: the layer norms' epsilon. Default: ``1e-5``.

    Inputs: ``input`` of shape ``(B, input_size)`` or ``(input_size,)``, ``hx = (h_0, c_0)`` or None (zeros).
    Returns ``(h_1, c_1)``.
    """

    gates = 4
    has_cell_norm = True

    def forward(self, input: Tensor, hx: Optional[_LSTMState] = None) -> _LSTMState:
        x, unbatched = self._input(input)
        h = self._state(None if hx is None else hx[0], x, "h_0", not unbatched)
        c = self._state(None if hx is None else hx[1], x, "c_0", not unbatched)
        xg = _gate_norm(torch.nn.functional.linear(x, self.weight_ih), self.ln_ih_weight, self.eps)
        if self.bias_ih is not None and self.bias_hh is not None:
            xg = xg + (self.bias_ih + self.bias_hh).view_as(self.ln_ih_weight)
        h, c = _lstm_step(xg, h, c, self.weight_hh, self.ln_hh_weight, self.ln_c_weight, self.ln_c_bias, self.eps)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class LayerNormGRUCell(_CellParams):
    """A GRU cell with layer normalization (Ba et al., 2016); a drop-in for :class:`torch.nn.GRUCell`.

    Inputs: ``input`` of shape ``(B, input_size)`` or ``(input_size,)``, ``hx`` or None (zeros). Returns ``h_1``.
    """

    gates = 3
    has_cell_norm = False

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, unbatched = self._input(input)
        h = self._state(hx, x, "hx", not unbatched)
        xg = _gate_norm(torch.nn.functional.linear(x, self.weight_ih), self.ln_ih_weight, self.eps)
        if self.bias_ih is not None:
            xg = xg + self.bias_ih.view_as(self.ln_ih_weight)
        h = _gru_step(xg, h, self.weight_hh, self.ln_hh_weight, self.bias_hh, self.eps)
        return h.squeeze(0) if unbatched else h


def _reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """``idx[t, b]``: the time step that position ``t`` of sequence ``b`` reads when its valid part is reversed."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)
    L = lengths.to(t.device).unsqueeze(0)
    return torch.where(t < L, L - 1 - t, t)


def _time_gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 0, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class _LNRecurrent(torch.nn.Module):
    gates: int = 4
    mode: str = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, eps: float = 1e-5,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"Expected num_layers to be a positive int, but got {num_layers!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"Expected dropout to be a number in [0, 1], but got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.eps = bool(bidirectional), _check_eps(eps)
        kw = {"device": device, "dtype": dtype}
        dirs = 2 if bidirectional else 1
        gh = self.gates * hidden_size
        self._names: List[List[str]] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * dirs
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = [("weight_ih", (gh, layer_in)), ("weight_hh", (gh, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gh,)), ("bias_hh", (gh,))]
                shapes += [("ln_ih_weight", (self.gates, hidden_size)), ("ln_hh_weight", (self.gates, hidden_size))]
                if self.mode == "LSTM":
                    shapes += [("ln_c_weight", (hidden_size,)), ("ln_c_bias", (hidden_size,))]
                names = []
                for base, shape in shapes:
                    self.register_parameter(base + sfx, torch.nn.Parameter(torch.empty(shape, **kw)))
                    names.append(base + sfx)
                self._names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases uniform in ``(-1/sqrt(H), 1/sqrt(H))`` as torch's RNNs; gains 1, shifts 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                torch.nn.init.zeros_(p) if "_bias_" in name else torch.nn.init.ones_(p)
            else:
                torch.nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                           ("eps", 1e-5)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s

    def _params(self, layer: int, d: int) -> dict:
        dirs = 2 if self.bidirectional else 1
        out = {}
        for name in self._names[layer * dirs + d]:
            out[name.rsplit("_l", 1)[0]] = getattr(self, name)
        return out

    # ---- input handling -----------------------------------------------------------------------------------

    def _prepare(self, input: Union[Tensor, PackedSequence], lengths: Optional[Tensor], mask: Optional[Tensor]):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None or mask is not None:
                raise ValueError("Expected no lengths or mask with a PackedSequence input (it carries its lengths)")
            x, lengths = pad_packed_sequence(input, batch_first=False)
            return x, lengths, True, input, False
        if not isinstance(input, Tensor):
            raise TypeError(f"Expected input to be a Tensor or a PackedSequence, but got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ShapeError(f"Expected input to be 2-D (unbatched) or 3-D, but got {input.dim()}-D tensor of size "
                             f"{list(input.shape)}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ShapeError(f"Expected input with {self.input_size} features in its last dim, but got "
                             f"{list(input.shape)}")
        T, B = x.shape[0], x.shape[1]
        if mask is not None:
            if lengths is not None:
                raise ValueError("Expected lengths or mask, but got both")
            lengths = self._lengths_of_mask(mask, T, B, unbatched)
        if lengths is not None:
            lengths = torch.as_tensor(lengths).reshape(-1) if unbatched else torch.as_tensor(lengths)
            if lengths.dim() != 1 or lengths.shape[0] != B:
                raise ShapeError(f"Expected lengths of size [{B}], but got {list(lengths.shape)}")
            if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
                raise TypeError(f"Expected integer lengths, but got dtype {lengths.dtype}")
            # (a value check: skipped while torch.compile traces, where it would be a data-dependent branch)
            if not torch.compiler.is_compiling() and (bool((lengths < 0).any()) or bool((lengths > T).any())):
                raise ValueError(f"Expected lengths in [0, {T}], but got {lengths.tolist()}")
        return x, lengths, False, None, unbatched

    def _lengths_of_mask(self, mask: Tensor, T: int, B: int, unbatched: bool) -> Tensor:
        m = mask.unsqueeze(0) if unbatched else mask
        want = [B, T] if (self.batch_first or unbatched) else [T, B]
        if m.dtype != torch.bool:
            raise TypeError(f"Expected a bool mask of valid steps, but got dtype {mask.dtype}")
        if list(m.shape) != want:
            raise ShapeError(f"Expected mask of size {want[1:] if unbatched else want}, but got {list(mask.shape)}")
        mb = m if (self.batch_first or unbatched) else m.transpose(0, 1)  # (B, T)
        lengths = mb.sum(1)
        prefix = torch.arange(T, device=mb.device).unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(prefix, mb):
            raise ValueError("Expected mask to mark a prefix of valid steps in each sequence (padding at the end), "
                             "but got a mask with gaps")
        return lengths

    def _initial(self, hx, B: int, x: Tensor, unbatched: bool):
        dirs = 2 if self.bidirectional else 1
        want = [self.num_layers * dirs, B, self.hidden_size]
        states = hx if isinstance(hx, tuple) else (hx,)
        n = 2 if self.mode == "LSTM" else 1
        if hx is None:
            return [x.new_zeros(want) for _ in range(n)]
        if len(states) != n:
            raise ValueError(f"Expected hx to be {'a tuple (h_0, c_0)' if n == 2 else 'a Tensor'}, but got "
                             f"{type(hx).__name__}")
        out = []
        for name, given in zip(("h_0", "c_0"), states):
            s = given.unsqueeze(1) if unbatched and given.dim() == 2 else given
            if list(s.shape) != want:
                shown = [want[0], want[2]] if unbatched else want
                raise ShapeError(f"Expected {name} of size {shown}, but got {list(given.shape)}")
            out.append(s)
        return out

    # ---- the recurrence -----------------------------------------------------------------------------------

    def _run_direction(self, x: Tensor, valid: Optional[Tensor], state: List[Tensor], p: dict):
        T = x.shape[0]
        xg = _gate_norm(torch.nn.functional.linear(x, p["weight_ih"]), p["ln_ih_weight"], self.eps)  # (T, B, G, H)
        b_ih, b_hh = p.get("bias_ih"), p.get("bias_hh")
        if self.mode == "LSTM":
            if b_ih is not None and b_hh is not None:
                xg = xg + (b_ih + b_hh).view_as(p["ln_ih_weight"])
        elif b_ih is not None:
            xg = xg + b_ih.view_as(p["ln_ih_weight"])
        outs = []
        h = state[0]
        c = state[1] if self.mode == "LSTM" else None
        for t in range(T):
            if self.mode == "LSTM":
                h2, c2 = _lstm_step(xg[t], h, c, p["weight_hh"], p["ln_hh_weight"], p["ln_c_weight"],
                                    p["ln_c_bias"], self.eps)
            else:
                h2, c2 = _gru_step(xg[t], h, p["weight_hh"], p["ln_hh_weight"], b_hh, self.eps), None
            if valid is None:
                h, c = h2, c2
                outs.append(h2)
            else:
                m = valid[t].unsqueeze(1)
                h = torch.where(m, h2, h)
                if c2 is not None:
                    c = torch.where(m, c2, c)
                outs.append(torch.where(m, h2, torch.zeros_like(h2)))
        out = torch.stack(outs) if outs else x.new_zeros(0, x.shape[1], self.hidden_size)
        return out, [h] if c is None else [h, c]

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, *, lengths: Optional[Tensor] = None,
                mask: Optional[Tensor] = None):
        x, lengths, packed, packed_in, unbatched = self._prepare(input, lengths, mask)
        T, B = x.shape[0], x.shape[1]
        init = self._initial(hx, B, x, unbatched)
        dirs = 2 if self.bidirectional else 1
        valid = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            valid = torch.arange(T, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
            x = x.masked_fill(~valid.unsqueeze(-1), 0)  # padding never reaches the projections or statistics
            rev = _reverse_index(lengths, T)
        else:
            rev = None
        finals: List[List[Tensor]] = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                state = [s[k] for s in init]
                p = self._params(layer, d)
                if d == 0:
                    out, fin = self._run_direction(layer_in, valid, state, p)
                else:
                    src = layer_in.flip(0) if rev is None else _time_gather(layer_in, rev)
                    out, fin = self._run_direction(src, valid, state, p)
                    out = out.flip(0) if rev is None else _time_gather(out, rev)
                    if valid is not None:
                        out = out.masked_fill(~valid.unsqueeze(-1), 0)
                outs.append(out)
                finals.append(fin)
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = torch.nn.functional.dropout(layer_in, self.dropout, True)
        output = layer_in
        final = [torch.stack([f[i] for f in finals]) for i in range(len(init))]
        if unbatched:
            output = output.squeeze(1)
            final = [f.squeeze(1) for f in final]
        elif packed and packed_in is not None:
            order = packed_in.sorted_indices
            sorted_out = output if order is None else output.index_select(1, order)
            sorted_len = lengths if order is None else lengths.index_select(0, order.to(lengths.device))
            data = pack_padded_sequence(sorted_out, sorted_len.cpu(), enforce_sorted=True).data
            output = PackedSequence(data, packed_in.batch_sizes, packed_in.sorted_indices,
                                    packed_in.unsorted_indices)
        elif self.batch_first:
            output = output.transpose(0, 1)
        state_out = (final[0], final[1]) if self.mode == "LSTM" else final[0]
        return output, state_out


class LayerNormLSTM(_LNRecurrent):
    """A multi-layer LSTM with layer normalization in each cell (Ba et al., 2016), shaped like :class:`torch.nn.LSTM`.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as :class:`torch.nn.LSTM`
            (no ``proj_size``).
        eps: the layer norms' epsilon. Default: ``1e-5``.

    ``forward(input, hx=None, *, lengths=None, mask=None)``: ``input`` of shape ``(T, B, input_size)``
    (``(B, T, input_size)`` with ``batch_first``), ``(T, input_size)`` unbatched, or a ``PackedSequence``;
    ``hx = (h_0, c_0)`` each ``(num_layers * directions, B, hidden_size)``, or None for zeros; ``lengths``
    (``(B,)`` integers) or ``mask`` (bool, ``(B, T)`` with ``batch_first`` else ``(T, B)``, a prefix of valid
    steps) for padded batches. Returns ``(output, (h_n, c_n))`` as :class:`torch.nn.LSTM`; outputs at padded
    steps are zero.

    Example::

        >>> lstm = normscope.nn.LayerNormLSTM(16, 32, num_layers=2, batch_first=True)
        >>> out, (h, c) = lstm(torch.randn(4, 10, 16), lengths=torch.tensor([10, 7, 3, 1]))
    """

    gates = 4
    mode = "LSTM"


class LayerNormGRU(_LNRecurrent):
    """A multi-layer GRU with layer normalization in each cell (Ba et al., 2016), shaped like :class:`torch.nn.GRU`.

    Arguments and inputs as :class:`LayerNormLSTM`, with ``hx`` a single tensor; returns ``(output, h_n)``.
    """

    gates = 3
    mode = "GRU"
