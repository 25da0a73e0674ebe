"""Small inline-SVG plotting helpers for the HTML report (no plotting library).

Every function returns an ``<svg>`` string sized by its ``viewBox`` (it scales to the width of its
container). Every string drawn, including ``<title>`` tooltips, is HTML-escaped here, so callers pass
raw names. Bars carry ``class="bar"`` with ``data-series`` and ``data-layer`` attributes so that the
page (and its tests) can tell what each one shows.
"""

from __future__ import annotations

import html
import math
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["esc", "fmt", "num", "PALETTE", "SEVERITY_COLORS", "hbar_chart", "strip_chart", "histogram",
           "share_bar"]

# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
PALETTE = {
    "blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "purple": "#CC79A7",
    "sky": "#56B4E9", "vermillion": "#D55E00", "yellow": "#F0E442", "grey": "#7f7f7f",
}
SERIES_COLORS = [PALETTE["blue"], PALETTE["orange"], PALETTE["green"], PALETTE["purple"], PALETTE["sky"],
                 PALETTE["vermillion"]]
SEVERITY_COLORS = {"error": PALETTE["vermillion"], "warning": PALETTE["orange"], "info": PALETTE["blue"]}

_INK = "#1f2328"
_MUTED = "#656d76"
_GRID = "#d8dee4"
_FONT = 12


def esc(value) -> str:
    """HTML-escape ``str(value)`` (quotes included), for element text and attribute values alike."""
    return html.escape(str(value), quote=True)


def num(value) -> Optional[float]:
    """``value`` as a float, or None when it is missing or not a real number (bools are not numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def fmt(value, digits: int = 3) -> str:
    """Format a number for people: 3 significant digits, ``1.2e-07`` for tiny, ``∞`` / ``NaN``, ``—`` for None.

    Integers are written in full with thousands separators; strings pass through unchanged (unescaped).
    """
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, str):
        return value
    x = num(value)
    if x is None:
        return str(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "\u221e" if x > 0 else "\u2212\u221e"
    if x == 0:
        return "0"
    a = abs(x)
    if a < 1e-3 or a >= 1e6:
        mant, exp = f"{x:.{max(digits - 1, 0)}e}".split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{exp[0]}{exp[1:].zfill(2)}"
    return f"{x:.{digits}g}"


def _finite_pos(values) -> List[float]:
    out = []
    for v in values:
        x = num(v)
        if x is not None and math.isfinite(x) and x > 0:
            out.append(x)
    return out


class _Scale:
    """Maps data values to x (or y) pixels, linear or log10, with readable ticks."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool):
        self.log = log
        if log:
            lo = max(lo, 1e-300)
            hi = max(hi, lo * 10)
            self.lo, self.hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
            if self.hi == self.lo:
                self.hi += 1
        else:
            if hi <= lo:
                hi = lo + 1.0
            self.lo, self.hi = lo, hi
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        f = (t - self.lo) / (self.hi - self.lo)
        return self.p0 + min(max(f, 0.0), 1.0) * (self.p1 - self.p0)

    def ticks(self) -> List[Tuple[float, str]]:
        if self.log:
            span = int(self.hi - self.lo)
            stride = max(1, math.ceil(span / 8))
            return [(10.0 ** e, f"1e{e}" if e not in (0, 1, 2) else str(10 ** e))
                    for e in range(int(self.lo), int(self.hi) + 1, stride)]
        raw = (self.hi - self.lo) / 6
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        start = math.ceil(self.lo / step) * step
        out, t = [], start
        while t <= self.hi + step * 1e-9:
            out.append((t, fmt(round(t, 10))))
            t += step
        return out


def _svg_open(plot_id: str, w: float, h: float, label: str) -> str:
    return (f'<svg class="plot" data-plot="{esc(plot_id)}" viewBox="0 0 {w:.0f} {h:.0f}" role="img" '
            f'aria-label="{esc(label)}" xmlns="http://www.w3.org/2000/svg" '
            f'font-family="inherit" font-size="{_FONT}">')


