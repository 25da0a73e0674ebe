"""The documentation site builds with --strict: every page link, anchor and API reference resolves."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="needs the docs extra (pip install 'normscope[docs]')")


def _build(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_site_builds_strict_with_api_reference(tmp_path):
    p = _build(tmp_path / "site", ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    api = (tmp_path / "site" / "api" / "ops" / "index.html").read_text()
    assert "normscope.functional.layer_norm" in api and "normscope.nn.LayerNorm" in api
    monitor = (tmp_path / "site" / "api" / "monitor" / "index.html").read_text()
    assert "normscope.monitor.Monitor" in monitor


@pytest.mark.parametrize("bad", ["[gone](no-such-page.md)", "[gone](monitor.md#no-such-anchor)",
                                 "[gone](../examples/no_such_example.py)"])
def test_broken_links_fail_the_build(tmp_path, bad):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", repo / "docs")
    shutil.copy(ROOT / "mkdocs.yml", repo / "mkdocs.yml")
    (repo / "examples").symlink_to(ROOT / "examples")
    (repo / "src").symlink_to(ROOT / "src")
    with open(repo / "docs" / "index.md", "a") as f:
        f.write(f"\n{bad}\n")
    p = _build(tmp_path / "site", repo)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "strict mode" in p.stderr or "not a file of the repository" in p.stderr, p.stderr
