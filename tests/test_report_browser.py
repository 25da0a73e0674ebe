"""The HTML report in a real browser: headless Chromium screenshots it and loads its SVG figures.

Needs a Chromium binary (``apt-get install chromium``): without one these tests fail when ``CI`` is
set and are skipped otherwise. The PNG is decoded here with zlib/struct (no imaging library).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from normscope.report import dump_dom, find_chromium, screenshot, write_html
from report_fixture import layer_names, make_result

WIDTH, HEIGHT = 1200, 900


def _chromium() -> str:
    try:
        return find_chromium()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Chromium installed: {exc}")
        pytest.skip("chromium not installed (apt-get install chromium)")


def read_png(path: Path):
    """(width, height, channels, rows) of an 8-bit RGB/RGBA PNG; rows are bytearrays of unfiltered pixels."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"Expected a PNG signature, but got {data[:8]!r}")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = ihdr
    if depth != 8 or color not in (2, 6) or interlace != 0:
        raise ValueError(f"Expected an 8-bit non-interlaced RGB(A) PNG, but got depth={depth} color={color}")
    ch = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * ch
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(ch, stride):
                line[i] = (line[i] + line[i - ch]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - ch] if i >= ch else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - ch] if i >= ch else 0
                b, c = prev[i], prev[i - ch] if i >= ch else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        elif f != 0:
            raise ValueError(f"Expected a PNG filter type 0-4, but got {f}")
        rows.append(line)
        prev = line
    return width, height, ch, rows


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    _chromium()
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_html(make_result(), path)
    return path


def test_screenshot_has_the_requested_size_and_is_not_blank(page, tmp_path):
    png = screenshot(page, tmp_path / "shot.png", width=WIDTH, height=HEIGHT)
    assert png == (tmp_path / "shot.png").resolve() and png.stat().st_size > 10_000
    width, height, ch, rows = read_png(png)
    assert (width, height) == (WIDTH, HEIGHT)
    pixels = [tuple(row[i:i + 3]) for row in rows[::7] for i in range(0, width * ch, 11 * ch)]
    colors = set(pixels)
    assert len(colors) > 50, f"only {len(colors)} distinct colours: the page looks blank"
    lum = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in pixels]
    mean = sum(lum) / len(lum)
    var = sum((v - mean) ** 2 for v in lum) / len(lum)
    assert var > 100, f"luminance variance {var:.1f}: the page looks blank"
    assert 200 < mean < 255, "a light theme: mostly light pixels with dark text"
    # the verdict banner (errors found: a light vermillion background) is drawn near the top
    banner = [tuple(rows[y][x * ch:x * ch + 3]) for y in range(60, 200, 4) for x in range(100, 400, 25)]
    assert any(r > g + 10 and r > b + 15 for r, g, b in banner), "no error-coloured verdict banner"


def test_dump_dom_has_the_svg_figures(page):
    class Counter(HTMLParser):
        def __init__(self):
            super().__init__()
            self.plots, self.sections, self.scripts = [], set(), 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "svg" and "plot" in (a.get("class") or "").split():
                self.plots.append(a.get("data-plot"))
            if tag == "section":
                self.sections.add(a.get("id"))
            self.scripts += tag == "script"

    dom = dump_dom(page)
    c = Counter()
    c.feed(dom)
    expected = {"variance", "grads", "gamma", "sqnr", "profile-share", "profile-ops"}
    assert expected <= set(c.plots)
    assert c.plots.count("hist") == len(layer_names())
    assert {"summary", "findings", "layers", "plots", "export", "quant", "profile", "steps"} <= c.sections
    assert c.scripts == 1


def test_screenshot_command_line(page, tmp_path):
    out = tmp_path / "cli.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "normscope.report.screenshot", str(page), str(out),
                           "--width", "640", "--height", "400"], capture_output=True, text=True, env=env, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert Path(proc.stdout.strip()) == out.resolve()
    width, height, _, _ = read_png(out)
    assert (width, height) == (640, 400)


def test_screenshot_errors(tmp_path, monkeypatch):
    html = tmp_path / "r.html"
    html.write_text("<!DOCTYPE html><p>x</p>")
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        screenshot(html, tmp_path / "x.png", chromium=str(tmp_path / "no-such-browser"))
    monkeypatch.setenv("NORMSCOPE_CHROMIUM", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        find_chromium()
    monkeypatch.delenv("NORMSCOPE_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no Chromium found on PATH.*apt-get install chromium"):
        find_chromium()
    with pytest.raises(ValueError, match="Expected width to be a positive int, but got 0"):
        screenshot(html, tmp_path / "x.png", width=0, chromium=str(tmp_path / "unused"))
    failing = tmp_path / "fake-chromium"
    failing.write_text("#!/bin/sh\necho 'crashed: no display' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="exit status 3.*crashed: no display"):
        screenshot(html, tmp_path / "x.png", chromium=str(failing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        screenshot(tmp_path / "nope.html", tmp_path / "x.png", chromium=str(failing))


def test_layer_table_sorts_on_header_click(page, tmp_path):
    # the page's own script, driven by two clicks on "var mean": ascending, then descending
    probe = ("<script>var th = Array.prototype.find.call(document.querySelectorAll('table.layers th'),"
             " function (h) { return h.textContent.trim() === 'var mean'; });"
             "th.click(); var a = document.querySelector('table.layers tbody tr td code').textContent;"
             "th.click(); var d = document.querySelector('table.layers tbody tr td code').textContent;"
             "document.body.setAttribute('data-asc', a); document.body.setAttribute('data-desc', d);</script>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")

    class Body(HTMLParser):
        attrs = {}

        def handle_starttag(self, tag, attrs):
            if tag == "body":
                Body.attrs = dict(attrs)

    Body().feed(dump_dom(probed))
    by_var = sorted(make_result()["layers"], key=lambda L: L["stats"]["var_mean"])
    assert Body.attrs.get("data-asc") == by_var[0]["name"]
    assert Body.attrs.get("data-desc") == by_var[-1]["name"]


def test_screenshot_passes_the_isolation_flags_and_a_fresh_profile(tmp_path):
    # a stand-in browser that records its arguments and writes the file named by --screenshot=
    html = tmp_path / "r.html"
    html.write_text("<!DOCTYPE html><p>x</p>")
    log = tmp_path / "argv.txt"
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\n"
                    f"for a in \"$@\"; do echo \"$a\" >> '{log}'; done\n"
                    "for a in \"$@\"; do case \"$a\" in --screenshot=*) printf PNG > \"${a#--screenshot=}\";; "
                    "--user-data-dir=*) test -d \"${a#--user-data-dir=}\" || exit 9;; esac; done\n")
    fake.chmod(0o755)
    out = screenshot(html, tmp_path / "o.png", width=800, height=600, chromium=str(fake))
    assert out.read_bytes() == b"PNG"
    args = log.read_text().splitlines()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=800,600"):
        assert flag in args, flag
    # Chromium writes into a temporary directory next to the PNG, which is then renamed into place
    shot = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--screenshot=")))
    assert shot.parent.parent == out.parent and not shot.parent.exists()
    assert args[-1] == html.resolve().as_uri()
    profile = next(a.split("=", 1)[1] for a in args if a.startswith("--user-data-dir="))
    assert not os.path.exists(profile), "the temporary profile is removed afterwards"