def _text(x, y, s, *, anchor="start", cls="", fill=_INK, size=None, weight=None, title=None, halo=False) -> str:
    attrs = f'x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}"'
    if halo:   # a white outline keeps the label legible over grid and guide lines
        attrs += ' stroke="#fff" stroke-width="3" paint-order="stroke" stroke-linejoin="round"'
    if cls:
        attrs += f' class="{cls}"'
    if size:
        attrs += f' font-size="{size}"'
    if weight:
        attrs += f' font-weight="{weight}"'
    inner = esc(s) + (f"<title>{esc(title)}</title>" if title else "")
    return f"<text {attrs}>{inner}</text>"


def _shorten(s: str, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else "\u2026" + s[-(n - 1):]


def _legend(items: Sequence[Tuple[str, str, str]], x: float, y: float) -> str:
    """items: (label, colour, shape) with shape 'rect', 'line' or 'diamond'."""
    parts = []
    for label, color, shape in items:
        if shape == "line":
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 14:.1f}" y2="{y - 4:.1f}" '
                         f'stroke="{color}" stroke-width="2"/>')
        elif shape == "diamond":
            parts.append(f'<path d="M{x + 7:.1f} {y - 10:.1f} l5 6 l-5 6 l-5 -6 z" fill="{color}"/>')
        else:
            parts.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="14" height="10" rx="2" fill="{color}"/>')
        parts.append(_text(x + 19, y, label, fill=_INK))
        x += 19 + 7 * len(label) + 22
    return "".join(parts)


