"""A small HTTP embedding service for all-MiniLM-L6-v2, instrumented with normscope.serving.

    python examples/serving/server.py                                   # http://127.0.0.1:8000
    python examples/serving/server.py --make-baseline minilm-1.npz      # build a drift baseline, exit
    python examples/serving/server.py --baseline minilm-1.npz --model-version 1
    python examples/serving/server.py --no-telemetry                    # the same service, uninstrumented
    python examples/serving/server.py --mlflow-uri sqlite:///mlflow.db --model-version 1   # registered version

Endpoints:

- ``POST /predict`` with ``{"texts": ["...", ...]}`` -> ``{"embeddings": [[...384 floats...], ...],
  "model_version": "1"}``
- ``GET /metrics``: Prometheus text format (404 with ``--no-telemetry``)
- ``GET /healthz``: ``{"status": "ok", "model": "minilm", "model_version": "1"}``

Bad requests get a 4xx status and a JSON body ``{"error": "..."}``: 400 for a body that is not JSON
or not an object with a non-empty list ``texts`` of non-empty strings (at most ``MAX_TEXTS`` texts of at
most ``MAX_CHARS`` characters each), 404 for an unknown path, 405 for a wrong method, 411 without
Content-Length, 413 for a body over ``MAX_BODY_BYTES``. Only the standard library and normscope.
Requests whose JSON parsed go through the instrumented model (so a rejected ``texts`` counts as a
``bad_input`` failure); bodies that are not JSON, and 404/405/411/413 never reach it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import torch

from normscope.demo import SENTENCES, load_default_model, tokenize

MODEL_NAME = "minilm"
MAX_TEXTS = 64
MAX_CHARS = 2000
MAX_BODY_BYTES = 1 << 20
#: Oversized bodies up to this size are read and dropped before the 413 answer.
DRAIN_LIMIT_BYTES = 16 << 20


def check_payload(payload: Any) -> None:
    """Raise ValueError/TypeError unless ``payload`` is ``{"texts": [non-empty str, ...]}`` within the limits."""
    if not isinstance(payload, dict):
        raise TypeError(f"Expected a JSON object with a 'texts' list, but got a JSON {type(payload).__name__}")
    if "texts" not in payload:
        raise ValueError("Expected a 'texts' field, but got none")
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise TypeError(f"Expected 'texts' to be a list of strings, but got {type(texts).__name__}")
    if not texts:
        raise ValueError("Expected at least one text, but got an empty list")
    if len(texts) > MAX_TEXTS:
        raise ValueError(f"Expected at most {MAX_TEXTS} texts per request, but got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"Expected texts[{i}] to be a string, but got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"Expected texts[{i}] to be a non-empty string, but got {t!r}")
        if len(t) > MAX_CHARS:
            raise ValueError(f"Expected texts of at most {MAX_CHARS} characters, but texts[{i}] has {len(t)}")


def baseline_texts() -> list:
    """Texts for the default baseline: the built-in sentences and every ordered pair of them (256 texts)."""
    s = list(SENTENCES)
    return s + [a + " " + b for a in s for b in s if a is not b]


class EmbeddingService:
    """The model, its tokenizer and the (instrumented or plain) predict function.

    Args:
        model_version: served model version (the ``model_version`` label).
        telemetry: wrap the model with :func:`normscope.serving.instrument`.
        baseline: path of a ``normscope.drift`` baseline (``.npz`` / ``.json``) for drift metrics, or
            ``"builtin"``: build one at start from :func:`baseline_texts`.
        reference: path of a ``torch.save``'d state dict of the version's reference parameters; default:
            the checkpoint as loaded (so ``normscope_layer_param_drift`` reads 0 until a transformed model
            is served).
        monitor_every, drift_window, drift_every, drift_interval: passed to ``instrument``.
        mlflow_uri: an MLflow tracking URI: serve registered model ``minilm`` version ``model_version`` as
            ``normscope audit --mlflow-uri URI --register minilm`` logged it: its drift baseline (unless
            ``baseline`` is given) and its normalization config, against which the wrapper exports
            ``normscope_config_mismatch``.
    """

    def __init__(self, *, model_version: str = "1", telemetry: bool = True, baseline: Optional[str] = None,
                 reference: Optional[str] = None, monitor_every: int = 100, drift_window: int = 1000,
                 drift_every: int = 1000, drift_interval: float = 30.0, max_length: int = 128,
                 mlflow_uri: Optional[str] = None):
        self.model_version = model_version
        self.module, _, self.tokenizer = load_default_model()
        self.max_length = max_length
        self.telemetry = telemetry
        self.wrapped = None
        if baseline == "builtin":
            baseline = self.builtin_baseline()
        expected_config = config_inputs = None
        self.registered = None
        if mlflow_uri is not None:
            from normscope.integrations.mlflow import load_registered

            self.registered = load_registered(MODEL_NAME, model_version, tracking_uri=mlflow_uri)
            baseline = baseline if baseline is not None else self.registered.baseline
            expected_config = self.registered.config
            if expected_config.get("with_inputs"):  # as the audit ran it: the built-in sentences
                config_inputs = tokenize(self.tokenizer, list(SENTENCES))
        if telemetry:
            import normscope.serving

            ref = reference if reference is not None else {k: v.clone() for k, v in self.module.state_dict().items()}
            self.wrapped = normscope.serving.instrument(
                self.module, model=MODEL_NAME, model_version=model_version, validate=check_payload,
                preprocess=self._preprocess, batch_size_fn=_batch_size, baseline=baseline, reference=ref,
                monitor_every=monitor_every, drift_window=drift_window, drift_every=drift_every,
                drift_interval=drift_interval, expected_config=expected_config, config_inputs=config_inputs)
            self.predict = self.wrapped
        else:
            self.predict = self._plain

    def _preprocess(self, payload: dict) -> dict:
        return tokenize(self.tokenizer, payload["texts"], max_length=self.max_length)

    def _plain(self, payload: Any) -> torch.Tensor:
        from normscope.serving import BadInputError

        try:
            check_payload(payload)
        except (ValueError, TypeError) as e:
            raise BadInputError(str(e)) from e
        with torch.inference_mode():
            return self.module(**self._preprocess(payload))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts`` without telemetry (for baselines)."""
        with torch.inference_mode():
            return self.module(**tokenize(self.tokenizer, list(texts), max_length=self.max_length))

    def builtin_baseline(self):
        """A ``normscope.drift.Baseline`` of this model version on :func:`baseline_texts` (256 embeddings)."""
        from normscope.drift import Baseline

        texts = baseline_texts()
        emb = torch.cat([self.embed(texts[i:i + 32]) for i in range(0, len(texts), 32)])
        return Baseline.from_outputs(emb, model_version=self.model_version)

    def close(self) -> None:
        """Stop the wrapper's drift thread and monitor."""
        if self.wrapped is not None:
            self.wrapped.close()


