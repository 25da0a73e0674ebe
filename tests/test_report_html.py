"""The HTML report of ``normscope audit``: structure, plots, escaping, missing data, atomic writes.

The page is parsed with the standard library's ``html.parser`` into a small element tree; no test
matches the HTML with regular expressions.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from normscope.report import MITIGATIONS, Mitigation, mitigation_for, render_html, write_html
from normscope.report.svg import fmt
from report_fixture import (
    HIDDEN,
    OUTLIER_CHANNEL,
    OUTLIER_LAYER,
    layer_names,
    make_minimal_result,
    make_result,
)

FINDING_KINDS = [
    "nonfinite_input", "nonfinite_output", "nonfinite_grad", "eps_dominated", "weight_drift", "bias_drift",
    "grad_exploding", "grad_vanishing", "grad_outlier", "variance_shift",
    "eps_underflow", "reduced_precision", "eps_inconsistent", "post_ln_depth", "not_foldable",
    "quant_sensitive", "gamma_outliers", "int8_degradation",
    "export_failed", "export_mismatch", "export_unverified",
    "norm_latency",
]
SECTIONS = ["header", "summary", "findings", "layers", "plots", "export", "quant", "profile", "steps"]
FIGURES = ["fig-variance", "fig-grads", "fig-gamma", "fig-hist", "fig-sqnr", "fig-profile"]
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag=None, **attrs):
        out = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            ok = True
            for k, v in attrs.items():
                k = k.rstrip("_").replace("_", "-")
                have = n.attrs.get(k)
                if k == "class":
                    ok = ok and have is not None and v in have.split()
                else:
                    ok = ok and have == v
            if ok:
                out.append(n)
        return out

    def find(self, tag=None, **attrs):
        found = self.find_all(tag, **attrs)
        return found[0] if found else None

    @property
    def text(self):
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self):
        return (self.attrs.get("class") or "").split()


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.errors = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in _VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is self.root:
            self.errors.append(f"stray </{tag}>")
            return
        if n is not self.cur:
            self.errors.append(f"</{tag}> closes unclosed <{self.cur.tag}>")
        self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = _TreeBuilder()
    b.feed(html)
    b.close()
    assert not b.errors, b.errors[:5]
    assert b.cur is b.root, f"unclosed <{b.cur.tag}>"
    return b.root


@pytest.fixture(scope="module")
def full():
    return parse(render_html(make_result()))


def _bars(svg_node, series=None):
    bars = [r for r in svg_node.find_all("rect", class_="bar")]
    if series is not None:
        bars = [r for r in bars if r.attrs.get("data-series") == series]
    return bars


def _plot(root, plot_id):
    plots = root.find_all("svg", data_plot=plot_id)
    assert len(plots) == 1, f"expected one <svg data-plot={plot_id!r}>, got {len(plots)}"
    return plots[0]


def test_all_sections_and_figures_present(full):
    for sid in SECTIONS:
        assert full.find(id=sid) is not None, sid
    for fid in FIGURES:
        fig = full.find("figure", id=fid)
        assert fig is not None, fid
        cap = fig.find("figcaption")
        assert cap.find("div", class_="title").text.strip()
        assert cap.find("div", class_="how").text.startswith("How to read this:")
        assert fig.find("p", class_="missing") is None, (fid, fig.text[:200])
    assert not full.find_all(class_="render-error")
    assert "errors found" in full.find(id="verdict").text


def test_every_plot_has_one_bar_per_layer(full):
    names = layer_names()
    variance = _plot(full, "variance")
    assert [b.attrs["data-layer"] for b in _bars(variance, "var mean")] == names
    assert len(variance.find_all("path", class_="marker")) == len(names)   # the eps threshold of each layer
    assert len(variance.find_all("g", class_="whisker")) == len(names)
    grads = _plot(full, "grads")
    for series in ("input grad", "param grad"):
        assert [b.attrs["data-layer"] for b in _bars(grads, series)] == names
    gamma = _plot(full, "gamma")
    assert [b.attrs["data-layer"] for b in _bars(gamma, "gamma")] == names
    sqnr = _plot(full, "sqnr")
    for f in ("fp16", "bf16", "int8", "fp8_e4m3"):
        assert [b.attrs["data-layer"] for b in _bars(sqnr, f)] == names
    assert {g.find("title").text for g in sqnr.find_all("line", class_="guide")} == {"20 dB", "30 dB"}
    hists = full.find_all("svg", data_plot="hist")
    assert len(hists) == len(names)
    assert [h.find("text").find("title").text for h in hists] == names
    share = _plot(full, "profile-share")
    assert [b.attrs["data-series"] for b in _bars(share)] == ["normalization", "other"]
    assert len(_bars(_plot(full, "profile-ops"))) == len(make_result()["profile"]["top_ops"])
    for svg_node in full.find_all("svg", class_="plot"):
        assert svg_node.attrs.get("viewbox"), "plots scale with their container"


def test_infinite_sqnr_drawn_as_full_bar_labelled_infinity(full):
    sqnr = _plot(full, "sqnr")
    fp16 = _bars(sqnr, "fp16")
    inf_layers = [L["name"] for L in make_result()["layers"] if math.isinf(L["quant"]["sqnr_db"]["fp16"])]
    assert inf_layers
    widths = {b.attrs["data-layer"]: float(b.attrs["width"]) for b in fp16}
    finite_max = max(w for n, w in widths.items() if n not in inf_layers)
    assert all(widths[n] > finite_max for n in inf_layers)
    assert all("\u221e" in b.find("title").text for b in fp16 if b.attrs["data-layer"] in inf_layers)


def test_planted_outlier_channel_is_marked_and_labelled(full):
    gamma = _plot(full, "gamma")
    outliers = gamma.find_all("g", class_="outlier")
    assert [(g.attrs["data-layer"], g.attrs["data-channel"]) for g in outliers] == [
        (OUTLIER_LAYER, str(OUTLIER_CHANNEL))]
    label = outliers[0].find("text", class_="outlier-label")
    assert label.text.startswith(f"#{OUTLIER_CHANNEL}")
    # the other channels stay readable: the boxes are not squashed by the outlier's range
    widths = [float(b.attrs["width"]) for b in _bars(gamma, "gamma")]
    assert min(widths) > 40


def test_hostile_strings_are_escaped_everywhere():
    evil_layer = "<script>alert(1)</script>"
    evil_cfg = 'he said "hi" & \'bye\' <img src=x onerror=alert(2)>'
    r = make_result()
    old = r["layers"][2]["name"]
    r["layers"][2]["name"] = evil_layer
    r["model"]["config"]["evil"] = evil_cfg
    r["model"]["name"] = '"><svg onload=alert(3)>'
    r["findings"].append({"layer": evil_layer, "step": 1, "kind": "<b>kind</b>", "severity": "warning",
                          "value": 1.0, "message": "<iframe src=x></iframe>", "source": "monitor"})
    r["profile"]["top_ops"].append(["<script>op()</script>", 0.1, 1])
    r["steps"].append({"name": "x", "status": "failed", "seconds": 0.0, "message": "<a href=https://evil>"})
    r["layers"][2]["fold_reason"] = 'feeds "x" <y>'
    html = render_html(r)
    assert old not in [L["name"] for L in r["layers"]]
    assert "<script>alert" not in html and "<img src=x" not in html and "<iframe" not in html
    root = parse(html)
    scripts = root.find_all("script")
    assert [s.attrs.get("id") for s in scripts] == ["normscope-sort"]
    assert "alert" not in scripts[0].text
    for tag in ("img", "iframe"):
        assert not root.find_all(tag), tag
    assert all(a.attrs.get("href", "").startswith("#") for a in root.find_all("a"))   # only the page's own links
    assert "<a href=https://evil>" in [td.text for td in root.find("table", class_="steps").find_all("td")]
    evil = [d for d in root.find_all("div", class_="finding") if d.attrs["data-kind"] == "<b>kind</b>"]
    assert len(evil) == 1 and evil[0].find("code").text == "<b>kind</b>"
    assert evil[0].find("div", class_="msg").text == "<iframe src=x></iframe>"
    assert not root.find_all("svg", onload="alert(3)")
    # the strings arrive intact as text: in the table, in SVG <text>/<title> and in attributes
    cells = [td.text for td in root.find("section", id="layers").find_all("td")]
    assert evil_layer in cells
    assert any(evil_layer in t.text for t in _plot(root, "variance").find_all("title"))
    assert evil_layer in {b.attrs["data-layer"] for b in _bars(_plot(root, "variance"))}
    assert evil_cfg in [dd.text for dd in root.find("header").find_all("dd")]
    assert any(td.attrs.get("title") == 'feeds "x" <y>' for td in root.find_all("td"))
    assert "<script>op()</script>" in [c.text for c in root.find("section", id="profile").find_all("code")]
    assert root.find("title").text == 'normscope audit: "><svg onload=alert(3)>'


def test_no_external_urls(full):
    for node in full.iter():
        for attr in ("src", "href", "action", "xlink:href", "poster", "data"):
            v = node.attrs.get(attr)
            if v is not None:
                assert not v.strip().lower().startswith(("http:", "https:", "//")), (node.tag, attr, v)
    assert not full.find_all("link") and not full.find_all("img") and not full.find_all("iframe")
    css = full.find("style").text
    assert "url(" not in css and "@import" not in css
    assert all(s.attrs.get("src") is None for s in full.find_all("script"))


def test_findings_sorted_by_severity_then_layer_with_mitigations(full):
    items = full.find("section", id="findings").find_all("div", class_="finding")
    result = make_result()
    assert len(items) == len(result["findings"])
    rank = {"error": 0, "warning": 1, "info": 2}
    sev = [rank[d.attrs["data-severity"]] for d in items]
    assert sev == sorted(sev)
    order = {n: i for i, n in enumerate(layer_names())}
    warn_layers = [order[f["layer"]] for f in sorted(result["findings"], key=lambda f: order.get(f["layer"], -1))
                   if f["severity"] == "warning"]
    shown = [d.find("code").text for d in items if d.attrs["data-severity"] == "warning"]
    assert [order[next(c.text for c in d.find_all("code")[1:2])] for d in items
            if d.attrs["data-severity"] == "warning"] == warn_layers
    assert shown == [f["kind"] for f in sorted((f for f in result["findings"] if f["severity"] == "warning"),
                                               key=lambda f: order[f["layer"]])]
    for d in items:
        m = mitigation_for(d.attrs["data-kind"])
        fix = d.find("div", class_="fix")
        assert fix.find("span", class_="fm").text == m.failure_mode
        assert m.text in fix.text
        assert d.find("span", class_=f"sev-{d.attrs['data-severity']}") is not None


def test_layer_table_rows_and_foldable_reason(full):
    rows = full.find("table", class_="layers").find("tbody").find_all("tr")
    result = make_result()
    assert len(rows) == len(result["layers"])
    header = [th.text.strip() for th in full.find("table", class_="layers").find_all("th")]
    for L, tr in zip(result["layers"], rows):
        cells = {h: td for h, td in zip(header, tr.find_all("td"))}
        assert cells["name"].find("code").text == L["name"]
        assert cells["placement"].text == "post"
        assert cells["foldable"].text == "no" and cells["foldable"].attrs["title"] == L["fold_reason"]
        assert cells["var mean"].text == fmt(L["stats"]["var_mean"])
        assert cells["time ms"].text == fmt(L["time_ms"])
        assert float(cells["var p99"].attrs["data-v"]) == pytest.approx(L["stats"]["var_p99"])


def test_summary_cards_show_headline_numbers(full):
    cards = {c.find("div", class_="label").text: c for c in full.find_all("div", class_="card")}
    s = make_result()["summary"]
    assert cards["norm layers"].find("div", class_="value").text == "13"
    assert "13 layer_norm" in cards["norm layers"].text and "13 post" in cards["norm layers"].text
    assert cards["worst-layer quant SQNR"].find("div", class_="value").text == f"{fmt(s['worst_sqnr_db'])} dB"
    assert s["worst_sqnr_layer"] in cards["worst-layer quant SQNR"].text
    assert cards["ONNX export max |diff|"].find("div", class_="value").text == "2.4e-06"
    assert cards["norm time share"].find("div", class_="value").text == f"{fmt(100 * s['norm_time_share'])} %"
    assert cards["eps-dominated rows"].find("div", class_="value").text == "3"


def test_minimal_result_says_why_each_section_is_empty():
    root = parse(render_html(make_minimal_result()))
    assert not root.find_all(class_="render-error")
    for fid in FIGURES:
        miss = root.find("figure", id=fid).find("p", class_="missing")
        assert miss is not None and miss.text.startswith("No "), fid
    assert "no trainable parameters" in root.find("figure", id="fig-grads").text
    for sid in ("export", "quant", "profile", "steps", "findings"):
        assert root.find("section", id=sid).find("p", class_="missing") is not None, sid
    assert not root.find_all("svg", class_="plot")
    assert "no verdict" in root.find(id="verdict").text
    assert len(root.find("table", class_="layers").find("tbody").find_all("tr")) == 13


def test_missing_section_gives_the_failed_steps_message():
    r = make_result(export=None, profile=None)
    for L in r["layers"]:
        L["stats"]["grad_input_norm"] = L["stats"]["grad_param_norm"] = None
    r["steps"][2] = {"name": "export", "status": "failed", "seconds": 0.4,
                     "message": "onnxscript is not installed"}
    r["steps"][1] = {"name": "monitor", "status": "failed", "seconds": 0.1, "message": "backward raised: boom"}
    r["steps"][4] = {"name": "profile", "status": "skipped", "seconds": 0.0, "message": "--no-profile"}
    root = parse(render_html(r))
    assert "onnxscript is not installed" in root.find("section", id="export").find("p", class_="missing").text
    assert "backward raised: boom" in root.find("figure", id="fig-grads").find("p", class_="missing").text
    prof = root.find("figure", id="fig-profile").find("p", class_="missing").text
    assert "skipped" in prof and "--no-profile" in prof
    status = [td.text for td in root.find("table", class_="steps").find_all("td", class_="st-failed")]
    assert status == ["failed", "failed"]


def test_nonfinite_and_missing_values_render_as_text():
    r = make_result()
    L = r["layers"][0]
    L["stats"].update(var_mean=float("nan"), var_p50=None, var_p99=float("inf"), grad_input_norm=float("-inf"),
                      eps_threshold=None, nan_in=5, inf_out=2)
    L["time_ms"] = float("nan")
    L["eps"] = None
    L["quant"]["sqnr_db"]["int8"] = float("-inf")
    L["quant"]["worst_sqnr_db"] = float("nan")
    L["in_hist"] = [0] * 3     # does not match the edges
    L["gamma"] = [float("nan")] * HIDDEN
    r["layers"][1]["stats"] = None
    r["layers"][1]["quant"] = None
    r["summary"].update(worst_sqnr_db=float("inf"), int8_cosine=None, norm_time_share=float("nan"),
                        export_max_abs_diff=None)
    r["findings"][0]["value"] = float("nan")
    r["profile"]["forward_ms"] = float("inf")
    r["model"]["parameters"] = None
    root = parse(render_html(r))
    assert not root.find_all(class_="render-error")
    header = [th.text.strip() for th in root.find("table", class_="layers").find_all("th")]
    rows = root.find("table", class_="layers").find("tbody").find_all("tr")
    row0 = {h: td.text for h, td in zip(header, rows[0].find_all("td"))}
    assert row0["var mean"] == "NaN" and row0["var p50"] == "\u2014" and row0["var p99"] == "\u221e"
    assert row0["grad in"] == "\u2212\u221e" and row0["eps"] == "\u2014" and row0["time ms"] == "NaN"
    assert row0["NaN/Inf"] == "7"
    row1 = {h: td.text for h, td in zip(header, rows[1].find_all("td"))}
    assert row1["var mean"] == "\u2014" and row1["worst SQNR"] == "\u2014"
    cards = {c.find("div", class_="label").text: c.find("div", class_="value").text
             for c in root.find_all("div", class_="card")}
    assert cards["worst-layer quant SQNR"] == "\u221e dB" and cards["norm time share"] == "NaN %"
    # layer 0 has no variance bar (NaN) and layer 1 none at all; the others still have theirs
    assert len(_bars(_plot(root, "variance"))) == 11
    assert "no finite values" in _plot(root, "gamma").text


@pytest.mark.parametrize("value, text", [
    (None, "\u2014"), (float("inf"), "\u221e"), (float("-inf"), "\u2212\u221e"), (float("nan"), "NaN"),
    (0.0, "0"), (1.2e-7, "1.2e-07"), (1.234567e-7, "1.23e-07"), (3.14159, "3.14"), (0.0123456, "0.0123"),
    (12345.678, "1.23e+04"), (2.5e9, "2.5e+09"), (22713216, "22,713,216"), (True, "yes"), ("bf16", "bf16"),
])
def test_number_format(value, text):
    assert fmt(value) == text


def test_mitigation_for_every_finding_kind():
    assert set(FINDING_KINDS) <= set(MITIGATIONS)
    for kind in FINDING_KINDS:
        m = mitigation_for(kind)
        assert isinstance(m, Mitigation) and m is MITIGATIONS[kind]
        assert re.fullmatch(r"F[1-8]", m.failure_mode), (kind, m.failure_mode)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", m.text.strip()) if s]
        assert 1 <= len(sentences) <= 3, (kind, sentences)
        assert m.title and m.text.endswith(".")
    # the families map to the guide's failure modes
    assert mitigation_for("nonfinite_output").failure_mode == "F5"
    assert mitigation_for("grad_vanishing").failure_mode == "F7"
    assert mitigation_for("quant_sensitive").failure_mode == "F2"
    assert mitigation_for("norm_latency").failure_mode == "F3"
    generic = mitigation_for("something_new")
    assert re.fullmatch(r"F[1-8]", generic.failure_mode) and generic.text
    assert generic not in MITIGATIONS.values()


def test_unknown_finding_kind_gets_the_generic_mitigation():
    r = make_result()
    r["findings"] = [{"layer": None, "step": None, "kind": "brand_new", "severity": "info", "value": None,
                      "message": "m", "source": "analysis"}]
    root = parse(render_html(r))
    fix = root.find("div", class_="finding").find("div", class_="fix")
    assert mitigation_for("brand_new").text in fix.text


def test_large_gamma_is_downsampled_and_fixture_page_is_small():
    html = render_html(make_result())
    assert len(html.encode()) < 2_000_000
    r = make_result()
    big = [1.0 + 0.001 * (i % 17) for i in range(50_000)]
    big[49_999] = 40.0
    r["layers"][0]["gamma"] = big
    r["layers"][0]["gamma_outliers"] = [[49_999, 40.0, 39.0]]
    root = parse(render_html(r))
    gamma = _plot(root, "gamma")
    points = gamma.find_all("path", class_="points")[0].attrs["d"].count("M")
    assert 1000 < points <= 4096
    assert "#49999" in [t.text.split()[0] for t in gamma.find_all("text", class_="outlier-label")]


@pytest.mark.parametrize("bad, exc, match", [
    ([], TypeError, "Expected result to be a dict"),
    ({"layers": []}, ValueError, r"Expected result\['model'\] to be a dict, but got NoneType"),
    ({"model": {}, "layers": None}, ValueError, r"Expected result\['layers'\] to be a list, but got NoneType"),
])
def test_render_rejects_malformed_results(bad, exc, match):
    with pytest.raises(exc, match=match):
        render_html(bad)


def test_write_html_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    write_html(make_result(), out)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and parse(page).find(id="verdict") is not None
    out.write_text("previous report", encoding="utf-8")
    with pytest.raises(ValueError):
        write_html({"model": {"name": "m"}}, out)                   # rendering raises: nothing written
    assert out.read_text(encoding="utf-8") == "previous report"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="report.html"):
        write_html(make_result(), out)
    assert out.read_text(encoding="utf-8") == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]   # no temporary file left


def test_write_html_unwritable_paths_name_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "r.html"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        write_html(make_minimal_result(), missing)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=re.escape(str(blocker / "r.html"))):
        write_html(make_minimal_result(), blocker / "r.html")
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        write_html(make_minimal_result(), tmp_path)


def test_write_html_permission_denied(tmp_path, monkeypatch):
    # directory permissions do not stop root, so the refusal is simulated where write_html meets it
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=re.escape(str(tmp_path / "r.html"))):
        write_html(make_minimal_result(), tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_summary_cards_fall_back_to_the_sections_when_the_summary_is_missing():
    r = make_result(summary=None)
    root = parse(render_html(r))
    cards = {c.find("div", class_="label").text: c for c in root.find_all("div", class_="card")}
    worst = min(r["layers"], key=lambda L: L["quant"]["worst_sqnr_db"])
    assert cards["worst-layer quant SQNR"].find("div", class_="value").text == \
        f"{fmt(worst['quant']['worst_sqnr_db'])} dB"
    assert worst["name"] in cards["worst-layer quant SQNR"].text
    assert cards["ONNX export max |diff|"].find("div", class_="value").text == fmt(r["export"]["max_abs_diff"])
    assert cards["NaN / Inf values"].find("div", class_="value").text == "0"
    assert cards["norm layers"].find("div", class_="value").text == "13"
    counts = [b.text for b in root.find(id="verdict").find_all("span", class_="badge")]
    assert counts == ["1 error", "3 warnings", "3 info"]      # counted from the findings list


def test_report_package_imports_only_the_standard_library():
    code = ("import sys, normscope.report\n"
            "heavy = ['matplotlib', 'onnx', 'onnxruntime', 'transformers', 'scipy', 'PIL', 'prometheus_client']\n"
            "print([m for m in heavy if m in sys.modules])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
