"""A realistic audit result (the dict ``normscope audit`` produces) for the report tests.

``make_result()`` describes a 13-layer BERT-like post-LN encoder (all-MiniLM-L6-v2's shape: hidden
size 384, 6 layers with two LayerNorms each plus the embeddings LayerNorm), with findings of every
severity, histograms, gamma vectors with one planted outlier channel, quantization results with
infinite SQNR, an ONNX export, a profile and the steps. ``make_minimal_result()`` has only the model
and the layers. Everything is deterministic (seeded).
"""

from __future__ import annotations

import copy
import math
import random

HIDDEN = 384
OUTLIER_LAYER = "encoder.layer.3.output.LayerNorm"
OUTLIER_CHANNEL = 137
OUTLIER_VALUE = 9.25
HIST_EDGES = [-8.0 + 0.25 * i for i in range(65)]   # the monitor's default: 64 bins over [-8, 8]


def layer_names():
    names = ["embeddings.LayerNorm"]
    for i in range(6):
        names += [f"encoder.layer.{i}.attention.output.LayerNorm", f"encoder.layer.{i}.output.LayerNorm"]
    return names


def _hist(rng: random.Random, scale: float, n: int = 49152):
    counts = [0] * (len(HIST_EDGES) + 1)
    for _ in range(4096):
        v = rng.gauss(0.0, scale)
        k = 0
        if v >= HIST_EDGES[-1]:
            k = len(HIST_EDGES)
        elif v >= HIST_EDGES[0]:
            k = 1 + int((v - HIST_EDGES[0]) / 0.25)
        counts[k] += n // 4096
    return counts


