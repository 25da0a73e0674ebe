"""MLflow: log an audit with the model version it belongs to, and load what the serving side needs back.

:func:`log_audit` logs an audit result (:func:`normscope.audit.run_audit`) to an MLflow run: the finding
counts and summary numbers as metrics, the verdict (``pass`` / ``warn`` / ``fail``) and the normalization config
fingerprint as tags, the JSON result, the HTML report, the normalization config
(:func:`normscope.serving.config.norm_config`) and an output baseline for drift
(:class:`normscope.drift.Baseline`) as artifacts under ``normscope/``; with ``register`` it creates a version of
a registered model tagged ``normscope.audit=pass|warn|fail`` and ``normscope.fingerprint``.
:func:`load_registered` reads a registered version's config, fingerprint and baseline back, and
:func:`instrument_registered` wraps the served model with them (:func:`normscope.serving.instrument`), so the
service exports ``normscope_config_mismatch`` = 1 when it serves a model whose eps or dtypes differ from the
audited one. See docs/serving.md, "MLflow".

This module imports ``mlflow`` (``pip install 'normscope[mlflow]'``: ``mlflow-skinny`` is enough, plus
``sqlalchemy`` and ``alembic`` for a database store such as ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:
    from normscope.serving import InstrumentedModel

try:
    import mlflow
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("normscope.integrations.mlflow needs mlflow: pip install 'normscope[mlflow]'") from e

__all__ = ["ARTIFACT_DIR", "LoggedAudit", "RegisteredAudit", "audit_status", "log_audit", "load_registered",
           "instrument_registered"]

#: Where the artifacts go in the run: ``normscope/audit.json``, ``report.html``, ``norm_config.json``,
#: ``baseline.npz``.
ARTIFACT_DIR = "normscope"
_TAG = "normscope."
_SUMMARY_METRICS = ("layers", "foldable", "nonfinite", "eps_rows", "worst_sqnr_db", "int8_sqnr_db", "int8_cosine",
                    "export_max_abs_diff", "norm_time_share")


@dataclass(frozen=True)
class LoggedAudit:
    """What :func:`log_audit` logged: the run, the verdict, the fingerprint and the registered version (if any)."""

    run_id: str
    status: str
    fingerprint: str
    artifact_uri: str
    model_name: Optional[str] = None
    model_version: Optional[str] = None


@dataclass(frozen=True)
class RegisteredAudit:
    """A registered model version's audit, as :func:`load_registered` reads it back.

    Attributes:
        name, version: the registered model and version.
        run_id: the run :func:`log_audit` logged to.
        status: ``pass`` / ``warn`` / ``fail`` (the version's ``normscope.audit`` tag).
        fingerprint: the fingerprint of the audited normalization config.
        config: the audited normalization config (:func:`normscope.serving.config.norm_config`).
        baseline: the output baseline (:class:`normscope.drift.Baseline`), or None when none was logged.
    """

    name: str
    version: str
    run_id: str
    status: str
    fingerprint: str
    config: Dict[str, Any]
    baseline: Any = None


def audit_status(result: Dict[str, Any]) -> str:
    """The verdict of an audit result: ``fail`` with an error finding, ``warn`` with a warning, else ``pass``."""
    findings = (result.get("summary") or {}).get("findings")
    if not isinstance(findings, dict):
        raise ValueError(f"Expected an audit result (normscope.audit.run_audit) with summary.findings, but got "
                         f"keys {sorted(result) if isinstance(result, dict) else type(result).__name__}")
    if findings.get("error", 0):
        return "fail"
    if findings.get("warning", 0):
        return "warn"
    return "pass"


def _client(tracking_uri: Optional[str], registry_uri: Optional[str]) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def _metrics_of(result: Dict[str, Any]) -> Dict[str, float]:
    summary = result.get("summary") or {}
    out: Dict[str, float] = {}
    for sev, n in (summary.get("findings") or {}).items():
        out[f"normscope.findings.{sev}"] = float(n)
    kinds: Dict[str, int] = {}
    for f in result.get("findings") or []:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    for kind, n in kinds.items():
        out[f"normscope.finding.{kind}"] = float(n)
    for key in _SUMMARY_METRICS:
        v = summary.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"normscope.{key}"] = float(v)
    if isinstance(result.get("duration_s"), (int, float)):
        out["normscope.duration_s"] = float(result["duration_s"])
    return out


def _first_tensor(out: Any) -> Any:
    from normscope.serving.wrapper import _first_tensor as first

    return first(out)


def _output_baseline(model, example_inputs, model_version: str):
    import torch

    from normscope.drift import Baseline

    with torch.no_grad():
        if isinstance(example_inputs, dict):
            out = model(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            out = model(*example_inputs)
        else:
            out = model(example_inputs)
    pred = _first_tensor(out)
    if pred is None:
        raise ValueError("Expected the model's output to hold a tensor for the drift baseline, but got "
                         f"{type(out).__name__}; pass baseline= explicitly")
    pred = pred.detach().float().cpu()
    if pred.ndim > 2:  # [batch, tokens, features]: one row per item, the mean over the other axes
        pred = pred.flatten(1, -2).mean(dim=1)
    return Baseline.from_outputs(pred, model_version=model_version)


def log_audit(
    result: Dict[str, Any],
    *,
    model: Any = None,
    example_inputs: Any = None,
    baseline: Any = None,
    tracking_uri: Optional[str] = None,
    registry_uri: Optional[str] = None,
    experiment: Optional[str] = None,
    run_id: Optional[str] = None,
    register: Optional[str] = None,
    model_uri: Optional[str] = None,
    report: bool = True,
) -> LoggedAudit:
    """Log an audit result to MLflow and optionally register a model version with it.

    Logs to the run ``run_id`` (default: a new run in ``experiment``, or the active run if there is one):

    - metrics ``normscope.findings.{error,warning,info}``, ``normscope.finding.<kind>`` (count per finding
      kind), ``normscope.<summary>`` for the finite numbers of the result's summary (layers, foldable, nonfinite,
      eps_rows, worst_sqnr_db, int8_sqnr_db, int8_cosine, export_max_abs_diff, norm_time_share) and
      ``normscope.duration_s``;
    - tags ``normscope.audit`` (:func:`audit_status`), ``normscope.fingerprint``, ``normscope.version``,
      ``normscope.model``;
    - artifacts ``normscope/audit.json`` (the result), ``normscope/report.html`` (unless ``report=False``),
      ``normscope/norm_config.json`` and ``normscope/baseline.npz``.

    Args:
        result: the audit result (:func:`normscope.audit.run_audit`).
        model: the audited model, as audited (after its dtype conversion): its normalization config and
            fingerprint are computed from it (:func:`normscope.serving.config.norm_config`). Required.
        example_inputs: the audit's inputs: the config then includes the input dtypes and placements, and
            the baseline is built from the model's outputs on them when ``baseline`` is None.
        baseline: the output baseline to log (a :class:`normscope.drift.Baseline` or the path of a saved one).
            Default: from the model's outputs on ``example_inputs`` (rows: the batch items; outputs with more
            than two dimensions are averaged over the middle ones), none without inputs. A baseline of a few
            examples only catches gross drift: build one from a few thousand outputs for production.
        tracking_uri, registry_uri: MLflow URIs (e.g. ``sqlite:///mlflow.db``); default: MLflow's own
            (``MLFLOW_TRACKING_URI``); the registry defaults to the tracking URI.
        experiment: experiment name of a new run (created when missing). Default: MLflow's default experiment.
        run_id: log into this existing run instead of a new one.
        register: create a new version of this registered model (created when missing) from the run, tagged
            ``normscope.audit`` and ``normscope.fingerprint``; its drift baseline carries the version number.
        model_uri: the source of the registered version. Default: the run's ``normscope`` artifact directory.
        report: also render and log the HTML report.

    Returns:
        a :class:`LoggedAudit`.
    """
    import torch

    import normscope
    from normscope.serving.config import config_fingerprint, norm_config

    status = audit_status(result)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected model to be the audited torch.nn.Module (its normalization config is logged), "
                        f"but got {type(model).__name__}")
    if register is not None and (not isinstance(register, str) or not register):
        raise ValueError(f"Expected register to be a non-empty registered model name, but got {register!r}")
    config = norm_config(model, example_inputs)
    fp = config_fingerprint(config)
    client = _client(tracking_uri, registry_uri)
    created = False
    if run_id is None:
        active = mlflow.active_run()
        if active is not None and experiment is None and tracking_uri is None:
            run_id = active.info.run_id
        else:
            exp_id = "0"
            if experiment is not None:
                found = client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, run_name=f"normscope-audit-{result['model']['name']}").info.run_id
            created = True
    now = int(time.time() * 1000)
    metrics = _metrics_of(result)
    tags = {f"{_TAG}audit": status, f"{_TAG}fingerprint": fp, f"{_TAG}version": normscope.__version__,
            f"{_TAG}model": str(result["model"]["name"])}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])

    version = None
    if register is not None:
        try:
            client.get_registered_model(register)
        except MlflowException:
            client.create_registered_model(register)
        run = client.get_run(run_id)
        source = model_uri or f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
        version = str(client.create_model_version(register, source, run_id=run_id).version)

    if baseline is None and example_inputs is not None:
        baseline = _output_baseline(model, example_inputs, version or run_id)
    with tempfile.TemporaryDirectory(prefix="normscope-mlflow-") as tmp:
        d = os.path.join(tmp, ARTIFACT_DIR)
        os.makedirs(d)
        from normscope.cli.audit import write_json

        write_json(result, os.path.join(d, "audit.json"))
        with open(os.path.join(d, "norm_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config, fingerprint=fp), f, indent=1, sort_keys=True)
        if report:
            from normscope.report import write_html

            write_html(result, os.path.join(d, "report.html"))
        if baseline is not None:
            from normscope.drift import Baseline

            if isinstance(baseline, (str, os.PathLike)):
                baseline = Baseline.load(baseline)
            if not isinstance(baseline, Baseline):
                raise TypeError(f"Expected baseline to be a normscope.drift.Baseline or a path, but got "
                                f"{type(baseline).__name__}")
            baseline.save(os.path.join(d, "baseline.npz"))
        client.log_artifacts(run_id, d, ARTIFACT_DIR)

    if version is not None:
        for k, v in tags.items():
            client.set_model_version_tag(register, version, k, v)
    if created:
        client.set_terminated(run_id)
    return LoggedAudit(run_id=run_id, status=status, fingerprint=fp,
                       artifact_uri=client.get_run(run_id).info.artifact_uri, model_name=register,
                       model_version=version)


def load_registered(name: str, version: Any, *, tracking_uri: Optional[str] = None,
                    registry_uri: Optional[str] = None) -> RegisteredAudit:
    """The audit of registered model ``name`` version ``version``: its verdict, config, fingerprint and baseline.

    Raises:
        ValueError: the version was not logged by :func:`log_audit` (no ``normscope.fingerprint`` tag or no
            ``normscope/norm_config.json`` artifact), or its config does not hash to its fingerprint.
    """
    from normscope.serving.config import config_fingerprint

    client = _client(tracking_uri, registry_uri)
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    fp = tags.get(f"{_TAG}fingerprint")
    if fp is None or mv.run_id is None:
        raise ValueError(f"Expected model {name!r} version {version} to be registered by "
                         f"normscope.integrations.mlflow.log_audit (a {_TAG}fingerprint tag and a run), but got tags "
                         f"{sorted(tags)}")
    with tempfile.TemporaryDirectory(prefix="normscope-mlflow-") as tmp:
        local = client.download_artifacts(mv.run_id, ARTIFACT_DIR, tmp)
        cfg_path = os.path.join(local, "norm_config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"Expected the run {mv.run_id} of model {name!r} version {version} to hold "
                             f"{ARTIFACT_DIR}/norm_config.json, but it does not")
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
        logged_fp = config.pop("fingerprint", None)
        if config_fingerprint(config) != fp or logged_fp not in (None, fp):
            raise ValueError(f"Expected the logged normalization config of model {name!r} version {version} to "
                             f"hash to its tag {fp}, but it hashes to {config_fingerprint(config)}")
        baseline = None
        base_path = os.path.join(local, "baseline.npz")
        if os.path.isfile(base_path):
            from normscope.drift import Baseline

            baseline = Baseline.load(base_path)
    return RegisteredAudit(name=name, version=str(mv.version), run_id=mv.run_id,
                           status=tags.get(f"{_TAG}audit", ""), fingerprint=fp, config=config, baseline=baseline)


def instrument_registered(module: Callable[..., Any], name: str, version: Any, *,
                          tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None,
                          config_inputs: Any = None, **kwargs: Any) -> "InstrumentedModel":
    """:func:`normscope.serving.instrument` ``module`` as registered model ``name`` version ``version``.

    The wrapper gets the version's baseline (unless ``baseline`` is in ``kwargs``) and its normalization config
    as ``expected_config``, so it exports ``normscope_build_info{fingerprint=...}`` and
    ``normscope_config_mismatch``. ``config_inputs`` (example inputs of the served model) is needed when the
    audit logged the config with its inputs (the CLI does). Other keyword arguments go to ``instrument``.

    Returns:
        the :class:`normscope.serving.InstrumentedModel` (its ``registered`` attribute: the
        :class:`RegisteredAudit`).
    """
    from normscope.serving import instrument

    reg = load_registered(name, version, tracking_uri=tracking_uri, registry_uri=registry_uri)
    kwargs.setdefault("baseline", reg.baseline)
    wrapped = instrument(module, model=name, model_version=reg.version, expected_config=reg.config,
                         config_inputs=config_inputs, **kwargs)
    wrapped.registered = reg
    return wrapped
