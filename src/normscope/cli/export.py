"""``normscope export``: export a model to ONNX, count its norm operators and verify it with onnxruntime.

Exit status: 0 when the export checks out (:attr:`ExportReport.ok`), 1 when the export ran but the
norm count or the numerical check failed (or the exporter itself failed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

HELP = "export a model to ONNX, count its norm operators and check it under onnxruntime"

_EPILOG = """\
MODEL is package.module:factory (a callable with no arguments returning (model, example_inputs);
the module is imported from sys.path, which includes the current directory) or a local Hugging Face
model directory (config.json + *.safetensors; loaded offline, example input_ids of shape (1, 16)).

examples:
  normscope export mypkg.models:tiny_mlp mlp.onnx
  normscope export ./my-gpt2 gpt2.onnx --opset 23
  normscope export ./my-gpt2 gpt2.tflite --format tflite
"""

_ONNX_HINT = "pip install 'normscope[onnx]'"
_EDGE_HINT = "pip install 'normscope[edge]'"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help=HELP, description=HELP, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="package.module:factory or a Hugging Face model directory")
    p.add_argument("out", metavar="OUT", help="the .onnx (or, with --format tflite, .tflite) file to write")
    p.add_argument("--format", choices=("onnx", "tflite"), default="onnx",
                   help="onnx (default; checked with onnxruntime) or tflite (litert-torch; checked with the LiteRT "
                        "interpreter; extra 'edge')")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset, >= 17 (default: 18; 23 for RMSNormalization)")
    p.add_argument("--no-verify", action="store_true", 
                   help="skip the runtime check (onnxruntime or LiteRT) against PyTorch")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run, prog=p.prog)
    return p


def _check_out(path: str) -> str:
    """The output path, or a one-line complaint (symbolic links resolved; FIFOs, devices and ``-`` accepted)."""
    from normscope._paths import check_output

    if not path:
        return "OUT must be a non-empty path"
    problem = check_output(path)
    return f"cannot write {path!r}: {problem}" if problem else ""


def _missing_onnx() -> list:
    return [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]


def _fmt(x) -> str:
    return "n/a (not verified)" if x is None else f"{x:.3g}"


def _summary(report, description: str, head: list) -> str:
    """The summary lines: the model, ``head`` (what the format has to say), the differences, warnings, verdict."""
    lines = [f"model:       {description}"] if description else []
    lines += head
    lines.append(f"max abs diff: {_fmt(report.max_abs_diff)}")
    lines.append(f"max rel diff: {_fmt(report.max_rel_diff)}")
    lines += [f"warning:     {w}" for w in report.warnings]
    lines.append("OK" if report.ok else "NOT OK")
    return "\n".join(lines) + "\n"


def summary(report, description: str = "") -> str:
    nodes = ", ".join(f"{k} x{v}" for k, v in report.norm_nodes.items()) or "none"
    return _summary(report, description, [
        f"wrote:       {report.path}",
        f"exporter:    {report.exporter}, opset {report.opset}",
        f"norm nodes:  {nodes} (total {report.total_norm_nodes}, expected {report.expected_norms})"])


def tflite_summary(report, description: str = "") -> str:
    return _summary(report, description, [
        f"wrote:       {report.path} ({report.size_bytes / 1e6:.3g} MB, converted in {report.seconds:.3g} s)",
        "exporter:    litert-torch (TFLite)",
        f"norm ops:    RSQRT x{report.norm_ops} (expected {report.expected_norms})"])


def _missing_edge() -> list:
    return [d for d, m in (("litert-torch", "litert_torch"), ("ai-edge-litert", "ai_edge_litert"))
            if importlib.util.find_spec(m) is None]


def run(args: argparse.Namespace) -> int:
    from normscope.cli._models import failer

    fail = failer(args, "normscope export")
    if getattr(args, "format", "onnx") == "tflite":
        if args.opset is not None:
            return fail("--opset applies to --format onnx only")
        missing, what = _missing_edge(), ("TFLite export", "litert-torch and ai-edge-litert", _EDGE_HINT)
    else:
        from normscope.analysis.onnx_export import DEFAULT_OPSET

        args.opset = DEFAULT_OPSET if args.opset is None else args.opset
        if args.opset < 17:
            return fail(f"--opset must be >= 17 (LayerNormalization needs opset 17), got {args.opset}")
        missing, what = _missing_onnx(), ("ONNX export", "onnx, onnxruntime and onnxscript", _ONNX_HINT)
    problem = _check_out(args.out)
    if problem:
        return fail(problem)
    if missing:
        return fail(f"{what[0]} needs {', '.join(missing)}: {what[2]}")

    from normscope.cli._models import UsageError, load_model

    try:
        model, example_inputs, description = load_model(args.model)
    except UsageError as e:
        return fail(str(e))
    try:
        if args.format == "tflite":
            from normscope.analysis.tflite_export import export_tflite

            report = export_tflite(model, example_inputs, args.out, verify=not args.no_verify)
            text = tflite_summary(report, description)
        else:
            from normscope.analysis.onnx_export import export_onnx

            report = export_onnx(model, example_inputs, args.out, opset=args.opset, verify=not args.no_verify)
            text = summary(report, description)
    except ImportError as e:
        return fail(f"{what[0]} needs {what[1]} ({e.name or e}): {what[2]}")
    except (TypeError, ValueError, PermissionError) as e:
        # the exporters' argument checks (example inputs, path, opset)
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, (TypeError, ValueError)) and not line.startswith("Expected"):
            return fail(f"export failed: {type(e).__name__}: {line} (rerun with --debug for the traceback)", 1)
        return fail(line)
    except Exception as e:  # noqa: BLE001 - the exporter / converter failed on this model
        line = (str(e).strip().splitlines() or [""])[0]
        return fail(f"export failed: {type(e).__name__}: {line} (rerun with --debug for the traceback)", 1)
    from normscope._paths import is_stdout

    status = sys.stderr if is_stdout(args.out) else sys.stdout  # the exported file itself may be on stdout
    status.write(text)
    status.flush()
    return 0 if report.ok else 1
