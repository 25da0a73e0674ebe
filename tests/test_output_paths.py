"""Output paths: symbolic links, FIFOs, devices, ``-`` (standard output), a file-size limit and Ctrl-C.

Every place that writes a user-named file goes through :mod:`normscope._paths`: a regular file is written
atomically (an existing one untouched on failure), a symbolic link's target is written and the link
kept, FIFOs / devices / ``-`` are written directly. The CLI cases run ``python -m normscope`` (as root in
CI, where a rename would replace a device node).
"""

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from normscope import _paths
from normscope.cli import main

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = textwrap.dedent("""\
    import os, sys, time
    import torch

    class Net(torch.nn.Module):
        def __init__(self, slow=False):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(16, 32)
            self.ln = torch.nn.LayerNorm(32)
            self.slow = slow

        def forward(self, x):
            if self.slow and not isinstance(x, torch._subclasses.FakeTensor):
                print("ready", file=sys.stderr, flush=True)  # an eager call: the test sends SIGINT now
                time.sleep(60)
            return self.ln(self.fc(x))

    def _x():
        return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))

    def net():
        return Net(), (_x(),)

    def slow():
        return Net(slow=True), (_x(),)
""")

FAST = ["--skip", "export", "--skip", "quantization", "--skip", "profile", "--skip", "monitor", "--quiet"]


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "ns_paths_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ns_paths_factories", None)
    yield tmp_path
    sys.modules.pop("ns_paths_factories", None)


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "src")]))
    env.pop("NORMSCOPE_DEBUG", None)
    return env


def _leftovers(directory) -> list:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


class _FifoReader(threading.Thread):
    """Reads a FIFO to its end in a thread (opening it blocks until the writer opens it)."""

    def __init__(self, path, delay: float = 0.0):
        super().__init__(daemon=True)
        self.path, self.delay, self.data = path, delay, b""

    def run(self):
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(4096)
                if not chunk:
                    break
                self.data += chunk


# -- the writer ------------------------------------------------------------------------------------


def test_symlink_chain_writes_the_target_and_keeps_the_links(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "2026-12-02.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    (tmp_path / "middle.json").symlink_to("runs/2026-12-02.json")
    link = tmp_path / "latest.json"
    link.symlink_to("middle.json")
    _paths.write_output(link, "new")
    assert link.is_symlink() and (tmp_path / "middle.json").is_symlink()
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == [] and _leftovers(runs) == []


def test_dangling_symlink_creates_its_target_loops_and_missing_directories_fail(tmp_path):
    (tmp_path / "new.json").symlink_to("made/here.json")
    with pytest.raises(FileNotFoundError, match="made' does not exist"):
        _paths.write_output(tmp_path / "new.json", "x")
    (tmp_path / "made").mkdir()
    _paths.write_output(tmp_path / "new.json", "x")
    assert (tmp_path / "made" / "here.json").read_text() == "x" and (tmp_path / "new.json").is_symlink()
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError, match="symbolic link loop") as info:
        _paths.write_output(tmp_path / "a", "x")
    assert info.value.errno == 40
    assert "symbolic link loop" in _paths.check_output(tmp_path / "a")
    with pytest.raises(IsADirectoryError):
        _paths.write_output(tmp_path / "made", "x")