def hbar_chart(
    plot_id: str,
    labels: Sequence[str],
    series: Sequence[Tuple[str, str, Sequence]],
    *,
    x_label: str,
    log: bool = True,
    whiskers: Optional[Sequence[Optional[Tuple]]] = None,
    whisker_label: str = "",
    markers: Optional[Tuple[str, Sequence]] = None,
    guides: Sequence[Tuple[float, str, str]] = (),
    value_fmt: Callable = fmt,
    width: int = 940,
    label_width: int = 250,
    x_min: Optional[float] = None,
    x_max: Optional[float] = None,
) -> str:
    """A horizontal bar chart, one row per label and one bar per series within a row.

    Args:
        plot_id: ``data-plot`` of the ``<svg>``.
        labels: row labels (layer names), drawn left of the bars (shortened; full text in a tooltip).
        series: ``(name, colour, values)`` per series; ``values`` has one entry per label (None: no bar).
            ``inf`` draws a bar to the right edge labelled ``∞``.
        x_label: axis label.
        log: log10 x axis (non-positive values get no bar).
        whiskers: per row ``(low, high)`` drawn over the first series (e.g. p50..p99), or None.
        markers: ``(name, values)``: a diamond per row (e.g. a threshold).
        guides: vertical reference lines ``(x, label, colour)``.
    """
    n_rows, n_series = len(labels), max(len(series), 1)
    bar_h = 14 if n_series == 1 else max(7, 20 // n_series + 3)
    row_h = bar_h * n_series + 10
    top, bottom = 34, 44
    x0, x1 = label_width, width - 70
    height = top + n_rows * row_h + bottom

    pool: List[float] = []
    for _, _, vals in series:
        pool += [v for v in (num(x) for x in vals) if v is not None and math.isfinite(v)]
    if whiskers:
        for w in whiskers:
            if w:
                pool += [v for v in (num(x) for x in w) if v is not None and math.isfinite(v)]
    if markers:
        pool += [v for v in (num(x) for x in markers[1]) if v is not None and math.isfinite(v)]
    pool += [g[0] for g in guides]
    if log:
        pos = [v for v in pool if v > 0] or [1.0]
        lo, hi = min(pos), max(pos)
    else:
        lo = min([0.0] + pool)
        hi = max(pool) * 1.08 if pool and max(pool) > 0 else 1.0
    if x_min is not None:
        lo = x_min
    if x_max is not None:
        hi = max(hi, x_max)
    sx = _Scale(lo, hi, x0, x1, log)
    base = x0 if log else sx(max(0.0, sx.lo))

    out = [_svg_open(plot_id, width, height, x_label)]
    legend = [(name, color, "rect") for name, color, _ in series] if len(series) > 1 else []
    if whiskers:
        legend.append((whisker_label or "range", _INK, "line"))
    if markers:
        legend.append((markers[0], PALETTE["vermillion"], "diamond"))
    for g in guides:
        legend.append((g[1], g[2], "line"))
    out.append(_legend(legend, x0, 18))
    out += [f'<rect x="0" y="{top + i * row_h:.1f}" width="{width}" height="{row_h}" fill="#f6f8fa"/>'
            for i in range(1, n_rows, 2)]

    # grid and ticks
    for t, lab in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="{_GRID}"/>')
        out.append(_text(x, height - bottom + 18, lab, anchor="middle", fill=_MUTED))
    out.append(_text((x0 + x1) / 2, height - 8, x_label, anchor="middle", cls="axis-label", weight="600"))
    for gx, glabel, gcolor in guides:
        x = sx(gx)
        out.append(f'<line class="guide" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - bottom + 4}" '
                   f'stroke="{gcolor}" stroke-width="1.5" stroke-dasharray="5 3"><title>{esc(glabel)}</title></line>')

    for i, label in enumerate(labels):
        y = top + i * row_h
        out.append(_text(x0 - 8, y + row_h / 2 + 4, _shorten(label, 36), anchor="end", title=label))
        ends = [base]
        for j, (name, color, vals) in enumerate(series):
            raw = vals[i] if i < len(vals) else None
            v = num(raw)
            by = y + 5 + j * bar_h
            tip = f"{label}\n{name}: {value_fmt(raw if v is None else v)}"
            if v is None or math.isnan(v) or (log and v <= 0):
                out.append(_text(base + 4, by + bar_h - 3, "\u2014" if v is None else value_fmt(v),
                                 fill=_MUTED, size=10, title=tip))
                continue
            xe = x1 if v == math.inf else sx(v) if not (v == -math.inf) else base
            xa, xb = sorted((base, xe))
            out.append(f'<rect class="bar" data-series="{esc(name)}" data-layer="{esc(label)}" x="{xa:.1f}" '
                       f'y="{by:.1f}" width="{max(xb - xa, 1.0):.1f}" height="{bar_h - 1}" rx="1.5" '
                       f'fill="{color}"><title>{esc(tip)}</title></rect>')
            if n_series > 1 or not whiskers:
                out.append(_text(xb + 4, by + bar_h - 3, value_fmt(v), fill=_MUTED, size=10, halo=True))
            ends.append(xb)
        if whiskers and i < len(whiskers) and whiskers[i]:
            wl, wh = (num(w) for w in whiskers[i][:2])
            if wl is not None and wh is not None and (not log or (wl > 0 and wh > 0)):
                cy = y + 5 + (bar_h - 1) / 2
                xa, xb = sx(wl), sx(wh)
                tip = f"{label}\n{whisker_label}: {fmt(wl)} .. {fmt(wh)}"
                out.append(f'<g class="whisker"><title>{esc(tip)}</title>'
                           f'<line x1="{xa:.1f}" y1="{cy:.1f}" x2="{xb:.1f}" y2="{cy:.1f}" stroke="{_INK}" '
                           f'stroke-width="1.5"/><line x1="{xa:.1f}" y1="{cy - 5:.1f}" x2="{xa:.1f}" '
                           f'y2="{cy + 5:.1f}" stroke="{_INK}" stroke-width="1.5"/><line x1="{xb:.1f}" '
                           f'y1="{cy - 5:.1f}" x2="{xb:.1f}" y2="{cy + 5:.1f}" stroke="{_INK}" '
                           'stroke-width="1.5"/></g>')
                ends.append(xb)
        if markers and i < len(markers[1]):
            m = num(markers[1][i])
            if m is not None and math.isfinite(m) and (not log or m > 0):
                mx, cy = sx(m), y + 5 + (bar_h - 1) / 2
                out.append(f'<path class="marker" d="M{mx:.1f} {cy - 7:.1f} l5 7 l-5 7 l-5 -7 z" '
                           f'fill="{PALETTE["vermillion"]}" stroke="#fff" stroke-width="0.8"><title>'
                           f'{esc(label)}\n{esc(markers[0])}: {esc(fmt(m))}</title></path>')
        if whiskers and n_series == 1:
            v = num(series[0][2][i]) if i < len(series[0][2]) else None
            if v is not None and math.isfinite(v) and (not log or v > 0):
                out.append(_text(max(ends) + 6, y + 5 + bar_h - 3, value_fmt(v), fill=_MUTED, size=10, halo=True))
    out.append(f'<line x1="{base:.1f}" y1="{top - 4}" x2="{base:.1f}" y2="{height - bottom + 4}" stroke="{_INK}"/>')
    out.append("</svg>")
    return "".join(out)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def strip_chart(
    plot_id: str,
    labels: Sequence[str],
    values: Sequence[Optional[Sequence[float]]],
    outliers: Sequence[Sequence[Tuple[int, float, Optional[float]]]],
    *,
    x_label: str,
    max_points: int = 4096,
    width: int = 940,
    label_width: int = 250,
    missing_text: str = "no gamma",
) -> str:
    """Per-row distribution of a vector (gamma over channels): box (quartiles, median), min-max line, points.

    ``values[i]`` is row i's vector (None: no data). At most ``max_points`` points per row are drawn
    (evenly strided); ``outliers[i]`` entries ``(index, value, ratio)`` are always drawn, marked and
    labelled ``#index``. The x range covers the channels that are not marked as outliers, so the boxes
    stay readable; an outlier beyond it is pinned to the "off scale" margin with its value written out.
    """
    n = len(labels)
    row_h, top, bottom = 30, 34, 44
    x0, x1 = label_width, width - 130
    off_lo, off_hi = x0 - 4, x1 + 70          # where off-scale outliers are pinned
    height = top + n * row_h + bottom
    rows = []        # (sorted finite values, marked outliers [(idx, v, ratio)]) or None
    pool: List[float] = []
    for i in range(n):
        vec = values[i] if i < len(values) else None
        outs = []
        for o in (outliers[i] if i < len(outliers) else None) or ():
            v = num(o[1]) if len(o) > 1 else None
            if v is not None and math.isfinite(v):
                outs.append((o[0], v, num(o[2]) if len(o) > 2 else None))
        if vec is None:
            rows.append(None)
            continue
        fv = sorted(v for v in (num(x) for x in vec) if v is not None and math.isfinite(v))
        rows.append((fv, outs))
        marked = {o[0] for o in outs}
        body = [v for k, v in enumerate(num(x) for x in vec)
                if k not in marked and v is not None and math.isfinite(v)]
        if body:
            pool += [min(body), max(body)]
    lo, hi = (min(pool), max(pool)) if pool else (0.0, 1.0)
    pad = (hi - lo) * 0.06 or 0.5
    sx = _Scale(lo - pad, hi + pad, x0, x1, False)

    def px(v):
        if v < sx.lo:
            return off_lo - 10, True
        if v > sx.hi:
            return off_hi, True
        return sx(v), False

    out = [_svg_open(plot_id, width, height, x_label)]
    out.append(_legend([("channels", PALETTE["blue"], "rect"), ("quartiles / median", "#9ecae9", "rect"),
                        ("outlier channel", PALETTE["vermillion"], "diamond")], x0, 18))
    out += [f'<rect x="0" y="{top + i * row_h:.1f}" width="{width}" height="{row_h}" fill="#f6f8fa"/>'
            for i in range(1, n, 2)]
    for t, lab in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="{_GRID}"/>')
        out.append(_text(x, height - bottom + 18, lab, anchor="middle", fill=_MUTED))
    out.append(f'<line x1="{x1 + 20}" y1="{top - 4}" x2="{x1 + 20}" y2="{height - bottom + 4}" stroke="{_MUTED}" '
               'stroke-dasharray="2 3"/>')
    out.append(_text(x1 + 24, height - bottom + 18, "off scale \u2192", fill=_MUTED))
    out.append(_text((x0 + x1) / 2, height - 8, x_label, anchor="middle", cls="axis-label", weight="600"))
    for i, label in enumerate(labels):
        y = top + i * row_h
        cy = y + row_h / 2
        out.append(_text(x0 - 16, cy + 4, _shorten(label, 34), anchor="end", title=label))
        row = rows[i]
        if not row or not row[0]:
            out.append(_text(x0 + 4, cy + 4, missing_text if row is None else "no finite values", fill=_MUTED))
            continue
        fv, outs = row
        vec = values[i]
        q1, med, q3 = _quantile(fv, 0.25), _quantile(fv, 0.5), _quantile(fv, 0.75)
        tip = (f"{label}\n{len(vec)} channels; min {fmt(fv[0])}, q1 {fmt(q1)}, median {fmt(med)}, "
               f"q3 {fmt(q3)}, max {fmt(fv[-1])}")
        xmin, xmax = px(fv[0])[0], px(fv[-1])[0]
        out.append(f'<g class="box" data-layer="{esc(label)}"><title>{esc(tip)}</title>'
                   f'<line x1="{xmin:.1f}" y1="{cy:.1f}" x2="{xmax:.1f}" y2="{cy:.1f}" stroke="{_MUTED}" '
                   'stroke-dasharray="3 2"/>'
                   f'<rect class="bar" data-series="gamma" data-layer="{esc(label)}" x="{sx(q1):.1f}" '
                   f'y="{cy - 9:.1f}" width="{max(sx(q3) - sx(q1), 1.5):.1f}" height="18" fill="#9ecae9" '
                   f'fill-opacity="0.55" stroke="{PALETTE["blue"]}"/>'
                   f'<line x1="{sx(med):.1f}" y1="{cy - 9:.1f}" x2="{sx(med):.1f}" y2="{cy + 9:.1f}" '
                   f'stroke="{_INK}" stroke-width="2"/></g>')
        stride = max(1, math.ceil(len(vec) / max_points))
        marked = {o[0] for o in outs}
        pts = []
        for k in range(0, len(vec), stride):
            v = num(vec[k])
            if k in marked or v is None or not math.isfinite(v):
                continue
            jitter = ((k * 2654435761) % 1000) / 1000.0 - 0.5   # deterministic, spreads points vertically
            pts.append(f"M{px(v)[0]:.1f} {cy + jitter * 16:.1f}h0")
        if pts:
            out.append(f'<path class="points" d="{"".join(pts)}" stroke="{PALETTE["blue"]}" stroke-opacity="0.5" '
                       f'stroke-width="2.4" stroke-linecap="round" fill="none"/>')
        for idx, v, ratio in outs:
            mx, off = px(v)
            tip = f"{label}\nchannel {idx}: gamma {fmt(v)}" + (f", {fmt(ratio)}x the median" if ratio else "")
            text = f"#{idx}" + (f" = {fmt(v)}" if off else "")
            right = mx > x1 - 60
            out.append(f'<g class="outlier" data-channel="{esc(idx)}" data-layer="{esc(label)}"><title>{esc(tip)}'
                       f'</title><path d="M{mx:.1f} {cy - 8:.1f} l6 8 l-6 8 l-6 -8 z" fill="{PALETTE["vermillion"]}" '
                       f'stroke="#fff" stroke-width="0.8"/>'
                       + _text(mx - 9 if right else mx + 9, cy + 4, text, anchor="end" if right else "start",
                               cls="outlier-label", fill=PALETTE["vermillion"], weight="700", halo=True)
                       + "</g>")
    out.append("</svg>")
    return "".join(out)


def histogram(
    plot_id: str,
    title: str,
    counts: Sequence,
    edges: Sequence[float],
    *,
    width: int = 300,
    height: int = 150,
) -> str:
    """A small histogram of ``counts`` = [underflow, bins..., overflow] over ``edges``.

    Drawn twice, on a log and on a linear count axis (groups ``ylog`` / ``ylin``; the page's CSS shows
    one). Under- and overflow counts are drawn as hatched-colour bars just outside the range.
    """
    c = [max(num(x) or 0.0, 0.0) for x in counts]
    e = [num(x) for x in edges]
    nb = len(e) - 1
    if nb < 1 or len(c) != nb + 2 or any(v is None or not math.isfinite(v) for v in e):
        body = _text(width / 2, height / 2, "histogram shape does not match the edges", anchor="middle",
                     fill=_MUTED)
        return _svg_open(plot_id, width, height, title) + body + "</svg>"
    left, right, top, bottom = 34, 8, 22, 30
    slot = (width - left - right) / (nb + 2 + 1)     # one slot each for under/overflow, one gap
    plot_h = height - top - bottom
    total = sum(c)
    out = [_svg_open(plot_id, width, height, title)]
    out.append(_text(left, 14, _shorten(title, 40), weight="600", size=11, title=title))
    cmax = max(c) if c else 0.0

    def xs(k):  # slot index: 0 = underflow, 1..nb bins, nb+1 overflow; a half-slot gap each side
        return left + (k + (0.5 if k > 0 else 0) + (0.5 if k > nb else 0)) * slot

    for mode in ("ylog", "ylin"):
        g = [f'<g class="{mode}">']
        if cmax > 0:
            if mode == "ylog":
                top_dec = max(1, math.ceil(math.log10(cmax + 1)))
                hy = lambda v: plot_h * math.log10(v + 1) / top_dec  # noqa: E731
                ticks = [(10 ** d, "1e%d" % d if d > 2 else str(10 ** d))
                         for d in range(0, top_dec + 1, max(1, top_dec // 3))]
            else:
                hy = lambda v: plot_h * v / cmax  # noqa: E731
                ticks = [(cmax, fmt(int(cmax))), (cmax / 2, fmt(int(cmax / 2)))]
            for tv, tl in ticks:
                ty = top + plot_h - hy(tv)
                g.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{width - right}" y2="{ty:.1f}" stroke="{_GRID}"/>')
                g.append(_text(left - 3, ty + 3, tl, anchor="end", fill=_MUTED, size=9))
            for k, v in enumerate(c):
                if v <= 0:
                    continue
                h = hy(v)
                color = PALETTE["vermillion"] if k in (0, nb + 1) else PALETTE["sky"]
                if k == 0:
                    rng = f"< {fmt(e[0])}"
                elif k == nb + 1:
                    rng = f"\u2265 {fmt(e[-1])}"
                else:
                    rng = f"[{fmt(e[k - 1])}, {fmt(e[k])})"
                g.append(f'<rect class="hbin" x="{xs(k):.1f}" y="{top + plot_h - h:.1f}" '
                         f'width="{max(slot - 0.4, 0.6):.1f}" height="{h:.1f}" fill="{color}">'
                         f'<title>{esc(rng)}: {esc(fmt(int(v)))}</title></rect>')
        g.append("</g>")
        out.append("".join(g))
    out.append(f'<line x1="{left}" y1="{top + plot_h:.1f}" x2="{width - right}" y2="{top + plot_h:.1f}" '
               f'stroke="{_INK}"/>')
    for val, anchor in ((e[0], "start"), (0.0 if e[0] < 0 < e[-1] else None, "middle"), (e[-1], "end")):
        if val is None:
            continue
        k = 1 + (val - e[0]) / (e[-1] - e[0]) * nb
        out.append(_text(xs(k) if anchor != "end" else xs(nb + 1), top + plot_h + 12, fmt(val), anchor=anchor,
                         fill=_MUTED, size=9))
    out.append(_text(left + (width - left - right) / 2, height - 3, f"input value \u00b7 n={fmt(int(total))}",
                     anchor="middle", fill=_MUTED, size=9))
    out.append("</svg>")
    return "".join(out)


def share_bar(plot_id: str, parts: Sequence[Tuple[str, float, str]], *, x_label: str, width: int = 940) -> str:
    """One stacked horizontal bar of ``(label, value, colour)`` parts, labelled with value and percentage."""
    vals = [max(num(v) or 0.0, 0.0) for _, v, _ in parts]
    total = sum(vals)
    x0, x1, y, h = 20, width - 20, 30, 34
    out = [_svg_open(plot_id, width, 96, x_label)]
    x = x0
    for (label, _, color), v in zip(parts, vals):
        w = (x1 - x0) * (v / total) if total > 0 else 0.0
        tip = f"{label}: {fmt(v)} ms ({fmt(100 * v / total) if total else '—'} %)"
        out.append(f'<rect class="bar" data-series="{esc(label)}" x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" '
                   f'height="{h}" fill="{color}"><title>{esc(tip)}</title></rect>')
        text = f"{label} {fmt(100 * v / total) if total else '—'} %"
        if w > 7 * len(text):
            out.append(_text(x + 8, y + h / 2 + 4, text, fill="#fff", weight="600"))
        x += w
    leg = [(f"{label}: {fmt(v)} ms", color, "rect") for (label, _, color), v in zip(parts, vals)]
    out.append(_legend(leg, x0, 18))
    out.append(_text(width / 2, 88, x_label, anchor="middle", cls="axis-label", weight="600"))
    out.append("</svg>")
    return "".join(out)