def _batch_size(payload: Any) -> Optional[int]:
    if isinstance(payload, dict) and isinstance(payload.get("texts"), list):
        return len(payload["texts"])
    return None


class Handler(BaseHTTPRequestHandler):
    """Routes of the service; the server's ``service`` attribute is an :class:`EmbeddingService`."""

    server_version = "normscope-example/1"
    protocol_version = "HTTP/1.1"
    routes = {"/predict": ("POST",), "/metrics": ("GET",), "/healthz": ("GET",)}

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if getattr(self.server, "access_log", False):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers=()) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, status: int, message: str, headers=()) -> None:
        self._json(status, {"error": message}, headers=headers)

    def _route(self, method: str) -> bool:
        path = self.path.split("?", 1)[0]
        allowed = self.routes.get(path)
        if allowed is None:
            self._error(HTTPStatus.NOT_FOUND, f"Expected one of the paths {sorted(self.routes)}, but got {path!r}")
            return False
        if method not in allowed:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"Expected {' or '.join(allowed)} for {path}, but got {method}",
                        headers=[("Allow", ", ".join(allowed))])
            return False
        return True

    def do_GET(self):  # noqa: N802 - http.server's naming
        if not self._route("GET"):
            return
        service: EmbeddingService = self.server.service
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._json(HTTPStatus.OK, {"status": "ok", "model": MODEL_NAME, "model_version": service.model_version})
        elif service.wrapped is None:
            self._error(HTTPStatus.NOT_FOUND, "Expected telemetry to be on for /metrics, but the service runs with "
                        "--no-telemetry")
        else:
            from normscope.serving import CONTENT_TYPE_LATEST

            self._send(HTTPStatus.OK, service.wrapped.metrics_text(), CONTENT_TYPE_LATEST)

    def do_POST(self):  # noqa: N802
        length = self.headers.get("Content-Length")
        if not self._route("POST"):
            self._drain(length)
            return
        if length is None:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Expected a Content-Length header, but got none")
            return
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"Expected a non-negative integer Content-Length, but got {length!r}")
            return
        if n > MAX_BODY_BYTES:
            # Read (and drop) a moderately oversized body first, so that the client, still sending, gets the
            # 413 instead of a broken pipe; beyond DRAIN_LIMIT_BYTES the connection is just closed.
            if n <= DRAIN_LIMIT_BYTES:
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"Expected a body of at most {MAX_BODY_BYTES} bytes, but got {n}")
            return
        body = self.rfile.read(n)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self._error(HTTPStatus.BAD_REQUEST, f"Expected a JSON body, but got invalid JSON ({e})")
            return
        self._predict(payload)

    def _predict(self, payload: Any) -> None:
        from normscope.serving import BadInputError, NonFiniteOutputError

        service: EmbeddingService = self.server.service
        try:
            emb = service.predict(payload)
        except BadInputError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except NonFiniteOutputError as e:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e))
            return
        except Exception as e:  # the model failed: never crash the server
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {type(e).__name__}")
            return
        self._json(HTTPStatus.OK, {"embeddings": emb.tolist(), "model_version": service.model_version})

    def _drain(self, length: Optional[str]) -> None:
        try:
            n = int(length or 0)
        except ValueError:
            n = 0
        if 0 < n <= MAX_BODY_BYTES:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _other(self):
        self._drain(self.headers.get("Content-Length"))
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

    def do_HEAD(self):  # noqa: N802
        self._route("HEAD")


