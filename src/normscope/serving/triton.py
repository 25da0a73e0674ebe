"""Serve an instrumented model on NVIDIA Triton Inference Server (through PyTriton), normscope's metrics next to
Triton's own.

:class:`TritonService` binds an :class:`~normscope.serving.InstrumentedModel` (or a plain callable) as a Triton
model: every Triton request runs through the wrapper inside PyTriton's infer function, so latency, failures by
reason, prediction drift, layer parameter drift and the sampled monitor are recorded as with any other server.
Triton serves its own metrics (``nv_inference_*``, labels ``model`` and ``version``) on its metrics port;
the service exposes normscope's registry on a port of its own, with ``model_version`` equal to Triton's
``version``, so the recording rules in ``deploy/prometheus`` join the two by model and version.
:func:`minilm_service` builds the default service (all-MiniLM-L6-v2: UTF-8 texts in, 384-float embeddings out);
``python -m normscope.serving.triton`` runs it. See docs/serving-triton.md.

PyTriton ships the ``tritonserver`` binary and its Python backend. The backend's stub process must load the
running interpreter's ``libpython``; with a Python that is not the system one (pyenv, conda, a virtual
environment on a custom build) it otherwise loads the system one and fails to initialise the model
(``'_thread.RLock' object has no attribute '_recursion_count'``). :func:`prepare_backend_environment`, called
by :meth:`TritonService.start`, puts the interpreter's library directory first on ``LD_LIBRARY_PATH``.

``nvidia-pytriton`` is imported by :meth:`TritonService.start` only. It needs ``numpy<2``, so install it in an
environment of its own: ``pip install 'normscope[triton-server]'`` (the repository's
``bash scripts/extra-venv.sh triton triton-server,demo,hf`` builds ``.venv-triton``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

__all__ = [
    "TRITON_HINT",
    "TensorSpec",
    "TritonService",
    "minilm_service",
    "decode_texts",
    "infer_texts",
    "backend_library_dir",
    "prepare_backend_environment",
    "main",
]

TRITON_HINT = "pip install 'normscope[triton-server]'"

#: Longest text (characters) :func:`minilm_service` accepts.
MAX_CHARS = 2000


def _pytriton():
    try:
        import pytriton.model_config as model_config
        import pytriton.triton as triton
    except ImportError as e:
        raise ImportError(f"normscope.serving.triton needs nvidia-pytriton (Triton Inference Server): {TRITON_HINT} "
                          "(it needs numpy<2: use an environment of its own)") from e
    return triton, model_config


def backend_library_dir() -> Optional[str]:
    """The directory holding the running interpreter's shared ``libpython``, or None for a static build."""
    libdir = sysconfig.get_config_var("LIBDIR")
    lib = sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not lib or not str(lib).endswith(".so") and ".so." not in str(lib):
        return None
    return libdir if os.path.exists(os.path.join(libdir, lib)) else None


def prepare_backend_environment(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Put :func:`backend_library_dir` first on ``LD_LIBRARY_PATH`` of ``environ`` (default: ``os.environ``, which
    the ``tritonserver`` process and its backend stubs inherit).

    Returns:
        the directory added, or None when nothing changed (no shared libpython, or already first).
    """
    env = os.environ if environ is None else environ
    libdir = backend_library_dir()
    if libdir is None:
        return None
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if parts and os.path.realpath(parts[0]) == os.path.realpath(libdir):
        return None
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in parts
                                                         if os.path.realpath(p) != os.path.realpath(libdir)])
    return libdir


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the Triton model.

    Attributes:
        name: the tensor's name in Triton requests and responses.
        dtype: a numpy dtype (``numpy.float32``, ``numpy.int64``, ...) or ``bytes`` (Triton ``BYTES``: strings).
        shape: the shape of one item, without the batch dimension; -1 for a dimension of any size.
    """

    name: str
    dtype: Any
    shape: Tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Expected the tensor name to be a non-empty str, but got {self.name!r}")
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape):
            raise ValueError(f"Expected the shape of {self.name!r} to hold positive ints or -1, but got {self.shape!r}")
        object.__setattr__(self, "shape", shape)


def _check_port(name: str, port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"Expected {name} to be an int in [0, 65535], but got {port!r}")
    return port


