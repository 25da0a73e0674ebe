"""Load and chaos on Triton Inference Server: all-MiniLM-L6-v2 served by ``python -m normscope.serving.triton`` with
and without normscope's telemetry, driven from this process; then the backend killed mid-traffic and restarted.

    .venv-triton/bin/python benchmarks/serving_load.py                 # load grid, then the fault run
    .venv-triton/bin/python benchmarks/serving_load.py -n 200 --no-chaos
    .venv-triton/bin/python benchmarks/serving_load.py --out benchmarks/results/serving-load-<date>.md

Needs ``.venv-triton`` (``bash scripts/extra-venv.sh triton triton-server,demo,hf``); the fault run also needs the
``prometheus`` binary (``scripts/install-system-deps.sh``).

**Load.** Two services on free ports, one instrumented with a deployment's defaults (drift against a baseline of
the built-in sentences, the monitor on one request in 100, layer parameter drift), one with ``--no-telemetry``.
For each batch size (texts per request) and concurrency (client threads) of the grid, ``-n`` requests go to each
side, interleaved in ``--rounds`` rounds (the side that goes first alternates), so the shared machine's noise hits
both alike. Reported per cell: p50/p95/p99 latency of the requests (ms), throughput (requests per second of the
side's wall time) and the p95 overhead ``p95_on / p95_off - 1`` (target: at most 5%), and requests lost (no answer
or not 200).

**Fault.** The instrumented service with a real Prometheus scraping Triton's and normscope's endpoints (the shipped
rules with durations shortened as in the tests). Traffic from 2 threads; after ``--chaos-before`` seconds the
``tritonserver`` process is killed (SIGKILL); the service notices, exits with code 1, and is restarted on the same
ports, as a supervisor would; traffic continues for ``--chaos-after`` seconds after it is ready. Checked and
reported: the client's failed requests during the outage, ``up`` and ``NormscopeServingTargetDown`` while down, the
counter reset (``resets()``), normscope's and Triton's counters after the restart against the requests the client
got answered, and what the last scrape before the kill had seen.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "serving"))

from loadgen import SENTENCES, percentile  # noqa: E402  (the example's load generator: standard library only)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``python -m normscope.serving.triton`` in a subprocess on fixed ports."""

    def __init__(self, telemetry: bool, ports: dict, log_dir: str, extra=()):
        self.telemetry, self.ports, self.log_dir, self.extra = telemetry, ports, log_dir, list(extra)
        self.proc = None
        self.ready = None

    def start(self, timeout: float = 300.0) -> "Service":
        args = [sys.executable, "-m", "normscope.serving.triton", "--threads", "1",
                "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
                "--triton-metrics-port", str(self.ports["triton_metrics"]),
                "--metrics-port", str(self.ports["metrics"])]
        args += (["--baseline", "builtin"] if self.telemetry else ["--no-telemetry"]) + self.extra
        err = open(os.path.join(self.log_dir, f"service-{'on' if self.telemetry else 'off'}.err"), "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: list = []
        threading.Thread(target=lambda: lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = [json.loads(s) for s in list(lines) if s.startswith('{"event": "ready"')]
            if found:
                self.ready = found[0]
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the Triton service did not start (exit code {self.proc.poll()}); see {self.log_dir}")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def tritonserver_pid(self):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if comm == "tritonserver" and int(rest[1]) == self.proc.pid:
                return int(d)
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_request(http: str, texts) -> tuple:
    from normscope.serving.triton import infer_texts

    t0 = time.perf_counter()
    try:
        status, _ = infer_texts(http, texts, timeout=60.0)
    except OSError:
        status = 0  # no answer: connection refused or reset
    return status, time.perf_counter() - t0


def drive(http: str, batches, concurrency: int):
    """Send ``batches`` from ``concurrency`` threads; ``(latencies of 200s, lost, wall seconds)``."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: one_request(http, b), batches))
    wall = time.perf_counter() - t0
    return [dt for st, dt in results if st == 200], sum(1 for st, _ in results if st != 200), wall


def load_grid(args, tmp) -> list:
    ports = {side: {k: free_port() for k in ("http", "grpc", "triton_metrics", "metrics")} for side in ("on", "off")}
    on, off = Service(True, ports["on"], tmp, args.on_args.split()), Service(False, ports["off"], tmp)
    rows = []
    try:
        on.start()
        off.start()
        rng = random.Random(0)
        for batch in args.batch_sizes:
            for conc in args.concurrency:
                lat = {"on": [], "off": []}
                lost = {"on": 0, "off": 0}
                wall = {"on": 0.0, "off": 0.0}
                per_round = max(1, args.n // args.rounds)
                drive(on.http, [[SENTENCES[0]] * batch] * 4, conc)  # warm-up of this shape
                drive(off.http, [[SENTENCES[0]] * batch] * 4, conc)
                for r in range(args.rounds):
                    batches = [[rng.choice(SENTENCES) + " " + rng.choice(SENTENCES) for _ in range(batch)]
                               for _ in range(per_round)]
                    order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
                    for name, svc in order:
                        ok, n_lost, w = drive(svc.http, batches, conc)
                        lat[name] += ok
                        lost[name] += n_lost
                        wall[name] += w
                row = {"batch": batch, "concurrency": conc, "requests": per_round * args.rounds}
                for side in ("off", "on"):
                    ms = [x * 1000 for x in lat[side]]
                    row[side] = {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
                                 "rps": len(lat[side]) / wall[side] if wall[side] else float("nan"),
                                 "lost": lost[side]}
                row["p95_overhead"] = row["on"]["p95"] / row["off"]["p95"] - 1
                row["p50_overhead"] = row["on"]["p50"] / row["off"]["p50"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        on.stop()
        off.stop()
    return rows


def _query(base: str, q: str):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def _value(base: str, q: str):
    try:
        res = _query(base, q)
    except OSError:
        return None
    return float(res[0]["value"][1]) if res else None


def _firing(base: str) -> set:
    try:
        with urllib.request.urlopen(base + "/api/v1/alerts", timeout=5) as r:
            alerts = json.loads(r.read())["data"]["alerts"]
    except OSError:
        return set()
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def fault_run(args, tmp) -> dict:
    import re

    prom_bin = shutil.which("prometheus")
    if prom_bin is None:
        raise SystemExit("the fault run needs the prometheus binary (sudo bash scripts/install-system-deps.sh), "
                         "or pass --no-chaos")
    ports = {k: free_port() for k in ("http", "grpc", "triton_metrics", "metrics")}
    svc = Service(True, ports, tmp).start()
    rules = (ROOT / "deploy" / "prometheus" / "normscope_rules.yml").read_text()
    rules = re.sub(r"\[\d+[mh]\]", "[1m]", re.sub(r"(\bfor:\s*)\d+[smh]", r"\g<1>2s", rules))
    Path(tmp, "rules.yml").write_text(rules)
    Path(tmp, "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n"
        f"  - job_name: triton\n    static_configs:\n      - targets: ['127.0.0.1:{ports['triton_metrics']}']\n"
        "  - job_name: normscope-serving\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{ports['metrics']}']\n")
    papi_port = free_port()
    prom = subprocess.Popen([prom_bin, f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                             f"--web.listen-address=127.0.0.1:{papi_port}"],
                            stdout=open(os.path.join(tmp, "prometheus.log"), "w"), stderr=subprocess.STDOUT)
    papi = f"http://127.0.0.1:{papi_port}"
    log: list = []  # (monotonic time the request was sent, answered, status)
    stop = threading.Event()

    def client():
        rng = random.Random(threading.get_ident())
        while not stop.is_set():
            sent = time.monotonic()
            status, _ = one_request(svc.http, [rng.choice(SENTENCES)])
            log.append((sent, time.monotonic(), status))
            if status != 200:
                time.sleep(0.05)

    out: dict = {}
    try:
        while _value(papi, 'up{job="normscope-serving"}') != 1.0:
            time.sleep(0.5)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(args.chaos_before)
        seen_before = _value(papi, "sum(normscope_inference_requests_total)")
        pid = svc.tritonserver_pid()
        if pid is None:
            raise RuntimeError("no tritonserver child process found")
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        code = svc.proc.wait(timeout=60)
        t_exit = time.monotonic()
        down_seen, up_zero = set(), False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "NormscopeServingTargetDown" not in down_seen:
            down_seen |= _firing(papi)
            up_zero = up_zero or _value(papi, 'up{job="normscope-serving"}') == 0.0
            time.sleep(0.5)
        t_restart = time.monotonic()
        svc.start()
        t_ready = time.monotonic()
        time.sleep(args.chaos_after)
        stop.set()
        for t in threads:
            t.join(timeout=70)
        time.sleep(3)  # two scrapes after the last request
        # A request sent after the kill can only be answered by the restarted process, whose counters start at 0.
        ok_after = sum(1 for sent, _, st in log if st == 200 and sent >= t_kill)
        ok_before = sum(1 for _, done, st in log if st == 200 and done < t_kill)
        in_flight = [st for sent, done, st in log if sent < t_kill <= done]
        failed_after = [sent for sent, _, st in log if st != 200 and sent >= t_kill]
        first_ok_after = min((done for sent, done, st in log if st == 200 and sent >= t_kill), default=float("nan"))
        out = {
            "exit_code_after_kill": code,
            "seconds_kill_to_exit": round(t_exit - t_kill, 2),
            "seconds_restart_to_ready": round(t_ready - t_restart, 2),
            "answered_before_kill": ok_before,
            "prometheus_saw_before_kill (last scrape)": seen_before,
            "in_flight_at_kill (statuses)": sorted(in_flight),
            "outage_seconds (kill to first answer)": round(first_ok_after - t_kill, 2),
            "client_requests_failed_after_kill (refused or 4xx/5xx)": len(failed_after),
            "failed_after_restart_ready": sum(1 for sent in failed_after if sent >= t_ready),
            "up_0_while_down": up_zero,
            "target_down_alert_fired": "NormscopeServingTargetDown" in down_seen,
            "answered_after_kill (all by the restarted service)": ok_after,
            "normscope_requests_after_restart": _value(papi, "sum(normscope_inference_requests_total)"),
            "triton_success_after_restart": _value(papi, "sum(nv_inference_request_success)"),
            "normscope_counter_resets": _value(papi, "sum(resets(normscope_inference_requests_total[10m]))"),
            "target_down_firing_at_end": "NormscopeServingTargetDown" in _firing(papi),
        }
        print(json.dumps(out), flush=True)
    finally:
        stop.set()
        svc.stop()
        prom.terminate()
        prom.wait(timeout=30)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=400, help="requests per side and grid cell. Default: 400")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--on-args", default="", help="more arguments of the instrumented service, e.g. "
                   "'--drift-every 5000' (default: the module's defaults)")
    p.add_argument("--no-chaos", action="store_true", help="skip the fault run")
    p.add_argument("--chaos-before", type=float, default=10.0)
    p.add_argument("--chaos-after", type=float, default=10.0)
    p.add_argument("--out", help="write a markdown report here")
    a = p.parse_args(argv)
    import torch

    tmp = tempfile.mkdtemp(prefix="normscope-serving-load-")
    try:
        rows = load_grid(a, tmp)
        fault = None if a.no_chaos else fault_run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        cpu = platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        lines = [f"# Triton serving load and fault run, {_dt.date.today()}", "",
                 f"Machine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
                 f"torch {torch.__version__}, load average at the end {os.getloadavg()[0]:.1f}.", "",
                 f"Command: `.venv-triton/bin/python benchmarks/serving_load.py {' '.join(argv or sys.argv[1:])}`", "",
                 "| texts/request | threads | requests per side | p50 off / on (ms) | p95 off / on (ms) | "
                 "p99 off / on (ms) | req/s off / on | p95 overhead | p50 overhead | lost off / on |",
                 "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            o, n = r["off"], r["on"]
            lines.append(f"| {r['batch']} | {r['concurrency']} | {r['requests']} | {o['p50']:.1f} / {n['p50']:.1f} | "
                         f"{o['p95']:.1f} / {n['p95']:.1f} | {o['p99']:.1f} / {n['p99']:.1f} | "
                         f"{o['rps']:.1f} / {n['rps']:.1f} | {r['p95_overhead']:+.1%} | {r['p50_overhead']:+.1%} | "
                         f"{o['lost']} / {n['lost']} |")
        if fault:
            lines += ["", "Fault run (tritonserver killed mid-traffic, service restarted on the same ports):", "",
                      "| check | value |", "|:--|--:|"] + [f"| {k} | {v} |" for k, v in fault.items()]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    overhead_ok = all(r["p95_overhead"] <= 0.05 for r in rows)
    lost = sum(r["on"]["lost"] + r["off"]["lost"] for r in rows)
    print(json.dumps({"p95_overhead_at_most_5pct": overhead_ok, "lost": lost}))
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
