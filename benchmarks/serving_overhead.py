"""Overhead of normscope.serving on the example MiniLM service: telemetry on vs off, side by side.

    python benchmarks/serving_overhead.py                       # 2000 requests per side, 10 rounds
    python benchmarks/serving_overhead.py -n 400 --rounds 4     # a quick look
    python benchmarks/serving_overhead.py --out benchmarks/results/serving-overhead-<date>.md

Starts two copies of ``examples/serving/server.py`` on free loopback ports: one instrumented with the
defaults a deployment would use (drift against a baseline built at start from the built-in sentences,
window 1000, recomputed every 1000 predictions or 30 s in the background; the monitor on one request
in 100; ``normscope_layer_param_drift`` against the loaded checkpoint), one with ``--no-telemetry``.
This process is the client: it sends ``-n`` requests to each, one text per request, one at a time
(concurrency 1, so latency is service time), interleaved request by request (each request goes to both
sides, the side that goes first alternating) in ``--rounds`` rounds, so that the shared machine's noise
hits both sides alike. Throughput is requests per second of time spent waiting on that side. 5% of
the requests are bad (each of the service's 400 cases in turn); latency percentiles are over the good
ones. Reports p50, p99, throughput, the
overhead ``p50_on / p50_off - 1`` (pooled over all rounds, and the median of the per-round ratios),
lost requests (no HTTP answer) and bad requests not answered 4xx, and writes a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "serving"))

import loadgen  # noqa: E402


def start_server(extra, env):
    """Start the example server on a free port; ``(process, url)``."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serving" / "server.py"), "--port", "0",
                             "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for line in list(lines):
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the example server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the example server did not start within 300 s")


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000, help="requests per side. Default: 2000")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds. Default: 10")
    p.add_argument("--warmup", type=int, default=100, help="unmeasured requests per side first. Default: 100")
    p.add_argument("--bad", type=float, default=0.05, help="fraction of bad requests. Default: 0.05")
    p.add_argument("--out", help="markdown file to write")
    a = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    machine = machine_line()
    on = off = None
    try:
        on, url_on = start_server(["--baseline", "builtin"], env)
        off, url_off = start_server(["--no-telemetry"], env)
        urls = {"on": url_on, "off": url_off}
        for side in ("on", "off"):
            loadgen.run(urls[side], loadgen.make_requests(a.warmup, seed=99))
        per = a.n // a.rounds
        res = {"on": [], "off": []}
        busy = {"on": 0.0, "off": 0.0}
        round_ratio = []
        for r in range(a.rounds):
            reqs = loadgen.make_requests(per, bad=a.bad, seed=1000 + r)  # the same requests on both sides
            out = {"on": [], "off": []}
            for i, (kind, body, _) in enumerate(reqs):
                # request by request, alternating which side goes first: both see the same machine noise
                for side in (("on", "off") if (i + r) % 2 == 0 else ("off", "on")):
                    t0 = time.perf_counter()
                    try:
                        status, _ = loadgen.post(urls[side] + "/predict", body)
                    except Exception:
                        status = 0
                    dt = time.perf_counter() - t0
                    busy[side] += dt
                    out[side].append((kind, status, dt))
            p50 = {side: loadgen.percentile([s for k, st, s in out[side] if k != "bad" and st == 200], 50)
                   for side in out}
            for side in out:
                res[side].extend(out[side])
            round_ratio.append(p50["on"] / p50["off"] - 1)
            print(f"round {r + 1}/{a.rounds}: p50 on {p50['on'] * 1e3:.2f} ms, off {p50['off'] * 1e3:.2f} ms, "
                  f"overhead {round_ratio[-1]:+.1%}", flush=True)
        wall = busy
        s = {side: loadgen.summarize(res[side], wall[side]) for side in res}
        metrics_ok = b"normscope_inference_requests_total" in _get(url_on + "/metrics")
    finally:
        for proc in (on, off):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    overhead = s["on"]["p50_ms"] / s["off"]["p50_ms"] - 1
    result = {"overhead_p50": overhead, "overhead_p50_median_of_rounds": statistics.median(round_ratio),
              "overhead_p99": s["on"]["p99_ms"] / s["off"]["p99_ms"] - 1, "on": s["on"], "off": s["off"],
              "metrics_served": metrics_ok}
    print(json.dumps(result))
    if a.out:
        cmd = "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
        Path(a.out).write_text(_markdown(result, round_ratio, a, machine, cmd))
        print(f"wrote {a.out}")
    return 0


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _markdown(r, round_ratio, a, machine, cmd) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    rows = []
    for side, label in (("off", "telemetry off (`--no-telemetry`)"), ("on", "telemetry on (defaults)")):
        x = r[side]
        bad = x["by_kind_status"].get("bad", {})
        rows.append(f"| {label} | {x['requests']} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['rps']:.1f} | "
                    f"{x['lost']} | {sum(bad.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(bad.items()))}) "
                    f"| {x['bad_not_4xx']} |")
    return "\n".join([
        f"# Serving overhead: example MiniLM service, telemetry on vs off ({date})",
        "",
        f"Machine: {machine}.",
        "",
        f"Command: `{cmd}`",
        "",
        f"{a.n} requests per side from a separate client process over loopback, 1 text per request, one at a "
        f"time, interleaved request by request (each request sent to both sides, the first side alternating) in "
        f"{a.rounds} rounds, after {a.warmup} warm-up requests per side; req/s = requests / time spent on that "
        f"side; {a.bad:.0%} bad requests (each 400 case in turn). Latency: client-side wall time of the good "
        "requests (HTTP + JSON + tokenization + model). Both servers: `--threads 1`. Telemetry on: drift "
        "against a baseline built at start (window 1000, recomputed every 1000 predictions or 30 s in the "
        "background), monitor on 1 request in 100, layer parameter drift, process metrics.",
        "",
        "| side | requests | p50 ms | p99 ms | req/s | lost | bad requests (status: count) | bad not 4xx |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Overhead p50 (pooled): **{r['overhead_p50']:+.1%}**; median of the per-round p50 ratios: "
        f"{r['overhead_p50_median_of_rounds']:+.1%} (rounds: {', '.join(f'{x:+.1%}' for x in round_ratio)}); "
        f"p99: {r['overhead_p99']:+.1%}. Target: at most +5% at p50.",
        "",
        "Raw result (JSON): `" + json.dumps(r, sort_keys=True) + "`",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
