"""The HTML report of ``normscope audit``: one self-contained page (inline CSS and SVG, no network).

``render_html(result)`` turns an audit result dict into HTML, ``write_html(result, path)`` writes it
atomically, ``screenshot(html, png)`` renders a page with headless Chromium, and ``MITIGATIONS`` /
``mitigation_for(kind)`` say what to do about each kind of finding. Only the standard library is
imported here.
"""

import warnings

from normscope.report.html import render_html, write_html
from normscope.report.mitigations import FAILURE_MODES, MITIGATIONS, Mitigation, mitigation_for
from normscope.report.screenshot import dump_dom, find_chromium, screenshot

# `python -m normscope.report.screenshot` runs a module this package has already imported for its
# functions; runpy's warning about that is noise (the module only defines functions).
warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy",
                        message=r"'normscope\.report\.screenshot' found in sys\.modules")

__all__ = ["render_html", "write_html", "MITIGATIONS", "FAILURE_MODES", "Mitigation", "mitigation_for",
           "screenshot", "dump_dom", "find_chromium"]
