"""Fold the affine parameters of normalization layers into the Linear layers that consume them.

See :func:`fold_norms_` and ``docs/analysis.md`` (section "Folding").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from normscope.analysis.placement import _split_inputs, analyze
from normscope.analysis.tracer import is_linear_module, trace
from normscope.discovery import NormLayer, find_norm_layers, probe_norm_dims
from normscope.nn import Skipped

__all__ = ["fold_norms_", "FoldResult", "FoldedNorm", "SkippedNorm"]

class FoldedNorm(NamedTuple):
    """A norm whose affine parameters were folded: ``(norm, consumers, untied)``.

    ``consumers``: the consuming Linear / Conv1D module names. ``untied``: one ``"<param> (was tied to
    <other>)"`` line for each consumer weight or bias that was shared and was cloned before folding.
    """

    norm: str
    consumers: Tuple[str, ...]
    untied: Tuple[str, ...]


#: A norm that was left unchanged: the type of :func:`normscope.convert`'s skipped items too (``name``, ``module``
#: (its class name), ``reason``; ``norm`` is ``name``).
SkippedNorm = Skipped


@dataclass
class FoldResult:
    """What :func:`fold_norms_` did: ``folded`` norms and ``skipped`` norms (:class:`normscope.nn.Skipped`, the
    type of :func:`normscope.convert`'s skipped items) with the reason."""

    folded: List[FoldedNorm] = field(default_factory=list)
    skipped: List[SkippedNorm] = field(default_factory=list)

    def to_dict(self) -> Dict[str, list]:
        """A JSON-serializable dict."""
        return {"folded": [{"norm": f.norm, "consumers": list(f.consumers), "untied": list(f.untied)}
                           for f in self.folded],
                "skipped": [{"norm": s.name, "module": s.module, "reason": s.reason} for s in self.skipped]}


def _known_offset(layer: NormLayer) -> Optional[float]:
    """``weight_offset`` of a module whose forward normscope knows, else None (it must be probed)."""
    from normscope.nn import LayerNorm, RMSNorm

    module = layer.module
    if type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm, LayerNorm):
        return 0.0
    if type(module) is RMSNorm:
        return float(getattr(module, "weight_offset", 0.0))
    return None


def _probe_offset(layer: NormLayer) -> Tuple[Optional[float], str]:
    """Run a module of unknown forward on a probe: which offset makes it ``norm(x) * (offset + weight) + bias``.

    The probes are laid out as the layer takes them (channels-first ``(N, C, ...)`` or trailing features), so that
    a channels-first norm such as timm's ``LayerNorm2d`` is probed on its own layout."""
    size = int(layer.normalized_shape[0]) if layer.normalized_shape else int(layer.module.weight.shape[0])
    kind, offset, _, reason = probe_norm_dims(layer.module, size, layer.eps, kinds=(layer.kind,))
    if kind is None:
        return None, f"probing what it computes: {reason}"
    return offset, ""


def _aliases(model: torch.nn.Module) -> Dict[int, List[str]]:
    found: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), []).append(name)
    return found