def make_server(service: EmbeddingService, port: int = 8000, *, host: str = "127.0.0.1",
                access_log: bool = False) -> ThreadingHTTPServer:
    """A ``ThreadingHTTPServer`` for ``service`` bound to ``host:port`` (port 0: a free one, in ``server_port``)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.service = service
    server.access_log = access_log
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server.serve_forever()`` in a daemon thread (stop with ``server.shutdown()``)."""
    t = threading.Thread(target=server.serve_forever, name="example-server", daemon=True)
    t.start()
    return t


def make_baseline(path: str, *, model_version: str, texts_file: Optional[str] = None) -> None:
    """Embed the baseline texts (one per line of ``texts_file``, or :func:`baseline_texts`) and save a baseline."""
    from normscope.drift import Baseline

    if texts_file is not None:
        with open(texts_file, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        service = EmbeddingService(model_version=model_version, telemetry=False)
        emb = torch.cat([service.embed(texts[i:i + 32]) for i in range(0, len(texts), 32)])
        base = Baseline.from_outputs(emb, model_version=model_version)
    else:
        base = EmbeddingService(model_version=model_version, telemetry=False).builtin_baseline()
    base.save(path)
    print(f"wrote {path}: baseline of {base.n_reference} embeddings ({base.n_features} features), "
          f"model_version {model_version}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one). Default: 8000")
    p.add_argument("--host", default="127.0.0.1", help="address to bind. Default: 127.0.0.1")
    p.add_argument("--model-version", default="1", help="served model version. Default: 1")
    p.add_argument("--baseline", help="normscope.drift baseline (.npz/.json) of this model version, or 'builtin' "
                   "to build one at start from the built-in sentences")
    p.add_argument("--reference", help="torch.save'd state dict of the version's reference parameters")
    p.add_argument("--make-baseline", metavar="PATH", help="write a baseline to PATH and exit")
    p.add_argument("--texts", help="with --make-baseline: a text file, one text per line "
                   "(default: the built-in sentences and their pairs)")
    p.add_argument("--no-telemetry", action="store_true", help="serve without normscope.serving")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI: serve registered model 'minilm' version --model-version "
                   "with its drift baseline and audited normalization config (normscope audit --register minilm)")
    p.add_argument("--monitor-every", type=int, default=100, help="monitor one request in N (0: off). Default: 100")
    p.add_argument("--drift-window", type=int, default=1000)
    p.add_argument("--drift-every", type=int, default=1000)
    p.add_argument("--drift-interval", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per request (requests run in parallel threads; 0: torch's default). "
                   "Default: 1")
    p.add_argument("--access-log", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.make_baseline:
        make_baseline(a.make_baseline, model_version=a.model_version, texts_file=a.texts)
        return 0
    service = EmbeddingService(model_version=a.model_version, telemetry=not a.no_telemetry, baseline=a.baseline,
                               reference=a.reference, monitor_every=a.monitor_every, drift_window=a.drift_window,
                               drift_every=a.drift_every, drift_interval=a.drift_interval, mlflow_uri=a.mlflow_uri)
    server = make_server(service, a.port, host=a.host, access_log=a.access_log)
    print(f"serving {MODEL_NAME} {a.model_version} on http://{a.host}:{server.server_port} "
          f"(telemetry {'off' if a.no_telemetry else 'on'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
