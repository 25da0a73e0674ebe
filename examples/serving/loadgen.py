"""Load generator for the example service: a bounded mix of good, drifted and bad requests over HTTP.

    python examples/serving/loadgen.py --url http://127.0.0.1:8000 -n 300 --bad 0.1 --drift 0.5

Good requests carry texts built from the built-in sentences (the distribution of the default baseline);
drifted ones carry random character strings, whose MiniLM embeddings move away from it (see
docs/drift.md); bad ones are each of the service's 4xx cases in turn. Prints one JSON summary line:
requests by expected kind, statuses, p50/p99 latency of the good requests and the throughput.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence, Tuple

SENTENCES = (
    "Layer normalization rescales each token's features to zero mean and unit variance.",
    "The cat sat on the mat.",
    "How much latency does an unfused normalization add to inference?",
    "Please reset my password; the link in the e-mail has expired.",
    "It rained all day in Lisbon, so we stayed in and read.",
    "Stock prices fell sharply after the announcement on Tuesday.",
    "The recipe needs two eggs, 200 g of flour and a pinch of salt.",
    "Padding tokens must never change the output at the real tokens.",
)

#: Bad requests: (body, counted) where counted says whether the JSON parsed, so that the service's
#: instrumented model saw it (a bad_input failure); invalid JSON is rejected before it.
BAD_BODIES: Tuple[Tuple[bytes, bool], ...] = (
    (b'{"texts": []}', True),
    (b'{"texts": ["ok", 3]}', True),
    (b'{"text": ["missing the texts field"]}', True),
    (json.dumps({"texts": ["x" * 5000]}).encode(), True),
    (json.dumps({"texts": ["a"] * 100}).encode(), True),
    (b'{"texts": "not a list"}', True),
    (b'["texts"]', True),
    (b'{"texts": ["   "]}', True),
    (b"{not json", False),
)


def random_text(rng: random.Random, n: int = 40) -> str:
    """A string of random letters, digits and punctuation (drifts MiniLM's embeddings)."""
    return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ") for _ in range(n))


def make_requests(n: int, *, texts_per_request: int = 1, bad: float = 0.0, drift: float = 0.0,
                  seed: int = 0) -> List[Tuple[str, bytes, bool]]:
    """``n`` requests ``(kind, body, counted)`` with kind ``good`` / ``drift`` / ``bad``, shuffled.

    ``bad`` and ``drift`` are fractions of ``n`` (rounded down); bad requests cycle through
    :data:`BAD_BODIES`. ``counted``: the service's instrumented model sees the request.
    """
    rng = random.Random(seed)
    n_bad, n_drift = int(n * bad), int(n * drift)
    out = []
    for i in range(n_bad):
        body, counted = BAD_BODIES[i % len(BAD_BODIES)]
        out.append(("bad", body, counted))
    for _ in range(n_drift):
        out.append(("drift", json.dumps({"texts": [random_text(rng) for _ in range(texts_per_request)]}).encode(),
                    True))
    for _ in range(n - n_bad - n_drift):
        texts = [rng.choice(SENTENCES) + " " + rng.choice(SENTENCES) for _ in range(texts_per_request)]
        out.append(("good", json.dumps({"texts": texts}).encode(), True))
    rng.shuffle(out)
    return out


def post(url: str, body: bytes, timeout: float = 30.0) -> Tuple[int, bytes]:
    """POST ``body`` as JSON; ``(status, response body)`` (an HTTP error status is returned, not raised)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run(url: str, requests: Sequence[Tuple[str, bytes, bool]], *, concurrency: int = 1
        ) -> List[Tuple[str, int, float]]:
    """Send ``requests`` to ``url + "/predict"`` from ``concurrency`` threads; ``(kind, status, seconds)`` each.

    A request that gets no HTTP answer (connection refused, reset, timeout) has status 0.
    """
    results: List[Optional[Tuple[str, int, float]]] = [None] * len(requests)
    nxt = iter(range(len(requests)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            kind, body, _ = requests[i]
            t0 = time.perf_counter()
            try:
                status, _ = post(url + "/predict", body)
            except Exception:
                status = 0
            results[i] = (kind, status, time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(round(q / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def summarize(results: Sequence[Tuple[str, int, float]], wall: float) -> dict:
    """Counts by kind and status, p50/p99 latency of the non-bad requests (ms), requests per second."""
    lat = [s for k, st, s in results if k != "bad" and st == 200]
    by: dict = {}
    for k, st, _ in results:
        by.setdefault(k, {}).setdefault(str(st), 0)
        by[k][str(st)] += 1
    return {"requests": len(results), "by_kind_status": by, "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "rps": len(results) / wall if wall > 0 else float("nan"),
            "lost": sum(1 for _, st, _ in results if st == 0),
            "bad_not_4xx": sum(1 for k, st, _ in results if k == "bad" and not 400 <= st < 500)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("-n", type=int, default=300, help="requests. Default: 300")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--bad", type=float, default=0.1, help="fraction of bad requests. Default: 0.1")
    p.add_argument("--drift", type=float, default=0.0, help="fraction of drifted requests. Default: 0")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    reqs = make_requests(a.n, texts_per_request=a.texts_per_request, bad=a.bad, drift=a.drift, seed=a.seed)
    t0 = time.perf_counter()
    res = run(a.url, reqs, concurrency=a.concurrency)
    print(json.dumps(summarize(res, time.perf_counter() - t0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