def test_new_file_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _paths.write_output(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640   # not mkstemp's 0600


def test_fifo_is_written_directly_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    payload = "x" * 300_000  # several pipe buffers: the writer streams while the reader reads
    reader = _FifoReader(fifo)
    reader.start()
    _paths.write_output(fifo, payload)
    reader.join(10)
    assert reader.data.decode() == payload and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # the append-mode JSONL sink through a symbolic link to the FIFO
    from normscope.monitor.sinks import JSONLSink

    (tmp_path / "link").symlink_to("pipe")
    reader = _FifoReader(fifo)
    reader.start()
    sink = JSONLSink(tmp_path / "link", append=True)
    sink.write([{"type": "finding", "message": "m"}])
    sink.close()
    reader.join(10)
    assert [json.loads(line) for line in reader.data.decode().splitlines()] == [{"type": "finding", "message": "m"}]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (tmp_path / "link").is_symlink()


def test_append_sink_through_a_symlink_appends_to_the_target(tmp_path):
    from normscope.monitor.sinks import JSONLSink, load

    (tmp_path / "run.jsonl").write_text('{"type": "run"}\n')
    (tmp_path / "latest.jsonl").symlink_to("run.jsonl")
    sink = JSONLSink(tmp_path / "latest.jsonl", append=True)
    sink.write([{"type": "finding", "message": "m"}])
    sink.close()
    assert (tmp_path / "latest.jsonl").is_symlink()
    assert [r["type"] for r in load(tmp_path / "run.jsonl")] == ["run", "finding"]


def test_character_device_is_written_directly_not_replaced(tmp_path):
    # a private copy of /dev/full (major 1, minor 7): root could otherwise rename a file over it
    dev = tmp_path / "full"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (CI runs as root)")
    with pytest.raises(OSError) as info:
        _paths.write_output(dev, "x" * 10_000)
    assert info.value.errno == 28  # "No space left on device", from the device itself
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and os.major(os.lstat(dev).st_rdev) == 1
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (tmp_path / "to-null").symlink_to("null")
    _paths.write_output(tmp_path / "to-null", b"\0" * 100)
    assert stat.S_ISCHR(os.lstat(null).st_mode) and _leftovers(tmp_path) == []


def test_failure_leaves_an_existing_file_untouched_and_no_temporary_file(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous")
    with pytest.raises(RuntimeError):
        with _paths.open_output(out) as f:
            f.write("half")
            raise RuntimeError("rendering failed")
    assert out.read_text() == "previous" and _leftovers(tmp_path) == []


def test_baseline_snapshot_and_csv_writers_follow_symlinks(tmp_path):
    from normscope.drift import Baseline

    rng = np.random.default_rng(0)
    base = Baseline.from_outputs(rng.normal(size=(200, 3)), model_version="v1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "base.npz").write_bytes(b"old")
    (tmp_path / "base.npz").symlink_to("b/base.npz")
    base.save(tmp_path / "base.npz")
    assert (tmp_path / "base.npz").is_symlink()
    assert Baseline.load(tmp_path / "b" / "base.npz").n_features == 3

    from normscope.monitor._monitor import SNAPSHOT_FORMAT, load_snapshot, save_snapshot

    (tmp_path / "snap.json").symlink_to("b/snap-target.json")
    save_snapshot({"format": SNAPSHOT_FORMAT, "layers": {}}, tmp_path / "snap.json")
    assert (tmp_path / "snap.json").is_symlink() and load_snapshot(tmp_path / "b" / "snap-target.json")
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "b") == []


def test_screenshot_through_a_symlink_writes_the_target(tmp_path):
    from normscope.report import screenshot

    html = tmp_path / "r.html"
    html.write_text("<!DOCTYPE html><p>x</p>")
    fake = tmp_path / "fake-chromium"  # a stand-in browser writing the file named by --screenshot=
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in "
                    "--screenshot=*) printf PNG > \"${a#--screenshot=}\";; esac; done\n")
    fake.chmod(0o755)
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "a.png").write_bytes(b"old")
    (tmp_path / "latest.png").symlink_to("shots/a.png")
    out = screenshot(html, tmp_path / "latest.png", chromium=str(fake))
    assert out == tmp_path / "shots" / "a.png" and out.read_bytes() == b"PNG"
    assert (tmp_path / "latest.png").is_symlink()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "shots") == []


# -- the command line --------------------------------------------------------------------------------


def test_audit_json_through_a_symlink_and_report_to_a_fifo(factories, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.json").write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to("runs/old.json")
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    reader = _FifoReader(fifo)
    reader.start()
    code = main(["audit", "ns_paths_factories:net", *FAST[:-1], "--json", str(link), "--report", str(fifo)])
    reader.join(10)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert link.is_symlink() and json.loads((tmp_path / "runs" / "old.json").read_text())["layers"][0]["name"] == "ln"
    assert reader.data.decode().lstrip().lower().startswith("<!doctype html") and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert f"wrote {link}" in out
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "runs") == []


