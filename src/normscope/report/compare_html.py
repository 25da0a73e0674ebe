"""The result of :func:`normscope.compare.compare` (``normscope compare``) as one self-contained HTML page.

The same look as the audit report (:mod:`normscope.report.html`: its CSS, sortable tables, inline SVG
charts of :mod:`normscope.report.svg`): a verdict banner, the checks (failing ones first), a chart per
layer of the input variance ratio, the input change and the gamma drift, and the per-layer table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Dict, List

from normscope.report import svg
from normscope.report.html import _CSS, _JS, _sort_value
from normscope.report.svg import PALETTE, esc, fmt, num

__all__ = ["render_compare_html", "write_compare_html"]

_EXTRA_CSS = """
td.st-pass { color:var(--ok); font-weight:600; }
td.st-fail { color:var(--error); font-weight:700; }
td.st-skipped { color:var(--muted); font-weight:600; }
tr.fail td { background:#fbeee6; }
"""

_STATUS_ORDER = {"fail": 0, "pass": 1, "skipped": 2}


def _value(v) -> str:
    return esc(v) if isinstance(v, str) else esc(fmt(v, 4))


class _CompareReport:
    def __init__(self, result: Mapping):
        self.r = result
        self.layers = [row for row in result.get("layers") or [] if isinstance(row, Mapping)]
        self.checks = sorted((c for c in result.get("checks") or [] if isinstance(c, Mapping)),
                             key=lambda c: _STATUS_ORDER.get(str(c.get("status")), 3))

    def header(self) -> str:
        b, c = self.r.get("baseline") or {}, self.r.get("candidate") or {}
        verdict = str(self.r.get("verdict", "?"))
        failed = [ch for ch in self.checks if ch.get("status") == "fail"]
        skipped = [ch for ch in self.checks if ch.get("status") == "skipped"]
        cls = "ok" if verdict == "go" else "bad"
        what = ("every check passed" + (f" ({len(skipped)} skipped)" if skipped else "") if not failed else
                f"{len(failed)} check{'s' if len(failed) != 1 else ''} failed: "
                + ", ".join(f"{ch.get('name')}" + (f" at {ch.get('layer')}" if ch.get("layer") else "")
                            for ch in failed))
        meta = "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in (
            ("baseline", f"<code>{esc(b.get('name'))}</code> ({esc(b.get('source'))}, {esc(b.get('class'))})"),
            ("candidate", f"<code>{esc(c.get('name'))}</code> ({esc(c.get('class'))}, "
                          f"{esc(fmt(c.get('parameters')))} parameters)"),
            ("inputs", esc(c.get("inputs"))),
            ("created", esc(self.r.get("created")))))
        return (f'<section id="header"><h1>normscope compare: {esc(b.get("name"))} &rarr; {esc(c.get("name"))}</h1>'
                '<p class="sub">Canary gate: normalization-specific checks of a candidate model against its '
                f'baseline on the same inputs.</p><dl class="meta">{meta}</dl>'
                f'<div class="verdict {cls}"><span class="big" data-verdict="{esc(verdict)}">'
                f'{esc(verdict.upper())}</span><span>{esc(what)}</span></div></section>')

    def checks_table(self) -> str:
        rows = []
        for ch in self.checks:
            st = str(ch.get("status"))
            rows.append(f'<tr class="{esc(st)}" data-check="{esc(ch.get("name"))}"><td class="st-{esc(st)}">'
                        f'{esc(st)}</td><td><code>{esc(ch.get("name"))}</code></td>'
                        f'<td><code>{esc(ch.get("layer") or "")}</code></td><td class="n">{_value(ch.get("value"))}'
                        f'</td><td class="n">{_value(ch.get("threshold"))}</td><td>{esc(ch.get("reason"))}</td></tr>')
        return ('<section id="checks"><h2>Checks</h2><div class="scroll"><table class="checks"><thead><tr>'
                '<th>status</th><th>check</th><th>layer</th><th class="n">value</th><th class="n">threshold</th>'
                f'<th>reason</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>')

    def charts(self) -> str:
        if not self.layers:
            return '<section id="charts"><h2>Per layer</h2><p class="missing">No layers.</p></section>'
        t = self.r.get("thresholds") or {}
        labels = [str(row.get("layer")) for row in self.layers]
        parts = ['<section id="charts"><h2>Per layer</h2>']
        vr = num(t.get("variance_ratio"))
        ratios = [row.get("variance_ratio") for row in self.layers]
        if any(num(v) is not None for v in ratios):
            guides = [(1.0, "baseline (1x)", PALETTE["green"])]
            if vr is not None and math.isfinite(vr):
                guides += [(vr, f"threshold {fmt(vr)}x", PALETTE["vermillion"]),
                           (1.0 / vr, f"threshold {fmt(1.0 / vr)}x", PALETTE["vermillion"])]
            finite = [v for v in (num(x) for x in ratios) if v is not None and 0 < v < math.inf]
            lo = min(finite + [g[0] for g in guides]) / 1.25
            hi = max(finite + [g[0] for g in guides]) * 1.25
            parts.append(self._figure("variance-ratio", "Input variance ratio (candidate / baseline)",
                                      "Mean per-row variance of each norm layer's input, candidate over baseline: "
                                      "what the norm divides by. Outside the dashed lines the check fails.",
                                      svg.hbar_chart("variance-ratio", labels, [("ratio", PALETTE["blue"], ratios)],
                                                     x_label="variance ratio (log scale)", log=True, guides=guides,
                                                     x_min=lo, x_max=hi)))
        for key, title, how, threshold in (
                ("input_change", "Input change", "Relative L2 change of each norm layer's input on the same inputs: "
                 "the first layer that moves sits right after what changed.", t.get("input_change")),
                ("gamma_drift", "Gamma drift", "Relative L2 change of each layer's gamma (weight).",
                 t.get("gamma_drift"))):
            vals = [row.get(key) for row in self.layers]
            if not any(num(v) is not None for v in vals):
                continue
            thr = num(threshold)
            guides = [(thr, f"threshold {fmt(thr)}", PALETTE["vermillion"])] if thr and math.isfinite(thr) else []
            positive = [num(v) for v in vals if num(v) is not None and num(v) > 0]
            log = bool(positive)
            parts.append(self._figure(key.replace("_", "-"), title, how + (" Zero (unchanged) draws no bar."
                                                                           if log else ""),
                                      svg.hbar_chart(key.replace("_", "-"), labels, [(key, PALETTE["orange"], vals)],
                                                     x_label=f"{title.lower()}" + (" (log scale)" if log else ""),
                                                     log=log, guides=guides)))
        parts.append("</section>")
        return "".join(parts)

    @staticmethod
    def _figure(plot_id: str, title: str, how: str, body: str) -> str:
        return (f'<figure data-figure="{esc(plot_id)}"><figcaption><div class="title">{esc(title)}</div>'
                f'<div class="how">{esc(how)}</div></figcaption>{body}</figure>')

    def layer_table(self) -> str:
        cols = [("layer", "layer"), ("kind", "kind"), ("eps_baseline", "eps base"), ("eps_candidate", "eps cand"),
                ("var_baseline", "var base"), ("var_candidate", "var cand"), ("variance_ratio", "var ratio"),
                ("input_change", "input change"), ("gamma_drift", "gamma drift"), ("gamma_max_abs", "gamma max abs"),
                ("beta_drift", "beta drift"), ("beta_max_abs", "beta max abs"),
                ("sqnr_baseline_db", "SQNR base dB"), ("sqnr_candidate_db", "SQNR cand dB")]
        head = "".join(f'<th class="sortable{"" if k in ("layer", "kind") else " n"}">{esc(h)}</th>'
                       for k, h in cols)
        rows = []
        for row in self.layers:
            cells = []
            for k, _ in cols:
                v = row.get(k)
                if k == "layer":
                    cells.append(f"<td><code>{esc(v)}</code></td>")
                elif k == "kind":
                    cells.append(f"<td>{esc(v)}</td>")
                else:
                    cells.append(f'<td class="n" data-v="{_sort_value(v)}">{esc(fmt(v, 4))}</td>')
            rows.append(f"<tr>{''.join(cells)}</tr>")
        return ('<section id="layers"><h2>Layers</h2><div class="scroll"><table class="layers sortable"><thead><tr>'
                f'{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>')

    def details(self) -> str:
        parts = ['<section id="details"><h2>Output, latency, quantization, new findings</h2>']
        kv: List[tuple] = []
        out = self.r.get("output")
        if isinstance(out, Mapping):
            kv += [(f"output {k}", out.get(k)) for k in ("psi", "js", "cosine_min", "cosine_mean", "max_abs_diff",
                                                          "nonfinite_baseline", "nonfinite_candidate", "error")]
        lat = self.r.get("latency")
        if isinstance(lat, Mapping):
            kv += [(f"latency {k}", lat.get(k)) for k in ("baseline_ms", "candidate_ms", "ratio", "paired_ratio_median",
                                                           "repeats", "calls_per_sample", "clock")]
        q = self.r.get("quantization")
        if isinstance(q, Mapping):
            kv += [(f"quantization {k}", q.get(k)) for k in q]
        if kv:
            rows = "".join(f"<tr><th>{esc(k)}</th><td>{_value(v)}</td></tr>" for k, v in kv)
            parts.append(f'<div class="scroll"><table class="kv"><tbody>{rows}</tbody></table></div>')
        new = [f for f in self.r.get("new_findings") or [] if isinstance(f, Mapping)]
        parts.append("<h3>New findings</h3>")
        if new:
            for f in new:
                sev = str(f.get("severity"))
                parts.append(f'<div class="finding {esc(sev)}"><div><span class="badge sev-{esc(sev)}">{esc(sev)}'
                             f'</span></div><div><div class="where"><code>{esc(f.get("kind"))}</code>'
                             f'{(" at <code>" + esc(f.get("layer")) + "</code>") if f.get("layer") else ""}</div>'
                             f'<div class="msg">{esc(f.get("message"))}</div></div></div>')
        else:
            parts.append('<p class="sub">None: every finding of the candidate is also a finding of the baseline.</p>')
        not_run = [n for n in self.r.get("not_run") or [] if isinstance(n, Mapping)]
        if not_run:
            items = "".join(f"<li><code>{esc(n.get('check'))}</code>: {esc(n.get('reason'))}</li>" for n in not_run)
            parts.append(f"<h3>Not run</h3><ul>{items}</ul>")
        parts.append("</section>")
        return "".join(parts)

    def guarded(self, fn, section_id: str, title: str) -> str:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one odd field never loses the whole page
            return (f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2><p class="missing render-error">This '
                    f"section could not be rendered: {esc(type(exc).__name__)}: {esc(exc)}</p></section>")

    def render(self) -> str:
        body = [self.guarded(self.header, "header", "Header"), self.guarded(self.checks_table, "checks", "Checks"),
                self.guarded(self.charts, "charts", "Per layer"), self.guarded(self.layer_table, "layers", "Layers"),
                self.guarded(self.details, "details", "Details")]
        foot = (f'<footer>Generated by normscope {esc(fmt(self.r.get("normscope_version")))}. '
                "Self-contained page: no network access needed.</footer>")
        b, c = self.r.get("baseline") or {}, self.r.get("candidate") or {}
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>normscope compare: {esc(b.get('name'))} vs {esc(c.get('name'))}</title>"
                f"<style>{_CSS}{_EXTRA_CSS}</style></head>"
                f'<body><main>{"".join(body)}{foot}</main><script id="normscope-sort">{_JS}</script></body></html>\n')


def render_compare_html(result: Dict[str, Any]) -> str:
    """Render a comparison result (:func:`normscope.compare.compare`) as one self-contained HTML page.

    Raises:
        TypeError: ``result`` is not a mapping.
        ValueError: it has no ``verdict`` or no ``checks`` list.
    """
    if not isinstance(result, Mapping):
        raise TypeError(f"Expected result to be a dict (the comparison result), but got {type(result).__name__}")
    if "verdict" not in result or not isinstance(result.get("checks"), (list, tuple)):
        raise ValueError("Expected a comparison result with 'verdict' and a 'checks' list, but got keys "
                         f"{sorted(result)[:8]}")
    return _CompareReport(result).render()


def write_compare_html(result: Dict[str, Any], path) -> None:
    """Render ``result`` (:func:`render_compare_html`) and write it to ``path`` atomically (as
    :func:`normscope.report.write_html`: ``-`` is standard output).

    Raises:
        OSError: ``path`` cannot be written; the message names it.
    """
    from normscope.report.html import write_report_text

    write_report_text(render_compare_html(result), path)
