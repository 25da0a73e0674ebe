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
...); the norms are submodules (:class:`RecurrentNorm`): ``ln_ih_l0`` (``gamma_ih``: ``ln_ih_l0.weight``, shape
``(gates, H)``), ``ln_hh_l0`` and, for the LSTM, ``ln_c_l0`` (``ln_c_l0.weight`` / ``ln_c_l0.bias``), so that
forward hooks and :class:`normscope.monitor.Monitor` see every norm call: the hidden and cell norms once per
time step.

The input projection of all time steps is one matmul and one normalization call up front; each step then does
one matmul, one normalization of the hidden pre-activations and the gate arithmetic.

Padded sequences: pass a :class:`torch.nn.utils.rnn.PackedSequence`, or ``lengths`` (or a ``mask`` of valid
steps, a prefix per sequence). The recurrence runs in the packed layout (longest sequence first, as cuDNN
does): at step ``t`` only the sequences still running are computed, so a padded step neither updates the state
nor reaches any statistic, value or gradient (NaN/Inf padding cannot leak), and its output is zero, as
``pad_packed_sequence`` gives. The final state is the state after each sequence's last valid step; the reverse
direction of a bidirectional layer starts at each sequence's own last valid step. (Under ``torch.compile`` a
``lengths`` / ``mask`` batch runs masked instead: padded rows are computed and discarded, with their inputs
zeroed, so that the traced graph has no data-dependent shapes.)
"""

from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Tuple, Union, cast

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from normscope.errors import ShapeError
from normscope.functional import layer_norm

__all__ = ["LayerNormLSTMCell", "LayerNormGRUCell", "LayerNormLSTM", "LayerNormGRU", "RecurrentNorm"]

_LSTMState = Tuple[Tensor, Tensor]


class RecurrentNorm(torch.nn.Module):
    """One layer norm inside a recurrent cell: ``LN(x) * weight (+ bias)`` over the last ``hidden_size`` values.

    The gate norms (``site`` ``"input"`` / ``"hidden"``) normalize each gate block of ``H`` units on its own:
    their input has shape ``(*, gates, H)`` and their ``weight`` (the per-block gains) shape ``(gates, H)``, no
    bias (the paper's shifts are the gate biases). The cell-state norm (``site`` ``"cell"``, LSTM only) has a
    ``weight`` and a ``bias`` of shape ``(H,)``. Statistics in float32 at least, two-pass, through
    :func:`normscope.layer_norm`.

    The recurrent layers call ``hidden`` and ``cell`` norms once per time step and the ``input`` norm once per
    forward over all steps, through ``__call__``: :class:`normscope.monitor.Monitor` and forward hooks see them
    like any norm layer (:func:`normscope.discovery.find_norm_layers` finds them; ``analyze`` places them as
    ``recurrent``).
    """

    _normscope_recurrent_norm = True
    __constants__ = ["normalized_shape", "eps", "site"]

    def __init__(self, hidden_size: int, gates: int, site: str, eps: float = 1e-5,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if site not in ("input", "hidden", "cell"):
            raise ValueError(f"Expected site to be 'input', 'hidden' or 'cell', but got {site!r}")
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape: Tuple[int, ...] = (hidden_size,)
        self.eps, self.site, self.gates = float(eps), site, gates
        #: The time step of the sequence being normalized (set by the recurrent layer before each call of a
        #: hidden or cell norm; None for the input norm, which sees all steps at once, and for the cells).
        self.time_step: Optional[int] = None
        #: How many observers (:class:`normscope.monitor.Monitor` instances) want the input norm called once per
        #: time step instead of once over all steps (the same rows, the same values; a time step for findings).
        self.step_observers: int = 0
        shape = (hidden_size,) if site == "cell" else (gates, hidden_size)
        self.weight = torch.nn.Parameter(torch.ones(shape, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, **kw)) if site == "cell" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalized_shape[0]
        if self.bias is not None:
            return layer_norm(x, h, self.weight, self.bias, self.eps)
        return layer_norm(x, h, eps=self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, site={self.site!r}, eps={self.eps}"


def _hidden_gates(h: Tensor, w_hh: Tensor, ln_hh: RecurrentNorm, gates: int, live: int) -> Tensor:
    """``LN_g(W_hh h) * gamma_hh`` of shape ``(B, gates, H)``. Rows ``live:`` hold the zero initial state, whose
    normalized projection is exactly zero (as are its gradients to ``W_hh`` and ``gamma_hh``): they are not
    computed, so that the norm's statistics (and the Monitor) see only the states the recurrence produced."""
    n = h.shape[0]
    if live >= n:
        return ln_hh(torch.nn.functional.linear(h, w_hh).unflatten(-1, (gates, -1)))
    zeros = h.new_zeros(n - live, gates, h.shape[-1])
    if live <= 0:
        return zeros
    return torch.cat([ln_hh(torch.nn.functional.linear(h[:live], w_hh).unflatten(-1, (gates, -1))), zeros])


def _lstm_step(xg: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, ln_hh: RecurrentNorm,
               ln_c: RecurrentNorm, live: int) -> _LSTMState:
    """One LSTM step. ``xg``: the normalized input pre-activations plus biases, ``(B, 4, H)``; ``live``: the
    leading rows whose state is not the zero initial state (see :func:`_hidden_gates`)."""
    gates = xg + _hidden_gates(h, w_hh, ln_hh, 4, live)
    i, f, g, o = gates.unbind(-2)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h2 = torch.sigmoid(o) * torch.tanh(ln_c(c2))
    return h2, c2


def _gru_step(xg: Tensor, h: Tensor, w_hh: Tensor, ln_hh: RecurrentNorm, b_hh: Optional[Tensor],
              live: int) -> Tensor:
    """One GRU step. ``xg``: the normalized input pre-activations plus ``b_ih``, ``(B, 3, H)``."""
    hg = _hidden_gates(h, w_hh, ln_hh, 3, live)
    if b_hh is not None:
        hg = hg + b_hh.view(3, -1)
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


def _reset(module: torch.nn.Module, hidden_size: int) -> None:
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.zero_() if name.endswith(".bias") else p.fill_(1.0)
            else:
                p.uniform_(-bound, bound)


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
        self.ln_ih = RecurrentNorm(hidden_size, self.gates, "input", self.eps, **kw)
        self.ln_hh = RecurrentNorm(hidden_size, self.gates, "hidden", self.eps, **kw)
        self.ln_c = RecurrentNorm(hidden_size, self.gates, "cell", self.eps, **kw) if self.has_cell_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases uniform in ``(-1/sqrt(H), 1/sqrt(H))`` as torch's cells; gains 1, shifts 0."""
        _reset(self, self.hidden_size)

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
        live = 0 if hx is None else h.shape[0]
        xg = self.ln_ih(torch.nn.functional.linear(x, self.weight_ih).unflatten(-1, (4, -1)))
        if self.bias_ih is not None and self.bias_hh is not None:
            xg = xg + (self.bias_ih + self.bias_hh).view(4, -1)
        h, c = _lstm_step(xg, h, c, self.weight_hh, self.ln_hh, cast(RecurrentNorm, self.ln_c), live)
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
        live = 0 if hx is None else h.shape[0]
        xg = self.ln_ih(torch.nn.functional.linear(x, self.weight_ih).unflatten(-1, (3, -1)))
        if self.bias_ih is not None:
            xg = xg + self.bias_ih.view(3, -1)
        h = _gru_step(xg, h, self.weight_hh, self.ln_hh, self.bias_hh, live)
        return h.squeeze(0) if unbatched else h


def _reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """``idx[t, b]``: the time step that position ``t`` of sequence ``b`` reads when its valid part is reversed."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)
    L = lengths.to(t.device).unsqueeze(0)
    return torch.where(t < L, L - 1 - t, t)


def _time_gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 0, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class _Packing:
    """A batch of sequences in the packed layout (``PackedSequence``'s): time-major rows of the sequences
    still running at each step, longest first, so that the rows active at step ``t`` are the first
    ``batch_sizes[t]`` of the (sorted) batch."""

    def __init__(self, batch_sizes: List[int], sorted_indices: Optional[Tensor], unsorted_indices: Optional[Tensor],
                 scatter: Optional[Tensor], batch: int) -> None:
        self.batch_sizes, self.sorted_indices, self.unsorted_indices = batch_sizes, sorted_indices, unsorted_indices
        self.scatter = scatter  # row of each packed row in the (T * B) padded layout; None: nothing padded
        self.batch, self.steps = batch, len(batch_sizes)
        self.offsets = [0]
        for n in batch_sizes:
            self.offsets.append(self.offsets[-1] + n)


def _pack(x: Tensor, lengths: Tensor) -> Tuple[Tensor, _Packing]:
    """``(T, B, I)`` and lengths -> (packed rows ``(N, I)``, the packing). Lengths of 0 are allowed."""
    T, B = x.shape[0], x.shape[1]
    lens = lengths.detach().cpu().to(torch.int64)
    order = torch.sort(lens, descending=True, stable=True).indices
    sorted_lens = lens.index_select(0, order).tolist()
    batch_sizes = [sum(1 for n in sorted_lens if n > t) for t in range(T)]
    rows = torch.cat([t * B + order[:n] for t, n in enumerate(batch_sizes)]) if T else order[:0]
    rows = rows.to(x.device)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(B)
    data = x.reshape(T * B, x.shape[-1]).index_select(0, rows)
    return data, _Packing(batch_sizes, order.to(x.device), unsorted.to(x.device), rows, B)


#: Set to False (or the environment variable NORMSCOPE_RNN_FUSED=0) to run every layer through the per-step
#: module calls instead of the fused CPU kernels; each layer also has a ``fused`` attribute.
_WARNED = False  # the unavailable fused kernels are reported once per process
_FUSED = os.environ.get("NORMSCOPE_RNN_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
#: Which fused kernels run: ``"auto"`` (CPU tensors: the C++ kernels, float32 / float64; CUDA tensors: the Triton
#: kernels, float32 / float16 / bfloat16), or ``"triton"`` to run the Triton kernels on any device (on CPU tensors
#: under Triton's interpreter, ``TRITON_INTERPRET=1``: how the tests check them without a GPU). Environment
#: variable NORMSCOPE_RNN_BACKEND.
_FUSED_BACKEND = os.environ.get("NORMSCOPE_RNN_BACKEND", "auto").strip().lower() or "auto"


def _pick_backend(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """The fused kernels for tensors of this device type and dtype (``"cpu"`` / ``"triton"``), or None."""
    if _FUSED_BACKEND == "triton" or device_type == "cuda":
        return "triton" if dtype in (torch.float32, torch.float16, torch.bfloat16) else None
    if device_type == "cpu":
        return "cpu" if dtype in (torch.float32, torch.float64) else None
    return None


def _fused_kernels(backend: str):
    if backend == "triton":
        from normscope.ops import rnn_triton

        return rnn_triton
    from normscope.ops import rnn_cpu

    return rnn_cpu


class _LNRecurrent(torch.nn.Module):
    gates: int = 4
    mode: str = "LSTM"
    #: Run through the fused kernels where they apply (see :meth:`_fused_backend` and docs/recurrent.md).
    fused: bool = True

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
        self._sfx: List[str] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * dirs
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                self._sfx.append(sfx)
                self.register_parameter("weight_ih" + sfx, torch.nn.Parameter(torch.empty(gh, layer_in, **kw)))
                self.register_parameter("weight_hh" + sfx, torch.nn.Parameter(torch.empty(gh, hidden_size, **kw)))
                if bias:
                    self.register_parameter("bias_ih" + sfx, torch.nn.Parameter(torch.empty(gh, **kw)))
                    self.register_parameter("bias_hh" + sfx, torch.nn.Parameter(torch.empty(gh, **kw)))
                self.add_module("ln_ih" + sfx, RecurrentNorm(hidden_size, self.gates, "input", self.eps, **kw))
                self.add_module("ln_hh" + sfx, RecurrentNorm(hidden_size, self.gates, "hidden", self.eps, **kw))
                if self.mode == "LSTM":
                    self.add_module("ln_c" + sfx, RecurrentNorm(hidden_size, self.gates, "cell", self.eps, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases uniform in ``(-1/sqrt(H), 1/sqrt(H))`` as torch's RNNs; gains 1, shifts 0."""
        _reset(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                           ("eps", 1e-5)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s

    def _params(self, k: int) -> dict:
        sfx = self._sfx[k]
        out = {name: getattr(self, name + sfx, None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                  "ln_ih", "ln_hh", "ln_c")}
        return out

    # ---- input handling -----------------------------------------------------------------------------------

    def _prepare(self, input: Union[Tensor, PackedSequence], lengths: Optional[Tensor], mask: Optional[Tensor]):
        """-> (x ``(T, B, I)`` or the packed rows, lengths, the input PackedSequence or None, unbatched)."""
        if isinstance(input, PackedSequence):
            if lengths is not None or mask is not None:
                raise ValueError("Expected no lengths or mask with a PackedSequence input (it carries its lengths)")
            if input.data.dim() != 2 or input.data.shape[-1] != self.input_size:
                raise ShapeError(f"Expected packed data of size [*, {self.input_size}], but got "
                                 f"{list(input.data.shape)}")
            return input.data, None, input, False
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
        return x, lengths, None, unbatched

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

    def _initial(self, hx, B: int, x: Tensor, unbatched: bool) -> List[Tensor]:
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

    def _input_gates(self, x: Tensor, p: dict, pk: Optional[_Packing] = None, backend: Optional[str] = None
                     ) -> Tensor:
        """The normalized input pre-activations of all steps plus the biases: one matmul and one norm call (one
        norm call per time step, on the same rows, while a Monitor watches the norm: so that what it sees, such
        as the first non-finite value, has a time step). ``backend`` ``"cpu"`` (the fused CPU kernels run this
        direction) and an unobserved input norm: the norm, its gains and the biases in one fused pass."""
        ln: RecurrentNorm = p["ln_ih"]
        pre = torch.nn.functional.linear(x, p["weight_ih"]).unflatten(-1, (self.gates, -1))
        b_ih, b_hh = p["bias_ih"], p["bias_hh"]
        bias = None if b_ih is None else (b_ih + b_hh if self.mode == "LSTM" else b_ih).view(self.gates, -1)
        if (backend == "cpu" and not (ln._forward_hooks or ln._forward_pre_hooks or ln.step_observers)
                and ln.weight.dtype == pre.dtype and ln.weight.device == pre.device):
            return _fused_kernels("cpu").input_gates(pre, ln.weight, bias, ln.eps, inplace=True)  # pre: fresh
        if pk is not None and pk.steps > 1 and ln.step_observers > 0 and not torch.compiler.is_compiling():
            parts = []
            for t in range(pk.steps):
                if pk.batch_sizes[t]:
                    ln.time_step = t
                    parts.append(ln(pre[pk.offsets[t]:pk.offsets[t + 1]]))
            ln.time_step = None
            xg = torch.cat(parts)
        else:
            xg = ln(pre)
        return xg if bias is None else xg + bias

    def _step(self, xg: Tensor, state: List[Tensor], p: dict, live: int, t: int) -> List[Tensor]:
        if not torch.compiler.is_compiling():
            p["ln_hh"].time_step = t
            if p["ln_c"] is not None:
                p["ln_c"].time_step = t
        if self.mode == "LSTM":
            return list(_lstm_step(xg, state[0], state[1], p["weight_hh"], p["ln_hh"], p["ln_c"], live))
        return [_gru_step(xg, state[0], p["weight_hh"], p["ln_hh"], p["bias_hh"], live)]

    def _fused_ok(self, data: Tensor, state: List[Tensor], p: dict) -> bool:
        """Whether this direction runs through the fused kernels (see :func:`_fused_backend`)."""
        return self._fused_backend(data, state, p) is not None

    def _fused_backend(self, data: Tensor, state: List[Tensor], p: dict) -> Optional[str]:
        """The fused kernels this direction runs through: ``"cpu"`` (normscope.ops.rnn_cpu), ``"triton"``
        (normscope.ops.rnn_triton, CUDA tensors) or None (the per-step module calls)."""
        backend = _pick_backend(data.device.type, data.dtype)
        if not (self.fused and _FUSED) or backend is None:
            return None
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return None
        from torch.autograd import forward_ad

        if forward_ad._current_level >= 0:  # forward-mode AD: the per-step ops have forward derivatives
            return None
        norms = [m for m in (p["ln_hh"], p["ln_c"]) if m is not None]
        if any(m._forward_hooks or m._forward_pre_hooks or m.step_observers for m in norms):
            return None  # observed per time step (a Monitor, forward hooks): each norm call must happen
        from torch.nn.modules import module as _module

        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        tensors = [t for t in (*state, p["weight_hh"], p["bias_hh"], *(m.weight for m in norms),
                               getattr(p["ln_c"], "bias", None)) if t is not None]
        if any(t.dtype != data.dtype or t.device != data.device for t in tensors):
            return None
        kernels = _fused_kernels(backend)
        if kernels.available():
            return backend
        global _WARNED
        if not _WARNED:
            _WARNED = True
            warnings.warn(f"normscope: the fused LN-LSTM / LN-GRU {'CPU' if backend == 'cpu' else 'Triton'} kernels "
                          f"are unavailable ({kernels.unavailable_reason()}); running the per-step ops instead "
                          f"(slower; same values)", RuntimeWarning, stacklevel=4)
        return None

    def _run_packed(self, data: Tensor, pk: _Packing, state: List[Tensor], p: dict, reverse: bool,
                    zero_init: bool):
        """One direction of one layer over packed rows; returns (packed outputs ``(N, H)``, final state).
        ``zero_init``: the initial state is zeros (no ``hx``), so rows that have not run yet hold zeros."""
        backend = self._fused_backend(data, state, p)
        xg = self._input_gates(data, p, pk, backend)  # (N, G, H)
        if backend is not None:
            rnn_cpu = _fused_kernels(backend)  # normscope.ops.rnn_cpu or rnn_triton: the same functions

            if self.mode == "LSTM":
                out, h, c = rnn_cpu.lstm_sequence(xg, state[0], state[1], p["weight_hh"], p["ln_hh"].weight,
                                                  p["ln_c"].weight, p["ln_c"].bias, pk.batch_sizes, reverse,
                                                  zero_init, self.eps)
                return out, [h, c]
            out, h = rnn_cpu.gru_sequence(xg, state[0], p["weight_hh"], p["ln_hh"].weight, p["bias_hh"],
                                          pk.batch_sizes, reverse, zero_init, self.eps)
            return out, [h]
        chunks: List[Tensor] = [data.new_zeros(0, self.hidden_size)] * pk.steps
        started = 0  # the leading rows that have run at least one step (the batch is sorted longest first)
        for t in (range(pk.steps - 1, -1, -1) if reverse else range(pk.steps)):
            n = pk.batch_sizes[t]
            if n == 0:
                continue
            live = min(started, n) if zero_init else n
            started = max(started, n)
            xt = xg[pk.offsets[t]:pk.offsets[t] + n]
            if n == pk.batch:
                state = self._step(xt, state, p, live, t)
                chunks[t] = state[0]
            else:  # only the first n sequences run at step t; the others keep their state
                new = self._step(xt, [s[:n] for s in state], p, live, t)
                chunks[t] = new[0]
                state = [torch.cat([a, s[n:]]) for a, s in zip(new, state)]
        return torch.cat(chunks), state

    def _run_masked(self, x: Tensor, valid: Tensor, state: List[Tensor], p: dict):
        """One direction over a padded ``(T, B, I)`` batch with a ``(T, B)`` mask of valid steps (the path that
        torch.compile traces with lengths: no data-dependent shapes)."""
        xg = self._input_gates(x, p)
        outs = []
        for t in range(x.shape[0]):
            new = self._step(xg[t], state, p, x.shape[1], t)
            m = valid[t].unsqueeze(1)
            state = [torch.where(m, a, s) for a, s in zip(new, state)]
            outs.append(torch.where(m, new[0], torch.zeros_like(new[0])))
        out = torch.stack(outs) if outs else x.new_zeros(0, x.shape[1], self.hidden_size)
        return out, state

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, *, lengths: Optional[Tensor] = None,
                mask: Optional[Tensor] = None):
        x, lengths, packed_in, unbatched = self._prepare(input, lengths, mask)
        if packed_in is not None:
            bs = packed_in.batch_sizes.tolist()
            pk: Optional[_Packing] = _Packing(bs, packed_in.sorted_indices, packed_in.unsorted_indices, None,
                                              int(bs[0]) if bs else 0)
            data = x
        elif lengths is not None and torch.compiler.is_compiling():
            pk, data = None, x
        elif lengths is not None:
            data, pk = _pack(x, lengths)
        else:
            T, B = x.shape[0], x.shape[1]
            pk, data = _Packing([B] * T, None, None, None, B), x.reshape(T * B, x.shape[-1])
        B = pk.batch if pk is not None else x.shape[1]
        init = self._initial(hx, B, data, unbatched)
        if pk is not None and pk.sorted_indices is not None:
            init = [s.index_select(1, pk.sorted_indices) for s in init]
        if pk is None:
            output, final = self._forward_masked(x, lengths, init)
        else:
            output, final = self._forward_packed(data, pk, init, hx is None)
        if pk is not None and pk.unsorted_indices is not None:
            final = [f.index_select(1, pk.unsorted_indices) for f in final]
        if packed_in is not None:
            output = PackedSequence(output, packed_in.batch_sizes, packed_in.sorted_indices,
                                    packed_in.unsorted_indices)
        else:
            T, B = x.shape[0], x.shape[1]
            if pk is not None:
                if pk.scatter is not None:
                    output = output.new_zeros(T * B, output.shape[-1]).index_copy(0, pk.scatter, output)
                output = output.view(T, B, -1)
            if unbatched:
                output = output.squeeze(1)
                final = [f.squeeze(1) for f in final]
            elif self.batch_first:
                output = output.transpose(0, 1)
        state_out = (final[0], final[1]) if self.mode == "LSTM" else final[0]
        return output, state_out

    def _stack(self, layer_in: Tensor, init: List[Tensor], run_direction):
        """The layers and directions over ``layer_in``: ``run_direction(layer_in, k, reverse, state)`` runs the
        ``k``-th (layer, direction) and returns (outputs, final state); dropout between layers in training."""
        dirs = 2 if self.bidirectional else 1
        finals: List[List[Tensor]] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                out, fin = run_direction(layer_in, k, bool(d), [s[k] for s in init])
                outs.append(out)
                finals.append(fin)
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = torch.nn.functional.dropout(layer_in, self.dropout, True)
        return layer_in, [torch.stack([f[i] for f in finals]) for i in range(len(init))]

    def _forward_packed(self, data: Tensor, pk: _Packing, init: List[Tensor], zero_init: bool):
        return self._stack(data, init, lambda inp, k, reverse, state: self._run_packed(
            inp, pk, state, self._params(k), reverse, zero_init))

    def _forward_masked(self, x: Tensor, lengths: Tensor, init: List[Tensor]):
        T = x.shape[0]
        lengths = lengths.to(x.device)
        valid = torch.arange(T, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
        x = x.masked_fill(~valid.unsqueeze(-1), 0)  # padding never reaches the projections or statistics
        rev = _reverse_index(lengths, T)

        def run(inp: Tensor, k: int, reverse: bool, state: List[Tensor]):
            if not reverse:
                return self._run_masked(inp, valid, state, self._params(k))
            out, fin = self._run_masked(_time_gather(inp, rev), valid, state, self._params(k))
            return _time_gather(out, rev).masked_fill(~valid.unsqueeze(-1), 0), fin

        return self._stack(x, init, run)


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
