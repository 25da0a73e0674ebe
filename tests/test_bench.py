"""The benchmark harness: structure and arithmetic of its results (never speed)."""

import csv

import pytest
import torch

from normscope import bench

OPS = ("rms_norm", "add_layer_norm")
PROVIDERS = ("normscope", "torch", "liger", "copy")
DTYPES = ("fp32", "bf16")


@pytest.fixture(scope="module")
def result():
    cfg = bench.BenchConfig(device="cpu", ops=OPS, shapes=((64, 128),), dtypes=DTYPES, modes=bench.MODES,
                            providers=PROVIDERS, reps=2, warmup=1, allocator="default")
    with pytest.MonkeyPatch.context() as mp:
        # The harness is under test, not the CPU kernels: pin the always-available backend.
        mp.setenv("NORMSCOPE_BACKEND", "reference")
        return bench.run_benchmark(cfg)


def _case(rows, r, provider):
    return next(x for x in rows if (x.op, x.mode, x.shape, x.dtype, x.provider)
                == (r.op, r.mode, r.shape, r.dtype, provider))


def test_rows_cover_every_case(result):
    keys = {(r.op, r.mode, r.shape, r.dtype, r.provider) for r in result.rows}
    assert len(result.rows) == len(keys) == len(OPS) * len(bench.MODES) * len(DTYPES) * len(PROVIDERS)
    for r in result.rows:
        assert r.shape == "64x128" and r.reps == 2
        if r.provider == "liger":  # CPU: never runs, but is reported with its reason
            assert not r.available and "CUDA" in r.note
        else:
            assert r.available, r.note
            assert r.ms > 0


def test_bytes_and_gbps(result):
    for r in result.rows:
        assert r.bytes == bench.case_bytes(r.op, r.mode, 64, 128, r.dtype, provider=r.provider)
        if r.available:
            assert r.gbps == pytest.approx(r.bytes / (r.ms * 1e-3) / 1e9, rel=1e-12)
        else:
            assert r.gbps is None and r.ratio is None and r.frac_copy is None


def test_ratio_frac_copy_and_peak_ratio(result):
    for r in result.rows:
        if not r.available:
            continue
        ns, cp, te = (_case(result.rows, r, p) for p in ("normscope", "copy", "torch"))
        assert r.ratio == pytest.approx(r.ms / ns.ms, rel=1e-12)
        assert r.frac_copy == pytest.approx(r.gbps / cp.gbps, rel=1e-12)
        if r.provider == "copy":
            assert r.peak_mb is None
        else:
            assert r.peak_mb is not None and r.peak_mb > 0
            assert r.peak_ratio == pytest.approx(r.peak_mb / te.peak_mb, rel=1e-12)
    assert all(r.ratio == pytest.approx(1.0) for r in result.rows if r.provider == "normscope")
    assert any("backend reference" in r.note for r in result.rows if r.provider == "normscope")


def test_bytes_model_by_hand():
    # rms_norm forward fp32: read x, weight; write y.
    assert bench.case_bytes("rms_norm", "forward", 64, 128, "fp32") == 4 * (64 * 128 * 2 + 128)
    # add_layer_norm backward bf16: read h, dy, dh, weight; write dx, dresidual, dweight, dbias.
    mn = 64 * 128
    assert bench.case_bytes("add_layer_norm", "backward", 64, 128, "bf16") == 2 * (5 * mn + 3 * 128)
    # mixed precision: fp32 params with bf16 activations.
    assert bench.case_bytes("layer_norm", "forward", 64, 128, "bf16", "fp32") == 2 * 2 * mn + 4 * 2 * 128
    # masked: one byte of mask per element, read in forward and in backward.
    full = bench.case_bytes("masked_rms_norm", "full", 64, 128, "fp32")
    assert full == (bench.case_bytes("masked_rms_norm", "forward", 64, 128, "fp32")
                    + bench.case_bytes("masked_rms_norm", "backward", 64, 128, "fp32"))
    assert full == bench.case_bytes("rms_norm", "full", 64, 128, "fp32") + 2 * mn
    assert bench.case_bytes("layer_norm", "full", 64, 128, "bf16", provider="copy") == 2 * 2 * mn


def test_markdown_and_csv(result, tmp_path):
    md = result.to_markdown()
    assert result.machine_line() in md and "allocator: default" in md
    header = "| shape | dtype | " + " | ".join(PROVIDERS) + " |"
    for op in OPS:
        for mode in bench.MODES:
            assert f"## {op} · {mode}" in md
        assert f"### {op} · peak memory" in md
    assert md.count(header) == len(OPS) * len(bench.MODES)
    assert "n/a [1]" in md and "[1] liger: liger_kernel runs on CUDA only" in md
    path = tmp_path / "sub" / "rows.csv"
    result.to_csv(str(path))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.rows)
    assert {"op", "mode", "shape", "dtype", "provider", "ms", "gbps", "frac_copy", "ratio", "peak_mb",
            "note"} <= set(rows[0])
    liger = [r for r in rows if r["provider"] == "liger"]
    assert liger and all(r["ms"] == "" and r["note"] for r in liger)