class TritonService:
    """One model served by Triton Inference Server, with normscope's telemetry inside its infer function.

    Each Triton request becomes one call ``predict(request)`` of the wrapped callable, where ``request`` is a
    dict ``{input name: numpy array}`` (batch dimension first), and its result goes through ``postprocess``
    into the response ``{output name: numpy array}``. A call that raises fails its Triton request (Triton
    counts it in ``nv_inference_request_failure{reason="BACKEND"}``; the wrapper counts it by its own reason).

    Args:
        predict: an :class:`~normscope.serving.InstrumentedModel` (its ``model`` and ``model_version`` name the
            Triton model and version) or any callable (then ``model_name`` and ``model_version`` are required and
            no normscope metrics are served: the uninstrumented baseline of a benchmark).
        inputs: the model's inputs (:class:`TensorSpec`).
        outputs: the model's outputs (:class:`TensorSpec`).
        postprocess: ``postprocess(result) -> {output name: array}``. Default: a single output gets the result
            (a tensor is moved to the CPU and converted with ``.numpy()``).
        model_name, model_version: the Triton model name and version (a positive integer, as Triton requires);
            default: those of ``predict``.
        max_batch_size: largest batch (first dimension) of one request. Default: 64.
        dynamic_batching: let Triton queue requests and hand several to one infer call (they still run one by
            one through ``predict``; when one of them fails, PyTriton fails all of that call's requests).
            Default: False.
        host: address Triton's HTTP, gRPC and metrics endpoints and normscope's metrics endpoint bind.
            Default: ``"127.0.0.1"``.
        http_port, grpc_port, triton_metrics_port: Triton's ports. Defaults: 8000, 8001, 8002.
        metrics_port: normscope's ``/metrics`` (0: a free port). Default: 8003.
        workspace: directory for PyTriton's model store and sockets. Default: a temporary one.
        log_file: where ``tritonserver`` writes its log (PyTriton would otherwise copy it to stdout). Default:
            ``tritonserver.log`` in a temporary directory, in :attr:`log_file` once started.
        log_verbose: Triton's verbosity. Default: 0.
    """

    def __init__(self, predict: Callable[[Dict[str, Any]], Any], *, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], postprocess: Optional[Callable[[Any], Mapping[str, Any]]] = None,
                 model_name: Optional[str] = None, model_version: Optional[Any] = None, max_batch_size: int = 64,
                 dynamic_batching: bool = False, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, triton_metrics_port: int = 8002, metrics_port: int = 8003,
                 workspace: Optional[str] = None, log_file: Optional[str] = None, log_verbose: int = 0):
        from .wrapper import InstrumentedModel

        if not callable(predict):
            raise TypeError(f"Expected predict to be callable, but got {type(predict).__name__}")
        self.predict = predict
        self.instrumented = predict if isinstance(predict, InstrumentedModel) else None
        name = model_name if model_name is not None else getattr(self.instrumented, "model", None)
        version = model_version if model_version is not None else getattr(self.instrumented, "model_version", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"Expected model_name to be a non-empty str (or predict to be an InstrumentedModel), "
                             f"but got {name!r}")
        try:
            version_int = int(str(version))
        except ValueError:
            version_int = 0
        if version is None or isinstance(version, bool) or version_int < 1 or str(version_int) != str(version):
            raise ValueError(f"Expected model_version to be a positive integer (Triton versions are), but got "
                             f"{version!r}")
        if self.instrumented is not None and (self.instrumented.model, self.instrumented.model_version) != (
                name, str(version)):
            raise ValueError(f"Expected model_name and model_version to equal the wrapper's labels "
                             f"({self.instrumented.model!r}, {self.instrumented.model_version!r}), but got "
                             f"({name!r}, {str(version)!r})")
        self.model_name, self.model_version = name, version_int
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not specs or not all(isinstance(s, TensorSpec) for s in specs):
                raise TypeError(f"Expected {kind} to be a non-empty sequence of TensorSpec, but got {specs!r}")
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"Expected distinct {kind} names, but got {names}")
        if postprocess is None and len(self.outputs) != 1:
            raise ValueError(f"Expected a postprocess function for {len(self.outputs)} outputs, but got None")
        self.postprocess = postprocess if postprocess is not None else self._single_output
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"Expected max_batch_size to be a positive int, but got {max_batch_size!r}")
        self.max_batch_size = max_batch_size
        self.dynamic_batching = bool(dynamic_batching)
        self.host = host
        self.http_port = _check_port("http_port", http_port)
        self.grpc_port = _check_port("grpc_port", grpc_port)
        self.triton_metrics_port = _check_port("triton_metrics_port", triton_metrics_port)
        self.metrics_port = _check_port("metrics_port", metrics_port)
        self.workspace = workspace
        self.log_file = log_file
        self.log_verbose = int(log_verbose)
        self._triton = None
        self._metrics_server = None
        self._lock = threading.Lock()

    # -- the infer function ---------------------------------------------------------------------------------------

    def _single_output(self, result: Any) -> Dict[str, Any]:
        return {self.outputs[0].name: _to_numpy(result)}

    def infer(self, requests: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """PyTriton's infer function: one ``predict`` call per request, in order.

        ``requests`` are PyTriton requests (or any mappings of input name to array). Returns one response dict per
        request. When a request fails, the others still run (so each is counted once), then the first error is
        raised, which fails this call's requests in Triton.
        """
        responses: List[Dict[str, Any]] = []
        error: Optional[BaseException] = None
        for request in requests:
            data = {name: request[name] for name in request}
            try:
                responses.append(dict(self.postprocess(self.predict(data))))
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other requests ran
                if error is None:
                    error = e
        if error is not None:
            raise error
        return responses

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """Triton's HTTP endpoint, ``http://host:port`` (KServe v2: ``/v2/models/NAME/infer``)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def triton_metrics_url(self) -> str:
        """Triton's own metrics (``nv_inference_*``)."""
        return f"http://{self.host}:{self.triton_metrics_port}/metrics"

    @property
    def metrics_url(self) -> Optional[str]:
        """normscope's metrics, once started (None without an instrumented model)."""
        return self._metrics_server.url if self._metrics_server is not None else None

    def start(self) -> "TritonService":
        """Start ``tritonserver`` with the model bound and ready, then normscope's metrics endpoint."""
        with self._lock:
            if self._triton is not None:
                raise RuntimeError("Expected a stopped TritonService, but start() was already called")
            triton_mod, mc = _pytriton()
            import numpy as np

            prepare_backend_environment()
            if self.log_file is None:
                import tempfile

                self.log_file = os.path.join(tempfile.mkdtemp(prefix="normscope-triton-"), "tritonserver.log")
            config = triton_mod.TritonConfig(
                log_file=self.log_file,
                http_address=self.host, http_port=self.http_port, grpc_address=self.host, grpc_port=self.grpc_port,
                metrics_address=self.host, metrics_port=self.triton_metrics_port, log_verbose=self.log_verbose,
                exit_on_error=True, allow_gpu_metrics=False)

            def spec(s: TensorSpec):
                dtype = np.bytes_ if s.dtype in (bytes, str, object) else np.dtype(s.dtype).type
                return mc.Tensor(name=s.name, dtype=dtype, shape=s.shape)

            model_config = mc.ModelConfig(max_batch_size=self.max_batch_size, batching=True,
                                          batcher=mc.DynamicBatcher() if self.dynamic_batching else None)
            triton = triton_mod.Triton(config=config, workspace=self.workspace)
            try:
                triton.bind(model_name=self.model_name, model_version=self.model_version, infer_func=self.infer,
                            inputs=[spec(s) for s in self.inputs], outputs=[spec(s) for s in self.outputs],
                            config=model_config, strict=True)
                triton.run()
            except BaseException:
                triton.stop()
                raise
            self._triton = triton
            if self.instrumented is not None:
                self._metrics_server = self.instrumented.start_http_server(self.metrics_port, addr=self.host)
        return self

    def is_alive(self) -> bool:
        """Whether ``tritonserver`` runs."""
        return self._triton is not None and self._triton.is_alive()

    def close(self) -> None:
        """Stop Triton (in-flight requests finish first), normscope's endpoint and the wrapper. Idempotent."""
        with self._lock:
            triton, self._triton = self._triton, None
            server, self._metrics_server = self._metrics_server, None
        if triton is not None:
            triton.stop()
        if server is not None:
            server.close()
        if self.instrumented is not None:
            self.instrumented.close()

    def __enter__(self) -> "TritonService":
        return self.start() if self._triton is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._triton is not None else "stopped"
        return f"TritonService({self.model_name!r}, version {self.model_version}, {self.http_url}, {state})"


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype not in (_torch().float32, _torch().float64, _torch().float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _torch():
    import torch

    return torch


# -- the default service: all-MiniLM-L6-v2 -----------------------------------------------------------------------

def decode_texts(text: Any) -> List[str]:
    """The texts of a Triton ``BYTES`` input of shape ``[batch, 1]`` (UTF-8), checked.

    Raises:
        ValueError / TypeError: a wrong shape, bytes that are not UTF-8, an empty text or one over
        :data:`MAX_CHARS` characters (the wrapper counts these as ``bad_input``).
    """
    shape = tuple(getattr(text, "shape", ()))
    if len(shape) != 2 or shape[1] != 1 or shape[0] < 1:
        raise ValueError(f"Expected 'text' of shape [batch, 1], but got {list(shape)}")
    out = []
    for i, item in enumerate(text[:, 0]):
        if isinstance(item, (bytes, bytearray)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"Expected text[{i}] to be UTF-8, but got undecodable bytes ({e.reason})") from None
        if not isinstance(item, str):
            raise TypeError(f"Expected text[{i}] to be bytes or str, but got {type(item).__name__}")
        if not item.strip():
            raise ValueError(f"Expected text[{i}] to be a non-empty string, but got {item!r}")
        if len(item) > MAX_CHARS:
            raise ValueError(f"Expected texts of at most {MAX_CHARS} characters, but text[{i}] has {len(item)}")
        out.append(item)
    return out


MINILM_INPUTS = (TensorSpec("text", bytes, (1,)),)
MINILM_OUTPUTS = (TensorSpec("embedding", "float32", (384,)),)


def minilm_service(*, model_name: str = "minilm", model_version: str = "1", telemetry: bool = True,
                   baseline: Any = None, reference: Any = None, monitor_every: int = 100, drift_window: int = 1000,
                   drift_every: int = 1000, drift_interval: float = 30.0, max_length: int = 128,
                   **service_kwargs) -> TritonService:
    """all-MiniLM-L6-v2 (``normscope[demo]``) on Triton: input ``text`` (``BYTES``, ``[batch, 1]``, UTF-8), output
    ``embedding`` (``FP32``, ``[batch, 384]``), with normscope's telemetry unless ``telemetry=False``.

    Args:
        baseline: a :class:`normscope.drift.Baseline`, the path of a saved one, ``"builtin"`` (embed the built-in
            sentences and their pairs at start: 256 texts) or None (no drift metrics).
        reference: reference parameters for ``normscope_layer_param_drift``; default: the checkpoint as loaded.
        monitor_every, drift_window, drift_every, drift_interval: passed to
            :func:`normscope.serving.instrument`.
        service_kwargs: passed to :class:`TritonService` (ports, host, ``max_batch_size``, ...).
    """
    torch = _torch()
    from normscope.demo import load_default_model, tokenize

    module, _, tokenizer = load_default_model()

    def preprocess(request: Dict[str, Any]) -> Dict[str, Any]:
        if set(request) != {"text"}:
            raise ValueError(f"Expected the input 'text' only, but got {sorted(request)}")
        return tokenize(tokenizer, decode_texts(request["text"]), max_length=max_length)

    if isinstance(baseline, str) and baseline == "builtin":
        baseline = _builtin_baseline(module, tokenizer, model_version, max_length)
    if telemetry:
        from .wrapper import instrument

        ref = reference if reference is not None else {k: v.clone() for k, v in module.state_dict().items()}
        predict: Callable = instrument(module, model=model_name, model_version=str(model_version),
                                       preprocess=preprocess, batch_size_fn=_text_rows, baseline=baseline,
                                       reference=ref, monitor_every=monitor_every, drift_window=drift_window,
                                       drift_every=drift_every, drift_interval=drift_interval)
    else:
        from .wrapper import BadInputError

        def predict(request: Dict[str, Any]):
            try:
                kwargs = preprocess(request)
            except (ValueError, TypeError) as e:
                raise BadInputError(str(e)) from e
            with torch.inference_mode():
                return module(**kwargs)

    return TritonService(predict, inputs=MINILM_INPUTS, outputs=MINILM_OUTPUTS, model_name=model_name,
                         model_version=model_version, **service_kwargs)


def infer_texts(http_url: str, texts: Sequence[str], *, model_name: str = "minilm",
                model_version: Optional[Any] = None, input_name: str = "text",
                timeout: float = 30.0) -> Tuple[int, Dict[str, Any]]:
    """Send ``texts`` to a Triton model over HTTP (KServe v2 JSON, standard library only), as one request.

    Args:
        http_url: Triton's HTTP endpoint, e.g. ``"http://127.0.0.1:8000"`` (:attr:`TritonService.http_url`).
        texts: the texts (str), sent as a ``BYTES`` tensor ``[len(texts), 1]``.
        model_version: a version to address; default: Triton's choice (the latest).
        input_name: the input's name (a wrong one shows how Triton rejects a request). Default: ``"text"``.

    Returns:
        ``(HTTP status, JSON body)``: 200 and ``{"outputs": [...]}``, or an error status and ``{"error": "..."}``
        (a failure in the model's infer function is a 500 from Triton).
    """
    import urllib.error
    import urllib.request

    data = list(texts)
    bad = [type(t).__name__ for t in data if not isinstance(t, str)]
    if bad:
        raise TypeError(f"Expected texts to be strings, but got {bad[0]}")
    body = json.dumps({"inputs": [{"name": input_name, "shape": [len(data), 1], "datatype": "BYTES",
                                   "data": data}]}).encode()
    path = f"/v2/models/{model_name}" + (f"/versions/{model_version}" if model_version is not None else "") + "/infer"
    req = urllib.request.Request(http_url.rstrip("/") + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode("utf-8", "replace")}


def _text_rows(request: Any) -> Optional[int]:
    text = request.get("text") if isinstance(request, Mapping) else None
    shape = getattr(text, "shape", None)
    return int(shape[0]) if shape else None


def _builtin_baseline(module, tokenizer, model_version: str, max_length: int):
    torch = _torch()
    from normscope.demo import SENTENCES, tokenize
    from normscope.drift import Baseline

    s = list(SENTENCES)
    texts = s + [a + " " + b for a in s for b in s if a is not b]
    with torch.inference_mode():
        emb = torch.cat([module(**tokenize(tokenizer, texts[i:i + 32], max_length=max_length))
                         for i in range(0, len(texts), 32)])
    return Baseline.from_outputs(emb, model_version=str(model_version))


# -- command line -------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m normscope.serving.triton`` (also read by the deployment checks)."""
    p = argparse.ArgumentParser(prog="python -m normscope.serving.triton",
                                description="Serve all-MiniLM-L6-v2 on Triton Inference Server with normscope's "
                                "telemetry (normscope's /metrics next to Triton's).")
    p.add_argument("--model-name", default="minilm")
    p.add_argument("--model-version", default="1", help="Triton model version (a positive integer). Default: 1")
    p.add_argument("--host", default="127.0.0.1", help="address every endpoint binds. Default: 127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--triton-metrics-port", type=int, default=8002, help="Triton's own /metrics. Default: 8002")
    p.add_argument("--metrics-port", type=int, default=8003, help="normscope's /metrics. Default: 8003")
    p.add_argument("--baseline", help="normscope.drift baseline of this version (.npz/.json), or 'builtin' to "
                   "embed the built-in sentences at start")
    p.add_argument("--reference", help="torch.save'd state dict of the version's reference parameters")
    p.add_argument("--no-telemetry", action="store_true", help="serve without normscope (a benchmark's baseline)")
    p.add_argument("--monitor-every", type=int, default=100, help="monitor one request in N (0: off). Default: 100")
    p.add_argument("--drift-window", type=int, default=1000)
    p.add_argument("--drift-every", type=int, default=1000)
    p.add_argument("--drift-interval", type=float, default=30.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--dynamic-batching", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--log-verbose", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m normscope.serving.triton``: serve all-MiniLM-L6-v2 on Triton with normscope's telemetry.

    Prints one JSON line ``{"event": "ready", ...}`` with the endpoints when the model is ready, serves until
    SIGINT or SIGTERM, then stops Triton (in-flight requests finish) and prints ``{"event": "stopped"}``.
    """
    a = _parser().parse_args(argv)
    torch = _torch()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        service = minilm_service(
            model_name=a.model_name, model_version=a.model_version, telemetry=not a.no_telemetry,
            baseline=a.baseline, reference=a.reference, monitor_every=a.monitor_every, drift_window=a.drift_window,
            drift_every=a.drift_every, drift_interval=a.drift_interval, host=a.host, http_port=a.http_port,
            grpc_port=a.grpc_port, triton_metrics_port=a.triton_metrics_port, metrics_port=a.metrics_port,
            max_batch_size=a.max_batch_size, dynamic_batching=a.dynamic_batching, log_verbose=a.log_verbose)
    except (ValueError, TypeError, ImportError, OSError) as e:
        print(f"normscope.serving.triton: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
        print(json.dumps({"event": "ready", "model": service.model_name, "model_version": str(service.model_version),
                          "http": service.http_url, "grpc": f"{a.host}:{service.grpc_port}",
                          "triton_metrics": service.triton_metrics_url, "metrics": service.metrics_url,
                          "pid": os.getpid()}), flush=True)
        while not stop.wait(1.0):
            if not service.is_alive():
                print("normscope.serving.triton: error: tritonserver exited", file=sys.stderr, flush=True)
                return 1
    finally:
        service.close()
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