def _layer(i: int, name: str, rng: random.Random) -> dict:
    scale = 0.6 + 0.25 * i
    var_mean = scale ** 2
    gamma = [round(1.0 + rng.gauss(0.0, 0.08), 5) for _ in range(HIDDEN)]
    outliers = []
    if name == OUTLIER_LAYER:
        gamma[OUTLIER_CHANNEL] = OUTLIER_VALUE
        med = sorted(gamma)[HIDDEN // 2]
        outliers = [[OUTLIER_CHANNEL, OUTLIER_VALUE, round(OUTLIER_VALUE / med, 3)]]
    is_attn = "attention" in name
    sqnr = {"fp16": math.inf if i % 4 == 0 else 72.0 - i, "bf16": 48.5 - 0.4 * i,
            "int8": 36.0 - 1.3 * i - (14.0 if name == OUTLIER_LAYER else 0.0), "fp8_e4m3": 31.0 - 0.7 * i}
    worst_format = min(sqnr, key=sqnr.get)
    return {
        "name": name, "kind": "layer_norm", "placement": "post", "eps": 1e-12, "dtype": "float32",
        "compute_dtype": "float32", "foldable": False,
        "fold_reason": f"its output feeds a residual add ({name.rsplit('.', 1)[0]} + ...), not only Linear layers",
        "consumers": [["linear", f"encoder.layer.{min(i // 2, 5)}.attention.self.query"], ["add", "residual"]],
        "producers": [["add", "residual"]], "risks": ["eps=1e-12 is subnormal in float16"] if i == 0 else [],
        "calls": 1,
        "stats": {
            "var_mean": var_mean, "var_min": var_mean * 0.05, "var_max": var_mean * 9.0,
            "var_p50": var_mean * 0.8, "var_p90": var_mean * 2.2, "var_p99": var_mean * 5.5,
            "eps": 1e-12, "eps_threshold": 1e-11, "eps_rows": 3 if i == 5 else 0,
            "eps_fraction": 3 / 128 if i == 5 else 0.0, "rows": 128,
            "nan_in": 0, "inf_in": 0, "nan_out": 0, "inf_out": 0,
            "in_mean": rng.gauss(0.0, 0.05), "out_mean": 0.0, "out_std": 1.0,
            "grad_input_norm": 10 ** (-2.0 - 0.15 * i) * (3.0 if is_attn else 1.0),
            "grad_param_norm": 10 ** (-1.5 - 0.1 * i),
            "weight_mean": sum(gamma) / HIDDEN, "weight_std": 0.08, "weight_min": min(gamma),
            "weight_max": max(gamma), "bias_mean": 0.01,
        },
        "in_hist": _hist(rng, scale),
        "gamma": gamma,
        "gamma_outliers": outliers,
        "quant": {"sqnr_db": sqnr, "worst_format": worst_format, "worst_sqnr_db": sqnr[worst_format],
                  "outlier_ratio": round(OUTLIER_VALUE, 2) if name == OUTLIER_LAYER else 1.3, "rank": 0},
        "time_ms": round(0.05 + 0.004 * i, 4),
    }


def make_result(**overrides) -> dict:
    """A complete audit result for a 13-layer post-LN encoder; ``overrides`` replace top-level keys."""
    rng = random.Random(1234)
    names = layer_names()
    layers = [_layer(i, n, rng) for i, n in enumerate(names)]
    ranked = sorted(layers, key=lambda L: L["quant"]["worst_sqnr_db"])
    for r, L in enumerate(ranked):
        L["quant"]["rank"] = r + 1
    worst = ranked[0]
    findings = [
        {"layer": None, "step": None, "kind": "post_ln_depth", "severity": "info", "value": 13.0,
         "message": "13 post-LN norms after residual adds: gradient flow weakens with depth", "source": "analysis"},
        {"layer": names[0], "step": None, "kind": "eps_underflow", "severity": "warning", "value": 1e-12,
         "message": "eps=1e-12 underflows to 0 in float16", "source": "analysis"},
        {"layer": names[5], "step": 0, "kind": "eps_dominated", "severity": "warning", "value": 3.0,
         "message": "3 of 128 rows (2.3%) have variance below 10*eps=1e-11", "source": "monitor"},
        {"layer": OUTLIER_LAYER, "step": None, "kind": "gamma_outliers", "severity": "warning",
         "value": OUTLIER_VALUE, "message": f"channel {OUTLIER_CHANNEL} of gamma is {OUTLIER_VALUE} "
                                            "(9.2x the median)", "source": "quant"},
        {"layer": OUTLIER_LAYER, "step": None, "kind": "quant_sensitive", "severity": "error",
         "value": worst["quant"]["worst_sqnr_db"],
         "message": f"int8 SQNR {worst['quant']['worst_sqnr_db']:.1f} dB is below 20 dB", "source": "quant"},
        {"layer": names[12], "step": 0, "kind": "not_foldable", "severity": "info", "value": None,
         "message": "output feeds a residual add", "source": "analysis"},
        {"layer": None, "step": None, "kind": "norm_latency", "severity": "info", "value": 0.071,
         "message": "norm layers take 7.1% of the forward time", "source": "profile"},
    ]
    fwd_ms = 11.2
    norm_ms = round(sum(L["time_ms"] for L in layers), 4)
    result = {
        "normscope_version": "0.1.0", "created": "2026-11-26T07:00:00+00:00", "duration_s": 12.3, "exit_code": 1,
        "model": {"name": "all-MiniLM-L6-v2", "source": "normscope demo (bundled)", "class": "BertModel",
                  "parameters": 22713216, "trainable_parameters": 22713216, "dtype": "float32", "device": "cpu",
                  "inputs": "input_ids, attention_mask: (2, 64) int64, 9% padding",
                  "config": {"hidden_size": HIDDEN, "num_hidden_layers": 6, "layer_norm_eps": 1e-12,
                             "hidden_act": "gelu", "model_type": "bert"}},
        "environment": {"python": "3.11.7", "torch": "2.13.0+cpu", "backend": "cpu",
                        "platform": "Linux-6.1-x86_64", "onnxruntime": "1.32.0"},
        "summary": {"layers": 13, "kinds": {"layer_norm": 13}, "placements": {"post": 13}, "foldable": 0,
                    "findings": {"error": 1, "warning": 3, "info": 3}, "nonfinite": 0, "eps_rows": 3,
                    "worst_sqnr_db": worst["quant"]["worst_sqnr_db"], "worst_sqnr_layer": worst["name"],
                    "int8_sqnr_db": 24.6, "int8_cosine": 0.99712, "export_max_abs_diff": 2.4e-06,
                    "norm_time_share": norm_ms / fwd_ms},
        "layers": layers,
        "hist_edges": list(HIST_EDGES),
        "findings": findings,
        "export": {"ok": True, "opset": 18, "exporter": "torch.onnx (dynamo)", "norm_nodes": {"LayerNormalization": 13},
                   "max_abs_diff": 2.4e-06, "max_rel_diff": 3.1e-05, "error": None},
        "quant": {"formats": ["fp16", "bf16", "int8", "fp8_e4m3"], "ranking": [L["name"] for L in ranked],
                  "dynamic_int8": {"linear_layers": 36, "sqnr_db": 24.6, "cosine_mean": 0.99712,
                                   "cosine_min": 0.9902, "warning": None}},
        "profile": {"forward_ms": fwd_ms, "norm_ms": norm_ms, "share": norm_ms / fwd_ms,
                    "top_ops": [["aten::addmm", 6.1, 36], ["aten::bmm", 1.4, 12], ["aten::gelu", 0.9, 6],
                                ["aten::native_layer_norm", norm_ms, 13], ["aten::_softmax", 0.5, 6]]},
        "steps": [{"name": "analysis", "status": "ok", "seconds": 0.8, "message": None},
                  {"name": "monitor", "status": "ok", "seconds": 2.1, "message": None},
                  {"name": "export", "status": "ok", "seconds": 6.2, "message": None},
                  {"name": "quant", "status": "ok", "seconds": 2.4, "message": None},
                  {"name": "profile", "status": "ok", "seconds": 0.8, "message": None}],
    }
    result.update(copy.deepcopy(overrides))
    return result


def make_minimal_result() -> dict:
    """Only ``model`` and ``layers`` (names, kinds, placements): every other key missing."""
    full = make_result()
    keep = ("name", "kind", "placement", "eps", "dtype", "compute_dtype", "foldable", "fold_reason")
    return {"model": {"name": "tiny", "class": "Tiny", "parameters": 0, "trainable_parameters": 0},
            "layers": [{k: L[k] for k in keep} for L in full["layers"]]}