def test_audit_to_a_device_node_keeps_the_node(factories, tmp_path, capsys):
    null = tmp_path / "null"  # a private /dev/null: `--report /dev/null` as root must not replace it
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (CI runs as root)")
    code = main(["audit", "ns_paths_factories:net", *FAST, "--json", str(null), "--report", str(null)])
    assert code == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.lstat(null).st_mode) and _leftovers(tmp_path) == []


def test_bench_csv_to_stdout_and_markdown_through_a_symlink(tmp_path, capsys):
    (tmp_path / "md").mkdir()
    (tmp_path / "bench.md").symlink_to("md/run.md")
    code = main(["bench", "--device", "cpu", "--op", "layer_norm", "--shapes", "4x8", "--dtype", "fp32",
                 "--modes", "forward", "--providers", "torch", "--reps", "1", "--warmup", "0", "--no-memory",
                 "--csv", "-", "--markdown", str(tmp_path / "bench.md")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith("op,") and len(out.splitlines()) == 2  # stdout: the CSV alone
    assert (tmp_path / "bench.md").is_symlink() and (tmp_path / "md" / "run.md").read_text().startswith("# ")
    assert "# normscope benchmark" in err and not (tmp_path / "-").exists()


def test_audit_json_dash_pipes_to_stdout(factories, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "normscope", "audit", "ns_paths_factories:net", *FAST,
                           "--no-report", "--json", "-"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is the JSON alone: `normscope audit --json - | jq` works
    assert [e["name"] for e in result["layers"]] == ["ln"]
    assert "findings:" in proc.stderr and not (tmp_path / "-").exists()
    both = subprocess.run([sys.executable, "-m", "normscope", "audit", "ns_paths_factories:net", *FAST,
                           "--json", "-", "--report", "/dev/stdout"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "standard output" in both.stderr


def _limit_fsize(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_file_size_limit_keeps_the_existing_json_and_leaves_no_temporary_file(factories, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous")
    proc = subprocess.run([sys.executable, "-m", "normscope", "audit", "ns_paths_factories:net", *FAST,
                           "--no-report", "--json", str(out)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_fsize(512))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("File too large") and "Traceback" not in proc.stderr
    assert out.read_text() == "previous" and _leftovers(tmp_path) == []


def _interrupt(cmd, tmp_path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        while line and "ready" not in line:
            line = proc.stderr.readline()
        assert "ready" in line, "the command ended before its slow step"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_during_an_export_exits_130_and_leaves_no_temporary_file(factories, tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    # the model sleeps in its first eager call, after the export wrote the temporary file
    done = _interrupt([sys.executable, "-m", "normscope", "export", "ns_paths_factories:slow", str(out)], tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "normscope: interrupted"
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_ctrl_c_during_an_audit_exits_130_with_one_line(factories, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous")
    done = _interrupt([sys.executable, "-m", "normscope", "audit", "ns_paths_factories:slow", *FAST,
                       "--json", str(out)], tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "normscope: interrupted" and done.stdout == ""
    assert out.read_text() == "previous" and _leftovers(tmp_path) == []


def test_ctrl_c_mid_write_removes_the_temporary_file(tmp_path):
    # a write held open (as by a slow producer) and interrupted: the temporary file goes, the old file stays
    script = textwrap.dedent("""\
        import sys, time
        from normscope._paths import open_output
        with open_output(sys.argv[1]) as f:
            f.write("half")
            f.flush()
            print("ready", file=sys.stderr, flush=True)
            time.sleep(60)
    """)
    out = tmp_path / "out.json"
    out.write_text("previous")
    done = _interrupt([sys.executable, "-c", script, str(out)], tmp_path)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    assert out.read_text() == "previous" and _leftovers(tmp_path) == []