def test_machine_info():
    m = bench.machine_info("cpu", "x")
    assert m["torch"] == torch.__version__ and m["allocator"] == "x" and m["cpu"]
    assert "UTC" in m["date"]


def test_torch_compile_provider_all_modes():
    cfg = bench.BenchConfig(device="cpu", ops=("rms_norm",), shapes=((32, 64),), dtypes=("fp32",),
                            modes=bench.MODES, providers=("torch", "torch_compile"), reps=2, warmup=1,
                            allocator="default")
    res = bench.run_benchmark(cfg)
    rows = {r.mode: r for r in res.rows if r.provider == "torch_compile"}
    assert all(r.available for r in rows.values()), [r.note for r in rows.values()]
    assert all(r.compile_s is not None and r.compile_s > 0 for r in rows.values())
    assert "retain_graph" in rows["backward"].note
    assert all(r.ratio is None for r in res.rows)  # no normscope provider: no ratio
    assert "torch.compile time" in res.to_markdown()


@pytest.mark.parametrize("text", ["8192", "axb", "0x16", "8x8x8", ""])
def test_parse_shapes_rejects(text):
    with pytest.raises(bench.BenchError, match="shape"):
        bench.parse_shapes(text)


def test_parse_helpers():
    assert bench.parse_shapes("8192x1024, 4096X4096") == [(8192, 1024), (4096, 4096)]
    assert bench.parse_list("all", bench.OPS, "op") == list(bench.OPS)
    dtypes = bench.parse_list("bfloat16,fp32", tuple(bench.DTYPES), "dtype", bench.DTYPE_ALIASES)
    assert dtypes == ["bf16", "fp32"]
    with pytest.raises(bench.BenchError, match="unknown op 'nope'"):
        bench.parse_list("rms_norm,nope", bench.OPS, "op")
    with pytest.raises(bench.BenchError, match="reps"):
        bench.BenchConfig(device="cpu", reps=0).resolved()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error():
    with pytest.raises(bench.BenchError, match="CUDA is not available"):
        bench.BenchConfig(device="cuda").resolved()


def test_defaults():
    cfg = bench.BenchConfig(device="cpu").resolved()
    assert cfg.shapes == bench.CPU_SHAPES and cfg.modes == ("forward", "full")
    # short rows (per-row costs) next to the long ones, each of 2**23 elements or more
    assert {n for _, n in cfg.shapes} >= {8, 64, 256, 1024, 4096}
    assert all(m * n >= 1 << 23 for m, n in cfg.shapes)
    assert cfg.dtypes == ("fp32", "bf16") and cfg.ops == bench.OPS and cfg.providers == bench.PROVIDERS
    quick = bench.BenchConfig(device="cpu", quick=True).resolved()
    assert quick.reps < cfg.reps and quick.shapes[0][0] * quick.shapes[0][1] < 8192 * 1024


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("planted backward failure")


def _broken_forward():
    raise ValueError("planted forward failure")


def test_failing_provider_is_reported_not_dropped(monkeypatch):
    cfg = bench.BenchConfig(device="cpu", ops=("rms_norm",), shapes=((16, 32),), dtypes=("fp32",),
                            modes=bench.MODES, providers=("normscope", "torch", "copy"), reps=1, warmup=0,
                            allocator="default")
    # Backward fails: the forward is still timed, backward and full carry the reason.
    monkeypatch.setattr(bench, "_normscope_fn", lambda op, inp: lambda: _NoBackward.apply(inp.x) * inp.weight)
    res = bench.run_benchmark(cfg)
    ns = {r.mode: r for r in res.rows if r.provider == "normscope"}
    assert ns["forward"].available and "no peak memory" in ns["forward"].note
    for mode in ("backward", "full"):
        assert not ns[mode].available and "planted backward failure" in ns[mode].note
    te = {r.mode: r for r in res.rows if r.provider == "torch"}
    assert te["forward"].ratio is not None and te["full"].available and te["full"].ratio is None
    # Forward fails: every mode is unavailable with the reason; the other providers still run.
    monkeypatch.setattr(bench, "_normscope_fn", lambda op, inp: _broken_forward)
    res = bench.run_benchmark(cfg)
    for r in res.rows:
        if r.provider == "normscope":
            assert not r.available and r.note == "ValueError: planted forward failure"
        else:
            assert r.available
    assert "n/a [1]" in res.to_markdown()
