"""What to do about each kind of finding, keyed to the failure modes F1-F8 of layer normalization.

The failure modes (training divergence, inference drift, latency, memory, numeric instability,
masking bugs, gradient vanishing, pruning) and their generic mitigations come from the usual
layer-normalization troubleshooting table; each entry here makes that mitigation concrete for the
finding, naming the normscope function or option that helps.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

__all__ = ["Mitigation", "MITIGATIONS", "FAILURE_MODES", "mitigation_for"]


class Mitigation(NamedTuple):
    """A failure mode id (``"F1"``..``"F8"``), a short title and 1-3 sentences on what to do."""

    failure_mode: str
    title: str
    text: str


FAILURE_MODES: Dict[str, str] = {
    "F1": "Training divergence",
    "F2": "Inference drift",
    "F3": "Latency spikes",
    "F4": "Memory blowup",
    "F5": "Numeric instability",
    "F6": "Masking bugs",
    "F7": "Gradient vanishing",
    "F8": "Incompatibility with pruning",
}

MITIGATIONS: Dict[str, Mitigation] = {
    # monitor
    "nonfinite_input": Mitigation(
        "F1", "Find where the NaN/Inf is born",
        "The value was already non-finite when it entered this layer: inspect the layer that ran before it "
        "(named in the message), lower the learning rate or clip gradients, and with mixed precision use a "
        "loss scaler (torch.amp.GradScaler). Keep normscope.Monitor(model, every=1) on to catch the first step."),
    "nonfinite_output": Mitigation(
        "F5", "Increase eps / compute statistics in float32",
        "The input was finite but the normalized output was not: a near-zero variance met a too-small eps or a "
        "16-bit reduction. Increase eps (1e-5 or more for float16) and compute statistics in float32, e.g. by "
        "swapping in normscope.nn.LayerNorm / RMSNorm with normscope.convert(model)."),
    "nonfinite_grad": Mitigation(
        "F1", "Stabilise the backward pass",
        "A gradient became non-finite in backward: enable loss scaling for mixed precision, clip gradients "
        "(torch.nn.utils.clip_grad_norm_) and check eps on the layers whose variance is tiny "
        "(eps_dominated findings)."),
    "eps_dominated": Mitigation(
        "F5", "eps, not the data, sets the scale of these rows",
        "Rows whose variance is below eps_factor * eps are normalized by eps: find where the input collapses "
        "(padding, constant features) and mask padded positions with normscope.masked_layer_norm / "
        "masked_rms_norm, or lower eps if the rows are genuine low-variance data."),
    "weight_drift": Mitigation(
        "F2", "Track and bound gamma drift",
        "Gamma moved far from its reference: check the learning rate and weight decay of norm parameters "
        "(usually excluded from decay), and keep exporting the drift with normscope.Monitor sinks so a "
        "deploy can be compared with the last good checkpoint."),
    "bias_drift": Mitigation(
        "F2", "Track and bound beta drift",
        "Beta moved far from its reference: check the optimizer settings of norm biases and compare against "
        "the last good checkpoint; re-calibrate gamma/beta if the model was pruned or fine-tuned (F8)."),
    "grad_exploding": Mitigation(
        "F1", "Rein in growing gradients",
        "The gradient norm through this norm grew well above its history: lower the learning rate or warm it "
        "up, clip gradients, and check eps and loss scaling; Post-LN stacks are more prone than Pre-LN."),
    "grad_vanishing": Mitigation(
        "F7", "Restore gradient flow",
        "The gradient norm fell well below its history: move to Pre-LN or adjust the learning rate schedule, "
        "and check that the layer is not frozen by mistake."),
    "grad_outlier": Mitigation(
        "F7", "One layer's gradient is out of line",
        "This layer's input gradient is far from the other layers': typical of Post-LN depth effects or a "
        "misplaced norm. Consider Pre-LN (or a warm-up) and compare per-layer gradient norms over steps."),
    "variance_shift": Mitigation(
        "F2", "The input distribution moved",
        "The mean input variance changed against the baseline: align preprocessing between training and "
        "serving, then re-baseline with Monitor.compare() on a canonical batch per model version."),
    # analysis
    "eps_underflow": Mitigation(
        "F5", "eps vanishes in the compute dtype",
        "eps underflows (or is subnormal) in the dtype the statistics are computed in: raise it (1e-5 for "
        "float16) or compute in float32; normscope's norms always reduce in float32 (normscope.convert)."),
    "reduced_precision": Mitigation(
        "F5", "Statistics in 16-bit",
        "Mean and variance are computed in float16/bfloat16 without an upcast: use a module that upcasts "
        "(normscope.nn.LayerNorm / RMSNorm via normscope.convert(model)) and keep loss scaling on."),
    "eps_inconsistent": Mitigation(
        "F5", "Standardize eps",
        "This layer's eps differs from the others of its kind: make it one value in the model config and record "
        "it in the model metadata, so that training, export and serving agree."),
    "post_ln_depth": Mitigation(
        "F7", "Deep Post-LN stack",
        "Post-LN norms sit after each residual add, which weakens gradient flow as depth grows: use learning-rate "
        "warm-up (or Pre-LN when training from scratch) and watch per-layer gradients with normscope.Monitor."),
    "not_foldable": Mitigation(
        "F3", "gamma/beta cannot be folded",
        "A consumer other than a Linear (a residual add, the model output) reads this norm, so "
        "normscope.fold_norms_ cannot fold its affine parameters; use a fused kernel (normscope.convert) or an "
        "optimized runtime (ONNX LayerNormalization) instead."),
    # quantization
    "quant_sensitive": Mitigation(
        "F2", "Quantization-sensitive layer",
        "Quantizing around this norm loses the most signal (lowest SQNR): keep it and its consumers in "
        "float16/bfloat16, or use quantization-aware training; judge the result in SQNR dB (> 20 dB)."),
    "gamma_outliers": Mitigation(
        "F2", "Outlier gamma channels",
        "A few channels of gamma are far above the median and stretch the quantization range: clamp gamma, "
        "quantize those channels separately (per-channel or mixed precision), or use quantization-aware training."),
    "int8_degradation": Mitigation(
        "F2", "Dynamic int8 degrades the output",
        "Dynamic int8 quantization of the Linear layers changed the output beyond the cosine/SQNR limit: leave "
        "the sensitive layers (ranked in the quantization section) in floating point, or calibrate statically."),
    # export
    "export_failed": Mitigation(
        "F3", "Export did not succeed",
        "The ONNX export failed, so the target runtime may lack a norm op: try another opset with "
        "normscope.export_onnx(model, inputs, path, opset=...) (23 for RMSNormalization) or replace "
        "framework-specific norm modules with supported ones (normscope.convert)."),
    "export_mismatch": Mitigation(
        "F2", "Exported model differs from PyTorch",
        "onnxruntime's output differs from PyTorch beyond tolerance: check eps and dtype in the exported "
        "LayerNormalization nodes (stash_type=1 for float32 statistics) and standardize them in the model config."),
    "export_unverified": Mitigation(
        "F2", "Exported model not checked numerically",
        "onnxruntime's CPU provider could not run the exported graph (typically bfloat16 kernels it lacks), so "
        "its outputs were not compared with PyTorch: audit the float32 model, or check the export on the "
        "runtime you deploy to."),
    # profile
    "norm_latency": Mitigation(
        "F3", "Normalization takes a large share of time",
        "Norm layers take a large share of the forward time: fuse them (normscope.convert for fused kernels, "
        "add_layer_norm for the residual add), fold gamma/beta where possible (normscope.fold_norms_), or use "
        "an optimized runtime; micro-batch small requests."),
}

_GENERIC = Mitigation(
    "F1", "Inspect the layer",
    "No specific advice for this kind of finding: inspect the layer's statistics in the per-layer table and "
    "its plots, and keep normscope.Monitor on to see whether the condition persists.")


def mitigation_for(kind: str) -> Mitigation:
    """The mitigation for a finding ``kind``, or a generic one for an unknown kind.

    Example::

        >>> mitigation_for("eps_dominated").failure_mode
        'F5'
    """
    return MITIGATIONS.get(str(kind), _GENERIC)
