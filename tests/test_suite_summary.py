"""The suite's closing line: tests skipped for a missing system package are named with the command that installs it."""

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def test_skips_for_system_packages_are_summarised_last(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "@pytest.mark.parametrize('i', range(2))\n"
        "def test_needs_browser(i): pytest.skip('chromium not installed (apt-get install chromium)')\n"
        "def test_needs_promtool(): pytest.skip('promtool not installed (apt-get install prometheus)')\n"
        "def test_other_skip(): pytest.skip('needs a machine without CUDA')\n"
    )
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, p.stdout + p.stderr
    summary = lines[-2]  # the last line is pytest's counts
    assert summary.startswith("normscope: 3 tests skipped for missing system packages"), p.stdout
    assert "chromium: test_sample.py x2" in summary and "prometheus: test_sample.py x1" in summary
    assert summary.endswith("install them with: sudo bash scripts/install-system-deps.sh")
    assert "1 passed, 4 skipped" in lines[-1]


def test_no_line_when_nothing_needs_a_system_package(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_sample.py").write_text("import pytest\ndef test_skip(): pytest.skip('not today')\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "install-system-deps" not in p.stdout
