"""The audit result rendered as one self-contained HTML page (inline CSS, inline SVG plots, no network)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

from normscope.report import svg
from normscope.report.mitigations import FAILURE_MODES, mitigation_for
from normscope.report.svg import PALETTE, esc, fmt, num

__all__ = ["render_html", "write_html"]

_SEVERITIES = ("error", "warning", "info")
_DOT = " \u00b7 "
_MAX_GAMMA_POINTS = 4096
_SQNR_FORMATS = ("fp16", "bf16", "int8", "fp8_e4m3")

_CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#ffffff; --panel:#f6f8fa;
  --error:#D55E00; --warning:#E69F00; --info:#0072B2; --ok:#009E73; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 40px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 26px 0 4px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 0.9em; }
.sub { color: var(--muted); margin: 0 0 12px; }
.meta { display:grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 4px 24px; margin: 12px 0; }
.meta div { display:flex; gap:8px; min-width:0; }
.meta dt { color: var(--muted); min-width: 92px; }
.meta dd { margin:0; overflow-wrap:anywhere; }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--muted); }
.verdict { display:flex; align-items:center; gap:18px; flex-wrap:wrap; padding:14px 18px; border-radius:8px;
  margin:16px 0; border:1px solid; font-size:17px; }
.verdict.ok { background:#e6f4ef; border-color:#9fd3c0; }
.verdict.bad { background:#fbeee6; border-color:#efb894; }
.verdict.neutral { background:var(--panel); border-color:var(--line); }
.verdict .big { font-weight:700; font-size:20px; }
.counts { display:flex; gap:8px; flex-wrap:wrap; }
.badge { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600;
  line-height:18px; white-space:nowrap; border:1px solid transparent; }
.sev-error { background:var(--error); color:#fff; }
.sev-warning { background:var(--warning); color:#1f2328; }
.sev-info { background:var(--info); color:#fff; }
.badge.zero { background:#eef1f4; color:var(--muted); border-color:var(--line); }
.pl { background:#eef1f4; color:var(--ink); border-color:var(--line); }
.pl-pre { background:#e3f0f9; border-color:#9cc7e6; }
.pl-post { background:#fdf1dc; border-color:#f0c77e; }
.pl-final { background:#e3f4ee; border-color:#93d1b8; }
.yes { color: var(--ok); font-weight:600; } .no { color: var(--muted); }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:#fff; }
.card .label { color:var(--muted); font-size:13px; }
.card .value { font-size:24px; font-weight:650; margin:2px 0; font-variant-numeric: tabular-nums; }
.card .detail { color:var(--muted); font-size:13px; overflow-wrap:anywhere; }
.card.alert { border-left:5px solid var(--error); }
.card.warn { border-left:5px solid var(--warning); }
.card.good { border-left:5px solid var(--ok); }
table { border-collapse: collapse; width:100%; font-size:13px; font-variant-numeric: tabular-nums; }
th, td { padding:4px 7px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:var(--panel); font-weight:600; position:sticky; top:0; }
table.layers { font-size:12.5px; }
table.layers th { vertical-align:bottom; }
table.layers td:first-child { min-width: 260px; }
table.layers th, table.layers td { padding:4px 5px; }
table.layers td:first-child code { font-size: 12px; }
td.n, th.n { text-align:right; }
td.n { white-space:nowrap; }
table.kv th { width: 240px; }
td.q-bad { color:#b34700; font-weight:700; background:#fbeee6; }
td.q-warn { color:#8a5a00; font-weight:600; background:#fdf5e4; }
tbody tr:hover { background:#f3f6f9; }
.scroll { overflow-x:auto; border:1px solid var(--line); border-radius:8px; }
.scroll table th:first-child, .scroll table td:first-child { padding-left:12px; }
.finding { display:grid; grid-template-columns: 84px 1fr; gap:4px 14px; padding:10px 14px;
  border:1px solid var(--line); border-left:5px solid var(--info); border-radius:6px; margin:8px 0; }
.finding.error { border-left-color:var(--error); }
.finding.warning { border-left-color:var(--warning); }
.finding .where { color:var(--muted); font-size:13px; }
.finding .msg { margin:2px 0; }
.finding .fix { font-size:13.5px; background:var(--panel); border-radius:6px; padding:6px 10px; margin-top:4px; }
.finding .fix b { color:var(--ink); }
.fm { font-weight:700; color:var(--info); }
figure { margin: 18px 0 28px; }
figcaption { margin-bottom: 4px; }
figcaption .title { font-weight:650; font-size:16px; }
figcaption .how { color:var(--muted); font-size:13.5px; }
svg.plot { width:100%; height:auto; display:block; }
.missing { color:var(--muted); background:var(--panel); border:1px dashed var(--line); border-radius:6px;
  padding:10px 14px; font-style: italic; }
.hist-grid { display:grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap:10px; }
.hist-grid .cell { border:1px solid var(--line); border-radius:6px; padding:4px; }
.ylin { display:none; }
#hist-linear:checked ~ .hist-grid .ylin { display:inline; }
#hist-linear:checked ~ .hist-grid .ylog { display:none; }
.toggle { font-size:13.5px; color:var(--muted); }
.steps td.st-ok { color:var(--ok); font-weight:600; }
.steps td.st-failed { color:var(--error); font-weight:600; }
.steps td.st-skipped { color:var(--muted); font-weight:600; }
ol.ranking { columns: 2 380px; column-gap: 32px; font-size: 13.5px; }
footer { margin-top:40px; color:var(--muted); font-size:13px; }
th.sortable { cursor:pointer; }
th.sortable::after { content:"\\2195"; color:#aab2bb; font-weight:400; padding-left:2px; }
nav.toc { display:flex; flex-wrap:wrap; gap:4px 14px; font-size:14px; margin: 4px 0 8px; }
nav.toc a { color: var(--info); text-decoration:none; }
@media (max-width: 700px) { main { padding: 14px; } .finding { grid-template-columns: 1fr; } }
@media print { th { position:static; } }
"""