def _untie(model: torch.nn.Module, module: torch.nn.Module, module_name: str, attr: str,
           untied: List[str]) -> None:
    """Give ``module.attr`` its own Parameter if the same tensor is reachable under another name."""
    p = getattr(module, attr)
    if p is None:
        return
    own = f"{module_name}.{attr}" if module_name else attr
    others = [n for n in _aliases(model).get(id(p), []) if n != own]
    if others:
        setattr(module, attr, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        untied.append(f"{own} (was tied to {others[0]})")


@torch.no_grad()
def _fold_into(module: torch.nn.Module, gamma: torch.Tensor, beta: Optional[torch.Tensor]) -> None:
    """``W' = W diag(gamma)``, ``b' = b + W beta`` in float64, cast back to the parameter dtype."""
    weight = module.weight
    w = weight.double()
    conv1d = not isinstance(module, torch.nn.Linear)  # transformers Conv1D: y = x @ W + b, W is (in, out)
    new_w = gamma[:, None] * w if conv1d else w * gamma[None, :]
    if beta is not None and bool(beta.any()):
        shift = beta @ w if conv1d else w @ beta
        if module.bias is None:
            module.bias = torch.nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            module.bias.copy_((module.bias.double() + shift).to(module.bias.dtype))
    weight.copy_(new_w.to(weight.dtype))


def _consumer_problem(model: torch.nn.Module, name: str, size: int, has_beta: bool = False) -> str:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return f"consumer {name} is not a submodule"
    if not is_linear_module(module):
        return f"consumer {name} is a {type(module).__name__}, not a torch.nn.Linear or transformers Conv1D"
    weight = module.weight
    if not isinstance(weight, torch.nn.Parameter) or not weight.dtype.is_floating_point:
        return f"consumer {name} has no floating-point weight Parameter"
    if weight.device.type == "meta":
        return f"consumer {name} is on the meta device"
    in_features = weight.shape[1] if isinstance(module, torch.nn.Linear) else weight.shape[0]
    if in_features != size:
        return f"consumer {name} takes {in_features} input features, the norm normalizes {size}"
    if has_beta and getattr(module, "bias", None) is None:
        # Folding beta needs a bias the consumer was built without: a new parameter that the model's own
        # save / load (save_pretrained + from_pretrained, or load_state_dict into a fresh instance) drops or
        # rejects, so the reloaded model would silently compute something else.
        return (f"consumer {name} has no bias to fold beta into (a bias added to it would not survive the model's "
                "save / reload)")
    return ""


def fold_norms_(
    model: torch.nn.Module,
    example_inputs,
    *,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> FoldResult:
    """Fold the affine ``weight`` (gamma) and ``bias`` (beta) of normalization layers into their consumers, in place.

    One forward pass of ``model`` on ``example_inputs`` (as for :func:`normscope.analysis.analyze`) decides,
    from the traced dataflow, which ``layer_norm`` / ``rms_norm`` layers feed only ``torch.nn.Linear`` /
    transformers ``Conv1D`` modules (each of which takes its input from that norm alone). For those,
    ``W' = W diag(gamma)`` and ``b' = b + W beta`` are computed in float64 and cast back to the parameter dtype
    (a norm with a non-zero beta whose consumer has no bias is skipped: a bias added to the consumer would not
    survive the model's own save / reload), a consumer weight shared with another module (a tied ``lm_head``) is first
    cloned into its own Parameter, and the norm is left computing the plain normalization: its ``weight`` is
    set to ones (``1 - weight_offset`` for Gemma-style modules) and its ``bias`` to zeros, in place, so the
    module class, eps and state-dict keys stay. Outputs are unchanged up to rounding in eval mode (dropout
    between the norm and its consumers, active in training, masks the folded bias differently).

    Args:
        model: the model, modified in place.
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments.
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool`` choosing the norms to fold.

    Returns:
        A :class:`FoldResult`: ``folded`` ``(norm, consumers, untied)`` and ``skipped`` ``(norm, reason)``.

    Example::

        >>> result = normscope.fold_norms_(gpt2, {"input_ids": ids})
        >>> result.folded[0]
        FoldedNorm(norm='transformer.h.0.ln_1', consumers=('transformer.h.0.attn.c_attn',), untied=())
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"Expected filter_fn to be callable or None, but got {type(filter_fn).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    report = analyze(model, example_inputs, filter_fn=filter_fn)
    layers = {layer.name: layer for layer in find_norm_layers(model, filter_fn)}
    # Which norm call feeds each call of each Linear: a consumer is folded only if every call of it reads the norm.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        graph, _ = trace(model, args, kwargs, {layer.module: name for name, layer in layers.items()})
    finally:
        for m, training in modes:
            m.training = training
    linear_inputs: Dict[str, set] = {}
    for node in graph.nodes:
        if node.kind == "linear":
            linear_inputs.setdefault(node.name, set()).update(node.inputs[:1] or [-1])
    norm_nodes = {name: {call.node for call in calls} for name, calls in graph.norm_calls.items()}

    result = FoldResult()
    plans = []
    for rep in report:
        layer = layers.get(rep.name)
        if layer is None:  # not expected: analyze and find_norm_layers see the same layers
            result.skipped.append(Skipped(rep.name, "", "not found as a normalization layer"))
            continue
        if not rep.foldable:
            result.skipped.append(Skipped(rep.name, type(layer.module).__name__, rep.fold_reason))
            continue
        reason, consumers = "", []
        matmuls = [n for k, n in rep.consumers if k != "linear"]
        shape = layer.normalized_shape or ()
        if matmuls:
            reason = ("its output feeds a functional matmul with " + ", ".join(matmuls)
                      + "; only torch.nn.Linear / transformers Conv1D modules are folded into")
        elif len(shape) != 1:
            reason = f"it normalizes over {len(shape)} dims; only 1-D normalized_shape is folded"
        if not reason:
            consumers = [n for _, n in rep.consumers]
            bias = getattr(layer.module, "bias", None)
            has_beta = isinstance(bias, torch.Tensor) and bool(bias.detach().any())
            for name in consumers:
                reason = _consumer_problem(model, name, shape[0], has_beta)
                if not reason and not linear_inputs.get(name, set()) <= norm_nodes.get(rep.name, set()):
                    reason = f"consumer {name} is also called on inputs that do not come from this norm"
                if reason:
                    break
        offset = None
        if not reason:
            offset = _known_offset(layer)
            if offset is None:
                offset, reason = _probe_offset(layer)
        if not reason:
            aliases = _aliases(model)
            for attr in ("weight", "bias"):
                p = getattr(layer.module, attr, None)
                if isinstance(p, torch.Tensor) and len(aliases.get(id(p), [])) > 1:
                    others = [a for a in aliases[id(p)] if not a.startswith(f"{rep.name}.")]
                    reason = f"its {attr} is shared with {others[0] if others else aliases[id(p)][1]}"
        if reason:
            result.skipped.append(Skipped(rep.name, type(layer.module).__name__, reason))
            continue
        plans.append((rep.name, layer, offset, consumers))

    # Consumers are disjoint between plans (each Linear reads one norm), so folding order does not matter.
    with torch.no_grad():
        for name, layer, offset, consumers in plans:
            module = layer.module
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            n = layer.normalized_shape[0]
            gamma = (torch.ones(n, dtype=torch.float64) if weight is None
                     else weight.detach().double().cpu() + offset)
            beta = None if bias is None else bias.detach().double().cpu()
            untied: List[str] = []
            for cname in consumers:
                consumer = model.get_submodule(cname)
                _untie(model, consumer, cname, "weight", untied)
                _untie(model, consumer, cname, "bias", untied)
                device = consumer.weight.device
                _fold_into(consumer, gamma.to(device), None if beta is None else beta.to(device))
            if weight is not None:
                weight.fill_(1.0 - offset)
            if bias is not None:
                bias.zero_()
            result.folded.append(FoldedNorm(name, tuple(consumers), tuple(untied)))
    if any(f.untied for f in result.folded):
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # so that save / reload or tie_weights() does not re-tie
    return result
