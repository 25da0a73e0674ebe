"""The typing contract of the public API: a user's script calling every public function passes ``mypy --strict``.

The script is tests/typing/user_script.py. It is checked three ways: every name in the ``__all__`` of the
public modules appears in it (so the contract grows with the API), mypy --strict accepts it (normscope ships
``py.typed``, so mypy reads normscope's own annotations), and it runs.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "typing" / "user_script.py"


def _public_modules() -> tuple:
    tree = ast.parse(SCRIPT.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PUBLIC_MODULES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("PUBLIC_MODULES not found in the script")


def test_every_public_name_is_used_by_the_script():
    source = SCRIPT.read_text()
    missing = []
    for mod_name in _public_modules():
        module = importlib.import_module(mod_name)
        for name in module.__all__:
            if not re.search(rf"\b{re.escape(name)}\b", source):
                missing.append(f"{mod_name}.{name}")
    assert not missing, f"public names the typing script never uses: {missing}"


def test_script_covers_the_api_reference():
    # The modules of the API reference (docs/api/*.md) and the modules the typing script covers are the same set.
    documented = set()
    for page in (Path(__file__).parents[1] / "docs" / "api").glob("*.md"):
        documented.update(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    covered = set(_public_modules()) - {"normscope"}
    assert documented == covered, (
        f"documented only: {sorted(documented - covered)}; covered only: {sorted(covered - documented)}"
    )


@pytest.mark.slow
def test_mypy_strict_accepts_the_user_script(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the dev extra: pip install -e '.[dev]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
         str(SCRIPT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.mlflow
def test_the_user_script_runs(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("normscope ") and lines[-1].endswith(" ok"), lines[-5:]
    assert "onnx ok: True" in proc.stdout
    assert "registered pass" in proc.stdout