# Sorting the per-layer table by clicking a header; the page reads the same without it.
_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th.sortable').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-dir') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', asc ? 'asc' : 'desc');
      var idx = th.cellIndex;
      function key(r) {
        var c = r.cells[idx], v = c.getAttribute('data-v');
        if (v === null) return c.textContent;
        var f = parseFloat(v); return isNaN(f) ? v : f;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === 'number' && typeof y === 'number') return asc ? x - y : y - x;
        return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _get(d, *keys, default=None):
    """``d[k1][k2]...`` through mappings, or ``default`` when any level is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping):
            return default
        d = d.get(k)
        if d is None:
            return default
    return d


def _list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


def _sqnr_cls(v) -> str:
    x = num(v)
    if x is None or math.isnan(x):
        return ""
    return " q-bad" if x < 20 else " q-warn" if x < 30 else ""


def _sort_value(v) -> str:
    x = num(v)
    if x is None:
        return "-1e309" if v is None else esc(v)
    if math.isnan(x):
        return "-1e309"
    return "1e309" if x == math.inf else ("-1e308" if x == -math.inf else repr(x))


class _Report:
    def __init__(self, result: Mapping):
        self.r = result
        self.model = result["model"]
        self.layers: List[Mapping] = [L for L in result["layers"] if isinstance(L, Mapping)]
        self.names = [str(L.get("name", f"layer {i}")) for i, L in enumerate(self.layers)]
        self.order = {n: i for i, n in enumerate(self.names)}
        self.steps = [s for s in _list(result.get("steps")) if isinstance(s, Mapping)]

    # ---- helpers -------------------------------------------------------------------------------
    def step_reason(self, *words: str) -> Optional[str]:
        """Why a step's data is missing, from the steps list (the first step whose name has one of words)."""
        for s in self.steps:
            name = str(s.get("name", "")).lower()
            if any(w in name for w in words):
                status = str(s.get("status", ""))
                msg = s.get("message")
                if status == "ok":
                    continue
                what = "failed" if status == "failed" else "was skipped" if status == "skipped" else status
                return f"the {s.get('name')} step {what}" + (f": {msg}" if msg else "")
        return None

    def missing(self, what: str, *words: str, default: str = "") -> str:
        reason = self.step_reason(*words) or default or "this step did not run (not in the audit result)"
        return f'<p class="missing">No {esc(what)}: {esc(reason)}.</p>'

    @staticmethod
    def figure(fig_id: str, title: str, how: str, body: str) -> str:
        return (f'<figure id="{esc(fig_id)}"><figcaption><div class="title">{esc(title)}</div>'
                f'<div class="how">How to read this: {esc(how)}</div></figcaption>{body}</figure>')

    def stat(self, layer: Mapping, key: str):
        return _get(layer, "stats", key)

    # ---- header --------------------------------------------------------------------------------
    def header(self) -> str:
        m, r = self.model, self.r
        name = m.get("name") or m.get("class") or "model"
        env = r.get("environment") if isinstance(r.get("environment"), Mapping) else {}
        params = m.get("parameters")
        p = num(params)
        ptxt = fmt(params)
        if p is not None and p >= 1e6 and math.isfinite(p):
            ptxt = f"{p / 1e6:.1f} M ({fmt(params)})"
        trainable = m.get("trainable_parameters")
        if trainable is not None:
            ptxt += f", {fmt(trainable)} trainable"
        rows = [("source", m.get("source")), ("class", m.get("class")), ("parameters", ptxt),
                ("dtype", m.get("dtype")), ("device", m.get("device")), ("inputs", m.get("inputs")),
                ("normscope", r.get("normscope_version")), ("torch", env.get("torch")),
                ("python", env.get("python")), ("backend", env.get("backend")), ("platform", env.get("platform")),
                ("created", r.get("created")),
                ("duration", f"{fmt(num(r.get('duration_s')))} s" if num(r.get("duration_s")) is not None else None)]
        meta = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd></div>"
                       for k, v in rows if v is not None and v != "")
        cfg = m.get("config")
        cfg_html = ""
        if isinstance(cfg, Mapping) and cfg:
            items = "".join(f"<div><dt><code>{esc(k)}</code></dt><dd>{esc(fmt(v))}</dd></div>"
                            for k, v in list(cfg.items())[:200])
            cfg_html = (f'<details><summary>model config ({len(cfg)} keys)</summary><dl class="meta">{items}</dl>'
                        "</details>")
        extra_env = {k: v for k, v in env.items() if k not in ("torch", "python", "backend", "platform")}
        if extra_env:
            items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd></div>" for k, v in extra_env.items())
            cfg_html += f'<details><summary>environment</summary><dl class="meta">{items}</dl></details>'

        counts = _get(r, "summary", "findings")
        known = isinstance(counts, Mapping) or isinstance(r.get("findings"), (list, tuple))
        if not isinstance(counts, Mapping):
            counts = {s: 0 for s in _SEVERITIES}
            for f in _list(r.get("findings")):
                if isinstance(f, Mapping) and f.get("severity") in counts:
                    counts[f["severity"]] += 1
        code = r.get("exit_code")
        n_err = num(counts.get("error")) or 0
        neutral = False
        if code is None:
            bad = n_err > 0
            verdict = "errors found" if bad else "no errors"
            if not known:
                neutral, verdict = True, "no verdict: the result has neither an exit code nor findings"
        else:
            bad = code != 0
            verdict = "no errors" if code == 0 else "errors found"
        badges = "".join(f'<span class="badge {"sev-" + s if num(counts.get(s)) else "zero"}">'
                         f'{esc(fmt(counts.get(s, 0)))} {s}{"s" if s != "info" and counts.get(s, 0) != 1 else ""}'
                         "</span>" for s in _SEVERITIES)
        code_txt = f" (exit code {esc(code)})" if code is not None else ""
        mark = "\u2716" if bad else "\u2714"
        if neutral:
            mark, badges = "\u2753", ""
        vcls = "neutral" if neutral else "bad" if bad else "ok"
        banner = (f'<div class="verdict {vcls}" id="verdict"><span class="big">'
                  f'{mark} {esc(verdict)}</span><span>{code_txt}</span>'
                  f'<span class="counts">{badges}</span></div>')
        toc = ('<nav class="toc"><a href="#summary">Summary</a><a href="#findings">Findings</a>'
               '<a href="#layers">Layers</a><a href="#plots">Plots</a><a href="#export">Export</a>'
               '<a href="#quant">Quantization</a><a href="#profile">Profile</a><a href="#steps">Steps</a></nav>')
        return (f'<header id="header"><h1>normscope audit: {esc(name)}</h1>'
                f'<p class="sub">{esc(fmt(m.get("class")))} \u00b7 {len(self.layers)} normalization layers</p>'
                f'{banner}<dl class="meta">{meta}</dl>{cfg_html}{toc}</header>')

    # ---- summary cards -------------------------------------------------------------------------
    def cards(self) -> str:
        s = self.r.get("summary") if isinstance(self.r.get("summary"), Mapping) else {}
        L = self.layers
        n_layers = s.get("layers", len(L))
        kinds = s.get("kinds")
        if not isinstance(kinds, Mapping):
            kinds = {}
            for x in L:
                kinds[str(x.get("kind"))] = kinds.get(str(x.get("kind")), 0) + 1
        placements = s.get("placements")
        if not isinstance(placements, Mapping):
            placements = {}
            for x in L:
                placements[str(x.get("placement"))] = placements.get(str(x.get("placement")), 0) + 1
        foldable = s.get("foldable", sum(1 for x in L if x.get("foldable") is True))

        def total(key_sum, keys):
            if s.get(key_sum) is not None:
                return s.get(key_sum)
            vals = [num(self.stat(x, k)) for x in L for k in keys]
            vals = [v for v in vals if v is not None]
            return int(sum(vals)) if vals else None

        nonfinite = total("nonfinite", ("nan_in", "inf_in", "nan_out", "inf_out"))
        eps_rows = total("eps_rows", ("eps_rows",))
        cards = []

        def card(label, value, detail="", cls=""):
            cards.append(f'<div class="card {cls}"><div class="label">{esc(label)}</div>'
                         f'<div class="value">{esc(value)}</div><div class="detail">{esc(detail)}</div></div>')

        card("norm layers", fmt(n_layers), ", ".join(f"{fmt(v)} {k}" for k, v in kinds.items()) + " \u00b7 "
             + ", ".join(f"{fmt(v)} {k}" for k, v in placements.items()))
        card("foldable into Linear", f"{fmt(foldable)} / {fmt(n_layers)}", "gamma/beta foldable by fold_norms_")
        card("NaN / Inf values", fmt(nonfinite), "in norm inputs and outputs",
             "alert" if (num(nonfinite) or 0) > 0 else ("good" if nonfinite is not None else ""))
        card("eps-dominated rows", fmt(eps_rows), "rows with variance below eps_factor \u00b7 eps",
             "warn" if (num(eps_rows) or 0) > 0 else ("good" if eps_rows is not None else ""))
        ws, ws_layer = s.get("worst_sqnr_db"), s.get("worst_sqnr_layer")
        if ws is None:   # derive from the layers when the summary lacks it
            per = [(num(_get(x, "quant", "worst_sqnr_db")), n) for n, x in zip(self.names, L)]
            per = [p for p in per if p[0] is not None and not math.isnan(p[0])]
            if per:
                ws, ws_layer = min(per)
        wsv = num(ws)
        card("worst-layer quant SQNR", f"{fmt(ws)} dB" if ws is not None else fmt(None),
             fmt(ws_layer) if ws_layer else "",
             "" if wsv is None else ("alert" if wsv < 20 else "warn" if wsv < 30 else "good"))
        cos = s.get("int8_cosine", _get(self.r, "quant", "dynamic_int8", "cosine_mean"))
        sq = s.get("int8_sqnr_db", _get(self.r, "quant", "dynamic_int8", "sqnr_db"))
        d8_warning = _get(self.r, "quant", "dynamic_int8", "warning")
        d8_detail = f"SQNR {fmt(sq)} dB" if sq is not None else "no dynamic-int8 result"
        if d8_warning:
            text = str(d8_warning)
            d8_detail += ": " + (text if len(text) <= 140 else text[:139] + "\u2026")
        card("dynamic int8", f"cos {fmt(cos, 4)}" if cos is not None else fmt(None), d8_detail,
             "warn" if d8_warning else "")
        ed = s.get("export_max_abs_diff", _get(self.r, "export", "max_abs_diff"))
        ok = _get(self.r, "export", "ok")
        card("ONNX export max |diff|", fmt(ed), "" if ok is None else ("export ok" if ok else "export not ok"),
             "" if ok is None else ("good" if ok else "alert"))
        share = num(s.get("norm_time_share", _get(self.r, "profile", "share")))
        card("norm time share", f"{fmt(100 * share)} %" if share is not None else fmt(None),
             "of the forward pass (profile)")
        return f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>'

    # ---- findings ------------------------------------------------------------------------------
    def findings(self) -> str:
        raw = self.r.get("findings")
        if raw is None:
            return ('<section id="findings"><h2>Findings</h2>'
                    + self.missing("findings", "analy", "monitor", default="the result holds no findings list")
                    + "</section>")
        fs = [f for f in _list(raw) if isinstance(f, Mapping)]
        if not fs:
            return '<section id="findings"><h2>Findings</h2><p>No findings: nothing to act on.</p></section>'
        sev_rank = {s: i for i, s in enumerate(_SEVERITIES)}

        def key(f):
            layer = f.get("layer")
            step = num(f.get("step"))
            return (sev_rank.get(f.get("severity"), 3), self.order.get(layer, -1 if layer is None else len(self.order)),
                    step if step is not None else -1)

        items = []
        for f in sorted(fs, key=key):
            sev = str(f.get("severity", "info"))
            sev_cls = sev if sev in _SEVERITIES else "info"
            kind = str(f.get("kind", "?"))
            mit = mitigation_for(kind)
            where = []
            where.append(f"layer <code>{esc(f.get('layer'))}</code>" if f.get("layer") is not None else "model")
            if f.get("step") is not None:
                where.append(f"step {esc(fmt(f.get('step')))}")
            if f.get("value") is not None:
                where.append(f"value {esc(fmt(f.get('value')))}")
            if f.get("source"):
                where.append(f"from {esc(f.get('source'))}")
            items.append(
                f'<div class="finding {sev_cls}" data-kind="{esc(kind)}" data-severity="{esc(sev)}">'
                f'<div><span class="badge sev-{sev_cls}">{esc(sev)}</span></div>'
                f'<div><div><b><code>{esc(kind)}</code></b> <span class="where">\u00b7 {_DOT.join(where)}</span></div>'
                f'<div class="msg">{esc(f.get("message", ""))}</div>'
                f'<div class="fix"><span class="fm" title="{esc(FAILURE_MODES.get(mit.failure_mode, ""))}">'
                f'{esc(mit.failure_mode)}</span> <b>{esc(mit.title)}.</b> {esc(mit.text)}</div></div></div>')
        return f'<section id="findings"><h2>Findings ({len(fs)})</h2>{"".join(items)}</section>'

    # ---- per-layer table -----------------------------------------------------------------------
    def layer_table(self) -> str:
        cols = [("name", False), ("kind", False), ("placement", False), ("eps", True), ("dtype \u2192 compute", False),
                ("foldable", False), ("var mean", True), ("var p50", True), ("var p99", True),
                ("eps rows", True), ("NaN/Inf", True), ("grad in", True), ("grad param", True),
                ("worst SQNR", True), ("time ms", True)]
        head = "".join(f'<th class="sortable{" n" if n else ""}" scope="col">{esc(c)}</th>' for c, n in cols)
        rows = []
        for L in self.layers:
            def ncell(v, digits=3):
                return f'<td class="n" data-v="{_sort_value(v)}">{esc(fmt(v, digits))}</td>'

            pl = str(L.get("placement", "?"))
            fold = L.get("foldable")
            nf_keys = ("nan_in", "inf_in", "nan_out", "inf_out")
            nf_vals = [num(self.stat(L, k)) for k in nf_keys]
            nf = int(sum(v for v in nf_vals if v is not None)) if any(v is not None for v in nf_vals) else None
            q = L.get("quant") if isinstance(L.get("quant"), Mapping) else {}
            worst = q.get("worst_sqnr_db")
            wf = q.get("worst_format")
            risks = [str(x) for x in _list(L.get("risks"))]
            name_cell = f"<code>{esc(L.get('name')).replace('.', '.<wbr>')}</code>"
            if risks:
                name_cell += f' <span class="badge sev-warning" title="{esc("; ".join(risks))}">risk</span>'
            dt = fmt(L.get("dtype"))
            if L.get("compute_dtype") is not None and L.get("compute_dtype") != L.get("dtype"):
                dt += f" \u2192 {fmt(L.get('compute_dtype'))}"
            rows.append(
                "<tr>"
                f'<td data-v="{self.order.get(str(L.get("name")), 0)}">{name_cell}</td>'
                f"<td>{esc(fmt(L.get('kind')))}</td>"
                f'<td><span class="badge pl pl-{esc(pl)}">{esc(pl)}</span></td>'
                + ncell(L.get("eps"))
                + f"<td>{esc(dt)}</td>"
                f'<td title="{esc(L.get("fold_reason") or "")}" class="{"yes" if fold else "no"}">'
                f'{"yes" if fold is True else "no" if fold is False else fmt(None)}</td>'
                + ncell(self.stat(L, "var_mean")) + ncell(self.stat(L, "var_p50")) + ncell(self.stat(L, "var_p99"))
                + ncell(self.stat(L, "eps_rows")) + ncell(nf)
                + ncell(self.stat(L, "grad_input_norm")) + ncell(self.stat(L, "grad_param_norm"))
                + f'<td class="n{_sqnr_cls(worst)}" data-v="{_sort_value(worst)}" title="{esc(fmt(wf) if wf else "")}">'
                  f'{esc(fmt(worst))}{("<br><small>" + esc(wf) + "</small>") if wf else ""}</td>'
                + ncell(L.get("time_ms"))
                + "</tr>")
        return (f'<section id="layers"><h2>Layers</h2><p class="sub">One row per normalization layer, in model order. '
                f'Hover "foldable" for the reason; click a header to sort.</p>'
                f'<div class="scroll"><table class="sortable layers"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table></div></section>')

    # ---- plots ---------------------------------------------------------------------------------
    def plot_variance(self) -> str:
        title = "Input variance per layer"
        how = ("bar = mean per-row variance (log scale); whisker = p50 to p99 of the rows; the red diamond is the "
               "eps-dominance threshold eps_factor \u00b7 eps: rows left of it are scaled by eps, not by the data.")
        means = [self.stat(L, "var_mean") for L in self.layers]
        if all(num(v) is None for v in means):
            return self.figure("fig-variance", title, how, self.missing("variance statistics", "monitor", "forward"))
        whiskers = [(self.stat(L, "var_p50"), self.stat(L, "var_p99")) for L in self.layers]
        thresholds = []
        for L in self.layers:
            t = self.stat(L, "eps_threshold")
            if t is None and num(L.get("eps")) is not None:
                t = 10 * num(L.get("eps"))
            thresholds.append(t)
        body = svg.hbar_chart("variance", self.names, [("var mean", PALETTE["blue"], means)],
                              x_label="per-row input variance (log scale)", log=True, whiskers=whiskers,
                              whisker_label="p50\u2013p99", markers=("eps threshold", thresholds))
        return self.figure("fig-variance", title, how, body)

    def plot_grads(self) -> str:
        title = "Gradient norm per layer"
        how = ("L2 norm of the gradient w.r.t. each norm's input (through the norm only) and of its parameters, "
               "log scale: a layer far from the others, or a trend with depth, points at vanishing or exploding "
               "gradients.")
        gi = [self.stat(L, "grad_input_norm") for L in self.layers]
        gp = [self.stat(L, "grad_param_norm") for L in self.layers]
        if all(num(v) is None for v in gi + gp):
            trainable = num(self.model.get("trainable_parameters"))
            default = ("no backward pass: the model has no trainable parameters" if trainable == 0
                       else "no backward pass in the audit result")
            return self.figure("fig-grads", title, how,
                               self.missing("gradient statistics", "backward", "monitor", default=default))
        body = svg.hbar_chart("grads", self.names, [("input grad", PALETTE["blue"], gi),
                                                    ("param grad", PALETTE["orange"], gp)],
                              x_label="gradient L2 norm (log scale)", log=True)
        return self.figure("fig-grads", title, how, body)

    def plot_gamma(self) -> str:
        title = "Gamma (weight) per channel"
        how = ("each row shows one layer's gamma over its channels: box = quartiles, line = median, dots = channels; "
               "red diamonds are outlier channels (labelled #index), which stretch the quantization range; "
               "one beyond the axis is pinned right of the dotted line, with its value.")
        gam = [L.get("gamma") if isinstance(L.get("gamma"), (list, tuple)) else None for L in self.layers]
        if all(g is None for g in gam):
            return self.figure("fig-gamma", title, how,
                               self.missing("gamma vectors", "quant", "analy",
                                            default="no layer has a gamma vector in the result "
                                                    "(norms without an affine weight, or not collected)"))
        outs = [[o for o in _list(L.get("gamma_outliers")) if isinstance(o, (list, tuple)) and len(o) >= 2]
                for L in self.layers]
        body = svg.strip_chart("gamma", self.names, gam, outs, x_label="gamma value",
                               max_points=_MAX_GAMMA_POINTS)
        return self.figure("fig-gamma", title, how, body)

    def plot_hist(self) -> str:
        title = "Input-value histograms"
        how = ("one panel per layer: how the values entering the norm are distributed over the monitor's fixed "
               "bins; red bars at the ends count values below / above the range (outliers).")
        edges = _list(self.r.get("hist_edges"))
        hs = [(n, L.get("in_hist")) for n, L in zip(self.names, self.layers) if isinstance(L.get("in_hist"), list)]
        if not edges or not hs:
            why = "the result has no histogram bin edges" if hs and not edges else ""
            return self.figure("fig-hist", title, how, self.missing("histograms", "monitor", "forward", default=why))
        cells = "".join(f'<div class="cell">{svg.histogram("hist", n, h, edges)}</div>' for n, h in hs)
        body = ('<input type="checkbox" id="hist-linear"> <label class="toggle" for="hist-linear">linear count axis '
                '(default: log)</label>' f'<div class="hist-grid">{cells}</div>')
        return self.figure("fig-hist", title, how, body)

    def plot_sqnr(self) -> str:
        title = "Quantization SQNR per layer"
        how = ("signal-to-quantization-noise ratio of each layer's output when quantized to each format, in dB: "
               "higher is safer; below 20 dB (dashed red) is a visible loss, above 30 dB (dashed green) is safe. "
               "\u221e means exact.")
        qs = [L.get("quant") if isinstance(L.get("quant"), Mapping) else None for L in self.layers]
        if all(q is None or not isinstance(q.get("sqnr_db"), Mapping) for q in qs):
            return self.figure("fig-sqnr", title, how, self.missing("quantization results", "quant"))
        fmts: List[str] = list(_get(self.r, "quant", "formats") or [])
        fmts = [str(f) for f in fmts] or []
        for q in qs:
            for k in (q or {}).get("sqnr_db", {}) or {}:
                if str(k) not in fmts:
                    fmts.append(str(k))
        colors = svg.SERIES_COLORS
        series = [(f, colors[i % len(colors)], [_get(q, "sqnr_db", f) for q in qs]) for i, f in enumerate(fmts)]
        finite = [num(v) for _, _, vs in series for v in vs]
        finite = [v for v in finite if v is not None and math.isfinite(v)]
        body = svg.hbar_chart("sqnr", self.names, series, x_label="SQNR (dB), higher = safer", log=False,
                              guides=[(20.0, "20 dB", PALETTE["vermillion"]), (30.0, "30 dB", PALETTE["green"])],
                              x_min=min([0.0] + finite), x_max=max([40.0] + finite) * 1.05)
        return self.figure("fig-sqnr", title, how, body)

    def plot_profile(self) -> str:
        title = "Where the forward time goes"
        how = ("the bar splits one forward pass into normalization and everything else; the chart below it lists "
               "the most expensive operators, each with its share of that forward time.")
        p = self.r.get("profile")
        if not isinstance(p, Mapping):
            return self.figure("fig-profile", title, how, self.missing("profile", "profil"))
        fwd, nrm = num(p.get("forward_ms")), num(p.get("norm_ms"))
        parts = ""
        if fwd is not None and nrm is not None and fwd >= 0:
            parts = svg.share_bar("profile-share", [("normalization", nrm, PALETTE["vermillion"]),
                                                    ("other", max(fwd - nrm, 0.0), PALETTE["grey"])],
                                  x_label="forward time (ms)")
        ops = [o for o in _list(p.get("top_ops")) if isinstance(o, (list, tuple)) and len(o) >= 2][:15]
        if ops:
            parts += svg.hbar_chart("profile-ops", [str(o[0]) for o in ops],
                                    [("time", PALETTE["blue"], [o[1] for o in ops])], x_label="time (ms)", log=False,
                                    value_fmt=lambda v: f"{fmt(v)} ms")
        if not parts:
            parts = '<p class="missing">The profile holds no timings.</p>'
        return self.figure("fig-profile", title, how, parts)

    def plots(self) -> str:
        parts = [self.plot_variance(), self.plot_grads(), self.plot_gamma(), self.plot_hist(), self.plot_sqnr(),
                 self.plot_profile()]
        return f'<section id="plots"><h2>Plots</h2>{"".join(parts)}</section>'

    # ---- export / quant / profile / steps ------------------------------------------------------
    @staticmethod
    def kv_table(rows: Sequence) -> str:
        body = "".join(f"<tr><th scope=\"row\">{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        return f'<div class="scroll"><table class="kv">{body}</table></div>'

    def export(self) -> str:
        e = self.r.get("export")
        if not isinstance(e, Mapping):
            return '<section id="export"><h2>ONNX export</h2>' + self.missing("ONNX export", "export") + "</section>"
        ok = e.get("ok")
        nodes = e.get("norm_nodes")
        nodes_txt = (", ".join(f"{fmt(v)} \u00d7 {k}" for k, v in nodes.items()) if isinstance(nodes, Mapping)
                     else fmt(nodes))
        rows = [("status", f'<span class="badge {"sev-info" if ok else "sev-error"}">'
                           f'{"ok" if ok else "not ok" if ok is False else "unknown"}</span>'),
                ("exporter", esc(fmt(e.get("exporter")))), ("opset", esc(fmt(e.get("opset")))),
                ("norm nodes", esc(nodes_txt) or "none"), ("max abs diff", esc(fmt(e.get("max_abs_diff")))),
                ("max rel diff", esc(fmt(e.get("max_rel_diff"))))]
        if e.get("error"):
            rows.append(("error", f"<code>{esc(e.get('error'))}</code>"))
        return f'<section id="export"><h2>ONNX export</h2>{self.kv_table(rows)}</section>'

    def quant(self) -> str:
        q = self.r.get("quant")
        per_layer = [(n, L.get("quant")) for n, L in zip(self.names, self.layers)
                     if isinstance(L.get("quant"), Mapping)]
        if not isinstance(q, Mapping) and not per_layer:
            return '<section id="quant"><h2>Quantization</h2>' + self.missing("quantization results", "quant") + \
                "</section>"
        out = ['<section id="quant"><h2>Quantization</h2>']
        q = q if isinstance(q, Mapping) else {}
        d8 = q.get("dynamic_int8")
        if isinstance(d8, Mapping):
            rows = [("Linear layers quantized", esc(fmt(d8.get("linear_layers")))),
                    ("output SQNR", f"{esc(fmt(d8.get('sqnr_db')))} dB"),
                    ("cosine mean", esc(fmt(d8.get("cosine_mean"), 5))),
                    ("cosine min", esc(fmt(d8.get("cosine_min"), 5)))]
            if d8.get("warning"):
                rows.append(("warning", esc(d8.get("warning"))))
            out.append("<h3>Dynamic int8 (torch.ao, Linear layers)</h3>" + self.kv_table(rows))
        elif q:
            out.append("<h3>Dynamic int8</h3>" + self.missing("dynamic-int8 result", "int8", "dynamic"))
        ranking = [str(x) for x in _list(q.get("ranking"))]
        if ranking:
            out.append('<h3>Most sensitive layers first</h3><ol class="ranking">'
                       + "".join(f"<li><code>{esc(x)}</code></li>" for x in ranking[:10]) + "</ol>")
        if per_layer:
            fmts = [str(f) for f in _list(q.get("formats"))]
            for _, lq in per_layer:
                for k in lq.get("sqnr_db") or {}:
                    if str(k) not in fmts:
                        fmts.append(str(k))
            head = "".join(f'<th class="n">{esc(f)} dB</th>' for f in fmts)
            rows = []
            for n, lq in per_layer:
                s = lq.get("sqnr_db") if isinstance(lq.get("sqnr_db"), Mapping) else {}
                cells = "".join(f'<td class="n{_sqnr_cls(s.get(f))}">{esc(fmt(s.get(f)))}</td>' for f in fmts)
                rows.append(f"<tr><td><code>{esc(n)}</code></td>{cells}<td>{esc(fmt(lq.get('worst_format')))}</td>"
                            f'<td class="n">{esc(fmt(lq.get("worst_sqnr_db")))}</td>'
                            f'<td class="n">{esc(fmt(lq.get("outlier_ratio")))}</td>'
                            f'<td class="n">{esc(fmt(lq.get("rank")))}</td></tr>')
            out.append('<h3>Per layer</h3><div class="scroll"><table class="quant"><thead><tr><th>layer</th>'
                       f'{head}<th>worst format</th><th class="n">worst dB</th><th class="n">outlier ratio</th>'
                       f'<th class="n">rank</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
        out.append("</section>")
        return "".join(out)

    def profile(self) -> str:
        p = self.r.get("profile")
        if not isinstance(p, Mapping):
            return '<section id="profile"><h2>Profile</h2>' + self.missing("profile", "profil") + "</section>"
        share = num(p.get("share"))
        rows = [("forward", f"{esc(fmt(p.get('forward_ms')))} ms"),
                ("normalization", f"{esc(fmt(p.get('norm_ms')))} ms"),
                ("norm share", f"{esc(fmt(100 * share))} %" if share is not None else esc(fmt(None)))]
        out = [f'<section id="profile"><h2>Profile</h2>{self.kv_table(rows)}']
        ops = [o for o in _list(p.get("top_ops")) if isinstance(o, (list, tuple)) and len(o) >= 1]
        if ops:
            body = "".join(f"<tr><td><code>{esc(o[0])}</code></td>"
                           f"<td class=\"n\">{esc(fmt(o[1] if len(o) > 1 else None))}</td>"
                           f"<td class=\"n\">{esc(fmt(o[2] if len(o) > 2 else None))}</td></tr>" for o in ops)
            out.append('<h3>Top operators</h3><div class="scroll"><table class="ops"><thead><tr><th>operator</th>'
                       f'<th class="n">ms</th><th class="n">calls</th></tr></thead><tbody>{body}</tbody></table></div>')
        out.append("</section>")
        return "".join(out)

    def steps_footer(self) -> str:
        if not self.steps:
            return ('<section id="steps"><h2>Steps</h2><p class="missing">No steps: the result does not list the '
                    "audit steps.</p></section>")
        rows = "".join(
            f"<tr><td>{esc(s.get('name'))}</td><td class=\"st-{esc(s.get('status'))}\">{esc(s.get('status'))}</td>"
            f"<td class=\"n\">{esc(fmt(s.get('seconds')))} s</td><td>{esc(fmt(s.get('message')))}</td></tr>"
            for s in self.steps)
        return ('<section id="steps"><h2>Steps</h2><div class="scroll"><table class="steps"><thead><tr><th>step</th>'
                f'<th>status</th><th class="n">time</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>'
                "</div></section>")

    def guarded(self, fn, section_id: str, title: str) -> str:
        """A section, or a note saying why it could not be drawn: one odd field never loses the whole report."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the rest of the page is still worth having
            return (f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2><p class="missing render-error">This '
                    f"section could not be rendered: {esc(type(exc).__name__)}: {esc(exc)}</p></section>")

    def render(self) -> str:
        name = self.model.get("name") or self.model.get("class") or "model"
        body = [self.guarded(self.header, "header", "Header"), self.guarded(self.cards, "summary", "Summary"),
                self.guarded(self.findings, "findings", "Findings"), self.guarded(self.layer_table, "layers", "Layers"),
                self.guarded(self.plots, "plots", "Plots"), self.guarded(self.export, "export", "ONNX export"),
                self.guarded(self.quant, "quant", "Quantization"), self.guarded(self.profile, "profile", "Profile"),
                self.guarded(self.steps_footer, "steps", "Steps")]
        foot = (f'<footer>Generated by normscope {esc(fmt(self.r.get("normscope_version")))} '
                f'{("on " + esc(self.r.get("created"))) if self.r.get("created") else ""}. '
                "Self-contained page: no network access needed.</footer>")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>normscope audit: {esc(name)}</title><style>{_CSS}</style></head>"
                f'<body><main>{"".join(body)}{foot}</main><script id="normscope-sort">{_JS}</script></body></html>\n')


def _validate(result: Any) -> None:
    if not isinstance(result, Mapping):
        raise TypeError(f"Expected result to be a dict (the audit result), but got {type(result).__name__}")
    if not isinstance(result.get("model"), Mapping):
        raise ValueError(f"Expected result['model'] to be a dict, but got {type(result.get('model')).__name__}")
    if not isinstance(result.get("layers"), (list, tuple)):
        raise ValueError(f"Expected result['layers'] to be a list, but got {type(result.get('layers')).__name__}")


def render_html(result: Dict[str, Any]) -> str:
    """Render an audit result as one self-contained HTML page.

    The page has inline CSS, inline SVG plots and a small optional script (table sorting); it loads
    nothing from the network. Every key of ``result`` except ``"model"`` and ``"layers"`` may be
    missing or None: the matching section then says why it is empty. Every string from the result is
    HTML-escaped.

    Args:
        result: the audit result dict (``normscope audit``'s schema).

    Returns:
        The HTML document as a string.

    Raises:
        TypeError: ``result`` is not a mapping.
        ValueError: ``result`` has no ``"model"`` mapping or no ``"layers"`` list.

    Example::

        >>> html = render_html({"model": {"name": "tiny"}, "layers": []})
        >>> html.startswith("<!DOCTYPE html>")
        True
    """
    _validate(result)
    return _Report(result).render()


def write_html(result: Dict[str, Any], path) -> None:
    """Render ``result`` (see :func:`render_html`) and write it to ``path`` atomically.

    The page is rendered first, then written with :func:`normscope._paths.open_output`: to a temporary
    file in the same directory, moved over ``path`` with :func:`os.replace` (an existing file is left
    untouched when rendering or writing fails); a symbolic link's target is written, the link kept; a
    FIFO, a device or ``-`` (standard output) is written directly.

    Raises:
        PermissionError / OSError: ``path`` cannot be written; the message names it.
    """
    write_report_text(render_html(result), path)


def write_report_text(text: str, path) -> None:
    """Write a rendered report to ``path`` (through symlinks; FIFOs, devices and ``-`` directly); an OSError
    names the path."""
    from normscope._paths import open_output

    path = os.fspath(path)
    try:
        with open_output(path) as fh:
            fh.write(text)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise type(exc)(f"cannot write the report to {path!r}: {reason}") from exc
