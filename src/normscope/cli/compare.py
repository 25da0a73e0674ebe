"""``normscope compare``: the canary gate -- compare a candidate model with a baseline on the same inputs.

Exit status: 0 when every check passes or is skipped (go), 1 when one fails (no-go), 2 on bad usage (one
line on stderr, no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict

HELP = "canary gate: compare a candidate model with a baseline (a model or an audit JSON); exit 0 go, 1 no-go"

_EPILOG = """\
BASELINE is a model (as for normscope audit: a local Hugging Face directory or package.module:factory) or the
--json of an earlier `normscope audit` of it (then the checks that need the model itself are skipped, and
say so). CANDIDATE is a model. Both run on the same inputs: --text / --inputs, else the candidate's example
inputs (its factory's, or built from its Hugging Face config / the built-in sentences).

Checks (thresholds: --threshold NAME=VALUE, names as in docs/compare.md): norm_config (eps, kind),
input_change, variance_ratio, gamma_drift, beta_drift, output_psi, output_js, output_cosine, latency,
quantization, new_findings.

examples:
  normscope compare ./model-v1 ./model-v2 --report canary.html
  normscope compare v1-audit.json ./model-v2 --json canary.json
  normscope compare mypkg.models:prod mypkg.models:pruned --threshold input_change=0.05 --skip latency
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help=HELP, description=HELP, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", metavar="BASELINE",
                   help="the model in production: a Hugging Face directory, package.module:factory, or an audit JSON")
    p.add_argument("candidate", metavar="CANDIDATE", help="the model to roll out (directory or package.module:factory)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", action="append", default=None, metavar="TEXT",
                     help="a sentence to run the models on (repeat for a batch); needs a tokenizer")
    src.add_argument("--inputs", metavar="FILE", default=None,
                     help="inputs: .txt (sentences), .safetensors or .npz (named tensors)")
    p.add_argument("--report", metavar="PATH.html", default=None,
                   help="write the HTML report here ('-': standard output)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the full result as JSON ('-': standard output, the summary goes to stderr)")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="override one threshold (e.g. input_change=0.05, new_findings=error); repeatable")
    p.add_argument("--skip", action="append", default=[], choices=["latency", "quantization"], metavar="CHECK",
                   help="skip the latency or quantization check (they take the most time); repeatable")
    p.add_argument("--repeats", type=int, default=7, metavar="N",
                   help="timed samples of each model for the latency check (default 7)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run, prog=p.prog)
    return p


def _thresholds(items) -> Any:
    from normscope.cli.audit import _Usage
    from normscope.compare import CompareThresholds

    overrides: Dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise _Usage(f"--threshold expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    try:
        return CompareThresholds.from_overrides(overrides)
    except ValueError as e:
        raise _Usage(f"--threshold: {e}") from e


def _is_audit_json(spec: str) -> bool:
    return spec.endswith(".json") and os.path.isfile(spec)


def _model(args, spec: str):
    from normscope.cli.audit import _load

    ns = argparse.Namespace(model=spec, text=args.text, inputs=args.inputs)
    return _load(ns)


def run(args: argparse.Namespace) -> int:
    from normscope.cli._models import failer
    from normscope.cli.audit import _check_writable, _Progress, _same_stdout, _Usage

    fail = failer(args, "normscope compare")
    progress = _Progress(not args.quiet)
    try:
        thresholds = _thresholds(args.threshold)
        if args.repeats < 1:
            raise _Usage(f"--repeats must be >= 1, got {args.repeats}")
        if args.report:
            _check_writable(args.report, "the report")
        if args.json:
            _check_writable(args.json, "the JSON")
        if args.json and args.report and _same_stdout(args.json, args.report):
            raise _Usage("--json - and --report - both ask for standard output; give one of them a file")
        if _is_audit_json(args.candidate):
            raise _Usage(f"CANDIDATE {args.candidate!r} is a JSON file: the candidate must be a model "
                         "(an audit JSON can only be the baseline)")
        from normscope.compare import compare, load_audit_json

        baseline_spec = args.baseline
        t0 = time.perf_counter()
        if _is_audit_json(baseline_spec):
            try:
                baseline = load_audit_json(baseline_spec)
            except (ValueError, OSError) as e:
                raise _Usage(str(e).replace("Expected the baseline", "expected BASELINE")) from e
            base_name = (baseline.get("model") or {}).get("name") or os.path.basename(baseline_spec)
        else:
            if baseline_spec.endswith(".json"):
                raise _Usage(f"no such file: BASELINE {baseline_spec!r}")
            progress.line("loading the baseline ...", final=False)
            baseline, _, base_name, _, _ = _model(args, baseline_spec)
        progress.line("loading the candidate ...", final=False)
        candidate, inputs, cand_name, _, desc = _model(args, args.candidate)
        progress.line(f"loaded the models in {time.perf_counter() - t0:.1f} s")
        try:
            result = compare(baseline, candidate, inputs, thresholds=thresholds,
                             latency="latency" not in args.skip, quantization="quantization" not in args.skip,
                             repeats=args.repeats, baseline_name=base_name, candidate_name=cand_name,
                             inputs_description=desc, progress=progress.line)
        except (TypeError, ValueError) as e:
            raise _Usage(str(e).strip().splitlines()[0]) from e
    except _Usage as e:
        return fail(str(e))

    from normscope.cli.audit import write_outputs
    from normscope.compare import summary_text

    def write_report(res: dict, path: str) -> None:
        from normscope.report.compare_html import write_compare_html

        write_compare_html(res, path)

    _, err = write_outputs(result, summary_text(result), args.json, args.report or None, write_report, fail)
    if err is not None:
        return err
    sys.stdout.flush()
    return int(result["exit_code"])
